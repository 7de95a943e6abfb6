//! Tests of string matches, of every `HTTPMatchRequest` field, of route precedence and of
//! weighted destinations, each naming the Istio (or Envoy) rule it checks. The fixtures here are
//! shared with the `l4`, `rewrite` and `cors` tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;

use super::*;
use crate::routing::{Action, ClusterKey, HeaderOps};
use crate::state::IstioLabels;

// ---- fixtures ----------------------------------------------------------------------------------

/// An owned request that lends a [`RequestInfo`].
pub(super) struct Req {
    pub method: Method,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub port: u16,
    pub source: Option<Workload>,
    pub source_namespace: String,
}

impl Req {
    /// A GET from a client in `default` to `reviews:9080`, over plain HTTP.
    pub fn get(path_and_query: &str) -> Req {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (path_and_query.to_owned(), None),
        };
        Req {
            method: Method::GET,
            scheme: "http".into(),
            authority: "reviews:9080".into(),
            path,
            query,
            headers: HeaderMap::new(),
            port: 9080,
            source: None,
            source_namespace: "default".into(),
        }
    }

    pub fn method(mut self, m: Method) -> Req {
        self.method = m;
        self
    }

    pub fn scheme(mut self, s: &str) -> Req {
        self.scheme = s.into();
        self
    }

    pub fn authority(mut self, a: &str) -> Req {
        self.authority = a.into();
        self
    }

    pub fn port(mut self, p: u16) -> Req {
        self.port = p;
        self
    }

    /// Appends a value (a second call with the same name adds a second value).
    pub fn header(mut self, name: &str, value: &str) -> Req {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("test header name");
        let value = HeaderValue::from_str(value).expect("test header value");
        self.headers.append(name, value);
        self
    }

    pub fn client(mut self, labels: &[(&str, &str)], namespace: &str) -> Req {
        self.source = Some(workload(labels, namespace));
        self.source_namespace = namespace.into();
        self
    }

    pub fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            scheme: &self.scheme,
            authority: &self.authority,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            port: self.port,
            source: self.source.as_ref(),
            source_namespace: &self.source_namespace,
        }
    }
}

pub(super) fn workload(labels: &[(&str, &str)], namespace: &str) -> Workload {
    Workload {
        uid: "uid-1".into(),
        name: "client-1".into(),
        namespace: namespace.into(),
        service_account: "default".into(),
        node: None,
        host_network: false,
        ips: vec![],
        labels: labels_of(labels),
        named_ports: BTreeMap::new(),
        annotations: BTreeMap::new(),
        running: true,
        terminating: false,
        istio: Arc::new(IstioLabels::default()),
    }
}

pub(super) fn labels_of(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn string_match(exact: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> StringMatch {
    StringMatch {
        exact: exact.map(Into::into),
        prefix: prefix.map(Into::into),
        regex: regex.map(Into::into),
    }
}

/// Compiled through [`StrMatch::from_config`], so regexes are anchored as in production.
pub(super) fn exact(s: &str) -> StrMatch {
    StrMatch::from_config(&string_match(Some(s), None, None))
        .expect("compiles")
        .expect("not presence")
}

pub(super) fn prefix(s: &str) -> StrMatch {
    StrMatch::from_config(&string_match(None, Some(s), None))
        .expect("compiles")
        .expect("not presence")
}

pub(super) fn regex(s: &str) -> StrMatch {
    StrMatch::from_config(&string_match(None, None, Some(s)))
        .expect("compiles")
        .expect("not presence")
}

fn header(name: &str, value: Option<StrMatch>) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
        value,
    }
}

fn uri(m: StrMatch) -> RequestMatch {
    RequestMatch {
        uri: Some(m),
        ..Default::default()
    }
}

fn route(name: &str, matches: Vec<RequestMatch>) -> HttpRoute {
    HttpRoute {
        name: Some(name.into()),
        matches,
        action: Action::Route(vec![]),
        rewrite: None,
        headers: HeaderOps::default(),
        cors: None,
        timeout: None,
        retry: None,
        fault: None,
        mirrors: Vec::new(),
    }
}

fn named(name: &str, m: RequestMatch) -> RequestMatch {
    RequestMatch {
        name: Some(name.into()),
        ..m
    }
}

pub(super) fn dest(host: &str, weight: u32) -> WeightedDestination {
    WeightedDestination {
        cluster: ClusterKey {
            host: host.into(),
            subset: None,
            port: 9080,
        },
        weight,
        headers: HeaderOps::default(),
    }
}

fn matches_req(m: &RequestMatch, req: &Req) -> bool {
    matches(m, &req.info())
}

// ---- StringMatch -------------------------------------------------------------------------------

#[test]
fn empty_string_match_is_presence() {
    // Istio HTTPMatchRequest.headers: "{}" checks presence only.
    let m = StrMatch::from_config(&StringMatch::default()).expect("no regex to compile");
    assert!(m.is_none(), "{{}} must compile to a presence check");
}

#[test]
fn regex_star_is_presence_as_istio_translates_it() {
    // Istio route.go canBeConvertedToPresentMatch: regex "*" becomes present_match (istio#20629).
    let m = StrMatch::from_config(&string_match(None, None, Some("*"))).expect("not compiled");
    assert!(
        m.is_none(),
        "regex \"*\" must be presence, not a compile error"
    );
}

#[test]
fn regex_must_match_the_whole_value() {
    // Istio queryParams: regex "\d+$" "will only match values like 123 but not a123 or 123a".
    let m = regex(r"\d+$");
    assert!(m.matches("123"));
    assert!(!m.matches("a123"), "a regex is a full match, not a search");
    assert!(!m.matches("123a"));
    // Leftmost-first search would stop at "a"; a full match must still find "ab".
    assert!(regex("a|ab").matches("ab"));
}

#[test]
fn invalid_regex_is_an_error() {
    // Istio validateStringRegexp: the regex must compile (RE2 syntax).
    let r = StrMatch::from_config(&string_match(None, None, Some("(unclosed")));
    assert!(r.is_err(), "an invalid regex must be reported, got {r:?}");
}

#[test]
fn exact_and_prefix_are_case_sensitive() {
    // Istio StringMatch: "case-sensitive"; HTTPMatchRequest: header values are case-sensitive.
    assert!(exact("Jason").matches("Jason"));
    assert!(!exact("Jason").matches("jason"));
    assert!(!exact("Jason").matches("Jason2"), "exact is not a prefix");
    assert!(prefix("/api").matches("/api/v1"));
    assert!(!prefix("/api").matches("/API/v1"));
    assert!(!prefix("/api").matches("/ap"));
}

#[test]
fn ignore_case_covers_exact_and_prefix_not_regex() {
    // Istio ignoreUriCase: "the case will be ignored only in the case of exact and prefix URI
    // matches".
    assert!(exact("/Login").matches_ignore_case("/LOGIN"));
    assert!(prefix("/ratings/v2/").matches_ignore_case("/RATINGS/V2/1"));
    assert!(!prefix("/ratings/v2/").matches_ignore_case("/RATINGS"));
    assert!(!regex("/login").matches_ignore_case("/LOGIN"));
}

#[test]
fn header_bytes_that_are_not_utf8_match_by_bytes() {
    // Envoy compares header values as bytes; obs-text (0x80-0xFF) is legal in a header value.
    let value = b"abc\xff\xfe";
    assert!(prefix("abc").matches_bytes(value));
    assert!(!exact("abc").matches_bytes(value));
    assert!(
        !exact("abc\u{fffd}\u{fffd}").matches_bytes(value),
        "bytes, not lossy text"
    );
    assert!(regex("abc.*").matches_bytes(value));
    assert!(!regex("xyz").matches_bytes(value));
}

// ---- HTTPMatchRequest fields -------------------------------------------------------------------

#[test]
fn uri_matches_the_path_without_the_query() {
    // Envoy path/prefix/safe_regex route matches apply to :path once the query is removed.
    let req = Req::get("/reviews/1?user=jason");
    assert!(matches_req(&uri(exact("/reviews/1")), &req));
    assert!(matches_req(&uri(prefix("/reviews/")), &req));
    assert!(matches_req(&uri(regex("/reviews/[0-9]+")), &req));
    assert!(!matches_req(&uri(exact("/reviews/1?user=jason")), &req));
    assert!(!matches_req(&uri(regex(".*user=jason")), &req));
    assert!(!matches_req(&uri(exact("/reviews")), &req));
}

#[test]
fn ignore_uri_case_as_in_the_istio_example() {
    // Istio HTTPMatchRequest example: prefix "/ratings/v2/" with ignoreUriCase: true.
    let m = RequestMatch {
        ignore_uri_case: true,
        ..uri(prefix("/ratings/v2/"))
    };
    let req = Req::get("/RATINGS/v2/reviews");
    assert!(matches_req(&m, &req));
    let sensitive = uri(prefix("/ratings/v2/"));
    assert!(
        !matches_req(&sensitive, &req),
        "without ignoreUriCase case counts"
    );
    let re = RequestMatch {
        ignore_uri_case: true,
        ..uri(regex("/ratings/.*"))
    };
    assert!(
        !matches_req(&re, &req),
        "ignoreUriCase does not apply to regex"
    );
}

#[test]
fn block_without_uri_is_prefix_slash() {
    // Istio TranslateRouteMatch: every route match starts as Envoy `prefix: "/"`.
    assert!(matches_req(
        &RequestMatch::default(),
        &Req::get("/anything")
    ));
    assert!(!matches_req(&RequestMatch::default(), &Req::get("*")));
}

#[test]
fn method_is_a_case_sensitive_match_on_method() {
    // Istio HTTPMatchRequest.method: case-sensitive, translated to a `:method` header match.
    let m = RequestMatch {
        method: Some(exact("POST")),
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/").method(Method::POST)));
    assert!(!matches_req(&m, &Req::get("/")));
    let lower = RequestMatch {
        method: Some(exact("post")),
        ..Default::default()
    };
    assert!(!matches_req(&lower, &Req::get("/").method(Method::POST)));
}

#[test]
fn authority_matches_authority_as_sent() {
    // Istio HTTPMatchRequest.authority: case-sensitive, a `:authority` header match (Host as
    // sent, port included: Istio does not strip the port on sidecars).
    let m = |s| RequestMatch {
        authority: Some(s),
        ..Default::default()
    };
    let req = Req::get("/").authority("reviews.default:9080");
    assert!(matches_req(&m(exact("reviews.default:9080")), &req));
    assert!(!matches_req(&m(exact("reviews.default")), &req));
    assert!(matches_req(&m(prefix("reviews.")), &req));
    assert!(matches_req(&m(regex(r"reviews\..*:9080")), &req));
    assert!(!matches_req(&m(exact("Reviews.default:9080")), &req));
}

#[test]
fn scheme_matches_scheme() {
    // Istio HTTPMatchRequest.scheme: a `:scheme` header match.
    let m = RequestMatch {
        scheme: Some(exact("https")),
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/").scheme("https")));
    assert!(!matches_req(&m, &Req::get("/").scheme("http")));
}

#[test]
fn headers_exact_as_in_the_istio_example() {
    // Istio HTTPMatchRequest example: headers end-user exact "jason".
    let m = RequestMatch {
        headers: vec![header("end-user", Some(exact("jason")))],
        ..uri(prefix("/ratings/v2/"))
    };
    assert!(matches_req(
        &m,
        &Req::get("/ratings/v2/1").header("end-user", "jason")
    ));
    assert!(!matches_req(
        &m,
        &Req::get("/ratings/v2/1").header("end-user", "Jason")
    ));
    assert!(
        !matches_req(&m, &Req::get("/ratings/v2/1")),
        "absent header"
    );
    assert!(!matches_req(
        &m,
        &Req::get("/ratings/v1/1").header("end-user", "jason")
    ));
}

#[test]
fn header_names_match_without_case() {
    // Istio: header keys are lowercase; HTTP header names are case-insensitive on the wire.
    let m = RequestMatch {
        headers: vec![header("x-request-id", Some(prefix("abc")))],
        ..Default::default()
    };
    assert!(matches_req(
        &m,
        &Req::get("/").header("X-Request-ID", "abc-1")
    ));
}

#[test]
fn header_prefix_and_regex() {
    // Istio StringMatch: prefix and regex (RE2, full match) on header values; the regex is the
    // Istio HTTPMatchRequest cookie example, taken literally (no space after a `;`).
    let cookie = RequestMatch {
        headers: vec![header("cookie", Some(regex("^(.*?;)?(user=jason)(;.*)?$")))],
        ..Default::default()
    };
    let with_cookie = |v| Req::get("/").header("cookie", v);
    assert!(matches_req(&cookie, &with_cookie("a=1;user=jason;b=2")));
    assert!(!matches_req(&cookie, &with_cookie("a=1; user=jason")));
    assert!(!matches_req(&cookie, &with_cookie("user=jasonx")));
    let agent = RequestMatch {
        headers: vec![header("user-agent", Some(prefix("curl/")))],
        ..Default::default()
    };
    let with_agent = |v| Req::get("/").header("user-agent", v);
    assert!(matches_req(&agent, &with_agent("curl/8.0")));
    assert!(!matches_req(&agent, &with_agent("Mozilla")));
}

#[test]
fn header_empty_match_checks_presence() {
    // Istio HTTPMatchRequest.headers: `{}` matches any value, even empty, of a present header.
    let m = RequestMatch {
        headers: vec![header("x-canary", None)],
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/").header("x-canary", "")));
    assert!(matches_req(&m, &Req::get("/").header("x-canary", "yes")));
    assert!(!matches_req(&m, &Req::get("/")));
}

#[test]
fn header_with_several_values_is_matched_joined_with_commas() {
    // Envoy HeaderUtility::getAllOfHeaderAsString: repeated headers are joined with "," first.
    let req = Req::get("/").header("x-group", "a").header("x-group", "b");
    let m = |s| RequestMatch {
        headers: vec![header("x-group", Some(s))],
        ..Default::default()
    };
    assert!(matches_req(&m(exact("a,b")), &req));
    assert!(!matches_req(&m(exact("a")), &req), "not any one value");
    assert!(!matches_req(&m(exact("b")), &req));
    assert!(matches_req(&m(prefix("a,")), &req));
}

#[test]
fn host_header_condition_reads_the_authority() {
    // Envoy's header map answers `host` with `:authority` (envoy#4751): HTTP/2 has no `host`.
    let m = RequestMatch {
        headers: vec![header("host", Some(exact("reviews:9080")))],
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/")));
    assert!(!matches_req(&m, &Req::get("/").authority("ratings:9080")));
}

#[test]
fn without_headers_excludes_matching_requests() {
    // Istio withoutHeaders: "if a header is matched with a matching rule among withoutHeader, the
    // traffic becomes not matched one".
    let m = RequestMatch {
        without_headers: vec![header("end-user", Some(exact("jason")))],
        ..Default::default()
    };
    assert!(!matches_req(&m, &Req::get("/").header("end-user", "jason")));
    assert!(matches_req(&m, &Req::get("/").header("end-user", "mary")));
    // Istio sets treat_missing_header_as_empty: an absent header is "" and "" != "jason".
    assert!(matches_req(&m, &Req::get("/")));
}

#[test]
fn without_headers_absent_header_counts_as_empty_value() {
    // Istio route.go: withoutHeaders value matches get treat_missing_header_as_empty.
    let m = RequestMatch {
        without_headers: vec![header("x-debug", Some(exact("")))],
        ..Default::default()
    };
    assert!(
        !matches_req(&m, &Req::get("/")),
        "absent is empty, which exact \"\" hits"
    );
    assert!(!matches_req(&m, &Req::get("/").header("x-debug", "")));
    assert!(matches_req(&m, &Req::get("/").header("x-debug", "1")));
    let re = RequestMatch {
        without_headers: vec![header("x-debug", Some(regex(".*")))],
        ..Default::default()
    };
    assert!(
        !matches_req(&re, &Req::get("/")),
        "\".*\" matches the empty value"
    );
}

#[test]
fn without_headers_presence_excludes_requests_carrying_the_header() {
    // Istio: `{}` is present_match, inverted: the block needs the header absent.
    let m = RequestMatch {
        without_headers: vec![header("x-canary", None)],
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/")));
    assert!(!matches_req(&m, &Req::get("/").header("x-canary", "")));
}

#[test]
fn query_params_exact_and_valueless_key() {
    // Istio queryParams: "?key=true" with exact "true"; "?key" with exact "".
    let m = |name: &str, s| RequestMatch {
        query_params: vec![(name.into(), Some(s))],
        ..Default::default()
    };
    assert!(matches_req(
        &m("key", exact("true")),
        &Req::get("/?a=1&key=true")
    ));
    assert!(!matches_req(
        &m("key", exact("true")),
        &Req::get("/?key=false")
    ));
    assert!(!matches_req(&m("key", exact("true")), &Req::get("/")));
    assert!(matches_req(&m("key", exact("")), &Req::get("/?key")));
    assert!(matches_req(&m("key", exact("")), &Req::get("/?key=")));
    assert!(
        !matches_req(&m("Key", exact("true")), &Req::get("/?key=true")),
        "names are case-sensitive"
    );
}

#[test]
fn query_params_regex_is_a_full_match() {
    // Istio queryParams: regex "\d+$" matches "123" but not "a123" or "123a".
    let m = RequestMatch {
        query_params: vec![("key".into(), Some(regex(r"\d+$")))],
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/?key=123")));
    assert!(!matches_req(&m, &Req::get("/?key=a123")));
    assert!(!matches_req(&m, &Req::get("/?key=123a")));
}

#[test]
fn query_params_presence_first_value_and_no_decoding() {
    // Envoy QueryParamsMulti::parseQueryString: not percent-decoded; a matcher sees the first
    // value (getFirstValue). Istio: `{}` is present_match.
    let present = RequestMatch {
        query_params: vec![("debug".into(), None)],
        ..Default::default()
    };
    assert!(matches_req(&present, &Req::get("/?debug")));
    assert!(!matches_req(&present, &Req::get("/?debugging=1")));
    let first = RequestMatch {
        query_params: vec![("k".into(), Some(exact("2")))],
        ..Default::default()
    };
    assert!(
        !matches_req(&first, &Req::get("/?k=1&k=2")),
        "only the first value counts"
    );
    let encoded = |s| RequestMatch {
        query_params: vec![("q".into(), Some(s))],
        ..Default::default()
    };
    assert!(matches_req(
        &encoded(exact("a%20b")),
        &Req::get("/?q=a%20b")
    ));
    assert!(!matches_req(&encoded(exact("a b")), &Req::get("/?q=a%20b")));
    assert!(
        matches_req(&encoded(exact("x=y")), &Req::get("/?q=x=y")),
        "split at the first ="
    );
}

#[test]
fn query_params_prefix_matches_as_a_prefix() {
    // Istio's docs: "prefix matching is currently not supported"; its translation nevertheless
    // gives Envoy a prefix StringMatcher (ConvertToEnvoyMatch), which does match as a prefix.
    let m = RequestMatch {
        query_params: vec![("v".into(), Some(prefix("abc")))],
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/?v=abcdef")));
    assert!(!matches_req(&m, &Req::get("/?v=xabc")));
}

#[test]
fn port_is_the_destination_port() {
    // Istio HTTPMatchRequest.port: "the ports on the host that is being addressed".
    let m = RequestMatch {
        port: Some(9080),
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/")));
    assert!(!matches_req(&m, &Req::get("/").port(8080)));
}

#[test]
fn source_labels_are_a_subset_of_the_client_labels() {
    // Istio sourceMatchHTTP: match.sourceLabels must be a SubsetOf the proxy's labels.
    let m = RequestMatch {
        source_labels: labels_of(&[("app", "productpage"), ("version", "v2")]),
        ..Default::default()
    };
    let labels = [("app", "productpage"), ("version", "v2"), ("team", "a")];
    assert!(matches_req(&m, &Req::get("/").client(&labels, "default")));
    let v1 = [("app", "productpage"), ("version", "v1")];
    assert!(!matches_req(&m, &Req::get("/").client(&v1, "default")));
    assert!(!matches_req(
        &m,
        &Req::get("/").client(&[("app", "productpage")], "default")
    ));
    assert!(
        !matches_req(&m, &Req::get("/")),
        "no client workload, no labels to match"
    );
    assert!(
        matches_req(&RequestMatch::default(), &Req::get("/")),
        "none required"
    );
}

#[test]
fn source_namespace_is_the_client_namespace() {
    // Istio sourceMatchHTTP: sourceNamespace == "" or the proxy's namespace.
    let m = RequestMatch {
        source_namespace: Some("prod".into()),
        ..Default::default()
    };
    assert!(matches_req(&m, &Req::get("/").client(&[], "prod")));
    assert!(!matches_req(&m, &Req::get("/").client(&[], "default")));
    assert!(!matches_req(&m, &Req::get("/")));
}

#[test]
fn conditions_of_one_block_are_anded() {
    // Istio HTTPRoute.match: "all conditions inside a single match block have AND semantics".
    let m = RequestMatch {
        uri: Some(prefix("/api")),
        method: Some(exact("GET")),
        headers: vec![header("x-tenant", Some(exact("a")))],
        query_params: vec![("v".into(), Some(exact("2")))],
        port: Some(9080),
        ..Default::default()
    };
    let ok = Req::get("/api/x?v=2").header("x-tenant", "a");
    assert!(matches_req(&m, &ok));
    assert!(!matches_req(&m, &Req::get("/api/x?v=2")), "header missing");
    assert!(!matches_req(
        &m,
        &Req::get("/api/x?v=1").header("x-tenant", "a")
    ));
    assert!(!matches_req(
        &m,
        &Req::get("/other?v=2").header("x-tenant", "a")
    ));
    let post = Req::get("/api/x?v=2")
        .header("x-tenant", "a")
        .method(Method::POST);
    assert!(!matches_req(&m, &post));
}

// ---- route selection ---------------------------------------------------------------------------

#[test]
fn first_matching_route_wins() {
    // Istio VirtualService.http: "the first rule matching an incoming request is used".
    let routes = vec![
        route("specific", vec![uri(prefix("/api/v2"))]),
        route("api", vec![uri(prefix("/api"))]),
        route("catch-all", vec![]),
    ];
    let pick = |p: &str| select(&routes, &Req::get(p).info()).map(|(r, _)| r.name.clone());
    assert_eq!(pick("/api/v2/x"), Some(Some("specific".into())));
    assert_eq!(pick("/api/v1/x"), Some(Some("api".into())));
    assert_eq!(
        pick("/web"),
        Some(Some("catch-all".into())),
        "no blocks: matches all"
    );
}

#[test]
fn match_blocks_are_ored_and_the_matching_block_is_named() {
    // Istio HTTPRoute.match: "Match conditions to be satisfied for the rule to be activated. All
    // conditions inside a single match block have AND semantics, while the list of match blocks
    // have OR semantics."
    let routes = vec![route(
        "r",
        vec![
            named("v2", uri(prefix("/v2"))),
            named(
                "canary",
                RequestMatch {
                    headers: vec![header("x-canary", None)],
                    ..Default::default()
                },
            ),
        ],
    )];
    let by_header = Req::get("/v1").header("x-canary", "1");
    let (r, block) = select(&routes, &by_header.info()).expect("second block matches");
    assert_eq!(r.name.as_deref(), Some("r"));
    assert_eq!(block, Some("canary"));
    let (_, block) =
        select(&routes, &Req::get("/v2/x").header("x-canary", "1").info()).expect("both");
    assert_eq!(
        block,
        Some("v2"),
        "the first block that holds names the match"
    );
    assert!(select(&routes, &Req::get("/v1").info()).is_none());
}

#[test]
fn no_route_when_nothing_matches() {
    // Envoy: no route matched is a 404 (NR); select reports None for the caller to answer it.
    let routes = vec![route("a", vec![uri(exact("/a"))])];
    assert!(select(&routes, &Req::get("/b").info()).is_none());
    assert!(select(&[], &Req::get("/b").info()).is_none());
}

#[test]
fn select_match_returns_the_block_for_rewrites() {
    // Envoy prefix_rewrite replaces what the matched route's path specifier matched.
    let routes = vec![route("r", vec![uri(exact("/x")), uri(prefix("/y"))])];
    let req = Req::get("/yes");
    let (_, block) = select_match(&routes, &req.info()).expect("second block");
    assert!(matches!(block.and_then(|b| b.uri.as_ref()), Some(StrMatch::Prefix(p)) if p == "/y"));
    let all = vec![route("all", vec![])];
    let (_, block) = select_match(&all, &req.info()).expect("catch-all");
    assert!(block.is_none());
}

// ---- weighted destinations ---------------------------------------------------------------------

fn picks(dests: &[WeightedDestination], rolls: std::ops::Range<u64>) -> Vec<String> {
    rolls
        .map(|r| pick_weighted(dests, r).map_or("-".into(), |d| d.cluster.host.to_string()))
        .collect()
}

#[test]
fn weights_are_relative() {
    // Istio HTTPRouteDestination.weight: a destination receives weight/(sum of weights).
    let dests = [dest("a", 1), dest("b", 3)];
    assert_eq!(picks(&dests, 0..4), ["a", "b", "b", "b"]);
    assert_eq!(
        picks(&dests, 4..8),
        ["a", "b", "b", "b"],
        "roll modulo the total"
    );
    let pct = [dest("v1", 25), dest("v2", 75)];
    let v1 = picks(&pct, 0..1000).iter().filter(|h| *h == "v1").count();
    assert_eq!(v1, 250);
}

#[test]
fn a_lone_destination_takes_all_traffic_whatever_its_weight() {
    // Istio: "If there is only one destination in a rule, it will receive all traffic."
    assert_eq!(picks(&[dest("a", 0)], 0..3), ["a", "a", "a"]);
    assert_eq!(picks(&[dest("a", 7)], 0..3), ["a", "a", "a"]);
}

#[test]
fn a_zero_weight_gets_no_traffic_beside_others() {
    // Istio route.go: "Ignore 0 weighted clusters if there are other clusters in the route."
    let dests = [dest("zero", 0), dest("b", 5), dest("also-zero", 0)];
    assert!(picks(&dests, 0..50).iter().all(|h| h == "b"));
    assert_eq!(picks(&[dest("a", 0), dest("b", 0)], 0..3), ["-", "-", "-"]);
    assert!(pick_weighted(&[], 1).is_none());
}

#[test]
fn large_weights_and_rolls_do_not_overflow() {
    // The summed weights exceed u32; any u64 roll is taken modulo their sum.
    let dests = [dest("a", u32::MAX), dest("b", u32::MAX)];
    let max = u64::from(u32::MAX);
    assert_eq!(picks(&dests, max - 1..max + 1), ["a", "b"]);
    assert_eq!(picks(&dests, 2 * max..2 * max + 1), ["a"], "wrapped");
    assert!(pick_weighted(&dests, u64::MAX).is_some());
}

// ---- robustness --------------------------------------------------------------------------------

#[test]
fn huge_inputs_are_matched_without_trouble() {
    // A 1 MiB header, query and path: linear-time matching (RE2 semantics, no backtracking).
    let big = "a".repeat(1 << 20);
    let req = Req::get(&format!("/{big}?k={big}&z=1")).header("x-big", &big);
    let m = RequestMatch {
        uri: Some(regex("/(a|aa)*")),
        headers: vec![header("x-big", Some(regex("(a*)*")))],
        query_params: vec![("z".into(), Some(exact("1")))],
        ..Default::default()
    };
    assert!(matches_req(&m, &req));
}

proptest! {
    #[test]
    fn any_request_is_matched_without_panicking(
        path in ".*",
        query in proptest::option::of(".*"),
        value in proptest::collection::vec(any::<u8>(), 0..64),
        authority in ".*",
    ) {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            headers.append("x-h", v.clone());
            headers.append("x-h", v);
        }
        let method = Method::GET;
        let source = workload(&[("app", "a")], "ns");
        let req = RequestInfo {
            method: &method,
            scheme: "http",
            authority: &authority,
            path: &path,
            query: query.as_deref(),
            headers: &headers,
            port: 80,
            source: Some(&source),
            source_namespace: "ns",
        };
        let m = RequestMatch {
            uri: Some(prefix("/é")),
            ignore_uri_case: true,
            headers: vec![header("x-h", Some(regex(".*")))],
            without_headers: vec![header("x-h", Some(prefix("\u{e9}")))],
            query_params: vec![("é".into(), Some(regex("é+")))],
            ..Default::default()
        };
        let _ = matches(&m, &req);
        let _ = select(&[route("r", vec![m.clone()]), route("all", vec![])], &req);
    }
}
