//! One HBONE stream (an HTTP/2 CONNECT stream), in two forms:
//! - [`Stream`]: an end of a relay (`copy::Duplex`), moving `Bytes` chunks without copying them
//!   and releasing the receive window only once a chunk has been written on the other side;
//! - [`H2Stream`]: `AsyncRead + AsyncWrite`, so an HTTP client or server (hyper) can run inside a
//!   tunnel, as a waypoint or a sidecar's L7 proxy would.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::Slot;
use crate::proxy::copy::{Duplex, ReadHalf, WriteHalf};

/// An open CONNECT stream, client or server side. On the client side it holds its slot on the
/// pooled connection until it ends.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub(super) slot: Option<Slot>,
}

impl Stream {
    /// A server-side stream (no pool slot).
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Stream {
            send,
            recv,
            slot: None,
        }
    }

    /// The stream as `AsyncRead + AsyncWrite`.
    pub fn into_io(self) -> H2Stream {
        self.into_io_after(Bytes::new())
    }

    /// As [`Stream::into_io`], reading `first` (bytes already taken from the stream, their
    /// window released) before the rest.
    pub fn into_io_after(self, first: Bytes) -> H2Stream {
        H2Stream {
            send: self.send,
            recv: self.recv,
            pending: first,
            _slot: self.slot,
        }
    }
}

pub struct StreamRead(RecvStream);

pub struct StreamWrite {
    send: SendStream<Bytes>,
    _slot: Option<Slot>,
}

impl ReadHalf for StreamRead {
    async fn read(&mut self) -> io::Result<Option<Bytes>> {
        match self.0.data().await {
            Some(Ok(chunk)) => Ok(Some(chunk)),
            Some(Err(e)) => Err(h2_io(e)),
            None => Ok(None),
        }
    }

    fn release(&mut self, n: usize) {
        let _ = self.0.flow_control().release_capacity(n);
    }
}

impl WriteHalf for StreamWrite {
    /// Sends as the peer's flow-control window allows.
    async fn write(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            self.send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| self.send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2_io(e)),
                // The stream was reset or the connection failed.
                None => return Err(io::ErrorKind::BrokenPipe.into()),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            self.send.send_data(chunk, false).map_err(h2_io)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.send.send_data(Bytes::new(), true).map_err(h2_io)
    }
}

impl Duplex for Stream {
    type Read = StreamRead;
    type Write = StreamWrite;

    fn split(self) -> (StreamRead, StreamWrite) {
        (
            StreamRead(self.recv),
            StreamWrite {
                send: self.send,
                _slot: self.slot,
            },
        )
    }

    fn reset(_read: StreamRead, mut write: StreamWrite) {
        // RFC 9113 §8.5: a CONNECT proxy resets the stream with CONNECT_ERROR when the TCP
        // connection it stands for fails.
        write.send.send_reset(Reason::CONNECT_ERROR);
    }
}

/// A CONNECT stream as `AsyncRead + AsyncWrite`. Dropped without a shutdown, the stream is reset
/// (CANCEL), as h2 does for every abandoned stream.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    _slot: Option<Slot>,
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    // The reader takes it from here: the window reopens as it is handed over.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                // END_STREAM: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends what it is given as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.send.send_data(Bytes::new(), true).map_err(h2_io))
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into())
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}
