//! Metric history for the UI: the Prometheus registry only holds current
//! values (and forgets a series 5 minutes after its last update), so the UI
//! samples it (every [`SAMPLE_EVERY`] and at each query) and keeps each
//! series' points in memory for the store's retention. A histogram point
//! holds the p50/p99 of the observations since the previous point (from the
//! difference of cumulative buckets). Bounded: at most [`MAX_SERIES`]
//! series; past [`MAX_POINTS`] points a series keeps every other point, so
//! its whole retention stays covered at a coarser step. Not persisted: a
//! restart starts an empty history.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    model::{MetricKind, MetricPoint, MetricsView},
    ui::histogram_quantile,
};

/// How often the registry is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Most series kept.
pub const MAX_SERIES: usize = 4096;
/// Most points of one series before it is thinned.
pub const MAX_POINTS: usize = 720;
/// Most points of one series in an answer.
pub const MAX_ANSWER_POINTS: usize = 240;

/// One point of a series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Unix milliseconds.
    pub t: u64,
    /// Counter/gauge value, a histogram's sum.
    pub v: f64,
    /// Histograms: observations since the previous point and their p50/p99.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
}

struct Series {
    kind: MetricKind,
    help: String,
    last_buckets: Vec<(f64, u64)>,
    points: VecDeque<HistoryPoint>,
}

type Key = (String, Vec<(String, String)>);

/// The history of every metric series seen.
pub struct MetricsHistory {
    retention: Duration,
    series: Mutex<HashMap<Key, Series>>,
}

/// One series and its points, for the UI.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesHistory {
    pub name: String,
    pub kind: &'static str,
    pub help: String,
    /// `s`, `ms`, `bytes`, `ratio`, `percent` or empty, from the name.
    pub unit: &'static str,
    pub labels: Vec<(String, String)>,
    pub points: Vec<HistoryPoint>,
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The unit a Prometheus metric name ends with (`_total` aside).
pub fn unit_of(name: &str) -> &'static str {
    let base = name.strip_suffix("_total").unwrap_or(name);
    for (suffix, unit) in [
        ("_seconds", "s"),
        ("_milliseconds", "ms"),
        ("_microseconds", "us"),
        ("_nanoseconds", "ns"),
        ("_bytes", "bytes"),
        ("_ratio", "ratio"),
        ("_percent", "percent"),
    ] {
        if base.ends_with(suffix) {
            return unit;
        }
    }
    ""
}

fn kind_name(k: MetricKind) -> &'static str {
    match k {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
    }
}

impl MetricsHistory {
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Samples `view` every [`SAMPLE_EVERY`] while the history is alive.
    pub fn spawn_sampler(self: &Arc<Self>, view: Arc<dyn MetricsView>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(h) = weak.upgrade() else { break };
                let view = view.clone();
                let points = match tokio::task::spawn_blocking(move || view.snapshot()).await {
                    Ok(p) => p,
                    Err(_) => break,
                };
                h.record(points, SystemTime::now());
            }
        });
    }

    /// Adds the points whose timestamp is newer than their series' last.
    pub fn record(&self, points: Vec<MetricPoint>, now: SystemTime) {
        let now_ms = ms(now);
        let horizon = now_ms.saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(0));
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        for p in points {
            let t = match ms(p.timestamp) {
                0 => now_ms,
                t => t,
            };
            let key = (p.name, p.labels);
            if !all.contains_key(&key) && all.len() >= MAX_SERIES {
                continue;
            }
            let s = all.entry(key).or_insert_with(|| Series {
                kind: p.kind,
                help: p.help.clone(),
                last_buckets: Vec::new(),
                points: VecDeque::new(),
            });
            if s.points.back().is_some_and(|last| last.t >= t) {
                continue;
            }
            let mut point = HistoryPoint {
                t,
                v: p.value,
                count: None,
                p50: None,
                p99: None,
            };
            if p.kind == MetricKind::Histogram {
                // Observations since the previous point when the buckets
                // only grew; otherwise (first point, reset) all of them.
                let same = s.last_buckets.len() == p.buckets.len()
                    && s.last_buckets
                        .iter()
                        .zip(&p.buckets)
                        .all(|(a, b)| a.0 == b.0 && a.1 <= b.1);
                let window: Vec<(f64, u64)> = if same {
                    p.buckets
                        .iter()
                        .zip(&s.last_buckets)
                        .map(|(b, a)| (b.0, b.1 - a.1))
                        .collect()
                } else {
                    p.buckets.clone()
                };
                point.count = Some(window.last().map_or(0, |b| b.1));
                point.p50 = histogram_quantile(0.5, &window);
                point.p99 = histogram_quantile(0.99, &window);
                s.last_buckets = p.buckets;
            }
            s.kind = p.kind;
            s.help = p.help;
            s.points.push_back(point);
            if s.points.len() > MAX_POINTS {
                let mut i = 0usize;
                s.points.retain(|_| {
                    i += 1;
                    !i.is_multiple_of(2)
                });
            }
        }
        for s in all.values_mut() {
            while s.points.front().is_some_and(|p| p.t < horizon) {
                s.points.pop_front();
            }
        }
        all.retain(|_, s| !s.points.is_empty());
    }

    /// Series whose `service_name` (or `service.name`/`job`) is `service`
    /// and whose name contains `name`, by name and labels; points in [from,
    /// until] (unix ms), at most [`MAX_ANSWER_POINTS`] each.
    pub fn query(
        &self,
        service: Option<&str>,
        name: Option<&str>,
        from: u64,
        until: u64,
    ) -> Vec<SeriesHistory> {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<SeriesHistory> = all
            .iter()
            .filter(|((n, labels), _)| {
                name.is_none_or(|w| n.contains(w))
                    && service.is_none_or(|svc| service_of(labels) == Some(svc))
            })
            .map(|((n, labels), s)| {
                let pts: Vec<HistoryPoint> = s
                    .points
                    .iter()
                    .filter(|p| p.t >= from && p.t <= until)
                    .copied()
                    .collect();
                let step = pts.len().div_ceil(MAX_ANSWER_POINTS).max(1);
                let last = pts.len().saturating_sub(1);
                SeriesHistory {
                    name: n.clone(),
                    kind: kind_name(s.kind),
                    help: s.help.clone(),
                    unit: unit_of(n),
                    labels: labels.clone(),
                    // Every step-th point and always the last.
                    points: pts
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (last - i).is_multiple_of(step))
                        .map(|(_, p)| *p)
                        .collect(),
                }
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.labels.cmp(&b.labels)));
        out
    }

    /// Services named in the series' labels.
    pub fn services(&self) -> Vec<String> {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<String> = all
            .keys()
            .filter_map(|(_, l)| service_of(l).map(str::to_string))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

fn service_of(labels: &[(String, String)]) -> Option<&str> {
    ["service_name", "service.name", "job"]
        .iter()
        .find_map(|k| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(value: f64, t_s: u64, buckets: Vec<(f64, u64)>) -> MetricPoint {
        MetricPoint {
            name: "req_seconds".into(),
            help: "h".into(),
            kind: if buckets.is_empty() {
                MetricKind::Gauge
            } else {
                MetricKind::Histogram
            },
            labels: vec![("service_name".into(), "api".into())],
            value,
            count: buckets.last().map_or(0, |b| b.1),
            buckets,
            timestamp: UNIX_EPOCH + Duration::from_secs(t_s),
        }
    }

    #[test]
    fn keeps_points_past_staleness_within_retention() {
        let h = MetricsHistory::new(Duration::from_secs(3600));
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        h.record(vec![point(1.0, 9_000, vec![])], now);
        h.record(vec![point(1.0, 9_000, vec![])], now); // same time: once
        h.record(vec![point(2.0, 9_500, vec![])], now);
        let q = h.query(Some("api"), None, 0, u64::MAX);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].unit, "s");
        let v: Vec<f64> = q[0].points.iter().map(|p| p.v).collect();
        assert_eq!(v, [1.0, 2.0]);
        assert!(h.query(Some("web"), None, 0, u64::MAX).is_empty());
        assert_eq!(h.services(), ["api"]);
        // Past the retention: gone.
        h.record(vec![], now + Duration::from_secs(3_000));
        assert_eq!(h.query(None, None, 0, u64::MAX)[0].points.len(), 1);
        h.record(vec![], now + Duration::from_secs(7_200));
        assert!(h.query(None, None, 0, u64::MAX).is_empty());
    }

    #[test]
    fn histogram_points_hold_the_window_quantiles_and_series_thin_out() {
        let h = MetricsHistory::new(Duration::from_secs(1 << 30));
        let now = UNIX_EPOCH + Duration::from_secs(1 << 29);
        let inf = f64::INFINITY;
        h.record(
            vec![point(1.0, 1, vec![(0.1, 10), (1.0, 10), (inf, 10)])],
            now,
        );
        // 10 more observations, all in (0.1, 1.0].
        h.record(
            vec![point(5.0, 2, vec![(0.1, 10), (1.0, 20), (inf, 20)])],
            now,
        );
        let q = h.query(None, None, 0, u64::MAX);
        let p = &q[0].points;
        assert_eq!(p[0].count, Some(10));
        assert!(p[0].p50.unwrap() <= 0.1);
        assert_eq!(p[1].count, Some(10));
        assert!(p[1].p50.unwrap() > 0.1, "{:?}", p[1]);
        for t in 3..(MAX_POINTS as u64 + 10) {
            h.record(vec![point(t as f64, t, vec![])], now);
        }
        let all = h.series.lock().unwrap();
        let s = all.values().next().unwrap();
        assert!(s.points.len() <= MAX_POINTS);
        assert_eq!(s.points.front().unwrap().t, 1000, "the oldest point stays");
    }
}
