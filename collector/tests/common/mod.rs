//! Helpers shared by the collector's integration tests and benchmark: the
//! peers they run (rotel, Prometheus, Go, Chromium) and skip when missing,
//! child processes killed on drop, free ports, and real-shaped gzipped pprof
//! CPU profiles built with the `pprof` crate's own message types.
//!
//! Copied from `fathom-tests` (tests/src/lib.rs), which the collector cannot
//! depend on (it depends on the collector). Each test binary uses a part.
#![allow(dead_code, reason = "each test binary uses a part of these helpers")]
#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use pprof::protos::{self, Message as _};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A file of the collector's test fixtures (`collector/tests/fixtures`).
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// Cargo's target directory of this build (`target/` or `CARGO_TARGET_DIR`):
/// test binaries run from `<target>/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map_or_else(|| workspace_root().join("target"), Path::to_path_buf)
}

/// A child process killed (and reaped) when the guard is dropped.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The first line the child prints (its stdout must be piped), trimmed;
    /// the rest of its output is not read.
    pub fn first_line(&mut self) -> String {
        use std::io::BufRead as _;
        let stdout = self.0.stdout.take().expect("the child's stdout is piped");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the child's first line: {e}"));
        line.trim().to_string()
    }

    /// Waits for exit up to `timeout`; panics when it takes longer.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {timeout:?}",
                self.0.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (through kill(1), keeping tests free of `unsafe`).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {} failed", self.0.id());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of an external tool (searched in `PATH`) a test needs. Missing:
/// prints why the test skips, or fails under `CI=true`.
pub fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    require_found(test, tool, found)
}

/// Whether a peer tool this test needs is here (`found`). Elsewhere the test
/// prints why it skips; under `CI=true` a missing tool fails the test.
pub fn require_found(test: &str, what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    match found {
        Some(p) if p.exists() => Some(p),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: CI=true and {what} is missing (run scripts/setup)")
        }
        _ => {
            eprintln!(
                "\n*** SKIPPED {test}: {what} is missing (run scripts/setup; under CI=true this fails) ***\n"
            );
            None
        }
    }
}

/// The `rotel-agent` binary shipped in the `rotel` pip package.
pub fn rotel_agent_path() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import rotel,os;print(os.path.dirname(rotel.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some(Path::new(&dir).join("rotel-agent"))
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: std::net::SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A span as rotel's `--debug-log traces --debug-log-verbosity detailed`
/// printed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotelSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: String,
    pub name: String,
    pub kind: String,
    /// Start and end, nanoseconds since the epoch (0 when not printed).
    pub start_ns: u64,
    pub end_ns: u64,
    /// `STATUS_CODE_UNSET`, `STATUS_CODE_OK` or `STATUS_CODE_ERROR` (empty
    /// when not printed).
    pub status_code: String,
    pub status_message: String,
    /// Attribute name → rotel's rendering, e.g. `Int(42)`, `Str(GET)`.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// The attributes of the span's resource.
    pub resource: std::collections::BTreeMap<String, String>,
}

/// A running rotel (a real OpenTelemetry collector) that receives OTLP over
/// gRPC and HTTP and prints every span it receives.
pub struct Rotel {
    child: ChildGuard,
    out: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

impl Rotel {
    /// Starts `rotel-agent` on the given ports and waits until both listen.
    pub fn start(
        binary: &Path,
        grpc: std::net::SocketAddr,
        http: std::net::SocketAddr,
        dir: &Path,
    ) -> Self {
        let mut child = ChildGuard::spawn(
            Command::new(binary)
                .args(["start", "--exporter", "blackhole", "--debug-log", "traces"])
                .args(["--debug-log-verbosity", "detailed", "--disable-batching"])
                .arg("--otlp-grpc-endpoint")
                .arg(grpc.to_string())
                .arg("--otlp-http-endpoint")
                .arg(http.to_string())
                .arg("--pid-file")
                .arg(dir.join(format!("rotel-{}.pid", grpc.port())))
                .arg("--log-file")
                .arg(dir.join(format!("rotel-{}.log", grpc.port())))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let stdout = child.0.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        wait_for_port(grpc, Duration::from_secs(10));
        wait_for_port(http, Duration::from_secs(10));
        Self {
            child,
            out,
            reader: Some(reader),
            grpc,
            http,
        }
    }

    /// Stops rotel gracefully (SIGTERM: it finishes what it received) and
    /// returns every span it printed.
    pub fn stop(mut self) -> Vec<RotelSpan> {
        self.child.signal("TERM");
        self.child.wait_timeout(Duration::from_secs(20));
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        self.spans()
    }

    /// The spans printed so far.
    pub fn spans(&self) -> Vec<RotelSpan> {
        parse_rotel_spans(&self.out.lock().unwrap())
    }

    /// Waits until at least `n` spans were printed; returns them.
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<RotelSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "rotel printed {} spans, expected {n}, within {timeout:?}",
                spans.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Parses rotel's detailed trace debug log.
pub fn parse_rotel_spans(lines: &[String]) -> Vec<RotelSpan> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        ResourceAttrs,
        SpanAttrs,
    }
    let mut spans = Vec::new();
    let mut resource = std::collections::BTreeMap::new();
    let mut current: Option<RotelSpan> = None;
    let mut section = Section::Other;
    let field = |line: &str, name: &str| -> Option<String> {
        let rest = line.trim_start().strip_prefix(name)?;
        let rest = rest.trim_start().strip_prefix(':')?;
        Some(rest.trim().to_string())
    };
    for line in lines {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            resource = std::collections::BTreeMap::new();
            section = Section::Other;
        } else if t == "Resource attributes:" {
            section = Section::ResourceAttrs;
        } else if t.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(RotelSpan {
                resource: resource.clone(),
                ..RotelSpan::default()
            });
            section = Section::Other;
        } else if t == "Attributes:" && current.is_some() {
            section = Section::SpanAttrs;
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            match section {
                Section::ResourceAttrs => {
                    resource.insert(k.to_string(), v.to_string());
                }
                Section::SpanAttrs => {
                    if let Some(s) = current.as_mut() {
                        s.attributes.insert(k.to_string(), v.to_string());
                    }
                }
                Section::Other => {}
            }
        } else if let Some(s) = current.as_mut() {
            if let Some(v) = field(line, "Trace ID") {
                s.trace_id = v;
            } else if let Some(v) = field(line, "Parent ID") {
                s.parent_id = v;
            } else if let Some(v) = field(line, "ID") {
                s.span_id = v;
            } else if let Some(v) = field(line, "Name") {
                s.name = v;
            } else if let Some(v) = field(line, "Kind") {
                s.kind = v;
            } else if let Some(v) = field(line, "Start time") {
                s.start_ns = v.parse().unwrap_or(0);
            } else if let Some(v) = field(line, "End time") {
                s.end_ns = v.parse().unwrap_or(0);
            } else if let Some(v) = field(line, "Status code") {
                s.status_code = v;
            } else if let Some(v) = field(line, "Status message") {
                s.status_message = v;
            } else if !t.starts_with("->") && t.ends_with(':') {
                section = Section::Other;
            }
        } else if t.starts_with("ScopeSpans") {
            section = Section::Other;
        }
    }
    spans.extend(current);
    spans
}

/// A frame of a [`CpuProfile`]: its address in the mapping and the one
/// function there (no inlining).
pub struct Frame {
    pub address: u64,
    pub function: String,
    pub system_name: String,
    pub file: String,
    pub line: i64,
}

/// A CPU profile shaped the way `fathom-agent` writes one: sample types
/// `samples/count` and `cpu/nanoseconds`, period type `cpu/nanoseconds`,
/// period 1e9/Hz, one mapping, one function and location per frame.
pub struct CpuProfile {
    pub frequency_hz: i64,
    pub duration: Duration,
    pub mapping_file: String,
    pub build_id: String,
    pub memory_start: u64,
    pub memory_limit: u64,
    pub frames: Vec<Frame>,
    /// Stacks (leaf first) as indexes into `frames`, and their counts.
    pub samples: Vec<(Vec<usize>, i64)>,
}

impl CpuProfile {
    /// The pprof message (the `pprof` crate's types).
    pub fn build(&self) -> protos::Profile {
        let mut strings = vec![String::new()];
        let mut ids = std::collections::HashMap::from([(String::new(), 0i64)]);
        let mut string = |s: &str| -> i64 {
            *ids.entry(s.to_owned()).or_insert_with(|| {
                strings.push(s.to_owned());
                strings.len() as i64 - 1
            })
        };
        let period = 1_000_000_000 / self.frequency_hz.max(1);
        let (samples, count, cpu, nanoseconds) = (
            string("samples"),
            string("count"),
            string("cpu"),
            string("nanoseconds"),
        );
        let mapping = protos::Mapping {
            id: 1,
            memory_start: self.memory_start,
            memory_limit: self.memory_limit,
            file_offset: 0,
            filename: string(&self.mapping_file),
            build_id: string(&self.build_id),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: false,
        };
        let mut function = Vec::new();
        let mut location = Vec::new();
        for (i, f) in self.frames.iter().enumerate() {
            let id = i as u64 + 1;
            function.push(protos::Function {
                id,
                name: string(&f.function),
                system_name: string(&f.system_name),
                filename: string(&f.file),
                start_line: 0,
            });
            location.push(protos::Location {
                id,
                mapping_id: 1,
                address: f.address,
                line: vec![protos::Line {
                    function_id: id,
                    line: f.line,
                }],
                is_folded: false,
            });
        }
        let sample = self
            .samples
            .iter()
            .map(|(stack, n)| protos::Sample {
                location_id: stack.iter().map(|&i| i as u64 + 1).collect(),
                value: vec![*n, n * period],
                label: Vec::new(),
            })
            .collect();
        let time_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        protos::Profile {
            sample_type: vec![
                protos::ValueType {
                    ty: samples,
                    unit: count,
                },
                protos::ValueType {
                    ty: cpu,
                    unit: nanoseconds,
                },
            ],
            sample,
            mapping: vec![mapping],
            location,
            function,
            string_table: strings,
            drop_frames: 0,
            keep_frames: 0,
            time_nanos,
            duration_nanos: self.duration.as_nanos() as i64,
            period_type: Some(protos::ValueType {
                ty: cpu,
                unit: nanoseconds,
            }),
            period,
            comment: Vec::new(),
            default_sample_type: cpu,
        }
    }

    /// Serialized (prost) and gzipped (flate2), as agents push it.
    pub fn gzip(&self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&self.build().encode_to_vec()).unwrap();
        gz.finish().unwrap()
    }
}
