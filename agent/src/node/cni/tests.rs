use std::path::PathBuf;

use ambit_cni::proto::{PodName, PodRequest};

use super::*;
use crate::config::files::{load_text, Loaded};
use crate::node::discovery::{desired_pods, AnnotatedNetns};
use crate::state::store::Store;

const YAML: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh, uid: u-web}
spec: {nodeName: n1}
status: {podIP: 10.8.0.2, podIPs: [{ip: 10.8.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: fresh, namespace: mesh, uid: u-fresh}
spec: {nodeName: n1}
---
apiVersion: v1
kind: Pod
metadata: {name: out, namespace: mesh, uid: u-out, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 10.8.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: plain, uid: u-db}
spec: {nodeName: n1}
status: {podIP: 10.8.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: mesh, uid: u-far}
spec: {nodeName: n2}
status: {podIP: 10.8.1.2}
";

fn state() -> State {
    let mut loaded = Loaded::default();
    load_text(&mut loaded, std::path::Path::new("cni-test.yaml"), YAML);
    assert!(loaded.file_errors.is_empty(), "{:?}", loaded.file_errors);
    let mut store = Store::new(crate::config::DEFAULT_DOMAIN);
    store.apply(loaded.into_event());
    store.publish();
    (*store.reader().load_full()).clone()
}

fn req(pod: Option<(&str, &str)>, ips: &[&str], container: &str) -> PodRequest {
    PodRequest {
        container_id: container.into(),
        netns: format!("/var/run/netns/{container}"),
        if_name: "eth0".into(),
        pod: pod.map(|(namespace, name)| PodName {
            namespace: namespace.into(),
            name: name.into(),
            uid: None,
        }),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
    }
}

#[test]
fn an_add_finds_its_pod_by_name_or_address_and_places_it_by_istios_rule() {
    let s = state();
    let place = |r: &PodRequest| {
        let w = CniPods::find(&s, r).expect("found");
        CniPods::placement(&s, "n1", w)
    };
    assert_eq!(
        place(&req(Some(("mesh", "web")), &[], "c1")),
        Placement::Enrol("mesh/web".into())
    );
    assert_eq!(
        place(&req(None, &["10.8.0.2"], "c1")),
        Placement::Enrol("mesh/web".into())
    );
    assert!(matches!(
        place(&req(None, &["10.8.0.3"], "c1")),
        Placement::NotAmbient { reason, .. } if reason.contains("istio.io/dataplane-mode=none")
    ));
    assert!(matches!(
        place(&req(Some(("plain", "db")), &[], "c1")),
        Placement::NotAmbient { reason, .. } if reason.contains("namespace plain")
    ));
    assert!(matches!(
        place(&req(Some(("mesh", "far")), &[], "c1")),
        Placement::OtherNode { node, .. } if node == "n2"
    ));
    assert!(CniPods::find(&s, &req(Some(("mesh", "nope")), &[], "c1")).is_none());
    let mut other_uid = req(Some(("mesh", "web")), &[], "c1");
    other_uid.pod.as_mut().unwrap().uid = Some("u-other".into());
    assert!(
        CniPods::find(&s, &other_uid).is_none(),
        "another UID: a newer pod the source has not shown yet"
    );
}

#[test]
fn added_pods_are_enrolled_as_reported_and_deleted_ones_not_at_all() {
    let s = state();
    // Local mode's netns annotation points nowhere: discovery alone enrols nothing.
    let resolver = AnnotatedNetns {
        dir: PathBuf::from("/nonexistent-ambit-test"),
    };
    let mut desired = desired_pods(&s, "n1", &resolver);
    assert!(desired.pods.is_empty());
    assert_eq!(desired.waiting.len(), 1, "{:?}", desired.waiting);

    let mut pods = CniPods::default();
    // `fresh` has no address in the source yet: the ADD's addresses are used.
    pods.add(
        "mesh/fresh",
        &req(Some(("mesh", "fresh")), &["10.8.0.9"], "c9"),
    );
    pods.add("mesh/web", &req(Some(("mesh", "web")), &["10.8.0.2"], "c2"));
    pods.apply(&s, "n1", &mut desired);
    let got: Vec<(String, PathBuf, Vec<IpAddr>)> = desired
        .pods
        .iter()
        .map(|p| (p.key(), p.netns_path.clone(), p.ips.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "mesh/fresh".into(),
                "/var/run/netns/c9".into(),
                vec!["10.8.0.9".parse().unwrap()]
            ),
            (
                "mesh/web".into(),
                "/var/run/netns/c2".into(),
                vec!["10.8.0.2".parse().unwrap()]
            ),
        ]
    );
    assert!(desired.waiting.is_empty(), "{:?}", desired.waiting);

    // DEL by container id (ctr's DEL has no netns and no pod name).
    let mut del = req(None, &[], "c2");
    del.netns.clear();
    assert_eq!(pods.delete(&s, &del), Some("mesh/web".into()));
    let mut desired = desired_pods(&s, "n1", &resolver);
    pods.apply(&s, "n1", &mut desired);
    assert_eq!(
        desired.pods.iter().map(|p| p.key()).collect::<Vec<_>>(),
        vec!["mesh/fresh".to_string()]
    );
    assert!(
        desired.waiting.is_empty(),
        "a deleted pod is not waited for"
    );
    // A DEL of an older sandbox of a pod whose current one came by another ADD changes nothing.
    assert_eq!(
        pods.delete(&s, &req(Some(("mesh", "fresh")), &[], "old")),
        None
    );
    assert!(pods.netns("mesh/fresh").is_some());
    // An unknown container is nothing to remove.
    assert_eq!(pods.delete(&s, &req(None, &["10.9.9.9"], "zz")), None);
}

#[test]
fn node_state_lists_namespaces_and_this_nodes_pods() {
    let ns = node_state(&state(), "n1");
    assert_eq!(ns.namespaces.get("mesh"), Some(&true));
    assert_eq!(ns.namespaces.get("plain"), Some(&false));
    let pods: Vec<(String, bool)> = ns
        .pods
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), p.ambient))
        .collect();
    assert_eq!(
        pods,
        vec![
            ("mesh/fresh".to_string(), true),
            ("mesh/out".to_string(), false),
            ("mesh/web".to_string(), true),
            ("plain/db".to_string(), false),
        ]
    );
}

#[tokio::test]
async fn the_socket_answers_each_request_line_and_refuses_garbage() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    let dir = std::env::temp_dir().join(format!("ambit-cni-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let listener = bind(&dir).expect("bind");
    // A stale socket file is replaced, not an error.
    drop(listener);
    let listener = bind(&dir).expect("bind over a stale socket");
    let (tx, mut rx) = mpsc::channel::<CniCall>(4);
    tokio::spawn(serve(listener, tx));
    tokio::spawn(async move {
        while let Some(call) = rx.recv().await {
            let pod = match &call.request {
                Request::Add(r) | Request::Del(r) | Request::Check(r) => r.describe(),
            };
            let _ = call.reply.send(Answer::Enrolled { pod });
        }
    });
    let ask = |line: Vec<u8>| {
        let path = proto::socket_path(&dir);
        async move {
            let mut s = UnixStream::connect(path).await.expect("connect");
            s.write_all(&line).await.expect("write");
            let mut answer = String::new();
            BufReader::new(s)
                .read_line(&mut answer)
                .await
                .expect("answer");
            serde_json::from_str::<Answer>(&answer).expect("answer JSON")
        }
    };
    let garbage = ask(b"{not json\n".to_vec()).await;
    assert!(
        matches!(&garbage, Answer::Failed { message } if message.contains("bad request")),
        "{garbage:?}"
    );
    let mut line =
        serde_json::to_vec(&Request::Add(req(Some(("mesh", "web")), &[], "c1"))).unwrap();
    line.push(b'\n');
    assert_eq!(
        ask(line).await,
        Answer::Enrolled {
            pod: "pod mesh/web".into()
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_add_of_an_older_pod_of_the_same_name_leaves_the_current_one_to_discovery() {
    let s = state();
    let dir = std::env::temp_dir().join(format!("ambit-cni-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("web"), b"").unwrap();
    let resolver = AnnotatedNetns { dir: dir.clone() };
    let mut older = req(Some(("mesh", "web")), &["10.8.0.99"], "c-old");
    older.pod.as_mut().unwrap().uid = Some("u-older".into());
    let mut pods = CniPods::default();
    pods.add("mesh/web", &older);
    let mut desired = desired_pods(&s, "n1", &resolver);
    pods.apply(&s, "n1", &mut desired);
    let _ = std::fs::remove_dir_all(&dir);
    let web: Vec<_> = desired.pods.iter().filter(|p| p.name == "web").collect();
    assert_eq!(web.len(), 1, "{desired:?}");
    assert_eq!(web[0].netns_path, dir.join("web"), "discovery's netns");
    assert_eq!(web[0].ips, vec!["10.8.0.2".parse::<IpAddr>().unwrap()]);
}

/// A successor that bound the socket and died before taking over leaves a dead socket at the
/// path: the agent that serves on binds it again, and the plugin reaches it once more.
#[tokio::test]
async fn the_socket_is_bound_again_when_the_successor_that_replaced_it_is_gone() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

    let dir = std::env::temp_dir().join(format!("ambit-cni-reclaim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let listener = bind(&dir).expect("bind");
    let (tx, mut rx) = mpsc::channel::<CniCall>(4);
    tokio::spawn(serve(listener, tx));
    tokio::spawn(async move {
        while let Some(call) = rx.recv().await {
            let _ = call.reply.send(Answer::Removed { pod: None });
        }
    });
    // The successor binds its own socket at the path, then dies.
    drop(bind(&dir).expect("the successor's bind"));
    let path = proto::socket_path(&dir);
    let ask = || async {
        let mut s = UnixStream::connect(&path).await.ok()?;
        let mut line =
            serde_json::to_vec(&Request::Del(req(Some(("mesh", "web")), &[], "c1"))).ok()?;
        line.push(b'\n');
        s.write_all(&line).await.ok()?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).await.ok()?;
        serde_json::from_str::<Answer>(&answer).ok()
    };
    assert!(ask().await.is_none(), "the dead successor's socket refuses");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        if let Some(a) = ask().await {
            break a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never bound its socket again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(answer, Answer::Removed { pod: None });
}
