//! Tests of URI rewrites and redirect `Location`s, each naming the Istio (or Envoy) rule it checks.

use http::StatusCode;
use proptest::prelude::*;

use super::*;
use crate::routing::matching::tests::{exact, prefix, regex, Req};

fn rewrite_uri(uri: &str) -> Rewrite {
    Rewrite {
        uri: Some(uri.into()),
        authority: None,
        uri_regex: None,
    }
}

fn rewrite_regex(pattern: &str, substitution: &str) -> Rewrite {
    Rewrite {
        uri: None,
        authority: None,
        uri_regex: Some((
            regex::Regex::new(pattern).expect("test pattern"),
            substitution.into(),
        )),
    }
}

fn block(m: StrMatch) -> RequestMatch {
    RequestMatch {
        uri: Some(m),
        ..Default::default()
    }
}

fn redirect(uri: Option<&str>, authority: Option<&str>) -> Redirect {
    Redirect {
        uri: uri.map(Into::into),
        authority: authority.map(Into::into),
        port: RedirectPort::ProtocolDefault,
        scheme: None,
        status: StatusCode::MOVED_PERMANENTLY,
    }
}

fn location(r: &Redirect, req: &Req) -> String {
    redirect_location(r, &req.info())
}

// ---- rewrite.uri -------------------------------------------------------------------------------

#[test]
fn prefix_match_rewrites_only_the_prefix_as_in_the_istio_example() {
    // Istio HTTPRewrite example: match prefix "/ratings", rewrite uri "/v1/bookRatings".
    let m = block(prefix("/ratings"));
    let rw = rewrite_uri("/v1/bookRatings");
    assert_eq!(
        rewrite_path(&rw, Some(&m), "/ratings/123?x=1"),
        "/v1/bookRatings/123?x=1"
    );
    assert_eq!(rewrite_path(&rw, Some(&m), "/ratings"), "/v1/bookRatings");
}

#[test]
fn exact_match_rewrites_the_whole_path_keeping_the_query() {
    // Envoy prefix_rewrite on a `path` route: the matched path is swapped, the query stays.
    let m = block(exact("/old"));
    assert_eq!(
        rewrite_path(&rewrite_uri("/new"), Some(&m), "/old?a=1&b=2"),
        "/new?a=1&b=2"
    );
    assert_eq!(rewrite_path(&rewrite_uri("/new"), Some(&m), "/old"), "/new");
}

#[test]
fn regex_match_rewrites_the_whole_path_keeping_the_query() {
    // Envoy prefix_rewrite on a `safe_regex` route: the whole path (query removed) was matched.
    let m = block(regex("/items/[0-9]+"));
    assert_eq!(
        rewrite_path(&rewrite_uri("/item"), Some(&m), "/items/42?full=1"),
        "/item?full=1"
    );
}

#[test]
fn without_uri_match_only_the_leading_slash_is_replaced() {
    // Istio: a block without `uri` (or a route without blocks) is Envoy `prefix: "/"`, and
    // prefix_rewrite swaps that "/" alone, so "/v2" + "foo" gives "/v2foo" under Istio too.
    let rw = rewrite_uri("/v2");
    assert_eq!(rewrite_path(&rw, None, "/foo?x=1"), "/v2foo?x=1");
    assert_eq!(
        rewrite_path(&rw, Some(&RequestMatch::default()), "/foo"),
        "/v2foo"
    );
    assert_eq!(rewrite_path(&rewrite_uri("/v2/"), None, "/foo"), "/v2/foo");
}

#[test]
fn ignore_uri_case_prefix_is_swapped_whatever_its_case() {
    // Envoy rewritePathByPrefixOrRegex: the matched prefix is checked with StartsWithIgnoreCase.
    let m = RequestMatch {
        ignore_uri_case: true,
        ..block(prefix("/ratings"))
    };
    assert_eq!(
        rewrite_path(&rewrite_uri("/v1"), Some(&m), "/RATINGS/1"),
        "/v1/1"
    );
}

#[test]
fn path_that_no_longer_starts_with_the_match_is_left_alone() {
    // Envoy: a prefix rewrite whose matched prefix is not a prefix of the path is not applied.
    let m = block(prefix("/ratings"));
    assert_eq!(
        rewrite_path(&rewrite_uri("/v1"), Some(&m), "/other"),
        "/other"
    );
    assert_eq!(rewrite_path(&rewrite_uri("/v1"), Some(&m), "/é"), "/é");
}

#[test]
fn no_uri_and_no_regex_is_no_rewrite() {
    // Istio HTTPRewrite: an authority-only rewrite leaves the path alone.
    let rw = Rewrite {
        uri: None,
        authority: Some(http::HeaderValue::from_static("x")),
        uri_regex: None,
    };
    assert_eq!(rewrite_path(&rw, None, "/a?b"), "/a?b");
    assert_eq!(rewrite_path(&rewrite_uri(""), None, "/a?b"), "/a?b");
}

// ---- rewrite.uriRegexRewrite -------------------------------------------------------------------

#[test]
fn regex_rewrite_as_in_the_istio_example() {
    // Istio RegexRewrite example: match "^/service/([^/]+)(/.*)$", rewrite "\2/instance/\1".
    let rw = rewrite_regex("^/service/([^/]+)(/.*)$", r"\2/instance/\1");
    assert_eq!(
        rewrite_path(&rw, None, "/service/foo/v1/api"),
        "/v1/api/instance/foo"
    );
}

#[test]
fn regex_rewrite_replaces_every_match_in_the_path_not_the_query() {
    // Envoy RouteAction.regex_rewrite: all matches in the path; the query is not rewritten.
    let rw = rewrite_regex("a", "b");
    assert_eq!(rewrite_path(&rw, None, "/aaa?a=a"), "/bbb?a=a");
}

#[test]
fn regex_rewrite_substitution_is_re2_syntax() {
    // RE2 rewrite strings: `\N` is a group, `\\` a backslash, `$` has no meaning.
    let rw = rewrite_regex("^/(x)(y)$", r"/$1\\\1\0-\2");
    assert_eq!(rewrite_path(&rw, None, "/xy"), r"/$1\x/xy-y");
    let missing = rewrite_regex("^/(x)$", r"/\7");
    assert_eq!(
        rewrite_path(&missing, None, "/x"),
        "/",
        "a group the pattern lacks is empty"
    );
}

#[test]
fn regex_rewrite_to_nothing_keeps_the_path() {
    // Envoy: "If regex rewrite fails then return nothing", so the path is not changed.
    let rw = rewrite_regex("^.*$", "");
    assert_eq!(rewrite_path(&rw, None, "/a?q=1"), "/a?q=1");
}

proptest! {
    #[test]
    fn any_path_is_rewritten_without_panicking(path in ".*", pre in ".*") {
        let m = RequestMatch { ignore_uri_case: true, ..block(prefix(&pre)) };
        let _ = rewrite_path(&rewrite_uri("/x"), Some(&m), &path);
        let _ = rewrite_path(&rewrite_regex("(é|a)", r"\1\1\9\"), None, &path);
    }
}

// ---- redirect ----------------------------------------------------------------------------------

#[test]
fn redirect_as_in_the_istio_example() {
    // Istio HTTPRedirect example: uri "/v1/bookRatings", authority "newratings.default.svc...".
    let r = redirect(
        Some("/v1/bookRatings"),
        Some("newratings.default.svc.cluster.local"),
    );
    assert_eq!(
        location(&r, &Req::get("/v1/getProductRatings")),
        "http://newratings.default.svc.cluster.local/v1/bookRatings"
    );
}

#[test]
fn redirect_uri_keeps_the_query_unless_it_has_its_own() {
    // Envoy path_redirect: "query string in path_redirect will override the request's query
    // string"; without one, the request's query is kept.
    let req = Req::get("/old?bar=1");
    assert_eq!(
        location(&redirect(Some("/new"), None), &req),
        "http://reviews:9080/new?bar=1"
    );
    assert_eq!(
        location(&redirect(Some("/new?foo=1"), None), &req),
        "http://reviews:9080/new?foo=1"
    );
}

#[test]
fn redirect_without_uri_keeps_path_and_query() {
    // Envoy newUri: no path_redirect, the request's :path as it was.
    let r = redirect(None, Some("other"));
    assert_eq!(location(&r, &Req::get("/a/b?c=d")), "http://other/a/b?c=d");
}

#[test]
fn redirect_path_always_starts_with_a_slash() {
    // Envoy newUri: a final path without a leading "/" gets one.
    assert_eq!(
        location(&redirect(Some("v2"), Some("h")), &Req::get("/")),
        "http://h/v2"
    );
}

#[test]
fn redirect_scheme_change_drops_the_old_default_port() {
    // Envoy processRequestHost: when the scheme changes, ":80" of http (":443" of https) goes.
    let r = Redirect {
        scheme: Some("https".into()),
        ..redirect(None, None)
    };
    let req = Req::get("/x").authority("reviews:80").port(80);
    assert_eq!(location(&r, &req), "https://reviews/x");
    assert_eq!(
        location(&r, &Req::get("/x")),
        "https://reviews:9080/x",
        "other ports stay"
    );
}

#[test]
fn redirect_from_protocol_default_adds_no_port() {
    // Istio derivePort FROM_PROTOCOL_DEFAULT: no port_redirect. With `authority` the Location has
    // no port; without it the request's Host, port included, is kept (Envoy processRequestHost).
    let r = redirect(Some("/n"), Some("new.example.com"));
    assert_eq!(location(&r, &Req::get("/o")), "http://new.example.com/n");
    assert_eq!(
        location(&redirect(Some("/n"), None), &Req::get("/o")),
        "http://reviews:9080/n"
    );
}

#[test]
fn redirect_from_request_port_uses_the_port_the_request_was_sent_to() {
    // Istio derivePort FROM_REQUEST_PORT: port_redirect = the listener (destination) port,
    // replacing any port in the Host; Istio omits 80 for http.
    let r = Redirect {
        port: RedirectPort::FromRequest,
        ..redirect(None, Some("new"))
    };
    assert_eq!(location(&r, &Req::get("/p")), "http://new:9080/p");
    let host_port = Redirect {
        port: RedirectPort::FromRequest,
        ..redirect(None, None)
    };
    let req = Req::get("/p").authority("reviews:1234").port(9080);
    assert_eq!(location(&host_port, &req), "http://reviews:9080/p");
    let on_80 = Req::get("/p").authority("reviews").port(80);
    assert_eq!(location(&r, &on_80), "http://new/p");
}

#[test]
fn redirect_fixed_port_leaves_out_the_scheme_default() {
    // Istio ApplyRedirect: "Do not put explicit :80 or :443 when its http/https", taking the
    // scheme as http when unset (a sidecar is never TLS-terminating).
    let with = |port, scheme: Option<&str>| Redirect {
        port: RedirectPort::Fixed(port),
        scheme: scheme.map(Into::into),
        ..redirect(Some("/p"), Some("h"))
    };
    assert_eq!(
        location(&with(8443, Some("https")), &Req::get("/")),
        "https://h:8443/p"
    );
    assert_eq!(
        location(&with(443, Some("https")), &Req::get("/")),
        "https://h/p"
    );
    assert_eq!(location(&with(80, None), &Req::get("/")), "http://h/p");
    assert_eq!(location(&with(443, None), &Req::get("/")), "http://h:443/p");
}

#[test]
fn redirect_port_replaces_an_ipv6_host_port() {
    // Envoy processRequestHost: in "[addr]:port" only the part after "]:" is the port.
    let r = Redirect {
        port: RedirectPort::Fixed(9000),
        ..redirect(None, None)
    };
    let req = Req::get("/").authority("[fd00::1]:8080");
    assert_eq!(location(&r, &req), "http://[fd00::1]:9000/");
    let bare = Req::get("/").authority("[fd00::1]");
    assert_eq!(location(&r, &bare), "http://[fd00::1]:9000/");
}

proptest! {
    #[test]
    fn any_request_is_redirected_without_panicking(authority in ".*", path in ".*", port: u16) {
        let r = Redirect {
            port: RedirectPort::Fixed(port),
            scheme: Some("https".into()),
            ..redirect(None, None)
        };
        let req = Req::get("/").authority(&authority);
        let req = Req { path, ..req };
        let _ = location(&r, &req);
    }
}
