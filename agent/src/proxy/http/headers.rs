//! Header handling a proxy owes the request and the response: hop-by-hop headers removed
//! (RFC 9110 §7.6.1; HTTP/2 forbids them outright), `x-request-id` added when absent,
//! `x-forwarded-proto` set, and Envoy's local replies (status, body and response flag).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, ProxyBody};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Gives every value its own small allocation. hyper parses HTTP/1.1 headers (and h2 decodes
/// HPACK literals) as slices of the connection's read buffer; an HTTP/2 peer's HPACK encoder
/// keeps the values it indexes in its dynamic table for the connection's life, so a forwarded
/// value would pin a whole read buffer (8 KiB and more) of another connection. A `date` value
/// indexed per second on each of 64 HTTP/2 connections pinned about 0.6 MB more every second.
/// Call it on headers about to be encoded by HPACK.
pub fn own_values(headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        let sensitive = value.is_sensitive();
        // Valid already: the copy is too.
        if let Ok(mut own) = HeaderValue::from_bytes(value.as_bytes()) {
            own.set_sensitive(sensitive);
            *value = own;
        }
    }
}

/// Removes the hop-by-hop headers, and the headers the `Connection` header names. An upgrade
/// (`upgrade` true) keeps `Connection: upgrade` and `Upgrade`, which the next hop needs. `TE:
/// trailers` is kept (gRPC asks for trailers with it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Whether the request asks for an HTTP/1.1 upgrade (WebSocket): `Connection: upgrade` and an
/// `Upgrade` header.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The request's `x-request-id`, added (a random UUID, as Envoy generates) when absent.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        return id.clone();
    }
    let value = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), value.clone());
    value
}

/// A new `x-request-id` value: a random UUID, as Envoy generates.
pub fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// A reply the proxy makes itself (Envoy's local reply): `flag` is Envoy's response flag.
#[derive(Debug)]
pub struct LocalReply {
    pub status: StatusCode,
    pub flag: &'static str,
    pub body: bytes::Bytes,
    pub headers: HeaderMap,
}

impl LocalReply {
    pub fn new(status: StatusCode, flag: &'static str, body: &'static str) -> Self {
        LocalReply {
            status,
            flag,
            body: bytes::Bytes::from_static(body.as_bytes()),
            headers: HeaderMap::new(),
        }
    }

    /// No route matched the request: 404, `NR` (Envoy sends no body).
    pub fn no_route() -> Self {
        LocalReply::new(StatusCode::NOT_FOUND, "NR", "")
    }

    /// No endpoint to send to: 503, `UH`.
    pub fn no_healthy_upstream() -> Self {
        LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream")
    }

    /// The destination cluster does not exist: 503, `NC`.
    pub fn no_cluster() -> Self {
        LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "NC", "no healthy upstream")
    }

    /// The route's timeout (or the last try's) passed before a response: 504, `UT`.
    pub fn upstream_timeout() -> Self {
        LocalReply::new(
            StatusCode::GATEWAY_TIMEOUT,
            "UT",
            "upstream request timeout",
        )
    }

    /// The upstream failed before a response (Envoy's wording, which clients grep for).
    pub fn upstream_failed(flag: &'static str) -> Self {
        match flag {
            "UO" => LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                flag,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            ),
            "UPE" => LocalReply::new(
                StatusCode::BAD_GATEWAY,
                flag,
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
            ),
            "UR" => LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                flag,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
            ),
            _ => LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                flag,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            ),
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(body::full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        if !self.body.is_empty() && !resp.headers().contains_key(header::CONTENT_TYPE) {
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_values_stop_sharing_the_buffer_they_were_parsed_from() {
        let read_buffer = bytes::Bytes::from(vec![b'a'; 8192]);
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_maybe_shared(read_buffer.slice(0..16)).unwrap();
        h.insert("x-a", value);
        let mut secret = HeaderValue::from_maybe_shared(read_buffer.slice(16..32)).unwrap();
        secret.set_sensitive(true);
        h.insert(header::AUTHORIZATION, secret);
        assert!(!read_buffer.is_unique());
        own_values(&mut h);
        assert!(
            read_buffer.is_unique(),
            "a header value still holds the read buffer"
        );
        assert_eq!(h["x-a"], "a".repeat(16));
        assert!(h[header::AUTHORIZATION].is_sensitive());
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_ones_connection_names() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn an_upgrade_keeps_what_the_next_hop_needs() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        let mut h = map(&[("upgrade", "websocket")]);
        assert!(
            !is_upgrade(&h),
            "Upgrade without Connection: upgrade is not one"
        );
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn request_id_is_kept_or_added() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = request_id(&mut h);
        assert_eq!(id.len(), 36, "{id:?}");
        assert_eq!(h[&X_REQUEST_ID], id);
        assert_ne!(request_id(&mut HeaderMap::new()), id);
    }
}
