//! Tests of the fake API server: the real `KubeSource` and kube client against it over loopback
//! HTTP (what the agent will see), and its answers to bad requests. One test runs it in a node's
//! netns, so it needs root like the rest of the harness tests.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use http::Method;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{FakeKube, FakeKubeError};
use crate::config::kube::KubeSource;
use crate::config::{Kind, Object, SourceEvent};
use crate::harness::World;

/// Fails a test that would otherwise hang; never needed for it to pass.
const PATIENCE: Duration = Duration::from_secs(20);

fn pod(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": {"containers": [{"name": "app"}], "nodeName": "n1", "serviceAccountName": "sa"},
        "status": {"phase": "Running", "podIP": ip},
    })
}

fn virtual_service(api_version: &str, name: &str) -> Value {
    json!({
        "apiVersion": api_version, "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "mesh"},
        "spec": {"hosts": ["web.mesh.svc.cluster.local"],
                 "http": [{"route": [{"destination": {"host": "web.mesh.svc.cluster.local"}}]}]},
    })
}

const PEER_AUTHENTICATION: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// A `KubeSource` for `kinds` on the fake, spawned on the test's runtime; its events.
fn source(fake: &FakeKube, kinds: &[Kind]) -> mpsc::Receiver<SourceEvent> {
    let (tx, rx) = mpsc::channel(64);
    let source = KubeSource::new(fake.client(), tx)
        .with_kinds(kinds)
        .with_discovery_retry(Duration::from_millis(50));
    tokio::spawn(source.run());
    rx
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    match tokio::time::timeout(PATIENCE, rx.recv()).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!("the source stopped"),
        Err(_) => panic!("no event from the source within {PATIENCE:?}"),
    }
}

/// Skips events until `f` picks one.
async fn wait_for<T>(
    rx: &mut mpsc::Receiver<SourceEvent>,
    what: &str,
    mut f: impl FnMut(SourceEvent) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                if let Some(v) = f(e) {
                    return v;
                }
            }
            Ok(None) => panic!("the source stopped while waiting for {what}"),
            Err(_) => panic!("no {what} within {PATIENCE:?}"),
        }
    }
}

/// Waits until at least `count` requests contain `needle`.
async fn requested(fake: &FakeKube, needle: &str, count: usize) {
    let deadline = Instant::now() + PATIENCE;
    while fake
        .requests()
        .iter()
        .filter(|r| r.contains(needle))
        .count()
        < count
    {
        assert!(
            Instant::now() < deadline,
            "fewer than {count} requests with {needle:?} within {PATIENCE:?}: {:#?}",
            fake.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn names(objects: &[Object]) -> Vec<String> {
    let mut n: Vec<String> = objects.iter().map(|o| o.object_ref().name).collect();
    n.sort();
    n
}

#[track_caller]
fn replaced(e: SourceEvent) -> Vec<Object> {
    match e {
        SourceEvent::Replace { objects, .. } => objects,
        other => panic!("expected a Replace, got {other:?}"),
    }
}

#[track_caller]
fn applied_pod(e: SourceEvent) -> Box<k8s_openapi::api::core::v1::Pod> {
    match e {
        SourceEvent::Apply(Object::Pod(p)) => p,
        other => panic!("expected an Apply of a Pod, got {other:?}"),
    }
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

#[tokio::test]
async fn the_source_sees_a_list_then_apply_modify_delete() {
    let fake = FakeKube::start(None);
    fake.apply(pod("a", "10.0.0.1")).expect("apply a");
    let mut rx = source(&fake, &[Kind::Pod]);

    assert_eq!(names(&replaced(next(&mut rx).await)), vec!["a"]);
    fake.apply(pod("b", "10.0.0.2")).expect("apply b");
    let b = applied_pod(next(&mut rx).await);
    assert_eq!(b.metadata.name.as_deref(), Some("b"));
    assert!(b.metadata.uid.is_some() && b.metadata.creation_timestamp.is_some());
    fake.apply(pod("b", "10.0.0.3")).expect("modify b");
    let b2 = applied_pod(next(&mut rx).await);
    assert_eq!(pod_ip(&b2).as_deref(), Some("10.0.0.3"));
    assert_eq!(b2.metadata.uid, b.metadata.uid, "a replace keeps the uid");
    fake.delete("Pod", "mesh", "b").expect("delete b");
    match next(&mut rx).await {
        SourceEvent::Delete(r) => {
            assert_eq!((r.namespace.as_str(), r.name.as_str()), ("mesh", "b"))
        }
        other => panic!("expected a Delete of mesh/b, got {other:?}"),
    }
    // What the source asked for: a list served from the watch cache (`resourceVersion=0`, no
    // page size: kube drops the version when a limit is set), then a watch from its version.
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("resourceVersion=0")
            && !r.contains("limit=")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("resourceVersion=")),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn set_deleting_arrives_as_an_apply_with_a_deletion_timestamp() {
    let fake = FakeKube::start(None);
    fake.apply(pod("a", "10.0.0.1")).expect("apply a");
    let mut rx = source(&fake, &[Kind::Pod]);
    assert_eq!(names(&replaced(next(&mut rx).await)), vec!["a"]);

    fake.set_deleting("Pod", "mesh", "a").expect("set_deleting");
    let a = applied_pod(next(&mut rx).await);
    assert_eq!(a.metadata.name.as_deref(), Some("a"));
    assert!(a.metadata.deletion_timestamp.is_some(), "{:?}", a.metadata);
    // The deletion cannot be undone by a replace, and the object stays until deleted.
    fake.apply(pod("a", "10.0.0.9")).expect("replace a");
    let a = applied_pod(next(&mut rx).await);
    assert!(a.metadata.deletion_timestamp.is_some(), "{:?}", a.metadata);
    assert_eq!(fake.objects("Pod").expect("pods").len(), 1);
}

#[tokio::test]
async fn a_restart_leads_to_a_relist_with_the_changes_made_while_down() {
    let fake = FakeKube::start(None);
    fake.apply(pod("a", "10.0.0.1")).expect("apply a");
    let (tx, mut rx) = mpsc::channel(64);
    let source = KubeSource::new(fake.client(), tx).with_kinds(&[Kind::Pod]);
    let stats = source.stats();
    tokio::spawn(source.run());
    assert_eq!(names(&replaced(next(&mut rx).await)), vec!["a"]);
    requested(&fake, "watch=true", 1).await;

    fake.down();
    fake.apply(pod("b", "10.0.0.2")).expect("apply b");
    fake.delete("Pod", "mesh", "a").expect("delete a");
    fake.restart();
    // The watch resumes from a version the restarted server no longer has: 410, then a re-list.
    assert_eq!(names(&replaced(next(&mut rx).await)), vec!["b"]);
    assert!(stats.relists(Kind::Pod) >= 1, "{:?}", stats.kind(Kind::Pod));
}

#[tokio::test]
async fn a_crd_installed_later_is_listed_and_an_uninstall_deletes_its_objects() {
    let fake = FakeKube::start(None);
    fake.uninstall_crds("security.istio.io").expect("uninstall");
    match fake.apply_yaml(PEER_AUTHENTICATION) {
        Err(FakeKubeError::NotInstalled { kind, .. }) => assert_eq!(kind, "PeerAuthentication"),
        other => panic!("expected NotInstalled, got {other:?}"),
    }
    let mut rx = source(&fake, &[Kind::PeerAuthentication]);
    // Looked for at every version, twice: not installed, looked for again.
    requested(&fake, "GET /apis/security.istio.io/v1beta1", 2).await;
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.contains("peerauthentications")),
        "nothing to list while the CRD is missing: {:#?}",
        fake.requests()
    );

    fake.install_crds("security.istio.io").expect("install");
    fake.apply_yaml(PEER_AUTHENTICATION).expect("apply");
    let listed = wait_for(&mut rx, "a Replace with the PeerAuthentication", |e| {
        let objects = match e {
            SourceEvent::Replace { objects, .. } => objects,
            _ => return None,
        };
        (!objects.is_empty()).then_some(objects)
    })
    .await;
    assert_eq!(names(&listed), vec!["strict"]);

    fake.uninstall_crds("security.istio.io")
        .expect("uninstall again");
    // The object leaves the source's view one of two ways, depending on whether the watch was
    // connected when the CRD went: a DELETED event, or (the watch then answers 404 for good) the
    // rediscovery finding the CRD not installed, which replaces the kind with nothing.
    let gone = wait_for(&mut rx, "the PeerAuthentication gone", |e| match e {
        SourceEvent::Delete(r) => Some(format!("{}/{}", r.namespace, r.name)),
        SourceEvent::Replace { kinds, objects, .. }
            if kinds == vec![Kind::PeerAuthentication] && objects.is_empty() =>
        {
            Some("istio-system/strict".to_string())
        }
        _ => None,
    })
    .await;
    assert_eq!(gone, "istio-system/strict");
    assert!(fake
        .objects("PeerAuthentication")
        .expect("objects")
        .is_empty());
}

#[tokio::test]
async fn failing_discovery_yields_nothing_until_cleared_and_does_not_fall_back() {
    let fake = FakeKube::start(None);
    fake.apply(virtual_service("networking.istio.io/v1", "web"))
        .expect("apply");
    fake.fail_discovery("networking.istio.io/v1", true)
        .expect("fail");
    let (tx, mut rx) = mpsc::channel(64);
    let source = KubeSource::new(fake.client(), tx)
        .with_kinds(&[Kind::VirtualService])
        .with_discovery_retry(Duration::from_millis(50));
    let stats = source.stats();
    tokio::spawn(source.run());

    // kube's client retries a 503 (15 times, backing off), so the source may see no error for
    // minutes; what matters is that it keeps asking and lists nothing meanwhile.
    requested(&fake, "GET /apis/networking.istio.io/v1", 3).await;
    while let Ok(e) = rx.try_recv() {
        let carries_objects = match &e {
            SourceEvent::Replace { objects, .. } => !objects.is_empty(),
            SourceEvent::Apply(_) | SourceEvent::Reject(..) => true,
            SourceEvent::Delete(_) => false,
        };
        assert!(
            !carries_objects,
            "an object arrived while discovery fails: {e:?}"
        );
    }
    // A 503 is not "not served": the source must not settle for v1beta1.
    assert!(
        !fake.requests().iter().any(|r| r.contains("/v1beta1")),
        "{:#?}",
        fake.requests()
    );

    fake.fail_discovery("networking.istio.io/v1", false)
        .expect("clear");
    let listed = wait_for(&mut rx, "a Replace with the VirtualService", |e| match e {
        SourceEvent::Replace { objects, .. } if !objects.is_empty() => Some(objects),
        _ => None,
    })
    .await;
    assert_eq!(names(&listed), vec!["web"]);
    assert_eq!(
        stats.kind(Kind::VirtualService).api_version.as_deref(),
        Some("networking.istio.io/v1")
    );
}

#[tokio::test]
async fn a_client_from_the_written_kubeconfig_lists_pods() {
    let fake = FakeKube::start(None);
    fake.apply(pod("a", "10.0.0.1")).expect("apply");
    let path = temp_path("kubeconfig");
    fake.kubeconfig(&path).expect("write kubeconfig");
    crate::tls::install_process_default();
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    let client = Client::try_from(config).expect("client");
    let pods: Api<Pod> = Api::all(client);
    let list = pods.list(&ListParams::default()).await.expect("list pods");
    let names: Vec<_> = list
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert_eq!(names, vec!["a"]);
    assert!(list
        .metadata
        .resource_version
        .is_some_and(|rv| rv != "0" && !rv.is_empty()));
}

fn temp_path(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "ambit-fake-kube-{what}-{}-{nanos:x}",
        std::process::id()
    ))
}

#[tokio::test]
async fn watches_replay_after_the_version_stream_live_and_honour_the_timeout() {
    let fake = FakeKube::start(None);
    let pods: Api<Pod> = Api::all(fake.client());
    let rv = pods
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version;
    let rv = rv.expect("list resource version");
    fake.apply(pod("a", "10.0.0.1")).expect("apply");
    fake.apply(pod("a", "10.0.0.2")).expect("modify");
    fake.apply(pod("a", "10.0.0.2"))
        .expect("unchanged: no event");

    let mut watch = pods
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch")
        .boxed();
    let ip = |p: &Pod| pod_ip(p).unwrap_or_default();
    assert!(
        matches!(next_watch(&mut watch).await, Some(WatchEvent::Added(p)) if ip(&p) == "10.0.0.1")
    );
    assert!(
        matches!(next_watch(&mut watch).await, Some(WatchEvent::Modified(p)) if ip(&p) == "10.0.0.2")
    );
    fake.delete("Pod", "mesh", "a").expect("delete");
    assert!(
        matches!(next_watch(&mut watch).await, Some(WatchEvent::Deleted(p)) if ip(&p) == "10.0.0.2")
    );
    // Nothing more (the unchanged apply sent nothing); the stream ends at timeoutSeconds.
    match next_watch(&mut watch).await {
        None => {}
        Some(e) => panic!("expected the end of the watch, got {e:?}"),
    }

    // From "0": a synthetic ADDED per current object.
    fake.apply(pod("b", "10.0.0.3")).expect("apply b");
    let mut watch = pods
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(Some(Ok(WatchEvent::Added(p)))) => assert_eq!(p.metadata.name.as_deref(), Some("b")),
        other => panic!("expected ADDED b, got {other:?}"),
    }
    fake.bookmark();
    let current = fake.objects("Pod").expect("pods")[0]["metadata"]["resourceVersion"].clone();
    match next_watch(&mut watch).await {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(json!(b.metadata.resource_version), current),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    // `down` closes open watches too, not only the listener.
    fake.down();
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(None | Some(Err(_))) => {}
        other => panic!("expected the watch to end when the server went down, got {other:?}"),
    }
}

#[tokio::test]
async fn a_watch_from_before_a_compaction_gets_410_expired_and_ends() {
    let fake = FakeKube::start(None);
    let pods: Api<Pod> = Api::all(fake.client());
    let rv = pods
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version;
    fake.apply(pod("a", "10.0.0.1")).expect("apply");
    fake.compact();
    let mut watch = pods
        .watch(&WatchParams::default(), &rv.expect("resource version"))
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(Some(Ok(WatchEvent::Error(s)))) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}");
            assert!(s.message.starts_with("too old resource version"), "{s:?}");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(matches!(
        tokio::time::timeout(PATIENCE, watch.next()).await,
        Ok(None)
    ));
}

/// The next event of a watch; None when it ends.
async fn next_watch<S>(watch: &mut S) -> Option<WatchEvent<Pod>>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin,
{
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(Some(Ok(e))) => Some(e),
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => None,
        Err(_) => panic!("no watch event within {PATIENCE:?}"),
    }
}

/// The `Status` a request to `path` fails with.
async fn failure(client: &Client, method: Method, path: &str) -> kube::core::Status {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .body(vec![])
        .expect("request");
    match client.request::<Value>(req).await {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("{path}: expected a Status error, got {other:?}"),
    }
}

async fn get(client: &Client, path: &str) -> Value {
    let req = http::Request::get(path).body(vec![]).expect("request");
    client
        .request::<Value>(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

#[tokio::test]
async fn bad_requests_get_a_status_and_the_server_goes_on() {
    let fake = FakeKube::start(None);
    let client = fake.client();
    for (method, path, code) in [
        (Method::POST, "/api/v1/namespaces/mesh/pods", 405),
        (Method::GET, "/nonsense", 404),
        (
            Method::GET,
            "/apis/networking.istio.io/v9/virtualservices",
            404,
        ),
        (Method::GET, "/api/v1/widgets", 404),
        (Method::GET, "/api/v1/pods/a", 404),
        (Method::GET, "/api/v1/namespaces/mesh/namespaces", 404),
        (Method::GET, "/api/v1/namespaces/mesh/pods/a/status", 404),
        (Method::GET, "/api/v1/namespaces/mesh/pods/missing", 404),
        (Method::GET, "/api/v1/pods?labelSelector=app%3Dweb", 400),
        (
            Method::GET,
            "/api/v1/pods?watch=true&resourceVersion=soon",
            400,
        ),
        (
            Method::GET,
            "/api/v1/pods?watch=true&timeoutSeconds=-1",
            400,
        ),
        (Method::GET, "/api/v1/pods?continue=abc", 400),
    ] {
        let s = failure(&client, method.clone(), path).await;
        assert_eq!(s.code, code, "{method} {path}: {s:?}");
        assert!(!s.reason.is_empty() && !s.message.is_empty(), "{s:?}");
    }
    fake.apply(pod("a", "10.0.0.1")).expect("apply");
    let list = get(&client, "/api/v1/pods").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test]
async fn crd_objects_are_served_at_every_version_and_discovery_follows_installs() {
    let fake = FakeKube::start(None);
    let client = fake.client();
    fake.apply(virtual_service("networking.istio.io/v1alpha3", "web"))
        .expect("apply");
    fake.apply(pod("a", "10.0.0.1")).expect("apply pod");
    for v in ["v1", "v1beta1", "v1alpha3"] {
        let list = get(
            &client,
            &format!("/apis/networking.istio.io/{v}/virtualservices"),
        )
        .await;
        assert_eq!(list["kind"], "VirtualServiceList");
        assert_eq!(
            list["items"][0]["apiVersion"],
            format!("networking.istio.io/{v}"),
            "{list}"
        );
        assert_eq!(list["items"][0]["kind"], "VirtualService");
    }
    // Built-in list items come without apiVersion and kind, as the real server sends them.
    let pods = get(&client, "/api/v1/pods").await;
    assert_eq!(pods["kind"], "PodList");
    assert!(pods["items"][0].get("apiVersion").is_none(), "{pods}");
    let rv: u64 = pods["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("rv");
    let item_rv: u64 = pods["items"][0]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("item rv");
    assert!(item_rv <= rv && item_rv > 0, "{pods}");

    let discovery = get(&client, "/apis/networking.istio.io/v1").await;
    let served: Vec<&str> = discovery["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(served.contains(&"virtualservices"), "{discovery}");
    fake.uninstall_crds("networking.istio.io")
        .expect("uninstall");
    let s = failure(&client, Method::GET, "/apis/networking.istio.io/v1").await;
    assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
    let s = failure(
        &client,
        Method::GET,
        "/apis/networking.istio.io/v1/virtualservices",
    )
    .await;
    assert_eq!(s.code, 404);
    let groups = get(&client, "/apis").await.to_string();
    assert!(
        !groups.contains("networking.istio.io") && groups.contains("security.istio.io"),
        "{groups}"
    );
}

#[tokio::test]
async fn lists_are_paginated_unless_served_from_the_watch_cache() {
    let fake = FakeKube::start(None);
    let client = fake.client();
    for (i, name) in ["e", "d", "c", "b", "a"].iter().enumerate() {
        fake.apply(pod(name, &format!("10.0.0.{i}")))
            .expect("apply");
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut versions = Vec::new();
    for _page in 0..5 {
        let path = match token.as_str() {
            "" => "/api/v1/pods?limit=2".to_string(),
            t => format!("/api/v1/pods?limit=2&continue={t}"),
        };
        let list = get(&client, &path).await;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= 2, "{list}");
        names.extend(
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string)),
        );
        versions.push(list["metadata"]["resourceVersion"].clone());
        match list["metadata"]["continue"].as_str() {
            Some(t) => token = t.to_string(),
            None => break,
        }
    }
    assert_eq!(names, vec!["a", "b", "c", "d", "e"]);
    assert!(
        versions.windows(2).all(|w| w[0] == w[1]),
        "one version for all pages: {versions:?}"
    );

    let whole = get(&client, "/api/v1/pods?limit=2&resourceVersion=0").await;
    assert_eq!(whole["items"].as_array().map(Vec::len), Some(5), "{whole}");
    assert!(whole["metadata"].get("continue").is_none(), "{whole}");

    let first = get(&client, "/api/v1/pods?limit=2").await;
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    fake.apply(pod("f", "10.0.0.9")).expect("apply f");
    fake.compact();
    let s = failure(
        &client,
        Method::GET,
        &format!("/api/v1/pods?limit=2&continue={token}"),
    )
    .await;
    assert_eq!((s.code, s.reason.as_str()), (410, "Expired"), "{s:?}");
}

#[tokio::test]
async fn failing_lists_answer_the_code_until_restored() {
    let fake = FakeKube::start(None);
    let client = fake.client();
    fake.fail_lists("Pod", Some(403)).expect("fail");
    let s = failure(&client, Method::GET, "/api/v1/pods").await;
    assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"), "{s:?}");
    assert!(s.message.contains("cannot list resource \"pods\""), "{s:?}");
    let s = failure(
        &client,
        Method::GET,
        "/api/v1/pods?watch=true&resourceVersion=1",
    )
    .await;
    assert_eq!(s.code, 403);
    // Other kinds are not affected.
    get(&client, "/api/v1/services").await;
    fake.fail_lists("Pod", None).expect("restore");
    get(&client, "/api/v1/pods").await;
    assert!(matches!(
        fake.fail_lists("Pod", Some(200)),
        Err(FakeKubeError::NotAnError { code: 200 })
    ));
    assert!(matches!(
        fake.fail_lists("Widget", Some(500)),
        Err(FakeKubeError::UnknownKind { .. })
    ));
}

#[test]
fn bad_yaml_is_refused_and_nothing_of_it_is_applied() {
    let fake = FakeKube::start(None);
    let good_then_bad = "
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh}
---
apiVersion: v1
kind: Pod
metadata: {namespace: mesh}
";
    match fake.apply_yaml(good_then_bad) {
        Err(FakeKubeError::Invalid { at, message }) => {
            assert_eq!(at, "YAML document 2");
            assert!(message.contains("metadata.name"), "{message}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(fake.objects("Pod").expect("pods").is_empty());
    assert!(matches!(
        fake.apply_yaml("kind: [unclosed"),
        Err(FakeKubeError::Yaml { .. })
    ));
    assert!(matches!(
        fake.apply_yaml("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n"),
        Err(FakeKubeError::NotServed { .. })
    ));
    assert!(matches!(
        fake.apply(json!(5)),
        Err(FakeKubeError::Invalid { .. })
    ));
    assert!(matches!(
        fake.delete("Pod", "mesh", "a"),
        Err(FakeKubeError::NotFound { .. })
    ));

    // A List, a cluster-scoped object (its namespace dropped), and a namespace defaulted.
    fake.apply_yaml(
        "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: mesh, namespace: ignored}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}, data: {k: v}}
",
    )
    .expect("apply a List");
    let namespaces = fake.objects("Namespace").expect("namespaces");
    assert_eq!(namespaces.len(), 1);
    assert!(
        namespaces[0]["metadata"].get("namespace").is_none(),
        "{}",
        namespaces[0]
    );
    assert_eq!(
        fake.objects("ConfigMap").expect("configmaps")[0]["metadata"]["namespace"],
        "default"
    );
}

#[test]
fn down_refuses_connections_and_up_serves_again_in_the_node_netns() {
    let world = World::new("fake_kube_netns");
    let node = world.node("n1");
    let fake = FakeKube::start(Some(node.netns_path()));
    fake.apply(pod("a", "10.0.0.1")).expect("apply");
    let list_in_node = || {
        node.run_async(|| async {
            let pods: Api<Pod> = Api::all(fake.client());
            pods.list(&ListParams::default())
                .await
                .map(|l| l.items.len())
        })
    };
    let connect_in_node = || node.run(|| std::net::TcpStream::connect(fake.addr()).map(drop));

    assert_eq!(list_in_node().expect("list in the node netns"), 1);
    // The port is the node's loopback, not the test's.
    assert!(std::net::TcpStream::connect(fake.addr()).is_err());

    fake.down();
    let refused = connect_in_node().expect_err("connect while down");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    fake.up();
    connect_in_node().expect("connect after up");
    assert_eq!(list_in_node().expect("list after up"), 1);
}
