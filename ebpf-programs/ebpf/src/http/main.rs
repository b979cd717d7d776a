//! Fathom's zero-code HTTP tracing programs (the `fathom-http` object):
//! syscall tracepoints that capture HTTP/1.x bytes of monitored processes
//! (`capture`), and `sock_ops` + `sk_msg` that insert `traceparent` into
//! their outgoing requests (`inject`). The contract is documented in
//! `fathom_common::http`.
#![no_std]
#![no_main]

mod capture;
mod inject;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs with reachable panics.
    loop {}
}

/// `bpf_probe_read_user` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
