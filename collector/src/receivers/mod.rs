//! Ingest endpoints, each speaking an existing protocol so that any client of
//! it can send: OTLP gRPC (`otlp_grpc`), OTLP HTTP (`otlp_http`), Pyroscope's
//! connect push (`pyroscope`) and legacy `/ingest` (`ingest`). Shared: bearer-token auth (`auth`) and TLS
//! (`tls`).
pub mod auth;
pub mod ingest;
pub mod otlp_grpc;
pub mod otlp_http;
pub mod pyroscope;
pub mod tls;

/// A connect-protocol error: JSON `{code, message}` and the HTTP status the
/// connect protocol gives that code.
pub(crate) fn connect_error(code: &str, message: impl Into<String>) -> axum::response::Response {
    use axum::{
        http::{StatusCode, header},
        response::IntoResponse as _,
    };
    let status = match code {
        "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "code": code, "message": message.into() }).to_string(),
    )
        .into_response()
}

/// Reads a whole body that may be gzip-compressed (`Content-Encoding: gzip`),
/// refusing more than `max` bytes after decompression.
pub(crate) fn decompress(body: &[u8], gzip: bool, max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip body: {e}"))?;
    if out.len() > max {
        return Err(format!("body larger than {max} bytes when decompressed"));
    }
    Ok(out)
}

/// What OTLP receivers refuse: ids of the wrong length or all zero (Jaeger and
/// the OTel collector refuse them too; a span without a valid id cannot be
/// joined to anything).
pub fn validate_traces(
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> Result<(), String> {
    for (r, rs) in req.resource_spans.iter().enumerate() {
        for (s, ss) in rs.scope_spans.iter().enumerate() {
            for (i, span) in ss.spans.iter().enumerate() {
                let at = || format!("resource_spans[{r}].scope_spans[{s}].spans[{i}]");
                if span.trace_id.len() != 16 || span.trace_id.iter().all(|&b| b == 0) {
                    return Err(format!(
                        "{}: trace_id must be 16 bytes, not all zero (got {} bytes)",
                        at(),
                        span.trace_id.len()
                    ));
                }
                if span.span_id.len() != 8 || span.span_id.iter().all(|&b| b == 0) {
                    return Err(format!(
                        "{}: span_id must be 8 bytes, not all zero (got {} bytes)",
                        at(),
                        span.span_id.len()
                    ));
                }
                if !span.parent_span_id.is_empty() && span.parent_span_id.len() != 8 {
                    return Err(format!(
                        "{}: parent_span_id must be empty or 8 bytes (got {})",
                        at(),
                        span.parent_span_id.len()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Reads what a handler left of a request body before the response leaves,
/// as nginx's lingering close does.
///
/// A handler that answers early — 413 over `max_request_bytes`, 401 before
/// the body — leaves the rest of the body unread. Closing a socket with
/// unread data makes the kernel send a reset, and a client still writing its
/// body then loses the response (`IncompleteMessage` instead of the 413).
/// So the rest is read and thrown away, at most [`LINGER_BYTES`] or for
/// [`LINGER_TIME`]; past that the connection is closed as before.
pub(crate) async fn linger(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (back, mut returned) = tokio::sync::oneshot::channel();
    let req = req.map(|inner| {
        axum::body::Body::new(Returning {
            inner: Some(inner),
            back: Some(back),
        })
    });
    let resp = next.run(req).await;
    // Handlers drop the body before they answer; one that handed it on
    // (none does) keeps reading it itself.
    if let Ok(mut rest) = returned.try_recv() {
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        if !rest.is_end_stream() {
            let drain = async {
                let mut read = 0usize;
                while let Some(Ok(frame)) = rest.frame().await {
                    read += frame.data_ref().map_or(0, bytes::Bytes::len);
                    if read > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER_TIME, drain).await;
        }
    }
    resp
}

/// The most of an unread body [`linger`] reads and discards.
const LINGER_BYTES: usize = 64 << 20;
/// The longest [`linger`] waits for the rest of a body.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// A request body that gives itself back to [`linger`] when the handler drops
/// it, read or not.
struct Returning {
    inner: Option<axum::body::Body>,
    back: Option<tokio::sync::oneshot::Sender<axum::body::Body>>,
}

impl http_body::Body for Returning {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => std::pin::Pin::new(inner).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            let _ = back.send(inner);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;

    use super::*;

    #[test]
    fn otlp_fuzz_seeds_json_and_protobuf_are_the_same_valid_request() {
        // collector/fuzz/make-seeds writes one request twice: OTLP/JSON by
        // hand, protobuf with its own wire encoder; opentelemetry-proto must
        // read both to the same message.
        let json = include_bytes!("../../fuzz/corpus/otlp_traces/request.json");
        let pb = include_bytes!("../../fuzz/corpus/otlp_traces/request.pb");
        let from_json: ExportTraceServiceRequest = serde_json::from_slice(json).unwrap();
        let from_pb = ExportTraceServiceRequest::decode(pb.as_slice()).unwrap();
        assert_eq!(from_json, from_pb);
        validate_traces(&from_pb).unwrap();
        let spans = &from_pb.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[1].parent_span_id, spans[0].span_id);

        let mut bad = from_pb;
        bad.resource_spans[0].scope_spans[0].spans[1].span_id = vec![0; 8];
        let err = validate_traces(&bad).unwrap_err();
        assert!(err.contains("spans[1]: span_id"), "{err}");
    }
}
