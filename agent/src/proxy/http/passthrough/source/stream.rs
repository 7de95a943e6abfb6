//! Source-side HTTP/2 requests without a body, sent upstream as the relay's HTTP/1.1 bytes. An
//! app's HTTP/2 stream whose request ended with its headers (a GET, a HEAD, a DELETE) and whose
//! route the relay can follow (`source::relayable`, for an HTTP/1.1 upstream) is routed as the
//! full path routes it, then written from the stream's own task as the head the upstream gets,
//! on a pooled raw upstream connection (`client::RawConn`), under the same tries as the
//! HTTP/1.1 relay (`source::tries`). The response's head becomes the stream's response and its
//! body is read from that connection as the stream is sent on ([`RawBody`]), its framing
//! followed; the connection goes back to the pool when the body has ended whole.
//!
//! hyper's HTTP/1.1 client would otherwise carry the request through its dispatch channel to a
//! connection task and the response back, one task and two wake-ups more per request (where the
//! l7 bench found HTTP/2 from the app costing more than HTTP/1.1 at the source).
//!
//! What the stream gets is what `forward` would give it: hop-by-hop headers dropped, the
//! informational responses left out (hyper's HTTP/2 server sends none it did not make), the
//! chunked coding's trailers as the stream's trailers. A route's `timeout` spans the body as
//! in `forward` (`body::Finishing`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};

use super::relayable;
use super::tries::{self, Sent, Tried};
use crate::proxy::http::body::{BoxError, Finishing, ProxyBody};
use crate::proxy::http::client::{PoolSettings, RawConn, UpstreamError, UpstreamKey};
use crate::proxy::http::headers::{self, LocalReply};
use crate::proxy::http::outbound::{authority, Forward, HttpConn, Local};
use crate::proxy::http::passthrough::framing::{Body, Chunked, ResponseHead, MAX_HEADERS};
use crate::proxy::http::passthrough::READ_SIZE;
use crate::proxy::metrics::requests::RequestResult;
use crate::proxy::{Counters, ProxyInputs};
use crate::routing::resilience::RetryPolicy;
use crate::snapshot::Snapshot;

/// How the body read from the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream closed its connection before the response body ended")]
    Closed,
    #[error("the upstream's response body is not a valid chunked coding")]
    Malformed,
    #[error("reading the upstream's response body: {0}")]
    Read(#[from] std::io::Error),
}

/// The retry policy of an app's HTTP/2 request this relay sends (`Some(None)`: none), or None:
/// `forward`'s. Decided before the request's telemetry opens, as the HTTP/1.1 relay decides.
pub(in crate::proxy::http) fn takes<'s>(
    conn: &HttpConn,
    snap: &'s Snapshot,
    fwd: &Forward<'s>,
    req: &Request<Incoming>,
) -> Option<Option<&'s RetryPolicy>> {
    let plain = conn.pi.source_relay
        && req.version() == http::Version::HTTP_2
        && hyper::body::Body::is_end_stream(req.body())
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::EXPECT)
        // The upstream's `Host` (`forward` would send the original destination's address).
        && authority(req).is_some();
    if !plain {
        return None;
    }
    relayable(conn, snap, fwd, req).map(|(_, policy)| policy)
}

/// Sends the request (one [`takes`] took) and answers the stream with the upstream's response.
pub(in crate::proxy::http) async fn respond(
    conn: &Arc<HttpConn>,
    snap: &Snapshot,
    fwd: &Forward<'_>,
    policy: Option<&RetryPolicy>,
    mut req: Request<Incoming>,
    mut result: RequestResult,
) -> Response<ProxyBody> {
    let Some(cluster) = fwd.cluster.as_ref() else {
        // `takes` took only requests to a cluster.
        let local = Local::new(LocalReply::no_cluster(), "cluster_not_found");
        return conn.local_reply(result, *local, None);
    };
    Counters::inc(&conn.pi.counters.http_outbound_relayed);
    let to_head = req.method() == Method::HEAD;
    let Some((plan, picked)) = tries::plan(conn, fwd, cluster, policy, &mut req, to_head) else {
        let local = Local::new(LocalReply::no_healthy_upstream(), "no_healthy_upstream");
        return conn.local_reply(result, *local, None);
    };
    let deadline = plan.deadline;
    let mut buf = BytesMut::new();
    // Informational responses are not sent on (hyper's server sends its own `100 Continue`).
    let mut informational = tokio::io::sink();
    let tried = tries::tries(
        conn,
        snap,
        &plan,
        picked,
        &mut informational,
        &mut buf,
        &mut result,
    )
    .await;
    let Sent {
        up,
        head,
        key,
        picked,
    } = match tried {
        Tried::Response(sent) => sent,
        Tried::Local { reply, details } => {
            return conn.local_reply(result, *Local::new(reply, details), None);
        }
    };
    let Some(mut parts) = response_parts(&buf[..head.len], head.status) else {
        let e = UpstreamError::Malformed {
            endpoint: key.endpoint,
        };
        let local = Local::new(LocalReply::upstream_failed(e.response_flag()), e.details());
        return conn.local_reply(result, *local, Some(key.endpoint));
    };
    headers::strip_hop_by_hop(&mut parts.headers, false);
    result.set_response(parts.status.as_u16(), &parts.headers);
    if let Some(log) = result.log.as_mut() {
        log.details = "via_upstream";
    }
    buf.advance(head.len);
    let settings = PoolSettings::of(Some(&**cluster));
    let body = RawBody::new(&conn.pi, up, key, settings, buf, &head, picked);
    // Envoy's route timeout spans the whole response: a body still streaming when it passes is
    // cut (the stream is reset, flag `UT`).
    let body = Finishing::until(body, result, deadline);
    Response::from_parts(parts, body.boxed())
}

/// The response head `raw` (whole, parsed once already) as `http`'s response parts; None when
/// a part does not fit `http`'s types (the response is then the upstream's protocol error).
fn response_parts(raw: &[u8], status: u16) -> Option<http::response::Parts> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut parsed);
    let Ok(httparse::Status::Complete(_)) = r.parse(raw) else {
        return None;
    };
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(status).ok()?;
    let headers = resp.headers_mut();
    headers.reserve(r.headers.len());
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        // A copy: no value keeps the read buffer (HPACK keeps values it indexes).
        headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    Some(resp.into_parts().0)
}

/// A response body read from a raw upstream connection as its framing says: data as it comes,
/// then the chunked coding's trailers, if any. The connection goes back to the pool when the
/// body has ended whole with nothing after it (and the upstream keeps it open); the endpoint
/// stays busy (least-request) until then or until the body is dropped.
pub(in crate::proxy::http) struct RawBody {
    pi: Arc<ProxyInputs>,
    /// None once the body has ended.
    up: Option<RawConn>,
    key: UpstreamKey,
    settings: PoolSettings,
    buf: BytesMut,
    framing: Body,
    /// The connection can carry another request after the body (no `Connection: close`, a body
    /// that does not run until the close).
    reusable: bool,
    /// The chunked coding's trailer section as it came (the bytes after the last chunk's size
    /// line).
    trailer: Vec<u8>,
    /// Dropped when the body ends: the endpoint is no longer busy.
    picked: Option<crate::proxy::http::balance::Picked>,
}

impl RawBody {
    fn new(
        pi: &Arc<ProxyInputs>,
        up: RawConn,
        key: UpstreamKey,
        settings: PoolSettings,
        buf: BytesMut,
        head: &ResponseHead,
        picked: crate::proxy::http::balance::Picked,
    ) -> Self {
        let mut body = RawBody {
            pi: pi.clone(),
            up: Some(up),
            key,
            settings,
            buf,
            framing: head.body.clone(),
            reusable: !head.close && !head.until_close,
            trailer: Vec::new(),
            picked: Some(picked),
        };
        // A body that is empty from the start (HEAD, 204, 304, `content-length: 0`) is never
        // polled: it has ended.
        if body.framing.done() {
            body.end();
        }
        body
    }

    /// The body has ended: the connection goes back to the pool if it can carry another
    /// request, the endpoint is no longer busy.
    fn end(&mut self) {
        if let Some(up) = self.up.take() {
            if self.reusable && self.buf.is_empty() {
                let reuse = !self.pi.drain.is_draining();
                self.pi
                    .upstreams
                    .checkin_raw(&self.key, self.settings, reuse, up);
            }
        }
        self.picked = None;
    }
}

/// Follows `framing` over `buf`: the next data bytes there, past the framing around them (None:
/// none there yet, or the body is done); the chunked coding's trailer section appended to
/// `trailer` as it passes.
fn next_data(
    framing: &mut Body,
    buf: &mut BytesMut,
    trailer: &mut Vec<u8>,
) -> Result<Option<Bytes>, BodyError> {
    loop {
        if buf.is_empty() || framing.done() {
            return Ok(None);
        }
        let take = match framing {
            Body::Chunked(Chunked::Data(left)) => (*left).min(buf.len() as u64) as usize,
            Body::Chunked(state) => {
                // Framing, one byte at a time: a size line, CRLFs, the trailer section.
                let in_trailer = matches!(
                    state,
                    Chunked::TrailerStart
                        | Chunked::TrailerLine
                        | Chunked::TrailerLf
                        | Chunked::EndLf
                );
                let (used, _) = framing
                    .advance(&buf[..1])
                    .map_err(|()| BodyError::Malformed)?;
                if in_trailer {
                    trailer.push(buf[0]);
                }
                buf.advance(used);
                continue;
            }
            _ => buf.len(),
        };
        let (used, _) = framing
            .advance(&buf[..take])
            .map_err(|()| BodyError::Malformed)?;
        if used == 0 {
            return Ok(None);
        }
        return Ok(Some(buf.split_to(used).freeze()));
    }
}

/// A chunked body's trailer section (its fields and the empty line that ends it) as trailers;
/// None when it has no field.
fn trailers_of(raw: &[u8]) -> Option<HeaderMap> {
    let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(raw, &mut parsed)
    else {
        return None;
    };
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for f in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(f.name.as_bytes()),
            HeaderValue::from_bytes(f.value),
        ) {
            trailers.append(name, value);
        }
    }
    (!trailers.is_empty()).then_some(trailers)
}

impl hyper::body::Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match next_data(&mut this.framing, &mut this.buf, &mut this.trailer) {
                Ok(Some(data)) => {
                    if this.framing.done() && this.trailer.is_empty() {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {}
                Err(e) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            if this.framing.done() {
                let trailers = trailers_of(&std::mem::take(&mut this.trailer));
                this.end();
                return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
            }
            let Some(up) = this.up.as_mut() else {
                return Poll::Ready(None);
            };
            this.buf.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut up.io), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if this.framing == Body::UntilClose => {
                    this.reusable = false;
                    this.framing = Body::Empty;
                }
                Poll::Ready(Ok(0)) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(BodyError::Closed.into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.up = None;
                    return Poll::Ready(Some(Err(BodyError::Read(e).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.up.is_none() && self.trailer.is_empty()
    }
}

#[cfg(test)]
mod tests;
