//! Pyroscope's legacy ingest endpoint, `POST /ingest`, as older SDKs,
//! agents, `pyroscope-cli` and scripts send to it:
//!
//! - `name=app.cpu{k=v,…}`: the application, the profile type as its last
//!   dot-separated part (for the folded formats), and labels;
//! - `from`, `until` (unix seconds, or ms/µs/ns told apart by size);
//! - `format`: `pprof` (or a `multipart/form-data` body with a `profile`
//!   file, as pyroscope-go sends), `folded` (the default: collapsed stacks,
//!   `a;b;c 12` per line) or `lines` (one stack per line, one sample each);
//! - `sampleRate` (Hz, default 100: CPU and wall values become nanoseconds),
//!   `spyName` (the `pyroscope_spy` label), `units`, `aggregationType`.
//!
//! The series is labelled as Pyroscope labels it (`__name__` from the type,
//! `service_name` = the application unless a label sets it); a pprof's
//! sample labels (the Node.js SDK's `wrapWithLabels`, Go's `pprof.Do`) make
//! series of their own, as Pyroscope's distributor splits them, except
//! span and profile ids, which stay on the samples. Errors are plain text
//! with the status Pyroscope gives (400, 413, 429, 503).
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};

use super::auth::BearerAuth;
use crate::{
    model::{RawProfile, SeriesLabels},
    pipeline::{Ingest, IngestError},
    pprof,
    proto::pprof::Profile,
};

pub const INGEST_PATH: &str = "/ingest";
const DEFAULT_SAMPLE_RATE: u32 = 100;

struct Ctx {
    ingest: Ingest,
    auth: BearerAuth,
    max_bytes: usize,
}

pub fn router(ingest: Ingest, auth: BearerAuth, max_request_bytes: usize) -> Router {
    Router::new()
        .route(INGEST_PATH, post(handle))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(axum::middleware::from_fn(crate::receivers::linger))
        .with_state(Arc::new(Ctx {
            ingest,
            auth,
            max_bytes: max_request_bytes,
        }))
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut m = msg.into();
    m.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        m,
    )
        .into_response()
}

/// `app.cpu{k=v,k2="v2"}` → (`app.cpu`, labels).
pub fn parse_name(name: &str) -> Result<(String, Vec<(String, String)>), String> {
    let name = name.trim();
    let (app, rest) = match name.find('{') {
        Some(i) => (name[..i].trim(), &name[i..]),
        None => (name, ""),
    };
    if app.is_empty() {
        return Err(format!("name={name:?}: the application name is missing"));
    }
    let mut labels = Vec::new();
    if !rest.is_empty() {
        let body = rest
            .strip_prefix('{')
            .and_then(|r| r.strip_suffix('}'))
            .ok_or_else(|| format!("name={name:?}: expected app{{key=value,…}}"))?;
        for pair in body.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("name={name:?}: label {pair:?} is not key=value"))?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            labels.push((k.trim().to_string(), v.to_string()));
        }
    }
    Ok((app.to_string(), labels))
}

/// The `__name__` and sample type of a folded profile from the last part of
/// the application name (Pyroscope's `convertMetadata`); `None` when the
/// part is not a profile type. The application is what precedes it.
fn folded_type(app: &str) -> Result<(String, &'static str, (&'static str, &'static str)), String> {
    let (base, suffix) = match app.rsplit_once('.') {
        Some((b, s)) => (b, s),
        None => (app, "cpu"),
    };
    let t = match suffix {
        "cpu" | "itimer" => ("process_cpu", ("samples", "count")),
        "wall" => ("wall", ("samples", "count")),
        "inuse_objects" => ("memory", ("inuse_objects", "count")),
        "inuse_space" => ("memory", ("inuse_space", "bytes")),
        "alloc_objects" => ("memory", ("alloc_objects", "count")),
        "alloc_space" => ("memory", ("alloc_space", "bytes")),
        "goroutines" => ("goroutine", ("goroutines", "count")),
        "mutex_count" => ("mutex", ("contentions", "count")),
        "mutex_duration" => ("mutex", ("delay", "nanoseconds")),
        "block_count" => ("block", ("contentions", "count")),
        "block_duration" => ("block", ("delay", "nanoseconds")),
        other => {
            return Err(format!(
                "name: unknown profile type {other:?} (the last part of the application name: cpu, itimer, wall, inuse_objects, inuse_space, alloc_objects, alloc_space, goroutines, mutex_count, mutex_duration, block_count, block_duration)"
            ));
        }
    };
    Ok((base.to_string(), t.0, t.1))
}

/// Pyroscope's `__name__` of a pprof profile, from its sample types.
fn pprof_metric(p: &Profile) -> String {
    let s = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| p.string_table.get(i))
            .map_or("", String::as_str)
    };
    let types: Vec<&str> = p.sample_type.iter().map(|vt| s(vt.r#type)).collect();
    if types.contains(&"wall") {
        return "wall".into();
    }
    // Before the `cpu` match below: `off_cpu` contains it.
    if types.contains(&"off_cpu") {
        return "off_cpu".into();
    }
    for st in &types {
        if st.contains("cpu") {
            return "process_cpu".into();
        }
        if st.contains("alloc_") || st.contains("inuse_") || *st == "space" || *st == "objects" {
            return "memory".into();
        }
        if st.contains("mutex_") {
            return "mutex".into();
        }
        if st.contains("block_") {
            return "block".into();
        }
        if st.contains("goroutine") {
            return "goroutines".into();
        }
    }
    types.last().map_or("unknown", |t| t).to_string()
}

/// A time parameter: unix seconds (ms, µs, ns told apart by magnitude).
fn parse_time(name: &str, v: &str) -> Result<SystemTime, String> {
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("{name}={v:?}: expected a unix timestamp"))?;
    let d = if n >= 100_000_000_000_000_000 {
        Duration::from_nanos(n)
    } else if n >= 100_000_000_000_000 {
        Duration::from_micros(n)
    } else if n >= 100_000_000_000 {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    };
    Ok(UNIX_EPOCH + d)
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The files of a `multipart/form-data` body, by field name.
pub fn multipart_fields(body: &[u8], content_type: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("multipart/form-data without a boundary")?;
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut out = Vec::new();
    let mut pos = find(body, delim.as_bytes(), 0).ok_or("multipart: no boundary in the body")?;
    loop {
        pos += delim.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            break;
        }
        let head_end = find(body, b"\r\n\r\n", pos).ok_or("multipart: part without headers")?;
        let head = String::from_utf8_lossy(&body[pos..head_end]);
        let start = head_end + 4;
        let next = find(body, format!("\r\n{delim}").as_bytes(), start)
            .ok_or("multipart: unterminated part")?;
        let name = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-disposition"))
            .flat_map(|l| l.split(';'))
            .map(str::trim)
            .find_map(|p| p.strip_prefix("name="))
            .map(|n| n.trim_matches('"').to_string())
            .unwrap_or_default();
        out.push((name, body[start..next].to_vec()));
        pos = next + 2;
    }
    Ok(out)
}

/// Parses collapsed stacks (`a;b;c 12`) or, with `lines`, one stack per
/// line counting one sample.
pub fn parse_folded(body: &[u8], lines: bool) -> Result<Vec<(String, i64)>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("folded stacks: {e}"))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        if lines {
            out.push((line.to_string(), 1));
            continue;
        }
        let (stack, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("line {}: expected \"frame;frame;… count\"", i + 1))?;
        let value: i64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v| *v >= 0)
            .ok_or_else(|| format!("line {}: {value:?} is not a count", i + 1))?;
        out.push((stack.to_string(), value));
    }
    Ok(out)
}

/// Turns an `/ingest` request into a profile of one series.
pub fn decode_ingest(
    params: &[(String, String)],
    content_type: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<RawProfile, String> {
    let get = |n: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let (app, mut labels) =
        parse_name(get("name").ok_or("name: required (e.g. name=app.cpu{env=prod})")?)?;
    let from = get("from")
        .map(|v| parse_time("from", v))
        .transpose()?
        .unwrap_or(now);
    let until = get("until")
        .map(|v| parse_time("until", v))
        .transpose()?
        .unwrap_or(now);
    let duration = nanos(until).saturating_sub(nanos(from)).max(0);
    let sample_rate = match get("sampleRate") {
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| format!("sampleRate={v:?}: expected samples per second"))?,
        None => DEFAULT_SAMPLE_RATE,
    };
    let spy = get("spyName").unwrap_or("unknown").to_string();
    let format = get("format").unwrap_or("");
    let multipart = content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data");
    let (metric, service, mut profile) = match format {
        "pprof" | "" if multipart || format == "pprof" => {
            let raw = if multipart {
                let fields = multipart_fields(body, content_type)?;
                if fields
                    .iter()
                    .any(|(n, b)| n == "prev_profile" && !b.is_empty())
                {
                    return Err(
                        "prev_profile is not supported: cumulative profiles need an up-to-date client (pyroscope-go sends deltas)".into(),
                    );
                }
                fields
                    .into_iter()
                    .find(|(n, _)| n == "profile")
                    .map(|(_, b)| b)
                    .ok_or("multipart: no \"profile\" field")?
            } else {
                body.to_vec()
            };
            let p = pprof::decode(&raw).map_err(|e| format!("pprof: {e}"))?;
            (pprof_metric(&p), app.clone(), p)
        }
        "" | "folded" | "collapsed" | "lines" => {
            let stacks = parse_folded(body, format == "lines")?;
            let (service, metric, (ty, unit)) = folded_type(&app)?;
            let timed = matches!(metric, "process_cpu" | "wall") && sample_rate > 0;
            let p = if timed {
                let period = 1_000_000_000 / i64::from(sample_rate);
                let scaled: Vec<(String, i64)> = stacks
                    .into_iter()
                    .map(|(s, v)| (s, v.saturating_mul(period)))
                    .collect();
                let ty = if metric == "wall" { "wall" } else { "cpu" };
                pprof::from_folded(
                    &scaled,
                    (ty, "nanoseconds"),
                    Some((("cpu", "nanoseconds"), period)),
                    nanos(from),
                    duration,
                )
            } else {
                pprof::from_folded(&stacks, (ty, unit), None, nanos(from), duration)
            };
            (metric.to_string(), service, p)
        }
        other => {
            return Err(format!(
                "format={other:?} is not supported: use pprof, folded (collapsed) or lines"
            ));
        }
    };
    if profile.time_nanos <= 0 {
        profile.time_nanos = nanos(from);
    }
    if profile.duration_nanos <= 0 {
        profile.duration_nanos = duration;
    }
    if profile.sample.is_empty() {
        return Err("the profile has no samples".into());
    }
    let has_service = labels.iter().any(|(k, _)| k == "service_name");
    labels.push(("__name__".into(), metric));
    labels.push(("pyroscope_spy".into(), spy));
    if has_service {
        if !labels.iter().any(|(k, _)| k == "app_name") {
            labels.push(("app_name".into(), service));
        }
    } else {
        labels.push(("service_name".into(), service));
    }
    let labels = SeriesLabels::new(labels).map_err(|e| format!("name: {e}"))?;
    Ok(RawProfile {
        labels,
        profile,
        received: now,
    })
}

/// Sample labels that stay on the samples instead of making series (one
/// series per span or profile would be one per request), and the agent's
/// thread name `comm` (one series per thread name of every process; the
/// embedded collector keeps it on samples too, so a remote collector shows
/// the same series as the agent's own).
pub const SAMPLE_ONLY_LABELS: &[&str] = &["span_id", "span_name", "profile_id", "trace_id", "comm"];

/// Pyroscope's series from sample labels: the samples grouped by their
/// string labels (but [`SAMPLE_ONLY_LABELS`] and names the series already
/// has), each group a series with those labels added and taken off its
/// samples; samples without such labels stay in the request's series. A
/// group whose labels cannot be series labels (a bad name, too many) stays
/// in the request's series with its sample labels.
pub fn split_by_sample_labels(raw: RawProfile) -> Vec<RawProfile> {
    let p = &raw.profile;
    let string = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| p.string_table.get(i))
            .map(String::as_str)
    };
    let mut groups: BTreeMap<Vec<(String, String)>, Vec<usize>> = BTreeMap::new();
    for (i, sample) in p.sample.iter().enumerate() {
        let mut key: Vec<(String, String)> = sample
            .label
            .iter()
            .filter_map(|l| {
                let (k, v) = (string(l.key)?, string(l.str)?);
                let own = !k.is_empty()
                    && !v.is_empty()
                    && !SAMPLE_ONLY_LABELS.contains(&k)
                    && raw.labels.get(&k.replace('.', "_")).is_none();
                own.then(|| (k.to_string(), v.to_string()))
            })
            .collect();
        key.sort();
        key.dedup_by(|a, b| a.0 == b.0);
        groups.entry(key).or_default().push(i);
    }
    if groups.keys().all(Vec::is_empty) {
        return vec![raw];
    }
    let mut out: Vec<RawProfile> = Vec::new();
    let mut unsplit: Vec<usize> = Vec::new();
    for (key, samples) in groups {
        let labels = if key.is_empty() {
            None
        } else {
            SeriesLabels::new(
                raw.labels
                    .pairs()
                    .iter()
                    .cloned()
                    .chain(key.iter().cloned()),
            )
            .ok()
        };
        let Some(labels) = labels else {
            unsplit.extend(samples);
            continue;
        };
        let keys: Vec<&str> = key.iter().map(|(k, _)| k.as_str()).collect();
        let mut profile = Profile {
            sample: Vec::new(),
            ..p.clone()
        };
        profile.sample = samples
            .iter()
            .map(|&i| {
                let mut s = p.sample[i].clone();
                s.label
                    .retain(|l| string(l.key).is_none_or(|k| !keys.contains(&k)));
                s
            })
            .collect();
        out.push(RawProfile {
            labels,
            profile,
            received: raw.received,
        });
    }
    if !unsplit.is_empty() {
        unsplit.sort_unstable();
        let mut profile = Profile {
            sample: Vec::new(),
            ..p.clone()
        };
        profile.sample = unsplit.iter().map(|&i| p.sample[i].clone()).collect();
        out.push(RawProfile {
            labels: raw.labels.clone(),
            profile,
            received: raw.received,
        });
    }
    out
}

async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let stats = &ctx.ingest.stats.profiles;
    if !ctx
        .auth
        .allows(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    {
        stats.unauthenticated.inc();
        return text(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        );
    }
    let body = match body {
        Ok(b) => b,
        // Over `max_request_bytes`: 413, with the limit named (axum's own
        // text does not say it).
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            stats.invalid_requests.inc();
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body larger than {} bytes (queues.max_request_bytes)",
                    ctx.max_bytes
                ),
            );
        }
        Err(rejection) => {
            stats.invalid_requests.inc();
            return text(rejection.status(), rejection.body_text());
        }
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let profile = match decode_ingest(&params, ct, &body, SystemTime::now()) {
        Ok(p) => p,
        Err(m) => {
            stats.invalid_requests.inc();
            return text(StatusCode::BAD_REQUEST, m);
        }
    };
    match ctx.ingest.profiles_all(split_by_sample_labels(profile)) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e @ IngestError::Full(_)) => {
            let mut r = text(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        Err(e @ IngestError::ShuttingDown) => text(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn q(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `__name__` from sample types: `off_cpu` is not `process_cpu`, though
    /// it contains "cpu".
    #[test]
    fn pprof_names_follow_sample_types() {
        let profile = |types: &[&str]| {
            let mut p = Profile {
                string_table: vec![String::new()],
                ..Profile::default()
            };
            for t in types {
                p.string_table.push((*t).to_string());
                p.sample_type.push(crate::proto::pprof::ValueType {
                    r#type: (p.string_table.len() - 1) as i64,
                    unit: 0,
                });
            }
            p
        };
        assert_eq!(pprof_metric(&profile(&["off_cpu"])), "off_cpu");
        assert_eq!(pprof_metric(&profile(&["samples", "cpu"])), "process_cpu");
        assert_eq!(pprof_metric(&profile(&["wall", "cpu"])), "wall");
        assert_eq!(pprof_metric(&profile(&["alloc_space"])), "memory");
    }

    #[test]
    fn folded_cpu_becomes_nanoseconds_with_pyroscopes_labels() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000);
        let r = decode_ingest(
            &q(&[
                ("name", "shop.cpu{env=prod,region=\"eu\"}"),
                ("from", "1000"),
                ("until", "1010"),
                ("sampleRate", "100"),
                ("spyName", "pyspy"),
            ]),
            "text/plain",
            b"main;work 3\nmain;idle 1\n\n",
            now,
        )
        .unwrap();
        assert_eq!(
            r.labels.selector(),
            r#"process_cpu{env="prod",pyroscope_spy="pyspy",region="eu",service_name="shop"}"#
        );
        assert_eq!(pprof::sample_types_signature(&r.profile), "cpu/nanoseconds");
        assert_eq!(
            pprof::folded(&r.profile, 0),
            [
                ("main;idle".to_string(), 10_000_000),
                ("main;work".to_string(), 30_000_000)
            ]
        );
        assert_eq!(r.profile.time_nanos, 1_000_000_000_000);
        assert_eq!(r.profile.duration_nanos, 10_000_000_000);
        pprof::validate(&r.profile).unwrap();

        let lines = decode_ingest(
            &q(&[("name", "shop.alloc_space"), ("format", "lines")]),
            "",
            b"a;b\na;b\na;c\n",
            now,
        )
        .unwrap();
        assert_eq!(lines.labels.profile_name(), "memory");
        assert_eq!(
            pprof::sample_types_signature(&lines.profile),
            "alloc_space/bytes"
        );
        assert_eq!(
            pprof::folded(&lines.profile, 0),
            [("a;b".to_string(), 2), ("a;c".to_string(), 1)]
        );
    }

    #[test]
    fn sample_labels_make_series_but_span_ids_stay_on_samples() {
        use crate::proto::pprof::Label;
        let now = UNIX_EPOCH + Duration::from_secs(2_000);
        let mut p = pprof::tests::cpu_profile(
            &[
                (&["main", "a"], 3),
                (&["main", "b"], 2),
                (&["main", "c"], 1),
                (&["main", "d"], 4),
            ],
            1,
        );
        let mut intern = |s: &str| {
            p.string_table.push(s.to_string());
            p.string_table.len() as i64 - 1
        };
        let (endpoint, busy, idle, span, id, env, other) = (
            intern("endpoint"),
            intern("/busy"),
            intern("/idle"),
            intern("span_id"),
            intern("0123456789abcdef"),
            intern("env"),
            intern("staging"),
        );
        let label = |key, str| Label {
            key,
            str,
            num: 0,
            num_unit: 0,
        };
        p.sample[0].label = vec![label(endpoint, busy), label(span, id)];
        p.sample[1].label = vec![label(endpoint, idle)];
        // `env` is a series label already: it stays on the sample.
        p.sample[3].label = vec![label(env, other)];
        let raw = decode_ingest(
            &q(&[("name", "shop{env=prod}"), ("format", "pprof")]),
            "application/octet-stream",
            &pprof::encode_gzip(&p),
            now,
        )
        .unwrap();
        let split = split_by_sample_labels(raw);
        let by: Vec<(String, Vec<(String, i64)>)> = split
            .iter()
            .map(|r| (r.labels.selector(), pprof::folded(&r.profile, 0)))
            .collect();
        assert_eq!(split.len(), 3, "{by:?}");
        let base = r#"process_cpu{env="prod",pyroscope_spy="unknown",service_name="shop"}"#;
        let busy_sel = r#"process_cpu{endpoint="/busy",env="prod",pyroscope_spy="unknown",service_name="shop"}"#;
        let get = |sel: &str| split.iter().find(|r| r.labels.selector() == sel).unwrap();
        assert_eq!(
            pprof::folded(&get(busy_sel).profile, 0),
            [("main;a".to_string(), 3)]
        );
        // The span id stays; the label now a series label is gone.
        let keys: Vec<&str> = get(busy_sel).profile.sample[0]
            .label
            .iter()
            .map(|l| get(busy_sel).profile.string_table[l.key as usize].as_str())
            .collect();
        assert_eq!(keys, ["span_id"]);
        assert_eq!(
            pprof::folded(&get(base).profile, 0),
            [("main;c".to_string(), 1), ("main;d".to_string(), 4)]
        );
        // Without sample labels: one series, as sent.
        let plain = pprof::tests::cpu_profile(&[(&["main", "a"], 3)], 1);
        let raw = decode_ingest(
            &q(&[("name", "shop"), ("format", "pprof")]),
            "",
            &pprof::encode_gzip(&plain),
            now,
        )
        .unwrap();
        assert_eq!(split_by_sample_labels(raw).len(), 1);
    }

    #[test]
    fn pprof_raw_and_multipart() {
        let now = UNIX_EPOCH + Duration::from_secs(2_000);
        let p = pprof::tests::cpu_profile(&[(&["main", "work"], 3)], 1);
        let gz = pprof::encode_gzip(&p);
        let raw = decode_ingest(
            &q(&[("name", "api{service_name=checkout}"), ("format", "pprof")]),
            "application/octet-stream",
            &gz,
            now,
        )
        .unwrap();
        assert_eq!(
            raw.labels.selector(),
            r#"process_cpu{app_name="api",pyroscope_spy="unknown",service_name="checkout"}"#
        );
        let mut body = Vec::new();
        body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"profile\"; filename=\"profile.pprof\"\r\nContent-Type: application/octet-stream\r\n\r\n");
        body.extend_from_slice(&gz);
        body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"sample_type_config\"\r\n\r\n{}\r\n--XyZ--\r\n");
        let mp = decode_ingest(
            &q(&[("name", "api")]),
            "multipart/form-data; boundary=XyZ",
            &body,
            now,
        )
        .unwrap();
        assert_eq!(pprof::folded(&mp.profile, 1), pprof::folded(&p, 1));
        assert_eq!(mp.labels.service(), "api");
        for (params, ct, body, msg) in [
            (q(&[]), "", &b"a 1"[..], "name: required"),
            (
                q(&[("name", "x.bogus")]),
                "",
                b"a 1",
                "unknown profile type",
            ),
            (q(&[("name", "x.cpu")]), "", b"a;b x", "line 1"),
            (
                q(&[("name", "x"), ("format", "trie")]),
                "",
                b"",
                "not supported",
            ),
            (
                q(&[("name", "x"), ("format", "pprof")]),
                "",
                b"junk",
                "pprof",
            ),
            (q(&[("name", "x{a}")]), "", b"a 1", "key=value"),
            (q(&[("name", "x"), ("from", "soon")]), "", b"a 1", "from="),
        ] {
            let e = decode_ingest(&params, ct, body, now).unwrap_err();
            assert!(e.contains(msg), "{params:?}: {e}");
        }
    }
}
