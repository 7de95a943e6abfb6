//! What a client's first bytes prove, from the bytes alone: an HTTP/1.x request line, the HTTP/2
//! connection preface, a TLS ClientHello (and its SNI), something else, or not yet enough. Pure
//! functions, so `sniff` can ask again each time more bytes have arrived.
//!
//! Each decision depends only on a bounded prefix of the bytes and, once made, is the same for
//! every longer input: deciding early never contradicts what a later look would have said.

use rustls::server::Acceptor;

/// The longest HTTP/1.x request line (with its line end) looked for; a longer one is not HTTP for
/// detection. Envoy's http_inspector inspected 8 KiB (`MAX_INSPECT_SIZE` before it grew to
/// 64 KiB); request lines that long are rare, and every extra byte is one more the client may
/// make the proxy wait for.
pub const HTTP1_MAX_REQUEST_LINE: usize = 8 * 1024;

/// The most bytes (records and all) a ClientHello may take; a larger one is not inspected.
/// Envoy's tls_inspector: `TLS_MAX_CLIENT_HELLO = 64 * 1024`.
pub const TLS_MAX_CLIENT_HELLO: usize = 64 * 1024;

/// RFC 9113 §3.4: the client's first bytes on an HTTP/2 connection with prior knowledge.
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The methods an HTTP/1.x request line may start with: those of the HTTP/1 parser Envoy's
/// http_inspector used (http_parser), which are RFC 9110's, PATCH, and WebDAV's and friends'.
/// Case-sensitive (RFC 9110 §9.1). `PRI` is left out: it is the HTTP/2 preface.
const METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"COPY",
    b"LOCK",
    b"MKCOL",
    b"MOVE",
    b"PROPFIND",
    b"PROPPATCH",
    b"SEARCH",
    b"UNLOCK",
    b"BIND",
    b"REBIND",
    b"UNBIND",
    b"ACL",
    b"REPORT",
    b"MKACTIVITY",
    b"CHECKOUT",
    b"MERGE",
    b"M-SEARCH",
    b"NOTIFY",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"PURGE",
    b"MKCALENDAR",
    b"LINK",
    b"UNLINK",
    b"SOURCE",
    b"QUERY",
];

/// The longest of [`METHODS`].
const MAX_METHOD: usize = 11;

/// What the first bytes of a connection prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Everything so far fits more than one answer: wait for more bytes.
    NeedMore,
    /// A complete HTTP/1.x request line.
    Http1,
    /// The complete HTTP/2 connection preface.
    H2,
    /// A complete ClientHello: the first `len` bytes (whole TLS records).
    ClientHello { len: usize },
    /// Anything else (including a TLS record that cannot start a usable ClientHello).
    Other,
}

/// Decides what `buf` (the first bytes the client sent, never empty) is, as Envoy's
/// http_inspector and tls_inspector would: TLS by its record header, HTTP/2 by the whole
/// preface, HTTP/1.x by the whole request line.
pub(super) fn classify(buf: &[u8]) -> Verdict {
    if buf.first() == Some(&TLS_HANDSHAKE) {
        return match client_hello(buf) {
            Hello::NeedMore => Verdict::NeedMore,
            Hello::Complete { len } => Verdict::ClientHello { len },
            Hello::NotTls | Hello::TooLarge { .. } | Hello::Malformed(_) => Verdict::Other,
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::H2
        } else {
            Verdict::NeedMore
        };
    }
    http1(buf)
}

/// Whether `buf` starts with an HTTP/1.x request line: `method SP request-target SP
/// HTTP/1.<digit>` and its line end (CRLF, or a bare LF, which RFC 9112 §2.2 lets a recipient
/// accept), within [`HTTP1_MAX_REQUEST_LINE`].
fn http1(buf: &[u8]) -> Verdict {
    let buf = &buf[..buf.len().min(HTTP1_MAX_REQUEST_LINE)];
    let verdict = request_line(buf);
    if verdict == Verdict::NeedMore && buf.len() == HTTP1_MAX_REQUEST_LINE {
        return Verdict::Other;
    }
    verdict
}

fn request_line(buf: &[u8]) -> Verdict {
    let Some(sp) = buf.iter().take(MAX_METHOD + 1).position(|&b| b == b' ') else {
        let could_be = buf.len() <= MAX_METHOD && METHODS.iter().any(|m| m.starts_with(buf));
        return if could_be {
            Verdict::NeedMore
        } else {
            Verdict::Other
        };
    };
    if !METHODS.contains(&&buf[..sp]) {
        return Verdict::Other;
    }
    let rest = &buf[sp + 1..];
    let target_end = rest.iter().position(|&b| !is_target_byte(b));
    let Some(end) = target_end else {
        return Verdict::NeedMore;
    };
    if end == 0 || rest[end] != b' ' {
        return Verdict::Other;
    }
    let version = &rest[end + 1..];
    const HTTP1: &[u8] = b"HTTP/1.";
    let n = version.len().min(HTTP1.len());
    if version[..n] != HTTP1[..n] {
        return Verdict::Other;
    }
    match &version[n..] {
        [] => Verdict::NeedMore,
        [minor, eol @ ..] if minor.is_ascii_digit() => match eol {
            [] | [b'\r'] => Verdict::NeedMore,
            [b'\n', ..] | [b'\r', b'\n', ..] => Verdict::Http1,
            _ => Verdict::Other,
        },
        _ => Verdict::Other,
    }
}

/// A request-target byte: visible ASCII, or any non-ASCII byte (as httparse allows).
fn is_target_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// TLS record content type of handshake messages.
const TLS_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const TLS_MAX_FRAGMENT: usize = 1 << 14;

/// How far the first bytes go towards a ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hello {
    NeedMore,
    /// The ClientHello is complete in the first `len` bytes (whole records).
    Complete {
        len: usize,
    },
    /// The first record is not a TLS handshake record starting a ClientHello.
    NotTls,
    /// The ClientHello (`size` bytes, as far as known) will not fit [`TLS_MAX_CLIENT_HELLO`].
    TooLarge {
        size: usize,
    },
    /// TLS, but not a well-formed ClientHello.
    Malformed(&'static str),
}

/// Walks the TLS records at the start of `buf` until they hold a whole ClientHello (RFC 8446
/// §5.1: a handshake message may be split across records, which carry nothing else meanwhile).
/// Looks at no more than [`TLS_MAX_CLIENT_HELLO`] bytes.
pub(super) fn client_hello(buf: &[u8]) -> Hello {
    let buf = &buf[..buf.len().min(TLS_MAX_CLIENT_HELLO)];
    let full = buf.len() == TLS_MAX_CLIENT_HELLO;
    // The handshake message header (type and 24-bit length), possibly split across records.
    let mut header = [0u8; 4];
    let mut seen = 0usize;
    let mut pos = 0usize;
    loop {
        let first = pos == 0;
        let bad = |why| {
            if first {
                Hello::NotTls
            } else {
                Hello::Malformed(why)
            }
        };
        let record = &buf[pos..];
        if record.first().is_some_and(|&t| t != TLS_HANDSHAKE) {
            return bad("a record other than handshake inside the ClientHello");
        }
        // Record versions: SSL 3.0 (0x0300) to TLS 1.3's legacy 0x0303 (and 0x0304 seen in
        // the wild); a ClientHello's record says 0x0301 or 0x0303.
        if record.get(1).is_some_and(|&v| v != 0x03) || record.get(2).is_some_and(|&v| v > 0x04) {
            return bad("a record version other than TLS's");
        }
        let [_, _, _, hi, lo, ..] = *record else {
            return if full {
                Hello::TooLarge { size: buf.len() }
            } else {
                Hello::NeedMore
            };
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        // RFC 8446 §5.1: no zero-length handshake fragments, none longer than 2^14.
        if len == 0 || len > TLS_MAX_FRAGMENT {
            return bad("a record length out of range");
        }
        let body = &record[5..record.len().min(5 + len)];
        let take = body.len().min(header.len().saturating_sub(seen));
        let at = seen.min(header.len());
        header[at..at + take].copy_from_slice(&body[..take]);
        let was = seen;
        seen += body.len();
        if was == 0 && seen > 0 && header[0] != CLIENT_HELLO {
            return bad("a first handshake message other than ClientHello");
        }
        if seen >= header.len() {
            let [_, a, b, c] = header.map(usize::from);
            let size = 4 + (a << 16 | b << 8 | c);
            // The records add at least one header of their own.
            if size + 5 > TLS_MAX_CLIENT_HELLO {
                return Hello::TooLarge { size };
            }
            if body.len() == len && seen >= size {
                return Hello::Complete { len: pos + 5 + len };
            }
        }
        if body.len() < len {
            return if full {
                Hello::TooLarge { size: buf.len() }
            } else {
                Hello::NeedMore
            };
        }
        pos += 5 + len;
    }
}

/// Why a complete ClientHello yielded no server name.
#[derive(Debug)]
pub(super) enum SniError {
    /// rustls refused the ClientHello (e.g. an SNI that is not a host name).
    Rejected(rustls::Error),
    /// The bytes held no complete ClientHello after all.
    Incomplete,
}

/// The SNI of the ClientHello in `hello` (whole records, as [`client_hello`] delimits them),
/// parsed by rustls: lowercased; None without the extension or when it names an IP address
/// (RFC 6066 §3 allows host names only).
pub(super) fn server_name(hello: &[u8]) -> Result<Option<String>, SniError> {
    let mut acceptor = Acceptor::default();
    let mut rest = hello;
    loop {
        if !rest.is_empty() {
            match acceptor.read_tls(&mut rest) {
                Ok(n) if n > 0 => {}
                // Nothing taken (its buffer is full) or refused: no ClientHello to be had.
                Ok(_) | Err(_) => return Err(SniError::Incomplete),
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Ok(accepted.client_hello().server_name().map(str::to_owned))
            }
            Ok(None) if rest.is_empty() => return Err(SniError::Incomplete),
            Ok(None) => {}
            Err((e, _alert)) => return Err(SniError::Rejected(e)),
        }
    }
}
