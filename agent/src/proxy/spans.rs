//! Spans on the request path, as Istio's sidecars make them: each HTTP request the proxy serves
//! gets the span of its side, CLIENT at the source node (outbound) and SERVER at the destination
//! node (inbound), when tracing is configured for the workload (MeshConfig `enableTracing`, the
//! Telemetry API) and the request is sampled; the trace context is carried on either way (B3 and
//! W3C headers written for the next hop, the incoming decision kept). Sampled spans go to the
//! provider's tracer, which batches and exports them on the control runtime (`crate::trace`).

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Version};
use tracing::debug;

use super::{PodContext, ProxyInputs};
use crate::config::telemetry::{EffectiveTelemetry, TracingSettings};
use crate::trace::{
    self, Carried, Extracted, NextHop, RequestInfo, ResponseInfo, SpanBuilder, SpanKind, Tracer,
    Workload,
};

/// Istio's default `CLUSTER_ID` (the `istio.cluster_id` tag and `source_cluster` label).
const CLUSTER_ID: &str = "Kubernetes";

/// A workload's tracing on side `kind` (CLIENT: its requests as a client, SERVER: as a
/// server), when configured.
pub fn of(telemetry: &EffectiveTelemetry, kind: SpanKind) -> Option<&TracingSettings> {
    match kind {
        SpanKind::Client => telemetry.client.tracing.as_ref(),
        _ => telemetry.server.tracing.as_ref(),
    }
}

/// A reported request's span while the request is in flight.
#[derive(Debug)]
pub struct RequestSpan {
    builder: SpanBuilder,
    tracer: Arc<Tracer>,
}

/// The request, as a reported span needs it.
pub struct Start<'a> {
    /// The Service host (or the authority) and port: Envoy's operation name `host:port/*`.
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub version: Version,
    /// Envoy's `peer.address`: the app (CLIENT spans) or the calling peer (SERVER spans).
    pub peer: Option<IpAddr>,
}

/// A request's tracing once decided: reported (a sampled span, a tracer to send it to) or only
/// carried on.
pub struct Begun {
    builder: SpanBuilder,
    tracer: Option<Arc<Tracer>>,
}

/// Decides the request's span from its headers (the caller's decision wins). Cheap when the span
/// is not reported: no name, no tags; only the context to carry on.
pub fn begin(
    pi: &ProxyInputs,
    tracing: &TracingSettings,
    kind: SpanKind,
    headers: &HeaderMap,
) -> Begun {
    begin_from(pi, tracing, kind, trace::extract(headers))
}

/// [`begin`] from the caller's context as read already (the relay reads it from the raw head).
pub fn begin_from(
    pi: &ProxyInputs,
    tracing: &TracingSettings,
    kind: SpanKind,
    incoming: Extracted,
) -> Begun {
    let decision = trace::decide(&incoming, tracing.sampling_percent);
    let builder = SpanBuilder::start(kind, String::new(), &incoming, decision);
    let tracer = if builder.sampled() && tracing.report_spans {
        match tracing.tracer.get(&pi.tracers, &tracing.export) {
            Ok(t) => Some(t),
            Err(e) => {
                debug!(error = %e, "no tracer for the provider: span not reported");
                None
            }
        }
    } else {
        None
    };
    Begun { builder, tracer }
}

impl Begun {
    /// Whether the span will be sent (then [`Begun::record`] it, else [`Begun::carry`]).
    pub fn reported(&self) -> bool {
        self.tracer.is_some()
    }

    /// Writes the context into `headers` for the next hop; nothing is reported.
    pub fn carry(self, tracing: &TracingSettings, headers: &mut HeaderMap) {
        trace::inject_as(self.builder.context(), headers, tracing.export.propagation);
    }

    /// [`Begun::carry`] for a request whose head is written as it came: the context headers for
    /// the next hop, given the formats the request `carried`.
    pub fn next_hop(self, tracing: &TracingSettings, carried: Carried) -> NextHop {
        trace::next_hop(self.builder.context(), tracing.export.propagation, carried)
    }

    /// Names the span, records the request's tags and writes the context into `headers`; the
    /// span to finish when the response ends (None when it is not reported).
    pub fn record(
        mut self,
        pi: &ProxyInputs,
        pod: &PodContext,
        tracing: &TracingSettings,
        s: Start<'_>,
        headers: &mut HeaderMap,
    ) -> Option<Box<RequestSpan>> {
        let tracer = self.tracer?;
        self.builder.set_name(trace::operation_name(s.host, s.port));
        let info = RequestInfo {
            headers,
            method: s.method,
            scheme: "http",
            authority: s.authority,
            path: s.path,
            version: s.version,
            peer: s.peer,
        };
        let who = pod
            .trace_workload
            .get_or_init(|| Arc::new(workload(pi, pod)));
        self.builder
            .record_request(&info, who, &tracing.export.tags);
        trace::inject_as(self.builder.context(), headers, tracing.export.propagation);
        Some(Box::new(RequestSpan {
            builder: self.builder,
            tracer,
        }))
    }
}

impl RequestSpan {
    /// Ends the span and hands it to its tracer (never waits).
    pub fn finish(self, resp: &ResponseInfo<'_>) {
        self.tracer.finish(self.builder.end(resp));
    }
}

/// The pod as Istio's tags name it.
fn workload(pi: &ProxyInputs, pod: &PodContext) -> Workload {
    let ip = pod.ips.first().copied();
    let ns = &pod.namespace;
    Workload {
        canonical_service: pod.istio.canonical_service.clone(),
        canonical_revision: pod.istio.canonical_revision.clone(),
        namespace: ns.clone(),
        // Istio: `meshId` defaults to the trust domain.
        mesh_id: pi.telemetry.trust_domain.to_string(),
        cluster_id: CLUSTER_ID.into(),
        node_id: format!(
            "sidecar~{}~{}.{ns}~{ns}.svc.cluster.local",
            ip.map_or_else(String::new, |ip| ip.to_string()),
            pod.name
        ),
        ip,
    }
}
