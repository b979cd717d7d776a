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
