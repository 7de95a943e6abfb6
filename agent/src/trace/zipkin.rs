//! Zipkin v2 JSON (`POST /api/v2/spans`, a JSON array of spans), the format Envoy's Zipkin tracer
//! sends with Istio's `collector_endpoint_version: HTTP_JSON`, and which Jaeger's collector
//! accepts on 9411. Field names follow the Zipkin v2 API (zipkin2-api.yaml).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use super::span::{Span, SpanKind};
use super::TraceError;

pub const CONTENT_TYPE: &str = "application/json";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    kind: &'static str,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    debug: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<String>,
}

fn endpoint(service_name: Option<&str>, ip: Option<IpAddr>) -> Endpoint<'_> {
    Endpoint {
        service_name,
        ipv4: ip.filter(IpAddr::is_ipv4).map(|ip| ip.to_string()),
        ipv6: ip.filter(IpAddr::is_ipv6).map(|ip| ip.to_string()),
    }
}

/// One batch as the JSON body of a `POST /api/v2/spans`.
pub fn encode(spans: &[Span]) -> Result<Vec<u8>, TraceError> {
    let names: Vec<String> = spans.iter().map(Span::service_name).collect();
    let body: Vec<ZipkinSpan<'_>> = spans
        .iter()
        .zip(&names)
        .map(|(s, service)| ZipkinSpan {
            trace_id: s.context.trace_id.to_string(),
            id: s.context.span_id.to_string(),
            parent_id: s.context.parent_span_id.map(|p| p.to_string()),
            name: &s.name,
            kind: match s.kind {
                SpanKind::Client => "CLIENT",
                SpanKind::Server => "SERVER",
            },
            timestamp: s.timestamp_us,
            duration: s.duration_us,
            local_endpoint: endpoint(Some(service), s.local_ip()),
            remote_endpoint: s.remote_ip.map(|ip| endpoint(None, Some(ip))),
            // Later values win, so a custom tag can override a standard one.
            tags: s.tags().collect(),
            debug: s.context.debug,
        })
        .collect();
    serde_json::to_vec(&body).map_err(|source| TraceError::Encode {
        spans: spans.len(),
        source,
    })
}
