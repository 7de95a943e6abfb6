//! What Envoy's router decides between the tries of one request: whether a try's result is
//! retried under the route's [`RetryPolicy`] (`RetryStateImpl`: `wouldRetryFromHeaders`,
//! `wouldRetryFromReset`), how long to back off before the next try (its jittered exponential
//! back-off), and the request body each try sends ([`Payload`]).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use http_body_util::BodyExt;

use super::client::{self, UpstreamError};
use super::replay::Replay;
use crate::routing::resilience::RetryPolicy;

/// Envoy's request header naming the response headers that make a try retriable
/// (`retriable-headers`).
pub static RETRIABLE_HEADER_NAMES: HeaderName =
    HeaderName::from_static("x-envoy-retriable-header-names");

/// How one try ended, as the retry policy looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryEnd<'a> {
    /// The upstream answered (headers received).
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
    /// No connection (TCP, HBONE tunnel or HTTP handshake): nothing was sent.
    ConnectFailure,
    /// The upstream refused the HTTP/2 stream (`REFUSED_STREAM`): nothing was processed.
    RefusedStream,
    /// The upstream reset or closed before answering.
    Reset,
    /// The try's `perTryTimeout` passed without an answer.
    PerTryTimeout,
}

impl TryEnd<'_> {
    /// How an upstream error ends a try.
    pub fn of_error(e: &UpstreamError) -> TryEnd<'static> {
        match e {
            UpstreamError::Connect { .. }
            | UpstreamError::ConnectTimeout { .. }
            | UpstreamError::Tunnel { .. }
            | UpstreamError::Handshake { .. } => TryEnd::ConnectFailure,
            UpstreamError::Request { source, .. } if refused_stream(source) => {
                TryEnd::RefusedStream
            }
            UpstreamError::Request { .. }
            | UpstreamError::Closed { .. }
            | UpstreamError::Malformed { .. } => TryEnd::Reset,
            // The breaker refused it: Envoy never retries its own overflow.
            UpstreamError::Overflow { .. } => TryEnd::Reset,
        }
    }
}

/// Whether `policy` retries a try that ended so; `request` is the request's headers (for
/// `retriable-headers`).
pub fn retriable(policy: &RetryPolicy, end: TryEnd<'_>, request: &HeaderMap) -> bool {
    let on = &policy.on;
    match end {
        TryEnd::Response { status, headers } => {
            let code = status.as_u16();
            (on.five_xx && status.is_server_error())
                || (on.gateway_error && matches!(code, 502..=504))
                || (on.retriable_4xx && code == 409)
                || (on.retriable_status_codes && policy.statuses.contains(&code))
                || (on.retriable_headers && has_retriable_header(request, headers))
                || grpc_retriable(policy, headers)
        }
        // Envoy `wouldRetryFromReset`: any reset under 5xx, gateway-error or reset; the
        // specific reasons under their own conditions.
        TryEnd::ConnectFailure => {
            on.five_xx
                || on.gateway_error
                || on.reset
                || on.connect_failure
                || on.reset_before_request
        }
        TryEnd::RefusedStream => on.five_xx || on.gateway_error || on.reset || on.refused_stream,
        TryEnd::Reset | TryEnd::PerTryTimeout => on.five_xx || on.gateway_error || on.reset,
    }
}

/// gRPC statuses Envoy retries on, read from the response headers (a trailers-only response).
fn grpc_retriable(policy: &RetryPolicy, headers: &HeaderMap) -> bool {
    let on = &policy.on;
    if !(on.grpc_cancelled
        || on.grpc_deadline_exceeded
        || on.grpc_internal
        || on.grpc_resource_exhausted
        || on.grpc_unavailable)
    {
        return false;
    }
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    else {
        return false;
    };
    (code == 1 && on.grpc_cancelled)
        || (code == 4 && on.grpc_deadline_exceeded)
        || (code == 13 && on.grpc_internal)
        || (code == 8 && on.grpc_resource_exhausted)
        || (code == 14 && on.grpc_unavailable)
}

fn has_retriable_header(request: &HeaderMap, response: &HeaderMap) -> bool {
    request
        .get_all(&RETRIABLE_HEADER_NAMES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|name| !name.is_empty() && response.contains_key(name))
}

fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = err.source();
    }
    false
}

/// Envoy's jittered exponential back-off before retry `retry` (1 for the first): a random time
/// below `base × (2^retry − 1)`, at most ten times `base` (`JitteredExponentialBackOffStrategy`).
pub fn backoff(base: Duration, retry: u32, random: u64) -> Duration {
    let max = base.saturating_mul(10);
    let multiplier = (1u64 << retry.min(32)) - 1;
    let ceiling = base
        .saturating_mul(u32::try_from(multiplier).unwrap_or(u32::MAX))
        .min(max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(random % nanos)
}

/// When a try started now must have its response head: the route's deadline (its `timeout`
/// from the request's start) or the retry policy's `perTryTimeout`, whichever comes first.
pub fn try_deadline(
    route: Option<tokio::time::Instant>,
    per_try: Option<Duration>,
) -> Option<tokio::time::Instant> {
    let per_try = per_try.map(|p| tokio::time::Instant::now() + p);
    match (route, per_try) {
        (Some(r), Some(p)) => Some(r.min(p)),
        (r, p) => r.or(p),
    }
}

/// Envoy's `%RESPONSE_CODE_DETAILS%` for the 504 answered when no try answered in time
/// (`per_try`: the last try ran out of its `perTryTimeout`, not the route its `timeout`).
pub fn timeout_details(per_try: bool) -> &'static str {
    if per_try {
        "upstream_per_try_timeout"
    } else {
        "upstream_response_timeout"
    }
}

/// The app's request body as the proxy reads it (counted, maybe teed to mirrors).
type Downstream = client::Body;

/// The request body of each try: none, the app's body once (no retry can resend it), or a
/// replayable one.
pub enum Payload {
    Empty,
    Once(Option<Downstream>),
    Replay(Replay<Downstream>),
}

impl Payload {
    /// `replay`: retries are possible, so the body is kept for them (up to the replay limit).
    pub fn new(body: Downstream, replay: bool) -> Payload {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            Payload::Empty
        } else if replay {
            Payload::Replay(Replay::new(body))
        } else {
            Payload::Once(Some(body))
        }
    }

    /// The next try's body; None when it cannot be sent again.
    pub fn next_body(&mut self) -> Option<client::Body> {
        match self {
            Payload::Empty => Some(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            ),
            Payload::Once(body) => body.take(),
            Payload::Replay(r) => r.attempt().map(BodyExt::boxed),
        }
    }

    /// Whether another try could send the body.
    pub fn replayable(&self) -> bool {
        match self {
            Payload::Empty => true,
            Payload::Once(body) => body.is_some(),
            Payload::Replay(r) => r.replayable(),
        }
    }
}

/// Envoy's order of response flags in `%RESPONSE_FLAGS%`.
const FLAG_ORDER: &[&str] = &[
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC",
    "URX", "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR",
];

/// Joined flag strings made so far (a handful: flags combine in few ways).
static JOINED: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Mutex::default);

/// `flags` with `flag` added, in Envoy's order, comma-separated (`-` is no flag).
pub fn add_flag(flags: &'static str, flag: &'static str) -> &'static str {
    if flags == "-" || flags.is_empty() {
        return flag;
    }
    if flags.split(',').any(|f| f == flag) {
        return flags;
    }
    let mut all: Vec<&str> = flags.split(',').chain(std::iter::once(flag)).collect();
    let rank = |f: &&str| FLAG_ORDER.iter().position(|o| o == f).unwrap_or(usize::MAX);
    all.sort_by_key(rank);
    let joined = all.join(",");
    let mut set = JOINED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(s) = set.get(joined.as_str()) {
        return s;
    }
    let s: &'static str = Box::leak(joined.into_boxed_str());
    set.insert(s);
    s
}

#[cfg(test)]
mod tests;
