//! Config sources. For now: a directory (or file) of ordinary Kubernetes YAML — Pods and
//! Namespaces — that decides which pods on this node are enrolled. The full Kubernetes/Istio model
//! replaces the minimal types here with the config-model issue.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::node::PodSpec;

/// Istio: a namespace with this label is in ambient mode; a pod with value `none` opts out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Local mode: the pod's network namespace path (a real cluster finds it under /proc instead).
pub const NETNS_ANNOTATION: &str = "ambit.dev/netns";
/// Istio's per-pod port exclusions (comma-separated ports).
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {source}")]
    Parse {
        path: PathBuf,
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{kind} {namespace}/{name}: field {field}: {message}")]
    Invalid {
        kind: &'static str,
        namespace: String,
        name: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpecYaml {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodIpYaml {
    ip: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatusYaml {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIpYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Object {
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<serde_yaml::Value>,
    #[serde(default)]
    status: Option<serde_yaml::Value>,
}

/// Pods and namespaces read from the files, plus what was wrong with them.
#[derive(Debug, Default)]
pub struct LocalObjects {
    pods: Vec<(ObjectMeta, PodSpecYaml, PodStatusYaml)>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub errors: Vec<ConfigError>,
}

/// YAML files under `path` (a file, or a directory read recursively), sorted for stable order.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.is_dir() {
            out.extend(yaml_files(&p)?);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

impl LocalObjects {
    /// Reads every YAML document under `path`. A bad document is recorded and skipped alone.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut objs = LocalObjects::default();
        for file in yaml_files(path)? {
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            objs.add_text(&file, &text);
        }
        Ok(objs)
    }

    pub fn add_text(&mut self, file: &Path, text: &str) {
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = match serde_yaml::Value::deserialize(doc) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(source) => {
                    // A syntax error ends the stream: serde_yaml cannot resynchronise after it.
                    self.errors.push(ConfigError::Parse {
                        path: file.to_path_buf(),
                        doc: i,
                        source,
                    });
                    break;
                }
            };
            if let Err(source) = self.add_value(value) {
                self.errors.push(ConfigError::Parse {
                    path: file.to_path_buf(),
                    doc: i,
                    source,
                });
            }
        }
    }

    fn add_value(&mut self, value: serde_yaml::Value) -> Result<(), serde_yaml::Error> {
        // Kubernetes `List` objects hold their items inline.
        if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    self.add_value(item)?;
                }
            }
            return Ok(());
        }
        let obj: Object = serde_yaml::from_value(value)?;
        match obj.kind.as_str() {
            "Namespace" => {
                self.namespaces
                    .insert(obj.metadata.name.clone(), obj.metadata.labels);
            }
            "Pod" => {
                let spec: PodSpecYaml = obj
                    .spec
                    .map(serde_yaml::from_value)
                    .transpose()?
                    .unwrap_or_default();
                let status: PodStatusYaml = obj
                    .status
                    .map(serde_yaml::from_value)
                    .transpose()?
                    .unwrap_or_default();
                self.pods.push((obj.metadata, spec, status));
            }
            other => tracing::debug!(kind = other, "ignoring object kind not used yet"),
        }
        Ok(())
    }

    /// The pods on `node` that should be captured, with the problems found on the way. A pod whose
    /// netns cannot be found is reported, not silently skipped.
    pub fn desired_pods(&self, node: &str) -> (Vec<PodSpec>, Vec<ConfigError>) {
        let mut pods = Vec::new();
        let mut errors = Vec::new();
        for (meta, spec, status) in &self.pods {
            let namespace = meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_string());
            let invalid = |field: &str, message: String| ConfigError::Invalid {
                kind: "Pod",
                namespace: namespace.clone(),
                name: meta.name.clone(),
                field: field.to_string(),
                message,
            };
            if spec.node_name.as_deref() != Some(node) || spec.host_network {
                continue;
            }
            let ns_ambient = self
                .namespaces
                .get(&namespace)
                .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|v| v == DATAPLANE_MODE_AMBIENT);
            let opted_out = meta
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == DATAPLANE_MODE_NONE);
            if !ns_ambient || opted_out {
                continue;
            }
            let mut ips = Vec::new();
            let listed = status
                .pod_ips
                .iter()
                .map(|p| ("status.podIPs", p.ip.as_str()));
            for (field, s) in status
                .pod_ip
                .iter()
                .map(|s| ("status.podIP", s.as_str()))
                .chain(listed)
            {
                match s.parse::<IpAddr>() {
                    Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                    Ok(_) => {}
                    Err(e) => {
                        errors.push(invalid(field, format!("{s:?} is not an IP address: {e}")))
                    }
                }
            }
            let mut ports = |annotation: &str| -> Vec<u16> {
                let Some(v) = meta.annotations.get(annotation) else {
                    return Vec::new();
                };
                let mut out = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match part.parse::<u16>() {
                        Ok(p) if p > 0 => out.push(p),
                        _ => errors.push(invalid(
                            &format!("metadata.annotations[{annotation}]"),
                            format!("{part:?} is not a port (1-65535); this exclusion is ignored"),
                        )),
                    }
                }
                out
            };
            let excluded_outbound_ports = ports(EXCLUDE_OUTBOUND_PORTS);
            let excluded_inbound_ports = ports(EXCLUDE_INBOUND_PORTS);
            if ips.is_empty() {
                // Not running yet: nothing to capture until it has an address.
                continue;
            }
            let netns_path = match meta.annotations.get(NETNS_ANNOTATION) {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from("/var/run/netns").join(&meta.name),
            };
            pods.push(PodSpec {
                namespace: namespace.clone(),
                name: meta.name.clone(),
                ips,
                netns_path,
                excluded_outbound_ports,
                excluded_inbound_ports,
            });
        }
        (pods, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
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
metadata: {name: a, namespace: mesh, annotations: {ambit.dev/netns: /run/netns/x, traffic.sidecar.istio.io/excludeOutboundPorts: "9000, 9001"}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00::a"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: other-node, namespace: mesh}
spec: {nodeName: n2}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: mesh}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: plain}
spec: {nodeName: n1}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: bad, namespace: mesh, annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "http"}}
spec: {nodeName: n1}
status: {podIP: 10.244.1.300}
"#;

    #[test]
    fn enrolment_follows_istio_rules() {
        let mut objs = LocalObjects::default();
        objs.add_text(Path::new("t.yaml"), YAML);
        assert!(objs.errors.is_empty(), "{:?}", objs.errors);
        let (pods, errors) = objs.desired_pods("n1");
        let names: Vec<_> = pods.iter().map(|p| p.key()).collect();
        assert_eq!(
            names,
            vec!["mesh/a"],
            "only the ambient, non-opted-out, non-hostNetwork pod on n1"
        );
        let a = &pods[0];
        assert_eq!(
            a.ips,
            vec![
                "10.244.1.10".parse::<IpAddr>().unwrap(),
                "fd00::a".parse().unwrap()
            ]
        );
        assert_eq!(a.netns_path, PathBuf::from("/run/netns/x"));
        assert_eq!(a.excluded_outbound_ports, vec![9000, 9001]);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("Pod mesh/bad") && m.contains("status.podIP")),
            "bad IP named with object and field: {messages:?}"
        );
        assert!(
            messages
                .iter()
                .any(|m| m.contains("Pod mesh/bad") && m.contains("excludeInboundPorts")),
            "bad port annotation named: {messages:?}"
        );
    }

    #[test]
    fn a_broken_document_does_not_hide_the_others() {
        let mut objs = LocalObjects::default();
        objs.add_text(Path::new("t.yaml"), "kind: [unclosed\n---\n");
        objs.add_text(Path::new("u.yaml"), YAML);
        assert_eq!(objs.errors.len(), 1, "{:?}", objs.errors);
        assert!(objs.errors[0].to_string().contains("t.yaml"));
        assert_eq!(objs.desired_pods("n1").0.len(), 1);
    }
}
