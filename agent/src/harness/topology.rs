//! The address plan and the `ip` commands that wire nodes and pods together.
//!
//! Node k (1-based) has bridge `br0` with 10.244.k.1/24 and fd00:244:k::1/64, and node address
//! 172.30.0.k / fd00:30::k. Pod host h gets 10.244.k.h and fd00:244:k::h. In IPv6 addresses the
//! decimal digits of k and h are written as hex digits, so fd00:244:1::10 pairs with 10.244.1.10.
//! Nodes are joined pairwise by veths named `node<j>` with no subnet: each end carries its own node
//! address and a /32 (/128) route to the peer's, and pod subnets are routed via node addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use super::{cmd::ip_in, netns, HarnessError};

/// The bridge every pod of a node plugs into.
pub(crate) const BRIDGE: &str = "br0";
/// The pod's end of its veth.
pub(crate) const POD_IFACE: &str = "eth0";

/// Fresh namespaces reset IPv6 settings to defaults: make v6 usable at once (no DAD wait).
const COMMON_SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv6/conf/all/disable_ipv6", "0"),
    ("net/ipv6/conf/default/disable_ipv6", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
];
const NODE_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// Reads the decimal digits of `n` as hex, so that v6 addresses look like their v4 twins.
fn dec_as_hex(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).unwrap_or(0)
}

pub(crate) fn node_ip4(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, k)
}
pub(crate) fn node_ip6(k: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, dec_as_hex(k))
}
pub(crate) fn pod_ip4(k: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k, host)
}
pub(crate) fn pod_ip6(k: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, dec_as_hex(k), 0, 0, 0, 0, dec_as_hex(host))
}
/// The pod subnet of node k: (network, prefix length).
pub(crate) fn pod_cidr4(k: u8) -> (Ipv4Addr, u8) {
    (pod_ip4(k, 0), 24)
}
pub(crate) fn pod_cidr6(k: u8) -> (Ipv6Addr, u8) {
    (pod_ip6(k, 0), 64)
}

/// Whether `ip` lies in node k's pod subnet (else it is routed as a /32 or /128).
pub(crate) fn on_subnet(k: u8, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.octets()[..3] == pod_cidr4(k).0.octets()[..3],
        IpAddr::V6(ip) => ip.segments()[..4] == pod_cidr6(k).0.segments()[..4],
    }
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Sets up a fresh node netns: sysctls, lo with the node address, and the bridge.
pub(crate) fn setup_node(ns: &str, path: &Path, k: u8) -> Result<(), HarnessError> {
    let mut sysctls = COMMON_SYSCTLS.to_vec();
    sysctls.extend(NODE_SYSCTLS);
    netns::set_sysctls(path, &sysctls)?;
    let ip4 = format!("{}/32", node_ip4(k));
    let ip6 = format!("{}/128", node_ip6(k));
    let gw4 = format!("{}/24", pod_ip4(k, 1));
    let gw6 = format!("{}/64", pod_ip6(k, 1));
    // A fixed bridge MAC: otherwise the bridge takes the lowest port MAC, which changes as pods
    // join and leaves stale neighbour entries in the pods.
    let mac = format!("02:a0:00:00:{k:02x}:01");
    ip_in(ns, &["link", "set", "lo", "up"])?;
    ip_in(ns, &["addr", "add", &ip4, "dev", "lo"])?;
    ip_in(ns, &["addr", "add", &ip6, "dev", "lo", "nodad"])?;
    // No multicast snooping: with no MLD querier it can starve neighbour discovery.
    ip_in(
        ns,
        &["link", "add", BRIDGE, "address", &mac, "type", "bridge"],
    )?;
    ip_in(
        ns,
        &[
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ],
    )?;
    ip_in(ns, &["addr", "add", &gw4, "dev", BRIDGE])?;
    ip_in(ns, &["addr", "add", &gw6, "dev", BRIDGE, "nodad"])?;
    ip_in(ns, &["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Joins nodes a and b with a veth and routes each one's pod subnets to the other.
pub(crate) fn link_nodes(a: (&str, u8), b: (&str, u8)) -> Result<(), HarnessError> {
    let (ns_a, ka) = a;
    let (ns_b, kb) = b;
    let dev_a = format!("node{kb}");
    let dev_b = format!("node{ka}");
    ip_in(
        ns_a,
        &[
            "link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b, "netns", ns_b,
        ],
    )?;
    for (ns, dev, me, peer) in [(ns_a, &dev_a, ka, kb), (ns_b, &dev_b, kb, ka)] {
        // IPv6 answers neighbour solicitations only for addresses on the receiving device, so the
        // node address goes on each link too (IPv4 answers for any local address).
        let me6 = format!("{}/128", node_ip6(me));
        ip_in(ns, &["addr", "add", &me6, "dev", dev, "nodad"])?;
        ip_in(ns, &["link", "set", dev, "up"])?;
        let peer4 = format!("{}/32", node_ip4(peer));
        let peer6 = format!("{}/128", node_ip6(peer));
        let me4 = node_ip4(me).to_string();
        let me6 = node_ip6(me).to_string();
        ip_in(ns, &["route", "add", &peer4, "dev", dev, "src", &me4])?;
        ip_in(ns, &["-6", "route", "add", &peer6, "dev", dev, "src", &me6])?;
        let (net4, len4) = pod_cidr4(peer);
        let (net6, len6) = pod_cidr6(peer);
        route_via(ns, &format!("{net4}/{len4}"), peer)?;
        route_via(ns, &format!("{net6}/{len6}"), peer)?;
    }
    Ok(())
}

/// On a node, routes `dest` (a CIDR) to node `via`.
fn route_via(ns: &str, dest: &str, via: u8) -> Result<(), HarnessError> {
    let (family, gw) = if dest.contains(':') {
        ("-6", node_ip6(via).to_string())
    } else {
        ("-4", node_ip4(via).to_string())
    };
    ip_in(ns, &[family, "route", "add", dest, "via", &gw]).map(drop)
}

/// On a node, routes a pod address that lies outside its node's subnet to that node.
pub(crate) fn route_pod_via(ns: &str, ip: IpAddr, via: u8) -> Result<(), HarnessError> {
    route_via(ns, &format!("{ip}/{}", host_len(ip)), via)
}

/// Plugs a fresh pod netns into its node: veth `veth` on the bridge, `eth0` with the pod addresses,
/// default routes via the bridge.
pub(crate) fn setup_pod(
    pod: (&str, &Path),
    node: (&str, u8),
    veth: &str,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
) -> Result<(), HarnessError> {
    let (pod_ns, pod_path) = pod;
    let (node_ns, k) = node;
    netns::set_sysctls(pod_path, &COMMON_SYSCTLS)?;
    ip_in(pod_ns, &["link", "set", "lo", "up"])?;
    ip_in(
        node_ns,
        &[
            "link", "add", veth, "type", "veth", "peer", "name", POD_IFACE, "netns", pod_ns,
        ],
    )?;
    ip_in(node_ns, &["link", "set", veth, "master", BRIDGE, "up"])?;
    for (ip, net_len) in [
        (IpAddr::V4(ip4), pod_cidr4(k).1),
        (IpAddr::V6(ip6), pod_cidr6(k).1),
    ] {
        let inside = on_subnet(k, ip);
        let len = if inside { net_len } else { host_len(ip) };
        let addr = format!("{ip}/{len}");
        let mut args = vec!["addr", "add", &addr, "dev", POD_IFACE];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        ip_in(pod_ns, &args)?;
        if !inside {
            // The node reaches an off-subnet pod through the bridge by its host route.
            let host = format!("{ip}/{}", host_len(ip));
            ip_in(node_ns, &["route", "add", &host, "dev", BRIDGE])?;
        }
    }
    ip_in(pod_ns, &["link", "set", POD_IFACE, "up"])?;
    for gw in [IpAddr::V4(pod_ip4(k, 1)), IpAddr::V6(pod_ip6(k, 1))] {
        let gw = gw.to_string();
        // `onlink`: the gateway is on the bridge even when the pod address is a /32 off-subnet.
        let family = if gw.contains(':') { "-6" } else { "-4" };
        ip_in(
            pod_ns,
            &[
                family, "route", "add", "default", "via", &gw, "dev", POD_IFACE, "onlink",
            ],
        )?;
    }
    Ok(())
}
