//! RED metrics of HTTP spans: `http.server.request.duration` and
//! `http.client.request.duration`, explicit-bucket histograms in seconds
//! with the boundaries the OpenTelemetry HTTP conventions advise,
//! cumulative since [`HttpMetrics::new`]. Attributes: `http.request.method`,
//! `http.response.status_code`, `url.scheme`, and `error.type` when the
//! span is an error. One set of series per resource (the caller decides
//! what a resource is: a service, a process).
//!
//! Cardinality is bounded ([`MetricsConfig::max_series`]): once reached,
//! spans of new attribute sets go to one series per resource and metric
//! with only `otel.metric.overflow=true` (as the OTel SDKs do) while that
//! series fits, and are dropped otherwise; both are counted.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics,
        ScopeMetrics, metric,
    },
};

use super::otlp::{method_attr, scope};
use super::spans::{HttpSpan, Scheme, SpanKind};
use crate::otlp::{ResourceInfo, kv_bool, kv_int, kv_str};

/// Bucket boundaries (seconds) advised for HTTP durations.
pub const DURATION_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

pub const SERVER_DURATION: &str = "http.server.request.duration";
pub const CLIENT_DURATION: &str = "http.client.request.duration";

/// Bounds of [`HttpMetrics`].
#[derive(Clone, Debug)]
pub struct MetricsConfig {
    /// Series kept, over all resources and both metrics.
    pub max_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { max_series: 4096 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SeriesKey {
    kind: SpanKind,
    /// The overflow series (no other attributes).
    overflow: bool,
    /// `http.request.method` (a known method or `_OTHER`).
    method: &'static str,
    status: Option<u16>,
    scheme: Scheme,
    /// With `error.type`: the status code, or `_OTHER` without one.
    error: bool,
}

#[derive(Clone, Debug)]
struct Hist {
    counts: [u64; DURATION_BOUNDS.len() + 1],
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            counts: [0; DURATION_BOUNDS.len() + 1],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Hist {
    fn record(&mut self, seconds: f64) {
        // Buckets are (previous bound, bound]; the last is (10, +Inf).
        let i = DURATION_BOUNDS.partition_point(|&b| b < seconds);
        self.counts[i] += 1;
        self.count += 1;
        self.sum += seconds;
        self.min = self.min.min(seconds);
        self.max = self.max.max(seconds);
    }
}

/// Duration histograms of HTTP spans, cumulative.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    cfg: MetricsConfig,
    start_unix_ns: u64,
    by_resource: BTreeMap<ResourceInfo, BTreeMap<SeriesKey, Hist>>,
    series: usize,
    overflowed: u64,
    dropped: u64,
}

impl HttpMetrics {
    /// Empty histograms, counting from `start_unix_ns`.
    pub fn new(cfg: MetricsConfig, start_unix_ns: u64) -> Self {
        Self {
            cfg,
            start_unix_ns,
            by_resource: BTreeMap::new(),
            series: 0,
            overflowed: 0,
            dropped: 0,
        }
    }

    /// Series kept.
    pub fn series(&self) -> usize {
        self.series
    }

    /// Spans recorded in an overflow series.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Spans not recorded (a new resource while the series bound is reached).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds a span's duration to the series of `resource`.
    pub fn record(&mut self, resource: &ResourceInfo, span: &HttpSpan) {
        let key = SeriesKey {
            kind: span.kind,
            overflow: false,
            method: method_attr(&span.method),
            status: span.status,
            scheme: span.scheme,
            error: span.error,
        };
        let seconds = span.duration_ns() as f64 / 1e9;
        let full = self.series >= self.cfg.max_series;
        if let Some(series) = self.by_resource.get_mut(resource) {
            if let Some(h) = series.get_mut(&key) {
                h.record(seconds);
            } else if !full {
                self.series += 1;
                series.entry(key).or_default().record(seconds);
            } else {
                // Not counted in `max_series`: at most one per resource and
                // kind, and resources are made only below the bound.
                self.overflowed += 1;
                let overflow = SeriesKey {
                    kind: span.kind,
                    overflow: true,
                    method: "",
                    status: None,
                    scheme: Scheme::Http,
                    error: false,
                };
                series.entry(overflow).or_default().record(seconds);
            }
        } else if full {
            self.dropped += 1;
        } else {
            self.series += 1;
            let mut series = BTreeMap::new();
            series
                .entry(key)
                .or_insert_with(Hist::default)
                .record(seconds);
            self.by_resource.insert(resource.clone(), series);
        }
    }

    /// The histograms as an OTLP metrics request, stamped `now_unix_ns`.
    pub fn export(&self, now_unix_ns: u64) -> ExportMetricsServiceRequest {
        let resource_metrics = self
            .by_resource
            .iter()
            .map(|(resource, series)| {
                let mut metrics = Vec::new();
                for (kind, name, description) in [
                    (
                        SpanKind::Server,
                        SERVER_DURATION,
                        "Duration of HTTP server requests.",
                    ),
                    (
                        SpanKind::Client,
                        CLIENT_DURATION,
                        "Duration of HTTP client requests.",
                    ),
                ] {
                    let data_points: Vec<HistogramDataPoint> = series
                        .iter()
                        .filter(|(k, _)| k.kind == kind)
                        .map(|(k, h)| self.point(k, h, now_unix_ns))
                        .collect();
                    if data_points.is_empty() {
                        continue;
                    }
                    metrics.push(Metric {
                        name: name.to_string(),
                        description: description.to_string(),
                        unit: "s".to_string(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        })),
                        ..Metric::default()
                    });
                }
                ResourceMetrics {
                    resource: Some(resource.to_otlp()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(scope()),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    fn point(&self, k: &SeriesKey, h: &Hist, now_unix_ns: u64) -> HistogramDataPoint {
        let mut attributes = Vec::new();
        if k.overflow {
            attributes.push(kv_bool("otel.metric.overflow", true));
        } else {
            attributes.push(kv_str("http.request.method", k.method));
            if let Some(s) = k.status {
                attributes.push(kv_int("http.response.status_code", i64::from(s)));
            }
            attributes.push(kv_str("url.scheme", k.scheme.as_str()));
            if k.error {
                let e = k
                    .status
                    .map_or_else(|| "_OTHER".to_string(), |s| s.to_string());
                attributes.push(kv_str("error.type", &e));
            }
        }
        HistogramDataPoint {
            attributes,
            start_time_unix_nano: self.start_unix_ns,
            time_unix_nano: now_unix_ns,
            count: h.count,
            sum: Some(h.sum),
            bucket_counts: h.counts.to_vec(),
            explicit_bounds: DURATION_BOUNDS.to_vec(),
            min: (h.count > 0).then_some(h.min),
            max: (h.count > 0).then_some(h.max),
            ..HistogramDataPoint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_collector::exporters::prometheus::PromRegistry;
    use fathom_collector::stats::Stats;

    fn span(kind: SpanKind, method: &str, status: u16, ms: f64) -> HttpSpan {
        let mut s = crate::traces::otlp::tests::server_span();
        s.kind = kind;
        s.method = method.into();
        s.status = Some(status);
        s.error = crate::traces::spans::is_error_status(kind, Some(status));
        s.start_ns = 1_000;
        s.end_ns = 1_000 + (ms * 1e6) as u64;
        s
    }

    fn shop() -> ResourceInfo {
        ResourceInfo {
            service_name: "shop".into(),
            ..ResourceInfo::default()
        }
    }

    #[test]
    fn buckets_and_attributes() {
        let mut m = HttpMetrics::new(MetricsConfig::default(), 5);
        for ms in [3.0, 5.0, 20.0, 20.0, 12_000.0] {
            m.record(&shop(), &span(SpanKind::Server, "GET", 200, ms));
        }
        m.record(&shop(), &span(SpanKind::Server, "BREW", 500, 100.0));
        m.record(&shop(), &span(SpanKind::Client, "GET", 404, 1.0));
        assert_eq!(m.series(), 3);
        let req = m.export(99);
        assert_eq!(req.resource_metrics.len(), 1);
        let sm = &req.resource_metrics[0].scope_metrics[0];
        assert_eq!(sm.scope.as_ref().unwrap().name, "fathom.http");
        let names: Vec<_> = sm
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.unit.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("http.server.request.duration", "s"),
                ("http.client.request.duration", "s")
            ]
        );
        let Some(metric::Data::Histogram(h)) = &sm.metrics[0].data else {
            panic!("not a histogram");
        };
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(h.data_points.len(), 2);
        // Ordered by key: GET 200 before _OTHER 500.
        let get = &h.data_points[0];
        assert_eq!(get.count, 5);
        assert_eq!(
            get.bucket_counts,
            [2, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(get.explicit_bounds, DURATION_BOUNDS);
        assert!((get.sum.unwrap() - 12.048).abs() < 1e-9);
        assert_eq!((get.min, get.max), (Some(0.003), Some(12.0)));
        assert_eq!((get.start_time_unix_nano, get.time_unix_nano), (5, 99));
        assert_eq!(get.attributes.len(), 3);
        let other = &h.data_points[1];
        let keys: Vec<_> = other.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "url.scheme",
                "error.type"
            ]
        );
        assert_eq!(
            other.attributes[0].value.as_ref().unwrap().value,
            Some(
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                    "_OTHER".into()
                )
            )
        );
        assert_eq!(other.bucket_counts[5], 1);
    }

    #[test]
    fn cardinality_is_bounded() {
        let mut m = HttpMetrics::new(MetricsConfig { max_series: 2 }, 0);
        for status in [200, 201, 202, 203] {
            m.record(&shop(), &span(SpanKind::Server, "GET", status, 1.0));
        }
        let other = ResourceInfo {
            service_name: "other".into(),
            ..ResourceInfo::default()
        };
        m.record(&other, &span(SpanKind::Server, "GET", 200, 1.0));
        assert_eq!((m.series(), m.overflowed(), m.dropped()), (2, 2, 1));
        let req = m.export(1);
        let Some(metric::Data::Histogram(h)) =
            &req.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not a histogram");
        };
        assert_eq!(h.data_points.len(), 3);
        let overflow = &h.data_points[2];
        assert_eq!(overflow.count, 2);
        assert_eq!(overflow.attributes.len(), 1);
        assert_eq!(overflow.attributes[0].key, "otel.metric.overflow");
    }

    /// The collector's Prometheus exporter renders these histograms.
    #[test]
    fn prometheus_exposition() {
        let mut m = HttpMetrics::new(MetricsConfig::default(), 0);
        let mut s = span(SpanKind::Server, "GET", 200, 30.0);
        m.record(&shop(), &s);
        s.end_ns = s.start_ns + 2_000_000_000;
        m.record(&shop(), &s);
        m.record(&shop(), &span(SpanKind::Client, "POST", 502, 7.0));
        let registry = PromRegistry::default();
        let done = registry.ingest(&m.export(1_000));
        assert_eq!((done.applied, done.skipped), (2, 0));
        let text = registry.render(&Stats::default());
        let server = "http_server_request_duration_seconds";
        let labels = r#"http_request_method="GET",http_response_status_code="200",job="shop",url_scheme="http""#;
        for (le, c) in [
            ("0.025", 0),
            ("0.05", 1),
            ("1", 1),
            ("2.5", 2),
            ("10", 2),
            ("+Inf", 2),
        ] {
            let line = format!("{server}_bucket{{{labels},le=\"{le}\"}} {c}\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains(&format!("{server}_count{{{labels}}} 2\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{server}_sum{{{labels}}} 2.03\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {server} histogram\n")),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP http_server_request_duration_seconds Duration of HTTP server requests.\n"
            ),
            "{text}"
        );
        let client = r#"http_client_request_duration_seconds_bucket{error_type="502",http_request_method="POST",http_response_status_code="502",job="shop",url_scheme="http",le="0.01"} 1"#;
        assert!(text.contains(client), "{text}");
    }
}
