//! Delivering the daemon's per-process profiles to the collector in this
//! process, which stores them or exports them (to a remote collector, to
//! Pyroscope).
use std::time::{Duration, SystemTime};

use fathom_collector::{
    Ingest,
    model::{RawProfile, SeriesLabels},
};

use super::{
    session::{ProcessProfile, ProfileSink},
    unwind::stats::UnwindStats,
};
use crate::otlp::node_name;

/// The series labels of a process's profile: Pyroscope's `process_cpu` (or
/// `off_cpu`) name, the service, this node, and its container and pod when known
/// ([`ProcessProfile::labels`]).
pub fn series_labels(p: &ProcessProfile, node: &str) -> Option<SeriesLabels> {
    let labels = p.labels(node);
    SeriesLabels::new(
        std::iter::once(("__name__", p.kind.pyroscope_name().to_string()))
            .chain(labels.iter().map(|(k, v)| (k.as_str(), v.clone()))),
    )
    .ok()
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
        // Wait for room once per window: when the collector is that far
        // behind, the rest of the window is counted, not waited for (the
        // profiler's maps must be drained on time).
        let mut timeout = self.timeout;
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
            match self.ingest.profile_blocking(raw, timeout) {
                Ok(()) => delivered += 1,
                Err(e) => {
                    timeout = Duration::ZERO;
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

    fn self_metrics(&mut self, unwind: &UnwindStats) {
        if let Err(e) = self.ingest.metrics(unwind.to_otlp(&self.node)) {
            tracing::debug!(error = %e, "self-metrics not delivered");
        }
    }
}

fn prost_encode(p: &pprof::protos::Profile) -> Vec<u8> {
    use pprof::protos::Message as _;
    p.encode_to_vec()
}
