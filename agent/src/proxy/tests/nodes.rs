//! One node of the mesh in this process: its `ProxyInputs` (snapshot, pool, counters,
//! telemetry), and the outbound, HBONE and plaintext-inbound stages of its enrolled pods on their
//! loopback addresses, with a loopback [`SocketFactory`] and a table of original destinations in
//! place of the pod's netns and the eBPF map.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use super::io::CEILING;
use super::scrape::{lines_with, Metrics};
use super::world::Pod;
use crate::identity::{CertConfig, CertLease, LocalCa, SecretManager, DEFAULT_TRUST_DOMAIN};
use crate::proxy::access_log::AccessLog;
use crate::proxy::hbone::{Pool, PoolConfig, PoolStats};
use crate::proxy::inbound::Inbound;
use crate::proxy::inbound_plain::InboundPlain;
use crate::proxy::metrics::Telemetry;
use crate::proxy::outbound::Outbound;
use crate::proxy::{Counters, OrigDstLookup, PodContext, ProxyInputs, SocketFactory};
use crate::snapshot::Snapshot;

/// Plain tokio sockets in this process's netns, bound to the pod's address when asked (the
/// agent's `NetnsWorker` makes them inside the pod).
#[derive(Debug, Default)]
pub struct LoopbackSockets;

impl SocketFactory for LoopbackSockets {
    fn upstream(
        &self,
        dst: SocketAddr,
        bind: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpSocket>> + Send + '_>> {
        Box::pin(async move {
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

/// The access log's lines, in memory.
#[derive(Debug, Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One node: its `ProxyInputs` and the stages of its enrolled pods.
pub struct Node {
    pub name: String,
    pub pi: Arc<ProxyInputs>,
    pub orig_dst: Arc<OrigDsts>,
    registry: Registry,
    /// The node's access log, as written.
    log: LogLines,
    /// The stages' view of each enrolled pod of this node, by `namespace/name`.
    pub pods: HashMap<String, Arc<PodContext>>,
    _leases: Vec<CertLease>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    pub(super) async fn start(
        name: &str,
        snapshot: Snapshot,
        ca: Arc<LocalCa>,
        (pool, detection_timeout, access_log, source_relay): (PoolConfig, Duration, bool, bool),
        world: &HashMap<String, Pod>,
    ) -> Node {
        let secrets = SecretManager::new(
            ca,
            CertConfig {
                trust_domain: DEFAULT_TRUST_DOMAIN.into(),
                ttl: Duration::from_secs(3600),
            },
        );
        let log = LogLines::default();
        let access_log =
            access_log.then(|| AccessLog::to_writer(Box::new(log.clone())).expect("access log"));
        let telemetry = Arc::new(Telemetry::new(DEFAULT_TRUST_DOMAIN, access_log));
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
            upstreams: Default::default(),
            breakers: Default::default(),
            balancers: Default::default(),
            protocol_detection_timeout: detection_timeout,
            destination_l7: true,
            source_relay,
            splice: true,
            tracers: crate::trace::Tracers::new(
                tokio::runtime::Handle::current(),
                Default::default(),
            ),
            connections: crate::admin::connections::Connections::new(),
            // These nodes are apart: nothing is handed over in-process.
            local: crate::proxy::local::LocalPods::new(false),
            own_ports: crate::proxy::hbone::target::own_ports([]),
            drain: Default::default(),
        });
        pi.breakers.register(&mut registry);
        pi.tracers.metrics().register(&mut registry);
        pi.balancers.register(&mut registry);
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
                sockets: Arc::new(LoopbackSockets),
                identity: pod.identity(),
                istio: w.istio.clone(),
                baggage: http::HeaderValue::from_str(&crate::node::discovery::baggage(&w)).ok(),
                trace_workload: Default::default(),
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
                    handoff: crate::proxy::accept::Handoff::none(),
                }
                .run(),
            ));
            tasks.push(tokio::spawn(
                Inbound {
                    pi: pi.clone(),
                    pod: ctx.clone(),
                    listener: bind(HBONE_PORT).await,
                    handoff: crate::proxy::accept::Handoff::none(),
                }
                .run(),
            ));
            tasks.push(tokio::spawn(
                InboundPlain {
                    pi: pi.clone(),
                    pod: ctx.clone(),
                    listener: bind(INBOUND_PORT).await,
                    handoff: crate::proxy::accept::Handoff::none(),
                }
                .run(),
            ));
            pods.insert(key, ctx);
        }
        Node {
            name: name.into(),
            log,
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

    /// Every access-log line written so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let bytes = self.log.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let text = String::from_utf8_lossy(&bytes);
        // Whole lines only: the writer may be in the middle of one.
        let whole = text.rsplit_once('\n').map_or("", |(w, _)| w);
        whole
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits for the one access-log line whose fields include `fields` (string values) and
    /// returns it; fails showing the log after [`CEILING`].
    pub async fn wait_log(&self, fields: &[(&str, &str)]) -> serde_json::Value {
        let deadline = Instant::now() + CEILING;
        loop {
            let lines = self.access_log();
            let found: Vec<&serde_json::Value> = lines
                .iter()
                .filter(|l| {
                    fields.iter().all(|(k, v)| match &l[*k] {
                        serde_json::Value::String(s) => s == v,
                        other => {
                            serde_json::from_str::<serde_json::Value>(v).is_ok_and(|w| &w == other)
                        }
                    })
                })
                .collect();
            assert!(
                found.len() <= 1,
                "{fields:?} matches several lines: {found:#?}"
            );
            if let Some(l) = found.first() {
                return (*l).clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {} for an access-log line with {fields:?}; the log is:\n{}",
                self.name,
                lines
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
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
