//! The node agents as the benches see them: started from the `ambit` cargo built for the bench,
//! their CPU time and RSS from /proc, and the counters of their status files that show which way
//! each measured connection went.

use std::path::Path;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Node, World};
use serde_json::Value;

use crate::common::counters::counters;

/// The agent binary cargo built for this bench (bench profile, like the bench itself).
pub const AMBIT_BIN: &str = env!("CARGO_BIN_EXE_ambit");

/// Starts the agent of `node` with the extra flags `args` (split on whitespace), `yaml` as its
/// `cluster.yaml`, and each of `files` (name, YAML text) beside it in its config directory.
pub fn start(
    world: &World,
    node: &Node,
    args: &str,
    yaml: &ClusterYaml,
    files: &[(&str, &str)],
) -> LocalAgent {
    let mut a = args.split_whitespace().fold(
        LocalAgent::new(world, node, Path::new(AMBIT_BIN)),
        |a, arg| a.arg(arg),
    );
    let dir = a.config_dir();
    yaml.write(&dir);
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    a.start(world);
    a
}

counters! {
    /// Counters of one agent (status file: `proxy.*`, `pool.*`).
    pub struct Counters {
        pub outbound_accepted,
        pub outbound_hbone,
        pub outbound_plaintext,
        pub inbound_accepted,
        /// TLS connections accepted on 15008.
        pub hbone_inbound_accepted,
        pub hbone_inbound_streams,
        pub pool_connections_opened,
        pub pool_streams_opened,
        pub pool_streams_reused,
        /// Outbound connections served at L7 (HTTP routed per request).
        pub outbound_http,
        /// HTTP requests received from enrolled pods' apps.
        pub http_requests,
        /// HTTP/1.1 requests routed at the source and relayed as bytes (`passthrough::source`).
        pub http_outbound_relayed,
        /// HTTP requests the proxy answered itself (no route, no endpoint, upstream failure...).
        pub http_local_replies,
        /// Every failure counter summed: connect and tunnel failures, refusals, resets.
        pub failures,
        /// Relays that ended in a reset (also in `failures`): a client that closes with a
        /// response in flight (h2load at the end of a timed run) makes one.
        pub relays_reset,
    }
}

impl Counters {
    fn from_status(s: &Value) -> Counters {
        let get = |path: &str| -> u64 {
            path.split('.')
                .fold(s, |v, k| &v[k])
                .as_u64()
                .unwrap_or_else(|| panic!("status has no counter {path}: {s}"))
        };
        let failures = [
            "proxy.outbound_orig_dst_missing",
            "proxy.outbound_connect_failed",
            "proxy.inbound_connect_failed",
            "proxy.outbound_no_endpoints",
            "proxy.outbound_hbone_failed",
            "proxy.hbone_tls_refused",
            "proxy.hbone_inbound_bad_request",
            "proxy.inbound_denied",
            "proxy.relays_reset",
            "pool.connect_failed",
        ]
        .iter()
        .map(|p| get(p))
        .sum();
        Counters {
            outbound_accepted: get("proxy.outbound_accepted"),
            outbound_hbone: get("proxy.outbound_hbone"),
            outbound_plaintext: get("proxy.outbound_plaintext"),
            inbound_accepted: get("proxy.inbound_accepted"),
            hbone_inbound_accepted: get("proxy.hbone_inbound_accepted"),
            hbone_inbound_streams: get("proxy.hbone_inbound_streams"),
            pool_connections_opened: get("pool.connections_opened"),
            pool_streams_opened: get("pool.streams_opened"),
            pool_streams_reused: get("pool.streams_reused"),
            // Absent from agents older than the L7 path (0 there, which the l7 bench's checks
            // reject; the hbone bench expects 0).
            outbound_http: s["proxy"]["outbound_http"].as_u64().unwrap_or(0),
            http_requests: s["proxy"]["http_requests"].as_u64().unwrap_or(0),
            http_local_replies: s["proxy"]["http_local_replies"].as_u64().unwrap_or(0),
            http_outbound_relayed: s["proxy"]["http_outbound_relayed"].as_u64().unwrap_or(0),
            failures,
            relays_reset: get("proxy.relays_reset"),
        }
    }
}

/// The sum over every label set of a counter in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The counters of every agent, each from a status written after this call began (two writes
/// later, as `LocalAgent::fresh_status`, but waiting for all agents at once).
pub fn counters(agents: &[&LocalAgent]) -> Vec<Counters> {
    let seqs: Vec<u64> = agents
        .iter()
        .map(|a| a.status().as_ref().map_or(0, seq))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out: Vec<Option<Counters>> = vec![None; agents.len()];
    while out.iter().any(Option::is_none) {
        for (i, a) in agents.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if let Some(s) = a.status().filter(|s| seq(s) >= seqs[i] + 2) {
                out[i] = Some(Counters::from_status(&s));
            }
        }
        if Instant::now() > deadline {
            let stuck = agents
                .iter()
                .zip(&out)
                .find(|(_, c)| c.is_none())
                .map(|(a, _)| a.log_tail())
                .unwrap_or_default();
            panic!("an agent wrote no fresh status within 10 s\n{stuck}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    out.into_iter().flatten().collect()
}

fn seq(s: &Value) -> u64 {
    s["seq"].as_u64().unwrap_or(0)
}

/// Clock ticks per second of /proc/<pid>/stat times.
fn clock_ticks() -> f64 {
    use nix::unistd::{sysconf, SysconfVar};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// User + system CPU seconds of a process so far (all its threads), from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name, which is in parentheses and may contain spaces: the first
    // is field 3 (state); utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.iter().sum::<u64>() as f64 / clock_ticks()
}

/// Resident set size of a process now, in bytes (`VmRSS` of /proc/<pid>/status); 0 when it is
/// gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds of each agent so far.
pub fn cpu(agents: &[&LocalAgent]) -> Vec<f64> {
    agents
        .iter()
        .map(|a| cpu_seconds(a.pid().expect("agent is running")))
        .collect()
}
