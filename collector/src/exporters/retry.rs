//! What every exporter shares, without I/O: a byte-bounded FIFO of encoded
//! items waiting for delivery, exponential backoff with jitter, and the
//! classification of a failed attempt (retry later, or drop and count).
//!
//! Delivery is exactly-once towards a receiver that answers: an item leaves
//! the buffer only after a success response (or a permanent refusal), so it is
//! never sent again after the receiver acknowledged it. The one case no sender
//! can rule out is a receiver that processed a request and died before it
//! answered: that request is retried.
//!
//! Accounting: every item pushed ends up in exactly one of
//! `ExporterStats.sent` or `ExporterStats.dropped` (or is still buffered), so
//! `pushed == sent + dropped + buffered_items` at all times.
use std::{collections::VecDeque, sync::Arc, time::Duration};

use crate::stats::ExporterStats;

/// One encoded item: a span or metric export request, a Pyroscope push.
#[derive(Clone, Debug)]
pub struct Entry<T> {
    pub item: T,
    /// Encoded size; what the buffer bound counts.
    pub bytes: u64,
    /// Spans, metric points or profiles in it (what the counters count).
    pub count: u64,
}

/// How one delivery attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Attempt {
    /// The receiver took the request; `rejected` items of it were refused
    /// (OTLP partial success) and are counted as dropped.
    Delivered {
        rejected: u64,
        message: Option<String>,
    },
    /// A transient failure: keep the items and try again (after `after` when
    /// the receiver said so, e.g. `Retry-After`).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The receiver refused the data for good (malformed, too large): drop
    /// and count it.
    Permanent { reason: String },
}

/// What the buffer did with a finished attempt, for logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    pub sent: u64,
    pub dropped: u64,
}

/// A FIFO of entries bounded by their encoded bytes. When a new entry does not
/// fit, the oldest entries are dropped (and counted) to make room; an entry
/// larger than the whole bound is dropped itself.
///
/// The oldest entries may be *in flight* (handed to a sender by [`begin`]).
/// When those must give way, they are marked doomed instead of removed: if
/// their attempt succeeds they count as sent, otherwise as dropped. The bound
/// can therefore be exceeded by at most one in-flight request.
///
/// [`begin`]: RetryBuffer::begin
#[derive(Debug)]
pub struct RetryBuffer<T> {
    queue: VecDeque<Entry<T>>,
    /// The first `in_flight` entries of `queue` are being sent.
    in_flight: usize,
    /// The in-flight entries were given up to make room.
    doomed: bool,
    /// Bytes held, not counting doomed in-flight entries.
    bytes: u64,
    max_bytes: u64,
    stats: Arc<ExporterStats>,
}

impl<T: Clone> RetryBuffer<T> {
    pub fn new(max_bytes: u64, stats: Arc<ExporterStats>) -> Self {
        let b = Self {
            queue: VecDeque::new(),
            in_flight: 0,
            doomed: false,
            bytes: 0,
            max_bytes,
            stats,
        };
        b.update_gauges();
        b
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Entries held (in flight included).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Bytes held against the bound.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_in_flight(&self) -> bool {
        self.in_flight > 0
    }

    fn items_held(&self) -> u64 {
        self.queue.iter().map(|e| e.count).sum()
    }

    fn update_gauges(&self) {
        self.stats.buffered_items.set(self.items_held());
        self.stats.buffered_bytes.set(self.bytes);
    }

    /// Adds an entry, dropping the oldest ones when it does not fit. Returns
    /// how many items (`count`s) were dropped now.
    pub fn push(&mut self, entry: Entry<T>) -> u64 {
        let mut dropped = 0;
        if entry.bytes > self.max_bytes {
            // Larger than the whole buffer: it can never be held.
            dropped += entry.count;
            self.stats.dropped.add(entry.count);
            self.update_gauges();
            return dropped;
        }
        while self.bytes + entry.bytes > self.max_bytes {
            if self.in_flight > 0 && !self.doomed {
                // The oldest entries are being sent: let the attempt decide.
                self.doomed = true;
                let held: u64 = self
                    .queue
                    .iter()
                    .take(self.in_flight)
                    .map(|e| e.bytes)
                    .sum();
                self.bytes -= held;
                continue;
            }
            // The oldest entry that is not in flight.
            match self.queue.remove(self.in_flight) {
                Some(old) => {
                    self.bytes -= old.bytes;
                    dropped += old.count;
                }
                None => break,
            }
        }
        self.stats.dropped.add(dropped);
        self.bytes += entry.bytes;
        self.queue.push_back(entry);
        self.update_gauges();
        dropped
    }

    /// Hands the oldest entries to a sender: as many as fit in
    /// `request_bytes` (at least one) and that `joinable` accepts together with
    /// the first. `None` when empty or an attempt is already running.
    pub fn begin(
        &mut self,
        request_bytes: u64,
        joinable: impl Fn(&T, &T) -> bool,
    ) -> Option<Vec<T>> {
        if self.in_flight > 0 {
            return None;
        }
        let first = self.queue.front()?;
        let mut total = first.bytes;
        let mut n = 1;
        for e in self.queue.iter().skip(1) {
            if total + e.bytes > request_bytes || !joinable(&first.item, &e.item) {
                break;
            }
            total += e.bytes;
            n += 1;
        }
        self.in_flight = n;
        self.doomed = false;
        Some(self.queue.iter().take(n).map(|e| e.item.clone()).collect())
    }

    /// Items in the running attempt.
    pub fn in_flight_count(&self) -> u64 {
        self.queue
            .iter()
            .take(self.in_flight)
            .map(|e| e.count)
            .sum()
    }

    /// Records how the running attempt ended.
    pub fn complete(&mut self, attempt: &Attempt) -> Completed {
        let n = std::mem::take(&mut self.in_flight);
        let doomed = std::mem::take(&mut self.doomed);
        let items: u64 = self.queue.iter().take(n).map(|e| e.count).sum();
        let bytes: u64 = self.queue.iter().take(n).map(|e| e.bytes).sum();
        let remove = |this: &mut Self| {
            this.queue.drain(..n);
            if !doomed {
                this.bytes -= bytes;
            }
        };
        let done = match attempt {
            Attempt::Delivered { rejected, .. } => {
                let rejected = (*rejected).min(items);
                remove(self);
                Completed {
                    sent: items - rejected,
                    dropped: rejected,
                }
            }
            Attempt::Permanent { .. } => {
                self.stats.failed_attempts.inc();
                remove(self);
                Completed {
                    sent: 0,
                    dropped: items,
                }
            }
            Attempt::Retry { .. } => {
                self.stats.failed_attempts.inc();
                if doomed {
                    remove(self);
                    Completed {
                        sent: 0,
                        dropped: items,
                    }
                } else {
                    Completed {
                        sent: 0,
                        dropped: 0,
                    }
                }
            }
        };
        self.stats.sent.add(done.sent);
        self.stats.dropped.add(done.dropped);
        self.update_gauges();
        done
    }
}

impl<T> RetryBuffer<T> {
    /// Gives up everything still held (shutdown deadline passed); returns the
    /// items dropped.
    pub fn abandon(&mut self) -> u64 {
        let items: u64 = self.queue.iter().map(|e| e.count).sum();
        self.queue.clear();
        self.in_flight = 0;
        self.doomed = false;
        self.bytes = 0;
        self.stats.dropped.add(items);
        self.stats.buffered_items.set(0);
        self.stats.buffered_bytes.set(0);
        items
    }
}

/// A buffer dropped with data in it (its exporter task was aborted) counts
/// that data as dropped, so the counters stay exact.
impl<T> Drop for RetryBuffer<T> {
    fn drop(&mut self) {
        let dropped = self.abandon();
        if dropped > 0 {
            tracing::warn!(exporter = %self.stats.name, dropped, "exporter stopped with undelivered data; dropped");
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th delay is uniformly drawn
/// from `[d/2, d]` with `d = min(initial * 2^n, max)`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    /// 100 ms, doubling up to 30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Parses `Retry-After` (delay in seconds; an HTTP date is not supported and
/// falls back to the backoff).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// An HTTP response status of an export request (OTLP/HTTP, Pyroscope).
/// Retried: 408, 429, 502, 503, 504 (the OTLP specification's list, plus 408
/// that Connect uses for `deadline_exceeded`); other statuses ≥ 300 drop the
/// data (400 malformed, 413 too large, 401/403 credentials, 422 refused...).
pub fn classify_http(status: u16, retry_after: Option<&str>, body: &str) -> Attempt {
    let excerpt: String = body.chars().take(300).collect();
    match status {
        200..=299 => Attempt::Delivered {
            rejected: 0,
            message: None,
        },
        408 | 429 | 502 | 503 | 504 => Attempt::Retry {
            after: retry_after.and_then(parse_retry_after),
            reason: format!("HTTP {status}: {excerpt}"),
        },
        _ => Attempt::Permanent {
            reason: format!("HTTP {status}: {excerpt}"),
        },
    }
}

/// A gRPC status of an export call, as the OTLP specification's "OTLP/gRPC
/// Response" and "OTLP/gRPC Throttling" sections classify it: `CANCELLED`,
/// `DEADLINE_EXCEEDED`, `ABORTED`, `OUT_OF_RANGE`, `UNAVAILABLE` and
/// `DATA_LOSS` are retried; `RESOURCE_EXHAUSTED` only when the server sent a
/// `google.rpc.RetryInfo` (`retry_info`: it can recover), otherwise the data
/// is dropped; every other code is permanent. A `RetryInfo`'s
/// `retry_delay` is the wait before the next attempt (at most
/// [`MAX_RETRY_AFTER`]; without one, the backoff's). `local` is true when
/// tonic produced the status itself from a transport error (no response
/// from the server), which is always worth a retry.
pub fn classify_grpc(
    code: tonic::Code,
    message: &str,
    local: bool,
    retry_info: Option<&tonic_types::RetryInfo>,
) -> Attempt {
    use tonic::Code;
    let delay = retry_info
        .and_then(|r| r.retry_delay)
        .map(|d| d.min(MAX_RETRY_AFTER));
    let reason = match delay {
        Some(d) => format!("gRPC {code:?}: {message} (retry in {d:?})"),
        None => format!("gRPC {code:?}: {message}"),
    };
    match code {
        Code::Ok => Attempt::Delivered {
            rejected: 0,
            message: None,
        },
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled
        | Code::OutOfRange
        | Code::DataLoss => Attempt::Retry {
            after: delay,
            reason,
        },
        Code::ResourceExhausted if retry_info.is_some() => Attempt::Retry {
            after: delay,
            reason,
        },
        _ if local => Attempt::Retry {
            after: None,
            reason,
        },
        _ => Attempt::Permanent { reason },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn entry(id: u32, bytes: u64, count: u64) -> Entry<u32> {
        Entry {
            item: id,
            bytes,
            count,
        }
    }

    fn ok() -> Attempt {
        Attempt::Delivered {
            rejected: 0,
            message: None,
        }
    }

    fn retry() -> Attempt {
        Attempt::Retry {
            after: None,
            reason: "down".into(),
        }
    }

    fn buffer(max: u64) -> (RetryBuffer<u32>, Arc<ExporterStats>) {
        let stats = Arc::new(ExporterStats::default());
        (RetryBuffer::new(max, stats.clone()), stats)
    }

    #[test]
    fn drops_oldest_when_full_and_counts() {
        let (mut b, stats) = buffer(100);
        assert_eq!(b.push(entry(1, 40, 4)), 0);
        assert_eq!(b.push(entry(2, 40, 5)), 0);
        assert_eq!(stats.buffered_bytes.get(), 80);
        assert_eq!(stats.buffered_items.get(), 9);
        // 30 more: the oldest (40 bytes, 4 items) goes.
        assert_eq!(b.push(entry(3, 30, 6)), 4);
        assert_eq!(stats.dropped.get(), 4);
        assert_eq!(stats.buffered_bytes.get(), 70);
        assert_eq!(stats.buffered_items.get(), 11);
        // Larger than the whole bound: dropped itself, nothing else lost.
        assert_eq!(b.push(entry(4, 101, 7)), 7);
        assert_eq!(stats.dropped.get(), 11);
        assert_eq!(b.begin(1000, |_, _| true), Some(vec![2, 3]));
        assert_eq!(
            b.complete(&ok()),
            Completed {
                sent: 11,
                dropped: 0
            }
        );
        assert!(b.is_empty());
        assert_eq!(
            (
                stats.sent.get(),
                stats.buffered_items.get(),
                stats.buffered_bytes.get()
            ),
            (11, 0, 0)
        );
    }

    #[test]
    fn removed_only_after_success_never_resent() {
        let (mut b, stats) = buffer(1000);
        b.push(entry(1, 10, 1));
        b.push(entry(2, 10, 1));
        // One at a time (request bound 10 bytes).
        assert_eq!(b.begin(10, |_, _| true), Some(vec![1]));
        assert_eq!(b.begin(10, |_, _| true), None, "one attempt at a time");
        b.complete(&retry());
        assert_eq!(stats.failed_attempts.get(), 1);
        assert_eq!(b.len(), 2, "a failed attempt keeps its items");
        assert_eq!(b.begin(10, |_, _| true), Some(vec![1]));
        b.complete(&ok());
        assert_eq!(b.begin(10, |_, _| true), Some(vec![2]), "1 is never resent");
        b.complete(&ok());
        assert_eq!(stats.sent.get(), 2);
        assert_eq!(b.begin(10, |_, _| true), None);
    }

    #[test]
    fn joins_only_compatible_neighbours() {
        let (mut b, _) = buffer(1000);
        for i in [1, 3, 5, 2, 7] {
            b.push(entry(i, 10, 1));
        }
        let odd = |a: &u32, b: &u32| a % 2 == b % 2;
        assert_eq!(b.begin(1000, odd), Some(vec![1, 3, 5]));
        b.complete(&ok());
        assert_eq!(b.begin(1000, odd), Some(vec![2]));
        b.complete(&ok());
        assert_eq!(b.begin(1000, odd), Some(vec![7]));
    }

    #[test]
    fn in_flight_entries_that_must_give_way_are_decided_by_their_attempt() {
        // Doomed and then delivered: counted as sent, not dropped.
        let (mut b, stats) = buffer(100);
        b.push(entry(1, 60, 3));
        assert_eq!(b.begin(1000, |_, _| true), Some(vec![1]));
        assert_eq!(b.push(entry(2, 60, 2)), 0, "in flight: not dropped yet");
        assert_eq!(b.bytes(), 60);
        assert_eq!(
            b.complete(&ok()),
            Completed {
                sent: 3,
                dropped: 0
            }
        );
        assert_eq!((stats.sent.get(), stats.dropped.get()), (3, 0));
        assert_eq!(b.bytes(), 60);

        // Doomed and then failed: dropped and counted.
        assert_eq!(b.begin(1000, |_, _| true), Some(vec![2]));
        b.push(entry(3, 60, 4));
        assert_eq!(
            b.complete(&retry()),
            Completed {
                sent: 0,
                dropped: 2
            }
        );
        assert_eq!((stats.sent.get(), stats.dropped.get()), (3, 2));
        assert_eq!(b.len(), 1);
        assert_eq!(b.bytes(), 60);
        assert_eq!(stats.buffered_items.get(), 4);
    }

    #[test]
    fn accounting_is_exact_under_churn() {
        let (mut b, stats) = buffer(50);
        let mut pushed = 0;
        for i in 0..1000u32 {
            let count = u64::from(i % 5 + 1);
            pushed += count;
            b.push(entry(i, u64::from(i % 17 + 1), count));
            if i % 3 == 0 && b.begin(20, |_, _| true).is_some() {
                let outcome = match i % 4 {
                    0 => ok(),
                    1 => Attempt::Permanent {
                        reason: "bad".into(),
                    },
                    2 => Attempt::Delivered {
                        rejected: 1,
                        message: Some("partial".into()),
                    },
                    _ => retry(),
                };
                b.complete(&outcome);
            }
            assert!(b.bytes() <= 50 + 20, "bound plus one request");
        }
        assert_eq!(
            stats.sent.get() + stats.dropped.get() + stats.buffered_items.get(),
            pushed
        );
        drop(b);
        assert_eq!(
            stats.sent.get() + stats.dropped.get(),
            pushed,
            "dropping the buffer counts what it held"
        );
        assert_eq!(
            (stats.buffered_items.get(), stats.buffered_bytes.get()),
            (0, 0)
        );
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
        let d = b.next_delay(0.5);
        assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        for _ in 0..20 {
            b.next_delay(1.0);
        }
        assert_eq!(b.next_delay(1.0), Duration::from_secs(30));
        assert_eq!(b.next_delay(0.0), Duration::from_secs(15));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
    }

    #[test]
    fn classification() {
        assert!(matches!(
            classify_http(200, None, ""),
            Attempt::Delivered { .. }
        ));
        for s in [429, 502, 503, 504] {
            assert!(
                matches!(classify_http(s, None, ""), Attempt::Retry { .. }),
                "{s}"
            );
        }
        assert_eq!(
            classify_http(503, Some("7"), "busy"),
            Attempt::Retry {
                after: Some(Duration::from_secs(7)),
                reason: "HTTP 503: busy".into()
            }
        );
        assert_eq!(parse_retry_after("100000"), Some(MAX_RETRY_AFTER), "capped");
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        for s in [400, 413, 401, 422] {
            assert!(
                matches!(classify_http(s, None, ""), Attempt::Permanent { .. }),
                "{s}"
            );
        }
        use tonic::Code;
        use tonic_types::RetryInfo;
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert!(
                matches!(
                    classify_grpc(c, "", false, None),
                    Attempt::Retry { after: None, .. }
                ),
                "{c:?}"
            );
        }
        // RESOURCE_EXHAUSTED: retried only with a RetryInfo, after its delay.
        assert!(matches!(
            classify_grpc(Code::ResourceExhausted, "too big", false, None),
            Attempt::Permanent { .. }
        ));
        let info = |d: Option<Duration>| RetryInfo { retry_delay: d };
        assert_eq!(
            classify_grpc(
                Code::ResourceExhausted,
                "busy",
                false,
                Some(&info(Some(Duration::from_secs(3))))
            ),
            Attempt::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "gRPC ResourceExhausted: busy (retry in 3s)".into()
            }
        );
        assert!(matches!(
            classify_grpc(Code::ResourceExhausted, "busy", false, Some(&info(None))),
            Attempt::Retry { after: None, .. }
        ));
        // A delay on any retryable code is honoured, up to the cap.
        assert!(matches!(
            classify_grpc(
                Code::Unavailable,
                "",
                false,
                Some(&info(Some(Duration::from_millis(1500))))
            ),
            Attempt::Retry { after: Some(d), .. } if d == Duration::from_millis(1500)
        ));
        assert!(matches!(
            classify_grpc(
                Code::Unavailable,
                "",
                false,
                Some(&info(Some(Duration::from_secs(100_000))))
            ),
            Attempt::Retry { after: Some(d), .. } if d == MAX_RETRY_AFTER
        ));
        // A RetryInfo makes no other code retryable.
        assert!(matches!(
            classify_grpc(
                Code::InvalidArgument,
                "bad span",
                false,
                Some(&info(Some(Duration::from_secs(1))))
            ),
            Attempt::Permanent { .. }
        ));
        assert!(matches!(
            classify_grpc(Code::Unknown, "connection reset", true, None),
            Attempt::Retry { .. }
        ));
        assert!(matches!(
            classify_grpc(Code::Unknown, "server said so", false, None),
            Attempt::Permanent { .. }
        ));
    }
}
