//! The demo's L7 part: Istio's `reviews` routes (a header match to subset v2, an 80/20 split
//! for everyone else, nothing for other paths) and a fault-injection route (30% aborted with 503)
//! applied by the client's node proxy, then what an operator sees of it: `istio_requests_total`
//! and an access-log line per request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::DemoError;
use crate::harness::apps::ServerThread;
use crate::harness::{run_async_in_netns, LocalAgent, Pod};

/// The `reviews` Service's ClusterIP and port (named `http`: routed at L7).
pub const REVIEWS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
pub const REVIEWS_PORT: u16 = 9080;

/// Istio's request-routing task, shortened: `end-user: jason` sees v2; `/reviews` is split 80/20
/// between v1 and v2; any other path matches no route.
pub const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: fault-test
    match: [{uri: {prefix: /reviews/flaky}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 30}}}
    retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: v1}}]
  - name: canary
    match: [{uri: {prefix: /reviews}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// An HTTP/1.1 and h2c app in `pod` answering every request with the pod's name.
pub fn http_app(pod: &Pod, port: u16) -> ServerThread {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = pod.netns_path().to_path_buf();
    let name = pod.name().to_string();
    let thread = std::thread::spawn(move || {
        let _ = run_async_in_netns(&netns, move || async move {
            let Ok(listener) = TcpListener::bind(("0.0.0.0", port)).await else {
                return;
            };
            let _ = ready_tx.send(());
            let accept = async {
                while let Ok((tcp, _)) = listener.accept().await {
                    let name = name.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                            let body = Full::new(Bytes::from(name.clone()));
                            async move { Ok::<_, Infallible>(Response::new(body)) }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            };
            tokio::select! {
                _ = accept => {}
                _ = stop_rx => {}
            }
        });
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(10));
    ServerThread::new(stop_tx, thread)
}

/// Sends `requests` (path, headers) from `client` on one keep-alive connection to the
/// `reviews` Service; returns (status, body) of each.
fn send(
    client: &Pod,
    requests: Vec<(&'static str, Vec<(&'static str, &'static str)>)>,
) -> Result<Vec<(u16, String)>, DemoError> {
    let dst = SocketAddr::new(REVIEWS_VIP.into(), REVIEWS_PORT);
    let traffic = |source: std::io::Error| DemoError::Traffic {
        what: "HTTP to reviews".into(),
        source,
    };
    client.run_async(|| async move {
        let tcp = TcpStream::connect(dst).await.map_err(traffic)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| traffic(std::io::Error::other(e)))?;
        tokio::spawn(conn);
        let mut out = Vec::new();
        for (path, headers) in requests {
            let mut req = Request::get(path).header("host", "reviews");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| traffic(std::io::Error::other(e)))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| traffic(std::io::Error::other(e)))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| traffic(std::io::Error::other(e)))?
                .to_bytes();
            out.push((status, String::from_utf8_lossy(&body).into_owned()));
        }
        Ok(out)
    })
}

/// Runs the L7 part and prints it.
pub fn show(client: &Pod, agent: &LocalAgent, access_log: &Path) -> Result<(), DemoError> {
    println!("\nL7: a VirtualService and DestinationRule for reviews (Service port `http`), applied by the client's node proxy:");
    for line in ROUTES
        .lines()
        .filter(|l| l.contains("match:") || l.contains("weight") || l.contains("fault"))
    {
        println!("  {}", line.trim());
    }
    let tally = |replies: &[(u16, String)]| {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for (status, body) in replies {
            let key = if *status == 200 {
                body.clone()
            } else {
                format!("status {status}")
            };
            *by.entry(key).or_default() += 1;
        }
        by.iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let jason = send(
        client,
        vec![("/reviews/1", vec![("end-user", "jason")]); 20],
    )?;
    println!(
        "  20 x GET /reviews/1 with end-user: jason  -> {}",
        tally(&jason)
    );
    let others = send(client, vec![("/reviews/1", vec![]); 100])?;
    println!(
        "  100 x GET /reviews/1 (anyone else)       -> {}",
        tally(&others)
    );
    let flaky = send(client, vec![("/reviews/flaky", vec![]); 100])?;
    println!(
        "  100 x GET /reviews/flaky (fault abort 30%) -> {}",
        tally(&flaky)
    );
    let none = send(client, vec![("/ratings", vec![])])?;
    println!(
        "  GET /ratings (no route matches)          -> {}",
        tally(&none)
    );

    println!("\nIstio's request metrics (istio_requests_total on :15020/stats/prometheus), from both ends:");
    println!(
        "  the source's node records where it routed each request; the destination's node, which"
    );
    println!("  serves the HTTP inside each HBONE stream, records what the app answered");
    let (_, metrics) = agent.http_get("/stats/prometheus");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "  reporter={:<11} {} -> {} {}: code {} flags {}: {}",
            label("reporter"),
            label("source_workload"),
            label("destination_workload"),
            label("destination_version"),
            label("response_code"),
            label("response_flags"),
            line.rsplit(' ').next().unwrap_or("?")
        );
    }
    let log = std::fs::read_to_string(access_log).unwrap_or_default();
    if let Some(nr) = log.lines().find(|l| l.contains("\"route_not_found\"")) {
        println!("\nthe access-log line of the unrouted request:\n  {nr}");
    }
    Ok(())
}
