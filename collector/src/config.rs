//! The collector's configuration: one typed struct with defaults, read from a
//! TOML file, then overridden by flags and their `FATHOM_*` environment
//! variables ([`CollectorArgs`], shared by `fathom-collector` and the agent's
//! embedded collector). The OTLP exporter also honours the standard
//! `OTEL_EXPORTER_OTLP_*` variables.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CollectorConfig {
    pub listen: ListenConfig,
    pub auth: AuthConfig,
    /// TLS on every ingest endpoint when set.
    pub tls: Option<TlsConfig>,
    pub queues: QueueConfig,
    pub aggregation: AggregationConfig,
    pub store: StoreConfig,
    pub pyroscope: Option<PyroscopeConfig>,
    pub otlp: Option<OtlpExporterConfig>,
}

/// Where to listen; `None` turns an endpoint off. Port 0 picks a free port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// OTLP gRPC (TraceService, MetricsService) and Pyroscope's push
    /// (`push.v1.PusherService`) over gRPC; its connect protocol is on
    /// `http`.
    pub otlp_grpc: Option<SocketAddr>,
    /// OTLP HTTP: `/v1/traces`, `/v1/metrics` (protobuf or JSON).
    pub otlp_http: Option<SocketAddr>,
    /// Pyroscope-compatible push (`/push.v1.PusherService/Push`, `/ingest`),
    /// Prometheus `/metrics`, the UI and its API.
    pub http: Option<SocketAddr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            otlp_grpc: Some(SocketAddr::from(([0, 0, 0, 0], 4317))),
            otlp_http: Some(SocketAddr::from(([0, 0, 0, 0], 4318))),
            http: Some(SocketAddr::from(([0, 0, 0, 0], 4040))),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// When set, every ingest request must carry `Authorization: Bearer <token>`.
    /// The UI, `/metrics` and the read API stay open (bind them to a private
    /// address, or put them behind a proxy).
    pub bearer_token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Profiles waiting for the aggregator.
    pub profiles: usize,
    /// Span export requests waiting for the batcher.
    pub spans: usize,
    /// Metric export requests waiting for the registry and exporters.
    pub metrics: usize,
    /// Batches waiting for each sink.
    pub sink: usize,
    /// Largest accepted request body (bytes, after decompression).
    pub max_request_bytes: usize,
    /// Bound of everything waiting in the ingest queues, in encoded (wire)
    /// bytes; decoded it takes about 4× that in memory. Beyond it clients are
    /// told to retry (429, gRPC `UNAVAILABLE` with `RetryInfo`).
    pub max_queued_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            profiles: 1024,
            spans: 1024,
            metrics: 256,
            sink: 4,
            max_request_bytes: 16 << 20,
            max_queued_bytes: 16 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationConfig {
    /// Profiles of one series are merged per window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Distinct profile series per window; beyond it, new series are folded
    /// into `{__name__, service_name}` (counted).
    pub max_series: usize,
    /// A series with a label value longer than this is folded into
    /// `{__name__, service_name}` (counted as folded).
    pub max_label_value_len: usize,
    /// Spans are forwarded in batches of at most this many...
    pub span_batch_size: usize,
    /// ...or after this long.
    #[serde(with = "humantime_serde")]
    pub span_batch_timeout: Duration,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(15),
            max_series: 10_000,
            max_label_value_len: 256,
            span_batch_size: 2048,
            span_batch_timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Keep data in the embedded store: `None` = only when no exporter is
    /// configured (the embedded default).
    pub enabled: Option<bool>,
    /// The database file.
    pub path: PathBuf,
    /// Data older than this is deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Upper bound of the stored data; the oldest goes first.
    pub max_bytes: u64,
    /// Memory for the database's page cache.
    pub cache_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            path: PathBuf::from("/var/lib/fathom/collector.redb"),
            retention: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
            cache_bytes: 16 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PyroscopeConfig {
    /// Base URL, e.g. `http://pyroscope:4040`.
    pub url: String,
    /// Multi-tenant Pyroscope: sent as `X-Scope-OrgID`.
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub basic_auth: Option<BasicAuth>,
    /// `Authorization: Bearer <token>` (e.g. another Fathom collector with
    /// `auth.bearer_token`); exclusive with `basic_auth`.
    #[serde(default)]
    pub bearer_token: Option<String>,
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Profiles waiting for delivery while Pyroscope is unreachable.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpExporterConfig {
    /// e.g. `http://jaeger:4317` (gRPC) or `http://jaeger:4318` (HTTP; `/v1/traces`
    /// and `/v1/metrics` are appended).
    pub endpoint: String,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Spans and metrics waiting for delivery while the endpoint is down.
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: u64,
    /// Forward metrics too (spans are always forwarded).
    #[serde(default = "default_true")]
    pub metrics: bool,
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_buffer_bytes() -> u64 {
    64 << 20
}
fn default_true() -> bool {
    true
}

impl CollectorConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Whether the embedded store runs.
    pub fn store_enabled(&self) -> bool {
        self.store
            .enabled
            .unwrap_or(self.pyroscope.is_none() && self.otlp.is_none())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.aggregation.window < Duration::from_millis(100) {
            return bad(format!(
                "aggregation.window {:?} is too short (at least 100ms)",
                self.aggregation.window
            ));
        }
        if self.aggregation.max_series == 0 || self.aggregation.span_batch_size == 0 {
            return bad("aggregation.max_series and span_batch_size must be > 0".into());
        }
        if self.queues.profiles == 0
            || self.queues.spans == 0
            || self.queues.metrics == 0
            || self.queues.sink == 0
            || self.queues.max_queued_bytes == 0
        {
            return bad("queue capacities must be > 0".into());
        }
        if let Some(token) = &self.auth.bearer_token
            && token.trim().is_empty()
        {
            return bad("auth.bearer_token is empty".into());
        }
        if let Some(p) = &self.pyroscope
            && !(p.url.starts_with("http://") || p.url.starts_with("https://"))
        {
            return bad(format!(
                "pyroscope.url {:?} must start with http:// or https://",
                p.url
            ));
        }
        if let Some(p) = &self.pyroscope
            && p.basic_auth.is_some()
            && p.bearer_token.is_some()
        {
            return bad("pyroscope: basic_auth and bearer_token exclude each other".into());
        }
        if let Some(o) = &self.otlp
            && !(o.endpoint.starts_with("http://") || o.endpoint.starts_with("https://"))
        {
            return bad(format!(
                "otlp.endpoint {:?} must start with http:// or https://",
                o.endpoint
            ));
        }
        Ok(())
    }
}

/// A listen address given on the command line: `HOST:PORT` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenFlag(pub Option<SocketAddr>);

fn parse_addr(s: &str) -> Result<ListenFlag, String> {
    if s == "off" || s == "none" || s.is_empty() {
        return Ok(ListenFlag(None));
    }
    s.parse::<SocketAddr>()
        .map(|a| ListenFlag(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (expected HOST:PORT or `off`)"))
}

fn parse_basic_auth(s: &str) -> Result<BasicAuth, String> {
    let (username, password) = s
        .split_once(':')
        .ok_or_else(|| "expected USER:PASSWORD".to_string())?;
    Ok(BasicAuth {
        username: username.into(),
        password: password.into(),
    })
}

/// Flags (each mirrored by a `FATHOM_*` variable) that override the file.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CollectorArgs {
    /// TOML configuration file (see `docs/collector.md`); flags override it.
    #[arg(long = "config", env = "FATHOM_CONFIG")]
    pub config: Option<PathBuf>,
    /// OTLP gRPC listen address, or `off` [default: 0.0.0.0:4317].
    #[arg(long, env = "FATHOM_OTLP_GRPC_LISTEN", value_parser = parse_addr)]
    pub otlp_grpc_listen: Option<ListenFlag>,
    /// OTLP HTTP listen address, or `off` [default: 0.0.0.0:4318].
    #[arg(long, env = "FATHOM_OTLP_HTTP_LISTEN", value_parser = parse_addr)]
    pub otlp_http_listen: Option<ListenFlag>,
    /// UI, API, Pyroscope push and /metrics listen address, or `off` [default: 0.0.0.0:4040].
    #[arg(long, env = "FATHOM_HTTP_LISTEN", value_parser = parse_addr)]
    pub http_listen: Option<ListenFlag>,
    /// Require `Authorization: Bearer <token>` on every ingest endpoint.
    #[arg(long, env = "FATHOM_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// PEM certificate: serve every endpoint over TLS (with --tls-key).
    #[arg(long, env = "FATHOM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "FATHOM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Profile aggregation window [default: 15s].
    #[arg(long, env = "FATHOM_WINDOW", value_parser = humantime::parse_duration)]
    pub window: Option<Duration>,
    /// Embedded store file [default: /var/lib/fathom/collector.redb].
    #[arg(long, env = "FATHOM_STORE_PATH")]
    pub store_path: Option<PathBuf>,
    /// Embedded store retention [default: 24h].
    #[arg(long, env = "FATHOM_STORE_RETENTION", value_parser = humantime::parse_duration)]
    pub store_retention: Option<Duration>,
    /// Embedded store size bound in bytes [default: 1 GiB].
    #[arg(long, env = "FATHOM_STORE_MAX_BYTES")]
    pub store_max_bytes: Option<u64>,
    /// Keep the embedded store even when exporters are configured (`true`),
    /// or never (`false`).
    #[arg(long, env = "FATHOM_STORE")]
    pub store: Option<bool>,
    /// Export profiles to this Pyroscope (e.g. http://pyroscope:4040).
    #[arg(long, env = "FATHOM_PYROSCOPE_URL")]
    pub pyroscope_url: Option<String>,
    /// Pyroscope tenant (`X-Scope-OrgID`).
    #[arg(long, env = "FATHOM_PYROSCOPE_ORG_ID")]
    pub pyroscope_org_id: Option<String>,
    /// Pyroscope basic auth, `USER:PASSWORD`.
    #[arg(long, env = "FATHOM_PYROSCOPE_BASIC_AUTH", value_parser = parse_basic_auth, hide_env_values = true)]
    pub pyroscope_basic_auth: Option<BasicAuth>,
    /// Pyroscope `Authorization: Bearer <token>` (e.g. a Fathom collector
    /// with --auth-token); exclusive with --pyroscope-basic-auth.
    #[arg(long, env = "FATHOM_PYROSCOPE_BEARER_TOKEN", hide_env_values = true)]
    pub pyroscope_bearer_token: Option<String>,
    /// Export spans and metrics to this OTLP endpoint (Jaeger, an OTel
    /// collector). `OTEL_EXPORTER_OTLP_ENDPOINT` is used when this is absent.
    #[arg(long, env = "FATHOM_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (else `OTEL_EXPORTER_OTLP_PROTOCOL`, else grpc).
    #[arg(long, env = "FATHOM_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<OtlpProtocol>,
}

impl CollectorArgs {
    /// The file (or the defaults), then the flags; `env` supplies the
    /// `OTEL_EXPORTER_OTLP_*` variables (pass `std::env::var`).
    pub fn resolve(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CollectorConfig, ConfigError> {
        let base = match &self.config {
            Some(path) => CollectorConfig::from_file(path)?,
            None => CollectorConfig::default(),
        };
        self.resolve_onto(base, env)
    }

    /// The flags over `base` (a configuration read elsewhere, e.g. the
    /// `[collector]` table of the agent's file); `self.config` is not read.
    pub fn resolve_onto(
        &self,
        base: CollectorConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<CollectorConfig, ConfigError> {
        let mut c = base;
        if let Some(a) = self.otlp_grpc_listen {
            c.listen.otlp_grpc = a.0;
        }
        if let Some(a) = self.otlp_http_listen {
            c.listen.otlp_http = a.0;
        }
        if let Some(a) = self.http_listen {
            c.listen.http = a.0;
        }
        if let Some(t) = &self.auth_token {
            c.auth.bearer_token = Some(t.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            c.tls = Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        if let Some(w) = self.window {
            c.aggregation.window = w;
        }
        if let Some(p) = &self.store_path {
            c.store.path = p.clone();
        }
        if let Some(r) = self.store_retention {
            c.store.retention = r;
        }
        if let Some(m) = self.store_max_bytes {
            c.store.max_bytes = m;
        }
        if let Some(s) = self.store {
            c.store.enabled = Some(s);
        }
        if let Some(url) = &self.pyroscope_url {
            let p = c.pyroscope.get_or_insert_with(|| PyroscopeConfig {
                url: url.clone(),
                org_id: None,
                basic_auth: None,
                bearer_token: None,
                timeout: default_export_timeout(),
                buffer_bytes: default_buffer_bytes(),
            });
            p.url = url.clone();
        }
        if let Some(p) = &mut c.pyroscope {
            if let Some(org) = &self.pyroscope_org_id {
                p.org_id = Some(org.clone());
            }
            if let Some(auth) = &self.pyroscope_basic_auth {
                p.basic_auth = Some(auth.clone());
            }
            if let Some(token) = &self.pyroscope_bearer_token {
                p.bearer_token = Some(token.clone());
            }
        }
        apply_otel_env(&mut c, self.otlp_endpoint.clone(), self.otlp_protocol, &env)?;
        c.validate()?;
        Ok(c)
    }
}

/// Applies `--otlp-endpoint`/`--otlp-protocol`, then the standard
/// `OTEL_EXPORTER_OTLP_{ENDPOINT,PROTOCOL,HEADERS,TIMEOUT}` variables where the
/// file and flags left a value unset.
fn apply_otel_env(
    c: &mut CollectorConfig,
    endpoint: Option<String>,
    protocol: Option<OtlpProtocol>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let endpoint = endpoint.or_else(|| {
        if c.otlp.is_some() {
            None
        } else {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty())
        }
    });
    if let Some(endpoint) = endpoint {
        let o = c.otlp.get_or_insert_with(|| OtlpExporterConfig {
            endpoint: endpoint.clone(),
            protocol: OtlpProtocol::default(),
            headers: BTreeMap::new(),
            timeout: default_export_timeout(),
            buffer_bytes: default_buffer_bytes(),
            metrics: true,
        });
        o.endpoint = endpoint;
        match protocol {
            Some(p) => o.protocol = p,
            None => {
                if let Some(p) = env("OTEL_EXPORTER_OTLP_PROTOCOL") {
                    o.protocol = match p.as_str() {
                        "grpc" => OtlpProtocol::Grpc,
                        "http/protobuf" => OtlpProtocol::HttpProtobuf,
                        other => {
                            return Err(ConfigError::Invalid(format!(
                                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: supported are grpc and http/protobuf"
                            )));
                        }
                    }
                }
            }
        }
        if let Some(h) = env("OTEL_EXPORTER_OTLP_HEADERS") {
            for pair in h.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "OTEL_EXPORTER_OTLP_HEADERS: {pair:?} is not key=value"
                    ))
                })?;
                o.headers
                    .entry(k.trim().to_string())
                    .or_insert_with(|| percent_decode(v.trim()));
            }
        }
        if let Some(t) = env("OTEL_EXPORTER_OTLP_TIMEOUT") {
            let ms: u64 = t.parse().map_err(|_| {
                ConfigError::Invalid(format!(
                    "OTEL_EXPORTER_OTLP_TIMEOUT={t:?} is not milliseconds"
                ))
            })?;
            o.timeout = Duration::from_millis(ms);
        }
    } else if let Some(p) = protocol
        && let Some(o) = &mut c.otlp
    {
        o.protocol = p;
    }
    Ok(())
}

/// `%XX` decoding of header values (the OTel spec's W3C Baggage format).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1..i + 3].iter().all(u8::is_ascii_hexdigit)
            && let Ok(hex) = std::str::from_utf8(&bytes[i + 1..i + 3])
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn file_then_flags_then_otel_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
[listen]
http = "127.0.0.1:9999"
[aggregation]
window = "30s"
[pyroscope]
url = "http://pyro:4040"
"#,
        )
        .unwrap();
        let args = CollectorArgs {
            config: Some(path),
            window: Some(Duration::from_secs(5)),
            pyroscope_org_id: Some("team-a".into()),
            ..CollectorArgs::default()
        };
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://jaeger:4318".to_string()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/protobuf".to_string()),
            "OTEL_EXPORTER_OTLP_HEADERS" => Some("api-key=a%20b,x=y".to_string()),
            _ => None,
        };
        let c = args.resolve(env).unwrap();
        assert_eq!(c.listen.http, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(c.listen.otlp_grpc, ListenConfig::default().otlp_grpc);
        assert_eq!(c.aggregation.window, Duration::from_secs(5));
        let p = c.pyroscope.as_ref().unwrap();
        assert_eq!(
            (p.url.as_str(), p.org_id.as_deref()),
            ("http://pyro:4040", Some("team-a"))
        );
        let o = c.otlp.as_ref().unwrap();
        assert_eq!(o.endpoint, "http://jaeger:4318");
        assert_eq!(o.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(o.headers.get("api-key").map(String::as_str), Some("a b"));
        assert_eq!(percent_decode("%+1%2x%41%"), "%+1%2xA%");
        assert!(
            !c.store_enabled(),
            "exporters configured: no embedded store by default"
        );
        assert!(CollectorConfig::default().store_enabled());
    }

    /// The documented configuration block (docs/collector.md) is the defaults, and with every
    /// commented-out setting enabled it still parses and validates.
    #[test]
    fn readme_config_example_is_true() {
        let readme = include_str!("../../docs/collector.md");
        let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        let c: CollectorConfig = toml::from_str(block).unwrap();
        assert_eq!(c, CollectorConfig::default());
        let all: String = block
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c: CollectorConfig = toml::from_str(&all).unwrap();
        c.validate().unwrap();
        assert!(c.tls.is_some() && c.pyroscope.is_some() && c.otlp.is_some());
        assert_eq!(c.store.enabled, Some(true));
    }

    #[test]
    fn flags_parse() {
        use clap::{CommandFactory as _, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: CollectorArgs,
        }
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "x",
            "--otlp-grpc-listen",
            "off",
            "--http-listen",
            "127.0.0.1:0",
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-endpoint",
            "http://j:4318",
            "--pyroscope-basic-auth",
            "u:p",
            "--pyroscope-url",
            "http://p:4040",
        ])
        .unwrap();
        let c = cli.args.resolve(|_| None).unwrap();
        assert_eq!(c.listen.otlp_grpc, None);
        assert_eq!(c.listen.http, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.otlp.unwrap().protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(c.pyroscope.unwrap().basic_auth.unwrap().username, "u");
        let cli = Cli::try_parse_from([
            "x",
            "--pyroscope-url",
            "http://collector:4040",
            "--pyroscope-bearer-token",
            "t0ken",
        ])
        .unwrap();
        let p = cli.args.resolve(|_| None).unwrap().pyroscope.unwrap();
        assert_eq!(
            (p.bearer_token.as_deref(), p.basic_auth),
            (Some("t0ken"), None)
        );
        let both = Cli::try_parse_from([
            "x",
            "--pyroscope-url",
            "http://p:4040",
            "--pyroscope-bearer-token",
            "t",
            "--pyroscope-basic-auth",
            "u:p",
        ])
        .unwrap();
        let err = both.args.resolve(|_| None).unwrap_err().to_string();
        assert_eq!(
            err,
            "pyroscope: basic_auth and bearer_token exclude each other"
        );
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[listen]\nhttps = 1\n").unwrap();
        let err = CollectorConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("https"),
            "{err}"
        );
        let args = CollectorArgs {
            pyroscope_url: Some("pyro:4040".into()),
            ..CollectorArgs::default()
        };
        let err = args.resolve(|_| None).unwrap_err().to_string();
        assert!(err.contains("http://"), "{err}");
    }
}
