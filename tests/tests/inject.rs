//! `traceparent` injection (`sock_ops` + SOCKHASH + `sk_msg`) on the real
//! kernel, with real processes: Python's `http.client` and `curl` as
//! clients, a Python server that records the exact bytes it receives.
//!
//! Every test loads BPF and so holds a `KernelTest` (the kernel lock);
//! without root/BPF they skip with a printed reason, and under `CI=true`
//! they fail instead.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, PerCpuArray},
    programs::{SkMsg, SockOps},
};
use fathom_agent::{ebpf::http_object, traces::inject};
use fathom_common::http::{
    HttpCounter, Serving, TRACEPARENT_HEADER_LEN, TraceContext, ctx_flags, globals, names,
    parse_traceparent,
};
use fathom_tests::*;
use serde_json::{Value, json};

/// The tools every test here runs.
const TOOLS: &[&str] = &["curl", "bpftool"];

/// `inject::attach`'s `keep_alive`: every request of a connection (the
/// default), or only the first (the fallback where the kernel refuses the
/// stream verdict program).
const KEEP_ALIVE: bool = true;
const FIRST_REQUEST: bool = false;

/// The `fathom-http` object with injection on and the PID filter on.
fn load() -> Ebpf {
    EbpfLoader::new()
        .override_global(globals::INJECT, &1u8, true)
        .override_global(globals::FILTER_PIDS, &1u8, true)
        .load(http_object().unwrap())
        .unwrap()
}

fn monitor(ebpf: &mut Ebpf, pid: u32) {
    let mut map: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(ebpf.map_mut(names::MONITORED).unwrap()).unwrap();
    map.insert(pid, 1, 0).unwrap();
}

fn counter(ebpf: &Ebpf, c: HttpCounter) -> u64 {
    let map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map(names::COUNTERS).unwrap()).unwrap();
    map.get(&(c as u32), 0).unwrap().iter().sum()
}

/// The injection counters, in `HttpCounter` order from `Injected` on:
/// injected, skipped (existing), skipped (no line), failed, sockets added,
/// parents rewritten, sockets released.
fn inject_counters(ebpf: &Ebpf) -> [u64; 7] {
    [
        HttpCounter::Injected,
        HttpCounter::InjectSkippedExisting,
        HttpCounter::InjectSkippedNoLine,
        HttpCounter::InjectFailed,
        HttpCounter::SocketsAdded,
        HttpCounter::ParentRewritten,
        HttpCounter::SocketsReleased,
    ]
    .map(|c| counter(ebpf, c))
}

fn injected(ebpf: &Ebpf, tid: u32) -> Option<TraceContext> {
    let map: BpfHashMap<_, u32, TraceContext> =
        BpfHashMap::try_from(ebpf.map("INJECTED").unwrap()).unwrap();
    map.get(&tid, 0).ok()
}

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// `http_record_server.py`: records each request (or connection) it gets.
struct Server {
    _child: ChildGuard,
    port: u16,
    dir: PathBuf,
    seen: usize,
}

impl Server {
    fn start(mode: &str, dir: &Path) -> Self {
        let dir = dir.join(format!("server-{mode}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = ChildGuard::spawn(
            Command::new("python3")
                .arg(fixture("http_record_server.py"))
                .arg(mode)
                .arg(&dir)
                .stdout(Stdio::piped()),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("server said {line:?}"));
        Self {
            _child: child,
            port,
            dir,
            seen: 0,
        }
    }

    /// The next recorded request (or connection) in arrival order.
    fn next(&mut self) -> Vec<u8> {
        let path = self.dir.join(format!("{:04}.bin", self.seen + 1));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(Instant::now() < deadline, "server recorded nothing more");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.seen += 1;
        std::fs::read(path).unwrap()
    }
}

/// `http_inject_client.py`, driven command by command.
struct Client {
    _child: ChildGuard,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    tid: u32,
}

impl Client {
    fn start() -> Self {
        let mut child = ChildGuard::spawn(
            Command::new("python3")
                .arg(fixture("http_inject_client.py"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        );
        let stdin = child.0.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        let hello = read_json(&mut stdout);
        let pid = hello["pid"].as_u64().unwrap() as u32;
        let tid = hello["tid"].as_u64().unwrap() as u32;
        assert_eq!(pid, child.pid());
        Self {
            _child: child,
            stdin,
            stdout,
            pid,
            tid,
        }
    }

    fn cmd(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let reply = read_json(&mut self.stdout);
        assert_eq!(reply["ok"], true, "client failed {cmd}: {reply}");
        reply
    }

    /// Closes the kept-alive connection (if any) and opens a new one, which
    /// `injection` sees enter `CLIENT_SOCKETS` when the client is monitored
    /// (`in_sockhash`).
    fn reconnect(&mut self, port: u16, injection: &inject::Injection, in_sockhash: usize) {
        self.cmd(json!({"op": "close"}));
        self.cmd(json!({"op": "connect", "port": port}));
        wait_sockets(injection, in_sockhash);
    }

    /// One request on the kept-alive connection; returns the bytes
    /// http.client wrote.
    fn request(
        &mut self,
        dir: &Path,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Vec<u8> {
        let sent_file = dir.join("sent.bin");
        let body_file = body.map(|b| {
            let f = dir.join("body.bin");
            std::fs::write(&f, b).unwrap();
            f
        });
        let reply = self.cmd(json!({
            "op": "request", "method": method, "path": path,
            "headers": headers.iter().map(|(n, v)| [n, v]).collect::<Vec<_>>(),
            "body_file": body_file, "sent_file": sent_file,
        }));
        assert_eq!(reply["status"], 200);
        std::fs::read(sent_file).unwrap()
    }
}

fn read_json(r: &mut impl std::io::BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Checks that `received` is `sent` with exactly one
/// `traceparent: 00-<32 hex>-<16 hex>-01\r\n` line right after the request
/// line, and returns its trace and span ids.
fn assert_injected(received: &[u8], sent: &[u8]) -> ([u8; 16], [u8; 8]) {
    let line_end = received
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("no request line")
        + 2;
    let header = &received[line_end..(line_end + TRACEPARENT_HEADER_LEN).min(received.len())];
    let header_text = String::from_utf8_lossy(header);
    assert!(
        header.len() == TRACEPARENT_HEADER_LEN
            && header.starts_with(b"traceparent: 00-")
            && header.ends_with(b"-01\r\n"),
        "no traceparent line after the request line: {:?}",
        String::from_utf8_lossy(&received[..received.len().min(400)])
    );
    let value = &header[13..TRACEPARENT_HEADER_LEN - 2];
    assert!(
        value
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c) || *c == b'-'),
        "not lower-case hex: {header_text}"
    );
    let (trace, span, flags) = parse_traceparent(value)
        .unwrap_or_else(|| panic!("invalid traceparent value: {header_text}"));
    assert_eq!(flags, 1);
    let mut rest = received[..line_end].to_vec();
    rest.extend_from_slice(&received[line_end + TRACEPARENT_HEADER_LEN..]);
    assert!(
        rest == sent,
        "apart from the header, the bytes differ from those sent (received {} bytes, sent {})",
        received.len(),
        sent.len()
    );
    let head_end = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(rest.len());
    assert!(
        !rest[..head_end]
            .to_ascii_lowercase()
            .windows(13)
            .any(|w| w == b"\ntraceparent:"),
        "a second traceparent header"
    );
    (trace, span)
}

fn assert_context(
    ebpf: &Ebpf,
    tid: u32,
    (trace, span): ([u8; 16], [u8; 8]),
    parent: [u8; 8],
    flags: u8,
) {
    let ctx = injected(ebpf, tid).expect("no INJECTED entry for the client's thread");
    assert_eq!(
        ctx,
        TraceContext {
            trace_id: trace,
            span_id: span,
            parent_span_id: parent,
            flags,
            _reserved: [0; 7],
        }
    );
}

/// Waits until `CLIENT_SOCKETS` holds `n` sockets.
fn wait_sockets(injection: &inject::Injection, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = injection.socket_cookies().unwrap().len();
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CLIENT_SOCKETS holds {now} sockets, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn python_client_requests_get_one_traceparent() {
    let Some(_kernel) = KernelTest::with_tools("python_client_requests_get_one_traceparent", TOOLS)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let mut server = Server::start("http", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);

    client.cmd(json!({"op": "connect", "port": server.port}));
    wait_sockets(&injection, 1);
    assert_eq!(inject_counters(&ebpf), [0, 0, 0, 0, 1, 0, 0]);

    // Headers and a body that itself looks like a request head.
    let body = b"hello, body\r\n\r\nGET / HTTP/1.1\r\ntraceparent: x\r\n\r\n";
    let headers = [("X-Test", "1"), ("Content-Type", "text/plain")];
    let sent = client.request(dir.path(), "POST", "/first", &headers, Some(body));
    let first = assert_injected(&server.next(), &sent);
    assert_context(&ebpf, client.tid, first, [0; 8], ctx_flags::CLIENT_INJECTED);
    // The request was acknowledged before its response arrived: the socket
    // left the sockhash before the client read.
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [1, 0, 0, 0, 1, 0, 1]);

    // Keep-alive: the second request on the same socket passes untouched.
    let sent = client.request(dir.path(), "GET", "/second", &[], None);
    assert!(
        server.next() == sent,
        "the second request on a connection changed"
    );
    assert_eq!(inject_counters(&ebpf), [1, 0, 0, 0, 1, 0, 1]);
    assert_context(&ebpf, client.tid, first, [0; 8], ctx_flags::CLIENT_INJECTED);

    // A new connection: its first request is injected, in a new trace.
    client.reconnect(server.port, &injection, 1);
    let sent = client.request(dir.path(), "GET", "/second-conn", &[], None);
    let second = assert_injected(&server.next(), &sent);
    assert_context(
        &ebpf,
        client.tid,
        second,
        [0; 8],
        ctx_flags::CLIENT_INJECTED,
    );
    assert_ne!(
        first.0, second.0,
        "a new trace for a thread serving nothing"
    );
    assert_ne!(first.1, second.1);
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [2, 0, 0, 0, 2, 0, 2]);

    // An instrumented app's own traceparent (any case) is left alone.
    client.reconnect(server.port, &injection, 1);
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let sent = client.request(dir.path(), "GET", "/third", &[("TraceParent", own)], None);
    assert!(
        server.next() == sent,
        "a request with a traceparent changed"
    );
    assert_eq!(inject_counters(&ebpf), [2, 1, 0, 0, 3, 0, 3]);
    assert_context(
        &ebpf,
        client.tid,
        second,
        [0; 8],
        ctx_flags::CLIENT_INJECTED,
    );

    // 1 MiB of body: several sk_msg runs, one header; the socket leaves the
    // sockhash while the body is still being written.
    client.reconnect(server.port, &injection, 1);
    let big = pseudo_random(1 << 20, 0x5eed);
    let sent = client.request(dir.path(), "POST", "/big", &[], Some(&big));
    let received = server.next();
    assert_eq!(received.len(), sent.len() + TRACEPARENT_HEADER_LEN);
    let third = assert_injected(&received, &sent);
    assert_context(&ebpf, client.tid, third, [0; 8], ctx_flags::CLIENT_INJECTED);
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [3, 1, 0, 0, 4, 0, 4]);

    // A socket closed before it sent anything leaves the sockhash by
    // itself (not counted as released).
    client.reconnect(server.port, &injection, 1);
    client.cmd(json!({"op": "close"}));
    wait_sockets(&injection, 0);
    assert_eq!(inject_counters(&ebpf), [3, 1, 0, 0, 5, 0, 4]);
    client.cmd(json!({"op": "exit"}));
}

#[test]
fn curl_request_is_injected() {
    let Some(_kernel) = KernelTest::with_tools("curl_request_is_injected", TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let _injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let mut server = Server::start("http", dir.path());
    let body_file = dir.path().join("curl-body");
    std::fs::write(&body_file, pseudo_random(3000, 42)).unwrap();
    let url = format!("http://127.0.0.1:{}/curl?q=1", server.port);
    // curl waits for a line on stdin (the shell's `read`), so that its pid
    // is monitored before it connects.
    let curl = |monitored: Option<&mut Ebpf>| {
        let mut sh = ChildGuard::spawn(
            Command::new("sh")
                .arg("-c")
                .arg(r#"read go && exec curl -sS --fail -o /dev/null -H 'X-Curl: yes' -H 'Expect:' --data-binary @"$0" "$1""#)
                .arg(&body_file)
                .arg(&url)
                .stdin(Stdio::piped()),
        );
        if let Some(ebpf) = monitored {
            monitor(ebpf, sh.pid());
        }
        let pid = sh.pid();
        writeln!(sh.0.stdin.take().unwrap(), "go").unwrap();
        assert!(sh.wait_timeout(Duration::from_secs(20)).success());
        pid
    };
    // Unmonitored: the bytes curl sends, untouched.
    curl(None);
    let baseline = server.next();
    assert_eq!(inject_counters(&ebpf), [0; 7]);
    let pid = curl(Some(&mut ebpf));
    let ids = assert_injected(&server.next(), &baseline);
    // curl writes from its main thread.
    assert_context(&ebpf, pid, ids, [0; 8], ctx_flags::CLIENT_INJECTED);
    // curl's socket left the sockhash once its request was acknowledged.
    assert_eq!(inject_counters(&ebpf), [1, 0, 0, 0, 1, 0, 1]);
}

#[test]
fn unmonitored_and_non_http_pass_untouched() {
    let Some(_kernel) = KernelTest::with_tools("unmonitored_and_non_http_pass_untouched", TOOLS)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let mut http = Server::start("http", dir.path());
    let mut raw = Server::start("raw", dir.path());

    // A process that is not monitored: its sockets never enter the sockhash.
    let mut other = Client::start();
    other.cmd(json!({"op": "connect", "port": http.port}));
    let sent = other.request(dir.path(), "POST", "/x", &[("A", "b")], Some(b"body"));
    assert!(http.next() == sent);
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [0; 7]);
    other.cmd(json!({"op": "exit"}));

    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);
    let mut raw_send = |chunks: &[&[u8]]| {
        client.cmd(json!({
            "op": "raw", "port": raw.port, "pause_ms": 50,
            "chunks": chunks.iter().map(|c| hex(c)).collect::<Vec<_>>(),
        }));
        let received = raw.next();
        assert!(
            received == chunks.concat(),
            "non-HTTP bytes changed: {:?}",
            String::from_utf8_lossy(&received[..received.len().min(200)])
        );
    };
    // Each connection's socket leaves the sockhash when its data is
    // acknowledged (the client waits for that before closing).
    // Redis inline commands: a method and a space, but no HTTP/1.x line.
    raw_send(&[b"GET foo\r\n"]);
    raw_send(&[b"GET some:much:longer:key:name\r\nSET a b\r\n\r\n\r\n"]);
    // Binary, also binary that starts like a request.
    raw_send(&[&pseudo_random(65536, 7)]);
    let mut tricky = b"POST /".to_vec();
    tricky.extend(pseudo_random(8192, 8));
    raw_send(&[&tricky]);
    // A bare LF ends the request line: not touched.
    raw_send(&[b"GET / HTTP/1.1\nHost: x\r\n\r\n"]);
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [0, 0, 0, 0, 5, 0, 5]);

    // A head written in two sends, and (on its own connection: only a
    // connection's first request is inspected) a request line longer than
    // the inspected bytes: skipped and counted.
    let split: [&[u8]; 2] = [
        b"POST /split HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n",
        b"\r\nabc",
    ];
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(5000));
    client.cmd(json!({
        "op": "raw_http", "port": http.port, "pause_ms": 50,
        "requests": [[hex(split[0]), hex(split[1])]],
    }));
    assert!(http.next() == split.concat());
    assert_eq!(inject_counters(&ebpf), [0, 0, 1, 0, 6, 0, 6]);
    client.cmd(json!({
        "op": "raw_http", "port": http.port,
        "requests": [[hex(long.as_bytes())]],
    }));
    assert!(http.next() == long.as_bytes());
    assert_eq!(inject_counters(&ebpf), [0, 0, 2, 0, 7, 0, 7]);

    // Requests written by hand: exact bytes; keep-alive, whose second
    // request passes untouched; a long head, first on a new connection.
    let first = b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi".to_vec();
    let mut second = format!(
        "DELETE /b HTTP/1.0\r\nHost: x\r\nX-Long: {}\r\n",
        "v".repeat(3000)
    );
    second.push_str("Content-Length: 0\r\n\r\n");
    client.cmd(json!({
        "op": "raw_http", "port": http.port,
        "requests": [[hex(&first)], [hex(second.as_bytes())]],
    }));
    let a = assert_injected(&http.next(), &first);
    assert!(
        http.next() == second.as_bytes(),
        "the second request on a connection changed"
    );
    assert_context(&ebpf, client.tid, a, [0; 8], ctx_flags::CLIENT_INJECTED);
    assert_eq!(inject_counters(&ebpf), [1, 0, 2, 0, 8, 0, 8]);
    client.cmd(json!({
        "op": "raw_http", "port": http.port,
        "requests": [[hex(second.as_bytes())]],
    }));
    let b = assert_injected(&http.next(), second.as_bytes());
    assert_context(&ebpf, client.tid, b, [0; 8], ctx_flags::CLIENT_INJECTED);
    assert_ne!(a, b);
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    assert_eq!(inject_counters(&ebpf), [2, 0, 2, 0, 9, 0, 9]);
    client.cmd(json!({"op": "exit"}));
}

/// Makes thread `tid` serve a request (what the capture program does on a
/// server read).
fn set_serving(ebpf: &mut Ebpf, tid: u32, ctx: TraceContext, open: u32, later_reads: u32) {
    let mut map: BpfHashMap<_, u32, Serving> =
        BpfHashMap::try_from(ebpf.map_mut(names::SERVING).unwrap()).unwrap();
    let value = Serving {
        ctx,
        conn_id: 77,
        open,
        later_reads,
        read_ns: 0,
    };
    map.insert(tid, value, 0).unwrap();
}

/// A server request without a `traceparent`: its own trace and span.
fn server_ctx(trace: [u8; 16], span: [u8; 8]) -> TraceContext {
    TraceContext {
        trace_id: trace,
        span_id: span,
        flags: ctx_flags::SERVER,
        ..TraceContext::default()
    }
}

#[test]
fn serving_thread_lends_its_trace() {
    let Some(_kernel) = KernelTest::with_tools("serving_thread_lends_its_trace", TOOLS) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let mut server = Server::start("http", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);
    client.cmd(json!({"op": "connect", "port": server.port}));
    wait_sockets(&injection, 1);

    let trace: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
    let server_span: [u8; 8] = *b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7";

    // One server request open on the thread: its trace, its span as parent.
    set_serving(&mut ebpf, client.tid, server_ctx(trace, server_span), 1, 0);
    let sent = client.request(dir.path(), "GET", "/child", &[], None);
    let ids = assert_injected(&server.next(), &sent);
    assert_eq!(ids.0, trace);
    assert_ne!(ids.1, server_span);
    assert_context(
        &ebpf,
        client.tid,
        ids,
        server_span,
        ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
    );

    // Two open, and the thread read another connection since the latest:
    // no parent is guessed (a new connection: only the first request of one
    // is injected; the thread's state is set before it connects, which
    // `fathom_connect_parent` records).
    set_serving(&mut ebpf, client.tid, server_ctx(trace, server_span), 2, 1);
    client.reconnect(server.port, &injection, 1);
    let sent = client.request(dir.path(), "GET", "/orphan", &[], None);
    let ids = assert_injected(&server.next(), &sent);
    assert_ne!(ids.0, trace);
    assert_context(&ebpf, client.tid, ids, [0; 8], ctx_flags::CLIENT_INJECTED);
    assert_eq!(inject_counters(&ebpf), [2, 0, 0, 0, 2, 0, 2]);

    // Two open, nothing read since the latest (an event loop's handler
    // calling out from the callback that read its request): that one is
    // the parent, counted as a guess.
    set_serving(&mut ebpf, client.tid, server_ctx(trace, server_span), 2, 0);
    client.reconnect(server.port, &injection, 1);
    let sent = client.request(dir.path(), "GET", "/guessed", &[], None);
    let ids = assert_injected(&server.next(), &sent);
    assert_eq!(ids.0, trace);
    let parented = ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT;
    assert_context(&ebpf, client.tid, ids, server_span, parented);

    // A connection opened while the thread served one request, whose first
    // request is written once the thread has moved on (several open, other
    // reads since): the parent is the one of the connect.
    set_serving(&mut ebpf, client.tid, server_ctx(trace, server_span), 1, 0);
    client.reconnect(server.port, &injection, 1);
    set_serving(&mut ebpf, client.tid, server_ctx([7; 16], [8; 8]), 3, 2);
    let sent = client.request(dir.path(), "GET", "/connected", &[], None);
    let ids = assert_injected(&server.next(), &sent);
    assert_eq!(ids.0, trace);
    assert_context(&ebpf, client.tid, ids, server_span, parented);
    assert_eq!(
        [
            HttpCounter::ParentThread,
            HttpCounter::ParentGuessed,
            HttpCounter::ParentMissed,
        ]
        .map(|c| counter(&ebpf, c)),
        [2, 1, 1]
    );
    client.cmd(json!({"op": "exit"}));
}

/// Checks that `received` is `sent` with only the parent-id field of the
/// `traceparent` value `forwarded` (which `sent` holds once) replaced by
/// 16 other lower-case hex digits, and returns them as the new span id.
fn assert_parent_rewritten(received: &[u8], sent: &[u8], forwarded: &str) -> [u8; 8] {
    let at = sent
        .windows(forwarded.len())
        .position(|w| w == forwarded.as_bytes())
        .expect("the forwarded traceparent is not in the sent bytes");
    assert_eq!(
        received.len(),
        sent.len(),
        "the rewritten request changed length"
    );
    let field = at + 36..at + 52;
    let mut restored = received.to_vec();
    restored[field.clone()].copy_from_slice(&sent[field.clone()]);
    assert!(
        restored == sent,
        "bytes other than the parent id differ: {:?}",
        String::from_utf8_lossy(&received[..received.len().min(400)])
    );
    let value = &received[at..at + forwarded.len()];
    let (trace, parent, flags) = parse_traceparent(value).unwrap_or_else(|| {
        panic!(
            "invalid rewritten traceparent {:?}",
            String::from_utf8_lossy(value)
        )
    });
    let (old_trace, old_parent, old_flags) = parse_traceparent(forwarded.as_bytes()).unwrap();
    assert_eq!((trace, flags), (old_trace, old_flags));
    assert_ne!(parent, old_parent, "the parent id was not rewritten");
    assert_eq!(hex(&parent).as_bytes(), &received[field]);
    parent
}

#[test]
fn forwarded_traceparent_gets_this_hops_parent() {
    let Some(_kernel) =
        KernelTest::with_tools("forwarded_traceparent_gets_this_hops_parent", TOOLS)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let mut server = Server::start("http", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);

    // The thread serves a request that came with `traceparent`
    // 00-{trace}-{upstream}-00; its server span is `server_span`.
    let trace: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
    let upstream: [u8; 8] = *b"\x1d\x2c\x3b\x4a\x59\x68\x77\x86";
    let server_span: [u8; 8] = *b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7";
    let serving = TraceContext {
        trace_id: trace,
        span_id: server_span,
        parent_span_id: upstream,
        flags: ctx_flags::SERVER | ctx_flags::REMOTE_PARENT,
        _reserved: [0; 7],
    };
    set_serving(&mut ebpf, client.tid, serving, 1, 0);
    let forwarded = format!("00-{}-{}-00", hex(&trace), hex(&upstream));

    // A proxy forwarding the header it got: the parent id becomes this
    // hop's client span, child of the server span.
    client.cmd(json!({"op": "connect", "port": server.port}));
    wait_sockets(&injection, 1);
    let headers = [
        ("X-Before", "1"),
        ("traceparent", forwarded.as_str()),
        ("X-After", "2"),
    ];
    let sent = client.request(dir.path(), "GET", "/forwarded", &headers, None);
    let span = assert_parent_rewritten(&server.next(), &sent, &forwarded);
    assert_ne!(span, server_span);
    assert_context(
        &ebpf,
        client.tid,
        (trace, span),
        server_span,
        ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
    );
    assert_eq!(inject_counters(&ebpf), [0, 0, 0, 0, 1, 1, 1]);

    // Written by hand, no space after the colon: the same.
    let raw = format!("GET /raw HTTP/1.1\r\nHost: x\r\ntraceparent:{forwarded}\r\n\r\n");
    client.cmd(json!({
        "op": "raw_http", "port": server.port, "requests": [[hex(raw.as_bytes())]],
    }));
    let span2 = assert_parent_rewritten(&server.next(), raw.as_bytes(), &forwarded);
    assert_ne!(span2, span);
    assert_context(
        &ebpf,
        client.tid,
        (trace, span2),
        server_span,
        ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
    );
    assert_eq!(inject_counters(&ebpf), [0, 0, 0, 0, 2, 2, 2]);

    // Any other traceparent is the application's own: left alone, also
    // when only its parent id or only its trace id differs.
    let other_parent = format!("00-{}-{}-00", hex(&trace), hex(&server_span));
    let mut other_trace_id = trace;
    other_trace_id[15] ^= 1;
    let other_trace = format!("00-{}-{}-00", hex(&other_trace_id), hex(&upstream));
    for (i, other) in [other_parent, other_trace].iter().enumerate() {
        client.reconnect(server.port, &injection, 1);
        let sent = client.request(
            dir.path(),
            "GET",
            "/own",
            &[("traceparent", other.as_str())],
            None,
        );
        assert!(
            server.next() == sent,
            "a request with another traceparent changed"
        );
        let n = i as u64 + 1;
        assert_eq!(inject_counters(&ebpf), [0, n, 0, 0, 2 + n, 2, 2 + n]);
        assert_context(
            &ebpf,
            client.tid,
            (trace, span2),
            server_span,
            ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
        );
    }
    client.cmd(json!({"op": "exit"}));
}

#[test]
fn fionread_counts_the_response_of_a_monitored_client() {
    let Some(_kernel) =
        KernelTest::with_tools("fionread_counts_the_response_of_a_monitored_client", TOOLS)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let _injection = inject::attach(&mut ebpf, KEEP_ALIVE).unwrap();
    let mut server = Server::start("http", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);

    // Readers such as nginx size their read by FIONREAD once the socket is
    // readable; in a sockhash without a verdict program it answers 0.
    // Keep-alive: three requests on one connection, each injected, each
    // response counted by FIONREAD before it is read.
    let request = b"GET /fionread HTTP/1.1\r\nHost: x\r\n\r\n";
    let reply = client.cmd(json!({
        "op": "fionread", "port": server.port, "request": hex(request), "repeat": 3,
    }));
    let responses = reply["responses"].as_array().unwrap();
    let fionreads = reply["fionreads"].as_array().unwrap();
    assert_eq!(responses.len(), 3);
    let mut traces = Vec::new();
    for (response, fionread) in responses.iter().zip(fionreads) {
        let response = unhex(response.as_str().unwrap());
        assert_eq!(response, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(fionread.as_u64(), Some(response.len() as u64), "{reply}");
        let ids = assert_injected(&server.next(), request);
        traces.push(ids);
    }
    assert_context(
        &ebpf,
        client.tid,
        traces[2],
        [0; 8],
        ctx_flags::CLIENT_INJECTED,
    );
    assert_eq!(inject_counters(&ebpf), [3, 0, 0, 0, 1, 0, 0]);
    client.cmd(json!({"op": "exit"}));
}

#[test]
fn keep_alive_connections_get_a_traceparent_in_every_request_and_never_in_a_body() {
    let Some(_kernel) = KernelTest::with_tools(
        "keep_alive_connections_get_a_traceparent_in_every_request_and_never_in_a_body",
        TOOLS,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, KEEP_ALIVE).unwrap();
    assert!(
        injection.keep_alive(),
        "the stream verdict program attached"
    );
    let mut http = Server::start("http", dir.path());
    let mut raw = Server::start("raw", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);
    let unframed = |ebpf: &Ebpf| counter(ebpf, HttpCounter::InjectUnframed);

    // http.client on one kept-alive connection: every request is injected,
    // a 1 MiB body (several sk_msg runs) included, each in a trace of its
    // own (the thread serves nothing); the socket stays in the sockhash.
    client.cmd(json!({"op": "connect", "port": http.port}));
    wait_sockets(&injection, 1);
    let big = pseudo_random(1 << 20, 0xb0d1);
    let mut traces = Vec::new();
    for (method, path, body) in [
        ("GET", "/1", None),
        ("POST", "/2-big", Some(&big[..])),
        ("GET", "/3", None),
        ("POST", "/4", Some(&b"GET / HTTP/1.1\r\n\r\n"[..])),
        ("GET", "/5", None),
    ] {
        let sent = client.request(dir.path(), method, path, &[], body);
        let ids = assert_injected(&http.next(), &sent);
        assert_context(&ebpf, client.tid, ids, [0; 8], ctx_flags::CLIENT_INJECTED);
        assert!(!traces.contains(&ids.0), "a new trace per request");
        traces.push(ids.0);
    }
    assert_eq!(injection.socket_cookies().unwrap().len(), 1);
    assert_eq!(inject_counters(&ebpf), [5, 0, 0, 0, 1, 0, 0]);
    assert_eq!(unframed(&ebpf), 0);
    client.cmd(json!({"op": "close"}));
    wait_sockets(&injection, 0);

    // Written by hand on one connection, each chunk in its own send. A
    // body sent on its own that is itself a request head passes untouched,
    // in a `Content-Length` body and in a chunked one; the request after a
    // chunked body (its end followed chunk by chunk, whatever the sends)
    // gets its header.
    let fake: &[u8] = b"GET /fake HTTP/1.1\r\nHost: y\r\n\r\n";
    let one = format!(
        "POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        fake.len()
    );
    let two: &[u8] = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n";
    let three: &[u8] = b"PUT /three HTTP/1.1\r\nhost: x\r\ncontent-length:  5\r\n\r\nhello";
    let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let four = format!("GET /four HTTP/1.1\r\nTraceparent: {own}\r\nHost: x\r\n\r\n");
    let five: &[u8] = b"POST /five HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let five_body: &[u8] = b"5\r\nhello\r\n0\r\n\r\n";
    let six: &[u8] = b"GET /six HTTP/1.1\r\nHost: x\r\n\r\n";
    // The head with its first chunk; a size line in two sends, with an
    // extension, upper-case hex; a chunk whose data is a request head, sent
    // alone; the last chunk and a trailer.
    let seven: [&[u8]; 5] = [
        b"POST /seven HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n",
        b"1",
        b"F;name=v\r\n",
        fake,
        b"\r\nA\r\n0123456789\r\n0\r\nTrailer-One: t\r\n\r\n",
    ];
    assert_eq!(fake.len(), 0x1f);
    let eight: &[u8] = b"GET /eight HTTP/1.1\r\nHost: x\r\n\r\n";
    client.cmd(json!({
        "op": "raw_http", "port": http.port, "pause_ms": 50,
        "requests": [
            [hex(one.as_bytes()), hex(fake)], [hex(two)], [hex(three)],
            [hex(four.as_bytes())], [hex(five), hex(five_body)], [hex(six)],
            seven.iter().map(|c| hex(c)).collect::<Vec<_>>(), [hex(eight)],
        ],
    }));
    assert_injected(&http.next(), &[one.as_bytes(), fake].concat());
    assert_injected(&http.next(), two);
    assert_injected(&http.next(), three);
    assert!(http.next() == four.as_bytes(), "an own traceparent changed");
    assert_injected(&http.next(), &[five, five_body].concat());
    assert_injected(&http.next(), six);
    assert_injected(&http.next(), &seven.concat());
    assert_injected(&http.next(), eight);
    assert_eq!(inject_counters(&ebpf), [12, 1, 0, 0, 2, 0, 0]);
    assert_eq!(unframed(&ebpf), 0);

    // A connection whose first message is not HTTP/1.x is never touched,
    // a later message that is a request head included.
    let chunks: [&[u8]; 2] = [&pseudo_random(4096, 9), six];
    client.cmd(json!({
        "op": "raw", "port": raw.port, "pause_ms": 50,
        "chunks": chunks.iter().map(|c| hex(c)).collect::<Vec<_>>(),
    }));
    assert!(raw.next() == chunks.concat(), "non-HTTP bytes changed");
    assert_eq!(inject_counters(&ebpf), [12, 1, 0, 0, 3, 0, 0]);
    assert_eq!(unframed(&ebpf), 1);
    wait_sockets(&injection, 0);
    client.cmd(json!({"op": "exit"}));
}

/// Program ids attached to `cgroup` (bpftool's view).
fn cgroup_program_ids(cgroup: &Path) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool cgroup show failed");
    // Nothing attached: bpftool prints an empty line, not `[]`.
    if out.stdout.trim_ascii().is_empty() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Ids of all loaded programs (bpftool's view).
fn loaded_program_ids() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool prog show failed");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

#[test]
fn dropping_the_guard_detaches_everything() {
    let Some(_kernel) = KernelTest::with_tools("dropping_the_guard_detaches_everything", TOOLS)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, FIRST_REQUEST).unwrap();
    let cgroup = injection.cgroup().to_path_buf();
    let sock_ops_id = u64::from(
        <&SockOps>::try_from(ebpf.program(names::SOCK_OPS).unwrap())
            .unwrap()
            .info()
            .unwrap()
            .id(),
    );
    let sk_msg_id = u64::from(
        <&SkMsg>::try_from(ebpf.program(names::SK_MSG).unwrap())
            .unwrap()
            .info()
            .unwrap()
            .id(),
    );
    assert!(cgroup_program_ids(&cgroup).contains(&sock_ops_id));

    let mut server = Server::start("http", dir.path());
    let mut client = Client::start();
    monitor(&mut ebpf, client.pid);
    client.cmd(json!({"op": "connect", "port": server.port}));
    let sent = client.request(dir.path(), "GET", "/before", &[], None);
    assert_injected(&server.next(), &sent);
    // Released once the request was acknowledged.
    assert_eq!(injection.socket_cookies().unwrap(), Vec::<u64>::new());
    // A new connection, in the sockhash until its first request.
    client.reconnect(server.port, &injection, 1);

    drop(injection);
    assert!(!cgroup_program_ids(&cgroup).contains(&sock_ops_id));
    // The open socket was taken out of the sockhash: no more sk_msg on it.
    let sent = client.request(dir.path(), "GET", "/after", &[], None);
    assert!(server.next() == sent, "injected after detach");
    // New connections are not added.
    client.cmd(json!({"op": "close"}));
    client.cmd(json!({"op": "connect", "port": server.port}));
    let sent = client.request(dir.path(), "GET", "/new", &[], None);
    assert!(server.next() == sent, "injected after detach");
    // Two added, one released by sock_ops; the guard took out the other.
    assert_eq!(inject_counters(&ebpf), [1, 0, 0, 0, 2, 0, 1]);

    // With the object gone, the programs go too. A socket that left the
    // sockhash drops its reference to sk_msg after an RCU grace period.
    drop(ebpf);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded = loaded_program_ids();
        if !loaded.contains(&sock_ops_id) && !loaded.contains(&sk_msg_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded 10 s after the object was dropped: sock_ops {}, sk_msg {}",
            loaded.contains(&sock_ops_id),
            loaded.contains(&sk_msg_id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.cmd(json!({"op": "exit"}));
}

#[test]
fn stopping_keeps_the_bytes_a_reader_has_not_read_yet() {
    let Some(_kernel) =
        KernelTest::with_tools("stopping_keeps_the_bytes_a_reader_has_not_read_yet", TOOLS)
    else {
        return;
    };
    use std::io::Read;
    let mut ebpf = load();
    let injection = inject::attach(&mut ebpf, KEEP_ALIVE).unwrap();
    monitor(&mut ebpf, std::process::id());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let total = 8 << 20;
    let sent = pseudo_random(total, 0xfeed);
    let to_send = sent.clone();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&to_send).unwrap();
    });
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    wait_sockets(&injection, 1);
    let mut got = Vec::with_capacity(total);
    let mut buf = vec![0; 64 << 10];
    // Read slowly so that bytes wait in the socket when it leaves the map.
    while got.len() < total / 4 {
        let n = client.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The agent stops: the socket stays in the pinned sockhash (taking it
    // out would drop the bytes waiting in its sockmap queue).
    let pin = injection.pin_dir().unwrap().to_path_buf();
    drop(injection);
    assert!(pin.join("sockets").exists(), "the sockhash pin is gone");
    assert!(inject::collect_pins() >= 1);
    assert!(pin.exists(), "a pin with an open socket was collected");
    while got.len() < total {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("after {} of {total} bytes: {e}", got.len()),
        }
    }
    server.join().unwrap();
    assert_eq!(got.len(), total, "bytes lost");
    assert!(got == sent, "bytes changed");
    // Closed: the socket left the map, and the next agent's collection
    // removes the pin.
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pin.exists() {
        inject::collect_pins();
        assert!(
            std::time::Instant::now() < deadline,
            "the pin of a closed socket stayed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
