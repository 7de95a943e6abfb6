//! The Kubernetes source against a real API server, feeding a real store. Runs only when
//! `AMBIT_TEST_KUBECONFIG` names a kubeconfig; each test works in a namespace of its own and
//! deletes it afterwards.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ambit::config::kube::KubeSource;
use ambit::config::{Kind, ObjectRef, SourceEvent, DEFAULT_DOMAIN};
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

async fn client() -> Option<Client> {
    let Some(path) = std::env::var_os(ENV) else {
        println!("skipped: {ENV} not set");
        return None;
    };
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.to_string_lossy()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", path.to_string_lossy()));
    Some(Client::try_from(config).expect("client from kubeconfig"))
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
                SourceEvent::Reject(r, _) => {
                    self.seen.insert(r.clone(), "reject");
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
                    for (r, _) in rejected {
                        self.seen.insert(r.clone(), "reject");
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
    }
}

#[tokio::test]
async fn namespace_label_enrols_and_unenrols() {
    let Some(client) = client().await else { return };
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
async fn endpoint_slice_changes_reach_ready_endpoints() {
    let Some(client) = client().await else { return };
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
async fn service_entry_create_change_delete() {
    let Some(client) = client().await else { return };
    let mut served = None;
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let gvk = GroupVersionKind::gvk("networking.istio.io", version, "ServiceEntry");
        if let Ok((ar, _)) = kube::discovery::pinned_kind(&client, &gvk).await {
            served = Some(ar);
            break;
        }
    }
    let Some(ar) = served else {
        println!("skipped: the ServiceEntry CRD (networking.istio.io) is not installed");
        return;
    };
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
