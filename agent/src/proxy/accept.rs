//! The one accept loop every stage runs: each accepted connection gets its own task; an accept
//! error (EMFILE, ENOBUFS) backs off briefly instead of spinning, and is logged once per streak.
//!
//! Every data-plane worker accepts on every listener (`app::data_plane`), so a connection lands on
//! whichever worker took it first. Where it is served is decided then ([`worker::target`]): on the
//! pod's home worker, so that one pod's connections share one worker's upstream pools (reused
//! across its client connections), unless that worker serves [`HANDOFF_MARGIN`] more connections
//! than the least loaded one, which then takes it (as Envoy's connection balancer evens out its
//! workers). A connection accepted by another worker is handed over through the listener's
//! [`Handoff`]: one wakeup of the other thread per connection, never per request.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::drain::Drain;
use super::worker;

/// How many more connections than the least loaded worker a worker must serve before it hands
/// a new one over.
pub const HANDOFF_MARGIN: usize = 2;

type Handed = (std::net::TcpStream, SocketAddr);

/// One listener's channels between its workers' accept loops: worker `i`'s loop receives on
/// `inbox` what the others send to `to[i]`.
pub struct Handoff {
    to: Arc<[mpsc::UnboundedSender<Handed>]>,
    inbox: mpsc::UnboundedReceiver<Handed>,
}

impl Handoff {
    /// The handoffs of one listener's `workers` accept loops, in worker order.
    pub fn group(workers: usize) -> Vec<Handoff> {
        let (senders, inboxes): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let to: Arc<[mpsc::UnboundedSender<Handed>]> = senders.into();
        inboxes
            .into_iter()
            .map(|inbox| Handoff {
                to: to.clone(),
                inbox,
            })
            .collect()
    }

    /// A loop that never hands off (one worker; tests).
    pub fn none() -> Handoff {
        Handoff::group(1).pop().unwrap_or_else(|| {
            let (_tx, inbox) = mpsc::unbounded_channel();
            Handoff {
                to: Arc::new([]),
                inbox,
            }
        })
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("workers", &self.to.len())
            .finish()
    }
}

/// Accepts until the task running it is aborted (unenrolment closes the listener that way) or the
/// drain starts. Draining, the loop closes its descriptor of the listener (the socket itself lives
/// on while another descriptor holds it: the other workers', or a successor agent's, which then
/// accepts what queues in the backlog) and still serves what the listener's other loops hand it,
/// until every loop of the listener has stopped: a connection in a handoff is never dropped.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    handoff: Handoff,
    drain: &Drain,
    stage: &'static str,
    pod: &str,
    affinity: u64,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Handoff { to, mut inbox } = handoff;
    let mut failing = false;
    let draining = drain.started();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            () = &mut draining => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    failing = false;
                    let stream = match worker::target(affinity, HANDOFF_MARGIN).and_then(|w| to.get(w)) {
                        Some(tx) => match hand(tx, stream, peer) {
                            Ok(()) => continue,
                            Err(stream) => stream,
                        },
                        None => stream,
                    };
                    start(&mut handle, stream, peer);
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
            },
            Some((std, peer)) = inbox.recv() => match TcpStream::from_std(std) {
                Ok(stream) => {
                    start(&mut handle, stream, peer);
                }
                Err(e) => warn!(stage, pod, error = %e, "a connection handed over could not be registered"),
            },
        }
    }
    debug!(stage, pod, "draining: no longer accepting");
    drop(listener);
    // Each loop drops its senders as it stops; the inbox ends when the last of them has.
    drop(to);
    while let Some((std, peer)) = inbox.recv().await {
        match TcpStream::from_std(std) {
            Ok(stream) => start(&mut handle, stream, peer),
            Err(e) => {
                warn!(stage, pod, error = %e, "a connection handed over could not be registered")
            }
        }
    }
}

/// Serves one connection on a task of its own, counted in this worker's load until it ends.
fn start<F, Fut>(handle: &mut F, stream: TcpStream, peer: SocketAddr)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let load = worker::Load::start();
    let fut = handle(stream, peer);
    tokio::spawn(async move {
        fut.await;
        drop(load);
    });
}

/// Sends the connection to another worker; gives it back when it cannot be sent.
fn hand(
    tx: &mpsc::UnboundedSender<Handed>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), TcpStream> {
    let std = match stream.into_std() {
        Ok(s) => s,
        // Deregistration failed: the socket is gone with the error; nothing to serve.
        Err(_) => return Ok(()),
    };
    match tx.send((std, peer)) {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendError((std, _))) => {
            TcpStream::from_std(std).map_err(|_| ()).map_or(Ok(()), Err)
        }
    }
}
