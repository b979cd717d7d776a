//! The HTTP capture programs on the real kernel: the bytes a real server
//! (Python's `http.server`) and this test's own client move are the oracle
//! for what the ring buffer carries.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_agent::traces::capture::{HttpCapture, HttpCaptureConfig, HttpEvent, HttpHooks};
use fathom_common::http::{
    CAPTURE_HEAD, CAPTURE_TAIL, ConnEvent, DataEvent, HttpCounter, PROCESS_ENV, SockAddr,
    SpanRecord, ctx_flags, data_flags, direction, role, span_flags,
};
use fathom_tests::{ChildGuard, KernelTest, free_port};

struct Seen {
    opens: Vec<ConnEvent>,
    closes: Vec<ConnEvent>,
    data: Vec<DataEvent>,
    processes: Vec<SeenProcess>,
}

/// A process record, owned.
struct SeenProcess {
    tgid: u32,
    cgroup_id: u64,
    comm: Vec<u8>,
    env: Vec<u8>,
    /// Opens seen before it.
    opens_before: usize,
}

fn collect(capture: &mut HttpCapture, seen: &mut Seen, for_: Duration) {
    let end = Instant::now() + for_;
    while Instant::now() < end {
        let _ = capture.wait(Duration::from_millis(50));
        let drained = capture.read(|e| match e {
            HttpEvent::Open(c) => seen.opens.push(c),
            HttpEvent::Close(c) => seen.closes.push(c),
            HttpEvent::ProcessExit(_) => {}
            HttpEvent::Process(p) => seen.processes.push(SeenProcess {
                tgid: p.tgid,
                cgroup_id: p.cgroup_id,
                comm: p.comm().to_vec(),
                env: p.env().to_vec(),
                opens_before: seen.opens.len(),
            }),
            HttpEvent::Data(d) => seen.data.push(*d),
            // This test loads the capture without injection, where the
            // kernel never pairs: every byte is a data event.
            HttpEvent::Span(_) => panic!("a paired exchange without injection"),
        });
        assert_eq!(drained.malformed, 0, "malformed records");
    }
}

/// The inode number of `pid`'s cgroup v2 directory (its cgroup id).
fn cgroup_inode(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    let root = fathom_agent::traces::inject::cgroup2_root().unwrap();
    std::fs::metadata(root.join(path.trim_start_matches('/')))
        .unwrap()
        .ino()
}

fn wait_listening(port: u16) {
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "server on {port} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On the socket tracepoints (where the kernel has them: the default).
#[test]
fn captures_a_real_server_on_socket_tracepoints() {
    let Some(_kernel) =
        KernelTest::with_tools("captures_a_real_server_on_socket_tracepoints", &["python3"])
    else {
        return;
    };
    if !socket_hooks_or_skip() {
        return;
    }
    captures_requests_responses_and_context_of_a_real_server(HttpHooks::Sockets);
}

/// On the syscall tracepoints (the fallback of kernels without them).
#[test]
fn captures_a_real_server_on_syscall_tracepoints() {
    let Some(_kernel) = KernelTest::with_tools(
        "captures_a_real_server_on_syscall_tracepoints",
        &["python3"],
    ) else {
        return;
    };
    captures_requests_responses_and_context_of_a_real_server(HttpHooks::Syscalls);
}

/// Whether this kernel has the socket tracepoints; when not, says so loudly
/// (the caller skips), and fails under `CI=true`.
fn socket_hooks_or_skip() -> bool {
    let Err(reason) = socket_hooks() else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and the socket tracepoints are missing: {reason}"
    );
    eprintln!("\n*** SKIPPED: no socket tracepoints here: {reason} ***\n");
    false
}

fn socket_hooks() -> Result<(), String> {
    let btf = fathom_agent::btf::KernelBtf::open(std::path::Path::new(fathom_agent::btf::VMLINUX))
        .map_err(|e| e.to_string())?;
    fathom_agent::traces::capture::socket_hooks_supported(&btf)
}

#[allow(
    clippy::unwrap_used,
    reason = "test body: a failed unwrap is a failed test"
)]
fn captures_requests_responses_and_context_of_a_real_server(hooks: HttpHooks) {
    let sockets = hooks == HttpHooks::Sockets;
    let dir = tempfile::tempdir().unwrap();
    // A body longer than the captured head: head and tail are both checked.
    let body: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(dir.path().join("hello.txt"), &body).unwrap();
    let port = free_port();

    let mut capture = HttpCapture::start(&HttpCaptureConfig {
        inject: false,
        hooks,
        ..HttpCaptureConfig::default()
    })
    .expect("loading the capture programs");
    let server = ChildGuard::spawn(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let server_pid = server.0.id();
    wait_listening(port);

    let me = std::process::id();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let request = format!(
        "GET /hello.txt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: fathom-test\r\n\
         TraceParent: 00-{trace}-{parent}-01\r\nConnection: close\r\n\r\n"
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_port = stream.local_addr().unwrap().port();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    drop(stream);
    assert!(response.starts_with(b"HTTP/1.0 200"), "{response:?}");
    assert!(response.ends_with(&body));

    // Not HTTP: a connection whose first bytes are binary sends no data.
    let mut other = TcpStream::connect(("127.0.0.1", port)).unwrap();
    other
        .write_all(&[0u8, 1, 2, 3, 0xff, 0x10, b'\r', b'\n'])
        .unwrap();
    other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(other);

    let mut seen = Seen {
        opens: vec![],
        closes: vec![],
        data: vec![],
        processes: vec![],
    };
    collect(&mut capture, &mut seen, Duration::from_secs(2));

    // Each process's first connection came with what names it, checked
    // against /proc: the process's comm, the start of its environment,
    // its cgroup v2 directory's inode; once, before its first open.
    for pid in [me, server_pid] {
        let records: Vec<_> = seen.processes.iter().filter(|p| p.tgid == pid).collect();
        assert_eq!(records.len(), 1, "process records of {pid}");
        let p = records[0];
        assert!(
            !seen.opens[..p.opens_before].iter().any(|o| o.tgid == pid),
            "{pid}: a connection opened before its process record"
        );
        let proc_comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(String::from_utf8_lossy(&p.comm), proc_comm.trim_end());
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert_eq!(
            p.env.as_slice(),
            &environ[..environ.len().min(PROCESS_ENV)],
            "{pid}: environment"
        );
        assert_eq!(p.cgroup_id, cgroup_inode(pid), "{pid}: cgroup id");
    }

    // Connections: ours as client (peer = the server port), the server's
    // accepted one (peer = our port).
    // Our write, byte for byte (the readiness probe's connection carried
    // nothing).
    let write = seen
        .data
        .iter()
        .find(|d| d.tgid == me && d.direction == direction::WRITE)
        .expect("client write captured");
    assert_eq!(write.head(), request.as_bytes());
    assert_eq!(write.len, request.len() as u64);
    assert!(write.start_ns <= write.end_ns);
    let client_open = seen
        .opens
        .iter()
        .find(|c| c.conn_id == write.conn_id)
        .expect("client connection registered");
    assert_eq!((client_open.tgid, client_open.role), (me, role::CLIENT));
    assert_eq!(client_open.peer.port, port);
    assert_eq!(client_open.peer.family, 2);
    assert_eq!(&client_open.peer.addr[..4], &[127, 0, 0, 1]);
    let server_open = seen
        .opens
        .iter()
        .find(|c| c.tgid == server_pid && c.role == role::SERVER && c.peer.port == client_port)
        .expect("accepted connection registered");
    if sockets {
        // Registered at its first bytes: no accept, no listening socket.
        assert_eq!(server_open.listen_fd, u32::MAX);
    } else {
        assert_ne!(server_open.listen_fd, u32::MAX);
    }
    // This end of each, read from the socket itself (BTF offsets).
    let loopback = |port: u16| SockAddr {
        addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        family: 2,
        port,
        _reserved: 0,
    };
    assert_eq!(client_open.local, loopback(client_port));
    assert_eq!(server_open.local, loopback(port));
    assert!(
        seen.closes.iter().any(|c| c.conn_id == client_open.conn_id),
        "client close seen"
    );

    let ours: Vec<&DataEvent> = seen
        .data
        .iter()
        .filter(|d| d.conn_id == client_open.conn_id)
        .collect();
    // What we read back: the response, in as many reads as it took.
    let read_bytes: u64 = ours
        .iter()
        .filter(|d| d.direction == direction::READ)
        .map(|d| d.len)
        .sum();
    assert_eq!(read_bytes, response.len() as u64);
    // Every read and write carries the connection's TCP state.
    assert!(
        ours.iter().all(|d| d.flags & data_flags::TCP != 0),
        "data events without TCP state"
    );

    // The server's read: the same bytes, and the context chosen in the
    // kernel from our traceparent (any case of the header name).
    let served: Vec<&DataEvent> = seen
        .data
        .iter()
        .filter(|d| d.conn_id == server_open.conn_id)
        .collect();
    let read = served
        .iter()
        .find(|d| d.direction == direction::READ)
        .expect("server read captured");
    assert_eq!(read.head(), request.as_bytes());
    assert_eq!(read.ctx.flags, ctx_flags::SERVER | ctx_flags::REMOTE_PARENT);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(&read.ctx.trace_id), trace);
    assert_eq!(hex(&read.ctx.parent_span_id), parent);
    assert_ne!(read.ctx.span_id, [0; 8]);
    // The server's writes add up to the response; the body's write has its
    // head and tail.
    let written: u64 = served
        .iter()
        .filter(|d| d.direction == direction::WRITE)
        .map(|d| d.len)
        .sum();
    assert_eq!(written, response.len() as u64);
    assert!(served.iter().all(|d| d.flags & data_flags::TCP != 0));
    let body_write = served
        .iter()
        .find(|d| d.direction == direction::WRITE && d.head().starts_with(&body[..64]))
        .expect("body write captured");
    assert_eq!(body_write.head(), &body[..CAPTURE_HEAD]);
    assert_eq!(body_write.tail(), &body[body.len() - CAPTURE_TAIL..]);

    // The binary connection (accepted after the request's): no data events
    // at all; registered at accept on syscall tracepoints, and not even
    // opened on socket tracepoints (opened at a first HTTP message).
    let binary: Vec<&ConnEvent> = seen
        .opens
        .iter()
        .filter(|c| c.tgid == server_pid && c.ts_ns > server_open.ts_ns)
        .collect();
    assert_eq!(binary.len(), usize::from(!sockets), "{:?}", seen.opens);
    assert!(
        !seen
            .data
            .iter()
            .any(|d| d.tgid == server_pid && d.conn_id != server_open.conn_id),
        "a non-HTTP connection sent data events"
    );
    let counters = capture.counters();
    assert!(counters[HttpCounter::ServerRequests as usize] >= 1);
    assert_eq!(counters[HttpCounter::EventsLost as usize], 0);
}

/// What a test read from the capture.
#[derive(Default)]
struct Collected {
    opens: Vec<ConnEvent>,
    data: Vec<DataEvent>,
    records: Vec<SpanRecord>,
}

impl Collected {
    /// Reads events for `for_` or until `until` holds of the records.
    fn drain(
        &mut self,
        capture: &mut HttpCapture,
        for_: Duration,
        until: impl Fn(&[SpanRecord]) -> bool,
    ) {
        let end = Instant::now() + for_;
        while Instant::now() < end && !until(&self.records) {
            let _ = capture.wait(Duration::from_millis(20));
            let drained = capture.read(|e| match e {
                HttpEvent::Open(c) => self.opens.push(c),
                HttpEvent::Data(d) => self.data.push(*d),
                HttpEvent::Span(r) => self.records.push(r),
                HttpEvent::Close(_) | HttpEvent::ProcessExit(_) | HttpEvent::Process(_) => {}
            });
            assert_eq!(drained.malformed, 0, "malformed records");
        }
    }
}

/// One response as this test read it: its final status, and the bytes
/// after the final head (chunk framing included), as the kernel counts
/// them.
struct Answer {
    status: u16,
    body_bytes: u64,
}

/// Reads one response (interim ones skipped) from `stream`, `head` says
/// whether the request was a HEAD.
#[allow(clippy::unwrap_used, reason = "test helper")]
fn read_answer(stream: &mut TcpStream, buf: &mut Vec<u8>, head_request: bool) -> Answer {
    let mut fill = |buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    };
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            fill(buf);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head[9..12].parse().unwrap();
        buf.drain(..end);
        if status < 200 {
            continue;
        }
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_string())
            })
        };
        let body_bytes = if head_request || status == 204 || status == 304 {
            0
        } else if header("transfer-encoding").as_deref() == Some("chunked") {
            while !buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                fill(buf);
            }
            let i = buf.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
            buf.drain(..i);
            i
        } else {
            let n: usize = header("content-length").unwrap().parse().unwrap();
            while buf.len() < n {
                fill(buf);
            }
            buf.drain(..n);
            n
        };
        return Answer {
            status,
            body_bytes: body_bytes as u64,
        };
    }
}

/// Exchanges paired in the kernel (socket tracepoints, with injection on,
/// as the agent runs them): one record per exchange whose framing the
/// kernel follows, checked against the bytes this test sent and read on a
/// kept-alive connection to a real server; and the exchanges it must leave
/// to user space (an interim response, a request body, a `User-Agent`
/// longer than the record, pipelined requests) as data events, each on its
/// own connection.
#[test]
#[allow(
    clippy::unwrap_used,
    reason = "test body: a failed unwrap is a failed test"
)]
fn pairs_simple_exchanges_in_the_kernel_and_streams_the_rest() {
    let Some(_kernel) = KernelTest::with_tools(
        "pairs_simple_exchanges_in_the_kernel_and_streams_the_rest",
        &["python3"],
    ) else {
        return;
    };
    if !socket_hooks_or_skip() {
        return;
    }
    let mut capture = HttpCapture::start(&HttpCaptureConfig {
        inject: true,
        hooks: HttpHooks::Sockets,
        ..HttpCaptureConfig::default()
    })
    .expect("loading the capture programs");
    let port = free_port();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/pair_server.py");
    let server = ChildGuard::spawn(
        Command::new("python3")
            .arg(fixture)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let server_pid = server.0.id();
    wait_listening(port);

    let request = |method: &str, path: &str, extra: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: fathom-pair-test/1.0\r\n\
             Accept: */*\r\n{extra}\r\n"
        )
    };
    // One kept-alive connection: every exchange paired.
    let simple = [
        ("GET", "/len/100?x=1"),
        ("GET", "/one/3000"),
        ("HEAD", "/len/50"),
        ("GET", "/chunked"),
        ("GET", "/chunked1"),
        ("GET", "/empty"),
        ("GET", "/len/0"),
    ];
    let mut got = Collected::default();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let kept_port = stream.local_addr().unwrap().port();
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    for (i, (method, path)) in simple.iter().enumerate() {
        stream
            .write_all(request(method, path, "").as_bytes())
            .unwrap();
        answers.push(read_answer(&mut stream, &mut buf, *method == "HEAD"));
        // Its record comes as its response ends (its framing followed), not
        // with the next request or the close.
        let server = |r: &SpanRecord| r.tgid == server_pid;
        got.drain(&mut capture, Duration::from_secs(2), |r| {
            r.iter().filter(|r| server(r)).count() > i
        });
        assert_eq!(
            got.records.iter().filter(|r| server(r)).count(),
            i + 1,
            "{method} {path}: no record before the next request"
        );
    }
    drop(stream);

    // Each on a connection of its own: what the kernel leaves to user space.
    let long_agent = format!("User-Agent: {}\r\n", "x".repeat(100));
    let others: [(&str, String, bool); 4] = [
        ("interim", request("GET", "/hints", ""), false),
        (
            "body",
            request("POST", "/echo", "Content-Length: 5\r\n") + "hello",
            false,
        ),
        (
            "long agent",
            format!("GET /len/10 HTTP/1.1\r\nHost: x\r\n{long_agent}\r\n"),
            false,
        ),
        (
            "pipelined",
            request("GET", "/len/10", "") + &request("GET", "/len/20", ""),
            true,
        ),
    ];
    let mut other_ports = Vec::new();
    for (_, bytes, two) in &others {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        other_ports.push(s.local_addr().unwrap().port());
        s.write_all(bytes.as_bytes()).unwrap();
        let mut buf = Vec::new();
        read_answer(&mut s, &mut buf, false);
        if *two {
            read_answer(&mut s, &mut buf, false);
        }
    }

    got.drain(&mut capture, Duration::from_secs(2), |_| false);
    let Collected {
        opens,
        data,
        records,
    } = got;
    let served_conn = |client_port: u16| {
        opens
            .iter()
            .find(|c| c.tgid == server_pid && c.role == role::SERVER && c.peer.port == client_port)
            .unwrap_or_else(|| panic!("the server's connection from port {client_port}"))
            .conn_id
    };

    // The kept-alive connection: a record per exchange, no data event.
    let kept = served_conn(kept_port);
    let ours: Vec<&SpanRecord> = records.iter().filter(|r| r.conn_id == kept).collect();
    assert!(
        !data.iter().any(|d| d.conn_id == kept),
        "data events of a connection whose exchanges were all paired"
    );
    assert_eq!(ours.len(), simple.len(), "one record per exchange");
    let text = |field: &[u8]| {
        let end = field.iter().position(|&b| b == b'\r').unwrap();
        String::from_utf8_lossy(&field[..end]).into_owned()
    };
    let mut last_end = 0;
    for (((method, path), answer), r) in simple.iter().zip(&answers).zip(&ours) {
        let what = format!("{method} {path}");
        assert_eq!(text(&r.line), format!("{method} {path} HTTP/1.1"), "{what}");
        assert_eq!(text(&r.host), format!("127.0.0.1:{port}"), "{what}");
        assert_eq!(text(&r.agent), "fathom-pair-test/1.0", "{what}");
        assert_eq!(r.status, answer.status, "{what}");
        assert_eq!(r.response_body, answer.body_bytes, "{what}: body bytes");
        assert_eq!(r.role, role::SERVER, "{what}");
        assert_eq!(r.tgid, server_pid, "{what}");
        assert_eq!(r.flags & span_flags::PENDING, 0, "{what}");
        assert_eq!(
            r.flags & span_flags::HEAD != 0,
            *method == "HEAD",
            "{what}: HEAD flag"
        );
        assert_ne!(r.flags & span_flags::TCP, 0, "{what}: TCP state");
        assert_ne!(
            r.ctx.flags & ctx_flags::SERVER,
            0,
            "{what}: the kernel's ids"
        );
        assert!(
            r.start_ns >= last_end && r.end_ns > r.start_ns,
            "{what}: times"
        );
        last_end = r.end_ns;
    }
    assert_eq!(
        answers.iter().map(|a| a.status).collect::<Vec<_>>(),
        [200, 200, 200, 200, 200, 204, 200]
    );

    // The others: data events; the interim response's request went first
    // as a pending record.
    for ((what, _, _), client_port) in others.iter().zip(&other_ports) {
        let conn = served_conn(*client_port);
        let recs: Vec<&SpanRecord> = records.iter().filter(|r| r.conn_id == conn).collect();
        let events = data.iter().filter(|d| d.conn_id == conn).count();
        if *what == "interim" {
            assert_eq!(recs.len(), 1, "{what}: one pending record");
            assert_ne!(recs[0].flags & span_flags::PENDING, 0, "{what}");
            assert_eq!(text(&recs[0].line), "GET /hints HTTP/1.1");
            // The 103 head, the final head with its body: one write each.
            assert_eq!(events, 2, "{what}: the responses' writes");
        } else {
            assert!(recs.is_empty(), "{what}: records of a streamed exchange");
            assert!(events >= 2, "{what}: {events} data events");
        }
    }
    let counters = capture.counters();
    assert!(counters[HttpCounter::SpansPaired as usize] >= simple.len() as u64);
    assert!(counters[HttpCounter::PairStreamed as usize] >= others.len() as u64);
    assert_eq!(counters[HttpCounter::EventsLost as usize], 0);
}
