//! What every signal's OpenTelemetry output shares: the resource of a
//! process (service, pid, container, pod, node), key-values, and the clock.
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    resource::v1::Resource,
};

use crate::process_meta::ProcessMeta;

/// The resource of a process, as the caller knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceInfo {
    /// `service.name`.
    pub service_name: String,
    /// `process.pid`.
    pub pid: Option<u32>,
    /// `process.executable.name`.
    pub executable_name: Option<String>,
    /// `container.id`.
    pub container_id: Option<String>,
    /// More string attributes (`service.namespace`, `k8s.*`, `host.name`).
    pub extra: Vec<(String, String)>,
}

impl ResourceInfo {
    /// Whether it carries a pod (`k8s.pod.name`).
    pub fn has_pod(&self) -> bool {
        self.extra.iter().any(|(k, _)| k == "k8s.pod.name")
    }

    /// As an OTLP resource.
    pub fn to_otlp(&self) -> Resource {
        let mut attributes = vec![kv_str("service.name", &self.service_name)];
        if let Some(pid) = self.pid {
            attributes.push(kv_int("process.pid", i64::from(pid)));
        }
        if let Some(exe) = &self.executable_name {
            attributes.push(kv_str("process.executable.name", exe));
        }
        if let Some(id) = &self.container_id {
            attributes.push(kv_str("container.id", id));
        }
        for (k, v) in &self.extra {
            attributes.push(kv_str(k, v));
        }
        Resource {
            attributes,
            ..Resource::default()
        }
    }
}

/// The OTel resource of a process's spans and metrics: `service.name`
/// (`OTEL_SERVICE_NAME`, else the pod's `app.kubernetes.io/name`, else its
/// owner workload, else the executable), `process.pid`,
/// `process.executable.name`, `container.id`, `host.name`, and the pod's
/// `k8s.*` attributes when the Kubernetes metadata knows the container.
/// `None` (the process is gone): `unknown_service` with the pid.
pub fn process_resource(meta: Option<&ProcessMeta>, pid: u32, node: &str) -> ResourceInfo {
    let mut extra = vec![("host.name".to_string(), node.to_string())];
    match meta {
        Some(m) => {
            let pod = m.pod();
            if let Some(pod) = &pod {
                extra.extend(
                    pod.otel_attributes()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v)),
                );
            }
            ResourceInfo {
                service_name: m.service_name_in(pod.as_deref()),
                pid: Some(pid),
                executable_name: Some(m.executable_name.clone()),
                container_id: m.container_id.clone(),
                extra,
            }
        }
        None => ResourceInfo {
            service_name: "unknown_service".into(),
            pid: Some(pid),
            executable_name: None,
            container_id: None,
            extra,
        },
    }
}

/// This machine's name (the `node` label).
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub fn kv_str(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..KeyValue::default()
    }
}

pub fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

pub fn kv_bool(key: &str, value: bool) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::BoolValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// Unix time in nanoseconds.
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
