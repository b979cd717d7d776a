//! Names both ends of what the kernel measured: the local workload (a
//! process, or none: `service.name=unknown`), the direction and the peer
//! (a process on this node, else the remote address), from a
//! [`Snapshot`] of the node's sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fathom_common::net::{AggKey, FAMILY_V4, FlowKey, direction, metric};

use super::sockets::Snapshot;

/// The remote end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A process on this node.
    Process(u32),
    Addr(IpAddr),
}

/// The local end and the peer of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attribution {
    /// The local process; `None`: traffic of this node no process could be
    /// found for (`service.name=unknown`).
    pub local: Option<u32>,
    /// `client` or `server`; `None` for DNS.
    pub direction: Option<&'static str>,
    pub peer: Peer,
    pub server_port: u16,
}

/// A key's 16-byte address.
pub fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// Who a histogram or counter of the kernel belongs to; `None` when it is
/// not about a workload of this node (a handshake to a remote server seen
/// passing an interface).
pub fn attribute_agg(key: &AggKey, snap: &Snapshot) -> Option<Attribution> {
    let local = addr(key.family, &key.local);
    let remote = addr(key.family, &key.remote);
    let port = key.server_port;
    if key.metric == metric::DNS {
        return Some(Attribution {
            local: snap.namespace_process(local),
            direction: None,
            peer: Peer::Addr(remote),
            server_port: port,
        });
    }
    let server = match key.direction {
        direction::CLIENT => false,
        direction::SERVER => true,
        _ => key.tgid == 0 && snap.server(local, port).is_some(),
    };
    if server {
        let pid = snap.server(local, port);
        if pid.is_none() && !snap.is_local(local) {
            return None;
        }
        let peer = snap
            .connection(remote, None, local, port)
            .map_or(Peer::Addr(remote), Peer::Process);
        Some(Attribution {
            local: pid,
            direction: Some("server"),
            peer,
            server_port: port,
        })
    } else {
        let pid = if key.tgid != 0 {
            Some(key.tgid)
        } else {
            snap.connection(local, None, remote, port)
        };
        Some(Attribution {
            local: pid,
            direction: Some("client"),
            peer: server_peer(snap, remote, port),
            server_port: port,
        })
    }
}

fn server_peer(snap: &Snapshot, addr: IpAddr, port: u16) -> Peer {
    snap.server(addr, port)
        .map_or(Peer::Addr(addr), Peer::Process)
}

/// The local ends of a flow (keyed client → server): for each, who it is
/// and whether the client-to-server bytes are its transmit (else receive).
pub fn attribute_flow(
    key: &FlowKey,
    client_tgid: u32,
    snap: &Snapshot,
) -> Vec<(Attribution, bool)> {
    let client = addr(key.family, &key.local);
    let server = addr(key.family, &key.remote);
    let port = key.remote_port;
    let (tcp, udp) = (key.protocol == 6, key.protocol == 17);
    let mut out = Vec::new();
    let client_pid = if client_tgid != 0 {
        Some(client_tgid)
    } else if tcp {
        snap.connection(client, Some(key.local_port), server, port)
    } else if udp {
        snap.udp(client, key.local_port)
    } else {
        None
    };
    let server_pid = if tcp {
        snap.server(server, port)
    } else if udp {
        snap.udp(server, port)
    } else {
        None
    };
    if snap.is_local(server) || server_pid.is_some() {
        out.push((
            Attribution {
                local: server_pid,
                direction: Some("server"),
                peer: client_pid.map_or(Peer::Addr(client), Peer::Process),
                server_port: port,
            },
            false,
        ));
    }
    if snap.is_local(client) || client_pid.is_some() {
        out.push((
            Attribution {
                local: client_pid,
                direction: Some("client"),
                peer: server_pid.map_or(Peer::Addr(server), Peer::Process),
                server_port: port,
            },
            true,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::sockets::{Netns, SocketEntry, TCP_ESTABLISHED, TCP_LISTEN};
    use std::collections::HashMap;

    const POD: [u8; 4] = [10, 77, 0, 2];
    const HOST: [u8; 4] = [10, 77, 0, 1];

    fn a(b: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&b);
        out
    }

    fn ip(b: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(b))
    }

    /// A server (pid 30) on 10.77.0.2:8080 in a pod namespace, a client
    /// (pid 40) on the node connected from port 40000.
    fn snap() -> Snapshot {
        let sock = |local, lp, remote, rp, state, inode| SocketEntry {
            local,
            local_port: lp,
            remote,
            remote_port: rp,
            state,
            inode,
        };
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Snapshot {
            netns: vec![
                Netns {
                    id: 1,
                    sockets: vec![sock(ip(HOST), 40000, ip(POD), 8080, TCP_ESTABLISHED, 4)],
                    // An unconnected UDP client socket.
                    udp: vec![sock(any, 40001, any, 0, 7, 6)],
                    local_addrs: vec![ip(HOST)],
                    pids: vec![1, 40],
                },
                Netns {
                    id: 2,
                    sockets: vec![
                        sock(any, 8080, any, 0, TCP_LISTEN, 3),
                        sock(ip(POD), 8080, ip(HOST), 40000, TCP_ESTABLISHED, 5),
                    ],
                    // A UDP server on the wildcard address.
                    udp: vec![sock(any, 8080, any, 0, 7, 7)],
                    local_addrs: vec![ip(POD)],
                    pids: vec![29, 30],
                },
            ],
            inode_pid: HashMap::from([(3, 30), (4, 40), (5, 30), (6, 40), (7, 30)]),
            root_netns: 1,
        }
    }

    fn key(metric: u8, dir: u8, tgid: u32, local: [u8; 4], remote: [u8; 4]) -> AggKey {
        AggKey {
            tgid,
            server_port: 8080,
            metric,
            direction: dir,
            family: FAMILY_V4,
            local: a(local),
            remote: a(remote),
            ..AggKey::default()
        }
    }

    #[test]
    fn both_ends_of_a_connection() {
        let s = snap();
        let client = attribute_agg(
            &key(metric::HANDSHAKE, direction::CLIENT, 40, HOST, POD),
            &s,
        );
        assert_eq!(
            client,
            Some(Attribution {
                local: Some(40),
                direction: Some("client"),
                peer: Peer::Process(30),
                server_port: 8080
            })
        );
        let server = attribute_agg(&key(metric::HANDSHAKE, direction::SERVER, 0, POD, HOST), &s);
        assert_eq!(
            server,
            Some(Attribution {
                local: Some(30),
                direction: Some("server"),
                peer: Peer::Process(40),
                server_port: 8080
            })
        );
        // Unknown direction: the local listener decides.
        let rtt = attribute_agg(&key(metric::RTT, direction::UNKNOWN, 0, POD, HOST), &s);
        assert_eq!(rtt.and_then(|a| a.direction), Some("server"));
        let rtt = attribute_agg(&key(metric::RTT, direction::UNKNOWN, 0, HOST, POD), &s);
        assert_eq!(
            rtt.map(|a| (a.direction, a.local)),
            Some((Some("client"), Some(40)))
        );
        // A handshake to a remote server seen at TC is nobody's here.
        let remote = attribute_agg(
            &key(metric::HANDSHAKE, direction::SERVER, 0, [8, 8, 8, 8], HOST),
            &s,
        );
        assert_eq!(remote, None);
        // DNS from the pod's address: the pod's first process.
        let mut dns = key(metric::DNS, direction::CLIENT, 0, POD, [10, 77, 0, 53]);
        dns.server_port = 53;
        let d = attribute_agg(&dns, &s).unwrap();
        assert_eq!((d.local, d.direction), (Some(29), None));
        assert_eq!(d.peer, Peer::Addr(ip([10, 77, 0, 53])));
        // From the node's own address: unknown.
        dns.local = a(HOST);
        assert_eq!(attribute_agg(&dns, &s).unwrap().local, None);
    }

    #[test]
    fn flows_count_for_each_local_end() {
        let s = snap();
        let flow = FlowKey {
            family: FAMILY_V4,
            protocol: 6,
            local_port: 40000,
            remote_port: 8080,
            local: a(HOST),
            remote: a(POD),
            ..FlowKey::default()
        };
        let ends = attribute_flow(&flow, 0, &s);
        assert_eq!(ends.len(), 2);
        assert_eq!(ends[0].0.local, Some(30));
        assert!(!ends[0].1);
        assert_eq!(ends[1].0.local, Some(40));
        assert_eq!(ends[1].0.peer, Peer::Process(30));
        assert!(ends[1].1);
        // A flow between two remote hosts: nobody's.
        let routed = FlowKey {
            local: a([1, 1, 1, 1]),
            remote: a([2, 2, 2, 2]),
            ..flow
        };
        assert!(attribute_flow(&routed, 0, &s).is_empty());
        // UDP: both ends from the bound sockets (the client's unconnected,
        // the server's on the wildcard address).
        let udp = FlowKey {
            protocol: 17,
            local_port: 40001,
            ..flow
        };
        let ends = attribute_flow(&udp, 0, &s);
        assert_eq!(ends.len(), 2);
        assert_eq!(
            (ends[0].0.local, ends[0].0.peer),
            (Some(30), Peer::Process(40))
        );
        assert_eq!(
            (ends[1].0.local, ends[1].0.peer),
            (Some(40), Peer::Process(30))
        );
        // A TCP flow on the UDP ports is not theirs.
        let tcp = FlowKey {
            protocol: 6,
            local_port: 40001,
            ..flow
        };
        assert_eq!(attribute_flow(&tcp, 0, &s)[1].0.local, None);
    }
}
