//! A thread parked in one pod's network namespace that creates sockets there (Istio in-pod style).
//! A socket's netns is fixed at creation, so every listener and upstream socket the proxy owns for a
//! pod is made here and then handed to tokio. The thread never touches tokio itself.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

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

    /// An unconnected, non-blocking TCP socket in this netns, marked so capture skips it.
    pub async fn upstream_socket(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let std_stream = self.run_async(move || new_upstream(dst, bind)).await??;
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
            let std_stream = self
                .run_async(move || new_app_upstream(dst, client))
                .await??;
            Ok(Some(tokio::net::TcpSocket::from_std_stream(std_stream)))
        })
    }
}

fn new_upstream(dst: SocketAddr, bind: Option<IpAddr>) -> io::Result<std::net::TcpStream> {
    let s = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
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
fn new_app_upstream(dst: SocketAddr, client: SocketAddr) -> io::Result<std::net::TcpStream> {
    let make = || -> io::Result<Socket> {
        let s = Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        s.set_ip_transparent(true)?;
        s.set_mark(ambit_common::TRANSPARENT_MARK)?;
        // Its packets go over lo anyway (the mark's route); bound there, its TIME_WAITs count as
        // loopback ones, which the default tcp_tw_reuse=2 lets a new connect reuse: short
        // connections from one client to one app port are then not capped by ~28k TIME_WAITs on
        // the proxy's side.
        s.bind_device(Some(b"lo"))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    if client.port() == 0 {
        let s = make()?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
        s.bind(&SocketAddr::new(client.ip(), 0).into())?;
        return Ok(s.into());
    }
    for _ in 0..4 {
        let s = make()?;
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
