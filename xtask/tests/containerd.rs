//! The containerd harness itself: a busybox container built in the test, started by a private
//! containerd with `ctr run --cni` through the bridge + host-local + loopback chain, has the
//! address host-local gave it on a network reserved for this harness, reaches the bridge's
//! gateway, and leaves no container behind; the dropped harness leaves no process, bridge,
//! cgroup or directory.
//! Needs root and the Debian packages containerd, runc, containernetworking-plugins,
//! busybox-static and umoci.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use xtask::containerd::{busybox_image, Containerd};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn busybox_container_gets_its_address_from_the_bridge_chain() {
    let ctrd = Containerd::start().expect("start containerd");
    let tarball = busybox_image(ctrd.dir()).expect("build the busybox image");
    let image = ctrd
        .import(&tarball, "ambit.test/busybox")
        .expect("import the image");
    // A subnet and bridge of this harness only: other tests, here or in another checkout's
    // run, have bridges of their own.
    let net = ctrd.reserve_network().expect("reserve a network");
    let other = ctrd.reserve_network().expect("reserve a second network");
    assert_ne!(
        net.subnet(),
        other.subnet(),
        "two reservations, two subnets"
    );
    assert_ne!(net.bridge, other.bridge, "two reservations, two bridges");
    ctrd.write_reserved_network("10-test.conflist", "1.0.0", "test", &net, &[])
        .expect("write the network config");

    let mut container = ctrd
        .container("c1", &image)
        .cni()
        .args(["sh", "-c", "echo started; exec sleep 600"])
        .start()
        .expect("start the container");
    container.wait_running(WAIT).expect("container runs");
    container
        .wait_stdout("started", WAIT)
        .expect("container prints");

    // host-local hands out the first address after the gateway (.1, the bridge's).
    let ip = container.ipv4().expect("container address");
    assert_eq!(ip, net.host(2), "address of eth0");
    let route = container
        .exec(&["ip", "-4", "route", "show", "default"])
        .expect("routes");
    assert!(
        route.contains(&format!("via {}", net.host(1))),
        "default route via the bridge gateway, got {route:?}"
    );
    container
        .exec(&["ping", "-c", "1", "-W", "5", &net.host(1).to_string()])
        .expect("the container reaches its gateway");

    let exit = container.stop().expect("stop the container");
    assert!(
        !exit.status.success(),
        "a killed container's ctr run reports the kill, got {exit:?}"
    );
    assert_eq!(
        ctrd.containers().expect("list containers"),
        Vec::<String>::new(),
        "ctr run --rm removed the container"
    );
    // CNI DEL ran: host-local released the lease (only its `lock` and `last_reserved_ip` stay).
    let leases = std::fs::read_dir(ctrd.cni_cache_dir().join("networks/test"))
        .expect("host-local's data dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.parse::<Ipv4Addr>().is_ok())
        .collect::<Vec<_>>();
    assert_eq!(leases, Vec::<String>::new(), "leases after DEL");

    // Dropping the harness leaves nothing on the host: no daemon or shim on its socket, no
    // bridge, no cgroup, no directory.
    let dir = ctrd.dir().to_owned();
    let socket = ctrd.socket().to_owned();
    let cgroup = ctrd.cgroup_v2_dir().expect("the harness's cgroup");
    drop(ctrd);
    assert!(!dir.exists(), "{} left", dir.display());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    let bridge = std::process::Command::new("ip")
        .args(["link", "show", &net.bridge])
        .output()
        .expect("ip link show");
    assert!(!bridge.status.success(), "bridge {} left", net.bridge);
    assert_eq!(
        processes_naming(&socket),
        Vec::<String>::new(),
        "processes left"
    );
}

/// The command lines of the processes that have `path` as an argument.
fn processes_naming(path: &Path) -> Vec<String> {
    let needle = path.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == needle))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .collect()
}
