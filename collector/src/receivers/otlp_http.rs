//! OTLP HTTP receiver: `POST /v1/traces` and `POST /v1/metrics`, binary
//! protobuf (`application/x-protobuf`) or JSON (`application/json`), gzip
//! bodies accepted. Errors follow the OTLP/HTTP spec: 400 with a
//! `google.rpc.Status` for malformed data, 429/503 with `Retry-After` when the
//! client should retry.
use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
    trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse},
};
use prost::Message as _;

use super::{auth::BearerAuth, decompress, validate_traces};
use crate::{
    pipeline::{Ingest, IngestError},
    stats::SignalStats,
};

/// `google.rpc.Status`, the error body OTLP/HTTP specifies.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

struct Ctx {
    ingest: Ingest,
    auth: BearerAuth,
    max_bytes: usize,
}

pub fn router(ingest: Ingest, auth: BearerAuth, max_request_bytes: usize) -> Router {
    let ctx = Arc::new(Ctx {
        ingest,
        auth,
        max_bytes: max_request_bytes,
    });
    Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(axum::middleware::from_fn(crate::receivers::linger))
        .with_state(ctx)
}

fn error(enc: Encoding, status: StatusCode, grpc_code: i32, message: String) -> Response {
    let mut resp = match enc {
        Encoding::Protobuf => (
            status,
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            RpcStatus {
                code: grpc_code,
                message,
            }
            .encode_to_vec(),
        )
            .into_response(),
        Encoding::Json => (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "code": grpc_code, "message": message }).to_string(),
        )
            .into_response(),
    };
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// gRPC codes used in the status body.
const INVALID_ARGUMENT: i32 = 3;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

/// Checks auth and content type and returns the decompressed body.
#[allow(
    clippy::result_large_err,
    reason = "the error is the response, built once"
)]
fn prepare(
    ctx: &Ctx,
    headers: &HeaderMap,
    body: &Result<Bytes, BytesRejection>,
    stats: &SignalStats,
) -> Result<(Encoding, Vec<u8>), Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let enc = match mime {
        "application/x-protobuf" | "application/protobuf" => Encoding::Protobuf,
        "application/json" => Encoding::Json,
        other => {
            stats.invalid_requests.inc();
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type {other:?} is not supported: use application/x-protobuf or application/json"
                ),
            )
                .into_response());
        }
    };
    if !ctx
        .auth
        .allows(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    {
        stats.unauthenticated.inc();
        return Err(error(
            enc,
            StatusCode::UNAUTHORIZED,
            UNAUTHENTICATED,
            "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
        ));
    }
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            stats.invalid_requests.inc();
            return Err(body_error(enc, r, ctx.max_bytes));
        }
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("identity") => false,
        Some("gzip") => true,
        Some(other) => {
            stats.invalid_requests.inc();
            return Err(error(
                enc,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                INVALID_ARGUMENT,
                format!("Content-Encoding {other:?} is not supported (gzip is)"),
            ));
        }
    };
    let body = decompress(body, gzip, ctx.max_bytes).map_err(|m| {
        stats.invalid_requests.inc();
        error(enc, StatusCode::BAD_REQUEST, INVALID_ARGUMENT, m)
    })?;
    Ok((enc, body))
}

/// A body that could not be read — over `max_request_bytes` (413) — in the
/// OTLP error format (`google.rpc.Status`, `RESOURCE_EXHAUSTED`).
fn body_error(enc: Encoding, r: &BytesRejection, max: usize) -> Response {
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        error(
            enc,
            status,
            RESOURCE_EXHAUSTED,
            format!("request body larger than {max} bytes (queues.max_request_bytes)"),
        )
    } else {
        error(enc, status, INVALID_ARGUMENT, r.body_text())
    }
}

fn decode<T: prost::Message + Default + serde::de::DeserializeOwned>(
    enc: Encoding,
    body: &[u8],
) -> Result<T, String> {
    match enc {
        Encoding::Protobuf => T::decode(body).map_err(|e| format!("protobuf: {e}")),
        Encoding::Json => serde_json::from_slice(body).map_err(|e| format!("JSON: {e}")),
    }
}

fn ingest_error(enc: Encoding, e: IngestError) -> Response {
    match e {
        IngestError::Full(_) => error(
            enc,
            StatusCode::TOO_MANY_REQUESTS,
            RESOURCE_EXHAUSTED,
            e.to_string(),
        ),
        IngestError::ShuttingDown => error(
            enc,
            StatusCode::SERVICE_UNAVAILABLE,
            UNAVAILABLE,
            e.to_string(),
        ),
    }
}

fn ok<T: prost::Message>(enc: Encoding, resp: T) -> Response {
    match enc {
        Encoding::Protobuf => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            resp.encode_to_vec(),
        )
            .into_response(),
        // No partial success is ever reported: the empty response.
        Encoding::Json => ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
    }
}

async fn traces(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let stats = &ctx.ingest.stats.spans;
    let (enc, body) = match prepare(&ctx, &headers, &body, stats) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req: ExportTraceServiceRequest = match decode(enc, &body) {
        Ok(r) => r,
        Err(m) => {
            stats.invalid_requests.inc();
            return error(enc, StatusCode::BAD_REQUEST, INVALID_ARGUMENT, m);
        }
    };
    if let Err(m) = validate_traces(&req) {
        stats.invalid_requests.inc();
        return error(enc, StatusCode::BAD_REQUEST, INVALID_ARGUMENT, m);
    }
    match ctx.ingest.spans(req) {
        Ok(()) => ok(
            enc,
            ExportTraceServiceResponse {
                partial_success: None,
            },
        ),
        Err(e) => ingest_error(enc, e),
    }
}

async fn metrics(
    State(ctx): State<Arc<Ctx>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let stats = &ctx.ingest.stats.metrics;
    let (enc, body) = match prepare(&ctx, &headers, &body, stats) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req: ExportMetricsServiceRequest = match decode(enc, &body) {
        Ok(r) => r,
        Err(m) => {
            stats.invalid_requests.inc();
            return error(enc, StatusCode::BAD_REQUEST, INVALID_ARGUMENT, m);
        }
    };
    match ctx.ingest.metrics(req) {
        Ok(()) => ok(
            enc,
            ExportMetricsServiceResponse {
                partial_success: None,
            },
        ),
        Err(e) => ingest_error(enc, e),
    }
}
