//! How well user stacks are walked, per executable: the share of samples
//! unwound to the outermost frame, truncated at the frame limit, or stopped
//! early (and why). Counted from the status the kernel keeps per sample; in
//! the agent's logs and, with the embedded collector, on `/metrics` as
//! `fathom_agent_unwind_samples_total{executable, status}`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use fathom_common::unwind::status;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric, number_data_point,
    },
    resource::v1::Resource,
};

/// Executables tracked; samples of others are counted under `other`.
const MAX_EXECUTABLES: usize = 512;

/// Samples per executable and walk status, since start.
#[derive(Clone, Debug)]
pub struct UnwindStats {
    by_executable: BTreeMap<String, [u64; status::COUNT as usize]>,
    since: SystemTime,
}

impl Default for UnwindStats {
    fn default() -> Self {
        Self {
            by_executable: BTreeMap::new(),
            since: SystemTime::now(),
        }
    }
}

impl UnwindStats {
    pub fn add(&mut self, executable: &str, walk_status: u32, samples: u64) {
        let index = if walk_status < status::COUNT {
            walk_status as usize
        } else {
            return;
        };
        let name = if self.by_executable.contains_key(executable)
            || self.by_executable.len() < MAX_EXECUTABLES
        {
            executable
        } else {
            "other"
        };
        self.by_executable.entry(name.to_owned()).or_default()[index] += samples;
    }

    /// Samples of `executable` with `walk_status`.
    pub fn get(&self, executable: &str, walk_status: u32) -> u64 {
        self.by_executable
            .get(executable)
            .and_then(|counts| counts.get(walk_status as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The `top` executables by samples, each with its statuses' shares:
    /// `python3 n=1200 complete=97.5% no_unwind_info=2.5%; ...`.
    pub fn summary(&self, top: usize) -> String {
        let mut rows: Vec<_> = self
            .by_executable
            .iter()
            .map(|(name, counts)| (name, counts, counts.iter().sum::<u64>()))
            .filter(|(_, _, total)| *total > 0)
            .collect();
        rows.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
        let mut out = Vec::new();
        for (name, counts, total) in rows.into_iter().take(top) {
            let mut line = format!("{name} n={total}");
            for (s, &n) in counts.iter().enumerate() {
                if n > 0 {
                    let share = n as f64 * 100.0 / total as f64;
                    line.push_str(&format!(" {}={share:.1}%", status::name(s as u32)));
                }
            }
            out.push(line);
        }
        out.join("; ")
    }

    /// The counters as one cumulative OTLP sum, for the collector's
    /// Prometheus endpoint.
    pub fn to_otlp(&self, node: &str) -> ExportMetricsServiceRequest {
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        };
        let (start, now) = (nanos(self.since), nanos(SystemTime::now()));
        let text = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        };
        let mut points = Vec::new();
        for (name, counts) in &self.by_executable {
            for (s, &n) in counts.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                points.push(NumberDataPoint {
                    attributes: vec![
                        text("executable", name),
                        text("status", status::name(s as u32)),
                    ],
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    value: Some(number_data_point::Value::AsInt(n as i64)),
                    ..Default::default()
                });
            }
        }
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        text("service.name", "fathom-agent"),
                        text("host.name", node),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "fathom-agent".into(),
                        ..Default::default()
                    }),
                    metrics: vec![Metric {
                        name: "fathom.agent.unwind.samples".into(),
                        description:
                            "CPU samples by executable and how their user stack was walked".into(),
                        unit: "{sample}".into(),
                        data: Some(metric::Data::Sum(Sum {
                            data_points: points,
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_per_executable() {
        let mut stats = UnwindStats::default();
        stats.add("python3", status::COMPLETE, 97);
        stats.add("python3", status::NO_UNWIND_INFO, 3);
        stats.add("nginx", status::TRUNCATED, 1);
        stats.add("nginx", 99, 5); // unknown status: ignored
        assert_eq!(
            stats.summary(5),
            "python3 n=100 complete=97.0% no_unwind_info=3.0%; nginx n=1 truncated=100.0%"
        );
        assert_eq!(
            stats.summary(1),
            "python3 n=100 complete=97.0% no_unwind_info=3.0%"
        );
        let request = stats.to_otlp("node-1");
        let metric = &request.resource_metrics[0].scope_metrics[0].metrics[0];
        let Some(metric::Data::Sum(sum)) = &metric.data else {
            panic!("not a sum");
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 3);
        let total: i64 = sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsInt(n)) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 101);
    }

    #[test]
    fn executables_are_bounded() {
        let mut stats = UnwindStats::default();
        for i in 0..MAX_EXECUTABLES + 10 {
            stats.add(&format!("exe{i}"), status::COMPLETE, 1);
        }
        assert_eq!(stats.by_executable.len(), MAX_EXECUTABLES + 1);
        assert_eq!(stats.get("other", status::COMPLETE), 10);
    }
}
