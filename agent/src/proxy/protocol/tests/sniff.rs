//! Sniffing over loopback: a client writes, the proxy's side of the connection is sniffed. Each
//! test checks the outcome and, where there are bytes, that sniffing consumed none of them.
//! Nothing is timed: waits have a generous ceiling, and a timeout test asserts only the outcome.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::poll;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::super::{client_hello_sni, sniff, SniffError, Sniffed, HTTP1_MAX_REQUEST_LINE};
use super::{client_hello, fragmented};

/// How long anything a test waits for may take before the test fails: a ceiling, not an
/// expectation (everything here takes milliseconds).
const CEILING: Duration = Duration::from_secs(20);

/// A sniffing timeout for tests that expect to time out: short, so the test is quick; the test
/// asserts the outcome, never how long it took.
const SHORT: Duration = Duration::from_millis(200);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(CEILING, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

/// A connected pair over loopback: (the client, the proxy's accepted side).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (client, accepted) = within("connect", async {
        tokio::join!(TcpStream::connect(addr), listener.accept())
    })
    .await;
    let client = client.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    (client, accepted.expect("accept").0)
}

/// Waits until `n` bytes are queued on the proxy's side (peeked, not read).
async fn queued(stream: &TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    within("bytes to arrive", async {
        while stream.peek(&mut buf).await.expect("peek") < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}

/// What the client sent, read whole from the proxy's side after the client closed: sniffing
/// left every byte in place.
async fn read_all(mut stream: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    within("EOF", stream.read_to_end(&mut out))
        .await
        .expect("read to EOF");
    out
}

/// Sends `parts` one by one, each only once the previous one has arrived, and checks that
/// sniffing is still undecided after every part but the last; returns the decision and the
/// proxy's side.
async fn sniff_parts(parts: &[&[u8]]) -> (Sniffed, TcpStream, TcpStream) {
    let (mut client, server) = pair().await;
    let decided = {
        let mut sniffing = pin!(sniff(&server, CEILING));
        let mut sent = 0;
        for (i, part) in parts.iter().enumerate() {
            client.write_all(part).await.expect("write");
            sent += part.len();
            queued(&server, sent).await;
            if i + 1 < parts.len() {
                assert!(
                    poll!(sniffing.as_mut()).is_pending(),
                    "decided after {sent} bytes, before the last part {:?}",
                    String::from_utf8_lossy(parts[i + 1])
                );
            }
        }
        within("a decision", sniffing).await
    };
    (decided, client, server)
}

#[tokio::test]
async fn an_http1_request_sent_byte_by_byte_is_decided_at_the_request_lines_end() {
    // Istio: automatic protocol selection detects HTTP.
    let line = b"GET /items?id=7 HTTP/1.1\r\n";
    let headers = b"Host: svc.ns.svc.cluster.local\r\nAccept: */*\r\n\r\n";
    let parts: Vec<&[u8]> = line.chunks(1).collect();
    let (decided, mut client, server) = sniff_parts(&parts).await;
    // Decided before any header was sent.
    assert_eq!(decided, Sniffed::Http1);
    client.write_all(headers).await.expect("write headers");
    drop(client);
    let mut want = line.to_vec();
    want.extend_from_slice(headers);
    assert_eq!(read_all(server).await, want, "the request, whole");
}

/// Counts the wake-ups of the task polling with it.
#[derive(Default)]
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn undecided_bytes_leave_the_sniffer_asleep_until_more_arrive() {
    // Peeked bytes stay queued, so the socket stays readable: a sniffer that did not wait for
    // *new* bytes would spin, waking itself on every poll once tokio's cooperative budget ran
    // out. A wake-up or two from events that were already pending is fine; a steady stream is
    // not.
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HT").await.expect("write");
    queued(&server, 8).await;
    let wakes = Arc::new(Wakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    let mut sniffing = pin!(sniff(&server, CEILING));
    let mut counts = Vec::new();
    for _ in 0..6 {
        assert!(sniffing.as_mut().poll(&mut cx).is_pending(), "undecided");
        // Lets the runtime poll the I/O driver and deliver any wake-up (tokio defers those of
        // an exhausted budget until then).
        tokio::task::yield_now().await;
        counts.push(wakes.0.load(Ordering::SeqCst));
    }
    assert_eq!(
        counts[2], counts[5],
        "woken again and again with nothing new: {counts:?}"
    );
    // New bytes wake it, and it decides.
    client.write_all(b"TP/1.1\r\n").await.expect("write");
    within("a wake-up", async {
        while wakes.0.load(Ordering::SeqCst) == counts[5] {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert_eq!(sniffing.as_mut().poll(&mut cx), Poll::Ready(Sniffed::Http1));
}

#[tokio::test]
async fn an_http10_request_is_http1() {
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let (decided, client, server) = sniff_parts(&[request]).await;
    assert_eq!(decided, Sniffed::Http1);
    drop(client);
    assert_eq!(read_all(server).await, request);
}

#[tokio::test]
async fn the_h2_preface_is_h2() {
    // Istio: automatic protocol selection detects HTTP/2 (prior knowledge: the preface, RFC 9113
    // §3.4), here in two parts and followed by an empty SETTINGS frame.
    let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let (decided, mut client, server) =
        sniff_parts(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]).await;
    assert_eq!(decided, Sniffed::H2);
    client.write_all(&settings).await.expect("write SETTINGS");
    drop(client);
    let mut want = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    want.extend_from_slice(&settings);
    assert_eq!(read_all(server).await, want);
}

#[tokio::test]
async fn a_rustls_client_hello_is_tls_with_its_sni() {
    let hello = client_hello("reviews.bookinfo.svc.cluster.local");
    let (decided, client, server) = sniff_parts(&[&hello]).await;
    assert_eq!(
        decided,
        Sniffed::Tls {
            sni: Some("reviews.bookinfo.svc.cluster.local".into())
        }
    );
    drop(client);
    assert_eq!(read_all(server).await, hello, "the ClientHello, whole");
}

#[tokio::test]
async fn a_client_hello_without_sni_is_tls_without_sni() {
    let hello = client_hello("10.96.0.10");
    let (decided, _client, _server) = sniff_parts(&[&hello]).await;
    assert_eq!(decided, Sniffed::Tls { sni: None });
}

#[tokio::test]
async fn a_client_hello_split_across_writes_is_decided_when_whole() {
    // The record header split, then the handshake header split, then the rest.
    let hello = client_hello("split.example.com");
    let parts = [&hello[..3], &hello[3..7], &hello[7..100], &hello[100..]];
    let (decided, client, server) = sniff_parts(&parts).await;
    assert_eq!(
        decided,
        Sniffed::Tls {
            sni: Some("split.example.com".into())
        }
    );
    drop(client);
    assert_eq!(read_all(server).await, hello);
}

#[tokio::test]
async fn a_client_hello_across_records_and_writes_is_reassembled() {
    let hello = fragmented(&client_hello("records.example.com"), 64);
    let parts: Vec<&[u8]> = hello.chunks(50).collect();
    let (decided, _client, _server) = sniff_parts(&parts).await;
    assert_eq!(
        decided,
        Sniffed::Tls {
            sni: Some("records.example.com".into())
        }
    );
}

#[tokio::test]
async fn garbage_is_other() {
    let garbage = [0x00, 0xff, 0x13, 0x37, b'\r', b'\n'];
    let (decided, client, server) = sniff_parts(&[&garbage]).await;
    assert_eq!(decided, Sniffed::Other);
    drop(client);
    assert_eq!(read_all(server).await, garbage);
}

#[tokio::test]
async fn a_huge_line_without_http_is_other_without_waiting_for_more() {
    // The client keeps the connection open and never ends the line: only the bound decides.
    let (mut client, server) = pair().await;
    let mut line = b"GET /".to_vec();
    line.resize(4 * HTTP1_MAX_REQUEST_LINE, b'a');
    client.write_all(&line).await.expect("write");
    assert_eq!(
        within("sniff", sniff(&server, CEILING)).await,
        Sniffed::Other
    );
    drop(client);
    assert_eq!(read_all(server).await, line, "nothing consumed");
}

#[tokio::test]
async fn a_silent_client_times_out() {
    // A server-first protocol on an undeclared port: the caller then relays it as TCP.
    let (_client, server) = pair().await;
    assert_eq!(
        within("sniff", sniff(&server, SHORT)).await,
        Sniffed::Timeout
    );
}

#[tokio::test]
async fn a_client_that_sends_one_byte_and_stalls_times_out() {
    let (mut client, server) = pair().await;
    client.write_all(b"G").await.expect("write");
    queued(&server, 1).await;
    assert_eq!(
        within("sniff", sniff(&server, SHORT)).await,
        Sniffed::Timeout
    );
    drop(client);
    assert_eq!(read_all(server).await, b"G", "the byte is still there");
}

#[tokio::test]
async fn a_truncated_client_hello_that_stalls_times_out() {
    let hello = client_hello("api.example.com");
    let (mut client, server) = pair().await;
    client.write_all(&hello[..40]).await.expect("write");
    assert_eq!(
        within("sniff", sniff(&server, SHORT)).await,
        Sniffed::Timeout
    );
}

#[tokio::test]
async fn undecided_bytes_then_end_of_stream_are_other() {
    // `printf 'GET / HT' | nc`: all the client will send, and not a request line.
    let (mut client, server) = pair().await;
    client.write_all(b"GET / HT").await.expect("write");
    client.shutdown().await.expect("shutdown");
    assert_eq!(
        within("sniff", sniff(&server, CEILING)).await,
        Sniffed::Other
    );
    assert_eq!(read_all(server).await, b"GET / HT");
}

#[tokio::test]
async fn a_client_that_closes_without_a_byte_is_closed() {
    let (client, server) = pair().await;
    drop(client);
    assert_eq!(
        within("sniff", sniff(&server, CEILING)).await,
        Sniffed::Closed
    );
}

#[tokio::test]
async fn a_client_that_resets_is_closed() {
    let (client, server) = pair().await;
    crate::proxy::reset(client);
    assert_eq!(
        within("sniff", sniff(&server, CEILING)).await,
        Sniffed::Closed
    );
}

#[tokio::test]
async fn a_declared_tls_ports_client_hello_yields_its_sni() {
    let hello = client_hello("db.example.com");
    let (mut client, server) = pair().await;
    let parts = [&hello[..10], &hello[10..]];
    let sni = {
        let mut sniffing = pin!(client_hello_sni(&server, CEILING));
        client.write_all(parts[0]).await.expect("write");
        queued(&server, 10).await;
        assert!(poll!(sniffing.as_mut()).is_pending(), "undecided");
        client.write_all(parts[1]).await.expect("write");
        within("SNI", sniffing).await
    };
    assert_eq!(sni.expect("a ClientHello"), Some("db.example.com".into()));
    drop(client);
    assert_eq!(read_all(server).await, hello);

    let (mut client, server) = pair().await;
    client
        .write_all(&client_hello("192.0.2.1"))
        .await
        .expect("write");
    let sni = within("SNI", client_hello_sni(&server, CEILING)).await;
    assert_eq!(sni.expect("a ClientHello"), None);
}

#[tokio::test]
async fn a_declared_tls_port_reports_why_there_is_no_sni() {
    // Plaintext where TLS was declared.
    let (mut client, server) = pair().await;
    client
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let got = within("SNI", client_hello_sni(&server, CEILING)).await;
    assert!(matches!(got, Err(SniffError::NotTls)), "{got:?}");

    // A silent client.
    let (_client, server) = pair().await;
    let got = within("SNI", client_hello_sni(&server, SHORT)).await;
    assert!(matches!(got, Err(SniffError::Timeout { .. })), "{got:?}");

    // A truncated ClientHello, then end of stream.
    let (mut client, server) = pair().await;
    client
        .write_all(&client_hello("api.example.com")[..40])
        .await
        .expect("write");
    client.shutdown().await.expect("shutdown");
    let got = within("SNI", client_hello_sni(&server, CEILING)).await;
    assert!(
        matches!(got, Err(SniffError::Closed { received: 40 })),
        "{got:?}"
    );

    // A ClientHello announcing more than is inspected.
    let (mut client, server) = pair().await;
    client
        .write_all(b"\x16\x03\x01\x40\x00\x01\x01\x00\x00")
        .await
        .expect("write");
    let got = within("SNI", client_hello_sni(&server, CEILING)).await;
    assert!(matches!(got, Err(SniffError::TooLarge { .. })), "{got:?}");
    assert_eq!(got.expect_err("too large").metric_label(), "too_large");
}
