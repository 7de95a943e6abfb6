//! Request bodies that a retry can send again. Envoy buffers a request's body while it retries or
//! shadows it, up to the connection's buffer limit (`per_connection_buffer_limit_bytes`, 1 MiB by
//! default); a body that outgrows it is no longer retried (`retry_or_shadow_abandoned`) and the
//! attempt in flight goes on streaming it. ambit does the same with [`MAX_REPLAY_BYTES`]: the
//! body streams to the first attempt as it arrives (never held back), a copy of each chunk is kept
//! (a `Bytes` clone, no copy of the data) until the limit, and a retry replays the copy and then
//! goes on reading the app's body where the last attempt left it.
//!
//! Only one attempt owns the body at a time: starting a new one makes the older attempts' bodies
//! fail (an abandoned attempt may still be polled by its connection; failing it makes hyper reset
//! that request instead of ending it as if the body were complete).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// The most request-body bytes kept for a retry (Envoy's default buffer limit, 1 MiB).
pub const MAX_REPLAY_BYTES: usize = 1 << 20;

pub use super::body::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("a newer attempt of the request took over its body")]
    Superseded,
    #[error("the request body outgrew the retry buffer and cannot be sent again")]
    Overflowed,
}

struct Shared<B> {
    /// The app's body, until it has been read to its end.
    inner: Option<B>,
    /// Everything read so far, while under the limit.
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The body has been read to its end (`chunks` and `trailers` are all of it).
    ended: bool,
    /// More than the limit was read: nothing can be replayed.
    overflowed: bool,
    /// The attempt that owns the body.
    owner: u64,
    limit: usize,
}

/// The request body of every attempt of one request.
pub struct Replay<B> {
    shared: Arc<Mutex<Shared<B>>>,
    next_attempt: u64,
}

impl<B> Replay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(body: B) -> Self {
        Replay::with_limit(body, MAX_REPLAY_BYTES)
    }

    pub fn with_limit(body: B, limit: usize) -> Self {
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                inner: Some(body),
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                ended: false,
                overflowed: false,
                owner: 0,
                limit,
            })),
            next_attempt: 0,
        }
    }

    /// Whether another attempt could still send the whole body.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// The body of the next attempt, which takes the body over from the earlier ones; None when
    /// it can no longer be replayed.
    pub fn attempt(&mut self) -> Option<AttemptBody<B>> {
        let attempt = self.next_attempt + 1;
        {
            let mut shared = self.lock();
            if shared.overflowed {
                return None;
            }
            shared.owner = attempt;
        }
        self.next_attempt = attempt;
        Some(AttemptBody {
            shared: self.shared.clone(),
            attempt,
            replayed: 0,
            trailers_sent: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<B>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One attempt's request body: the chunks read so far, then the rest of the app's body.
pub struct AttemptBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    attempt: u64,
    /// Chunks of `Shared::chunks` already sent by this attempt.
    replayed: usize,
    trailers_sent: bool,
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if shared.owner != this.attempt {
            return Poll::Ready(Some(Err(ReplayError::Superseded.into())));
        }
        // What earlier attempts read, first.
        if this.replayed < shared.chunks.len() {
            let chunk = shared.chunks[this.replayed].clone();
            this.replayed += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if this.replayed > 0 && shared.overflowed {
            // Unreachable by `attempt`, kept as a guard: a replay with a hole in it is never sent.
            return Poll::Ready(Some(Err(ReplayError::Overflowed.into())));
        }
        if shared.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = shared.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(inner) = shared.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.ended = true;
                shared.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // The app's body failed: no attempt can send it whole.
                shared.overflowed = true;
                shared.chunks.clear();
                shared.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !shared.overflowed {
                            shared.len += data.len();
                            if shared.len > shared.limit {
                                shared.overflowed = true;
                                shared.chunks = Vec::new();
                            } else {
                                shared.chunks.push(data.clone());
                            }
                        }
                        this.replayed = shared.chunks.len();
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            shared.trailers = Some(trailers.clone());
                            shared.ended = true;
                            shared.inner = None;
                            this.trailers_sent = true;
                            Frame::trailers(trailers)
                        }
                        // Neither data nor trailers: nothing hyper's bodies make; passed on.
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.owner == self.attempt
            && shared.ended
            && self.replayed >= shared.chunks.len()
            && (self.trailers_sent || shared.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let sent: u64 = shared.chunks[..self.replayed.min(shared.chunks.len())]
            .iter()
            .map(|c| c.len() as u64)
            .sum();
        let buffered = shared.len as u64;
        match &shared.inner {
            // The whole body is known (buffered, or the rest's exact size).
            None if !shared.overflowed => SizeHint::with_exact(buffered - sent),
            Some(inner) if !shared.overflowed => {
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(buffered - sent + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(buffered - sent + upper);
                }
                hint
            }
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
