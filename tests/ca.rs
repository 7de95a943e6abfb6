//! `ambit ca serve` as the process the CA Deployment runs: a fake API server over real HTTP
//! (TokenReview, the Pod list/watch, the bundle ConfigMap) through a kubeconfig, and the agent's
//! `RemoteCa` asking it for certificates over real TLS on loopback, trusting the bundle the CA
//! published. Prints the issuance latency through the process (not asserted).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit::harness::pki::csr_for;
use ambit::identity::{cert_uri_sans, CertificateAuthority, Identity, RemoteCa, RemoteCaConfig};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// Ceiling for waits: generous, because other jobs may hold both cores; never a timing assertion.
mod rbac_rules;

use rbac_rules::{Attributes, Rule};

const PATIENCE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct ApiState {
    rv: u64,
    pods: BTreeMap<(String, String), Value>,
    events: Vec<(u64, String)>,
    parked: Vec<(u64, oneshot::Sender<String>)>,
    tokens: HashMap<String, Value>,
    bundle: Option<String>,
    /// Every request the CA made: method, path, query.
    requests: Vec<(Method, String, String)>,
}

impl ApiState {
    fn answer_watches(&mut self) {
        for (since, tx) in std::mem::take(&mut self.parked) {
            let lines: Vec<&str> = self
                .events
                .iter()
                .filter(|(rv, _)| *rv > since)
                .map(|(_, l)| l.as_str())
                .collect();
            if lines.is_empty() {
                self.parked.push((since, tx));
            } else {
                let _ = tx.send(lines.join("\n") + "\n");
            }
        }
    }

    fn add_pod(&mut self, ns: &str, name: &str, node: &str, sa: &str) {
        self.rv += 1;
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                         "resourceVersion": self.rv.to_string()},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running"},
        });
        self.events
            .push((self.rv, json!({"type": "ADDED", "object": pod}).to_string()));
        self.pods.insert((ns.into(), name.into()), pod);
        self.answer_watches();
    }

    fn agent_token(&mut self, token: &str, pod: &str) {
        self.tokens.insert(
            token.into(),
            json!({
                "authenticated": true,
                "audiences": ["istio-ca"],
                "user": {
                    "username": "system:serviceaccount:ambit-system:ambit-agent",
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [pod],
                        "authentication.kubernetes.io/pod-uid": [format!("uid-{pod}")],
                    },
                },
            }),
        );
    }
}

type Shared = Arc<Mutex<ApiState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ApiState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn answer(state: Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let query = parts.uri.query().unwrap_or_default().to_owned();
    lock(&state).requests.push((
        parts.method.clone(),
        parts.uri.path().to_owned(),
        query.clone(),
    ));
    let text = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            let status = lock(&state).tokens.get(token).cloned().unwrap_or_else(
                || json!({"authenticated": false, "error": "invalid bearer token"}),
            );
            let mut review = body.clone();
            review["status"] = status;
            review.to_string()
        }
        (&Method::GET, "/api/v1/pods") if query.contains("watch=true") => {
            let since = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = oneshot::channel();
            {
                let mut s = lock(&state);
                s.parked.push((since, tx));
                s.answer_watches();
            }
            // An empty stream after a while, as a watch's timeout: the client watches again.
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        }
        (&Method::GET, "/api/v1/pods") => {
            let s = lock(&state);
            json!({
                "apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": s.pods.values().cloned().collect::<Vec<_>>(),
            })
            .to_string()
        }
        (&Method::PATCH, "/api/v1/namespaces/ambit-system/configmaps/ambit-ca-root-cert") => {
            lock(&state).bundle = body["data"]["root-cert.pem"].as_str().map(str::to_owned);
            body.to_string()
        }
        _ => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"404 page not found")));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return resp;
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn serve_api(state: Shared) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake API server");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The CA process, killed on drop.
struct CaProcess(Child);

impl Drop for CaProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: ca\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    conn.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn verify(leaf: &CertificateDer<'_>, root: &CertificateDer<'_>) -> Result<(), webpki::Error> {
    ambit::harness::pki::verify(leaf, root, &[webpki::KeyUsage::client_auth()])
}

fn start_ca(dir: &Path, api: SocketAddr, grpc: u16, metrics: u16) -> CaProcess {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n"
        ),
    )
    .expect("kubeconfig");
    let root = dir.join("root");
    let status = Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args(["ca-init", "--dir"])
        .arg(&root)
        .stdout(Stdio::null())
        .status()
        .expect("ambit ca-init");
    assert!(status.success(), "ambit ca-init failed");
    let log = std::fs::File::create(dir.join("ca.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args(["ca", "serve", "--ca-dir"])
        .arg(&root)
        .arg(format!("--listen=127.0.0.1:{grpc}"))
        .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
        .arg("--tls-name=127.0.0.1")
        .env("KUBECONFIG", &kubeconfig)
        .env("AMBIT_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn ambit ca serve");
    CaProcess(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_gets_certificates_from_the_ca_process() {
    let scratch = Scratch(std::env::temp_dir().join(format!("ambit-ca-it-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).expect("scratch dir");
    let dir = scratch.0.clone();

    let state: Shared = Arc::default();
    {
        let mut s = lock(&state);
        s.add_pod("ambit-system", "ambit-n1", "node-1", "ambit-agent");
        s.add_pod("shop", "web-1", "node-1", "web");
        s.add_pod("shop", "db-1", "node-2", "db");
        s.agent_token("agent-1", "ambit-n1");
    }
    let api = serve_api(state.clone()).await;
    let (grpc, metrics) = (free_port(), free_port());
    let _ca = start_ca(&dir, api, grpc, metrics);
    let metrics_addr: SocketAddr = ([127, 0, 0, 1], metrics).into();
    let log = dir.join("ca.log");
    wait_for("the CA to be ready (pod index synced)", async || {
        let ready = http_get(metrics_addr, "/ready").await?;
        ready.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    // The agent trusts what the CA published, as it would through the mounted ConfigMap.
    let bundle = wait_for("the CA to publish its bundle", async || {
        lock(&state).bundle.clone()
    })
    .await;
    let roots_file = dir.join("root-cert.pem");
    std::fs::write(&roots_file, &bundle).expect("bundle file");
    let root = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .next()
        .expect("a root in the bundle")
        .expect("PEM");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "agent-1\n").expect("token file");
    let ca = RemoteCa::new(RemoteCaConfig {
        addr: format!("https://127.0.0.1:{grpc}"),
        roots_file,
        token_file,
        cluster_id: "Kubernetes".into(),
        timeout: Duration::from_secs(10),
    })
    .unwrap_or_else(|e| panic!("RemoteCa: {e}"));

    let web = Identity::new("cluster.local", "shop", "web");
    let chain = ca
        .sign(&csr_for(&web), &web, Duration::from_secs(3600))
        .await
        .unwrap_or_else(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("certificate for {web}: {e}\nCA log:\n{log}")
        });
    verify(&chain[0], &root).unwrap_or_else(|e| panic!("leaf does not verify: {e:?}"));
    assert_eq!(
        cert_uri_sans(&chain[0]).expect("SANs"),
        vec![web.to_string()]
    );

    let db = Identity::new("cluster.local", "shop", "db");
    let refused = ca.sign(&csr_for(&db), &db, Duration::from_secs(3600)).await;
    let e = refused.expect_err("db runs only on node-2").to_string();
    assert!(
        e.contains("PermissionDenied") && e.contains("no pod of shop/db"),
        "{e}"
    );

    // Not a timed assertion: the number for the benchmark note.
    let mut took = Vec::new();
    for _ in 0..100 {
        let csr = csr_for(&web);
        let start = Instant::now();
        ca.sign(&csr, &web, Duration::from_secs(3600))
            .await
            .unwrap_or_else(|e| panic!("sign: {e}"));
        took.push(start.elapsed());
    }
    took.sort();
    println!(
        "issuance through `ambit ca serve` (debug build, TokenReview over HTTP): p50 {:?}, p99 {:?}",
        took[took.len() / 2],
        took[took.len() * 99 / 100]
    );
    let text = http_get(metrics_addr, "/metrics").await.expect("/metrics");
    assert!(
        text.contains("ambit_ca_certificates_issued_total 101"),
        "{text}"
    );
    assert!(
        text.contains("ambit_ca_denied_total{reason=\"identity_not_on_node\"} 1"),
        "{text}"
    );

    // deploy/ca.yaml grants exactly what the CA asked the API server for.
    let requests = lock(&state).requests.clone();
    let asked: Vec<Attributes> = requests
        .iter()
        .flat_map(|(method, path, query)| attributes_of(method, path, query))
        .collect();
    let (cluster_rules, namespace_rules) = ca_rbac();
    let allowed = |a: &Attributes| {
        cluster_rules.iter().any(|r| r.allows(a))
            || (a.namespace.as_deref() == Some(CA_NAMESPACE)
                && namespace_rules.iter().any(|r| r.allows(a)))
    };
    for a in &asked {
        assert!(allowed(a), "deploy/ca.yaml does not allow the CA's {a:?}");
    }
    for rule in cluster_rules.iter().chain(&namespace_rules) {
        for grant in grants(rule) {
            assert!(
                asked.iter().any(|a| rule.allows(a) && grant.covers(a)),
                "deploy/ca.yaml grants {grant:?}, which the CA never uses"
            );
        }
    }
}

/// The CA's namespace, ServiceAccount and the name of its ClusterRole and Role.
const CA_NAMESPACE: &str = "ambit-system";
const CA_ROLE: &str = "ambit-ca";

/// What the authoriser is asked for `method path?query`: a server-side apply (PATCH) may
/// create the object, which the API server authorises as `create` of that name as well.
fn attributes_of(method: &Method, path: &str, query: &str) -> Vec<Attributes> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("the CA asked for {method} {path}, not a resource"),
    };
    let (namespace, resource, name) = match rest {
        [resource] => (None, *resource, None),
        [resource, name] => (None, *resource, Some(*name)),
        ["namespaces", ns, resource] => (Some(*ns), *resource, None),
        ["namespaces", ns, resource, name] => (Some(*ns), *resource, Some(*name)),
        other => panic!("{method} {path}: unexpected resource path {other:?}"),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verbs: &[&'static str] = match (method.as_str(), name, watch) {
        ("POST", None, _) => &["create"],
        ("GET", None, true) => &["watch"],
        ("GET", None, false) => &["list"],
        ("GET", Some(_), _) => &["get"],
        ("PATCH", Some(_), _) => &["patch", "create"],
        ("PUT", Some(_), _) => &["update"],
        ("DELETE", Some(_), _) => &["delete"],
        _ => panic!("{method} {path}: not a request the authoriser knows"),
    };
    verbs
        .iter()
        .map(|verb| Attributes {
            group: group.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.map(str::to_owned),
            verb,
            name: name.map(str::to_owned),
        })
        .collect()
}

/// One (group, resource, verb, name) a rule grants.
#[derive(Debug)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
    name: Option<String>,
}

impl Grant {
    fn covers(&self, a: &Attributes) -> bool {
        self.group == a.group
            && self.resource == a.resource
            && self.verb == a.verb
            && (self.name.is_none() || self.name == a.name)
    }
}

/// Every (group, resource, verb, name) `rule` grants.
fn grants(rule: &Rule) -> Vec<Grant> {
    let names: Vec<Option<String>> = if rule.resource_names.is_empty() {
        vec![None]
    } else {
        rule.resource_names.iter().cloned().map(Some).collect()
    };
    let mut out = Vec::new();
    for group in &rule.api_groups {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                for name in &names {
                    out.push(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                        name: name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The rules of deploy/ca.yaml's ClusterRole and Role `ambit-ca`, after checking that their
/// bindings give them to the ServiceAccount the Deployment runs as.
fn ca_rbac() -> (Vec<Rule>, Vec<Rule>) {
    use serde::Deserialize as _;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/ca.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == CA_ROLE)
            .unwrap_or_else(|| panic!("{}: no {kind} {CA_ROLE}", path.display()))
    };
    assert_eq!(
        find("Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        CA_ROLE
    );
    for (binding, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let b = find(binding);
        assert_eq!(b["roleRef"]["kind"], role, "{b}");
        assert_eq!(b["roleRef"]["name"], CA_ROLE, "{b}");
        assert!(
            b["subjects"].as_array().is_some_and(|s| s
                .iter()
                .any(|s| s["kind"] == "ServiceAccount"
                    && s["name"] == CA_ROLE
                    && s["namespace"] == CA_NAMESPACE)),
            "{b}"
        );
    }
    assert_eq!(find("Role")["metadata"]["namespace"], CA_NAMESPACE);
    let rules = |kind: &str| -> Vec<Rule> {
        find(kind)["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("{kind} {CA_ROLE} has no rules"))
            .iter()
            .map(|r| Rule::of(r, &format!("deploy/ca.yaml {kind} {CA_ROLE}")))
            .collect()
    };
    (rules("ClusterRole"), rules("Role"))
}
