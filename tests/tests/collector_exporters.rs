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
use fathom_tests::{Rotel, RotelSpan, free_port, require_tool, rotel_agent_path};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, span::SpanKind},
};
use tokio::sync::mpsc;

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

fn exporter_config(endpoint: String, protocol: OtlpProtocol, buffer_bytes: u64) -> OtlpExporterConfig {
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
    require_tool(test, "rotel-agent (pip package rotel)", rotel_agent_path())
}

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

async fn spans_arrive_in_rotel(protocol: OtlpProtocol) {
    let Some(rotel_bin) = rotel_or_skip("spans_arrive_in_rotel") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rotel = Rotel::start(&rotel_bin, local(free_port()), local(free_port()), dir.path());
    let endpoint = match protocol {
        OtlpProtocol::Grpc => format!("http://{}", rotel.grpc),
        OtlpProtocol::HttpProtobuf => format!("http://{}/", rotel.http),
    };
    let exporter = start_exporter(&exporter_config(endpoint, protocol, 1 << 20), Duration::from_secs(10));

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
fn feed(tx: mpsc::Sender<Batch>, every: Duration, stop: Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<u64> {
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
    assert!(duplicates.is_empty(), "spans delivered twice: {duplicates:?}");
    seen
}

/// Spans flow continuously; rotel is stopped for 30 s and restarted on the
/// same port: every span arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_delivers_every_span_exactly_once_across_a_30s_outage() {
    let Some(rotel_bin) = rotel_or_skip("otlp_exporter_delivers_every_span_exactly_once_across_a_30s_outage") else {
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
    assert!(missing.is_empty(), "{} of {sent} spans never arrived: {missing:?}", missing.len());
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

/// With a tiny buffer an outage loses the oldest spans, and exactly those are
/// counted: delivered + dropped == sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exporter_counts_drops_exactly_with_a_tiny_buffer() {
    let Some(rotel_bin) = rotel_or_skip("otlp_exporter_counts_drops_exactly_with_a_tiny_buffer") else {
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
        &exporter_config(format!("http://{http}"), OtlpProtocol::HttpProtobuf, one * 20),
        Duration::from_secs(60),
    );
    let rotel = Rotel::start(&rotel_bin, grpc, http, dir.path());
    for seq in 0..100 {
        exporter.tx.send(numbered_request(seq)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    exporter.wait_drained(Duration::from_secs(20)).await;
    let before = rotel.stop();
    assert_eq!(exporter.stats.dropped.get(), 0, "nothing lost while rotel was up");
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
    assert!((0..100).all(|s| seen.contains(&s)), "spans sent while rotel was up arrived");
    let delivered = seen.len() as u64;
    let dropped = stats.dropped.get();
    assert!(dropped >= 250, "a 20-span buffer over 300 spans drops most: {dropped}");
    assert_eq!(delivered + dropped, 400, "delivered {delivered} + dropped {dropped}");
    assert_eq!(stats.sent.get(), delivered);
    // The oldest go first: what survived the outage is its newest spans.
    let survivors: Vec<u64> = seen.iter().copied().filter(|s| *s >= 100).collect();
    let first = survivors.first().copied().unwrap_or(400);
    assert!(
        survivors.iter().copied().eq(first..400),
        "survivors are the newest, contiguous: {survivors:?}"
    );
}
