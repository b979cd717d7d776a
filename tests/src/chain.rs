//! Real services for the HTTP tracing tests, all on loopback:
//!
//! ```text
//! client ──HTTP/HTTPS──▶ nginx ──HTTP──▶ middle.py ──HTTP──▶ leaf (Go)
//!                        (front)         (Python stdlib)     (net/http)
//! ```
//!
//! [`ServiceChain`] starts the three (fixtures in `tests/fixtures/http/`),
//! waits until a request goes through the whole chain over HTTP and HTTPS,
//! and kills every process of it (nginx's workers too) when dropped.
//! [`StaticNginx`] is nginx serving one small file (the benchmark's server);
//! [`RedisServer`] a throw-away `redis-server` (a protocol that is not HTTP).
//! [`HttpResponse`] and friends are a small HTTP/1.1 client for readiness
//! probes and for requests curl cannot make (several in one write).
//!
//! Every service runs in a process group of its own so that nothing it
//! forks outlives the guard. Readiness probes use a new connection each and
//! close it, so no connection between the services is left open from
//! before a test starts an agent.
//!
//! Test helpers panic on failure (with the service's log in the message).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{ChildGuard, free_port, target_dir, workspace_root};

/// How long a service may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `OTEL_SERVICE_NAME` of the Python middle service.
pub const MIDDLE_SERVICE: &str = "middle-python";
/// `OTEL_SERVICE_NAME` of the Go leaf service.
pub const LEAF_SERVICE: &str = "leaf-go";
/// nginx cannot be given `OTEL_SERVICE_NAME` (it clears its workers'
/// environment): its service name is its executable name.
pub const FRONT_SERVICE: &str = "nginx";

/// A file of `tests/fixtures/http/`.
pub fn http_fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures/http").join(name)
}

/// The Go leaf service, built once per test binary with Debian's Go into
/// the target's temp dir (its Go cache too: nothing is written elsewhere,
/// no module proxy is asked).
pub fn leaf_binary() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| go_build(&http_fixture("leaf.go"), "leaf", false))
}

/// Builds the Go program `source` into the target's temp dir as `name`
/// (with `-ldflags=-s -w`, no symbol table nor DWARF, when `stripped`), as
/// [`leaf_binary`] does; returns its path.
pub fn go_build(source: &Path, name: &str, stripped: bool) -> PathBuf {
    let dir = target_dir().join("tmp/http-fixtures");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let binary = dir.join(name);
    let partial = dir.join(format!("{name}.{}.partial", std::process::id()));
    let go = dir.join("go");
    let mut cmd = Command::new("go");
    cmd.arg("build");
    if stripped {
        cmd.arg("-ldflags=-s -w");
    }
    let output = cmd
        .arg("-o")
        .arg(&partial)
        .arg(source)
        .current_dir(&dir)
        .env("GOCACHE", go.join("cache"))
        .env("GOPATH", go.join("path"))
        .env("GOFLAGS", "")
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOENV", "off")
        .output()
        .unwrap_or_else(|e| panic!("running go build (is golang-go installed?): {e}"));
    assert!(
        output.status.success(),
        "go build {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &binary).unwrap_or_else(|e| panic!("renaming {partial:?}: {e}"));
    binary
}

/// A process group (one service) killed when dropped: SIGTERM to the whole
/// group, then SIGKILL to what is left, then a wait until every member is
/// gone.
struct Service {
    name: &'static str,
    child: ChildGuard,
    log: PathBuf,
}

impl Service {
    /// Spawns `cmd` as the leader of a new process group, its stdout and
    /// stderr into `log`.
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        Self {
            name,
            child: ChildGuard::spawn(cmd),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Panics (with the log) if the service has exited.
    fn assert_running(&mut self, extra_log: Option<&Path>) {
        if let Ok(Some(status)) = self.child.0.try_wait() {
            panic!(
                "{} exited during start-up ({status}); its log:\n{}",
                self.name,
                self.logs(extra_log)
            );
        }
    }

    fn logs(&self, extra_log: Option<&Path>) -> String {
        let mut text = read_lossy(&self.log);
        if let Some(extra) = extra_log {
            text.push_str(&format!("\n{}:\n{}", extra.display(), read_lossy(extra)));
        }
        text
    }

    /// Pids of the live processes of the group (zombies excluded).
    fn members(&self) -> Vec<u32> {
        let pgid = self.pid();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .filter(|&pid| process_group_of(pid) == Some(pgid) && process_alive(pid))
            .collect();
        pids.sort_unstable();
        pids
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let group = format!("-{}", self.pid());
        let kill = |signal: &str| {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        let wait_gone = |timeout: Duration| {
            let deadline = Instant::now() + timeout;
            while !self.members().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        kill("-TERM");
        wait_gone(Duration::from_secs(3));
        kill("-KILL");
        // Members that are not our children (nginx's workers) are reaped by
        // init: wait until they are gone too, so that ports and the kernel's
        // view of them are free for the next test.
        wait_gone(Duration::from_secs(5));
        let _ = self.child.0.wait();
    }
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // state ppid pgrp ...
    rest.split(' ').nth(2)?.parse().ok()
}

/// The state letter of `pid` (`Z` for a zombie), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Whether `pid` is alive (exists and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|s| s != 'Z')
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path).map_or_else(
        |e| format!("(cannot read {}: {e})", path.display()),
        |b| String::from_utf8_lossy(&b).into_owned(),
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// With [`ChainConfig::upstream_keepalive`]: how long nginx keeps an idle
/// upstream connection. The chain's own start-up check leaves one in the
/// pool; a test that needs the agent to see every upstream connection open
/// waits this long after starting it.
pub const UPSTREAM_IDLE_SECONDS: u64 = 1;

/// Options of [`ServiceChain`].
#[derive(Clone, Debug)]
pub struct ChainConfig {
    /// nginx `worker_processes`.
    pub nginx_workers: u32,
    /// The Python and Go services log every request (into their logs in the
    /// chain's directory).
    pub verbose: bool,
    /// nginx keeps a pool of upstream connections to the Python middle
    /// (`keepalive 8`) instead of one connection per request.
    pub upstream_keepalive: bool,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            nginx_workers: 1,
            verbose: false,
            upstream_keepalive: false,
        }
    }
}

/// nginx → Python → Go, running, on loopback. Dropping it kills all three.
pub struct ServiceChain {
    /// nginx's plain HTTP listener (the front).
    pub front_http_port: u16,
    /// nginx's HTTPS listener (self-signed certificate for `localhost`).
    pub front_https_port: u16,
    /// The Python middle service.
    pub python_port: u16,
    /// The Go leaf service.
    pub go_port: u16,
    /// nginx's master process.
    pub nginx_pid: u32,
    pub python_pid: u32,
    pub go_pid: u32,
    /// Where configs, certificate and logs are.
    pub dir: PathBuf,
    // Dropped in this order: the front first.
    nginx: Service,
    python: Service,
    go: Service,
}

impl ServiceChain {
    /// Starts the chain in `dir` (which must exist and outlive it) with the
    /// default options.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &ChainConfig::default())
    }

    /// Starts the Go leaf, the Python middle and nginx, each checked for
    /// readiness before the next; then checks one request through the
    /// whole chain over HTTP and one over HTTPS.
    pub fn start_with(dir: &Path, config: &ChainConfig) -> Self {
        let go_port = free_port();
        let mut go_cmd = Command::new(leaf_binary());
        go_cmd
            .arg("-listen")
            .arg(local(go_port).to_string())
            .env("OTEL_SERVICE_NAME", LEAF_SERVICE);
        if config.verbose {
            go_cmd.arg("-verbose");
        }
        let mut go = Service::spawn("the Go leaf", &mut go_cmd, dir.join("leaf.log"));
        wait_ready(&mut go, None, || {
            expect_ok(http_get(go_port, "/leaf/ready"), "leaf-go").map(drop)
        });

        let python_port = free_port();
        let mut py_cmd = Command::new("python3");
        py_cmd
            .arg("-u")
            .arg(http_fixture("middle.py"))
            .arg("--listen")
            .arg(local(python_port).to_string())
            .arg("--upstream")
            .arg(local(go_port).to_string())
            .env("OTEL_SERVICE_NAME", MIDDLE_SERVICE)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        if config.verbose {
            py_cmd.arg("--verbose");
        }
        let mut python = Service::spawn("the Python middle", &mut py_cmd, dir.join("middle.log"));
        wait_ready(&mut python, None, || {
            expect_ok(http_get(python_port, "/healthz"), "middle-python").map(drop)
        });

        make_certificate(dir);
        let (front_http_port, front_https_port) = (free_port(), free_port());
        let conf = render_nginx_conf(
            "nginx-chain.conf",
            dir,
            &[
                ("WORKERS", config.nginx_workers.to_string()),
                (
                    "UPSTREAM_BLOCK",
                    if config.upstream_keepalive {
                        format!(
                            "upstream middle {{ server 127.0.0.1:{python_port}; keepalive 8; \
                             keepalive_timeout {UPSTREAM_IDLE_SECONDS}s; }}"
                        )
                    } else {
                        String::new()
                    },
                ),
                (
                    "PROXY_TARGET",
                    if config.upstream_keepalive {
                        "middle".to_string()
                    } else {
                        format!("127.0.0.1:{python_port}")
                    },
                ),
                (
                    "UPSTREAM_CONNECTION",
                    if config.upstream_keepalive {
                        ""
                    } else {
                        "close"
                    }
                    .to_string(),
                ),
                ("MIDDLE_PORT", python_port.to_string()),
                ("HTTP_PORT", front_http_port.to_string()),
                ("HTTPS_PORT", front_https_port.to_string()),
            ],
        );
        let mut nginx = spawn_nginx(dir, &conf);
        let error_log = dir.join("error.log");
        wait_ready(&mut nginx, Some(&error_log), || {
            expect_ok(http_get(front_http_port, "/healthz"), "nginx → middle").map(drop)
        });

        let chain = Self {
            front_http_port,
            front_https_port,
            python_port,
            go_port,
            nginx_pid: nginx.pid(),
            python_pid: python.pid(),
            go_pid: go.pid(),
            dir: dir.to_path_buf(),
            nginx,
            python,
            go,
        };
        // The whole chain, over HTTP and HTTPS.
        let body = expect_ok(http_get(front_http_port, "/api/ready"), "the chain (HTTP)")
            .unwrap_or_else(|e| panic!("{e}\n{}", chain.logs()));
        assert_eq!(
            body.body,
            b"{\"id\":\"ready\",\"service\":\"leaf-go\"}\n",
            "the chain answered something else\n{}",
            chain.logs()
        );
        let https = Command::new("curl")
            .args(["-sSk", "--max-time", "10"])
            .arg(format!("https://localhost:{front_https_port}/api/ready"))
            .output()
            .unwrap_or_else(|e| panic!("running curl (is it installed?): {e}"));
        assert!(
            https.status.success() && https.stdout == body.body,
            "the chain over HTTPS failed: curl said {:?} / {:?}\n{}",
            String::from_utf8_lossy(&https.stdout),
            String::from_utf8_lossy(&https.stderr),
            chain.logs()
        );
        chain
    }

    /// `http://127.0.0.1:<front>` + `path`.
    pub fn front_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.front_http_port)
    }

    /// `https://localhost:<front https>` + `path`.
    pub fn front_https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.front_https_port)
    }

    /// nginx's master and worker pids (read now).
    pub fn nginx_pids(&self) -> Vec<u32> {
        self.nginx.members()
    }

    /// Every pid of the chain (read now), with its service name as the
    /// agent should report it.
    pub fn pids(&self) -> BTreeMap<u32, &'static str> {
        let mut pids: BTreeMap<u32, &'static str> = self
            .nginx_pids()
            .into_iter()
            .map(|p| (p, FRONT_SERVICE))
            .collect();
        pids.extend(
            self.python
                .members()
                .into_iter()
                .map(|p| (p, MIDDLE_SERVICE)),
        );
        pids.extend(self.go.members().into_iter().map(|p| (p, LEAF_SERVICE)));
        pids
    }

    /// The logs of all three services, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- nginx error.log:\n{}\n--- middle.log:\n{}\n--- leaf.log:\n{}",
            read_lossy(&self.dir.join("error.log")),
            read_lossy(&self.python.log),
            read_lossy(&self.go.log),
        )
    }
}

/// nginx serving `body` as `/index.txt` (and nothing else), with keep-alive
/// and `sendfile on`: the tracing benchmark's server. Dropped: killed.
pub struct StaticNginx {
    pub port: u16,
    /// The master process.
    pub pid: u32,
    nginx: Service,
}

impl StaticNginx {
    /// The worker process (the first child of the master): the one that
    /// serves (started with one worker).
    pub fn worker_pid(&self) -> u32 {
        let path = format!("/proc/{0}/task/{0}/children", self.pid);
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let children = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                return pid;
            }
            assert!(
                std::time::Instant::now() < end,
                "nginx {} has no worker",
                self.pid
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn start(dir: &Path, body: &[u8], workers: u32) -> Self {
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap_or_else(|e| panic!("{}: {e}", www.display()));
        std::fs::write(www.join("index.txt"), body).unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let conf = render_nginx_conf(
            "nginx-static.conf",
            dir,
            &[
                ("WORKERS", workers.to_string()),
                ("HTTP_PORT", port.to_string()),
            ],
        );
        let mut nginx = spawn_nginx(dir, &conf);
        let error_log = dir.join("error.log");
        wait_ready(&mut nginx, Some(&error_log), || {
            let r = expect_ok(http_get(port, "/index.txt"), "static nginx")?;
            if r.body == body {
                Ok(())
            } else {
                Err(format!("static nginx served {} other bytes", r.body.len()))
            }
        });
        Self {
            port,
            pid: nginx.pid(),
            nginx,
        }
    }

    /// Master and worker pids (read now).
    pub fn pids(&self) -> Vec<u32> {
        self.nginx.members()
    }
}

/// A `redis-server` on loopback without persistence. Dropped: killed.
pub struct RedisServer {
    pub port: u16,
    pub pid: u32,
    _server: Service,
}

impl RedisServer {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let data = dir.join("redis");
        std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        let mut server = Service::spawn(
            "redis-server",
            Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&data),
            dir.join("redis.log"),
        );
        wait_ready(&mut server, None, || {
            let mut s = TcpStream::connect_timeout(&local(port), Duration::from_millis(500))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .map_err(|e| e.to_string())?;
            s.write_all(b"*1\r\n$4\r\nPING\r\n")
                .map_err(|e| e.to_string())?;
            let mut reply = [0u8; 7];
            s.read_exact(&mut reply).map_err(|e| e.to_string())?;
            if &reply == b"+PONG\r\n" {
                Ok(())
            } else {
                Err(format!(
                    "PING answered {:?}",
                    String::from_utf8_lossy(&reply)
                ))
            }
        });
        Self {
            port,
            pid: server.pid(),
            _server: server,
        }
    }
}

/// Polls `probe` until it succeeds; panics with the service's log when the
/// service exits or `READY_TIMEOUT` passes.
fn wait_ready(
    service: &mut Service,
    extra_log: Option<&Path>,
    mut probe: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        service.assert_running(extra_log);
        let last = match probe() {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{} not ready after {READY_TIMEOUT:?}: {last}; its log:\n{}",
            service.name,
            service.logs(extra_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expect_ok(response: std::io::Result<HttpResponse>, what: &str) -> Result<HttpResponse, String> {
    match response {
        Ok(r) if r.status == 200 => Ok(r),
        Ok(r) => Err(format!(
            "{what} answered {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Writes `<dir>/nginx.conf` from `tests/fixtures/http/<template>`,
/// replacing `@DIR@` and every `@NAME@` of `values`; creates nginx's temp
/// dirs. Returns the config's path.
fn render_nginx_conf(template: &str, dir: &Path, values: &[(&str, String)]) -> PathBuf {
    let path = http_fixture(template);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dir_str = dir
        .to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", dir.display()));
    text = text.replace("@DIR@", dir_str);
    for (name, value) in values {
        text = text.replace(&format!("@{name}@"), value);
    }
    let unfilled: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('@'))
        .collect();
    assert!(
        unfilled.is_empty(),
        "{template}: placeholders left unfilled: {unfilled:?}"
    );
    for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap_or_else(|e| panic!("{e}"));
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, text).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    conf
}

fn spawn_nginx(dir: &Path, conf: &Path) -> Service {
    Service::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off;"]),
        dir.join("nginx.out"),
    )
}

/// A self-signed certificate for `localhost` / 127.0.0.1, made with
/// `openssl req`: `<dir>/cert.pem`, `<dir>/key.pem`.
fn make_certificate(dir: &Path) {
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap_or_else(|e| panic!("running openssl (is it installed?): {e}"));
    assert!(
        output.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One HTTP/1.x response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header lines in order, as received (name, value).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(invalid(format!(
            "line not ended by CRLF: {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|e| invalid(e.to_string()))
}

/// Reads one response from `reader`: its body by `Content-Length`, chunked
/// encoding, or (neither: `Connection: close`) up to the end of the stream.
/// `head_request`: the response to a HEAD has no body.
pub fn read_response(
    reader: &mut impl BufRead,
    head_request: bool,
) -> std::io::Result<HttpResponse> {
    let status_line = read_line(reader)?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
        chunked: false,
    };
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(response);
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        response.chunked = true;
        loop {
            let line = read_line(reader)?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(reader)?.is_empty() {}
                break;
            }
            let start = response.body.len();
            response.body.resize(start + size, 0);
            reader.read_exact(&mut response.body[start..])?;
            if !read_line(reader)?.is_empty() {
                return Err(invalid("chunk not followed by CRLF".into()));
            }
        }
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid(format!("bad Content-Length {length:?}")))?;
        response.body.resize(length, 0);
        reader.read_exact(&mut response.body)?;
    } else {
        reader.read_to_end(&mut response.body)?;
    }
    Ok(response)
}

/// Connects to 127.0.0.1:`port` (10 s timeouts), writes `request` in one
/// write and reads `count` responses from the same connection.
pub fn http_exchange(
    port: u16,
    request: &[u8],
    count: usize,
) -> std::io::Result<Vec<HttpResponse>> {
    let stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(request)?;
    let mut reader = BufReader::new(&stream);
    (0..count)
        .map(|_| read_response(&mut reader, false))
        .collect()
}

/// `GET path` on a new connection (`Connection: close`).
pub fn http_get(port: u16, path: &str) -> std::io::Result<HttpResponse> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    let mut responses = http_exchange(port, request.as_bytes(), 1)?;
    responses.pop().ok_or_else(|| invalid("no response".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pipelined_responses_of_every_framing() {
        let wire = concat!(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n",
            "3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n",
            "HTTP/1.0 500 Oops\r\nConnection: close\r\n\r\nrest of stream",
        );
        let mut reader = BufReader::new(wire.as_bytes());
        let a = read_response(&mut reader, false).unwrap();
        assert_eq!(
            (a.status, &a.body[..], a.chunked),
            (200, &b"hello"[..], false)
        );
        assert_eq!(a.header("x-a"), Some("b"));
        let b = read_response(&mut reader, false).unwrap();
        assert_eq!(
            (b.status, &b.body[..], b.chunked),
            (404, &b"abcde"[..], true)
        );
        let c = read_response(&mut reader, false).unwrap();
        assert_eq!((c.status, &c.body[..]), (500, &b"rest of stream"[..]));
    }

    #[test]
    fn rejects_malformed_responses() {
        for wire in [
            "HTTP/2 200\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 0\n\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        ] {
            let mut reader = BufReader::new(wire.as_bytes());
            assert!(read_response(&mut reader, false).is_err(), "{wire:?}");
        }
    }
}
