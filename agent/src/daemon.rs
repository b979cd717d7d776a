//! The daemon, start to stop, in one place (rotel's `init`): the health
//! endpoint, pod metadata, the collector in this process (store and UI, or
//! exporters to a remote collector), then each signal in the
//! configuration's order; on stop, the signals in reverse order, then the
//! collector (which delivers what they handed it), each by a deadline.
use std::time::{Duration, Instant};

use fathom_collector::Collector;

use crate::{
    config::{AgentConfig, KubernetesSettings, Output, SignalKind},
    health::{Health, HealthServer, HealthState},
    k8s,
    network::NetworkSignal,
    profiles::ProfilesSignal,
    signal::{self, Delivery, Running, Signal, StartContext, StartError},
    stop::Stop,
    traces::TracesSignal,
};

/// How long stopping may take: the signals' last deliveries, then the
/// collector's exporters.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("--health-listen {addr}: {source}")]
    Health {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("kubernetes metadata: {0}")]
    Kubernetes(String),
    #[error("starting the collector's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("starting the collector in the agent: {0}")]
    Collector(String),
    #[error("no signal could start: {0}")]
    NothingStarted(String),
}

/// Runs until `stop` is triggered.
pub fn run(config: &AgentConfig, stop: &Stop) -> Result<(), DaemonError> {
    let health = Health::default();
    let _health_server = match config.health_listen {
        Some(addr) => Some(
            HealthServer::start(addr, health.clone())
                .map_err(|source| DaemonError::Health { addr, source })?,
        ),
        None => None,
    };
    // Before any signal: they look their pods up in it.
    let _k8s = start_k8s(&config.kubernetes)?;
    let result = match &config.output {
        Output::Directory { dir, retention } => {
            let delivery = Delivery::Directory {
                dir: dir.clone(),
                retention: *retention,
            };
            run_signals(config, delivery, &health, stop)
        }
        Output::Collector(collector_config) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("fathom-collector")
                .build()
                .map_err(DaemonError::Runtime)?;
            let collector = runtime
                .block_on(Collector::start((**collector_config).clone()))
                .map_err(|e| DaemonError::Collector(e.to_string()))?;
            announce(&collector, collector_config, config.interval);
            let result = run_signals(
                config,
                Delivery::Collector(collector.ingest()),
                &health,
                stop,
            );
            // After the signals: it delivers what they handed it.
            runtime.block_on(collector.shutdown(SHUTDOWN_DEADLINE));
            result
        }
    };
    // Keep-alive injection leaves its pinned sockhash while sockets are in
    // it (`traces::inject`); the agent's own connections (to rotel, to a
    // collector) closed with the runtime just now, so a pin that held only
    // those goes here rather than at the next start.
    if config.traces.inject && config.signals.contains(&SignalKind::Traces) {
        crate::traces::inject::collect_pins();
    }
    if let Err(e) = &result {
        health.set(HealthState::Failed(e.to_string()));
    }
    result
}

/// Says where the output can be seen.
fn announce(
    collector: &Collector,
    config: &fathom_collector::config::CollectorConfig,
    interval: Duration,
) {
    if let Some(http) = collector.addrs().http {
        let host = if http.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            http.ip().to_string()
        };
        eprintln!(
            "fathom-agent: flame graphs, traces and metrics at http://{host}:{}/ (first profiles after {})",
            http.port(),
            humantime::format_duration(interval)
        );
    } else if let Some(p) = &config.pyroscope {
        tracing::info!(url = %p.url, "sending profiles, spans and metrics to the collector");
    }
}

/// Starts every configured signal, waits for `stop`, stops them.
fn run_signals(
    config: &AgentConfig,
    delivery: Delivery,
    health: &Health,
    stop: &Stop,
) -> Result<(), DaemonError> {
    let mut ctx = StartContext {
        config,
        delivery,
        health: health.clone(),
        connections: None,
        serving: None,
    };
    let mut running = Running::default();
    let mut failures = Vec::new();
    for &kind in &config.signals {
        match start_signal(kind, &mut ctx) {
            Ok(signal) => {
                health.set_signal(signal.status());
                running.push(signal);
            }
            Err(e) => {
                // The others go on without it; /healthz and /metrics say so.
                tracing::error!("{} could not start, going on without it: {e}", kind.name());
                health.set_signal(signal::off(kind, e.to_string()));
                failures.push(format!("{}: {e}", kind.name()));
            }
        }
    }
    // Every signal has read its offsets: the parsed BTF (tens of MB) goes.
    crate::btf::release();
    if running.is_empty() {
        return Err(DaemonError::NothingStarted(failures.join("; ")));
    }
    health.set(HealthState::Ready);
    while !stop.wait(Duration::from_secs(1)) {}
    health.set(HealthState::Stopping);
    running.stop_all(Instant::now() + SHUTDOWN_DEADLINE);
    Ok(())
}

fn start_signal(
    kind: SignalKind,
    ctx: &mut StartContext<'_>,
) -> Result<Box<dyn Signal>, StartError> {
    Ok(match kind {
        SignalKind::Network => Box::new(NetworkSignal::start(ctx)?),
        SignalKind::Traces => Box::new(TracesSignal::start(ctx)?),
        SignalKind::Profiles => Box::new(ProfilesSignal::start(ctx)?),
    })
}

/// Starts the pod metadata watcher when in Kubernetes or asked to, and
/// makes it the one every signal consults.
fn start_k8s(settings: &KubernetesSettings) -> Result<Option<k8s::Watcher>, DaemonError> {
    let in_cluster = k8s::in_cluster();
    let kubelet_off = settings.kubelet_url.as_deref() == Some("off");
    let kubelet_url = match (&settings.kubelet_url, kubelet_off, in_cluster) {
        (_, true, _) => None,
        (Some(url), false, _) => Some(url.clone()),
        (None, false, true) => Some(k8s::DEFAULT_KUBELET_URL.to_string()),
        (None, false, false) => None,
    };
    let use_api = in_cluster || settings.api_url.is_some();
    if !settings.metadata || (!use_api && kubelet_url.is_none()) {
        tracing::debug!("not in Kubernetes: container ids from cgroups only");
        return Ok(None);
    }
    let config = k8s::K8sConfig {
        node_name: settings.node_name.clone().unwrap_or_default(),
        api_url: settings.api_url.clone(),
        use_api,
        kubelet_url,
        kubelet_insecure_tls: settings.kubelet_insecure_tls,
        token_file: settings.token_file.clone(),
        ca_file: settings.ca_file.clone(),
        ..k8s::K8sConfig::default()
    };
    let metadata = k8s::K8sMetadata::new(config.grace);
    let watcher = k8s::Watcher::start(&config, metadata.clone())
        .map_err(|e| DaemonError::Kubernetes(e.to_string()))?;
    k8s::install(metadata);
    Ok(Some(watcher))
}
