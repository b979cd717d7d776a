//! `fathom-agent`: the command line.
use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use fathom_agent::{
    config::{AgentFile, DaemonArgs, SamplingArgs},
    daemon, preflight,
    profiles::{
        capture::OffCpuMode,
        pprof::{self, CpuProfileMeta, ProfileKind},
        session::{self, ProfilesConfig, Session},
    },
    stop::Stop,
};

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
struct ProfileArgs {
    #[command(flatten)]
    sampling: SamplingArgs,
    /// How long to profile (e.g. `10s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Where to write the gzipped pprof profile.
    #[arg(long, short)]
    output: PathBuf,
    /// What to profile: `cpu` (sampled CPU time) or `off-cpu` (time threads
    /// spend off the CPU, intervals of at least `--off-cpu-threshold`).
    #[arg(long, value_enum, default_value = "cpu")]
    event: ProfileEvent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ProfileEvent {
    Cpu,
    OffCpu,
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
    let sampling = args
        .sampling
        .resolve(&AgentFile::default())
        .context("configuration")?;
    let mut config = ProfilesConfig::from(&sampling);
    let kind = match args.event {
        ProfileEvent::Cpu => ProfileKind::Cpu,
        ProfileEvent::OffCpu => {
            config.profiler.off_cpu = Some(
                sampling
                    .off_cpu
                    .or(args.sampling.off_cpu_threshold)
                    .unwrap_or(fathom_agent::config::DEFAULT_OFF_CPU_THRESHOLD),
            );
            ProfileKind::OffCpu
        }
    };
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
    let mut session = Session::start(&config)?;
    if let OffCpuMode::Degraded(reason) = session.off_cpu_mode()
        && kind == ProfileKind::OffCpu
    {
        bail!("off-CPU profiling is not available on this kernel: {reason}");
    }
    let started = SystemTime::now();
    tracing::info!(duration = %humantime::format_duration(args.duration), "profiling");
    let collected = session.collect(args.duration, &stop)?;
    let meta = CpuProfileMeta {
        frequency_hz: sampling.frequency_hz,
        start: started,
        duration: SystemTime::now()
            .duration_since(started)
            .unwrap_or_default(),
    };
    let profile = session.profile_of(&collected, meta, kind)?;
    let lost = session.loss_summary()?;
    tracing::info!(unwind = %session.unwind_stats().summary(10), "unwinding");
    drop(session); // detach before writing
    session::write_atomically(&args.output, &pprof::encode_gzip(&profile))?;
    tracing::info!(
        samples = collected.counted,
        recorded = collected.recorded,
        off_cpu_ns = collected.off_cpu_ns(),
        %lost,
        output = %args.output.display(),
        "profile written"
    );
    Ok(())
}

fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let config = args
        .resolve(|k| std::env::var(k).ok())
        .context("configuration")?;
    let stop = stop_on_signals()?;
    daemon::run(&config, &stop)?;
    Ok(())
}
