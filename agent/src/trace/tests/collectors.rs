//! Test collectors that decode what a tracer sends with the real schemas: Zipkin v2 JSON through
//! serde structs that follow zipkin2-api.yaml (unknown fields refused), and OTLP through the
//! protobuf types of `opentelemetry-proto` over gRPC (tonic `TraceServiceServer`) and HTTP
//! (hyper + prost). Each keeps what it received in one normalized form.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// A span as any of the collectors received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// 32 lower-hex digits (a 64-bit Zipkin id is left-padded, as OTLP carries it).
    pub trace_id: String,
    pub id: String,
    pub parent_id: Option<String>,
    pub name: String,
    /// "CLIENT" / "SERVER".
    pub kind: String,
    pub service_name: String,
    pub tags: BTreeMap<String, String>,
    pub timestamp_us: u64,
    pub duration_us: u64,
}

#[derive(Default)]
pub struct Store {
    spans: Mutex<Vec<Received>>,
    /// Batches that did not follow the schema: a test fails on the first `wait_for`.
    errors: Mutex<Vec<String>>,
    /// Each export's headers (gRPC: its metadata).
    headers: Mutex<Vec<http::HeaderMap>>,
    changed: Notify,
}

impl Store {
    fn push(&self, spans: Vec<Received>) {
        self.spans.lock().expect("store").extend(spans);
        self.changed.notify_waiters();
    }

    fn error(&self, e: String) {
        self.errors.lock().expect("store").push(e);
        self.changed.notify_waiters();
    }

    fn saw(&self, headers: http::HeaderMap) {
        self.headers.lock().expect("store").push(headers);
    }

    /// The values of header `name` on the exports so far.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .lock()
            .expect("store")
            .iter()
            .flat_map(|h| {
                h.get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("store").clone()
    }

    /// Waits until at least `n` spans arrived. The deadline only turns a hang into a message.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                let errors = self.errors.lock().expect("store").clone();
                assert!(errors.is_empty(), "collector refused batches: {errors:?}");
                let got = self.spans();
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("collector: {n} spans never arrived: {:?}", self.spans()))
    }
}

// ---- Zipkin v2 JSON (zipkin2-api.yaml, definitions Span / Endpoint / Annotation) ----

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
    debug: Option<bool>,
    shared: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ZipkinEndpoint {
    service_name: Option<String>,
    ipv4: Option<String>,
    ipv6: Option<String>,
    port: Option<u16>,
}

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

fn from_zipkin(s: ZipkinSpan) -> Result<Received, String> {
    // The schema's patterns: traceId 16 or 32 lower-hex, id/parentId 16 lower-hex.
    if !lower_hex(&s.trace_id, &[16, 32]) || !lower_hex(&s.id, &[16]) {
        return Err(format!("bad ids {} / {}", s.trace_id, s.id));
    }
    if let Some(p) = &s.parent_id {
        if !lower_hex(p, &[16]) {
            return Err(format!("bad parentId {p}"));
        }
    }
    let kind = s.kind.ok_or("no kind")?;
    if !["CLIENT", "SERVER", "PRODUCER", "CONSUMER"].contains(&kind.as_str()) {
        return Err(format!("bad kind {kind}"));
    }
    let local = s.local_endpoint.ok_or("no localEndpoint")?;
    if let Some(ip) = &local.ipv4 {
        ip.parse::<std::net::Ipv4Addr>()
            .map_err(|e| format!("ipv4 {ip}: {e}"))?;
    }
    if let Some(remote) = &s.remote_endpoint {
        if let Some(ip) = &remote.ipv4 {
            ip.parse::<std::net::Ipv4Addr>()
                .map_err(|e| format!("ipv4 {ip}: {e}"))?;
        }
    }
    let _ = (local.ipv6, local.port, s.debug, s.shared, s.annotations);
    Ok(Received {
        trace_id: format!("{:0>32}", s.trace_id),
        id: s.id,
        parent_id: s.parent_id,
        name: s.name.unwrap_or_default(),
        kind,
        service_name: local.service_name.unwrap_or_default(),
        tags: s.tags,
        timestamp_us: s.timestamp.ok_or("no timestamp")?,
        duration_us: s.duration.ok_or("no duration")?,
    })
}

// ---- OTLP ----

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        other => panic!("attribute is not a string: {other:?}"),
    }
}

fn from_otlp(req: ExportTraceServiceRequest) -> Vec<Received> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.expect("resource");
        let service_name = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .map(|kv| string_value(&kv.value))
            .expect("service.name resource attribute");
        for ss in rs.scope_spans {
            for s in ss.spans {
                assert_eq!(s.trace_id.len(), 16, "OTLP trace_id is 16 bytes");
                assert_eq!(s.span_id.len(), 8, "OTLP span_id is 8 bytes");
                let kind = match s.kind {
                    2 => "SERVER",
                    3 => "CLIENT",
                    k => panic!("span kind {k}"),
                };
                out.push(Received {
                    trace_id: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name,
                    kind: kind.to_string(),
                    service_name: service_name.clone(),
                    tags: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), string_value(&kv.value)))
                        .collect(),
                    timestamp_us: s.start_time_unix_nano / 1_000,
                    duration_us: (s.end_time_unix_nano - s.start_time_unix_nano) / 1_000,
                });
            }
        }
    }
    out
}

/// A batch body → the spans in it and the answer body, or why it breaks the schema.
type Decode = fn(&[u8]) -> Result<(Vec<Received>, Vec<u8>), String>;

pub struct Collector {
    pub addr: SocketAddr,
    pub store: Arc<Store>,
}

/// Serves one HTTP/1.1 endpoint; `handle` turns a request body into spans or an error answer.
async fn http_collector(path: &'static str, ok: StatusCode, decode: Decode) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = Arc::new(Store::default());
    let s = store.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        store.saw(req.headers().clone());
                        let wrong_path =
                            req.uri().path() != path || req.method() != http::Method::POST;
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let (status, out) = match (wrong_path, body) {
                            (true, _) => (StatusCode::NOT_FOUND, Vec::new()),
                            (false, Err(e)) => {
                                (StatusCode::BAD_REQUEST, e.to_string().into_bytes())
                            }
                            (false, Ok(body)) => match decode(&body) {
                                Ok((spans, answer)) => {
                                    store.push(spans);
                                    (ok, answer)
                                }
                                Err(e) => {
                                    store.error(e.clone());
                                    (StatusCode::BAD_REQUEST, e.into_bytes())
                                }
                            },
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(out)));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Collector { addr, store }
}

/// Zipkin's API answers 202 Accepted.
pub async fn zipkin() -> Collector {
    http_collector("/api/v2/spans", StatusCode::ACCEPTED, |body| {
        let spans: Vec<ZipkinSpan> =
            serde_json::from_slice(body).map_err(|e| format!("Zipkin v2 JSON: {e}"))?;
        let spans = spans
            .into_iter()
            .map(from_zipkin)
            .collect::<Result<_, _>>()?;
        Ok((spans, Vec::new()))
    })
    .await
}

pub async fn otlp_http() -> Collector {
    http_collector("/v1/traces", StatusCode::OK, |body| {
        let req = ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())?;
        Ok((
            from_otlp(req),
            ExportTraceServiceResponse::default().encode_to_vec(),
        ))
    })
    .await
}

struct GrpcSink(Arc<Store>);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.saw(request.metadata().clone().into_headers());
        self.0.push(from_otlp(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn otlp_grpc() -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = Arc::new(Store::default());
    let service = TraceServiceServer::new(GrpcSink(store.clone()));
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Collector { addr, store }
}
