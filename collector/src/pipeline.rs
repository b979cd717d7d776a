//! Bounded queues from receivers to the aggregator and batcher, and the
//! fan-out from there to every sink (store, exporters).
//!
//! Back-pressure: receivers only `try_send`; a full queue is reported to the
//! client (gRPC `UNAVAILABLE` with `RetryInfo` / HTTP 429) so it retries later, nothing is
//! dropped silently. Sinks are awaited in turn, so a slow sink fills the queues
//! and pushes back the same way; exporters keep their own byte-bounded retry
//! buffers, so an exporter that is down does not stall the others.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest,
};
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::{
    model::{MergedProfile, RawProfile},
    stats::Stats,
};

/// What a sink receives. `Arc` so that every sink shares one copy.
#[derive(Clone, Debug)]
pub enum Batch {
    Profiles(Arc<Vec<MergedProfile>>),
    Spans(Arc<ExportTraceServiceRequest>),
    /// Spans that arrived already encoded (the agent's tracing signal in
    /// this process): exporters send the bytes as they are; the store
    /// decodes them.
    EncodedSpans(Arc<EncodedSpans>),
    Metrics(Arc<ExportMetricsServiceRequest>),
}

/// An OTLP `ExportTraceServiceRequest` already encoded as protobuf, and how
/// many spans it holds. Two of them end to end are one request with the
/// spans of both (protobuf's repeated fields concatenate).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedSpans {
    pub bytes: bytes::Bytes,
    pub spans: u64,
}

impl EncodedSpans {
    pub fn new(bytes: Vec<u8>, spans: u64) -> Self {
        Self {
            bytes: bytes.into(),
            spans,
        }
    }

    /// The request, decoded.
    pub fn decode(&self) -> Result<ExportTraceServiceRequest, prost::DecodeError> {
        ExportTraceServiceRequest::decode(self.bytes.clone())
    }
}

/// What the span queue carries.
#[derive(Debug)]
pub enum SpanRequest {
    Decoded(ExportTraceServiceRequest),
    Encoded(EncodedSpans),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("the collector's {0} queue is full, retry later")]
    Full(&'static str),
    #[error("the collector is shutting down")]
    ShuttingDown,
}

/// An item waiting in an ingest queue, holding its share of the queued-bytes
/// budget until the aggregator or batcher has taken it in.
#[derive(Debug)]
pub struct Queued<T> {
    pub item: T,
    _budget: Option<OwnedSemaphorePermit>,
}

impl<T> Queued<T> {
    pub fn new(item: T) -> Self {
        Self {
            item,
            _budget: None,
        }
    }
}

/// Memory bound of everything waiting in the ingest queues, in KiB of encoded
/// protobuf (semaphore permits). A request larger than the whole budget may
/// still pass when the queues are empty.
#[derive(Clone, Debug)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    kib: u32,
}

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, Semaphore::MAX_PERMITS as u32);
        Self {
            semaphore: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    fn take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let want = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.kib);
        self.semaphore.clone().try_acquire_many_owned(want).ok()
    }

    /// KiB free now.
    pub fn available_kib(&self) -> usize {
        self.semaphore.available_permits()
    }
}

/// The receivers' (and an in-process agent's) handle into the pipeline.
#[derive(Clone, Debug)]
pub struct Ingest {
    pub(crate) profiles: mpsc::Sender<Queued<RawProfile>>,
    pub(crate) spans: mpsc::Sender<Queued<SpanRequest>>,
    pub(crate) metrics: mpsc::Sender<Queued<ExportMetricsServiceRequest>>,
    pub(crate) budget: Budget,
    pub stats: Arc<Stats>,
}

fn map_err<T>(e: mpsc::error::TrySendError<T>, queue: &'static str) -> IngestError {
    match e {
        mpsc::error::TrySendError::Full(_) => IngestError::Full(queue),
        mpsc::error::TrySendError::Closed(_) => IngestError::ShuttingDown,
    }
}

impl Ingest {
    /// Wraps an item with its share of the budget; `None` when the budget is
    /// exhausted.
    fn queued<T>(&self, item: T, bytes: usize) -> Option<Queued<T>> {
        let permit = self.budget.take(bytes)?;
        Some(Queued {
            item,
            _budget: Some(permit),
        })
    }

    pub fn profile(&self, p: RawProfile) -> Result<(), IngestError> {
        let bytes = p.profile.encoded_len();
        let Some(q) = self.queued(p, bytes) else {
            self.stats.profiles.refused_full.inc();
            return Err(IngestError::Full("profile"));
        };
        match self.profiles.try_send(q) {
            Ok(()) => {
                self.stats.profiles.accepted.inc();
                Ok(())
            }
            Err(e) => {
                let e = map_err(e, "profile");
                if matches!(e, IngestError::Full(_)) {
                    self.stats.profiles.refused_full.inc();
                }
                Err(e)
            }
        }
    }

    /// All of `ps` or none (a push request is accepted or refused whole).
    pub fn profiles_all(&self, ps: Vec<RawProfile>) -> Result<(), IngestError> {
        if ps.is_empty() {
            return Ok(());
        }
        let n = ps.len() as u64;
        let bytes: usize = ps.iter().map(|p| p.profile.encoded_len()).sum();
        let Some(budget) = self.budget.take(bytes) else {
            self.stats.profiles.refused_full.add(n);
            return Err(IngestError::Full("profile"));
        };
        match self.profiles.try_reserve_many(ps.len()) {
            Ok(permits) => {
                // The whole request's budget travels with its first profile.
                let mut budget = Some(budget);
                for (permit, p) in permits.zip(ps) {
                    permit.send(Queued {
                        item: p,
                        _budget: budget.take(),
                    });
                }
                self.stats.profiles.accepted.add(n);
                Ok(())
            }
            Err(e) => {
                let e = map_err(e, "profile");
                if matches!(e, IngestError::Full(_)) {
                    self.stats.profiles.refused_full.add(n);
                }
                Err(e)
            }
        }
    }

    /// For an in-process producer on a plain thread (the agent): waits up to
    /// `timeout` for room instead of failing at once.
    pub fn profile_blocking(&self, p: RawProfile, timeout: Duration) -> Result<(), IngestError> {
        let deadline = Instant::now() + timeout;
        let bytes = p.profile.encoded_len();
        let mut p = Queued::new(p);
        loop {
            if p._budget.is_none() {
                p._budget = self.budget.take(bytes);
            }
            if p._budget.is_none() {
                if Instant::now() >= deadline {
                    self.stats.profiles.refused_full.inc();
                    return Err(IngestError::Full("profile"));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            match self.profiles.try_send(p) {
                Ok(()) => {
                    self.stats.profiles.accepted.inc();
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(IngestError::ShuttingDown),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        self.stats.profiles.refused_full.inc();
                        return Err(IngestError::Full("profile"));
                    }
                    p = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn spans(&self, req: ExportTraceServiceRequest) -> Result<(), IngestError> {
        let n = span_count(&req);
        let bytes = req.encoded_len();
        self.span_request(SpanRequest::Decoded(req), n, bytes)
    }

    /// Spans already encoded (by the agent in this process): they travel
    /// to the exporters without being decoded and encoded again.
    pub fn encoded_spans(&self, spans: EncodedSpans) -> Result<(), IngestError> {
        let n = spans.spans;
        let bytes = spans.bytes.len();
        self.span_request(SpanRequest::Encoded(spans), n, bytes)
    }

    fn span_request(&self, req: SpanRequest, n: u64, bytes: usize) -> Result<(), IngestError> {
        let Some(q) = self.queued(req, bytes) else {
            self.stats.spans.refused_full.add(n);
            return Err(IngestError::Full("span"));
        };
        match self.spans.try_send(q) {
            Ok(()) => {
                self.stats.spans.accepted.add(n);
                Ok(())
            }
            Err(e) => {
                let e = map_err(e, "span");
                if matches!(e, IngestError::Full(_)) {
                    self.stats.spans.refused_full.add(n);
                }
                Err(e)
            }
        }
    }

    pub fn metrics(&self, req: ExportMetricsServiceRequest) -> Result<(), IngestError> {
        let n = metric_point_count(&req);
        let bytes = req.encoded_len();
        let Some(q) = self.queued(req, bytes) else {
            self.stats.metrics.refused_full.add(n);
            return Err(IngestError::Full("metric"));
        };
        match self.metrics.try_send(q) {
            Ok(()) => {
                self.stats.metrics.accepted.add(n);
                Ok(())
            }
            Err(e) => {
                let e = map_err(e, "metric");
                if matches!(e, IngestError::Full(_)) {
                    self.stats.metrics.refused_full.add(n);
                }
                Err(e)
            }
        }
    }
}

pub fn span_count(req: &ExportTraceServiceRequest) -> u64 {
    req.resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum()
}

pub fn metric_point_count(req: &ExportMetricsServiceRequest) -> u64 {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    req.resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| match &m.data {
            Some(Data::Gauge(g)) => g.data_points.len(),
            Some(Data::Sum(s)) => s.data_points.len(),
            Some(Data::Histogram(h)) => h.data_points.len(),
            Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(Data::Summary(s)) => s.data_points.len(),
            None => 0,
        } as u64)
        .sum()
}

/// A named consumer of batches.
#[derive(Clone, Debug)]
pub struct Sink {
    pub name: String,
    pub tx: mpsc::Sender<Batch>,
}

/// Delivers each batch to every sink, awaiting each in turn (back-pressure).
#[derive(Clone, Debug, Default)]
pub struct Fanout {
    sinks: Vec<Sink>,
}

impl Fanout {
    pub fn new(sinks: Vec<Sink>) -> Self {
        Self { sinks }
    }

    pub async fn send(&self, batch: Batch) {
        for sink in &self.sinks {
            if sink.tx.send(batch.clone()).await.is_err() {
                tracing::warn!(sink = %sink.name, "sink has stopped; batch not delivered to it");
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}
