//! The status file (`--status-file`): what the agent is doing, as JSON, written atomically on every
//! control-loop tick. The tests and the demo read it; everything in it a user can also see lives in
//! `/metrics` and the log, from the same values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::admin::problems::Problem;
use crate::config::kube::KindCounters;
use crate::config::Kind;
use crate::node::Node;
use crate::proxy::hbone::PoolStats;
use crate::proxy::{Counters, ProxyInputs};

#[derive(Debug, serde::Serialize)]
pub struct Status<'a> {
    pub node: &'a str,
    /// Increments on every write, so a reader can wait for a status newer than an event.
    pub seq: u64,
    pub generation: u64,
    /// Whether `/healthz/ready` answers 200, and why not.
    pub ready: bool,
    pub readiness: Option<String>,
    /// Kinds the config source has listed (all of them make a complete view).
    pub synced: Vec<Kind>,
    /// The Kubernetes source's per-kind state and counters (`--kube` only).
    pub kube: Option<BTreeMap<Kind, KindCounters>>,
    pub pods: Vec<crate::node::PodStatus>,
    /// Every current problem, one message each (the same list `/metrics` and the log report).
    pub config_errors: Vec<String>,
    /// The same problems with what each is about.
    pub problems: &'a [Problem],
    /// Objects rejected since start (each also logged with its kind/namespace/name and field).
    pub config_rejected_total: u64,
    pub kernel: crate::ebpf::KernelStats,
    pub maps: BTreeMap<&'static str, usize>,
    pub netns_links: Vec<u64>,
    pub proxy: &'a Counters,
    /// HBONE client pool counters, and the connections open now.
    pub pool: &'a PoolStats,
    pub pool_connections: usize,
    pub certs: crate::identity::CertStats,
    /// Per cluster, the endpoints outlier detection ejected and its counters.
    pub outlier_ejections: Vec<crate::proxy::http::balance::ClusterEjections>,
}

/// Map sizes and when they were counted: counting walks every bucket of every hash map (a
/// syscall per key, and an empty 64K-bucket LRU map is a full scan), which every 50 ms stalled
/// the data path measurably (p99 latency). Counted again after every reconcile (new generation)
/// and otherwise once a second.
#[derive(Default)]
pub(super) struct MapSizes(Option<(Instant, u64, BTreeMap<&'static str, usize>)>);

const MAP_SIZES_EVERY: Duration = Duration::from_secs(1);

impl MapSizes {
    fn get(&mut self, node: &Node, generation: u64) -> BTreeMap<&'static str, usize> {
        if self
            .0
            .as_ref()
            .is_none_or(|(at, g, _)| *g != generation || at.elapsed() >= MAP_SIZES_EVERY)
        {
            self.0 = Some((Instant::now(), generation, node.capture().map_sizes()));
        }
        self.0
            .as_ref()
            .map(|(_, _, m)| m.clone())
            .unwrap_or_default()
    }
}

/// What the control loop knows at the end of a tick, for the status file.
pub(super) struct Snapshot<'a> {
    pub node_name: &'a str,
    pub seq: u64,
    pub generation: u64,
    pub readiness: &'a Result<(), String>,
    pub synced: Vec<Kind>,
    pub kube: Option<BTreeMap<Kind, KindCounters>>,
    pub problems: &'a [Problem],
    pub rejected_total: u64,
}

/// Writes the status to `path` (atomically: a temporary file renamed over it).
pub(super) fn write(
    path: &Path,
    now: Snapshot<'_>,
    node: &Node,
    pi: &ProxyInputs,
    map_sizes: &mut MapSizes,
) {
    let status = Status {
        node: now.node_name,
        seq: now.seq,
        generation: now.generation,
        ready: now.readiness.is_ok(),
        readiness: now.readiness.as_ref().err().cloned(),
        synced: now.synced,
        kube: now.kube,
        pods: node.pods(),
        config_errors: now.problems.iter().map(|p| p.message.clone()).collect(),
        problems: now.problems,
        config_rejected_total: now.rejected_total,
        kernel: node.capture().kernel_stats(),
        maps: map_sizes.get(node, now.generation),
        netns_links: node.capture().netns_links(),
        proxy: &pi.counters,
        pool: pi.pool.stats(),
        pool_connections: pi.pool.connections(),
        certs: pi.secrets.stats(),
        outlier_ejections: pi.balancers.ejections(),
    };
    let Ok(json) = serde_json::to_vec_pretty(&status) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .is_err()
    {
        warn!(path = %path.display(), "cannot write status file");
    }
}
