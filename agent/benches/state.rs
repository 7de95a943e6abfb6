//! State benchmark: memory (RSS growth) and full-rebuild time of the state for a synthetic cluster,
//! and the time from one object change to the new snapshot being visible to a reader.
//!
//! `cargo bench -p ambit-agent --bench state [-- --services N --pods N --endpoints-per-slice N]`
//! Method and numbers: agent/benches/README.md. Not criterion: each measurement builds a whole
//! cluster, and RSS is a process-wide figure that criterion's repeated in-process runs would blur.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ambit::config::{Kind, Object, SourceEvent};
use ambit::state::store::Store;
use k8s_openapi::api::core::v1::{
    Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

struct Size {
    services: usize,
    pods: usize,
    endpoints_per_slice: usize,
    namespaces: usize,
    policies: usize,
}

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        uid: Some(format!("uid-{ns}-{name}")),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

fn ip4(i: usize, base: u8) -> String {
    format!("{base}.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn pod(i: usize, ns: &str, generation: usize) -> Object {
    Object::Pod(Box::new(Pod {
        metadata: meta(
            ns,
            &format!("pod-{i}"),
            &[
                ("app", &format!("svc-{}", i % 10_000)),
                ("gen", &generation.to_string()),
            ],
        ),
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % 500)),
            service_account_name: Some("default".into()),
            containers: vec![],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip4(i, 10)),
            pod_ips: Some(vec![PodIP { ip: ip4(i, 10) }]),
            ..Default::default()
        }),
    }))
}

fn cluster(size: &Size) -> Vec<Object> {
    let mut out = Vec::new();
    each_object(size, |o| out.push(o));
    out
}

/// Generates the cluster one object at a time, so a consumer can apply and drop each.
fn each_object(size: &Size, mut emit: impl FnMut(Object)) {
    let out = &mut Vec::new();
    let mut flush = |out: &mut Vec<Object>| {
        for o in out.drain(..) {
            emit(o);
        }
    };
    for n in 0..size.namespaces {
        out.push(Object::Namespace(Box::new(
            k8s_openapi::api::core::v1::Namespace {
                metadata: ObjectMeta {
                    name: Some(format!("ns-{n}")),
                    labels: Some(
                        [("istio.io/dataplane-mode".to_string(), "ambient".to_string())].into(),
                    ),
                    ..Default::default()
                },
                ..Default::default()
            },
        )));
    }
    for i in 0..size.pods {
        out.push(pod(i, &format!("ns-{}", i % size.namespaces), 0));
        flush(out);
    }
    for s in 0..size.services {
        let ns = format!("ns-{}", s % size.namespaces);
        out.push(Object::Service(Box::new(Service {
            metadata: meta(&ns, &format!("svc-{s}"), &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip4(s, 172)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })));
        out.push(Object::EndpointSlice(Box::new(EndpointSlice {
            metadata: meta(
                &ns,
                &format!("svc-{s}-1"),
                &[("kubernetes.io/service-name", &format!("svc-{s}"))],
            ),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: Some(
                (0..size.endpoints_per_slice)
                    .map(|e| Endpoint {
                        addresses: vec![ip4((s * size.endpoints_per_slice + e) % size.pods, 10)],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        })));
        flush(out);
    }
    for p in 0..size.policies {
        let ns = format!("ns-{}", p % size.namespaces);
        let value = serde_json::json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": format!("policy-{p}"), "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": format!("svc-{}", p % size.services)}},
                "action": if p % 10 == 0 { "DENY" } else { "ALLOW" },
                "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/client-{p}")]}}],
                           "to": [{"operation": {"ports": ["8080"]}}]}]
            }
        });
        match ambit::config::parse(value) {
            ambit::config::Parsed::Object(o) => out.push(o),
            other => panic!("generated policy does not parse: {other:?}"),
        }
        flush(out);
    }
    flush(out);
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let size = Size {
        services: arg("--services", 10_000),
        pods: arg("--pods", 50_000),
        endpoints_per_slice: arg("--endpoints-per-slice", 10),
        namespaces: arg("--namespaces", 100),
        policies: arg("--policies", 2_000),
    };
    println!(
        "state benchmark: {} services, {} pods, {} endpoints, {} namespaces, {} AuthorizationPolicies",
        size.services,
        size.pods,
        size.services * size.endpoints_per_slice,
        size.namespaces,
        size.policies
    );

    // Memory: objects are generated, applied one at a time (as watch events arrive) and dropped,
    // so the RSS growth is the state's own footprint plus allocator overhead.
    let before = rss_bytes();
    let mut store = Store::new("cluster.local");
    each_object(&size, |o| store.apply(SourceEvent::Apply(o)));
    store.publish();
    let after = rss_bytes();
    assert_eq!(
        store.reader().load().workloads.len(),
        size.pods,
        "every pod is in the state"
    );
    println!(
        "RSS growth:          {:>10.1} MB (state built from {} streamed objects)",
        after.saturating_sub(before) as f64 / 1e6,
        store.state().workloads.len()
            + store.state().services.len() * 2
            + size.policies
            + size.namespaces
    );
    drop(store);

    // Full rebuild time: one Replace of everything (an initial list / a reload), into a new store.
    let objects = cluster(&size);
    let mut store = Store::new("cluster.local");
    let t = Instant::now();
    store.apply(SourceEvent::Replace {
        kinds: Kind::ALL.to_vec(),
        objects,
        rejected: vec![],
        origins: BTreeMap::new(),
    });
    store.publish();
    let rebuild = t.elapsed();
    let reader = store.reader();
    assert_eq!(
        reader.load().workloads.len(),
        size.pods,
        "every pod is in the state"
    );
    assert!(
        store.errors().is_empty(),
        "generated objects are valid: {:?}",
        &store.errors()[..store.errors().len().min(3)]
    );
    println!(
        "full rebuild:        {:>10.1} ms",
        rebuild.as_secs_f64() * 1e3
    );

    // A second full rebuild over the same objects (a re-list): nothing changes, nothing published.
    let again = cluster(&size);
    let t = Instant::now();
    store.apply(SourceEvent::Replace {
        kinds: Kind::ALL.to_vec(),
        objects: again,
        rejected: vec![],
        origins: BTreeMap::new(),
    });
    let unchanged_published = store.publish();
    println!(
        "re-list, unchanged:  {:>10.1} ms (published: {unchanged_published})",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Single-object change → visible to a reader: apply + publish + the reader's load.
    let mut samples = Vec::new();
    for g in 1..=200usize {
        let i = (g * 7919) % size.pods;
        let change = pod(i, &format!("ns-{}", i % size.namespaces), g);
        let t = Instant::now();
        store.apply(SourceEvent::Apply(change));
        store.publish();
        let seen = reader.load();
        let w = seen.workloads.get(&ambit::state::key(
            &format!("ns-{}", i % size.namespaces),
            &format!("pod-{i}"),
        ));
        assert_eq!(
            w.and_then(|w| w.labels.get("gen").cloned()),
            Some(g.to_string()),
            "reader sees the change"
        );
        samples.push(t.elapsed());
    }
    let p50 = median(samples.clone());
    samples.sort();
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "single change → visible: p50 {:.3} ms, p99 {:.3} ms (200 changes)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    println!(
        "targets: RSS < 200 MB: {}; single change < 10 ms: {}",
        if after.saturating_sub(before) < 200_000_000 {
            "PASS"
        } else {
            "MISS"
        },
        if p99 < Duration::from_millis(10) {
            "PASS"
        } else {
            "MISS"
        }
    );
}
