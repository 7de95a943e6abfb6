//! DestinationRule `outlierDetection` on the request path (Istio's reference, Envoy's outlier
//! detection): three `flaky` endpoints, one failing; what the detector learns from each try
//! decides which endpoints later requests go to.

use std::time::{Duration, Instant};

use super::http_resilience::{flaky, vs, Behaviour};

fn outlier(settings: &str) -> String {
    format!(
        "{}\n---\n{}",
        vs("  - retries: {attempts: 0}\n    route: [{destination: {host: flaky}}]"),
        format_args!(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaky, namespace: mesh}}
spec:
  host: flaky
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {settings}
"#
        )
    )
}

/// consecutive5xxErrors ejects the failing endpoint at once (not at the interval); while
/// ejected it gets no request; it returns once baseEjectionTime has passed, and a second ejection
/// lasts twice as long (baseEjectionTime × times ejected).
#[tokio::test]
async fn a_failing_endpoint_is_ejected_returns_and_stays_out_longer_the_second_time() {
    let base = Duration::from_millis(600);
    let f = flaky(
        &[Behaviour::Ok, Behaviour::Ok, Behaviour::Fail],
        &outlier("{consecutive5xxErrors: 3, interval: 300ms, baseEjectionTime: 600ms, maxEjectionPercent: 100}"),
    )
    .await;
    let mut conn = f.conn().await;
    for round in 1..=2u32 {
        // Until the bad endpoint has failed three times in a row since it was let in (in round
        // 2, the request it came back on was the first of them).
        let start = f.tries()[2];
        let more = if round == 1 { 3 } else { 2 };
        while f.tries()[2] < start + more {
            let _ = conn.get("flaky", "/", &[]).await;
        }
        let ejected_at = Instant::now();
        let ejections = f.n1().pi.balancers.ejections();
        let ejected: Vec<_> = ejections.iter().flat_map(|c| &c.ejected).collect();
        assert_eq!(
            ejected.len(),
            1,
            "round {round} at {:?}: {ejections:?}",
            f.tries()
        );
        assert_eq!(ejected[0].ejections, round, "{ejections:?}");
        // While ejected, every request goes to the two healthy endpoints.
        let seen = f.tries()[2];
        loop {
            let reply = conn.get("flaky", "/", &[]).await;
            if f.tries()[2] > seen {
                break;
            }
            assert_eq!(
                reply.status, 200,
                "only healthy endpoints answer while it is out"
            );
            assert!(
                ejected_at.elapsed() < Duration::from_secs(60),
                "the ejected endpoint never came back"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let out_for = ejected_at.elapsed();
        assert!(
            out_for >= base * round,
            "ejection {round} lasted {out_for:?}, at least {:?} expected",
            base * round
        );
    }
    f.n1()
        .wait_metric(
            "ambit_outlier_ejections_total",
            &[("detector", "consecutive_5xx")],
            2,
        )
        .await;
}

/// maxEjectionPercent caps what is ejected: with every endpoint failing and 50%, Envoy ejects
/// one of three (a second would make 67%).
#[tokio::test]
async fn max_ejection_percent_caps_the_ejections_when_all_fail() {
    let f = flaky(
        &[Behaviour::Fail, Behaviour::Fail, Behaviour::Fail],
        &outlier("{consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 50}"),
    )
    .await;
    let mut conn = f.conn().await;
    for _ in 0..30 {
        assert_eq!(conn.get("flaky", "/", &[]).await.status, 503);
    }
    let ejections = f.n1().pi.balancers.ejections();
    let ejected: usize = ejections.iter().map(|c| c.ejected.len()).sum();
    assert_eq!(ejected, 1, "{ejections:?}");
    let tries = f.tries();
    assert_eq!(tries.iter().filter(|t| **t > 2).count(), 2, "{tries:?}");
}

/// Envoy's route timeout spans the whole response: a body still streaming when it passes is cut
/// (the app's stream fails after the headers it already has), flag `UT`. By the source-side
/// relay and by the full server alike.
#[tokio::test]
async fn a_route_timeout_cuts_a_response_body_still_streaming() {
    route_timeout_cuts(true).await;
}

#[tokio::test]
async fn a_route_timeout_cuts_a_response_body_still_streaming_without_the_relay() {
    route_timeout_cuts(false).await;
}

async fn route_timeout_cuts(relay: bool) {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;

    use super::fixture::*;

    let mut world = World::new();
    if !relay {
        world.no_source_relay();
    }
    let client = world.pod("client").node("n1").add();
    let server = world.pod("stream").node("n2").app("stream").add();
    let vip = world
        .service("stream")
        .named_port("http", 8080, 8080)
        .backends(&[&server])
        .add();
    world.yaml(&vs_for(
        "stream",
        "  - timeout: 1s\n    route: [{destination: {host: stream}}]",
    ));
    let mesh = world.start().await;
    let _app = mesh
        .http_app_with(server.addr(8080), "stream", |_req| async {
            // A chunk every 200 ms for 10 s: headers at once, the body far past the timeout.
            let chunks = futures::stream::unfold(0u32, |i| async move {
                (i < 50).then_some(())?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))),
                    i + 1,
                ))
            });
            http::Response::new(http_body_util::StreamBody::new(chunks).boxed())
        })
        .await;
    let mut conn = mesh.h1(&client, std::net::SocketAddr::new(vip, 8080)).await;
    let started = Instant::now();
    let resp = conn
        .send(get("/", &[("host", "stream"), ("x-request-id", "cut")]))
        .await;
    assert_eq!(resp.status(), 200, "the headers came before the timeout");
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "the body was cut, not ended as if complete");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cut before the app's end"
    );
    let line = mesh.node("n1").wait_log(&[("request_id", "cut")]).await;
    assert_eq!(line["response_flags"], "UT", "{line:#}");
    assert_eq!(
        mesh.node("n1").count(|c| &c.http_outbound_relayed),
        u64::from(relay),
        "relayed"
    );
}

fn vs_for(host: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: mesh}}\nspec:\n  hosts: [{host}]\n  http:\n{http}"
    )
}

/// DestinationRule `connectionPool.http.maxConcurrentStreams`: an HTTP/2 upstream connection
/// carries at most that many requests at once; more open another connection (Istio's default,
/// 2^31−1, keeps one).
#[tokio::test]
async fn max_concurrent_streams_opens_another_http2_connection() {
    use super::fixture::*;

    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("h2").node("n2").app("h2").add();
    let vip = world
        .service("h2")
        .named_port("http2", 8080, 8080)
        .backends(&[&server])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: h2, namespace: mesh}
spec:
  host: h2
  trafficPolicy:
    connectionPool:
      http: {maxConcurrentStreams: 10}
"#,
    );
    let mesh = world.start().await;
    let app = mesh
        .http_app_with(server.addr(8080), "h2", |_req| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            http::Response::new(full("ok"))
        })
        .await;
    let conn = mesh.h2(&client, std::net::SocketAddr::new(vip, 8080)).await;
    let replies = futures::future::join_all((0..30).map(|i| {
        let conn = &conn;
        async move { conn.get("h2", &format!("/{i}"), &[]).await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == 200));
    assert!(
        app.seen()
            .iter()
            .all(|s| s.version == http::Version::HTTP_2),
        "HTTP/2 upstream"
    );
    assert!(
        app.connections() >= 3,
        "30 concurrent requests at 10 streams per connection: {} connections",
        app.connections()
    );
}
