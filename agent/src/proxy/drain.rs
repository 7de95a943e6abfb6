//! The proxy's drain signal. When the agent stops (SIGTERM, or a successor took its listeners over)
//! every accept loop stops accepting, each HBONE connection is sent GOAWAY (server side: graceful,
//! so streams in flight are still served; client side: no new stream, GOAWAY once the last ends),
//! and established connections get until the grace period to finish (ztunnel's `drain` module and
//! Envoy's drain sequence do the same). HTTP/1.1 has no GOAWAY: a keep-alive connection from an
//! agent's upstream pool is closed by that pool (told by the HBONE GOAWAY, or by this drain when
//! the pool is this agent's), not by the draining server, so no request meets a closing
//! connection (`http::inbound`, `http::client`).

use std::sync::Arc;

use tokio::sync::watch;

/// Cheap to clone; every clone sees the same signal.
#[derive(Debug, Clone)]
pub struct Drain(Arc<watch::Sender<bool>>);

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(watch::channel(false).0))
    }
}

impl Drain {
    /// Starts the drain (once; later calls change nothing).
    pub fn start(&self) {
        self.0
            .send_if_modified(|draining| !std::mem::replace(draining, true));
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain has started (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: wait_for cannot fail while we wait.
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_before_and_after_the_start_both_see_it() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        let early = tokio::spawn({
            let d = drain.clone();
            async move { d.started().await }
        });
        drain.start();
        drain.start();
        early.await.expect("an early waiter wakes");
        drain.started().await;
        assert!(drain.is_draining());
    }
}
