//! Pure logic of the pod metadata: a pod (as the API server or the kubelet
//! returns it) becomes one [`ContainerMeta`] per container id, and the
//! [`PodCache`] keeps them by container id as pod events arrive. No I/O.
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// The pod label that names the application (`service.name` when the
/// process's environment has no `OTEL_SERVICE_NAME`).
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";
/// The label the Deployment controller puts on the pods of a ReplicaSet.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// The workload that owns a pod (its controller owner reference, with a
/// ReplicaSet of a Deployment named as the Deployment).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// `Deployment`, `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, or any
    /// other controller kind as the API names it.
    pub kind: String,
    pub name: String,
}

impl Owner {
    /// The OTel resource attribute naming this kind of workload
    /// (`k8s.deployment.name`, ...); `None` for kinds OTel has no attribute
    /// for (a custom controller, a `Node` owning a static pod).
    pub fn otel_attribute(&self) -> Option<&'static str> {
        Some(match self.kind.as_str() {
            "Deployment" => "k8s.deployment.name",
            "ReplicaSet" => "k8s.replicaset.name",
            "StatefulSet" => "k8s.statefulset.name",
            "DaemonSet" => "k8s.daemonset.name",
            "Job" => "k8s.job.name",
            "CronJob" => "k8s.cronjob.name",
            _ => return None,
        })
    }
}

/// What is known about one container (one container id) of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerMeta {
    /// The runtime's id, without the `containerd://` (etc.) prefix.
    pub container_id: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub namespace: String,
    pub container_name: String,
    pub node_name: String,
    /// An init container (`status.initContainerStatuses`).
    pub init: bool,
    pub owner: Option<Owner>,
    /// The pod's `app.kubernetes.io/name` label.
    pub app_name: Option<String>,
}

impl ContainerMeta {
    /// The service name Kubernetes suggests: the `app.kubernetes.io/name`
    /// label, else the owner workload's name (`OTEL_SERVICE_NAME` in the
    /// process's environment comes before both; see `ProcessMeta`).
    pub fn service_name(&self) -> Option<&str> {
        self.app_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .or_else(|| self.owner.as_ref().map(|o| o.name.as_str()))
    }

    /// The OTel resource attributes: `k8s.pod.name`, `k8s.pod.uid`,
    /// `k8s.namespace.name`, `k8s.container.name`, `k8s.node.name` and the
    /// owner's `k8s.<kind>.name` (empty values left out). `container.id` is
    /// the process's own (from its cgroup), not repeated here.
    pub fn otel_attributes(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("k8s.pod.name", self.pod_name.clone()),
            ("k8s.pod.uid", self.pod_uid.clone()),
            ("k8s.namespace.name", self.namespace.clone()),
            ("k8s.container.name", self.container_name.clone()),
            ("k8s.node.name", self.node_name.clone()),
        ];
        if let Some(owner) = &self.owner
            && let Some(key) = owner.otel_attribute()
        {
            out.push((key, owner.name.clone()));
        }
        out.retain(|(_, v)| !v.is_empty());
        out
    }
}

/// A container id without its runtime prefix (`containerd://`, `cri-o://`,
/// `docker://`, any `<runtime>://`), lower-cased; `None` when empty.
pub fn strip_runtime(id: &str) -> Option<String> {
    let id = id.split_once("://").map_or(id, |(_, rest)| rest).trim();
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// The pod's owner workload. The controller owner reference (else the
/// first one) names it, with one rule: a `ReplicaSet` named
/// `<deployment>-<hash>` whose pod carries the label
/// `pod-template-hash=<hash>` was made by the Deployment `<deployment>`,
/// and is reported as that Deployment. Every other kind (`DaemonSet`,
/// `StatefulSet`, `Job`, ...) is taken as it is, except a `Node`: the
/// owner of a static (mirror) pod is no workload, so such a pod has none.
pub fn owner(pod: &Pod) -> Option<Owner> {
    let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
    let r = refs
        .iter()
        .find(|r| r.controller == Some(true))
        .or_else(|| refs.first())?;
    if r.kind == "Node" {
        return None;
    }
    if r.kind == "ReplicaSet"
        && let Some(hash) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(POD_TEMPLATE_HASH_LABEL))
        && !hash.is_empty()
        && let Some(deployment) = r
            .name
            .strip_suffix(hash.as_str())
            .and_then(|n| n.strip_suffix('-'))
        && !deployment.is_empty()
    {
        return Some(Owner {
            kind: "Deployment".into(),
            name: deployment.to_string(),
        });
    }
    Some(Owner {
        kind: r.kind.clone(),
        name: r.name.clone(),
    })
}

/// Every container id of a pod with what is known about it: the current
/// instance of each container, init and ephemeral containers included, and
/// the previous instance of a restarted container
/// (`lastState.terminated.containerID`), whose samples may still be on
/// their way. Containers not started yet have no id and are left out.
pub fn containers(pod: &Pod) -> Vec<ContainerMeta> {
    let meta = &pod.metadata;
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let owner = owner(pod);
    let app_name = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(APP_NAME_LABEL))
        .cloned();
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let base = |container_id: String, container_name: &str, init: bool| ContainerMeta {
        container_id,
        pod_name: meta.name.clone().unwrap_or_default(),
        pod_uid: meta.uid.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        container_name: container_name.to_string(),
        node_name: node_name.clone(),
        init,
        owner: owner.clone(),
        app_name: app_name.clone(),
    };
    let lists: [(&Option<Vec<ContainerStatus>>, bool); 3] = [
        (&status.init_container_statuses, true),
        (&status.container_statuses, false),
        (&status.ephemeral_container_statuses, false),
    ];
    let mut out: Vec<ContainerMeta> = Vec::new();
    for (list, init) in lists {
        for cs in list.iter().flatten() {
            let previous = cs
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .and_then(|t| t.container_id.as_deref());
            let ids = [cs.container_id.as_deref(), previous];
            for id in ids.into_iter().flatten().filter_map(strip_runtime) {
                if !out.iter().any(|c| c.container_id == id) {
                    out.push(base(id, &cs.name, init));
                }
            }
        }
    }
    out
}

/// A change seen on the pods of this node.
#[derive(Clone, Debug)]
pub enum PodEvent {
    /// The complete list (a list, a re-list, a kubelet poll): pods not in
    /// it are gone.
    Replace(Vec<Pod>),
    /// Added or modified.
    Apply(Pod),
    Deleted(Pod),
}

struct Entry {
    meta: Arc<ContainerMeta>,
    /// When a container id that left its pod (restart, deletion) stops
    /// being resolvable.
    expires: Option<Instant>,
}

/// Container id → container metadata, kept up to date from [`PodEvent`]s.
/// A container id that disappears (its container restarted with a new id,
/// its pod was deleted) stays resolvable for `grace`, since samples and
/// spans of it may still be on their way.
pub struct PodCache {
    by_container: HashMap<String, Entry>,
    /// Pod uid (else namespace/name) → its current container ids.
    by_pod: HashMap<String, HashSet<String>>,
    grace: Duration,
}

/// Counts of a [`PodCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub pods: usize,
    /// Container ids resolvable, those in their grace period included.
    pub containers: usize,
    pub retired: usize,
}

fn pod_key(pod: &Pod) -> String {
    let m = &pod.metadata;
    match &m.uid {
        Some(uid) if !uid.is_empty() => uid.clone(),
        _ => format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default()
        ),
    }
}

impl PodCache {
    pub fn new(grace: Duration) -> Self {
        Self {
            by_container: HashMap::new(),
            by_pod: HashMap::new(),
            grace,
        }
    }

    /// The container with this id (without runtime prefix, lower-case).
    pub fn get(&self, container_id: &str) -> Option<Arc<ContainerMeta>> {
        self.by_container
            .get(container_id)
            .map(|e| Arc::clone(&e.meta))
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            pods: self.by_pod.len(),
            containers: self.by_container.len(),
            retired: self
                .by_container
                .values()
                .filter(|e| e.expires.is_some())
                .count(),
        }
    }

    pub fn apply(&mut self, event: PodEvent, now: Instant) {
        match event {
            PodEvent::Replace(pods) => {
                let keys: HashSet<String> = pods.iter().map(pod_key).collect();
                let gone: Vec<String> = self
                    .by_pod
                    .keys()
                    .filter(|k| !keys.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.retire_pod(&key, now);
                }
                for pod in &pods {
                    self.upsert(pod, now);
                }
            }
            PodEvent::Apply(pod) => self.upsert(&pod, now),
            PodEvent::Deleted(pod) => self.retire_pod(&pod_key(&pod), now),
        }
    }

    /// Forgets container ids whose grace period is over.
    pub fn expire(&mut self, now: Instant) {
        self.by_container
            .retain(|_, e| e.expires.is_none_or(|t| t > now));
    }

    fn upsert(&mut self, pod: &Pod, now: Instant) {
        let key = pod_key(pod);
        let containers = containers(pod);
        let ids: HashSet<String> = containers.iter().map(|c| c.container_id.clone()).collect();
        let before = self.by_pod.remove(&key).unwrap_or_default();
        for old in before.difference(&ids) {
            self.retire(old, now);
        }
        for c in containers {
            self.by_container.insert(
                c.container_id.clone(),
                Entry {
                    meta: Arc::new(c),
                    expires: None,
                },
            );
        }
        self.by_pod.insert(key, ids);
    }

    fn retire_pod(&mut self, key: &str, now: Instant) {
        for id in self.by_pod.remove(key).unwrap_or_default() {
            self.retire(&id, now);
        }
    }

    fn retire(&mut self, id: &str, now: Instant) {
        if let Some(e) = self.by_container.get_mut(id)
            && e.expires.is_none()
        {
            e.expires = Some(now + self.grace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn web(main_id: &str, last: Option<&str>) -> Pod {
        let mut status = json!({
            "name": "web", "image": "nginx", "imageID": "", "ready": true, "restartCount": 0,
            "containerID": format!("containerd://{main_id}"),
        });
        if let Some(last) = last {
            status["lastState"] = json!({"terminated": {"exitCode": 1, "containerID": format!("containerd://{last}")}});
        }
        pod(json!({
            "metadata": {
                "name": "web-7d9f8b6c5d-x2x7q", "namespace": "shop", "uid": "uid-web",
                "labels": {"pod-template-hash": "7d9f8b6c5d"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-7d9f8b6c5d", "uid": "rs", "controller": true}]
            },
            "spec": {"nodeName": "node-1", "containers": []},
            "status": {
                "initContainerStatuses": [{"name": "migrate", "image": "m", "imageID": "",
                    "ready": false, "restartCount": 0, "containerID": format!("cri-o://{C}")}],
                "containerStatuses": [status]
            }
        }))
    }

    #[test]
    fn containers_of_a_pod() {
        let got = containers(&web(A, None));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].container_id, C);
        assert_eq!(got[0].container_name, "migrate");
        assert!(got[0].init);
        let main = &got[1];
        assert_eq!(
            *main,
            ContainerMeta {
                container_id: A.into(),
                pod_name: "web-7d9f8b6c5d-x2x7q".into(),
                pod_uid: "uid-web".into(),
                namespace: "shop".into(),
                container_name: "web".into(),
                node_name: "node-1".into(),
                init: false,
                owner: Some(Owner {
                    kind: "Deployment".into(),
                    name: "web".into()
                }),
                app_name: None,
            }
        );
        assert_eq!(main.service_name(), Some("web"));
        assert_eq!(
            main.otel_attributes(),
            [
                ("k8s.pod.name", "web-7d9f8b6c5d-x2x7q".to_string()),
                ("k8s.pod.uid", "uid-web".into()),
                ("k8s.namespace.name", "shop".into()),
                ("k8s.container.name", "web".into()),
                ("k8s.node.name", "node-1".into()),
                ("k8s.deployment.name", "web".into()),
            ]
        );
        // A pod without status (pending): nothing to index.
        assert!(containers(&pod(json!({"metadata": {"name": "p"}}))).is_empty());
    }

    #[test]
    fn owner_rule() {
        let with = |kind: &str, name: &str, labels: serde_json::Value| {
            owner(&pod(json!({"metadata": {"name": "p", "labels": labels,
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Other", "name": "not-controller", "uid": "1"},
                    {"apiVersion": "v1", "kind": kind, "name": name, "uid": "2", "controller": true}]}})))
            .map(|o| (o.kind, o.name))
        };
        let own = |k: &str, n: &str| Some((k.to_string(), n.to_string()));
        let hash = json!({"pod-template-hash": "5f6b7c"});
        assert_eq!(
            with("ReplicaSet", "api-v2-5f6b7c", hash.clone()),
            own("Deployment", "api-v2")
        );
        // No label, another hash, or nothing left: the ReplicaSet itself.
        assert_eq!(
            with("ReplicaSet", "api-5f6b7c", json!({})),
            own("ReplicaSet", "api-5f6b7c")
        );
        assert_eq!(
            with("ReplicaSet", "api-abc", hash.clone()),
            own("ReplicaSet", "api-abc")
        );
        assert_eq!(
            with("ReplicaSet", "-5f6b7c", hash.clone()),
            own("ReplicaSet", "-5f6b7c")
        );
        assert_eq!(
            with("ReplicaSet", "api5f6b7c", hash.clone()),
            own("ReplicaSet", "api5f6b7c")
        );
        for kind in ["DaemonSet", "StatefulSet", "Job"] {
            assert_eq!(with(kind, "x-5f6b7c", hash.clone()), own(kind, "x-5f6b7c"));
        }
        assert_eq!(owner(&pod(json!({"metadata": {"name": "static"}}))), None);
        assert_eq!(with("Node", "node-1", json!({})), None);
        let custom = Owner {
            kind: "Rollout".into(),
            name: "r".into(),
        };
        assert_eq!(custom.otel_attribute(), None);
    }

    #[test]
    fn runtime_prefixes() {
        assert_eq!(strip_runtime("containerd://ABC").as_deref(), Some("abc"));
        assert_eq!(strip_runtime("cri-o://abc").as_deref(), Some("abc"));
        assert_eq!(strip_runtime("docker://abc").as_deref(), Some("abc"));
        assert_eq!(strip_runtime("abc").as_deref(), Some("abc"));
        assert_eq!(strip_runtime("containerd://"), None);
    }

    #[test]
    fn cache_follows_restarts_and_deletions() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut cache = PodCache::new(grace);
        cache.apply(PodEvent::Replace(vec![web(A, None)]), t0);
        assert_eq!(cache.get(A).unwrap().container_name, "web");
        assert!(cache.get(C).unwrap().init);
        // Restart: new id B; A is still named in lastState.
        cache.apply(PodEvent::Apply(web(B, Some(A))), t0);
        assert_eq!(cache.get(B).unwrap().pod_name, "web-7d9f8b6c5d-x2x7q");
        assert!(cache.get(A).is_some());
        // A second restart (its new id happens to be the init container's)
        // drops A from the status: kept for the grace.
        cache.apply(PodEvent::Apply(web(C, Some(B))), t0);
        let t1 = t0 + Duration::from_secs(10);
        cache.expire(t1);
        assert!(cache.get(A).is_some(), "in its grace period");
        cache.expire(t0 + grace + Duration::from_secs(1));
        assert!(cache.get(A).is_none());
        assert!(cache.get(B).is_some() && cache.get(C).is_some());
        // Deleted: every id retires, resolvable until the grace ends.
        cache.apply(PodEvent::Deleted(web(C, Some(B))), t1);
        assert_eq!(
            cache.stats(),
            CacheStats {
                pods: 0,
                containers: 2,
                retired: 2
            }
        );
        cache.expire(t1 + grace - Duration::from_millis(1));
        assert!(cache.get(B).is_some());
        cache.expire(t1 + grace);
        assert_eq!(cache.stats(), CacheStats::default());
    }

    #[test]
    fn replace_retires_missing_pods() {
        let t0 = Instant::now();
        let mut cache = PodCache::new(Duration::ZERO);
        cache.apply(PodEvent::Replace(vec![web(A, None)]), t0);
        cache.apply(PodEvent::Replace(vec![]), t0);
        assert_eq!(cache.stats().retired, 2);
        cache.expire(t0);
        assert!(cache.get(A).is_none());
        // A pod coming back revives its ids.
        cache.apply(PodEvent::Replace(vec![web(A, None)]), t0);
        cache.expire(t0 + Duration::from_secs(1));
        assert!(cache.get(A).is_some());
    }
}
