//! The agent's one typed configuration.
//!
//! Three layers, the later winning: defaults, a TOML file (`--config`,
//! `FATHOM_CONFIG`), then flags, each mirrored by a `FATHOM_*` environment
//! variable. The flags are the clap structs below; [`DaemonArgs::resolve`]
//! and [`SamplingArgs::resolve`] turn them, with the file, into
//! [`AgentConfig`] and [`SamplingConfig`], which is all the rest of the
//! agent reads. The file's `[collector]` table is the embedded collector's
//! configuration, in the collector's own format (`docs/collector.md`).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, ValueEnum};
use fathom_collector::{
    CollectorArgs,
    config::{CollectorConfig, OtlpExporterConfig, OtlpProtocol, PyroscopeConfig},
};
use fathom_symbolizer::SymbolizerConfig;
use serde::Deserialize;

/// Unwind rows the kernel holds for all binaries together, by default
/// (16 MiB).
pub const DEFAULT_UNWIND_TABLE_ROWS: u32 = 1 << 21;
/// Shortest off-CPU interval counted by default.
pub const DEFAULT_OFF_CPU_THRESHOLD: Duration = Duration::from_millis(1);

/// A signal the agent collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignalKind {
    /// CPU profiles of every process.
    Profiles,
    /// HTTP spans and RED metrics, with `traceparent` propagation.
    Traces,
    /// TCP handshake, RTT, retransmits, bytes and DNS latency per workload.
    Network,
}

impl SignalKind {
    /// Its name in flags, `/healthz` and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            SignalKind::Profiles => "profiles",
            SignalKind::Traces => "traces",
            SignalKind::Network => "network",
        }
    }
}

/// How user stacks are walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnwindChoice {
    /// From `.eh_frame` tables in the kernel, with frame pointers where a
    /// binary has no table.
    #[default]
    Tables,
    /// The kernel's frame-pointer walk only.
    FramePointers,
}

/// Which kernel hooks carry the HTTP capture's data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpHooks {
    /// Socket tracepoints where the kernel has them (Linux 6.5 and later),
    /// else syscall tracepoints.
    #[default]
    Auto,
    /// `sock_recv_length`/`sock_send_length` BTF tracepoints; an error on a
    /// kernel without them.
    Sockets,
    /// The read/write-family syscall tracepoints (every syscall of every
    /// process then takes the kernel's slow path: about 10% of a busy
    /// server's throughput).
    Syscalls,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("collector configuration: {0}")]
    Collector(#[from] fathom_collector::config::ConfigError),
    #[error("{0}")]
    Invalid(String),
}

/// The TOML file. Every key is optional; a flag or its variable overrides
/// the key of the same meaning.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub signals: Option<Vec<SignalKind>>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    pub pids: Option<Vec<u32>>,
    pub health_listen: Option<SocketAddr>,
    #[serde(default)]
    pub output: OutputFile,
    #[serde(default)]
    pub profiles: ProfilesFile,
    #[serde(default)]
    pub traces: TracesFile,
    #[serde(default)]
    pub network: NetworkFile,
    #[serde(default)]
    pub kubernetes: KubernetesFile,
    /// The embedded collector, as in the collector's own file.
    pub collector: Option<CollectorConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    pub collector_url: Option<String>,
    pub collector_token: Option<String>,
    pub buffer_bytes: Option<u64>,
    pub dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilesFile {
    pub frequency: Option<u64>,
    pub debug_dirs: Option<Vec<PathBuf>>,
    pub symbol_cache_bytes: Option<usize>,
    pub unwind: Option<UnwindChoice>,
    pub unwind_table_rows: Option<u32>,
    pub unwind_cache_dir: Option<PathBuf>,
    pub off_cpu: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub off_cpu_threshold: Option<Duration>,
    pub off_cpu_max_stacks: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracesFile {
    pub inject: Option<bool>,
    pub inject_keep_alive: Option<bool>,
    pub go: Option<bool>,
    pub pair: Option<bool>,
    pub hooks: Option<HttpHooks>,
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    pub interfaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesFile {
    pub metadata: Option<bool>,
    pub node_name: Option<String>,
    pub api_url: Option<String>,
    pub kubelet_url: Option<String>,
    pub kubelet_insecure_tls: Option<bool>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl AgentFile {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// Sampling and symbolization, shared by `profile` and the daemon.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Samples per second per CPU [default: 99].
    #[arg(long, env = "FATHOM_FREQUENCY")]
    pub frequency: Option<u64>,
    /// Only this process (repeatable): profiles, spans and injection;
    /// every process when absent.
    #[arg(long = "pid", env = "FATHOM_PIDS", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Directories with separate debug files (`.build-id/xx/rest.debug`,
    /// or by `.gnu_debuglink` name), searched in each process's own root
    /// first, then in ours (repeatable) [default: /usr/lib/debug].
    #[arg(long = "debug-dir", env = "FATHOM_DEBUG_DIRS", value_delimiter = ',')]
    pub debug_dirs: Vec<PathBuf>,
    /// Memory bound of the symbol cache, in bytes [default: 16 MiB].
    #[arg(long, env = "FATHOM_SYMBOL_CACHE_BYTES")]
    pub symbol_cache_bytes: Option<usize>,
    /// How user stacks are walked [default: tables].
    #[arg(long, env = "FATHOM_UNWIND", value_enum)]
    pub unwind: Option<UnwindChoice>,
    /// Unwind rows the kernel holds for all binaries together (8 bytes
    /// each, preallocated). A binary whose table does not fit is walked by
    /// frame pointers, and logged [default: 2097152].
    #[arg(long, env = "FATHOM_UNWIND_TABLE_ROWS")]
    pub unwind_table_rows: Option<u32>,
    /// Directory where built unwind tables are kept across restarts.
    #[arg(long, env = "FATHOM_UNWIND_CACHE_DIR")]
    pub unwind_cache_dir: Option<PathBuf>,
    /// Also profile off-CPU time (where threads wait: sleeps, locks, I/O),
    /// delivered as its own profile type `off_cpu` [default: false].
    #[arg(long, env = "FATHOM_OFF_CPU", num_args = 0..=1, default_missing_value = "true")]
    pub off_cpu: Option<bool>,
    /// Shortest off-CPU interval counted [default: 1ms].
    #[arg(long, env = "FATHOM_OFF_CPU_THRESHOLD", value_parser = humantime::parse_duration)]
    pub off_cpu_threshold: Option<Duration>,
    /// Off-CPU stack captures per CPU per second; past it, blocked time is
    /// still counted, under a "capture budget used up" frame (0: no limit)
    /// [default: 2000].
    #[arg(long, env = "FATHOM_OFF_CPU_MAX_STACKS")]
    pub off_cpu_max_stacks: Option<u32>,
}

/// What the profiler samples and how its stacks are resolved.
#[derive(Clone, Debug)]
pub struct SamplingConfig {
    pub frequency_hz: u64,
    pub pids: Vec<u32>,
    pub unwind: UnwindChoice,
    pub unwind_table_rows: u32,
    pub unwind_cache_dir: Option<PathBuf>,
    pub symbolizer: SymbolizerConfig,
    /// Off-CPU profiling, with its threshold; `None`: off.
    pub off_cpu: Option<Duration>,
    /// Off-CPU stack captures per CPU per second (0: no limit).
    pub off_cpu_max_stacks: u32,
}

impl SamplingArgs {
    /// With the file's `pids` and `[profiles]` under the flags.
    pub fn resolve(&self, file: &AgentFile) -> Result<SamplingConfig, ConfigError> {
        let p = &file.profiles;
        let pids = if self.pids.is_empty() {
            file.pids.clone().unwrap_or_default()
        } else {
            self.pids.clone()
        };
        for &pid in &pids {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(ConfigError::Invalid(format!(
                    "--pid {pid}: no such process"
                )));
            }
        }
        let frequency_hz = self.frequency.or(p.frequency).unwrap_or(99);
        if frequency_hz == 0 {
            return Err(ConfigError::Invalid("--frequency must be above 0".into()));
        }
        let debug_dirs = if self.debug_dirs.is_empty() {
            p.debug_dirs
                .clone()
                .unwrap_or_else(|| vec![PathBuf::from("/usr/lib/debug")])
        } else {
            self.debug_dirs.clone()
        };
        let defaults = SymbolizerConfig::default();
        let off_cpu_threshold = self
            .off_cpu_threshold
            .or(p.off_cpu_threshold)
            .unwrap_or(DEFAULT_OFF_CPU_THRESHOLD);
        let off_cpu = self
            .off_cpu
            .or(p.off_cpu)
            .unwrap_or(false)
            .then_some(off_cpu_threshold);
        Ok(SamplingConfig {
            off_cpu,
            off_cpu_max_stacks: self
                .off_cpu_max_stacks
                .or(p.off_cpu_max_stacks)
                .unwrap_or(crate::profiles::capture::DEFAULT_OFF_CPU_MAX_STACKS),
            frequency_hz,
            pids,
            unwind: self.unwind.or(p.unwind).unwrap_or_default(),
            unwind_table_rows: self
                .unwind_table_rows
                .or(p.unwind_table_rows)
                .unwrap_or(DEFAULT_UNWIND_TABLE_ROWS),
            unwind_cache_dir: self
                .unwind_cache_dir
                .clone()
                .or_else(|| p.unwind_cache_dir.clone()),
            symbolizer: SymbolizerConfig {
                debug_dirs,
                cache_bytes: self
                    .symbol_cache_bytes
                    .or(p.symbol_cache_bytes)
                    .unwrap_or(defaults.cache_bytes),
                ..defaults
            },
        })
    }
}

/// The daemon's flags.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Signals to collect: `profiles` (CPU profiles), `traces` (HTTP spans
    /// and RED metrics of every process, with `traceparent` propagation),
    /// `network` (TCP handshake, RTT, retransmits, bytes, DNS latency per
    /// workload, from TC hooks and tracepoints) [default: all three].
    #[arg(long, env = "FATHOM_SIGNALS", value_delimiter = ',', value_enum)]
    pub signals: Vec<SignalKind>,
    /// How often profiles are delivered [default: 10s].
    #[arg(long, env = "FATHOM_INTERVAL", value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,
    /// Write per-process profiles into this directory instead of sending
    /// them to a collector (profiles only).
    #[arg(long, env = "FATHOM_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    /// With --output-dir: profiles older than this are deleted [default: 1h].
    #[arg(long, env = "FATHOM_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Send profiles (Pyroscope push), spans and metrics (OTLP/HTTP) to this
    /// collector's HTTP port (`http://collector:4040`): the collector in the
    /// agent then keeps no store and serves nothing, and exports to it.
    #[arg(long, env = "FATHOM_COLLECTOR_URL", conflicts_with = "output_dir")]
    pub collector_url: Option<String>,
    /// Bearer token for --collector-url.
    #[arg(long, env = "FATHOM_COLLECTOR_TOKEN", hide_env_values = true)]
    pub collector_token: Option<String>,
    /// With --collector-url: bytes kept while the collector is unreachable,
    /// for each of profiles and spans with metrics; beyond it the oldest are
    /// dropped and counted [default: 64 MiB].
    #[arg(long, env = "FATHOM_BUFFER_BYTES")]
    pub buffer_bytes: Option<u64>,
    /// Insert a W3C `traceparent` header into outgoing HTTP/1.x requests of
    /// traced processes that carry none, so services join one trace
    /// [default: true].
    #[arg(long, env = "FATHOM_TRACE_INJECT", action = clap::ArgAction::Set)]
    pub trace_inject: Option<bool>,
    /// With injection: every request of a kept-alive client connection, not
    /// only its first (client sockets stay in a sockhash with a stream
    /// verdict program; checked on the running kernel at start, else the
    /// first request only) [default: true].
    #[arg(long, env = "FATHOM_TRACE_INJECT_KEEP_ALIVE", action = clap::ArgAction::Set)]
    pub trace_inject_keep_alive: Option<bool>,
    /// Go executables get uprobes on `net/http` and the runtime, so that a
    /// Go service's client requests get the parent of the request their
    /// goroutine serves (`false`: no uprobes in Go processes) [default:
    /// true].
    #[arg(long, env = "FATHOM_TRACE_GO", action = clap::ArgAction::Set)]
    pub trace_go: Option<bool>,
    /// With socket hooks and injection: the kernel pairs each simple
    /// exchange (a bodiless request whole in one call, a response framed by
    /// its length, chunks or close) and sends one record per span; others
    /// are parsed in user space (`false`: every exchange parsed in user
    /// space) [default: true].
    #[arg(long, env = "FATHOM_TRACE_PAIR", action = clap::ArgAction::Set)]
    pub trace_pair: Option<bool>,
    /// Share of traces whose spans are exported, 0..=1 (OpenTelemetry's
    /// `traceidratio` rule on the trace id, so every agent keeps the same
    /// traces). RED metrics count every request regardless [default: 1].
    #[arg(long, env = "FATHOM_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,
    /// Kernel hooks of the HTTP capture: `auto` (socket tracepoints where
    /// the kernel has them, else syscall tracepoints), `sockets`, `syscalls`
    /// [default: auto].
    #[arg(long, env = "FATHOM_TRACE_HOOKS", value_enum)]
    pub trace_hooks: Option<HttpHooks>,
    /// Serve `GET /healthz` and `/metrics` on this address (`HOST:PORT`):
    /// 200 once the eBPF programs are attached, 503 before and while
    /// stopping. Off by default.
    #[arg(long, env = "FATHOM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Interfaces whose traffic the network signal measures: names or `*`
    /// patterns (e.g. `eth0,veth*,cali*`); empty: the default route's
    /// interface and every veth. New interfaces are picked up while running.
    #[arg(long, env = "FATHOM_NET_INTERFACES", value_delimiter = ',')]
    pub net_interfaces: Vec<String>,
    /// Embedded collector (`--config` is the agent's file, whose
    /// `[collector]` table configures it).
    #[command(flatten, next_help_heading = "Embedded collector")]
    pub collector: CollectorArgs,
    /// Kubernetes pod metadata on every signal.
    #[command(flatten, next_help_heading = "Kubernetes metadata")]
    pub k8s: K8sArgs,
}

/// Pod metadata: on in a pod with a service account, or when an API server
/// or kubelet URL is given; off elsewhere (container ids still come from
/// cgroups).
#[derive(Args, Debug, Clone, Default)]
pub struct K8sArgs {
    /// Pod metadata at all (`false`: container ids from cgroups only)
    /// [default: true].
    #[arg(long, env = "FATHOM_K8S_METADATA", action = clap::ArgAction::Set)]
    pub k8s_metadata: Option<bool>,
    /// This node's name: only its pods are watched (`spec.nodeName`; give
    /// it with the downward API).
    #[arg(long, env = "K8S_NODE_NAME")]
    pub node_name: Option<String>,
    /// The API server (default in a pod: the in-cluster service). Plain
    /// http only to a loopback address.
    #[arg(long, env = "FATHOM_K8S_API_URL")]
    pub k8s_api_url: Option<String>,
    /// The kubelet, whose `/pods` is polled while the API server cannot be
    /// watched (default in a pod: https://localhost:10250; `off`: none).
    #[arg(long, env = "FATHOM_KUBELET_URL")]
    pub kubelet_url: Option<String>,
    /// Accept any certificate from the kubelet (self-signed serving
    /// certificates) [default: false].
    #[arg(long, env = "FATHOM_KUBELET_INSECURE_TLS", action = clap::ArgAction::Set)]
    pub kubelet_insecure_tls: Option<bool>,
    /// Bearer token file for the API server and the kubelet (default: the
    /// service account's).
    #[arg(long, env = "FATHOM_K8S_TOKEN_FILE")]
    pub k8s_token_file: Option<PathBuf>,
    /// CA bundle for https (default: the service account's `ca.crt`).
    #[arg(long, env = "FATHOM_K8S_CA_FILE")]
    pub k8s_ca_file: Option<PathBuf>,
}

/// Where the daemon's output goes.
#[derive(Clone, Debug)]
pub enum Output {
    /// The collector in this process: its store and UI (the default), or
    /// its exporters (a remote collector with --collector-url, Pyroscope,
    /// any OTLP endpoint).
    Collector(Box<CollectorConfig>),
    /// One pprof file per process per interval (profiles only).
    Directory { dir: PathBuf, retention: Duration },
}

/// HTTP tracing settings.
#[derive(Clone, Debug)]
pub struct TracesSettings {
    pub inject: bool,
    pub inject_keep_alive: bool,
    pub go: bool,
    pub pair: bool,
    pub hooks: HttpHooks,
    pub sample_ratio: f64,
}

/// Network signal settings.
#[derive(Clone, Debug, Default)]
pub struct NetworkSettings {
    pub interfaces: Vec<String>,
}

/// Kubernetes metadata settings, before the in-cluster defaults apply.
#[derive(Clone, Debug)]
pub struct KubernetesSettings {
    pub metadata: bool,
    pub node_name: Option<String>,
    pub api_url: Option<String>,
    pub kubelet_url: Option<String>,
    pub kubelet_insecure_tls: bool,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// Everything the daemon runs with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// In start order, without repeats.
    pub signals: Vec<SignalKind>,
    pub sampling: SamplingConfig,
    pub interval: Duration,
    pub output: Output,
    pub traces: TracesSettings,
    pub network: NetworkSettings,
    pub health_listen: Option<SocketAddr>,
    pub kubernetes: KubernetesSettings,
}

impl AgentConfig {
    pub fn has(&self, signal: SignalKind) -> bool {
        self.signals.contains(&signal)
    }
}

impl DaemonArgs {
    /// The file (when `--config` names one), then the flags; `env` supplies
    /// the `OTEL_EXPORTER_OTLP_*` variables of the collector (pass
    /// `std::env::var`).
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let file = match &self.collector.config {
            Some(path) => AgentFile::read(path)?,
            None => AgentFile::default(),
        };
        let sampling = self.sampling.resolve(&file)?;
        let mut signals = if self.signals.is_empty() {
            file.signals.clone().unwrap_or_else(|| {
                vec![
                    SignalKind::Profiles,
                    SignalKind::Traces,
                    SignalKind::Network,
                ]
            })
        } else {
            self.signals.clone()
        };
        // Start order: the network signal first (tracing reads its
        // connections), profiles last.
        signals.sort_by_key(|s| match s {
            SignalKind::Network => 0,
            SignalKind::Traces => 1,
            SignalKind::Profiles => 2,
        });
        signals.dedup();
        if signals.is_empty() {
            return Err(ConfigError::Invalid("--signals: nothing to collect".into()));
        }
        let interval = self
            .interval
            .or(file.interval)
            .unwrap_or(Duration::from_secs(10));
        if interval < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(format!(
                "--interval {interval:?} is too short (at least 100ms)"
            )));
        }
        let o = &file.output;
        let output_dir = self.output_dir.clone().or_else(|| o.dir.clone());
        let collector_url = self
            .collector_url
            .clone()
            .or_else(|| o.collector_url.clone());
        if output_dir.is_some() && collector_url.is_some() {
            return Err(ConfigError::Invalid(
                "--output-dir and --collector-url exclude each other".into(),
            ));
        }
        let token = self
            .collector_token
            .clone()
            .or_else(|| o.collector_token.clone());
        if token.is_some() && collector_url.is_none() {
            return Err(ConfigError::Invalid(
                "--collector-token needs --collector-url".into(),
            ));
        }
        let output = match output_dir {
            Some(dir) => {
                if !signals.contains(&SignalKind::Profiles) {
                    return Err(ConfigError::Invalid(
                        "--output-dir writes profiles only: add `profiles` to --signals".into(),
                    ));
                }
                for s in &signals {
                    if *s != SignalKind::Profiles {
                        tracing::warn!("--output-dir writes profiles only: no {}", s.name());
                    }
                }
                signals = vec![SignalKind::Profiles];
                Output::Directory {
                    dir,
                    retention: self
                        .retention
                        .or(o.retention)
                        .unwrap_or(Duration::from_secs(3600)),
                }
            }
            None => {
                let base = file.collector.clone().unwrap_or_default();
                let mut collector = self.collector.resolve_onto(base, &env)?;
                if let Some(url) = collector_url {
                    remote_collector(
                        &mut collector,
                        &url,
                        token,
                        self.buffer_bytes.or(o.buffer_bytes).unwrap_or(64 << 20),
                        interval,
                    )?;
                }
                Output::Collector(Box::new(collector))
            }
        };
        let t = &file.traces;
        let sample_ratio = self.trace_sample_ratio.or(t.sample_ratio).unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(ConfigError::Invalid(format!(
                "traces.sample_ratio {sample_ratio} is not a number from 0 to 1"
            )));
        }
        let k = &self.k8s;
        let kf = &file.kubernetes;
        Ok(AgentConfig {
            signals,
            sampling,
            interval,
            output,
            traces: TracesSettings {
                inject: self.trace_inject.or(t.inject).unwrap_or(true),
                inject_keep_alive: self
                    .trace_inject_keep_alive
                    .or(t.inject_keep_alive)
                    .unwrap_or(true),
                go: self.trace_go.or(t.go).unwrap_or(true),
                pair: self.trace_pair.or(t.pair).unwrap_or(true),
                hooks: self.trace_hooks.or(t.hooks).unwrap_or_default(),
                sample_ratio,
            },
            network: NetworkSettings {
                interfaces: if self.net_interfaces.is_empty() {
                    file.network.interfaces.clone().unwrap_or_default()
                } else {
                    self.net_interfaces.clone()
                },
            },
            health_listen: self.health_listen.or(file.health_listen),
            kubernetes: KubernetesSettings {
                metadata: k.k8s_metadata.or(kf.metadata).unwrap_or(true),
                node_name: k.node_name.clone().or_else(|| kf.node_name.clone()),
                api_url: k.k8s_api_url.clone().or_else(|| kf.api_url.clone()),
                kubelet_url: k.kubelet_url.clone().or_else(|| kf.kubelet_url.clone()),
                kubelet_insecure_tls: k
                    .kubelet_insecure_tls
                    .or(kf.kubelet_insecure_tls)
                    .unwrap_or(false),
                token_file: k.k8s_token_file.clone().or_else(|| kf.token_file.clone()),
                ca_file: k.k8s_ca_file.clone().or_else(|| kf.ca_file.clone()),
            },
        })
    }
}

/// The collector in the agent as a forwarder to a remote Fathom collector:
/// no listeners, no store, its Pyroscope exporter (connect push) and OTLP
/// exporter (OTLP/HTTP on the same port) pointed at `url`, each with a
/// byte-bounded retry buffer, and profiles aggregated over the agent's
/// interval.
fn remote_collector(
    c: &mut CollectorConfig,
    url: &str,
    token: Option<String>,
    buffer_bytes: u64,
    interval: Duration,
) -> Result<(), ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid(format!(
            "--collector-url {url:?} must start with http:// or https://"
        )));
    }
    c.listen.otlp_grpc = None;
    c.listen.otlp_http = None;
    c.listen.http = None;
    c.store.enabled = Some(false);
    c.aggregation.window = interval;
    c.pyroscope = Some(PyroscopeConfig {
        url: url.to_string(),
        org_id: None,
        basic_auth: None,
        bearer_token: token.clone(),
        timeout: Duration::from_secs(10),
        buffer_bytes,
    });
    c.otlp = Some(OtlpExporterConfig {
        endpoint: url.to_string(),
        protocol: OtlpProtocol::HttpProtobuf,
        headers: token
            .map(|t| ("Authorization".to_string(), format!("Bearer {t}")))
            .into_iter()
            .collect(),
        timeout: Duration::from_secs(10),
        buffer_bytes,
        metrics: true,
    });
    c.validate()?;
    Ok(())
}

pub fn parse_ratio(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{v:?} is not a number from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        daemon: DaemonArgs,
    }

    fn resolve(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("fathom-agent").chain(args.iter().copied()))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        cli.daemon.resolve(|_| None)
    }

    #[test]
    fn defaults_run_every_signal_into_the_embedded_store() {
        let c = resolve(&[]).unwrap();
        assert_eq!(
            c.signals,
            [
                SignalKind::Network,
                SignalKind::Traces,
                SignalKind::Profiles
            ]
        );
        assert_eq!(c.interval, Duration::from_secs(10));
        assert_eq!(c.sampling.frequency_hz, 99);
        assert_eq!(c.sampling.unwind, UnwindChoice::Tables);
        assert!(c.traces.inject);
        assert!(c.traces.inject_keep_alive);
        assert!(c.traces.go);
        assert!(c.traces.pair);
        let Output::Collector(collector) = &c.output else {
            panic!("not the collector")
        };
        assert!(collector.store_enabled());
        assert!(collector.listen.http.is_some());
    }

    #[test]
    fn remote_url_makes_the_collector_a_forwarder() {
        let c = resolve(&[
            "--collector-url",
            "http://collector:4040",
            "--collector-token",
            "t0k",
            "--interval",
            "5s",
        ])
        .unwrap();
        let Output::Collector(collector) = &c.output else {
            panic!("not the collector")
        };
        assert!(!collector.store_enabled());
        assert_eq!(collector.listen.http, None);
        assert_eq!(collector.listen.otlp_grpc, None);
        assert_eq!(collector.aggregation.window, Duration::from_secs(5));
        let p = collector.pyroscope.as_ref().unwrap();
        assert_eq!(p.url, "http://collector:4040");
        assert_eq!(p.bearer_token.as_deref(), Some("t0k"));
        let o = collector.otlp.as_ref().unwrap();
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.headers["Authorization"], "Bearer t0k");
        assert!(resolve(&["--collector-url", "collector:4040"]).is_err());
        assert!(resolve(&["--collector-token", "x"]).is_err());
    }

    #[test]
    fn file_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            r#"
signals = ["profiles", "network"]
interval = "3s"
[profiles]
frequency = 49
unwind = "frame-pointers"
[traces]
inject = false
inject_keep_alive = false
go = false
pair = false
[network]
interfaces = ["veth*"]
[collector.store]
path = "/tmp/x.redb"
"#,
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = resolve(&["--config", p]).unwrap();
        assert_eq!(c.signals, [SignalKind::Network, SignalKind::Profiles]);
        assert_eq!(c.interval, Duration::from_secs(3));
        assert_eq!(c.sampling.frequency_hz, 49);
        assert_eq!(c.sampling.unwind, UnwindChoice::FramePointers);
        assert!(!c.traces.inject);
        assert!(!c.traces.inject_keep_alive);
        assert!(!c.traces.go);
        assert!(!c.traces.pair);
        assert_eq!(c.network.interfaces, ["veth*"]);
        let Output::Collector(collector) = &c.output else {
            panic!("not the collector")
        };
        assert_eq!(collector.store.path, PathBuf::from("/tmp/x.redb"));
        // Flags win.
        let c = resolve(&["--config", p, "--frequency", "19", "--signals", "traces"]).unwrap();
        assert_eq!(c.sampling.frequency_hz, 19);
        assert_eq!(c.signals, [SignalKind::Traces]);
        // Unknown keys are errors, with the file's name.
        std::fs::write(&path, "frequncy = 3\n").unwrap();
        let e = resolve(&["--config", p]).unwrap_err().to_string();
        assert!(e.contains("agent.toml") && e.contains("frequncy"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(resolve(&["--signals", "profiles,logs"]).is_err());
        assert!(resolve(&["--unwind", "dwarf"]).is_err());
        assert!(resolve(&["--trace-sample-ratio", "1.5"]).is_err());
        assert!(resolve(&["--interval", "1ms"]).is_err());
        assert!(resolve(&["--output-dir", "/tmp/p", "--signals", "traces"]).is_err());
        let c = resolve(&["--output-dir", "/tmp/p"]).unwrap();
        assert_eq!(c.signals, [SignalKind::Profiles]);
        // The file's values are checked like the flags'.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[traces]\nsample_ratio = 2.0\n").unwrap();
        let e = resolve(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("sample_ratio"), "{e}");
    }
}
