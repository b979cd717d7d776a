//! Who is behind an address and port on this node: a snapshot of every
//! network namespace's TCP and UDP sockets (`/proc/<pid>/net/{tcp,udp}{,6}`), local
//! addresses (`net/fib_trie`, `net/if_inet6`) and the processes holding
//! each socket (`/proc/<pid>/fd`). The parsers take the files' text, so
//! they are tested and fuzzed without `/proc`.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

/// TCP states in the tables.
pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0a;

/// One line of a `/proc/net/tcp{,6}` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketEntry {
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub state: u8,
    pub inode: u64,
}

/// `ADDR:PORT` as the tables write it: IPv4 as one host-order 32-bit hex
/// word, IPv6 as four; the port in hex.
fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |w: &str| u32::from_str_radix(w, 16).ok().map(u32::to_le_bytes);
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(addr)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(addr.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The sockets of a `/proc/net/tcp`, `tcp6`, `udp` or `udp6` table (the
/// same columns); malformed lines are skipped.
pub fn parse_tcp_table(text: &str) -> Vec<SocketEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, local_port) = parse_endpoint(f.get(1)?)?;
            let (remote, remote_port) = parse_endpoint(f.get(2)?)?;
            Some(SocketEntry {
                local: canonical(local),
                local_port,
                remote: canonical(remote),
                remote_port,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The local IPv4 addresses in `/proc/net/fib_trie` (`/32 host LOCAL`).
pub fn parse_fib_trie_locals(text: &str) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(a) = last
        {
            out.insert(IpAddr::V4(a));
        }
    }
    out.into_iter().collect()
}

/// The addresses in `/proc/net/if_inet6` (v4-mapped ones as IPv4).
pub fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            if hex.len() != 32 {
                return None;
            }
            let mut b = [0u8; 16];
            for (i, slot) in b.iter_mut().enumerate() {
                *slot = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
            }
            Some(canonical(IpAddr::V6(Ipv6Addr::from(b))))
        })
        .collect()
}

/// An IPv4-mapped IPv6 address as IPv4 (the kernel programs do the same).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One network namespace's tables.
#[derive(Clone, Debug, Default)]
pub struct Netns {
    /// The namespace's inode (`/proc/<pid>/ns/net`).
    pub id: u64,
    /// TCP sockets.
    pub sockets: Vec<SocketEntry>,
    /// UDP sockets (bound or connected).
    pub udp: Vec<SocketEntry>,
    pub local_addrs: Vec<IpAddr>,
    /// Processes in it (not kernel threads), ascending.
    pub pids: Vec<u32>,
}

/// Every namespace's sockets and who holds them.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub netns: Vec<Netns>,
    /// Socket inode → a process holding it (the lowest pid).
    pub inode_pid: HashMap<u64, u32>,
    /// The node's own namespace: the reader's (the agent runs in it and
    /// hooks its interfaces).
    pub root_netns: u64,
}

impl Snapshot {
    /// Reads `/proc` (every process's `ns/net` and `fd`, each namespace's
    /// tables once).
    pub fn read(proc_root: &Path) -> Self {
        let mut snap = Snapshot {
            root_netns: fs::read_link(proc_root.join("self/ns/net"))
                .ok()
                .and_then(|l| ns_inode(&l.to_string_lossy()))
                .unwrap_or(0),
            ..Snapshot::default()
        };
        let mut by_id: HashMap<u64, usize> = HashMap::new();
        let Ok(dir) = fs::read_dir(proc_root) else {
            return snap;
        };
        let mut pids: Vec<u32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            let pdir = proc_root.join(pid.to_string());
            let Some(ns) = fs::read_link(pdir.join("ns/net"))
                .ok()
                .and_then(|l| ns_inode(&l.to_string_lossy()))
            else {
                continue;
            };
            let index = *by_id.entry(ns).or_insert_with(|| {
                let read = |f: &str| fs::read_to_string(pdir.join(f)).unwrap_or_default();
                let mut sockets = parse_tcp_table(&read("net/tcp"));
                sockets.extend(parse_tcp_table(&read("net/tcp6")));
                let mut udp = parse_tcp_table(&read("net/udp"));
                udp.extend(parse_tcp_table(&read("net/udp6")));
                let mut local_addrs = parse_fib_trie_locals(&read("net/fib_trie"));
                local_addrs.extend(parse_if_inet6(&read("net/if_inet6")));
                snap.netns.push(Netns {
                    id: ns,
                    sockets,
                    udp,
                    local_addrs,
                    pids: Vec::new(),
                });
                snap.netns.len() - 1
            });
            // Kernel threads (no executable) live in the node's namespace
            // and are nobody's workload.
            if fs::read_link(pdir.join("exe")).is_ok() {
                snap.netns[index].pids.push(pid);
            }
            if let Ok(fds) = fs::read_dir(pdir.join("fd")) {
                for fd in fds.flatten() {
                    if let Some(inode) = fs::read_link(fd.path())
                        .ok()
                        .and_then(|l| socket_inode(&l.to_string_lossy()))
                    {
                        snap.inode_pid.entry(inode).or_insert(pid);
                    }
                }
            }
        }
        snap
    }

    /// The namespaces that have `addr` as a local address.
    fn owning(&self, addr: IpAddr) -> impl Iterator<Item = &Netns> {
        let addr = canonical(addr);
        self.netns
            .iter()
            .filter(move |n| n.local_addrs.contains(&addr))
    }

    fn pid(&self, inode: u64) -> Option<u32> {
        (inode != 0).then(|| self.inode_pid.get(&inode).copied())?
    }

    /// Whether `addr` is an address of this node (any namespace).
    pub fn is_local(&self, addr: IpAddr) -> bool {
        self.owning(addr).next().is_some()
    }

    /// The process serving `addr:port`: a listener on it (or on the
    /// wildcard address) in a namespace that owns `addr`, else the holder
    /// of an established socket on it.
    pub fn server(&self, addr: IpAddr, port: u16) -> Option<u32> {
        let addr = canonical(addr);
        for ns in self.owning(addr) {
            let listener = ns.sockets.iter().find(|s| {
                s.state == TCP_LISTEN
                    && s.local_port == port
                    && (s.local == addr || s.local.is_unspecified())
                    && self.pid(s.inode).is_some()
            });
            if let Some(s) = listener {
                return self.pid(s.inode);
            }
        }
        self.owning(addr)
            .flat_map(|ns| ns.sockets.iter())
            .find(|s| s.local == addr && s.local_port == port && self.pid(s.inode).is_some())
            .and_then(|s| self.pid(s.inode))
    }

    /// The process holding a connection from `local` (any port, or
    /// `local_port`) to `remote:remote_port`.
    pub fn connection(
        &self,
        local: IpAddr,
        local_port: Option<u16>,
        remote: IpAddr,
        remote_port: u16,
    ) -> Option<u32> {
        let (local, remote) = (canonical(local), canonical(remote));
        self.owning(local)
            .flat_map(|ns| ns.sockets.iter())
            .find(|s| {
                s.local == local
                    && local_port.is_none_or(|p| p == s.local_port)
                    && s.remote == remote
                    && s.remote_port == remote_port
                    && s.state != TCP_LISTEN
                    && self.pid(s.inode).is_some()
            })
            .and_then(|s| self.pid(s.inode))
    }

    /// The process holding the UDP socket bound to `addr:port` — or, failing
    /// that, to the wildcard address on `port` — in a namespace that owns
    /// `addr`: either end of a UDP flow (a client's socket, connected or not,
    /// or a server's).
    pub fn udp(&self, addr: IpAddr, port: u16) -> Option<u32> {
        let addr = canonical(addr);
        let bound = |exact: bool| {
            self.owning(addr)
                .flat_map(|ns| ns.udp.iter())
                .filter(|s| {
                    s.local_port == port
                        && if exact {
                            s.local == addr
                        } else {
                            s.local.is_unspecified()
                        }
                })
                .find_map(|s| self.pid(s.inode))
        };
        bound(true).or_else(|| bound(false))
    }

    /// The first process of the namespace that owns `addr`, when that is
    /// not the node's own namespace (a pod, a container): what a DNS query
    /// from that address is attributed to.
    pub fn namespace_process(&self, addr: IpAddr) -> Option<u32> {
        let mut owners = self.owning(addr);
        let ns = owners.next()?;
        if owners.next().is_some() || ns.id == self.root_netns {
            return None;
        }
        ns.pids.first().copied()
    }
}

/// `net:[4026531840]` → 4026531840.
fn ns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// `socket:[123]` → 123.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0\n\
   1: 0201A8C0:1F90 0101A8C0:A000 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 100 0 0 10 0\n\
   2: garbage\n";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0000000000000000FFFF00000101A8C0:A000 0000000000000000FFFF00000201A8C0:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2001 1 0 20 4 30 10 -1\n\
   1: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0 20 4 30 10 -1\n";
    // UDP: port 53 on the wildcard address and on 192.168.1.2; port 5000
    // only on the wildcard; an unconnected dual-stack client socket on
    // port 0xa001.
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3001 2 0000000000000000 0\n\
  101: 0201A8C0:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3002 2 0000000000000000 0\n\
  102: 00000000:1388 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3001 2 0000000000000000 0\n";
    const UDP6: &str = "   sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  200: 00000000000000000000000000000000:A001 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3003 2 0000000000000000 0\n";
    const FIB: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 192.168.1.0/24 2 0 2\n        |-- 192.168.1.0\n           /24 link UNICAST\n        |-- 192.168.1.2\n           /32 host LOCAL\nLocal:\n  |-- 192.168.1.2\n     /32 host LOCAL\n";

    #[test]
    fn tables_parse() {
        let v4 = parse_tcp_table(TCP);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[0].state, TCP_LISTEN);
        assert_eq!(v4[0].local_port, 8080);
        assert!(v4[0].local.is_unspecified());
        assert_eq!(v4[1].local, "192.168.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4[1].remote_port, 0xa000);
        assert_eq!(v4[1].inode, 1002);
        let v6 = parse_tcp_table(TCP6);
        // A v4-mapped address is IPv4.
        assert_eq!(v6[0].local, "192.168.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(v6[1].local, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6[1].local_port, 53);
        assert_eq!(
            parse_fib_trie_locals(FIB),
            ["192.168.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            parse_if_inet6("00000000000000000000000000000001 01 80 10 80       lo\nbad\n"),
            ["::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(ns_inode("net:[4026531840]"), Some(4026531840));
        assert_eq!(socket_inode("socket:[77]"), Some(77));
        assert_eq!(socket_inode("pipe:[77]"), None);
    }

    fn snapshot() -> Snapshot {
        let mut inode_pid = HashMap::new();
        inode_pid.insert(1001, 10); // the server's listener
        inode_pid.insert(1002, 10);
        inode_pid.insert(2001, 20); // the client
        inode_pid.insert(3001, 30); // a UDP server on the wildcard address
        inode_pid.insert(3002, 31); // ... and one on 192.168.1.2 itself
        inode_pid.insert(3003, 20); // the client's UDP socket (dual-stack)
        Snapshot {
            netns: vec![
                Netns {
                    id: 1,
                    sockets: parse_tcp_table(TCP6),
                    udp: parse_tcp_table(UDP6),
                    local_addrs: vec!["192.168.1.1".parse().unwrap()],
                    pids: vec![1, 20],
                },
                Netns {
                    id: 2,
                    sockets: parse_tcp_table(TCP),
                    udp: parse_tcp_table(UDP),
                    local_addrs: parse_fib_trie_locals(FIB),
                    pids: vec![9, 10],
                },
            ],
            inode_pid,
            root_netns: 1,
        }
    }

    #[test]
    fn endpoints_resolve_to_processes() {
        let s = snapshot();
        let server: IpAddr = "192.168.1.2".parse().unwrap();
        let client: IpAddr = "192.168.1.1".parse().unwrap();
        assert_eq!(s.server(server, 8080), Some(10));
        assert_eq!(s.server(server, 8081), None);
        // The listener is in the server's namespace, not the client's.
        assert_eq!(s.server(client, 8080), None);
        assert_eq!(s.connection(client, None, server, 8080), Some(20));
        assert_eq!(s.connection(client, Some(0xa000), server, 8080), Some(20));
        assert_eq!(s.connection(client, Some(1), server, 8080), None);
        assert!(s.is_local(server) && !s.is_local("10.9.9.9".parse().unwrap()));
        assert_eq!(s.namespace_process(server), Some(9));
        assert_eq!(s.namespace_process(client), None);
        // UDP: the exact address before the wildcard; only in a namespace
        // owning the address.
        assert_eq!(s.udp(server, 53), Some(31));
        assert_eq!(s.udp(server, 5000), Some(30));
        assert_eq!(s.udp(server, 5001), None);
        assert_eq!(s.udp(client, 5000), None);
        assert_eq!(s.udp(client, 0xa001), Some(20));
        assert_eq!(s.udp(server, 0xa001), None);
    }

    #[test]
    fn this_process_sends_udp() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let s = Snapshot::read(Path::new("/proc"));
        assert_eq!(
            s.udp("127.0.0.1".parse().unwrap(), port),
            Some(std::process::id())
        );
    }

    #[test]
    fn this_process_listens() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = Snapshot::read(Path::new("/proc"));
        assert_eq!(
            s.server("127.0.0.1".parse().unwrap(), port),
            Some(std::process::id())
        );
    }
}
