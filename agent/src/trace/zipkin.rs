//! Zipkin v2 JSON (`POST /api/v2/spans`, a JSON array of spans), the format Envoy's Zipkin tracer
//! sends with Istio's `collector_endpoint_version: HTTP_JSON`, and which Jaeger's collector
//! accepts on 9411. Field names follow the Zipkin v2 API (zipkin2-api.yaml).
//!
//! Written field by field into one buffer: at 100 % sampling every request's span passes here,
//! and most of a span is its tags' strings. A string with nothing to escape (nearly all of them:
//! ids, hosts, paths, Istio's names) is copied as it is; any other goes through serde_json.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use super::span::{Span, SpanKind};
use super::TraceError;

pub const CONTENT_TYPE: &str = "application/json";

/// About how long a span's JSON is (20-odd tags), before the first one is written.
const SPAN_JSON_BYTES: usize = 2048;

/// One batch as the JSON body of a `POST /api/v2/spans`.
pub fn encode(spans: &[Span]) -> Result<Vec<u8>, TraceError> {
    let mut out = Vec::with_capacity(SPAN_JSON_BYTES);
    out.push(b'[');
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        span(&mut out, s).map_err(|source| TraceError::Encode {
            spans: spans.len(),
            source,
        })?;
        if i == 0 {
            // The batch's spans are alike (one workload's, mostly): the buffer is sized from the
            // first, once, rather than grown and copied as the batch is written (512 spans are
            // most of a MiB).
            out.reserve((spans.len() - 1) * (out.len() + out.len() / 4) + 1);
        }
    }
    out.push(b']');
    Ok(out)
}

/// One span: `traceId`, `id`, `parentId`, `name`, `kind`, `timestamp`, `duration`,
/// `localEndpoint`, `remoteEndpoint`, `tags`, `debug`.
fn span(out: &mut Vec<u8>, s: &Span) -> Result<(), serde_json::Error> {
    let ctx = &s.context;
    write!(
        out,
        r#"{{"traceId":"{}","id":"{}""#,
        ctx.trace_id, ctx.span_id
    )
    .map_err(io)?;
    if let Some(parent) = ctx.parent_span_id {
        write!(out, r#","parentId":"{parent}""#).map_err(io)?;
    }
    out.extend_from_slice(br#","name":"#);
    string(out, &s.name)?;
    let kind = match s.kind {
        SpanKind::Client => "CLIENT",
        SpanKind::Server => "SERVER",
    };
    write!(
        out,
        r#","kind":"{kind}","timestamp":{},"duration":{}"#,
        s.timestamp_us, s.duration_us
    )
    .map_err(io)?;
    out.extend_from_slice(br#","localEndpoint":"#);
    // `Span::service_name`, `<canonical service>.<namespace>`, written without building it.
    let service = match s.workload.as_deref() {
        Some(w) => [w.canonical_service.as_str(), ".", w.namespace.as_str()],
        None => ["", "", ""],
    };
    endpoint(out, Some(&service[..]), s.local_ip())?;
    if let Some(ip) = s.remote_ip {
        out.extend_from_slice(br#","remoteEndpoint":"#);
        endpoint(out, None, Some(ip))?;
    }
    out.extend_from_slice(br#","tags":{"#);
    // Only a span with custom tags can name a tag twice (a custom tag over a standard one): its
    // tags go through a map so that the later value is the one sent.
    let custom = s.tags.has_custom();
    let mut first = true;
    let mut tag = |out: &mut Vec<u8>, (k, v): (&str, &str)| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        string(out, k)?;
        out.push(b':');
        string(out, v)
    };
    if custom {
        let tags: BTreeMap<&str, &str> = s.tags().collect();
        tags.into_iter().try_for_each(|t| tag(out, t))?;
    } else {
        s.tags().try_for_each(|t| tag(out, t))?;
    }
    out.push(b'}');
    if ctx.debug {
        out.extend_from_slice(br#","debug":true"#);
    }
    out.push(b'}');
    Ok(())
}

/// `{"serviceName":…,"ipv4":…}` or `"ipv6"`, each field when known.
fn endpoint(
    out: &mut Vec<u8>,
    service_name: Option<&[&str]>,
    ip: Option<IpAddr>,
) -> Result<(), serde_json::Error> {
    out.push(b'{');
    if let Some(name) = service_name {
        out.extend_from_slice(br#""serviceName":"#);
        joined(out, name)?;
    }
    if let Some(ip) = ip {
        let comma = if service_name.is_some() { "," } else { "" };
        let field = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        write!(out, r#"{comma}"{field}":"{ip}""#).map_err(io)?;
    }
    out.push(b'}');
    Ok(())
}

/// `s` as a JSON string: copied between quotes when it has nothing JSON escapes (a quote, a
/// backslash, a control character), else written by serde_json.
fn string(out: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    joined(out, &[s])
}

/// The concatenation of `parts` as one JSON string, as [`string`] writes it.
fn joined(out: &mut Vec<u8>, parts: &[&str]) -> Result<(), serde_json::Error> {
    // No early exit, so that the check runs over whole vectors of bytes.
    let escapes = |s: &str| {
        s.bytes()
            .fold(false, |e, b| e | (b < 0x20) | (b == b'"') | (b == b'\\'))
    };
    if parts.iter().any(|p| escapes(p)) {
        return serde_json::to_writer(&mut *out, &parts.concat());
    }
    out.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 2);
    out.push(b'"');
    parts
        .iter()
        .for_each(|p| out.extend_from_slice(p.as_bytes()));
    out.push(b'"');
    Ok(())
}

fn io(e: std::io::Error) -> serde_json::Error {
    serde_json::Error::io(e)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::trace::context::{SpanId, TraceContext, TraceId};
    use crate::trace::span::{Tags, Workload};

    fn span(tags: Tags) -> Span {
        Span {
            context: TraceContext {
                trace_id: TraceId {
                    high: 0x463ac35c9f6413ad,
                    low: 0x48485a3953bb6124,
                    wide: true,
                },
                span_id: SpanId(0xa2fb4a1d1a96d312),
                parent_span_id: Some(SpanId(1)),
                sampled: Some(true),
                debug: true,
            },
            kind: SpanKind::Server,
            name: "reviews.default.svc.cluster.local:9080/*".into(),
            timestamp_us: 1_700_000_000_000_000,
            duration_us: 42,
            tags,
            workload: Some(Arc::new(Workload {
                canonical_service: "reviews".into(),
                canonical_revision: "v1".into(),
                namespace: "default".into(),
                mesh_id: "cluster.local".into(),
                cluster_id: "Kubernetes".into(),
                node_id: "sidecar~10.0.0.1~reviews-0.default~default.svc.cluster.local".into(),
                ip: Some("10.0.0.1".parse().expect("ip")),
            })),
            istio_tags: true,
            remote_ip: Some("fd00::2".parse().expect("ip")),
            trace_state: String::new(),
        }
    }

    fn decoded(spans: &[Span]) -> Value {
        let body = encode(spans).expect("encode");
        serde_json::from_slice(&body).expect("valid JSON")
    }

    #[test]
    fn a_span_is_zipkin_v2_json_with_every_field() {
        let mut tags = Tags::default();
        tags.put("http.url", "http://reviews/a?b=\"c\"");
        tags.put("user_agent", "tab\there, back\\slash, é");
        tags.put_static("http.status_code", "200");
        let mut second = span(Tags::default());
        second.context.parent_span_id = None;
        second.context.debug = false;
        second.context.trace_id.wide = false;
        second.kind = SpanKind::Client;
        second.remote_ip = None;
        second.workload = None;
        let got = decoded(&[span(tags), second]);
        let want = json!([
            {
                "traceId": "463ac35c9f6413ad48485a3953bb6124",
                "id": "a2fb4a1d1a96d312",
                "parentId": "0000000000000001",
                "name": "reviews.default.svc.cluster.local:9080/*",
                "kind": "SERVER",
                "timestamp": 1_700_000_000_000_000u64,
                "duration": 42,
                "localEndpoint": {"serviceName": "reviews.default", "ipv4": "10.0.0.1"},
                "remoteEndpoint": {"ipv6": "fd00::2"},
                "tags": {
                    "node_id": "sidecar~10.0.0.1~reviews-0.default~default.svc.cluster.local",
                    "istio.canonical_revision": "v1",
                    "istio.canonical_service": "reviews",
                    "istio.mesh_id": "cluster.local",
                    "istio.namespace": "default",
                    "istio.cluster_id": "Kubernetes",
                    "http.url": "http://reviews/a?b=\"c\"",
                    "user_agent": "tab\there, back\\slash, é",
                    "http.status_code": "200"
                },
                "debug": true
            },
            {
                "traceId": "48485a3953bb6124",
                "id": "a2fb4a1d1a96d312",
                "name": "reviews.default.svc.cluster.local:9080/*",
                "kind": "CLIENT",
                "timestamp": 1_700_000_000_000_000u64,
                "duration": 42,
                "localEndpoint": {"serviceName": ""},
                "tags": {}
            }
        ]);
        assert_eq!(got, want);
        assert_eq!(encode(&[]).expect("encode"), b"[]");
    }

    #[test]
    fn a_custom_tag_over_a_standard_one_is_sent_once_with_its_value() {
        let mut tags = Tags::default();
        tags.put_static("component", "proxy");
        tags.put_custom("component", "mine");
        tags.put_custom("a \"quoted\" name", "v");
        let body = encode(&[span(tags)]).expect("encode");
        let text = String::from_utf8(body.clone()).expect("utf-8");
        assert_eq!(text.matches("\"component\"").count(), 1, "{text}");
        let got: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(got[0]["tags"]["component"], "mine");
        assert_eq!(got[0]["tags"]["a \"quoted\" name"], "v");
        assert_eq!(got[0]["tags"]["istio.namespace"], "default");
    }
}
