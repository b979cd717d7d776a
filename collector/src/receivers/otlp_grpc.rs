//! OTLP gRPC receiver: `TraceService/Export` and `MetricsService/Export`
//! (the opentelemetry-proto services on tonic), and Pyroscope's
//! `push.v1.PusherService/Push` ([`PusherServer`]), gzip accepted, bearer
//! auth and TLS optional. A request that is not a decodable message (garbage protobuf,
//! a broken gzip stream) is `INVALID_ARGUMENT`, one over `max_request_bytes`
//! `RESOURCE_EXHAUSTED`, both counted as invalid, like any other malformed
//! request (tonic's codec itself answers `INTERNAL` and `OUT_OF_RANGE`).
use std::{net::SocketAddr, sync::Arc, time::Duration};

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
    Code, Request, Response, Status, codec::CompressionEncoding,
    service::interceptor::InterceptedService,
};
use tonic_types::{ErrorDetails, StatusExt};

use super::{
    auth::BearerAuth,
    pyroscope::{PUSH_PATH, Pusher, PusherServer},
    tls::TlsMaterial,
    validate_traces,
};
use crate::{
    pipeline::{Ingest, IngestError},
    stats::Stats,
};

const TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Puts the statuses tonic's codec gives a request it cannot read into the
/// codes OTLP clients expect, and counts the request as invalid for its
/// signal (these statuses are sent trailers-only, in the response headers):
///
/// - an undecodable message (`failed to decode Protobuf message: …`, a broken
///   gzip stream `Error decompressing: …`) is `INTERNAL` from tonic, and
///   becomes `INVALID_ARGUMENT` with the same message;
/// - a message over `max_request_bytes` (`Error, decoded message length too
///   large: …`) is `OUT_OF_RANGE` from tonic, and becomes
///   `RESOURCE_EXHAUSTED`, what grpc-go servers (the OpenTelemetry
///   Collector's) answer a message over their limit; without `RetryInfo`,
///   OTLP clients do not retry it;
/// - a gzip message over the limit once decompressed is already
///   `RESOURCE_EXHAUSTED` (`Error decompressing: size limit, …`).
///
/// Our own handlers never answer `INTERNAL`, `OUT_OF_RANGE` or
/// `RESOURCE_EXHAUSTED` (a full queue is `UNAVAILABLE`, [`ingest_status`]).
pub fn codec_errors_as_otlp_statuses<B>(
    stats: &Stats,
    path: &str,
    mut resp: HttpResponse<B>,
) -> HttpResponse<B> {
    let h = resp.headers();
    let status = h.get("grpc-status").map(HeaderValue::as_bytes);
    // grpc-message is percent-encoded on the wire (`failed%20to%20decode…`).
    let message = h
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    let starts = |p: &str| message.starts_with(p.as_bytes());
    let new_status = match status {
        Some(b"13") if starts("failed to decode") || starts("Error decompressing") => Some("3"),
        Some(b"11") if starts("Error, decoded message length too large") => Some("8"),
        Some(b"8") if starts("Error decompressing: size limit") => Some("8"),
        _ => None,
    };
    if let Some(new_status) = new_status {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static(new_status));
        if path == TRACES_PATH {
            stats.spans.invalid_requests.inc();
        } else if path == PUSH_PATH {
            stats.profiles.invalid_requests.inc();
        } else {
            stats.metrics.invalid_requests.inc();
        }
    }
    resp
}

/// `%XX` escapes decoded (grpc-message's encoding); anything else as is.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let escaped = (s[i] == b'%')
            .then(|| Some((hex(*s.get(i + 1)?)?, hex(*s.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((hi, lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            None => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

/// How long a client refused by a full queue is told to wait
/// (`RetryInfo.retry_delay`; `Retry-After: 1` on OTLP HTTP).
pub const FULL_QUEUE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Back-pressure as gRPC status, as the OTLP specification's "OTLP/gRPC
/// Throttling" asks: a full queue is `UNAVAILABLE` with a `RetryInfo` detail
/// ([`FULL_QUEUE_RETRY_DELAY`]): OTLP clients retry `UNAVAILABLE`, and the
/// OpenTelemetry exporters (opentelemetry-otlp, grpc-go's) wait the
/// `RetryInfo` delay first. `RESOURCE_EXHAUSTED` stays the
/// answer to a message over the size limit: without `RetryInfo`, OTLP clients
/// do not retry it. Shutting down is `UNAVAILABLE` without a delay (retried
/// with the client's backoff, perhaps on another replica).
pub fn ingest_status(e: IngestError) -> Status {
    match e {
        IngestError::Full(_) => Status::with_error_details(
            Code::Unavailable,
            e.to_string(),
            ErrorDetails::with_retry_info(Some(FULL_QUEUE_RETRY_DELAY)),
        ),
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

/// The service wrapper applying [`codec_errors_as_otlp_statuses`].
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
            Ok(codec_errors_as_otlp_statuses(&stats, &path, resp))
        })
    }
}

/// Serves until `cancel`, then finishes in-flight calls. `pusher` answers
/// `push.v1` (it checks the bearer token itself).
pub async fn serve(
    listener: TcpListener,
    ingest: Ingest,
    auth: BearerAuth,
    tls: Option<TlsMaterial>,
    max_request_bytes: usize,
    pusher: Pusher,
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
        .add_service(PusherServer::new(pusher))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            cancel.cancelled_owned(),
        )
        .await
}
