//! Route resilience through real agents (issue 12): Istio's "Request timeouts" task, the
//! `HTTPRetry` reference example, and the "Fault injection" task, each with its apps in pods on
//! nodes of their own, and what the client sees checked against what the apps saw.
//! Circuit breaking, outlier detection and mirroring: l7_breaking.rs.

mod l7support;
mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, SvcPort, World};
use http_body_util::BodyExt;
use l7support::{
    access_log, access_log_path, request, sa, start_agents_logged, stream_hash, Behaviour,
    CallerApp, Conn, GrpcApp, PatternBody, ScriptApp, Seen, NS,
};
use serde_json::Value;
use support::{in_pod, settled};

const REVIEWS: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 10);
const RATINGS: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 11);
const FLAKY: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 20);
const SLOWFAST: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 21);
const FAULTY: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 30);
const ABORTED: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 31);
const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 21, 32);
const PORT: u16 = 9080;

/// The access-log line of the request with this `x-request-id`, as `reporter` logged it, once
/// it is there (None after `SETTLE`).
fn log_line(path: &std::path::Path, id: &str, reporter: &str) -> Option<Value> {
    settled(
        || {
            access_log(path)
                .into_iter()
                .find(|l| l["request_id"] == id && l["reporter"] == reporter)
        },
        Option::is_some,
    )
}

/// Tries per `x-test-id`, over every app.
fn tries_by_id(apps: &[&ScriptApp]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for seen in apps.iter().flat_map(|a| a.seen()) {
        *out.entry(seen.id).or_insert(0) += 1;
    }
    out
}

/// Istio task "Request timeouts": `ratings` delayed 2 s by a fault rule (applied at the
/// `reviews` pod's node, whose outbound call the mesh captures), `reviews` called by the client
/// with a 0.5 s route timeout: the client gets 504 `upstream request timeout`, flag `UT`, after
/// the timeout and before the delay would have ended. Client, reviews and ratings are on three
/// nodes, three agents.
#[test]
fn request_timeouts_task() {
    support::raise_fd_limit();
    let world = World::new("l7-res-timeouts");
    let (n1, n2, n3) = (world.node("n1"), world.node("n2"), world.node("n3"));
    let pod = |name: &str, node, app: &str| {
        world
            .pod(name)
            .node(node)
            .namespace(NS)
            .label("app", app)
            .label("version", "v1")
            .spawn()
    };
    let client = pod("productpage", &n1, "productpage");
    let reviews = pod("reviews-v1", &n2, "reviews");
    let ratings = pod("ratings-v1", &n3, "ratings");
    let _reviews = CallerApp::start(&reviews, PORT, sa(RATINGS, PORT), "ratings:9080");
    let ratings_app = ScriptApp::start(&ratings, PORT, Behaviour::Ok);
    let http = [SvcPort::named("http", PORT, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &reviews, &ratings])
        .service("reviews", NS, REVIEWS, &http, &[&reviews], true)
        .service("ratings", NS, RATINGS, &http, &[&ratings], true);
    // The task's two VirtualServices; requests with `x-no-timeout` take a route without the
    // timeout, to show the delay itself.
    let istio = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: mesh}
spec:
  hosts: [ratings]
  http:
  - fault:
      delay:
        percentage: {value: 100}
        fixedDelay: 2s
    route: [{destination: {host: ratings}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: mesh}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-no-timeout: {exact: "1"}}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
    timeout: 0.5s
"#;
    let _agents = start_agents_logged(
        &world,
        &[(&n1, &[&client]), (&n2, &[&reviews]), (&n3, &[&ratings])],
        &yaml,
        istio,
    );
    let vip = sa(REVIEWS, PORT);
    let (delayed, timed_out) = in_pod(&client, || async {
        let conn = Conn::h1(vip).await;
        let started = Instant::now();
        let delayed = conn
            .get(
                "reviews:9080",
                "/reviews/0",
                &[("x-no-timeout", "1"), ("x-request-id", "no-timeout")],
            )
            .await;
        let delayed = (delayed, started.elapsed());
        let started = Instant::now();
        let timed_out = conn
            .get("reviews:9080", "/reviews/0", &[("x-request-id", "timeout")])
            .await;
        (delayed, (timed_out, started.elapsed()))
    });
    eprintln!(
        "without the timeout: {} in {:?}; with it: {} in {:?}",
        delayed.0.status, delayed.1, timed_out.0.status, timed_out.1
    );
    // Without the timeout, reviews waits out ratings' delay and answers with its rating.
    assert_eq!(delayed.0.status, 200, "{}", delayed.0.text());
    assert_eq!(
        delayed.0.json()["ratings_status"],
        200,
        "{}",
        delayed.0.text()
    );
    assert_eq!(delayed.0.json()["ratings"], "ratings-v1");
    assert!(delayed.1 >= Duration::from_secs(2), "{:?}", delayed.1);
    let (reply, took) = timed_out;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.text(), "upstream request timeout");
    assert!(
        took >= Duration::from_millis(500),
        "{took:?}: not before the timeout"
    );
    assert!(
        took < Duration::from_secs(2),
        "{took:?}: before ratings' delay ended"
    );
    let line = log_line(&access_log_path(&world, &n1), "timeout", "source")
        .expect("the client node logs the timed-out request");
    assert_eq!(line["response_code"], 504, "{line:#}");
    assert_eq!(line["response_flags"], "UT", "{line:#}");
    assert_eq!(
        line["response_code_details"], "upstream_response_timeout",
        "{line:#}"
    );
    // The delay was injected at reviews' node, on its call to ratings.
    let n2_log = access_log_path(&world, &n2);
    let delayed_call = settled(
        || {
            access_log(&n2_log)
                .into_iter()
                .find(|l| l["reporter"] == "source" && l["response_flags"] == "DI")
        },
        Option::is_some,
    );
    assert!(
        delayed_call.is_some(),
        "reviews' node delays its call to ratings (flag DI): {:#?}",
        access_log(&n2_log)
    );
    assert!(
        ratings_app.count() >= 1,
        "ratings answered the undelayed-route call"
    );
}

const FLAKY_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaky, namespace: mesh}
spec:
  hosts: [flaky]
  http:
  - match: [{headers: {x-retries: {exact: none}}}]
    retries: {attempts: 0}
    route: [{destination: {host: flaky}}]
  - retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: flaky}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: slowfast, namespace: mesh}
spec:
  hosts: [slowfast]
  http:
  - retries: {attempts: 2, perTryTimeout: 500ms, retryOn: 5xx}
    route: [{destination: {host: slowfast}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slowfast, namespace: mesh}
spec:
  host: slowfast
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
"#;

/// The `HTTPRetry` reference example (`attempts: 3`, `retryOn: 5xx`) against two endpoints that
/// each fail half their requests at random: a request fails only if all four tries do (1/16),
/// and takes 1 + 1/2 + 1/4 + 1/8 = 1.875 tries on average. Without retries half fail. A
/// `perTryTimeout` moves requests off a slow endpoint, and a 100 MB body, over the replay
/// buffer, is sent once.
#[test]
fn retries_httpretry_reference() {
    support::raise_fd_limit();
    let world = World::new("l7-res-retries");
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
    let (f0, f1) = (pod("flaky-0", &n2, "flaky"), pod("flaky-1", &n3, "flaky"));
    let (slow, fast) = (pod("slow", &n2, "slowfast"), pod("fast", &n3, "slowfast"));
    let flaky0 = ScriptApp::start(
        &f0,
        PORT,
        Behaviour::FailRandom {
            seed: 0x5eed_0001,
            percent: 50,
        },
    );
    let flaky1 = ScriptApp::start(
        &f1,
        PORT,
        Behaviour::FailRandom {
            seed: 0x5eed_0002,
            percent: 50,
        },
    );
    let slow_app = ScriptApp::start(&slow, PORT, Behaviour::Slow(Duration::from_secs(5)));
    let fast_app = ScriptApp::start(&fast, PORT, Behaviour::Ok);
    let http = [SvcPort::named("http", 80, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &f0, &f1, &slow, &fast])
        .service("flaky", NS, FLAKY, &http, &[&f0, &f1], true)
        .service("slowfast", NS, SLOWFAST, &http, &[&slow, &fast], true);
    let agents = start_agents_logged(
        &world,
        &[
            (&n1, &[&client]),
            (&n2, &[&f0, &slow]),
            (&n3, &[&f1, &fast]),
        ],
        &yaml,
        FLAKY_ROUTES,
    );

    // attempts: 3, retryOn: 5xx, over 1,000 requests.
    const N: usize = 1000;
    let statuses: Vec<u16> = in_pod(&client, || async {
        let conn = Conn::h1(sa(FLAKY, 80)).await;
        let mut out = Vec::new();
        for i in 0..N {
            let id = format!("retry-{i}");
            out.push(conn.get("flaky", "/r", &[("x-test-id", &id)]).await.status);
        }
        out
    });
    let tries = tries_by_id(&[&flaky0, &flaky1]);
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let per_request: Vec<usize> = (0..N)
        .map(|i| tries.get(&format!("retry-{i}")).copied().unwrap_or(0))
        .collect();
    let mean = per_request.iter().sum::<usize>() as f64 / N as f64;
    let most = per_request.iter().copied().max().unwrap_or(0);
    eprintln!(
        "attempts 3: {ok} of {N} succeeded, {mean:.3} tries per request, at most {most}; retries counted {}",
        agents[0].counter("proxy.http_retries")
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    assert!(ok >= N * 9 / 10, "{ok} of {N} succeeded");
    assert!(
        (1.675..=2.075).contains(&mean),
        "{mean:.3} tries per request, 1.875 ± 0.2 expected"
    );
    assert!(
        per_request.iter().all(|t| (1..=4).contains(t)),
        "1 to 4 tries each: {per_request:?}"
    );
    for (i, status) in statuses.iter().enumerate() {
        if *status != 200 {
            assert_eq!(per_request[i], 4, "failed request {i} was tried four times");
        }
    }

    // attempts: 0 → one try each, about half fail.
    let failed = in_pod(&client, || async {
        let conn = Conn::h1(sa(FLAKY, 80)).await;
        let mut failed = 0;
        for i in 0..N {
            let id = format!("once-{i}");
            let headers = [("x-test-id", id.as_str()), ("x-retries", "none")];
            if conn.get("flaky", "/r", &headers).await.status == 503 {
                failed += 1;
            }
        }
        failed
    });
    let tries = tries_by_id(&[&flaky0, &flaky1]);
    let once: Vec<usize> = (0..N)
        .map(|i| tries.get(&format!("once-{i}")).copied().unwrap_or(0))
        .collect();
    eprintln!("attempts 0: {failed} of {N} failed");
    assert!(
        (450..=550).contains(&failed),
        "{failed} of {N} failed, 45-55% expected"
    );
    assert!(once.iter().all(|t| *t == 1), "one try each: {once:?}");

    // perTryTimeout 500ms, the slow endpoint answering after 5 s: every request succeeds, served
    // by the fast one.
    let served: Vec<(u16, String, Duration)> = in_pod(&client, || async {
        let conn = Conn::h1(sa(SLOWFAST, 80)).await;
        let mut out = Vec::new();
        for i in 0..10 {
            let started = Instant::now();
            let r = conn.get("slowfast", &format!("/t/{i}"), &[]).await;
            out.push((r.status, r.served_by(), started.elapsed()));
        }
        out
    });
    eprintln!(
        "perTryTimeout: {served:?}; slow tried {} times",
        slow_app.count()
    );
    assert!(
        served.iter().all(|(s, by, _)| *s == 200 && by == "fast"),
        "{served:?}"
    );
    let slow_tries = slow_app.count();
    assert!(slow_tries >= 1, "the slow endpoint had first tries");
    // Each of those was abandoned at the per-try timeout, not waited out.
    let timed_out = served
        .iter()
        .filter(|(_, _, took)| *took >= Duration::from_millis(500))
        .count();
    assert!(timed_out >= slow_tries, "{served:?}");
    assert_eq!(fast_app.count(), 10, "the fast one answered each once");

    // A 100 MB body is over the replay buffer: sent once and not retried.
    const BIG: u64 = 100 << 20;
    let (ok_reply, failed_reply) = in_pod(&client, || async {
        let conn = Conn::h1(sa(FLAKY, 80)).await;
        let post = |path: &str, id: &str| {
            let mut req = request("POST", path, &[("x-test-id", id)]);
            *req.body_mut() = PatternBody::new(BIG).boxed();
            req
        };
        let ok = conn
            .send("flaky", post("/upload", "big-ok"))
            .await
            .expect("100 MB POST");
        let failed = conn
            .send("flaky", post("/upload-503", "big-503"))
            .await
            .expect("100 MB POST answered 503");
        (ok, failed)
    });
    assert_eq!(ok_reply.status, 200, "{}", ok_reply.text());
    let body = ok_reply.json();
    assert_eq!(body["len"], BIG, "{body}");
    assert_eq!(body["hash"], stream_hash(BIG).to_string(), "{body}");
    assert_eq!(failed_reply.status, 503, "{}", failed_reply.text());
    let all: Vec<Seen> = flaky0.seen().into_iter().chain(flaky1.seen()).collect();
    let count = |id: &str| all.iter().filter(|s| s.id == id).count();
    assert_eq!(count("big-ok"), 1, "the big body that succeeded: one try");
    assert_eq!(
        count("big-503"),
        1,
        "the big body answered 503: not replayed"
    );
}

const FAULTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: mesh}
spec:
  hosts: [ratings]
  http:
  - match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay: {percent: 100, fixedDelay: 7s}
    route:
    - destination: {host: ratings, subset: v1}
  - route:
    - destination: {host: ratings, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: mesh}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: aborted, namespace: mesh}
spec:
  hosts: [aborted]
  http:
  - fault:
      abort: {httpStatus: 500, percentage: {value: 50}}
    route: [{destination: {host: aborted}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc, namespace: mesh}
spec:
  hosts: [grpc]
  http:
  - fault:
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}
    route: [{destination: {host: grpc}}]
"#;

/// Istio task "Fault injection": bookinfo's `virtual-service-ratings-test-delay` (jason's
/// requests delayed 7 s, with the deprecated `percent: 100`; everyone else's not), an HTTP abort
/// for half the requests, and a gRPC abort a tonic client sees as UNAVAILABLE.
#[test]
fn fault_injection_task() {
    support::raise_fd_limit();
    let world = World::new("l7-res-faults");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("productpage")
        .node(&n1)
        .namespace(NS)
        .label("app", "productpage")
        .spawn();
    let pod = |name: &str, app: &str| {
        world
            .pod(name)
            .node(&n2)
            .namespace(NS)
            .label("app", app)
            .label("version", "v1")
            .spawn()
    };
    let (ratings, aborted, grpc) = (
        pod("ratings-v1", "ratings"),
        pod("aborted", "aborted"),
        pod("grpc", "grpc"),
    );
    let ratings_app = ScriptApp::start(&ratings, PORT, Behaviour::Ok);
    let aborted_app = ScriptApp::start(&aborted, PORT, Behaviour::Ok);
    let grpc_app = GrpcApp::start(&grpc, 9090);
    let http = [SvcPort::named("http", PORT, PORT)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &ratings, &aborted, &grpc])
        .service("ratings", NS, FAULTY, &http, &[&ratings], true)
        .service("aborted", NS, ABORTED, &http, &[&aborted], true)
        .service(
            "grpc",
            NS,
            GRPC,
            &[SvcPort::named("grpc", 9090, 9090)],
            &[&grpc],
            true,
        );
    let _agents = start_agents_logged(
        &world,
        &[(&n1, &[&client]), (&n2, &[&ratings, &aborted, &grpc])],
        &yaml,
        FAULTS,
    );
    let log = access_log_path(&world, &n1);

    // The delay: jason waits 7 s, bob does not.
    let (jason, bob) = in_pod(&client, || async {
        let conn = Conn::h1(sa(FAULTY, PORT)).await;
        let mut out = Vec::new();
        for user in ["jason", "bob"] {
            let started = Instant::now();
            let r = conn
                .get(
                    "ratings:9080",
                    "/ratings/0",
                    &[("end-user", user), ("x-request-id", user)],
                )
                .await;
            out.push((r.status, started.elapsed()));
        }
        (out[0], out[1])
    });
    eprintln!("jason: {jason:?}, bob: {bob:?}");
    assert_eq!(jason.0, 200);
    assert!(
        jason.1 >= Duration::from_secs(7),
        "jason's took {:?}",
        jason.1
    );
    assert_eq!(bob.0, 200);
    assert!(
        bob.1 < Duration::from_secs(7),
        "bob's is not delayed: {:?}",
        bob.1
    );
    let line = log_line(&log, "jason", "source").expect("jason's request is logged");
    assert_eq!(line["response_flags"], "DI", "{line:#}");
    let line = log_line(&log, "bob", "source").expect("bob's request is logged");
    assert_eq!(line["response_flags"], "-", "{line:#}");
    assert_eq!(ratings_app.count(), 2, "both requests reach ratings");

    // The abort: 500 for 50% of 1,000 requests, ±5%, flag FI; the aborted ones never reach the
    // app.
    const N: usize = 1000;
    let statuses: Vec<(u16, String)> = in_pod(&client, || async {
        let conn = Conn::h1(sa(ABORTED, PORT)).await;
        let mut out = Vec::new();
        for i in 0..N {
            let r = conn
                .get(
                    "aborted:9080",
                    &format!("/a/{i}"),
                    &[("x-request-id", &format!("abort-{i}"))],
                )
                .await;
            out.push((r.status, r.text()));
        }
        out
    });
    let aborts = statuses.iter().filter(|(s, _)| *s == 500).count();
    eprintln!("abort 50%: {aborts} of {N}");
    assert!(
        statuses
            .iter()
            .all(|(s, t)| *s == 200 || (*s == 500 && t == "fault filter abort")),
        "200 or the fault's 500: {:?}",
        statuses.iter().find(|(s, _)| *s != 200 && *s != 500)
    );
    assert!((450..=550).contains(&aborts), "{aborts} of {N} aborted");
    assert_eq!(
        aborted_app.count(),
        N - aborts,
        "only the others reach the app"
    );
    let lines = settled(
        || access_log(&log),
        |l| {
            l.iter()
                .filter(|x| {
                    x["request_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("abort-"))
                })
                .count()
                >= N
        },
    );
    let flagged = lines
        .iter()
        .filter(|x| {
            x["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("abort-"))
        })
        .filter(|x| x["response_code"] == 500 && x["response_flags"] == "FI")
        .count();
    assert_eq!(flagged, aborts, "every abort is logged 500 FI");

    // The gRPC abort: a tonic client gets UNAVAILABLE (grpc-status 14).
    let status = in_pod(&client, || async {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC}:9090"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        HealthClient::new(channel)
            .check(tonic::Request::new(HealthCheckRequest {
                service: "ambit.Serving".into(),
            }))
            .await
            .expect_err("the abort fails the call")
    });
    eprintln!("gRPC abort: {status:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(status.code() as i32, 14);
    assert_eq!(
        grpc_app.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "aborted at the client's node"
    );
}
