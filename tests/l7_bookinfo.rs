//! Istio's bookinfo `reviews` routes through real agents (issue 11, acceptance 1): `reviews`
//! v1, v2 (two pods) and v3 spread over two nodes, `ratings` beside them, and a client on a third
//! node whose agent routes each request at the source, as Istio's sidecar would.

mod l7support;
mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::{sa, start_agents, write_istio, Conn, HttpApp, NS};
use support::{in_pod, settled};

const REVIEWS: Ipv4Addr = Ipv4Addr::new(10, 96, 11, 10);
const RATINGS: Ipv4Addr = Ipv4Addr::new(10, 96, 11, 11);
const PORT: u16 = 9080;

/// Istio's "Request Routing" task (`end-user: jason` → v2, everyone else → another version),
/// the DestinationRule reference example (`RANDOM` at the top, `ROUND_ROBIN` in subset v2's own
/// trafficPolicy), the VirtualService reference example for `bookinfo.com` (`/reviews` and
/// `/ratings` prefixes to two services), then the "Traffic Shifting" task's weighted split.
const REQUEST_ROUTING: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v3}
"#;

const DESTINATION_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: mesh}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
  - name: v3
    labels: {version: v3}
"#;

const BOOKINFO_COM: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: mesh}
spec:
  hosts: [bookinfo.com]
  http:
  - match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews}
  - match:
    - uri: {prefix: /ratings}
    route:
    - destination: {host: ratings}
"#;

const SHIFTED: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3}
      weight: 10
"#;

fn tally(pods: &[String]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for p in pods {
        *out.entry(p.clone()).or_insert(0) += 1;
    }
    out
}

#[test]
fn bookinfo_request_routing_traffic_shifting_and_destination_rule_subsets() {
    support::raise_fd_limit();
    let world = World::new("l7-bookinfo");
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let client = world
        .pod("productpage")
        .node(&n1)
        .namespace(NS)
        .label("app", "productpage")
        .spawn();
    let reviews = |name: &str, node, version: &str| {
        world
            .pod(name)
            .node(node)
            .namespace(NS)
            .label("app", "reviews")
            .label("version", version)
            .spawn()
    };
    let v1 = reviews("reviews-v1", &n2, "v1");
    let v2a = reviews("reviews-v2-a", &n2, "v2");
    let v2b = reviews("reviews-v2-b", &n3, "v2");
    let v3 = reviews("reviews-v3", &n3, "v3");
    let ratings = world
        .pod("ratings-v1")
        .node(&n2)
        .namespace(NS)
        .label("app", "ratings")
        .label("version", "v1")
        .spawn();
    let _apps: Vec<HttpApp> = [&v1, &v2a, &v2b, &v3, &ratings]
        .iter()
        .map(|p| HttpApp::start(p, PORT))
        .collect();
    let http = [SvcPort::named("http", PORT, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &v1, &v2a, &v2b, &v3, &ratings])
        .service("reviews", NS, REVIEWS, &http, &[&v1, &v2a, &v2b, &v3], true)
        .service("ratings", NS, RATINGS, &http, &[&ratings], true);
    let agents = start_agents(
        &world,
        &[
            (&n1, &[&client]),
            (&n2, &[&v1, &v2a, &ratings]),
            (&n3, &[&v2b, &v3]),
        ],
        &yaml,
        &[REQUEST_ROUTING, DESTINATION_RULE, BOOKINFO_COM].join("---"),
        &[],
    );
    let vip = sa(REVIEWS, PORT);
    let authority = "reviews:9080";

    // Request routing: jason → v2 for 1,000 of 1,000 requests, alternating between v2's two
    // pods (subset v2's own ROUND_ROBIN wins over the top-level RANDOM); everyone else → v3.
    let (jason, others) = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let mut jason = Vec::new();
        for _ in 0..1000 {
            let r = conn
                .get(authority, "/reviews/0", &[("end-user", "jason")])
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            jason.push(r.served_by());
        }
        let mut others = Vec::new();
        for i in 0..1000 {
            let headers: &[(&str, &str)] = match i % 3 {
                0 => &[],
                1 => &[("end-user", "bob")],
                _ => &[("end-user", "jason-not")],
            };
            let r = conn.get(authority, "/reviews/0", headers).await;
            assert_eq!(r.status, 200, "{}", r.text());
            others.push(r.served_by());
        }
        (jason, others)
    });
    let t = tally(&jason);
    assert_eq!(
        t.keys().map(String::as_str).collect::<Vec<_>>(),
        ["reviews-v2-a", "reviews-v2-b"],
        "jason reaches v2's pods only: {t:?}"
    );
    let repeats = jason.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(
        repeats, 0,
        "subset v2's ROUND_ROBIN alternates its two pods exactly: {t:?}"
    );
    assert_eq!(
        tally(&others),
        BTreeMap::from([("reviews-v3".to_string(), 1000)]),
        "everyone else reaches v3"
    );

    // bookinfo.com: the path prefix picks the service; a path under neither matches no route.
    let (by_prefix, unrouted) = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let mut seen = BTreeMap::new();
        for prefix in ["/reviews/1", "/ratings/1"] {
            for _ in 0..40 {
                let r = conn.get("bookinfo.com", prefix, &[]).await;
                assert_eq!(r.status, 200, "{prefix}: {}", r.text());
                assert_eq!(r.json()["path"], prefix, "the path arrives unchanged");
                assert_eq!(r.json()["authority"], "bookinfo.com");
                seen.entry(prefix)
                    .or_insert_with(Vec::new)
                    .push(r.served_by());
            }
        }
        let unrouted = conn.get("bookinfo.com", "/details/1", &[]).await.status;
        (seen, unrouted)
    });
    let reviews_seen = tally(&by_prefix["/reviews/1"]);
    assert!(
        reviews_seen.keys().all(|p| p.starts_with("reviews-")),
        "/reviews goes to the reviews service: {reviews_seen:?}"
    );
    assert!(
        reviews_seen.len() >= 2,
        "the top-level RANDOM spreads reviews over its pods: {reviews_seen:?}"
    );
    assert_eq!(
        tally(&by_prefix["/ratings/1"]),
        BTreeMap::from([("ratings-v1".to_string(), 40)]),
        "/ratings goes to the ratings service"
    );
    assert_eq!(unrouted, 404, "no bookinfo.com route for /details");

    // Traffic shifting: 90 v1 / 10 v3, over 2,000 requests, within ±3% (60 requests).
    let shifted = [SHIFTED, DESTINATION_RULE, BOOKINFO_COM].join("---");
    for a in &agents {
        write_istio(a, &shifted);
    }
    // The new route is in force once v1 answers (it had no route before).
    let first_v1 = settled(
        || {
            in_pod(&client, || async {
                let conn = Conn::h1(vip).await;
                let mut seen = Vec::new();
                for _ in 0..20 {
                    seen.push(conn.get(authority, "/reviews/0", &[]).await.served_by());
                }
                seen
            })
        },
        |seen| seen.iter().any(|p| p == "reviews-v1"),
    );
    assert!(
        first_v1.iter().any(|p| p == "reviews-v1"),
        "the weighted route applies: {first_v1:?}\n{}",
        agents[0].log_tail()
    );
    let split = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let mut seen = Vec::new();
        for _ in 0..2000 {
            let r = conn
                .get(authority, "/reviews/0", &[("end-user", "jason")])
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            seen.push(r.served_by());
        }
        seen
    });
    let t = tally(&split);
    eprintln!("90/10 over 2,000: {t:?}");
    let v1_count = t.get("reviews-v1").copied().unwrap_or(0);
    let v3_count = t.get("reviews-v3").copied().unwrap_or(0);
    assert_eq!(v1_count + v3_count, 2000, "only v1 and v3 answer: {t:?}");
    assert!(
        (1740..=1860).contains(&v1_count),
        "90% of 2,000 to v1 within ±3%: {t:?}"
    );
}
