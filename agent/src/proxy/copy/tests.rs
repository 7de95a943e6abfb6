//! The relay between two TCP sockets over loopback: what splicing must keep of a direct
//! connection (every byte, in order, each direction ending on its own, a reset passed on).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{bidirectional, Outcome, Side};

const MIB: usize = 1024 * 1024;

/// Bytes that differ from one position to the next (and between the two directions by `seed`),
/// so a lost, repeated or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

/// A client connected to a relay connected to a server, the relay running with `splice`:
/// (client, server, the relay's outcome).
async fn relayed(
    splice: Option<&'static AtomicU64>,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let back = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(front.local_addr().expect("addr"))
        .await
        .expect("connect to the relay");
    let (a, _) = front.accept().await.expect("accept");
    let b = TcpStream::connect(back.local_addr().expect("addr"))
        .await
        .expect("connect to the server");
    let (server, _) = back.accept().await.expect("accept");
    let relay = tokio::spawn(async move { bidirectional(a, b, splice).await });
    (client, server, relay)
}

/// Each direction of a bulk transfer is spliced and arrives whole and in order; the client's
/// end of stream reaches the server (which only then answers), and the answer comes back whole.
#[tokio::test]
async fn a_bulk_transfer_between_tcp_sockets_is_spliced_and_arrives_whole() {
    static SPLICED: AtomicU64 = AtomicU64::new(0);
    let (mut client, mut server, relay) = relayed(Some(&SPLICED)).await;
    let request = pattern(16 * MIB, 0x5a);
    let answer = pattern(16 * MIB, 0xa5);

    let sent = request.clone();
    let sending = tokio::spawn(async move {
        client.write_all(&sent).await.expect("client write");
        client.shutdown().await.expect("client shutdown");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("client read");
        back
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("server read");
    assert!(
        got == request,
        "the server got {} bytes, not the {} sent in order",
        got.len(),
        request.len()
    );
    server.write_all(&answer).await.expect("server write");
    server.shutdown().await.expect("server shutdown");
    let back = sending.await.expect("client task");
    assert!(
        back == answer,
        "the client got {} bytes, not the {} answered in order",
        back.len(),
        answer.len()
    );

    let outcome = relay.await.expect("relay task");
    assert_eq!(
        outcome,
        Outcome {
            a_to_b: request.len() as u64,
            b_to_a: answer.len() as u64,
            failed: None
        }
    );
    let spliced = SPLICED.load(Ordering::Relaxed);
    assert!(
        spliced > 0 && spliced <= outcome.a_to_b + outcome.b_to_a,
        "spliced {spliced} of {} bytes",
        outcome.a_to_b + outcome.b_to_a
    );
}

/// Without splicing (the fast path on) the same relay copies the bytes, whole and in order.
#[tokio::test]
async fn without_splice_the_bytes_are_copied_whole() {
    let (mut client, mut server, relay) = relayed(None).await;
    let request = pattern(4 * MIB, 0x11);
    let sent = request.clone();
    let sending = tokio::spawn(async move {
        client.write_all(&sent).await.expect("client write");
        client.shutdown().await.expect("client shutdown");
        client
    });
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("server read");
    assert!(
        got == request,
        "the server got {} bytes, not the {} sent in order",
        got.len(),
        request.len()
    );
    drop(server);
    drop(sending.await.expect("client task"));
    let outcome = relay.await.expect("relay task");
    assert_eq!(
        (outcome.a_to_b, outcome.failed),
        (request.len() as u64, None)
    );
}

/// The server resets while a spliced transfer to the client runs: the relay reports the
/// server's side as failed and the client, after the bytes that reached it, reads a reset, as on
/// a direct connection, not a clean end.
#[tokio::test]
async fn a_reset_during_a_spliced_transfer_resets_the_client() {
    static SPLICED: AtomicU64 = AtomicU64::new(0);
    let (mut client, server, relay) = relayed(Some(&SPLICED)).await;
    let streaming = tokio::spawn(async move {
        let mut server = server;
        let chunk = pattern(MIB, 0x3c);
        for _ in 0..256 {
            if SPLICED.load(Ordering::Relaxed) > 0 {
                return server;
            }
            server.write_all(&chunk).await.expect("server write");
        }
        panic!("256 MiB streamed and nothing spliced");
    });
    tokio::pin!(streaming);
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    let server = loop {
        tokio::select! {
            server = &mut streaming => break server.expect("server task"),
            r = client.read(&mut buf) => match r {
                Ok(0) | Err(_) => panic!("the client's stream ended after {read} bytes, before the reset"),
                Ok(n) => read += n,
            },
        }
    };
    socket2::SockRef::from(&server)
        .set_linger(Some(std::time::Duration::ZERO))
        .expect("linger");
    drop(server);

    let end = loop {
        match client.read(&mut buf).await {
            Ok(0) => break Ok(0),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client's stream ended with {end:?}, not a reset"
    );
    let outcome = relay.await.expect("relay task");
    assert_eq!(outcome.failed, Some(Side::B), "{outcome:?}");
}
