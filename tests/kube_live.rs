//! The Kubernetes source and the agent against a real API server. Opt-in: every test is
//! `#[ignore]`d; run them with `AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test -p ambit-agent
//! --test kube_live -- --ignored` (as root: the agent tests use real namespaces and eBPF). With the
//! variable set, an unreachable server fails the tests loudly; without it, they fail saying so.
//! Istio's CRDs must be installed. Each test works in a namespace of its own and deletes it
//! afterwards; `crds_installed_after_the_agent_starts` deletes and re-creates Istio's
//! AuthorizationPolicy CRD, so point the suite at a throwaway API server (kube-apiserver + etcd on
//! loopback is enough: pods are simulated as network namespaces with a sandbox process, their
//! status written by the test, as no kubelet runs).

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ambit::config::kube::KubeSource;
use ambit::config::{Kind, ObjectRef, SourceEvent, DEFAULT_DOMAIN};
use ambit::harness::{LocalAgent, Pod, World};
use ambit::state::store::Store;
use ambit::state::{State, Workload};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::gvk::GroupVersionKind;
use kube::{Client, Config};
use serde_json::json;
use tokio::sync::mpsc;

const ENV: &str = "AMBIT_TEST_KUBECONFIG";
const PATIENCE: Duration = Duration::from_secs(60);

async fn client() -> Client {
    let path = std::env::var_os(ENV).unwrap_or_else(|| {
        panic!("{ENV} is not set: it must name the kubeconfig of the API server to test against")
    });
    ambit::tls::install_process_default();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.to_string_lossy()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.to_string_lossy()));
    let client = Client::try_from(config).expect("client from kubeconfig");
    // Configured but unreachable is a failure, not a skip.
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!(
            "the API server of {} is unreachable: {e}",
            path.to_string_lossy()
        )
    });
    client
}

/// A namespace of the test's own, deleted (with all it holds) after `body`, even if it panics.
async fn in_namespace<F, Fut>(client: Client, test: &str, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let ns = format!("ambit-live-{test}-{}-{nanos:x}", std::process::id());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let object = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));
    let result = tokio::spawn(body(client, ns.clone())).await;
    if let Err(e) = namespaces.delete(&ns, &DeleteParams::default()).await {
        eprintln!("cleanup: deleting namespace {ns}: {e}");
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A store fed by a `KubeSource` for `kinds`, and what the source said about each object.
struct Fed {
    store: Store,
    rx: mpsc::Receiver<SourceEvent>,
    /// Latest event per object: "apply", "reject" or "delete".
    seen: BTreeMap<ObjectRef, &'static str>,
}

impl Fed {
    fn start(client: Client, kinds: &[Kind]) -> Fed {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(KubeSource::new(client, tx).with_kinds(kinds).run());
        Fed {
            store: Store::new(DEFAULT_DOMAIN),
            rx,
            seen: BTreeMap::new(),
        }
    }

    /// Applies events until `done` holds; panics naming `what` if it does not within PATIENCE.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Fed) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(self) {
            let event = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => panic!("the source stopped while waiting for {what}"),
                Err(_) => panic!("{what}: not seen within {PATIENCE:?}"),
            };
            match &event {
                SourceEvent::Apply(o) => {
                    self.seen.insert(o.object_ref(), "apply");
                }
                SourceEvent::Reject(r) => {
                    self.seen.insert(r.object.clone(), "reject");
                }
                SourceEvent::Delete(r) => {
                    self.seen.insert(r.clone(), "delete");
                }
                SourceEvent::Replace {
                    objects, rejected, ..
                } => {
                    for o in objects {
                        self.seen.insert(o.object_ref(), "apply");
                    }
                    for r in rejected {
                        self.seen.insert(r.object.clone(), "reject");
                    }
                }
            }
            self.store.apply(event);
        }
    }

    fn state(&self) -> &State {
        self.store.state()
    }
}

fn workload_in(namespace: &str) -> Workload {
    Workload {
        uid: "uid".into(),
        name: "probe".into(),
        namespace: namespace.into(),
        service_account: "default".into(),
        node: Some("n1".into()),
        host_network: false,
        ips: vec![],
        labels: BTreeMap::new(),
        named_ports: BTreeMap::new(),
        annotations: BTreeMap::new(),
        running: true,
        terminating: false,
        istio: Default::default(),
    }
}

#[tokio::test]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn namespace_label_enrols_and_unenrols() {
    let client = client().await;
    in_namespace(client, "label", |client, ns| async move {
        let mut fed = Fed::start(client.clone(), &[Kind::Namespace]);
        let w = workload_in(&ns);
        fed.until("the new namespace", |f| {
            f.state().namespaces.contains_key(ns.as_str())
        })
        .await;
        assert!(!fed.state().is_enrolled(&w), "enrolled without the label");

        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        let label = |value: serde_json::Value| {
            Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": value}}}))
        };
        namespaces
            .patch(&ns, &PatchParams::default(), &label(json!("ambient")))
            .await
            .expect("label the namespace ambient");
        fed.until("enrolment after labelling", |f| f.state().is_enrolled(&w))
            .await;

        namespaces
            .patch(
                &ns,
                &PatchParams::default(),
                &label(serde_json::Value::Null),
            )
            .await
            .expect("remove the label");
        fed.until("unenrolment after unlabelling", |f| {
            !f.state().is_enrolled(&w)
        })
        .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn endpoint_slice_changes_reach_ready_endpoints() {
    let client = client().await;
    in_namespace(client, "slice", |client, ns| async move {
        let mut fed = Fed::start(client.clone(), &[Kind::Service, Kind::EndpointSlice]);
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(client.clone(), &ns);
        // No selector: the slice below is ours alone, no controller rewrites it.
        let svc = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))
        .expect("service");
        services
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
        let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            Api::namespaced(client, &ns);
        let slice = |ready: &str, not_ready: &str| {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "ambit-test",
                }},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": [ready], "conditions": {"ready": true}},
                    {"addresses": [not_ready], "conditions": {"ready": false}},
                ],
            }))
            .expect("slice")
        };
        slices
            .create(&PostParams::default(), &slice("10.1.2.3", "10.1.2.4"))
            .await
            .expect("create slice");
        let ready = |f: &Fed| -> Vec<SocketAddr> {
            match f.state().service(&ns, "web") {
                Some(s) => f.state().ready_endpoints(&s, 80),
                None => Vec::new(),
            }
        };
        let first: Vec<SocketAddr> = vec!["10.1.2.3:8080".parse().expect("addr")];
        fed.until("the first ready endpoint", |f| ready(f) == first)
            .await;

        let patched = json!({"endpoints": [
            {"addresses": ["10.1.2.4"], "conditions": {"ready": true}},
            {"addresses": ["10.1.2.3"], "conditions": {"ready": false}},
        ]});
        slices
            .patch("web-1", &PatchParams::default(), &Patch::Merge(&patched))
            .await
            .expect("change the slice");
        let second: Vec<SocketAddr> = vec!["10.1.2.4:8080".parse().expect("addr")];
        fed.until("the changed ready endpoint", |f| ready(f) == second)
            .await;
    })
    .await;
}

#[tokio::test]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn service_entry_create_change_delete() {
    let client = client().await;
    let mut served = None;
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let gvk = GroupVersionKind::gvk("networking.istio.io", version, "ServiceEntry");
        if let Ok((ar, _)) = kube::discovery::pinned_kind(&client, &gvk).await {
            served = Some(ar);
            break;
        }
    }
    let ar = served.unwrap_or_else(|| {
        panic!("the ServiceEntry CRD (networking.istio.io) is not installed: the suite needs Istio's CRDs")
    });
    in_namespace(client, "se", move |client, ns| async move {
        let mut fed = Fed::start(client.clone(), &[Kind::ServiceEntry]);
        let entries: Api<DynamicObject> = Api::namespaced_with(client, &ns, &ar);
        let oref = ObjectRef::new(Kind::ServiceEntry, ns.clone(), "ext");
        let se: DynamicObject = serde_json::from_value(json!({
            "apiVersion": ar.api_version, "kind": "ServiceEntry",
            "metadata": {"name": "ext"},
            "spec": {"hosts": ["api.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                     "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]},
        }))
        .expect("service entry");
        entries
            .create(&PostParams::default(), &se)
            .await
            .expect("create the ServiceEntry");
        // Applied, or rejected if this build does not read ServiceEntries yet: seen either way.
        fed.until("the new ServiceEntry", |f| {
            matches!(f.seen.get(&oref), Some(&"apply" | &"reject"))
        })
        .await;

        fed.seen.clear();
        entries
            .patch(
                "ext",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"hosts": ["api2.example.com"]}})),
            )
            .await
            .expect("change the ServiceEntry");
        fed.until("the changed ServiceEntry", |f| f.seen.contains_key(&oref))
            .await;

        entries
            .delete("ext", &DeleteParams::default())
            .await
            .expect("delete the ServiceEntry");
        fed.until("the deleted ServiceEntry", |f| {
            f.seen.get(&oref) == Some(&"delete")
        })
        .await;
    })
    .await;
}

// ---------------------------------------------------------------- the agent against the server
//
// The real `ambit run --kube` on real namespaces and eBPF, the API server's objects written by the
// test: Pod objects bound to the harness node's name (no kubelet runs: the test writes their
// status with the harness pod's addresses, and the harness pod's cgroup carries the UID the server
// gave, so /proc discovery finds its sandbox).

/// A harness world with one node, whose name is unique on the shared API server.
struct Live {
    world: World,
    node: ambit::harness::Node,
    client: Client,
    ns: String,
}

impl Live {
    fn new(client: Client, ns: &str) -> Live {
        let world = World::new("live");
        // Pods are bound by node name: unique, so parallel tests never enrol each other's pods.
        let node = world.node(&format!("n-{}", &ns[ns.len().saturating_sub(8)..]));
        Live {
            world,
            node,
            client,
            ns: ns.to_string(),
        }
    }

    /// A Pod object on this node, then the harness pod carrying its UID, then its status (IPs,
    /// Running) as a kubelet would write it; the sandbox process started.
    async fn pod(&self, name: &str, sa: &str) -> (Pod, ambit::harness::Process) {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &self.ns);
        let object = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": self.node.name(), "serviceAccountName": sa,
                     "automountServiceAccountToken": false,
                     "containers": [{"name": "app", "image": "none"}]},
        }))
        .expect("pod object");
        let created = pods
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating pod {name}: {e}"));
        let uid = created.metadata.uid.expect("the server gives a uid");
        let pod = self
            .world
            .pod(name)
            .node(&self.node)
            .namespace(&self.ns)
            .sa(sa)
            .uid(&uid)
            .spawn();
        let sandbox = pod.start_sandbox();
        let status = json!({"status": {"phase": "Running", "podIP": pod.ip4().to_string(),
            "podIPs": [{"ip": pod.ip4().to_string()}, {"ip": pod.ip6().to_string()}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("writing pod {name}'s status: {e}"));
        (pod, sandbox)
    }

    /// Labels the namespace ambient.
    async fn ambient(&self) {
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
        let label = json!({"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}});
        namespaces
            .patch(&self.ns, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .expect("label the namespace ambient");
    }

    /// The agent for this node, watching the server of AMBIT_TEST_KUBECONFIG from the test's own
    /// netns (where a server on loopback is reachable).
    fn agent(&self) -> LocalAgent {
        let kubeconfig = std::env::var_os(ENV).expect("checked by client()");
        LocalAgent::new(&self.world, &self.node, &support::ambit_bin())
            .kube(std::path::Path::new(&kubeconfig))
            .in_root_netns()
    }
}

fn echo_addr(pod: &Pod) -> SocketAddr {
    SocketAddr::new(pod.ip4().into(), 8080)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn agent_enrols_live_pods_and_captures_their_traffic() {
    support::raise_fd_limit();
    let client = client().await;
    in_namespace(client.clone(), "agent", |client, ns| async move {
        let live = Live::new(client, &ns);
        live.ambient().await;
        let (c, _cs) = live.pod("client", "default").await;
        let (s, _ss) = live.pod("server", "default").await;
        let _srv = support::Server::start(&s, &[echo_addr(&s)], support::Mode::WhoamiEcho);
        let mut agent = live.agent();
        agent.start(&live.world);
        agent.wait_enrolled(&[&c, &s]);
        agent.wait_for("ready", PATIENCE, |st| st["ready"] == true);
        let dst = echo_addr(&s);
        let (peer, local, _) = support::in_pod(&c, || support::whoami(dst))
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
        // The app sees the client; the stream counter shows it went through the proxies.
        assert_eq!((peer.ip(), local), (std::net::IpAddr::from(c.ip4()), dst));
        agent.wait_for("through the proxies", PATIENCE, |st| {
            st["proxy"]["hbone_inbound_streams"].as_u64() > Some(0)
        });
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn agent_enforces_a_live_authorization_policy() {
    support::raise_fd_limit();
    let client = client().await;
    in_namespace(client.clone(), "authz", |client, ns| async move {
        let live = Live::new(client.clone(), &ns);
        live.ambient().await;
        let (good, _g) = live.pod("good", "good").await;
        let (bad, _b) = live.pod("bad", "bad").await;
        let (s, _ss) = live.pod("server", "default").await;
        let _srv = support::Server::start(&s, &[echo_addr(&s)], support::Mode::WhoamiEcho);
        let policies = policy_api(&client, &ns).await;
        let ap: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "only-good"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {
                "principals": [format!("cluster.local/ns/{ns}/sa/good")]}}]}]},
        }))
        .expect("policy");
        policies
            .create(&PostParams::default(), &ap)
            .await
            .expect("create the policy");
        let mut agent = live.agent();
        agent.start(&live.world);
        agent.wait_enrolled(&[&bad, &good, &s]);
        agent.wait_for("ready", PATIENCE, |st| st["ready"] == true);
        let dst = echo_addr(&s);
        support::in_pod(&good, || support::whoami(dst))
            .unwrap_or_else(|e| panic!("the allowed client: {e}\n{}", agent.log_tail()));
        assert!(
            support::in_pod(&bad, || support::whoami(dst)).is_err(),
            "the denied client"
        );
        policies
            .delete("only-good", &DeleteParams::default())
            .await
            .expect("delete the policy");
        let until = std::time::Instant::now() + PATIENCE;
        while support::in_pod(&bad, || support::whoami(dst)).is_err() {
            assert!(
                std::time::Instant::now() < until,
                "the policy's deletion never applied"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real Kubernetes API server: AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn an_agent_restart_against_a_live_server_does_not_flap() {
    support::raise_fd_limit();
    let client = client().await;
    in_namespace(client.clone(), "restart", |client, ns| async move {
        let live = Live::new(client, &ns);
        live.ambient().await;
        let (c, _cs) = live.pod("client", "default").await;
        let (s, _ss) = live.pod("server", "default").await;
        let _srv = support::Server::start(&s, &[echo_addr(&s)], support::Mode::WhoamiEcho);
        let mut agent = live.agent();
        agent.start(&live.world);
        agent.wait_enrolled(&[&c, &s]);
        agent.wait_for("ready", PATIENCE, |st| st["ready"] == true);
        let maps = support::our_map_ids(agent.bpffs());
        let links = support::attached_links(&maps);
        agent.kill();
        let mark = std::fs::metadata(agent.log_path()).map_or(0, |m| m.len() as usize);
        agent.start(&live.world);
        agent.wait_enrolled(&[&c, &s]);
        agent.wait_for("ready again", PATIENCE, |st| st["ready"] == true);
        let dst = echo_addr(&s);
        support::in_pod(&c, || support::whoami(dst))
            .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", agent.log_tail()));
        assert_eq!(support::attached_links(&maps), links);
        let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
        let flaps: Vec<&str> = log
            .get(mark..)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("unenrolled") || l.contains("removing capture state"))
            .collect();
        assert!(flaps.is_empty(), "{flaps:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "deletes and re-creates Istio's AuthorizationPolicy CRD on a real API server (use a throwaway one): AMBIT_TEST_KUBECONFIG=<kubeconfig> cargo test --test kube_live -- --ignored"]
async fn crds_installed_after_the_agent_starts_are_found_and_applied() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    support::raise_fd_limit();
    let client = client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = "authorizationpolicies.security.istio.io";
    let mut saved = crds
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("the suite needs Istio's CRDs ({name}): {e}"));
    saved.metadata = kube::api::ObjectMeta {
        name: saved.metadata.name.clone(),
        labels: saved.metadata.labels.clone(),
        annotations: saved.metadata.annotations.clone(),
        ..Default::default()
    };
    saved.status = None;
    crds.delete(name, &DeleteParams::default())
        .await
        .expect("delete the CRD");
    SAVED_CRD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .replace(saved.clone());
    let body = in_namespace(client.clone(), "crds", |client, ns| async move {
        let live = Live::new(client.clone(), &ns);
        live.ambient().await;
        let (bad, _b) = live.pod("bad", "bad").await;
        let (s, _ss) = live.pod("server", "default").await;
        let _srv = support::Server::start(&s, &[echo_addr(&s)], support::Mode::WhoamiEcho);
        let mut agent = live.agent();
        agent.start(&live.world);
        agent.wait_enrolled(&[&bad, &s]);
        // Not installed is "listed, empty": ready, and traffic flows.
        agent.wait_for("ready without the CRD", PATIENCE, |st| st["ready"] == true);
        let dst = echo_addr(&s);
        support::in_pod(&bad, || support::whoami(dst)).expect("no policy yet");
        restore_crd(client.clone(), saved_copy()).await;
        let policies = policy_api(&client, &ns).await;
        let deny: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-bad"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": [format!("cluster.local/ns/{ns}/sa/bad")]}}]}]},
        }))
        .expect("policy");
        policies
            .create(&PostParams::default(), &deny)
            .await
            .expect("create the policy");
        // Found at the next discovery (every 30 s), listed, applied.
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while support::in_pod(&bad, || support::whoami(dst)).is_ok() {
            assert!(
                std::time::Instant::now() < until,
                "the CRD installed later never applied\n{}",
                agent.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let outcome = tokio::spawn(body).await;
    // Put the CRD back even if the body failed before it did.
    if crds.get_opt(name).await.ok().flatten().is_none() {
        restore_crd(client, saved).await;
    }
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Re-creates a deleted CRD, waiting while the old one is still being deleted.
async fn restore_crd(
    client: Client,
    saved: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client);
    for _ in 0..60 {
        if crds.create(&PostParams::default(), &saved).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!("could not re-create {:?}", saved.metadata.name);
}

/// The CRD `crds_installed_after_the_agent_starts_are_found_and_applied` deleted, for its body.
static SAVED_CRD: std::sync::Mutex<
    Option<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
> = std::sync::Mutex::new(None);

fn saved_copy(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    SAVED_CRD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .expect("saved before the body runs")
}

/// AuthorizationPolicies of `ns` at the served version.
async fn policy_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    let (ar, _) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .expect("security.istio.io/v1 AuthorizationPolicy is served");
    Api::namespaced_with(client.clone(), ns, &ar)
}
