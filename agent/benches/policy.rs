//! Policy benchmark: the per-connection authorization cost (policy lookup + `evaluate`) for one
//! workload, as the number of AuthorizationPolicies in the cluster grows while the number that
//! apply to the workload stays fixed, and with 50 applying. Also the compile time per snapshot.
//!
//! `cargo bench -p ambit-agent --bench policy`
//! Not criterion (not a dependency of this crate): each scenario runs a fixed number of checks
//! in 7 rounds and prints the median round's ns/check. Timings are printed, never asserted.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use ambit::config::files::{load_text, Loaded};
use ambit::identity::Identity;
use ambit::policy::{evaluate, CompiledPolicies, ConnAttrs};
use ambit::state::store::Store;
use ambit::state::State;

const ROOT: &str = "istio-system";
const CHECKS: u32 = 200_000;
const ROUNDS: usize = 7;

const CLUSTER: &str = "apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {nodeName: n1, serviceAccountName: httpbin, containers: []}
status: {phase: Running, podIP: 10.0.1.1}
";

/// The one policy that applies and matches: ALLOW foo/sleep on port 8000.
fn applying_allow() -> String {
    "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-allow, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    to: [{operation: {ports: ['8000']}}]
"
    .to_string()
}

/// Applies to httpbin and does not match the benchmark connection, so each is evaluated fully.
fn applying_deny(i: usize) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-{i}, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: [evil-{i}], principals: ['*/sa/evil']}}}}]
    to: [{{operation: {{ports: ['8000', '9000']}}}}]
"
    )
}

/// Does not apply to httpbin: half in other namespaces (with httpbin's labels), half in foo
/// selecting other apps.
fn unrelated(i: usize) -> String {
    let (ns, app) = if i.is_multiple_of(2) {
        (format!("other-{}", i % 100), "httpbin".to_string())
    } else {
        ("foo".to_string(), format!("app-{i}"))
    };
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: unrelated-{i}, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: DENY
  rules:
  - from: [{{source: {{namespaces: [x-{i}]}}}}]
"
    )
}

fn state(docs: &[String]) -> State {
    let text = format!("{CLUSTER}---\n{}", docs.join("---\n"));
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("bench.yaml"), &text);
    assert!(
        loaded.file_errors.is_empty() && loaded.rejected.is_empty(),
        "bench YAML must load cleanly: {:?} {:?}",
        loaded.file_errors,
        loaded.rejected
    );
    let mut store = Store::new("cluster.local");
    store.apply(loaded.into_event());
    store.publish();
    (*store.reader().load_full()).clone()
}

struct Result {
    name: String,
    ns_per_check: f64,
    build: Duration,
}

fn run(name: &str, docs: Vec<String>) -> Result {
    let s = state(&docs);
    let start = Instant::now();
    let compiled = CompiledPolicies::build(&s, ROOT);
    let build = start.elapsed();
    let peer = Identity::new("cluster.local", "foo", "sleep");
    let conn = ConnAttrs {
        src_ip: "10.0.1.2".parse().expect("literal IP"),
        dst_ip: "10.0.1.1".parse().expect("literal IP"),
        dst_port: 8000,
        identity: Some(&peer),
    };
    let check = || {
        let p = compiled
            .for_workload(black_box("foo"), black_box("httpbin"))
            .expect("httpbin is enrolled");
        evaluate(&p, black_box(&conn))
    };
    assert!(
        check().is_allowed(),
        "{name}: the benchmark connection must be allowed"
    );
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CHECKS {
                black_box(check());
            }
            start.elapsed().as_nanos() as f64 / f64::from(CHECKS)
        })
        .collect();
    rounds.sort_by(|a, b| a.total_cmp(b));
    Result {
        name: name.to_string(),
        ns_per_check: rounds[ROUNDS / 2],
        build,
    }
}

fn main() {
    let with_unrelated = |n: usize| {
        let mut docs = vec![applying_allow()];
        docs.extend((1..n).map(unrelated));
        docs
    };
    let mut fifty = vec![applying_allow()];
    fifty.extend((0..49).map(applying_deny));
    fifty.extend((50..10_000).map(unrelated));
    let results = [
        run("1 policy (applies)", with_unrelated(1)),
        run("100 policies (1 applies)", with_unrelated(100)),
        run("10,000 policies (1 applies)", with_unrelated(10_000)),
        run("10,000 policies (50 apply: 49 DENY miss, 1 ALLOW)", fifty),
    ];
    println!("{:<52} {:>12} {:>14}", "scenario", "ns/check", "build (ms)");
    for r in &results {
        println!(
            "{:<52} {:>12.1} {:>14.2}",
            r.name,
            r.ns_per_check,
            r.build.as_secs_f64() * 1e3
        );
    }
    println!(
        "ratio 10,000 unrelated / 1 policy: {:.2}x (target <= 1.1x)",
        results[2].ns_per_check / results[0].ns_per_check
    );
}
