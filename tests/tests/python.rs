//! CPython frames end to end: `fathom-agent profile --pid` on a pure-Python
//! workload (`tests/fixtures/python_hot.py`) shows its Python functions with
//! per-function inclusive shares within 5 points of `py-spy record` (a real
//! peer, reading the interpreter's memory from user space) sampling the
//! same process over the same interval; Python frames replace the
//! interpreter loop's native frames, and carry their file and first line.
//!
//! Runs under Debian's `/usr/bin/python3` (3.11), and under each of pyenv's
//! 3.9, 3.10, 3.12, 3.13 found in `~/.pyenv/versions` (named in the output
//! when absent). Loads BPF and so holds a `KernelTest`; without root/BPF or
//! `py-spy` it skips with a printed reason, and under `CI=true` fails instead.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fathom_tests::*;

/// The workload's functions compared (py-spy's names, qualified on 3.11+).
const FUNCTIONS: [&str; 5] = ["main", "burn_a", "burn_b", "burn_c", "spin"];

#[test]
fn python_function_shares_match_py_spy() {
    let Some(kernel) = KernelTest::with_tools("python_function_shares_match_py_spy", &["py-spy"])
        .map(KernelTest::agent)
    else {
        return;
    };
    let mut interpreters = vec![PathBuf::from("/usr/bin/python3")];
    let pyenv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".pyenv/versions"))
        .unwrap_or_default();
    for minor in [9, 10, 12, 13] {
        let found = std::fs::read_dir(&pyenv).ok().and_then(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join(format!("bin/python3.{minor}")))
                .find(|p| p.is_file())
        });
        match found {
            Some(path) => interpreters.push(path),
            None => eprintln!("python 3.{minor}: not installed under {}", pyenv.display()),
        }
    }
    let mut failures = Vec::new();
    for python in interpreters {
        if let Err(e) = compare(&kernel, &python) {
            failures.push(format!("{}: {e}", python.display()));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Profiles one interpreter running the workload with both profilers.
fn compare(kernel: &KernelTest, python: &Path) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let script = workspace_root().join("tests/fixtures/python_hot.py");
    let mut workload = ChildGuard::spawn(
        Command::new(python)
            .arg(&script)
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    assert_eq!(workload.first_line(), "ready");
    let pid = workload.pid();
    let version = String::from_utf8_lossy(
        &Command::new(python)
            .args(["-c", "import sys; print(sys.version_info.minor)"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .parse::<u32>()
    .unwrap();

    let ours = dir.path().join("fathom.pb.gz");
    let theirs = dir.path().join("py-spy.txt");
    // 499 Hz: ~4,000 samples each, so that the two independent samplings of
    // the same run agree to ~1.5 points (1 σ) rather than ~3 at 99 Hz.
    let agent = Agent::spawn(&[
        "profile",
        "--frequency",
        "499",
        "--pid",
        &pid.to_string(),
        "--duration",
        "8s",
        "--output",
        ours.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiling", Duration::from_secs(60));
    let mut py_spy = ChildGuard::spawn(
        Command::new(kernel.path("py-spy"))
            .args([
                "record",
                "--format",
                "raw",
                "--nonblocking",
                "--rate",
                "499",
            ])
            .args(["--duration", "8", "--pid", &pid.to_string(), "--output"])
            .arg(&theirs)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let (status, log) = agent.finish(Duration::from_secs(120));
    assert!(status.success(), "agent failed: {log}");
    assert!(
        py_spy.wait_timeout(Duration::from_secs(60)).success(),
        "py-spy failed"
    );

    let profile = read_profile(&ours);
    let samples: Vec<FlatSample> = flatten(&profile)
        .into_iter()
        .filter(|s| s.pid == pid as i64)
        .collect();
    let ours_stacks: Vec<(Vec<String>, i64)> = samples
        .iter()
        .map(|s| (s.functions.clone(), s.count))
        .collect();
    let theirs_stacks = py_spy_raw(&std::fs::read_to_string(&theirs).unwrap());
    let our_shares = inclusive_shares(&ours_stacks);
    let their_shares = inclusive_shares(&theirs_stacks);
    let total = |s: &[(Vec<String>, i64)]| s.iter().map(|(_, n)| n).sum::<i64>();
    eprintln!(
        "python 3.{version} ({}): fathom {} samples, py-spy {} samples",
        python.display(),
        total(&ours_stacks),
        total(&theirs_stacks)
    );
    let mut errors = Vec::new();
    for f in FUNCTIONS {
        let (a, b) = (our_shares(f), their_shares(f));
        eprintln!(
            "  {f:<8} fathom {:5.1}%  py-spy {:5.1}%  diff {:+.1}",
            a * 100.0,
            b * 100.0,
            (a - b) * 100.0
        );
        if (a - b).abs() > 0.05 {
            errors.push(format!(
                "{f}: {:.1}% vs py-spy {:.1}%",
                a * 100.0,
                b * 100.0
            ));
        }
    }
    if total(&ours_stacks) < 1000 || total(&theirs_stacks) < 1000 {
        errors.push("too few samples".into());
    }

    // The interpreter loop's frames are replaced (but for samples taken
    // while a call enters or leaves it, when the native and the Python
    // stacks disagree for a moment), the qualified name (3.11+), file and
    // first line are the code object's.
    let left: i64 = samples
        .iter()
        .filter(|s| s.functions.iter().any(|f| f == "_PyEval_EvalFrameDefault"))
        .map(|s| s.count)
        .sum();
    let left = left as f64 / total(&ours_stacks).max(1) as f64;
    eprintln!(
        "  samples keeping a _PyEval_EvalFrameDefault frame: {:.2}%",
        left * 100.0
    );
    if left > 0.01 {
        errors.push(format!(
            "{:.1}% of the samples kept a _PyEval_EvalFrameDefault frame",
            left * 100.0
        ));
    }
    let s = |i: i64| profile.string_table[i as usize].as_str();
    let burn_b = profile
        .function
        .iter()
        .find(|f| s(f.name).ends_with("burn_b"))
        .ok_or("no burn_b function")?;
    let expected = if version >= 11 {
        "Worker.burn_b"
    } else {
        "burn_b"
    };
    if s(burn_b.name) != expected || !s(burn_b.filename).ends_with("python_hot.py") {
        errors.push(format!(
            "burn_b named {:?} in {:?}",
            s(burn_b.name),
            s(burn_b.filename)
        ));
    }
    let line = profile
        .location
        .iter()
        .flat_map(|l| &l.line)
        .find(|l| l.function_id == burn_b.id)
        .map(|l| l.line);
    let source = std::fs::read_to_string(&script).unwrap();
    let def_line = source
        .lines()
        .position(|l| l.contains("def burn_b"))
        .unwrap() as i64
        + 1;
    if line != Some(def_line) {
        errors.push(format!("burn_b at line {line:?}, defined at {def_line}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// py-spy's raw (collapsed) output: `root;…;leaf count`, frames
/// `name (file:line)`; returned leaf first like pprof stacks.
fn py_spy_raw(text: &str) -> Vec<(Vec<String>, i64)> {
    text.lines()
        .filter_map(|line| {
            let (stack, count) = line.rsplit_once(' ')?;
            let frames = stack
                .split(';')
                .rev()
                .map(|f| f.split(" (").next().unwrap_or(f).to_owned())
                .collect();
            Some((frames, count.parse().ok()?))
        })
        .collect()
}

/// Share of the samples (0..1) whose stack has a function whose
/// unqualified name is the one asked for.
fn inclusive_shares(stacks: &[(Vec<String>, i64)]) -> impl Fn(&str) -> f64 + '_ {
    let total: i64 = stacks.iter().map(|(_, n)| n).sum();
    let mut by_name: HashMap<String, i64> = HashMap::new();
    for (frames, n) in stacks {
        let names: HashSet<&str> = frames
            .iter()
            .map(|f| f.rsplit('.').next().unwrap_or(f))
            .collect();
        for name in names {
            *by_name.entry(name.to_owned()).or_default() += n;
        }
    }
    move |name| by_name.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}
