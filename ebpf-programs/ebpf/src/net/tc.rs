//! TC classifiers (ingress and egress): bytes and packets per flow, the
//! server side of TCP handshakes (SYN → the client's final ACK, as seen at
//! the hook: one full round trip) and DNS latency over UDP (query id out →
//! response in). They never change or drop a packet.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext,
};
use fathom_common::net::{
    AggKey, DnsKey, FAMILY_V4, FAMILY_V6, FlowKey, FlowStats, Handshake, NetCounter, direction,
    dns_header, metric,
};

use crate::{NET_DNS_PENDING, NET_FLOWS, NET_HANDSHAKES, NET_OWNERS, count, observe};

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

#[inline(always)]
fn handle(ctx: &TcContext) -> Option<()> {
    count(NetCounter::Packets);
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
    let sport = u16::from_be(ctx.load::<u16>(l4).ok()?);
    let dport = u16::from_be(ctx.load::<u16>(l4 + 2).ok()?);
    let flags = if l4_proto == IPPROTO_TCP {
        ctx.load::<u8>(l4 + 13).ok()?
    } else {
        0
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
    // SAFETY: a plain read of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let now = unsafe { bpf_ktime_get_ns() };
    // Which end is the client: an existing flow says, else the SYN flags,
    // else the sockets' owners, else the lower port is the server's.
    let (c2s, stats) = if let Some(s) = NET_FLOWS.get_ptr_mut(&fwd) {
        (true, s)
    } else if let Some(s) = NET_FLOWS.get_ptr_mut(&rev) {
        (false, s)
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
            let len = u64::from(ctx.len());
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
        tcp_handshake(key, stats, c2s, flags, now);
    } else if dport == DNS_PORT || sport == DNS_PORT {
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

/// The server side of a handshake, timed at the hook: SYN → the client's
/// first ACK after the SYN-ACK.
#[inline(always)]
fn tcp_handshake(key: &FlowKey, stats: *mut FlowStats, c2s: bool, flags: u8, now: u64) {
    let syn = flags & TCP_SYN != 0;
    let ack = flags & TCP_ACK != 0;
    if syn && !ack && c2s {
        let h = Handshake {
            syn_ns: now,
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
        observe(&agg, now.saturating_sub(h.syn_ns));
    }
}
