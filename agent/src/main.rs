//! `fathom-agent`: the command line.
use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fathom_agent::{
    export::{EmbeddedSink, RemoteSink, RemoteTraceSink},
    health::{Health, HealthServer, HealthState, SignalStatus},
    k8s,
    net_session::{NetConfig, NetSession},
    pprof::{self, CpuProfileMeta},
    preflight,
    profiler::{ProfilerConfig, UnwindMapSizes, UnwindMode},
    session::{self, DirSink, Session, Stop},
    traces::{
        ConnectionLookup, EmbeddedTraceSink, NoConnections, TraceConfig, TraceSession, TraceSink,
    },
    unwinder::UnwinderConfig,
};
use fathom_collector::{Collector, CollectorArgs};
use fathom_symbolizer::SymbolizerConfig;

/// Fathom's per-node eBPF agent: continuous CPU profiling of every process.
///
/// Without a subcommand it runs as a daemon: every interval, one profile per
/// process goes to the collector embedded in the agent (UI, API and
/// `/metrics` on http://0.0.0.0:4040 by default; receivers on 4317/4318), or
/// to a remote collector (`--collector-url`), or into a directory
/// (`--output-dir`).
#[derive(Parser, Debug)]
#[command(name = "fathom-agent", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,fathom_agent=debug`).
    #[arg(long, env = "FATHOM_LOG", default_value = "info", global = true)]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Profile once, write one pprof file and exit.
    Profile(ProfileArgs),
    /// Say what this kernel lets the agent do: load every eBPF program the
    /// way the agent does and print the verifier's figures against the
    /// verification budget (and, with --smoke, run each signal against a
    /// workload). Exits 1 when a program is over the budget, a program a
    /// signal needs is rejected, or a smoke check fails; a rejected program
    /// the agent can do without is shown as DEGRADED.
    Check(CheckArgs),
    /// A workload of `check --smoke` (internal).
    #[command(hide = true)]
    CheckWorkload(WorkloadArgs),
}

#[derive(Args, Debug)]
struct WorkloadArgs {
    /// `spin SECONDS`, or `serve ADDR UPSTREAM|- REQUESTS`.
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct CheckArgs {
    /// Only this eBPF object (`fathom`, `fathom-http`, `fathom-net`;
    /// repeatable).
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Only this configuration (`default`, `pids`, `inject`, `inject+pids`;
    /// repeatable).
    #[arg(long = "config")]
    configs: Vec<String>,
    /// Then run each signal against a small workload of its own (a busy
    /// loop, two HTTP services and a client, TCP connections on loopback)
    /// and check what it produced.
    #[arg(long)]
    smoke: bool,
    /// Fail on a rejected program the agent can do without, too.
    #[arg(long)]
    strict: bool,
}

#[derive(Args, Debug)]
struct SamplingArgs {
    /// Samples per second per CPU.
    #[arg(long, env = "FATHOM_FREQUENCY", default_value_t = 99)]
    frequency: u64,
    /// Only profile this process (repeatable); all processes when absent.
    #[arg(long = "pid", env = "FATHOM_PIDS", value_delimiter = ',')]
    pids: Vec<u32>,
    /// Directories with separate debug files (`.build-id/xx/rest.debug`,
    /// or by `.gnu_debuglink` name), searched in each process's own root
    /// first, then in ours (repeatable).
    #[arg(
        long = "debug-dir",
        env = "FATHOM_DEBUG_DIRS",
        value_delimiter = ',',
        default_value = "/usr/lib/debug"
    )]
    debug_dirs: Vec<PathBuf>,
    /// Memory bound of the symbol cache, in bytes.
    #[arg(long, env = "FATHOM_SYMBOL_CACHE_BYTES", default_value_t = SymbolizerConfig::default().cache_bytes)]
    symbol_cache_bytes: usize,
    /// How user stacks are walked: `tables` (from `.eh_frame`, with frame
    /// pointers where a binary has no table) or `frame-pointers` (the
    /// kernel's walk only).
    #[arg(long, env = "FATHOM_UNWIND", default_value = "tables", value_parser = ["tables", "frame-pointers"])]
    unwind: String,
    /// Unwind rows the kernel holds for all binaries together (8 bytes
    /// each, preallocated). A binary whose table does not fit is walked by
    /// frame pointers, and logged.
    #[arg(long, env = "FATHOM_UNWIND_TABLE_ROWS", default_value_t = UnwindMapSizes::default().rows)]
    unwind_table_rows: u32,
    /// Directory where built unwind tables are kept across restarts.
    #[arg(long, env = "FATHOM_UNWIND_CACHE_DIR")]
    unwind_cache_dir: Option<PathBuf>,
}

impl SamplingArgs {
    fn symbolizer(&self) -> SymbolizerConfig {
        SymbolizerConfig {
            debug_dirs: self.debug_dirs.clone(),
            cache_bytes: self.symbol_cache_bytes,
            ..SymbolizerConfig::default()
        }
    }
}

#[derive(Args, Debug)]
struct ProfileArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
    /// How long to profile (e.g. `10s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where to write the gzipped pprof profile.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
    /// How often to deliver profiles.
    #[arg(long, env = "FATHOM_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Write per-process profiles into this directory instead of sending
    /// them to a collector.
    #[arg(long, env = "FATHOM_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
    /// With --output-dir: profiles older than this are deleted.
    #[arg(long, env = "FATHOM_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    retention: Duration,
    /// Send profiles (Pyroscope push), spans and metrics (OTLP/HTTP) to this
    /// collector's HTTP port (`http://collector:4040`) instead of running one
    /// in the agent.
    #[arg(long, env = "FATHOM_COLLECTOR_URL", conflicts_with = "output_dir")]
    collector_url: Option<String>,
    /// Bearer token for --collector-url.
    #[arg(
        long,
        env = "FATHOM_COLLECTOR_TOKEN",
        hide_env_values = true,
        requires = "collector_url"
    )]
    collector_token: Option<String>,
    /// With --collector-url: bytes kept while the collector is unreachable,
    /// for each of profiles, spans with RED metrics, and network metrics;
    /// beyond it the oldest are dropped and counted.
    #[arg(long, env = "FATHOM_BUFFER_BYTES", default_value_t = 64 << 20)]
    buffer_bytes: u64,
    /// Signals to collect: `profiles` (CPU profiles), `traces` (HTTP spans
    /// and RED metrics of every process, with `traceparent` propagation),
    /// `network` (TCP handshake, RTT, retransmits, bytes, DNS latency per
    /// workload, from TC hooks and tracepoints).
    /// Spans and metrics go to the embedded collector (which exports them to
    /// any OTLP endpoint, `--otlp-endpoint`) or, with --collector-url, over
    /// OTLP/HTTP to that collector.
    #[arg(
        long,
        env = "FATHOM_SIGNALS",
        value_delimiter = ',',
        default_value = "profiles,traces,network",
        value_parser = ["profiles", "traces", "network"]
    )]
    signals: Vec<String>,
    /// Insert a W3C `traceparent` header into outgoing HTTP/1.x requests of
    /// traced processes that carry none, so services join one trace.
    #[arg(long, env = "FATHOM_TRACE_INJECT", default_value_t = true, action = clap::ArgAction::Set)]
    trace_inject: bool,
    /// Share of traces whose spans are exported, 0..=1 (OpenTelemetry's
    /// `traceidratio` rule on the trace id, so every agent keeps the same
    /// traces). RED metrics count every request regardless.
    #[arg(long, env = "FATHOM_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    trace_sample_ratio: f64,
    /// Serve `GET /healthz` on this address (`HOST:PORT`): 200 once the eBPF
    /// programs are attached, 503 before and while stopping. Off by default.
    #[arg(long, env = "FATHOM_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// Interfaces whose traffic the network signal measures: names or `*`
    /// patterns (e.g. `eth0,veth*,cali*`); empty: the default route's
    /// interface and every veth. New interfaces are picked up while running.
    #[arg(long, env = "FATHOM_NET_INTERFACES", value_delimiter = ',')]
    net_interfaces: Vec<String>,
    /// Embedded collector (used unless --output-dir or --collector-url is given).
    #[command(flatten, next_help_heading = "Embedded collector")]
    collector: CollectorArgs,
    /// Kubernetes pod metadata on every signal.
    #[command(flatten, next_help_heading = "Kubernetes metadata")]
    k8s: K8sArgs,
}

/// Pod metadata: on in a pod with a service account, or when an API server
/// or kubelet URL is given; off elsewhere (container ids still come from
/// cgroups).
#[derive(Args, Debug)]
struct K8sArgs {
    /// Pod metadata at all (`false`: container ids from cgroups only).
    #[arg(long, env = "FATHOM_K8S_METADATA", default_value_t = true, action = clap::ArgAction::Set)]
    k8s_metadata: bool,
    /// This node's name: only its pods are watched (`spec.nodeName`; give
    /// it with the downward API).
    #[arg(long, env = "K8S_NODE_NAME")]
    node_name: Option<String>,
    /// The API server (default in a pod: the in-cluster service). Plain
    /// http only to a loopback address.
    #[arg(long, env = "FATHOM_K8S_API_URL")]
    k8s_api_url: Option<String>,
    /// The kubelet, whose `/pods` is polled while the API server cannot be
    /// watched (default in a pod: https://localhost:10250; `off`: none).
    #[arg(long, env = "FATHOM_KUBELET_URL")]
    kubelet_url: Option<String>,
    /// Accept any certificate from the kubelet (self-signed serving
    /// certificates).
    #[arg(long, env = "FATHOM_KUBELET_INSECURE_TLS", default_value_t = false, action = clap::ArgAction::Set)]
    kubelet_insecure_tls: bool,
    /// Bearer token file for the API server and the kubelet (default: the
    /// service account's).
    #[arg(long, env = "FATHOM_K8S_TOKEN_FILE")]
    k8s_token_file: Option<PathBuf>,
    /// CA bundle for https (default: the service account's `ca.crt`).
    #[arg(long, env = "FATHOM_K8S_CA_FILE")]
    k8s_ca_file: Option<PathBuf>,
}

/// Starts the pod metadata watcher when in Kubernetes or asked to, and
/// makes it the one every signal consults.
fn start_k8s(args: &K8sArgs) -> anyhow::Result<Option<k8s::Watcher>> {
    let in_cluster = k8s::in_cluster();
    let kubelet_off = args.kubelet_url.as_deref() == Some("off");
    let kubelet_url = match (&args.kubelet_url, kubelet_off, in_cluster) {
        (_, true, _) => None,
        (Some(url), false, _) => Some(url.clone()),
        (None, false, true) => Some(k8s::DEFAULT_KUBELET_URL.to_string()),
        (None, false, false) => None,
    };
    let use_api = in_cluster || args.k8s_api_url.is_some();
    if !args.k8s_metadata || (!use_api && kubelet_url.is_none()) {
        tracing::debug!("not in Kubernetes: container ids from cgroups only");
        return Ok(None);
    }
    let config = k8s::K8sConfig {
        node_name: args.node_name.clone().unwrap_or_default(),
        api_url: args.k8s_api_url.clone(),
        use_api,
        kubelet_url,
        kubelet_insecure_tls: args.kubelet_insecure_tls,
        token_file: args.k8s_token_file.clone(),
        ca_file: args.k8s_ca_file.clone(),
        ..k8s::K8sConfig::default()
    };
    let metadata = k8s::K8sMetadata::new(config.grace);
    let watcher = k8s::Watcher::start(&config, metadata.clone()).context("kubernetes metadata")?;
    k8s::install(metadata);
    Ok(Some(watcher))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fathom_collector::init_logging(&cli.log);
    if let Err(missing) = preflight::check() {
        eprint!("{missing}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Some(Command::Profile(args)) => profile(args),
        Some(Command::Check(args)) => check(args),
        Some(Command::CheckWorkload(args)) => check_workload(args),
        None => daemon(cli.daemon),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fathom-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn profiler_config(args: &SamplingArgs) -> anyhow::Result<ProfilerConfig> {
    for &pid in &args.pids {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--pid {pid}: no such process");
        }
    }
    Ok(ProfilerConfig {
        frequency_hz: args.frequency,
        pids: args.pids.clone(),
        unwind: UnwindMapSizes {
            rows: args.unwind_table_rows,
            ..UnwindMapSizes::default()
        },
        unwinder: UnwinderConfig {
            enabled: args.unwind == "tables",
            cache_dir: args.unwind_cache_dir.clone(),
            ..UnwinderConfig::default()
        },
        ..ProfilerConfig::default()
    })
}

fn parse_ratio(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{v:?} is not a number from 0 to 1")),
    }
}

/// Starts HTTP tracing into `sink`. When it cannot start (no tracepoints,
/// verifier refusal, …) and other signals go on, the reason is logged and
/// the agent goes on without it; otherwise it is an error.
fn start_tracing(
    args: &DaemonArgs,
    sink: Box<dyn TraceSink>,
    others_go_on: bool,
    network: Option<&mut NetSession>,
    health: &Health,
) -> anyhow::Result<Option<TraceSession>> {
    let mut trace_config = TraceConfig::default();
    trace_config.capture.pids = args.sampling.pids.clone();
    trace_config.capture.inject = args.trace_inject;
    trace_config.sample_ratio = args.trace_sample_ratio;
    // With the network signal, client spans carry their connect time.
    let connections: Box<dyn ConnectionLookup> = match network.and_then(|n| n.take_connections()) {
        Some(reader) => Box::new(reader),
        None => Box::new(NoConnections),
    };
    match TraceSession::start_with(trace_config, sink, connections) {
        Ok(session) => {
            traces_status(health, Some(&session), None);
            Ok(Some(session))
        }
        Err(e) if others_go_on => {
            tracing::error!("HTTP tracing could not start, going on without it: {e}");
            traces_status(health, None, Some(e.to_string()));
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("starting HTTP tracing")),
    }
}

/// Starts the network metrics into `sink`; like [`start_tracing`], a
/// failure to start is logged and skipped when other signals go on.
fn start_network(
    args: &DaemonArgs,
    sink: Box<dyn TraceSink>,
    others_go_on: bool,
    health: &Health,
) -> anyhow::Result<Option<NetSession>> {
    let mut net_config = NetConfig::default();
    net_config.capture.interfaces = args.net_interfaces.clone();
    match NetSession::start(net_config, sink) {
        Ok(session) => {
            network_status(health, true, None);
            Ok(Some(session))
        }
        Err(e) if others_go_on => {
            tracing::error!("network metrics could not start, going on without them: {e}");
            network_status(health, false, Some(e.to_string()));
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("starting network metrics")),
    }
}

/// Starts the profiling session; when it cannot start and other signals
/// run, says why in one line and goes on without it.
fn start_profiles(
    config: ProfilerConfig,
    sampling: &SamplingArgs,
    others_go_on: bool,
    health: &Health,
) -> anyhow::Result<Option<Session>> {
    match Session::start(config, &sampling.symbolizer()) {
        Ok(session) => {
            profiles_up(health, &session);
            Ok(Some(session))
        }
        Err(e) if others_go_on => {
            tracing::error!("profiling could not start, going on without it: {e}");
            health.set_signal(SignalStatus {
                signal: "profiles",
                mode: "off".into(),
                up: false,
                reason: Some(e.to_string()),
            });
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context("starting the profiler")),
    }
}

/// Records in `health` how the profiling session runs.
fn profiles_up(health: &Health, session: &Session) {
    let mode = session.unwind_mode();
    let reason = match mode {
        UnwindMode::FramePointers { reason: Some(r) } => {
            Some(format!("user stacks by frame pointers only: {r}"))
        }
        _ => None,
    };
    health.set_signal(SignalStatus {
        signal: "profiles",
        mode: mode.name().into(),
        up: true,
        reason,
    });
}

/// Records in `health` how tracing runs, or that it does not.
fn traces_status(health: &Health, session: Option<&TraceSession>, failure: Option<String>) {
    let status = match session {
        Some(s) => {
            let (mode, why) = s.mode();
            SignalStatus {
                signal: "traces",
                mode: mode.into(),
                up: true,
                reason: why.map(|w| format!("no traceparent injection: {w}")),
            }
        }
        None => SignalStatus {
            signal: "traces",
            mode: "off".into(),
            up: false,
            reason: failure,
        },
    };
    health.set_signal(status);
}

/// Records in `health` whether the network signal runs.
fn network_status(health: &Health, up: bool, failure: Option<String>) {
    health.set_signal(SignalStatus {
        signal: "network",
        mode: if up { "tc+tracepoints" } else { "off" }.into(),
        up,
        reason: failure,
    });
}

/// SIGINT/SIGTERM stop the work; a second signal exits at once.
fn stop_on_signals() -> anyhow::Result<Stop> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Stop::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing signal handlers")?;
    let trigger = stop.clone();
    std::thread::Builder::new()
        .name("fathom-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if trigger.is_triggered() {
                    eprintln!("fathom-agent: second signal, exiting now");
                    std::process::exit(128 + signal);
                }
                tracing::info!(signal, "stopping");
                trigger.trigger();
            }
        })?;
    Ok(stop)
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let programs = fathom_agent::check::check_programs(&args.objects, &args.configs);
    print!("{}", fathom_agent::check::programs_table(&programs));
    let bad = programs
        .iter()
        .filter(|c| !c.ok() && (args.strict || c.degraded().is_none()))
        .count();
    let smoke_failed = if args.smoke {
        let smoke = fathom_agent::check::check_smoke();
        print!("{}", fathom_agent::check::smoke_table(&smoke));
        smoke.iter().filter(|s| s.outcome.is_err()).count()
    } else {
        0
    };
    if bad > 0 || smoke_failed > 0 {
        bail!(
            "{bad} program load(s) rejected or over the verification budget, \
             {smoke_failed} smoke check(s) failed"
        );
    }
    Ok(())
}

fn check_workload(args: WorkloadArgs) -> anyhow::Result<()> {
    use fathom_agent::check::workload;
    let arg = |i: usize| args.args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "spin" => workload::spin(arg(1).parse().context("spin SECONDS")?),
        "serve" => {
            let upstream = match arg(2) {
                "-" => None,
                up => Some(up.parse().context("serve: upstream address")?),
            };
            workload::serve(
                arg(1).parse().context("serve: listen address")?,
                upstream,
                arg(3).parse().context("serve: request count")?,
            )?
        }
        other => bail!("unknown workload {other:?}"),
    }
    Ok(())
}

fn profile(args: ProfileArgs) -> anyhow::Result<()> {
    let config = profiler_config(&args.sampling)?;
    // Fail now, not after the whole duration.
    let parent = args.output.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent
        && !dir.is_dir()
    {
        bail!(
            "--output {}: directory {} does not exist",
            args.output.display(),
            dir.display()
        );
    }
    let stop = stop_on_signals()?;
    let mut session = Session::start(config, &args.sampling.symbolizer())?;
    let started = SystemTime::now();
    tracing::info!(duration = %humantime::format_duration(args.duration), "profiling");
    let collected = session.collect(args.duration, &stop)?;
    let meta = CpuProfileMeta {
        frequency_hz: args.sampling.frequency,
        start: started,
        duration: SystemTime::now()
            .duration_since(started)
            .unwrap_or_default(),
    };
    let profile = session.profile(&collected, meta)?;
    let lost = session.loss_summary()?;
    tracing::info!(unwind = %session.unwind_stats().summary(10), "unwinding");
    drop(session); // detach before writing
    session::write_atomically(&args.output, &pprof::encode_gzip(&profile))?;
    tracing::info!(
        samples = collected.counted,
        recorded = collected.recorded,
        %lost,
        output = %args.output.display(),
        "profile written"
    );
    Ok(())
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let config = profiler_config(&args.sampling)?;
    let health = Health::default();
    let _health_server = match args.health_listen {
        Some(addr) => Some(
            HealthServer::start(addr, health.clone())
                .with_context(|| format!("--health-listen {addr}"))?,
        ),
        None => None,
    };
    let profiles = args.signals.iter().any(|s| s == "profiles");
    let traces = args.signals.iter().any(|s| s == "traces");
    let network = args.signals.iter().any(|s| s == "network");
    if !profiles && !traces && !network {
        bail!("--signals: nothing to collect");
    }
    if args.output_dir.is_some() && !profiles {
        bail!("--output-dir writes profiles only: add `profiles` to --signals");
    }
    if args.output_dir.is_some() && traces {
        tracing::warn!("--output-dir writes profiles only: not tracing");
    }
    if args.output_dir.is_some() && network {
        tracing::warn!("--output-dir writes profiles only: no network metrics");
    }
    // Before any signal: they look their pods up in it.
    let _k8s = start_k8s(&args.k8s)?;
    if let Some(dir) = &args.output_dir {
        let mut sink = DirSink::new(dir, args.retention)?;
        let stop = stop_on_signals()?;
        let mut session = Session::start(config, &args.sampling.symbolizer())?;
        profiles_up(&health, &session);
        tracing::info!(dir = %dir.display(), interval = %humantime::format_duration(args.interval), "writing per-process profiles");
        health.set(HealthState::Ready);
        session.run_daemon(args.interval, &mut sink, &stop)?;
        health.set(HealthState::Stopping);
        return Ok(());
    }
    if let Some(url) = &args.collector_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--collector-url {url:?} must start with http:// or https://");
        }
        let stop = stop_on_signals()?;
        // Spans and metrics go over OTLP/HTTP to the collector's HTTP port.
        // The network signal first: tracing reads its connections.
        let mut network_session = if network {
            let sink =
                RemoteTraceSink::new(url, args.collector_token.as_deref(), args.buffer_bytes)?;
            start_network(&args, Box::new(sink), profiles || traces, &health)?
        } else {
            None
        };
        let _traces = if traces {
            let sink =
                RemoteTraceSink::new(url, args.collector_token.as_deref(), args.buffer_bytes)?;
            start_tracing(
                &args,
                Box::new(sink),
                profiles || network,
                network_session.as_mut(),
                &health,
            )?
        } else {
            None
        };
        let _network = network_session;
        if profiles {
            let remote = fathom_collector::config::PyroscopeConfig {
                url: url.clone(),
                org_id: None,
                basic_auth: None,
                bearer_token: args.collector_token.clone(),
                timeout: Duration::from_secs(10),
                buffer_bytes: args.buffer_bytes,
            };
            let mut sink = RemoteSink::new(&remote, args.interval)?;
            let others = _traces.is_some() || _network.is_some();
            match start_profiles(config, &args.sampling, others, &health)? {
                Some(mut session) => {
                    tracing::info!(%url, interval = %humantime::format_duration(args.interval), "sending profiles to the collector");
                    health.set(HealthState::Ready);
                    session.run_daemon(args.interval, &mut sink, &stop)?;
                    health.set(HealthState::Stopping);
                    drop(session);
                }
                None => {
                    health.set(HealthState::Ready);
                    while !stop.wait(Duration::from_secs(1)) {}
                    health.set(HealthState::Stopping);
                }
            }
            drop(sink);
        } else {
            health.set(HealthState::Ready);
            while !stop.wait(Duration::from_secs(1)) {}
            health.set(HealthState::Stopping);
        }
        return Ok(());
    }
    let collector_config = args
        .collector
        .resolve(|k| std::env::var(k).ok())
        .context("collector configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fathom-collector")
        .build()
        .context("starting the collector's runtime")?;
    let collector = runtime
        .block_on(Collector::start(collector_config))
        .context("starting the embedded collector")?;
    if let Some(http) = collector.addrs().http {
        let host = if http.ip().is_unspecified() {
            "localhost".to_string()
        } else {
            http.ip().to_string()
        };
        eprintln!(
            "fathom-agent: flame graphs, traces and metrics at http://{host}:{}/ (first profiles after {})",
            http.port(),
            humantime::format_duration(args.interval)
        );
    }
    let result = (|| {
        let stop = stop_on_signals()?;
        // The network signal first: tracing reads its connections.
        let mut network_session = if network {
            start_network(
                &args,
                Box::new(EmbeddedTraceSink(collector.ingest())),
                profiles || traces,
                &health,
            )?
        } else {
            None
        };
        let _traces = if traces {
            start_tracing(
                &args,
                Box::new(EmbeddedTraceSink(collector.ingest())),
                profiles || network,
                network_session.as_mut(),
                &health,
            )?
        } else {
            None
        };
        let others = _traces.is_some() || network_session.is_some();
        let _network = network_session;
        let session = if profiles {
            start_profiles(config, &args.sampling, others, &health)?
        } else {
            None
        };
        if let Some(mut session) = session {
            let mut sink = EmbeddedSink::new(collector.ingest());
            health.set(HealthState::Ready);
            session.run_daemon(args.interval, &mut sink, &stop)?;
        } else {
            health.set(HealthState::Ready);
            while !stop.wait(Duration::from_secs(1)) {}
        }
        health.set(HealthState::Stopping);
        // Tracing stops (last spans delivered, programs detached) before the
        // collector shuts down.
        anyhow::Ok(())
    })();
    if let Err(e) = &result {
        health.set(HealthState::Failed(format!("{e:#}")));
    }
    runtime.block_on(collector.shutdown(Duration::from_secs(10)));
    result
}
