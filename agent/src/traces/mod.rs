//! The tracing signal: zero-code HTTP spans and RED metrics.
//!
//! Kernel side: [`capture`] loads the `fathom-http` programs and drains
//! their connection and data events (`fathom_common::http`); [`inject`]
//! attaches the sock_ops/sk_msg programs that insert `traceparent` into
//! outgoing requests; [`golang`] finds where the goroutine probes of Go
//! executables attach. [`session`] is the thread that feeds the events to the
//! pure logic below and hands spans and metrics to an
//! [`OtlpSink`](crate::sink::OtlpSink).
//!
//! Pure logic, no kernel I/O:
//! - [`parse`]: incremental HTTP/1.x parsing of one direction of a
//!   connection from captured heads and tails.
//! - [`spans`]: [`HttpTracer`], requests matched to responses, ids.
//! - [`otlp`]: finished spans as an OTLP traces request.
//! - [`metrics`]: `http.{server,client}.request.duration` histograms.

pub mod capture;
pub mod golang;
pub mod inject;
pub mod metrics;
pub mod otlp;
pub mod parse;
pub mod session;
pub mod spans;

pub use metrics::{HttpMetrics, MetricsConfig};
pub use otlp::SpanEncoder;
pub use spans::{HttpSpan, HttpTracer, Scheme, SpanKind, TcpSpan, TracerConfig, TracerStats};

use std::time::Instant;

use crate::{
    config::SignalKind,
    connections::{ConnectionLookup, NoConnections},
    health::SignalStatus,
    signal::{Delivery, Signal, StartContext, StartError},
    sink::EmbeddedOtlpSink,
};
use session::{TraceConfig, TraceSession};

/// The tracing signal.
pub struct TracesSignal(TraceSession);

impl Signal for TracesSignal {
    fn start(ctx: &mut StartContext<'_>) -> Result<Self, StartError> {
        let Delivery::Collector(ingest) = &ctx.delivery else {
            return Err("spans need a collector, not a directory".into());
        };
        let mut config = TraceConfig::default();
        config.capture.pids = ctx.config.sampling.pids.clone();
        config.capture.inject = ctx.config.traces.inject;
        config.capture.inject_keep_alive = ctx.config.traces.inject_keep_alive;
        config.capture.hooks = ctx.config.traces.hooks;
        config.capture.go = ctx.config.traces.go;
        config.capture.pair = ctx.config.traces.pair;
        config.sample_ratio = ctx.config.traces.sample_ratio;
        config.health = Some(ctx.health.clone());
        // Profiles start after traces and share the map of which thread
        // serves which span.
        config.link_profiles = ctx.config.signals.contains(&SignalKind::Profiles);
        // With the network signal, client spans carry their connect time.
        let connections: Box<dyn ConnectionLookup> = ctx
            .connections
            .take()
            .unwrap_or_else(|| Box::new(NoConnections));
        let mut session = TraceSession::start_with(
            config,
            Box::new(EmbeddedOtlpSink(ingest.clone())),
            connections,
        )?;
        ctx.serving = session.take_serving_map();
        Ok(Self(session))
    }

    fn kind(&self) -> SignalKind {
        SignalKind::Traces
    }

    fn status(&self) -> SignalStatus {
        let (mode, why) = self.0.mode();
        let reason = match (why, self.0.inject_scope()) {
            (Some(w), _) => Some(format!("no traceparent injection: {w}")),
            (None, Some((scope, Some(w)))) => Some(format!("traceparent in {scope} only: {w}")),
            _ => None,
        };
        SignalStatus {
            signal: SignalKind::Traces.name(),
            mode: mode.into(),
            up: true,
            reason,
        }
    }

    fn stop(self: Box<Self>, deadline: Instant) -> bool {
        self.0.stop(deadline)
    }
}
