//! The Kubernetes metadata watcher against a REPLAY of the API server and
//! the kubelet (tests/src/k8s_replay.rs, fixtures in tests/fixtures/k8s/:
//! no API server can run here). The watcher is the agent's own (kube-rs
//! client, list + watch with the node's field selector, kubelet fallback);
//! the checks are on the joined result: container id → pod, namespace,
//! container, node, owner workload, service name — through the initial
//! list, an added pod, a container restart (new id, old id still
//! resolvable) and a deleted pod (resolvable until its grace period ends).
//! No root needed.
#![allow(
    clippy::unwrap_used,
    reason = "tests: a failed unwrap is a failed test"
)]

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use fathom_agent::k8s::{ContainerMeta, K8sConfig, K8sMetadata, Owner, Watcher};
use fathom_tests::k8s_replay::{ApiMode, K8sReplay, NODE, TOKEN, ids};

const WAIT: Duration = Duration::from_secs(20);

fn token_file(dir: &tempfile::TempDir) -> PathBuf {
    let path = dir.path().join("token");
    std::fs::write(&path, TOKEN).unwrap();
    path
}

/// The watcher's log on stderr (shown for failing tests).
fn logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| fathom_collector::init_logging("info,fathom_agent::k8s=debug"));
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    logs();
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn owner(kind: &str, name: &str) -> Option<Owner> {
    Some(Owner {
        kind: kind.into(),
        name: name.into(),
    })
}

#[allow(clippy::too_many_arguments, reason = "one expected container")]
fn expect(
    id: &str,
    pod: &str,
    uid: &str,
    namespace: &str,
    container: &str,
    init: bool,
    owner: Option<Owner>,
    app: Option<&str>,
) -> ContainerMeta {
    ContainerMeta {
        container_id: id.into(),
        pod_name: pod.into(),
        pod_uid: uid.into(),
        namespace: namespace.into(),
        container_name: container.into(),
        node_name: NODE.into(),
        init,
        owner,
        app_name: app.map(str::to_string),
    }
}

fn checkout(id: &str, container: &str, init: bool) -> ContainerMeta {
    expect(
        id,
        "checkout-6b8f9c7d5-x2x7q",
        "5e1c8a4e-9d0b-4f3a-8c71-2b6f4d9e0a13",
        "shop",
        container,
        init,
        owner("Deployment", "checkout"),
        Some("checkout-api"),
    )
}

fn get(m: &K8sMetadata, id: &str) -> Option<ContainerMeta> {
    m.lookup(id).map(Arc::unwrap_or_clone)
}

#[test]
fn watcher_joins_list_restart_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let replay = K8sReplay::start(ApiMode::Serve);
    let grace = Duration::from_secs(2);
    let config = K8sConfig {
        node_name: NODE.into(),
        api_url: Some(replay.url.clone()),
        token_file: Some(token_file(&dir)),
        grace,
        ..K8sConfig::default()
    };
    let metadata = K8sMetadata::new(config.grace);
    let _watcher = Watcher::start(&config, metadata.clone()).unwrap();

    // The list.
    wait_for("the listed pods", || metadata.lookup(ids::AGENT).is_some());
    assert_eq!(
        get(&metadata, ids::CHECKOUT_APP),
        Some(checkout(ids::CHECKOUT_APP, "app", false))
    );
    assert_eq!(
        get(&metadata, ids::CHECKOUT_PROXY),
        Some(checkout(ids::CHECKOUT_PROXY, "proxy", false))
    );
    assert_eq!(
        get(&metadata, ids::CHECKOUT_INIT),
        Some(checkout(ids::CHECKOUT_INIT, "wait-db", true))
    );
    let agent = get(&metadata, ids::AGENT).unwrap();
    assert_eq!(
        agent,
        expect(
            ids::AGENT,
            "metrics-agent-7xk2p",
            "b7f3e2d1-6c5a-4b98-a7e6-d5c4b3a29180",
            "monitoring",
            "agent",
            false,
            owner("DaemonSet", "metrics-agent"),
            None,
        )
    );
    // No app.kubernetes.io/name label: the owner names the service.
    assert_eq!(agent.service_name(), Some("metrics-agent"));
    assert_eq!(
        checkout(ids::CHECKOUT_APP, "app", false).service_name(),
        Some("checkout-api")
    );
    let postgres = get(&metadata, ids::POSTGRES).unwrap();
    assert_eq!(postgres.owner, owner("StatefulSet", "postgres"));
    assert_eq!(
        postgres.otel_attributes(),
        [
            ("k8s.pod.name", "postgres-0".to_string()),
            ("k8s.pod.uid", "3a4b5c6d-7e8f-4091-a2b3-c4d5e6f70819".into()),
            ("k8s.namespace.name", "db".into()),
            ("k8s.container.name", "postgres".into()),
            ("k8s.node.name", NODE.into()),
            ("k8s.statefulset.name", "postgres".into()),
        ]
    );
    assert!(metadata.lookup(ids::MIGRATE).is_none());
    assert!(metadata.lookup(ids::ETCD).is_none(), "kubelet-only pod");
    assert_eq!(metadata.stats().pods, 3);

    // ADDED: a Job's pod.
    replay.release(1);
    wait_for("the added pod", || metadata.lookup(ids::MIGRATE).is_some());
    let migrate = get(&metadata, ids::MIGRATE).unwrap();
    assert_eq!(
        (
            migrate.pod_name.as_str(),
            migrate.namespace.as_str(),
            migrate.owner.clone()
        ),
        (
            "migrate-28811520-q9z7w",
            "jobs",
            owner("Job", "migrate-28811520")
        )
    );

    // MODIFIED: container `app` restarted with a new id; the previous one
    // (in lastState) still resolves.
    replay.release(1);
    wait_for("the restarted container", || {
        metadata.lookup(ids::CHECKOUT_APP_RESTARTED).is_some()
    });
    assert_eq!(
        get(&metadata, ids::CHECKOUT_APP_RESTARTED),
        Some(checkout(ids::CHECKOUT_APP_RESTARTED, "app", false))
    );
    assert_eq!(
        get(&metadata, ids::CHECKOUT_APP),
        Some(checkout(ids::CHECKOUT_APP, "app", false))
    );

    // DELETED: postgres-0 resolves during the grace period, then not.
    let before = metadata.stats();
    replay.release(1);
    wait_for("the deletion", || metadata.stats().pods == before.pods - 1);
    let deleted_at = Instant::now();
    assert_eq!(get(&metadata, ids::POSTGRES), Some(postgres));
    // Bookmark: nothing changes.
    replay.release(1);
    wait_for("the end of the grace period", || {
        metadata.lookup(ids::POSTGRES).is_none()
    });
    assert!(deleted_at.elapsed() >= grace - Duration::from_millis(100));
    assert!(metadata.lookup(ids::MIGRATE).is_some());
    assert!(metadata.lookup(ids::CHECKOUT_APP_RESTARTED).is_some());

    // What the watcher asked: this node's pods, with the token; the watch
    // from the list's version.
    let requests = replay.requests();
    let pods: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(pods.len() >= 2, "{requests:?}");
    for r in &requests {
        assert!(r.authorized, "{r:?}");
        assert_eq!(
            r.param("fieldSelector"),
            Some("spec.nodeName=fathom-node-1"),
            "{r:?}"
        );
    }
    assert_eq!(pods[0].param("watch"), None);
    assert_eq!(pods[1].param("watch"), Some("true"));
    assert_eq!(pods[1].param("resourceVersion"), Some("51230"));
    assert!(
        !requests.iter().any(|r| r.path == "/pods"),
        "no kubelet fallback was configured"
    );
}

#[test]
fn kubelet_pods_when_the_api_server_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let replay = K8sReplay::start(ApiMode::Forbidden);
    let config = K8sConfig {
        node_name: NODE.into(),
        api_url: Some(replay.url.clone()),
        kubelet_url: Some(replay.url.clone()),
        token_file: Some(token_file(&dir)),
        ..K8sConfig::default()
    };
    let metadata = K8sMetadata::new(config.grace);
    let _watcher = Watcher::start(&config, metadata.clone()).unwrap();
    wait_for("the kubelet's pods", || {
        metadata.lookup(ids::ETCD).is_some()
    });
    let etcd = get(&metadata, ids::ETCD).unwrap();
    assert_eq!(
        etcd,
        expect(
            ids::ETCD,
            "etcd-fathom-node-1",
            "8f7e6d5c-4b3a-4291-8e7d-6c5b4a392817",
            "kube-system",
            "etcd",
            false,
            None,
            None,
        )
    );
    // A static pod's owner reference names its Node, not a workload.
    assert_eq!(etcd.service_name(), None);
    assert_eq!(etcd.otel_attributes().len(), 5);
    assert_eq!(
        get(&metadata, ids::CHECKOUT_APP),
        Some(checkout(ids::CHECKOUT_APP, "app", false))
    );
    assert!(
        metadata.lookup(ids::POSTGRES).is_none(),
        "not in the kubelet's list"
    );
    let requests = replay.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/api/v1/pods" && r.authorized),
        "{requests:?}"
    );
    assert!(requests.iter().any(|r| r.path == "/pods" && r.authorized));
}

#[test]
fn a_wrong_token_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let replay = K8sReplay::start(ApiMode::Serve);
    let token = dir.path().join("token");
    std::fs::write(&token, "not-the-token").unwrap();
    let config = K8sConfig {
        node_name: NODE.into(),
        api_url: Some(replay.url.clone()),
        token_file: Some(token),
        ..K8sConfig::default()
    };
    let metadata = K8sMetadata::new(config.grace);
    let _watcher = Watcher::start(&config, metadata.clone()).unwrap();
    wait_for("a request", || !replay.requests().is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert!(replay.requests().iter().all(|r| !r.authorized));
    assert_eq!(metadata.stats().containers, 0);
}

#[test]
fn configuration_errors_are_clear() {
    let no_node = K8sConfig {
        api_url: Some("http://127.0.0.1:1".into()),
        ..K8sConfig::default()
    };
    let e = Watcher::start(&no_node, K8sMetadata::new(Duration::ZERO))
        .err()
        .unwrap();
    assert!(e.to_string().contains("K8S_NODE_NAME"), "{e}");
    let remote_http = K8sConfig {
        node_name: NODE.into(),
        api_url: Some("http://10.0.0.1:8080".into()),
        ..K8sConfig::default()
    };
    let e = Watcher::start(&remote_http, K8sMetadata::new(Duration::ZERO))
        .err()
        .unwrap();
    assert!(e.to_string().contains("loopback"), "{e}");
}
