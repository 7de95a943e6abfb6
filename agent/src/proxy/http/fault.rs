//! Istio's `HTTPFaultInjection` as Envoy's fault filter applies it at the client side, before the
//! request is routed upstream: a fixed delay for a share of requests (flag `DI`), then an abort
//! for a share of them (flag `FI`) with an HTTP status, or for gRPC a trailers-only response
//! carrying the `grpc-status`.

use http::header::{self, HeaderValue};
use http::StatusCode;

use super::headers::LocalReply;
use crate::routing::resilience::AbortWith;

/// Whether this request is among the `percentage` (0–100) the fault applies to.
pub fn hit(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && fastrand::f64() * 100.0 < percentage)
}

/// Envoy's abort: the status with the body `fault filter abort`; a gRPC abort answers 200 with
/// `content-type: application/grpc` and the status in `grpc-status` (a trailers-only response).
pub fn abort_reply(with: AbortWith) -> LocalReply {
    match with {
        AbortWith::Http(status) => LocalReply::new(status, "FI", "fault filter abort"),
        AbortWith::Grpc(code) => {
            let mut reply = LocalReply::new(StatusCode::OK, "FI", "");
            reply.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            reply.headers.insert("grpc-status", HeaderValue::from(code));
            reply.headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            reply
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_honours_the_edges_and_lands_near_the_share() {
        assert!((0..1000).all(|_| hit(100.0)));
        assert!((0..1000).all(|_| !hit(0.0)));
        let n = (0..100_000).filter(|_| hit(25.0)).count();
        assert!((23_500..26_500).contains(&n), "{n} of 100000 at 25%");
    }

    #[test]
    fn grpc_abort_is_a_trailers_only_200_with_the_status() {
        let r = abort_reply(AbortWith::Grpc(14));
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.flag, "FI");
        assert_eq!(r.headers["grpc-status"], "14");
        assert_eq!(r.headers[header::CONTENT_TYPE], "application/grpc");
        let r = abort_reply(AbortWith::Http(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!((r.status.as_u16(), r.flag), (503, "FI"));
    }
}
