//! Forwards spans and metrics, as received, to an OTLP endpoint (Jaeger, an
//! OpenTelemetry collector): gRPC (`TraceService/Export`,
//! `MetricsService/Export`) or HTTP/protobuf (`POST {endpoint}/v1/traces`,
//! `/v1/metrics`).
//!
//! The requests are the received `ExportTraceServiceRequest` /
//! `ExportMetricsServiceRequest` messages, re-encoded unchanged: every
//! resource, scope and attribute is kept. They are buffered encoded, and
//! consecutive buffered requests of one signal are sent as one request (the
//! concatenation of two encoded messages is the message with both lists of
//! resources — protobuf's merge rule for repeated fields).
use std::{marker::PhantomData, sync::Arc, time::Duration};

use bytes::{BufMut as _, Bytes};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceResponse, trace::v1::ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

use super::{
    AttemptFuture, Delivery,
    retry::{Attempt, Entry, classify_grpc, classify_http},
};
use crate::{
    config::{OtlpExporterConfig, OtlpProtocol},
    pipeline::{Batch, metric_point_count, span_count},
    stats::ExporterStats,
};

#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    #[error("endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("header {name:?}: {reason}")]
    Header { name: String, reason: String },
    #[error("HTTP client: {0}")]
    Client(String),
}

/// The signal of a buffered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

/// One encoded export request.
#[derive(Clone, Debug)]
pub struct OtlpItem {
    pub signal: Signal,
    pub body: Bytes,
}

#[derive(Clone, Debug)]
enum Transport {
    Grpc {
        channel: Channel,
        metadata: MetadataMap,
    },
    Http {
        client: reqwest::Client,
        traces_url: String,
        metrics_url: String,
        headers: reqwest::header::HeaderMap,
    },
}

/// A configured OTLP exporter (see [`OtlpExporter::run`]).
#[derive(Clone, Debug)]
pub struct OtlpExporter {
    transport: Transport,
    timeout: Duration,
    metrics: bool,
    buffer_bytes: u64,
}

impl OtlpExporter {
    /// Checks the configuration and prepares the client; connects lazily (a
    /// receiver that is down at start-up is retried like any other outage).
    /// Needs a Tokio runtime.
    pub fn new(config: &OtlpExporterConfig) -> Result<Self, ExporterError> {
        let endpoint = config.endpoint.trim_end_matches('/').to_string();
        let transport = match config.protocol {
            OtlpProtocol::Grpc => {
                let bad = |reason: String| ExporterError::Endpoint {
                    endpoint: endpoint.clone(),
                    reason,
                };
                let mut ep = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout)
                    .tcp_nodelay(true);
                if endpoint.starts_with("https://") {
                    ep = ep
                        .tls_config(ClientTlsConfig::new().with_native_roots())
                        .map_err(|e| bad(e.to_string()))?;
                }
                let mut metadata = MetadataMap::new();
                for (name, value) in &config.headers {
                    let key = MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                        .map_err(|e| ExporterError::Header {
                            name: name.clone(),
                            reason: e.to_string(),
                        })?;
                    let value = MetadataValue::try_from(value.as_str()).map_err(|e| {
                        ExporterError::Header {
                            name: name.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    metadata.insert(key, value);
                }
                Transport::Grpc {
                    channel: ep.connect_lazy(),
                    metadata,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                // reqwest is built without a default crypto provider.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut headers = reqwest::header::HeaderMap::new();
                for (name, value) in &config.headers {
                    let bad = |reason: String| ExporterError::Header {
                        name: name.clone(),
                        reason,
                    };
                    let k = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| bad(e.to_string()))?;
                    let v = reqwest::header::HeaderValue::from_str(value)
                        .map_err(|e| bad(e.to_string()))?;
                    headers.insert(k, v);
                }
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    reqwest::header::HeaderValue::from_static("application/x-protobuf"),
                );
                let client = reqwest::Client::builder()
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout)
                    .build()
                    .map_err(|e| ExporterError::Client(e.to_string()))?;
                Transport::Http {
                    client,
                    traces_url: format!("{endpoint}/v1/traces"),
                    metrics_url: format!("{endpoint}/v1/metrics"),
                    headers,
                }
            }
        };
        Ok(Self {
            transport,
            timeout: config.timeout,
            metrics: config.metrics,
            buffer_bytes: config.buffer_bytes,
        })
    }

    /// Forwards `Batch::Spans` and `Batch::EncodedSpans` (and `Batch::Metrics` unless `metrics = false`)
    /// until `rx` closes, then delivers what is buffered until
    /// `shutdown_deadline`; the rest is counted as dropped.
    pub async fn run(
        self,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<ExporterStats>,
        shutdown_deadline: Duration,
    ) {
        let buffer_bytes = self.buffer_bytes;
        super::drive("otlp", self, rx, stats, buffer_bytes, shutdown_deadline).await;
    }
}

impl Delivery for OtlpExporter {
    type Item = OtlpItem;

    fn encode(&mut self, batch: &Batch) -> Vec<Entry<OtlpItem>> {
        let (signal, body, count) = match batch {
            Batch::Spans(req) => (
                Signal::Traces,
                Bytes::from(req.encode_to_vec()),
                span_count(req),
            ),
            // Sent as they came: no decoding, no encoding.
            Batch::EncodedSpans(e) => (Signal::Traces, e.bytes.clone(), e.spans),
            Batch::Metrics(req) if self.metrics => (
                Signal::Metrics,
                Bytes::from(req.encode_to_vec()),
                metric_point_count(req),
            ),
            _ => return Vec::new(),
        };
        if count == 0 {
            return Vec::new();
        }
        vec![Entry {
            bytes: body.len() as u64,
            count,
            item: OtlpItem { signal, body },
        }]
    }

    fn joinable(a: &OtlpItem, b: &OtlpItem) -> bool {
        a.signal == b.signal
    }

    fn send(&self, items: Vec<OtlpItem>) -> AttemptFuture {
        let signal = items.first().map_or(Signal::Traces, |i| i.signal);
        let body = join(items);
        let transport = self.transport.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match transport {
                Transport::Grpc { channel, metadata } => {
                    send_grpc(channel, metadata, signal, body, timeout).await
                }
                Transport::Http {
                    client,
                    traces_url,
                    metrics_url,
                    headers,
                } => {
                    let url = match signal {
                        Signal::Traces => traces_url,
                        Signal::Metrics => metrics_url,
                    };
                    send_http(client, url, headers, signal, body).await
                }
            }
        })
    }
}

/// Concatenates encoded requests of one signal into one request.
fn join(items: Vec<OtlpItem>) -> Bytes {
    if items.len() == 1 {
        return items.into_iter().map(|i| i.body).next().unwrap_or_default();
    }
    let mut out = Vec::with_capacity(items.iter().map(|i| i.body.len()).sum());
    for i in &items {
        out.put_slice(&i.body);
    }
    Bytes::from(out)
}

/// What a partial-success response says: rejected items and the message.
fn partial(signal: Signal, body: &[u8]) -> Attempt {
    let (rejected, message) = match signal {
        Signal::Traces => ExportTraceServiceResponse::decode(body)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_spans, p.error_message)),
        Signal::Metrics => ExportMetricsServiceResponse::decode(body)
            .ok()
            .and_then(|r| r.partial_success)
            .map(|p| (p.rejected_data_points, p.error_message)),
    }
    .unwrap_or_default();
    Attempt::Delivered {
        rejected: u64::try_from(rejected).unwrap_or(0),
        message: (!message.is_empty()).then_some(message),
    }
}

async fn send_http(
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    signal: Signal,
    body: Bytes,
) -> Attempt {
    let response = match client.post(&url).headers(headers).body(body).send().await {
        Ok(r) => r,
        Err(e) if e.is_builder() => {
            return Attempt::Permanent {
                reason: format!("POST {url}: {e}"),
            };
        }
        Err(e) => {
            return Attempt::Retry {
                after: None,
                reason: format!("POST {url}: {}", error_chain(&e)),
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) if (200..300).contains(&status) => {
            // Accepted; only the partial-success details are lost.
            tracing::debug!(error = %e, "reading an OTLP response body");
            Bytes::new()
        }
        Err(e) => {
            return Attempt::Retry {
                after: None,
                reason: format!("POST {url}: HTTP {status}, reading body: {e}"),
            };
        }
    };
    if (200..300).contains(&status) {
        return partial(signal, &body);
    }
    // Error bodies are a google.rpc.Status; its message (field 2) is printable
    // text inside the bytes, the lossy text is enough for the log.
    classify_http(
        status,
        retry_after.as_deref(),
        &String::from_utf8_lossy(&body),
    )
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

async fn send_grpc(
    channel: Channel,
    metadata: MetadataMap,
    signal: Signal,
    body: Bytes,
    timeout: Duration,
) -> Attempt {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Attempt::Retry {
            after: None,
            reason: format!("gRPC channel not ready: {e}"),
        };
    }
    let mut request = tonic::Request::new(body);
    *request.metadata_mut() = metadata;
    request.set_timeout(timeout);
    let result = match signal {
        Signal::Traces => grpc
            .unary(
                request,
                PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                ),
                RawCodec::<ExportTraceServiceResponse>::default(),
            )
            .await
            .map(|r| {
                r.into_inner()
                    .partial_success
                    .map(|p| (p.rejected_spans, p.error_message))
            }),
        Signal::Metrics => grpc
            .unary(
                request,
                PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                ),
                RawCodec::<ExportMetricsServiceResponse>::default(),
            )
            .await
            .map(|r| {
                r.into_inner()
                    .partial_success
                    .map(|p| (p.rejected_data_points, p.error_message))
            }),
    };
    match result {
        Ok(p) => {
            let (rejected, message) = p.unwrap_or_default();
            Attempt::Delivered {
                rejected: u64::try_from(rejected).unwrap_or(0),
                message: (!message.is_empty()).then_some(message),
            }
        }
        Err(status) => {
            // tonic attaches the transport error as the source of a status it
            // made itself; a status sent by the server has none.
            let local = std::error::Error::source(&status).is_some();
            let message = match std::error::Error::source(&status) {
                Some(src) => format!("{}: {}", status.message(), error_chain(src)),
                None => status.message().to_string(),
            };
            // grpc-status-details-bin's google.rpc.RetryInfo, if any.
            let retry_info = tonic_types::StatusExt::get_details_retry_info(&status);
            classify_grpc(status.code(), &message, local, retry_info.as_ref())
        }
    }
}

/// A gRPC codec that sends already-encoded request bytes and decodes the
/// response with prost (what the generated clients do, minus re-encoding).
struct RawCodec<R>(PhantomData<fn() -> R>);

impl<R> Default for RawCodec<R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct RawEncoder;

struct ProstDecoder<R>(PhantomData<fn() -> R>);

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl<R: prost::Message + Default> Decoder for ProstDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the export response: {e}")))
    }
}

impl<R: prost::Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder(PhantomData)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };

    use super::*;

    fn request(service: &str, spans: &[&str]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.into())),
                        }),
                        ..KeyValue::default()
                    }],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: spans
                        .iter()
                        .map(|n| Span {
                            name: (*n).into(),
                            ..Span::default()
                        })
                        .collect(),
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        }
    }

    #[test]
    fn joined_requests_keep_every_resource() {
        let a = request("a", &["x", "y"]);
        let b = request("b", &["z"]);
        let joined = join(vec![
            OtlpItem {
                signal: Signal::Traces,
                body: Bytes::from(a.encode_to_vec()),
            },
            OtlpItem {
                signal: Signal::Traces,
                body: Bytes::from(b.encode_to_vec()),
            },
        ]);
        let back = ExportTraceServiceRequest::decode(joined).unwrap();
        assert_eq!(
            back.resource_spans,
            [a.resource_spans, b.resource_spans].concat()
        );
    }

    #[test]
    fn partial_success_counts_rejected() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTracePartialSuccess;
        let r = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "too old".into(),
            }),
        };
        assert_eq!(
            partial(Signal::Traces, &r.encode_to_vec()),
            Attempt::Delivered {
                rejected: 3,
                message: Some("too old".into())
            }
        );
        assert_eq!(
            partial(Signal::Traces, b""),
            Attempt::Delivered {
                rejected: 0,
                message: None
            }
        );
    }
}
