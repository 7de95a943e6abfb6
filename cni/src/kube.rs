//! The plugin's own look at the API server, for the one decision the agent's node state cannot
//! make while the agent is down: a pod it has never seen, whose `istio.io/dataplane-mode` label
//! may enrol it in a namespace that is not ambient. Istio's plugin asks the API server for every
//! pod, with a kubeconfig its installer writes on the node; ambit's plugin asks only then, with
//! the credentials the agent writes into its run dir ([`KUBE_ACCESS_NAME`], mode 0600, the agent's
//! ServiceAccount token and the cluster's CA).
//!
//! Both requests are `list` calls narrowed by a field selector, the verbs the agent's role
//! already has (`list` on Pods and Namespaces), so the plugin needs no extra RBAC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::enrolment::{Enrolment, DATAPLANE_MODE_LABEL, SIDECAR_STATUS_ANNOTATION};
use crate::proto::PodName;

/// The credentials file in the agent's run dir.
pub const KUBE_ACCESS_NAME: &str = "cni-kube.json";
/// A list answer larger than this is refused.
const MAX_BODY: u64 = 4 << 20;

/// The credentials file in `run_dir`.
pub fn kube_access_path(run_dir: &Path) -> PathBuf {
    run_dir.join(KUBE_ACCESS_NAME)
}

/// How the plugin reaches the API server (what the agent writes).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeAccess {
    /// `https://host:port`.
    pub server: String,
    /// A bearer token.
    pub token: String,
    /// The PEM certificates the API server's certificate must chain to.
    pub ca_cert: String,
}

impl std::fmt::Debug for KubeAccess {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAccess")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("{path}: {why}")]
    Access { path: PathBuf, why: String },
    #[error("API server {server}: {why}")]
    Request { server: String, why: String },
    #[error("API server {server}: {what}: HTTP {status}")]
    Status {
        server: String,
        what: String,
        status: u16,
    },
    #[error("API server {server}: {what}: {why}")]
    Answer {
        server: String,
        what: String,
        why: String,
    },
    #[error("{what} not found in the API server")]
    NotFound { what: String },
    #[error("CNI_ARGS {field}={value:?} is not a Kubernetes object name")]
    BadName { field: &'static str, value: String },
    #[error(
        "pod {namespace}/{name}: the API server has uid {found}, the runtime starts uid {wanted}"
    )]
    OtherPod {
        namespace: String,
        name: String,
        found: String,
        wanted: String,
    },
}

/// Reads the credentials file; `Ok(None)` when there is none (local mode, or an agent that was
/// never in a cluster).
pub fn read_access(run_dir: &Path) -> Result<Option<KubeAccess>, KubeError> {
    let path = kube_access_path(run_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(KubeError::Access {
                path,
                why: e.to_string(),
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| KubeError::Access {
            path,
            why: format!("not valid: {e}"),
        })
}

/// What the API server says about a pod and its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace_labels: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub host_network: bool,
}

impl PodFacts {
    /// Istio's rule ([`Enrolment::meshed`]) on these facts.
    pub fn meshed(&self) -> bool {
        Enrolment {
            namespace_mode: self
                .namespace_labels
                .get(DATAPLANE_MODE_LABEL)
                .map(String::as_str),
            pod_mode: self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str),
            has_sidecar: self.annotations.contains_key(SIDECAR_STATUS_ANNOTATION),
            host_network: self.host_network,
        }
        .meshed()
    }
}

/// Looks the pod and its namespace up, each request bounded by `timeout`.
pub fn lookup(
    access: &KubeAccess,
    pod: &PodName,
    timeout: Duration,
) -> Result<PodFacts, KubeError> {
    check_name("K8S_POD_NAMESPACE", &pod.namespace)?;
    check_name("K8S_POD_NAME", &pod.name)?;
    let client = Client::new(access, timeout)?;
    let found = client.list(
        &format!("/api/v1/namespaces/{}/pods", encode(&pod.namespace)),
        &pod.name,
        &format!("pod {}/{}", pod.namespace, pod.name),
    )?;
    let uid = found
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(wanted) = &pod.uid {
        if !uid.is_empty() && uid != wanted {
            return Err(KubeError::OtherPod {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                found: uid.to_string(),
                wanted: wanted.clone(),
            });
        }
    }
    let ns = client.list(
        "/api/v1/namespaces",
        &pod.namespace,
        &format!("namespace {}", pod.namespace),
    )?;
    Ok(PodFacts {
        namespace_labels: string_map(ns.pointer("/metadata/labels")),
        labels: string_map(found.pointer("/metadata/labels")),
        annotations: string_map(found.pointer("/metadata/annotations")),
        host_network: found
            .pointer("/spec/hostNetwork")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

fn string_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

struct Client<'a> {
    access: &'a KubeAccess,
    agent: ureq::Agent,
}

impl<'a> Client<'a> {
    fn new(access: &'a KubeAccess, timeout: Duration) -> Result<Self, KubeError> {
        use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
        let bad = |why: String| KubeError::Request {
            server: access.server.clone(),
            why,
        };
        let roots: Vec<Certificate<'static>> = ureq::tls::parse_pem(access.ca_cert.as_bytes())
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("the CA certificate is not valid PEM: {e}")))?;
        if roots.is_empty() {
            return Err(bad("no CA certificate to verify it with".into()));
        }
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&roots))
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            // The node's proxy variables are not for the API server (as client-go's in-cluster
            // config, which dials KUBERNETES_SERVICE_HOST directly).
            .proxy(None)
            // The API server answers a list itself; a redirect would send the request (if not
            // the token, which ureq drops on redirects) elsewhere.
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        Ok(Client { access, agent })
    }

    /// The one object named `name` in the list at `path`.
    fn list(&self, path: &str, name: &str, what: &str) -> Result<Value, KubeError> {
        let server = || self.access.server.clone();
        let url = format!(
            "{}{path}?fieldSelector=metadata.name%3D{}",
            self.access.server.trim_end_matches('/'),
            encode(name)
        );
        let mut resp = self
            .agent
            .get(&url)
            .header("Authorization", &format!("Bearer {}", self.access.token))
            .header("Accept", "application/json")
            .call()
            .map_err(|e| KubeError::Request {
                server: server(),
                why: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(KubeError::Status {
                server: server(),
                what: format!("listing {what}"),
                status,
            });
        }
        let answer = |why: String| KubeError::Answer {
            server: server(),
            what: format!("listing {what}"),
            why,
        };
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| answer(e.to_string()))?;
        let list: Value = serde_json::from_slice(&body).map_err(|e| answer(e.to_string()))?;
        let items = list
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| answer("no items list".into()))?;
        items
            .iter()
            .find(|i| i.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
            .cloned()
            .ok_or_else(|| KubeError::NotFound {
                what: what.to_string(),
            })
    }
}

/// A namespace (DNS label) or pod name (DNS subdomain) as Kubernetes allows them: the runtime's
/// arguments go into the request's path and query, so anything else (`..`, `/`, `&`, `,`) is
/// refused before any request is made (the pod is then held, as for any lookup that fails).
fn check_name(field: &'static str, value: &str) -> Result<(), KubeError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(KubeError::BadName {
            field,
            value: value.to_string(),
        })
    }
}

/// Percent-encodes a name for a query (Kubernetes names are DNS labels or subdomains, but the
/// runtime's arguments are not trusted).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
