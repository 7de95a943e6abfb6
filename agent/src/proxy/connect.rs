//! Connections the proxy makes in a pod: to a destination outside the mesh (source: the pod's own
//! address, as the app's direct connection would have had) and to the pod's own app.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{Error, PodContext};

/// Connects from inside the pod to `dst` (outside the mesh); the kernel picks the source address.
pub async fn direct(pod: &PodContext, dst: SocketAddr) -> Result<TcpStream, Error> {
    connect(pod, dst, None).await
}

/// Connects to the app at `dst` from inside the pod, from the pod's own IP: sk_lookup never
/// steers a connection whose source is the pod itself, so this is not captured again.
pub async fn app(pod: &PodContext, dst: SocketAddr) -> Result<TcpStream, Error> {
    let bind = pod.ip_like(dst.ip()).or(Some(dst.ip()));
    connect(pod, dst, bind).await
}

async fn connect(
    pod: &PodContext,
    dst: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> Result<TcpStream, Error> {
    let err = |source| Error::Connect { dst, source };
    let socket = pod.sockets.upstream(dst, bind).await.map_err(err)?;
    let stream = socket.connect(dst).await.map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}
