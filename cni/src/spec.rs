//! The CNI specification's side (spec 1.0.0 and 0.4.0; 0.3.x results read the same; 1.1.0's
//! STATUS and GC are answered): the
//! environment a runtime sets, the network config on stdin, the error object, and the addresses
//! in a previous plugin's result.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// The versions this plugin speaks (VERSION's answer). 0.3.x results have the same `ips` and
/// `interfaces` as 0.4.0.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI's well-known error codes (spec "Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    /// "Try again later": the runtime (kubelet) retries the pod's sandbox.
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// A failure as CNI reports it: this JSON on stdout, and a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize)]
#[error("{msg}: {details}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.0.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Reports it in the version the config asked for.
    pub fn in_version(mut self, version: &str) -> Self {
        if !version.is_empty() {
            self.cni_version = version.into();
        }
        self
    }
}

/// The operation (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// 1.1.0: is the plugin ready for ADDs?
    Status,
    /// 1.1.0: release what belongs to no attachment the runtime still has.
    Gc,
}

/// The runtime's environment variables (spec "Parameters").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: String,
    pub netns: String,
    pub if_name: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

impl Env {
    /// From `(name, value)` pairs (the process environment, or a test's).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> Self {
        let mut env = Env::default();
        for (k, v) in vars {
            match k.as_str() {
                "CNI_COMMAND" => env.command = Some(v),
                "CNI_CONTAINERID" => env.container_id = v,
                "CNI_NETNS" => env.netns = v,
                "CNI_IFNAME" => env.if_name = v,
                "CNI_ARGS" => env.args = parse_args(&v),
                _ => {}
            }
        }
        env
    }

    pub fn command(&self) -> Result<Command, CniError> {
        match self.command.as_deref() {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("VERSION") => Ok(Command::Version),
            Some("STATUS") => Ok(Command::Status),
            Some("GC") => Ok(Command::Gc),
            Some(other) => Err(CniError::new(
                code::INVALID_ENV,
                "unsupported CNI_COMMAND",
                format!(
                    "CNI_COMMAND={other:?}: ambit-cni supports ADD, DEL, CHECK, VERSION, \
                     STATUS and GC (spec {})",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )),
            None => Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "ambit-cni is a CNI plugin: a container runtime executes it with CNI_COMMAND set",
            )),
        }
    }

    /// Checks the variables `command` requires (CNI_NETNS may be empty on DEL).
    pub fn require(&self, command: Command) -> Result<(), CniError> {
        let mut missing = Vec::new();
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            if self.container_id.is_empty() {
                missing.push("CNI_CONTAINERID");
            }
            if self.if_name.is_empty() {
                missing.push("CNI_IFNAME");
            }
            if command != Command::Del && self.netns.is_empty() {
                missing.push("CNI_NETNS");
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(CniError::new(
            code::INVALID_ENV,
            "missing CNI environment variables",
            format!("{} must be set for this command", missing.join(", ")),
        ))
    }
}

/// `CNI_ARGS`: `K=V;K=V`; pairs without `=` are ignored.
pub fn parse_args(raw: &str) -> BTreeMap<String, String> {
    raw.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// ambit-cni's network config (its entry in the conflist, with what the runtime inserts).
/// Unknown fields are ignored, as a chained plugin sees the list's other settings too.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The agent's run dir: its socket and node state file (default `/var/run/ambit`).
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Namespaces whose pods start while the agent is down without a decision (the agent's own,
    /// and kube-system, as istio-cni's `excludeNamespaces`): the agent itself, and what it needs
    /// to start, never waits for the agent. With the agent up, the agent decides for them too.
    #[serde(default)]
    pub exclude_namespaces: Vec<String>,
    /// How long ADD waits for the agent's answer, in seconds (default 30).
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    /// The previous plugins' result (set by the runtime in a chain).
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    /// Parses stdin; names what is wrong.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                "cannot decode the network config on stdin",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                "incompatible CNI version",
                format!(
                    "network {:?}: cniVersion {:?}; ambit-cni supports {}",
                    conf.name,
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.timeout_seconds == Some(0) {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "invalid ambit-cni config",
                format!("network {:?}: timeoutSeconds must be at least 1", conf.name),
            ));
        }
        Ok(conf)
    }

    /// The sandbox's addresses in `prevResult`: each `ips[].address` (CIDR) whose `interface`
    /// is absent or names an interface inside the sandbox.
    pub fn prev_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let bad = |what: String| {
            CniError::new(
                code::INVALID_CONFIG,
                "invalid prevResult",
                format!("network {:?}: {what}", self.name),
            )
        };
        let interfaces = prev
            .get("interfaces")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let in_sandbox = |i: usize| {
            interfaces
                .get(i)
                .and_then(|itf| itf.get("sandbox"))
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        };
        let mut out = Vec::new();
        let ips = match prev.get("ips") {
            None | Some(Value::Null) => return Ok(out),
            Some(Value::Array(ips)) => ips,
            Some(_) => return Err(bad("prevResult.ips is not a list".into())),
        };
        for (n, entry) in ips.iter().enumerate() {
            let address = entry
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("prevResult.ips[{n}].address is missing")))?;
            let ip = address.split('/').next().unwrap_or(address);
            let ip: IpAddr = ip.parse().map_err(|e| {
                bad(format!(
                    "prevResult.ips[{n}].address {address:?} is not an address: {e}"
                ))
            })?;
            let keep = match entry.get("interface").and_then(Value::as_u64) {
                Some(i) => in_sandbox(i as usize),
                None => true,
            };
            if keep && !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// ADD's output: the previous result passed through (a chained plugin adds nothing), in the
    /// config's version.
    pub fn result(&self) -> Value {
        let mut result = match &self.prev_result {
            Some(Value::Object(prev)) => Value::Object(prev.clone()),
            _ => serde_json::json!({}),
        };
        result["cniVersion"] = Value::String(self.cni_version.clone());
        result
    }
}

/// VERSION's output.
pub fn version_output(stdin: &[u8]) -> Value {
    // The runtime may send `{"cniVersion": ...}`; the answer names it (or our newest).
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into());
    serde_json::json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_split_into_pairs() {
        let args = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;junk;=x");
        assert_eq!(
            args.get("K8S_POD_NAMESPACE").map(String::as_str),
            Some("shop")
        );
        assert_eq!(args.get("K8S_POD_NAME").map(String::as_str), Some("web-1"));
        assert_eq!(args.len(), 3, "{args:?}");
    }

    #[test]
    fn prev_result_ips_are_the_sandbox_ones() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","prevResult":{
              "cniVersion":"1.0.0",
              "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/proc/9/ns/net"}],
              "ips":[{"address":"10.1.0.7/24","interface":2},{"address":"10.1.0.1/24","interface":0},
                     {"address":"fd00::7/64"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            conf.prev_ips().unwrap(),
            vec![
                "10.1.0.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        let out = conf.result();
        assert_eq!(
            out["ips"].as_array().map(Vec::len),
            Some(3),
            "passed through"
        );
    }

    #[test]
    fn bad_configs_are_named() {
        let e = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = NetConf::parse(br#"{"cniVersion":"0.2.0","name":"k8s"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(
            e.details.contains("\"k8s\"") && e.details.contains("0.2.0"),
            "{e}"
        );
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"k8s","prevResult":{"ips":[{"address":"nope/24"}]}}"#,
        )
        .unwrap();
        let e = conf.prev_ips().unwrap_err();
        assert!(e.details.contains("prevResult.ips[0].address"), "{e}");
    }

    #[test]
    fn environment_requirements_follow_the_command() {
        let env = Env::from_vars([("CNI_COMMAND".to_string(), "DEL".to_string())]);
        let e = env.require(Command::Del).unwrap_err();
        assert!(e.details.contains("CNI_CONTAINERID") && !e.details.contains("CNI_NETNS"));
        let e = env.require(Command::Add).unwrap_err();
        assert!(e.details.contains("CNI_NETNS"), "{e}");
        assert!(env.require(Command::Version).is_ok());
        let e = Env::from_vars([("CNI_COMMAND".to_string(), "REPAIR".to_string())])
            .command()
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }
}
