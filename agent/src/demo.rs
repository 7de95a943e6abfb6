//! `ambit demo`: builds a small local world (one node; two enrolled pods and one that is not),
//! runs the agent on it from ordinary Kubernetes YAML, sends traffic, and prints what was captured
//! and relayed. Everything it made is removed when it ends.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

mod l7;

use crate::harness::apps::{whoami, Mode, Server};
use crate::harness::{ClusterYaml, HarnessError, LocalAgent, Pod, SvcPort, World};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the world and the agent running until Ctrl-C, to poke at it by hand.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("building the demo world: {0}")]
    World(#[from] HarnessError),
    #[error("locating the ambit binary: {0}")]
    Exe(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Traffic {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    let world = World::try_new("demo")?;
    let node = world.try_node("node1")?;
    let client = world
        .pod("client")
        .node(&node)
        .namespace("shop")
        .sa("client")
        .try_spawn()?;
    let server = world
        .pod("server")
        .node(&node)
        .namespace("shop")
        .sa("server")
        .try_spawn()?;
    let legacy = world
        .pod("legacy")
        .node(&node)
        .namespace("legacy")
        .try_spawn()?;
    let reviews = ["v1", "v2"].map(|version| {
        world
            .pod(&format!("reviews-{version}"))
            .node(&node)
            .namespace("shop")
            .sa("reviews")
            .label("app", "reviews")
            .label("version", version)
            .try_spawn()
    });
    let [v1, v2] = reviews;
    let (v1, v2) = (v1?, v2?);
    println!(
        "world {}: node {} (bridge {})",
        world.prefix(),
        node.name(),
        node.gateway4()
    );
    for (pod, note) in [
        (&client, "enrolled"),
        (&server, "enrolled"),
        (&legacy, "not enrolled"),
        (&v1, "enrolled"),
        (&v2, "enrolled"),
    ] {
        println!(
            "  pod {}/{:<10} {} {}  ({note})",
            pod.namespace(),
            pod.name(),
            pod.ip4(),
            pod.ip6()
        );
    }

    let _apps = Server::start(
        &server,
        &[sa(server.ip4(), 8080), sa(server.ip6(), 8080)],
        Mode::WhoamiEcho,
    );
    let _legacy_app = Server::start(&legacy, &[sa(legacy.ip4(), 9090)], Mode::WhoamiEcho);
    let _reviews_apps = [&v1, &v2].map(|pod| l7::http_app(pod, l7::REVIEWS_PORT));

    let exe = std::env::current_exe().map_err(DemoError::Exe)?;
    let access_log = world.state_dir().join("access.log");
    let mut agent =
        LocalAgent::new(&world, &node, &exe).arg(&format!("--access-log={}", access_log.display()));
    ClusterYaml::new()
        .ambient("shop")
        .plain("legacy")
        .pods([&client, &server, &legacy, &v1, &v2])
        .service(
            "reviews",
            "shop",
            l7::REVIEWS_VIP,
            &[SvcPort::named("http", l7::REVIEWS_PORT, l7::REVIEWS_PORT)],
            &[&v1, &v2],
            true,
        )
        .raw(l7::ROUTES)
        .write(&agent.config_dir());
    println!("\nnamespace shop is labelled istio.io/dataplane-mode=ambient; starting the agent");
    println!(
        "  config {}  pins {}",
        agent.config_dir().display(),
        agent.bpffs().display()
    );
    agent.start(&world);
    agent.wait_enrolled(&[&client, &server, &v1, &v2]);
    println!("  enrolled: shop/client, shop/server, shop/reviews-v1, shop/reviews-v2\n");

    println!("traffic (each server reports the peer and local address it saw):");
    let ip_of = |ip: IpAddr| -> &str {
        if ip == IpAddr::from(server.ip4()) || ip == IpAddr::from(server.ip6()) {
            "server's own IP: its inbound proxy could not preserve the source (see the agent's log)"
        } else if ip == IpAddr::from(node.gateway4()) {
            "node's address: exempt from inbound capture (kubelet probes)"
        } else {
            "caller's own IP: source preserved (by the server pod's inbound proxy when it is enrolled: HBONE from a meshed client, 15006 from a plaintext one)"
        }
    };
    let cases: [(&str, Option<&Pod>, SocketAddr); 5] = [
        (
            "client -> server (IPv4)",
            Some(&client),
            sa(server.ip4(), 8080),
        ),
        (
            "client -> server (IPv6)",
            Some(&client),
            sa(server.ip6(), 8080),
        ),
        ("legacy -> server", Some(&legacy), sa(server.ip4(), 8080)),
        ("client -> legacy", Some(&client), sa(legacy.ip4(), 9090)),
        ("node   -> server", None, sa(server.ip4(), 8080)),
    ];
    for (what, from, dst) in cases {
        let r = match from {
            Some(pod) => pod.run_async(|| whoami(dst)),
            None => node.run_async(|| whoami(dst)),
        };
        let (peer, local, app_peer) = r.map_err(|source| DemoError::Traffic {
            what: what.into(),
            source,
        })?;
        println!("  {what:<24} dialled {dst}; app's getpeername {app_peer}; server saw {peer} -> {local}");
        println!("  {:<24} peer is the {}", "", ip_of(peer.ip()));
    }

    let s = agent.fresh_status();
    println!("\nagent counters:");
    println!(
        "  kernel: {} outbound connects captured, {} inbound connections steered, {} proxy sockets skipped by mark",
        s["kernel"]["out_captured"], s["kernel"]["in_steered"], s["kernel"]["out_skipped_mark"]
    );
    println!(
        "  proxy:  {} outbound accepted, {} inbound accepted, {} relays completed, {} bytes relayed",
        s["proxy"]["outbound_accepted"],
        s["proxy"]["inbound_accepted"],
        s["proxy"]["relays_completed"],
        s["proxy"]["bytes_relayed"]
    );
    println!(
        "  mesh:   {} outbound over HBONE (mTLS, HTTP/2 CONNECT to the pod's 15008), {} in plaintext (outside the mesh); {} HBONE streams terminated; {} pooled connection(s); {} workload certificate(s) issued",
        s["proxy"]["outbound_hbone"],
        s["proxy"]["outbound_plaintext"],
        s["proxy"]["hbone_inbound_streams"],
        s["pool"]["connections_opened"],
        s["certs"]["issued_total"]
    );

    let (_, ready) = agent.http_get("/healthz/ready");
    println!("\nreadiness (/healthz/ready on :15020): {}", ready.trim());
    println!("\nIstio's TCP metrics (/metrics on :15020, as Prometheus scrapes them), connections closed:");
    let (_, metrics) = agent.http_get("/metrics");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "  reporter={:<11} {}/{} -> {}/{} ({}) {}: {}",
            label("reporter"),
            label("source_workload_namespace"),
            label("source_workload"),
            label("destination_workload_namespace"),
            label("destination_workload"),
            label("connection_security_policy"),
            label("destination_service"),
            line.rsplit(' ').next().unwrap_or("?")
        );
    }
    let log = std::fs::read_to_string(&access_log).unwrap_or_default();
    println!(
        "\naccess log ({}), {} line(s), the first:",
        access_log.display(),
        log.lines().count()
    );
    if let Some(first) = log.lines().next() {
        println!("  {first}");
    }

    l7::show(&client, &agent, &access_log)?;

    if args.keep {
        println!(
            "\n--keep: world {} stays up; status at {}; Ctrl-C to tear down",
            world.prefix(),
            agent.status_path().display()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let _ = ctrlc_channel(tx);
        let _ = rx.recv();
    }
    agent.stop();
    std::thread::sleep(Duration::from_millis(50));
    world.teardown();
    println!("\ntorn down: namespaces, cgroups, pins and processes removed");
    Ok(())
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Waits for SIGINT/SIGTERM on a small runtime and signals `tx`.
fn ctrlc_channel(tx: std::sync::mpsc::Sender<()>) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut a), Ok(mut b)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                tokio::select! { _ = a.recv() => {}, _ = b.recv() => {} }
            }
        });
        let _ = tx.send(());
    });
    Ok(())
}
