//! The frames h2 writes while it is polled once go to TLS together, not one by one.
//!
//! h2 (0.4) copies a DATA frame into its write buffer, where the frames of many streams gather into
//! one write, only when the frame is shorter than 256 bytes (`CHAIN_THRESHOLD`, for a transport
//! that takes vectored writes). It writes a longer one on its own, and flushes the transport each
//! time, before it takes the next frame. So every HTTP/1.1 request head of more than 256 bytes
//! (a few trace headers are enough) and every 1 KiB response went to rustls alone: a TLS record, a
//! `writev` and a packet each, also under load with dozens of streams ready at once. That cost the
//! sending agent, the node link and the peer that opens each record more than the bytes did (the
//! l7 bench: five trace headers per request cost +20 % CPU per request, mostly in the sending
//! agent's kernel).
//!
//! [`coalesce`] splits a transport in two: [`Coalesced`], which h2 writes to, keeps what it is
//! given in a buffer of [`CAPACITY`] bytes (a write at least that long, such as a bulk transfer's
//! 16 KiB chunk, goes straight on, as before) and takes h2's flushes as done; [`Flusher`] writes
//! the buffer out after each poll of the connection ([`Flusher::after`]), when h2 has written all
//! it had. Nothing waits for more than the poll that wrote it, so latency is unchanged.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufWriter, ReadBuf};

/// Writes shorter than this are gathered; longer ones go straight to the transport.
pub const CAPACITY: usize = 8 * 1024;

struct Shared<T> {
    writer: BufWriter<T>,
    /// A failed write-out, returned to h2 with its next write or flush.
    failed: Option<io::ErrorKind>,
}

/// The transport h2 reads and writes (its flushes are done by the [`Flusher`]).
pub struct Coalesced<T>(Arc<Mutex<Shared<T>>>);

/// Writes out what h2 wrote, after each poll of the connection.
pub struct Flusher<T>(Arc<Mutex<Shared<T>>>);

/// `io` split into the transport for h2 and its flusher.
pub fn coalesce<T: AsyncWrite>(io: T) -> (Coalesced<T>, Flusher<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        writer: BufWriter::with_capacity(CAPACITY, io),
        failed: None,
    }));
    (Coalesced(shared.clone()), Flusher(shared))
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).writer).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.0);
        if let Some(kind) = s.failed {
            return Poll::Ready(Err(kind.into()));
        }
        Pin::new(&mut s.writer).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.0);
        if let Some(kind) = s.failed {
            return Poll::Ready(Err(kind.into()));
        }
        Pin::new(&mut s.writer).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Done by the [`Flusher`] once h2 has written all it had in this poll.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match lock(&self.0).failed {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).writer).poll_shutdown(cx)
    }
}

impl<T: AsyncWrite + Unpin> Flusher<T> {
    /// Writes out what was gathered; when the transport cannot take it now, it is woken when it
    /// can (and `fut`'s task polls again, then writes it out).
    fn write_out(&self, cx: &mut Context<'_>) {
        let mut s = lock(&self.0);
        if s.failed.is_some() {
            return;
        }
        if let Poll::Ready(Err(e)) = Pin::new(&mut s.writer).poll_flush(cx) {
            s.failed = Some(e.kind());
        }
    }

    /// `fut` (something that polls the HTTP/2 connection), with what h2 wrote written out after
    /// each poll.
    pub async fn after<F: Future>(&self, fut: F) -> F::Output {
        tokio::pin!(fut);
        std::future::poll_fn(|cx| {
            let polled = fut.as_mut().poll(cx);
            self.write_out(cx);
            polled
        })
        .await
    }

    /// The HTTP/2 connection future `conn`, with what it wrote written out after each poll.
    pub fn wrap<F: Future + Unpin>(self, conn: F) -> Flushed<F, T> {
        Flushed {
            conn,
            flusher: self,
        }
    }
}

/// A connection future whose writes are written out after each of its polls ([`Flusher::wrap`]).
pub struct Flushed<F, T> {
    conn: F,
    flusher: Flusher<T>,
}

impl<F: Future + Unpin, T: AsyncWrite + Unpin> Future for Flushed<F, T> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let polled = Pin::new(&mut self.conn).poll(cx);
        self.flusher.write_out(cx);
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use bytes::Bytes;

    use super::coalesce;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A transport that counts the writes it is given, and takes vectored ones as TLS does.
    struct Counting<T> {
        io: T,
        writes: Arc<AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const STREAMS: usize = 64;
    /// About an HTTP/1.1 request head with B3 trace headers.
    const FRAME: usize = 400;

    /// A server that counts what each stream brought, sent on `done`.
    fn serve(io: tokio::io::DuplexStream, done: tokio::sync::mpsc::UnboundedSender<usize>) {
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.expect("server handshake");
            while let Some(next) = conn.accept().await {
                let (req, _respond) = next.expect("stream");
                let done = done.clone();
                tokio::spawn(async move {
                    let mut body = req.into_body();
                    let mut got = 0;
                    while let Some(data) = body.data().await {
                        let data = data.expect("data");
                        got += data.len();
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                    let _ = done.send(got);
                });
            }
        });
    }

    /// Opens [`STREAMS`] streams at once on an HTTP/2 client, each sending one [`FRAME`]-byte
    /// DATA frame, over a transport that counts its writes (through [`coalesce`] when
    /// `coalesced`); returns what the server received on each stream and the writes.
    async fn burst(coalesced: bool) -> (Vec<usize>, usize) {
        let writes = Arc::new(AtomicUsize::new(0));
        let (client, server) = tokio::io::duplex(1 << 20);
        let io = Counting {
            io: client,
            writes: writes.clone(),
        };
        let (done, mut received) = tokio::sync::mpsc::unbounded_channel();
        serve(server, done);
        let mut send = if coalesced {
            let (io, flusher) = coalesce(io);
            let (send, conn) = flusher
                .after(h2::client::handshake(io))
                .await
                .expect("client handshake");
            tokio::spawn(flusher.wrap(conn));
            send
        } else {
            let (send, conn) = h2::client::handshake(io).await.expect("client handshake");
            tokio::spawn(conn);
            send
        };
        let mut streams = Vec::new();
        // Queued before the connection's task runs again (one thread): all ready at once.
        for _ in 0..STREAMS {
            send = send.ready().await.expect("ready");
            let req = http::Request::post("http://peer/")
                .body(())
                .expect("request");
            let (resp, mut stream) = send.send_request(req, false).expect("send");
            stream
                .send_data(Bytes::from(vec![b'x'; FRAME]), true)
                .expect("data");
            streams.push((resp, stream));
        }
        let mut got = Vec::new();
        while got.len() < STREAMS {
            got.push(received.recv().await.expect("server"));
        }
        (got, writes.load(Ordering::Relaxed))
    }

    /// The frames of many streams that h2 writes in one poll reach the transport in a few writes,
    /// intact; h2 alone writes each DATA frame of 256 bytes or more on its own (shown here too,
    /// so a change of h2's behaviour is seen).
    #[tokio::test]
    async fn frames_written_in_one_poll_share_the_transports_writes() {
        let (got, writes) = burst(true).await;
        assert_eq!(got, vec![FRAME; STREAMS], "every stream's bytes, intact");
        // 64 frames of 409 bytes and their HEADERS: about four buffers of 8 KiB, plus the
        // preface, SETTINGS and their ACK.
        assert!(
            writes <= 12,
            "{writes} writes for {STREAMS} streams' frames"
        );

        let (got, writes) = burst(false).await;
        assert_eq!(got, vec![FRAME; STREAMS]);
        assert!(
            writes >= STREAMS,
            "h2 alone: {writes} writes for {STREAMS} streams' frames"
        );
    }
}
