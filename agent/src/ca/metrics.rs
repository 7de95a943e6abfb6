//! The CA's `/metrics` (OpenMetrics: requests, issued certificates, refusals by reason and gRPC
//! code) and `/ready` (ready once the Pod index is synced, so no agent is refused for a pod the
//! CA has not seen yet).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::pods::PodIndex;

type DenyLabels = Vec<(&'static str, &'static str)>;

pub struct CaMetrics {
    registry: Registry,
    pub csr: Counter,
    pub issued: Counter,
    authn_failures: Counter,
    denials: Family<DenyLabels, Counter>,
}

impl Default for CaMetrics {
    fn default() -> Self {
        CaMetrics::new()
    }
}

impl CaMetrics {
    pub fn new() -> CaMetrics {
        let mut registry = Registry::default();
        let csr = Counter::default();
        let issued = Counter::default();
        let authn_failures = Counter::default();
        let denials = Family::<DenyLabels, Counter>::default();
        registry.register(
            "ambit_ca_csr_requests",
            "CreateCertificate requests received",
            csr.clone(),
        );
        registry.register(
            "ambit_ca_certificates_issued",
            "Workload certificates signed",
            issued.clone(),
        );
        registry.register(
            "ambit_ca_authentication_failures",
            "Requests whose token was missing or rejected",
            authn_failures.clone(),
        );
        registry.register(
            "ambit_ca_denied",
            "Requests refused, by reason",
            denials.clone(),
        );
        CaMetrics {
            registry,
            csr,
            issued,
            authn_failures,
            denials,
        }
    }

    pub fn denied(&self, reason: &'static str, authentication: bool) {
        if authentication {
            self.authn_failures.inc();
        }
        self.denials.get_or_create(&vec![("reason", reason)]).inc();
    }

    /// How many requests were refused for `reason`.
    pub fn denied_count(&self, reason: &'static str) -> u64 {
        self.denials.get_or_create(&vec![("reason", reason)]).get()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn respond<B>(req: &Request<B>, metrics: &CaMetrics, pods: &PodIndex) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/ready" if pods.synced() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "pod index not synced\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp
}

pub async fn serve(listener: TcpListener, metrics: Arc<CaMetrics>, pods: PodIndex) {
    crate::admin::serve_with(listener, "CA metrics", move |req| {
        respond(req, &metrics, &pods)
    })
    .await
}
