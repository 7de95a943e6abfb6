//! The HTTP/1.1 the relay follows: request and response heads (`httparse`) and the framing of
//! their bodies (RFC 9112 §6 and §7.1), with what the metrics count of each.

/// The most headers a head may have (hyper's default; more goes to hyper, which answers 431).
pub(super) const MAX_HEADERS: usize = 100;

/// A request head this relay can follow, or one it leaves to the full server (`simple` false).
#[derive(Debug)]
pub(super) struct RequestHead {
    /// The head's length in bytes.
    pub(super) len: usize,
    /// What `istio_request_bytes` counts of it: method, path and query, and each header as
    /// `name: value\r\n` (what the full server counts of the same request).
    pub(super) counted_bytes: u64,
    pub(super) body: Body,
    pub(super) is_head: bool,
    /// `Connection: close`.
    pub(super) close: bool,
    /// It has an `x-request-id` (the relay adds one otherwise, as the full server does).
    pub(super) request_id: bool,
    pub(super) simple: bool,
}

impl RequestHead {
    /// The head at the start of `buf`: None while it is incomplete; Err when it is malformed.
    pub(super) fn parse(buf: &[u8]) -> Result<Option<RequestHead>, httparse::Error> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(buf)? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let method = req.method.unwrap_or_default();
        let path = req.path.unwrap_or_default();
        // A line ended by a bare LF reaches the app as it came, and apps differ on it: hyper
        // reads and writes it again.
        let mut simple = !has_bare_lf(&buf[..len])
            && req.version == Some(1)
            && method != "CONNECT"
            && http::uri::PathAndQuery::try_from(path).is_ok()
            && path.starts_with('/')
            // A fragment: hyper's client drops it on its way (and `http` does not count it).
            && !path.contains('#');
        let mut length = None;
        let mut close = false;
        let mut request_id = false;
        let mut counted = (method.len() + path.len()) as u64;
        for h in req.headers.iter() {
            counted += (h.name.len() + h.value.len() + 4) as u64;
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                match (parse_length(h.value), length) {
                    (Some(n), None) => length = Some(n),
                    _ => simple = false,
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        simple = false;
                    }
                }
            } else if name.eq_ignore_ascii_case("x-request-id") {
                request_id = true;
            } else if name.eq_ignore_ascii_case("content-type") {
                // gRPC (and gRPC-Web) is recorded with its own protocol and status.
                simple &= !h.value.starts_with(b"application/grpc");
            } else if [
                "transfer-encoding",
                "upgrade",
                "expect",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
            {
                simple = false;
            }
        }
        Ok(Some(RequestHead {
            len,
            counted_bytes: counted,
            body: match length {
                Some(0) | None => Body::Empty,
                Some(n) => Body::Length(n),
            },
            is_head: method == "HEAD",
            close,
            request_id,
            simple,
        }))
    }
}

/// `1*DIGIT` (RFC 9110 §8.6), between optional whitespace.
fn parse_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Whether a line of `head` ends with LF alone.
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// A response head.
#[derive(Debug)]
pub(super) struct ResponseHead {
    pub(super) len: usize,
    pub(super) status: u16,
    /// Each header as `name: value\r\n`, as the full server counts them.
    pub(super) counted_bytes: u64,
    pub(super) body: Body,
    pub(super) close: bool,
    /// The body ends when the app closes the connection.
    pub(super) until_close: bool,
    /// A `grpc-status` header's value (a retry policy's gRPC conditions read it).
    pub(super) grpc_status: Option<u32>,
}

impl ResponseHead {
    /// The head at the start of `buf` (None while incomplete), the response to a HEAD request when
    /// `to_head`. Err: malformed, or framing that cannot be followed safely.
    pub(super) fn parse(buf: &[u8], to_head: bool) -> Result<Option<ResponseHead>, ()> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf).map_err(|_| ())? {
            httparse::Status::Complete(len) => len,
            httparse::Status::Partial => return Ok(None),
        };
        let status = resp.code.unwrap_or_default();
        let mut close = resp.version == Some(0);
        let mut length = None;
        let mut chunked = None;
        let mut counted = 0u64;
        let mut grpc_status = None;
        for h in resp.headers.iter() {
            counted += (h.name.len() + h.value.len() + 4) as u64;
            let name = h.name;
            if name.eq_ignore_ascii_case("grpc-status") {
                grpc_status = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if name.eq_ignore_ascii_case("content-length") {
                // Checked only if the body is framed by it (hyper's client ignores it otherwise).
                length = match (parse_length(h.value), length) {
                    (Some(n), None) => Some(Ok(n)),
                    (Some(n), Some(Ok(l))) if n == l => Some(Ok(n)),
                    _ => Some(Err(())),
                };
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding decides (RFC 9112 §6.3): chunked, or the body runs to the close.
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                let tokens = h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii);
                for token in tokens {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") && resp.version == Some(0) {
                        close = false;
                    }
                }
            }
        }
        let no_body = to_head || status < 200 || status == 204 || status == 304;
        let (body, until_close) = match (no_body, chunked, length) {
            (true, _, _) => (Body::Empty, false),
            (false, Some(true), _) => (Body::Chunked(Chunked::Size { size: 0, digits: 0 }), false),
            (false, Some(false), _) => (Body::UntilClose, true),
            (false, None, Some(Err(()))) => return Err(()),
            (false, None, Some(Ok(0))) => (Body::Empty, false),
            (false, None, Some(Ok(n))) => (Body::Length(n), false),
            (false, None, None) => (Body::UntilClose, true),
        };
        Ok(Some(ResponseHead {
            len,
            status,
            counted_bytes: counted,
            body,
            close,
            until_close,
            grpc_status,
        }))
    }
}

/// Where a message's body stands.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Body {
    /// No body, or all of it relayed.
    Empty,
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes the connection.
    UntilClose,
}

/// The chunked coding's state (RFC 9112 §7.1), between any two bytes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Chunked {
    /// In a chunk's size line; `digits` read so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// In a chunk extension, until the line's end.
    Extension {
        size: u64,
    },
    /// The size line's LF.
    SizeLf {
        size: u64,
    },
    /// This many data bytes of the chunk to come.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the empty line that ends the body).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

impl Body {
    pub(super) fn done(&self) -> bool {
        matches!(self, Body::Empty | Body::Chunked(Chunked::Done))
    }

    /// Follows the body over `buf`: how many bytes of `buf` belong to it, and how many of those
    /// are data (what the metrics count; chunk framing is not). Err: not a valid chunked coding.
    pub(super) fn advance(&mut self, buf: &[u8]) -> Result<(usize, u64), ()> {
        match self {
            Body::Empty => Ok((0, 0)),
            Body::UntilClose => Ok((buf.len(), buf.len() as u64)),
            Body::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = Body::Empty;
                }
                Ok((n as usize, n))
            }
            Body::Chunked(state) => state.advance(buf),
        }
    }
}

impl Chunked {
    pub(super) fn advance(&mut self, buf: &[u8]) -> Result<(usize, u64), ()> {
        let mut i = 0;
        let mut data = 0u64;
        while i < buf.len() && *self != Chunked::Done {
            if let Chunked::Data(left) = self {
                let n = (*left).min((buf.len() - i) as u64);
                *left -= n;
                i += n as usize;
                data += n;
                if *left == 0 {
                    *self = Chunked::DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            *self = match (&*self, b) {
                (Chunked::Size { size, digits }, b) if b.is_ascii_hexdigit() => {
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    Chunked::Size {
                        size: size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(d))
                            .ok_or(())?,
                        digits: digits.saturating_add(1),
                    }
                }
                (Chunked::Size { size, digits }, b';' | b' ' | b'\t') if *digits > 0 => {
                    Chunked::Extension { size: *size }
                }
                (Chunked::Size { size, digits }, b'\r') if *digits > 0 => {
                    Chunked::SizeLf { size: *size }
                }
                (Chunked::Extension { size }, b'\r') => Chunked::SizeLf { size: *size },
                (Chunked::Extension { .. }, b'\n') => return Err(()),
                (Chunked::Extension { size }, _) => Chunked::Extension { size: *size },
                (Chunked::SizeLf { size }, b'\n') => Chunked::after_size(*size),
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataLf, b'\n') => Chunked::Size { size: 0, digits: 0 },
                (Chunked::TrailerStart, b'\r') => Chunked::EndLf,
                (Chunked::TrailerStart, _) => Chunked::TrailerLine,
                (Chunked::TrailerLine, b'\r') => Chunked::TrailerLf,
                (Chunked::TrailerLine, _) => Chunked::TrailerLine,
                (Chunked::TrailerLf, b'\n') => Chunked::TrailerStart,
                (Chunked::EndLf, b'\n') => Chunked::Done,
                _ => return Err(()),
            };
        }
        Ok((i, data))
    }

    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::TrailerStart
        } else {
            Chunked::Data(size)
        }
    }
}
