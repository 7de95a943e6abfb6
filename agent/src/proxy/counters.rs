//! ambit's own proxy counters (`ambit_proxy_<name>_total` and the status file's `proxy`): plain
//! atomics on the data path, read at scrape time. Each is declared once, with its help text, in
//! the list below; the struct, the status fields and the exported list all come from it.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $help:literal])+ $name:ident,)*) => {
        /// The proxy's counters, one atomic each.
        #[derive(Debug, Default, serde::Serialize)]
        pub struct Counters {
            $($(#[doc = $help])+ pub $name: AtomicU64,)*
        }

        impl Counters {
            /// Every counter as (name, help, value).
            pub fn all(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((
                    stringify!($name),
                    concat!($($help),+).trim_ascii(),
                    self.$name.load(Ordering::Relaxed),
                ),)*]
            }
        }
    };
}

counters! {
    /// Outbound connections accepted from enrolled pods.
    outbound_accepted,
    /// Outbound connections refused: no original destination recorded.
    outbound_orig_dst_missing,
    /// Outbound connections whose upstream connect failed.
    outbound_connect_failed,
    /// Inbound connections accepted for enrolled pods.
    inbound_accepted,
    /// Inbound connections whose connect to the pod failed.
    inbound_connect_failed,
    /// Outbound connections to enrolled workloads, sent over HBONE (or, to a pod of this node,
    /// handed to its inbound stage in-process: `same_node_handoffs`).
    outbound_hbone,
    /// Outbound connections to destinations outside the mesh, sent in plaintext.
    outbound_plaintext,
    /// Outbound connections to a Service without ready endpoints (reset).
    outbound_no_endpoints,
    /// Outbound connections refused (reset) because the cluster view was incomplete.
    outbound_incomplete_view,
    /// Outbound TCP connections refused by the cluster's `connectionPool.tcp.maxConnections` (flag `UO`).
    outbound_overflow,
    /// Outbound HBONE tunnels that could not be opened (same-node handoffs refused included).
    outbound_hbone_failed,
    /// Outbound connections served at L7 (HTTP routed per request).
    outbound_http,
    /// Outbound connections whose protocol was detected from the first bytes.
    outbound_sniffed,
    /// HTTP requests received from enrolled pods' apps.
    http_requests,
    /// HTTP requests answered by the proxy itself (no route, no endpoint, redirect, direct response, upstream failure).
    http_local_replies,
    /// HTTP/1.1 requests at their destination relayed as bytes, their heads parsed only to record
    /// them (destination-side L7 with nothing to change in them: `http::passthrough`).
    http_inbound_relayed,
    /// HTTP/1.1 requests at their source routed and relayed as bytes (`http::passthrough::source`).
    http_outbound_relayed,
    /// HTTP requests sent again under the route's retry policy (each retry counted).
    http_retries,
    /// HTTP requests whose retries ran out on a retriable result (flag `URX`).
    http_retries_exhausted,
    /// HTTP requests that timed out (the route's `timeout`, or the last try's `perTryTimeout`; flag `UT`).
    http_timeouts,
    /// HTTP requests delayed by a fault rule (flag `DI`).
    http_fault_delays,
    /// HTTP requests aborted by a fault rule (flag `FI`).
    http_fault_aborts,
    /// Copies of HTTP requests sent to a mirror.
    http_mirrored,
    /// Mirror copies that failed or were dropped (their responses are discarded either way).
    http_mirror_failed,
    /// HBONE (15008) connections accepted.
    hbone_inbound_accepted,
    /// HBONE CONNECT streams received, and same-node connections handed to the inbound stage
    /// in-process (those also in `same_node_handoffs`).
    hbone_inbound_streams,
    /// Connections between two pods of this node handed from the outbound to the inbound stage
    /// in-process, without TLS (`--same-node-shortcut`).
    same_node_handoffs,
    /// HBONE TLS handshakes that failed (bad or missing client certificate, or the client refused ours).
    hbone_tls_refused,
    /// HBONE requests answered 400.
    hbone_inbound_bad_request,
    /// HBONE requests answered 503 for their target (a hostname no Service has, a Service port
    /// that maps to no pod port, one of the proxy's own ports), before the app is dialled.
    hbone_inbound_unavailable,
    /// HBONE connections closed (GOAWAY ENHANCE_YOUR_CALM) for flooding control frames.
    hbone_control_flood,
    /// Inbound connections or streams denied by policy.
    inbound_denied,
    /// Relays that ended with both sides closed cleanly.
    relays_completed,
    /// Relays that ended in a reset.
    relays_reset,
    /// Bytes relayed, both directions.
    bytes_relayed,
    /// Of `bytes_relayed`, those a relay between two TCP sockets moved kernel to kernel with
    /// splice(2) (same-node handoffs, plaintext inbound and outbound).
    bytes_spliced,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_counter_is_listed_once_with_its_help() {
        let c = super::Counters::default();
        super::Counters::inc(&c.inbound_denied);
        let all = c.all();
        let json = serde_json::to_value(&c).expect("serialize");
        let fields = json.as_object().expect("object").len();
        assert_eq!(all.len(), fields, "the list and the struct agree");
        let denied = all
            .iter()
            .find(|(n, _, _)| *n == "inbound_denied")
            .expect("listed");
        assert_eq!(denied.1, "Inbound connections or streams denied by policy.");
        assert_eq!(denied.2, 1);
        assert!(all.iter().all(|(_, help, _)| !help.is_empty()));
    }
}
