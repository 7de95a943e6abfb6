//! Source-side HTTP/1.1 relayed as bytes (`http::passthrough::source`): a routed request goes out
//! as the head the client's node writes, on upstream connections it pools per endpoint, with the
//! route's edits, and comes back as the upstream's bytes; what the relay leaves (a body, a reply
//! made here) goes to the full server with the connection, and a reply the relay makes itself
//! keeps the connection. An HTTP/2 app's requests without a body go out the same way
//! (`passthrough::source::stream`), their responses read into the app's streams.

use std::net::SocketAddr;

use super::fixture::*;

const YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: web, subset: v2}}]
  - name: nowhere
    match: [{headers: {x-to: {exact: v3}}}]
    route: [{destination: {host: web, subset: v3}}]
  - name: default
    match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new}
    headers: {request: {set: {x-route: default}}}
    route: [{destination: {host: web, subset: v1}}]
  - name: rest
    route: [{destination: {host: web, subset: v1}}]
"#;

/// A client on n1; `web` v1 on n2 and v2 on n3 (no v3), behind Service `web` (port 80, `http`, to
/// 8080), each app answering `<pod> <path>`.
async fn web_mesh() -> (Mesh, Pod, SocketAddr, Vec<HttpApp>) {
    web_mesh_with(YAML).await
}

/// [`web_mesh`] with `yaml` for its routes.
async fn web_mesh_with(yaml: &str) -> (Mesh, Pod, SocketAddr, Vec<HttpApp>) {
    let mut world = World::new();
    world.no_access_log();
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
        .named_port("http", 80, 8080)
        .backends(&[&v1, &v2])
        .add();
    world.yaml(yaml);
    let mesh = world.start().await;
    let apps = vec![
        mesh.http_app(v1.addr(8080), "web-v1").await,
        mesh.http_app(v2.addr(8080), "web-v2").await,
    ];
    (mesh, client, SocketAddr::new(vip, 80), apps)
}

/// A client on n1 and one `web` pod on n2 (no app yet) behind Service `web` (port 80, `http`, to
/// 8080), the client node's relay on or off (`relay`): (mesh, client, the pod, the Service).
async fn one_pod_mesh(relay: bool) -> (Mesh, Pod, Pod, SocketAddr) {
    let mut world = World::new();
    world.no_access_log();
    if !relay {
        world.no_source_relay();
    }
    let client = world.pod("client").node("n1").add();
    let v1 = world.pod("web-v1").node("n2").app("web").add();
    let vip = world
        .service("web")
        .named_port("http", 80, 8080)
        .backends(&[&v1])
        .add();
    (world.start().await, client, v1, SocketAddr::new(vip, 80))
}

/// An app on `pod`'s port 8080 that answers 503, 503, then 200, each body `try <n>`.
async fn fails_twice(mesh: &Mesh, pod: &Pod) -> HttpApp {
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    mesh.http_app_with(pod.addr(8080), &pod.name, move |_req| {
        let n = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let status = if n < 2 { 503 } else { 200 };
            http::Response::builder()
                .status(status)
                .body(full(format!("try {n}")))
                .expect("response")
        }
    })
    .await
}

#[tokio::test]
async fn routed_requests_are_relayed_with_the_routes_edits_on_pooled_connections() {
    let (mesh, client, web, apps) = web_mesh().await;
    let n1 = mesh.node("n1");
    let mut conn = mesh.h1(&client, web).await;
    for _ in 0..10 {
        let r = conn.get("web", "/p", &[("end-user", "jason")]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "web-v2 /p"));
        let r = conn.get("web", "/old/x?q=1", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "web-v1 /new/x")
        );
    }
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 20);
    assert_eq!(n1.count(|c| &c.http_requests), 20);
    // One upstream connection per endpoint, each reused by every request after its first.
    assert_eq!(n1.pi.upstreams.opened(), 2);
    // The last response's connection goes back to the pool after its bytes went to the app.
    eventually("both upstream connections pooled", || {
        n1.pi.upstreams.connections() == 2
    })
    .await;
    assert_eq!(apps[0].connections() + apps[1].connections(), 2);

    // The app saw the request as the full server would send it: rewritten, edited, with the
    // scheme and an id, without the hop-by-hop header.
    let seen = apps[0].last();
    assert_eq!(seen.path, "/new/x?q=1");
    assert_eq!(seen.authority, "web");
    assert_eq!(seen.headers["x-route"], "default");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert!(seen.headers.contains_key("x-request-id"));
    let jason = apps[1].last();
    assert!(!jason.headers.contains_key("x-route"));
    assert_eq!(jason.headers["end-user"], "jason");

    let at = |workload: &'static str| {
        [
            ("reporter", "source"),
            ("response_code", "200"),
            ("destination_workload", workload),
            ("response_flags", "-"),
        ]
    };
    n1.wait_metric("istio_requests_total", &at("web-v1"), 10)
        .await;
    n1.wait_metric("istio_requests_total", &at("web-v2"), 10)
        .await;
}

#[tokio::test]
async fn a_request_the_relay_leaves_takes_the_connection_to_the_full_server() {
    let (mesh, client, web, _apps) = web_mesh().await;
    let n1 = mesh.node("n1");
    let mut conn = mesh.h1(&client, web).await;
    let r = conn.get("web", "/first", &[]).await;
    assert_eq!(r.text(), "web-v1 /first");
    // A body: the full server's, and so is every request after it on the connection.
    let mut upload = get("/upload", &[("host", "web")]);
    *upload.method_mut() = http::Method::POST;
    *upload.body_mut() = full("abcdefghij");
    let r = conn.call(upload).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "web-v1 /upload")
    );
    let r = conn.get("web", "/after", &[("end-user", "jason")]).await;
    assert_eq!(r.text(), "web-v2 /after");
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 1);
    assert_eq!(n1.count(|c| &c.http_requests), 3);
    for (workload, n) in [("web-v1", 2), ("web-v2", 1)] {
        n1.wait_metric(
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("response_code", "200"),
                ("destination_workload", workload),
            ],
            n,
        )
        .await;
    }
}

#[tokio::test]
async fn no_healthy_upstream_is_answered_by_the_relay_on_a_connection_that_goes_on() {
    let (mesh, client, web, _apps) = web_mesh().await;
    let n1 = mesh.node("n1");
    let mut conn = mesh.h1(&client, web).await;
    let r = conn.get("web", "/v3", &[("x-to", "v3")]).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (503, "no healthy upstream")
    );
    let r = conn.get("web", "/v1", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "web-v1 /v1"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 2);
    assert_eq!(n1.count(|c| &c.http_local_replies), 1);
    n1.wait_metric(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("response_code", "503"),
            ("response_flags", "UH"),
        ],
        1,
    )
    .await;
}

/// With `--source-relay=false` every request is the full server's (the same answers).
#[tokio::test]
async fn the_relay_turned_off_serves_every_request_with_the_full_server() {
    let (mesh, client, v1, web) = one_pod_mesh(false).await;
    let _app = mesh.http_app(v1.addr(8080), "web-v1").await;
    let mut conn = mesh.h1(&client, web).await;
    let r = conn.get("web", "/a", &[]).await;
    assert_eq!(r.text(), "web-v1 /a");
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.http_requests), 1);
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 0);
}

/// A route whose destinations differ in what the relay can do (one edits the response) is the
/// full server's for every request, whichever destination its weights draw: a request the relay
/// left after the draw would be drawn again there, and the split would lean towards the
/// destinations the relay takes.
#[tokio::test]
async fn a_route_with_a_destination_the_relay_cannot_serve_is_left_whole_to_the_full_server() {
    let yaml = r#"
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
  - route:
    - {destination: {host: web, subset: v1}, weight: 50}
    - destination: {host: web, subset: v2}
      weight: 50
      headers: {response: {set: {x-canary: "1"}}}
"#;
    let (mesh, client, web, _apps) = web_mesh_with(yaml).await;
    let n1 = mesh.node("n1");
    let mut v2 = 0;
    // A connection per request: each is routed from its first request.
    for _ in 0..40 {
        let mut conn = mesh.h1(&client, web).await;
        let r = conn.get("web", "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.text().starts_with("web-v2") {
            assert_eq!(r.header("x-canary"), "1");
            v2 += 1;
        }
    }
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 0);
    // 50 % of 40, within five standard deviations (about 3.2 each).
    assert!((4..=36).contains(&v2), "v2 got {v2} of 40");
}

/// A retried response (Istio's default policy retries a 503 twice) is read to its end during the
/// back-off, and its connection carries the next try, as Envoy keeps an HTTP/1.1 connection
/// whose retried response was whole: the retries open no connection and end no HBONE stream
/// (which the destination would record as TCP bytes).
#[tokio::test]
async fn a_retried_response_is_read_through_and_its_connection_carries_the_next_try() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let app = fails_twice(&mesh, &v1).await;
    let n1 = mesh.node("n1");
    let mut conn = mesh.h1(&client, web).await;
    let r = conn.get("web", "/", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "try 2"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 1);
    assert_eq!(n1.count(|c| &c.http_retries), 2);
    assert_eq!(app.requests(), 3);
    assert_eq!(app.connections(), 1);
    assert_eq!(n1.pi.upstreams.opened(), 1);
}

/// A response the relay sends on after its node began to drain says `connection: close`, as
/// hyper's draining server's do, and the app's connection ends after it: the app sends its next
/// request on a new connection rather than racing the close.
#[tokio::test]
async fn a_response_relayed_while_draining_says_connection_close_and_ends_the_connection() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let release = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    let app = {
        let release = release.clone();
        mesh.http_app_with(v1.addr(8080), "web-v1", move |_req| {
            let release = release.clone();
            async move {
                // Each answer takes a permit: the second waits for the test's.
                release.acquire().await.expect("semaphore").forget();
                http::Response::new(full("ok"))
            }
        })
        .await
    };
    let n1 = mesh.node("n1");
    let mut conn = mesh.h1(&client, web).await;
    let r = conn.get("web", "/before", &[]).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.headers.get("connection").is_none(), "{:?}", r.headers);

    let second = tokio::spawn(async move {
        let r = conn.get("web", "/during", &[]).await;
        (r, conn)
    });
    eventually("the second request at the app", || app.requests() == 2).await;
    n1.pi.drain.start();
    release.add_permits(1);
    let (r, conn) = second.await.expect("request task");
    assert_eq!(
        (r.status.as_u16(), r.text().as_str(), r.header("connection")),
        (200, "ok", "close")
    );
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 2);
    eventually("the app's connection closed", || conn.driver.is_finished()).await;
}

/// An HTTP/2 app's requests without a body are sent as the relay's HTTP/1.1 heads on pooled
/// upstream connections (one for ten requests here), with the route's edits, and each upstream
/// response is the stream's response; a request with a body is `forward`'s.
#[tokio::test]
async fn an_http2_apps_requests_without_a_body_are_relayed_on_pooled_connections() {
    let (mesh, client, web, apps) = web_mesh().await;
    let n1 = mesh.node("n1");
    let conn = mesh.h2(&client, web).await;
    for _ in 0..10 {
        let r = conn.get("web", "/old/x?q=1", &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "web-v1 /new/x")
        );
        assert_eq!(r.header("x-app"), "web-v1");
    }
    let r = conn.get("web", "/p", &[("end-user", "jason")]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "web-v2 /p"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 11);
    assert_eq!(n1.pi.upstreams.opened(), 2);
    assert_eq!(apps[0].connections(), 1);
    let seen = apps[0].last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.path, "/new/x?q=1");
    assert_eq!(seen.authority, "web");
    assert_eq!(seen.headers["x-route"], "default");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");

    // With a body: the full path's (the same answer).
    let mut upload = get("http://web/upload", &[]);
    *upload.method_mut() = http::Method::POST;
    *upload.body_mut() = full("abcdefghij");
    let r = conn.call(upload).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "web-v1 /upload")
    );
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 11);
    n1.wait_metric(
        "istio_requests_total",
        &[
            ("reporter", "source"),
            ("response_code", "200"),
            ("destination_workload", "web-v1"),
        ],
        11,
    )
    .await;
}

/// 100 requests at once on one HTTP/2 connection: each stream is relayed and answered with its
/// own response.
#[tokio::test]
async fn concurrent_http2_streams_are_relayed_each_with_its_own_response() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let _app = mesh.http_app(v1.addr(8080), "web-v1").await;
    let conn = std::sync::Arc::new(mesh.h2(&client, web).await);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { (i, conn.get("web", &format!("/s/{i}"), &[]).await) })
        })
        .collect();
    for task in tasks {
        let (i, r) = task.await.expect("request task");
        assert_eq!(
            (r.status.as_u16(), r.text()),
            (200, format!("web-v1 /s/{i}"))
        );
    }
    assert_eq!(mesh.node("n1").count(|c| &c.http_outbound_relayed), 100);
}

/// Every framing of an HTTP/1.1 response reaches an HTTP/2 app through the stream relay: chunked
/// (its data, and its trailer as the stream's trailers), HEAD with its length, 204, an
/// informational response first (left out), a head split over writes, a body until the close,
/// and an upstream that closed its pooled connection while it was idle.
#[tokio::test]
async fn every_http1_framing_reaches_an_http2_app_through_the_stream_relay() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let app = super::http_passthrough::serve_raw(&mesh, &v1).await;
    let n1 = mesh.node("n1");
    let conn = mesh.h2(&client, web).await;
    let req = |path: &str| get(&format!("http://web{path}"), &[]);

    let resp = conn.send(req("/chunked")).await;
    assert_eq!(resp.status(), 200);
    let collected = within(
        "the chunked body",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["x-trailer"], "t");
    assert_eq!(&collected.to_bytes()[..], b"hello world");

    let mut head = req("/head");
    *head.method_mut() = http::Method::HEAD;
    let r = conn.call(head).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, ""));
    assert_eq!(r.header("content-length"), "1234");
    let r = conn.call(req("/nocontent")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (204, ""));
    assert_eq!(r.header("x-raw"), "1");
    let r = conn.call(req("/early")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    let r = conn.call(req("/split")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello"));
    let r = conn.call(req("/idle-close")).await;
    assert_eq!(r.text(), "bye");
    let r = conn.call(req("/after")).await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "GET /after 0")
    );
    let r = conn.call(req("/eof")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "until-close"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 8);
    // Each response as the full path counts it at the source: its headers once hop-by-hop ones
    // are dropped, as `name: value\r\n`, and its data.
    let at = [("reporter", "source"), ("response_code", "200")];
    n1.wait_metric("istio_requests_total", &at, 7).await;
    // /chunked 0 + 11, HEAD /head 22 + 0, /early 19 + 2, /split 19 + 5, /idle-close 19 + 3,
    // /after 20 + 12, /eof 0 + 11.
    // Waited on itself (exactly 143): the sizes are recorded with the count, not before it.
    n1.wait_metric("istio_response_bytes_sum", &at, 143).await;
    app.abort();
}

/// An upstream that closes in the middle of a relayed response's body: the app's stream is reset
/// (never ended as if whole), the request is recorded with flag `UR`, and the app's connection
/// goes on to its next request.
#[tokio::test]
async fn a_body_cut_short_upstream_resets_the_apps_stream_and_is_recorded_ur() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let app = super::http_passthrough::serve_raw(&mesh, &v1).await;
    let n1 = mesh.node("n1");
    let conn = mesh.h2(&client, web).await;
    let resp = conn.send(get("http://web/short", &[])).await;
    assert_eq!(resp.status(), 200);
    let body = within(
        "the cut body",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(body.is_err(), "a cut body ended as if whole");
    let r = conn.get("web", "/next", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "GET /next 0"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 2);
    n1.wait_metric(
        "istio_requests_total",
        &[("reporter", "source"), ("response_flags", "UR")],
        1,
    )
    .await;
    app.abort();
}

/// Istio's default retry policy over an HTTP/2 app's relayed request: the 503s are retried, each
/// read through during the back-off, and the one upstream connection carries all three tries.
#[tokio::test]
async fn an_http2_apps_request_is_retried_by_the_relay_on_one_upstream_connection() {
    let (mesh, client, v1, web) = one_pod_mesh(true).await;
    let app = fails_twice(&mesh, &v1).await;
    let n1 = mesh.node("n1");
    let conn = mesh.h2(&client, web).await;
    let r = conn.get("web", "/", &[]).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "try 2"));
    assert_eq!(n1.count(|c| &c.http_outbound_relayed), 1);
    assert_eq!(n1.count(|c| &c.http_retries), 2);
    assert_eq!(app.requests(), 3);
    assert_eq!(app.connections(), 1);
}
