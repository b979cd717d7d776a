//! Support for Fathom's integration tests and benchmarks: a run-time gate on
//! kernel capabilities, builders for the agent binary and C fixtures, guards
//! that kill spawned workloads, and readers for pprof and `perf script`.
//!
//! Test helpers panic on failure: that is how a test reports it.
#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use pprof::protos::Message as _;
pub use pprof::protos::Profile;

pub use fathom_test_support::*;

pub mod cgroups;
pub mod chain;
pub mod dashboards;
pub mod k8s_replay;
pub mod netns;
pub mod open_loop;

/// Serializes tests that load programs into the kernel or measure CPU.
/// Tests take it through [`KernelTest`].
fn kernel_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The right of a kernel test to run: while alive it holds the lock that
/// serializes the tests of this binary that load BPF or measure CPU.
///
/// Every constructor returns `None` (the test then returns at once, i.e.
/// skips) after printing a loud `*** SKIPPED test: reason ***` line when
/// this machine cannot run the test: not root, no kernel BTF, no `bpf()`,
/// an agent built without its eBPF objects, or a missing tool. Under
/// `CI=true` each of those fails the test instead.
///
/// ```ignore
/// let Some(kernel) = KernelTest::with_tools("my_test", &["curl", "bpftool"]) else {
///     return;
/// };
/// let curl: &Path = kernel.path("curl");
/// ```
#[must_use = "the kernel lock is held only while the guard lives"]
pub struct KernelTest {
    test: String,
    /// Tools resolved by [`KernelTest::tools`], by name.
    tools: HashMap<String, PathBuf>,
    _lock: MutexGuard<'static, ()>,
}

impl KernelTest {
    /// Takes the kernel lock (waiting for the test holding it), then checks
    /// that this machine can load BPF.
    pub fn acquire(test: &str) -> Option<Self> {
        let lock = kernel_lock();
        kernel_tests_possible(test).then(|| Self {
            test: test.to_owned(),
            tools: HashMap::new(),
            _lock: lock,
        })
    }

    /// [`KernelTest::acquire`], then [`KernelTest::tools`].
    pub fn with_tools(test: &str, tools: &[&str]) -> Option<Self> {
        Self::acquire(test)?.tools(tools)
    }

    /// Requires every tool of `tools` (see [`find_tool`]); their paths are
    /// then [`KernelTest::path`]. A missing one: skip (the lock is released).
    pub fn tools(mut self, tools: &[&str]) -> Option<Self> {
        for tool in tools {
            let path = self.tool(tool)?;
            self.tools.insert((*tool).to_owned(), path);
        }
        Some(self)
    }

    /// The path of a tool required by [`KernelTest::tools`].
    ///
    /// # Panics
    /// When `tool` was not required.
    pub fn path(&self, tool: &str) -> &Path {
        self.tools
            .get(tool)
            .unwrap_or_else(|| panic!("{}: {tool} was not required by tools()", self.test))
    }

    /// Requires one tool (see [`find_tool`]): its path, or `None` (skip).
    pub fn tool(&self, tool: &str) -> Option<PathBuf> {
        require_tool(&self.test, tool)
    }

    /// Requires a peer found some other way (`found`), described as `what`
    /// in the skip message: its path, or `None` (skip).
    pub fn require(&self, what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
        require_found(&self.test, what, found)
    }

    /// Builds the agent binary now, before the test starts any workload
    /// (a first build can take minutes).
    pub fn agent(self) -> Self {
        agent_binary();
        self
    }

    /// The test's name, as given.
    pub fn name(&self) -> &str {
        &self.test
    }
}

/// Whether this test can load BPF here. Elsewhere it prints why it skips;
/// under `CI=true` a missing capability fails the test instead. Tests use
/// [`KernelTest`], which also serializes them; benchmarks (one per binary)
/// call this.
pub fn kernel_tests_possible(test: &str) -> bool {
    let reason = if fathom_agent::sys::effective_uid() != 0 {
        Some("not running as root".to_owned())
    } else if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        Some("no kernel BTF at /sys/kernel/btf/vmlinux".to_owned())
    } else if let Err(e) = fathom_agent::sys::probe_bpf_syscall() {
        Some(format!("bpf() unavailable: {e}"))
    } else if let Err(e) = fathom_agent::ebpf::object() {
        Some(e.to_string())
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: CI=true and this kernel test cannot run: {reason}")
        }
        Some(reason) => {
            eprintln!("\n*** SKIPPED {test}: {reason} (under CI=true this fails) ***\n");
            false
        }
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds `fathom-agent` (once per test binary) with the same profile as the
/// tests, and returns its path.
pub fn agent_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cargo_build_bin("fathom-agent", cfg!(not(debug_assertions))))
}

/// Builds the release `fathom-agent` (for benchmarks).
pub fn release_agent_binary() -> PathBuf {
    cargo_build_bin("fathom-agent", true)
}

/// Builds `fathom-collector` (once per test binary) with the same profile as
/// the tests, and returns its path.
pub fn collector_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| cargo_build_bin("fathom-collector", cfg!(not(debug_assertions))))
}

/// Builds the release `fathom-collector` (for benchmarks).
pub fn release_collector_binary() -> PathBuf {
    cargo_build_bin("fathom-collector", true)
}

/// Builds a binary of the workspace whose package and binary share `name`.
fn cargo_build_bin(name: &str, release: bool) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", name, "--bin", name, "--message-format=json"])
        .stderr(Stdio::inherit());
    if release {
        // Its own target directory: `cargo build -p NAME` unifies features
        // unlike `cargo bench -p fathom-tests`, so sharing `target/release`
        // rebuilt the dependencies of both at every other bench run.
        cmd.arg("--release")
            .arg("--target-dir")
            .arg(workspace_root().join("target/bench-bins"));
    }
    let output = cmd.output().unwrap();
    assert!(output.status.success(), "building {name} failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report the {name} executable"))
}

/// Compiler of the frame-pointer fixtures. clang, because GCC 12 (Debian
/// bookworm) ignores `-mno-omit-leaf-frame-pointer` and leaves leaf
/// functions without a frame, which hides their callers from any
/// frame-pointer unwinder (perf's too).
pub const FIXTURE_CC: &str = "clang";

/// Flags every frame-pointer fixture is built with: a frame pointer set up
/// at the entry of every function (no shrink-wrapping of the prologue past
/// the hot loop), no inlining, debug info. Pinned so results reproduce.
pub const FIXTURE_CFLAGS: &[&str] = &[
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-mno-omit-leaf-frame-pointer",
    "-mllvm",
    "-enable-shrink-wrap=false",
    "-fno-inline",
    "-pthread",
];

/// Compiles `tests/fixtures/<name>.c` into `dir` and returns the binary.
pub fn build_fixture(name: &str, dir: &Path) -> PathBuf {
    let source = workspace_root()
        .join("tests/fixtures")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let status = Command::new(FIXTURE_CC)
        .args(FIXTURE_CFLAGS)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{FIXTURE_CC} failed for {}",
        source.display()
    );
    out
}

/// The agent's log so far; `closed` once its stderr closed (it exited).
#[derive(Default)]
struct AgentLog {
    lines: Vec<String>,
    closed: bool,
}

/// A running `fathom-agent` whose log (stderr) the test can wait on: the
/// fixture tests and benchmarks start the agent with. Killed (and reaped)
/// when dropped, also when the test panics.
pub struct Agent {
    child: ChildGuard,
    log: Arc<(Mutex<AgentLog>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent binary with `args`, echoing its log.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_binary(agent_binary(), args, true)
    }

    /// Starts `binary` (e.g. the release agent) with `args`; `echo` copies
    /// its log to stderr as it comes.
    pub fn spawn_binary(binary: &Path, args: &[&str], echo: bool) -> Self {
        Self::spawn_env(binary, args, &[], echo)
    }

    /// [`Agent::spawn_binary`] with environment variables set.
    pub fn spawn_env(binary: &Path, args: &[&str], env: &[(&str, &str)], echo: bool) -> Self {
        let mut cmd = Command::new(binary);
        cmd.envs(env.iter().copied());
        cmd.args(args)
            .env("FATHOM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd);
        let stderr = child.0.stderr.take().unwrap();
        let log: Arc<(Mutex<AgentLog>, Condvar)> = Arc::default();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[agent] {line}");
                }
                sink.0.lock().unwrap().lines.push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap().closed = true;
            sink.1.notify_all();
        });
        Self {
            child,
            log,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn signal(&self, signal: &str) {
        self.child.signal(signal);
    }

    /// Waits until a log line contains `needle`; panics after `timeout`,
    /// or at once when the agent closed its log (exited) without it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let (log, cv) = &*self.log;
        let guard = log.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |log| {
                !log.closed && !log.lines.iter().any(|l| l.contains(needle))
            })
            .unwrap();
        assert!(
            guard.lines.iter().any(|l| l.contains(needle)),
            "agent never logged {needle:?} ({}); log:\n{}",
            if guard.closed {
                "it exited".to_owned()
            } else {
                format!("waited {timeout:?}")
            },
            guard.lines.join("\n")
        );
    }

    /// Waits for the agent to exit; returns its status and whole log.
    pub fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let status = self.child.wait_timeout(timeout);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let log = self.log.0.lock().unwrap().lines.join("\n");
        (status, log)
    }
}

/// Runs `fathom-agent profile --pid PID` and `perf record -e cpu-clock
/// CALL_GRAPH -p PID`, both at 999 Hz for `seconds`, at the same time (perf
/// starts once the agent samples). Returns the agent's profile and perf's
/// data file.
pub fn record_with_perf(
    pid: u32,
    seconds: u32,
    dir: &Path,
    call_graph: &[&str],
) -> (PathBuf, PathBuf) {
    let output = dir.join("fathom.pb.gz");
    let perf_data = dir.join("perf.data");
    let agent = Agent::spawn(&[
        "profile",
        "--pid",
        &pid.to_string(),
        "--frequency",
        "999",
        "--duration",
        &format!("{seconds}s"),
        "--output",
        output.to_str().unwrap(),
    ]);
    agent.wait_for_log("profiler attached", Duration::from_secs(60));
    let mut perf = ChildGuard::spawn(
        Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999"])
            .args(call_graph)
            .args(["-p", &pid.to_string(), "-o"])
            .arg(&perf_data)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let (status, log) = agent.finish(Duration::from_secs(120));
    assert!(status.success(), "agent failed: {log}");
    assert!(
        perf.wait_timeout(Duration::from_secs(60)).success(),
        "perf record failed"
    );
    (output, perf_data)
}

/// Profiles one process for 3 s with `fathom-agent profile` into
/// `dir/name`.
#[allow(clippy::unwrap_used, reason = "test helper; a temp path is UTF-8")]
pub fn profile_pid(pid: u32, dir: &Path, name: &str) -> PathBuf {
    let output = dir.join(name);
    let agent = Agent::spawn(&[
        "profile",
        "--pid",
        &pid.to_string(),
        "--duration",
        "3s",
        "--output",
        output.to_str().unwrap(),
    ]);
    let (status, log) = agent.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    output
}

/// CPU seconds (user + system) a process used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    try_cpu_seconds(pid).unwrap_or_else(|| panic!("no CPU time of process {pid}"))
}

/// CPU seconds (user + system) a process used so far, exited threads
/// included (the total is the scheduler's exact run time, rounded to a
/// clock tick); `None` once the process is gone.
pub fn try_cpu_seconds(pid: u32) -> Option<f64> {
    static TICKS: OnceLock<f64> = OnceLock::new();
    let ticks = *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // utime and stime are fields 14 and 15 (11 and 12 after the comm).
    let field = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((field(11)? + field(12)?) / ticks)
}

/// The share of the CPUs' time the hypervisor gave to others (steal) since
/// it was started: on a shared VM a run with much steal measured the host's
/// neighbours, not the code (latency tails above all).
#[derive(Clone, Copy, Debug)]
pub struct StealMeter {
    steal: u64,
    total: u64,
}

impl StealMeter {
    pub fn start() -> Self {
        let (steal, total) = steal_jiffies();
        Self { steal, total }
    }

    /// Steal over all CPU time since [`StealMeter::start`] (0..=1).
    pub fn share(&self) -> f64 {
        let (steal, total) = steal_jiffies();
        steal.saturating_sub(self.steal) as f64 / total.saturating_sub(self.total).max(1) as f64
    }
}

/// Steal and total jiffies of all CPUs (`/proc/stat`'s `cpu` line; steal
/// is the hypervisor's own count, summed at each tick, so it is exact over
/// a run, unlike the per-CPU busy time, which is sampled at the tick).
fn steal_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    (f.get(7).copied().unwrap_or(0), f.iter().take(8).sum())
}

/// The median (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Reads a pprof file, gzipped or not.
pub fn read_profile(path: &Path) -> Profile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut raw)
            .unwrap();
        raw
    } else {
        bytes
    };
    Profile::decode(&raw[..]).unwrap()
}

/// A sample of a profile, flattened for assertions.
#[derive(Clone, Debug)]
pub struct FlatSample {
    pub pid: i64,
    pub tid: i64,
    pub comm: String,
    pub count: i64,
    /// Function names, leaf first, inline frames expanded (innermost first).
    pub functions: Vec<String>,
    /// Mapping file name of each function above.
    pub files: Vec<String>,
}

/// All samples of a profile with their stacks as names.
pub fn flatten(p: &Profile) -> Vec<FlatSample> {
    let s = |i: i64| p.string_table[i as usize].clone();
    let functions: HashMap<u64, String> = p.function.iter().map(|f| (f.id, s(f.name))).collect();
    let mappings: HashMap<u64, String> = p.mapping.iter().map(|m| (m.id, s(m.filename))).collect();
    let locations: HashMap<u64, &pprof::protos::Location> =
        p.location.iter().map(|l| (l.id, l)).collect();
    p.sample
        .iter()
        .map(|sample| {
            let label = |key: &str| sample.label.iter().find(|l| s(l.key) == key);
            let mut names = Vec::new();
            let mut files = Vec::new();
            for id in &sample.location_id {
                let location = locations[id];
                for line in &location.line {
                    names.push(functions[&line.function_id].clone());
                    files.push(
                        mappings
                            .get(&location.mapping_id)
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
            }
            FlatSample {
                pid: label("pid").map_or(-1, |l| l.num),
                tid: label("tid").map_or(-1, |l| l.num),
                comm: label("comm").map_or_else(String::new, |l| s(l.str)),
                count: sample.value[0],
                functions: names,
                files,
            }
        })
        .collect()
}

/// Share (0..1) of the samples whose leaf function satisfies `leaf`.
pub fn leaf_share(samples: &[FlatSample], leaf: impl Fn(&str) -> bool) -> f64 {
    let total: i64 = samples.iter().map(|s| s.count).sum();
    let hit: i64 = samples
        .iter()
        .filter(|s| s.functions.first().is_some_and(|f| leaf(f)))
        .map(|s| s.count)
        .sum();
    hit as f64 / total.max(1) as f64
}

/// Runs `go tool pprof -top` on a profile; panics unless it parses it.
/// Returns the report.
pub fn go_pprof_top(path: &Path) -> String {
    let output = Command::new("go")
        .args(["tool", "pprof", "-top", "-nodecount=50", "-symbolize=none"])
        .arg(path)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("running go tool pprof");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "go tool pprof rejected {}: {stderr}",
        path.display()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `addr2line -f -C -e BINARY ADDR...` (the independent oracle for
/// symbols): function name and line of each address.
pub fn addr2line(binary: &Path, addrs: &[u64]) -> Vec<(String, Option<u32>)> {
    let output = Command::new("addr2line")
        .args(["-f", "-C", "-e"])
        .arg(binary)
        .args(addrs.iter().map(|a| format!("{a:#x}")))
        .output()
        .expect("running addr2line");
    assert!(output.status.success(), "addr2line failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2 * addrs.len(), "addr2line output: {text}");
    lines
        .chunks(2)
        .map(|pair| {
            // "file:line" or "file:line (discriminator N)" or "??:0"
            let line = pair[1]
                .split(' ')
                .next()
                .and_then(|fl| fl.rsplit(':').next())
                .and_then(|l| l.parse().ok())
                .filter(|&l| l != 0);
            (pair[0].to_owned(), line)
        })
        .collect()
}

/// One sample of `perf script -F tid,ip,sym,dso`.
#[derive(Clone, Debug)]
pub struct PerfSample {
    pub tid: u32,
    /// (symbol, dso), leaf first.
    pub frames: Vec<(String, String)>,
}

/// Runs `perf script` on a recording and parses its samples.
pub fn perf_script(data: &Path) -> Vec<PerfSample> {
    let output = Command::new("perf")
        .args(["script", "-F", "tid,ip,sym,dso", "-i"])
        .arg(data)
        .output()
        .expect("running perf script");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "perf script failed: {stderr}");
    let samples = parse_perf_script(&String::from_utf8_lossy(&output.stdout));
    if samples.is_empty() {
        eprintln!(
            "perf script found no samples in {}: {stderr}",
            data.display()
        );
    }
    samples
}

/// Parses `perf script -F tid,ip,sym,dso` output.
pub fn parse_perf_script(text: &str) -> Vec<PerfSample> {
    let mut samples = Vec::new();
    let mut current: Option<PerfSample> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            samples.extend(current.take());
        } else if line.starts_with('\t') {
            // Frame lines start with a tab; sample headers may start with
            // spaces (perf right-aligns the tid).
            // "\t    55d0c5a02140 hot_a+0x10 (/tmp/x/shares)"
            let mut parts = line.split_whitespace();
            let _ip = parts.next();
            let rest: Vec<&str> = parts.collect();
            let (sym, dso) = match rest.split_last() {
                Some((dso, sym)) if dso.starts_with('(') => (
                    sym.join(" "),
                    dso.trim_matches(|c| c == '(' || c == ')').to_owned(),
                ),
                _ => (rest.join(" "), String::new()),
            };
            let sym = sym.split("+0x").next().unwrap_or_default().to_owned();
            if let Some(sample) = current.as_mut() {
                sample.frames.push((sym, dso));
            }
        } else {
            samples.extend(current.take());
            let tid = line
                .split_whitespace()
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            current = Some(PerfSample {
                tid,
                frames: Vec::new(),
            });
        }
    }
    samples.extend(current);
    samples
}

/// Share (0..1) of perf samples whose leaf symbol satisfies `leaf`.
pub fn perf_leaf_share(samples: &[PerfSample], leaf: impl Fn(&str, &str) -> bool) -> f64 {
    let hit = samples
        .iter()
        .filter(|s| s.frames.first().is_some_and(|(sym, dso)| leaf(sym, dso)))
        .count();
    hit as f64 / samples.len().max(1) as f64
}

/// Names of loaded BPF programs (from `bpftool`, an independent view).
pub fn loaded_bpf_programs() -> Vec<String> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("running bpftool");
    assert!(output.status.success());
    let programs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    programs
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `kernel.bpf_stats_enabled` set to 1 while alive (the kernel then times
/// every BPF program run), restored when dropped, also on a panic.
pub struct BpfStats {
    old: String,
}

pub const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Self {
        let old = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .expect("reading kernel.bpf_stats_enabled")
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS_SYSCTL, "1").expect("setting kernel.bpf_stats_enabled");
        Self { old }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.old) {
            eprintln!("restoring kernel.bpf_stats_enabled={}: {e}", self.old);
        }
    }
}

/// Summed `run_time_ns` and `run_cnt`, and the names, of the loaded BPF
/// programs `pid` holds (`bpftool prog show`). bpftool lists owner pids
/// only when built with BPF skeletons (Debian's is not): then programs
/// whose name satisfies `name_is_ours` count.
pub fn bpf_run_totals(pid: u32, name_is_ours: impl Fn(&str) -> bool) -> (f64, f64, Vec<String>) {
    let mut total = (0.0, 0.0, Vec::new());
    for (name, ns, runs) in bpf_runs_by_program(pid, name_is_ours) {
        total.0 += ns;
        total.1 += runs;
        total.2.push(name);
    }
    total
}

/// Round trips per second of one run of a ping-pong fixture
/// (`pingpong.c`, `http_pingpong.c`: `NAME SECONDS` prints
/// `round_trips N`), pinned to CPU 0: across two CPUs every wake-up is an
/// inter-processor interrupt (in a VM an exit to the hypervisor), and the
/// rate swings with where the scheduler puts the two processes.
pub fn pinned_round_trips(workload: &Path, seconds: f64) -> f64 {
    pinned_round_trips_with(workload, seconds, &[])
}

/// [`pinned_round_trips`] with more arguments after the seconds.
pub fn pinned_round_trips_with(workload: &Path, seconds: f64, args: &[&str]) -> f64 {
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(workload)
        .arg(seconds.to_string())
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", workload.display());
    let text = String::from_utf8_lossy(&out.stdout);
    let trips: f64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{} printed {text:?}", workload.display()));
    trips / seconds
}

/// A benchmark setting from the environment (`FATHOM_BENCH_ROUNDS`, …),
/// else `default`.
pub fn bench_setting(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints a bench's table of modes: each mode's median rate, the median of
/// its per-round ratio to the first mode (off), and its cost per round trip
/// against off. `rates[i]` holds mode `i`'s rate of each round.
pub fn print_rate_table(names: &[&str], rates: &[Vec<f64>], per: &str) {
    println!("| mode | round trips/s (median) | vs off | cost per {per} |");
    println!("|---|---|---|---|");
    let off = median(&rates[0]);
    for (name, mode_rates) in names.iter().zip(rates) {
        let ratios: Vec<f64> = mode_rates
            .iter()
            .zip(&rates[0])
            .map(|(x, o)| x / o)
            .collect();
        let rate = median(mode_rates);
        println!(
            "| {name} | {rate:.0} | {:.3} | {:+.2} µs |",
            median(&ratios),
            (1.0 / rate - 1.0 / off) * 1e6
        );
    }
}

/// The agent as the tracing tests run it: traces only, exported over
/// OTLP/gRPC to `rotel` every second, its store in `dir`; returns once it
/// says the HTTP programs are attached.
pub fn start_traces_agent(rotel: &Rotel, dir: &Path) -> Agent {
    start_traces_agent_with(rotel, dir, &[])
}

/// [`start_traces_agent`] with more arguments.
pub fn start_traces_agent_with(rotel: &Rotel, dir: &Path, extra: &[&str]) -> Agent {
    let http_listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let store = dir.join("store.redb");
    let endpoint = format!("http://{}", rotel.grpc);
    let args = [
        "--signals",
        "traces",
        "--interval",
        "1s",
        "--http-listen",
        &http_listen,
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        store.to_str().unwrap(),
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "grpc",
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    let agent = Agent::spawn(&args);
    agent.wait_for_log("http tracing attached", Duration::from_secs(60));
    agent
}

/// `run_time_ns` and `run_cnt` of each of the programs [`bpf_run_totals`]
/// sums (same program names summed).
pub fn bpf_runs_by_program(
    pid: u32,
    name_is_ours: impl Fn(&str) -> bool,
) -> Vec<(String, f64, f64)> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool prog show failed");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    let mut by: Vec<(String, f64, f64)> = Vec::new();
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or("");
        let owned = match p["pids"].as_array() {
            Some(a) => a.iter().any(|x| x["pid"].as_u64() == Some(u64::from(pid))),
            None => name_is_ours(name),
        };
        if owned {
            let ns = p["run_time_ns"].as_f64().unwrap_or(0.0);
            let runs = p["run_cnt"].as_f64().unwrap_or(0.0);
            match by.iter_mut().find(|(n, _, _)| n == name) {
                Some(e) => {
                    e.1 += ns;
                    e.2 += runs;
                }
                None => by.push((name.to_owned(), ns, runs)),
            }
        }
    }
    by
}

/// Cargo's target directory of this build (`target/` or `CARGO_TARGET_DIR`):
/// test binaries run from `<target>/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's CPU time grows with work it does; a process that
    /// does not exist has none.
    #[test]
    fn cpu_seconds_of_live_and_gone_processes() {
        let me = std::process::id();
        let before = try_cpu_seconds(me).unwrap();
        // Spin until 50 ms more show (a busy machine may take a while).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        let mut now = before;
        while now < before + 0.05 && std::time::Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            now = try_cpu_seconds(me).unwrap();
        }
        assert!(now >= before + 0.05, "{before} -> {now} ({x})");
        assert_eq!(try_cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn steal_is_a_share() {
        let meter = StealMeter::start();
        std::thread::sleep(Duration::from_millis(50));
        let share = meter.share();
        assert!((0.0..=1.0).contains(&share), "{share}");
    }

    #[test]
    fn parses_perf_script() {
        // perf right-aligns the tid: headers may start with spaces.
        let text = concat!(
            "31235 \n",
            "\t    55d0c5a02140 hot_a+0x10 (/tmp/x/shares)\n",
            "\t    55d0c5a02200 one_round+0x20 (/tmp/x/shares)\n",
            "\n",
            " 1236 \n",
            "\t ffffffff81a0 clear_user_erms+0xb ([kernel.kallsyms])\n",
            "\t    7f00 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)\n",
            "\n",
        );
        let samples = parse_perf_script(text);
        assert_eq!(samples.len(), 2);
        assert_eq!((samples[0].tid, samples[1].tid), (31235, 1236));
        assert_eq!(
            samples[0].frames[0],
            ("hot_a".into(), "/tmp/x/shares".into())
        );
        assert_eq!(
            samples[1].frames[0],
            ("clear_user_erms".into(), "[kernel.kallsyms]".into())
        );
        assert_eq!(samples[1].frames[1].0, "[unknown]");
        assert!((perf_leaf_share(&samples, |s, _| s == "hot_a") - 0.5).abs() < 1e-9);
    }
}
