//! What every eBPF object of Fathom shares. The programs live in the binary
//! targets (`profiler/`, `http/`, `net/`, each with its `main.rs`, `maps.rs`
//! and thin entry points), which only build for the BPF target; this
//! library also builds on the host, where it is empty of code: the agent's
//! build script depends on the crate so that cargo rebuilds the agent when
//! the programs change.
#![no_std]

/// The panic handler and license section every object needs, declared
/// once: `fathom_ebpf::object!();` in each object's `main.rs`.
#[macro_export]
macro_rules! object {
    () => {
        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            // Unreachable: the verifier rejects programs with reachable panics.
            loop {}
        }

        /// GPL-compatible: `bpf_get_stack`, `bpf_probe_read_user` and
        /// `bpf_probe_read_kernel` are GPL-only helpers.
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
