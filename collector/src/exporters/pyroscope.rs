//! Sends merged profiles to Pyroscope with its connect push API:
//! `POST {url}/push.v1.PusherService/Push`, `Content-Type: application/proto`,
//! a `push.v1.PushRequest` with one series per merged profile (its labels, one
//! sample holding the gzipped pprof and a fresh UUID, which lets Pyroscope
//! recognise a retried duplicate).
use std::{sync::Arc, time::Duration};

use bytes::{BufMut as _, Bytes};
use prost::Message as _;
use tokio::sync::mpsc;

use super::{
    AttemptFuture, Delivery,
    otlp::ExporterError,
    retry::{Attempt, Entry, classify_http},
};
use crate::{
    config::PyroscopeConfig,
    model::MergedProfile,
    pipeline::Batch,
    pprof,
    proto::push::{LabelPair, PushRequest, RawProfileSeries, RawSample},
    stats::ExporterStats,
};

/// Sample labels left out of what Pyroscope receives: Pyroscope makes a
/// series of each distinct set of sample labels (but keeps `span_id` on
/// samples, for its span profiles), so a trace id would make a series per
/// trace.
const NOT_FOR_PYROSCOPE: &[&str] = &["trace_id"];

/// The push request for some merged profiles.
pub fn push_request(profiles: &[MergedProfile]) -> PushRequest {
    PushRequest {
        series: profiles
            .iter()
            .map(|p| RawProfileSeries {
                labels: p
                    .labels
                    .pairs()
                    .iter()
                    .map(|(name, value)| LabelPair {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                samples: vec![RawSample {
                    raw_profile: pprof::encode_gzip(&for_pyroscope(&p.profile)),
                    id: uuid::Uuid::new_v4().to_string(),
                }],
            })
            .collect(),
    }
}

/// `profile` without the [`NOT_FOR_PYROSCOPE`] sample labels.
fn for_pyroscope(
    profile: &crate::proto::pprof::Profile,
) -> std::borrow::Cow<'_, crate::proto::pprof::Profile> {
    let has = |key: &&str| profile.string_table.iter().any(|s| s == key);
    if !NOT_FOR_PYROSCOPE.iter().any(has) {
        return std::borrow::Cow::Borrowed(profile);
    }
    let mut p = profile.clone();
    for key in NOT_FOR_PYROSCOPE {
        pprof::drop_label(&mut p, key);
    }
    std::borrow::Cow::Owned(p)
}

/// A configured Pyroscope exporter (see [`PyroscopeExporter::run`]).
#[derive(Clone, Debug)]
pub struct PyroscopeExporter {
    client: reqwest::Client,
    url: String,
    headers: reqwest::header::HeaderMap,
    buffer_bytes: u64,
}

impl PyroscopeExporter {
    pub fn new(config: &PyroscopeConfig) -> Result<Self, ExporterError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/proto"));
        if let Some(org) = &config.org_id {
            let v = HeaderValue::from_str(org).map_err(|e| ExporterError::Header {
                name: "X-Scope-OrgID".into(),
                reason: e.to_string(),
            })?;
            headers.insert("X-Scope-OrgID", v);
        }
        if let Some(auth) = &config.basic_auth {
            use base64::Engine as _;
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", auth.username, auth.password));
            headers.insert(AUTHORIZATION, authorization(&format!("Basic {token}"))?);
        }
        if let Some(token) = &config.bearer_token {
            if config.basic_auth.is_some() {
                return Err(ExporterError::Header {
                    name: "Authorization".into(),
                    reason: "set basic_auth or bearer_token, not both".into(),
                });
            }
            headers.insert(AUTHORIZATION, authorization(&format!("Bearer {token}"))?);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| ExporterError::Client(e.to_string()))?;
        Ok(Self {
            client,
            url: format!(
                "{}/push.v1.PusherService/Push",
                config.url.trim_end_matches('/')
            ),
            headers,
            buffer_bytes: config.buffer_bytes,
        })
    }

    /// Sends `Batch::Profiles` until `rx` closes, then delivers what is
    /// buffered until `shutdown_deadline`; the rest is counted as dropped.
    pub async fn run(
        self,
        rx: mpsc::Receiver<Batch>,
        stats: Arc<ExporterStats>,
        shutdown_deadline: Duration,
    ) {
        let buffer_bytes = self.buffer_bytes;
        super::drive(
            "pyroscope",
            self,
            rx,
            stats,
            buffer_bytes,
            shutdown_deadline,
        )
        .await;
    }
}

impl Delivery for PyroscopeExporter {
    type Item = Bytes;

    fn encode(&mut self, batch: &Batch) -> Vec<Entry<Bytes>> {
        let Batch::Profiles(profiles) = batch else {
            return Vec::new();
        };
        // One entry per profile, so that the buffer bound drops whole
        // profiles and a request can be cut at any profile.
        profiles
            .iter()
            .map(|p| {
                let body = push_request(std::slice::from_ref(p)).encode_to_vec();
                Entry {
                    bytes: body.len() as u64,
                    count: 1,
                    item: Bytes::from(body),
                }
            })
            .collect()
    }

    fn joinable(_: &Bytes, _: &Bytes) -> bool {
        true
    }

    fn send(&self, items: Vec<Bytes>) -> AttemptFuture {
        // Encoded PushRequests concatenate into one with all their series.
        let mut body = Vec::with_capacity(items.iter().map(Bytes::len).sum());
        for i in &items {
            body.put_slice(i);
        }
        let request = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(body);
        let url = self.url.clone();
        Box::pin(async move {
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let text = response.text().await.unwrap_or_default();
                    classify_http(status, retry_after.as_deref(), &text)
                }
                Err(e) if e.is_builder() => Attempt::Permanent {
                    reason: format!("POST {url}: {e}"),
                },
                Err(e) => Attempt::Retry {
                    after: None,
                    reason: format!("POST {url}: {e}"),
                },
            }
        })
    }
}

/// An `Authorization` header value, kept out of logs.
fn authorization(value: &str) -> Result<reqwest::header::HeaderValue, ExporterError> {
    let mut v =
        reqwest::header::HeaderValue::from_str(value).map_err(|e| ExporterError::Header {
            name: "Authorization".into(),
            reason: e.to_string(),
        })?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        model::SeriesLabels,
        proto::pprof::{Profile, ValueType},
    };

    fn merged(service: &str) -> MergedProfile {
        MergedProfile {
            labels: SeriesLabels::new([("__name__", "process_cpu"), ("service_name", service)])
                .unwrap(),
            window_start: SystemTime::UNIX_EPOCH,
            window: Duration::from_secs(15),
            inputs: 1,
            profile: Profile {
                sample_type: vec![ValueType { r#type: 1, unit: 2 }],
                string_table: vec![String::new(), "cpu".into(), "nanoseconds".into()],
                ..Profile::default()
            },
        }
    }

    #[test]
    fn one_series_per_profile_with_labels_gzip_and_uuid() {
        let req = push_request(&[merged("a"), merged("b")]);
        assert_eq!(req.series.len(), 2);
        let s = &req.series[1];
        assert_eq!(
            s.labels,
            vec![
                LabelPair {
                    name: "__name__".into(),
                    value: "process_cpu".into()
                },
                LabelPair {
                    name: "service_name".into(),
                    value: "b".into()
                }
            ]
        );
        assert_eq!(s.samples.len(), 1);
        let back = pprof::decode(&s.samples[0].raw_profile).unwrap();
        assert_eq!(back, merged("b").profile);
        assert_eq!(&s.samples[0].raw_profile[..2], &[0x1f, 0x8b], "gzipped");
        assert!(uuid::Uuid::parse_str(&s.samples[0].id).is_ok());
        assert_ne!(req.series[0].samples[0].id, s.samples[0].id);
    }

    #[test]
    fn span_ids_stay_on_samples_and_trace_ids_do_not_reach_pyroscope() {
        use crate::proto::pprof::{Label, Sample};
        let mut m = merged("a");
        m.profile.string_table.extend(
            [
                "span_id",
                "trace_id",
                "00f067aa0ba902b7",
                "4bf92f3577b34da6a3ce929d0e0e4736",
            ]
            .map(String::from),
        );
        let label = |key, str| Label {
            key,
            str,
            ..Label::default()
        };
        m.profile.sample = vec![
            Sample {
                value: vec![1],
                label: vec![label(3, 5), label(4, 6)],
                ..Sample::default()
            },
            Sample {
                value: vec![2],
                ..Sample::default()
            },
        ];
        let req = push_request(std::slice::from_ref(&m));
        let back = pprof::decode(&req.series[0].samples[0].raw_profile).unwrap();
        assert_eq!(back.sample[0].label, vec![label(3, 5)]);
        assert_eq!(back.sample[1].value, vec![2]);
        // What the store keeps is untouched.
        assert_eq!(m.profile.sample[0].label.len(), 2);
    }

    #[test]
    fn concatenated_requests_hold_all_series() {
        let a = push_request(&[merged("a")]).encode_to_vec();
        let b = push_request(&[merged("b")]).encode_to_vec();
        let joined = PushRequest::decode([a, b].concat().as_slice()).unwrap();
        let services: Vec<&str> = joined
            .series
            .iter()
            .map(|s| s.labels[1].value.as_str())
            .collect();
        assert_eq!(services, ["a", "b"]);
    }
}
