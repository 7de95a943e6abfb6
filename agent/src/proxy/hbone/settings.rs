//! HTTP/2 and socket settings of HBONE connections, the same on both sides.

use std::time::Duration;

/// ztunnel's values, so long flows get the same throughput.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;

/// Streams one client connection may have open at once on the server.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// A client that has not finished the TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest header list the server accepts (ztunnel's server: 64 KiB; h2's default is
/// 16 MiB). A CONNECT carries a handful of short headers.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;

/// Streams a client may open and reset before the server accepts them, before GOAWAY
/// ENHANCE_YOUR_CALM (h2's default, the "rapid reset" bound, CVE-2023-44487), written here so a
/// change of the crate's default does not loosen it unseen.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams the server may reset for the client's protocol errors, before GOAWAY
/// ENHANCE_YOUR_CALM (h2's default, the "MadeYouReset" bound).
pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// How long a connection closed for flooding may take to flush its GOAWAY.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(5);

/// rustls reads at most one record (≤ 16 KiB, often 4 KiB) per read from its transport; a read
/// buffer in front of the socket turns those into one large read, saving most of the syscalls of
/// a bulk transfer. It holds memory only while it holds bytes (`read_buffer`).
pub type Buffered = super::read_buffer::ReadBuffer;
pub const READ_BUFFER: usize = 64 * 1024;

pub fn buffered(tcp: tokio::net::TcpStream) -> Buffered {
    super::read_buffer::ReadBuffer::new(tcp, READ_BUFFER)
}

/// TCP keepalive for HBONE connections (both ends): a peer node that vanishes without a FIN is
/// noticed within about a minute instead of holding the connection (and its pool slot) forever.
pub fn keepalive(stream: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn hbone_sockets_get_keepalive() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let sock = socket2::SockRef::from(&s);
        assert!(!sock.keepalive().expect("read"), "off before");
        super::keepalive(&s);
        assert!(sock.keepalive().expect("read"), "on after");
        assert_eq!(
            sock.keepalive_time().expect("read"),
            std::time::Duration::from_secs(30)
        );
        assert_eq!(sock.keepalive_retries().expect("read"), 3);
    }
}
