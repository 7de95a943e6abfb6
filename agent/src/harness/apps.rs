//! Small apps that run inside pods for tests and the demo: a server that reports what it saw
//! (peer, local address, bytes, reset) and a client that reads it back.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{run_async_in_netns, Pod};

/// How a server treats each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Writes "<peer> <local>\n", then echoes everything until EOF, then closes.
    WhoamiEcho,
    /// Writes "hello\n" then resets the connection.
    HelloThenReset,
    /// Writes "bye\n", half-closes, then counts what it still receives.
    GreetThenHalfClose,
}

/// What a server saw on one connection.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub received: u64,
    /// Reading ended with an error (a reset) rather than EOF.
    pub reset: bool,
    /// The accepted socket's SO_MARK: `TRANSPARENT_MARK` when ambit's inbound proxy dialled it
    /// (the socket takes its SYN's mark), 0 for a connection straight from its client.
    pub mark: u32,
}

/// A server's thread: dropping it sends the stop signal and joins the thread.
pub struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// `thread` must end soon after `stop` fires (or is dropped).
    pub fn new(
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    ) -> ServerThread {
        ServerThread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server running in a pod until dropped.
pub struct Server {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _thread: ServerThread,
}

impl Server {
    pub fn start(pod: &Pod, addrs: &[SocketAddr], mode: Mode) -> Server {
        Self::start_in(pod.netns_path(), addrs, mode)
    }

    pub fn start_in(netns: &Path, addrs: &[SocketAddr], mode: Mode) -> Server {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (netns, addrs, seen2) = (netns.to_path_buf(), addrs.to_vec(), seen.clone());
        let thread = std::thread::spawn(move || {
            run_async_in_netns(&netns, move || async move {
                let mut listeners = Vec::new();
                for a in &addrs {
                    let s = socket2::Socket::new(
                        socket2::Domain::for_address(*a),
                        socket2::Type::STREAM,
                        None,
                    )
                    .expect("socket");
                    if a.is_ipv6() {
                        s.set_only_v6(true).expect("v6only");
                    }
                    s.set_reuse_address(true).expect("reuseaddr");
                    s.set_nonblocking(true).expect("nonblocking");
                    s.bind(&(*a).into())
                        .unwrap_or_else(|e| panic!("bind {a}: {e}"));
                    s.listen(4096).expect("listen");
                    listeners.push(TcpListener::from_std(s.into()).expect("tokio listener"));
                }
                ready_tx.send(()).expect("ready");
                let mut tasks = tokio::task::JoinSet::new();
                for l in listeners {
                    let seen = seen2.clone();
                    tasks.spawn(async move {
                        loop {
                            let Ok((stream, peer)) = l.accept().await else {
                                continue;
                            };
                            let seen = seen.clone();
                            tokio::spawn(async move { serve_one(stream, peer, mode, seen).await });
                        }
                    });
                }
                let _ = stop_rx.await;
                tasks.abort_all();
            })
            .expect("server netns");
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        Server {
            seen,
            _thread: ServerThread::new(stop_tx, thread),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }
}

async fn serve_one(
    mut stream: TcpStream,
    peer: SocketAddr,
    mode: Mode,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let local = stream.local_addr().expect("local addr");
    let mark = socket2::SockRef::from(&stream).mark().unwrap_or(0);
    let mut received = 0u64;
    let mut reset = false;
    match mode {
        Mode::WhoamiEcho => {
            if stream
                .write_all(format!("{peer} {local}\n").as_bytes())
                .await
                .is_err()
            {
                reset = true;
            } else {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            received += n as u64;
                            if stream.write_all(&buf[..n]).await.is_err() {
                                reset = true;
                                break;
                            }
                        }
                        Err(_) => {
                            reset = true;
                            break;
                        }
                    }
                }
                let _ = stream.shutdown().await;
            }
        }
        Mode::HelloThenReset => {
            let _ = stream.write_all(b"hello\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        Mode::GreetThenHalfClose => {
            let _ = stream.write_all(b"bye\n").await;
            let _ = stream.shutdown().await;
            let mut buf = vec![0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => received += n as u64,
                    Err(_) => {
                        reset = true;
                        break;
                    }
                }
            }
        }
    }
    seen.lock().expect("lock").push(Seen {
        peer,
        local,
        received,
        reset,
        mark,
    });
}

/// Connects, reads the whoami line, and returns (server-seen peer, server-seen local, our
/// getpeername).
pub async fn whoami(dst: SocketAddr) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst))
        .await
        .map_err(|_| std::io::Error::other(format!("connect {dst} timed out")))??;
    let our_peer = stream.peer_addr()?;
    let mut line = String::new();
    let mut r = BufReader::new(stream);
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other(format!("reading from {dst} timed out")))??;
    let mut parts = line.split_whitespace();
    let parse = |p: Option<&str>| -> std::io::Result<SocketAddr> {
        p.and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad whoami line {line:?}")))
    };
    let (peer, local) = (parse(parts.next())?, parse(parts.next())?);
    Ok((peer, local, our_peer))
}
