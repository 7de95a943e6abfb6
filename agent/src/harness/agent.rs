//! Runs the `ambit` binary as a node agent for a world's node, with the world written out as
//! Kubernetes YAML (local mode's control plane), and reads its status file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use super::{Node, Pod, Process, World};

/// The cluster as YAML: namespaces (with or without the ambient label) and pods.
#[derive(Debug, Default, Clone)]
pub struct ClusterYaml {
    ambient_namespaces: Vec<String>,
    plain_namespaces: Vec<String>,
    pods: Vec<Pod>,
    opted_out: Vec<String>,
    extra_annotations: Vec<(String, String, String)>,
    /// Pod name → service account written instead of the pod's own.
    sa_overrides: Vec<(String, String)>,
    /// Pods written with `metadata.deletionTimestamp` (a graceful delete under way).
    terminating: Vec<String>,
    /// Pod name → netns path written instead of the pod's own (local mode's annotation).
    netns_overrides: Vec<(String, PathBuf)>,
    /// Services with their EndpointSlices, and other YAML documents (Istio objects), written
    /// after the pods.
    extra_docs: Vec<String>,
}

/// A Service port: its name (Istio's protocol selection reads it; None declares nothing), the
/// Service port, and the pods' target port.
#[derive(Debug, Clone)]
pub struct SvcPort {
    pub name: Option<String>,
    pub port: u16,
    pub target: u16,
    /// `appProtocol`, which wins over the name (Istio).
    pub app_protocol: Option<String>,
}

impl SvcPort {
    pub fn named(name: &str, port: u16, target: u16) -> Self {
        SvcPort {
            name: Some(name.to_string()),
            port,
            target,
            app_protocol: None,
        }
    }
    /// A port without a name or appProtocol: its protocol is detected.
    pub fn unnamed(port: u16, target: u16) -> Self {
        SvcPort {
            name: None,
            port,
            target,
            app_protocol: None,
        }
    }
}

impl ClusterYaml {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn ambient(mut self, ns: &str) -> Self {
        self.ambient_namespaces.push(ns.to_string());
        self
    }
    pub fn plain(mut self, ns: &str) -> Self {
        self.plain_namespaces.push(ns.to_string());
        self
    }
    pub fn pod(mut self, pod: &Pod) -> Self {
        self.pods.push(pod.clone());
        self
    }
    pub fn pods<'a>(mut self, pods: impl IntoIterator<Item = &'a Pod>) -> Self {
        self.pods.extend(pods.into_iter().cloned());
        self
    }
    /// Labels a pod `istio.io/dataplane-mode=none`.
    pub fn opt_out(mut self, pod: &Pod) -> Self {
        self.opted_out.push(pod.name().to_string());
        self
    }
    /// Adds `pod`, claiming it runs as `service_account` (to give one agent a wrong view).
    pub fn pod_with_sa(mut self, pod: &Pod, service_account: &str) -> Self {
        self.sa_overrides
            .push((pod.name().to_string(), service_account.to_string()));
        self.pod(pod)
    }
    /// Writes the pod with a `metadata.deletionTimestamp`: terminating, its sandbox still there.
    pub fn terminating(mut self, pod: &Pod) -> Self {
        self.terminating.push(pod.name().to_string());
        self
    }
    /// Names another file as the pod's netns (local mode), e.g. a symlink the test creates later.
    pub fn netns_at(mut self, pod: &Pod, path: &Path) -> Self {
        self.netns_overrides
            .push((pod.name().to_string(), path.to_path_buf()));
        self
    }
    pub fn annotate(mut self, pod: &Pod, key: &str, value: &str) -> Self {
        self.extra_annotations
            .push((pod.name().to_string(), key.to_string(), value.to_string()));
        self
    }

    /// Adds a Service (ClusterIP `vip`) and one EndpointSlice listing `backends` (IPv4, ready
    /// unless `ready` is false, each with its node and a `targetRef` to its pod).
    pub fn service(
        mut self,
        name: &str,
        namespace: &str,
        vip: std::net::Ipv4Addr,
        ports: &[SvcPort],
        backends: &[&Pod],
        ready: bool,
    ) -> Self {
        // Selects by the backends' `app` label (the Service's name if they have none).
        let app = backends
            .first()
            .and_then(|p| p.labels().get("app").cloned())
            .unwrap_or_else(|| name.to_string());
        let mut doc = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  clusterIP: \"{vip}\"\n  selector: {{app: {app}}}\n  ports:\n"
        );
        for p in ports {
            let _ = write!(doc, "  - {{port: {}, targetPort: {}", p.port, p.target);
            if let Some(n) = &p.name {
                let _ = write!(doc, ", name: {n}");
            }
            if let Some(a) = &p.app_protocol {
                let _ = write!(doc, ", appProtocol: {a}");
            }
            doc.push_str("}\n");
        }
        let _ = write!(
            doc,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {namespace}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n"
        );
        for p in ports {
            let _ = write!(doc, "- {{port: {}, protocol: TCP", p.target);
            if let Some(n) = &p.name {
                let _ = write!(doc, ", name: {n}");
            }
            doc.push_str("}\n");
        }
        if backends.is_empty() {
            doc.push_str("endpoints: []\n");
        } else {
            doc.push_str("endpoints:\n");
        }
        for pod in backends {
            let _ = writeln!(
                doc,
                "- {{addresses: [\"{}\"], conditions: {{ready: {ready}}}, nodeName: {}, targetRef: {{kind: Pod, name: {}, namespace: {}}}}}",
                pod.ip4(),
                pod.node_name(),
                pod.name(),
                pod.namespace()
            );
        }
        self.extra_docs.push(doc);
        self
    }

    /// Adds YAML documents as they are (Istio objects, say), written after everything else.
    pub fn raw(mut self, yaml: &str) -> Self {
        self.extra_docs.push(yaml.trim_matches('\n').to_string());
        self
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for (ns, ambient) in self
            .ambient_namespaces
            .iter()
            .map(|n| (n, true))
            .chain(self.plain_namespaces.iter().map(|n| (n, false)))
        {
            let labels = if ambient {
                "\n  labels:\n    istio.io/dataplane-mode: ambient"
            } else {
                ""
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}{labels}\n---\n"
            );
        }
        for pod in &self.pods {
            let netns = self
                .netns_overrides
                .iter()
                .find(|(p, _)| p == pod.name())
                .map_or(pod.netns_path(), |(_, path)| path.as_path());
            let mut annotations = format!("    ambit.dev/netns: {}\n", netns.display());
            for (_, k, v) in self
                .extra_annotations
                .iter()
                .filter(|(p, _, _)| p == pod.name())
            {
                let _ = writeln!(annotations, "    {k}: \"{v}\"");
            }
            let mut labels = String::new();
            for (k, v) in pod.labels() {
                let _ = writeln!(labels, "    {k}: \"{v}\"");
            }
            if self.opted_out.iter().any(|p| p == pod.name()) {
                labels.push_str("    istio.io/dataplane-mode: none\n");
            }
            let labels = if labels.is_empty() {
                String::new()
            } else {
                format!("  labels:\n{labels}")
            };
            let deleting = if self.terminating.iter().any(|p| p == pod.name()) {
                "  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n  deletionGracePeriodSeconds: 30\n"
            } else {
                ""
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: {uid}\n{deleting}{labels}  annotations:\n{annotations}spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\nstatus:\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: {ip6}\n---\n",
                name = pod.name(),
                uid = pod.uid(),
                ns = pod.namespace(),
                node = pod.node_name(),
                sa = self
                    .sa_overrides
                    .iter()
                    .find(|(p, _)| p == pod.name())
                    .map_or(pod.service_account(), |(_, sa)| sa.as_str()),
                ip4 = pod.ip4(),
                ip6 = pod.ip6(),
            );
        }
        for doc in &self.extra_docs {
            let _ = write!(out, "{doc}\n---\n");
        }
        out
    }

    /// Writes (atomically) to `dir/cluster.yaml`.
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let tmp = dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, self.render())
            .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, dir.join("cluster.yaml"))
            .unwrap_or_else(|e| panic!("rename into {}: {e}", dir.display()));
    }
}

/// The `ambit` agent of one node, as a child process.
pub struct LocalAgent {
    bin: PathBuf,
    node: Node,
    dir: PathBuf,
    bpffs: PathBuf,
    process: Option<Process>,
    extra_args: Vec<String>,
    /// `--kube` against the API server this kubeconfig names, instead of `--config`.
    kubeconfig: Option<PathBuf>,
    /// Run in the test's own netns (where a real API server on loopback is reachable) with the
    /// node's addresses read from the node's netns, instead of inside the node's netns.
    root_netns: bool,
    /// Upgrades so far: each agent process writes a status file of its own.
    upgrades: u32,
}

impl LocalAgent {
    /// Prepares (does not start) an agent for `node`. Its config directory is `config_dir()`.
    pub fn new(world: &World, node: &Node, bin: &Path) -> Self {
        // Under the world's state dir, which teardown and the sweeper remove.
        let dir = Path::new(super::STATE_DIR)
            .join(world.prefix())
            .join(format!("agent-{}", node.name()));
        std::fs::create_dir_all(dir.join("config"))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let bpffs = world.bpffs_dir().join(node.name());
        // One CA per world, shared by its agents (the nodes of one mesh trust one root). Created
        // here, before any agent starts, so two agents never race to create it.
        let ca_dir = Path::new(super::STATE_DIR).join(world.prefix()).join("ca");
        crate::identity::LocalCa::load_or_create(&ca_dir, crate::identity::DEFAULT_TRUST_DOMAIN)
            .unwrap_or_else(|e| panic!("local CA in {}: {e}", ca_dir.display()));
        LocalAgent {
            bin: bin.to_path_buf(),
            node: node.clone(),
            dir,
            bpffs,
            process: None,
            extra_args: Vec::new(),
            kubeconfig: None,
            root_netns: false,
            upgrades: 0,
        }
    }

    /// Runs the agent in the test's own netns, as a DaemonSet pod runs in its own (`--node-netns`
    /// names the node's for its addresses); the admin endpoint is off (ports would collide).
    pub fn in_root_netns(mut self) -> Self {
        self.root_netns = true;
        self
    }

    /// Runs the agent with `--kube` against the API server `kubeconfig` names (pods' netns are
    /// then found under /proc by UID: start each pod's sandbox).
    pub fn kube(mut self, kubeconfig: &Path) -> Self {
        self.kubeconfig = Some(kubeconfig.to_path_buf());
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra_args.push(a.to_string());
        self
    }

    /// `--cgroup-attach` for the next start (or upgrade). Without it the agent attaches at the
    /// cgroup root, whatever the host has: tests run clients on threads of the test process
    /// (`Pod::run`), which sit in the test's own cgroup, not under their pod's.
    pub fn set_cgroup_attach(&mut self, spec: &str) {
        self.extra_args
            .retain(|a| !a.starts_with("--cgroup-attach"));
        self.extra_args.push(format!("--cgroup-attach={spec}"));
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }
    /// The world's CA directory (root certificate and key), shared by all its agents.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.parent().unwrap_or(&self.dir).join("ca")
    }
    /// The running agent's status file (after an upgrade, the new process's).
    pub fn status_path(&self) -> PathBuf {
        match self.upgrades {
            0 => self.dir.join("status.json"),
            n => self.dir.join(format!("status-{n}.json")),
        }
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Where a successor takes this agent's listeners over (one per agent: a test's agents must
    /// never take over from another's).
    pub fn handover_socket(&self) -> PathBuf {
        self.dir.join("handover.sock")
    }

    /// Starts the agent (again, after `kill`/`stop`). The world tracks the process for teardown.
    pub fn start(&mut self, world: &World) {
        assert!(self.process.is_none(), "agent already running");
        let _ = std::fs::remove_file(self.status_path());
        self.process = Some(world.spawn(&mut self.command()));
    }

    /// Upgrades the running agent: starts a new agent process next to it, which takes its
    /// listeners over through the handover socket; the old one then drains and exits on its own.
    /// Returns the old process (to wait for its exit).
    pub fn upgrade(&mut self, world: &World) -> Process {
        let old = self.process.take().expect("an agent to upgrade");
        self.upgrades += 1;
        self.process = Some(world.spawn(&mut self.command()));
        old
    }

    /// SIGTERM without waiting: returns the process, which drains and exits on its own.
    pub fn terminate(&mut self) -> Process {
        let p = self.process.take().expect("an agent to stop");
        let _ = p.signal(Signal::SIGTERM);
        p
    }

    fn command(&self) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("open agent log: {e}"));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").args(["--node", self.node.name()]);
        match &self.kubeconfig {
            Some(kubeconfig) => {
                cmd.arg("--kube").env("KUBECONFIG", kubeconfig);
            }
            None => {
                cmd.arg("--config").arg(self.config_dir());
            }
        }
        if self.root_netns {
            cmd.arg("--node-netns")
                .arg(self.node.netns_path())
                .arg("--metrics-addr=off")
                .arg("--readiness-addr=off")
                .arg("--admin-addr=off");
        } else {
            cmd.arg("--host-netns").arg(self.node.netns_path());
        }
        cmd.arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--status-file")
            .arg(self.status_path())
            // Quick to notice YAML edits; an explicit `--poll-ms` given with `arg` wins.
            .args(
                (!self.extra_args.iter().any(|a| a.starts_with("--poll-ms")))
                    .then_some(["--poll-ms", "50"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .args(
                (!self
                    .extra_args
                    .iter()
                    .any(|a| a.starts_with("--cgroup-attach")))
                .then_some("--cgroup-attach=/"),
            )
            .args(&self.extra_args)
            .env(
                "AMBIT_LOG",
                std::env::var("AMBIT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("dup log: {e}")))
            .stderr(log);
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--handover-socket"))
        {
            cmd.arg("--handover-socket").arg(self.handover_socket());
        }
        cmd
    }

    /// The last status the agent wrote, if any.
    pub fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.status_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until `pred` holds on a status written after this call, or panics with the agent's log.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
            }
            if let Some(p) = &self.process {
                if let Ok(Some(code)) = p.try_wait() {
                    panic!(
                        "agent exited ({code}) while waiting for {what}\n{}",
                        self.log_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status: {:?}\n{}",
                    self.status(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until exactly these pods are enrolled.
    pub fn wait_enrolled(&self, pods: &[&Pod]) -> Value {
        let mut want: Vec<String> = pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace(), p.name()))
            .collect();
        want.sort();
        self.wait_for(
            &format!("enrolled pods {want:?}"),
            Duration::from_secs(20),
            |s| {
                let mut have: Vec<String> = s["pods"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p["pod"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                have.sort();
                have == want
            },
        )
    }

    /// A status written after this call (two writes later, so it reflects everything before it).
    pub fn fresh_status(&self) -> Value {
        let seq = self.status().and_then(|s| s["seq"].as_u64()).unwrap_or(0);
        self.wait_for("a fresh status", Duration::from_secs(10), |s| {
            s["seq"].as_u64().unwrap_or(0) >= seq + 2
        })
    }

    /// A counter from a fresh status (`section.name`, e.g. `proxy.outbound_accepted`).
    pub fn counter(&self, path: &str) -> u64 {
        let s = self.fresh_status();
        path.split('.').fold(&s, |v, k| &v[k]).as_u64().unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.signal(Signal::SIGTERM);
            if !matches!(p.wait_timeout(Duration::from_secs(10)), Ok(Some(_))) {
                p.kill();
            }
        }
    }

    /// Waits until `pred` holds on the agent's `/metrics`, or panics with the last scrape and log.
    pub fn wait_for_metrics(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, metrics) = self.http_get("/metrics");
            if pred(&metrics) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} in /metrics:\n{metrics}\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET `path` on the agent's admin port (127.0.0.1:15020 in the node's netns, where the test
    /// agents serve it); returns (status line and headers, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        use std::io::{Read as _, Write as _};
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let raw = self.node.run(move || {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 15020));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect to the admin port {addr}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("read timeout: {e}"));
            s.write_all(request.as_bytes())
                .unwrap_or_else(|e| panic!("write request: {e}"));
            let mut out = String::new();
            s.read_to_string(&mut out)
                .unwrap_or_else(|e| panic!("read {path}: {e}"));
            out
        });
        match raw.split_once("\r\n\r\n") {
            Some((head, body)) => (head.to_string(), body.to_string()),
            None => panic!("no HTTP response for {path}: {raw:?}"),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::id)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log's last 40 lines (`AMBIT_LOG_TAIL=<n>`: n lines).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let n = std::env::var("AMBIT_LOG_TAIL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(40);
        let start = lines.len().saturating_sub(n);
        format!(
            "--- agent log ({}) ---\n{}",
            self.log_path().display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
