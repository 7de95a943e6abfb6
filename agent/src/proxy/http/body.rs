//! Bodies as they stream through the proxy: never buffered whole. The request body is counted on
//! its way upstream; the response body is counted on its way to the app and finishes the
//! request's telemetry when it ends (or is dropped: the app went away first).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use crate::proxy::metrics::requests::RequestResult;

/// The body type of every request and response the proxy handles.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

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
}

impl<B: Body<Data = Bytes>> Finishing<B> {
    pub fn new(inner: B, result: RequestResult) -> Self {
        let mut this = Finishing {
            inner,
            result: Some(result),
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

impl<B: Body<Data = Bytes> + Unpin> Body for Finishing<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = self.result.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        r.add_response_body(data.len() as u64);
                    } else if let Some(trailers) = frame.trailers_ref() {
                        r.grpc_status_from(trailers);
                    }
                }
                if self.inner.is_end_stream() {
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
        polled
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
