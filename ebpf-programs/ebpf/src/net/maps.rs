//! The network object's maps. Sizes are defaults; the loader may change
//! them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use fathom_common::net::{
    AggKey, Connecting, DnsKey, FlowCache, FlowKey, FlowStats, Handshake, Hist, NetCounter, Owner,
};

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
/// Slots of `tcp_probe`'s sampling table (a power of two).
pub const RTT_SLOTS: u32 = 4096;
/// One all-zero histogram: the initial value of new `NET_HISTS` entries
/// (too large for the BPF stack).
#[map]
pub static NET_ZERO: Array<Hist> = Array::with_max_entries(1, 0);
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
