//! Profile windows and span batches: the pure state machines, and the tasks
//! that run them between the ingest queues and the fan-out.
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::AggregationConfig,
    model::{MergedProfile, NAME_LABEL, RawProfile, SERVICE_LABEL, SeriesLabels},
    pipeline::{Batch, EncodedSpans, Fanout, Queued, SpanRequest, span_count},
    pprof::{Merger, sample_types_signature},
    stats::Stats,
};

/// Start of the wall-clock-aligned window containing `t`.
pub fn window_start(t: SystemTime, window: Duration) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let w = window.as_nanos().max(1);
    let start = since.as_nanos() / w * w;
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(start).unwrap_or(u64::MAX))
}

struct Open {
    labels: SeriesLabels,
    merger: Merger,
}

/// Merges the profiles of each (series labels, sample types) per window.
pub struct ProfileAggregator {
    config: AggregationConfig,
    stats: Arc<Stats>,
    start: Option<SystemTime>,
    open: BTreeMap<(SeriesLabels, String), Open>,
    /// Distinct full label sets seen in this window (for the bound).
    seen: HashSet<SeriesLabels>,
}

impl ProfileAggregator {
    pub fn new(config: AggregationConfig, stats: Arc<Stats>) -> Self {
        Self {
            config,
            stats,
            start: None,
            open: BTreeMap::new(),
            seen: HashSet::new(),
        }
    }

    /// Adds a profile received at `p.received`; returns the previous window's
    /// merged profiles when this one starts a new window.
    pub fn add(&mut self, p: RawProfile) -> Vec<MergedProfile> {
        let start = window_start(p.received, self.config.window);
        let mut out = Vec::new();
        match self.start {
            Some(s) if s != start => {
                // Late profiles (clock steps back) join the open window.
                if start > s {
                    out = self.flush();
                    self.start = Some(start);
                }
            }
            Some(_) => {}
            None => self.start = Some(start),
        }
        let labels = self.bound(p.labels);
        let key = (labels, sample_types_signature(&p.profile));
        let open = self.open.entry(key).or_insert_with_key(|(labels, _)| Open {
            labels: labels.clone(),
            merger: Merger::new(),
        });
        if let Err(e) = open.merger.add(&p.profile) {
            // Cannot happen: the key includes the sample types.
            tracing::warn!(error = %e, "profile not merged");
            self.stats.merge_conflicts.inc();
        }
        out
    }

    /// Applies the label-value length and series-count bounds: a series with
    /// a label value longer than `max_label_value_len` (`__name__` and
    /// `service_name` excepted), or beyond `max_series` in this window, is
    /// folded into `{__name__, service_name}` and counted — never dropped.
    fn bound(&mut self, labels: SeriesLabels) -> SeriesLabels {
        let max_len = self.config.max_label_value_len;
        let too_long = labels
            .pairs()
            .iter()
            .any(|(n, v)| n != NAME_LABEL && n != SERVICE_LABEL && v.len() > max_len);
        if too_long {
            self.stats.series_folded.inc();
            return labels.essential();
        }
        if self.seen.contains(&labels) {
            return labels;
        }
        if self.seen.len() >= self.config.max_series {
            self.stats.series_folded.inc();
            return labels.essential();
        }
        self.seen.insert(labels.clone());
        labels
    }

    /// Whether the open window has ended at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.start
            .is_some_and(|s| now >= s + self.config.window && !self.open.is_empty())
    }

    /// Closes the open window.
    pub fn flush(&mut self) -> Vec<MergedProfile> {
        let Some(start) = self.start else {
            return Vec::new();
        };
        self.seen.clear();
        let window = self.config.window;
        let out: Vec<MergedProfile> = std::mem::take(&mut self.open)
            .into_values()
            .filter_map(|o| {
                let inputs = o.merger.inputs();
                o.merger.finish().map(|mut profile| {
                    let start_ns = start
                        .duration_since(UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_nanos();
                    // The time the inputs cover (from the first one's start
                    // to the last one's end, as the merger computed it);
                    // the window when they carry no times.
                    if profile.time_nanos <= 0 || profile.duration_nanos <= 0 {
                        profile.time_nanos = i64::try_from(start_ns).unwrap_or(i64::MAX);
                        profile.duration_nanos =
                            i64::try_from(window.as_nanos()).unwrap_or(i64::MAX);
                    }
                    MergedProfile {
                        labels: o.labels,
                        window_start: start,
                        window,
                        inputs,
                        profile,
                    }
                })
            })
            .collect();
        self.stats.windows_emitted.add(out.len() as u64);
        out
    }
}

/// Runs the profile aggregator until `cancel`, then drains its queue and
/// flushes the open window.
pub async fn run_profiles(
    mut rx: mpsc::Receiver<Queued<RawProfile>>,
    mut agg: ProfileAggregator,
    fanout: Fanout,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => {
                    let done = agg.add(p.item);
                    if !done.is_empty() {
                        fanout.send(Batch::Profiles(Arc::new(done))).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if agg.due(SystemTime::now()) {
                    let done = agg.flush();
                    if !done.is_empty() {
                        fanout.send(Batch::Profiles(Arc::new(done))).await;
                    }
                }
            }
            () = cancel.cancelled() => break,
        }
    }
    rx.close();
    while let Some(p) = rx.recv().await {
        let done = agg.add(p.item);
        if !done.is_empty() {
            fanout.send(Batch::Profiles(Arc::new(done))).await;
        }
    }
    let done = agg.flush();
    if !done.is_empty() {
        fanout.send(Batch::Profiles(Arc::new(done))).await;
    }
}

/// Accumulates span export requests into batches: decoded requests merged
/// into one, encoded ones concatenated (never decoded here).
#[derive(Default)]
pub struct SpanBatcher {
    pending: ExportTraceServiceRequest,
    encoded: Vec<u8>,
    encoded_spans: u64,
    spans: u64,
}

impl SpanBatcher {
    pub fn add(&mut self, req: SpanRequest) {
        match req {
            SpanRequest::Decoded(req) => {
                self.spans += span_count(&req);
                self.pending.resource_spans.extend(req.resource_spans);
            }
            SpanRequest::Encoded(e) => {
                self.spans += e.spans;
                self.encoded_spans += e.spans;
                self.encoded.extend_from_slice(&e.bytes);
            }
        }
    }
    pub fn len(&self) -> u64 {
        self.spans
    }
    pub fn is_empty(&self) -> bool {
        self.pending.resource_spans.is_empty() && self.encoded.is_empty()
    }
    /// The batch: at most one decoded and one encoded part.
    pub fn take(&mut self) -> Vec<Batch> {
        let mut out = Vec::new();
        if !self.pending.resource_spans.is_empty() {
            out.push(Batch::Spans(Arc::new(std::mem::take(&mut self.pending))));
        }
        if !self.encoded.is_empty() {
            out.push(Batch::EncodedSpans(Arc::new(EncodedSpans::new(
                std::mem::take(&mut self.encoded),
                self.encoded_spans,
            ))));
        }
        self.spans = 0;
        self.encoded_spans = 0;
        out
    }
}

/// Batches spans (by size or timeout) until `cancel`, then drains and flushes.
pub async fn run_spans(
    mut rx: mpsc::Receiver<Queued<SpanRequest>>,
    config: AggregationConfig,
    fanout: Fanout,
    cancel: CancellationToken,
) {
    let mut batcher = SpanBatcher::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = rx.recv() => match r {
                Some(req) => {
                    if batcher.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + config.span_batch_timeout);
                    }
                    batcher.add(req.item);
                    if batcher.len() >= config.span_batch_size as u64 {
                        deadline = None;
                        for b in batcher.take() {
                            fanout.send(b).await;
                        }
                    }
                }
                None => break,
            },
            () = sleep => {
                deadline = None;
                for b in batcher.take() {
                    fanout.send(b).await;
                }
            }
            () = cancel.cancelled() => break,
        }
    }
    rx.close();
    while let Some(req) = rx.recv().await {
        batcher.add(req.item);
    }
    for b in batcher.take() {
        fanout.send(b).await;
    }
}

/// Forwards metric requests to the sinks (the Prometheus registry, the OTLP
/// exporter) until `cancel`, then drains.
pub async fn run_metrics(
    mut rx: mpsc::Receiver<
        Queued<opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest>,
    >,
    fanout: Fanout,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(req) => fanout.send(Batch::Metrics(Arc::new(req.item))).await,
                None => break,
            },
            () = cancel.cancelled() => break,
        }
    }
    rx.close();
    while let Some(req) = rx.recv().await {
        fanout.send(Batch::Metrics(Arc::new(req.item))).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::pprof::{folded, tests::cpu_profile};
    use prost::Message as _;

    fn raw(
        service: &str,
        extra: &[(&str, &str)],
        at_s: u64,
        stacks: &[(&[&str], i64)],
    ) -> RawProfile {
        let mut labels = vec![("__name__", "process_cpu"), ("service_name", service)];
        labels.extend_from_slice(extra);
        RawProfile {
            labels: SeriesLabels::new(labels).unwrap(),
            profile: cpu_profile(stacks, 1),
            received: UNIX_EPOCH + Duration::from_secs(at_s),
        }
    }

    #[test]
    fn merges_per_series_per_window() {
        let stats = Arc::new(Stats::default());
        let mut agg = ProfileAggregator::new(AggregationConfig::default(), stats.clone());
        // Window [15, 30): two profiles of `api`, one of `db`.
        assert!(
            agg.add(raw("api", &[], 15, &[(&["main", "a"], 2)]))
                .is_empty()
        );
        assert!(
            agg.add(raw("api", &[], 29, &[(&["main", "a"], 3)]))
                .is_empty()
        );
        assert!(
            agg.add(raw("db", &[], 20, &[(&["main", "q"], 1)]))
                .is_empty()
        );
        assert!(!agg.due(UNIX_EPOCH + Duration::from_secs(29)));
        assert!(agg.due(UNIX_EPOCH + Duration::from_secs(30)));
        let out = agg.add(raw("api", &[], 31, &[(&["main", "a"], 7)]));
        assert_eq!(out.len(), 2);
        let api = out.iter().find(|m| m.labels.service() == "api").unwrap();
        assert_eq!(api.inputs, 2);
        assert_eq!(api.window_start, UNIX_EPOCH + Duration::from_secs(15));
        assert_eq!(folded(&api.profile, 0), vec![("main;a".to_string(), 5)]);
        // The inputs' own times (cpu_profile: 1000 ns for 10 ns).
        assert_eq!(
            (api.profile.time_nanos, api.profile.duration_nanos),
            (1_000, 10)
        );
        let rest = agg.flush();
        assert_eq!(rest.len(), 1);
        assert_eq!(folded(&rest[0].profile, 0), vec![("main;a".to_string(), 7)]);
        assert_eq!(stats.windows_emitted.get(), 3);
    }

    #[test]
    fn series_bound_folds_into_the_service() {
        let stats = Arc::new(Stats::default());
        let config = AggregationConfig {
            max_series: 2,
            max_label_value_len: 8,
            ..AggregationConfig::default()
        };
        let mut agg = ProfileAggregator::new(config, stats.clone());
        for pod in ["p1", "p2", "p3", "p4"] {
            agg.add(raw("api", &[("pod", pod)], 15, &[(&["main"], 1)]));
        }
        agg.add(raw(
            "api",
            &[("pod", "a-very-long-pod-name")],
            15,
            &[(&["main"], 1)],
        ));
        let out = agg.flush();
        let mut selectors: Vec<String> = out.iter().map(|m| m.labels.selector()).collect();
        selectors.sort();
        assert_eq!(
            selectors,
            vec![
                r#"process_cpu{pod="p1",service_name="api"}"#,
                r#"process_cpu{pod="p2",service_name="api"}"#,
                r#"process_cpu{service_name="api"}"#,
            ]
        );
        let folded_total: i64 = out
            .iter()
            .filter(|m| m.labels.get("pod").is_none())
            .map(|m| folded(&m.profile, 0)[0].1)
            .sum();
        assert_eq!(
            folded_total, 3,
            "nothing lost: p3, p4 and the cut one are in the service series"
        );
        // p3, p4 (over the bound) and the long value: one count each.
        assert_eq!(stats.series_folded.get(), 3);
    }

    #[test]
    fn long_label_values_fold_the_series_into_the_service() {
        let stats = Arc::new(Stats::default());
        let config = AggregationConfig {
            max_label_value_len: 256,
            ..AggregationConfig::default()
        };
        let mut agg = ProfileAggregator::new(config, stats.clone());
        let long = "x".repeat(300);
        agg.add(raw("api", &[("pod", long.as_str())], 15, &[(&["main"], 2)]));
        agg.add(raw("api", &[("pod", "p1")], 15, &[(&["main"], 1)]));
        let out = agg.flush();
        let mut selectors: Vec<String> = out.iter().map(|m| m.labels.selector()).collect();
        selectors.sort();
        assert_eq!(
            selectors,
            vec![
                r#"process_cpu{pod="p1",service_name="api"}"#,
                r#"process_cpu{service_name="api"}"#,
            ],
            "folded whole, not cut to 256 bytes"
        );
        assert_eq!(stats.series_folded.get(), 1);
    }

    #[test]
    fn merged_duration_covers_the_inputs() {
        let stats = Arc::new(Stats::default());
        let mut agg = ProfileAggregator::new(AggregationConfig::default(), stats);
        // One 22 s profile received in a 15 s window.
        let mut p = raw("api", &[], 16, &[(&["main"], 1)]);
        p.profile.time_nanos = 1_000_000_000;
        p.profile.duration_nanos = 22_000_000_000;
        agg.add(p);
        // And one without times.
        let mut q = raw("db", &[], 16, &[(&["main"], 1)]);
        q.profile.time_nanos = 0;
        q.profile.duration_nanos = 0;
        agg.add(q);
        let out = agg.flush();
        let api = out.iter().find(|m| m.labels.service() == "api").unwrap();
        assert_eq!(
            (api.profile.time_nanos, api.profile.duration_nanos),
            (1_000_000_000, 22_000_000_000)
        );
        let db = out.iter().find(|m| m.labels.service() == "db").unwrap();
        assert_eq!(
            (db.profile.time_nanos, db.profile.duration_nanos),
            (15_000_000_000, 15_000_000_000),
            "the window"
        );
    }

    #[test]
    fn span_batches_keep_every_span() {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let req = |n: usize| ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span::default(); n],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let mut b = SpanBatcher::default();
        b.add(SpanRequest::Decoded(req(3)));
        b.add(SpanRequest::Decoded(req(4)));
        // Encoded requests are concatenated: still one valid request.
        b.add(SpanRequest::Encoded(EncodedSpans::new(
            req(2).encode_to_vec(),
            2,
        )));
        b.add(SpanRequest::Encoded(EncodedSpans::new(
            req(5).encode_to_vec(),
            5,
        )));
        assert_eq!(b.len(), 14);
        let out = b.take();
        assert_eq!(out.len(), 2);
        let Batch::Spans(decoded) = &out[0] else {
            panic!("{:?}", out[0]);
        };
        assert_eq!(span_count(decoded), 7);
        let Batch::EncodedSpans(encoded) = &out[1] else {
            panic!("{:?}", out[1]);
        };
        assert_eq!(encoded.spans, 7);
        assert_eq!(span_count(&encoded.decode().unwrap()), 7);
        assert!(b.take().is_empty());
    }
}
