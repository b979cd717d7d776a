//! `fathom-agent`: the command line.
use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fathom_agent::{
    export::{EmbeddedSink, RemoteSink},
    net_session::{NetConfig, NetSession},
    pprof::{self, CpuProfileMeta},
    preflight,
    profiler::{ProfilerConfig, UnwindMapSizes},
    session::{self, DirSink, Session, Stop},
    traces::{EmbeddedTraceSink, TraceConfig, TraceSession},
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
    /// Send profiles to this collector (`http://collector:4040`) instead of
    /// running one in the agent.
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
    /// With --collector-url: profiles kept (bytes) while the collector is
    /// unreachable; beyond it the oldest are dropped and counted.
    #[arg(long, env = "FATHOM_BUFFER_BYTES", default_value_t = 64 << 20)]
    buffer_bytes: u64,
    /// Signals to collect: `profiles` (CPU profiles), `traces` (HTTP spans
    /// and RED metrics of every process, with `traceparent` propagation),
    /// `network` (TCP handshake, RTT, retransmits, bytes, DNS latency per
    /// workload, from TC hooks and tracepoints).
    /// Traces need the embedded collector, which exports them to any OTLP
    /// endpoint (`--otlp-endpoint`).
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
    /// Interfaces whose traffic the network signal measures: names or `*`
    /// patterns (e.g. `eth0,veth*,cali*`); empty: the default route's
    /// interface and every veth. New interfaces are picked up while running.
    #[arg(long, env = "FATHOM_NET_INTERFACES", value_delimiter = ',')]
    net_interfaces: Vec<String>,
    /// Embedded collector (used unless --output-dir or --collector-url is given).
    #[command(flatten, next_help_heading = "Embedded collector")]
    collector: CollectorArgs,
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
    let profiles = args.signals.iter().any(|s| s == "profiles");
    let traces = args.signals.iter().any(|s| s == "traces");
    let network = args.signals.iter().any(|s| s == "network");
    if !profiles && !traces && !network {
        bail!("--signals: nothing to collect");
    }
    if (args.output_dir.is_some() || args.collector_url.is_some()) && !profiles {
        bail!("--output-dir and --collector-url carry profiles only: add `profiles` to --signals");
    }
    if (args.output_dir.is_some() || args.collector_url.is_some()) && traces {
        tracing::warn!(
            "traces need the embedded collector: not tracing with --output-dir or --collector-url"
        );
    }
    if (args.output_dir.is_some() || args.collector_url.is_some()) && network {
        tracing::warn!(
            "network metrics need the embedded collector: not measured with --output-dir or --collector-url"
        );
    }
    if let Some(dir) = &args.output_dir {
        let mut sink = DirSink::new(dir, args.retention)?;
        let stop = stop_on_signals()?;
        let mut session = Session::start(config, &args.sampling.symbolizer())?;
        tracing::info!(dir = %dir.display(), interval = %humantime::format_duration(args.interval), "writing per-process profiles");
        session.run_daemon(args.interval, &mut sink, &stop)?;
        return Ok(());
    }
    if let Some(url) = &args.collector_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--collector-url {url:?} must start with http:// or https://");
        }
        let remote = fathom_collector::config::PyroscopeConfig {
            url: url.clone(),
            org_id: None,
            basic_auth: None,
            bearer_token: args.collector_token.clone(),
            timeout: Duration::from_secs(10),
            buffer_bytes: args.buffer_bytes,
        };
        let mut sink = RemoteSink::new(&remote, args.interval)?;
        let stop = stop_on_signals()?;
        let mut session = Session::start(config, &args.sampling.symbolizer())?;
        tracing::info!(%url, interval = %humantime::format_duration(args.interval), "sending profiles to the collector");
        session.run_daemon(args.interval, &mut sink, &stop)?;
        drop(session);
        drop(sink);
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
        let _traces = if traces {
            let mut trace_config = TraceConfig::default();
            trace_config.capture.pids = args.sampling.pids.clone();
            trace_config.capture.inject = args.trace_inject;
            Some(
                TraceSession::start(
                    trace_config,
                    Box::new(EmbeddedTraceSink(collector.ingest())),
                )
                .context("starting HTTP tracing")?,
            )
        } else {
            None
        };
        let _network = if network {
            let mut net_config = NetConfig::default();
            net_config.capture.interfaces = args.net_interfaces.clone();
            Some(
                NetSession::start(net_config, Box::new(EmbeddedTraceSink(collector.ingest())))
                    .context("starting network metrics")?,
            )
        } else {
            None
        };
        if profiles {
            let mut session = Session::start(config, &args.sampling.symbolizer())?;
            let mut sink = EmbeddedSink::new(collector.ingest());
            session.run_daemon(args.interval, &mut sink, &stop)?;
        } else {
            while !stop.wait(Duration::from_secs(1)) {}
        }
        // Tracing stops (last spans delivered, programs detached) before the
        // collector shuts down.
        anyhow::Ok(())
    })();
    runtime.block_on(collector.shutdown(Duration::from_secs(10)));
    result
}
