//! Route resilience at the client's node, case by case after Istio's VirtualService reference
//! (`HTTPRoute.timeout`, `HTTPRetry`, `HTTPFaultInjection`, `mirror`/`mirrors`) and Envoy's
//! router where Istio defers to it: a `flaky` service whose pods answer as each test tells them,
//! and a client on another node.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::fixture::*;

const PORT: u16 = 8080;

/// How a pod of the test answers.
#[derive(Clone, Copy)]
pub(super) enum Behaviour {
    Ok,
    /// 503 for every other request it gets (odd ones fail).
    FailEveryOther,
    /// 503 always.
    Fail,
    /// Answers after this long.
    Slow(Duration),
}

pub(super) struct Flaky {
    pub mesh: Mesh,
    client: Pod,
    vip: std::net::IpAddr,
    _apps: Vec<HttpApp>,
    /// Requests each pod received (including those it failed).
    tries: Vec<Arc<AtomicUsize>>,
}

pub(super) async fn flaky(behaviours: &[Behaviour], yaml: &str) -> Flaky {
    flaky_relayed(behaviours, yaml, true).await
}

/// [`flaky`], the client node's source-side relay on or off (`relay`).
pub(super) async fn flaky_relayed(behaviours: &[Behaviour], yaml: &str, relay: bool) -> Flaky {
    let mut world = World::new();
    if !relay {
        world.no_source_relay();
    }
    let client = world.pod("client").node("n1").add();
    let pods: Vec<Pod> = behaviours
        .iter()
        .enumerate()
        .map(|(i, _)| {
            world
                .pod(&format!("flaky-{i}"))
                .node(if i % 2 == 0 { "n2" } else { "n3" })
                .app("flaky")
                .add()
        })
        .collect();
    let vip = world
        .service("flaky")
        .named_port("http", PORT, PORT)
        .backends(&pods.iter().collect::<Vec<_>>())
        .add();
    world.yaml(yaml);
    let mesh = world.start().await;
    let mut apps = Vec::new();
    let mut tries = Vec::new();
    for (pod, behaviour) in pods.iter().zip(behaviours) {
        let count = Arc::new(AtomicUsize::new(0));
        tries.push(count.clone());
        let (name, behaviour) = (pod.name.clone(), *behaviour);
        let app = mesh
            .http_app_with(pod.addr(PORT), &pod.name, move |req: Request<Incoming>| {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let name = name.clone();
                async move {
                    // Read the whole body: its length and a checksum go back in headers.
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let body = body.unwrap_or_default();
                    let status = match behaviour {
                        Behaviour::Ok => StatusCode::OK,
                        Behaviour::Fail => StatusCode::SERVICE_UNAVAILABLE,
                        Behaviour::FailEveryOther if n.is_multiple_of(2) => {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                        Behaviour::FailEveryOther => StatusCode::OK,
                        Behaviour::Slow(d) => {
                            tokio::time::sleep(d).await;
                            StatusCode::OK
                        }
                    };
                    Response::builder()
                        .status(status)
                        .header("x-app", name.as_str())
                        .header("x-body-len", body.len())
                        .header("x-body-sum", checksum(&body))
                        .body(full(name))
                        .expect("response")
                }
            })
            .await;
        apps.push(app);
    }
    Flaky {
        mesh,
        client,
        vip,
        _apps: apps,
        tries,
    }
}

fn checksum(b: &Bytes) -> u64 {
    b.iter()
        .fold(0u64, |a, x| a.wrapping_mul(31).wrapping_add(u64::from(*x)))
}

impl Flaky {
    pub async fn conn(&self) -> H1 {
        self.mesh
            .h1(&self.client, SocketAddr::new(self.vip, PORT))
            .await
    }

    pub fn tries(&self) -> Vec<usize> {
        self.tries
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .collect()
    }

    fn total_tries(&self) -> usize {
        self.tries().iter().sum()
    }

    pub fn n1(&self) -> &Node {
        self.mesh.node("n1")
    }
}

const ROUND_ROBIN: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: flaky, namespace: mesh}
spec:
  host: flaky
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"#;

pub(super) fn vs(http: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: flaky, namespace: mesh}}
spec:
  hosts: [flaky]
  http:
{http}"#
    )
}

/// Istio VirtualService `timeout` (task "Request timeouts"): an answer slower than the route's
/// timeout is replaced by 504 with flag `UT` once the timeout has passed, before the app answers.
/// By the source-side relay (the request has no body) and by the full server alike.
#[tokio::test]
async fn a_route_timeout_answers_504_ut_when_it_passes() {
    route_timeout(true).await;
}

#[tokio::test]
async fn a_route_timeout_answers_504_ut_when_it_passes_without_the_relay() {
    route_timeout(false).await;
}

async fn route_timeout(relay: bool) {
    let f = flaky_relayed(
        &[Behaviour::Slow(Duration::from_secs(3))],
        &vs("  - timeout: 0.5s\n    route: [{destination: {host: flaky}}]"),
        relay,
    )
    .await;
    let mut conn = f.conn().await;
    let started = Instant::now();
    let reply = conn
        .get("flaky", "/slow", &[("x-request-id", "timeout-1")])
        .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.text(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(500),
        "{took:?}: not before the timeout"
    );
    assert!(
        took < Duration::from_secs(3),
        "{took:?}: before the app answered"
    );
    let line = f.n1().wait_log(&[("request_id", "timeout-1")]).await;
    assert_eq!(line["response_flags"], "UT", "{line:#}");
    assert_eq!(line["response_code_details"], "upstream_response_timeout");
    assert_eq!(f.n1().count(|c| &c.http_timeouts), 1);
    assert_eq!(
        f.n1().count(|c| &c.http_outbound_relayed),
        u64::from(relay),
        "relayed"
    );
}

/// The same over HTTP/2 from the app: a request without a body is the relay's too
/// (`passthrough::source::stream`), and the timeout is answered on its stream.
#[tokio::test]
async fn a_route_timeout_answers_504_ut_on_an_http2_stream_of_the_relay() {
    let f = flaky(
        &[Behaviour::Slow(Duration::from_secs(3))],
        &vs("  - timeout: 0.5s\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    let conn = f.mesh.h2(&f.client, SocketAddr::new(f.vip, PORT)).await;
    let started = Instant::now();
    let reply = conn
        .get("flaky", "/slow", &[("x-request-id", "timeout-h2")])
        .await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let line = f.n1().wait_log(&[("request_id", "timeout-h2")]).await;
    assert_eq!(line["response_flags"], "UT", "{line:#}");
    assert_eq!(line["protocol"], "HTTP/2", "{line:#}");
    assert_eq!(f.n1().count(|c| &c.http_outbound_relayed), 1);
    assert_eq!(f.n1().count(|c| &c.http_timeouts), 1);
}

/// Istio `HTTPRetry` reference example: 50% of tries fail with 503; `attempts: 3` with
/// `retryOn: 5xx` makes up to four tries, so a request fails only when all four do.
#[tokio::test]
async fn retries_on_5xx_turn_half_failing_endpoints_into_successes() {
    let f = flaky(
        &[Behaviour::FailEveryOther, Behaviour::FailEveryOther],
        &vs("  - retries: {attempts: 3, retryOn: 5xx}\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    let mut conn = f.conn().await;
    let n = 200;
    let mut ok = 0;
    for i in 0..n {
        let before = f.total_tries();
        let reply = conn.get("flaky", &format!("/r/{i}"), &[]).await;
        let tries = f.total_tries() - before;
        assert!((1..=4).contains(&tries), "request {i}: {tries} tries");
        if reply.status == 200 {
            ok += 1;
        } else {
            assert_eq!(tries, 4, "a failure was tried four times");
        }
    }
    // Each endpoint alternates fail/ok, and a retry goes to the other endpoint first: far more
    // than 90% succeed.
    assert!(ok >= n * 9 / 10, "{ok} of {n} succeeded");
    assert!(f.n1().count(|c| &c.http_retries) > 0);
}

/// `attempts: 0` disables retries (Istio), so half the requests fail.
#[tokio::test]
async fn attempts_zero_sends_each_request_once() {
    let f = flaky(
        &[Behaviour::FailEveryOther],
        &vs("  - retries: {attempts: 0}\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    let mut conn = f.conn().await;
    let mut failed = 0;
    for i in 0..40 {
        if conn.get("flaky", &format!("/{i}"), &[]).await.status == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 20, "every other request fails, none retried");
    assert_eq!(f.total_tries(), 40);
    assert_eq!(f.n1().count(|c| &c.http_retries), 0);
}

/// Istio's default retry policy (a route without `retries`, and a Service without any
/// VirtualService): 503 is retried, twice at most, on another endpoint.
#[tokio::test]
async fn the_default_policy_retries_503_on_another_endpoint() {
    for yaml in [
        vs("  - route: [{destination: {host: flaky}}]"),
        String::new(),
    ] {
        let f = flaky(&[Behaviour::Fail, Behaviour::Ok], &yaml).await;
        let mut conn = f.conn().await;
        for i in 0..20 {
            let reply = conn.get("flaky", &format!("/{i}"), &[]).await;
            assert_eq!(reply.status, 200, "retried to the healthy endpoint");
            assert_eq!(reply.header("x-app"), "flaky-1");
        }
        // A request whose first try went to the failing pod is retried once, on the other pod
        // (previous hosts are avoided); the others were tried once.
        let tries = f.tries();
        assert_eq!(tries[1], 20, "{tries:?}");
        assert!(tries[0] >= 1, "the failing pod was tried: {tries:?}");
        assert_eq!(f.n1().count(|c| &c.http_retries), tries[0] as u64);

        // Where every endpoint fails, a request gets three tries (two retries) and URX.
        let all_fail = flaky(&[Behaviour::Fail], &yaml).await;
        let mut conn = all_fail.conn().await;
        let reply = conn.get("flaky", "/", &[("x-request-id", "urx")]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(all_fail.total_tries(), 3);
        let line = all_fail.n1().wait_log(&[("request_id", "urx")]).await;
        assert_eq!(line["response_flags"], "URX", "{line:#}");
        assert_eq!(line["response_code_details"], "via_upstream");
    }
}

/// `perTryTimeout`: a try slower than it is abandoned and retried (Envoy retries per-try
/// timeouts under `5xx`, `gateway-error` and `reset`), on the other endpoint. By the source-side
/// relay and by the full server alike.
#[tokio::test]
async fn a_per_try_timeout_moves_the_request_to_another_endpoint() {
    per_try_timeout(true).await;
}

#[tokio::test]
async fn a_per_try_timeout_moves_the_request_to_another_endpoint_without_the_relay() {
    per_try_timeout(false).await;
}

async fn per_try_timeout(relay: bool) {
    let f = flaky_relayed(
        &[Behaviour::Slow(Duration::from_secs(5)), Behaviour::Ok],
        &format!(
            "{}\n---\n{ROUND_ROBIN}",
            vs("  - retries: {attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error}\n    route: [{destination: {host: flaky}}]")
        ),
        relay,
    )
    .await;
    let mut conn = f.conn().await;
    for i in 0..6 {
        let reply = conn.get("flaky", &format!("/{i}"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-app"), "flaky-1");
    }
    assert!(
        f.tries()[0] >= 1,
        "the slow pod got first tries: {:?}",
        f.tries()
    );
    assert_eq!(
        f.n1().count(|c| &c.http_outbound_relayed),
        if relay { 6 } else { 0 },
        "relayed"
    );
}

/// Request bodies are replayed to a retry whole; a body larger than the replay buffer (Envoy's
/// 1 MiB buffer limit) is sent once and not retried, and still succeeds when nothing fails.
#[tokio::test]
async fn bodies_are_replayed_to_retries_up_to_the_buffer_limit() {
    let f = flaky(
        &[Behaviour::Fail, Behaviour::Ok],
        &vs("  - retries: {attempts: 1, retryOn: 5xx}\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    let mut conn = f.conn().await;
    let body = Bytes::from((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    for _ in 0..4 {
        let req = Request::post("/upload")
            .header("host", "flaky")
            .body(full(body.clone()))
            .unwrap();
        let reply = conn.call(req).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-body-len"), body.len().to_string());
        assert_eq!(reply.header("x-body-sum"), checksum(&body).to_string());
    }

    // Over the limit: sent once, to whichever endpoint is picked (Istio's default LEAST_REQUEST
    // picks at random among idle endpoints); the failing pod's 503 stands.
    let big = Bytes::from(vec![7u8; 2 << 20]);
    let mut statuses = Vec::new();
    while !(statuses.contains(&503) && statuses.contains(&200)) {
        assert!(
            statuses.len() < 60,
            "both pods picked in 60 requests: {statuses:?}"
        );
        let before = f.total_tries();
        let req = Request::post("/big")
            .header("host", "flaky")
            .body(full(big.clone()))
            .unwrap();
        let reply = conn.call(req).await;
        if reply.status == 200 {
            assert_eq!(reply.header("x-body-len"), big.len().to_string());
        }
        statuses.push(reply.status.as_u16());
        assert_eq!(f.total_tries() - before, 1, "one try each: {statuses:?}");
    }
}

/// Istio `HTTPFaultInjection.Abort`: `httpStatus: 500` for 50% of requests lands within ±5%
/// over 4,000 requests, with flag `FI`, and the aborted requests never leave the node. (Over
/// 1,000, ±5% is ±3.2 standard deviations: a correct sampler missed it once in the full suite,
/// with 554; over 4,000 it is ±6.3.)
#[tokio::test]
async fn an_abort_for_half_the_requests_lands_within_5_percent() {
    let f = flaky(
        &[Behaviour::Ok],
        &vs("  - fault: {abort: {httpStatus: 500, percentage: {value: 50}}}\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    const REQUESTS: usize = 4_000;
    let mut conn = f.conn().await;
    let mut aborted = 0;
    for i in 0..REQUESTS {
        let reply = conn.get("flaky", &format!("/{i}"), &[]).await;
        match reply.status.as_u16() {
            500 => {
                assert_eq!(reply.text(), "fault filter abort");
                aborted += 1;
            }
            200 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (REQUESTS * 45 / 100..=REQUESTS * 55 / 100).contains(&aborted),
        "{aborted} of {REQUESTS} aborted"
    );
    assert_eq!(f.total_tries(), REQUESTS - aborted);
    assert_eq!(f.n1().count(|c| &c.http_fault_aborts), aborted as u64);
    f.n1()
        .wait_metric(
            "istio_requests_total",
            &[("response_code", "500"), ("response_flags", "FI")],
            aborted as u64,
        )
        .await;
}

/// Istio's bookinfo `virtual-service-ratings-test-delay` shape: a delay for one user (with the
/// deprecated `percent: 100`), none for the others; the delayed request is flagged `DI`.
#[tokio::test]
async fn a_delay_applies_to_the_matched_user_only() {
    let f = flaky(
        &[Behaviour::Ok],
        &vs(r#"  - match: [{headers: {end-user: {exact: jason}}}]
    fault: {delay: {percent: 100, fixedDelay: 700ms}}
    route: [{destination: {host: flaky}}]
  - route: [{destination: {host: flaky}}]"#),
    )
    .await;
    let mut conn = f.conn().await;
    let started = Instant::now();
    let reply = conn
        .get(
            "flaky",
            "/",
            &[("end-user", "jason"), ("x-request-id", "jason")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(700));
    let line = f.n1().wait_log(&[("request_id", "jason")]).await;
    assert_eq!(line["response_flags"], "DI", "{line:#}");
    let reply = conn.get("flaky", "/", &[("x-request-id", "bob")]).await;
    assert_eq!(reply.status, 200);
    let line = f.n1().wait_log(&[("request_id", "bob")]).await;
    assert_eq!(line["response_flags"], "-", "{line:#}");
    assert_eq!(f.n1().count(|c| &c.http_fault_delays), 1);
}

/// A gRPC abort answers as gRPC does: HTTP 200 with the configured `grpc-status`.
#[tokio::test]
async fn a_grpc_abort_returns_the_grpc_status() {
    let f = flaky(
        &[Behaviour::Ok],
        &vs("  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}\n    route: [{destination: {host: flaky}}]"),
    )
    .await;
    let mut conn = f.conn().await;
    let reply = conn
        .get(
            "flaky",
            "/pkg.Svc/Method",
            &[("content-type", "application/grpc")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("grpc-status"), "14");
    assert_eq!(f.total_tries(), 0);
}

/// Istio task "Mirroring": every request to v1 is copied to the mirror with `-shadow` on the
/// authority's host; the mirror's answer is discarded, and a dead mirror changes nothing for the
/// primary.
#[tokio::test]
async fn mirrored_requests_reach_the_mirror_as_shadow_and_a_dead_mirror_harms_nothing() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let v1 = world
        .pod("web-v1")
        .node("n2")
        .app("web")
        .label("version", "v1")
        .add();
    let v2 = world
        .pod("web-v2")
        .node("n3")
        .app("web")
        .label("version", "v2")
        .add();
    let dead = world.pod("dead").node("n3").app("dead").add();
    let vip = world
        .service("web")
        .named_port("http", PORT, PORT)
        .backends(&[&v1, &v2])
        .add();
    world
        .service("dead")
        .named_port("http", PORT, PORT)
        .backends(&[&dead])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: v1}, weight: 100}]
    mirror: {host: web, subset: v2}
    mirrors:
    - destination: {host: dead}
"#,
    );
    let mesh = world.start().await;
    let app1 = mesh.http_app(v1.addr(PORT), "web-v1").await;
    let app2 = mesh.http_app(v2.addr(PORT), "web-v2").await;
    // No app on `dead`: its copies fail to connect.
    let mut conn = mesh.h1(&client, SocketAddr::new(vip, PORT)).await;
    for i in 0..50 {
        let req = Request::post(format!("/m/{i}"))
            .header("host", "web:8080")
            .body(full(format!("body {i}")))
            .unwrap();
        let reply = conn.call(req).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-app"), "web-v1", "v1 serves every response");
    }
    assert_eq!(app1.requests(), 50);
    eventually("the mirror has every copy", || app2.requests() == 50).await;
    for seen in app2.seen() {
        assert_eq!(seen.authority, "web-shadow:8080");
        assert!(seen.path.starts_with("/m/"));
    }
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.http_mirrored), 100);
    eventually("the dead mirror's copies failed", || {
        n1.count(|c| &c.http_mirror_failed) == 50
    })
    .await;
}

/// `mirrorPercentage` copies that share of requests (±5 points over 4,000).
#[tokio::test]
async fn mirror_percentage_copies_that_share() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let v1 = world
        .pod("web-v1")
        .node("n2")
        .app("web")
        .label("version", "v1")
        .add();
    let v2 = world
        .pod("web-v2")
        .node("n3")
        .app("web")
        .label("version", "v2")
        .add();
    let vip = world
        .service("web")
        .named_port("http", PORT, PORT)
        .backends(&[&v1, &v2])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: v1}}]
    mirror: {host: web, subset: v2}
    mirrorPercentage: {value: 50.0}
"#,
    );
    let mesh = world.start().await;
    let _app1 = mesh.http_app(v1.addr(PORT), "web-v1").await;
    let app2 = mesh.http_app(v2.addr(PORT), "web-v2").await;
    let mut conn = mesh.h1(&client, SocketAddr::new(vip, PORT)).await;
    // ±5% of 4,000 is ±6.3 standard deviations of a fair sampler (of 1,000 it was ±3.2).
    const REQUESTS: u64 = 4_000;
    for i in 0..REQUESTS {
        assert_eq!(conn.get("web", &format!("/{i}"), &[]).await.status, 200);
    }
    let n1 = mesh.node("n1");
    let copies = n1.count(|c| &c.http_mirrored);
    assert!(
        (REQUESTS * 45 / 100..=REQUESTS * 55 / 100).contains(&copies),
        "{copies} of {REQUESTS} mirrored"
    );
    eventually("every copy arrived", || app2.requests() as u64 == copies).await;
}

/// Istio task "Circuit breaking": `maxConnections: 1`, `http1MaxPendingRequests: 1`,
/// `maxRequestsPerConnection: 1`; 2 concurrent clients × 20 requests see some 503 `UO`, 3
/// concurrent clients a larger share (one connection busy, one request waiting, the third
/// refused at once); the overflows are in `/metrics`.
#[tokio::test]
async fn circuit_breaking_refuses_more_as_concurrency_grows() {
    let yaml = format!(
        "{}\n---\n{}",
        vs("  - retries: {attempts: 0}\n    route: [{destination: {host: flaky}}]"),
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: flaky, namespace: mesh}
spec:
  host: flaky
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
"#
    );
    let f = flaky(&[Behaviour::Slow(Duration::from_millis(20))], &yaml).await;
    let mut shares = Vec::new();
    for clients in [1usize, 2, 3] {
        let results: Vec<Vec<u16>> = futures::future::join_all((0..clients).map(|_| async {
            let mut conn = f.conn().await;
            let mut statuses = Vec::new();
            for i in 0..20 {
                statuses.push(
                    conn.get("flaky", &format!("/{i}"), &[])
                        .await
                        .status
                        .as_u16(),
                );
            }
            statuses
        }))
        .await;
        let all: Vec<u16> = results.into_iter().flatten().collect();
        assert!(all.iter().all(|s| *s == 200 || *s == 503), "{all:?}");
        let refused = all.iter().filter(|s| **s == 503).count();
        shares.push(refused as f64 / all.len() as f64);
    }
    assert_eq!(shares[0], 0.0, "one client never overflows: {shares:?}");
    assert!(
        shares[2] > 0.2,
        "3 clients: one of three is refused: {shares:?}"
    );
    assert!(
        shares[2] > shares[1],
        "more concurrency, more refused: {shares:?}"
    );
    let m = f.n1().metrics();
    let pending = m
        .value(
            "ambit_http_pool_overflow_total",
            &[("limit", "http1MaxPendingRequests")],
        )
        .unwrap_or(0);
    assert!(
        pending > 0,
        "{}",
        lines_with(&m, "ambit_http_pool_overflow")
    );
    // The access log is written by its own thread: wait for a refused request's line.
    let n1 = f.n1();
    eventually("a refused request is logged", || {
        n1.access_log().iter().any(|l| l["response_code"] == 503)
    })
    .await;
    let line = n1
        .access_log()
        .into_iter()
        .find(|l| l["response_code"] == 503)
        .expect("a refused request is logged");
    assert_eq!(line["response_flags"], "UO", "{line:#}");
}
