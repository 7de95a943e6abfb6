//! Errors and bad input at the source's L7 proxy, through real agents (issue 11, acceptance 6):
//! Envoy's NR, UH and UF replies with their flags in the access log (`/metrics`: see
//! l7_telemetry.rs), malformed requests and oversized headers answered without a panic, and a
//! route change that applies to the next request on an HTTP/2 connection that stays up.

mod l7support;
mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, SvcPort, World};
use l7support::{
    access_log, access_log_path, hash_body, panicked, request, sa, start_agents, stream_hash,
    write_istio_in, Conn, HttpApp, NS,
};
use support::{in_pod, settled, SETTLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 11);
const DOWN: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 12);
const H2WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 15, 13);

const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /known}}]
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: h2web, namespace: mesh}
spec:
  host: h2web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn h2web_to(subset: &str) -> String {
    format!(
        "{ROUTES}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: h2web, namespace: mesh}}\nspec:\n  hosts: [h2web]\n  http:\n  - route: [{{destination: {{host: h2web, subset: {subset}}}}}]\n"
    )
}

/// Writes `raw` on a fresh connection and reads until the server closes (or 10 s pass).
async fn raw_exchange(dst: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = l7support::connect(dst).await;
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn envoy_response_flags_bad_input_and_a_route_change_under_http2() {
    support::raise_fd_limit();
    let world = World::new("l7-errors");
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("sleep")
        .node(&n1)
        .namespace(NS)
        .label("app", "sleep")
        .spawn();
    let server = |name: &str, version: &str| {
        world
            .pod(name)
            .node(&n2)
            .namespace(NS)
            .label("app", "web")
            .label("version", version)
            .spawn()
    };
    let (s1, s2) = (server("web-v1", "v1"), server("web-v2", "v2"));
    let _web = HttpApp::start(&s1, 8080);
    let _h2 = [&s1, &s2].map(|p| HttpApp::start(p, 8081));
    let http = |target| [SvcPort::named("http", 80, target)];
    let yaml = ClusterYaml::new()
        .ambient(NS)
        .pods([&client, &s1, &s2])
        .service("web", NS, WEB, &http(8080), &[&s1], true)
        .service("empty", NS, EMPTY, &http(8080), &[&s1], false)
        // Nothing listens on 8099.
        .service("down", NS, DOWN, &http(8099), &[&s1], true)
        .service(
            "h2web",
            NS,
            H2WEB,
            &[SvcPort::named("http2", 80, 8081)],
            &[&s1, &s2],
            true,
        );
    let log = access_log_path(&world, &n1);
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&s1, &s2])],
        &yaml,
        &h2web_to("v1"),
        &[format!("--access-log={}", log.display())],
    );
    let a1 = &agents[0];

    // NR: no route matched → 404; UH: no ready endpoint → 503; UF: the connection to the
    // endpoint failed → 503.
    let statuses = in_pod(&client, || async {
        let mut out = Vec::new();
        for (vip, host, path) in [
            (WEB, "web", "/known/1"),
            (WEB, "web", "/unknown"),
            (EMPTY, "empty", "/uh"),
            (DOWN, "down", "/uf"),
        ] {
            let conn = Conn::h1(sa(vip, 80)).await;
            out.push((path, conn.get(host, path, &[]).await.status));
        }
        out
    });
    assert_eq!(
        statuses,
        [
            ("/known/1", 200),
            ("/unknown", 404),
            ("/uh", 503),
            ("/uf", 503)
        ]
    );
    let lines = settled(
        || access_log(&log),
        |l| {
            ["/known/1", "/unknown", "/uh", "/uf"]
                .iter()
                .all(|p| l.iter().any(|x| x["path"] == *p))
        },
    );
    let line = |path: &str| {
        lines
            .iter()
            .find(|x| x["path"] == path)
            .unwrap_or_else(|| panic!("no access-log line for {path}: {lines:#?}"))
            .clone()
    };
    for (path, code, flag) in [
        ("/unknown", 404, "NR"),
        ("/uh", 503, "UH"),
        // Istio's default retry policy retries a connect failure twice (`connect-failure`);
        // the last try's flag stands, with URX: retries exhausted (as Envoy logs it).
        ("/uf", 503, "UF,URX"),
    ] {
        let l = line(path);
        assert_eq!(l["response_code"], code, "{l}");
        assert_eq!(l["response_flags"], flag, "{l}");
        assert_eq!(l["reporter"], "source", "{l}");
    }
    // A request no route takes is still one for the Service the app addressed.
    assert_eq!(
        line("/unknown")["destination_service"],
        format!("web.{NS}.svc.cluster.local")
    );
    // Malformed requests → 400 and the connection closed; headers over the limit → 431.
    let web = sa(WEB, 80);
    let (bad_header, bad_line, big) = in_pod(&client, || async {
        let bad_header = raw_exchange(
            web,
            b"GET /known HTTP/1.1\r\nHost: web\r\nno colon here\r\n\r\n",
        )
        .await;
        let bad_line = raw_exchange(web, b"GET\x01\x02 /known HTTP/1.1\r\nHost: web\r\n\r\n").await;
        let big = format!(
            "GET /known HTTP/1.1\r\nHost: web\r\nx-big: {}\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let big = raw_exchange(web, big.as_bytes()).await;
        (bad_header, bad_line, big)
    });
    assert!(bad_header.starts_with("HTTP/1.1 400"), "{bad_header:?}");
    assert!(bad_line.starts_with("HTTP/1.1 400"), "{bad_line:?}");
    assert!(big.starts_with("HTTP/1.1 431"), "{big:?}");
    let after = in_pod(&client, || async {
        Conn::h1(web).await.get("web", "/known/2", &[]).await.status
    });
    assert_eq!(after, 200, "the proxy still serves");
    assert!(!panicked(a1), "{}", a1.log_tail());

    // A route change applies to the next request on an established HTTP/2 connection, which
    // stays up, and a response streaming across the change completes.
    let config_dirs: Vec<_> = agents.iter().map(|a| a.config_dir()).collect();
    let (before, streamed, switched, after) = in_pod(&client, || async {
        let conn = Conn::h2(sa(H2WEB, 80)).await;
        let before = conn.get("h2web", "/before", &[]).await.served_by();
        const STREAMED: u64 = 32 << 20;
        let long = conn
            .send_streaming("h2web", request("GET", &format!("/bytes/{STREAMED}"), &[]))
            .await
            .expect("a long response starts");
        for dir in &config_dirs {
            write_istio_in(dir, &h2web_to("v2"));
        }
        let deadline = Instant::now() + SETTLE;
        let mut switched = Vec::new();
        loop {
            let who = conn.get("h2web", "/during", &[]).await.served_by();
            switched.push(who.clone());
            if who == "web-v2" || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let streamed = hash_body(long.into_body())
            .await
            .map(|got| got == (STREAMED, stream_hash(STREAMED)));
        let mut after = Vec::new();
        for _ in 0..20 {
            after.push(conn.get("h2web", "/after", &[]).await.served_by());
        }
        (before, streamed, switched, after)
    });
    assert_eq!(before, "web-v1");
    assert_eq!(
        switched.last().map(String::as_str),
        Some("web-v2"),
        "the new route applies on the same connection: {switched:?}"
    );
    assert!(
        switched.iter().all(|w| w == "web-v1" || w == "web-v2"),
        "{switched:?}"
    );
    assert_eq!(
        streamed,
        Ok(true),
        "the response streaming across the change"
    );
    assert!(after.iter().all(|w| w == "web-v2"), "{after:?}");
}
