//! A real Prometheus scraping real agents (issue 13, acceptance 1): Debian's `prometheus`
//! scrapes three agents' `:15020/stats/prometheus` every second while a bookinfo-like mesh
//! serves traffic, and the PromQL of Kiali's service graph and of Istio's Mesh, Service and
//! Workload dashboards returns the expected edges with non-zero values, from both
//! `reporter="source"` and `reporter="destination"` telemetry.
//!
//! Traffic over three nodes: productpage-v1 → details-v1 (200, 404, 500, 503),
//! productpage-v1 → reviews v1/v2/v3, reviews v2/v3 → ratings-v1 (reviews v2 and v3 call ratings
//! for each request, as bookinfo's do), and ratings-v1 → mongodb-v1 over a Service port named
//! `tcp-mongo` (TCP only). From another ambient namespace, `ingress/loadgen-v1` calls details
//! and `reviews-canary`, whose only endpoint is not ready (503 `UH`, workload `unknown`). Load runs until every query has answered, so the dashboards' `irate`
//! (the last two scrapes) has data.
//!
//! Queries checked (PromQL copied from the named file, variables replaced; see
//! `prometheus/queries.rs`), each per reporter where the query takes one:
//! - kiali/kiali `graph/telemetry/istio/istio.go`: request traffic from destination telemetry
//!   (`reporter=~"waypoint|destination"`), from source telemetry, from outside the namespace
//!   (ambient query 1) and to no workload (query 0), by source/destination
//!   cluster, namespace, workload, canonical service/revision, service, protocol, response code,
//!   gRPC status and flags; TCP traffic (`istio_tcp_received_bytes_total` and
//!   `istio_tcp_sent_bytes_total`) from both reporters.
//! - kiali/kiali `graph/telemetry/istio/appender/response_time.go`: 95th percentile
//!   (`histogram_quantile(0.95, sum(rate(istio_request_duration_milliseconds_bucket…[60s])) by
//!   (le,…))`) and average, incoming (destination) and outgoing (source).
//! - kiali/kiali `graph/telemetry/istio/appender/throughput.go`: `istio_response_bytes_sum`
//!   (destination), `istio_request_bytes_sum` (source).
//! - kiali/kiali `graph/telemetry/istio/appender/security_policy.go`: requests and TCP bytes by
//!   principals and `connection_security_policy`, from inside and from outside the namespace.
//! - kiali/kiali `prometheus/metrics.go` (health): inbound and outbound request rates of a
//!   workload, both reporters.
//! - istio/istio `manifests/addons/dashboards/istio-mesh-dashboard.gen.json`: Traffic Volume,
//!   Success Rate, 4xxs, 5xxs, HTTP/gRPC Workloads (requests, success rate, P50/P90/P99), TCP
//!   Workloads (received and sent bytes).
//! - istio/istio `manifests/addons/dashboards/istio-service-dashboard.json` (details, mongodb):
//!   the `service` and `srcwl` variables, Client/Server Request Volume, Success Rate and Request
//!   Duration (P50/P90/P95/P99), Incoming Requests By Source / By Destination Workload And
//!   Response Code, Incoming Success Rate and Request Duration By Source / By Service Workload,
//!   TCP Received/Sent Bytes, Bytes Received from / Sent to Incoming TCP Connection.
//! - istio/istio `manifests/addons/dashboards/istio-workload-dashboard.json` (reviews-v2,
//!   ratings-v1, mongodb-v1): Incoming Request Volume, Success Rate, Request Duration
//!   (P50/P90/P99), Incoming Requests / Success Rate / Duration / Request Size By Source
//!   (inbound workloads), Outgoing Requests By Destination And Response Code, Outgoing Success
//!   Rate / Duration / Request and Response Size By Destination (outbound services), TCP Client
//!   and Server Traffic, Bytes Sent on / Received from Outgoing TCP Connection, Bytes Received
//!   from Incoming TCP Connection.

mod l7support;
mod support;

#[path = "prometheus/checks.rs"]
mod checks;
#[path = "prometheus/queries.rs"]
mod queries;
#[path = "prometheus/server.rs"]
mod server;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, Pod, SvcPort, World};
use l7support::{sa, start_agents, CallerApp, Conn, HttpApp};
use queries::{app_version, CANARY, DETAILS_CODES, EXT, EXT_NS, NS};
use support::{in_pod, SETTLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DETAILS: Ipv4Addr = Ipv4Addr::new(10, 96, 13, 10);
const REVIEWS: Ipv4Addr = Ipv4Addr::new(10, 96, 13, 11);
const RATINGS: Ipv4Addr = Ipv4Addr::new(10, 96, 13, 12);
const MONGODB: Ipv4Addr = Ipv4Addr::new(10, 96, 13, 13);
const REVIEWS_CANARY: Ipv4Addr = Ipv4Addr::new(10, 96, 13, 14);
const PORT: u16 = 9080;
const MONGO_PORT: u16 = 27017;
/// Time between two rounds of each client: every series grows between two 1 s scrapes.
const PACE: Duration = Duration::from_millis(100);

/// Stops the clients when dropped, also when a check panics (so the scope can join them).
struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What a client saw: requests sent, and every answer that was not the one expected.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    wrong: Vec<String>,
}

/// productpage: details (200, 200, 404, 500, 503) and reviews (three times) each round, on
/// kept-alive connections as an app's client pool would.
fn productpage_load(pod: &Pod, stop: &AtomicBool) -> Tally {
    in_pod(pod, || async {
        let mut tally = Tally::default();
        let details = Conn::h1(sa(DETAILS, PORT)).await;
        let reviews = Conn::h1(sa(REVIEWS, PORT)).await;
        let mut round: Vec<(&Conn, &str, String, u16)> = ["/details/0", "/details/1"]
            .iter()
            .map(|p| (&details, "details:9080", p.to_string(), 200))
            .collect();
        for code in &DETAILS_CODES[1..] {
            let code: u16 = code.parse().expect("code");
            round.push((&details, "details:9080", format!("/status/{code}"), code));
        }
        for i in 0..3 {
            round.push((&reviews, "reviews:9080", format!("/reviews/{i}"), 200));
        }
        while !stop.load(Ordering::SeqCst) {
            for (conn, authority, path, want) in &round {
                tally.sent += 1;
                match conn.send(authority, l7support::get(path, &[])).await {
                    Ok(r) if r.status == *want => {}
                    Ok(r) => tally
                        .wrong
                        .push(format!("{path}: {} {}", r.status, r.text())),
                    Err(e) => tally.wrong.push(format!("{path}: {e}")),
                }
            }
            tokio::time::sleep(PACE).await;
        }
        tally
    })
}

/// loadgen, from the `ingress` namespace: details (200) and reviews-canary (503: no ready
/// endpoint) each round.
fn loadgen_load(pod: &Pod, stop: &AtomicBool) -> Tally {
    in_pod(pod, || async {
        let mut tally = Tally::default();
        let details = Conn::h1(sa(DETAILS, PORT)).await;
        let canary = Conn::h1(sa(REVIEWS_CANARY, PORT)).await;
        let round = [
            (&details, "details.mesh:9080", 200),
            (&canary, "reviews-canary.mesh:9080", 503),
        ];
        while !stop.load(Ordering::SeqCst) {
            for (conn, authority, want) in round {
                tally.sent += 1;
                match conn.send(authority, l7support::get("/", &[])).await {
                    Ok(r) if r.status == want => {}
                    Ok(r) => tally
                        .wrong
                        .push(format!("{authority}: {} {}", r.status, r.text())),
                    Err(e) => tally.wrong.push(format!("{authority}: {e}")),
                }
            }
            tokio::time::sleep(PACE).await;
        }
        tally
    })
}

/// ratings → mongodb: one short TCP connection per round (TCP bytes are counted when a
/// connection closes), carrying bytes the opaque port does not parse.
fn mongodb_load(pod: &Pod, stop: &AtomicBool) -> Tally {
    in_pod(pod, || async {
        let mut tally = Tally::default();
        while !stop.load(Ordering::SeqCst) {
            tally.sent += 1;
            let mut s = l7support::connect(sa(MONGODB, MONGO_PORT)).await;
            let req = b"GET /find HTTP/1.1\r\nHost: mongodb\r\nConnection: close\r\n\r\n";
            let mut reply = Vec::new();
            let io = async {
                s.write_all(req).await?;
                s.read_to_end(&mut reply).await
            };
            match tokio::time::timeout(SETTLE, io).await {
                Ok(Ok(_)) if reply.starts_with(b"HTTP/1.1 200") => {}
                other => tally.wrong.push(format!(
                    "mongodb: {other:?} {}",
                    String::from_utf8_lossy(&reply)
                )),
            }
            tokio::time::sleep(PACE).await;
        }
        tally
    })
}

#[test]
fn kiali_and_grafana_queries_see_both_reporters_of_a_bookinfo_mesh() {
    support::raise_fd_limit();
    let world = World::new("prometheus");
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let pod_in = |ns: &str, workload: &str, node| {
        let (app, version) = app_version(workload);
        world
            .pod(workload)
            .node(node)
            .namespace(ns)
            .sa(&format!("bookinfo-{app}"))
            .label("app", app)
            .label("version", version)
            .spawn()
    };
    let pod = |workload: &str, node| pod_in(NS, workload, node);
    let productpage = pod("productpage-v1", &n1);
    let mongodb = pod("mongodb-v1", &n1);
    let details = pod("details-v1", &n2);
    let reviews_v1 = pod("reviews-v1", &n2);
    let ratings = pod("ratings-v1", &n2);
    let reviews_v2 = pod("reviews-v2", &n3);
    let reviews_v3 = pod("reviews-v3", &n3);
    let loadgen = pod_in(EXT_NS, EXT, &n3);
    let _apps = [
        HttpApp::start(&details, PORT),
        HttpApp::start(&reviews_v1, PORT),
        HttpApp::start(&ratings, PORT),
        HttpApp::start(&mongodb, MONGO_PORT),
    ];
    let _callers = [&reviews_v2, &reviews_v3]
        .map(|p| CallerApp::start(p, PORT, sa(RATINGS, PORT), "ratings:9080"));
    let http = [SvcPort::named("http", PORT, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .ambient(EXT_NS)
        .pods([
            &productpage,
            &mongodb,
            &details,
            &reviews_v1,
            &ratings,
            &reviews_v2,
            &reviews_v3,
            &loadgen,
        ])
        .service("details", NS, DETAILS, &http, &[&details], true)
        .service(
            "reviews",
            NS,
            REVIEWS,
            &http,
            &[&reviews_v1, &reviews_v2, &reviews_v3],
            true,
        )
        .service("ratings", NS, RATINGS, &http, &[&ratings], true)
        .service(CANARY, NS, REVIEWS_CANARY, &http, &[&reviews_v1], false)
        .service(
            "mongodb",
            NS,
            MONGODB,
            &[SvcPort::named("tcp-mongo", MONGO_PORT, MONGO_PORT)],
            &[&mongodb],
            true,
        );
    let agents = start_agents(
        &world,
        &[
            (&n1, &[&productpage, &mongodb]),
            (&n2, &[&details, &reviews_v1, &ratings]),
            (&n3, &[&reviews_v2, &reviews_v3, &loadgen]),
        ],
        &yaml,
        "",
        &[],
    );
    let prom = server::Prometheus::start(
        &n1,
        &world.state_dir().join("prometheus"),
        &[n1.ip4(), n2.ip4(), n3.ip4()],
    );

    let stop = AtomicBool::new(false);
    let checked = AtomicUsize::new(0);
    let (pp, db) = std::thread::scope(|s| {
        let pp = s.spawn(|| productpage_load(&productpage, &stop));
        let db = s.spawn(|| mongodb_load(&ratings, &stop));
        let lg = s.spawn(|| loadgen_load(&loadgen, &stop));
        let _stop = StopOnDrop(&stop);

        // Every agent is scraped at the path Istio's annotations name.
        let up = checks::check("prometheus", "up", r#"up{job="ambit"} == 1"#).rows(
            &["instance"],
            [n1.ip4(), n2.ip4(), n3.ip4()].map(|ip| [format!("{ip}:15020")]),
        );
        let all = [
            vec![up],
            queries::kiali(),
            queries::mesh(),
            queries::service(),
            queries::workload(),
        ]
        .concat();
        for c in &all {
            let deadline = Instant::now() + SETTLE;
            let mut last = prom.query(&c.promql).and_then(|a| c.verify(&a));
            while last.is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                last = prom.query(&c.promql).and_then(|a| c.verify(&a));
            }
            if let Err(e) = last {
                panic!(
                    "{} — {}:\n{}\n{e}\nanswer: {:?}\n{}\n{}",
                    c.source,
                    c.panel,
                    c.promql,
                    prom.query(&c.promql),
                    prom.log(),
                    agents[2].log_tail()
                );
            }
            checked.fetch_add(1, Ordering::SeqCst);
        }
        drop(_stop);
        let pp = pp.join().expect("productpage load");
        let lg = lg.join().expect("loadgen load");
        let db = db.join().expect("mongodb load");
        (
            Tally {
                sent: pp.sent + lg.sent,
                wrong: [pp.wrong, lg.wrong].concat(),
            },
            db,
        )
    });
    eprintln!(
        "{} queries answered; {} HTTP requests and {} TCP connections sent",
        checked.load(Ordering::SeqCst),
        pp.sent,
        db.sent
    );
    assert!(pp.wrong.is_empty(), "unexpected answers: {:?}", pp.wrong);
    assert!(db.wrong.is_empty(), "unexpected answers: {:?}", db.wrong);
}
