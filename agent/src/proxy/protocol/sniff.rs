//! Sniffing a captured connection: waits for the client's first bytes with `MSG_PEEK`, so they
//! stay queued for whoever reads the stream next, until [`detect`](super::detect) can decide or
//! a timeout passes. Istio: "Istio can automatically detect HTTP and HTTP/2 traffic. If the
//! protocol cannot automatically be determined, traffic will be treated as plain TCP traffic."
//!
//! # The timeout
//!
//! A client-first protocol sends its first bytes at once; a server-first one (MySQL, SMTP, FTP,
//! POP3...) sends nothing until the server greets it, and the proxy cannot connect the server
//! before it knows how to route. So sniffing must give up at some point and treat the connection
//! as TCP. How long to wait is a trade:
//! - too short, and a slow client-first connection (a loaded app, a pool that connects before it
//!   has a request) is relayed as TCP: no per-request routing, retries or HTTP telemetry for it;
//! - too long, and each connection to an undeclared server-first port waits that long for its
//!   server's greeting.
//!
//! Istio's `meshConfig.protocolDetectionTimeout` went 10 ms (1.3) → 100 ms outbound → 5 s (1.7,
//! "Raise default protocol detection timeout") → 0, no timeout (1.8, since: "we found this caused
//! frequent telemetry and traffic failures during slow connections, while increasing latency for
//! misconfigured server first protocols rather than failing fast"). Envoy's http_inspector and
//! tls_inspector have no timeout of their own: they wait for bytes until the listener's
//! `listener_filters_timeout` (Envoy's default 15 s), which Istio sets to
//! `protocolDetectionTimeout` with `continue_on_listener_filters_timeout: true` (fall through to
//! the TCP filter chain), or to 0 (none) when no HTTP inspector is needed.
//!
//! ambit does not wait forever (a server-first client would hang until its own timeout), so it
//! takes Istio's last finite default, [`DEFAULT_SNIFF_TIMEOUT`] = 5 s: long enough that a
//! client-first app is not misread as TCP, shorter than the usual greeting timeouts of
//! server-first clients (10 s and more), so a misconfigured port is slow (each connection waits
//! 5 s for its greeting) but works. Istio's advice stands: declare server-first ports
//! (`tcp-...`, `appProtocol: tcp`); ports 25, 53, 3306 and 27017 default to TCP and are never
//! sniffed.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{recv, MsgFlags};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::detect::{self, Hello, SniError, Verdict, TLS_MAX_CLIENT_HELLO};
use super::Protocol;

/// How long [`sniff`] is recommended to wait for the client's first bytes (see the module doc):
/// Istio's last finite `protocolDetectionTimeout` default.
pub const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection's first bytes turned out to be (Envoy: http_inspector and tls_inspector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line (any version 1.x, e.g. 1.0 and 1.1).
    Http1,
    /// The HTTP/2 connection preface (h2c with prior knowledge).
    H2,
    /// A complete ClientHello; `sni` lowercased, None without the extension or for an IP address.
    Tls { sni: Option<String> },
    /// Anything else, including a request line over [`HTTP1_MAX_REQUEST_LINE`], an unparsable
    /// ClientHello, and undecided bytes followed by end of stream.
    ///
    /// [`HTTP1_MAX_REQUEST_LINE`]: super::HTTP1_MAX_REQUEST_LINE
    Other,
    /// Nothing, or not enough to decide, arrived in time: perhaps a server-first protocol.
    Timeout,
    /// The connection ended (end of stream, reset, error) before the client sent a byte.
    Closed,
}

impl Sniffed {
    /// The protocol to proxy the connection as; None when there is nothing to proxy. Istio
    /// detects HTTP only: anything else, TLS included, is treated as plain TCP (routed by its
    /// destination, the SNI at most informing logs).
    pub fn protocol(&self) -> Option<Protocol> {
        match self {
            Sniffed::Http1 => Some(Protocol::Http),
            Sniffed::H2 => Some(Protocol::Http2),
            Sniffed::Tls { .. } | Sniffed::Other | Sniffed::Timeout => Some(Protocol::Tcp),
            Sniffed::Closed => None,
        }
    }

    /// A short stable name, for counters and log fields.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Sniffed::Http1 => "http1",
            Sniffed::H2 => "h2",
            Sniffed::Tls { .. } => "tls",
            Sniffed::Other => "other",
            Sniffed::Timeout => "timeout",
            Sniffed::Closed => "closed",
        }
    }
}

/// Waits up to `timeout` for the client's first bytes to show what the connection carries,
/// without consuming them. Decides as soon as the bytes prove an answer; waits for at most
/// [`HTTP1_MAX_REQUEST_LINE`] bytes of a request line and [`TLS_MAX_CLIENT_HELLO`] of a
/// ClientHello.
///
/// [`HTTP1_MAX_REQUEST_LINE`]: super::HTTP1_MAX_REQUEST_LINE
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    match tokio::time::timeout(timeout, peek_until(stream, decide)).await {
        Err(_) => Sniffed::Timeout,
        Ok(Peeked::Decided(s)) => s,
        Ok(Peeked::Ended { received: 0 } | Peeked::Failed(_)) => Sniffed::Closed,
        Ok(Peeked::Ended { .. } | Peeked::Full) => Sniffed::Other,
    }
}

/// What a connection's first bytes `buf` prove; None: not yet enough (read more, if under the
/// limits: a longer prefix than [`HTTP1_MAX_REQUEST_LINE`] or [`TLS_MAX_CLIENT_HELLO`] always
/// decides).
///
/// [`HTTP1_MAX_REQUEST_LINE`]: super::HTTP1_MAX_REQUEST_LINE
/// [`TLS_MAX_CLIENT_HELLO`]: super::TLS_MAX_CLIENT_HELLO
pub fn decide(buf: &[u8]) -> Option<Sniffed> {
    match detect::classify(buf) {
        Verdict::NeedMore => None,
        Verdict::Http1 => Some(Sniffed::Http1),
        Verdict::H2 => Some(Sniffed::H2),
        Verdict::ClientHello { len } => Some(match detect::server_name(&buf[..len]) {
            Ok(sni) => Sniffed::Tls { sni },
            Err(_) => Sniffed::Other,
        }),
        Verdict::Other => Some(Sniffed::Other),
    }
}

/// Why a declared TLS port's ClientHello yielded no SNI verdict.
#[derive(Debug, Error)]
pub enum SniffError {
    #[error("no complete ClientHello within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("the connection ended after {received} bytes, before a complete ClientHello")]
    Closed { received: usize },
    #[error("the client's first bytes are not a TLS record starting a ClientHello")]
    NotTls,
    #[error("a ClientHello of {size} bytes or more is over the {limit} bytes inspected")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed ClientHello: {reason}")]
    Malformed { reason: &'static str },
    #[error("ClientHello refused: {source}")]
    Rejected {
        #[source]
        source: rustls::Error,
    },
    #[error("peeking at the connection: {source}")]
    Io {
        #[source]
        source: io::Error,
    },
}

impl SniffError {
    /// A short stable name, for counters and log fields.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SniffError::Timeout { .. } => "timeout",
            SniffError::Closed { .. } => "closed",
            SniffError::NotTls => "not_tls",
            SniffError::TooLarge { .. } => "too_large",
            SniffError::Malformed { .. } => "malformed",
            SniffError::Rejected { .. } => "rejected",
            SniffError::Io { .. } => "io",
        }
    }
}

/// The SNI of the ClientHello the client sends first, on a port declared TLS or HTTPS (Istio:
/// "TLS traffic is assumed to contain SNI as part of the handshake"), without consuming it.
/// `Ok(None)`: a ClientHello without a host name; the caller routes by destination then, as
/// Envoy falls back to the destination's filter chain.
pub async fn client_hello_sni(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<Option<String>, SniffError> {
    let decide = |buf: &[u8]| match detect::client_hello(buf) {
        Hello::NeedMore => None,
        Hello::Complete { len } => Some(match detect::server_name(&buf[..len]) {
            Ok(sni) => Ok(sni),
            Err(SniError::Rejected(source)) => Err(SniffError::Rejected { source }),
            Err(SniError::Incomplete) => Err(SniffError::Malformed {
                reason: "rustls found no whole ClientHello in its records",
            }),
        }),
        Hello::NotTls => Some(Err(SniffError::NotTls)),
        Hello::TooLarge { size } => Some(Err(SniffError::TooLarge {
            size,
            limit: TLS_MAX_CLIENT_HELLO,
        })),
        Hello::Malformed(reason) => Some(Err(SniffError::Malformed { reason })),
    };
    match tokio::time::timeout(timeout, peek_until(stream, decide)).await {
        Err(_) => Err(SniffError::Timeout { timeout }),
        Ok(Peeked::Decided(r)) => r,
        Ok(Peeked::Ended { received }) => Err(SniffError::Closed { received }),
        Ok(Peeked::Full) => Err(SniffError::TooLarge {
            size: PEEK_MAX,
            limit: TLS_MAX_CLIENT_HELLO,
        }),
        Ok(Peeked::Failed(source)) => Err(SniffError::Io { source }),
    }
}

/// The first peek's size: most request lines and ClientHellos fit.
const PEEK_START: usize = 2 * 1024;
/// The largest peek: the most bytes any decision of `detect` looks at.
const PEEK_MAX: usize = TLS_MAX_CLIENT_HELLO;

/// How waiting for a decision ended.
enum Peeked<T> {
    Decided(T),
    /// End of stream with `received` bytes still undecided.
    Ended {
        received: usize,
    },
    /// [`PEEK_MAX`] bytes and still undecided (`detect` decides before that).
    Full,
    Failed(io::Error),
}

/// Peeks at the bytes queued on `stream` each time more arrive, until `decide` returns an
/// answer or the stream ends. Consumes nothing.
async fn peek_until<T>(
    stream: &TcpStream,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> Peeked<T> {
    enum Step<T> {
        Decided(T),
        Ended(usize),
        Grow,
    }
    let mut buf = vec![0u8; PEEK_START];
    loop {
        // Each look counts against tokio's cooperative budget: a socket that kept reporting
        // readiness without new bytes would make this task yield, never starve the runtime.
        tokio::task::consume_budget().await;
        let ready = match stream.ready(Interest::READABLE).await {
            Ok(r) => r,
            Err(e) => return Peeked::Failed(e),
        };
        // The peek runs inside `try_io` so that "undecided" can be reported as WouldBlock: tokio
        // then forgets the readiness this peek saw, and the next `ready` waits for new bytes. A
        // peek leaves the bytes queued, so without that the socket would stay readable and the
        // loop would spin. tokio clears only the readiness it saw before the peek: bytes that
        // arrive meanwhile still wake the next `ready`.
        let step = stream.try_io(Interest::READABLE, || {
            let n = recv(
                stream.as_raw_fd(),
                &mut buf,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            if n == 0 {
                return Ok(Step::Ended(0));
            }
            if let Some(t) = decide(&buf[..n]) {
                return Ok(Step::Decided(t));
            }
            if n == buf.len() {
                return Ok(Step::Grow);
            }
            // The client has shut its side: no more bytes will come.
            if ready.is_read_closed() {
                return Ok(Step::Ended(n));
            }
            Err(io::ErrorKind::WouldBlock.into())
        });
        match step {
            Ok(Step::Decided(t)) => return Peeked::Decided(t),
            Ok(Step::Ended(received)) => return Peeked::Ended { received },
            Ok(Step::Grow) if buf.len() >= PEEK_MAX => return Peeked::Full,
            Ok(Step::Grow) => buf.resize((buf.len() * 2).min(PEEK_MAX), 0),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Peeked::Failed(e),
        }
    }
}
