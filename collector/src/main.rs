//! `fathom-collector`: receives from agents and any OTLP/Pyroscope client,
//! exports to Pyroscope/OTLP/Prometheus or keeps and shows the data itself.
use std::{process::ExitCode, time::Duration};

use clap::Parser;
use fathom_collector::{Collector, CollectorArgs};

/// Fathom's collector. Every flag has a `FATHOM_*` environment variable; a
/// TOML file (`--config`) can hold all settings (see `docs/collector.md`).
#[derive(Parser, Debug)]
#[command(name = "fathom-collector", version)]
struct Cli {
    #[command(flatten)]
    collector: CollectorArgs,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "FATHOM_LOG", default_value = "info")]
    log: String,
    /// How long shutdown may take (flushing windows and exporters).
    #[arg(long, env = "FATHOM_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fathom_collector::init_logging(&cli.log);
    let config = match cli.collector.resolve(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fathom-collector: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fathom-collector")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fathom-collector: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let collector = match Collector::start(config).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fathom-collector: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("stopping");
        if collector.shutdown(cli.shutdown_timeout).await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
