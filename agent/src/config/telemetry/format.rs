//! Access-log line formats as Istio configures Envoy's: the default TEXT format string
//! (`EnvoyTextLogFormat`), the default JSON labels (`EnvoyJSONLogFormatIstio`), and custom
//! `accessLogFormat` / `envoyFileAccessLog.logFormat` strings with `%COMMAND%` substitution. Takes a
//! neutral [`LogFields`]; the writer (`AccessLog`) can switch to it without changing its API.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::LogFormat;

/// Istio `EnvoyTextLogFormat` (Istio 1.9 onwards).
pub const ISTIO_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% \
%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio `EnvoyJSONLogFormatIstio`: JSON field → format string.
pub const ISTIO_JSON_LABELS: [(&str, &str); 24] = [
    ("start_time", "%START_TIME%"),
    ("route_name", "%ROUTE_NAME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Envoy refuses a format naming a command it does not know.
    #[error("unknown access-log command %{command}% in format {format:?}")]
    UnknownCommand { command: String, format: String },
    #[error("unterminated command (a '%' without its closing '%') in format {format:?}")]
    Unterminated { format: String },
}

/// One request or connection, as the format commands read it. `None`/empty prints as `-`.
#[derive(Debug, Clone, Copy)]
pub struct LogFields<'a> {
    pub start_time: SystemTime,
    /// `HTTP/1.1`, `HTTP/2`; None for TCP.
    pub protocol: Option<&'a str>,
    /// None for TCP (printed as 0, as Envoy does).
    pub response_code: Option<u16>,
    pub response_flags: &'a str,
    pub response_code_details: Option<&'a str>,
    pub connection_termination_details: Option<&'a str>,
    pub upstream_transport_failure_reason: Option<&'a str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub request_headers: Option<&'a http::HeaderMap>,
    /// The request's method, path and authority (HTTP/2 pseudo-headers are not in the map).
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub response_headers: Option<&'a http::HeaderMap>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub upstream_local_address: Option<SocketAddr>,
    pub downstream_local_address: Option<SocketAddr>,
    pub downstream_remote_address: Option<SocketAddr>,
    pub requested_server_name: Option<&'a str>,
    pub route_name: Option<&'a str>,
}

impl Default for LogFields<'_> {
    fn default() -> Self {
        LogFields {
            start_time: SystemTime::UNIX_EPOCH,
            protocol: None,
            response_code: None,
            response_flags: "-",
            response_code_details: None,
            connection_termination_details: None,
            upstream_transport_failure_reason: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            request_headers: None,
            method: None,
            path: None,
            authority: None,
            response_headers: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local_address: None,
            downstream_local_address: None,
            downstream_remote_address: None,
            requested_server_name: None,
            route_name: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Command {
    StartTime,
    /// `REQ(A?B):N`: header A, else B, cut to N characters.
    Req(String, Option<String>, Option<usize>),
    Resp(String, Option<String>, Option<usize>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    RequestedServerName,
    RouteName,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Literal(String),
    Command(Command),
}

/// A compiled format.
#[derive(Debug, Clone, PartialEq)]
pub struct Formatter(Compiled);

#[derive(Debug, Clone, PartialEq)]
enum Compiled {
    Text(Vec<Piece>),
    /// Field → pieces; a field that is one command keeps its type (a number, or null when absent).
    Json(Vec<(String, Vec<Piece>)>),
}

impl Formatter {
    /// Istio's default TEXT format.
    pub fn istio_text() -> Formatter {
        Formatter::text(ISTIO_TEXT_FORMAT).unwrap_or(Formatter(Compiled::Text(Vec::new())))
    }

    /// Istio's default JSON labels.
    pub fn istio_json() -> Formatter {
        let labels = ISTIO_JSON_LABELS
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        Formatter::json(&labels).unwrap_or(Formatter(Compiled::Json(Vec::new())))
    }

    pub fn text(format: &str) -> Result<Formatter, FormatError> {
        parse(format).map(|p| Formatter(Compiled::Text(p)))
    }

    /// Non-string label values are written as they are (Envoy allows nested structs; ambit keeps
    /// them literal).
    pub fn json(labels: &serde_json::Map<String, Value>) -> Result<Formatter, FormatError> {
        let mut out = Vec::new();
        for (k, v) in labels {
            let pieces = match v {
                Value::String(s) => parse(s)?,
                other => vec![Piece::Literal(other.to_string())],
            };
            out.push((k.clone(), pieces));
        }
        Ok(Formatter(Compiled::Json(out)))
    }

    /// The formatter for a resolved sink format (`None` parts are Istio's defaults).
    pub fn from_config(format: &LogFormat) -> Result<Formatter, FormatError> {
        match format {
            LogFormat::Text(None) => Ok(Formatter::istio_text()),
            LogFormat::Text(Some(t)) => Formatter::text(t),
            LogFormat::Json(None) => Ok(Formatter::istio_json()),
            LogFormat::Json(Some(l)) => Formatter::json(l),
        }
    }

    /// One line, with its trailing newline for TEXT as the format has it; JSON lines end in one.
    pub fn format(&self, f: &LogFields<'_>) -> String {
        match &self.0 {
            Compiled::Text(pieces) => {
                let mut out = String::new();
                for p in pieces {
                    match p {
                        Piece::Literal(l) => out.push_str(l),
                        Piece::Command(c) => {
                            out.push_str(&render(c, f).unwrap_or_else(|| "-".into()))
                        }
                    }
                }
                out
            }
            Compiled::Json(fields) => {
                let mut m = serde_json::Map::new();
                for (k, pieces) in fields {
                    let v = match pieces.as_slice() {
                        [Piece::Command(c)] => typed(c, f),
                        _ => {
                            let mut s = String::new();
                            for p in pieces {
                                match p {
                                    Piece::Literal(l) => s.push_str(l),
                                    Piece::Command(c) => {
                                        s.push_str(&render(c, f).unwrap_or_else(|| "-".into()))
                                    }
                                }
                            }
                            Value::String(s)
                        }
                    };
                    m.insert(k.clone(), v);
                }
                let mut line = Value::Object(m).to_string();
                line.push('\n');
                line
            }
        }
    }
}

fn parse(format: &str) -> Result<Vec<Piece>, FormatError> {
    let mut out = Vec::new();
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        if i > 0 {
            out.push(Piece::Literal(rest[..i].to_string()));
        }
        let after = &rest[i + 1..];
        let Some(j) = after.find('%') else {
            return Err(FormatError::Unterminated {
                format: format.into(),
            });
        };
        let text = &after[..j];
        if text.is_empty() {
            // `%%` is a literal percent sign.
            out.push(Piece::Literal("%".into()));
        } else {
            out.push(Piece::Command(command(text).ok_or_else(|| {
                FormatError::UnknownCommand {
                    command: text.into(),
                    format: format.into(),
                }
            })?));
        }
        rest = &after[j + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Literal(rest.to_string()));
    }
    Ok(out)
}

fn command(text: &str) -> Option<Command> {
    if let Some(arg) = text.strip_prefix("REQ(") {
        let (h, alt, len) = header_arg(arg)?;
        return Some(Command::Req(h, alt, len));
    }
    if let Some(arg) = text.strip_prefix("RESP(") {
        let (h, alt, len) = header_arg(arg)?;
        return Some(Command::Resp(h, alt, len));
    }
    Some(match text {
        "START_TIME" => Command::StartTime,
        "PROTOCOL" => Command::Protocol,
        "RESPONSE_CODE" => Command::ResponseCode,
        "RESPONSE_FLAGS" => Command::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Command::ResponseCodeDetails,
        "CONNECTION_TERMINATION_DETAILS" => Command::ConnectionTerminationDetails,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Command::UpstreamTransportFailureReason,
        "BYTES_RECEIVED" => Command::BytesReceived,
        "BYTES_SENT" => Command::BytesSent,
        "DURATION" => Command::Duration,
        "UPSTREAM_HOST" => Command::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Command::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => Command::UpstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => Command::DownstreamLocalAddress,
        "DOWNSTREAM_REMOTE_ADDRESS" => Command::DownstreamRemoteAddress,
        "REQUESTED_SERVER_NAME" => Command::RequestedServerName,
        "ROUTE_NAME" => Command::RouteName,
        _ => return None,
    })
}

/// `X-A?:B):N` → (`x-a`, Some(`:b`), Some(N)).
fn header_arg(arg: &str) -> Option<(String, Option<String>, Option<usize>)> {
    let (inner, tail) = arg.split_once(')')?;
    let len = match tail.strip_prefix(':') {
        Some(n) => Some(n.parse().ok()?),
        None if tail.is_empty() => None,
        None => return None,
    };
    let (main, alt) = match inner.split_once('?') {
        Some((a, b)) => (a, Some(b.to_ascii_lowercase())),
        None => (inner, None),
    };
    Some((main.to_ascii_lowercase(), alt, len))
}

fn header<'a>(f: &LogFields<'a>, map: Option<&'a http::HeaderMap>, name: &str) -> Option<String> {
    match name {
        ":method" => f.method.map(str::to_string),
        ":path" => f.path.map(str::to_string),
        ":authority" => f
            .authority
            .map(str::to_string)
            .or_else(|| header(f, map, "host")),
        _ => map?
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    }
}

fn render(c: &Command, f: &LogFields<'_>) -> Option<String> {
    let text = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    match c {
        Command::StartTime => Some(start_time(f.start_time)),
        Command::Req(h, alt, len) | Command::Resp(h, alt, len) => {
            let map = if matches!(c, Command::Req(..)) {
                f.request_headers
            } else {
                f.response_headers
            };
            let v = header(f, map, h).or_else(|| alt.as_deref().and_then(|a| header(f, map, a)))?;
            Some(match len {
                Some(n) => v.chars().take(*n).collect(),
                None => v,
            })
        }
        Command::Protocol => text(f.protocol),
        Command::ResponseCode => Some(f.response_code.unwrap_or(0).to_string()),
        Command::ResponseFlags => text(Some(f.response_flags)),
        Command::ResponseCodeDetails => text(f.response_code_details),
        Command::ConnectionTerminationDetails => text(f.connection_termination_details),
        Command::UpstreamTransportFailureReason => text(f.upstream_transport_failure_reason),
        Command::BytesReceived => Some(f.bytes_received.to_string()),
        Command::BytesSent => Some(f.bytes_sent.to_string()),
        Command::Duration => Some(f.duration.as_millis().to_string()),
        Command::UpstreamHost => addr(f.upstream_host),
        Command::UpstreamCluster => text(f.upstream_cluster),
        Command::UpstreamLocalAddress => addr(f.upstream_local_address),
        Command::DownstreamLocalAddress => addr(f.downstream_local_address),
        Command::DownstreamRemoteAddress => addr(f.downstream_remote_address),
        Command::RequestedServerName => text(f.requested_server_name),
        Command::RouteName => text(f.route_name),
    }
}

/// A JSON field that is one command: numbers stay numbers, absent values are null (Envoy's
/// typed JSON output).
fn typed(c: &Command, f: &LogFields<'_>) -> Value {
    match c {
        Command::ResponseCode => Value::from(f.response_code.unwrap_or(0)),
        Command::BytesReceived => Value::from(f.bytes_received),
        Command::BytesSent => Value::from(f.bytes_sent),
        Command::Duration => Value::from(f.duration.as_millis() as u64),
        Command::Req(h, _, _) | Command::Resp(h, _, _) if h == "x-envoy-upstream-service-time" => {
            match render(c, f).and_then(|v| v.parse::<u64>().ok()) {
                Some(n) => Value::from(n),
                None => Value::Null,
            }
        }
        _ => render(c, f).map_or(Value::Null, Value::String),
    }
}

/// Envoy's default `%START_TIME%`: UTC, ISO 8601 with milliseconds (`2018-11-23T04:51:00.281Z`).
fn start_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests;
