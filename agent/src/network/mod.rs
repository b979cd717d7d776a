//! The network signal: per-workload TCP handshake, RTT, retransmits, bytes
//! and DNS latency.
//!
//! Kernel side: [`capture`] loads the `fathom-net` TC and tracepoint
//! programs and reads their maps; [`session`] is the thread that turns what
//! they counted into OTLP metrics for an [`OtlpSink`](crate::sink::OtlpSink).
//!
//! Pure logic, no kernel I/O: the kernel's cumulative histograms and
//! counters (`fathom_common::net`) become OTLP metrics per local workload.
//!
//! - [`hist`]: the kernel's log-linear buckets as explicit OTLP bounds.
//! - [`sockets`]: `/proc` socket tables, local addresses and socket owners
//!   of every network namespace, to name both ends of a connection.
//! - [`metrics`]: series per (workload, metric, peer, port, direction),
//!   bounded, exported as OTLP.

pub mod attribute;
pub mod capture;
pub mod hist;
pub mod metrics;
pub mod session;
pub mod sockets;

pub use metrics::{NetMetrics, NetMetricsConfig, Series};
pub use sockets::Snapshot;

use std::time::Instant;

use crate::{
    config::SignalKind,
    health::SignalStatus,
    signal::{Delivery, Signal, StartContext, StartError},
    sink::EmbeddedOtlpSink,
};
use session::{NetConfig, NetSession};

/// The network signal.
pub struct NetworkSignal(NetSession);

impl Signal for NetworkSignal {
    fn start(ctx: &mut StartContext<'_>) -> Result<Self, StartError> {
        let Delivery::Collector(ingest) = &ctx.delivery else {
            return Err("network metrics need a collector, not a directory".into());
        };
        let mut config = NetConfig::default();
        config.capture.interfaces = ctx.config.network.interfaces.clone();
        let mut session = NetSession::start(config, Box::new(EmbeddedOtlpSink(ingest.clone())))?;
        if let Some(reader) = session.take_connections() {
            ctx.connections = Some(Box::new(reader));
        }
        Ok(Self(session))
    }

    fn kind(&self) -> SignalKind {
        SignalKind::Network
    }

    fn status(&self) -> SignalStatus {
        SignalStatus {
            signal: SignalKind::Network.name(),
            mode: "tc+tracepoints".into(),
            up: true,
            reason: None,
        }
    }

    fn stop(self: Box<Self>, deadline: Instant) -> bool {
        self.0.stop(deadline)
    }
}
