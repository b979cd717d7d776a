//! Types shared between Fathom's eBPF programs and user space.
//!
//! Every type here is `#[repr(C)]` and free of padding (checked at compile
//! time below), so the kernel and user space agree on its bytes. With the
//! `user` feature the types implement `aya::Pod`.
#![no_std]

// Tests run on the host, with std.
#[cfg(test)]
extern crate std;

pub mod http;
pub mod net;
pub mod profiler;
pub mod python;
pub mod unwind;

/// Asserts at compile time that a type has exactly the size of its fields.
macro_rules! assert_size {
    ($t:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
    };
}
pub(crate) use assert_size;

/// Ring-buffer records and map values as typed values, in user space: the
/// one place that turns bytes into the `#[repr(C)]` types, checking the
/// length first.
#[cfg(feature = "user")]
pub mod record {
    use core::mem::size_of;

    /// A record of exactly `size_of::<T>()` bytes as a `T`; `None` for any
    /// other length.
    pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
        if bytes.len() != size_of::<T>() {
            return None;
        }
        // SAFETY: `Pod` types are valid for any bytes; the length was
        // checked, and the read is unaligned.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// A record of exactly `size_of::<T>()` bytes, borrowed in place (for
    /// large records); `None` for any other length or a misaligned start
    /// (ring-buffer records are 8-byte aligned).
    pub fn read_ref<T: aya::Pod>(bytes: &[u8]) -> Option<&T> {
        let ptr = bytes.as_ptr().cast::<T>();
        if bytes.len() != size_of::<T>() || !ptr.is_aligned() {
            return None;
        }
        // SAFETY: `Pod` types are valid for any bytes; the length and the
        // alignment were checked, and the borrow lives as long as `bytes`.
        Some(unsafe { &*ptr })
    }

    /// A record that may end early (a fixed part, then a variable-length
    /// tail the writer trims): the bytes present, zeroes after them. `None`
    /// when shorter than `min` or longer than `T`.
    pub fn read_prefix<T: aya::Pod>(bytes: &[u8], min: usize) -> Option<T> {
        if bytes.len() < min || bytes.len() > size_of::<T>() {
            return None;
        }
        // SAFETY: `Pod` types are valid for any bytes, zeroes included; at
        // most `size_of::<T>()` bytes are copied into the value.
        unsafe {
            let mut value: T = core::mem::zeroed();
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut value as *mut T).cast::<u8>(),
                bytes.len(),
            );
            Some(value)
        }
    }

    /// [`read_prefix`] into an existing value, without zeroing it first:
    /// the bytes past the record keep what they held (the caller reads only
    /// what the record's own lengths say is valid). `false` (and `out`
    /// untouched) when the length is out of range.
    pub fn read_prefix_into<T: aya::Pod>(bytes: &[u8], min: usize, out: &mut T) -> bool {
        if bytes.len() < min || bytes.len() > size_of::<T>() {
            return false;
        }
        // SAFETY: `Pod` types are valid for any bytes; at most
        // `size_of::<T>()` bytes are copied into the value.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (out as *mut T).cast::<u8>(),
                bytes.len(),
            );
        }
        true
    }

    /// The bytes of a value (for map keys built in user space and tests).
    pub fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
        // SAFETY: `Pod` types have no padding; the slice borrows `value`.
        unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
    }
}

#[cfg(feature = "user")]
mod pod {
    use crate::{
        http::{
            ConnEvent, ConnInfo, ConnKey, DataEvent, ProcessInfo, Serving, SockAddr, SockOffsets,
            SpanRecord, TraceContext,
        },
        net::{AggKey, Connecting, DnsKey, FlowCache, FlowKey, FlowStats, Handshake, Hist, Owner},
        profiler::{ProcessEvent, SampleKey, Stack, StackChunk, StackSlot},
        python::PyProcess,
        unwind::{UnwindMapping, UnwindProcess, UnwindRow},
    };
    // SAFETY: all are #[repr(C)], contain only integers and integer arrays,
    // and have no padding (see the size assertions next to each).
    unsafe impl aya::Pod for SampleKey {}
    unsafe impl aya::Pod for Stack {}
    unsafe impl aya::Pod for StackChunk {}
    unsafe impl aya::Pod for StackSlot {}
    unsafe impl aya::Pod for ProcessEvent {}
    unsafe impl aya::Pod for PyProcess {}
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
    unsafe impl aya::Pod for SpanRecord {}
    unsafe impl aya::Pod for ProcessInfo {}
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
