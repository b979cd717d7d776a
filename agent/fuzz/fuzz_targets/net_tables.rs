//! The network attribution's `/proc` parsers (`agent/src/network/sockets.rs`:
//! `net/tcp{,6}`, `net/fib_trie`, `net/if_inet6`) on arbitrary text, and
//! lookups in a snapshot built from what they parsed; the histogram deltas
//! (`agent/src/network/hist.rs`) on arbitrary kernel values. The input is split
//! at the first two NUL bytes: tcp table, fib_trie, if_inet6. Nothing may
//! panic.
#![no_main]

#[path = "../../src/network/hist.rs"]
#[allow(dead_code)]
mod hist;
#[path = "../../src/network/sockets.rs"]
#[allow(dead_code)]
mod sockets;

use std::{collections::HashMap, net::IpAddr};

use fathom_common::net::{HIST_BUCKETS, Hist, dns_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let tcp = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let fib = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let inet6 = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let sockets = sockets::parse_tcp_table(&tcp);
    let mut local_addrs = sockets::parse_fib_trie_locals(&fib);
    local_addrs.extend(sockets::parse_if_inet6(&inet6));
    let inode_pid: HashMap<u64, u32> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| (s.inode, i as u32 + 1))
        .collect();
    let snap = sockets::Snapshot {
        netns: vec![sockets::Netns {
            id: 2,
            sockets: sockets.clone(),
            udp: sockets.clone(),
            local_addrs: local_addrs.clone(),
            pids: vec![1],
        }],
        inode_pid,
        root_netns: 1,
    };
    for s in sockets.iter().take(16) {
        let _ = snap.server(s.local, s.local_port);
        let _ = snap.connection(s.local, Some(s.local_port), s.remote, s.remote_port);
        let _ = snap.connection(s.remote, None, s.local, s.local_port);
    }
    for a in local_addrs.iter().take(16) {
        let _ = snap.namespace_process(*a);
        assert!(snap.is_local(*a));
    }
    let _ = snap.is_local(IpAddr::from([0u8; 4]));
    let _ = dns_header(data);

    // Two kernel reads of one histogram, from the input's bytes.
    let mut words = data
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
    let mut read = || {
        let mut h = Hist::default();
        h.count = words.next().unwrap_or(0);
        h.sum_ns = words.next().unwrap_or(0) >> 8;
        for b in h.buckets.iter_mut().take(HIST_BUCKETS).step_by(17) {
            *b = words.next().unwrap_or(0) >> 8;
        }
        h
    };
    let (a, b) = (read(), read());
    let mut sum = hist::HistSum::default();
    sum.add_delta(&a, None);
    sum.add_delta(&b, Some(&a));
    assert!(sum.buckets.len() == HIST_BUCKETS);
});
