//! Loads the network programs (`fathom-net` object), attaches the
//! tracepoints and the TC classifiers (tcx on Linux ≥ 6.6, ingress and
//! egress) on the chosen interfaces — picking up new interfaces and
//! forgetting removed ones on [`NetCapture::sync_interfaces`] — and reads
//! the kernel's maps. The contract is `fathom_common::net`; the maps'
//! contents are turned into metrics by [`crate::network`] (`metrics`).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{
        BtfTracePoint, ProgramError, SchedClassifier, TcAttachType, TracePoint,
        tc::SchedClassifierLinkId,
    },
};
use fathom_common::net::{
    AggKey, DnsKey, FlowCache, FlowKey, FlowStats, Hist, NetCounter, Owner, globals, names,
};

use crate::{
    ebpf::{self, field_offset, program, take_map as take},
    preflight,
};

/// The eBPF object of this signal, as named in verifier figures.
pub const OBJECT: &str = "fathom-net";

/// What the network programs watch.
#[derive(Clone, Debug)]
pub struct NetCaptureConfig {
    /// Interface names or `*` patterns; empty: the default route's
    /// interface and every veth.
    pub interfaces: Vec<String>,
    /// Minimum time between two RTT samples of one connection.
    pub rtt_sample_ns: u64,
    /// Aggregation keys (histograms; counters have as many).
    pub keys: u32,
    /// Flows tracked at once (LRU).
    pub flows: u32,
}

impl Default for NetCaptureConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            rtt_sample_ns: 10_000_000,
            keys: 2048,
            flows: 65536,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetCaptureError {
    #[error(transparent)]
    Kernel(#[from] ebpf::KernelError),
}

crate::wraps_kernel_error!(NetCaptureError);

/// Reads the kernel's connections map (`NET_OWNERS`) from any thread: what
/// HTTP spans learn of their connection ([`crate::connections::ConnectionLookup`]).
pub struct OwnersReader {
    owners: BpfHashMap<MapData, FlowKey, Owner>,
}

impl OwnersReader {
    /// The connection whose local end sees `key` ([`NetCapture::connection`]).
    pub fn connection(&self, key: &FlowKey) -> Option<Owner> {
        self.owners.get(key, 0).ok()
    }
}

impl crate::connections::ConnectionLookup for OwnersReader {
    fn connect_ns(&self, key: &FlowKey) -> Option<u64> {
        self.connection(key)
            .map(|o| o.connect_ns)
            .filter(|ns| *ns > 0)
    }
}

/// An interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    /// A veth (virtual, paired with another device, no DEVTYPE).
    pub veth: bool,
    /// Ethernet framing (ARPHRD_ETHER): the only kind the programs parse.
    pub ether: bool,
}

/// The interfaces under `/sys/class/net`.
pub fn list_interfaces(sys_class_net: &Path) -> Vec<Interface> {
    let Ok(dir) = fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut out: Vec<Interface> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let path = e.path();
            let read = |f: &str| fs::read_to_string(path.join(f)).ok();
            let ifindex: u32 = read("ifindex")?.trim().parse().ok()?;
            let iflink: u32 = read("iflink")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(ifindex);
            let virtual_dev = fs::read_link(&path)
                .is_ok_and(|l| l.to_string_lossy().contains("/devices/virtual/"));
            let devtype = read("uevent").is_some_and(|u| u.contains("DEVTYPE="));
            let ether = read("type").is_some_and(|t| t.trim() == "1");
            Some(Interface {
                veth: virtual_dev && iflink != ifindex && !devtype && ether,
                name,
                ifindex,
                ether,
            })
        })
        .collect();
    out.sort_by_key(|i| i.ifindex);
    out
}

/// The interfaces of the IPv4 default routes in a `/proc/net/route` table.
pub fn default_route_interfaces(route: &str) -> Vec<String> {
    route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000"))
                .then(|| f[0].to_string())
        })
        .collect()
}

/// Whether `name` matches a pattern with `*` wildcards.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

/// The interfaces to hook: those matching `patterns`, or (no patterns) the
/// default route's and every veth. Only Ethernet-framed ones.
pub fn select_interfaces(
    all: &[Interface],
    patterns: &[String],
    default_route: &[String],
) -> Vec<Interface> {
    all.iter()
        .filter(|i| i.ether)
        .filter(|i| {
            if patterns.is_empty() {
                i.veth || default_route.contains(&i.name)
            } else {
                patterns.iter().any(|p| glob_match(p, &i.name))
            }
        })
        .cloned()
        .collect()
}

/// The loaded programs. Dropping it detaches everything.
pub struct NetCapture {
    config: NetCaptureConfig,
    hists: BpfHashMap<MapData, AggKey, Hist>,
    counts: BpfHashMap<MapData, AggKey, u64>,
    flows: BpfHashMap<MapData, FlowKey, FlowStats>,
    flow_cache: PerCpuArray<MapData, FlowCache>,
    dns: BpfHashMap<MapData, DnsKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    owners: BpfHashMap<MapData, FlowKey, Owner>,
    /// Hooked interfaces: (name, ifindex) → (ingress, egress) links.
    attached: BTreeMap<(String, u32), (SchedClassifierLinkId, SchedClassifierLinkId)>,
    ebpf: Ebpf,
}

/// The BTF tracepoint program and the kernel tracepoint it attaches to.
pub const BTF_PROBE: (&str, &str) = ("net_tcp_probe_btf", "tcp_probe");

/// Loads and attaches `net_tcp_probe_btf`; `false` (logged) when the
/// kernel refuses it, and the classic `net_tcp_probe` runs instead.
fn attach_btf_probe(ebpf: &mut Ebpf) -> bool {
    let result = (|| -> Result<(), String> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
        let (name, tracepoint) = BTF_PROBE;
        let program: &mut BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or("no program net_tcp_probe_btf")?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        ebpf::load_program(OBJECT, name, || program.load(tracepoint, &btf))
            .map_err(|e| e.to_string())?;
        program.attach().map_err(|e| e.to_string())?;
        Ok(())
    })();
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "tcp_probe as a BTF tracepoint failed: using the classic tracepoint");
            false
        }
    }
}

/// Tracepoints: (program, category, name).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("net_sock_state", "sock", "inet_sock_set_state"),
    ("net_tcp_probe", "tcp", "tcp_probe"),
    ("net_retransmit", "tcp", "tcp_retransmit_skb"),
];

/// Globals set from format files: (global, tracepoint, field).
const OFFSETS: &[(&str, &str, &str)] = &[
    (globals::STATE_SKADDR, "sock/inet_sock_set_state", "skaddr"),
    (
        globals::STATE_OLDSTATE,
        "sock/inet_sock_set_state",
        "oldstate",
    ),
    (globals::STATE_SPORT, "sock/inet_sock_set_state", "sport"),
    (globals::STATE_FAMILY, "sock/inet_sock_set_state", "family"),
    (globals::STATE_SADDR, "sock/inet_sock_set_state", "saddr"),
    (
        globals::STATE_SADDR_V6,
        "sock/inet_sock_set_state",
        "saddr_v6",
    ),
    (globals::PROBE_SADDR, "tcp/tcp_probe", "saddr"),
    (globals::PROBE_DADDR, "tcp/tcp_probe", "daddr"),
    (globals::PROBE_SPORT, "tcp/tcp_probe", "sport"),
    (globals::PROBE_FAMILY, "tcp/tcp_probe", "family"),
    (globals::PROBE_SRTT, "tcp/tcp_probe", "srtt"),
    (globals::PROBE_COOKIE, "tcp/tcp_probe", "sock_cookie"),
    (globals::RETRANS_SPORT, "tcp/tcp_retransmit_skb", "sport"),
    (globals::RETRANS_FAMILY, "tcp/tcp_retransmit_skb", "family"),
    (globals::RETRANS_SADDR, "tcp/tcp_retransmit_skb", "saddr"),
    (
        globals::RETRANS_SADDR_V6,
        "tcp/tcp_retransmit_skb",
        "saddr_v6",
    ),
];

impl NetCapture {
    /// Loads the programs and attaches the tracepoints; interfaces are
    /// hooked by [`Self::sync_interfaces`].
    pub fn start(config: &NetCaptureConfig) -> Result<Self, NetCaptureError> {
        let (ebpf, sk_offsets) = Self::open_object(config)?;
        Self::start_with(config, ebpf, sk_offsets)
    }

    /// The `fathom-net` object, its globals and map sizes set from `config`
    /// as [`NetCapture::start`] sets them, no program loaded; and whether
    /// the kernel's BTF gave the socket offsets `net_tcp_probe_btf` needs.
    pub fn open_object(config: &NetCaptureConfig) -> Result<(Ebpf, bool), NetCaptureError> {
        preflight::ensure_tracefs().map_err(|reason| ebpf::KernelError::TracepointFormat {
            path: preflight::TRACEFS.into(),
            reason,
        })?;
        let mut offsets = Vec::new();
        for &(global, tp, field) in OFFSETS {
            let path = Path::new(preflight::TRACEFS)
                .join("events")
                .join(tp)
                .join("format");
            let format =
                fs::read_to_string(&path).map_err(|e| ebpf::KernelError::TracepointFormat {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            let off = field_offset(&format, field).ok_or_else(|| {
                ebpf::KernelError::TracepointFormat {
                    path: path.display().to_string(),
                    reason: format!("no {field} field"),
                }
            })?;
            offsets.push((global, off));
        }
        let mut loader = EbpfLoader::new();
        loader
            .verifier_log_level(VerifierLogLevel::STATS)
            .override_global(globals::RTT_SAMPLE_NS, &config.rtt_sample_ns, true)
            .map_max_entries(names::HISTS, config.keys.max(1))
            .map_max_entries(names::COUNTS, config.keys.max(1))
            .map_max_entries(names::FLOWS, config.flows.max(1));
        for (global, off) in &offsets {
            loader.override_global(global, off, true);
        }
        // `tcp_probe` runs on every incoming TCP segment: as a BTF tracepoint
        // (reading the socket at offsets from the kernel's BTF) the kernel
        // does not build the classic tracepoint's record each time.
        let sk_offsets = crate::btf::kernel().and_then(|btf| crate::btf::net_sock_offsets(&btf));
        match &sk_offsets {
            Ok(sk) => {
                for (global, off) in sk {
                    loader.override_global(global, off, true);
                }
            }
            Err(e) => tracing::info!(
                error = %e,
                "no socket offsets from BTF: tcp_probe runs as a classic tracepoint"
            ),
        }
        let ebpf = loader.load(ebpf::net_object()?)?;
        Ok((ebpf, sk_offsets.is_ok()))
    }

    fn start_with(
        config: &NetCaptureConfig,
        mut ebpf: Ebpf,
        sk_offsets: bool,
    ) -> Result<Self, NetCaptureError> {
        let btf_probe = sk_offsets && attach_btf_probe(&mut ebpf);
        for &(name, category, tracepoint) in TRACEPOINTS {
            if btf_probe && name == "net_tcp_probe" {
                continue;
            }
            let program: &mut TracePoint = program(&mut ebpf, name)?;
            ebpf::load_program(OBJECT, name, || program.load())?;
            program
                .attach(category, tracepoint)
                .map_err(|source| ebpf::KernelError::Program { name, source })?;
        }
        for name in ["net_tc_ingress", "net_tc_egress"] {
            let program: &mut SchedClassifier = program(&mut ebpf, name)?;
            ebpf::load_program(OBJECT, name, || program.load())?;
        }
        Ok(Self {
            config: config.clone(),
            hists: take(&mut ebpf, names::HISTS)?,
            counts: take(&mut ebpf, names::COUNTS)?,
            flows: take(&mut ebpf, names::FLOWS)?,
            flow_cache: take(&mut ebpf, names::FLOW_CACHE)?,
            dns: take(&mut ebpf, names::DNS_PENDING)?,
            counters: take(&mut ebpf, names::COUNTERS)?,
            owners: take(&mut ebpf, names::OWNERS)?,
            attached: BTreeMap::new(),
            ebpf,
        })
    }

    /// Hooks the interfaces that match and are not hooked yet, and forgets
    /// those that are gone. Returns the hooked names.
    pub fn sync_interfaces(&mut self) -> Vec<String> {
        let all = list_interfaces(Path::new("/sys/class/net"));
        let route = fs::read_to_string("/proc/net/route").unwrap_or_default();
        let wanted = select_interfaces(
            &all,
            &self.config.interfaces,
            &default_route_interfaces(&route),
        );
        let wanted_keys: BTreeSet<(String, u32)> =
            wanted.iter().map(|i| (i.name.clone(), i.ifindex)).collect();
        let gone: Vec<_> = self
            .attached
            .keys()
            .filter(|k| !wanted_keys.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some((ingress, egress)) = self.attached.remove(&key) {
                // The kernel already dropped the links of a removed device;
                // detaching what is left of them may fail harmlessly.
                for (name, link) in [("net_tc_ingress", ingress), ("net_tc_egress", egress)] {
                    if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, name) {
                        let _ = p.detach(link);
                    }
                }
                tracing::info!(interface = %key.0, "network hooks removed");
            }
        }
        for key in wanted_keys {
            if self.attached.contains_key(&key) {
                continue;
            }
            match self.attach(&key.0) {
                Ok(links) => {
                    tracing::info!(interface = %key.0, "network hooks attached");
                    self.attached.insert(key, links);
                }
                Err(e) => {
                    tracing::warn!(interface = %key.0, error = %e, "network hooks not attached")
                }
            }
        }
        self.attached.keys().map(|k| k.0.clone()).collect()
    }

    fn attach(
        &mut self,
        interface: &str,
    ) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), ProgramError> {
        let ingress = program::<SchedClassifier>(&mut self.ebpf, "net_tc_ingress")
            .map_err(|_| ProgramError::NotLoaded)?
            .attach(interface, TcAttachType::Ingress)?;
        let egress = match program::<SchedClassifier>(&mut self.ebpf, "net_tc_egress")
            .map_err(|_| ProgramError::NotLoaded)?
            .attach(interface, TcAttachType::Egress)
        {
            Ok(l) => l,
            Err(e) => {
                if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, "net_tc_ingress") {
                    let _ = p.detach(ingress);
                }
                return Err(e);
            }
        };
        Ok((ingress, egress))
    }

    /// Every histogram.
    pub fn hists(&self) -> Vec<(AggKey, Hist)> {
        self.hists.iter().filter_map(Result::ok).collect()
    }

    /// The processes the kernel named in its keys (connecting clients).
    pub fn key_tgids(&self) -> std::collections::HashSet<u32> {
        self.hists
            .keys()
            .chain(self.counts.keys())
            .filter_map(Result::ok)
            .map(|k| k.tgid)
            .filter(|t| *t != 0)
            .collect()
    }

    /// What the kernel knows of one TCP connection, keyed as its local end
    /// sees it ([`FlowKey`] with `local` = this socket's address, protocol
    /// 6): owner, latest smoothed RTT, retransmits so far, connect time.
    /// For an HTTP span: look the connection up at the span's start and end
    /// (retransmits during the span = the difference).
    pub fn connection(&self, key: &FlowKey) -> Option<Owner> {
        self.owners.get(key, 0).ok()
    }

    /// A second handle on the connections map ([`Self::connection`]) for
    /// another thread (HTTP spans look their connection's handshake up).
    pub fn owners_reader(&self) -> Result<OwnersReader, NetCaptureError> {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        let map_err = |source| ebpf::KernelError::Map {
            name: names::OWNERS,
            source,
        };
        let fd = self
            .owners
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| {
                map_err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }))
            })?;
        let data = MapData::from_fd(fd).map_err(map_err)?;
        let owners = BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
        Ok(OwnersReader { owners })
    }

    /// Every counter.
    pub fn counts(&self) -> Vec<(AggKey, u64)> {
        self.counts.iter().filter_map(Result::ok).collect()
    }

    /// Every tracked flow, with the counts the CPUs' flow caches hold for
    /// it (see [`FlowRead`]).
    pub fn flows(&self) -> Vec<FlowRead> {
        let caches = |m: &PerCpuArray<MapData, FlowCache>| -> Vec<FlowCache> {
            m.get(&0, 0).map(|v| v.to_vec()).unwrap_or_default()
        };
        let before = caches(&self.flow_cache);
        let stored: Vec<(FlowKey, FlowStats)> = self.flows.iter().filter_map(Result::ok).collect();
        let after = caches(&self.flow_cache);
        add_pending(stored, &before, &after)
    }

    /// DNS queries waiting for a response (kernel time of the query).
    pub fn dns_pending(&self) -> Vec<(DnsKey, u64)> {
        self.dns.iter().filter_map(Result::ok).collect()
    }

    /// Forgets a DNS query (timed out).
    pub fn forget_dns(&mut self, key: &DnsKey) {
        let _ = self.dns.remove(key);
    }

    /// Removes the entries of a process that exited (their sums are kept
    /// in user space).
    pub fn forget_keys(&mut self, keys: &[AggKey]) {
        for k in keys {
            let _ = self.hists.remove(k);
            let _ = self.counts.remove(k);
        }
    }

    /// The packets the TC programs looked at, summed over CPUs.
    pub fn tc_packets(&self) -> u64 {
        self.flow_cache
            .get(&0, 0)
            .map_or(0, |v| v.iter().map(|c| c.packets).sum())
    }

    /// The kernel's counters, summed over CPUs.
    pub fn counters(&self) -> [u64; NetCounter::COUNT as usize] {
        let mut out = [0; NetCounter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

/// A flow as read from the kernel: `stored` in `FLOWS` (it only grows, but
/// for an evicted and re-created flow), `total` with what the CPUs' flow
/// caches held for it and had not yet added to `FLOWS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRead {
    pub key: FlowKey,
    pub stored: FlowStats,
    pub total: FlowStats,
}

/// Adds to each flow the pending counts of the CPUs whose cache did not
/// flush between `before` (read before `FLOWS`) and `after` (read after):
/// those counts were not in `FLOWS` when it was read. A CPU that flushed
/// meanwhile may have moved its counts into `FLOWS` before or after the
/// read, so they are left for the next read: `total` is never more than
/// the truth, and may be less for a moment.
pub fn add_pending(
    stored: Vec<(FlowKey, FlowStats)>,
    before: &[FlowCache],
    after: &[FlowCache],
) -> Vec<FlowRead> {
    let mut reads: Vec<FlowRead> = stored
        .into_iter()
        .map(|(key, s)| FlowRead {
            key,
            stored: s,
            total: s,
        })
        .collect();
    let index: std::collections::HashMap<FlowKey, usize> =
        reads.iter().enumerate().map(|(i, r)| (r.key, i)).collect();
    for (b, a) in before.iter().zip(after) {
        if a.valid == 0 || b.flushes != a.flushes {
            continue;
        }
        if let Some(&i) = index.get(&a.key) {
            let t = &mut reads[i].total;
            t.c2s_bytes += a.c2s_bytes;
            t.c2s_packets += a.c2s_packets;
            t.s2c_bytes += a.s2c_bytes;
            t.s2c_packets += a.s2c_packets;
        }
    }
    reads
}

/// A flow's counts as `[c2s bytes, c2s packets, s2c bytes, s2c packets]`.
pub type FlowCounts = [u64; 4];

/// What the previous read of a flow left: its `stored` counts and the
/// totals already counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSeen {
    pub stored: FlowStats,
    pub counted: FlowCounts,
}

/// What a read of a flow adds since `last`, and what to remember. Stored
/// counts that went down mean the flow was evicted and made again: it
/// counts from zero. Totals that went down (a CPU's pending counts left for
/// the next read) add nothing until they are back above what was counted.
pub fn flow_delta(last: Option<&FlowSeen>, read: &FlowRead) -> (FlowCounts, FlowSeen) {
    let t = &read.total;
    let total = [t.c2s_bytes, t.c2s_packets, t.s2c_bytes, t.s2c_packets];
    let reset = last.is_some_and(|l| {
        read.stored.c2s_packets < l.stored.c2s_packets
            || read.stored.s2c_packets < l.stored.s2c_packets
    });
    let counted = match last {
        Some(l) if !reset => l.counted,
        _ => [0; 4],
    };
    let mut delta = [0; 4];
    let mut now = counted;
    for i in 0..4 {
        delta[i] = total[i].saturating_sub(counted[i]);
        now[i] = counted[i].max(total[i]);
    }
    (
        delta,
        FlowSeen {
            stored: read.stored,
            counted: now,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, veth: bool) -> Interface {
        Interface {
            name: name.into(),
            ifindex: 1,
            veth,
            ether: true,
        }
    }

    #[test]
    fn interface_selection() {
        let all = vec![
            iface("lo", false),
            iface("eth0", false),
            iface("veth1a2b", true),
            iface("cali123", true),
            Interface {
                ether: false,
                ..iface("wg0", false)
            },
        ];
        let names = |v: Vec<Interface>| v.into_iter().map(|i| i.name).collect::<Vec<_>>();
        assert_eq!(
            names(select_interfaces(&all, &[], &["eth0".into()])),
            ["eth0", "veth1a2b", "cali123"]
        );
        assert_eq!(
            names(select_interfaces(&all, &["cali*".into(), "lo".into()], &[])),
            ["lo", "cali123"]
        );
        assert_eq!(
            names(select_interfaces(&all, &["wg*".into()], &[])),
            Vec::<String>::new()
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth0"));
        assert!(glob_match("*0", "eth0"));
        assert!(glob_match("e*h*", "eth0"));
        assert!(glob_match("*", "x"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
        assert!(!glob_match("a*b*c", "acb"));
    }

    #[test]
    fn default_routes() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     ens4\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     ens4\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_route_interfaces(route), ["ens4"]);
        assert!(default_route_interfaces("").is_empty());
    }

    #[test]
    fn this_machine_lists_loopback() {
        let all = list_interfaces(Path::new("/sys/class/net"));
        let lo = all.iter().find(|i| i.name == "lo").expect("lo listed");
        assert!(!lo.veth);
    }

    fn key(port: u16) -> FlowKey {
        FlowKey {
            family: fathom_common::net::FAMILY_V4,
            protocol: 17,
            local_port: port,
            remote_port: 53,
            ..FlowKey::default()
        }
    }

    fn stats(c2s_packets: u64, s2c_packets: u64) -> FlowStats {
        FlowStats {
            c2s_bytes: 100 * c2s_packets,
            c2s_packets,
            s2c_bytes: 100 * s2c_packets,
            s2c_packets,
            ..FlowStats::default()
        }
    }

    fn cache(port: u16, c2s_packets: u64, s2c_packets: u64, flushes: u64) -> FlowCache {
        FlowCache {
            key: key(port),
            valid: 1,
            c2s_bytes: 100 * c2s_packets,
            c2s_packets,
            s2c_bytes: 100 * s2c_packets,
            s2c_packets,
            flushes,
            ..FlowCache::default()
        }
    }

    #[test]
    fn pending_counts_of_steady_caches_are_added() {
        let stored = vec![(key(1), stats(10, 5)), (key(2), stats(3, 3))];
        // CPU 0 caches flow 1 and did not flush between the reads (its count
        // grew: the later read counts); CPU 1 flushed meanwhile (left out);
        // CPU 2 caches a flow FLOWS does not hold (evicted: dropped); CPU 3
        // holds nothing.
        let before = [
            cache(1, 2, 1, 7),
            cache(2, 4, 0, 1),
            cache(9, 1, 0, 0),
            FlowCache::default(),
        ];
        let after = [
            cache(1, 3, 1, 7),
            cache(2, 0, 1, 2),
            cache(9, 2, 0, 0),
            FlowCache::default(),
        ];
        let reads = add_pending(stored, &before, &after);
        assert_eq!(reads.len(), 2);
        assert_eq!(reads[0].stored, stats(10, 5));
        assert_eq!(reads[0].total, stats(13, 6));
        assert_eq!(reads[1].total, stats(3, 3));
    }

    #[test]
    fn flow_deltas_count_each_packet_once() {
        let read = |stored: FlowStats, total: FlowStats| FlowRead {
            key: key(1),
            stored,
            total,
        };
        let (d, seen) = flow_delta(None, &read(stats(10, 0), stats(12, 0)));
        assert_eq!(d, [1200, 12, 0, 0]);
        // The pending 2 were left out of this read (their CPU flushed
        // meanwhile): nothing is taken back, nothing added.
        let (d, seen) = flow_delta(Some(&seen), &read(stats(10, 0), stats(10, 0)));
        assert_eq!(d, [0; 4]);
        // They reached FLOWS, with 3 more packets.
        let (d, seen) = flow_delta(Some(&seen), &read(stats(15, 1), stats(15, 1)));
        assert_eq!(d, [300, 3, 100, 1]);
        // Evicted and made again: counts from zero.
        let (d, _) = flow_delta(Some(&seen), &read(stats(2, 0), stats(4, 0)));
        assert_eq!(d, [400, 4, 0, 0]);
    }
}
