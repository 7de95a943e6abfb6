//! The agent's own access log (`--access-log`), one line per connection (TCP) or per request
//! (HTTP): one JSON object per line, with Envoy's field names where Envoy has one (`start_time`,
//! `duration`, `downstream_remote_address`, `downstream_local_address`, `upstream_host`,
//! `bytes_sent`, `bytes_received`, `response_flags`) and Istio's metric label names for the
//! workloads. Off unless `--access-log` names a destination, as Istio's
//! `accessLogFile` is empty by default. The logs Istio users configure (mesh config, Telemetry
//! API) are written by [`sinks`], through the same writer threads.
//!
//! Lines go through a bounded queue to a writer thread: the data path never waits for the disk.
//! When the queue is full the line is dropped and counted (`ambit_access_log_dropped_total`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::metrics::{Peer, TcpLabels};
use crate::state::UNKNOWN;

mod sinks;
#[cfg(test)]
mod tests;

pub use sinks::Sinks;
pub(crate) use sinks::{write_connection, write_sinks, ConnectionLine, SinkLine};

/// Lines queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("opening the access log {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the access log writer: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AccessLog {
    lines: SyncSender<String>,
    dropped: Counter,
}

impl AccessLog {
    pub fn start(target: &Target) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        AccessLog::to_writer(out)
    }

    /// Lines to any writer (tests read them from memory).
    pub fn to_writer(out: Box<dyn Write + Send>) -> Result<Self, AccessLogError> {
        let (lines, rx) = mpsc::sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("ambit-accesslog".into())
            .spawn(move || {
                let mut out = BufWriter::new(out);
                while let Ok(line) = rx.recv() {
                    let _ = writeln!(out, "{line}");
                    // Everything queued now goes in one write.
                    while let Ok(line) = rx.try_recv() {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = out.flush();
                }
            })
            .map_err(AccessLogError::Thread)?;
        Ok(AccessLog {
            lines,
            dropped: Counter::default(),
        })
    }

    /// The same writer, counting its dropped lines in `dropped`.
    pub fn counting_in(mut self, dropped: Counter) -> AccessLog {
        self.dropped = dropped;
        self
    }

    pub(super) fn write(&self, entry: &Entry<'_>) {
        let Ok(line) = serde_json::to_string(&entry.to_json()) else {
            return;
        };
        self.write_line(line);
    }

    /// Queues one line (never waits; a full queue drops it, counted).
    pub fn write_line(&self, line: String) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.lines.try_send(line)
        {
            self.dropped.inc();
        }
    }
}

/// What one line says, borrowed from the connection's result.
pub(super) struct Entry<'a> {
    pub start_time: SystemTime,
    pub duration: Duration,
    pub labels: &'a TcpLabels,
    pub trust_domain: &'a str,
    pub downstream: (std::net::SocketAddr, std::net::SocketAddr),
    pub upstream: Option<std::net::SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub flags: &'static str,
    pub error: Option<&'a str>,
    /// The request's fields, for a request's line (None: a TCP connection's).
    pub request: Option<&'a RequestFields>,
}

/// What a request's line adds to a connection's, with Envoy's names.
#[derive(Debug, Clone, Serialize)]
pub struct RequestFields {
    pub method: String,
    /// The path and query as the app sent them (before any rewrite): Envoy's
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`.
    pub path: String,
    pub authority: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    #[serde(skip)]
    pub protocol: &'static str,
    pub response_code: u16,
    /// Why this response (Envoy's `%RESPONSE_CODE_DETAILS%`): `via_upstream`,
    /// `route_not_found`, `no_healthy_upstream`, `direct_response`, ...
    #[serde(rename = "response_code_details")]
    pub details: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The `name` of the VirtualService route that matched, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_name: Option<String>,
    /// Istio's cluster name, `outbound|<port>|<subset>|<host>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_cluster: Option<String>,
}

#[derive(Serialize)]
struct Json<'a> {
    start_time: String,
    /// Milliseconds, as Envoy's `%DURATION%`.
    duration: u64,
    reporter: &'static str,
    protocol: &'static str,
    downstream_remote_address: String,
    downstream_local_address: String,
    upstream_host: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
    response_flags: &'static str,
    connection_security_policy: &'static str,
    source_workload: &'a str,
    source_namespace: &'a str,
    source_principal: String,
    destination_workload: &'a str,
    destination_namespace: &'a str,
    destination_principal: String,
    destination_service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    request: Option<&'a RequestFields>,
}

impl<'a> Entry<'a> {
    fn to_json(&self) -> Json<'a> {
        let l = self.labels;
        let (source_workload, source_namespace, source_principal) =
            peer(&l.source, self.trust_domain);
        let (destination_workload, destination_namespace, destination_principal) =
            peer(&l.destination, self.trust_domain);
        Json {
            start_time: humantime::format_rfc3339_millis(self.start_time).to_string(),
            duration: u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            reporter: match l.reporter {
                super::metrics::Reporter::Source => "source",
                super::metrics::Reporter::Destination => "destination",
            },
            protocol: self.request.map_or("tcp", |r| r.protocol),
            downstream_remote_address: self.downstream.0.to_string(),
            downstream_local_address: self.downstream.1.to_string(),
            upstream_host: self.upstream.map(|a| a.to_string()),
            bytes_sent: self.bytes_sent,
            bytes_received: self.bytes_received,
            response_flags: self.flags,
            connection_security_policy: if l.mtls { "mutual_tls" } else { "none" },
            source_workload,
            source_namespace,
            source_principal,
            destination_workload,
            destination_namespace,
            destination_principal,
            destination_service: l
                .service
                .as_ref()
                .map_or(UNKNOWN, |s| s.0.hostname.as_str()),
            error: self.error,
            request: self.request,
        }
    }
}

/// (workload, namespace, principal) of one end.
fn peer<'a>(p: &'a Peer, trust_domain: &str) -> (&'a str, &'a str, String) {
    match p {
        Peer::Workload(w) => (
            &w.workload,
            &w.namespace,
            format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                w.namespace, w.service_account
            ),
        ),
        Peer::Address(w) => (&w.workload, &w.namespace, UNKNOWN.to_string()),
        Peer::Identity(id) => (UNKNOWN, &id.namespace, id.to_string()),
        Peer::Unknown => (UNKNOWN, UNKNOWN, UNKNOWN.to_string()),
    }
}

/// Shared so every stage writes to the one writer.
pub type Shared = Arc<AccessLog>;
