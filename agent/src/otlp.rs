//! What every signal's OpenTelemetry output shares: the resource of a
//! process (service, pid, container, pod, node; filled from `/proc` by
//! [`crate::process_meta::process_resource`]), key-values, and the clock.
//! Pure: no I/O.
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    resource::v1::Resource,
};

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
