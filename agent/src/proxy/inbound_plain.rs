//! Inbound plaintext: connections for the pod's IP on any port, steered by sk_lookup to the pod's
//! 15006 listener. The accepted socket's local address is the original destination. The proxy
//! reaches the app from the pod's own IP, which sk_lookup never steers (no loop). Policy is asked
//! first, with no identity (PeerAuthentication STRICT refuses every such connection).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{
    outbound::finish, relay, reset, Decision, InboundConnection, Metrics, PodContext, ProxyInputs,
};

pub struct InboundPlain {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
}

impl InboundPlain {
    pub async fn run(self) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %self.pod.name, error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            Metrics::inc(&self.pi.metrics.inbound_accepted);
            let (pi, pod) = (self.pi.clone(), self.pod.clone());
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(dst) = stream.local_addr() else {
                    return reset(stream);
                };
                debug!(pod = %pod.name, %peer, %dst, "inbound plaintext");
                let conn = InboundConnection {
                    pod: &pod,
                    src: peer,
                    dst,
                    identity: None,
                };
                if let Decision::Deny { policy, reason } = pi.policy.check(&conn) {
                    // Closed before the app is reached (a reset: the client sees a refusal).
                    Metrics::inc(&pi.metrics.inbound_denied);
                    debug!(pod = %pod.name, %peer, %dst, policy, reason, "plaintext inbound denied");
                    return reset(stream);
                }
                match connect_app(&pod, dst).await {
                    Ok(app) => finish(&pi, relay::relay(stream, app).await),
                    Err(e) => {
                        Metrics::inc(&pi.metrics.inbound_connect_failed);
                        debug!(pod = %pod.name, %dst, error = %e, "app unreachable");
                        reset(stream);
                    }
                }
            });
        }
    }
}

/// Connects to the app at `dst` from inside the pod, source = the pod's own IP.
pub async fn connect_app(
    pod: &PodContext,
    dst: std::net::SocketAddr,
) -> std::io::Result<TcpStream> {
    let bind = pod.ip_like(dst.ip()).or(Some(dst.ip()));
    let socket = pod.worker.upstream_socket(dst, bind).await?;
    let s = socket.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}
