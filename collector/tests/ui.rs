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
use common::{ChildGuard, fixture, require_tool, target_dir};

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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
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

    fn collector(&self) -> &Collector {
        self.collector.as_ref().unwrap()
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
        self.collector()
            .ingest()
            .profile(RawProfile {
                labels: SeriesLabels::new(labels.iter().copied()).unwrap(),
                profile,
                received: SystemTime::now(),
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

/// A checkout trace over two services: (span id, parent, name, kind,
/// start offset ms, duration ms, error).
fn checkout_trace(trace_id: [u8; 16], t0: u64) -> ExportTraceServiceRequest {
    let span =
        |id: u8, parent: u8, name: &str, kind: SpanKind, off: u64, dur: u64, error: bool| Span {
            trace_id: trace_id.to_vec(),
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { vec![] } else { vec![parent; 8] },
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: t0 + off * 1_000_000,
            end_time_unix_nano: t0 + (off + dur) * 1_000_000,
            attributes: vec![kv("http.request.method", "POST")],
            status: error.then(|| Status {
                code: 2,
                message: "payment declined".into(),
            }),
            ..Span::default()
        };
    let rs = |service: &str, spans: Vec<Span>| ResourceSpans {
        resource: Some(Resource {
            attributes: vec![kv("service.name", service)],
            ..Resource::default()
        }),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "fathom".into(),
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
                "shop",
                vec![
                    span(1, 0, "POST /checkout", SpanKind::Server, 0, 120, false),
                    span(2, 1, "SELECT cart", SpanKind::Client, 5, 25, false),
                    span(3, 1, "POST /charge", SpanKind::Client, 40, 70, true),
                ],
            ),
            rs(
                "payments",
                vec![
                    span(4, 3, "POST /charge", SpanKind::Server, 45, 60, true),
                    span(5, 4, "INSERT payment", SpanKind::Client, 60, 30, false),
                ],
            ),
        ],
    }
}

/// `x,y,w,h` of the element with `id` from its `data-rect` in the DOM.
fn rect_of(dom: &str, id: &str) -> (u32, u32, u32, u32) {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').unwrap()];
    let r = tag
        .split("data-rect=\"")
        .nth(1)
        .unwrap_or_else(|| panic!("#{id} has no data-rect (not rendered): {tag}"));
    let v: Vec<u32> = r[..r.find('"').unwrap()]
        .split(',')
        .map(|n| n.trim().parse::<i64>().unwrap().max(0) as u32)
        .collect();
    (v[0], v[1], v[2], v[3])
}

fn chromium(
    chromium: &Path,
    profile_dir: &Path,
    args: &[&str],
    url: &str,
    stdout: Stdio,
) -> ChildGuard {
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1400,1000",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile_dir.display()))
    .args(args)
    .arg(url)
    .stdout(stdout)
    .stderr(Stdio::null());
    ChildGuard::spawn(&mut cmd)
}

#[test]
fn chromium_renders_the_flame_graph_and_a_trace_waterfall() {
    let Some(chromium_bin) = require_tool(
        "chromium_renders_the_flame_graph_and_a_trace_waterfall",
        "chromium",
    ) else {
        return;
    };
    let run = Running::start();
    let profile = cpu_profile(&[
        (
            &[
                "main",
                "shop::serve",
                "shop::checkout",
                "serde_json::from_slice",
            ],
            40,
        ),
        (
            &["main", "shop::serve", "shop::checkout", "sqlx::query"],
            25,
        ),
        (&["main", "shop::serve", "shop::render_cart"], 20),
        (&["main", "tokio::runtime::park"], 15),
    ]);
    run.put_profile(
        &[("__name__", "process_cpu"), ("service_name", "shop")],
        profile,
    );
    let trace_id: [u8; 16] = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    let hex: String = trace_id.iter().map(|b| format!("{b:02x}")).collect();
    let t0 = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    run.collector()
        .ingest()
        .spans(checkout_trace(trace_id, t0))
        .unwrap();
    run.wait_json("/ui/api/top?service=shop", |v| {
        v["total"].as_i64() == Some(1_000_000_000)
    });
    run.wait_json(&format!("/ui/api/traces/{hex}"), |v| {
        v["spans"].as_array().is_some_and(|s| s.len() == 5)
    });

    let out_dir = target_dir().join("collector-ui");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("collector-ui.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("{}/?service=shop&trace={hex}", run.base);

    // The DOM after the page's scripts ran.
    let dom_file = out_dir.join("collector-ui.html");
    let profile_dir = tempfile::tempdir().unwrap();
    let mut c = chromium(
        &chromium_bin,
        profile_dir.path(),
        &["--dump-dom"],
        &url,
        Stdio::from(std::fs::File::create(&dom_file).unwrap()),
    );
    assert!(
        c.wait_timeout(Duration::from_secs(90)).success(),
        "chromium --dump-dom failed"
    );
    let dom = std::fs::read_to_string(&dom_file).unwrap();
    for needle in [
        "serde_json::from_slice",
        "sqlx::query",
        "shop::render_cart",
        "POST /checkout",
        "SELECT cart",
        "INSERT payment",
        "payments · server",
    ] {
        assert!(
            dom.contains(needle),
            "{needle:?} not in the page's DOM ({})",
            dom_file.display()
        );
    }
    assert!(
        dom.contains("data-loaded=\"true\""),
        "page did not finish loading"
    );
    let flame = rect_of(&dom, "flame");
    let waterfall = rect_of(&dom, "waterfall");

    // The screenshot, with the same window: count the flame graph's colours
    // (inferno's "hot" palette: r 205-255, g 0-230, b 0-55) and the
    // waterfall bars' (#3b82f6, errors #c026d3) in their regions.
    let profile_dir = tempfile::tempdir().unwrap();
    let mut c = chromium(
        &chromium_bin,
        profile_dir.path(),
        &[&format!("--screenshot={}", shot.display())],
        &url,
        Stdio::null(),
    );
    assert!(
        c.wait_timeout(Duration::from_secs(90)).success(),
        "chromium --screenshot failed"
    );
    println!("screenshot: {}", shot.display());
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let pixel = |x: u32, y: u32| {
        let i = (y as usize * info.width as usize + x as usize) * channels;
        (buf[i], buf[i + 1], buf[i + 2])
    };
    let count = |(x, y, w, h): (u32, u32, u32, u32), is: &dyn Fn((u8, u8, u8)) -> bool| {
        let mut n = 0u64;
        for py in y..(y + h).min(info.height) {
            for px in x..(x + w).min(info.width) {
                n += u64::from(is(pixel(px, py)));
            }
        }
        n
    };
    let hot = |(r, g, b): (u8, u8, u8)| r >= 205 && g <= 230 && b <= 55;
    let bar = |(r, g, b): (u8, u8, u8)| {
        let near = |c: (i32, i32, i32)| {
            (i32::from(r) - c.0).abs() <= 12
                && (i32::from(g) - c.1).abs() <= 12
                && (i32::from(b) - c.2).abs() <= 12
        };
        near((0x3b, 0x82, 0xf6)) || near((0xc0, 0x26, 0xd3))
    };
    let flame_hot = count(flame, &hot);
    let flame_area = u64::from(flame.2) * u64::from(flame.3);
    let wf_bars = count(waterfall, &bar);
    let wf_hot = count(waterfall, &hot);
    let flame_bars = count(flame, &bar);
    println!(
        "flame graph {flame:?}: {flame_hot} flame-coloured pixels of {flame_area}; \
         waterfall {waterfall:?}: {wf_bars} bar-coloured pixels"
    );
    // Four stacks, 5 levels, 16 px frames across the width: thousands of
    // pixels, and none of the bar colours there (and vice versa).
    assert!(
        flame_hot > flame_area / 20,
        "flame graph not drawn: {flame_hot} of {flame_area}"
    );
    assert!(wf_bars > 2_000, "waterfall bars not drawn: {wf_bars}");
    assert!(
        flame_bars < 50 && wf_hot < 50,
        "regions mixed up: {flame_bars} {wf_hot}"
    );
}
