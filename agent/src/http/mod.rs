//! Zero-code HTTP tracing, the user-space half: the kernel's connection and
//! data events (`fathom_common::http`) become spans and RED metrics, as
//! OTLP. Pure logic, no kernel I/O: the caller drains the ring buffer and
//! feeds [`HttpTracer`], then converts what it finished.
//!
//! - [`parse`]: incremental HTTP/1.x parsing of one direction of a
//!   connection from captured heads and tails.
//! - [`spans`]: [`HttpTracer`], requests matched to responses, ids.
//! - [`otlp`]: finished spans as an OTLP traces request.
//! - [`metrics`]: `http.{server,client}.request.duration` histograms.

pub mod metrics;
pub mod otlp;
pub mod parse;
pub mod spans;

pub use metrics::{HttpMetrics, MetricsConfig};
pub use otlp::{ResourceInfo, traces_request};
pub use spans::{HttpSpan, HttpTracer, Scheme, SpanKind, TcpSpan, TracerConfig, TracerStats};
