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
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    ChildGuard, KernelTest, ROTEL_AGENT, Rotel, RotelSpan, chain::read_response, free_port,
    start_traces_agent, workspace_root,
};

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

/// For each front path `/r{i}`: whether its five spans form one trace of
/// parent links (Node SERVER → Node CLIENT → Python SERVER → Python CLIENT
/// → leaf SERVER).
fn complete_traces(
    spans: &[RotelSpan],
    node: u32,
    middle: u32,
    leaf: u32,
    paths: &[String],
) -> (usize, Vec<String>) {
    let of = |pid: u32, kind: &str| -> Vec<&RotelSpan> {
        spans
            .iter()
            .filter(|s| pid_of(s) == Some(pid) && s.kind == kind)
            .collect()
    };
    const SERVER: &str = "SPAN_KIND_SERVER";
    const CLIENT: &str = "SPAN_KIND_CLIENT";
    let (node_server, node_client) = (of(node, SERVER), of(node, CLIENT));
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
        let Some(front) = node_server
            .iter()
            .find(|s| path_of(s).as_deref() == Some(path.as_str()))
        else {
            broken.push(format!("{path}: no Node server span"));
            continue;
        };
        let chain = child_of(front, &node_client)
            .and_then(|c| child_of(c, &mid_server).map(|s| (c, s)))
            .and_then(|(c, s)| child_of(s, &mid_client).map(|m| (c, s, m)))
            .and_then(|(c, s, m)| child_of(m, &leaf_server).map(|l| (c, s, m, l)));
        match chain {
            Some((_, s, _, l))
                if path_of(s).as_deref() == Some(&format!("/mid{path}"))
                    && path_of(l).as_deref() == Some(&format!("/leaf/mid{path}")) =>
            {
                complete += 1
            }
            Some(_) => broken.push(format!("{path}: linked to another request's spans")),
            None => {
                // Where the chain breaks, for the message.
                let mut at = "Node CLIENT";
                if let Some(c) = child_of(front, &node_client) {
                    at = "Python SERVER";
                    if let Some(s) = child_of(c, &mid_server) {
                        at = "Python CLIENT";
                        if child_of(s, &mid_client).is_some() {
                            at = "leaf SERVER";
                        }
                    }
                }
                broken.push(format!("{path}: no {at} child"));
            }
        }
    }
    (complete, broken)
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
    let rotel = Rotel::start(
        kernel.path(ROTEL_AGENT),
        local(free_port()),
        local(free_port()),
        dir.path(),
    );
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
    // hop reuses its one pooled connection for all of them.
    let stream = TcpStream::connect(local(node.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(&stream);
    let paths: Vec<String> = (0..REQUESTS).map(|i| format!("/r{i}")).collect();
    for path in &paths {
        (&stream)
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n").as_bytes())
            .unwrap();
        let response = read_response(&mut reader, false).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"node>py>leaf", "the chain's reply changed");
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let (complete, broken) = loop {
        let spans = rotel.spans();
        let (complete, broken) =
            complete_traces(&spans, node.pid(), middle.pid(), leaf.pid(), &paths);
        if complete == paths.len() || Instant::now() >= deadline {
            break (complete, broken);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    println!(
        "pooled chain, sequential: {complete} of {} requests gave one complete trace \
         ({:.1}%)",
        paths.len(),
        100.0 * complete as f64 / paths.len() as f64
    );
    assert!(
        complete * 100 >= paths.len() * 95,
        "{complete} of {} complete traces; broken: {broken:#?}",
        paths.len()
    );
}
