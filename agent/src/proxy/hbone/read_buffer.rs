//! The read buffer in front of an HBONE connection's socket, below rustls: rustls reads at most
//! 4 KiB per read from its transport (`READ_SIZE` in its deframer, 0.23), about four reads for a
//! full 16 KiB record, and the buffer turns a burst of records into one `read` system call. Its
//! price is one copy into rustls's buffer: 6 % of the server agent's samples in a bulk transfer
//! (agent/benches/README.md, "Against a real ztunnel").
//!
//! Unlike `tokio::io::BufReader` it takes its memory only once the socket is readable: a client
//! that connects and never starts its TLS handshake holds none (`BufReader` allocates and zeroes
//! its whole buffer at once: 64 KiB for each accepted connection, stalled handshakes included).
//! Once taken it is kept: giving it back after every read that drained it made every short read
//! of a bulk transfer allocate 64 KiB again, above jemalloc's thread cache (20 % more agent CPU
//! per GiB in the hbone bench); it is one buffer per HBONE connection, which carries up to 100
//! streams.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub struct ReadBuffer {
    tcp: TcpStream,
    /// What was read and not yet handed on (empty, without capacity, between bursts).
    buf: BytesMut,
    capacity: usize,
}

impl ReadBuffer {
    pub fn new(tcp: TcpStream, capacity: usize) -> Self {
        ReadBuffer {
            tcp,
            buf: BytesMut::new(),
            capacity,
        }
    }

    /// Reads from the socket into the buffer once it is readable; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.buf.reserve(self.capacity);
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Readiness was stale: poll again, which registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for ReadBuffer {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A read as large as the buffer gains nothing from it.
            if out.remaining() >= this.capacity {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadBuffer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::ReadBuffer;

    async fn pair(capacity: usize) -> (ReadBuffer, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let c = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (ReadBuffer::new(s, capacity), c)
    }

    #[tokio::test]
    async fn holds_no_memory_until_readable_and_keeps_it_once_taken() {
        let (mut r, mut peer) = pair(64 * 1024).await;
        assert_eq!(r.buf.capacity(), 0, "nothing before the first read");
        peer.write_all(b"hello world").await.expect("write");
        let mut small = [0u8; 5];
        r.read_exact(&mut small).await.expect("read");
        assert_eq!(&small, b"hello");
        assert!(r.buf.capacity() > 0, "the rest is held");
        let mut rest = [0u8; 6];
        r.read_exact(&mut rest).await.expect("read");
        assert_eq!(&rest, b" world");
        assert!(r.buf.capacity() > 0, "drained: kept for the next read");
        drop(peer);
        let mut end = Vec::new();
        r.read_to_end(&mut end).await.expect("eof");
        assert!(end.is_empty());
    }

    #[tokio::test]
    async fn passes_every_byte_through_in_order() {
        let (mut r, mut peer) = pair(4096).await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(&sent).await.expect("write");
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let n = r.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.expect("writer");
        assert_eq!(got, data);
    }
}
