//! The pod templates inside rendered objects, and the parts of a pod that admission reads. Fields
//! are named as the Kubernetes API names them; unknown ones are ignored here because the schema
//! check refuses them.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::Value;

/// One rendered object: enough to name it in messages and to find its pod template.
#[derive(Debug)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub raw: Value,
}

impl Object {
    /// Reads the identifying fields; an object without them is no Kubernetes object.
    pub fn new(raw: Value) -> Result<Self> {
        let field = |path: &[&str]| {
            path.iter()
                .try_fold(&raw, |v, key| v.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let api_version = field(&["apiVersion"]).context("object without apiVersion")?;
        let kind = field(&["kind"]).context("object without kind")?;
        let name = field(&["metadata", "name"])
            .with_context(|| format!("{kind} without metadata.name"))?;
        let namespace = field(&["metadata", "namespace"]);
        Ok(Self {
            api_version,
            kind,
            namespace,
            name,
            raw,
        })
    }

    /// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    /// The pod template of a workload (or the pod itself), read into [`Pod`].
    pub fn pod(&self) -> Result<Option<Pod>> {
        let Some(path) = template_path(&self.api_version, &self.kind) else {
            return Ok(None);
        };
        let template = path
            .iter()
            .try_fold(&self.raw, |v, key| v.get(key))
            .with_context(|| format!("{} has no {}", self.describe(), path.join(".")))?;
        let pod = Pod::deserialize(template)
            .with_context(|| format!("{}: cannot read its pod template", self.describe()))?;
        Ok(Some(pod))
    }
}

/// Where each built-in kind that makes pods keeps its pod template (`[]`: the object is a pod).
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(&[]),
        ("v1", "PodTemplate") => Some(&["template"]),
        ("v1", "ReplicationController")
        | ("apps/v1", "DaemonSet" | "Deployment" | "ReplicaSet" | "StatefulSet")
        | ("batch/v1", "Job") => Some(&["spec", "template"]),
        ("batch/v1", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub metadata: PodMeta,
    pub spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodMeta {
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub host_network: Option<bool>,
    #[serde(rename = "hostPID")]
    pub host_pid: Option<bool>,
    #[serde(rename = "hostIPC")]
    pub host_ipc: Option<bool>,
    pub host_users: Option<bool>,
    pub os: Option<PodOs>,
    pub security_context: Option<PodSecurityContext>,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    pub ephemeral_containers: Vec<Container>,
    pub volumes: Vec<Volume>,
}

impl PodSpec {
    /// Every container with the field path it sits at, as admission visits them.
    pub fn all_containers(&self) -> impl Iterator<Item = (String, &Container)> {
        indexed("initContainers", &self.init_containers)
            .chain(indexed("containers", &self.containers))
            .chain(indexed("ephemeralContainers", &self.ephemeral_containers))
    }

    pub fn security(&self) -> Option<&PodSecurityContext> {
        self.security_context.as_ref()
    }

    /// `spec.os.name: windows`: the restricted level relaxes its Linux-only checks for these.
    pub fn is_windows(&self) -> bool {
        self.os.as_ref().is_some_and(|os| os.name == "windows")
    }

    /// `hostUsers: false`: the pod runs in a user namespace, where root is not the host's root.
    pub fn in_user_namespace(&self) -> bool {
        self.host_users == Some(false)
    }
}

fn indexed<'a>(
    field: &'static str,
    list: &'a [Container],
) -> impl Iterator<Item = (String, &'a Container)> {
    list.iter()
        .enumerate()
        .map(move |(i, c)| (format!("{field}[{i}]"), c))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodOs {
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSecurityContext {
    pub run_as_non_root: Option<bool>,
    pub run_as_user: Option<i64>,
    pub se_linux_options: Option<SeLinuxOptions>,
    pub seccomp_profile: Option<Profile>,
    pub app_armor_profile: Option<Profile>,
    pub sysctls: Vec<Sysctl>,
    pub windows_options: Option<WindowsOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub ports: Vec<ContainerPort>,
    pub security_context: Option<SecurityContext>,
    pub liveness_probe: Option<Handler>,
    pub readiness_probe: Option<Handler>,
    pub startup_probe: Option<Handler>,
    pub lifecycle: Option<Lifecycle>,
    pub volume_mounts: Vec<VolumeMount>,
}

impl Container {
    pub fn security(&self) -> Option<&SecurityContext> {
        self.security_context.as_ref()
    }

    pub fn privileged(&self) -> bool {
        self.security().and_then(|s| s.privileged) == Some(true)
    }

    /// The probes, then the lifecycle hooks, with their field names.
    pub fn handlers(&self) -> impl Iterator<Item = (&'static str, &Handler)> {
        let hooks = self.lifecycle.as_ref();
        [
            ("livenessProbe", self.liveness_probe.as_ref()),
            ("readinessProbe", self.readiness_probe.as_ref()),
            ("startupProbe", self.startup_probe.as_ref()),
            (
                "lifecycle.postStart",
                hooks.and_then(|l| l.post_start.as_ref()),
            ),
            ("lifecycle.preStop", hooks.and_then(|l| l.pre_stop.as_ref())),
        ]
        .into_iter()
        .filter_map(|(field, h)| h.map(|h| (field, h)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: i64,
    pub host_port: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SecurityContext {
    pub privileged: Option<bool>,
    pub allow_privilege_escalation: Option<bool>,
    pub run_as_non_root: Option<bool>,
    pub run_as_user: Option<i64>,
    pub capabilities: Option<Capabilities>,
    pub se_linux_options: Option<SeLinuxOptions>,
    pub seccomp_profile: Option<Profile>,
    pub app_armor_profile: Option<Profile>,
    pub proc_mount: Option<String>,
    pub windows_options: Option<WindowsOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    pub add: Vec<String>,
    pub drop: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SeLinuxOptions {
    pub user: String,
    pub role: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// A seccomp or AppArmor profile: both have a `type` (and a `localhostProfile` not read here).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Profile {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sysctl {
    pub name: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WindowsOptions {
    pub host_process: Option<bool>,
}

/// A probe or lifecycle hook; only the parts with a `host` and a port matter here.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Handler {
    pub http_get: Option<Endpoint>,
    pub tcp_socket: Option<Endpoint>,
    pub grpc: Option<Value>,
}

impl Handler {
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.http_get.iter().chain(self.tcp_socket.iter())
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Endpoint {
    pub host: Option<String>,
    /// A number or the name of one of the container's ports.
    pub port: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Lifecycle {
    pub post_start: Option<Handler>,
    pub pre_stop: Option<Handler>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    pub mount_propagation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Volume {
    pub name: String,
    /// The one volume source (`hostPath: {...}`, `secret: {...}`, ...), keyed by its field name.
    #[serde(flatten)]
    pub source: BTreeMap<String, Value>,
}

impl Volume {
    /// The source's field name. A volume that names none is an emptyDir: the API server defaults
    /// it so.
    pub fn kind(&self) -> &str {
        self.source.keys().next().map_or("emptyDir", String::as_str)
    }
}
