//! Tests of `corsPolicy`, each naming the Istio (or Envoy CORS filter) rule it checks.

use std::time::Duration;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
};

use super::*;
use crate::routing::matching::tests::{exact, prefix, regex};
use crate::routing::StrMatch;

/// Istio CorsPolicy example: allowOrigins exact "https://example.com", allowMethods POST, GET,
/// allowCredentials false, allowHeaders X-Foo-Bar, maxAge "24h".
fn istio_example() -> Cors {
    Cors {
        allow_origins: vec![exact("https://example.com")],
        allow_methods: vec!["POST".into(), "GET".into()],
        allow_headers: vec!["X-Foo-Bar".into()],
        expose_headers: vec![],
        max_age: Some(Duration::from_secs(24 * 3600)),
        allow_credentials: Some(false),
    }
}

fn preflight_headers(origin: &str, method: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ORIGIN, HeaderValue::from_str(origin).expect("test origin"));
    h.insert(
        ACCESS_CONTROL_REQUEST_METHOD,
        HeaderValue::from_str(method).expect("test method"),
    );
    h
}

fn get<'r>(r: &'r Response<()>, name: &HeaderName) -> Option<&'r str> {
    r.headers().get(name).map(|v| v.to_str().expect("ASCII"))
}

fn allowed_by(origins: Vec<StrMatch>, origin: &str) -> bool {
    let c = Cors {
        allow_origins: origins,
        ..Default::default()
    };
    origin_allowed(&c, &HeaderValue::from_str(origin).expect("test origin"))
}

#[test]
fn preflight_from_an_allowed_origin_is_answered_as_in_the_istio_example() {
    // Envoy CORS filter: an OPTIONS with Origin and Access-Control-Request-Method is answered by
    // the proxy, 200, with the policy's headers; Istio joins lists with "," and gives max-age in
    // seconds.
    let h = preflight_headers("https://example.com", "POST");
    let r = cors_preflight(&istio_example(), &Method::OPTIONS, &h).expect("answered");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        get(&r, &ACCESS_CONTROL_ALLOW_ORIGIN),
        Some("https://example.com")
    );
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_METHODS), Some("POST,GET"));
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_HEADERS), Some("X-Foo-Bar"));
    assert_eq!(get(&r, &ACCESS_CONTROL_MAX_AGE), Some("86400"));
    assert_eq!(
        get(&r, &ACCESS_CONTROL_ALLOW_CREDENTIALS),
        None,
        "false: left out"
    );
    assert_eq!(get(&r, &ACCESS_CONTROL_EXPOSE_HEADERS), None);
}

#[test]
fn preflight_from_another_origin_is_forwarded() {
    // Istio unmatchedPreflights default FORWARD (Envoy forward_not_matching_preflights: true).
    let h = preflight_headers("https://evil.example", "POST");
    assert!(cors_preflight(&istio_example(), &Method::OPTIONS, &h).is_none());
}

#[test]
fn only_options_with_origin_and_request_method_is_a_preflight() {
    // Envoy CORS filter: preflight = OPTIONS, non-empty Origin, non-empty
    // Access-Control-Request-Method.
    let c = istio_example();
    let full = preflight_headers("https://example.com", "POST");
    assert!(cors_preflight(&c, &Method::GET, &full).is_none());
    let mut no_method = full.clone();
    no_method.remove(ACCESS_CONTROL_REQUEST_METHOD);
    assert!(cors_preflight(&c, &Method::OPTIONS, &no_method).is_none());
    let mut empty_method = full.clone();
    empty_method.insert(ACCESS_CONTROL_REQUEST_METHOD, HeaderValue::from_static(""));
    assert!(cors_preflight(&c, &Method::OPTIONS, &empty_method).is_none());
    let mut no_origin = full;
    no_origin.remove(ORIGIN);
    assert!(cors_preflight(&c, &Method::OPTIONS, &no_origin).is_none());
}

#[test]
fn star_methods_and_headers_echo_the_request() {
    // Envoy CORS filter: allow_methods (allow_headers) "*" answers with the request's
    // Access-Control-Request-Method (-Headers).
    let c = Cors {
        allow_methods: vec!["*".into()],
        allow_headers: vec!["*".into()],
        ..istio_example()
    };
    let mut h = preflight_headers("https://example.com", "PATCH");
    h.insert(
        ACCESS_CONTROL_REQUEST_HEADERS,
        HeaderValue::from_static("x-a,x-b"),
    );
    let r = cors_preflight(&c, &Method::OPTIONS, &h).expect("answered");
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_METHODS), Some("PATCH"));
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_HEADERS), Some("x-a,x-b"));
}

#[test]
fn allow_credentials_true_is_sent() {
    // Istio CorsPolicy.allowCredentials → Access-Control-Allow-Credentials: true.
    let c = Cors {
        allow_credentials: Some(true),
        allow_methods: vec![],
        allow_headers: vec![],
        max_age: None,
        ..istio_example()
    };
    let h = preflight_headers("https://example.com", "GET");
    let r = cors_preflight(&c, &Method::OPTIONS, &h).expect("answered");
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_CREDENTIALS), Some("true"));
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_METHODS), None, "none listed");
    assert_eq!(get(&r, &ACCESS_CONTROL_MAX_AGE), None);
}

#[test]
fn allow_origins_are_string_matches() {
    // Istio CorsPolicy.allowOrigins: StringMatch (exact, prefix, regex); none: no origin.
    assert!(allowed_by(vec![prefix("https://")], "https://a.com"));
    assert!(!allowed_by(vec![prefix("https://")], "http://a.com"));
    assert!(allowed_by(
        vec![regex(r"https://.*\.example\.com")],
        "https://x.example.com"
    ));
    assert!(!allowed_by(
        vec![regex(r"https://.*\.example\.com")],
        "https://example.com.evil"
    ));
    assert!(!allowed_by(vec![], "https://a.com"));
}

#[test]
fn a_matcher_that_matches_star_allows_every_origin() {
    // Envoy CorsFilter::isOriginAllowed: `allow_origin->match("*") || match(origin)`.
    assert!(allowed_by(vec![exact("*")], "https://anyone.org"));
    assert!(allowed_by(vec![regex(".*")], "https://anyone.org"));
    let c = Cors {
        allow_origins: vec![exact("*")],
        ..Default::default()
    };
    let h = preflight_headers("https://anyone.org", "GET");
    let r = cors_preflight(&c, &Method::OPTIONS, &h).expect("answered");
    assert_eq!(
        get(&r, &ACCESS_CONTROL_ALLOW_ORIGIN),
        Some("https://anyone.org"),
        "echoed"
    );
}

#[test]
fn response_to_an_allowed_origin_gets_allow_origin_credentials_and_expose_headers() {
    // Envoy CORS filter encodeHeaders: for a CORS request from an allowed origin, set
    // allow-origin (the origin), allow-credentials (when true) and expose-headers.
    let c = Cors {
        expose_headers: vec!["X-A".into(), "X-B".into()],
        allow_credentials: Some(true),
        ..istio_example()
    };
    let origin = HeaderValue::from_static("https://example.com");
    let got = cors_response_headers(&c, Some(&origin));
    let want = vec![
        (ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        ),
        (
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("X-A,X-B"),
        ),
    ];
    assert_eq!(got, want);
}

#[test]
fn response_to_other_origins_is_untouched() {
    // Envoy CORS filter: "Origin did not match. Do not modify the response headers."
    let c = istio_example();
    let other = HeaderValue::from_static("https://evil.example");
    assert!(cors_response_headers(&c, Some(&other)).is_empty());
    assert!(cors_response_headers(&c, None).is_empty());
    assert!(cors_response_headers(&c, Some(&HeaderValue::from_static(""))).is_empty());
}

#[test]
fn a_list_entry_that_cannot_be_a_header_is_left_out() {
    // No panic on configuration that slipped past validation: the header is omitted.
    let c = Cors {
        allow_methods: vec!["GET\n".into()],
        ..istio_example()
    };
    let h = preflight_headers("https://example.com", "GET");
    let r = cors_preflight(&c, &Method::OPTIONS, &h).expect("answered");
    assert_eq!(get(&r, &ACCESS_CONTROL_ALLOW_METHODS), None);
}
