//! Worlds several test files start from.

use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, SvcPort, World};

use super::{HttpApp, NS};
use crate::support;

/// `sleep` (n1) and `web` (n2, an HTTP app on 8080) in the ambient namespace, Service `web`
/// (`http` 80 → 8080); the agents are the test's to start.
pub struct SleepAndWeb {
    pub world: World,
    pub n1: ambit::harness::Node,
    pub n2: ambit::harness::Node,
    pub client: ambit::harness::Pod,
    pub server: ambit::harness::Pod,
    pub yaml: ClusterYaml,
    pub _web: HttpApp,
}

pub fn sleep_and_web(name: &str, vip: Ipv4Addr) -> SleepAndWeb {
    support::raise_fd_limit();
    let world = World::new(name);
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = world
        .pod("web")
        .node(&n2)
        .namespace(NS)
        .label("app", "web")
        .spawn();
    let _web = HttpApp::start(&server, 8080);
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server])
        .service(
            "web",
            NS,
            vip,
            &[SvcPort::named("http", 80, 8080)],
            &[&server],
            true,
        );
    SleepAndWeb {
        world,
        n1,
        n2,
        client,
        server,
        yaml,
        _web,
    }
}
