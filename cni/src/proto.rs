//! What the plugin and the node agent say to each other over the agent's Unix socket (one JSON
//! request line, one JSON answer line), and the node state file the agent keeps for the moments
//! it cannot answer.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the agent serves the plugin and keeps its node state, unless the plugin's config
/// (`runDir`) and the agent's `--cni-dir` say otherwise.
pub const DEFAULT_RUN_DIR: &str = "/var/run/ambit";
/// The agent's socket, in the run dir.
pub const SOCKET_NAME: &str = "cni.sock";
/// The agent's node state file, in the run dir.
pub const NODE_STATE_NAME: &str = "cni-node.json";
/// A request or answer line longer than this is refused (no unbounded reads on either side).
pub const MAX_LINE: u64 = 64 * 1024;

/// The socket in `run_dir`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET_NAME)
}

/// The node state file in `run_dir`.
pub fn node_state_path(run_dir: &Path) -> PathBuf {
    run_dir.join(NODE_STATE_NAME)
}

#[derive(Debug, Error)]
pub enum ProtoError {
    #[error("reading: {0}")]
    Read(#[source] std::io::Error),
    #[error("writing: {0}")]
    Write(#[source] std::io::Error),
    #[error("the peer closed the connection without a line")]
    Closed,
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("bad JSON: {0}")]
    Json(#[source] serde_json::Error),
}

/// A pod as the runtime names it (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` in
/// `CNI_ARGS`, as the CRI plugin passes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodName {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod sandbox as a CNI invocation describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRequest {
    /// `CNI_CONTAINERID`: DEL is matched to its ADD by it.
    pub container_id: String,
    /// `CNI_NETNS`; empty on a DEL whose netns is gone.
    pub netns: String,
    pub if_name: String,
    /// None when the runtime passes no pod identity (`ctr run --cni`): the agent finds the pod by
    /// its IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodName>,
    /// The sandbox's addresses from the previous plugins' result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl PodRequest {
    /// How messages name this pod: `namespace/name`, else its IPs, else the container id.
    pub fn describe(&self) -> String {
        match (&self.pod, self.ips.as_slice()) {
            (Some(p), _) => format!("pod {p}"),
            (None, []) => format!("container {}", self.container_id),
            (None, ips) => format!(
                "the pod with IP {}",
                ips.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// Enrol the pod if it is ambient; answer once its listeners and capture entries exist.
    Add(PodRequest),
    /// Unenrol it; answer once its listeners and capture entries are gone.
    Del(PodRequest),
    /// Is it enrolled as it should be?
    Check(PodRequest),
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "camelCase")]
pub enum Answer {
    /// The pod is enrolled: its first packet is captured.
    Enrolled { pod: String },
    /// The pod is not in the mesh (namespace not ambient, opted out, host network): start it.
    NotAmbient { pod: String, reason: String },
    /// DEL done (also for a pod the agent never enrolled).
    Removed { pod: Option<String> },
    /// The pod must not start now; `message` says why.
    Failed { message: String },
}

/// Writes `value` as one JSON line.
pub fn write_line<T: Serialize>(mut to: impl Write, value: &T) -> Result<(), ProtoError> {
    let mut line = serde_json::to_vec(value).map_err(ProtoError::Json)?;
    line.push(b'\n');
    to.write_all(&line).map_err(ProtoError::Write)?;
    to.flush().map_err(ProtoError::Write)
}

/// Reads one JSON line of at most [`MAX_LINE`] bytes.
pub fn read_line<T: for<'de> Deserialize<'de>>(from: impl BufRead) -> Result<T, ProtoError> {
    let mut line = Vec::new();
    let n = std::io::Read::take(from, MAX_LINE + 1)
        .read_until(b'\n', &mut line)
        .map_err(ProtoError::Read)?;
    if n == 0 {
        return Err(ProtoError::Closed);
    }
    if n as u64 > MAX_LINE {
        return Err(ProtoError::TooLong);
    }
    serde_json::from_slice(&line).map_err(ProtoError::Json)
}

/// The agent's view of this node for the plugin, written (temp file + rename) whenever it
/// changes, so the plugin can tell a non-ambient pod from an ambient one while the agent is down.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub node: String,
    /// Every namespace the agent knows, and whether it is labelled ambient.
    pub namespaces: BTreeMap<String, bool>,
    /// The pods scheduled on this node.
    pub pods: Vec<NodePod>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Whether the agent enrols it (ambient namespace, not opted out, not host network).
    pub ambient: bool,
}

/// The plugin's decision without the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offline {
    /// Known not to be meshed: the pod may start.
    NotAmbient(String),
    /// Known to be meshed: it must wait for the agent.
    Ambient(String),
    /// Not known: fail closed, it waits for the agent.
    Unknown(String),
}

impl NodeState {
    /// Whether the pod is meshed, from this (possibly stale) view: its own entry (by name, else by
    /// IP), else its namespace's label. Anything else is unknown.
    pub fn decide(&self, pod: Option<&PodName>, ips: &[IpAddr]) -> Offline {
        if let Some(known) = self.decide_known(pod, ips) {
            return known;
        }
        let Some(pod) = pod else {
            return Offline::Unknown(
                "the runtime passed no pod name (K8S_POD_NAMESPACE/K8S_POD_NAME) and no pod \
                 known to the agent has its IP"
                    .into(),
            );
        };
        match self.namespaces.get(&pod.namespace) {
            Some(true) => Offline::Ambient(format!("namespace {} is ambient", pod.namespace)),
            Some(false) => {
                Offline::NotAmbient(format!("namespace {} is not ambient", pod.namespace))
            }
            None => Offline::Unknown(format!(
                "namespace {} is not known to the agent",
                pod.namespace
            )),
        }
    }

    /// The agent's decision for a pod it has seen (by name, else by IP); None for any other.
    pub fn decide_known(&self, pod: Option<&PodName>, ips: &[IpAddr]) -> Option<Offline> {
        let entry = self.pods.iter().find(|p| match pod {
            Some(want) => {
                p.namespace == want.namespace
                    && p.name == want.name
                    && want
                        .uid
                        .as_ref()
                        .is_none_or(|u| p.uid.is_empty() || *u == p.uid)
            }
            None => p.ips.iter().any(|ip| ips.contains(ip)),
        });
        let p = entry?;
        let name = format!("pod {}/{}", p.namespace, p.name);
        Some(if p.ambient {
            Offline::Ambient(format!("{name} is enrolled in the mesh"))
        } else {
            Offline::NotAmbient(format!("{name} is not in the mesh"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NodeState {
        NodeState {
            node: "n1".into(),
            namespaces: [("mesh".to_string(), true), ("plain".to_string(), false)].into(),
            pods: vec![
                NodePod {
                    namespace: "mesh".into(),
                    name: "optout".into(),
                    uid: "u1".into(),
                    ips: vec!["10.0.0.5".parse().unwrap()],
                    ambient: false,
                },
                NodePod {
                    namespace: "mesh".into(),
                    name: "web".into(),
                    uid: "u2".into(),
                    ips: vec!["10.0.0.6".parse().unwrap()],
                    ambient: true,
                },
            ],
        }
    }

    fn pod(ns: &str, name: &str) -> PodName {
        PodName {
            namespace: ns.into(),
            name: name.into(),
            uid: None,
        }
    }

    #[test]
    fn offline_decision_uses_the_pod_then_its_namespace_and_fails_closed_otherwise() {
        let s = state();
        let ip = |a: &str| vec![a.parse::<IpAddr>().unwrap()];
        assert!(matches!(
            s.decide(Some(&pod("mesh", "optout")), &[]),
            Offline::NotAmbient(_)
        ));
        assert!(matches!(
            s.decide(Some(&pod("mesh", "new")), &[]),
            Offline::Ambient(_)
        ));
        assert!(matches!(
            s.decide(Some(&pod("plain", "x")), &[]),
            Offline::NotAmbient(_)
        ));
        assert!(matches!(
            s.decide(Some(&pod("unseen", "x")), &[]),
            Offline::Unknown(m) if m.contains("unseen")
        ));
        // No name: by IP only.
        assert!(matches!(
            s.decide(None, &ip("10.0.0.6")),
            Offline::Ambient(_)
        ));
        assert!(matches!(
            s.decide(None, &ip("10.0.0.5")),
            Offline::NotAmbient(_)
        ));
        assert!(matches!(
            s.decide(None, &ip("10.0.0.9")),
            Offline::Unknown(_)
        ));
        // A pod of the same name but another UID is a new pod: its namespace decides.
        let mut other = pod("mesh", "optout");
        other.uid = Some("u9".into());
        assert!(matches!(s.decide(Some(&other), &[]), Offline::Ambient(_)));
    }

    #[test]
    fn lines_round_trip_and_overlong_lines_are_refused() {
        let req = Request::Add(PodRequest {
            container_id: "c".into(),
            netns: "/proc/1/ns/net".into(),
            if_name: "eth0".into(),
            pod: Some(pod("a", "b")),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        let mut buf = Vec::new();
        write_line(&mut buf, &req).unwrap();
        assert_eq!(read_line::<Request>(&buf[..]).unwrap(), req);
        let long = vec![b' '; MAX_LINE as usize + 10];
        assert!(matches!(
            read_line::<Request>(&long[..]),
            Err(ProtoError::TooLong)
        ));
        assert!(matches!(
            read_line::<Request>(&b""[..]),
            Err(ProtoError::Closed)
        ));
    }
}
