//! Fathom's collector: receives profiles, spans and metrics from agents (and
//! from any OTLP or Pyroscope client), aggregates them, and delivers them to
//! Pyroscope, an OTLP endpoint (Jaeger) and Prometheus — or, with no backend
//! configured, keeps them in an embedded store and shows them in its own UI.
//!
//! Layout (after rotel): `receivers/` (OTLP gRPC + HTTP, Pyroscope push),
//! `pipeline` (bounded queues, fan-out), `aggregate` (profile windows, span
//! batches), `exporters/` (Pyroscope, OTLP, Prometheus), `store` + `ui` (the
//! embedded default) + `query/` (Pyroscope's and Jaeger's query APIs over
//! the store), `init` (start-up and ordered shutdown). Pure logic
//! (`pprof`, `model`, `aggregate`) has no I/O.

pub mod aggregate;
pub mod config;
pub mod exporters;
pub mod init;
pub mod metrics_history;
pub mod model;
pub mod pipeline;
pub mod pprof;
pub mod proto;
pub mod query;
pub mod receivers;
pub mod selector;
pub mod stats;
pub mod store;
pub mod ui;

pub use config::{CollectorArgs, CollectorConfig};
pub use init::{BoundAddrs, Collector, StartError, init_logging};
pub use pipeline::{EncodedSpans, Ingest, IngestError};
