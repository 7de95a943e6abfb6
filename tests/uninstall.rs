//! deploy/README.md's uninstall leaves nothing on a node: with the namespaces unlabelled first (the
//! agent unenrols every pod), the agent stopped (what `kubectl delete -k deploy/` does to its pod)
//! and `ambit uninstall` run, no pin, no attached program, no listener, no policy-routing rule or
//! route and no changed sysctl is left, in the pods' network namespaces or the node's.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use support::{
    ambit_bin, attached_links, in_pod, our_map_ids, proxy_listeners, settled, whoami, Mode, Server,
};

/// The agent's own ports in the node's netns: debug, metrics, readiness.
const AGENT_PORTS: [u16; 3] = [15000, 15020, 15021];

/// What the agent may change in a network namespace, as `ip` and /proc/sys show it.
#[derive(Debug, PartialEq, Eq)]
struct NetnsState {
    rules4: String,
    rules6: String,
    routes4: String,
    routes6: String,
    sysctls: Vec<(&'static str, String)>,
}

/// The sysctls node/transparent.rs sets in an enrolled pod's netns.
const SYSCTLS: [&str; 3] = [
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
    "/proc/sys/net/ipv6/fwmark_reflect",
];

fn in_netns(netns: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("nsenter {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}",
        netns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_state(pod: &Pod) -> NetnsState {
    let ns = pod.netns_path();
    // `ip route show table N` fails while table N does not exist: filter every table's routes.
    let table = format!("table {}", ambit_common::TRANSPARENT_ROUTE_TABLE);
    let routes = |family: &str| -> String {
        in_netns(ns, "ip", &[family, "route", "show", "table", "all"])
            .lines()
            .filter(|l| l.contains(&table))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    NetnsState {
        rules4: in_netns(ns, "ip", &["-4", "rule", "show"]),
        rules6: in_netns(ns, "ip", &["-6", "rule", "show"]),
        routes4: routes("-4"),
        routes6: routes("-6"),
        sysctls: SYSCTLS
            .iter()
            .map(|path| (*path, in_netns(ns, "cat", &[path]).trim().to_owned()))
            .collect(),
    }
}

/// Ports of `ports` something listens on in `netns` (TCP, v4 or v6).
fn listening(netns: &Path, ports: &[u16]) -> Vec<u16> {
    let mut found: Vec<u16> = in_netns(netns, "ss", &["-H", "-l", "-t", "-n"])
        .lines()
        .filter_map(|line| {
            let local = line.split_whitespace().nth(3)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .filter(|port| ports.contains(port))
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

#[test]
fn unlabel_stop_and_uninstall_leave_nothing() {
    let world = World::new("uninstall");
    let n1 = world.node("n1");
    let client = world.pod("client").node(&n1).namespace("mesh").spawn();
    let server = world.pod("server").node(&n1).namespace("mesh").spawn();
    let echo = SocketAddr::from((server.ip4(), 8080));
    let _srv = Server::start(&server, &[echo], Mode::WhoamiEcho);
    let pods = [&client, &server];
    let before: Vec<NetnsState> = pods.iter().map(|p| netns_state(p)).collect();

    let mut agent = LocalAgent::new(&world, &n1, &ambit_bin());
    ClusterYaml::new()
        .ambient("mesh")
        .pods(pods)
        .write(&agent.config_dir());
    agent.start(&world);
    agent.wait_enrolled(&pods);
    // Everything the uninstall must remove is there (else this test would prove nothing).
    let maps = our_map_ids(agent.bpffs());
    assert!(!attached_links(&maps).is_empty(), "capture attached");
    for (pod, was) in pods.iter().zip(&before) {
        assert_ne!(
            &netns_state(pod),
            was,
            "{}: enrolment changed its netns",
            pod.name()
        );
        assert!(
            !proxy_listeners(pod).is_empty(),
            "{}: proxy listeners",
            pod.name()
        );
    }
    let agent_ports = settled(
        || listening(n1.netns_path(), &AGENT_PORTS),
        |ports| ports.len() == AGENT_PORTS.len(),
    );
    assert_eq!(agent_ports, AGENT_PORTS, "the agent's own listeners");
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("captured traffic works");
    assert_eq!(peer.ip(), IpAddr::from(client.ip4()));

    // 1. `kubectl label namespace mesh istio.io/dataplane-mode-`: the agent unenrols the pods.
    ClusterYaml::new()
        .plain("mesh")
        .pods(pods)
        .write(&agent.config_dir());
    agent.wait_enrolled(&[]);
    for (pod, was) in pods.iter().zip(&before) {
        let left = settled(|| proxy_listeners(pod), |l| l.is_empty());
        assert!(
            left.is_empty(),
            "listeners left in {}: {left:?}",
            pod.name()
        );
        let now = settled(|| netns_state(pod), |s| s == was);
        assert_eq!(&now, was, "{}: unenrolment restores its netns", pod.name());
    }
    // 2. `kubectl delete -k deploy/`: the agent's pod gets SIGTERM.
    agent.stop();
    // 3. `ambit uninstall` on the node.
    let out = Command::new(ambit_bin())
        .args(["uninstall", "--bpffs"])
        .arg(agent.bpffs())
        .output()
        .expect("ambit uninstall");
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        !agent.bpffs().exists(),
        "pins left in {}",
        agent.bpffs().display()
    );
    assert!(
        attached_links(&maps).is_empty(),
        "programs left attached: {:?}",
        attached_links(&maps)
    );
    for (pod, was) in pods.iter().zip(&before) {
        assert_eq!(
            &netns_state(pod),
            was,
            "{}: its netns as it was found",
            pod.name()
        );
        assert!(proxy_listeners(pod).is_empty(), "{}: listeners", pod.name());
    }
    assert_eq!(
        listening(n1.netns_path(), &AGENT_PORTS),
        Vec::<u16>::new(),
        "the agent's listeners in the node's netns"
    );
    let (peer, _, _) = in_pod(&client, || whoami(echo)).expect("direct after uninstall");
    assert_eq!(peer.ip(), IpAddr::from(client.ip4()));
}
