//! Wires the debug endpoint (`admin::debug`, 15000) to what the agent holds: the snapshot reader,
//! the certificate manager, and the balancers' outlier state, converted here so that `admin`
//! never imports the proxy (which imports `admin`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::AgentConfig;
use crate::admin::config_dump::{ClusterOutliers, EjectedEndpoint};
use crate::admin::connections::Connections;
use crate::admin::debug::{DebugAdmin, OutlierReader};
use crate::admin::logging::LogControl;
use crate::admin::AdminError;
use crate::proxy::http::balance::Balancers;
use crate::proxy::ProxyInputs;

/// Binds the debug listener; the error names the flag and the address.
pub(super) async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::BindDebug { addr, source })
}

/// The endpoint's inputs. `connections` is the registry the proxy's stages list their
/// connections in.
pub(super) fn admin(
    cfg: &AgentConfig,
    pi: &Arc<ProxyInputs>,
    connections: Connections,
) -> DebugAdmin {
    DebugAdmin {
        node: cfg.node.clone(),
        trust_domain: cfg.trust_domain.clone(),
        root_namespace: cfg.root_namespace.clone(),
        snapshot: pi.snapshot.clone(),
        secrets: pi.secrets.clone(),
        outliers: outlier_reader(pi.balancers.clone()),
        connections,
        log: cfg.log.clone().map(LogControl::new),
    }
}

/// The balancers' ejections (the same values the status file's `outlier_ejections` holds), as
/// the dump's type.
pub fn outlier_reader(balancers: Balancers) -> OutlierReader {
    Box::new(move || {
        balancers
            .ejections()
            .into_iter()
            .map(|c| ClusterOutliers {
                cluster: c.cluster,
                ejections_total: [
                    ("consecutive_5xx", c.ejections_total.consecutive_5xx),
                    ("consecutive_gateway", c.ejections_total.consecutive_gateway),
                    (
                        "consecutive_local_origin",
                        c.ejections_total.consecutive_local_origin,
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                ejected: c
                    .ejected
                    .into_iter()
                    .map(|e| EjectedEndpoint {
                        address: e.address,
                        ejections: e.ejections,
                        remaining: Duration::from_millis(e.remaining_ms),
                    })
                    .collect(),
            })
            .collect()
    })
}
