//! The server side of HBONE connections: the TLS handshake with the pod's certificate (the client
//! must present one that chains to the trust bundle, with a SPIFFE identity of our trust domain),
//! the HTTP/2 handshake with HBONE's settings, and each request handed on with the client's
//! verified identity. What a request means is the inbound stage's business.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, StatusCode};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::settings::{
    buffered, keepalive, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_FRAME,
    STREAM_WINDOW,
};
use crate::identity::Identity;

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

/// Serves one accepted connection until it ends, calling `on_request` on a task of its own for
/// each request. Errors before the first request are returned; a connection that ends later is
/// not an error.
pub async fn serve<F, Fut>(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    mut on_request: F,
) -> Result<(), ServeError>
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
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|source| ServeError::H2 { peer, source })?;
    while let Some(next) = conn.accept().await {
        match next {
            Ok((req, respond)) => {
                tokio::spawn(on_request(identity.clone(), req, respond));
            }
            Err(e) => {
                debug!(%peer, error = %e, "HBONE connection ended");
                break;
            }
        }
    }
    Ok(())
}

/// Answers a request with `status` and no body.
pub fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = http::Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(resp, true);
}
