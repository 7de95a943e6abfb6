//! The benches' apps: the server in each server pod (1-byte echo per connection, discard-and-count,
//! or ping-pong), and the client every path is measured with. Only the address the client dials
//! differs per path.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit::harness::apps::ServerThread;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does with a connection; each server port serves one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads 1 byte, writes it back, then waits for the client's FIN.
    Echo,
    /// Reads until EOF, writes the byte count (u64 LE), then waits for the client's FIN.
    Sink,
    /// Echoes whatever arrives until EOF (the latency test's ping-pong, messages up to 4 KiB).
    PingPong,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Echo, Kind::Sink, Kind::PingPong];

    pub fn index(self) -> usize {
        match self {
            Kind::Echo => 0,
            Kind::Sink => 1,
            Kind::PingPong => 2,
        }
    }
}

const ONE_CONN_TIMEOUT: Duration = Duration::from_secs(10);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
const PING_TIMEOUT: Duration = Duration::from_secs(120);

/// The server, running on its own thread in a server pod's netns until dropped.
pub struct Server {
    _thread: ServerThread,
}

impl Server {
    /// Serves each port as its kind; a sink reads `chunk` bytes at a time.
    pub fn start(netns: &Path, ports: Vec<(SocketAddr, Kind)>, chunk: usize) -> Server {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let netns: PathBuf = netns.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("bench-server".into())
            .spawn(move || {
                ambit::harness::run_async_in_netns(&netns, move || async move {
                    let mut listeners = Vec::new();
                    for (addr, kind) in &ports {
                        match listen(*addr) {
                            Ok(l) => listeners.push((l, *kind)),
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("server bind {addr}: {e}")));
                                return;
                            }
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    let mut tasks = tokio::task::JoinSet::new();
                    for (l, kind) in listeners {
                        tasks.spawn(accept_loop(l, kind, chunk));
                    }
                    let _ = stop_rx.await;
                    tasks.abort_all();
                })
                .unwrap_or_else(|e| panic!("server netns: {e}"));
            })
            .unwrap_or_else(|e| panic!("spawn server thread: {e}"));
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(e) => panic!("server did not start: {e}"),
        }
        Server {
            _thread: ServerThread::new(stop_tx, thread),
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
}

async fn accept_loop(l: TcpListener, kind: Kind, chunk: usize) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = match kind {
                Kind::Echo => echo(stream).await,
                Kind::Sink => sink(stream, chunk).await,
                Kind::PingPong => ping_pong(stream).await,
            };
        });
    }
}

async fn echo(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    s.write_all(&b).await?;
    until_eof(&mut s).await
}

async fn sink(mut s: TcpStream, chunk: usize) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; chunk];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf).await? {
            0 => break,
            k => n += k as u64,
        }
    }
    s.write_all(&n.to_le_bytes()).await?;
    until_eof(&mut s).await
}

async fn ping_pong(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await? {
            0 => return Ok(()),
            k => s.write_all(&buf[..k]).await?,
        }
    }
}

/// The client always closes first, so TIME_WAIT stays on the connecting side of every hop, where
/// the kernel's port selection steps around it (see README: TIME_WAIT).
async fn until_eof(s: &mut TcpStream) -> io::Result<()> {
    let mut rest = [0u8; 64];
    while s.read(&mut rest).await? != 0 {}
    Ok(())
}

/// One connection-rate run as the client saw it.
#[derive(Debug, Default)]
pub struct ConnRun {
    pub elapsed: Duration,
    pub ok: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    /// Per successful connection: connect → 1 byte out → 1 byte back, in µs.
    pub latencies_us: Vec<u32>,
}

impl ConnRun {
    /// The failed connections of a run of `n`, if any.
    pub fn problem(&self, n: usize) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{} of {n} connections failed (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

/// `n` short connections to `dst`, `concurrency` in flight: connect, send 1 byte, read the echo,
/// close. Runs on the caller's (current-thread) runtime.
pub async fn conn_rate(dst: SocketAddr, n: usize, concurrency: usize) -> ConnRun {
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..concurrency.clamp(1, n.max(1)) {
        let next = next.clone();
        set.spawn(async move {
            let mut run = ConnRun::default();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                match one_conn(dst).await {
                    Ok(()) => {
                        run.ok += 1;
                        run.latencies_us.push(micros(t.elapsed()));
                    }
                    Err(e) => {
                        run.errors += 1;
                        run.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            run
        });
    }
    let mut total = ConnRun::default();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap_or_else(|e| panic!("client task: {e}"));
        total.ok += r.ok;
        total.errors += r.errors;
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
        total.latencies_us.extend(r.latencies_us);
    }
    total.elapsed = start.elapsed();
    total
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

async fn one_conn(dst: SocketAddr) -> io::Result<()> {
    let work = async {
        let mut s = TcpStream::connect(dst).await?;
        s.set_nodelay(true)?;
        s.write_all(&[0x5a]).await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        if b[0] != 0x5a {
            return Err(io::Error::other(format!("echo returned {:#x}", b[0])));
        }
        Ok(())
    };
    tokio::time::timeout(ONE_CONN_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::other(format!("{dst}: no echo within {ONE_CONN_TIMEOUT:?}")))?
}

/// Sends `bytes` one way to a sink port, `chunk` bytes per write, and waits for the server's
/// count; returns the time from connect to the count's arrival.
pub async fn throughput(dst: SocketAddr, bytes: u64, chunk: usize) -> io::Result<Duration> {
    let work = async {
        let buf = vec![0xa5u8; chunk];
        let start = Instant::now();
        let mut s = TcpStream::connect(dst).await?;
        s.set_nodelay(true)?;
        let mut left = bytes;
        while left > 0 {
            let k = left.min(chunk as u64) as usize;
            s.write_all(&buf[..k]).await?;
            left -= k as u64;
        }
        // Half-close: the server counts until EOF, then reports.
        s.shutdown().await?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count).await?;
        let elapsed = start.elapsed();
        let got = u64::from_le_bytes(count);
        if got != bytes {
            return Err(io::Error::other(format!(
                "server counted {got} bytes, sent {bytes}"
            )));
        }
        Ok(elapsed)
    };
    tokio::time::timeout(TRANSFER_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::other(format!("{dst}: transfer exceeded {TRANSFER_TIMEOUT:?}")))?
}

/// `bytes` one way to a sink port over `streams` connections at once (each `bytes / streams`, the
/// first also the remainder), `chunk` bytes per write; returns the time from the first connect to
/// the last server's count, as iperf3 `-P` reports its sum.
pub async fn throughput_streams(
    dst: SocketAddr,
    bytes: u64,
    streams: usize,
    chunk: usize,
) -> io::Result<Duration> {
    let streams = streams.max(1) as u64;
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..streams {
        let share = bytes / streams + if i == 0 { bytes % streams } else { 0 };
        set.spawn(throughput(dst, share, chunk));
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| io::Error::other(format!("stream task: {e}")))??;
    }
    Ok(start.elapsed())
}

/// One long-lived connection: `warmup` untimed round trips of 1 byte, then `n` timed ones.
/// Returns the timed round trips in ns (unsorted).
pub async fn ping_pong_latency(dst: SocketAddr, warmup: usize, n: usize) -> io::Result<Vec<u32>> {
    ping_pong_latency_sized(dst, warmup, n, 1).await
}

/// As [`ping_pong_latency`], with messages of `size` bytes (1..=4096): each round trip writes
/// `size` bytes and reads the `size` bytes echoed. The bytes never start like HTTP (a proxy that
/// sniffs the protocol relays them as bytes).
pub async fn ping_pong_latency_sized(
    dst: SocketAddr,
    warmup: usize,
    n: usize,
    size: usize,
) -> io::Result<Vec<u32>> {
    let size = size.clamp(1, 4096);
    let work = async {
        let mut s = TcpStream::connect(dst).await?;
        s.set_nodelay(true)?;
        let mut out = Vec::with_capacity(n);
        let mut msg = vec![0u8; size];
        let mut b = vec![0u8; size];
        for i in 0..warmup + n {
            let byte = (i % 251) as u8;
            msg.fill(byte);
            let t = Instant::now();
            s.write_all(&msg).await?;
            s.read_exact(&mut b).await?;
            let rtt = t.elapsed();
            if b != msg {
                return Err(io::Error::other(format!(
                    "ping {i}: sent {size} x {byte:#x}, got back other bytes (first {:#x})",
                    b[0]
                )));
            }
            if i >= warmup {
                out.push(rtt.as_nanos().min(u32::MAX as u128) as u32);
            }
        }
        s.shutdown().await?;
        until_eof(&mut s).await?;
        Ok(out)
    };
    tokio::time::timeout(PING_TIMEOUT, work)
        .await
        .map_err(|_| io::Error::other(format!("{dst}: ping-pong exceeded {PING_TIMEOUT:?}")))?
}
