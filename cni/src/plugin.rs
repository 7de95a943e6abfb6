//! The plugin's commands. ADD asks the node agent and returns only after its answer: an ambient
//! pod is then enrolled (its listeners and capture entries exist), so the app's first connect is
//! captured. A pod the agent says is not meshed starts at once.
//!
//! Without an agent to ask (socket missing or refusing), the plugin decides itself, failing
//! closed ([`decide_offline`]): a pod of an `excludeNamespaces` namespace starts (the agent's own
//! and kube-system: after a node reboot the agent's pod goes through this chain too); a pod the
//! agent's node state file shows enrolled is held; any other pod is looked up in the API server
//! with the credentials the agent leaves (its own `istio.io/dataplane-mode` label may enrol it in
//! any namespace, and labels may have changed since the agent's last view, as Istio's plugin finds
//! by asking the API server); without those credentials (local mode) the node state decides. Any pod that
//! may be meshed fails ADD with "try again later" (code 11), which the kubelet retries, so no
//! meshed pod starts unmeshed; so does a pod the API server cannot answer for.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::kube;
use crate::proto::{self, Answer, NodeState, Offline, PodName, PodRequest, Request};
use crate::spec::{code, CniError, Command, Env, NetConf};

/// How long ADD waits for the agent unless the config says (`timeoutSeconds`): above the agent's
/// own bound for a pod its source has not seen yet.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long each API server request of an offline decision may take.
const KUBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one invocation: `Ok(Some(json))` is printed on stdout, `Ok(None)` prints nothing, an
/// error is printed as CNI's error object with a non-zero exit.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = env.command()?;
    if command == Command::Version {
        return Ok(Some(crate::spec::version_output(stdin)));
    }
    let conf = NetConf::parse(stdin).map_err(|e| match asked_version(stdin) {
        Some(v) => e.in_version(&v),
        None => e,
    })?;
    let version = conf.cni_version.clone();
    run_with(command, env, &conf).map_err(|e| e.in_version(&version))
}

fn run_with(command: Command, env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    env.require(command)?;
    let req = PodRequest {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        if_name: env.if_name.clone(),
        pod: pod_name(env),
        ips: conf.prev_ips()?,
    };
    let run_dir = conf
        .run_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_RUN_DIR));
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let agent = Agent {
        socket: proto::socket_path(&run_dir),
        timeout,
    };
    let who = req.describe();
    match command {
        Command::Add => {
            match agent.ask(&Request::Add(req.clone())) {
                Ok(Answer::Enrolled { .. } | Answer::NotAmbient { .. }) => {}
                Ok(Answer::Failed { message }) => {
                    return Err(CniError::new(
                        code::TRY_AGAIN_LATER,
                        "the ambit agent did not enrol the pod",
                        format!("{who}: {message}"),
                    ))
                }
                Ok(other) => return Err(unexpected(&who, &other)),
                Err(AskError::Unreachable(why)) => offline(conf, &run_dir, &req, &why)?,
                Err(AskError::Broken(why)) => {
                    return Err(CniError::new(
                        code::TRY_AGAIN_LATER,
                        "no answer from the ambit agent",
                        format!("{who}: {why}; the pod is held until the agent answers"),
                    ))
                }
            }
            Ok(Some(conf.result()))
        }
        Command::Check => match agent.ask(&Request::Check(req.clone())) {
            Ok(Answer::Enrolled { .. } | Answer::NotAmbient { .. }) => Ok(None),
            Ok(Answer::Failed { message }) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the pod is not enrolled as it should be",
                format!("{who}: {message}"),
            )),
            Ok(other) => Err(unexpected(&who, &other)),
            Err(AskError::Unreachable(why)) => offline(conf, &run_dir, &req, &why).map(|()| None),
            Err(AskError::Broken(why)) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "no answer from the ambit agent",
                format!("{who}: {why}"),
            )),
        },
        // DEL must not keep a sandbox from going away: without an agent there is nothing of the
        // pod to remove (a restarted agent does not enrol a pod whose sandbox is gone).
        Command::Del => match agent.ask(&Request::Del(req.clone())) {
            Ok(Answer::Failed { message }) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "the ambit agent could not unenrol the pod",
                format!("{who}: {message}"),
            )),
            Ok(_) => Ok(None),
            Err(AskError::Unreachable(why)) => {
                eprintln!("ambit-cni: DEL of {who}: {why}; nothing to undo");
                Ok(None)
            }
            Err(AskError::Broken(why)) => Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "no answer from the ambit agent",
                format!("{who}: {why}"),
            )),
        },
        Command::Version => Ok(Some(crate::spec::version_output(b""))),
        // Ready whether or not the agent is up: without it ADD still decides, holding the pods
        // that may be meshed (a failing STATUS would hold every pod of the node instead).
        Command::Status => Ok(None),
        // Nothing of a pod outlives its DEL in the plugin; the agent keeps its own state.
        Command::Gc => Ok(None),
    }
}

/// The config's `cniVersion` when the rest of it is unusable, for the error's version.
fn asked_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    let v = v.get("cniVersion")?.as_str()?;
    crate::spec::SUPPORTED_VERSIONS
        .contains(&v)
        .then(|| v.to_string())
}

/// The pod as the CRI plugin names it in `CNI_ARGS`.
fn pod_name(env: &Env) -> Option<PodName> {
    let get = |k: &str| env.args.get(k).filter(|v| !v.is_empty()).cloned();
    Some(PodName {
        namespace: get("K8S_POD_NAMESPACE")?,
        name: get("K8S_POD_NAME")?,
        uid: get("K8S_POD_UID"),
    })
}

/// The decision without the agent: Ok if the pod is known not to be meshed.
fn offline(
    conf: &NetConf,
    run_dir: &Path,
    req: &PodRequest,
    unreachable: &str,
) -> Result<(), CniError> {
    let who = req.describe();
    let decision = decide_offline(conf, run_dir, req);
    match decision {
        Offline::NotAmbient(why) => {
            eprintln!("ambit-cni: {who}: {unreachable}; {why}: starting it unmeshed");
            Ok(())
        }
        Offline::Ambient(why) | Offline::Unknown(why) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the ambit node agent is unreachable",
            format!(
                "{who}: {unreachable}; {why}; a pod that may be meshed does not start without \
                 the agent (the runtime retries)"
            ),
        )),
    }
}

/// In order: an excluded namespace starts; a pod the agent last saw enrolled is held; any other
/// pod is looked up in the API server when the agent left credentials (its own label may enrol
/// it, and its namespace may have been labelled since the agent's last view); without credentials
/// (local mode) the agent's last view decides. A pod the agent last saw not meshed keeps that
/// decision when the API server cannot answer (it was right when the agent went down); any other
/// pod is then held.
fn decide_offline(conf: &NetConf, run_dir: &Path, req: &PodRequest) -> Offline {
    if let Some(pod) = &req.pod {
        if conf.exclude_namespaces.contains(&pod.namespace) {
            return Offline::NotAmbient(format!(
                "namespace {} is in excludeNamespaces",
                pod.namespace
            ));
        }
    }
    let path = proto::node_state_path(run_dir);
    let state = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<NodeState>(&bytes) {
            Ok(state) => Some(state),
            Err(e) => return Offline::Unknown(format!("{} is unreadable: {e}", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Offline::Unknown(format!("{} is unreadable: {e}", path.display())),
    };
    let known = state
        .as_ref()
        .and_then(|s| s.decide_known(req.pod.as_ref(), &req.ips));
    if let Some(ambient @ Offline::Ambient(_)) = known {
        return ambient;
    }
    let access = match kube::read_access(run_dir) {
        Ok(access) => access,
        Err(e) => return Offline::Unknown(e.to_string()),
    };
    match (access, &req.pod) {
        (Some(access), Some(pod)) => match kube::lookup(&access, pod, KUBE_TIMEOUT) {
            Ok(facts) if facts.meshed() => Offline::Ambient(format!(
                "the API server shows pod {}/{} in the ambient mesh",
                pod.namespace, pod.name
            )),
            Ok(_) => Offline::NotAmbient(format!(
                "the API server shows pod {}/{} outside the ambient mesh",
                pod.namespace, pod.name
            )),
            Err(e) => match known {
                Some(Offline::NotAmbient(why)) => Offline::NotAmbient(format!(
                    "{why} in the agent's last view (the API server cannot confirm it: {e})"
                )),
                _ => Offline::Unknown(format!("cannot look the pod up: {e}")),
            },
        },
        _ => match (known, state) {
            (Some(known), _) => known,
            (None, Some(state)) => state.decide(req.pod.as_ref(), &req.ips),
            (None, None) => Offline::Unknown(format!("no node state at {}", path.display())),
        },
    }
}

fn unexpected(who: &str, answer: &Answer) -> CniError {
    CniError::new(
        code::IO_FAILURE,
        "unexpected answer from the ambit agent",
        format!("{who}: {answer:?}"),
    )
}

/// Why the agent gave no answer.
enum AskError {
    /// Nobody listens: the agent is not running.
    Unreachable(String),
    /// Connected, then no (valid) answer in time.
    Broken(String),
}

struct Agent {
    socket: PathBuf,
    timeout: Duration,
}

impl Agent {
    fn ask(&self, req: &Request) -> Result<Answer, AskError> {
        let sock = self.socket.display();
        let stream = UnixStream::connect(&self.socket).map_err(|e| {
            AskError::Unreachable(format!("cannot reach the ambit agent at {sock}: {e}"))
        })?;
        let broken = |what: String| AskError::Broken(format!("agent at {sock}: {what}"));
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| broken(e.to_string()))?;
        proto::write_line(&stream, req).map_err(|e| broken(e.to_string()))?;
        proto::read_line(BufReader::new(&stream)).map_err(|e| match e {
            proto::ProtoError::Read(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                broken(format!("no answer within {:?}", self.timeout))
            }
            e => broken(e.to_string()),
        })
    }
}

#[cfg(test)]
mod tests;
