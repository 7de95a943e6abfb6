//! HBONE, Istio's tunnel between nodes: mTLS (TLS 1.3, ALPN h2, SPIFFE identities) carrying one
//! HTTP/2 CONNECT stream per proxied connection, on the destination pod's port 15008.
//!
//! - `pool`: the client side, pooled and multiplexed connections to peers;
//! - `server`: the server side, the TLS and HTTP/2 handshakes and the stream of CONNECT requests;
//! - `flood`: the server's bound on control frames (SETTINGS, PING, RST_STREAM);
//! - `stream`: one CONNECT stream, as an end of a relay and as `AsyncRead + AsyncWrite`;
//! - `target`: where a CONNECT goes (ip:port or a Service hostname), as ztunnel decides it;
//! - `settings`: windows, frame and stream limits, keepalive, shared by both sides;
//! - `read_buffer`: the read buffer below rustls, held only while there is something in it;
//! - `coalesce`: the write buffer between h2 and rustls, so the frames of one poll share records.

pub mod coalesce;
pub mod flood;
pub mod pool;
pub mod read_buffer;
pub mod server;
pub mod settings;
pub mod stream;
pub mod target;

pub use pool::{ConnectRequest, Pool, PoolConfig, PoolError, PoolKey, PoolStats};
pub use stream::{H2Stream, Stream};
