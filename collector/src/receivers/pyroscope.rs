//! Pyroscope-compatible profile ingest: the connect-protocol unary call
//! `POST /push.v1.PusherService/Push` (`application/proto` or
//! `application/json`), as Grafana Alloy and Pyroscope SDKs send it. A
//! request is accepted or refused whole; retried samples (same `ID`) are
//! acknowledged and not counted twice.
use std::{
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use prost::Message as _;

use super::{auth::BearerAuth, connect_error, decompress};
use crate::{
    model::{RawProfile, SeriesLabels},
    pipeline::{Ingest, IngestError},
    pprof,
    proto::push::{LabelPair, PushRequest, PushResponse, RawProfileSeries, RawSample},
};

pub const PUSH_PATH: &str = "/push.v1.PusherService/Push";

/// Sample IDs remembered to drop retried duplicates.
const DEDUP_IDS: usize = 65_536;

struct Ctx {
    ingest: Ingest,
    auth: BearerAuth,
    max_bytes: usize,
    seen: Mutex<lru::LruCache<String, ()>>,
}

pub fn router(ingest: Ingest, auth: BearerAuth, max_request_bytes: usize) -> Router {
    let ctx = Arc::new(Ctx {
        ingest,
        auth,
        max_bytes: max_request_bytes,
        seen: Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(DEDUP_IDS).unwrap_or(NonZeroUsize::MIN),
        )),
    });
    Router::new()
        .route(PUSH_PATH, post(push))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(axum::middleware::from_fn(crate::receivers::linger))
        .with_state(ctx)
}

/// protojson of `PushRequest` (camelCase names, bytes as base64).
#[derive(serde::Deserialize)]
struct JsonPush {
    #[serde(default)]
    series: Vec<JsonSeries>,
}
#[derive(serde::Deserialize)]
struct JsonSeries {
    #[serde(default)]
    labels: Vec<JsonLabel>,
    #[serde(default)]
    samples: Vec<JsonSample>,
}
#[derive(serde::Deserialize)]
struct JsonLabel {
    #[serde(default)]
    name: String,
    #[serde(default)]
    value: String,
}
#[derive(serde::Deserialize)]
struct JsonSample {
    #[serde(default, alias = "raw_profile")]
    #[serde(rename = "rawProfile")]
    raw_profile: String,
    #[serde(default, rename = "ID", alias = "id")]
    id: String,
}

fn from_json(body: &[u8]) -> Result<PushRequest, String> {
    let j: JsonPush = serde_json::from_slice(body).map_err(|e| format!("JSON: {e}"))?;
    let mut series = Vec::with_capacity(j.series.len());
    for (i, s) in j.series.into_iter().enumerate() {
        let mut samples = Vec::with_capacity(s.samples.len());
        for (k, sample) in s.samples.into_iter().enumerate() {
            let raw_profile = base64::engine::general_purpose::STANDARD
                .decode(sample.raw_profile.as_bytes())
                .map_err(|e| format!("series[{i}].samples[{k}].rawProfile: base64: {e}"))?;
            samples.push(RawSample {
                raw_profile,
                id: sample.id,
            });
        }
        series.push(RawProfileSeries {
            labels: s
                .labels
                .into_iter()
                .map(|l| LabelPair {
                    name: l.name,
                    value: l.value,
                })
                .collect(),
            samples,
        });
    }
    Ok(PushRequest { series })
}

/// Validates and decodes a whole push request: every series' labels, every
/// sample's pprof. `seen` filters out retried sample IDs.
pub fn decode_push(
    req: PushRequest,
    received: SystemTime,
    seen: impl Fn(&str) -> bool,
) -> Result<(Vec<RawProfile>, Vec<String>), String> {
    let mut out = Vec::new();
    let mut ids = Vec::new();
    for (i, series) in req.series.into_iter().enumerate() {
        let labels = SeriesLabels::new(series.labels.into_iter().map(|l| (l.name, l.value)))
            .map_err(|e| format!("series[{i}]: {e}"))?;
        for (k, sample) in series.samples.into_iter().enumerate() {
            if !sample.id.is_empty() && seen(&sample.id) {
                continue;
            }
            let profile = pprof::decode(&sample.raw_profile)
                .map_err(|e| format!("series[{i}].samples[{k}]: {e}"))?;
            if !sample.id.is_empty() {
                ids.push(sample.id);
            }
            out.push(RawProfile {
                labels: labels.clone(),
                profile,
                received,
            });
        }
    }
    Ok((out, ids))
}

async fn push(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let stats = &ctx.ingest.stats.profiles;
    if !ctx
        .auth
        .allows(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    {
        stats.unauthenticated.inc();
        return connect_error(
            "unauthenticated",
            "missing or wrong bearer token (Authorization: Bearer <token>)",
        );
    }
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        == Some("gzip");
    let invalid = |m: String| {
        stats.invalid_requests.inc();
        connect_error("invalid_argument", m)
    };
    // Over `max_request_bytes`: connect's `resource_exhausted` (the code
    // connect servers give a message over their read limit), with HTTP 413.
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
            stats.invalid_requests.inc();
            let mut resp = connect_error(
                "resource_exhausted",
                format!(
                    "request body larger than {} bytes (queues.max_request_bytes)",
                    ctx.max_bytes
                ),
            );
            *resp.status_mut() = axum::http::StatusCode::PAYLOAD_TOO_LARGE;
            return resp;
        }
        Err(r) => return invalid(r.body_text()),
    };
    let body = match decompress(&body, gzip, ctx.max_bytes) {
        Ok(b) => b,
        Err(m) => return invalid(m),
    };
    let req = match mime.as_str() {
        "application/proto" | "application/x-protobuf" | "application/protobuf" => {
            match PushRequest::decode(body.as_slice()) {
                Ok(r) => r,
                Err(e) => return invalid(format!("protobuf: {e}")),
            }
        }
        "application/json" => match from_json(&body) {
            Ok(r) => r,
            Err(m) => return invalid(m),
        },
        other => {
            return invalid(format!(
                "Content-Type {other:?} is not supported: use application/proto or application/json"
            ));
        }
    };
    let decoded = {
        let seen = |id: &str| {
            ctx.seen
                .lock()
                .map(|mut s| s.get(id).is_some())
                .unwrap_or(false)
        };
        decode_push(req, SystemTime::now(), seen)
    };
    let (profiles, ids) = match decoded {
        Ok(x) => x,
        Err(m) => return invalid(m),
    };
    match ctx.ingest.profiles_all(profiles) {
        Ok(()) => {
            if let Ok(mut seen) = ctx.seen.lock() {
                for id in ids {
                    seen.put(id, ());
                }
            }
            let body = if mime == "application/json" {
                b"{}".to_vec()
            } else {
                PushResponse {}.encode_to_vec()
            };
            let ct = if mime == "application/json" {
                "application/json"
            } else {
                "application/proto"
            };
            ([(header::CONTENT_TYPE, ct)], body).into_response()
        }
        Err(e @ IngestError::Full(_)) => connect_error("resource_exhausted", e.to_string()),
        Err(e @ IngestError::ShuttingDown) => connect_error("unavailable", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn decodes_the_fuzz_seed_push_request() {
        // A real Go CPU profile (gzipped) and heap profile (plain) in two
        // series, as collector/fuzz/make-seeds encodes them.
        let bytes = include_bytes!("../../fuzz/corpus/push_request/cpu-and-heap.pb");
        let req = PushRequest::decode(bytes.as_slice()).unwrap();
        let now = SystemTime::now();
        let (profiles, ids) = decode_push(req.clone(), now, |_| false).unwrap();
        assert_eq!(profiles.len(), 2);
        assert_eq!(
            profiles[0].labels.selector(),
            r#"process_cpu{k8s_pod_name="checkout-7d9f",service_name="checkout"}"#
        );
        assert_eq!(
            pprof::sample_types_signature(&profiles[0].profile),
            "samples/count,cpu/nanoseconds"
        );
        assert_eq!(profiles[1].labels.profile_name(), "memory");
        assert_eq!(
            ids,
            vec!["3f0e1c9a-8a53-4a46-9a52-2f5b8e0f6b11".to_string()]
        );
        let seen = |id: &str| id == "3f0e1c9a-8a53-4a46-9a52-2f5b8e0f6b11";
        let (again, ids) = decode_push(req, now, seen).unwrap();
        assert_eq!(
            (again.len(), ids.len()),
            (1, 0),
            "the retried sample is skipped"
        );
    }
}
