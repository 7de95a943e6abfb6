//! VirtualService routing and DestinationRule load balancing at the client's node, with Istio's
//! bookinfo `reviews` (the traffic-management docs and samples): reviews v1, v2, v3 on two nodes,
//! the client on a third; each request goes over HBONE to the pod the route picked.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use super::fixture::*;

const PORT: u16 = 9080;

/// The bookinfo cast: a client on n1, reviews v1 and v2 on n2, v3 (and `extra` more pods of
/// version v2) on n3, ratings on n3, each an HTTP app answering `<pod> <path>`.
struct Bookinfo {
    mesh: Mesh,
    client: Pod,
    reviews: IpAddr,
    _apps: Vec<HttpApp>,
}

async fn bookinfo(extra_v2: usize, yaml: &str) -> Bookinfo {
    let mut world = World::new();
    let client = world.pod("productpage").node("n1").add();
    let mut pods = Vec::new();
    for (name, version, node) in [
        ("reviews-v1", "v1", "n2"),
        ("reviews-v2", "v2", "n2"),
        ("reviews-v3", "v3", "n3"),
    ] {
        pods.push(
            world
                .pod(name)
                .node(node)
                .app("reviews")
                .label("version", version)
                .add(),
        );
    }
    for i in 0..extra_v2 {
        pods.push(
            world
                .pod(&format!("reviews-v2-{i}"))
                .node("n3")
                .app("reviews")
                .label("version", "v2")
                .add(),
        );
    }
    let ratings = world.pod("ratings-v1").node("n3").app("ratings").add();
    let reviews = world
        .service("reviews")
        .named_port("http", PORT, PORT)
        .backends(&pods.iter().collect::<Vec<_>>())
        .add();
    world
        .service("ratings")
        .named_port("http", PORT, PORT)
        .backends(&[&ratings])
        .add();
    world.yaml(yaml);
    let mesh = world.start().await;
    let mut apps = Vec::new();
    for p in pods.iter().chain([&ratings]) {
        apps.push(mesh.http_app(p.addr(PORT), &p.name).await);
    }
    Bookinfo {
        mesh,
        client,
        reviews,
        _apps: apps,
    }
}

impl Bookinfo {
    async fn conn(&self) -> H1 {
        self.mesh
            .h1(&self.client, SocketAddr::new(self.reviews, PORT))
            .await
    }
}

/// Which pod answered: the first word of the body.
fn who(reply: &Reply) -> String {
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .text()
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// How many of `n` GETs of `path` with `headers` each pod answered.
async fn tally(
    conn: &mut H1,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        *out.entry(who(&conn.get(host, path, headers).await))
            .or_default() += 1;
    }
    out
}

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#;

/// Istio task "Request routing", `virtual-service-reviews-jason-v2-v3.yaml`: the user jason sees
/// v2, everyone else v3 (first match wins; a route without match takes the rest).
#[tokio::test]
async fn end_user_jason_goes_to_v2_and_everyone_else_to_v3() {
    let b = bookinfo(
        0,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: mesh}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - route: [{{destination: {{host: reviews, subset: v3}}}}]
---
{SUBSETS}"#
        ),
    )
    .await;
    let mut conn = b.conn().await;
    let jason = tally(
        &mut conn,
        "reviews:9080",
        "/reviews/0",
        &[("end-user", "jason")],
        500,
    )
    .await;
    assert_eq!(jason, BTreeMap::from([("reviews-v2".to_string(), 500)]));
    let others = tally(
        &mut conn,
        "reviews:9080",
        "/reviews/0",
        &[("end-user", "bob")],
        250,
    )
    .await;
    let anonymous = tally(&mut conn, "reviews:9080", "/reviews/0", &[], 250).await;
    assert_eq!(others, BTreeMap::from([("reviews-v3".to_string(), 250)]));
    assert_eq!(anonymous, BTreeMap::from([("reviews-v3".to_string(), 250)]));
}

/// Istio task "Traffic shifting" (weighted destinations): 90/10 between v1 and v3 lands within
/// ±3 points over 2,000 requests.
#[tokio::test]
async fn a_90_10_split_lands_within_3_percent() {
    let b = bookinfo(
        0,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: mesh}}
spec:
  hosts: [reviews]
  http:
  - route:
    - {{destination: {{host: reviews, subset: v1}}, weight: 90}}
    - {{destination: {{host: reviews, subset: v3}}, weight: 10}}
---
{SUBSETS}"#
        ),
    )
    .await;
    let mut conn = b.conn().await;
    let got = tally(&mut conn, "reviews", "/", &[], 2000).await;
    let v1 = got.get("reviews-v1").copied().unwrap_or(0);
    let v3 = got.get("reviews-v3").copied().unwrap_or(0);
    assert_eq!(v1 + v3, 2000, "{got:?}");
    assert!((1740..=1860).contains(&v1), "90% ± 3 of 2,000: {got:?}");
}

/// Istio VirtualService reference: `hosts` need not be a Service ("bookinfo.com"), and
/// `uri.prefix` routes send `/reviews` and `/ratings` to two Services; the client reaches it by
/// sending `Host: bookinfo.com` on a connection to any mesh Service's HTTP port.
#[tokio::test]
async fn a_host_that_is_no_service_routes_by_prefix_to_two_services() {
    let b = bookinfo(
        0,
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: mesh}
spec:
  hosts: [bookinfo.com]
  http:
  - match: [{uri: {prefix: /reviews}}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /ratings}}]
    route: [{destination: {host: ratings}}]
"#,
    )
    .await;
    let mut conn = b.conn().await;
    let ratings = tally(&mut conn, "bookinfo.com", "/ratings/7", &[], 20).await;
    assert_eq!(ratings, BTreeMap::from([("ratings-v1".to_string(), 20)]));
    let reviews = tally(&mut conn, "bookinfo.com", "/reviews/7", &[], 60).await;
    assert_eq!(reviews.values().sum::<usize>(), 60);
    assert!(
        reviews.keys().all(|k| k.starts_with("reviews-")),
        "{reviews:?}"
    );
    // Neither prefix: no route (Envoy's 404 NR).
    let other = conn.get("bookinfo.com", "/details/7", &[]).await;
    assert_eq!(other.status, 404);
}

/// Istio DestinationRule reference example: `simple: RANDOM` at the top, `ROUND_ROBIN` in subset
/// v2's own trafficPolicy ("Subset-level traffic policies override the top-level ones"): the v2
/// endpoints take turns exactly.
#[tokio::test]
async fn a_subset_policy_overrides_the_top_level_one() {
    let b = bookinfo(
        1,
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"#,
    )
    .await;
    let mut conn = b.conn().await;
    let mut order = Vec::new();
    for _ in 0..100 {
        order.push(who(&conn.get("reviews", "/", &[]).await));
    }
    assert!(
        order
            .iter()
            .all(|w| w == "reviews-v2" || w == "reviews-v2-0"),
        "only v2 pods: {order:?}"
    );
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "v2 endpoints alternate: {order:?}"
    );
}

/// Istio: without a VirtualService, traffic goes to the Service itself, every endpoint of it
/// (LEAST_REQUEST by default, which picks at random among idle endpoints).
#[tokio::test]
async fn without_a_virtual_service_every_endpoint_of_the_service_serves() {
    let b = bookinfo(0, "").await;
    let mut conn = b.conn().await;
    let got = tally(&mut conn, "reviews", "/", &[], 300).await;
    assert_eq!(got.values().sum::<usize>(), 300);
    for pod in ["reviews-v1", "reviews-v2", "reviews-v3"] {
        let n = got.get(pod).copied().unwrap_or(0);
        assert!((50..=150).contains(&n), "{pod} got {n} of 300: {got:?}");
    }
}

/// Istio: a VirtualService's short host `reviews` is the Service in the VirtualService's
/// namespace, and Envoy's virtual host lists every name a client may use for it: the short name,
/// `name.namespace`, `name.namespace.svc`, the FQDN, the cluster IP, each with or without the port.
#[tokio::test]
async fn every_name_of_the_service_is_routed_by_its_virtual_service() {
    let b = bookinfo(
        0,
        &format!(
            r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: mesh}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews, subset: v2}}}}]
---
{SUBSETS}"#
        ),
    )
    .await;
    let mut conn = b.conn().await;
    let vip = b.reviews.to_string();
    let vip_port = format!("{vip}:{PORT}");
    for host in [
        "reviews",
        "reviews:9080",
        "reviews.mesh",
        "reviews.mesh:9080",
        "reviews.mesh.svc",
        "reviews.mesh.svc.cluster.local",
        "reviews.mesh.svc.cluster.local:9080",
        "Reviews.Mesh.svc.cluster.local.",
        &vip,
        &vip_port,
    ] {
        let reply = conn.get(host, "/", &[]).await;
        assert_eq!(who(&reply), "reviews-v2", "Host: {host}");
    }
}
