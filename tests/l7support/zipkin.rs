//! A Zipkin collector in a pod, for the tracing tests: it decodes each batch with the Zipkin v2
//! API's schema (zipkin2-api.yaml, definitions `Span`, `Endpoint`, `Annotation`; unknown fields
//! refused, ids and kinds checked against the schema's patterns and enum).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use ambit::harness::apps::ServerThread;
use ambit::harness::Pod;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;

use super::otlp::Received;
use super::{full, listen_in_pod};

/// zipkin2-api.yaml `Span`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ZipkinSpan {
    trace_id: String,
    id: String,
    parent_id: Option<String>,
    name: Option<String>,
    kind: Option<String>,
    timestamp: Option<u64>,
    duration: Option<u64>,
    local_endpoint: Option<ZipkinEndpoint>,
    remote_endpoint: Option<ZipkinEndpoint>,
    #[serde(default)]
    annotations: Vec<ZipkinAnnotation>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[allow(dead_code)]
    debug: Option<bool>,
    #[allow(dead_code)]
    shared: Option<bool>,
}

/// zipkin2-api.yaml `Endpoint`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ZipkinEndpoint {
    service_name: Option<String>,
    ipv4: Option<std::net::Ipv4Addr>,
    ipv6: Option<std::net::Ipv6Addr>,
    #[allow(dead_code)]
    port: Option<u16>,
}

/// zipkin2-api.yaml `Annotation`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ZipkinAnnotation {
    timestamp: u64,
    value: String,
}

fn lower_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// A schema-valid span as [`Received`], or what breaks the schema's rules.
fn checked(s: ZipkinSpan) -> Result<Received, String> {
    // traceId: 16 or 32 lower-hex; id and parentId: 16.
    if !lower_hex(&s.trace_id, &[16, 32]) || !lower_hex(&s.id, &[16]) {
        return Err(format!("ids {} / {}", s.trace_id, s.id));
    }
    if let Some(p) = s.parent_id.as_deref().filter(|p| !lower_hex(p, &[16])) {
        return Err(format!("parentId {p}"));
    }
    let kind = s.kind.ok_or("a span without kind")?;
    if !["CLIENT", "SERVER", "PRODUCER", "CONSUMER"].contains(&kind.as_str()) {
        return Err(format!("kind {kind}"));
    }
    if s.timestamp.is_none() || s.duration.is_none() {
        return Err(format!("span {} without timestamp or duration", s.id));
    }
    let local = s.local_endpoint.ok_or("a span without localEndpoint")?;
    if local.ipv4.is_none() && local.ipv6.is_none() {
        return Err(format!("span {}: localEndpoint without an address", s.id));
    }
    let _ = (s.remote_endpoint, s.annotations);
    Ok(Received {
        trace_id: s.trace_id,
        id: s.id,
        parent_id: s.parent_id,
        name: s.name.unwrap_or_default(),
        kind,
        service_name: local.service_name.unwrap_or_default(),
        tags: s.tags,
    })
}

/// A batch body: a JSON array of spans, each checked.
fn decode(body: &[u8]) -> Result<Vec<Received>, String> {
    let spans: Vec<ZipkinSpan> =
        serde_json::from_slice(body).map_err(|e| format!("Zipkin v2 JSON: {e}"))?;
    spans.into_iter().map(checked).collect()
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<Received>>,
    /// Batches that broke the schema: `spans()` fails on them.
    errors: Mutex<Vec<String>>,
}

/// A Zipkin v2 collector in a pod (Jaeger's collector listens so on 9411, where Istio's install
/// guides point `zipkin.address`): `POST /api/v2/spans` with a JSON array of spans; 202 as
/// Zipkin answers, 400 for a batch the schema refuses.
pub struct ZipkinCollector {
    store: Arc<Store>,
    _thread: ServerThread,
}

impl ZipkinCollector {
    pub fn start(pod: &Pod, port: u16) -> ZipkinCollector {
        let store = Arc::new(Store::default());
        let s = store.clone();
        let (thread, _) = listen_in_pod(pod, port, move |stream| {
            let store = s.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok = req.method() == http::Method::POST
                            && req.uri().path() == "/api/v2/spans";
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let status = match (ok, body) {
                            (true, Ok(b)) => match decode(&b) {
                                Ok(batch) => {
                                    store.spans.lock().expect("spans").extend(batch);
                                    202
                                }
                                Err(e) => {
                                    store.errors.lock().expect("errors").push(e);
                                    400
                                }
                            },
                            _ => 400,
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .body(full(Bytes::new()))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        ZipkinCollector {
            store,
            _thread: thread,
        }
    }

    /// Every span received so far; fails if a batch broke the schema.
    pub fn spans(&self) -> Vec<Received> {
        let errors = self.store.errors.lock().expect("errors").clone();
        assert!(
            errors.is_empty(),
            "the collector refused batches: {errors:?}"
        );
        self.store.spans.lock().expect("spans").clone()
    }
}
