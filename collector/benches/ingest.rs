//! Collector ingest throughput and memory on one core.
//!
//! `fathom-collector` (release) runs pinned to CPU 0; the load generators run
//! pinned to CPU 1. Spans: OTLP HTTP/protobuf requests of 500 spans (10
//! attributes each, encoded once) from 4 concurrent clients. Profiles: Pyroscope pushes of
//! one real-shaped CPU pprof (300 samples, stacks 20 deep over 200 functions)
//! from 4 concurrent clients. A call refused with RESOURCE_EXHAUSTED/429 is
//! retried after 1 ms: what is counted is what the collector accepted, and
//! with bounded queues that is what its pipeline keeps up with. Each signal
//! runs twice: with no sink (receivers + pipeline) and with the embedded store
//! (the default when no exporter is configured), and prints the ratio.
//!
//! `cargo bench -p fathom-collector --bench ingest`
//! (`FATHOM_BENCH_SECONDS`, default 10 per phase).
#![allow(clippy::unwrap_used, reason = "benchmark")]

use std::{
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use fathom_collector::proto::{
    otlp::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    },
    push::{LabelPair, PushRequest, RawProfileSeries, RawSample},
};
use prost::Message as _;

#[path = "../tests/common/mod.rs"]
mod common;
use common::free_port;

const CLIENTS: usize = 4;
const SPANS_PER_CALL: usize = 500;

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

struct Collector {
    child: Child,
    otlp_http: u16,
    http: u16,
}

impl Collector {
    fn start(store: Option<&std::path::Path>) -> Self {
        let (otlp_http, http) = (free_port(), free_port());
        // Built by cargo with this benchmark's profile (release).
        let bin = env!("CARGO_BIN_EXE_fathom-collector");
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(bin)
            .args(["--otlp-grpc-listen", "off"])
            .args(["--otlp-http-listen", &format!("127.0.0.1:{otlp_http}")])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--log", "warn"]);
        match store {
            Some(path) => cmd.args(["--store", "true", "--store-path"]).arg(path),
            None => cmd.args(["--store", "false"]),
        };
        let child = cmd.stdout(Stdio::null()).spawn().unwrap();
        let c = Self {
            child,
            otlp_http,
            http,
        };
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", c.http)).is_err() {
            assert!(Instant::now() < end, "collector did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// Peak resident memory (VmHWM) and CPU time used, in MB and seconds.
    fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let hwm_kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        let hz: f64 = String::from_utf8(
            Command::new("getconf")
                .arg("CLK_TCK")
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
        (hwm_kb / 1024.0, ticks / hz)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
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

fn span_request(seed: u64) -> ExportTraceServiceRequest {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let spans = (0..SPANS_PER_CALL as u64)
        .map(|i| {
            let id = seed.wrapping_mul(1_000_003).wrapping_add(i) | 1;
            Span {
                trace_id: [id.to_le_bytes(), seed.to_le_bytes()].concat(),
                span_id: id.to_le_bytes().to_vec(),
                parent_span_id: if i % 4 == 0 {
                    Vec::new()
                } else {
                    (id - 1).to_le_bytes().to_vec()
                },
                name: "GET /api/items/{id}".into(),
                kind: 2,
                start_time_unix_nano: now,
                end_time_unix_nano: now + 1_500_000,
                attributes: vec![
                    kv("http.request.method", "GET"),
                    kv("url.path", "/api/items/42"),
                    kv("url.scheme", "http"),
                    kv("http.response.status_code", "200"),
                    kv("http.route", "/api/items/{id}"),
                    kv("server.address", "api.default.svc"),
                    kv("server.port", "8080"),
                    kv("client.address", "10.0.0.7"),
                    kv("network.protocol.version", "1.1"),
                    kv("user_agent.original", "curl/8.5.0"),
                ],
                ..Span::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "api"), kv("process.pid", "4242")],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
}

/// A real-shaped CPU profile: 300 samples of stacks 20 deep over 200
/// functions (drawn by xorshift from `seed`).
fn cpu_profile(seed: u64) -> Vec<u8> {
    let frames = (0..200u64)
        .map(|f| common::Frame {
            address: 0x40_1000 + f * 0x40,
            function: format!("api::module{}::function_{f}", f % 17),
            system_name: format!("_ZN3api8module{}10function_{f}E", f % 17),
            file: format!("src/module{}.rs", f % 17),
            line: 10 + f as i64,
        })
        .collect();
    let mut x = seed | 1;
    let samples = (0..300)
        .map(|_| {
            let stack = (0..20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 200) as usize
                })
                .collect();
            (stack, 1 + (x % 5) as i64)
        })
        .collect();
    common::CpuProfile {
        frequency_hz: 99,
        duration: Duration::from_secs(10),
        mapping_file: "/usr/bin/api".into(),
        build_id: "0123456789abcdef".into(),
        memory_start: 0x40_0000,
        memory_limit: 0x80_0000,
        frames,
        samples,
    }
    .gzip()
}

fn push_request(seed: u64) -> Vec<u8> {
    PushRequest {
        series: vec![RawProfileSeries {
            labels: vec![
                LabelPair {
                    name: "__name__".into(),
                    value: "process_cpu".into(),
                },
                LabelPair {
                    name: "service_name".into(),
                    value: format!("svc-{}", seed % 8),
                },
            ],
            samples: vec![RawSample {
                raw_profile: cpu_profile(seed),
                id: String::new(),
            }],
        }],
    }
    .encode_to_vec()
}

fn seconds() -> Duration {
    Duration::from_secs(
        std::env::var("FATHOM_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

/// Runs `CLIENTS` loops of `call` for the bench duration; returns accepted
/// items per second and refusals.
fn drive<F, Fut>(rt: &tokio::runtime::Runtime, per_call: u64, call: F) -> (f64, u64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), bool>> + Send,
{
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let call = Arc::new(call);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (accepted, refused, stop, call) = (
                accepted.clone(),
                refused.clone(),
                stop.clone(),
                call.clone(),
            );
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match call(c).await {
                        Ok(()) => {
                            accepted.fetch_add(per_call, Ordering::Relaxed);
                        }
                        Err(retry) => {
                            assert!(retry, "the collector refused a valid request");
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(seconds());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    let rate = accepted.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    (rate, refused.load(Ordering::Relaxed))
}

/// What one phase POSTs to.
struct Endpoint {
    what: &'static str,
    port: fn(&Collector) -> u16,
    path: &'static str,
    content_type: &'static str,
    /// Items per request.
    per_call: u64,
}

/// POSTs the pre-encoded `bodies` (round robin) to `e` of a fresh collector
/// for the bench duration; prints and returns items accepted per second.
fn bench_posts(
    rt: &tokio::runtime::Runtime,
    store: Option<&std::path::Path>,
    e: Endpoint,
    bodies: Vec<bytes::Bytes>,
) -> f64 {
    let c = Collector::start(store);
    let url = format!("http://127.0.0.1:{}{}", (e.port)(&c), e.path);
    let bodies = Arc::new(bodies);
    let client = reqwest::Client::new();
    let counter = Arc::new(AtomicU64::new(0));
    let content_type = e.content_type;
    let (rate, refused) = drive(rt, e.per_call, move |_| {
        let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
        let body = bodies[n % bodies.len()].clone();
        let req = client
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(matches!(r.status().as_u16(), 429 | 503)),
                Err(_) => Err(false),
            }
        }
    });
    let (mb, cpu) = c.usage();
    eprintln!(
        "  {}: {rate:>10.0}/s  refused-and-retried={refused}  peak RSS {mb:.0} MB  collector CPU {cpu:.1} s",
        e.what
    );
    rate
}

/// Spans: encoded once, so the load generator's own cost stays small next to
/// the collector's decode + validate + batch + sinks.
fn bench_spans(rt: &tokio::runtime::Runtime, store: Option<&std::path::Path>) -> f64 {
    let bodies = (0..64)
        .map(|s| span_request(s).encode_to_vec().into())
        .collect();
    let e = Endpoint {
        what: "spans",
        port: |c| c.otlp_http,
        path: "/v1/traces",
        content_type: "application/x-protobuf",
        per_call: SPANS_PER_CALL as u64,
    };
    bench_posts(rt, store, e, bodies)
}

fn bench_profiles(rt: &tokio::runtime::Runtime, store: Option<&std::path::Path>) -> f64 {
    let bodies = (0..64).map(|s| push_request(s).into()).collect();
    let e = Endpoint {
        what: "profiles",
        port: |c| c.http,
        path: "/push.v1.PusherService/Push",
        content_type: "application/proto",
        per_call: 1,
    };
    bench_posts(rt, store, e, bodies)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!(
            "SKIPPED collector_ingest bench: needs 2 CPUs (collector on one, load on the other)"
        );
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    pin_self(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    eprintln!(
        "collector on CPU 0, load on CPU 1, {} s per phase",
        seconds().as_secs()
    );
    eprintln!("no sink (receivers + pipeline):");
    let s0 = bench_spans(&rt, None);
    let p0 = bench_profiles(&rt, None);
    eprintln!("embedded store (the default):");
    let s1 = bench_spans(&rt, Some(&dir.path().join("spans.redb")));
    let p1 = bench_profiles(&rt, Some(&dir.path().join("profiles.redb")));
    println!(
        "spans/s: no sink {s0:.0}, with store {s1:.0} (ratio {:.2})",
        s1 / s0
    );
    println!(
        "profiles/s: no sink {p0:.0}, with store {p1:.0} (ratio {:.2})",
        p1 / p0
    );
}
