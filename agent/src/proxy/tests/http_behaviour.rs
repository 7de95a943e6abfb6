//! What an operator sees of one routed request: the headers the app receives (a rewrite, Envoy's
//! `x-request-id` and `x-forwarded-proto`), the access-log line at the source, a route change
//! taking effect on an open HTTP/2 connection, and a server-first protocol on an undeclared port.

use std::net::SocketAddr;
use std::time::Duration;

use http::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::fixture::*;

const PORT: u16 = 8080;

/// Istio's VirtualService `rewrite` and `headers.response`; Envoy's request id and forwarded
/// proto; the source's access-log line with Envoy's field names: the original path and authority,
/// the route's name, the cluster, the response code details and the request id the app saw.
#[tokio::test]
async fn a_rewritten_request_is_logged_as_the_app_sent_it_and_reaches_the_app_rewritten() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let web = world.pod("web").node("n2").app("web").add();
    let vip = world
        .service("web")
        .named_port("http", PORT, PORT)
        .backends(&[&web])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - name: old-to-new
    match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new, authority: web.internal}
    headers:
      response: {set: {x-route: old-to-new}}
    route: [{destination: {host: web}}]
  - route: [{destination: {host: web}}]
"#,
    );
    let mesh = world.start().await;
    let app = mesh.http_app(web.addr(PORT), "web").await;
    let mut conn = mesh.h1(&client, SocketAddr::new(vip, PORT)).await;

    let reply = conn
        .get(
            "web",
            "/old/page?q=1",
            &[("x-request-id", "req-1"), ("user-agent", "ua-test")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-route"), "old-to-new");
    assert_eq!(reply.header("x-app"), "web");
    let seen = app.last();
    assert_eq!(seen.method, http::Method::GET);
    assert_eq!(
        seen.path, "/new/page?q=1",
        "the prefix is rewritten, the query kept"
    );
    assert_eq!(seen.authority, "web.internal");
    assert_eq!(
        seen.version,
        Version::HTTP_11,
        "an `http` port stays HTTP/1.1 upstream"
    );
    assert_eq!(seen.headers["x-request-id"], "req-1", "kept when present");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");

    let line = mesh.node("n1").wait_log(&[("request_id", "req-1")]).await;
    for (field, want) in [
        ("reporter", "source"),
        ("method", "GET"),
        ("path", "/old/page?q=1"),
        ("authority", "web"),
        ("protocol", "HTTP/1.1"),
        ("response_code_details", "via_upstream"),
        ("response_flags", "-"),
        ("route_name", "old-to-new"),
        (
            "upstream_cluster",
            "outbound|8080||web.mesh.svc.cluster.local",
        ),
        ("user_agent", "ua-test"),
        ("destination_service", "web.mesh.svc.cluster.local"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(line[field], want, "{field} in {line:#}");
    }
    assert_eq!(line["response_code"], 200, "{line:#}");
    // As Envoy logs it with iptables: the app's own address, and the address it dialled.
    assert!(
        line["downstream_remote_address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", client.ip))),
        "{line:#}"
    );
    assert_eq!(line["downstream_local_address"], format!("{vip}:{PORT}"));
    assert!(
        line["upstream_host"]
            .as_str()
            .is_some_and(|h| h.starts_with(&web.ip.to_string())),
        "the endpoint chosen: {line:#}"
    );

    // Without an id, Envoy generates one (a UUID) and the log carries the one the app saw.
    let reply = conn.get("web", "/other", &[]).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers.get("x-route").is_none(),
        "only the first route sets it"
    );
    let id = app.last().headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "a UUID: {id}");
    let line = mesh.node("n1").wait_log(&[("request_id", &id)]).await;
    assert_eq!(line["path"], "/other");
    assert!(
        line.get("route_name").is_none(),
        "the second route has no name: {line:#}"
    );
}

/// Istio: a VirtualService change applies to the next request; an open HTTP/2 client connection
/// is not broken by it (the proxy reads the snapshot per request).
#[tokio::test]
async fn a_route_change_applies_to_the_next_request_on_an_open_http2_connection() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let v1 = world
        .pod("web-v1")
        .node("n2")
        .app("web")
        .label("version", "v1")
        .add();
    let v2 = world
        .pod("web-v2")
        .node("n2")
        .app("web")
        .label("version", "v2")
        .add();
    let vip = world
        .service("web")
        .named_port("http2", PORT, PORT)
        .backends(&[&v1, &v2])
        .add();
    world.yaml(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec:
  hosts: [web]
  http:
  - route: [{destination: {host: web, subset: one}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: mesh}
spec:
  host: web
  subsets:
  - {name: one, labels: {version: v1}}
  - {name: two, labels: {version: v2}}
"#,
    );
    let mut mesh = world.start().await;
    let _a = mesh.http_app(v1.addr(PORT), "v1").await;
    let _b = mesh.http_app(v2.addr(PORT), "v2").await;
    let conn = mesh.h2(&client, SocketAddr::new(vip, PORT)).await;
    for _ in 0..5 {
        assert_eq!(conn.get("web", "/", &[]).await.text(), "v1 /");
    }
    mesh.republish("subset: one}}]", "subset: two}}]");
    for _ in 0..5 {
        let reply = conn.get("web", "/", &[]).await;
        assert_eq!(
            reply.text(),
            "v2 /",
            "the same client connection, the new route"
        );
    }
    assert_eq!(
        mesh.node("n1").count(|c| &c.outbound_http),
        1,
        "one client connection throughout"
    );
}

/// Istio documents that server-first protocols must be declared TCP; on an undeclared port the
/// proxy waits for the client's first bytes only up to the detection timeout, then forwards at
/// L4, so a server-first app's greeting arrives (late, not never).
#[tokio::test]
async fn a_server_first_protocol_on_an_undeclared_port_is_forwarded_after_the_detection_timeout() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let db = world.pod("db").node("n2").add();
    let vip = world.service("db").port(PORT, PORT).backends(&[&db]).add();
    world.protocol_detection_timeout(Duration::from_millis(200));
    let mesh = world.start().await;
    let listener = mesh.listen(db.addr(PORT)).await;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await;
        s.write_all(b"220 ready\r\n").await.expect("greeting");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("the client's reply");
        s.write_all(&buf).await.expect("echo");
    });
    let mut c = mesh.connect(&client, SocketAddr::new(vip, PORT)).await;
    assert_eq!(read_line(&mut c).await, "220 ready\r\n");
    c.write_all(b"QUIT").await.expect("write");
    assert_eq!(read_exact(&mut c, 4).await, b"QUIT");
    within("the app", server).await.expect("app task");
    let n1 = mesh.node("n1");
    assert_eq!(n1.count(|c| &c.outbound_sniffed), 1);
    assert_eq!(n1.count(|c| &c.outbound_http), 0, "not taken for HTTP");
}

/// Istio's ServiceEntry as a routing target: a `STATIC` entry's endpoints, outside the mesh, are
/// reached in plaintext through a VirtualService's subsets (the DestinationRule's subsets select
/// endpoints by their labels); a `NONE` entry's port is routed at L7 and forwarded to the address
/// the app dialled.
#[tokio::test]
async fn service_entry_hosts_are_routed_static_by_subset_and_none_to_the_original_destination() {
    let mut world = World::new();
    let client = world.pod("client").node("n1").add();
    let (ext1, ext2, ext_vip, passthrough) = (
        world.outside_ip(),
        world.outside_ip(),
        world.outside_ip(),
        world.outside_ip(),
    );
    world.yaml(&format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: mesh}}
spec:
  hosts: [api.example.com]
  addresses: ["{ext_vip}"]
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - {{address: "{ext1}", labels: {{version: v1}}}}
  - {{address: "{ext2}", labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: mesh}}
spec:
  host: api.example.com
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: mesh}}
spec:
  hosts: [api.example.com]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: api.example.com, subset: v2}}}}]
  - route: [{{destination: {{host: api.example.com, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: mesh}}
spec:
  hosts: [legacy.internal]
  addresses: ["{passthrough}"]
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: legacy, namespace: mesh}}
spec:
  hosts: [legacy.internal]
  http:
  - headers: {{response: {{set: {{x-routed: legacy}}}}}}
    route: [{{destination: {{host: legacy.internal}}}}]
"#
    ));
    let mesh = world.start().await;
    let _v1 = mesh.http_app(SocketAddr::new(ext1, PORT), "ext-v1").await;
    let _v2 = mesh.http_app(SocketAddr::new(ext2, PORT), "ext-v2").await;
    let _legacy = mesh
        .http_app(SocketAddr::new(passthrough, PORT), "legacy")
        .await;

    let mut api = mesh.h1(&client, SocketAddr::new(ext_vip, PORT)).await;
    for _ in 0..3 {
        let jason = api
            .get("api.example.com", "/", &[("end-user", "jason")])
            .await;
        assert_eq!(jason.text(), "ext-v2 /");
        assert_eq!(
            api.get("api.example.com", "/", &[]).await.text(),
            "ext-v1 /"
        );
    }
    let mut legacy = mesh.h1(&client, SocketAddr::new(passthrough, PORT)).await;
    let reply = legacy.get("legacy.internal", "/x", &[]).await;
    assert_eq!(reply.text(), "legacy /x");
    assert_eq!(
        reply.header("x-routed"),
        "legacy",
        "routed at L7 on the way"
    );

    let line = mesh
        .node("n1")
        .wait_log(&[("authority", "legacy.internal")])
        .await;
    assert_eq!(line["destination_service"], "legacy.internal", "{line:#}");
    assert_eq!(line["connection_security_policy"], "none", "{line:#}");
    assert_eq!(line["upstream_host"], format!("{passthrough}:{PORT}"));
}
