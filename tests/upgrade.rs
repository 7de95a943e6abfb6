//! Upgrades that drop nothing (issue 15): a new agent process takes the running one's listeners
//! over while a client pod opens 500 connections/s and a long checksummed transfer runs, first on
//! the client's node, then on the server's; not one new connection fails, and the transfer that
//! started on the old agent completes there while it drains. SIGTERM alone drains the same way:
//! new connections fail closed at once, established ones finish (or are closed cleanly past the
//! grace period).

mod l7support;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, Process, SvcPort, World};
use support::{ambit_bin, pattern, raise_fd_limit, wait_until, Fnv, Mode, Server, SETTLE};

/// The client's rate of new connections.
const PER_SECOND: u64 = 500;
/// The long transfer, each way (the echo server sends it back).
const TRANSFER: u64 = 256 << 20;
/// Long enough for the transfer to finish on the old agent however slow the machine is.
const GRACE: &str = "--drain-grace=120s";

/// The client pod's connection counts.
#[derive(Default)]
struct Flood {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Flood {
    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    /// Waits until `n` more connections than now have succeeded.
    fn wait_more(&self, n: u64) {
        let from = self.ok.load(Ordering::SeqCst);
        wait_until(&format!("{n} more echo connections"), || {
            self.ok.load(Ordering::SeqCst) >= from + n
        });
    }

    /// Stops the flood when dropped, so a failing assertion does not leave it running.
    fn stop_on_drop(&self) -> impl Drop + '_ {
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        Stop(&self.stop)
    }

    fn record(&self, r: Result<(), String>) {
        match r {
            Ok(()) => self.ok.fetch_add(1, Ordering::SeqCst),
            Err(e) => {
                self.errors.lock().unwrap().push(e);
                self.failed.fetch_add(1, Ordering::SeqCst)
            }
        };
    }
}

/// One small echo through the mesh: the whoami line, then "ping" back.
async fn one_echo(dst: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let s = tokio::net::TcpStream::connect(dst)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut s = tokio::io::BufReader::new(s);
        let mut line = String::new();
        s.read_line(&mut line)
            .await
            .map_err(|e| format!("whoami: {e}"))?;
        if !line.ends_with('\n') {
            return Err(format!("whoami line cut short: {line:?}"));
        }
        s.get_mut()
            .write_all(b"ping")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)
            .await
            .map_err(|e| format!("echo: {e}"))?;
        if &buf != b"ping" {
            return Err(format!("echo {buf:?}"));
        }
        Ok(())
    };
    tokio::time::timeout(SETTLE, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

/// Opens [`PER_SECOND`] connections a second from `client` until told to stop.
fn run_flood(client: &Pod, dst: SocketAddr, flood: &Flood) {
    client.run_async(|| async {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / PER_SECOND));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running = tokio::task::JoinSet::new();
        while !flood.stop.load(Ordering::SeqCst) {
            tick.tick().await;
            running.spawn(one_echo(dst));
            while let Some(done) = running.try_join_next() {
                flood.record(done.unwrap_or_else(|e| Err(e.to_string())));
            }
        }
        while let Some(done) = running.join_next().await {
            flood.record(done.unwrap_or_else(|e| Err(e.to_string())));
        }
    });
}

/// A long echo transfer from `client`: half of it, then (once `go` says so) the rest. Returns
/// (hash sent, hash echoed back, bytes echoed back).
fn transfer(
    client: &Pod,
    dst: SocketAddr,
    half_sent: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
) -> (u64, u64, u64) {
    let s = client
        .run(move || TcpStream::connect_timeout(&dst, SETTLE))
        .expect("connect the transfer");
    s.set_read_timeout(Some(SETTLE)).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let (mut seed, mut h, mut sent) = (11u64, Fnv::new(), 0u64);
        let mut buf = vec![0u8; 1 << 20];
        while sent < TRANSFER {
            if sent == TRANSFER / 2 {
                let _ = half_sent.send(());
                go.recv().expect("go");
            }
            seed = pattern(seed, &mut buf);
            w.write_all(&buf).expect("transfer write");
            h.update(&buf);
            sent += buf.len() as u64;
        }
        w.shutdown(std::net::Shutdown::Write).expect("half-close");
        h.0
    });
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("whoami line");
    let (mut h, mut n, mut buf) = (Fnv::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let k = r.read(&mut buf).expect("transfer read");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (writer.join().expect("writer"), h.0, n)
}

fn log_count(agent: &LocalAgent, line: &str) -> usize {
    std::fs::read_to_string(agent.log_path())
        .unwrap_or_default()
        .matches(line)
        .count()
}

/// Upgrades `agent` while the flood runs and a transfer is half done; returns the connections
/// (succeeded, failed) from the new process's start to the old one's exit.
fn upgrade_under_load(
    world: &World,
    agent: &mut LocalAgent,
    client: &Pod,
    dst: SocketAddr,
    flood: &Flood,
    node: &str,
) -> (u64, u64) {
    flood.wait_more(PER_SECOND / 2);
    let (half_tx, half_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let moving = s.spawn(|| transfer(client, dst, half_tx, go_rx));
        half_rx
            .recv_timeout(SETTLE * 4)
            .expect("half the transfer sent");

        let took_over = log_count(agent, "the successor took over");
        let drained = log_count(agent, "drained: every connection ended");
        let before = flood.counts();
        let old: Process = agent.upgrade(world);
        wait_until(&format!("{node}: the old agent hands over"), || {
            log_count(agent, "the successor took over") > took_over
        });
        // The transfer's connection is the old agent's: it drains, it does not exit.
        assert!(
            matches!(old.try_wait(), Ok(None)),
            "{node}: the old agent exited with a connection open\n{}",
            agent.log_tail()
        );
        go_tx.send(()).expect("go");
        let (sent, echoed, n) = moving.join().expect("transfer");
        assert_eq!(n, TRANSFER, "{node}: the whole transfer came back");
        assert_eq!(sent, echoed, "{node}: the transfer came back intact");

        let exited = old
            .wait_timeout(SETTLE)
            .expect("wait")
            .unwrap_or_else(|| panic!("{node}: the old agent did not exit\n{}", agent.log_tail()));
        assert!(exited.success(), "{node}: old agent exit {exited:?}");
        assert!(
            log_count(agent, "drained: every connection ended") > drained,
            "{node}: drained before the grace period\n{}",
            agent.log_tail()
        );
        let after = flood.counts();
        (after.0 - before.0, after.1 - before.1)
    })
}

#[test]
fn an_upgrade_on_either_node_refuses_no_connection_and_keeps_a_long_transfer() {
    raise_fd_limit();
    let (world, client, dst, _srv, mut a1, mut a2) = two_nodes("upgrade-load", GRACE);

    let flood = Flood::default();
    let (on_client, on_server) = std::thread::scope(|s| {
        let flooding = s.spawn(|| run_flood(&client, dst, &flood));
        let _stop = flood.stop_on_drop();
        let on_client = upgrade_under_load(&world, &mut a1, &client, dst, &flood, "client's node");
        // The new agent serves: connections go on, tunnelled by it.
        flood.wait_more(PER_SECOND / 2);
        a1.wait_for("the new client-side agent tunnels", SETTLE, |s| {
            s["proxy"]["outbound_hbone"].as_u64() >= Some(PER_SECOND / 4)
        });
        let on_server = upgrade_under_load(&world, &mut a2, &client, dst, &flood, "server's node");
        flood.wait_more(PER_SECOND / 2);
        a2.wait_for("the new server-side agent terminates HBONE", SETTLE, |s| {
            s["proxy"]["hbone_inbound_streams"].as_u64() >= Some(PER_SECOND / 4)
        });
        flood.stop.store(true, Ordering::SeqCst);
        flooding.join().expect("flood");
        (on_client, on_server)
    });
    let (ok, failed) = flood.counts();
    println!(
        "upgrade connection counts: client's node upgrade {} ok / {} failed; server's node \
         upgrade {} ok / {} failed (each from the new agent's start to the old one's exit); \
         whole run {ok} ok / {failed} failed at {PER_SECOND}/s; transfers 2 x {} MiB intact",
        on_client.0,
        on_client.1,
        on_server.0,
        on_server.1,
        TRANSFER >> 20
    );
    let errors = flood.errors.lock().unwrap();
    assert_eq!(
        failed,
        0,
        "failed connections: {:?}",
        &errors[..errors.len().min(10)]
    );
    assert!(
        on_client.0 > 0 && on_server.0 > 0,
        "connections were made during both upgrades"
    );
}

/// A connection through the mesh that stays open: the whoami line read, echoing.
fn held(client: &Pod, dst: SocketAddr) -> TcpStream {
    let s = client
        .run(move || TcpStream::connect_timeout(&dst, SETTLE))
        .expect("connect");
    s.set_read_timeout(Some(SETTLE)).expect("timeout");
    let mut line = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut line)
        .expect("whoami line");
    s
}

fn echoes(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"ping");
    Ok(())
}

fn two_nodes(name: &str, grace: &str) -> (World, Pod, SocketAddr, Server, LocalAgent, LocalAgent) {
    let world = World::new(name);
    let n1 = world.node("n1");
    let n2 = world.node("n2");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n2).namespace("mesh").spawn();
    let dst = SocketAddr::new(server.ip4().into(), 8080);
    let srv = Server::start(&server, &[dst], Mode::WhoamiEcho);
    let yaml = ClusterYaml::new().ambient("mesh").pods([&client, &server]);
    let mut a1 = LocalAgent::new(&world, &n1, &ambit_bin()).arg(grace);
    let mut a2 = LocalAgent::new(&world, &n2, &ambit_bin()).arg(grace);
    yaml.write(&a1.config_dir());
    yaml.write(&a2.config_dir());
    a1.start(&world);
    a2.start(&world);
    a1.wait_enrolled(&[&client]);
    a2.wait_enrolled(&[&server]);
    (world, client, dst, srv, a1, a2)
}

#[test]
fn sigterm_stops_accepting_at_once_and_waits_for_established_connections() {
    let (_world, client, dst, _srv, mut a1, _a2) = two_nodes("upgrade-term", GRACE);
    let mut open = held(&client, dst);
    echoes(&mut open).expect("echo before");
    let stopping = a1.terminate();

    // New connections fail closed (capture stays; nobody accepts), without waiting for the drain.
    let refused = support::settled(
        || client.run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(5))),
        |r| r.is_err(),
    );
    assert!(
        refused.is_err(),
        "a new connection during the drain was accepted"
    );
    // The established one is still served, and keeps the agent draining.
    echoes(&mut open).expect("echo during the drain");
    assert!(
        matches!(stopping.try_wait(), Ok(None)),
        "the agent exited with a connection open\n{}",
        a1.log_tail()
    );
    drop(open);
    let exited = stopping
        .wait_timeout(SETTLE)
        .expect("wait")
        .unwrap_or_else(|| panic!("the agent did not exit once drained\n{}", a1.log_tail()));
    assert!(exited.success(), "exit {exited:?}");
    assert_eq!(
        log_count(&a1, "drained: every connection ended"),
        1,
        "{}",
        a1.log_tail()
    );
}

#[test]
fn past_the_grace_period_an_open_connection_is_closed_cleanly() {
    let (_world, client, dst, _srv, mut a1, _a2) = two_nodes("upgrade-grace", "--drain-grace=1s");
    let mut open = held(&client, dst);
    echoes(&mut open).expect("echo before");
    let stopping = a1.terminate();
    let exited = stopping
        .wait_timeout(SETTLE)
        .expect("wait")
        .unwrap_or_else(|| panic!("the agent did not exit after the grace\n{}", a1.log_tail()));
    assert!(exited.success(), "exit {exited:?}");
    assert_eq!(
        log_count(&a1, "drain grace period over"),
        1,
        "{}",
        a1.log_tail()
    );
    // The app sees an orderly end of stream, not a reset.
    let mut buf = [0u8; 1];
    assert_eq!(open.read(&mut buf).expect("EOF, not a reset"), 0);
}

#[test]
fn a_successor_that_goes_away_before_taking_over_leaves_the_old_agent_serving() {
    let (world, client, dst, _srv, a1, _a2) = two_nodes("upgrade-abort", GRACE);
    let late = world.pod("late").node("n1").namespace("mesh").spawn();
    let capture = ambit::ebpf::CaptureConfig {
        bpffs_root: a1.bpffs().to_path_buf(),
        cgroup: "/".into(),
        fast_path: false,
    };
    let me = ambit::app::handover::Identity {
        path: a1.handover_socket(),
        node: "n1".into(),
        pin_dir: capture.pin_dir(),
    };
    // This test plays a successor that takes the listeners and never confirms.
    let taken = ambit::app::handover::take(&me)
        .expect("take")
        .expect("the agent serves the handover socket");
    let outbound = taken
        .listeners
        .iter()
        .filter(|h| h.what.pod.as_deref() == Some("mesh/client"))
        .count();
    assert_eq!(
        outbound, 6,
        "client's 15001/15006/15008, IPv4 and IPv6: {:?}",
        taken.listeners
    );

    // Meanwhile the old agent leaves its pods as they are: a new one is not enrolled...
    let generation = a1.fresh_status()["generation"].as_u64().unwrap_or(0);
    ClusterYaml::new()
        .ambient("mesh")
        .pods([&client, &late])
        .write(&a1.config_dir());
    let s = a1.wait_for("the new config reconciled", SETTLE, |s| {
        s["generation"].as_u64() > Some(generation)
    });
    let pods: Vec<&str> = s["pods"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["pod"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        pods,
        ["mesh/client"],
        "no pod enrolled while a successor holds the listeners"
    );
    // ...and it still serves.
    let mut open = held(&client, dst);
    echoes(&mut open).expect("echo while a successor holds the listeners");

    // The successor goes away: the old agent serves on, and applies what it held back.
    drop(taken);
    a1.wait_enrolled(&[&client, &late]);
    echoes(&mut open).expect("echo after");
    let mut again = held(&client, dst);
    echoes(&mut again).expect("a new connection after");
    assert_eq!(log_count(&a1, "the successor took over"), 0);
}

/// The Services the keep-alive clients call (HTTP/1.1 and HTTP/2: served at L7 on both sides).
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 10);
const WEB2: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 11);

/// What a keep-alive client saw.
#[derive(Default)]
struct KeepAlive {
    ok: AtomicU64,
    /// HTTP/1.1 responses that said `Connection: close` (a draining agent ending keep-alive).
    closed_by_proxy: AtomicU64,
    /// Requests sent again on a new connection because the one they went on was closed before
    /// it took them: an idle HTTP/1.1 connection (the keep-alive race, which clients retry), or
    /// an HTTP/2 connection after GOAWAY (the request was never sent).
    resent: AtomicU64,
    failed: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl KeepAlive {
    fn more(&self, n: u64) {
        let from = self.ok.load(Ordering::SeqCst);
        wait_until(&format!("{n} more requests"), || {
            self.ok.load(Ordering::SeqCst) >= from + n
        });
    }
}

/// Sends GETs back to back on one keep-alive connection (HTTP/1.1, or HTTP/2 with `h2`), opening
/// a new one when the proxy ends it, as an HTTP client does.
async fn keep_alive_client(k: &KeepAlive, h2: bool) {
    use l7support::{get, Conn};
    let (dst, host) = if h2 {
        (l7support::sa(WEB2, 80), "web2")
    } else {
        (l7support::sa(WEB, 80), "web")
    };
    let open = || async move {
        if h2 {
            Conn::h2(dst).await
        } else {
            Conn::h1(dst).await
        }
    };
    let mut conn = open().await;
    let mut i = 0u64;
    while !k.stop.load(Ordering::SeqCst) {
        i += 1;
        let path = format!("/ka/{i}");
        let reply = match conn.send(host, get(&path, &[])).await {
            Ok(r) => Ok(r),
            Err(_) => {
                k.resent.fetch_add(1, Ordering::SeqCst);
                conn = open().await;
                conn.send(host, get(&path, &[])).await
            }
        };
        match reply {
            Ok(r) if r.status == 200 => {
                k.ok.fetch_add(1, Ordering::SeqCst);
                if r.header("connection").as_deref() == Some("close") {
                    k.closed_by_proxy.fetch_add(1, Ordering::SeqCst);
                    conn = open().await;
                }
            }
            Ok(r) => {
                k.failed
                    .lock()
                    .unwrap()
                    .push(format!("{host}{path}: {} {}", r.status, r.text()))
            }
            Err(e) => k.failed.lock().unwrap().push(format!("{host}{path}: {e}")),
        }
    }
}

/// Stops a client when dropped, so a failing assertion does not leave it running.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Upgrades `agent`; the old one must exit drained, long before its grace period: a keep-alive
/// connection ended by the drain leaves it nothing to serve.
fn upgrade_and_wait_drained(world: &World, agent: &mut LocalAgent, node: &str) {
    let drained = log_count(agent, "drained: every connection ended");
    let old = agent.upgrade(world);
    let exited = old.wait_timeout(SETTLE).expect("wait").unwrap_or_else(|| {
        panic!(
            "{node}: a keep-alive connection held the old agent\n{}",
            agent.log_tail()
        )
    });
    assert!(exited.success(), "{node}: exit {exited:?}");
    assert!(
        log_count(agent, "drained: every connection ended") > drained,
        "{node}"
    );
}

/// HTTP/1.1 and HTTP/2 keep-alive across the client node's upgrade, then the server node's. On
/// the server's node, the client's agent holds an HTTP/1.1 connection to the server's agent
/// (inside an HBONE stream) that the draining agent must not close while idle, or a request sent
/// at that instant fails: the client's agent lets it go on the HBONE GOAWAY instead, and the
/// draining agent answers what still comes on it with `connection: close`.
#[test]
fn keep_alive_http_moves_to_the_new_agent_without_a_failed_request() {
    raise_fd_limit();
    let world = World::new("upgrade-l7");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let ns = l7support::NS;
    let client = world
        .pod("client")
        .node(&n1)
        .namespace(ns)
        .label("app", "client")
        .spawn();
    let server = world
        .pod("server")
        .node(&n2)
        .namespace(ns)
        .label("app", "server")
        .spawn();
    let yaml = ClusterYaml::new()
        .ambient(ns)
        .pods([&client, &server])
        .service(
            "web",
            ns,
            WEB,
            &[SvcPort::named("http", 80, 8080)],
            &[&server],
            true,
        )
        .service(
            "web2",
            ns,
            WEB2,
            &[SvcPort::named("http2", 80, 8081)],
            &[&server],
            true,
        );
    let mut agents = l7support::start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        "",
        &[GRACE.to_string()],
    );
    let _web = l7support::HttpApp::start(&server, 8080);
    let _web2 = l7support::HttpApp::start(&server, 8081);
    let (h1, h2) = (KeepAlive::default(), KeepAlive::default());
    std::thread::scope(|s| {
        let _stop = (Stop(&h1.stop), Stop(&h2.stop));
        let one = s.spawn(|| client.run_async(|| keep_alive_client(&h1, false)));
        let two = s.spawn(|| client.run_async(|| keep_alive_client(&h2, true)));
        h1.more(50);
        h2.more(50);
        upgrade_and_wait_drained(&world, &mut agents[0], "client's node");
        h1.more(50);
        h2.more(50);
        upgrade_and_wait_drained(&world, &mut agents[1], "server's node");
        h1.more(50);
        h2.more(50);
        h1.stop.store(true, Ordering::SeqCst);
        h2.stop.store(true, Ordering::SeqCst);
        one.join().expect("HTTP/1.1 client");
        two.join().expect("HTTP/2 client");
    });
    for (k, what) in [
        (&h1, "HTTP/1.1 (both nodes upgraded)"),
        (&h2, "HTTP/2 (both nodes upgraded)"),
    ] {
        let failed = k.failed.lock().unwrap();
        println!(
            "keep-alive {what}: {} requests ok, {} failed; ended by the draining proxy {} times, \
             {} requests resent on a new connection",
            k.ok.load(Ordering::SeqCst),
            failed.len(),
            k.closed_by_proxy.load(Ordering::SeqCst),
            k.resent.load(Ordering::SeqCst),
        );
        assert!(
            failed.is_empty(),
            "{what}: failed requests: {:?}",
            &failed[..failed.len().min(10)]
        );
    }
}
