//! What runs in the pods besides the proxy: apps the tests connect to (a whoami-echo server, or a
//! listener whose connections the test drives itself), and a raw HBONE client holding a
//! certificate of the mesh's CA, as another node's ztunnel would.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_common::HBONE_PORT;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use super::fixture::Mesh;
use super::io::within;
use super::world::Pod;
use crate::identity::{CertConfig, CertLease, Identity, SecretManager, DEFAULT_TRUST_DOMAIN};
use crate::proxy::hbone::Stream;

impl Mesh {
    /// An app at `addr` that greets each connection with one line naming both ends
    /// (`<local> sees <peer>`), then echoes until the client's FIN, then closes.
    pub async fn whoami(&self, addr: SocketAddr) -> App {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("app at {addr}: {e}"));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                tokio::spawn(async move {
                    let greeting = format!("{addr} sees {peer}\n");
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        App { peers, task }
    }

    /// An app at `addr` whose connections the test handles itself.
    pub async fn listen(&self, addr: SocketAddr) -> AppListener {
        AppListener(
            TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("app at {addr}: {e}")),
        )
    }

    /// A certificate manager of the mesh's CA holding `id`'s certificate (for a client or a
    /// server the test plays itself).
    pub async fn secrets(&self, id: &Identity) -> (Arc<SecretManager>, CertLease) {
        let manager = SecretManager::new(
            self.ca.clone(),
            CertConfig {
                trust_domain: DEFAULT_TRUST_DOMAIN.into(),
                ttl: Duration::from_secs(3600),
            },
        );
        let lease = manager.acquire(id);
        within("a certificate", manager.fetch(id))
            .await
            .unwrap_or_else(|e| panic!("certificate for {id}: {e}"));
        (manager, lease)
    }

    /// A raw HBONE client from `from` to `server`'s 15008, presenting `id` (a certificate from the
    /// mesh's CA) and expecting the server's own identity.
    pub async fn hbone_client(
        &self,
        id: &Identity,
        from: IpAddr,
        server: &Pod,
    ) -> Result<HboneClient, String> {
        self.hbone_client_expecting(id, from, server, &server.identity())
            .await
    }

    /// As [`Mesh::hbone_client`], expecting the server to prove `expected`.
    pub async fn hbone_client_expecting(
        &self,
        id: &Identity,
        from: IpAddr,
        server: &Pod,
        expected: &Identity,
    ) -> Result<HboneClient, String> {
        let (tls, lease) = self.hbone_tls(id, from, server, expected).await?;
        let (sender, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HboneClient {
            sender,
            _lease: lease,
        })
    }

    /// The TLS connection of an HBONE client (see [`Mesh::hbone_client_expecting`]), for a test
    /// that writes its HTTP/2 frames itself. The lease keeps the client's certificate.
    pub async fn hbone_tls(
        &self,
        id: &Identity,
        from: IpAddr,
        server: &Pod,
        expected: &Identity,
    ) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, CertLease), String> {
        let (manager, lease) = self.secrets(id).await;
        let cfg = crate::tls::client_config(manager.clone(), id.clone(), expected.clone());
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(from, 0))
            .map_err(|e| e.to_string())?;
        let dst = server.addr(HBONE_PORT);
        let tcp = socket.connect(dst).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(crate::tls::server_name(dst.ip()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        Ok((tls, lease))
    }
}

/// An app started by [`Mesh::whoami`]; stops when dropped.
pub struct App {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl App {
    /// The peer address of every connection it accepted, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct AppListener(TcpListener);

impl AppListener {
    pub async fn accept(&self) -> (TcpStream, SocketAddr) {
        within("the app accepts a connection", self.0.accept())
            .await
            .expect("accept")
    }
}

/// An HBONE client with its own HTTP/2 connection (one TLS session, one identity).
pub struct HboneClient {
    sender: h2::client::SendRequest<Bytes>,
    _lease: CertLease,
}

impl HboneClient {
    /// Sends `method` for `authority`; the status, and the stream when it is a 200 to a CONNECT.
    pub async fn request(
        &mut self,
        method: http::Method,
        authority: &str,
    ) -> Result<(u16, Option<Stream>), String> {
        let (head, stream) = self.response(method, authority).await?;
        Ok((head.status.as_u16(), stream))
    }

    /// As [`HboneClient::request`], with the whole response head.
    pub async fn response(
        &mut self,
        method: http::Method,
        authority: &str,
    ) -> Result<(http::response::Parts, Option<Stream>), String> {
        let connect = method == http::Method::CONNECT;
        let req = http::Request::builder()
            .method(method)
            .uri(if connect {
                authority.to_string()
            } else {
                format!("https://{authority}/")
            })
            .body(())
            .map_err(|e| e.to_string())?;
        let mut sender = within("an HBONE stream slot", self.sender.clone().ready())
            .await
            .map_err(|e| e.to_string())?;
        let (resp, send) = sender
            .send_request(req, !connect)
            .map_err(|e| e.to_string())?;
        let resp = within("the HBONE server's answer", resp)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = resp.into_parts();
        let stream = (connect && head.status == 200).then(|| Stream::new(send, body));
        Ok((head, stream))
    }

    pub async fn status(&mut self, method: http::Method, authority: &str) -> Result<u16, String> {
        Ok(self.request(method, authority).await?.0)
    }
}
