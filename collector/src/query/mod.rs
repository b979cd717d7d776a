//! Query APIs of existing backends over the embedded store, so that their
//! clients — Grafana's Pyroscope and Jaeger data sources, the Jaeger UI —
//! can use the collector alone: Pyroscope's querier (`pyroscope`, connect)
//! and Jaeger's HTTP query API (`jaeger`). Served on the HTTP port with the
//! UI, whose own JSON API lives under `/ui/api/`.
pub mod jaeger;
pub mod pyroscope;
