//! Istio's Telemetry (`telemetry.istio.io/v1`, `v1alpha1`): tracing, access logging and metrics
//! settings for the workloads it selects, read as istio.io documents them and validated by Istio's
//! `ValidateTelemetry` (pkg/config/validation). Whether the providers it names exist is a
//! cross-object rule (they live in the MeshConfig): `config::telemetry` checks it at compile time.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::common::{istio_enum, opt_duration, PolicyTargetReference, Report, WorkloadSelector};
use super::FieldError;
use crate::config::telemetry::filter::Filter;
use crate::config::telemetry::tags::valid_label_name;

istio_enum! {
    /// Which side of a request a setting applies to.
    pub enum WorkloadMode {
        /// Istio: the default when `match` or `mode` is absent.
        #[default]
        ClientAndServer = "CLIENT_AND_SERVER",
        Client = "CLIENT",
        Server = "SERVER",
    }
}

impl WorkloadMode {
    /// Whether a setting with this mode applies to `side` (`Client` or `Server`).
    pub fn covers(self, side: WorkloadMode) -> bool {
        self == WorkloadMode::ClientAndServer || self == side
    }
}

istio_enum! {
    /// Istio's standard metrics, as the Telemetry API names them.
    pub enum IstioMetric {
        #[default]
        AllMetrics = "ALL_METRICS",
        RequestCount = "REQUEST_COUNT",
        RequestDuration = "REQUEST_DURATION",
        RequestSize = "REQUEST_SIZE",
        ResponseSize = "RESPONSE_SIZE",
        TcpOpenedConnections = "TCP_OPENED_CONNECTIONS",
        TcpClosedConnections = "TCP_CLOSED_CONNECTIONS",
        TcpSentBytes = "TCP_SENT_BYTES",
        TcpReceivedBytes = "TCP_RECEIVED_BYTES",
        GrpcRequestMessages = "GRPC_REQUEST_MESSAGES",
        GrpcResponseMessages = "GRPC_RESPONSE_MESSAGES",
    }
}

impl IstioMetric {
    /// Every metric `ALL_METRICS` stands for.
    pub const EACH: [IstioMetric; 10] = [
        IstioMetric::RequestCount,
        IstioMetric::RequestDuration,
        IstioMetric::RequestSize,
        IstioMetric::ResponseSize,
        IstioMetric::TcpOpenedConnections,
        IstioMetric::TcpClosedConnections,
        IstioMetric::TcpSentBytes,
        IstioMetric::TcpReceivedBytes,
        IstioMetric::GrpcRequestMessages,
        IstioMetric::GrpcResponseMessages,
    ];

    /// The Prometheus series this metric is exported as (Istio's standard metric names).
    pub fn prometheus_name(self) -> &'static str {
        match self {
            IstioMetric::AllMetrics => "",
            IstioMetric::RequestCount => "istio_requests_total",
            IstioMetric::RequestDuration => "istio_request_duration_milliseconds",
            IstioMetric::RequestSize => "istio_request_bytes",
            IstioMetric::ResponseSize => "istio_response_bytes",
            IstioMetric::TcpOpenedConnections => "istio_tcp_connections_opened_total",
            IstioMetric::TcpClosedConnections => "istio_tcp_connections_closed_total",
            IstioMetric::TcpSentBytes => "istio_tcp_sent_bytes_total",
            IstioMetric::TcpReceivedBytes => "istio_tcp_received_bytes_total",
            IstioMetric::GrpcRequestMessages => "istio_request_messages_total",
            IstioMetric::GrpcResponseMessages => "istio_response_messages_total",
        }
    }
}

istio_enum! {
    pub enum TagOperation {
        /// Istio: the default operation.
        #[default]
        Upsert = "UPSERT",
        Remove = "REMOVE",
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Telemetry {
    /// Unset (with no targetRefs): the whole namespace (the mesh, from the root namespace).
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    pub target_refs: Vec<PolicyTargetReference>,
    pub tracing: Vec<Tracing>,
    pub access_logging: Vec<AccessLogging>,
    pub metrics: Vec<Metrics>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct ProviderRef {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct ModeSelector {
    pub mode: WorkloadMode,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Tracing {
    #[serde(rename = "match")]
    pub match_: Option<ModeSelector>,
    /// Istio: only the first provider is used.
    pub providers: Vec<ProviderRef>,
    /// 0.0 to 100.0; unset inherits (finally MeshConfig `defaultConfig.tracing.sampling`).
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: BTreeMap<String, CustomTag>,
    pub use_request_id_for_trace_sampling: Option<bool>,
    pub enable_istio_tags: Option<bool>,
}

/// A span tag: exactly one of a literal, an environment variable, or a request header.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CustomTag {
    pub literal: Option<Literal>,
    pub environment: Option<FromName>,
    pub header: Option<FromName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct Literal {
    pub value: String,
}

/// An environment variable or a request header, with the value to use when it is absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct FromName {
    pub name: String,
    pub default_value: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct AccessLogging {
    #[serde(rename = "match")]
    pub match_: Option<ModeSelector>,
    pub providers: Vec<ProviderRef>,
    pub disabled: Option<bool>,
    pub filter: Option<LogFilter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct LogFilter {
    /// A CEL expression over Envoy's attributes; a line is written when it is true.
    pub expression: String,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Metrics {
    pub providers: Vec<ProviderRef>,
    pub overrides: Vec<MetricsOverrides>,
    #[serde(deserialize_with = "opt_duration")]
    pub reporting_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct MetricsOverrides {
    #[serde(rename = "match")]
    pub match_: Option<MetricSelector>,
    pub disabled: Option<bool>,
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

/// `metric` or `customMetric` (one of), and the side; neither means every metric.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct MetricSelector {
    pub metric: Option<IstioMetric>,
    pub custom_metric: Option<String>,
    pub mode: WorkloadMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct TagOverride {
    pub operation: TagOperation,
    pub value: Option<String>,
}

impl Telemetry {
    /// Namespace-wide: no selector labels and no targetRefs (Istio `namespaceWideTelemetryConfig`).
    pub fn is_namespace_wide(&self) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| s.match_labels.is_empty())
            && self.target_ref.is_none()
            && self.target_refs.is_empty()
    }

    /// Every provider name it references, with the field that names it.
    pub fn provider_refs(&self) -> Vec<(String, &str)> {
        fn add<'a>(
            out: &mut Vec<(String, &'a str)>,
            section: &str,
            i: usize,
            list: &'a [ProviderRef],
        ) {
            for (j, p) in list.iter().enumerate() {
                out.push((format!("spec.{section}[{i}].providers[{j}].name"), &p.name));
            }
        }
        let mut out = Vec::new();
        for (i, t) in self.tracing.iter().enumerate() {
            add(&mut out, "tracing", i, &t.providers);
        }
        for (i, a) in self.access_logging.iter().enumerate() {
            add(&mut out, "accessLogging", i, &a.providers);
        }
        for (i, m) in self.metrics.iter().enumerate() {
            add(&mut out, "metrics", i, &m.providers);
        }
        out
    }

    /// Istio ValidateTelemetry. An access-log filter that does not parse as CEL is an error of
    /// its `filter.expression` (Istio `validateTelemetryFilter`).
    pub fn validate(&self) -> Vec<FieldError> {
        let mut r = Report::default();
        let targets = [
            self.selector.is_some(),
            self.target_ref.is_some(),
            !self.target_refs.is_empty(),
        ];
        if targets.iter().filter(|t| **t).count() > 1 {
            r.err(
                "spec.targetRefs",
                "only one of targetRefs or workloadSelector can be set",
            );
        }
        if let Some(selector) = &self.selector {
            selector.check(&mut r, "spec.selector");
        }
        if let Some(t) = &self.target_ref {
            t.check(&mut r, "spec.targetRef");
        }
        for (i, t) in self.target_refs.iter().enumerate() {
            t.check(&mut r, &format!("spec.targetRefs[{i}]"));
        }
        for (field, name) in self.provider_refs() {
            if name.is_empty() {
                r.err(field, "providers.name may not be empty");
            }
        }
        for (i, t) in self.tracing.iter().enumerate() {
            t.check(&mut r, &format!("spec.tracing[{i}]"));
        }
        for (i, a) in self.access_logging.iter().enumerate() {
            if let Some(f) = &a.filter {
                if let Err(e) = Filter::compile(&f.expression) {
                    let field = format!("spec.accessLogging[{i}].filter.expression");
                    r.err(field, e.to_string());
                }
            }
        }
        for (i, m) in self.metrics.iter().enumerate() {
            m.check(&mut r, &format!("spec.metrics[{i}]"));
        }
        r.0
    }
}

impl Tracing {
    fn check(&self, r: &mut Report, field: &str) {
        if let Some(p) = self.random_sampling_percentage {
            if !(0.0..=100.0).contains(&p) {
                r.err(
                    format!("{field}.randomSamplingPercentage"),
                    format!("randomSamplingPercentage must be in range [0.0, 100.0], got {p}"),
                );
            }
        }
        for (name, tag) in &self.custom_tags {
            let path = format!("{field}.customTags.{name}");
            if name.is_empty() {
                r.err(path.clone(), "tag name may not be empty");
            }
            let set = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ];
            match set.iter().filter(|s| **s).count() {
                0 => r.err(
                    path,
                    format!("tag '{name}' must set one of literal, environment or header"),
                ),
                1 => {
                    if tag.literal.as_ref().is_some_and(|l| l.value.is_empty()) {
                        r.err(
                            format!("{path}.literal.value"),
                            "literal tag value may not be empty",
                        );
                    }
                    if tag.header.as_ref().is_some_and(|h| h.name.is_empty()) {
                        r.err(
                            format!("{path}.header.name"),
                            "header tag name may not be empty",
                        );
                    }
                    if tag.environment.as_ref().is_some_and(|e| e.name.is_empty()) {
                        r.err(
                            format!("{path}.environment.name"),
                            "environment tag name may not be empty",
                        );
                    }
                }
                _ => r.err(
                    path,
                    "only one of literal, environment or header may be set",
                ),
            }
        }
    }
}

impl Metrics {
    fn check(&self, r: &mut Report, field: &str) {
        for (i, o) in self.overrides.iter().enumerate() {
            let at = format!("{field}.overrides[{i}]");
            for (name, t) in &o.tag_overrides {
                let path = format!("{at}.tagOverrides.{name}");
                if name.is_empty() {
                    r.err(path.clone(), "tagOverrides.name may not be empty");
                } else if !valid_label_name(name) {
                    // The tag becomes a Prometheus label, whose names Prometheus restricts.
                    r.err(
                        path.clone(),
                        format!(
                            "tag name {name:?} is not a valid Prometheus label name \
                             ([a-zA-Z_][a-zA-Z0-9_]*, not starting with \"__\")"
                        ),
                    );
                }
                match (t.operation, t.value.as_deref().unwrap_or_default()) {
                    (TagOperation::Upsert, "") => r.err(
                        format!("{path}.value"),
                        "tagOverrides.value must be set when operation is UPSERT",
                    ),
                    (TagOperation::Upsert, v) => {
                        // Istio's stats filter compiles it; one that does not parse would
                        // silently drop the tag, so it is refused here.
                        if let Err(e) = Filter::compile(v) {
                            r.err(format!("{path}.value"), e.to_string());
                        }
                    }
                    (TagOperation::Remove, v) if !v.is_empty() => r.err(
                        format!("{path}.value"),
                        "tagOverrides.value may only be set when operation is UPSERT",
                    ),
                    _ => {}
                }
            }
            if let Some(m) = &o.match_ {
                if m.metric.is_some() && m.custom_metric.is_some() {
                    r.err(
                        format!("{at}.match"),
                        "only one of metric or customMetric may be set",
                    );
                }
                if m.custom_metric.as_deref() == Some("") {
                    r.err(
                        format!("{at}.match.customMetric"),
                        "customMetric may not be empty",
                    );
                }
            }
        }
    }
}
