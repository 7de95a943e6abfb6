//! `ambit zc`: what a running agent holds, printed the way `istioctl ztunnel-config` prints a
//! ztunnel's: it fetches the agent's `/config_dump` (or `/debug/connections`) from the debug
//! endpoint (`--admin`, localhost:15000 by default) and prints a table per view, or the raw
//! section with `-o json|yaml`. Columns follow istioctl's where it has the view (workloads,
//! services, policies, certificates, connections); routes and clusters are ambit's own.

use std::fmt::Write as _;
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use thiserror::Error;

use crate::admin::connections::{ConnectionView, Direction};
use crate::admin::dump::{ConfigDump, RouteDump};

/// Where istioctl finds ztunnel's admin endpoint, and where the agent serves its own.
pub const DEFAULT_ADMIN: &str = "localhost:15000";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    Workloads,
    Services,
    Policies,
    Routes,
    Clusters,
    Certificates,
    Connections,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables, as istioctl's default.
    Short,
    Json,
    Yaml,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ZcArgs {
    pub view: View,
    /// The agent's debug endpoint (its `--admin-addr`), host:port.
    #[arg(long, env = "AMBIT_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    pub output: Output,
    /// Only objects of this namespace (workloads, services, policies, routes by client namespace,
    /// connections by workload).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only workloads on this node.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Error)]
pub enum ZcError {
    #[error("connecting to the agent's debug endpoint --admin {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET http://{addr}{path}")]
    Http {
        addr: String,
        path: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("GET http://{addr}{path}: {status}: {body}")]
    Status {
        addr: String,
        path: &'static str,
        status: http::StatusCode,
        body: String,
    },
    #[error("GET {path}: the answer is not what this ambit reads")]
    Decode {
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the {section} section as JSON")]
    Json {
        section: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the {section} section as YAML")]
    Yaml {
        section: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("starting the client runtime")]
    Runtime(#[source] std::io::Error),
}

/// One GET on the debug endpoint over HTTP/1.1; the body if the status is 200.
pub async fn get(addr: &str, path: &'static str) -> Result<Bytes, ZcError> {
    let http = |source| ZcError::Http {
        addr: addr.to_string(),
        path,
        source,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ZcError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr)
        .body(Empty::<Bytes>::new());
    // A static path and a host:port the connect above accepted always build a request.
    let Ok(req) = req else {
        return Err(ZcError::Status {
            addr: addr.to_string(),
            path,
            status: http::StatusCode::BAD_REQUEST,
            body: "cannot build the request".into(),
        });
    };
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    conn.abort();
    if status != http::StatusCode::OK {
        return Err(ZcError::Status {
            addr: addr.to_string(),
            path,
            status,
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok(body)
}

pub async fn fetch_dump(addr: &str) -> Result<ConfigDump, ZcError> {
    let body = get(addr, "/config_dump").await?;
    serde_json::from_slice(&body).map_err(|source| ZcError::Decode {
        path: "/config_dump",
        source,
    })
}

pub async fn fetch_connections(addr: &str) -> Result<Vec<ConnectionView>, ZcError> {
    let body = get(addr, "/debug/connections").await?;
    serde_json::from_slice(&body).map_err(|source| ZcError::Decode {
        path: "/debug/connections",
        source,
    })
}

/// What a view needs from the agent, fetched.
pub async fn fetch(args: &ZcArgs) -> Result<(ConfigDump, Vec<ConnectionView>), ZcError> {
    let dump = match args.view {
        View::Connections => ConfigDump::default(),
        _ => fetch_dump(&args.admin).await?,
    };
    let conns = match args.view {
        View::Connections | View::All => fetch_connections(&args.admin).await?,
        _ => Vec::new(),
    };
    Ok((dump, conns))
}

/// `ambit zc`: fetch, then print.
pub fn run(args: ZcArgs) -> Result<(), ZcError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ZcError::Runtime)?;
    let (dump, conns) = rt.block_on(fetch(&args))?;
    print!("{}", render(&args, dump, conns, SystemTime::now())?);
    Ok(())
}

/// The text `ambit zc` prints for what it fetched (`now` decides VALID CERT).
pub fn render(
    args: &ZcArgs,
    dump: ConfigDump,
    conns: Vec<ConnectionView>,
    now: SystemTime,
) -> Result<String, ZcError> {
    let (dump, conns) = filtered(args, dump, conns);
    match args.output {
        Output::Short => Ok(tables(args.view, &dump, &conns, now)),
        Output::Json | Output::Yaml => {
            let (name, value) = section(args.view, &dump, &conns)?;
            if args.output == Output::Json {
                serde_json::to_string_pretty(&value)
                    .map(|s| s + "\n")
                    .map_err(|source| ZcError::Json {
                        section: name.into(),
                        source,
                    })
            } else {
                serde_yaml::to_string(&value).map_err(|source| ZcError::Yaml {
                    section: name.into(),
                    source,
                })
            }
        }
    }
}

fn to_value(name: &'static str, v: &impl Serialize) -> Result<serde_json::Value, ZcError> {
    serde_json::to_value(v).map_err(|source| ZcError::Json {
        section: name.into(),
        source,
    })
}

/// The raw section of a view (`all`: the whole dump).
fn section(
    view: View,
    d: &ConfigDump,
    conns: &[ConnectionView],
) -> Result<(&'static str, serde_json::Value), ZcError> {
    let (name, value) = match view {
        View::Workloads => ("workloads", to_value("workloads", &d.workloads)?),
        View::Services => ("services", to_value("services", &d.services)?),
        View::Policies => (
            "policies",
            serde_json::json!({
                "policies": to_value("policies", &d.policies)?,
                "peerAuthentications": to_value("peerAuthentications", &d.peer_authentications)?,
                "workloadPolicies": to_value("workloadPolicies", &d.workload_policies)?,
            }),
        ),
        View::Routes => ("routes", to_value("routes", &d.routes)?),
        View::Clusters => ("clusters", to_value("clusters", &d.clusters)?),
        View::Certificates => ("certificates", to_value("certificates", &d.certificates)?),
        View::Connections => ("connections", to_value("connections", &conns)?),
        View::All => ("all", to_value("all", d)?),
    };
    Ok((name, value))
}

/// Keeps what `--namespace` and `--node` select, as istioctl's filters do.
fn filtered(
    args: &ZcArgs,
    mut d: ConfigDump,
    mut conns: Vec<ConnectionView>,
) -> (ConfigDump, Vec<ConnectionView>) {
    if let Some(ns) = &args.namespace {
        d.workloads.retain(|w| &w.namespace == ns);
        d.services.retain(|s| &s.namespace == ns);
        d.policies.retain(|p| &p.namespace == ns);
        d.peer_authentications.retain(|p| &p.namespace == ns);
        let prefix = format!("{ns}/");
        d.workload_policies
            .retain(|p| p.workload.starts_with(&prefix));
        d.routes.retain(|r| &r.namespace == ns);
        d.clusters
            .retain(|c| c.namespace.as_ref().is_none_or(|n| n == ns));
        conns.retain(|c| c.info.workload.starts_with(&prefix));
    }
    if let Some(node) = &args.node {
        d.workloads.retain(|w| &w.node == node);
    }
    (d, conns)
}

/// Columns padded to their widest cell plus one space, as istioctl's tabwriter lays them out.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$} ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn tables(view: View, d: &ConfigDump, conns: &[ConnectionView], now: SystemTime) -> String {
    match view {
        View::Workloads => workloads(d),
        View::Services => services(d),
        View::Policies => policies(d),
        View::Routes => routes(d),
        View::Clusters => clusters(d),
        View::Certificates => certificates(d, now),
        View::Connections => connections(conns),
        View::All => [
            workloads(d),
            services(d),
            policies(d),
            routes(d),
            clusters(d),
            certificates(d, now),
            connections(conns),
        ]
        .join("\n"),
    }
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "None".into()
    } else {
        v.to_string()
    }
}

fn workloads(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .workloads
        .iter()
        .map(|w| {
            vec![
                w.namespace.clone(),
                w.name.clone(),
                or_none(&w.workload_ips.join(",")),
                or_none(&w.node),
                // No waypoints in ambit: L7 runs in the node proxies.
                "None".into(),
                w.protocol.clone(),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "POD NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ],
        &rows,
    )
}

fn services(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .services
        .iter()
        .map(|s| {
            let ready = s.endpoints.iter().filter(|e| e.ready).count();
            vec![
                s.namespace.clone(),
                s.name.clone(),
                or_none(&s.vips.join(",")),
                "None".into(),
                format!("{ready}/{}", s.endpoints.len()),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "SERVICE NAME",
            "SERVICE VIP",
            "WAYPOINT",
            "ENDPOINTS",
        ],
        &rows,
    )
}

fn policies(d: &ConfigDump) -> String {
    let rows: Vec<Vec<String>> = d
        .policies
        .iter()
        .map(|p| {
            let action = match &p.rejected {
                Some(_) => format!("{} (rejected: fail closed)", p.action),
                None => p.action.clone(),
            };
            vec![p.namespace.clone(), p.name.clone(), action, p.scope.clone()]
        })
        .collect();
    let mut out = table(&["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], &rows);
    if !d.peer_authentications.is_empty() {
        let rows: Vec<Vec<String>> = d
            .peer_authentications
            .iter()
            .map(|p| {
                let mut mode = p.mode.clone();
                for (port, m) in &p.port_level_mtls {
                    let _ = write!(mode, ",{port}:{m}");
                }
                vec![p.namespace.clone(), p.name.clone(), mode, p.scope.clone()]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["NAMESPACE", "PEER AUTHENTICATION NAME", "MODE", "SCOPE"],
            &rows,
        ));
    }
    if !d.workload_policies.is_empty() {
        let rows: Vec<Vec<String>> = d
            .workload_policies
            .iter()
            .map(|p| {
                let mut mtls = p.mtls.mode.clone();
                for (port, m) in &p.port_mtls {
                    let _ = write!(mtls, ",{port}:{}", m.mode);
                }
                vec![
                    p.workload.clone(),
                    mtls,
                    or_none(&p.authorization_policies.join(",")),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["WORKLOAD", "MTLS", "AUTHORIZATION POLICIES"],
            &rows,
        ));
    }
    out
}

/// A route's matches: conditions ANDed with `,`, matches ORed with ` | `; `*` for none.
fn matches(r: &RouteDump) -> String {
    if r.matches.is_empty() {
        return "*".into();
    }
    r.matches
        .iter()
        .map(|m| {
            if m.is_empty() {
                "*".into()
            } else {
                m.join(",")
            }
        })
        .collect::<Vec<String>>()
        .join(" | ")
}

fn action(r: &RouteDump) -> String {
    if let Some(re) = &r.redirect {
        return format!("redirect {re}");
    }
    if let Some(status) = r.direct_response {
        return format!("direct response {status}");
    }
    let dests: Vec<String> = r
        .destinations
        .iter()
        .map(|d| format!("{} ({})", d.cluster, d.weight))
        .collect();
    or_none(&dests.join(","))
}

fn routes(d: &ConfigDump) -> String {
    let mut rows = Vec::new();
    for ns in &d.routes {
        for v in &ns.virtual_hosts {
            let kinds = [("HTTP", &v.http), ("TCP", &v.tcp), ("TLS", &v.tls)];
            for (kind, routes) in kinds {
                for r in routes {
                    rows.push(vec![
                        ns.namespace.clone(),
                        v.hosts.join(","),
                        v.virtual_service.clone(),
                        kind.to_string(),
                        r.name.clone().unwrap_or_else(|| "-".into()),
                        matches(r),
                        action(r),
                    ]);
                }
            }
        }
    }
    table(
        &[
            "NAMESPACE",
            "HOSTS",
            "VIRTUAL SERVICE",
            "TYPE",
            "ROUTE",
            "MATCH",
            "DESTINATIONS",
        ],
        &rows,
    )
}

fn clusters(d: &ConfigDump) -> String {
    let mut rows = Vec::new();
    for c in &d.clusters {
        let ns = c.namespace.clone().unwrap_or_else(|| "*".into());
        let dr = c.destination_rule.clone().unwrap_or_else(|| "None".into());
        if c.endpoints.is_empty() {
            let none = "None".to_string();
            let dash = "-".to_string();
            rows.push(vec![
                ns,
                c.name.clone(),
                none,
                dash.clone(),
                dash.clone(),
                dash,
                dr,
            ]);
            continue;
        }
        for e in &c.endpoints {
            rows.push(vec![
                ns.clone(),
                c.name.clone(),
                e.address.clone(),
                e.status.clone(),
                e.ejections.to_string(),
                e.ejected_until.clone().unwrap_or_else(|| "-".into()),
                dr.clone(),
            ]);
        }
    }
    table(
        &[
            "NAMESPACE",
            "CLUSTER",
            "ENDPOINT",
            "STATUS",
            "EJECTIONS",
            "EJECTED UNTIL",
            "DESTINATION RULE",
        ],
        &rows,
    )
}

/// istioctl: a certificate is valid when now lies between its NOT BEFORE and NOT AFTER.
fn valid_at(from: &str, to: &str, now: SystemTime) -> bool {
    match (humantime::parse_rfc3339(from), humantime::parse_rfc3339(to)) {
        (Ok(from), Ok(to)) => from <= now && now < to,
        _ => false,
    }
}

fn na(v: &str) -> String {
    if v.is_empty() {
        "NA".into()
    } else {
        v.to_string()
    }
}

fn certificates(d: &ConfigDump, now: SystemTime) -> String {
    let mut rows = Vec::new();
    for c in &d.certificates {
        // istioctl shows `Unavailable` without the reason in the table.
        let state = if c.state.starts_with("Unavailable") {
            "Unavailable".to_string()
        } else {
            c.state.clone()
        };
        if c.cert_chain.is_empty() {
            let na = "NA".to_string();
            rows.push(vec![
                c.identity.clone(),
                na.clone(),
                state,
                "false".into(),
                na.clone(),
                na.clone(),
                na,
            ]);
            continue;
        }
        // istioctl: the chain (leaf first), then each root as a `Root` row.
        for cert in c.cert_chain.iter().chain(&c.root_certs) {
            rows.push(vec![
                c.identity.clone(),
                cert.kind.clone(),
                state.clone(),
                valid_at(&cert.valid_from, &cert.expiration_time, now).to_string(),
                na(&cert.serial_number),
                na(&cert.expiration_time),
                na(&cert.valid_from),
            ]);
        }
    }
    table(
        &[
            "CERTIFICATE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL NUMBER",
            "NOT AFTER",
            "NOT BEFORE",
        ],
        &rows,
    )
}

fn connections(conns: &[ConnectionView]) -> String {
    let rows: Vec<Vec<String>> = conns
        .iter()
        .map(|c| {
            let i = &c.info;
            // istioctl: LOCAL is the workload's end, REMOTE the other.
            let (dir, local, remote) = match i.direction {
                Direction::Outbound => ("Outbound", i.src, i.dst),
                Direction::Inbound => ("Inbound", i.dst, i.src),
            };
            let (ns, name) = i.workload.split_once('/').unwrap_or(("", &i.workload));
            vec![
                format!("{name}.{ns}"),
                dir.to_string(),
                local.to_string(),
                remote.to_string(),
                i.original_dst.map(|a| a.to_string()).unwrap_or_default(),
                serde_json::to_value(i.protocol)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                c.since.clone(),
                c.bytes_sent.to_string(),
                c.bytes_received.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD",
            "DIRECTION",
            "LOCAL",
            "REMOTE",
            "REMOTE TARGET",
            "PROTOCOL",
            "SINCE",
            "BYTES SENT",
            "BYTES RECEIVED",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests;
