//! A route's `corsPolicy`, as Envoy's CORS filter applies Istio's translation of it
//! (`TranslateCORSPolicy`): preflights answered by the proxy, and the headers added to the
//! responses of allowed cross-origin requests.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};

use super::super::Cors;

#[cfg(test)]
mod tests;

/// Whether `origin` may make cross-origin requests. Envoy (`CorsFilter::isOriginAllowed`) also
/// allows every origin when a matcher matches the literal `*` (`exact: "*"`, `regex: ".*"`); it
/// echoes the request's origin either way, never `*`.
pub fn origin_allowed(c: &Cors, origin: &HeaderValue) -> bool {
    c.allow_origins
        .iter()
        .any(|m| m.matches("*") || m.matches_bytes(origin.as_bytes()))
}

/// The proxy's own answer to a CORS preflight: an `OPTIONS` request with a non-empty `Origin` and
/// `Access-Control-Request-Method`, from an allowed origin. `None` means forward the request:
/// not a preflight, or an origin that is not allowed (Istio's default `unmatchedPreflights:
/// FORWARD`, Envoy's `forward_not_matching_preflights: true`).
///
/// The answer is 200 with `access-control-allow-origin` (the request's origin),
/// `-allow-credentials: true` when set, `-allow-methods`, `-allow-headers` (the lists joined with
/// `,`; a lone `*` echoes the request's `access-control-request-method`/`-headers`), and
/// `-max-age` in whole seconds.
pub fn cors_preflight(c: &Cors, method: &Method, headers: &HeaderMap) -> Option<Response<()>> {
    if method != Method::OPTIONS {
        return None;
    }
    let origin = non_empty(headers, &ORIGIN)?;
    let request_method = non_empty(headers, &ACCESS_CONTROL_REQUEST_METHOD)?;
    if !origin_allowed(c, origin) {
        return None;
    }
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::OK;
    let out = response.headers_mut();
    out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if c.allow_credentials == Some(true) {
        out.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let echo = |list: &[String], requested: Option<&HeaderValue>| match list {
        // Envoy sets the echo even when the request lacks the header: an empty value.
        [star] if star == "*" => Some(
            requested
                .cloned()
                .unwrap_or_else(|| HeaderValue::from_static("")),
        ),
        _ => joined(list),
    };
    if let Some(v) = echo(&c.allow_methods, Some(request_method)) {
        out.insert(ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    if let Some(v) = echo(
        &c.allow_headers,
        headers.get(ACCESS_CONTROL_REQUEST_HEADERS),
    ) {
        out.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    if let Some(age) = c.max_age {
        out.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age.as_secs()));
    }
    Some(response)
}

/// The headers to set on the response to a request that carried `origin`, when that origin is
/// allowed (none otherwise, and none without an `Origin`): `access-control-allow-origin` (the
/// origin), `-allow-credentials: true` when set, and `-expose-headers` when any are listed.
pub fn cors_response_headers(
    c: &Cors,
    origin: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    let Some(origin) = origin.filter(|o| !o.is_empty() && origin_allowed(c, o)) else {
        return Vec::new();
    };
    let mut out = vec![(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())];
    if c.allow_credentials == Some(true) {
        out.push((
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ));
    }
    if let Some(v) = joined(&c.expose_headers) {
        out.push((ACCESS_CONTROL_EXPOSE_HEADERS, v));
    }
    out
}

fn non_empty<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    headers.get(name).filter(|v| !v.is_empty())
}

/// Istio joins the lists with `,`. A value that cannot be a header (a control character that
/// slipped past validation) leaves the header out rather than failing the request.
fn joined(list: &[String]) -> Option<HeaderValue> {
    let value = list.join(",");
    if value.is_empty() {
        return None;
    }
    HeaderValue::try_from(value).ok()
}
