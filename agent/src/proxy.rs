//! The per-node proxy: one module per connection stage. Each stage is a struct built from shared
//! inputs plus the pod it serves, with `run(self)`.

pub mod hbone;
pub mod inbound_plain;
pub mod outbound;
pub mod relay;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ebpf::OrigDstTable;
use crate::node::netns::NetnsWorker;

/// Inputs every stage shares.
#[derive(Debug)]
pub struct ProxyInputs {
    pub orig_dst: OrigDstTable,
    pub metrics: Metrics,
}

/// One enrolled pod, as the stages see it.
#[derive(Debug)]
pub struct PodContext {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub netns_cookie: u64,
    pub worker: Arc<NetnsWorker>,
}

impl PodContext {
    /// The pod's address of the same family as `ip`, for binding the proxy's connection to the app.
    pub fn ip_like(&self, ip: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|p| p.is_ipv4() == ip.is_ipv4())
    }
}

/// Proxy counters. Exported in the status file; Istio-named metrics arrive with the admin server.
#[derive(Debug, Default, serde::Serialize)]
pub struct Metrics {
    pub outbound_accepted: AtomicU64,
    pub outbound_orig_dst_missing: AtomicU64,
    pub outbound_connect_failed: AtomicU64,
    pub inbound_accepted: AtomicU64,
    pub inbound_connect_failed: AtomicU64,
    pub hbone_refused: AtomicU64,
    pub relays_completed: AtomicU64,
    pub relays_reset: AtomicU64,
    pub bytes_relayed: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter as (name, help, value), read at scrape time by the admin endpoint, which
    /// exports each as `ambit_proxy_<name>_total`. A new field is exported once it is listed here.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "outbound_accepted",
                "Outbound connections accepted from enrolled pods.",
                get(&self.outbound_accepted),
            ),
            (
                "outbound_orig_dst_missing",
                "Outbound connections refused: no original destination recorded.",
                get(&self.outbound_orig_dst_missing),
            ),
            (
                "outbound_connect_failed",
                "Outbound connections whose upstream connect failed.",
                get(&self.outbound_connect_failed),
            ),
            (
                "inbound_accepted",
                "Inbound connections accepted for enrolled pods.",
                get(&self.inbound_accepted),
            ),
            (
                "inbound_connect_failed",
                "Inbound connections whose connect to the pod failed.",
                get(&self.inbound_connect_failed),
            ),
            (
                "hbone_refused",
                "HBONE (15008) connections refused.",
                get(&self.hbone_refused),
            ),
            (
                "relays_completed",
                "Relays that ended with both sides closed cleanly.",
                get(&self.relays_completed),
            ),
            (
                "relays_reset",
                "Relays that ended in a reset.",
                get(&self.relays_reset),
            ),
            (
                "bytes_relayed",
                "Bytes relayed, both directions.",
                get(&self.bytes_relayed),
            ),
        ]
    }
}

/// Closes a socket with RST instead of FIN (linger 0), as a refused connection would.
pub fn reset(stream: tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
