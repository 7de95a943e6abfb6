//! Issue 14, acceptance 4: an agent's memory comes back after load. Two agents (two nodes), a
//! client pod on node 1 and an echo server on node 2; cycles of many concurrent HBONE connections
//! opened, held and closed, and of TLS handshakes left stalled until the server drops them.
//!
//! RSS is read only once the agents report every connection of a cycle ended (relays counted on
//! both sides, refused handshakes on the server), so nothing of the load is still alive when it
//! is read. The assertion is only that it does not keep growing from cycle to cycle; the levels
//! (idle, loaded, after each cycle, per connection) are printed for the notes
//! (`cargo test -p ambit-agent --test memory -- --nocapture`; `AMBIT_MEMORY_CONNS` and
//! `AMBIT_MEMORY_STALLED` change the load, `AMBIT_MEMORY_CYCLES` the cycles).
//!
//! And issue 11's RSS bound from the start: what the agent frees while it starts (aya's parse of
//! the kernel's BTF) is returned to the kernel at once, not held through the allocator's decay
//! time while the first pods and their load arrive.

mod support;

use std::net::SocketAddr;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use futures::StreamExt as _;
use support::{ambit_bin, in_pod, settled, Mode, Server, SETTLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Concurrent connections per cycle (enough to show growth, few enough for about a minute).
const CONNS: usize = 3000;
/// Handshakes left stalled per cycle.
const STALLED: usize = 1000;
const CYCLES: usize = 3;
/// Bytes each connection sends and reads back, so every buffer on the way is used once.
const ECHO: usize = 1024;
/// Connections being opened at once.
const OPENING: usize = 200;
/// How much RSS after the last cycle may exceed RSS after the first: generous (allocator
/// slack, a pool connection more or less), far below what a leak of the load would leave.
const GROWTH_MARGIN: u64 = 16 << 20;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Room for the test's and the agents' sockets: both ends of every connection live in this
/// process (the clients and the echo server); the agents inherit the limit.
fn raise_fd_limit(conns: usize) {
    support::raise_fd_limit();
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("RLIMIT_NOFILE");
    let want = 2 * conns as u64 + 1000;
    assert!(
        soft >= want,
        "{conns} connections need {want} file descriptors here; the limit is {soft}"
    );
}

/// The agent's resident memory, bytes (`VmRSS` of /proc/<pid>/status).
fn rss(agent: &LocalAgent) -> u64 {
    let pid = agent.pid().expect("agent running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    kb * 1024
}

/// RSS once it has stopped falling (an allocator hands freed memory back over some seconds):
/// readings a second apart until one is less than 1 MB below the one three seconds before it
/// (or `SETTLE` has passed).
fn settled_rss(agent: &LocalAgent) -> u64 {
    let readings = std::cell::RefCell::new(Vec::new());
    settled(
        || {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let mut r = readings.borrow_mut();
            r.push(rss(agent));
            r.clone()
        },
        |r| r.len() >= 4 && r[r.len() - 4].saturating_sub(r[r.len() - 1]) < 1 << 20,
    )
    .last()
    .copied()
    .unwrap_or_default()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["proxy"][name].as_u64().unwrap_or(0)
}

/// Relays the agent has finished (cleanly or reset).
fn relays_ended(s: &serde_json::Value) -> u64 {
    counter(s, "relays_completed") + counter(s, "relays_reset")
}

/// Opens `n` connections to `dst` from `pod`, each through the mesh (its whoami line and its
/// echo came back), and returns them open.
fn open(pod: &Pod, dst: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    in_pod(pod, || async move {
        futures::stream::iter(0..n)
            .map(|_| async move {
                let mut s = TcpStream::connect(dst)
                    .await
                    .unwrap_or_else(|e| panic!("connect {dst}: {e}"));
                s.write_all(&[b'm'; ECHO]).await.expect("write");
                // "<peer> <local>\n", then the echo.
                let mut got = Vec::with_capacity(ECHO + 128);
                let mut buf = [0u8; 2048];
                loop {
                    let k = s.read(&mut buf).await.expect("read");
                    assert!(k > 0, "{dst} closed before the echo: {got:?}");
                    got.extend_from_slice(&buf[..k]);
                    if let Some(nl) = got.iter().position(|b| *b == b'\n') {
                        if got.len() - nl > ECHO {
                            break;
                        }
                    }
                }
                s.into_std().expect("into std")
            })
            .buffer_unordered(OPENING)
            .collect::<Vec<_>>()
            .await
    })
}

/// Opens `n` TCP connections to an HBONE port and sends nothing: each is a TLS handshake the
/// server waits for until its handshake timeout.
fn stall(pod: &Pod, hbone: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    pod.run(|| {
        (0..n)
            .map(|_| {
                std::net::TcpStream::connect(hbone)
                    .unwrap_or_else(|e| panic!("connect {hbone}: {e}"))
            })
            .collect()
    })
}

struct Rig {
    _world: World,
    client: Pod,
    outsider: Pod,
    server: Pod,
    _srv: Server,
    a1: LocalAgent,
    a2: LocalAgent,
}

fn rig(name: &str, conns: usize) -> Rig {
    raise_fd_limit(conns);
    let world = World::new(name);
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let srv = Server::start(
        &server,
        &[SocketAddr::new(server.ip4().into(), 8080)],
        Mode::WhoamiEcho,
    );
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &outsider, &server]);
    let mk = |n| {
        let a = LocalAgent::new(&world, n, &ambit_bin());
        yaml.write(&a.config_dir());
        a
    };
    let (mut a1, mut a2) = (mk(&n1), mk(&n2));
    a1.start(&world);
    a2.start(&world);
    a1.wait_enrolled(&[&client]);
    a2.wait_enrolled(&[&server]);
    Rig {
        _world: world,
        client,
        outsider,
        server,
        _srv: srv,
        a1,
        a2,
    }
}

/// RSS of the client's and the server's agent.
#[derive(Debug, Clone, Copy)]
struct Pair(u64, u64);

impl std::fmt::Display for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client {:.1} MB, server {:.1} MB",
            mb(self.0),
            mb(self.1)
        )
    }
}

/// One agent's readings over the cycles.
fn report(what: &str, idle: Pair, loaded: &[Pair], after: &[Pair], calm: &[Pair], n: usize) {
    eprintln!("memory [{what}, {n} per cycle]: idle {idle}");
    for (i, ((l, a), c)) in loaded.iter().zip(after).zip(calm).enumerate() {
        let per = |load: u64, idle: u64| load.saturating_sub(idle) as f64 / n as f64 / 1024.0;
        eprintln!(
            "memory [{what}] cycle {}: loaded {l} ({:.1} / {:.1} KB per connection); \
             at close {a}; settled {c}",
            i + 1,
            per(l.0, idle.0),
            per(l.1, idle.1),
        );
    }
}

/// RSS after the last cycle is not above RSS after the first by more than the margin, waiting
/// (up to `SETTLE`) for it to come down that far.
fn assert_not_growing(what: &str, rig: &Rig, after: &[Pair]) {
    let first = after[0];
    for (side, agent, f) in [("client", &rig.a1, first.0), ("server", &rig.a2, first.1)] {
        let last = settled(|| rss(agent), |r| *r <= f + GROWTH_MARGIN);
        assert!(
            last <= f + GROWTH_MARGIN,
            "{what}: the {side} agent's RSS kept growing: {:.1} MB after cycle 1, {:.1} MB after \
             cycle {} (margin {:.0} MB)",
            mb(f),
            mb(last),
            after.len(),
            mb(GROWTH_MARGIN)
        );
    }
}

/// Cycles of `AMBIT_MEMORY_CONNS` concurrent HBONE connections, opened (each with a small
/// echo), held, closed: once the agents have counted them all ended, their RSS after the last
/// cycle is not above their RSS after the first by more than [`GROWTH_MARGIN`].
#[test]
fn memory_comes_back_after_concurrent_connections() {
    let n = env_or("AMBIT_MEMORY_CONNS", CONNS);
    let cycles = env_or("AMBIT_MEMORY_CYCLES", CYCLES).max(2);
    let rig = rig("mem-conns", n);
    let dst = SocketAddr::new(rig.server.ip4().into(), 8080);
    let both = || Pair(rss(&rig.a1), rss(&rig.a2));
    let idle = Pair(settled_rss(&rig.a1), settled_rss(&rig.a2));
    let (mut loaded, mut after, mut calm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        let (s1, s2) = (rig.a1.fresh_status(), rig.a2.fresh_status());
        let (ended1, ended2) = (relays_ended(&s1), relays_ended(&s2));
        let streams = counter(&s2, "hbone_inbound_streams");
        let conns = open(&rig.client, dst, n);
        assert_eq!(conns.len(), n);
        rig.a2.wait_for("every stream on the server", SETTLE, |s| {
            counter(s, "hbone_inbound_streams") >= streams + n as u64
        });
        loaded.push(both());
        drop(conns);
        rig.a1
            .wait_for("every relay ended on the client", SETTLE, |s| {
                relays_ended(s) >= ended1 + n as u64
            });
        rig.a2
            .wait_for("every relay ended on the server", SETTLE, |s| {
                relays_ended(s) >= ended2 + n as u64
            });
        after.push(both());
        calm.push(Pair(settled_rss(&rig.a1), settled_rss(&rig.a2)));
    }
    report("HBONE connections", idle, &loaded, &after, &calm, n);
    assert_not_growing("HBONE connections", &rig, &calm);
}

/// Cycles of `AMBIT_MEMORY_STALLED` TCP connections to the server pod's 15008 that never start
/// their TLS handshake: once the server agent has dropped them all (its handshake timeout), its
/// RSS after the last cycle is not above its RSS after the first by more than
/// [`GROWTH_MARGIN`].
#[test]
fn memory_comes_back_after_stalled_handshakes() {
    let n = env_or("AMBIT_MEMORY_STALLED", STALLED);
    let cycles = env_or("AMBIT_MEMORY_CYCLES", CYCLES).max(2);
    let rig = rig("mem-stall", n);
    let hbone = SocketAddr::new(rig.server.ip4().into(), 15008);
    let both = || Pair(rss(&rig.a1), rss(&rig.a2));
    let idle = Pair(settled_rss(&rig.a1), settled_rss(&rig.a2));
    let (mut loaded, mut after, mut calm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        let s2 = rig.a2.fresh_status();
        let (accepted, refused) = (
            counter(&s2, "hbone_inbound_accepted"),
            counter(&s2, "hbone_tls_refused"),
        );
        let stalled = stall(&rig.outsider, hbone, n);
        rig.a2
            .wait_for("every stalled connection accepted", SETTLE, |s| {
                counter(s, "hbone_inbound_accepted") >= accepted + n as u64
            });
        loaded.push(both());
        rig.a2
            .wait_for("every stalled handshake dropped", SETTLE, |s| {
                counter(s, "hbone_tls_refused") >= refused + n as u64
            });
        drop(stalled);
        after.push(both());
        calm.push(Pair(settled_rss(&rig.a1), settled_rss(&rig.a2)));
    }
    report("stalled handshakes", idle, &loaded, &after, &calm, n);
    assert_not_growing("stalled handshakes", &rig, &calm);
}

/// How far an agent's RSS just after it enrolled its pods may be above where it settles: the
/// start-up's transient allocations that were freed (aya's parse of the kernel's BTF, about
/// 24 MB) are returned at once, not carried through the allocator's decay time.
const START_MARGIN: u64 = 8 << 20;

/// An agent's RSS as soon as it has enrolled its pods is within [`START_MARGIN`] of its settled
/// RSS: it does not hold the memory its start-up freed.
#[test]
fn start_up_returns_what_it_freed() {
    let world = World::new("mem-start");
    let n1 = world.node("n1");
    let pod = world.pod("client").node(&n1).namespace("mesh").spawn();
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .pods([&pod])
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&pod]);
    let at_start = rss(&agent);
    let calm = settled_rss(&agent);
    eprintln!(
        "memory [start-up]: {:.1} MB once enrolled, settled {:.1} MB",
        mb(at_start),
        mb(calm)
    );
    assert!(
        at_start <= calm + START_MARGIN,
        "the agent held {:.1} MB once enrolled and settled at {:.1} MB: start-up's freed memory \
         was kept (margin {:.0} MB)",
        mb(at_start),
        mb(calm),
        mb(START_MARGIN)
    );
}
