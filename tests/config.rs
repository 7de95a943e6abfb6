//! The config model seen from outside: `ambit check` names every mistake with its file, object and
//! field and exits non-zero; a clean directory passes.

mod support;

use std::process::Command;

use support::ambit_bin;

fn check(dir: &std::path::Path) -> (bool, String) {
    let out = Command::new(ambit_bin())
        .args(["check", "-f"])
        .arg(dir)
        .output()
        .expect("run ambit check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ambit-check-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("nested")).expect("temp dir");
    d
}

#[test]
fn check_names_every_mistake_and_fails() {
    let dir = temp_dir("bad");
    std::fs::write(
        dir.join("services.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 9080, targetPort: 70000}]}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("nested/pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {hostNetwork: maybe, containers: []}\n---\n\
         apiVersion: v9\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-1, namespace: shop}\naddressType: IPv4\nendpoints: []\n",
    )
    .expect("write");
    std::fs::write(dir.join("broken.yml"), "kind: [unclosed\n").expect("write");
    let (ok, out) = check(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "check must fail on mistakes:\n{out}");
    let expected = [
        ("services.yaml", "Service shop/reviews", "spec.clusterIP"),
        (
            "services.yaml",
            "Service shop/reviews",
            "spec.ports[0].targetPort",
        ),
        ("pods.yaml", "Pod shop/web", "spec.hostNetwork"),
        ("pods.yaml", "Namespace shop", "apiVersion"),
        (
            "pods.yaml",
            "EndpointSlice shop/reviews-1",
            "kubernetes.io/service-name",
        ),
        ("broken.yml", "", ""),
    ];
    for (file, object, field) in expected {
        assert!(
            out.lines()
                .any(|l| l.contains(file) && l.contains(object) && l.contains(field)),
            "no line naming {file} / {object} / {field}:\n{out}"
        );
    }
    assert_eq!(
        out.lines().count(),
        expected.len(),
        "exactly one line per mistake:\n{out}"
    );
}

#[test]
fn check_passes_a_clean_directory() {
    let dir = temp_dir("good");
    std::fs::write(
        dir.join("ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: ignored}\n",
    )
    .expect("write");
    let (ok, out) = check(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "clean config must pass:\n{out}");
}
