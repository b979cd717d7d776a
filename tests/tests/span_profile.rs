//! Every CPU sample linked to the span it served, with no SDK: the agent
//! runs traces and profiles together, the profiler reads the tracer's map of
//! which thread serves which server request, and
//!
//! - samples taken while a thread serves a request carry the pprof labels
//!   `span_id` and `trace_id` (Pyroscope's span-profile convention);
//! - that server span carries `pyroscope.profile.id` = its span id (what
//!   Grafana's traces-to-profiles looks up);
//! - profiles and spans of the process carry the same service name.
//!
//! The workload is a Python HTTP server that burns a known amount of CPU
//! in each request. Oracles: rotel (a real OpenTelemetry collector) for the
//! spans, the agent's embedded collector's pprof (decoded here with the
//! `pprof` crate) for the samples.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, ChildGuard, KernelTest, Profile, ROTEL_AGENT, Rotel, RotelSpan, free_port, read_profile,
    require_tool,
};

const SERVICE: &str = "span-burner";
/// CPU burnt per request.
const BURN_MS: u32 = 40;
const REQUESTS: usize = 60;

/// A one-thread HTTP/1.0 server that spends `BURN_MS` of CPU in each
/// request before it answers.
const BURNER: &str = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

def burn(seconds):
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1
    return x

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        burn(int(sys.argv[2]) / 1000)
        body = b"burnt\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn get(port: u16) -> String {
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /work HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn cpu_samples_carry_the_span_their_thread_served() {
    let Some(_kernel) = KernelTest::acquire("cpu_samples_carry_the_span_their_thread_served")
        .map(KernelTest::agent)
    else {
        return;
    };
    const TEST: &str = "cpu_samples_carry_the_span_their_thread_served";
    let (Some(python), Some(rotel_bin)) = (
        require_tool(TEST, "python3"),
        require_tool(TEST, ROTEL_AGENT),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rotel = Rotel::start(
        &rotel_bin,
        local(free_port()),
        local(free_port()),
        dir.path(),
    );
    let port = free_port();
    let server = ChildGuard::spawn(
        Command::new(python)
            .args(["-c", BURNER, &port.to_string(), &BURN_MS.to_string()])
            .env("OTEL_SERVICE_NAME", SERVICE)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(local(port)).is_err() {
        assert!(Instant::now() < end, "the burner did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let http = free_port();
    let agent = Agent::spawn(&[
        "--signals",
        "traces,profiles",
        "--pid",
        &server.pid().to_string(),
        "--interval",
        "1s",
        "--window",
        "1s",
        "--http-listen",
        &local(http).to_string(),
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        // Spans go to rotel; the store keeps the profiles too.
        "--store",
        "true",
        "--store-path",
        dir.path().join("store.redb").to_str().unwrap(),
        "--otlp-endpoint",
        &format!("http://{}", rotel.grpc),
        "--otlp-protocol",
        "grpc",
    ]);
    agent.wait_for_log("http tracing attached", Duration::from_secs(60));
    agent.wait_for_log("window done", Duration::from_secs(60));

    for _ in 0..REQUESTS {
        let reply = get(port);
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
    }

    // The server spans that reached the OTLP receiver, by span id.
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans: BTreeMap<String, (String, BTreeMap<String, String>)> = loop {
        let spans: BTreeMap<_, _> = rotel
            .spans()
            .into_iter()
            .filter(|s| s.kind == "SPAN_KIND_SERVER" && pid_of(s) == Some(server.pid()))
            .map(|s| {
                (
                    s.span_id.clone(),
                    (s.trace_id.clone(), s.attributes.clone()),
                )
            })
            .collect();
        if spans.len() >= REQUESTS || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(spans.len(), REQUESTS, "server spans at the OTLP receiver");
    for (span_id, (_, attributes)) in &spans {
        assert_eq!(
            attributes.get("pyroscope.profile.id").map(String::as_str),
            Some(format!("Str({span_id})").as_str()),
            "{attributes:?}"
        );
    }
    let resource = rotel
        .spans()
        .into_iter()
        .find(|s| pid_of(s) == Some(server.pid()))
        .unwrap()
        .resource;
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some(format!("Str({SERVICE})").as_str())
    );

    // The samples, from the embedded collector, under the spans' service
    // name. Profiles are delivered every second: wait until the CPU the
    // requests burnt is in.
    let expected_ns = REQUESTS as i64 * i64::from(BURN_MS) * 1_000_000;
    let url = format!(
        "http://{}/api/profile?service={SERVICE}&name=process_cpu&range=all",
        local(http)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let profile = loop {
        let profile = fetch_profile(&url, &dir.path().join("span-burner.pb"));
        let total: i64 = profile.as_ref().map_or(0, |p| cpu_ns(p, |_| true));
        if total * 10 >= expected_ns * 9 || Instant::now() > deadline {
            break profile.unwrap_or_else(|| panic!("no profile of {SERVICE} at {url}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let total = cpu_ns(&profile, |_| true);
    let linked = cpu_ns(&profile, |labels| {
        labels
            .get("span_id")
            .and_then(|id| spans.get(id))
            .is_some_and(|(trace, _)| labels.get("trace_id") == Some(trace))
    });
    let labelled = cpu_ns(&profile, |labels| labels.contains_key("span_id"));
    let share = linked as f64 / total as f64;
    eprintln!(
        "{REQUESTS} requests of {BURN_MS} ms CPU: {:.2} s of samples, {:.1}% with the id of a \
         server span at the OTLP receiver (and its trace id), {:.1}% with any span id",
        total as f64 / 1e9,
        100.0 * share,
        100.0 * labelled as f64 / total as f64
    );
    assert!(
        total * 10 >= expected_ns * 9,
        "{total} ns of samples, {expected_ns} burnt"
    );
    assert!(
        share >= 0.8,
        "{:.1}% of the samples linked to a span",
        100.0 * share
    );
    // Samples spread over the requests: no one span holds them all.
    let mut per_span: BTreeMap<String, i64> = BTreeMap::new();
    for (labels, ns) in samples(&profile) {
        if let Some(id) = labels.get("span_id") {
            *per_span.entry(id.clone()).or_default() += ns;
        }
    }
    assert!(
        per_span.len() * 2 >= REQUESTS,
        "samples of only {} spans of {REQUESTS}",
        per_span.len()
    );
    // The embedded UI's way from a trace to its samples: the trace's span
    // totals, then the flame graph of one span alone.
    let (span_id, (trace_id, _)) = spans
        .iter()
        .find(|(id, _)| per_span.contains_key(*id))
        .unwrap();
    let totals = curl_json(&format!(
        "http://{}/ui/api/traces/{trace_id}/profiles",
        local(http)
    ));
    let cpu = totals["types"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "process_cpu"))
        .unwrap_or_else(|| panic!("no process_cpu totals for trace {trace_id}: {totals}"));
    assert!(
        cpu["spans"][span_id].as_i64().unwrap_or(0) > 0,
        "span {span_id} has no samples in {totals}"
    );
    let one = fetch_profile(
        &format!(
            "http://{}/api/profile?span_id={span_id}&name=process_cpu&range=all",
            local(http)
        ),
        &dir.path().join("one-span.pb"),
    )
    .unwrap_or_else(|| panic!("no profile for span {span_id}"));
    let one_total = cpu_ns(&one, |_| true);
    assert!(one_total > 0);
    assert_eq!(
        one_total,
        cpu_ns(&one, |l| l.get("span_id") == Some(span_id)),
        "the span's flame graph holds other samples"
    );
    drop(agent);
}

fn curl_json(url: &str) -> serde_json::Value {
    let out = Command::new("curl").args(["-sf", url]).output().unwrap();
    assert!(out.status.success(), "GET {url} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The service's merged profile, when the collector has one.
fn fetch_profile(url: &str, file: &std::path::Path) -> Option<Profile> {
    let out = Command::new("curl")
        .args(["-sf", "-o"])
        .arg(file)
        .arg(url)
        .output()
        .unwrap();
    out.status.success().then(|| read_profile(file))
}

fn pid_of(s: &RotelSpan) -> Option<u32> {
    s.resource
        .get("process.pid")
        .and_then(|v| v.strip_prefix("Int(")?.strip_suffix(')')?.parse().ok())
}

/// Each sample's string labels and CPU nanoseconds.
fn samples(p: &Profile) -> Vec<(BTreeMap<String, String>, i64)> {
    let s = |i: i64| p.string_table[i as usize].clone();
    let period = p.period.max(1);
    let index = p
        .sample_type
        .iter()
        .position(|t| s(t.ty) == "cpu")
        .unwrap_or(0);
    p.sample
        .iter()
        .map(|sample| {
            let labels = sample
                .label
                .iter()
                .filter(|l| l.str != 0)
                .map(|l| (s(l.key), s(l.str)))
                .collect();
            let v = sample.value[index];
            // A `samples` count is turned into time with the period.
            let ns = if s(p.sample_type[index].unit) == "nanoseconds" {
                v
            } else {
                v * period
            };
            (labels, ns)
        })
        .collect()
}

fn cpu_ns(p: &Profile, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> i64 {
    samples(p)
        .into_iter()
        .filter(|(labels, _)| keep(labels))
        .map(|(_, ns)| ns)
        .sum()
}
