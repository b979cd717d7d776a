//! The collector's own web UI and its JSON/pprof API under `/ui/api/`, on
//! the HTTP listener: flame graphs (inferno), top functions, pprof downloads
//! (`go tool pprof` can fetch `/ui/api/profile` — or `/api/profile`, kept —
//! directly), traces with a waterfall, and the current metrics. The page and
//! its assets are embedded in the binary. `/api/*` otherwise belongs to
//! Jaeger's query API (`query::jaeger`). Query parameters an endpoint does
//! not know are refused with 400.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;

use crate::{
    init::BoundAddrs,
    metrics_history::MetricsHistory,
    model::{MetricPoint, MetricsView},
    pprof,
    query::jaeger::parse_go_duration,
    selector::Selector,
    store::{
        ProfileQuery, ProfileResult, SPAN_ID_LABEL, SpanProfileTotals, Store, StoreError,
        TRACE_ID_LABEL, TraceSearch, TraceSort, TraceSummary, hex, is_span_id, parse_trace_id,
    },
};

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// Default and largest number of traces listed.
const DEFAULT_TRACE_LIMIT: usize = 50;
const MAX_TRACE_LIMIT: usize = 1000;
const DEFAULT_TOP_LIMIT: usize = 50;

#[derive(Clone)]
pub struct UiState {
    pub store: Arc<Store>,
    pub metrics: Arc<dyn MetricsView>,
    /// Metric points over the store's retention (see `metrics_history`).
    pub history: Arc<MetricsHistory>,
    /// The listeners' addresses, once bound (for the onboarding hints).
    pub addrs: Arc<OnceLock<BoundAddrs>>,
}

impl UiState {
    /// A UI over `store` and `metrics`, with a metric history kept in the
    /// store for its retention (read back from it; not sampled in the background: see
    /// [`MetricsHistory::spawn_sampler`]).
    pub fn new(store: Arc<Store>, metrics: Arc<dyn MetricsView>) -> Self {
        Self {
            history: Arc::new(MetricsHistory::open(store.clone())),
            store,
            metrics,
            addrs: Arc::new(OnceLock::new()),
        }
    }
}

/// The UI's routes: `/`, `/ui/*` assets and `/ui/api/*`; `/api/profile`
/// and `/api/series` stay where they were (they clash with nothing, and
/// `go tool pprof` URLs name `/api/profile`).
pub fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
        .route("/ui/api/status", get(status))
        .route("/ui/api/services", get(services))
        .route("/ui/api/series", get(series))
        .route("/ui/api/flamegraph.svg", get(flamegraph))
        .route("/ui/api/top", get(top))
        .route("/ui/api/profile", get(profile))
        .route("/ui/api/traces", get(traces))
        .route("/ui/api/traces/{trace_id}", get(trace))
        .route("/ui/api/traces/{trace_id}/profiles", get(trace_profiles))
        .route("/ui/api/metrics", get(metrics))
        .route("/api/profile", get(profile))
        .route("/api/series", get(series))
        .with_state(state)
}

/// Parameters of the profile endpoints (`seconds` is what `go tool pprof
/// -seconds` appends; it is ignored).
const PROFILE_PARAMS: &[&str] = &[
    "series",
    "service",
    "name",
    "sample_types",
    "from",
    "until",
    "range",
    "seconds",
    "span_id",
    "trace_id",
];

/// How far around a trace's own start and end its profile samples are
/// looked for (profile windows and span times come from different clocks).
const TRACE_PROFILE_MARGIN: Duration = Duration::from_secs(15);

/// Refuses query parameters an endpoint does not take.
fn only(q: &HashMap<String, String>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    let known = |k: &str| allowed.iter().any(|set| set.contains(&k));
    let mut unknown: Vec<&str> = q.keys().map(String::as_str).filter(|k| !known(k)).collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    let accepted: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
    Err(ApiError::bad(format!(
        "unknown query parameter{} {} (accepted: {})",
        if unknown.len() > 1 { "s" } else { "" },
        unknown.join(", "),
        if accepted.is_empty() {
            "none".to_string()
        } else {
            accepted.join(", ")
        }
    )))
}

/// An API error: a status and a message for the client.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, msg.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "UI query failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{}\n", self.1),
        )
            .into_response()
    }
}

type Params = Query<HashMap<String, String>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn param<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// A time: unix milliseconds, `now`, or `now-<duration>` (e.g. `now-1h`).
fn parse_time(name: &str, v: &str, now: SystemTime) -> Result<SystemTime, ApiError> {
    if let Some(ago) = v.strip_prefix("now-") {
        let d = humantime::parse_duration(ago)
            .map_err(|e| ApiError::bad(format!("{name}={v:?}: {e}")))?;
        return Ok(now.checked_sub(d).unwrap_or(UNIX_EPOCH));
    }
    if v == "now" {
        return Ok(now);
    }
    let ms: u64 = v.parse().map_err(|_| {
        ApiError::bad(format!(
            "{name}={v:?}: expected unix milliseconds, \"now\" or \"now-<duration>\" (e.g. now-1h)"
        ))
    })?;
    Ok(UNIX_EPOCH + Duration::from_millis(ms))
}

/// `from`/`until` (unix ms) or `range` (a duration back from now).
fn time_range(
    q: &HashMap<String, String>,
    now: SystemTime,
) -> Result<(Option<SystemTime>, Option<SystemTime>), ApiError> {
    let mut from = param(q, "from")
        .map(|v| parse_time("from", v, now))
        .transpose()?;
    let until = param(q, "until")
        .map(|v| parse_time("until", v, now))
        .transpose()?;
    if let Some(r) = param(q, "range").filter(|r| *r != "all") {
        if from.is_some() {
            return Err(ApiError::bad("give either from or range, not both"));
        }
        let d = humantime::parse_duration(r)
            .map_err(|e| ApiError::bad(format!("range={r:?}: {e} (e.g. 15m, 1h, 24h, or all)")))?;
        from = Some(until.unwrap_or(now).checked_sub(d).unwrap_or(UNIX_EPOCH));
    }
    if let (Some(f), Some(u)) = (from, until)
        && f > u
    {
        return Err(ApiError::bad("from is after until"));
    }
    Ok((from, until))
}

fn profile_query(q: &HashMap<String, String>, filtered: bool) -> Result<ProfileQuery, ApiError> {
    let (from, until) = time_range(q, SystemTime::now())?;
    let mut selector = param(q, "series")
        .map(|s| Selector::parse(s).map_err(|e| ApiError::bad(format!("series: {e}"))))
        .transpose()?;
    let service = param(q, "service").map(str::to_string);
    if selector.is_none() && service.is_none() {
        if !filtered {
            return Err(ApiError::bad(
                "give series=<selector>, service=<service_name>, span_id=<span ids> or trace_id=<trace id> (and optionally name=<profile name>)",
            ));
        }
        // Only the span or trace filter: every series.
        selector = Some(Selector::default());
    }
    Ok(ProfileQuery {
        selector,
        service,
        profile_name: param(q, "name").map(str::to_string),
        sample_types: param(q, "sample_types").map(str::to_string),
        from,
        until,
    })
}

/// `span_id=` (span ids, comma-separated) and `trace_id=`: only the samples
/// taken in those spans (sample label `span_id`) or in that trace (sample
/// label `trace_id`, or `span_id` of one of its stored spans).
struct SampleFilter {
    span_ids: HashSet<String>,
    trace_id: Option<[u8; 16]>,
}

impl SampleFilter {
    fn parse(q: &HashMap<String, String>) -> Result<Option<Self>, ApiError> {
        let mut span_ids = HashSet::new();
        if let Some(v) = param(q, "span_id") {
            for id in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if !is_span_id(id) {
                    return Err(ApiError::bad(format!(
                        "span_id: {id:?} is not a span id (16 hexadecimal digits; several: comma-separated)"
                    )));
                }
                span_ids.insert(id.to_ascii_lowercase());
            }
        }
        let trace_id = param(q, "trace_id")
            .map(|v| {
                parse_trace_id(v).ok_or_else(|| {
                    ApiError::bad(format!("trace_id={v:?}: expected 32 hexadecimal digits"))
                })
            })
            .transpose()?;
        Ok((!span_ids.is_empty() || trace_id.is_some()).then_some(Self { span_ids, trace_id }))
    }

    /// Keeps the samples the filter selects (the stored trace's span ids
    /// read from `store`).
    fn apply(
        mut self,
        store: &Store,
        p: &mut crate::proto::pprof::Profile,
    ) -> Result<(), StoreError> {
        let trace = self.trace_id.map(|t| hex(&t));
        if let Some(tid) = self.trace_id
            && let Some(raw) = store.trace_raw(tid)?
        {
            self.span_ids.extend(raw.profile_span_ids());
        }
        let traces: HashSet<String> = trace.into_iter().collect();
        pprof::retain_any_labelled(
            p,
            &[(SPAN_ID_LABEL, &self.span_ids), (TRACE_ID_LABEL, &traces)],
        );
        Ok(())
    }

    fn describe(q: &HashMap<String, String>) -> String {
        ["span_id", "trace_id"]
            .iter()
            .filter_map(|k| param(q, k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" or ")
    }
}

async fn query_profile(
    store: Arc<Store>,
    q: &HashMap<String, String>,
) -> Result<ProfileResult, ApiError> {
    let filter = SampleFilter::parse(q)?;
    let filtered = filter.is_some();
    let pq = profile_query(q, filtered)?;
    let r = blocking(move || {
        let Some(mut r) = store.profile(&pq)? else {
            return Ok(None);
        };
        if let Some(f) = filter {
            f.apply(&store, &mut r.profile)?;
        }
        Ok(Some(r))
    })
    .await?
    .ok_or_else(|| ApiError::not_found("no stored profile matches this query"))?;
    if filtered && r.profile.sample.is_empty() {
        return Err(ApiError::not_found(format!(
            "no sample of the selected profiles carries {} in this range",
            SampleFilter::describe(q)
        )));
    }
    Ok(r)
}

/// The sample index for `type=` (e.g. `cpu`, `samples`), and its name/unit.
fn sample_type(
    r: &ProfileResult,
    q: &HashMap<String, String>,
) -> Result<(usize, String, String), ApiError> {
    let types: Vec<&str> = r.sample_types.split(',').collect();
    let wanted = param(q, "type");
    if let Some(t) = wanted
        && !types.iter().any(|x| x.split('/').next() == Some(t))
    {
        return Err(ApiError::bad(format!(
            "type={t:?}: this profile has sample types {}",
            r.sample_types
        )));
    }
    let i = pprof::sample_index(&r.profile, wanted);
    let (name, unit) = types
        .get(i)
        .and_then(|t| t.split_once('/'))
        .unwrap_or(("", ""));
    Ok((i, name.to_string(), unit.to_string()))
}

async fn services(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[])?;
    let store = s.store.clone();
    Ok(Json(blocking(move || store.services()).await?).into_response())
}

async fn series(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[&["service"]])?;
    let store = s.store.clone();
    let service = param(&q, "service").map(str::to_string);
    Ok(Json(blocking(move || store.series(service.as_deref())).await?).into_response())
}

async fn profile(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[PROFILE_PARAMS, &["type"]])?;
    let mut r = query_profile(s.store.clone(), &q).await?;
    if param(&q, "type").is_some() {
        // `type=` becomes the profile's default sample type (what `go tool
        // pprof` shows first).
        let (i, _, _) = sample_type(&r, &q)?;
        r.profile.default_sample_type = r.profile.sample_type.get(i).map_or(0, |vt| vt.r#type);
    }
    let body = pprof::encode_gzip(&r.profile);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"profile.pb.gz\"".to_string(),
            ),
            (
                header::HeaderName::from_static("x-fathom-sample-types"),
                r.sample_types.clone(),
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Serialize)]
struct TopResponse {
    sample_type: String,
    unit: String,
    sample_types: String,
    total: i64,
    series: Vec<String>,
    windows: u64,
    functions: Vec<pprof::TopEntry>,
}

async fn top(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[PROFILE_PARAMS, &["type", "limit"]])?;
    let limit = match param(&q, "limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad(format!("limit={l:?}: expected a number")))?,
        None => DEFAULT_TOP_LIMIT,
    };
    let r = query_profile(s.store.clone(), &q).await?;
    let (i, name, unit) = sample_type(&r, &q)?;
    let (mut functions, total) = pprof::top(&r.profile, i);
    functions.truncate(limit);
    Ok(Json(TopResponse {
        sample_type: name,
        unit,
        sample_types: r.sample_types,
        total,
        series: r.series,
        windows: r.windows,
        functions,
    })
    .into_response())
}

/// Renders folded stacks as an interactive inferno SVG.
pub fn render_flamegraph(
    folded: &[(String, i64)],
    title: &str,
    count_name: &str,
    width: Option<usize>,
) -> Result<Vec<u8>, String> {
    let lines: Vec<String> = folded.iter().map(|(s, v)| format!("{s} {v}")).collect();
    let mut opt = inferno::flamegraph::Options::default();
    opt.title = title.to_string();
    opt.count_name = count_name.to_string();
    opt.hash = true;
    opt.image_width = width;
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut opt, lines.iter().map(String::as_str), &mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

async fn flamegraph(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[PROFILE_PARAMS, &["type", "width"]])?;
    let width = match param(&q, "width") {
        Some(w) => Some(
            w.parse::<usize>()
                .ok()
                .filter(|w| (100..=10_000).contains(w))
                .ok_or_else(|| ApiError::bad(format!("width={w:?}: expected 100..10000 pixels")))?,
        ),
        None => None,
    };
    let r = query_profile(s.store.clone(), &q).await?;
    let (i, name, unit) = sample_type(&r, &q)?;
    let folded = pprof::folded(&r.profile, i);
    if folded.is_empty() {
        return Err(ApiError::not_found(format!(
            "the profile has no {name} samples in this range"
        )));
    }
    let title = match r.series.as_slice() {
        [one] => one.clone(),
        many => format!(
            "{} ({} series)",
            param(&q, "service").unwrap_or_default(),
            many.len()
        ),
    };
    let svg = tokio::task::spawn_blocking(move || {
        render_flamegraph(&folded, &title, &format!("{name} ({unit})"), width)
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

#[derive(Serialize)]
struct TraceItem {
    trace_id: String,
    root_name: String,
    service: String,
    services: Vec<String>,
    start_unix_ms: f64,
    duration_ms: f64,
    span_count: u64,
    error: bool,
}

impl From<TraceSummary> for TraceItem {
    fn from(t: TraceSummary) -> Self {
        Self {
            start_unix_ms: t.start_unix_nano as f64 / 1e6,
            duration_ms: t.duration_nanos() as f64 / 1e6,
            trace_id: t.trace_id,
            root_name: t.root_name,
            service: t.service,
            services: t.services,
            span_count: t.span_count,
            error: t.error,
        }
    }
}

/// Traces, newest first: `service`, `operation`, `tags` (a JSON object of
/// strings), `minDuration`/`maxDuration` (e.g. `100ms`), `error=true`, a time
/// range, `limit` and `offset`. The body is the page; `X-Total-Count` says
/// how many traces match in all (`X-Total-Count-Exact: false` when counting
/// stopped early, the figure then being a lower bound).
async fn traces(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(
        &q,
        &[&[
            "service",
            "operation",
            "tags",
            "minDuration",
            "maxDuration",
            "error",
            "from",
            "until",
            "range",
            "limit",
            "offset",
            "sort",
        ]],
    )?;
    let sort = match param(&q, "sort") {
        Some(v) => TraceSort::parse(v).ok_or_else(|| {
            ApiError::bad(format!(
                "sort={v:?}: expected one of {}",
                TraceSort::NAMES.join(", ")
            ))
        })?,
        None => TraceSort::Newest,
    };
    let (from, until) = time_range(&q, SystemTime::now())?;
    let limit = match param(&q, "limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_TRACE_LIMIT).contains(l))
            .ok_or_else(|| ApiError::bad(format!("limit={l:?}: expected 1..{MAX_TRACE_LIMIT}")))?,
        None => DEFAULT_TRACE_LIMIT,
    };
    let offset = match param(&q, "offset") {
        Some(o) => o
            .parse::<usize>()
            .map_err(|_| ApiError::bad(format!("offset={o:?}: expected a number")))?,
        None => 0,
    };
    let duration = |name: &str| {
        param(&q, name)
            .map(|v| {
                parse_go_duration(v).ok_or_else(|| {
                    ApiError::bad(format!(
                        "{name}={v:?}: expected a duration such as 100ms or 1.5s"
                    ))
                })
            })
            .transpose()
    };
    let mut tags = Vec::new();
    if let Some(t) = param(&q, "tags") {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(t)
            .map_err(|e| ApiError::bad(format!("tags={t:?}: expected a JSON object ({e})")))?;
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            tags.push((k, v));
        }
    }
    let errors_only = match param(&q, "error") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad(format!(
                "error={v:?}: expected true or false"
            )));
        }
    };
    let search = TraceSearch {
        service: param(&q, "service").map(str::to_string),
        operation: param(&q, "operation").map(str::to_string),
        tags,
        min_duration: duration("minDuration")?,
        max_duration: duration("maxDuration")?,
        errors_only,
        from,
        until,
        limit,
        offset,
        sort,
    };
    let store = s.store.clone();
    let found = blocking(move || store.search_traces(&search)).await?;
    let items: Vec<TraceItem> = found.traces.into_iter().map(TraceItem::from).collect();
    let mut resp = Json(items).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::HeaderName::from_static("x-total-count"),
        header::HeaderValue::from(found.total),
    );
    h.insert(
        header::HeaderName::from_static("x-total-count-exact"),
        header::HeaderValue::from_static(if found.total_exact { "true" } else { "false" }),
    );
    Ok(resp)
}

async fn trace(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    only(&q, &[])?;
    let tid = trace_id_param(&id)?;
    let store = s.store.clone();
    let t = blocking(move || store.trace(tid))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("trace {id} is not stored")))?;
    Ok(Json(t).into_response())
}

/// A trace id from the path, or a 400 saying what is wrong with it.
fn trace_id_param(id: &str) -> Result<[u8; 16], ApiError> {
    parse_trace_id(id)
        .ok_or_else(|| ApiError::bad(format!("trace id {id:?}: expected 32 hexadecimal digits")))
}

/// The profile samples taken in a trace's spans.
#[derive(Serialize)]
struct TraceProfiles {
    trace_id: String,
    /// The range searched (unix ms): the trace's, widened by
    /// [`TRACE_PROFILE_MARGIN`].
    from_ms: u64,
    until_ms: u64,
    /// Per profile type with such samples, largest total first.
    types: Vec<SpanProfileTotals>,
}

/// `GET /ui/api/traces/{id}/profiles`: which of the trace's spans have
/// profile samples (`span_id` label of a span of the trace or of a
/// `pyroscope.profile.id` attribute's value, or `trace_id` label), and how
/// much, per profile type.
async fn trace_profiles(
    State(s): State<UiState>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    only(&q, &[])?;
    let tid = trace_id_param(&id)?;
    let store = s.store.clone();
    let r = blocking(move || {
        let Some(raw) = store.trace_raw(tid)? else {
            return Ok(None);
        };
        let ns = |n: u64| UNIX_EPOCH + Duration::from_nanos(n);
        let from = ns(raw.summary.start_unix_nano)
            .checked_sub(TRACE_PROFILE_MARGIN)
            .unwrap_or(UNIX_EPOCH);
        let until = ns(raw.summary.end_unix_nano) + TRACE_PROFILE_MARGIN;
        let ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        let trace_id = hex(&tid);
        let types = store.span_profile_totals(
            &raw.profile_span_ids(),
            Some(&trace_id),
            Some(from),
            Some(until),
        )?;
        Ok(Some(TraceProfiles {
            trace_id,
            from_ms: ms(from),
            until_ms: ms(until),
            types,
        }))
    })
    .await?
    .ok_or_else(|| ApiError::not_found(format!("trace {id} is not stored")))?;
    Ok(Json(r).into_response())
}

/// One metric series of the UI: its current value (when the registry still
/// has it) or its last recorded one, and its history.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricRow {
    pub name: String,
    pub kind: &'static str,
    pub help: String,
    /// From the name's suffix: `s`, `ms`, `bytes`, `ratio`, … or empty.
    pub unit: &'static str,
    pub labels: Vec<(String, String)>,
    /// Counter/gauge value; a histogram's sum.
    pub value: f64,
    pub count: Option<u64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Whether the registry still holds the series (false: it was not
    /// updated for the staleness period; its history remains).
    pub current: bool,
    /// Time of the last point (unix ms).
    pub last_ms: u64,
    pub points: Vec<crate::metrics_history::HistoryPoint>,
}

pub fn histogram_quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * total as f64;
    let mut prev_bound = 0.0f64;
    let mut prev_count = 0u64;
    for (i, &(bound, count)) in buckets.iter().enumerate() {
        if count as f64 >= rank {
            if bound.is_infinite() {
                return Some(if i == 0 { 0.0 } else { prev_bound });
            }
            let lower = if i == 0 { bound.min(0.0) } else { prev_bound };
            let in_bucket = count.saturating_sub(prev_count) as f64;
            if in_bucket == 0.0 {
                return Some(bound);
            }
            return Some(lower + (bound - lower) * (rank - prev_count as f64) / in_bucket);
        }
        prev_bound = bound;
        prev_count = count;
    }
    Some(prev_bound)
}

/// The rows of the series in `history` that match, the current values
/// taken from `current` (a registry snapshot) when it has the series.
pub fn metric_rows(
    current: &[MetricPoint],
    history: Vec<crate::metrics_history::SeriesHistory>,
) -> Vec<MetricRow> {
    type Labels = [(String, String)];
    let now: HashMap<(&str, &Labels), &MetricPoint> = current
        .iter()
        .map(|p| ((p.name.as_str(), p.labels.as_slice()), p))
        .collect();
    history
        .into_iter()
        .map(|h| {
            let cur = now.get(&(h.name.as_str(), h.labels.as_slice())).copied();
            let last = h.points.last().copied();
            let hist = h.kind == "histogram";
            let (value, count, p50, p99) = match cur {
                Some(p) => (
                    p.value,
                    hist.then_some(p.count),
                    hist.then(|| histogram_quantile(0.5, &p.buckets)).flatten(),
                    hist.then(|| histogram_quantile(0.99, &p.buckets)).flatten(),
                ),
                None => (
                    last.map_or(0.0, |p| p.v),
                    None,
                    last.and_then(|p| p.p50),
                    last.and_then(|p| p.p99),
                ),
            };
            MetricRow {
                kind: h.kind,
                unit: h.unit,
                current: cur.is_some(),
                last_ms: last.map_or(0, |p| p.t),
                name: h.name,
                help: h.help,
                labels: h.labels,
                value,
                count,
                p50,
                p99,
                points: h.points,
            }
        })
        .collect()
}

/// Metric series with their history: `service` (the `service_name` label),
/// `name` (a part of the metric name), a time range.
async fn metrics(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[&["service", "name", "from", "until", "range"]])?;
    let (from, until) = time_range(&q, SystemTime::now())?;
    let view = s.metrics.clone();
    let points = tokio::task::spawn_blocking(move || view.snapshot())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    s.history.record(points.clone(), SystemTime::now());
    let ms = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    let history = s.history.query(
        param(&q, "service"),
        param(&q, "name"),
        from.map_or(0, ms),
        until.map_or(u64::MAX, ms),
    );
    Ok(Json(metric_rows(&points, history)).into_response())
}

#[derive(Serialize)]
struct Endpoint {
    what: &'static str,
    address: String,
}

#[derive(Serialize)]
struct StatusResponse {
    store_path: String,
    retention: String,
    profile_series: usize,
    spans: u64,
    metric_series: usize,
    /// Services of the stored profiles and traces, and of the metrics.
    profile_services: Vec<String>,
    trace_services: Vec<String>,
    metric_services: Vec<String>,
    /// Where to send data (the addresses bound; empty until then).
    endpoints: Vec<Endpoint>,
}

/// What is stored and where to send data (the UI's onboarding).
async fn status(State(s): State<UiState>, Query(q): Params) -> Result<Response, ApiError> {
    only(&q, &[])?;
    let store = s.store.clone();
    let (series, spans, trace_services) = blocking(move || {
        Ok((
            store.series(None)?,
            store.span_count()?,
            store.trace_services()?,
        ))
    })
    .await?;
    let mut profile_services: Vec<String> = series.iter().map(|s| s.service.clone()).collect();
    profile_services.sort();
    profile_services.dedup();
    let mut endpoints = Vec::new();
    if let Some(a) = s.addrs.get() {
        if let Some(g) = a.otlp_grpc {
            endpoints.push(Endpoint {
                what: "OTLP gRPC (traces, metrics), Pyroscope push.v1 over gRPC",
                address: g.to_string(),
            });
        }
        if let Some(h) = a.otlp_http {
            endpoints.push(Endpoint {
                what: "OTLP HTTP (/v1/traces, /v1/metrics)",
                address: h.to_string(),
            });
        }
        if let Some(h) = a.http {
            endpoints.push(Endpoint {
                what: "HTTP: Pyroscope push (/push.v1.PusherService/Push, /ingest), OTLP HTTP, this UI",
                address: h.to_string(),
            });
        }
    }
    Ok(Json(StatusResponse {
        store_path: s.store.path().display().to_string(),
        retention: humantime::format_duration(s.store.retention()).to_string(),
        profile_series: series.len(),
        spans,
        metric_series: s.history.query(None, None, 0, u64::MAX).len(),
        profile_services,
        trace_services,
        metric_services: s.history.services(),
        endpoints,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use crate::model::MetricKind;
    use crate::store::tests::{SpanSpec, config, merged, spans};

    struct Points(Vec<MetricPoint>);
    impl MetricsView for Points {
        fn snapshot(&self) -> Vec<MetricPoint> {
            self.0.clone()
        }
    }

    fn app(dir: &std::path::Path, metrics: Vec<MetricPoint>) -> (Router, Arc<Store>) {
        let store = Arc::new(Store::open(&config(dir)).unwrap());
        store
            .put_profiles(&[
                merged("api", "p1", 100, &[(&["main", "handle", "parse_json"], 6)]),
                merged("api", "p2", 110, &[(&["main", "handle", "write_db"], 3)]),
            ])
            .unwrap();
        store
            .put_spans(&spans(
                "api",
                &[
                    SpanSpec {
                        trace: 7,
                        id: 1,
                        parent: None,
                        name: "GET /users",
                        start_ms: 1_000,
                        dur_ms: 20,
                        error: false,
                    },
                    SpanSpec {
                        trace: 7,
                        id: 2,
                        parent: Some(1),
                        name: "SELECT users",
                        start_ms: 1_002,
                        dur_ms: 10,
                        error: true,
                    },
                ],
            ))
            .unwrap();
        let r = router(UiState::new(store.clone(), Arc::new(Points(metrics))));
        (r, store)
    }

    async fn get(r: &Router, uri: &str) -> (StatusCode, String, Vec<u8>) {
        let resp = r
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (
            status,
            ct,
            to_bytes(resp.into_body(), 64 << 20).await.unwrap().to_vec(),
        )
    }

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn quantiles_from_cumulative_buckets() {
        let b = [(0.1, 10), (0.5, 30), (1.0, 40), (f64::INFINITY, 40)];
        // rank 20 is halfway through the (0.1, 0.5] bucket.
        assert!((histogram_quantile(0.5, &b).unwrap() - 0.3).abs() < 1e-12);
        // rank 39.6 lies in (0.5, 1.0]: 0.5 + 0.5 * 9.6 / 10.
        assert!((histogram_quantile(0.99, &b).unwrap() - 0.98).abs() < 1e-12);
        // rank 5 in the first bucket: 0 + 0.1 * 5 / 10.
        assert!((histogram_quantile(0.125, &b).unwrap() - 0.05).abs() < 1e-12);
        // Beyond the last finite bound: that bound.
        let b = [(1.0, 1), (f64::INFINITY, 10)];
        assert_eq!(histogram_quantile(0.99, &b), Some(1.0));
        assert_eq!(
            histogram_quantile(0.5, &[(1.0, 0), (f64::INFINITY, 0)]),
            None
        );
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[tokio::test]
    async fn page_and_assets_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = app(dir.path(), Vec::new());
        let (s, ct, body) = get(&r, "/").await;
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with("text/html"));
        let html = String::from_utf8(body).unwrap();
        assert!(html.contains("/ui/app.js") && html.contains("/ui/style.css"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external resources"
        );
        let (s, ct, _) = get(&r, "/ui/app.js").await;
        assert_eq!(
            (s, ct.starts_with("text/javascript")),
            (StatusCode::OK, true)
        );
        let (s, ct, _) = get(&r, "/ui/style.css").await;
        assert_eq!((s, ct.starts_with("text/css")), (StatusCode::OK, true));
    }

    #[tokio::test]
    async fn profile_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = app(dir.path(), Vec::new());
        let (s, _, body) = get(&r, "/ui/api/services").await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&body);
        assert_eq!(v[0]["name"], "api");
        assert_eq!(v[0]["profile_series"], 2);
        assert_eq!(v[0]["has_traces"], true);

        let (_, _, body) = get(&r, "/ui/api/series?service=api").await;
        assert_eq!(json(&body).as_array().unwrap().len(), 2);

        // All series of the service: both stacks; `type=samples` counts.
        let (s, _, body) = get(&r, "/ui/api/top?service=api&name=process_cpu&type=samples").await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let v = json(&body);
        assert_eq!(v["total"], 9);
        assert_eq!(v["unit"], "count");
        assert_eq!(v["functions"][0]["name"], "parse_json");
        assert_eq!(v["functions"][0]["flat"], 6);
        // Default sample type (the last, cpu nanoseconds).
        let (_, _, body) = get(&r, "/ui/api/top?service=api").await;
        assert_eq!(json(&body)["total"], 90_000_000);
        // One series, by its selector.
        let sel = "process_cpu{pod=\"p2\",service_name=\"api\"}";
        let uri = format!("/ui/api/top?series={}&type=samples", urlencode(sel));
        let (_, _, body) = get(&r, &uri).await;
        assert_eq!(json(&body)["functions"][0]["name"], "write_db");

        // `series=` is a label selector: one matcher selects p2 only; `=~`
        // both; `/api/profile` is still there for `go tool pprof` URLs.
        for (sel, want) in [
            (r#"{pod="p2"}"#, vec!["main;handle;write_db"]),
            (
                r#"process_cpu{pod=~"p[12]"}"#,
                vec!["main;handle;parse_json", "main;handle;write_db"],
            ),
        ] {
            let uri = format!("/api/profile?series={}", urlencode(sel));
            let (s, _, body) = get(&r, &uri).await;
            assert_eq!(s, StatusCode::OK, "{sel}");
            let p = pprof::decode(&body).unwrap();
            let stacks: Vec<String> = pprof::folded(&p, 0).into_iter().map(|x| x.0).collect();
            assert_eq!(stacks, want, "{sel}");
        }
        let (s, _, _) = get(
            &r,
            &format!("/ui/api/profile?series={}", urlencode(r#"{pod="p3"}"#)),
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // type= becomes the default sample type of the download.
        let (_, _, body) = get(&r, "/ui/api/profile?service=api&type=samples").await;
        let p = pprof::decode(&body).unwrap();
        assert_eq!(p.string_table[p.default_sample_type as usize], "samples");

        let (s, ct, body) = get(
            &r,
            "/ui/api/flamegraph.svg?service=api&width=800&seconds=30",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(ct, "image/svg+xml");
        let svg = String::from_utf8(body).unwrap();
        assert!(svg.contains("<svg") && svg.contains("parse_json") && svg.contains("write_db"));
        assert!(svg.contains("width=\"800\""));

        let (s, ct, body) = get(&r, "/ui/api/profile?service=api&seconds=30").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(ct, "application/octet-stream");
        assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip");
        let p = pprof::decode(&body).unwrap();
        assert_eq!(
            pprof::folded(&p, 0),
            [
                ("main;handle;parse_json".to_string(), 6),
                ("main;handle;write_db".to_string(), 3)
            ]
        );
        // Time range: only the first window (starts at 100 s).
        let (_, _, body) = get(&r, "/ui/api/profile?service=api&from=0&until=105000").await;
        let p = pprof::decode(&body).unwrap();
        assert_eq!(
            pprof::folded(&p, 0),
            [("main;handle;parse_json".to_string(), 6)]
        );
    }

    #[tokio::test]
    async fn bad_queries_are_400_unknown_is_404() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = app(dir.path(), Vec::new());
        for (uri, needle) in [
            ("/ui/api/profile", "give series="),
            (
                "/ui/api/profile?service=api&range=forever",
                "range=\"forever\"",
            ),
            (
                "/ui/api/profile?service=api&from=yesterday",
                "from=\"yesterday\"",
            ),
            (
                "/ui/api/profile?service=api&from=2000&until=1000",
                "from is after until",
            ),
            ("/ui/api/top?service=api&type=alloc", "type=\"alloc\""),
            ("/ui/api/top?service=api&limit=x", "limit=\"x\""),
            ("/ui/api/flamegraph.svg?service=api&width=5", "width=\"5\""),
            ("/ui/api/traces?limit=0", "limit=\"0\""),
            ("/ui/api/traces/xyz", "32 hexadecimal"),
            (
                "/ui/api/top?service=api&unknown=1",
                "unknown query parameter unknown",
            ),
            (
                "/ui/api/traces?service=api&lookback=1h",
                "unknown query parameter lookback",
            ),
            ("/ui/api/traces?minDuration=fast", "minDuration=\"fast\""),
            ("/ui/api/traces?tags=x", "tags="),
            ("/ui/api/services?x=1", "accepted: none"),
            ("/ui/api/traces?sort=random", "sort=\"random\""),
            (
                "/ui/api/metrics?service=api&x=1",
                "unknown query parameter x",
            ),
            ("/ui/api/profile?series=%7Bpod%3D", "series: label selector"),
        ] {
            let (s, ct, body) = get(&r, uri).await;
            let body = String::from_utf8(body).unwrap();
            assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {body}");
            assert!(ct.starts_with("text/plain"));
            assert!(body.contains(needle), "{uri}: {body}");
        }
        let (s, _, body) = get(&r, &format!("/ui/api/traces/{}", "ab".repeat(16))).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(String::from_utf8(body).unwrap().contains("not stored"));
        let (s, _, _) = get(&r, "/ui/api/profile?service=nobody").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn trace_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = app(dir.path(), Vec::new());
        let (s, _, body) = get(&r, "/ui/api/traces?service=api&limit=5").await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&body);
        assert_eq!(v.as_array().unwrap().len(), 1);
        assert_eq!(v[0]["root_name"], "GET /users");
        assert_eq!(v[0]["span_count"], 2);
        assert_eq!(v[0]["error"], true);
        assert_eq!(v[0]["duration_ms"], 20.0);
        assert_eq!(v[0]["start_unix_ms"], 1000.0);
        let id = v[0]["trace_id"].as_str().unwrap().to_string();
        let (_, _, body) = get(&r, "/ui/api/traces?service=other").await;
        assert_eq!(json(&body).as_array().unwrap().len(), 0);

        let (s, _, body) = get(&r, &format!("/ui/api/traces/{id}")).await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&body);
        let spans = v["spans"].as_array().unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[1]["name"], "SELECT users");
        assert_eq!(spans[1]["parent_span_id"], spans[0]["span_id"]);
        assert_eq!(spans[1]["offset_ms"], 2.0);
        assert_eq!(spans[1]["status"], "error");
        assert_eq!(spans[1]["kind"], "server");
    }

    #[tokio::test]
    async fn trace_search_counts_pages_and_filters() {
        let dir = tempfile::tempdir().unwrap();
        let (r, store) = app(dir.path(), Vec::new());
        let specs: Vec<SpanSpec<'_>> = (0..5u8)
            .map(|i| SpanSpec {
                trace: 20 + i,
                id: 1,
                parent: None,
                name: if i % 2 == 0 { "GET /a" } else { "GET /b" },
                start_ms: 5_000 + u64::from(i) * 1_000,
                dur_ms: 10 * (u64::from(i) + 1),
                error: i == 4,
            })
            .collect();
        store.put_spans(&spans("web", &specs)).unwrap();
        let page = |uri: &str| {
            let r = r.clone();
            let uri = uri.to_string();
            async move {
                let resp = r
                    .oneshot(Request::get(&uri).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK, "{uri}");
                let total = resp.headers()["x-total-count"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let body = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                let names: Vec<String> = json(&body)
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| {
                        format!(
                            "{}@{}",
                            t["root_name"].as_str().unwrap(),
                            t["start_unix_ms"]
                        )
                    })
                    .collect();
                (total, names)
            }
        };
        // Newest first, 2 per page, 5 in all.
        let (total, names) = page("/ui/api/traces?service=web&limit=2&offset=2").await;
        assert_eq!(total, "5");
        assert_eq!(names, ["GET /a@7000.0", "GET /b@6000.0"]);
        let (total, names) = page("/ui/api/traces?service=web&operation=GET%20/a").await;
        assert_eq!((total.as_str(), names.len()), ("3", 3));
        let (total, names) =
            page("/ui/api/traces?service=web&minDuration=25ms&maxDuration=45ms").await;
        assert_eq!(total, "2", "{names:?}");
        let (total, names) = page("/ui/api/traces?service=web&error=true").await;
        assert_eq!(
            (total.as_str(), names),
            ("1", vec!["GET /a@9000.0".to_string()])
        );
        let tags = urlencode(r#"{"http.request.method":"GET"}"#);
        let (total, _) = page(&format!("/ui/api/traces?service=web&tags={tags}")).await;
        assert_eq!(total, "5");
        let tags = urlencode(r#"{"http.request.method":"POST"}"#);
        let (total, _) = page(&format!("/ui/api/traces?service=web&tags={tags}")).await;
        assert_eq!(total, "0");
        // Sorted: longest first (50 ms), shortest first; paged after sorting.
        let (total, names) = page("/ui/api/traces?service=web&sort=longest&limit=2").await;
        assert_eq!(
            (total.as_str(), names),
            (
                "5",
                vec!["GET /a@9000.0".to_string(), "GET /b@8000.0".to_string()]
            )
        );
        let (_, names) = page("/ui/api/traces?service=web&sort=shortest&limit=1&offset=1").await;
        assert_eq!(names, ["GET /b@6000.0"]);
        let (_, names) = page("/ui/api/traces?sort=most_spans&limit=1").await;
        assert_eq!(names, ["GET /users@1000.0"]);
        let (_, names) = page("/ui/api/traces?service=web&sort=oldest&limit=1").await;
        assert_eq!(names, ["GET /a@5000.0"]);
        // Every service: api's trace too.
        let (total, _) = page("/ui/api/traces").await;
        assert_eq!(total, "6");
    }

    #[tokio::test]
    async fn metrics_table_with_histogram_quantiles() {
        let dir = tempfile::tempdir().unwrap();
        let point = |name: &str, kind, value, count, buckets: Vec<(f64, u64)>| MetricPoint {
            name: name.into(),
            help: "h".into(),
            kind,
            labels: vec![("service_name".into(), "api".into())],
            value,
            count,
            buckets,
            timestamp: SystemTime::now(),
        };
        let (r, _) = app(
            dir.path(),
            vec![
                point(
                    "fathom_tcp_retransmits_total",
                    MetricKind::Counter,
                    3.0,
                    0,
                    vec![],
                ),
                point(
                    "http_server_request_duration_seconds",
                    MetricKind::Histogram,
                    4.0,
                    40,
                    vec![(0.1, 10), (0.5, 30), (1.0, 40), (f64::INFINITY, 40)],
                ),
            ],
        );
        let (s, _, body) = get(&r, "/ui/api/metrics").await;
        assert_eq!(s, StatusCode::OK);
        let v = json(&body);
        assert_eq!(v[0]["name"], "fathom_tcp_retransmits_total");
        assert_eq!(v[0]["value"], 3.0);
        assert!(v[0]["p50"].is_null());
        assert_eq!(v[1]["kind"], "histogram");
        assert_eq!(v[1]["count"], 40);
        assert_eq!(v[1]["value"], 4.0);
        assert!((v[1]["p50"].as_f64().unwrap() - 0.3).abs() < 1e-12);
        assert!((v[1]["p99"].as_f64().unwrap() - 0.98).abs() < 1e-12);
        assert_eq!(v[1]["labels"][0][0], "service_name");
    }

    fn urlencode(s: &str) -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
}
