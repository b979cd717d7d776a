//! `fathom-agent check --smoke`: each signal started as the daemon starts
//! it, driven by a small workload of the agent's own binary, and its output
//! checked: the profile of a busy loop has the loop's function hot; an HTTP
//! request through two local services comes out as one trace whose
//! downstream server span has the upstream client span as parent; a TCP
//! connection on loopback shows in the handshake metric.
use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{KeyValue, any_value},
    metrics::v1::metric::Data,
    trace::v1::span::SpanKind,
};

use fathom_collector::EncodedSpans;

use super::workload;
use crate::{
    network::session::{NetConfig, NetSession},
    profiles::{
        capture::ProfilerConfig,
        pprof::CpuProfileMeta,
        session::{ProfilesConfig, Session},
    },
    sink::OtlpSink,
    stop::Stop,
    traces::session::{TraceConfig, TraceSession},
};

/// A workload child, killed when dropped.
struct Workload(Child);

impl Workload {
    fn spawn(args: &[&str]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        Command::new(exe)
            .arg("check-workload")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map(Self)
            .map_err(|e| format!("starting the {} workload: {e}", args[0]))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The address a server workload printed when it listened.
    fn listening(&mut self) -> Result<SocketAddr, String> {
        let stdout = self.0.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("reading the workload: {e}"))?;
        line.trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("the workload said {line:?}"))
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A busy loop's profile: the share of its samples in its hot function.
pub fn profiles() -> Result<String, String> {
    let spin = Workload::spawn(&["spin", "30"])?;
    let config = ProfilesConfig {
        profiler: ProfilerConfig {
            pids: vec![spin.pid()],
            ..ProfilerConfig::default()
        },
        ..ProfilesConfig::default()
    };
    let mut session = Session::start(&config).map_err(|e| e.to_string())?;
    let mode = session.unwind_mode().name();
    let start = SystemTime::now();
    let collected = session
        .collect(Duration::from_secs(3), &Stop::new())
        .map_err(|e| e.to_string())?;
    let meta = CpuProfileMeta {
        frequency_hz: 99,
        start,
        duration: SystemTime::now().duration_since(start).unwrap_or_default(),
    };
    let profile = session
        .profile(&collected, meta)
        .map_err(|e| e.to_string())?;
    let (hot, total) = samples_in(&profile, "fathom_check_spin");
    let share = hot as f64 / total.max(1) as f64;
    let said = format!(
        "{:.0}% of {total} samples of a busy loop in its function fathom_check_spin \
         (user stacks: {mode})",
        share * 100.0
    );
    if total >= 20 && share >= 0.5 {
        Ok(said)
    } else {
        Err(said)
    }
}

/// Samples whose stack has a function whose name contains `name`, and all.
fn samples_in(profile: &pprof::protos::Profile, name: &str) -> (i64, i64) {
    let strings = &profile.string_table;
    let functions: std::collections::HashSet<u64> = profile
        .function
        .iter()
        .filter(|f| {
            strings
                .get(f.name as usize)
                .is_some_and(|n| n.contains(name))
        })
        .map(|f| f.id)
        .collect();
    let locations: std::collections::HashSet<u64> = profile
        .location
        .iter()
        .filter(|l| {
            l.line
                .iter()
                .any(|line| functions.contains(&line.function_id))
        })
        .map(|l| l.id)
        .collect();
    let mut hot = 0;
    let mut total = 0;
    for sample in &profile.sample {
        let n = sample.value.first().copied().unwrap_or(0);
        total += n;
        if sample.location_id.iter().any(|l| locations.contains(l)) {
            hot += n;
        }
    }
    (hot, total)
}

/// What a smoke check's sink received.
#[derive(Clone, Default)]
struct Received(
    Arc<
        Mutex<(
            Vec<ExportTraceServiceRequest>,
            Vec<ExportMetricsServiceRequest>,
        )>,
    >,
);

impl OtlpSink for Received {
    fn spans(&mut self, spans: EncodedSpans) -> bool {
        let Ok(req) = spans.decode() else {
            return false;
        };
        if let Ok(mut r) = self.0.lock() {
            r.0.push(req);
        }
        true
    }

    fn metrics(&mut self, req: ExportMetricsServiceRequest) -> bool {
        if let Ok(mut r) = self.0.lock() {
            r.1.push(req);
        }
        true
    }
}

/// Polls `found` on what was received until it says yes or `limit` passes.
fn wait_for<T>(
    received: &Received,
    limit: Duration,
    found: impl Fn(&[ExportTraceServiceRequest], &[ExportMetricsServiceRequest]) -> Option<T>,
) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(r) = received.0.lock()
            && let Some(t) = found(&r.0, &r.1)
        {
            return Some(t);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request through two local services: a client, `front`, which calls
/// `back` for each request. `back` answers with the `traceparent` it got.
pub fn traces() -> Result<String, String> {
    let received = Received::default();
    let config = TraceConfig {
        flush_every: Duration::from_millis(200),
        ..TraceConfig::default()
    };
    let session =
        TraceSession::start(config, Box::new(received.clone())).map_err(|e| e.to_string())?;
    let (mode, why) = session.mode();
    let scope = match session.inject_scope() {
        Some((scope, None)) => format!("traceparent in {scope}"),
        Some((scope, Some(why))) => format!("traceparent in {scope}: {why}"),
        None => String::new(),
    };
    let mut back = Workload::spawn(&["serve", "127.0.0.1:0", "-", "1"])?;
    let back_addr = back.listening()?;
    let mut front = Workload::spawn(&["serve", "127.0.0.1:0", &back_addr.to_string(), "1"])?;
    let front_addr = front.listening()?;
    let seen = workload::get(front_addr, "/front").map_err(|e| format!("the request: {e}"))?;
    if mode != "capture+inject" {
        return Err(format!(
            "tracing runs without injection ({}), so no trace joins two services",
            why.unwrap_or("off")
        ));
    }
    let parts: Vec<&str> = seen.trim().split('-').collect();
    let (Some(trace), Some(parent)) = (parts.get(1), parts.get(2)) else {
        return Err(format!(
            "the downstream service got no traceparent ({seen:?})"
        ));
    };
    let (trace, parent) = (hex(trace), hex(parent));
    let joined = wait_for(&received, Duration::from_secs(10), |spans, _| {
        let all: Vec<_> = spans
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .filter(|s| s.trace_id == trace)
            .collect();
        let client = all
            .iter()
            .find(|s| s.span_id == parent && s.kind == SpanKind::Client as i32)?;
        let server = all
            .iter()
            .find(|s| s.parent_span_id == parent && s.kind == SpanKind::Server as i32)?;
        let front_server = all
            .iter()
            .find(|s| s.kind == SpanKind::Server as i32 && s.span_id == client.parent_span_id)?;
        Some((all.len(), front_server.name.clone(), server.name.clone()))
    });
    match joined {
        Some((n, front, back)) => Ok(format!(
            "one trace of {n} spans: `{front}` calls `{back}` with an injected traceparent \
             ({mode}; {scope})"
        )),
        None => Err(format!(
            "no trace joined the two services (the downstream service got {seen:?})"
        )),
    }
}

/// Whether a data point is of connections to `port` (its `server_port`),
/// so that other traffic on the machine does not count.
fn to_our_port(attributes: &[KeyValue], port: u16) -> bool {
    attributes.iter().any(|kv| {
        kv.key == "server_port"
            && matches!(
                kv.value.as_ref().and_then(|v| v.value.as_ref()),
                Some(any_value::Value::IntValue(p)) if *p == i64::from(port)
            )
    })
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// TCP connections on loopback: the handshake metric counts them.
pub fn network() -> Result<String, String> {
    let received = Received::default();
    let config = NetConfig {
        flush_every: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let _session =
        NetSession::start(config, Box::new(received.clone())).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let accept = std::thread::spawn(move || {
        for _ in 0..3 {
            let _ = listener.accept();
        }
    });
    for _ in 0..3 {
        TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    }
    let _ = accept.join();
    let handshakes = wait_for(&received, Duration::from_secs(10), |_, metrics| {
        let count: u64 = metrics
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .filter(|m| m.name == "fathom.tcp.handshake.duration")
            .filter_map(|m| match &m.data {
                Some(Data::Histogram(h)) => Some(
                    h.data_points
                        .iter()
                        .filter(|p| to_our_port(&p.attributes, addr.port()))
                        .map(|p| p.count)
                        .sum::<u64>(),
                ),
                _ => None,
            })
            .max()?;
        (count >= 3).then_some(count)
    });
    match handshakes {
        Some(n) => Ok(format!(
            "{n} TCP handshakes to port {} on loopback in fathom.tcp.handshake.duration",
            addr.port()
        )),
        None => Err("3 TCP connections on loopback, no handshake measured".into()),
    }
}
