//! Per-request matching against compiled routes: pure functions of a request and a route, with
//! the semantics an Istio sidecar gets from Istio's translation (istio/istio
//! `pilot/pkg/networking/core/route/route.go`) into Envoy's route matching.
//!
//! Here: string matches, HTTP match blocks and route selection, weighted destinations. Beside it:
//! `l4` (TCP and TLS routes), `rewrite` (URI rewrites and redirect `Location`s) and `cors`.

mod cors;
mod l4;
mod rewrite;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::header::HOST;

use super::{HeaderMatch, HttpRoute, RequestInfo, RequestMatch, StrMatch, WeightedDestination};
use crate::config::istio::common::{Match, StringMatch};
use crate::state::Workload;

pub use cors::{cors_preflight, cors_response_headers, origin_allowed};
pub use l4::{l4_matches, select_tcp, select_tls, sni_matches, tls_matches};
pub use rewrite::{redirect_location, rewrite_path};

impl StrMatch {
    /// Compiles an Istio `StringMatch`. `None` where Istio matches on presence alone: `{}`, and
    /// `regex: "*"`, which Istio translates to Envoy's `present_match` (istio/istio#20629; its
    /// validation refuses `*` as RE2 first, so this is only reached with unvalidated input).
    ///
    /// A regex is anchored, `^(?:…)$`: Envoy's `safe_regex` must match the whole value (Istio:
    /// `regex: "\d+$"` "will only match values like 123 but not a123 or 123a").
    pub fn from_config(m: &StringMatch) -> Result<Option<StrMatch>, regex::Error> {
        Ok(match m.matcher() {
            None | Some(Match::Regex("*")) => None,
            Some(Match::Exact(s)) => Some(StrMatch::Exact(s.to_owned())),
            Some(Match::Prefix(s)) => Some(StrMatch::Prefix(s.to_owned())),
            Some(Match::Regex(re)) => {
                Some(StrMatch::Regex(regex::Regex::new(&format!("^(?:{re})$"))?))
            }
        })
    }

    /// Case-sensitive match of the whole value (exact), its start (prefix) or the whole value
    /// against the regex.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value == s,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(re) => re.is_match(value),
        }
    }

    /// `ignoreUriCase`: exact and prefix compare ASCII letters without case (Envoy's
    /// `case_sensitive: false` uses absl's ASCII `EqualsIgnoreCase`); a regex is unaffected (Istio:
    /// "the case will be ignored only in the case of exact and prefix URI matches").
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StrMatch::Prefix(p) => starts_with_ignore_ascii_case(value.as_bytes(), p.as_bytes()),
            StrMatch::Regex(re) => re.is_match(value),
        }
    }

    /// A match on raw bytes, for header values, which may carry obs-text (bytes ≥ 0x80) that is
    /// not UTF-8. Exact and prefix compare bytes, as Envoy does. A regex sees invalid sequences as
    /// U+FFFD (RE2 matches bytes; this is the nearest a `&str` regex gets).
    pub fn matches_bytes(&self, value: &[u8]) -> bool {
        match self {
            StrMatch::Exact(s) => value == s.as_bytes(),
            StrMatch::Prefix(p) => value.starts_with(p.as_bytes()),
            StrMatch::Regex(re) => re.is_match(&String::from_utf8_lossy(value)),
        }
    }
}

fn starts_with_ignore_ascii_case(value: &[u8], prefix: &[u8]) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

fn ends_with_ignore_ascii_case(value: &[u8], suffix: &[u8]) -> bool {
    value
        .len()
        .checked_sub(suffix.len())
        .is_some_and(|start| value[start..].eq_ignore_ascii_case(suffix))
}

/// Whether one `match` block of an HTTP route holds for the request: every condition it sets.
pub fn matches(m: &RequestMatch, req: &RequestInfo) -> bool {
    // Istio drops a match block whose `port` is not the route's listener port, and one whose
    // `sourceLabels`/`sourceNamespace` do not fit the proxy (`translateRoute`, `sourceMatchHTTP`).
    if m.port.is_some_and(|p| p != req.port) {
        return false;
    }
    if !source_matches(
        &m.source_labels,
        m.source_namespace.as_deref(),
        req.source,
        req.source_namespace,
    ) {
        return false;
    }
    let uri_ok = match &m.uri {
        Some(uri) if m.ignore_uri_case => uri.matches_ignore_case(req.path),
        Some(uri) => uri.matches(req.path),
        // Istio: a block without `uri` becomes Envoy's `prefix: "/"`.
        None => req.path.starts_with('/'),
    };
    if !uri_ok {
        return false;
    }
    // Istio: `method`, `authority` and `scheme` are header matches on `:method`, `:authority` and
    // `:scheme`, which are always present.
    let pseudo = [
        (&m.method, req.method.as_str()),
        (&m.authority, req.authority),
        (&m.scheme, req.scheme),
    ];
    if pseudo
        .iter()
        .any(|(cond, value)| cond.as_ref().is_some_and(|c| !c.matches(value)))
    {
        return false;
    }
    m.headers.iter().all(|h| header_matches(h, req))
        && m.without_headers
            .iter()
            .all(|h| !without_header_hits(h, req))
        && m.query_params
            .iter()
            .all(|(name, cond)| query_param_matches(req.query, name, cond.as_ref()))
}

/// The first route one of whose match blocks holds (an empty list holds for every request whose
/// path starts with `/`), with the name of that block.
pub fn select<'r>(
    routes: &'r [HttpRoute],
    req: &RequestInfo,
) -> Option<(&'r HttpRoute, Option<&'r str>)> {
    select_match(routes, req).map(|(route, block)| (route, block.and_then(|b| b.name.as_deref())))
}

/// As [`select`], with the block that matched (`None` for a route without blocks), which a
/// prefix `rewrite` needs.
pub fn select_match<'r>(
    routes: &'r [HttpRoute],
    req: &RequestInfo,
) -> Option<(&'r HttpRoute, Option<&'r RequestMatch>)> {
    routes.iter().find_map(|route| {
        if route.matches.is_empty() {
            // Istio: no match blocks is Envoy's `prefix: "/"` and nothing else.
            return req.path.starts_with('/').then_some((route, None));
        }
        route
            .matches
            .iter()
            .find(|m| matches(m, req))
            .map(|m| (route, Some(m)))
    })
}

/// The value Envoy matches a header condition against: absent, the one value, or (several
/// values) all of them joined with `,` (Envoy `HeaderUtility::getAllOfHeaderAsString`).
fn header_value<'a>(req: &RequestInfo<'a>, h: &HeaderMatch) -> Option<Cow<'a, [u8]>> {
    // Envoy's header map answers `host` with `:authority` (envoyproxy/envoy#4751), so an HTTP/2
    // request, which has no `host` header, matches as an HTTP/1 one does.
    if h.name == HOST {
        return Some(Cow::Borrowed(req.authority.as_bytes()));
    }
    let mut values = req.headers.get_all(&h.name).iter();
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first.as_bytes())),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            Some(Cow::Owned(joined))
        }
    }
}

/// `headers`: present (`{}`), or present with a matching value.
fn header_matches(h: &HeaderMatch, req: &RequestInfo) -> bool {
    match header_value(req, h) {
        None => false,
        Some(v) => h.value.as_ref().is_none_or(|m| m.matches_bytes(&v)),
    }
}

/// `withoutHeaders`: whether the request hits the condition (and so the block does not match).
/// Istio sets Envoy's `invert_match`, and `treat_missing_header_as_empty` for a value condition:
/// an absent header is matched as the empty value (so `exact: ""` excludes requests without the
/// header too), and `{}` excludes requests that carry the header at all.
fn without_header_hits(h: &HeaderMatch, req: &RequestInfo) -> bool {
    let value = header_value(req, h);
    match &h.value {
        None => value.is_some(),
        Some(m) => m.matches_bytes(value.as_deref().unwrap_or_default()),
    }
}

/// `queryParams`: Envoy parses the query without percent-decoding (`QueryParamsMulti::
/// parseQueryString`) and matches the first value of the name; `?key` has the value "". `{}` is
/// presence. Istio's docs say prefix is not supported, but its translation gives Envoy a prefix
/// `StringMatcher`, which matches as a prefix; so does this.
fn query_param_matches(query: Option<&str>, name: &str, cond: Option<&StrMatch>) -> bool {
    match first_query_value(query, name) {
        None => false,
        Some(value) => cond.is_none_or(|m| m.matches(value)),
    }
}

fn first_query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter(|param| !param.is_empty())
        .find_map(|param| match param.split_once('=') {
            Some((n, v)) => (n == name).then_some(v),
            None => (param == name).then_some(""),
        })
}

/// `sourceLabels` must be a subset of the client workload's labels (none required: any client,
/// even an unknown one), and `sourceNamespace`, when set, the client's namespace.
pub(super) fn source_matches(
    labels: &BTreeMap<String, String>,
    namespace: Option<&str>,
    source: Option<&Workload>,
    source_namespace: &str,
) -> bool {
    let labels_ok = labels.is_empty()
        || source.is_some_and(|w| labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
    labels_ok && namespace.is_none_or(|ns| ns.is_empty() || ns == source_namespace)
}

/// One destination, chosen by `roll` (a uniform random number) as Envoy picks a weighted
/// cluster: `roll % total` falls in one destination's span of the summed weights, in order.
/// Weights are relative. Istio: a lone destination takes all traffic whatever its weight;
/// among several, a 0 weight is dropped; all 0 leaves none.
pub fn pick_weighted(dests: &[WeightedDestination], roll: u64) -> Option<&WeightedDestination> {
    if let [only] = dests {
        return Some(only);
    }
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = roll % total;
    for d in dests {
        let w = u64::from(d.weight);
        if point < w {
            return Some(d);
        }
        point -= w;
    }
    None
}
