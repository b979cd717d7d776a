//! Jaeger's HTTP query API (what the Jaeger UI and Grafana's Jaeger data
//! source call), over the embedded store, in Jaeger's JSON shapes:
//!
//! - `GET /api/services`, `GET /api/services/{service}/operations`,
//!   `GET /api/operations?service=S[&spanKind=K]`
//! - `GET /api/traces?service=S[&operation=O][&tags={"k":"v"}|&tag=k:v…]
//!   [&minDuration=100ms][&maxDuration=1s][&start=µs][&end=µs][&lookback=1h]
//!   [&limit=N]` or `?traceID=…[&traceID=…]`
//! - `GET /api/traces/{traceID}`
//! - `GET /api/dependencies[?endTs=<unix ms>][&lookback=<ms>]`: calls
//!   between services (a span whose parent span is of another service)
//!

//! Every answer is `{"data": …, "total": N, "limit": 0, "offset": 0,
//! "errors": null}`; a failure has `data: null` and `errors: [{code, msg}]`
//! with the HTTP status. Spans are converted from OTLP the way Jaeger's own
//! OTLP receiver does (kind, status and scope as tags, events as logs,
//! parent as `CHILD_OF`, links as `FOLLOWS_FROM`, resources as processes).
//! Query parameters Jaeger does not define are refused with 400.
use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{Span, status::StatusCode as OtlpStatus},
};
use prost::Message as _;
use serde_json::{Value, json};

use crate::store::{
    RawTrace, Store, StoreError, TraceSearch, TraceSort, UNKNOWN_SERVICE, any_value_string, hex,
};

/// Traces a search returns when it sets no limit (Jaeger's default).
pub const DEFAULT_LIMIT: usize = 100;
/// Largest limit accepted.
pub const MAX_LIMIT: usize = 1500;

/// Query parameters of `/api/traces` (Jaeger UI and Grafana send these).
const SEARCH_PARAMS: &[&str] = &[
    "service",
    "operation",
    "tags",
    "tag",
    "minDuration",
    "maxDuration",
    "start",
    "end",
    "lookback",
    "limit",
    "traceID",
    "spanKind",
    "prettyPrint",
    "raw",
];

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route(
            "/api/services/{service}/operations",
            get(service_operations),
        )
        .route("/api/operations", get(operations))
        .route("/api/traces", get(search))
        .route("/api/traces/{trace_id}", get(trace))
        .route("/api/dependencies", get(dependencies))
        .with_state(store)
}

type Params = Query<Vec<(String, String)>>;

/// A failure in Jaeger's envelope.
#[derive(Debug)]
pub struct JaegerError(StatusCode, String);

impl JaegerError {
    fn bad(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
}

impl From<StoreError> for JaegerError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "Jaeger query failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for JaegerError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({
                "data": null, "total": 0, "limit": 0, "offset": 0,
                "errors": [{"code": self.0.as_u16(), "msg": self.1}],
            })),
        )
            .into_response()
    }
}

fn envelope(data: Value, total: usize) -> Response {
    Json(json!({"data": data, "total": total, "limit": 0, "offset": 0, "errors": null}))
        .into_response()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JaegerError> + Send + 'static,
) -> Result<T, JaegerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JaegerError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn only(params: &[(String, String)], allowed: &[&str]) -> Result<(), JaegerError> {
    match params.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((k, _)) => Err(JaegerError::bad(format!(
            "unknown query parameter {k:?} (accepted here: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

fn one<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

async fn services(
    State(store): State<Arc<Store>>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    only(&p, &[])?;
    let list = blocking(move || Ok(store.trace_services()?)).await?;
    let n = list.len();
    Ok(envelope(json!(list), n))
}

async fn service_operations(
    State(store): State<Arc<Store>>,
    Path(service): Path<String>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    only(&p, &[])?;
    let ops = blocking(move || Ok(store.operations(&service)?)).await?;
    let mut names: Vec<String> = ops.into_iter().map(|o| o.name).collect();
    names.dedup();
    let n = names.len();
    Ok(envelope(json!(names), n))
}

async fn operations(
    State(store): State<Arc<Store>>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    only(&p, &["service", "spanKind"])?;
    let service = one(&p, "service")
        .ok_or_else(|| JaegerError::bad("parameter 'service' is required"))?
        .to_string();
    let kind = one(&p, "spanKind").map(str::to_string);
    let ops = blocking(move || Ok(store.operations(&service)?)).await?;
    let list: Vec<Value> = ops
        .into_iter()
        .filter(|o| kind.as_ref().is_none_or(|k| *k == o.kind))
        .map(|o| {
            let kind = if o.kind == "unspecified" {
                String::new()
            } else {
                o.kind
            };
            json!({"name": o.name, "spanKind": kind})
        })
        .collect();
    let n = list.len();
    Ok(envelope(json!(list), n))
}

/// A Go duration (`1h2m`, `1.5s`, `100ms`, `250us`, `10µs`, `5ns`).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += n * nanos;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_nanos(total as u64))
}

fn micros(name: &str, v: &str) -> Result<SystemTime, JaegerError> {
    let us: u64 = v
        .parse()
        .map_err(|_| JaegerError::bad(format!("{name}={v:?}: expected unix microseconds")))?;
    Ok(UNIX_EPOCH + Duration::from_micros(us))
}

/// The search a query string asks for (see the module doc).
pub fn parse_search(p: &[(String, String)], now: SystemTime) -> Result<TraceSearch, JaegerError> {
    only(p, SEARCH_PARAMS)?;
    let service = one(p, "service").map(str::to_string);
    if service.is_none() {
        return Err(JaegerError::bad("parameter 'service' is required"));
    }
    let until = one(p, "end").map(|v| micros("end", v)).transpose()?;
    let mut from = one(p, "start").map(|v| micros("start", v)).transpose()?;
    if from.is_none()
        && let Some(lb) = one(p, "lookback").filter(|l| *l != "custom")
    {
        let d = humantime::parse_duration(lb)
            .map_err(|e| JaegerError::bad(format!("lookback={lb:?}: {e}")))?;
        from = Some(until.unwrap_or(now).checked_sub(d).unwrap_or(UNIX_EPOCH));
    }
    if let (Some(f), Some(u)) = (from, until)
        && f > u
    {
        return Err(JaegerError::bad("'start' is after 'end'"));
    }
    let dur = |name: &str| {
        one(p, name)
            .map(|v| {
                parse_go_duration(v).ok_or_else(|| {
                    JaegerError::bad(format!(
                        "{name}={v:?}: expected a duration such as 100ms, 1.5s, 2m"
                    ))
                })
            })
            .transpose()
    };
    let min_duration = dur("minDuration")?;
    let max_duration = dur("maxDuration")?;
    if let (Some(lo), Some(hi)) = (min_duration, max_duration)
        && hi < lo
    {
        return Err(JaegerError::bad(
            "'maxDuration' should be greater than 'minDuration'",
        ));
    }
    let limit = match one(p, "limit") {
        Some(l) => match l.parse::<usize>() {
            Ok(0) => DEFAULT_LIMIT,
            Ok(n) if n <= MAX_LIMIT => n,
            _ => {
                return Err(JaegerError::bad(format!(
                    "limit={l:?}: expected 0..{MAX_LIMIT}"
                )));
            }
        },
        None => DEFAULT_LIMIT,
    };
    let mut tags: Vec<(String, String)> = Vec::new();
    for (k, v) in p {
        match k.as_str() {
            "tag" => {
                let (tk, tv) = v
                    .split_once(':')
                    .ok_or_else(|| JaegerError::bad(format!("tag={v:?}: expected key:value")))?;
                tags.push((tk.to_string(), tv.to_string()));
            }
            "tags" if !v.trim().is_empty() => {
                let map: serde_json::Map<String, Value> = serde_json::from_str(v).map_err(|e| {
                    JaegerError::bad(format!(
                        "tags={v:?}: expected a JSON object of strings ({e})"
                    ))
                })?;
                for (tk, tv) in map {
                    let tv = match tv {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    tags.push((tk, tv));
                }
            }
            _ => {}
        }
    }
    let errors_only = tags.iter().any(|(k, v)| k == "error" && v == "true");
    Ok(TraceSearch {
        service,
        operation: one(p, "operation").map(str::to_string),
        tags,
        min_duration,
        max_duration,
        errors_only,
        from,
        until,
        limit,
        offset: 0,
        sort: TraceSort::Newest,
    })
}

/// A trace id of 1 to 32 hexadecimal digits (Jaeger writes 64-bit ids in 16).
pub fn parse_jaeger_trace_id(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    crate::store::parse_trace_id(&format!("{s:0>32}"))
}

/// Jaeger's spelling of a trace id: 16 digits when the high half is zero.
pub fn jaeger_trace_id(id: &[u8]) -> String {
    if id.len() == 16 && id[..8].iter().all(|&b| b == 0) {
        hex(&id[8..])
    } else {
        hex(id)
    }
}

async fn search(
    State(store): State<Arc<Store>>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    let ids: Vec<&str> = p
        .iter()
        .filter(|(k, _)| k == "traceID")
        .map(|(_, v)| v.as_str())
        .collect();
    if !ids.is_empty() {
        only(&p, &["traceID", "prettyPrint", "raw"])?;
        let ids = ids
            .iter()
            .map(|id| {
                parse_jaeger_trace_id(id).ok_or_else(|| {
                    JaegerError::bad(format!(
                        "traceID={id:?}: expected up to 32 hexadecimal digits"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let traces = blocking(move || {
            let mut out = Vec::new();
            for id in ids {
                if let Some(t) = store.trace_raw(id)? {
                    out.push(trace_json(&t));
                }
            }
            Ok(out)
        })
        .await?;
        let n = traces.len();
        return Ok(envelope(json!(traces), n));
    }
    let q = parse_search(&p, SystemTime::now())?;
    let traces = blocking(move || {
        let found = store.search_traces(&q)?;
        let mut out = Vec::new();
        for s in found.traces {
            if let Some(id) = crate::store::parse_trace_id(&s.trace_id)
                && let Some(t) = store.trace_raw(id)?
            {
                out.push(trace_json(&t));
            }
        }
        Ok(out)
    })
    .await?;
    let n = traces.len();
    Ok(envelope(json!(traces), n))
}

/// A unix-millisecond parameter.
fn millis(name: &str, v: &str) -> Result<u64, JaegerError> {
    v.parse::<u64>().map_err(|_| {
        JaegerError::bad(format!(
            "{name}={v:?}: expected milliseconds (unix time for endTs, a span of time for lookback)"
        ))
    })
}

/// `GET /api/dependencies?endTs=<unix ms>&lookback=<ms>`: the calls between
/// services of the traces that started in [endTs - lookback, endTs]
/// (defaults: now, 24 h), in Jaeger's shape `{"data": [{"parent",
/// "child", "callCount"}]}`.
async fn dependencies(
    State(store): State<Arc<Store>>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    only(&p, &["endTs", "lookback"])?;
    let now = SystemTime::now();
    let end = match one(&p, "endTs") {
        Some(v) => UNIX_EPOCH + Duration::from_millis(millis("endTs", v)?),
        None => now,
    };
    let lookback = match one(&p, "lookback") {
        Some(v) => Duration::from_millis(millis("lookback", v)?),
        None => Duration::from_secs(24 * 3600),
    };
    let start = end.checked_sub(lookback).unwrap_or(UNIX_EPOCH);
    let deps = blocking(move || Ok(store.dependencies(start, end)?)).await?;
    let data: Vec<Value> = deps
        .into_iter()
        .map(|(parent, child, n)| json!({"parent": parent, "child": child, "callCount": n}))
        .collect();
    let n = data.len();
    Ok(envelope(json!(data), n))
}

async fn trace(
    State(store): State<Arc<Store>>,
    Path(id): Path<String>,
    Query(p): Params,
) -> Result<Response, JaegerError> {
    only(&p, &["prettyPrint", "raw", "start", "end"])?;
    let tid = parse_jaeger_trace_id(&id).ok_or_else(|| {
        JaegerError::bad(format!(
            "trace ID {id:?}: expected up to 32 hexadecimal digits"
        ))
    })?;
    let t = blocking(move || Ok(store.trace_raw(tid)?))
        .await?
        .ok_or_else(|| JaegerError(StatusCode::NOT_FOUND, "trace not found".into()))?;
    Ok(envelope(json!([trace_json(&t)]), 1))
}

fn tag(key: &str, v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::BoolValue(b)) => json!({"key": key, "type": "bool", "value": b}),
        Some(any_value::Value::IntValue(i)) => json!({"key": key, "type": "int64", "value": i}),
        Some(any_value::Value::DoubleValue(d)) => {
            json!({"key": key, "type": "float64", "value": d})
        }
        Some(any_value::Value::BytesValue(b)) => json!({
            "key": key, "type": "binary",
            "value": base64::engine::general_purpose::STANDARD.encode(b),
        }),
        _ => json!({"key": key, "type": "string", "value": any_value_string(v)}),
    }
}

fn str_tag(key: &str, v: &str) -> Value {
    json!({"key": key, "type": "string", "value": v})
}

fn tags(kvs: &[KeyValue]) -> Vec<Value> {
    kvs.iter()
        .filter_map(|kv| kv.value.as_ref().map(|v| tag(&kv.key, v)))
        .collect()
}

fn micros_of(ns: u64) -> u64 {
    ns / 1000
}

/// One stored trace as Jaeger's `ui.Trace`.
pub fn trace_json(t: &RawTrace) -> Value {
    let mut processes: Vec<(Vec<u8>, String, Value)> = Vec::new();
    let mut spans: Vec<(u64, Value)> = Vec::new();
    let mut trace_id = String::new();
    for rs in &t.spans {
        let resource = rs.resource.as_ref();
        let key = resource.map(|r| r.encode_to_vec()).unwrap_or_default();
        let pid = match processes.iter().find(|p| p.0 == key) {
            Some(p) => p.1.clone(),
            None => {
                let attrs = resource.map(|r| r.attributes.as_slice()).unwrap_or(&[]);
                let service = attrs
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .map(any_value_string)
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| UNKNOWN_SERVICE.to_string());
                let id = format!("p{}", processes.len() + 1);
                let rest: Vec<KeyValue> = attrs
                    .iter()
                    .filter(|kv| kv.key != "service.name")
                    .cloned()
                    .collect();
                processes.push((
                    key,
                    id.clone(),
                    json!({"serviceName": service, "tags": tags(&rest)}),
                ));
                id
            }
        };
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                if trace_id.is_empty() {
                    trace_id = jaeger_trace_id(&span.trace_id);
                }
                spans.push((
                    span.start_time_unix_nano,
                    span_json(span, ss.scope.as_ref(), &pid),
                ));
            }
        }
    }
    spans.sort_by_key(|s| s.0);
    let processes: serde_json::Map<String, Value> =
        processes.into_iter().map(|(_, id, p)| (id, p)).collect();
    json!({
        "traceID": if trace_id.is_empty() { t.summary.trace_id.clone() } else { trace_id },
        "spans": spans.into_iter().map(|(_, s)| s).collect::<Vec<_>>(),
        "processes": processes,
        "warnings": null,
    })
}

fn span_json(
    span: &Span,
    scope: Option<&opentelemetry_proto::tonic::common::v1::InstrumentationScope>,
    pid: &str,
) -> Value {
    let trace_id = jaeger_trace_id(&span.trace_id);
    let mut references = Vec::new();
    if !span.parent_span_id.is_empty() {
        references.push(json!({
            "refType": "CHILD_OF", "traceID": trace_id, "spanID": hex(&span.parent_span_id),
        }));
    }
    for l in &span.links {
        references.push(json!({
            "refType": "FOLLOWS_FROM", "traceID": jaeger_trace_id(&l.trace_id),
            "spanID": hex(&l.span_id),
        }));
    }
    let mut t = tags(&span.attributes);
    if let Some(kind) = match span.kind {
        1 => Some("internal"),
        2 => Some("server"),
        3 => Some("client"),
        4 => Some("producer"),
        5 => Some("consumer"),
        _ => None,
    } {
        t.push(str_tag("span.kind", kind));
    }
    if let Some(st) = &span.status {
        if st.code == OtlpStatus::Error as i32 {
            t.push(json!({"key": "error", "type": "bool", "value": true}));
            t.push(str_tag("otel.status_code", "ERROR"));
        } else if st.code == OtlpStatus::Ok as i32 {
            t.push(str_tag("otel.status_code", "OK"));
        }
        if !st.message.is_empty() {
            t.push(str_tag("otel.status_description", &st.message));
        }
    }
    if let Some(sc) = scope {
        if !sc.name.is_empty() {
            t.push(str_tag("otel.scope.name", &sc.name));
        }
        if !sc.version.is_empty() {
            t.push(str_tag("otel.scope.version", &sc.version));
        }
    }
    let logs: Vec<Value> = span
        .events
        .iter()
        .map(|e| {
            let mut fields = vec![str_tag("event", &e.name)];
            fields.extend(tags(&e.attributes));
            json!({"timestamp": micros_of(e.time_unix_nano), "fields": fields})
        })
        .collect();
    let start = span.start_time_unix_nano;
    let end = span.end_time_unix_nano.max(start);
    json!({
        "traceID": trace_id,
        "spanID": hex(&span.span_id),
        "operationName": span.name,
        "references": references,
        "flags": 1,
        "startTime": micros_of(start),
        "duration": micros_of(end - start),
        "tags": t,
        "logs": logs,
        "processID": pid,
        "warnings": null,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn go_durations() {
        for (s, ns) in [
            ("0", 0u64),
            ("100ms", 100_000_000),
            ("1.5s", 1_500_000_000),
            ("1h2m3s", 3_723_000_000_000),
            ("250us", 250_000),
            ("10µs", 10_000),
            ("5ns", 5),
        ] {
            assert_eq!(parse_go_duration(s), Some(Duration::from_nanos(ns)), "{s}");
        }
        for s in ["", "ms", "10", "1x", "-1s"] {
            assert_eq!(parse_go_duration(s), None, "{s}");
        }
    }

    #[test]
    fn search_parameters() {
        let p = |q: &[(&str, &str)]| -> Vec<(String, String)> {
            q.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let s = parse_search(
            &p(&[
                ("service", "api"),
                ("operation", "GET /users"),
                (
                    "tags",
                    r#"{"http.response.status_code":"500","error":"true"}"#,
                ),
                ("tag", "pod:api-1"),
                ("minDuration", "10ms"),
                ("maxDuration", "1s"),
                ("lookback", "1h"),
                ("limit", "20"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!(s.operation.as_deref(), Some("GET /users"));
        assert_eq!(s.tags.len(), 3);
        assert!(s.errors_only);
        assert_eq!(s.min_duration, Some(Duration::from_millis(10)));
        assert_eq!(s.from, Some(UNIX_EPOCH + Duration::from_secs(6_400)));
        assert_eq!(s.limit, 20);
        for (q, msg) in [
            (vec![("operation", "x")], "'service' is required"),
            (
                vec![("service", "a"), ("range", "1h")],
                "unknown query parameter \"range\"",
            ),
            (
                vec![("service", "a"), ("minDuration", "fast")],
                "minDuration",
            ),
            (
                vec![
                    ("service", "a"),
                    ("minDuration", "2s"),
                    ("maxDuration", "1s"),
                ],
                "'maxDuration' should be greater",
            ),
            (vec![("service", "a"), ("tags", "[1]")], "JSON object"),
            (
                vec![("service", "a"), ("start", "2"), ("end", "1")],
                "after",
            ),
            (vec![("service", "a"), ("limit", "x")], "limit"),
        ] {
            let e = parse_search(&p(&q), now).unwrap_err();
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
            assert!(e.1.contains(msg), "{q:?}: {}", e.1);
        }
        assert_eq!(
            parse_jaeger_trace_id("1f"),
            Some({
                let mut id = [0u8; 16];
                id[15] = 0x1f;
                id
            })
        );
        assert_eq!(
            jaeger_trace_id(&parse_jaeger_trace_id("1f").unwrap()),
            "000000000000001f"
        );
        assert!(parse_jaeger_trace_id("xyz").is_none());
    }
}
