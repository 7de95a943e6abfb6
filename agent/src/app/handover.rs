//! Upgrades that drop nothing: the running agent serves a Unix socket (`--handover-socket`); a new
//! agent process starting on the same node connects to it, receives every listening socket the
//! old one serves (each pod's 15001, 15006 and 15008, and the agent's own admin ports) with
//! SCM_RIGHTS, serves them, and once it has a complete view of the cluster tells the old one it
//! took over. The old one then stops accepting, sends GOAWAY and drains (`app::run`). Between the
//! two, both processes accept on the same sockets; nothing is refused, because a socket is never
//! closed while it has an owner. If the new process dies first, the old one never stops.
//!
//! ztunnel's restarts work alike in spirit (the new ztunnel gets every pod's netns from istio-cni
//! over a Unix socket and binds its listeners with SO_REUSEPORT while the old one drains). Here the
//! same sockets move instead: with SO_REUSEPORT the old process's listener would be a separate
//! socket, and closing it resets the connections in its accept queue unless the node enables
//! `net.ipv4.tcp_migrate_req`; the capture's sk_lookup map would also have to be repointed.
//!
//! The conversation (SOCK_SEQPACKET, so each message arrives whole with its descriptors; JSON):
//! new → old `hello` (version, node, pin dir: a second agent of another node or capture must not
//! stop this one), old → new `listeners` batches (descriptors in the batch's order, at most
//! [`MAX_FDS`] each, the last one marked), new → old `took_over`. Only a peer with our own uid
//! is answered, and the socket file is 0600.
//!
//! Limits: an agent without this socket (older than the handover) cannot hand over, so the first
//! upgrade to it still refuses new connections until the old agent has exited. Established
//! connections end with the old agent's drain: L4 relays and HBONE streams finish (or are closed
//! at the grace period). HTTP connections served at L7 end with GOAWAY (HTTP/2) or after their
//! response in flight (an app's HTTP/1.1). An HTTP/1.1 connection from an agent's upstream pool
//! (another node's, inside an HBONE stream, or this one's) is not closed while idle, which would
//! race the request that agent sends at that instant: that agent lets it go on the HBONE GOAWAY
//! (`proxy::http::client`), and requests still coming on it are served with `connection: close`
//! (`proxy::http::inbound`); an app's connection accepted just before the drain gets its first
//! request served (`proxy::http::outbound`). What remains: an app's own idle HTTP/1.1 keep-alive
//! connection is closed at the drain's start as by any server that drains, so a request the app
//! sends at that instant fails (clients retry an idempotent request that fails on a reused
//! connection); an agent that does not act on GOAWAY (older than this change)
//! keeps such a connection, and with it the old agent, until the grace period; and a request that
//! fails on a reused upstream connection after it was sent is not retried unless the route's
//! retry policy says so.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::node::adopt::{Described, Handed, Offer};

/// The message format's version; a peer speaking another is refused (and then starts afresh).
pub const VERSION: u32 = 1;
/// Descriptors per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 128;
/// Largest message: a batch of [`MAX_FDS`] descriptions is far smaller.
const MAX_MESSAGE: usize = 256 * 1024;
/// How long either side waits for the other's next message before giving up, except the old
/// process waiting for `took_over`, which comes when the new one has a complete view.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("handover: {what}: {source}")]
    Exchange {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("handover: invalid message: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("handover: the peer closed the connection")]
    Closed,
    #[error("handover: message truncated (over {MAX_MESSAGE} bytes or {MAX_FDS} descriptors)")]
    Truncated,
    #[error("handover refused: {reason}")]
    Refused { reason: String },
    #[error("handover: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("handover: {fds} descriptors came with {listeners} listeners")]
    Mismatch { fds: usize, listeners: usize },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
        node: String,
        pin_dir: PathBuf,
    },
    Listeners {
        version: u32,
        listeners: Vec<Described>,
        last: bool,
    },
    Refused {
        reason: String,
    },
    TookOver,
}

impl Message {
    fn name(&self) -> String {
        match self {
            Message::Hello { .. } => "hello".into(),
            Message::Listeners { .. } => "listeners".into(),
            Message::Refused { reason } => format!("refused ({reason})"),
            Message::TookOver => "took_over".into(),
        }
    }
}

/// Who this agent is, as both sides check it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub path: PathBuf,
    pub node: String,
    pub pin_dir: PathBuf,
}

/// Listeners received from a predecessor, and the connection to confirm on.
#[derive(Debug)]
pub struct Received {
    pub listeners: Vec<Handed>,
    pub confirm: Confirmation,
}

/// The open connection to the predecessor, until we confirm.
#[derive(Debug)]
pub struct Confirmation(OwnedFd);

impl Confirmation {
    /// Tells the predecessor it may stop accepting (our listeners are served).
    pub fn send(self) -> Result<(), HandoverError> {
        send(self.0.as_fd(), &Message::TookOver, &[])
    }
}

/// Takes the listeners of the agent serving `id.path`. None when no agent serves it (the first
/// start, or after a crash: a stale socket file refuses connections).
pub fn take(id: &Identity) -> Result<Option<Received>, HandoverError> {
    let conn = seqpacket().map_err(|source| HandoverError::Socket {
        path: id.path.clone(),
        source,
    })?;
    let addr = SocketAddrUnix::new(&id.path).map_err(|e| HandoverError::Socket {
        path: id.path.clone(),
        source: e.into(),
    })?;
    match rustix::net::connect(&conn, &addr) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::CONNREFUSED => {
            return Ok(None)
        }
        Err(e) => {
            return Err(HandoverError::Socket {
                path: id.path.clone(),
                source: e.into(),
            })
        }
    }
    timeout(&conn, Some(EXCHANGE_TIMEOUT))?;
    let hello = Message::Hello {
        version: VERSION,
        node: id.node.clone(),
        pin_dir: id.pin_dir.clone(),
    };
    send(conn.as_fd(), &hello, &[])?;
    let mut listeners = Vec::new();
    loop {
        let (msg, fds) = recv(conn.as_fd())?;
        match msg {
            Message::Listeners {
                version: VERSION,
                listeners: described,
                last,
            } => {
                if described.len() != fds.len() {
                    return Err(HandoverError::Mismatch {
                        fds: fds.len(),
                        listeners: described.len(),
                    });
                }
                listeners.extend(
                    described
                        .into_iter()
                        .zip(fds)
                        .map(|(what, fd)| Handed { what, fd }),
                );
                if last {
                    break;
                }
            }
            Message::Refused { reason } => return Err(HandoverError::Refused { reason }),
            other => {
                return Err(HandoverError::Unexpected {
                    expected: "listeners",
                    got: other.name(),
                })
            }
        }
    }
    Ok(Some(Received {
        listeners,
        confirm: Confirmation(conn),
    }))
}

/// This agent's side for its successor: serves the handover socket, hands over what `offer`
/// holds, and notifies `took_over` when a successor has taken over.
#[derive(Debug)]
pub struct Successor {
    id: Identity,
    offer: Offer,
    took_over: Arc<Notify>,
    handed_over: AtomicBool,
    /// Set while a successor holds our listeners and has not confirmed: this agent then enrols
    /// and unenrols no pod, so the two agents' sets of listeners stay the same.
    handing: Arc<AtomicBool>,
    /// The inode of the socket file we bound: removed at exit only if it is still ours.
    bound: Mutex<Option<u64>>,
}

impl Successor {
    pub fn new(id: Identity, offer: Offer) -> Arc<Self> {
        Arc::new(Successor {
            id,
            offer,
            took_over: Arc::new(Notify::new()),
            handed_over: AtomicBool::new(false),
            handing: Arc::new(AtomicBool::new(false)),
            bound: Mutex::new(None),
        })
    }

    /// Notified (once) when a successor has taken over.
    pub fn took_over(&self) -> Arc<Notify> {
        self.took_over.clone()
    }

    /// True while a successor is taking over (see the field).
    pub fn handing(&self) -> Arc<AtomicBool> {
        self.handing.clone()
    }

    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Binds the socket (replacing a file left there: its agent has handed over, or is gone)
    /// and answers successors on a thread of its own.
    pub fn listen(self: &Arc<Self>) -> Result<(), HandoverError> {
        let path = &self.id.path;
        let err = |source: io::Error| HandoverError::Socket {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = seqpacket().map_err(err)?;
        let addr = SocketAddrUnix::new(path).map_err(|e| err(e.into()))?;
        rustix::net::bind(&listener, &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        rustix::net::listen(&listener, 4).map_err(|e| err(e.into()))?;
        let ino = std::fs::metadata(path).map_err(err)?.ino();
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(ino);
        let me = self.clone();
        std::thread::Builder::new()
            .name("ambit-handover".into())
            .spawn(move || me.serve(listener))
            .map_err(err)?;
        info!(socket = %path.display(), "a successor agent can take over here");
        Ok(())
    }

    /// At exit without a successor: removes the socket file if it is still the one we bound.
    pub fn remove_socket(&self) {
        let bound = *self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        let path = &self.id.path;
        if bound.is_some() && std::fs::metadata(path).ok().map(|m| m.ino()) == bound {
            let _ = std::fs::remove_file(path);
        }
    }

    fn serve(&self, listener: OwnedFd) {
        loop {
            let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(error = %e, "handover socket: accept failed; no successor can take over");
                    return;
                }
            };
            match self.hand_over(conn.as_fd()) {
                Ok(()) => {
                    // Pods stay paused: they are the successor's from here on, and this agent's
                    // control loop may tick once more before it sees the notification.
                    self.handed_over.store(true, Ordering::Release);
                    self.took_over.notify_one();
                    // The socket file is the successor's now; ours closes here.
                    return;
                }
                Err(e) => {
                    self.handing.store(false, Ordering::Release);
                    self.offer.thaw();
                    warn!(error = %e, "a successor did not take over; serving on");
                }
            }
        }
    }

    fn hand_over(&self, conn: BorrowedFd<'_>) -> Result<(), HandoverError> {
        let peer =
            rustix::net::sockopt::socket_peercred(conn).map_err(|e| HandoverError::Exchange {
                what: "peer credentials",
                source: e.into(),
            })?;
        let uid = nix::unistd::geteuid().as_raw();
        if peer.uid.as_raw() != uid {
            let reason = format!("uid {} is not the agent's ({uid})", peer.uid.as_raw());
            let _ = send(
                conn,
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(HandoverError::Refused { reason });
        }
        timeout(&conn, Some(EXCHANGE_TIMEOUT))?;
        let (hello, _) = recv(conn)?;
        let refusal = match &hello {
            Message::Hello { version, .. } if *version != VERSION => {
                Some(format!("version {version}; this agent speaks {VERSION}"))
            }
            Message::Hello { node, .. } if *node != self.id.node => Some(format!(
                "node {node:?}; this agent serves {:?}",
                self.id.node
            )),
            Message::Hello { pin_dir, .. } if *pin_dir != self.id.pin_dir => Some(format!(
                "pin dir {}; this agent's is {}",
                pin_dir.display(),
                self.id.pin_dir.display()
            )),
            Message::Hello { .. } => None,
            other => {
                return Err(HandoverError::Unexpected {
                    expected: "hello",
                    got: other.name(),
                })
            }
        };
        if let Some(reason) = refusal {
            let _ = send(
                conn,
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(HandoverError::Refused { reason });
        }
        // From the snapshot on, pods stay as they are here until the successor confirms or goes.
        self.handing.store(true, Ordering::Release);
        let offered = self
            .offer
            .snapshot()
            .map_err(|source| HandoverError::Exchange {
                what: "duplicating the listeners",
                source,
            })?;
        let total = offered.len();
        let mut batches = offered.chunks(MAX_FDS).peekable();
        if batches.peek().is_none() {
            send(conn, &listeners_message(&[], true), &[])?;
        }
        while let Some(batch) = batches.next() {
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|h| h.fd.as_fd()).collect();
            send(
                conn,
                &listeners_message(batch, batches.peek().is_none()),
                &fds,
            )?;
        }
        info!(
            listeners = total,
            "listeners handed to a successor; serving until it takes over"
        );
        // The successor confirms once it has a complete view (in a cluster, after its watches have
        // listed everything): no time limit; if it dies instead, the connection ends.
        timeout(&conn, None)?;
        match recv(conn)? {
            (Message::TookOver, _) => {
                info!("the successor took over: draining");
                Ok(())
            }
            (other, _) => Err(HandoverError::Unexpected {
                expected: "took_over",
                got: other.name(),
            }),
        }
    }
}

fn listeners_message(batch: &[Handed], last: bool) -> Message {
    Message::Listeners {
        version: VERSION,
        listeners: batch.iter().map(|h| h.what.clone()).collect(),
        last,
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn timeout(conn: &impl AsFd, t: Option<Duration>) -> Result<(), HandoverError> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    for which in [Timeout::Recv, Timeout::Send] {
        set_socket_timeout(conn, which, t).map_err(|e| HandoverError::Exchange {
            what: "setting a timeout",
            source: e.into(),
        })?;
    }
    Ok(())
}

fn send(conn: BorrowedFd<'_>, msg: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(msg).map_err(HandoverError::Decode)?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoverError::Truncated);
    }
    loop {
        match rustix::net::sendmsg(
            conn,
            &[IoSlice::new(&body)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(HandoverError::Exchange {
                    what: "sending",
                    source: e.into(),
                })
            }
        }
    }
}

fn recv(conn: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            conn,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(HandoverError::Exchange {
                    what: "receiving",
                    source: e.into(),
                })
            }
        }
    };
    // Descriptors first: taken into OwnedFds, they are closed on every error below.
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    if got.bytes == 0 {
        return Err(HandoverError::Closed);
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
    {
        return Err(HandoverError::Truncated);
    }
    let msg = serde_json::from_slice(&buf[..got.bytes]).map_err(HandoverError::Decode)?;
    debug!(message = %Message::name(&msg), fds = fds.len(), "handover message");
    Ok((msg, fds))
}

/// Where the socket goes by default (a hostPath in a cluster, so successive agent pods meet).
pub fn default_path() -> &'static Path {
    Path::new("/var/run/ambit/handover.sock")
}

#[cfg(test)]
mod tests;
