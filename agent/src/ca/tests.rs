//! The CA against a mocked API server (kube's client over `tower_test`, answering TokenReview,
//! the Pod list/watch and the bundle ConfigMap), called by the agent's real [`RemoteCa`] over
//! real TLS on loopback.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use kube::client::Body;
use kube::Client;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use tower_test::mock::SendResponse;

use super::*;
use crate::harness::pki::csr_for;
use crate::identity::proto::pem_encode;
use crate::identity::tests::{eventually, TempDir};
use crate::identity::{
    cert_uri_sans, CertificateAuthority, Identity, LocalCa, RemoteCa, RemoteCaConfig,
    DEFAULT_TRUST_DOMAIN,
};

mod bundle;
mod refusals;

const AGENT_NS: &str = "ambit-system";
const AGENT_SA: &str = "ambit-agent";

/// The API server's side of the mock: pods with one global resource version and their events,
/// the tokens TokenReview knows, and what was written.
#[derive(Default)]
struct ApiState {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    /// (resource version, watch event line).
    events: Vec<(u64, String)>,
    /// Watches waiting for an event after their resource version.
    parked: Vec<(u64, SendResponse<Response<Body>>)>,
    /// token → TokenReview status.
    tokens: HashMap<String, Value>,
    configmaps: Vec<Value>,
    /// TokenReviews answered.
    reviews: usize,
}

impl ApiState {
    fn answer_watches(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        for (since, send) in parked {
            let lines: Vec<&str> = self
                .events
                .iter()
                .filter(|(rv, _)| *rv > since)
                .map(|(_, l)| l.as_str())
                .collect();
            if lines.is_empty() {
                self.parked.push((since, send));
            } else {
                // The stream ends after these events; the watcher watches again from the last.
                send.send_response(ok(lines.join("\n") + "\n"));
            }
        }
    }

    fn set_pod(&mut self, pod: Value, kind: &str) {
        self.rv += 1;
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = (
            pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let mut obj = pod.clone();
        obj["apiVersion"] = json!("v1");
        obj["kind"] = json!("Pod");
        self.events
            .push((self.rv, json!({"type": kind, "object": obj}).to_string()));
        if kind == "DELETED" {
            self.pods.remove(&key);
        } else {
            self.pods.insert(key, pod);
        }
        self.answer_watches();
    }
}

fn ok(body: String) -> Response<Body> {
    Response::new(Body::from(body.into_bytes()))
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    fn start() -> (FakeApi, Client) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = FakeApi {
            state: Arc::default(),
        };
        let state = fake.state.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let path = parts.uri.path().to_owned();
                let query = parts.uri.query().unwrap_or_default().to_owned();
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                match (&parts.method, path.as_str()) {
                    (&Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
                        let token = body["spec"]["token"].as_str().unwrap_or_default();
                        let status = s.tokens.get(token).cloned().unwrap_or_else(
                            || json!({"authenticated": false, "error": "invalid bearer token"}),
                        );
                        let mut review = body.clone();
                        review["status"] = status;
                        s.reviews += 1;
                        send.send_response(ok(review.to_string()));
                    }
                    (&Method::GET, "/api/v1/pods") if query.contains("watch=true") => {
                        let since = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("resourceVersion="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        s.parked.push((since, send));
                        s.answer_watches();
                    }
                    (&Method::GET, "/api/v1/pods") => {
                        let list = json!({
                            "apiVersion": "v1", "kind": "PodList",
                            "metadata": {"resourceVersion": s.rv.to_string()},
                            "items": s.pods.values().cloned().collect::<Vec<_>>(),
                        });
                        send.send_response(ok(list.to_string()));
                    }
                    (&Method::PATCH, p) if p.contains("/configmaps/") => {
                        s.configmaps.push(body.clone());
                        send.send_response(ok(body.to_string()));
                    }
                    _ => {
                        let mut resp = ok("404 page not found".into());
                        *resp.status_mut() = StatusCode::NOT_FOUND;
                        send.send_response(resp);
                    }
                }
            }
        });
        (fake, Client::new(service, "default"))
    }

    fn pod(&self, ns: &str, name: &str, node: &str, sa: &str) {
        let pod = json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running"},
        });
        self.lock().set_pod(pod, "ADDED");
    }

    fn delete_pod(&self, ns: &str, name: &str) {
        let mut s = self.lock();
        let pod = s.pods.get(&(ns.to_owned(), name.to_owned())).cloned();
        if let Some(pod) = pod {
            s.set_pod(pod, "DELETED");
        }
    }

    /// A bound token of pod `ns/name` running as `sa`.
    fn token(&self, token: &str, ns: &str, name: &str, sa: &str, audiences: &[&str]) {
        self.lock().tokens.insert(
            token.to_owned(),
            json!({
                "authenticated": true,
                "audiences": audiences,
                "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": "sa-uid",
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [name],
                        "authentication.kubernetes.io/pod-uid": [format!("uid-{name}")],
                    },
                },
            }),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cluster of two nodes, an agent on each, `web` on node-1 and `db` on node-2, and the CA.
struct World {
    api: FakeApi,
    ca: RunningCa,
    dir: TempDir,
    _root: TempDir,
}

async fn world() -> World {
    crate::tls::install_process_default();
    let root = TempDir::new("ca-root");
    LocalCa::load_or_create(root.path(), DEFAULT_TRUST_DOMAIN)
        .unwrap_or_else(|e| panic!("root in {}: {e}", root.path().display()));
    let (api, client) = FakeApi::start();
    api.pod(AGENT_NS, "ambit-n1", "node-1", AGENT_SA);
    api.pod(AGENT_NS, "ambit-n2", "node-2", AGENT_SA);
    api.pod("shop", "web-1", "node-1", "web");
    api.pod("shop", "db-1", "node-2", "db");
    api.token("agent-1", AGENT_NS, "ambit-n1", AGENT_SA, &["istio-ca"]);
    api.token("web-1", "shop", "web-1", "web", &["istio-ca"]);
    let cfg = config(root.path().to_owned(), Vec::new());
    let ca = RunningCa::start(cfg, client)
        .await
        .unwrap_or_else(|e| panic!("CA start: {e}"));
    let ready = ca.authority.clone();
    eventually("the CA's pod index is synced", || ready.pods_synced()).await;
    World {
        api,
        ca,
        dir: TempDir::new("ca-agent"),
        _root: root,
    }
}

fn config(ca_dir: std::path::PathBuf, extra_roots: Vec<std::path::PathBuf>) -> ServeConfig {
    ServeConfig {
        ca_dir,
        extra_roots,
        trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_addr: Some("127.0.0.1:0".parse().expect("addr")),
        audiences: vec!["istio-ca".into()],
        agent_accounts: vec![(AGENT_NS.into(), AGENT_SA.into())],
        cluster_id: "Kubernetes".into(),
        default_cert_ttl: Duration::from_secs(24 * 3600),
        max_cert_ttl: DEFAULT_MAX_CERT_TTL,
        tls_names: vec!["127.0.0.1".into()],
        bundle_configmap: Some(("ambit-system".into(), "ambit-ca-root-cert".into())),
    }
}

impl World {
    /// The agent's client of the CA, presenting `token`, trusting the published bundle.
    fn client(&self, token: &str) -> RemoteCa {
        self.client_of(token, "Kubernetes")
    }

    /// As [`World::client`], sending `cluster_id` as Istio's `clusterid`.
    fn client_of(&self, token: &str, cluster_id: &str) -> RemoteCa {
        std::fs::create_dir_all(self.dir.path()).expect("agent dir");
        let token_file = self.dir.path().join(format!("token-{token}"));
        std::fs::write(&token_file, token).expect("token file");
        let roots_file = self.dir.path().join("root-cert.pem");
        let bundle: String = self
            .ca
            .authority
            .roots()
            .iter()
            .map(|r| pem_encode("CERTIFICATE", r))
            .collect();
        std::fs::write(&roots_file, bundle).expect("bundle file");
        RemoteCa::new(RemoteCaConfig {
            addr: format!("https://{}", self.ca.grpc_addr),
            roots_file,
            token_file,
            cluster_id: cluster_id.into(),
            timeout: Duration::from_secs(10),
        })
        .unwrap_or_else(|e| panic!("RemoteCa: {e}"))
    }

    /// GET `path` from the CA's metrics port (HTTP/1.1, connection closed after).
    async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = self.ca.metrics_addr.expect("metrics port");
        let mut conn = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        conn.read_to_string(&mut out).await.expect("read");
        out
    }

    fn denied(&self, reason: &'static str) -> u64 {
        self.ca.authority.metrics().denied_count(reason)
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(DEFAULT_TRUST_DOMAIN, ns, sa)
}

async fn ask(
    ca: &RemoteCa,
    identity: &Identity,
    ttl: Duration,
) -> Result<Vec<CertificateDer<'static>>, String> {
    ca.sign(&csr_for(identity), identity, ttl)
        .await
        .map_err(|e| e.to_string())
}

#[track_caller]
fn assert_refused(result: Result<Vec<CertificateDer<'static>>, String>, code: &str, text: &str) {
    match result {
        Ok(_) => panic!("expected a refusal ({code}: {text}), got a certificate"),
        Err(e) => {
            assert!(e.contains(code), "expected {code} in {e:?}");
            assert!(e.contains(text), "expected {text:?} in {e:?}");
        }
    }
}

/// Verifies `leaf` chains to `root` for client and server use, as peers do.
fn verify(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> Result<(), webpki::Error> {
    crate::harness::pki::verify(
        leaf,
        root,
        &[
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_a_certificate_for_a_pod_on_its_node() {
    let w = world().await;
    let ca = w.client("agent-1");
    let web = id("shop", "web");
    let chain = ask(&ca, &web, Duration::from_secs(3600))
        .await
        .unwrap_or_else(|e| panic!("certificate for {web}: {e}"));
    // The root Istio appends is left out by the client: peers have it in their bundle.
    assert_eq!(chain.len(), 1, "leaf only");
    let root = ca.roots().expect("roots")[0].clone();
    verify(&chain[0], &root).unwrap_or_else(|e| panic!("leaf does not verify: {e:?}"));
    assert_eq!(
        cert_uri_sans(&chain[0]).expect("SANs"),
        vec![web.to_string()],
        "exactly the SPIFFE URI"
    );
    assert_eq!(w.ca.authority.metrics().issued.get(), 1);
    // The agent's certificate manager over the remote CA gets a usable certificate too.
    let manager = crate::identity::tests::manager(Arc::new(ca), Duration::from_secs(3600));
    let _lease = manager.acquire(&web);
    let cert = manager
        .fetch(&web)
        .await
        .unwrap_or_else(|e| panic!("manager fetch: {e}"));
    assert_eq!(cert.identity, web);
    // The bundle went to its ConfigMap, without a key.
    let cms = w.api.lock().configmaps.clone();
    let pem = cms
        .iter()
        .find_map(|cm| cm["data"][BUNDLE_KEY].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no bundle ConfigMap written: {cms:?}"));
    assert!(pem.contains("BEGIN CERTIFICATE") && !pem.contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_running_only_on_another_node_is_refused() {
    let w = world().await;
    let ca = w.client("agent-1");
    // db runs only on node-2; the caller is node-1's agent.
    let result = ask(&ca, &id("shop", "db"), Duration::from_secs(3600)).await;
    assert_refused(
        result,
        "PermissionDenied",
        "no pod of shop/db runs on that node",
    );
    assert_eq!(w.denied("identity_not_on_node"), 1);
    assert_eq!(w.ca.authority.metrics().issued.get(), 0);
    let metrics = w.http_get("/metrics").await;
    assert!(
        metrics.contains("ambit_ca_denied_total{reason=\"identity_not_on_node\"} 1"),
        "{metrics}"
    );
    assert!(w.http_get("/ready").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_expired_token_is_refused() {
    let w = world().await;
    // TokenReview says unauthenticated: a token it never issued, and one past its expiry.
    w.api.lock().tokens.insert(
        "expired".into(),
        json!({"authenticated": false, "error": "token has expired"}),
    );
    let forged = ask(
        &w.client("forged"),
        &id("shop", "web"),
        Duration::from_secs(60),
    )
    .await;
    assert_refused(forged, "Unauthenticated", "invalid bearer token");
    let expired = ask(
        &w.client("expired"),
        &id("shop", "web"),
        Duration::from_secs(60),
    )
    .await;
    assert_refused(expired, "Unauthenticated", "token has expired");
    assert_eq!(w.denied("token_rejected"), 2);
    // A valid token for another audience is not one for this CA.
    w.api
        .token("other-aud", AGENT_NS, "ambit-n1", AGENT_SA, &["vault"]);
    let other = ask(
        &w.client("other-aud"),
        &id("shop", "web"),
        Duration::from_secs(60),
    )
    .await;
    assert_refused(other, "Unauthenticated", "include none of");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_pods_identity_is_refused_after_the_watch_sees_it() {
    let w = world().await;
    let ca = w.client("agent-1");
    let web = id("shop", "web");
    ask(&ca, &web, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("before the deletion: {e}"));
    w.api.delete_pod("shop", "web-1");
    let authority = w.ca.authority.clone();
    eventually("the CA's watch sees web-1 deleted", || {
        !authority.pods().runs_on("node-1", "shop", "web")
    })
    .await;
    let result = ask(&ca, &web, Duration::from_secs(60)).await;
    assert_refused(
        result,
        "PermissionDenied",
        "no pod of shop/web runs on that node",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_watch_shows_just_after_the_request_is_allowed() {
    let w = world().await;
    let ca = Arc::new(w.client("agent-1"));
    let api = id("shop", "api");
    let asking = {
        let (ca, api) = (ca.clone(), api.clone());
        tokio::spawn(async move { ask(&ca, &api, Duration::from_secs(60)).await })
    };
    // The request has been authenticated; only then does the pod reach the CA's watch.
    let fake = w.api.clone();
    eventually("the CA reviewed the token", || fake.lock().reviews >= 1).await;
    w.api.pod("shop", "api-1", "node-1", "api");
    let result = asking.await.expect("request task");
    result.unwrap_or_else(|e| panic!("certificate for {api}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_node_agents_may_ask_and_only_within_limits() {
    let w = world().await;
    // A workload's own token: authenticated, but not a node agent.
    let result = ask(
        &w.client("web-1"),
        &id("shop", "web"),
        Duration::from_secs(60),
    )
    .await;
    assert_refused(result, "PermissionDenied", "is not a node agent account");
    assert_eq!(w.denied("not_node_agent"), 1);
    // Istio refuses a TTL above the maximum instead of shortening it.
    let ca = w.client("agent-1");
    let long = ask(&ca, &id("shop", "web"), DEFAULT_MAX_CERT_TTL * 2).await;
    assert_refused(long, "InvalidArgument", "greater than the max allowed TTL");
    // The agent pod was replaced (same name, new UID): the old pod's token no longer counts.
    w.api.delete_pod(AGENT_NS, "ambit-n1");
    let pod = json!({
        "metadata": {"name": "ambit-n1", "namespace": AGENT_NS, "uid": "uid-replaced"},
        "spec": {"nodeName": "node-1", "serviceAccountName": AGENT_SA, "containers": []},
        "status": {"phase": "Running"},
    });
    w.api.lock().set_pod(pod, "ADDED");
    let authority = w.ca.authority.clone();
    eventually("the CA sees the replaced agent pod", || {
        authority
            .pods()
            .pod(AGENT_NS, "ambit-n1")
            .is_some_and(|p| p.uid == "uid-replaced")
    })
    .await;
    let stale = ask(&ca, &id("shop", "web"), Duration::from_secs(60)).await;
    assert_refused(stale, "PermissionDenied", "not the token's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_both_roots_and_signs_with_the_new_one() {
    crate::tls::install_process_default();
    let old = TempDir::new("ca-old");
    let new = TempDir::new("ca-new");
    let old_ca = LocalCa::load_or_create(old.path(), DEFAULT_TRUST_DOMAIN).expect("old root");
    let new_ca = LocalCa::load_or_create(new.path(), DEFAULT_TRUST_DOMAIN).expect("new root");
    // Phase 2 of deploy/README.md: sign with the new root, keep the old one in the bundle.
    let cfg = config(new.path().to_owned(), vec![old_ca.root_cert_path()]);
    let signer = Signer::load(&cfg).unwrap_or_else(|e| panic!("signer: {e}"));
    assert_eq!(signer.signing_root(), new_ca.signing_root());
    let bundle = signer.bundle();
    assert_eq!(bundle.len(), 2);
    assert!(bundle.contains(old_ca.signing_root()) && bundle.contains(new_ca.signing_root()));
    let web = id("shop", "web");
    let chain = signer
        .sign(&csr_for(&web), &web, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("sign: {e}"));
    verify(&chain[0], new_ca.signing_root()).unwrap_or_else(|e| panic!("new root: {e:?}"));
    assert!(verify(&chain[0], old_ca.signing_root()).is_err());
}

/// Not a timed assertion: prints how long issuance through the CA takes (TLS connection reused,
/// TokenReview answered by the in-process mock), for the benchmark note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_latency_through_the_ca() {
    let w = world().await;
    let ca = w.client("agent-1");
    let web = id("shop", "web");
    let mut took = Vec::new();
    for _ in 0..200 {
        let csr = csr_for(&web);
        let start = Instant::now();
        ca.sign(&csr, &web, Duration::from_secs(3600))
            .await
            .unwrap_or_else(|e| panic!("sign: {e}"));
        took.push(start.elapsed());
    }
    took.sort();
    let p = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    println!(
        "CA issuance latency over {} requests: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        p(0.50),
        p(0.99),
        took[took.len() - 1]
    );
    assert_eq!(w.ca.authority.metrics().issued.get(), 200);
}

/// Two agents (node-1 with `web`, node-2 with `db`) that got their certificates from the CA
/// complete the mesh's mutual TLS (the handshake HBONE runs), each seeing the other's identity;
/// a peer verifying against another root refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_the_ca_carry_mtls_between_two_agents() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let w = world().await;
    w.api
        .token("agent-2", AGENT_NS, "ambit-n2", AGENT_SA, &["istio-ca"]);
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let node1 =
        crate::identity::tests::manager(Arc::new(w.client("agent-1")), Duration::from_secs(3600));
    let node2 =
        crate::identity::tests::manager(Arc::new(w.client("agent-2")), Duration::from_secs(3600));
    let (_l1, _l2) = (node1.acquire(&web), node2.acquire(&db));
    let (server_cert, client_cert) = (node2.fetch(&db).await, node1.fetch(&web).await);
    server_cert.unwrap_or_else(|e| panic!("node-2 cert for {db}: {e}"));
    client_cert.unwrap_or_else(|e| panic!("node-1 cert for {web}: {e}"));
    let server = crate::tls::server_config(node2.clone(), db.clone());
    let client = crate::tls::client_config(node1.clone(), web.clone(), db.clone());
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(crate::tls::peer_identity(tls.get_ref().1))
    };
    let client_side = async move {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(crate::tls::server_name(ip), c)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(crate::tls::peer_identity(tls.get_ref().1))
    };
    let (server_saw, client_saw) = tokio::join!(server_side, client_side);
    assert_eq!(
        server_saw,
        Ok(Some(web.clone())),
        "node-2 sees node-1's workload"
    );
    assert_eq!(
        client_saw,
        Ok(Some(db.clone())),
        "node-1 sees node-2's workload"
    );

    // A node whose bundle holds another root refuses the CA's certificates.
    let other = TempDir::new("ca-other");
    let stranger = crate::identity::tests::local_ca(&other);
    let outsider = crate::identity::tests::manager(stranger, Duration::from_secs(3600));
    let _l3 = outsider.acquire(&web);
    outsider
        .fetch(&web)
        .await
        .unwrap_or_else(|e| panic!("outsider cert: {e}"));
    let refusing = crate::tls::client_config(outsider, web.clone(), db.clone());
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = crate::tls::server_config(node2, db);
    let accept = tokio::spawn(async move {
        tokio_rustls::TlsAcceptor::from(server)
            .accept(s)
            .await
            .map(|_| ())
    });
    let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    let refused = tokio_rustls::TlsConnector::from(refusing)
        .connect(crate::tls::server_name(ip), c)
        .await;
    assert!(
        refused.is_err(),
        "a peer with another root must not accept the CA's certificate"
    );
    accept.abort();
}

/// The agent's trust bundle follows the mounted file (a ConfigMap update swaps it): a root added
/// for a rotation is trusted without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_bundle_follows_the_mounted_file() {
    let w = world().await;
    let ca = w.client("agent-1");
    let bundle = crate::identity::TrustBundle::new(Arc::new(ca));
    assert_eq!(bundle.root_certs().len(), 1);
    let next = TempDir::new("ca-next");
    let next_ca = crate::identity::tests::local_ca(&next);
    let roots_file = w.dir.path().join("root-cert.pem");
    let mut pem = std::fs::read_to_string(&roots_file).expect("bundle file");
    pem.push_str(&pem_encode("CERTIFICATE", next_ca.signing_root()));
    // As the kubelet does: a new file renamed over the old name.
    let tmp = w.dir.path().join("root-cert.pem.new");
    std::fs::write(&tmp, pem).expect("new bundle");
    std::fs::rename(&tmp, &roots_file).expect("swap bundle");
    let seen = bundle.clone();
    eventually("the agent trusts the added root", || {
        seen.roots();
        seen.root_certs().contains(next_ca.signing_root())
    })
    .await;
    assert_eq!(bundle.root_certs().len(), 2);
}
