//! The containerd harness itself: a busybox container built in the test, started by a private
//! containerd with `ctr run --cni` through the bridge + host-local + loopback chain, has the
//! address host-local gave it, reaches the bridge's gateway, and leaves no container behind.
//! Needs root and the Debian packages containerd, runc, containernetworking-plugins,
//! busybox-static and umoci.

use std::{net::Ipv4Addr, time::Duration};

use xtask::containerd::{busybox_image, Containerd};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn busybox_container_gets_its_address_from_the_bridge_chain() {
    let ctrd = Containerd::start().expect("start containerd");
    let tarball = busybox_image(ctrd.dir()).expect("build the busybox image");
    let image = ctrd
        .import(&tarball, "ambit.test/busybox")
        .expect("import the image");
    // A subnet and bridge of this test only (other tests may run bridges of their own).
    ctrd.write_bridge_network(
        "10-test.conflist",
        "1.0.0",
        "test",
        "abtest0",
        "10.231.7.0/24",
        &[],
    )
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
    assert_eq!(ip, Ipv4Addr::new(10, 231, 7, 2), "address of eth0");
    let route = container
        .exec(&["ip", "-4", "route", "show", "default"])
        .expect("routes");
    assert!(
        route.contains("via 10.231.7.1"),
        "default route via the bridge gateway, got {route:?}"
    );
    container
        .exec(&["ping", "-c", "1", "-W", "5", "10.231.7.1"])
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
}
