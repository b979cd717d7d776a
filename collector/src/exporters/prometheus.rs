//! The Prometheus side: a registry of the current value of every metric series
//! received over OTLP, served at `GET /metrics` in the text exposition format
//! (version 0.0.4) together with the collector's own counters
//! (`fathom_collector_*`).
//!
//! Translation follows the OpenTelemetry Prometheus exporter: monotonic sums
//! become counters named `..._total`, non-monotonic sums and gauges become
//! gauges, explicit-bucket histograms become histograms; names get `.` and
//! other invalid characters replaced by `_` and a unit suffix (`s` →
//! `_seconds`, `By` → `_bytes`, `1` on a gauge → `_ratio`); labels are the data
//! point's attributes plus `job` (`service.namespace/service.name`) and
//! `instance` (`service.instance.id`) from the resource, and the resource's
//! Kubernetes and container attributes of [`PROMOTED_RESOURCE_ATTRIBUTES`]
//! with `_` for `.` (`k8s_pod_name`, `container_id`, ...), as the OTel
//! collector's `resource_to_telemetry_conversion` would for these (a fixed
//! list, not every resource attribute: process ids would make a series per
//! process). Cumulative values are
//! taken as they are, delta values are added up. Exponential histograms and
//! summaries are skipped (counted by reason).
//!
//! The number of series is bounded (new series beyond the bound are refused
//! and counted), and series that were not updated for a while are removed.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, HistogramDataPoint, NumberDataPoint, metric::Data,
        number_data_point,
    },
};
use tokio::sync::mpsc;

use crate::{
    model::{MetricKind, MetricPoint, MetricsView},
    pipeline::Batch,
    stats::{Counter, ExporterStats, Stats},
};

/// Default bound on the number of series kept.
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// Series not updated for this long are removed.
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(300);
/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OTLP `DataPointFlags.NO_RECORDED_VALUE`.
const FLAG_NO_RECORDED_VALUE: u32 = 1;

type Labels = Vec<(String, String)>;

#[derive(Clone, Debug)]
struct Series {
    /// Counter/gauge value, or a histogram's sum.
    value: f64,
    count: u64,
    /// Histogram upper bounds (without `+Inf`) and per-bucket (not cumulative)
    /// counts, one more than the bounds.
    bounds: Vec<f64>,
    bucket_counts: Vec<u64>,
    time_unix_nano: u64,
    updated: Instant,
}

#[derive(Debug)]
struct Family {
    kind: MetricKind,
    help: String,
    series: BTreeMap<Labels, Series>,
}

#[derive(Debug, Default)]
struct Inner {
    families: BTreeMap<String, Family>,
    series: usize,
}

/// Why data points were not turned into series.
#[derive(Debug, Default)]
pub struct RegistryCounters {
    /// New series refused because the series bound was reached.
    pub series_overflow: Counter,
    pub skipped_exponential_histogram: Counter,
    pub skipped_summary: Counter,
    /// A metric whose Prometheus name is already used by another kind.
    pub skipped_type_conflict: Counter,
    /// Histogram points whose bucket counts do not match their bounds.
    pub skipped_invalid: Counter,
    /// Series removed because they were not updated for the staleness period.
    pub stale_removed: Counter,
}

/// Current values of the metric series received over OTLP.
#[derive(Debug)]
pub struct PromRegistry {
    inner: Mutex<Inner>,
    max_series: usize,
    staleness: Duration,
    pub counters: RegistryCounters,
}

impl Default for PromRegistry {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SERIES, DEFAULT_STALENESS)
    }
}

/// What [`PromRegistry::ingest`] did with a request's data points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub applied: u64,
    pub skipped: u64,
}

impl PromRegistry {
    pub fn new(max_series: usize, staleness: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_series,
            staleness,
            counters: RegistryCounters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Series currently kept.
    pub fn series(&self) -> usize {
        self.lock().series
    }

    /// Applies every data point of an OTLP metrics request.
    pub fn ingest(&self, req: &ExportMetricsServiceRequest) -> Ingested {
        let now = Instant::now();
        let mut inner = self.lock();
        self.prune(&mut inner, now);
        let mut done = Ingested::default();
        for rm in &req.resource_metrics {
            let resource_labels = rm
                .resource
                .as_ref()
                .map(|r| job_instance(&r.attributes))
                .unwrap_or_default();
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let Some(data) = &m.data else { continue };
                    let (kind, monotonic, temporality) = match data {
                        Data::Gauge(_) => (MetricKind::Gauge, false, None),
                        Data::Sum(s) => (
                            if s.is_monotonic {
                                MetricKind::Counter
                            } else {
                                MetricKind::Gauge
                            },
                            s.is_monotonic,
                            Some(s.aggregation_temporality),
                        ),
                        Data::Histogram(h) => (
                            MetricKind::Histogram,
                            false,
                            Some(h.aggregation_temporality),
                        ),
                        Data::ExponentialHistogram(h) => {
                            let n = h.data_points.len() as u64;
                            self.counters.skipped_exponential_histogram.add(n);
                            done.skipped += n;
                            continue;
                        }
                        Data::Summary(s) => {
                            let n = s.data_points.len() as u64;
                            self.counters.skipped_summary.add(n);
                            done.skipped += n;
                            continue;
                        }
                    };
                    let delta = temporality == Some(AggregationTemporality::Delta as i32);
                    let name = prometheus_name(&m.name, &m.unit, kind, monotonic);
                    let help = m.description.clone();
                    let points: Vec<Point<'_>> = match data {
                        Data::Gauge(g) => g.data_points.iter().map(Point::Number).collect(),
                        Data::Sum(s) => s.data_points.iter().map(Point::Number).collect(),
                        Data::Histogram(h) => h.data_points.iter().map(Point::Histogram).collect(),
                        _ => Vec::new(),
                    };
                    for p in points {
                        if self.apply(
                            &mut inner,
                            &name,
                            kind,
                            &help,
                            &resource_labels,
                            p,
                            delta,
                            now,
                        ) {
                            done.applied += 1;
                        } else {
                            done.skipped += 1;
                        }
                    }
                }
            }
        }
        done
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one data point and where it goes"
    )]
    fn apply(
        &self,
        inner: &mut Inner,
        name: &str,
        kind: MetricKind,
        help: &str,
        resource_labels: &Labels,
        point: Point<'_>,
        delta: bool,
        now: Instant,
    ) -> bool {
        if point.flags() & FLAG_NO_RECORDED_VALUE != 0 {
            return false;
        }
        let labels = labels(point.attributes(), resource_labels);
        let (max, series_count) = (self.max_series, inner.series);
        let family = inner
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family {
                kind,
                help: help.to_string(),
                series: BTreeMap::new(),
            });
        if family.kind != kind {
            self.counters.skipped_type_conflict.inc();
            return false;
        }
        if !help.is_empty() {
            family.help = help.to_string();
        }
        let exists = family.series.contains_key(&labels);
        if !exists && series_count >= max {
            self.counters.series_overflow.inc();
            if family.series.is_empty() {
                inner.families.remove(name);
            }
            return false;
        }
        let mut added = false;
        let ok = match point {
            Point::Number(p) => {
                let v = match p.value {
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    Some(number_data_point::Value::AsInt(i)) => i as f64,
                    None => return false,
                };
                let s = family.series.entry(labels).or_insert_with(|| {
                    added = true;
                    Series::new(now)
                });
                if delta && !added {
                    s.value += v;
                } else {
                    s.value = v;
                }
                s.time_unix_nano = p.time_unix_nano;
                s.updated = now;
                true
            }
            Point::Histogram(p) => {
                // Counts must be one per bound plus the +Inf bucket (or empty:
                // only sum and count).
                if !p.bucket_counts.is_empty()
                    && p.bucket_counts.len() != p.explicit_bounds.len() + 1
                {
                    self.counters.skipped_invalid.inc();
                    false
                } else {
                    let s = family.series.entry(labels).or_insert_with(|| {
                        added = true;
                        Series::new(now)
                    });
                    let same_shape = s.bounds == p.explicit_bounds
                        && s.bucket_counts.len() == p.bucket_counts.len();
                    if delta && !added && same_shape {
                        s.value += p.sum.unwrap_or(0.0);
                        s.count += p.count;
                        for (a, b) in s.bucket_counts.iter_mut().zip(&p.bucket_counts) {
                            *a += b;
                        }
                    } else {
                        s.value = p.sum.unwrap_or(0.0);
                        s.count = p.count;
                        s.bounds = p.explicit_bounds.clone();
                        s.bucket_counts = p.bucket_counts.clone();
                    }
                    s.time_unix_nano = p.time_unix_nano;
                    s.updated = now;
                    true
                }
            }
        };
        if added {
            inner.series += 1;
        } else if family.series.is_empty() {
            inner.families.remove(name);
        }
        ok
    }

    fn prune(&self, inner: &mut Inner, now: Instant) {
        let staleness = self.staleness;
        let mut removed = 0;
        inner.families.retain(|_, f| {
            let before = f.series.len();
            f.series
                .retain(|_, s| now.saturating_duration_since(s.updated) < staleness);
            removed += before - f.series.len();
            !f.series.is_empty()
        });
        inner.series -= removed;
        self.counters.stale_removed.add(removed as u64);
    }

    /// The text exposition of every series, then the collector's own counters.
    pub fn render(&self, stats: &Stats) -> String {
        let mut out = String::new();
        {
            let mut inner = self.lock();
            self.prune(&mut inner, Instant::now());
            for (name, f) in &inner.families {
                render_family(&mut out, name, f);
            }
        }
        render_own(&mut out, stats, self);
        out
    }
}

impl Series {
    fn new(now: Instant) -> Self {
        Self {
            value: 0.0,
            count: 0,
            bounds: Vec::new(),
            bucket_counts: Vec::new(),
            time_unix_nano: 0,
            updated: now,
        }
    }

    /// Cumulative buckets `(le, count)`, ending with `+Inf` = count.
    fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        let mut out: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.bucket_counts)
            .map(|(b, c)| {
                acc += c;
                (*b, acc)
            })
            .collect();
        out.push((f64::INFINITY, self.count));
        out
    }
}

#[derive(Clone, Copy)]
enum Point<'a> {
    Number(&'a NumberDataPoint),
    Histogram(&'a HistogramDataPoint),
}

impl<'a> Point<'a> {
    fn flags(&self) -> u32 {
        match self {
            Point::Number(p) => p.flags,
            Point::Histogram(p) => p.flags,
        }
    }
    fn attributes(&self) -> &'a [KeyValue] {
        match self {
            Point::Number(p) => &p.attributes,
            Point::Histogram(p) => &p.attributes,
        }
    }
}

impl MetricsView for PromRegistry {
    fn snapshot(&self) -> Vec<MetricPoint> {
        let mut inner = self.lock();
        self.prune(&mut inner, Instant::now());
        let mut out = Vec::with_capacity(inner.series);
        for (name, f) in &inner.families {
            for (labels, s) in &f.series {
                out.push(MetricPoint {
                    name: name.clone(),
                    help: f.help.clone(),
                    kind: f.kind,
                    labels: labels.clone(),
                    value: s.value,
                    count: s.count,
                    buckets: if f.kind == MetricKind::Histogram {
                        s.cumulative()
                    } else {
                        Vec::new()
                    },
                    timestamp: SystemTime::UNIX_EPOCH + Duration::from_nanos(s.time_unix_nano),
                });
            }
        }
        out
    }
}

/// Resource attributes that become labels of every series of the resource
/// (name with `.` → `_`): where the data comes from in a cluster.
pub const PROMOTED_RESOURCE_ATTRIBUTES: &[&str] = &[
    "k8s.namespace.name",
    "k8s.pod.name",
    "k8s.pod.uid",
    "k8s.container.name",
    "k8s.node.name",
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.job.name",
    "k8s.cronjob.name",
    "container.id",
];

/// `job` and `instance` from the resource attributes, like the OTel
/// Prometheus exporter, and the [`PROMOTED_RESOURCE_ATTRIBUTES`].
fn job_instance(attrs: &[KeyValue]) -> Labels {
    let get = |k: &str| {
        attrs
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.as_ref())
            .map(value_string)
    };
    let mut out = Vec::new();
    if let Some(service) = get("service.name") {
        let job = match get("service.namespace") {
            Some(ns) if !ns.is_empty() => format!("{ns}/{service}"),
            _ => service,
        };
        out.push(("job".to_string(), job));
    }
    if let Some(id) = get("service.instance.id") {
        out.push(("instance".to_string(), id));
    }
    for key in PROMOTED_RESOURCE_ATTRIBUTES {
        if let Some(v) = get(key).filter(|v| !v.is_empty()) {
            out.push((label_name(key), v));
        }
    }
    out
}

/// Data point attributes (names sanitized; values of names that collide
/// after sanitizing are joined with `;`) plus the resource's job/instance.
fn labels(attrs: &[KeyValue], resource: &Labels) -> Labels {
    let mut map: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for a in attrs {
        let Some(v) = a.value.as_ref() else { continue };
        map.entry(label_name(&a.key))
            .or_default()
            .push((a.key.clone(), value_string(v)));
    }
    let mut out: BTreeMap<String, String> = map
        .into_iter()
        .map(|(k, mut vs)| {
            vs.sort();
            let joined = vs.into_iter().map(|(_, v)| v).collect::<Vec<_>>().join(";");
            (k, joined)
        })
        .collect();
    for (k, v) in resource {
        out.insert(k.clone(), v.clone());
    }
    out.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

fn value_string(v: &AnyValue) -> String {
    use any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(b)
        }
        Some(Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(value_json).collect()).to_string()
        }
        Some(Value::KvlistValue(_)) | Some(Value::StringValueStrindex(_)) => {
            value_json(v).to_string()
        }
        None => String::new(),
    }
}

fn value_json(v: &AnyValue) -> serde_json::Value {
    use any_value::Value;
    match &v.value {
        Some(Value::StringValue(s)) => serde_json::Value::from(s.as_str()),
        Some(Value::BoolValue(b)) => serde_json::Value::from(*b),
        Some(Value::IntValue(i)) => serde_json::Value::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Value::from(*d),
        Some(Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(value_json).collect())
        }
        Some(Value::KvlistValue(kv)) => serde_json::Value::Object(
            kv.values
                .iter()
                .map(|k| {
                    (
                        k.key.clone(),
                        k.value.as_ref().map_or(serde_json::Value::Null, value_json),
                    )
                })
                .collect(),
        ),
        Some(Value::BytesValue(_)) => serde_json::Value::from(value_string(v)),
        Some(Value::StringValueStrindex(i)) => serde_json::Value::from(*i),
        None => serde_json::Value::Null,
    }
}

/// A valid Prometheus label name: invalid characters become `_`, a leading
/// digit gets a `key_` prefix.
pub fn label_name(key: &str) -> String {
    let mut s: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        return "key_".to_string();
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert_str(0, "key_");
    }
    s
}

/// The unit words of the OTel Prometheus translator.
fn unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        _ => return None,
    })
}

fn per_unit_word(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return None,
    })
}

fn tokens(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The Prometheus name of an OTLP metric (without `_bucket`/`_sum`/`_count`).
pub fn prometheus_name(name: &str, unit: &str, kind: MetricKind, monotonic: bool) -> String {
    let mut words = tokens(name);
    // `{packets}`-style annotations are not units.
    let unit: String = {
        let mut out = String::new();
        let mut depth = 0;
        for c in unit.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth = (depth - 1_i32).max(0),
                c if depth == 0 => out.push(c),
                _ => {}
            }
        }
        out.trim().to_string()
    };
    let (main, per) = match unit.split_once('/') {
        Some((m, p)) => (m.trim(), Some(p.trim())),
        None => (unit.as_str(), None),
    };
    let push_unique = |words: &mut Vec<String>, new: Vec<String>| {
        if !new.is_empty() && !contains_run(words, &new) {
            words.extend(new);
        }
    };
    if main == "1" && per.is_none() {
        if kind == MetricKind::Gauge {
            push_unique(&mut words, vec!["ratio".to_string()]);
        }
    } else if !main.is_empty() {
        let w = unit_word(main).map_or_else(|| tokens(main), |w| vec![w.to_string()]);
        push_unique(&mut words, w);
    }
    if let Some(per) = per.filter(|p| !p.is_empty()) {
        let w = per_unit_word(per).map_or_else(|| tokens(per), |w| vec![w.to_string()]);
        if !w.is_empty() {
            let mut run = vec!["per".to_string()];
            run.extend(w);
            push_unique(&mut words, run);
        }
    }
    if kind == MetricKind::Counter && monotonic {
        words.retain(|w| w != "total");
        words.push("total".to_string());
    }
    let mut s = words.join("_");
    if s.is_empty() {
        s.push('_');
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn contains_run(words: &[String], run: &[String]) -> bool {
    words.windows(run.len()).any(|w| w == run)
}

/// `\` and newline escaped (HELP text).
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `\`, `"` and newline escaped (label values).
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as the exposition format writes it.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

fn write_labels(out: &mut String, labels: &[(String, String)], extra: Option<(&str, &str)>) {
    if labels.is_empty() && extra.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (k, v) in labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra)
    {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
}

fn render_family(out: &mut String, name: &str, f: &Family) {
    if !f.help.is_empty() {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
    }
    let ty = match f.kind {
        MetricKind::Counter => "counter",
        MetricKind::Gauge => "gauge",
        MetricKind::Histogram => "histogram",
    };
    let _ = writeln!(out, "# TYPE {name} {ty}");
    for (labels, s) in &f.series {
        match f.kind {
            MetricKind::Counter | MetricKind::Gauge => {
                out.push_str(name);
                write_labels(out, labels, None);
                let _ = writeln!(out, " {}", format_value(s.value));
            }
            MetricKind::Histogram => {
                for (le, c) in s.cumulative() {
                    let _ = write!(out, "{name}_bucket");
                    write_labels(out, labels, Some(("le", &format_value(le))));
                    let _ = writeln!(out, " {c}");
                }
                let _ = write!(out, "{name}_sum");
                write_labels(out, labels, None);
                let _ = writeln!(out, " {}", format_value(s.value));
                let _ = write!(out, "{name}_count");
                write_labels(out, labels, None);
                let _ = writeln!(out, " {}", s.count);
            }
        }
    }
}

fn own_family(out: &mut String, name: &str, ty: &str, help: &str, rows: &[(Labels, u64)]) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {ty}");
    for (labels, v) in rows {
        out.push_str(name);
        write_labels(out, labels, None);
        let _ = writeln!(out, " {v}");
    }
}

fn render_own(out: &mut String, stats: &Stats, registry: &PromRegistry) {
    let signals = [
        ("profiles", &stats.profiles),
        ("spans", &stats.spans),
        ("metrics", &stats.metrics),
    ];
    let per_signal = |f: &dyn Fn(&crate::stats::SignalStats) -> u64| -> Vec<(Labels, u64)> {
        signals
            .iter()
            .map(|(s, st)| (vec![("signal".to_string(), (*s).to_string())], f(st)))
            .collect()
    };
    own_family(
        out,
        "fathom_collector_items_accepted_total",
        "counter",
        "Items (profiles, spans, metric points) accepted into the pipeline.",
        &per_signal(&|s| s.accepted.get()),
    );
    own_family(
        out,
        "fathom_collector_items_refused_total",
        "counter",
        "Items refused because a queue was full (the client was told to retry).",
        &per_signal(&|s| s.refused_full.get()),
    );
    own_family(
        out,
        "fathom_collector_requests_invalid_total",
        "counter",
        "Requests refused as malformed.",
        &per_signal(&|s| s.invalid_requests.get()),
    );
    own_family(
        out,
        "fathom_collector_requests_unauthenticated_total",
        "counter",
        "Requests refused for missing or wrong credentials.",
        &per_signal(&|s| s.unauthenticated.get()),
    );
    for (name, help, c) in [
        (
            "fathom_collector_profile_series_folded_total",
            "Profile series folded into {__name__, service_name} by the series bound.",
            &stats.series_folded,
        ),
        (
            "fathom_collector_profile_merge_conflicts_total",
            "Profiles that could not be merged into their series.",
            &stats.merge_conflicts,
        ),
        (
            "fathom_collector_profile_windows_emitted_total",
            "Merged profiles emitted by the aggregator.",
            &stats.windows_emitted,
        ),
        (
            "fathom_collector_prometheus_series_overflow_total",
            "Metric series refused by the series bound of /metrics.",
            &registry.counters.series_overflow,
        ),
        (
            "fathom_collector_prometheus_series_stale_total",
            "Metric series removed from /metrics because they were not updated.",
            &registry.counters.stale_removed,
        ),
    ] {
        own_family(out, name, "counter", help, &[(Vec::new(), c.get())]);
    }
    let reason = |r: &str| vec![("reason".to_string(), r.to_string())];
    own_family(
        out,
        "fathom_collector_prometheus_points_skipped_total",
        "counter",
        "Metric data points not exposed at /metrics, by reason.",
        &[
            (
                reason("exponential_histogram"),
                registry.counters.skipped_exponential_histogram.get(),
            ),
            (reason("summary"), registry.counters.skipped_summary.get()),
            (
                reason("type_conflict"),
                registry.counters.skipped_type_conflict.get(),
            ),
            (reason("invalid"), registry.counters.skipped_invalid.get()),
        ],
    );
    own_family(
        out,
        "fathom_collector_prometheus_series",
        "gauge",
        "Metric series exposed at /metrics.",
        &[(Vec::new(), registry.series() as u64)],
    );
    let exporters = stats.exporters();
    let per_exporter = |f: &dyn Fn(&ExporterStats) -> u64| -> Vec<(Labels, u64)> {
        exporters
            .iter()
            .map(|e| (vec![("exporter".to_string(), e.name.clone())], f(e)))
            .collect()
    };
    for (name, ty, help, rows) in [
        (
            "fathom_collector_exporter_sent_total",
            "counter",
            "Items delivered by each exporter.",
            per_exporter(&|e| e.sent.get()),
        ),
        (
            "fathom_collector_exporter_failed_attempts_total",
            "counter",
            "Failed delivery attempts of each exporter.",
            per_exporter(&|e| e.failed_attempts.get()),
        ),
        (
            "fathom_collector_exporter_dropped_total",
            "counter",
            "Items dropped by each exporter (buffer bound exceeded or refused by the receiver).",
            per_exporter(&|e| e.dropped.get()),
        ),
        (
            "fathom_collector_exporter_buffered_items",
            "gauge",
            "Items waiting for delivery in each exporter.",
            per_exporter(&|e| e.buffered_items.get()),
        ),
        (
            "fathom_collector_exporter_buffered_bytes",
            "gauge",
            "Bytes waiting for delivery in each exporter.",
            per_exporter(&|e| e.buffered_bytes.get()),
        ),
    ] {
        own_family(out, name, ty, help, &rows);
    }
}

/// `GET /metrics`.
pub fn router(registry: Arc<PromRegistry>, stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state((registry, stats))
}

async fn metrics_handler(
    State((registry, stats)): State<(Arc<PromRegistry>, Arc<Stats>)>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        registry.render(&stats),
    )
}

/// The registry as a sink: applies `Batch::Metrics`, ignores the rest.
pub async fn run_sink(
    registry: Arc<PromRegistry>,
    mut rx: mpsc::Receiver<Batch>,
    stats: Arc<ExporterStats>,
) {
    while let Some(batch) = rx.recv().await {
        if let Batch::Metrics(req) = batch {
            let done = registry.ingest(&req);
            stats.sent.add(done.applied);
            stats.dropped.add(done.skipped);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use opentelemetry_proto::tonic::{
        metrics::v1::{
            Gauge, Histogram, Metric, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
        },
        resource::v1::Resource,
    };

    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..KeyValue::default()
        }
    }

    fn request(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", "shop"),
                        kv("service.namespace", "prod"),
                        kv("service.instance.id", "pod-1"),
                    ],
                    ..Resource::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }],
        }
    }

    fn number(v: f64, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs,
            time_unix_nano: 1,
            value: Some(number_data_point::Value::AsDouble(v)),
            ..NumberDataPoint::default()
        }
    }

    fn sum(
        name: &str,
        unit: &str,
        monotonic: bool,
        temporality: AggregationTemporality,
        v: f64,
    ) -> Metric {
        Metric {
            name: name.into(),
            unit: unit.into(),
            description: "help\nwith \\ newline".into(),
            data: Some(Data::Sum(Sum {
                data_points: vec![number(v, vec![kv("http.method", "GET")])],
                aggregation_temporality: temporality as i32,
                is_monotonic: monotonic,
            })),
            ..Metric::default()
        }
    }

    #[test]
    fn names_follow_the_otel_translation() {
        use MetricKind::*;
        let n = prometheus_name;
        assert_eq!(
            n("http.server.request.duration", "s", Histogram, false),
            "http_server_request_duration_seconds"
        );
        assert_eq!(
            n("system.network.io", "By", Counter, true),
            "system_network_io_bytes_total"
        );
        assert_eq!(n("requests", "{request}", Counter, true), "requests_total");
        assert_eq!(n("requests_total", "1", Counter, true), "requests_total");
        assert_eq!(
            n("cpu.utilization", "1", Gauge, false),
            "cpu_utilization_ratio"
        );
        assert_eq!(n("queue.size", "", Gauge, false), "queue_size");
        assert_eq!(
            n("throughput", "By/s", Gauge, false),
            "throughput_bytes_per_second"
        );
        assert_eq!(
            n("latency_seconds", "s", Histogram, false),
            "latency_seconds"
        );
        assert_eq!(
            n("9lives-cat%", "ms", Gauge, false),
            "_9lives_cat_milliseconds"
        );
        assert_eq!(n("memory", "MiBy", Gauge, false), "memory_mebibytes");
        assert_eq!(n("odd", "furlongs", Gauge, false), "odd_furlongs");
        assert_eq!(label_name("http.request.method"), "http_request_method");
        assert_eq!(label_name("0day"), "key_0day");
    }

    #[test]
    fn counters_gauges_and_deltas() {
        let r = PromRegistry::default();
        let done = r.ingest(&request(vec![
            sum(
                "http.requests",
                "",
                true,
                AggregationTemporality::Cumulative,
                7.0,
            ),
            sum(
                "network.io",
                "By",
                true,
                AggregationTemporality::Delta,
                100.0,
            ),
            sum(
                "queue.depth",
                "",
                false,
                AggregationTemporality::Cumulative,
                -3.0,
            ),
            Metric {
                name: "temperature".into(),
                unit: "Cel".into(),
                data: Some(Data::Gauge(Gauge {
                    data_points: vec![number(21.5, vec![])],
                })),
                ..Metric::default()
            },
        ]));
        assert_eq!(
            done,
            Ingested {
                applied: 4,
                skipped: 0
            }
        );
        r.ingest(&request(vec![
            sum(
                "http.requests",
                "",
                true,
                AggregationTemporality::Cumulative,
                9.0,
            ),
            sum(
                "network.io",
                "By",
                true,
                AggregationTemporality::Delta,
                50.0,
            ),
        ]));
        let text = r.render(&Stats::default());
        let l = r#"{http_method="GET",instance="pod-1",job="prod/shop"}"#;
        assert!(
            text.contains(&format!("http_requests_total{l} 9\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("network_io_bytes_total{l} 150\n")),
            "{text}"
        );
        assert!(text.contains(&format!("queue_depth{l} -3\n")), "{text}");
        assert!(
            text.contains("temperature_celsius{instance=\"pod-1\",job=\"prod/shop\"} 21.5\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE http_requests_total counter\n"));
        assert!(text.contains("# TYPE queue_depth gauge\n"));
        assert!(
            text.contains("# HELP http_requests_total help\\nwith \\\\ newline\n"),
            "{text}"
        );
        assert_eq!(r.snapshot().len(), 4);
    }

    #[test]
    fn kubernetes_resource_attributes_become_labels() {
        let r = PromRegistry::default();
        let mut req = request(vec![sum(
            "http.requests",
            "",
            true,
            AggregationTemporality::Cumulative,
            2.0,
        )]);
        let resource = req.resource_metrics[0].resource.as_mut().unwrap();
        resource.attributes.extend([
            kv("k8s.pod.name", "web-1"),
            kv("k8s.namespace.name", "shop"),
            kv("k8s.container.name", "app"),
            kv("k8s.node.name", "node-1"),
            kv("k8s.deployment.name", "web"),
            kv("container.id", "abc"),
            kv("k8s.pod.uid", ""),
            // Not in the list: stays out of the labels.
            kv("process.pid", "42"),
            kv("host.name", "node-1"),
        ]);
        r.ingest(&req);
        let text = r.render(&Stats::default());
        let want = "http_requests_total{container_id=\"abc\",http_method=\"GET\",instance=\"pod-1\",\
                    job=\"prod/shop\",k8s_container_name=\"app\",k8s_deployment_name=\"web\",\
                    k8s_namespace_name=\"shop\",k8s_node_name=\"node-1\",k8s_pod_name=\"web-1\"} 2\n";
        assert!(text.contains(want), "{text}");
        assert_eq!(PROMOTED_RESOURCE_ATTRIBUTES.len(), 12);
    }

    #[test]
    fn histograms_are_cumulative_with_inf() {
        let r = PromRegistry::default();
        let h = |temporality: AggregationTemporality, counts: Vec<u64>, sum: f64| Metric {
            name: "http.server.request.duration".into(),
            unit: "s".into(),
            data: Some(Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    attributes: vec![kv("http.route", "/a")],
                    count: counts.iter().sum(),
                    sum: Some(sum),
                    bucket_counts: counts,
                    explicit_bounds: vec![0.1, 0.5, 1.0],
                    ..HistogramDataPoint::default()
                }],
                aggregation_temporality: temporality as i32,
            })),
            ..Metric::default()
        };
        r.ingest(&request(vec![h(
            AggregationTemporality::Delta,
            vec![1, 2, 3, 4],
            9.5,
        )]));
        r.ingest(&request(vec![h(
            AggregationTemporality::Delta,
            vec![1, 0, 0, 1],
            2.5,
        )]));
        let text = r.render(&Stats::default());
        let name = "http_server_request_duration_seconds";
        let l = r#"http_route="/a",instance="pod-1",job="prod/shop""#;
        for (le, c) in [("0.1", 2), ("0.5", 4), ("1", 7), ("+Inf", 12)] {
            let line = format!("{name}_bucket{{{l},le=\"{le}\"}} {c}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&format!("{name}_sum{{{l}}} 12\n")), "{text}");
        assert!(
            text.contains(&format!("{name}_count{{{l}}} 12\n")),
            "{text}"
        );
        assert!(text.contains(&format!("# TYPE {name} histogram\n")));
        let snap = r.snapshot();
        assert_eq!(snap[0].buckets.last(), Some(&(f64::INFINITY, 12)));

        // Cumulative replaces.
        r.ingest(&request(vec![h(
            AggregationTemporality::Cumulative,
            vec![0, 0, 0, 1],
            3.0,
        )]));
        let text = r.render(&Stats::default());
        assert!(text.contains(&format!("{name}_count{{{l}}} 1\n")), "{text}");
        // Counts that do not match the bounds are refused.
        let done = r.ingest(&request(vec![h(
            AggregationTemporality::Cumulative,
            vec![1, 2],
            3.0,
        )]));
        assert_eq!(
            done,
            Ingested {
                applied: 0,
                skipped: 1
            }
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let r = PromRegistry::default();
        r.ingest(&request(vec![Metric {
            name: "x".into(),
            data: Some(Data::Gauge(Gauge {
                data_points: vec![number(1.0, vec![kv("path", "C:\\dir \"q\"\nnext")])],
            })),
            ..Metric::default()
        }]));
        let text = r.render(&Stats::default());
        assert!(
            text.contains(r#"x{instance="pod-1",job="prod/shop",path="C:\\dir \"q\"\nnext"} 1"#),
            "{text}"
        );
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
    }

    #[test]
    fn series_bound_staleness_and_skips_are_counted() {
        let r = PromRegistry::new(2, Duration::from_millis(200));
        let g = |name: &str| Metric {
            name: name.into(),
            data: Some(Data::Gauge(Gauge {
                data_points: vec![number(1.0, vec![])],
            })),
            ..Metric::default()
        };
        let done = r.ingest(&request(vec![
            g("a"),
            g("b"),
            g("c"),
            Metric {
                name: "s".into(),
                data: Some(Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint::default()],
                })),
                ..Metric::default()
            },
        ]));
        assert_eq!(
            done,
            Ingested {
                applied: 2,
                skipped: 2
            }
        );
        assert_eq!(r.counters.series_overflow.get(), 1);
        assert_eq!(r.counters.skipped_summary.get(), 1);
        assert_eq!(r.series(), 2);
        // One Prometheus name from a gauge and from a counter: a conflict.
        let c = PromRegistry::default();
        c.ingest(&request(vec![g("x_total")]));
        let done = c.ingest(&request(vec![sum(
            "x",
            "",
            true,
            AggregationTemporality::Cumulative,
            1.0,
        )]));
        assert_eq!(
            done,
            Ingested {
                applied: 0,
                skipped: 1
            }
        );
        assert_eq!(c.counters.skipped_type_conflict.get(), 1);
        let text = r.render(&Stats::default());
        assert!(
            text.contains("fathom_collector_prometheus_series_overflow_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "fathom_collector_prometheus_points_skipped_total{reason=\"summary\"} 1\n"
            )
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(r.snapshot().is_empty(), "stale series are removed");
        assert_eq!(r.counters.stale_removed.get(), 2);
        // Room again after staleness.
        assert_eq!(r.ingest(&request(vec![g("c")])).applied, 1);
    }

    #[test]
    fn own_counters_per_signal_and_exporter() {
        let stats = Stats::default();
        stats.spans.accepted.add(5);
        let e = stats.exporter("otlp");
        e.dropped.add(2);
        e.buffered_bytes.set(100);
        let text = PromRegistry::default().render(&stats);
        assert!(
            text.contains("fathom_collector_items_accepted_total{signal=\"spans\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("fathom_collector_exporter_dropped_total{exporter=\"otlp\"} 2\n"));
        assert!(text.contains("fathom_collector_exporter_buffered_bytes{exporter=\"otlp\"} 100\n"));
        assert!(text.contains("# TYPE fathom_collector_exporter_buffered_bytes gauge\n"));
    }
}
