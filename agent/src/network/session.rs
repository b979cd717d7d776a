//! The network session: a thread that every `flush_every` reads the
//! network programs' maps ([`NetCapture`]), attributes what changed to
//! workloads ([`crate::network::attribute`]) and hands the cumulative metrics
//! to a [`TraceSink`] (the embedded collector), and every `rescan_every`
//! hooks new interfaces and forgets removed ones.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fathom_common::net::{AggKey, DnsKey, FlowKey, Hist, NetCounter, metric};

use super::{
    NetMetrics, NetMetricsConfig, Series, Snapshot,
    attribute::{Attribution, Peer, addr, attribute_agg, attribute_flow},
    capture::{FlowSeen, NetCapture, NetCaptureConfig, NetCaptureError, OwnersReader, flow_delta},
    hist::HistSum,
    metrics::{NetMetric, rcode_name},
};
use crate::{
    otlp::{ResourceInfo, unix_now_ns},
    process_meta::ProcessMeta,
    sink::OtlpSink,
    stop::{Stop, StoppableThread},
    sys,
};

/// Configuration of the network metrics.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub capture: NetCaptureConfig,
    pub metrics: NetMetricsConfig,
    /// How often the maps are read and metrics delivered.
    pub flush_every: Duration,
    /// How often interfaces are listed (new ones hooked, gone ones
    /// forgotten).
    pub rescan_every: Duration,
    /// A DNS query unanswered this long counts as `timeout`.
    pub dns_timeout: Duration,
    /// A kernel key unchanged this long leaves the kernel's maps (its sums
    /// stay in the series), so keys of clients long gone make room.
    pub idle_key: Duration,
    /// Flushes a key stays unattributed (its process not found yet) before
    /// it is counted as `unknown`.
    pub attribution_tries: u32,
    pub proc_root: PathBuf,
    /// `host.name` on every resource.
    pub node: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            capture: NetCaptureConfig::default(),
            metrics: NetMetricsConfig::default(),
            flush_every: Duration::from_secs(1),
            rescan_every: Duration::from_secs(2),
            dns_timeout: Duration::from_secs(5),
            attribution_tries: 3,
            idle_key: Duration::from_secs(300),
            proc_root: PathBuf::from("/proc"),
            node: crate::otlp::node_name(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Capture(#[from] NetCaptureError),
    #[error("starting the network thread: {0}")]
    Thread(std::io::Error),
}

/// The running network thread. Dropping it stops the thread (after a last
/// flush) and detaches the programs.
pub struct NetSession {
    thread: StoppableThread,
    connections: Option<OwnersReader>,
}

impl NetSession {
    pub fn start(config: NetConfig, sink: Box<dyn OtlpSink>) -> Result<Self, NetError> {
        let mut capture = NetCapture::start(&config.capture)?;
        let hooked = capture.sync_interfaces();
        let connections = capture
            .owners_reader()
            .inspect_err(|e| tracing::warn!(error = %e, "HTTP spans go without connect times"))
            .ok();
        tracing::info!(interfaces = ?hooked, "network metrics attached");
        let thread = StoppableThread::spawn("fathom-net", "network", move |stop| {
            Worker::new(config, capture, sink).run(&stop)
        })
        .map_err(NetError::Thread)?;
        Ok(Self {
            thread,
            connections,
        })
    }

    /// A reader of the kernel's per-connection state for the tracing
    /// session (`fathom.tcp.connect_us` on client spans); once.
    pub fn take_connections(&mut self) -> Option<OwnersReader> {
        self.connections.take()
    }
}

impl NetSession {
    /// Stops the thread (after a last flush) and detaches the programs;
    /// false when the thread did not end by `deadline` (it is left behind).
    pub fn stop(self, deadline: Instant) -> bool {
        self.thread.stop(deadline)
    }
}

struct Worker {
    config: NetConfig,
    capture: NetCapture,
    sink: Box<dyn OtlpSink>,
    metrics: NetMetrics,
    last_hists: HashMap<AggKey, Hist>,
    last_counts: HashMap<AggKey, u64>,
    last_flows: HashMap<FlowKey, FlowSeen>,
    /// When each kernel key last changed.
    changed: HashMap<AggKey, Instant>,
    /// Keys attributed (or given up on: local `None`).
    agg_owner: HashMap<AggKey, Option<Attribution>>,
    flow_owner: HashMap<FlowKey, Vec<(Attribution, bool)>>,
    tries: HashMap<AggKey, u32>,
    flow_tries: HashMap<FlowKey, u32>,
    resources: HashMap<u32, Option<ResourceInfo>>,
    snapshot: Option<Snapshot>,
    undelivered: u64,
    not_local: u64,
}

impl Worker {
    fn new(config: NetConfig, capture: NetCapture, sink: Box<dyn OtlpSink>) -> Self {
        Self {
            metrics: NetMetrics::new(config.metrics.clone(), unix_now_ns()),
            config,
            capture,
            sink,
            last_hists: HashMap::new(),
            last_counts: HashMap::new(),
            last_flows: HashMap::new(),
            changed: HashMap::new(),
            agg_owner: HashMap::new(),
            flow_owner: HashMap::new(),
            tries: HashMap::new(),
            flow_tries: HashMap::new(),
            resources: HashMap::new(),
            snapshot: None,
            undelivered: 0,
            not_local: 0,
        }
    }

    fn run(mut self, stop: &Stop) {
        let mut next_flush = Instant::now() + self.config.flush_every;
        let mut next_scan = Instant::now() + self.config.rescan_every;
        let mut next_log = Instant::now() + Duration::from_secs(10);
        let mut next_prime = Instant::now();
        loop {
            if stop.is_triggered() {
                self.flush();
                self.log_stats();
                break;
            }
            let now = Instant::now();
            if now >= next_flush {
                self.flush();
                next_flush = now + self.config.flush_every;
            }
            if now >= next_prime {
                self.prime_resources();
                next_prime = now + Duration::from_millis(200);
            }
            if now >= next_scan {
                self.capture.sync_interfaces();
                next_scan = now + self.config.rescan_every;
            }
            if now >= next_log {
                self.log_stats();
                next_log = now + Duration::from_secs(10);
            }
            // Until the next task, or a stop.
            let next = next_flush.min(next_prime).min(next_scan).min(next_log);
            stop.wait(next.saturating_duration_since(Instant::now()));
        }
    }

    /// Reads the metadata of processes new in the kernel's keys while they
    /// run (a short-lived client may be gone by the next flush).
    fn prime_resources(&mut self) {
        for tgid in self.capture.key_tgids() {
            if !self.resources.contains_key(&tgid) {
                self.resource(Some(tgid));
            }
        }
    }

    fn snapshot(&mut self) -> &Snapshot {
        let root = self.config.proc_root.clone();
        self.snapshot.get_or_insert_with(|| Snapshot::read(&root))
    }

    /// The resource of a local process (`unknown` when none or gone).
    fn resource(&mut self, pid: Option<u32>) -> ResourceInfo {
        let node = self.config.node.clone();
        let root = self.config.proc_root.clone();
        let info = pid.and_then(|pid| {
            self.resources
                .entry(pid)
                .or_insert_with(|| {
                    // The same resource as the process's spans (service
                    // name rule, container, pod), without the pid: series
                    // are per workload.
                    ProcessMeta::read(&root, pid).map(|m| ResourceInfo {
                        pid: None,
                        ..crate::process_meta::process_resource(Some(&m), pid, &node)
                    })
                })
                .clone()
        });
        info.unwrap_or_else(|| ResourceInfo {
            service_name: "unknown".into(),
            extra: vec![("host.name".into(), node)],
            ..ResourceInfo::default()
        })
    }

    fn peer_name(&mut self, peer: Peer) -> String {
        match peer {
            Peer::Addr(a) => a.to_string(),
            // A process gone before it was named is `unknown`.
            Peer::Process(pid) => self.resource(Some(pid)).service_name,
        }
    }

    /// The attribution of a key, `None` while it is worth waiting for its
    /// process to show up in the socket tables; `Some(None)` when it is not
    /// a local workload's.
    fn attribution(&mut self, key: &AggKey) -> Option<Option<Attribution>> {
        if let Some(a) = self.agg_owner.get(key) {
            return Some(*a);
        }
        let a = attribute_agg(key, self.snapshot());
        let tries = self.tries.entry(*key).or_insert(0);
        *tries += 1;
        let settled = match a {
            None => true,
            Some(a) => a.local.is_some() || *tries >= self.config.attribution_tries,
        };
        if settled {
            self.tries.remove(key);
            self.agg_owner.insert(*key, a);
            Some(a)
        } else {
            None
        }
    }

    fn series(&mut self, m: NetMetric, a: &Attribution, key: &AggKey) -> Series {
        let peer = self.peer_name(a.peer);
        Series {
            direction: a.direction,
            server_port: (m != NetMetric::Dns).then_some(a.server_port),
            rcode: (m == NetMetric::Dns).then(|| rcode_name(key.rcode)),
            ..Series::new(m, peer)
        }
    }

    fn flush(&mut self) {
        self.snapshot = None;
        for (key, hist) in self.capture.hists() {
            let before = self.last_hists.get(&key);
            if before.is_some_and(|b| b.count == hist.count) {
                continue;
            }
            let Some(owner) = self.attribution(&key) else {
                continue;
            };
            let before = self.last_hists.get(&key).copied();
            self.last_hists.insert(key, hist);
            self.changed.insert(key, Instant::now());
            let Some(a) = owner else {
                self.not_local += 1;
                continue;
            };
            let m = match key.metric {
                metric::HANDSHAKE => NetMetric::Handshake,
                metric::RTT => NetMetric::Rtt,
                metric::DNS => NetMetric::Dns,
                _ => continue,
            };
            let mut delta = HistSum::default();
            delta.add_delta(&hist, before.as_ref());
            let resource = self.resource(a.local);
            let series = self.series(m, &a, &key);
            self.metrics.add_hist(&resource, series, &delta);
        }
        for (key, n) in self.capture.counts() {
            let before = self.last_counts.get(&key).copied();
            if before == Some(n) {
                continue;
            }
            let Some(owner) = self.attribution(&key) else {
                continue;
            };
            self.last_counts.insert(key, n);
            self.changed.insert(key, Instant::now());
            let Some(a) = owner else {
                self.not_local += 1;
                continue;
            };
            let m = match key.metric {
                metric::RETRANSMITS => NetMetric::Retransmits,
                metric::CONNECT_FAILURES => NetMetric::ConnectFailures,
                _ => continue,
            };
            let delta = match before {
                Some(b) if n >= b => n - b,
                _ => n,
            };
            let resource = self.resource(a.local);
            let mut series = self.series(m, &a, &key);
            if m == NetMetric::ConnectFailures {
                series.direction = None;
            }
            self.metrics.add_count(&resource, series, delta);
        }
        self.flush_flows();
        self.flush_dns();
        self.forget_exited();
        if self.metrics.series() > 0 && !self.sink.metrics(self.metrics.export(unix_now_ns())) {
            self.undelivered += 1;
        }
    }

    fn flush_flows(&mut self) {
        let flows = self.capture.flows();
        let present: HashSet<FlowKey> = flows.iter().map(|r| r.key).collect();
        for read in flows {
            let key = read.key;
            let stats = read.stored;
            let (d, seen) = flow_delta(self.last_flows.get(&key), &read);
            if d[1] == 0 && d[3] == 0 {
                continue;
            }
            if !self.flow_owner.contains_key(&key) {
                let ends = attribute_flow(&key, stats.client_tgid, self.snapshot());
                let tries = self.flow_tries.entry(key).or_insert(0);
                *tries += 1;
                let settled = ends.iter().all(|(a, _)| a.local.is_some())
                    || *tries >= self.config.attribution_tries;
                if !settled {
                    continue;
                }
                self.flow_tries.remove(&key);
                self.flow_owner.insert(key, ends);
            }
            self.last_flows.insert(key, seen);
            let ends = self.flow_owner.get(&key).cloned().unwrap_or_default();
            for (a, c2s_is_transmit) in ends {
                let resource = self.resource(a.local);
                let peer = self.peer_name(a.peer);
                for (m, c2s, s2c) in [
                    (NetMetric::Bytes, d[0], d[2]),
                    (NetMetric::Packets, d[1], d[3]),
                ] {
                    let (tx, rx) = if c2s_is_transmit {
                        (c2s, s2c)
                    } else {
                        (s2c, c2s)
                    };
                    for (io, n) in [("transmit", tx), ("receive", rx)] {
                        let series = Series {
                            direction: a.direction,
                            server_port: Some(a.server_port),
                            io_direction: Some(io),
                            ..Series::new(m, peer.clone())
                        };
                        self.metrics.add_count(&resource, series, n);
                    }
                }
            }
        }
        self.last_flows.retain(|k, _| present.contains(k));
        self.flow_owner.retain(|k, _| present.contains(k));
        self.flow_tries.retain(|k, _| present.contains(k));
    }

    /// Queries unanswered for `dns_timeout` count as `timeout`.
    fn flush_dns(&mut self) {
        let now = sys::monotonic_ns();
        let timeout = self.config.dns_timeout.as_nanos() as u64;
        let expired: Vec<(DnsKey, u64)> = self
            .capture
            .dns_pending()
            .into_iter()
            .filter(|(_, start)| now.saturating_sub(*start) >= timeout)
            .collect();
        for (key, start) in expired {
            self.capture.forget_dns(&key);
            let client = addr(key.family, &key.client);
            let server = addr(key.family, &key.server);
            let local = self.snapshot().namespace_process(client);
            let resource = self.resource(local);
            let mut h = HistSum::default();
            h.observe(now.saturating_sub(start));
            let series = Series {
                rcode: Some("timeout".into()),
                ..Series::new(NetMetric::Dns, server.to_string())
            };
            self.metrics.add_hist(&resource, series, &h);
        }
    }

    /// Keys of processes that exited, and keys idle for `idle_key`, leave
    /// the kernel's maps (their sums stay here).
    fn forget_exited(&mut self) {
        let root = self.config.proc_root.clone();
        let idle = self.config.idle_key;
        let changed = &self.changed;
        let gone: Vec<AggKey> = self
            .last_hists
            .keys()
            .chain(self.last_counts.keys())
            .filter(|k| {
                (k.tgid != 0 && !Path::new(&root).join(k.tgid.to_string()).exists())
                    || changed.get(k).is_none_or(|t| t.elapsed() >= idle)
            })
            .copied()
            .collect();
        if gone.is_empty() {
            return;
        }
        self.capture.forget_keys(&gone);
        for k in &gone {
            self.last_hists.remove(k);
            self.last_counts.remove(k);
            self.agg_owner.remove(k);
            self.changed.remove(k);
            if k.tgid != 0 {
                self.resources.remove(&k.tgid);
            }
        }
    }

    fn log_stats(&self) {
        let k = self.capture.counters();
        tracing::info!(
            series = self.metrics.series(),
            overflowed = self.metrics.overflowed(),
            dropped = self.metrics.dropped(),
            undelivered_metric_batches = self.undelivered,
            not_local = self.not_local,
            kernel_keys_full = k[NetCounter::AggFull as usize],
            kernel_no_owner = k[NetCounter::NoOwner as usize],
            kernel_packets = self.capture.tc_packets(),
            "network metrics"
        );
    }
}
