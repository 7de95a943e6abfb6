//! `cargo xtask check-deploy`: would a real API server accept deploy/, and admit its pods? Renders
//! the kustomization with `kubectl kustomize`, validates every object against the Kubernetes
//! OpenAPI schemas ([`schema`]), checks each pod template against the Pod Security level its
//! namespace enforces ([`pss`]) and against the API server's rules no schema states ([`apiserver`]).

mod apiserver;
mod pod;
mod pss;
mod schema;

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize as _;
use serde_json::Value;

use pod::Object;
use pss::Level;

const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// A namespace without the label gets the cluster's default level. The API server's own default
/// is `privileged`, but clusters that enforce anything commonly default to `baseline` (managed
/// offerings, hardening guides), so an unlabelled namespace is held to that.
const CLUSTER_DEFAULT: Level = Level::Baseline;

/// Checks the kustomization in `dir`, printing a summary; any problem fails it.
pub fn check(dir: &Path) -> Result<()> {
    let kubectl = kubectl_version()?;
    let rendered = render(dir)?;
    let objects = parse(&rendered)?;
    if objects.is_empty() {
        bail!("`kubectl kustomize {}` rendered no object", dir.display());
    }
    let work = xtask::target_dir().join("xtask-deploy");
    fs::create_dir_all(&work).with_context(|| format!("failed to create {}", work.display()))?;
    let file = work.join("rendered.yaml");
    fs::write(&file, &rendered).with_context(|| format!("failed to write {}", file.display()))?;

    let schema = schema::validate(
        &xtask::target_dir().join("xtask-venv"),
        &file,
        objects.len(),
    )?;
    let admission = admit(&objects)?;

    let kinds: Vec<String> = objects.iter().map(Object::describe).collect();
    say(format_args!(
        "rendered {} with kubectl {kubectl}: {} objects ({})",
        dir.display(),
        objects.len(),
        kinds.join(", ")
    ));
    say(format_args!(
        "schemas: {} of {} object-version pairs valid against Kubernetes {}, unknown fields refused ({})",
        schema.passed,
        objects.len() * schema::KUBERNETES_VERSIONS.len(),
        schema::KUBERNETES_VERSIONS.join(" and "),
        schema::validator()
    ));
    for line in &admission.admitted {
        say(format_args!("admission: {line}"));
    }
    let problems: Vec<&String> = schema.problems.iter().chain(&admission.refused).collect();
    if problems.is_empty() {
        say(format_args!(
            "{} passed (rendered manifest: {})",
            dir.display(),
            file.display()
        ));
        return Ok(());
    }
    for problem in &problems {
        eprintln!("[xtask] problem: {problem}");
    }
    bail!(
        "{} has {} problem(s) a Kubernetes API server would refuse (rendered manifest: {})",
        dir.display(),
        problems.len(),
        file.display()
    )
}

fn say(msg: std::fmt::Arguments<'_>) {
    eprintln!("[xtask] check-deploy: {msg}");
}

/// kubectl's client version; the error of a missing kubectl says what to install.
fn kubectl_version() -> Result<String> {
    let out = match Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
    {
        Err(err) if err.kind() == io::ErrorKind::NotFound => bail!(
            "kubectl not found on PATH: check-deploy renders deploy/ with `kubectl kustomize`. \
             Install kubectl (1.27 or later), e.g. from pkgs.k8s.io or your distribution"
        ),
        Err(err) => return Err(err).context("failed to run kubectl"),
        Ok(out) => out,
    };
    if !out.status.success() {
        bail!(
            "`kubectl version --client` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let version: Value = serde_json::from_slice(&out.stdout)
        .context("`kubectl version --client -o json` printed no JSON")?;
    Ok(version["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or("(unknown version)")
        .to_owned())
}

fn render(dir: &Path) -> Result<String> {
    if !dir.join("kustomization.yaml").is_file() {
        bail!("{} holds no kustomization.yaml", dir.display());
    }
    xtask::cmd::output(Command::new("kubectl").arg("kustomize").arg(dir))
}

/// The objects of a multi-document YAML stream, in order.
fn parse(yaml: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(doc)
            .with_context(|| format!("rendered document {} is no YAML object", i + 1))?;
        if value.is_null() {
            continue;
        }
        objects.push(Object::new(value).with_context(|| format!("rendered document {}", i + 1))?);
    }
    Ok(objects)
}

/// The verdict on every pod template: a line for each admitted one, a problem for each refusal.
#[derive(Debug, Default)]
struct Admission {
    admitted: Vec<String>,
    refused: Vec<String>,
}

fn admit(objects: &[Object]) -> Result<Admission> {
    let levels = namespace_levels(objects)?;
    let mut verdict = Admission::default();
    for object in objects {
        let Some(pod) = object.pod()? else { continue };
        // kubectl puts a namespaced object without one in the context's namespace, usually this.
        let ns = object.namespace.as_deref().unwrap_or("default");
        let (level, why) = match levels.get(ns) {
            Some(Some(level)) => (*level, format!("namespace {ns} enforces {level}")),
            Some(None) => (
                CLUSTER_DEFAULT,
                format!("namespace {ns} has no {ENFORCE_LABEL} label: the cluster default, taken as {CLUSTER_DEFAULT}"),
            ),
            None => (
                CLUSTER_DEFAULT,
                format!("namespace {ns} is not in the manifests: its level is unknown, taken as {CLUSTER_DEFAULT}"),
            ),
        };
        let violations = pss::check(level, &pod);
        if !violations.is_empty() {
            let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
            verdict.refused.push(format!(
                "pods of {} would be refused: violates PodSecurity \"{level}:latest\": {} ({why})",
                object.describe(),
                list.join(", ")
            ));
        }
        let rules = apiserver::check(&pod);
        for rule in &rules {
            verdict.refused.push(format!(
                "{} is invalid: {}.{rule}",
                object.describe(),
                pod_spec_path(&object.kind)
            ));
        }
        if violations.is_empty() && rules.is_empty() {
            let containers = pod.spec.all_containers().count();
            verdict.admitted.push(format!(
                "pods of {} admitted at PodSecurity \"{level}:latest\" ({why}); {containers} \
                 containers pass the API server's mount, escalation and probe rules",
                object.describe()
            ));
        }
    }
    if verdict.admitted.is_empty() && verdict.refused.is_empty() {
        bail!("no pod template among the rendered objects: nothing was checked for admission");
    }
    Ok(verdict)
}

/// Each namespace in the manifests and the level it enforces (`None`: no label).
fn namespace_levels(objects: &[Object]) -> Result<BTreeMap<String, Option<Level>>> {
    let mut levels = BTreeMap::new();
    for ns in objects
        .iter()
        .filter(|o| o.api_version == "v1" && o.kind == "Namespace")
    {
        let label = ns.raw["metadata"]["labels"][ENFORCE_LABEL].as_str();
        let level = label
            .map(str::parse::<Level>)
            .transpose()
            .with_context(|| format!("Namespace {}: label {ENFORCE_LABEL}", ns.name))?;
        levels.insert(ns.name.clone(), level);
    }
    Ok(levels)
}

/// Where the pod spec sits in `kind`, as the API server names fields in its errors.
fn pod_spec_path(kind: &str) -> &'static str {
    match kind {
        "Pod" => "spec",
        "PodTemplate" => "template.spec",
        "CronJob" => "spec.jobTemplate.spec.template.spec",
        _ => "spec.template.spec",
    }
}

/// The default kustomization: deploy/ in the workspace.
pub fn default_dir() -> PathBuf {
    xtask::workspace_root().join("deploy")
}

#[cfg(test)]
mod tests;
