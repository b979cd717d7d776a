//! Exporters: OTLP (spans and metrics, gRPC or HTTP/protobuf), Pyroscope
//! (profiles, connect push) and the Prometheus registry behind `/metrics`.
//!
//! The network exporters take batches off their sink channel at once and keep
//! them in their own byte-bounded [`retry::RetryBuffer`], so a backend that is
//! down never stalls the fan-out; one task per exporter sends the oldest
//! buffered data, one request at a time, and retries with backoff.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{pipeline::Batch, stats::ExporterStats};

pub mod otlp;
pub mod prometheus;
pub mod pyroscope;
pub mod retry;

use retry::{Attempt, Backoff, Entry, RetryBuffer};

/// A future of one delivery attempt.
pub(crate) type AttemptFuture = Pin<Box<dyn Future<Output = Attempt> + Send>>;

/// How an exporter turns batches into buffered entries and entries into
/// requests.
pub(crate) trait Delivery: Send + 'static {
    type Item: Clone + Send + 'static;
    /// Entries for the buffer (none for batch kinds this exporter ignores).
    fn encode(&mut self, batch: &Batch) -> Vec<Entry<Self::Item>>;
    /// Whether `b` may go in the same request as `a`.
    fn joinable(a: &Self::Item, b: &Self::Item) -> bool;
    /// Sends the items as one request.
    fn send(&self, items: Vec<Self::Item>) -> AttemptFuture;
}

/// Largest request built by joining buffered entries (receivers commonly
/// refuse more than 4 MiB).
pub(crate) const MAX_JOINED_REQUEST_BYTES: u64 = 3 << 20;

/// Runs an exporter until its channel closes, then keeps delivering what is
/// buffered until `shutdown_deadline` has passed; what is left then is
/// counted as dropped.
pub(crate) async fn drive<D: Delivery>(
    name: &str,
    mut delivery: D,
    mut rx: mpsc::Receiver<Batch>,
    stats: Arc<ExporterStats>,
    buffer_bytes: u64,
    shutdown_deadline: Duration,
) {
    let mut buffer: RetryBuffer<D::Item> = RetryBuffer::new(buffer_bytes, stats);
    let mut backoff = Backoff::default();
    let mut next_try = Instant::now();
    let mut running: Option<AttemptFuture> = None;
    let mut open = true;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if running.is_none() && Instant::now() >= next_try {
            running = buffer
                .begin(MAX_JOINED_REQUEST_BYTES, D::joinable)
                .map(|items| delivery.send(items));
        }
        if !open && running.is_none() && buffer.is_empty() {
            break;
        }
        let wait = tokio::time::Instant::from_std(next_try);
        let waiting = running.is_none() && !buffer.is_empty();
        let attempt = async {
            match running.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = rx.recv(), if open => match batch {
                Some(batch) => {
                    for entry in delivery.encode(&batch) {
                        let dropped = buffer.push(entry);
                        if dropped > 0 {
                            tracing::warn!(exporter = name, dropped, "export buffer full: oldest data dropped");
                        }
                    }
                }
                None => {
                    open = false;
                    deadline = Some(tokio::time::Instant::now() + shutdown_deadline);
                }
            },
            outcome = attempt => {
                running = None;
                let done = buffer.complete(&outcome);
                match &outcome {
                    Attempt::Delivered { rejected, message } => {
                        backoff.reset();
                        next_try = Instant::now();
                        if *rejected > 0 || message.is_some() {
                            tracing::warn!(exporter = name, rejected, message = message.as_deref().unwrap_or(""),
                                "receiver accepted part of the data (partial success)");
                        }
                    }
                    Attempt::Retry { after, reason } => {
                        let delay = after.unwrap_or_else(|| backoff.next_delay(fastrand::f64()));
                        next_try = Instant::now() + delay;
                        tracing::debug!(exporter = name, %reason, ?delay, buffered = buffer.len(), "export failed, will retry");
                        if done.dropped > 0 {
                            tracing::warn!(exporter = name, dropped = done.dropped, "export buffer full: data of a failed attempt dropped");
                        }
                    }
                    Attempt::Permanent { reason } => {
                        next_try = Instant::now();
                        tracing::warn!(exporter = name, %reason, dropped = done.dropped, "receiver refused the data; dropped");
                    }
                }
            }
            _ = tokio::time::sleep_until(wait), if waiting => {}
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                drop(running.take());
                let dropped = buffer.abandon();
                if dropped > 0 {
                    tracing::warn!(exporter = name, dropped, "shutdown deadline passed: undelivered data dropped");
                }
                break;
            }
        }
    }
}
