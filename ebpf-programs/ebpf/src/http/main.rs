//! Fathom's zero-code HTTP tracing programs (the `fathom-http` object):
//! socket tracepoints (`sock`) or, on kernels without them, syscall
//! tracepoints (`capture`) that capture HTTP/1.x bytes of monitored
//! processes, and `sock_ops` + `sk_msg` that insert `traceparent` into
//! their outgoing requests (`inject`). The contract is documented in
//! `fathom_common::http`.
#![no_std]
#![no_main]

mod capture;
mod golang;
mod inject;
mod maps;
mod mem;
mod pair;
mod sock;

fathom_ebpf::object!();
