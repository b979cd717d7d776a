//! Test support shared by the collector's integration tests
//! (`collector/tests/`) and the agent's (`fathom-tests`): peers found on
//! `PATH` (skipped with a loud reason when missing, a failure under
//! `CI=true`), child processes killed on drop, free ports, and the rotel
//! OTLP receiver that stands where Jaeger would be, with its span parser.
//! It depends on neither crate, so both can use it.
#![allow(
    clippy::unwrap_used,
    reason = "test support: a failed unwrap is a failed test"
)]

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

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

/// The path of an external tool a test needs (see [`find_tool`]). Missing:
/// prints why the test skips, or fails under `CI=true`.
pub fn require_tool(test: &str, tool: &str) -> Option<PathBuf> {
    let what = if tool == ROTEL_AGENT {
        "rotel-agent (pip package rotel)"
    } else {
        tool
    };
    require_found(test, what, find_tool(tool))
}

/// `rotel-agent`, which [`find_tool`] also finds in the `rotel` pip package.
pub const ROTEL_AGENT: &str = "rotel-agent";

/// A tool's path: the first file named `tool` in a directory of `PATH`,
/// or, for [`ROTEL_AGENT`], the binary of the `rotel` pip package.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            (tool == ROTEL_AGENT)
                .then(rotel_agent_path)
                .flatten()
                .filter(|p| p.is_file())
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rotel_spans_with_times_and_status() {
        // As rotel 0.x printed a span (only the leading log line dropped).
        let text = "ResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(x)
     -> process.pid: Int(42)
ScopeSpans #0
ScopeSpans SchemaURL: 
Span #0
    Trace ID       : 5b8efff798038103d269b633813fc60c
    Parent ID      : eee19b7ec3c1b173
    ID             : eee19b7ec3c1b174
    Name           : GET
    Kind           : SPAN_KIND_SERVER
Start time: 1544712660000000000
End time: 1544712661000000000
    Status code    : STATUS_CODE_ERROR
    Status message : boom
Attributes:
     -> a: Int(1)
Span #1
    Trace ID       : 5b8efff798038103d269b633813fc60c
    Parent ID      : 
    ID             : eee19b7ec3c1b173
    Name           : GET
    Kind           : SPAN_KIND_CLIENT
Start time: 1544712659000000000
End time: 1544712662000000000
    Status code    : STATUS_CODE_UNSET
    Status message : 
Attributes:
     -> url.full: Str(http://a/b)
";
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let spans = parse_rotel_spans(&lines);
        assert_eq!(spans.len(), 2);
        let s = &spans[0];
        assert_eq!(s.span_id, "eee19b7ec3c1b174");
        assert_eq!(s.parent_id, "eee19b7ec3c1b173");
        assert_eq!(s.kind, "SPAN_KIND_SERVER");
        assert_eq!(
            (s.start_ns, s.end_ns),
            (1_544_712_660_000_000_000, 1_544_712_661_000_000_000)
        );
        assert_eq!(
            (&*s.status_code, &*s.status_message),
            ("STATUS_CODE_ERROR", "boom")
        );
        assert_eq!(s.attributes["a"], "Int(1)");
        assert_eq!(s.resource["process.pid"], "Int(42)");
        let c = &spans[1];
        assert_eq!((&*c.parent_id, &*c.kind), ("", "SPAN_KIND_CLIENT"));
        assert_eq!(c.status_code, "STATUS_CODE_UNSET");
        assert_eq!(c.attributes["url.full"], "Str(http://a/b)");
        assert_eq!(c.resource["service.name"], "Str(x)");
    }
}
