//! Protecting and observing endpoints through real agents (issue 12): Istio's "Circuit
//! breaking" task, DestinationRule `outlierDetection`, and the "Mirroring" task, each with a
//! client on one node and its endpoints on others. Timeouts, retries and faults: l7_resilience.rs.

mod l7support;
mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, SvcPort, World};
use l7support::{
    access_log, access_log_path, metric, sa, start_agents_logged, write_istio, Behaviour, Conn,
    ScriptApp, NS,
};
use support::{in_pod, settled, settled_status, wait_until, SETTLE};

const HTTPBIN: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 10);
const OUTLIER: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 20);
const ALLBAD: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 21);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 30);
const SLOWM: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 31);
const DEAD: Ipv4Addr = Ipv4Addr::new(10, 96, 22, 32);
const PORT: u16 = 8080;

fn scrape(agent: &LocalAgent) -> String {
    agent.http_get("/metrics").1
}

/// Istio task "Circuit breaking": `maxConnections: 1`, `http1MaxPendingRequests: 1`,
/// `maxRequestsPerConnection: 1`, retries off so the overflow's 503 is not retried away. Like
/// the task's fortio runs, 2 concurrent connections see some 503 `UO`, and 3 a larger share.
///
/// Each connection sends requests back to back for the same length of time (not a fixed count:
/// a refused client whose 503s come back at once would spend its count early and leave, and the
/// shares would then depend on which client happened to be refused). With 2 clients, a request
/// is refused only while the other waits (pending) for the connection the last response freed;
/// with 3, the third is refused whenever one request is served and one pending.
#[test]
fn circuit_breaking_task() {
    support::raise_fd_limit();
    let world = World::new("l7-res-breaking");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("fortio")
        .node(&n1)
        .namespace(NS)
        .label("app", "fortio")
        .spawn();
    let server = world
        .pod("httpbin")
        .node(&n2)
        .namespace(NS)
        .label("app", "httpbin")
        .spawn();
    // 20 ms per request, so concurrent requests overlap.
    let _app = ScriptApp::start(&server, PORT, Behaviour::Slow(Duration::from_millis(20)));
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &server])
        .service(
            "httpbin",
            NS,
            HTTPBIN,
            &[SvcPort::named("http", 8000, PORT)],
            &[&server],
            true,
        );
    let istio = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: mesh}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: mesh}
spec:
  hosts: [httpbin]
  http:
  - retries: {attempts: 0}
    route: [{destination: {host: httpbin}}]
"#;
    let agents = start_agents_logged(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        istio,
    );
    let mut shares = Vec::new();
    let mut refused_total = 0;
    for clients in [1usize, 2, 3] {
        let all: Vec<u16> = in_pod(&client, || async move {
            let until = Instant::now() + Duration::from_millis(1500);
            let runs = (0..clients).map(|c| async move {
                let conn = Conn::h1(sa(HTTPBIN, 8000)).await;
                let mut statuses = Vec::new();
                for i in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let id = format!("cb-{clients}-{c}-{i}");
                    let r = conn
                        .get("httpbin:8000", "/get", &[("x-request-id", &id)])
                        .await;
                    statuses.push(r.status);
                }
                statuses
            });
            futures::future::join_all(runs)
                .await
                .into_iter()
                .flatten()
                .collect()
        });
        assert!(all.iter().all(|s| *s == 200 || *s == 503), "{all:?}");
        let refused = all.iter().filter(|s| **s == 503).count();
        eprintln!(
            "{clients} concurrent for 1.5 s: {refused} of {} refused",
            all.len()
        );
        refused_total += refused;
        shares.push(refused as f64 / all.len() as f64);
    }
    assert_eq!(shares[0], 0.0, "one connection never overflows: {shares:?}");
    assert!(shares[1] > 0.0, "2 concurrent: some refused: {shares:?}");
    assert!(
        shares[2] > shares[1],
        "3 concurrent: a larger share refused: {shares:?}"
    );
    let log = access_log_path(&world, &n1);
    let refused = refused_total;
    let lines = settled(
        || access_log(&log),
        |l| l.iter().filter(|x| x["response_code"] == 503).count() >= refused,
    );
    let flags: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|x| x["response_code"] == 503)
        .map(|x| &x["response_flags"])
        .collect();
    assert_eq!(flags.len(), refused, "{flags:?}");
    assert!(
        flags.iter().all(|f| *f == "UO"),
        "every 503 is UO: {flags:?}"
    );
    let pending = metric(
        &scrape(&agents[0]),
        "ambit_http_pool_overflow_total",
        &[("limit", "http1MaxPendingRequests")],
    );
    eprintln!("ambit_http_pool_overflow_total{{limit=http1MaxPendingRequests}} {pending}");
    assert!(pending > 0, "{}", scrape(&agents[0]));
}

/// The ejections of the cluster whose name contains `host`, from the status file.
fn ejections(status: &serde_json::Value, host: &str) -> serde_json::Value {
    status["outlier_ejections"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["cluster"].as_str().is_some_and(|n| n.contains(host)))
        })
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

/// DestinationRule `outlierDetection` (Envoy's consecutive-5xx detector) with ROUND_ROBIN over
/// three endpoints, one answering 500: it is ejected after 3 consecutive errors, gets nothing
/// while out, returns after `baseEjectionTime`, and the second ejection lasts twice as long.
/// With all three failing, `maxEjectionPercent: 50` ejects only one.
#[test]
fn outlier_detection() {
    support::raise_fd_limit();
    let world = World::new("l7-res-outlier");
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let pod = |name: &str, node, app: &str| {
        world
            .pod(name)
            .node(node)
            .namespace(NS)
            .label("app", app)
            .spawn()
    };
    let good0 = pod("good-0", &n2, "outlier");
    let good1 = pod("good-1", &n3, "outlier");
    let bad = pod("bad", &n3, "outlier");
    let all_bad: Vec<_> = (0..3)
        .map(|i| {
            pod(
                &format!("allbad-{i}"),
                if i % 2 == 0 { &n2 } else { &n3 },
                "allbad",
            )
        })
        .collect();
    let _good = [&good0, &good1].map(|p| ScriptApp::start(p, PORT, Behaviour::Ok));
    let bad_app = ScriptApp::start(&bad, PORT, Behaviour::Status(500));
    let all_bad_apps: Vec<ScriptApp> = all_bad
        .iter()
        .map(|p| ScriptApp::start(p, PORT, Behaviour::Status(500)))
        .collect();
    let http = [SvcPort::named("http", 80, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &good0, &good1, &bad])
        .pods(&all_bad)
        .service("outlier", NS, OUTLIER, &http, &[&good0, &good1, &bad], true)
        .service(
            "allbad",
            NS,
            ALLBAD,
            &http,
            &all_bad.iter().collect::<Vec<_>>(),
            true,
        );
    let rule = |host: &str, settings: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: mesh}}
spec:
  host: {host}
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection: {settings}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}, namespace: mesh}}
spec:
  hosts: [{host}]
  http:
  - retries: {{attempts: 0}}
    route: [{{destination: {{host: {host}}}}}]
"#
        )
    };
    let istio = [
        rule(
            "outlier",
            "{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}",
        ),
        rule(
            "allbad",
            "{consecutive5xxErrors: 2, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 50}",
        ),
    ]
    .join("---");
    let n2_pods: Vec<_> = [&good0, &all_bad[0], &all_bad[2]].into();
    let n3_pods: Vec<_> = [&good1, &bad, &all_bad[1]].into();
    let agents = start_agents_logged(
        &world,
        &[(&n1, &[&client]), (&n2, &n2_pods), (&n3, &n3_pods)],
        &yaml,
        &istio,
    );
    let a1 = &agents[0];
    let base = Duration::from_secs(3);

    let out_for: Vec<Duration> = in_pod(&client, || async {
        let conn = Conn::h1(sa(OUTLIER, 80)).await;
        let mut out_for = Vec::new();
        for round in 1..=2u32 {
            // Until the bad endpoint has failed three times in a row since it was let in (in
            // round 2, the request it came back on was the first of them).
            let start = bad_app.count();
            let more = if round == 1 { 3 } else { 2 };
            while bad_app.count() < start + more {
                let r = conn.get("outlier", "/", &[]).await;
                assert!(r.status == 200 || r.status == 500, "{}", r.status);
            }
            let ejected_at = Instant::now();
            // While ejected, the two others serve every request.
            let seen = bad_app.count();
            let mut served = 0usize;
            loop {
                let r = conn.get("outlier", "/", &[]).await;
                if bad_app.count() > seen {
                    break;
                }
                assert_eq!(
                    r.status, 200,
                    "round {round}: only the healthy endpoints answer while it is out"
                );
                assert!(r.served_by().starts_with("good-"), "{}", r.served_by());
                served += 1;
                assert!(
                    ejected_at.elapsed() < SETTLE * 2,
                    "the ejected endpoint never came back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let took = ejected_at.elapsed();
            eprintln!("ejection {round}: out for {took:?}, {served} requests served by the others");
            assert!(
                served > 0,
                "round {round}: requests went on while it was out"
            );
            out_for.push(took);
        }
        out_for
    });
    assert!(out_for[0] >= base, "first ejection lasted {:?}", out_for[0]);
    assert!(
        out_for[1] >= base * 2,
        "second ejection lasted {:?}, twice baseEjectionTime expected",
        out_for[1]
    );
    a1.wait_for_metrics("both ejections counted", SETTLE, |m| {
        metric(
            m,
            "ambit_outlier_ejections_total",
            &[("detector", "consecutive_5xx")],
        ) >= 2
    });
    let m = scrape(a1);
    assert_eq!(
        metric(
            &m,
            "ambit_outlier_ejections_total",
            &[("detector", "consecutive_5xx")]
        ),
        2,
        "{m}"
    );
    let status = settled_status(a1, |s| {
        ejections(s, "outlier")["ejections_total"]["consecutive_5xx"] == 2
    });
    let cluster = ejections(&status, "outlier");
    assert_eq!(
        cluster["ejections_total"]["consecutive_5xx"], 2,
        "{cluster:#}"
    );

    // All three failing, maxEjectionPercent 50: one ejected (a second would make 67%).
    let statuses: Vec<u16> = in_pod(&client, || async {
        let conn = Conn::h1(sa(ALLBAD, 80)).await;
        let mut out = Vec::new();
        for _ in 0..30 {
            out.push(conn.get("allbad", "/", &[]).await.status);
        }
        out
    });
    assert!(statuses.iter().all(|s| *s == 500), "{statuses:?}");
    let counts: Vec<usize> = all_bad_apps.iter().map(ScriptApp::count).collect();
    eprintln!("all failing, maxEjectionPercent 50: requests per endpoint {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 30);
    assert_eq!(
        counts.iter().filter(|c| **c > 2).count(),
        2,
        "one endpoint ejected after its 2 errors, the other two serve the rest: {counts:?}"
    );
    let status = settled_status(a1, |s| {
        ejections(s, "allbad")["ejected"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    let cluster = ejections(&status, "allbad");
    assert_eq!(
        cluster["ejected"].as_array().map(Vec::len),
        Some(1),
        "{cluster:#}"
    );
}

fn mirror_routes(default_percentage: Option<u32>) -> String {
    let percentage = default_percentage
        .map(|p| format!("\n    mirrorPercentage: {{value: {p}}}"))
        .unwrap_or_default();
    // A response header says which config answered.
    let marker = default_percentage.map_or("all", |_| "share");
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: mesh}}
spec:
  host: web
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: mesh}}
spec:
  hosts: [web]
  http:
  - match: [{{headers: {{x-mirror: {{exact: none}}}}}}]
    route: [{{destination: {{host: web, subset: v1}}}}]
  - match: [{{headers: {{x-mirror: {{exact: slow}}}}}}]
    route: [{{destination: {{host: web, subset: v1}}}}]
    mirror: {{host: slowm}}
  - match: [{{headers: {{x-mirror: {{exact: dead}}}}}}]
    route: [{{destination: {{host: web, subset: v1}}}}]
    mirror: {{host: dead}}
  - route: [{{destination: {{host: web, subset: v1}}, weight: 100}}]
    mirror: {{host: web, subset: v2}}{percentage}
    headers: {{response: {{set: {{x-config: {marker}}}}}}}
"#
    )
}

/// The median of these durations.
fn p50(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

/// Istio task "Mirroring": v1 serves every response while v2 gets a copy of each request (then
/// of half, after a config change) with `-shadow` on the authority's host; a slow or dead
/// mirror changes neither the primary's success nor its latency.
#[test]
fn mirroring_task() {
    support::raise_fd_limit();
    let world = World::new("l7-res-mirroring");
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let pod = |name: &str, node, app: &str, version: &str| {
        world
            .pod(name)
            .node(node)
            .namespace(NS)
            .label("app", app)
            .label("version", version)
            .spawn()
    };
    let v1 = pod("web-v1", &n2, "web", "v1");
    let v2 = pod("web-v2", &n3, "web", "v2");
    let slow = pod("slowm", &n3, "slowm", "v1");
    // No app: copies to it fail to connect.
    let dead = pod("dead", &n2, "dead", "v1");
    let v1_app = ScriptApp::start(&v1, PORT, Behaviour::Ok);
    let v2_app = ScriptApp::start(&v2, PORT, Behaviour::Ok);
    let slow_app = ScriptApp::start(&slow, PORT, Behaviour::Slow(Duration::from_secs(5)));
    let http = [SvcPort::named("http", 80, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &v1, &v2, &slow, &dead])
        .service("web", NS, WEB, &http, &[&v1, &v2], true)
        .service("slowm", NS, SLOWM, &http, &[&slow], true)
        .service("dead", NS, DEAD, &http, &[&dead], true);
    let agents = start_agents_logged(
        &world,
        &[
            (&n1, &[&client]),
            (&n2, &[&v1, &dead]),
            (&n3, &[&v2, &slow]),
        ],
        &yaml,
        &mirror_routes(None),
    );
    let a1 = &agents[0];
    let vip = sa(WEB, 80);

    // 100%: every request copied, as web-shadow:80.
    let served: Vec<(u16, String)> = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let mut out = Vec::new();
        for i in 0..100 {
            let id = format!("all-{i}");
            let r = conn.get("web:80", "/mirror", &[("x-test-id", &id)]).await;
            out.push((r.status, r.served_by()));
        }
        out
    });
    assert!(
        served.iter().all(|(s, by)| *s == 200 && by == "web-v1"),
        "v1 serves every response: {served:?}"
    );
    wait_until("the mirror has every copy", || v2_app.count() == 100);
    let copies = v2_app.seen();
    assert!(
        copies.iter().all(|s| s.authority == "web-shadow:80"),
        "{:?}",
        copies.iter().map(|s| &s.authority).collect::<Vec<_>>()
    );
    let mut ids: Vec<&str> = copies.iter().map(|s| s.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100, "one copy of each request");
    assert_eq!(v1_app.count(), 100);

    // A config change: half the requests copied, ±5% over 1,000.
    for a in &agents {
        write_istio(a, &mirror_routes(Some(50)));
    }
    let applied = settled(
        || {
            in_pod(&client, || async {
                Conn::h1(vip)
                    .await
                    .get("web:80", "/probe", &[("x-mirror", "none")])
                    .await;
                Conn::h1(vip)
                    .await
                    .get("web:80", "/probe", &[])
                    .await
                    .header("x-config")
            })
        },
        |c| c.as_deref() == Some("share"),
    );
    assert_eq!(applied.as_deref(), Some("share"), "the new config applies");
    let mirrored_before = a1.counter("proxy.http_mirrored");
    let statuses: Vec<u16> = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let mut out = Vec::new();
        for i in 0..1000 {
            let id = format!("half-{i}");
            out.push(
                conn.get("web:80", "/mirror", &[("x-test-id", &id)])
                    .await
                    .status,
            );
        }
        out
    });
    assert!(statuses.iter().all(|s| *s == 200));
    let mirrored = a1.counter("proxy.http_mirrored") - mirrored_before;
    let copied = || {
        v2_app
            .seen()
            .iter()
            .filter(|s| s.id.starts_with("half-"))
            .count()
    };
    let half = settled(copied, |n| *n as u64 >= mirrored);
    eprintln!("mirrorPercentage 50: {half} of 1000 copied ({mirrored} counted)");
    assert_eq!(half as u64, mirrored);
    assert!((450..=550).contains(&half), "{half} of 1000 copied");

    // A slow mirror (5 s per answer) and a dead one (no app) against none: requests alternate
    // between the routes on one connection, so each sample sees the same load.
    let (none, slow_lat, dead_lat) = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let (mut none, mut slow, mut dead) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..200 {
            for (mode, out) in [
                ("none", &mut none),
                ("slow", &mut slow),
                ("dead", &mut dead),
            ] {
                let started = Instant::now();
                let r = conn
                    .get("web:80", &format!("/lat/{i}"), &[("x-mirror", mode)])
                    .await;
                assert_eq!(r.status, 200, "{mode}: {}", r.text());
                assert_eq!(r.served_by(), "web-v1", "{mode}");
                out.push(started.elapsed());
            }
        }
        (p50(none), p50(slow), p50(dead))
    });
    eprintln!("p50 of 200: no mirror {none:?}, slow mirror {slow_lat:?}, dead mirror {dead_lat:?}");
    // A proxy that waited for the mirror would add its 5 s (or a connect failure) to every
    // request: three orders of magnitude over this bound. The bound itself holds on a busy
    // machine because the samples are interleaved (the same load for all three) and a median
    // ignores the slowest half; the 5 ms floor covers sub-millisecond medians, where scheduling
    // noise alone can double a value.
    let bound = (none * 2).max(none + Duration::from_millis(5));
    assert!(slow_lat <= bound, "slow mirror: {slow_lat:?} > {bound:?}");
    assert!(dead_lat <= bound, "dead mirror: {dead_lat:?} > {bound:?}");
    wait_until("the slow mirror got its copies", || slow_app.count() == 200);
    let failed = settled(|| a1.counter("proxy.http_mirror_failed"), |f| *f >= 200);
    assert!(failed >= 200, "the dead mirror's copies failed: {failed}");
}
