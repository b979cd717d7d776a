//! Fathom's per-node agent: three signals from eBPF programs, delivered to
//! the collector that runs in the same process.
//!
//! - One folder per signal, each with its kernel side (`capture`), the
//!   thread that runs it (`session`), its pure logic, and its [`Signal`]
//!   implementation: [`profiles`] (CPU profiles), [`traces`] (HTTP spans,
//!   RED metrics, `traceparent` injection), [`network`] (TCP and DNS
//!   latency metrics). No signal imports another.
//! - Running them: [`config`] (the one typed configuration: flags, their
//!   environment variables, a TOML file), [`daemon`] (start in order, stop
//!   in reverse), [`signal`] (the trait and the running list), [`stop`].
//! - Shared: [`ebpf`] (every object and program loaded through one loader,
//!   with the verifier's figures and one error), [`sink`] and [`otlp`]
//!   (OTLP output, resources), [`connections`] (what tracing may read of
//!   the network signal), [`process_meta`] and [`procfs`] (what a process
//!   is), [`k8s`] (pod metadata), [`health`], [`check`] (what this kernel
//!   lets the agent do), [`preflight`], [`btf`].
//! - [`sys`] wraps the syscalls: the only module allowed `unsafe`.
//!
//! [`Signal`]: signal::Signal
#![deny(unsafe_code)]

pub mod btf;
pub mod check;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod ebpf;
pub mod health;
pub mod k8s;
pub mod network;
pub mod otlp;
pub mod preflight;
pub mod process_meta;
pub mod procfs;
pub mod profiles;
pub mod signal;
pub mod sink;
pub mod stop;
#[allow(unsafe_code)]
pub mod sys;
pub mod traces;
