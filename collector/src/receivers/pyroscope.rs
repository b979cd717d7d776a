//! Pyroscope-compatible profile ingest: the unary call
//! `push.v1.PusherService/Push` over the connect protocol (`POST` on the
//! HTTP port, `application/proto` or `application/json`), as Grafana Alloy
//! and Pyroscope SDKs send it, and over gRPC (on the OTLP gRPC port,
//! [`PusherServer`]), with the same limits, errors and back-pressure. A
//! request is accepted or refused whole; retried samples (same `ID`) are
//! acknowledged and not counted twice. A pprof's string sample labels (Go's
//! `pprof.Do`, the SDKs' tag wrappers) make series of their own, as
//! Pyroscope's distributor splits them and as `/ingest` does
//! ([`split_by_sample_labels`]); span, trace and profile ids stay on the
//! samples.
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

use super::{
    auth::BearerAuth, connect_error, decompress, ingest::split_by_sample_labels,
    otlp_grpc::FULL_QUEUE_RETRY_DELAY,
};
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

/// The push service both protocols share: its authentication, limit and
/// the sample IDs already accepted (a retry over either is acknowledged
/// once).
#[derive(Clone)]
pub struct Pusher(Arc<Ctx>);

/// Why a push was refused.
#[derive(Debug)]
enum Refused {
    /// Malformed: labels, pprof, encoding (`invalid_argument`).
    Invalid(String),
    /// A queue is full: retry later (`resource_exhausted`, with a delay).
    Full(String),
    /// Shutting down (`unavailable`).
    ShuttingDown(String),
}

impl Pusher {
    pub fn new(ingest: Ingest, auth: BearerAuth, max_request_bytes: usize) -> Self {
        Self(Arc::new(Ctx {
            ingest,
            auth,
            max_bytes: max_request_bytes,
            seen: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(DEDUP_IDS).unwrap_or(NonZeroUsize::MIN),
            )),
        }))
    }

    /// Decodes and queues a whole request, or refuses it whole (counted
    /// as invalid when malformed).
    fn accept(&self, req: PushRequest) -> Result<(), Refused> {
        let ctx = &self.0;
        let decoded = {
            let seen = |id: &str| {
                ctx.seen
                    .lock()
                    .map(|mut s| s.get(id).is_some())
                    .unwrap_or(false)
            };
            decode_push(req, SystemTime::now(), seen)
        };
        let (profiles, ids) = decoded.map_err(|m| {
            ctx.ingest.stats.profiles.invalid_requests.inc();
            Refused::Invalid(m)
        })?;
        match ctx.ingest.profiles_all(profiles) {
            Ok(()) => {
                if let Ok(mut seen) = ctx.seen.lock() {
                    for id in ids {
                        seen.put(id, ());
                    }
                }
                Ok(())
            }
            Err(e @ IngestError::Full(_)) => Err(Refused::Full(e.to_string())),
            Err(e @ IngestError::ShuttingDown) => Err(Refused::ShuttingDown(e.to_string())),
        }
    }
}

/// The connect endpoint on the HTTP port.
pub fn router(pusher: Pusher) -> Router {
    let max_request_bytes = pusher.0.max_bytes;
    Router::new()
        .route(PUSH_PATH, post(push))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(axum::middleware::from_fn(crate::receivers::linger))
        .with_state(pusher.0)
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
/// sample's pprof, split into series by its sample labels. `seen` filters
/// out retried sample IDs.
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
            out.extend(split_by_sample_labels(RawProfile {
                labels: labels.clone(),
                profile,
                received,
            }));
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
    match Pusher(ctx.clone()).accept(req) {
        Ok(()) => {
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
        // Counted by `accept`.
        Err(Refused::Invalid(m)) => connect_error("invalid_argument", m),
        Err(Refused::Full(m)) => {
            let mut resp = connect_error("resource_exhausted", m);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
            resp
        }
        Err(Refused::ShuttingDown(m)) => connect_error("unavailable", m),
    }
}

/// `Retry-After` of a full queue's answer ([`FULL_QUEUE_RETRY_DELAY`]).
const RETRY_AFTER_SECONDS: &str = "1";

/// `push.v1.PusherService/Push` over gRPC, a tonic service (what
/// `tonic-build` would generate from Pyroscope's `push.proto`, by hand: the
/// messages are [`crate::proto::push`]'s). Served on the OTLP gRPC port
/// (`otlp_grpc::serve`), which gives it gzip, `max_request_bytes` and the
/// codec's errors as the OTLP services have them (undecodable:
/// `INVALID_ARGUMENT`, over the limit: `RESOURCE_EXHAUSTED`, both counted
/// as invalid profiles). The rest as the connect endpoint answers:
/// `UNAUTHENTICATED` without the bearer token, `INVALID_ARGUMENT` with the
/// same reason, a full queue `RESOURCE_EXHAUSTED` (connect's code) with a
/// `RetryInfo` of [`FULL_QUEUE_RETRY_DELAY`] (`Retry-After` on connect),
/// `UNAVAILABLE` when shutting down.
#[derive(Clone)]
pub struct PusherServer {
    pusher: Pusher,
}

impl PusherServer {
    pub fn new(pusher: Pusher) -> Self {
        Self { pusher }
    }
}

/// The gRPC answer to a refused push.
fn refused_status(r: Refused) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    match r {
        Refused::Invalid(m) => tonic::Status::invalid_argument(m),
        Refused::Full(m) => tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            m,
            ErrorDetails::with_retry_info(Some(FULL_QUEUE_RETRY_DELAY)),
        ),
        Refused::ShuttingDown(m) => tonic::Status::unavailable(m),
    }
}

#[derive(Clone)]
struct PushMethod(Pusher);

impl tonic::server::UnaryService<PushRequest> for PushMethod {
    type Response = PushResponse;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tonic::Response<PushResponse>, tonic::Status>>
                + Send,
        >,
    >;

    fn call(&mut self, request: tonic::Request<PushRequest>) -> Self::Future {
        let pusher = self.0.clone();
        Box::pin(async move {
            let ctx = &pusher.0;
            let token = request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes());
            if !ctx.auth.allows(token) {
                ctx.ingest.stats.profiles.unauthenticated.inc();
                return Err(tonic::Status::unauthenticated(
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                ));
            }
            pusher
                .accept(request.into_inner())
                .map(|()| tonic::Response::new(PushResponse {}))
                .map_err(refused_status)
        })
    }
}

impl<B> tower::Service<axum::http::Request<B>> for PusherServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let method = PushMethod(self.pusher.clone());
        let max = self.pusher.0.max_bytes;
        if req.uri().path() != PUSH_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("push.v1.PusherService has Push only").into_http())
            });
        }
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(max);
            Ok(grpc.unary(method, req).await)
        })
    }
}

impl tonic::server::NamedService for PusherServer {
    const NAME: &'static str = "push.v1.PusherService";
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

    #[test]
    fn sample_labels_split_series_but_ids_and_numbers_stay_on_samples() {
        use crate::proto::{pprof::Label, push::RawSample};
        let mut p = pprof::tests::cpu_profile(
            &[
                (&["main", "a"], 3),
                (&["main", "b"], 2),
                (&["main", "c"], 1),
            ],
            1,
        );
        let mut intern = |s: &str| {
            p.string_table.push(s.to_string());
            p.string_table.len() as i64 - 1
        };
        let (endpoint, busy, span, id, pid) = (
            intern("endpoint"),
            intern("/busy"),
            intern("span_id"),
            intern("0123456789abcdef"),
            intern("pid"),
        );
        let label = |key, str, num| Label {
            key,
            str,
            num,
            num_unit: 0,
        };
        p.sample[0].label = vec![label(endpoint, busy, 0), label(span, id, 0)];
        // A numeric label (the agent's pid, tid) is no series label.
        p.sample[1].label = vec![label(pid, 0, 42)];
        let req = PushRequest {
            series: vec![RawProfileSeries {
                labels: vec![
                    LabelPair {
                        name: "__name__".into(),
                        value: "process_cpu".into(),
                    },
                    LabelPair {
                        name: "service_name".into(),
                        value: "shop".into(),
                    },
                ],
                samples: vec![RawSample {
                    raw_profile: pprof::encode_gzip(&p),
                    id: String::new(),
                }],
            }],
        };
        let (profiles, _) = decode_push(req, SystemTime::now(), |_| false).unwrap();
        let by: Vec<(String, Vec<(String, i64)>)> = profiles
            .iter()
            .map(|r| (r.labels.selector(), pprof::folded(&r.profile, 0)))
            .collect();
        assert_eq!(
            by,
            [
                (
                    r#"process_cpu{endpoint="/busy",service_name="shop"}"#.to_string(),
                    vec![("main;a".to_string(), 3)]
                ),
                (
                    r#"process_cpu{service_name="shop"}"#.to_string(),
                    vec![("main;b".to_string(), 2), ("main;c".to_string(), 1)]
                ),
            ]
        );
        let keys = |r: &RawProfile, i: usize| -> Vec<String> {
            r.profile.sample[i]
                .label
                .iter()
                .map(|l| r.profile.string_table[l.key as usize].clone())
                .collect()
        };
        assert_eq!(keys(&profiles[0], 0), ["span_id"]);
        assert_eq!(keys(&profiles[1], 0), ["pid"]);
    }
}
