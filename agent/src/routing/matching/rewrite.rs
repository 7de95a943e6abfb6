//! The request transformations a route makes: the URI `rewrite` before forwarding, and the
//! `Location` of a `redirect`. (An authority rewrite is a plain header replace, the caller's.)

use super::super::{Redirect, RedirectPort, RequestInfo, RequestMatch, Rewrite, StrMatch};
use super::starts_with_ignore_ascii_case;

#[cfg(test)]
mod tests;

/// The path (with its query) to forward after the route's `rewrite`.
///
/// `uriRegexRewrite` (Envoy `regex_rewrite`): every match of the pattern in the path (the query
/// excluded, then put back) is replaced; RE2's `\1` is capture group 1. An empty result leaves
/// the path as it was (Envoy).
///
/// `uri` (Istio always emits Envoy's `prefix_rewrite`) replaces what the match block matched, and
/// keeps the rest, query included: with a `prefix` URI match, that prefix; with `exact`, the
/// whole path; with `regex`, the whole path. A block without `uri` (or a route without blocks)
/// matched Envoy's `prefix: "/"`, so only the leading `/` is replaced: `uri: /v2` turns `/a` into
/// `/v2a`, as it does under Istio.
///
/// `matched` is the block [`super::select_match`] returned.
pub fn rewrite_path(rw: &Rewrite, matched: Option<&RequestMatch>, path_and_query: &str) -> String {
    if let Some((re, substitution)) = &rw.uri_regex {
        let (path, rest) = split_path(path_and_query);
        let template = Re2Rewrite::parse(substitution);
        let new_path = re.replace_all(path, |caps: &regex::Captures<'_>| template.expand(caps));
        return if new_path.is_empty() {
            path_and_query.to_owned()
        } else {
            format!("{new_path}{rest}")
        };
    }
    let Some(uri) = rw.uri.as_deref().filter(|u| !u.is_empty()) else {
        return path_and_query.to_owned();
    };
    let (path, _) = split_path(path_and_query);
    let matched_part = match matched.and_then(|m| m.uri.as_ref()) {
        None => "/",
        Some(StrMatch::Prefix(p) | StrMatch::Exact(p)) => p.as_str(),
        Some(StrMatch::Regex(_)) => path,
    };
    // Envoy checks (without ASCII case: `ignoreUriCase`) that the path still starts with what
    // matched, and leaves the path alone when it does not.
    if !starts_with_ignore_ascii_case(path_and_query.as_bytes(), matched_part.as_bytes()) {
        return path_and_query.to_owned();
    }
    match path_and_query.get(matched_part.len()..) {
        Some(rest) => format!("{uri}{rest}"),
        None => path_and_query.to_owned(),
    }
}

/// The path and what follows it (`?query`, `#fragment`), as Envoy's `removeQueryAndFragment`
/// splits them.
fn split_path(path_and_query: &str) -> (&str, &str) {
    let end = path_and_query
        .find(['?', '#'])
        .unwrap_or(path_and_query.len());
    path_and_query.split_at(end)
}

/// An RE2 rewrite string: literal text and `\N` group references (`\\` is a backslash).
struct Re2Rewrite<'a> {
    parts: Vec<Part<'a>>,
}

enum Part<'a> {
    Literal(&'a str),
    Group(usize),
}

impl<'a> Re2Rewrite<'a> {
    /// RE2 knows only `\0`–`\9` and `\\`; Envoy refuses any other escape at configuration time,
    /// so one that reaches here is kept as written.
    fn parse(s: &'a str) -> Self {
        let mut parts = Vec::new();
        let mut literal_start = 0;
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'\\' {
                let next = bytes.get(i + 1).copied();
                let replacement = match next {
                    Some(d @ b'0'..=b'9') => Some(Part::Group(usize::from(d - b'0'))),
                    Some(b'\\') => Some(Part::Literal("\\")),
                    _ => None,
                };
                if let Some(part) = replacement {
                    parts.push(Part::Literal(&s[literal_start..i]));
                    parts.push(part);
                    i += 2;
                    literal_start = i;
                    continue;
                }
            }
            i += 1;
        }
        parts.push(Part::Literal(&s[literal_start..]));
        Re2Rewrite { parts }
    }

    /// A group the pattern lacks (which Envoy would have refused) expands to nothing.
    fn expand(&self, caps: &regex::Captures<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Group(n) => out.push_str(caps.get(*n).map_or("", |m| m.as_str())),
            }
        }
        out
    }
}

/// The `Location` of a `redirect`, as Envoy builds it from Istio's translation
/// (`ApplyRedirect` → Envoy `RedirectAction`, `Http::Utility::newUri`):
/// - scheme: `scheme`, else the request's;
/// - host: `authority`, else the request's `Host` as sent, less its port when a port is set
///   below, or when the scheme changes and the port was the old scheme's default (`:80` for
///   http, `:443` for https);
/// - port: `port` or `FROM_REQUEST_PORT` (the port the request was sent to) append `:port`,
///   except 80 with http and 443 with https (Istio leaves those out, taking the scheme as `http`
///   when `scheme` is unset: a sidecar never terminates TLS); `FROM_PROTOCOL_DEFAULT` appends
///   none, so with no `authority` the request's own `Host` port stays;
/// - path: `uri` replaces the path but keeps the request's query, unless `uri` has its own
///   (Envoy `path_redirect`); without `uri`, the request's path and query.
pub fn redirect_location(r: &Redirect, req: &RequestInfo) -> String {
    let scheme = r.scheme.as_deref().filter(|s| !s.is_empty());
    let new_scheme = scheme.unwrap_or(req.scheme);
    let istio_scheme = scheme.unwrap_or("http");
    let port = match r.port {
        RedirectPort::ProtocolDefault => None,
        RedirectPort::FromRequest => Some(req.port),
        RedirectPort::Fixed(p) => Some(p),
    }
    .filter(|&p| {
        p != 0 && !(p == 80 && istio_scheme == "http") && !(p == 443 && istio_scheme == "https")
    });
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let host = match r.authority.as_deref().filter(|a| !a.is_empty()) {
        Some(authority) => authority,
        None => request_host(req.authority, new_scheme, req.scheme, !port.is_empty()),
    };
    let query = req.query.map(|q| format!("?{q}")).unwrap_or_default();
    let mut path = match r.uri.as_deref().filter(|u| !u.is_empty()) {
        Some(uri) if uri.contains('?') => uri.to_owned(),
        Some(uri) => format!("{uri}{query}"),
        None => format!("{}{query}", req.path),
    };
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    format!("{new_scheme}://{host}{port}{path}")
}

/// The request's `Host` for a redirect, its port removed when a new port replaces it or when it
/// was the default of a scheme being left (Envoy `processRequestHost`).
fn request_host<'a>(
    host: &'a str,
    new_scheme: &str,
    request_scheme: &str,
    new_port: bool,
) -> &'a str {
    let port_start = if host.starts_with('[') {
        // IPv6 literal: only a `:` after the closing bracket starts a port.
        host.rfind("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    let Some(port_start) = port_start else {
        return host;
    };
    let request_port = &host[port_start..];
    let mut remove = new_port;
    if new_scheme != request_scheme {
        remove |= request_scheme.eq_ignore_ascii_case("https") && request_port == ":443";
        remove |= request_scheme.eq_ignore_ascii_case("http") && request_port == ":80";
    }
    if remove {
        &host[..port_start]
    } else {
        host
    }
}
