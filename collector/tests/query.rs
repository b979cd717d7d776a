//! Grafana's data sources against the collector alone, with real clients:
//!
//! - Pyroscope: profiles pushed by the real Pyroscope SDK (`pyroscope-io`
//!   from PyPI), by `curl` to the legacy `/ingest` (collapsed stacks, raw
//!   pprof, pyroscope-go's multipart form), then every querier call Grafana's
//!   Pyroscope data source makes, encoded and decoded by a connect client
//!   built from Pyroscope's own `.proto` files (grpcio-tools' protoc), in
//!   both connect encodings; and the queries of `dashboards/` replayed.
//! - The Pyroscope Node.js SDK (`@pyroscope/nodejs` from npm) in a real
//!   Node program pushing to `/ingest`, its profiles read back through the
//!   querier (connect JSON) and `/api/profile`.
//! - Jaeger: spans from the OpenTelemetry SDK over OTLP, read back through
//!   Jaeger's HTTP query API and checked against Jaeger's JSON shapes.
//! - Oversize bodies answered in each protocol's error format.
//!
//! A missing peer (Python with grpcio-tools and pyroscope-io, curl) skips a
//! test with a printed reason, or fails it under `CI=true`. Set
//! `FATHOM_TEST_PYTHON` to a Python that has both (e.g. a venv's).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fathom_collector::{Collector, CollectorConfig};
use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig as _;
use serde_json::{Value, json};
use tokio::runtime::Runtime;

mod common;
use common::{
    CpuProfile, Frame, fixture, require_found, require_tool, run_python_client, workspace_root,
};

struct Running {
    rt: Runtime,
    collector: Option<Collector>,
    base: String,
    otlp_http: String,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = CollectorConfig::default();
        let local = "127.0.0.1:0".parse().unwrap();
        config.listen.otlp_grpc = None;
        config.listen.otlp_http = Some(local);
        config.listen.http = Some(local);
        config.store.path = dir.path().join("collector.redb");
        config.aggregation.window = Duration::from_secs(1);
        config.aggregation.span_batch_timeout = Duration::from_millis(100);
        config.queues.max_request_bytes = 1 << 20;
        let collector = rt.block_on(Collector::start(config)).unwrap();
        let base = format!("http://{}", collector.addrs().http.unwrap());
        let otlp_http = format!("http://{}", collector.addrs().otlp_http.unwrap());
        Self {
            rt,
            collector: Some(collector),
            base,
            otlp_http,
            _dir: dir,
        }
    }

    fn get_json(&self, path: &str) -> (u16, Value) {
        let r = reqwest::blocking::get(format!("{}{path}", self.base)).unwrap();
        let status = r.status().as_u16();
        (status, serde_json::from_str(&r.text().unwrap()).unwrap())
    }

    /// Polls `path` until `ok` holds (profiles wait for their window).
    fn wait_json(&self, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, v) = self.get_json(path);
            if status == 200 && ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{path}: {status} {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.collector.take() {
            self.rt.block_on(c.shutdown(Duration::from_secs(5)));
        }
    }
}

/// A Python with grpcio-tools and pyroscope-io: `FATHOM_TEST_PYTHON`, else
/// `python3`.
fn python(test: &str) -> Option<PathBuf> {
    let candidate = std::env::var_os("FATHOM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok = Command::new(&candidate)
        .args(["-c", "import grpc_tools, pyroscope, google.protobuf"])
        .output()
        .is_ok_and(|o| o.status.success());
    require_found(
        test,
        "Python with grpcio-tools and pyroscope-io (pip packages; or FATHOM_TEST_PYTHON)",
        ok.then(|| PathBuf::from("/")),
    )
    .map(|_| candidate)
}

/// Runs the connect querier client (built from Pyroscope's protos) on `calls`.
fn querier(python: &Path, base: &str, calls: &Value) -> Vec<Value> {
    run_python_client(python, "querier_client.py", &[base], calls)
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A Go-shaped CPU profile of `leaf` (called from `main`), `count` samples
/// at 100 Hz, built with the `pprof` crate's own message types.
fn go_profile(leaf: &str, count: i64) -> CpuProfile {
    let frame = |address: u64, function: &str| Frame {
        address,
        function: function.to_string(),
        system_name: function.to_string(),
        file: "main.go".into(),
        line: 10,
    };
    CpuProfile {
        frequency_hz: 100,
        duration: Duration::from_secs(10),
        mapping_file: "/app/server".into(),
        build_id: "abc".into(),
        memory_start: 0x40_0000,
        memory_limit: 0x80_0000,
        frames: vec![frame(0x40_1000, leaf), frame(0x40_2000, "main.main")],
        samples: vec![(vec![0, 1], count)],
    }
}

/// The flame graph's names and total from a `SelectMergeStacktraces` answer.
fn flame(r: &Value) -> (Vec<String>, i64) {
    let fg = &r["response"]["flamegraph"];
    let names = fg["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    (names, fg["total"].as_str().unwrap_or("0").parse().unwrap())
}

#[test]
fn grafana_pyroscope_calls_are_answered_for_every_client() {
    let test = "grafana_pyroscope_calls_are_answered_for_every_client";
    let (Some(py), Some(_)) = (python(test), require_tool(test, "curl")) else {
        return;
    };
    let run = Running::start();
    let start = ms(SystemTime::now()) - 60_000;

    // 1. The Pyroscope SDK (push.v1.PusherService/Push) profiling itself.
    let out = Command::new(&py)
        .arg(fixture("clients/pyroscope_sdk_push.py"))
        .arg(&run.base)
        .arg("2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyroscope-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 2. /ingest, collapsed stacks (the default format), 100 Hz.
    let now_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ingest = |query: &str| format!("{}/ingest?{query}", run.base);
    let (code, body) = curl(&[
        "--data-binary",
        "main;handler;parse 30\nmain;handler;render 10\n",
        &ingest(&format!(
            "name=folded-app.cpu%7Benv%3Dprod%7D&from={}&until={now_s}&sampleRate=100&spyName=rbspy",
            now_s - 10
        )),
    ]);
    assert_eq!(code, 200, "{body}");
    // 3. /ingest, pprof as pyroscope-go sends it (multipart form).
    let dir = tempfile::tempdir().unwrap();
    let pprof_file = dir.path().join("cpu.pb.gz");
    std::fs::write(&pprof_file, go_profile("main.multipartWork", 70).gzip()).unwrap();
    let (code, body) = curl(&[
        "-F",
        &format!(
            "profile=@{};type=application/octet-stream",
            pprof_file.display()
        ),
        "-F",
        "sample_type_config={}",
        &ingest("name=multipart-app%7Bregion%3Deu%7D&spyName=gospy"),
    ]);
    assert_eq!(code, 200, "{body}");
    // 4. /ingest, a raw pprof body.
    let raw_file = dir.path().join("raw.pb.gz");
    std::fs::write(&raw_file, go_profile("main.rawWork", 20).gzip()).unwrap();
    let (code, body) = curl(&[
        "--data-binary",
        &format!("@{}", raw_file.display()),
        "-H",
        "Content-Type: application/octet-stream",
        &ingest("name=raw-app&format=pprof"),
    ]);
    assert_eq!(code, 200, "{body}");
    // Refused: the reason, as text.
    let (code, body) = curl(&["--data-binary", "a;b x", &ingest("name=bad.cpu")]);
    assert_eq!((code, body.contains("line 1")), (400, true), "{body}");

    run.wait_json("/api/series", |v| {
        v.as_array().is_some_and(|a| a.len() >= 4)
    });
    let end = ms(SystemTime::now()) + 60_000;
    let cpu = "process_cpu:cpu:nanoseconds:cpu:nanoseconds";
    let range = json!({"start": start.to_string(), "end": end.to_string()});
    let with = |extra: Value| {
        let mut r = range.clone();
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    };
    for encoding in ["proto", "json"] {
        let calls = json!([
            {"method": "ProfileTypes", "request": range, "encoding": encoding},
            {"method": "LabelNames", "request": with(json!({"matchers": [format!("{{__profile_type__=\"{cpu}\"}}")]})), "encoding": encoding},
            {"method": "LabelValues", "request": with(json!({"name": "service_name", "matchers": ["{}"]})), "encoding": encoding},
            {"method": "Series", "request": with(json!({"matchers": ["{region=\"eu\"}"], "labelNames": ["service_name"]})), "encoding": encoding},
            {"method": "SelectMergeStacktraces", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{service_name=\"fathom-sdk-test\"}", "maxNodes": "1024"})), "encoding": encoding},
            {"method": "SelectMergeStacktraces", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{service_name=\"folded-app\", env=~\"pr.*\"}"})), "encoding": encoding},
            {"method": "SelectMergeStacktraces", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{service_name=~\"multipart-app|raw-app\"}"})), "encoding": encoding},
            {"method": "SelectSeries", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{}", "step": 3600.0, "groupBy": ["service_name"]})), "encoding": encoding},
            {"method": "SelectMergeProfile", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{service_name=\"raw-app\"}"})), "encoding": encoding},
            {"method": "GetProfileStats", "request": {}, "encoding": encoding},
            {"method": "SelectMergeStacktraces", "request": with(json!({"profileTypeID": cpu, "labelSelector": "{service_name=\"x\""})), "encoding": encoding},
            {"method": "SelectSeries", "request": with(json!({"profileTypeID": "cpu", "labelSelector": "{}", "step": 15.0})), "encoding": encoding},
        ]);
        let r = querier(&py, &run.base, &calls);
        let types: Vec<&str> = r[0]["response"]["profileTypes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["ID"].as_str().unwrap())
            .collect();
        assert!(types.contains(&cpu), "{encoding}: {types:?}");
        assert!(
            types.contains(&"process_cpu:samples:count:cpu:nanoseconds"),
            "{types:?}"
        );
        let names = r[1]["response"]["names"].to_string();
        assert!(
            names.contains("\"service_name\"") && names.contains("\"region\""),
            "{names}"
        );
        let services = r[2]["response"]["names"].to_string();
        for s in ["fathom-sdk-test", "folded-app", "multipart-app", "raw-app"] {
            assert!(services.contains(s), "{encoding}: {s} not in {services}");
        }
        let sets = r[3]["response"]["labelsSet"].to_string();
        assert!(
            sets.contains("fathom-sdk-test") && sets.contains("multipart-app"),
            "{sets}"
        );
        let (sdk_names, sdk_total) = flame(&r[4]);
        assert!(
            sdk_names.contains(&"busy_leaf".to_string()),
            "{sdk_names:?}"
        );
        assert!(sdk_total > 0);
        let (folded_names, folded_total) = flame(&r[5]);
        assert_eq!(folded_total, 400_000_000, "40 samples at 100 Hz");
        assert!(
            folded_names.contains(&"render".to_string()),
            "{folded_names:?}"
        );
        let (go_names, go_total) = flame(&r[6]);
        assert_eq!(go_total, 900_000_000, "70 + 20 samples of 10 ms");
        assert!(
            go_names.contains(&"main.multipartWork".to_string())
                && go_names.contains(&"main.rawWork".to_string()),
            "{go_names:?}"
        );
        // The time series add up to the flame graphs.
        let series = r[7]["response"]["series"].as_array().unwrap();
        let sum_of = |svc: &str| -> f64 {
            series
                .iter()
                .filter(|s| s["labels"].to_string().contains(svc))
                .flat_map(|s| s["points"].as_array().unwrap())
                .map(|p| p["value"].as_f64().unwrap())
                .sum()
        };
        assert_eq!(sum_of("folded-app"), 400_000_000.0, "{series:?}");
        assert_eq!(sum_of("fathom-sdk-test"), sdk_total as f64);
        // The merged pprof: one sample type, the raw profile's samples.
        let p = &r[8]["response"];
        let total: i64 = p["sample"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["value"][0].as_str().unwrap().parse::<i64>().unwrap())
            .sum();
        assert_eq!(total, 200_000_000, "{encoding}");
        assert_eq!(p["sampleType"].as_array().unwrap().len(), 1);
        assert_eq!(r[9]["response"]["dataIngested"], true);
        assert_eq!(r[10]["status"], 400);
        assert_eq!(r[10]["error"]["code"], "invalid_argument");
        assert!(
            r[10]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("label selector")
        );
        assert_eq!(r[11]["status"], 400);
        assert!(
            r[11]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("profile_typeID")
        );
    }

    // The profile dashboard's own queries, its variables set to "All" (.*)
    // and to one service.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("dashboards/fathom-profiles.json")).unwrap(),
    )
    .unwrap();
    let mut targets = Vec::new();
    let mut variables = Vec::new();
    collect_pyroscope_queries(&dashboard, &mut targets, &mut variables);
    assert!(
        !targets.is_empty() && !variables.is_empty(),
        "no Pyroscope queries found"
    );
    let mut calls = Vec::new();
    for (label, profile_type) in &variables {
        calls.push(json!({"method": "LabelValues", "request": with(json!({
            "name": label, "matchers": [format!("{{__profile_type__=\"{profile_type}\"}}")],
        }))}));
    }
    for service in [".*", "multipart-app"] {
        for t in &targets {
            let selector = t["labelSelector"]
                .as_str()
                .unwrap()
                .replace("$service", service)
                .replace("$namespace", ".*")
                .replace("$pod", ".*");
            let profile_type = t["profileTypeId"].as_str().unwrap();
            let group_by = t["groupBy"].clone();
            calls.push(json!({"method": "SelectSeries", "request": with(json!({
                "profileTypeID": profile_type, "labelSelector": selector, "step": 15.0,
                "groupBy": if group_by.is_null() { json!([]) } else { group_by },
            }))}));
            calls.push(
                json!({"method": "SelectMergeStacktraces", "request": with(json!({
                    "profileTypeID": profile_type, "labelSelector": selector, "maxNodes": "16384",
                }))}),
            );
        }
    }
    let r = querier(&py, &run.base, &Value::Array(calls));
    for (i, answer) in r.iter().enumerate() {
        assert_eq!(answer["status"], 200, "dashboard call {i}: {answer}");
    }
    let service_values = r[..variables.len()]
        .iter()
        .map(|a| a.to_string())
        .collect::<String>();
    assert!(service_values.contains("multipart-app"), "{service_values}");
    // The flame graph of the whole dashboard for one service has its samples.
    let last = r.last().unwrap();
    assert_eq!(flame(last).1, 700_000_000, "{last}");
}

/// The Pyroscope targets (`profileTypeId` with `labelSelector`) and the label
/// variables (`labelName`, `profileTypeId`) of a dashboard.
fn collect_pyroscope_queries(
    v: &Value,
    targets: &mut Vec<Value>,
    vars: &mut Vec<(String, String)>,
) {
    match v {
        Value::Object(o) => {
            if let (Some(Value::String(name)), Some(Value::String(pt))) =
                (o.get("labelName"), o.get("profileTypeId"))
            {
                vars.push((name.clone(), pt.clone()));
            } else if o.contains_key("profileTypeId") && o.contains_key("labelSelector") {
                targets.push(v.clone());
            }
            for x in o.values() {
                collect_pyroscope_queries(x, targets, vars);
            }
        }
        Value::Array(a) => a
            .iter()
            .for_each(|x| collect_pyroscope_queries(x, targets, vars)),
        _ => {}
    }
}

/// The Jaeger search targets of a dashboard.
fn collect_jaeger_searches(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(o) => {
            if o.get("queryType") == Some(&json!("search")) {
                out.push(v.clone());
            }
            o.values().for_each(|x| collect_jaeger_searches(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_jaeger_searches(x, out)),
        _ => {}
    }
}

/// Spans through the OpenTelemetry SDK over OTLP/HTTP: per checkout request a
/// server span with a client child that fails with an exception event.
fn emit_traces(otlp_http: &str, requests: usize) {
    let provider = otel_provider(
        otlp_http,
        "checkout",
        &[KeyValue::new("host.name", "node-1")],
    );
    let tracer = provider.tracer("fathom-test");
    for i in 0..requests {
        let root = tracer
            .span_builder("POST /checkout")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.response.status_code", if i == 0 { 500 } else { 200 }),
            ])
            .start(&tracer);
        let cx = opentelemetry::Context::current_with_span(root);
        let mut child = tracer
            .span_builder("SELECT orders")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("db.system", "postgresql")])
            .start_with_context(&tracer, &cx);
        std::thread::sleep(Duration::from_millis(if i == 0 { 30 } else { 2 }));
        if i == 0 {
            child.add_event(
                "exception",
                vec![
                    KeyValue::new("exception.type", "TimeoutError"),
                    KeyValue::new("exception.message", "query took too long"),
                ],
            );
            child.set_status(Status::error("timeout"));
        }
        child.end();
        cx.span().end();
    }
    provider.force_flush().unwrap();
    let _ = provider.shutdown();
}

#[test]
fn jaeger_query_api_in_jaegers_shapes() {
    let run = Running::start();
    emit_traces(&run.otlp_http, 5);
    let envelope = |v: &Value| {
        assert_eq!(v["errors"], Value::Null, "{v}");
        assert_eq!(
            (v["limit"].as_u64(), v["offset"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(
            v["total"].as_u64().unwrap() as usize,
            v["data"].as_array().unwrap().len()
        );
    };
    let v = run.wait_json("/api/traces?service=checkout&lookback=1h", |v| {
        v["data"].as_array().is_some_and(|d| d.len() == 5)
    });
    envelope(&v);
    let (_, services) = run.get_json("/api/services");
    envelope(&services);
    assert_eq!(services["data"], json!(["checkout"]));
    let (_, ops) = run.get_json("/api/services/checkout/operations");
    assert_eq!(ops["data"], json!(["POST /checkout", "SELECT orders"]));
    let (_, ops) = run.get_json("/api/operations?service=checkout&spanKind=client");
    assert_eq!(
        ops["data"],
        json!([{"name": "SELECT orders", "spanKind": "client"}])
    );

    // Search like Grafana's Jaeger data source: operation, tags, durations.
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let search = |extra: &str| {
        let (status, v) = run.get_json(&format!(
            "/api/traces?service=checkout&start={}&end={}&limit=20{extra}",
            now_us - 3_600_000_000,
            now_us + 60_000_000
        ));
        assert_eq!(status, 200, "{extra}: {v}");
        envelope(&v);
        v["data"].as_array().unwrap().clone()
    };
    assert_eq!(search("").len(), 5);
    assert_eq!(
        search("&operation=SELECT%20orders&minDuration=20ms").len(),
        1
    );
    assert_eq!(
        search("&maxDuration=20ms&operation=SELECT%20orders").len(),
        4
    );
    let tags = "&tags=%7B%22http.response.status_code%22%3A%22500%22%7D";
    assert_eq!(search(tags).len(), 1);
    assert_eq!(search("&tags=%7B%22error%22%3A%22true%22%7D").len(), 1);
    assert_eq!(search("&tag=exception.type:TimeoutError").len(), 1);
    assert_eq!(
        search("&tag=host.name:node-1").len(),
        5,
        "process tags match"
    );
    assert_eq!(search("&limit=2").len(), 2);

    // One trace in Jaeger's ui.Trace shape.
    let failed = &search(tags)[0];
    let id = failed["traceID"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let (status, v) = run.get_json(&format!("/api/traces/{id}"));
    assert_eq!(status, 200);
    envelope(&v);
    let t = &v["data"][0];
    assert_eq!(t["traceID"], id.as_str());
    let spans = t["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2);
    let root = spans
        .iter()
        .find(|s| s["operationName"] == "POST /checkout")
        .unwrap();
    let child = spans
        .iter()
        .find(|s| s["operationName"] == "SELECT orders")
        .unwrap();
    assert_eq!(root["references"], json!([]));
    assert_eq!(
        child["references"],
        json!([{"refType": "CHILD_OF", "traceID": id, "spanID": root["spanID"]}])
    );
    assert_eq!(child["spanID"].as_str().unwrap().len(), 16);
    let (start, dur) = (
        child["startTime"].as_u64().unwrap(),
        child["duration"].as_u64().unwrap(),
    );
    assert!(
        start > 1_600_000_000_000_000 && start < 4_000_000_000_000_000,
        "µs: {start}"
    );
    assert!((30_000..5_000_000).contains(&dur), "µs: {dur}");
    let tag = |s: &Value, k: &str| {
        s["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == k)
            .cloned()
    };
    assert_eq!(
        tag(child, "error").unwrap(),
        json!({"key": "error", "type": "bool", "value": true})
    );
    assert_eq!(tag(child, "span.kind").unwrap()["value"], "client");
    assert_eq!(
        tag(child, "otel.status_description").unwrap()["value"],
        "timeout"
    );
    assert_eq!(
        tag(root, "http.response.status_code").unwrap(),
        json!({"key": "http.response.status_code", "type": "int64", "value": 500})
    );
    let log = &child["logs"][0];
    assert!(log["timestamp"].as_u64().unwrap() >= start);
    let fields = log["fields"].to_string();
    assert!(
        fields.contains(r#"{"key":"event","type":"string","value":"exception"}"#)
            && fields.contains("query took too long")
            && fields.contains("TimeoutError"),
        "{fields}"
    );
    let pid = child["processID"].as_str().unwrap();
    let process = &t["processes"][pid];
    assert_eq!(process["serviceName"], "checkout");
    assert!(process["tags"].to_string().contains("node-1"), "{process}");
    // By traceID in the search too.
    let (_, v) = run.get_json(&format!("/api/traces?traceID={id}"));
    assert_eq!(v["data"][0]["traceID"], id.as_str());

    // Errors in Jaeger's envelope.
    for (path, status, msg) in [
        ("/api/traces?operation=x", 400, "'service' is required"),
        (
            "/api/traces?service=checkout&range=15m",
            400,
            "unknown query parameter",
        ),
        (
            "/api/traces?service=checkout&minDuration=soon",
            400,
            "minDuration",
        ),
        (
            "/api/traces/00000000000000000000000000000abc",
            404,
            "trace not found",
        ),
        ("/api/traces/xyz", 400, "hexadecimal"),
    ] {
        let (s, v) = run.get_json(path);
        assert_eq!(s, status, "{path}: {v}");
        assert_eq!(v["data"], Value::Null);
        assert_eq!(v["errors"][0]["code"], status);
        assert!(
            v["errors"][0]["msg"].as_str().unwrap().contains(msg),
            "{path}: {v}"
        );
    }
    // The HTTP dashboard's Jaeger searches, as Grafana's Jaeger data source
    // sends them ($service = checkout).
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("dashboards/fathom-http.json")).unwrap(),
    )
    .unwrap();
    let mut searches = Vec::new();
    collect_jaeger_searches(&dashboard, &mut searches);
    assert!(!searches.is_empty(), "no Jaeger searches in the dashboard");
    for t in &searches {
        let mut extra = String::new();
        for (key, param) in [
            ("operation", "operation"),
            ("minDuration", "minDuration"),
            ("maxDuration", "maxDuration"),
            ("limit", "limit"),
        ] {
            if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                extra.push_str(&format!("&{param}={v}"));
            }
        }
        // (`search` sets limit=20 first; the dashboard's own comes last and wins.)
        let found = search(&extra);
        let want = if t.get("minDuration").is_some() { 0 } else { 5 };
        assert_eq!(found.len(), want, "dashboard search {t}");
    }
    // Our UI's own API is under /ui/api, with counts.
    let r = reqwest::blocking::get(format!(
        "{}/ui/api/traces?service=checkout&limit=2",
        run.base
    ))
    .unwrap();
    assert_eq!(r.headers()["x-total-count"], "5");
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

#[test]
fn oversize_bodies_are_answered_in_each_protocols_error_format() {
    let run = Running::start();
    let big = vec![0u8; 2 << 20]; // max_request_bytes is 1 MiB here
    let http = reqwest::blocking::Client::new();
    let r = http
        .post(format!("{}/push.v1.PusherService/Push", run.base))
        .header("content-type", "application/proto")
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let v: Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["code"], "resource_exhausted", "{v}");
    assert!(v["message"].as_str().unwrap().contains("1048576"), "{v}");
    for (ct, json) in [
        ("application/x-protobuf", false),
        ("application/json", true),
    ] {
        let r = http
            .post(format!("{}/v1/traces", run.otlp_http))
            .header("content-type", ct)
            .body(big.clone())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 413);
        let body = r.bytes().unwrap();
        if json {
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], 8, "{v}");
        } else {
            // google.rpc.Status: field 1 (code) = 8, RESOURCE_EXHAUSTED.
            assert_eq!(&body[..2], &[0x08, 0x08], "{body:?}");
        }
    }
    let stats = run.collector.as_ref().unwrap().stats();
    assert_eq!(stats.profiles.invalid_requests.get(), 1);
    assert_eq!(stats.spans.invalid_requests.get(), 2);
    let metrics = reqwest::blocking::get(format!("{}/metrics", run.base))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fathom_collector_requests_invalid_total") && l.ends_with(" 2")),
        "{metrics}"
    );
}

/// A client that pauses in the middle of an oversize body still gets its 413:
/// the collector reads the rest before it answers and closes, so the kernel
/// does not reset the connection under the response (it did, now and then,
/// in the test above).
#[test]
fn an_oversize_body_sent_slowly_still_gets_its_answer() {
    use std::io::{Read as _, Write as _};
    let run = Running::start();
    let addr = run.otlp_http.trim_start_matches("http://").to_string();
    let len = 3 << 20;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/traces HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![0u8; 1 << 20];
    s.write_all(&chunk).unwrap();
    s.write_all(&chunk[..(1 << 19)]).unwrap();
    // The collector has read past its 1 MiB limit and answered by now.
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&chunk[..(1 << 19)]).unwrap();
    s.write_all(&chunk).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
}

/// Calls a querier method in connect's JSON encoding (as Grafana's
/// Pyroscope data source can), asserting a 200.
fn connect_json(base: &str, method: &str, request: &Value) -> Value {
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/querier.v1.QuerierService/{method}"))
        .header("Content-Type", "application/json")
        .body(request.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    assert_eq!(status, 200, "{method}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// `node` and `@pyroscope/nodejs` (collector/tests/pyroscope-nodejs, `npm
/// ci` there when its node_modules is missing, as scripts/setup does).
fn pyroscope_nodejs(test: &str) -> Option<PathBuf> {
    let node = require_tool(test, "node")?;
    let dir = workspace_root().join("collector/tests/pyroscope-nodejs");
    if !dir.join("node_modules/@pyroscope/nodejs").is_dir() {
        let _ = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status();
    }
    require_found(
        test,
        "@pyroscope/nodejs (npm ci in collector/tests/pyroscope-nodejs)",
        Some(dir.join("node_modules/@pyroscope/nodejs")),
    )?;
    Some(node)
}

/// The Pyroscope Node.js SDK (`@pyroscope/nodejs` from npm, in a real Node
/// program) pushes its wall/CPU and heap profiles to `/ingest`; the CPU
/// burnt in a named function comes out of the querier, with the SDK's
/// labels and its sample labels (`wrapWithLabels`) as series labels.
#[test]
fn pyroscope_nodejs_sdk_pushes_profiles_that_the_querier_serves() {
    let test = "pyroscope_nodejs_sdk_pushes_profiles_that_the_querier_serves";
    let Some(node) = pyroscope_nodejs(test) else {
        return;
    };
    let run = Running::start();
    let start = ms(SystemTime::now()) - 60_000;
    let out = Command::new(node)
        .arg(workspace_root().join("collector/tests/pyroscope-nodejs/push.cjs"))
        .arg(&run.base)
        .arg("3")
        .env("DEBUG", "pyroscope")
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node push.cjs: {log}");
    // The SDK logs refusals only under DEBUG and carries on: none may occur.
    assert!(
        !log.contains("rejected") && !log.contains("Error sending"),
        "{log}"
    );

    let sdk = "{service_name=\"fathom-nodejs-test\"}";
    run.wait_json("/api/series", |v| {
        v.as_array().is_some_and(|a| {
            ["wall", "memory"].iter().all(|n| {
                a.iter()
                    .any(|s| s["profile_name"] == *n && s["service"] == "fathom-nodejs-test")
            })
        })
    });
    let end = ms(SystemTime::now()) + 60_000;
    let range = |mut v: Value| {
        v["start"] = json!(start.to_string());
        v["end"] = json!(end.to_string());
        v
    };
    let types = connect_json(&run.base, "ProfileTypes", &range(json!({})));
    let ids: Vec<&str> = types["profileTypes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["ID"].as_str())
        .collect();
    let cpu = "wall:cpu:nanoseconds:wall:nanoseconds";
    for id in [
        cpu,
        "wall:wall:nanoseconds:wall:nanoseconds",
        "memory:inuse_space:bytes:inuse_space:bytes",
    ] {
        assert!(ids.contains(&id), "{id} not in {ids:?}");
    }
    // The SDK's tags and its own (otel.scope.name …, dots folded to '_').
    let values = connect_json(
        &run.base,
        "LabelValues",
        &range(json!({"name": "region", "matchers": [sdk]})),
    );
    assert_eq!(values["names"], json!(["eu-west"]), "{values}");
    let names = connect_json(&run.base, "LabelNames", &range(json!({"matchers": [sdk]})));
    for n in ["otel_scope_name", "process_runtime_name", "pyroscope_spy"] {
        assert!(names["names"].to_string().contains(n), "{n}: {names}");
    }

    // CPU time: what the process used while burning (it says), most of
    // it in the busy function; windows still open are awaited.
    let cpu_ms: i64 = log
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpu_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cpu_ms= in {log}"));
    assert!(cpu_ms > 300, "the busy loop got {cpu_ms} ms of CPU");
    let deadline = Instant::now() + Duration::from_secs(30);
    let merged = loop {
        let m = connect_json(
            &run.base,
            "SelectMergeStacktraces",
            &range(json!({"profileTypeID": cpu, "labelSelector": sdk})),
        );
        let total: i64 = m["flamegraph"]["total"]
            .as_str()
            .map_or(0, |t| t.parse().unwrap());
        if total >= cpu_ms * 1_000_000 * 8 / 10 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let fg = &merged["flamegraph"];
    let names: Vec<&str> = fg["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let leaf = names
        .iter()
        .position(|n| n.contains("fathomNodeBusyLeaf"))
        .unwrap_or_else(|| panic!("fathomNodeBusyLeaf not in {names:?}"));
    let total: i64 = fg["total"].as_str().unwrap().parse().unwrap();
    // The SDK samples CPU time per wall sample: within 20% of what the
    // process measured (the profile also holds the SDK's own start-up).
    assert!(
        total >= cpu_ms * 1_000_000 * 8 / 10 && total <= cpu_ms * 1_000_000 * 2,
        "profiled CPU {total} ns, the process used {cpu_ms} ms"
    );
    // Flame graph levels: [x offset, total, self, name index] per node.
    let leaf_self: i64 = fg["levels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| {
            let v: Vec<i64> = l["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            x.as_str()
                                .map_or_else(|| x.as_i64().unwrap(), |s| s.parse().unwrap())
                        })
                        .collect()
                })
                .unwrap_or_default();
            v.chunks(4)
                .filter(|c| c.len() == 4 && c[3] == leaf as i64)
                .map(|c| c[2])
                .collect::<Vec<_>>()
        })
        .sum();
    assert!(
        leaf_self * 2 > total,
        "fathomNodeBusyLeaf's self time {leaf_self} of {total}"
    );

    // wrapWithLabels' sample label is a series label, as in Pyroscope.
    let values = connect_json(
        &run.base,
        "LabelValues",
        &range(json!({"name": "endpoint", "matchers": [sdk]})),
    );
    assert_eq!(values["names"], json!(["/busy"]), "{values}");
    let busy = connect_json(
        &run.base,
        "SelectMergeStacktraces",
        &range(json!({"profileTypeID": cpu,
            "labelSelector": "{service_name=\"fathom-nodejs-test\",endpoint=\"/busy\"}"})),
    );
    let busy_total: i64 = busy["flamegraph"]["total"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        busy["flamegraph"]["names"]
            .to_string()
            .contains("fathomNodeBusyLeaf")
            && busy_total * 2 > total,
        "endpoint=/busy: {busy_total} of {total}"
    );

    // The same as pprof, from /api/profile (`go tool pprof`'s URL).
    let pprof = reqwest::blocking::get(format!(
        "{}/api/profile?series=wall%7Bservice_name%3D%22fathom-nodejs-test%22%7D",
        run.base
    ))
    .unwrap();
    assert_eq!(pprof.status().as_u16(), 200);
    let body = pprof.bytes().unwrap();
    let text = String::from_utf8_lossy(&flate2_gunzip(&body)).to_string();
    assert!(
        text.contains("fathomNodeBusyLeaf"),
        "pprof lacks the function"
    );
    // SelectMergeProfile's pprof: the label telling the merged series
    // apart is on their samples (`go tool pprof -tagfocus endpoint=/busy`).
    let merged = connect_json(
        &run.base,
        "SelectMergeProfile",
        &range(json!({"profileTypeID": cpu, "labelSelector": sdk})),
    );
    let strings: Vec<&str> = merged["stringTable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let tagged: usize = merged["sample"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|smp| {
            smp["label"].as_array().is_some_and(|ls| {
                ls.iter().any(|l| {
                    let at = |f: &str| {
                        l[f].as_str()
                            .and_then(|i| i.parse::<usize>().ok())
                            .and_then(|i| strings.get(i).copied())
                    };
                    at("key") == Some("endpoint") && at("str") == Some("/busy")
                })
            })
        })
        .count();
    assert!(tagged > 0, "no sample labelled endpoint=/busy: {merged}");
}

fn flate2_gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(b), &mut out).unwrap();
    out
}

/// An OpenTelemetry SDK tracer provider of `service` exporting over
/// OTLP/HTTP, spans sent as they end.
fn otel_provider(
    otlp_http: &str,
    service: &str,
    attributes: &[KeyValue],
) -> opentelemetry_sdk::trace::SdkTracerProvider {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(format!("{otlp_http}/v1/traces"))
        .build()
        .unwrap();
    opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .with_attributes(attributes.iter().cloned())
                .build(),
        )
        .build()
}

/// Jaeger's `/api/dependencies`: calls between services from spans whose
/// parent span is of another service (OpenTelemetry SDK spans of three
/// services, the context handed across as in-process propagation would),
/// in Jaeger's shape, bounded by `endTs` and `lookback`.
#[test]
fn jaeger_dependencies_from_parent_and_child_services() {
    let run = Running::start();
    let before_ms = ms(SystemTime::now());
    let providers: Vec<_> = ["frontend", "checkout", "payments"]
        .iter()
        .map(|s| otel_provider(&run.otlp_http, s, &[]))
        .collect();
    let tracer = |i: usize| providers[i].tracer("fathom-test");
    for i in 0..3 {
        let root = tracer(0)
            .span_builder("GET /buy")
            .with_kind(SpanKind::Server)
            .start(&tracer(0));
        let cx = opentelemetry::Context::current_with_span(root);
        // frontend → checkout (a server span of checkout), which queries
        // its own database (same service: no dependency).
        let checkout = tracer(1)
            .span_builder("POST /checkout")
            .with_kind(SpanKind::Server)
            .start_with_context(&tracer(1), &cx);
        let ccx = cx.with_span(checkout);
        tracer(1)
            .span_builder("SELECT orders")
            .with_kind(SpanKind::Client)
            .start_with_context(&tracer(1), &ccx)
            .end();
        if i == 0 {
            // checkout → payments, once.
            tracer(2)
                .span_builder("POST /charge")
                .with_kind(SpanKind::Server)
                .start_with_context(&tracer(2), &ccx)
                .end();
        }
        ccx.span().end();
        cx.span().end();
    }
    for p in &providers {
        p.force_flush().unwrap();
    }
    run.wait_json("/api/traces?service=frontend&lookback=1h", |v| {
        v["data"].as_array().is_some_and(|d| {
            d.len() == 3
                && d.iter()
                    .map(|t| t["spans"].as_array().map_or(0, Vec::len))
                    .sum::<usize>()
                    == 10
        })
    });
    let after_ms = ms(SystemTime::now()) + 1000;
    let (status, v) = run.get_json(&format!(
        "/api/dependencies?endTs={after_ms}&lookback={}",
        after_ms - before_ms + 1000
    ));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["errors"], Value::Null, "{v}");
    assert_eq!(
        v["data"],
        json!([
            {"parent": "checkout", "child": "payments", "callCount": 1},
            {"parent": "frontend", "child": "checkout", "callCount": 3},
        ]),
        "{v}"
    );
    assert_eq!(v["total"], 2);
    // Defaults: now, 24 h.
    let (_, v) = run.get_json("/api/dependencies");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    // A window that ends before the traces began: none.
    let (status, v) = run.get_json(&format!(
        "/api/dependencies?endTs={}&lookback=3600000",
        before_ms - 60_000
    ));
    assert_eq!((status, v["data"].clone()), (200, json!([])), "{v}");
    for bad in ["endTs=soon", "lookback=-1", "service=frontend"] {
        let (status, v) = run.get_json(&format!("/api/dependencies?{bad}"));
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["errors"][0]["code"], 400, "{v}");
    }
    for p in providers {
        let _ = p.shutdown();
    }
}

/// A Go-shaped CPU profile whose samples carry `span_id` labels as
/// Pyroscope's SDKs set them (otel-profiling): `spans` are (span id or
/// none, leaf function, samples at 100 Hz).
fn span_profile(spans: &[(Option<&str>, &str, i64)]) -> Vec<u8> {
    use pprof::protos::{self, Message as _};
    let frame = |i: usize, function: &str| Frame {
        address: 0x40_1000 + i as u64 * 0x100,
        function: function.to_string(),
        system_name: function.to_string(),
        file: "main.go".into(),
        line: 10,
    };
    let mut frames: Vec<Frame> = spans
        .iter()
        .enumerate()
        .map(|(i, (_, leaf, _))| frame(i, leaf))
        .collect();
    frames.push(frame(spans.len(), "main.main"));
    let mut p = CpuProfile {
        frequency_hz: 100,
        duration: Duration::from_secs(10),
        mapping_file: "/app/server".into(),
        build_id: "abc".into(),
        memory_start: 0x40_0000,
        memory_limit: 0x80_0000,
        frames,
        samples: spans
            .iter()
            .enumerate()
            .map(|(i, (_, _, n))| (vec![i, spans.len()], *n))
            .collect(),
    }
    .build();
    let key = p.string_table.len() as i64;
    p.string_table.push("span_id".into());
    for (s, (span, _, _)) in p.sample.iter_mut().zip(spans) {
        if let Some(span) = span {
            s.label.push(protos::Label {
                key,
                str: p.string_table.len() as i64,
                num: 0,
                num_unit: 0,
            });
            p.string_table.push(span.to_string());
        }
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&p.encode_to_vec()).unwrap();
    gz.finish().unwrap()
}

/// Grafana's traces-to-profiles: `SelectMergeSpanProfile` with span ids
/// merges only the samples labelled with those spans, from profiles pushed
/// through `/ingest` (two pushes: the same span in both is summed), in both
/// connect encodings of Pyroscope's own protos.
#[test]
fn select_merge_span_profile_merges_the_samples_of_the_given_spans() {
    let test = "select_merge_span_profile_merges_the_samples_of_the_given_spans";
    let Some(py) = python(test) else { return };
    let run = Running::start();
    let start = ms(SystemTime::now()) - 60_000;
    let push = |body: Vec<u8>| {
        let r = reqwest::blocking::Client::new()
            .post(format!(
                "{}/ingest?name=shop%7Benv%3Dprod%7D&format=pprof&spyName=gospy",
                run.base
            ))
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
    };
    let (a, b, c) = ("0123456789abcdef", "fedcba9876543210", "00000000000000aa");
    push(span_profile(&[
        (Some(a), "main.checkout", 30),
        (Some(b), "main.render", 20),
        (Some(c), "main.other", 7),
        (None, "main.background", 50),
    ]));
    push(span_profile(&[(Some(a), "main.checkout", 10)]));
    let cpu = "process_cpu:cpu:nanoseconds:cpu:nanoseconds";
    let sel = "{service_name=\"shop\"}";
    // Both pushes merged (the window closes), 117 samples in all.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = connect_json(
            &run.base,
            "SelectMergeStacktraces",
            &json!({"profileTypeID": cpu, "labelSelector": sel, "start": start.to_string(), "end": "0"}),
        );
        if r["flamegraph"]["total"] == "1170000000" {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let end = ms(SystemTime::now()) + 60_000;
    let req = |spans: Value| {
        json!({"profileTypeID": cpu, "labelSelector": sel, "spanSelector": spans,
               "start": start.to_string(), "end": end.to_string()})
    };
    for encoding in ["proto", "json"] {
        let calls = json!([
            {"method": "SelectMergeSpanProfile", "request": req(json!([a])), "encoding": encoding},
            {"method": "SelectMergeSpanProfile", "request": req(json!([a, b.to_uppercase()])), "encoding": encoding},
            {"method": "SelectMergeSpanProfile", "request": req(json!(["1111111111111111"])), "encoding": encoding},
            {"method": "SelectMergeSpanProfile", "request": req(json!([])), "encoding": encoding},
            {"method": "SelectMergeSpanProfile", "request": req(json!(["span-1"])), "encoding": encoding},
        ]);
        let r = querier(&py, &run.base, &calls);
        let (names, total) = flame(&r[0]);
        assert_eq!(total, 400_000_000, "{encoding}: span a, 30 + 10 samples");
        assert!(names.contains(&"main.checkout".to_string()), "{names:?}");
        assert!(
            !names.contains(&"main.render".to_string())
                && !names.contains(&"main.background".to_string()),
            "{names:?}"
        );
        let (names, total) = flame(&r[1]);
        assert_eq!(total, 600_000_000, "{encoding}: spans a and b");
        assert!(names.contains(&"main.render".to_string()), "{names:?}");
        assert!(!names.contains(&"main.other".to_string()), "{names:?}");
        assert_eq!(flame(&r[2]).1, 0, "{encoding}: an unknown span");
        for bad in &r[3..] {
            assert_eq!(bad["status"], 400, "{encoding}: {bad}");
            assert_eq!(bad["error"]["code"], "invalid_argument", "{bad}");
        }
    }
}
