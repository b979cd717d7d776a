//! OTLP gRPC receiver: `TraceService/Export` and `MetricsService/Export`
//! (the opentelemetry-proto services on tonic), gzip accepted, bearer auth and
//! TLS optional. A request that is not a decodable message (garbage protobuf,
//! a broken gzip stream) is `INVALID_ARGUMENT` and counted as invalid, like
//! any other malformed request (tonic's codec itself answers `INTERNAL`).
use std::{net::SocketAddr, sync::Arc};

use axum::http::{HeaderValue, Response as HttpResponse};

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
use crate::{
    pipeline::{Ingest, IngestError},
    stats::Stats,
};

const TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Turns the `INTERNAL` status tonic's codec gives an undecodable request
/// (`failed to decode Protobuf message: …`, `Error decompressing: …`, sent
/// trailers-only, in the response headers) into `INVALID_ARGUMENT` with the
/// same message, and counts the request as invalid for its signal. Our own
/// handlers never answer `INTERNAL`.
pub fn decode_errors_are_invalid_argument<B>(
    stats: &Stats,
    path: &str,
    mut resp: HttpResponse<B>,
) -> HttpResponse<B> {
    let h = resp.headers();
    let internal = h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"13");
    // grpc-message is percent-encoded on the wire (`failed%20to%20decode…`).
    let decode = h.get("grpc-message").is_some_and(|m| {
        let m = m.as_bytes();
        [
            b"failed%20to%20decode".as_slice(),
            b"Error%20decompressing",
            b"failed to decode",
            b"Error decompressing",
        ]
        .iter()
        .any(|p| m.starts_with(p))
    });
    if internal && decode {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("3"));
        if path == TRACES_PATH {
            stats.spans.invalid_requests.inc();
        } else {
            stats.metrics.invalid_requests.inc();
        }
    }
    resp
}

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

/// The service wrapper applying [`decode_errors_are_invalid_argument`].
#[derive(Clone)]
struct InvalidArgument<S> {
    inner: S,
    stats: Arc<Stats>,
}

impl<S, ReqBody, ResBody> tower::Service<axum::http::Request<ReqBody>> for InvalidArgument<S>
where
    S: tower::Service<axum::http::Request<ReqBody>, Response = HttpResponse<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = HttpResponse<ResBody>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path().to_string();
        let stats = self.stats.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(decode_errors_are_invalid_argument(&stats, &path, resp))
        })
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
    let svc_stats = stats.clone();
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
    let stats = svc_stats;
    let layer = tower::ServiceBuilder::new().layer_fn(move |inner| InvalidArgument {
        inner,
        stats: stats.clone(),
    });
    let mut builder = tonic::transport::Server::builder().layer(layer);
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
