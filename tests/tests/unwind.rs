//! User stacks of code without frame pointers, on the real kernel, against
//! `perf record --call-graph dwarf` as the oracle.
//!
//! perf copies 32 KiB of each sample's user stack and unwinds it afterwards
//! in user space with the binaries' `.eh_frame` (libdw): an independent
//! DWARF unwinder. Each test profiles one process with the agent and with
//! perf at the same time and compares, per function, the share of samples
//! whose stack contains the function (inclusive share): a function's
//! inclusive share is right only when the walk got through it to its
//! callers. Then it checks how many of our stacks reach `main`.
//!
//! The fixtures (`tests/fixtures/unwind/`) are compiled here with pinned
//! flags and without frame pointers; the system programs (python3, nginx)
//! are Debian's stripped binaries, which ship `.eh_frame`.
//!
//! Every test loads BPF and so holds a `KernelTest` (the kernel lock);
//! without root/BPF (or perf) they skip with a printed reason, and under
//! `CI=true` they fail.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Duration,
};

use fathom_tests::*;

/// Seconds each process is profiled.
const SECONDS: u32 = 6;

/// Largest difference of inclusive shares (fathom vs perf) accepted, as a
/// fraction: 3 percentage points. With ~6,000 samples per side the standard
/// error of the difference of two shares near 50% is ~0.9 points.
const TOLERANCE: f64 = 0.03;

/// Least share of our samples whose stack reaches `main` (the thread entry,
/// `start_thread`, for the C++ fixture's thread) in the fixtures: every
/// sample of these programs is taken under it.
const FIXTURE_REACH: f64 = 0.95;

/// The same for Debian's python3 and nginx (stripped binaries, bigger code:
/// a few samples may land in code whose rules we do not follow).
const SYSTEM_REACH: f64 = 0.90;

/// C and C++ fixture flags: optimized, no frame pointers, debug info (for
/// names and inline frames, as a user's release build with `-g`).
const CFLAGS: &[&str] = &["-O2", "-fomit-frame-pointer", "-g"];

/// Rust fixture flags: a release build without frame pointers and with
/// line tables (`debuginfo=1`).
const RUSTFLAGS: &[&str] = &[
    "--edition",
    "2021",
    "-C",
    "opt-level=3",
    "-C",
    "force-frame-pointers=no",
    "-C",
    "debuginfo=1",
];

/// A fixture of `tests/fixtures/unwind/`, compiled (once per run) into the
/// target's temp dir: `source` is built into a binary named `name`.
fn unwind_fixture(name: &str) -> PathBuf {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unwind-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let sources = workspace_root().join("tests/fixtures/unwind");
    let out = dir.join(name);
    let mut cmd = match name {
        "tree" | "recursion" | "qsort" => {
            let mut c = Command::new("gcc");
            c.args(CFLAGS).arg(sources.join(format!("{name}.c")));
            c
        }
        "tree-cpp" => {
            let mut c = Command::new("g++");
            c.args(CFLAGS).arg(sources.join("tree.cpp"));
            c
        }
        "tree-rs" => {
            let mut c = Command::new("rustc");
            c.args(RUSTFLAGS)
                .args(["--crate-name", "tree"])
                .arg(sources.join("tree.rs"));
            c
        }
        _ => panic!("no fixture {name}"),
    };
    let status = cmd.arg("-o").arg(&out).status().unwrap();
    assert!(status.success(), "building {name}: {cmd:?}");
    built.insert(name.to_owned(), out.clone());
    out
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdout(Stdio::null()).stderr(Stdio::null())
}

/// The name both tools' renderings of a function reduce to: without GCC's
/// clone suffixes (`msort_with_tmp.part.0`), symbol versions
/// (`__libc_start_main@@GLIBC_2.34`), and, for C++, without the parameter
/// list and return type (`unsigned long leaf_work<unsigned long>(long)` and
/// perf's `leaf_work<unsigned long>` are both `leaf_work<unsigned long>`).
fn function_key(name: &str) -> String {
    let mut name = name;
    for marker in [" [clone ", ".part.", ".constprop.", ".isra.", ".cold", "@"] {
        if let Some(i) = name.find(marker).filter(|&i| i > 0) {
            name = &name[..i];
        }
    }
    // Cut at the parameter list: the first `(` outside template arguments
    // that is not a scope like `(anonymous namespace)::`.
    let bytes = name.as_bytes();
    let (mut angle, mut end) = (0usize, name.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'<' => angle += 1,
            // Not the arrow of `Fn() -> T`.
            b'>' if i == 0 || bytes[i - 1] != b'-' => angle = angle.saturating_sub(1),
            b'(' if angle == 0 => {
                let close = name[i..].find(')').map_or(name.len(), |c| i + c + 1);
                if name[close..].starts_with("::") {
                    i = close;
                    continue;
                }
                end = i;
                break;
            }
            _ => {}
        }
        i += 1;
    }
    let name = &name[..end];
    // Drop a return type: the text up to the last space outside `<>`, `()`.
    let (mut angle, mut paren, mut start) = (0usize, 0usize, 0);
    for (i, &c) in name.as_bytes().iter().enumerate() {
        match c {
            b'<' => angle += 1,
            b'>' if i == 0 || name.as_bytes()[i - 1] != b'-' => angle = angle.saturating_sub(1),
            b'(' => paren += 1,
            b')' => paren = paren.saturating_sub(1),
            b' ' if angle == 0 && paren == 0 => start = i + 1,
            _ => {}
        }
    }
    name[start..].to_owned()
}

/// [`function_key`], memoized: a deep recording has ~100 frames per sample
/// but few distinct names.
#[derive(Default)]
struct Keys(HashMap<String, String>);

impl Keys {
    fn key(&mut self, name: &str) -> String {
        if let Some(key) = self.0.get(name) {
            return key.clone();
        }
        let key = function_key(name);
        self.0.insert(name.to_owned(), key.clone());
        key
    }
}

/// One profiler's samples of one process: stacks of function keys, leaf
/// first, with their sample counts.
#[derive(Debug, Default)]
struct Side {
    stacks: Vec<(u64, Vec<String>)>,
    /// Frames in user space of each stack (kernel frames not counted).
    user_depths: Vec<(u64, usize)>,
}

impl Side {
    fn ours(samples: &[FlatSample]) -> Self {
        let mut side = Self::default();
        let mut keys = Keys::default();
        for s in samples {
            let count = u64::try_from(s.count).unwrap();
            side.stacks
                .push((count, s.functions.iter().map(|f| keys.key(f)).collect()));
            let user = s.files.iter().filter(|f| *f != "[kernel.kallsyms]");
            side.user_depths.push((count, user.count()));
        }
        side
    }

    /// Each run of consecutive frames named in `python` becomes one
    /// `_PyEval_EvalFrameDefault` frame.
    fn python_as_interpreter(&mut self, python: &[&str]) {
        if python.is_empty() {
            return;
        }
        for (_, stack) in &mut self.stacks {
            let mut out: Vec<String> = Vec::with_capacity(stack.len());
            let mut in_run = false;
            for f in stack.drain(..) {
                if python.contains(&f.as_str()) {
                    if !in_run {
                        out.push("_PyEval_EvalFrameDefault".to_string());
                    }
                    in_run = true;
                } else {
                    in_run = false;
                    out.push(f);
                }
            }
            *stack = out;
        }
    }

    fn perf(samples: &[PerfSample]) -> Self {
        let mut side = Self::default();
        let mut keys = Keys::default();
        for s in samples {
            side.stacks
                .push((1, s.frames.iter().map(|(f, _)| keys.key(f)).collect()));
            let user = s
                .frames
                .iter()
                .filter(|(_, dso)| dso != "[kernel.kallsyms]");
            side.user_depths.push((1, user.count()));
        }
        side
    }

    fn samples(&self) -> u64 {
        self.stacks.iter().map(|(n, _)| n).sum()
    }

    /// Share (0..1) of the samples whose stack satisfies `pred`.
    fn share(&self, pred: impl Fn(&[String]) -> bool) -> f64 {
        let hit: u64 = self
            .stacks
            .iter()
            .filter(|(_, s)| pred(s))
            .map(|(n, _)| n)
            .sum();
        hit as f64 / self.samples().max(1) as f64
    }

    /// Share of the samples whose stack contains `function` at least once.
    fn inclusive(&self, function: &str) -> f64 {
        self.share(|s| s.iter().any(|f| f == function))
    }

    /// The deepest stack's and the median stack's user frames.
    fn depth(&self) -> (usize, usize) {
        let mut depths = self.user_depths.clone();
        depths.sort_by_key(|&(_, d)| d);
        let half = self.samples() / 2;
        let mut seen = 0;
        let median = depths
            .iter()
            .find(|(n, _)| {
                seen += n;
                seen > half
            })
            .map_or(0, |&(_, d)| d);
        (depths.last().map_or(0, |&(_, d)| d), median)
    }

    /// The most frequent stacks, for a test's report.
    fn top_stacks(&self, n: usize) -> String {
        let mut counts: HashMap<&[String], u64> = HashMap::new();
        for (count, stack) in &self.stacks {
            *counts.entry(stack).or_default() += count;
        }
        let mut counts: Vec<_> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let total = self.samples().max(1) as f64;
        let mut out = String::new();
        for (stack, count) in counts.into_iter().take(n) {
            let shown: Vec<&str> = stack.iter().take(12).map(String::as_str).collect();
            let more = if stack.len() > 12 { " <- ..." } else { "" };
            writeln!(
                out,
                "  {:5.1}% [{} frames] {}{more}",
                count as f64 * 100.0 / total,
                stack.len(),
                shown.join(" <- ")
            )
            .unwrap();
        }
        out
    }
}

/// One row of a comparison: a function's inclusive shares (0..1).
#[derive(Debug)]
struct Row {
    function: String,
    fathom: f64,
    perf: f64,
}

/// Both profiles of one process and the inclusive shares of the functions
/// asked for.
#[derive(Debug)]
struct Comparison {
    ours: Side,
    perf: Side,
    rows: Vec<Row>,
}

impl Comparison {
    /// Prints the sample counts, the share table, depths and top stacks.
    fn print(&self, what: &str) {
        let (our_max, our_median) = self.ours.depth();
        let (perf_max, perf_median) = self.perf.depth();
        println!(
            "\n== {what}: {} samples (fathom), {} (perf --call-graph dwarf)",
            self.ours.samples(),
            self.perf.samples()
        );
        println!(
            "user frames per stack: fathom max {our_max} median {our_median}; perf max {perf_max} median {perf_median}"
        );
        println!(
            "{:32} {:>8} {:>8} {:>7}",
            "function", "fathom", "perf", "diff"
        );
        for row in &self.rows {
            println!(
                "{:32} {:7.2}% {:7.2}% {:+6.2}",
                row.function,
                row.fathom * 100.0,
                row.perf * 100.0,
                (row.fathom - row.perf) * 100.0
            );
        }
        println!("top stacks, fathom:\n{}", self.ours.top_stacks(5));
        println!("top stacks, perf:\n{}", self.perf.top_stacks(5));
    }

    /// Shares of samples reaching any of `roots`, ours and perf's; printed.
    fn reach(&self, roots: &[&str]) -> (f64, f64) {
        let reaches = |s: &[String]| s.iter().any(|f| roots.contains(&f.as_str()));
        let (ours, perf) = (self.ours.share(reaches), self.perf.share(reaches));
        println!(
            "stacks reaching {}: fathom {:.2}%, perf {:.2}%",
            roots.join(" or "),
            ours * 100.0,
            perf * 100.0
        );
        (ours, perf)
    }

    /// Every row within [`TOLERANCE`]; otherwise fails naming all the rows
    /// that are not.
    fn assert_shares_agree(&self, what: &str) {
        let off: Vec<String> = self
            .rows
            .iter()
            .filter(|r| (r.fathom - r.perf).abs() > TOLERANCE)
            .map(|r| {
                format!(
                    "{}: fathom {:.2}% vs perf {:.2}%",
                    r.function,
                    r.fathom * 100.0,
                    r.perf * 100.0
                )
            })
            .collect();
        assert!(
            off.is_empty(),
            "{what}: inclusive shares differ by more than {:.0} points: {}",
            TOLERANCE * 100.0,
            off.join("; ")
        );
    }
}

/// Profiles `pid` for [`SECONDS`] with the agent and with
/// `perf record --call-graph dwarf` at the same time, and computes both
/// tools' inclusive shares of `functions` (keys as [`function_key`] makes
/// them). Both must have enough samples to compare.
fn compare(pid: u32, functions: &[&str], python: &[&str], dir: &Path) -> Comparison {
    let (output, perf_data) = record_with_perf(pid, SECONDS, dir, &["--call-graph", "dwarf,32768"]);
    // perf script makes a million cheap system calls; on 2 CPUs with the
    // workload spinning it is then rescheduled at each and takes 10x longer.
    // The workload is paused meanwhile.
    signal_pid(pid, "STOP");
    let started = std::time::Instant::now();
    let perf = perf_script(&perf_data);
    let script_time = started.elapsed();
    signal_pid(pid, "CONT");
    let ours: Vec<_> = flatten(&read_profile(&output))
        .into_iter()
        .filter(|s| s.pid == i64::from(pid))
        .collect();
    let mut ours = Side::ours(&ours);
    ours.python_as_interpreter(python);
    let perf = Side::perf(&perf);
    println!(
        "perf script: {:.1} s, reading both profiles: {:.1} s",
        script_time.as_secs_f64(),
        (started.elapsed() - script_time).as_secs_f64()
    );
    // Keep the disk free: a dwarf recording is ~30 MB per second.
    let _ = std::fs::remove_file(&perf_data);
    // At least a quarter of a CPU over the profile, on each side.
    let least = u64::from(SECONDS) * 999 / 4;
    assert!(
        ours.samples() >= least && perf.samples() >= least,
        "too few samples of pid {pid}: fathom {}, perf {} (want {least})",
        ours.samples(),
        perf.samples()
    );
    let rows = functions
        .iter()
        .map(|&f| Row {
            function: f.to_owned(),
            fathom: ours.inclusive(f),
            perf: perf.inclusive(f),
        })
        .collect();
    Comparison { ours, perf, rows }
}

/// Sends `signal` to a process this test started (or its child).
fn signal_pid(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid} failed");
}

/// Starts `cmd`, lets it settle, and [`compare`]s it; prints the result.
fn run_and_compare(what: &str, cmd: &mut Command, functions: &[&str]) -> Comparison {
    run_and_compare_python(what, cmd, functions, &[])
}

/// [`run_and_compare`] for an interpreter whose Python functions (`python`)
/// the agent shows in place of `_PyEval_EvalFrameDefault`: each run of
/// them in our stacks counts as the one interpreter frame that ran it,
/// which is what perf, unwinding natively, sees.
fn run_and_compare_python(
    what: &str,
    cmd: &mut Command,
    functions: &[&str],
    python: &[&str],
) -> Comparison {
    let dir = tempfile::tempdir().unwrap();
    let workload = ChildGuard::spawn(quiet(cmd));
    std::thread::sleep(Duration::from_millis(300));
    let comparison = compare(workload.pid(), functions, python, dir.path());
    drop(workload);
    comparison.print(what);
    comparison
}

/// The premise of the fixture tests: none of `functions` of `binary` sets
/// up a frame pointer (`mov %rsp,%rbp`), so a frame-pointer walk cannot find
/// their callers. Checked on the disassembly (objdump); every function must
/// be found.
fn assert_no_frame_pointers(binary: &Path, functions: &[&str]) {
    let out = Command::new("objdump")
        .args(["-d", "-C", "--no-show-raw-insn"])
        .arg(binary)
        .output()
        .unwrap();
    assert!(out.status.success(), "objdump -d {}", binary.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found: HashMap<String, bool> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        // "00000000000011d0 <branch_b(Step&, long)>:"
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, n)| function_key(n))
        {
            current = functions.contains(&name.as_str()).then_some(name);
            if let Some(name) = &current {
                found.entry(name.clone()).or_default();
            }
        } else if let Some(name) = &current
            && line.contains("mov    %rsp,%rbp")
        {
            found.insert(name.clone(), true);
        }
    }
    for &f in functions {
        assert_eq!(
            found.get(f),
            Some(&false),
            "{}: {f} must exist and set up no frame pointer",
            binary.display()
        );
    }
}

/// The C/C++/Rust call tree: none of the fixture's `own` functions keeps a
/// frame pointer; their inclusive shares and those of `libc` functions
/// agree with perf's, and our stacks reach a `root` (`main`, or the thread
/// entry).
fn check_tree(what: &str, binary: &Path, own: &[&str], libc: &[&str], roots: &[&str]) {
    assert_no_frame_pointers(binary, own);
    let functions: Vec<&str> = own.iter().chain(libc).copied().collect();
    let comparison = run_and_compare(what, Command::new(binary).arg("30"), &functions);
    let (reach, _) = comparison.reach(roots);
    // Sanity of the oracle: the fixture's leaf holds most of perf's samples.
    let leaf = own[0];
    let perf_leaf = comparison.perf.inclusive(leaf);
    assert!(
        perf_leaf > 0.5,
        "perf sees {leaf} in {:.1}% of samples: is the fixture running?",
        perf_leaf * 100.0
    );
    comparison.assert_shares_agree(what);
    assert!(
        reach >= FIXTURE_REACH,
        "{what}: {:.2}% of our stacks reach {}",
        reach * 100.0,
        roots.join(" or ")
    );
}

/// C, `gcc -O2 -fomit-frame-pointer`: main -> run -> {branch_a -> leaf_work,
/// branch_b -> mid -> leaf_work, branch_c}.
#[test]
fn c_without_frame_pointers_matches_perf_dwarf() {
    let Some(_kernel) =
        KernelTest::with_tools("c_without_frame_pointers_matches_perf_dwarf", &["perf"])
            .map(KernelTest::agent)
    else {
        return;
    };
    check_tree(
        "C tree (gcc -O2 -fomit-frame-pointer)",
        &unwind_fixture("tree"),
        &[
            "leaf_work",
            "branch_a",
            "branch_b",
            "mid",
            "branch_c",
            "run",
            "main",
        ],
        &["__libc_start_call_main"],
        &["main"],
    );
}

/// C++, `g++ -O2 -fomit-frame-pointer`: the same tree with a template leaf
/// and a virtual call, on a `std::thread`: its stacks end in libstdc++'s
/// thread routine (stripped), libc's `start_thread` and `clone3`.
#[test]
fn cpp_thread_without_frame_pointers_matches_perf_dwarf() {
    let Some(_kernel) = KernelTest::with_tools(
        "cpp_thread_without_frame_pointers_matches_perf_dwarf",
        &["perf"],
    )
    .map(KernelTest::agent) else {
        return;
    };
    check_tree(
        "C++ tree on a std::thread (g++ -O2 -fomit-frame-pointer)",
        &unwind_fixture("tree-cpp"),
        &[
            "leaf_work<unsigned long>",
            "branch_a",
            "branch_b",
            "Mid::step",
            "branch_c",
            "run",
        ],
        &["start_thread", "clone3"],
        &["start_thread"],
    );
}

/// Rust release build without frame pointers; its stacks also cross the
/// standard library's start-up (`std::rt::lang_start_internal`).
#[test]
fn rust_without_frame_pointers_matches_perf_dwarf() {
    let Some(_kernel) =
        KernelTest::with_tools("rust_without_frame_pointers_matches_perf_dwarf", &["perf"])
            .map(KernelTest::agent)
    else {
        return;
    };
    check_tree(
        "Rust tree (rustc -C opt-level=3 -C force-frame-pointers=no)",
        &unwind_fixture("tree-rs"),
        &[
            "tree::leaf_work",
            "tree::branch_a",
            "tree::branch_b",
            "tree::mid",
            "tree::branch_c",
            "tree::run",
            "tree::main",
            "main",
        ],
        &["std::rt::lang_start_internal", "__libc_start_call_main"],
        &["main"],
    );
}

/// 100 frames of a recursive function without frame pointers: the walk
/// goes through all of them to `main`.
#[test]
fn deep_recursion_is_walked_to_main() {
    let Some(_kernel) = KernelTest::with_tools("deep_recursion_is_walked_to_main", &["perf"])
        .map(KernelTest::agent)
    else {
        return;
    };
    let binary = unwind_fixture("recursion");
    let functions = ["bottom", "recurse", "run", "main"];
    assert_no_frame_pointers(&binary, &functions);
    let what = "100-deep recursion (gcc -O2 -fomit-frame-pointer)";
    let comparison = run_and_compare(what, Command::new(&binary).arg("30"), &functions);
    let (reach, _) = comparison.reach(&["main"]);
    let recursion_depth = |side: &Side| {
        let depth = |s: &[String]| s.iter().filter(|f| *f == "recurse").count();
        let max = side.stacks.iter().map(|(_, s)| depth(s)).max().unwrap_or(0);
        (max, side.share(|s| depth(s) >= 100))
    };
    let (our_max, our_full) = recursion_depth(&comparison.ours);
    let (perf_max, perf_full) = recursion_depth(&comparison.perf);
    println!(
        "recurse frames: fathom deepest {our_max}, {:.2}% with all 100; perf deepest {perf_max}, {:.2}% with all 100",
        our_full * 100.0,
        perf_full * 100.0
    );
    assert!(
        perf_max >= 100,
        "the oracle sees {perf_max} recurse frames: is the fixture running?"
    );
    assert!(
        our_max >= 100,
        "our deepest stack has {our_max} recurse frames, want 100"
    );
    assert!(
        our_full >= FIXTURE_REACH,
        "{:.2}% of our stacks have all 100 recurse frames",
        our_full * 100.0
    );
    comparison.assert_shares_agree(what);
    assert!(
        reach >= FIXTURE_REACH,
        "{:.2}% of our stacks reach main",
        reach * 100.0
    );
}

/// CPU in a callback called from a shared library: cmp <- libc's
/// msort_with_tmp (recursive) <- qsort_r <- sort_round <- run <- main.
#[test]
fn callback_through_libc_qsort_is_walked_to_main() {
    let Some(_kernel) =
        KernelTest::with_tools("callback_through_libc_qsort_is_walked_to_main", &["perf"])
            .map(KernelTest::agent)
    else {
        return;
    };
    let binary = unwind_fixture("qsort");
    let own = ["cmp", "shuffle", "sort_round", "run", "main"];
    assert_no_frame_pointers(&binary, &own);
    let what = "qsort callback (gcc -O2 -fomit-frame-pointer, libc)";
    let comparison = run_and_compare(
        what,
        Command::new(&binary).arg("30"),
        &[
            "cmp",
            "msort_with_tmp",
            "shuffle",
            "sort_round",
            "run",
            "main",
        ],
    );
    let (reach, _) = comparison.reach(&["main"]);
    // The callback's callers are libc's: the walk crossed the library.
    let through_libc = |side: &Side| {
        let cmp = side.inclusive("cmp");
        let both = side.share(|s| {
            s.first().is_some_and(|f| f == "cmp") && s.iter().any(|f| f == "msort_with_tmp")
        });
        both / cmp.max(f64::MIN_POSITIVE)
    };
    let (ours, theirs) = (
        through_libc(&comparison.ours),
        through_libc(&comparison.perf),
    );
    println!(
        "cmp samples under msort_with_tmp: fathom {:.2}%, perf {:.2}%",
        ours * 100.0,
        theirs * 100.0
    );
    assert!(
        comparison.perf.inclusive("cmp") > 0.5,
        "perf: cmp holds {:.1}%: is the fixture running?",
        comparison.perf.inclusive("cmp") * 100.0
    );
    comparison.assert_shares_agree(what);
    assert!(
        ours >= FIXTURE_REACH,
        "{:.2}% of our cmp samples are under msort_with_tmp",
        ours * 100.0
    );
    assert!(
        reach >= FIXTURE_REACH,
        "{:.2}% of our stacks reach main",
        reach * 100.0
    );
}

/// Debian's python3 (stripped, no frame pointers; named by `.dynsym`, libc
/// by its debug file) running nested Python functions, some called back
/// from C (`sum(map(...))`). Functions compared are those `.dynsym` names.
#[test]
fn stripped_python3_is_walked_to_main() {
    let Some(kernel) = KernelTest::with_tools("stripped_python3_is_walked_to_main", &["perf"])
        .map(KernelTest::agent)
    else {
        return;
    };
    // Debian's own interpreter, not whatever `python3` PATH finds first.
    let Some(python) = kernel.require(
        "Debian's /usr/bin/python3",
        Some(PathBuf::from("/usr/bin/python3")),
    ) else {
        return;
    };
    let script = workspace_root().join("tests/fixtures/unwind/busy.py");
    let what = "python3 busy.py (Debian, stripped)";
    // The agent names the Python functions of busy.py where the native
    // stack has the interpreter loop.
    let comparison = run_and_compare_python(
        what,
        Command::new(&python).arg(&script).arg("30"),
        &[
            "_PyEval_EvalFrameDefault",
            "_PyFunction_Vectorcall",
            "PyEval_EvalCode",
            "_PyRun_SimpleFileObject",
            "Py_RunMain",
            "Py_BytesMain",
            "__libc_start_call_main",
        ],
        &["step", "leaf", "middle", "outer", "<module>"],
    );
    // python3.11's main is not in .dynsym: libc's caller of main stands for
    // it (both tools name it from libc's debug file).
    let (reach, _) = comparison.reach(&["__libc_start_call_main"]);
    // Python frames called from C (map inside sum) nest the interpreter.
    let nested = |side: &Side| {
        side.share(|s| {
            s.iter()
                .filter(|f| *f == "_PyEval_EvalFrameDefault")
                .count()
                >= 2
        })
    };
    let (ours_nested, perf_nested) = (nested(&comparison.ours), nested(&comparison.perf));
    println!(
        "stacks with nested _PyEval_EvalFrameDefault: fathom {:.2}%, perf {:.2}%",
        ours_nested * 100.0,
        perf_nested * 100.0
    );
    assert!(
        comparison.perf.inclusive("_PyEval_EvalFrameDefault") > 0.5,
        "perf names _PyEval_EvalFrameDefault in too few samples to compare"
    );
    comparison.assert_shares_agree(what);
    assert!(
        (ours_nested - perf_nested).abs() <= TOLERANCE,
        "nested interpreter frames: fathom {:.2}% vs perf {:.2}%",
        ours_nested * 100.0,
        perf_nested * 100.0
    );
    assert!(
        reach >= SYSTEM_REACH,
        "{:.2}% of our python3 stacks reach libc's call of main",
        reach * 100.0
    );
}

/// nginx master and worker; on drop the master is told to stop (SIGTERM:
/// it stops its worker), then both are killed should they linger.
struct Nginx {
    master: ChildGuard,
    worker: Option<u32>,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.master.pid().to_string()])
            .status();
        for _ in 0..100 {
            if self.master.0.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(worker) = self.worker
            && Path::new(&format!("/proc/{worker}")).exists()
        {
            let _ = Command::new("kill")
                .args(["-KILL", &worker.to_string()])
                .status();
        }
    }
}

/// A page that takes gzip some CPU: pseudo-random words, 256 KiB.
fn gzip_page() -> String {
    const WORDS: [&str; 16] = [
        "frame", "stack", "unwind", "table", "kernel", "sample", "profile", "return", "address",
        "pointer", "register", "python", "nginx", "worker", "deflate", "symbol",
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut page = String::new();
    while page.len() < 256 << 10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        page.push_str(WORDS[(x % 16) as usize]);
        page.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
        write!(page, "{}", x % 1000).unwrap();
        page.push(' ');
    }
    page
}

/// Debian's nginx (stripped, no frame pointers) worker gzipping a page for
/// `wrk`: its CPU is in zlib's deflate, under nginx's filter chain and
/// event loop, under the master's fork of the worker, under `main`.
#[test]
fn stripped_nginx_worker_is_walked_to_main() {
    let test = "stripped_nginx_worker_is_walked_to_main";
    let Some(kernel) = KernelTest::with_tools(test, &["perf", "wrk"]).map(KernelTest::agent) else {
        return;
    };
    let Some(nginx) = kernel.require("nginx", Some(PathBuf::from("/usr/sbin/nginx"))) else {
        return;
    };
    let wrk = kernel.path("wrk");
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path();
    let port = free_port();
    std::fs::write(prefix.join("page.txt"), gzip_page()).unwrap();
    let p = prefix.display();
    let config = format!(
        "worker_processes 1;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    gzip on;
    gzip_min_length 0;
    gzip_types text/plain;
    gzip_comp_level 6;
    server {{
        listen 127.0.0.1:{port};
        root {p};
        location / {{ }}
    }}
}}
"
    );
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, config).unwrap();
    let mut server = Nginx {
        master: ChildGuard::spawn(quiet(
            Command::new(&nginx)
                .arg("-p")
                .arg(prefix)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(prefix.join("error.log")),
        )),
        worker: None,
    };
    wait_for_port(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(10),
    );
    let master = server.master.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap();
    let worker: u32 = children
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("nginx master {master} has no worker: {children:?}"));
    server.worker = Some(worker);

    let url = format!("http://127.0.0.1:{port}/page.txt");
    let _load = ChildGuard::spawn(quiet(
        Command::new(wrk)
            .args(["-t1", "-c4", "-d30s", "-H", "Accept-Encoding: gzip"])
            .arg(&url),
    ));
    std::thread::sleep(Duration::from_millis(500));
    let what = "nginx worker gzipping (Debian nginx-light, stripped)";
    let comparison = compare(
        worker,
        &[
            "deflate",
            "ngx_http_output_filter",
            "ngx_http_core_run_phases",
            "ngx_process_events_and_timers",
            "ngx_spawn_process",
            "ngx_master_process_cycle",
            "main",
        ],
        &[],
        dir.path(),
    );
    comparison.print(what);
    let (reach, _) = comparison.reach(&["main"]);
    assert!(
        comparison.perf.inclusive("deflate") > 0.3,
        "perf: deflate holds {:.1}%: is wrk loading nginx?",
        comparison.perf.inclusive("deflate") * 100.0
    );
    comparison.assert_shares_agree(what);
    assert!(
        reach >= SYSTEM_REACH,
        "{:.2}% of our nginx worker stacks reach main",
        reach * 100.0
    );
}

#[test]
fn function_keys_match_both_renderings() {
    for (ours, perf, key) in [
        (
            "unsigned long leaf_work<unsigned long>(long)",
            "leaf_work<unsigned long>",
            "leaf_work<unsigned long>",
        ),
        ("Mid::step(long)", "Mid::step", "Mid::step"),
        ("branch_b(Step&, long)", "branch_b", "branch_b"),
        ("msort_with_tmp", "msort_with_tmp.part.0", "msort_with_tmp"),
        ("tree::leaf_work", "tree::leaf_work", "tree::leaf_work"),
        (
            "(anonymous namespace)::f(int)",
            "(anonymous namespace)::f",
            "(anonymous namespace)::f",
        ),
        ("main", "main", "main"),
    ] {
        assert_eq!(function_key(perf), key, "{perf}");
        assert_eq!(function_key(ours), key, "{ours}");
    }
    assert_eq!(
        function_key("__libc_start_main@@GLIBC_2.34"),
        "__libc_start_main"
    );
    assert_eq!(
        function_key("<dyn core::ops::Fn() -> i32 as core::ops::FnOnce<()>>::call_once"),
        "<dyn core::ops::Fn() -> i32 as core::ops::FnOnce<()>>::call_once"
    );
    assert_eq!(
        function_key("std::rt::lang_start::{{closure}}"),
        "std::rt::lang_start::{{closure}}"
    );
    assert_eq!(
        function_key("<alloc::vec::Vec<T> as core::ops::Drop>::drop"),
        "<alloc::vec::Vec<T> as core::ops::Drop>::drop"
    );
}
