//! The embedded store: merged profiles and spans in one redb file, bounded in
//! age (`retention`) and size (`max_bytes`, oldest data evicted first), read
//! back by the UI.
//!
//! Tables (keys sort the way the queries scan them):
//! - `profiles`: (selector, sample types, window start ns) → (window ns,
//!   inputs, gzipped pprof)
//! - `profile_time`: (window start ns, selector, sample types) → record bytes
//!   (oldest-first eviction)
//! - `series`: (selector, sample types) → labels and period type (JSON)
//! - `spans`: (trace id, span id) → one span as a prost-encoded OTLP
//!   `ResourceSpans` (its resource and scope included)
//! - `traces`: trace id → summary (JSON: start, end, root span, services, …)
//! - `trace_time`: (trace start ns, trace id) → ()
//! - `trace_services`: (service, trace start ns, trace id) → ()
//! - `operations`: (service, span name, span kind) → last start ns (kept
//!   for the retention after the last span of that name)
//! - `meta`: `"bytes"` → the logical size of everything stored
//! - `metric_series`: series id → the UI's metric series (JSON), and
//!   `metric_points`: (series id, unix ms) → one point, `metric_time`:
//!   (unix ms, series id) → () (oldest-first eviction); written and expired
//!   by `metrics_history` (retention, at most 4096 × 720 points), evicted
//!   here with the rest (the history then drops what was evicted:
//!   [`Store::metric_floor_ms`])
//!
//! Size: every record's keys and values are counted (`stored_bytes`),
//! the metric history's included. Writes
//! keep that under half of `max_bytes` (redb's B-tree pages, copy-on-write
//! and free-page reuse need the rest, measured in the tests); `maintain`
//! compacts the file when it is still larger than `max_bytes`.
//!
//! All methods are blocking: call them from `spawn_blocking` in async code.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, RwLock, RwLockReadGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{ResourceSpans, Span, span::SpanKind, status::StatusCode},
};
use prost::Message as _;
use redb::{
    Database, ReadableDatabase as _, ReadableTable, ReadableTableMetadata as _, TableDefinition,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    config::StoreConfig,
    model::{MergedProfile, NAME_LABEL, SERVICE_LABEL},
    pipeline::{Batch, EncodedSpans, span_count},
    pprof::{self, Merger, PprofError, sample_types_signature},
    proto::pprof::Profile,
    selector::Selector,
    stats::ExporterStats,
};

type ProfileKey<'a> = (&'a str, &'a str, u64);
const PROFILES: TableDefinition<ProfileKey, (u64, u64, &[u8])> = TableDefinition::new("profiles");
const PROFILE_TIME: TableDefinition<(u64, &str, &str), u64> = TableDefinition::new("profile_time");
const SERIES: TableDefinition<(&str, &str), &str> = TableDefinition::new("series");
const SPANS: TableDefinition<([u8; 16], [u8; 8]), &[u8]> = TableDefinition::new("spans");
const TRACES: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("traces");
const TRACE_TIME: TableDefinition<(u64, [u8; 16]), ()> = TableDefinition::new("trace_time");
const TRACE_SERVICES: TableDefinition<(&str, u64, [u8; 16]), ()> =
    TableDefinition::new("trace_services");
const OPERATIONS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("operations");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The UI's metric history (`metrics_history`): series id → the series
/// (name, labels, kind…), and (series id, unix ms) → one point; encoded
/// by `metrics_history`, kept for the retention by it.
const METRIC_SERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("metric_series");
const METRIC_POINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("metric_points");
/// (unix ms, series id) of every metric point: oldest-first eviction.
const METRIC_TIME: TableDefinition<(u64, u64), ()> = TableDefinition::new("metric_time");
const BYTES_KEY: &str = "bytes";
/// Set once the metric history is counted in `bytes` and indexed in
/// `metric_time` (stores written before that are counted at open).
const METRIC_COUNTED_KEY: &str = "metric_counted";

/// The service of spans whose resource has no `service.name` (OTel's default).
pub const UNKNOWN_SERVICE: &str = "unknown_service";
/// How far before `from` a profile window may start and still overlap it.
const MAX_WINDOW_LOOKBACK: Duration = Duration::from_secs(3600);
/// Per-trace bookkeeping counted on top of its spans (summary and indexes).
const TRACE_OVERHEAD: u64 = 160;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the store file {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Pprof(#[from] PprofError),
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::Db(e.into())
            }
        }
    )*};
}
db_errors!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::CompactionError
);

/// One profile series as listed by the UI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SeriesInfo {
    pub selector: String,
    pub service: String,
    pub profile_name: String,
    /// `type/unit,…` of the stored profiles.
    pub sample_types: String,
    pub labels: Vec<(String, String)>,
    /// `type/unit` of the profiles' period (empty when they have none, or
    /// the series was stored by an older version).
    pub period_type: String,
    /// Start of the first and end of the last stored window (unix ms).
    pub first_ms: u64,
    pub last_ms: u64,
}

/// A service and what is stored for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub name: String,
    pub profile_series: usize,
    /// Profile names (`__name__`) of its series.
    pub profile_names: Vec<String>,
    pub has_traces: bool,
}

/// Which profiles to merge: the series a label selector (`selector`)
/// matches, or every series of a service with a profile name; windows
/// overlapping [from, until].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileQuery {
    pub selector: Option<Selector>,
    pub service: Option<String>,
    pub profile_name: Option<String>,
    /// Restrict to series with these sample types; by default the sample
    /// types with the most windows in range.
    pub sample_types: Option<String>,
    pub from: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileResult {
    pub profile: Profile,
    pub sample_types: String,
    /// Selectors of the merged series.
    pub series: Vec<String>,
    pub windows: u64,
}

/// What is kept about a trace (also its entry in the traces list).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub trace_id: String,
    pub root_name: String,
    pub service: String,
    /// Whether the root span (no parent) has arrived; otherwise root_name is
    /// the earliest span's.
    pub root_known: bool,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub span_count: u64,
    pub error: bool,
    pub services: Vec<String>,
    /// Logical bytes of the trace's records.
    pub bytes: u64,
    #[serde(default)]
    root_start: u64,
}

impl TraceSummary {
    pub fn duration_nanos(&self) -> u64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceQuery {
    pub service: Option<String>,
    pub from: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub limit: usize,
}

/// A trace search (Jaeger's semantics): traces starting in [from, until]
/// with one span that satisfies everything given at once — of `service`,
/// named `operation`, lasting within the bounds, having every tag (as a
/// span attribute, a resource attribute or an event attribute; values
/// compared as text) and, with `errors_only`, an error status. Newest
/// first; `offset` traces skipped, `limit` returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceSearch {
    pub service: Option<String>,
    pub operation: Option<String>,
    pub tags: Vec<(String, String)>,
    pub min_duration: Option<Duration>,
    pub max_duration: Option<Duration>,
    pub errors_only: bool,
    pub from: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub limit: usize,
    pub offset: usize,
    /// Order of the results (newest first by default).
    pub sort: TraceSort,
}

/// How search results are ordered. Any order but `Newest` reads every
/// match (up to [`MAX_SEARCH_SCAN`] traces) before paging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TraceSort {
    #[default]
    Newest,
    Oldest,
    Longest,
    Shortest,
    MostSpans,
}

impl TraceSort {
    pub const NAMES: &[&str] = &["newest", "oldest", "longest", "shortest", "most_spans"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "newest" => Self::Newest,
            "oldest" => Self::Oldest,
            "longest" => Self::Longest,
            "shortest" => Self::Shortest,
            "most_spans" => Self::MostSpans,
            _ => return None,
        })
    }
}

impl TraceSearch {
    /// Whether only the time and service indexes are needed (no span has to
    /// be read to decide).
    fn index_only(&self) -> bool {
        self.operation.is_none()
            && self.tags.is_empty()
            && self.min_duration.is_none()
            && self.max_duration.is_none()
            && !self.errors_only
    }

    fn span_matches(&self, rs: &ResourceSpans, service: &str, span: &Span) -> bool {
        if self.service.as_deref().is_some_and(|s| s != service) {
            return false;
        }
        if self.operation.as_deref().is_some_and(|o| o != span.name) {
            return false;
        }
        let d = Duration::from_nanos(
            span.end_time_unix_nano
                .saturating_sub(span.start_time_unix_nano),
        );
        if self.min_duration.is_some_and(|m| d < m) || self.max_duration.is_some_and(|m| d > m) {
            return false;
        }
        if self.errors_only && !is_error(span) {
            return false;
        }
        let resource = rs.resource.as_ref().map(|r| r.attributes.as_slice());
        self.tags.iter().all(|(k, v)| {
            let has = |kvs: &[KeyValue]| {
                kvs.iter().any(|kv| {
                    kv.key == *k && kv.value.as_ref().map(any_value_string).as_deref() == Some(v)
                })
            };
            has(&span.attributes)
                || resource.is_some_and(has)
                || span.events.iter().any(|e| has(&e.attributes))
                || (k == "span.kind" && kind_name(span.kind) == v)
                || (k == "error" && v == "true" && is_error(span))
        })
    }
}

/// What a search found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceSearchResult {
    pub traces: Vec<TraceSummary>,
    /// Traces that match in all (beyond the page).
    pub total: u64,
    /// False when counting stopped at [`MAX_SEARCH_SCAN`] traces read
    /// (`total` is then a lower bound).
    pub total_exact: bool,
}

/// Most traces whose spans a search reads to count matches past its page.
pub const MAX_SEARCH_SCAN: usize = 20_000;

/// Most traces a dependency query reads (the newest of its range).
pub const MAX_DEPENDENCY_TRACES: usize = 100_000;

/// A stored trace as received: its summary and every span record (one
/// span per `ResourceSpans`, with its resource and scope).
#[derive(Clone, Debug, PartialEq)]
pub struct RawTrace {
    pub summary: TraceSummary,
    pub spans: Vec<ResourceSpans>,
}

/// The span attribute that names a span's profile (Pyroscope's convention:
/// the span id whose `span_id`-labelled samples are its profile).
pub const PROFILE_ID_ATTRIBUTE: &str = "pyroscope.profile.id";

/// 16 hexadecimal digits (a span id as sample labels carry it).
pub fn is_span_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl RawTrace {
    /// The ids (lowercase hexadecimal) whose samples belong to this trace:
    /// every span's id and every `pyroscope.profile.id` attribute's value
    /// that is a span id.
    pub fn profile_span_ids(&self) -> std::collections::HashSet<String> {
        let mut ids = std::collections::HashSet::new();
        for span in self
            .spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
        {
            if span.span_id.len() == 8 {
                ids.insert(hex(&span.span_id));
            }
            for kv in span
                .attributes
                .iter()
                .filter(|kv| kv.key == PROFILE_ID_ATTRIBUTE)
            {
                let v = kv.value.as_ref().map(any_value_string).unwrap_or_default();
                if is_span_id(&v) {
                    ids.insert(v.to_ascii_lowercase());
                }
            }
        }
        ids
    }
}

/// A span name of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Operation {
    pub name: String,
    /// `server`, `client`, `internal`, `producer`, `consumer` or `unspecified`.
    pub kind: String,
}

/// One profile series seen per sample type, the way Pyroscope models it:
/// its labels plus the virtual `__profile_type__`, `__type__`, `__unit__`,
/// `__period_type__` and `__period_unit__`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedSeries {
    pub info: SeriesInfo,
    /// Index of the sample type in the stored profiles.
    pub index: usize,
    /// `name:type:unit:period type:period unit`.
    pub type_id: String,
    /// Sorted by name; the virtual labels included.
    pub labels: Vec<(String, String)>,
}

impl TypedSeries {
    pub fn from_info(info: &SeriesInfo) -> Vec<TypedSeries> {
        let (pt, pu) = info.period_type.split_once('/').unwrap_or(("", ""));
        info.sample_types
            .split(',')
            .enumerate()
            .map(|(index, st)| {
                let (t, u) = st.split_once('/').unwrap_or((st, ""));
                let type_id = format!("{}:{t}:{u}:{pt}:{pu}", info.profile_name);
                let mut labels = info.labels.clone();
                labels.extend([
                    ("__profile_type__".to_string(), type_id.clone()),
                    ("__type__".to_string(), t.to_string()),
                    ("__unit__".to_string(), u.to_string()),
                    ("__period_type__".to_string(), pt.to_string()),
                    ("__period_unit__".to_string(), pu.to_string()),
                ]);
                labels.sort();
                TypedSeries {
                    info: info.clone(),
                    index,
                    type_id,
                    labels,
                }
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the series has windows overlapping [from, until] (unix ms; 0:
    /// unbounded).
    pub fn overlaps(&self, from_ms: i64, until_ms: i64) -> bool {
        (until_ms <= 0 || self.info.first_ms as i64 <= until_ms)
            && (from_ms <= 0 || self.info.last_ms as i64 >= from_ms)
    }
}

/// What `Store::select` merges: series of one profile type that a selector
/// matches, windows overlapping [from, until].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelectQuery {
    pub profile_type: String,
    pub selector: Selector,
    pub from: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

/// One window's total of one sample type, for time series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowTotal {
    pub labels: Vec<(String, String)>,
    pub start_ms: i64,
    pub total: i64,
}

/// The profile samples of some spans, of one profile type (see
/// [`Store::span_profile_totals`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpanProfileTotals {
    /// `name:type:unit:period type:period unit`.
    pub type_id: String,
    pub name: String,
    pub sample_type: String,
    pub unit: String,
    pub total: i64,
    /// Span id (lowercase hexadecimal) → total of its samples.
    pub spans: BTreeMap<String, i64>,
}

/// The pprof sample label that holds the id of the span a sample was taken
/// in (16 hexadecimal digits; Pyroscope's SDKs and the agent set it).
pub const SPAN_ID_LABEL: &str = "span_id";
/// The pprof sample label that holds the trace id (32 hexadecimal digits).
pub const TRACE_ID_LABEL: &str = "trace_id";

/// One span as the UI shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SpanView {
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: &'static str,
    pub service: String,
    pub scope: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// From the trace's start.
    pub offset_ms: f64,
    pub duration_ms: f64,
    pub status: &'static str,
    pub status_message: String,
    pub attributes: Vec<(String, String)>,
    pub resource: Vec<(String, String)>,
    /// The span's events with their attributes, by time.
    pub events: Vec<EventView>,
}

/// One span event as the UI shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventView {
    /// From the span's start.
    pub offset_ms: f64,
    pub name: String,
    pub attributes: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TraceDetail {
    pub summary: TraceSummary,
    /// By start time.
    pub spans: Vec<SpanView>,
}

/// What a span write did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanPut {
    pub stored: u64,
    /// Spans without a valid trace id (16 bytes, not zero) or span id (8 bytes).
    pub invalid: u64,
}

/// What `maintain` (or a write over the size bound) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub profiles_deleted: u64,
    pub traces_deleted: u64,
    pub metric_points_deleted: u64,
    /// The time (unix ms) of the newest metric points evicted: every point
    /// at or before it is gone.
    pub metric_floor_ms: Option<u64>,
    pub compacted: bool,
}

/// A change of the metric history (`Store::put_metric_history`); the bytes
/// are `metrics_history`'s encoding.
#[derive(Debug, Default)]
pub struct MetricHistoryWrite {
    pub series: Vec<(u64, Vec<u8>)>,
    pub points: Vec<(u64, u64, Vec<u8>)>,
    pub deleted_points: Vec<(u64, u64)>,
    pub deleted_series: Vec<u64>,
}

impl MetricHistoryWrite {
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
            && self.points.is_empty()
            && self.deleted_points.is_empty()
            && self.deleted_series.is_empty()
    }
}

/// The stored metric history (`Store::metric_history`).
#[derive(Debug, Default)]
pub struct MetricHistoryRead {
    pub series: Vec<(u64, Vec<u8>)>,
    pub points: Vec<(u64, u64, Vec<u8>)>,
}

pub struct Store {
    db: RwLock<Database>,
    path: PathBuf,
    retention: Duration,
    max_bytes: u64,
    /// See [`Store::metric_floor_ms`].
    metric_floor: AtomicU64,
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses a 32-hex-digit trace id.
pub fn parse_trace_id(s: &str) -> Option<[u8; 16]> {
    let s = s.trim();
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn profile_record_bytes(selector: &str, sig: &str, value_len: usize) -> u64 {
    (2 * (selector.len() + sig.len() + 8) + value_len + 24) as u64
}

fn span_record_bytes(value_len: usize) -> u64 {
    value_len as u64 + 24
}

/// A metric point: its key, value and `metric_time` key.
fn metric_point_bytes(value_len: usize) -> u64 {
    value_len as u64 + 32
}

/// A metric series record: its key and value.
fn metric_series_bytes(value_len: usize) -> u64 {
    value_len as u64 + 8
}

pub fn any_value_string(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(any_value::Value::ArrayValue(a)) => format!(
            "[{}]",
            a.values
                .iter()
                .map(any_value_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(any_value::Value::KvlistValue(kv)) => format!(
            "{{{}}}",
            kv.values
                .iter()
                .map(|kv| format!(
                    "{}: {}",
                    kv.key,
                    kv.value.as_ref().map(any_value_string).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        // A string-table index (profiles signal only): no table here.
        Some(any_value::Value::StringValueStrindex(i)) => format!("#{i}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(any_value_string).unwrap_or_default(),
            )
        })
        .collect()
}

fn service_of(rs: &ResourceSpans) -> String {
    rs.resource
        .as_ref()
        .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
        .and_then(|kv| kv.value.as_ref())
        .map(any_value_string)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| UNKNOWN_SERVICE.to_string())
}

fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        _ => "unspecified",
    }
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

fn ids(span: &Span) -> Option<([u8; 16], [u8; 8])> {
    let t: [u8; 16] = span.trace_id.as_slice().try_into().ok()?;
    let s: [u8; 8] = span.span_id.as_slice().try_into().ok()?;
    (t != [0; 16] && s != [0; 8]).then_some((t, s))
}

fn decode_summary(bytes: &[u8]) -> Result<TraceSummary, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("trace summary: {e}")))
}

fn encode_summary(s: &TraceSummary) -> Vec<u8> {
    // Serializing a plain struct of strings and numbers cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

/// All tables, open in one write transaction.
struct Tables<'t> {
    profiles: redb::Table<'t, ProfileKey<'static>, (u64, u64, &'static [u8])>,
    profile_time: redb::Table<'t, (u64, &'static str, &'static str), u64>,
    series: redb::Table<'t, (&'static str, &'static str), &'static str>,
    spans: redb::Table<'t, ([u8; 16], [u8; 8]), &'static [u8]>,
    traces: redb::Table<'t, [u8; 16], &'static [u8]>,
    trace_time: redb::Table<'t, (u64, [u8; 16]), ()>,
    trace_services: redb::Table<'t, (&'static str, u64, [u8; 16]), ()>,
    operations: redb::Table<'t, (&'static str, &'static str, &'static str), u64>,
    meta: redb::Table<'t, &'static str, u64>,
    metric_series: redb::Table<'t, u64, &'static [u8]>,
    metric_points: redb::Table<'t, (u64, u64), &'static [u8]>,
    metric_time: redb::Table<'t, (u64, u64), ()>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
            profiles: txn.open_table(PROFILES)?,
            profile_time: txn.open_table(PROFILE_TIME)?,
            series: txn.open_table(SERIES)?,
            spans: txn.open_table(SPANS)?,
            traces: txn.open_table(TRACES)?,
            trace_time: txn.open_table(TRACE_TIME)?,
            trace_services: txn.open_table(TRACE_SERVICES)?,
            operations: txn.open_table(OPERATIONS)?,
            meta: txn.open_table(META)?,
            metric_series: txn.open_table(METRIC_SERIES)?,
            metric_points: txn.open_table(METRIC_POINTS)?,
            metric_time: txn.open_table(METRIC_TIME)?,
        })
    }

    /// Counts the metric history in `bytes` and indexes it in
    /// `metric_time`, once (stores written before it was counted).
    fn count_metric_history(&mut self) -> Result<(), StoreError> {
        if self.meta.get(METRIC_COUNTED_KEY)?.is_some() {
            return Ok(());
        }
        let mut add = 0;
        for row in self.metric_series.iter()? {
            add += metric_series_bytes(row?.1.value().len());
        }
        let mut points = Vec::new();
        for row in self.metric_points.iter()? {
            let (k, v) = row?;
            points.push(k.value());
            add += metric_point_bytes(v.value().len());
        }
        for (id, t) in points {
            self.metric_time.insert((t, id), ())?;
        }
        let total = self.bytes()? + add;
        self.set_bytes(total)?;
        self.meta.insert(METRIC_COUNTED_KEY, 1)?;
        Ok(())
    }

    /// Applies one change of the metric history; returns the bytes added
    /// and removed.
    fn put_metric_history(&mut self, w: &MetricHistoryWrite) -> Result<(u64, u64), StoreError> {
        let (mut added, mut removed) = (0, 0);
        for (id, bytes) in &w.series {
            added += metric_series_bytes(bytes.len());
            if let Some(old) = self.metric_series.insert(*id, bytes.as_slice())? {
                removed += metric_series_bytes(old.value().len());
            }
        }
        for (id, t, bytes) in &w.points {
            added += metric_point_bytes(bytes.len());
            if let Some(old) = self.metric_points.insert((*id, *t), bytes.as_slice())? {
                removed += metric_point_bytes(old.value().len());
            }
            self.metric_time.insert((*t, *id), ())?;
        }
        for (id, t) in &w.deleted_points {
            removed += self.delete_metric_point(*id, *t)?;
        }
        for id in &w.deleted_series {
            if let Some(old) = self.metric_series.remove(*id)? {
                removed += metric_series_bytes(old.value().len());
            }
            let mut times = Vec::new();
            for row in self.metric_points.range((*id, 0)..=(*id, u64::MAX))? {
                times.push(row?.0.value().1);
            }
            for t in times {
                removed += self.delete_metric_point(*id, t)?;
            }
        }
        Ok((added, removed))
    }

    /// Deletes one metric point; returns its bytes (0 when it was not there).
    fn delete_metric_point(&mut self, id: u64, t: u64) -> Result<u64, StoreError> {
        self.metric_time.remove((t, id))?;
        Ok(self
            .metric_points
            .remove((id, t))?
            .map_or(0, |old| metric_point_bytes(old.value().len())))
    }

    fn oldest_metric(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.metric_time.first()?.map(|(k, _)| k.value().0))
    }

    /// Deletes every metric point of time `t` (unix ms); returns their
    /// count and bytes.
    fn delete_metric_points_at(&mut self, t: u64) -> Result<(u64, u64), StoreError> {
        let mut ids = Vec::new();
        for row in self.metric_time.range((t, 0)..=(t, u64::MAX))? {
            ids.push(row?.0.value().1);
        }
        let mut freed = 0;
        for &id in &ids {
            freed += self.delete_metric_point(id, t)?;
        }
        Ok((ids.len() as u64, freed))
    }

    fn bytes(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get(BYTES_KEY)?.map_or(0, |g| g.value()))
    }

    fn set_bytes(&mut self, b: u64) -> Result<(), StoreError> {
        self.meta.insert(BYTES_KEY, b)?;
        Ok(())
    }

    fn oldest_profile(&self) -> Result<Option<(u64, String, String, u64)>, StoreError> {
        Ok(self.profile_time.first()?.map(|(k, v)| {
            let (start, sel, sig) = k.value();
            (start, sel.to_string(), sig.to_string(), v.value())
        }))
    }

    fn oldest_trace(&self) -> Result<Option<(u64, [u8; 16])>, StoreError> {
        Ok(self.trace_time.first()?.map(|(k, _)| k.value()))
    }

    /// Deletes one profile window; returns its bytes.
    fn delete_profile(&mut self, start: u64, sel: &str, sig: &str) -> Result<u64, StoreError> {
        let size = self
            .profile_time
            .remove((start, sel, sig))?
            .map_or(0, |g| g.value());
        self.profiles.remove((sel, sig, start))?;
        let left = self
            .profiles
            .range((sel, sig, 0)..=(sel, sig, u64::MAX))?
            .next()
            .is_some();
        if !left {
            self.series.remove((sel, sig))?;
        }
        Ok(size)
    }

    /// Deletes a trace and its spans; returns its bytes.
    fn delete_trace(&mut self, tid: [u8; 16]) -> Result<u64, StoreError> {
        let Some(summary) = self.traces.remove(tid)?.map(|g| g.value().to_vec()) else {
            return Ok(0);
        };
        let summary = decode_summary(&summary)?;
        self.trace_time.remove((summary.start_unix_nano, tid))?;
        for svc in &summary.services {
            self.trace_services
                .remove((svc.as_str(), summary.start_unix_nano, tid))?;
        }
        self.spans
            .retain_in((tid, [0u8; 8])..=(tid, [0xffu8; 8]), |_, _| false)?;
        Ok(summary.bytes)
    }

    /// Deletes the oldest data (profile windows, whole traces and the metric
    /// points of one time, by start time) while it starts before `cutoff` or
    /// the total exceeds `target`.
    fn evict(
        &mut self,
        cutoff: Option<u64>,
        target: Option<u64>,
        done: &mut Maintenance,
    ) -> Result<(), StoreError> {
        let mut total = self.bytes()?;
        loop {
            let over = target.is_some_and(|t| total > t);
            let p = self.oldest_profile()?;
            let t = self.oldest_trace()?;
            let m = self.oldest_metric()?;
            let p_start = p.as_ref().map_or(u64::MAX, |p| p.0);
            let t_start = t.map_or(u64::MAX, |t| t.0);
            let m_start = m.map_or(u64::MAX, |ms| ms.saturating_mul(1_000_000));
            let oldest = p_start.min(t_start).min(m_start);
            if oldest == u64::MAX {
                // Nothing left but metric series records (their points gone).
                total = 0;
                for row in self.metric_series.iter()? {
                    total += metric_series_bytes(row?.1.value().len());
                }
                break;
            }
            if !(over || cutoff.is_some_and(|c| oldest < c)) {
                break;
            }
            let freed = match (p, t, m) {
                (Some((start, sel, sig, _)), _, _) if start == oldest => {
                    done.profiles_deleted += 1;
                    self.delete_profile(start, &sel, &sig)?
                }
                (_, Some((start, tid)), _) if start == oldest => {
                    done.traces_deleted += 1;
                    self.delete_trace(tid)?
                }
                (_, _, Some(ms)) => {
                    let (n, freed) = self.delete_metric_points_at(ms)?;
                    done.metric_points_deleted += n;
                    done.metric_floor_ms = Some(done.metric_floor_ms.map_or(ms, |f| f.max(ms)));
                    freed
                }
                _ => break,
            };
            total = total.saturating_sub(freed);
        }
        self.set_bytes(total)
    }
}

/// A `series` record: labels and period type (older records: labels only).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredSeries {
    V2 {
        labels: Vec<(String, String)>,
        period: String,
    },
    V1(Vec<(String, String)>),
}

impl StoredSeries {
    fn into_parts(self) -> (Vec<(String, String)>, String) {
        match self {
            Self::V2 { labels, period } => (labels, period),
            Self::V1(labels) => (labels, String::new()),
        }
    }
}

impl Store {
    /// Opens (or creates) the store file, creating its directory.
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let db = Database::builder()
            .set_cache_size(config.cache_bytes)
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let txn = db.begin_write()?;
        Tables::open(&txn)?.count_metric_history()?;
        txn.commit()?;
        Ok(Self {
            db: RwLock::new(db),
            path,
            retention: config.retention,
            max_bytes: config.max_bytes,
            metric_floor: AtomicU64::new(0),
        })
    }

    fn db(&self) -> RwLockReadGuard<'_, Database> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long data is kept.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The logical bound writes keep: half of `max_bytes` (see the module doc).
    fn logical_limit(&self) -> u64 {
        self.max_bytes / 2
    }

    /// Logical bytes of everything stored (keys and values).
    pub fn stored_bytes(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        Ok(txn
            .open_table(META)?
            .get(BYTES_KEY)?
            .map_or(0, |g| g.value()))
    }

    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// After a write: evict the oldest data down to 90% of the logical limit
    /// when over it. Call [`Store::evicted`] with what it did once committed.
    fn bound(&self, tables: &mut Tables<'_>) -> Result<Maintenance, StoreError> {
        let limit = self.logical_limit();
        let mut done = Maintenance::default();
        if tables.bytes()? > limit {
            tables.evict(None, Some(limit / 10 * 9), &mut done)?;
            tracing::debug!(?done, "store over its size bound: oldest data evicted");
        }
        Ok(done)
    }

    /// Notes what a committed eviction did (the metric floor).
    fn evicted(&self, done: &Maintenance) {
        if let Some(ms) = done.metric_floor_ms {
            self.metric_floor.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// The time (unix ms) up to which metric points were evicted (0: none):
    /// the metric history in memory drops its points at or before it.
    pub fn metric_floor_ms(&self) -> u64 {
        self.metric_floor.load(Ordering::Relaxed)
    }

    /// Stores merged profiles, each keyed by (series, sample types, window
    /// start); a window stored twice is merged with what is there.
    pub fn put_profiles(&self, batch: &[MergedProfile]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let db = self.db();
        let txn = db.begin_write()?;
        let done;
        {
            let mut t = Tables::open(&txn)?;
            let mut total = t.bytes()?;
            for mp in batch {
                let sel = mp.labels.selector();
                let sig = sample_types_signature(&mp.profile);
                let start = nanos(mp.window_start);
                let window = u64::try_from(mp.window.as_nanos()).unwrap_or(u64::MAX);
                let existing = t
                    .profiles
                    .get((sel.as_str(), sig.as_str(), start))?
                    .map(|g| {
                        let (w, inputs, bytes) = g.value();
                        (w, inputs, bytes.to_vec())
                    });
                let (value, inputs, window) = match existing {
                    Some((w, inputs, old)) => {
                        total = total.saturating_sub(profile_record_bytes(&sel, &sig, old.len()));
                        let old = pprof::decode(&old)?;
                        let merged = pprof::merge([&old, &mp.profile])?
                            .ok_or_else(|| StoreError::Corrupt("empty merge".into()))?;
                        (
                            pprof::encode_gzip(&merged),
                            inputs.saturating_add(mp.inputs),
                            w.max(window),
                        )
                    }
                    None => (pprof::encode_gzip(&mp.profile), mp.inputs, window),
                };
                let size = profile_record_bytes(&sel, &sig, value.len());
                t.profiles.insert(
                    (sel.as_str(), sig.as_str(), start),
                    (window, inputs, value.as_slice()),
                )?;
                t.profile_time
                    .insert((start, sel.as_str(), sig.as_str()), size)?;
                if t.series.get((sel.as_str(), sig.as_str()))?.is_none() {
                    let period = mp
                        .profile
                        .period_type
                        .map(|vt| {
                            let s = |i: i64| {
                                usize::try_from(i)
                                    .ok()
                                    .and_then(|i| mp.profile.string_table.get(i))
                                    .map_or("", String::as_str)
                            };
                            format!("{}/{}", s(vt.r#type), s(vt.unit))
                        })
                        .unwrap_or_default();
                    let labels = serde_json::to_string(&StoredSeries::V2 {
                        labels: mp.labels.pairs().to_vec(),
                        period,
                    })
                    .unwrap_or_default();
                    t.series
                        .insert((sel.as_str(), sig.as_str()), labels.as_str())?;
                }
                total += size;
            }
            t.set_bytes(total)?;
            done = self.bound(&mut t)?;
        }
        txn.commit()?;
        self.evicted(&done);
        Ok(())
    }

    /// Stores every span with its resource and scope, indexed by trace,
    /// service and start time. A span stored again (same ids) replaces the
    /// earlier copy.
    pub fn put_spans(&self, req: &ExportTraceServiceRequest) -> Result<SpanPut, StoreError> {
        self.put_spans_all(&[req])
    }

    /// Several span requests in one write transaction (one fsync).
    pub fn put_spans_all(
        &self,
        reqs: &[&ExportTraceServiceRequest],
    ) -> Result<SpanPut, StoreError> {
        let mut put = SpanPut::default();
        if reqs.iter().all(|r| span_count(r) == 0) {
            return Ok(put);
        }
        let db = self.db();
        let txn = db.begin_write()?;
        let done;
        {
            let mut t = Tables::open(&txn)?;
            let mut total = t.bytes()?;
            // Summaries touched in this batch: (as stored before, now).
            let mut touched: HashMap<[u8; 16], (Option<TraceSummary>, TraceSummary)> =
                HashMap::new();
            for rs in reqs.iter().flat_map(|r| &r.resource_spans) {
                let service = service_of(rs);
                // Encoded once per resource and scope, not once per span.
                let resource = rs.resource.as_ref().map(|r| r.encode_to_vec());
                for ss in &rs.scope_spans {
                    let scope = ss.scope.as_ref().map(|s| s.encode_to_vec());
                    for span in &ss.spans {
                        let Some((tid, sid)) = ids(span) else {
                            put.invalid += 1;
                            continue;
                        };
                        let record = span_record(
                            resource.as_deref(),
                            &rs.schema_url,
                            scope.as_deref(),
                            &ss.schema_url,
                            span,
                        );
                        let old_len = t
                            .spans
                            .insert((tid, sid), record.as_slice())?
                            .map(|g| g.value().len());
                        let entry = match touched.entry(tid) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                let before = match t.traces.get(tid)? {
                                    Some(g) => Some(decode_summary(g.value())?),
                                    None => None,
                                };
                                let now = before.clone().unwrap_or_else(|| TraceSummary {
                                    trace_id: hex(&tid),
                                    root_name: String::new(),
                                    service: String::new(),
                                    root_known: false,
                                    start_unix_nano: u64::MAX,
                                    end_unix_nano: 0,
                                    span_count: 0,
                                    error: false,
                                    services: Vec::new(),
                                    bytes: TRACE_OVERHEAD,
                                    root_start: u64::MAX,
                                });
                                if before.is_none() {
                                    total += TRACE_OVERHEAD;
                                }
                                e.insert((before, now))
                            }
                        };
                        let s = &mut entry.1;
                        let size = span_record_bytes(record.len());
                        match old_len {
                            Some(old) => {
                                let old = span_record_bytes(old);
                                s.bytes = s.bytes.saturating_sub(old);
                                total = total.saturating_sub(old);
                            }
                            None => s.span_count += 1,
                        }
                        s.bytes += size;
                        total += size;
                        s.start_unix_nano = s.start_unix_nano.min(span.start_time_unix_nano);
                        s.end_unix_nano = s
                            .end_unix_nano
                            .max(span.end_time_unix_nano.max(span.start_time_unix_nano));
                        s.error |= is_error(span);
                        let op = (service.as_str(), span.name.as_str(), kind_name(span.kind));
                        let seen = t.operations.get(op)?.map_or(0, |g| g.value());
                        if span.start_time_unix_nano > seen {
                            t.operations.insert(op, span.start_time_unix_nano)?;
                        }
                        if !s.services.contains(&service) {
                            s.services.push(service.clone());
                        }
                        let is_root = span.parent_span_id.is_empty();
                        if is_root || (!s.root_known && span.start_time_unix_nano < s.root_start) {
                            s.root_known |= is_root;
                            s.root_name = span.name.clone();
                            s.service = service.clone();
                            s.root_start = span.start_time_unix_nano;
                        }
                        put.stored += 1;
                    }
                }
            }
            for (tid, (before, now)) in touched {
                if let Some(b) = &before {
                    t.trace_time.remove((b.start_unix_nano, tid))?;
                    for svc in &b.services {
                        t.trace_services
                            .remove((svc.as_str(), b.start_unix_nano, tid))?;
                    }
                }
                t.trace_time.insert((now.start_unix_nano, tid), ())?;
                for svc in &now.services {
                    t.trace_services
                        .insert((svc.as_str(), now.start_unix_nano, tid), ())?;
                }
                t.traces.insert(tid, encode_summary(&now).as_slice())?;
            }
            t.set_bytes(total)?;
            done = self.bound(&mut t)?;
        }
        txn.commit()?;
        self.evicted(&done);
        Ok(put)
    }

    /// Applies retention (data starting before `now - retention` goes) and
    /// the size bound; compacts the file when it is larger than `max_bytes`.
    pub fn maintain(&self, now: SystemTime) -> Result<Maintenance, StoreError> {
        let mut done = Maintenance::default();
        {
            let db = self.db();
            let txn = db.begin_write()?;
            {
                let mut t = Tables::open(&txn)?;
                let cutoff = nanos(now.checked_sub(self.retention).unwrap_or(UNIX_EPOCH));
                let limit = self.logical_limit();
                t.evict(Some(cutoff), Some(limit), &mut done)?;
                t.operations.retain(|_, last| last >= cutoff)?;
            }
            txn.commit()?;
            self.evicted(&done);
        }
        if self.file_bytes() > self.max_bytes {
            let mut db = self
                .db
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            done.compacted = db.compact()?;
            tracing::info!(
                file_bytes = self.file_bytes(),
                max_bytes = self.max_bytes,
                "store file compacted"
            );
        }
        Ok(done)
    }

    /// Writes one change of the metric history in one transaction: series
    /// (re)written, points added, points and whole series deleted; counted
    /// in the size bound like the rest.
    pub fn put_metric_history(&self, w: &MetricHistoryWrite) -> Result<(), StoreError> {
        if w.is_empty() {
            return Ok(());
        }
        let db = self.db();
        let txn = db.begin_write()?;
        let done;
        {
            let mut t = Tables::open(&txn)?;
            let (added, removed) = t.put_metric_history(w)?;
            let total = (t.bytes()? + added).saturating_sub(removed);
            t.set_bytes(total)?;
            done = self.bound(&mut t)?;
        }
        txn.commit()?;
        self.evicted(&done);
        Ok(())
    }

    /// The whole metric history as stored: series, then points by series
    /// and time.
    pub fn metric_history(&self) -> Result<MetricHistoryRead, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let mut out = MetricHistoryRead::default();
        for row in txn.open_table(METRIC_SERIES)?.iter()? {
            let (k, v) = row?;
            out.series.push((k.value(), v.value().to_vec()));
        }
        for row in txn.open_table(METRIC_POINTS)?.iter()? {
            let (k, v) = row?;
            let (id, t) = k.value();
            out.points.push((id, t, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Every profile series, by selector; only those of `service` if given.
    pub fn series(&self, service: Option<&str>) -> Result<Vec<SeriesInfo>, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let series = txn.open_table(SERIES)?;
        let profiles = txn.open_table(PROFILES)?;
        let mut out = Vec::new();
        for row in series.iter()? {
            let (k, v) = row?;
            let (sel, sig) = k.value();
            let stored: StoredSeries = serde_json::from_str(v.value())
                .map_err(|e| StoreError::Corrupt(format!("series labels: {e}")))?;
            let (labels, period_type) = stored.into_parts();
            let get = |n: &str| {
                labels
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let svc = get(SERVICE_LABEL);
            if service.is_some_and(|s| s != svc) {
                continue;
            }
            let mut range = profiles.range((sel, sig, 0)..=(sel, sig, u64::MAX))?;
            // (start, end) of the first window, and the end of the last.
            let first = range
                .next()
                .transpose()?
                .map(|(k, v)| (k.value().2, k.value().2.saturating_add(v.value().0)));
            let last = range
                .next_back()
                .transpose()?
                .map(|(k, v)| k.value().2.saturating_add(v.value().0))
                .or(first.map(|f| f.1));
            let first = first.map(|f| f.0);
            out.push(SeriesInfo {
                selector: sel.to_string(),
                service: svc,
                profile_name: get(NAME_LABEL),
                sample_types: sig.to_string(),
                first_ms: first.unwrap_or(0) / 1_000_000,
                last_ms: last.unwrap_or(0) / 1_000_000,
                labels,
                period_type,
            });
        }
        Ok(out)
    }

    /// Services with profiles or traces, by name.
    pub fn services(&self) -> Result<Vec<ServiceInfo>, StoreError> {
        let mut by_name: BTreeMap<String, ServiceInfo> = BTreeMap::new();
        for s in self.series(None)? {
            let e = by_name
                .entry(s.service.clone())
                .or_insert_with(|| ServiceInfo {
                    name: s.service.clone(),
                    profile_series: 0,
                    profile_names: Vec::new(),
                    has_traces: false,
                });
            e.profile_series += 1;
            if !e.profile_names.contains(&s.profile_name) {
                e.profile_names.push(s.profile_name);
            }
        }
        let db = self.db();
        let txn = db.begin_read()?;
        let idx = txn.open_table(TRACE_SERVICES)?;
        // Skip-scan: one lookup per distinct service.
        let mut next = idx.first()?.map(|(k, _)| k.value().0.to_string());
        while let Some(svc) = next {
            next = idx
                .range((
                    std::ops::Bound::Excluded((svc.as_str(), u64::MAX, [0xffu8; 16])),
                    std::ops::Bound::Unbounded,
                ))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().0.to_string());
            by_name
                .entry(svc.clone())
                .or_insert_with(|| ServiceInfo {
                    name: svc.clone(),
                    profile_series: 0,
                    profile_names: Vec::new(),
                    has_traces: false,
                })
                .has_traces = true;
        }
        Ok(by_name.into_values().collect())
    }

    /// Merges the stored windows that `q` selects; `None` when none match.
    pub fn profile(&self, q: &ProfileQuery) -> Result<Option<ProfileResult>, StoreError> {
        let from = q.from.map_or(0, nanos);
        let until = q.until.map_or(u64::MAX, nanos);
        let lookback = u64::try_from(MAX_WINDOW_LOOKBACK.as_nanos()).unwrap_or(0);
        let candidates: Vec<SeriesInfo> = self
            .series(q.service.as_deref())?
            .into_iter()
            .filter(|s| {
                q.selector
                    .as_ref()
                    .is_none_or(|sel| sel.matches_pairs(&s.labels))
            })
            .filter(|s| q.profile_name.as_ref().is_none_or(|n| *n == s.profile_name))
            .filter(|s| q.sample_types.as_ref().is_none_or(|t| *t == s.sample_types))
            .collect();
        let db = self.db();
        let txn = db.begin_read()?;
        let profiles = txn.open_table(PROFILES)?;
        // The windows in range per sample-types signature.
        let mut by_sig: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
        for s in &candidates {
            let sel = s.selector.as_str();
            let sig = s.sample_types.as_str();
            for row in
                profiles.range((sel, sig, from.saturating_sub(lookback))..=(sel, sig, until))?
            {
                let (k, v) = row?;
                let start = k.value().2;
                let window = v.value().0;
                if start.saturating_add(window.max(1)) > from && start <= until {
                    by_sig.entry(sig).or_default().push((sel, start));
                }
            }
        }
        // Most windows first; on a tie the first signature by name.
        let Some((sig, windows)) = by_sig
            .into_iter()
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
        else {
            return Ok(None);
        };
        let mut merger = Merger::new();
        let mut series: Vec<String> = Vec::new();
        for (sel, start) in &windows {
            let Some(v) = profiles.get((*sel, sig, *start))? else {
                continue;
            };
            let p = pprof::decode(v.value().2)
                .map_err(|e| StoreError::Corrupt(format!("profile {sel} at {start}: {e}")))?;
            merger.add(&p)?;
            if !series.iter().any(|s| s == sel) {
                series.push(sel.to_string());
            }
        }
        let n = merger.inputs();
        Ok(merger.finish().map(|profile| ProfileResult {
            profile,
            sample_types: sig.to_string(),
            series,
            windows: n,
        }))
    }

    /// Every series per sample type (see [`TypedSeries`]) that `selector`
    /// matches and that has windows overlapping [from, until] (unix ms; 0:
    /// unbounded).
    pub fn typed_series(
        &self,
        selector: &Selector,
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<TypedSeries>, StoreError> {
        Ok(self
            .series(selector.equal(SERVICE_LABEL))?
            .iter()
            .flat_map(TypedSeries::from_info)
            .filter(|t| t.overlaps(from_ms, until_ms) && selector.matches_pairs(&t.labels))
            .collect())
    }

    /// Calls `f` with every stored window of `series` overlapping [from,
    /// until] (unix ns), decoded.
    fn each_window(
        &self,
        series: &[TypedSeries],
        from: u64,
        until: u64,
        mut f: impl FnMut(&TypedSeries, u64, &Profile) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let lookback = u64::try_from(MAX_WINDOW_LOOKBACK.as_nanos()).unwrap_or(0);
        let db = self.db();
        let txn = db.begin_read()?;
        let profiles = txn.open_table(PROFILES)?;
        let mut n = 0;
        for t in series {
            let (sel, sig) = (t.info.selector.as_str(), t.info.sample_types.as_str());
            for row in
                profiles.range((sel, sig, from.saturating_sub(lookback))..=(sel, sig, until))?
            {
                let (k, v) = row?;
                let start = k.value().2;
                let (window, _, bytes) = v.value();
                if start.saturating_add(window.max(1)) <= from || start > until {
                    continue;
                }
                let p = pprof::decode(bytes)
                    .map_err(|e| StoreError::Corrupt(format!("profile {sel} at {start}: {e}")))?;
                f(t, start, &p)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Merges one profile type of the series `q` selects, reduced to that
    /// sample type (so series with different sample-type lists merge); when
    /// several series are merged, the labels that tell them apart are added
    /// to their samples. `None` when nothing matches.
    pub fn select(&self, q: &SelectQuery) -> Result<Option<ProfileResult>, StoreError> {
        let from = q.from.map_or(0, nanos);
        let until = q.until.map_or(u64::MAX, nanos);
        let selector = q.selector.clone().and(Selector(vec![
            crate::selector::Matcher::new(
                "__profile_type__",
                crate::selector::Op::Eq,
                &q.profile_type,
            )
            .map_err(StoreError::Corrupt)?,
        ]));
        let series = self.typed_series(&selector, 0, 0)?;
        // Labels common to every selected series are not repeated per sample.
        let common: Vec<(String, String)> = series
            .first()
            .map(|f| {
                f.info
                    .labels
                    .iter()
                    .filter(|l| series.iter().all(|t| t.info.labels.contains(l)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let mut merger = Merger::new();
        let mut names: Vec<String> = Vec::new();
        let mut sample_types = String::new();
        let n = self.each_window(&series, from, until, |t, _, p| {
            let mut one = pprof::project(p, t.index);
            let distinct: Vec<(String, String)> = t
                .info
                .labels
                .iter()
                .filter(|l| l.0 != NAME_LABEL && !common.contains(l))
                .cloned()
                .collect();
            pprof::add_labels(&mut one, &distinct);
            if sample_types.is_empty() {
                sample_types = sample_types_signature(&one);
            }
            merger.add(&one)?;
            if !names.contains(&t.info.selector) {
                names.push(t.info.selector.clone());
            }
            Ok(())
        })?;
        Ok(merger.finish().map(|profile| ProfileResult {
            profile,
            sample_types,
            series: names,
            windows: n,
        }))
    }

    /// The total of one profile type per stored window of the series
    /// `selector` matches, in [from, until]; each with the series' labels.
    pub fn window_totals(
        &self,
        profile_type: &str,
        selector: &Selector,
        from: Option<SystemTime>,
        until: Option<SystemTime>,
    ) -> Result<Vec<WindowTotal>, StoreError> {
        let selector = selector.clone().and(Selector(vec![
            crate::selector::Matcher::new(
                "__profile_type__",
                crate::selector::Op::Eq,
                profile_type,
            )
            .map_err(StoreError::Corrupt)?,
        ]));
        let series = self.typed_series(&selector, 0, 0)?;
        let mut out = Vec::new();
        self.each_window(
            &series,
            from.map_or(0, nanos),
            until.map_or(u64::MAX, nanos),
            |t, start, p| {
                let total = p
                    .sample
                    .iter()
                    .map(|s| s.value.get(t.index).copied().unwrap_or(0))
                    .fold(0i64, i64::saturating_add);
                out.push(WindowTotal {
                    labels: t.info.labels.clone(),
                    start_ms: i64::try_from(start / 1_000_000).unwrap_or(i64::MAX),
                    total,
                });
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Per profile type, the samples in [from, until] whose `span_id` label
    /// is one of `span_ids` or whose `trace_id` label is `trace_id`
    /// (lowercase hexadecimal): their total and their total per span id
    /// (samples labelled with the trace but no span id count under "").
    /// Types without such samples are left out; by total, largest first.
    pub fn span_profile_totals(
        &self,
        span_ids: &std::collections::HashSet<String>,
        trace_id: Option<&str>,
        from: Option<SystemTime>,
        until: Option<SystemTime>,
    ) -> Result<Vec<SpanProfileTotals>, StoreError> {
        // Each stored window is read once, for all its sample types.
        let mut typed: BTreeMap<(String, String), Vec<TypedSeries>> = BTreeMap::new();
        for t in self.typed_series(&Selector::default(), 0, 0)? {
            typed
                .entry((t.info.selector.clone(), t.info.sample_types.clone()))
                .or_default()
                .push(t);
        }
        let firsts: Vec<TypedSeries> = typed.values().filter_map(|v| v.first().cloned()).collect();
        let mut by_type: BTreeMap<String, SpanProfileTotals> = BTreeMap::new();
        self.each_window(
            &firsts,
            from.map_or(0, nanos),
            until.map_or(u64::MAX, nanos),
            |first, _, p| {
                let key = |k: &str| p.string_table.iter().position(|s| s == k);
                let span_key = key(SPAN_ID_LABEL).map(|i| i as i64);
                let trace_key = key(TRACE_ID_LABEL).map(|i| i as i64);
                if span_key.is_none() && trace_key.is_none() {
                    return Ok(());
                }
                let all = typed
                    .get(&(first.info.selector.clone(), first.info.sample_types.clone()))
                    .map_or(&[][..], Vec::as_slice);
                for s in &p.sample {
                    let span = span_key
                        .and_then(|k| pprof::label_str(p, s, k))
                        .map(str::to_ascii_lowercase);
                    let in_trace = trace_id.is_some_and(|tid| {
                        trace_key
                            .and_then(|k| pprof::label_str(p, s, k))
                            .is_some_and(|v| v.eq_ignore_ascii_case(tid))
                    });
                    if !(in_trace || span.as_ref().is_some_and(|id| span_ids.contains(id))) {
                        continue;
                    }
                    for t in all {
                        let value = s.value.get(t.index).copied().unwrap_or(0);
                        if value == 0 {
                            continue;
                        }
                        let e =
                            by_type
                                .entry(t.type_id.clone())
                                .or_insert_with(|| SpanProfileTotals {
                                    type_id: t.type_id.clone(),
                                    name: t.info.profile_name.clone(),
                                    sample_type: t.get("__type__").unwrap_or_default().to_string(),
                                    unit: t.get("__unit__").unwrap_or_default().to_string(),
                                    total: 0,
                                    spans: BTreeMap::new(),
                                });
                        e.total = e.total.saturating_add(value);
                        let per = e.spans.entry(span.clone().unwrap_or_default()).or_insert(0);
                        *per = per.saturating_add(value);
                    }
                }
                Ok(())
            },
        )?;
        let mut out: Vec<SpanProfileTotals> = by_type.into_values().collect();
        out.sort_by(|a, b| b.total.cmp(&a.total).then(a.type_id.cmp(&b.type_id)));
        Ok(out)
    }

    /// Services with stored traces, by name.
    pub fn trace_services(&self) -> Result<Vec<String>, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let idx = txn.open_table(TRACE_SERVICES)?;
        let mut out = Vec::new();
        // Skip-scan: one lookup per distinct service.
        let mut next = idx.first()?.map(|(k, _)| k.value().0.to_string());
        while let Some(svc) = next {
            next = idx
                .range((
                    std::ops::Bound::Excluded((svc.as_str(), u64::MAX, [0xffu8; 16])),
                    std::ops::Bound::Unbounded,
                ))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().0.to_string());
            out.push(svc);
        }
        Ok(out)
    }

    /// The span names (and kinds) of a service, by name.
    pub fn operations(&self, service: &str) -> Result<Vec<Operation>, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let t = txn.open_table(OPERATIONS)?;
        let mut out = Vec::new();
        for row in t.range((service, "", "")..)? {
            let (k, _) = row?;
            let (svc, name, kind) = k.value();
            if svc != service {
                break;
            }
            out.push(Operation {
                name: name.to_string(),
                kind: kind.to_string(),
            });
        }
        Ok(out)
    }

    /// Searches traces (see [`TraceSearch`]).
    pub fn search_traces(&self, q: &TraceSearch) -> Result<TraceSearchResult, StoreError> {
        let from = q.from.map_or(0, nanos);
        let until = q.until.map_or(u64::MAX, nanos);
        let db = self.db();
        let txn = db.begin_read()?;
        let traces = txn.open_table(TRACES)?;
        let spans_t = txn.open_table(SPANS)?;
        // Candidate ids, newest first.
        let mut candidates: Vec<[u8; 16]> = Vec::new();
        match &q.service {
            Some(svc) => {
                let idx = txn.open_table(TRACE_SERVICES)?;
                for row in idx
                    .range((svc.as_str(), from, [0u8; 16])..=(svc.as_str(), until, [0xffu8; 16]))?
                    .rev()
                {
                    candidates.push(row?.0.value().2);
                }
            }
            None => {
                let idx = txn.open_table(TRACE_TIME)?;
                for row in idx.range((from, [0u8; 16])..=(until, [0xffu8; 16]))?.rev() {
                    candidates.push(row?.0.value().1);
                }
            }
        }
        let mut out = TraceSearchResult {
            total_exact: true,
            ..TraceSearchResult::default()
        };
        let sorted = q.sort != TraceSort::Newest;
        if q.sort == TraceSort::Oldest {
            candidates.reverse();
        }
        let mut all: Vec<TraceSummary> = Vec::new();
        let wanted = if sorted {
            MAX_SEARCH_SCAN
        } else {
            q.offset.saturating_add(q.limit)
        };
        let mut scanned = 0usize;
        for tid in candidates {
            let matched = if q.index_only() {
                true
            } else {
                if scanned >= MAX_SEARCH_SCAN && out.total as usize >= wanted {
                    out.total_exact = false;
                    break;
                }
                scanned += 1;
                let mut any = false;
                for row in spans_t.range((tid, [0u8; 8])..=(tid, [0xffu8; 8]))? {
                    let (_, v) = row?;
                    let rs = ResourceSpans::decode(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("span record: {e}")))?;
                    let service = service_of(&rs);
                    any = rs
                        .scope_spans
                        .iter()
                        .flat_map(|ss| &ss.spans)
                        .any(|span| q.span_matches(&rs, &service, span));
                    if any {
                        break;
                    }
                }
                any
            };
            if !matched {
                continue;
            }
            out.total += 1;
            if sorted {
                if all.len() < MAX_SEARCH_SCAN {
                    if let Some(g) = traces.get(tid)? {
                        all.push(decode_summary(g.value())?);
                    }
                } else {
                    out.total_exact = false;
                    break;
                }
            } else if out.total as usize > q.offset
                && out.traces.len() < q.limit
                && let Some(g) = traces.get(tid)?
            {
                out.traces.push(decode_summary(g.value())?);
            }
        }
        if sorted {
            let newest =
                |a: &TraceSummary, b: &TraceSummary| b.start_unix_nano.cmp(&a.start_unix_nano);
            match q.sort {
                TraceSort::Newest | TraceSort::Oldest => {}
                TraceSort::Longest => {
                    all.sort_by(|a, b| {
                        b.duration_nanos()
                            .cmp(&a.duration_nanos())
                            .then(newest(a, b))
                    });
                }
                TraceSort::Shortest => {
                    all.sort_by(|a, b| {
                        a.duration_nanos()
                            .cmp(&b.duration_nanos())
                            .then(newest(a, b))
                    });
                }
                TraceSort::MostSpans => {
                    all.sort_by(|a, b| b.span_count.cmp(&a.span_count).then(newest(a, b)));
                }
            }
            out.traces = all.into_iter().skip(q.offset).take(q.limit).collect();
        }
        Ok(out)
    }

    /// One trace as stored; `None` when unknown.
    pub fn trace_raw(&self, tid: [u8; 16]) -> Result<Option<RawTrace>, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        let Some(summary) = txn.open_table(TRACES)?.get(tid)? else {
            return Ok(None);
        };
        let summary = decode_summary(summary.value())?;
        let mut spans = Vec::new();
        for row in txn
            .open_table(SPANS)?
            .range((tid, [0u8; 8])..=(tid, [0xffu8; 8]))?
        {
            let (_, v) = row?;
            spans.push(
                ResourceSpans::decode(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("span record: {e}")))?,
            );
        }
        Ok(Some(RawTrace { summary, spans }))
    }

    /// Service dependencies as Jaeger computes them: for each span whose
    /// parent span (same trace) is of another service, one call from the
    /// parent's service to the span's; over the traces starting in [from,
    /// until] (the newest [`MAX_DEPENDENCY_TRACES`]). Sorted by parent,
    /// child.
    pub fn dependencies(
        &self,
        from: SystemTime,
        until: SystemTime,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let (from, until) = (nanos(from), nanos(until));
        let db = self.db();
        let txn = db.begin_read()?;
        let idx = txn.open_table(TRACE_TIME)?;
        let spans = txn.open_table(SPANS)?;
        let mut calls: BTreeMap<(String, String), u64> = BTreeMap::new();
        let range = idx.range((from, [0u8; 16])..=(until, [0xffu8; 16]))?;
        for row in range.rev().take(MAX_DEPENDENCY_TRACES) {
            let tid = row?.0.value().1;
            // (span id, parent span id, service) of the trace's spans.
            let mut trace: Vec<([u8; 8], Vec<u8>, String)> = Vec::new();
            for row in spans.range((tid, [0u8; 8])..=(tid, [0xffu8; 8]))? {
                let (k, v) = row?;
                let rs = ResourceSpans::decode(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("span record: {e}")))?;
                let service = service_of(&rs);
                for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                    trace.push((k.value().1, span.parent_span_id.clone(), service.clone()));
                }
            }
            let service: HashMap<&[u8], &str> = trace
                .iter()
                .map(|(id, _, svc)| (id.as_slice(), svc.as_str()))
                .collect();
            for (_, parent, child) in &trace {
                if let Some(parent) = service.get(parent.as_slice())
                    && parent != child
                {
                    *calls
                        .entry(((*parent).to_string(), child.clone()))
                        .or_default() += 1;
                }
            }
        }
        Ok(calls.into_iter().map(|((p, c), n)| (p, c, n)).collect())
    }

    /// Traces starting in [from, until], newest first, at most `limit`.
    pub fn traces(&self, q: &TraceQuery) -> Result<Vec<TraceSummary>, StoreError> {
        let from = q.from.map_or(0, nanos);
        let until = q.until.map_or(u64::MAX, nanos);
        let db = self.db();
        let txn = db.begin_read()?;
        let traces = txn.open_table(TRACES)?;
        let mut ids: Vec<[u8; 16]> = Vec::new();
        match &q.service {
            Some(svc) => {
                let idx = txn.open_table(TRACE_SERVICES)?;
                let range = idx
                    .range((svc.as_str(), from, [0u8; 16])..=(svc.as_str(), until, [0xffu8; 16]))?;
                for row in range.rev().take(q.limit) {
                    ids.push(row?.0.value().2);
                }
            }
            None => {
                let idx = txn.open_table(TRACE_TIME)?;
                let range = idx.range((from, [0u8; 16])..=(until, [0xffu8; 16]))?;
                for row in range.rev().take(q.limit) {
                    ids.push(row?.0.value().1);
                }
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for tid in ids {
            if let Some(g) = traces.get(tid)? {
                out.push(decode_summary(g.value())?);
            }
        }
        Ok(out)
    }

    /// One trace with all its stored spans; `None` when unknown.
    pub fn trace(&self, tid: [u8; 16]) -> Result<Option<TraceDetail>, StoreError> {
        let Some(RawTrace {
            summary,
            spans: records,
        }) = self.trace_raw(tid)?
        else {
            return Ok(None);
        };
        let mut spans = Vec::new();
        for rs in records {
            let service = service_of(&rs);
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                let scope = ss
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                for span in &ss.spans {
                    let start = span.start_time_unix_nano;
                    let end = span.end_time_unix_nano.max(start);
                    let (status, status_message) = match &span.status {
                        Some(st) if st.code == StatusCode::Error as i32 => {
                            ("error", st.message.clone())
                        }
                        Some(st) if st.code == StatusCode::Ok as i32 => ("ok", st.message.clone()),
                        Some(st) => ("unset", st.message.clone()),
                        None => ("unset", String::new()),
                    };
                    spans.push(SpanView {
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: kind_name(span.kind),
                        service: service.clone(),
                        scope: scope.clone(),
                        start_unix_nano: start,
                        end_unix_nano: end,
                        offset_ms: start.saturating_sub(summary.start_unix_nano) as f64 / 1e6,
                        duration_ms: (end - start) as f64 / 1e6,
                        status,
                        status_message,
                        attributes: attributes(&span.attributes),
                        resource: resource.clone(),
                        events: span
                            .events
                            .iter()
                            .map(|e| EventView {
                                offset_ms: e.time_unix_nano.saturating_sub(start) as f64 / 1e6,
                                name: e.name.clone(),
                                attributes: attributes(&e.attributes),
                            })
                            .collect(),
                    });
                }
            }
        }
        spans.sort_by(|a, b| {
            a.start_unix_nano
                .cmp(&b.start_unix_nano)
                .then(a.span_id.cmp(&b.span_id))
        });
        Ok(Some(TraceDetail { summary, spans }))
    }

    /// Number of stored spans (all traces).
    pub fn span_count(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        Ok(txn.open_table(SPANS)?.len()?)
    }

    /// Number of stored profile windows (all series).
    pub fn profile_windows(&self) -> Result<u64, StoreError> {
        let db = self.db();
        let txn = db.begin_read()?;
        Ok(txn.open_table(PROFILES)?.len()?)
    }

    /// How often `maintain` runs: a tenth of the retention, between 1 s and
    /// 1 min.
    pub fn maintain_interval(&self) -> Duration {
        (self.retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// The store as a sink: writes profile and span batches (metrics are not
/// stored), and applies retention and the size bound on a timer. Returns when
/// the channel closes, after the last write.
pub async fn run_sink(store: Arc<Store>, mut rx: mpsc::Receiver<Batch>, stats: Arc<ExporterStats>) {
    let mut tick = tokio::time::interval(store.maintain_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                let first = match batch {
                    Batch::Spans(first) => first,
                    Batch::EncodedSpans(e) => match decode_spans(&e, &stats) {
                        Some(first) => first,
                        None => continue,
                    },
                    batch => {
                        write_batch(&store, batch, &stats).await;
                        continue;
                    }
                };
                // Span batches already waiting join this one: one commit
                // (fsync) for all of them.
                let mut spans = vec![first];
                let mut other = None;
                while spans.len() < MAX_SPAN_BATCHES_PER_COMMIT {
                    match rx.try_recv() {
                        Ok(Batch::Spans(more)) => spans.push(more),
                        Ok(Batch::EncodedSpans(e)) => spans.extend(decode_spans(&e, &stats)),
                        Ok(b) => {
                            other = Some(b);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                write_spans(&store, spans, &stats).await;
                if let Some(b) = other {
                    write_batch(&store, b, &stats).await;
                }
            }
            _ = tick.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.maintain(SystemTime::now())).await {
                    Ok(Ok(done)) if done != Maintenance::default() => {
                        tracing::debug!(?done, "store maintenance");
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "store maintenance failed"),
                    Err(e) => tracing::warn!(error = %e, "store maintenance task failed"),
                }
            }
        }
    }
}

/// `ResourceSpans { resource, scope_spans: [ScopeSpans { scope, spans: [span],
/// schema_url }], schema_url }` encoded, from the already encoded resource and
/// scope: the same bytes as prost writes, without cloning them per span.
fn span_record(
    resource: Option<&[u8]>,
    resource_schema: &str,
    scope: Option<&[u8]>,
    scope_schema: &str,
    span: &opentelemetry_proto::tonic::trace::v1::Span,
) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    fn field(buf: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(bytes.len() as u64, buf);
        buf.extend_from_slice(bytes);
    }
    fn field_len(tag: u32, len: usize) -> usize {
        prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
    }
    let span_len = span.encoded_len();
    let mut scope_spans_len = field_len(2, span_len);
    if let Some(sc) = scope {
        scope_spans_len += field_len(1, sc.len());
    }
    if !scope_schema.is_empty() {
        scope_spans_len += field_len(3, scope_schema.len());
    }
    let mut buf = Vec::with_capacity(
        resource.map_or(0, |r| field_len(1, r.len()))
            + field_len(2, scope_spans_len)
            + field_len(3, resource_schema.len()),
    );
    if let Some(r) = resource {
        field(&mut buf, 1, r);
    }
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(scope_spans_len as u64, &mut buf);
    if let Some(sc) = scope {
        field(&mut buf, 1, sc);
    }
    encode_key(2, WireType::LengthDelimited, &mut buf);
    encode_varint(span_len as u64, &mut buf);
    span.encode_raw(&mut buf);
    if !scope_schema.is_empty() {
        field(&mut buf, 3, scope_schema.as_bytes());
    }
    if !resource_schema.is_empty() {
        field(&mut buf, 3, resource_schema.as_bytes());
    }
    buf
}

/// Span batches written in one transaction at most.
const MAX_SPAN_BATCHES_PER_COMMIT: usize = 8;

/// Encoded spans as the store takes them; `None` (counted as dropped, and
/// logged) when they do not decode.
fn decode_spans(e: &EncodedSpans, stats: &ExporterStats) -> Option<Arc<ExportTraceServiceRequest>> {
    match e.decode() {
        Ok(req) => Some(Arc::new(req)),
        Err(err) => {
            tracing::warn!(error = %err, spans = e.spans, "store: encoded spans do not decode");
            stats.dropped.add(e.spans);
            None
        }
    }
}

async fn write_spans(
    store: &Arc<Store>,
    batches: Vec<Arc<ExportTraceServiceRequest>>,
    stats: &ExporterStats,
) {
    let s = store.clone();
    let n: u64 = batches.iter().map(|b| span_count(b)).sum();
    let result = tokio::task::spawn_blocking(move || {
        let refs: Vec<&ExportTraceServiceRequest> = batches.iter().map(|b| b.as_ref()).collect();
        s.put_spans_all(&refs)
    })
    .await;
    match result {
        Ok(Ok(put)) => {
            stats.sent.add(put.stored);
            stats.dropped.add(put.invalid);
            if put.invalid > 0 {
                tracing::warn!(
                    spans = put.invalid,
                    "store: spans without valid ids not stored"
                );
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, spans = n, "store: spans not written");
            stats.dropped.add(n);
        }
        Err(e) => {
            tracing::warn!(error = %e, "store: write task failed");
            stats.dropped.add(n);
        }
    }
}

async fn write_batch(store: &Arc<Store>, batch: Batch, stats: &ExporterStats) {
    let s = store.clone();
    match batch {
        Batch::Profiles(profiles) => {
            let n = profiles.len() as u64;
            match tokio::task::spawn_blocking(move || s.put_profiles(&profiles)).await {
                Ok(Ok(())) => stats.sent.add(n),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, profiles = n, "store: profiles not written");
                    stats.dropped.add(n);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store: write task failed");
                    stats.dropped.add(n);
                }
            }
        }
        Batch::Spans(req) => write_spans(store, vec![req], stats).await,
        Batch::EncodedSpans(e) => {
            if let Some(req) = decode_spans(&e, stats) {
                write_spans(store, vec![req], stats).await;
            }
        }
        Batch::Metrics(_) => {}
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use opentelemetry_proto::tonic::{
        common::v1::InstrumentationScope,
        resource::v1::Resource,
        trace::v1::{ScopeSpans, Status},
    };

    use super::*;
    use crate::{model::SeriesLabels, pprof::tests::cpu_profile};

    #[test]
    fn span_record_is_what_prost_writes() {
        use opentelemetry_proto::tonic::trace::v1::Span;
        let span = Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET /".into(),
            ..Span::default()
        };
        let resource = Resource {
            attributes: vec![],
            dropped_attributes_count: 3,
            ..Resource::default()
        };
        let scope = InstrumentationScope {
            name: "s".into(),
            ..InstrumentationScope::default()
        };
        for (r, sc, rs_schema, ss_schema) in [
            (
                Some(resource.clone()),
                Some(scope.clone()),
                "https://r",
                "https://s",
            ),
            (None, None, "", ""),
            (Some(resource), None, "", "x"),
        ] {
            let expected = ResourceSpans {
                resource: r.clone(),
                scope_spans: vec![ScopeSpans {
                    scope: sc.clone(),
                    spans: vec![span.clone()],
                    schema_url: ss_schema.into(),
                }],
                schema_url: rs_schema.into(),
            }
            .encode_to_vec();
            let got = span_record(
                r.map(|r| r.encode_to_vec()).as_deref(),
                rs_schema,
                sc.map(|s| s.encode_to_vec()).as_deref(),
                ss_schema,
                &span,
            );
            assert_eq!(got, expected);
        }
    }

    pub(crate) fn config(dir: &std::path::Path) -> StoreConfig {
        StoreConfig {
            enabled: Some(true),
            path: dir.join("sub/dir/collector.redb"),
            retention: Duration::from_secs(3600),
            max_bytes: 64 << 20,
            ..StoreConfig::default()
        }
    }

    pub(crate) fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    pub(crate) fn merged(
        service: &str,
        pod: &str,
        start: u64,
        stacks: &[(&[&str], i64)],
    ) -> MergedProfile {
        MergedProfile {
            labels: SeriesLabels::new([
                ("__name__", "process_cpu"),
                ("service_name", service),
                ("pod", pod),
            ])
            .unwrap(),
            window_start: at(start),
            window: Duration::from_secs(10),
            inputs: 1,
            profile: cpu_profile(stacks, 1),
        }
    }

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..KeyValue::default()
        }
    }

    pub(crate) struct SpanSpec<'a> {
        pub trace: u8,
        pub id: u8,
        pub parent: Option<u8>,
        pub name: &'a str,
        pub start_ms: u64,
        pub dur_ms: u64,
        pub error: bool,
    }

    pub(crate) fn spans(service: &str, specs: &[SpanSpec<'_>]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", service)],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "fathom".into(),
                        ..InstrumentationScope::default()
                    }),
                    spans: specs
                        .iter()
                        .map(|s| Span {
                            trace_id: vec![s.trace; 16],
                            span_id: vec![s.id; 8],
                            parent_span_id: s.parent.map(|p| vec![p; 8]).unwrap_or_default(),
                            name: s.name.into(),
                            kind: SpanKind::Server as i32,
                            start_time_unix_nano: s.start_ms * 1_000_000,
                            end_time_unix_nano: (s.start_ms + s.dur_ms) * 1_000_000,
                            attributes: vec![kv("http.request.method", "GET")],
                            status: Some(Status {
                                code: if s.error {
                                    StatusCode::Error as i32
                                } else {
                                    StatusCode::Unset as i32
                                },
                                message: String::new(),
                            }),
                            ..Span::default()
                        })
                        .collect(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        }
    }

    fn folded_of(r: &ProfileResult) -> Vec<(String, i64)> {
        pprof::folded(&r.profile, 0)
    }

    #[test]
    fn profiles_round_trip_and_merge_over_time_and_series() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        store
            .put_profiles(&[
                merged("api", "p1", 100, &[(&["main", "work"], 3)]),
                merged("api", "p2", 100, &[(&["main", "idle"], 2)]),
                merged("db", "d1", 100, &[(&["main", "query"], 7)]),
            ])
            .unwrap();
        store
            .put_profiles(&[merged("api", "p1", 110, &[(&["main", "work"], 4)])])
            .unwrap();
        // The same window again merges into it.
        store
            .put_profiles(&[merged("api", "p1", 110, &[(&["main", "work"], 1)])])
            .unwrap();
        assert_eq!(store.profile_windows().unwrap(), 4);

        let series = store.series(Some("api")).unwrap();
        assert_eq!(series.len(), 2);
        let p1 = series.iter().find(|s| s.selector.contains("p1")).unwrap();
        assert_eq!(p1.first_ms, 100_000);
        assert_eq!(p1.last_ms, 120_000);
        assert_eq!(p1.sample_types, "samples/count,cpu/nanoseconds");
        let d1 = &store.series(Some("db")).unwrap()[0];
        assert_eq!((d1.first_ms, d1.last_ms), (100_000, 110_000), "one window");

        let services = store.services().unwrap();
        let names: Vec<_> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "db"]);
        assert_eq!(services[0].profile_series, 2);
        assert_eq!(services[0].profile_names, ["process_cpu"]);

        let one = store
            .profile(&ProfileQuery {
                selector: Some(Selector::parse(&p1.selector).unwrap()),
                ..ProfileQuery::default()
            })
            .unwrap()
            .unwrap();
        assert_eq!(folded_of(&one), [("main;work".to_string(), 8)]);
        assert_eq!(one.windows, 2);

        let later = store
            .profile(&ProfileQuery {
                selector: Some(Selector::parse(&p1.selector).unwrap()),
                from: Some(at(110)),
                ..ProfileQuery::default()
            })
            .unwrap()
            .unwrap();
        assert_eq!(folded_of(&later), [("main;work".to_string(), 5)]);

        let svc = store
            .profile(&ProfileQuery {
                service: Some("api".into()),
                profile_name: Some("process_cpu".into()),
                until: Some(at(105)),
                ..ProfileQuery::default()
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            folded_of(&svc),
            [("main;idle".to_string(), 2), ("main;work".to_string(), 3)]
        );
        assert_eq!(svc.series.len(), 2);
        assert!(
            store
                .profile(&ProfileQuery {
                    service: Some("nope".into()),
                    ..ProfileQuery::default()
                })
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn spans_round_trip_with_index_and_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        // The child arrives before its root, from another service.
        let put = store
            .put_spans(&spans(
                "db",
                &[SpanSpec {
                    trace: 1,
                    id: 2,
                    parent: Some(1),
                    name: "SELECT",
                    start_ms: 1_005,
                    dur_ms: 10,
                    error: true,
                }],
            ))
            .unwrap();
        assert_eq!(
            put,
            SpanPut {
                stored: 1,
                invalid: 0
            }
        );
        let mut root = spans(
            "api",
            &[
                SpanSpec {
                    trace: 1,
                    id: 1,
                    parent: None,
                    name: "GET /users",
                    start_ms: 1_000,
                    dur_ms: 30,
                    error: false,
                },
                SpanSpec {
                    trace: 2,
                    id: 3,
                    parent: None,
                    name: "GET /health",
                    start_ms: 2_000,
                    dur_ms: 1,
                    error: false,
                },
            ],
        );
        root.resource_spans[0].scope_spans[0].spans.push(Span {
            trace_id: vec![0; 16],
            span_id: vec![1; 8],
            ..Span::default()
        });
        assert_eq!(
            store.put_spans(&root).unwrap(),
            SpanPut {
                stored: 2,
                invalid: 1
            }
        );
        // Resent: replaces, does not count twice.
        store.put_spans(&root).unwrap();
        assert_eq!(store.span_count().unwrap(), 3);

        let all = store
            .traces(&TraceQuery {
                limit: 10,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].root_name, "GET /health", "newest first");
        let t1 = &all[1];
        assert_eq!(t1.trace_id, "01".repeat(16));
        assert_eq!(t1.root_name, "GET /users");
        assert_eq!(t1.service, "api");
        assert!(t1.root_known);
        assert_eq!(t1.span_count, 2);
        assert!(t1.error);
        assert_eq!(t1.start_unix_nano, 1_000_000_000);
        assert_eq!(t1.duration_nanos(), 30_000_000);
        assert_eq!(t1.services, ["db", "api"]);

        let db_only = store
            .traces(&TraceQuery {
                service: Some("db".into()),
                limit: 10,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(db_only.len(), 1);
        assert_eq!(db_only[0].trace_id, t1.trace_id);
        let limited = store
            .traces(&TraceQuery {
                limit: 1,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(limited.len(), 1);
        let ranged = store
            .traces(&TraceQuery {
                until: Some(UNIX_EPOCH + Duration::from_millis(1_500)),
                limit: 10,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(ranged.len(), 1);
        assert_eq!(ranged[0].root_name, "GET /users");

        let detail = store.trace([1; 16]).unwrap().unwrap();
        assert_eq!(detail.spans.len(), 2);
        let child = &detail.spans[1];
        assert_eq!(child.name, "SELECT");
        assert_eq!(child.parent_span_id, "01".repeat(8));
        assert_eq!(child.service, "db");
        assert_eq!(child.scope, "fathom");
        assert_eq!(child.kind, "server");
        assert_eq!(child.status, "error");
        assert!((child.offset_ms - 5.0).abs() < 1e-9);
        assert!((child.duration_ms - 10.0).abs() < 1e-9);
        assert_eq!(
            child.attributes,
            [("http.request.method".to_string(), "GET".to_string())]
        );
        assert_eq!(
            child.resource,
            [("service.name".to_string(), "db".to_string())]
        );
        assert!(store.trace([9; 16]).unwrap().is_none());
        let services = store.services().unwrap();
        assert!(services.iter().all(|s| s.has_traces));
        assert_eq!(services.len(), 2);
    }

    #[test]
    fn retention_deletes_old_data_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        store
            .put_profiles(&[
                merged("api", "p1", 1_000, &[(&["old"], 1)]),
                merged("api", "p1", 5_000, &[(&["new"], 1)]),
            ])
            .unwrap();
        let span = |trace: u8, start_ms: u64| SpanSpec {
            trace,
            id: 1,
            parent: None,
            name: "x",
            start_ms,
            dur_ms: 1,
            error: false,
        };
        store
            .put_spans(&spans("api", &[span(1, 1_000_000), span(2, 5_000_000)]))
            .unwrap();
        let before = store.stored_bytes().unwrap();
        // Retention 1 h: at 6000 s, everything before 2400 s goes.
        let done = store.maintain(at(6_000)).unwrap();
        assert_eq!(done.profiles_deleted, 1);
        assert_eq!(done.traces_deleted, 1);
        assert!(store.stored_bytes().unwrap() < before);
        let left = store.profile(&ProfileQuery::default()).unwrap().unwrap();
        assert_eq!(pprof::folded(&left.profile, 0), [("new".to_string(), 1)]);
        let traces = store
            .traces(&TraceQuery {
                limit: 10,
                ..TraceQuery::default()
            })
            .unwrap();
        assert_eq!(traces.len(), 1);
        assert_eq!(traces[0].trace_id, "02".repeat(16));
        assert_eq!(store.span_count().unwrap(), 1);
        // Everything expires: the series disappears too.
        store.maintain(at(100_000)).unwrap();
        assert_eq!(store.stored_bytes().unwrap(), 0);
        assert!(store.series(None).unwrap().is_empty());
        assert!(store.services().unwrap().is_empty());
    }

    #[test]
    fn size_bound_evicts_oldest_first_and_bounds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let max_bytes = 2 << 20;
        let store = Store::open(&StoreConfig {
            max_bytes,
            retention: Duration::from_secs(1 << 40),
            ..config(dir.path())
        })
        .unwrap();
        // Profiles with many distinct functions (poorly compressible names).
        let big = |i: u64| {
            let names: Vec<String> = (0..400)
                .map(|j| format!("fn_{i}_{j}_{}", i * 7919 + j * 104_729))
                .collect();
            let stacks: Vec<Vec<&str>> = names
                .chunks(4)
                .map(|c| c.iter().map(String::as_str).collect())
                .collect();
            let stacks: Vec<(&[&str], i64)> = stacks.iter().map(|s| (s.as_slice(), 1)).collect();
            merged("api", "p1", 1_000 + i * 10, &stacks)
        };
        let mut max_file = 0;
        for i in 0..300u64 {
            store.put_profiles(&[big(i)]).unwrap();
            let span = SpanSpec {
                trace: (i % 250) as u8 + 1,
                id: (i / 250) as u8 + 1,
                parent: None,
                name: "request",
                start_ms: (1_000 + i * 10) * 1000,
                dur_ms: 5,
                error: false,
            };
            store.put_spans(&spans("api", &[span])).unwrap();
            assert!(store.stored_bytes().unwrap() <= max_bytes / 2);
            if i % 50 == 49 {
                store.maintain(at(0)).unwrap();
                max_file = max_file.max(store.file_bytes());
            }
        }
        let windows = store.profile_windows().unwrap();
        assert!(windows < 300, "{windows} windows: nothing was evicted");
        assert!(windows > 10, "{windows} windows: evicted far too much");
        // The newest windows are there, the oldest gone.
        let series = &store.series(None).unwrap()[0];
        assert_eq!(series.last_ms, (1_000 + 299 * 10 + 10) * 1000);
        assert!(series.first_ms > 1_000_000);
        store.maintain(at(0)).unwrap();
        let file = store.file_bytes();
        eprintln!(
            "max_bytes {max_bytes}, stored {} logical bytes in {windows} windows, file {file} bytes (max seen {max_file})",
            store.stored_bytes().unwrap()
        );
        assert!(file <= max_bytes, "file {file} > {max_bytes}");
        assert!(max_file <= max_bytes, "file {max_file} > {max_bytes}");
    }

    /// A store written before the metric history was counted (no
    /// `metric_time`, `bytes` without it) is counted and indexed at open,
    /// and its points are then evicted like the rest.
    #[test]
    fn metric_history_of_an_older_store_is_counted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let series = br#"{"name":"queue_depth"}"#.to_vec();
        let w = MetricHistoryWrite {
            series: vec![(1, series.clone())],
            points: vec![(1, 5_000, vec![0; 33]), (1, 6_000, vec![1; 33])],
            ..MetricHistoryWrite::default()
        };
        let counted = metric_series_bytes(series.len()) + 2 * metric_point_bytes(33);
        {
            let s = Store::open(&cfg).unwrap();
            s.put_metric_history(&w).unwrap();
            assert_eq!(s.stored_bytes().unwrap(), counted);
            // Rewriting a point and the series counts the difference only.
            s.put_metric_history(&w).unwrap();
            assert_eq!(s.stored_bytes().unwrap(), counted);
            let db = s.db();
            let txn = db.begin_write().unwrap();
            {
                let mut t = Tables::open(&txn).unwrap();
                t.meta.remove(METRIC_COUNTED_KEY).unwrap();
                t.metric_time.retain(|_, _| false).unwrap();
                t.set_bytes(0).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = Store::open(&cfg).unwrap();
        assert_eq!(s.stored_bytes().unwrap(), counted);
        // Retention (1 h before 10,000 s): both points go, the floor moves.
        let done = s.maintain(at(10_000)).unwrap();
        assert_eq!(done.metric_points_deleted, 2, "{done:?}");
        assert_eq!(done.metric_floor_ms, Some(6_000));
        assert_eq!(s.metric_floor_ms(), 6_000);
        assert_eq!(s.stored_bytes().unwrap(), metric_series_bytes(series.len()));
        assert!(s.metric_history().unwrap().points.is_empty());
    }

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&config(dir.path())).unwrap();
            store
                .put_profiles(&[merged("api", "p1", 100, &[(&["main", "work"], 3)])])
                .unwrap();
            store
                .put_spans(&spans(
                    "api",
                    &[SpanSpec {
                        trace: 1,
                        id: 1,
                        parent: None,
                        name: "GET /",
                        start_ms: 1,
                        dur_ms: 1,
                        error: false,
                    }],
                ))
                .unwrap();
        }
        let store = Store::open(&config(dir.path())).unwrap();
        let p = store.profile(&ProfileQuery::default()).unwrap().unwrap();
        assert_eq!(pprof::folded(&p.profile, 0), [("main;work".to_string(), 3)]);
        assert_eq!(
            store.trace([1; 16]).unwrap().unwrap().spans[0].name,
            "GET /"
        );
    }

    #[test]
    fn corrupt_or_unwritable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.path.parent().unwrap()).unwrap();
        std::fs::write(&cfg.path, vec![0x5au8; 64 << 10]).unwrap();
        let err = Store::open(&cfg).err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(err.to_string().contains("collector.redb"), "{err}");

        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = Store::open(&StoreConfig {
            path: blocker.join("db.redb"),
            ..cfg
        })
        .err()
        .unwrap();
        assert!(matches!(err, StoreError::Dir { .. }), "{err}");
    }
}
