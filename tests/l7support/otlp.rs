//! OpenTelemetry collectors in a pod, for the tracing tests: OTLP over gRPC (a tonic server with
//! the `TraceServiceServer` that opentelemetry-proto generates) and OTLP over HTTP (hyper, the body
//! decoded as the protobuf `ExportTraceServiceRequest`), as an OpenTelemetry collector listens on
//! 4317 and 4318. Each keeps the spans it decoded as [`Received`], the form the Zipkin collector's
//! spans also take, so one set of assertions reads all three.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit::harness::apps::ServerThread;
use ambit::harness::{run_async_in_netns, Pod};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::net::TcpListener;

use super::{full, listen_in_pod};

/// A span as a collector received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Lower-case hex, as sent (Zipkin: 16 or 32 digits; OTLP: the 16 bytes).
    pub trace_id: String,
    pub id: String,
    pub parent_id: Option<String>,
    pub name: String,
    /// `CLIENT` or `SERVER`.
    pub kind: String,
    /// Zipkin `localEndpoint.serviceName`; OTLP the resource's `service.name`.
    pub service_name: String,
    /// Zipkin tags; OTLP attributes (string values).
    pub tags: BTreeMap<String, String>,
}

impl Received {
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.get(name).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_value(key: &str, v: Option<&AnyValue>) -> Result<String, String> {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Ok(s.clone()),
        other => Err(format!("attribute {key} is not a string: {other:?}")),
    }
}

/// The spans of an export request, or why it breaks the OTLP schema's rules (trace id 16 bytes,
/// span id 8, a parent 8 or none, a known kind, a `service.name` on every resource).
pub fn decode(req: ExportTraceServiceRequest) -> Result<Vec<Received>, String> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs.resource.ok_or("a ResourceSpans without a resource")?;
        let service = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .ok_or("a resource without service.name")?;
        let service_name = string_value("service.name", service.value.as_ref())?;
        for ss in rs.scope_spans {
            for s in ss.spans {
                if s.trace_id.len() != 16 || s.span_id.len() != 8 {
                    return Err(format!(
                        "ids of {} and {} bytes",
                        s.trace_id.len(),
                        s.span_id.len()
                    ));
                }
                if !s.parent_span_id.is_empty() && s.parent_span_id.len() != 8 {
                    return Err(format!("a parent id of {} bytes", s.parent_span_id.len()));
                }
                if s.end_time_unix_nano < s.start_time_unix_nano || s.start_time_unix_nano == 0 {
                    return Err(format!(
                        "times {}..{}",
                        s.start_time_unix_nano, s.end_time_unix_nano
                    ));
                }
                let kind = match SpanKind::try_from(s.kind) {
                    Ok(SpanKind::Client) => "CLIENT",
                    Ok(SpanKind::Server) => "SERVER",
                    other => return Err(format!("span kind {other:?}")),
                };
                let mut tags = BTreeMap::new();
                for kv in &s.attributes {
                    tags.insert(kv.key.clone(), string_value(&kv.key, kv.value.as_ref())?);
                }
                out.push(Received {
                    trace_id: hex(&s.trace_id),
                    id: hex(&s.span_id),
                    parent_id: (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
                    name: s.name,
                    kind: kind.to_string(),
                    service_name: service_name.clone(),
                    tags,
                });
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<Received>>,
    /// Requests that did not decode or broke the schema: `spans()` fails on them.
    errors: Mutex<Vec<String>>,
}

impl Store {
    fn take(&self, req: Result<ExportTraceServiceRequest, String>) -> Result<(), String> {
        match req.and_then(decode) {
            Ok(spans) => {
                self.spans.lock().expect("spans").extend(spans);
                Ok(())
            }
            Err(e) => {
                self.errors.lock().expect("errors").push(e.clone());
                Err(e)
            }
        }
    }
}

/// An OpenTelemetry collector in a pod: OTLP over gRPC or over HTTP.
pub struct OtlpCollector {
    store: Arc<Store>,
    _thread: ServerThread,
}

struct GrpcSink(Arc<Store>);

#[tonic::async_trait]
impl TraceService for GrpcSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .take(Ok(request.into_inner()))
            .map_err(tonic::Status::invalid_argument)?;
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl OtlpCollector {
    /// OTLP/gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) on `port`.
    pub fn grpc(pod: &Pod, port: u16) -> OtlpCollector {
        let store = Arc::new(Store::default());
        let service = TraceServiceServer::new(GrpcSink(store.clone()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = pod.netns_path().to_path_buf();
        let thread = std::thread::spawn(move || {
            run_async_in_netns(&netns, move || async move {
                let listener = TcpListener::bind(("0.0.0.0", port))
                    .await
                    .unwrap_or_else(|e| panic!("bind :{port}: {e}"));
                ready_tx.send(()).expect("ready");
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stop_rx.await;
                        },
                    )
                    .await;
            })
            .expect("collector netns");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("OTLP/gRPC collector did not start");
        OtlpCollector {
            store,
            _thread: ServerThread::new(stop_tx, thread),
        }
    }

    /// OTLP/HTTP on `port`: `POST <path>` with a binary protobuf body; 200 with an
    /// `ExportTraceServiceResponse`, as the specification answers. Another path gets 404.
    pub fn http(pod: &Pod, port: u16, path: &'static str) -> OtlpCollector {
        let store = Arc::new(Store::default());
        let s = store.clone();
        let (thread, _) = listen_in_pod(pod, port, move |stream| {
            let store = s.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ours = req.method() == http::Method::POST
                            && req.uri().path() == path
                            && req
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| v == "application/x-protobuf");
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let (status, out) = match (ours, body) {
                            (false, _) => (StatusCode::NOT_FOUND, Bytes::new()),
                            (true, Err(e)) => (StatusCode::BAD_REQUEST, Bytes::from(e.to_string())),
                            (true, Ok(b)) => {
                                let req = ExportTraceServiceRequest::decode(b)
                                    .map_err(|e| format!("protobuf: {e}"));
                                match store.take(req) {
                                    Ok(()) => (
                                        StatusCode::OK,
                                        Bytes::from(
                                            ExportTraceServiceResponse::default().encode_to_vec(),
                                        ),
                                    ),
                                    Err(e) => (StatusCode::BAD_REQUEST, Bytes::from(e)),
                                }
                            }
                        };
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                                .body(full(out))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        });
        OtlpCollector {
            store,
            _thread: thread,
        }
    }

    /// Every span received so far; fails if any request broke the schema.
    pub fn spans(&self) -> Vec<Received> {
        let errors = self.store.errors.lock().expect("errors").clone();
        assert!(
            errors.is_empty(),
            "the collector refused requests: {errors:?}"
        );
        self.store.spans.lock().expect("spans").clone()
    }
}
