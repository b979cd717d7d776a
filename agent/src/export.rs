//! Delivering the daemon's per-process profiles to a collector: the one
//! embedded in this process (the default), or a remote one.
use std::time::{Duration, SystemTime};

use fathom_collector::{
    Ingest,
    model::{RawProfile, SeriesLabels},
};

use crate::session::{ProcessProfile, ProfileSink};

/// The series labels of a process's CPU profile: Pyroscope's `process_cpu`
/// name, the service, and this node.
pub fn series_labels(p: &ProcessProfile, node: &str) -> Option<SeriesLabels> {
    SeriesLabels::new([
        ("__name__", "process_cpu".to_string()),
        ("service_name", p.service_name()),
        ("node", node.to_string()),
    ])
    .ok()
}

/// This machine's name (the `node` label).
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Hands profiles to the collector running in this process. The queue's
/// back-pressure is honoured for up to `timeout` per profile; what still does
/// not fit is counted.
pub struct EmbeddedSink {
    ingest: Ingest,
    node: String,
    timeout: Duration,
    failures: u64,
}

impl EmbeddedSink {
    pub fn new(ingest: Ingest) -> Self {
        Self {
            ingest,
            node: node_name(),
            timeout: Duration::from_secs(2),
            failures: 0,
        }
    }
}

impl ProfileSink for EmbeddedSink {
    fn deliver(&mut self, _window_start: SystemTime, profiles: Vec<ProcessProfile>) -> usize {
        let mut delivered = 0;
        for p in profiles {
            let Some(labels) = series_labels(&p, &self.node) else {
                self.failures += 1;
                continue;
            };
            // Our own pprof, re-read with the collector's decoder: it is
            // validated exactly like a profile from the network.
            let bytes = prost_encode(&p.profile);
            let profile = match fathom_collector::pprof::decode(&bytes) {
                Ok(profile) => profile,
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(pid = p.pid, error = %e, "profile refused by the collector");
                    continue;
                }
            };
            let raw = RawProfile {
                labels,
                profile,
                received: SystemTime::now(),
            };
            match self.ingest.profile_blocking(raw, self.timeout) {
                Ok(()) => delivered += 1,
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(error = %e, failures = self.failures, "profile not delivered");
                }
            }
        }
        delivered
    }

    fn failures(&self) -> u64 {
        self.failures
    }
}

fn prost_encode(p: &pprof::protos::Profile) -> Vec<u8> {
    use pprof::protos::Message as _;
    p.encode_to_vec()
}
