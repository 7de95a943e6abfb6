//! The registry of this node's pods that connections are handed to in-process.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use super::LocalPods;
use crate::identity::Identity;
use crate::proxy::{PodContext, SocketFactory};

#[derive(Debug)]
struct NoSockets;

impl SocketFactory for NoSockets {
    fn upstream(
        &self,
        _dst: SocketAddr,
        _bind: Option<IpAddr>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpSocket>> + Send + '_>,
    > {
        Box::pin(std::future::ready(Err(
            std::io::ErrorKind::Unsupported.into()
        )))
    }
}

const V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12);

fn pod(name: &str) -> Arc<PodContext> {
    Arc::new(PodContext {
        name: name.into(),
        namespace: "mesh".into(),
        ips: vec![V4.into(), V6.into()],
        netns_cookie: 1,
        sockets: Arc::new(NoSockets),
        identity: Identity::new("cluster.local", "mesh", name),
        istio: Default::default(),
        baggage: None,
        trace_workload: Default::default(),
    })
}

fn serves(local: &LocalPods, ip: impl Into<IpAddr>, pod: &Arc<PodContext>) -> bool {
    local
        .serving(ip.into())
        .is_some_and(|p| Arc::ptr_eq(&p, pod))
}

#[test]
fn a_pod_is_found_by_each_of_its_addresses_until_removed() {
    let local = LocalPods::new(true);
    let server = pod("server");
    assert!(
        local.serving(V4.into()).is_none(),
        "nothing before enrolment"
    );
    local.add(server.clone());
    assert!(serves(&local, V4, &server));
    assert!(serves(&local, V6, &server));
    assert!(
        serves(&local, V4.to_ipv6_mapped(), &server),
        "an IPv4-mapped address is the IPv4 one"
    );
    assert!(local
        .serving(Ipv4Addr::new(10, 244, 1, 13).into())
        .is_none());
    local.remove(&server);
    assert!(local.serving(V4.into()).is_none());
    assert!(local.serving(V6.into()).is_none());
}

#[test]
fn removing_an_old_enrolment_keeps_the_new_one_at_the_same_addresses() {
    let local = LocalPods::new(true);
    let (old, new) = (pod("server"), pod("server"));
    local.add(old.clone());
    local.add(new.clone());
    local.remove(&old);
    assert!(serves(&local, V4, &new), "the pod enrolled again stays");
}

#[test]
fn nothing_is_handed_over_with_the_shortcut_off() {
    let local = LocalPods::new(false);
    local.add(pod("server"));
    assert!(local.serving(V4.into()).is_none());
}
