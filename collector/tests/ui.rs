//! The collector's embedded store and web UI, served for real on 127.0.0.1:
//! `go tool pprof` fetches merged profiles from `/api/profile` (oracle: the
//! same tool merging the original files itself), and headless Chromium
//! renders the page: a screenshot shows the flame graph and a trace
//! waterfall, the DOM has the function and span names.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use fathom_collector::{
    Collector, CollectorConfig,
    model::{RawProfile, SeriesLabels},
    pprof,
    proto::pprof::{Function, Line, Location, Mapping, Profile, Sample, ValueType},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span::SpanKind},
};
use tokio::runtime::Runtime;

mod common;
use common::{fixture, require_tool, workspace_root};

struct Running {
    rt: Runtime,
    collector: Option<Collector>,
    base: String,
    _dir: tempfile::TempDir,
}

impl Running {
    /// A collector with only the embedded store (no exporters), every
    /// listener on a free port of 127.0.0.1, 1 s profile windows.
    fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap())
    }

    /// [`Running::start`] on the store in `dir` (kept from a stopped one).
    fn start_in(dir: tempfile::TempDir) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut config = CollectorConfig::default();
        let local = "127.0.0.1:0".parse().unwrap();
        config.listen.otlp_grpc = Some(local);
        config.listen.otlp_http = Some(local);
        config.listen.http = Some(local);
        config.store.path = dir.path().join("store/collector.redb");
        config.aggregation.window = Duration::from_secs(1);
        config.aggregation.span_batch_timeout = Duration::from_millis(100);
        let collector = rt.block_on(Collector::start(config)).unwrap();
        let base = format!("http://{}", collector.addrs().http.unwrap());
        Self {
            rt,
            collector: Some(collector),
            base,
            _dir: dir,
        }
    }

    /// Shuts the collector down, handing back its store's directory.
    fn stop(mut self) -> tempfile::TempDir {
        if let Some(c) = self.collector.take() {
            self.rt.block_on(c.shutdown(Duration::from_secs(5)));
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, dir)
    }

    fn collector(&self) -> &Collector {
        self.collector.as_ref().unwrap()
    }

    fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let url = format!("{}{path}", self.base);
        self.rt.block_on(async {
            let r = reqwest::get(&url).await.unwrap();
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap().to_vec())
        })
    }

    /// Polls `path` until `ready` holds for its JSON (the aggregation window
    /// and span batches take a moment).
    fn wait_json(
        &self,
        path: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.get(path);
            if status == 200 {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if ready(&v) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{path} not ready: {status} {}",
                String::from_utf8_lossy(&body)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn put_profile(&self, labels: &[(&str, &str)], profile: Profile) {
        self.put_profile_at(labels, profile, SystemTime::now());
    }

    /// [`Running::put_profile`] as received at `received` (its window).
    fn put_profile_at(&self, labels: &[(&str, &str)], profile: Profile, received: SystemTime) {
        self.collector()
            .ingest()
            .profile(RawProfile {
                labels: SeriesLabels::new(labels.iter().copied()).unwrap(),
                profile,
                received,
            })
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.collector.take() {
            self.rt.block_on(c.shutdown(Duration::from_secs(5)));
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `go tool pprof -top` of profile sources (files or URLs), from the
/// "Showing nodes" line on (the rows do not depend on file names or times).
fn go_pprof_top(sources: &[&str], extra: &[&str], tmp: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-nodecount=100", "-symbolize=none"])
        .args(extra)
        .args(sources)
        .env("HOME", tmp)
        .env("PPROF_TMPDIR", tmp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof {sources:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = stdout
        .find("Showing nodes")
        .unwrap_or_else(|| panic!("no table in {stdout}"));
    stdout[start..].to_string()
}

/// Two real CPU profiles of a Go program (`collector/tests/fixtures/cpuprofile.go`).
fn go_cpu_profiles(tmp: &Path) -> (PathBuf, PathBuf) {
    let a = tmp.join("first.pprof");
    let b = tmp.join("second.pprof");
    let status = Command::new("go")
        .arg("run")
        .arg(fixture("cpuprofile.go"))
        .args([&a, &b])
        .status()
        .unwrap();
    assert!(status.success(), "go run cpuprofile.go failed");
    (a, b)
}

#[test]
fn go_pprof_fetches_the_merged_profile_of_a_service() {
    if require_tool("go_pprof_fetches_the_merged_profile_of_a_service", "go").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = go_cpu_profiles(tmp.path());
    let pa = pprof::decode(&std::fs::read(&a).unwrap()).unwrap();
    let pb = pprof::decode(&std::fs::read(&b).unwrap()).unwrap();
    let samples = |p: &Profile| -> i64 { p.sample.iter().map(|s| s.value[0]).sum() };
    let expected_samples = samples(&pa) + samples(&pb);

    let run = Running::start();
    // Two series (pods) of one service, and another service that must not
    // be merged in.
    run.put_profile(
        &[
            ("__name__", "process_cpu"),
            ("service_name", "shop"),
            ("pod", "shop-1"),
        ],
        pa,
    );
    run.put_profile(
        &[
            ("__name__", "process_cpu"),
            ("service_name", "shop"),
            ("pod", "shop-2"),
        ],
        pb,
    );
    run.put_profile(
        &[("__name__", "process_cpu"), ("service_name", "other")],
        pprof::decode(&std::fs::read(&a).unwrap()).unwrap(),
    );
    let q = "service=shop&name=process_cpu";
    let top = run.wait_json(&format!("/ui/api/top?{q}&type=samples"), |v| {
        v["total"].as_i64() == Some(expected_samples)
    });
    assert_eq!(top["series"].as_array().unwrap().len(), 2);

    let url = format!("{}/api/profile?{q}", run.base);
    let served = go_pprof_top(&[&url], &[], tmp.path());
    let oracle = go_pprof_top(&[a.to_str().unwrap(), b.to_str().unwrap()], &[], tmp.path());
    println!("go tool pprof -top {url}:\n{served}");
    assert_eq!(
        served, oracle,
        "merged profile differs from go tool pprof's own merge"
    );
    // Sample counts too.
    let served = go_pprof_top(&[&url], &["-sample_index=samples"], tmp.path());
    let oracle = go_pprof_top(
        &[a.to_str().unwrap(), b.to_str().unwrap()],
        &["-sample_index=samples"],
        tmp.path(),
    );
    assert_eq!(served, oracle);
    assert!(
        served.contains(&format!("{expected_samples} total")),
        "{served}"
    );
    // The top function by flat value is one of the two loops, as in our own
    // top table.
    let first_row = served.lines().nth(2).unwrap();
    let leader = top["functions"][0]["name"].as_str().unwrap();
    assert!(
        first_row.ends_with(leader) && leader.starts_with("main.") && leader.ends_with("Loop"),
        "{first_row} vs {leader}"
    );
    // One series by selector, fetched by go tool pprof with `-raw`.
    let sel = urlencode(r#"process_cpu{pod="shop-1",service_name="shop"}"#);
    let out = Command::new("go")
        .args(["tool", "pprof", "-raw", "-symbolize=none"])
        .arg(format!("{}/api/profile?series={sel}&seconds=30", run.base))
        .env("HOME", tmp.path())
        .env("PPROF_TMPDIR", tmp.path())
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        raw.contains("main.hotLoop") && raw.contains("samples/count"),
        "{raw}"
    );
}

/// A process profiled for 30 s and delivered as three 10 s profiles, each
/// landing in an aggregation window of its own: the profile `/api/profile`
/// merges from the three windows covers all 30 s in `go tool pprof`
/// (`Duration: 30s, Total samples = 27s (90.00%)` for 27 s of CPU), not one
/// window's 10 s (which read 270%). Pushed as the agent does (connect
/// `push.v1`, pprof with its own times) and as legacy clients do (`/ingest`,
/// collapsed stacks with `from`/`until`).
#[test]
fn a_merged_profile_covers_the_time_of_every_window_it_merges() {
    use common::{CpuProfile, Frame};
    use fathom_collector::proto::push::{LabelPair, PushRequest, RawProfileSeries, RawSample};
    use prost::Message as _;
    const TEST: &str = "a_merged_profile_covers_the_time_of_every_window_it_merges";
    if require_tool(TEST, "go").is_none() {
        return;
    }
    let run = Running::start();
    let tmp = tempfile::tempdir().unwrap();
    let http = reqwest::blocking::Client::new();
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Three consecutive 10 s profiles of one process, ending 10 s ago.
    let t0 = now - 40;
    let cpu_samples = [900i64, 800, 1000]; // at 100 Hz: 9 s, 8 s, 10 s
    for (i, &n) in cpu_samples.iter().enumerate() {
        let start = t0 + 10 * i as u64;
        let frame = |address: u64, function: &str| Frame {
            address,
            function: function.into(),
            system_name: function.into(),
            file: "worker.go".into(),
            line: 10,
        };
        let mut p = CpuProfile {
            frequency_hz: 100,
            duration: Duration::from_secs(10),
            mapping_file: "/usr/bin/worker".into(),
            build_id: "b1".into(),
            memory_start: 0x400000,
            memory_limit: 0x500000,
            frames: vec![frame(0x401000, "main.spin"), frame(0x402000, "main.main")],
            samples: vec![(vec![0, 1], n)],
        }
        .build();
        p.time_nanos = (start * 1_000_000_000) as i64;
        let mut gz = Vec::new();
        {
            use std::io::Write as _;
            let mut w = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
            w.write_all(&::pprof::protos::Message::encode_to_vec(&p))
                .unwrap();
            w.finish().unwrap();
        }
        let label = |name: &str, value: &str| LabelPair {
            name: name.into(),
            value: value.into(),
        };
        let push = PushRequest {
            series: vec![RawProfileSeries {
                labels: vec![
                    label("__name__", "process_cpu"),
                    label("service_name", "worker"),
                ],
                samples: vec![RawSample {
                    raw_profile: gz,
                    id: format!("00000000-0000-4000-8000-00000000000{i}"),
                }],
            }],
        };
        let r = http
            .post(format!("{}/push.v1.PusherService/Push", run.base))
            .header("content-type", "application/proto")
            .body(push.encode_to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
        // The same process through the legacy endpoint, as collapsed stacks.
        let r = http
            .post(format!(
                "{}/ingest?name=legacy.cpu&from={start}&until={}&sampleRate=100",
                run.base,
                start + 10
            ))
            .body(format!("main.main;main.spin {n}\n"))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
        // The next push in the next window (1 s here).
        std::thread::sleep(Duration::from_millis(1500));
    }
    for service in ["worker", "legacy"] {
        let top = run.wait_json(&format!("/ui/api/top?service={service}&type=cpu"), |v| {
            v["total"].as_i64() == Some(27_000_000_000)
        });
        assert_eq!(top["windows"], 3, "{service}: {top}");
        let url = format!("{}/api/profile?service={service}", run.base);
        let out = Command::new("go")
            .args(["tool", "pprof", "-top", "-symbolize=none", &url])
            .env("HOME", tmp.path())
            .env("PPROF_TMPDIR", tmp.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let duration = stdout
            .lines()
            .find(|l| l.starts_with("Duration:"))
            .unwrap_or_else(|| panic!("no Duration in {stdout}"));
        println!("{service}: {duration}");
        assert_eq!(
            duration, "Duration: 30s, Total samples = 27s (90.00%)",
            "{service}: {stdout}"
        );
        // `-raw` prints the profile's own duration field.
        let out = Command::new("go")
            .args(["tool", "pprof", "-raw", "-symbolize=none", &url])
            .env("HOME", tmp.path())
            .env("PPROF_TMPDIR", tmp.path())
            .output()
            .unwrap();
        let raw = String::from_utf8_lossy(&out.stdout);
        assert!(
            raw.lines().any(|l| l == "Duration: 30s"),
            "{service}: {raw}"
        );
    }
}

/// A hand-made CPU profile: `(stack root first, samples)`.
fn cpu_profile(stacks: &[(&[&str], i64)]) -> Profile {
    let mut p = Profile {
        string_table: vec![
            String::new(),
            "samples".into(),
            "count".into(),
            "cpu".into(),
            "nanoseconds".into(),
        ],
        sample_type: vec![
            ValueType { r#type: 1, unit: 2 },
            ValueType { r#type: 3, unit: 4 },
        ],
        period_type: Some(ValueType { r#type: 3, unit: 4 }),
        period: 10_000_000,
        mapping: vec![Mapping {
            id: 1,
            memory_start: 0x1000,
            memory_limit: 0x100000,
            ..Mapping::default()
        }],
        ..Profile::default()
    };
    for (stack, n) in stacks {
        let mut ids = Vec::new();
        for name in stack.iter().rev() {
            let fid = match p
                .function
                .iter()
                .find(|f| p.string_table[f.name as usize] == *name)
            {
                Some(f) => f.id,
                None => {
                    p.string_table.push((*name).into());
                    let id = p.function.len() as u64 + 1;
                    p.function.push(Function {
                        id,
                        name: p.string_table.len() as i64 - 1,
                        ..Function::default()
                    });
                    let lid = p.location.len() as u64 + 1;
                    p.location.push(Location {
                        id: lid,
                        mapping_id: 1,
                        address: 0x1000 + lid * 16,
                        line: vec![Line {
                            function_id: id,
                            line: 1,
                            column: 0,
                        }],
                        is_folded: false,
                    });
                    id
                }
            };
            // One location per function, with the same id.
            ids.push(fid);
        }
        p.sample.push(Sample {
            location_id: ids,
            value: vec![*n, n * 10_000_000],
            label: vec![],
        });
    }
    p
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..KeyValue::default()
    }
}

/// A trace of three services: `frontend` (root, `GET /checkout`, 100 + i
/// ms), `payment` (`charge`, an error with an exception event on every
/// fifth trace) and `inventory` (`SELECT stock`, 6.5 ms ending with the
/// root: its duration must stay readable at the waterfall's right edge).
fn shop_trace(i: u64, t0: u64) -> ExportTraceServiceRequest {
    let tid = {
        let mut t = [0xabu8; 16];
        t[8..].copy_from_slice(&(i + 1).to_be_bytes());
        t
    };
    let error = i.is_multiple_of(5);
    let root_ms = 100 + i;
    let span = |id: u8, parent: u8, name: &str, kind: SpanKind, off_us: u64, dur_us: u64| Span {
        trace_id: tid.to_vec(),
        span_id: vec![id; 8],
        parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
        name: name.into(),
        kind: kind as i32,
        start_time_unix_nano: t0 + off_us * 1_000,
        end_time_unix_nano: t0 + (off_us + dur_us) * 1_000,
        attributes: vec![kv(
            "http.status_code",
            if error && id <= 2 { "500" } else { "200" },
        )],
        ..Span::default()
    };
    let mut charge = span(2, 1, "charge", SpanKind::Client, 10_000, 40_000);
    if error {
        charge.status = Some(Status {
            code: 2,
            message: "card declined".into(),
        });
        charge
            .events
            .push(opentelemetry_proto::tonic::trace::v1::span::Event {
                time_unix_nano: t0 + 30_000_000,
                name: "exception".into(),
                attributes: vec![
                    kv("exception.type", "CardDeclinedError"),
                    kv("exception.message", "card declined: insufficient funds"),
                ],
                dropped_attributes_count: 0,
            });
    }
    let rs = |service: &str, spans: Vec<Span>| ResourceSpans {
        resource: Some(Resource {
            attributes: vec![kv("service.name", service)],
            ..Resource::default()
        }),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "shop".into(),
                ..InstrumentationScope::default()
            }),
            spans,
            schema_url: String::new(),
        }],
        schema_url: String::new(),
    };
    ExportTraceServiceRequest {
        resource_spans: vec![
            rs(
                "frontend",
                vec![span(
                    1,
                    0,
                    "GET /checkout",
                    SpanKind::Server,
                    0,
                    root_ms * 1_000,
                )],
            ),
            rs("payment", vec![charge]),
            rs(
                "inventory",
                vec![span(
                    3,
                    1,
                    "SELECT stock",
                    SpanKind::Client,
                    root_ms * 1_000 - 6_500,
                    6_500,
                )],
            ),
        ],
    }
}

/// Adds string labels to samples of `p`: `(sample index, [(key, value)])`.
fn label_samples(p: &mut Profile, labels: &[(usize, &[(&str, &str)])]) {
    let intern = |p: &mut Profile, s: &str| -> i64 {
        match p.string_table.iter().position(|x| x == s) {
            Some(i) => i as i64,
            None => {
                p.string_table.push(s.to_string());
                p.string_table.len() as i64 - 1
            }
        }
    };
    for (i, kvs) in labels {
        for (k, v) in *kvs {
            let (key, str) = (intern(p, k), intern(p, v));
            p.sample[*i]
                .label
                .push(fathom_collector::proto::pprof::Label {
                    key,
                    str,
                    num: 0,
                    num_unit: 0,
                });
        }
    }
}

const SPAN_A: &str = "a1a1a1a1a1a1a1a1";
const SPAN_B: &str = "b2b2b2b2b2b2b2b2";
const SPAN_C: &str = "c3c3c3c3c3c3c3c3";
const SPAN_D: &str = "d4d4d4d4d4d4d4d4";
const SPAN_E: &str = "e5e5e5e5e5e5e5e5";
const TRACE_T: &str = "7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e";
const TRACE_OTHER: &str = "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";

/// A CPU profile of `checkout` whose samples carry span and trace ids as the
/// agent and Pyroscope's SDKs label them: span A (`price` 30, `tax` 10),
/// span B (`payment_call` 20), trace T without a span (`async_flush` 5),
/// span C of another trace (`other_request` 7), and unlabelled `gc` (40).
/// Samples of 10 ms.
fn span_labelled_profile() -> Profile {
    let mut p = cpu_profile(&[
        (&["main", "serve", "checkout_handler", "price"], 30),
        (&["main", "serve", "checkout_handler", "tax"], 10),
        (&["main", "serve", "payment_call"], 20),
        (&["main", "serve", "async_flush"], 5),
        (&["main", "serve", "other_request"], 7),
        (&["main", "gc"], 40),
    ]);
    label_samples(
        &mut p,
        &[
            (0, &[("span_id", SPAN_A), ("trace_id", TRACE_T)]),
            (1, &[("span_id", SPAN_A), ("trace_id", TRACE_T)]),
            (2, &[("span_id", SPAN_B), ("trace_id", TRACE_T)]),
            (3, &[("trace_id", TRACE_T)]),
            (4, &[("span_id", SPAN_C), ("trace_id", TRACE_OTHER)]),
        ],
    );
    p
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// Trace T of `checkout` starting at `t0` (unix ns): server span A (root,
/// `POST /checkout`, 80 ms, `pyroscope.profile.id` = A), its client span B
/// (`charge card`, 30 ms), span D (`render receipt`, 5 ms,
/// `pyroscope.profile.id` = D, no samples) and span E (`load cart`, 10 ms,
/// neither attribute nor samples).
fn span_trace(t0: u64) -> ExportTraceServiceRequest {
    let span =
        |id: &str, parent: Option<&str>, name: &str, kind: SpanKind, off_ms: u64, ms: u64| {
            let mut attributes = vec![kv("http.route", "/checkout")];
            if kind == SpanKind::Server || id == SPAN_D {
                attributes.push(kv("pyroscope.profile.id", id));
            }
            Span {
                trace_id: unhex::<16>(TRACE_T).to_vec(),
                span_id: unhex::<8>(id).to_vec(),
                parent_span_id: parent.map(|p| unhex::<8>(p).to_vec()).unwrap_or_default(),
                name: name.into(),
                kind: kind as i32,
                start_time_unix_nano: t0 + off_ms * 1_000_000,
                end_time_unix_nano: t0 + (off_ms + ms) * 1_000_000,
                attributes,
                ..Span::default()
            }
        };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "checkout")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: None,
                spans: vec![
                    span(SPAN_A, None, "POST /checkout", SpanKind::Server, 0, 80),
                    span(
                        SPAN_B,
                        Some(SPAN_A),
                        "charge card",
                        SpanKind::Client,
                        20,
                        30,
                    ),
                    span(
                        SPAN_D,
                        Some(SPAN_A),
                        "render receipt",
                        SpanKind::Internal,
                        70,
                        5,
                    ),
                    span(SPAN_E, Some(SPAN_A), "load cart", SpanKind::Internal, 2, 10),
                ],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// Sends the span-labelled profile over `push.v1` and trace T over OTLP/HTTP
/// (both real protocol requests), and waits until both are stored.
fn push_span_data(run: &Running) {
    use prost::Message as _;
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let push = push_request("checkout", &span_labelled_profile());
    let otlp = format!(
        "http://{}/v1/traces",
        run.collector().addrs().otlp_http.unwrap()
    );
    run.rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/push.v1.PusherService/Push", run.base))
            .header("content-type", "application/proto")
            .body(push.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "push: {}", r.text().await.unwrap());
        let r = c
            .post(&otlp)
            .header("content-type", "application/x-protobuf")
            .body(span_trace(now_ns - 2_000_000_000).encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "OTLP: {}", r.text().await.unwrap());
    });
    run.wait_json("/ui/api/top?service=checkout&type=samples", |v| {
        v["total"].as_i64() == Some(112)
    });
    run.wait_json(&format!("/ui/api/traces/{TRACE_T}"), |v| {
        v["spans"].as_array().is_some_and(|s| s.len() == 4)
    });
}

/// The span and trace filters of the profile API, on samples labelled as
/// the agent and Pyroscope's SDKs label them (sent over `push.v1`): only
/// the labelled samples' frames and totals come out, in pprof that `go tool
/// pprof` reads; a span without samples is a 404 that says so, a malformed
/// id a 400; `/ui/api/traces/{id}/profiles` gives each span's total.
#[test]
fn span_and_trace_ids_select_the_labelled_samples() {
    let run = Running::start();
    push_span_data(&run);
    // Fetched and decoded as the pprof it is: samples and function names.
    let fetch = |q: &str| -> (u16, Option<Profile>, String) {
        let (status, body) = run.get(&format!("/api/profile?{q}"));
        if status != 200 {
            return (status, None, String::from_utf8_lossy(&body).into_owned());
        }
        (status, Some(pprof::decode(&body).unwrap()), String::new())
    };
    let summary = |p: &Profile| -> (i64, Vec<String>) {
        let i = pprof::sample_index(p, Some("samples"));
        let (top, total) = pprof::top(p, i);
        let mut names: Vec<String> = top.into_iter().map(|f| f.name).collect();
        names.sort();
        (total, names)
    };
    let names = |v: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    // Span A: its two stacks only.
    let (status, p, msg) = fetch(&format!("service=checkout&span_id={SPAN_A}"));
    assert_eq!(status, 200, "{msg}");
    let p = p.unwrap();
    assert_eq!(
        summary(&p),
        (
            40,
            names(&["main", "serve", "checkout_handler", "price", "tax"])
        )
    );
    // Upper-case ids, several ids, and no series selector (every series).
    let (_, p, _) = fetch(&format!("span_id={},{SPAN_B}", SPAN_A.to_ascii_uppercase()));
    assert_eq!(
        summary(&p.unwrap()),
        (
            60,
            names(&[
                "main",
                "serve",
                "checkout_handler",
                "price",
                "tax",
                "payment_call"
            ])
        )
    );
    // The trace: its stored spans' samples and those labelled only with its
    // trace id; never the other trace's or the unlabelled ones.
    let (_, p, _) = fetch(&format!("service=checkout&trace_id={TRACE_T}"));
    let (total, fns) = summary(&p.unwrap());
    assert_eq!(total, 65, "{fns:?}");
    assert!(
        fns.contains(&"async_flush".to_string())
            && !fns.contains(&"gc".to_string())
            && !fns.contains(&"other_request".to_string()),
        "{fns:?}"
    );
    // Unfiltered: everything.
    let (_, p, _) = fetch("service=checkout");
    assert_eq!(summary(&p.unwrap()).0, 112);
    // The same filter on the JSON and SVG endpoints.
    let top = run.get_json(&format!(
        "/ui/api/top?service=checkout&type=cpu&span_id={SPAN_B}"
    ));
    assert_eq!(top["total"].as_i64(), Some(200_000_000), "{top}");
    let (status, svg) = run.get(&format!(
        "/ui/api/flamegraph.svg?service=checkout&span_id={SPAN_B}"
    ));
    let svg = String::from_utf8_lossy(&svg);
    assert_eq!(status, 200);
    assert!(svg.contains("payment_call") && !svg.contains("price"));
    // A span without samples: 404 saying so; malformed ids: 400.
    let (status, _, msg) = fetch(&format!("service=checkout&span_id={SPAN_D}"));
    assert_eq!(status, 404);
    assert!(msg.contains("no sample") && msg.contains(SPAN_D), "{msg}");
    for bad in ["span_id=xyz", "span_id=a1a1a1a1a1a1a1a1a1", "trace_id=123"] {
        let (status, _, msg) = fetch(&format!("service=checkout&{bad}"));
        assert_eq!(status, 400, "{bad}: {msg}");
    }
    // go tool pprof reads the filtered profile from the URL.
    if require_tool("span_and_trace_ids_select_the_labelled_samples", "go").is_some() {
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("{}/api/profile?service=checkout&span_id={SPAN_A}", run.base);
        let top = go_pprof_top(&[&url], &["-sample_index=samples"], tmp.path());
        println!("go tool pprof -top {url}:\n{top}");
        assert!(top.contains("40 total"), "{top}");
        assert!(top.contains(" price") && top.contains(" tax"), "{top}");
        assert!(
            !top.contains(" gc") && !top.contains("payment_call"),
            "{top}"
        );
    }
    // Per span of the trace, per profile type (cpu first: the largest).
    let tp = run.get_json(&format!("/ui/api/traces/{TRACE_T}/profiles"));
    let cpu = &tp["types"][0];
    assert_eq!(
        cpu["type_id"], "process_cpu:cpu:nanoseconds:cpu:nanoseconds",
        "{tp}"
    );
    assert_eq!(
        cpu["spans"],
        serde_json::json!({ "": 50_000_000, SPAN_A: 400_000_000, SPAN_B: 200_000_000 }),
        "{tp}"
    );
    assert_eq!(cpu["total"].as_i64(), Some(650_000_000));
    assert_eq!(tp["types"][1]["spans"][SPAN_A].as_i64(), Some(40), "{tp}");
    let (from, until) = (
        tp["from_ms"].as_u64().unwrap(),
        tp["until_ms"].as_u64().unwrap(),
    );
    assert!(until > from && until - from >= 30_000, "{tp}");
    let (status, _) = run.get("/ui/api/traces/00000000000000000000000000000001/profiles");
    assert_eq!(status, 404);
    let (status, _) = run.get(&format!("/ui/api/traces/{TRACE_T}/profiles?x=1"));
    assert_eq!(status, 400);
}

/// `POST` of a connect JSON call to the Pyroscope querier; its JSON answer.
fn querier_json(run: &Running, method: &str, req: serde_json::Value) -> serde_json::Value {
    let url = format!("{}/querier.v1.QuerierService/{method}", run.base);
    run.rt.block_on(async {
        let r = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .body(req.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{method}: {text}");
        serde_json::from_str(&text).unwrap()
    })
}

/// `push.v1` splits a profile into series by its string sample labels (Go's
/// `pprof.Do`, the SDKs' tag wrappers), as Pyroscope's distributor and
/// `/ingest` do: the label is selectable in the querier and the totals per
/// series are the labelled samples'; span ids and numeric labels stay on
/// the samples (span filter, `-tagfocus`).
#[test]
fn push_splits_series_by_sample_labels() {
    use prost::Message as _;
    let run = Running::start();
    let mut p = cpu_profile(&[
        (&["main", "handle", "busy_loop"], 30),
        (&["main", "handle", "idle_wait"], 20),
        (&["main", "gc"], 5),
    ]);
    label_samples(
        &mut p,
        &[
            (0, &[("endpoint", "/busy"), ("span_id", SPAN_A)]),
            (1, &[("endpoint", "/idle")]),
        ],
    );
    // A numeric label, as the agent's pid/tid.
    let pid = p.string_table.len() as i64;
    p.string_table.push("pid".into());
    p.sample[2]
        .label
        .push(fathom_collector::proto::pprof::Label {
            key: pid,
            str: 0,
            num: 4242,
            num_unit: 0,
        });
    let push = push_request("shop", &p);
    run.rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/push.v1.PusherService/Push", run.base))
            .header("content-type", "application/proto")
            .body(push.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    });
    run.wait_json("/ui/api/top?service=shop&type=samples", |v| {
        v["total"].as_i64() == Some(55)
    });
    let cpu = "process_cpu:cpu:nanoseconds:cpu:nanoseconds";
    let values = querier_json(
        &run,
        "LabelValues",
        serde_json::json!({"name": "endpoint", "matchers": ["{service_name=\"shop\"}"]}),
    );
    assert_eq!(values["names"], serde_json::json!(["/busy", "/idle"]));
    let names = querier_json(&run, "LabelNames", serde_json::json!({}));
    let names: Vec<&str> = names["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"endpoint") && !names.contains(&"span_id") && !names.contains(&"pid"),
        "{names:?}"
    );
    let series = querier_json(
        &run,
        "Series",
        serde_json::json!({"matchers": ["{service_name=\"shop\",__profile_type__=\"process_cpu:cpu:nanoseconds:cpu:nanoseconds\"}"]}),
    );
    assert_eq!(series["labelsSet"].as_array().unwrap().len(), 3, "{series}");
    let total = |sel: &str| -> i64 {
        let r = querier_json(
            &run,
            "SelectMergeStacktraces",
            serde_json::json!({"profileTypeID": cpu, "labelSelector": sel, "start": "0", "end": "0"}),
        );
        r["flamegraph"]["total"]
            .as_str()
            .map_or(0, |t| t.parse().unwrap())
    };
    assert_eq!(
        total("{service_name=\"shop\",endpoint=\"/busy\"}"),
        300_000_000
    );
    assert_eq!(
        total("{service_name=\"shop\",endpoint=\"/idle\"}"),
        200_000_000
    );
    assert_eq!(total("{service_name=\"shop\",endpoint=\"\"}"), 50_000_000);
    assert_eq!(total("{service_name=\"shop\"}"), 550_000_000);
    // The span id stays on its sample: the span's profile is found.
    let top = run.get_json(&format!(
        "/ui/api/top?service=shop&type=samples&span_id={SPAN_A}"
    ));
    assert_eq!(top["total"].as_i64(), Some(30), "{top}");
    // The numeric pid stays on its sample in the pprof served.
    let (status, body) = run.get("/api/profile?series=%7Bservice_name%3D%22shop%22%7D");
    assert_eq!(status, 200);
    let served = pprof::decode(&body).unwrap();
    let pid_key = served.string_table.iter().position(|s| s == "pid").unwrap() as i64;
    assert!(
        served
            .sample
            .iter()
            .any(|s| s.label.iter().any(|l| l.key == pid_key && l.num == 4242)),
        "pid label kept"
    );
}

/// OTLP metrics of `checkout` at `t` (unix ns): a gauge, a counter and a
/// histogram in seconds.
fn shop_metrics(
    t: u64,
    step: u64,
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::{
        collector::metrics::v1::ExportMetricsServiceRequest,
        metrics::v1::{
            AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
            ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point::Value,
        },
    };
    let number = |v: f64| NumberDataPoint {
        time_unix_nano: t,
        start_time_unix_nano: t - step * 60_000_000_000 - 1,
        value: Some(Value::AsDouble(v)),
        ..NumberDataPoint::default()
    };
    // Cumulative: 10 observations per step, all at 0.1-0.25 s.
    let n = 10 * (step + 1);
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "checkout")],
                ..Resource::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    Metric {
                        name: "queue.depth".into(),
                        description: "jobs waiting".into(),
                        data: Some(Data::Gauge(Gauge {
                            data_points: vec![number(4.0 + step as f64)],
                        })),
                        ..Metric::default()
                    },
                    Metric {
                        name: "orders".into(),
                        description: "orders placed".into(),
                        data: Some(Data::Sum(Sum {
                            data_points: vec![number(60.0 * (step + 1) as f64)],
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })),
                        ..Metric::default()
                    },
                    Metric {
                        name: "http.server.request.duration".into(),
                        description: "request latency".into(),
                        unit: "s".into(),
                        data: Some(Data::Histogram(Histogram {
                            data_points: vec![HistogramDataPoint {
                                time_unix_nano: t,
                                start_time_unix_nano: t - step * 60_000_000_000 - 1,
                                count: n,
                                sum: Some(0.2 * n as f64),
                                bucket_counts: vec![0, n, 0],
                                explicit_bounds: vec![0.1, 0.25],
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

/// `billing`'s memory gauge (bytes) at its two pushes.
const BILLING_MEMORY: [f64; 2] = [1_572_864.0, 2_359_296.0];

/// OTLP metrics of `billing` at `t` (unix ns), the `step`-th push: memory
/// in bytes (`By`: 1.5 MiB, then 2.25 MiB), a lag in seconds (`s`: 0.5, then
/// 0.25) and a utilization ratio (`1`: 0.3, then 0.425).
fn billing_metrics(
    t: u64,
    step: u64,
) -> opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest {
    use opentelemetry_proto::tonic::{
        collector::metrics::v1::ExportMetricsServiceRequest,
        metrics::v1::{
            Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric::Data,
            number_data_point::Value,
        },
    };
    let i = step as usize;
    let gauge = |name: &str, unit: &str, v: f64| Metric {
        name: name.into(),
        unit: unit.into(),
        data: Some(Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint {
                time_unix_nano: t,
                value: Some(Value::AsDouble(v)),
                ..NumberDataPoint::default()
            }],
        })),
        ..Metric::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "billing")],
                ..Resource::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![
                    gauge("memory.usage", "By", BILLING_MEMORY[i]),
                    gauge("billing.job.lag", "s", [0.5, 0.25][i]),
                    gauge("cpu.utilization", "1", [0.3, 0.425][i]),
                ],
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    }
}

/// `POST /v1/metrics` (OTLP/HTTP protobuf) to the collector.
fn push_otlp_metrics(
    run: &Running,
    req: &opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
) {
    use prost::Message as _;
    let url = format!(
        "http://{}/v1/metrics",
        run.collector().addrs().otlp_http.unwrap()
    );
    run.rt.block_on(async {
        let r = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/x-protobuf")
            .body(req.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "OTLP metrics: {}", r.text().await.unwrap());
    });
}

/// The metric history is kept in the store: after a restart (the registry
/// then empty) the series and every point are still there, and new points
/// add to them.
#[test]
fn metric_history_survives_a_restart() {
    let run = Running::start();
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for step in 0..3u64 {
        let t = now_ns - (3 - step) * 60_000_000_000;
        run.collector()
            .ingest()
            .metrics(shop_metrics(t, step))
            .unwrap();
        let want = 4.0 + step as f64;
        run.wait_json("/ui/api/metrics?name=queue_depth", |v| {
            v[0]["value"].as_f64() == Some(want)
        });
    }
    let query = "/ui/api/metrics?service=checkout&range=1h";
    let before = run.wait_json(query, |v| v.as_array().is_some_and(|a| a.len() == 3));
    let points = |v: &serde_json::Value, name: &str| -> Vec<serde_json::Value> {
        let row = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {v}"));
        row["points"].as_array().unwrap().clone()
    };
    let gauge = points(&before, "queue_depth");
    let values: Vec<f64> = gauge.iter().map(|p| p["v"].as_f64().unwrap()).collect();
    assert_eq!(values, [4.0, 5.0, 6.0], "{before}");
    let latency = points(&before, "http_server_request_duration");
    assert_eq!(latency.len(), 3);
    assert!(latency[1]["p50"].as_f64().is_some(), "{latency:?}");

    let dir = run.stop();
    let run = Running::start_in(dir);
    let after = run.get_json(query);
    assert_eq!(after.as_array().map(Vec::len), Some(3), "{after}");
    assert_eq!(points(&after, "queue_depth"), gauge, "gauge after restart");
    assert_eq!(
        points(&after, "http_server_request_duration"),
        latency,
        "histogram after restart"
    );
    assert!(
        after
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["current"] == false),
        "the registry is new: {after}"
    );
    // A new point adds to the history read back (the histogram's window
    // from the stored buckets: 10 observations).
    run.collector()
        .ingest()
        .metrics(shop_metrics(now_ns, 3))
        .unwrap();
    let grown = run.wait_json(query, |v| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .all(|r| r["points"].as_array().is_some_and(|p| p.len() == 4))
        })
    });
    let latency = points(&grown, "http_server_request_duration");
    assert_eq!(latency[3]["count"].as_u64(), Some(10), "{latency:?}");
    let dir = run.stop();
    drop(dir);
}

/// The `fathom-collector` binary on a store of its own, every listener on a
/// free port of 127.0.0.1, started until it logs its UI line.
struct Standalone {
    child: std::process::Child,
    /// The start-up lines up to and with the UI's (`UI at …`).
    log: Vec<String>,
    ui_line: String,
}

impl Standalone {
    fn start(store: &Path) -> Self {
        use std::io::BufRead as _;
        let any = "127.0.0.1:0";
        let mut child = Command::new(env!("CARGO_BIN_EXE_fathom-collector"))
            .args(["--otlp-grpc-listen", any, "--otlp-http-listen", any])
            .args(["--http-listen", any, "--store-path"])
            .arg(store)
            .env("FATHOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads (and echoes) the log to the end, so the pipe never fills.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("  collector: {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("UI at ") => {
                    log.push(line.clone());
                    return Self {
                        child,
                        log,
                        ui_line: line,
                    };
                }
                Ok(line) => log.push(line),
                Err(e) => {
                    let _ = child.kill();
                    panic!("no `UI at` line from fathom-collector ({e}): {log:#?}");
                }
            }
        }
    }

    /// The port of `listener` in the `collector listening` line
    /// (`otlp_grpc=Some(127.0.0.1:PORT)`).
    fn port(&self, listener: &str) -> u16 {
        let key = format!("{listener}=Some(127.0.0.1:");
        self.log
            .iter()
            .find(|l| l.contains("collector listening"))
            .and_then(|l| l.split(&key).nth(1))
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no {listener} port in {:#?}", self.log))
    }

    /// SIGTERM; it must stop cleanly.
    fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "fathom-collector exited {status}");
    }
}

/// Where the browser tests leave their screenshots for CI to keep:
/// `$FATHOM_ARTIFACTS_DIR/ui/`, by default `<workspace>/target/artifacts/ui/`
/// whatever the cargo target directory is (`.ci/run` lists it at its end).
fn screenshots_dir() -> PathBuf {
    let root = std::env::var_os("FATHOM_ARTIFACTS_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| workspace_root().join("target/artifacts"), PathBuf::from);
    let dir = root.join("ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The screenshots in `dir` written since `since`: each a PNG of the
/// page's width (1500 px, full page), by name.
fn fresh_screenshots(dir: &Path, since: SystemTime) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        if path.extension().is_none_or(|e| e != "png") || modified < since {
            continue;
        }
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let info = decoder
            .read_info()
            .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display()));
        let (w, h) = (info.info().width, info.info().height);
        assert!(w == 1500 && h >= 1000, "{}: {w}x{h}", path.display());
        names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    names
}

/// `npm ci` in `collector/tests/browser` when its `node_modules` is missing
/// (scripts/setup runs it too).
/// What a browser test needs: Chromium, node and the test's npm packages
/// (`tests/browser`, installed on first use); `None` (the test skips, with
/// the reason printed) when Chromium or node is missing. Returns the
/// browser directory and the screenshots' ([`screenshots_dir`]).
fn browser_setup(test: &str) -> Option<(PathBuf, PathBuf)> {
    let chromium = fathom_test_support::require_found(
        test,
        "chromium",
        Some(PathBuf::from("/usr/bin/chromium")),
    );
    chromium?;
    require_tool(test, "node")?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    browser_deps(&dir);
    Some((dir, screenshots_dir()))
}

fn browser_deps(dir: &Path) {
    if dir.join("node_modules/playwright-core").is_dir() {
        return;
    }
    let ok = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "npm ci in {} failed", dir.display());
}

/// Runs `ui.mjs`'s `phase`; it must pass and leave its screenshots, each
/// named in `want_shots`, in `shots`.
fn run_browser(
    script: &Path,
    base: &str,
    phase: &str,
    expect: &serde_json::Value,
    shots: &Path,
    want_shots: &[&str],
) {
    // Whole seconds: file times may be coarser than the clock.
    let since = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let out = Command::new("node")
        .arg(script)
        .env("BASE", base)
        .env("PHASE", phase)
        .env("EXPECT", expect.to_string())
        .env("SHOTS", shots)
        .env("CHROMIUM", "/usr/bin/chromium")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap();
    assert!(out.success(), "browser checks ({phase}) failed");
    let fresh = fresh_screenshots(shots, since);
    println!(
        "{phase}: {} screenshots in {}: {fresh:?}",
        fresh.len(),
        shots.display()
    );
    for want in want_shots {
        assert!(
            fresh.iter().any(|f| f == want),
            "{phase}: no fresh {want}.png in {}: {fresh:?}",
            shots.display()
        );
    }
}

/// Headless Chromium drives the three views (playwright-core): onboarding
/// on the standalone collector's empty store (its start-up line names the
/// UI and the store; the onboarding the bound ports and the store), then
/// profiles (flame graph labels and units after
/// zoom and search, table, top-down, label chips and their ×, timeline
/// brush, diff, download), traces (search by service, operation, tags, min
/// and max durations, errors; counts, paging, sorting; trace id box;
/// waterfall ruler, collapsing one span and all, right-edge durations,
/// event attributes; 400s), span and trace → flame graph links (only the
/// span-labelled samples; an honest empty state) and metrics (history,
/// units, service filter), light and dark (no near-white panel or area on
/// the profiles, traces and metrics views). Screenshots go to
/// [`screenshots_dir`].
#[test]
fn browser_drives_profiles_traces_and_metrics_views() {
    const TEST: &str = "browser_drives_profiles_traces_and_metrics_views";
    let Some((dir, shots)) = browser_setup(TEST) else {
        return;
    };
    let script = dir.join("ui.mjs");

    // 1. The standalone collector on an empty store: its start-up log
    // names the UI's address and the store, the UI's onboarding the bound
    // ports and the store.
    {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store/collector.redb");
        let standalone = Standalone::start(&store);
        let line = standalone.ui_line.clone();
        eprintln!("start-up: {line}");
        let url = line
            .split("UI at ")
            .nth(1)
            .and_then(|r| r.split([',', ' ']).next())
            .unwrap_or_default()
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:") && url.ends_with('/'),
            "{line}"
        );
        assert!(
            line.contains(&format!("store {}", store.display())),
            "the start-up line names the store {}: {line}",
            store.display()
        );
        let (grpc, http) = (standalone.port("otlp_grpc"), standalone.port("otlp_http"));
        let expect = serde_json::json!({
            "otlp_grpc_port": grpc,
            "otlp_http_port": http,
            "store_path": store.display().to_string(),
        });
        run_browser(
            &script,
            url.trim_end_matches('/'),
            "empty",
            &expect,
            &shots,
            &["empty-profiles"],
        );
        standalone.stop();
    }

    let run = Running::start();

    // 2. Data: profiles of two pods (pod api-1 only runs `compress`), 30
    // traces, metrics at four times over the last 3 minutes.
    let now_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let base_stacks: &[(&[&str], i64)] = &[
        (&["main", "api::serve", "api::parse_json"], 60),
        (&["main", "api::serve", "db::query"], 30),
        (&["main", "runtime::park"], 10),
    ];
    run.put_profile(
        &[
            ("__name__", "process_cpu"),
            ("service_name", "api"),
            ("pod", "api-0"),
        ],
        cpu_profile(base_stacks),
    );
    run.put_profile(
        &[
            ("__name__", "process_cpu"),
            ("service_name", "api"),
            ("pod", "api-1"),
        ],
        cpu_profile(&[(&["main", "api::serve", "zstd::compress"], 50)]),
    );
    for i in 0..30u64 {
        let t0 = now_ns - (30 - i) * 20_000_000_000;
        run.collector().ingest().spans(shop_trace(i, t0)).unwrap();
    }
    for step in 0..4u64 {
        let t = now_ns - (3 - step) * 60_000_000_000;
        run.collector()
            .ingest()
            .metrics(shop_metrics(t, step))
            .unwrap();
        // Each push is seen (and recorded) before the next.
        let want = 4.0 + step as f64;
        run.wait_json("/ui/api/metrics?name=queue_depth", |v| {
            v[0]["value"].as_f64() == Some(want)
        });
    }
    // A second service's metrics, 40 and 30 minutes ago, over OTLP/HTTP:
    // in the last hour's range, not in the last 15 minutes'.
    let billing_times: Vec<u64> = [40u64, 30]
        .iter()
        .map(|m| now_ns - m * 60_000_000_000)
        .collect();
    for (step, &t) in billing_times.iter().enumerate() {
        push_otlp_metrics(&run, &billing_metrics(t, step as u64));
        let want = BILLING_MEMORY[step];
        run.wait_json(
            "/ui/api/metrics?service=billing&name=memory&range=all",
            |v| {
                v[0]["points"]
                    .as_array()
                    .is_some_and(|p| p.len() == step + 1 && p[step]["v"].as_f64() == Some(want))
            },
        );
    }
    run.wait_json(
        &format!("/ui/api/top?series={}", urlencode("{service_name=\"api\"}")),
        |v| v["total"].as_i64() == Some(1_500_000_000),
    );
    run.wait_json("/ui/api/status", |v| v["spans"].as_u64() == Some(90));
    // Span-labelled samples of `checkout` and its trace T (4 spans), and
    // an off-CPU profile whose blocked time in span A (10 s) is larger than
    // its CPU: the span's link still opens the CPU profile.
    push_span_data(&run);
    let mut off_cpu = cpu_profile(&[(&["main", "serve", "futex_wait"], 1_000)]);
    off_cpu.string_table[3] = "off_cpu".into();
    label_samples(&mut off_cpu, &[(0, &[("span_id", SPAN_A)])]);
    run.put_profile(
        &[("__name__", "off_cpu"), ("service_name", "checkout")],
        off_cpu,
    );
    run.wait_json(&format!("/ui/api/traces/{TRACE_T}/profiles"), |v| {
        v["types"].as_array().is_some_and(|t| t.len() == 4)
            && v["types"][0]["type_id"] == "off_cpu:off_cpu:nanoseconds:off_cpu:nanoseconds"
    });

    // What the views must show, from the data above.
    let durations: Vec<u64> = (0..30).map(|i| 100 + i).collect();
    let expect = serde_json::json!({
        // 150 samples of 10 ms; api-0 100, api-1 50; parse_json 60.
        "total_all": "1.5 s",
        "total_api1": "500 ms",
        "total_api0": "1 s",
        "selector_a": "{service_name=\"api\",pod=\"api-0\"}",
        "selector_b": "{service_name=\"api\",pod=\"api-1\"}",
        "parse_json_self": "600 ms",
        "parse_json_pct": "40%",
        "functions": ["api::parse_json", "db::query", "runtime::park", "zstd::compress", "api::serve", "main"],
        "traces_frontend": 30,
        "traces_errors": 6,
        "traces_min_120ms": durations.iter().filter(|d| **d >= 120).count(),
        "traces_max_110ms": durations.iter().filter(|d| **d <= 110).map(|d| format!("{d} ms")).collect::<Vec<_>>(),
        "longest": format!("{} ms", durations.iter().max().unwrap()),
        "error_trace": format!("{}{:016x}", "ab".repeat(8), 1),
        "short_span": "6.5 ms",
        "exception_message": "card declined: insufficient funds",
        "metric_points": 4,
        "gauge_last": "7",
        // billing: 3 series of 2 points (40 and 30 min ago), shown in their
        // units; checkout: 3 series in the last 15 minutes.
        "billing": {
            "times_ms": billing_times.iter().map(|t| t / 1_000_000).collect::<Vec<_>>(),
            "series": {
                "memory_usage_bytes": "2.25 MiB",
                "billing_job_lag_seconds": "250 ms",
                "cpu_utilization_ratio": "42.5%",
            },
        },
        "checkout_series": ["http_server_request_duration_seconds", "orders_total", "queue_depth"],
        // Span → flame graph: span A 40 samples (price 30, tax 10), span B
        // 20, span D none; the trace's spans 60 (its trace-only sample is
        // not a span's).
        "span_trace": TRACE_T,
        "span_a": SPAN_A,
        "span_b": SPAN_B,
        "span_d": SPAN_D,
        "span_e": SPAN_E,
        "span_a_total": "400 ms",
        "span_a_price": "300 ms",
        "span_a_price_pct": "75%",
        "trace_total": "600 ms",
    });
    run_browser(
        &script,
        &run.base,
        "data",
        &expect,
        &shots,
        &[
            "profiles",
            "profiles-zoomed",
            "profiles-diff-labels",
            "profiles-dark",
            "traces-waterfall",
            "traces-dark",
            "span-profile",
            "metrics",
            "metrics-billing",
            "metrics-dark",
        ],
    );
}

/// The Profiles view's diff of two time ranges, in headless Chromium, on
/// two real CPU profiles of one Go program (`cpuprofile.go`: the first
/// mostly in `hotLoop`, the second mostly in `warmLoop`) stored 10 and 2
/// minutes ago: with A and B set to a range around each, the page's totals
/// are each profile's CPU time, its diff tree holds each loop's CPU time in
/// A and in B as the profiles have it (summed from the files here), the
/// tooltip says so, and the loop whose share shrank is green, the one whose
/// share grew red.
#[test]
fn browser_diff_of_two_ranges_shows_what_grew_and_shrank() {
    const TEST: &str = "browser_diff_of_two_ranges_shows_what_grew_and_shrank";
    let (Some((dir, shots)), Some(_)) = (browser_setup(TEST), require_tool(TEST, "go")) else {
        return;
    };

    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = go_cpu_profiles(tmp.path());
    let pa = pprof::decode(&std::fs::read(&a).unwrap()).unwrap();
    let pb = pprof::decode(&std::fs::read(&b).unwrap()).unwrap();
    const LOOPS: [&str; 2] = ["main.hotLoop", "main.warmLoop"];
    // Total CPU time, and each loop's (a sample counts for a function once,
    // wherever the function is on its stack).
    let cpu = |p: &Profile| -> (i64, [i64; 2]) {
        let s = |i: i64| p.string_table[i as usize].as_str();
        let vi = p
            .sample_type
            .iter()
            .position(|vt| s(vt.r#type) == "cpu")
            .unwrap();
        let name_of = |loc_id: u64| -> Vec<&str> {
            let loc = p.location.iter().find(|l| l.id == loc_id).unwrap();
            loc.line
                .iter()
                .map(|line| {
                    let f = p
                        .function
                        .iter()
                        .find(|f| f.id == line.function_id)
                        .unwrap();
                    s(f.name)
                })
                .collect()
        };
        let mut total = 0;
        let mut loops = [0i64; 2];
        for sample in &p.sample {
            let v = sample.value[vi];
            total += v;
            let names: Vec<&str> = sample
                .location_id
                .iter()
                .flat_map(|&l| name_of(l))
                .collect();
            for (i, f) in LOOPS.iter().enumerate() {
                if names.contains(f) {
                    loops[i] += v;
                }
            }
        }
        (total, loops)
    };
    let (total_a, loops_a) = cpu(&pa);
    let (total_b, loops_b) = cpu(&pb);
    println!("A: total {total_a} ns, loops {loops_a:?}; B: total {total_b} ns, loops {loops_b:?}");
    // The programme's shares: hotLoop 70% then 25%, warmLoop 30% then 75%.
    assert!(
        loops_a[0] * total_b > loops_b[0] * total_a,
        "hotLoop's share shrinks"
    );
    assert!(
        loops_a[1] * total_b < loops_b[1] * total_a,
        "warmLoop's share grows"
    );

    let run = Running::start();
    let now = SystemTime::now();
    let at_a = now - Duration::from_secs(600);
    let at_b = now - Duration::from_secs(120);
    let labels = [("__name__", "process_cpu"), ("service_name", "shop")];
    run.put_profile_at(&labels, pa, at_a);
    run.put_profile_at(&labels, pb, at_b);
    run.wait_json("/ui/api/top?service=shop&range=15m&type=cpu", |v| {
        v["total"].as_i64() == Some(total_a + total_b) && v["windows"] == 2
    });
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let minute = Duration::from_secs(60);
    let expect = serde_json::json!({
        "selector": "{service_name=\"shop\"}",
        "a_from": ms(at_a - minute),
        "a_until": ms(at_a + minute),
        "b_from": ms(at_b - minute),
        "b_until": ms(at_b + minute),
        "total_a": total_a,
        "total_b": total_b,
        "loops": {
            LOOPS[0]: [loops_a[0], loops_b[0]],
            LOOPS[1]: [loops_a[1], loops_b[1]],
        },
        "shrank": LOOPS[0],
        "grew": LOOPS[1],
    });
    run_browser(
        &dir.join("ui.mjs"),
        &run.base,
        "diff",
        &expect,
        &shots,
        &["profiles-diff-ranges"],
    );
}

/// The Profiles view's time range, in headless Chromium: three CPU
/// profiles of one service stored 12, 7 and 2 minutes ago (each with a
/// function of its own); brushing the timeline from between the first two
/// bars to between the last two, then typing From/Until and pressing Apply
/// (around the first profile, then over the first two), the flame graph's
/// total is the sum of the profiles whose time is in the range the URL
/// holds, and its functions theirs only.
#[test]
fn browser_timeline_brush_and_typed_range_select_what_was_pushed_then() {
    const TEST: &str = "browser_timeline_brush_and_typed_range_select_what_was_pushed_then";
    let Some((dir, shots)) = browser_setup(TEST) else {
        return;
    };

    let run = Running::start();
    let now = SystemTime::now();
    let labels = [("__name__", "process_cpu"), ("service_name", "timeline")];
    // (minutes ago, function, samples of 10 ms)
    let pushes = [
        (12u64, "early_work", 100i64),
        (7, "middle_work", 50),
        (2, "late_work", 20),
    ];
    let mut expect_pushes = Vec::new();
    for (ago, function, n) in pushes {
        let at = now - Duration::from_secs(60 * ago);
        run.put_profile_at(&labels, cpu_profile(&[(&["main", function], n)]), at);
        expect_pushes.push(serde_json::json!({
            "t_ms": at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64,
            "fn": function,
            "total": n * 10_000_000,
        }));
    }
    let all: i64 = pushes.iter().map(|p| p.2 * 10_000_000).sum();
    run.wait_json("/ui/api/top?service=timeline&range=15m&type=cpu", |v| {
        v["total"].as_i64() == Some(all) && v["windows"] == 3
    });
    let expect = serde_json::json!({
        "selector": "{service_name=\"timeline\"}",
        "pushes": expect_pushes,
    });
    run_browser(
        &dir.join("ui.mjs"),
        &run.base,
        "range",
        &expect,
        &shots,
        &["profiles-brushed", "profiles-typed-range"],
    );
}

/// Pyroscope's sandwich view of the function `name` in `stacks` (root
/// first, samples of 10 ms): each caller path (the function, its caller,
/// theirs…) and callee path (the function, what it calls…) with its time in
/// ns, from the outermost call of the function in each stack.
fn sandwich_oracle(stacks: &[(&[&str], i64)], name: &str) -> serde_json::Value {
    let mut callers = std::collections::BTreeMap::<String, i64>::new();
    let mut callees = std::collections::BTreeMap::<String, i64>::new();
    let mut total = 0;
    for (stack, n) in stacks {
        let Some(i) = stack.iter().position(|f| *f == name) else {
            continue;
        };
        let ns = n * 10_000_000;
        total += ns;
        for k in (0..=i).rev() {
            let path: Vec<&str> = stack[k..=i].iter().rev().copied().collect();
            *callers.entry(path.join(";")).or_default() += ns;
        }
        for k in i..stack.len() {
            *callees.entry(stack[i..=k].join(";")).or_default() += ns;
        }
    }
    serde_json::json!({ "total": total, "callers": callers, "callees": callees })
}

/// The Profiles view's sandwich (as Pyroscope's), in headless Chromium: a
/// function chosen in the table shows its callers (inverted, the function
/// at the bottom) and its callees (the function at the top), each path's
/// time as the pushed stacks have it (outermost call only, so a recursive
/// call is counted once) and the function's total as the table's; a click
/// on a caller makes it the function.
#[test]
fn browser_sandwich_view_shows_the_callers_and_callees_of_a_function() {
    const TEST: &str = "browser_sandwich_view_shows_the_callers_and_callees_of_a_function";
    let Some((dir, shots)) = browser_setup(TEST) else {
        return;
    };
    let stacks: &[(&[&str], i64)] = &[
        (&["main", "handler_a", "encode", "deflate"], 30),
        (&["main", "handler_b", "encode", "crc"], 20),
        (&["main", "handler_b", "encode"], 10),
        (&["main", "encode", "deflate"], 5),
        (&["main", "handler_a", "other"], 15),
        // Recursion: the inner encode is in the outer one's time.
        (&["main", "handler_b", "encode", "encode", "crc"], 6),
    ];
    let run = Running::start();
    run.put_profile(
        &[("__name__", "process_cpu"), ("service_name", "codec")],
        cpu_profile(stacks),
    );
    let all: i64 = stacks.iter().map(|s| s.1 * 10_000_000).sum();
    run.wait_json("/ui/api/top?service=codec&type=cpu", |v| {
        v["total"].as_i64() == Some(all)
    });
    let expect = serde_json::json!({
        "selector": "{service_name=\"codec\"}",
        "first": "encode",
        "then": "handler_b",
        "sandwich": {
            "encode": sandwich_oracle(stacks, "encode"),
            "handler_b": sandwich_oracle(stacks, "handler_b"),
        },
    });
    println!("{expect:#}");
    run_browser(
        &dir.join("ui.mjs"),
        &run.base,
        "sandwich",
        &expect,
        &shots,
        &["profiles-sandwich"],
    );
}

/// A push of one `process_cpu` profile of `service`.
fn push_request(service: &str, profile: &Profile) -> fathom_collector::proto::push::PushRequest {
    use fathom_collector::proto::push::{LabelPair, PushRequest, RawProfileSeries, RawSample};
    PushRequest {
        series: vec![RawProfileSeries {
            labels: [("__name__", "process_cpu"), ("service_name", service)]
                .iter()
                .map(|(n, v)| LabelPair {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: vec![RawSample {
                raw_profile: pprof::encode_gzip(profile),
                id: String::new(),
            }],
        }],
    }
}
