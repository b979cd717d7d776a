//! Cost of zero-code HTTP tracing: nginx serving a small static file under
//! `wrk` with keep-alive (`wrk -t1 -c16 -d10s --latency`), in five modes:
//! the agent off; the floor, programs that do nothing attached to the hooks
//! the capture's data path uses (`tests/fixtures/sock_noop.c` on the socket
//! tracepoints, or `tp_noop.c` on the syscall tracepoints with
//! FATHOM_BENCH_HOOKS=syscalls), which is what any capture on those hooks
//! costs before it does any work; the agent tracing every process (traces
//! only, exported over OTLP/gRPC to rotel, which drops them); and the agent
//! tracing nginx only (`--pid`: the realistic deployment, where the load
//! generator is not a service); and the same without the kernel's pairing
//! (`--trace-pair false`: every read and write sent to user space and
//! parsed there), for what the pairing saves. Interleaved rounds (one run of each mode per
//! round, rotating which goes first), so that slow drifts of a noisy machine
//! hit all alike.
//!
//! With every process traced, every request is traced on both sides (wrk
//! is a process like any other: its requests get a client span and a
//! `traceparent`), and nginx's server span: two spans per request; with
//! `--pid`, one.
//!
//! Printed: per mode the median throughput and p50/p99 latency; the medians
//! of the per-round throughput ratio and of the added p50 and p99; the
//! agent's CPU (from /proc/PID/stat over the run) as a share of one CPU, per
//! 1k requests/s and per request, its peak RSS, rotel's CPU, the share of
//! data events the kernel dropped because the agent fell behind; and, in a
//! separate pass per agent mode (the statistics cost time themselves), the
//! BPF run time per request from the kernel's own statistics, and the whole
//! cost per request (BPF time + agent CPU).
//!
//!   cargo bench -p fathom-tests --bench tracing
//!
//! FATHOM_BENCH_ROUNDS (default 5), FATHOM_BENCH_SECONDS (default 10: the
//! length of one wrk run), FATHOM_BENCH_HOOKS (`sockets`, the default on
//! kernels that have them, or `syscalls`: the agent's `--trace-hooks` and
//! the floor's hooks), FATHOM_BENCH_PERF (a file: `perf record -a -g`
//! of the first agent-on run goes there), FATHOM_BENCH_CONNECTION_CLOSE=1
//! (wrk sends `Connection: close`: a new connection per request),
//! FATHOM_BENCH_NICE=N (the agent's threads at nice N, in both phases: an
//! experiment; if the agent then falls behind, the share of kernel events
//! lost, printed, says by how much), FATHOM_BENCH_RECEIVER_NICE=N (rotel's
//! threads at nice N: a backend elsewhere does not take the traced
//! services' CPUs), FATHOM_BENCH_AGENT_ARGS (more agent flags, for
//! experiments: `--trace-inject-keep-alive false`), FATHOM_BENCH_MAX_STEAL
//! (default 0.05: a run during which the hypervisor stole more of the CPUs'
//! time is run again, up to 4 tries), FATHOM_BENCH_RATES (the open-loop
//! phase's rates, default `5000,20000`; `0`: none), FATHOM_BENCH_SATURATED=0
//! (the open-loop phase only).
//!
//! Then an open-loop phase (`fathom_tests::open_loop`): the same file at
//! each of FATHOM_BENCH_RATES requests per second, below saturation, off /
//! every process / `--pid` nginx in interleaved rounds. In a closed loop
//! the added p50 is the throughput ratio again (16 connections: p50 ≈ 16 /
//! throughput); at a fixed rate it is the time the agent adds to a
//! request's path, counted from when each request was due. It also prints
//! the machine's CPU per request (every process's CPU time) with and
//! without the agent: the whole cost per request — BPF, agent, receiver, the kernel's
//! extra work — measured without the kernel's BPF statistics.
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use fathom_tests::{
    Agent, BpfStats, ChildGuard, StealMeter, bpf_runs_by_program, chain::StaticNginx, cpu_seconds,
    free_port, kernel_tests_possible, median, open_loop, release_agent_binary, require_tool,
    rotel_agent_path, wait_for_port,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Off,
    Floor,
    On,
    OnPid,
    OnPidUnpaired,
}

const MODES: [Mode; 5] = [
    Mode::Off,
    Mode::Floor,
    Mode::On,
    Mode::OnPid,
    Mode::OnPidUnpaired,
];
/// The agent modes, in their slots of the per-agent figures.
const AGENT_MODES: [Mode; 3] = [Mode::On, Mode::OnPid, Mode::OnPidUnpaired];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "agent off",
            Mode::Floor => "no-op on the hooks",
            Mode::On => "agent, every process",
            Mode::OnPid => "agent, --pid nginx",
            Mode::OnPidUnpaired => "--pid, pairing off",
        }
    }
}

/// FATHOM_BENCH_HOOKS=syscalls: the syscall-tracepoint data path.
fn syscall_hooks() -> bool {
    std::env::var("FATHOM_BENCH_HOOKS").is_ok_and(|v| v == "syscalls")
}

/// A fixture of `tests/fixtures` compiled for BPF.
fn fixture_object(dir: &Path, name: &str) -> Vec<u8> {
    let src = fathom_tests::workspace_root().join(format!("tests/fixtures/{name}.c"));
    let out = dir.join(format!("{name}.o"));
    let status = Command::new("clang")
        .args(["-O2", "-target", "bpf", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "clang failed on {}", src.display());
    std::fs::read(out).unwrap()
}

/// No-op programs on every hook of the capture's data path (and the sched
/// tracepoints both paths use), detached when dropped.
struct NoopHooks(#[allow(dead_code, reason = "held: dropping detaches")] Vec<aya::Ebpf>);

/// The no-op fixtures, compiled once: (`tp_noop`, `sock_noop`).
struct NoopObjects(Vec<u8>, Vec<u8>);

impl NoopObjects {
    fn build(dir: &Path) -> Self {
        Self(
            fixture_object(dir, "tp_noop"),
            fixture_object(dir, "sock_noop"),
        )
    }
}

impl NoopHooks {
    fn attach(objects: &NoopObjects) -> Self {
        use aya::programs::{BtfTracePoint, TracePoint};
        let mut tracepoints = aya::Ebpf::load(&objects.0).unwrap();
        let program: &mut TracePoint = tracepoints.program_mut("noop").unwrap().try_into().unwrap();
        program.load().unwrap();
        for &(_, category, name) in fathom_agent::traces::capture::TRACEPOINTS {
            if category != "syscalls" || syscall_hooks() {
                program.attach(category, name).unwrap();
            }
        }
        let mut held = vec![tracepoints];
        if !syscall_hooks() {
            let mut sockets = aya::Ebpf::load(&objects.1).unwrap();
            let btf = aya::Btf::from_sys_fs().unwrap();
            for (program, hook) in [
                ("noop_recv", "sock_recv_length"),
                ("noop_send", "sock_send_length"),
                ("noop_state", "inet_sock_set_state"),
            ] {
                let program: &mut BtfTracePoint =
                    sockets.program_mut(program).unwrap().try_into().unwrap();
                program.load(hook, &btf).unwrap();
                program.attach().unwrap();
            }
            held.push(sockets);
        }
        Self(held)
    }
}

/// What one wrk run measured.
#[derive(Clone, Copy, Debug, Default)]
struct WrkRun {
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    requests: f64,
    /// The share of CPU time the hypervisor stole during the run.
    steal: f64,
}

/// A latency as wrk prints it (`812.00us`, `1.23ms`, `2.00s`) in µs.
fn parse_latency(v: &str) -> f64 {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        panic!("wrk latency {v:?}")
    };
    num.parse::<f64>().unwrap() * scale
}

/// Parses `wrk --latency` output.
fn parse_wrk(text: &str) -> WrkRun {
    let mut run = WrkRun::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => run.p50_us = parse_latency(v),
            ["99%", v] => run.p99_us = parse_latency(v),
            ["Requests/sec:", v] => run.requests_per_s = v.parse().unwrap(),
            [n, "requests", "in", ..] => run.requests = n.parse().unwrap(),
            _ => {}
        }
    }
    assert!(
        run.requests_per_s > 0.0 && run.p50_us > 0.0 && run.p99_us > 0.0,
        "could not read wrk's output:\n{text}"
    );
    run
}

fn run_wrk(url: &str, seconds: u32) -> WrkRun {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c16", &format!("-d{seconds}s"), "--latency", url]);
    if connection_close() {
        cmd.args(["-H", "Connection: close"]);
    }
    let steal = StealMeter::start();
    let out = cmd.output().unwrap();
    let steal = steal.share();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw errors:\n{text}"
    );
    WrkRun {
        steal,
        ..parse_wrk(&text)
    }
}

/// FATHOM_BENCH_CONNECTION_CLOSE=1: a new connection per request.
fn connection_close() -> bool {
    std::env::var("FATHOM_BENCH_CONNECTION_CLOSE").is_ok_and(|v| v == "1")
}

/// rotel receiving OTLP and dropping it (no debug log: printing 10⁵ spans/s
/// would cost more than what is measured).
fn start_rotel(dir: &Path) -> (ChildGuard, SocketAddr) {
    let binary = rotel_agent_path().unwrap();
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let guard = ChildGuard::spawn(
        Command::new(binary)
            .args(["start", "--exporter", "blackhole"])
            .arg("--otlp-grpc-endpoint")
            .arg(grpc.to_string())
            .arg("--otlp-http-endpoint")
            .arg(http.to_string())
            .arg("--pid-file")
            .arg(dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.join("rotel.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(grpc, Duration::from_secs(10));
    (guard, grpc)
}

/// FATHOM_BENCH_NICE=N: the agent's threads at nice N.
fn bench_nice() -> Option<i32> {
    std::env::var("FATHOM_BENCH_NICE").ok()?.parse().ok()
}

/// Every thread of `pid` at nice `n` (`renice` applies to one thread).
fn renice_tasks(pid: u32, n: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let _ = Command::new("renice")
            .args(["-n", &n.to_string(), "-p"])
            .arg(t.file_name())
            .stdout(std::process::Stdio::null())
            .status();
    }
}

fn start_agent(
    binary: &Path,
    rotel: SocketAddr,
    dir: &Path,
    pid: Option<u32>,
    pair: bool,
) -> Agent {
    let pid_arg = pid.map(|p| p.to_string());
    let hooks = if syscall_hooks() {
        "syscalls"
    } else {
        "sockets"
    };
    let mut extra: Vec<&str> = vec![
        "--trace-hooks",
        hooks,
        "--trace-pair",
        if pair { "true" } else { "false" },
    ];
    if let Some(p) = &pid_arg {
        extra.extend(["--pid", p]);
    }
    // FATHOM_BENCH_AGENT_ARGS: more of the agent's flags, for experiments.
    let more = std::env::var("FATHOM_BENCH_AGENT_ARGS").unwrap_or_default();
    extra.extend(more.split_whitespace());
    let http_listen = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let store = dir.join("store.redb");
    let endpoint = format!("http://{rotel}");
    let agent = Agent::spawn_binary(
        binary,
        &[
            "--signals",
            "traces",
            "--http-listen",
            &http_listen,
            "--otlp-grpc-listen",
            "off",
            "--otlp-http-listen",
            "off",
            "--store-path",
            store.to_str().unwrap(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
        ]
        .into_iter()
        .chain(extra)
        .collect::<Vec<_>>(),
        false,
    );
    agent.wait_for_log("http tracing attached", Duration::from_secs(120));
    agent
}

/// Stops the agent; returns the data events the kernel sent and those it
/// lost (ring buffer full), from the agent's last `http tracing` log line.
fn stop_agent(agent: Agent) -> (f64, f64) {
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "agent failed:\n{log}");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("kernel_events="))
        .unwrap_or_default();
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (field("kernel_events="), field("kernel_events_lost="))
}

/// Peak RSS of a process in MB (VmHWM).
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    if !kernel_tests_possible("tracing bench") {
        std::process::exit(1);
    }
    for tool in ["nginx", "wrk", "bpftool", "clang"] {
        if require_tool("tracing bench", tool).is_none() {
            std::process::exit(1);
        }
    }
    if rotel_agent_path().is_none_or(|p| !p.exists()) {
        eprintln!("tracing bench: rotel-agent (pip package rotel) is missing: run scripts/setup");
        std::process::exit(1);
    }
    let rounds: usize = std::env::var("FATHOM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seconds: u32 = std::env::var("FATHOM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    eprintln!("building the release agent...");
    let agent_bin = release_agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let body = b"{\"hello\":\"fathom\",\"padding\":\"0123456789abcdef0123456789abcdef\"}\n";
    let nginx = StaticNginx::start(&dir.path().join("nginx"), body, 1);
    let url = format!("http://127.0.0.1:{}/index.txt", nginx.port);
    let (rotel, rotel_addr) = start_rotel(dir.path());
    let receiver_nice = std::env::var("FATHOM_BENCH_RECEIVER_NICE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    if let Some(n) = receiver_nice {
        // After its start: its runtime's threads exist by then.
        renice_tasks(rotel.pid(), n);
        eprintln!("rotel's threads at nice {n}");
    }
    eprintln!(
        "nginx (1 worker) serving {} bytes at {url}; wrk -t1 -c16 -d{seconds}s; {rounds} interleaved rounds",
        body.len()
    );

    let setup = Setup {
        agent_bin: &agent_bin,
        rotel_pid: rotel.pid(),
        rotel_addr,
        dir: dir.path(),
        nginx: SocketAddr::from(([127, 0, 0, 1], nginx.port)),
        url: &url,
        nginx_pid: nginx.worker_pid(),
        rounds,
        seconds,
    };
    if std::env::var("FATHOM_BENCH_SATURATED").is_ok_and(|v| v == "0") {
        eprintln!("FATHOM_BENCH_SATURATED=0: the open-loop phase only");
    } else {
        saturated_phase(&setup);
    }
    open_loop_phase(&setup);
    drop(rotel);
    drop(nginx);
}

/// The saturated phase: wrk's closed loop in every mode, then each agent
/// mode's BPF time from the kernel's statistics.
fn saturated_phase(s: &Setup) {
    let Setup {
        agent_bin,
        rotel_pid,
        rotel_addr,
        dir,
        url,
        nginx_pid,
        rounds,
        seconds,
        ..
    } = *s;
    let noop = NoopObjects::build(dir);
    let mut runs: Vec<Vec<WrkRun>> = vec![Vec::new(); MODES.len()];
    // Per agent mode (AGENT_MODES): CPU seconds per run, peak RSS, events.
    let mut agent_cpu: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut rotel_cpu: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut agent_rss = [0.0f64; 3];
    let (mut events_sent, mut events_lost) = (0.0, 0.0);
    let agent_slot = |m: Mode| AGENT_MODES.iter().position(|a| *a == m);
    for round in 0..rounds {
        for k in 0..MODES.len() {
            let i = (round + k) % MODES.len();
            let mode = MODES[i];
            let agent = agent_slot(mode).map(|slot| {
                let pid = (slot != 0).then_some(nginx_pid);
                let pair = mode != Mode::OnPidUnpaired;
                start_agent(agent_bin, rotel_addr, &dir.join("agent"), pid, pair)
            });
            if let (Some(a), Some(n)) = (&agent, bench_nice()) {
                renice_tasks(a.pid(), n);
            }
            let floor = (mode == Mode::Floor).then(|| NoopHooks::attach(&noop));
            let mut attempt = 0;
            let (run, before, rotel_before) = loop {
                let before = agent.as_ref().map(|a| cpu_seconds(a.pid()));
                let rotel_before = cpu_seconds(rotel_pid);
                // FATHOM_BENCH_PERF: a system-wide profile of the first
                // every-process run, to see where the cost goes.
                let perf = (round == 0 && mode == Mode::On)
                    .then(|| std::env::var_os("FATHOM_BENCH_PERF"))
                    .flatten()
                    .map(|out| {
                        eprintln!("recording perf to {}", Path::new(&out).display());
                        ChildGuard::spawn(
                            Command::new("perf")
                                .args(["record", "-a", "-g", "-F", "999", "-o"])
                                .arg(&out)
                                .args(["--", "sleep"])
                                .arg(seconds.saturating_sub(2).max(1).to_string())
                                .stdout(Stdio::null())
                                .stderr(Stdio::null()),
                        )
                    });
                let run = run_wrk(url, seconds);
                if let Some(mut perf) = perf {
                    perf.wait_timeout(Duration::from_secs(30));
                }
                attempt += 1;
                if steal_acceptable(run.steal, attempt, mode.name()) {
                    break (run, before, rotel_before);
                }
            };
            if let (Some(agent), Some(slot)) = (agent, agent_slot(mode)) {
                agent_cpu[slot].push(cpu_seconds(agent.pid()) - before.unwrap_or(0.0));
                rotel_cpu[slot].push(cpu_seconds(rotel_pid) - rotel_before);
                agent_rss[slot] = agent_rss[slot].max(peak_rss_mb(agent.pid()));
                let (sent, lost) = stop_agent(agent);
                events_sent += sent;
                events_lost += lost;
            }
            drop(floor);
            eprintln!(
                "round {:>2}/{rounds} {:>20}: {:>9.0} req/s, p50 {:>7.1} µs, p99 {:>7.1} µs, steal {:.1}%",
                round + 1,
                mode.name(),
                run.requests_per_s,
                run.p50_us,
                run.p99_us,
                run.steal * 100.0
            );
            runs[i].push(run);
        }
    }

    let (off, floor) = (&runs[0], &runs[1]);
    // Medians over rounds of a per-round comparison of two modes.
    let per_round = |a: &[WrkRun], b: &[WrkRun], f: &dyn Fn(&WrkRun, &WrkRun) -> f64| -> f64 {
        median(&a.iter().zip(b).map(|(a, b)| f(a, b)).collect::<Vec<_>>())
    };
    let ratio =
        |a: &[WrkRun], b: &[WrkRun]| per_round(a, b, &|a, b| a.requests_per_s / b.requests_per_s);
    println!();
    println!(
        "HTTP tracing overhead: nginx static file, wrk -t1 -c16 -d{seconds}s {}, {rounds} interleaved rounds, {} hooks",
        if connection_close() {
            "Connection: close"
        } else {
            "keep-alive"
        },
        if syscall_hooks() { "syscall" } else { "socket" }
    );
    println!("| mode | req/s (median) | p50 | p99 | throughput vs off |");
    println!("|---|---|---|---|---|");
    for (i, mode) in MODES.iter().enumerate() {
        let m = |f: fn(&WrkRun) -> f64| median(&runs[i].iter().map(f).collect::<Vec<_>>());
        println!(
            "| {} | {:.0} | {:.1} µs | {:.1} µs | {:.3} |",
            mode.name(),
            m(|r| r.requests_per_s),
            m(|r| r.p50_us),
            m(|r| r.p99_us),
            ratio(&runs[i], off)
        );
    }
    println!("throughput no-op hooks/off: {:.3}", ratio(floor, off));
    print_steal(runs.iter().flatten().map(|r| r.steal));
    let mut cpu_per_request = [0.0f64; 3];
    for (slot, mode) in AGENT_MODES.into_iter().enumerate() {
        let i = MODES.iter().position(|m| *m == mode).unwrap();
        let on = &runs[i];
        let throughput_ratio = ratio(on, off);
        let p50_added = per_round(on, off, &|a, b| a.p50_us - b.p50_us);
        let p99_added = per_round(on, off, &|a, b| a.p99_us - b.p99_us);
        let on_rps = median(&on.iter().map(|r| r.requests_per_s).collect::<Vec<_>>());
        let agent_share = median(&agent_cpu[slot]) / f64::from(seconds);
        cpu_per_request[slot] = agent_share * 1e6 / on_rps.max(1.0);
        println!(
            "{}: throughput/off {:.3} ({:+.1}%), p50 added {p50_added:+.1} µs, p99 added {p99_added:+.1} µs; \
             agent CPU {:.1}% of one CPU at {on_rps:.0} req/s = {:.1} millicores per 1k req/s = {:.2} µs per request; peak RSS {:.1} MB",
            mode.name(),
            throughput_ratio,
            (throughput_ratio - 1.0) * 100.0,
            agent_share * 100.0,
            agent_share * 1000.0 / (on_rps / 1000.0),
            cpu_per_request[slot],
            agent_rss[slot]
        );
    }
    for (slot, mode) in AGENT_MODES.into_iter().enumerate() {
        let rps = median(
            &runs[MODES.iter().position(|m| *m == mode).unwrap()]
                .iter()
                .map(|r| r.requests_per_s)
                .collect::<Vec<_>>(),
        );
        let share = median(&rotel_cpu[slot]) / f64::from(seconds);
        println!(
            "rotel (the backend receiving the spans, on the same CPUs), {}: {:.1}% of one CPU = {:.2} µs per request",
            mode.name(),
            share * 100.0,
            share * 1e6 / rps.max(1.0)
        );
    }
    // Events the kernel could not queue were never parsed: the agent's CPU
    // above is for the share it received.
    println!(
        "kernel data events lost (ring buffer full while the agent was behind): {:.1}% of {:.0}",
        100.0 * events_lost / (events_sent + events_lost).max(1.0),
        events_sent + events_lost
    );

    // BPF time per request, from the kernel's statistics, and the whole
    // cost per request (BPF time + the agent's CPU above).
    let mut whole = [0.0f64; 3];
    for (slot, mode) in AGENT_MODES.into_iter().enumerate() {
        let stats = BpfStats::enable();
        let pid = (slot != 0).then_some(nginx_pid);
        let pair = mode != Mode::OnPidUnpaired;
        let agent = start_agent(agent_bin, rotel_addr, &dir.join("agent"), pid, pair);
        let ours = |name: &str| name.starts_with("http_") || name.starts_with("fathom_s");
        // A program preempted by the hypervisor counts the stolen time as
        // its own: this pass is steal-gated like the others.
        let mut attempt = 0;
        let (before, run, after) = loop {
            let before = bpf_runs_by_program(agent.pid(), ours);
            let run = run_wrk(url, seconds);
            let after = bpf_runs_by_program(agent.pid(), ours);
            attempt += 1;
            if steal_acceptable(run.steal, attempt, mode.name()) {
                break (before, run, after);
            }
        };
        let _ = stop_agent(agent);
        drop(stats);
        let requests = run.requests.max(1.0);
        // Per program over the wrk run: ns and runs per request.
        let mut per: Vec<(String, f64, f64)> = after
            .into_iter()
            .map(|(name, ns, runs)| {
                let (ns0, runs0) = before
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .map_or((0.0, 0.0), |(_, a, b)| (*a, *b));
                (name, (ns - ns0) / requests, (runs - runs0) / requests)
            })
            .filter(|(_, _, runs)| *runs > 0.0)
            .collect();
        per.sort_by(|a, b| b.1.total_cmp(&a.1));
        let bpf_ns: f64 = per.iter().map(|(_, ns, _)| ns).sum();
        whole[slot] = bpf_ns / 1000.0 + cpu_per_request[slot];
        println!(
            "{}: BPF run time per request {bpf_ns:.0} ns (kernel.bpf_stats_enabled); \
             whole cost per request (BPF + agent CPU): {:.2} µs",
            mode.name(),
            bpf_ns / 1000.0 + cpu_per_request[slot]
        );
        for (name, ns, runs) in &per {
            println!(
                "    {name:<24} {ns:>6.0} ns per request, {runs:.2} runs per request, {:.0} ns per run",
                ns / runs.max(f64::MIN_POSITIVE)
            );
        }
    }
    // Kernel pairing on and off, `--pid` nginx (one span per request).
    println!(
        "kernel pairing (--pid nginx): whole cost per request {:.2} µs against {:.2} µs without ({:.3}); \
         agent CPU {:.2} against {:.2} µs; throughput/off {:.3} against {:.3}",
        whole[1],
        whole[2],
        whole[1] / whole[2].max(f64::MIN_POSITIVE),
        cpu_per_request[1],
        cpu_per_request[2],
        ratio(&runs[3], off),
        ratio(&runs[4], off)
    );
}

/// FATHOM_BENCH_MAX_STEAL (default 0.05): a run during which the
/// hypervisor stole more than this share of the CPUs' time is run again, up
/// to [`STEAL_ATTEMPTS`] times in all (then kept, and flagged by
/// [`print_steal`]).
fn max_steal() -> f64 {
    std::env::var("FATHOM_BENCH_MAX_STEAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.05)
}

const STEAL_ATTEMPTS: u32 = 4;

/// Whether a run with `steal` after `attempt` tries is kept.
fn steal_acceptable(steal: f64, attempt: u32, what: &str) -> bool {
    if steal <= max_steal() || attempt >= STEAL_ATTEMPTS {
        return true;
    }
    eprintln!(
        "{what}: the hypervisor stole {:.1}% of the CPUs during the run; running it again",
        steal * 100.0
    );
    false
}

/// The hypervisor's steal over a phase's runs, with a warning when some
/// run lost enough CPU time to the host's other guests to distort it.
fn print_steal(steal: impl Iterator<Item = f64>) {
    let steal: Vec<f64> = steal.collect();
    let max = steal.iter().copied().fold(0.0, f64::max);
    println!(
        "CPU time stolen by the hypervisor: median {:.1}%, worst run {:.1}%{}",
        median(&steal) * 100.0,
        max * 100.0,
        if max > 0.05 {
            " — a noisy host: latency tails and ratios of this run are not the code's"
        } else {
            ""
        }
    );
}

/// What both phases work with.
struct Setup<'a> {
    agent_bin: &'a Path,
    rotel_pid: u32,
    rotel_addr: SocketAddr,
    dir: &'a Path,
    /// nginx's address and the file's URL there.
    nginx: SocketAddr,
    url: &'a str,
    nginx_pid: u32,
    rounds: usize,
    seconds: u32,
}

/// FATHOM_BENCH_RATES: the fixed request rates of the open-loop phase
/// (comma-separated; `0` or empty: no open-loop phase).
fn open_loop_rates() -> Vec<f64> {
    std::env::var("FATHOM_BENCH_RATES")
        .unwrap_or_else(|_| "5000,20000".to_owned())
        .split(',')
        .filter_map(|r| r.trim().parse::<f64>().ok())
        .filter(|r| *r > 0.0)
        .collect()
}

/// Connections of the open-loop load (wrk's count in the saturated phase).
const OPEN_LOOP_CONNECTIONS: usize = 16;

/// One open-loop run and what the agent and the receiver spent in it.
struct OpenLoopSample {
    run: open_loop::OpenLoopRun,
    agent_cpu_s: f64,
    rotel_cpu_s: f64,
}

/// The same load at fixed rates below saturation, off / every process /
/// `--pid` nginx in interleaved rounds: the latency the agent adds to a
/// request's path (counted from when each request was due), and the
/// machine's whole CPU time per request (every process's), an oracle for the
/// cost per request that does not rely on the kernel's BPF statistics or
/// on the saturated loop's throughput.
fn open_loop_phase(s: &Setup) {
    const OPEN_MODES: [Mode; 3] = [Mode::Off, Mode::On, Mode::OnPid];
    let rates = open_loop_rates();
    if rates.is_empty() {
        return;
    }
    let duration = Duration::from_secs(u64::from(s.seconds));
    // [rate][mode] -> samples.
    let mut samples: Vec<Vec<Vec<OpenLoopSample>>> = rates
        .iter()
        .map(|_| OPEN_MODES.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..s.rounds {
        for (r, &rate) in rates.iter().enumerate() {
            for k in 0..OPEN_MODES.len() {
                let m = (round + k) % OPEN_MODES.len();
                let mode = OPEN_MODES[m];
                let agent = (mode != Mode::Off).then(|| {
                    let pid = (mode == Mode::OnPid).then_some(s.nginx_pid);
                    start_agent(s.agent_bin, s.rotel_addr, &s.dir.join("agent"), pid, true)
                });
                if let (Some(a), Some(n)) = (&agent, bench_nice()) {
                    renice_tasks(a.pid(), n);
                }
                let mut attempt = 0;
                let (run, agent_cpu_s, rotel_cpu_s) = loop {
                    let agent_before = agent.as_ref().map_or(0.0, |a| cpu_seconds(a.pid()));
                    let rotel_before = cpu_seconds(s.rotel_pid);
                    let run = open_loop::run(
                        s.nginx,
                        "/index.txt",
                        rate,
                        OPEN_LOOP_CONNECTIONS,
                        duration,
                    );
                    let agent_cpu_s = agent
                        .as_ref()
                        .map_or(0.0, |a| cpu_seconds(a.pid()) - agent_before);
                    let rotel_cpu_s = cpu_seconds(s.rotel_pid) - rotel_before;
                    attempt += 1;
                    if steal_acceptable(run.steal, attempt, mode.name()) {
                        break (run, agent_cpu_s, rotel_cpu_s);
                    }
                };
                if let Some(agent) = agent {
                    let _ = stop_agent(agent);
                }
                assert_eq!(run.errors, 0, "open-loop requests failed ({})", mode.name());
                eprintln!(
                    "open loop {:>2}/{} {rate:>6.0}/s {:>20}: {:>7.0} req/s, p50 {:>6.1} µs, p99 {:>7.1} µs, machine CPU {:.2} µs per request, steal {:.1}%",
                    round + 1,
                    s.rounds,
                    mode.name(),
                    run.rate(),
                    run.quantile_us(0.5),
                    run.quantile_us(0.99),
                    run.busy_us_per_request(),
                    run.steal * 100.0
                );
                samples[r][m].push(OpenLoopSample {
                    run,
                    agent_cpu_s,
                    rotel_cpu_s,
                });
            }
        }
    }
    println!();
    println!(
        "Open loop: the same nginx and file at fixed rates, {OPEN_LOOP_CONNECTIONS} keep-alive connections, \
         latency from each request's due time, {} interleaved rounds of {}s",
        s.rounds, s.seconds
    );
    println!("| rate | mode | req/s | p50 | p90 | p99 | machine CPU per request |");
    println!("|---|---|---|---|---|---|---|");
    for (r, rate) in rates.iter().enumerate() {
        for (m, mode) in OPEN_MODES.iter().enumerate() {
            let med = |f: &dyn Fn(&OpenLoopSample) -> f64| {
                median(&samples[r][m].iter().map(f).collect::<Vec<_>>())
            };
            println!(
                "| {rate:.0}/s | {} | {:.0} | {:.1} µs | {:.1} µs | {:.1} µs | {:.2} µs |",
                mode.name(),
                med(&|x| x.run.rate()),
                med(&|x| x.run.quantile_us(0.5)),
                med(&|x| x.run.quantile_us(0.9)),
                med(&|x| x.run.quantile_us(0.99)),
                med(&|x| x.run.busy_us_per_request()),
            );
        }
    }
    print_steal(samples.iter().flatten().flatten().map(|x| x.run.steal));
    for (r, rate) in rates.iter().enumerate() {
        let off = &samples[r][0];
        for (m, mode) in OPEN_MODES.iter().enumerate().skip(1) {
            let on = &samples[r][m];
            // Medians of per-round differences against the round's off run.
            let added = |f: &dyn Fn(&OpenLoopSample) -> f64| {
                median(
                    &on.iter()
                        .zip(off)
                        .map(|(a, b)| f(a) - f(b))
                        .collect::<Vec<_>>(),
                )
            };
            let per_request = |cpu_s: f64, x: &OpenLoopSample| {
                cpu_s * 1e6 / (x.run.latencies_ns.len().max(1) as f64)
            };
            let agent = median(
                &on.iter()
                    .map(|x| per_request(x.agent_cpu_s, x))
                    .collect::<Vec<_>>(),
            );
            let rotel = median(
                &on.iter()
                    .map(|x| per_request(x.rotel_cpu_s, x))
                    .collect::<Vec<_>>(),
            );
            let machine = added(&|x| x.run.busy_us_per_request());
            println!(
                "{rate:.0}/s, {}: p50 added {:+.1} µs, p90 added {:+.1} µs, p99 added {:+.1} µs; \
                 machine CPU per request {machine:+.2} µs (agent {agent:.2}, receiver {rotel:.2}, \
                 the rest — BPF programs and the kernel's extra work in the traced threads — {:.2})",
                mode.name(),
                added(&|x| x.run.quantile_us(0.5)),
                added(&|x| x.run.quantile_us(0.9)),
                added(&|x| x.run.quantile_us(0.99)),
                machine - agent - rotel
            );
        }
    }
}
