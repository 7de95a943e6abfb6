//! Istio's standard TCP metrics, recorded by one [`ConnectionResult`] per proxied connection (as
//! ztunnel's `proxy/metrics.rs` does): `istio_tcp_connections_opened_total` when it opens, and
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total` and
//! `istio_tcp_received_bytes_total` when it ends, with Istio's standard labels; the same result
//! writes the connection's access-log lines. The Telemetry API applies to connections as to
//! requests (the workload's side decides which families count it and which access logs get it).
//!
//! Label values follow Istio: `reporter` is `source` on the client's node and `destination` on
//! the server's; workload labels come from the pods (`state::IstioLabels`), `unknown` when not
//! known; at the destination the source is the peer's verified identity (and the workload at its
//! address only if that workload runs as that identity), never something a client can claim.
//! Series of workloads that have left the snapshot are dropped (`retain`), so cardinality follows
//! the pods that exist.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::MetricType;

pub mod requests;

#[cfg(test)]
mod connection_tests;

use super::access_log::{write_connection, AccessLog, ConnectionLine, Entry, Sinks};
use super::copy::{Outcome, Side};
use super::error::Error;
use crate::config::istio::telemetry::IstioMetric;
use crate::config::telemetry::{EffectiveTelemetry, MetricSettings, SideTelemetry};
use crate::config::telemetry::{Principals, RequestAttrs, SeriesTags};
use crate::identity::Identity;
use crate::state::{IstioLabels, Service, UNKNOWN};

/// Istio's inbound cluster name for the app's `port`, `inbound|<port>||` (the access log's
/// `upstream_cluster`, a SERVER span's tags): built for every such request, without the formatter.
pub fn inbound_cluster(port: u16) -> String {
    let mut buf = itoa::Buffer::new();
    ["inbound|", buf.format(port), "||"].concat()
}

/// Istio's default cluster id (`source_cluster`, `destination_cluster`).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// One end of a connection as the metrics describe it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A workload of the snapshot, running as the identity it proved (or this node's own pod).
    Workload(Arc<IstioLabels>),
    /// The workload of the snapshot at a plaintext peer's address: its labels, but no proven
    /// identity (`*_principal` stays `unknown`, as Istio reports plaintext peers).
    Address(Arc<IstioLabels>),
    /// Only the verified identity is known (no workload of the snapshot at its address runs as
    /// it).
    Identity(Identity),
    Unknown,
}

/// The Service a connection was addressed to, compared by hostname.
#[derive(Debug, Clone)]
pub struct ServiceRef(pub Arc<Service>);

impl PartialEq for ServiceRef {
    fn eq(&self, other: &Self) -> bool {
        self.0.hostname == other.0.hostname
    }
}
impl Eq for ServiceRef {}
impl Hash for ServiceRef {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hostname.hash(h);
    }
}

/// The label set of one series.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<ServiceRef>,
    /// Envoy's `%RESPONSE_FLAGS%`: `-` for none.
    pub flags: &'static str,
    /// `connection_security_policy`: `mutual_tls` over HBONE, `none` in plaintext.
    pub mtls: bool,
    /// The Telemetry API's tag overrides of the local workload's side, evaluated for this
    /// connection (or, in a request's labels, for that request); None without overrides.
    pub tags: Option<SeriesTags>,
}

impl TcpLabels {
    /// These labels with the tag overrides of `metrics` (the local workload's settings for its
    /// side) evaluated over the connection as it opens. Without overrides this is an `Option`
    /// check and nothing else.
    pub fn tagged(
        mut self,
        metrics: &MetricSettings,
        downstream: (SocketAddr, SocketAddr),
        trust_domain: &str,
    ) -> Self {
        if let Some(plan) = &metrics.tags {
            let source = principal(&self.source, trust_domain);
            let destination = principal(&self.destination, trust_domain);
            self.tags = Some(plan.evaluate(
                &RequestAttrs {
                    source_address: Some(downstream.0),
                    destination_address: Some(downstream.1),
                    mtls: Some(self.mtls),
                    ..RequestAttrs::default()
                },
                Principals {
                    source: source.as_deref(),
                    destination: destination.as_deref(),
                },
            ));
        }
        self
    }
}

/// A peer's SPIFFE id, as the `*_principal` labels show it; None when not proven.
pub(crate) fn principal(peer: &Peer, trust_domain: &str) -> Option<String> {
    match peer {
        Peer::Workload(w) => Some(format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            w.namespace, w.service_account
        )),
        Peer::Identity(id) => Some(id.to_string()),
        Peer::Address(_) | Peer::Unknown => None,
    }
}

#[derive(Debug, Default)]
struct TcpCounters {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    /// The families some connection recorded in ([`TcpRecorded`] bits): a family no connection
    /// of the series records (a Telemetry override turned it off) is not shown for it.
    recorded: AtomicU8,
}

impl TcpCounters {
    fn mark(&self, on: TcpRecorded) {
        // A load first: once set, the bits cost no write (and no cache-line bounce).
        if self.recorded.load(Ordering::Relaxed) & on.0 != on.0 {
            self.recorded.fetch_or(on.0, Ordering::Relaxed);
        }
    }
}

/// Which of the four TCP families a connection is recorded in: the Telemetry API's `metrics`
/// overrides (`TCP_OPENED_CONNECTIONS`, `TCP_CLOSED_CONNECTIONS`, `TCP_SENT_BYTES`,
/// `TCP_RECEIVED_BYTES` disabled, `ALL_METRICS`, or `prometheus` out of the providers) turn
/// them off per workload and side, as for the request metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRecorded(u8);

impl TcpRecorded {
    pub const OPENED: TcpRecorded = TcpRecorded(1);
    pub const CLOSED: TcpRecorded = TcpRecorded(2);
    pub const SENT: TcpRecorded = TcpRecorded(4);
    pub const RECEIVED: TcpRecorded = TcpRecorded(8);
    pub const ALL: TcpRecorded = TcpRecorded(15);
    pub const NONE: TcpRecorded = TcpRecorded(0);

    pub fn of(settings: &MetricSettings) -> TcpRecorded {
        [
            (IstioMetric::TcpOpenedConnections, TcpRecorded::OPENED),
            (IstioMetric::TcpClosedConnections, TcpRecorded::CLOSED),
            (IstioMetric::TcpSentBytes, TcpRecorded::SENT),
            (IstioMetric::TcpReceivedBytes, TcpRecorded::RECEIVED),
        ]
        .into_iter()
        .filter(|(m, _)| settings.records(*m))
        .fold(TcpRecorded::NONE, |acc, (_, bit)| {
            TcpRecorded(acc.0 | bit.0)
        })
    }

    pub fn has(self, family: TcpRecorded) -> bool {
        self.0 & family.0 == family.0
    }
}

/// The four families, as one map from label set to counters (a custom collector, so that series
/// can be dropped).
#[derive(Debug, Default)]
struct TcpSeries(Mutex<HashMap<TcpLabels, Arc<TcpCounters>, foldhash::fast::RandomState>>);

impl TcpSeries {
    fn get(&self, labels: &TcpLabels) -> Arc<TcpCounters> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(labels) {
            return c.clone();
        }
        map.entry(labels.clone()).or_default().clone()
    }
}

/// Labels of `ambit_policy_denials_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
pub struct DenialLabels {
    /// `namespace/name` of the PeerAuthentication or AuthorizationPolicy that denied.
    pub policy: String,
    /// `namespace/name` of the workload.
    pub workload: String,
}

/// The proxy's Istio telemetry: metrics and the access log.
#[derive(Debug)]
pub struct Telemetry {
    tcp: Arc<TcpSeries>,
    pub requests: Arc<requests::RequestSeries>,
    pub denials: Family<DenialLabels, Counter>,
    /// The `--access-log` file (JSON lines), if any.
    pub access_log: Option<AccessLog>,
    /// The files the mesh config and the Telemetry API name.
    pub sinks: Sinks,
    pub trust_domain: Arc<str>,
}

impl Telemetry {
    pub fn new(trust_domain: &str, access_log: Option<AccessLog>) -> Self {
        let sinks = Sinks::default();
        Telemetry {
            tcp: Arc::new(TcpSeries::default()),
            requests: Arc::new(requests::RequestSeries::default()),
            denials: Family::default(),
            access_log: access_log.map(|log| log.counting_in(sinks.dropped())),
            sinks,
            trust_domain: Arc::from(trust_domain),
        }
    }

    /// Registers the families with the admin endpoint's registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(TcpCollector {
            series: self.tcp.clone(),
            trust_domain: self.trust_domain.clone(),
        }));
        registry.register_collector(Box::new(requests::RequestCollector {
            series: self.requests.clone(),
            trust_domain: self.trust_domain.clone(),
        }));
        registry.register(
            "ambit_policy_denials",
            "Inbound connections or HBONE streams denied, by the policy that decided and the workload",
            self.denials.clone(),
        );
        self.sinks.register(registry);
    }

    /// Drops the series whose local end (the source for `reporter="source"`, the destination for
    /// `reporter="destination"`) is no longer a workload of this node: cardinality follows the
    /// pods that are here.
    pub fn retain_local(&self, local: &std::collections::HashSet<IstioLabels>) {
        self.requests.retain_local(local);
        self.tcp
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|labels, _| {
                let here = match labels.reporter {
                    Reporter::Source => &labels.source,
                    Reporter::Destination => &labels.destination,
                };
                match here {
                    Peer::Workload(w) | Peer::Address(w) => local.contains(w),
                    _ => true,
                }
            });
    }
}

/// One connection's telemetry: opened when created, closed (with bytes, flags and an access-log
/// line) by [`ConnectionResult::finish`], or as a downstream disconnect if dropped unfinished.
/// Created with the connection's final labels: the opened count goes to that series at once.
///
/// The Telemetry API applies as on the request path: at the source node the source workload's
/// CLIENT settings, at the destination node the destination workload's SERVER settings (the side
/// follows `reporter`). They decide which of the four families count the connection and which
/// access logs (mesh `accessLogFile`, `envoyFileAccessLog` providers) get its line.
pub struct ConnectionResult {
    telemetry: Arc<Telemetry>,
    labels: TcpLabels,
    /// The series' counters; None when no family records this connection.
    counters: Option<Arc<TcpCounters>>,
    recorded: TcpRecorded,
    /// The workload's settings, kept only when its side writes access logs.
    logged: Option<Arc<EffectiveTelemetry>>,
    /// Istio's cluster name, for the access log.
    cluster: Option<String>,
    /// The app's SNI, for the access log.
    sni: Option<String>,
    /// The stream was served as HTTP: its requests were logged one by one, as Envoy's HTTP
    /// connection manager does, and the connection writes no line of its own to those logs.
    l7: bool,
    started: SystemTime,
    start: Instant,
    /// Downstream: (remote, local) as the proxy accepted it.
    downstream: (SocketAddr, SocketAddr),
    upstream: Option<SocketAddr>,
    done: bool,
}

impl ConnectionResult {
    /// `settings`: the settings of the workload this node proxies for (the source's at
    /// `reporter="source"`, the destination's at `reporter="destination"`); None when the
    /// snapshot says no workload of the node has any that change TCP connections
    /// (`Snapshot::tcp_telemetry`): everything is recorded and only `--access-log` is written.
    pub fn open(
        telemetry: &Arc<Telemetry>,
        labels: TcpLabels,
        downstream: (SocketAddr, SocketAddr),
        settings: Option<&Arc<EffectiveTelemetry>>,
    ) -> Self {
        let (recorded, logged) = match settings {
            None => (TcpRecorded::ALL, None),
            Some(s) => {
                let side = side_of(s, labels.reporter);
                (
                    TcpRecorded::of(&side.metrics),
                    side.access_log.enabled().then(|| s.clone()),
                )
            }
        };
        let counters = (recorded != TcpRecorded::NONE).then(|| {
            let c = telemetry.tcp.get(&labels);
            c.mark(recorded);
            if recorded.has(TcpRecorded::OPENED) {
                c.opened.fetch_add(1, Ordering::Relaxed);
            }
            c
        });
        ConnectionResult {
            telemetry: telemetry.clone(),
            labels,
            counters,
            recorded,
            logged,
            cluster: None,
            sni: None,
            l7: false,
            started: SystemTime::now(),
            start: Instant::now(),
            downstream,
            upstream: None,
            done: false,
        }
    }

    /// The address the connection went on to (the endpoint, or the app).
    pub fn set_upstream(&mut self, addr: SocketAddr) {
        self.upstream = Some(addr);
    }

    /// Whether a Telemetry/mesh access log will get this connection's line (so its fields are
    /// worth making).
    pub fn logs(&self) -> bool {
        self.logged.is_some()
    }

    /// Istio's cluster name of where the connection went (`outbound|port|subset|host`,
    /// `inbound|port||`), for the access log.
    pub fn set_cluster(&mut self, name: String) {
        self.cluster = Some(name);
    }

    /// The SNI of the app's ClientHello (a port routed by it), for the access log.
    pub fn set_requested_server_name(&mut self, sni: &str) {
        self.sni = Some(sni.to_owned());
    }

    /// The connection carried HTTP that was served (and logged) request by request.
    pub fn served_as_http(&mut self) {
        self.l7 = true;
    }

    /// Records the end of the connection.
    pub fn finish(mut self, result: Result<Outcome, Error>) {
        self.record(result);
    }

    fn record(&mut self, result: Result<Outcome, Error>) {
        self.done = true;
        // Side A is always the downstream (the client's end), B the upstream. Istio (Envoy):
        // received = bytes from the downstream (the request direction), sent = bytes sent to it.
        let (received, sent, flags, error) = match &result {
            Ok(o) => {
                let flags = match o.failed {
                    None => "-",
                    Some(Side::A) => "DC",
                    Some(Side::B) => "UR",
                };
                (o.a_to_b, o.b_to_a, flags, None)
            }
            Err(e) => (0, 0, e.response_flag(), Some(e)),
        };
        if let Some(opened) = &self.counters {
            let counters = if flags == self.labels.flags {
                opened.clone()
            } else {
                let mut labels = self.labels.clone();
                labels.flags = flags;
                let c = self.telemetry.tcp.get(&labels);
                c.mark(self.recorded);
                c
            };
            let on = self.recorded;
            if on.has(TcpRecorded::CLOSED) {
                counters.closed.fetch_add(1, Ordering::Relaxed);
            }
            if on.has(TcpRecorded::SENT) {
                counters.sent.fetch_add(sent, Ordering::Relaxed);
            }
            if on.has(TcpRecorded::RECEIVED) {
                counters.received.fetch_add(received, Ordering::Relaxed);
            }
        }
        // Read once, and only for a line (a connection that logs nothing reads no clock).
        let elapsed = std::cell::OnceCell::new();
        let duration = || *elapsed.get_or_init(|| self.start.elapsed());
        if let (Some(settings), false) = (&self.logged, self.l7) {
            let termination = match error {
                // Envoy's RBAC network filter's termination details.
                Some(Error::Denied { policy, .. }) => {
                    Some(format!("rbac_access_denied_matched_policy[{policy}]"))
                }
                _ => None,
            };
            let transport = match error {
                Some(e @ Error::Tunnel { .. }) => Some(e.to_string()),
                _ => None,
            };
            write_connection(
                &self.telemetry.sinks,
                &side_of(settings, self.labels.reporter).access_log,
                &ConnectionLine {
                    start_time: self.started,
                    duration: duration(),
                    flags,
                    // The downstream connection: mutual TLS only for an HBONE stream at the
                    // destination (the app's connection at the source is plaintext).
                    mtls: self.labels.mtls && self.labels.reporter == Reporter::Destination,
                    downstream: self.downstream,
                    upstream: self.upstream,
                    upstream_cluster: self.cluster.as_deref(),
                    requested_server_name: self.sni.as_deref(),
                    bytes_received: received,
                    bytes_sent: sent,
                    termination_details: termination.as_deref(),
                    transport_failure: transport.as_deref(),
                },
            );
        }
        if let Some(log) = &self.telemetry.access_log {
            let error = error.map(ToString::to_string);
            log.write(&Entry {
                start_time: self.started,
                duration: duration(),
                labels: &self.labels,
                trust_domain: &self.telemetry.trust_domain,
                downstream: self.downstream,
                upstream: self.upstream,
                bytes_sent: sent,
                bytes_received: received,
                flags,
                error: error.as_deref(),
                request: None,
            });
        }
    }
}

/// The settings of the side a reporter is: CLIENT at the source, SERVER at the destination.
fn side_of(settings: &EffectiveTelemetry, reporter: Reporter) -> &SideTelemetry {
    match reporter {
        Reporter::Source => &settings.client,
        Reporter::Destination => &settings.server,
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        // The task was cancelled (the listener's pod unenrolled mid-connection, the runtime
        // stopped): the downstream went away before an outcome.
        if !self.done {
            self.record(Err(Error::DownstreamReset));
        }
    }
}

/// A label value, escaped as OpenMetrics asks.
pub(crate) struct Value<'a>(pub(crate) &'a str);

impl EncodeLabelValue for Value<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        crate::admin::escape_label_value(self.0, encoder)
    }
}

struct TcpCollector {
    series: Arc<TcpSeries>,
    trust_domain: Arc<str>,
}

impl fmt::Debug for TcpCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpCollector").finish_non_exhaustive()
    }
}

/// One series' labels as (name, value) pairs.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// The label values of one series, in Istio's order.
pub(crate) fn label_values(l: &TcpLabels, trust_domain: &str) -> Labels {
    let mut out = Vec::with_capacity(24);
    out.push(("reporter", l.reporter.as_str().to_string()));
    for (side, peer) in [("source", &l.source), ("destination", &l.destination)] {
        let w: Option<&IstioLabels> = match peer {
            Peer::Workload(w) | Peer::Address(w) => Some(w),
            Peer::Identity(_) | Peer::Unknown => None,
        };
        let principal = principal(peer, trust_domain);
        let identity_ns = match peer {
            Peer::Identity(id) => Some(id.namespace.clone()),
            _ => None,
        };
        let get = |f: fn(&IstioLabels) -> &str| w.map_or(UNKNOWN.to_string(), |w| f(w).to_string());
        let name = |n: &str| -> &'static str {
            match (side, n) {
                ("source", "workload") => "source_workload",
                ("source", "workload_namespace") => "source_workload_namespace",
                ("source", "principal") => "source_principal",
                ("source", "app") => "source_app",
                ("source", "version") => "source_version",
                ("source", "canonical_service") => "source_canonical_service",
                ("source", "canonical_revision") => "source_canonical_revision",
                ("source", _) => "source_cluster",
                (_, "workload") => "destination_workload",
                (_, "workload_namespace") => "destination_workload_namespace",
                (_, "principal") => "destination_principal",
                (_, "app") => "destination_app",
                (_, "version") => "destination_version",
                (_, "canonical_service") => "destination_canonical_service",
                (_, "canonical_revision") => "destination_canonical_revision",
                _ => "destination_cluster",
            }
        };
        out.push((name("workload"), get(|w| &w.workload)));
        out.push((
            name("workload_namespace"),
            w.map(|w| w.namespace.clone())
                .or(identity_ns)
                .unwrap_or_else(|| UNKNOWN.into()),
        ));
        out.push((
            name("principal"),
            principal.unwrap_or_else(|| UNKNOWN.into()),
        ));
        out.push((name("app"), get(|w| &w.app)));
        out.push((name("version"), get(|w| &w.version)));
        out.push((name("canonical_service"), get(|w| &w.canonical_service)));
        out.push((name("canonical_revision"), get(|w| &w.canonical_revision)));
        out.push((
            name("cluster"),
            if w.is_some() {
                DEFAULT_CLUSTER
            } else {
                UNKNOWN
            }
            .to_string(),
        ));
        if side == "source" {
            continue;
        }
        let svc = l.service.as_ref().map(|s| &s.0);
        out.push((
            "destination_service",
            svc.map_or(UNKNOWN.into(), |s| s.hostname.clone()),
        ));
        out.push((
            "destination_service_name",
            svc.map_or(UNKNOWN.into(), |s| s.name.clone()),
        ));
        out.push((
            "destination_service_namespace",
            svc.map_or(UNKNOWN.into(), |s| s.namespace.clone()),
        ));
    }
    out.push(("request_protocol", "tcp".into()));
    out.push(("response_flags", l.flags.into()));
    out.push((
        "connection_security_policy",
        if l.mtls { "mutual_tls" } else { "none" }.into(),
    ));
    out
}

impl Collector for TcpCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let series: Vec<(Labels, Option<SeriesTags>, [u64; 4], TcpRecorded)> = {
            let map = self.series.0.lock().unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .map(|(l, c)| {
                    (
                        label_values(l, &self.trust_domain),
                        l.tags.clone(),
                        [
                            c.opened.load(Ordering::Relaxed),
                            c.closed.load(Ordering::Relaxed),
                            c.sent.load(Ordering::Relaxed),
                            c.received.load(Ordering::Relaxed),
                        ],
                        TcpRecorded(c.recorded.load(Ordering::Relaxed)),
                    )
                })
                .collect()
        };
        let families = [
            (
                IstioMetric::TcpOpenedConnections,
                "istio_tcp_connections_opened",
                "The total number of TCP connections opened",
            ),
            (
                IstioMetric::TcpClosedConnections,
                "istio_tcp_connections_closed",
                "The total number of TCP connections closed",
            ),
            (
                IstioMetric::TcpSentBytes,
                "istio_tcp_sent_bytes",
                "The size of total bytes sent during response in case of a TCP connection",
            ),
            (
                IstioMetric::TcpReceivedBytes,
                "istio_tcp_received_bytes",
                "The size of total bytes received during request in case of a TCP connection",
            ),
        ];
        let bits = [
            TcpRecorded::OPENED,
            TcpRecorded::CLOSED,
            TcpRecorded::SENT,
            TcpRecorded::RECEIVED,
        ];
        for (i, (metric, name, help)) in families.into_iter().enumerate() {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            // A family a Telemetry override kept every connection of the series out of is not
            // shown for it (a zero that was never counted would read as "nothing happened").
            let shown = series.iter().filter(|s| s.3.has(bits[i]));
            let merged = merge(
                shown.map(|(labels, tags, values, _)| {
                    (final_labels(metric, labels, tags), values[i])
                }),
                |a, b| *a += b,
            );
            for (labels, value) in merged {
                let set: Vec<(&str, Value<'_>)> =
                    labels.iter().map(|(k, v)| (*k, Value(v))).collect();
                ConstCounter::new(value).encode(family.encode_family(&LabelSet(&set))?)?;
            }
        }
        Ok(())
    }
}

/// One series' labels for `metric`: its standard labels with its tag overrides applied.
pub(crate) fn final_labels<'a>(
    metric: IstioMetric,
    labels: &'a Labels,
    tags: &'a Option<SeriesTags>,
) -> Vec<(&'a str, &'a str)> {
    let standard: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    match tags {
        None => standard,
        Some(t) => t.apply(metric, &standard),
    }
}

/// Series whose labels came out equal (a tag override REMOVEd the only label they differed in)
/// as one, their values added; in first-seen order.
pub(crate) fn merge<'a, D>(
    series: impl Iterator<Item = (Vec<(&'a str, &'a str)>, D)>,
    add: impl Fn(&mut D, D),
) -> Vec<(Vec<(&'a str, &'a str)>, D)> {
    let mut out: Vec<(Vec<(&str, &str)>, D)> = Vec::new();
    let mut at: HashMap<Vec<(&str, &str)>, usize, foldhash::fast::RandomState> = HashMap::default();
    for (labels, value) in series {
        match at.get(&labels) {
            Some(&i) => add(&mut out[i].1, value),
            None => {
                at.insert(labels.clone(), out.len());
                out.push((labels, value));
            }
        }
    }
    out
}

/// A list of (name, value) pairs as a label set.
pub(crate) struct LabelSet<'a>(pub(crate) &'a [(&'a str, Value<'a>)]);

impl EncodeLabelSet for LabelSet<'_> {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), fmt::Error> {
        self.0.encode(encoder)
    }
}

#[cfg(test)]
mod tests;
