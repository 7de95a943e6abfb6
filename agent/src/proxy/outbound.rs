//! Outbound: connections the pod's app made, rewritten by connect4/6 to 127.0.0.1/::1:15001 in the
//! pod's netns. The original destination comes from the eBPF map; the upstream socket is created in
//! the same netns, so the source address stays the pod's own.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{relay, reset, Metrics, PodContext, ProxyInputs};

pub struct Outbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
}

impl Outbound {
    pub async fn run(self) {
        // The listener is bound to one address (127.0.0.1 or ::1, port 15001), so every accepted
        // socket's local address is that one: no getsockname per connection.
        let Ok(local) = self.listener.local_addr() else {
            warn!(pod = %self.pod.name, "outbound listener has no local address");
            return;
        };
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %self.pod.name, error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            Metrics::inc(&self.pi.metrics.outbound_accepted);
            tokio::spawn(handle(
                self.pi.clone(),
                self.pod.clone(),
                stream,
                peer,
                local,
            ));
        }
    }
}

async fn handle(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let dst = match pi.orig_dst.take(pod.netns_cookie, peer, local) {
        Ok(Some(dst)) => dst,
        Ok(None) | Err(_) => {
            // Someone connected to 15001 directly, or the entry was lost: nowhere safe to go.
            Metrics::inc(&pi.metrics.outbound_orig_dst_missing);
            warn!(pod = %pod.name, %peer, "outbound connection without an original destination; resetting");
            return reset(stream);
        }
    };
    debug!(pod = %pod.name, %peer, %dst, "outbound captured");
    let upstream = match connect(&pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            Metrics::inc(&pi.metrics.outbound_connect_failed);
            debug!(pod = %pod.name, %dst, error = %e, "outbound connect failed");
            // The app must see what a direct connect would have produced: a reset, not a clean close.
            return reset(stream);
        }
    };
    finish(&pi, relay::relay(stream, upstream).await);
}

async fn connect(pod: &PodContext, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = pod.worker.upstream_socket(dst, None).await?;
    let s = socket.connect(dst).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub(super) fn finish(pi: &ProxyInputs, outcome: relay::RelayOutcome) {
    use std::sync::atomic::Ordering;
    pi.metrics
        .bytes_relayed
        .fetch_add(outcome.a_to_b + outcome.b_to_a, Ordering::Relaxed);
    Metrics::inc(if outcome.reset {
        &pi.metrics.relays_reset
    } else {
        &pi.metrics.relays_completed
    });
}
