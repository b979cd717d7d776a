//! Finished [`HttpSpan`]s as an OTLP traces request, one `ResourceSpans` per
//! process, with the stable OpenTelemetry HTTP semantic conventions.
//!
//! Span name: the method (`HTTP` for methods outside the known set, as the
//! conventions say, with `http.request.method` `_OTHER` and
//! `http.request.method_original`), never the path. Status: Error for 5xx,
//! and for 4xx on client spans, with `error.type` the status code; Unset
//! otherwise.

use std::collections::BTreeMap;
use std::net::IpAddr;

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::InstrumentationScope,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status},
};

use super::spans::{HttpSpan, SpanKind};
use crate::otlp::{ResourceInfo, kv_int, kv_str};

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
pub fn method_attr(method: &str) -> &str {
    if KNOWN_METHODS.contains(&method) {
        method
    } else {
        "_OTHER"
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

/// The query with the values of the redacted keys replaced.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if REDACTED_QUERY_KEYS.contains(&k) => format!("{k}=REDACTED"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn ip_string(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

/// One span in OTLP form; times shifted by `unix_offset_ns`.
pub fn span_to_otlp(s: &HttpSpan, unix_offset_ns: i64) -> Span {
    let method = method_attr(&s.method);
    let name = if method == "_OTHER" { "HTTP" } else { method };
    // Up to 14 attributes: one allocation for the vector.
    let mut attrs = Vec::with_capacity(14);
    attrs.push(kv_str("http.request.method", method));
    let peer_ip = s.peer.map(|p| ip_string(p.ip()));
    if method == "_OTHER" {
        attrs.push(kv_str("http.request.method_original", &s.method));
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
                attrs.push(kv_str("url.path", &s.path));
            }
            if let Some(q) = &s.query {
                attrs.push(kv_str("url.query", &redact_query(q)));
            }
            attrs.push(kv_str("url.scheme", s.scheme.as_str()));
            if let Some(h) = host_name {
                attrs.push(kv_str("server.address", h));
            }
            if let Some(p) = host_port.or(s.local_port) {
                attrs.push(kv_int("server.port", i64::from(p)));
            }
            if let Some(ip) = &peer_ip {
                attrs.push(kv_str("client.address", ip));
            }
        }
        SpanKind::Client => {
            let address = host_name.map(str::to_string).or_else(|| peer_ip.clone());
            let port = host_port
                .or(if host_name.is_some() {
                    None
                } else {
                    s.peer.map(|p| p.port())
                })
                .or(host_name.map(|_| s.scheme.default_port()));
            if let Some(a) = &address {
                attrs.push(kv_str("server.address", a));
            }
            if let Some(p) = port {
                attrs.push(kv_int("server.port", i64::from(p)));
            }
            if let (Some(a), false) = (&address, s.method == "CONNECT") {
                attrs.push(kv_str("url.full", &url_full(s, a, port)));
            }
        }
    }
    if let Some(code) = s.status {
        attrs.push(kv_int("http.response.status_code", i64::from(code)));
    }
    if let (Some(peer), Some(ip)) = (s.peer, peer_ip) {
        attrs.push(kv_str("network.peer.address", &ip));
        attrs.push(kv_int("network.peer.port", i64::from(peer.port())));
    }
    attrs.push(kv_str("network.protocol.version", s.version.as_str()));
    if let (SpanKind::Server, Some(ua)) = (s.kind, &s.user_agent) {
        attrs.push(kv_str("user_agent.original", ua));
    }
    if let Some(tcp) = s.tcp {
        attrs.push(kv_int("fathom.tcp.srtt_us", i64::from(tcp.srtt_us)));
        attrs.push(kv_int("fathom.tcp.retransmits", i64::from(tcp.retransmits)));
    }
    if let Some(us) = s.connect_us {
        attrs.push(kv_int("fathom.tcp.connect_us", clamp_i64(us)));
    }
    if s.request_body_bytes > 0 {
        attrs.push(kv_int(
            "http.request.body.size",
            clamp_i64(s.request_body_bytes),
        ));
    }
    if s.response_body_bytes > 0 {
        attrs.push(kv_int(
            "http.response.body.size",
            clamp_i64(s.response_body_bytes),
        ));
    }
    let status = if s.error {
        if let Some(code) = s.status {
            attrs.push(kv_str("error.type", &code.to_string()));
        }
        Some(Status {
            code: status::StatusCode::Error as i32,
            message: String::new(),
        })
    } else {
        None
    };
    let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
    if s.remote_parent {
        flags |= FLAG_IS_REMOTE;
    }
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: name.to_string(),
        kind: match s.kind {
            SpanKind::Server => span::SpanKind::Server as i32,
            SpanKind::Client => span::SpanKind::Client as i32,
        },
        start_time_unix_nano: unix_ns(s.start_ns, unix_offset_ns),
        end_time_unix_nano: unix_ns(s.end_ns.max(s.start_ns), unix_offset_ns),
        attributes: attrs,
        status,
        ..Span::default()
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `url.full` of a client span: scheme, authority (the port only when not
/// the scheme's default), path and query (with redactions).
fn url_full(s: &HttpSpan, address: &str, port: Option<u16>) -> String {
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    };
    let authority = match port {
        Some(p) if p != s.scheme.default_port() => format!("{host}:{p}"),
        _ => host,
    };
    let path = if s.path.is_empty() { "/" } else { &s.path };
    let mut url = format!("{}://{authority}{path}", s.scheme.as_str());
    if let Some(q) = &s.query {
        url.push('?');
        url.push_str(&redact_query(q));
    }
    url
}

/// Spans as one OTLP request: a `ResourceSpans` per process (ordered by
/// pid) with the resource `resource_of(pid)`, one scope
/// ([`SCOPE_NAME`]). `unix_offset_ns` is Unix time minus CLOCK_MONOTONIC.
pub fn traces_request(
    spans: &[HttpSpan],
    mut resource_of: impl FnMut(u32) -> ResourceInfo,
    unix_offset_ns: i64,
) -> ExportTraceServiceRequest {
    let mut by_pid: BTreeMap<u32, Vec<Span>> = BTreeMap::new();
    for s in spans {
        by_pid
            .entry(s.pid)
            .or_default()
            .push(span_to_otlp(s, unix_offset_ns));
    }
    ExportTraceServiceRequest {
        resource_spans: by_pid
            .into_iter()
            .map(|(pid, spans)| ResourceSpans {
                resource: Some(resource_of(pid).to_otlp()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::traces::parse::Version;
    use crate::traces::spans::Scheme;
    use opentelemetry_proto::tonic::common::v1::any_value;

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

    #[test]
    fn host_ports() {
        assert_eq!(split_host_port("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_host_port("a.b"), ("a.b", None));
        assert_eq!(split_host_port("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("u:p@h:1"), ("h", Some(1)));
        assert_eq!(split_host_port("h:x"), ("h", None));
        assert_eq!(unix_ns(5, -10), 0);
        assert_eq!(unix_ns(u64::MAX, 10), u64::MAX);
    }

    #[test]
    fn one_resource_per_process() {
        let a = server_span();
        let mut b = server_span();
        b.pid = 3;
        b.span_id = [1; 8];
        let req = traces_request(
            &[a.clone(), b, a],
            |pid| ResourceInfo {
                service_name: format!("svc-{pid}"),
                pid: Some(pid),
                executable_name: Some("server".into()),
                container_id: (pid == 3).then(|| "abc123".into()),
                extra: vec![("service.namespace".into(), "shop".into())],
            },
            0,
        );
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
