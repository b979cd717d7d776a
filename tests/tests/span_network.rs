//! HTTP spans carry their connection's TCP state (`fathom.tcp.srtt_us`,
//! `fathom.tcp.retransmits`, `fathom.tcp.connect_us`), on the real kernel,
//! with real traffic between network namespaces this test creates: an HTTP
//! server in a "pod" namespace behind `delay_link` (a delay-and-loss relay:
//! this kernel has no netem), a keep-alive client on the node. The agent
//! runs tracing and the network signal with its embedded store; spans are
//! read back from its API.
//!
//! Truth is the injected delay and what the applications measured
//! themselves: each end reads `TCP_INFO` of its own socket (`tcpi_rtt`,
//! `tcpi_total_retrans`) right before sending a request / right after
//! reading it, and right after the response was sent / read; the client
//! times its own `connect()`.
//!
//! Needs root and BPF (holds a `KernelTest`, the kernel lock); skips with a
//! printed reason elsewhere, fails under `CI=true`.
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, ChildGuard, KernelTest, build_fixture, chain::http_get, free_port, netns::Topology,
};
use serde_json::Value;

/// One HTTP/1.1 server connection at a time, keep-alive; `GET .../SIZE`
/// answers SIZE bytes: all but the last in one `sendall`, the last once
/// the others are acknowledged. For each request it appends
/// `path tcpi_rtt_us total_retrans_after_reading total_retrans_after_sending`
/// to the oracle file.
const SERVER: &str = r#"
import fcntl, socket, struct, sys, termios, time
host, port, oracle = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def info(c):
    i = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", i, 68)[0], struct.unpack_from("I", i, 100)[0]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(8)
out = open(oracle, "a", buffering=1)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                break
            buf += d
        if b"\r\n\r\n" not in buf:
            c.close()
            break
        head, buf = buf.split(b"\r\n\r\n", 1)
        path = head.split(b" ")[1].decode()
        _, before = info(c)
        size = int(path.rsplit("/", 1)[1])
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * (size - 1))
        # Everything acknowledged before the last byte: nothing can be
        # retransmitted, nor the RTT change, between that last write and
        # the TCP_INFO read right after it (the next ACK is an RTT away).
        while struct.unpack("i", fcntl.ioctl(c, termios.TIOCOUTQ, b"\0" * 4))[0]:
            time.sleep(0.001)
        c.sendall(b"x")
        rtt, after = info(c)
        out.write(f"{path} {rtt} {before} {after}\n")
"#;

/// One keep-alive connection (run at real-time priority so that the
/// machine's load does not add to its own timing); prints `connect US
/// RTT_US` (its own `connect()` time, and the kernel's RTT sample of the
/// handshake, `tcpi_rtt` right after it), then per request `path tcpi_rtt_us retrans_before retrans_after`.
const CLIENT: &str = r#"
import socket, struct, sys, time
host, port, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sizes = [int(x) for x in sys.argv[4:]]
def info(c):
    i = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", i, 68)[0], struct.unpack_from("I", i, 100)[0]
s = socket.socket()
t = time.perf_counter()
s.connect((host, port))
took = int((time.perf_counter() - t) * 1e6)
print("connect", took, info(s)[0], flush=True)
buf = b""
for i, size in enumerate(sizes):
    path = f"/r/{phase}/{i}/{size}"
    _, before = info(s)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: spannet\r\n\r\n".encode())
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    while len(buf) < length:
        buf += s.recv(1 << 20)
    buf = buf[length:]
    rtt, after = info(s)
    print(path, rtt, before, after, flush=True)
    time.sleep(0.05)
s.close()
"#;

/// `TCP_INFO` as one end saw a request.
#[derive(Clone, Copy, Debug)]
struct Oracle {
    rtt_us: f64,
    retrans_before: i64,
    retrans_after: i64,
}

fn parse_oracle(text: &str) -> BTreeMap<String, Oracle> {
    text.lines()
        .filter(|l| l.starts_with('/'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                Oracle {
                    rtt_us: f[1].parse().unwrap(),
                    retrans_before: f[2].parse().unwrap(),
                    retrans_after: f[3].parse().unwrap(),
                },
            )
        })
        .collect()
}

/// What the client measured of its connect: `connect()`'s time and the
/// handshake's RTT sample (`tcpi_rtt` right after), µs.
#[derive(Clone, Copy, Debug)]
struct Connect {
    took_us: f64,
    rtt_us: f64,
}

/// The client's connect and its per-request `TCP_INFO`.
fn run_client(
    topo: &Topology,
    service: &str,
    port: u16,
    phase: &str,
    sizes: &[usize],
) -> (Connect, BTreeMap<String, Oracle>) {
    let out = Command::new("chrt")
        .env("OTEL_SERVICE_NAME", service)
        .args(["-f", "10", "python3"])
        .args(["-c", CLIENT, &topo.pod_ip, &port.to_string(), phase])
        .args(sizes.iter().map(usize::to_string))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let connect: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("connect "))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let connect = Connect {
        took_us: connect[0],
        rtt_us: connect[1],
    };
    (connect, parse_oracle(&text))
}

fn api_json(port: u16, path: &str) -> Value {
    let r = http_get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}");
    serde_json::from_slice(&r.body).unwrap()
}

/// A span as the API shows it: kind and attributes.
#[derive(Debug)]
struct Span {
    kind: String,
    attrs: BTreeMap<String, String>,
}

impl Span {
    /// The request path (server: `url.path`; client: from `url.full`).
    fn path(&self) -> Option<String> {
        if let Some(p) = self.attrs.get("url.path") {
            return Some(p.clone());
        }
        let full = self.attrs.get("url.full")?;
        Some(format!("/{}", full.split_once("://")?.1.split_once('/')?.1))
    }

    fn int(&self, key: &str) -> Option<i64> {
        self.attrs.get(key).map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{key}={v:?} is not an integer"))
        })
    }
}

/// The spans of `service`, by request path, once there are `want`.
fn spans_of(port: u16, service: &str, want: usize) -> BTreeMap<String, Span> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut out = BTreeMap::new();
        let list = api_json(
            port,
            &format!("/ui/api/traces?service={service}&range=1h&limit=100"),
        );
        for t in list.as_array().into_iter().flatten() {
            let Some(id) = t["trace_id"].as_str() else {
                continue;
            };
            let detail = api_json(port, &format!("/ui/api/traces/{id}"));
            for s in detail["spans"].as_array().into_iter().flatten() {
                if s["service"] != service {
                    continue;
                }
                let attrs = s["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                    .collect();
                let span = Span {
                    kind: s["kind"].as_str().unwrap_or("").to_string(),
                    attrs,
                };
                if let Some(path) = span.path() {
                    out.insert(path, span);
                }
            }
        }
        if out.len() >= want {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{service}: {} spans of {want}: {out:#?}",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: {got} not within {}% of {want}",
        tolerance * 100.0
    );
}

fn start_server(topo: &Topology, service: &str, port: u16, oracle: &Path) -> ChildGuard {
    let mut cmd = topo.in_pod("python3");
    cmd.env("OTEL_SERVICE_NAME", service)
        .args(["-c", SERVER, &topo.pod_ip, &port.to_string()])
        .arg(oracle)
        .stdout(Stdio::piped());
    let mut server = ChildGuard::spawn(&mut cmd);
    assert_eq!(server.first_line(), "listening");
    server
}

/// Requests before any bulk transfer on their connection: their RTT is the
/// injected delay and nothing was lost. A bulk response queues frames in
/// the relay (its RTT, as the kernel and the span measure it, grows) and
/// overflows it at times (retransmits even without injected loss); the
/// comparisons with the end's own `TCP_INFO` hold for every request.
const BEFORE_BULK: [&str; 5] = [
    "/r/a/0/100",
    "/r/a/1/2000",
    "/r/b/0/100",
    "/r/c/0/100",
    "/r/c/1/100",
];

/// 20 ms then 50 ms injected: each span's smoothed RTT is the kernel's own
/// (the end's `tcpi_rtt` right after its last event) and the delay; a
/// client span's connect time is the client's own `connect()` and the
/// delay; with 5% loss on the server's direction, each server span's
/// retransmits are exactly what its socket retransmitted between reading
/// the request and sending the response.
#[test]
fn http_spans_carry_rtt_retransmits_and_connect_time() {
    let Some(_kernel) = KernelTest::acquire("http_spans_carry_rtt_retransmits_and_connect_time")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = build_fixture("delay_link", dir.path());
    let pid = std::process::id();
    let tag = format!("fs{}", pid % 100_000);
    let subnet = (((pid % 60) * 4 + 3) % 250) as u8;
    let mut topo = Topology::new(&tag, subnet, &relay);
    topo.set_link(20_000, 0);
    topo.warm_arp();

    let api = free_port();
    let listen = format!("127.0.0.1:{api}");
    let store = dir.path().join("store.redb");
    let agent = Agent::spawn(&[
        "--signals",
        "traces,network",
        "--net-interfaces",
        &topo.host_if,
        "--http-listen",
        &listen,
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        store.to_str().unwrap(),
    ]);
    agent.wait_for_log("network metrics attached", Duration::from_secs(120));
    agent.wait_for_log("http tracing attached", Duration::from_secs(120));

    let server_svc = format!("spannet-srv-{pid}");
    let client_svc = format!("spannet-cli-{pid}");
    let oracle_file = dir.path().join("server-oracle.txt");
    let port = 18080;
    let _server = start_server(&topo, &server_svc, port, &oracle_file);

    // (phase, injected delay µs, loss ppm of the server's frames, response
    // sizes): one keep-alive connection each. a: small responses around a
    // 4 MiB one; b: 5% loss, 1 MiB responses; c: 50 ms.
    let phases: [(&str, u64, u32, &[usize]); 3] = [
        ("a", 20_000, 0, &[100, 2_000, 4 << 20, 100]),
        ("b", 20_000, 50_000, &[100, 1 << 20, 100, 1 << 20]),
        ("c", 50_000, 0, &[100, 100]),
    ];
    let mut client_truth = BTreeMap::new();
    // Phase → the client's own measure of its connect.
    let mut connect_truth = BTreeMap::new();
    for &(phase, delay, loss, sizes) in &phases {
        topo.set_link(delay, loss);
        let (connect, truth) = run_client(&topo, &client_svc, port, phase, sizes);
        eprintln!("phase {phase}: client {connect:?}");
        connect_truth.insert(phase, connect);
        client_truth.extend(truth);
    }
    let delay_of = |path: &str| {
        let phase = &path[3..4];
        phases.iter().find(|p| p.0 == phase).unwrap().1 as f64
    };

    let server_truth = parse_oracle(&std::fs::read_to_string(&oracle_file).unwrap());
    let n: usize = phases.iter().map(|p| p.3.len()).sum();
    assert_eq!(server_truth.len(), n);
    assert_eq!(client_truth.len(), n);
    let servers = spans_of(api, &server_svc, n);
    let clients = spans_of(api, &client_svc, n);

    let mut lossy_retransmits = 0;
    for (path, truth) in &server_truth {
        let s = &servers[path];
        assert_eq!(s.kind, "server", "{path}");
        let srtt = s.int("fathom.tcp.srtt_us").unwrap() as f64;
        let retransmits = s.int("fathom.tcp.retransmits").unwrap();
        eprintln!(
            "server {path}: span srtt {srtt} µs, retransmits {retransmits}; \
             tcpi_rtt {} µs, total_retrans {} → {}",
            truth.rtt_us, truth.retrans_before, truth.retrans_after
        );
        // Exact: nothing in flight when the span's last write returned.
        assert_eq!(srtt, truth.rtt_us, "{path}: server srtt vs tcpi_rtt");
        assert_eq!(
            retransmits,
            truth.retrans_after - truth.retrans_before,
            "{path}: server span retransmits"
        );
        if BEFORE_BULK.contains(&path.as_str()) {
            within(
                &format!("{path} server srtt vs delay"),
                srtt,
                delay_of(path),
                0.05,
            );
            assert_eq!(retransmits, 0, "{path}: nothing lost yet");
        }
        if path.starts_with("/r/b/") {
            lossy_retransmits += retransmits;
        }
        // The server's handshake is not per connection in the network
        // signal: no connect time on server spans.
        assert_eq!(s.int("fathom.tcp.connect_us"), None, "{path}");
    }
    // The loss was real: the 1 MiB responses had to be repaired.
    assert!(lossy_retransmits > 0, "no retransmit with 5% loss");

    for (path, truth) in &client_truth {
        let c = &clients[path];
        assert_eq!(c.kind, "client", "{path}");
        let srtt = c.int("fathom.tcp.srtt_us").unwrap() as f64;
        let connect = c.int("fathom.tcp.connect_us").unwrap() as f64;
        eprintln!(
            "client {path}: span srtt {srtt} µs, connect {connect} µs; tcpi_rtt {} µs",
            truth.rtt_us
        );
        within(
            &format!("{path} client srtt vs tcpi_rtt"),
            srtt,
            truth.rtt_us,
            0.05,
        );
        // The client sends little and its direction loses nothing: 0, but
        // counted the same way.
        assert_eq!(
            c.int("fathom.tcp.retransmits").unwrap(),
            truth.retrans_after - truth.retrans_before,
            "{path}: client span retransmits"
        );
        within(
            &format!("{path} client connect vs delay"),
            connect,
            delay_of(path),
            0.05,
        );
        let truth_connect = connect_truth[&path[3..4]];
        within(
            &format!("{path} connect vs connect()"),
            connect,
            truth_connect.took_us,
            0.05,
        );
        // The kernel's own RTT sample of the SYN: the same handshake, timed
        // by TCP rather than by the state changes.
        within(
            &format!("{path} connect vs the handshake's tcpi_rtt"),
            connect,
            truth_connect.rtt_us,
            0.02,
        );
        if BEFORE_BULK.contains(&path.as_str()) {
            within(
                &format!("{path} client srtt vs delay"),
                srtt,
                delay_of(path),
                0.05,
            );
        }
    }
    // Every request of a connection has the connection's one connect time.
    for &(phase, ..) in &phases {
        let connects: std::collections::BTreeSet<_> = clients
            .iter()
            .filter(|(p, _)| p[3..4] == *phase)
            .map(|(_, c)| c.int("fathom.tcp.connect_us"))
            .collect();
        assert_eq!(connects.len(), 1, "phase {phase}: {connects:?}");
    }
}
