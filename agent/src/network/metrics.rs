//! Network metrics per local workload, cumulative since
//! [`NetMetrics::new`], as OTLP (scope `fathom.network`). Names and
//! attributes follow the project's network metrics contract (README,
//! *Network latency*): after the collector's Prometheus translation they
//! are `fathom_tcp_handshake_duration_seconds`, `fathom_tcp_rtt_seconds`,
//! `fathom_tcp_retransmits_total`, `fathom_tcp_connect_failures_total`,
//! `fathom_network_bytes_total`, `fathom_network_packets_total` and
//! `fathom_dns_request_duration_seconds`.
//!
//! Cardinality is bounded ([`NetMetricsConfig::max_series`], over all
//! resources and metrics): beyond it a new attribute set of a known
//! resource goes to that resource's overflow series of the metric (only
//! `otel.metric.overflow=true`), and a new resource is dropped; both are
//! counted.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::InstrumentationScope,
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
};

use super::hist::{HistSum, bounds_seconds};
use crate::otlp::{ResourceInfo, kv_bool, kv_int, kv_str};

pub const SCOPE_NAME: &str = "fathom.network";

/// The metrics of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetMetric {
    Handshake,
    Rtt,
    Retransmits,
    ConnectFailures,
    Bytes,
    Packets,
    Dns,
}

impl NetMetric {
    pub const ALL: [NetMetric; 7] = [
        NetMetric::Handshake,
        NetMetric::Rtt,
        NetMetric::Retransmits,
        NetMetric::ConnectFailures,
        NetMetric::Bytes,
        NetMetric::Packets,
        NetMetric::Dns,
    ];

    /// (OTLP name, unit, description).
    pub fn otlp(self) -> (&'static str, &'static str, &'static str) {
        match self {
            NetMetric::Handshake => (
                "fathom.tcp.handshake.duration",
                "s",
                "TCP handshake time: SYN sent to established (client), SYN to the final ACK (server).",
            ),
            NetMetric::Rtt => (
                "fathom.tcp.rtt",
                "s",
                "Smoothed round-trip time of established TCP connections, sampled.",
            ),
            NetMetric::Retransmits => (
                "fathom.tcp.retransmits",
                "{segment}",
                "Retransmitted TCP segments.",
            ),
            NetMetric::ConnectFailures => (
                "fathom.tcp.connect.failures",
                "{connection}",
                "TCP connects that failed (SYN_SENT to CLOSE).",
            ),
            NetMetric::Bytes => (
                "fathom.network.bytes",
                "{byte}",
                "Bytes seen on the monitored interfaces (IP packets, link header included).",
            ),
            NetMetric::Packets => (
                "fathom.network.packets",
                "{packet}",
                "Packets seen on the monitored interfaces.",
            ),
            NetMetric::Dns => (
                "fathom.dns.request.duration",
                "s",
                "DNS query to response over UDP, by response code (or timeout).",
            ),
        }
    }

    fn is_histogram(self) -> bool {
        matches!(self, NetMetric::Handshake | NetMetric::Rtt | NetMetric::Dns)
    }
}

/// One series' attributes (besides the resource).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    pub metric: NetMetric,
    /// `client` or `server` (not on DNS).
    pub direction: Option<&'static str>,
    /// The remote workload's name, else its address.
    pub peer: String,
    pub server_port: Option<u16>,
    /// `transmit` or `receive` (bytes and packets).
    pub io_direction: Option<&'static str>,
    /// DNS response code name, or `timeout`.
    pub rcode: Option<String>,
    /// The overflow series (no other attributes).
    pub overflow: bool,
}

impl Series {
    pub fn new(metric: NetMetric, peer: impl Into<String>) -> Self {
        Self {
            metric,
            direction: None,
            peer: peer.into(),
            server_port: None,
            io_direction: None,
            rcode: None,
            overflow: false,
        }
    }

    fn attributes(&self) -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue> {
        if self.overflow {
            return vec![kv_bool("otel.metric.overflow", true)];
        }
        let mut out = Vec::new();
        if let Some(d) = self.direction {
            out.push(kv_str("direction", d));
        }
        out.push(kv_str("peer", &self.peer));
        if let Some(p) = self.server_port {
            out.push(kv_int("server_port", i64::from(p)));
        }
        if let Some(d) = self.io_direction {
            out.push(kv_str("network.io.direction", d));
        }
        if let Some(r) = &self.rcode {
            out.push(kv_str("dns.rcode", r));
        }
        out
    }
}

/// The name of a DNS response code (RFC 1035, 2136).
pub fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        6 => "YXDOMAIN".into(),
        7 => "YXRRSET".into(),
        8 => "NXRRSET".into(),
        9 => "NOTAUTH".into(),
        10 => "NOTZONE".into(),
        n => format!("RCODE{n}"),
    }
}

#[derive(Clone, Debug)]
enum Value {
    Hist(HistSum),
    Count(u64),
}

/// Bounds of [`NetMetrics`].
#[derive(Clone, Debug)]
pub struct NetMetricsConfig {
    /// Series kept over all resources and metrics.
    pub max_series: usize,
}

impl Default for NetMetricsConfig {
    fn default() -> Self {
        Self { max_series: 4096 }
    }
}

/// Cumulative network metrics per resource.
#[derive(Clone, Debug)]
pub struct NetMetrics {
    cfg: NetMetricsConfig,
    start_unix_ns: u64,
    by_resource: BTreeMap<ResourceInfo, BTreeMap<Series, Value>>,
    series: usize,
    overflowed: u64,
    dropped: u64,
}

impl NetMetrics {
    pub fn new(cfg: NetMetricsConfig, start_unix_ns: u64) -> Self {
        Self {
            cfg,
            start_unix_ns,
            by_resource: BTreeMap::new(),
            series: 0,
            overflowed: 0,
            dropped: 0,
        }
    }

    /// Series kept (overflow series not counted).
    pub fn series(&self) -> usize {
        self.series
    }

    /// Additions folded into an overflow series.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// Additions dropped (a new resource beyond the bound).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds a histogram delta.
    pub fn add_hist(&mut self, resource: &ResourceInfo, series: Series, delta: &HistSum) {
        if delta.count == 0 {
            return;
        }
        if let Some(Value::Hist(h)) =
            self.slot(resource, series, || Value::Hist(HistSum::default()))
        {
            h.merge(delta);
        }
    }

    /// Adds to a counter.
    pub fn add_count(&mut self, resource: &ResourceInfo, series: Series, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Value::Count(c)) = self.slot(resource, series, || Value::Count(0)) {
            *c += n;
        }
    }

    fn slot(
        &mut self,
        resource: &ResourceInfo,
        series: Series,
        new: impl Fn() -> Value,
    ) -> Option<&mut Value> {
        let full = self.series >= self.cfg.max_series;
        if !self.by_resource.contains_key(resource) {
            if full {
                self.dropped += 1;
                return None;
            }
            self.by_resource.insert(resource.clone(), BTreeMap::new());
        }
        let map = self.by_resource.get_mut(resource)?;
        if map.contains_key(&series) {
            return map.get_mut(&series);
        }
        if full {
            self.overflowed += 1;
            let overflow = Series {
                overflow: true,
                ..Series::new(series.metric, "")
            };
            return Some(map.entry(overflow).or_insert_with(new));
        }
        self.series += 1;
        Some(map.entry(series).or_insert_with(new))
    }

    /// The metrics as an OTLP request stamped `now_unix_ns`.
    pub fn export(&self, now_unix_ns: u64) -> ExportMetricsServiceRequest {
        let bounds = bounds_seconds();
        let resource_metrics = self
            .by_resource
            .iter()
            .filter(|(_, series)| !series.is_empty())
            .map(|(resource, series)| {
                let metrics = NetMetric::ALL
                    .iter()
                    .filter_map(|&m| self.metric(m, series, &bounds, now_unix_ns))
                    .collect();
                ResourceMetrics {
                    resource: Some(resource.to_otlp()),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(InstrumentationScope {
                            name: SCOPE_NAME.into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..InstrumentationScope::default()
                        }),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                }
            })
            .collect();
        ExportMetricsServiceRequest { resource_metrics }
    }

    fn metric(
        &self,
        m: NetMetric,
        series: &BTreeMap<Series, Value>,
        bounds: &[f64],
        now: u64,
    ) -> Option<Metric> {
        let (name, unit, description) = m.otlp();
        let of_metric = series.iter().filter(|(s, _)| s.metric == m);
        let data = if m.is_histogram() {
            let data_points: Vec<_> = of_metric
                .filter_map(|(s, v)| match v {
                    Value::Hist(h) => Some(HistogramDataPoint {
                        attributes: s.attributes(),
                        start_time_unix_nano: self.start_unix_ns,
                        time_unix_nano: now,
                        count: h.count,
                        sum: Some(h.sum_seconds()),
                        bucket_counts: h.buckets.clone(),
                        explicit_bounds: bounds.to_vec(),
                        ..HistogramDataPoint::default()
                    }),
                    Value::Count(_) => None,
                })
                .collect();
            if data_points.is_empty() {
                return None;
            }
            metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })
        } else {
            let data_points: Vec<_> = of_metric
                .filter_map(|(s, v)| match v {
                    Value::Count(c) => Some(NumberDataPoint {
                        attributes: s.attributes(),
                        start_time_unix_nano: self.start_unix_ns,
                        time_unix_nano: now,
                        value: Some(number_data_point::Value::AsInt(*c as i64)),
                        ..NumberDataPoint::default()
                    }),
                    Value::Hist(_) => None,
                })
                .collect();
            if data_points.is_empty() {
                return None;
            }
            metric::Data::Sum(Sum {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            })
        };
        Some(Metric {
            name: name.into(),
            description: description.into(),
            unit: unit.into(),
            data: Some(data),
            ..Metric::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_collector::exporters::prometheus::PromRegistry;
    use fathom_collector::stats::Stats;

    fn shop() -> ResourceInfo {
        ResourceInfo {
            service_name: "shop".into(),
            executable_name: Some("shop".into()),
            ..ResourceInfo::default()
        }
    }

    fn hist(ms: &[f64]) -> HistSum {
        let mut h = HistSum::default();
        for m in ms {
            h.observe((m * 1e6) as u64);
        }
        h
    }

    /// The names and labels of the contract, through the collector's own
    /// Prometheus translation.
    #[test]
    fn prometheus_names_follow_the_contract() {
        let mut m = NetMetrics::new(NetMetricsConfig::default(), 0);
        let client = |metric| Series {
            direction: Some("client"),
            server_port: Some(80),
            ..Series::new(metric, "web")
        };
        m.add_hist(&shop(), client(NetMetric::Handshake), &hist(&[20.0, 20.2]));
        m.add_hist(&shop(), client(NetMetric::Rtt), &hist(&[50.0]));
        m.add_count(&shop(), client(NetMetric::Retransmits), 3);
        m.add_count(
            &shop(),
            Series {
                server_port: Some(80),
                ..Series::new(NetMetric::ConnectFailures, "10.0.0.9")
            },
            1,
        );
        for (metric, n) in [(NetMetric::Bytes, 1500), (NetMetric::Packets, 2)] {
            m.add_count(
                &shop(),
                Series {
                    io_direction: Some("transmit"),
                    ..client(metric)
                },
                n,
            );
        }
        m.add_hist(
            &shop(),
            Series {
                rcode: Some(rcode_name(3)),
                ..Series::new(NetMetric::Dns, "10.0.0.53")
            },
            &hist(&[20.0]),
        );
        assert_eq!(m.series(), 7);
        let registry = PromRegistry::default();
        let done = registry.ingest(&m.export(1_000));
        assert_eq!((done.applied, done.skipped), (7, 0));
        let text = registry.render(&Stats::default());
        let labels = r#"direction="client",job="shop",peer="web",server_port="80""#;
        for line in [
            format!("fathom_tcp_handshake_duration_seconds_count{{{labels}}} 2\n"),
            format!("fathom_tcp_handshake_duration_seconds_sum{{{labels}}} 0.0402\n"),
            format!("fathom_tcp_rtt_seconds_count{{{labels}}} 1\n"),
            format!("fathom_tcp_retransmits_total{{{labels}}} 3\n"),
            r#"fathom_tcp_connect_failures_total{job="shop",peer="10.0.0.9",server_port="80"} 1
"#
            .to_string(),
            r#"fathom_network_bytes_total{direction="client",job="shop",network_io_direction="transmit",peer="web",server_port="80"} 1500
"#.to_string(),
            r#"fathom_network_packets_total{direction="client",job="shop",network_io_direction="transmit",peer="web",server_port="80"} 2
"#.to_string(),
            r#"fathom_dns_request_duration_seconds_count{dns_rcode="NXDOMAIN",job="shop",peer="10.0.0.53"} 1
"#
            .to_string(),
            "# TYPE fathom_tcp_rtt_seconds histogram\n".to_string(),
            "# TYPE fathom_network_bytes_total counter\n".to_string(),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        // 20 ms and 20.2 ms fall in the bucket [18.87 ms, 20.97 ms).
        for (le, n) in [("0.018874368", 0), ("0.02097152", 2)] {
            let line = format!(
                "fathom_tcp_handshake_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }

    #[test]
    fn cardinality_is_bounded() {
        let mut m = NetMetrics::new(NetMetricsConfig { max_series: 2 }, 0);
        for peer in ["a", "b", "c", "d"] {
            m.add_count(&shop(), Series::new(NetMetric::Retransmits, peer), 1);
        }
        let other = ResourceInfo {
            service_name: "other".into(),
            ..ResourceInfo::default()
        };
        m.add_count(&other, Series::new(NetMetric::Retransmits, "a"), 1);
        assert_eq!((m.series(), m.overflowed(), m.dropped()), (2, 2, 1));
        let req = m.export(1);
        assert_eq!(req.resource_metrics.len(), 1);
        let Some(metric::Data::Sum(s)) = &req.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("not a sum");
        };
        assert_eq!(s.data_points.len(), 3);
        let overflow = s
            .data_points
            .iter()
            .find(|p| p.attributes.len() == 1 && p.attributes[0].key == "otel.metric.overflow")
            .expect("overflow series");
        assert_eq!(overflow.value, Some(number_data_point::Value::AsInt(2)));
    }

    #[test]
    fn rcodes() {
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(15), "RCODE15");
    }
}
