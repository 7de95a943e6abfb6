//! Tests of the harness itself, against the real kernel: they need root, iproute2, nsenter and
//! cgroup v2. Every test builds its own world, so they run in parallel.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sweep::{self, remove_world, BPFFS};
use super::{cgroup, cgroup_root, leftovers, netns_inode, Pod, World, NETNS_DIR, STATE_DIR};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends "ping!" from `client` to a listener in `server` and checks the reply and that the server
/// saw the client's own pod address.
fn roundtrip(client: &Pod, server: &Pod, v6: bool) {
    let (server_ip, client_ip): (IpAddr, IpAddr) = if v6 {
        (server.ip6().into(), client.ip6().into())
    } else {
        (server.ip4().into(), client.ip4().into())
    };
    let listener = server.run(|| TcpListener::bind((server_ip, 0)).expect("bind in server pod"));
    let addr = listener.local_addr().unwrap();
    let (reply, peer) = client.run(|| {
        let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("{} -> {addr}: {e}", client.name()));
        // The handshake is done, so accept() returns at once even on this thread.
        let (mut accepted, peer) = listener.accept().expect("accept");
        conn.write_all(b"ping!").unwrap();
        let mut buf = [0u8; 5];
        accepted.read_exact(&mut buf).unwrap();
        accepted.write_all(&buf).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.read_exact(&mut buf).unwrap();
        (buf, peer)
    });
    assert_eq!(&reply, b"ping!", "{} -> {addr}", client.name());
    assert_eq!(
        peer.ip(),
        client_ip,
        "{} -> {addr}: source must be the pod address",
        client.name()
    );
}

/// Polls `f` until it returns Some or `TIMEOUT` passes.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_clean(prefix: &str) {
    let left = leftovers(prefix);
    assert!(left.is_empty(), "world {prefix} left {left:?}");
}

#[test]
fn pods_reach_each_other_over_v4_and_v6_on_one_and_two_nodes() {
    let world = World::new("pods_reach_each_other");
    let n1 = world.node("n1");
    let n2 = world.node("n2");
    let a1 = world.pod("a1").node(&n1).spawn();
    let a2 = world.pod("a2").node(&n1).spawn();
    let b1 = world.pod("b1").node(&n2).spawn();
    let b2 = world.pod("b2").node("n2").namespace("other").spawn();

    assert_eq!(a1.ip4().to_string(), "10.244.1.10");
    assert_eq!(a2.ip6().to_string(), "fd00:244:1::11");
    assert_eq!(b2.ip4().to_string(), "10.244.2.11");
    assert_eq!((b2.namespace(), b2.node_name()), ("other", "n2"));
    assert_eq!(a1.netns_path(), Path::new(NETNS_DIR).join(a1.netns_name()));
    assert!(a1.cgroup().starts_with(n1.cgroup()) && a1.cgroup().is_dir());

    for v6 in [false, true] {
        roundtrip(&a1, &a2, v6); // same node
        roundtrip(&a1, &b1, v6); // across nodes
        roundtrip(&b2, &a2, v6);
    }

    // Sockets made by a future on run_async live in the pod too.
    let listener = b1.run(|| TcpListener::bind((b1.ip4(), 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let local = a1.run_async(|| async move {
        let conn = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        conn.expect("connect timed out")
            .expect("connect")
            .local_addr()
            .unwrap()
    });
    assert_eq!(local.ip(), IpAddr::from(a1.ip4()));

    // A node reaches the other node's address, and its own pods.
    let node_listener = n2.run(|| TcpListener::bind((n2.ip6(), 0)).unwrap());
    let node_addr = node_listener.local_addr().unwrap();
    n1.run(|| TcpStream::connect_timeout(&node_addr, TIMEOUT).expect("n1 -> n2 node address"));
    let pod_listener = a1.run(|| TcpListener::bind((a1.ip4(), 0)).unwrap());
    let pod_addr = pod_listener.local_addr().unwrap();
    n1.run(|| TcpStream::connect_timeout(&pod_addr, TIMEOUT).expect("n1 -> own pod"));

    // Nothing leaves the world: nodes have no default route (checked without sending anything).
    let route = Command::new("ip")
        .args(["-n", n1.netns_name(), "route", "get", "192.0.2.1"])
        .output()
        .unwrap();
    assert!(
        !route.status.success(),
        "node n1 has a route out of the world"
    );
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<World>();
    check::<super::Node>();
    check::<Pod>();
    check::<super::Process>();
}

#[test]
fn fixed_addresses_inside_and_outside_the_node_subnet() {
    let world = World::new("fixed_addresses");
    let client = world.pod("client").node("n1").spawn();
    let inside = world.pod("inside").node("n2").ip4([10, 244, 2, 77]).spawn();
    let outside = world
        .pod("outside")
        .node("n2")
        .ip4([10, 99, 0, 7])
        .ip6("fd00:99::7".parse::<std::net::Ipv6Addr>().unwrap())
        .spawn();
    // Auto addresses skip the fixed ones and still pair v4 with v6.
    let auto = world.pod("auto").node("n2").spawn();
    assert_eq!(inside.ip4().to_string(), "10.244.2.77");
    assert_eq!(inside.ip6().to_string(), "fd00:244:2::10");
    assert_eq!(auto.ip4().to_string(), "10.244.2.11");
    for v6 in [false, true] {
        roundtrip(&client, &inside, v6);
        roundtrip(&client, &outside, v6);
        roundtrip(&outside, &auto, v6);
    }
    // A node added later gets routes to the off-subnet pod as well.
    let late = world.pod("late").node("n3").spawn();
    roundtrip(&late, &outside, false);
    roundtrip(&late, &outside, true);
    let taken = world.pod("dup").ip4([10, 99, 0, 7]).try_spawn();
    assert!(taken.is_err(), "address reuse must fail");
}

#[test]
fn drop_removes_netns_cgroups_bpffs_and_state() {
    let world = World::new("drop_removes");
    let prefix = world.prefix().to_owned();
    let n1 = world.node("n1");
    world.node("n2");
    let pod = world.pod("p").node(&n1).spawn();
    let pins = world.bpffs_dir();
    std::fs::create_dir(pins.join("v1")).unwrap();
    std::fs::write(pins.join("v1").join("not-a-pin"), b"x").ok();
    let sleeper = pod.spawn(pod.command("sleep").arg("1000"));
    // Also an untracked process: the cgroup kill must still get it.
    let mut untracked = pod.command("sleep").arg("1000").spawn().unwrap();
    let procs = pod.cgroup().join("cgroup.procs");
    eventually("untracked process to join the pod cgroup", || {
        let procs = std::fs::read_to_string(&procs).unwrap();
        procs
            .lines()
            .any(|l| l == untracked.id().to_string())
            .then_some(())
    });

    let present = leftovers(&prefix);
    for expected in [
        Path::new(NETNS_DIR).join(format!("{prefix}-n1")),
        Path::new(NETNS_DIR).join(format!("{prefix}-n2")),
        Path::new(NETNS_DIR).join(format!("{prefix}-p")),
        cgroup_root().unwrap().join(format!("{prefix}-n1")),
        Path::new(BPFFS).join(&prefix),
        Path::new(STATE_DIR).join(&prefix),
    ] {
        assert!(
            present.contains(&expected),
            "{expected:?} missing from {present:?}"
        );
    }

    world.teardown();
    assert_clean(&prefix);
    assert!(
        sleeper.try_wait().unwrap().is_some(),
        "tracked process survived teardown"
    );
    let status = eventually("untracked process to die", || untracked.try_wait().unwrap());
    assert!(!status.success());
}

#[test]
fn panic_in_a_test_still_tears_down() {
    let prefix = Mutex::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let world = World::new("panic_tears_down");
        *prefix.lock().unwrap() = Some(world.prefix().to_owned());
        let pod = world.pod("p").spawn();
        world.bpffs_dir();
        pod.spawn(pod.command("sleep").arg("1000"));
        // A panic inside pod.run reaches the caller.
        let inner = catch_unwind(AssertUnwindSafe(|| pod.run(|| panic!("inside the pod"))));
        assert!(inner.is_err());
        panic!("test failure while the world is alive");
    }));
    assert!(result.is_err());
    let prefix = prefix.lock().unwrap().clone().expect("world was created");
    assert_clean(&prefix);
}

/// Removes a fake world even if the test fails half way.
struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_world(&self.0);
    }
}

#[test]
fn sweeper_removes_leftovers_of_dead_processes() {
    // Let this process's one automatic sweep finish first, so it does not race the setup below.
    sweep::sweep_once();
    // pid_max is at most 2^22, so pid 999999999 is never alive; our own pid makes the name unique.
    let prefix = format!("ambt-999999999-{}", std::process::id());
    let _cleanup = Cleanup(prefix.clone());
    let ns = format!("{prefix}-x");
    let status = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(status.success());
    let cg = cgroup_root().unwrap().join(&ns);
    std::fs::create_dir_all(cg.join("pod")).unwrap();
    std::fs::create_dir_all(Path::new(STATE_DIR).join(&prefix)).unwrap();
    let mut orphan = cgroup::command(&cg.join("pod"), &Path::new(NETNS_DIR).join(&ns), "sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let procs = cg.join("pod").join("cgroup.procs");
    eventually("orphan to join its cgroup", || {
        let procs = std::fs::read_to_string(&procs).unwrap();
        procs
            .lines()
            .any(|l| l == orphan.id().to_string())
            .then_some(())
    });
    assert_eq!(leftovers(&prefix).len(), 3, "{:?}", leftovers(&prefix));

    let swept = sweep::sweep();
    assert!(swept.contains(&prefix), "swept {swept:?}");
    assert_clean(&prefix);
    eventually("orphan to be killed", || orphan.try_wait().unwrap());
}

#[test]
fn command_runs_in_the_pod_cgroup_and_netns() {
    let world = World::new("command_in_pod");
    let pod = world.pod("cmd").spawn();
    let node = pod.node();
    for (what, cmd, cgroup, netns) in [
        ("pod", pod.command("sleep"), pod.cgroup(), pod.netns_path()),
        (
            "node",
            node.command("sleep"),
            node.cgroup(),
            node.netns_path(),
        ),
    ] {
        let mut cmd = cmd;
        let process = world.spawn(cmd.arg("1000"));
        let pid = process.id();
        // sh joins the cgroup, execs nsenter, which execs sleep: wait for the last step.
        eventually("exec of sleep", || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "sleep").then_some(())
        });
        let proc_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let v2 = proc_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap();
        let want = format!(
            "/{}",
            cgroup
                .strip_prefix(cgroup_root().unwrap())
                .unwrap()
                .display()
        );
        assert_eq!(v2, want, "{what} cgroup");
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let want = format!("net:[{}]", netns_inode(netns).unwrap());
        assert_eq!(ns.to_string_lossy(), want, "{what} netns");
        if what == "pod" {
            assert_eq!(v2, pod.cgroup_proc_path());
        }
        process.kill();
        assert!(process.try_wait().unwrap().is_some());
    }
    // The command sees the pod's interfaces: eth0 with the pod address.
    let out = world
        .spawn(
            pod.command("ip")
                .args(["-o", "addr", "show", "dev", "eth0"])
                .stdout(std::process::Stdio::piped()),
        )
        .take_stdout()
        .map(|mut s| {
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
        .unwrap();
    assert!(out.contains(&pod.ip4().to_string()), "{out}");
}
