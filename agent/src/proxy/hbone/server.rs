//! The server side of HBONE connections: the TLS handshake with the pod's certificate (the client
//! must present one that chains to the trust bundle, with a SPIFFE identity of our trust domain),
//! the HTTP/2 handshake with HBONE's settings, and each request handed on with the client's
//! verified identity. What a request means is the inbound stage's business. A client flooding
//! control frames is cut off (`flood`), and failed handshakes are logged at most once per
//! [`REPORT_INTERVAL`] ([`Throttle`]), with a count: any client can fail a handshake.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, StatusCode};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info};

use super::coalesce::{coalesce, Flusher};
use super::flood::Guarded;
use super::settings::{
    buffered, keepalive, CONNECTION_WINDOW, GOAWAY_GRACE, HANDSHAKE_TIMEOUT,
    MAX_CONCURRENT_STREAMS, MAX_FRAME, MAX_HEADER_LIST, MAX_LOCAL_ERROR_RESETS,
    MAX_PENDING_ACCEPT_RESETS, STREAM_WINDOW,
};
use crate::identity::Identity;
use crate::proxy::drain::Drain;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("TLS handshake with {peer}: {source}")]
    Tls {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the client {peer} presented no SPIFFE identity")]
    NoIdentity { peer: SocketAddr },
    #[error("HTTP/2 handshake with {peer}: {source}")]
    H2 {
        peer: SocketAddr,
        #[source]
        source: h2::Error,
    },
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client or the connection closed it.
    Closed,
    /// The client flooded control frames; it was sent GOAWAY ENHANCE_YOUR_CALM.
    Flooded,
}

/// Serves one accepted connection until it ends, calling `on_request` on a task of its own for
/// each request. Errors before the first request are returned; a connection that ends later is
/// not an error. When `drain` starts, the client is sent GOAWAY (gracefully: streams it opened
/// before it saw it are still served) and the connection closes once its streams have ended.
pub async fn serve<F, Fut>(
    acceptor: &TlsAcceptor,
    drain: &Drain,
    tcp: TcpStream,
    peer: SocketAddr,
    mut on_request: F,
) -> Result<Ended, ServeError>
where
    F: FnMut(Arc<Identity>, Request<h2::RecvStream>, SendResponse<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let _ = tcp.set_nodelay(true);
    keepalive(&tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(buffered(tcp)))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        .map_err(|source| ServeError::Tls { peer, source })?;
    // The verifier accepts only certificates with an identity; this is a safety net.
    let identity = crate::tls::peer_identity(tls.get_ref().1)
        .map(Arc::new)
        .ok_or(ServeError::NoIdentity { peer })?;
    let (io, flusher) = coalesce(tls);
    let (io, tripwire) = Guarded::new(io);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(io);
    let mut conn = flusher
        .after(handshake)
        .await
        .map_err(|source| ServeError::H2 { peer, source })?;
    let draining = drain.started();
    tokio::pin!(draining);
    let mut going_away = false;
    loop {
        tokio::select! {
            () = &mut draining, if !going_away => {
                // h2: GOAWAY with the highest stream id, a PING, then GOAWAY with the last stream
                // taken once the PING comes back (RFC 9113 §6.8's graceful shutdown).
                conn.graceful_shutdown();
                going_away = true;
            }
            next = flusher.after(conn.accept()) => match next {
                Some(Ok((req, respond))) => {
                    tokio::spawn(on_request(identity.clone(), req, respond));
                }
                Some(Err(e)) => {
                    debug!(%peer, error = %e, "HBONE connection ended");
                    return Ok(Ended::Closed);
                }
                None => return Ok(Ended::Closed),
            },
            () = tripwire.tripped() => {
                close_flooded(&mut conn, &flusher).await;
                return Ok(Ended::Flooded);
            }
        }
    }
}

/// Sends GOAWAY ENHANCE_YOUR_CALM (what h2 sends for the floods it bounds itself) and lets the
/// connection flush it, for at most [`GOAWAY_GRACE`]: a client that does not read is dropped.
async fn close_flooded<T, W>(conn: &mut h2::server::Connection<T, Bytes>, flusher: &Flusher<W>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
    let drain = async { while let Some(Ok(_)) = flusher.after(conn.accept()).await {} };
    let _ = tokio::time::timeout(GOAWAY_GRACE, drain).await;
}

/// Logs a kind of event any client can cause as often as it likes: at most one line per
/// `interval`, carrying how many happened since the last line; each one at debug level.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// When the last line was written, and the events since.
    state: Mutex<(Option<Instant>, u64)>,
}

/// At most one INFO line per this interval per kind of refusal.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

impl Throttle {
    pub const fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event at `now`: `Some(n)` when a line is due, `n` events since the last one
    /// (this one included). The first event is reported at once. Events after the last line are
    /// reported with the next event after the interval (there is no timer).
    pub fn note(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, count) = &mut *state;
        *count += 1;
        let due = last.is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if !due {
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(count))
    }
}

static HANDSHAKES_FAILED: Throttle = Throttle::new(REPORT_INTERVAL);
static FLOODS: Throttle = Throttle::new(REPORT_INTERVAL);

/// Logs a connection refused before its first request (a failed TLS or HTTP/2 handshake):
/// debug each time, INFO at most once per [`REPORT_INTERVAL`] with the count.
pub fn report_refused(pod: &str, e: &ServeError) {
    debug!(%pod, error = %e, "HBONE client refused");
    if let Some(count) = HANDSHAKES_FAILED.note(Instant::now()) {
        info!(count, last.pod = %pod, last.error = %e, "HBONE handshakes failed (each is logged at debug level)");
    }
}

/// Logs a connection closed for flooding control frames, as [`report_refused`] does.
pub fn report_flood(pod: &str, peer: SocketAddr) {
    debug!(%pod, %peer, "HBONE client flooded control frames; GOAWAY sent");
    if let Some(count) = FLOODS.note(Instant::now()) {
        info!(count, last.pod = %pod, last.peer = %peer, "HBONE connections closed for flooding control frames (GOAWAY ENHANCE_YOUR_CALM; each is logged at debug level)");
    }
}

/// Answers a request with `status` and no body.
pub fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = http::Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(resp, true);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Throttle;

    #[test]
    fn a_throttle_reports_the_first_event_then_one_line_per_interval_with_the_count() {
        let t = Throttle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.note(t0), Some(1), "the first at once");
        let lines: Vec<u64> = (1..=1000u64)
            .filter_map(|i| t.note(t0 + Duration::from_millis(i)))
            .collect();
        assert!(
            lines.is_empty(),
            "1,000 failures within the interval: no line"
        );
        assert_eq!(
            t.note(t0 + Duration::from_secs(60)),
            Some(1001),
            "the next line counts all since the last"
        );
        assert_eq!(t.note(t0 + Duration::from_secs(61)), None);
    }
}
