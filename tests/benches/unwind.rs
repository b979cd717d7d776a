//! Cost of the eBPF stack unwinder, three ways:
//!
//! 1. **BPF run time per sample** of `profile_cpu` for user stacks of 16, 64
//!    and 128 frames, walked from unwind tables (`--unwind tables`) and by
//!    the kernel's frame-pointer walk (`--unwind frame-pointers`). The
//!    fixture (`tests/fixtures/deep.c`, `gcc -O2 -fomit-frame-pointer`)
//!    spins at the bottom of a recursion on every CPU, so nearly every sample
//!    has the same stack; the agent profiles it alone (`--pid`) at 999 Hz
//!    with `kernel.bpf_stats_enabled=1`, and the program's `run_time_ns` and
//!    `run_cnt` are read from `/proc/AGENT/fdinfo` (the agent's own program:
//!    no tool needed, and no confusion with another agent's program of the
//!    same name). The depth is checked in the profile the agent writes,
//!    not assumed. Frame pointers find only a frame or two in code built
//!    without them: their row is the price of the kernel's walk, not of a
//!    walk of the same depth.
//! 2. **Table build time and memory** per MiB of executable text for libc,
//!    python3, nginx (when installed) and the release agent itself, through
//!    `fathom_agent::profiles::unwind::build` in this (release) process.
//! 3. **Workload slowdown** at 99 Hz: the fixture doing a fixed amount of
//!    work at depth 64 on every CPU, timed alone and while the release agent
//!    profiles the whole system with tables, in five alternating pairs.
//!
//!   cargo bench -p fathom-tests --bench unwind
//!
//! Needs root (it loads BPF and sets `kernel.bpf_stats_enabled`, restored
//! on exit); elsewhere it says why and exits non-zero.
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, BPF_STATS_SYSCTL, BpfStats, ChildGuard, cpu_seconds, flatten, kernel_tests_possible,
    median, read_profile, release_agent_binary,
};

/// Total user frames of the measured stacks.
const STACK_FRAMES: [usize; 3] = [16, 64, 128];
/// User frames of a fixture thread besides `recurse`: `worker`,
/// `start_thread` and `clone3` (whose child path ends the call chain).
const BASE_FRAMES: usize = 3;
/// How long each BPF run-time measurement samples, and how many rounds of
/// all measurements (the median is reported: this VM is noisy).
const SAMPLE_SECONDS: u64 = 3;
const SAMPLE_ROUNDS: usize = 3;
const SAMPLE_HZ: u64 = 999;
/// `BPF_PROG_TYPE_PERF_EVENT`: the agent's only program of this type is
/// `profile_cpu`.
const PROG_TYPE_PERF_EVENT: u32 = 7;
const GOAL_NS_AT_64: f64 = 500.0;
/// Length of one workload run in part 3, and the number of off/on pairs.
const WORKLOAD_SECONDS: f64 = 4.0;
const WORKLOAD_PAIRS: usize = 5;
/// The agent's name for the kernel's mapping in profiles.
const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// Compiles `tests/fixtures/deep.c` the way the unwinder must cope with:
/// optimized, without frame pointers.
fn build_deep(dir: &Path) -> PathBuf {
    let source = fathom_tests::workspace_root().join("tests/fixtures/deep.c");
    let out = dir.join("deep");
    let status = Command::new("gcc")
        .args(["-O2", "-fomit-frame-pointer", "-g", "-pthread", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "gcc failed for {}", source.display());
    out
}

/// Run statistics of one BPF program, as `/proc/PID/fdinfo` shows them.
#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    prog_type: u32,
    prog_id: u32,
    run_time_ns: u64,
    run_cnt: u64,
}

fn parse_fdinfo(text: &str) -> ProgStats {
    let mut stats = ProgStats::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "prog_type" => stats.prog_type = value.parse().unwrap(),
            "prog_id" => stats.prog_id = value.parse().unwrap(),
            "run_time_ns" => stats.run_time_ns = value.parse().unwrap(),
            "run_cnt" => stats.run_cnt = value.parse().unwrap(),
            _ => {}
        }
    }
    stats
}

/// Statistics of the agent's `profile_cpu`: its only perf-event program.
fn profile_cpu_stats(agent_pid: u32) -> ProgStats {
    let mut found: BTreeMap<u32, ProgStats> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{agent_pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let fd = entry.file_name();
        let Ok(text) =
            std::fs::read_to_string(format!("/proc/{agent_pid}/fdinfo/{}", fd.to_string_lossy()))
        else {
            continue;
        };
        let stats = parse_fdinfo(&text);
        if stats.prog_type == PROG_TYPE_PERF_EVENT {
            found.insert(stats.prog_id, stats);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected one perf-event program in agent {agent_pid}, found {found:?}"
    );
    found.into_values().next().unwrap()
}

/// SIGINT, then a clean exit.
fn stop(agent: Agent) {
    agent.signal("INT");
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "agent failed: {status}; log:\n{log}");
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

/// One `profile_cpu` measurement: the agent profiling the fixture alone.
struct RunCost {
    /// Program statistics over the agent's whole life.
    stats: ProgStats,
    /// Samples of the fixture in the profile (runs that walked its stack).
    samples: u64,
    /// User frames of the fixture's samples → samples with that many.
    frames: BTreeMap<usize, u64>,
    /// Samples whose stack has `recurse` exactly the expected number of times.
    full_depth: u64,
}

/// Runs the agent with `--pid target` on a fixture spinning at `recursion`
/// levels deep, and measures its program.
fn measure(
    agent: &Path,
    deep: &Path,
    recursion: usize,
    unwind: &str,
    target_self: bool,
    dir: &Path,
) -> RunCost {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fixture = ChildGuard::spawn(
        Command::new(deep)
            .arg(recursion.to_string())
            .arg(threads.to_string()),
    );
    // A process that never runs: the agent filters out every sample.
    let sleeper = ChildGuard::spawn(Command::new("sleep").arg("600"));
    let target = if target_self {
        fixture.pid()
    } else {
        sleeper.pid()
    };
    let output = dir.join(format!("{unwind}-{recursion}-{target_self}.pb.gz"));
    let run = Agent::spawn_binary(
        agent,
        &[
            "profile",
            "--pid",
            &target.to_string(),
            "--duration",
            "120s",
            "--frequency",
            &SAMPLE_HZ.to_string(),
            "--unwind",
            unwind,
            "--output",
            output.to_str().unwrap(),
        ],
        false,
    );
    run.wait_for_log("profiler attached", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(SAMPLE_SECONDS));
    let stats = profile_cpu_stats(run.pid());
    stop(run);
    drop(fixture);

    let profile = read_profile(&output);
    let mut frames = BTreeMap::new();
    let mut samples = 0;
    let mut full_depth = 0;
    for sample in flatten(&profile) {
        if sample.pid != i64::from(target) {
            continue;
        }
        let count = sample.count as u64;
        samples += count;
        let user = sample
            .files
            .iter()
            .filter(|f| f.as_str() != KERNEL_MAPPING)
            .count();
        *frames.entry(user).or_insert(0) += count;
        if sample.functions.iter().filter(|f| *f == "recurse").count() == recursion {
            full_depth += count;
        }
    }
    RunCost {
        stats,
        samples,
        frames,
        full_depth,
    }
}

/// The most common frame count and its share of the samples.
fn modal_frames(frames: &BTreeMap<usize, u64>) -> (usize, f64) {
    let total: u64 = frames.values().sum();
    frames
        .iter()
        .max_by_key(|&(_, count)| *count)
        .map_or((0, 0.0), |(&n, &count)| {
            (n, count as f64 / total.max(1) as f64)
        })
}

struct CostRow {
    frames: usize,
    unwind: &'static str,
    /// User frames in the profile → samples, over all rounds.
    frame_counts: BTreeMap<usize, u64>,
    samples: u64,
    full_depth: u64,
    /// Per round.
    ns_per_run: Vec<f64>,
    walked_share: Vec<f64>,
    ns_per_sample: Vec<f64>,
}

/// Part 1: BPF run time per sample, in interleaved rounds. Returns the
/// cost of a filtered-out run (median) and the rows.
fn bpf_costs(agent: &Path, deep: &Path, dir: &Path) -> (f64, Vec<CostRow>) {
    let _stats = BpfStats::enable();
    let mut rows: Vec<CostRow> = STACK_FRAMES
        .iter()
        .flat_map(|&frames| {
            ["tables", "frame-pointers"].map(|unwind| CostRow {
                frames,
                unwind,
                frame_counts: BTreeMap::new(),
                samples: 0,
                full_depth: 0,
                ns_per_run: Vec::new(),
                walked_share: Vec::new(),
                ns_per_sample: Vec::new(),
            })
        })
        .collect();
    let mut filtered = Vec::new();
    for round in 1..=SAMPLE_ROUNDS {
        // The price of a run that only filters the sample out, to take the
        // runs that did not sample the fixture (other processes, the
        // agent's own threads) out of the per-sample figure.
        let baseline = measure(agent, deep, 16, "tables", false, dir);
        let filtered_ns = baseline.stats.run_time_ns as f64 / baseline.stats.run_cnt.max(1) as f64;
        eprintln!(
            "[1/3] round {round}/{SAMPLE_ROUNDS}: a filtered-out run (agent --pid of a sleeper): {filtered_ns:.0} ns over {} runs",
            baseline.stats.run_cnt
        );
        filtered.push(filtered_ns);
        for row in &mut rows {
            let recursion = row.frames - BASE_FRAMES;
            let cost = measure(agent, deep, recursion, row.unwind, true, dir);
            let ProgStats {
                run_time_ns,
                run_cnt,
                ..
            } = cost.stats;
            // The profile also holds the few samples taken between the
            // statistics read and the stop.
            let walked = cost.samples.min(run_cnt);
            let others = (run_cnt - walked) as f64;
            let ns_per_sample = (run_time_ns as f64 - others * filtered_ns) / walked.max(1) as f64;
            eprintln!(
                "[1/3] round {round}/{SAMPLE_ROUNDS}: {} user frames (recursion {recursion}), --unwind {}: {run_cnt} runs, {} fixture samples, frames in the profile {:?}: {:.0} ns/run, {ns_per_sample:.0} ns/sample",
                row.frames,
                row.unwind,
                cost.samples,
                cost.frames,
                run_time_ns as f64 / run_cnt.max(1) as f64,
            );
            for (n, count) in cost.frames {
                *row.frame_counts.entry(n).or_insert(0) += count;
            }
            row.samples += cost.samples;
            row.full_depth += cost.full_depth;
            row.ns_per_run
                .push(run_time_ns as f64 / run_cnt.max(1) as f64);
            row.walked_share.push(walked as f64 / run_cnt.max(1) as f64);
            row.ns_per_sample.push(ns_per_sample);
        }
    }
    (median(&filtered), rows)
}

struct TableRow {
    name: String,
    file_mib: f64,
    text_mib: f64,
    fdes: u32,
    rows: usize,
    build_ms: f64,
    build_ms_range: (f64, f64),
    memory: usize,
}

fn python3_binary() -> Option<PathBuf> {
    // Debian's python3 (libpython linked in); else whatever python3 runs.
    let debian = Path::new("/usr/bin/python3");
    if debian.exists() {
        return debian.canonicalize().ok();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import os,sys;print(os.path.realpath(sys.executable))",
        ])
        .output()
        .ok()?;
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Part 2: table build time and memory.
fn table_costs(agent: &Path) -> Vec<TableRow> {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")];
    files.extend(python3_binary());
    let nginx = Path::new("/usr/sbin/nginx");
    if nginx.exists() {
        files.push(nginx.to_path_buf());
    } else {
        eprintln!("[2/3] /usr/sbin/nginx is not installed: left out");
    }
    files.push(agent.to_path_buf());
    let mut rows = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        eprintln!(
            "[2/3] building the unwind table of {} ({:.1} MiB) 5 times...",
            path.display(),
            bytes.len() as f64 / MIB
        );
        let mut times = Vec::new();
        let mut table = None;
        for _ in 0..5 {
            let started = Instant::now();
            let built = fathom_agent::profiles::unwind::build(&bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            times.push(started.elapsed().as_secs_f64() * 1e3);
            table = Some(built);
        }
        let table = table.unwrap();
        rows.push(TableRow {
            name: path.display().to_string(),
            file_mib: bytes.len() as f64 / MIB,
            text_mib: table.stats.text_bytes as f64 / MIB,
            fdes: table.stats.fdes,
            rows: table.rows.len(),
            build_ms: median(&times),
            build_ms_range: min_max(&times),
            memory: table.memory_bytes(),
        });
    }
    rows
}

const MIB: f64 = (1 << 20) as f64;

/// Runs the fixed workload; returns its wall time and CPU time (user +
/// system, all threads) in seconds, as `/usr/bin/time` measures them.
fn run_workload(deep: &Path, threads: usize, iterations: u64) -> (f64, f64) {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "TIME %e %U %S"])
        .arg(deep)
        .args(["64", &threads.to_string(), &iterations.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "workload failed: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let times: Vec<f64> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("TIME "))
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (times[0], times[1] + times[2])
}

struct Slowdown {
    threads: usize,
    iterations: u64,
    /// (wall, CPU) seconds of each run.
    off: Vec<(f64, f64)>,
    on: Vec<(f64, f64)>,
    agent_cpu: Vec<f64>,
}

/// Runs the workload while the agent profiles the whole system at 99 Hz
/// with tables; returns the workload's (wall, CPU) seconds and the agent's
/// CPU seconds meanwhile.
fn run_with_agent(
    agent: &Path,
    deep: &Path,
    threads: usize,
    iterations: u64,
    dir: &Path,
    pair: usize,
) -> ((f64, f64), f64) {
    let out_dir = dir.join(format!("windows-{pair}"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let run = Agent::spawn_binary(
        agent,
        &[
            "--frequency",
            "99",
            "--unwind",
            "tables",
            // Drains more often than the 10 s default: the cost of
            // draining is over- rather than under-stated.
            "--interval",
            "3s",
            "--output-dir",
            out_dir.to_str().unwrap(),
        ],
        false,
    );
    // Steady state: one-time costs (kallsyms, the tables of processes
    // already running) are behind it once a window is written.
    run.wait_for_log("window done", Duration::from_secs(60));
    let before = cpu_seconds(run.pid());
    let times = run_workload(deep, threads, iterations);
    let agent_cpu = cpu_seconds(run.pid()) - before;
    stop(run);
    (times, agent_cpu)
}

/// Part 3: the workload alone and under the agent at 99 Hz, alternated.
fn slowdown(agent: &Path, deep: &Path, dir: &Path) -> Slowdown {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probe_iterations = 200_000_000u64;
    let (probe, _) = run_workload(deep, threads, probe_iterations);
    let iterations = (probe_iterations as f64 * WORKLOAD_SECONDS / probe) as u64;
    eprintln!(
        "[3/3] workload: depth 64 on {threads} threads, {iterations} iterations each (~{WORKLOAD_SECONDS} s)"
    );
    let mut result = Slowdown {
        threads,
        iterations,
        off: Vec::new(),
        on: Vec::new(),
        agent_cpu: Vec::new(),
    };
    for pair in 0..WORKLOAD_PAIRS {
        // Which run of a pair goes first alternates, so that a drift of
        // the machine's speed hits both alike.
        for on in [pair % 2 == 1, pair % 2 == 0] {
            let (times, label) = if on {
                let (times, agent_cpu) =
                    run_with_agent(agent, deep, threads, iterations, dir, pair);
                result.agent_cpu.push(agent_cpu);
                result.on.push(times);
                (times, "on ")
            } else {
                let times = run_workload(deep, threads, iterations);
                result.off.push(times);
                (times, "off")
            };
            eprintln!(
                "[3/3] pair {}/{WORKLOAD_PAIRS} {label}: wall {:.3} s, CPU {:.3} s",
                pair + 1,
                times.0,
                times.1
            );
        }
    }
    result
}

/// The 1-minute load average: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

fn cost_table(md: &mut String, filtered_ns: f64, costs: &[CostRow], cpus: usize) {
    writeln!(
        md,
        "\n### BPF run time per sample of `profile_cpu` ({SAMPLE_HZ} Hz, `--pid`, fixture spinning on {cpus} threads; median of {SAMPLE_ROUNDS} rounds of {SAMPLE_SECONDS} s)\n"
    )
    .unwrap();
    writeln!(
        md,
        "| fixture's user stack | `--unwind` | frames in the profile (share of samples) | samples with all `recurse` frames | ns per run, all runs | runs that sampled the fixture | **ns per sample** (min–max) | vs frame pointers |"
    )
    .unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|").unwrap();
    for row in costs {
        let fp = costs
            .iter()
            .find(|r| r.frames == row.frames && r.unwind == "frame-pointers")
            .map_or(f64::NAN, |r| median(&r.ns_per_sample));
        let (modal, share) = modal_frames(&row.frame_counts);
        let (lo, hi) = min_max(&row.ns_per_sample);
        writeln!(
            md,
            "| {} frames | {} | {modal} ({:.1}%) | {:.1}% | {:.0} | {:.1}% | **{:.0}** ({lo:.0}–{hi:.0}) | {:.2}× |",
            row.frames,
            row.unwind,
            share * 100.0,
            row.full_depth as f64 / row.samples.max(1) as f64 * 100.0,
            median(&row.ns_per_run),
            median(&row.walked_share) * 100.0,
            median(&row.ns_per_sample),
            median(&row.ns_per_sample) / fp,
        )
        .unwrap();
    }
    let tables = |frames: usize| {
        costs
            .iter()
            .find(|r| r.frames == frames && r.unwind == "tables")
            .map_or(f64::NAN, |r| median(&r.ns_per_sample))
    };
    let (first, last) = (STACK_FRAMES[0], STACK_FRAMES[STACK_FRAMES.len() - 1]);
    let per_frame = (tables(last) - tables(first)) / (last - first) as f64;
    let at_64 = tables(64);
    writeln!(
        md,
        "\nGoal ≤{GOAL_NS_AT_64:.0} ns per sample at 64 frames with tables: **{at_64:.0} ns — {}**. \
         With tables each frame adds {per_frame:.0} ns ({first} → {last} frames), and a straight line through those points gives {:.0} ns for no frame at all; \
         for comparison, a frame-pointer run (one user frame, plus the kernel stack, hashing and storing that every run does) takes {:.0} ns (median of its rows).",
        if at_64 <= GOAL_NS_AT_64 { "met" } else { "not met" },
        tables(first) - per_frame * first as f64,
        median(
            &costs
                .iter()
                .filter(|r| r.unwind == "frame-pointers")
                .flat_map(|r| r.ns_per_sample.iter().copied())
                .collect::<Vec<_>>()
        ),
    )
    .unwrap();
    writeln!(
        md,
        "\nns per sample = (run time − runs that did not sample the fixture × {filtered_ns:.0} ns, the measured cost of a filtered-out run) ÷ the fixture's samples in the profile. \
         The fixture is built with `gcc -O2 -fomit-frame-pointer`: the kernel's frame-pointer walk finds only the frames in the profile column, \
         so a frame-pointer row is the cost of the kernel's walk (user and kernel stacks), not of a walk of that depth."
    )
    .unwrap();
}

fn table_table(md: &mut String, tables: &[TableRow]) {
    writeln!(
        md,
        "\n### Unwind table build (`fathom_agent::profiles::unwind::build`, median of 5)\n"
    )
    .unwrap();
    writeln!(
        md,
        "| file | file size | executable text | FDEs | rows | build time (min–max) | build time per MiB of text | table memory (`memory_bytes()`) | **table memory per MiB of text** |"
    )
    .unwrap();
    writeln!(md, "|---|---|---|---|---|---|---|---|---|").unwrap();
    for t in tables {
        writeln!(
            md,
            "| `{}` | {:.1} MiB | {:.2} MiB | {} | {} | {:.1} ms ({:.1}–{:.1}) | {:.1} ms | {:.0} KiB | **{:.0} KiB** |",
            t.name,
            t.file_mib,
            t.text_mib,
            t.fdes,
            t.rows,
            t.build_ms,
            t.build_ms_range.0,
            t.build_ms_range.1,
            t.build_ms / t.text_mib,
            t.memory as f64 / 1024.0,
            t.memory as f64 / 1024.0 / t.text_mib,
        )
        .unwrap();
    }
}

fn slowdown_table(md: &mut String, slow: &Slowdown) {
    writeln!(
        md,
        "\n### Workload slowdown, agent at 99 Hz with tables on the whole system\n"
    )
    .unwrap();
    writeln!(
        md,
        "Depth-64 recursion on {} threads, {} iterations each; {WORKLOAD_PAIRS} off/on pairs, the first run of a pair alternating; \
         the agent in steady state (a window written), draining every 3 s (the default is 10 s).\n",
        slow.threads, slow.iterations
    )
    .unwrap();
    writeln!(
        md,
        "| measure | off (median) | on (median) | **slowdown: median of the per-pair ratios** | per-pair range | spread of the off runs |"
    )
    .unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    for (name, pick) in [
        (
            "wall time",
            (|r: &(f64, f64)| r.0) as fn(&(f64, f64)) -> f64,
        ),
        ("workload CPU time", |r: &(f64, f64)| r.1),
    ] {
        let off: Vec<f64> = slow.off.iter().map(pick).collect();
        let on: Vec<f64> = slow.on.iter().map(pick).collect();
        let ratios: Vec<f64> = on
            .iter()
            .zip(&off)
            .map(|(on, off)| (on / off - 1.0) * 100.0)
            .collect();
        let (lo, hi) = min_max(&ratios);
        let (off_lo, off_hi) = min_max(&off);
        writeln!(
            md,
            "| {name} | {:.3} s | {:.3} s | **{:+.2}%** | {lo:+.2}% … {hi:+.2}% | {:.1}% |",
            median(&off),
            median(&on),
            median(&ratios),
            (off_hi - off_lo) / median(&off) * 100.0,
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nAgent CPU during a run: {:.3} s (median). Goal ≤1% slowdown at 99 Hz; the spread of the off runs is the noise floor.",
        median(&slow.agent_cpu)
    )
    .unwrap();
}

fn main() {
    if !kernel_tests_possible("unwind") {
        std::process::exit(1);
    }
    if !Path::new(BPF_STATS_SYSCTL).exists() {
        eprintln!("unwind bench: {BPF_STATS_SYSCTL} is missing: cannot read BPF run times");
        std::process::exit(1);
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let deep = build_deep(dir.path());
    eprintln!("building the release agent...");
    let agent = release_agent_binary();
    let after_build = Instant::now();
    let load_before = load_average();

    let part = Instant::now();
    let (filtered_ns, costs) = bpf_costs(&agent, &deep, dir.path());
    eprintln!("[1/3] took {:.0} s", part.elapsed().as_secs_f64());
    let part = Instant::now();
    let tables = table_costs(&agent);
    eprintln!("[2/3] took {:.1} s", part.elapsed().as_secs_f64());
    let part = Instant::now();
    let slow = slowdown(&agent, &deep, dir.path());
    eprintln!("[3/3] took {:.0} s", part.elapsed().as_secs_f64());

    let mut md = String::new();
    writeln!(
        md,
        "\n## Unwinder bench: `cargo bench -p fathom-tests --bench unwind`\n\n\
         {} CPUs; 1-minute load average {load_before} when the measurements started (the agent's build included), {} at the end (the bench's fixture keeps every CPU busy); other work on the machine skews every figure.",
        slow.threads,
        load_average()
    )
    .unwrap();
    cost_table(&mut md, filtered_ns, &costs, slow.threads);
    table_table(&mut md, &tables);
    slowdown_table(&mut md, &slow);
    println!("{md}");
    eprintln!(
        "done in {:.0} s ({:.0} s after the build)",
        started.elapsed().as_secs_f64(),
        after_build.elapsed().as_secs_f64()
    );
}
