//! The contract of the network programs (`fathom-net` object): TC
//! classifiers on chosen interfaces plus the tracepoints
//! `sock:inet_sock_set_state`, `tcp:tcp_probe` and `tcp:tcp_retransmit_skb`.
//!
//! Nothing is sent per packet: the kernel keeps cumulative histograms and
//! counters per [`AggKey`] (a local process or endpoint, a remote address, a
//! server port, a direction) and byte/packet counters per flow
//! ([`FlowKey`]); user space reads the maps, attributes keys to workloads
//! and exports the sums (see `agent/src/net`).

use crate::assert_size;

/// Map names.
pub mod names {
    pub const HISTS: &str = "NET_HISTS";
    pub const COUNTS: &str = "NET_COUNTS";
    pub const FLOWS: &str = "NET_FLOWS";
    pub const OWNERS: &str = "NET_OWNERS";
    pub const CONNECTING: &str = "NET_CONNECTING";
    pub const HANDSHAKES: &str = "NET_HANDSHAKES";
    pub const DNS_PENDING: &str = "NET_DNS_PENDING";
    pub const ZERO: &str = "NET_ZERO";
    pub const COUNTERS: &str = "NET_COUNTERS";
    pub const FLOW_CACHE: &str = "NET_FLOW_CACHE";
}

/// Globals the loader sets before loading.
pub mod globals {
    /// Minimum time between two RTT samples of one connection (ns).
    pub const RTT_SAMPLE_NS: &str = "NET_RTT_SAMPLE_NS";
    /// Offsets in the `tcp_probe` record (from its format file).
    pub const PROBE_SADDR: &str = "NET_PROBE_SADDR";
    pub const PROBE_DADDR: &str = "NET_PROBE_DADDR";
    pub const PROBE_SPORT: &str = "NET_PROBE_SPORT";
    pub const PROBE_FAMILY: &str = "NET_PROBE_FAMILY";
    pub const PROBE_SRTT: &str = "NET_PROBE_SRTT";
    pub const PROBE_COOKIE: &str = "NET_PROBE_COOKIE";
    /// `struct sock` / `tcp_sock` member offsets (from the `struct sock`
    /// pointer, read from the kernel's BTF) for `tcp_probe` as a BTF
    /// tracepoint (`net_tcp_probe_btf`), which skips the classic
    /// tracepoint's record building on every incoming segment.
    pub const SK_FAMILY: &str = "NET_SK_FAMILY";
    pub const SK_RCV_SADDR: &str = "NET_SK_RCV_SADDR";
    pub const SK_DADDR: &str = "NET_SK_DADDR";
    pub const SK_NUM: &str = "NET_SK_NUM";
    pub const SK_DPORT: &str = "NET_SK_DPORT";
    pub const SK_V6_RCV_SADDR: &str = "NET_SK_V6_RCV_SADDR";
    pub const SK_V6_DADDR: &str = "NET_SK_V6_DADDR";
    pub const SK_SRTT_US: &str = "NET_SK_SRTT_US";
    /// Offsets in the `inet_sock_set_state` record.
    pub const STATE_SKADDR: &str = "NET_STATE_SKADDR";
    pub const STATE_OLDSTATE: &str = "NET_STATE_OLDSTATE";
    pub const STATE_SPORT: &str = "NET_STATE_SPORT";
    pub const STATE_FAMILY: &str = "NET_STATE_FAMILY";
    pub const STATE_SADDR: &str = "NET_STATE_SADDR";
    pub const STATE_SADDR_V6: &str = "NET_STATE_SADDR_V6";
    /// Offsets in the `tcp_retransmit_skb` record.
    pub const RETRANS_SPORT: &str = "NET_RETRANS_SPORT";
    pub const RETRANS_FAMILY: &str = "NET_RETRANS_FAMILY";
    pub const RETRANS_SADDR: &str = "NET_RETRANS_SADDR";
    pub const RETRANS_SADDR_V6: &str = "NET_RETRANS_SADDR_V6";
}

/// [`AggKey::metric`].
pub mod metric {
    /// Histogram: SYN → ESTABLISHED (client, tracepoint) or SYN → the
    /// handshake's final ACK as seen at TC (server).
    pub const HANDSHAKE: u8 = 1;
    /// Histogram: smoothed RTT (`tcp_probe`), sampled per connection.
    pub const RTT: u8 = 2;
    /// Histogram: DNS query → response, seen at TC.
    pub const DNS: u8 = 3;
    /// Counter: retransmitted segments.
    pub const RETRANSMITS: u8 = 4;
    /// Counter: connects that went SYN_SENT → CLOSE.
    pub const CONNECT_FAILURES: u8 = 5;
}

/// [`AggKey::direction`], [`Owner::direction`].
pub mod direction {
    /// Not known to the kernel: user space decides (a local listener on
    /// the local port makes it `SERVER`).
    pub const UNKNOWN: u8 = 0;
    /// The local end initiated the connection.
    pub const CLIENT: u8 = 1;
    pub const SERVER: u8 = 2;
}

/// Kernel counters (indexes into `NET_COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetCounter {
    /// A new aggregation key found `NET_HISTS`/`NET_COUNTS` full.
    AggFull = 0,
    /// An RTT sample or retransmit of a socket with no known owner.
    NoOwner = 1,
}

impl NetCounter {
    pub const COUNT: u32 = 2;
}

/// Address families in keys (not the kernel's `AF_*`).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// What one histogram or counter is kept for. Addresses are 16 bytes: an
/// IPv4 address in the first four (network order), the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    /// The local process when the kernel knew it (connects), else 0.
    pub tgid: u32,
    /// The listening side's port.
    pub server_port: u16,
    /// A [`metric`].
    pub metric: u8,
    /// A [`direction`].
    pub direction: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// DNS response code (DNS only).
    pub rcode: u8,
    pub _pad: [u8; 6],
    pub local: [u8; 16],
    pub remote: [u8; 16],
}
assert_size!(AggKey, 48);

/// Log-linear histogram buckets: below 2^[`HIST_MIN_SHIFT`] ns, then
/// [`HIST_SUB`] equal buckets per power of two up to 2^[`HIST_MAX_SHIFT`] ns,
/// then one overflow bucket. Widths are 6.25–12.5% of the value.
pub const HIST_MIN_SHIFT: u32 = 14;
pub const HIST_MAX_SHIFT: u32 = 35;
pub const HIST_SUB_BITS: u32 = 3;
pub const HIST_SUB: u32 = 1 << HIST_SUB_BITS;
pub const HIST_BUCKETS: usize = 2 + ((HIST_MAX_SHIFT - HIST_MIN_SHIFT) * HIST_SUB) as usize;

/// The bucket of a value in nanoseconds (shared by the kernel and user
/// space, so both agree).
#[inline(always)]
pub fn bucket_index(ns: u64) -> usize {
    if ns < (1u64 << HIST_MIN_SHIFT) {
        return 0;
    }
    if ns >= (1u64 << HIST_MAX_SHIFT) {
        return HIST_BUCKETS - 1;
    }
    // Highest set bit, by halving (no loops for the verifier).
    let mut e = 0u32;
    let mut v = ns;
    if v >= 1 << 32 {
        v >>= 32;
        e += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        e += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        e += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        e += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        e += 2;
    }
    if v >= 1 << 1 {
        e += 1;
    }
    let sub = ((ns >> (e - HIST_SUB_BITS)) & (HIST_SUB as u64 - 1)) as u32;
    (1 + (e - HIST_MIN_SHIFT) * HIST_SUB + sub) as usize
}

/// A cumulative histogram of durations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hist {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}
assert_size!(Hist, 16 + 8 * HIST_BUCKETS);

impl Default for Hist {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

/// A connection as one end sees it (`OWNERS`, `HANDSHAKES`), or a flow
/// oriented client → server (`FLOWS`): `local`/`local_port` is then the
/// client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub family: u8,
    /// IP protocol (6 TCP, 17 UDP).
    pub protocol: u8,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local: [u8; 16],
    pub remote: [u8; 16],
}
assert_size!(FlowKey, 40);

/// Who owns a local TCP socket and what the kernel knows of the
/// connection (`OWNERS`, keyed by the socket's own view): what an HTTP span
/// of the connection can carry (`NetCapture::connection`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// The process that connected (clients), else 0.
    pub tgid: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    /// When the last RTT sample was recorded.
    pub last_rtt_ns: u64,
    /// The latest smoothed RTT (`tcp_probe`), microseconds.
    pub srtt_us: u32,
    /// Retransmitted segments so far.
    pub retransmits: u32,
    /// The connect's SYN → ESTABLISHED time (clients), nanoseconds.
    pub connect_ns: u64,
}
assert_size!(Owner, 32);

/// A connect in progress (`CONNECTING`, keyed by the socket's address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connecting {
    pub start_ns: u64,
    pub tgid: u32,
    pub _pad: u32,
}
assert_size!(Connecting, 16);

/// A handshake seen at TC (`HANDSHAKES`, keyed client → server).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    pub syn_ns: u64,
    /// Non-zero once the SYN-ACK passed.
    pub synack: u32,
    pub _pad: u32,
}
assert_size!(Handshake, 16);

/// Bytes and packets of one flow (`FLOWS`, keyed client → server), counted
/// at the first interface that saw the flow only (a packet crossing two
/// hooked interfaces is counted once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub ifindex: u32,
    /// The client's process when `OWNERS` knew it.
    pub client_tgid: u32,
    pub c2s_bytes: u64,
    pub c2s_packets: u64,
    pub s2c_bytes: u64,
    pub s2c_packets: u64,
    /// Non-zero while a handshake of this flow is in `HANDSHAKES`.
    pub handshake: u32,
    pub _pad: u32,
}
assert_size!(FlowStats, 48);

/// `FLOW_CACHE` value, one per CPU: a flow this CPU's TC programs count
/// without looking it up in `FLOWS` (the hash lookup is most of a
/// program's work per packet), and what they counted since it was last
/// added to `FLOWS`. A flow is cached when its packet took the full path on
/// this CPU, was counted on this interface, is not DNS and has no handshake
/// in progress; a cached packet must also not carry SYN or RST. Any SYN
/// seen by the programs bumps a global generation, which invalidates every
/// cache (a new connection on a reused 4-tuple takes the full path). The
/// cached flow is replaced (its counts added to `FLOWS`) at most once per
/// jiffy, so interleaved flows do not thrash it.
///
/// User space adds the pending counts of each CPU to `FLOWS` when a read of
/// the caches before and after reading `FLOWS` shows the same `flushes`
/// (else that CPU's counts are left for the next read).
///
/// An IPv4 flow is also kept as the words its packets carry (addresses and
/// ports as they lie in the headers, in each direction), so that a packet
/// of the cached flow is matched by comparing two words, with no key built.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCache {
    /// The flow, oriented client → server as in `FLOWS`.
    pub key: FlowKey,
    pub ifindex: u32,
    /// Non-zero: `key` is a cached flow.
    pub valid: u32,
    /// The generation it was cached in.
    pub generation: u64,
    /// `bpf_jiffies64` when it was cached.
    pub since: u64,
    pub c2s_bytes: u64,
    pub c2s_packets: u64,
    pub s2c_bytes: u64,
    pub s2c_packets: u64,
    /// Times pending counts were added to `FLOWS` (and zeroed) on this CPU.
    pub flushes: u64,
    /// Every packet the TC programs looked at on this CPU.
    pub packets: u64,
    /// [`V4Words`] of `key` when it is an IPv4 flow (`v4` non-zero).
    pub words: V4Words,
    pub v4: u8,
    pub _pad: [u8; 7],
}
assert_size!(FlowCache, 40 + 8 + 8 + 8 + 32 + 8 + 8 + 24 + 8);

/// An IPv4 flow as its packets carry it: the 8 bytes of source and
/// destination address and the 4 bytes of source and destination port,
/// read as native-endian words straight from the headers, for packets
/// going client → server and server → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Words {
    pub c2s_addrs: u64,
    pub s2c_addrs: u64,
    pub c2s_ports: u32,
    pub s2c_ports: u32,
}
assert_size!(V4Words, 24);

impl V4Words {
    /// The words of `key` (oriented client → server; an IPv4 key).
    #[inline(always)]
    pub fn of(key: &FlowKey) -> Self {
        let addrs = |s: &[u8; 16], d: &[u8; 16]| {
            u64::from_ne_bytes([s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3]])
        };
        let ports = |s: u16, d: u16| {
            let (s, d) = (s.to_be_bytes(), d.to_be_bytes());
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
        };
        Self {
            c2s_addrs: addrs(&key.local, &key.remote),
            s2c_addrs: addrs(&key.remote, &key.local),
            c2s_ports: ports(key.local_port, key.remote_port),
            s2c_ports: ports(key.remote_port, key.local_port),
        }
    }
}

/// A DNS query waiting for its response (`DNS_PENDING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub family: u8,
    pub _pad: u8,
    pub client_port: u16,
    pub id: u16,
    pub server_port: u16,
    pub client: [u8; 16],
    pub server: [u8; 16],
}
assert_size!(DnsKey, 40);

/// The first four bytes of a DNS header: (id, is a response, rcode).
/// `None` for fewer than four bytes.
#[inline(always)]
pub fn dns_header(bytes: &[u8]) -> Option<(u16, bool, u8)> {
    if bytes.len() < 4 {
        return None;
    }
    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
    Some((id, bytes[2] & 0x80 != 0, bytes[3] & 0x0f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of a key are the bytes of its packets' headers.
    #[test]
    fn v4_words_are_the_header_bytes() {
        let key = FlowKey {
            family: FAMILY_V4,
            protocol: 17,
            local_port: 40000,
            remote_port: 53,
            _pad: 0,
            local: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote: [192, 168, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let w = V4Words::of(&key);
        // IPv4 header bytes 12..20 and UDP header bytes 0..4 of a packet
        // client → server, then server → client.
        let c2s_ip = [10, 1, 2, 3, 192, 168, 0, 9];
        let c2s_udp = [0x9c, 0x40, 0x00, 0x35];
        assert_eq!(w.c2s_addrs, u64::from_ne_bytes(c2s_ip));
        assert_eq!(w.c2s_ports, u32::from_ne_bytes(c2s_udp));
        assert_eq!(
            w.s2c_addrs,
            u64::from_ne_bytes([192, 168, 0, 9, 10, 1, 2, 3])
        );
        assert_eq!(w.s2c_ports, u32::from_ne_bytes([0x00, 0x35, 0x9c, 0x40]));
    }

    #[test]
    fn buckets_are_log_linear() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index((1 << 14) - 1), 0);
        assert_eq!(bucket_index(1 << 14), 1);
        assert_eq!(bucket_index((1 << 14) + (1 << 11)), 2);
        assert_eq!(bucket_index((1 << 15) - 1), 8);
        assert_eq!(bucket_index(1 << 15), 9);
        assert_eq!(bucket_index((1 << 35) - 1), HIST_BUCKETS - 2);
        assert_eq!(bucket_index(1 << 35), HIST_BUCKETS - 1);
        assert_eq!(bucket_index(u64::MAX), HIST_BUCKETS - 1);
        // Monotone over a sweep.
        let mut last = 0;
        let mut v = 1u64;
        while v < 1 << 40 {
            let i = bucket_index(v);
            assert!(i >= last);
            last = i;
            v = v + v / 7 + 1;
        }
    }

    #[test]
    fn dns_headers() {
        assert_eq!(
            dns_header(&[0x12, 0x34, 0x81, 0x83]),
            Some((0x1234, true, 3))
        );
        assert_eq!(dns_header(&[0, 1, 0x01, 0x00, 9]), Some((1, false, 0)));
        assert_eq!(dns_header(&[0, 1, 0]), None);
    }
}
