//! HBONE benchmark: single-stream throughput, connection rate and 1-byte echo latency between a
//! client pod and a server pod on two nodes, in one run, for (a) direct pod-to-pod plaintext,
//! (b) ambit HBONE (mTLS + HTTP/2 CONNECT) through two real agents with a warm pool, and (c) the
//! same with a cold pool (a TLS handshake per connection); plus the agents' CPU per GiB and per
//! connection. Method, numbers and caveats: benches/README.md.
//! Run with `cargo bench -p ambit-agent --bench hbone`.
#![deny(unsafe_code)]

#[path = "common/mod.rs"]
mod common;
#[path = "hbone/json.rs"]
mod json;
#[path = "hbone/measure.rs"]
mod measure;
#[path = "hbone/report.rs"]
mod report;

use std::net::SocketAddr;
use std::time::Instant;

use ambit::harness::{ClusterYaml, LocalAgent, Pod, World};
use common::agents::{self, AMBIT_BIN};
use common::machine::{env_or, first_line, print_machine, raise_fd_limit, require_root};
use common::workload;
use measure::{server_port, Bench, LatPart, PathSetup};
use report::PathResults;
use workload::Kind;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
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

pub struct Config {
    pub conns: usize,
    pub concurrency: usize,
    mib: u64,
    pings: usize,
    runs: usize,
    warmup_conns: usize,
    warmup_mib: u64,
    warmup_pings: usize,
    lat_slices: usize,
    warm_args: String,
    cold_args: String,
}

impl Config {
    fn from_env() -> Config {
        let cfg = Config {
            conns: env_or("AMBIT_BENCH_CONNS", 2_000),
            concurrency: env_or("AMBIT_BENCH_CONCURRENCY", 1),
            mib: env_or("AMBIT_BENCH_MIB", 1024),
            pings: env_or("AMBIT_BENCH_PINGS", 20_000),
            runs: env_or("AMBIT_BENCH_RUNS", 3),
            warmup_conns: env_or("AMBIT_BENCH_WARMUP_CONNS", 200),
            warmup_mib: env_or("AMBIT_BENCH_WARMUP_MIB", 128),
            warmup_pings: env_or("AMBIT_BENCH_WARMUP_PINGS", 2_000),
            lat_slices: env_or("AMBIT_BENCH_LAT_SLICES", 4),
            warm_args: env_or("AMBIT_BENCH_WARM_ARGS", String::new()),
            cold_args: env_or("AMBIT_BENCH_COLD_ARGS", COLD_ARGS.to_string()),
        };
        if !(1..=MAX_RUNS).contains(&cfg.runs)
            || cfg.conns == 0
            || cfg.concurrency == 0
            || cfg.mib == 0
            || cfg.pings == 0
        {
            eprintln!(
                "AMBIT_BENCH_RUNS must be 1..={MAX_RUNS}; CONNS, CONCURRENCY, MIB and PINGS > 0"
            );
            std::process::exit(64);
        }
        cfg
    }
}

fn header(cfg: &Config) {
    let overrides: String = std::env::vars()
        .filter(|(k, _)| k.starts_with("AMBIT_BENCH_"))
        .map(|(k, v)| format!("{k}={v:?} "))
        .collect();
    println!("ambit HBONE benchmark");
    println!("command:  {overrides}cargo bench -p ambit-agent --bench hbone");
    println!("agent:    {AMBIT_BIN}");
    print_machine();
    println!(
        "config:   {} runs; per run and path: {} conns ({} in flight), {} MiB, {} pings in {} \
         slices ({UNTIMED_PINGS} untimed first on each connection); paths in rotated order; \
         warm-up {} conns + {} MiB + {} pings per path (not reported)",
        cfg.runs,
        cfg.conns,
        cfg.concurrency,
        cfg.mib,
        cfg.pings,
        cfg.lat_slices,
        cfg.warmup_conns,
        cfg.warmup_mib,
        cfg.warmup_pings
    );
}

fn main() {
    let cfg = Config::from_env();
    header(&cfg);
    require_root("network namespaces, cgroups, eBPF");
    raise_fd_limit();
    let started = Instant::now();

    // Torn down in reverse order on return or panic: servers, agents (killed, their state dirs
    // removed), then the world (netns, cgroups, bpffs dir, CA).
    let world = World::new("bench-hbone");
    let nodes: Vec<_> = (1..=4).map(|k| world.node(&format!("n{k}"))).collect();
    let pod = |name: &str, node: usize, ns: &str| -> Pod {
        world.pod(name).node(&nodes[node]).namespace(ns).spawn()
    };
    // (a) is not in an ambient namespace: no agent captures it. (b) runs between the warm-pool
    // agents of n1 and n2, (c) between the cold-pool agents of n3 and n4.
    let clients = [
        pod("client-a", 0, "plain"),
        pod("client-b", 0, "mesh"),
        pod("client-c", 2, "mesh"),
    ];
    let servers = [
        pod("server-a", 1, "plain"),
        pod("server-b", 1, "mesh"),
        pod("server-c", 3, "mesh"),
    ];
    let yaml = ClusterYaml::new()
        .ambient("mesh")
        .plain("plain")
        .pods(clients.iter().chain(&servers));
    let agents = vec![
        agents::start(&world, &nodes[0], &cfg.warm_args, &yaml, &[]),
        agents::start(&world, &nodes[1], &cfg.warm_args, &yaml, &[]),
        agents::start(&world, &nodes[2], &cfg.cold_args, &yaml, &[]),
        agents::start(&world, &nodes[3], &cfg.cold_args, &yaml, &[]),
    ];
    agents[0].wait_enrolled(&[&clients[B]]);
    agents[1].wait_enrolled(&[&servers[B]]);
    agents[2].wait_enrolled(&[&clients[C]]);
    agents[3].wait_enrolled(&[&servers[C]]);

    let rounds = cfg.runs + 1;
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

    let labels = [
        "(a) direct pod-to-pod, plaintext",
        "(b) ambit HBONE, warm pool",
        "(c) ambit HBONE, cold pool (TLS per conn)",
    ];
    println!();
    println!(
        "setup (world {}, 4 nodes, {:.1} s):",
        world.prefix(),
        started.elapsed().as_secs_f64()
    );
    for (i, label) in labels.iter().enumerate() {
        println!(
            "  {label}: {} {} ({}, ns {}) -> {} {} ({})",
            clients[i].name(),
            clients[i].ip4(),
            clients[i].node_name(),
            clients[i].namespace(),
            servers[i].name(),
            servers[i].ip4(),
            servers[i].node_name()
        );
    }
    println!(
        "  agents: n1, n2 `{}` (default pool idle timeout 5m = warm pool); n3, n4 `{}` (cold pool)",
        cfg.warm_args, cfg.cold_args
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
    std::thread::sleep(std::time::Duration::from_secs(2));
    let idle: Vec<String> = agents::cpu(&refs)
        .iter()
        .zip(&idle0)
        .map(|(b, a)| format!("{:.1}%", (b - a) * 100.0 / t.elapsed().as_secs_f64()))
        .collect();
    println!(
        "  agent CPU with no traffic (n1..n4, of one CPU): {}",
        idle.join(", ")
    );

    let paths: Vec<PathSetup> = clients
        .iter()
        .zip(&servers)
        .enumerate()
        .map(|(i, (c, s))| PathSetup {
            client: c.clone(),
            server_ip: s.ip4(),
            hbone: match i {
                B => Some((0, 1)),
                C => Some((2, 3)),
                _ => None,
            },
        })
        .collect();
    let bench = Bench { cfg, paths, agents };
    let mut results: Vec<PathResults> = labels.iter().map(|l| PathResults::new(l)).collect();
    let cfg = &bench.cfg;
    for round in 0..rounds {
        let warmup = round == 0;
        let (n, mib, pings) = if warmup {
            (cfg.warmup_conns, cfg.warmup_mib, cfg.warmup_pings)
        } else {
            (cfg.conns, cfg.mib, cfg.pings)
        };
        let name = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {round}/{}", cfg.runs)
        };
        let order = |p: &[usize]| -> Vec<usize> {
            (0..p.len()).map(|i| p[(i + round) % p.len()]).collect()
        };
        let problem =
            |p: &Option<String>| p.as_deref().map(|p| format!("  ! {p}")).unwrap_or_default();
        for path in order(&[A, B, C]) {
            let s = bench.conn_run(round, path, n);
            eprintln!(
                "{name}: {:<44} {:>7.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  TLS/conn {}  \
                 others {:.2} CPU{}",
                labels[path],
                s.rate,
                s.p50_us,
                s.p99_us,
                s.hbone_conns_per_conn
                    .map_or("-".into(), |v| format!("{v:.3}")),
                s.others_cpu,
                problem(&s.problem)
            );
            if !warmup {
                results[path].conn.push(s);
            }
        }
        for path in order(&[A, B, C]) {
            let s = bench.tput_run(round, path, mib);
            eprintln!(
                "{name}: {:<44} {:>7.2} GB/s  agent CPU s/GiB {}  others {:.2} CPU{}",
                labels[path],
                s.gbps,
                s.agent_cpu_s_per_gib
                    .map_or("-".into(), |(c, s)| format!("{c:.2} + {s:.2}")),
                s.others_cpu,
                problem(&s.problem)
            );
            if !warmup {
                results[path].tput.push(s);
            }
        }
        // Latency in slices, (a) and (b) alternating, each slice on a new connection, so that a
        // burst of load from elsewhere lands on both paths rather than on one.
        let slices = cfg.lat_slices.min(pings).max(1);
        let mut parts = [LatPart::default(), LatPart::default()];
        for slice in 0..slices {
            let n_slice = pings / slices + usize::from(slice < pings % slices);
            for path in [(A + round + slice) % 2, (B + round + slice) % 2] {
                parts[path].add(bench.lat_slice(round, path, UNTIMED_PINGS, n_slice));
            }
        }
        for (path, part) in parts.into_iter().enumerate() {
            let s = part.sample();
            eprintln!(
                "{name}: {:<44} p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs  others {:.2} CPU{}",
                labels[path],
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.others_cpu,
                problem(&s.problem)
            );
            if !warmup {
                results[path].lat.push(s);
            }
        }
    }

    report::print(&results, cfg.conns, cfg.concurrency, cfg.mib, cfg.pings);
    let pool = |i: usize| {
        bench.agents[i]
            .status()
            .map(|s| s["pool"].clone())
            .unwrap_or_default()
    };
    let (pool_n1, pool_n3) = (pool(0), pool(2));
    println!();
    println!("pool counters at the end: n1 {pool_n1}");
    println!("                          n3 {pool_n3}");
    println!("load avg: {} (end)", first_line("/proc/loadavg"));
    println!("total time: {:.0} s", started.elapsed().as_secs_f64());
    let pool = serde_json::json!({ "n1": pool_n1, "n3": pool_n3 });
    common::json::write_if_asked(&json::results(cfg, &results, AMBIT_BIN, pool));
}
