//! Capture, end to end on real namespaces and real eBPF: outbound original destination, what is not
//! captured, inbound steering, exact relaying with half-close and resets.

mod support;

use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, World};
use support::{
    ambit_bin, attached_links, bpftool, cgroup_attach_spec, cgroup_link_targets, echo_transfer,
    in_pod, our_map_ids, wait_until, whoami, Mode, Server, SETTLE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn outbound_capture_recovers_the_exact_original_destination() {
    support::raise_fd_limit();
    let world = World::new("cap-origdst");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("plain").spawn();
    let dsts = vec![
        sa(server.ip4(), 8080),
        sa(server.ip4(), 9090),
        sa(server.ip4(), 443),
        sa(server.ip6(), 8080),
        sa(server.ip6(), 5201),
    ];
    let srv = Server::start(&server, &dsts, Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pod(&client)
        .pod(&server)
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client]);

    let client_ips = [IpAddr::from(client.ip4()), IpAddr::from(client.ip6())];
    let results = in_pod(&client, || async {
        let mut out = Vec::new();
        for d in &dsts {
            out.push((*d, whoami(*d).await));
        }
        out
    });
    for (dst, r) in &results {
        let (peer, local, our_peer) = r
            .as_ref()
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
        assert_eq!(
            local, dst,
            "server must be reached at exactly the address the app dialled"
        );
        assert_eq!(
            our_peer, dst,
            "getpeername() in the app must show the original destination"
        );
        assert!(
            client_ips.contains(&peer.ip()),
            "source must stay the pod's own IP, got {peer}"
        );
    }
    agent.wait_for("outbound counters", SETTLE, |s| {
        s["proxy"]["outbound_accepted"].as_u64() == Some(dsts.len() as u64)
    });
    // The kernel counters in a status are sampled apart from the (live) proxy counters, so a
    // status can show every accept and not yet every capture: wait for the kernel value itself.
    agent.wait_for("every capture counted by the kernel", SETTLE, |s| {
        s["kernel"]["out_captured"].as_u64().unwrap_or(0) >= dsts.len() as u64
    });

    // 1,000 concurrent connections, spread over the destinations, each recovers its own destination.
    const N: usize = 1000;
    let failures = in_pod(&client, || async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let d = dsts[i % dsts.len()];
            set.spawn(async move { (d, whoami(d).await) });
        }
        let mut failures = Vec::new();
        while let Some(r) = set.join_next().await {
            match r.expect("task") {
                (d, Ok((_, local, our_peer))) if local == d && our_peer == d => {}
                (d, other) => failures.push(format!("{d}: {other:?}")),
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} of {N} concurrent connections failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let status = agent.wait_for("all concurrent connections counted", SETTLE, |s| {
        s["proxy"]["outbound_accepted"].as_u64() == Some((dsts.len() + N) as u64)
    });
    assert_eq!(
        status["proxy"]["outbound_orig_dst_missing"], 0,
        "no connection lost its destination"
    );
    // The server records a connection when it closes.
    wait_until("each connection reached the server exactly once", || {
        srv.count() == dsts.len() + N
    });
    assert_eq!(srv.count(), dsts.len() + N);
}

#[test]
fn what_is_not_captured() {
    let world = World::new("cap-skip");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world.pod("server").node(&n1).namespace("plain").spawn();
    let srv = Server::start(
        &server,
        &[sa(server.ip4(), 8080), sa(server.ip4(), 7777)],
        Mode::WhoamiEcho,
    );
    // Servers inside the client pod: on loopback and on its own IP.
    let own = Server::start(
        &client,
        &[sa([127, 0, 0, 1], 7000), sa(client.ip4(), 7001)],
        Mode::WhoamiEcho,
    );
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &outsider, &server])
        .annotate(
            &client,
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "7777",
        )
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client]);

    // A non-enrolled pod is not captured.
    let (peer, _, _) =
        in_pod(&outsider, || whoami(sa(server.ip4(), 8080))).expect("outsider to server");
    assert_eq!(peer.ip(), IpAddr::from(outsider.ip4()));
    // Loopback, the pod's own IP, and an excluded port are not captured.
    in_pod(&client, || whoami(sa([127, 0, 0, 1], 7000))).expect("loopback");
    let (peer, _, _) = in_pod(&client, || whoami(sa(client.ip4(), 7001))).expect("own IP");
    assert_eq!(peer.ip(), IpAddr::from(client.ip4()));
    in_pod(&client, || whoami(sa(server.ip4(), 7777))).expect("excluded port");
    assert_eq!(
        agent.counter("proxy.outbound_accepted"),
        0,
        "none of these may reach the proxy\n{}",
        agent.log_tail()
    );
    assert_eq!(agent.counter("kernel.out_captured"), 0);
    wait_until("both in-pod connections served", || own.count() == 2);

    // UDP is untouched: a connected UDP socket reaches the server directly.
    let got = {
        let server_addr = sa(server.ip4(), 5353);
        let rx = server.run(move || {
            let s = std::net::UdpSocket::bind(server_addr).expect("udp bind");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s
        });
        client.run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
            s.connect(server_addr).expect("udp connect");
            s.send(b"ping").expect("udp send");
        });
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).expect("datagram arrives directly");
        (buf[..n].to_vec(), from)
    };
    assert_eq!(got.0, b"ping");
    assert_eq!(got.1.ip(), IpAddr::from(client.ip4()));

    // A captured connection: exactly one proxy accept, no loop through its own upstream socket.
    let (peer, local, _) = in_pod(&client, || whoami(sa(server.ip4(), 8080))).expect("captured");
    assert_eq!(
        (peer.ip(), local),
        (IpAddr::from(client.ip4()), sa(server.ip4(), 8080))
    );
    agent.wait_for("one captured connection", SETTLE, |s| {
        s["proxy"]["outbound_accepted"] == 1
    });
    // Kernel counters are sampled apart from the proxy's. Both connects (the app's, captured, and
    // the proxy's upstream one, skipped by its mark) ran before the server's answer reached the
    // app, so a status written from now on counts both; an earlier one might not (and could hide a
    // second capture).
    let s = agent.fresh_status();
    assert_eq!(
        s["kernel"]["out_captured"], 1,
        "the proxy's own upstream connect must not be captured"
    );
    assert!(
        s["kernel"]["out_skipped_mark"].as_u64().unwrap_or(0) >= 1,
        "the proxy's socket was seen and skipped by its mark"
    );
    wait_until("three connections at the server", || srv.count() == 3);
}

#[test]
fn getsockname_on_a_captured_socket_reports_the_pod_ip() {
    let world = World::new("cap-sockname");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let server = world.pod("server").node(&n1).namespace("plain").spawn();
    let (dst4, dst6) = (sa(server.ip4(), 8080), sa(server.ip6(), 8080));
    let _srv = Server::start(&server, &[dst4, dst6], Mode::WhoamiEcho);
    let (lo4, lo6) = (sa(Ipv4Addr::LOCALHOST, 7000), sa(Ipv6Addr::LOCALHOST, 7000));
    let _own = Server::start(&client, &[lo4, lo6], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&client, &outsider, &server])
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client]);

    // Captured: IPv4, IPv6, and a dual-stack IPv6 socket dialling an IPv4-mapped address.
    let mapped = |ip: Ipv4Addr| IpAddr::V6(ip.to_ipv6_mapped());
    let dst_mapped = sa(mapped(server.ip4()), 8080);
    let cases = [
        (
            dst4,
            IpAddr::from(client.ip4()),
            IpAddr::from(Ipv4Addr::LOCALHOST),
        ),
        (
            dst6,
            IpAddr::from(client.ip6()),
            IpAddr::from(Ipv6Addr::LOCALHOST),
        ),
        (
            dst_mapped,
            mapped(client.ip4()),
            mapped(Ipv4Addr::LOCALHOST),
        ),
    ];
    for (dst, pod_ip, loopback) in cases {
        let d = client
            .run(move || dial(dst))
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
        assert_eq!(
            d.local.ip(),
            pod_ip,
            "getsockname() on a captured socket to {dst} must report the pod's own IP: {d:?}"
        );
        assert!(
            d.local.port() != 0 && d.local.port() != ambit_common::OUTBOUND_PORT,
            "getsockname() must report the socket's own port: {d:?}"
        );
        assert_eq!(
            d.peer, dst,
            "getpeername() reports the original destination"
        );
        // What the kernel really holds: the socket is bound to loopback with that same port and
        // connected to the proxy, i.e. it was captured and only getsockname() was translated.
        let proxy = sa(loopback, ambit_common::OUTBOUND_PORT);
        assert!(
            d.kernel.contains(&(sa(loopback, d.local.port()), proxy)),
            "{dst}: expected the kernel to show {loopback}:{} -> {proxy}: {d:?}",
            d.local.port()
        );
    }
    agent.wait_for("the three connections captured", SETTLE, |s| {
        s["proxy"]["outbound_accepted"] == 3
    });

    // Not captured, so not translated: getsockname() says what the kernel holds. To loopback
    // from an enrolled pod, and from a pod outside the mesh.
    let uncaptured = [
        (&client, lo4, IpAddr::from(Ipv4Addr::LOCALHOST)),
        (&client, lo6, IpAddr::from(Ipv6Addr::LOCALHOST)),
        (&outsider, dst4, IpAddr::from(outsider.ip4())),
        (&outsider, dst6, IpAddr::from(outsider.ip6())),
    ];
    for (pod, dst, own_ip) in uncaptured {
        let d = pod
            .run(move || dial(dst))
            .unwrap_or_else(|e| panic!("{} to {dst}: {e}", pod.name()));
        assert_eq!(d.local.ip(), own_ip, "{} to {dst}: {d:?}", pod.name());
        assert!(
            d.kernel.contains(&(d.local, dst)),
            "{} to {dst}: getsockname() must match the kernel's own view: {d:?}",
            pod.name()
        );
    }
    assert_eq!(
        agent.counter("proxy.outbound_accepted"),
        3,
        "loopback and the outsider's connections must not reach the proxy"
    );
}

#[test]
fn restart_over_pins_of_a_version_without_getsockname_attaches_it() {
    let ClientServer {
        mut agent,
        client,
        dst,
        world,
        _srv,
        ..
    } = ClientServer::started("cap-sockname-up");
    let maps = our_map_ids(agent.bpffs());

    // What an agent without the getsockname programs leaves behind when it dies: every other
    // link, pinned. Unpinning a link nobody holds detaches it.
    agent.kill();
    let links = agent.bpffs().join(ambit_common::PIN_ABI).join("links");
    for name in ["ambit_sockname4", "ambit_sockname6"] {
        // Pinned as `<program>@cgroup-<id>`.
        let prefix = format!("{name}@");
        let pins: Vec<_> = std::fs::read_dir(&links)
            .expect("links dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        assert_eq!(pins.len(), 1, "one pinned link of {name}: {pins:?}");
        std::fs::remove_file(&pins[0])
            .unwrap_or_else(|e| panic!("remove {}: {e}", pins[0].display()));
    }
    wait_until("the getsockname links detached", || {
        attached_links(&maps).get("cgroup") == Some(&5)
    });

    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    let expected: std::collections::BTreeMap<String, usize> =
        [("cgroup".to_string(), 7), ("netns".to_string(), 1)].into();
    assert_eq!(
        attached_links(&maps),
        expected,
        "the upgraded agent adopts the old links and attaches the new ones once"
    );
    let d = client
        .run(move || dial(dst))
        .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
    assert_eq!(
        d.local.ip(),
        IpAddr::from(client.ip4()),
        "getsockname() translated after the upgrade: {d:?}"
    );
}

/// Original destinations live in socket storage (`BPF_MAP_TYPE_SK_STORAGE`), pinned like every
/// map, so a restarted agent's programs use the same map. An agent started over the pins of a
/// version that kept them in an LRU map keyed by socket cookie removes that map's pin, which no
/// program uses any more.
#[test]
fn original_destinations_live_in_pinned_socket_storage_and_the_old_cookie_map_goes() {
    let ClientServer {
        mut agent,
        client,
        dst,
        world,
        _srv,
        ..
    } = ClientServer::started("cap-sk-storage");
    let maps = agent.bpffs().join(ambit_common::PIN_ABI).join("maps");
    let storage = maps.join(ambit_common::orig_dst_sk::MAP);
    let show =
        |pin: &std::path::Path| bpftool(&["map", "show", "pinned", pin.to_str().expect("utf8")]);
    let before = show(&storage);
    assert_eq!(before["type"], "sk_storage", "{before}");
    let d = client
        .run(move || dial(dst))
        .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
    assert_eq!(
        d.peer, dst,
        "getpeername() reads the socket's storage: {d:?}"
    );

    // What an earlier version leaves pinned beside the others: its cookie-keyed LRU map.
    agent.kill();
    let legacy = maps.join(ambit_common::orig_dst_sk::LEGACY_COOKIE_MAP);
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&legacy)
        .args([
            "type", "lru_hash", "key", "8", "value", "32", "entries", "64",
        ])
        .args(["name", "AMBIT_ORIG_DST_C"])
        .status()
        .expect("bpftool map create");
    assert!(created.success(), "bpftool map create: {created}");

    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    assert!(
        !legacy.exists(),
        "the earlier version's map pin is removed: {}",
        legacy.display()
    );
    assert_eq!(
        show(&storage)["id"],
        before["id"],
        "the restarted agent's programs use the pinned storage map"
    );
    let d = client
        .run(move || dial(dst))
        .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
    assert_eq!(d.peer, dst, "getpeername() after the restart: {d:?}");
}

/// The capture programs attach where the pods are (the kubelet's `kubepods`; here the node's
/// cgroup, which holds its pods' cgroups) and run only for processes under it. An agent upgraded
/// from one attached at the root moves its links there, new one pinned before old one unpinned.
#[test]
fn programs_attach_at_the_pods_parent_cgroup_and_an_upgrade_moves_them_there() {
    use std::os::unix::fs::MetadataExt as _;
    let ClientServer {
        mut agent,
        client,
        dst,
        n1,
        world,
        _srv,
        ..
    } = ClientServer::new("cap-attach");
    let cgroup_id = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .ino()
    };
    let (root_id, node_id) = (cgroup_id(world.cgroup_root()), cgroup_id(n1.cgroup()));
    agent.set_cgroup_attach("/");
    agent.start(&world);
    agent.wait_enrolled(&[&client]);
    let maps = our_map_ids(agent.bpffs());
    assert_eq!(cgroup_link_targets(&maps), vec![root_id; 7], "at the root");

    // The same node, its agent upgraded to attach at the node's cgroup.
    agent.set_cgroup_attach(&cgroup_attach_spec(&world, &n1));
    let old = agent.upgrade(&world);
    let exited = old
        .wait_timeout(SETTLE)
        .expect("wait")
        .unwrap_or_else(|| panic!("the old agent did not exit\n{}", agent.log_tail()));
    assert!(exited.success(), "old agent: {exited:?}");
    agent.wait_enrolled(&[&client]);
    // An unpinned link is released by the kernel's workqueue, not at once.
    wait_until("the links at the root released", || {
        cgroup_link_targets(&maps) == vec![node_id; 7]
    });
    assert_eq!(
        cgroup_link_targets(&maps),
        vec![node_id; 7],
        "every link moved to the node's cgroup, none left at the root\n{}",
        agent.log_tail()
    );

    // A process of the pod (in its cgroup, under the node's) is captured...
    let accepted = agent.counter("proxy.outbound_accepted");
    let out = client
        .command("timeout")
        .args([
            "20",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{}/{}; head -n1 <&3", dst.ip(), dst.port()),
        ])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash in the pod: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for("the pod process's connection captured", SETTLE, |s| {
        s["proxy"]["outbound_accepted"].as_u64() == Some(accepted + 1)
    });
    // ...and a thread of this test in the pod's netns, but in the test's cgroup, is not: the
    // programs no longer run at the root. The proxy counts an accept before it dials, so a
    // captured connection would be counted by the time the server's line arrived.
    let (_, local, _) = in_pod(&client, || whoami(dst)).unwrap_or_else(|e| panic!("{dst}: {e}"));
    assert_eq!(local, dst);
    assert_eq!(
        agent.counter("proxy.outbound_accepted"),
        accepted + 1,
        "a process outside the attach cgroup must not reach the proxy"
    );
}

/// A bad `--cgroup-attach` is a configuration error naming the flag (exit 64), never an attach
/// somewhere unintended.
#[test]
fn a_bad_cgroup_attach_is_refused_naming_the_flag() {
    for bad in ["../escape", "no-such-cgroup-ambit-test"] {
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(ambit_bin())
            .args([
                "run",
                "--node",
                "n1",
                "--config",
                "/nonexistent-ambit-config",
            ])
            .args(["--cgroup-attach", bad])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ambit");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(
            stderr.contains(&format!("--cgroup-attach (AMBIT_CGROUP_ATTACH) {bad:?}")),
            "{bad}: {stderr}"
        );
    }
}

/// One node with a meshed client pod, a plain server pod answering [`Mode::WhoamiEcho`] on `dst`,
/// and the node's agent configured for both, not started. Fields drop in order: agent first,
/// world last.
struct ClientServer {
    agent: LocalAgent,
    _srv: Server,
    dst: SocketAddr,
    client: ambit::harness::Pod,
    n1: ambit::harness::Node,
    world: World,
}

impl ClientServer {
    /// As [`ClientServer::new`], with the agent started and the client enrolled.
    fn started(test: &str) -> ClientServer {
        let mut cs = ClientServer::new(test);
        cs.agent.start(&cs.world);
        cs.agent.wait_enrolled(&[&cs.client]);
        cs
    }

    fn new(test: &str) -> ClientServer {
        let world = World::new(test);
        let n1 = world.node("n1");
        let client = world.pod("client").node(&n1).namespace("mesh").spawn();
        let server = world.pod("server").node(&n1).namespace("plain").spawn();
        let dst = sa(server.ip4(), 8080);
        let srv = Server::start(&server, &[dst], Mode::WhoamiEcho);
        let agent = LocalAgent::new(&world, &n1, &ambit_bin());
        ClusterYaml::new()
            .ambient("mesh")
            .plain("plain")
            .pods([&client, &server])
            .write(&agent.config_dir());
        ClientServer {
            agent,
            _srv: srv,
            dst,
            client,
            n1,
            world,
        }
    }
}

/// What an app sees of one connection, and what the kernel holds.
#[derive(Debug)]
struct Dialled {
    /// `getsockname()`.
    local: SocketAddr,
    /// `getpeername()`.
    peer: SocketAddr,
    /// (local, remote) of every TCP socket in the netns with the same local port, as
    /// /proc/thread-self/net/tcp{,6} list them: not subject to the getsockname hooks.
    kernel: Vec<(SocketAddr, SocketAddr)>,
}

/// Connects from the current thread's netns (an IPv6 socket is dual-stack) and reads the server's
/// greeting line, so the connection is known to work end to end.
fn dial(dst: SocketAddr) -> std::io::Result<Dialled> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    if dst.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_read_timeout(Some(SETTLE))?;
    socket.connect_timeout(&dst.into(), SETTLE)?;
    let stream = std::net::TcpStream::from(socket);
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    let kernel = kernel_sockets(local.port())?;
    let mut line = String::new();
    std::io::BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::other("closed before the greeting"));
    }
    Ok(Dialled {
        local,
        peer,
        kernel,
    })
}

/// (local, remote) of the TCP sockets in this thread's netns whose local port is `port`.
fn kernel_sockets(port: u16) -> std::io::Result<Vec<(SocketAddr, SocketAddr)>> {
    let mut out = Vec::new();
    for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = std::fs::read_to_string(file)?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(l), Some(r)) = (cols.get(1), cols.get(2)) else {
                continue;
            };
            let (local, remote) = (proc_addr(l)?, proc_addr(r)?);
            if local.port() == port {
                out.push((local, remote));
            }
        }
    }
    Ok(out)
}

/// `0100007F:1F90` or 32 hex digits and a port: the kernel prints each 32-bit word of the
/// network-order address as a native-endian number.
fn proc_addr(s: &str) -> std::io::Result<SocketAddr> {
    let bad = || std::io::Error::other(format!("bad address {s:?} in /proc/net/tcp"));
    let (ip, port) = s.split_once(':').ok_or_else(bad)?;
    let port = u16::from_str_radix(port, 16).map_err(|_| bad())?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = ip
            .get(i..i + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .ok_or_else(bad)?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).map_err(|_| bad())?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).map_err(|_| bad())?),
        _ => return Err(bad()),
    };
    Ok(SocketAddr::new(ip, port))
}

#[test]
fn inbound_capture_steers_any_port_to_the_proxy() {
    let world = World::new("cap-inbound");
    let n1 = world.node("n1");
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let outsider = world.pod("outsider").node(&n1).namespace("plain").spawn();
    let ports = [8080u16, 31337];
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|p| [sa(server.ip4(), *p), sa(server.ip6(), *p)])
        .collect();
    let srv = Server::start(&server, &addrs, Mode::WhoamiEcho);
    let excluded = sa(server.ip4(), 7070);
    let _srv_excluded = Server::start(&server, &[excluded], Mode::WhoamiEcho);
    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods([&server, &outsider])
        .annotate(
            &server,
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "7070",
        )
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&server]);

    // An excluded inbound port is reached directly.
    let (peer, _, _) = in_pod(&outsider, || whoami(excluded)).expect("excluded inbound port");
    assert_eq!(
        peer.ip(),
        IpAddr::from(outsider.ip4()),
        "excluded port must not be captured"
    );
    assert_eq!(agent.counter("proxy.inbound_accepted"), 0);

    let outsider_ips = [IpAddr::from(outsider.ip4()), IpAddr::from(outsider.ip6())];
    for dst in &addrs {
        let (peer, local, _) = in_pod(&outsider, || whoami(*dst))
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", agent.log_tail()));
        assert_eq!(
            local, *dst,
            "the app is reached at the original destination"
        );
        // The proxy reaches the app from the client's address, as Istio's data plane does; the
        // count below proves each connection went through it.
        assert!(
            outsider_ips.contains(&peer.ip()),
            "expected the client's address as peer, got {peer}"
        );
    }
    agent.wait_for("inbound counted", SETTLE, |s| {
        s["proxy"]["inbound_accepted"] == addrs.len() as u64
    });

    // The node's own address (kubelet probes) is exempt: it reaches the app directly.
    let (peer, _, _) = n1
        .run_async(|| whoami(sa(server.ip4(), 8080)))
        .expect("node to pod");
    assert_eq!(
        peer.ip(),
        IpAddr::from(n1.gateway4()),
        "node traffic is not captured"
    );
    assert_eq!(agent.counter("proxy.inbound_accepted"), addrs.len() as u64);

    // 15008 is a normal listener, never steered to 15006; plaintext there is refused by TLS
    // (at most a TLS alert comes back, never the app's answer).
    let r = in_pod(&outsider, || async {
        let mut s = TcpStream::connect(sa(server.ip4(), 15008)).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.map(|_| got)
    });
    if let Ok(got) = &r {
        assert!(
            got.is_empty() || got[0] == 0x15,
            "HBONE port answered plaintext with something other than a TLS alert: {got:?}"
        );
    }
    agent.wait_for("HBONE port reached directly", SETTLE, |s| {
        s["proxy"]["hbone_tls_refused"] == 1
    });
    assert_eq!(agent.counter("proxy.inbound_accepted"), addrs.len() as u64);

    // A port where the app does not listen ends in a reset, as it would without a proxy.
    let r = in_pod(&outsider, || async {
        let mut s = TcpStream::connect(sa(server.ip4(), 8081)).await?;
        let mut b = [0u8; 1];
        s.read(&mut b).await
    });
    let e = r.expect_err("a closed port must not look like a clean close");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
        ),
        "expected a reset, got {e:?}"
    );
    wait_until("every inbound connection served", || {
        srv.count() == addrs.len() + 1
    });
}

#[test]
fn relay_is_exact_and_propagates_half_close_and_reset() {
    relay_case(false);
}

#[test]
fn relay_with_sk_msg_fast_path_is_exact_and_propagates_half_close_and_reset() {
    relay_case(true);
}

fn relay_case(fast_path: bool) {
    let world = World::new(if fast_path {
        "cap-relay-fp"
    } else {
        "cap-relay"
    });
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = sa(server.ip4(), 8080);
    let rst = sa(server.ip4(), 8081);
    let halfclose = sa(server.ip4(), 8082);
    let s_echo = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let s_rst = Server::start(&server, &[rst], Mode::HelloThenReset);
    let s_half = Server::start(&server, &[halfclose], Mode::GreetThenHalfClose);
    let mut agent =
        LocalAgent::new(&world, &n1, &ambit_bin()).arg(&format!("--fast-path={fast_path}"));
    ClusterYaml::new()
        .ambient("mesh")
        .pods([&client, &server])
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server]);

    // 256 MiB each way through both the client's outbound and the server's inbound relay.
    const TOTAL: u64 = 256 << 20;
    let (sent_hash, recv_hash, recv_len) = in_pod(&client, || echo_transfer(echo, TOTAL, None));
    assert_eq!(recv_len, TOTAL, "every byte came back");
    assert_eq!(sent_hash, recv_hash, "bytes relayed exactly");
    wait_until("bulk connection closed at the server", || {
        s_echo.count() == 1
    });
    let seen = s_echo.seen();
    assert_eq!(seen[0].received, TOTAL);
    // Both pods are in the mesh: the bulk transfer went through an HBONE tunnel, so half-close
    // and reset below are checked through it.
    assert!(agent.counter("proxy.outbound_hbone") >= 1);
    assert!(
        !seen[0].reset,
        "client half-close arrived as EOF, not a reset"
    );

    // The server half-closes first; the client can still send and the server receives it.
    in_pod(&client, || async move {
        let mut s = TcpStream::connect(halfclose).await.expect("connect");
        let mut greeting = String::new();
        s.read_to_string(&mut greeting)
            .await
            .expect("read until the server's FIN");
        assert_eq!(greeting, "bye\n");
        s.write_all(b"still talking")
            .await
            .expect("write after peer FIN");
        s.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    wait_until("server received after its half-close", || {
        s_half.seen().first().map(|s| s.received) == Some(13)
    });

    // A reset from the server reaches the client as a reset.
    let r = in_pod(&client, || async move {
        let mut s = TcpStream::connect(rst).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map(|_| buf)
    });
    let e = r.expect_err("server reset must not look like a clean close");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");
    wait_until("reset server saw one connection", || s_rst.count() == 1);

    // A reset from the client reaches the server as a reset.
    in_pod(&client, || async move {
        let mut s = TcpStream::connect(echo).await.expect("connect");
        let mut line = [0u8; 8];
        let _ = s.read(&mut line).await;
        s.write_all(b"x").await.expect("write");
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.expect("echo");
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
    });
    wait_until("server saw the client's reset", || {
        s_echo.seen().get(1).map(|s| s.reset) == Some(true)
    });

    // Each captured connection put its two loopback ends in the fast path only when it is on; the
    // bulk transfer's first messages each way went through sk_msg redirects, and past the
    // redirect limit (`fast_path_sent::LIMIT`) both its directions moved to loopback TCP.
    let s = agent.fresh_status();
    let (sockets, redirects, to_tcp) = (
        s["kernel"]["fast_path_sockets"].as_u64().unwrap_or(0),
        s["kernel"]["fast_path_redirects"].as_u64().unwrap_or(0),
        s["kernel"]["fast_path_to_tcp"].as_u64().unwrap_or(0),
    );
    if fast_path {
        assert_eq!(sockets, 8, "4 captured connections x 2 ends: {s}");
        assert!(redirects > 0, "the transfer went through sk_msg: {s}");
        assert!(
            to_tcp >= 2,
            "the 256 MiB echo moved to TCP both ways past the limit: {s}"
        );
    } else {
        assert_eq!(
            (sockets, redirects, to_tcp),
            (0, 0, 0),
            "fast path off: {s}"
        );
    }
}
