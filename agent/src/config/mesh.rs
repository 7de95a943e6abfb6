//! MeshConfig, read as Istio stores it: the `istio` ConfigMap of the root namespace, key `mesh`, a
//! YAML document (istio.io "Global Mesh Options"). Only the observability settings are typed; every
//! other field is ignored (and logged at debug), as Istio's own decoding ignores fields it does not
//! know. Defaults and merging follow Istio's `mesh.DefaultMeshConfig` / `ApplyMeshConfig`: the
//! built-in extension providers (`prometheus`, `stackdriver`, `envoy`) are always there and a
//! provider of the same name replaces one.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use super::istio::common::{check_port, istio_enum, opt_duration, Report};
use super::istio::telemetry::CustomTag;
use super::istio::{decode_typed, FieldError};

/// Istio: the mesh config is the ConfigMap of this name in the root namespace…
pub const MESH_CONFIG_MAP: &str = "istio";
/// …under this key.
pub const MESH_KEY: &str = "mesh";
/// Istio's default root namespace (`policy::DEFAULT_ROOT_NAMESPACE` is the same; config cannot
/// import policy).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Istio's PILOT_TRACE_SAMPLING default: the sampling percentage when nothing sets one.
pub const DEFAULT_SAMPLING: f64 = 1.0;
/// The built-in access-log provider (Istio `builtinEnvoyAccessLogProvider`).
pub const ENVOY_PROVIDER: &str = "envoy";
pub const PROMETHEUS_PROVIDER: &str = "prometheus";
/// Where the built-in `envoy` provider writes (Istio `DevStdout`).
pub const DEV_STDOUT: &str = "/dev/stdout";

istio_enum! {
    pub enum AccessLogEncoding {
        /// Istio: the default encoding.
        #[default]
        Text = "TEXT",
        Json = "JSON",
    }
}

/// The ConfigMap holding the mesh config, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfigMap {
    pub metadata: ObjectMeta,
    pub mesh: MeshConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct MeshConfig {
    /// Istio `DefaultMeshConfig`: true. Only the legacy path (no Telemetry tracing and no default
    /// tracing provider) reads it.
    pub enable_tracing: bool,
    /// Empty: no access log (legacy path).
    pub access_log_file: String,
    pub access_log_encoding: AccessLogEncoding,
    /// Empty: Istio's default format for the encoding.
    pub access_log_format: String,
    pub default_config: ProxyConfig,
    /// Merged with the built-in providers by name (see [`MeshConfig::merge_builtin_providers`]).
    pub extension_providers: Vec<ExtensionProvider>,
    pub default_providers: DefaultProviders,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enable_tracing: true,
            access_log_file: String::new(),
            access_log_encoding: AccessLogEncoding::Text,
            access_log_format: String::new(),
            default_config: ProxyConfig::default(),
            extension_providers: builtin_providers(),
            default_providers: DefaultProviders::default(),
        }
    }
}

/// Istio `DefaultMeshConfig().ExtensionProviders`.
fn builtin_providers() -> Vec<ExtensionProvider> {
    let named = |name: &str| ExtensionProvider {
        name: name.into(),
        ..Default::default()
    };
    vec![
        ExtensionProvider {
            prometheus: Some(Value::Object(Default::default())),
            ..named(PROMETHEUS_PROVIDER)
        },
        ExtensionProvider {
            stackdriver: Some(Value::Object(Default::default())),
            ..named("stackdriver")
        },
        ExtensionProvider {
            envoy_file_access_log: Some(FileAccessLogProvider {
                path: DEV_STDOUT.into(),
                ..Default::default()
            }),
            ..named(ENVOY_PROVIDER)
        },
    ]
}

/// The proxy defaults (`defaultConfig`); only tracing is read.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ProxyConfig {
    pub tracing: Option<MeshTracing>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct MeshTracing {
    /// Percent, 0.0 to 100.0; 0 (unset) means Istio's default, 1%.
    pub sampling: f64,
    pub zipkin: Option<ZipkinTracer>,
    pub custom_tags: BTreeMap<String, CustomTag>,
    pub max_path_tag_length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct ZipkinTracer {
    /// `host:port` of the Zipkin collector.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DefaultProviders {
    pub tracing: Vec<String>,
    pub metrics: Vec<String>,
    pub access_logging: Vec<String>,
}

/// One named provider: exactly one of the provider kinds is set. Kinds ambit does not implement
/// are kept as written (a Telemetry may name them; they then do nothing here).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub zipkin: Option<ZipkinProvider>,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    pub envoy_file_access_log: Option<FileAccessLogProvider>,
    pub prometheus: Option<Value>,
    pub stackdriver: Option<Value>,
    pub envoy_ext_authz_http: Option<Value>,
    pub envoy_ext_authz_grpc: Option<Value>,
    pub lightstep: Option<Value>,
    pub datadog: Option<Value>,
    pub skywalking: Option<Value>,
    pub opencensus: Option<Value>,
    pub envoy_http_als: Option<Value>,
    pub envoy_tcp_als: Option<Value>,
    pub envoy_otel_als: Option<Value>,
    pub sds: Option<Value>,
}

/// What kind of provider an [`ExtensionProvider`] is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProviderKind<'a> {
    Zipkin(&'a ZipkinProvider),
    OpenTelemetry(&'a OpenTelemetryProvider),
    FileAccessLog(&'a FileAccessLogProvider),
    Prometheus,
    /// A kind ambit does not implement, by its field name.
    Other(&'static str),
}

impl ExtensionProvider {
    /// Every kind set on this provider (valid: exactly one).
    pub fn kinds(&self) -> Vec<ProviderKind<'_>> {
        let mut out = Vec::new();
        if let Some(z) = &self.zipkin {
            out.push(ProviderKind::Zipkin(z));
        }
        if let Some(o) = &self.opentelemetry {
            out.push(ProviderKind::OpenTelemetry(o));
        }
        if let Some(f) = &self.envoy_file_access_log {
            out.push(ProviderKind::FileAccessLog(f));
        }
        if self.prometheus.is_some() {
            out.push(ProviderKind::Prometheus);
        }
        let others = [
            ("stackdriver", &self.stackdriver),
            ("envoyExtAuthzHttp", &self.envoy_ext_authz_http),
            ("envoyExtAuthzGrpc", &self.envoy_ext_authz_grpc),
            ("lightstep", &self.lightstep),
            ("datadog", &self.datadog),
            ("skywalking", &self.skywalking),
            ("opencensus", &self.opencensus),
            ("envoyHttpAls", &self.envoy_http_als),
            ("envoyTcpAls", &self.envoy_tcp_als),
            ("envoyOtelAls", &self.envoy_otel_als),
            ("sds", &self.sds),
        ];
        out.extend(
            others
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .map(|(n, _)| ProviderKind::Other(n)),
        );
        out
    }

    /// The provider's kind (the first, if several were set: validation refuses that).
    pub fn kind(&self) -> ProviderKind<'_> {
        self.kinds()
            .into_iter()
            .next()
            .unwrap_or(ProviderKind::Other("none"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ZipkinProvider {
    /// `[<namespace>/]<hostname>` of the collector, e.g. `zipkin.istio-system.svc.cluster.local`.
    pub service: String,
    pub port: u32,
    /// 0: Envoy's default (256).
    pub max_tag_length: u32,
    #[serde(rename = "enable64bitTraceId")]
    pub enable_64bit_trace_id: bool,
    /// Empty: Istio's default, `/api/v2/spans`.
    pub path: String,
    /// Which headers the tracer writes: B3 (Istio's default) or B3 and W3C.
    pub trace_context_option: TraceContextOption,
}

/// Istio's `ZipkinTracingProvider.TraceContextOption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TraceContextOption {
    #[default]
    #[serde(rename = "USE_B3")]
    UseB3,
    #[serde(rename = "USE_B3_WITH_W3C_PROPAGATION")]
    UseB3WithW3cPropagation,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u32,
    pub max_tag_length: u32,
    /// OTLP over HTTP; with neither `http` nor `grpc`, Istio exports over gRPC.
    pub http: Option<OtlpHttp>,
    pub grpc: Option<OtlpGrpc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OtlpHttp {
    /// Empty: `/v1/traces`.
    pub path: String,
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    pub headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct OtlpGrpc {
    #[serde(deserialize_with = "opt_duration")]
    pub timeout: Option<Duration>,
    pub initial_metadata: Vec<HttpHeader>,
}

/// A header sent to the collector: a literal `value` or the value of the environment variable
/// `envName`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct HttpHeader {
    pub name: String,
    pub value: Option<String>,
    pub env_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FileAccessLogProvider {
    /// Empty: `/dev/stdout`.
    pub path: String,
    pub log_format: Option<LogFormatSpec>,
    pub omit_empty_values: bool,
}

/// `text` (a format string) or `labels` (JSON: field name → format string); one of.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct LogFormatSpec {
    pub text: Option<String>,
    pub labels: Option<serde_json::Map<String, Value>>,
}

impl MeshConfig {
    /// Parses a mesh config YAML document (the value of the ConfigMap's `mesh` key) with Istio's
    /// defaults applied. Field paths in errors are relative to the document. Also returns the
    /// fields it ignored.
    pub fn from_yaml(text: &str) -> Result<(MeshConfig, Vec<String>), Vec<FieldError>> {
        let value: Value = match serde_yaml::from_str(text) {
            Ok(Value::Null) => Value::Object(Default::default()),
            Ok(v) => v,
            Err(e) => return Err(vec![FieldError::new("", format!("not valid YAML: {e}"))]),
        };
        if !value.is_object() {
            return Err(vec![FieldError::new("", "must be a YAML mapping")]);
        }
        let (mut mesh, ignored): (MeshConfig, _) = decode_typed(value).map_err(|e| vec![e])?;
        // Validated as written, so `extensionProviders[i]` is the user's i-th provider.
        let errors = mesh.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        mesh.merge_builtin_providers();
        Ok((mesh, ignored))
    }

    /// Istio `ApplyMeshConfig`: a user provider replaces the built-in one of the same name, the
    /// others are appended after the built-in ones.
    fn merge_builtin_providers(&mut self) {
        let user = std::mem::take(&mut self.extension_providers);
        let mut merged = builtin_providers();
        for p in user {
            match merged.iter_mut().find(|b| b.name == p.name) {
                Some(b) => *b = p,
                None => merged.push(p),
            }
        }
        self.extension_providers = merged;
    }

    /// The provider of this name (Istio matches names case-insensitively, `fetchProvider`).
    pub fn provider(&self, name: &str) -> Option<&ExtensionProvider> {
        self.extension_providers
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The legacy sampling percentage: `defaultConfig.tracing.sampling`, else 1% (Istio
    /// `proxyConfigSamplingValue`: 0 means unset).
    pub fn default_sampling(&self) -> f64 {
        match &self.default_config.tracing {
            Some(t) if t.sampling != 0.0 => t.sampling,
            _ => DEFAULT_SAMPLING,
        }
    }

    /// Checks the values Istio documents ranges and choices for. Paths are document-relative.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut r = Report::default();
        if let Some(t) = &self.default_config.tracing {
            if !(0.0..=100.0).contains(&t.sampling) {
                r.err(
                    "defaultConfig.tracing.sampling",
                    format!(
                        "sampling {} must be a percentage in [0.0, 100.0]",
                        t.sampling
                    ),
                );
            }
            if let Some(z) = &t.zipkin {
                if !z.address.is_empty() && !valid_host_port(&z.address) {
                    r.err(
                        "defaultConfig.tracing.zipkin.address",
                        format!("{:?} is not host:port", z.address),
                    );
                }
            }
        }
        if self.access_log_encoding == AccessLogEncoding::Json && !self.access_log_format.is_empty()
        {
            if let Err(e) =
                serde_json::from_str::<serde_json::Map<String, Value>>(&self.access_log_format)
            {
                r.err(
                    "accessLogFormat",
                    format!("with accessLogEncoding JSON it must be a JSON object: {e}"),
                );
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.extension_providers.iter().enumerate() {
            let at = format!("extensionProviders[{i}]");
            if p.name.is_empty() {
                r.err(format!("{at}.name"), "empty extension provider name");
            } else if !seen.insert(p.name.to_ascii_lowercase()) {
                r.err(
                    format!("{at}.name"),
                    format!("duplicate extension provider name {}", p.name),
                );
            }
            let kinds = p.kinds();
            if kinds.len() != 1 {
                r.err(
                    at.clone(),
                    format!("must set exactly one provider kind, found {}", kinds.len()),
                );
            }
            for k in kinds {
                match k {
                    ProviderKind::Zipkin(z) => {
                        check_service(&mut r, &format!("{at}.zipkin"), &z.service, z.port)
                    }
                    ProviderKind::OpenTelemetry(o) => {
                        let at = format!("{at}.opentelemetry");
                        check_service(&mut r, &at, &o.service, o.port);
                        if o.http.is_some() && o.grpc.is_some() {
                            r.err(
                                at,
                                "OpenTelemetryTracingProvider cannot specify both grpc and http",
                            );
                        }
                    }
                    ProviderKind::FileAccessLog(f) => {
                        if let Some(LogFormatSpec {
                            text: Some(_),
                            labels: Some(_),
                        }) = &f.log_format
                        {
                            r.err(
                                format!("{at}.envoyFileAccessLog.logFormat"),
                                "only one of text or labels may be set",
                            );
                        }
                    }
                    ProviderKind::Prometheus | ProviderKind::Other(_) => {}
                }
            }
        }
        r.0
    }
}

/// Istio `validateExtensionProviderService` and `ValidatePort`.
fn check_service(r: &mut Report, at: &str, service: &str, port: u32) {
    if service.is_empty() {
        r.err(format!("{at}.service"), "service must not be empty");
    }
    check_port(r, format!("{at}.port"), port);
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

impl MeshConfigMap {
    /// Decodes the `istio` ConfigMap: `data.mesh` is parsed as a mesh config (absent: Istio's
    /// defaults). Error paths start at the object root (`data.mesh.enableTracing`).
    pub fn parse(value: Value) -> Result<(MeshConfigMap, Vec<String>), Vec<FieldError>> {
        let metadata: ObjectMeta = match value.get("metadata") {
            Some(m) => serde_json::from_value(m.clone())
                .map_err(|e| vec![FieldError::new("metadata", e.to_string())])?,
            None => ObjectMeta::default(),
        };
        let text = match value.get("data").and_then(|d| d.get(MESH_KEY)) {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(vec![FieldError::new(
                    "data.mesh",
                    "must be a string (a YAML document)",
                )])
            }
        };
        let prefix = |f: String| {
            if f.is_empty() {
                "data.mesh".to_string()
            } else {
                format!("data.mesh.{f}")
            }
        };
        match MeshConfig::from_yaml(text) {
            Ok((mesh, ignored)) => Ok((
                MeshConfigMap { metadata, mesh },
                ignored.into_iter().map(prefix).collect(),
            )),
            Err(errors) => Err(errors
                .into_iter()
                .map(|e| FieldError::new(prefix(e.field), e.message))
                .collect()),
        }
    }
}
