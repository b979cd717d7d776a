//! An OTLP `ExportTraceServiceRequest` as the OTLP receivers get it:
//! protobuf (gRPC, HTTP `application/x-protobuf`) and JSON (HTTP
//! `application/json`), then the receivers' span validation.
#![no_main]

use fathom_collector::{
    proto::otlp::collector::trace::v1::ExportTraceServiceRequest, receivers::validate_traces,
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = ExportTraceServiceRequest::decode(data) {
        check(&req);
    }
    if let Ok(req) = serde_json::from_slice::<ExportTraceServiceRequest>(data) {
        check(&req);
    }
});

fn check(req: &ExportTraceServiceRequest) {
    let valid = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .all(|s| {
            s.trace_id.len() == 16
                && s.trace_id.iter().any(|&b| b != 0)
                && s.span_id.len() == 8
                && s.span_id.iter().any(|&b| b != 0)
                && (s.parent_span_id.is_empty() || s.parent_span_id.len() == 8)
        });
    assert_eq!(validate_traces(req).is_ok(), valid, "{req:?}");
}
