//! What one signal may learn from another without depending on it: the
//! network signal's per-connection state, looked up by the tracing signal
//! for client spans' connect times. The daemon wires the two together.
use std::net::{IpAddr, SocketAddr};

use fathom_common::net::{FAMILY_V4, FAMILY_V6, FlowKey};

/// What another signal knows of a TCP connection, for HTTP spans: the
/// network signal's per-connection state (`crate::network::capture::OwnersReader`),
/// or nothing ([`NoConnections`]) when it does not run.
pub trait ConnectionLookup: Send {
    /// The connect's SYN → ESTABLISHED time of the connection whose local
    /// end sees `key` (client connections), nanoseconds.
    fn connect_ns(&self, key: &FlowKey) -> Option<u64>;
}

/// No network signal: spans carry no connect time.
pub struct NoConnections;

impl ConnectionLookup for NoConnections {
    fn connect_ns(&self, _key: &FlowKey) -> Option<u64> {
        None
    }
}

/// The network signal's key of a TCP connection as its local end sees it:
/// IPv4-mapped IPv6 addresses as IPv4 (as the network programs key them);
/// `None` when the two ends are of different families.
pub fn tcp_flow_key(local: SocketAddr, peer: SocketAddr) -> Option<FlowKey> {
    let (family, local_ip, remote_ip) = match (local.ip().to_canonical(), peer.ip().to_canonical())
    {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
            a[..4].copy_from_slice(&l.octets());
            b[..4].copy_from_slice(&r.octets());
            (FAMILY_V4, a, b)
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => (FAMILY_V6, l.octets(), r.octets()),
        _ => return None,
    };
    Some(FlowKey {
        family,
        protocol: 6,
        local_port: local.port(),
        remote_port: peer.port(),
        _pad: 0,
        local: local_ip,
        remote: remote_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_keys_as_the_network_programs_key_them() {
        let k = tcp_flow_key(
            "10.1.2.3:40000".parse().unwrap(),
            "10.9.8.7:80".parse().unwrap(),
        )
        .unwrap();
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[10, 1, 2, 3]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 9, 8, 7]);
        let want = FlowKey {
            family: FAMILY_V4,
            protocol: 6,
            local_port: 40000,
            remote_port: 80,
            _pad: 0,
            local,
            remote,
        };
        assert_eq!(k, want);
        // A dual-stack socket talking IPv4: keyed as IPv4.
        let mapped = tcp_flow_key(
            "[::ffff:10.1.2.3]:40000".parse().unwrap(),
            "[::ffff:10.9.8.7]:80".parse().unwrap(),
        );
        assert_eq!(mapped, Some(want));
        let v6 = tcp_flow_key(
            "[fd00::1]:5".parse().unwrap(),
            "[fd00::2]:6".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(v6.family, FAMILY_V6);
        assert_eq!(
            v6.local,
            "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(
            tcp_flow_key(
                "[fd00::1]:5".parse().unwrap(),
                "10.0.0.1:6".parse().unwrap()
            ),
            None
        );
        assert_eq!(NoConnections.connect_ns(&want), None);
    }
}
