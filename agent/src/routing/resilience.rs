//! A route's resilience settings as the data path applies them: the retry policy (Istio's
//! conversion of `HTTPRetry` to Envoy's, defaults included), fault injection and mirrors.
//! Compiled once per snapshot from the VirtualService's route; validation has already refused
//! what Istio refuses, so what reaches here is well-formed.

use std::sync::LazyLock;
use std::time::Duration;

use http::StatusCode;

use crate::config::istio::virtual_service::{self as vs, HttpFaultInjection, HttpRetry};
use crate::routing::ClusterKey;

/// Envoy's default retry back-off base interval (`base_interval`, 25 ms); the most is ten times it.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// Envoy's retry conditions (`x-envoy-retry-on`, `x-envoy-retry-grpc-on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx response, or no response (connect failure, reset, per-try timeout).
    pub five_xx: bool,
    /// 502, 503 or 504, or no response.
    pub gateway_error: bool,
    /// The upstream reset or closed the stream before a response (or did not answer in time).
    pub reset: bool,
    /// A reset before any of the request was sent upstream.
    pub reset_before_request: bool,
    /// No connection could be made.
    pub connect_failure: bool,
    /// 409.
    pub retriable_4xx: bool,
    /// HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// A status in [`RetryPolicy::statuses`].
    pub retriable_status_codes: bool,
    /// A response header named in the request's `x-envoy-retriable-header-names`.
    pub retriable_headers: bool,
    /// gRPC statuses in the response headers (trailers-only responses), as Envoy reads them.
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_internal: bool,
    pub grpc_resource_exhausted: bool,
    pub grpc_unavailable: bool,
}

impl RetryOn {
    /// Sets the condition Envoy names `name`; false when it is not one ambit applies (validation
    /// accepts `envoy-ratelimited` and `http3-post-connect-failure`, which never happen here).
    fn set(&mut self, name: &str) -> bool {
        let flag = match name {
            "5xx" => &mut self.five_xx,
            "gateway-error" => &mut self.gateway_error,
            "reset" => &mut self.reset,
            "reset-before-request" => &mut self.reset_before_request,
            "connect-failure" => &mut self.connect_failure,
            "retriable-4xx" => &mut self.retriable_4xx,
            "refused-stream" => &mut self.refused_stream,
            "retriable-status-codes" => &mut self.retriable_status_codes,
            "retriable-headers" => &mut self.retriable_headers,
            "cancelled" => &mut self.grpc_cancelled,
            "deadline-exceeded" => &mut self.grpc_deadline_exceeded,
            "internal" => &mut self.grpc_internal,
            "resource-exhausted" => &mut self.grpc_resource_exhausted,
            "unavailable" => &mut self.grpc_unavailable,
            _ => return false,
        };
        *flag = true;
        true
    }
}

/// A route's retry policy (Envoy's `RetryPolicy` as Istio builds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try (Envoy's `num_retries`): at most `1 + retries` tries.
    pub retries: u32,
    /// Each try's timeout; None: the route's timeout bounds every try.
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    /// Statuses retried under `retriable-status-codes`.
    pub statuses: Vec<u16>,
    /// Back-off base interval (Istio's `backoff`, Envoy's default 25 ms).
    pub backoff: Duration,
    /// Envoy's `previous_hosts` predicate: a retry goes to an endpoint not tried yet when one is
    /// left (Istio: `retryIgnorePreviousHosts`, default true).
    pub avoid_previous_hosts: bool,
}

/// Istio's retry policy for routes that set none (`retry.DefaultPolicy`): two retries on
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` with 503
/// retriable, to another host.
pub static DEFAULT_RETRY: LazyLock<RetryPolicy> = LazyLock::new(|| {
    let mut on = RetryOn::default();
    for c in DEFAULT_RETRY_ON.split(',') {
        on.set(c);
    }
    RetryPolicy {
        retries: 2,
        per_try_timeout: None,
        on,
        statuses: vec![503],
        backoff: DEFAULT_BACKOFF,
        avoid_previous_hosts: true,
    }
});

/// Istio's default `retryOn`.
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// Istio's `retry.ConvertPolicy`: no `retries` → the default policy; `attempts: 0` → none; else
/// the default with the fields given replacing it (a `retryOn` replaces the conditions, its
/// status codes become retriable status codes).
pub fn retry_policy(retries: Option<&HttpRetry>) -> Option<RetryPolicy> {
    let Some(r) = retries else {
        return Some(DEFAULT_RETRY.clone());
    };
    if r.attempts <= 0 {
        return None;
    }
    let mut policy = DEFAULT_RETRY.clone();
    policy.retries = u32::try_from(r.attempts).unwrap_or(0);
    if r.per_try_timeout.is_some() {
        policy.per_try_timeout = r.per_try_timeout.filter(|d| !d.is_zero());
    }
    if !r.retry_on.trim().is_empty() {
        policy.on = RetryOn::default();
        policy.statuses.clear();
        for token in r.retry_on.split(',').map(str::trim) {
            match token.parse::<u16>() {
                Ok(status) => {
                    policy.statuses.push(status);
                    policy.on.retriable_status_codes = true;
                }
                Err(_) => {
                    policy.on.set(token);
                }
            }
        }
    }
    if let Some(b) = r.backoff.filter(|d| !d.is_zero()) {
        policy.backoff = b;
    }
    if let Some(ignore) = r.retry_ignore_previous_hosts {
        policy.avoid_previous_hosts = ignore;
    }
    Some(policy)
}

/// What a fault's abort answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortWith {
    Http(StatusCode),
    /// A gRPC status code (the response is HTTP 200 with `grpc-status`).
    Grpc(u32),
}

/// A route's `fault`: a delay and/or an abort, each for a share of requests (0–100).
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(AbortWith, f64)>,
}

pub fn fault(f: Option<&HttpFaultInjection>) -> Option<Fault> {
    let f = f?;
    let delay = f.delay.as_ref().and_then(|d| {
        let pct = d.effective_percentage();
        d.fixed_delay.map(|fixed| (fixed, pct))
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let with = match (&a.http_status, &a.grpc_status) {
            (Some(s), _) => AbortWith::Http(StatusCode::from_u16(u16::try_from(*s).ok()?).ok()?),
            (None, Some(g)) => AbortWith::Grpc(grpc_code(g)?),
            // `http2Error`: refused by validation ("not supported yet", as Istio).
            (None, None) => return None,
        };
        Some((with, a.effective_percentage()))
    });
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

/// A gRPC status code by its name (`UNAVAILABLE`) or number.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let name = name.trim();
    name.parse::<u32>().ok().filter(|c| *c <= 16).or_else(|| {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .and_then(|i| u32::try_from(i).ok())
    })
}

/// One mirror of a route: where a copy of a share (0–100) of its requests goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub cluster: ClusterKey,
    pub percentage: f64,
}

/// The route's mirrors: `mirror` with `mirrorPercentage` (or the deprecated `mirrorPercent`),
/// then each of `mirrors`; `cluster` turns a destination into its cluster key.
pub fn mirrors(
    r: &vs::HttpRoute,
    mut cluster: impl FnMut(&str, &vs::Destination) -> ClusterKey,
) -> Vec<Mirror> {
    let mut out = Vec::new();
    if let Some(d) = &r.mirror {
        out.push(Mirror {
            cluster: cluster("mirror", d),
            percentage: r.mirror_percentage(),
        });
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        out.push(Mirror {
            cluster: cluster(&format!("mirrors[{i}].destination"), &m.destination),
            // Istio: "If this field is absent, all the traffic (100%) will be mirrored."
            percentage: m.percentage.map_or(100.0, |p| p.value),
        });
    }
    out
}

#[cfg(test)]
mod tests;
