//! The HBONE bench's results as one JSON object (`AMBIT_BENCH_JSON`): every figure the tables
//! print, unrounded, plus each run's samples and the agent binary the bench started.

use serde_json::{json, Value};

use crate::common::json::{header, med, merge, num};
use crate::common::stats::median;
use crate::report::{self, ConnSample, LatSample, PathResults, TputSample};
use crate::Config;

/// Path letters, in the order of the results.
const LETTERS: [&str; 3] = ["a", "b", "c"];

/// The whole result. `agent_bin` is the `ambit` the agents ran (`CARGO_BIN_EXE_ambit` of the tree
/// this bench was built from); `pool` the counters printed at the end.
pub fn results(cfg: &Config, results: &[PathResults], agent_bin: &str, pool: Value) -> Value {
    let mut out = header("hbone");
    let added = report::added_latency(results);
    let (others_median, others_max) = report::noise(results);
    let problems: Vec<String> = report::all_problems(results)
        .into_iter()
        .map(|(label, p)| format!("{label}: {p}"))
        .collect();
    merge(
        &mut out,
        json!({
            "agent_bin": agent_bin,
            "config": {
                "conns": cfg.conns,
                "concurrency": cfg.concurrency,
                "mib": cfg.mib,
                "pings": cfg.pings,
                "runs": cfg.runs,
                "warmup_conns": cfg.warmup_conns,
                "warmup_mib": cfg.warmup_mib,
                "warmup_pings": cfg.warmup_pings,
                "lat_slices": cfg.lat_slices,
                "warm_args": cfg.warm_args,
                "cold_args": cfg.cold_args,
            },
            "paths": results.iter().zip(LETTERS).map(|(r, l)| path(l, r)).collect::<Vec<_>>(),
            "ratios": report::ratios(results).iter().map(|r| json!({
                "ratio": r.name,
                "gbps": num(r.gbps),
                "gbps_per_run": num(r.gbps_per_run),
                "conn_per_s": num(r.conn),
                "conn_per_s_per_run": num(r.conn_per_run),
            })).collect::<Vec<_>>(),
            "added_latency_us": {
                "p50": num(added.p50),
                "p50_per_run": num(added.p50_per_run),
                "p99": num(added.p99),
                "p99_per_run": num(added.p99_per_run),
            },
            "warm_agent_cpu_s_per_gib": num(report::warm_agent_cpu_per_gib(results)),
            "targets": report::targets(results).iter().map(|t| json!({
                "target": t.name,
                "value": num(t.value),
                "limit": t.limit,
                "pass": t.pass(),
            })).collect::<Vec<_>>(),
            "noise": { "others_cpu_median": num(others_median), "others_cpu_max": others_max },
            "problems": problems,
            "pool_at_end": pool,
        }),
    );
    out
}

/// One path: the medians the tables print and every run. Agent CPU is null on the direct path.
fn path(letter: &str, r: &PathResults) -> Value {
    let conn_cpu = |i: usize| {
        med(&r.conn, |s| {
            s.agent_cpu_us.map_or(f64::NAN, |c| [c.0, c.1][i])
        })
    };
    let tput_cpu = |i: usize| {
        med(&r.tput, |s| {
            s.agent_cpu_s_per_gib.map_or(f64::NAN, |c| [c.0, c.1][i])
        })
    };
    // The table prints the sum of the two sides' medians; so does this.
    let sum = |a: Value, b: Value| num(a.as_f64().zip(b.as_f64()).map(|(a, b)| a + b));
    let mut lat = Value::Null;
    if !r.lat.is_empty() {
        lat = json!({
            "p50_us": med(&r.lat, |s| s.p50_us),
            "p99_us": med(&r.lat, |s| s.p99_us),
            "p999_us": med(&r.lat, |s| s.p999_us),
            "others_cpu": num(median(r.lat.iter().map(|s| s.others_cpu))),
            "runs": r.lat.iter().map(lat_run).collect::<Vec<_>>(),
        });
    }
    json!({
        "path": letter,
        "label": r.label,
        "conn": {
            "conn_per_s": med(&r.conn, |s| s.rate),
            "p50_us": med(&r.conn, |s| s.p50_us),
            "p99_us": med(&r.conn, |s| s.p99_us),
            "tls_conns_per_conn": med(&r.conn, |s| s.hbone_conns_per_conn.unwrap_or(f64::NAN)),
            "agent_cpu_us_per_conn_client": conn_cpu(0),
            "agent_cpu_us_per_conn_server": conn_cpu(1),
            "agent_cpu_us_per_conn": sum(conn_cpu(0), conn_cpu(1)),
            "others_cpu": num(median(r.conn.iter().map(|s| s.others_cpu))),
            "runs": r.conn.iter().map(conn_run).collect::<Vec<_>>(),
        },
        "tput": {
            "gbps": med(&r.tput, |s| s.gbps),
            "agent_cpu_s_per_gib_client": tput_cpu(0),
            "agent_cpu_s_per_gib_server": tput_cpu(1),
            "agent_cpu_s_per_gib": sum(tput_cpu(0), tput_cpu(1)),
            "others_cpu": num(median(r.tput.iter().map(|s| s.others_cpu))),
            "runs": r.tput.iter().map(tput_run).collect::<Vec<_>>(),
        },
        "lat": lat,
    })
}

fn conn_run(s: &ConnSample) -> Value {
    json!({
        "conn_per_s": s.rate,
        "p50_us": s.p50_us,
        "p99_us": s.p99_us,
        "tls_conns_per_conn": s.hbone_conns_per_conn,
        "agent_cpu_us_per_conn": s.agent_cpu_us.map(|(c, s)| [c, s]),
        "others_cpu": s.others_cpu,
        "problem": s.problem,
    })
}

fn tput_run(s: &TputSample) -> Value {
    json!({
        "gbps": s.gbps,
        "agent_cpu_s_per_gib": s.agent_cpu_s_per_gib.map(|(c, s)| [c, s]),
        "others_cpu": s.others_cpu,
        "problem": s.problem,
    })
}

fn lat_run(s: &LatSample) -> Value {
    json!({
        "p50_us": s.p50_us,
        "p99_us": s.p99_us,
        "p999_us": s.p999_us,
        "others_cpu": s.others_cpu,
        "problem": s.problem,
    })
}
