//! TC classifiers (ingress and egress): bytes and packets per flow, the
//! server side of TCP handshakes (SYN → the client's final ACK, as seen at
//! the hook: one full round trip) and DNS latency over UDP (query id out →
//! response in). They never change or drop a packet.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use fathom_common::net::{
    AggKey, DnsKey, FAMILY_V4, FAMILY_V6, FlowCache, FlowKey, FlowStats, Handshake, V4Words,
    direction, dns_header, metric,
};

use crate::{
    NET_DNS_PENDING, NET_FLOW_CACHE, NET_FLOWS, NET_GENERATION, NET_HANDSHAKES, NET_OWNERS, observe,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const DNS_PORT: u16 = 53;

#[classifier]
pub fn net_tc_ingress(ctx: TcContext) -> i32 {
    let _ = handle(&ctx);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn net_tc_egress(ctx: TcContext) -> i32 {
    let _ = handle(&ctx);
    TC_ACT_UNSPEC
}

/// What the programs read from a packet's headers.
struct Headers {
    family: u8,
    proto: u8,
    /// Offset of the L4 header.
    l4: usize,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    /// TCP flags (0 for UDP).
    flags: u8,
}

/// The start of the packet's linear data when it holds more than `n`
/// bytes. (One byte more than needed: LLVM may rewrite the bound as a
/// strict comparison, which the verifier counts one byte short.)
#[inline(always)]
fn linear(ctx: &TcContext, n: usize) -> Option<usize> {
    let start = ctx.data();
    if start + n + 1 > ctx.data_end() {
        return None;
    }
    Some(start)
}

/// Reads a `T` at a constant offset of checked linear data, with one load
/// instruction for a word (`read_unaligned` would be split into byte loads:
/// the BPF target has no unaligned loads in LLVM's model, while the JITs of
/// the architectures with efficient unaligned access, x86-64 and arm64,
/// where the verifier does not enforce alignment, do one load whatever the
/// address).
///
/// # Safety
/// `[base + off, base + off + size_of::<T>())` must lie within what
/// [`linear`] checked.
#[inline(always)]
unsafe fn at<T: Copy>(base: usize, off: usize) -> T {
    // SAFETY: the caller's bound; alignment as above.
    unsafe { core::ptr::read((base + off) as *const T) }
}

/// The common packets (IPv4 without options, IPv6 without extension
/// headers, TCP or UDP) read straight from the linear data, with constant
/// offsets the verifier can check; `None` sends the packet to [`slow`].
#[inline(always)]
fn fast(ctx: &TcContext) -> Option<Headers> {
    const V4_L4: usize = ETH_HLEN + 20;
    const V6_L4: usize = ETH_HLEN + 40;
    let b = linear(ctx, V4_L4 + 14)?;
    // SAFETY: within the checked bytes (as every read below).
    let proto = u16::from_be(unsafe { at::<u16>(b, 12) });
    let mut h = Headers {
        family: FAMILY_V4,
        proto: 0,
        l4: V4_L4,
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        flags: 0,
    };
    if proto == ETH_P_IP {
        // SAFETY: as above.
        unsafe {
            if at::<u8>(b, ETH_HLEN) != 0x45
                || u16::from_be(at::<u16>(b, ETH_HLEN + 6)) & 0x1fff != 0
            {
                return None;
            }
            h.proto = at::<u8>(b, ETH_HLEN + 9);
            h.src[..4].copy_from_slice(&at::<[u8; 4]>(b, ETH_HLEN + 12));
            h.dst[..4].copy_from_slice(&at::<[u8; 4]>(b, ETH_HLEN + 16));
            h.sport = u16::from_be(at::<u16>(b, V4_L4));
            h.dport = u16::from_be(at::<u16>(b, V4_L4 + 2));
            if h.proto == IPPROTO_TCP {
                h.flags = at::<u8>(b, V4_L4 + 13);
            }
        }
    } else if proto == ETH_P_IPV6 {
        let b = linear(ctx, V6_L4 + 14)?;
        h.family = FAMILY_V6;
        h.l4 = V6_L4;
        // SAFETY: as above, for the IPv6 bound.
        unsafe {
            h.proto = at::<u8>(b, ETH_HLEN + 6);
            h.src = at::<[u8; 16]>(b, ETH_HLEN + 8);
            h.dst = at::<[u8; 16]>(b, ETH_HLEN + 24);
            h.sport = u16::from_be(at::<u16>(b, V6_L4));
            h.dport = u16::from_be(at::<u16>(b, V6_L4 + 2));
            if h.proto == IPPROTO_TCP {
                h.flags = at::<u8>(b, V6_L4 + 13);
            }
        }
    } else {
        return None;
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return None;
    }
    Some(h)
}

/// Any other packet, through `bpf_skb_load_bytes`.
#[inline(always)]
fn slow(ctx: &TcContext) -> Option<Headers> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (family, l4_proto, l4) = if proto == ETH_P_IP {
        let ver_ihl = ctx.load::<u8>(ETH_HLEN).ok()?;
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
        if frag & 0x1fff != 0 {
            // A later fragment: no ports.
            return None;
        }
        let p = ctx.load::<u8>(ETH_HLEN + 9).ok()?;
        src[..4].copy_from_slice(&ctx.load::<[u8; 4]>(ETH_HLEN + 12).ok()?);
        dst[..4].copy_from_slice(&ctx.load::<[u8; 4]>(ETH_HLEN + 16).ok()?);
        (FAMILY_V4, p, ETH_HLEN + ((ver_ihl & 0x0f) as usize) * 4)
    } else if proto == ETH_P_IPV6 {
        let p = ctx.load::<u8>(ETH_HLEN + 6).ok()?;
        src = ctx.load::<[u8; 16]>(ETH_HLEN + 8).ok()?;
        dst = ctx.load::<[u8; 16]>(ETH_HLEN + 24).ok()?;
        (FAMILY_V6, p, ETH_HLEN + 40)
    } else {
        return None;
    };
    if l4_proto != IPPROTO_TCP && l4_proto != IPPROTO_UDP {
        return None;
    }
    Some(Headers {
        family,
        proto: l4_proto,
        l4,
        src,
        dst,
        sport: u16::from_be(ctx.load::<u16>(l4).ok()?),
        dport: u16::from_be(ctx.load::<u16>(l4 + 2).ok()?),
        flags: if l4_proto == IPPROTO_TCP {
            ctx.load::<u8>(l4 + 13).ok()?
        } else {
            0
        },
    })
}

/// A packet of this CPU's cached IPv4 flow (plain IPv4, TCP without SYN or
/// RST, or UDP), counted from the headers' raw words without building a
/// key. `false`: not such a packet, nothing counted.
#[inline(always)]
fn cached_v4(ctx: &TcContext, c: &mut FlowCache, ifindex: u32, generation: u64) -> bool {
    const L4: usize = ETH_HLEN + 20;
    if c.v4 == 0 || c.ifindex != ifindex || c.generation != generation {
        return false;
    }
    // Up to the TCP flags; shorter packets take the full path.
    let Some(b) = linear(ctx, L4 + 14) else {
        return false;
    };
    // SAFETY: within the checked bytes (as every read below).
    let (ethertype, ver_ihl, frag, proto, addrs, ports) = unsafe {
        (
            at::<u16>(b, 12),
            at::<u8>(b, ETH_HLEN),
            at::<u16>(b, ETH_HLEN + 6),
            at::<u8>(b, ETH_HLEN + 9),
            at::<u64>(b, ETH_HLEN + 12),
            at::<u32>(b, L4),
        )
    };
    if ethertype != ETH_P_IP.to_be()
        || ver_ihl != 0x45
        || u16::from_be(frag) & 0x1fff != 0
        || proto != c.key.protocol
    {
        return false;
    }
    // SAFETY: as above.
    if proto == IPPROTO_TCP && unsafe { at::<u8>(b, L4 + 13) } & (TCP_SYN | TCP_RST) != 0 {
        return false;
    }
    let len = u64::from(ctx.len());
    let w = &c.words;
    if addrs == w.c2s_addrs && ports == w.c2s_ports {
        c.c2s_bytes += len;
        c.c2s_packets += 1;
    } else if addrs == w.s2c_addrs && ports == w.s2c_ports {
        c.s2c_bytes += len;
        c.s2c_packets += 1;
    } else {
        return false;
    }
    true
}

#[inline(always)]
fn handle(ctx: &TcContext) -> Option<()> {
    let cache = NET_FLOW_CACHE.get_ptr_mut(0)?;
    // SAFETY: a plain read of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain read of a map value.
    let generation = unsafe { *NET_GENERATION.get_ptr(0)? };
    {
        // SAFETY: this CPU's cache; the programs on one CPU do not nest.
        let c = unsafe { &mut *cache };
        c.packets += 1;
        if cached_v4(ctx, c, ifindex, generation) {
            return Some(());
        }
    }
    let Headers {
        family,
        proto: l4_proto,
        l4,
        src,
        dst,
        sport,
        dport,
        flags,
    } = match fast(ctx) {
        Some(h) => h,
        None => slow(ctx)?,
    };
    let fwd = FlowKey {
        family,
        protocol: l4_proto,
        local_port: sport,
        remote_port: dport,
        _pad: 0,
        local: src,
        remote: dst,
    };
    let rev = FlowKey {
        family,
        protocol: l4_proto,
        local_port: dport,
        remote_port: sport,
        _pad: 0,
        local: dst,
        remote: src,
    };
    let len = u64::from(ctx.len());
    let dns = l4_proto != IPPROTO_TCP && (dport == DNS_PORT || sport == DNS_PORT);
    let special = dns || (l4_proto == IPPROTO_TCP && flags & (TCP_SYN | TCP_RST) != 0);
    if !special {
        // SAFETY: this CPU's cache; the programs on one CPU do not nest.
        let c = unsafe { &mut *cache };
        if c.valid != 0 && c.ifindex == ifindex && c.generation == generation {
            if same_flow(&c.key, &fwd) {
                c.c2s_bytes += len;
                c.c2s_packets += 1;
                return Some(());
            }
            if same_flow(&c.key, &rev) {
                c.s2c_bytes += len;
                c.s2c_packets += 1;
                return Some(());
            }
        }
    }
    // Which end is the client: an existing flow says, else the SYN flags,
    // else the sockets' owners, else the lower port is the server's. The
    // orientation with the higher port as the client is tried first: most
    // packets then find their flow with one lookup.
    let found = if sport >= dport {
        NET_FLOWS
            .get_ptr_mut(&fwd)
            .map(|s| (true, s))
            .or_else(|| NET_FLOWS.get_ptr_mut(&rev).map(|s| (false, s)))
    } else {
        NET_FLOWS
            .get_ptr_mut(&rev)
            .map(|s| (false, s))
            .or_else(|| NET_FLOWS.get_ptr_mut(&fwd).map(|s| (true, s)))
    };
    let (c2s, stats) = if let Some(found) = found {
        found
    } else {
        let c2s = if l4_proto == IPPROTO_TCP && flags & TCP_SYN != 0 {
            flags & TCP_ACK == 0
        } else if let Some(o) = unsafe { NET_OWNERS.get(&fwd) } {
            o.direction != direction::SERVER
        } else if let Some(o) = unsafe { NET_OWNERS.get(&rev) } {
            o.direction == direction::SERVER
        } else {
            sport > dport
        };
        let key = if c2s { &fwd } else { &rev };
        // SAFETY: copied out.
        let client_tgid = unsafe { NET_OWNERS.get(key) }
            .filter(|o| o.direction == direction::CLIENT)
            .map_or(0, |o| o.tgid);
        let s = FlowStats {
            ifindex,
            client_tgid,
            ..FlowStats::default()
        };
        let _ = NET_FLOWS.insert(key, &s, 1);
        (c2s, NET_FLOWS.get_ptr_mut(key)?)
    };
    let key = if c2s { &fwd } else { &rev };
    // SAFETY: a valid map value; atomic adds (several CPUs, one flow).
    unsafe {
        if (*stats).ifindex == ifindex {
            let (b, p) = if c2s {
                (&raw mut (*stats).c2s_bytes, &raw mut (*stats).c2s_packets)
            } else {
                (&raw mut (*stats).s2c_bytes, &raw mut (*stats).s2c_packets)
            };
            crate::atomic_add(b, len);
            crate::atomic_add(p, 1);
        }
    }
    if l4_proto == IPPROTO_TCP {
        tcp_handshake(key, stats, c2s, flags);
        if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
            // A new connection, maybe on a 4-tuple some CPU has cached.
            if let Some(g) = NET_GENERATION.get_ptr_mut(0) {
                // SAFETY: a valid map value.
                unsafe { crate::atomic_add(g, 1) };
            }
        }
    }
    // SAFETY: a valid map value.
    if !special && unsafe { (*stats).ifindex == ifindex && (*stats).handshake == 0 } {
        // SAFETY: this CPU's cache, as above.
        cache_flow(unsafe { &mut *cache }, key, ifindex, generation);
    }
    if dns {
        let now = now();
        let head = ctx.load::<[u8; 4]>(l4 + 8).ok()?;
        let (id, response, rcode) = dns_header(&head)?;
        if !response && dport == DNS_PORT {
            let q = DnsKey {
                family,
                _pad: 0,
                client_port: sport,
                id,
                server_port: dport,
                client: src,
                server: dst,
            };
            // The first hook that sees the query times it.
            let _ = NET_DNS_PENDING.insert(&q, &now, 1);
        } else if response && sport == DNS_PORT {
            let q = DnsKey {
                family,
                _pad: 0,
                client_port: dport,
                id,
                server_port: sport,
                client: dst,
                server: src,
            };
            // SAFETY: copied out.
            let start = unsafe { NET_DNS_PENDING.get(&q) }.copied()?;
            let _ = NET_DNS_PENDING.remove(&q);
            let agg = AggKey {
                tgid: 0,
                server_port: sport,
                metric: metric::DNS,
                direction: direction::CLIENT,
                family,
                rcode,
                _pad: [0; 6],
                local: dst,
                remote: src,
            };
            observe(&agg, now.saturating_sub(start));
        }
    }
    Some(())
}

/// Whether two flow keys are equal, word by word (a derived comparison may
/// call `bcmp`, which BPF does not have).
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let a = (a as *const FlowKey).cast::<u64>();
    let b = (b as *const FlowKey).cast::<u64>();
    let mut i = 0;
    while i < core::mem::size_of::<FlowKey>() / 8 {
        // SAFETY: i < 5 words of two 40-byte keys.
        if unsafe { core::ptr::read_unaligned(a.add(i)) != core::ptr::read_unaligned(b.add(i)) } {
            return false;
        }
        i += 1;
    }
    true
}

/// Makes `key` this CPU's cached flow unless another flow with counts is
/// cached there since this jiffy (interleaved flows would thrash it); the
/// counts of the flow it replaces are added to `NET_FLOWS`.
#[inline(always)]
fn cache_flow(c: &mut FlowCache, key: &FlowKey, ifindex: u32, generation: u64) {
    let pending = c.c2s_packets | c.s2c_packets;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    if c.valid != 0 && pending != 0 && now == c.since && c.generation == generation {
        return;
    }
    if c.valid != 0 && pending != 0 {
        if let Some(s) = NET_FLOWS.get_ptr_mut(&c.key) {
            // SAFETY: a valid map value; atomic adds (several CPUs, one flow).
            unsafe {
                crate::atomic_add(&raw mut (*s).c2s_bytes, c.c2s_bytes);
                crate::atomic_add(&raw mut (*s).c2s_packets, c.c2s_packets);
                crate::atomic_add(&raw mut (*s).s2c_bytes, c.s2c_bytes);
                crate::atomic_add(&raw mut (*s).s2c_packets, c.s2c_packets);
            }
        }
        c.flushes += 1;
    }
    c.key = *key;
    c.v4 = u8::from(key.family == FAMILY_V4);
    if c.v4 != 0 {
        c.words = V4Words::of(key);
    }
    c.ifindex = ifindex;
    c.valid = 1;
    c.generation = generation;
    c.since = now;
    c.c2s_bytes = 0;
    c.c2s_packets = 0;
    c.s2c_bytes = 0;
    c.s2c_packets = 0;
}

/// The server side of a handshake, timed at the hook: SYN → the client's
/// first ACK after the SYN-ACK.
#[inline(always)]
fn tcp_handshake(key: &FlowKey, stats: *mut FlowStats, c2s: bool, flags: u8) {
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    if syn && !ack && c2s {
        let h = Handshake {
            syn_ns: now(),
            synack: 0,
            _pad: 0,
        };
        let _ = NET_HANDSHAKES.insert(key, &h, 1);
        // SAFETY: a valid map value.
        unsafe { (*stats).handshake = 1 };
        return;
    }
    // SAFETY: a valid map value.
    if unsafe { (*stats).handshake } == 0 {
        return;
    }
    if syn && ack && !c2s {
        if let Some(h) = NET_HANDSHAKES.get_ptr_mut(key) {
            // SAFETY: a valid map value.
            unsafe { (*h).synack = 1 };
        }
        return;
    }
    if flags & TCP_RST != 0 {
        let _ = NET_HANDSHAKES.remove(key);
        // SAFETY: a valid map value.
        unsafe { (*stats).handshake = 0 };
        return;
    }
    if ack && !syn && c2s {
        // SAFETY: copied out.
        let Some(h) = (unsafe { NET_HANDSHAKES.get(key) }).copied() else {
            // SAFETY: a valid map value.
            unsafe { (*stats).handshake = 0 };
            return;
        };
        if h.synack == 0 {
            return;
        }
        let _ = NET_HANDSHAKES.remove(key);
        // SAFETY: a valid map value.
        unsafe { (*stats).handshake = 0 };
        let agg = AggKey {
            tgid: 0,
            server_port: key.remote_port,
            metric: metric::HANDSHAKE,
            direction: direction::SERVER,
            family: key.family,
            rcode: 0,
            _pad: [0; 6],
            local: key.remote,
            remote: key.local,
        };
        observe(&agg, now().saturating_sub(h.syn_ns));
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}
