//! Cost of the Go goroutine probes: a Go service (`tests/fixtures/pooled/
//! go_middle.go`) that calls a Go upstream (`tests/fixtures/http/leaf.go`)
//! through one shared `http.Client` for each request it serves, driven by
//! `wrk` with keep-alive connections. Every request crosses two uprobes
//! (`(*Transport).roundTrip`, `(*Request).write`); each goroutine started
//! crosses two more (`net/http` starts one per request for its background
//! read).
//!
//! Modes, in interleaved rounds: no agent; the release agent tracing every
//! process with `--trace-go false`; the same with the goroutine probes.
//! Printed: requests per second (front service), their ratio to off, and the
//! cost per request.
//!
//!   cargo bench -p fathom-tests --bench go_context
//!
//! FATHOM_BENCH_ROUNDS (default 5), FATHOM_BENCH_SECONDS (default 4).
#![allow(
    clippy::unwrap_used,
    reason = "benchmark: a failed unwrap is a failed run"
)]

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use fathom_tests::{
    Agent, ChildGuard, bench_setting, chain::go_build, free_port, kernel_tests_possible,
    print_rate_table, release_agent_binary, workspace_root,
};

const MODES: [&str; 3] = ["off", "agent, --trace-go false", "agent, goroutine probes"];

fn main() {
    if !kernel_tests_possible("go_context bench") {
        std::process::exit(1);
    }
    let rounds = bench_setting("FATHOM_BENCH_ROUNDS", 5.0) as usize;
    let seconds = bench_setting("FATHOM_BENCH_SECONDS", 4.0);
    let root = workspace_root();
    let middle = go_build(
        &root.join("tests/fixtures/pooled/go_middle.go"),
        "go_middle",
        false,
    );
    let leaf = go_build(&root.join("tests/fixtures/http/leaf.go"), "leaf", false);
    let agent_bin = release_agent_binary();

    let leaf_port = free_port();
    let _leaf = spawn_listening(
        Command::new(&leaf).args(["-listen", &format!("127.0.0.1:{leaf_port}")]),
        "listening on",
    );
    let (_middle, middle_line) = spawn_listening(
        Command::new(&middle).arg(leaf_port.to_string()),
        "listening ",
    );
    let port: u16 = middle_line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/leaf/bench");

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..rounds {
        for k in 0..MODES.len() {
            let i = (round + k) % MODES.len();
            let dir = tempfile::tempdir().unwrap();
            let agent = (i > 0).then(|| {
                let store = dir.path().join("store.redb");
                let http = format!("127.0.0.1:{}", free_port());
                let go = if i == 2 { "true" } else { "false" };
                let agent = Agent::spawn_binary(
                    &agent_bin,
                    &[
                        "--signals",
                        "traces",
                        "--http-listen",
                        &http,
                        "--otlp-grpc-listen",
                        "off",
                        "--otlp-http-listen",
                        "off",
                        "--store-path",
                        store.to_str().unwrap(),
                        "--trace-go",
                        go,
                    ],
                    false,
                );
                agent.wait_for_log("http tracing attached", Duration::from_secs(60));
                if i == 2 {
                    agent.wait_for_log("Go goroutine context attached", Duration::from_secs(10));
                }
                agent
            });
            let rate = wrk(&url, seconds);
            drop(agent);
            rates[i].push(rate);
            eprintln!(
                "round {:>2}/{rounds} {:>26}: {rate:.0} requests/s",
                round + 1,
                MODES[i]
            );
        }
    }
    println!();
    println!(
        "Go goroutine probes: go_middle → Go leaf, `wrk -t1 -c8` keep-alive, {rounds} \
         interleaved rounds of {seconds} s (2 CPUs shared by wrk, both services and the agent)"
    );
    print_rate_table(&MODES, &rates, "request");
}

/// Spawns `cmd` and waits for a stdout line starting with `prefix`.
fn spawn_listening(cmd: &mut Command, prefix: &str) -> (ChildGuard, String) {
    let mut child = ChildGuard::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()));
    let mut reader = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if line.starts_with(prefix) {
            // Keep draining stdout so the service never blocks on it.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return (child, line);
        }
        line.clear();
    }
    panic!("{cmd:?} exited before printing {prefix:?}");
}

/// `wrk`'s requests per second.
fn wrk(url: &str, seconds: f64) -> f64 {
    let out = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{}s", seconds.round() as u64), url])
        .output()
        .unwrap();
    assert!(out.status.success(), "wrk failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{text}"))
}
