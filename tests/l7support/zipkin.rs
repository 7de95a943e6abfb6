//! A Zipkin collector in a pod, for the tracing tests.

use std::convert::Infallible;
use std::sync::Arc;

use ambit::harness::apps::ServerThread;
use ambit::harness::Pod;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

use super::otlp::Received;
use super::{full, listen_in_pod};

/// A Zipkin v2 collector in a pod (Jaeger's collector listens so on 9411, where Istio's install
/// guides point `zipkin.address`): `POST /api/v2/spans` with a JSON array of spans, each kept as
/// it was decoded; 202 as Zipkin answers.
pub struct ZipkinCollector {
    spans: Arc<std::sync::Mutex<Vec<Value>>>,
    _thread: ServerThread,
}

impl ZipkinCollector {
    pub fn start(pod: &Pod, port: u16) -> ZipkinCollector {
        let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = spans.clone();
        let (thread, _) = listen_in_pod(pod, port, move |stream| {
            let store = store.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        let ok = req.method() == http::Method::POST
                            && req.uri().path() == "/api/v2/spans";
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let status = match (ok, body) {
                            (true, Ok(b)) => match serde_json::from_slice::<Vec<Value>>(&b) {
                                Ok(batch) => {
                                    store.lock().expect("spans").extend(batch);
                                    202
                                }
                                Err(_) => 400,
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
            spans,
            _thread: thread,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        self.spans.lock().expect("spans").clone()
    }
}

/// A Zipkin v2 span (`traceId`, `id`, `parentId`, `name`, `kind`, `localEndpoint.serviceName`,
/// `tags`) in the form the OTLP collectors keep.
pub fn received(span: &Value) -> Received {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    Received {
        trace_id: text(&span["traceId"]),
        id: text(&span["id"]),
        parent_id: span["parentId"].as_str().map(str::to_string),
        name: text(&span["name"]),
        kind: text(&span["kind"]),
        service_name: text(&span["localEndpoint"]["serviceName"]),
        tags: span["tags"]
            .as_object()
            .map(|t| t.iter().map(|(k, v)| (k.clone(), text(v))).collect())
            .unwrap_or_default(),
    }
}
