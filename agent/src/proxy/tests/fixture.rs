//! The in-process tier's world: pods on loopback addresses of their own, the nodes that run their
//! stages (outbound, HBONE inbound, plaintext inbound) in this process, apps, and a raw HBONE
//! client. No netns, no eBPF, no root. Capture is the one thing missing, so a test does its part:
//! it tells the pod's node where a connection was going, then connects to the pod's outbound
//! listener itself ([`Mesh::connect`]).
//!
//! ```ignore
//! let mut world = World::new();
//! let client = world.pod("client").node("n1").sa("sleep").add();
//! let server = world.pod("server").node("n2").add();
//! let mesh = world.start().await;
//! let app = mesh.whoami(server.addr(8080)).await;
//! let conn = mesh.connect(&client, server.addr(8080)).await;
//! ```
//!
//! Each world owns a /24 of 127.0.0.0/8 (claimed by a listener on its `.254`, so parallel tests
//! and other test processes pick other blocks); its pods, Service VIPs and outside hosts take
//! addresses from it, so every test may use the fixed ports (15001, 15006, 15008, 8080).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use arc_swap::ArcSwap;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use crate::config::files::{load_text, Loaded};
use crate::identity::tests::TempDir;
use crate::identity::{
    CertConfig, CertLease, Identity, LocalCa, SecretManager, DEFAULT_TRUST_DOMAIN,
};
use crate::proxy::hbone::{
    ConnectRequest, Pool, PoolConfig, PoolError, PoolKey, PoolStats, Stream,
};
use crate::proxy::inbound::Inbound;
use crate::proxy::inbound_plain::InboundPlain;
use crate::proxy::metrics::Telemetry;
use crate::proxy::outbound::Outbound;
use crate::proxy::{Counters, OrigDstLookup, PodContext, ProxyInputs, SocketFactory};
use crate::snapshot::Snapshot;
use crate::state::store::Store;

/// How long any one thing a test waits for may take before the test fails (a ceiling, not an
/// expectation: everything here takes milliseconds).
pub const CEILING: Duration = Duration::from_secs(20);

const ROOT_NAMESPACE: &str = "istio-system";

/// Waits for `fut`, failing the test with `what` after [`CEILING`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(CEILING, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

/// Polls `cond` until it holds, failing the test with `what` after [`CEILING`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CEILING;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A /24 of loopback addresses one world owns.
struct Block {
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
    pods: Vec<(Pod, BTreeMap<String, String>)>,
    yaml: Vec<String>,
    pool: PoolConfig,
}

pub struct PodBuilder<'w> {
    world: &'w mut World,
    pod: Pod,
    labels: BTreeMap<String, String>,
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

    pub fn add(self) -> Pod {
        let PodBuilder {
            world,
            pod,
            mut labels,
        } = self;
        assert!(
            world.namespaces.contains_key(&pod.namespace),
            "pod {}: namespace {} is not declared (World::ambient / World::plain)",
            pod.name,
            pod.namespace
        );
        labels.insert("app".into(), pod.app.clone());
        world.pods.push((pod.clone(), labels));
        pod
    }
}

pub struct ServiceBuilder<'w> {
    world: &'w mut World,
    name: String,
    ports: Vec<(u16, u16)>,
    backends: Vec<Pod>,
    ready: bool,
}

impl ServiceBuilder<'_> {
    /// A Service port and the target (pod) port it forwards to.
    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.push((port, target));
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
            .map(|(p, t)| format!("{{name: p{p}, port: {p}, targetPort: {t}}}"))
            .collect();
        let slice_ports: Vec<String> = ports
            .iter()
            .map(|(p, t)| format!("{{name: p{p}, port: {t}}}"))
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
            },
            labels: BTreeMap::new(),
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
        for (p, labels) in &self.pods {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = write!(
                out,
                "apiVersion: v1
kind: Pod
metadata: {{name: {}, namespace: {}, uid: uid-{}, labels: {{{}}}}}
spec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app, image: x}}]}}
status: {{phase: Running, podIP: \"{}\", podIPs: [{{ip: \"{}\"}}]}}
---
",
                p.name,
                p.namespace,
                p.name,
                labels.join(", "),
                p.node,
                p.sa,
                p.ip,
                p.ip
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
        let mut loaded = Loaded::default();
        load_text(&mut loaded, Path::new("world.yaml"), &text);
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

        let ca_dir = TempDir::new("inproc-ca");
        let ca = Arc::new(
            LocalCa::load_or_create(ca_dir.path(), DEFAULT_TRUST_DOMAIN)
                .unwrap_or_else(|e| panic!("local CA: {e}")),
        );
        let by_key: HashMap<String, Pod> = self
            .pods
            .iter()
            .map(|(p, _)| (p.key(), p.clone()))
            .collect();
        let node_names: BTreeSet<String> = self.pods.iter().map(|(p, _)| p.node.clone()).collect();
        let mut nodes = BTreeMap::new();
        for name in node_names {
            let snapshot = Snapshot::build(state.clone(), ROOT_NAMESPACE, &name);
            let node = Node::start(&name, snapshot, ca.clone(), self.pool.clone(), &by_key).await;
            nodes.insert(name, node);
        }
        Mesh {
            nodes,
            pods: by_key,
            ca,
            _ca_dir: ca_dir,
            _block: self.block,
        }
    }
}

/// Plain tokio sockets in this process's netns, bound to the pod's address when asked (the
/// agent's `NetnsWorker` makes them inside the pod).
#[derive(Debug, Default)]
pub struct LoopbackSockets {
    /// Sockets made, by the source address asked for.
    pub made: Mutex<Vec<Option<IpAddr>>>,
}

impl SocketFactory for LoopbackSockets {
    fn upstream(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpSocket>> + Send + '_>> {
        Box::pin(async move {
            self.made
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(bind);
            let socket = if dst.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(ip) = bind {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            Ok(socket)
        })
    }
}

/// Original destinations the test registers, as the eBPF map would hold them: by (netns cookie,
/// the app's socket, the listener it reached).
#[derive(Debug, Default)]
pub struct OrigDsts(Mutex<HashMap<(u64, SocketAddr, SocketAddr), SocketAddr>>);

impl OrigDsts {
    pub fn insert(&self, cookie: u64, peer: SocketAddr, local: SocketAddr, dst: SocketAddr) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((cookie, peer, local), dst);
    }
}

impl OrigDstLookup for OrigDsts {
    fn take(&self, netns_cookie: u64, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(netns_cookie, peer, local))
    }
}

/// One node: its `ProxyInputs` and the stages of its enrolled pods.
pub struct Node {
    pub name: String,
    pub pi: Arc<ProxyInputs>,
    pub orig_dst: Arc<OrigDsts>,
    registry: Registry,
    /// The stages' view of each enrolled pod of this node, by `namespace/name`.
    pub pods: HashMap<String, Arc<PodContext>>,
    _leases: Vec<CertLease>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    async fn start(
        name: &str,
        snapshot: Snapshot,
        ca: Arc<LocalCa>,
        pool: PoolConfig,
        world: &HashMap<String, Pod>,
    ) -> Node {
        let secrets = SecretManager::new(
            ca,
            CertConfig {
                trust_domain: DEFAULT_TRUST_DOMAIN.into(),
                ttl: Duration::from_secs(3600),
            },
        );
        let telemetry = Arc::new(Telemetry::new(DEFAULT_TRUST_DOMAIN, None));
        let mut registry = Registry::default();
        telemetry.register(&mut registry);
        let orig_dst = Arc::new(OrigDsts::default());
        let enrolled = snapshot.state.enrolled_on(name);
        let pi = Arc::new(ProxyInputs {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            orig_dst: orig_dst.clone(),
            counters: Counters::default(),
            telemetry,
            secrets: secrets.clone(),
            pool: Pool::new(pool, secrets.clone()),
        });
        let (mut pods, mut leases, mut tasks) = (HashMap::new(), Vec::new(), Vec::new());
        for w in enrolled {
            let key = w.key().to_string();
            let pod = world
                .get(&key)
                .unwrap_or_else(|| panic!("enrolled workload {key} is a pod of the world"));
            // As `node::Node::pod_context` makes it.
            let ctx = Arc::new(PodContext {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                ips: w.ips.clone(),
                netns_cookie: pod.cookie,
                sockets: Arc::new(LoopbackSockets::default()),
                identity: pod.identity(),
                istio: w.istio.clone(),
                baggage: http::HeaderValue::from_str(&crate::node::discovery::baggage(&w)).ok(),
            });
            leases.push(secrets.acquire(&ctx.identity));
            let bind = |port| {
                let addr = pod.addr(port);
                async move {
                    TcpListener::bind(addr)
                        .await
                        .unwrap_or_else(|e| panic!("binding {addr}: {e}"))
                }
            };
            tasks.push(tokio::spawn(
                Outbound {
                    pi: pi.clone(),
                    pod: ctx.clone(),
                    listener: bind(OUTBOUND_PORT).await,
                }
                .run(),
            ));
            tasks.push(tokio::spawn(
                Inbound {
                    pi: pi.clone(),
                    pod: ctx.clone(),
                    listener: bind(HBONE_PORT).await,
                }
                .run(),
            ));
            tasks.push(tokio::spawn(
                InboundPlain {
                    pi: pi.clone(),
                    pod: ctx.clone(),
                    listener: bind(INBOUND_PORT).await,
                }
                .run(),
            ));
            pods.insert(key, ctx);
        }
        Node {
            name: name.into(),
            pi,
            orig_dst,
            registry,
            pods,
            _leases: leases,
            tasks,
        }
    }

    /// One of ambit's proxy counters: `node.count(|c| &c.outbound_hbone)`.
    pub fn count(&self, counter: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        counter(&self.pi.counters).load(Ordering::Relaxed)
    }

    /// One of the HBONE pool's counters: `node.pooled(|p| &p.connections_opened)`.
    pub fn pooled(&self, counter: impl Fn(&PoolStats) -> &AtomicU64) -> u64 {
        counter(self.pi.pool.stats()).load(Ordering::Relaxed)
    }

    /// Waits until the one series of `name` with `labels` reads `want`; fails showing the
    /// family's series after [`CEILING`].
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: u64) {
        let deadline = Instant::now() + CEILING;
        loop {
            let m = self.metrics();
            if m.value(name, labels) == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {} for {name}{labels:?} == {want}; the series are:\n{}",
                self.name,
                lines_with(&m, name)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What a scrape of the node's Istio telemetry shows now.
    pub fn metrics(&self) -> Metrics {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("metrics encode");
        Metrics(text)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The running world.
pub struct Mesh {
    pub nodes: BTreeMap<String, Node>,
    pods: HashMap<String, Pod>,
    ca: Arc<LocalCa>,
    _ca_dir: TempDir,
    _block: Block,
}

impl Mesh {
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn context(&self, pod: &Pod) -> (&Node, &Arc<PodContext>) {
        let node = self.node(&pod.node);
        let ctx = node
            .pods
            .get(&pod.key())
            .unwrap_or_else(|| panic!("{} is not enrolled on {}", pod.key(), pod.node));
        (node, ctx)
    }

    /// Connects as the app in `from` would connect to `dst`, captured: the pod's node is told the
    /// original destination of the socket, which then connects to the pod's outbound listener.
    pub async fn connect(&self, from: &Pod, dst: SocketAddr) -> TcpStream {
        let (node, _) = self.context(from);
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(from.addr(0)).expect("bind the app's socket");
        let local = socket.local_addr().expect("local address");
        let outbound = from.addr(OUTBOUND_PORT);
        node.orig_dst.insert(from.cookie, local, outbound, dst);
        within("connect to the outbound listener", socket.connect(outbound))
            .await
            .unwrap_or_else(|e| panic!("connect to {outbound}: {e}"))
    }

    /// Opens an HBONE stream from `from`'s node to the pod at `dst`, as the outbound stage would
    /// (same pool key and request).
    pub async fn tunnel(&self, from: &Pod, dst: SocketAddr) -> Result<Stream, PoolError> {
        let (node, ctx) = self.context(from);
        let to = self
            .pods
            .values()
            .find(|p| p.ip == dst.ip())
            .unwrap_or_else(|| panic!("no pod at {dst}"));
        let key = PoolKey {
            src_netns: ctx.netns_cookie,
            src_ip: from.ip,
            src_id: ctx.identity.clone(),
            dst_id: to.identity(),
            dst: SocketAddr::new(dst.ip(), HBONE_PORT),
        };
        let req = ConnectRequest {
            authority: dst,
            forwarded_for: from.addr(0),
            baggage: ctx.baggage.clone(),
        };
        node.pi.pool.connect(&key, ctx.sockets.as_ref(), &req).await
    }

    /// An app at `addr` that greets each connection with one line naming both ends
    /// (`<local> sees <peer>`), then echoes until the client's FIN, then closes.
    pub async fn whoami(&self, addr: SocketAddr) -> App {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("app at {addr}: {e}"));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                tokio::spawn(async move {
                    let greeting = format!("{addr} sees {peer}\n");
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        App { peers, task }
    }

    /// An app at `addr` whose connections the test handles itself.
    pub async fn listen(&self, addr: SocketAddr) -> AppListener {
        AppListener(
            TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("app at {addr}: {e}")),
        )
    }

    /// A certificate manager of the mesh's CA holding `id`'s certificate (for a client or a
    /// server the test plays itself).
    pub async fn secrets(&self, id: &Identity) -> (Arc<SecretManager>, CertLease) {
        let manager = SecretManager::new(
            self.ca.clone(),
            CertConfig {
                trust_domain: DEFAULT_TRUST_DOMAIN.into(),
                ttl: Duration::from_secs(3600),
            },
        );
        let lease = manager.acquire(id);
        within("a certificate", manager.fetch(id))
            .await
            .unwrap_or_else(|e| panic!("certificate for {id}: {e}"));
        (manager, lease)
    }

    /// A raw HBONE client from `from` to `server`'s 15008, presenting `id` (a certificate from the
    /// mesh's CA) and expecting the server's own identity.
    pub async fn hbone_client(
        &self,
        id: &Identity,
        from: IpAddr,
        server: &Pod,
    ) -> Result<HboneClient, String> {
        self.hbone_client_expecting(id, from, server, &server.identity())
            .await
    }

    /// As [`Mesh::hbone_client`], expecting the server to prove `expected`.
    pub async fn hbone_client_expecting(
        &self,
        id: &Identity,
        from: IpAddr,
        server: &Pod,
        expected: &Identity,
    ) -> Result<HboneClient, String> {
        let (manager, lease) = self.secrets(id).await;
        let cfg = crate::tls::client_config(manager.clone(), id.clone(), expected.clone());
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(from, 0))
            .map_err(|e| e.to_string())?;
        let dst = server.addr(HBONE_PORT);
        let tcp = socket.connect(dst).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(crate::tls::server_name(dst.ip()), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HboneClient {
            sender,
            _lease: lease,
        })
    }
}

/// An app started by [`Mesh::whoami`]; stops when dropped.
pub struct App {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl App {
    /// The peer address of every connection it accepted, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct AppListener(TcpListener);

impl AppListener {
    pub async fn accept(&self) -> (TcpStream, SocketAddr) {
        within("the app accepts a connection", self.0.accept())
            .await
            .expect("accept")
    }
}

/// An HBONE client with its own HTTP/2 connection (one TLS session, one identity).
pub struct HboneClient {
    sender: h2::client::SendRequest<Bytes>,
    _lease: CertLease,
}

impl HboneClient {
    /// Sends `method` for `authority`; the status, and the stream when it is a 200 to a CONNECT.
    pub async fn request(
        &mut self,
        method: http::Method,
        authority: &str,
    ) -> Result<(u16, Option<Stream>), String> {
        let connect = method == http::Method::CONNECT;
        let req = http::Request::builder()
            .method(method)
            .uri(if connect {
                authority.to_string()
            } else {
                format!("https://{authority}/")
            })
            .body(())
            .map_err(|e| e.to_string())?;
        let mut sender = within("an HBONE stream slot", self.sender.clone().ready())
            .await
            .map_err(|e| e.to_string())?;
        let (resp, send) = sender
            .send_request(req, !connect)
            .map_err(|e| e.to_string())?;
        let resp = within("the HBONE server's answer", resp)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let stream = (connect && status == 200).then(|| Stream::new(send, resp.into_body()));
        Ok((status, stream))
    }

    pub async fn status(&mut self, method: http::Method, authority: &str) -> Result<u16, String> {
        Ok(self.request(method, authority).await?.0)
    }
}

/// A scrape of a node's metrics, in Prometheus' text format.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the one series of `name` whose labels include `labels`; None when no series
    /// matches. Panics when several do (the test must say which one it means).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let matches: Vec<(BTreeMap<String, String>, u64)> = self
            .series(name)
            .into_iter()
            .filter(|(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(
            matches.len() <= 1,
            "{name}{labels:?} matches {} series: {matches:?}",
            matches.len()
        );
        matches.first().map(|(_, v)| *v)
    }

    /// Every series of `name`, with its labels.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(parse_sample)
            .filter(|(n, _, _)| n == name)
            .map(|(_, labels, v)| (labels, v))
            .collect()
    }
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `name{k="v",...} value` → (name, labels, value).
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, u64)> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()? as u64;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head.to_string(), BTreeMap::new(), value));
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',').to_string();
        if key.is_empty() || key == "}" {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    other => v.push(other),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.insert(key, v);
        if chars.peek() == Some(&'}') {
            break;
        }
    }
    Some((name.to_string(), labels, value))
}

/// Reads one line (the whoami greeting).
pub async fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    within("a line", async {
        loop {
            let n = stream.read(&mut byte).await.expect("read a line");
            assert!(n == 1, "EOF before the end of the line: {line:?}");
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
    })
    .await;
    String::from_utf8(line).expect("utf-8 line")
}

/// Reads until EOF; fails the test on an error (a reset).
pub async fn read_to_end(stream: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    within("EOF", stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|e| panic!("read to EOF: {e} (after {} bytes)", out.len()));
    out
}

/// Reads exactly `n` bytes.
pub async fn read_exact(stream: &mut (impl AsyncReadExt + Unpin), n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    within("bytes", stream.read_exact(&mut out))
        .await
        .unwrap_or_else(|e| panic!("read {n} bytes: {e}"));
    out
}

/// What the next read gives: data, EOF (`Ok(0)`), or the error (a reset).
pub async fn next_read(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = within("a read to return", stream.read(&mut buf)).await?;
    buf.truncate(n);
    Ok(buf)
}

/// Closes with RST (linger 0) instead of FIN.
pub fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set linger 0");
    drop(stream);
}

/// `n` bytes of a pattern that differs at every offset of a 251-byte cycle (a lost, duplicated
/// or reordered chunk shows).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
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

/// Lines of `text` (a metrics scrape) naming `needle`, for failure messages.
pub fn lines_with(text: &Metrics, needle: &str) -> String {
    text.0
        .lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn metric_lines_parse_with_escapes() {
    let (name, labels, v) =
        parse_sample(r#"x_total{a="1",b="q\"uote",c="back\\slash"} 42"#).expect("parses");
    assert_eq!(name, "x_total");
    assert_eq!(labels["a"], "1");
    assert_eq!(labels["b"], "q\"uote");
    assert_eq!(labels["c"], "back\\slash");
    assert_eq!(v, 42);
    let (name, labels, v) = parse_sample("y 3").expect("parses");
    assert_eq!((name.as_str(), labels.len(), v), ("y", 0, 3));
}

/// Fails with the length and the first differing offset rather than two long byte strings.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: got {} bytes, want {}; first difference at {at:?}",
        got.len(),
        want.len()
    );
}
