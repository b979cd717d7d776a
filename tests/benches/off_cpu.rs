//! Cost of off-CPU profiling: its programs run on every `sched_switch` of
//! the machine (the thread leaving the CPU has its stacks walked and
//! stored; the thread coming back has its time counted), so the workload is
//! the worst case, context switches as fast as they come: two processes
//! bouncing a byte through two pipes (`tests/fixtures/pingpong.c`), both on
//! CPU 0.
//!
//! Modes, in interleaved rounds (one run of each per round, rotating which
//! goes first): the agent off; the agent profiling CPU only (`--signals
//! profiles`, 99 Hz); the agent profiling CPU and off-CPU (`--off-cpu`, the
//! default 1 ms threshold: these waits are shorter, so nearly all of the
//! cost is the stack capture every switch pays), capped by the default
//! budget of 2000 stack walks per CPU per second; the same without a budget.
//! Printed: round trips per
//! second and their ratio to off, the cost per round trip, and (in a
//! separate pass, since the kernel's statistics cost time themselves) the
//! BPF time per context switch of each off-CPU program.
//!
//!   cargo bench -p fathom-tests --bench off_cpu
//!
//! FATHOM_BENCH_ROUNDS (default 10), FATHOM_BENCH_SECONDS (default 5: one
//! workload run).
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use fathom_tests::{
    BpfStats, ChildGuard, bench_setting, bpf_runs_by_program, build_fixture, kernel_tests_possible,
    pinned_round_trips, print_rate_table, release_agent_binary,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Off,
    Cpu,
    CpuAndOffCpu,
    /// `--off-cpu-max-stacks 0`: every switch-out walks its stacks.
    Unbudgeted,
}

const MODES: [Mode; 4] = [Mode::Off, Mode::Cpu, Mode::CpuAndOffCpu, Mode::Unbudgeted];

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Off => "off",
        Mode::Cpu => "CPU profiles",
        Mode::CpuAndOffCpu => "CPU + off-CPU profiles",
        Mode::Unbudgeted => "same, no capture budget",
    }
}

/// The agent, once it wrote its first window (steady state).
fn start_agent(agent: &Path, off_cpu: Option<&str>, out: &Path) -> ChildGuard {
    let mut cmd = Command::new(agent);
    cmd.args(["--signals", "profiles", "--interval", "3s", "--output-dir"])
        .arg(out)
        .env("FATHOM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(max_stacks) = off_cpu {
        cmd.args(["--off-cpu", "--off-cpu-max-stacks", max_stacks]);
    }
    let mut guard = ChildGuard::spawn(&mut cmd);
    let stderr = guard.0.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the agent never wrote a window");
        if off_cpu.is_some() && line.contains("off-CPU") && line.contains("degraded") {
            panic!("off-CPU profiling did not load: {line}");
        }
        if line.contains("window done") {
            break;
        }
    }
    guard
}

fn stop_agent(mut guard: ChildGuard) {
    guard.signal("INT");
    assert!(
        guard.wait_timeout(Duration::from_secs(60)).success(),
        "the agent failed"
    );
}

fn main() {
    if !kernel_tests_possible("off_cpu bench") {
        std::process::exit(1);
    }
    let rounds = bench_setting("FATHOM_BENCH_ROUNDS", 10.0) as usize;
    let seconds = bench_setting("FATHOM_BENCH_SECONDS", 5.0);
    let dir = tempfile::tempdir().unwrap();
    let workload = build_fixture("pingpong", dir.path());
    eprintln!("building the release agent...");
    let agent = release_agent_binary();

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..rounds {
        for k in 0..MODES.len() {
            let i = (round + k) % MODES.len();
            let out = tempfile::tempdir().unwrap();
            let guard = match MODES[i] {
                Mode::Off => None,
                Mode::Cpu => Some(start_agent(&agent, None, out.path())),
                Mode::CpuAndOffCpu => Some(start_agent(&agent, Some("2000"), out.path())),
                Mode::Unbudgeted => Some(start_agent(&agent, Some("0"), out.path())),
            };
            let rate = pinned_round_trips(&workload, seconds);
            if let Some(guard) = guard {
                stop_agent(guard);
            }
            rates[i].push(rate);
            eprintln!(
                "round {:>2}/{rounds} {:>22}: {rate:.0} round trips/s",
                round + 1,
                mode_name(MODES[i])
            );
        }
    }

    println!();
    println!(
        "Off-CPU profiling cost: `pingpong` (two processes, one byte through two pipes), \
         {rounds} interleaved rounds of {seconds} s"
    );
    let names: Vec<&str> = MODES.iter().map(|m| mode_name(*m)).collect();
    print_rate_table(&names, &rates, "round trip");

    // BPF time per context switch, by program.
    let stats = BpfStats::enable();
    let out = tempfile::tempdir().unwrap();
    let guard = start_agent(&agent, Some("2000"), out.path());
    let pid = guard.pid();
    let ours = |n: &str| n.starts_with("offcpu_") || n.starts_with("profile_");
    let before = bpf_runs_by_program(pid, ours);
    pinned_round_trips(&workload, seconds);
    let after = bpf_runs_by_program(pid, ours);
    stop_agent(guard);
    drop(stats);
    let delta = |name: &str| {
        let get = |v: &[(String, f64, f64)]| {
            v.iter()
                .find(|(n, _, _)| n == name)
                .map_or((0.0, 0.0), |(_, ns, runs)| (*ns, *runs))
        };
        let (a, b) = (get(&after), get(&before));
        (a.0 - b.0, a.1 - b.1)
    };
    // `offcpu_switch_in` runs once per sched_switch.
    let (_, switches) = delta("offcpu_switch_in");
    println!();
    println!(
        "BPF time per context switch (kernel.bpf_stats_enabled; {switches:.0} switches in {seconds} s):"
    );
    println!("| program | ns per switch | ns per run | runs per switch |");
    println!("|---|---|---|---|");
    let mut total = 0.0;
    for name in ["offcpu_switch_in", "offcpu_switch", "offcpu_store"] {
        let (ns, runs) = delta(name);
        total += ns;
        println!(
            "| `{name}` | {:.0} | {:.0} | {:.2} |",
            ns / switches.max(1.0),
            ns / runs.max(1.0),
            runs / switches.max(1.0)
        );
    }
    println!("| all three | {:.0} | | |", total / switches.max(1.0));
}
