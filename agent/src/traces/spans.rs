//! HTTP spans from connection and data events: a pure state machine fed in
//! ring-buffer order ([`HttpTracer`]).
//!
//! Per connection, the bytes read and the bytes written are parsed apart
//! ([`parse`](super::parse)). A request read is served by this process
//! (a server span), a request written is sent by it (a client span); the
//! role the kernel saw at `accept`/`connect` is not needed. Responses are
//! matched to requests first in, first out, per connection and side.
//!
//! Times (CLOCK_MONOTONIC): a server span starts at the *end* of the read in
//! which its request started (a blocking read's entry includes the wait for
//! the client) and ends at the end of the write that completed the
//! response; a client span starts at the entry of the first write of the
//! request and ends at the end of the read that completed the response.
//!
//! Ids:
//! - Server span: the kernel's ([`ctx_flags::SERVER`] on the read that
//!   started the request: trace id, span id, and the parent when
//!   [`ctx_flags::REMOTE_PARENT`]; when the kernel found no parent but the
//!   parsed head has a `traceparent`, its trace id and parent with the
//!   kernel's span id), else the request's `traceparent` (trace id and
//!   parent, a new span id), else a new trace.
//! - Client span: the kernel's ([`ctx_flags::CLIENT_INJECTED`] on the write
//!   that started the request: the injected trace id and span id, the
//!   parent when [`ctx_flags::LOCAL_PARENT`]). Else, when the request
//!   carries its own `traceparent` (an instrumented or propagating app), its
//!   trace id, a new span id, and as parent the server span the writing
//!   thread serves (when it serves exactly one, in that trace), else the
//!   header's span id: the header's span is the app's own client span (or,
//!   for a proxy that forwards headers, its caller's), so taking its id
//!   would duplicate a span. Else the server span the writing thread serves
//!   when it serves exactly one (its trace, it as parent), else a new trace.
//!
//! Bounded: connections ([`TracerConfig::max_conns`], new ones refused),
//! requests awaiting a response per connection and side (the oldest given
//! up), finished spans not yet taken, idle connections ([`HttpTracer::expire`]);
//! everything given up is counted in [`TracerStats`].

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use foldhash::{HashMap, HashMapExt};

use fathom_common::http::{
    ConnEvent, DataEvent, SockAddr, SpanRecord, TraceContext, ctx_flags, data_flags, direction,
    role, span_flags, syscall,
};

use super::parse::{
    Answering, Fragment, MessageHead, MessageParser, Sink, StartLine, StreamError, Version,
    host_value, parse_request_line, user_agent_value,
};

/// Bounds of an [`HttpTracer`]. Memory at most: per connection two heads
/// in progress ([`MAX_HEAD_BYTES`](super::parse::MAX_HEAD_BYTES) each) and
/// `2 * max_pending` requests of at most about 3 KiB (target, `Host` and
/// `User-Agent` are cut), plus `max_finished` spans.
#[derive(Clone, Debug)]
pub struct TracerConfig {
    /// Connections tracked at once; data of others is ignored (counted).
    pub max_conns: usize,
    /// Requests awaiting a response per connection and side.
    pub max_pending: usize,
    /// Connections without events for this long are forgotten by
    /// [`HttpTracer::expire`].
    pub idle_timeout_ns: u64,
    /// Finished spans kept until [`HttpTracer::take_finished`].
    pub max_finished: usize,
}

impl Default for TracerConfig {
    fn default() -> Self {
        Self {
            max_conns: 16_384,
            max_pending: 16,
            idle_timeout_ns: 300_000_000_000,
            max_finished: 65_536,
        }
    }
}

/// What the tracer did and gave up, since it was made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TracerStats {
    /// Connections tracked now.
    pub conns: u64,
    /// Requests awaiting a response now.
    pub pending: u64,
    /// Bytes of heads and chunk lines buffered now.
    pub buffered_bytes: u64,
    pub data_events: u64,
    /// Data events not parsed: on a connection that left HTTP, socket
    /// bytes of a connection whose plaintext comes from OpenSSL, or an
    /// unknown direction.
    pub data_events_ignored: u64,
    /// Connections (or data of connections) refused at `max_conns`.
    pub conns_refused: u64,
    pub conns_expired: u64,
    pub spans_finished: u64,
    /// Spans dropped because `max_finished` were waiting.
    pub spans_dropped: u64,
    /// Requests given up: the connection closed or expired first, or
    /// `max_pending` were waiting.
    pub requests_unanswered: u64,
    /// Final responses without a request to match.
    pub responses_unmatched: u64,
    /// Responses given up before their end (bad framing, lost events).
    pub responses_dropped: u64,
    /// Heads longer than the capture (start line and some headers kept).
    pub heads_truncated: u64,
    /// Parser errors by kind (see [`StreamError`]).
    pub garbage: u64,
    pub not_captured: u64,
    pub start_line_not_captured: u64,
    pub head_too_large: u64,
    pub bad_head: u64,
    pub bad_chunk: u64,
    pub resync: u64,
    pub incomplete: u64,
    pub skipped_events: u64,
    /// Server spans moved into the trace the kernel started for a client
    /// request they sent (see `SideSink::request`).
    pub adopted: u64,
    /// Exchanges the kernel paired (one record each, nothing parsed here).
    pub paired: u64,
    /// Paired records that did not make a span (an unreadable request
    /// line).
    pub paired_malformed: u64,
}

/// Server or client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpanKind {
    Server,
    Client,
}

/// `http` or `https` (plaintext from OpenSSL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// One finished HTTP request/response exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// The parent is in another process (an incoming `traceparent`).
    pub remote_parent: bool,
    pub kind: SpanKind,
    /// CLOCK_MONOTONIC.
    pub start_ns: u64,
    pub end_ns: u64,
    pub pid: u32,
    /// Thread that read (server) or wrote (client) the request.
    pub tid: u32,
    pub conn_id: u64,
    /// As sent (any token; see `otlp` for the known ones).
    pub method: String,
    /// The request target's path (`*` for `OPTIONS *`, empty for CONNECT).
    pub path: String,
    /// The query, without `?`.
    pub query: Option<String>,
    /// The authority of an absolute-form or authority-form target.
    pub target_authority: Option<String>,
    pub scheme: Scheme,
    pub status: Option<u16>,
    /// `Host` header.
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub version: Version,
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    /// The other end: the client of a server span, the server of a client
    /// span.
    pub peer: Option<SocketAddr>,
    /// This end's port, when known ([`HttpTracer::set_local_port`]).
    pub local_port: Option<u16>,
    /// The connection's TCP state over the span, when the kernel read its
    /// socket.
    pub tcp: Option<TcpSpan>,
    /// The connection's handshake (SYN → ESTABLISHED) in microseconds, for
    /// client spans when the network signal measured it
    /// ([`HttpTracer::set_connect_us`]).
    pub connect_us: Option<u64>,
    /// The request head went on past the captured bytes.
    pub truncated: bool,
    /// Status Error in OpenTelemetry terms: 5xx, or 4xx on a client span.
    pub error: bool,
    /// A server span whose ids the kernel chose and kept in `SERVING` while
    /// its thread served it: that thread's CPU samples carry its span id
    /// (when the profiler runs beside the tracer).
    pub profiled: bool,
}

/// The connection's TCP state over one span (`fathom.tcp.*` attributes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSpan {
    /// Smoothed RTT at the span's last event, microseconds.
    pub srtt_us: u32,
    /// Segments the connection retransmitted between the span's first and
    /// last events.
    pub retransmits: u32,
}

/// The connection's TCP state at one syscall (from a [`DataEvent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TcpSample {
    srtt_us: u32,
    total_retrans: u32,
}

impl TcpSample {
    fn of(ev: &DataEvent) -> Option<TcpSample> {
        (ev.flags & data_flags::TCP != 0).then_some(TcpSample {
            srtt_us: ev.srtt_us,
            total_retrans: ev.total_retrans,
        })
    }

    /// The span from its first sample to its last.
    fn span(first: Option<TcpSample>, last: Option<TcpSample>) -> Option<TcpSpan> {
        let (first, last) = (first?, last?);
        Some(TcpSpan {
            srtt_us: last.srtt_us,
            // A counter of one socket: it does not go back (wrapping after
            // 2^32 segments).
            retransmits: last.total_retrans.wrapping_sub(first.total_retrans),
        })
    }
}

impl HttpSpan {
    /// Duration in nanoseconds (0 when the clock went backwards).
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Whether a status is an error for a span of `kind` (OTel HTTP
/// conventions).
pub fn is_error_status(kind: SpanKind, status: Option<u16>) -> bool {
    match (kind, status) {
        (_, Some(s)) if s >= 500 => true,
        (SpanKind::Client, Some(s)) if s >= 400 => true,
        _ => false,
    }
}

/// What the tracer remembers of the syscall a message started in.
#[derive(Clone, Copy, Debug)]
struct Origin {
    start_ns: u64,
    end_ns: u64,
    tid: u32,
    ctx: TraceContext,
    tcp: Option<TcpSample>,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    span: HttpSpan,
    /// TCP state at the span's first event.
    first_tcp: Option<TcpSample>,
}

#[derive(Debug, Default)]
enum Current {
    #[default]
    None,
    /// A request whose body is still coming.
    Request(u64),
    /// A final response matched to its request.
    Response(Box<Pending>),
    /// A 1xx response, or one without request.
    Ignored,
}

#[derive(Debug, Default)]
struct Side {
    parser: MessageParser<Origin>,
    current: Current,
    last_end_ns: u64,
    last_tcp: Option<TcpSample>,
}

#[derive(Debug)]
struct Core {
    conn_id: u64,
    tgid: u32,
    peer: Option<SocketAddr>,
    local_port: Option<u16>,
    connect_us: Option<u64>,
    /// Plaintext comes from OpenSSL: socket bytes are ignored.
    tls: bool,
    last_ns: u64,
    next_seq: u64,
    /// Requests read, awaiting the response this process writes.
    served: VecDeque<Pending>,
    /// Requests written, awaiting the response this process reads.
    sent: VecDeque<Pending>,
}

#[derive(Debug)]
struct Conn {
    core: Core,
    read: Side,
    write: Side,
}

/// A server request a thread is serving (its response not started yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Serving {
    conn_id: u64,
    seq: u64,
    trace_id: [u8; 16],
    span_id: [u8; 8],
    /// The request came with a parent (its trace id is not ours to change).
    remote_parent: bool,
}

#[derive(Debug)]
struct Shared {
    cfg: TracerConfig,
    serving: HashMap<u32, Vec<Serving>>,
    /// Pending server spans (conn id, seq) that move to another trace id,
    /// applied after the current event ([`Shared::adopt`]).
    adoptions: Vec<(u64, u64, [u8; 16])>,
    finished: Vec<HttpSpan>,
    stats: TracerStats,
    rng: fastrand::Rng,
}

impl Shared {
    fn trace_id(&mut self) -> [u8; 16] {
        loop {
            let id = self.rng.u128(..).to_be_bytes();
            if id != [0; 16] {
                return id;
            }
        }
    }

    fn span_id(&mut self) -> [u8; 8] {
        loop {
            let id = self.rng.u64(..).to_be_bytes();
            if id != [0; 8] {
                return id;
            }
        }
    }

    fn unserve(&mut self, tid: u32, conn_id: u64, seq: u64) {
        if let Some(v) = self.serving.get_mut(&tid) {
            v.retain(|s| !(s.conn_id == conn_id && s.seq == seq));
            if v.is_empty() {
                self.serving.remove(&tid);
            }
        }
    }

    /// The single server request `tid` serves.
    /// Moves the server request `s` that thread `tid` serves into
    /// `trace_id`.
    fn adopt(&mut self, tid: u32, s: Serving, trace_id: [u8; 16]) {
        if let Some(v) = self.serving.get_mut(&tid) {
            for x in v.iter_mut() {
                if x.conn_id == s.conn_id && x.seq == s.seq {
                    x.trace_id = trace_id;
                }
            }
        }
        self.adoptions.push((s.conn_id, s.seq, trace_id));
        self.stats.adopted += 1;
    }

    /// The request thread `tid` works on: the only one it serves, or, when
    /// all it serves came pipelined on one connection, the oldest (HTTP/1.x
    /// answers them in order).
    fn serving_current(&self, tid: u32) -> Option<Serving> {
        let v = self.serving.get(&tid)?;
        let first = v.first()?;
        if v.iter().all(|s| s.conn_id == first.conn_id) {
            v.iter().min_by_key(|s| s.seq).copied()
        } else {
            None
        }
    }

    /// The parent of a client request the kernel injected on thread `tid`:
    /// the server span the kernel gave it; or, when the kernel started a
    /// new trace (it did not know the thread was serving: a pipelined
    /// request taken from the server's own buffer, without a read), the
    /// one request user space knows the thread serves, if it has no parent
    /// of its own: that request joins the trace the downstream services
    /// already got.
    fn injected_parent(&mut self, tid: u32, ctx: &TraceContext) -> Option<[u8; 8]> {
        if ctx.flags & ctx_flags::LOCAL_PARENT != 0 {
            return Some(ctx.parent_span_id);
        }
        let s = self.serving_current(tid).filter(|s| !s.remote_parent)?;
        self.adopt(tid, s, ctx.trace_id);
        Some(s.span_id)
    }

    fn serving_one(&self, tid: u32) -> Option<Serving> {
        match self.serving.get(&tid).map(Vec::as_slice) {
            Some([one]) => Some(*one),
            _ => None,
        }
    }

    fn finish(&mut self, span: HttpSpan) {
        if self.finished.len() >= self.cfg.max_finished {
            self.stats.spans_dropped += 1;
        } else {
            self.stats.spans_finished += 1;
            self.finished.push(span);
        }
    }

    /// Gives up the requests of a connection that went away.
    fn abandon(&mut self, core: &mut Core) {
        for p in core.served.drain(..) {
            self.stats.requests_unanswered += 1;
            if let Some(s) = self.serving.get_mut(&p.span.tid) {
                s.retain(|s| !(s.conn_id == core.conn_id && s.seq == p.seq));
                if s.is_empty() {
                    self.serving.remove(&p.span.tid);
                }
            }
        }
        self.stats.requests_unanswered += core.sent.len() as u64;
        core.sent.clear();
    }
}

/// Turns parsed messages of one side of a connection into spans.
struct SideSink<'a> {
    dir: u8,
    /// End of the syscall being parsed (or of the last one, at close).
    end_ns: u64,
    /// TCP state at that syscall.
    tcp: Option<TcpSample>,
    current: &'a mut Current,
    core: &'a mut Core,
    shared: &'a mut Shared,
}

impl SideSink<'_> {
    fn request(&mut self, head: MessageHead, origin: Origin, first: bool) {
        let StartLine::Request { method, target } = head.start else {
            return;
        };
        let server = self.dir == direction::READ;
        let ctx = origin.ctx;
        let shared = &mut *self.shared;
        let profiled = server && first && ctx.flags & ctx_flags::SERVER != 0;
        let (trace_id, span_id, parent_span_id, remote_parent) = if server {
            if profiled {
                let remote = ctx.flags & ctx_flags::REMOTE_PARENT != 0;
                match head.traceparent {
                    // The kernel saw no `traceparent` in the read that started
                    // the request: the head came in pieces. It found the
                    // header in a later read (and gave the thread's client
                    // requests that trace) or, past its capture, not at all.
                    Some((trace, parent, _)) if !remote => (trace, ctx.span_id, Some(parent), true),
                    _ => (
                        ctx.trace_id,
                        ctx.span_id,
                        remote.then_some(ctx.parent_span_id),
                        remote,
                    ),
                }
            } else if let Some((trace, parent, _)) = head.traceparent {
                (trace, shared.span_id(), Some(parent), true)
            } else {
                (shared.trace_id(), shared.span_id(), None, false)
            }
        } else if first && ctx.flags & ctx_flags::CLIENT_INJECTED != 0 {
            let parent = shared.injected_parent(origin.tid, &ctx);
            (ctx.trace_id, ctx.span_id, parent, false)
        } else if let Some((trace, parent, _)) = head.traceparent {
            let parent = shared
                .serving_one(origin.tid)
                .filter(|s| s.trace_id == trace)
                .map_or(parent, |s| s.span_id);
            (trace, shared.span_id(), Some(parent), false)
        } else if let Some(s) = shared.serving_one(origin.tid) {
            (s.trace_id, shared.span_id(), Some(s.span_id), false)
        } else {
            (shared.trace_id(), shared.span_id(), None, false)
        };
        let (target_authority, path, query) = split_target(&method, &target);
        if head.truncated {
            shared.stats.heads_truncated += 1;
        }
        let span = HttpSpan {
            trace_id,
            span_id,
            parent_span_id,
            remote_parent,
            kind: if server {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            start_ns: if server {
                origin.end_ns
            } else {
                origin.start_ns
            },
            end_ns: 0,
            pid: self.core.tgid,
            tid: origin.tid,
            conn_id: self.core.conn_id,
            method,
            path,
            query,
            target_authority,
            scheme: if self.core.tls {
                Scheme::Https
            } else {
                Scheme::Http
            },
            status: None,
            host: head.host,
            user_agent: head.user_agent,
            version: head.version,
            request_body_bytes: 0,
            response_body_bytes: 0,
            peer: self.core.peer,
            local_port: self.core.local_port,
            tcp: None,
            connect_us: self.core.connect_us,
            truncated: head.truncated,
            error: false,
            profiled,
        };
        let seq = self.core.next_seq;
        self.core.next_seq += 1;
        let queue = if server {
            &mut self.core.served
        } else {
            &mut self.core.sent
        };
        if queue.len() >= shared.cfg.max_pending.max(1)
            && let Some(old) = queue.pop_front()
        {
            shared.stats.requests_unanswered += 1;
            if server {
                shared.unserve(old.span.tid, self.core.conn_id, old.seq);
            }
        }
        if server {
            shared.serving.entry(origin.tid).or_default().push(Serving {
                conn_id: self.core.conn_id,
                seq,
                trace_id,
                span_id,
                remote_parent,
            });
        }
        queue.push_back(Pending {
            seq,
            span,
            first_tcp: origin.tcp,
        });
        *self.current = Current::Request(seq);
    }

    fn response(&mut self, head: MessageHead) -> Answering {
        let Some(status) = head.status() else {
            return Answering::Other;
        };
        if status < 200 && status != 101 {
            *self.current = Current::Ignored;
            return Answering::Other;
        }
        // Written responses answer requests read, and the other way round.
        let server = self.dir == direction::WRITE;
        let queue = if server {
            &mut self.core.served
        } else {
            &mut self.core.sent
        };
        let Some(mut p) = queue.pop_front() else {
            self.shared.stats.responses_unmatched += 1;
            *self.current = Current::Ignored;
            return Answering::Other;
        };
        if server {
            self.shared.unserve(p.span.tid, self.core.conn_id, p.seq);
        }
        p.span.status = Some(status);
        let answering = match p.span.method.as_str() {
            "HEAD" => Answering::Head,
            "CONNECT" => Answering::Connect,
            _ => Answering::Other,
        };
        *self.current = Current::Response(Box::new(p));
        answering
    }
}

impl Sink<Origin> for SideSink<'_> {
    fn continue_head(&mut self, started: &mut Origin, later: &Origin) {
        // A request whose first bytes came alone (Go's server reads one
        // byte of a kept-alive connection's next request early): the kernel
        // opened it, with its ids, at the read that completed the request
        // line.
        if self.dir == direction::READ
            && started.ctx.flags & ctx_flags::SERVER == 0
            && later.ctx.flags & ctx_flags::SERVER != 0
        {
            started.ctx = later.ctx;
            started.tid = later.tid;
        }
    }

    fn head(&mut self, head: MessageHead, origin: Origin, first: bool) -> Answering {
        if head.is_request() {
            self.request(head, origin, first);
            Answering::Other
        } else {
            self.response(head)
        }
    }

    fn complete(&mut self, body_len: u64) {
        match std::mem::take(self.current) {
            Current::Request(seq) => {
                let queue = if self.dir == direction::READ {
                    &mut self.core.served
                } else {
                    &mut self.core.sent
                };
                if let Some(p) = queue.iter_mut().find(|p| p.seq == seq) {
                    p.span.request_body_bytes = body_len;
                }
            }
            Current::Response(mut p) => {
                p.span.end_ns = self.end_ns;
                p.span.tcp = TcpSample::span(p.first_tcp, self.tcp);
                p.span.response_body_bytes = body_len;
                p.span.error = is_error_status(p.span.kind, p.span.status);
                self.shared.finish(p.span);
            }
            Current::None | Current::Ignored => {}
        }
    }

    fn error(&mut self, error: StreamError) {
        let s = &mut self.shared.stats;
        match error {
            StreamError::Garbage => s.garbage += 1,
            StreamError::NotCaptured => s.not_captured += 1,
            StreamError::StartLineNotCaptured => s.start_line_not_captured += 1,
            StreamError::HeadTooLarge => s.head_too_large += 1,
            StreamError::BadHead => s.bad_head += 1,
            StreamError::BadChunk => s.bad_chunk += 1,
            StreamError::Resync => s.resync += 1,
            StreamError::Incomplete => s.incomplete += 1,
            StreamError::Skipped => s.skipped_events += 1,
        }
        // A request given up keeps its place in the queue (its response
        // may still come); a response given up is lost.
        match std::mem::take(self.current) {
            Current::Response(_) => s.responses_dropped += 1,
            Current::Request(_) | Current::Ignored | Current::None => {}
        }
    }
}

/// The span of a paired exchange's record on the connection `core` (no
/// status or end yet): its ids are the kernel's. `None` when its request
/// line does not read.
fn span_of_record(rec: &SpanRecord, core: &Core) -> Option<HttpSpan> {
    let line = until_cr(&rec.line)?;
    let (method, target, version) = parse_request_line(line)?;
    let server = rec.role == role::SERVER;
    let ctx = &rec.ctx;
    let (parent_span_id, remote_parent) = if server {
        let remote = ctx.flags & ctx_flags::REMOTE_PARENT != 0;
        (remote.then_some(ctx.parent_span_id), remote)
    } else {
        // The caller decides ([`Shared::injected_parent`]).
        (None, false)
    };
    let (target_authority, path, query) = split_target(&method, &target);
    Some(HttpSpan {
        trace_id: ctx.trace_id,
        span_id: ctx.span_id,
        parent_span_id,
        remote_parent,
        kind: if server {
            SpanKind::Server
        } else {
            SpanKind::Client
        },
        start_ns: rec.start_ns,
        end_ns: 0,
        pid: rec.tgid,
        tid: rec.tid,
        conn_id: rec.conn_id,
        method,
        path,
        query,
        target_authority,
        scheme: Scheme::Http,
        status: None,
        host: until_cr(&rec.host)
            .filter(|v| !v.is_empty())
            .map(host_value),
        user_agent: until_cr(&rec.agent)
            .filter(|v| !v.is_empty())
            .map(user_agent_value),
        version,
        request_body_bytes: 0,
        response_body_bytes: 0,
        peer: core.peer,
        local_port: core.local_port,
        tcp: None,
        connect_us: core.connect_us,
        truncated: false,
        error: false,
        profiled: server && ctx.flags & ctx_flags::SERVER != 0,
    })
}

/// A record's text field up to its `\r`; an empty field (first byte 0)
/// is empty; `None` when it has no `\r`.
fn until_cr(field: &[u8]) -> Option<&[u8]> {
    if field.first() == Some(&0) {
        return Some(&[]);
    }
    let end = field.iter().position(|&b| b == b'\r')?;
    Some(&field[..end])
}

/// Splits a request target into (authority, path, query).
fn split_target(method: &str, target: &str) -> (Option<String>, String, Option<String>) {
    if method == "CONNECT" {
        return (Some(target.to_string()), String::new(), None);
    }
    let mut rest = target;
    let mut authority = None;
    for scheme in ["http://", "https://"] {
        if rest
            .get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        {
            let after = &rest[scheme.len()..];
            let end = after.find(['/', '?']).unwrap_or(after.len());
            authority = Some(after[..end].to_string());
            rest = &after[end..];
            break;
        }
    }
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (rest, None),
    };
    let path = if path.is_empty() && authority.is_some() {
        "/"
    } else {
        path
    };
    (authority, path.to_string(), query)
}

/// A socket address from the kernel's (`None` when unknown).
pub fn sock_addr(a: &SockAddr) -> Option<SocketAddr> {
    let ip = match a.family {
        2 => {
            let mut v4 = [0u8; 4];
            v4.copy_from_slice(&a.addr[..4]);
            IpAddr::V4(Ipv4Addr::from(v4))
        }
        10 => IpAddr::V6(Ipv6Addr::from(a.addr)).to_canonical(),
        _ => return None,
    };
    if ip.is_unspecified() && a.port == 0 {
        return None;
    }
    Some(SocketAddr::new(ip, a.port))
}

/// The connection `conn_id`, made when new (`None`: `max_conns` reached).
fn ensure_conn<'a>(
    conns: &'a mut HashMap<u64, Conn>,
    shared: &mut Shared,
    conn_id: u64,
    tgid: u32,
    ts: u64,
) -> Option<&'a mut Conn> {
    if !conns.contains_key(&conn_id) {
        if conns.len() >= shared.cfg.max_conns {
            shared.stats.conns_refused += 1;
            return None;
        }
        conns.insert(
            conn_id,
            Conn {
                core: Core {
                    conn_id,
                    tgid,
                    peer: None,
                    local_port: None,
                    connect_us: None,
                    tls: false,
                    last_ns: ts,
                    next_seq: 0,
                    served: VecDeque::new(),
                    sent: VecDeque::new(),
                },
                read: Side::default(),
                write: Side::default(),
            },
        );
    }
    conns.get_mut(&conn_id)
}

/// Builds HTTP spans from connection and data events.
#[derive(Debug)]
pub struct HttpTracer {
    conns: HashMap<u64, Conn>,
    shared: Shared,
}

impl Default for HttpTracer {
    fn default() -> Self {
        Self::new(TracerConfig::default())
    }
}

impl HttpTracer {
    /// A tracer whose new ids come from a generator seeded from the
    /// process's random state (std's `RandomState`, from the OS) and the
    /// time.
    pub fn new(cfg: TracerConfig) -> Self {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new()
            .hash_one(std::time::SystemTime::now())
            ^ fastrand::u64(..);
        Self::with_seed(cfg, seed)
    }

    /// A tracer with a fixed id seed (tests, fuzzing).
    pub fn with_seed(cfg: TracerConfig, seed: u64) -> Self {
        Self {
            conns: HashMap::new(),
            shared: Shared {
                cfg,
                serving: HashMap::new(),
                adoptions: Vec::new(),
                finished: Vec::new(),
                stats: TracerStats::default(),
                rng: fastrand::Rng::with_seed(seed),
            },
        }
    }

    /// A connection was accepted or connected.
    pub fn on_conn_open(&mut self, ev: &ConnEvent) {
        if self.conns.contains_key(&ev.conn_id) {
            // Ids are unique: a second open is a repeat; start afresh.
            self.on_conn_close(ev);
        }
        if let Some(c) = ensure_conn(
            &mut self.conns,
            &mut self.shared,
            ev.conn_id,
            ev.tgid,
            ev.ts_ns,
        ) {
            c.core.peer = sock_addr(&ev.peer);
            c.core.local_port = sock_addr(&ev.local).map(|a| a.port());
        }
    }

    /// This end's port of a connection (found from the listening socket).
    pub fn set_local_port(&mut self, conn_id: u64, port: u16) {
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.core.local_port = Some(port);
            for p in c.core.served.iter_mut().chain(c.core.sent.iter_mut()) {
                p.span.local_port = Some(port);
            }
        }
    }

    /// The connection's handshake time (client connections, from the
    /// network signal).
    pub fn set_connect_us(&mut self, conn_id: u64, us: u64) {
        if let Some(c) = self.conns.get_mut(&conn_id) {
            c.core.connect_us = Some(us);
            for p in c.core.served.iter_mut().chain(c.core.sent.iter_mut()) {
                p.span.connect_us = Some(us);
            }
        }
    }

    /// One read or write on a connection.
    pub fn on_data(&mut self, ev: &DataEvent) {
        self.shared.stats.data_events += 1;
        if ev.direction != direction::READ && ev.direction != direction::WRITE {
            self.shared.stats.data_events_ignored += 1;
            return;
        }
        let ssl = ev.syscall == syscall::SSL_READ || ev.syscall == syscall::SSL_WRITE;
        let Some(conn) = ensure_conn(
            &mut self.conns,
            &mut self.shared,
            ev.conn_id,
            ev.tgid,
            ev.end_ns,
        ) else {
            return;
        };
        let Conn { core, read, write } = conn;
        core.last_ns = core.last_ns.max(ev.end_ns);
        if ssl && !core.tls {
            // Plaintext from here on; what the socket carried was TLS.
            core.tls = true;
        } else if core.tls && !ssl {
            self.shared.stats.data_events_ignored += 1;
            return;
        }
        let side = if ev.direction == direction::READ {
            read
        } else {
            write
        };
        if side.parser.is_tunnel() {
            self.shared.stats.data_events_ignored += 1;
            return;
        }
        side.last_end_ns = ev.end_ns;
        let tcp = TcpSample::of(ev);
        side.last_tcp = tcp;
        let frag = Fragment::new(ev.head(), ev.tail(), ev.len);
        let origin = Origin {
            start_ns: ev.start_ns,
            end_ns: ev.end_ns,
            tid: ev.tid,
            ctx: ev.ctx,
            tcp,
        };
        let mut sink = SideSink {
            dir: ev.direction,
            end_ns: ev.end_ns,
            tcp,
            current: &mut side.current,
            core,
            shared: &mut self.shared,
        };
        side.parser.feed(frag, origin, &mut sink);
        self.apply_adoptions();
    }

    /// Server spans still pending that moved to another trace.
    fn apply_adoptions(&mut self) {
        for (conn_id, seq, trace_id) in std::mem::take(&mut self.shared.adoptions) {
            if let Some(c) = self.conns.get_mut(&conn_id) {
                for p in c.core.served.iter_mut().filter(|p| p.seq == seq) {
                    p.span.trace_id = trace_id;
                }
            }
        }
    }

    /// An exchange the kernel paired: a finished span; or, with
    /// [`span_flags::PENDING`], a request whose response comes as data
    /// events (the kernel stopped pairing on the connection), queued as if
    /// it had been parsed here.
    pub fn on_span(&mut self, rec: &SpanRecord) {
        let Some(conn) = ensure_conn(
            &mut self.conns,
            &mut self.shared,
            rec.conn_id,
            rec.tgid,
            rec.end_ns,
        ) else {
            return;
        };
        let core = &mut conn.core;
        core.last_ns = core.last_ns.max(rec.end_ns);
        let Some(mut span) = span_of_record(rec, core) else {
            self.shared.stats.paired_malformed += 1;
            return;
        };
        if rec.role == role::CLIENT {
            span.parent_span_id = self.shared.injected_parent(rec.tid, &rec.ctx);
            self.apply_adoptions();
        }
        // `apply_adoptions` borrowed the connections.
        let Some(core) = self.conns.get_mut(&rec.conn_id).map(|c| &mut c.core) else {
            return;
        };
        let first_tcp = (rec.flags & span_flags::TCP != 0).then_some(TcpSample {
            srtt_us: rec.srtt_us,
            total_retrans: rec.retrans_first,
        });
        if rec.flags & span_flags::PENDING != 0 {
            let seq = core.next_seq;
            core.next_seq += 1;
            let pending = Pending {
                seq,
                span,
                first_tcp,
            };
            let server = rec.role == role::SERVER;
            let queue = if server {
                &mut core.served
            } else {
                &mut core.sent
            };
            // Bounded as the parser's own requests are.
            if queue.len() >= self.shared.cfg.max_pending.max(1)
                && let Some(old) = queue.pop_front()
            {
                self.shared.stats.requests_unanswered += 1;
                if server {
                    self.shared.unserve(old.span.tid, core.conn_id, old.seq);
                }
            }
            if server {
                self.shared
                    .serving
                    .entry(rec.tid)
                    .or_default()
                    .push(Serving {
                        conn_id: core.conn_id,
                        seq,
                        trace_id: pending.span.trace_id,
                        span_id: pending.span.span_id,
                        remote_parent: pending.span.remote_parent,
                    });
                core.served.push_back(pending);
            } else {
                core.sent.push_back(pending);
            }
            return;
        }
        let last_tcp = (rec.flags & span_flags::TCP != 0).then_some(TcpSample {
            srtt_us: rec.srtt_us,
            total_retrans: rec.retrans_last,
        });
        span.status = Some(rec.status);
        span.end_ns = rec.end_ns;
        span.response_body_bytes = rec.response_body;
        span.tcp = TcpSample::span(first_tcp, last_tcp);
        span.error = is_error_status(span.kind, span.status);
        self.shared.stats.paired += 1;
        self.shared.finish(span);
    }

    /// A connection was closed (or its process exited): a response that
    /// ends with the close ends at the last read or write of it; requests
    /// without a response are given up.
    pub fn on_conn_close(&mut self, ev: &ConnEvent) {
        let Some(mut conn) = self.conns.remove(&ev.conn_id) else {
            return;
        };
        self.close_conn(&mut conn);
    }

    fn close_conn(&mut self, conn: &mut Conn) {
        let Conn { core, read, write } = conn;
        for (dir, side) in [(direction::READ, read), (direction::WRITE, write)] {
            let mut sink = SideSink {
                dir,
                end_ns: side.last_end_ns,
                tcp: side.last_tcp,
                current: &mut side.current,
                core,
                shared: &mut self.shared,
            };
            side.parser.close(&mut sink);
        }
        self.shared.abandon(core);
    }

    /// Forgets connections without events since `now_ns - idle_timeout`
    /// (their close was lost); their requests are given up.
    pub fn expire(&mut self, now_ns: u64) {
        let timeout = self.shared.cfg.idle_timeout_ns;
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.core.last_ns) > timeout)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            if let Some(mut conn) = self.conns.remove(&id) {
                self.shared.stats.conns_expired += 1;
                // Not a close: a close-delimited response is given up too.
                let Conn { core, read, write } = &mut conn;
                for side in [read, write] {
                    if let Current::Response(_) = std::mem::take(&mut side.current) {
                        self.shared.stats.responses_dropped += 1;
                    }
                }
                self.shared.abandon(core);
            }
        }
    }

    /// How many finished spans wait for [`HttpTracer::take_finished`].
    pub fn finished_len(&self) -> usize {
        self.shared.finished.len()
    }

    /// Spans finished since the last call.
    pub fn take_finished(&mut self) -> Vec<HttpSpan> {
        std::mem::take(&mut self.shared.finished)
    }

    /// Counters, and what is kept now.
    pub fn stats(&self) -> TracerStats {
        let mut s = self.shared.stats.clone();
        s.conns = self.conns.len() as u64;
        s.pending = self
            .conns
            .values()
            .map(|c| (c.core.served.len() + c.core.sent.len()) as u64)
            .sum();
        s.buffered_bytes = self
            .conns
            .values()
            .map(|c| (c.read.parser.buffered() + c.write.parser.buffered()) as u64)
            .sum();
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fathom_common::http::{CAPTURE_HEAD, CAPTURE_TAIL, event_kind, role};

    pub(crate) const PID: u32 = 4242;

    /// A data event as the kernel sends it: the first 1024 bytes and, for
    /// longer transfers, the last 16.
    pub(crate) fn data(conn_id: u64, dir: u8, tid: u32, t: (u64, u64), bytes: &[u8]) -> DataEvent {
        let tail = if bytes.len() > CAPTURE_HEAD {
            &bytes[bytes.len() - CAPTURE_TAIL..]
        } else {
            &[][..]
        };
        data_parts(conn_id, dir, tid, t, bytes.len() as u64, bytes, tail)
    }

    /// A data event with explicit captured parts (`sendfile`: none).
    pub(crate) fn data_parts(
        conn_id: u64,
        dir: u8,
        tid: u32,
        (start_ns, end_ns): (u64, u64),
        len: u64,
        head: &[u8],
        tail: &[u8],
    ) -> DataEvent {
        let mut ev = DataEvent {
            kind: event_kind::DATA,
            direction: dir,
            syscall: if dir == direction::READ {
                syscall::READ
            } else {
                syscall::WRITE
            },
            flags: 0,
            tgid: PID,
            tid,
            fd: 5,
            conn_id,
            start_ns,
            end_ns,
            len,
            head_len: head.len().min(CAPTURE_HEAD) as u32,
            tail_len: tail.len().min(CAPTURE_TAIL) as u32,
            srtt_us: 0,
            total_retrans: 0,
            ctx: TraceContext::default(),
            head: [0; CAPTURE_HEAD],
            tail: [0; CAPTURE_TAIL],
        };
        let h = head.len().min(CAPTURE_HEAD);
        ev.head[..h].copy_from_slice(&head[..h]);
        let t = tail.len().min(CAPTURE_TAIL);
        ev.tail[..t].copy_from_slice(&tail[..t]);
        ev
    }

    pub(crate) fn conn(kind: u8, conn_id: u64, r: u8, peer: &str, ts: u64) -> ConnEvent {
        let peer: SocketAddr = peer.parse().unwrap();
        let mut addr = SockAddr::default();
        match peer.ip() {
            IpAddr::V4(v4) => {
                addr.addr[..4].copy_from_slice(&v4.octets());
                addr.family = 2;
            }
            IpAddr::V6(v6) => {
                addr.addr = v6.octets();
                addr.family = 10;
            }
        }
        addr.port = peer.port();
        ConnEvent {
            kind,
            role: r,
            _reserved: [0; 2],
            tgid: PID,
            tid: 1,
            fd: 5,
            conn_id,
            ts_ns: ts,
            peer: addr,
            listen_fd: u32::MAX,
            _reserved2: 0,
            local: SockAddr::default(),
        }
    }

    pub(crate) fn open(conn_id: u64, r: u8, peer: &str) -> ConnEvent {
        conn(event_kind::CONN_OPEN, conn_id, r, peer, 1)
    }

    pub(crate) fn close(conn_id: u64) -> ConnEvent {
        conn(
            event_kind::CONN_CLOSE,
            conn_id,
            role::UNKNOWN,
            "0.0.0.0:0",
            1,
        )
    }

    fn ctx(flags: u8, trace: u8, span: u8, parent: u8) -> TraceContext {
        TraceContext {
            trace_id: [trace; 16],
            span_id: [span; 8],
            parent_span_id: [parent; 8],
            flags,
            _reserved: [0; 7],
        }
    }

    fn with_ctx(mut ev: DataEvent, c: TraceContext) -> DataEvent {
        ev.ctx = c;
        ev
    }

    const R: u8 = direction::READ;
    const W: u8 = direction::WRITE;

    const CURL_GET: &[u8] = b"GET /api/items?id=7&sig=abc HTTP/1.1\r\nHost: shop.local:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
    const NGINX_200: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n{\"items\":[]}";

    fn tracer() -> HttpTracer {
        HttpTracer::with_seed(TracerConfig::default(), 7)
    }

    fn with_tcp(mut ev: DataEvent, srtt_us: u32, total_retrans: u32) -> DataEvent {
        ev.flags = data_flags::TCP;
        ev.srtt_us = srtt_us;
        ev.total_retrans = total_retrans;
        ev
    }

    /// RTT at the last event, retransmits between the first and the last
    /// (a response in several writes, the last one in the middle of a
    /// close-delimited body too), connect time on the connection's spans.
    #[test]
    fn tcp_state_over_the_span() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::CLIENT, "10.0.0.2:80"));
        t.on_data(&with_tcp(data(1, W, 11, (1_000, 2_000), CURL_GET), 300, 7));
        // Known once the first data came (the session looks it up then).
        t.set_connect_us(1, 20_150);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc";
        t.on_data(&with_tcp(data(1, R, 11, (2_500, 3_000), head), 20_000, 9));
        assert!(t.take_finished().is_empty());
        t.on_data(&with_tcp(
            data(1, R, 11, (3_500, 4_000), b"def"),
            20_400,
            12,
        ));
        // Second request: its own first sample; no TCP state on its last
        // event (the kernel could not read it): no TCP attributes.
        t.on_data(&with_tcp(
            data(1, W, 11, (5_000, 5_100), CURL_GET),
            20_400,
            12,
        ));
        t.on_data(&data(1, R, 11, (6_000, 6_100), NGINX_200));
        // Third: the retransmit counter as the kernel has it, wrapping.
        t.on_data(&with_tcp(
            data(1, W, 11, (7_000, 7_100), CURL_GET),
            1,
            u32::MAX - 1,
        ));
        t.on_data(&with_tcp(data(1, R, 11, (8_000, 8_100), NGINX_200), 2, 3));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 3);
        assert_eq!(
            spans[0].tcp,
            Some(TcpSpan {
                srtt_us: 20_400,
                retransmits: 5
            })
        );
        assert_eq!(spans[0].connect_us, Some(20_150));
        assert_eq!(spans[1].tcp, None);
        assert_eq!(spans[1].connect_us, Some(20_150));
        assert_eq!(
            spans[2].tcp,
            Some(TcpSpan {
                srtt_us: 2,
                retransmits: 5
            })
        );

        // A server span whose response ends with the close: the last
        // write's state.
        t.on_conn_open(&open(2, role::SERVER, "10.0.0.3:5555"));
        t.on_data(&with_tcp(data(2, R, 12, (1_000, 2_000), CURL_GET), 100, 0));
        t.on_data(&with_tcp(
            data(2, W, 12, (2_500, 2_600), b"HTTP/1.0 200 OK\r\n\r\nxyz"),
            150,
            4,
        ));
        t.on_conn_close(&close(2));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].tcp,
            Some(TcpSpan {
                srtt_us: 150,
                retransmits: 4
            })
        );
        assert_eq!(spans[0].connect_us, None);
    }

    #[test]
    fn a_request_whose_first_byte_came_alone_takes_the_kernels_ids() {
        // Go's server reads one byte of the next request early (thread 21),
        // then the rest (thread 22), where the kernel opens the request.
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "127.0.0.1:54321"));
        t.on_data(&data(1, R, 21, (1_000, 1_100), b"G"));
        t.on_data(&with_ctx(
            data(1, R, 22, (1_500, 2_000), &CURL_GET[1..]),
            ctx(ctx_flags::SERVER, 0xaa, 0xbb, 0),
        ));
        t.on_data(&data(1, W, 22, (2_500, 2_600), NGINX_200));
        t.on_conn_close(&close(1));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].trace_id, [0xaa; 16]);
        assert_eq!(spans[0].span_id, [0xbb; 8]);
        assert_eq!(spans[0].tid, 22);
        assert_eq!(spans[0].start_ns, 1_100);
    }

    #[test]
    fn server_keep_alive() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "127.0.0.1:54321"));
        t.set_local_port(1, 8080);
        t.on_data(&with_ctx(
            data(1, R, 11, (1_000, 2_000), CURL_GET),
            ctx(ctx_flags::SERVER, 0xaa, 0xbb, 0),
        ));
        assert_eq!(t.stats().pending, 1);
        t.on_data(&data(1, W, 11, (2_500, 2_600), NGINX_200));
        // A second request on the same connection; no kernel context.
        t.on_data(&data(
            1,
            R,
            12,
            (3_000, 9_000),
            b"DELETE /api/items/7 HTTP/1.1\r\nHost: shop.local:8080\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            12,
            (9_500, 9_700),
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
        ));
        t.on_conn_close(&close(1));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 2);
        let a = &spans[0];
        assert_eq!(
            *a,
            HttpSpan {
                trace_id: [0xaa; 16],
                span_id: [0xbb; 8],
                parent_span_id: None,
                remote_parent: false,
                kind: SpanKind::Server,
                start_ns: 2_000,
                end_ns: 2_600,
                pid: PID,
                tid: 11,
                conn_id: 1,
                method: "GET".into(),
                path: "/api/items".into(),
                query: Some("id=7&sig=abc".into()),
                target_authority: None,
                scheme: Scheme::Http,
                status: Some(200),
                host: Some("shop.local:8080".into()),
                user_agent: Some("curl/8.5.0".into()),
                version: Version::Http11,
                request_body_bytes: 0,
                response_body_bytes: 12,
                peer: Some("127.0.0.1:54321".parse().unwrap()),
                local_port: Some(8080),
                tcp: None,
                connect_us: None,
                truncated: false,
                error: false,
                profiled: true,
            }
        );
        let b = &spans[1];
        assert_eq!((b.start_ns, b.end_ns, b.tid), (9_000, 9_700, 12));
        assert_eq!(
            (b.method.as_str(), b.path.as_str(), b.status),
            ("DELETE", "/api/items/7", Some(503))
        );
        assert!(b.error);
        assert_ne!(b.trace_id, a.trace_id);
        assert_ne!(b.trace_id, [0; 16]);
        assert_ne!(b.span_id, [0; 8]);
        assert_eq!(b.parent_span_id, None);
        let s = t.stats();
        assert_eq!(
            (s.conns, s.pending, s.spans_finished, s.requests_unanswered),
            (0, 0, 2, 0)
        );
    }

    /// The trace id and parent id of the W3C Trace Context example
    /// `00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01`.
    fn w3c_example() -> ([u8; 16], [u8; 8]) {
        let (trace, parent, _) = fathom_common::http::parse_traceparent(
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .unwrap();
        (trace, parent)
    }

    #[test]
    fn server_head_in_two_reads_takes_its_parent_from_the_second() {
        let mut t = tracer();
        // The kernel opened the request on the first read, where it saw no
        // traceparent: its ids, no parent.
        t.on_data(&with_ctx(
            data(1, R, 5, (0, 10), b"GET /a HTTP/1.1\r\nHost: a\r\n"),
            ctx(ctx_flags::SERVER, 0x11, 0x22, 0),
        ));
        t.on_data(&data(
            1,
            R,
            5,
            (12, 20),
            b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            5,
            (30, 40),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        let (trace, parent) = w3c_example();
        let s = &spans[0];
        assert_eq!(
            (s.trace_id, s.span_id, s.parent_span_id, s.remote_parent),
            (trace, [0x22; 8], Some(parent), true)
        );
        assert_eq!((s.start_ns, s.end_ns), (10, 40));
    }

    #[test]
    fn server_ids_from_kernel_remote_parent_and_from_header() {
        let mut t = tracer();
        let tp = b"GET / HTTP/1.1\r\nHost: a\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n";
        t.on_data(&with_ctx(
            data(1, R, 5, (0, 10), tp),
            ctx(
                ctx_flags::SERVER | ctx_flags::REMOTE_PARENT,
                0x11,
                0x22,
                0x33,
            ),
        ));
        t.on_data(&data(
            1,
            W,
            5,
            (20, 30),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ));
        // The same request without the kernel's context: from the header.
        t.on_data(&data(1, R, 5, (40, 50), tp));
        t.on_data(&data(
            1,
            W,
            5,
            (60, 70),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 2);
        assert_eq!(
            (
                spans[0].trace_id,
                spans[0].span_id,
                spans[0].parent_span_id,
                spans[0].remote_parent
            ),
            ([0x11; 16], [0x22; 8], Some([0x33; 8]), true)
        );
        // 404 is not an error on a server span.
        assert!(!spans[0].error);
        let (trace, parent) = w3c_example();
        assert_eq!(
            (
                spans[1].trace_id,
                spans[1].parent_span_id,
                spans[1].remote_parent
            ),
            (trace, Some(parent), true)
        );
        assert_ne!(spans[1].span_id, parent);
    }

    #[test]
    fn client_injected_and_local_parents() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        t.on_conn_open(&open(2, role::CLIENT, "127.0.0.1:9000"));
        // Thread 7 serves a request (kernel ids 0x01/0x02).
        t.on_data(&with_ctx(
            data(1, R, 7, (100, 200), CURL_GET),
            ctx(ctx_flags::SERVER, 1, 2, 0),
        ));
        // It calls a backend; the kernel injected traceparent.
        let backend = b"GET /inventory HTTP/1.1\r\nHost: inventory:9000\r\nUser-Agent: Go-http-client/1.1\r\nAccept-Encoding: gzip\r\n\r\n";
        t.on_data(&with_ctx(
            data(2, W, 7, (300, 310), backend),
            ctx(
                ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
                1,
                3,
                2,
            ),
        ));
        t.on_data(&data(
            2,
            R,
            7,
            (310, 900),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
        ));
        // A second call, nothing injected: the thread's one server request
        // is the parent.
        t.on_data(&data(2, W, 7, (1_000, 1_010), backend));
        t.on_data(&data(
            2,
            R,
            7,
            (1_010, 1_500),
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
        ));
        // The server answers; later calls from thread 7 start new traces.
        t.on_data(&data(1, W, 7, (1_600, 1_700), NGINX_200));
        t.on_data(&data(2, W, 7, (2_000, 2_010), backend));
        t.on_data(&data(
            2,
            R,
            7,
            (2_010, 2_500),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 4);
        let c1 = &spans[0];
        assert_eq!(
            (c1.kind, c1.start_ns, c1.end_ns),
            (SpanKind::Client, 300, 900)
        );
        assert_eq!(
            (c1.trace_id, c1.span_id, c1.parent_span_id),
            ([1; 16], [3; 8], Some([2; 8]))
        );
        assert_eq!(c1.peer, Some("127.0.0.1:9000".parse().unwrap()));
        let c2 = &spans[1];
        assert_eq!(
            (c2.trace_id, c2.parent_span_id, c2.status, c2.error),
            ([1; 16], Some([2; 8]), Some(500), true)
        );
        assert_ne!(c2.span_id, [3; 8]);
        let s = &spans[2];
        assert_eq!(
            (s.kind, s.span_id, s.start_ns, s.end_ns),
            (SpanKind::Server, [2; 8], 200, 1_700)
        );
        let c3 = &spans[3];
        assert_eq!(
            (c3.parent_span_id, c3.status, c3.error),
            (None, Some(404), true)
        );
        assert_ne!(c3.trace_id, [1; 16]);
    }

    #[test]
    fn no_local_parent_when_a_thread_serves_two() {
        let mut t = tracer();
        t.on_data(&with_ctx(
            data(1, R, 7, (0, 1), CURL_GET),
            ctx(ctx_flags::SERVER, 1, 2, 0),
        ));
        t.on_data(&with_ctx(
            data(2, R, 7, (0, 2), CURL_GET),
            ctx(ctx_flags::SERVER, 4, 5, 0),
        ));
        t.on_data(&data(
            3,
            W,
            7,
            (3, 4),
            b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n",
        ));
        t.on_data(&data(
            3,
            R,
            7,
            (5, 6),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        // An app's own traceparent: its trace, the header's span as parent.
        t.on_data(&data(3, W, 7, (7, 8), b"GET /y HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"));
        t.on_data(&data(
            3,
            R,
            7,
            (9, 10),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        // Once thread 7 serves only connection 2's request in that trace,
        // that server span is the parent.
        t.on_data(&data(
            1,
            W,
            7,
            (11, 12),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        t.on_data(&data(
            2,
            W,
            7,
            (13, 14),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 4);
        assert_eq!(spans[0].parent_span_id, None);
        assert!(spans[0].trace_id != [1; 16] && spans[0].trace_id != [4; 16]);
        let (trace, parent) = w3c_example();
        assert_eq!(
            (spans[1].trace_id, spans[1].parent_span_id),
            (trace, Some(parent))
        );

        let mut t = tracer();
        let mut req = CURL_GET.to_vec();
        req.truncate(req.len() - 2);
        req.extend_from_slice(
            b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
        );
        t.on_data(&data(1, R, 7, (0, 1), &req));
        let server_id = {
            t.on_data(&data(3, W, 7, (7, 8), b"GET /y HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"));
            t.on_data(&data(
                3,
                R,
                7,
                (9, 10),
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ));
            t.on_data(&data(
                1,
                W,
                7,
                (11, 12),
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ));
            let spans = t.take_finished();
            assert_eq!(spans.len(), 2);
            assert_eq!(spans[0].parent_span_id, Some(spans[1].span_id));
            assert_eq!(spans[1].parent_span_id, Some(parent));
            spans[1].span_id
        };
        assert_ne!(server_id, parent);
    }

    #[test]
    fn pipelined_requests_match_in_order() {
        let mut t = tracer();
        let reads = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /3 HTTP/1.1\r\nHost: h\r\n\r\n";
        t.on_data(&with_ctx(
            data(1, R, 3, (0, 100), reads),
            ctx(ctx_flags::SERVER, 9, 9, 0),
        ));
        assert_eq!(t.stats().pending, 3);
        t.on_data(&data(
            1,
            W,
            3,
            (200, 300),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nbbHTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n",
        ));
        let spans = t.take_finished();
        let got: Vec<_> = spans
            .iter()
            .map(|s| {
                (
                    s.path.as_str(),
                    s.status,
                    s.start_ns,
                    s.end_ns,
                    s.response_body_bytes,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/1", Some(200), 100, 300, 1),
                ("/2", Some(404), 100, 300, 2),
                ("/3", Some(200), 100, 300, 0)
            ]
        );
        // The kernel's ids belong to the first request of the read only.
        assert_eq!(spans[0].span_id, [9; 8]);
        assert_ne!(spans[1].span_id, [9; 8]);
        assert_ne!(spans[2].trace_id, [9; 16]);
        assert_eq!(t.stats().pending, 0);
    }

    #[test]
    fn expect_continue_upload() {
        let mut t = tracer();
        t.on_conn_open(&open(4, role::CLIENT, "[::1]:8443"));
        t.on_data(&data(4, W, 2, (10, 11), b"PUT /files/a.bin HTTP/1.1\r\nHost: [::1]:8443\r\nContent-Length: 3000000\r\nExpect: 100-continue\r\n\r\n"));
        t.on_data(&data(4, R, 2, (11, 50), b"HTTP/1.1 100 Continue\r\n\r\n"));
        for i in 0..3 {
            t.on_data(&data_parts(
                4,
                W,
                2,
                (60 + i, 70 + i),
                1_000_000,
                &[b'x'; 1024],
                &[b'y'; 16],
            ));
        }
        assert_eq!(t.take_finished(), []);
        t.on_data(&data(
            4,
            R,
            2,
            (80, 90),
            b"HTTP/1.1 201 Created\r\nLocation: /files/a.bin\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(
            (s.start_ns, s.end_ns, s.status, s.request_body_bytes),
            (10, 90, Some(201), 3_000_000)
        );
        assert_eq!(s.peer, Some("[::1]:8443".parse().unwrap()));
        assert_eq!(s.host.as_deref(), Some("[::1]:8443"));
    }

    #[test]
    fn sendfile_body_and_close_delimited() {
        let mut t = tracer();
        // nginx: headers by writev, a 5 MiB file by two sendfile calls.
        t.on_data(&data(
            1,
            R,
            1,
            (0, 5),
            b"GET /big.iso HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            1,
            (10, 20),
            b"HTTP/1.1 200 OK\r\nContent-Length: 5242880\r\n\r\n",
        ));
        let mut ev = data_parts(1, W, 1, (20, 30), 4_000_000, &[], &[]);
        ev.syscall = syscall::SENDFILE;
        t.on_data(&ev);
        assert_eq!(t.take_finished(), []);
        let mut ev = data_parts(1, W, 1, (30, 40), 1_242_880, &[], &[]);
        ev.syscall = syscall::SENDFILE;
        t.on_data(&ev);
        let spans = t.take_finished();
        assert_eq!(
            (spans[0].end_ns, spans[0].response_body_bytes),
            (40, 5_242_880)
        );

        // Python's http.server: HTTP/1.0, no length, ends with the close.
        t.on_data(&data(
            2,
            W,
            1,
            (100, 101),
            b"GET / HTTP/1.1\r\nHost: localhost:8000\r\n\r\n",
        ));
        t.on_data(&data(2, R, 1, (101, 150), b"HTTP/1.0 200 OK\r\nServer: SimpleHTTP/0.6 Python/3.12.3\r\nContent-type: text/html\r\n\r\n"));
        t.on_data(&data(2, R, 1, (150, 160), b"<html></html>"));
        assert_eq!(t.take_finished(), []);
        t.on_conn_close(&close(2));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            (
                spans[0].kind,
                spans[0].start_ns,
                spans[0].end_ns,
                spans[0].response_body_bytes
            ),
            (SpanKind::Client, 100, 160, 13)
        );
    }

    #[test]
    fn chunked_go_response_with_and_without_terminator_bytes() {
        let mut t = tracer();
        t.on_data(&data(
            1,
            R,
            1,
            (0, 5),
            b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        t.on_data(&data(1, W, 1, (10, 20), b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"));
        // A 4000-byte chunk: its size line captured, its end in the tail.
        let mut w = b"fa0\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'd', 4000));
        w.extend_from_slice(b"\r\n");
        t.on_data(&data(1, W, 1, (20, 30), &w));
        t.on_data(&data(1, W, 1, (30, 40), b"0\r\n\r\n"));
        let spans = t.take_finished();
        assert_eq!((spans[0].end_ns, spans[0].response_body_bytes), (40, 4000));

        // Framing lost inside a long write; the end found from a tail.
        t.on_data(&data(
            1,
            R,
            1,
            (50, 55),
            b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        let mut w = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n".to_vec();
        w.extend(std::iter::repeat_n(b'e', 1024));
        w.extend_from_slice(b"\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n");
        t.on_data(&data(1, W, 1, (60, 70), &w));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].end_ns, 70);
        // Next exchange on the connection still parses.
        t.on_data(&data(
            1,
            R,
            1,
            (80, 85),
            b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            1,
            (90, 95),
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(
            (spans[0].path.as_str(), spans[0].status, spans[0].end_ns),
            ("/again", Some(304), 95)
        );
    }

    #[test]
    fn split_head_and_resync_after_lost_events() {
        let mut t = tracer();
        // A request head over three reads: the span starts with the first.
        t.on_data(&data(1, R, 1, (0, 10), b"POST /form HT"));
        t.on_data(&data(
            1,
            R,
            1,
            (20, 30),
            b"TP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Len",
        ));
        t.on_data(&data(1, R, 1, (40, 50), b"gth: 7\r\n\r\na=1&b=2"));
        t.on_data(&data(
            1,
            W,
            1,
            (60, 70),
            b"HTTP/1.1 302 Found\r\nLocation: /\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        assert_eq!(
            (
                spans[0].start_ns,
                spans[0].end_ns,
                spans[0].request_body_bytes
            ),
            (10, 70, 7)
        );

        // The rest of a body lost: the next request line resynchronises.
        t.on_data(&data(
            1,
            R,
            1,
            (100, 110),
            b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123",
        ));
        t.on_data(&data(
            1,
            R,
            1,
            (200, 210),
            b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            1,
            (300, 310),
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        ));
        t.on_data(&data(
            1,
            W,
            1,
            (320, 330),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        let spans = t.take_finished();
        let got: Vec<_> = spans.iter().map(|s| (s.path.as_str(), s.status)).collect();
        assert_eq!(got, [("/a", Some(201)), ("/b", Some(200))]);
        assert_eq!(t.stats().resync, 1);

        // Garbage, then a response whose head was lost: it is skipped,
        // the request stays unanswered until the close.
        t.on_data(&data(1, R, 1, (400, 410), b"\x00\x01garbage"));
        t.on_data(&data(1, R, 1, (420, 430), b"GET /c HTTP/1.1\r\n\r\n"));
        t.on_data(&data(1, W, 1, (440, 450), b"tent-Length: 0\r\n\r\n"));
        t.on_conn_close(&close(1));
        assert_eq!(t.take_finished(), []);
        let s = t.stats();
        assert_eq!((s.garbage, s.requests_unanswered, s.conns), (2, 1, 0));
    }

    #[test]
    fn unmatched_and_unanswered() {
        let mut t = tracer();
        t.on_data(&data(
            1,
            W,
            1,
            (0, 1),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        ));
        t.on_data(&data(1, R, 1, (2, 3), b"GET / HTTP/1.1\r\n\r\n"));
        t.on_conn_close(&close(1));
        let s = t.stats();
        assert_eq!(
            (
                s.responses_unmatched,
                s.requests_unanswered,
                s.spans_finished
            ),
            (1, 1, 0)
        );
        // A response cut by the close is dropped.
        t.on_data(&data(2, W, 1, (0, 1), b"GET / HTTP/1.1\r\n\r\n"));
        t.on_data(&data(
            2,
            R,
            1,
            (2, 3),
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",
        ));
        t.on_conn_close(&close(2));
        let s = t.stats();
        assert_eq!(
            (s.responses_dropped, s.incomplete, s.spans_finished),
            (1, 1, 0)
        );
    }

    #[test]
    fn tls_plaintext_from_openssl() {
        let mut t = tracer();
        // Ciphertext on the socket first (ClientHello), then plaintext.
        t.on_data(&data(
            1,
            R,
            1,
            (0, 1),
            b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03",
        ));
        let mut ev = data(1, R, 1, (2, 3), CURL_GET);
        ev.syscall = syscall::SSL_READ;
        t.on_data(&ev);
        t.on_data(&data(1, W, 1, (4, 5), b"\x17\x03\x03\x00\x20ciphertext"));
        let mut ev = data(1, W, 1, (6, 7), NGINX_200);
        ev.syscall = syscall::SSL_WRITE;
        t.on_data(&ev);
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        assert_eq!((spans[0].scheme, spans[0].end_ns), (Scheme::Https, 7));
        let s = t.stats();
        assert_eq!((s.garbage, s.data_events_ignored, s.data_events), (1, 1, 4));
    }

    #[test]
    fn bounds() {
        let cfg = TracerConfig {
            max_conns: 2,
            max_pending: 2,
            idle_timeout_ns: 1_000,
            max_finished: 1,
        };
        let mut t = HttpTracer::with_seed(cfg, 1);
        t.on_conn_open(&open(1, role::SERVER, "127.0.0.1:1"));
        t.on_conn_open(&open(2, role::SERVER, "127.0.0.1:2"));
        t.on_conn_open(&open(3, role::SERVER, "127.0.0.1:3"));
        t.on_data(&data(4, R, 1, (0, 1), b"GET / HTTP/1.1\r\n\r\n"));
        assert_eq!((t.stats().conns, t.stats().conns_refused), (2, 2));
        // Three requests pending: the oldest is given up.
        for (i, p) in ["/a", "/b", "/c"].iter().enumerate() {
            let req = format!("GET {p} HTTP/1.1\r\n\r\n");
            t.on_data(&data(
                1,
                R,
                9,
                (10 + i as u64, 11 + i as u64),
                req.as_bytes(),
            ));
        }
        assert_eq!((t.stats().pending, t.stats().requests_unanswered), (2, 1));
        t.on_data(&data(1, W, 9, (20, 21), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        let s = t.stats();
        assert_eq!((s.spans_finished, s.spans_dropped), (1, 1));
        assert_eq!(t.take_finished()[0].path, "/b");
        // The request that was given up no longer counts as served.
        assert!(t.shared.serving.is_empty());
        // Idle connections expire; their requests are given up.
        t.on_data(&data(2, R, 9, (500, 600), b"GET /d HTTP/1.1\r\n\r\n"));
        t.expire(1_500);
        assert_eq!((t.stats().conns, t.stats().conns_expired), (1, 1));
        t.expire(1_601);
        let s = t.stats();
        assert_eq!(
            (s.conns, s.conns_expired, s.requests_unanswered, s.pending),
            (0, 2, 2, 0)
        );
        assert!(t.shared.serving.is_empty());
    }

    #[test]
    fn targets_and_addresses() {
        assert_eq!(
            split_target("GET", "/a/b?x=1&y"),
            (None, "/a/b".into(), Some("x=1&y".into()))
        );
        assert_eq!(
            split_target("GET", "http://example.com:8080?q"),
            (
                Some("example.com:8080".into()),
                "/".into(),
                Some("q".into())
            )
        );
        assert_eq!(split_target("OPTIONS", "*"), (None, "*".into(), None));
        // Not ASCII where the scheme would end (found by the fuzzer).
        assert_eq!(
            split_target("GET", "/\u{e9}\u{e9}\u{e9}"),
            (None, "/\u{e9}\u{e9}\u{e9}".into(), None)
        );
        assert_eq!(
            split_target("CONNECT", "db:5432"),
            (Some("db:5432".into()), String::new(), None)
        );
        let mut a = SockAddr {
            family: 10,
            port: 443,
            ..SockAddr::default()
        };
        a.addr[10] = 0xff;
        a.addr[11] = 0xff;
        a.addr[12..].copy_from_slice(&[192, 168, 1, 2]);
        assert_eq!(sock_addr(&a), Some("192.168.1.2:443".parse().unwrap()));
        assert_eq!(sock_addr(&SockAddr::default()), None);
    }

    /// The record the kernel sends for an exchange whose request is
    /// `request` (its request line, `Host` and `User-Agent` copied as
    /// `pair.rs` copies them).
    fn record(
        conn_id: u64,
        r: u8,
        tid: u32,
        (start_ns, end_ns): (u64, u64),
        request: &[u8],
        (status, response_body): (u16, u64),
        c: TraceContext,
    ) -> SpanRecord {
        use fathom_common::http::{SPAN_AGENT, SPAN_HOST, SPAN_LINE};
        fn field<const N: usize>(request: &[u8], name: &str) -> [u8; N] {
            let mut out = [0u8; N];
            let text = String::from_utf8_lossy(request);
            if let Some(line) = text
                .split("\r\n")
                .skip(1)
                .find(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            {
                let v = line[name.len() + 1..].trim_start();
                let v = format!("{v}\r");
                out[..v.len()].copy_from_slice(v.as_bytes());
            }
            out
        }
        let mut line = [0u8; SPAN_LINE];
        let n = request.len().min(SPAN_LINE);
        line[..n].copy_from_slice(&request[..n]);
        SpanRecord {
            kind: event_kind::SPAN,
            role: r,
            flags: span_flags::TCP,
            _reserved: 0,
            status,
            _reserved2: 0,
            tgid: PID,
            tid,
            conn_id,
            start_ns,
            end_ns,
            response_body,
            srtt_us: 40,
            retrans_first: 3,
            retrans_last: 5,
            _reserved3: 0,
            ctx: c,
            line,
            host: field::<SPAN_HOST>(request, "host"),
            agent: field::<SPAN_AGENT>(request, "user-agent"),
        }
    }

    #[test]
    fn a_paired_exchange_is_the_span_user_space_would_have_parsed() {
        let server_ctx = ctx(ctx_flags::SERVER | ctx_flags::REMOTE_PARENT, 1, 2, 9);
        let client_ctx = ctx(
            ctx_flags::CLIENT_INJECTED | ctx_flags::LOCAL_PARENT,
            1,
            3,
            2,
        );
        let backend = b"GET /inventory?all=1 HTTP/1.1\r\nHost: inventory:9000\r\nUser-Agent: Go-http-client/1.1\r\n\r\n";
        let backend_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]";
        // Parsed: the exchanges as data events.
        let mut parsed = tracer();
        parsed.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        parsed.on_conn_open(&open(2, role::CLIENT, "127.0.0.1:9000"));
        parsed.on_data(&with_tcp(
            with_ctx(data(1, R, 7, (100, 100), CURL_GET), server_ctx),
            40,
            3,
        ));
        parsed.on_data(&with_tcp(
            with_ctx(data(2, W, 7, (300, 300), backend), client_ctx),
            40,
            3,
        ));
        parsed.on_data(&with_tcp(data(2, R, 7, (900, 900), backend_200), 40, 5));
        parsed.on_data(&with_tcp(data(1, W, 7, (1_700, 1_700), NGINX_200), 40, 5));
        let mut want = parsed.take_finished();
        // Paired: one record each.
        let mut paired = tracer();
        paired.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        paired.on_conn_open(&open(2, role::CLIENT, "127.0.0.1:9000"));
        paired.on_span(&record(
            2,
            role::CLIENT,
            7,
            (300, 900),
            backend,
            (200, 2),
            client_ctx,
        ));
        paired.on_span(&record(
            1,
            role::SERVER,
            7,
            (100, 1_700),
            CURL_GET,
            (200, 12),
            server_ctx,
        ));
        let mut got = paired.take_finished();
        assert_eq!(paired.stats().paired, 2);
        want.sort_by_key(|s| s.start_ns);
        got.sort_by_key(|s| s.start_ns);
        assert_eq!(got, want);
        assert_eq!(got[0].user_agent.as_deref(), Some("curl/8.5.0"));
        assert_eq!(got[0].query.as_deref(), Some("id=7&sig=abc"));
        assert_eq!(got[1].host.as_deref(), Some("inventory:9000"));
        assert_eq!(got[1].parent_span_id, Some([2; 8]));
        assert_eq!(
            got[0].tcp,
            Some(TcpSpan {
                srtt_us: 40,
                retransmits: 2
            })
        );
    }

    #[test]
    fn a_pending_record_is_answered_by_the_parsed_response() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        let mut rec = record(
            1,
            role::SERVER,
            7,
            (100, 100),
            CURL_GET,
            (0, 0),
            ctx(ctx_flags::SERVER, 1, 2, 0),
        );
        rec.flags |= span_flags::PENDING;
        t.on_span(&rec);
        assert!(t.take_finished().is_empty());
        assert_eq!(t.stats().pending, 1);
        // The kernel stopped pairing (an interim response): user space
        // parses the rest.
        t.on_data(&data(
            1,
            W,
            7,
            (200, 200),
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        ));
        t.on_data(&data(1, W, 7, (500, 500), NGINX_200));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!((s.status, s.start_ns, s.end_ns), (Some(200), 100, 500));
        assert_eq!((s.trace_id, s.span_id), ([1; 16], [2; 8]));
        assert_eq!(s.path, "/api/items");
        assert_eq!(s.response_body_bytes, 12);
    }

    #[test]
    fn a_paired_call_from_a_pipelined_request_joins_the_kernels_trace() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        t.on_conn_open(&open(2, role::CLIENT, "127.0.0.1:9000"));
        // Two requests in one read: the kernel opened the first only.
        let two = [CURL_GET, CURL_GET].concat();
        t.on_data(&with_ctx(
            data(1, R, 7, (100, 100), &two),
            ctx(ctx_flags::SERVER, 1, 2, 0),
        ));
        t.on_data(&data(1, W, 7, (200, 200), NGINX_200));
        // The second's call: the kernel knew of no request served and
        // started a trace (0x05); user space knows the thread serves one.
        let backend = b"GET /inventory HTTP/1.1\r\nHost: inventory:9000\r\n\r\n";
        t.on_span(&record(
            2,
            role::CLIENT,
            7,
            (300, 400),
            backend,
            (200, 2),
            ctx(ctx_flags::CLIENT_INJECTED, 5, 6, 0),
        ));
        t.on_data(&data(1, W, 7, (500, 500), NGINX_200));
        let spans = t.take_finished();
        assert_eq!(spans.len(), 3);
        let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
        let second = spans
            .iter()
            .find(|s| s.kind == SpanKind::Server && s.end_ns == 500)
            .unwrap();
        assert_eq!(client.trace_id, [5; 16]);
        assert_eq!(second.trace_id, [5; 16]);
        assert_eq!(client.parent_span_id, Some(second.span_id));
    }

    #[test]
    fn a_record_whose_line_does_not_read_is_counted() {
        let mut t = tracer();
        t.on_conn_open(&open(1, role::SERVER, "10.0.0.9:40000"));
        let mut rec = record(
            1,
            role::SERVER,
            7,
            (100, 200),
            CURL_GET,
            (200, 12),
            ctx(ctx_flags::SERVER, 1, 2, 0),
        );
        rec.line = [b'A'; fathom_common::http::SPAN_LINE];
        t.on_span(&rec);
        rec.line[..5].copy_from_slice(b"GET\r\n");
        t.on_span(&rec);
        assert!(t.take_finished().is_empty());
        assert_eq!(t.stats().paired_malformed, 2);
    }
}
