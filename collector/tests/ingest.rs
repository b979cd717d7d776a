//! The collector's receivers against independent clients: the OpenTelemetry
//! SDK's OTLP exporters (gRPC and HTTP), raw tonic/HTTP clients for the error
//! paths, and the Pyroscope push protocol. No root needed.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fathom_collector::{
    Collector, CollectorConfig,
    config::{ListenConfig, QueueConfig, StoreConfig, TlsConfig},
    pipeline::{Batch, Sink},
    pprof,
    proto::{
        otlp::{
            collector::trace::v1::{
                ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
            },
            common::v1::any_value,
            trace::v1::{ResourceSpans, ScopeSpans, Span},
        },
        push::{LabelPair, PushRequest, RawProfileSeries, RawSample},
    },
};
use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanKind, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig as _, WithTonicConfig as _};
use prost::Message as _;
use tonic_types::StatusExt as _;

mod common;

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn config() -> CollectorConfig {
    CollectorConfig {
        listen: ListenConfig {
            otlp_grpc: Some(local()),
            otlp_http: Some(local()),
            http: Some(local()),
        },
        store: StoreConfig {
            enabled: Some(false),
            ..StoreConfig::default()
        },
        ..CollectorConfig::default()
    }
}

/// Everything the collector delivered, recorded by a sink of our own.
#[derive(Clone, Default)]
struct Tap(Arc<Mutex<Vec<Batch>>>);

impl Tap {
    fn sink(&self, rt: &tokio::runtime::Runtime) -> Sink {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let seen = self.0.clone();
        rt.spawn(async move {
            while let Some(b) = rx.recv().await {
                seen.lock().unwrap().push(b);
            }
        });
        Sink {
            name: "tap".into(),
            tx,
        }
    }

    fn spans(&self) -> Vec<(HashMap<String, String>, Span)> {
        let mut out = Vec::new();
        for b in self.0.lock().unwrap().iter() {
            if let Batch::Spans(req) = b {
                for rs in &req.resource_spans {
                    let resource = attrs(
                        rs.resource
                            .as_ref()
                            .map(|r| r.attributes.as_slice())
                            .unwrap_or(&[]),
                    );
                    for ss in &rs.scope_spans {
                        for s in &ss.spans {
                            out.push((resource.clone(), s.clone()));
                        }
                    }
                }
            }
        }
        out
    }

    fn wait_spans(&self, n: usize, timeout: Duration) -> Vec<(HashMap<String, String>, Span)> {
        let end = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > end {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Emits `n` spans through the OpenTelemetry SDK with the given exporter.
fn emit_spans<E: opentelemetry_sdk::trace::SpanExporter + 'static>(
    exporter: E,
    service: &str,
    n: usize,
) {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("fathom-test");
    for i in 0..n {
        let mut span = tracer
            .span_builder("GET /items/{id}")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.response.status_code", 200),
                KeyValue::new("test.seq", i as i64),
            ])
            .start(&tracer);
        span.end();
    }
    provider.force_flush().unwrap();
    let _ = provider.shutdown();
}

#[test]
fn otel_sdk_spans_arrive_over_grpc_and_http() {
    let rt = runtime();
    let tap = Tap::default();
    let collector = rt
        .block_on(Collector::start_with_sinks(config(), vec![tap.sink(&rt)]))
        .unwrap();
    let addrs = collector.addrs();

    // gRPC: tonic needs the runtime's reactor.
    {
        let _enter = rt.enter();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://{}", addrs.otlp_grpc.unwrap()))
            .build()
            .unwrap();
        emit_spans(exporter, "svc-grpc", 25);
    }
    // HTTP/protobuf with the blocking reqwest client (outside the runtime).
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("http://{}/v1/traces", addrs.otlp_http.unwrap()))
        .build()
        .unwrap();
    emit_spans(exporter, "svc-http", 25);

    let spans = tap.wait_spans(50, Duration::from_secs(10));
    assert_eq!(spans.len(), 50);
    for service in ["svc-grpc", "svc-http"] {
        let mut seqs: Vec<i64> = spans
            .iter()
            .filter(|(r, _)| r.get("service.name").map(String::as_str) == Some(service))
            .map(|(_, s)| {
                let a = attrs(&s.attributes);
                assert_eq!(s.name, "GET /items/{id}");
                assert_eq!(s.kind, 2, "SPAN_KIND_SERVER");
                assert_eq!(a["http.request.method"], "GET");
                assert_eq!(a["http.response.status_code"], "200");
                assert_eq!(s.trace_id.len(), 16);
                a["test.seq"].parse().unwrap()
            })
            .collect();
        seqs.sort();
        assert_eq!(seqs, (0..25).collect::<Vec<_>>(), "{service}");
    }
    assert_eq!(collector.stats().spans.accepted.get(), 50);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

#[test]
fn otel_sdk_metrics_arrive() {
    let rt = runtime();
    let tap = Tap::default();
    let collector = rt
        .block_on(Collector::start_with_sinks(config(), vec![tap.sink(&rt)]))
        .unwrap();
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!(
            "http://{}/v1/metrics",
            collector.addrs().otlp_http.unwrap()
        ))
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .build();
    let meter = opentelemetry::metrics::MeterProvider::meter(&provider, "fathom-test");
    let counter = meter.u64_counter("requests").build();
    counter.add(7, &[KeyValue::new("route", "/a")]);
    counter.add(5, &[KeyValue::new("route", "/a")]);
    provider.force_flush().unwrap();
    let _ = provider.shutdown();
    let end = Instant::now() + Duration::from_secs(10);
    let value = loop {
        let found = tap.0.lock().unwrap().iter().find_map(|b| match b {
            Batch::Metrics(req) => req
                .resource_metrics
                .iter()
                .flat_map(|r| &r.scope_metrics)
                .flat_map(|s| &s.metrics)
                .find(|m| m.name == "requests")
                .and_then(|m| match &m.data {
                    Some(opentelemetry_proto::tonic::metrics::v1::metric::Data::Sum(s)) => {
                        s.data_points.first().map(|p| format!("{:?}", p.value))
                    }
                    _ => None,
                }),
            _ => None,
        });
        if found.is_some() || Instant::now() > end {
            break found;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value.as_deref(), Some("Some(AsInt(12))"));
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

fn one_span_request(trace_id: Vec<u8>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id,
                    span_id: vec![1; 8],
                    name: "x".into(),
                    ..Span::default()
                }],
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

#[test]
fn bearer_token_is_enforced_on_every_ingest_endpoint() {
    let rt = runtime();
    let tap = Tap::default();
    let mut c = config();
    c.auth.bearer_token = Some("s3cret".into());
    let collector = rt
        .block_on(Collector::start_with_sinks(c, vec![tap.sink(&rt)]))
        .unwrap();
    let addrs = collector.addrs();
    let body = one_span_request(vec![7; 16]).encode_to_vec();
    let http = reqwest::blocking::Client::new();
    let post = |token: Option<&str>| {
        let mut r = http
            .post(format!("http://{}/v1/traces", addrs.otlp_http.unwrap()))
            .header("content-type", "application/x-protobuf")
            .body(body.clone());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("wrong")), 401);
    assert_eq!(post(Some("s3cret")), 200);
    let push = http
        .post(format!(
            "http://{}/push.v1.PusherService/Push",
            addrs.http.unwrap()
        ))
        .header("content-type", "application/proto")
        .body(PushRequest::default().encode_to_vec())
        .send()
        .unwrap();
    assert_eq!(push.status().as_u16(), 401);
    let grpc = rt.block_on(async {
        let mut client =
            TraceServiceClient::connect(format!("http://{}", addrs.otlp_grpc.unwrap()))
                .await
                .unwrap();
        let denied = client
            .export(one_span_request(vec![7; 16]))
            .await
            .unwrap_err();
        let mut req = tonic::Request::new(one_span_request(vec![8; 16]));
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        (denied.code(), client.export(req).await.is_ok())
    });
    assert_eq!(grpc, (tonic::Code::Unauthenticated, true));
    assert_eq!(tap.wait_spans(2, Duration::from_secs(5)).len(), 2);
    assert_eq!(collector.stats().spans.unauthenticated.get(), 3);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

#[test]
fn malformed_input_is_refused_with_the_reason() {
    let rt = runtime();
    let collector = rt.block_on(Collector::start(config())).unwrap();
    let addrs = collector.addrs();
    let http = reqwest::blocking::Client::new();
    // OTLP HTTP: garbage protobuf → 400 + google.rpc.Status.
    let r = http
        .post(format!("http://{}/v1/traces", addrs.otlp_http.unwrap()))
        .header("content-type", "application/x-protobuf")
        .body(vec![0xff, 0xff, 0xff])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // JSON with a short trace id → 400 naming the field.
    let r = http
        .post(format!("http://{}/v1/traces", addrs.otlp_http.unwrap()))
        .header("content-type", "application/json")
        .body(r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"5b8e","spanId":"eee19b7ec3c1b174","name":"x"}]}]}]}"#)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().unwrap();
    assert!(text.contains("trace_id must be 16 bytes"), "{text}");
    // gRPC: INVALID_ARGUMENT with the reason.
    let status = rt.block_on(async {
        let mut client =
            TraceServiceClient::connect(format!("http://{}", addrs.otlp_grpc.unwrap()))
                .await
                .unwrap();
        client
            .export(one_span_request(vec![0; 16]))
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("trace_id"),
        "{}",
        status.message()
    );
    // gRPC: bytes that are not an ExportTraceServiceRequest (nor gzip) →
    // INVALID_ARGUMENT (tonic's own codec says INTERNAL), counted.
    let grpc = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (compressed, payload) in [(0u8, &[0xffu8, 0xff, 0xff][..]), (1, b"not gzip")] {
        let mut frame = vec![compressed];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        let r = grpc
            .post(format!(
                "http://{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                addrs.otlp_grpc.unwrap()
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-encoding", "gzip")
            .body(frame)
            .send()
            .unwrap();
        let status = r
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string());
        let message = r
            .headers()
            .get("grpc-message")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(status.as_deref(), Some("3"), "{message:?}");
    }
    // Push: a sample that is not pprof → 400 naming series and sample.
    let req = PushRequest {
        series: vec![api_series(b"\x1f\x8bjunk".to_vec(), "")],
    };
    let r = http
        .post(format!(
            "http://{}/push.v1.PusherService/Push",
            addrs.http.unwrap()
        ))
        .header("content-type", "application/proto")
        .body(req.encode_to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(body["code"], "invalid_argument");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("series[0].samples[0]: gzip"),
        "{body}"
    );
    assert_eq!(collector.stats().spans.invalid_requests.get(), 5);
    assert_eq!(collector.stats().profiles.invalid_requests.get(), 1);
    assert_eq!(collector.stats().spans.accepted.get(), 0);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

/// A request over `max_request_bytes` is refused in its protocol's own error
/// format and counted as invalid: OTLP gRPC (tonic's client, traces and
/// metrics, plain and gzip that only decompresses over the limit) gets
/// `RESOURCE_EXHAUSTED` naming the limit, as grpc-go servers answer, and no
/// `RetryInfo` (not retried); the legacy `/ingest` a plain-text 413 naming it, the shape of its 400s.
#[test]
fn oversize_requests_are_refused_in_the_protocols_format_and_counted() {
    use fathom_collector::proto::otlp::{
        collector::metrics::v1::{
            ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
        },
        metrics::v1::{Metric, ResourceMetrics, ScopeMetrics},
    };
    let rt = runtime();
    let mut c = config();
    c.queues.max_request_bytes = 1 << 20;
    let collector = rt
        .block_on(Collector::start_with_sinks(
            c,
            vec![Tap::default().sink(&rt)],
        ))
        .unwrap();
    let addrs = collector.addrs();
    let big_name = "a".repeat(2 << 20);
    let mut big_span = one_span_request(vec![7; 16]);
    big_span.resource_spans[0].scope_spans[0].spans[0].name = big_name.clone();
    let big_metric = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: big_name.clone(),
                    ..Metric::default()
                }],
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    };
    let grpc = format!("http://{}", addrs.otlp_grpc.unwrap());
    let statuses = rt.block_on(async {
        let mut out = Vec::new();
        for gzip in [false, true] {
            let mut traces = TraceServiceClient::connect(grpc.clone()).await.unwrap();
            let mut metrics = MetricsServiceClient::connect(grpc.clone()).await.unwrap();
            if gzip {
                traces = traces.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                metrics = metrics.send_compressed(tonic::codec::CompressionEncoding::Gzip);
            }
            out.push((
                "traces",
                gzip,
                traces.export(big_span.clone()).await.unwrap_err(),
            ));
            out.push((
                "metrics",
                gzip,
                metrics.export(big_metric.clone()).await.unwrap_err(),
            ));
        }
        // A request under the limit still goes through on the same port.
        let mut traces = TraceServiceClient::connect(grpc.clone()).await.unwrap();
        traces.export(one_span_request(vec![8; 16])).await.unwrap();
        out
    });
    for (signal, gzip, status) in &statuses {
        eprintln!(
            "{signal} gzip={gzip}: {:?} {:?}",
            status.code(),
            status.message()
        );
        assert_eq!(
            status.code(),
            tonic::Code::ResourceExhausted,
            "{signal} gzip={gzip}: {status:?}"
        );
        assert!(
            status.message().contains("1048576"),
            "{signal} gzip={gzip}: {status:?}"
        );
        // Not retryable: OTLP clients retry RESOURCE_EXHAUSTED only with a
        // RetryInfo detail (the queue-full answer's).
        assert!(
            status.details().is_empty() && status.get_details_retry_info().is_none(),
            "{signal} gzip={gzip}: {status:?}"
        );
    }
    let stats = collector.stats();
    assert_eq!(stats.spans.invalid_requests.get(), 2);
    assert_eq!(stats.metrics.invalid_requests.get(), 2);
    assert_eq!(stats.spans.accepted.get(), 1);

    // /ingest: 413 in the plain text its 400s use, naming the limit.
    let http = reqwest::blocking::Client::new();
    let ingest = |query: &str, body: Vec<u8>| {
        let r = http
            .post(format!("http://{}/ingest?{query}", addrs.http.unwrap()))
            .body(body)
            .send()
            .unwrap();
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        (r.status().as_u16(), ct, r.text().unwrap())
    };
    let (status, ct_400, text_400) = ingest("format=folded", b"a;b 1\n".to_vec());
    assert_eq!(status, 400, "{text_400}");
    let mut folded = Vec::new();
    while folded.len() <= 2 << 20 {
        folded.extend_from_slice(b"main;work;spin 1\n");
    }
    let (status, ct, text) = ingest("name=app.cpu&format=folded", folded);
    eprintln!("/ingest: {status} {ct} {text:?}");
    assert_eq!(status, 413, "{text}");
    assert_eq!(ct, ct_400);
    assert!(ct.starts_with("text/plain"), "{ct}");
    assert_eq!(
        text,
        "request body larger than 1048576 bytes (queues.max_request_bytes)\n"
    );
    assert!(
        text_400.ends_with('\n') && !text_400.starts_with('{'),
        "{text_400}"
    );
    assert_eq!(stats.profiles.invalid_requests.get(), 2);
    let metrics = reqwest::blocking::get(format!("http://{}/metrics", addrs.http.unwrap()))
        .unwrap()
        .text()
        .unwrap();
    for (signal, n) in [("profiles", 2), ("spans", 2), ("metrics", 2)] {
        let line = format!("fathom_collector_requests_invalid_total{{signal=\"{signal}\"}} {n}");
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

/// One `process_cpu{service_name="api"}` series with one sample.
fn api_series(raw_profile: Vec<u8>, id: &str) -> RawProfileSeries {
    RawProfileSeries {
        labels: vec![
            LabelPair {
                name: "__name__".into(),
                value: "process_cpu".into(),
            },
            LabelPair {
                name: "service_name".into(),
                value: "api".into(),
            },
        ],
        samples: vec![RawSample {
            raw_profile,
            id: id.into(),
        }],
    }
}

/// A small CPU profile shaped as the agent writes it: `function` called by
/// `main`, `count` samples.
fn agent_profile(function: &str, count: i64) -> Vec<u8> {
    let frame = |address: u64, name: &str| common::Frame {
        address,
        function: name.into(),
        system_name: name.into(),
        file: "api.c".into(),
        line: 10,
    };
    common::CpuProfile {
        frequency_hz: 99,
        duration: Duration::from_secs(1),
        mapping_file: "/usr/bin/api".into(),
        build_id: "abcd".into(),
        memory_start: 0x1000,
        memory_limit: 0x9000,
        frames: vec![
            frame(0x1100 + function.len() as u64, function),
            frame(0x1000, "main"),
        ],
        samples: vec![(vec![0, 1], count)],
    }
    .gzip()
}

#[test]
fn push_merges_per_window_acknowledges_retries_once_and_flushes_at_shutdown() {
    let rt = runtime();
    let tap = Tap::default();
    let mut c = config();
    c.aggregation.window = Duration::from_secs(3600);
    let collector = rt
        .block_on(Collector::start_with_sinks(c, vec![tap.sink(&rt)]))
        .unwrap();
    let url = format!(
        "http://{}/push.v1.PusherService/Push",
        collector.addrs().http.unwrap()
    );
    let series =
        |id: &str, function: &str, count: i64| api_series(agent_profile(function, count), id);
    let http = reqwest::blocking::Client::new();
    let send = |req: PushRequest| {
        http.post(&url)
            .header("content-type", "application/proto")
            .body(req.encode_to_vec())
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        send(PushRequest {
            series: vec![series("a", "work", 3)]
        }),
        200
    );
    // The same sample retried (same ID): acknowledged, not counted twice.
    assert_eq!(
        send(PushRequest {
            series: vec![series("a", "work", 3)]
        }),
        200
    );
    assert_eq!(
        send(PushRequest {
            series: vec![series("b", "work", 4), series("c", "idle", 1)]
        }),
        200
    );
    assert_eq!(collector.stats().profiles.accepted.get(), 3);
    // The hour-long window is still open: shutdown must flush it.
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
    // Our tap reads its channel in its own task: give it a moment.
    let end = Instant::now() + Duration::from_secs(5);
    while !tap
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|b| matches!(b, Batch::Profiles(_)))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let batches = tap.0.lock().unwrap().clone();
    let merged: Vec<_> = batches
        .iter()
        .filter_map(|b| match b {
            Batch::Profiles(p) => Some(p.clone()),
            _ => None,
        })
        .flat_map(|v| v.as_ref().clone())
        .collect();
    assert_eq!(merged.len(), 1);
    assert_eq!(merged[0].inputs, 3);
    assert_eq!(
        merged[0].labels.selector(),
        r#"process_cpu{service_name="api"}"#
    );
    let folded = pprof::folded(&merged[0].profile, 0);
    let get = |leaf: &str| {
        folded
            .iter()
            .find(|(s, _)| s.ends_with(leaf))
            .map(|(_, v)| *v)
    };
    assert_eq!((get("work"), get("idle")), (Some(7), Some(1)), "{folded:?}");
}

#[test]
fn full_queues_push_back_to_clients_and_nothing_accepted_is_lost() {
    let rt = runtime();
    let mut c = config();
    c.queues = QueueConfig {
        spans: 1,
        sink: 1,
        ..QueueConfig::default()
    };
    c.aggregation.span_batch_size = 1;
    // A sink that does not read until told to: everything backs up.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(1);
    let collector = rt
        .block_on(Collector::start_with_sinks(
            c,
            vec![Sink {
                name: "slow".into(),
                tx,
            }],
        ))
        .unwrap();
    let addrs = collector.addrs();
    let http = reqwest::blocking::Client::new();
    let mut codes = Vec::new();
    let mut retry_after = None;
    for i in 0..20u8 {
        let r = http
            .post(format!("http://{}/v1/traces", addrs.otlp_http.unwrap()))
            .header("content-type", "application/x-protobuf")
            .body(one_span_request(vec![i + 1; 16]).encode_to_vec())
            .send()
            .unwrap();
        if r.status().as_u16() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
        }
        codes.push(r.status().as_u16());
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let grpc = rt.block_on(async {
        let mut client =
            TraceServiceClient::connect(format!("http://{}", addrs.otlp_grpc.unwrap()))
                .await
                .unwrap();
        client
            .export(one_span_request(vec![99; 16]))
            .await
            .unwrap_err()
    });
    // OTLP/gRPC throttling: UNAVAILABLE with a RetryInfo detail (in
    // grpc-status-details-bin), which OTLP clients retry after its delay.
    eprintln!(
        "full queue over gRPC: {:?} {:?}, retry info {:?}",
        grpc.code(),
        grpc.message(),
        grpc.get_details_retry_info()
    );
    assert_eq!(grpc.code(), tonic::Code::Unavailable, "{grpc:?}");
    assert!(grpc.message().contains("queue is full"), "{grpc:?}");
    assert_eq!(
        grpc.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(Duration::from_secs(1)),
        "{grpc:?}"
    );
    let accepted = codes.iter().filter(|&&c| c == 200).count() as u64;
    assert_eq!(collector.stats().spans.accepted.get(), accepted);
    assert_eq!(
        collector.stats().spans.refused_full.get(),
        20 - accepted + 1
    );
    // Drain: every accepted span arrives, then new requests are accepted again.
    let delivered = rt.block_on(async move {
        let mut n = 0u64;
        let shutdown = collector.shutdown(Duration::from_secs(10));
        let drain = async {
            while let Some(b) = rx.recv().await {
                if let Batch::Spans(r) = b {
                    n += fathom_collector::pipeline::span_count(&r);
                }
            }
        };
        let (ok, ()) = tokio::join!(shutdown, drain);
        assert!(ok);
        n
    });
    assert_eq!(delivered, accepted);
}

#[test]
fn tls_on_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca_cert, cert, key) = (d.join("ca.pem"), d.join("cert.pem"), d.join("key.pem"));
    // A CA and a server certificate it signs (webpki refuses a self-signed
    // CA as the server's own certificate).
    let ext = d.join("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n").unwrap();
    let steps: [Vec<&str>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=fathom-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "server.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(d)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "openssl is needed: {other:?}"
                );
                eprintln!(
                    "SKIPPED tls_on_every_endpoint: openssl cannot make certificates: {other:?}"
                );
                return;
            }
        }
    }
    let rt = runtime();
    let tap = Tap::default();
    let mut c = config();
    c.tls = Some(TlsConfig {
        cert: cert.clone(),
        key,
    });
    let collector = rt
        .block_on(Collector::start_with_sinks(c, vec![tap.sink(&rt)]))
        .unwrap();
    let addrs = collector.addrs();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_cert).unwrap()).unwrap();
    let https = reqwest::blocking::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let r = https
        .post(format!(
            "https://localhost:{}/v1/traces",
            addrs.otlp_http.unwrap().port()
        ))
        .header("content-type", "application/x-protobuf")
        .body(one_span_request(vec![5; 16]).encode_to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = https
        .get(format!(
            "https://localhost:{}/healthz",
            addrs.http.unwrap().port()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Plain HTTP to a TLS port does not get in.
    assert!(
        reqwest::blocking::Client::new()
            .post(format!(
                "http://127.0.0.1:{}/v1/traces",
                addrs.otlp_http.unwrap().port()
            ))
            .header("content-type", "application/x-protobuf")
            .body(one_span_request(vec![6; 16]).encode_to_vec())
            .timeout(Duration::from_secs(3))
            .send()
            .is_err()
    );
    // gRPC over TLS with the SDK's exporter.
    {
        let _enter = rt.enter();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(&ca_cert).unwrap(),
            ))
            .domain_name("localhost");
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_tls_config(tls)
            .with_endpoint(format!(
                "https://localhost:{}",
                addrs.otlp_grpc.unwrap().port()
            ))
            .build()
            .unwrap();
        emit_spans(exporter, "svc-tls", 3);
    }
    assert_eq!(tap.wait_spans(4, Duration::from_secs(10)).len(), 4);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}

/// A Python with grpcio-tools (`FATHOM_TEST_PYTHON`, else `python3`).
fn grpc_python(test: &str) -> Option<std::path::PathBuf> {
    let candidate = std::env::var_os("FATHOM_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("python3"));
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    common::require_found(
        test,
        "Python with grpcio-tools (pip package; or FATHOM_TEST_PYTHON)",
        ok.then(|| std::path::PathBuf::from("/")),
    )
    .map(|_| candidate)
}

/// One push: its series, the bearer token to send, gzip.
struct PushCall {
    what: &'static str,
    req: PushRequest,
    token: Option<&'static str>,
    gzip: bool,
}

/// How one push was answered: the gRPC code's name (`OK`,
/// `INVALID_ARGUMENT`, …) or connect's (`ok`, `invalid_argument`, …) with
/// its HTTP status, the message, the `RetryInfo` delay.
#[derive(Debug)]
struct Answer {
    code: String,
    http: Option<u16>,
    message: String,
    retry_delay: Option<Duration>,
    retry_after: Option<String>,
}

/// The calls made by `collector/tests/fixtures/clients/push_grpc.py`, a
/// grpcio client generated from Pyroscope's `push.proto`.
fn push_over_grpc(python: &std::path::Path, target: SocketAddr, calls: &[PushCall]) -> Vec<Answer> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let calls: Vec<serde_json::Value> = calls
        .iter()
        .map(|c| {
            serde_json::json!({
                "token": c.token,
                "gzip": c.gzip,
                "series": c.req.series.iter().map(|s| serde_json::json!({
                    "labels": s.labels.iter().map(|l| [&l.name, &l.value]).collect::<Vec<_>>(),
                    "samples": s.samples.iter().map(|x| serde_json::json!({
                        "raw_profile": b64(&x.raw_profile),
                        "id": x.id,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let results = common::run_python_client(
        python,
        "push_grpc.py",
        &[],
        &serde_json::json!({"target": target.to_string(), "calls": calls}),
    );
    results
        .into_iter()
        .map(|r| {
            let details = r["status_details"]
                .as_str()
                .map(|d| base64::engine::general_purpose::STANDARD.decode(d).unwrap());
            let retry_delay = details.and_then(|d| {
                tonic::Status::with_details(tonic::Code::Unknown, "", d.into())
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
            });
            Answer {
                code: r["code"].as_str().unwrap().to_string(),
                http: None,
                message: r["details"].as_str().unwrap().to_string(),
                retry_delay,
                retry_after: None,
            }
        })
        .collect()
}

/// The same calls over the connect protocol (`application/proto`).
fn push_over_connect(http: SocketAddr, calls: &[PushCall]) -> Vec<Answer> {
    let client = reqwest::blocking::Client::new();
    calls
        .iter()
        .map(|c| {
            let mut body = c.req.encode_to_vec();
            let mut r = client
                .post(format!("http://{http}/push.v1.PusherService/Push"))
                .header("content-type", "application/proto");
            if c.gzip {
                use std::io::Write as _;
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&body).unwrap();
                body = gz.finish().unwrap();
                r = r.header("content-encoding", "gzip");
            }
            if let Some(t) = c.token {
                r = r.header("authorization", format!("Bearer {t}"));
            }
            let resp = r.body(body).send().unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let text = resp.text().unwrap();
            let (code, message) = if status == 200 {
                ("ok".to_string(), String::new())
            } else {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                (
                    v["code"].as_str().unwrap().to_string(),
                    v["message"].as_str().unwrap().to_string(),
                )
            };
            Answer {
                code,
                http: Some(status),
                message,
                retry_delay: None,
                retry_after,
            }
        })
        .collect()
}

/// `push.v1.PusherService/Push` over gRPC (the OTLP gRPC port), from a
/// grpcio client generated from Pyroscope's own `push.proto`: answered as
/// the connect endpoint answers the same calls — accepted (plain and gzip),
/// a retried sample ID acknowledged once whichever protocol carried it
/// first, `UNAUTHENTICATED` without the token, `INVALID_ARGUMENT` with the
/// same reason for a broken pprof and for labels without `__name__`,
/// `RESOURCE_EXHAUSTED` naming the limit over `max_request_bytes`, each
/// counted as connect's are; a full queue is `RESOURCE_EXHAUSTED` with a
/// `RetryInfo` of 1 s (connect: 429 with `Retry-After: 1`); the profiles
/// pushed over both arrive merged.
#[test]
fn push_v1_over_grpc_is_answered_as_over_connect() {
    const TEST: &str = "push_v1_over_grpc_is_answered_as_over_connect";
    let Some(py) = grpc_python(TEST) else { return };
    let rt = runtime();
    let tap = Tap::default();
    let mut c = config();
    c.aggregation.window = Duration::from_secs(3600);
    c.auth.bearer_token = Some("t0ken".into());
    c.queues.max_request_bytes = 1 << 20;
    let collector = rt
        .block_on(Collector::start_with_sinks(c, vec![tap.sink(&rt)]))
        .unwrap();
    let addrs = collector.addrs();
    let push = |series: Vec<RawProfileSeries>| PushRequest { series };
    let ok = Some("t0ken");
    let unnamed = RawProfileSeries {
        labels: vec![LabelPair {
            name: "service_name".into(),
            value: "api".into(),
        }],
        ..api_series(agent_profile("unnamed", 1), "")
    };
    // Incompressible, over the 1 MiB limit.
    let mut noise = vec![0u8; 2 << 20];
    fastrand::fill(&mut noise);
    // The refusals, the same over both protocols.
    let refusals = |token_case: &'static str| {
        vec![
            PushCall {
                what: token_case,
                req: push(vec![api_series(agent_profile("work", 1), "")]),
                token: None,
                gzip: false,
            },
            PushCall {
                what: "wrong token",
                req: push(vec![api_series(agent_profile("work", 1), "")]),
                token: Some("nope"),
                gzip: false,
            },
            PushCall {
                what: "broken pprof",
                req: push(vec![api_series(b"not a profile".to_vec(), "")]),
                token: ok,
                gzip: false,
            },
            PushCall {
                what: "no __name__",
                req: push(vec![unnamed.clone()]),
                token: ok,
                gzip: false,
            },
            PushCall {
                what: "over max_request_bytes",
                req: push(vec![api_series(noise.clone(), "")]),
                token: ok,
                gzip: false,
            },
        ]
    };
    let mut grpc_calls = vec![
        PushCall {
            what: "accepted",
            req: push(vec![api_series(agent_profile("via_grpc", 3), "a")]),
            token: ok,
            gzip: false,
        },
        PushCall {
            what: "retried",
            req: push(vec![api_series(agent_profile("via_grpc", 3), "a")]),
            token: ok,
            gzip: false,
        },
        PushCall {
            what: "gzip",
            req: push(vec![api_series(agent_profile("via_grpc", 4), "b")]),
            token: ok,
            gzip: true,
        },
    ];
    grpc_calls.extend(refusals("no token"));
    let mut connect_calls = vec![
        PushCall {
            what: "accepted",
            req: push(vec![api_series(agent_profile("via_connect", 2), "c")]),
            token: ok,
            gzip: false,
        },
        // gRPC's sample "a" again, over connect: already accepted.
        PushCall {
            what: "retried",
            req: push(vec![api_series(agent_profile("via_grpc", 3), "a")]),
            token: ok,
            gzip: false,
        },
        PushCall {
            what: "gzip",
            req: push(vec![api_series(agent_profile("via_connect", 5), "d")]),
            token: ok,
            gzip: true,
        },
    ];
    connect_calls.extend(refusals("no token"));
    let grpc = push_over_grpc(&py, addrs.otlp_grpc.unwrap(), &grpc_calls);
    let connect = push_over_connect(addrs.http.unwrap(), &connect_calls);
    for ((call, g), c) in grpc_calls.iter().zip(&grpc).zip(&connect) {
        eprintln!(
            "{}: gRPC {} {:?} / connect {} {:?} {:?}",
            call.what, g.code, g.message, c.code, c.http, c.message
        );
    }
    let codes = |a: &[Answer]| -> Vec<String> { a.iter().map(|x| x.code.to_lowercase()).collect() };
    let want = [
        "ok",
        "ok",
        "ok",
        "unauthenticated",
        "unauthenticated",
        "invalid_argument",
        "invalid_argument",
        "resource_exhausted",
    ];
    assert_eq!(codes(&grpc), want, "gRPC: {grpc:#?}");
    assert_eq!(codes(&connect), want, "connect: {connect:#?}");
    assert_eq!(
        connect.iter().map(|a| a.http.unwrap()).collect::<Vec<_>>(),
        [200, 200, 200, 401, 401, 400, 400, 413]
    );
    // The same reasons, word for word, where the request was read.
    for i in 3..7 {
        assert_eq!(
            grpc[i].message, connect[i].message,
            "{}",
            grpc_calls[i].what
        );
    }
    assert!(
        grpc[5].message.starts_with("series[0].samples[0]: ")
            && grpc[6].message.starts_with("series[0]: "),
        "{grpc:#?}"
    );
    for a in [&grpc[7], &connect[7]] {
        assert!(a.message.contains("1048576"), "{a:?}");
        assert!(a.retry_delay.is_none() && a.retry_after.is_none(), "{a:?}");
    }
    let stats = collector.stats();
    // a, b over gRPC, c, d over connect; the retried a twice acknowledged only.
    assert_eq!(stats.profiles.accepted.get(), 4);
    // Broken pprof, no __name__, oversize: over each protocol.
    assert_eq!(stats.profiles.invalid_requests.get(), 6);
    assert_eq!(stats.profiles.unauthenticated.get(), 4);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
    let end = Instant::now() + Duration::from_secs(5);
    let merged = loop {
        let merged: Vec<_> = tap
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| match b {
                Batch::Profiles(p) => Some(p.as_ref().clone()),
                _ => None,
            })
            .flatten()
            .collect();
        if !merged.is_empty() || Instant::now() > end {
            break merged;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(merged.len(), 1, "one series, one window");
    assert_eq!(merged[0].inputs, 4);
    let folded = pprof::folded(&merged[0].profile, 0);
    let get = |leaf: &str| {
        folded
            .iter()
            .find(|(s, _)| s.ends_with(leaf))
            .map(|(_, v)| *v)
    };
    assert_eq!(
        (get("via_grpc"), get("via_connect")),
        (Some(7), Some(7)),
        "{folded:?}"
    );

    // A full queue (one profile at a time; this request has two series).
    let mut c = config();
    c.queues.profiles = 1;
    let collector = rt
        .block_on(Collector::start_with_sinks(
            c,
            vec![Tap::default().sink(&rt)],
        ))
        .unwrap();
    let addrs = collector.addrs();
    let two = || {
        let mut other = api_series(agent_profile("work", 1), "");
        other.labels[1].value = "web".into();
        push(vec![api_series(agent_profile("work", 1), ""), other])
    };
    let full = |what| PushCall {
        what,
        req: two(),
        token: None,
        gzip: false,
    };
    let grpc = push_over_grpc(&py, addrs.otlp_grpc.unwrap(), &[full("full")]);
    let connect = push_over_connect(addrs.http.unwrap(), &[full("full")]);
    eprintln!("full queue: gRPC {grpc:?}, connect {connect:?}");
    assert_eq!(grpc[0].code, "RESOURCE_EXHAUSTED", "{grpc:?}");
    assert_eq!(
        grpc[0].retry_delay,
        Some(Duration::from_secs(1)),
        "{grpc:?}"
    );
    assert_eq!(
        (
            connect[0].code.as_str(),
            connect[0].http,
            connect[0].retry_after.as_deref()
        ),
        ("resource_exhausted", Some(429), Some("1"))
    );
    assert_eq!(grpc[0].message, connect[0].message);
    assert!(grpc[0].message.contains("queue is full"), "{grpc:?}");
    assert_eq!(collector.stats().profiles.refused_full.get(), 4);
    assert!(rt.block_on(collector.shutdown(Duration::from_secs(5))));
}
