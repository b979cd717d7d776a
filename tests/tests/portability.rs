//! Portability on the real kernel: every eBPF program of the three objects
//! verifies within the verification budget in every configuration the agent
//! uses; `fathom-agent check --smoke` runs each signal against a workload;
//! a program that cannot load degrades its signal (or stops only it) while
//! the others run, and says so in one log line, `/healthz` and `/metrics`.
//!
//! The same checks run inside Debian's 6.1 and 6.12 kernels under QEMU
//! (`scripts/kernel-matrix`, from `.ci/run`).
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use fathom_agent::{
    check::{check_programs, programs_table},
    ebpf::{BUDGET_PEAK_STATES, BUDGET_PROCESSED_INSNS, FAIL_LOAD_ENV},
};
use fathom_tests::*;

#[test]
fn every_program_verifies_within_the_budget_in_every_configuration() {
    let Some(_kernel) =
        KernelTest::acquire("every_program_verifies_within_the_budget_in_every_configuration")
    else {
        return;
    };
    let checks = check_programs(&[], &[]);
    eprintln!("{}", programs_table(&checks));
    // 5 profiler programs twice, 27 HTTP programs four times, 6 network.
    assert!(checks.len() >= 2 * 5 + 4 * 27 + 6, "{} loads", checks.len());
    for object in ["fathom", "fathom-http", "fathom-net"] {
        assert!(checks.iter().any(|c| c.object == object), "no {object}");
    }
    let bad: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(
        bad.is_empty(),
        "over the budget of {BUDGET_PROCESSED_INSNS} insns / {BUDGET_PEAK_STATES} states, \
         or rejected: {bad:#?}"
    );
}

#[test]
fn check_smoke_runs_every_signal_on_this_kernel() {
    let Some(_kernel) = KernelTest::acquire("check_smoke_runs_every_signal_on_this_kernel") else {
        return;
    };
    let out = Command::new(agent_binary())
        .args(["check", "--smoke"])
        .env("FATHOM_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(out.status.success(), "check --smoke failed");
    for signal in ["profiles", "traces", "network"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("smoke {signal} ")))
            .unwrap_or_else(|| panic!("no smoke line for {signal}"));
        assert!(line.contains(" ok: "), "{line}");
    }
}

/// `GET path` on the agent's health endpoint: status and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// Runs the daemon with every signal and `fail` forced to fail to load;
/// returns `/healthz`, `/metrics` once ready, and the log.
fn daemon_with_failures(fail: &str) -> (String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let health = free_port();
    let http_listen = format!("127.0.0.1:{}", free_port());
    let health_listen = format!("127.0.0.1:{health}");
    let store = dir.path().join("store.redb");
    let agent = Agent::spawn_env(
        agent_binary(),
        &[
            "--interval",
            "1s",
            "--health-listen",
            &health_listen,
            "--http-listen",
            &http_listen,
            "--otlp-grpc-listen",
            "off",
            "--otlp-http-listen",
            "off",
            "--store-path",
            store.to_str().unwrap(),
        ],
        &[
            (FAIL_LOAD_ENV, fail),
            ("FATHOM_VERIFIER_LOG_DIR", dir.path().to_str().unwrap()),
        ],
        true,
    );
    let end = Instant::now() + Duration::from_secs(90);
    let healthz = loop {
        match get(health, "/healthz") {
            Some((200, body)) => break body,
            _ if Instant::now() > end => panic!("the agent never became ready"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let (_, metrics) = get(health, "/metrics").unwrap();
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    (healthz, metrics, log)
}

/// Log lines that say a piece is degraded or a signal did not start.
fn degraded_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("degraded") || l.contains("could not start"))
        .collect()
}

#[test]
fn a_rejected_table_unwinder_leaves_frame_pointer_profiles() {
    let Some(_kernel) =
        KernelTest::acquire("a_rejected_table_unwinder_leaves_frame_pointer_profiles")
    else {
        return;
    };
    let (healthz, metrics, log) = daemon_with_failures("profile_unwind");
    assert!(
        healthz.contains("profiles: degraded (frame-pointers)"),
        "{healthz}"
    );
    assert!(healthz.contains("traces: up (capture+inject)"), "{healthz}");
    assert!(healthz.contains("network: up"), "{healthz}");
    assert!(
        metrics.contains("fathom_agent_signal_up{signal=\"profiles\",mode=\"frame-pointers\"} 1"),
        "{metrics}"
    );
    let lines = degraded_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("profile_unwind"), "{}", lines[0]);
    assert!(log.lines().count() < 300, "a long log:\n{log}");
}

#[test]
fn rejected_injection_leaves_capture() {
    let Some(_kernel) = KernelTest::acquire("rejected_injection_leaves_capture") else {
        return;
    };
    let (healthz, metrics, log) = daemon_with_failures("fathom_sk_msg");
    assert!(healthz.contains("profiles: up (tables)"), "{healthz}");
    assert!(healthz.contains("traces: degraded (capture)"), "{healthz}");
    assert!(
        metrics.contains("fathom_agent_signal_up{signal=\"traces\",mode=\"capture\"} 1"),
        "{metrics}"
    );
    let lines = degraded_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("fathom_sk_msg"), "{}", lines[0]);
}

#[test]
fn signals_that_cannot_start_leave_the_others_running() {
    let Some(_kernel) = KernelTest::acquire("signals_that_cannot_start_leave_the_others_running")
    else {
        return;
    };
    let (healthz, metrics, log) = daemon_with_failures("profile_record,net_sock_state");
    assert!(healthz.starts_with("ok\n"), "{healthz}");
    assert!(healthz.contains("profiles: down (off)"), "{healthz}");
    assert!(healthz.contains("network: down (off)"), "{healthz}");
    assert!(healthz.contains("traces: up (capture+inject)"), "{healthz}");
    assert!(
        metrics.contains("fathom_agent_signal_up{signal=\"profiles\",mode=\"off\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fathom_agent_signal_up{signal=\"traces\",mode=\"capture+inject\"} 1"),
        "{metrics}"
    );
    let lines = degraded_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("profile_record")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("net_sock_state")),
        "{lines:#?}"
    );
}
