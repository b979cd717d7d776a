//! Pyroscope's query API over the connect protocol, as Grafana's Pyroscope
//! data source calls it: `POST /querier.v1.QuerierService/{ProfileTypes,
//! LabelNames, LabelValues, Series, SelectMergeStacktraces,
//! SelectMergeProfile, SelectMergeSpanProfile, SelectSeries,
//! GetProfileStats}`, each a unary call in
//! binary protobuf (`application/proto`) or protojson (`application/json`),
//! gzip request bodies accepted; errors are connect errors (`{code,
//! message}`). The other querier methods answer `unimplemented`.
//!
//! The model is Pyroscope's: every stored series is one series per sample
//! type, with the virtual labels `__profile_type__`
//! (`name:type:unit:period type:period unit`), `__type__`, `__unit__`,
//! `__period_type__`, `__period_unit__`; times are unix milliseconds, 0
//! meaning unbounded.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use prost::Message;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    pprof,
    proto::{
        pprof::Profile,
        querier::{
            FORMAT_FLAMEGRAPH, FORMAT_UNSPECIFIED, FlameGraph, GetProfileStatsRequest,
            GetProfileStatsResponse, LabelNamesRequest, LabelPair, LabelValuesRequest, Labels,
            Level, NamesResponse, PROFILE_FORMATS, Point, ProfileType, ProfileTypesRequest,
            ProfileTypesResponse, SelectMergeProfileRequest, SelectMergeSpanProfileRequest,
            SelectMergeStacktracesRequest, SelectSeriesRequest, SelectSeriesResponse, Series,
            SeriesRequest, SeriesResponse,
        },
    },
    receivers::{connect_error, decompress},
    selector::Selector,
    store::{SelectQuery, Store, StoreError, TypedSeries},
};

pub const SERVICE: &str = "querier.v1.QuerierService";
/// Flame graph nodes when the request sets no bound (Pyroscope's default).
pub const DEFAULT_MAX_NODES: i64 = 8192;
/// Largest request body read (queries are small).
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Most points one series of `SelectSeries` may have.
const MAX_POINTS: i64 = 11_000;

struct Ctx {
    store: Arc<Store>,
}

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/querier.v1.QuerierService/{method}", post(call))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(axum::middleware::from_fn(crate::receivers::linger))
        .with_state(Arc::new(Ctx { store }))
}

/// A failed call: a connect code and a message.
#[derive(Debug)]
pub struct CallError(&'static str, String);

impl CallError {
    fn invalid(m: impl Into<String>) -> Self {
        Self("invalid_argument", m.into())
    }
}

impl From<StoreError> for CallError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "Pyroscope query failed");
        Self("internal", e.to_string())
    }
}

impl From<pprof::PprofError> for CallError {
    fn from(e: pprof::PprofError) -> Self {
        Self("internal", e.to_string())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Proto,
    Json,
}

/// What a method's result becomes on the wire.
trait Reply: Send + 'static {
    fn proto(&self) -> Vec<u8>;
    fn json(&self) -> Vec<u8>;
}

impl<T: Message + Serialize + Send + 'static> Reply for T {
    fn proto(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `SelectMergeProfile` answers a `google.v1.Profile` (pprof).
struct PprofReply(Profile);

impl Reply for PprofReply {
    fn proto(&self) -> Vec<u8> {
        self.0.encode_to_vec()
    }
    fn json(&self) -> Vec<u8> {
        profile_json(&self.0).to_string().into_bytes()
    }
}

fn decode<T: Message + Default + DeserializeOwned>(
    enc: Encoding,
    body: &[u8],
) -> Result<T, CallError> {
    match enc {
        Encoding::Proto => {
            T::decode(body).map_err(|e| CallError::invalid(format!("protobuf: {e}")))
        }
        Encoding::Json if body.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        Encoding::Json => {
            serde_json::from_slice(body).map_err(|e| CallError::invalid(format!("JSON: {e}")))
        }
    }
}

async fn call(
    State(ctx): State<Arc<Ctx>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let enc = match mime.as_str() {
        "application/proto" | "application/protobuf" | "application/x-protobuf" => Encoding::Proto,
        "application/json" => Encoding::Json,
        other => {
            return connect_error(
                "invalid_argument",
                format!(
                    "Content-Type {other:?} is not supported: use application/proto or application/json (connect unary)"
                ),
            );
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        == Some("gzip");
    let body = match decompress(&body, gzip, MAX_REQUEST_BYTES) {
        Ok(b) => b,
        Err(m) => return connect_error("invalid_argument", m),
    };
    let store = ctx.store.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Box<dyn Reply>, CallError> {
        let s = &store;
        Ok(match method.as_str() {
            "ProfileTypes" => Box::new(profile_types(s, decode(enc, &body)?)?),
            "LabelNames" => Box::new(label_names(s, decode(enc, &body)?)?),
            "LabelValues" => Box::new(label_values(s, decode(enc, &body)?)?),
            "Series" => Box::new(series(s, decode(enc, &body)?)?),
            "SelectMergeStacktraces" => Box::new(select_merge_stacktraces(s, decode(enc, &body)?)?),
            "SelectMergeProfile" => Box::new(select_merge_profile(s, decode(enc, &body)?)?),
            "SelectSeries" => Box::new(select_series(s, decode(enc, &body)?)?),
            "GetProfileStats" => Box::new(profile_stats(s, decode(enc, &body)?)?),
            "SelectMergeSpanProfile" => {
                Box::new(select_merge_span_profile(s, decode(enc, &body)?)?)
            }
            "SelectHeatmap" | "Diff" | "AnalyzeQuery" => {
                return Err(CallError(
                    "unimplemented",
                    format!("{SERVICE}/{method} is not implemented by the Fathom collector"),
                ));
            }
            other => {
                return Err(CallError(
                    "unimplemented",
                    format!("{SERVICE} has no method {other:?}"),
                ));
            }
        })
    })
    .await;
    match result {
        Ok(Ok(reply)) => {
            let (ct, bytes) = match enc {
                Encoding::Proto => ("application/proto", reply.proto()),
                Encoding::Json => ("application/json", reply.json()),
            };
            (StatusCode::OK, [(header::CONTENT_TYPE, ct)], bytes).into_response()
        }
        Ok(Err(CallError(code, message))) => connect_error(code, message),
        Err(e) => connect_error("internal", e.to_string()),
    }
}

fn time(ms: i64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms as u64))
}

fn check_range(start: i64, end: i64) -> Result<(), CallError> {
    if start > 0 && end > 0 && start > end {
        return Err(CallError::invalid(format!(
            "start {start} is after end {end} (unix milliseconds)"
        )));
    }
    Ok(())
}

/// Selectors given as `matchers`: a series matches when any of them does;
/// none (or only empty ones) select everything.
fn any_of(matchers: &[String]) -> Result<Vec<Selector>, CallError> {
    let sels = matchers
        .iter()
        .map(|m| Selector::parse(m).map_err(CallError::invalid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if sels.is_empty() {
        vec![Selector::default()]
    } else {
        sels
    })
}

fn matching(
    s: &Store,
    matchers: &[String],
    start: i64,
    end: i64,
) -> Result<Vec<TypedSeries>, CallError> {
    check_range(start, end)?;
    let all = s.typed_series(&Selector::default(), start, end)?;
    let sels = any_of(matchers)?;
    Ok(all
        .into_iter()
        .filter(|t| sels.iter().any(|sel| sel.matches_pairs(&t.labels)))
        .collect())
}

pub fn profile_types(s: &Store, r: ProfileTypesRequest) -> Result<ProfileTypesResponse, CallError> {
    let mut types = BTreeSet::new();
    for t in matching(s, &[], r.start, r.end)? {
        let get = |n: &str| t.get(n).unwrap_or_default().to_string();
        types.insert(ProfileType {
            id: t.type_id.clone(),
            name: t.info.profile_name.clone(),
            sample_type: get("__type__"),
            sample_unit: get("__unit__"),
            period_type: get("__period_type__"),
            period_unit: get("__period_unit__"),
        });
    }
    Ok(ProfileTypesResponse {
        profile_types: types.into_iter().collect(),
    })
}

pub fn label_names(s: &Store, r: LabelNamesRequest) -> Result<NamesResponse, CallError> {
    let names: BTreeSet<String> = matching(s, &r.matchers, r.start, r.end)?
        .into_iter()
        .flat_map(|t| t.labels.into_iter().map(|(k, _)| k))
        .collect();
    Ok(NamesResponse {
        names: names.into_iter().collect(),
    })
}

pub fn label_values(s: &Store, r: LabelValuesRequest) -> Result<NamesResponse, CallError> {
    if r.name.is_empty() {
        return Err(CallError::invalid("name: the label name is required"));
    }
    let values: BTreeSet<String> = matching(s, &r.matchers, r.start, r.end)?
        .iter()
        .filter_map(|t| t.get(&r.name).map(str::to_string))
        .collect();
    Ok(NamesResponse {
        names: values.into_iter().collect(),
    })
}

pub fn series(s: &Store, r: SeriesRequest) -> Result<SeriesResponse, CallError> {
    let mut sets = BTreeSet::new();
    for t in matching(s, &r.matchers, r.start, r.end)? {
        let labels: Vec<LabelPair> = t
            .labels
            .into_iter()
            .filter(|(k, _)| r.label_names.is_empty() || r.label_names.contains(k))
            .map(|(name, value)| LabelPair { name, value })
            .collect();
        sets.insert(labels);
    }
    Ok(SeriesResponse {
        labels_set: sets.into_iter().map(|labels| Labels { labels }).collect(),
    })
}

/// Checks a `name:type:unit:period type:period unit` id.
fn profile_type(id: &str) -> Result<(), CallError> {
    let parts: Vec<&str> = id.split(':').collect();
    if parts.len() != 5 || parts[..3].iter().any(|p| p.is_empty()) {
        return Err(CallError::invalid(format!(
            "profile_typeID {id:?}: expected name:sample type:sample unit:period type:period unit (e.g. process_cpu:cpu:nanoseconds:cpu:nanoseconds)"
        )));
    }
    Ok(())
}

fn select(
    s: &Store,
    profile_type_id: &str,
    label_selector: &str,
    start: i64,
    end: i64,
) -> Result<Option<Profile>, CallError> {
    profile_type(profile_type_id)?;
    check_range(start, end)?;
    let selector = Selector::parse(label_selector).map_err(CallError::invalid)?;
    Ok(s.select(&SelectQuery {
        profile_type: profile_type_id.to_string(),
        selector,
        from: time(start),
        until: time(end),
    })?
    .map(|r| r.profile))
}

pub fn select_merge_stacktraces(
    s: &Store,
    r: SelectMergeStacktracesRequest,
) -> Result<crate::proto::querier::SelectMergeStacktracesResponse, CallError> {
    check_format(r.format)?;
    let profile =
        select(s, &r.profile_type_id, &r.label_selector, r.start, r.end)?.unwrap_or_default();
    Ok(flame_response(&profile, r.max_nodes))
}

fn check_format(format: i32) -> Result<(), CallError> {
    if format != FORMAT_UNSPECIFIED && format != FORMAT_FLAMEGRAPH {
        let name = usize::try_from(format)
            .ok()
            .and_then(|i| PROFILE_FORMATS.get(i))
            .copied()
            .unwrap_or("unknown");
        return Err(CallError::invalid(format!(
            "format {name} is not supported: use PROFILE_FORMAT_FLAMEGRAPH (or SelectMergeProfile for pprof)"
        )));
    }
    Ok(())
}

fn flame_response(
    profile: &Profile,
    max_nodes: Option<i64>,
) -> crate::proto::querier::SelectMergeStacktracesResponse {
    let max_nodes = max_nodes.filter(|&n| n > 0).unwrap_or(DEFAULT_MAX_NODES);
    let fg = pprof::flamegraph(profile, 0, max_nodes);
    crate::proto::querier::SelectMergeStacktracesResponse {
        flamegraph: Some(FlameGraph {
            names: fg.names,
            levels: fg
                .levels
                .into_iter()
                .map(|values| Level { values })
                .collect(),
            total: fg.total,
            max_self: fg.max_self,
        }),
    }
}

/// The samples of the selection whose `span_id` label (16 hexadecimal
/// digits, as Pyroscope's SDKs set it) is one of the span selector's, as a
/// flame graph (the response's `tree` is left empty).
pub fn select_merge_span_profile(
    s: &Store,
    r: SelectMergeSpanProfileRequest,
) -> Result<crate::proto::querier::SelectMergeStacktracesResponse, CallError> {
    check_format(r.format)?;
    if r.span_selector.is_empty() {
        return Err(CallError::invalid(
            "span_selector is empty: give the span ids (16 hexadecimal digits) whose samples to merge",
        ));
    }
    if let Some(bad) = r
        .span_selector
        .iter()
        .find(|id| id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(CallError::invalid(format!(
            "span_selector: {bad:?} is not a span id (16 hexadecimal digits)"
        )));
    }
    let mut profile =
        select(s, &r.profile_type_id, &r.label_selector, r.start, r.end)?.unwrap_or_default();
    pprof::retain_labelled(&mut profile, SPAN_ID_LABEL, &r.span_selector);
    Ok(flame_response(&profile, r.max_nodes))
}

/// The sample label that holds a span id.
pub use crate::store::SPAN_ID_LABEL;

fn select_merge_profile(s: &Store, r: SelectMergeProfileRequest) -> Result<PprofReply, CallError> {
    let profile = select(s, &r.profile_type_id, &r.label_selector, r.start, r.end)?;
    Ok(PprofReply(profile.unwrap_or_default()))
}

pub fn select_series(s: &Store, r: SelectSeriesRequest) -> Result<SelectSeriesResponse, CallError> {
    profile_type(&r.profile_type_id)?;
    check_range(r.start, r.end)?;
    if !(r.step.is_finite() && r.step > 0.0) {
        return Err(CallError::invalid(format!(
            "step {}: expected a positive number of seconds",
            r.step
        )));
    }
    let step_ms = ((r.step * 1000.0) as i64).max(1);
    if r.start > 0 && r.end > 0 && (r.end - r.start) / step_ms > MAX_POINTS {
        return Err(CallError::invalid(format!(
            "step {} s gives more than {MAX_POINTS} points over this range",
            r.step
        )));
    }
    let selector = Selector::parse(&r.label_selector).map_err(CallError::invalid)?;
    let totals = s.window_totals(&r.profile_type_id, &selector, time(r.start), time(r.end))?;
    // group labels → bucket → (sum, windows)
    let mut groups: BTreeMap<Vec<LabelPair>, BTreeMap<i64, (f64, u32)>> = BTreeMap::new();
    for w in totals {
        let key: Vec<LabelPair> = r
            .group_by
            .iter()
            .filter_map(|g| {
                w.labels
                    .iter()
                    .find(|(k, _)| k == g)
                    .map(|(k, v)| LabelPair {
                        name: k.clone(),
                        value: v.clone(),
                    })
            })
            .collect();
        let t = w.start_ms.max(r.start);
        let bucket = t - t.rem_euclid(step_ms);
        let e = groups.entry(key).or_default().entry(bucket).or_default();
        e.0 += w.total as f64;
        e.1 += 1;
    }
    let average = r.aggregation == Some(crate::proto::querier::AGGREGATION_AVERAGE);
    let mut series: Vec<(f64, Series)> = groups
        .into_iter()
        .map(|(labels, points)| {
            let points: Vec<Point> = points
                .into_iter()
                .map(|(timestamp, (sum, n))| Point {
                    value: if average {
                        sum / f64::from(n.max(1))
                    } else {
                        sum
                    },
                    timestamp,
                })
                .collect();
            let total = points.iter().map(|p| p.value).sum();
            (total, Series { labels, points })
        })
        .collect();
    if let Some(limit) = r.limit.filter(|&l| l > 0) {
        series.sort_by(|a, b| b.0.total_cmp(&a.0));
        series.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        series.sort_by(|a, b| a.1.labels.cmp(&b.1.labels));
    }
    Ok(SelectSeriesResponse {
        series: series.into_iter().map(|(_, s)| s).collect(),
    })
}

fn profile_stats(
    s: &Store,
    _: GetProfileStatsRequest,
) -> Result<GetProfileStatsResponse, CallError> {
    let all = s.series(None)?;
    Ok(GetProfileStatsResponse {
        data_ingested: !all.is_empty(),
        oldest_profile_time: all.iter().map(|i| i.first_ms as i64).min().unwrap_or(0),
        newest_profile_time: all.iter().map(|i| i.last_ms as i64).max().unwrap_or(0),
    })
}

/// protojson of a `google.v1.Profile` (64-bit integers as strings).
pub fn profile_json(p: &Profile) -> serde_json::Value {
    use serde_json::json;
    let s = |v: i64| v.to_string();
    let u = |v: u64| v.to_string();
    let vt = |v: &crate::proto::pprof::ValueType| json!({"type": s(v.r#type), "unit": s(v.unit)});
    json!({
        "sampleType": p.sample_type.iter().map(vt).collect::<Vec<_>>(),
        "sample": p.sample.iter().map(|x| json!({
            "locationId": x.location_id.iter().map(|&v| u(v)).collect::<Vec<_>>(),
            "value": x.value.iter().map(|&v| s(v)).collect::<Vec<_>>(),
            "label": x.label.iter().map(|l| json!({
                "key": s(l.key), "str": s(l.str), "num": s(l.num), "numUnit": s(l.num_unit),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "mapping": p.mapping.iter().map(|m| json!({
            "id": u(m.id), "memoryStart": u(m.memory_start), "memoryLimit": u(m.memory_limit),
            "fileOffset": u(m.file_offset), "filename": s(m.filename), "buildId": s(m.build_id),
            "hasFunctions": m.has_functions, "hasFilenames": m.has_filenames,
            "hasLineNumbers": m.has_line_numbers, "hasInlineFrames": m.has_inline_frames,
        })).collect::<Vec<_>>(),
        "location": p.location.iter().map(|l| json!({
            "id": u(l.id), "mappingId": u(l.mapping_id), "address": u(l.address),
            "line": l.line.iter().map(|x| json!({
                "functionId": u(x.function_id), "line": s(x.line),
            })).collect::<Vec<_>>(),
            "isFolded": l.is_folded,
        })).collect::<Vec<_>>(),
        "function": p.function.iter().map(|f| json!({
            "id": u(f.id), "name": s(f.name), "systemName": s(f.system_name),
            "filename": s(f.filename), "startLine": s(f.start_line),
        })).collect::<Vec<_>>(),
        "stringTable": p.string_table,
        "dropFrames": s(p.drop_frames),
        "keepFrames": s(p.keep_frames),
        "timeNanos": s(p.time_nanos),
        "durationNanos": s(p.duration_nanos),
        "periodType": p.period_type.as_ref().map(vt),
        "period": s(p.period),
        "comment": p.comment.iter().map(|&c| s(c)).collect::<Vec<_>>(),
        "defaultSampleType": s(p.default_sample_type),
    })
}
