//! Where the eBPF path's per-connection cost goes, measured after the timed runs: run time of
//! this bench's capture programs per connection (kernel BPF stats, switched on only for this
//! phase), and the cost of the accept path's original-destination lookup (one bpf syscall).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ambit::proxy::ProxyInputs;
use aya::maps::MapInfo;
use aya::programs::links::LinkType;
use aya::programs::{loaded_links, loaded_programs};
use serde_json::{json, Value};

use crate::measure::Bench;
use crate::{A, B, C, D, E, LABELS, LETTERS};

/// Program run time per connection on each path (BPF stats are on only here, not during the timed
/// runs), packets per connection, and the outbound stage's map lookup. Returns what it printed,
/// for the JSON results.
pub fn run(bench: &Bench, round: usize, skipped: &[bool]) -> Value {
    let n = bench.cfg.conns.min(5_000);
    let mut per_path = Vec::new();
    println!();
    println!(
        "Diagnostics ({n} more connections per path, after the timed runs; not in the results):"
    );
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(stats_on) => {
            // Every attached capture's programs run on every path; (e)'s second set is tagged [e].
            let mut ids = vec![(our_programs(&bench.ambit.pin_dir.join("maps")), "")];
            if let Some(a) = &bench.ambit_e {
                ids.push((our_programs(&a.pin_dir.join("maps")), "[e]"));
            }
            let ids = &ids;
            for path in [A, B, C, D, E].into_iter().filter(|p| !skipped[*p]) {
                let fast0 = bench.ambit_e.as_ref().map(|a| a.kernel_stats());
                let before = snapshot(ids);
                let pkts0 = bench.clients[path].run(tx_packets);
                let part = bench.conn_slice(round, path, n);
                let pkts1 = bench.clients[path].run(tx_packets);
                let after = snapshot(ids);
                let fast1 = bench.ambit_e.as_ref().map(|a| a.kernel_stats());
                let mut figures = print_program_costs(LABELS[path], &before, &after, n);
                let lo = (pkts1.0 - pkts0.0) as f64 / n as f64;
                let eth0 = (pkts1.1 - pkts0.1) as f64 / n as f64;
                println!(
                    "    packets sent per connection in the client pod: lo {lo:.2}, eth0 {eth0:.2}"
                );
                let mut redirects = None;
                if let (E, Some(k0), Some(k1)) = (path, fast0, fast1) {
                    let r = (k1.fast_path_redirects - k0.fast_path_redirects) as f64 / n as f64;
                    println!("    sk_msg redirects per connection: {r:.2}");
                    redirects = Some(r);
                }
                if let Some(p) = &part.problem {
                    println!("    ! {p}");
                }
                crate::common::json::merge(
                    &mut figures,
                    json!({
                        "path": LETTERS[path].to_string(),
                        "lo_packets_per_conn": lo,
                        "eth0_packets_per_conn": eth0,
                        "sk_msg_redirects_per_conn": redirects,
                        "problem": part.problem,
                    }),
                );
                per_path.push(figures);
            }
            drop(stats_on);
        }
        Err(e) => println!("  BPF run-time stats unavailable: {e}"),
    }
    let take = orig_dst_take_cost(&bench.ambit.pi, 20_000);
    println!(
        "  (d) outbound stage: OrigDstTable::take, one bpf syscall per connection: {:.2} µs/call \
         (timed on a miss)",
        take.as_secs_f64() * 1e6
    );
    json!({
        "conns_per_path": n,
        "paths": per_path,
        "orig_dst_take_us": take.as_secs_f64() * 1e6,
    })
}

/// Per program name: (runs, run time).
pub type ProgStats = BTreeMap<String, (u64, Duration)>;

/// IDs of the programs that use a map pinned in `maps_dir`: this bench's capture programs, and not
/// those of agents other tests may be running (same names, other maps).
pub fn our_programs(maps_dir: &Path) -> Vec<u32> {
    let map_ids: Vec<u32> = std::fs::read_dir(maps_dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| MapInfo::from_pin(e.path()).ok())
                .map(|m| m.id())
                .collect()
        })
        .unwrap_or_default();
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            p.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.iter().any(|id| map_ids.contains(id)))
        })
        .map(|p| p.id())
        .collect()
}

/// Run counts and times of the programs in `sets` (program IDs, and a tag appended to their names).
pub fn snapshot(sets: &[(Vec<u32>, &str)]) -> ProgStats {
    let mut out = ProgStats::new();
    for p in loaded_programs().filter_map(Result::ok) {
        for (ids, tag) in sets {
            if ids.contains(&p.id()) {
                let name = format!("{}{tag}", p.name_as_str().unwrap_or("?"));
                let e = out.entry(name).or_insert((0, Duration::ZERO));
                e.0 += p.run_count();
                e.1 += p.run_time();
            }
        }
    }
    out
}

/// Prints runs per connection and ns per run for each program between two snapshots, and returns
/// them.
pub fn print_program_costs(
    label: &str,
    before: &ProgStats,
    after: &ProgStats,
    conns: usize,
) -> Value {
    let mut total_ns = 0.0;
    let mut parts = Vec::new();
    let mut programs = serde_json::Map::new();
    for (name, (runs, time)) in after {
        let (runs0, time0) = before.get(name).copied().unwrap_or_default();
        let (runs, ns) = (runs - runs0, (*time - time0).as_nanos() as f64);
        if runs == 0 {
            continue;
        }
        total_ns += ns;
        programs.insert(
            name.clone(),
            json!({"runs_per_conn": runs as f64 / conns as f64, "ns_per_run": ns / runs as f64}),
        );
        parts.push(format!(
            "{name} {:.1} runs/conn x {:.0} ns",
            runs as f64 / conns as f64,
            ns / runs as f64
        ));
    }
    println!(
        "  {label}: {:.2} µs/conn in ambit's programs ({})",
        total_ns / 1e3 / conns as f64,
        if parts.is_empty() {
            "none ran".to_string()
        } else {
            parts.join(", ")
        }
    );
    json!({
        "program_us_per_conn": total_ns / 1e3 / conns as f64,
        "programs": programs,
    })
}

/// The outbound stage's per-connection lookup (`OrigDstTable::take`, BPF_MAP_LOOKUP_AND_DELETE_ELEM)
/// timed on a key that is not there, which walks the same syscall path.
pub fn orig_dst_take_cost(pi: &ProxyInputs, calls: u32) -> Duration {
    let a = SocketAddr::from(([127, 0, 0, 1], 1));
    let start = Instant::now();
    for _ in 0..calls {
        let _ = pi.orig_dst.take(0, a, a);
    }
    start.elapsed() / calls
}

/// Packets sent on `lo` and `eth0` of the current thread's netns (call inside the pod).
pub fn tx_packets() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    let mut out = (0, 0);
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit: bytes packets ...
        let tx = rest
            .split_whitespace()
            .nth(9)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match name.trim() {
            "lo" => out.0 = tx,
            "eth0" => out.1 = tx,
            _ => {}
        }
    }
    out
}

/// cgroup BPF links on the machine whose program is not one of `ours`: other agents' capture
/// programs (e.g. from tests running meanwhile), which run on every connect here too.
pub fn foreign_cgroup_links(ours: &[u32]) -> usize {
    loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.link_type().is_ok_and(|t| t == LinkType::Cgroup))
        .filter(|l| !ours.contains(&l.program_id()))
        .count()
}

/// Program IDs of every capture this bench installed.
pub fn all_our_programs(bench: &Bench) -> Vec<u32> {
    let mut ids = our_programs(&bench.ambit.pin_dir.join("maps"));
    if let Some(a) = &bench.ambit_e {
        ids.extend(our_programs(&a.pin_dir.join("maps")));
    }
    ids
}
