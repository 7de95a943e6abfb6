//! The access logs the mesh config and the Telemetry API configure (`accessLogFile`,
//! `envoyFileAccessLog` providers): one line per request (L7) or per TCP connection (L4), in the
//! sink's format (Istio's default TEXT or JSON, or a custom one), when the sink's CEL filter
//! takes it.
//!
//! A TCP connection's line is what Envoy's TCP proxy writes with the same format: no request,
//! so `%REQ(..)%`, `%PROTOCOL%` and `%RESPONSE_CODE_DETAILS%` are `-` (null in JSON) and
//! `%RESPONSE_CODE%` is 0; bytes, duration, flags, addresses and the cluster are the
//! connection's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use super::{AccessLog, RequestFields, Target};
use crate::config::telemetry::filter::RequestAttrs;
use crate::config::telemetry::format::LogFields;
use crate::config::telemetry::AccessLogSettings;

/// The access-log files the mesh config and the Telemetry API name (`accessLogFile`,
/// `envoyFileAccessLog` providers), each opened on its first line and kept, with one writer
/// thread each. `/dev/stdout` is the agent's stdout.
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    writers: Arc<Mutex<HashMap<String, Option<AccessLog>>>>,
    dropped: Counter,
}

impl Sinks {
    /// Lines dropped by any access-log writer (`ambit_access_log_dropped_total`).
    pub fn dropped(&self) -> Counter {
        self.dropped.clone()
    }

    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "ambit_access_log_dropped",
            "Access-log lines dropped because the writer fell behind (or its file could not be opened)",
            self.dropped.clone(),
        );
    }

    /// Queues `line` for the file at `path`.
    pub fn write(&self, path: &str, line: String) {
        let mut writers = self.writers.lock().unwrap_or_else(PoisonError::into_inner);
        // The path is copied only the first time it is seen, not per line.
        if !writers.contains_key(path) {
            let target = if path == "/dev/stdout" {
                Target::Stdout
            } else {
                Target::File(PathBuf::from(path))
            };
            let writer = match AccessLog::start(&target) {
                Ok(log) => Some(log.counting_in(self.dropped.clone())),
                Err(e) => {
                    // Once per path: the entry stays, so the failure is not retried per line.
                    tracing::warn!(error = %e, "access log not written");
                    None
                }
            };
            writers.insert(path.to_string(), writer);
        }
        match writers.get(path) {
            Some(Some(w)) => w.write_line(line),
            _ => {
                self.dropped.inc();
            }
        }
    }
}

/// One request as the configured sinks log it.
pub(crate) struct SinkLine<'a> {
    pub start_time: SystemTime,
    pub duration: Duration,
    pub fields: &'a RequestFields,
    pub flags: &'a str,
    pub mtls: bool,
    pub downstream: (SocketAddr, SocketAddr),
    pub upstream: Option<SocketAddr>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// Writes `line` to each of `settings`' sinks whose filter takes it, in the sink's format.
pub(crate) fn write_sinks(sinks: &Sinks, settings: &AccessLogSettings, line: &SinkLine<'_>) {
    let f = line.fields;
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&f.request_id) {
        headers.insert("x-request-id", v);
    }
    if let Some(v) = f
        .user_agent
        .as_deref()
        .and_then(|v| http::HeaderValue::from_str(v).ok())
    {
        headers.insert(http::header::USER_AGENT, v);
    }
    let attrs = RequestAttrs {
        method: Some(&f.method),
        path: Some(&f.path),
        host: Some(&f.authority),
        scheme: Some("http"),
        protocol: Some(f.protocol),
        headers: Some(&headers),
        response_code: Some(f.response_code),
        duration: Some(line.duration),
        mtls: Some(line.mtls),
        requested_server_name: None,
        upstream_address: line.upstream,
        source_address: Some(line.downstream.0),
        destination_address: Some(line.downstream.1),
        request_size: Some(line.bytes_received),
        response_size: Some(line.bytes_sent),
    };
    let fields = LogFields {
        start_time: line.start_time,
        protocol: Some(f.protocol),
        response_code: Some(f.response_code),
        response_flags: line.flags,
        response_code_details: Some(f.details),
        bytes_received: line.bytes_received,
        bytes_sent: line.bytes_sent,
        duration: line.duration,
        request_headers: Some(&headers),
        method: Some(&f.method),
        path: Some(&f.path),
        authority: Some(&f.authority),
        upstream_host: line.upstream,
        upstream_cluster: f.upstream_cluster.as_deref(),
        downstream_local_address: Some(line.downstream.1),
        downstream_remote_address: Some(line.downstream.0),
        route_name: f.route_name.as_deref(),
        ..LogFields::default()
    };
    emit(sinks, settings, &attrs, &fields);
}

/// One TCP connection as the configured sinks log it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLine<'a> {
    pub start_time: SystemTime,
    pub duration: Duration,
    /// Envoy's `%RESPONSE_FLAGS%` (`-` for none).
    pub flags: &'a str,
    /// The downstream connection is mutual TLS (an HBONE stream at the destination): CEL's
    /// `connection.mtls`.
    pub mtls: bool,
    /// Downstream (remote, local).
    pub downstream: (SocketAddr, SocketAddr),
    pub upstream: Option<SocketAddr>,
    /// Istio's cluster name (`outbound|port|subset|host`, `inbound|port||`), if known.
    pub upstream_cluster: Option<&'a str>,
    /// The SNI of the app's ClientHello, on a port routed by it (`%REQUESTED_SERVER_NAME%`).
    pub requested_server_name: Option<&'a str>,
    /// Bytes from the downstream (Envoy's `%BYTES_RECEIVED%` for TCP).
    pub bytes_received: u64,
    /// Bytes to the downstream.
    pub bytes_sent: u64,
    /// Envoy's `%CONNECTION_TERMINATION_DETAILS%` (a policy denial's).
    pub termination_details: Option<&'a str>,
    /// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%` (a tunnel that could not be opened).
    pub transport_failure: Option<&'a str>,
}

impl ConnectionLine<'_> {
    /// The connection as the CEL filter sees it: `connection.mtls`,
    /// `connection.requested_server_name`, `source.*`,
    /// `destination.*`, `upstream.*`, `request.size`/`response.size` and the duration; no
    /// `request.method`/`path`/`headers` and no `response.code` (Envoy has none for a TCP
    /// connection).
    pub(crate) fn attrs(&self) -> RequestAttrs<'_> {
        RequestAttrs {
            duration: Some(self.duration),
            mtls: Some(self.mtls),
            requested_server_name: self.requested_server_name,
            upstream_address: self.upstream,
            source_address: Some(self.downstream.0),
            destination_address: Some(self.downstream.1),
            request_size: Some(self.bytes_received),
            response_size: Some(self.bytes_sent),
            ..RequestAttrs::default()
        }
    }

    /// The connection as the format commands read it.
    pub(crate) fn fields(&self) -> LogFields<'_> {
        LogFields {
            start_time: self.start_time,
            response_flags: self.flags,
            connection_termination_details: self.termination_details,
            upstream_transport_failure_reason: self.transport_failure,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            duration: self.duration,
            upstream_host: self.upstream,
            upstream_cluster: self.upstream_cluster,
            requested_server_name: self.requested_server_name,
            downstream_local_address: Some(self.downstream.1),
            downstream_remote_address: Some(self.downstream.0),
            ..LogFields::default()
        }
    }
}

/// Writes a TCP connection's line to each of `settings`' sinks whose filter takes it.
pub(crate) fn write_connection(
    sinks: &Sinks,
    settings: &AccessLogSettings,
    line: &ConnectionLine<'_>,
) {
    emit(sinks, settings, &line.attrs(), &line.fields());
}

/// Formats and queues one line per sink whose filter (if any) is true for `attrs`.
fn emit(sinks: &Sinks, settings: &AccessLogSettings, attrs: &RequestAttrs<'_>, f: &LogFields<'_>) {
    for sink in &settings.sinks {
        if sink
            .filter
            .as_ref()
            .is_some_and(|filter| !filter.matches(attrs))
        {
            continue;
        }
        let text = sink.formatter.format(f);
        sinks.write(&sink.path, text.trim_end_matches('\n').to_string());
    }
}
