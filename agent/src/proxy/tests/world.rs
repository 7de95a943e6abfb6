//! The cluster a test describes ([`World`]: namespaces, pods, Services, policies), written as
//! YAML and read through the store as the agent reads its config, then started as a [`Mesh`].
//! Each world owns a /24 of 127.0.0.0/8, so its pods can all use the fixed ports.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ambit_common::HBONE_PORT;

use super::fixture::Mesh;
use super::nodes::Node;
use crate::config::files::{load_text, Loaded};
use crate::identity::tests::TempDir;
use crate::identity::{Identity, LocalCa, DEFAULT_TRUST_DOMAIN};
use crate::proxy::hbone::PoolConfig;
use crate::snapshot::Snapshot;
use crate::state::store::Store;

const ROOT_NAMESPACE: &str = "istio-system";

/// A /24 of loopback addresses one world owns.
pub(super) struct Block {
    a: u8,
    b: u8,
    _claim: std::net::TcpListener,
}

impl Block {
    /// Claims a free block among 127.200.0.0/24 … 127.254.255.0/24 (away from 127.0.0.1 and
    /// 127.0.0.53), starting from one the process id picks so two test processes rarely probe
    /// the same ones. A listener (without SO_REUSEPORT) on `.254` is the claim: a second one on
    /// the same address fails while the first lives, in any process.
    fn claim() -> Block {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        const BLOCKS: u32 = 55 * 256;
        let start = std::process::id().wrapping_mul(7919) % BLOCKS;
        for _ in 0..BLOCKS {
            let n = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % BLOCKS;
            let (a, b) = (200 + (n / 256) as u8, (n % 256) as u8);
            if let Ok(l) = std::net::TcpListener::bind((Ipv4Addr::new(127, a, b, 254), HBONE_PORT))
            {
                return Block { a, b, _claim: l };
            }
        }
        panic!("no free loopback block in 127.200.0.0 - 127.254.255.255");
    }

    fn ip(&self, host: u8) -> IpAddr {
        Ipv4Addr::new(127, self.a, self.b, host).into()
    }
}

/// A pod of the world, as the test names it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub sa: String,
    pub node: String,
    pub app: String,
    pub ip: IpAddr,
    /// Its netns cookie (any number unique in the world: the pool keys connections by it).
    pub cookie: u64,
    /// Labels besides `app`.
    pub labels: Vec<(String, String)>,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    pub fn identity(&self) -> Identity {
        Identity::new(DEFAULT_TRUST_DOMAIN, &self.namespace, &self.sa)
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its SPIFFE id as Istio's `*_principal` labels write it.
    pub fn principal(&self) -> String {
        self.identity().to_string()
    }
}

/// The cluster a test describes, before anything runs.
pub struct World {
    block: Block,
    next_host: u8,
    namespaces: BTreeMap<String, bool>,
    pods: Vec<Pod>,
    yaml: Vec<String>,
    pool: PoolConfig,
    detection_timeout: std::time::Duration,
    source_relay: bool,
    access_log: bool,
}

pub struct PodBuilder<'w> {
    world: &'w mut World,
    pod: Pod,
}

impl PodBuilder<'_> {
    pub fn node(mut self, node: &str) -> Self {
        self.pod.node = node.into();
        self
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.pod.namespace = namespace.into();
        self
    }

    pub fn sa(mut self, sa: &str) -> Self {
        self.pod.sa = sa.into();
        self
    }

    /// Its `app` label (the pod's name unless set).
    pub fn app(mut self, app: &str) -> Self {
        self.pod.app = app.into();
        self
    }

    /// One more label (`version: v2`, for DestinationRule subsets).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.pod.labels.push((key.into(), value.into()));
        self
    }

    pub fn add(self) -> Pod {
        let PodBuilder { world, pod } = self;
        assert!(
            world.namespaces.contains_key(&pod.namespace),
            "pod {}: namespace {} is not declared (`mesh` is; World::plain adds others)",
            pod.name,
            pod.namespace
        );
        world.pods.push(pod.clone());
        pod
    }
}

pub struct ServiceBuilder<'w> {
    world: &'w mut World,
    name: String,
    /// (name, port, target port).
    ports: Vec<(String, u16, u16)>,
    backends: Vec<Pod>,
    ready: bool,
}

impl ServiceBuilder<'_> {
    /// A Service port and the target (pod) port it forwards to.
    /// Named `p<port>`, which declares no protocol (it is detected).
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.push((format!("p{port}"), port, target));
        self
    }

    /// A Service port with a name of the test's choice (`http`, `grpc-api`, `tcp`, ...: Istio's
    /// protocol selection reads it).
    pub fn named_port(mut self, name: &str, port: u16, target: u16) -> Self {
        self.ports.push((name.to_string(), port, target));
        self
    }

    /// The pods it selects (by their shared `app` label), each an endpoint of its slice.
    pub fn backends(mut self, pods: &[&Pod]) -> Self {
        self.backends = pods.iter().map(|p| (*p).clone()).collect();
        self
    }

    /// Its endpoints are listed but not ready.
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    /// Writes the Service and its EndpointSlice; returns the VIP.
    pub fn add(self) -> IpAddr {
        let ServiceBuilder {
            world,
            name,
            ports,
            backends,
            ready,
        } = self;
        let first = backends
            .first()
            .unwrap_or_else(|| panic!("Service {name} without backends"));
        let (ns, app) = (&first.namespace, &first.app);
        assert!(
            backends.iter().all(|p| &p.app == app && &p.namespace == ns),
            "Service {name}: backends share one namespace and app label"
        );
        let vip = world.next_ip();
        let svc_ports: Vec<String> = ports
            .iter()
            .map(|(n, p, t)| format!("{{name: {n}, port: {p}, targetPort: {t}}}"))
            .collect();
        let slice_ports: Vec<String> = ports
            .iter()
            .map(|(n, _, t)| format!("{{name: {n}, port: {t}}}"))
            .collect();
        let endpoints: Vec<String> = backends
            .iter()
            .map(|p| {
                format!(
                    "- {{addresses: [\"{}\"], conditions: {{ready: {ready}}}, nodeName: {}, targetRef: {{kind: Pod, name: {}, namespace: {ns}}}}}",
                    p.ip, p.node, p.name
                )
            })
            .collect();
        world.yaml.push(format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  clusterIP: \"{vip}\"
  selector: {{app: {app}}}
  ports: [{}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{}]
endpoints:
{}
",
            svc_ports.join(", "),
            slice_ports.join(", "),
            endpoints.join("\n"),
        ));
        vip
    }
}

impl World {
    /// A world with the namespace `mesh` (ambient) and the root namespace.
    pub fn new() -> World {
        raise_fd_limit();
        let mut namespaces = BTreeMap::new();
        namespaces.insert("mesh".to_string(), true);
        namespaces.insert(ROOT_NAMESPACE.to_string(), false);
        World {
            block: Block::claim(),
            next_host: 1,
            namespaces,
            pods: Vec::new(),
            yaml: Vec::new(),
            pool: PoolConfig::default(),
            detection_timeout: crate::proxy::protocol::DEFAULT_SNIFF_TIMEOUT,
            access_log: true,
            source_relay: true,
        }
    }

    /// Declares a namespace outside the mesh.
    pub fn plain(&mut self, namespace: &str) -> &mut Self {
        self.namespaces.insert(namespace.into(), false);
        self
    }

    /// A pod (namespace `mesh`, service account `default`, node `n1` unless set).
    pub fn pod(&mut self, name: &str) -> PodBuilder<'_> {
        let ip = self.next_ip();
        let cookie = 1000 + u64::from(self.next_host);
        PodBuilder {
            pod: Pod {
                name: name.into(),
                namespace: "mesh".into(),
                sa: "default".into(),
                node: "n1".into(),
                app: name.into(),
                ip,
                cookie,
                labels: Vec::new(),
            },
            world: self,
        }
    }

    pub fn service(&mut self, name: &str) -> ServiceBuilder<'_> {
        ServiceBuilder {
            world: self,
            name: name.into(),
            ports: Vec::new(),
            backends: Vec::new(),
            ready: true,
        }
    }

    /// An address of this world's block that the cluster knows nothing about (a host outside the
    /// mesh).
    pub fn outside_ip(&mut self) -> IpAddr {
        self.next_ip()
    }

    /// More objects (policies), as YAML documents.
    pub fn yaml(&mut self, text: &str) -> &mut Self {
        self.yaml.push(text.to_string());
        self
    }

    /// The HBONE pool's settings on every node.
    pub fn pool(&mut self, cfg: PoolConfig) -> &mut Self {
        self.pool = cfg;
        self
    }

    /// No mesh-wide access log on any node (every node writes one unless this is called).
    pub fn no_access_log(&mut self) -> &mut Self {
        self.access_log = false;
        self
    }

    /// Every node serves every app request with the full server (`--source-relay=false`).
    pub fn no_source_relay(&mut self) -> &mut Self {
        self.source_relay = false;
        self
    }

    /// How long every node waits for an undeclared port's first bytes (`ProxyInputs::
    /// protocol_detection_timeout`; 5 s unless set).
    pub fn protocol_detection_timeout(&mut self, timeout: std::time::Duration) -> &mut Self {
        self.detection_timeout = timeout;
        self
    }

    fn next_ip(&mut self) -> IpAddr {
        assert!(self.next_host < 250, "too many addresses for one world");
        let ip = self.block.ip(self.next_host);
        self.next_host += 1;
        ip
    }

    fn cluster_yaml(&self) -> String {
        let mut out = String::new();
        for (ns, ambient) in &self.namespaces {
            let labels = if *ambient {
                ", labels: {istio.io/dataplane-mode: ambient}"
            } else {
                ""
            };
            let _ = write!(
                out,
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}{labels}}}\n---\n"
            );
        }
        for p in &self.pods {
            let Pod {
                name,
                namespace,
                sa,
                node,
                app,
                ip,
                labels,
                ..
            } = p;
            let labels: String = labels.iter().map(|(k, v)| format!(", {k}: {v}")).collect();
            let _ = write!(
                out,
                "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, uid: uid-{name}, labels: {{app: {app}{labels}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app, image: x}}]}}
status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}
---
"
            );
        }
        for y in &self.yaml {
            let _ = write!(out, "{y}\n---\n");
        }
        out
    }

    /// Builds the snapshot through the store (one `Replace` of every kind, so the view is
    /// complete), issues certificates from a local CA, and starts the stages of every enrolled
    /// pod on its node.
    pub async fn start(self) -> Mesh {
        let text = self.cluster_yaml();
        let state = state_of(&text);

        let ca_dir = TempDir::new("inproc-ca");
        let ca = Arc::new(
            LocalCa::load_or_create(ca_dir.path(), DEFAULT_TRUST_DOMAIN)
                .unwrap_or_else(|e| panic!("local CA: {e}")),
        );
        let by_key: HashMap<String, Pod> = self.pods.iter().map(|p| (p.key(), p.clone())).collect();
        let node_names: BTreeSet<String> = self.pods.iter().map(|p| p.node.clone()).collect();
        let mut nodes = BTreeMap::new();
        for name in node_names {
            let snapshot = Snapshot::build(state.clone(), ROOT_NAMESPACE, &name);
            let node = Node::start(
                &name,
                snapshot,
                ca.clone(),
                (
                    self.pool.clone(),
                    self.detection_timeout,
                    self.access_log,
                    self.source_relay,
                ),
                &by_key,
            )
            .await;
            nodes.insert(name, node);
        }
        Mesh {
            text,
            nodes,
            pods: by_key,
            ca,
            _ca_dir: ca_dir,
            _block: self.block,
        }
    }
}

/// The state the world's YAML describes, read through the store as the agent reads its config
/// (one `Replace` of every kind, so the view is complete).
pub(super) fn state_of(text: &str) -> Arc<crate::state::State> {
    let mut loaded = Loaded::default();
    load_text(&mut loaded, Path::new("world.yaml"), text);
    assert!(
        loaded.file_errors.is_empty(),
        "the world's YAML does not parse: {:?}\n{text}",
        loaded.file_errors
    );
    let mut store = Store::new(DEFAULT_TRUST_DOMAIN);
    store.apply(loaded.into_event());
    store.publish();
    assert!(
        store.errors().is_empty(),
        "the world's objects are not all accepted: {:?}\n{text}",
        store.errors()
    );
    let state = store.reader().load_full();
    assert!(state.is_complete(), "every kind was listed");
    state
}

/// Each test runs hundreds of sockets at once, next to the others.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
