//! Fathom's eBPF programs. Each program is a thin entry point calling a
//! `try_*` function; the logic lives in one module per capability.
#![no_std]
#![no_main]

mod profiler;
mod unwind;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs with reachable panics.
    loop {}
}

/// `bpf_get_stack` and `bpf_probe_read_user` are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
