//! Network metrics with real traffic between network namespaces this test
//! creates: a "pod" namespace whose veth leads, through a "wire" namespace
//! running `delay_link` (a delay-and-loss relay: this kernel has no netem),
//! to a veth on the node that the agent hooks. Truth is the injected delay
//! and what the applications and the kernel measured themselves (connect
//! time, `TCP_INFO` RTT, `nstat` retransmits, DNS response times).
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, ChildGuard, KernelTest, build_fixture, free_port,
    netns::{Topology, run},
};

/// The agent with only the network signal, its HTTP port.
fn agent(interfaces: &str, dir: &Path) -> (Agent, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = dir.join("store.redb");
    let agent = Agent::spawn(&[
        "--signals",
        "network",
        "--net-interfaces",
        interfaces,
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
    (agent, port)
}

/// `/metrics` as (name, labels) → value.
fn scrape(port: u16) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let body = fathom_tests::chain::http_get(port, "/metrics")
        .unwrap()
        .body;
    let text = String::from_utf8(body).unwrap();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((k, v)) = rest.split_once("=\"") {
            let end = v.find('"').unwrap();
            map.insert(k.trim_start_matches(',').to_string(), v[..end].to_string());
            rest = &v[end + 1..];
        }
        out.insert((name.to_string(), map), value.parse().unwrap());
    }
    out
}

/// The sum of the series of `name` that have all `labels`.
fn value(
    m: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    m.iter()
        .filter(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Waits until the series reaches `count` observations.
fn wait_count(port: u16, name: &str, labels: &[(&str, &str)], count: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = value(&scrape(port), name, labels);
        if got >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?}: {got}, want {count}; /metrics:\n{:#?}",
            scrape(port)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: {got} not within {}% of {want}",
        tolerance * 100.0
    );
}

/// A TCP echo server on `ports` of the pod (its service: `name`).
const ECHO_SERVER: &str = r#"
import socket, sys, threading
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for p in sys.argv[2:]:
    threading.Thread(target=listen, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"#;

/// N connections, each with 10 exchanges 40 ms apart; prints the median
/// time of `connect()` and the mean of the kernel's own RTT (`TCP_INFO`),
/// in ms.
const ECHO_CLIENT: &str = r#"
import socket, struct, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connects, rtts, socks = [], [], []
for _ in range(n):
    s = socket.socket()
    t = time.perf_counter()
    s.connect((host, port))
    connects.append((time.perf_counter() - t) * 1000)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(10):
        s.sendall(b"x" * 100)
        got = 0
        while got < 100:
            got += len(s.recv(100 - got))
        time.sleep(0.04)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    rtts.append(struct.unpack_from("I", info, 68)[0] / 1000)
    socks.append(s)
time.sleep(2.5)
print(sorted(connects)[n // 2], sum(rtts) / n, flush=True)
"#;

fn spawn_server(topo: &Topology, name: &str, ports: &[u16]) -> ChildGuard {
    let mut cmd = topo.in_pod("python3");
    cmd.env("OTEL_SERVICE_NAME", name)
        .args(["-c", ECHO_SERVER, &topo.pod_ip])
        .args(ports.iter().map(u16::to_string))
        .stdout(Stdio::piped());
    let mut server = ChildGuard::spawn(&mut cmd);
    assert_eq!(server.first_line(), "listening");
    server
}

/// Runs the echo client; returns (median connect ms, mean TCP_INFO RTT ms).
fn run_client(topo: &Topology, name: &str, port: u16, n: u32) -> (f64, f64) {
    let out = Command::new("python3")
        .env("OTEL_SERVICE_NAME", name)
        .args([
            "-c",
            ECHO_CLIENT,
            &topo.pod_ip,
            &port.to_string(),
            &n.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut f = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    (f.next().unwrap(), f.next().unwrap())
}

fn tag() -> String {
    format!("fn{}", std::process::id() % 100_000)
}

fn subnet(offset: u32) -> u8 {
    (((std::process::id() % 60) * 4 + offset) % 250) as u8
}

/// The names of the tcx programs on an interface (ingress, then egress),
/// from the kernel (BPF_PROG_QUERY).
fn tcx_programs(interface: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .flat_map(|t| SchedClassifier::query_tcx(interface, t).unwrap().1)
        .map(|p| p.name_as_str().unwrap_or("").to_string())
        .collect()
}

/// Percent-encodes a PromQL query.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A PromQL instant query's single value.
fn promql(port: u16, q: &str) -> Option<f64> {
    let resp =
        fathom_tests::chain::http_get(port, &format!("/api/v1/query?query={}", encode(q))).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&resp.body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn promql_until(port: u16, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = promql(port, q);
        if let Some(v) = got.filter(|v| ok(*v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{q}: {got:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Handshake and RTT with 20 ms then 50 ms injected, for the right
/// workloads on both ends; a real Prometheus scrapes the agent; the hooks
/// follow the interface (attached when it appears, forgotten when it goes)
/// and leave nothing behind.
#[test]
fn handshake_and_rtt_follow_the_injected_delay() {
    let Some(_kernel) = KernelTest::acquire("handshake_and_rtt_follow_the_injected_delay") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = build_fixture("delay_link", dir.path());
    let tag = tag();
    // The agent starts before the interface exists.
    let (agent, port) = agent(&format!("{tag}*h"), dir.path());
    let mut topo = Topology::new(&tag, subnet(0), &relay);
    agent.wait_for_log(
        &format!("network hooks attached interface={tag}h"),
        Duration::from_secs(20),
    );
    assert_eq!(
        tcx_programs(&topo.host_if),
        ["net_tc_ingress", "net_tc_egress"]
    );

    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fathom\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let _prometheus = ChildGuard::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("prom").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let server_name = format!("{tag}-server");
    let (p20, p50) = (18020, 18050);
    let _server = spawn_server(&topo, &server_name, &[p20, p50]);
    for (delay_ms, server_port) in [(20.0, p20), (50.0, p50)] {
        topo.set_link((delay_ms * 1000.0) as u64, 0);
        topo.warm_arp();
        let client = format!("{tag}-client-{delay_ms}");
        let n = 10;
        let (connect_ms, rtt_ms) = run_client(&topo, &client, server_port, n);
        eprintln!(
            "delay {delay_ms} ms: client measured connect {connect_ms:.3} ms, TCP_INFO rtt {rtt_ms:.3} ms"
        );
        let sp = server_port.to_string();
        let client_side = [
            ("job", client.as_str()),
            ("direction", "client"),
            ("peer", server_name.as_str()),
            ("server_port", sp.as_str()),
        ];
        let server_side = [
            ("job", server_name.as_str()),
            ("direction", "server"),
            ("peer", client.as_str()),
            ("server_port", sp.as_str()),
        ];
        let hs = "fathom_tcp_handshake_duration_seconds";
        wait_count(port, &format!("{hs}_count"), &client_side, f64::from(n));
        wait_count(port, &format!("{hs}_count"), &server_side, f64::from(n));
        let m = scrape(port);
        assert_eq!(
            value(&m, &format!("{hs}_count"), &client_side),
            f64::from(n)
        );
        assert_eq!(
            value(&m, &format!("{hs}_count"), &server_side),
            f64::from(n)
        );
        for (side, labels) in [("client", &client_side), ("server", &server_side)] {
            let mean = value(&m, &format!("{hs}_sum"), labels) / f64::from(n) * 1000.0;
            eprintln!("  handshake {side}: {mean:.3} ms");
            within(
                &format!("{side} handshake vs injected"),
                mean,
                delay_ms,
                0.05,
            );
            within(
                &format!("{side} handshake vs the client's"),
                mean,
                connect_ms,
                0.05,
            );
        }
        let rtt = "fathom_tcp_rtt_seconds";
        let samples = value(&m, &format!("{rtt}_count"), &client_side);
        assert!(samples >= f64::from(n), "{samples} RTT samples");
        let mean = value(&m, &format!("{rtt}_sum"), &client_side) / samples * 1000.0;
        eprintln!("  rtt client: {mean:.3} ms over {samples} samples");
        within("client RTT vs injected", mean, delay_ms, 0.05);
        within("client RTT vs TCP_INFO", mean, rtt_ms, 0.05);
        // Bytes: the client's 10 × 100 bytes of payload each way, per
        // connection, are in its transmit and receive counters.
        let tx = value(
            &m,
            "fathom_network_bytes_total",
            &[
                client_side[0],
                client_side[1],
                client_side[3],
                ("network_io_direction", "transmit"),
            ],
        );
        assert!(tx >= f64::from(n) * 1000.0, "client transmit bytes {tx}");

        // Prometheus has the same: the mean and the median from buckets.
        let sel = format!("{{job=\"{client}\",direction=\"client\",server_port=\"{sp}\"}}");
        let mean = promql_until(
            prom_port,
            &format!("sum({hs}_sum{sel}) / sum({hs}_count{sel})"),
            |_| true,
        );
        within("Prometheus handshake mean", mean * 1000.0, delay_ms, 0.05);
        let p50 = promql_until(
            prom_port,
            &format!("histogram_quantile(0.5, sum by (le) ({hs}_bucket{sel}))"),
            |_| true,
        );
        eprintln!(
            "  prometheus: mean {:.3} ms, p50 {:.3} ms",
            mean * 1000.0,
            p50 * 1000.0
        );
        within("Prometheus handshake p50", p50 * 1000.0, delay_ms, 0.05);
        let p50 = promql_until(
            prom_port,
            &format!("histogram_quantile(0.5, sum by (le) ({rtt}_bucket{sel}))"),
            |_| true,
        );
        within("Prometheus RTT p50", p50 * 1000.0, delay_ms, 0.05);
    }

    // The interface goes: forgotten; the agent leaves nothing behind.
    let host_if = topo.host_if.clone();
    drop(topo);
    agent.wait_for_log(
        &format!("network hooks removed interface={host_if}"),
        Duration::from_secs(20),
    );
    agent.signal("TERM");
    let (status, _) = agent.finish(Duration::from_secs(30));
    assert!(status.success());
    let progs = run(&["bpftool", "prog", "show"]);
    assert!(!progs.contains("net_tc_ingress"), "{progs}");
}

/// Loss on the link: the server's retransmits equal the kernel's own count
/// in the server's namespace.
#[test]
fn retransmits_match_the_kernel_counters() {
    let Some(_kernel) = KernelTest::acquire("retransmits_match_the_kernel_counters") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = build_fixture("delay_link", dir.path());
    let tag = tag();
    let mut topo = Topology::new(&tag, subnet(1), &relay);
    topo.set_link(2000, 0);
    let (_agent, port) = agent(&topo.host_if.clone(), dir.path());
    let server_name = format!("{tag}-sender");
    // The server streams 3000 small messages once the client says go.
    let sender = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 18100))
s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.recv(1)
for _ in range(3000):
    c.sendall(b"y" * 100)
    time.sleep(0.001)
c.recv(1)
"#;
    let mut cmd = topo.in_pod("python3");
    cmd.env("OTEL_SERVICE_NAME", &server_name)
        .args(["-c", sender, &topo.pod_ip])
        .stdout(Stdio::piped());
    let mut server = ChildGuard::spawn(&mut cmd);
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut client = std::net::TcpStream::connect((topo.pod_ip.as_str(), 18100)).unwrap();
    // Loss from here on (the handshake is done: no SYN-ACK retransmits,
    // which the kernel counts and `tcp_retransmit_skb` does not see).
    topo.set_link(2000, 50_000);
    use std::io::{Read as _, Write as _};
    client.write_all(b"g").unwrap();
    let mut got = 0;
    let mut buf = [0u8; 65536];
    while got < 300_000 {
        got += client.read(&mut buf).unwrap();
    }
    // Everything acknowledged before the counters are compared.
    std::thread::sleep(Duration::from_secs(3));
    let nstat = run(&[
        "ip",
        "netns",
        "exec",
        &topo.pod,
        "nstat",
        "-az",
        "TcpRetransSegs",
    ]);
    let kernel: f64 = nstat
        .lines()
        .find(|l| l.starts_with("TcpRetransSegs"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("kernel TcpRetransSegs in the server's namespace: {kernel}");
    assert!(
        kernel >= 20.0,
        "5% loss of ~3000 segments: {kernel} retransmits"
    );
    let labels = [
        ("job", server_name.as_str()),
        ("direction", "server"),
        ("server_port", "18100"),
    ];
    wait_count(port, "fathom_tcp_retransmits_total", &labels, kernel);
    std::thread::sleep(Duration::from_secs(2));
    let ours = value(&scrape(port), "fathom_tcp_retransmits_total", &labels);
    assert_eq!(ours, kernel);
    client.write_all(b"e").unwrap();
}

/// A DNS server behind a delayed link: latency and response codes.
#[test]
fn dns_latency_and_rcodes() {
    let Some(_kernel) = KernelTest::acquire("dns_latency_and_rcodes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = build_fixture("delay_link", dir.path());
    let tag = tag();
    let mut topo = Topology::new(&tag, subnet(2), &relay);
    topo.set_link(20_000, 0);
    topo.warm_arp();
    let (agent, port) = agent(&topo.host_if.clone(), dir.path());
    assert_eq!(
        tcx_programs(&topo.host_if),
        ["net_tc_ingress", "net_tc_egress"]
    );
    let _dnsmasq = topo.dnsmasq(&dir.path().join("dnsmasq.pid"));
    // Queries over fresh sockets; prints the mean response time (ms) and
    // the rcodes seen.
    let client = r#"
import random, socket, struct, sys, time
server, names = sys.argv[1], sys.argv[2:]
times, rcodes = [], []
for name in names:
    q = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    t = time.perf_counter()
    s.sendto(q, (server, 53))
    r = s.recv(512)
    times.append((time.perf_counter() - t) * 1000)
    rcodes.append(r[3] & 15)
    s.close()
    time.sleep(0.02)
print(sum(times) / len(times), " ".join(map(str, rcodes)), flush=True)
"#;
    let mut names = vec!["ok.fathom.test"; 10];
    names.extend(["nx.fathom.test"; 10]);
    let out = Command::new("python3")
        .args(["-c", client, &topo.pod_ip])
        .args(&names)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut f = text.split_whitespace();
    let mean_ms: f64 = f.next().unwrap().parse().unwrap();
    let rcodes: Vec<&str> = f.collect();
    assert_eq!(rcodes, [vec!["0"; 10], vec!["3"; 10]].concat());
    eprintln!("client measured DNS response time {mean_ms:.3} ms");
    let d = "fathom_dns_request_duration_seconds";
    for rcode in ["NOERROR", "NXDOMAIN"] {
        let labels = [("peer", topo.pod_ip.as_str()), ("dns_rcode", rcode)];
        wait_count(port, &format!("{d}_count"), &labels, 10.0);
        let m = scrape(port);
        assert_eq!(value(&m, &format!("{d}_count"), &labels), 10.0);
        // From the node's own address: no process is known for the
        // short-lived resolver socket.
        assert_eq!(
            value(
                &m,
                &format!("{d}_count"),
                &[labels[0], labels[1], ("job", "unknown")]
            ),
            10.0,
            "{:#?}",
            m.iter()
                .filter(|((n, _), _)| n.starts_with(d))
                .filter(|((n, _), _)| n.ends_with("_count"))
                .collect::<Vec<_>>()
        );
        let mean = value(&m, &format!("{d}_sum"), &labels) / 10.0 * 1000.0;
        eprintln!("  {rcode}: {mean:.3} ms");
        within(&format!("DNS {rcode} vs injected"), mean, 20.0, 0.05);
        within(&format!("DNS {rcode} vs the client's"), mean, mean_ms, 0.05);
    }

    // Stopped, the agent leaves no program or filter on the interface.
    agent.signal("TERM");
    let (status, _) = agent.finish(Duration::from_secs(30));
    assert!(status.success());
    assert_eq!(tcx_programs(&topo.host_if), Vec::<String>::new());
    for dir in ["ingress", "egress"] {
        let filters = run(&["tc", "filter", "show", "dev", &topo.host_if, dir]);
        assert_eq!(filters, "", "{dir}");
    }
}

/// UDP bytes and packets are exact, through the programs' fast path (plain
/// IPv4) and their slow one (IPv4 with options, read with
/// `bpf_skb_load_bytes`): the oracle is the datagrams the client sent.
#[test]
fn udp_bytes_and_packets_are_exact() {
    let Some(_kernel) = KernelTest::acquire("udp_bytes_and_packets_are_exact") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = build_fixture("delay_link", dir.path());
    let tag = tag();
    let mut topo = Topology::new(&tag, subnet(3), &relay);
    topo.set_link(0, 0);
    topo.warm_arp();
    let (_agent, port) = agent(&topo.host_if.clone(), dir.path());
    let (plain_port, options_port) = (18201u16, 18202u16);
    let sink = r#"
import socket, sys, threading
def sink(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], port))
    while True:
        s.recv(65536)
for p in sys.argv[2:]:
    threading.Thread(target=sink, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"#;
    let sink_name = format!("{tag}-udp-sink");
    let mut cmd = topo.in_pod("python3");
    cmd.env("OTEL_SERVICE_NAME", &sink_name)
        .args(["-c", sink, &topo.pod_ip])
        .args([plain_port.to_string(), options_port.to_string()])
        .stdout(Stdio::piped());
    let mut sink = ChildGuard::spawn(&mut cmd);
    assert_eq!(sink.first_line(), "listening");

    // N datagrams of 100 bytes to each port; the second socket's carry four
    // bytes of IPv4 options (NOP NOP NOP EOL: a 24-byte IP header). Half
    // interleaved and paced (each packet replaces the CPU's cached flow),
    // half in a burst per socket (the programs' cached-flow paths: header
    // words for the plain one, its key for the one with options). The
    // client stays, so that its sockets name it.
    const N: u32 = 40;
    let client = r#"
import socket, sys, time
host, plain, options, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
b.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 1, 1, 0]))
for _ in range(n // 2):
    a.sendto(b"u" * 100, (host, plain))
    b.sendto(b"o" * 100, (host, options))
    time.sleep(0.005)
for s, port, byte in [(a, plain, b"u"), (b, options, b"o")]:
    for _ in range(n - n // 2):
        s.sendto(byte * 100, (host, port))
    time.sleep(0.05)
print("sent", flush=True)
time.sleep(300)
"#;
    let client_name = format!("{tag}-udp-client");
    let mut client = ChildGuard::spawn(
        Command::new("python3")
            .env("OTEL_SERVICE_NAME", &client_name)
            .args(["-c", client, &topo.pod_ip])
            .args([
                plain_port.to_string(),
                options_port.to_string(),
                N.to_string(),
            ])
            .stdout(Stdio::piped()),
    );
    assert_eq!(client.first_line(), "sent");

    // Bytes as the hook sees them: Ethernet 14 + IPv4 (20, or 24 with the
    // options) + UDP 8 + 100 of payload; on both ends, each named by its
    // bound socket: the client's transmit is the sink's receive.
    for (server_port, ip_header) in [(plain_port, 20u32), (options_port, 24)] {
        let sp = server_port.to_string();
        let end_labels = |job, direction, io: &'static str| {
            [
                ("job", job),
                ("direction", direction),
                ("server_port", sp.as_str()),
                ("network_io_direction", io),
            ]
        };
        let labels = |io| end_labels(client_name.as_str(), "client", io);
        let server_labels = |io| end_labels(sink_name.as_str(), "server", io);
        let packets = "fathom_network_packets_total";
        let bytes = "fathom_network_bytes_total";
        wait_count(port, packets, &labels("transmit"), f64::from(N));
        // One more flush: nothing more arrives.
        std::thread::sleep(Duration::from_secs(3));
        let m = scrape(port);
        let context = || {
            format!(
                "{:#?}",
                m.iter()
                    .filter(|((n, l), _)| n.starts_with("fathom_network_")
                        && l.get("server_port") == Some(&sp))
                    .collect::<Vec<_>>()
            )
        };
        assert_eq!(
            value(&m, packets, &labels("transmit")),
            f64::from(N),
            "packets to port {sp}: {}",
            context()
        );
        assert_eq!(
            value(&m, bytes, &labels("transmit")),
            f64::from(N * (14 + ip_header + 8 + 100)),
            "bytes to port {sp}: {}",
            context()
        );
        assert_eq!(
            value(&m, packets, &labels("receive")),
            0.0,
            "nothing came back from port {sp}: {}",
            context()
        );
        for (name, want) in [
            (packets, f64::from(N)),
            (bytes, f64::from(N * (14 + ip_header + 8 + 100))),
        ] {
            assert_eq!(
                value(&m, name, &server_labels("receive")),
                want,
                "{name}: the sink's receive on port {sp}: {}",
                context()
            );
        }
        eprintln!(
            "  port {sp}: {N} datagrams, {} bytes, IP header {ip_header}",
            value(&m, bytes, &labels("transmit"))
        );
    }
}
