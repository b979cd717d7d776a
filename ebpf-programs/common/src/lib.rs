//! Types shared between Fathom's eBPF programs and user space.
//!
//! Every type here is `#[repr(C)]` and free of padding (checked at compile
//! time below), so the kernel and user space agree on its bytes. With the
//! `user` feature the types implement `aya::Pod`.
#![no_std]

pub mod http;
pub mod net;
pub mod profiler;
pub mod unwind;

/// Asserts at compile time that a type has exactly the size of its fields.
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}
pub(crate) use assert_size;

#[cfg(feature = "user")]
mod pod {
    use crate::{
        http::{
            ConnEvent, ConnInfo, ConnKey, DataEvent, Serving, SockAddr, SockOffsets, TraceContext,
        },
        net::{AggKey, Connecting, DnsKey, FlowCache, FlowKey, FlowStats, Handshake, Hist, Owner},
        profiler::{ProcessEvent, SampleKey, Stack, StackChunk, StackSlot},
        unwind::{UnwindMapping, UnwindProcess, UnwindRow},
    };
    // SAFETY: all are #[repr(C)], contain only integers and integer arrays,
    // and have no padding (see the size assertions next to each).
    unsafe impl aya::Pod for SampleKey {}
    unsafe impl aya::Pod for Stack {}
    unsafe impl aya::Pod for StackChunk {}
    unsafe impl aya::Pod for StackSlot {}
    unsafe impl aya::Pod for ProcessEvent {}
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UnwindMapping {}
    unsafe impl aya::Pod for UnwindProcess {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnInfo {}
    unsafe impl aya::Pod for TraceContext {}
    unsafe impl aya::Pod for Serving {}
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for DataEvent {}
    unsafe impl aya::Pod for SockOffsets {}
    unsafe impl aya::Pod for AggKey {}
    unsafe impl aya::Pod for Hist {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for FlowCache {}
    unsafe impl aya::Pod for Owner {}
    unsafe impl aya::Pod for Connecting {}
    unsafe impl aya::Pod for Handshake {}
    unsafe impl aya::Pod for DnsKey {}
}
