//! The warm-up round and the measured runs: every measurement on every path that takes it, the
//! paths in an order rotated each round, each sample printed as it comes (stderr).

use crate::measure::{Bench, LatPart};
use crate::samples::{AgentCpu, Meta, PathResults};
use crate::UNTIMED_PINGS;

fn problem(m: &Meta) -> String {
    m.problem
        .as_deref()
        .map(|p| format!("  ! {p}"))
        .unwrap_or_default()
}

fn cpu(c: Option<AgentCpu>, prec: usize) -> String {
    c.map_or("-".into(), |c| c.text(prec))
}

/// Runs the warm-up round and `cfg.runs` runs, adding the runs' samples to `results` (one per
/// path of the bench, in its order).
pub fn run(bench: &Bench, results: &mut [PathResults]) {
    let cfg = &bench.cfg;
    for round in 0..=cfg.runs {
        let warmup = round == 0;
        let name = if warmup {
            "warm-up".to_string()
        } else {
            format!("run {round}/{}", cfg.runs)
        };
        let (conns, seq_conns, mib, pings, http_s) = if warmup {
            (
                cfg.warmup_conns,
                cfg.seq_conns.min(cfg.warmup_conns),
                cfg.warmup_mib,
                cfg.warmup_pings,
                cfg.warmup_http_seconds.min(cfg.http_seconds),
            )
        } else {
            (
                cfg.conns,
                cfg.seq_conns,
                cfg.mib,
                cfg.pings,
                cfg.http_seconds,
            )
        };
        // The paths that take a measurement, in this round's order.
        let order = |takes: &dyn Fn(usize) -> bool| -> Vec<usize> {
            let p: Vec<usize> = (0..bench.paths.len()).filter(|&i| takes(i)).collect();
            (0..p.len()).map(|i| p[(i + round) % p.len()]).collect()
        };
        let label = |i: usize| bench.paths[i].label;
        let measures = |i: usize| bench.paths[i].measures;

        for (n, in_flight, seq) in [(conns, cfg.concurrency, false), (seq_conns, 1, true)] {
            if n == 0 {
                continue;
            }
            for i in order(&|_| true) {
                let s = bench.conn_run(round, i, n, in_flight);
                eprintln!(
                    "{name}: {:<44} {in_flight:>2} in flight {:>7.0} conn/s  p50 {:>6.0} µs  \
                     p99 {:>6.0} µs  TLS/conn {}  agent CPU µs/conn {}  others {:.2} CPU{}",
                    label(i),
                    s.rate,
                    s.p50_us,
                    s.p99_us,
                    s.hbone_conns_per_conn
                        .map_or("-".into(), |v| format!("{v:.3}")),
                    cpu(s.agent_cpu_us, 0),
                    s.meta.others_cpu,
                    problem(&s.meta)
                );
                if !warmup {
                    if seq {
                        results[i].conn_seq.push(s);
                    } else {
                        results[i].conn.push(s);
                    }
                }
            }
        }

        for streams in [1, cfg.streams] {
            if streams == 0 {
                continue;
            }
            let par = streams > 1;
            for i in order(&|i| !par || measures(i).tput_par) {
                let s = bench.tput_run(round, i, mib, streams);
                eprintln!(
                    "{name}: {:<44} {streams} stream(s) {:>6.2} GB/s  agent CPU s/GB {}  \
                     others {:.2} CPU{}",
                    label(i),
                    s.gbps,
                    cpu(s.agent_cpu_s_per_gb, 2),
                    s.meta.others_cpu,
                    problem(&s.meta)
                );
                if !warmup {
                    if par {
                        results[i].tput_par.push(s);
                    } else {
                        results[i].tput.push(s);
                    }
                }
            }
        }

        if http_s > 0.0 {
            for http_conns in [1, cfg.http_conns] {
                for i in order(&|i| measures(i).http) {
                    let s = bench.http_run(i, http_conns, http_s, cfg.http_warmup_s);
                    eprintln!(
                        "{name}: {:<44} HTTP {http_conns:>3} conn(s) {:>8.0} req/s  {:>8} \
                         requests  agent CPU µs/req {}  server side L7 {}  others {:.2} CPU{}",
                        label(i),
                        s.req_per_s,
                        s.requests,
                        cpu(s.agent_cpu_us, 1),
                        s.dest_l7.map_or("-", |l7| if l7 { "yes" } else { "no" }),
                        s.meta.others_cpu,
                        problem(&s.meta)
                    );
                    if !warmup {
                        if http_conns == 1 {
                            results[i].http_one.push(s);
                        } else {
                            results[i].http_many.push(s);
                        }
                    }
                }
            }
        }

        // Latency in slices, the paths taking turns, each slice on a new connection, so that a
        // burst of load from elsewhere lands on all paths rather than on one.
        let lat_paths: Vec<usize> = (0..bench.paths.len())
            .filter(|&i| measures(i).lat)
            .collect();
        let slices = cfg.lat_slices.min(pings).max(1);
        let mut parts: Vec<LatPart> = lat_paths.iter().map(|_| LatPart::default()).collect();
        for slice in 0..slices {
            let n_slice = pings / slices + usize::from(slice < pings % slices);
            for k in 0..lat_paths.len() {
                let at = (k + round + slice) % lat_paths.len();
                let part =
                    bench.lat_slice(round, lat_paths[at], UNTIMED_PINGS, n_slice, cfg.ping_bytes);
                parts[at].add(part);
            }
        }
        for (k, part) in parts.into_iter().enumerate() {
            let i = lat_paths[k];
            let s = part.sample();
            eprintln!(
                "{name}: {:<44} {}-byte echo p50 {:>6.1} µs  p99 {:>6.1} µs  p99.9 {:>6.1} µs  \
                 others {:.2} CPU{}",
                label(i),
                cfg.ping_bytes,
                s.p50_us,
                s.p99_us,
                s.p999_us,
                s.meta.others_cpu,
                problem(&s.meta)
            );
            if !warmup {
                results[i].lat.push(s);
            }
        }
    }
}
