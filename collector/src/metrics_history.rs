//! Metric history for the UI: the Prometheus registry only holds current
//! values (and forgets a series 5 minutes after its last update), so the UI
//! samples it (every [`SAMPLE_EVERY`] and at each query) and keeps each
//! series' points in memory for the store's retention. A histogram point
//! holds the p50/p99 of the observations since the previous point (from the
//! difference of cumulative buckets). Bounded: at most [`MAX_SERIES`]
//! series; past [`MAX_POINTS`] points a series keeps every other point, so
//! its whole retention stays covered at a coarser step. Persisted in the
//! store (`metric_series`, `metric_points`: each change written as it is
//! made, the same bounds and retention), so a restart reads it back; it
//! counts in the store's `max_bytes`, and the points the store evicts for
//! it (oldest first, with profiles and traces) leave the memory too.
use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    model::{MetricKind, MetricPoint, MetricsView},
    store::{MetricHistoryWrite, Store},
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
    /// The series' key in the store.
    id: u64,
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
    /// Where the history is persisted (none: memory only).
    store: Option<Arc<Store>>,
    /// The next series id: never one a write still in flight may name.
    next_id: AtomicU64,
}

/// A series as stored (its points are stored one by one).
#[derive(serde::Deserialize, Serialize)]
struct StoredSeries {
    name: String,
    labels: Vec<(String, String)>,
    kind: String,
    help: String,
    /// Bucket bounds as `f64::to_bits` (+Inf has no JSON number).
    last_buckets: Vec<(u64, u64)>,
}

impl StoredSeries {
    fn encode(key: &Key, s: &Series) -> Vec<u8> {
        serde_json::to_vec(&StoredSeries {
            name: key.0.clone(),
            labels: key.1.clone(),
            kind: kind_name(s.kind).to_string(),
            help: s.help.clone(),
            last_buckets: s
                .last_buckets
                .iter()
                .map(|(b, n)| (b.to_bits(), *n))
                .collect(),
        })
        .unwrap_or_default()
    }
}

/// A point as stored: `v`, then `count`, `p50`, `p99` (little-endian, 8
/// bytes each) and a byte of which of the three are present.
fn encode_point(p: &HistoryPoint) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.extend_from_slice(&p.v.to_le_bytes());
    out.extend_from_slice(&p.count.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&p.p50.unwrap_or(0.0).to_le_bytes());
    out.extend_from_slice(&p.p99.unwrap_or(0.0).to_le_bytes());
    out.push(
        u8::from(p.count.is_some())
            | u8::from(p.p50.is_some()) << 1
            | u8::from(p.p99.is_some()) << 2,
    );
    out
}

fn decode_point(t: u64, b: &[u8]) -> Option<HistoryPoint> {
    let word = |i: usize| -> Option<[u8; 8]> { b.get(i * 8..i * 8 + 8)?.try_into().ok() };
    let flags = *b.get(32)?;
    Some(HistoryPoint {
        t,
        v: f64::from_le_bytes(word(0)?),
        count: (flags & 1 != 0).then(|| u64::from_le_bytes(word(1).unwrap_or_default())),
        p50: (flags & 2 != 0).then(|| f64::from_le_bytes(word(2).unwrap_or_default())),
        p99: (flags & 4 != 0).then(|| f64::from_le_bytes(word(3).unwrap_or_default())),
    })
}

fn kind_from(name: &str) -> Option<MetricKind> {
    Some(match name {
        "counter" => MetricKind::Counter,
        "gauge" => MetricKind::Gauge,
        "histogram" => MetricKind::Histogram,
        _ => return None,
    })
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
    /// A history in memory only.
    pub fn new(retention: Duration) -> Self {
        Self {
            retention,
            series: Mutex::new(HashMap::new()),
            store: None,
            next_id: AtomicU64::new(1),
        }
    }

    /// A history persisted in `store` (with its retention), starting from
    /// what the store holds; an unreadable store starts an empty history.
    pub fn open(store: Arc<Store>) -> Self {
        let mut series = HashMap::new();
        let mut next_id = 1;
        match store.metric_history() {
            Ok(read) => {
                let mut by_id: HashMap<u64, (Key, Series)> = HashMap::new();
                for (id, bytes) in read.series {
                    next_id = next_id.max(id + 1);
                    let Ok(st) = serde_json::from_slice::<StoredSeries>(&bytes) else {
                        continue;
                    };
                    let Some(kind) = kind_from(&st.kind) else {
                        continue;
                    };
                    let s = Series {
                        id,
                        kind,
                        help: st.help,
                        last_buckets: st
                            .last_buckets
                            .into_iter()
                            .map(|(b, n)| (f64::from_bits(b), n))
                            .collect(),
                        points: VecDeque::new(),
                    };
                    by_id.insert(id, ((st.name, st.labels), s));
                }
                // Points come by series and time: in order.
                for (id, t, bytes) in read.points {
                    if let (Some((_, s)), Some(p)) = (by_id.get_mut(&id), decode_point(t, &bytes)) {
                        s.points.push_back(p);
                    }
                }
                series = by_id.into_values().collect();
            }
            Err(e) => tracing::warn!("metric history: cannot read the store ({e}); starting empty"),
        }
        Self {
            retention: store.retention(),
            series: Mutex::new(series),
            store: Some(store),
            next_id: AtomicU64::new(next_id),
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
        let horizon = now_ms
            .saturating_sub(u64::try_from(self.retention.as_millis()).unwrap_or(0))
            .max(self.floor().saturating_add(1));
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let mut w = MetricHistoryWrite::default();
        let persist = self.store.is_some();
        for p in points {
            let t = match ms(p.timestamp) {
                0 => now_ms,
                t => t,
            };
            let key = (p.name, p.labels);
            if !all.contains_key(&key) && all.len() >= MAX_SERIES {
                continue;
            }
            let new = !all.contains_key(&key);
            let s = all.entry(key.clone()).or_insert_with(|| Series {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
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
            let changed =
                new || s.kind != p.kind || s.help != p.help || p.kind == MetricKind::Histogram;
            s.kind = p.kind;
            s.help = p.help;
            s.points.push_back(point);
            if persist {
                if changed {
                    w.series.push((s.id, StoredSeries::encode(&key, s)));
                }
                w.points.push((s.id, point.t, encode_point(&point)));
            }
            if s.points.len() > MAX_POINTS {
                let mut i = 0usize;
                let id = s.id;
                s.points.retain(|p| {
                    i += 1;
                    let keep = !i.is_multiple_of(2);
                    if !keep && persist {
                        w.deleted_points.push((id, p.t));
                    }
                    keep
                });
            }
        }
        for s in all.values_mut() {
            while s.points.front().is_some_and(|p| p.t < horizon) {
                if let Some(p) = s.points.pop_front()
                    && persist
                {
                    w.deleted_points.push((s.id, p.t));
                }
            }
            if s.points.is_empty() && persist {
                w.deleted_series.push(s.id);
            }
        }
        all.retain(|_, s| !s.points.is_empty());
        drop(all);
        if let Some(store) = &self.store
            && let Err(e) = store.put_metric_history(&w)
        {
            tracing::warn!("metric history: cannot write the store: {e}");
        }
    }

    /// Points at or before this time (unix ms) were evicted from the store
    /// (its size bound): they are no longer kept (0: none).
    fn floor(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.metric_floor_ms())
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
        let from = from.max(self.floor().saturating_add(1));
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
    #[allow(clippy::unwrap_used, reason = "test")]
    fn the_store_holds_what_memory_holds_thinned_and_expired_alike() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::StoreConfig {
            path: dir.path().join("s.redb"),
            retention: Duration::from_secs(100_000),
            ..crate::config::StoreConfig::default()
        };
        let now = UNIX_EPOCH + Duration::from_secs(1 << 29);
        let t0 = (1u64 << 29) - 50_000;
        {
            let h = MetricsHistory::open(Arc::new(Store::open(&config).unwrap()));
            let inf = f64::INFINITY;
            h.record(vec![point(1.0, t0, vec![(0.1, 10), (inf, 10)])], now);
            // Past MAX_POINTS: thinned in memory and in the store.
            for i in 1..(MAX_POINTS as u64 + 10) {
                let mut g = point(i as f64, t0 + i, vec![]);
                g.name = "queue_depth".into();
                h.record(vec![g], now);
            }
            let all = h.query(None, None, 0, u64::MAX);
            assert_eq!(all.len(), 2);
        }
        let reopened = || MetricsHistory::open(Arc::new(Store::open(&config).unwrap()));
        let h = reopened();
        let all = h.series.lock().unwrap();
        let gauge = &all[&(
            "queue_depth".to_string(),
            vec![("service_name".into(), "api".into())],
        )];
        assert!(gauge.points.len() <= MAX_POINTS, "{}", gauge.points.len());
        assert_eq!(gauge.points.front().unwrap().t, (t0 + 1) * 1000);
        let hist = &all[&(
            "req_seconds".to_string(),
            vec![("service_name".into(), "api".into())],
        )];
        assert_eq!(hist.last_buckets, [(0.1, 10), (f64::INFINITY, 10)]);
        assert_eq!(hist.points[0].count, Some(10));
        drop(all);
        // Past the retention: gone from the store too.
        h.record(vec![], now + Duration::from_secs(200_000));
        drop(h);
        assert!(reopened().query(None, None, 0, u64::MAX).is_empty());
        let read = Store::open(&config).unwrap().metric_history().unwrap();
        assert!(read.series.is_empty() && read.points.is_empty());
    }

    /// The history counts in the store's `max_bytes`: however much is
    /// recorded the store stays within its bound, its count is exactly what
    /// the history's records take, the oldest data (a profile window older
    /// than every point, then the oldest points) is evicted first while a
    /// newer profile stays, and the memory keeps exactly what the store kept.
    #[test]
    #[allow(clippy::unwrap_used, reason = "test")]
    fn history_counts_in_the_store_size_bound_and_is_evicted_oldest_first() {
        use crate::store::tests::{at, config, merged};
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 1 << 20;
        let store = Arc::new(
            Store::open(&crate::config::StoreConfig {
                max_bytes,
                retention: Duration::from_secs(1 << 30),
                ..config(dir.path())
            })
            .unwrap(),
        );
        store
            .put_profiles(&[merged("api", "p1", 1_000, &[(&["main", "old"], 3)])])
            .unwrap();
        let h = MetricsHistory::open(store.clone());
        let now = at(100_000);
        let (series, steps) = (300u64, 120u64);
        for step in 0..steps {
            let points = (0..series)
                .map(|i| {
                    let mut p = point(i as f64, 2_000 + step * 10, vec![]);
                    p.name = format!("queue_depth_{i}");
                    p
                })
                .collect();
            h.record(points, now);
            let stored = store.stored_bytes().unwrap();
            assert!(stored <= max_bytes / 2, "step {step}: {stored} bytes");
            if step % 20 == 19 {
                store.maintain(now).unwrap();
                let file = store.file_bytes();
                assert!(file <= max_bytes, "step {step}: file {file} bytes");
            }
        }
        assert_eq!(
            store.profile_windows().unwrap(),
            0,
            "the older window went first"
        );
        // The count is exactly the history's records.
        let read = store.metric_history().unwrap();
        let recount: u64 = read
            .series
            .iter()
            .map(|(_, b)| b.len() as u64 + 8)
            .sum::<u64>()
            + read
                .points
                .iter()
                .map(|(_, _, b)| b.len() as u64 + 32)
                .sum::<u64>();
        assert_eq!(store.stored_bytes().unwrap(), recount);
        let kept = read.points.len();
        assert!(
            kept > 1_000 && kept < (series * steps) as usize / 2,
            "{kept} of {} points kept",
            series * steps
        );
        // Oldest first: what is left is the newest, in the store and in memory.
        let oldest_stored = read.points.iter().map(|p| p.1).min().unwrap();
        assert!(oldest_stored > 2_000_000, "{oldest_stored}");
        assert!(store.metric_floor_ms() < oldest_stored);
        assert!(store.metric_floor_ms() >= 2_000_000);
        assert!(
            read.points
                .iter()
                .any(|p| p.1 == (2_000 + (steps - 1) * 10) * 1000)
        );
        {
            let all = h.series.lock().unwrap();
            let in_memory: usize = all.values().map(|s| s.points.len()).sum();
            assert_eq!(in_memory, kept, "memory holds what the store holds");
            let oldest_memory = all
                .values()
                .filter_map(|s| s.points.front())
                .map(|p| p.t)
                .min();
            assert_eq!(oldest_memory, Some(oldest_stored));
        }
        eprintln!(
            "max_bytes {max_bytes}: {kept} of {} points kept, {} logical bytes, floor {} ms, file {} bytes",
            series * steps,
            store.stored_bytes().unwrap(),
            store.metric_floor_ms(),
            store.file_bytes()
        );
        // A newer profile window stays (metric points are older).
        store
            .put_profiles(&[merged(
                "api",
                "p1",
                2_000 + steps * 10,
                &[(&["main", "new"], 3)],
            )])
            .unwrap();
        assert_eq!(store.profile_windows().unwrap(), 1);
        store.maintain(now).unwrap();
        assert!(
            store.file_bytes() <= max_bytes,
            "file {}",
            store.file_bytes()
        );
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
