//! Network metrics, the user-space half: the kernel's cumulative
//! histograms and counters (`fathom_common::net`) become OTLP metrics per
//! local workload. Pure logic, no kernel I/O: the caller reads the maps
//! ([`crate::net_capture`]) and `/proc`.
//!
//! - [`hist`]: the kernel's log-linear buckets as explicit OTLP bounds.
//! - [`sockets`]: `/proc` socket tables, local addresses and socket owners
//!   of every network namespace, to name both ends of a connection.
//! - [`metrics`]: series per (workload, metric, peer, port, direction),
//!   bounded, exported as OTLP.

pub mod attribute;
pub mod hist;
pub mod metrics;
pub mod sockets;

pub use metrics::{NetMetrics, NetMetricsConfig, Series};
pub use sockets::Snapshot;
