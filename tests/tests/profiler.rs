//! The CPU profiler on the real kernel, against `perf` as the oracle.
//!
//! Every test loads BPF and so holds a `KernelTest` (the kernel lock);
//! without root/BPF they skip with a printed reason, and under `CI=true`
//! they fail instead.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use fathom_agent::profiles::{
    capture::ProfilerConfig,
    session::{ProfilesConfig, Session},
};
use fathom_common::profiler::{Counter, HASH_SEED_KERNEL, HASH_SEED_USER, stack_hash, stack_id};
use fathom_tests::*;

/// The C fixtures, compiled once per run into the target's temp dir.
fn fixture(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["shares", "syscalls", "spin", "jit"] {
            build_fixture(name, &dir);
        }
        dir
    });
    dir.join(name)
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdout(Stdio::null()).stderr(Stdio::null())
}

/// Profiles `pid` with the agent and with `perf record -g` at the same time.
fn profile_with_perf(
    pid: u32,
    seconds: u32,
    dir: &Path,
) -> (Vec<FlatSample>, Vec<PerfSample>, PathBuf) {
    let (output, perf_data) = record_with_perf(pid, seconds, dir, &["-g"]);
    let ours: Vec<_> = flatten(&read_profile(&output))
        .into_iter()
        .filter(|s| s.pid == i64::from(pid))
        .collect();
    (ours, perf_script(&perf_data), output)
}

#[test]
fn per_function_shares_match_perf() {
    let Some(_kernel) =
        KernelTest::acquire("per_function_shares_match_perf").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let workload = ChildGuard::spawn(quiet(Command::new(fixture("shares")).args(["600", "2"])));
    std::thread::sleep(Duration::from_millis(300));
    let (ours, perf, output) = profile_with_perf(workload.pid(), 10, dir.path());

    let our_total: i64 = ours.iter().map(|s| s.count).sum();
    assert!(our_total > 5_000, "too few samples: {our_total}");
    assert!(
        perf.len() > 5_000,
        "perf has too few samples: {}",
        perf.len()
    );
    println!(
        "function   fathom   perf   (n = {our_total} / {})",
        perf.len()
    );
    let mut hot = 0.0;
    for function in ["hot_a", "hot_b", "hot_c"] {
        let ours = leaf_share(&ours, |f| f == function);
        let theirs = perf_leaf_share(&perf, |sym, _| sym == function);
        println!("{function:9} {:6.2}% {:6.2}%", ours * 100.0, theirs * 100.0);
        assert!(
            (ours - theirs).abs() <= 0.02,
            "{function}: fathom {:.2}% vs perf {:.2}%",
            ours * 100.0,
            theirs * 100.0
        );
        hot += ours;
    }
    assert!(
        hot > 0.9,
        "the hot functions should hold most samples, got {:.1}%",
        hot * 100.0
    );

    // Frame-pointer stacks reach the callers: hot_* <- one_round <- worker.
    let with_callers: i64 = ours
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| f.starts_with("hot_")))
        .filter(|s| {
            s.functions.get(1..3) == Some(&["one_round".to_owned(), "worker".to_owned()][..])
        })
        .map(|s| s.count)
        .sum();
    let hot_total: i64 = ours
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| f.starts_with("hot_")))
        .map(|s| s.count)
        .sum();
    assert!(
        with_callers as f64 >= 0.95 * hot_total as f64,
        "{with_callers} of {hot_total} hot samples have callers"
    );

    // Threads are told apart, and comm is the thread's.
    let tids: std::collections::HashSet<i64> = ours.iter().map(|s| s.tid).collect();
    assert_eq!(tids.len(), 2, "two worker threads: {tids:?}");
    assert!(ours.iter().all(|s| s.comm == "shares"));

    // Location addresses are the binary's own: addr2line on each of them
    // names the same function and line as the profile.
    assert_locations_match_addr2line(&output, &fixture("shares"), &fixture("shares"), 4);

    let top = go_pprof_top(&output);
    assert!(
        top.contains("hot_a") && top.contains("hot_b") && top.contains("hot_c"),
        "{top}"
    );
}

#[test]
fn syscall_heavy_workload_shows_kernel_frames() {
    let Some(_kernel) =
        KernelTest::acquire("syscall_heavy_workload_shows_kernel_frames").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let workload = ChildGuard::spawn(quiet(Command::new(fixture("syscalls")).arg("600")));
    std::thread::sleep(Duration::from_millis(200));
    let (ours, perf, output) = profile_with_perf(workload.pid(), 6, dir.path());

    let kernel = |s: &FlatSample| s.files.first().is_some_and(|f| f == "[kernel.kallsyms]");
    let total: i64 = ours.iter().map(|s| s.count).sum();
    let in_kernel: i64 = ours.iter().filter(|s| kernel(s)).map(|s| s.count).sum();
    let ours_share = in_kernel as f64 / total as f64;
    let perf_share = perf_leaf_share(&perf, |_, dso| dso == "[kernel.kallsyms]");
    println!(
        "in kernel: fathom {:.2}%, perf {:.2}% (n = {total} / {})",
        ours_share * 100.0,
        perf_share * 100.0,
        perf.len()
    );
    assert!(
        ours_share > 0.5,
        "a /dev/zero reader lives in the kernel: {:.1}%",
        ours_share * 100.0
    );
    assert!((ours_share - perf_share).abs() <= 0.03);

    // The most frequent kernel leaf function is the same for both.
    let mut our_leaves: HashMap<&str, i64> = HashMap::new();
    for s in ours.iter().filter(|s| kernel(s)) {
        *our_leaves.entry(&s.functions[0]).or_default() += s.count;
    }
    let mut perf_leaves: HashMap<&str, usize> = HashMap::new();
    for s in &perf {
        if let Some((sym, dso)) = s.frames.first()
            && dso == "[kernel.kallsyms]"
        {
            *perf_leaves.entry(sym).or_default() += 1;
        }
    }
    let our_top = our_leaves.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f);
    let perf_top = perf_leaves.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f);
    assert_eq!(our_top, perf_top, "top kernel leaf");

    // Kernel frames sit on top of the user stack that made the call:
    // libc's read (which has no frame pointer, so its caller do_reads is
    // invisible to frame-pointer unwinding, perf's included), then main.
    let read_then_main = |s: &FlatSample| {
        let Some(user) = s.files.iter().position(|f| f != "[kernel.kallsyms]") else {
            return false;
        };
        s.functions[..user]
            .iter()
            .any(|f| f == "vfs_read" || f == "ksys_read")
            && s.files[user].contains("libc.so")
            && s.functions[user].contains("read")
            && s.functions[user + 1..]
                .iter()
                .zip(&s.files[user + 1..])
                .any(|(f, file)| f == "main" && file.ends_with("/syscalls"))
    };
    let full: i64 = ours
        .iter()
        .filter(|s| read_then_main(s))
        .map(|s| s.count)
        .sum();
    let perf_full = perf
        .iter()
        .filter(|s| {
            s.frames.iter().any(|(f, _)| f == "vfs_read")
                && s.frames
                    .iter()
                    .any(|(f, dso)| f == "main" && dso.ends_with("/syscalls"))
        })
        .count();
    println!(
        "kernel read <- libc read <- main: fathom {full}/{total}, perf {perf_full}/{}",
        perf.len()
    );
    assert!(
        full as f64 >= 0.8 * in_kernel as f64,
        "{full} of {in_kernel} kernel samples have the whole stack"
    );
    go_pprof_top(&output);
}

#[test]
fn processes_are_kept_apart_by_pid() {
    let Some(_kernel) =
        KernelTest::acquire("processes_are_kept_apart_by_pid").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let alpha = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["alpha", "600"])));
    let beta = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let output = dir.path().join("all.pb.gz");
    let agent = Agent::spawn(&[
        "profile",
        "--duration",
        "4s",
        "--output",
        output.to_str().unwrap(),
    ]);
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let samples = flatten(&read_profile(&output));
    for (process, own, other) in [
        (&alpha, "spin_alpha", "spin_beta"),
        (&beta, "spin_beta", "spin_alpha"),
    ] {
        let mine: Vec<_> = samples
            .iter()
            .filter(|s| s.pid == i64::from(process.pid()))
            .collect();
        let count: i64 = mine.iter().map(|s| s.count).sum();
        assert!(count >= 100, "pid {} has {count} samples", process.pid());
        assert!(
            mine.iter().all(|s| !s.functions.iter().any(|f| f == other)),
            "{other} in pid {}",
            process.pid()
        );
        let own_count: i64 = mine
            .iter()
            .filter(|s| s.functions.iter().any(|f| f == own))
            .map(|s| s.count)
            .sum();
        assert!(
            own_count as f64 >= 0.95 * count as f64,
            "{own}: {own_count} of {count}"
        );
        assert!(mine.iter().all(|s| s.comm == "spin"));
    }
    // The same code in two processes is one location, whatever ASLR did:
    // libc's return address into main, shared by both.
    let profile = read_profile(&output);
    let text = |i: i64| profile.string_table[i as usize].as_str();
    let start_main: Vec<u64> = profile
        .location
        .iter()
        .filter(|l| {
            l.line.iter().any(|line| {
                profile
                    .function
                    .iter()
                    .any(|f| f.id == line.function_id && text(f.name) == "__libc_start_call_main")
            })
        })
        .map(|l| l.id)
        .collect();
    assert_eq!(start_main.len(), 1, "one location for libc's call of main");
    for process in [&alpha, &beta] {
        let uses = profile.sample.iter().any(|s| {
            s.location_id.contains(&start_main[0])
                && s.label
                    .iter()
                    .any(|l| text(l.key) == "pid" && l.num == i64::from(process.pid()))
        });
        assert!(uses, "pid {} uses the shared location", process.pid());
    }
    go_pprof_top(&output);
}

#[test]
fn exited_and_deleted_process_is_symbolized() {
    let Some(_kernel) =
        KernelTest::acquire("exited_and_deleted_process_is_symbolized").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("short-lived");
    std::fs::copy(fixture("spin"), &binary).unwrap();
    let output = dir.path().join("exited.pb.gz");
    // Symbols are resolved when the profile ends: the process is long gone.
    let agent = Agent::spawn(&[
        "profile",
        "--duration",
        "7s",
        "--output",
        output.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiler attached", Duration::from_secs(30));
    let mut short = ChildGuard::spawn(quiet(Command::new(&binary).args(["alpha", "1.5"])));
    let pid = short.pid();
    assert!(short.wait_timeout(Duration::from_secs(10)).success());
    std::fs::remove_file(&binary).unwrap();
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");

    let samples: Vec<_> = flatten(&read_profile(&output))
        .into_iter()
        .filter(|s| s.pid == i64::from(pid))
        .collect();
    let count: i64 = samples.iter().map(|s| s.count).sum();
    assert!(count >= 100, "{count} samples of the exited process");
    let symbolized: i64 = samples
        .iter()
        .filter(|s| {
            s.functions
                .iter()
                .zip(&s.files)
                .any(|(f, file)| f == "spin_alpha" && file.ends_with("short-lived"))
                && s.functions.iter().any(|f| f == "main")
        })
        .map(|s| s.count)
        .sum();
    assert!(
        symbolized as f64 >= 0.95 * count as f64,
        "{symbolized} of {count} symbolized"
    );
}

/// Every location of the mapping named `mapped` in the profile at `output`:
/// its first function and line are what `addr2line` says at its address in
/// `oracle_binary` (the same code, possibly unstripped). At least `min` of
/// them.
fn assert_locations_match_addr2line(
    output: &Path,
    mapped: &Path,
    oracle_binary: &Path,
    min: usize,
) {
    let profile = read_profile(output);
    let text = |i: i64| profile.string_table[i as usize].as_str();
    let mapping = profile
        .mapping
        .iter()
        .find(|m| text(m.filename) == mapped.to_str().unwrap())
        .unwrap_or_else(|| panic!("a mapping for {}", mapped.display()));
    let functions: HashMap<u64, &pprof::protos::Function> =
        profile.function.iter().map(|f| (f.id, f)).collect();
    let locations: Vec<_> = profile
        .location
        .iter()
        .filter(|l| l.mapping_id == mapping.id)
        .collect();
    assert!(locations.len() >= min, "{} locations", locations.len());
    let oracle = addr2line(
        oracle_binary,
        &locations.iter().map(|l| l.address).collect::<Vec<_>>(),
    );
    for (location, (function, line)) in locations.iter().zip(oracle) {
        let ours = location.line.first().unwrap();
        let name = text(functions[&ours.function_id].name);
        assert_eq!(
            // pprof's line 0 is "unknown", addr2line's "?" / 0.
            (name, u32::try_from(ours.line).ok().filter(|&l| l != 0)),
            (function.as_str(), line),
            "at {:#x}",
            location.address
        );
    }
}

/// A stripped binary seen only inside another mount namespace, with its
/// debug file next to it there (`.gnu_debuglink`), is symbolized exactly like
/// the unstripped binary is by addr2line.
#[test]
fn process_in_another_mount_namespace_uses_its_debug_file() {
    let Some(_kernel) =
        KernelTest::acquire("process_in_another_mount_namespace_uses_its_debug_file")
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    let mount_point = dir.path().join("mnt");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::create_dir_all(&mount_point).unwrap();
    let unstripped = fixture("spin");
    let binary = content.join("spin-ns");
    let debug = content.join("spin-ns.debug");
    let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&unstripped)
        .arg(&debug));
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&binary)
        .arg(&unstripped));
    run(Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&binary));
    let nm = Command::new("nm").arg(&binary).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&nm.stdout).contains("spin_alpha"),
        "the binary has no symbols of its own"
    );

    // Inside the namespace the content is at the mount point; outside, the
    // mount point stays empty.
    let inside = mount_point.join("spin-ns");
    let script = format!(
        "mount --bind {} {} && exec {} alpha 8",
        content.display(),
        mount_point.display(),
        inside.display()
    );
    let workload = ChildGuard::spawn(quiet(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    ));
    let pid = workload.pid();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/exe")).map_or(true, |exe| exe != inside) {
        assert!(
            std::time::Instant::now() < deadline,
            "workload did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !inside.exists(),
        "the host does not see the namespace's mount"
    );

    let output = profile_pid(pid, dir.path(), "ns.pb.gz");

    let samples = flatten(&read_profile(&output));
    let count: i64 = samples.iter().map(|s| s.count).sum();
    let alpha: i64 = samples
        .iter()
        .filter(|s| {
            s.functions
                .iter()
                .zip(&s.files)
                .any(|(f, file)| f == "spin_alpha" && *file == inside.to_str().unwrap())
                && s.functions.iter().any(|f| f == "main")
        })
        .map(|s| s.count)
        .sum();
    assert!(count >= 200, "{count} samples");
    assert!(
        alpha as f64 >= 0.95 * count as f64,
        "{alpha} of {count} samples in spin_alpha < main"
    );

    // Every location of the binary: our function and line are addr2line's
    // on the unstripped binary.
    assert_locations_match_addr2line(&output, &inside, &unstripped, 3);
}

/// JIT code in anonymous memory is named by the process's perf map.
#[test]
fn jit_code_is_named_by_the_perf_map() {
    let Some(_kernel) =
        KernelTest::acquire("jit_code_is_named_by_the_perf_map").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let workload = ChildGuard::spawn(quiet(Command::new(fixture("jit")).arg("8")));
    let pid = workload.pid();
    let map = PathBuf::from(format!("/tmp/perf-{pid}.map"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !map.exists() {
        assert!(std::time::Instant::now() < deadline, "no perf map written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = profile_pid(pid, dir.path(), "jit.pb.gz");
    let samples = flatten(&read_profile(&output));
    let count: i64 = samples.iter().map(|s| s.count).sum();
    let jit: i64 = samples
        .iter()
        .filter(|s| {
            s.functions
                .first()
                .is_some_and(|f| f == "jit_spin_loop [jit]")
        })
        .map(|s| s.count)
        .sum();
    assert!(count >= 200, "{count} samples");
    assert!(
        jit as f64 >= 0.9 * count as f64,
        "{jit} of {count} samples in the JIT function: {samples:?}"
    );
}

fn our_programs_loaded() -> Vec<String> {
    loaded_bpf_programs()
        .into_iter()
        .filter(|p| ["profile_cpu", "profile_fork", "profile_exec"].contains(&p.as_str()))
        .collect()
}

#[test]
fn daemon_writes_per_process_profiles_and_detaches_on_sigterm() {
    let Some(_kernel) =
        KernelTest::acquire("daemon_writes_per_process_profiles_and_detaches_on_sigterm")
            .map(KernelTest::agent)
    else {
        return;
    };
    assert_eq!(
        our_programs_loaded(),
        Vec::<String>::new(),
        "programs left over before the test"
    );
    let dir = tempfile::tempdir().unwrap();
    let alpha = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["alpha", "600"])));
    let beta = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let out = dir.path().join("profiles");
    let agent = Agent::spawn(&["--interval", "2s", "--output-dir", out.to_str().unwrap()]);
    agent.wait_for_log("profiler attached", Duration::from_secs(30));
    assert_eq!(
        our_programs_loaded().len(),
        3,
        "attached programs visible to bpftool"
    );
    agent.wait_for_log("window done", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(2500));
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert_eq!(
        our_programs_loaded(),
        Vec::<String>::new(),
        "programs left attached after SIGTERM"
    );

    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    for (process, function) in [(&alpha, "spin_alpha"), (&beta, "spin_beta")] {
        let suffix = format!("_spin_{}.pb.gz", process.pid());
        let mine: Vec<_> = files
            .iter()
            .filter(|f| f.to_string_lossy().ends_with(&suffix))
            .collect();
        assert!(
            mine.len() >= 2,
            "at least two windows for pid {}: {files:?}",
            process.pid()
        );
        for file in mine {
            let samples = flatten(&read_profile(file));
            assert!(
                samples.iter().all(|s| s.pid == i64::from(process.pid())),
                "one process per file"
            );
            let top = go_pprof_top(file);
            assert!(top.contains(function), "{top}");
        }
    }
    // The per-process profile names the process's binary as its main file.
    let any = files
        .iter()
        .find(|f| {
            f.to_string_lossy()
                .ends_with(&format!("_spin_{}.pb.gz", alpha.pid()))
        })
        .unwrap();
    let p = read_profile(any);
    assert!(p.string_table[p.mapping[0].filename as usize].ends_with("/spin"));
}

#[test]
fn profile_stops_early_on_sigint_and_detaches() {
    let Some(_kernel) =
        KernelTest::acquire("profile_stops_early_on_sigint_and_detaches").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let _busy = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let output = dir.path().join("early.pb.gz");
    let agent = Agent::spawn(&[
        "profile",
        "--duration",
        "10m",
        "--output",
        output.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiler attached", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    agent.signal("INT");
    let (status, log) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert_eq!(our_programs_loaded(), Vec::<String>::new());
    let samples = flatten(&read_profile(&output));
    assert!(
        samples
            .iter()
            .any(|s| s.functions.iter().any(|f| f == "spin_beta"))
    );
    go_pprof_top(&output);
}

#[test]
fn refuses_to_run_without_privileges_and_says_why() {
    // Needs no BPF: as root, drop to nobody; otherwise run as we are.
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("never.pb.gz");
    let mut cmd = if fathom_agent::sys::effective_uid() == 0 {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_binary());
        c
    } else {
        Command::new(agent_binary())
    };
    let out = cmd
        .args(["profile", "--duration", "1s", "--output"])
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot run on this machine"), "{stderr}");
    assert!(
        stderr.contains("privileges") && stderr.contains("run as root"),
        "{stderr}"
    );
    assert!(!output.exists());
}

#[test]
fn drains_neither_lose_nor_double_count() {
    let Some(_kernel) =
        KernelTest::acquire("drains_neither_lose_nor_double_count").map(KernelTest::agent)
    else {
        return;
    };
    let _workload = ChildGuard::spawn(quiet(Command::new(fixture("shares")).args(["600", "2"])));
    let config = ProfilerConfig {
        frequency_hz: 999,
        ..ProfilerConfig::default()
    };
    let mut session = Session::start(&ProfilesConfig {
        profiler: config,
        ..ProfilesConfig::default()
    })
    .unwrap();
    let (mut recorded, mut counted, mut windows_with_samples) = (0, 0, 0);
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(50));
        let window = session.drain().unwrap();
        assert!(window.synced, "every CPU acknowledged the switch");
        assert_eq!(
            window.counted(),
            window.recorded,
            "drained = recorded in every window"
        );
        recorded += window.recorded;
        counted += window.counted();
        windows_with_samples += u32::from(window.recorded > 0);
        for (key, _) in &window.samples {
            for (id, seed) in [
                (key.user_stack, HASH_SEED_USER),
                (key.kernel_stack, HASH_SEED_KERNEL),
            ] {
                if id >= stack_id::FIRST_HASH {
                    let ips = window
                        .stacks
                        .get(&id)
                        .expect("every referenced stack is drained with its window");
                    assert_eq!(stack_hash(seed, ips), id, "stack stored under its own hash");
                }
            }
        }
    }
    assert_eq!(windows_with_samples, 60);
    // ~2 busy CPUs * 999 Hz * 3 s.
    assert!(recorded > 4_000, "{recorded}");
    assert_eq!(recorded, counted);
    let c = session.counters().unwrap();
    let accounted = c.get(Counter::Idle)
        + c.get(Counter::Filtered)
        + c.get(Counter::Recorded0)
        + c.get(Counter::Recorded1)
        + c.get(Counter::CountMapFull);
    // Every program run ends in exactly one outcome. Counters are read one
    // by one while sampling goes on (outcomes first), so Samples may lead by
    // the samples taken during the reads: ~2 per millisecond here.
    let samples = c.get(Counter::Samples);
    assert!(
        samples >= accounted && samples - accounted <= 100,
        "{samples} samples, {accounted} outcomes: {c:?}"
    );
    assert_eq!(
        c.get(Counter::StackMapFull)
            + c.get(Counter::CountMapFull)
            + c.get(Counter::StackCollision),
        0,
        "{c:?}"
    );
}

#[test]
fn pid_filter_is_applied_in_the_kernel() {
    let Some(_kernel) =
        KernelTest::acquire("pid_filter_is_applied_in_the_kernel").map(KernelTest::agent)
    else {
        return;
    };
    let alpha = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["alpha", "600"])));
    let _beta = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let config = ProfilerConfig {
        frequency_hz: 499,
        pids: vec![alpha.pid()],
        ..ProfilerConfig::default()
    };
    let mut session = Session::start(&ProfilesConfig {
        profiler: config,
        ..ProfilesConfig::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let window = session.drain().unwrap();
    assert!(window.counted() > 300, "{}", window.counted());
    assert!(window.samples.iter().all(|(k, _)| k.pid == alpha.pid()));
    let c = session.counters().unwrap();
    assert!(
        c.get(Counter::Filtered) > 300,
        "beta's samples are filtered: {c:?}"
    );
    let resolved = session.resolve(&window.samples, &window.stacks);
    assert!(resolved.iter().all(|s| {
        s.stack
            .iter()
            .any(|l| l.frames.iter().any(|f| f.function == "spin_alpha"))
    }));
}

#[test]
fn daemon_survives_a_full_disk() {
    let Some(_kernel) = KernelTest::acquire("daemon_survives_a_full_disk").map(KernelTest::agent)
    else {
        return;
    };
    // A 32 KiB tmpfs fills up after a few profiles.
    let dir = tempfile::tempdir().unwrap();
    let mount =
        |args: &[&str]| assert!(Command::new("mount").args(args).status().unwrap().success());
    mount(&[
        "-t",
        "tmpfs",
        "-o",
        "size=32k",
        "tmpfs",
        dir.path().to_str().unwrap(),
    ]);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let _alpha = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["alpha", "600"])));
    let _beta = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let agent = Agent::spawn(&[
        "--interval",
        "1s",
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    agent.wait_for_log("profile not written", Duration::from_secs(60));
    // Still alive: it keeps sampling and reports what it could not write.
    agent.wait_for_log("profiles-not-delivered=", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let windows = log.lines().filter(|l| l.contains("window done")).count();
    assert!(windows >= 3, "the daemon kept going: {windows} windows");
    // No half-written temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn unusable_output_path_fails_before_profiling() {
    // Preflight needs privileges, so this runs where kernel tests run. The
    // agent is built first: a build is not part of the time measured.
    let Some(_kernel) =
        KernelTest::acquire("unusable_output_path_fails_before_profiling").map(KernelTest::agent)
    else {
        return;
    };
    let started = std::time::Instant::now();
    let out = Command::new(agent_binary())
        .args([
            "profile",
            "--duration",
            "20s",
            "--output",
            "/nonexistent-dir/cpu.pb.gz",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent-dir does not exist"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "it profiled before failing"
    );
}

/// `go tool pprof -top` of what a collector serves for a service, once the
/// function shows up (or the timeout passes).
fn collector_top(http: u16, service: &str, function: &str, timeout: Duration) -> String {
    let url =
        format!("http://127.0.0.1:{http}/api/profile?service={service}&name=process_cpu&range=all");
    let end = std::time::Instant::now() + timeout;
    loop {
        let out = Command::new("go")
            .args(["tool", "pprof", "-top", "-nodecount=50", "-symbolize=none"])
            .arg(&url)
            .output()
            .unwrap();
        let top = String::from_utf8_lossy(&out.stdout).into_owned();
        if top.contains(function) || std::time::Instant::now() > end {
            return top;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The README's main job: the agent alone, with its embedded collector,
/// serves this node's profiles over HTTP (the API the UI's flame graph uses,
/// read here by `go tool pprof`).
#[test]
fn agent_serves_the_nodes_profiles_from_its_embedded_collector() {
    let Some(_kernel) =
        KernelTest::acquire("agent_serves_the_nodes_profiles_from_its_embedded_collector")
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let _spin = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["alpha", "600"])));
    let agent = Agent::spawn(&[
        "--interval",
        "1s",
        "--window",
        "1s",
        "--http-listen",
        &format!("127.0.0.1:{http}"),
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        dir.path().join("store.redb").to_str().unwrap(),
    ]);
    agent.wait_for_log("window done", Duration::from_secs(30));
    let top = collector_top(http, "spin", "spin_alpha", Duration::from_secs(20));
    assert!(top.contains("spin_alpha"), "{top}");
    let page = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{http}/")])
        .output()
        .unwrap();
    assert!(page.status.success() && String::from_utf8_lossy(&page.stdout).contains("<html"));
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("collector stopped"), "{log}");
}

/// An agent sending to a separate `fathom-collector` with a bearer token.
#[test]
fn agent_sends_to_a_remote_collector() {
    let Some(_kernel) =
        KernelTest::acquire("agent_sends_to_a_remote_collector").map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let collector = ChildGuard::spawn(
        Command::new(collector_binary())
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--otlp-grpc-listen", "off", "--otlp-http-listen", "off"])
            .args(["--window", "1s", "--auth-token", "t0ken", "--store-path"])
            .arg(dir.path().join("store.redb"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(std::time::Instant::now() < end, "collector did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _spin = ChildGuard::spawn(quiet(Command::new(fixture("spin")).args(["beta", "600"])));
    let agent = Agent::spawn(&[
        "--interval",
        "1s",
        "--collector-url",
        &format!("http://127.0.0.1:{http}"),
        "--collector-token",
        "t0ken",
    ]);
    agent.wait_for_log("window done", Duration::from_secs(30));
    let top = collector_top(http, "spin", "spin_beta", Duration::from_secs(20));
    assert!(top.contains("spin_beta"), "{top}");
    agent.signal("TERM");
    let (status, log) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let delivery = log
        .lines()
        .find(|l| l.contains("delivery at exit exporter=pyroscope"))
        .unwrap_or_default();
    assert!(delivery.contains("dropped=0"), "{log}");
    drop(collector);
}
