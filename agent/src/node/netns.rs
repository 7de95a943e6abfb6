//! A thread parked in one pod's network namespace that creates sockets there (Istio in-pod style).
//! A socket's netns is fixed at creation, so every listener and upstream socket the proxy owns for a
//! pod is made here and then handed to tokio. The thread never touches tokio itself.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};

use socket2::{Domain, Protocol, Socket, Type};

use super::NodeError;

type Job = Box<dyn FnOnce() + Send>;

/// Runs closures inside one network namespace.
#[derive(Debug)]
pub struct NetnsWorker {
    path: PathBuf,
    netns: File,
    jobs: mpsc::Sender<Job>,
    /// Whether the pod's netns brings replies to transparent sockets back
    /// (`transparent::Held::present`); unset where it was not set up.
    transparent: OnceLock<Arc<AtomicBool>>,
    reserve: Arc<Reserve>,
}

/// Bare TCP sockets made ahead in the netns, so a connection's upstream socket is taken without a
/// round trip to the netns thread (a futex wake and two context switches per connection, most of
/// the per-connection cost that was not the kernel's own on the server side). Only `socket(2)`
/// depends on the calling thread's netns; options and bind apply to the socket's own netns from
/// any thread. Filled after the first use, so a pod that never dials costs nothing.
#[derive(Debug, Default)]
struct Reserve {
    v4: Mutex<Vec<Socket>>,
    v6: Mutex<Vec<Socket>>,
    refilling: [AtomicBool; 2],
}

/// Sockets kept ready per address family once a pod dials; refilled when half are used.
const RESERVE: usize = 16;

impl Reserve {
    fn slot(&self, domain: Domain) -> (&Mutex<Vec<Socket>>, &AtomicBool) {
        if domain == Domain::IPV6 {
            (&self.v6, &self.refilling[1])
        } else {
            (&self.v4, &self.refilling[0])
        }
    }

    /// A ready socket and whether the reserve wants refilling.
    fn take(&self, domain: Domain) -> (Option<Socket>, bool) {
        let (sockets, _) = self.slot(domain);
        let mut sockets = sockets.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = sockets.pop();
        (taken, sockets.len() <= RESERVE / 2)
    }

    /// Runs on the netns thread: tops the reserve up to [`RESERVE`], again while sockets are
    /// taken meanwhile, and once more if a take that found it low came after the last top-up
    /// (it saw a fill under way and queued none).
    fn fill(&self, domain: Domain) {
        let (sockets, refilling) = self.slot(domain);
        let level = || sockets.lock().unwrap_or_else(PoisonError::into_inner).len();
        loop {
            loop {
                let missing = RESERVE.saturating_sub(level());
                if missing == 0 {
                    break;
                }
                let made: Vec<Socket> = (0..missing).map_while(|_| bare(domain).ok()).collect();
                if made.is_empty() {
                    // Out of descriptors or memory: the callers make their own until it passes.
                    refilling.store(false, Ordering::Release);
                    return;
                }
                sockets
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(made);
            }
            refilling.store(false, Ordering::Release);
            if level() > RESERVE / 2 || refilling.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

/// A non-blocking TCP socket in the calling thread's netns.
fn bare(domain: Domain) -> io::Result<Socket> {
    Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )
}

impl NetnsWorker {
    pub fn spawn(path: &Path) -> Result<Self, NodeError> {
        let netns_err = |source| NodeError::Netns {
            path: path.to_path_buf(),
            source,
        };
        let netns = File::open(path).map_err(netns_err)?;
        let target_ino = netns.metadata().map_err(netns_err)?.ino();
        let for_thread = netns.try_clone().map_err(netns_err)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let name = format!(
            "netns-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("pod")
        );
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let entered = nix::sched::setns(&for_thread, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        // Check we really are in the pod's netns before creating any socket there.
                        let now = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
                        if now == target_ino {
                            Ok(())
                        } else {
                            Err(io::Error::other(
                                "setns did not move the thread into the pod netns",
                            ))
                        }
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(netns_err)?;
        ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread died")))
            .map_err(netns_err)?;
        Ok(NetnsWorker {
            path: path.to_path_buf(),
            netns,
            jobs,
            transparent: OnceLock::new(),
            reserve: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn netns_file(&self) -> &File {
        &self.netns
    }

    /// Runs `f` in the netns and waits for it (control path).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker stopped"))?;
        rx.recv()
            .map_err(|_| io::Error::other("netns worker stopped"))
    }

    /// Runs `f` in the netns without blocking the runtime (data path).
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("netns worker stopped"))
    }

    /// A bare TCP socket of `domain` in this netns: from the reserve, else made on the netns
    /// thread (and the reserve refilled in the background either way).
    async fn bare_socket(&self, domain: Domain) -> io::Result<Socket> {
        let (taken, low) = self.reserve.take(domain);
        if low && !self.reserve.slot(domain).1.swap(true, Ordering::AcqRel) {
            let reserve = self.reserve.clone();
            let queued = self.jobs.send(Box::new(move || reserve.fill(domain)));
            if queued.is_err() {
                self.reserve.slot(domain).1.store(false, Ordering::Release);
            }
        }
        match taken {
            Some(s) => Ok(s),
            None => self.run_async(move || bare(domain)).await?,
        }
    }

    /// An unconnected, non-blocking TCP socket in this netns, marked so capture skips it.
    pub async fn upstream_socket(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let s = self.bare_socket(Domain::for_address(dst)).await?;
        let std_stream = new_upstream(s, bind)?;
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }

    /// Sockets to the app may carry the client's address while `present` holds (set once the
    /// pod's routing is in place, cleared before it is removed).
    pub fn set_transparent(&self, present: Arc<AtomicBool>) {
        let _ = self.transparent.set(present);
    }
}

/// The proxy makes its sockets in a pod through this.
impl crate::proxy::SocketFactory for NetnsWorker {
    fn upstream(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = io::Result<tokio::net::TcpSocket>> + Send + '_>,
    > {
        Box::pin(self.upstream_socket(dst, bind))
    }

    fn app_upstream(
        &self,
        dst: SocketAddr,
        client: SocketAddr,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = io::Result<Option<tokio::net::TcpSocket>>> + Send + '_,
        >,
    > {
        Box::pin(async move {
            let present = self.transparent.get();
            if !present.is_some_and(|p| p.load(Ordering::Acquire)) {
                return Ok(None);
            }
            let domain = Domain::for_address(dst);
            let first = self.bare_socket(domain).await?;
            let std_stream = if client.port() == 0 {
                new_app_upstream(first, client)?
            } else {
                // Rare (plaintext inbound whose picked port clashes): each try takes a socket.
                let mut tries = vec![first];
                for _ in 1..APP_PORT_TRIES {
                    tries.push(self.bare_socket(domain).await?);
                }
                new_app_upstream_avoiding(tries, client)?
            };
            Ok(Some(tokio::net::TcpSocket::from_std_stream(std_stream)))
        })
    }
}

/// `s` (a bare socket of the pod's netns) made ready to dial out of the pod.
fn new_upstream(s: Socket, bind: Option<IpAddr>) -> io::Result<std::net::TcpStream> {
    s.set_mark(ambit_common::PROXY_MARK)?;
    s.set_nodelay(true)?;
    if let Some(ip) = bind {
        // Pick the port at connect time so the 4-tuple, not the bare port, has to be unique.
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(s.into())
}

/// A socket to the pod's app bound to the client's address, which is not the pod's: it may bind
/// it (IP_TRANSPARENT; the SOL_IP option also serves IPv6 sockets, the kernel keeps one flag for
/// both) and carries the mark the pod's rule routes back over lo.
///
/// A non-zero `client` port is a connection to the same app port from that very address and
/// port already in this netns (plaintext inbound: the accepted socket the proxy relays). A port
/// picked at connect time could be that one, and the SYN would then match the accepted socket;
/// so the port is picked at bind and a clash is picked again.
fn new_app_upstream(s: Socket, client: SocketAddr) -> io::Result<std::net::TcpStream> {
    let s = transparent_to_app(s)?;
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
        .map_err(io::Error::from)?;
    s.bind(&SocketAddr::new(client.ip(), 0).into())?;
    Ok(s.into())
}

/// Sockets tried for a `client` with a port (see [`new_app_upstream`]).
const APP_PORT_TRIES: usize = 4;

/// As [`new_app_upstream`], for a `client` whose own port must not be picked: one of `tries`
/// (bare sockets) bound to a port other than it.
fn new_app_upstream_avoiding(
    tries: Vec<Socket>,
    client: SocketAddr,
) -> io::Result<std::net::TcpStream> {
    for s in tries {
        let s = transparent_to_app(s)?;
        // As connect's own choice would, ports may be shared while the 4-tuples differ.
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(client.ip(), 0).into())?;
        let port = s.local_addr()?.as_socket().map_or(0, |a| a.port());
        if port != client.port() {
            return Ok(s.into());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no source port for {client} other than its own"),
    ))
}

/// `s` (a bare socket of the pod's netns) allowed to bind the client's address and routed back.
fn transparent_to_app(s: Socket) -> io::Result<Socket> {
    s.set_ip_transparent(true)?;
    s.set_mark(ambit_common::TRANSPARENT_MARK)?;
    // Its packets go over lo anyway (the mark's route); bound there, its TIME_WAITs count as
    // loopback ones, which the default tcp_tw_reuse=2 lets a new connect reuse: short
    // connections from one client to one app port are then not capped by ~28k TIME_WAITs on
    // the proxy's side.
    s.bind_device(Some(b"lo"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A listening socket in the current netns (call on the worker).
pub fn listen(addr: SocketAddr, v6only: bool) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(v6only)?;
    }
    s.set_reuse_address(true)?;
    s.set_mark(ambit_common::PROXY_MARK)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream sockets keep coming past the reserve's size, and a used reserve is refilled to
    /// its size in the background (this test's own netns stands in for a pod's; needs root).
    #[tokio::test]
    async fn upstream_sockets_come_from_a_reserve_that_refills() {
        let worker = NetnsWorker::spawn(Path::new("/proc/self/ns/net")).expect("worker");
        let level = |w: &NetnsWorker| {
            w.reserve
                .v4
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
        };
        assert_eq!(level(&worker), 0, "nothing made before the first use");
        let dst: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let mut held = Vec::new();
        for _ in 0..3 * RESERVE {
            held.push(worker.upstream_socket(dst, None).await.expect("socket"));
        }
        assert!(held.iter().all(|s| s.nodelay().expect("nodelay")));
        // Down to the refill mark (it may have been refilled above it meanwhile), then back up.
        while level(&worker) > RESERVE / 2 {
            held.push(worker.upstream_socket(dst, None).await.expect("socket"));
        }
        while level(&worker) < RESERVE {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(level(&worker), RESERVE, "refilled to its size, no more");
        assert_eq!(
            worker.reserve.v6.lock().expect("lock").len(),
            0,
            "IPv6 unused"
        );
    }
}
