//! OTLP gRPC receiver: `TraceService/Export` and `MetricsService/Export`
//! (the opentelemetry-proto services on tonic), gzip accepted, bearer auth and
//! TLS optional.
use std::net::SocketAddr;

use opentelemetry_proto::tonic::collector::{
    metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
        metrics_service_server::{MetricsService, MetricsServiceServer},
    },
    trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Response, Status, codec::CompressionEncoding, service::interceptor::InterceptedService,
};

use super::{auth::BearerAuth, tls::TlsMaterial, validate_traces};
use crate::pipeline::{Ingest, IngestError};

/// Back-pressure as gRPC status: a full queue is `RESOURCE_EXHAUSTED` (OTLP
/// clients retry it with backoff), shutting down is `UNAVAILABLE`.
pub fn ingest_status(e: IngestError) -> Status {
    match e {
        IngestError::Full(_) => Status::resource_exhausted(e.to_string()),
        IngestError::ShuttingDown => Status::unavailable(e.to_string()),
    }
}

#[derive(Clone)]
struct Otlp {
    ingest: Ingest,
}

#[tonic::async_trait]
impl TraceService for Otlp {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let req = request.into_inner();
        if let Err(reason) = validate_traces(&req) {
            self.ingest.stats.spans.invalid_requests.inc();
            return Err(Status::invalid_argument(reason));
        }
        self.ingest.spans(req).map_err(ingest_status)?;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Otlp {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.ingest
            .metrics(request.into_inner())
            .map_err(ingest_status)?;
        Ok(Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves until `cancel`, then finishes in-flight calls.
pub async fn serve(
    listener: TcpListener,
    ingest: Ingest,
    auth: BearerAuth,
    tls: Option<TlsMaterial>,
    max_request_bytes: usize,
    cancel: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let svc = Otlp { ingest };
    let stats = svc.ingest.stats.clone();
    let intercept = move |req: Request<()>| {
        auth.intercept(req).inspect_err(|_| {
            stats.spans.unauthenticated.inc();
        })
    };
    let traces = InterceptedService::new(
        TraceServiceServer::new(svc.clone())
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max_request_bytes),
        intercept.clone(),
    );
    let metrics = InterceptedService::new(
        MetricsServiceServer::new(svc)
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max_request_bytes),
        intercept,
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(tls.cert_pem, tls.key_pem);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::debug!(?local, "OTLP gRPC serving");
    builder
        .add_service(traces)
        .add_service(metrics)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            cancel.cancelled_owned(),
        )
        .await
}
