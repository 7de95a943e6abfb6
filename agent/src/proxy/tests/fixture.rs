//! The in-process tier's fixture, in one import: a [`World`] of pods on loopback addresses of their
//! own, started as a [`Mesh`] whose nodes run their pods' stages in this process, apps, a raw HBONE
//! client, and the helpers that wait and read. No netns, no eBPF, no root. Capture is the one
//! thing missing, so a test does its part: it tells the pod's node where a connection was going,
//! then connects to the pod's outbound listener itself ([`Mesh::connect`]).
//!
//! ```ignore
//! let mut world = World::new();
//! let client = world.pod("client").node("n1").sa("sleep").add();
//! let server = world.pod("server").node("n2").add();
//! let mesh = world.start().await;
//! let app = mesh.whoami(server.addr(8080)).await;
//! let conn = mesh.connect(&client, server.addr(8080)).await;
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use ambit_common::{HBONE_PORT, OUTBOUND_PORT};
use tokio::net::{TcpSocket, TcpStream};

pub use super::io::*;
pub use super::nodes::Node;
pub use super::scrape::lines_with;
pub use super::web::*;
pub use super::world::{Pod, World};
use crate::identity::tests::TempDir;
use crate::identity::LocalCa;
use crate::proxy::hbone::{ConnectRequest, PoolError, PoolKey, Stream};
use crate::proxy::PodContext;

/// The running world.
pub struct Mesh {
    /// The world's YAML as published last.
    pub(super) text: String,
    pub nodes: BTreeMap<String, Node>,
    pub(super) pods: HashMap<String, Pod>,
    pub(super) ca: Arc<LocalCa>,
    pub(super) _ca_dir: TempDir,
    pub(super) _block: super::world::Block,
}

impl Mesh {
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Publishes a new snapshot on every node, of the world's YAML with `old` replaced by `new`
    /// (a config change, as the control side publishes it: connections stay, the next request
    /// reads it).
    pub fn republish(&mut self, old: &str, new: &str) {
        assert!(
            self.text.contains(old),
            "the world's YAML has no {old:?}:\n{}",
            self.text
        );
        self.text = self.text.replace(old, new);
        let state = super::world::state_of(&self.text);
        for (name, node) in &self.nodes {
            let snapshot = crate::snapshot::Snapshot::build(state.clone(), "istio-system", name);
            node.pi.snapshot.store(Arc::new(snapshot));
        }
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
            worker: crate::proxy::worker::current(),
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
}
