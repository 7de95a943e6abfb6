//! CEL expressions over Envoy's attributes, compiled with cel-rust: Istio's Telemetry
//! `accessLogging.filter.expression` (`response.code >= 400`), evaluated as Envoy's CEL access-log
//! filter does (an error or a non-bool result means "do not log", silently), and the values of
//! `metrics.overrides[].tagOverrides` (`request.host`, `string(destination.port)`), printed to a
//! string as Istio's stats filter does.

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

/// The proven identities of a request's two ends, for the metric tags' expressions.
#[derive(Debug, Clone, Copy, Default)]
pub struct Principals<'a> {
    /// `source.principal`: the downstream's SPIFFE id (Istio's attribute vocabulary; Envoy's
    /// `connection.uri_san_peer_certificate` holds the same where the connection is mTLS).
    pub source: Option<&'a str>,
    /// `destination.principal`: the server's SPIFFE id.
    pub destination: Option<&'a str>,
}

/// The attributes of one request as CEL variables, built once and shared by every expression
/// evaluated for that request.
pub struct Activation(Context<'static, 'static>);

impl Activation {
    pub fn new(attrs: &RequestAttrs<'_>, principals: Principals<'_>) -> Activation {
        let mut ctx = Context::default();
        ctx.add_variable_from_value("request", request(attrs));
        ctx.add_variable_from_value("response", response(attrs));
        let peer_san = match attrs.mtls {
            Some(true) => principals.source.map(text),
            _ => None,
        };
        ctx.add_variable_from_value(
            "connection",
            map(vec![
                ("mtls", attrs.mtls.map(Value::Bool)),
                ("uri_san_peer_certificate", peer_san),
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
        for (name, addr, principal) in [
            ("source", attrs.source_address, principals.source),
            (
                "destination",
                attrs.destination_address,
                principals.destination,
            ),
        ] {
            ctx.add_variable_from_value(
                name,
                // Envoy (`PeerWrapper`): the address with its port, as `upstream.address`.
                map(vec![
                    ("address", addr.map(|a| text(a.to_string()))),
                    ("port", addr.map(|a| Value::Int(a.port().into()))),
                    ("principal", principal.map(text)),
                ]),
            );
        }
        Activation(ctx)
    }
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
        match self.value(&Activation::new(attrs, Principals::default()))? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "the expression gave a {:?}, not a bool",
                other.type_of()
            )),
        }
    }

    /// The expression's value over `activation`, or why it could not be evaluated.
    pub fn value(&self, activation: &Activation) -> Result<Value, String> {
        self.program
            .execute(&activation.0)
            .map_err(|e| e.to_string())
    }

    /// The expression's value as a metric tag value: Istio's stats filter prints it with Envoy's
    /// CEL `print`, and a value that cannot be evaluated is `unknown`.
    pub fn tag_value(&self, activation: &Activation) -> String {
        self.value(activation)
            .ok()
            .and_then(|v| print(&v))
            .unwrap_or_else(|| UNKNOWN_TAG.to_string())
    }
}

/// Istio's value for a tag it cannot compute (`context_->unknown_` in its stats filter).
pub const UNKNOWN_TAG: &str = "unknown";

/// A CEL value as text, as Envoy's `Filters::Common::Expr::print` writes the scalar types; None
/// for a list, map or other value that has no text form here (the tag is then `unknown`).
pub fn print(v: &Value) -> Option<String> {
    Some(match v {
        Value::String(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Null => "null".to_string(),
        Value::Duration(d) => match d.to_std() {
            Ok(d) => format!("{}s", d.as_secs_f64()),
            Err(_) => return None,
        },
        Value::Timestamp(t) => t.to_rfc3339(),
        _ => return None,
    })
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
    // Envoy's request attributes read from headers.
    let header = |name: &str| {
        a.headers
            .and_then(|h| h.get(name))
            .map(|v| text(String::from_utf8_lossy(v.as_bytes()).into_owned()))
    };
    map(vec![
        ("id", header("x-request-id")),
        ("useragent", header("user-agent")),
        ("referer", header("referer")),
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
