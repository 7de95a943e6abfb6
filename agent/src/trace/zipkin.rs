//! Zipkin v2 JSON (`POST /api/v2/spans`, a JSON array of spans), the format Envoy's Zipkin tracer
//! sends with Istio's `collector_endpoint_version: HTTP_JSON`, and which Jaeger's collector
//! accepts on 9411. Field names follow the Zipkin v2 API (zipkin2-api.yaml).
//!
//! Written field by field into one buffer: at 100 % sampling every request's span passes here,
//! and most of a span is its tags' strings. A string with nothing to escape (nearly all of them:
//! ids, hosts, paths, Istio's names) is copied as it is; any other goes through serde_json.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;

use super::context::hex16;
use super::span::{address, Span, SpanKind, Workload};
use super::TraceError;

pub const CONTENT_TYPE: &str = "application/json";

/// About how long a span's JSON is (20-odd tags), before the first one is written.
const SPAN_JSON_BYTES: usize = 2048;

/// One batch as the JSON body of a `POST /api/v2/spans`.
pub fn encode(spans: &[Span]) -> Result<Vec<u8>, TraceError> {
    let mut out = Vec::with_capacity(SPAN_JSON_BYTES);
    let mut written = None;
    out.push(b'[');
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        span(&mut out, s, &mut written).map_err(|source| TraceError::Encode {
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

/// Where the batch already holds a workload's own JSON: its `localEndpoint` object and its tags
/// (`node_id`, `istio.*`). A batch is mostly one workload's spans: later ones copy these bytes
/// instead of writing (and checking for escapes) the same strings again.
struct Written {
    workload: Arc<Workload>,
    istio_tags: bool,
    endpoint: Range<usize>,
    tags: Range<usize>,
}

/// One span: `traceId`, `id`, `parentId`, `name`, `kind`, `timestamp`, `duration`,
/// `localEndpoint`, `remoteEndpoint`, `tags`, `debug`.
fn span(
    out: &mut Vec<u8>,
    s: &Span,
    written: &mut Option<Written>,
) -> Result<(), serde_json::Error> {
    let ctx = &s.context;
    out.extend_from_slice(br#"{"traceId":""#);
    if ctx.trace_id.wide {
        out.extend_from_slice(&hex16(ctx.trace_id.high));
    }
    out.extend_from_slice(&hex16(ctx.trace_id.low));
    out.extend_from_slice(br#"","id":""#);
    out.extend_from_slice(&hex16(ctx.span_id.0));
    out.push(b'"');
    if let Some(parent) = ctx.parent_span_id {
        out.extend_from_slice(br#","parentId":""#);
        out.extend_from_slice(&hex16(parent.0));
        out.push(b'"');
    }
    out.extend_from_slice(br#","name":"#);
    string(out, &s.name)?;
    out.extend_from_slice(match s.kind {
        SpanKind::Client => br#","kind":"CLIENT","timestamp":"#,
        SpanKind::Server => br#","kind":"SERVER","timestamp":"#,
    });
    let mut number = itoa::Buffer::new();
    out.extend_from_slice(number.format(s.timestamp_us).as_bytes());
    out.extend_from_slice(br#","duration":"#);
    out.extend_from_slice(number.format(s.duration_us).as_bytes());
    out.extend_from_slice(br#","localEndpoint":"#);
    // The span's workload's, as the batch holds them already.
    let known = s.workload.as_ref().and_then(|w| {
        written
            .as_ref()
            .filter(|k| Arc::ptr_eq(&k.workload, w) && k.istio_tags == s.istio_tags)
    });
    let endpoint_at = out.len();
    match known {
        Some(k) => out.extend_from_within(k.endpoint.clone()),
        None => {
            // `Span::service_name`, written without building it.
            let service = s
                .workload
                .as_deref()
                .map_or(["", "", ""], Workload::service_parts);
            endpoint(out, Some(&service[..]), s.local_ip())?;
        }
    }
    let endpoint_at = endpoint_at..out.len();
    if let Some(ip) = s.remote_ip {
        out.extend_from_slice(br#","remoteEndpoint":"#);
        endpoint(out, None, Some(ip))?;
    }
    out.extend_from_slice(br#","tags":{"#);
    // Whether no tag is written yet (then the next needs no comma).
    let mut first = true;
    let tag = |out: &mut Vec<u8>, first: &mut bool, (k, v): (&str, &str)| {
        if !std::mem::take(first) {
            out.push(b',');
        }
        string(out, k)?;
        out.push(b':');
        string(out, v)
    };
    // Only a span with custom tags can name a tag twice (a custom tag over a standard one): its
    // tags go through a map so that the later value is the one sent.
    if s.tags.has_custom() {
        let tags: BTreeMap<&str, &str> = s.tags().collect();
        tags.into_iter().try_for_each(|t| tag(out, &mut first, t))?;
    } else {
        let tags_at = out.len();
        match known {
            Some(k) => {
                out.extend_from_within(k.tags.clone());
                first = k.tags.is_empty();
            }
            None => s
                .workload_tags()
                .try_for_each(|t| tag(out, &mut first, t))?,
        }
        let tags_at = tags_at..out.len();
        if let (None, Some(w)) = (known, &s.workload) {
            *written = Some(Written {
                workload: w.clone(),
                istio_tags: s.istio_tags,
                endpoint: endpoint_at,
                tags: tags_at,
            });
        }
        s.tags.iter().try_for_each(|t| tag(out, &mut first, t))?;
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
        if service_name.is_some() {
            out.push(b',');
        }
        out.extend_from_slice(match ip {
            IpAddr::V4(_) => br#""ipv4":""#,
            IpAddr::V6(_) => br#""ipv6":""#,
        });
        address(ip, |p| out.extend_from_slice(p.as_bytes()));
        out.push(b'"');
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
    fn a_batch_is_each_span_as_it_is_written_alone() {
        let mut a = span(Tags::default());
        a.tags.put("http.url", "http://a/1");
        a.tags.put("peer.address", "10.0.0.9");
        let mut other = a.clone();
        other.workload = Some(Arc::new(Workload {
            canonical_service: "ratings \"quoted\"".into(),
            ip: Some("10.0.0.2".parse().expect("ip")),
            ..a.workload.as_deref().expect("workload").clone()
        }));
        let mut bare = a.clone();
        bare.istio_tags = false;
        let mut custom = a.clone();
        custom.tags.put_custom("istio.namespace", "mine");
        let mut none = a.clone();
        none.workload = None;
        let batch = [
            a.clone(),
            a.clone(),
            other,
            a.clone(),
            bare,
            custom,
            none,
            a,
        ];
        let whole = decoded(&batch);
        let alone: Vec<Value> = batch
            .iter()
            .map(|s| decoded(std::slice::from_ref(s))[0].clone())
            .collect();
        assert_eq!(whole, Value::Array(alone));
        assert_eq!(
            whole[2]["localEndpoint"]["serviceName"],
            "ratings \"quoted\".default"
        );
        assert_eq!(whole[3]["tags"]["istio.canonical_service"], "reviews");
        assert_eq!(whole[4]["tags"].get("istio.namespace"), None);
        assert_eq!(whole[5]["tags"]["istio.namespace"], "mine");
        assert_eq!(whole[6]["tags"].get("node_id"), None);
        assert_eq!(whole[7]["tags"]["node_id"], whole[0]["tags"]["node_id"]);
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
