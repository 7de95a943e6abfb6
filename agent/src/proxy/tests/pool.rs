//! The HBONE pool: streams of one source pod to one destination share a connection up to its 100
//! streams; a burst opens one connection, not many; the 101st concurrent stream opens a second;
//! a slot freed by a closed stream is used again.

use std::time::Duration;

use futures::future::join_all;
use tokio::net::TcpStream;

use super::fixture::*;
use crate::proxy::hbone::PoolConfig;

#[tokio::test]
async fn a_hundred_streams_share_one_connection_and_the_101st_opens_a_second() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").add();
    let mesh = world.start().await;
    let _app = mesh.whoami(server.addr(8080)).await;
    let n1 = mesh.node("n1");
    let dst = server.addr(8080);
    // Opens `n` connections at once and keeps them; each has its greeting, so its stream is up.
    let open = |n: usize| {
        join_all((0..n).map(|_| async {
            let mut c = mesh.connect(&client, dst).await;
            let greeting = read_line(&mut c).await;
            assert!(greeting.starts_with(&dst.to_string()), "{greeting}");
            c
        }))
    };

    let mut first: Vec<TcpStream> = open(100).await;
    assert_eq!(n1.pooled(|p| &p.streams_opened), 100);
    assert_eq!(
        n1.pooled(|p| &p.connections_opened),
        1,
        "a burst of 100 streams opens one connection"
    );
    assert_eq!(n1.pooled(|p| &p.streams_reused), 99);
    assert_eq!(n1.pi.pool.connections(), 1);

    // One stream ends: its slot is free once the relay is done, and the next stream takes it.
    drop(first.pop());
    eventually("the closed stream's relay ends", || {
        n1.count(|c| &c.relays_completed) == 1
    })
    .await;
    first.extend(open(1).await);
    assert_eq!(
        n1.pooled(|p| &p.connections_opened),
        1,
        "the freed slot was used"
    );
    assert_eq!(n1.pooled(|p| &p.streams_reused), 100);

    // 100 streams are open again: the 101st needs a second connection.
    let extra = open(1).await;
    assert_eq!(
        n1.pooled(|p| &p.connections_opened),
        2,
        "the 101st concurrent stream opens a second connection"
    );
    assert_eq!(n1.pooled(|p| &p.streams_reused), 100);
    assert_eq!(n1.pooled(|p| &p.streams_opened), 102);
    assert_eq!(n1.pi.pool.connections(), 2);
    let n2 = mesh.node("n2");
    assert_eq!(n2.count(|c| &c.hbone_inbound_accepted), 2);
    assert_eq!(n2.count(|c| &c.hbone_inbound_streams), 102);
    assert_eq!(n1.pooled(|p| &p.connect_failed), 0);
    drop((first, extra));
}

/// Streams from different source pods never share a connection: each carries its own pod's
/// certificate and leaves from its own address.
#[tokio::test]
async fn each_source_pod_gets_connections_of_its_own() {
    let mut world = World::new();
    let a = world.pod("a").node("n1").sa("alpha").add();
    let b = world.pod("b").node("n1").sa("beta").add();
    let server = world.pod("server").node("n2").add();
    let mesh = world.start().await;
    let app = mesh.whoami(server.addr(8080)).await;
    let mut conns = Vec::new();
    for pod in [&a, &b, &a] {
        let mut c = mesh.connect(pod, server.addr(8080)).await;
        read_line(&mut c).await;
        conns.push(c);
    }
    let n1 = mesh.node("n1");
    assert_eq!(
        n1.pooled(|p| &p.connections_opened),
        2,
        "one per source pod"
    );
    assert_eq!(n1.pooled(|p| &p.streams_reused), 1, "a's second stream");
    assert_eq!(app.peers().len(), 3);
    drop(conns);
}

/// An idle timeout of 0 closes a connection as soon as its last stream ends: the next stream
/// opens a new one.
#[tokio::test]
async fn a_connection_without_streams_closes_at_the_idle_timeout() {
    let mut world = World::new();
    world.pool(PoolConfig {
        idle_timeout: Duration::ZERO,
        ..PoolConfig::default()
    });
    let client = world.pod("client").node("n1").add();
    let server = world.pod("server").node("n2").add();
    let mesh = world.start().await;
    let _app = mesh.whoami(server.addr(8080)).await;
    let n1 = mesh.node("n1");
    for round in 1..=2 {
        let mut c = mesh.connect(&client, server.addr(8080)).await;
        read_line(&mut c).await;
        drop(c);
        eventually("the idle connection closes", || {
            n1.pooled(|p| &p.connections_closed) == round
        })
        .await;
        assert_eq!(n1.pi.pool.connections(), 0);
    }
    assert_eq!(
        n1.pooled(|p| &p.connections_opened),
        2,
        "nothing was reused"
    );
    assert_eq!(n1.pooled(|p| &p.streams_reused), 0);
}
