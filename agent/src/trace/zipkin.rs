//! Zipkin v2 JSON (`POST /api/v2/spans`, a JSON array of spans), the format Envoy's Zipkin tracer
//! sends with Istio's `collector_endpoint_version: HTTP_JSON`, and which Jaeger's collector
//! accepts on 9411. Field names follow the Zipkin v2 API (zipkin2-api.yaml).

use std::collections::BTreeMap;
use std::net::IpAddr;

use std::borrow::Cow;

use serde::{Serialize, Serializer};

use super::context::{SpanId, TraceId};
use super::span::{Span, SpanKind};
use super::TraceError;

pub const CONTENT_TYPE: &str = "application/json";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ZipkinSpan<'a> {
    trace_id: Shown<TraceId>,
    id: Shown<SpanId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<Shown<SpanId>>,
    name: &'a str,
    kind: &'static str,
    timestamp: u64,
    duration: u64,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    tags: Tags<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    debug: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    service_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv4: Option<Shown<IpAddr>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ipv6: Option<Shown<IpAddr>>,
}

/// A value written as its `Display` text, straight into the JSON (no `String` per id).
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A span's tags as a JSON object, written from the span as they are. Only a span with custom
/// tags can name a tag twice (a custom tag over a standard one); its tags go through a map so
/// the later value is the one sent.
struct Tags<'a>(&'a Span);

impl Serialize for Tags<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let custom = self.0.tags.iter().any(|(k, _)| matches!(k, Cow::Owned(_)));
        if custom {
            let tags: BTreeMap<&str, &str> = self.0.tags().collect();
            return s.collect_map(tags);
        }
        s.collect_map(self.0.tags())
    }
}

fn endpoint(service_name: Option<&str>, ip: Option<IpAddr>) -> Endpoint<'_> {
    Endpoint {
        service_name,
        ipv4: ip.filter(IpAddr::is_ipv4).map(Shown),
        ipv6: ip.filter(IpAddr::is_ipv6).map(Shown),
    }
}

/// One batch as the JSON body of a `POST /api/v2/spans`.
pub fn encode(spans: &[Span]) -> Result<Vec<u8>, TraceError> {
    let names: Vec<String> = spans.iter().map(Span::service_name).collect();
    let body: Vec<ZipkinSpan<'_>> = spans
        .iter()
        .zip(&names)
        .map(|(s, service)| ZipkinSpan {
            trace_id: Shown(s.context.trace_id),
            id: Shown(s.context.span_id),
            parent_id: s.context.parent_span_id.map(Shown),
            name: &s.name,
            kind: match s.kind {
                SpanKind::Client => "CLIENT",
                SpanKind::Server => "SERVER",
            },
            timestamp: s.timestamp_us,
            duration: s.duration_us,
            local_endpoint: endpoint(Some(service), s.local_ip()),
            remote_endpoint: s.remote_ip.map(|ip| endpoint(None, Some(ip))),
            tags: Tags(s),
            debug: s.context.debug,
        })
        .collect();
    // About 1 KiB a span: reserved up front rather than grown (and copied) as it is written.
    let mut out = Vec::with_capacity(spans.len() * 1024);
    serde_json::to_writer(&mut out, &body).map_err(|source| TraceError::Encode {
        spans: spans.len(),
        source,
    })?;
    Ok(out)
}
