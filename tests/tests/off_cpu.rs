//! Off-CPU profiles on the real kernel, against a workload whose blocked time
//! is known by construction (`fixtures/offcpu.c`: sleeps and pipe waits of
//! fixed length).
//!
//! Every test loads BPF and so holds a `KernelTest` (the kernel lock);
//! without root/BPF they skip with a printed reason, and under `CI=true`
//! they fail instead.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::*;

const ROUNDS: u64 = 30;
const SLEEP_MS: u64 = 40;
const PIPE_MS: u64 = 25;

/// Nanoseconds of the samples whose stack holds `function`.
fn inclusive_ns(samples: &[FlatSample], function: &str) -> i64 {
    samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| f == function))
        .map(|s| s.count)
        .sum()
}

/// The `offcpu` fixture (ROUNDS of SLEEP_MS sleeps and PIPE_MS pipe waits,
/// started by SIGUSR1, wall times written to `measured`), ready.
fn start_workload(dir: &Path, measured: &Path, service: Option<&str>) -> ChildGuard {
    let binary = build_fixture("offcpu", dir);
    let mut cmd = Command::new(&binary);
    cmd.args([
        ROUNDS.to_string(),
        SLEEP_MS.to_string(),
        PIPE_MS.to_string(),
        measured.display().to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(service) = service {
        cmd.env("OTEL_SERVICE_NAME", service);
    }
    let mut workload = ChildGuard::spawn(&mut cmd);
    assert_eq!(workload.first_line(), "ready");
    workload
}

#[test]
fn off_cpu_time_per_function_matches_the_constructed_waits() {
    let Some(_kernel) =
        KernelTest::acquire("off_cpu_time_per_function_matches_the_constructed_waits")
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let measured = dir.path().join("measured");
    let workload = start_workload(dir.path(), &measured, None);
    let pid = workload.pid();
    let output = dir.path().join("off.pb.gz");
    let agent = Agent::spawn(&[
        "profile",
        "--event",
        "off-cpu",
        "--pid",
        &pid.to_string(),
        "--duration",
        "6s",
        "--output",
        output.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiler attached", Duration::from_secs(60));
    workload.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !measured.exists() {
        assert!(Instant::now() < deadline, "the workload did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");

    let text = std::fs::read_to_string(&measured).unwrap();
    let wall: Vec<i64> = text
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let profile = read_profile(&output);
    let types: Vec<(String, String)> = profile
        .sample_type
        .iter()
        .map(|t| {
            (
                profile.string_table[t.ty as usize].clone(),
                profile.string_table[t.unit as usize].clone(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [("off_cpu".to_string(), "nanoseconds".to_string())],
        "sample types"
    );
    let samples: Vec<FlatSample> = flatten(&profile)
        .into_iter()
        .filter(|s| s.pid == i64::from(pid))
        .collect();
    println!("phase        constructed      wall(workload)   fathom");
    for (function, per_round, wall) in [
        ("sleep_phase", SLEEP_MS, wall[0]),
        ("pipe_phase", PIPE_MS, wall[1]),
    ] {
        let constructed = (ROUNDS * per_round * 1_000_000) as i64;
        let ours = inclusive_ns(&samples, function);
        println!(
            "{function:12} {:>8.1} ms {:>12.1} ms {:>10.1} ms",
            constructed as f64 / 1e6,
            wall as f64 / 1e6,
            ours as f64 / 1e6
        );
        let error = (ours - constructed).abs() as f64 / constructed as f64;
        assert!(
            error <= 0.10,
            "{function}: {ours} ns off-CPU vs {constructed} ns constructed ({:.1}% off); \
             samples: {:?}",
            error * 100.0,
            samples
                .iter()
                .map(|s| (s.count, s.functions.join(";")))
                .collect::<Vec<_>>()
        );
    }
    // The two phases never share a stack.
    assert!(
        !samples.iter().any(|s| {
            s.functions.iter().any(|f| f == "sleep_phase")
                && s.functions.iter().any(|f| f == "pipe_phase")
        }),
        "a stack with both phases"
    );
    // The waits are in the kernel's scheduler, under the syscall.
    let with_schedule = samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| f.contains("schedule")))
        .map(|s| s.count)
        .sum::<i64>();
    let total: i64 = samples.iter().map(|s| s.count).sum();
    assert!(
        with_schedule as f64 >= 0.9 * total as f64,
        "{with_schedule} of {total} ns have the scheduler on their stack"
    );
    let top = go_pprof_top(&output);
    assert!(top.contains("off_cpu"), "{top}");
    let _ = Path::new(&output);
}

/// A storm of short waits (two processes bouncing a byte through pipes,
/// hundreds of thousands of switches a second) against a tiny capture
/// budget: the stacks of most switch-outs are not walked, and their time is
/// still counted, under a frame that says why. Oracle: the workload's
/// lifetime minus its CPU time (`/usr/bin/time`, parent and child).
#[test]
fn over_the_capture_budget_blocked_time_is_still_counted() {
    let Some(_kernel) =
        KernelTest::acquire("over_the_capture_budget_blocked_time_is_still_counted")
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = build_fixture("pingpong", dir.path());
    let output = dir.path().join("off.pb.gz");
    let agent = Agent::spawn(&[
        "profile",
        "--event",
        "off-cpu",
        "--off-cpu-threshold",
        "1ns",
        "--off-cpu-max-stacks",
        "100",
        "--duration",
        "6s",
        "--output",
        output.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiler attached", Duration::from_secs(60));
    let run = Command::new("/usr/bin/time")
        .args(["-f", "TIME %e %U %S"])
        .arg(&binary)
        .arg("2")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let t: Vec<f64> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("TIME "))
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    // Both processes live through the run: blocked = 2 lifetimes - CPU.
    let expected = (2.0 * t[0] - t[1] - t[2]) * 1e9;
    let samples: Vec<FlatSample> = flatten(&read_profile(&output))
        .into_iter()
        .filter(|s| s.comm == "pingpong")
        .collect();
    let total: i64 = samples.iter().map(|s| s.count).sum();
    let budget = "[lost user stack: off-CPU capture budget used up]";
    let uncaptured: i64 = samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| f == budget))
        .map(|s| s.count)
        .sum();
    println!(
        "pingpong: {:.3} s off-CPU counted, {:.3} s expected (2 x {:.3} s - {:.3} s CPU); \
         {:.1}% under {budget:?}",
        total as f64 / 1e9,
        expected / 1e9,
        t[0],
        t[1] + t[2],
        100.0 * uncaptured as f64 / total.max(1) as f64
    );
    let error = (total as f64 - expected).abs() / expected;
    assert!(error <= 0.15, "{:.1}% off", error * 100.0);
    assert!(
        uncaptured as f64 >= 0.9 * total as f64,
        "only {uncaptured} of {total} ns without stacks at 100 captures per CPU per second"
    );
    // Some stacks were still walked: the budget is a rate, not a switch.
    assert!(
        samples
            .iter()
            .any(|s| !s.functions.iter().any(|f| f.contains("capture budget"))),
        "no captured stack at all"
    );
}

/// The daemon's path: `--off-cpu` with the embedded collector. The blocked
/// time reaches the store as its own profile type (`off_cpu`, as
/// Pyroscope's querier lists it), under the workload's service, and its
/// per-function time is what the workload was built to wait.
#[test]
fn the_daemon_delivers_off_cpu_profiles_as_their_own_type() {
    let Some(_kernel) = KernelTest::with_tools(
        "the_daemon_delivers_off_cpu_profiles_as_their_own_type",
        &["curl"],
    )
    .map(KernelTest::agent) else {
        return;
    };
    const SERVICE: &str = "offcpu-e2e";
    let dir = tempfile::tempdir().unwrap();
    let measured = dir.path().join("measured");
    let workload = start_workload(dir.path(), &measured, Some(SERVICE));
    let pid = workload.pid();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let agent = Agent::spawn(&[
        "--signals",
        "profiles",
        "--off-cpu",
        "--pid",
        &pid.to_string(),
        "--interval",
        "1s",
        "--window",
        "1s",
        "--http-listen",
        &http.to_string(),
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        dir.path().join("store.redb").to_str().unwrap(),
    ]);
    agent.wait_for_log("window done", Duration::from_secs(60));
    workload.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !measured.exists() {
        assert!(Instant::now() < deadline, "the workload did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Profiles arrive every second: wait until the constructed waits are in.
    let url = format!("http://{http}/api/profile?service={SERVICE}&name=off_cpu&range=all");
    let file = dir.path().join("off.pb");
    let constructed = |per_round: u64| (ROUNDS * per_round * 1_000_000) as i64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let out = Command::new("curl")
            .args(["-sf", "-o"])
            .arg(&file)
            .arg(&url)
            .output()
            .unwrap();
        let samples = if out.status.success() {
            flatten(&read_profile(&file))
        } else {
            Vec::new()
        };
        let sleep = inclusive_ns(&samples, "sleep_phase");
        if sleep * 10 >= constructed(SLEEP_MS) * 9 || Instant::now() > deadline {
            break samples;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for (function, per_round) in [("sleep_phase", SLEEP_MS), ("pipe_phase", PIPE_MS)] {
        let ours = inclusive_ns(&samples, function);
        let error = (ours - constructed(per_round)).abs() as f64 / constructed(per_round) as f64;
        println!(
            "{function}: {:.1} ms off-CPU in the store, {:.1} ms constructed",
            ours as f64 / 1e6,
            constructed(per_round) as f64 / 1e6
        );
        assert!(
            error <= 0.10,
            "{function}: {ours} ns in the store vs {} ns constructed",
            constructed(per_round)
        );
    }
    // Its own profile type in Pyroscope's querier (this workload, blocked
    // nearly all the time, may have no CPU profile at all).
    let out = Command::new("curl")
        .args([
            "-sf",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            &format!("http://{http}/querier.v1.QuerierService/ProfileTypes"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "ProfileTypes failed");
    let types = String::from_utf8_lossy(&out.stdout);
    assert!(
        types.contains("off_cpu:off_cpu:nanoseconds"),
        "no off_cpu profile type: {types}"
    );
    drop(agent);
}
