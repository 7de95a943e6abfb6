//! Istio's standard request metrics: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and `istio_response_bytes`, with
//! the TCP metrics' labels plus `request_protocol` (`http`/`grpc`), `response_code` and
//! `grpc_response_status`, recorded once per request when its response has ended. The Telemetry
//! API's tag overrides are evaluated per request (over the request as it arrived and its
//! response) and applied per family when the series are written.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;

use super::{
    final_labels, label_values, merge, principal, LabelSet, Labels, Peer, TcpLabels, Telemetry,
    Value,
};
use crate::config::istio::telemetry::IstioMetric;
use crate::config::telemetry::{
    EffectiveTelemetry, MetricSettings, Principals, RequestAttrs, SeriesTags,
};
use crate::proxy::access_log::{write_sinks, Entry, RequestFields, SinkLine};
use crate::proxy::spans::RequestSpan;
use crate::state::IstioLabels;
use crate::trace::ResponseInfo;

/// Envoy's default histogram buckets, which Istio's duration histogram uses (milliseconds).
pub const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Size buckets (bytes): powers of ten up to 1 GB.
pub const SIZE_BUCKETS: [f64; 10] = [
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
    100000.0,
    1000000.0,
    10000000.0,
    100000000.0,
    1000000000.0,
];

/// The label set of one request series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// Reporter, workloads, service, flags, security policy (as the TCP metrics).
    pub conn: TcpLabels,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub response_code: u16,
    /// gRPC's status code, for gRPC requests that ended with one.
    pub grpc_status: Option<u16>,
}

#[derive(Debug)]
struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    /// The sum, as f64 bits (updated with a compare-exchange loop).
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], v: f64) {
        if let Some(i) = bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// (cumulative bucket counts, sum, count).
    fn snapshot(&self) -> ([u64; N], f64, u64) {
        let mut acc = 0;
        let buckets = std::array::from_fn(|i| {
            acc += self.buckets[i].load(Ordering::Relaxed);
            acc
        });
        (
            buckets,
            f64::from_bits(self.sum.load(Ordering::Relaxed)),
            self.count.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, Default)]
struct RequestCounters {
    total: AtomicU64,
    duration: Histogram<19>,
    request_bytes: Histogram<10>,
    response_bytes: Histogram<10>,
}

/// Every request series (a custom collector, so series of departed pods can be dropped).
#[derive(Debug, Default)]
pub struct RequestSeries(
    Mutex<HashMap<RequestLabels, Arc<RequestCounters>, foldhash::fast::RandomState>>,
);

impl RequestSeries {
    /// Records one finished request, in the families `on` keeps.
    pub fn record(
        &self,
        labels: &RequestLabels,
        on: Recorded,
        duration_ms: f64,
        req_bytes: u64,
        resp_bytes: u64,
    ) {
        if on == Recorded::NONE {
            return;
        }
        let counters = {
            let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match map.get(labels) {
                Some(c) => c.clone(),
                None => map.entry(labels.clone()).or_default().clone(),
            }
        };
        if on.count {
            counters.total.fetch_add(1, Ordering::Relaxed);
        }
        if on.duration {
            counters.duration.observe(&DURATION_BUCKETS, duration_ms);
        }
        if on.request_size {
            counters
                .request_bytes
                .observe(&SIZE_BUCKETS, req_bytes as f64);
        }
        if on.response_size {
            counters
                .response_bytes
                .observe(&SIZE_BUCKETS, resp_bytes as f64);
        }
    }

    /// As `Telemetry::retain_local`: drops series whose local end is no longer on this node.
    pub fn retain_local(&self, local: &std::collections::HashSet<IstioLabels>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l, _| {
                let here = match l.conn.reporter {
                    super::Reporter::Source => &l.conn.source,
                    super::Reporter::Destination => &l.conn.destination,
                };
                match here {
                    Peer::Workload(w) | Peer::Address(w) => local.contains(w),
                    _ => true,
                }
            });
    }
}

/// Which of the four request families a request is recorded in: the Telemetry API's `metrics`
/// overrides (`disabled` per metric or `ALL_METRICS`, or the `prometheus` provider out of scope)
/// turn them off per workload and side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub count: bool,
    pub duration: bool,
    pub request_size: bool,
    pub response_size: bool,
}

impl Recorded {
    pub const ALL: Recorded = Recorded {
        count: true,
        duration: true,
        request_size: true,
        response_size: true,
    };
    pub const NONE: Recorded = Recorded {
        count: false,
        duration: false,
        request_size: false,
        response_size: false,
    };

    pub fn of(settings: &MetricSettings) -> Recorded {
        Recorded {
            count: settings.records(IstioMetric::RequestCount),
            duration: settings.records(IstioMetric::RequestDuration),
            request_size: settings.records(IstioMetric::RequestSize),
            response_size: settings.records(IstioMetric::ResponseSize),
        }
    }
}

/// The request series as Prometheus families.
pub struct RequestCollector {
    pub series: Arc<RequestSeries>,
    pub trust_domain: Arc<str>,
}

impl fmt::Debug for RequestCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestCollector").finish_non_exhaustive()
    }
}

fn request_labels(l: &RequestLabels, trust_domain: &str) -> Labels {
    let mut out = label_values(&l.conn, trust_domain);
    for (k, v) in out.iter_mut() {
        if *k == "request_protocol" {
            *v = l.protocol.to_string();
        }
    }
    out.push(("response_code", l.response_code.to_string()));
    out.push((
        "grpc_response_status",
        l.grpc_status.map_or(String::new(), |s| s.to_string()),
    ));
    out
}

/// One series as read for a scrape: labels, tags, count, duration, request and response sizes.
type Snapshot = (
    Labels,
    Option<SeriesTags>,
    u64,
    ([u64; 19], f64, u64),
    ([u64; 10], f64, u64),
    ([u64; 10], f64, u64),
);

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let series: Vec<Snapshot> = {
            let map = self.series.0.lock().unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .map(|(l, c)| {
                    (
                        request_labels(l, &self.trust_domain),
                        l.conn.tags.clone(),
                        c.total.load(Ordering::Relaxed),
                        c.duration.snapshot(),
                        c.request_bytes.snapshot(),
                        c.response_bytes.snapshot(),
                    )
                })
                .collect()
        };
        // The encoder appends `_total` to a counter's name (OpenMetrics), giving Istio's
        // `istio_requests_total`.
        let mut total = encoder.encode_descriptor(
            "istio_requests",
            "Total requests",
            None,
            MetricType::Counter,
        )?;
        // A family a Telemetry override turned off for a series stays at zero: not shown.
        let counts = merge(
            series.iter().filter(|s| s.2 > 0).map(|s| {
                let labels = final_labels(IstioMetric::RequestCount, &s.0, &s.1);
                (labels, s.2)
            }),
            |a, b| *a += b,
        );
        for (labels, n) in counts {
            let set: Vec<(&str, Value<'_>)> = labels.iter().map(|(k, v)| (*k, Value(v))).collect();
            ConstCounter::new(n).encode(total.encode_family(&LabelSet(&set))?)?;
        }
        histogram(
            &mut encoder,
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            &DURATION_BUCKETS,
            series.iter().filter(|s| s.3 .2 > 0).map(|s| {
                let labels = final_labels(IstioMetric::RequestDuration, &s.0, &s.1);
                (labels, s.3)
            }),
        )?;
        histogram(
            &mut encoder,
            "istio_request_bytes",
            "Request body sizes in bytes",
            &SIZE_BUCKETS,
            series.iter().filter(|s| s.4 .2 > 0).map(|s| {
                let labels = final_labels(IstioMetric::RequestSize, &s.0, &s.1);
                (labels, s.4)
            }),
        )?;
        histogram(
            &mut encoder,
            "istio_response_bytes",
            "Response body sizes in bytes",
            &SIZE_BUCKETS,
            series.iter().filter(|s| s.5 .2 > 0).map(|s| {
                let labels = final_labels(IstioMetric::ResponseSize, &s.0, &s.1);
                (labels, s.5)
            }),
        )
    }
}

/// One histogram family, written through prometheus-client's histogram encoder; series whose
/// labels came out equal are added up first.
fn histogram<'a, const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    bounds: &[f64; N],
    series: impl Iterator<Item = (Vec<(&'a str, &'a str)>, ([u64; N], f64, u64))>,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let merged = merge(series, |a, b| {
        for (x, y) in a.0.iter_mut().zip(b.0) {
            *x += y;
        }
        a.1 += b.1;
        a.2 += b.2;
    });
    for (labels, (cumulative, sum, count)) in merged {
        let set: Vec<(&str, Value<'_>)> = labels.iter().map(|(k, v)| (*k, Value(v))).collect();
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .zip(cumulative.iter())
            .scan(0u64, |prev, (b, c)| {
                // The encoder takes per-bucket counts and accumulates them itself.
                let n = c - *prev;
                *prev = *c;
                Some((*b, n))
            })
            .chain(std::iter::once((f64::MAX, count - cumulative[N - 1])))
            .collect();
        family
            .encode_family(&LabelSet(&set))?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
    }
    Ok(())
}

/// The request as it arrived, kept for the tag overrides' expressions (only for a workload side
/// that has them).
#[derive(Debug)]
struct ArrivedRequest {
    method: String,
    path: String,
    host: String,
    protocol: &'static str,
    headers: http::HeaderMap,
}

/// One request's telemetry, recorded once when its response has ended ([`RequestResult::finish`]):
/// the four request families and, when the access log is on, its line.
pub struct RequestResult {
    telemetry: Arc<Telemetry>,
    pub labels: RequestLabels,
    started: std::time::SystemTime,
    start: std::time::Instant,
    /// Downstream (remote, local).
    downstream: (std::net::SocketAddr, std::net::SocketAddr),
    pub upstream: Option<std::net::SocketAddr>,
    /// Request headers' size, plus the body bytes counted as they go upstream.
    request_headers: u64,
    request_body: Arc<AtomicU64>,
    response_headers: u64,
    response_body: u64,
    /// The access log's fields; None when the log is off (nothing is collected for it).
    pub log: Option<Box<RequestFields>>,
    /// The request's span, when tracing is configured for its side.
    pub span: Option<Box<RequestSpan>>,
    /// Istio's cluster name (`outbound|port|subset|host`, `inbound|port||`), for the span.
    pub cluster_name: Option<String>,
    /// The workload's observability settings (mesh config, Telemetry API): its access-log sinks
    /// and which metrics it records, for this request's side.
    pub settings: Option<Arc<EffectiveTelemetry>>,
    /// The request's attributes for its side's tag overrides; None without overrides.
    arrived: Option<Box<ArrivedRequest>>,
}

impl fmt::Debug for RequestResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestResult")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RequestResult {
    pub fn start(
        telemetry: &Arc<Telemetry>,
        labels: RequestLabels,
        downstream: (std::net::SocketAddr, std::net::SocketAddr),
        request_headers: u64,
        log: Option<Box<RequestFields>>,
    ) -> Self {
        RequestResult {
            telemetry: telemetry.clone(),
            labels,
            started: std::time::SystemTime::now(),
            start: std::time::Instant::now(),
            downstream,
            upstream: None,
            request_headers,
            request_body: Arc::default(),
            response_headers: 0,
            response_body: 0,
            log,
            span: None,
            cluster_name: None,
            settings: None,
            arrived: None,
        }
    }

    /// Sets the workload's settings; when its side has metric tag overrides, keeps what their
    /// expressions may read of `req` (otherwise nothing is copied).
    pub fn set_settings<B>(&mut self, settings: Arc<EffectiveTelemetry>, req: &http::Request<B>) {
        let side = match self.labels.conn.reporter {
            super::Reporter::Source => &settings.client,
            super::Reporter::Destination => &settings.server,
        };
        if side.metrics.tags.is_some() {
            let host = req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
                .unwrap_or_default();
            self.arrived = Some(Box::new(ArrivedRequest {
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
                host: host.to_string(),
                protocol: match req.version() {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                },
                headers: req.headers().clone(),
            }));
        }
        self.settings = Some(settings);
    }

    /// The tag overrides of `metrics`, evaluated over this request and its response.
    fn tags(&self, metrics: &MetricSettings, duration: std::time::Duration) -> Option<SeriesTags> {
        let plan = metrics.tags.as_ref()?;
        let td = &self.telemetry.trust_domain;
        let source = principal(&self.labels.conn.source, td);
        let destination = principal(&self.labels.conn.destination, td);
        let a = self.arrived.as_deref();
        let code = self.labels.response_code;
        Some(plan.evaluate(
            &RequestAttrs {
                method: a.map(|a| a.method.as_str()),
                path: a.map(|a| a.path.as_str()),
                host: a.map(|a| a.host.as_str()),
                scheme: a.map(|_| "http"),
                protocol: a.map(|a| a.protocol),
                headers: a.map(|a| &a.headers),
                response_code: (code != 0).then_some(code),
                duration: Some(duration),
                mtls: Some(self.labels.conn.mtls),
                upstream_address: self.upstream,
                source_address: Some(self.downstream.0),
                destination_address: Some(self.downstream.1),
                requested_server_name: None,
                // Envoy's `request.size`/`response.size`: body bytes.
                request_size: Some(self.request_body.load(Ordering::Relaxed)),
                response_size: Some(self.response_body),
            },
            Principals {
                source: source.as_deref(),
                destination: destination.as_deref(),
            },
        ))
    }

    /// Where the request body's bytes are counted as they are sent.
    pub fn request_body_counter(&self) -> Arc<AtomicU64> {
        self.request_body.clone()
    }

    /// The response's status line and headers (its body is counted as it streams).
    /// Sets the workload's settings for a request relayed as bytes: its side has no metric tag
    /// overrides, so nothing of the request is kept.
    pub fn set_observed_settings(&mut self, settings: Arc<EffectiveTelemetry>) {
        self.settings = Some(settings);
    }

    /// The status and header bytes of a response relayed as bytes (never gRPC).
    pub fn set_observed_response(&mut self, code: u16, header_bytes: u64) {
        self.labels.response_code = code;
        self.response_headers = header_bytes;
    }

    pub fn set_response(&mut self, code: u16, headers: &http::HeaderMap) {
        self.labels.response_code = code;
        self.response_headers = header_bytes(headers);
        // A trailers-only gRPC response carries its status in the headers.
        self.grpc_status_from(headers);
    }

    pub fn add_response_body(&mut self, n: u64) {
        self.response_body += n;
    }

    /// Takes the gRPC status from headers or trailers (gRPC requests only).
    pub fn grpc_status_from(&mut self, headers: &http::HeaderMap) {
        if self.labels.protocol != "grpc" {
            return;
        }
        if let Some(status) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u16>().ok())
        {
            self.labels.grpc_status = Some(status);
        }
    }

    /// Records the request. `flag` overrides the response flags decided so far (`UR` when the
    /// upstream failed mid-body, `DC` when the app went away before the end).
    pub fn finish(mut self, flag: Option<&'static str>) {
        if let Some(flag) = flag {
            self.labels.conn.flags = flag;
        }
        let duration = self.start.elapsed();
        let request_body = self.request_body.load(Ordering::Relaxed);
        if let Some(span) = self.span.take() {
            let code = self.labels.response_code;
            span.finish(&ResponseInfo {
                status: (code != 0).then_some(code),
                response_flags: self.labels.conn.flags,
                request_size: self.request_headers + request_body,
                response_size: self.response_headers + self.response_body,
                upstream_cluster: self.cluster_name.as_deref(),
                upstream_cluster_name: self.cluster_name.as_deref(),
                remote_ip: self.upstream.map(|a| a.ip()),
            });
        }
        let side = self
            .settings
            .as_deref()
            .map(|t| match self.labels.conn.reporter {
                super::Reporter::Source => &t.client,
                super::Reporter::Destination => &t.server,
            });
        let recorded = side.map_or(Recorded::ALL, |s| Recorded::of(&s.metrics));
        // The connection's tags (copied with its labels at the destination) are not the request's.
        self.labels.conn.tags = side.and_then(|s| self.tags(&s.metrics, duration));
        self.telemetry.requests.record(
            &self.labels,
            recorded,
            duration.as_secs_f64() * 1000.0,
            self.request_headers + request_body,
            self.response_headers + self.response_body,
        );
        if let Some(fields) = self.log.as_mut() {
            fields.response_code = self.labels.response_code;
            fields.grpc_status = self.labels.grpc_status;
        }
        if let (Some(side), Some(fields)) =
            (side.filter(|s| s.access_log.enabled()), self.log.as_deref())
        {
            write_sinks(
                &self.telemetry.sinks,
                &side.access_log,
                &SinkLine {
                    start_time: self.started,
                    duration,
                    fields,
                    flags: self.labels.conn.flags,
                    mtls: self.labels.conn.mtls,
                    downstream: self.downstream,
                    upstream: self.upstream,
                    bytes_received: request_body,
                    bytes_sent: self.response_body,
                },
            );
        }
        if let Some(log) = &self.telemetry.access_log {
            log.write(&Entry {
                start_time: self.started,
                duration,
                labels: &self.labels.conn,
                trust_domain: &self.telemetry.trust_domain,
                downstream: self.downstream,
                upstream: self.upstream,
                bytes_sent: self.response_body,
                bytes_received: request_body,
                flags: self.labels.conn.flags,
                error: None,
                request: self.log.as_deref(),
            });
        }
    }
}

/// The size of a header block as HTTP/1.1 would carry it (`name: value\r\n` each), which is
/// what Envoy's `request.total_size` counts for headers.
pub fn header_bytes(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum()
}
