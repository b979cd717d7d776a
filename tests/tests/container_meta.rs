//! Container and pod metadata on every signal, on the real kernel.
//!
//! Real cgroups named the way container runtimes name them — cgroup v2
//! `cri-containerd-<id>.scope` and `docker-<id>.scope` under a slice, and a
//! cgroup v1 (`pids` hierarchy) cgroupfs-driver `docker/<id>` — each with a
//! unique parent (`fathomtest-k8s-<pid>...`), removed by a guard that
//! moves every process back to the root first. Real workloads are started
//! inside them (moved in before they exec, as a runtime does): a CPU
//! burner (profiles), an HTTP server and a curl loop (spans and RED
//! metrics), plus the same workloads outside any container. The real agent
//! (embedded collector) runs; its API (`/api/series`, `/ui/api/traces`) and
//! `/metrics` must show the right `container.id` for the contained
//! processes, and none for the others.
//!
//! `pods_on_every_signal` adds the Kubernetes side: the agent watches a
//! REPLAY of the API server (tests/src/k8s_replay.rs, fixtures in
//! tests/fixtures/k8s/) and the workloads run in cgroups named after
//! container ids of the recorded pod list; their signals must carry the
//! pod, namespace, container, node and owner, and `service.name` from the
//! pod's `app.kubernetes.io/name` label.
//!
//! Needs root and BPF (holds a `KernelTest`, the kernel lock); skips with a
//! printed reason elsewhere, fails under `CI=true`.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fathom_tests::{
    Agent, ChildGuard, KernelTest, build_fixture,
    cgroups::{Cgroups, cgroup1_root, cgroup2_root, spawn_in},
    chain::http_get,
    free_port,
    k8s_replay::{ApiMode, K8sReplay, NODE, TOKEN, ids},
    wait_for_port,
};
use serde_json::Value;

/// How long signals may take to show up in the agent's API.
const SIGNAL_WAIT: Duration = Duration::from_secs(90);

/// What both tests need besides BPF.
const TOOLS: &[&str] = &["python3", "curl", fathom_tests::FIXTURE_CC];

/// A 64-hex-digit container id unique to this run.
fn fake_id(tag: &str) -> String {
    let seed = format!("{tag}-{}-{:?}", std::process::id(), Instant::now());
    let mut out = String::new();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    while out.len() < 64 {
        for b in seed.bytes().chain(out.len().to_le_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// The agent with the embedded collector on a free port: profiles (2 s
/// intervals, 1 s windows) and traces.
fn start_agent(dir: &Path, extra: &[&str]) -> (Agent, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = dir.join("store.redb");
    let mut args = vec![
        "--signals",
        "profiles,traces",
        "--interval",
        "2s",
        "--window",
        "1s",
        "--http-listen",
        &listen,
        "--otlp-grpc-listen",
        "off",
        "--otlp-http-listen",
        "off",
        "--store-path",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let agent = Agent::spawn(&args);
    agent.wait_for_log("http tracing attached", Duration::from_secs(90));
    wait_for_port(([127, 0, 0, 1], port).into(), Duration::from_secs(30));
    (agent, port)
}

fn api_json(port: u16, path: &str) -> Value {
    let r = http_get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(
        r.status,
        200,
        "GET {path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    serde_json::from_slice(&r.body).unwrap()
}

fn pairs(v: &Value) -> BTreeMap<String, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
        .collect()
}

/// The label sets of the profile series of `service` (polled until there
/// is at least one).
fn series_labels(port: u16, service: &str) -> Vec<BTreeMap<String, String>> {
    let deadline = Instant::now() + SIGNAL_WAIT;
    loop {
        let v = api_json(port, &format!("/api/series?service={service}"));
        let labels: Vec<_> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| pairs(&s["labels"]))
            .collect();
        if !labels.is_empty() {
            return labels;
        }
        assert!(
            Instant::now() < deadline,
            "no profile series of {service} after {SIGNAL_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Resources of the spans whose `service.name` is `service` and kind
/// `kind` (polled until there is one).
fn span_resources(port: u16, service: &str, kind: &str) -> Vec<BTreeMap<String, String>> {
    let deadline = Instant::now() + SIGNAL_WAIT;
    loop {
        let list = api_json(
            port,
            &format!("/ui/api/traces?service={service}&range=1h&limit=20"),
        );
        let mut out = Vec::new();
        for t in list.as_array().into_iter().flatten() {
            let Some(id) = t["trace_id"].as_str() else {
                continue;
            };
            let detail = api_json(port, &format!("/ui/api/traces/{id}"));
            for span in detail["spans"].as_array().into_iter().flatten() {
                let resource = pairs(&span["resource"]);
                if span["kind"] == kind
                    && resource.get("service.name").map(String::as_str) == Some(service)
                {
                    out.push(resource);
                }
            }
        }
        if !out.is_empty() {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} span of {service} after {SIGNAL_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The label sets of `metric` on `/metrics` whose `job` is `job` (polled
/// until there is one).
fn metric_labels(port: u16, metric: &str, job: &str) -> Vec<BTreeMap<String, String>> {
    let deadline = Instant::now() + SIGNAL_WAIT;
    loop {
        let r = http_get(port, "/metrics").unwrap();
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let found: Vec<_> = text
            .lines()
            .filter_map(|l| l.strip_prefix(metric)?.strip_prefix('{'))
            .filter_map(|l| l.rsplit_once("} ").map(|(labels, _)| parse_labels(labels)))
            .filter(|labels| labels.get("job").map(String::as_str) == Some(job))
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {metric}{{job={job:?}}} on /metrics after {SIGNAL_WAIT:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `a="x",b="y"` (no escapes in the values these tests look at).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}

fn python_server(cgroup: Option<&Path>, port: u16, service: Option<&str>) -> ChildGuard {
    let python = which("python3");
    let port = port.to_string();
    let env: Vec<(&str, &str)> = service
        .map(|s| ("OTEL_SERVICE_NAME", s))
        .into_iter()
        .collect();
    let child = spawn_in(
        cgroup,
        &python,
        &["-m", "http.server", &port, "--bind", "127.0.0.1"],
        &env,
    );
    wait_for_port(
        ([127, 0, 0, 1], port.parse().unwrap()).into(),
        Duration::from_secs(20),
    );
    child
}

/// A shell that runs curl against `ports` every 200 ms.
fn curl_loop(cgroup: Option<&Path>, ports: &[u16], service: &str) -> ChildGuard {
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("curl -s -o /dev/null http://127.0.0.1:{p}/;"))
        .collect();
    let script = format!("while :; do {} sleep 0.2; done", urls.join(" "));
    spawn_in(
        cgroup,
        Path::new("/bin/sh"),
        &["-c", &script],
        &[("OTEL_SERVICE_NAME", service)],
    )
}

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn get<'a>(labels: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    labels.get(k).map(String::as_str)
}

/// The kernel lock (the agent built) and the cgroup2 mount, or `None`
/// after a printed reason (a failure under `CI=true`).
fn kernel_and_cgroup2(test: &str) -> Option<(KernelTest, PathBuf)> {
    let kernel = KernelTest::with_tools(test, TOOLS)?;
    let v2 = kernel.require("a mounted cgroup2 hierarchy", cgroup2_root())?;
    Some((kernel.agent(), v2))
}

#[test]
fn container_ids_on_every_signal() {
    let Some((_kernel, v2)) = kernel_and_cgroup2("container_ids_on_every_signal") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let mut cgroups = Cgroups::default();
    let containerd_id = fake_id("containerd");
    let docker_id = fake_id("docker");
    let v1_id = fake_id("v1");
    let slice = format!("fathomtest-k8s-{pid}.slice");
    let containerd = cgroups.create(
        &v2,
        &format!("{slice}/cri-containerd-{containerd_id}.scope"),
    );
    let docker = cgroups.create(&v2, &format!("{slice}/docker-{docker_id}.scope"));
    // cgroup v1 (cgroupfs driver) where this machine has the hierarchy.
    let v1 = cgroup1_root("pids")
        .map(|root| cgroups.create(&root, &format!("fathomtest-k8s-{pid}/docker/{v1_id}")));
    if v1.is_none() {
        eprintln!("*** no cgroup v1 pids hierarchy: the v1 client runs in a v2 cgroup ***");
    }
    let client_cgroup = v1
        .clone()
        .unwrap_or_else(|| cgroups.create(&v2, &format!("{slice}/docker-{v1_id}.scope")));

    let spin = build_fixture("spin", dir.path());
    let burn_in = dir.path().join(format!("fathom-ct-in-{pid}"));
    let burn_out = dir.path().join(format!("fathom-ct-out-{pid}"));
    std::fs::copy(&spin, &burn_in).unwrap();
    std::fs::copy(&spin, &burn_out).unwrap();

    let (agent, api) = start_agent(dir.path(), &[]);
    let (port_in, port_out) = (free_port(), free_port());
    let _workloads = [
        spawn_in(Some(&containerd), &burn_in, &["alpha", "120"], &[]),
        spawn_in(None, &burn_out, &["alpha", "120"], &[]),
        python_server(Some(&docker), port_in, Some("fathom-ct-server-in")),
        python_server(None, port_out, Some("fathom-ct-server-out")),
        curl_loop(
            Some(&client_cgroup),
            &[port_in, port_out],
            "fathom-ct-client-in",
        ),
        curl_loop(None, &[port_in], "fathom-ct-client-out"),
    ];

    // Profiles: the series of the contained burner has its container id.
    let service_in = burn_in.file_name().unwrap().to_str().unwrap();
    let service_out = burn_out.file_name().unwrap().to_str().unwrap();
    for labels in series_labels(api, service_in) {
        assert_eq!(
            get(&labels, "container_id"),
            Some(containerd_id.as_str()),
            "{labels:?}"
        );
        assert_eq!(get(&labels, "pod"), None, "no Kubernetes here: {labels:?}");
    }
    for labels in series_labels(api, service_out) {
        assert_eq!(get(&labels, "container_id"), None, "{labels:?}");
    }

    // Spans.
    let expect_span = |service: &str, kind: &str, id: Option<&str>| {
        for r in span_resources(api, service, kind) {
            assert_eq!(get(&r, "container.id"), id, "{service} {kind}: {r:?}");
        }
    };
    expect_span("fathom-ct-server-in", "server", Some(&docker_id));
    expect_span("fathom-ct-client-in", "client", Some(&v1_id));
    expect_span("fathom-ct-server-out", "server", None);
    expect_span("fathom-ct-client-out", "client", None);

    // RED metrics on /metrics.
    let expect_metric = |metric: &str, job: &str, id: Option<&str>| {
        for l in metric_labels(api, metric, job) {
            assert_eq!(get(&l, "container_id"), id, "{metric} {job}: {l:?}");
        }
    };
    let server = "http_server_request_duration_seconds_count";
    let client = "http_client_request_duration_seconds_count";
    expect_metric(server, "fathom-ct-server-in", Some(&docker_id));
    expect_metric(client, "fathom-ct-client-in", Some(&v1_id));
    expect_metric(server, "fathom-ct-server-out", None);
    expect_metric(client, "fathom-ct-client-out", None);

    drop(_workloads);
    agent.signal("INT");
    let (status, _) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "agent exit: {status:?}");
    drop(cgroups);
    assert!(!v2.join(&slice).exists());
}

#[test]
fn pods_on_every_signal() {
    let Some((_kernel, v2)) = kernel_and_cgroup2("pods_on_every_signal") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let replay = K8sReplay::start(ApiMode::Serve);
    replay.release_all();
    let pid = std::process::id();
    let mut cgroups = Cgroups::default();
    // As the kubelet's systemd driver names them.
    let pod_slice = format!(
        "fathomtest-k8s-{pid}.slice/kubepods-burstable-pod5e1c8a4e_9d0b_4f3a_8c71_2b6f4d9e0a13.slice"
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
    let burner = dir.path().join(format!("fathom-ct-pod-{pid}"));
    std::fs::copy(&spin, &burner).unwrap();
    let (agent, api) = start_agent(
        dir.path(),
        &[
            "--k8s-api-url",
            &replay.url,
            "--node-name",
            NODE,
            "--k8s-token-file",
            token.to_str().unwrap(),
        ],
    );
    agent.wait_for_log("kubernetes metadata: pods listed", Duration::from_secs(30));
    let port = free_port();
    let _workloads = [
        spawn_in(Some(&app), &burner, &["alpha", "120"], &[]),
        // No OTEL_SERVICE_NAME: the pod's app.kubernetes.io/name names it.
        python_server(Some(&proxy), port, None),
        curl_loop(None, &[port], "fathom-ct-pod-client"),
    ];
    let pod = "checkout-6b8f9c7d5-x2x7q";

    // Profiles: Pyroscope's spellings.
    let series = series_labels(api, "checkout-api");
    let burner_series: Vec<_> = series
        .iter()
        .filter(|l| get(l, "container") == Some("app"))
        .collect();
    assert!(!burner_series.is_empty(), "{series:?}");
    for l in burner_series {
        let want: BTreeMap<String, String> = [
            ("__name__", "process_cpu"),
            ("service_name", "checkout-api"),
            ("node", NODE),
            ("container_id", ids::CHECKOUT_APP),
            ("namespace", "shop"),
            ("pod", pod),
            ("container", "app"),
            ("k8s_deployment_name", "checkout"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(*l, want);
    }

    // Spans: OTel resource attributes.
    for r in span_resources(api, "checkout-api", "server") {
        for (k, v) in [
            ("container.id", ids::CHECKOUT_PROXY),
            ("k8s.pod.name", pod),
            ("k8s.pod.uid", "5e1c8a4e-9d0b-4f3a-8c71-2b6f4d9e0a13"),
            ("k8s.namespace.name", "shop"),
            ("k8s.container.name", "proxy"),
            ("k8s.node.name", NODE),
            ("k8s.deployment.name", "checkout"),
        ] {
            assert_eq!(get(&r, k), Some(v), "{k}: {r:?}");
        }
    }
    for r in span_resources(api, "fathom-ct-pod-client", "client") {
        assert_eq!(get(&r, "k8s.pod.name"), None, "not in a pod: {r:?}");
    }

    // Metrics: Prometheus spellings.
    for l in metric_labels(
        api,
        "http_server_request_duration_seconds_count",
        "checkout-api",
    ) {
        for (k, v) in [
            ("container_id", ids::CHECKOUT_PROXY),
            ("k8s_pod_name", pod),
            ("k8s_namespace_name", "shop"),
            ("k8s_container_name", "proxy"),
            ("k8s_node_name", NODE),
            ("k8s_deployment_name", "checkout"),
        ] {
            assert_eq!(get(&l, k), Some(v), "{k}: {l:?}");
        }
    }
    drop(_workloads);
    agent.signal("INT");
    let (status, _) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "agent exit: {status:?}");
}

/// A client that has exited (and left `/proc`) before the agent reads it
/// keeps its resource: the agent is stopped (SIGSTOP) while a curl in a
/// container cgroup makes one request and exits, then resumed; the kernel
/// kept the events, and the client span must still carry curl's
/// `OTEL_SERVICE_NAME`, its executable name and its container id — from
/// what the kernel saw at curl's first connection (its environment, comm
/// and cgroup id), since `/proc/<pid>` is gone by then.
#[test]
fn a_client_gone_before_the_agent_reads_it_keeps_its_resource() {
    let test = "a_client_gone_before_the_agent_reads_it_keeps_its_resource";
    let Some((_kernel, v2)) = kernel_and_cgroup2(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let mut cgroups = Cgroups::default();
    let id = fake_id("gone");
    let slice = format!("fathomtest-gone-{pid}.slice");
    let scope = cgroups.create(&v2, &format!("{slice}/docker-{id}.scope"));
    // A hybrid host's runtime (cgroupfs driver) puts a container in v1
    // cgroups only: its v2 cgroup names no container.
    let id1 = fake_id("gone-v1");
    let v1 = cgroup1_root("pids")
        .map(|root| cgroups.create(&root, &format!("fathomtest-gone-{pid}/docker/{id1}")));
    if v1.is_none() {
        eprintln!("*** no cgroup v1 pids hierarchy: no v1 client here ***");
    }

    let (agent, api) = start_agent(dir.path(), &[]);
    let port = free_port();
    let _server = python_server(None, port, Some("fathom-gone-server"));
    // The server is traced: its span shows up (the agent is at work).
    let warm = curl_once(None, port, "fathom-gone-warmup");
    span_resources(api, "fathom-gone-server", "server");

    agent.signal("STOP");
    let mut clients = vec![(
        "fathom-gone-client",
        curl_once(Some(&scope), port, "fathom-gone-client"),
        id.as_str(),
    )];
    if let Some(v1) = &v1 {
        let pid = curl_once(Some(v1), port, "fathom-gone-client-v1");
        clients.push(("fathom-gone-client-v1", pid, id1.as_str()));
    }
    let still_here: Vec<u32> = clients
        .iter()
        .map(|c| c.1)
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    agent.signal("CONT");
    assert!(
        still_here.is_empty(),
        "curls still in /proc: {still_here:?}"
    );

    for (client, curl_pid, id) in clients {
        assert_ne!(warm, curl_pid);
        let resources = span_resources(api, client, "client");
        for r in &resources {
            assert_eq!(get(r, "container.id"), Some(id), "{r:?}");
            assert_eq!(get(r, "process.executable.name"), Some("curl"), "{r:?}");
        }
        assert!(
            resources
                .iter()
                .any(|r| get(r, "process.pid") == Some(curl_pid.to_string().as_str())),
            "no span of curl {curl_pid}: {resources:?}"
        );
    }

    agent.signal("INT");
    let (status, _) = agent.finish(Duration::from_secs(30));
    assert!(status.success(), "agent exit: {status:?}");
    drop(cgroups);
    assert!(!v2.join(&slice).exists());
}

/// One `curl` of `port` with `OTEL_SERVICE_NAME=service`, in `cgroup` when
/// given (moved in before it execs), waited for and reaped; its pid.
fn curl_once(cgroup: Option<&Path>, port: u16, service: &str) -> u32 {
    let mut cmd = Command::new("sh");
    cmd.arg("-c");
    match cgroup {
        Some(cg) => cmd
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(cg.join("cgroup.procs")),
        None => cmd.arg(r#"exec "$@""#).arg("sh"),
    };
    let url = format!("http://127.0.0.1:{port}/");
    let mut child = cmd
        .args(["curl", "-s", "-o", "/dev/null", "--max-time", "10", &url])
        .env("OTEL_SERVICE_NAME", service)
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(status.success(), "curl {url}: {status:?}");
    pid
}
