//! The one accept loop every stage runs: each accepted connection gets its own task; an accept
//! error (EMFILE, ENOBUFS) backs off briefly instead of spinning, and is logged once per streak.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Accepts until the task running it is aborted (unenrolment closes the listener that way).
pub async fn serve<F, Fut>(listener: TcpListener, stage: &'static str, pod: &str, mut handle: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                failing = false;
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                if failing {
                    debug!(stage, pod, error = %e, "accept failed");
                } else {
                    warn!(stage, pod, error = %e, "accept failing; backing off");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
