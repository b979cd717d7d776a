//! The HTTP capture programs on the real kernel: the bytes a real server
//! (Python's `http.server`) and this test's own client move are the oracle
//! for what the ring buffer carries.
use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_agent::traces::capture::{HttpCapture, HttpCaptureConfig, HttpEvent, HttpHooks};
use fathom_common::http::{
    CAPTURE_HEAD, CAPTURE_TAIL, ConnEvent, DataEvent, HttpCounter, SockAddr, ctx_flags, data_flags,
    direction, role,
};
use fathom_tests::{ChildGuard, KernelTest, free_port};

struct Seen {
    opens: Vec<ConnEvent>,
    closes: Vec<ConnEvent>,
    data: Vec<DataEvent>,
}

fn collect(capture: &mut HttpCapture, seen: &mut Seen, for_: Duration) {
    let end = Instant::now() + for_;
    while Instant::now() < end {
        let _ = capture.wait(Duration::from_millis(50));
        let drained = capture.read(|e| match e {
            HttpEvent::Open(c) => seen.opens.push(c),
            HttpEvent::Close(c) => seen.closes.push(c),
            HttpEvent::ProcessExit(_) => {}
            HttpEvent::Data(d) => seen.data.push(*d),
            // This test loads the capture without injection, where the
            // kernel never pairs: every byte is a data event.
            HttpEvent::Span(_) => panic!("a paired exchange without injection"),
        });
        assert_eq!(drained.malformed, 0, "malformed records");
    }
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
    if let Err(reason) = socket_hooks() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and the socket tracepoints are missing: {reason}"
        );
        eprintln!("\n*** SKIPPED: no socket tracepoints here: {reason} ***\n");
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
    };
    collect(&mut capture, &mut seen, Duration::from_secs(2));

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
