//! HBONE benchmark (issue 14): between a client pod and a server pod, in one run, for (a) direct
//! pod-to-pod across nodes, (b) ambit HBONE (mTLS + HTTP/2 CONNECT) across nodes with a warm
//! pool, (c) the same with a cold pool (a TLS handshake per connection), (d) ambit with both pods
//! on one node (HBONE to itself, or the agent's same-node shortcut) and (e) direct on one node:
//! new connections/s (16 in flight, and one at a time), throughput over one and over 4 streams,
//! HTTP/1.1 requests/s over 1 and 64 connections (h2load against a hyper server), 64-byte echo
//! latency, and the agents' CPU per connection, per GB and per request; ratios against direct
//! and issue 14's targets. Method, numbers and caveats: benches/README.md.
//! Run with `cargo bench -p ambit-agent --bench hbone`.
#![deny(unsafe_code)]

#[path = "common/mod.rs"]
mod common;
#[path = "hbone/figures.rs"]
mod figures;
#[path = "hbone/json.rs"]
mod json;
#[path = "hbone/measure.rs"]
mod measure;
#[path = "hbone/report.rs"]
mod report;
#[path = "hbone/rounds.rs"]
mod rounds;
#[path = "hbone/samples.rs"]
mod samples;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use common::agents::{self, AMBIT_BIN};
use common::machine::{env_or, first_line, print_machine, raise_fd_limit, require_root};
use common::{http_server, tools, workload};
use measure::{server_port, Bench, Measures, PathSetup, HTTP_PORT};
use samples::PathResults;
use workload::Kind;

const MAX_RUNS: usize = 50;
/// Client write size and server read size for the throughput test.
const CHUNK: usize = 1024 * 1024;
/// Round trips at the start of each latency connection that are not timed.
const UNTIMED_PINGS: usize = 200;
/// The cold-pool agents' extra flags: close an HBONE connection when its last stream ends, and
/// put one stream on each. The idle timeout alone is not enough: the client's next connection
/// arrives while the previous stream is still closing and rides on its connection (measured: 0.03
/// TLS connections per app connection with `--pool-idle-timeout 0s` alone).
const COLD_ARGS: &str = "--pool-idle-timeout 0s --pool-max-streams 1";
const ALL_PATHS: &str = "abcde";

pub struct Config {
    pub paths: String,
    pub conns: usize,
    pub concurrency: usize,
    pub seq_conns: usize,
    pub mib: u64,
    pub streams: usize,
    pub http_seconds: f64,
    pub http_warmup_s: f64,
    pub http_conns: usize,
    pub h2load_threads: usize,
    pub pings: usize,
    pub ping_bytes: usize,
    pub runs: usize,
    pub warmup_conns: usize,
    pub warmup_mib: u64,
    pub warmup_pings: usize,
    pub warmup_http_seconds: f64,
    pub lat_slices: usize,
    pub warm_args: String,
    pub cold_args: String,
    pub same_node_args: String,
}

impl Config {
    fn from_env() -> Config {
        let cfg = Config {
            paths: env_or("AMBIT_BENCH_PATHS", ALL_PATHS.to_string()),
            conns: env_or("AMBIT_BENCH_CONNS", 2_000),
            concurrency: env_or("AMBIT_BENCH_CONCURRENCY", 16),
            seq_conns: env_or("AMBIT_BENCH_SEQ_CONNS", 1_000),
            mib: env_or("AMBIT_BENCH_MIB", 1024),
            streams: env_or("AMBIT_BENCH_STREAMS", 4),
            http_seconds: env_or("AMBIT_BENCH_HTTP_SECONDS", 2.0),
            http_warmup_s: env_or("AMBIT_BENCH_HTTP_WARMUP_SECONDS", 0.25),
            http_conns: env_or("AMBIT_BENCH_HTTP_CONNS", 64),
            h2load_threads: env_or("AMBIT_BENCH_H2LOAD_THREADS", 1),
            pings: env_or("AMBIT_BENCH_PINGS", 10_000),
            ping_bytes: env_or("AMBIT_BENCH_PING_BYTES", 64),
            runs: env_or("AMBIT_BENCH_RUNS", 3),
            warmup_conns: env_or("AMBIT_BENCH_WARMUP_CONNS", 200),
            warmup_mib: env_or("AMBIT_BENCH_WARMUP_MIB", 128),
            warmup_pings: env_or("AMBIT_BENCH_WARMUP_PINGS", 2_000),
            warmup_http_seconds: env_or("AMBIT_BENCH_WARMUP_HTTP_SECONDS", 0.5),
            lat_slices: env_or("AMBIT_BENCH_LAT_SLICES", 4),
            warm_args: env_or("AMBIT_BENCH_WARM_ARGS", String::new()),
            cold_args: env_or("AMBIT_BENCH_COLD_ARGS", COLD_ARGS.to_string()),
            same_node_args: env_or("AMBIT_BENCH_SAME_NODE_ARGS", String::new()),
        };
        let bad = !(1..=MAX_RUNS).contains(&cfg.runs)
            || cfg.conns == 0
            || cfg.concurrency == 0
            || cfg.mib == 0
            || cfg.streams == 1
            || cfg.pings == 0
            || !(1..=4096).contains(&cfg.ping_bytes)
            || cfg.http_seconds < 0.0
            || cfg.http_warmup_s < 0.0
            || cfg.warmup_http_seconds < 0.0
            || cfg.http_conns < 2
            || cfg.h2load_threads == 0
            || cfg.paths.is_empty()
            || !cfg.paths.chars().all(|c| ALL_PATHS.contains(c));
        if bad {
            eprintln!(
                "AMBIT_BENCH_RUNS must be 1..={MAX_RUNS}; CONNS, CONCURRENCY, MIB, PINGS, \
                 H2LOAD_THREADS > 0; STREAMS 0 (skip) or >= 2; HTTP_CONNS >= 2; PING_BYTES \
                 1..=4096; HTTP_SECONDS (0 skips), HTTP_WARMUP_SECONDS, WARMUP_HTTP_SECONDS >= 0; \
                 PATHS letters of {ALL_PATHS}"
            );
            std::process::exit(64);
        }
        cfg
    }
}

fn header(cfg: &Config, h2load: Option<&std::path::Path>) {
    let overrides: String = std::env::vars()
        .filter(|(k, _)| k.starts_with("AMBIT_BENCH_"))
        .map(|(k, v)| format!("{k}={v:?} "))
        .collect();
    println!("ambit HBONE benchmark");
    println!("command:  {overrides}cargo bench -p ambit-agent --bench hbone");
    println!("agent:    {AMBIT_BIN}");
    if let Some(h) = h2load {
        println!(
            "h2load:   {} ({})",
            h.display(),
            tools::version(&h.to_path_buf(), "--version")
        );
    }
    print_machine();
    println!(
        "config:   paths {}; {} runs after a warm-up round; per run and path: {} conns ({} in \
         flight) and {} one at a time; {} MiB over 1 and over {} streams; HTTP {} s over 1 and \
         {} conns; {} pings of {} bytes in {} slices ({UNTIMED_PINGS} untimed first on each \
         connection); paths in rotated order; warm-up {} conns + {} MiB + {} pings + {} s HTTP \
         per path (not reported)",
        cfg.paths,
        cfg.runs,
        cfg.conns,
        cfg.concurrency,
        cfg.seq_conns,
        cfg.mib,
        cfg.streams,
        cfg.http_seconds,
        cfg.http_conns,
        cfg.pings,
        cfg.ping_bytes,
        cfg.lat_slices,
        cfg.warmup_conns,
        cfg.warmup_mib,
        cfg.warmup_pings,
        cfg.warmup_http_seconds.min(cfg.http_seconds)
    );
}

/// Path letter → label, nodes of client and server (indices into the five nodes), namespace,
/// and what is measured on it.
const PATHS: [(char, &str, usize, usize, &str, Measures); 5] = {
    const ALL: Measures = Measures {
        tput_par: true,
        http: true,
        lat: true,
    };
    // The cold pool differs from the warm one per connection only.
    const CONN_ONLY: Measures = Measures {
        tput_par: false,
        http: false,
        lat: false,
    };
    [
        ('a', "(a) direct pod-to-pod, cross-node", 0, 1, "plain", ALL),
        (
            'b',
            "(b) ambit HBONE cross-node, warm pool",
            0,
            1,
            "mesh",
            ALL,
        ),
        (
            'c',
            "(c) ambit HBONE cross-node, cold pool",
            2,
            3,
            "mesh",
            CONN_ONLY,
        ),
        ('d', "(d) ambit same node", 4, 4, "mesh", ALL),
        ('e', "(e) direct pod-to-pod, same node", 4, 4, "plain", ALL),
    ]
};

fn main() {
    let cfg = Config::from_env();
    require_root("network namespaces, cgroups, eBPF");
    let h2load = (cfg.http_seconds > 0.0).then(|| tools::ensure("h2load", "nghttp2-client"));
    header(&cfg, h2load.as_deref());
    raise_fd_limit();
    let started = Instant::now();

    // Torn down in reverse order on return or panic: servers, agents (killed, their state dirs
    // removed), then the world (netns, cgroups, bpffs dir, CA).
    let world = World::new("bench-hbone");
    let nodes: Vec<_> = (1..=5).map(|k| world.node(&format!("n{k}"))).collect();
    let chosen: Vec<_> = PATHS.iter().filter(|p| cfg.paths.contains(p.0)).collect();
    // `plain` is not ambient: no agent captures the direct paths' pods. (b) runs between the
    // warm-pool agents of n1 and n2, (c) between the cold-pool agents of n3 and n4, (d) and (e)
    // on n5.
    let pods: Vec<(Pod, Pod)> = chosen
        .iter()
        .map(|&&(l, _, cn, sn, ns, _)| {
            let pod = |role: &str, node: usize| {
                world
                    .pod(&format!("{role}-{l}"))
                    .node(&nodes[node])
                    .namespace(ns)
                    .spawn()
            };
            (pod("client", cn), pod("server", sn))
        })
        .collect();
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods(pods.iter().flat_map(|(c, s)| [c, s]));
    let args = [
        &cfg.warm_args,
        &cfg.warm_args,
        &cfg.cold_args,
        &cfg.cold_args,
        &cfg.same_node_args,
    ];
    let agents: Vec<LocalAgent> = nodes
        .iter()
        .zip(args)
        .map(|(n, a)| agents::start(&world, n, a, &yaml, &[]))
        .collect();
    // Each agent enrols exactly the mesh pods on its node (both on n5).
    let mut enrolled: Vec<Vec<&Pod>> = vec![Vec::new(); agents.len()];
    for (p, (c, s)) in chosen.iter().zip(&pods) {
        if p.4 == "mesh" {
            enrolled[p.2].push(c);
            enrolled[p.3].push(s);
        }
    }
    for (a, pods) in agents.iter().zip(&enrolled) {
        a.wait_enrolled(pods);
    }

    let rounds = cfg.runs + 1;
    let servers: Vec<&Pod> = pods.iter().map(|(_, s)| s).collect();
    let _apps: Vec<workload::Server> = servers
        .iter()
        .map(|s| {
            let ports = (0..rounds)
                .flat_map(|round| {
                    Kind::ALL.map(|k| (SocketAddr::from((s.ip4(), server_port(round, k))), k))
                })
                .collect();
            workload::Server::start(s.netns_path(), ports, CHUNK)
        })
        .collect();
    let _http = h2load
        .is_some()
        .then(|| http_server::Servers::start(&servers, &[HTTP_PORT]));

    println!();
    println!(
        "setup (world {}, 5 nodes, {:.1} s):",
        world.prefix(),
        started.elapsed().as_secs_f64()
    );
    for (p, (c, s)) in chosen.iter().zip(&pods) {
        println!(
            "  {}: {} {} ({}, ns {}) -> {} {} ({})",
            p.1,
            c.name(),
            c.ip4(),
            c.node_name(),
            c.namespace(),
            s.name(),
            s.ip4(),
            s.node_name()
        );
    }
    println!(
        "  agents: n1, n2 `{}` (default pool idle timeout 5m = warm pool); n3, n4 `{}` (cold \
         pool); n5 `{}` (same node)",
        cfg.warm_args, cfg.cold_args, cfg.same_node_args
    );
    let pids: Vec<String> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("n{} {}", i + 1, a.pid().unwrap_or(0)))
        .collect();
    println!("  agent pids: {}", pids.join(", "));
    // What the agents cost with no traffic (the harness runs them with `--poll-ms 50`: config
    // poll and status file every 50 ms); this runs during every measurement too.
    let refs: Vec<&LocalAgent> = agents.iter().collect();
    let idle0 = agents::cpu(&refs);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<String> = agents::cpu(&refs)
        .iter()
        .zip(&idle0)
        .map(|(b, a)| format!("{:.1}%", (b - a) * 100.0 / t.elapsed().as_secs_f64()))
        .collect();
    println!(
        "  agent CPU with no traffic (n1..n5, of one CPU): {}",
        idle.join(", ")
    );

    let paths: Vec<PathSetup> = chosen
        .iter()
        .zip(&pods)
        .map(
            |(&&(letter, label, cn, sn, ns, measures), (c, s))| PathSetup {
                letter,
                label,
                client: c.clone(),
                server_ip: s.ip4(),
                agents: (ns == "mesh").then_some((cn, sn)),
                measures,
            },
        )
        .collect();
    let mut results: Vec<PathResults> = paths
        .iter()
        .map(|p| PathResults::new(p.letter, p.label, p.one_agent()))
        .collect();
    let bench = Bench {
        cfg,
        paths,
        agents,
        h2load,
    };
    rounds::run(&bench, &mut results);

    let cfg = &bench.cfg;
    report::print(&results, cfg);
    let pool = |i: usize| {
        bench.agents[i]
            .status()
            .map(|s| s["pool"].clone())
            .unwrap_or_default()
    };
    let (pool_n1, pool_n3, pool_n5) = (pool(0), pool(2), pool(4));
    println!();
    println!("pool counters at the end: n1 {pool_n1}");
    println!("                          n3 {pool_n3}");
    println!("                          n5 {pool_n5}");
    println!("load avg: {} (end)", first_line("/proc/loadavg"));
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
    let pool = serde_json::json!({ "n1": pool_n1, "n3": pool_n3, "n5": pool_n5 });
    common::json::write_if_asked(&json::results(cfg, &results, AMBIT_BIN, pool));
}
