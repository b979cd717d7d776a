//! Fathom's per-node agent: eBPF programs that sample CPU stacks, and the user
//! space that drains, symbolizes and writes them as pprof.
//!
//! Modules are flat, by concern: kernel I/O (`profiler`, `preflight`, `ebpf`,
//! `inject` for traceparent injection, `sys` — the only `unsafe`), process knowledge (`process`, `procfs`),
//! turning stacks into profiles (`stacks`, `pprof`), unwind tables for the
//! eBPF DWARF unwinder (`unwind`), HTTP spans and metrics from the kernel's
//! connection events (`http`, pure logic), pod metadata (`k8s`) and running
//! it all (`session`).

pub mod btf;
pub mod check;
pub mod ebpf;
pub mod export;
pub mod health;
pub mod http;
pub mod http_capture;
pub mod inject;
pub mod k8s;
pub mod net;
pub mod net_capture;
pub mod net_session;
pub mod pprof;
pub mod preflight;
pub mod process;
pub mod process_meta;
pub mod procfs;
pub mod profiler;
pub mod session;
pub mod stacks;
pub mod sys;
pub mod traces;
pub mod unwind;
pub mod unwind_stats;
pub mod unwinder;
