//! ServiceEntry hosts as routing targets, case by case, each naming the Istio rule it checks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::files::{load_text, Loaded};
use crate::config::Kind;
use crate::dns::DnsAnswers;
use crate::routing::{compile, Routes};
use crate::state::store::Store;
use crate::state::State;

fn state(yaml: &str) -> Arc<State> {
    let base = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n";
    let mut loaded = Loaded::default();
    load_text(
        &mut loaded,
        std::path::Path::new("entries.yaml"),
        &format!("{base}---\n{yaml}"),
    );
    assert!(loaded.file_errors.is_empty(), "{:?}", loaded.file_errors);
    let mut store = Store::new("cluster.local");
    store.apply(loaded.into_event());
    store.publish();
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    store.reader().load_full()
}

fn routes(state: &State, client: &str, dns: &DnsAnswers) -> Routes {
    let (routes, notes) = compile(state, "istio-system", [client], dns);
    assert!(notes.is_empty(), "{notes:?}");
    routes
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().expect("address")).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Istio ServiceEntry reference, `endpoints`: an endpoint's `ports` map (by port name) wins over
/// the port's `targetPort`, which wins over its `number`; `labels` select DestinationRule subsets;
/// a port's `protocol` is its declared protocol.
#[test]
fn static_endpoints_take_their_port_by_name_and_are_subset_by_label() {
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.1, 240.1.0.0/16]
  ports: [{number: 8080, name: http, protocol: HTTP, targetPort: 9090}, {number: 8443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints:
  - {address: 192.0.2.1, labels: {version: v1}}
  - {address: 192.0.2.2, ports: {http: 7070}, labels: {version: v2}}
"#,
    );
    let r = routes(&s, "default", &DnsAnswers::default());
    let e = r.entry("default", "api.example.com").expect("the entry");
    assert_eq!(
        &*e.endpoints[&8080].v4,
        addrs(&["192.0.2.1:9090", "192.0.2.2:7070"])
    );
    assert_eq!(
        &*e.endpoints[&8443].v4,
        addrs(&["192.0.2.1:8443", "192.0.2.2:8443"])
    );
    assert_eq!(
        &*e.subset(8080, &labels(&[("version", "v2")])).v4,
        addrs(&["192.0.2.2:7070"])
    );
    assert!(e.subset(8080, &labels(&[("version", "v9")])).v4.is_empty());
    assert_eq!(e.service.ports[0].app_protocol.as_deref(), Some("HTTP"));
    assert_eq!(e.service.vips, vec!["240.0.0.1".parse::<IpAddr>().unwrap()]);
    assert!(
        e.has_address("240.1.7.7".parse().unwrap()),
        "a CIDR address"
    );
    assert!(!e.has_address("240.2.0.1".parse().unwrap()));
    assert!(!e.is_passthrough());
}

/// Istio: `resolution: DNS` resolves each endpoint's address (or the host when there are no
/// endpoints) and uses every address; `DNS_ROUND_ROBIN` uses one; a name not resolved yet has no
/// endpoints. The names to resolve are those, each with the entries needing it.
#[test]
fn dns_entries_use_the_resolvers_answers() {
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-endpoint, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
  endpoints: [{address: Backend.Example.NET}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-host, namespace: default}
spec:
  hosts: [www.example.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS_ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wildcard, namespace: default}
spec:
  hosts: ["*.wild.example"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#,
    );
    let names = crate::routing::entries::dns_names(&s);
    assert_eq!(
        names.keys().map(String::as_str).collect::<Vec<_>>(),
        ["backend.example.net", "www.example.org"],
        "lowercase; only DNS entries"
    );
    assert_eq!(names["backend.example.net"][0].name, "by-endpoint");
    assert_eq!(names["backend.example.net"][0].kind, Kind::ServiceEntry);

    let unresolved = routes(&s, "default", &DnsAnswers::default());
    let e = unresolved
        .entry("default", "api.example.com")
        .expect("entry");
    assert!(e.endpoints.get(&443).is_none_or(|p| p.v4.is_empty()));

    let mut dns = DnsAnswers::default();
    let ips = |l: &[&str]| -> Arc<[IpAddr]> { l.iter().map(|a| a.parse().unwrap()).collect() };
    dns.insert(
        "backend.example.net".into(),
        ips(&["192.0.2.10", "192.0.2.11"]),
    );
    dns.insert(
        "www.example.org".into(),
        ips(&["198.51.100.1", "198.51.100.2"]),
    );
    let r = routes(&s, "default", &dns);
    let e = r.entry("default", "api.example.com").expect("entry");
    assert_eq!(
        &*e.endpoints[&443].v4,
        addrs(&["192.0.2.10:443", "192.0.2.11:443"])
    );
    let e = r.entry("default", "www.example.org").expect("entry");
    assert_eq!(
        &*e.endpoints[&80].v4,
        addrs(&["198.51.100.1:80"]),
        "one address"
    );
    assert!(
        r.entry("default", "a.wild.example").is_some(),
        "wildcards match"
    );
}

/// Istio: `resolution: NONE` forwards to the original destination; `workloadSelector` selects the
/// running pods of the entry's namespace.
#[test]
fn none_passes_through_and_a_workload_selector_selects_pods() {
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: default}
spec:
  hosts: [db.internal]
  addresses: [10.10.0.0/16]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: selected, namespace: default}
spec:
  hosts: [vm.internal]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: STATIC
  workloadSelector: {labels: {app: vm}}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-1, namespace: default, labels: {app: vm, version: v1}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.5, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-other-ns, namespace: other, labels: {app: vm}}
spec: {nodeName: n1}
status: {podIP: 10.0.0.6, phase: Running}
"#,
    );
    let r = routes(&s, "default", &DnsAnswers::default());
    let db = r.entry("default", "db.internal").expect("entry");
    assert!(db.is_passthrough());
    assert!(db.endpoints.is_empty());
    let vm = r.entry("default", "vm.internal").expect("entry");
    assert_eq!(&*vm.endpoints[&80].v4, addrs(&["10.0.0.5:8080"]));
    assert_eq!(
        &*vm.subset(80, &labels(&[("version", "v1")])).v4,
        addrs(&["10.0.0.5:8080"])
    );
}

/// Istio: `exportTo: ["."]` keeps an entry to its namespace; when two entries define one host,
/// the client's own namespace wins, else the oldest, and the other is reported.
#[test]
fn export_to_and_conflicting_hosts() {
    let s = state(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: other}
spec:
  hosts: [private.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: theirs, namespace: other}
spec:
  hosts: [shared.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ours, namespace: default}
spec:
  hosts: [shared.example.com]
  ports: [{number: 81, name: http, protocol: HTTP}]
  resolution: NONE
"#,
    );
    let (r, notes) = compile(
        &s,
        "istio-system",
        ["default", "other"],
        &DnsAnswers::default(),
    );
    assert!(r.entry("default", "private.example.com").is_none());
    assert!(r.entry("other", "private.example.com").is_some());
    let port = |ns: &str| {
        r.entry(ns, "shared.example.com")
            .expect("entry")
            .service
            .ports[0]
            .port
    };
    assert_eq!(port("default"), 81, "the client's own namespace first");
    assert_eq!(port("other"), 80);
    assert_eq!(
        notes.len(),
        2,
        "one conflict per client namespace: {notes:?}"
    );
    assert!(
        notes.iter().all(|n| n.field == "spec.hosts[0]"),
        "{notes:?}"
    );
}
