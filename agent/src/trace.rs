//! Distributed tracing as Istio's sidecars do it: trace-context propagation (B3 and W3C), the
//! sampling decision, CLIENT/SERVER spans with Envoy's names and tags, and batched export to a
//! Zipkin v2 collector or an OpenTelemetry collector (OTLP over gRPC or HTTP).
//!
//! The proxy calls it on the request path; this module imports nothing from the proxy. Per hop:
//!
//! ```text
//! let incoming = trace::extract(req.headers());            // B3 first, W3C as fallback (Envoy)
//! let decision = trace::decide(&incoming, percent);        // honour the caller's decision
//! let mut span = SpanBuilder::start(SpanKind::Client, name, &incoming, decision);
//! trace::inject(span.context(), req.headers_mut());        // B3 multi-header + traceparent
//! span.record_request(&request_info, &workload, &tags);    // no-op when not sampled
//! ... forward, get the response ...
//! tracer.finish(span.end(&response_info));                 // non-blocking; drops when full
//! ```

mod context;
mod export;
mod otlp;
mod queue;
mod sampling;
mod span;
mod zipkin;

use std::time::Duration;

use thiserror::Error;

pub use context::{
    context_index, extract, inject, inject_as, next_hop, Carried, Extracted, Firsts, NextHop,
    Propagation, SpanId, TraceContext, TraceId, CONTEXT_HEADERS,
};
pub use export::{TraceMetrics, Tracer, TracerSlot, Tracers};
pub use sampling::{decide, Decision, DecisionReason};
pub use span::{
    operation_name, CustomTag, CustomTagValue, RequestInfo, ResponseInfo, Span, SpanBuilder,
    SpanKind, TagSettings, Workload,
};

/// Istio: `defaultConfig.tracing.sampling` / `PILOT_TRACE_SAMPLING` default to 1 %.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;
/// Istio: `max_path_tag_length` (the `http.url` tag) defaults to 256.
pub const DEFAULT_MAX_PATH_TAG_LENGTH: usize = 256;
/// Istio: a Zipkin provider's default path (Envoy dropped the v1 API).
pub const ZIPKIN_DEFAULT_PATH: &str = "/api/v2/spans";
/// OTLP/HTTP's trace path (OpenTelemetry protocol specification).
pub const OTLP_HTTP_DEFAULT_PATH: &str = "/v1/traces";

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("tracing provider: field {field}: {value:?} is not a valid URL: {reason}")]
    BadUrl {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("tracing provider: header {name:?} cannot be sent: {reason}")]
    BadHeader { name: String, reason: String },
    #[error("tracing: field {field}: {value} is outside 0..=100")]
    BadPercent { field: &'static str, value: f64 },
    #[error("tracing: field {field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("exporting {spans} spans to {endpoint}: could not connect or send")]
    Send {
        endpoint: String,
        spans: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("exporting {spans} spans to {endpoint}: no answer within {timeout:?}")]
    Timeout {
        endpoint: String,
        spans: usize,
        timeout: Duration,
    },
    #[error("exporting {spans} spans to {endpoint}: collector answered {status}")]
    Rejected {
        endpoint: String,
        spans: usize,
        status: String,
    },
    #[error("encoding {spans} spans as Zipkin v2 JSON")]
    Encode {
        spans: usize,
        #[source]
        source: serde_json::Error,
    },
}

impl TraceError {
    /// The `reason` label of `ambit_spans_dropped_total` for spans lost to this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TraceError::Send { .. } => "export_failed",
            TraceError::Timeout { .. } => "export_timeout",
            TraceError::Rejected { .. } => "export_rejected",
            TraceError::Encode { .. } => "encode_failed",
            TraceError::BadUrl { .. }
            | TraceError::BadHeader { .. }
            | TraceError::BadPercent { .. }
            | TraceError::Zero { .. } => "config",
        }
    }
}

/// Where spans go: one tracer (queue, batcher, connection) per distinct provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Zipkin v2 JSON, `POST {url}` (e.g. `http://jaeger-collector.observability:9411/api/v2/spans`).
    Zipkin { url: String },
    /// OTLP over gRPC, `TraceService/Export` at `endpoint` (e.g. `http://otel-collector:4317`),
    /// with Istio's `grpc.initialMetadata` on every call.
    OtlpGrpc {
        endpoint: String,
        headers: Vec<(String, String)>,
    },
    /// OTLP over HTTP, protobuf body, `POST {url}` (e.g. `http://otel-collector:4318/v1/traces`),
    /// with Istio's `http.headers` on every request.
    OtlpHttp {
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Provider {
    /// The collector address as configured, for logs and errors.
    pub fn endpoint(&self) -> &str {
        match self {
            Provider::Zipkin { url } | Provider::OtlpHttp { url, .. } => url,
            Provider::OtlpGrpc { endpoint, .. } => endpoint,
        }
    }

    /// The headers (gRPC metadata) sent with every export.
    pub fn headers(&self) -> &[(String, String)] {
        match self {
            Provider::Zipkin { .. } => &[],
            Provider::OtlpHttp { headers, .. } | Provider::OtlpGrpc { headers, .. } => headers,
        }
    }

    /// A Zipkin provider from Istio's `host:port` address form (`zipkin.address`,
    /// `extensionProviders[].zipkin.service`/`port`), with Istio's default path.
    pub fn zipkin_address(address: &str) -> Provider {
        Provider::Zipkin {
            url: format!("http://{address}{ZIPKIN_DEFAULT_PATH}"),
        }
    }
}

/// How a tracer batches and how long it waits for a collector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchSettings {
    /// Spans waiting between the data path and the exporter; more are dropped and counted.
    pub queue_capacity: usize,
    /// A batch is sent once it holds this many spans...
    pub max_batch: usize,
    /// ...or this long after the last send, whichever comes first.
    pub flush_interval: Duration,
    /// A dead collector must cost little: connecting gives up after this.
    pub connect_timeout: Duration,
    /// One export (connect + send + answer) gives up after this.
    pub request_timeout: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            queue_capacity: 4096,
            max_batch: 512,
            // Envoy: `tracing.zipkin.flush_interval_ms` 5000 and `request_timeout` 5000.
            flush_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl BatchSettings {
    pub fn validate(&self) -> Result<(), TraceError> {
        for (field, zero) in [
            ("queue_capacity", self.queue_capacity == 0),
            ("max_batch", self.max_batch == 0),
            ("flush_interval", self.flush_interval.is_zero()),
            ("connect_timeout", self.connect_timeout.is_zero()),
            ("request_timeout", self.request_timeout.is_zero()),
        ] {
            if zero {
                return Err(TraceError::Zero { field });
            }
        }
        Ok(())
    }
}

/// One resolved tracing configuration (mesh config or Telemetry API, already merged).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// Percent of new traces sampled (0..=100); an incoming decision always wins.
    pub sampling_percent: f64,
    pub provider: Provider,
    pub tags: TagSettings,
    pub batch: BatchSettings,
    /// The headers written for the next hop.
    pub propagation: Propagation,
}

impl TraceSettings {
    pub fn new(provider: Provider) -> TraceSettings {
        TraceSettings {
            sampling_percent: DEFAULT_SAMPLING_PERCENT,
            // Envoy's tracers: Zipkin writes B3, OpenTelemetry writes W3C.
            propagation: match provider {
                Provider::Zipkin { .. } => Propagation::B3,
                _ => Propagation::W3c,
            },
            provider,
            tags: TagSettings::default(),
            batch: BatchSettings::default(),
        }
    }

    pub fn validate(&self) -> Result<(), TraceError> {
        if !(0.0..=100.0).contains(&self.sampling_percent) {
            return Err(TraceError::BadPercent {
                field: "sampling_percent",
                value: self.sampling_percent,
            });
        }
        export::check_provider(&self.provider)?;
        self.batch.validate()
    }
}

#[cfg(test)]
mod tests;
