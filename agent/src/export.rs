//! Delivering the daemon's per-process profiles to a collector: the one
//! embedded in this process (the default), or a remote one.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use fathom_collector::{
    Ingest,
    config::PyroscopeConfig,
    exporters::pyroscope::PyroscopeExporter,
    model::{MergedProfile, RawProfile, SeriesLabels},
    pipeline::Batch,
    stats::ExporterStats,
};
use tokio::sync::mpsc;

use crate::session::{ProcessProfile, ProfileSink};

/// The series labels of a process's CPU profile: Pyroscope's `process_cpu`
/// name, the service, this node, and its container and pod when known
/// ([`ProcessProfile::labels`]).
pub fn series_labels(p: &ProcessProfile, node: &str) -> Option<SeriesLabels> {
    let labels = p.labels(node);
    SeriesLabels::new(
        std::iter::once(("__name__", "process_cpu".to_string()))
            .chain(labels.iter().map(|(k, v)| (k.as_str(), v.clone()))),
    )
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

    fn self_metrics(&mut self, unwind: &crate::unwind_stats::UnwindStats) {
        if let Err(e) = self.ingest.metrics(unwind.to_otlp(&self.node)) {
            tracing::debug!(error = %e, "self-metrics not delivered");
        }
    }
}

/// Sends profiles to a remote collector (or any Pyroscope) with the
/// collector's own Pyroscope exporter: connect push, a byte-bounded retry
/// buffer while the collector is down (oldest dropped first, counted),
/// backoff, and the same sample IDs on retries so nothing counts twice.
pub struct RemoteSink {
    pusher: Pusher,
    node: String,
    window: Duration,
    failures: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("starting the exporter's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Exporter(#[from] fathom_collector::exporters::otlp::ExporterError),
}

impl RemoteSink {
    /// `window`: the daemon's interval (each profile covers one).
    pub fn new(config: &PyroscopeConfig, window: Duration) -> Result<Self, RemoteError> {
        let pusher = Pusher::start(
            "fathom-push",
            "collector",
            "remote collector",
            4,
            |rx, stats| Ok(PyroscopeExporter::new(config)?.run(rx, stats, Duration::from_secs(10))),
        )?;
        Ok(Self {
            pusher,
            node: node_name(),
            window,
            failures: 0,
        })
    }

    /// Profiles delivered, dropped by the buffer bound, and waiting.
    pub fn delivery(&self) -> (u64, u64, u64) {
        self.pusher.delivery()
    }
}

impl ProfileSink for RemoteSink {
    fn deliver(&mut self, window_start: SystemTime, profiles: Vec<ProcessProfile>) -> usize {
        let mut batch = Vec::with_capacity(profiles.len());
        for p in profiles {
            let Some(labels) = series_labels(&p, &self.node) else {
                self.failures += 1;
                continue;
            };
            match fathom_collector::pprof::decode(&prost_encode(&p.profile)) {
                Ok(profile) => batch.push(MergedProfile {
                    labels,
                    window_start,
                    window: self.window,
                    inputs: 1,
                    profile,
                }),
                Err(e) => {
                    self.failures += 1;
                    tracing::warn!(pid = p.pid, error = %e, "profile not sendable");
                }
            }
        }
        let n = batch.len();
        if n == 0 {
            return 0;
        }
        // The exporter moves batches into its buffer at once; this only waits
        // when it is busy encoding.
        match self
            .pusher
            .tx
            .as_ref()
            .map(|tx| tx.blocking_send(Batch::Profiles(Arc::new(batch))))
        {
            Some(Ok(())) => n,
            _ => {
                self.failures += n as u64;
                0
            }
        }
    }

    fn failures(&self) -> u64 {
        self.failures + self.pusher.stats.dropped.get()
    }
}

/// One exporter of the collector crate on a one-thread runtime of its own,
/// fed through a small channel (the exporter moves batches into its
/// byte-bounded buffer at once). Dropping it flushes what is buffered (the
/// exporter gives up after its deadline) and logs the delivery.
struct Pusher {
    runtime: tokio::runtime::Runtime,
    tx: Option<mpsc::Sender<Batch>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Arc<ExporterStats>,
    /// What the exit log line names.
    what: &'static str,
}

impl Pusher {
    /// `exporter` builds the exporter (inside the runtime) and returns its
    /// run future for the channel's receiver and the stats.
    fn start<F>(
        thread_name: &str,
        stats_name: &str,
        what: &'static str,
        capacity: usize,
        exporter: impl FnOnce(mpsc::Receiver<Batch>, Arc<ExporterStats>) -> Result<F, RemoteError>,
    ) -> Result<Self, RemoteError>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name(thread_name)
            .build()
            .map_err(RemoteError::Runtime)?;
        let stats = Arc::new(ExporterStats {
            name: stats_name.into(),
            ..ExporterStats::default()
        });
        let (tx, rx) = mpsc::channel(capacity);
        let run = {
            let _enter = runtime.enter();
            exporter(rx, stats.clone())?
        };
        let task = runtime.spawn(run);
        Ok(Self {
            runtime,
            tx: Some(tx),
            task: Some(task),
            stats,
            what,
        })
    }

    /// Batches delivered, dropped by the buffer bound, and waiting.
    fn delivery(&self) -> (u64, u64, u64) {
        (
            self.stats.sent.get(),
            self.stats.dropped.get(),
            self.stats.buffered_items.get(),
        )
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(task) = self.task.take() {
            let _ = self.runtime.block_on(task);
        }
        let (sent, dropped, waiting) = self.delivery();
        tracing::info!(sent, dropped, waiting, "{}: delivery at exit", self.what);
    }
}

fn prost_encode(p: &pprof::protos::Profile) -> Vec<u8> {
    use pprof::protos::Message as _;
    p.encode_to_vec()
}

/// Sends spans and metrics to a remote collector over OTLP/HTTP (protobuf,
/// `<url>/v1/traces` and `<url>/v1/metrics` on its HTTP port), with the
/// collector crate's exporter: retried while the collector is down, kept up
/// to `buffer_bytes`, drops counted.
pub struct RemoteTraceSink(Pusher);

impl RemoteTraceSink {
    pub fn new(url: &str, token: Option<&str>, buffer_bytes: u64) -> Result<Self, RemoteError> {
        let config = fathom_collector::config::OtlpExporterConfig {
            endpoint: url.to_string(),
            protocol: fathom_collector::config::OtlpProtocol::HttpProtobuf,
            headers: token
                .map(|t| ("Authorization".to_string(), format!("Bearer {t}")))
                .into_iter()
                .collect(),
            timeout: Duration::from_secs(10),
            buffer_bytes,
            metrics: true,
        };
        let pusher = Pusher::start(
            "fathom-otlp-push",
            "collector-otlp",
            "remote collector (spans, metrics)",
            16,
            |rx, stats| {
                Ok(
                    fathom_collector::exporters::otlp::OtlpExporter::new(&config)?.run(
                        rx,
                        stats,
                        Duration::from_secs(10),
                    ),
                )
            },
        )?;
        Ok(Self(pusher))
    }

    fn send(&mut self, batch: Batch) -> bool {
        // Never blocks the tracing thread: a busy exporter means the batch
        // is counted as undelivered by the session.
        self.0
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(batch).is_ok())
    }
}

impl crate::traces::TraceSink for RemoteTraceSink {
    fn spans(
        &mut self,
        req: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) -> bool {
        self.send(Batch::Spans(Arc::new(req)))
    }

    fn metrics(
        &mut self,
        req: opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
    ) -> bool {
        self.send(Batch::Metrics(Arc::new(req)))
    }
}
