use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use super::*;
use crate::node::adopt::{describe, NetnsId, Role};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ambit-handover-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn id(dir: &Path, node: &str) -> Identity {
    Identity {
        path: dir.join("handover.sock"),
        node: node.into(),
        pin_dir: "/sys/fs/bpf/test/ambit".into(),
    }
}

/// A pod's listener on an ephemeral loopback port, offered under `pod`.
fn offered(offer: &Offer, pod: &str, n: usize) -> Vec<TcpListener> {
    let netns = NetnsId {
        dev: 4,
        ino: 4026531840,
    };
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind"))
        .collect();
    let handed = listeners
        .iter()
        .map(|l| {
            let addr = l.local_addr().expect("addr");
            describe(Some(pod), Some(netns), Role::Outbound, l, addr).expect("describe")
        })
        .collect();
    offer.set(pod, handed);
    listeners
}

/// What a connection to `addr` finds: the sender's listener must be the one that accepts it.
fn accepted_by(listener: &TcpListener, addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).expect("connect");
    let (mut s, _) = listener.accept().expect("accept on the handed-over socket");
    c.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("read");
    assert_eq!(&b, b"x");
}

#[test]
fn a_successor_receives_the_same_sockets_and_the_predecessor_learns_it_took_over() {
    let d = dir("same");
    let offer = Offer::default();
    // More than one batch's worth, so the batching is exercised.
    let ours = offered(&offer, "mesh/a", MAX_FDS + 3);
    let successor = Successor::new(id(&d, "n1"), offer.clone());
    successor.listen().expect("listen");
    let took_over = successor.took_over();

    let received = take(&id(&d, "n1")).expect("take").expect("a predecessor");
    assert_eq!(received.listeners.len(), ours.len());
    for (mine, handed) in ours.iter().zip(&received.listeners) {
        let addr = mine.local_addr().expect("addr");
        assert_eq!(handed.what.addr, addr);
        assert_eq!(handed.what.pod.as_deref(), Some("mesh/a"));
        // Our own descriptor is closed: the socket lives on in the received one.
        let theirs = TcpListener::from(handed.fd.try_clone().expect("dup"));
        accepted_by(&theirs, addr);
    }
    assert!(
        !successor.handed_over(),
        "not before the successor confirms"
    );
    drop(ours);
    received.confirm.send().expect("confirm");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), took_over.notified())
            .await
            .expect("the predecessor is told")
    });
    assert!(successor.handed_over());
    // Pods stay as they were handed: they are the successor's.
    assert!(offer.hold().is_none(), "still frozen after the takeover");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn another_nodes_agent_is_refused_and_the_predecessor_serves_on() {
    let d = dir("node");
    let offer = Offer::default();
    let _ours = offered(&offer, "mesh/a", 1);
    let successor = Successor::new(id(&d, "n1"), offer);
    successor.listen().expect("listen");
    match take(&id(&d, "n2")) {
        Err(HandoverError::Refused { reason }) => assert!(reason.contains("n2"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The same node is still answered afterwards.
    let received = take(&id(&d, "n1")).expect("take").expect("a predecessor");
    assert_eq!(received.listeners.len(), 1);
    assert!(!successor.handed_over());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn no_predecessor_is_none_and_a_successor_that_dies_changes_nothing() {
    let d = dir("none");
    assert!(take(&id(&d, "n1")).expect("no socket").is_none());
    // A stale socket file (its agent was killed) refuses connections: also none.
    let stale = seqpacket().expect("socket");
    let addr = SocketAddrUnix::new(d.join("handover.sock")).expect("addr");
    rustix::net::bind(&stale, &addr).expect("bind");
    drop(stale);
    assert!(take(&id(&d, "n1")).expect("stale socket").is_none());

    let offer = Offer::default();
    let _ours = offered(&offer, "mesh/a", 2);
    let successor = Successor::new(id(&d, "n1"), offer.clone());
    successor.listen().expect("listen over the stale file");
    let received = take(&id(&d, "n1")).expect("take").expect("a predecessor");
    // While a successor holds the listeners, no pod is enrolled or unenrolled here.
    assert!(offer.hold().is_none(), "frozen during the takeover");
    drop(received);
    let again = take(&id(&d, "n1"))
        .expect("take again")
        .expect("still serving");
    assert_eq!(again.listeners.len(), 2);
    assert!(!successor.handed_over());
    drop(again);
    // The successor went away: pods may change again (the old agent sees it when the connection
    // ends, on its own thread).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while offer.hold().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the offer is never thawed after the successor went away"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    successor.remove_socket();
    assert!(!d.join("handover.sock").exists());
    let _ = std::fs::remove_dir_all(&d);
}
