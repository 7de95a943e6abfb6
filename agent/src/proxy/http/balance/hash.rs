//! The request's hash for consistent hashing, computed as Envoy's route hash policy does
//! (`source/common/http/hash_policy.cc`): the xxHash64 of a header's values, a cookie's value, the
//! source IP or a query parameter's value; and the cookie Envoy generates when it is absent.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use twox_hash::XxHash64;

use super::PickContext;
use crate::routing::HashKey;

/// Envoy's `HashUtil::xxHash64(input)`: XXH64 with seed 0.
pub(super) fn xxhash64(data: &[u8]) -> u64 {
    XxHash64::oneshot(0, data)
}

/// Envoy's `HashUtil::xxHash64(input, seed)`.
pub(super) fn xxhash64_seeded(data: &[u8], seed: u64) -> u64 {
    XxHash64::oneshot(seed, data)
}

/// Envoy's `HashUtil::xxHash64(absl::Span<string_view>)`: each value hashed with the previous
/// value's hash as its seed (Envoy's test vector: `{"foo", "bar"}` → 17745830980996999794).
pub(super) fn xxhash64_chained<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    values
        .into_iter()
        .fold(0, |seed, value| xxhash64_seeded(value, seed))
}

/// What a request hashes to, and the `Set-Cookie` to send back when a cookie was generated.
#[derive(Debug, Default)]
pub(super) struct RequestHash {
    /// None: the key is missing (Envoy then picks with a random hash).
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

/// The request's hash under `key`.
pub(super) fn request_hash(key: &HashKey, ctx: &PickContext<'_>) -> RequestHash {
    match key {
        HashKey::Header(name) => RequestHash {
            hash: ctx.headers.and_then(|h| header_hash(h, name)),
            set_cookie: None,
        },
        HashKey::Cookie { name, path, ttl } => cookie_hash(ctx, name, path, *ttl),
        HashKey::SourceIp => RequestHash {
            hash: Some(source_ip_hash(ctx.source.ip())),
            set_cookie: None,
        },
        HashKey::QueryParameter(name) => RequestHash {
            hash: ctx
                .query
                .and_then(|q| query_value(q, name))
                .map(|v| xxhash64(v.as_bytes())),
            set_cookie: None,
        },
    }
}

/// Envoy `HeaderHashMethod`: every value of the header, sorted so that their order does not
/// matter, hashed as a chain; None when the header is absent.
fn header_hash(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        // The common case: one value, no allocation.
        return Some(xxhash64(first.as_bytes()));
    };
    let mut all: Vec<&[u8]> = vec![first.as_bytes(), second.as_bytes()];
    all.extend(values.map(HeaderValue::as_bytes));
    all.sort_unstable();
    Some(xxhash64_chained(all))
}

/// Envoy `IpHashMethod`: the xxHash64 of the downstream IP as text (no port).
fn source_ip_hash(ip: IpAddr) -> u64 {
    // The longest IPv6 text is 45 bytes: format on the stack, the data path does not allocate.
    let mut buf = StackStr::<64>::new();
    match write!(buf, "{ip}") {
        Ok(()) => xxhash64(buf.as_bytes()),
        Err(_) => xxhash64(ip.to_string().as_bytes()),
    }
}

/// Envoy `CookieHashMethod`: the cookie's value (quotes removed) hashed; when it is absent or
/// empty and a ttl is set, a cookie is generated and its value hashed; else no hash.
fn cookie_hash(
    ctx: &PickContext<'_>,
    name: &str,
    path: &str,
    ttl: Option<Duration>,
) -> RequestHash {
    let value = ctx
        .headers
        .and_then(|h| cookie_value(h, name))
        .filter(|v| !v.is_empty());
    if let Some(value) = value {
        return RequestHash {
            hash: Some(xxhash64(value)),
            set_cookie: None,
        };
    }
    let Some(ttl) = ttl else {
        return RequestHash::default();
    };
    let value = generated_cookie_value(ctx);
    RequestHash {
        hash: Some(xxhash64(value.as_bytes())),
        set_cookie: set_cookie(name, &value, path, ttl),
    }
}

/// Envoy `Utility::parseCookieValue`: the first `name=value` pair across the `cookie` headers
/// (split on `;`, leading spaces skipped, pairs without `=` ignored), surrounding double quotes
/// removed (RFC 6265 4.1.1).
pub(super) fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for header in headers.get_all(http::header::COOKIE) {
        for pair in header.as_bytes().split(|b| *b == b';') {
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            // '=' is not a space, so the key starts at or before it.
            let start = pair.iter().position(|b| *b != b' ').unwrap_or(eq);
            if &pair[start..eq] != name.as_bytes() {
                continue;
            }
            let mut value = &pair[eq + 1..];
            if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
                value = &value[1..value.len() - 1];
            }
            return Some(value);
        }
    }
    None
}

/// Envoy router `addDownstreamSetCookie`: the hex xxHash64 of the downstream connection's remote
/// and local addresses ("the same per connection so that streams racing on it all receive the
/// same cookie"). Behind a sidecar the local address is the original destination.
fn generated_cookie_value(ctx: &PickContext<'_>) -> String {
    let connection = format!("{}{}", ctx.source, ctx.destination);
    // Envoy `Hex::uint64ToHex`: 16 lowercase digits, big-endian.
    format!("{:016x}", xxhash64(connection.as_bytes()))
}

/// Envoy `Utility::makeSetCookieValue` (httponly): `name="value"; Max-Age=s; Path=p; HttpOnly`,
/// Max-Age only when the ttl's whole seconds are not 0 (Istio: a 0s ttl is a session cookie), Path
/// only when set. None if the name or path cannot be a header value.
fn set_cookie(name: &str, value: &str, path: &str, ttl: Duration) -> Option<HeaderValue> {
    let mut out = format!("{name}=\"{value}\"");
    // Envoy keeps the proto Duration's seconds only.
    if ttl.as_secs() != 0 {
        let _ = write!(out, "; Max-Age={}", ttl.as_secs());
    }
    if !path.is_empty() {
        let _ = write!(out, "; Path={path}");
    }
    out.push_str("; HttpOnly");
    HeaderValue::from_str(&out).ok()
}

/// Envoy `QueryParamsMulti::parseQueryString(...).getFirstValue(name)`: the first parameter with
/// that exact name, not percent-decoded; a parameter without `=` has the empty value.
pub(super) fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|param| match param.split_once('=') {
            Some((key, value)) => (key == name).then_some(value),
            None => (!param.is_empty() && param == name).then_some(""),
        })
}

/// A fixed-size `fmt::Write` buffer, for formatting addresses on the data path without allocating.
pub(super) struct StackStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackStr<N> {
    pub(super) fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> std::fmt::Write for StackStr<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(std::fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
