//! Export off the data path. `Tracer::finish` appends to a bounded queue (`queue.rs`) (a full queue
//! drops the span and counts it); one task per tracer, spawned on the runtime handle the caller
//! gives (the agent's control runtime, so a slow collector never takes a data-plane thread),
//! batches by size and time and sends to the collector. A dead collector fails fast (connect
//! timeout) and its spans are dropped and counted, never retried into an unbounded backlog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::runtime::Handle;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::queue::{Refused, SpanQueue};
use super::span::Span;
use super::{otlp, zipkin, BatchSettings, Provider, TraceError, TraceSettings};
use super::{OTLP_HTTP_DEFAULT_PATH, ZIPKIN_DEFAULT_PATH};

/// A failing collector is logged at warn level at most this often (debug otherwise).
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    /// `queue_full`, `shutdown`, or the export error's `TraceError::metric_label`.
    reason: String,
}

/// `ambit_spans_exported_total` and `ambit_spans_dropped_total{reason}`, shared by all tracers.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl TraceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ambit_spans_exported",
            "Spans a collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "ambit_spans_dropped",
            "Sampled spans not delivered, by reason (queue_full: the exporter fell behind; export_*: the collector failed)",
            self.dropped.clone(),
        );
    }

    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped
            .get_or_create(&DropLabels {
                reason: reason.to_string(),
            })
            .get()
    }

    fn drop_spans(&self, reason: &str, n: usize) {
        if n == 0 {
            return;
        }
        self.dropped
            .get_or_create(&DropLabels {
                reason: reason.to_string(),
            })
            .inc_by(n as u64);
    }
}

/// One provider's exporter. Dropping it closes the queue; the task sends what it holds and ends.
#[derive(Debug)]
pub struct Tracer {
    provider: Provider,
    queue: Arc<SpanQueue>,
    metrics: TraceMetrics,
}

impl Tracer {
    /// Starts the export task on `handle` (give the control runtime's).
    pub fn start(
        provider: &Provider,
        batch: &BatchSettings,
        metrics: TraceMetrics,
        handle: &Handle,
    ) -> Result<Tracer, TraceError> {
        batch.validate()?;
        let target = check_provider(provider)?;
        let queue = Arc::new(SpanQueue::new(batch.queue_capacity, batch.max_batch));
        let exporter = Exporter {
            target,
            headers: headers(provider)?,
            batch: batch.clone(),
            metrics: metrics.clone(),
            last_warn: None,
        };
        handle.spawn(exporter.run(queue.clone()));
        Ok(Tracer {
            provider: provider.clone(),
            queue,
            metrics,
        })
    }

    /// Hands a finished span to the exporter without waiting: an unsampled span is ignored, a
    /// full queue drops it (`ambit_spans_dropped_total{reason="queue_full"}`).
    pub fn finish(&self, span: Span) {
        if !span.sampled() {
            return;
        }
        match self.queue.push(span) {
            Ok(()) => {}
            Err(Refused::Full) => self.metrics.drop_spans("queue_full", 1),
            Err(Refused::Closed) => self.metrics.drop_spans("shutdown", 1),
        }
    }

    pub fn provider(&self) -> &Provider {
        &self.provider
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// A workload's tracer, kept with the settings that name it (made once per snapshot), so a
/// sampled request does not look it up in [`Tracers`] (a lock and a hash per request, which
/// two data-plane threads contended for). A cache, not a setting: every slot compares equal.
#[derive(Clone, Default)]
pub struct TracerSlot(Arc<OnceLock<Arc<Tracer>>>);

impl TracerSlot {
    /// The tracer for `settings`, from `tracers` on first use.
    pub fn get(
        &self,
        tracers: &Tracers,
        settings: &TraceSettings,
    ) -> Result<Arc<Tracer>, TraceError> {
        if let Some(t) = self.0.get() {
            return Ok(t.clone());
        }
        let t = tracers.get(settings)?;
        Ok(self.0.get_or_init(|| t).clone())
    }
}

impl PartialEq for TracerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for TracerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "TracerSlot(started)"
        } else {
            "TracerSlot(empty)"
        })
    }
}

/// The tracers in use, one per (provider, batch settings): workloads that name the same
/// collector share a queue and a connection. Look tracers up when config changes and keep the
/// `Arc<Tracer>` with it; the lock here is not for the request path.
#[derive(Debug)]
pub struct Tracers {
    handle: Handle,
    metrics: TraceMetrics,
    map: Mutex<HashMap<(Provider, BatchSettings), Arc<Tracer>>>,
}

impl Tracers {
    pub fn new(handle: Handle, metrics: TraceMetrics) -> Tracers {
        Tracers {
            handle,
            metrics,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The tracer for `settings`' provider, started on first use.
    pub fn get(&self, settings: &TraceSettings) -> Result<Arc<Tracer>, TraceError> {
        settings.validate()?;
        let key = (settings.provider.clone(), settings.batch.clone());
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = map.get(&key) {
            return Ok(t.clone());
        }
        let tracer = Arc::new(Tracer::start(
            &settings.provider,
            &settings.batch,
            self.metrics.clone(),
            &self.handle,
        )?);
        map.insert(key, tracer.clone());
        Ok(tracer)
    }

    /// Forgets tracers whose provider is no longer configured; each stops once the last
    /// `Arc<Tracer>` held elsewhere is gone.
    pub fn retain(&self, mut keep: impl FnMut(&Provider) -> bool) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|(p, _), _| keep(p));
    }

    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn metrics(&self) -> &TraceMetrics {
        &self.metrics
    }
}

/// Where a provider's batches go, checked up front so a bad URL fails at config time.
#[derive(Debug, Clone)]
pub(super) enum Target {
    Zipkin(Uri),
    OtlpHttp(Uri),
    OtlpGrpc(String),
}

/// Checks the provider's URL: `http://host:port[/path]`; an empty path gets the protocol's
/// default (`/api/v2/spans`, `/v1/traces`).
pub(super) fn check_provider(provider: &Provider) -> Result<Target, TraceError> {
    let (field, raw, default_path) = match provider {
        Provider::Zipkin { url } => ("zipkin.url", url, Some(ZIPKIN_DEFAULT_PATH)),
        Provider::OtlpHttp { url, .. } => {
            ("opentelemetry.http.url", url, Some(OTLP_HTTP_DEFAULT_PATH))
        }
        Provider::OtlpGrpc { endpoint, .. } => ("opentelemetry.grpc.endpoint", endpoint, None),
    };
    headers(provider)?;
    let bad = |reason: &str| TraceError::BadUrl {
        field,
        value: raw.clone(),
        reason: reason.to_string(),
    };
    let uri: Uri = raw
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("the scheme must be http://"));
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(bad("no host"));
    };
    let Some(default_path) = default_path else {
        Endpoint::from_shared(raw.clone()).map_err(|e| bad(&e.to_string()))?;
        return Ok(Target::OtlpGrpc(raw.clone()));
    };
    let uri = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(default_path)
            .build()
            .map_err(|e| bad(&e.to_string()))?,
        Some(_) => uri,
    };
    Ok(match provider {
        Provider::Zipkin { .. } => Target::Zipkin(uri),
        _ => Target::OtlpHttp(uri),
    })
}

/// The provider's headers as sent (gRPC: as the call's metadata); a name or value HTTP cannot
/// carry fails at config time.
pub(super) fn headers(provider: &Provider) -> Result<HeaderMap, TraceError> {
    let mut map = HeaderMap::new();
    for (name, value) in provider.headers() {
        let bad = |reason: String| TraceError::BadHeader {
            name: name.clone(),
            reason,
        };
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let v = HeaderValue::from_str(value).map_err(|e| bad(e.to_string()))?;
        map.append(n, v);
    }
    Ok(map)
}

/// The export task's state.
struct Exporter {
    target: Target,
    headers: HeaderMap,
    batch: BatchSettings,
    metrics: TraceMetrics,
    last_warn: Option<Instant>,
}

/// A connection to the collector, made inside the task (tonic's lazy channel needs a runtime).
enum Transport {
    Http {
        // Boxed: the client is ten times the size of the gRPC one.
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        uri: Uri,
        zipkin: bool,
    },
    Grpc {
        client: TraceServiceClient<Channel>,
    },
}

impl Exporter {
    fn connect(&self) -> Result<Transport, TraceError> {
        let http = |uri: &Uri, zipkin: bool| {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(self.batch.connect_timeout));
            connector.set_nodelay(true);
            Transport::Http {
                client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
                uri: uri.clone(),
                zipkin,
            }
        };
        Ok(match &self.target {
            Target::Zipkin(uri) => http(uri, true),
            Target::OtlpHttp(uri) => http(uri, false),
            Target::OtlpGrpc(endpoint) => {
                let channel = Endpoint::from_shared(endpoint.clone())
                    .map_err(|e| TraceError::BadUrl {
                        field: "opentelemetry.grpc.endpoint",
                        value: endpoint.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_timeout(self.batch.connect_timeout)
                    .timeout(self.batch.request_timeout)
                    .connect_lazy();
                Transport::Grpc {
                    client: TraceServiceClient::new(channel),
                }
            }
        })
    }

    fn endpoint(&self) -> String {
        match &self.target {
            Target::Zipkin(u) | Target::OtlpHttp(u) => u.to_string(),
            Target::OtlpGrpc(e) => e.clone(),
        }
    }

    async fn run(mut self, queue: Arc<SpanQueue>) {
        let mut tick = tokio::time::interval(self.batch.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut transport = match self.connect() {
            Ok(t) => Ok(t),
            Err(e) => {
                // Checked in `Tracer::start`; should this still fail, spans are counted, not lost
                // silently.
                warn!(error = %e, "tracing exporter cannot start; spans will be dropped");
                Err(e.metric_label())
            }
        };
        loop {
            tokio::select! {
                _ = queue.ready() => {}
                _ = tick.tick() => {}
            }
            // Read before taking: a close after this read leaves a wake-up for the next turn.
            let closing = queue.is_closed();
            let spans = queue.take();
            match &mut transport {
                Ok(t) => {
                    for batch in spans.chunks(self.batch.max_batch) {
                        self.flush(t, batch).await;
                    }
                }
                Err(reason) => self.metrics.drop_spans(reason, spans.len()),
            }
            if closing {
                return;
            }
        }
    }

    async fn flush(&mut self, transport: &mut Transport, spans: &[Span]) {
        if spans.is_empty() {
            return;
        }
        let timeout = self.batch.request_timeout;
        let result = match tokio::time::timeout(timeout, self.send(transport, spans)).await {
            Ok(r) => r,
            Err(_) => Err(TraceError::Timeout {
                endpoint: self.endpoint(),
                spans: spans.len(),
                timeout,
            }),
        };
        match result {
            Ok(accepted) => {
                self.metrics.exported.inc_by(accepted as u64);
                self.metrics
                    .drop_spans("export_rejected", spans.len() - accepted);
            }
            Err(e) => {
                self.metrics.drop_spans(e.metric_label(), spans.len());
                let now = Instant::now();
                if self
                    .last_warn
                    .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
                {
                    self.last_warn = Some(now);
                    warn!(error = %e, "tracing collector failed; spans dropped");
                } else {
                    debug!(error = %e, "tracing collector failed; spans dropped");
                }
            }
        }
    }

    /// Sends one batch; the number of spans the collector accepted.
    async fn send(&self, transport: &mut Transport, spans: &[Span]) -> Result<usize, TraceError> {
        let endpoint = || self.endpoint();
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| TraceError::Send {
            endpoint: endpoint(),
            spans: spans.len(),
            source,
        };
        match transport {
            Transport::Http {
                client,
                uri,
                zipkin,
            } => {
                let (body, content_type) = if *zipkin {
                    (zipkin::encode(spans)?, zipkin::CONTENT_TYPE)
                } else {
                    (otlp::encode(spans).encode_to_vec(), otlp::CONTENT_TYPE)
                };
                let mut req = Request::new(Full::new(Bytes::from(body)));
                *req.method_mut() = Method::POST;
                *req.uri_mut() = uri.clone();
                req.headers_mut().extend(self.headers.clone());
                req.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                let resp = client.request(req).await.map_err(|e| failed(Box::new(e)))?;
                let status = resp.status();
                // Read the answer to the end so the connection can be reused.
                let _ = resp.into_body().collect().await;
                if !status.is_success() {
                    return Err(TraceError::Rejected {
                        endpoint: endpoint(),
                        spans: spans.len(),
                        status: status.to_string(),
                    });
                }
                Ok(spans.len())
            }
            Transport::Grpc { client } => {
                let resp = client
                    .export(tonic::Request::from_parts(
                        tonic::metadata::MetadataMap::from_headers(self.headers.clone()),
                        tonic::Extensions::default(),
                        otlp::encode(spans),
                    ))
                    .await
                    .map_err(|status| failed(Box::new(status)))?;
                // A partial success names spans the collector refused; they are not exported.
                let rejected = resp
                    .into_inner()
                    .partial_success
                    .map(|p| p.rejected_spans.max(0) as usize)
                    .unwrap_or(0)
                    .min(spans.len());
                Ok(spans.len() - rejected)
            }
        }
    }
}
