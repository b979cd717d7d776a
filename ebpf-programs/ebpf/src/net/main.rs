//! Fathom's network programs (the `fathom-net` object): TC classifiers
//! (ingress and egress of chosen interfaces) for bytes, packets, the
//! server side of TCP handshakes and DNS latency, and tracepoints for the
//! client side of handshakes, failed connects, smoothed RTT and
//! retransmits. Histograms and counters stay in maps; user space reads
//! them. The contract is `fathom_common::net`.
#![no_std]
#![no_main]
// BPF atomic adds (the BPF target has no `AtomicU64::fetch_add`).
#![feature(asm_experimental_arch)]

mod maps;
mod tc;
mod tp;

use fathom_common::net::{AggKey, NetCounter, bucket_index};
pub use maps::*;

/// Adds `n` to the u64 at `p` atomically (BPF `lock xadd`): programs on
/// several CPUs update one shared entry.
///
/// # Safety
/// `p` must point into a valid map value.
#[inline(always)]
pub unsafe fn atomic_add(p: *mut u64, n: u64) {
    // SAFETY: the caller's pointer; a single BPF atomic instruction.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) p, in(reg) n, options(nostack));
    }
}

/// Adds one to a counter.
#[inline(always)]
pub fn count(c: NetCounter) {
    if let Some(v) = NET_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: a valid per-CPU map value.
        unsafe { *v += 1 };
    }
}

/// Adds `ns` to the histogram of `key`, creating it when new.
#[inline(always)]
pub fn observe(key: &AggKey, ns: u64) {
    let mut h = NET_HISTS.get_ptr_mut(key);
    if h.is_none() {
        let Some(zero) = NET_ZERO.get_ptr(0) else {
            return;
        };
        // SAFETY: a map value, valid for the call; BPF_NOEXIST (another CPU
        // may have created it meanwhile, which is fine).
        if NET_HISTS.insert(key, unsafe { &*zero }, 1).is_err() {
            h = NET_HISTS.get_ptr_mut(key);
            if h.is_none() {
                count(NetCounter::AggFull);
                return;
            }
        } else {
            h = NET_HISTS.get_ptr_mut(key);
        }
    }
    let Some(h) = h else {
        return;
    };
    let i = bucket_index(ns);
    // SAFETY: a valid map value; atomic adds since programs on several CPUs
    // update one entry.
    unsafe {
        atomic_add(&raw mut (*h).count, 1);
        atomic_add(&raw mut (*h).sum_ns, ns);
        if i < (*h).buckets.len() {
            atomic_add(&raw mut (*h).buckets[i], 1);
        }
    }
}

/// Adds `n` to the counter of `key`.
#[inline(always)]
pub fn add(key: &AggKey, n: u64) {
    if let Some(v) = NET_COUNTS.get_ptr_mut(key) {
        // SAFETY: a valid map value.
        unsafe { atomic_add(v, n) };
        return;
    }
    if NET_COUNTS.insert(key, n, 1).is_err() {
        if let Some(v) = NET_COUNTS.get_ptr_mut(key) {
            // SAFETY: as above (created by another CPU meanwhile).
            unsafe { atomic_add(v, n) };
        } else {
            count(NetCounter::AggFull);
        }
    }
}

fathom_ebpf::object!();
