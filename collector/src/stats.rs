//! The collector's own counters (exposed at `/metrics` as `fathom_collector_*`
//! and logged at shutdown).
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

/// One monotonically increasing counter or a gauge.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one signal (profiles, spans, metric points) at ingest.
#[derive(Default, Debug)]
pub struct SignalStats {
    /// Items accepted into the pipeline.
    pub accepted: Counter,
    /// Items refused because a queue was full (the client was told to retry).
    pub refused_full: Counter,
    /// Requests refused as malformed (400 / INVALID_ARGUMENT).
    pub invalid_requests: Counter,
    /// Requests refused for missing or wrong credentials.
    pub unauthenticated: Counter,
}

/// Counters of one exporter or sink.
#[derive(Default, Debug)]
pub struct ExporterStats {
    pub name: String,
    /// Items delivered (spans, profiles, metric points).
    pub sent: Counter,
    /// Failed delivery attempts (each is retried while it fits the buffer).
    pub failed_attempts: Counter,
    /// Items dropped because the buffer bound was exceeded or the data was
    /// refused permanently.
    pub dropped: Counter,
    /// Gauges: what is waiting for delivery now.
    pub buffered_items: Counter,
    pub buffered_bytes: Counter,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub profiles: SignalStats,
    pub spans: SignalStats,
    pub metrics: SignalStats,
    /// Profile series folded into `{__name__, service_name}` because the
    /// series bound was reached.
    pub series_folded: Counter,
    /// Profiles that could not be merged into their series (incompatible
    /// sample types); kept as a separate series.
    pub merge_conflicts: Counter,
    /// Merged profiles emitted by the aggregator.
    pub windows_emitted: Counter,
    exporters: Mutex<Vec<Arc<ExporterStats>>>,
}

impl Stats {
    /// The counters of a named exporter, created on first use.
    pub fn exporter(&self, name: &str) -> Arc<ExporterStats> {
        let mut list = self
            .exporters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = list.iter().find(|e| e.name == name) {
            return e.clone();
        }
        let e = Arc::new(ExporterStats {
            name: name.to_string(),
            ..ExporterStats::default()
        });
        list.push(e.clone());
        e
    }

    pub fn exporters(&self) -> Vec<Arc<ExporterStats>> {
        self.exporters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
