//! Cost of CPU profiling: a fixed CPU-bound workload on every CPU, run with
//! the agent off, at 99 Hz and at 999 Hz, and — as the reference of what
//! sampling costs on this machine at all — under `perf record -a -g -F 99`,
//! in interleaved rounds (one run of each mode per round, rotating which
//! goes first), so that slow drifts of a noisy machine hit all modes alike.
//!
//! The agent is measured in steady state: it is started, and the workload
//! starts only after the agent wrote its first window (one-time costs such as
//! reading kallsyms are out of the measurement). It drains every 3 s, more
//! often than the 10 s default, so its drain and symbolization costs are
//! over- rather than under-stated.
//!
//! Printed per mode: median wall time and workload CPU time, the medians of
//! the per-round ratios to "off" for both, the agent's CPU time during the
//! run, its peak RSS, and (in a separate pass, because the statistics cost
//! time themselves) the BPF program's run time per sample.
//!
//!   cargo bench -p fathom-tests --bench profiler_overhead
//!
//! FATHOM_BENCH_ROUNDS (default 20), FATHOM_BENCH_SECONDS (default 6: the
//! length of one workload run).
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use fathom_tests::{
    ChildGuard, build_fixture, cpu_seconds, kernel_tests_possible, median, release_agent_binary,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Off,
    Fathom(u64),
    /// `perf record -a -g` at this frequency: the peer reference.
    Perf(u64),
}

const MODES: [Mode; 4] = [
    Mode::Off,
    Mode::Fathom(99),
    Mode::Fathom(999),
    Mode::Perf(99),
];

fn mode_name(mode: Mode) -> String {
    match mode {
        Mode::Off => "off".into(),
        Mode::Fathom(hz) => format!("fathom {hz} Hz"),
        Mode::Perf(hz) => format!("perf -a -g {hz} Hz"),
    }
}

/// Starts `perf record -a -g` and waits until it samples.
fn start_perf(hz: u64, dir: &Path) -> ChildGuard {
    let data = dir.join("perf.data");
    let guard = ChildGuard::spawn(
        Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-a",
                "-g",
                "-F",
                &hz.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&data).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "perf did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    guard
}

fn stop_perf(mut perf: ChildGuard) {
    perf.signal("INT");
    perf.wait_timeout(Duration::from_secs(60));
}

struct AgentRun {
    guard: ChildGuard,
    /// The agent itself (a child of /usr/bin/time).
    pid: u32,
    lines: mpsc::Receiver<String>,
    _out_dir: tempfile::TempDir,
}

/// `/usr/bin/time` output: "TIME wall user sys maxrss_kb".
fn parse_time(line: &str) -> [f64; 4] {
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    [v[0], v[1], v[2], v[3]]
}

fn start_agent(agent: &Path, hz: u64) -> AgentRun {
    let out_dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "TIME %e %U %S %M"])
        .arg(agent)
        .args([
            "--frequency",
            &hz.to_string(),
            "--interval",
            "3s",
            "--output-dir",
        ])
        .arg(out_dir.path())
        .env("FATHOM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(&mut cmd);
    let stderr = guard.0.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Steady state: the first window is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("agent never wrote a window");
        if line.contains("window done") {
            break;
        }
    }
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", guard.pid())).unwrap();
    let pid = children.split_whitespace().next().unwrap().parse().unwrap();
    AgentRun {
        guard,
        pid,
        lines,
        _out_dir: out_dir,
    }
}

/// Stops the agent; returns its peak RSS in MB.
fn stop_agent(mut run: AgentRun) -> f64 {
    Command::new("kill")
        .args(["-INT", &run.pid.to_string()])
        .status()
        .unwrap();
    assert!(
        run.guard.wait_timeout(Duration::from_secs(60)).success(),
        "agent failed"
    );
    let line = run
        .lines
        .iter()
        .find(|l| l.starts_with("TIME "))
        .expect("no /usr/bin/time line");
    parse_time(&line)[3] / 1024.0
}

/// Runs the workload; returns (wall seconds, CPU seconds).
fn run_workload(workload: &Path, rounds: u64, threads: usize) -> (f64, f64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "TIME %e %U %S %M"])
        .arg(workload)
        .args(["--rounds", &rounds.to_string(), &threads.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let [wall, user, sys, _] = parse_time(stderr.lines().find(|l| l.starts_with("TIME ")).unwrap());
    (wall, user + sys)
}

/// BPF run time per program run, from the kernel's own statistics.
fn bpf_ns_per_sample(agent: &Path, workload: &Path, hz: u64, rounds: u64, threads: usize) -> f64 {
    let sysctl = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(sysctl).unwrap();
    std::fs::write(sysctl, "1").unwrap();
    let run = start_agent(agent, hz);
    run_workload(workload, rounds, threads);
    let out = Command::new("bpftool")
        .args(["prog", "show", "name", "profile_cpu", "--json"])
        .output()
        .unwrap();
    stop_agent(run);
    std::fs::write(sysctl, before.trim()).unwrap();
    let prog: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prog = if prog.is_array() {
        prog[0].clone()
    } else {
        prog
    };
    prog["run_time_ns"].as_f64().unwrap_or(0.0) / prog["run_cnt"].as_f64().unwrap_or(1.0).max(1.0)
}

fn main() {
    if !kernel_tests_possible("profiler_overhead") {
        std::process::exit(1);
    }
    let rounds: usize = std::env::var("FATHOM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seconds: f64 = std::env::var("FATHOM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let workload: PathBuf = build_fixture("shares", dir.path());
    eprintln!("building the release agent...");
    let agent = release_agent_binary();

    // Calibrate the work so that one run takes about `seconds`.
    let (probe, _) = run_workload(&workload, 200, threads);
    let work = ((seconds / probe) * 200.0).round().max(1.0) as u64;
    eprintln!(
        "workload: {work} rounds of `shares` on {threads} threads (~{seconds} s); {rounds} interleaved rounds"
    );

    let mut wall: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut agent_cpu: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut agent_rss = vec![0.0f64; MODES.len()];
    for round in 0..rounds {
        for k in 0..MODES.len() {
            let i = (round + k) % MODES.len();
            let agent_run = match MODES[i] {
                Mode::Fathom(hz) => Some(start_agent(&agent, hz)),
                _ => None,
            };
            let perf = match MODES[i] {
                Mode::Perf(hz) => Some(start_perf(hz, dir.path())),
                _ => None,
            };
            let before = agent_run.as_ref().map(|r| cpu_seconds(r.pid));
            let (w, c) = run_workload(&workload, work, threads);
            if let Some(run) = agent_run {
                agent_cpu[i].push(cpu_seconds(run.pid) - before.unwrap_or(0.0));
                agent_rss[i] = agent_rss[i].max(stop_agent(run));
            }
            if let Some(perf) = perf {
                stop_perf(perf);
            }
            wall[i].push(w);
            cpu[i].push(c);
            eprintln!(
                "round {:>2}/{rounds} {:>17}: wall {w:.3} s, workload CPU {c:.3} s",
                round + 1,
                mode_name(MODES[i])
            );
        }
    }

    let ratio = |v: &[Vec<f64>], i: usize| {
        let ratios: Vec<f64> = v[i].iter().zip(&v[0]).map(|(x, off)| x / off).collect();
        (median(&ratios) - 1.0) * 100.0
    };
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (hi - lo) / median(v) * 100.0
    };
    println!();
    println!(
        "CPU profiling overhead: {work} rounds of `shares` on all {threads} CPUs, {rounds} interleaved rounds; \
         spread of the off runs: wall {:.1}%, CPU {:.1}%",
        spread(&wall[0]),
        spread(&cpu[0])
    );
    println!(
        "| mode | wall (median) | wall vs off | workload CPU vs off | agent CPU during run | agent peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, mode) in MODES.iter().enumerate() {
        let (agent, rss) = match mode {
            Mode::Off | Mode::Perf(_) => ("-".to_owned(), "-".to_owned()),
            Mode::Fathom(_) => {
                let c = median(&agent_cpu[i]);
                (
                    format!("{c:.3} s ({:.2}% of one CPU)", 100.0 * c / median(&wall[i])),
                    format!("{:.1} MB", agent_rss[i]),
                )
            }
        };
        println!(
            "| {} | {:.3} s | {:+.2}% | {:+.2}% | {agent} | {rss} |",
            mode_name(*mode),
            median(&wall[i]),
            ratio(&wall, i),
            ratio(&cpu, i)
        );
    }
    for hz in [99, 999] {
        let ns = bpf_ns_per_sample(&agent, &workload, hz, work / 2, threads);
        println!("BPF run time per sample at {hz} Hz (kernel.bpf_stats_enabled): {ns:.0} ns");
    }
}
