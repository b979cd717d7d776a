//! The tracing session: a thread that drains the HTTP capture's events into
//! the [`HttpTracer`], and every `flush_every` hands finished spans (OTLP
//! traces) and the RED metrics (OTLP metrics) to a [`TraceSink`].
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fathom_collector::EncodedSpans;
use fathom_common::{
    http::{HttpCounter, role},
    net::FlowKey,
};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use super::{
    HttpMetrics, HttpTracer, MetricsConfig, TracerConfig,
    capture::{HttpCapture, HttpCaptureConfig, HttpCaptureError, HttpEvent},
    inject::InjectError,
    otlp::SpanEncoder,
    spans::sock_addr,
};
use crate::{
    connections::{ConnectionLookup, NoConnections, tcp_flow_key},
    otlp::{ResourceInfo, unix_now_ns},
    process_meta::{
        KernelProcess, ProcessMeta, container_of_cgroup_id, local_port, process_resource,
    },
    sink::OtlpSink,
    stop::{Stop, StoppableThread},
    sys,
};

/// Cgroup ids seen of gone processes, at most (their containers are
/// remembered: one walk of the cgroup tree per cgroup, not per process).
const CGROUP_CONTAINERS_MAX: usize = 4096;

/// Where a gone process's container is looked up: the cgroup v2 mount,
/// and the cgroup v1 hierarchy the kernel reads a cgroup of (hybrid hosts),
/// with the containers found, by (hierarchy, cgroup id).
#[derive(Default)]
struct CgroupContainers {
    v2: Option<PathBuf>,
    v1: Option<PathBuf>,
    known: HashMap<(bool, u64), Option<String>>,
}

impl CgroupContainers {
    fn new() -> Self {
        Self {
            v2: super::inject::cgroup2_root().ok(),
            v1: super::inject::cgroup1_root().map(|(_, root)| root),
            known: HashMap::new(),
        }
    }

    /// The container of a gone process from its cgroups: the v2 one, else
    /// the v1 one (a runtime on a hybrid host puts containers on v1
    /// hierarchies only).
    fn of(&mut self, k: &KernelProcess) -> Option<String> {
        let v2 = self.v2.clone();
        let v1 = self.v1.clone();
        v2.and_then(|root| self.walk(false, &root, k.cgroup_id))
            .or_else(|| v1.and_then(|root| self.walk(true, &root, k.cgroup1_id)))
    }

    /// The container of cgroup `id` under `root`, walked for once and
    /// remembered (the memory emptied when it is full).
    fn walk(&mut self, v1: bool, root: &Path, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(found) = self.known.get(&(v1, id)) {
            return found.clone();
        }
        if self.known.len() >= CGROUP_CONTAINERS_MAX {
            self.known.clear();
        }
        let found = container_of_cgroup_id(root, id);
        self.known.insert((v1, id), found.clone());
        found
    }
}

/// OpenTelemetry's `TraceIdRatioBased` decision: the trace id's last 8 bytes
/// (big-endian, shifted right by one) below `ratio` × 2⁶³.
pub fn trace_id_ratio_keeps(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    // 2^63 as f64 is exact; the product is below it.
    x < (ratio * 9_223_372_036_854_775_808.0) as u64
}

/// Finished spans that are delivered at once, without waiting for the timer.
const SPAN_BATCH: usize = 1024;

/// How long the reader sleeps between drains of the ring buffer (the
/// programs wake it only for new connections); a drain that took more than
/// [`BACKLOG_SHARE`] of the ring is followed by another at once.
const READ_INTERVAL: Duration = Duration::from_millis(10);
/// Share of the ring (1/N) that counts as a backlog.
const BACKLOG_SHARE: u64 = 8;

/// Configuration of HTTP tracing.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub capture: HttpCaptureConfig,
    pub tracer: TracerConfig,
    pub metrics: MetricsConfig,
    /// How often finished spans and the metrics are delivered.
    pub flush_every: Duration,
    /// `/proc`.
    pub proc_root: PathBuf,
    /// `host.name` on every resource.
    pub node: String,
    /// Share of traces whose spans are exported (RED metrics count every
    /// request): the OpenTelemetry `traceidratio` rule, so every agent (and
    /// any SDK with the same ratio) keeps the same traces.
    pub sample_ratio: f64,
    /// The profiler runs beside: server spans whose samples carry their id
    /// get `pyroscope.profile.id`.
    pub link_profiles: bool,
    /// Where the parent-rule counters go (`/metrics`).
    pub health: Option<crate::health::Health>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            capture: HttpCaptureConfig::default(),
            tracer: TracerConfig::default(),
            metrics: MetricsConfig::default(),
            flush_every: Duration::from_secs(1),
            proc_root: PathBuf::from("/proc"),
            node: crate::otlp::node_name(),
            sample_ratio: 1.0,
            link_profiles: false,
            health: None,
        }
    }
}

/// Spans and metrics that reached no one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Undelivered {
    span_batches: u64,
    metric_batches: u64,
}

/// The running tracing thread. Dropping it stops the thread (after a last
/// flush) and detaches the programs.
pub struct TraceSession {
    thread: StoppableThread,
    inject: bool,
    inject_failure: Option<String>,
    /// With `inject`: whether every request of a kept-alive connection is
    /// injected, and why not when that was asked for.
    keep_alive: bool,
    keep_alive_failure: Option<String>,
    serving: Option<std::os::fd::OwnedFd>,
}

impl TraceSession {
    /// How tracing runs: `capture+inject` or `capture`, and why injection
    /// is off when it was asked for and could not attach.
    pub fn mode(&self) -> (&'static str, Option<&str>) {
        let mode = if self.inject {
            "capture+inject"
        } else {
            "capture"
        };
        (mode, self.inject_failure.as_deref())
    }

    /// Which requests get a `traceparent`: every request of a connection,
    /// or only its first (and why, when every request was asked for).
    /// `None` without injection.
    pub fn inject_scope(&self) -> Option<(&'static str, Option<&str>)> {
        let scope = if self.keep_alive {
            ("every request", None)
        } else {
            (
                "the first request of each connection",
                self.keep_alive_failure.as_deref(),
            )
        };
        self.inject.then_some(scope)
    }

    /// Loads and attaches the capture (and `traceparent` injection when
    /// configured), then starts the thread.
    pub fn start(config: TraceConfig, sink: Box<dyn OtlpSink>) -> Result<Self, TraceError> {
        Self::start_with(config, sink, Box::new(NoConnections))
    }

    /// [`Self::start`], with client spans' connect times from `connections`
    /// (looked up once per connection, at its first data).
    pub fn start_with(
        config: TraceConfig,
        sink: Box<dyn OtlpSink>,
        connections: Box<dyn ConnectionLookup>,
    ) -> Result<Self, TraceError> {
        let mut capture = HttpCapture::start(&config.capture)?;
        // Injection that cannot attach (a kernel that rejects its programs,
        // no cgroup v2) leaves the capture running without it.
        let (injection, inject_failure) = if config.capture.inject {
            match super::inject::attach(capture.ebpf_mut(), config.capture.inject_keep_alive) {
                Ok(injection) => (Some(injection), None),
                Err(e) => {
                    tracing::warn!(
                        "tracing degraded: spans are captured, but no traceparent is inserted \
                         into outgoing requests, because injection could not attach: {e}"
                    );
                    (None, Some(e.to_string()))
                }
            }
        } else {
            (None, None)
        };
        let inject = injection.is_some();
        let keep_alive = injection.as_ref().is_some_and(|i| i.keep_alive());
        let keep_alive_failure = injection
            .as_ref()
            .and_then(|i| i.keep_alive_failure().map(str::to_string));
        let serving = capture.serving_map();
        let thread = StoppableThread::spawn("fathom-traces", "traces", move |stop| {
            Worker::new(config, capture, sink, connections).run(&stop);
            // Injection detaches after the capture's last events were read.
            drop(injection);
        })
        .map_err(TraceError::Thread)?;
        tracing::info!(inject, keep_alive, "http tracing attached");
        Ok(Self {
            thread,
            inject,
            inject_failure,
            keep_alive,
            keep_alive_failure,
            serving,
        })
    }
}

impl TraceSession {
    /// The kernel's map of which thread serves which server span, for the
    /// profiler to share (once).
    pub fn take_serving_map(&mut self) -> Option<std::os::fd::OwnedFd> {
        self.serving.take()
    }

    /// Stops the thread (after a last flush) and detaches the programs;
    /// false when the thread did not end by `deadline` (it is left behind).
    pub fn stop(self, deadline: Instant) -> bool {
        self.thread.stop(deadline)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Capture(#[from] HttpCaptureError),
    #[error("traceparent injection (turn it off with --trace-inject false): {0}")]
    Inject(#[from] InjectError),
    #[error("starting the tracing thread: {0}")]
    Thread(std::io::Error),
}

struct Worker {
    config: TraceConfig,
    /// Taken out while it is being read ([`Worker::drain`]).
    capture: Option<HttpCapture>,
    sink: Box<dyn OtlpSink>,
    tracer: HttpTracer,
    metrics: HttpMetrics,
    resources: HashMap<u32, ResourceInfo>,
    /// What was read of each process, for the resources still waiting for
    /// their pod (a container the metadata does not know yet).
    metas: HashMap<u32, ProcessMeta>,
    /// Processes in a container whose resource has no pod yet.
    unresolved: HashSet<u32>,
    /// Processes that exited: forgotten after the next flush (their last
    /// spans still need their resource).
    exited: Vec<u32>,
    /// Open sockets per process, to clear the kernel's table when a process
    /// exits without closing them.
    open: HashMap<u32, HashSet<u32>>,
    /// Local port of (process, listening fd).
    ports: HashMap<(u32, u32), Option<u16>>,
    connections: Box<dyn ConnectionLookup>,
    /// Client connections whose connect time is looked up at their first
    /// data event (conn id → key).
    connect_pending: HashMap<u64, (u32, FlowKey)>,
    malformed: u64,
    undelivered: Undelivered,
    spans_delivered: u64,
    spans_sampled_out: u64,
    /// Spans to OTLP bytes, its buffers kept from one flush to the next.
    encoder: SpanEncoder,
    /// Processes first seen in this drain: their executables are looked at
    /// for Go after it.
    new_processes: Vec<u32>,
    /// Where a gone process's container is found from its cgroup ids.
    cgroups: CgroupContainers,
}

impl Worker {
    fn new(
        config: TraceConfig,
        capture: HttpCapture,
        sink: Box<dyn OtlpSink>,
        connections: Box<dyn ConnectionLookup>,
    ) -> Self {
        let encoder = if config.link_profiles {
            SpanEncoder::linking_profiles()
        } else {
            SpanEncoder::default()
        };
        Self {
            tracer: HttpTracer::new(config.tracer.clone()),
            metrics: HttpMetrics::new(config.metrics.clone(), unix_now_ns()),
            config,
            capture: Some(capture),
            sink,
            encoder,
            resources: HashMap::new(),
            metas: HashMap::new(),
            unresolved: HashSet::new(),
            exited: Vec::new(),
            open: HashMap::new(),
            ports: HashMap::new(),
            connections,
            connect_pending: HashMap::new(),
            malformed: 0,
            undelivered: Undelivered::default(),
            spans_delivered: 0,
            spans_sampled_out: 0,
            new_processes: Vec::new(),
            cgroups: CgroupContainers::new(),
        }
    }

    fn run(mut self, stop: &Stop) {
        let mut next_flush = Instant::now() + self.config.flush_every;
        let mut next_log = Instant::now() + Duration::from_secs(10);
        loop {
            let stopping = stop.is_triggered();
            let drained = self.drain();
            // Spans leave in batches as they finish, not only on the timer:
            // converting a second's worth at once (tens of thousands under
            // load) stalled the ring buffer's reader long enough for the
            // kernel to drop events.
            if self.tracer.finished_len() >= SPAN_BATCH {
                self.deliver_spans();
            }
            if stopping {
                self.flush();
                self.log_stats();
                break;
            }
            let now = Instant::now();
            if now >= next_flush {
                self.flush();
                next_flush = now + self.config.flush_every;
            }
            if now >= next_log {
                self.log_stats();
                next_log = now + Duration::from_secs(10);
            }
            if drained < u64::from(self.config.capture.ring_bytes) / BACKLOG_SHARE
                && let Some(capture) = &self.capture
                && let Err(e) = capture.wait(READ_INTERVAL)
            {
                tracing::error!(error = %e, "waiting for http events");
                std::thread::sleep(READ_INTERVAL);
            }
        }
    }

    /// Handles every queued event; returns the bytes read.
    fn drain(&mut self) -> u64 {
        // Events are handled as they are read, straight from the ring
        // buffer; what needs the capture itself (forgetting an exited
        // process's sockets) waits until the read is over.
        let Some(mut capture) = self.capture.take() else {
            return 0;
        };
        let mut exited = Vec::new();
        let drained = capture.read(|e| self.handle(e, &mut exited));
        for (tgid, fds) in exited {
            capture.forget(tgid, fds);
        }
        for pid in std::mem::take(&mut self.new_processes) {
            capture.discover(pid);
        }
        self.capture = Some(capture);
        self.malformed += drained.malformed;
        drained.bytes
    }

    /// Handles one event; an exited process's open sockets go to `exited`.
    fn handle(&mut self, event: HttpEvent<'_>, exited: &mut Vec<(u32, Vec<u32>)>) {
        match event {
            HttpEvent::Open(c) => {
                if !self.resources.contains_key(&c.tgid) {
                    self.new_processes.push(c.tgid);
                }
                self.resource(c.tgid);
                self.open.entry(c.tgid).or_default().insert(c.fd);
                self.tracer.on_conn_open(&c);
                let local = sock_addr(&c.local);
                if c.role == role::CLIENT
                    && let Some(key) = local
                        .zip(sock_addr(&c.peer))
                        .and_then(|(l, p)| tcp_flow_key(l, p))
                {
                    self.connect_pending.insert(c.conn_id, (c.tgid, key));
                }
                if c.role == role::SERVER && c.listen_fd != u32::MAX && local.is_none() {
                    let root = &self.config.proc_root;
                    let port = *self
                        .ports
                        .entry((c.tgid, c.listen_fd))
                        .or_insert_with(|| local_port(root, c.tgid, c.listen_fd));
                    if let Some(port) = port {
                        self.tracer.set_local_port(c.conn_id, port);
                    }
                }
            }
            HttpEvent::Data(d) => {
                self.resource(d.tgid);
                // Once per connection, at its first data: the handshake
                // is over by then (also for non-blocking connects).
                if let Some((_, key)) = self.connect_pending.remove(&d.conn_id)
                    && let Some(ns) = self.connections.connect_ns(&key)
                {
                    self.tracer.set_connect_us(d.conn_id, ns / 1000);
                }
                self.tracer.on_data(d);
            }
            HttpEvent::Process(p) => {
                // Ahead of the process's first `CONN_OPEN`: its resource is
                // read now, with what the kernel saw as the fallback.
                let kernel = KernelProcess {
                    cgroup1_id: p.cgroup1_id,
                    ..KernelProcess::new(p.comm(), p.cgroup_id, p.env())
                };
                if !self.resources.contains_key(&p.tgid) {
                    self.new_processes.push(p.tgid);
                }
                self.resource_with(p.tgid, Some(&kernel));
            }
            HttpEvent::Span(r) => {
                self.resource(r.tgid);
                if let Some((_, key)) = self.connect_pending.remove(&r.conn_id)
                    && let Some(ns) = self.connections.connect_ns(&key)
                {
                    self.tracer.set_connect_us(r.conn_id, ns / 1000);
                }
                self.tracer.on_span(&r);
            }
            HttpEvent::Close(c) => {
                if let Some(fds) = self.open.get_mut(&c.tgid) {
                    fds.remove(&c.fd);
                }
                self.connect_pending.remove(&c.conn_id);
                self.tracer.on_conn_close(&c);
            }
            HttpEvent::ProcessExit(c) => {
                if let Some(fds) = self.open.remove(&c.tgid) {
                    exited.push((c.tgid, fds.into_iter().collect()));
                }
                self.ports.retain(|(pid, _), _| *pid != c.tgid);
                self.connect_pending.retain(|_, (pid, _)| *pid != c.tgid);
                self.exited.push(c.tgid);
            }
        }
    }

    /// The resource of `pid`, read from /proc the first time it is seen
    /// (while it runs).
    fn resource(&mut self, pid: u32) -> &ResourceInfo {
        self.resource_with(pid, None)
    }

    /// [`Self::resource`], with what the kernel saw of the process at its
    /// first connection to fill in what `/proc` no longer has.
    fn resource_with(&mut self, pid: u32, kernel: Option<&KernelProcess>) -> &ResourceInfo {
        let root = &self.config.proc_root;
        let node = &self.config.node;
        let cgroups = &mut self.cgroups;
        let (metas, unresolved) = (&mut self.metas, &mut self.unresolved);
        self.resources.entry(pid).or_insert_with(|| {
            let meta = match (ProcessMeta::read(root, pid), kernel) {
                (Some(mut meta), Some(k)) => {
                    meta.complete_with(k);
                    Some(meta)
                }
                (None, Some(k)) => Some(ProcessMeta::from_kernel(pid, k, cgroups.of(k))),
                (meta, None) => meta,
            };
            let resource = process_resource(meta.as_ref(), pid, node);
            if let Some(meta) = meta
                && meta.container_id.is_some()
                && !resource.has_pod()
                && crate::k8s::installed()
            {
                unresolved.insert(pid);
                metas.insert(pid, meta);
            }
            resource
        })
    }

    /// Resources of processes in containers the pod metadata did not know
    /// when they were first seen: joined with their pod once it is known.
    fn resolve_pods(&mut self) {
        let node = &self.config.node;
        let (metas, resources) = (&mut self.metas, &mut self.resources);
        self.unresolved.retain(|pid| {
            let Some(meta) = metas.get(pid) else {
                return false;
            };
            let resource = process_resource(Some(meta), *pid, node);
            if !resource.has_pod() {
                return true;
            }
            resources.insert(*pid, resource);
            metas.remove(pid);
            false
        });
    }

    fn flush(&mut self) {
        if !self.unresolved.is_empty() {
            self.resolve_pods();
        }
        self.deliver_spans();
        if self.metrics.series() > 0 && !self.sink.metrics(self.metrics.export(unix_now_ns())) {
            self.undelivered.metric_batches += 1;
        }
        self.tracer.expire(sys::monotonic_ns());
        if let (Some(health), Some(capture)) = (&self.config.health, &self.capture) {
            health.set_metrics("traces", parent_metrics(&capture.counters()));
        }
        for pid in self.exited.drain(..) {
            self.resources.remove(&pid);
            self.metas.remove(&pid);
            self.unresolved.remove(&pid);
        }
    }

    /// Hands the finished spans to the sink (and records them in the RED
    /// metrics).
    fn deliver_spans(&mut self) {
        let mut spans = self.tracer.take_finished();
        if !spans.is_empty() {
            for span in &spans {
                self.resource(span.pid);
            }
            for span in &spans {
                if let Some(resource) = self.resources.get(&span.pid) {
                    self.metrics.record(resource, span);
                }
            }
            if self.config.sample_ratio < 1.0 {
                let before = spans.len();
                let ratio = self.config.sample_ratio;
                spans.retain(|s| trace_id_ratio_keeps(&s.trace_id, ratio));
                self.spans_sampled_out += (before - spans.len()) as u64;
                if spans.is_empty() {
                    return;
                }
            }
            let offset = unix_offset_ns();
            let resources = &self.resources;
            let bytes = self.encoder.request(
                &spans,
                |pid| resources.get(&pid).cloned().unwrap_or_default(),
                offset,
            );
            if self
                .sink
                .spans(EncodedSpans::new(bytes, spans.len() as u64))
            {
                self.spans_delivered += spans.len() as u64;
            } else {
                self.undelivered.span_batches += 1;
            }
        }
    }

    fn log_stats(&self) {
        let kernel = self
            .capture
            .as_ref()
            .map(HttpCapture::counters)
            .unwrap_or_default();
        let stats = self.tracer.stats();
        let k = |c: HttpCounter| kernel[c as usize];
        tracing::info!(
            spans = self.spans_delivered,
            spans_sampled_out = self.spans_sampled_out,
            undelivered_span_batches = self.undelivered.span_batches,
            undelivered_metric_batches = self.undelivered.metric_batches,
            conns = stats.conns,
            pending = stats.pending,
            requests_unanswered = stats.requests_unanswered,
            responses_dropped = stats.responses_dropped,
            bad_chunk = stats.bad_chunk,
            bad_head = stats.bad_head,
            resync = stats.resync,
            incomplete = stats.incomplete,
            not_captured = stats.not_captured,
            heads_truncated = stats.heads_truncated,
            kernel_events = k(HttpCounter::DataEvents),
            kernel_events_lost = k(HttpCounter::EventsLost),
            kernel_conns_full = k(HttpCounter::ConnsFull),
            injected = k(HttpCounter::Injected),
            parent_rewritten = k(HttpCounter::ParentRewritten),
            sockets_released = k(HttpCounter::SocketsReleased),
            late_parents = k(HttpCounter::LateParents),
            parent_goroutine = k(HttpCounter::ParentGoroutine),
            parent_thread = k(HttpCounter::ParentThread),
            parent_guessed = k(HttpCounter::ParentGuessed),
            parent_missed = k(HttpCounter::ParentMissed),
            inject_failed = k(HttpCounter::InjectFailed),
            kernel_paired = k(HttpCounter::SpansPaired),
            kernel_streamed = k(HttpCounter::PairStreamed),
            kernel_pair_aborted = k(HttpCounter::PairAborted),
            paired = stats.paired,
            paired_malformed = stats.paired_malformed,
            malformed = self.malformed,
            "http tracing"
        );
    }
}

/// `/metrics` lines of how client requests got their parent (kernel
/// counters, since the programs were loaded).
pub fn parent_metrics(kernel: &[u64]) -> String {
    let mut out = String::from(
        "# HELP fathom_agent_trace_parent_total Client requests sent while their process \
         served requests, by how their parent span was chosen: goroutine (Go), thread (the \
         thread served one request), guessed (several open; the one just read), missed (none \
         could be told: sent as a new trace).\n\
         # TYPE fathom_agent_trace_parent_total counter\n",
    );
    for (rule, counter) in [
        ("goroutine", HttpCounter::ParentGoroutine),
        ("thread", HttpCounter::ParentThread),
        ("guessed", HttpCounter::ParentGuessed),
        ("missed", HttpCounter::ParentMissed),
    ] {
        let n = kernel.get(counter as usize).copied().unwrap_or(0);
        out.push_str(&format!(
            "fathom_agent_trace_parent_total{{rule=\"{rule}\"}} {n}\n"
        ));
    }
    out
}

/// Unix time minus CLOCK_MONOTONIC (the kernel's `bpf_ktime_get_ns`).
fn unix_offset_ns() -> i64 {
    unix_now_ns() as i64 - sys::monotonic_ns() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(low: u64) -> [u8; 16] {
        let mut t = [0xab; 16];
        t[8..].copy_from_slice(&low.to_be_bytes());
        t
    }

    #[test]
    fn a_cgroups_container_is_walked_for_once_v2_then_v1() {
        use std::os::unix::fs::MetadataExt as _;
        let (v2, v1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (id, id1) = ("ab".repeat(32), "cd".repeat(32));
        let scope = v2.path().join(format!("docker-{id}.scope"));
        std::fs::create_dir(&scope).unwrap();
        let ino = std::fs::metadata(&scope).unwrap().ino();
        // v1 (cgroupfs driver): docker/<id>, the v2 cgroup naming none.
        let docker1 = v1.path().join("docker").join(&id1);
        std::fs::create_dir_all(&docker1).unwrap();
        let ino1 = std::fs::metadata(&docker1).unwrap().ino();
        let plain = v2.path().join("user.slice");
        std::fs::create_dir(&plain).unwrap();
        let plain_ino = std::fs::metadata(&plain).unwrap().ino();
        let mut c = CgroupContainers {
            v2: Some(v2.path().to_path_buf()),
            v1: Some(v1.path().to_path_buf()),
            known: HashMap::new(),
        };
        let k = |cgroup_id, cgroup1_id| KernelProcess {
            cgroup_id,
            cgroup1_id,
            ..KernelProcess::default()
        };
        assert_eq!(c.of(&k(ino, 0)), Some(id.clone()));
        assert_eq!(c.of(&k(plain_ino, ino1)), Some(id1.clone()));
        assert_eq!(c.of(&k(plain_ino, 0)), None);
        // Remembered: found again without the directories.
        std::fs::remove_dir(&scope).unwrap();
        std::fs::remove_dir(&docker1).unwrap();
        assert_eq!(c.of(&k(ino, 0)), Some(id));
        assert_eq!(c.of(&k(plain_ino, ino1)), Some(id1));
        // Ids of the two hierarchies are apart: a v1 id is not looked up
        // in the v2 memory.
        assert_eq!(c.known.get(&(true, ino)), None);
        assert_eq!(c.known.len(), 3);
        // No hierarchy: nothing found, nothing walked.
        let mut none = CgroupContainers::default();
        assert_eq!(none.of(&k(ino, ino1)), None);
    }

    #[test]
    fn parent_rules_as_prometheus_counters() {
        let mut kernel = vec![0u64; HttpCounter::COUNT as usize];
        kernel[HttpCounter::ParentGoroutine as usize] = 240;
        kernel[HttpCounter::ParentGuessed as usize] = 7;
        let text = parent_metrics(&kernel);
        assert!(text.contains("# TYPE fathom_agent_trace_parent_total counter\n"));
        assert!(text.contains("fathom_agent_trace_parent_total{rule=\"goroutine\"} 240\n"));
        assert!(text.contains("fathom_agent_trace_parent_total{rule=\"guessed\"} 7\n"));
        assert!(text.contains("fathom_agent_trace_parent_total{rule=\"missed\"} 0\n"));
        // A short counter array (older programs) reads as zeros.
        assert!(parent_metrics(&[]).contains("{rule=\"thread\"} 0\n"));
    }

    #[test]
    fn trace_id_ratio_matches_opentelemetry_bounds() {
        // Bound for 0.25: 2^63 / 4 = 2^61; x = low >> 1.
        let bound = 1u64 << 61;
        assert!(trace_id_ratio_keeps(&id((bound - 1) << 1), 0.25));
        assert!(!trace_id_ratio_keeps(&id(bound << 1), 0.25));
        assert!(trace_id_ratio_keeps(&id(u64::MAX), 1.0));
        assert!(!trace_id_ratio_keeps(&id(0), 0.0));
        assert!(!trace_id_ratio_keeps(&id(0), f64::NAN));
    }

    #[test]
    fn trace_id_ratio_keeps_about_the_ratio_of_random_ids() {
        // A fixed xorshift sequence: the share kept is within 1 point of 0.1.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let kept = (0..100_000)
            .filter(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                trace_id_ratio_keeps(&id(x), 0.1)
            })
            .count();
        assert!((9_000..=11_000).contains(&kept), "{kept}");
    }
}
