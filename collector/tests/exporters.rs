//! The collector's exporters against real peers: rotel (a real OpenTelemetry
//! collector) receives what the OTLP exporter sends, also across an outage;
//! a real Prometheus scrapes `/metrics`; Pyroscope push bodies are decoded by
//! `protoc` with the upstream `push.v1` definitions.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use fathom_collector::{
    config::{OtlpExporterConfig, OtlpProtocol},
    exporters::otlp::OtlpExporter,
    pipeline::Batch,
    stats::{ExporterStats, Stats},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind},
};
use tokio::sync::mpsc;

mod common;
use common::{Rotel, RotelSpan, free_port, require_found, rotel_agent_path};

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

fn str_kv(key: &str, value: &str) -> KeyValue {
    kv(key, Value::StringValue(value.into()))
}

fn trace_id(n: u64) -> Vec<u8> {
    [0xabu64.to_be_bytes(), n.to_be_bytes()].concat()
}

fn span_id(n: u64) -> Vec<u8> {
    (n + 1).to_be_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn resource_spans(service: &str, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(Resource {
            attributes: vec![
                str_kv("service.name", service),
                str_kv("host.name", &format!("{service}-host")),
            ],
            ..Resource::default()
        }),
        scope_spans: vec![ScopeSpans {
            spans,
            ..ScopeSpans::default()
        }],
        ..ResourceSpans::default()
    }
}

/// A span numbered `seq`: ids and the `seq` attribute derive from it.
fn numbered_span(seq: u64) -> Span {
    Span {
        trace_id: trace_id(seq),
        span_id: span_id(seq),
        name: format!("op-{seq}"),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000 + seq * 1000,
        end_time_unix_nano: 1_700_000_000_000_000_000 + seq * 1000 + 500,
        attributes: vec![kv("seq", Value::IntValue(seq as i64))],
        ..Span::default()
    }
}

fn numbered_request(seq: u64) -> Batch {
    Batch::Spans(Arc::new(ExportTraceServiceRequest {
        resource_spans: vec![resource_spans("numbered", vec![numbered_span(seq)])],
    }))
}

fn seq_of(s: &RotelSpan) -> u64 {
    let v = s.attributes.get("seq").expect("span without seq");
    v.strip_prefix("Int(")
        .and_then(|v| v.strip_suffix(')'))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("seq attribute {v:?}"))
}

fn exporter_config(
    endpoint: String,
    protocol: OtlpProtocol,
    buffer_bytes: u64,
) -> OtlpExporterConfig {
    OtlpExporterConfig {
        endpoint,
        protocol,
        headers: BTreeMap::from([("x-fathom-test".to_string(), "1".to_string())]),
        timeout: Duration::from_secs(3),
        buffer_bytes,
        metrics: true,
    }
}

struct Running {
    tx: mpsc::Sender<Batch>,
    stats: Arc<ExporterStats>,
    task: tokio::task::JoinHandle<()>,
}

fn start_exporter(config: &OtlpExporterConfig, shutdown_deadline: Duration) -> Running {
    let exporter = OtlpExporter::new(config).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let stats = Stats::default().exporter("otlp");
    let task = tokio::spawn(exporter.run(rx, stats.clone(), shutdown_deadline));
    Running { tx, stats, task }
}

impl Running {
    async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stats.buffered_items.get() > 0 {
            assert!(
                Instant::now() < deadline,
                "exporter still holds {} items after {timeout:?}",
                self.stats.buffered_items.get()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self, timeout: Duration) -> Arc<ExporterStats> {
        drop(self.tx);
        tokio::time::timeout(timeout, self.task)
            .await
            .expect("exporter did not finish")
            .unwrap();
        self.stats
    }
}

fn rotel_or_skip(test: &str) -> Option<std::path::PathBuf> {
    require_found(test, "rotel-agent (pip package rotel)", rotel_agent_path())
}

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

async fn spans_arrive_in_rotel(protocol: OtlpProtocol) {
    let Some(rotel_bin) = rotel_or_skip("spans_arrive_in_rotel") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rotel = Rotel::start(
        &rotel_bin,
        local(free_port()),
        local(free_port()),
        dir.path(),
    );
    let endpoint = match protocol {
        OtlpProtocol::Grpc => format!("http://{}", rotel.grpc),
        OtlpProtocol::HttpProtobuf => format!("http://{}/", rotel.http),
    };
    let exporter = start_exporter(
        &exporter_config(endpoint, protocol, 1 << 20),
        Duration::from_secs(10),
    );

    let mut checkout = numbered_span(1);
    checkout.name = "POST /checkout".into();
    checkout.attributes = vec![
        str_kv("http.request.method", "POST"),
        kv("http.response.status_code", Value::IntValue(201)),
        kv("retry", Value::BoolValue(true)),
        kv("ratio", Value::DoubleValue(0.25)),
        str_kv("quote", "say \"hi\""),
    ];
    let mut child = numbered_span(2);
    child.trace_id = trace_id(1);
    child.parent_span_id = span_id(1);
    child.name = "SELECT orders".into();
    child.kind = SpanKind::Client as i32;
    let other = numbered_span(3);
    let request = ExportTraceServiceRequest {
        resource_spans: vec![
            resource_spans("shop", vec![checkout, child]),
            resource_spans("billing", vec![other]),
        ],
    };
    exporter
        .tx
        .send(Batch::Spans(Arc::new(request)))
        .await
        .unwrap();
    exporter.wait_drained(Duration::from_secs(20)).await;
    let stats = exporter.finish(Duration::from_secs(10)).await;
    let spans = rotel.wait_for_spans(3, Duration::from_secs(10));
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(
        (stats.sent.get(), stats.dropped.get()),
        (3, 0),
        "{protocol:?}"
    );

    let by_name: BTreeMap<&str, &RotelSpan> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let c = by_name["POST /checkout"];
    assert_eq!(c.trace_id, hex(&trace_id(1)));
    assert_eq!(c.span_id, hex(&span_id(1)));
    assert_eq!(c.kind, "SPAN_KIND_SERVER");
    assert_eq!(c.attributes["http.request.method"], "Str(POST)");
    assert_eq!(c.attributes["http.response.status_code"], "Int(201)");
    assert_eq!(c.attributes["retry"], "Bool(true)");
    assert_eq!(c.attributes["ratio"], "Double(0.25)");
    assert_eq!(c.attributes["quote"], "Str(say \"hi\")");
    assert_eq!(c.resource["service.name"], "Str(shop)");
    assert_eq!(c.resource["host.name"], "Str(shop-host)");

    let q = by_name["SELECT orders"];
    assert_eq!(q.trace_id, hex(&trace_id(1)));
    assert_eq!(q.span_id, hex(&span_id(2)));
    assert_eq!(q.parent_id, hex(&span_id(1)));
    assert_eq!(q.kind, "SPAN_KIND_CLIENT");
    assert_eq!(q.resource["service.name"], "Str(shop)");

    // The second resource keeps its own identity.
    let b = by_name["op-3"];
    assert_eq!(b.resource["service.name"], "Str(billing)");
    assert_eq!(b.attributes["seq"], "Int(3)");
    drop(rotel.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_spans_arrive_in_rotel_with_ids_and_attributes() {
    spans_arrive_in_rotel(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_spans_arrive_in_rotel_with_ids_and_attributes() {
    spans_arrive_in_rotel(OtlpProtocol::HttpProtobuf).await;
}

/// Feeds numbered spans every `every` until `stop` says so; returns how many.
fn feed(
    tx: mpsc::Sender<Batch>,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut seq = 0;
        let mut tick = tokio::time::interval(every);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            tx.send(numbered_request(seq)).await.unwrap();
            seq += 1;
        }
        seq
    })
}

fn assert_exactly_once(spans: &[RotelSpan]) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    let mut duplicates = Vec::new();
    for s in spans {
        let seq = seq_of(s);
        assert_eq!(s.span_id, hex(&span_id(seq)), "span id of {seq}");
        if !seen.insert(seq) {
            duplicates.push(seq);
        }
    }
    assert!(
        duplicates.is_empty(),
        "spans delivered twice: {duplicates:?}"
    );
    seen
}

/// Spans flow continuously; rotel is stopped for 30 s and restarted on the
/// same port: every span arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_delivers_every_span_exactly_once_across_a_30s_outage() {
    let Some(rotel_bin) =
        rotel_or_skip("otlp_exporter_delivers_every_span_exactly_once_across_a_30s_outage")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (local(free_port()), local(free_port()));
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    let exporter = start_exporter(
        &exporter_config(format!("http://{grpc}"), OtlpProtocol::Grpc, 64 << 20),
        Duration::from_secs(90),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = feed(exporter.tx.clone(), Duration::from_millis(5), stop.clone());

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rotel.stop();
    assert!(!before.is_empty(), "nothing arrived before the outage");
    let buffered_at_stop = exporter.stats.buffered_items.get();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = exporter.stats.buffered_items.get();
    assert!(
        during > buffered_at_stop + 1000,
        "spans kept coming and were buffered during the outage ({buffered_at_stop} → {during})"
    );
    assert!(exporter.stats.failed_attempts.get() > 0);
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = feeder.await.unwrap();
    exporter.wait_drained(Duration::from_secs(60)).await;
    let stats = exporter.finish(Duration::from_secs(10)).await;
    let after = rotel.stop();

    let all: Vec<RotelSpan> = before.iter().chain(&after).cloned().collect();
    let seen = assert_exactly_once(&all);
    let missing: Vec<u64> = (0..sent).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {sent} spans never arrived: {missing:?}",
        missing.len()
    );
    assert_eq!(seen.len() as u64, sent);
    assert_eq!((stats.sent.get(), stats.dropped.get()), (sent, 0));
    eprintln!(
        "outage: {sent} spans sent, {} before the stop, {} after the restart, {} buffered at most, {} failed attempts",
        before.len(),
        after.len(),
        during,
        stats.failed_attempts.get()
    );
}

/// An OTLP gRPC trace receiver (tonic's server, opentelemetry-proto's
/// service) that answers each call with the next of its scripted statuses
/// (then OK), and records when each call came and how many spans it held.
#[derive(Clone)]
struct Scripted {
    script: Arc<std::sync::Mutex<std::collections::VecDeque<tonic::Status>>>,
    calls: Arc<std::sync::Mutex<Vec<(Instant, usize)>>>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Scripted
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let spans = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.calls.lock().unwrap().push((Instant::now(), spans));
        match self.script.lock().unwrap().pop_front() {
            Some(status) => Err(status),
            None => Ok(tonic::Response::new(Default::default())),
        }
    }
}

impl Scripted {
    /// Serves `script` on a free port of 127.0.0.1 until the runtime ends.
    async fn serve(script: Vec<tonic::Status>) -> (Self, std::net::SocketAddr) {
        let me = Self {
            script: Arc::new(std::sync::Mutex::new(script.into())),
            calls: Arc::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(me.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (me, addr)
    }

    /// Waits (up to 10 s) for `n` calls; their times and span counts.
    async fn calls(&self, n: usize) -> Vec<(Instant, usize)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let calls = self.calls.lock().unwrap().clone();
            if calls.len() >= n || Instant::now() > deadline {
                return calls;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A status with a `google.rpc.RetryInfo` detail of `delay`.
fn with_retry_info(code: tonic::Code, message: &str, delay: Duration) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    tonic::Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(delay)))
}

/// The OTLP exporter against a real tonic server answering the OTLP
/// specification's throttling cases: `RESOURCE_EXHAUSTED` with a
/// `RetryInfo` of 2 s is retried after 2 s (and the span delivered once);
/// `RESOURCE_EXHAUSTED` without one is not retried (the span dropped and
/// counted, the next one delivered); `UNAVAILABLE` with a `RetryInfo` of
/// 1.5 s waits 1.5 s; `UNAVAILABLE` without one is retried after the
/// backoff's first delay (50-100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_honours_retry_info_and_drops_resource_exhausted_without_it() {
    use tonic::Code;
    // (what, the statuses before OK, spans sent, calls expected, the gap
    // between the first two calls within, (sent, dropped))
    type Case = (
        &'static str,
        Vec<tonic::Status>,
        u64,
        usize,
        Option<(Duration, Duration)>,
        (u64, u64),
    );
    let secs = Duration::from_secs_f64;
    let cases: Vec<Case> = vec![
        (
            "RESOURCE_EXHAUSTED with RetryInfo 2 s",
            vec![with_retry_info(
                Code::ResourceExhausted,
                "queue full",
                secs(2.0),
            )],
            1,
            2,
            Some((secs(2.0), secs(2.9))),
            (1, 0),
        ),
        (
            "RESOURCE_EXHAUSTED without RetryInfo",
            vec![tonic::Status::resource_exhausted("message too large")],
            2,
            2,
            None,
            (1, 1),
        ),
        (
            "UNAVAILABLE with RetryInfo 1.5 s",
            vec![with_retry_info(Code::Unavailable, "busy", secs(1.5))],
            1,
            2,
            Some((secs(1.5), secs(2.4))),
            (1, 0),
        ),
        (
            "UNAVAILABLE without RetryInfo",
            vec![tonic::Status::unavailable("restarting")],
            1,
            2,
            Some((secs(0.04), secs(0.9))),
            (1, 0),
        ),
    ];
    // Every case runs; the mismatches are reported together.
    let mut failures = Vec::new();
    for (what, script, spans, want_calls, gap, (want_sent, want_dropped)) in cases {
        let (server, addr) = Scripted::serve(script).await;
        let exporter = start_exporter(
            &exporter_config(format!("http://{addr}"), OtlpProtocol::Grpc, 1 << 20),
            Duration::from_secs(10),
        );
        exporter.tx.send(numbered_request(1)).await.unwrap();
        if spans == 2 {
            // The second span after the first attempt's answer: sent alone.
            server.calls(1).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            exporter.tx.send(numbered_request(2)).await.unwrap();
        }
        let calls = server.calls(want_calls).await;
        exporter.wait_drained(Duration::from_secs(10)).await;
        let stats = exporter.finish(Duration::from_secs(10)).await;
        let calls_after = server.calls.lock().unwrap().clone();
        let gap_seen = calls.get(1).map(|c| c.0 - calls[0].0);
        eprintln!(
            "{what}: {} calls {:?}, gap {gap_seen:?}, sent {} dropped {} failed attempts {}",
            calls_after.len(),
            calls_after.iter().map(|c| c.1).collect::<Vec<_>>(),
            stats.sent.get(),
            stats.dropped.get(),
            stats.failed_attempts.get()
        );
        let mut expect = |ok: bool, msg: String| {
            if !ok {
                failures.push(format!("{what}: {msg}"));
            }
        };
        expect(
            calls_after.len() == want_calls,
            format!("{} calls, not {want_calls}", calls_after.len()),
        );
        expect(
            (stats.sent.get(), stats.dropped.get()) == (want_sent, want_dropped),
            format!(
                "sent {} dropped {}, not {want_sent} and {want_dropped}",
                stats.sent.get(),
                stats.dropped.get()
            ),
        );
        expect(
            stats.failed_attempts.get() == 1,
            format!("{} failed attempts, not 1", stats.failed_attempts.get()),
        );
        if let Some((lo, hi)) = gap {
            expect(
                gap_seen.is_some_and(|g| g >= lo && g <= hi),
                format!("retried after {gap_seen:?}, not within {lo:?}..{hi:?}"),
            );
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// With a tiny buffer an outage loses the oldest spans, and exactly those are
/// counted: delivered + dropped == sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_counts_drops_exactly_with_a_tiny_buffer() {
    let Some(rotel_bin) = rotel_or_skip("otlp_exporter_counts_drops_exactly_with_a_tiny_buffer")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (local(free_port()), local(free_port()));
    let one = prost::Message::encoded_len(match &numbered_request(100) {
        Batch::Spans(r) => r.as_ref(),
        _ => unreachable!(),
    }) as u64;
    // Room for about 20 spans.
    let exporter = start_exporter(
        &exporter_config(
            format!("http://{http}"),
            OtlpProtocol::HttpProtobuf,
            one * 20,
        ),
        Duration::from_secs(60),
    );
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    for seq in 0..100 {
        exporter.tx.send(numbered_request(seq)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    exporter.wait_drained(Duration::from_secs(20)).await;
    let before = rotel.stop();
    assert_eq!(
        exporter.stats.dropped.get(),
        0,
        "nothing lost while rotel was up"
    );
    for seq in 100..400 {
        exporter.tx.send(numbered_request(seq)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(exporter.stats.buffered_items.get() <= 21);
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    exporter.wait_drained(Duration::from_secs(40)).await;
    let stats = exporter.finish(Duration::from_secs(10)).await;
    let after = rotel.stop();

    let all: Vec<RotelSpan> = before.iter().chain(&after).cloned().collect();
    let seen = assert_exactly_once(&all);
    assert!(
        (0..100).all(|s| seen.contains(&s)),
        "spans sent while rotel was up arrived"
    );
    let delivered = seen.len() as u64;
    let dropped = stats.dropped.get();
    assert!(
        dropped >= 250,
        "a 20-span buffer over 300 spans drops most: {dropped}"
    );
    assert_eq!(
        delivered + dropped,
        400,
        "delivered {delivered} + dropped {dropped}"
    );
    assert_eq!(stats.sent.get(), delivered);
    // The oldest go first: what survived the outage is its newest spans.
    let survivors: Vec<u64> = seen.iter().copied().filter(|s| *s >= 100).collect();
    let first = survivors.first().copied().unwrap_or(400);
    assert!(
        survivors.iter().copied().eq(first..400),
        "survivors are the newest, contiguous: {survivors:?}"
    );
}

// ---------------------------------------------------------------- Prometheus

mod prom {
    use fathom_collector::exporters::prometheus::{self, PromRegistry};
    use opentelemetry_proto::tonic::{
        collector::metrics::v1::ExportMetricsServiceRequest,
        metrics::v1::{
            AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
            ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
        },
    };

    use super::*;

    fn number(v: f64, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attrs,
            time_unix_nano: 1,
            value: Some(number_data_point::Value::AsDouble(v)),
            ..NumberDataPoint::default()
        }
    }

    fn metrics(counter: f64) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        str_kv("service.name", "shop"),
                        str_kv("service.instance.id", "pod-1"),
                    ],
                    ..Resource::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![
                        Metric {
                            name: "http.server.requests".into(),
                            description: "Requests served.".into(),
                            data: Some(Data::Sum(Sum {
                                data_points: vec![number(
                                    counter,
                                    vec![str_kv("http.route", "/a")],
                                )],
                                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                                is_monotonic: true,
                            })),
                            ..Metric::default()
                        },
                        Metric {
                            name: "queue.depth".into(),
                            data: Some(Data::Gauge(Gauge {
                                data_points: vec![number(17.5, vec![str_kv("queue", "q \"1\"")])],
                            })),
                            ..Metric::default()
                        },
                        Metric {
                            name: "http.server.request.duration".into(),
                            unit: "s".into(),
                            data: Some(Data::Histogram(Histogram {
                                data_points: vec![HistogramDataPoint {
                                    attributes: vec![str_kv("http.route", "/a")],
                                    count: 100,
                                    sum: Some(80.0),
                                    bucket_counts: vec![10, 20, 30, 40],
                                    explicit_bounds: vec![0.1, 0.5, 1.0],
                                    ..HistogramDataPoint::default()
                                }],
                                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            })),
                            ..Metric::default()
                        },
                    ],
                    ..ScopeMetrics::default()
                }],
                ..ResourceMetrics::default()
            }],
        }
    }

    /// Runs a PromQL instant query; the single sample's value, or `None` when
    /// the result is empty.
    async fn query(client: &reqwest::Client, prom: std::net::SocketAddr, q: &str) -> Option<f64> {
        let url = reqwest::Url::parse_with_params(
            &format!("http://{prom}/api/v1/query"),
            &[("query", q)],
        )
        .unwrap();
        let resp = client.get(url).send().await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.ok()?).ok()?;
        assert_eq!(v["status"], "success", "{q}: {v}");
        let result = v["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{q}: {v}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    async fn query_until(client: &reqwest::Client, prom: std::net::SocketAddr, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = query(client, prom, q).await;
            if got.is_some_and(|g| (g - want).abs() < 1e-9) {
                return;
            }
            assert!(Instant::now() < deadline, "{q}: got {got:?}, want {want}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A real Prometheus scrapes `/metrics`; PromQL returns what was fed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prometheus_scrapes_metrics_and_promql_returns_the_fed_values() {
        let Some(prom_bin) = require_found(
            "prometheus_scrapes_metrics_and_promql_returns_the_fed_values",
            "prometheus (Debian package prometheus)",
            Some("/usr/bin/prometheus".into()),
        ) else {
            return;
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = Arc::new(PromRegistry::default());
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(16);
        let sink = tokio::spawn(prometheus::run_sink(
            registry.clone(),
            rx,
            stats.exporter("prometheus"),
        ));
        tx.send(Batch::Metrics(Arc::new(metrics(40.0))))
            .await
            .unwrap();
        tx.send(Batch::Metrics(Arc::new(metrics(42.0))))
            .await
            .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = listener.local_addr().unwrap();
        let app = prometheus::router(registry.clone(), stats.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: fathom\n    honor_labels: true\n    static_configs:\n      - targets: ['{ours}']\n"
            ),
        )
        .unwrap();
        let prom = local(free_port());
        let _prometheus = crate::common::ChildGuard::spawn(
            std::process::Command::new(prom_bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={prom}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        crate::common::wait_for_port(prom, Duration::from_secs(30));
        let client = reqwest::Client::new();

        // The scrape itself succeeded (our exposition parsed).
        query_until(&client, prom, r#"up{job="fathom"}"#, 1.0).await;
        query_until(
            &client,
            prom,
            r#"http_server_requests_total{job="shop",instance="pod-1",http_route="/a"}"#,
            42.0,
        )
        .await;
        query_until(&client, prom, r#"queue_depth{queue="q \"1\""}"#, 17.5).await;
        query_until(
            &client,
            prom,
            "http_server_request_duration_seconds_count",
            100.0,
        )
        .await;
        query_until(
            &client,
            prom,
            "http_server_request_duration_seconds_sum",
            80.0,
        )
        .await;
        query_until(
            &client,
            prom,
            r#"http_server_request_duration_seconds_bucket{le="0.5"}"#,
            30.0,
        )
        .await;
        // Median: rank 50 lies in (0.5, 1] holding ranks 31..60 → 0.5 + 20/30 * 0.5.
        query_until(
            &client,
            prom,
            "histogram_quantile(0.5, http_server_request_duration_seconds_bucket)",
            0.5 + 20.0 / 30.0 * 0.5,
        )
        .await;
        query_until(
            &client,
            prom,
            r#"fathom_collector_exporter_sent_total{exporter="prometheus"}"#,
            6.0,
        )
        .await;

        // Prometheus reports no scrape error for the target.
        let targets: serde_json::Value = serde_json::from_slice(
            &client
                .get(format!("http://{prom}/api/v1/targets"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        let active = &targets["data"]["activeTargets"][0];
        assert_eq!(active["health"], "up", "{targets}");
        assert_eq!(active["lastError"], "", "{targets}");

        drop(tx);
        sink.await.unwrap();
        server.abort();
    }
}

// ----------------------------------------------------------------- Pyroscope

mod pyro {
    use std::{io::Read as _, path::Path, process::Command, sync::Mutex};

    use axum::{body::Bytes, http::HeaderMap, http::StatusCode, routing::post};
    use fathom_collector::{
        config::{BasicAuth, PyroscopeConfig},
        exporters::pyroscope::PyroscopeExporter,
        model::{MergedProfile, SeriesLabels},
    };
    use pprof::protos::{
        Function, Line, Location, Mapping, Message as _, Profile, Sample, ValueType,
    };

    use super::*;

    /// What the test server received.
    #[derive(Clone, Debug)]
    struct Received {
        path: String,
        headers: HeaderMap,
        body: Vec<u8>,
        answered: u16,
    }

    #[derive(Clone, Default)]
    struct Recorder {
        requests: Arc<Mutex<Vec<Received>>>,
        /// Statuses to answer, in order; 200 once used up.
        script: Arc<Mutex<std::collections::VecDeque<u16>>>,
    }

    async fn serve(recorder: Recorder) -> std::net::SocketAddr {
        let app = axum::Router::new()
            .route(
                "/push.v1.PusherService/Push",
                post(
                    |axum::extract::State(r): axum::extract::State<Recorder>,
                     uri: axum::http::Uri,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        let status = r.script.lock().unwrap().pop_front().unwrap_or(200);
                        r.requests.lock().unwrap().push(Received {
                            path: uri.path().to_string(),
                            headers,
                            body: body.to_vec(),
                            answered: status,
                        });
                        let retry_after = if status == 429 { "1" } else { "0" };
                        (
                            StatusCode::from_u16(status).unwrap(),
                            [("retry-after", retry_after)],
                            "{}",
                        )
                    },
                ),
            )
            .with_state(recorder);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// A CPU profile built with the `pprof` crate (not the collector's types):
    /// two stacks of `n` and `2n` samples.
    fn original_profile(n: i64) -> Vec<u8> {
        let strings: Vec<String> = [
            "",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "main",
            "work",
            "idle",
            "app.c",
            "/usr/bin/app",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let function = |id: u64, name: i64| Function {
            id,
            name,
            system_name: name,
            filename: 8,
            start_line: 1,
        };
        let location = |id: u64, function_id: u64, line: i64| Location {
            id,
            mapping_id: 1,
            address: 0x1000 + id * 0x10,
            line: vec![Line { function_id, line }],
            is_folded: false,
        };
        let p = Profile {
            sample_type: vec![ValueType { ty: 1, unit: 2 }, ValueType { ty: 3, unit: 4 }],
            sample: vec![
                Sample {
                    location_id: vec![2, 1],
                    value: vec![n, n * 10_000_000],
                    label: vec![],
                },
                Sample {
                    location_id: vec![3, 1],
                    value: vec![2 * n, 2 * n * 10_000_000],
                    label: vec![],
                },
            ],
            mapping: vec![Mapping {
                id: 1,
                memory_start: 0x1000,
                memory_limit: 0x2000,
                filename: 9,
                has_functions: true,
                has_filenames: true,
                has_line_numbers: true,
                ..Mapping::default()
            }],
            location: vec![location(1, 1, 10), location(2, 2, 20), location(3, 3, 30)],
            function: vec![function(1, 5), function(2, 6), function(3, 7)],
            string_table: strings,
            time_nanos: 1_700_000_000_000_000_000,
            duration_nanos: 15_000_000_000,
            period_type: Some(ValueType { ty: 3, unit: 4 }),
            period: 10_000_000,
            ..Profile::default()
        };
        p.encode_to_vec()
    }

    fn merged(service: &str, pprof_bytes: &[u8]) -> MergedProfile {
        MergedProfile {
            labels: SeriesLabels::new([
                ("__name__", "process_cpu"),
                ("service_name", service),
                ("k8s.pod.name", "pod-1"),
            ])
            .unwrap(),
            window_start: std::time::SystemTime::UNIX_EPOCH,
            window: Duration::from_secs(15),
            inputs: 1,
            profile: fathom_collector::pprof::decode(pprof_bytes).unwrap(),
        }
    }

    fn exporter_config(addr: std::net::SocketAddr, buffer_bytes: u64) -> PyroscopeConfig {
        PyroscopeConfig {
            url: format!("http://{addr}/"),
            org_id: Some("team-a".into()),
            basic_auth: Some(BasicAuth {
                username: "fathom".into(),
                password: "s3cret".into(),
            }),
            bearer_token: None,
            timeout: Duration::from_secs(3),
            buffer_bytes,
        }
    }

    /// A series of a push body, as protoc decoded it.
    #[derive(Debug, Default)]
    struct DecodedSeries {
        labels: Vec<(String, String)>,
        samples: Vec<(Vec<u8>, String)>,
    }

    /// Unescapes a protobuf text-format string literal (without quotes).
    fn unescape(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'\\' {
                out.push(b[i]);
                i += 1;
                continue;
            }
            i += 1;
            match b[i] {
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'a' => out.push(7),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'x' => {
                    let mut j = i + 1;
                    while j < b.len() && j < i + 3 && b[j].is_ascii_hexdigit() {
                        j += 1;
                    }
                    out.push(
                        u8::from_str_radix(std::str::from_utf8(&b[i + 1..j]).unwrap(), 16).unwrap(),
                    );
                    i = j;
                    continue;
                }
                b'0'..=b'7' => {
                    let mut j = i;
                    while j < b.len() && j < i + 3 && (b'0'..=b'7').contains(&b[j]) {
                        j += 1;
                    }
                    out.push(
                        u8::from_str_radix(std::str::from_utf8(&b[i..j]).unwrap(), 8).unwrap(),
                    );
                    i = j;
                    continue;
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    }

    /// Decodes a push body with protoc and the upstream message definitions.
    fn protoc_decode(body: &[u8]) -> Vec<DecodedSeries> {
        let protos = crate::common::fixture("proto");
        let mut child = Command::new("python3")
            .args(["-m", "grpc_tools.protoc", "--decode=push.v1.PushRequest"])
            .arg(format!("-I{}", protos.display()))
            .arg(protos.join("push/v1/push.proto"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), body).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "protoc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let mut series = Vec::new();
        let mut current: Option<DecodedSeries> = None;
        let (mut name, mut raw) = (None::<String>, None::<Vec<u8>>);
        let quoted = |l: &str, field: &str| -> Option<String> {
            l.strip_prefix(field)?
                .strip_prefix(": \"")?
                .strip_suffix('"')
                .map(str::to_string)
        };
        for line in text.lines() {
            let l = line.trim();
            match l {
                "series {" => current = Some(DecodedSeries::default()),
                "labels {" | "samples {" => {}
                "}" if line.starts_with('}') => series.extend(current.take()),
                "}" => {}
                _ => {
                    let s = current.as_mut().expect("field outside a series");
                    if let Some(v) = quoted(l, "name") {
                        name = Some(String::from_utf8(unescape(&v)).unwrap());
                    } else if let Some(v) = quoted(l, "value") {
                        s.labels.push((
                            name.take().unwrap(),
                            String::from_utf8(unescape(&v)).unwrap(),
                        ));
                    } else if let Some(v) = quoted(l, "raw_profile") {
                        raw = Some(unescape(&v));
                    } else if let Some(v) = quoted(l, "ID") {
                        s.samples.push((raw.take().unwrap(), v));
                    } else {
                        panic!("unexpected protoc output line {l:?}");
                    }
                }
            }
        }
        series
    }

    fn gunzip(b: &[u8]) -> Vec<u8> {
        assert_eq!(&b[..2], &[0x1f, 0x8b], "raw_profile is gzipped");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(b)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn go_pprof_raw(dir: &Path, name: &str, bytes: &[u8]) -> String {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = Command::new("go")
            .args(["tool", "pprof", "-raw", "-symbolize=none"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "go tool pprof: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn tools_or_skip(test: &str) -> bool {
        let protoc = Command::new("python3")
            .args(["-m", "grpc_tools.protoc", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        require_found(
            test,
            "protoc (pip package grpcio-tools)",
            protoc.then(|| "/".into()),
        )
        .is_some()
            && require_found(
                test,
                "go (Debian package golang-go)",
                Some("/usr/bin/go".into()),
            )
            .is_some()
    }

    /// The push request, decoded by protoc with the upstream definitions:
    /// path, headers, labels, a UUID, and a gzipped pprof that `go tool
    /// pprof` reads exactly like the profile that went in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pyroscope_push_body_decodes_with_the_upstream_protos() {
        if !tools_or_skip("pyroscope_push_body_decodes_with_the_upstream_protos") {
            return;
        }
        let recorder = Recorder::default();
        let addr = serve(recorder.clone()).await;
        let exporter = PyroscopeExporter::new(&exporter_config(addr, 1 << 20)).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let stats = Stats::default().exporter("pyroscope");
        let task = tokio::spawn(exporter.run(rx, stats.clone(), Duration::from_secs(10)));
        let (a, b) = (original_profile(3), original_profile(7));
        tx.send(Batch::Profiles(Arc::new(vec![
            merged("api", &a),
            merged("worker", &b),
        ])))
        .await
        .unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!((stats.sent.get(), stats.dropped.get()), (2, 0));

        let requests = recorder.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 1, "both profiles in one request");
        let r = &requests[0];
        assert_eq!(r.path, "/push.v1.PusherService/Push");
        assert_eq!(r.headers["content-type"], "application/proto");
        assert_eq!(r.headers["x-scope-orgid"], "team-a");
        // base64("fathom:s3cret")
        assert_eq!(r.headers["authorization"], "Basic ZmF0aG9tOnMzY3JldA==");

        let series = protoc_decode(&r.body);
        assert_eq!(series.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        for (s, (service, original)) in series.iter().zip([("api", &a), ("worker", &b)]) {
            assert_eq!(
                s.labels,
                [
                    ("__name__".to_string(), "process_cpu".to_string()),
                    ("k8s_pod_name".to_string(), "pod-1".to_string()),
                    ("service_name".to_string(), service.to_string()),
                ]
            );
            assert_eq!(s.samples.len(), 1);
            let (raw, id) = &s.samples[0];
            assert_eq!(id.len(), 36, "UUID {id}");
            assert_eq!(id.as_bytes()[14], b'4', "UUID v4 {id}");
            let sent = go_pprof_raw(dir.path(), &format!("{service}.sent.pb"), &gunzip(raw));
            let want = go_pprof_raw(dir.path(), &format!("{service}.orig.pb"), original);
            assert_eq!(sent, want, "go tool pprof -raw differs for {service}");
            assert!(
                want.contains("main") && want.contains("work") && want.contains("idle"),
                "{want}"
            );
        }
        assert!(
            series[0].samples[0].1 != series[1].samples[0].1,
            "fresh ID per sample"
        );
    }

    /// Pyroscope answering 503 (then 429 with Retry-After) loses nothing: every
    /// profile arrives once in an accepted request, retried with its ID.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pyroscope_down_then_up_loses_nothing() {
        if !tools_or_skip("pyroscope_down_then_up_loses_nothing") {
            return;
        }
        let recorder = Recorder::default();
        recorder
            .script
            .lock()
            .unwrap()
            .extend([503, 503, 503, 429, 503]);
        let addr = serve(recorder.clone()).await;
        let exporter = PyroscopeExporter::new(&exporter_config(addr, 1 << 20)).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let stats = Stats::default().exporter("pyroscope");
        let task = tokio::spawn(exporter.run(rx, stats.clone(), Duration::from_secs(60)));
        let profile = original_profile(1);
        for i in 0..6 {
            tx.send(Batch::Profiles(Arc::new(vec![merged(
                &format!("svc-{i}"),
                &profile,
            )])))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((stats.sent.get(), stats.dropped.get()), (6, 0));
        assert_eq!(stats.failed_attempts.get(), 5);

        let requests = recorder.requests.lock().unwrap().clone();
        let mut accepted: Vec<String> = Vec::new();
        let mut ids_failed = BTreeSet::new();
        let mut ids_accepted = BTreeMap::new();
        for r in &requests {
            for s in protoc_decode(&r.body) {
                let service = s
                    .labels
                    .iter()
                    .find(|(n, _)| n == "service_name")
                    .unwrap()
                    .1
                    .clone();
                let id = s.samples[0].1.clone();
                if r.answered == 200 {
                    accepted.push(service.clone());
                    ids_accepted.insert(service, id);
                } else {
                    ids_failed.insert(id);
                }
            }
        }
        accepted.sort();
        let want: Vec<String> = (0..6).map(|i| format!("svc-{i}")).collect();
        assert_eq!(accepted, want, "each profile accepted exactly once");
        assert!(
            ids_failed
                .iter()
                .all(|id| ids_accepted.values().any(|a| a == id)),
            "a retry carries the same sample ID"
        );
    }
}

// ------------------------------------------------------- through the collector

/// End to end: a client sends numbered spans to the collector's OTLP gRPC
/// receiver; the collector forwards them to rotel, which is stopped for 30 s
/// and restarted on the same port. Every span arrives exactly once, and the
/// collector's `/metrics` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_forwards_every_span_exactly_once_across_a_30s_outage() {
    use fathom_collector::{
        Collector, CollectorConfig,
        config::{ListenConfig, StoreConfig},
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;

    let Some(rotel_bin) =
        rotel_or_skip("collector_forwards_every_span_exactly_once_across_a_30s_outage")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (local(free_port()), local(free_port()));
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    let any = || Some(local(0));
    let collector = Collector::start(CollectorConfig {
        listen: ListenConfig {
            otlp_grpc: any(),
            otlp_http: any(),
            http: any(),
        },
        store: StoreConfig {
            enabled: Some(false),
            ..StoreConfig::default()
        },
        otlp: Some(exporter_config(
            format!("http://{grpc}"),
            OtlpProtocol::Grpc,
            64 << 20,
        )),
        ..CollectorConfig::default()
    })
    .await
    .unwrap();
    let addrs = collector.addrs();
    let stats = collector.stats();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_stop = stop.clone();
    let receiver = addrs.otlp_grpc.unwrap();
    let client = tokio::spawn(async move {
        let mut client = TraceServiceClient::connect(format!("http://{receiver}"))
            .await
            .unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let (mut seq, mut refused) = (0u64, 0u64);
        while !client_stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let Batch::Spans(req) = numbered_request(seq) else {
                unreachable!()
            };
            match client.export((*req).clone()).await {
                Ok(_) => seq += 1,
                // Back-pressure: the same span is sent again.
                Err(s) if s.code() == tonic::Code::Unavailable => refused += 1,
                Err(s) => panic!("span {seq}: {s}"),
            }
        }
        (seq, refused)
    });

    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = rotel.stop();
    assert!(!before.is_empty(), "nothing arrived before the outage");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let otlp = stats.exporter("otlp");
    assert!(
        otlp.buffered_items.get() > 1000,
        "spans buffered during the outage: {}",
        otlp.buffered_items.get()
    );
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, refused) = client.await.unwrap();

    // Wait until the collector has handed everything to rotel.
    let deadline = Instant::now() + Duration::from_secs(60);
    while otlp.sent.get() < sent {
        assert!(
            Instant::now() < deadline,
            "collector delivered {} of {sent}",
            otlp.sent.get()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", addrs.http.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "fathom_collector_items_accepted_total{{signal=\"spans\"}} {sent}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fathom_collector_exporter_sent_total{{exporter=\"otlp\"}} {sent}\n"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("fathom_collector_exporter_dropped_total{exporter=\"otlp\"} 0\n"));
    assert!(
        collector.shutdown(Duration::from_secs(20)).await,
        "shutdown in time"
    );
    let after = rotel.stop();

    let all: Vec<RotelSpan> = before.iter().chain(&after).cloned().collect();
    let seen = assert_exactly_once(&all);
    let missing: Vec<u64> = (0..sent).filter(|s| !seen.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "{} of {sent} spans never arrived: {missing:?}",
        missing.len()
    );
    assert_eq!(seen.len() as u64, sent);
    assert_eq!(otlp.dropped.get(), 0);
    eprintln!(
        "collector outage: {sent} spans ({refused} refused and resent by the client), {} before the stop, {} after",
        before.len(),
        after.len()
    );
}
