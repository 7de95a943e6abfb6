//! HBONE server: port 15008 in each enrolled pod (sk_lookup never steers it). mTLS with the pod's
//! workload certificate (the client must present one chaining to the trust bundle, with a SPIFFE
//! identity in our trust domain), then HTTP/2; each CONNECT stream is one tunnelled connection to the
//! app. Status codes as ztunnel: 400 for anything but a CONNECT to this pod, 401 when policy denies,
//! 503 when the app cannot be reached, 200 and the tunnel otherwise.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::inbound_plain::connect_app;
use super::pool::{buffered, CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use super::{tunnel, Decision, InboundConnection, Metrics, PodContext, ProxyInputs};
use crate::identity::Identity;

/// A client that has not finished the TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one client connection may have open at once.
const MAX_CONCURRENT_STREAMS: u32 = 1000;

pub struct HboneInbound {
    pub pi: Arc<ProxyInputs>,
    pub pod: Arc<PodContext>,
    pub listener: TcpListener,
}

impl HboneInbound {
    pub async fn run(self) {
        // Handshakes need the pod's certificate: wait for its first issue (connections queue in
        // the backlog meanwhile).
        let mut wait = Duration::from_millis(50);
        while let Err(e) = self.pi.secrets.fetch(&self.pod.identity).await {
            warn!(pod = %self.pod.name, identity = %self.pod.identity, error = %e, "no certificate yet for the HBONE listener");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        let acceptor = TlsAcceptor::from(crate::tls::server_config(
            self.pi.secrets.clone(),
            self.pod.identity.clone(),
        ));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(pod = %self.pod.name, error = %e, "HBONE accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            Metrics::inc(&self.pi.metrics.hbone_inbound_accepted);
            tokio::spawn(serve(
                self.pi.clone(),
                self.pod.clone(),
                acceptor.clone(),
                stream,
                peer,
            ));
        }
    }
}

async fn serve(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    super::keepalive(&stream);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let handshake =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(buffered(stream))).await;
    let tls = match handshake.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
        Ok(t) => t,
        Err(e) => {
            Metrics::inc(&pi.metrics.hbone_tls_refused);
            info!(pod = %pod.name, %peer, error = %e, "HBONE client refused at the TLS handshake");
            return;
        }
    };
    let Some(peer_id) = crate::tls::peer_identity(tls.get_ref().1) else {
        // The verifier accepts only certificates with an identity; this is a safety net.
        Metrics::inc(&pi.metrics.hbone_tls_refused);
        warn!(pod = %pod.name, %peer, "HBONE client without a SPIFFE identity; closing");
        return;
    };
    let mut conn = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            debug!(pod = %pod.name, %peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let peer_id = Arc::new(peer_id);
    while let Some(next) = conn.accept().await {
        let (req, respond) = match next {
            Ok(x) => x,
            Err(e) => {
                debug!(pod = %pod.name, %peer, error = %e, "HBONE connection ended");
                break;
            }
        };
        tokio::spawn(connect_stream(
            pi.clone(),
            pod.clone(),
            peer_id.clone(),
            peer,
            local,
            req,
            respond,
        ));
    }
}

/// One CONNECT stream.
async fn connect_stream(
    pi: Arc<ProxyInputs>,
    pod: Arc<PodContext>,
    peer_id: Arc<Identity>,
    peer: SocketAddr,
    local: SocketAddr,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    Metrics::inc(&pi.metrics.hbone_inbound_streams);
    let dst = match check_request(&req, &pod, local) {
        Ok(dst) => dst,
        Err(why) => {
            Metrics::inc(&pi.metrics.hbone_inbound_bad_request);
            info!(pod = %pod.name, %peer, identity = %peer_id, method = %req.method(), uri = %req.uri(), why, "HBONE request refused (400)");
            return answer(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    let conn = InboundConnection {
        pod: &pod,
        src: peer,
        dst,
        identity: Some(&peer_id),
    };
    if let Decision::Deny { policy, reason } = pi.policy.check(&conn) {
        Metrics::inc(&pi.metrics.inbound_denied);
        debug!(pod = %pod.name, %peer, identity = %peer_id, %dst, policy, reason, "HBONE request denied (401)");
        return answer(&mut respond, StatusCode::UNAUTHORIZED);
    }
    let app = match connect_app(&pod, dst).await {
        Ok(app) => app,
        Err(e) => {
            Metrics::inc(&pi.metrics.inbound_connect_failed);
            debug!(pod = %pod.name, %dst, error = %e, "app unreachable (503)");
            return answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let ok = http::Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name, %dst, error = %e, "client went away before the tunnel opened");
            return super::reset(app);
        }
    };
    debug!(pod = %pod.name, %peer, identity = %peer_id, %dst, "HBONE tunnel open");
    super::outbound::finish(&pi, tunnel::splice(app, send, req.into_body()).await);
}

/// The tunnel's target: a CONNECT whose `:authority` is `ip:port` of the pod the client reached.
fn check_request(
    req: &Request<h2::RecvStream>,
    pod: &PodContext,
    local: SocketAddr,
) -> Result<SocketAddr, &'static str> {
    if req.method() != Method::CONNECT {
        return Err("not a CONNECT request");
    }
    let Some(authority) = req.uri().authority() else {
        return Err("CONNECT without :authority");
    };
    let Ok(dst) = authority.as_str().parse::<SocketAddr>() else {
        return Err(":authority is not ip:port");
    };
    let reached = canonical(local.ip());
    if canonical(dst.ip()) != reached || !pod.ips.iter().any(|ip| canonical(*ip) == reached) {
        return Err(":authority names another address than the pod the client connected to");
    }
    Ok(SocketAddr::new(reached, dst.port()))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = http::Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(resp, true);
}
