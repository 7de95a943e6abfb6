//! The debug admin endpoint, on localhost:15000 as ztunnel's: `/config_dump` (what the agent
//! holds, [`super::dump::ConfigDump`]), `/logging` (the log filter, read and changed at run time),
//! `/debug/connections` (the connections being proxied now). It runs on the control runtime, like
//! the 15020 endpoint, so a dump never takes a data-plane thread. Envoy's admin answers an unknown
//! path with the list of endpoints; so does this one.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;

use super::config_dump::{self, ClusterOutliers, DumpInputs};
use super::connections::Connections;
use super::dump::ConfigDump;
use super::logging::LogControl;
use super::text;
use crate::identity::SecretManager;
use crate::snapshot::SnapshotReader;

/// ztunnel's (and Envoy's) admin port.
pub const DEFAULT_PORT: u16 = 15000;
/// Localhost only: the dump shows the mesh's configuration and the endpoint changes log levels.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT);

/// (path, what it does), for the index and the 404 answer.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("/config_dump", "workloads, services, policies, routes, clusters (with outlier state) and certificates, as JSON"),
    ("/logging", "show the log filter; ?level=<level> sets the default level, ?<target>=<level> one target's, ?reset the startup filter (GET or POST)"),
    ("/debug/connections", "connections being proxied now, as JSON"),
];

/// Reads the balancers' outlier state at request time (see `app`): the admin module does not
/// import the proxy, which imports it.
pub type OutlierReader = Box<dyn Fn() -> Vec<ClusterOutliers> + Send + Sync>;

/// What the endpoint reads; every field is read at request time.
pub struct DebugAdmin {
    pub node: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub snapshot: SnapshotReader,
    pub secrets: Arc<SecretManager>,
    pub outliers: OutlierReader,
    pub connections: Connections,
    /// None when the subscriber has no reload layer (some tests).
    pub log: Option<LogControl>,
}

impl std::fmt::Debug for DebugAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugAdmin")
            .field("node", &self.node)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

impl DebugAdmin {
    /// The dump of what the agent holds right now.
    pub fn config_dump(&self) -> ConfigDump {
        let snapshot = self.snapshot.load();
        let certificates = self.secrets.certificates();
        let roots = self.secrets.trust_bundle().root_certs();
        let outliers = (self.outliers)();
        config_dump::build(&DumpInputs {
            node: &self.node,
            trust_domain: &self.trust_domain,
            root_namespace: &self.root_namespace,
            snapshot: &snapshot,
            certificates: &certificates,
            roots: &roots,
            outliers: &outliers,
            now: SystemTime::now(),
        })
    }
}

/// Serves until the runtime stops. Each connection is its own task; its errors are logged at debug.
pub async fn serve(listener: TcpListener, admin: Arc<DebugAdmin>) {
    super::serve_with(listener, "debug admin", move |req| respond(req, &admin)).await
}

fn index() -> String {
    let mut out = String::from("ambit admin commands:\n");
    for (path, what) in ENDPOINTS {
        out.push_str(&format!("  {path}: {what}\n"));
    }
    out
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}\n"),
        ),
    }
}

/// The response to one request. Never panics.
pub fn respond<B>(req: &Request<B>, admin: &DebugAdmin) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = path == "/" || ENDPOINTS.iter().any(|(p, _)| *p == path);
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            format!("invalid path: {path}\n{}", index()),
        );
    }
    // Envoy and ztunnel change log levels with POST /logging (istioctl sends POST); GET works too.
    let allowed =
        req.method() == Method::GET || (path == "/logging" && req.method() == Method::POST);
    if !allowed {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        let allow = if path == "/logging" {
            "GET, POST"
        } else {
            "GET"
        };
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        return resp;
    }
    match path {
        "/config_dump" => json(&admin.config_dump()),
        "/debug/connections" => json(&admin.connections.snapshot()),
        "/logging" => logging(req.uri().query(), admin.log.as_ref()),
        _ => text(StatusCode::OK, index()),
    }
}

fn logging(query: Option<&str>, log: Option<&LogControl>) -> Response<Full<Bytes>> {
    let Some(log) = log else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the log filter cannot be changed in this process\n",
        );
    };
    let result = match query.filter(|q| !q.is_empty()) {
        Some(q) => log.apply_query(q),
        None => log.current(),
    };
    match result {
        Ok(filter) => text(StatusCode::OK, format!("current log level is {filter}\n")),
        Err(e @ super::logging::LoggingError::Reload(_)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

#[cfg(test)]
pub(crate) mod tests;
