use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};

use super::*;
use crate::routing::resilience::{retry_policy, DEFAULT_RETRY};

fn policy(retry_on: &str) -> RetryPolicy {
    let r: crate::config::istio::virtual_service::HttpRoute =
        serde_yaml::from_str(&format!("retries: {{attempts: 3, retryOn: '{retry_on}'}}")).unwrap();
    retry_policy(r.retries.as_ref()).unwrap()
}

fn response(status: u16, headers: &HeaderMap) -> TryEnd<'_> {
    TryEnd::Response {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
    }
}

#[test]
fn five_xx_retries_every_server_error_and_every_failure_to_answer() {
    // Envoy retry-on 5xx: any 5xx response, or no response (disconnect/reset/read timeout).
    let p = policy("5xx");
    let h = HeaderMap::new();
    let none = HeaderMap::new();
    for s in [500, 501, 502, 503, 504, 599] {
        assert!(retriable(&p, response(s, &h), &none), "{s}");
    }
    for s in [200, 404, 409, 429] {
        assert!(!retriable(&p, response(s, &h), &none), "{s}");
    }
    for end in [
        TryEnd::ConnectFailure,
        TryEnd::Reset,
        TryEnd::RefusedStream,
        TryEnd::PerTryTimeout,
    ] {
        assert!(retriable(&p, end, &none), "{end:?}");
    }
}

#[test]
fn gateway_error_is_502_503_504_only() {
    let p = policy("gateway-error");
    let h = HeaderMap::new();
    assert!(!retriable(&p, response(500, &h), &h));
    for s in [502, 503, 504] {
        assert!(retriable(&p, response(s, &h), &h));
    }
    assert!(retriable(&p, TryEnd::PerTryTimeout, &h));
}

#[test]
fn connect_failure_and_refused_stream_are_only_their_own_failures() {
    let h = HeaderMap::new();
    let p = policy("connect-failure");
    assert!(retriable(&p, TryEnd::ConnectFailure, &h));
    assert!(!retriable(&p, TryEnd::Reset, &h));
    assert!(!retriable(&p, response(503, &h), &h));
    let p = policy("refused-stream");
    assert!(retriable(&p, TryEnd::RefusedStream, &h));
    assert!(!retriable(&p, TryEnd::ConnectFailure, &h));
    let p = policy("reset");
    assert!(retriable(&p, TryEnd::Reset, &h));
    assert!(retriable(&p, TryEnd::ConnectFailure, &h));
    assert!(!retriable(&p, response(500, &h), &h));
}

#[test]
fn retriable_4xx_is_409_and_status_codes_are_the_listed_ones() {
    let h = HeaderMap::new();
    let p = policy("retriable-4xx");
    assert!(retriable(&p, response(409, &h), &h));
    assert!(!retriable(&p, response(404, &h), &h));
    let p = policy("429,503");
    assert!(retriable(&p, response(429, &h), &h));
    assert!(retriable(&p, response(503, &h), &h));
    assert!(!retriable(&p, response(502, &h), &h));
}

#[test]
fn istio_default_policy_retries_503_and_connect_failures_not_500() {
    let h = HeaderMap::new();
    let p = &*DEFAULT_RETRY;
    assert!(retriable(p, response(503, &h), &h));
    assert!(retriable(p, TryEnd::ConnectFailure, &h));
    assert!(retriable(p, TryEnd::RefusedStream, &h));
    assert!(!retriable(p, response(500, &h), &h));
    assert!(!retriable(p, TryEnd::Reset, &h));
    assert!(!retriable(p, TryEnd::PerTryTimeout, &h));
}

#[test]
fn grpc_conditions_read_grpc_status_from_the_response_headers() {
    let p = policy("unavailable,cancelled");
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from_static("14"));
    assert!(retriable(&p, response(200, &h), &HeaderMap::new()));
    h.insert("grpc-status", HeaderValue::from_static("1"));
    assert!(retriable(&p, response(200, &h), &HeaderMap::new()));
    h.insert("grpc-status", HeaderValue::from_static("13"));
    assert!(!retriable(&p, response(200, &h), &HeaderMap::new()));
    let p = policy("internal,resource-exhausted,deadline-exceeded");
    for code in ["13", "8", "4"] {
        h.insert("grpc-status", HeaderValue::from_static(code));
        assert!(
            retriable(&p, response(200, &h), &HeaderMap::new()),
            "{code}"
        );
    }
}

#[test]
fn retriable_headers_names_come_from_the_request() {
    let p = policy("retriable-headers");
    let mut req = HeaderMap::new();
    req.insert(
        &RETRIABLE_HEADER_NAMES,
        HeaderValue::from_static("x-retry-me, x-other"),
    );
    let mut resp = HeaderMap::new();
    assert!(!retriable(&p, response(200, &resp), &req));
    resp.insert("x-other", HeaderValue::from_static("1"));
    assert!(retriable(&p, response(200, &resp), &req));
    assert!(!retriable(&p, response(200, &resp), &HeaderMap::new()));
}

#[test]
fn backoff_is_jittered_below_an_exponential_ceiling_capped_at_ten_times_the_base() {
    // Envoy: random below base * (2^n - 1), at most 10 * base.
    let base = Duration::from_millis(25);
    assert_eq!(
        backoff(base, 1, 24_999_999),
        Duration::from_nanos(24_999_999)
    );
    assert_eq!(backoff(base, 1, 25_000_000), Duration::ZERO);
    assert!(backoff(base, 2, u64::MAX) < Duration::from_millis(75));
    assert!(backoff(base, 3, u64::MAX) < Duration::from_millis(175));
    for n in 4..40 {
        assert!(
            backoff(base, n, u64::MAX - 7) < Duration::from_millis(250),
            "{n}"
        );
    }
    let max = (0..10_000u64)
        .map(|i| backoff(base, 10, i * 1_000_003))
        .max()
        .unwrap();
    assert!(
        max > Duration::from_millis(200),
        "{max:?}: the cap is reached"
    );
}

#[test]
fn flags_join_in_envoy_order() {
    assert_eq!(add_flag("-", "UF"), "UF");
    assert_eq!(add_flag("UF", "URX"), "UF,URX");
    assert_eq!(add_flag("URX", "UF"), "UF,URX");
    assert_eq!(add_flag("DI", "UT"), "UT,DI");
    assert_eq!(add_flag("UF,URX", "UF"), "UF,URX");
    // Interned: the same joined string comes back.
    assert!(std::ptr::eq(add_flag("UF", "URX"), add_flag("URX", "UF")));
}
