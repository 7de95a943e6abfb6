//! Inbound plaintext: connections for the pod's IP on any port, steered by sk_lookup to the pod's
//! 15006 listener. The accepted socket's local address is the original destination. The proxy
//! reaches the app from the pod's own IP, which sk_lookup never steers (no loop). Policy is asked
//! first, with no identity (PeerAuthentication STRICT refuses every such connection).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::addr::{canonical, OrigDst, PeerAddr};
use super::inbound::authorize;
use super::metrics::{ConnectionResult, Peer, Reporter, ServiceRef, TcpLabels};
use super::{connect, copy, reset, Counters, PodContext, ProxyInputs};

pub struct InboundPlain {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
    /// To and from the other workers' loops on this listener.
    pub handoff: super::accept::Handoff,
}

impl InboundPlain {
    pub async fn run(self) {
        let InboundPlain {
            pi,
            pod,
            listener,
            handoff,
        } = self;
        let (name, affinity) = (pod.name.clone(), pod.netns_cookie);
        let drain = pi.drain.clone();
        super::accept::serve(
            listener,
            handoff,
            &drain,
            "inbound_plain",
            &name,
            affinity,
            move |stream, peer| handle(pi.clone(), pod.clone(), stream, PeerAddr(peer)),
        )
        .await;
    }
}

async fn handle(pi: Arc<ProxyInputs>, pod: Arc<PodContext>, stream: TcpStream, peer: PeerAddr) {
    Counters::inc(&pi.counters.inbound_accepted);
    let _ = stream.set_nodelay(true);
    let Ok(dst) = stream.local_addr() else {
        return reset(stream);
    };
    let dst = OrigDst(dst);
    debug!(pod = %pod.name, %peer, %dst, "inbound plaintext");
    let snap = pi.snapshot.load_full();
    let labels = TcpLabels {
        reporter: Reporter::Destination,
        // No identity: the workload at the source address, as far as the snapshot knows it.
        source: snap
            .state
            .workload_by_ip(canonical(peer.0.ip()))
            .map_or(Peer::Unknown, |w| Peer::Address(w.istio.clone())),
        destination: Peer::Workload(pod.istio.clone()),
        service: snap
            .local_service(&pod.namespace, &pod.name, dst.0.port())
            .cloned()
            .map(ServiceRef),
        flags: "-",
        mtls: false,
        tags: None,
    };
    // The destination workload's SERVER settings, as over HBONE.
    let settings = snap
        .tcp_telemetry
        .then(|| snap.telemetry_of(&format!("{}/{}", pod.namespace, pod.name)));
    let labels = match settings {
        Some(s) => labels.tagged(
            &s.server.metrics,
            (peer.0, dst.0),
            pi.secrets.trust_domain(),
        ),
        None => labels,
    };
    let mut result = ConnectionResult::open(&pi.telemetry, labels, (peer.0, dst.0), settings);
    if result.logs() {
        result.set_cluster(super::metrics::inbound_cluster(dst.0.port()));
    }
    if let Err(e) = authorize(&pi, &snap, &pod, peer, dst, None) {
        // Closed before the app is reached (a reset: the client sees a refusal).
        reset(stream);
        return result.finish(Err(e));
    }
    result.set_upstream(dst.0);
    match connect::app(&pod, dst.0, peer.0).await {
        Ok(app) => {
            let outcome = copy::bidirectional(stream, app, pi.splice()).await;
            super::outbound::finish(&pi, &outcome);
            result.finish(Ok(outcome));
        }
        Err(e) => {
            Counters::inc(&pi.counters.inbound_connect_failed);
            connect::log_app_unreachable(&pod, dst.0, peer.0, &e);
            reset(stream);
            result.finish(Err(e));
        }
    }
}
