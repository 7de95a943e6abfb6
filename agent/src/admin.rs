//! The admin endpoint: `/metrics` (OpenMetrics text, prometheus-client), `/healthz/ready` and
//! `/healthz/live` on one listener (`--metrics-addr`), and `/healthz/ready` alone on Istio's health
//! port 15021 (`--readiness-addr`), where ztunnel serves it. It runs on the control runtime, so a scrape
//! never takes a data-plane thread; the data path keeps plain atomics that collectors read at
//! scrape time. The debug endpoint (15000: `/config_dump`, `/logging`, `/debug/connections`) is
//! [`debug`].

pub mod config_dump;
pub mod connections;
pub mod debug;
pub mod dump;
pub mod logging;
pub mod problems;
mod sources;

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::kube::KubeStats;
use crate::config::Kind;
use problems::{Problem, ProblemSeries};

/// Istio's ztunnel serves its stats on this port.
pub const DEFAULT_PORT: u16 = 15020;

/// Istio's health port: ztunnel serves `/healthz/ready` here (its DaemonSet's readiness probe).
pub const READINESS_PORT: u16 = 15021;

const READY_PATH: &str = "/healthz/ready";

pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics again, at the path Istio's proxies serve them on (`:15020/stats/prometheus`), so a
/// Prometheus set up for Istio (pod annotations `prometheus.io/scrape`, `/port`, `/path`) scrapes
/// the agent unchanged.
pub const STATS_PROMETHEUS: &str = "/stats/prometheus";

/// A slow client may hold a connection only this long before sending its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// `/healthz/live` fails once the control loop has not come round for this long: it is wedged
/// (a restart helps), as opposed to waiting for the API server (readiness, not liveness).
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("binding the metrics endpoint --metrics-addr {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the readiness endpoint --readiness-addr {addr}")]
    BindReadiness {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("binding the debug endpoint --admin-addr {addr}")]
    BindDebug {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// (name, help, value) of counters read at scrape time; see `proxy::Metrics::counters`.
pub type CounterReader = Box<dyn Fn() -> Vec<(&'static str, &'static str, u64)> + Send + Sync>;

/// Everything the endpoint serves. The control loop updates it; scrapes read it.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    rejections: Counter,
    enrolled_pods: Gauge,
    problems: Arc<ProblemSeries>,
    synced: Arc<sources::Synced>,
    kernel: Arc<KernelCounters>,
    /// Ok once ready; else why not, served with the 503.
    readiness: Mutex<Result<(), String>>,
    /// When the control loop last came round.
    alive_at: Mutex<Instant>,
}

impl AgentMetrics {
    /// `proxy` reads the proxy's counters (exported as `ambit_proxy_<name>_total`).
    pub fn new(proxy: CounterReader) -> Self {
        // No registry prefix: it would also prefix the collectors' names.
        let mut registry = Registry::default();
        let rejections = Counter::default();
        registry.register(
            "ambit_config_rejections",
            "Config objects rejected since start (each also logged with kind, namespace, name and field)",
            rejections.clone(),
        );
        let enrolled_pods = Gauge::default();
        registry.register(
            "ambit_enrolled_pods",
            "Pods on this node whose traffic is captured",
            enrolled_pods.clone(),
        );
        let problems = Arc::new(ProblemSeries::default());
        registry.register_collector(Box::new(problems.clone()));
        let synced = Arc::new(sources::Synced::default());
        registry.register_collector(Box::new(synced.clone()));
        let kernel = Arc::new(KernelCounters::default());
        registry.register_collector(Box::new(kernel.clone()));
        registry.register_collector(Box::new(AtomicCounters {
            prefix: "proxy",
            read: proxy,
        }));
        AgentMetrics {
            registry,
            rejections,
            enrolled_pods,
            problems,
            synced,
            kernel,
            readiness: Mutex::new(Err("starting".into())),
            alive_at: Mutex::new(Instant::now()),
        }
    }

    /// Registers the Kubernetes source's per-kind counters (`ambit_kube_*`).
    pub fn with_kube(mut self, stats: Arc<KubeStats>) -> Self {
        self.registry
            .register_collector(Box::new(sources::KubeCollector(stats)));
        self
    }

    /// Lets a part of the agent register its own families (the proxy's Istio telemetry), without
    /// the endpoint knowing about it.
    pub fn with_registry(mut self, register: impl FnOnce(&mut Registry)) -> Self {
        register(&mut self.registry);
        self
    }

    /// Mirrors the current problems (one series per object and field, file or pod, so a fixed
    /// one's series disappears) and the store's rejection count.
    pub fn set_problems(&self, problems: &[Problem], rejected_total: u64) {
        self.problems.set(problems);
        // The store's count only grows; a counter can only be incremented.
        let seen = self.rejections.get();
        if rejected_total > seen {
            self.rejections.inc_by(rejected_total - seen);
        }
    }

    /// Which kinds the config source has listed.
    pub fn set_synced(&self, kinds: Vec<(Kind, bool)>) {
        self.synced.set(kinds);
    }

    /// Kernel capture counters by name (e.g. `out_captured`), exported as `ambit_capture_<name>_total`.
    pub fn set_kernel(&self, counters: Vec<(String, u64)>) {
        *self
            .kernel
            .values
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counters;
    }

    pub fn set_enrolled_pods(&self, n: usize) {
        self.enrolled_pods.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Ready (Ok) once capture is installed and the agent has a complete view; otherwise why not.
    pub fn set_readiness(&self, readiness: Result<(), String>) {
        *self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = readiness;
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    pub fn readiness(&self) -> Result<(), String> {
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The control loop came round (liveness).
    pub fn alive(&self) {
        *self.alive_at.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// How long since the control loop last came round.
    pub fn since_alive(&self) -> Duration {
        self.alive_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The fields of `KernelStats` as (name, value), in declaration order: a new kernel counter is
/// exported without touching this module.
pub fn kernel_counters(stats: &crate::ebpf::KernelStats) -> Vec<(String, u64)> {
    match serde_json::to_value(stats) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Binds the admin listener; the error names the address (the agent refuses to start without it).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Binds the readiness listener (`--readiness-addr`); the error names the address.
pub async fn bind_readiness(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::BindReadiness { addr, source })
}

/// Serves until the runtime stops. Each connection is its own task; its errors are logged at debug.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    serve_with(listener, "admin", move |req| respond(req, &metrics)).await
}

/// Serves `/healthz/ready` alone (Istio's health port), answered as on the metrics listener.
pub async fn serve_readiness(listener: TcpListener, metrics: Arc<AgentMetrics>) {
    serve_with(listener, "readiness", move |req| {
        respond_readiness(req, &metrics)
    })
    .await
}

/// The readiness listener's answer: `/healthz/ready` as [`respond`] gives it, 404 for anything else.
pub fn respond_readiness<B>(req: &Request<B>, metrics: &AgentMetrics) -> Response<Full<Bytes>> {
    if req.uri().path() != READY_PATH {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    respond(req, metrics)
}

/// The accept loop of a localhost admin listener (`what` names it in logs): HTTP/1.1, each
/// connection its own task, `respond` answering every request.
pub(crate) async fn serve_with<F>(listener: TcpListener, what: &'static str, respond: F)
where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                debug!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = respond(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "{what} connection failed");
            }
        });
    }
}

/// The response to one request. Never panics: every header value is static.
pub fn respond<B>(req: &Request<B>, metrics: &AgentMetrics) -> Response<Full<Bytes>> {
    let path = match req.uri().path() {
        // Where Istio's merged scrape config (`prometheus.io/path`) looks for a proxy's metrics.
        STATS_PROMETHEUS => "/metrics",
        path => path,
    };
    if !matches!(path, "/metrics" | READY_PATH | "/healthz/live") {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    match path {
        "/metrics" => match metrics.render() {
            Ok(body) => {
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
                );
                resp
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        },
        "/healthz/live" => {
            let since = metrics.since_alive();
            if since < LIVENESS_WINDOW {
                text(StatusCode::OK, "live\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not live: the control loop has not come round for {}s\n",
                        since.as_secs()
                    ),
                )
            }
        }
        _ => match metrics.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A label value escaped as OpenMetrics asks (prometheus-client writes values verbatim, and a field
/// path can hold a quote, e.g. `metadata.labels["app"]`).
#[derive(Debug)]
pub(crate) struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        escape_label_value(self.0, encoder)
    }
}

/// Writes `value` escaped as OpenMetrics asks (prometheus-client writes values verbatim, and a
/// field path can hold a quote, e.g. `metadata.labels["app"]`).
pub fn escape_label_value(value: &str, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
    use fmt::Write as _;
    for c in value.chars() {
        match c {
            '\\' => encoder.write_str("\\\\")?,
            '"' => encoder.write_str("\\\"")?,
            '\n' => encoder.write_str("\\n")?,
            c => encoder.write_char(c)?,
        }
    }
    Ok(())
}

/// Kernel counters, copied here by the control loop (the maps are read on the control thread).
#[derive(Debug, Default)]
struct KernelCounters {
    values: Mutex<Vec<(String, u64)>>,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let values = self
            .values
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (name, v) in values {
            let name = format!("ambit_capture_{name}");
            let help = "Kernel capture counter (AMBIT_STATS map), summed over CPUs.";
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(&name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

/// Counters the data path keeps as plain atomics, read at scrape time: no lock on the data path.
struct AtomicCounters {
    prefix: &'static str,
    read: CounterReader,
}

impl fmt::Debug for AtomicCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicCounters")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Collector for AtomicCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for (name, help, v) in (self.read)() {
            // The text encoder appends `_total` to a counter's samples.
            let name = format!("ambit_{}_{name}", self.prefix);
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(&name, help, None, c.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
