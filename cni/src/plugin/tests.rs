use std::io::BufReader;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

use serde_json::json;

use super::*;
use crate::kube::KubeAccess;
use crate::proto::{NodePod, NodeState};

mod fake_api;
use fake_api::FakeApi;

/// A run dir of its own, removed on drop.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambit-cni-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RunDir(dir)
    }

    /// A fake agent answering one request with `answer`; returns what it was asked.
    fn agent(&self, answer: Answer) -> JoinHandle<Request> {
        let listener = UnixListener::bind(proto::socket_path(&self.0)).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let req: Request = proto::read_line(BufReader::new(&stream)).unwrap();
            proto::write_line(&stream, &answer).unwrap();
            req
        })
    }

    fn conf(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ambit-cni",
            "runDir": self.0,
            "timeoutSeconds": 5,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                "ips": [{"address": "10.9.0.4/24", "interface": 0}]
            }
        }))
        .unwrap()
    }

    /// The config with `excludeNamespaces`.
    fn conf_excluding(&self, namespaces: &[&str]) -> Vec<u8> {
        let mut conf: Value = serde_json::from_slice(&self.conf()).unwrap();
        conf["excludeNamespaces"] = json!(namespaces);
        serde_json::to_vec(&conf).unwrap()
    }

    /// A fake API server holding pod plain/web with `pod_labels` and namespace plain with
    /// `namespace_labels`, and its credentials left for the plugin.
    fn api(&self, pod_labels: Value, namespace_labels: Value) -> FakeApi {
        let api = FakeApi::start(
            vec![pod(pod_labels)],
            vec![namespace("plain", namespace_labels)],
        );
        self.kube(&api.access);
        api
    }

    /// The credentials the agent leaves for the plugin.
    fn kube(&self, access: &KubeAccess) {
        std::fs::write(
            kube::kube_access_path(&self.0),
            serde_json::to_vec(access).unwrap(),
        )
        .unwrap();
    }

    fn state(&self, state: &NodeState) {
        std::fs::write(
            proto::node_state_path(&self.0),
            serde_json::to_vec(state).unwrap(),
        )
        .unwrap();
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn env(command: &str, ns: &str) -> Env {
    Env::from_vars(
        [
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "abc123".into()),
            ("CNI_NETNS", "/var/run/netns/x".into()),
            ("CNI_IFNAME", "eth0".into()),
            (
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web;K8S_POD_UID=u1"),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )
}

#[test]
fn add_asks_the_agent_and_passes_the_previous_result_through() {
    let dir = RunDir::new();
    let agent = dir.agent(Answer::Enrolled {
        pod: "mesh/web".into(),
    });
    let out = run(&env("ADD", "mesh"), &dir.conf())
        .expect("ADD")
        .expect("a result");
    assert_eq!(out["ips"][0]["address"], "10.9.0.4/24", "{out}");
    assert_eq!(out["cniVersion"], "1.0.0");
    let Request::Add(req) = agent.join().unwrap() else {
        panic!("not an ADD")
    };
    assert_eq!(
        req.pod,
        Some(PodName {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: Some("u1".into())
        })
    );
    assert_eq!(
        req.ips,
        vec!["10.9.0.4".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(req.netns, "/var/run/netns/x");
}

#[test]
fn add_fails_when_the_agent_refuses() {
    let dir = RunDir::new();
    let _agent = dir.agent(Answer::Failed {
        message: "pod mesh/web is not known to the agent after 10s".into(),
    });
    let e = run(&env("ADD", "mesh"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(e.details.contains("not known to the agent"), "{e}");
}

#[test]
fn without_the_agent_only_pods_known_not_to_be_meshed_start() {
    let dir = RunDir::new();
    // No state file: nothing is known.
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(e.details.contains("pod plain/web"), "{e}");
    dir.state(&NodeState {
        node: "n1".into(),
        namespaces: [("mesh".to_string(), true), ("plain".to_string(), false)].into(),
        pods: vec![NodePod {
            namespace: "mesh".into(),
            name: "web".into(),
            uid: "u1".into(),
            ips: vec![],
            ambient: true,
        }],
    });
    let out = run(&env("ADD", "plain"), &dir.conf()).expect("non-ambient pod starts");
    assert!(out.is_some());
    let e = run(&env("ADD", "mesh"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(
        e.msg.contains("unreachable") && e.details.contains("mesh/web"),
        "{e}"
    );
    let e = run(&env("ADD", "other"), &dir.conf()).unwrap_err();
    assert!(e.details.contains("namespace other is not known"), "{e}");
    // DEL and an unknown pod's CHECK without an agent.
    assert_eq!(run(&env("DEL", "mesh"), &dir.conf()).expect("DEL"), None);
    assert!(run(&env("CHECK", "plain"), &dir.conf()).is_ok());
}

#[test]
fn version_and_bad_input_answer_in_cni_terms() {
    let out = run(&env("VERSION", ""), br#"{"cniVersion":"0.4.0"}"#)
        .unwrap()
        .unwrap();
    assert_eq!(out["cniVersion"], "0.4.0");
    assert!(out["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("1.0.0")));
    let e = run(&env("ADD", "mesh"), b"{").unwrap_err();
    assert_eq!(e.code, code::DECODE);
    let e = run(
        &env("ADD", "mesh"),
        br#"{"cniVersion":"0.4.0","name":"n","timeoutSeconds":0}"#,
    )
    .unwrap_err();
    assert_eq!(
        (e.code, e.cni_version.as_str()),
        (code::INVALID_CONFIG, "0.4.0")
    );
}

/// The agent's view: "plain" is not ambient, and it has never seen pod plain/web.
fn plain_namespace_state() -> NodeState {
    NodeState {
        node: "n1".into(),
        namespaces: [("plain".to_string(), false)].into(),
        pods: vec![],
    }
}

fn pod(labels: Value) -> Value {
    json!({
        "metadata": {"namespace": "plain", "name": "web", "uid": "u1", "labels": labels},
        "spec": {}
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"metadata": {"name": name, "labels": labels}})
}

#[test]
fn without_the_agent_a_pod_labelled_ambient_in_a_plain_namespace_is_held() {
    let dir = RunDir::new();
    dir.state(&plain_namespace_state());
    let api = dir.api(json!({"istio.io/dataplane-mode": "ambient"}), json!({}));
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(
        e.details
            .contains("the API server shows pod plain/web in the ambient mesh"),
        "{e}"
    );
    let seen = api.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|l| l.contains("/api/v1/namespaces/plain/pods?fieldSelector=metadata.name%3Dweb")),
        "{seen:?}"
    );
}

#[test]
fn without_the_agent_the_api_servers_labels_decide_for_a_pod_the_agent_never_saw() {
    let dir = RunDir::new();
    dir.state(&plain_namespace_state());
    // The namespace was labelled ambient after the agent last wrote its view.
    let _api = dir.api(
        json!({"app": "web"}),
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert!(e.details.contains("in the ambient mesh"), "{e}");

    let dir = RunDir::new();
    dir.state(&plain_namespace_state());
    let _api = dir.api(json!({"app": "web"}), json!({}));
    let out = run(&env("ADD", "plain"), &dir.conf()).expect("a plain pod starts");
    assert!(out.is_some());
    // Opted out in an ambient namespace.
    let _api = dir.api(
        json!({"istio.io/dataplane-mode": "none"}),
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    assert!(run(&env("ADD", "plain"), &dir.conf()).is_ok());
}

#[test]
fn without_the_agent_an_api_server_that_cannot_answer_holds_the_pod() {
    let dir = RunDir::new();
    dir.state(&plain_namespace_state());
    // A wrong token: 401.
    let api = FakeApi::start(vec![pod(json!({}))], vec![namespace("plain", json!({}))]);
    let mut access = api.access.clone();
    access.token = "stolen".into();
    dir.kube(&access);
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(e.details.contains("HTTP 401"), "{e}");
    assert!(!e.to_string().contains("stolen"), "no token in errors: {e}");
    // A certificate from another CA.
    let other = FakeApi::start(vec![], vec![]);
    let mut access = api.access.clone();
    access.ca_cert = other.access.ca_cert.clone();
    dir.kube(&access);
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert!(
        e.details.contains("cannot look the pod up")
            && e.details.contains("invalid peer certificate"),
        "{e}"
    );
    // Another pod of that name (the runtime starts uid u1).
    let api = FakeApi::start(
        vec![json!({"metadata": {"namespace": "plain", "name": "web", "uid": "u9"}})],
        vec![namespace("plain", json!({}))],
    );
    dir.kube(&api.access);
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert!(e.details.contains("uid u9"), "{e}");
    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut access = api.access.clone();
    access.server = format!("https://127.0.0.1:{port}");
    dir.kube(&access);
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    // Bad credentials file.
    std::fs::write(kube::kube_access_path(&dir.0), b"{").unwrap();
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert!(e.details.contains("cni-kube.json"), "{e}");
}

#[test]
fn without_the_agent_or_its_files_only_excluded_namespaces_start() {
    // A node just rebooted: the run dir (a tmpfs) is empty, the CNI config still chains
    // ambit-cni. The agent's own pod must start, or nothing on the node ever does.
    let dir = RunDir::new();
    let conf = dir.conf_excluding(&["ambit-system", "kube-system"]);
    let ambit = |ns: &str| {
        let mut e = env("ADD", ns);
        e.args.insert("K8S_POD_NAME".into(), "ambit-agent-x".into());
        e
    };
    let out = run(&ambit("ambit-system"), &conf).expect("the agent's own pod starts");
    assert!(out.is_some());
    assert!(run(&env("ADD", "kube-system"), &conf).is_ok());
    let e = run(&env("ADD", "plain"), &conf).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(e.details.contains("no node state"), "{e}");
}

/// The agent's last view: pod plain/web (uid u1) in the non-ambient namespace "plain".
fn plain_pod_known_state() -> NodeState {
    NodeState {
        pods: vec![NodePod {
            namespace: "plain".into(),
            name: "web".into(),
            uid: "u1".into(),
            ips: vec![],
            ambient: false,
        }],
        ..plain_namespace_state()
    }
}

#[test]
fn without_the_agent_a_pod_it_last_saw_unmeshed_is_held_once_its_namespace_turned_ambient() {
    // The namespace was labelled ambient while the agent was down; the pod's sandbox is made
    // again (a restarted sandbox keeps its pod's uid).
    let dir = RunDir::new();
    dir.state(&plain_pod_known_state());
    let _api = dir.api(
        json!({"app": "web"}),
        json!({"istio.io/dataplane-mode": "ambient"}),
    );
    let e = run(&env("ADD", "plain"), &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(
        e.details
            .contains("the API server shows pod plain/web in the ambient mesh"),
        "{e}"
    );
}

#[test]
fn without_the_agent_or_the_api_server_a_pod_it_last_saw_unmeshed_starts() {
    let dir = RunDir::new();
    dir.state(&plain_pod_known_state());
    let api = FakeApi::start(vec![pod(json!({}))], vec![namespace("plain", json!({}))]);
    let mut access = api.access.clone();
    access.token = "revoked".into();
    dir.kube(&access);
    assert!(run(&env("ADD", "plain"), &dir.conf()).is_ok());
    // Not a pod the agent saw: held.
    let mut other = env("ADD", "plain");
    other.args.insert("K8S_POD_UID".into(), "u2".into());
    let e = run(&other, &dir.conf()).unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER, "{e}");
    assert!(e.details.contains("HTTP 401"), "{e}");
}

#[test]
fn without_the_agent_a_pod_name_that_is_no_kubernetes_name_is_held_without_a_request() {
    let dir = RunDir::new();
    dir.state(&plain_namespace_state());
    let api = dir.api(json!({}), json!({}));
    for ns in ["..", "plain/pods/web", "plain&x=1", "Plain"] {
        let e = run(&env("ADD", ns), &dir.conf()).unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN_LATER, "{ns}: {e}");
        assert!(e.details.contains("K8S_POD_NAMESPACE"), "{ns}: {e}");
    }
    assert!(api.seen.lock().unwrap().is_empty(), "no request was made");
    // The same lookup with a valid name does reach the API server.
    assert!(run(&env("ADD", "plain"), &dir.conf()).is_ok());
    assert_eq!(
        api.seen.lock().unwrap().len(),
        2,
        "the pod, then its namespace"
    );
}
