//! The one bidirectional copy: bytes both ways between two connections until both directions have
//! ended, with the end of each behaving as a direct connection's would. A FIN (or an HTTP/2
//! END_STREAM) on one side ends that direction on the other; a reset or error on either side resets
//! both (a TCP RST, or RST_STREAM CONNECT_ERROR as RFC 9113 §8.5 asks of a CONNECT proxy).
//!
//! The two ends are [`Duplex`]: a TCP socket, or an HBONE stream (`hbone::stream`). Data moves as
//! `Bytes` chunks, so the HTTP/2 side sends what was read without another copy, and its receive
//! window is released only once a chunk is written (a slow reader slows the sender). Between two
//! TCP sockets, a direction that streams moves on by [`splice`]: kernel to kernel, not through
//! this process.

use std::future::Future;
use std::io;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Starts small so idle connections cost little; grows for bulk transfers (as ztunnel does).
/// On HBONE a chunk becomes one DATA frame (a 9-byte header, then the chunk), which TLS cuts into
/// records of at most 16 KiB of plaintext. The sizes are ztunnel's, 64 bytes short of whole records,
/// so a full chunk's frame fills its records: a 16 KiB chunk was a 16 KiB record and a 9-byte one,
/// each sealed, sent and opened on its own.
const TLS_RECORD: usize = 16 * 1024;
const INITIAL_BUF: usize = TLS_RECORD - 64;
const LARGE_BUF: usize = 16 * TLS_RECORD - 64;
/// Consecutive full reads before growing the buffer.
const FULL_READS_TO_GROW: u32 = 4;

mod splice;

/// The receiving half of one end.
pub trait ReadHalf: Send {
    /// The next chunk; `None` at the end of the stream (FIN, END_STREAM).
    fn read(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// `n` bytes of what was read have been written on the other side.
    fn release(&mut self, _n: usize) {}
    /// This half as a TCP socket's, which a bulk transfer can splice from.
    fn tcp(&mut self) -> Option<&mut TcpRead> {
        None
    }
}

/// The sending half of one end.
pub trait WriteHalf: Send {
    fn write(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends this direction (FIN, END_STREAM).
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// This half as a TCP socket's, which a bulk transfer can splice to.
    fn tcp(&mut self) -> Option<&mut TcpWrite> {
        None
    }
}

/// One end of a relay.
pub trait Duplex: Send {
    type Read: ReadHalf;
    type Write: WriteHalf;
    fn split(self) -> (Self::Read, Self::Write);
    /// Aborts this end after a failure on either side.
    fn reset(read: Self::Read, write: Self::Write);
}

/// Which end failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub a_to_b: u64,
    pub b_to_a: u64,
    /// The end whose error or reset ended the relay (both ends were reset then).
    pub failed: Option<Side>,
}

impl Outcome {
    pub fn reset(&self) -> bool {
        self.failed.is_some()
    }
}

/// Relays between `a` and `b` until both directions are done. With `splice` (the count of bytes
/// spliced), a direction between two TCP sockets that streams goes on by [`splice`]; without,
/// every byte passes through this process.
pub async fn bidirectional<A: Duplex, B: Duplex>(
    a: A,
    b: B,
    splice: Option<&AtomicU64>,
) -> Outcome {
    let (mut ar, mut aw) = a.split();
    let (mut br, mut bw) = b.split();
    let (mut a_to_b, mut b_to_a, mut failed) = (None, None, None);
    {
        let ab = one_way(&mut ar, &mut bw, (Side::A, Side::B), splice);
        let ba = one_way(&mut br, &mut aw, (Side::B, Side::A), splice);
        tokio::pin!(ab, ba);
        while a_to_b.is_none() || b_to_a.is_none() {
            tokio::select! {
                r = &mut ab, if a_to_b.is_none() => match r {
                    Ok(n) => a_to_b = Some(n),
                    Err((n, side)) => { a_to_b = Some(n); failed = Some(side); break; }
                },
                r = &mut ba, if b_to_a.is_none() => match r {
                    Ok(n) => b_to_a = Some(n),
                    Err((n, side)) => { b_to_a = Some(n); failed = Some(side); break; }
                },
            }
        }
    }
    if failed.is_some() {
        A::reset(ar, aw);
        B::reset(br, bw);
    }
    Outcome {
        a_to_b: a_to_b.unwrap_or(0),
        b_to_a: b_to_a.unwrap_or(0),
        failed,
    }
}

/// Copies until the end of `from` (then finishes `to`) or an error; both carry the bytes copied,
/// an error also the end that failed.
async fn one_way<R: ReadHalf, W: WriteHalf>(
    from: &mut R,
    to: &mut W,
    (from_side, to_side): (Side, Side),
    splice: Option<&AtomicU64>,
) -> Result<u64, (u64, Side)> {
    let mut total = 0u64;
    loop {
        match from.read().await {
            Ok(Some(chunk)) => {
                let n = chunk.len();
                to.write(chunk).await.map_err(|_| (total, to_side))?;
                from.release(n);
                total += n as u64;
                let (Some(counter), Some(r), Some(w)) = (splice, from.tcp(), to.tcp()) else {
                    continue;
                };
                if r.full_reads < FULL_READS_TO_GROW || r.unspliceable {
                    continue;
                }
                // The kernel holds the bytes from here on.
                r.buf = BytesMut::new();
                match splice::rest(&r.half, &w.0, counter, &mut total).await {
                    Ok(splice::Spliced::End) => break,
                    Ok(splice::Spliced::Unavailable) => r.unspliceable = true,
                    Err(splice::Failed::From) => return Err((total, from_side)),
                    Err(splice::Failed::To) => return Err((total, to_side)),
                }
            }
            Ok(None) => break,
            Err(_) => return Err((total, from_side)),
        }
    }
    to.finish().await.map_err(|_| (total, to_side))?;
    Ok(total)
}

/// A TCP socket's receiving half, reading into a buffer that grows for bulk transfers.
pub struct TcpRead {
    half: OwnedReadHalf,
    buf: BytesMut,
    size: usize,
    full_reads: u32,
    /// Splicing was tried and is not possible: keep copying.
    unspliceable: bool,
}

pub struct TcpWrite(OwnedWriteHalf);

thread_local! {
    /// Where a TCP end that is not streaming reads: a connection waiting between small messages
    /// then holds no buffer of its own, and a small message costs an allocation of its own size
    /// (a copy of at most 16 KiB) rather than one of a whole buffer per read. (Taking a fresh
    /// 16 KiB buffer per small read cost 10 % of the connection rate and 6 % of the echo latency
    /// with jemalloc, and an owned buffer kept between reads is 16 KiB per idle side.)
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; INITIAL_BUF].into_boxed_slice());
}

impl ReadHalf for TcpRead {
    fn tcp(&mut self) -> Option<&mut TcpRead> {
        Some(self)
    }

    async fn read(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            self.half.readable().await?;
            let read = if self.full_reads > 0 {
                // Streaming: read into the connection's own buffer, which grows; the previous
                // chunk was written and dropped, so this reuses its memory.
                self.buf.reserve(self.size);
                self.half.try_read_buf(&mut self.buf).map(|n| (n, None))
            } else {
                SCRATCH.with_borrow_mut(|scratch| {
                    let n = self.half.try_read(scratch)?;
                    Ok((n, Some(Bytes::copy_from_slice(&scratch[..n]))))
                })
            };
            let (n, small) = match read {
                Ok(r) => r,
                // Readiness was stale: wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            let full = n >= self.size;
            if full {
                self.full_reads += 1;
                if self.full_reads >= FULL_READS_TO_GROW && self.size < LARGE_BUF {
                    self.size = LARGE_BUF;
                }
            } else if self.full_reads > 0 {
                // The burst is over: the buffer goes with this chunk (freed once written).
                self.full_reads = 0;
                self.size = INITIAL_BUF;
                return Ok(Some(std::mem::take(&mut self.buf).freeze()));
            }
            return Ok(Some(match small {
                Some(chunk) => chunk,
                None => self.buf.split().freeze(),
            }));
        }
    }
}

impl WriteHalf for TcpWrite {
    fn tcp(&mut self) -> Option<&mut TcpWrite> {
        Some(self)
    }

    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        self.0.write_all(&data).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        match self.0.shutdown().await {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
            _ => Ok(()),
        }
    }
}

impl Duplex for TcpStream {
    type Read = TcpRead;
    type Write = TcpWrite;

    fn split(self) -> (TcpRead, TcpWrite) {
        let (r, w) = self.into_split();
        (
            TcpRead {
                half: r,
                buf: BytesMut::new(),
                size: INITIAL_BUF,
                full_reads: 0,
                unspliceable: false,
            },
            TcpWrite(w),
        )
    }

    fn reset(read: TcpRead, write: TcpWrite) {
        // Reunited before dropping: a dropped write half sends a FIN first, and the peer would
        // see a clean close instead of the reset.
        if let Ok(stream) = read.half.reunite(write.0) {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
}

#[cfg(test)]
mod tests;
