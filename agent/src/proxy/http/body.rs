//! Bodies as they stream through the proxy: never buffered whole. The request body is counted on
//! its way upstream; the response body is counted on its way to the app and finishes the
//! request's telemetry when it ends (or is dropped: the app went away first).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use crate::proxy::metrics::requests::RequestResult;

/// The error a body of the proxy fails with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the proxy sends to an app.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// The route's timeout passed while the response was still streaming (Envoy's route timeout
/// spans the whole response); the app's stream is reset.
#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout: the route's timeout passed during the response body")]
pub struct RouteTimeout;

/// A body of known bytes (local replies).
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// Counts the data bytes that pass through into `count`.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that records the request when it ends: its bytes, the gRPC status from its
/// trailers, and how it ended (complete; the upstream failed mid-body, `UR`; dropped before the
/// end because the app went away, `DC`).
pub struct Finishing<B: Body<Data = Bytes>> {
    inner: B,
    result: Option<RequestResult>,
    /// The route's timeout, when it has one: the body must end before it (else `UT`).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B: Body<Data = Bytes>> Finishing<B> {
    pub fn new(inner: B, result: RequestResult) -> Self {
        Finishing::until(inner, result, None)
    }

    /// A body that fails with [`RouteTimeout`] (flag `UT`) if it has not ended by `deadline`.
    pub fn until(inner: B, result: RequestResult, deadline: Option<tokio::time::Instant>) -> Self {
        let mut this = Finishing {
            inner,
            result: Some(result),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        };
        // A body that is empty from the start (HEAD, 204, 304) may never be polled.
        if this.inner.is_end_stream() {
            if let Some(r) = this.result.take() {
                r.finish(None);
            }
        }
        this
    }
}

impl<B> Body for Finishing<B>
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
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() && self.result.is_some() {
            if let Some(deadline) = self.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    if let Some(r) = self.result.take() {
                        r.finish(Some("UT"));
                    }
                    return Poll::Ready(Some(Err(RouteTimeout.into())));
                }
            }
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = self.result.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        r.add_response_body(data.len() as u64);
                    } else if let Some(trailers) = frame.trailers_ref() {
                        r.grpc_status_from(trailers);
                    }
                }
                // Trailers are a body's last frame: a writer that drops them (HTTP/1.1 to a
                // client that did not ask for them) need not poll again for the end.
                if frame.is_trailers() || self.inner.is_end_stream() {
                    if let Some(r) = self.result.take() {
                        r.finish(None);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = self.result.take() {
                    r.finish(Some("UR"));
                }
            }
            Poll::Ready(None) => {
                if let Some(r) = self.result.take() {
                    r.finish(None);
                }
            }
            Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body<Data = Bytes>> Drop for Finishing<B> {
    fn drop(&mut self) {
        if let Some(r) = self.result.take() {
            // Dropped before its end: the downstream disconnected (or reset the stream), unless
            // everything had been read and the writer only did not poll for the end.
            let flag = if self.inner.is_end_stream() {
                None
            } else {
                Some("DC")
            };
            r.finish(flag);
        }
    }
}
