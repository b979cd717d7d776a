//! The metadata thread: lists and watches this node's pods on the API
//! server with kube-rs, and polls the kubelet's `/pods` while the API server
//! cannot be watched. Everything it learns goes into the shared
//! [`K8sMetadata`] as [`PodEvent`]s.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, pin_mut};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, WatchEvent, WatchParams},
    core::ObjectList,
};
use tokio::sync::watch as signal;

use super::{K8sConfig, K8sError, K8sMetadata, PodEvent, SERVICE_ACCOUNT_DIR};

/// How long the API server keeps one watch request open (it then ends the
/// stream and the watch resumes from the last resource version).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// How often ids past their grace period are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);

/// The running metadata thread; dropping it stops the thread.
pub struct Watcher {
    stop: signal::Sender<bool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Where pods come from, resolved from the configuration.
struct Sources {
    node: String,
    api: Option<kube::Config>,
    kubelet: Option<kube::Config>,
}

impl Watcher {
    /// Checks the configuration, then starts the thread that fills
    /// `metadata`. Unreachable servers are not an error here: the thread
    /// logs and retries.
    pub fn start(config: &K8sConfig, metadata: K8sMetadata) -> Result<Self, K8sError> {
        if config.node_name.is_empty() {
            return Err(K8sError::NoNodeName);
        }
        let sa = Path::new(SERVICE_ACCOUNT_DIR);
        let existing = |p: PathBuf| p.exists().then_some(p);
        let token_file = config
            .token_file
            .clone()
            .or_else(|| existing(sa.join("token")));
        let ca_file = config
            .ca_file
            .clone()
            .or_else(|| existing(sa.join("ca.crt")));
        let api = if !config.use_api {
            None
        } else if let Some(url) = &config.api_url {
            Some(client_config(
                "API server URL",
                url,
                token_file.as_deref(),
                ca_file.as_deref(),
                false,
            )?)
        } else {
            let mut c =
                kube::Config::incluster().map_err(|e| K8sError::InCluster(e.to_string()))?;
            c.connect_timeout = Some(Duration::from_secs(10));
            Some(c)
        };
        let kubelet = config
            .kubelet_url
            .as_deref()
            .map(|url| {
                client_config(
                    "kubelet URL",
                    url,
                    token_file.as_deref(),
                    ca_file.as_deref(),
                    config.kubelet_insecure_tls,
                )
                .map(|mut c| {
                    c.read_timeout = Some(Duration::from_secs(30));
                    c
                })
            })
            .transpose()?;
        let sources = Sources {
            node: config.node_name.clone(),
            api,
            kubelet,
        };
        let (stop, stopped) = signal::channel(false);
        let config = config.clone();
        let handle = std::thread::Builder::new()
            .name("fathom-k8s".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "kubernetes metadata: no runtime");
                        return;
                    }
                };
                runtime.block_on(run(sources, config, metadata, stopped));
            })
            .map_err(K8sError::Thread)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

/// A kube-rs configuration for `url`: a bearer token file, a CA bundle,
/// plain http only to a loopback address (tests, `kubectl proxy`).
pub fn client_config(
    what: &'static str,
    url: &str,
    token_file: Option<&Path>,
    ca_file: Option<&Path>,
    insecure_tls: bool,
) -> Result<kube::Config, K8sError> {
    let bad = |reason: String| K8sError::Url {
        what,
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => {
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(bad(
                    "plain http is allowed only to a loopback address; use https".into(),
                ));
            }
        }
        _ => return Err(bad("expected an http:// or https:// URL".into())),
    }
    let mut config = kube::Config::new(uri);
    config.connect_timeout = Some(Duration::from_secs(10));
    config.accept_invalid_certs = insecure_tls;
    if let Some(path) = token_file {
        // kube-rs sends the file's bytes as they are (and re-reads them
        // when the token rotates): a trailing newline would be an invalid
        // header on every request, so say so now.
        let token = std::fs::read_to_string(path).map_err(|source| K8sError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if token.trim().is_empty() || token.trim() != token {
            return Err(K8sError::Token(path.to_path_buf()));
        }
        config.auth_info.token_file = Some(path.to_string_lossy().into_owned());
    }
    if let Some(ca) = ca_file {
        // kube-rs verifies against this file and re-reads it (CA rotation).
        if let Err(source) = std::fs::metadata(ca) {
            return Err(K8sError::Read {
                path: ca.to_path_buf(),
                source,
            });
        }
        config.root_cert_file = Some(ca.to_path_buf());
    }
    Ok(config)
}

/// Why a list/watch round ended.
enum Ended {
    Stopped,
    /// The resource version is too old (410 Gone): list again.
    Relist,
}

async fn run(
    sources: Sources,
    config: K8sConfig,
    metadata: K8sMetadata,
    mut stop: signal::Receiver<bool>,
) {
    let client = |c: &kube::Config, what: &str| match Client::try_from(c.clone()) {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::error!(error = %e, source = what, "kubernetes metadata: no client");
            None
        }
    };
    let api = sources.api.as_ref().and_then(|c| client(c, "api-server"));
    let kubelet = sources.kubelet.as_ref().and_then(|c| client(c, "kubelet"));
    if api.is_none() && kubelet.is_none() {
        return;
    }
    tracing::info!(
        node = %sources.node,
        api_server = sources.api.as_ref().map(|c| c.cluster_url.to_string()),
        kubelet = sources.kubelet.as_ref().map(|c| c.cluster_url.to_string()),
        "kubernetes metadata: watching this node's pods"
    );
    let selector = format!("spec.nodeName={}", sources.node);
    let mut backoff = Duration::from_secs(1);
    loop {
        if let Some(client) = &api {
            let pods: Api<Pod> = Api::all(client.clone());
            match list_and_watch(&pods, &selector, &metadata, &mut stop, &mut backoff).await {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Relist) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes metadata: API server watch failed");
                }
            }
        }
        let mut wait = backoff;
        if let Some(client) = &kubelet {
            match poll_kubelet(client, &metadata).await {
                Ok(n) => {
                    tracing::info!(pods = n, "kubernetes metadata: pods from the kubelet");
                    wait = if api.is_some() {
                        backoff
                    } else {
                        config.kubelet_poll
                    };
                }
                Err(e) => tracing::warn!(error = %e, "kubernetes metadata: kubelet /pods failed"),
            }
        }
        metadata.write().expire(Instant::now());
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// Waits `d`; true when stopped meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut signal::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn poll_kubelet(client: &Client, metadata: &K8sMetadata) -> Result<usize, kube::Error> {
    let req = http::Request::get("/pods")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let list: ObjectList<Pod> = client.request(req).await?;
    let n = list.items.len();
    metadata
        .write()
        .apply(PodEvent::Replace(list.items), Instant::now());
    Ok(n)
}

async fn list_and_watch(
    pods: &Api<Pod>,
    selector: &str,
    metadata: &K8sMetadata,
    stop: &mut signal::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<Ended, kube::Error> {
    let list = pods.list(&ListParams::default().fields(selector)).await?;
    let mut version = list.metadata.resource_version.clone().unwrap_or_default();
    let n = list.items.len();
    metadata
        .write()
        .apply(PodEvent::Replace(list.items), Instant::now());
    tracing::info!(pods = n, %version, "kubernetes metadata: pods listed");
    *backoff = Duration::from_secs(1);
    let params = WatchParams::default()
        .fields(selector)
        .timeout(WATCH_TIMEOUT_SECS);
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    loop {
        let stream = pods.watch(&params, &version).await?;
        pin_mut!(stream);
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = expire.tick() => {
                    metadata.write().expire(Instant::now());
                    continue;
                }
                _ = stop.changed() => return Ok(Ended::Stopped),
            };
            let Some(event) = next else { break };
            let event = match event? {
                WatchEvent::Added(pod) | WatchEvent::Modified(pod) => {
                    remember_version(&pod, &mut version);
                    PodEvent::Apply(pod)
                }
                WatchEvent::Deleted(pod) => {
                    remember_version(&pod, &mut version);
                    PodEvent::Deleted(pod)
                }
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(status) if status.code == 410 => {
                    tracing::info!(message = %status.message, "kubernetes metadata: watch expired, listing again");
                    return Ok(Ended::Relist);
                }
                WatchEvent::Error(status) => return Err(kube::Error::Api(status)),
            };
            let (kind, pod) = match &event {
                PodEvent::Apply(p) => ("applied", p),
                PodEvent::Deleted(p) => ("deleted", p),
                PodEvent::Replace(_) => continue,
            };
            tracing::debug!(
                kind,
                namespace = pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod = pod.metadata.name.as_deref().unwrap_or_default(),
                version = %version,
                "kubernetes metadata: pod event"
            );
            let now = Instant::now();
            let mut cache = metadata.write();
            cache.apply(event, now);
            cache.expire(now);
        }
        // The server ended the stream (its timeout): resume where it ended.
    }
}

fn remember_version(pod: &Pod, version: &mut String) {
    if let Some(v) = &pod.metadata.resource_version {
        version.clone_from(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "https://10.0.0.1:6443",
            "http://127.0.0.1:8001",
            "http://localhost:1",
            "http://[::1]:2",
        ] {
            assert!(client_config("x", ok, None, None, false).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "ftp://127.0.0.1",
            "not a url",
            "127.0.0.1:80",
        ] {
            assert!(client_config("x", bad, None, None, false).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "abc\n").unwrap();
        assert!(matches!(
            client_config("x", "https://h:1", Some(&token), None, false),
            Err(K8sError::Token(_))
        ));
        std::fs::write(&token, "abc").unwrap();
        assert!(client_config("x", "https://h:1", Some(&token), None, false).is_ok());
        let missing = Path::new("/nonexistent/ca.crt");
        assert!(matches!(
            client_config("x", "https://h:1", None, Some(missing), false),
            Err(K8sError::Read { .. })
        ));
    }
}
