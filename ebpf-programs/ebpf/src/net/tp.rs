//! Tracepoints: the client side of handshakes and failed connects
//! (`sock:inet_sock_set_state`, which runs in the connecting task for
//! SYN_SENT), who owns each TCP connection, smoothed RTT (`tcp:tcp_probe`)
//! and retransmits (`tcp:tcp_retransmit_skb`).

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_probe_read_kernel,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use fathom_common::net::{
    AggKey, Connecting, FAMILY_V4, FAMILY_V6, FlowKey, NetCounter, Owner, direction, metric,
};

use crate::{NET_CONNECTING, NET_FLOWS, NET_OWNERS, NET_RTT_SLOTS, RTT_SLOTS, add, count, observe};

// Offsets the loader reads from the format files (defaults: Linux 6.18).
#[unsafe(no_mangle)]
static NET_RTT_SAMPLE_NS: u64 = 10_000_000;
#[unsafe(no_mangle)]
static NET_STATE_SKADDR: u32 = 8;
#[unsafe(no_mangle)]
static NET_STATE_OLDSTATE: u32 = 16;
#[unsafe(no_mangle)]
static NET_STATE_SPORT: u32 = 24;
#[unsafe(no_mangle)]
static NET_STATE_FAMILY: u32 = 28;
#[unsafe(no_mangle)]
static NET_STATE_SADDR: u32 = 32;
#[unsafe(no_mangle)]
static NET_STATE_SADDR_V6: u32 = 40;
#[unsafe(no_mangle)]
static NET_PROBE_SADDR: u32 = 8;
#[unsafe(no_mangle)]
static NET_PROBE_DADDR: u32 = 36;
#[unsafe(no_mangle)]
static NET_PROBE_SPORT: u32 = 64;
#[unsafe(no_mangle)]
static NET_PROBE_FAMILY: u32 = 68;
#[unsafe(no_mangle)]
static NET_PROBE_SRTT: u32 = 100;
#[unsafe(no_mangle)]
static NET_PROBE_COOKIE: u32 = 112;
// `struct sock` / `tcp_sock` offsets from BTF (defaults: this kernel);
// only `net_tcp_probe_btf` reads them.
#[unsafe(no_mangle)]
static NET_SK_FAMILY: u32 = 16;
#[unsafe(no_mangle)]
static NET_SK_RCV_SADDR: u32 = 4;
#[unsafe(no_mangle)]
static NET_SK_DADDR: u32 = 0;
#[unsafe(no_mangle)]
static NET_SK_NUM: u32 = 14;
#[unsafe(no_mangle)]
static NET_SK_DPORT: u32 = 12;
#[unsafe(no_mangle)]
static NET_SK_V6_RCV_SADDR: u32 = 72;
#[unsafe(no_mangle)]
static NET_SK_V6_DADDR: u32 = 56;
#[unsafe(no_mangle)]
static NET_SK_SRTT_US: u32 = 0;
#[unsafe(no_mangle)]
static NET_RETRANS_SPORT: u32 = 28;
#[unsafe(no_mangle)]
static NET_RETRANS_FAMILY: u32 = 32;
#[unsafe(no_mangle)]
static NET_RETRANS_SADDR: u32 = 34;
#[unsafe(no_mangle)]
static NET_RETRANS_SADDR_V6: u32 = 42;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

#[inline(always)]
fn global(v: &u32) -> usize {
    // SAFETY: a plain read of a loader-set global.
    unsafe { read_volatile(v) as usize }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// A v4-mapped IPv6 address becomes IPv4 (TC sees those connections as
/// IPv4 packets).
#[inline(always)]
fn normalize(family: &mut u8, addr: &mut [u8; 16]) {
    if *family == FAMILY_V6
        && addr[..10].iter().all(|b| *b == 0)
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        *family = FAMILY_V4;
        let v4 = [addr[12], addr[13], addr[14], addr[15]];
        *addr = [0; 16];
        addr[..4].copy_from_slice(&v4);
    }
}

/// The family of an IPv6 address pair: IPv4 when the local address is
/// IPv4-mapped (both addresses are then rewritten as IPv4).
#[inline(always)]
fn normalize_pair(local: &mut [u8; 16], remote: &mut [u8; 16]) -> u8 {
    let (mut family, mut other) = (FAMILY_V6, FAMILY_V6);
    normalize(&mut family, local);
    normalize(&mut other, remote);
    family
}

/// (family, local, remote) from a record with `saddr[4] daddr[4]` at `v4`
/// and `saddr_v6[16] daddr_v6[16]` at `v6`.
#[inline(always)]
fn addrs(
    ctx: &TracePointContext,
    af: u16,
    v4: usize,
    v6: usize,
) -> Option<(u8, [u8; 16], [u8; 16])> {
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    let family;
    if af == AF_INET {
        family = FAMILY_V4;
        // SAFETY: offsets from the format file.
        let s = unsafe { ctx.read_at::<[u8; 4]>(v4) }.ok()?;
        // SAFETY: as above.
        let d = unsafe { ctx.read_at::<[u8; 4]>(v4 + 4) }.ok()?;
        local[..4].copy_from_slice(&s);
        remote[..4].copy_from_slice(&d);
    } else if af == AF_INET6 {
        // SAFETY: as above.
        local = unsafe { ctx.read_at::<[u8; 16]>(v6) }.ok()?;
        // SAFETY: as above.
        remote = unsafe { ctx.read_at::<[u8; 16]>(v6 + 16) }.ok()?;
        family = normalize_pair(&mut local, &mut remote);
    } else {
        return None;
    }
    Some((family, local, remote))
}

#[tracepoint]
pub fn net_sock_state(ctx: TracePointContext) -> u32 {
    let _ = sock_state(&ctx);
    0
}

#[inline(always)]
fn sock_state(ctx: &TracePointContext) -> Option<()> {
    let port_off = global(&NET_STATE_SPORT);
    let family_off = global(&NET_STATE_FAMILY);
    // SAFETY: offsets from the format file (`protocol` follows `family`).
    let protocol = unsafe { ctx.read_at::<u16>(family_off + 2) }.ok()?;
    if protocol != IPPROTO_TCP {
        return None;
    }
    let old_off = global(&NET_STATE_OLDSTATE);
    // SAFETY: as above (`newstate` follows `oldstate`).
    let old = unsafe { ctx.read_at::<i32>(old_off) }.ok()?;
    // SAFETY: as above.
    let new = unsafe { ctx.read_at::<i32>(old_off + 4) }.ok()?;
    // SAFETY: as above.
    let skaddr = unsafe { ctx.read_at::<u64>(global(&NET_STATE_SKADDR)) }.ok()?;
    if new == TCP_SYN_SENT {
        // The connecting task: its process owns the socket.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let c = Connecting {
            start_ns: now(),
            tgid,
            _pad: 0,
        };
        let _ = NET_CONNECTING.insert(&skaddr, &c, 0);
        return Some(());
    }
    // SAFETY: as above.
    let sport = unsafe { ctx.read_at::<u16>(port_off) }.ok()?;
    // SAFETY: as above.
    let dport = unsafe { ctx.read_at::<u16>(port_off + 2) }.ok()?;
    // SAFETY: as above.
    let af = unsafe { ctx.read_at::<u16>(family_off) }.ok()?;
    let (family, local, remote) = addrs(
        ctx,
        af,
        global(&NET_STATE_SADDR),
        global(&NET_STATE_SADDR_V6),
    )?;
    let flow = FlowKey {
        family,
        protocol: IPPROTO_TCP as u8,
        local_port: sport,
        remote_port: dport,
        _pad: 0,
        local,
        remote,
    };
    if old == TCP_SYN_SENT {
        // SAFETY: copied out.
        let connecting = unsafe { NET_CONNECTING.get(&skaddr) }.copied();
        let _ = NET_CONNECTING.remove(&skaddr);
        let c = connecting?;
        let mut key = AggKey {
            tgid: c.tgid,
            server_port: dport,
            metric: metric::HANDSHAKE,
            direction: direction::CLIENT,
            family,
            rcode: 0,
            _pad: [0; 6],
            local,
            remote,
        };
        if new == TCP_ESTABLISHED {
            let took = now().saturating_sub(c.start_ns);
            observe(&key, took);
            let owner = Owner {
                tgid: c.tgid,
                direction: direction::CLIENT,
                connect_ns: took,
                ..Owner::default()
            };
            let _ = NET_OWNERS.insert(&flow, &owner, 0);
            // The flow TC saw start (keyed client → server, as here) now
            // has its client process.
            if let Some(f) = NET_FLOWS.get_ptr_mut(&flow) {
                // SAFETY: a valid map value.
                unsafe { (*f).client_tgid = c.tgid };
            }
        } else if new == TCP_CLOSE {
            key.metric = metric::CONNECT_FAILURES;
            add(&key, 1);
        }
        return Some(());
    }
    if new == TCP_SYN_RECV {
        let owner = Owner {
            direction: direction::SERVER,
            ..Owner::default()
        };
        let _ = NET_OWNERS.insert(&flow, &owner, 0);
    } else if new == TCP_CLOSE {
        let _ = NET_OWNERS.remove(&flow);
    }
    Some(())
}

/// The owner of a connection; one made up (direction unknown) for a
/// connection that predates the programs.
#[inline(always)]
fn owner(flow: &FlowKey) -> Option<*mut Owner> {
    if let Some(o) = NET_OWNERS.get_ptr_mut(flow) {
        return Some(o);
    }
    count(NetCounter::NoOwner);
    let o = Owner::default();
    let _ = NET_OWNERS.insert(flow, &o, 1);
    NET_OWNERS.get_ptr_mut(flow)
}

#[inline(always)]
fn agg(flow: &FlowKey, o: &Owner, metric: u8) -> AggKey {
    let server_port = match o.direction {
        direction::CLIENT => flow.remote_port,
        direction::SERVER => flow.local_port,
        _ => {
            if flow.local_port < flow.remote_port {
                flow.local_port
            } else {
                flow.remote_port
            }
        }
    };
    AggKey {
        tgid: o.tgid,
        server_port,
        metric,
        direction: o.direction,
        family: flow.family,
        rcode: 0,
        _pad: [0; 6],
        local: flow.local,
        remote: flow.remote,
    }
}

/// `tcp_probe` fires on every incoming segment of every connection: the
/// common case must be cheap. A direct-mapped table of (socket, last sample
/// time) decides first, with no hashing of the 4-tuple; only a
/// connection's first segment after the sampling period goes on to find
/// its owner and record the smoothed RTT. Two connections sharing a slot
/// are each sampled more often, never less. `true`: sample now.
#[inline(always)]
fn rtt_due(socket: u64, t: u64) -> bool {
    // SAFETY: a plain read of a loader-set global.
    let every = unsafe { read_volatile(&NET_RTT_SAMPLE_NS) };
    let index = ((socket ^ (socket >> 12) ^ (socket >> 24)) as u32) & (RTT_SLOTS - 1);
    let Some(slot) = NET_RTT_SLOTS.get_ptr_mut(index) else {
        return false;
    };
    // SAFETY: a valid map value; racing CPUs at worst both sample.
    unsafe {
        if (*slot)[0] == socket && t.saturating_sub((*slot)[1]) < every {
            return false;
        }
        (*slot)[0] = socket;
        (*slot)[1] = t;
    }
    true
}

/// Records one smoothed-RTT sample of the connection `flow`.
#[inline(always)]
fn record_rtt(flow: &FlowKey, srtt_us: u32, t: u64) -> Option<()> {
    if srtt_us == 0 {
        return Some(());
    }
    let o = owner(flow)?;
    // SAFETY: a valid map value, copied after the update.
    let o = unsafe {
        (*o).srtt_us = srtt_us;
        (*o).last_rtt_ns = t;
        *o
    };
    observe(&agg(flow, &o, metric::RTT), u64::from(srtt_us) * 1000);
    Some(())
}

/// `tcp_probe` as a BTF tracepoint: the kernel passes the socket itself,
/// without building the classic tracepoint's record for every segment; the
/// connection is read from the socket at offsets the loader took from the
/// kernel's BTF. The loader runs this or [`net_tcp_probe`], never both.
#[btf_tracepoint(function = "tcp_probe")]
pub fn net_tcp_probe_btf(ctx: BtfTracePointContext) -> u32 {
    let _ = tcp_probe_btf(&ctx);
    0
}

#[inline(always)]
fn kernel<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn tcp_probe_btf(ctx: &BtfTracePointContext) -> Option<()> {
    // The socket's address as a plain number (read from the context, not
    // loaded as the verifier's trusted pointer, on which it forbids the
    // arithmetic below): every read through it is a checked probe read.
    let sk: u64 = kernel(ctx.as_ptr() as u64)?;
    let t = now();
    if sk == 0 || !rtt_due(sk, t) {
        return Some(());
    }
    let af: u16 = kernel(sk + global(&NET_SK_FAMILY) as u64)?;
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    let family;
    if af == AF_INET {
        family = FAMILY_V4;
        local[..4].copy_from_slice(&kernel::<[u8; 4]>(sk + global(&NET_SK_RCV_SADDR) as u64)?);
        remote[..4].copy_from_slice(&kernel::<[u8; 4]>(sk + global(&NET_SK_DADDR) as u64)?);
    } else if af == AF_INET6 {
        local = kernel(sk + global(&NET_SK_V6_RCV_SADDR) as u64)?;
        remote = kernel(sk + global(&NET_SK_V6_DADDR) as u64)?;
        family = normalize_pair(&mut local, &mut remote);
    } else {
        return None;
    }
    let flow = FlowKey {
        family,
        protocol: IPPROTO_TCP as u8,
        local_port: kernel(sk + global(&NET_SK_NUM) as u64)?,
        remote_port: u16::from_be(kernel(sk + global(&NET_SK_DPORT) as u64)?),
        _pad: 0,
        local,
        remote,
    };
    // The kernel keeps srtt << 3.
    let srtt: u32 = kernel(sk + global(&NET_SK_SRTT_US) as u64)?;
    record_rtt(&flow, srtt >> 3, t)
}

#[tracepoint]
pub fn net_tcp_probe(ctx: TracePointContext) -> u32 {
    let _ = tcp_probe(&ctx);
    0
}

/// `tcp_probe` as a classic tracepoint (kernels without BTF offsets).
#[inline(always)]
fn tcp_probe(ctx: &TracePointContext) -> Option<()> {
    // SAFETY: offsets from the format file.
    let cookie = unsafe { ctx.read_at::<u64>(global(&NET_PROBE_COOKIE)) }.ok()?;
    let t = now();
    if !rtt_due(cookie, t) {
        return Some(());
    }
    let port_off = global(&NET_PROBE_SPORT);
    // SAFETY: offsets from the format file.
    let af = unsafe { ctx.read_at::<u16>(global(&NET_PROBE_FAMILY)) }.ok()?;
    let (s, d) = (global(&NET_PROBE_SADDR), global(&NET_PROBE_DADDR));
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    let family;
    if af == AF_INET {
        family = FAMILY_V4;
        // SAFETY: sockaddr_in: the address at +4.
        local[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(s + 4) }.ok()?);
        // SAFETY: as above.
        remote[..4].copy_from_slice(&unsafe { ctx.read_at::<[u8; 4]>(d + 4) }.ok()?);
    } else if af == AF_INET6 {
        // SAFETY: sockaddr_in6: the address at +8.
        local = unsafe { ctx.read_at::<[u8; 16]>(s + 8) }.ok()?;
        // SAFETY: as above.
        remote = unsafe { ctx.read_at::<[u8; 16]>(d + 8) }.ok()?;
        family = normalize_pair(&mut local, &mut remote);
    } else {
        return None;
    }
    let flow = FlowKey {
        family,
        protocol: IPPROTO_TCP as u8,
        // SAFETY: as above.
        local_port: unsafe { ctx.read_at::<u16>(port_off) }.ok()?,
        // SAFETY: as above.
        remote_port: unsafe { ctx.read_at::<u16>(port_off + 2) }.ok()?,
        _pad: 0,
        local,
        remote,
    };
    // SAFETY: offsets from the format file.
    let srtt_us = unsafe { ctx.read_at::<u32>(global(&NET_PROBE_SRTT)) }.ok()?;
    record_rtt(&flow, srtt_us, t)
}

#[tracepoint]
pub fn net_retransmit(ctx: TracePointContext) -> u32 {
    let _ = retransmit(&ctx);
    0
}

#[inline(always)]
fn retransmit(ctx: &TracePointContext) -> Option<()> {
    let port_off = global(&NET_RETRANS_SPORT);
    // SAFETY: offsets from the format file.
    let af = unsafe { ctx.read_at::<u16>(global(&NET_RETRANS_FAMILY)) }.ok()?;
    let (family, local, remote) = addrs(
        ctx,
        af,
        global(&NET_RETRANS_SADDR),
        global(&NET_RETRANS_SADDR_V6),
    )?;
    let flow = FlowKey {
        family,
        protocol: IPPROTO_TCP as u8,
        // SAFETY: as above.
        local_port: unsafe { ctx.read_at::<u16>(port_off) }.ok()?,
        // SAFETY: as above.
        remote_port: unsafe { ctx.read_at::<u16>(port_off + 2) }.ok()?,
        _pad: 0,
        local,
        remote,
    };
    let o = owner(&flow)?;
    // SAFETY: a valid map value, copied after the count.
    let o = unsafe {
        (*o).retransmits = (*o).retransmits.wrapping_add(1);
        *o
    };
    add(&agg(&flow, &o, metric::RETRANSMITS), 1);
    Some(())
}
