//! Access-log filters: Istio's Telemetry `accessLogging.filter.expression`, a CEL expression over
//! Envoy's attributes (`response.code >= 400`), compiled with cel-rust. Evaluated as Envoy's CEL
//! access-log filter does: an error or a non-bool result means "do not log", silently.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cel::{Context, Program, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Istio `validateTelemetryFilter` words this "must be a valid CEL expression".
    #[error("must be a valid CEL expression: {message}")]
    Parse { message: String },
}

/// One request (or connection) as Envoy's attributes describe it. Absent values are absent
/// attributes: an expression that reads one evaluates to an error, so the line is not written
/// (Envoy's CEL filter: "expression errors are considered false"). A TCP connection has no
/// `request.method`/`path`/`headers` and no `response.code`: `response.code >= 400` leaves
/// every connection out, while `response.code >= 400 || connection.mtls` logs the mTLS ones
/// (CEL's `||` is true when either side is, even if the other is an error).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestAttrs<'a> {
    /// `request.method`.
    pub method: Option<&'a str>,
    /// `request.path`: path and query, as on the request line.
    pub path: Option<&'a str>,
    /// `request.host` (`:authority`).
    pub host: Option<&'a str>,
    /// `request.scheme`.
    pub scheme: Option<&'a str>,
    /// `request.protocol`, e.g. `HTTP/1.1`.
    pub protocol: Option<&'a str>,
    /// `request.headers`, keys lowercased, repeated values joined with ",".
    pub headers: Option<&'a http::HeaderMap>,
    /// `response.code`.
    pub response_code: Option<u16>,
    /// `request.duration` (also read as `response.duration`).
    pub duration: Option<Duration>,
    /// `connection.mtls`: the downstream connection was mutual TLS (HBONE).
    pub mtls: Option<bool>,
    /// `connection.requested_server_name`: the downstream ClientHello's SNI. Envoy always has
    /// the attribute (empty without one).
    pub requested_server_name: Option<&'a str>,
    /// `upstream.address`.
    pub upstream_address: Option<SocketAddr>,
    /// `source.address` (`ip:port`, as Envoy's) / `source.port`: the downstream's remote end.
    pub source_address: Option<SocketAddr>,
    /// `destination.address` / `destination.port`: the downstream's local end.
    pub destination_address: Option<SocketAddr>,
    /// `request.size`: body bytes received from the downstream (a TCP connection's bytes).
    pub request_size: Option<u64>,
    /// `response.size`: body bytes sent to the downstream.
    pub response_size: Option<u64>,
}

/// A compiled filter.
#[derive(Debug)]
pub struct Filter {
    expression: String,
    program: Program,
}

impl PartialEq for Filter {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression
    }
}

impl Filter {
    pub fn compile(expression: &str) -> Result<Filter, FilterError> {
        let program = Program::compile(expression).map_err(|e| FilterError::Parse {
            message: e.to_string().trim().to_string(),
        })?;
        Ok(Filter {
            expression: expression.to_string(),
            program,
        })
    }

    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Whether the line is written. Envoy: an evaluation error or a non-bool result is `false`.
    pub fn matches(&self, attrs: &RequestAttrs<'_>) -> bool {
        self.evaluate(attrs).unwrap_or(false)
    }

    /// The expression's value: `Err` with why it could not be evaluated (an attribute absent, a
    /// type mismatch), or with the type it gave when that was not a bool.
    pub fn evaluate(&self, attrs: &RequestAttrs<'_>) -> Result<bool, String> {
        let mut ctx = Context::default();
        ctx.add_variable_from_value("request", request(attrs));
        ctx.add_variable_from_value("response", response(attrs));
        ctx.add_variable_from_value(
            "connection",
            map(vec![
                ("mtls", attrs.mtls.map(Value::Bool)),
                (
                    "requested_server_name",
                    Some(text(attrs.requested_server_name.unwrap_or_default())),
                ),
            ]),
        );
        ctx.add_variable_from_value(
            "upstream",
            map(vec![
                (
                    "address",
                    attrs.upstream_address.map(|a| text(a.to_string())),
                ),
                (
                    "port",
                    attrs.upstream_address.map(|a| Value::Int(a.port().into())),
                ),
            ]),
        );
        for (name, addr) in [
            ("source", attrs.source_address),
            ("destination", attrs.destination_address),
        ] {
            ctx.add_variable_from_value(
                name,
                // Envoy (`PeerWrapper`): the address with its port, as `upstream.address`.
                map(vec![
                    ("address", addr.map(|a| text(a.to_string()))),
                    ("port", addr.map(|a| Value::Int(a.port().into()))),
                ]),
            );
        }
        match self.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "the expression gave a {:?}, not a bool",
                other.type_of()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn text(s: impl Into<String>) -> Value {
    Value::String(std::sync::Arc::new(s.into()))
}

/// A CEL map of the attributes that are present.
fn map(entries: Vec<(&str, Option<Value>)>) -> Value {
    let m: HashMap<cel::objects::Key, Value> = entries
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.into(), v)))
        .collect();
    Value::Map(m.into())
}

fn duration(d: Duration) -> Option<Value> {
    chrono::Duration::from_std(d).ok().map(Value::Duration)
}

fn request(a: &RequestAttrs<'_>) -> Value {
    let url_path = a.path.map(|p| p.split('?').next().unwrap_or_default());
    let headers = a.headers.map(|h| {
        let mut m: HashMap<cel::objects::Key, Value> = HashMap::new();
        for name in h.keys() {
            let joined = h
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(",");
            m.insert(name.as_str().into(), text(joined));
        }
        Value::Map(m.into())
    });
    map(vec![
        ("method", a.method.map(text)),
        ("path", a.path.map(text)),
        ("url_path", url_path.map(text)),
        ("host", a.host.map(text)),
        ("scheme", a.scheme.map(text)),
        ("protocol", a.protocol.map(text)),
        ("headers", headers),
        ("duration", a.duration.and_then(duration)),
        ("size", a.request_size.map(int)),
    ])
}

fn int(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

fn response(a: &RequestAttrs<'_>) -> Value {
    map(vec![
        ("code", a.response_code.map(|c| Value::Int(c.into()))),
        ("duration", a.duration.and_then(duration)),
        ("size", a.response_size.map(int)),
    ])
}
