//! JIT code named end to end: Node 20 started with `--perf-basic-prof`
//! writes `/tmp/perf-PID.map`; `fathom-agent profile --pid` names its hot JS
//! function as that map does (oracle: the map node itself wrote).
//!
//! Loads BPF and so holds a `KernelTest`; without root/BPF or without
//! `node` it skips with a printed reason, and under `CI=true` fails instead.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::*;

#[test]
fn node_jit_functions_are_named_by_its_perf_map() {
    let Some(kernel) =
        KernelTest::with_tools("node_jit_functions_are_named_by_its_perf_map", &["node"])
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = workspace_root().join("tests/fixtures/node_hot.js");
    let mut node = ChildGuard::spawn(
        Command::new(kernel.path("node"))
            .arg("--perf-basic-prof")
            .arg(&script)
            .arg("20")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    assert_eq!(node.first_line(), "ready");
    let pid = node.pid();
    let map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
    // Wait until the optimizing compiler has written hotFunction's code.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&map).unwrap_or_default();
        if text.lines().any(|l| l.contains("*hotFunction")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node wrote no optimized hotFunction to {}",
            map.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = profile_pid(pid, dir.path(), "node.pb.gz");

    // The names the map gives hotFunction's code (`JS:*hotFunction <file>:<line>:<col>`).
    let named: Vec<String> = std::fs::read_to_string(&map)
        .unwrap()
        .lines()
        .filter_map(|l| l.splitn(3, ' ').nth(2))
        .filter(|name| name.contains("hotFunction"))
        .map(str::to_owned)
        .collect();
    assert!(!named.is_empty());
    let samples: Vec<FlatSample> = flatten(&read_profile(&output))
        .into_iter()
        .filter(|s| s.pid == i64::from(pid))
        .collect();
    let total: i64 = samples.iter().map(|s| s.count).sum();
    let share = leaf_share(&samples, |f| {
        named.iter().any(|n| f.starts_with(n.as_str()))
    });
    println!(
        "hotFunction (as the perf map names it): {:.1}% of {total} samples",
        share * 100.0
    );
    assert!(total >= 200, "{total} samples");
    assert!(
        share >= 0.8,
        "{:.1}% of samples in hotFunction; leaves: {:?}",
        share * 100.0,
        samples
            .iter()
            .map(|s| (s.count, s.functions.first().cloned()))
            .collect::<Vec<_>>()
    );
}
