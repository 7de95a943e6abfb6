//! The app of the server pods: one hyper server per pod (HTTP/1.1 and HTTP/2 prior knowledge on
//! one port) answering every request with 1 KiB. It counts requests by (pod, peer address, HTTP
//! version): which pod got a request shows the route's choice, and the peer and version show
//! which way it came (from the client itself, from the server-side agent, from HAProxy).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit::harness::Pod;
use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Bytes in every response body.
pub const BODY_BYTES: usize = 1024;
static BODY: [u8; BODY_BYTES] = [b'x'; BODY_BYTES];

/// Who sent a request to which server pod, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Seen {
    /// Index of the server pod, in the order given to [`Servers::start`].
    pub pod: usize,
    pub peer: IpAddr,
    pub h2: bool,
}

type Counts = Arc<Mutex<HashMap<Seen, Arc<AtomicU64>>>>;

/// The servers of all server pods, on one runtime of this process (2 workers, so a server is
/// never the one serial step of a path); each listener is made in its pod's netns, so its
/// connections are the pod's own.
pub struct Servers {
    rt: tokio::runtime::Runtime,
    counts: Counts,
}

impl Servers {
    /// Serves `0.0.0.0:port` in each of `pods`, for each of `ports`.
    pub fn start(pods: &[&Pod], ports: &[u16]) -> Servers {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("l7-server")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("server runtime: {e}"));
        let counts = Counts::default();
        for (index, pod) in pods.iter().enumerate() {
            for &port in ports {
                let listener = pod.run(move || {
                    let addr = SocketAddr::from(([0, 0, 0, 0], port));
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    s.set_reuse_address(true)?;
                    s.set_nonblocking(true)?;
                    s.bind(&addr.into())?;
                    s.listen(4096)?;
                    Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
                });
                let listener = listener
                    .unwrap_or_else(|e| panic!("server in {}: bind :{port}: {e}", pod.name()));
                let counts = counts.clone();
                let _enter = rt.enter();
                let listener = tokio::net::TcpListener::from_std(listener)
                    .unwrap_or_else(|e| panic!("server listener: {e}"));
                rt.spawn(accept_loop(listener, index, counts));
            }
        }
        Servers { rt, counts }
    }

    /// Requests served so far, by who sent them where.
    pub fn counts(&self) -> HashMap<Seen, u64> {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
            .collect()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // Connections still open (HAProxy's pooled ones) must not hold the bench's exit.
        let rt = std::mem::replace(
            &mut self.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}")),
        );
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

fn counter(counts: &Counts, seen: Seen) -> Arc<AtomicU64> {
    let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
    counts.entry(seen).or_default().clone()
}

async fn accept_loop(listener: tokio::net::TcpListener, pod: usize, counts: Counts) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        // One lookup per connection, not per request.
        let seen = |h2| Seen {
            pod,
            peer: peer.ip(),
            h2,
        };
        let h1 = counter(&counts, seen(false));
        let h2 = counter(&counts, seen(true));
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let c = if req.version() == Version::HTTP_2 {
                    &h2
                } else {
                    &h1
                };
                c.fetch_add(1, Ordering::Relaxed);
                async move {
                    // A request body (the spans a tracing agent posts to the collector pod) is
                    // read to its end, as a collector would, so the connection stays reusable.
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&BODY))))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
