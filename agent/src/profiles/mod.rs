//! The profiling signal: CPU stacks sampled by perf-event eBPF programs
//! (`capture`), the daemon's per-window loop that drains, symbolizes and
//! builds one pprof per process (`session`), the pure logic it uses (`stacks`,
//! `pprof`, `process` for the objects mapped by each process, `unwind` for
//! the eBPF DWARF unwinder's tables), and delivery to the collector
//! (`export`).

pub mod capture;
pub mod export;
pub mod pprof;
pub mod process;
pub mod python;
pub mod session;
pub mod stacks;
pub mod unwind;

use std::{sync::mpsc, time::Instant};

use crate::{
    config::SignalKind,
    health::SignalStatus,
    signal::{Delivery, Signal, StartContext, StartError},
    stop::StoppableThread,
};
use capture::UnwindMode;
use session::{DirSink, ProfileSink, ProfilesConfig, Session};

/// The profiling signal: a thread that runs the [`Session`], delivering one
/// profile per process every interval.
pub struct ProfilesSignal {
    thread: StoppableThread,
    mode: UnwindMode,
}

impl Signal for ProfilesSignal {
    fn start(ctx: &mut StartContext<'_>) -> Result<Self, StartError> {
        let mut config = ProfilesConfig::from(&ctx.config.sampling);
        // Started after tracing: share its map of which thread serves which
        // span, so samples carry their span.
        config.profiler.serving = ctx.serving.take().map(std::sync::Arc::new);
        let interval = ctx.config.interval;
        let mut sink: Box<dyn ProfileSink + Send> = match &ctx.delivery {
            Delivery::Collector(ingest) => Box::new(export::EmbeddedSink::new(ingest.clone())),
            Delivery::Directory { dir, retention } => {
                tracing::info!(dir = %dir.display(), "writing per-process profiles");
                Box::new(DirSink::new(dir, *retention)?)
            }
        };
        let health = ctx.health.clone();
        // The session is built on its own thread (it stays there); the
        // thread says whether it started.
        let (started, result) = mpsc::sync_channel::<Result<UnwindMode, String>>(1);
        let thread = StoppableThread::spawn("fathom-profiles", "profiles", move |stop| {
            let mut session = match Session::start(&config) {
                Ok(session) => session,
                Err(e) => {
                    let _ = started.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = started.send(Ok(session.unwind_mode().clone()));
            if let Err(e) = session.run_daemon(interval, &mut *sink, &stop) {
                tracing::error!("profiling stopped: {e}");
                health.set_signal(crate::signal::off(
                    SignalKind::Profiles,
                    format!("stopped: {e}"),
                ));
            }
        })?;
        match result.recv() {
            Ok(Ok(mode)) => Ok(Self { thread, mode }),
            Ok(Err(e)) => {
                thread.join();
                Err(e.into())
            }
            Err(_) => {
                thread.join();
                Err("the profiling thread ended before it started".into())
            }
        }
    }

    fn kind(&self) -> SignalKind {
        SignalKind::Profiles
    }

    fn status(&self) -> SignalStatus {
        let reason = match &self.mode {
            UnwindMode::FramePointers { reason: Some(r) } => {
                Some(format!("user stacks by frame pointers only: {r}"))
            }
            _ => None,
        };
        SignalStatus {
            signal: SignalKind::Profiles.name(),
            mode: self.mode.name().into(),
            up: true,
            reason,
        }
    }

    fn stop(self: Box<Self>, deadline: Instant) -> bool {
        self.thread.stop(deadline)
    }
}
