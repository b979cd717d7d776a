//! Cost of the network signal on the data path: iperf3 over a veth pair
//! (node ↔ a namespace this bench creates), with the agent off and on
//! (`--signals network`, TC programs on both directions of the veth plus the
//! TCP tracepoints), in interleaved rounds (one run of each mode per round,
//! rotating which goes first) so slow drifts of a noisy machine hit both.
//!
//! Two loads: TCP throughput (`iperf3 -c … -t S`, one stream) and small
//! packets (`iperf3 -u -l 64 -b 0`: UDP datagrams of 64 bytes as fast as
//! the sender can, received packets per second).
//!
//! A third mode attaches a classifier that does nothing
//! (`tests/fixtures/tc_noop.c`, tcx like the agent's): the floor any TC
//! hook costs before a program does any work.
//!
//! Printed: per load and mode the median, and the median of the per-round
//! ratio on/off (goal ≥ 0.97), no-op hook/off and on/no-op hook (the
//! agent's own cost above the floor). Throughput over a veth swings by ±15% from
//! run to run on a 2-CPU VM, so the bench also measures the cost directly:
//! one more run per load with `kernel.bpf_stats_enabled`, printing the
//! time the kernel spent in the agent's programs per run and as a share of
//! the machine's CPU time during the run, next to the same figure for the
//! no-op classifier (what the statistics' clock reads add to every run).
//!
//!   cargo bench -p fathom-tests --bench network
//!
//! On a 2-CPU VM the unpinned runs fall into a fast or a slow state (about
//! ±10% per run, whatever the mode), more than the cost measured. With
//! FATHOM_BENCH_CPU=N both iperf3 ends (and so the softirq work of the
//! veth) run on CPU N: every packet's whole cost, sender to receiver, is
//! paid on one CPU, and runs repeat within about ±1%.
//!
//! FATHOM_BENCH_ROUNDS (default 5), FATHOM_BENCH_SECONDS (default 5),
//! FATHOM_BENCH_LOADS (`tcp,udp` by default), FATHOM_BENCH_PERF (a path
//! prefix: `perf record -a -g` of each load's first agent run goes to
//! `PREFIX-tcp.data` / `PREFIX-udp.data`).
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use fathom_tests::{
    Agent, BpfStats, ChildGuard, bpf_run_totals, cpu_seconds, free_port, kernel_tests_possible,
    median, release_agent_binary,
};

fn run(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{args:?} failed");
}

/// A namespace with a veth to the node; removed on drop.
struct Pair {
    ns: String,
    host: String,
}

impl Pair {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let p = Pair {
            ns: format!("fathom-bench-{id}"),
            host: format!("fb{id}h"),
        };
        let peer = format!("fb{id}p");
        run(&["ip", "netns", "add", &p.ns]);
        run(&[
            "ip", "link", "add", &p.host, "type", "veth", "peer", "name", &peer, "netns", &p.ns,
        ]);
        run(&["ip", "addr", "add", "10.214.0.1/24", "dev", &p.host]);
        run(&["ip", "link", "set", &p.host, "up"]);
        run(&[
            "ip",
            "-n",
            &p.ns,
            "addr",
            "add",
            "10.214.0.2/24",
            "dev",
            &peer,
        ]);
        run(&["ip", "-n", &p.ns, "link", "set", &peer, "up"]);
        run(&["ip", "-n", &p.ns, "link", "set", "lo", "up"]);
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// `FATHOM_BENCH_CPU`, when set: the CPU both iperf3 ends are pinned to.
fn bench_cpu() -> Option<String> {
    std::env::var("FATHOM_BENCH_CPU")
        .ok()
        .filter(|c| !c.is_empty())
}

/// `program`, pinned to `FATHOM_BENCH_CPU` when set.
fn pinned(program: &str) -> Command {
    match bench_cpu() {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &cpu, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// One iperf3 run; returns (bits/s received) for TCP or (packets/s
/// received) for UDP.
fn iperf(udp: bool, seconds: u32) -> f64 {
    let mut cmd = pinned("iperf3");
    cmd.args(["-c", "10.214.0.2", "-J", "-t", &seconds.to_string()]);
    if udp {
        cmd.args(["-u", "-l", "64", "-b", "0"]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "iperf3 failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if udp {
        let sum = &v["end"]["sum"];
        let packets = sum["packets"].as_f64().unwrap() - sum["lost_packets"].as_f64().unwrap();
        packets / sum["seconds"].as_f64().unwrap()
    } else {
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
    }
}

/// `tests/fixtures/tc_noop.c` compiled for BPF.
fn noop_object(dir: &std::path::Path) -> Vec<u8> {
    let src = fathom_tests::workspace_root().join("tests/fixtures/tc_noop.c");
    let out = dir.join("tc_noop.o");
    run(&[
        "clang",
        "-O2",
        "-target",
        "bpf",
        "-c",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

/// The no-op classifier on both directions of an interface (tcx), detached
/// when dropped.
struct NoopHook(#[allow(dead_code, reason = "held: dropping detaches")] aya::Ebpf);

impl NoopHook {
    fn attach(object: &[u8], interface: &str) -> Self {
        use aya::programs::{SchedClassifier, TcAttachType};
        let mut ebpf = aya::Ebpf::load(object).unwrap();
        let program: &mut SchedClassifier = ebpf.program_mut("noop").unwrap().try_into().unwrap();
        program.load().unwrap();
        program.attach(interface, TcAttachType::Ingress).unwrap();
        program.attach(interface, TcAttachType::Egress).unwrap();
        Self(ebpf)
    }
}

/// The agent with the network signal on the pair's host end, attached.
fn start_agent(agent_bin: &std::path::Path, pair: &Pair, dir: &std::path::Path) -> Agent {
    let port = free_port();
    let a = Agent::spawn_binary(
        agent_bin,
        &[
            "--signals",
            "network",
            "--net-interfaces",
            &pair.host,
            "--http-listen",
            &format!("127.0.0.1:{port}"),
            "--otlp-grpc-listen",
            "off",
            "--otlp-http-listen",
            "off",
            "--store-path",
            dir.join("store.redb").to_str().unwrap(),
        ],
        false,
    );
    a.wait_for_log("network metrics attached", Duration::from_secs(60));
    a
}

fn main() {
    if !kernel_tests_possible("network bench") {
        return;
    }
    let rounds: usize = std::env::var("FATHOM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seconds: u32 = std::env::var("FATHOM_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let agent_bin = release_agent_binary();
    let pair = Pair::new();
    let mut server = Command::new("ip");
    server.args(["netns", "exec", &pair.ns]);
    if let Some(cpu) = bench_cpu() {
        server.args(["taskset", "-c", &cpu]);
    }
    let _server = ChildGuard::spawn(
        server
            .args(["iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let dir = tempfile::tempdir().unwrap();
    let noop = noop_object(dir.path());
    let loads = std::env::var("FATHOM_BENCH_LOADS").unwrap_or_else(|_| "tcp,udp".into());
    let perf_prefix = std::env::var("FATHOM_BENCH_PERF").ok();
    for (name, udp, unit) in [
        ("TCP throughput", false, "Gbit/s"),
        ("64-byte UDP", true, "kpackets/s"),
    ] {
        let load = if udp { "udp" } else { "tcp" };
        if !loads.split(',').any(|l| l.trim() == load) {
            continue;
        }
        let scale = if udp { 1e3 } else { 1e9 };
        // The agent's own CPU (user + system, all threads) per agent run.
        let mut agent_cpu = Vec::new();
        // Per mode (off, no-op hook, agent): values and ratios to off.
        let mut values: [Vec<f64>; 3] = Default::default();
        let (mut ratio, mut floor, mut above) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut v = [0.0; 3];
            // Rotate which mode goes first.
            for i in 0..3 {
                let mode = (round + i) % 3;
                let agent = (mode == 2).then(|| start_agent(&agent_bin, &pair, dir.path()));
                let hook = (mode == 1).then(|| NoopHook::attach(&noop, &pair.host));
                let perf = perf_prefix
                    .as_ref()
                    .filter(|_| round == 0 && mode == 2)
                    .map(|prefix| {
                        let out = format!("{prefix}-{load}.data");
                        eprintln!("recording perf to {out}");
                        ChildGuard::spawn(
                            Command::new("perf")
                                .args(["record", "-a", "-g", "-F", "999", "-o", &out])
                                .args(["--", "sleep"])
                                .arg(seconds.saturating_sub(1).max(1).to_string())
                                .stdout(Stdio::null())
                                .stderr(Stdio::null()),
                        )
                    });
                let cpu_before = agent.as_ref().map(|a| cpu_seconds(a.pid()));
                v[mode] = iperf(udp, seconds) / scale;
                if let (Some(a), Some(before)) = (&agent, cpu_before) {
                    agent_cpu.push(cpu_seconds(a.pid()) - before);
                }
                if let Some(mut perf) = perf {
                    perf.wait_timeout(Duration::from_secs(30));
                }
                drop(hook);
                if let Some(a) = agent {
                    a.signal("TERM");
                    let _ = a.finish(Duration::from_secs(30));
                }
            }
            for (m, x) in v.iter().enumerate() {
                values[m].push(*x);
            }
            ratio.push(v[2] / v[0]);
            floor.push(v[1] / v[0]);
            above.push(v[2] / v[1]);
            eprintln!(
                "{name} round {round}: off {:.3}, no-op hook {:.3}, agent {:.3} {unit}",
                v[0], v[1], v[2]
            );
        }
        println!(
            "{name}: off {:.3} {unit}, no-op hook {:.3} {unit}, agent {:.3} {unit}; ratio agent/off {:.3}, no-op hook/off {:.3}, agent/no-op hook {:.3} (medians of {rounds} rounds of {seconds} s{})",
            median(&values[0]),
            median(&values[1]),
            median(&values[2]),
            median(&ratio),
            median(&floor),
            median(&above),
            bench_cpu()
                .map(|c| format!("; both iperf3 ends on CPU {c}"))
                .unwrap_or_default()
        );
        println!(
            "{name}: the agent's own CPU (all threads) during its runs: {:.2}% of one CPU (median)",
            100.0 * median(&agent_cpu) / f64::from(seconds)
        );

        // The programs' own time, from the kernel's statistics.
        let stats = BpfStats::enable();
        let agent = start_agent(&agent_bin, &pair, dir.path());
        let ours = |name: &str| name.starts_with("net_");
        let (t0, n0, _) = bpf_run_totals(agent.pid(), ours);
        let v = iperf(udp, seconds) / scale;
        let (t1, n1, names) = bpf_run_totals(agent.pid(), ours);
        agent.signal("TERM");
        let _ = agent.finish(Duration::from_secs(30));
        drop(stats);
        // The same for the no-op classifier: what the statistics themselves
        // add to each run (two clock reads), the floor of the figure above.
        let stats = BpfStats::enable();
        let hook = NoopHook::attach(&noop, &pair.host);
        let noop_name = |name: &str| name == "noop";
        let (u0, m0, _) = bpf_run_totals(std::process::id(), noop_name);
        iperf(udp, seconds);
        let (u1, m1, _) = bpf_run_totals(std::process::id(), noop_name);
        drop(hook);
        drop(stats);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let per_run = (t1 - t0) / (n1 - n0).max(1.0);
        let noop_per_run = (u1 - u0) / (m1 - m0).max(1.0);
        println!(
            "{name}: BPF time (kernel.bpf_stats_enabled, programs {names:?}): {per_run:.0} ns per run over {:.0} runs, {:.2}% of the {cpus} CPUs' time during a run at {v:.3} {unit}; the no-op classifier: {noop_per_run:.0} ns per run (the statistics' own cost), so the agent's programs do {:.0} ns of work per run",
            n1 - n0,
            100.0 * (t1 - t0) / (f64::from(seconds) * 1e9 * cpus),
            per_run - noop_per_run
        );
    }
}
