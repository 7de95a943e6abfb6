//! A side's tracing settings as the span exporter (`crate::trace`) takes them: the provider's
//! collector URL, the sampling rate, the custom tags with their values, the path-tag length.

use http::HeaderName;

use super::{TraceExporter, TracingSettings};
use crate::trace::{self, CustomTag, Provider, TagSettings, TraceSettings};

/// What `export` holds until [`TracingSettings::with_export`] fills it.
pub(super) fn placeholder() -> TraceSettings {
    TraceSettings::new(Provider::Zipkin { url: String::new() })
}

impl TracingSettings {
    /// Fills `export` from the other fields.
    pub(super) fn with_export(mut self) -> TracingSettings {
        let provider = match &self.exporter {
            TraceExporter::Zipkin { endpoint, path, .. } => Provider::Zipkin {
                url: format!("http://{endpoint}{path}"),
            },
            TraceExporter::OpenTelemetry(o) => match &o.http {
                // Istio: with `http`, OTLP over HTTP at `path` (default `/v1/traces`); else gRPC.
                Some(h) => Provider::OtlpHttp {
                    headers: collector_headers(&h.headers),
                    url: format!(
                        "http://{}:{}{}",
                        super::service_host(&o.service),
                        o.port,
                        if h.path.is_empty() {
                            trace::OTLP_HTTP_DEFAULT_PATH
                        } else {
                            &h.path
                        }
                    ),
                },
                None => Provider::OtlpGrpc {
                    headers: o
                        .grpc
                        .as_ref()
                        .map(|g| collector_headers(&g.initial_metadata))
                        .unwrap_or_default(),
                    endpoint: format!("http://{}:{}", super::service_host(&o.service), o.port),
                },
            },
        };
        let custom_tags = self
            .custom_tags
            .iter()
            .filter_map(|(tag, c)| {
                if let Some(l) = &c.literal {
                    return Some(CustomTag::literal(tag, &l.value));
                }
                if let Some(h) = &c.header {
                    let name =
                        HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?;
                    return Some(CustomTag::header(tag, name, h.default_value.clone()));
                }
                c.environment
                    .as_ref()
                    .map(|e| CustomTag::environment(tag, &e.name, e.default_value.clone()))
            })
            .collect();
        self.export = TraceSettings {
            sampling_percent: self.sampling_percent,
            provider,
            tags: TagSettings {
                custom_tags,
                max_path_tag_length: match self.max_path_tag_length {
                    0 => trace::DEFAULT_MAX_PATH_TAG_LENGTH,
                    n => n as usize,
                },
                istio_tags: true,
            },
            propagation: match &self.exporter {
                TraceExporter::Zipkin { w3c: true, .. } => trace::Propagation::B3AndW3c,
                TraceExporter::Zipkin { .. } => trace::Propagation::B3,
                TraceExporter::OpenTelemetry(_) => trace::Propagation::W3c,
            },
            batch: trace::BatchSettings {
                // Istio's `http.timeout` / `grpc.timeout`: how long one export may take.
                request_timeout: match &self.exporter {
                    TraceExporter::OpenTelemetry(o) => o
                        .http
                        .as_ref()
                        .and_then(|h| h.timeout)
                        .or_else(|| o.grpc.as_ref().and_then(|g| g.timeout)),
                    TraceExporter::Zipkin { .. } => None,
                }
                .filter(|t| !t.is_zero())
                .unwrap_or(trace::BatchSettings::default().request_timeout),
                ..Default::default()
            },
        };
        self
    }
}

/// Istio's collector headers: a literal `value`, or the value of the agent's environment
/// variable `envName` (read when the config is applied; a header whose variable is unset is not
/// sent).
fn collector_headers(headers: &[crate::config::mesh::HttpHeader]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|h| {
            let value = match (&h.value, &h.env_name) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(var)) => std::env::var(var).ok(),
                (None, None) => None,
            }?;
            Some((h.name.clone(), value))
        })
        .collect()
}
