//! HBONE between nodes, end to end: two agents (two nodes), real eBPF capture, real mTLS.
//! Each test names the acceptance item it checks.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Node, Pod, World};
use ambit::identity::{CertConfig, Identity, LocalCa, SecretManager};
use support::{
    ambit_bin, echo_transfer, hbone_client, in_pod, wait_until, whoami, Fnv, Mode, Server, SETTLE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Agents for n1 and n2 reading the same cluster, started and waiting for `pods`.
fn two_agents(
    world: &World,
    nodes: (&Node, &Node),
    yaml: &ClusterYaml,
    args: &[&str],
    pods: (&[&Pod], &[&Pod]),
) -> (LocalAgent, LocalAgent) {
    let mk = |n: &Node| {
        let mut a = LocalAgent::new(world, n, &ambit_bin());
        for x in args {
            a = a.arg(x);
        }
        yaml.write(&a.config_dir());
        a
    };
    let (mut a1, mut a2) = (mk(nodes.0), mk(nodes.1));
    a1.start(world);
    a2.start(world);
    a1.wait_enrolled(pods.0);
    a2.wait_enrolled(pods.1);
    (a1, a2)
}

/// Every frame on every interface of a node's netns while it runs (AF_PACKET, ETH_P_ALL), read
/// on a thread of its own.
///
/// A busy machine can starve that thread for long stretches; the kernel then drops frames at
/// the socket, and a capture with holes proves nothing about what fell in them ("no plaintext
/// on the wire" least of all). So the socket's queue is made to hold a whole test transfer
/// even if the thread never ran (`SO_RCVBUFFORCE`, past `net.core.rmem_max`, which silently
/// capped a plain `SO_RCVBUF`), the queue is drained to the end before the capture is
/// returned, and the capture says whether the kernel dropped anything (`SO_RXQ_OVFL`, the drop
/// count each read reports) or a frame did not fit the read buffer.
struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Capture>>,
}

/// What a sniffer saw.
#[derive(Default)]
struct Capture {
    /// The frames, concatenated.
    bytes: Vec<u8>,
    frames: u64,
    /// Frames the kernel dropped because the socket's queue was full.
    dropped: u32,
    /// Frames longer than the read buffer (only their start is in `bytes`).
    truncated: u64,
}

impl Capture {
    fn is_complete(&self) -> bool {
        self.dropped == 0 && self.truncated == 0
    }
}

/// Queue for captured frames, counted as the kernel charges them (each frame's buffer, a few
/// times its length for small frames): room for every frame of the largest transfer sniffed
/// here (4 MiB each way, seen on each interface it crosses) many times over.
const SNIFF_QUEUE: usize = 256 << 20;
/// Larger than any frame on these links (64 KiB GSO frames, plus headers).
const FRAME_MAX: usize = 1 << 20;

impl Sniffer {
    fn start(node: &Node) -> Sniffer {
        use std::os::fd::AsRawFd;
        const ETH_P_ALL: u16 = 0x0003;
        let sock = node
            .run(|| {
                socket2::Socket::new(
                    socket2::Domain::PACKET,
                    socket2::Type::RAW,
                    Some(socket2::Protocol::from(i32::from(ETH_P_ALL.to_be()))),
                )
            })
            .expect("packet socket in the node netns");
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBufForce, &SNIFF_QUEUE)
            .expect("SO_RCVBUFFORCE on the packet socket (needs CAP_NET_ADMIN)");
        let queue = sock.recv_buffer_size().expect("SO_RCVBUF");
        assert!(
            queue >= SNIFF_QUEUE,
            "the sniffer's queue is {queue} bytes, not {SNIFF_QUEUE}"
        );
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        // Each read reports the kernel's count of frames dropped at this socket so far.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RxqOvfl, &1)
            .expect("SO_RXQ_OVFL on the packet socket");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            use nix::errno::Errno;
            use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
            let mut capture = Capture::default();
            let mut buf = vec![0u8; FRAME_MAX];
            let mut cmsg = nix::cmsg_space!(u32);
            loop {
                // Once told to stop, read what is still queued without waiting, to the end.
                let stopping = flag.load(Ordering::Acquire);
                let flags = if stopping {
                    MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT
                } else {
                    MsgFlags::MSG_TRUNC
                };
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                // With MSG_TRUNC a packet socket returns the frame's real length.
                let read =
                    recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags).map(|m| {
                        let dropped = m.cmsgs().ok().into_iter().flatten().find_map(|c| match c {
                            ControlMessageOwned::RxqOvfl(n) => Some(n),
                            _ => None,
                        });
                        (m.bytes, dropped)
                    });
                match read {
                    Ok((n, dropped)) => {
                        capture.frames += 1;
                        if let Some(d) = dropped {
                            capture.dropped = capture.dropped.max(d);
                        }
                        if n > buf.len() {
                            capture.truncated += 1;
                        }
                        capture.bytes.extend_from_slice(&buf[..n.min(buf.len())]);
                    }
                    Err(Errno::EAGAIN) if stopping => break,
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => panic!("sniffer read: {e}"),
                }
            }
            capture
        });
        Sniffer {
            stop,
            thread: Some(thread),
        }
    }

    /// Everything captured since `start`: what was still queued is read first.
    fn finish(mut self) -> Capture {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .expect("sniffer thread")
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Runs `transfer` while sniffing `node`, and returns what it returned with the frames seen.
/// A capture the kernel dropped frames from (the machine was too busy even for the queue) is
/// thrown away and the transfer run again: what is asserted on the wire is all there was.
fn sniffed<T>(node: &Node, mut transfer: impl FnMut() -> T) -> (T, Vec<u8>) {
    const ATTEMPTS: usize = 3;
    let mut incomplete = Vec::new();
    for _ in 0..ATTEMPTS {
        let sniffer = Sniffer::start(node);
        let out = transfer();
        let capture = sniffer.finish();
        if capture.is_complete() {
            eprintln!(
                "capture: {} frames, {} bytes, none dropped",
                capture.frames,
                capture.bytes.len()
            );
            return (out, capture.bytes);
        }
        let what = format!(
            "{} frames ({} bytes), {} dropped by the kernel, {} truncated",
            capture.frames,
            capture.bytes.len(),
            capture.dropped,
            capture.truncated
        );
        eprintln!("incomplete capture, again: {what}");
        incomplete.push(what);
    }
    panic!("every capture of the transfer was incomplete: {incomplete:?}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const MARKER: &[u8] = b"AMBIT-PLAINTEXT-MARKER-4f2a9c";

/// Acceptance 1: client on node 1 to server on node 2 over HBONE: 256 MiB and 1,000 short
/// connections intact; the link shows no plaintext (and a plaintext path is visible, so the
/// sniffer is known to work).
#[test]
fn hbone_between_nodes_is_intact_and_encrypted() {
    support::raise_fd_limit();
    let world = World::new("hb-intact");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let echo4 = sa(server.ip4(), 8080);
    let echo6 = sa(server.ip6(), 8080);
    let srv = Server::start(&server, &[echo4, echo6], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &outsider, &server]);
    let (a1, a2) = two_agents(&world, (&n1, &n2), &yaml, &[], (&[&client], &[&server]));

    const TOTAL: u64 = 256 << 20;
    let (sent, got, n) = in_pod(&client, || echo_transfer(echo4, TOTAL, None));
    assert_eq!(n, TOTAL, "every byte came back");
    assert_eq!(sent, got, "bytes intact both ways");

    // 1,000 short connections, IPv4 and IPv6, 50 at a time; each sees its exact destination.
    in_pod(&client, || async {
        for batch in 0..20 {
            let dst = if batch % 2 == 0 { echo4 } else { echo6 };
            let results = futures::future::join_all((0..50).map(|_| whoami(dst))).await;
            for r in results {
                let (peer, local, our_peer) = r.unwrap_or_else(|e| panic!("{dst}: {e}"));
                assert_eq!((local, our_peer), (dst, dst));
                let client_ip = if dst.is_ipv4() {
                    IpAddr::from(client.ip4())
                } else {
                    IpAddr::from(client.ip6())
                };
                assert_eq!(
                    peer.ip(),
                    client_ip,
                    "the app sees the client pod's address"
                );
            }
        }
    });
    let s1 = a1.wait_for("1,001 tunnels from node 1", SETTLE, |s| {
        s["proxy"]["outbound_hbone"] == 1001
    });
    assert_eq!(
        s1["proxy"]["outbound_plaintext"], 0,
        "nothing left in plaintext"
    );
    a2.wait_for("1,001 streams on node 2", SETTLE, |s| {
        s["proxy"]["hbone_inbound_streams"] == 1001
    });
    assert_eq!(
        a2.counter("proxy.inbound_accepted"),
        0,
        "no plaintext inbound"
    );

    // No plaintext on the wire: a marker-filled transfer over HBONE never shows the marker on
    // node 1's interfaces...
    let ((), wire) = sniffed(&n1, || {
        let (sent, got, n) = in_pod(&client, || echo_transfer(echo4, 4 << 20, Some(MARKER)));
        assert_eq!((sent, n), (got, 4 << 20), "marker transfer intact");
    });
    assert!(
        wire.len() > 8 << 20,
        "the sniffer saw the tunnel's traffic ({} bytes)",
        wire.len()
    );
    assert!(
        !contains(&wire, MARKER),
        "plaintext of the payload on the wire"
    );
    // ...while the same transfer from a pod outside the mesh does show it.
    let ((), wire) = sniffed(&n1, || {
        let (sent, got, n) = in_pod(&outsider, || echo_transfer(echo4, 1 << 20, Some(MARKER)));
        assert_eq!((sent, n), (got, 1 << 20), "plaintext transfer intact");
    });
    assert!(
        contains(&wire, MARKER),
        "control: plaintext is visible to the sniffer"
    );
    drop(srv);
}

/// Acceptance 2: concurrent connections from one pod to one destination share one HTTP/2
/// connection; the 101st concurrent stream opens a second. Each data-plane worker pools its own
/// connections (as Envoy's workers do), and a worker is whichever accepted the app's connection,
/// so the agents run one worker here to make the count exact.
#[test]
fn pool_multiplexes_and_opens_a_second_connection_at_the_101st_stream() {
    support::raise_fd_limit();
    let world = World::new("hb-pool");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let dst = sa(server.ip4(), 8080);
    let _srv = Server::start(&server, &[dst], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let (a1, _a2) = two_agents(
        &world,
        (&n1, &n2),
        &yaml,
        &["--workers", "1"],
        (&[&client], &[&server]),
    );

    // Open (and keep) 100 connections; each has its whoami line, so its stream is up.
    let open = |count: usize| {
        client.run(move || {
            (0..count)
                .map(|_| {
                    use std::io::BufRead;
                    let s = std::net::TcpStream::connect(dst).expect("connect");
                    s.set_read_timeout(Some(SETTLE)).ok();
                    let mut line = String::new();
                    std::io::BufReader::new(&s)
                        .read_line(&mut line)
                        .expect("whoami line");
                    assert!(!line.is_empty(), "stream answered");
                    s
                })
                .collect::<Vec<_>>()
        })
    };
    let first = open(100);
    let s = a1.fresh_status();
    assert_eq!(s["pool"]["streams_opened"], 100);
    assert_eq!(
        s["pool"]["connections_opened"], 1,
        "100 concurrent streams share one connection: {}",
        s["pool"]
    );
    assert_eq!(s["pool"]["streams_reused"], 99);
    assert_eq!(s["pool_connections"], 1);
    let second = open(1);
    let s = a1.fresh_status();
    assert_eq!(
        s["pool"]["connections_opened"], 2,
        "the 101st stream opens a second connection: {}",
        s["pool"]
    );
    assert_eq!(s["pool_connections"], 2);
    drop((first, second));
    // Freed slots are reused: a new stream goes on an open connection.
    let third = open(1);
    let s = a1.fresh_status();
    assert_eq!(s["pool"]["connections_opened"], 2, "{}", s["pool"]);
    drop(third);
}

/// Acceptance 3 and 4 at the server: a client from another CA is refused at the handshake; a
/// non-CONNECT request and an `:authority` naming another IP get 400; an unreachable app, a
/// hostname no Service has and each of the proxy's own ports get 503 (ztunnel's answers); a good
/// request gets 200, by address or by Service hostname. A server presenting the wrong identity
/// is refused by the client. Failed handshakes do not each write a line at INFO or above.
#[test]
fn hbone_server_checks_certificates_and_requests() {
    let world = World::new("hb-server");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world
        .pod("server")
        .node(&n2)
        .namespace("mesh")
        .sa("beta")
        .spawn();
    let other = world.pod("other").node(&n2).namespace("mesh").spawn();
    let app = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&outsider, &client, &server, &other])
        .service(
            "beta",
            "mesh",
            std::net::Ipv4Addr::new(10, 96, 7, 7),
            &[ambit::harness::SvcPort::unnamed(80, 8080)],
            &[&server],
            true,
        );
    let (a1, a2) = two_agents(
        &world,
        (&n1, &n2),
        &yaml,
        &[],
        (&[&client], &[&server, &other]),
    );
    let hbone = sa(server.ip4(), 15008);
    let me = Identity::new("cluster.local", "plain", "tester");
    let beta = Identity::new("cluster.local", "mesh", "beta");
    let ca_dir = a1.ca_dir();

    let statuses = in_pod(&outsider, || async {
        let mut c = hbone_client(&ca_dir, &me, hbone, &beta)
            .await
            .unwrap_or_else(|e| panic!("a client of our CA connects: {e}"));
        let get = c.status(http::Method::GET, &app.to_string()).await;
        let elsewhere = c
            .status(http::Method::CONNECT, &sa(other.ip4(), 8080).to_string())
            .await;
        let not_ip = c.status(http::Method::CONNECT, "example.com:8080").await;
        let closed = c
            .status(http::Method::CONNECT, &sa(server.ip4(), 9).to_string())
            .await;
        let ok = c.status(http::Method::CONNECT, &app.to_string()).await;
        let mut own = Vec::new();
        for port in [15001, 15006, 15008, 15020, 15021, 15000] {
            let target = sa(server.ip4(), port).to_string();
            own.push((port, c.status(http::Method::CONNECT, &target).await));
        }
        let by_name = c
            .status(http::Method::CONNECT, "beta.mesh.svc.cluster.local:80")
            .await;
        (get, elsewhere, not_ip, closed, ok, own, by_name)
    });
    assert_eq!(statuses.0, Ok(400), "GET is not CONNECT");
    assert_eq!(statuses.1, Ok(400), ":authority of another pod");
    assert_eq!(statuses.2, Ok(503), ":authority a hostname no Service has");
    assert_eq!(statuses.3, Ok(503), "nothing listens on the app port");
    assert_eq!(statuses.4, Ok(200), "a good CONNECT");
    for (port, status) in &statuses.5 {
        assert_eq!(*status, Ok(503), "CONNECT to the proxy's own port {port}");
    }
    assert_eq!(
        statuses.6,
        Ok(200),
        "a Service hostname: port 80 maps to the app's 8080"
    );
    assert_eq!(a2.counter("proxy.hbone_inbound_bad_request"), 2);
    assert_eq!(a2.counter("proxy.hbone_inbound_unavailable"), 7);

    // The server presents mesh/beta; a client expecting another identity refuses it.
    let wrong = in_pod(&outsider, || async {
        hbone_client(
            &ca_dir,
            &me,
            hbone,
            &Identity::new("cluster.local", "mesh", "alpha"),
        )
        .await
        .map(|_| ())
    });
    let e = wrong.expect_err("a server with the wrong identity is refused");
    assert!(e.contains("sa/alpha") && e.contains("sa/beta"), "{e}");
    // The server sees that handshake fail too (the client aborted it).
    a2.wait_for("aborted handshake counted", SETTLE, |s| {
        s["proxy"]["hbone_tls_refused"] == 1
    });

    // A client certificate from another CA is refused by the server.
    let foreign = std::env::temp_dir().join(format!("ambit-foreign-ca-{}", std::process::id()));
    let refused = in_pod(&outsider, || async {
        let mut c = hbone_client(&foreign, &me, hbone, &beta).await?;
        c.status(http::Method::CONNECT, &app.to_string()).await
    });
    let _ = std::fs::remove_dir_all(&foreign);
    assert!(refused.is_err(), "foreign CA accepted: {refused:?}");
    a2.wait_for("foreign client refused", SETTLE, |s| {
        s["proxy"]["hbone_tls_refused"] == 2
    });

    // Any client can fail handshakes as often as it likes: each is logged at debug level, and
    // at most one line per interval says how many failed (rustls's own warnings stay out too).
    let log_before = std::fs::read_to_string(a2.log_path())
        .unwrap_or_default()
        .len();
    let burst = Instant::now();
    const FAILURES: u64 = 60;
    in_pod(&outsider, || async {
        // A TLS record carrying a Finished message where a ClientHello must be, plain text,
        // and a client that leaves at once.
        let mut wrong_message = vec![0x16, 0x03, 0x01, 0x00, 0x24, 0x14, 0x00, 0x00, 0x20];
        wrong_message.extend_from_slice(&[0u8; 32]);
        for i in 0..FAILURES {
            let mut s = TcpStream::connect(hbone).await.expect("connect to 15008");
            match i % 3 {
                0 => drop(s.write_all(&wrong_message).await),
                1 => drop(s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await),
                _ => {}
            }
            let _ = s.shutdown().await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    });
    a2.wait_for("every failed handshake counted", SETTLE, |s| {
        s["proxy"]["hbone_tls_refused"] == 2 + FAILURES
    });
    let took = burst.elapsed();
    let log = std::fs::read_to_string(a2.log_path()).unwrap_or_default();
    let lines: Vec<&str> = log
        .get(log_before..)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            [" INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|lvl| l.contains(lvl))
        })
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("handshake") || l.contains("rustls") || l.contains("hbone client")
        })
        .collect();
    // One line per started report interval at most (60 s, `server::REPORT_INTERVAL`).
    let allowed = 1 + (took.as_secs() / 60) as usize;
    assert!(
        lines.len() <= allowed,
        "{FAILURES} failed handshakes wrote {} lines at INFO or above (at most {allowed}):\n{}",
        lines.len(),
        lines.join("\n")
    );

    // The mesh client's agent refuses a server whose identity is not the one the cluster says:
    // node 1 is told the server runs as mesh/alpha, node 2 (the truth) says mesh/beta.
    let lying = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&outsider, &client, &other])
        .pod_with_sa(&server, "alpha");
    let generation = a1.fresh_status()["generation"].as_u64();
    lying.write(&a1.config_dir());
    a1.wait_for("node 1 sees the new identity", SETTLE, |s| {
        s["generation"].as_u64() > generation
    });
    // The app records a connection when it closes: the good CONNECT above closed with its
    // client, at a moment of its own. Count it before counting what the refused tunnel adds.
    wait_until("the app recorded the good CONNECTs", || srv.count() == 2);
    let before = srv.count();
    let r = in_pod(&client, || whoami(app));
    assert!(
        r.is_err(),
        "a tunnel to a server with the wrong identity: {r:?}"
    );
    a1.wait_for("client refused the server", SETTLE, |s| {
        s["proxy"]["outbound_hbone_failed"] == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.count(), before, "the app never saw the refused tunnel");
}

/// Acceptance 6: mesh to non-mesh is plaintext passthrough; non-mesh to mesh reaches 15006.
#[test]
fn mesh_and_non_mesh_pods_still_talk() {
    let world = World::new("hb-mixed");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let meshed = world.pod("meshed").node(&n1).namespace("mesh").spawn();
    let plain = world.pod("plain").node(&n2).namespace("plain").spawn();
    let target = world.pod("target").node(&n2).namespace("mesh").spawn();
    let p_app = sa(plain.ip4(), 8080);
    let t_app = sa(target.ip4(), 8080);
    let _s1 = Server::start(&plain, &[p_app], Mode::WhoamiEcho);
    let _s2 = Server::start(&target, &[t_app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&meshed, &plain, &target]);
    let (a1, a2) = two_agents(&world, (&n1, &n2), &yaml, &[], (&[&meshed], &[&target]));

    let (peer, local, _) = in_pod(&meshed, || whoami(p_app)).expect("mesh to non-mesh");
    assert_eq!(local, p_app);
    assert_eq!(
        peer.ip(),
        IpAddr::from(meshed.ip4()),
        "plaintext, from the pod itself"
    );
    let s = a1.fresh_status();
    assert_eq!(
        (
            s["proxy"]["outbound_plaintext"].as_u64(),
            s["proxy"]["outbound_hbone"].as_u64()
        ),
        (Some(1), Some(0))
    );

    let (_, local, _) = in_pod(&plain, || whoami(t_app)).expect("non-mesh to mesh");
    assert_eq!(local, t_app);
    a2.wait_for("plaintext inbound on 15006", SETTLE, |s| {
        s["proxy"]["inbound_accepted"] == 1
    });
    assert_eq!(a2.counter("proxy.hbone_inbound_streams"), 0);
}

/// Acceptance 7: the server node's agent restarts: connections fail closed during the gap (the
/// app sees nothing around the proxy), and succeed again once it is back, on a fresh tunnel.
#[test]
fn server_agent_restart_fails_closed_then_recovers() {
    let world = World::new("hb-restart");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let app = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let (a1, mut a2) = two_agents(&world, (&n1, &n2), &yaml, &[], (&[&client], &[&server]));
    in_pod(&client, || whoami(app)).expect("before the restart");
    let served = support::settled(|| srv.count(), |n| *n >= 1);
    assert_eq!(served, 1, "the app served the first connection");

    a2.kill();
    for _ in 0..5 {
        let r = in_pod(&client, || whoami(app));
        assert!(
            r.is_err(),
            "nothing reaches the app while its node's agent is down: {r:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(srv.count(), 1, "the app saw no connection during the gap");

    a2.start(&world);
    a2.wait_enrolled(&[&server]);
    let deadline = Instant::now() + SETTLE;
    loop {
        match in_pod(&client, || whoami(app)) {
            Ok((_, local, _)) => {
                assert_eq!(local, app);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("no recovery after the restart: {e}"),
        }
    }
    assert!(
        a1.counter("pool.connections_opened") >= 2,
        "a fresh tunnel after the restart"
    );
}

/// Acceptance 5: certificates rotate (short TTL) during a 60-second continuous transfer without
/// interrupting it, and new handshakes present the new certificate.
#[test]
fn certificate_rotation_does_not_interrupt_a_long_transfer() {
    let secs: u64 = std::env::var("AMBIT_TEST_ROTATION_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let world = World::new("hb-rotate");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let app = sa(server.ip4(), 8080);
    let srv = Server::start(&server, &[app], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &outsider, &server]);
    let (a1, a2) = two_agents(
        &world,
        (&n1, &n2),
        &yaml,
        &["--cert-ttl", "6s"],
        (&[&client], &[&server]),
    );
    let ca_dir = a1.ca_dir();
    let me = Identity::new("cluster.local", "plain", "tester");
    let server_id = Identity::new("cluster.local", "mesh", "default");
    let server_ip = server.ip4();
    let server_cert = |ca_dir: std::path::PathBuf| {
        let (me, server_id) = (me.clone(), server_id.clone());
        in_pod(&outsider, move || async move {
            let ca = LocalCa::load_or_create(&ca_dir, "cluster.local").expect("ca");
            let m = SecretManager::new(Arc::new(ca), CertConfig::default());
            let _lease = m.acquire(&me);
            m.fetch(&me).await.expect("test cert");
            let cfg = ambit::tls::client_config(m.clone(), me.clone(), server_id);
            let tcp = TcpStream::connect(sa(server_ip, 15008)).await.expect("tcp");
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(ambit::tls::server_name(server_ip.into()), tcp)
                .await
                .expect("handshake");
            tls.get_ref().1.peer_certificates().expect("server cert")[0].to_vec()
        })
    };
    let cert_before = server_cert(ca_dir.clone());

    // Continuous transfer: the client writes for `secs` seconds at a steady pace and reads the
    // echo; everything must come back, in order, without a reset.
    let (sent, got, n, bytes) = in_pod(&client, || async move {
        let stream = TcpStream::connect(app).await.expect("connect");
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            let (mut seed, mut h, mut sent) = (11u64, Fnv::new(), 0u64);
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                seed = support::pattern(seed, &mut buf);
                w.write_all(&buf).await.expect("write during rotation");
                h.update(&buf);
                sent += buf.len() as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w.shutdown().await.expect("half-close");
            (h.0, sent)
        });
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            r.read_exact(&mut byte).await.expect("whoami line");
        }
        let (mut h, mut n, mut buf) = (Fnv::new(), 0u64, vec![0u8; 1 << 20]);
        loop {
            let k = r.read(&mut buf).await.expect("read during rotation");
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        let (sent_h, sent) = writer.await.expect("writer");
        (sent_h, h.0, n, sent)
    });
    assert_eq!(n, bytes, "every byte came back");
    assert_eq!(sent, got, "intact across rotations");
    // The app records the connection after its last write, so the client can see the end of
    // the echo before the record exists.
    wait_until("the app recorded the transfer", || srv.count() == 1);
    let seen = srv.seen();
    assert!(!seen[0].reset, "the transfer was never reset");
    // A 6 s TTL rotates about every 3 s: many rotations happened during the transfer.
    let min_rotations = (secs / 6).max(2);
    for (name, a) in [("client node", &a1), ("server node", &a2)] {
        let r = a.counter("certs.rotations_total");
        assert!(r >= min_rotations, "{name}: only {r} rotations in {secs} s");
    }
    let cert_after = server_cert(ca_dir);
    assert_ne!(
        cert_before, cert_after,
        "a new handshake presents the rotated certificate"
    );
}

/// What an independent HBONE server saw of our client's tunnel.
#[derive(Debug)]
struct Seen {
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    client: Option<Identity>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    echoed: usize,
}

/// Interoperability, client side: a server written here from ztunnel's documented behaviour
/// (not ambit's server) stands in for the peer node, and checks what ambit's client puts on the
/// wire: TLS 1.3, ALPN h2, no SNI, the source's SPIFFE certificate, and a CONNECT with
/// `:authority` = original destination and the `forwarded`, `baggage` and `traceparent` headers.
#[test]
fn client_speaks_hbone_as_ztunnel_expects() {
    let world = World::new("hb-wire");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("client")
        .node(&n1)
        .namespace("mesh")
        .sa("web")
        .label("app", "web")
        .spawn();
    // No agent on n2: the peer "node" is the test's own server in the pod.
    let server = world
        .pod("server")
        .node(&n2)
        .namespace("mesh")
        .sa("api")
        .spawn();
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let mut a1 = LocalAgent::new(&world, &n1, &ambit_bin()).arg("--pool-idle-timeout=0s");
    yaml.write(&a1.config_dir());
    a1.start(&world);
    a1.wait_enrolled(&[&client]);

    let ca_dir = a1.ca_dir();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let pod = server.clone();
    let fake = std::thread::spawn(move || {
        pod.run_async(|| async move {
            let ca = LocalCa::load_or_create(&ca_dir, "cluster.local").expect("ca");
            let me = Identity::new("cluster.local", "mesh", "api");
            let m = SecretManager::new(Arc::new(ca), CertConfig::default());
            let _lease = m.acquire(&me);
            m.fetch(&me).await.expect("server cert");
            let acceptor =
                tokio_rustls::TlsAcceptor::from(ambit::tls::server_config(m.clone(), me));
            let l = tokio::net::TcpListener::bind("0.0.0.0:15008")
                .await
                .expect("bind 15008");
            ready_tx.send(()).expect("ready");
            let (tcp, _) = l.accept().await.expect("accept");
            let tls = acceptor.accept(tcp).await.expect("TLS from ambit's client");
            let (_, conn) = tls.get_ref();
            let (sni, alpn, version, client) = (
                conn.server_name().map(String::from),
                conn.alpn_protocol().map(<[u8]>::to_vec),
                conn.protocol_version(),
                ambit::tls::peer_identity(conn),
            );
            let mut h2 = h2::server::handshake(tls).await.expect("HTTP/2");
            let (req, mut respond) = h2.accept().await.expect("a stream").expect("request");
            // Drive the connection until the client closes it (its pool keeps nothing idle here).
            let driver = tokio::spawn(async move { while h2.accept().await.is_some() {} });
            let (parts, mut body) = req.into_parts();
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            // Echo what the app sends until it half-closes.
            let mut echoed = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("data");
                echoed += chunk.len();
                let _ = body.flow_control().release_capacity(chunk.len());
                send.send_data(chunk, false).expect("echo");
            }
            send.send_data(bytes::Bytes::new(), true).expect("end");
            drop((send, body, respond));
            let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
            Seen {
                sni,
                alpn,
                version,
                client,
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                echoed,
            }
        })
    });
    ready_rx.recv_timeout(SETTLE).expect("fake server ready");

    let dst = sa(server.ip4(), 8080);
    let (echo, local_port) = in_pod(&client, || async move {
        let mut s = TcpStream::connect(dst).await.expect("connect");
        let port = s.local_addr().expect("local").port();
        s.write_all(b"hello over hbone").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got).await.map(|_| got);
        (r, port)
    });
    let seen = fake.join();
    let echo =
        echo.unwrap_or_else(|e| panic!("read: {e}; fake server: {seen:?}\n{}", a1.log_tail()));
    let seen = seen.expect("fake server");
    assert_eq!(echo, b"hello over hbone", "bytes through the tunnel");
    eprintln!("{seen:#?}");

    assert_eq!(seen.sni, None, "no SNI");
    assert_eq!(seen.alpn.as_deref(), Some(&b"h2"[..]), "ALPN h2");
    assert_eq!(seen.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(
        seen.client,
        Some(Identity::new("cluster.local", "mesh", "web")),
        "the source workload's identity"
    );
    assert_eq!(seen.method, http::Method::CONNECT);
    assert_eq!(seen.uri.scheme(), None, "authority-form CONNECT");
    assert_eq!(
        seen.uri.authority().map(|a| a.as_str().to_string()),
        Some(dst.to_string()),
        ":authority is the original destination"
    );
    let header = |name: &str| {
        seen.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("header {name} missing: {:?}", seen.headers))
            .to_string()
    };
    assert_eq!(
        header("forwarded"),
        format!("for=\"{}:{local_port}\"", client.ip4()),
        "forwarded names the app's own address"
    );
    let baggage = header("baggage");
    for kv in [
        "k8s.namespace.name=mesh",
        "k8s.pod.name=client",
        "service.name=web",
    ] {
        assert!(
            baggage.split(',').any(|p| p == kv),
            "baggage {baggage:?} lacks {kv}"
        );
    }
    let tp = header("traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[1..3].iter().all(|p| p
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()))
            && parts[1].chars().any(|c| c != '0')
            && parts[2].chars().any(|c| c != '0'),
        "W3C traceparent: {tp}"
    );
    assert_eq!(seen.echoed, b"hello over hbone".len());
}
