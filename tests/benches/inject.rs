//! Cost of `traceparent` injection per request, and what keep-alive mode
//! adds: a keep-alive HTTP/1.1 client and server bouncing small requests
//! over loopback as fast as they can (`tests/fixtures/http_pingpong.c`, both
//! on CPU 0), with only the injection programs attached (no capture).
//!
//! Modes, in interleaved rounds (one run of each per round, rotating which
//! goes first): no programs; first-request mode (the connection's first
//! request gets the header, then the socket leaves the sockhash); keep-alive
//! mode (every request gets the header: `sk_msg` on each send, the stream
//! verdict program on each receive). Printed: round trips per second, their
//! ratio to off, the cost per round trip, and (in a separate pass, since
//! the kernel's statistics cost time themselves) the BPF time per run of
//! each program. Then the same for uploads with a chunked body (head, one
//! chunk, last chunk: three sends per request, the body followed chunk by
//! chunk by `sk_msg`), off against keep-alive mode.
//!
//!   cargo bench -p fathom-tests --bench inject
//!
//! FATHOM_BENCH_ROUNDS (default 8), FATHOM_BENCH_SECONDS (default 4: one
//! workload run).
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::path::Path;

use aya::{Ebpf, EbpfLoader};
use fathom_agent::{ebpf::http_object, traces::inject};
use fathom_common::http::globals;
use fathom_tests::{
    BpfStats, bench_setting, bpf_runs_by_program, build_fixture, kernel_tests_possible,
    pinned_round_trips_with, print_rate_table,
};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    FirstRequest,
    KeepAlive,
}

const MODES: [Mode; 3] = [Mode::Off, Mode::FirstRequest, Mode::KeepAlive];

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Off => "off",
        Mode::FirstRequest => "first request only",
        Mode::KeepAlive => "every request (keep-alive)",
    }
}

/// The `fathom-http` object with injection on for every process (no PID
/// filter: the workload's processes are created after attaching).
fn load() -> Ebpf {
    EbpfLoader::new()
        .override_global(globals::INJECT, &1u8, true)
        .override_global(globals::FILTER_PIDS, &0u8, true)
        .load(http_object().unwrap())
        .unwrap()
}

/// Runs the workload (with `args`) once in `mode`; round trips per second.
fn run(mode: Mode, workload: &Path, seconds: f64, args: &[&str]) -> f64 {
    match mode {
        Mode::Off => pinned_round_trips_with(workload, seconds, args),
        Mode::FirstRequest | Mode::KeepAlive => {
            let mut ebpf = load();
            let injection = inject::attach(&mut ebpf, mode == Mode::KeepAlive).unwrap();
            assert_eq!(injection.keep_alive(), mode == Mode::KeepAlive);
            let rate = pinned_round_trips_with(workload, seconds, args);
            drop(injection);
            rate
        }
    }
}

/// `rounds` interleaved rounds of `modes` (rotating which goes first);
/// each mode's rates.
fn rounds_of(
    modes: &[Mode],
    rounds: usize,
    workload: &Path,
    seconds: f64,
    args: &[&str],
) -> Vec<Vec<f64>> {
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (round + k) % modes.len();
            let rate = run(modes[i], workload, seconds, args);
            rates[i].push(rate);
            eprintln!(
                "round {:>2}/{rounds} {:>27}{}: {rate:.0} round trips/s",
                round + 1,
                mode_name(modes[i]),
                if args.is_empty() { "" } else { ", chunked" },
            );
        }
    }
    rates
}

/// BPF time per run of each program in keep-alive mode, over one run of
/// the workload.
fn print_bpf_time(workload: &Path, seconds: f64, args: &[&str], label: &str) {
    let stats = BpfStats::enable();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, true).unwrap();
    let me = std::process::id();
    let ours = |n: &str| n.starts_with("fathom_");
    let before = bpf_runs_by_program(me, ours);
    pinned_round_trips_with(workload, seconds, args);
    let after = bpf_runs_by_program(me, ours);
    drop(injection);
    drop(stats);
    println!();
    println!("| program (keep-alive mode, {label}) | runs | BPF time per run |");
    println!("|---|---|---|");
    for (name, ns, runs) in &after {
        let (ns0, runs0) = before
            .iter()
            .find(|(n, _, _)| n == name)
            .map_or((0.0, 0.0), |(_, ns, runs)| (*ns, *runs));
        let runs = runs - runs0;
        if runs > 0.0 {
            println!("| {name} | {runs:.0} | {:.0} ns |", (ns - ns0) / runs);
        }
    }
}

fn main() {
    if !kernel_tests_possible("inject bench") {
        std::process::exit(1);
    }
    let rounds = bench_setting("FATHOM_BENCH_ROUNDS", 8.0) as usize;
    let seconds = bench_setting("FATHOM_BENCH_SECONDS", 4.0);
    let dir = tempfile::tempdir().unwrap();
    let workload = build_fixture("http_pingpong", dir.path());

    let rates = rounds_of(&MODES, rounds, &workload, seconds, &[]);
    let chunked_modes = [Mode::Off, Mode::KeepAlive];
    let chunked = rounds_of(&chunked_modes, rounds, &workload, seconds, &["chunked"]);

    println!();
    println!(
        "traceparent injection cost: `http_pingpong` (one keep-alive connection, small \
         requests, client and server on CPU 0), {rounds} interleaved rounds of {seconds} s"
    );
    let names: Vec<&str> = MODES.iter().map(|m| mode_name(*m)).collect();
    print_rate_table(&names, &rates, "request");

    print_bpf_time(&workload, seconds, &[], "GET requests");

    println!();
    println!(
        "chunked uploads: `http_pingpong chunked` (head, one 16-byte chunk, last chunk: \
         three sends per request), {rounds} interleaved rounds of {seconds} s"
    );
    let names: Vec<&str> = chunked_modes.iter().map(|m| mode_name(*m)).collect();
    print_rate_table(&names, &chunked, "request");
    print_bpf_time(&workload, seconds, &["chunked"], "chunked uploads");
}
