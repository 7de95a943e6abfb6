//! The L7 outbound path end to end in one process: a request to a Service's `http` port is
//! routed by a VirtualService and reaches the chosen pod over HBONE.

use std::net::SocketAddr;

use super::fixture::*;

#[tokio::test]
async fn a_header_route_picks_the_subset() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let v1 = world
        .pod("reviews-v1")
        .node("n2")
        .app("reviews")
        .label("version", "v1")
        .add();
    let v2 = world
        .pod("reviews-v2")
        .node("n2")
        .app("reviews")
        .label("version", "v2")
        .add();
    let vip = world
        .service("reviews")
        .named_port("http", 9080, 9080)
        .backends(&[&v1, &v2])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    );
    let mesh = world.start().await;
    let _a = mesh.http_app(v1.addr(9080), "v1").await;
    let _b = mesh.http_app(v2.addr(9080), "v2").await;
    let mut conn = mesh.h1(&client, SocketAddr::new(vip, 9080)).await;
    for (user, want) in [
        ("jason", "v2 /reviews/1"),
        ("bob", "v1 /reviews/1"),
        ("jason", "v2 /reviews/1"),
    ] {
        let reply = conn
            .get("reviews:9080", "/reviews/1", &[("end-user", user)])
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), want, "end-user {user}");
    }
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_http), 1);
    assert_eq!(n1.count(|c| &c.http_requests), 3);
}
