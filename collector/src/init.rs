//! Start-up and ordered, deadline-bounded shutdown of the whole collector.
//!
//! Start: sinks (store, exporters, Prometheus registry) → fan-out → pipeline
//! tasks (profile windows, span batches, metrics) → listeners. Shutdown, in
//! reverse: stop accepting and finish in-flight requests → drain the queues
//! and flush the open window → sinks see their channel close, flush and
//! return — all within one deadline, after which what is left is logged.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, routing::get};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    aggregate::{self, ProfileAggregator},
    config::CollectorConfig,
    exporters::{
        otlp::OtlpExporter,
        prometheus::{self, PromRegistry},
        pyroscope::PyroscopeExporter,
    },
    model::MetricsView,
    pipeline::{Batch, Budget, Fanout, Ingest, Sink},
    query,
    receivers::{auth::BearerAuth, ingest as legacy_ingest, otlp_grpc, otlp_http, pyroscope, tls},
    stats::Stats,
    store::{self, Store},
    ui::{self, UiState},
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("listening on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Sink(String),
}

/// The addresses actually bound (port 0 in the config becomes a real port).
#[derive(Clone, Copy, Debug, Default)]
pub struct BoundAddrs {
    pub otlp_grpc: Option<SocketAddr>,
    pub otlp_http: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

/// How long exporters keep trying to deliver what they buffered once their
/// channel closed at shutdown (the shutdown deadline may cut it shorter;
/// what is left either way is counted as dropped).
pub const EXPORT_FLUSH_DEADLINE: Duration = Duration::from_secs(10);

pub struct Collector {
    ingest: Ingest,
    registry: Arc<PromRegistry>,
    addrs: BoundAddrs,
    stats: Arc<Stats>,
    stop_receivers: CancellationToken,
    stop_pipeline: CancellationToken,
    receivers: JoinSet<()>,
    pipeline: JoinSet<()>,
    sinks: JoinSet<()>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// Serves an axum router, over TLS when configured, until `cancel`.
fn spawn_http(
    set: &mut JoinSet<()>,
    what: &'static str,
    listener: TcpListener,
    router: Router,
    tls: Option<&tls::TlsMaterial>,
    cancel: CancellationToken,
) -> Result<(), StartError> {
    match tls {
        Some(t) => {
            let listener =
                tls::TlsListener::new(listener, t.server_config.clone()).map_err(|source| {
                    StartError::Bind {
                        what,
                        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                        source,
                    }
                })?;
            set.spawn(async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
                {
                    tracing::error!(what, error = %e, "HTTP server failed");
                }
            });
        }
        None => {
            set.spawn(async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
                {
                    tracing::error!(what, error = %e, "HTTP server failed");
                }
            });
        }
    }
    Ok(())
}

impl Collector {
    /// Starts everything the configuration asks for. Must run inside a tokio
    /// runtime.
    pub async fn start(config: CollectorConfig) -> Result<Self, StartError> {
        Self::start_with_sinks(config, Vec::new()).await
    }

    /// Like [`Collector::start`], plus sinks of the caller's own (they get
    /// every batch, after the built-in ones; their channel closes at shutdown).
    pub async fn start_with_sinks(
        config: CollectorConfig,
        extra_sinks: Vec<Sink>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        // reqwest and tonic use rustls with ring; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let stats = Arc::new(Stats::default());
        let mut sinks_set = JoinSet::new();
        let mut sinks: Vec<Sink> = Vec::new();
        // Routes of the HTTP port contributed by sinks (UI, /metrics).
        let mut http_routes = Router::new();

        // SINKS: the embedded store, the Prometheus registry, exporters.
        // The Prometheus registry always runs: `/metrics` on the HTTP port
        // shows the received metrics and the collector's own counters.
        let registry = Arc::new(PromRegistry::default());
        {
            let (tx, rx) = mpsc::channel::<Batch>(config.queues.sink);
            sinks.push(Sink {
                name: "prometheus".into(),
                tx,
            });
            sinks_set.spawn(prometheus::run_sink(
                registry.clone(),
                rx,
                stats.exporter("prometheus"),
            ));
            http_routes = http_routes.merge(prometheus::router(registry.clone(), stats.clone()));
        }
        if let Some(otlp) = &config.otlp {
            let exporter = OtlpExporter::new(otlp)
                .map_err(|e| StartError::Sink(format!("OTLP exporter: {e}")))?;
            let (tx, rx) = mpsc::channel::<Batch>(config.queues.sink);
            sinks.push(Sink {
                name: "otlp".into(),
                tx,
            });
            sinks_set.spawn(exporter.run(rx, stats.exporter("otlp"), EXPORT_FLUSH_DEADLINE));
        }
        if let Some(pyro) = &config.pyroscope {
            let exporter = PyroscopeExporter::new(pyro)
                .map_err(|e| StartError::Sink(format!("Pyroscope exporter: {e}")))?;
            let (tx, rx) = mpsc::channel::<Batch>(config.queues.sink);
            sinks.push(Sink {
                name: "pyroscope".into(),
                tx,
            });
            sinks_set.spawn(exporter.run(rx, stats.exporter("pyroscope"), EXPORT_FLUSH_DEADLINE));
        }
        let mut ui_addrs = None;
        if config.store_enabled() {
            let store = Arc::new(
                Store::open(&config.store)
                    .map_err(|e| StartError::Sink(format!("embedded store: {e}")))?,
            );
            let (tx, rx) = mpsc::channel::<Batch>(config.queues.sink);
            sinks.push(Sink {
                name: "store".into(),
                tx,
            });
            sinks_set.spawn(store::run_sink(store.clone(), rx, stats.exporter("store")));
            let metrics: Arc<dyn MetricsView> = registry.clone();
            tracing::info!(
                path = %store.path().display(),
                retention = %humantime::format_duration(config.store.retention),
                max_bytes = config.store.max_bytes,
                "store open"
            );
            let ui_state = UiState::new(store.clone(), metrics.clone());
            ui_state.history.spawn_sampler(metrics);
            ui_addrs = Some(ui_state.addrs.clone());
            http_routes = http_routes
                .merge(ui::router(ui_state))
                .merge(query::pyroscope::router(store.clone()))
                .merge(query::jaeger::router(store));
        }
        sinks.extend(extra_sinks);

        let fanout = Fanout::new(sinks);
        let (profiles_tx, profiles_rx) = mpsc::channel(config.queues.profiles);
        let (spans_tx, spans_rx) = mpsc::channel(config.queues.spans);
        let (metrics_tx, metrics_rx) = mpsc::channel(config.queues.metrics);
        let ingest = Ingest {
            profiles: profiles_tx,
            spans: spans_tx,
            metrics: metrics_tx,
            budget: Budget::new(config.queues.max_queued_bytes),
            stats: stats.clone(),
        };
        let stop_pipeline = CancellationToken::new();
        let mut pipeline = JoinSet::new();
        pipeline.spawn(aggregate::run_profiles(
            profiles_rx,
            ProfileAggregator::new(config.aggregation.clone(), stats.clone()),
            fanout.clone(),
            stop_pipeline.clone(),
        ));
        pipeline.spawn(aggregate::run_spans(
            spans_rx,
            config.aggregation.clone(),
            fanout.clone(),
            stop_pipeline.clone(),
        ));
        pipeline.spawn(aggregate::run_metrics(
            metrics_rx,
            fanout,
            stop_pipeline.clone(),
        ));

        let auth = BearerAuth::new(config.auth.bearer_token.as_deref());
        let tls_http = match &config.tls {
            Some(t) => Some(tls::TlsMaterial::load(
                &t.cert,
                &t.key,
                &[b"h2", b"http/1.1"],
            )?),
            None => None,
        };
        let max = config.queues.max_request_bytes;
        // push.v1 on the HTTP port (connect) and the OTLP gRPC port: one
        // service, so a retried sample is acknowledged once whichever way.
        let pusher = pyroscope::Pusher::new(ingest.clone(), auth.clone(), max);
        let stop_receivers = CancellationToken::new();
        let mut receivers = JoinSet::new();
        let mut addrs = BoundAddrs::default();
        if let Some(addr) = config.listen.otlp_grpc {
            let l = bind("OTLP gRPC", addr).await?;
            addrs.otlp_grpc = l.local_addr().ok();
            let (ingest, auth, tls, pusher, cancel) = (
                ingest.clone(),
                auth.clone(),
                tls_http.clone(),
                pusher.clone(),
                stop_receivers.clone(),
            );
            receivers.spawn(async move {
                if let Err(e) = otlp_grpc::serve(l, ingest, auth, tls, max, pusher, cancel).await {
                    tracing::error!(error = %e, "OTLP gRPC server failed");
                }
            });
        }
        if let Some(addr) = config.listen.otlp_http {
            let l = bind("OTLP HTTP", addr).await?;
            addrs.otlp_http = l.local_addr().ok();
            let router = otlp_http::router(ingest.clone(), auth.clone(), max);
            spawn_http(
                &mut receivers,
                "OTLP HTTP",
                l,
                router,
                tls_http.as_ref(),
                stop_receivers.clone(),
            )?;
        }
        if let Some(addr) = config.listen.http {
            let l = bind("HTTP", addr).await?;
            addrs.http = l.local_addr().ok();
            // The HTTP port also takes OTLP/HTTP (`/v1/traces`, `/v1/metrics`):
            // agents with --collector-url send everything to this one port.
            http_routes = http_routes
                .merge(pyroscope::router(pusher.clone()))
                .merge(legacy_ingest::router(ingest.clone(), auth.clone(), max))
                .merge(otlp_http::router(ingest.clone(), auth.clone(), max))
                .route("/healthz", get(|| async { "ok\n" }));
            spawn_http(
                &mut receivers,
                "HTTP",
                l,
                http_routes,
                tls_http.as_ref(),
                stop_receivers.clone(),
            )?;
        }
        if let Some(a) = &ui_addrs {
            a.set(addrs).ok();
        }
        tracing::info!(
            otlp_grpc = ?addrs.otlp_grpc,
            otlp_http = ?addrs.otlp_http,
            http = ?addrs.http,
            tls = config.tls.is_some(),
            auth = config.auth.bearer_token.is_some(),
            "collector listening"
        );
        if let Some(http) = addrs.http {
            let url = http_url(http, config.tls.is_some());
            if config.store_enabled() {
                tracing::info!(
                    "UI at {url}, store {} (Grafana data sources: Pyroscope and Jaeger, URL {url}); send profiles to {url}push.v1.PusherService/Push or {url}ingest, OTLP to {url}v1/traces, or to the OTLP ports",
                    config.store.path.display()
                );
            } else {
                tracing::info!(
                    "no store (exporters configured): no UI; send profiles to {url}push.v1.PusherService/Push or {url}ingest, OTLP to {url}v1/traces, or to the OTLP ports"
                );
            }
        }
        Ok(Self {
            ingest,
            registry,
            addrs,
            stats,
            stop_receivers,
            stop_pipeline,
            receivers,
            pipeline,
            sinks: sinks_set,
        })
    }

    pub fn ingest(&self) -> Ingest {
        self.ingest.clone()
    }

    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The current metric values (the Prometheus registry), for the UI.
    pub fn metrics_view(&self) -> Arc<dyn MetricsView> {
        self.registry.clone()
    }

    /// Ordered shutdown within `deadline`; returns whether everything finished
    /// in time.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        self.stop_receivers.cancel();
        let mut in_time = join_until(&mut self.receivers, until, "receivers").await;
        self.stop_pipeline.cancel();
        drop(self.ingest);
        in_time &= join_until(&mut self.pipeline, until, "pipeline").await;
        in_time &= join_until(&mut self.sinks, until, "sinks").await;
        let s = &self.stats;
        tracing::info!(
            profiles = s.profiles.accepted.get(),
            spans = s.spans.accepted.get(),
            metric_points = s.metrics.accepted.get(),
            in_time,
            "collector stopped"
        );
        for e in s.exporters() {
            tracing::info!(
                exporter = %e.name,
                sent = e.sent.get(),
                dropped = e.dropped.get(),
                waiting = e.buffered_items.get(),
                "delivery at exit"
            );
        }
        in_time
    }
}

/// The URL a user opens for a listener (`localhost` for a wildcard address).
pub fn http_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        format!("{scheme}://localhost:{}/", addr.port())
    } else {
        format!("{scheme}://{addr}/")
    }
}

async fn join_until(set: &mut JoinSet<()>, until: tokio::time::Instant, what: &str) -> bool {
    loop {
        match tokio::time::timeout_at(until, set.join_next()).await {
            Ok(None) => return true,
            Ok(Some(Err(e))) if e.is_panic() => tracing::error!(what, error = %e, "task panicked"),
            Ok(Some(_)) => {}
            Err(_) => {
                tracing::warn!(
                    what,
                    left = set.len(),
                    "shutdown deadline reached; aborting"
                );
                set.abort_all();
                return false;
            }
        }
    }
}

/// Logging of Fathom's binaries: `tracing` to stderr, colours only on a
/// terminal. An invalid filter falls back to `info` and says so.
pub fn init_logging(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let (env_filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(e) = bad {
        tracing::warn!(filter, error = %e, "invalid log filter; logging at info");
    }
}
