//! What L7 at the source does to the protocols it carries, through real agents (issue 11,
//! acceptance 2): HTTP/1.1 keep-alive and HTTP/2 multiplexing upstream (counted where the app
//! accepts), gRPC unary and server streaming with their status and trailers (a tonic
//! `grpc.health.v1` service), a WebSocket through `Upgrade`, and 1 GiB each way streamed, not
//! buffered (the source agent's RSS).

mod l7support;
mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, SvcPort, World};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use l7support::{
    hash_body, request, rss, rss_of, sa, start_agents, stream_hash, Conn, GrpcApp, HttpApp,
    PatternBody, WsApp, NS,
};
use support::{in_pod, SETTLE};
use tokio_tungstenite::tungstenite::Message;

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 10);
const WEB2: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 11);
const GRPC: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 12);
const WS: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 13);
const BULK: Ipv4Addr = Ipv4Addr::new(10, 96, 12, 14);
const GIB: u64 = 1 << 30;
const RSS_GROWTH_MAX: u64 = 64 << 20;

/// A client on node 1 and a server pod on node 2, each node with its agent, and `services`
/// (name, VIP, port) selecting the server.
struct Setup {
    agents: Vec<LocalAgent>,
    client: Pod,
    server: Pod,
    _world: World,
}

fn setup(test: &str, services: &[(&str, Ipv4Addr, SvcPort)]) -> Setup {
    support::raise_fd_limit();
    let world = World::new(test);
    let (n1, n2) = (world.node("n1"), world.node("n2"));
    let client = world
        .pod("client")
        .node(&n1)
        .namespace(NS)
        .label("app", "client")
        .spawn();
    let server = world
        .pod("server")
        .node(&n2)
        .namespace(NS)
        .label("app", "server")
        .label("version", "v1")
        .spawn();
    let mut yaml = ClusterYaml::new().ambient(NS).pods([&client, &server]);
    for (name, vip, port) in services {
        yaml = yaml.service(name, NS, *vip, std::slice::from_ref(port), &[&server], true);
    }
    let agents = start_agents(
        &world,
        &[(&n1, &[&client]), (&n2, &[&server])],
        &yaml,
        "",
        &[],
    );
    Setup {
        agents,
        client,
        server,
        _world: world,
    }
}

/// HTTP/1.1 upstream connections are pooled with keep-alive (across client connections of one
/// pod); HTTP/2 ones (port `http2`) carry concurrent requests as streams of one connection.
#[test]
fn http1_keep_alive_and_http2_multiplexing_upstream() {
    let Setup { client, server, .. } = &setup(
        "l7-keepalive",
        &[
            ("web", WEB, SvcPort::named("http", 80, 8080)),
            ("web2", WEB2, SvcPort::named("http2", 80, 8081)),
        ],
    );
    let web = HttpApp::start(server, 8080);
    let web2 = HttpApp::start(server, 8081);
    // HTTP/1.1 keep-alive: 100 requests on one client connection, then 20 more on a second
    // client connection of the same pod, reach the app over one upstream connection.
    in_pod(client, || async {
        for round in 0..2 {
            let conn = Conn::h1(sa(WEB, 80)).await;
            for i in 0..(if round == 0 { 100 } else { 20 }) {
                let r = conn.get("web", &format!("/ka/{i}"), &[]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.json()["version"], "HTTP/1.1");
            }
        }
    });
    assert_eq!(
        web.accepted(),
        1,
        "HTTP/1.1 upstream connections the app accepted for 120 sequential requests"
    );

    // An upstream connection the app closes is noticed and replaced: the next request is
    // not failed.
    let after_close = in_pod(client, || async {
        let conn = Conn::h1(sa(WEB, 80)).await;
        let mut statuses = Vec::new();
        for i in 0..30 {
            statuses.push(conn.get("web", "/close", &[]).await.status);
            statuses.push(
                conn.get("web", &format!("/after-close/{i}"), &[])
                    .await
                    .status,
            );
        }
        statuses
    });
    assert!(after_close.iter().all(|s| *s == 200), "{after_close:?}");

    // HTTP/2 (port `http2`): 100 concurrent requests on one client connection stay HTTP/2 up
    // to the app. (How many upstream connections carry them: see
    // `http2_multiplexes_100_concurrent_requests_on_one_upstream_connection`.)
    let versions = in_pod(client, || async {
        let conn = Conn::h2(sa(WEB2, 80)).await;
        assert_eq!(conn.get("web2", "/warm", &[]).await.status, 200);
        let replies = futures::future::join_all((0..100).map(|i| {
            let conn = conn.clone();
            async move { conn.get("web2", &format!("/mux/{i}"), &[]).await }
        }))
        .await;
        replies
            .iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["version"].as_str().unwrap_or("").to_string()
            })
            .collect::<Vec<_>>()
    });
    assert!(versions.iter().all(|v| v == "HTTP/2.0"), "{versions:?}");
    assert!(web2.accepted() >= 1);
}

/// Issue 11: HTTP/2 upstream is "multiplexed on one upstream connection per endpoint" (Envoy's
/// pool opens one connection and queues streams on it, up to its stream limit). 100 concurrent
/// requests, first cold (no connection yet), then again on the warm connection, should reach
/// the app over one connection.
#[test]
fn http2_multiplexes_100_concurrent_requests_on_one_upstream_connection() {
    let Setup { client, server, .. } = &setup(
        "l7-h2-cold",
        &[("web2", WEB2, SvcPort::named("http2", 80, 8081))],
    );
    let web2 = HttpApp::start(server, 8081);
    in_pod(client, || async {
        let conn = Conn::h2(sa(WEB2, 80)).await;
        let replies = futures::future::join_all((0..100).map(|i| {
            let conn = conn.clone();
            async move { conn.get("web2", &format!("/cold/{i}"), &[]).await }
        }))
        .await;
        assert!(replies.iter().all(|r| r.status == 200));
    });
    let cold = web2.accepted();
    in_pod(client, || async {
        let conn = Conn::h2(sa(WEB2, 80)).await;
        let replies = futures::future::join_all((0..100).map(|i| {
            let conn = conn.clone();
            async move { conn.get("web2", &format!("/warm/{i}"), &[]).await }
        }))
        .await;
        assert!(replies.iter().all(|r| r.status == 200));
    });
    let warm = web2.accepted() - cold;
    assert_eq!(
        (cold, warm),
        (1, 0),
        "HTTP/2 upstream connections the app accepted for 100 concurrent first requests, then \
         for 100 more"
    );
}

/// gRPC (port `grpc`): unary and server-streaming calls of a real tonic service.
#[test]
fn grpc_unary_and_server_streaming_keep_status_and_trailers() {
    let Setup { client, server, .. } = &setup(
        "l7-grpc",
        &[("grpc", GRPC, SvcPort::named("grpc", 9090, 9090))],
    );
    let grpc = GrpcApp::start(server, 9090);
    // gRPC: unary Check (OK and NOT_FOUND, whose status only the trailers carry) and the
    // server-streaming Watch, through the mesh.
    in_pod(client, || async {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{GRPC}:9090"))
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connect");
        let mut health = HealthClient::new(channel);
        let ask = |service: &str| {
            tonic::Request::new(HealthCheckRequest {
                service: service.into(),
            })
        };
        let ok = health
            .check(ask("ambit.Serving"))
            .await
            .expect("Check(ambit.Serving)");
        assert_eq!(ok.get_ref().status, ServingStatus::Serving as i32);
        let missing = health
            .check(ask("ambit.Missing"))
            .await
            .expect_err("Check(ambit.Missing) fails");
        assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
        assert_eq!(missing.message(), "service not registered");
        let mut watch = health
            .watch(ask("ambit.Flip"))
            .await
            .expect("Watch(ambit.Flip)")
            .into_inner();
        let mut seen = Vec::new();
        while seen.len() < 6 {
            let msg = tokio::time::timeout(SETTLE, watch.message())
                .await
                .expect("a Watch update in time")
                .expect("Watch stream")
                .expect("Watch stream ended early");
            seen.push(msg.status);
        }
        assert!(
            seen.windows(2).all(|w| w[0] != w[1]),
            "each update is a change: {seen:?}"
        );
    });
    // The same unary call made by hand: the message, then the status in the trailers.
    let (head, trailers, message) = in_pod(client, || async {
        let conn = Conn::h2(sa(GRPC, 9090)).await;
        let service = b"ambit.Serving";
        // Length-prefixed message: HealthCheckRequest { service (field 1, a string) }.
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(service.len() as u32 + 2).to_be_bytes());
        frame.extend_from_slice(&[0x0a, service.len() as u8]);
        frame.extend_from_slice(service);
        let mut req = request(
            "POST",
            "/grpc.health.v1.Health/Check",
            &[("content-type", "application/grpc"), ("te", "trailers")],
        );
        *req.body_mut() = http_body_util::Full::new(bytes::Bytes::from(frame)).boxed();
        let resp = conn
            .send_streaming("grpc:9090", req)
            .await
            .expect("a hand-made gRPC call");
        let (head, body) = resp.into_parts();
        let collected = body.collect().await.expect("gRPC body");
        let trailers = collected.trailers().cloned();
        (head, trailers, collected.to_bytes())
    });
    assert_eq!(head.status, 200);
    assert_eq!(
        head.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/grpc"[..]),
        "{head:?}"
    );
    // HealthCheckResponse { status: SERVING (1) }.
    assert_eq!(&message[..], [0, 0, 0, 0, 2, 0x08, 0x01], "{message:?}");
    let trailers = trailers.expect("trailers after the message");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    assert!(grpc.accepted.load(Ordering::SeqCst) >= 1);
}

/// A WebSocket (HTTP/1.1 `Upgrade`) on an `http` port.
#[test]
fn websocket_upgrade_is_passed_through_after_routing() {
    let Setup { client, server, .. } = &setup(
        "l7-websocket",
        &[("ws", WS, SvcPort::named("http-ws", 80, 8090))],
    );
    let _ws = WsApp::start(server, 8090);
    // WebSocket: the Upgrade goes through after the route is chosen; text and binary echo.
    in_pod(client, || async {
        let tcp = l7support::connect(sa(WS, 80)).await;
        let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.mesh/echo", tcp)
            .await
            .expect("WebSocket handshake through the mesh");
        assert_eq!(resp.status(), 101);
        let binary: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for msg in [
            Message::text("hello through the mesh"),
            Message::binary(binary.clone()),
            Message::text("bye"),
        ] {
            ws.send(msg.clone()).await.expect("send");
            let back = tokio::time::timeout(SETTLE, ws.next())
                .await
                .expect("echo in time")
                .expect("echo")
                .expect("echo frame");
            assert_eq!(back, msg);
        }
        ws.close(None).await.expect("close");
    });
}

/// Bodies stream through the source's proxy: 1 GiB each way, intact, while the agent's RSS
/// stays within 64 MiB of where it started.
#[test]
fn one_gib_bodies_stream_both_ways_without_buffering() {
    let Setup {
        agents,
        client,
        server,
        ..
    } = &setup(
        "l7-bulk",
        &[("bulk", BULK, SvcPort::named("http", 80, 8082))],
    );
    let a1 = &agents[0];
    let _bulk = HttpApp::start(server, 8082);
    // 1 GiB up and 1 GiB down, hash-compared, while the source agent's RSS is sampled.
    let expected = stream_hash(GIB);
    let baseline = rss(a1);
    let peak = Arc::new(AtomicU64::new(baseline));
    let stop = Arc::new(AtomicBool::new(false));
    let pid = a1.pid().expect("pid");
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmRSS:"))
                            .and_then(|v| {
                                v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()
                            })
                    })
                {
                    peak.fetch_max(kb * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (up, down) = in_pod(client, || async {
        let conn = Conn::h1(sa(BULK, 80)).await;
        let mut req = request("POST", "/upload", &[]);
        *req.body_mut() = PatternBody::new(GIB).boxed();
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, GIB.into());
        let up = conn.send("bulk", req).await.expect("1 GiB upload").json();
        let resp = conn
            .send_streaming("bulk", request("GET", &format!("/bytes/{GIB}"), &[]))
            .await
            .expect("1 GiB download");
        assert_eq!(resp.status(), 200);
        let down = hash_body(resp.into_body()).await.expect("download body");
        (up, down)
    });
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert_eq!(up["len"], GIB, "request body length at the app: {up}");
    assert_eq!(
        up["hash"],
        expected.to_string(),
        "request body intact at the app"
    );
    assert_eq!(down, (GIB, expected), "response body intact at the client");
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "source agent RSS: baseline {} KiB, peak {} KiB",
        baseline >> 10,
        peak.load(Ordering::Relaxed) >> 10
    );
    assert!(
        growth < RSS_GROWTH_MAX,
        "the source agent's RSS grew by {} MiB during 2 GiB of bodies (baseline {} MiB)",
        growth >> 20,
        baseline >> 20
    );
}

/// [`H2_CONNS`] HTTP/2 connections, each making `requests` requests in turn, each answered with a header
/// value the connection has not seen (HPACK indexes it). Returns the client agent's RSS while
/// the connections are still open.
async fn unique_headers_over_h2(agent_pid: u32, requests: usize) -> u64 {
    let conns = futures::future::join_all((0..H2_CONNS).map(|_| Conn::h2(sa(WEB, 80)))).await;
    futures::future::join_all(conns.iter().enumerate().map(|(c, conn)| async move {
        for i in 0..requests {
            let r = conn.get("web", &format!("/unique/{c}x{i}"), &[]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.headers.contains_key("x-unique"), "{:?}", r.headers);
        }
    }))
    .await;
    let rss = rss_of(agent_pid);
    drop(conns);
    rss
}

/// Forwarded response headers must not pin the upstream connection's read buffers in the app's
/// HTTP/2 HPACK table: hyper parses HTTP/1.1 headers as slices of its read buffer, and the
/// table keeps the values it indexes for the connection's life. The same connections are made
/// twice, first indexing one new value each, then 300: pinned, each value in the table held an
/// 8 KiB+ buffer (about 40 live per connection: 25 MB and more over 128 connections, and in the
/// benchmark 0.6 MB more each second from `date` alone); unpinned, the two rounds cost the
/// agent the same.
#[test]
fn http2_clients_indexing_new_header_values_do_not_pin_upstream_buffers() {
    let Setup {
        agents,
        client,
        server,
        ..
    } = &setup(
        "l7-hpack-pin",
        &[("web", WEB, SvcPort::named("http", 80, 8080))],
    );
    let _web = HttpApp::start(server, 8080);
    let pid = agents[0].pid().expect("client agent running");
    // A first round brings the agent's pools and allocator to their working size.
    in_pod(client, || unique_headers_over_h2(pid, 20));
    let one = in_pod(client, || unique_headers_over_h2(pid, 1));
    let many = in_pod(client, || unique_headers_over_h2(pid, 300));
    let growth = many.saturating_sub(one);
    assert!(
        growth < HPACK_GROWTH_MAX,
        "client agent RSS with {H2_CONNS} HTTP/2 connections open: {one} bytes after one new \
         header value each, {many} after 300 ({:.1} MB more; at most {} MB expected)",
        growth as f64 / 1e6,
        HPACK_GROWTH_MAX >> 20
    );
}

const H2_CONNS: usize = 128;

/// What the second round may add (the agent's own noise); pinning added three times this.
const HPACK_GROWTH_MAX: u64 = 10 << 20;
