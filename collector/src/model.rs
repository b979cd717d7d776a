//! What flows through the collector: profile series labels, decoded profiles
//! (raw and merged), and a view of current metric values.
use std::time::{Duration, SystemTime};

use crate::proto::pprof::Profile;

/// Most label names a series may have (Pyroscope's limit).
pub const MAX_LABEL_NAMES: usize = 30;
/// Label names Pyroscope requires on every series.
pub const NAME_LABEL: &str = "__name__";
pub const SERVICE_LABEL: &str = "service_name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("label {0:?} is required")]
    Missing(&'static str),
    #[error("label {0:?} appears twice")]
    Duplicate(String),
    #[error("{0} label names, at most {MAX_LABEL_NAMES} are allowed")]
    TooMany(usize),
    #[error("label name {0:?} is invalid (letters, digits, '_', not starting with a digit)")]
    InvalidName(String),
    #[error("label {name:?} has an empty value")]
    EmptyValue { name: String },
}

/// The labels of one profile series, normalized the way Pyroscope does it:
/// dots in names become underscores, sorted by name, no duplicates,
/// `__name__` and `service_name` present.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesLabels(Vec<(String, String)>);

impl SeriesLabels {
    pub fn new<I, K, V>(pairs: I) -> Result<Self, LabelError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut out: Vec<(String, String)> = Vec::new();
        for (name, value) in pairs {
            let name: String = name.into().replace('.', "_");
            let value: String = value.into();
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(LabelError::InvalidName(name));
            }
            if value.is_empty() {
                return Err(LabelError::EmptyValue { name });
            }
            out.push((name, value));
        }
        out.sort();
        if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(LabelError::Duplicate(w[0].0.clone()));
        }
        if out.len() > MAX_LABEL_NAMES {
            return Err(LabelError::TooMany(out.len()));
        }
        let labels = Self(out);
        for required in [NAME_LABEL, SERVICE_LABEL] {
            if labels.get(required).is_none() {
                return Err(LabelError::Missing(required));
            }
        }
        Ok(labels)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    /// `service_name`.
    pub fn service(&self) -> &str {
        self.get(SERVICE_LABEL).unwrap_or_default()
    }

    /// `__name__`, e.g. `process_cpu`.
    pub fn profile_name(&self) -> &str {
        self.get(NAME_LABEL).unwrap_or_default()
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// Only the labels every series must keep (used when a series is folded
    /// into its service because of the cardinality bound).
    pub fn essential(&self) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(n, _)| n == NAME_LABEL || n == SERVICE_LABEL)
                .cloned()
                .collect(),
        )
    }

    /// Prometheus-style selector, e.g. `process_cpu{service_name="nginx"}`:
    /// a stable key for storage and display.
    pub fn selector(&self) -> String {
        let mut s = self.profile_name().to_string();
        s.push('{');
        let mut first = true;
        for (n, v) in &self.0 {
            if n == NAME_LABEL {
                continue;
            }
            if !first {
                s.push(',');
            }
            first = false;
            s.push_str(n);
            s.push_str("=\"");
            for c in v.chars() {
                match c {
                    '"' => s.push_str("\\\""),
                    '\\' => s.push_str("\\\\"),
                    '\n' => s.push_str("\\n"),
                    c => s.push(c),
                }
            }
            s.push('"');
        }
        s.push('}');
        s
    }
}

/// A profile as received: validated, decoded (no longer gzipped).
#[derive(Clone, Debug)]
pub struct RawProfile {
    pub labels: SeriesLabels,
    pub profile: Profile,
    pub received: SystemTime,
}

/// All profiles of one series received in one aggregation window, merged.
#[derive(Clone, Debug)]
pub struct MergedProfile {
    pub labels: SeriesLabels,
    pub window_start: SystemTime,
    pub window: Duration,
    /// How many received profiles went into this one.
    pub inputs: u64,
    pub profile: Profile,
}

/// The kind of a metric point, as Prometheus sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One current value of a metric series (what `/metrics` exposes and the UI
/// shows).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricPoint {
    /// Prometheus name (OTLP name with `.` → `_`, unit/`_total` suffixes).
    pub name: String,
    pub help: String,
    pub kind: MetricKind,
    /// Sorted by name; resource attributes included.
    pub labels: Vec<(String, String)>,
    /// Counter/gauge value, or a histogram's sum.
    pub value: f64,
    /// Histograms: the count and cumulative buckets `(upper bound, count)`,
    /// the last bound being `+Inf`.
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
    pub timestamp: SystemTime,
}

/// Read access to the current metric values, for the UI.
pub trait MetricsView: Send + Sync {
    fn snapshot(&self) -> Vec<MetricPoint>;
}

/// A view with no metrics (no registry configured, and tests).
pub struct NullMetricsView;

impl MetricsView for NullMetricsView {
    fn snapshot(&self) -> Vec<MetricPoint> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn labels_follow_pyroscope_rules() {
        let l = SeriesLabels::new([
            ("service_name", "api"),
            ("__name__", "process_cpu"),
            ("k8s.pod.name", "api-1"),
        ])
        .unwrap();
        assert_eq!(l.service(), "api");
        assert_eq!(l.get("k8s_pod_name"), Some("api-1"));
        assert_eq!(
            l.selector(),
            r#"process_cpu{k8s_pod_name="api-1",service_name="api"}"#
        );
        assert_eq!(
            SeriesLabels::new([("__name__", "x")]),
            Err(LabelError::Missing("service_name"))
        );
        assert_eq!(
            SeriesLabels::new([
                ("__name__", "x"),
                ("service_name", "a"),
                ("service_name", "b")
            ]),
            Err(LabelError::Duplicate("service_name".into()))
        );
        assert!(matches!(
            SeriesLabels::new([("__name__", "x"), ("service_name", "a"), ("1a", "b")]),
            Err(LabelError::InvalidName(_))
        ));
        let many: Vec<(String, String)> = (0..31).map(|i| (format!("l{i}"), "v".into())).collect();
        assert!(matches!(
            SeriesLabels::new(many),
            Err(LabelError::TooMany(31))
        ));
    }
}
