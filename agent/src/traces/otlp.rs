//! Finished [`HttpSpan`]s as an OTLP traces request, one `ResourceSpans` per
//! process, with the stable OpenTelemetry HTTP semantic conventions.
//!
//! Span name: the method (`HTTP` for methods outside the known set, as the
//! conventions say, with `http.request.method` `_OTHER` and
//! `http.request.method_original`), never the path. Status: Error for 5xx,
//! and for 4xx on client spans, with `error.type` the status code; Unset
//! otherwise.

use std::net::{IpAddr, Ipv4Addr};

use opentelemetry_proto::tonic::{
    common::v1::InstrumentationScope,
    trace::v1::{span, status},
};

use super::spans::{HttpSpan, SpanKind};
use crate::otlp::ResourceInfo;

/// Instrumentation scope of Fathom's HTTP spans and metrics.
pub const SCOPE_NAME: &str = "fathom.http";

/// Methods of the HTTP conventions' known set (RFC 9110 and PATCH).
const KNOWN_METHODS: [&str; 9] = [
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
];

/// Query parameters whose values `url.full` redacts (the conventions'
/// default list).
const REDACTED_QUERY_KEYS: [&str; 4] = ["AWSAccessKeyId", "Signature", "sig", "X-Goog-Signature"];

/// W3C trace flags `sampled`, and OTLP `SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE` /
/// `SPAN_FLAGS_CONTEXT_IS_REMOTE`.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// The instrumentation scope of spans and metrics.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..InstrumentationScope::default()
    }
}

/// `http.request.method`: the method when known, else `_OTHER`.
pub fn method_attr(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("_OTHER")
}

/// `a.b.c.d`, as `Ipv4Addr`'s `Display` writes it.
fn push_ipv4(out: &mut String, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// Monotonic nanoseconds to Unix nanoseconds (clamped to `u64`).
fn unix_ns(mono_ns: u64, offset_ns: i64) -> u64 {
    let t = i128::from(mono_ns) + i128::from(offset_ns);
    t.clamp(0, i128::from(u64::MAX)) as u64
}

/// `host[:port]` of a `Host` header or authority (IPv6 in brackets).
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    // Userinfo is not part of the host.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (authority, None),
    }
}

/// The query with the values of the redacted keys replaced, appended to
/// `out`.
fn redact_query_into(query: &str, out: &mut String) {
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((k, _)) if REDACTED_QUERY_KEYS.contains(&k) => {
                out.push_str(k);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
}

/// Protobuf wire types used here.
const LEN: u32 = 2;
const VARINT: u32 = 0;
const I64: u32 = 1;
const I32: u32 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

/// A length-delimited field (bytes, string or a message already encoded).
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Length of a length-delimited field with a one-byte key.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// `Span.attributes` (field 9): a string `KeyValue`.
fn put_kv_str(out: &mut Vec<u8>, key: &str, value: &str) {
    // AnyValue { string_value (1) }: a oneof, written even when empty.
    let any = field_len(value.len());
    put_key(out, 9, LEN);
    put_varint(out, (field_len(key.len()) + field_len(any)) as u64);
    put_bytes(out, 1, key.as_bytes());
    put_key(out, 2, LEN);
    put_varint(out, any as u64);
    put_bytes(out, 1, value.as_bytes());
}

/// `Span.attributes` (field 9): an integer `KeyValue`.
fn put_kv_int(out: &mut Vec<u8>, key: &str, value: i64) {
    // AnyValue { int_value (3) }.
    let any = 1 + varint_len(value as u64);
    put_key(out, 9, LEN);
    put_varint(out, (field_len(key.len()) + field_len(any)) as u64);
    put_bytes(out, 1, key.as_bytes());
    put_key(out, 2, LEN);
    put_varint(out, any as u64);
    put_key(out, 3, VARINT);
    put_varint(out, value as u64);
}

/// Encodes finished [`HttpSpan`]s straight to OTLP protobuf bytes: no
/// message structs per span or attribute, buffers reused from one call to
/// the next. The bytes are what prost would write for the same spans (a
/// test decodes and re-encodes them), so any OTLP receiver reads them.
#[derive(Default)]
pub struct SpanEncoder {
    /// The span being encoded.
    span: Vec<u8>,
    /// The `ScopeSpans` of one process.
    scope_spans: Vec<u8>,
    /// Text built for one attribute (`url.full`, an address, a query).
    text: String,
    /// A peer address as text.
    ip: String,
    /// Span indices ordered by process.
    order: Vec<usize>,
    /// The scope message, encoded once.
    scope: Vec<u8>,
    /// Whether [`HttpSpan::profiled`] spans carry `pyroscope.profile.id`.
    link_profiles: bool,
}

impl SpanEncoder {
    /// An encoder that puts `pyroscope.profile.id` (the span's own id, as
    /// Grafana's traces-to-profiles looks it up) on server spans whose
    /// thread's CPU samples carry their span id: the profiler runs too.
    pub fn linking_profiles() -> Self {
        Self {
            link_profiles: true,
            ..Self::default()
        }
    }

    /// Spans as one encoded `ExportTraceServiceRequest`: a `ResourceSpans`
    /// per process (ordered by pid, spans in their order) with the resource
    /// `resource_of(pid)`, one scope ([`SCOPE_NAME`]). `unix_offset_ns` is
    /// Unix time minus CLOCK_MONOTONIC.
    pub fn request(
        &mut self,
        spans: &[HttpSpan],
        mut resource_of: impl FnMut(u32) -> ResourceInfo,
        unix_offset_ns: i64,
    ) -> Vec<u8> {
        use prost::Message;
        if self.scope.is_empty() {
            self.scope = scope().encode_to_vec();
        }
        self.order.clear();
        self.order.extend(0..spans.len());
        self.order.sort_by_key(|&i| spans[i].pid);
        let mut out = Vec::with_capacity(spans.len() * 400);
        let mut i = 0;
        while i < self.order.len() {
            let pid = spans[self.order[i]].pid;
            self.scope_spans.clear();
            put_bytes(&mut self.scope_spans, 1, &self.scope);
            while i < self.order.len() && spans[self.order[i]].pid == pid {
                let mut span = std::mem::take(&mut self.span);
                span.clear();
                self.encode_span(&spans[self.order[i]], unix_offset_ns, &mut span);
                put_bytes(&mut self.scope_spans, 2, &span);
                self.span = span;
                i += 1;
            }
            let resource = resource_of(pid).to_otlp().encode_to_vec();
            // ResourceSpans { resource (1), scope_spans (2) }.
            put_key(&mut out, 1, LEN);
            put_varint(
                &mut out,
                (field_len(resource.len()) + field_len(self.scope_spans.len())) as u64,
            );
            put_bytes(&mut out, 1, &resource);
            put_bytes(&mut out, 2, &self.scope_spans);
        }
        out
    }

    /// One `Span` message's fields (without its own key and length), in
    /// field order, default values left out as prost does.
    fn encode_span(&mut self, s: &HttpSpan, unix_offset_ns: i64, out: &mut Vec<u8>) {
        use std::fmt::Write;
        let method = method_attr(&s.method);
        let name = if method == "_OTHER" { "HTTP" } else { method };
        put_bytes(out, 1, &s.trace_id);
        put_bytes(out, 2, &s.span_id);
        if let Some(parent) = &s.parent_span_id {
            put_bytes(out, 4, parent);
        }
        put_bytes(out, 5, name.as_bytes());
        let kind = match s.kind {
            SpanKind::Server => span::SpanKind::Server,
            SpanKind::Client => span::SpanKind::Client,
        };
        put_key(out, 6, VARINT);
        put_varint(out, kind as u64);
        let start = unix_ns(s.start_ns, unix_offset_ns);
        let end = unix_ns(s.end_ns.max(s.start_ns), unix_offset_ns);
        for (field, t) in [(7, start), (8, end)] {
            if t != 0 {
                put_key(out, field, I64);
                out.extend_from_slice(&t.to_le_bytes());
            }
        }

        put_kv_str(out, "http.request.method", method);
        self.ip.clear();
        if let Some(p) = s.peer {
            match p.ip().to_canonical() {
                // Digit by digit: `fmt` was a tenth of the encoder's time.
                IpAddr::V4(v4) => push_ipv4(&mut self.ip, v4),
                ip => {
                    let _ = write!(self.ip, "{ip}");
                }
            }
        }
        let peer_ip = s.peer.map(|_| self.ip.as_str());
        if method == "_OTHER" {
            put_kv_str(out, "http.request.method_original", &s.method);
        }
        let host = s.host.as_deref().or(s.target_authority.as_deref());
        let (host_name, host_port) = match host {
            Some(h) => {
                let (n, p) = split_host_port(h);
                (Some(n).filter(|n| !n.is_empty()), p)
            }
            None => (None, None),
        };
        match s.kind {
            SpanKind::Server => {
                if !s.path.is_empty() {
                    put_kv_str(out, "url.path", &s.path);
                }
                if let Some(q) = &s.query {
                    self.text.clear();
                    redact_query_into(q, &mut self.text);
                    put_kv_str(out, "url.query", &self.text);
                }
                put_kv_str(out, "url.scheme", s.scheme.as_str());
                if let Some(h) = host_name {
                    put_kv_str(out, "server.address", h);
                }
                if let Some(p) = host_port.or(s.local_port) {
                    put_kv_int(out, "server.port", i64::from(p));
                }
                if let Some(ip) = peer_ip {
                    put_kv_str(out, "client.address", ip);
                }
            }
            SpanKind::Client => {
                let address = host_name.or(peer_ip);
                let port = host_port
                    .or(if host_name.is_some() {
                        None
                    } else {
                        s.peer.map(|p| p.port())
                    })
                    .or(host_name.map(|_| s.scheme.default_port()));
                if let Some(a) = address {
                    put_kv_str(out, "server.address", a);
                }
                if let Some(p) = port {
                    put_kv_int(out, "server.port", i64::from(p));
                }
                if let (Some(a), false) = (address, s.method == "CONNECT") {
                    self.text.clear();
                    url_full_into(s, a, port, &mut self.text);
                    put_kv_str(out, "url.full", &self.text);
                }
            }
        }
        if let Some(code) = s.status {
            put_kv_int(out, "http.response.status_code", i64::from(code));
        }
        if let (Some(peer), Some(ip)) = (s.peer, peer_ip) {
            put_kv_str(out, "network.peer.address", ip);
            put_kv_int(out, "network.peer.port", i64::from(peer.port()));
        }
        put_kv_str(out, "network.protocol.version", s.version.as_str());
        if let (SpanKind::Server, Some(ua)) = (s.kind, &s.user_agent) {
            put_kv_str(out, "user_agent.original", ua);
        }
        if self.link_profiles && s.profiled && s.kind == SpanKind::Server {
            self.text.clear();
            for b in s.span_id {
                let _ = write!(self.text, "{b:02x}");
            }
            put_kv_str(out, "pyroscope.profile.id", &self.text);
        }
        if let Some(tcp) = s.tcp {
            put_kv_int(out, "fathom.tcp.srtt_us", i64::from(tcp.srtt_us));
            put_kv_int(out, "fathom.tcp.retransmits", i64::from(tcp.retransmits));
        }
        if let Some(us) = s.connect_us {
            put_kv_int(out, "fathom.tcp.connect_us", clamp_i64(us));
        }
        if s.request_body_bytes > 0 {
            put_kv_int(
                out,
                "http.request.body.size",
                clamp_i64(s.request_body_bytes),
            );
        }
        if s.response_body_bytes > 0 {
            put_kv_int(
                out,
                "http.response.body.size",
                clamp_i64(s.response_body_bytes),
            );
        }
        if s.error {
            if let Some(code) = s.status {
                self.text.clear();
                let _ = write!(self.text, "{code}");
                put_kv_str(out, "error.type", &self.text);
            }
            // Status { code (3) = Error }.
            let code = status::StatusCode::Error as u64;
            put_key(out, 15, LEN);
            put_varint(out, (1 + varint_len(code)) as u64);
            put_key(out, 3, VARINT);
            put_varint(out, code);
        }
        let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
        if s.remote_parent {
            flags |= FLAG_IS_REMOTE;
        }
        put_key(out, 16, I32);
        out.extend_from_slice(&flags.to_le_bytes());
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `url.full` of a client span: scheme, authority (the port only when not
/// the scheme's default), path and query (with redactions).
fn url_full_into(s: &HttpSpan, address: &str, port: Option<u16>, url: &mut String) {
    use std::fmt::Write;
    url.push_str(s.scheme.as_str());
    url.push_str("://");
    if address.contains(':') {
        let _ = write!(url, "[{address}]");
    } else {
        url.push_str(address);
    }
    if let Some(p) = port
        && p != s.scheme.default_port()
    {
        let _ = write!(url, ":{p}");
    }
    url.push_str(if s.path.is_empty() { "/" } else { &s.path });
    if let Some(q) = &s.query {
        url.push('?');
        redact_query_into(q, url);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::traces::parse::Version;
    use crate::traces::spans::Scheme;
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::any_value,
        trace::v1::{Span, Status},
    };
    use prost::Message;

    #[test]
    fn ipv4_digits_match_display() {
        for octet in 0..=255u8 {
            for ip in [
                Ipv4Addr::new(octet, 0, 255, octet),
                Ipv4Addr::new(10, octet, 7, 100),
            ] {
                let mut s = String::new();
                push_ipv4(&mut s, ip);
                assert_eq!(s, ip.to_string());
            }
        }
    }

    /// The encoder's bytes, decoded by prost; prost writes the same bytes
    /// back (the encoding is canonical, field by field).
    fn decoded(e: &(Vec<u8>, u64)) -> ExportTraceServiceRequest {
        let req = ExportTraceServiceRequest::decode(e.0.as_slice()).unwrap();
        assert_eq!(req.encode_to_vec(), e.0, "not prost's encoding");
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(n as u64, e.1);
        req
    }

    /// Spans as one OTLP request (see [`SpanEncoder::request`]).
    fn traces_request(
        spans: &[HttpSpan],
        resource_of: impl FnMut(u32) -> ResourceInfo,
        unix_offset_ns: i64,
    ) -> (Vec<u8>, u64) {
        (
            SpanEncoder::default().request(spans, resource_of, unix_offset_ns),
            spans.len() as u64,
        )
    }

    /// One span through the encoder, decoded.
    fn span_to_otlp(s: &HttpSpan, unix_offset_ns: i64) -> Span {
        let mut req = decoded(&traces_request(
            std::slice::from_ref(s),
            |_| ResourceInfo::default(),
            unix_offset_ns,
        ));
        req.resource_spans
            .remove(0)
            .scope_spans
            .remove(0)
            .spans
            .remove(0)
    }

    fn attrs(s: &Span) -> Vec<(String, String)> {
        s.attributes
            .iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    Some(any_value::Value::IntValue(i)) => format!("int:{i}"),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub(crate) fn server_span() -> HttpSpan {
        HttpSpan {
            trace_id: [0xaa; 16],
            span_id: [0xbb; 8],
            parent_span_id: Some([0xcc; 8]),
            remote_parent: true,
            kind: SpanKind::Server,
            start_ns: 1_000,
            end_ns: 51_000_000,
            pid: 10,
            tid: 11,
            conn_id: 1,
            method: "GET".into(),
            path: "/api/items".into(),
            query: Some("id=7".into()),
            target_authority: None,
            scheme: Scheme::Http,
            status: Some(503),
            host: Some("shop.local:8080".into()),
            user_agent: Some("curl/8.5.0".into()),
            version: Version::Http11,
            request_body_bytes: 0,
            response_body_bytes: 12,
            peer: Some("[::ffff:10.1.2.3]:54321".parse().unwrap()),
            local_port: Some(8080),
            tcp: None,
            connect_us: None,
            truncated: false,
            error: true,
            profiled: true,
        }
    }

    #[test]
    fn server_span_conventions() {
        let s = span_to_otlp(&server_span(), 1_700_000_000_000_000_000);
        assert_eq!(s.name, "GET");
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(s.trace_id, vec![0xaa; 16]);
        assert_eq!(s.span_id, vec![0xbb; 8]);
        assert_eq!(s.parent_span_id, vec![0xcc; 8]);
        assert_eq!(s.flags, 0x301);
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_001_000);
        assert_eq!(s.end_time_unix_nano, 1_700_000_000_051_000_000);
        assert_eq!(
            s.status,
            Some(Status {
                code: status::StatusCode::Error as i32,
                message: String::new()
            })
        );
        assert_eq!(
            attrs(&s),
            pairs(&[
                ("http.request.method", "GET"),
                ("url.path", "/api/items"),
                ("url.query", "id=7"),
                ("url.scheme", "http"),
                ("server.address", "shop.local"),
                ("server.port", "int:8080"),
                ("client.address", "10.1.2.3"),
                ("http.response.status_code", "int:503"),
                ("network.peer.address", "10.1.2.3"),
                ("network.peer.port", "int:54321"),
                ("network.protocol.version", "1.1"),
                ("user_agent.original", "curl/8.5.0"),
                ("http.response.body.size", "int:12"),
                ("error.type", "503"),
            ])
        );
    }

    #[test]
    fn tcp_attributes() {
        let mut s = server_span();
        s.tcp = Some(crate::traces::TcpSpan {
            srtt_us: 20_125,
            retransmits: 3,
        });
        s.connect_us = Some(20_300);
        let a = attrs(&span_to_otlp(&s, 0));
        let tcp: Vec<_> = a
            .iter()
            .filter(|(k, _)| k.starts_with("fathom.tcp."))
            .collect();
        assert_eq!(
            tcp,
            [
                &("fathom.tcp.srtt_us".to_string(), "int:20125".to_string()),
                &("fathom.tcp.retransmits".to_string(), "int:3".to_string()),
                &("fathom.tcp.connect_us".to_string(), "int:20300".to_string()),
            ]
        );
        // Unknown: no attribute (not zero).
        let a = attrs(&span_to_otlp(&server_span(), 0));
        assert!(!a.iter().any(|(k, _)| k.starts_with("fathom.tcp.")));
    }

    #[test]
    fn client_span_conventions() {
        let mut c = server_span();
        c.kind = SpanKind::Client;
        c.method = "PROPFIND".into();
        c.host = None;
        c.peer = Some("[fd00::5]:8443".parse().unwrap());
        c.scheme = Scheme::Https;
        c.query = Some("a=1&X-Goog-Signature=secret&sig=x".into());
        c.status = Some(207);
        c.error = false;
        c.parent_span_id = None;
        c.remote_parent = false;
        c.request_body_bytes = 100;
        c.response_body_bytes = 0;
        let s = span_to_otlp(&c, -500);
        assert_eq!(s.name, "HTTP");
        assert_eq!(s.kind, span::SpanKind::Client as i32);
        assert_eq!(s.status, None);
        assert_eq!(s.flags, 0x101);
        assert!(s.parent_span_id.is_empty());
        assert_eq!(
            (s.start_time_unix_nano, s.end_time_unix_nano),
            (500, 50_999_500)
        );
        assert_eq!(
            attrs(&s),
            pairs(&[
                ("http.request.method", "_OTHER"),
                ("http.request.method_original", "PROPFIND"),
                ("server.address", "fd00::5"),
                ("server.port", "int:8443"),
                (
                    "url.full",
                    "https://[fd00::5]:8443/api/items?a=1&X-Goog-Signature=REDACTED&sig=REDACTED"
                ),
                ("http.response.status_code", "int:207"),
                ("network.peer.address", "fd00::5"),
                ("network.peer.port", "int:8443"),
                ("network.protocol.version", "1.1"),
                ("http.request.body.size", "int:100"),
            ])
        );
        // A Host header names the server; the default port is implied.
        c.host = Some("api.example.com".into());
        c.method = "POST".into();
        c.query = None;
        c.status = Some(429);
        c.error = true;
        let s = span_to_otlp(&c, 0);
        let a = attrs(&s);
        assert_eq!(a[1], ("server.address".into(), "api.example.com".into()));
        assert_eq!(a[2], ("server.port".into(), "int:443".into()));
        assert_eq!(
            a[3],
            (
                "url.full".into(),
                "https://api.example.com/api/items".into()
            )
        );
        assert_eq!(a.last(), Some(&("error.type".into(), "429".into())));
        assert_eq!(
            s.status.map(|s| s.code),
            Some(status::StatusCode::Error as i32)
        );
    }

    /// `pyroscope.profile.id` (the span's own id) only on server spans the
    /// profiler labels its samples with, and only when it runs.
    #[test]
    fn profile_id_on_profiled_server_spans_when_profiling() {
        let server = server_span();
        let mut client = server_span();
        client.kind = SpanKind::Client;
        let mut unprofiled = server_span();
        unprofiled.profiled = false;
        let profile_id = |encoder: &mut SpanEncoder, s: &HttpSpan| {
            let bytes = encoder.request(std::slice::from_ref(s), |_| ResourceInfo::default(), 0);
            let span = decoded(&(bytes, 1)).resource_spans[0].scope_spans[0].spans[0].clone();
            attrs(&span)
                .into_iter()
                .find(|(k, _)| k == "pyroscope.profile.id")
                .map(|(_, v)| v)
        };
        let mut linking = SpanEncoder::linking_profiles();
        assert_eq!(
            profile_id(&mut linking, &server).as_deref(),
            Some("bbbbbbbbbbbbbbbb")
        );
        assert_eq!(profile_id(&mut linking, &client), None);
        assert_eq!(profile_id(&mut linking, &unprofiled), None);
        assert_eq!(profile_id(&mut SpanEncoder::default(), &server), None);
    }

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("u:p@h:1"), ("h", Some(1)));
        assert_eq!(split_host_port("h:x"), ("h", None));
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(out.len(), prost::encoding::encoded_len_varint(v), "{v}");
        }
        assert_eq!(unix_ns(5, -10), 0);
        assert_eq!(unix_ns(u64::MAX, 10), u64::MAX);
    }

    /// Every optional field present and absent, odd methods, extreme
    /// numbers: prost decodes the bytes and writes them back unchanged
    /// ([`decoded`]), span for span.
    #[test]
    fn encoding_is_prosts_for_every_shape() {
        let mut spans = Vec::new();
        for i in 0..64u32 {
            let mut s = server_span();
            s.pid = i % 5;
            s.span_id = [i as u8; 8];
            if i & 1 != 0 {
                s.kind = SpanKind::Client;
            }
            if i & 2 != 0 {
                s.peer = None;
                s.parent_span_id = None;
            }
            if i & 4 != 0 {
                s.peer = Some("192.0.2.9:80".parse().unwrap());
                s.host = None;
                s.target_authority = Some("[2001:db8::1]:8443".into());
            }
            if i & 8 != 0 {
                s.method = ["CONNECT", "", "M-SEARCH", "post"][(i as usize / 8) % 4].into();
                s.path.clear();
                s.query = Some(String::new());
            }
            if i & 16 != 0 {
                s.status = None;
                s.user_agent = None;
                s.tcp = Some(crate::traces::TcpSpan {
                    srtt_us: u32::MAX,
                    retransmits: 0,
                });
                s.connect_us = Some(u64::MAX);
                s.request_body_bytes = u64::MAX;
                s.start_ns = 0;
                s.end_ns = 0;
            }
            if i & 32 != 0 {
                s.error = false;
                s.response_body_bytes = 0;
                s.local_port = None;
                s.path = "/é/ünïcode".into();
            }
            spans.push(s);
        }
        let resource = |pid| ResourceInfo {
            service_name: format!("svc-{pid}"),
            pid: Some(pid),
            ..ResourceInfo::default()
        };
        let mut encoder = SpanEncoder::default();
        for offset in [0, -1, i64::MAX] {
            // The same encoder, reused: nothing of one request leaks into
            // the next.
            let once = (encoder.request(&spans, resource, offset), 64);
            let req = decoded(&once);
            assert_eq!(req.resource_spans.len(), 5);
            for (pid, rs) in req.resource_spans.iter().enumerate() {
                let ids: Vec<u8> = rs.scope_spans[0]
                    .spans
                    .iter()
                    .map(|s| s.span_id[0])
                    .collect();
                let want: Vec<u8> = (0..64u8).filter(|i| usize::from(*i) % 5 == pid).collect();
                assert_eq!(ids, want);
            }
            let again = decoded(&(encoder.request(&spans, resource, offset), 64));
            assert_eq!(again, req);
        }
        assert!(
            encoder
                .request(&[], |_| ResourceInfo::default(), 0)
                .is_empty()
        );
    }

    #[test]
    fn one_resource_per_process() {
        let a = server_span();
        let mut b = server_span();
        b.pid = 3;
        b.span_id = [1; 8];
        let req = decoded(&traces_request(
            &[a.clone(), b, a],
            |pid| ResourceInfo {
                service_name: format!("svc-{pid}"),
                pid: Some(pid),
                executable_name: Some("server".into()),
                container_id: (pid == 3).then(|| "abc123".into()),
                extra: vec![("service.namespace".into(), "shop".into())],
            },
            0,
        ));
        assert_eq!(req.resource_spans.len(), 2);
        let r0 = &req.resource_spans[0];
        let res = r0.resource.as_ref().unwrap();
        let keys: Vec<_> = res.attributes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "service.name",
                "process.pid",
                "process.executable.name",
                "container.id",
                "service.namespace"
            ]
        );
        assert_eq!(
            res.attributes[0].value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("svc-3".into()))
        );
        assert_eq!(r0.scope_spans[0].spans.len(), 1);
        assert_eq!(
            r0.scope_spans[0].scope.as_ref().unwrap().name,
            "fathom.http"
        );
        let r1 = &req.resource_spans[1];
        assert_eq!(r1.scope_spans[0].spans.len(), 2);
        assert_eq!(r1.resource.as_ref().unwrap().attributes.len(), 4);
    }
}
