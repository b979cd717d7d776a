//! Where the OTLP output of the tracing and network signals goes: the
//! collector in this process ([`EmbeddedOtlpSink`]), which stores it or
//! exports it (to a remote collector, Jaeger, any OTLP endpoint).
use fathom_collector::{EncodedSpans, Ingest};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

/// Where spans and metrics go.
pub trait OtlpSink: Send {
    /// Delivers spans (an OTLP traces request, encoded); false when they
    /// were not accepted (counted by the session).
    fn spans(&mut self, spans: EncodedSpans) -> bool;
    /// Delivers the cumulative RED metrics.
    fn metrics(&mut self, req: ExportMetricsServiceRequest) -> bool;
}

/// The collector embedded in the agent.
pub struct EmbeddedOtlpSink(pub Ingest);

impl OtlpSink for EmbeddedOtlpSink {
    fn spans(&mut self, spans: EncodedSpans) -> bool {
        self.0.encoded_spans(spans).is_ok()
    }

    fn metrics(&mut self, req: ExportMetricsServiceRequest) -> bool {
        self.0.metrics(req).is_ok()
    }
}
