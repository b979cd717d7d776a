//! Trace context through real services whose clients keep their
//! connections (issue 20): a chain whose every hop reuses one pooled
//! keep-alive connection for all requests,
//!
//! ```text
//! test client ──▶ node_middle.js (http.Agent keepAlive) ──▶ python_service.py middle
//!             (requests.Session) ──▶ python_service.py leaf
//! ```
//!
//! with the agent tracing every process and exporting to rotel (a real
//! OpenTelemetry collector), whose spans are the oracle. Each front request
//! must come out as ONE trace of five spans, each the child of the one
//! before: Node SERVER → Node CLIENT → Python SERVER → Python CLIENT → leaf
//! SERVER. The share of complete traces is printed for each load.
//!
//! The test's own client is a keep-alive connection too; its spans (if any)
//! are not counted.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    ChildGuard, KernelTest, ROTEL_AGENT, Rotel, RotelSpan,
    chain::{go_build, read_response},
    free_port, start_traces_agent, start_traces_agent_with, workspace_root,
};

/// The body of `GET path` from `addr` (HTTP/1.0, connection closed).
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut stream, &mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(out)
}

const TOOLS: &[&str] = &["node", "python3", ROTEL_AGENT];
/// Sequential requests through the chain.
const REQUESTS: usize = 40;

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// A service of the chain: spawned, its port read from `listening PORT`.
struct Service {
    child: ChildGuard,
    port: u16,
}

impl Service {
    fn start(program: &str, args: &[String]) -> Self {
        let mut child = ChildGuard::spawn(
            Command::new(program)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{program} said {line:?}"));
        Self { child, port }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

fn fixture(name: &str) -> String {
    workspace_root()
        .join("tests/fixtures/pooled")
        .join(name)
        .display()
        .to_string()
}

fn pid_of(s: &RotelSpan) -> Option<u32> {
    s.resource.get("process.pid").and_then(|v| {
        v.trim_start_matches("Int(")
            .trim_end_matches(')')
            .parse()
            .ok()
    })
}

fn path_of(s: &RotelSpan) -> Option<String> {
    let v = s.attributes.get("url.path")?;
    Some(
        v.trim_start_matches("Str(")
            .trim_end_matches(')')
            .to_string(),
    )
}

/// The services of a chain in order (front, middle, leaf), and the paths
/// the middle and the leaf see for a front path.
struct Chain<'a> {
    names: [&'a str; 3],
    pids: [u32; 3],
    middle_path: fn(&str) -> String,
    leaf_path: fn(&str) -> String,
}

/// For each front path: whether its five spans form one trace of parent
/// links (front SERVER → front CLIENT → middle SERVER → middle CLIENT →
/// leaf SERVER).
fn complete_traces(spans: &[RotelSpan], chain: &Chain, paths: &[String]) -> (usize, Vec<String>) {
    let of = |pid: u32, kind: &str| -> Vec<&RotelSpan> {
        spans
            .iter()
            .filter(|s| pid_of(s) == Some(pid) && s.kind == kind)
            .collect()
    };
    const SERVER: &str = "SPAN_KIND_SERVER";
    const CLIENT: &str = "SPAN_KIND_CLIENT";
    let [front, middle, leaf] = chain.pids;
    let [front_name, mid_name, leaf_name] = chain.names;
    let (front_server, front_client) = (of(front, SERVER), of(front, CLIENT));
    let (mid_server, mid_client) = (of(middle, SERVER), of(middle, CLIENT));
    let leaf_server = of(leaf, SERVER);
    fn child_of<'a>(parent: &RotelSpan, among: &[&'a RotelSpan]) -> Option<&'a RotelSpan> {
        let found: Vec<&'a RotelSpan> = among
            .iter()
            .copied()
            .filter(|s| s.trace_id == parent.trace_id && s.parent_id == parent.span_id)
            .collect();
        (found.len() == 1).then(|| found[0])
    }
    let mut complete = 0;
    let mut broken = Vec::new();
    for path in paths {
        let Some(top) = front_server
            .iter()
            .find(|s| path_of(s).as_deref() == Some(path.as_str()))
        else {
            broken.push(format!("{path}: no {front_name} server span"));
            continue;
        };
        let found = child_of(top, &front_client)
            .and_then(|c| child_of(c, &mid_server).map(|s| (c, s)))
            .and_then(|(c, s)| child_of(s, &mid_client).map(|m| (c, s, m)))
            .and_then(|(c, s, m)| child_of(m, &leaf_server).map(|l| (c, s, m, l)));
        match found {
            Some((_, s, _, l))
                if path_of(s).as_deref() == Some(&(chain.middle_path)(path))
                    && path_of(l).as_deref() == Some(&(chain.leaf_path)(path)) =>
            {
                complete += 1
            }
            Some(_) => broken.push(format!("{path}: linked to another request's spans")),
            None => {
                // Where the chain breaks, for the message.
                let mut at = format!("{front_name} CLIENT");
                if let Some(c) = child_of(top, &front_client) {
                    at = format!("{mid_name} SERVER");
                    if let Some(s) = child_of(c, &mid_server) {
                        at = format!("{mid_name} CLIENT");
                        if child_of(s, &mid_client).is_some() {
                            at = format!("{leaf_name} SERVER");
                        }
                    }
                }
                broken.push(format!("{path}: no {at} child"));
            }
        }
    }
    (complete, broken)
}

/// Sends each client's paths in order over its own keep-alive connection
/// to `port`, the clients at once (one thread each); checks every reply.
fn drive(port: u16, clients: &[Vec<String>], reply: &[u8]) {
    std::thread::scope(|scope| {
        for paths in clients {
            scope.spawn(move || {
                let stream = TcpStream::connect(local(port)).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut reader = BufReader::new(&stream);
                for path in paths {
                    (&stream)
                        .write_all(format!("GET {path} HTTP/1.1\r\nHost: front\r\n\r\n").as_bytes())
                        .unwrap();
                    let response = read_response(&mut reader, false).unwrap();
                    assert_eq!(response.status, 200, "{path}");
                    assert_eq!(response.body, reply, "the chain's reply changed");
                }
            });
        }
    });
}

/// Waits until every path formed a complete trace (or 20 s passed); prints
/// and returns the number complete and what broke.
fn measure(rotel: &Rotel, chain: &Chain, label: &str, paths: &[String]) -> (usize, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (complete, broken) = loop {
        let spans = rotel.spans();
        let (complete, broken) = complete_traces(&spans, chain, paths);
        if complete == paths.len() || Instant::now() >= deadline {
            break (complete, broken);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "{label}: {complete} of {} requests gave one complete trace ({:.1}%)",
        paths.len(),
        100.0 * complete as f64 / paths.len() as f64
    );
    if !broken.is_empty() {
        println!("  broken: {broken:?}");
    }
    (complete, broken)
}

/// The agent's last counts of how client requests got their parent.
fn parent_rules(log: &str) -> String {
    let Some(line) = log.lines().rev().find(|l| l.contains("parent_goroutine=")) else {
        return "no stats line".into();
    };
    [
        "parent_goroutine",
        "parent_thread",
        "parent_guessed",
        "parent_missed",
    ]
    .iter()
    .filter_map(|k| {
        let at = line.find(&format!("{k}="))?;
        Some(line[at..].split_whitespace().next()?.to_string())
    })
    .collect::<Vec<_>>()
    .join(" ")
}

#[test]
fn pooled_keep_alive_chain_gives_one_trace_per_request() {
    let Some(kernel) =
        KernelTest::with_tools("pooled_keep_alive_chain_gives_one_trace_per_request", TOOLS)
            .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rotel = start_rotel(&kernel, dir.path());
    let leaf = Service::start("python3", &[fixture("python_service.py"), "leaf".into()]);
    let middle = Service::start(
        "python3",
        &[
            fixture("python_service.py"),
            "middle".into(),
            leaf.port.to_string(),
        ],
    );
    let node = Service::start(
        "node",
        &[fixture("node_middle.js"), middle.port.to_string()],
    );
    let _agent = start_traces_agent(&rotel, dir.path());

    // One keep-alive connection from the test, sequential requests: every
    // hop reuses its one pooled connection for all of them. Every fourth
    // makes Node upload a chunked body upstream on its pooled connection:
    // the requests after it on that connection keep their context.
    let paths: Vec<String> = (0..REQUESTS)
        .map(|i| match i % 4 {
            1 => format!("/u{i}"),
            _ => format!("/r{i}"),
        })
        .collect();
    drive(node.port, std::slice::from_ref(&paths), b"node>py>leaf");
    let chain = Chain {
        names: ["Node", "Python", "leaf"],
        pids: [node.pid(), middle.pid(), leaf.pid()],
        middle_path: |p| format!("/mid{p}"),
        leaf_path: |p| format!("/leaf/mid{p}"),
    };
    let (complete, broken) = measure(&rotel, &chain, "pooled chain, sequential", &paths);
    assert_share("sequential", complete, paths.len(), &broken);
}

/// rotel, the oracle, on two free loopback ports, writing into `dir`.
fn start_rotel(kernel: &KernelTest, dir: &Path) -> Rotel {
    Rotel::start(
        kernel.path(ROTEL_AGENT),
        local(free_port()),
        local(free_port()),
        dir,
    )
}

/// At least 95% of `total` requests formed a complete trace.
fn assert_share(label: &str, complete: usize, total: usize, broken: &[String]) {
    assert!(
        complete * 100 >= total * 95,
        "{label}: {complete} of {total} complete traces; broken: {broken:#?}"
    );
}

/// Issue 20's chain: uninstrumented Go, Node and Python services whose
/// clients reuse their connections,
///
/// ```text
/// test clients ──▶ go_middle (one shared http.Client) ──▶ node_middle.js
///              (http.Agent keepAlive, no socket bound) ──▶ python_service.py leaf
/// ```
///
/// driven sequentially, then by concurrent clients. Go writes each request
/// from its transport's write-loop goroutine, on any thread, and half the
/// front paths (`/g…`) call out from a goroutine the handler starts: only
/// the goroutine probes give those their parent. Node serves the
/// concurrent requests on one thread.
#[test]
fn go_node_python_chain_gives_one_trace_per_request() {
    const NAME: &str = "go_node_python_chain_gives_one_trace_per_request";
    let Some(kernel) = KernelTest::with_tools(NAME, &["node", "python3", "go", ROTEL_AGENT])
        .map(KernelTest::agent)
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rotel = start_rotel(&kernel, dir.path());
    let go_middle = go_build(
        &workspace_root().join("tests/fixtures/pooled/go_middle.go"),
        "go_middle",
        false,
    );
    let leaf = Service::start("python3", &[fixture("python_service.py"), "leaf".into()]);
    let node = Service::start(
        "node",
        &[fixture("node_middle.js"), leaf.port.to_string(), "0".into()],
    );
    let go = Service::start(go_middle.to_str().unwrap(), &[node.port.to_string()]);
    let health = local(free_port());
    let agent = start_traces_agent_with(
        &rotel,
        dir.path(),
        &["--health-listen", &health.to_string()],
    );
    agent.wait_for_log("Go goroutine context attached", Duration::from_secs(10));
    let chain = Chain {
        names: ["Go", "Node", "Python leaf"],
        pids: [go.pid(), node.pid(), leaf.pid()],
        middle_path: |p| format!("/mid{p}"),
        leaf_path: |p| format!("/mid/mid{p}"),
    };
    let reply = b"go>node>leaf";

    // Sequential: one keep-alive connection, every hop reusing its pool.
    let sequential: Vec<String> = (0..REQUESTS)
        .map(|i| {
            if i % 2 == 0 {
                format!("/s{i}")
            } else {
                format!("/gs{i}")
            }
        })
        .collect();
    drive(go.port, std::slice::from_ref(&sequential), reply);
    let (seq_complete, seq_broken) = measure(
        &rotel,
        &chain,
        "Go > Node > Python, sequential",
        &sequential,
    );

    // Concurrent: CLIENTS connections at once.
    const CLIENTS: usize = 8;
    const EACH: usize = 25;
    let clients: Vec<Vec<String>> = (0..CLIENTS)
        .map(|c| {
            (0..EACH)
                .map(|i| {
                    if i % 2 == 0 {
                        format!("/c{c}-{i}")
                    } else {
                        format!("/gc{c}-{i}")
                    }
                })
                .collect()
        })
        .collect();
    drive(go.port, &clients, reply);
    let concurrent: Vec<String> = clients.concat();
    let (con_complete, con_broken) = measure(
        &rotel,
        &chain,
        &format!("Go > Node > Python, {CLIENTS} concurrent clients"),
        &concurrent,
    );
    // How parents were chosen, as /metrics says: every Go client request
    // through its goroutine.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = http_get(health, "/metrics");
    let rule = |name: &str| -> u64 {
        let key = format!("fathom_agent_trace_parent_total{{rule=\"{name}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key.as_str())?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} in /metrics:\n{metrics}"))
    };
    let rules = ["goroutine", "thread", "guessed", "missed"].map(|r| (r, rule(r)));
    println!("parent rules (/metrics): {rules:?}");
    agent.signal("TERM");
    let (_, log) = agent.finish(Duration::from_secs(20));
    println!("parent rules (log): {}", parent_rules(&log));
    let go_requests = (sequential.len() + concurrent.len()) as u64;
    assert_eq!(
        rules[0].1, go_requests,
        "Go client requests whose parent came from their goroutine"
    );
    assert_share("sequential", seq_complete, sequential.len(), &seq_broken);
    assert_share("concurrent", con_complete, concurrent.len(), &con_broken);
}

/// The goroutine probes' places in a stripped Go executable (no symbol
/// table, no DWARF: read from `.gopclntab`) are those in the same program
/// built with its symbols, which `go tool nm` confirms.
#[test]
fn go_probe_points_of_a_stripped_executable_match_its_symbols() {
    use fathom_agent::traces::golang::{self, GoBinaryError};
    if which("go").is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "go is not installed (CI needs it)"
        );
        println!("*** SKIPPED go_probe_points_of_a_stripped_executable: no go ***");
        return;
    }
    let source = workspace_root().join("tests/fixtures/pooled/go_middle.go");
    let full = go_build(&source, "go_middle_symbols", false);
    let stripped = go_build(&source, "go_middle_stripped", true);
    let a = golang::probe_points_of(&full).unwrap();
    let b = golang::probe_points_of(&stripped).unwrap();
    assert!(!a.stripped && b.stripped, "{a:?} {b:?}");
    assert_eq!(a.version, b.version);
    assert!(a.newproc_done.is_some(), "newproc1's call site not found");
    assert_eq!(
        (a.round_trip, a.request_write, a.newproc1, a.newproc_done),
        (b.round_trip, b.request_write, b.newproc1, b.newproc_done)
    );
    // `go tool nm`'s addresses, as file offsets (text: vaddr - 0x400000
    // for a non-PIE amd64 Go executable's first segment).
    let nm = Command::new("go")
        .args(["tool", "nm"])
        .arg(&full)
        .output()
        .unwrap();
    let nm = String::from_utf8_lossy(&nm.stdout);
    let addr = |name: &str| -> u64 {
        nm.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                let a = f.next()?;
                (f.next()? == "T" && f.next()? == name).then(|| u64::from_str_radix(a, 16).ok())?
            })
            .unwrap_or_else(|| panic!("{name} not in go tool nm"))
    };
    assert_eq!(a.round_trip, addr(golang::ROUND_TRIP) - 0x40_0000);
    assert_eq!(a.request_write, addr(golang::REQUEST_WRITE) - 0x40_0000);
    assert_eq!(a.newproc1, addr(golang::NEWPROC1) - 0x40_0000);
    // Not Go: a clear error, not a guess.
    assert!(matches!(
        golang::probe_points_of(Path::new("/bin/sh")),
        Err(GoBinaryError::NotGo)
    ));
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}
