//! The Grafana dashboards against what the agent really exports: the agent
//! (embedded collector) watches real HTTP traffic, real CPU work and real
//! network traffic through a delayed, lossy link (workloads in cgroups of a
//! pod from the replayed API server), a real
//! `prometheus` scrapes its `/metrics` (`honor_labels: true`, as the Helm
//! chart's ServiceMonitor does), and then
//! - every metric and label any dashboard's PromQL names is on `/metrics`,
//! - Prometheus itself runs every expression (Grafana variables set to match
//!   anything) and returns data for each,
//! - every Pyroscope label selector and group-by names labels the agent's
//!   profile series have, with the profile type they have,
//! - the services the dashboards' `job` variable offers are the ones Jaeger
//!   (here: the embedded store) finds traces for.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, ChildGuard, KernelTest, build_fixture,
    cgroups::{Cgroups, cgroup2_root, spawn_in},
    dashboards, free_port,
    k8s_replay::{ApiMode, K8sReplay, NODE, TOKEN, ids},
    netns::Topology,
    wait_for_port, workspace_root,
};

fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// A Python HTTP server answering 200, 404 and 500 by path, and a client
/// that keeps calling it: server and client spans and RED metrics with
/// every status class the dashboards ask for.
const SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = {"/ok": 200, "/missing": 404, "/boom": 500}.get(self.path, 404)
        body = b"x" * 100
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

const CLIENT: &str = r#"
import http.client, sys, time
port = int(sys.argv[1])
while True:
    for path in ("/ok", "/ok", "/missing", "/boom"):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            c.getresponse().read()
            c.close()
        except OSError:
            pass
        time.sleep(0.05)
"#;

/// `script` run by python3 with the port, inside `cgroup` when given.
fn python(
    dir: &Path,
    cgroup: Option<&Path>,
    name: &str,
    script: &str,
    port: u16,
    env: &[(&str, &str)],
) -> ChildGuard {
    let path = dir.join(name);
    std::fs::write(&path, script).unwrap();
    let python = fathom_tests::require_tool("python3", "python3").unwrap();
    spawn_in(
        cgroup,
        &python,
        &[path.to_str().unwrap(), &port.to_string()],
        env,
    )
}

/// From the pod's `app` container: TCP connections through the delayed,
/// lossy link to a server in another namespace (handshakes, RTT,
/// retransmits, bytes), connects to a closed port there (failed connects),
/// and DNS queries to dnsmasq there (NOERROR and NXDOMAIN).
const NET_CLIENT: &str = r#"
import random, socket, struct, sys, time
server, port, closed = sys.argv[2], int(sys.argv[1]), int(sys.argv[3])
def dns(name):
    q = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    try:
        s.sendto(q, (server, 53))
        s.recv(512)
    except OSError:
        pass
    s.close()
while True:
    try:
        c = socket.create_connection((server, port), timeout=5)
        c.sendall(b"GET /big.bin HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
        while c.recv(65536):
            pass
        c.close()
    except OSError:
        pass
    try:
        socket.create_connection((server, closed), timeout=2).close()
    except OSError:
        pass
    dns("ok.fathom.test")
    dns("nx.fathom.test")
    time.sleep(0.1)
"#;

fn get_text(url: &str) -> Option<String> {
    let resp = reqwest::blocking::get(url).ok()?;
    resp.status().is_success().then(|| resp.text().ok())?
}

fn get_json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(url).unwrap_or_else(|| panic!("GET {url} failed"))).unwrap()
}

/// Runs a PromQL instant query: `Err` when Prometheus refuses it, else the
/// number of series returned.
fn prom_query(prom: std::net::SocketAddr, q: &str) -> Result<usize, String> {
    let url =
        reqwest::Url::parse_with_params(&format!("http://{prom}/api/v1/query"), &[("query", q)])
            .unwrap();
    let resp = reqwest::blocking::get(url).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&resp.text().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{}: {}", v["errorType"], v["error"]));
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

#[test]
fn every_dashboard_query_refers_to_what_the_agent_exports() {
    const TEST: &str = "every_dashboard_query_refers_to_what_the_agent_exports";
    let Some(kernel) = KernelTest::acquire(TEST) else {
        return;
    };
    let Some(prom_bin) = kernel.require(
        "prometheus (Debian package prometheus)",
        Some("/usr/bin/prometheus".into()),
    ) else {
        return;
    };
    let Some(kernel) =
        kernel.tools(&["python3", "dnsmasq", "ip", "chrt", fathom_tests::FIXTURE_CC])
    else {
        return;
    };
    let Some(v2) = kernel.require("a mounted cgroup2 hierarchy", cgroup2_root()) else {
        return;
    };
    let _kernel = kernel.agent();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let all = dashboards::load(&workspace_root().join("dashboards"));
    let dir = tempfile::tempdir().unwrap();

    // The workloads run in a pod of the replayed API server (the labels the
    // dashboards filter on), in cgroups named the way the kubelet's systemd
    // driver names them.
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let replay = K8sReplay::start(ApiMode::Serve);
    replay.release_all();
    let mut cgroups = Cgroups::default();
    let pod_slice = format!(
        "fathomtest-dash-{}.slice/kubepods-burstable-pod5e1c8a4e_9d0b_4f3a_8c71_2b6f4d9e0a13.slice",
        std::process::id()
    );
    let app = cgroups.create(
        &v2,
        &format!("{pod_slice}/cri-containerd-{}.scope", ids::CHECKOUT_APP),
    );
    let proxy = cgroups.create(
        &v2,
        &format!("{pod_slice}/cri-containerd-{}.scope", ids::CHECKOUT_PROXY),
    );
    let spin = build_fixture("spin", dir.path());

    let http = local(free_port());
    let store = dir.path().join("store.redb");
    let agent = Agent::spawn(&[
        "--interval",
        "2s",
        "--http-listen",
        &http.to_string(),
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        store.to_str().unwrap(),
        "--k8s-api-url",
        &replay.url,
        "--node-name",
        NODE,
        "--k8s-token-file",
        token.to_str().unwrap(),
    ]);
    agent.wait_for_log("http tracing attached", Duration::from_secs(120));
    agent.wait_for_log("network metrics attached", Duration::from_secs(60));
    agent.wait_for_log("kubernetes metadata: pods listed", Duration::from_secs(30));

    let port = free_port();
    let _burner = spawn_in(Some(&app), &spin, &["alpha", "300"], &[]);
    // No OTEL_SERVICE_NAME: the pod's app.kubernetes.io/name names it.
    let _server = python(dir.path(), Some(&proxy), "server.py", SERVER, port, &[]);
    wait_for_port(local(port), Duration::from_secs(20));
    // The client runs in the pod too (its `app` container): client-side
    // metrics carry the pod labels the dashboards filter on.
    let _client = python(
        dir.path(),
        Some(&app),
        "client.py",
        CLIENT,
        port,
        &[("OTEL_SERVICE_NAME", "dash-client")],
    );

    // Network: a pod namespace behind a 20 ms link that drops 5% of frames.
    let relay = build_fixture("delay_link", dir.path());
    let tag = format!("fd{}", std::process::id() % 100_000);
    let subnet = ((std::process::id() % 60) * 4 + 3) as u8;
    let mut topo = Topology::new(&tag, subnet, &relay);
    topo.set_link(20_000, 50_000);
    topo.warm_arp();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("big.bin"), vec![b'x'; 200_000]).unwrap();
    let pod_port = free_port();
    let _pod_server = ChildGuard::spawn(
        topo.in_pod("python3")
            .args([
                "-m",
                "http.server",
                &pod_port.to_string(),
                "--bind",
                &topo.pod_ip,
            ])
            .current_dir(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let _dnsmasq = topo.dnsmasq(&dir.path().join("dnsmasq.pid"));
    let net_client_path = dir.path().join("net_client.py");
    std::fs::write(&net_client_path, NET_CLIENT).unwrap();
    let closed_port = free_port();
    let _net_client = spawn_in(
        Some(&app),
        &fathom_tests::require_tool("python3", "python3").unwrap(),
        &[
            net_client_path.to_str().unwrap(),
            &pod_port.to_string(),
            &topo.pod_ip,
            &closed_port.to_string(),
        ],
        &[("OTEL_SERVICE_NAME", "dash-net-client")],
    );

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: fathom\n    honor_labels: true\n    static_configs:\n      - targets: ['{http}']\n"
        ),
    )
    .unwrap();
    let prom = local(free_port());
    let _prometheus = ChildGuard::spawn(
        Command::new(prom_bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("prom").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(prom, Duration::from_secs(30));

    let queries: Vec<dashboards::Query> = all
        .iter()
        .flat_map(|(name, d)| dashboards::queries(name, d))
        .collect();

    // 1. Names and labels against the exposition, once everything the
    //    traffic produces has had time to appear.
    let deadline = Instant::now() + Duration::from_secs(90);
    let problems = loop {
        let exposed =
            dashboards::exposition_labels(&get_text(&format!("http://{http}/metrics")).unwrap());
        let mut problems = Vec::new();
        for q in &queries {
            match q {
                dashboards::Query::Prom { at, expr } => {
                    problems.extend(dashboards::prom_problems(at, expr, &exposed));
                }
                dashboards::Query::PromLabelValues {
                    at,
                    selector,
                    label,
                } => {
                    problems.extend(dashboards::prom_problems(at, selector, &exposed));
                    let refs = dashboards::promql_refs(selector).unwrap();
                    for m in refs.metrics.keys() {
                        if !exposed.get(m).is_some_and(|l| l.contains(label)) {
                            problems.push(format!("{at}: {m} has no label {label}"));
                        }
                    }
                }
                _ => {}
            }
        }
        if problems.is_empty() || Instant::now() > deadline {
            break problems;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    assert!(
        problems.is_empty(),
        "dashboard queries that /metrics cannot answer:\n{}",
        problems.join("\n")
    );

    // 2. Prometheus runs every expression and finds data.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: BTreeMap<String, String> = queries
        .iter()
        .filter_map(|q| match q {
            dashboards::Query::Prom { at, expr } => {
                Some((at.clone(), dashboards::substitute_variables(expr)))
            }
            dashboards::Query::PromLabelValues { at, selector, .. } => {
                Some((at.clone(), dashboards::substitute_variables(selector)))
            }
            _ => None,
        })
        .collect();
    let mut refused = Vec::new();
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|at, expr| match prom_query(prom, expr) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                refused.push(format!("{at}: Prometheus refuses {expr:?}: {e}"));
                false
            }
        });
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(refused.is_empty(), "{}", refused.join("\n"));
    assert!(
        pending.is_empty(),
        "queries Prometheus answers with no data:\n{}",
        pending
            .iter()
            .map(|(at, e)| format!("{at}: {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // 3. Pyroscope queries against the profile series the agent produced.
    let deadline = Instant::now() + Duration::from_secs(60);
    let series = loop {
        let s = get_json(&format!("http://{http}/api/series"));
        if s.as_array().is_some_and(|a| !a.is_empty()) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let series = series.as_array().expect("profile series");
    let mut profile_labels = BTreeSet::new();
    let mut profile_types = BTreeSet::new();
    for s in series {
        for pair in s["labels"].as_array().into_iter().flatten() {
            profile_labels.insert(pair[0].as_str().unwrap().to_string());
        }
        for t in s["sample_types"].as_str().unwrap().split(',') {
            // Pyroscope's id: name:sample type:unit:period type:unit; the
            // agent's period type is cpu/nanoseconds (pprof period_type).
            profile_types.insert(format!(
                "{}:{}:cpu:nanoseconds",
                s["profile_name"].as_str().unwrap(),
                t.replace('/', ":")
            ));
        }
    }
    let mut problems = Vec::new();
    for q in &queries {
        if let dashboards::Query::Pyroscope {
            at,
            profile_type,
            selector,
            labels,
        } = q
        {
            if !profile_types.contains(profile_type) {
                problems.push(format!(
                    "{at}: profile type {profile_type} not among {profile_types:?}"
                ));
            }
            for l in dashboards::selector_labels(selector)
                .unwrap()
                .iter()
                .chain(labels)
            {
                if !profile_labels.contains(l) {
                    problems.push(format!(
                        "{at}: profile label {l} not among {profile_labels:?}"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // 4. The job values offered to Jaeger searches have traces.
    let jobs: BTreeSet<String> = {
        let url = reqwest::Url::parse_with_params(
            &format!("http://{prom}/api/v1/label/job/values"),
            &[("match[]", "http_server_request_duration_seconds_count")],
        )
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&reqwest::blocking::get(url).unwrap().text().unwrap()).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j.as_str().unwrap().to_string())
            .collect()
    };
    assert!(jobs.contains("checkout-api"), "{jobs:?}");
    if queries
        .iter()
        .any(|q| matches!(q, dashboards::Query::Jaeger { service, .. } if service == "$service"))
    {
        for job in &jobs {
            let traces = get_json(&format!(
                "http://{http}/ui/api/traces?service={job}&range=15m"
            ));
            assert!(
                traces.as_array().is_some_and(|t| !t.is_empty()),
                "job {job} offered by the dashboard has no traces under that service name"
            );
        }
    }
    drop(agent);
    drop(cgroups);
    drop(topo);
}
