//! What a workload's observability settings are: the MeshConfig defaults merged with the Telemetry
//! objects of the root namespace, the workload's namespace and those selecting it, by Istio's rules
//! (istio/istio pilot/pkg/model/telemetry.go: `applicableTelemetries`, `Tracing`, `mergeLogs`,
//! `mergeMetrics`). Pure: the snapshot computes it per workload on the control side, and the data
//! path reads the result.

mod export;
pub mod filter;
pub mod format;
pub mod tags;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::istio::telemetry::{CustomTag, IstioMetric, TagOperation, Telemetry, WorkloadMode};
use super::istio::{FieldError, IstioObject};
use super::mesh::{
    AccessLogEncoding, MeshConfig, OpenTelemetryProvider, ProviderKind, ENVOY_PROVIDER,
    PROMETHEUS_PROVIDER,
};
pub use filter::{Filter, FilterError, Principals, RequestAttrs};
pub use tags::{SeriesTags, TagPlan};

pub type TelemetryObject = IstioObject<Telemetry>;

/// Settings for both sides of a workload's requests: as a client (source node) and as a server
/// (destination node). Istio's `WorkloadMode` picks the side a setting applies to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EffectiveTelemetry {
    pub client: SideTelemetry,
    pub server: SideTelemetry,
}

impl EffectiveTelemetry {
    /// The settings of one side; `ClientAndServer` reads as the server's.
    pub fn side(&self, mode: WorkloadMode) -> &SideTelemetry {
        match mode {
            WorkloadMode::Client => &self.client,
            _ => &self.server,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SideTelemetry {
    /// None: no tracer (no spans are made or reported).
    pub tracing: Option<TracingSettings>,
    pub access_log: AccessLogSettings,
    pub metrics: MetricSettings,
}

impl SideTelemetry {
    /// Whether these settings change what a TCP connection of this side does: an access log
    /// writes its line, or one of the four TCP metrics is not recorded. When no workload's do,
    /// a connection skips looking them up (`Snapshot::tcp_telemetry`).
    pub fn shapes_tcp(&self) -> bool {
        self.access_log.enabled()
            || self.metrics.tags.is_some()
            || ![
                IstioMetric::TcpOpenedConnections,
                IstioMetric::TcpClosedConnections,
                IstioMetric::TcpSentBytes,
                IstioMetric::TcpReceivedBytes,
            ]
            .into_iter()
            .all(|m| self.metrics.records(m))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// The provider's name (`zipkin` for the legacy `defaultConfig.tracing.zipkin`).
    pub provider: String,
    pub exporter: TraceExporter,
    /// Percent of requests without a sampling decision that are sampled.
    pub sampling_percent: f64,
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// False with `disableSpanReporting`: Istio then configures no tracer for the side.
    pub report_spans: bool,
    /// 0: Envoy's default (256).
    pub max_path_tag_length: u32,
    /// The same, as the span exporter takes it (made once per snapshot, not per request).
    pub export: crate::trace::TraceSettings,
    /// Its tracer, once a request of the side was sampled.
    pub tracer: crate::trace::TracerSlot,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TraceExporter {
    /// Zipkin v2 JSON to `http://<endpoint><path>`.
    Zipkin {
        /// `host:port`.
        endpoint: String,
        path: String,
        max_tag_length: u32,
        /// `traceContextOption: USE_B3_WITH_W3C_PROPAGATION`: `traceparent` written too.
        w3c: bool,
    },
    OpenTelemetry(OpenTelemetryProvider),
}

/// Zero or more access-log sinks; none means no access log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccessLogSettings {
    pub sinks: Vec<AccessLogSink>,
}

impl AccessLogSettings {
    pub fn enabled(&self) -> bool {
        !self.sinks.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSink {
    /// The provider's name; empty for the legacy `accessLogFile`.
    pub provider: String,
    /// A file path; `/dev/stdout` is the agent's stdout.
    pub path: String,
    pub format: LogFormat,
    /// `format`, compiled (once per snapshot, not per line).
    pub formatter: Arc<format::Formatter>,
    /// Only requests for which it is true are logged.
    pub filter: Option<Arc<Filter>>,
}

/// A log line's format. `None` is Istio's default for the encoding (`format`
/// holds the default strings).
#[derive(Debug, Clone, PartialEq)]
pub enum LogFormat {
    /// A format string with `%COMMAND%`s, ending in a newline (Istio adds a missing one).
    Text(Option<String>),
    /// JSON: field name → format string.
    Json(Option<serde_json::Map<String, Value>>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricSettings {
    /// Whether Istio's standard metrics are recorded at all (the `prometheus` provider is in scope
    /// and `ALL_METRICS` is not disabled).
    pub enabled: bool,
    /// Per metric (`REQUEST_COUNT`, … or a custom metric's name): disabled, and tag changes.
    pub overrides: BTreeMap<String, MetricOverride>,
    pub reporting_interval: Option<Duration>,
    /// The `tags` of `overrides` for the eight metrics ambit exports, compiled; None when there
    /// are none (the usual case: a request then pays for this check only).
    pub tags: Option<Arc<TagPlan>>,
}

impl Default for MetricSettings {
    fn default() -> Self {
        MetricSettings {
            enabled: true,
            overrides: BTreeMap::new(),
            reporting_interval: None,
            tags: None,
        }
    }
}

impl MetricSettings {
    /// Whether `metric` is recorded.
    pub fn records(&self, metric: IstioMetric) -> bool {
        self.enabled
            && !self
                .overrides
                .get(metric.as_str())
                .is_some_and(|o| o.disabled)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricOverride {
    pub disabled: bool,
    pub tags: BTreeMap<String, TagAction>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TagAction {
    /// Set the tag to the value of this (CEL) expression.
    Upsert(String),
    Remove,
}

/// Istio `sortConfigByCreationTime`: oldest first, then by name, then by namespace. The order
/// decides which namespace-wide object counts (the oldest) and which selector wins (the last).
pub fn sort_by_creation(objects: &mut [Arc<TelemetryObject>]) {
    objects.sort_by(|a, b| {
        let t = |o: &TelemetryObject| o.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b))
            .then_with(|| a.name().cmp(b.name()))
            .then_with(|| a.namespace().cmp(&b.namespace()))
    });
}

/// The cross-object rule: every provider a Telemetry names must be one of the mesh's extension
/// providers (the built-in ones included). Field paths start at the object root.
pub fn unknown_providers(mesh: &MeshConfig, telemetry: &Telemetry) -> Vec<FieldError> {
    telemetry
        .provider_refs()
        .into_iter()
        .filter(|(_, name)| !name.is_empty() && mesh.provider(name).is_none())
        .map(|(field, name)| {
            let known: Vec<&str> = mesh
                .extension_providers
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            FieldError::new(
                field,
                format!(
                    "unknown provider {name:?}: not in the mesh config's extensionProviders ({})",
                    known.join(", ")
                ),
            )
        })
        .collect()
}

/// The Telemetry objects that apply to a workload, in Istio's order (later ones override): the
/// root namespace's oldest namespace-wide object, the workload namespace's oldest namespace-wide
/// object, then every object of the workload's namespace whose selector matches its labels.
/// `objects` must be sorted with [`sort_by_creation`]. Objects with `targetRefs` attach to
/// waypoints and gateways, never to a workload here.
pub fn applicable<'a>(
    objects: &'a [Arc<TelemetryObject>],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a Telemetry> {
    let wide = |ns: &str| {
        objects
            .iter()
            .find(|o| o.namespace() == Some(ns) && o.spec.is_namespace_wide())
            .map(|o| &o.spec)
    };
    let mut out: Vec<&Telemetry> = wide(root_namespace).into_iter().collect();
    if namespace != root_namespace {
        out.extend(wide(namespace));
    }
    out.extend(
        objects
            .iter()
            .filter(|o| o.namespace() == Some(namespace))
            .map(|o| &o.spec)
            .filter(|t| {
                t.target_ref.is_none()
                    && t.target_refs.is_empty()
                    && t.selector.as_ref().is_some_and(|s| {
                        !s.match_labels.is_empty()
                            && s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
            }),
    );
    out
}

/// The effective settings of a workload (`namespace`, `labels`), both sides.
pub fn resolve(
    mesh: &MeshConfig,
    objects: &[Arc<TelemetryObject>],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> EffectiveTelemetry {
    let applied = applicable(objects, root_namespace, namespace, labels);
    let side = |mode| SideTelemetry {
        tracing: tracing(mesh, &applied, mode),
        access_log: access_log(mesh, &applied, mode),
        metrics: metrics(mesh, &applied, mode),
    };
    EffectiveTelemetry {
        client: side(WorkloadMode::Client),
        server: side(WorkloadMode::Server),
    }
}

fn mode_of(m: &Option<super::istio::telemetry::ModeSelector>) -> WorkloadMode {
    m.as_ref().map(|m| m.mode).unwrap_or_default()
}

/// Istio `Telemetries.Tracing`, then `configureTracingFromTelemetry` for one side.
fn tracing(
    mesh: &MeshConfig,
    applied: &[&Telemetry],
    side: WorkloadMode,
) -> Option<TracingSettings> {
    let rules: Vec<_> = applied.iter().flat_map(|t| &t.tracing).collect();
    let default_provider = mesh.default_providers.tracing.first();
    let mesh_tracing = mesh.default_config.tracing.clone().unwrap_or_default();
    if rules.is_empty() && default_provider.is_none() {
        // Legacy mesh config: `enableTracing` with `defaultConfig.tracing.zipkin`.
        let address = mesh_tracing.zipkin.as_ref().map(|z| z.address.as_str());
        return match address {
            Some(a) if mesh.enable_tracing && !a.is_empty() => Some(
                TracingSettings {
                    provider: "zipkin".into(),
                    exporter: TraceExporter::Zipkin {
                        endpoint: a.to_string(),
                        path: ZIPKIN_PATH.into(),
                        max_tag_length: 0,
                        w3c: false,
                    },
                    sampling_percent: mesh.default_sampling(),
                    custom_tags: mesh_tracing.custom_tags.clone(),
                    report_spans: true,
                    max_path_tag_length: mesh_tracing.max_path_tag_length,
                    export: export::placeholder(),
                    tracer: Default::default(),
                }
                .with_export(),
            ),
            _ => None,
        };
    }
    let mut provider = default_provider.cloned();
    let mut disabled = false;
    let mut tags: Option<&BTreeMap<String, CustomTag>> = None;
    let mut sampling = None;
    for r in rules
        .into_iter()
        .filter(|r| mode_of(&r.match_).covers(side))
    {
        // Istio: one provider per side, the first named.
        if let Some(p) = r.providers.first() {
            provider = Some(p.name.clone());
        }
        if let Some(d) = r.disable_span_reporting {
            disabled = d;
        }
        if !r.custom_tags.is_empty() {
            tags = Some(&r.custom_tags);
        }
        if let Some(s) = r.random_sampling_percentage {
            sampling = Some(s);
        }
    }
    let Some(provider) = provider.as_deref().and_then(|p| mesh.provider(p)) else {
        // Istio (`configureTracingFromTelemetry`): a Telemetry without a provider leaves the
        // connection manager's tracing without one, so the proxy's bootstrap tracer, the legacy
        // `defaultConfig.tracing.zipkin`, reports the spans, at the Telemetry's sampling.
        let address = mesh_tracing.zipkin.as_ref().map(|z| z.address.as_str());
        return match address {
            // Istio: a disabled side gets no tracing at all.
            Some(a) if !a.is_empty() && !disabled => Some(
                TracingSettings {
                    provider: "zipkin".into(),
                    exporter: TraceExporter::Zipkin {
                        endpoint: a.to_string(),
                        path: ZIPKIN_PATH.into(),
                        max_tag_length: 0,
                        w3c: false,
                    },
                    sampling_percent: sampling.unwrap_or_else(|| mesh.default_sampling()),
                    custom_tags: tags.cloned().unwrap_or(mesh_tracing.custom_tags.clone()),
                    report_spans: !disabled,
                    max_path_tag_length: mesh_tracing.max_path_tag_length,
                    export: export::placeholder(),
                    tracer: Default::default(),
                }
                .with_export(),
            ),
            _ => None,
        };
    };
    let exporter = match provider.kind() {
        ProviderKind::Zipkin(z) => TraceExporter::Zipkin {
            endpoint: format!("{}:{}", service_host(&z.service), z.port),
            path: if z.path.is_empty() {
                ZIPKIN_PATH.into()
            } else {
                z.path.clone()
            },
            max_tag_length: z.max_tag_length,
            w3c: z.trace_context_option
                == crate::config::mesh::TraceContextOption::UseB3WithW3cPropagation,
        },
        ProviderKind::OpenTelemetry(o) => TraceExporter::OpenTelemetry(o.clone()),
        // Not a tracing provider ambit can export to.
        _ => return None,
    };
    Some(
        TracingSettings {
            provider: provider.name.clone(),
            exporter,
            sampling_percent: sampling.unwrap_or_else(|| mesh.default_sampling()),
            custom_tags: tags.cloned().unwrap_or(mesh_tracing.custom_tags),
            report_spans: !disabled,
            max_path_tag_length: mesh_tracing.max_path_tag_length,
            export: export::placeholder(),
            tracer: Default::default(),
        }
        .with_export(),
    )
}

/// Istio's default Zipkin collector path.
pub const ZIPKIN_PATH: &str = "/api/v2/spans";

/// `[<namespace>/]<hostname>` → the hostname.
pub(super) fn service_host(service: &str) -> &str {
    service.rsplit_once('/').map_or(service, |(_, h)| h)
}

/// Istio `Telemetries.AccessLogging` and `mergeLogs` for one side.
fn access_log(mesh: &MeshConfig, applied: &[&Telemetry], side: WorkloadMode) -> AccessLogSettings {
    let groups: Vec<_> = applied
        .iter()
        .map(|t| &t.access_logging)
        .filter(|l| !l.is_empty())
        .collect();
    let defaults = &mesh.default_providers.access_logging;
    if groups.is_empty() && defaults.is_empty() {
        // Legacy mesh config: `accessLogFile` with `accessLogEncoding`/`accessLogFormat`.
        if mesh.access_log_file.is_empty() {
            return AccessLogSettings::default();
        }
        let format = mesh_format(mesh);
        let Ok(formatter) = format::Formatter::from_config(&format) else {
            return AccessLogSettings::default();
        };
        return AccessLogSettings {
            sinks: vec![AccessLogSink {
                provider: String::new(),
                path: mesh.access_log_file.clone(),
                format,
                formatter: Arc::new(formatter),
                filter: None,
            }],
        };
    }
    // name → (disabled, filter expression)
    let mut chosen: BTreeMap<String, (bool, Option<&str>)> = BTreeMap::new();
    if groups.is_empty() {
        chosen.extend(defaults.iter().map(|d| (d.clone(), (false, None))));
    } else {
        let mut in_scope: Vec<String> = defaults.clone();
        let mut filters: BTreeMap<String, Option<&str>> = BTreeMap::new();
        for group in &groups {
            let mut names = BTreeSet::new();
            for l in group.iter().filter(|l| mode_of(&l.match_).covers(side)) {
                for p in &l.providers {
                    names.insert(p.name.clone());
                    filters.insert(
                        p.name.clone(),
                        l.filter.as_ref().map(|f| f.expression.as_str()),
                    );
                }
            }
            if !names.is_empty() {
                in_scope = names.into_iter().collect();
            }
        }
        let mut parent: Vec<String> = defaults.clone();
        for group in &groups {
            for l in group.iter() {
                let mut names: Vec<String> = l.providers.iter().map(|p| p.name.clone()).collect();
                if names.is_empty() {
                    names = parent.clone();
                }
                parent = names.clone();
                if !mode_of(&l.match_).covers(side) {
                    continue;
                }
                for n in names.into_iter().filter(|n| in_scope.contains(n)) {
                    let entry = if l.disabled == Some(true) {
                        (true, None)
                    } else {
                        (false, filters.get(&n).copied().flatten())
                    };
                    chosen.insert(n, entry);
                }
            }
        }
    }
    let sinks = chosen
        .into_iter()
        .filter(|(_, (disabled, _))| !disabled)
        .filter_map(|(name, (_, filter))| {
            let p = mesh.provider(&name)?;
            let ProviderKind::FileAccessLog(f) = p.kind() else {
                // Only file access logs are written by ambit.
                return None;
            };
            let path = if f.path.is_empty() {
                super::mesh::DEV_STDOUT.to_string()
            } else {
                f.path.clone()
            };
            let format = match &f.log_format {
                // Istio: the built-in provider without a format follows the mesh's settings.
                None if p.name == ENVOY_PROVIDER && !f.omit_empty_values => mesh_format(mesh),
                None => LogFormat::Text(None),
                Some(spec) => match (&spec.text, &spec.labels) {
                    (Some(t), _) => LogFormat::Text(text_format(t)),
                    (None, Some(l)) => LogFormat::Json((!l.is_empty()).then(|| l.clone())),
                    (None, None) => LogFormat::Text(None),
                },
            };
            // Validated when the object was read; a filter that cannot compile logs nothing.
            let filter = match filter.map(Filter::compile) {
                None => None,
                Some(Ok(f)) => Some(Arc::new(f)),
                Some(Err(_)) => return None,
            };
            // A format Envoy would refuse (an unknown command) writes nothing.
            let formatter = Arc::new(format::Formatter::from_config(&format).ok()?);
            Some(AccessLogSink {
                provider: p.name.clone(),
                path,
                format,
                formatter,
                filter,
            })
        })
        .collect();
    AccessLogSettings { sinks }
}

/// Istio `FileAccessLogFromMeshConfig`: the mesh's encoding and format.
fn mesh_format(mesh: &MeshConfig) -> LogFormat {
    match mesh.access_log_encoding {
        AccessLogEncoding::Text => LogFormat::Text(text_format(&mesh.access_log_format)),
        AccessLogEncoding::Json => LogFormat::Json(
            serde_json::from_str::<serde_json::Map<String, Value>>(&mesh.access_log_format).ok(),
        ),
    }
}

/// Istio `fileAccessLogFormat`: empty is the default; a missing final newline is added.
fn text_format(text: &str) -> Option<String> {
    if text.is_empty() {
        None
    } else if text.ends_with('\n') {
        Some(text.to_string())
    } else {
        Some(format!("{text}\n"))
    }
}

/// Istio `mergeMetrics`, for the provider ambit exports (`prometheus`), one side.
fn metrics(mesh: &MeshConfig, applied: &[&Telemetry], side: WorkloadMode) -> MetricSettings {
    let rules: Vec<_> = applied.iter().flat_map(|t| &t.metrics).collect();
    let is_prom = |n: &str| n.eq_ignore_ascii_case(PROMETHEUS_PROVIDER);
    // Istio's standard install sets `defaultProviders.metrics: [prometheus]`; ambit assumes it
    // when the mesh config names none.
    let defaults: Vec<String> = if mesh.default_providers.metrics.is_empty() {
        vec![PROMETHEUS_PROVIDER.to_string()]
    } else {
        mesh.default_providers.metrics.clone()
    };
    let mut in_scope = defaults.clone();
    for r in &rules {
        if !r.providers.is_empty() {
            in_scope = r.providers.iter().map(|p| p.name.clone()).collect();
        }
    }
    let mut out = MetricSettings {
        enabled: in_scope.iter().any(|n| is_prom(n)),
        ..Default::default()
    };
    if !out.enabled {
        return out;
    }
    let mut parent = defaults;
    let mut all_disabled = false;
    for r in rules {
        let names: Vec<String> = if r.providers.is_empty() {
            parent.clone()
        } else {
            r.providers.iter().map(|p| p.name.clone()).collect()
        };
        parent = names.clone();
        if !names.iter().any(|n| is_prom(n)) {
            continue;
        }
        if r.reporting_interval.is_some() {
            out.reporting_interval = r.reporting_interval;
        }
        for o in &r.overrides {
            let m = o.match_.clone().unwrap_or_default();
            if !m.mode.covers(side) {
                continue;
            }
            let all =
                m.custom_metric.is_none() && m.metric.is_none_or(|x| x == IstioMetric::AllMetrics);
            if all && o.disabled == Some(true) {
                all_disabled = true;
                continue;
            }
            // Istio: a later override of the same provider and side enables it again.
            all_disabled = false;
            let names: Vec<String> = match (&m.custom_metric, m.metric) {
                (Some(c), _) => vec![c.clone()],
                (None, Some(x)) if x != IstioMetric::AllMetrics => vec![x.as_str().to_string()],
                _ => IstioMetric::EACH
                    .iter()
                    .map(|x| x.as_str().to_string())
                    .collect(),
            };
            for name in names {
                let entry = out.overrides.entry(name).or_default();
                if let Some(d) = o.disabled {
                    entry.disabled = d;
                }
                for (tag, t) in &o.tag_overrides {
                    let action = match t.operation {
                        TagOperation::Upsert => {
                            TagAction::Upsert(t.value.clone().unwrap_or_default())
                        }
                        TagOperation::Remove => TagAction::Remove,
                    };
                    entry.tags.insert(tag.clone(), action);
                }
            }
        }
    }
    if all_disabled {
        out.enabled = false;
    }
    out.tags = TagPlan::build(&out.overrides);
    out
}
