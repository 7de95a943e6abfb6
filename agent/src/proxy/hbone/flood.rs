//! A bound on the control frames an HBONE client may send, in the server's I/O layer (between
//! TLS and HTTP/2).
//!
//! The h2 crate bounds some floods itself: empty DATA frames (100 per connection), streams reset
//! before they are accepted (`max_pending_accept_reset_streams`), streams it resets for the
//! peer's errors (`max_local_error_reset_streams`), header lists (`max_header_list_size`); each
//! closes the connection with GOAWAY ENHANCE_YOUR_CALM. It answers every SETTINGS and PING and
//! processes every RST_STREAM without a limit, so a client sending nothing else keeps the server
//! acknowledging forever. [`Guarded`] reads the frame headers as they pass (9 bytes each; payloads
//! are skipped, not copied) and gives each connection a budget of such frames, as nghttp2 does for
//! stream resets (`nghttp2_option_set_stream_reset_rate_limit`: a burst of 1,000, refilled at 33 a
//! second): [`BURST`] to start with, refilled at [`REFILL_PER_SECOND`] and by every new stream.
//! A ztunnel client pings every 10 s; a pooled ambit client sends one SETTINGS per connection.
//! When the budget runs out, the bytes from that frame on are withheld from h2 (it never sees the
//! frame) and the connection is told to close ([`Tripwire`]): it sends GOAWAY ENHANCE_YOUR_CALM,
//! as h2 does for the floods it bounds.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// Control frames a connection may send at once.
pub const BURST: u32 = 1000;
/// Control frames a connection earns back per second.
pub const REFILL_PER_SECOND: u32 = 33;
/// Control frames a new stream (a HEADERS frame) earns back: a stream may end in RST_STREAM.
pub const STREAM_CREDIT: u32 = 1;

/// RFC 9113 §6: the client connection preface precedes the first frame.
const PREFACE_LEN: u8 = 24;
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Tells the connection's owner that the client flooded.
#[derive(Debug, Default)]
pub struct Tripwire(Notify);

impl Tripwire {
    /// Resolves once the budget has run out (at once if it already has).
    pub async fn tripped(&self) {
        self.0.notified().await;
    }
}

/// The server's transport with the control-frame budget on its read side.
#[derive(Debug)]
pub struct Guarded<T> {
    inner: T,
    frames: FrameReader,
    budget: Budget,
    tripwire: Arc<Tripwire>,
    flooded: bool,
}

impl<T> Guarded<T> {
    /// `inner` carries the client's HTTP/2 from its connection preface on.
    pub fn new(inner: T) -> (Self, Arc<Tripwire>) {
        let tripwire = Arc::new(Tripwire::default());
        let guarded = Guarded {
            inner,
            frames: FrameReader::default(),
            budget: Budget::new(Instant::now()),
            tripwire: tripwire.clone(),
            flooded: false,
        };
        (guarded, tripwire)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.flooded {
            // Nothing more is read: the owner closes the connection with a GOAWAY.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let budget = &mut this.budget;
        let refused = this.frames.feed(&buf.filled()[before..], |frame| {
            budget.admit(frame, Instant::now)
        });
        if let Some(at) = refused {
            this.flooded = true;
            buf.set_filled(before + at);
            this.tripwire.0.notify_one();
            if at == 0 {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub len: u32,
}

/// Finds the frame headers in the client's byte stream, whatever the reads cut it into.
#[derive(Debug)]
pub struct FrameReader {
    /// Bytes of the connection preface still to pass.
    preface: u8,
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes of `header` read so far.
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: u32,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            preface: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            payload: 0,
        }
    }
}

impl FrameReader {
    /// Passes `bytes` on, showing `admit` each complete frame header; at the first it refuses,
    /// returns where that frame begins in `bytes` (0 if it began in an earlier read).
    pub fn feed(&mut self, bytes: &[u8], mut admit: impl FnMut(Frame) -> bool) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            let left = bytes.len() - i;
            if self.preface > 0 {
                let n = left.min(usize::from(self.preface));
                // n ≤ preface ≤ 24.
                self.preface -= n as u8;
                i += n;
            } else if self.payload > 0 {
                let n = left.min(self.payload as usize);
                // n ≤ payload, a u32.
                self.payload -= n as u32;
                i += n;
            } else {
                let start = if self.have == 0 { i } else { 0 };
                let n = left.min(FRAME_HEADER_LEN - self.have);
                self.header[self.have..self.have + n].copy_from_slice(&bytes[i..i + n]);
                self.have += n;
                i += n;
                if self.have == FRAME_HEADER_LEN {
                    self.have = 0;
                    let h = self.header;
                    let frame = Frame {
                        len: u32::from_be_bytes([0, h[0], h[1], h[2]]),
                        kind: h[3],
                        flags: h[4],
                    };
                    if !admit(frame) {
                        return Some(start);
                    }
                    self.payload = frame.len;
                }
            }
        }
        None
    }
}

/// One connection's allowance of control frames (a token bucket, refilled lazily: the clock is
/// read only when the allowance is spent).
#[derive(Debug)]
pub struct Budget {
    tokens: u32,
    since: Instant,
}

impl Budget {
    pub fn new(now: Instant) -> Self {
        Budget {
            tokens: BURST,
            since: now,
        }
    }

    /// Whether `frame` may pass: control frames spend the allowance, new streams add to it.
    pub fn admit(&mut self, frame: Frame, now: impl FnOnce() -> Instant) -> bool {
        let control = match frame.kind {
            SETTINGS | PING => frame.flags & ACK == 0,
            RST_STREAM => true,
            HEADERS => {
                self.tokens = (self.tokens + STREAM_CREDIT).min(BURST);
                false
            }
            _ => false,
        };
        if !control {
            return true;
        }
        if self.tokens == 0 {
            let now = now();
            let earned = now.saturating_duration_since(self.since).as_millis()
                * u128::from(REFILL_PER_SECOND)
                / 1000;
            if earned > 0 {
                self.tokens = u32::try_from(earned).unwrap_or(BURST).min(BURST);
                self.since = now;
            }
        }
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
