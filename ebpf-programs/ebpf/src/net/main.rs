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

mod tc;
mod tp;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use fathom_common::net::{
    AggKey, Connecting, DnsKey, FlowCache, FlowKey, FlowStats, Handshake, Hist, NetCounter, Owner,
    bucket_index,
};

// Sizes are defaults; the loader may change them.
#[map]
pub static NET_HISTS: HashMap<AggKey, Hist> = HashMap::with_max_entries(2048, 0);
#[map]
pub static NET_COUNTS: HashMap<AggKey, u64> = HashMap::with_max_entries(2048, 0);
#[map]
pub static NET_FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(65536, 0);
#[map]
pub static NET_OWNERS: LruHashMap<FlowKey, Owner> = LruHashMap::with_max_entries(65536, 0);
#[map]
pub static NET_CONNECTING: LruHashMap<u64, Connecting> = LruHashMap::with_max_entries(16384, 0);
#[map]
pub static NET_HANDSHAKES: LruHashMap<FlowKey, Handshake> = LruHashMap::with_max_entries(16384, 0);
#[map]
pub static NET_DNS_PENDING: LruHashMap<DnsKey, u64> = LruHashMap::with_max_entries(16384, 0);
/// One all-zero histogram: the initial value of new `NET_HISTS` entries
/// (too large for the BPF stack).
#[map]
pub static NET_ZERO: Array<Hist> = Array::with_max_entries(1, 0);
/// Slots of `tcp_probe`'s sampling table (a power of two).
pub const RTT_SLOTS: u32 = 4096;
/// `tcp_probe`'s sampling table: (socket cookie, last sample ns)
/// per slot, indexed by the cookie's low bits.
#[map]
pub static NET_RTT_SLOTS: Array<[u64; 2]> = Array::with_max_entries(RTT_SLOTS, 0);
#[map]
pub static NET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NetCounter::COUNT, 0);
/// Per CPU: the flow the TC programs count without a `NET_FLOWS` lookup
/// (see `FlowCache`).
#[map]
pub static NET_FLOW_CACHE: PerCpuArray<FlowCache> = PerCpuArray::with_max_entries(1, 0);
/// The flow caches' generation: bumped by every SYN the TC programs see.
#[map]
pub static NET_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs with reachable panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
