//! Kubernetes metadata: container id → pod, namespace, container name,
//! node and owner workload, for every signal of a process running in a pod.
//!
//! A background thread watches the pods of this node on the API server
//! (`spec.nodeName=<node>`, with kube-rs), falling back to polling the
//! kubelet's `/pods`, and keeps a [`PodCache`] by container id. Signals look
//! their process's container id (from its cgroup, `process_meta`) up in
//! that cache: a read lock and a hash lookup, never a request, so the
//! sampling and tracing paths never wait for the network.
//!
//! - [`pods`]: pure logic — a pod becomes its containers, the owner rule,
//!   the cache with its grace period for ids that left.
//! - [`watch`]: the client, the list/watch loop and the kubelet fallback.
//!
//! Outside Kubernetes (no in-cluster service account, no flags) nothing
//! runs, and processes keep the container id from their cgroup.
pub mod pods;
pub mod watch;

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock, RwLock},
    time::Duration,
};

pub use pods::{CacheStats, ContainerMeta, Owner, PodCache, PodEvent};
pub use watch::Watcher;

/// Where the service account's token and CA are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The kubelet's authenticated port on this node.
pub const DEFAULT_KUBELET_URL: &str = "https://localhost:10250";

/// How the metadata module finds pods.
#[derive(Clone, Debug)]
pub struct K8sConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The API server; `None`: in-cluster (`KUBERNETES_SERVICE_HOST` and the
    /// service account).
    pub api_url: Option<String>,
    /// Watch the API server at all (false: kubelet only).
    pub use_api: bool,
    /// The kubelet's `/pods` (fallback while the API server cannot be
    /// watched); `None`: no fallback.
    pub kubelet_url: Option<String>,
    /// Accept any certificate from the kubelet (its serving certificate is
    /// often self-signed).
    pub kubelet_insecure_tls: bool,
    /// Bearer token file (default: the service account's, when present).
    pub token_file: Option<PathBuf>,
    /// CA bundle for https URLs (default: the service account's, when
    /// present).
    pub ca_file: Option<PathBuf>,
    /// How long a container id that left its pod (restart, deletion) stays
    /// resolvable.
    pub grace: Duration,
    /// How often the kubelet is polled while it is the source.
    pub kubelet_poll: Duration,
    /// Longest wait between two attempts at the API server.
    pub max_backoff: Duration,
}

impl Default for K8sConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            api_url: None,
            use_api: true,
            kubelet_url: None,
            kubelet_insecure_tls: false,
            token_file: None,
            ca_file: None,
            grace: Duration::from_secs(120),
            kubelet_poll: Duration::from_secs(10),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Errors of the metadata module's configuration.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("{what} {url:?}: {reason}")]
    Url {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error(
        "no node name: give --node-name or set K8S_NODE_NAME (the downward API's spec.nodeName)"
    )]
    NoNodeName,
    #[error("in-cluster configuration: {0}")]
    InCluster(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {0}: empty, or white space around the token (write it without a newline)")]
    Token(PathBuf),
    #[error("starting the metadata thread: {0}")]
    Thread(std::io::Error),
}

/// Whether this process runs in a pod with a service account (the API
/// server's address in the environment Kubernetes gives every pod).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty())
}

/// The shared cache: the watcher writes, signals read.
#[derive(Clone)]
pub struct K8sMetadata {
    cache: Arc<RwLock<PodCache>>,
}

impl K8sMetadata {
    pub fn new(grace: Duration) -> Self {
        Self {
            cache: Arc::new(RwLock::new(PodCache::new(grace))),
        }
    }

    /// The container with this id (lower-case hex, as the cgroup names it).
    pub fn lookup(&self, container_id: &str) -> Option<Arc<ContainerMeta>> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(container_id)
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).stats()
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodCache> {
        self.cache.write().unwrap_or_else(|e| e.into_inner())
    }
}

static GLOBAL: OnceLock<K8sMetadata> = OnceLock::new();

/// Makes `metadata` the one every signal of this process consults (through
/// `ProcessMeta`). Once per process; false when one was installed already.
pub fn install(metadata: K8sMetadata) -> bool {
    GLOBAL.set(metadata).is_ok()
}

/// The container with this id in the installed metadata; `None` outside
/// Kubernetes or when the container is unknown.
pub fn lookup(container_id: &str) -> Option<Arc<ContainerMeta>> {
    GLOBAL.get()?.lookup(container_id)
}

/// Whether metadata is installed (the module runs).
pub fn installed() -> bool {
    GLOBAL.get().is_some()
}
