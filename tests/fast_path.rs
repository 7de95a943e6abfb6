//! The sk_msg fast path under a consumer slower than the app (issue 14, acceptance 5).
//!
//! With `--fast-path=true` each write of the app on its captured loopback hop is handed straight
//! to the proxy socket's receive queue. When the proxy stops reading (its upstream is blocked
//! because the server app does not read), TCP would block the app after a socket buffer or two;
//! the fast path must bound what the app can push in the same way, and a long transfer must
//! arrive whole once the consumer reads again.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use support::{ambit_bin, SETTLE};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// One write of the app, and the unit of the expected stream.
const CHUNK: usize = 1 << 20;

/// The transfer's length: 512 MiB past the machine's TCP memory pressure threshold
/// (`net.ipv4.tcp_mem[1]`, 1.5 GB on our 24 GB machines). The old fast path queued everything the
/// app wrote at the proxy socket, and once the machine's TCP memory reached that threshold the
/// app's write either failed (ENOMEM) or waited for a wakeup that never came (measured: both, at
/// 1,576,009,728 bytes). That put the whole machine's TCP under memory pressure for a few seconds;
/// the bounded fast path never comes near it.
fn total() -> u64 {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").expect("read tcp_mem");
    let pressure: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("tcp_mem: {text:?}"));
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    (pressure * page + (512 << 20)).div_ceil(CHUNK as u64) * CHUNK as u64
}

/// No byte written and none read for this long: the transfer is stuck, not slow.
const STALLED: Duration = Duration::from_secs(30);
/// How long the writer must have made no progress before the sink takes it as blocked.
const BLOCKED: Duration = Duration::from_millis(500);

/// Progress of both ends, shared with the watchdog.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    /// Set by the sink once it has seen the writer blocked (or done) and started to read.
    reading: AtomicBool,
}

/// Chunk `i` of the stream: a fixed pseudo-random buffer with the chunk's index in its first
/// eight bytes, so a lost, repeated or reordered chunk is seen at once.
fn chunk(base: &[u8], i: u64) -> Vec<u8> {
    let mut c = base.to_vec();
    c[..8].copy_from_slice(&i.to_le_bytes());
    c
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The slow consumer, in the server pod: accepts one connection, reads nothing until the writer
/// has stopped making progress (it is blocked) or has written everything, then reads to EOF and
/// compares every byte with the expected stream. Returns the bytes that matched.
fn sink(
    pod: &Pod,
    addr: SocketAddr,
    total: u64,
    base: Arc<Vec<u8>>,
    progress: Arc<Progress>,
) -> u64 {
    use std::io::Read;
    let listener = pod.run(|| std::net::TcpListener::bind(addr).expect("bind the sink"));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        ready_tx.send(()).expect("ready");
        let (mut s, _) = listener.accept().expect("accept");
        // Hold off until the writer is blocked: everything it pushes now is buffered somewhere
        // on the path, which is what this test is about.
        let (mut last, mut since) = (progress.sent.load(Ordering::Acquire), Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = progress.sent.load(Ordering::Acquire);
            if now == total {
                break;
            }
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= BLOCKED {
                break;
            }
        }
        progress.reading.store(true, Ordering::Release);
        let (mut buf, mut at) = (vec![0u8; CHUNK], 0u64);
        let mut expected = chunk(&base, 0);
        loop {
            let n = s.read(&mut buf).expect("sink read");
            if n == 0 {
                return at;
            }
            let mut done = 0;
            while done < n {
                let off = (at % CHUNK as u64) as usize;
                let take = (CHUNK - off).min(n - done);
                assert!(
                    buf[done..done + take] == expected[off..off + take],
                    "byte {at}: the stream differs from what was sent (chunk {})",
                    at / CHUNK as u64
                );
                done += take;
                at += take as u64;
                if at % CHUNK as u64 == 0 {
                    expected = chunk(&base, at / CHUNK as u64);
                }
            }
            progress.received.store(at, Ordering::Release);
        }
    });
    ready_rx.recv().expect("sink thread");
    // Returned through a channel so the watchdog (the caller) never waits on a stuck thread.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(handle.join());
    });
    match rx.recv() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => std::panic::resume_unwind(e),
        Err(_) => 0,
    }
}

/// A client pod on n1 and a server pod on n2, each node's agent with the fast path on. Fields
/// drop in order: the agents stop before the world is torn down.
struct Mesh {
    a1: LocalAgent,
    a2: LocalAgent,
    client: Pod,
    server: Pod,
    world: World,
}

impl Mesh {
    fn start(name: &str) -> Mesh {
        support::raise_fd_limit();
        let world = World::new(name);
        let (n1, n2) = (world.node("n1"), world.node("n2"));
        let client = world.pod("client").node(&n1).namespace("mesh").spawn();
        let server = world.pod("server").node(&n2).namespace("mesh").spawn();
        let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
        let mk = |n| {
            let a = LocalAgent::new(&world, n, &ambit_bin()).arg("--fast-path=true");
            yaml.write(&a.config_dir());
            a
        };
        let (mut a1, mut a2) = (mk(&n1), mk(&n2));
        a1.start(&world);
        a2.start(&world);
        a1.wait_enrolled(&[&client]);
        a2.wait_enrolled(&[&server]);
        Mesh {
            a1,
            a2,
            client,
            server,
            world,
        }
    }
}

/// What the machine's TCP stack and the client pod's sockets look like, for a failure message.
fn diagnostics(client: &Pod, a1: &LocalAgent) -> String {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let ss = client
        .command("ss")
        .args(["-tnmi"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}"));
    let kernel = a1.status().map(|s| s["kernel"].to_string());
    format!(
        "sockstat:\n{sockstat}\nss in the client pod:\n{ss}\nagent n1 kernel counters: {kernel:?}"
    )
}

/// Acceptance 5: a transfer past the machine's TCP memory pressure threshold, from a client pod
/// through HBONE with the fast path on to a server app that reads nothing until the client is
/// blocked, arrives whole, with no stretch of 30 s without progress. On the old fast path the
/// proxy socket's sk_msg queue took everything the app wrote (no backpressure) until the
/// machine's TCP memory ran out; the app's write then failed with ENOMEM or was never woken
/// again (every queue empty, the app in `epoll_wait`).
#[test]
fn fast_path_long_transfer_to_a_slow_consumer_completes() {
    let Mesh {
        world: _world,
        client,
        server,
        a1,
        a2: _a2,
    } = Mesh::start("fp-slow");

    let dst = sa(server.ip4(), 8080);
    let total = total();
    let mut base = vec![0u8; CHUNK];
    support::pattern(11, &mut base);
    let base = Arc::new(base);
    let progress = Arc::new(Progress::default());

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let (server, base, progress, done_tx) = (
            server.clone(),
            base.clone(),
            progress.clone(),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let got = sink(&server, dst, total, base, progress);
            let _ = done_tx.send(("sink", Ok(got)));
        });
    }
    {
        let (client, base, progress) = (client.clone(), base.clone(), progress.clone());
        std::thread::spawn(move || {
            // tokio, as most apps: non-blocking writes woken by epoll.
            let r = client.run_async(|| async move {
                let mut s = TcpStream::connect(dst).await.map_err(|e| e.to_string())?;
                for i in 0..total / CHUNK as u64 {
                    s.write_all(&chunk(&base, i))
                        .await
                        .map_err(|e| format!("write at byte {}: {e}", i * CHUNK as u64))?;
                    progress.sent.fetch_add(CHUNK as u64, Ordering::AcqRel);
                }
                s.shutdown().await.map_err(|e| e.to_string())?;
                Ok::<u64, String>(total)
            });
            let _ = done_tx.send(("client", r));
        });
    }

    // The watchdog: waits for both ends, failing only when neither has moved for `STALLED`.
    let started = Instant::now();
    let (mut last, mut since) = ((0, 0), Instant::now());
    let mut results = Vec::new();
    while results.len() < 2 {
        match done_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => results.push(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("a transfer thread died: {e}"),
        }
        let now = (
            progress.sent.load(Ordering::Acquire),
            progress.received.load(Ordering::Acquire),
        );
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= STALLED {
            panic!(
                "stalled: no progress for {STALLED:?} after {:?}: sent {} of {total}, received {} \
                 (sink reading: {}), finished: {results:?}\n{}",
                started.elapsed(),
                now.0,
                now.1,
                progress.reading.load(Ordering::Acquire),
                diagnostics(&client, &a1)
            );
        }
    }
    eprintln!("transfer of {total} bytes took {:?}", started.elapsed());
    for (who, r) in &results {
        assert_eq!(r.as_ref(), Ok(&total), "{who}");
    }
    // The fast path was in use: the client's hop was redirected, not passed through loopback TCP.
    let s = a1.fresh_status();
    eprintln!("agent n1 kernel counters: {}", s["kernel"]);
    assert!(
        s["kernel"]["fast_path_redirects"].as_u64().unwrap_or(0) > 0,
        "the fast path carried the transfer: {}",
        s["kernel"]
    );
}

/// Reads exactly `n` bytes of the stream from chunk index `first` on and checks them.
fn read_stream(s: &mut std::net::TcpStream, base: &[u8], first: u64, n: u64, what: &str) {
    use std::io::Read;
    let mut buf = vec![0u8; CHUNK];
    for i in first..first + n / CHUNK as u64 {
        s.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: reading chunk {i}: {e}"));
        assert!(
            buf == chunk(base, i),
            "{what}: chunk {i} differs from what was sent"
        );
    }
}

/// The fast path in the proxy → app direction, with an app that reads nothing for a while: the
/// server sends more than the redirect limit, the proxy's writes to the app move to loopback TCP
/// past it, and the app then reads every byte in order (what went through TCP is not overtaken
/// by what was redirected before it), including a second burst sent after the switch.
#[test]
fn fast_path_moves_to_tcp_past_its_limit_without_reordering() {
    use std::io::{Read, Write};
    let Mesh {
        world: _world,
        client,
        server,
        a1,
        a2: _a2,
    } = Mesh::start("fp-limit");

    // First burst: the redirect limit and a MiB more; second: one MiB.
    const FIRST: u64 = ambit_common::fast_path_sent::LIMIT + (1 << 20);
    const SECOND: u64 = 1 << 20;
    let mut base = vec![0u8; CHUNK];
    support::pattern(13, &mut base);
    let base = Arc::new(base);
    let dst = sa(server.ip4(), 8080);
    let listener = server.run(|| std::net::TcpListener::bind(dst).expect("bind"));
    let server_base = base.clone();
    // Sends each burst when the client asks for it with one byte.
    let app = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut go = [0u8; 1];
        let mut next = 0u64;
        for burst in [FIRST, SECOND] {
            s.read_exact(&mut go).expect("the client's go");
            for _ in 0..burst / CHUNK as u64 {
                s.write_all(&chunk(&server_base, next))
                    .expect("server write");
                next += 1;
            }
        }
    });
    let before = a1.fresh_status()["kernel"].clone();
    let counter = |s: &serde_json::Value, name: &str| s["kernel"][name].as_u64().unwrap_or(0);
    let mut s = client.run(|| std::net::TcpStream::connect(dst).expect("connect"));
    s.set_read_timeout(Some(STALLED)).expect("timeout");
    s.write_all(b"g").expect("go");
    // The client reads nothing until the proxy's writes have moved to TCP.
    let to_tcp = |s: &serde_json::Value| {
        counter(s, "fast_path_to_tcp") > before["fast_path_to_tcp"].as_u64().unwrap_or(0)
    };
    a1.wait_for("the proxy's writes to move to TCP", SETTLE, to_tcp);
    read_stream(&mut s, &base, 0, FIRST, "first burst");
    s.write_all(b"g").expect("go");
    read_stream(&mut s, &base, FIRST / CHUNK as u64, SECOND, "second burst");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("EOF");
    assert!(rest.is_empty(), "{} bytes after the end", rest.len());
    app.join().expect("server app");
    let s = a1.fresh_status();
    assert!(
        counter(&s, "fast_path_redirects") > before["fast_path_redirects"].as_u64().unwrap_or(0),
        "the first messages were redirected: {}",
        s["kernel"]
    );
}
