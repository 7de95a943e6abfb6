//! The fake API server's HTTP side: routes a request to discovery, list, get or watch, answers
//! failures with a `Status` body as the real server does, and streams watches as chunked
//! newline-delimited JSON. Never panics on a request: anything it does not serve gets 400/404/405.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::cluster::{Cluster, ListError, WatchStart};
use super::lock;
use super::resources::{self, RESOURCES};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The real server picks a random watch length around its `--min-request-timeout` (1800 s) when
/// the client sets none.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// Who the fake says was refused, in a 403's message.
const USER: &str = "system:serviceaccount:istio-system:ambit";

/// Serves one connection until the client closes it (or its task is aborted by `down`).
pub(super) async fn serve_connection(stream: TcpStream, cluster: Arc<Mutex<Cluster>>) {
    let service = service_fn(move |req| {
        let response = respond(&cluster, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    // A client that goes away mid-request is its own business.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn respond(cluster: &Mutex<Cluster>, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or_default();
    let mut c = lock(cluster);
    c.requests.push(match query {
        "" => format!("{} {path}", req.method()),
        q => format!("{} {path}?{q}", req.method()),
    });
    if req.method() != Method::GET {
        let mut resp = status(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "the fake API server only reads: {} is not supported",
                req.method()
            ),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["version"] => ok(resources::version()),
        ["api"] => ok(resources::core_versions()),
        ["apis"] => ok(resources::api_group_list(c.served_groups().into_iter())),
        ["apis", group] if c.group_served(group) => {
            resources::api_group(group).map_or_else(not_found, ok)
        }
        ["api", version, rest @ ..] => group_version(&mut c, "", version, rest, query),
        ["apis", group, version, rest @ ..] => group_version(&mut c, group, version, rest, query),
        _ => not_found(),
    }
}

/// Everything under `/api/<version>` or `/apis/<group>/<version>`.
fn group_version(
    c: &mut Cluster,
    group: &str,
    version: &str,
    rest: &[&str],
    query: &str,
) -> Response<Body> {
    let gv = resources::api_version(group, version);
    if rest.is_empty() && c.failing_discovery.contains(&gv) {
        // What an aggregated or CRD group-version whose backing is unavailable answers.
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is currently unable to handle the request (get {gv})"),
        );
    }
    if !resources::known_group_version(group, version) || !c.group_served(group) {
        return not_found();
    }
    if rest.is_empty() {
        return ok(resources::resource_list(group, version));
    }
    let (plural, namespace, name) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, None, Some(*name)),
        ["namespaces", ns, plural] => (*plural, Some(*ns), None),
        ["namespaces", ns, plural, name] => (*plural, Some(*ns), Some(*name)),
        _ => return not_found(),
    };
    let Some(id) = resources::by_plural(group, version, plural) else {
        return not_found();
    };
    let r = &RESOURCES[id];
    // A namespaced resource's object needs its namespace in the path; a cluster-scoped one has none.
    if (namespace.is_some() && !r.namespaced)
        || (name.is_some() && r.namespaced != namespace.is_some())
    {
        return not_found();
    }
    // Find the table's own `&'static str` of the version, for the watch that outlives the request.
    let Some(version) = r.versions.iter().copied().find(|v| *v == version) else {
        return not_found();
    };
    let q = match Query::parse(query) {
        Ok(q) => q,
        Err(message) => return status(StatusCode::BAD_REQUEST, message),
    };
    let verb = match (name, q.watch) {
        (Some(_), true) => {
            return status(
                StatusCode::BAD_REQUEST,
                "the fake API server does not watch single objects: watch the collection".into(),
            )
        }
        (Some(_), false) => "get",
        (None, true) => "watch",
        (None, false) => "list",
    };
    if let Some(code) = c.failing.get(&id).copied() {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = if code == StatusCode::FORBIDDEN {
            let scope = namespace.map_or("at the cluster scope".to_string(), |ns| {
                format!("in the namespace {ns:?}")
            });
            format!(
                "{plural} is forbidden: User {USER:?} cannot {verb} resource {plural:?} in API group {:?} {scope}",
                r.group
            )
        } else {
            format!(
                "injected failure: {verb} {plural} answers {}",
                code.as_u16()
            )
        };
        return status(code, message);
    }
    match (name, q.watch) {
        (Some(name), _) => match c.get(id, version, namespace.unwrap_or_default(), name) {
            Some(object) => ok(object),
            None => status(
                StatusCode::NOT_FOUND,
                format!("{plural} {name:?} not found"),
            ),
        },
        (None, false) => {
            // The real server serves `resourceVersion=0` from its watch cache, ignoring `limit`.
            let limit = if q.any_version { None } else { q.limit };
            match c.list(id, version, namespace, limit, q.continue_token.as_deref()) {
                Ok(mut list) => {
                    if let (Some(name), Some(items)) = (&q.name, list.get_mut("items")) {
                        if let Some(items) = items.as_array_mut() {
                            items.retain(|o| o["metadata"]["name"].as_str() == Some(name));
                        }
                    }
                    ok(list)
                }
                Err(ListError::BadContinue) => {
                    status(StatusCode::BAD_REQUEST, "continue key is not valid".into())
                }
                Err(ListError::Expired) => status(
                    StatusCode::GONE,
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter."
                        .into(),
                ),
            }
        }
        (None, true) => {
            let start = c.watch(id, version, namespace, q.from, q.bookmarks);
            watch_response(start, q.timeout, q.name)
        }
    }
}

/// The query parameters the fake reads; those it cannot honour are refused, not ignored.
struct Query {
    watch: bool,
    /// None for `resourceVersion` unset or "0".
    from: Option<u64>,
    /// `resourceVersion=0`: any version will do.
    any_version: bool,
    limit: Option<usize>,
    /// Our tokens need no percent-decoding.
    continue_token: Option<String>,
    bookmarks: bool,
    timeout: Duration,
    /// `fieldSelector=metadata.name=<name>`, the one field selector the fake honours (the agent
    /// watches the mesh config ConfigMap by name).
    name: Option<String>,
}

impl Query {
    fn parse(query: &str) -> Result<Query, String> {
        // Values are used only when they are digits or `true`, so no percent-decoding is needed.
        let params: BTreeMap<&str, &str> = query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect();
        let get = |k: &str| params.get(k).copied().unwrap_or_default();
        let field = get("fieldSelector").replace("%3D", "=").replace("%3d", "=");
        let name = match field.strip_prefix("metadata.name=") {
            Some(n) if !n.is_empty() && !n.contains([',', '%', '!']) => Some(n.to_string()),
            _ => None,
        };
        for selector in ["labelSelector", "fieldSelector"] {
            let honoured = selector == "fieldSelector" && name.is_some();
            if !honoured && !get(selector).is_empty() {
                return Err(format!(
                    "the fake API server does not implement {selector}: extend harness::fake_kube"
                ));
            }
        }
        let from = match get("resourceVersion") {
            "" | "0" => None,
            rv => Some(
                rv.parse::<u64>()
                    .map_err(|_| format!("invalid resourceVersion {rv:?}: not a number"))?,
            ),
        };
        let timeout = match get("timeoutSeconds") {
            "" | "0" => DEFAULT_WATCH_TIMEOUT,
            t => Duration::from_secs(
                t.parse::<u64>()
                    .map_err(|_| format!("invalid timeoutSeconds {t:?}: not a number"))?,
            ),
        };
        let limit = match get("limit") {
            "" | "0" => None,
            l => Some(
                l.parse::<usize>()
                    .map_err(|_| format!("invalid limit {l:?}: not a number"))?,
            ),
        };
        Ok(Query {
            watch: matches!(get("watch"), "true" | "1"),
            any_version: get("resourceVersion") == "0",
            limit,
            continue_token: Some(get("continue"))
                .filter(|c| !c.is_empty())
                .map(str::to_string),
            from,
            bookmarks: get("allowWatchBookmarks") == "true",
            timeout,
            name,
        })
    }
}

/// A 200 whose chunked body is the watch's lines, ended by `timeout`, by the server ending the
/// watch (CRD deleted), or after the single ERROR line of an expired resource version.
fn watch_response(start: WatchStart, timeout: Duration, name: Option<String>) -> Response<Body> {
    let lines = match start {
        WatchStart::Expired(line) => futures::stream::iter(vec![line]).boxed(),
        WatchStart::Stream { initial, live } => {
            let live = futures::stream::unfold(live, |mut rx| async move {
                rx.recv().await.map(|line| (line, rx))
            });
            futures::stream::iter(initial)
                .chain(live)
                .take_until(tokio::time::sleep(timeout))
                .boxed()
        }
    };
    // With a name selector, events about other objects are left out (BOOKMARK and ERROR stay).
    let lines = lines.filter(move |line| {
        let keep = name.as_deref().is_none_or(|n| {
            let event: Value = serde_json::from_slice(line).unwrap_or_default();
            !matches!(
                event["type"].as_str(),
                Some("ADDED" | "MODIFIED" | "DELETED")
            ) || event["object"]["metadata"]["name"].as_str() == Some(n)
        });
        futures::future::ready(keep)
    });
    let frames = lines.map(|line| Ok::<_, Infallible>(Frame::data(line)));
    with_json_type(Response::new(StreamBody::new(frames).boxed_unsync()))
}

fn ok(body: Value) -> Response<Body> {
    json_response(StatusCode::OK, &body)
}

/// What the real server answers for a path or group-version it does not serve.
fn not_found() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "the server could not find the requested resource".into(),
    )
}

/// A failure with a `Status` body; `reason` follows the code as the real server's do.
fn status(code: StatusCode, message: String) -> Response<Body> {
    let reason = match code.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        // Kubernetes' StatusReasonUnknown.
        _ => "",
    };
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *resp.status_mut() = code;
    with_json_type(resp)
}

fn with_json_type(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
