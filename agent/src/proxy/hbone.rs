//! The HBONE port (15008) in each enrolled pod. sk_lookup never steers it, so it is a normal
//! listener. mTLS + HTTP/2 CONNECT termination lands with the HBONE issue; until then a connection
//! here is refused with a reset (never relayed in plaintext) and counted.

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::debug;

use super::{reset, Metrics, PodContext, ProxyInputs};

pub struct HboneInbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
}

impl HboneInbound {
    pub async fn run(self) {
        while let Ok((stream, peer)) = self.listener.accept().await {
            Metrics::inc(&self.pi.metrics.hbone_refused);
            debug!(pod = %self.pod.name, %peer, "HBONE not served yet; resetting");
            reset(stream);
        }
    }
}
