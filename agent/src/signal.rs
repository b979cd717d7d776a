//! What the daemon runs: signals. Each starts with a [`StartContext`]
//! (the configuration, where its output goes, what other signals offer),
//! says how it runs ([`Signal::status`]) and stops by a deadline. The
//! daemon (`crate::daemon`) starts them in the configuration's order and
//! stops them in reverse, from one list.
use std::{path::PathBuf, time::Duration, time::Instant};

use fathom_collector::Ingest;

use crate::{
    config::{AgentConfig, SignalKind},
    connections::ConnectionLookup,
    health::{Health, SignalStatus},
};

/// Why a signal did not start, in one sentence.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Where a signal's output goes.
#[derive(Clone)]
pub enum Delivery {
    /// The collector in this process (stored, or exported).
    Collector(Ingest),
    /// Profiles as files in a directory, with retention.
    Directory { dir: PathBuf, retention: Duration },
}

/// What a signal starts with.
pub struct StartContext<'a> {
    pub config: &'a AgentConfig,
    pub delivery: Delivery,
    /// For a signal that finds it cannot go on after it started: it marks
    /// itself down here.
    pub health: Health,
    /// The network signal's per-connection state, once it started: the
    /// tracing signal takes it (client spans' connect times).
    pub connections: Option<Box<dyn ConnectionLookup>>,
    /// The tracing signal's map of which thread serves which span, once it
    /// started: the profiling signal shares it, so samples carry their span.
    pub serving: Option<std::os::fd::OwnedFd>,
}

/// A running signal.
pub trait Signal: Send {
    /// Loads and attaches its programs and starts its thread.
    fn start(ctx: &mut StartContext<'_>) -> Result<Self, StartError>
    where
        Self: Sized;

    fn kind(&self) -> SignalKind;

    /// How it runs (for `/healthz` and `fathom_agent_signal_up`).
    fn status(&self) -> SignalStatus;

    /// Delivers what it holds, detaches its programs and ends its thread;
    /// false when it did not finish by `deadline`.
    fn stop(self: Box<Self>, deadline: Instant) -> bool;
}

/// The status of a signal that did not start.
pub fn off(kind: SignalKind, reason: String) -> SignalStatus {
    SignalStatus {
        signal: kind.name(),
        mode: "off".into(),
        up: false,
        reason: Some(reason),
    }
}

/// The running signals, in start order.
#[derive(Default)]
pub struct Running(Vec<Box<dyn Signal>>);

impl Running {
    pub fn push(&mut self, signal: Box<dyn Signal>) {
        self.0.push(signal);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Stops them in reverse start order, all by one deadline; false when
    /// one did not finish in time.
    pub fn stop_all(mut self, deadline: Instant) -> bool {
        let mut all = true;
        while let Some(signal) = self.0.pop() {
            let kind = signal.kind();
            let stopped = signal.stop(deadline);
            tracing::debug!(signal = kind.name(), stopped, "signal stopped");
            all &= stopped;
        }
        all
    }
}
