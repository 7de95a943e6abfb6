//! Destination-side HTTP/1.1 relayed as bytes (`http::passthrough`): an app that answers with
//! every framing HTTP/1.1 has (chunked with extensions and trailers, HEAD, 204, an informational
//! response first, a head split over writes, a body that ends with the connection, an app that
//! closes while idle or without answering) behind the server's node, reached over HBONE through
//! the client's node. Each answer arrives whole, the destination records each request with its
//! status and sizes, and a request the relay cannot follow (a chunked body) goes to the full server
//! with what was read of it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::fixture::*;

/// Answers by path with raw bytes: see the module's doc.
async fn raw_app(mut tcp: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let (head_len, method, path, length, id) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let length = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                let id = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("x-request-id"))
                    .map_or("none".into(), |h| {
                        String::from_utf8_lossy(h.value).into_owned()
                    });
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                break (n, method, path, length, id);
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_len + length {
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len + length);
        let answer: &[&[u8]] = match (method.as_str(), path.as_str()) {
            (_, "/chunked") => &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"],
            ("HEAD", "/head") => &[b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"],
            (_, "/nocontent") => &[b"HTTP/1.1 204 No Content\r\nx-raw: 1\r\n\r\n"],
            (_, "/early") => &[
                b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
            (_, "/split") => &[
                b"HTTP/1.1 200 OK\r\ncont",
                b"ent-length: 5\r\n\r\nhel",
                b"lo",
            ],
            (_, "/idle-close") => &[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye"],
            (_, "/eof") => &[b"HTTP/1.1 200 OK\r\n\r\nuntil-close"],
            (_, "/short") => &[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"],
            (_, "/drop") => return,
            (_, "/expect") => &[b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\nmade"],
            _ => {
                let body = if path == "/id" {
                    id
                } else if path.starts_with("/echo-head") {
                    head
                } else {
                    format!("{method} {path} {length}")
                };
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let _ = tcp.write_all(format!("{head}{body}").as_bytes()).await;
                continue;
            }
        };
        for part in answer {
            if tcp.write_all(part).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if path == "/idle-close" || path == "/eof" || path == "/short" {
            // Closes after the answer, `/idle-close` without saying so, `/short` 7 bytes early.
            return;
        }
    }
}

/// [`raw_app`] on `server`'s port 8080, each connection on a task of its own.
pub(super) async fn serve_raw(mesh: &Mesh, server: &Pod) -> tokio::task::JoinHandle<()> {
    let listener = mesh.listen(server.addr(8080)).await;
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await;
            tokio::spawn(raw_app(tcp));
        }
    })
}

/// A client pod on n1 and `web` on n2, behind Service `web` (port 80, `http`, to 8080), with
/// `yaml` and no access log; `web`'s address.
async fn web_mesh(yaml: &str) -> (Mesh, Pod, Pod, SocketAddr) {
    web_mesh_logged(yaml, false).await
}

/// [`web_mesh`], with every node's access log when `logged`.
async fn web_mesh_logged(yaml: &str, logged: bool) -> (Mesh, Pod, Pod, SocketAddr) {
    let mut world = World::new();
    if !logged {
        world.no_access_log();
    }
    let client = world.pod("client").node("n1").add();
    let server = world.pod("web").node("n2").app("web").add();
    let vip = world
        .service("web")
        .named_port("http", 80, 8080)
        .backends(&[&server])
        .add();
    if !yaml.is_empty() {
        world.yaml(yaml);
    }
    (
        world.start().await,
        client,
        server,
        SocketAddr::new(vip, 80),
    )
}

#[tokio::test]
async fn every_http1_framing_is_relayed_whole_and_recorded_with_its_sizes() {
    let (mesh, client, server, web) = web_mesh("").await;
    let listener = mesh.listen(server.addr(8080)).await;
    let closed = Arc::new(AtomicUsize::new(0));
    let count = closed.clone();
    let app = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await;
            let count = count.clone();
            tokio::spawn(async move {
                raw_app(tcp).await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let mut conn = mesh.h1(&client, web).await;
    let req = |path: &str| get(path, &[("host", "web")]);

    let r = conn.call(req("/chunked")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello world"));
    let mut head = req("/head");
    *head.method_mut() = http::Method::HEAD;
    let r = conn.call(head).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, ""));
    assert_eq!(r.header("content-length"), "1234");
    let r = conn.call(req("/nocontent")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (204, ""));
    let r = conn.call(req("/early")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    let mut upload = req("/upload");
    *upload.method_mut() = http::Method::POST;
    *upload.body_mut() = full("abcdefghij");
    let r = conn.call(upload).await;
    assert_eq!(r.text(), "POST /upload 10");
    let r = conn.call(req("/split")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello"));
    let r = conn.call(req("/idle-close")).await;
    assert_eq!(r.text(), "bye");
    // The app closed that connection after answering, without a word: the next request reaches
    // it on a new one.
    let n2 = mesh.node("n2");
    within("the app to close its connection", async {
        while closed.load(Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let r = conn.call(req("/after")).await;
    assert_eq!(r.text(), "GET /after 0");
    let r = conn.call(req("/eof")).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "until-close"));
    let r = conn.call(req("/drop")).await;
    assert_eq!(r.status.as_u16(), 503, "{}", r.text());
    // Istio's default retry policy sends a 503 again (twice): each try is a request here.
    let n1 = mesh.node("n1");
    let retries = n1.count(|c| &c.http_retries);
    assert_eq!(retries, 2);
    assert_eq!(n2.count(|c| &c.http_inbound_relayed), 10 + retries);

    // A request the relay leaves to the full server, with the bytes it read of it: a body of
    // unknown length, which the source's node sends chunked.
    let mut chunked_upload = req("/expect");
    *chunked_upload.method_mut() = http::Method::POST;
    let frames = [Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"12345",
    )))];
    *chunked_upload.body_mut() = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        futures::stream::iter(frames),
    ));
    let r = conn.call(chunked_upload).await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (201, "made"));
    assert_eq!(n2.count(|c| &c.http_inbound_relayed), 10 + retries);

    let at = |reporter: &'static str, code: &'static str| {
        [
            ("reporter", reporter),
            ("response_code", code),
            ("destination_workload", "web"),
        ]
    };
    n2.wait_metric("istio_requests_total", &at("destination", "200"), 8)
        .await;
    n2.wait_metric("istio_requests_total", &at("destination", "204"), 1)
        .await;
    n2.wait_metric("istio_requests_total", &at("destination", "503"), 3)
        .await;
    n2.wait_metric("istio_requests_total", &at("destination", "201"), 1)
        .await;
    n1.wait_metric("istio_requests_total", &at("source", "200"), 8)
        .await;
    let dst = n2.metrics();
    // The 204's one header, `x-raw: 1`, as `name: value\r\n`.
    assert_eq!(
        dst.value("istio_response_bytes_sum", &at("destination", "204")),
        Some(10)
    );
    // Each 200's headers as `name: value\r\n` and its data (chunk framing, trailers and the 103
    // are not counted), as the full server counts them: /chunked 28 + 11, HEAD /head 22 + 0,
    // /early 19 + 2, /upload 20 + 15, /split 19 + 5, /idle-close 19 + 3, /after 20 + 12, /eof 0 + 11.
    assert_eq!(
        dst.value("istio_response_bytes_sum", &at("destination", "200")),
        Some(206),
        "{}",
        lines_with(&dst, "istio_response_bytes_sum")
    );
    let flags = [
        ("reporter", "destination"),
        ("response_code", "503"),
        ("response_flags", "UC"),
    ];
    assert_eq!(dst.value("istio_requests_total", &flags), Some(3));
    app.abort();
}

/// A pool lets an idle HTTP/1.1 connection go (`connectionPool.http.idleTimeout`) by ending its
/// HBONE stream: at the destination that is the end of a connection, not a reset.
#[tokio::test]
async fn a_relayed_connection_the_pool_lets_go_ends_without_a_reset() {
    let (mesh, client, server, web) = web_mesh(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  trafficPolicy: {connectionPool: {http: {idleTimeout: 200ms}}}
"#,
    )
    .await;
    let app = mesh.http_app(server.addr(8080), "web").await;
    let mut conn = mesh.h1(&client, web).await;
    assert_eq!(conn.get("web", "/", &[]).await.status, 200);
    let n2 = mesh.node("n2");
    assert_eq!(n2.count(|c| &c.http_inbound_relayed), 1);
    eventually("the idle connection's stream has ended", || {
        n2.count(|c| &c.relays_completed) + n2.count(|c| &c.relays_reset) == 1
    })
    .await;
    assert_eq!(n2.count(|c| &c.relays_reset), 0);
    eventually("the app's connection is closed", || app.closed() == 1).await;
}

/// A client that goes away in the middle of its request's body is not waited on: the app's
/// connection is closed with it (the app would otherwise wait for the rest for ever), and the
/// request is recorded with flag DC.
#[tokio::test]
async fn a_request_abandoned_mid_body_closes_the_app_connection() {
    let (mesh, client, server, web) = web_mesh("").await;
    let listener = mesh.listen(server.addr(8080)).await;
    // The app reads the request's head and the body's first bytes, says so, and reads on until
    // its connection closes.
    let (got_start, started) = tokio::sync::oneshot::channel::<()>();
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let app = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await;
        let mut seen = Vec::new();
        let mut got_start = Some(got_start);
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = tcp.read(&mut chunk).await {
            seen.extend_from_slice(&chunk[..n]);
            if seen.ends_with(b"\r\n\r\nabc") {
                if let Some(tx) = got_start.take() {
                    let _ = tx.send(());
                }
            }
        }
        let _ = closed_tx.send(seen);
    });
    let mut conn = mesh.h1(&client, web).await;
    let mut upload = get("/upload", &[("host", "web"), ("content-length", "10")]);
    *upload.method_mut() = http::Method::POST;
    let (give_up, gave_up) = tokio::sync::oneshot::channel::<()>();
    let first = futures::stream::iter([Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"abc",
    )))]);
    let then_fail = futures::stream::once(async move {
        let _ = gave_up.await;
        Err(std::io::Error::other("the client gives up"))
    });
    *upload.body_mut() = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        futures::StreamExt::chain(first, then_fail),
    ));
    let sent = tokio::spawn(conn.sender.send_request(upload));
    within("the app to get the request's start", started)
        .await
        .expect("the app got the start");
    let _ = give_up.send(());
    let sent = within("the request to fail", sent).await.expect("join");
    assert!(sent.is_err(), "{sent:?}");
    let seen = within("the app's connection to close", closed)
        .await
        .expect("the app saw its close");
    assert!(seen.ends_with(b"abc"), "{}", String::from_utf8_lossy(&seen));
    let n2 = mesh.node("n2");
    assert_eq!(n2.count(|c| &c.http_inbound_relayed), 1);
    n2.wait_metric(
        "istio_requests_total",
        &[("reporter", "destination"), ("response_flags", "DC")],
        1,
    )
    .await;
    app.abort();
}

/// A request without an `x-request-id` (a client whose node relays it at L4: a pod address, no
/// Service) is still relayed, and reaches the app with one, as Envoy's inbound generates it.
#[tokio::test]
async fn a_request_without_an_id_gets_one_on_its_way() {
    let mut world = World::new();
    world.no_access_log();
    let client = world.pod("client").node("n1").add();
    let server = world.pod("web").node("n2").app("web").add();
    let mesh = world.start().await;
    let app = serve_raw(&mesh, &server).await;
    let mut tcp = mesh.connect(&client, server.addr(8080)).await;
    tcp.write_all(b"GET /id HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .expect("request");
    let mut got = Vec::new();
    let text = within("the answer", async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some((_, body)) = text.split_once("\r\n\r\n") {
                if body.len() >= 36 || body == "none" {
                    return text;
                }
            }
        }
    })
    .await;
    let (head, id) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{text}");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "the app saw {id:?}");
    assert_eq!(mesh.node("n2").count(|c| &c.http_inbound_relayed), 1);
    app.abort();
}

/// The install guides' mesh config (tracing on, to a Zipkin address), sampling 0 %.
const TRACING_MESH: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    enableTracing: true
    defaultConfig:
      tracing:
        sampling: 0
        zipkin:
          address: 127.0.0.1:9411
"#;

/// With tracing on, the relay writes the head again with its SERVER span's context in place of
/// the caller's, as the full server does, and every other header's values (a repeated one's in
/// their order).
#[tokio::test]
async fn a_traced_request_is_relayed_with_the_server_spans_context() {
    let (mesh, client, server, web) = web_mesh(TRACING_MESH).await;
    let app = serve_raw(&mesh, &server).await;
    let mut conn = mesh.h1(&client, web).await;
    let (trace, span) = ("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d312");
    let req = get(
        "/echo-head?q=1",
        &[
            ("host", "web"),
            ("x-b3-traceid", trace),
            ("x-b3-spanid", span),
            ("x-b3-sampled", "0"),
            ("x-dup", "1"),
            ("x-custom", "v"),
            ("x-dup", "2"),
        ],
    );
    let r = conn.call(req).await;
    assert_eq!(r.status.as_u16(), 200);
    let head = r.text();
    let values = |name: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| {
                let (n, v) = l.split_once(": ")?;
                n.eq_ignore_ascii_case(name).then(|| v.to_string())
            })
            .collect()
    };
    assert!(
        head.starts_with("GET /echo-head?q=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert_eq!(values("x-b3-traceid"), [trace], "{head}");
    assert_eq!(values("x-b3-sampled"), ["0"], "{head}");
    let (parent, own) = (values("x-b3-parentspanid"), values("x-b3-spanid"));
    assert_eq!((parent.len(), own.len()), (1, 1), "{head}");
    // The caller's span is the parent of n1's CLIENT span, whose own is the parent of n2's
    // SERVER span: the app sees the latter, two hops from the caller's.
    assert_ne!(
        parent[0], span,
        "the destination wrote its span's context:\n{head}"
    );
    assert_ne!(own[0], parent[0], "{head}");
    assert_eq!(values("x-dup"), ["1", "2"], "{head}");
    assert_eq!(values("x-custom"), ["v"], "{head}");
    assert_eq!(values("x-request-id").len(), 1, "{head}");
    assert_eq!(mesh.node("n2").count(|c| &c.http_inbound_relayed), 1);
    app.abort();
}

/// With the mesh-wide access log on (every node's, as `accessLogFile` turns on), the relay logs
/// each request it relays with the fields the full server logs; an app that fails before its
/// response is logged as Envoy logs it (`UC`, `upstream_reset_before_response_started`).
#[tokio::test]
async fn a_logged_request_is_relayed_and_logged_at_the_destination() {
    let (mesh, client, server, web) = web_mesh_logged("", true).await;
    let app = serve_raw(&mesh, &server).await;
    let mut conn = mesh.h1(&client, web).await;
    let headers = |id| {
        [
            ("host", "web"),
            ("x-request-id", id),
            ("user-agent", "ua-test"),
        ]
    };
    let r = conn.call(get("/logged?x=1", &headers("logged-1"))).await;
    assert_eq!(r.text(), "GET /logged?x=1 0");
    let n2 = mesh.node("n2");
    let line = n2.wait_log(&[("request_id", "logged-1")]).await;
    for (field, want) in [
        ("reporter", "destination"),
        ("method", "GET"),
        ("path", "/logged?x=1"),
        ("authority", "web"),
        ("protocol", "HTTP/1.1"),
        ("response_code_details", "via_upstream"),
        ("response_flags", "-"),
        ("upstream_cluster", "inbound|8080||"),
        ("user_agent", "ua-test"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(line[field], want, "{field} in {line:#}");
    }
    assert_eq!(line["response_code"], 200, "{line:#}");
    assert_eq!(line["bytes_sent"], 17, "{line:#}");

    let mut conn = mesh.h1(&client, web).await;
    let r = conn.call(get("/drop", &headers("dropped"))).await;
    assert_eq!(r.status.as_u16(), 503, "{}", r.text());
    // Istio's default retry policy tries twice more: three requests at the destination.
    let dropped = || -> Vec<serde_json::Value> {
        n2.access_log()
            .into_iter()
            .filter(|l| l["request_id"] == "dropped")
            .collect()
    };
    eventually("three logged tries", || dropped().len() >= 3).await;
    let lines = dropped();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["response_code"], 503, "{l:#}");
        assert_eq!(l["response_flags"], "UC", "{l:#}");
        assert_eq!(
            l["response_code_details"], "upstream_reset_before_response_started",
            "{l:#}"
        );
    }
    assert_eq!(n2.count(|c| &c.http_inbound_relayed), 4);
    app.abort();
}
