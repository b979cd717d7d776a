//! The HTTP tracer (`agent/src/traces`: parse, spans, otlp, metrics) on arbitrary event sequences, decoded
//! from the input as records (see `make-seeds`, which writes realistic
//! ones): connection opens and closes, reads and writes with captured heads,
//! uncaptured middles and tails, kernel trace contexts, exchanges the
//! kernel paired (whole or pending, any bytes in their text fields), expiry; finished
//! spans go through the OTLP conversion and the RED metrics. Nothing may
//! panic, and what is kept stays within the configured bounds.
#![no_main]

// The tracing signal's pure modules, and the shared OTLP helpers they use,
// at the paths they have in the agent (`crate::otlp`, `crate::traces::*`).
#[path = "../../src/otlp.rs"]
#[allow(dead_code)]
mod otlp;
#[path = "../../src/traces"]
#[allow(dead_code, unused_imports)]
mod traces {
    pub mod metrics;
    pub mod otlp;
    pub mod parse;
    pub mod spans;

    pub use metrics::{HttpMetrics, MetricsConfig};
    pub use otlp::SpanEncoder;
    pub use spans::{HttpTracer, TracerConfig};
}

use fathom_common::http::{
    CAPTURE_HEAD, CAPTURE_TAIL, ConnEvent, DataEvent, SPAN_AGENT, SPAN_HOST, SPAN_LINE, SockAddr,
    SpanRecord, TraceContext, event_kind, syscall,
};
use libfuzzer_sys::fuzz_target;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric;
use otlp::ResourceInfo;
use prost::Message;
use traces::{HttpMetrics, HttpTracer, MetricsConfig, SpanEncoder, TracerConfig};

const MAX_CONNS: usize = 4;
const MAX_PENDING: usize = 3;

struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u24(&mut self) -> u64 {
        u64::from(self.byte()) | u64::from(self.byte()) << 8 | u64::from(self.byte()) << 16
    }
}

fn conn_event(kind: u8, conn_id: u64, b: u8, now: u64) -> ConnEvent {
    let mut peer = SockAddr::default();
    match b & 3 {
        0 => {}
        1 => {
            peer.family = 2;
            peer.addr[..4].copy_from_slice(&[127, 0, 0, b]);
        }
        2 => {
            peer.family = 10;
            peer.addr[15] = b;
        }
        _ => peer.family = u16::from(b),
    }
    peer.port = u16::from(b) * 257;
    ConnEvent {
        kind,
        role: b >> 6,
        _reserved: [0; 2],
        tgid: u32::from(b & 1) + 100,
        tid: 1,
        fd: 3,
        conn_id,
        ts_ns: now,
        peer,
        listen_fd: u32::MAX,
        _reserved2: 0,
        // This end: the peer's family, another port (or none).
        local: SockAddr {
            port: u16::from(b).wrapping_mul(3),
            ..peer
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = TracerConfig {
        max_conns: MAX_CONNS,
        max_pending: MAX_PENDING,
        idle_timeout_ns: 1_000_000,
        max_finished: 8,
    };
    let mut tracer = HttpTracer::with_seed(cfg, 1);
    let mut metrics = HttpMetrics::new(MetricsConfig { max_series: 6 }, 0);
    let mut input = Input { data };
    let mut now: u64 = 1;
    let mut spans_seen = 0u64;
    while !input.data.is_empty() {
        let op = input.byte();
        let conn_id = u64::from(op >> 4) & 7;
        now = now.saturating_add(u64::from(input.byte()) * 1000);
        match op & 7 {
            0 => {
                let b = input.byte();
                tracer.on_conn_open(&conn_event(event_kind::CONN_OPEN, conn_id, b, now));
            }
            1 => tracer.on_conn_close(&conn_event(event_kind::CONN_CLOSE, conn_id, 0, now)),
            2 => tracer.expire(now),
            3 => tracer.set_local_port(conn_id, input.u16()),
            4 => {
                let spans = tracer.take_finished();
                spans_seen += spans.len() as u64;
                let resource = |pid: u32| ResourceInfo {
                    service_name: format!("s{}", pid % 3),
                    pid: Some(pid),
                    ..ResourceInfo::default()
                };
                for s in &spans {
                    metrics.record(&resource(s.pid), s);
                }
                let mut encoder = if input.byte() & 1 == 0 {
                    SpanEncoder::linking_profiles()
                } else {
                    SpanEncoder::default()
                };
                let bytes = encoder.request(&spans, resource, i64::from(input.byte()) - 128);
                // prost reads the encoder's bytes and writes the same ones.
                let req = ExportTraceServiceRequest::decode(bytes.as_slice())
                    .expect("the encoder's bytes decode");
                assert_eq!(req.encode_to_vec(), bytes);
                let n: usize = req
                    .resource_spans
                    .iter()
                    .map(|r| r.scope_spans[0].spans.len())
                    .sum();
                assert_eq!(n, spans.len());
                for r in &req.resource_spans {
                    for s in &r.scope_spans[0].spans {
                        assert_eq!((s.trace_id.len(), s.span_id.len()), (16, 8));
                        assert!(!s.name.is_empty());
                        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
                    }
                }
                assert!(metrics.series() <= 6);
                for rm in &metrics.export(now).resource_metrics {
                    for m in &rm.scope_metrics[0].metrics {
                        let Some(metric::Data::Histogram(h)) = &m.data else {
                            panic!("not a histogram");
                        };
                        for p in &h.data_points {
                            assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
                            assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
                        }
                    }
                }
            }
            7 if input.data.first().is_some_and(|b| b & 0x40 != 0) => {
                // An exchange the kernel paired.
                let flags = input.byte();
                let mut rec = SpanRecord {
                    kind: event_kind::SPAN,
                    role: flags & 3,
                    flags: flags >> 2,
                    _reserved: 0,
                    status: input.u16(),
                    _reserved2: 0,
                    tgid: 100,
                    tid: u32::from(input.byte() & 3) + 1,
                    conn_id,
                    start_ns: now,
                    end_ns: now.saturating_add(input.u24()),
                    response_body: input.u24(),
                    srtt_us: u32::from(input.byte()) * 100,
                    retrans_first: u32::from(input.byte()),
                    retrans_last: u32::from(input.byte()),
                    _reserved3: 0,
                    ctx: TraceContext {
                        trace_id: [op | 1; 16],
                        span_id: [flags | 1; 8],
                        parent_span_id: [flags; 8],
                        flags: input.byte() & 0xf,
                        _reserved: [0; 7],
                    },
                    line: [0; SPAN_LINE],
                    host: [0; SPAN_HOST],
                    agent: [0; SPAN_AGENT],
                };
                let n = usize::from(input.byte()) % (SPAN_LINE + 1);
                let bytes = input.take(n);
                rec.line[..bytes.len()].copy_from_slice(bytes);
                let n = usize::from(input.byte()) % (SPAN_HOST + 1);
                let bytes = input.take(n);
                rec.host[..bytes.len()].copy_from_slice(bytes);
                let n = usize::from(input.byte()) % (SPAN_AGENT + 1);
                let bytes = input.take(n);
                rec.agent[..bytes.len()].copy_from_slice(bytes);
                tracer.on_span(&rec);
            }
            _ => {
                // A read or write.
                let flags = input.byte();
                let tid = u32::from(input.byte() & 3) + 1;
                let n = usize::from(input.u16()) % (CAPTURE_HEAD + 64);
                let head = input.take(n.min(CAPTURE_HEAD));
                let extra = if flags & 0x80 != 0 { input.u24() } else { 0 };
                let tail = if extra > 0 {
                    input.take(CAPTURE_TAIL)
                } else {
                    &[][..]
                };
                let mut ev = DataEvent {
                    kind: event_kind::DATA,
                    direction: flags & 1,
                    syscall: match (flags >> 1) & 3 {
                        0 | 1 => syscall::READ,
                        2 => syscall::SENDFILE,
                        _ => syscall::SSL_READ,
                    },
                    // Sometimes with the connection's TCP state, which
                    // varies (retransmit counters may go backwards or wrap).
                    flags: (flags >> 5) & 1,
                    tgid: 100,
                    tid,
                    fd: 3,
                    conn_id,
                    start_ns: now,
                    end_ns: now.saturating_add(u64::from(flags)),
                    len: head.len() as u64 + extra,
                    head_len: head.len() as u32,
                    tail_len: tail.len() as u32,
                    srtt_us: u32::from(flags) * 1000,
                    total_retrans: u32::from(op).wrapping_mul(0x0101_0101),
                    ctx: TraceContext {
                        trace_id: [op | 1; 16],
                        span_id: [flags | 1; 8],
                        parent_span_id: [tid as u8; 8],
                        flags: (flags >> 3) & 0xf,
                        _reserved: [0; 7],
                    },
                    head: [0; CAPTURE_HEAD],
                    tail: [0; CAPTURE_TAIL],
                };
                if ev.syscall == syscall::SENDFILE {
                    ev.head_len = 0;
                }
                ev.head[..head.len()].copy_from_slice(head);
                ev.tail[..tail.len()].copy_from_slice(tail);
                tracer.on_data(&ev);
            }
        }
        let s = tracer.stats();
        assert!(s.conns <= MAX_CONNS as u64);
        assert!(s.pending <= (MAX_CONNS * 2 * MAX_PENDING) as u64);
        assert!(
            s.buffered_bytes
                <= (MAX_CONNS * 2 * (traces::parse::MAX_HEAD_BYTES + 4 + 1024)) as u64 * 2
        );
    }
    let _ = spans_seen;
});
