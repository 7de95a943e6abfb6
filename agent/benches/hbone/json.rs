//! The HBONE bench's results as one JSON object (`AMBIT_BENCH_JSON`): every figure the tables
//! print, unrounded, plus each run's samples and the agent binary the bench started. The
//! sections `conn`, `tput` and `lat` of each path keep the keys `cargo xtask bench-compare` reads.

use serde_json::{json, Value};

use crate::common::json::{header, merge, num};
use crate::common::stats::median;
use crate::figures::{self, RATIO_FIGURES, RATIO_PAIRS};
use crate::samples::{
    med, med_cpu, AgentCpu, ConnSample, HttpSample, LatSample, Meta, PathResults, TputSample,
};
use crate::{Config, ALL_PATHS, PATHS};

/// The whole result. `agent_bin` is the `ambit` the agents ran (`CARGO_BIN_EXE_ambit` of the tree
/// this bench was built from); `pool` the counters printed at the end.
pub fn results(cfg: &Config, results: &[PathResults], agent_bin: &str, pool: Value) -> Value {
    let mut out = header("hbone");
    let (others_median, others_max) = figures::noise(results);
    let problems: Vec<String> = figures::all_problems(results)
        .into_iter()
        .map(|(label, p)| format!("{label}: {p}"))
        .collect();
    let paths: Vec<Value> = ALL_PATHS
        .chars()
        .map(|l| match results.iter().find(|r| r.letter == l) {
            Some(r) => path(r),
            None => json!({
                "path": l.to_string(),
                "label": PATHS.iter().find(|p| p.0 == l).map_or("", |p| p.1),
                "skipped": "not in AMBIT_BENCH_PATHS",
            }),
        })
        .collect();
    let ratios: Vec<Value> = RATIO_PAIRS
        .iter()
        .map(|&(n, d)| {
            let figures: serde_json::Map<String, Value> = RATIO_FIGURES
                .iter()
                .map(|f| {
                    let r = figures::ratio(results, n, d, f);
                    (
                        f.key.to_string(),
                        json!({"of_medians": num(r.of_medians), "per_run": num(r.per_run)}),
                    )
                })
                .collect();
            json!({ "ratio": figures::ratio_name(n, d), "figures": figures })
        })
        .collect();
    let added: Vec<Value> = figures::ADDED_PAIRS
        .iter()
        .map(|&(n, d)| {
            let a = figures::added_latency(results, n, d);
            json!({
                "added": figures::ratio_name(n, d).replace('/', " - "),
                "p50": num(a.p50),
                "p50_per_run": num(a.p50_per_run),
                "p99": num(a.p99),
                "p99_per_run": num(a.p99_per_run),
            })
        })
        .collect();
    let targets: Vec<Value> = figures::targets(results, cfg.concurrency, cfg.http_conns)
        .iter()
        .map(|t| {
            json!({
                "target": t.name,
                "value": num(t.value),
                "limit": t.limit,
                "at_least": t.at_least,
                "pass": t.pass(),
            })
        })
        .collect();
    merge(
        &mut out,
        json!({
            "agent_bin": agent_bin,
            "config": {
                "paths": cfg.paths,
                "conns": cfg.conns,
                "concurrency": cfg.concurrency,
                "seq_conns": cfg.seq_conns,
                "mib": cfg.mib,
                "streams": cfg.streams,
                "http_seconds": cfg.http_seconds,
                "http_warmup_seconds": cfg.http_warmup_s,
                "http_conns": cfg.http_conns,
                "h2load_threads": cfg.h2load_threads,
                "pings": cfg.pings,
                "ping_bytes": cfg.ping_bytes,
                "runs": cfg.runs,
                "warmup_conns": cfg.warmup_conns,
                "warmup_mib": cfg.warmup_mib,
                "warmup_pings": cfg.warmup_pings,
                "warmup_http_seconds": cfg.warmup_http_seconds,
                "lat_slices": cfg.lat_slices,
                "warm_args": cfg.warm_args,
                "cold_args": cfg.cold_args,
                "same_node_args": cfg.same_node_args,
            },
            "paths": paths,
            "ratios": ratios,
            "added_latency_us": added,
            "warm_agent_cpu_s_per_gb": num(figures::warm_agent_cpu_per_gb(results)),
            "same_node_route": figures::same_node_route(results),
            "targets": targets,
            "noise": { "others_cpu_median": num(others_median), "others_cpu_max": others_max },
            "problems": problems,
            "pool_at_end": pool,
        }),
    );
    out
}

/// An agent CPU figure's three keys (`<key>_client`, `<key>_server`, `<key>`, the total) into
/// `section`; null on the direct paths, `_server` null when one agent serves both ends.
fn cpu_keys(section: &mut Value, key: &str, c: Option<AgentCpu>, scale: f64) {
    let v = |f: fn(AgentCpu) -> Option<f64>| num(c.and_then(f).map(|x| x * scale));
    merge(
        section,
        json!({
            format!("{key}_client"): v(|c| Some(c.client)),
            format!("{key}_server"): v(|c| c.server),
            key: v(|c| Some(c.total())),
        }),
    );
}

fn others(metas: impl Iterator<Item = f64>) -> Value {
    num(median(metas))
}

fn meta(m: &Meta) -> Value {
    json!({"others_cpu": m.others_cpu, "route": m.route.name(), "problem": m.problem})
}

fn conn(v: &[ConnSample]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = json!({
        "conn_per_s": num(med(v, |s| s.rate)),
        "p50_us": num(med(v, |s| s.p50_us)),
        "p99_us": num(med(v, |s| s.p99_us)),
        "tls_conns_per_conn": num(med(v, |s| s.hbone_conns_per_conn.unwrap_or(f64::NAN))),
        "others_cpu": others(v.iter().map(|s| s.meta.others_cpu)),
        "runs": v.iter().map(|s| json!({
            "conn_per_s": s.rate,
            "p50_us": s.p50_us,
            "p99_us": s.p99_us,
            "tls_conns_per_conn": s.hbone_conns_per_conn,
            "agent_cpu_us_per_conn": s.agent_cpu_us.map(|c| c.total()),
            "meta": meta(&s.meta),
        })).collect::<Vec<_>>(),
    });
    cpu_keys(
        &mut s,
        "agent_cpu_us_per_conn",
        med_cpu(v, |s| s.agent_cpu_us),
        1.0,
    );
    s
}

fn tput(v: &[TputSample]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let cpu = med_cpu(v, |s| s.agent_cpu_s_per_gb);
    let mut s = json!({
        "gbps": num(med(v, |s| s.gbps)),
        "others_cpu": others(v.iter().map(|s| s.meta.others_cpu)),
        "runs": v.iter().map(|s| json!({
            "gbps": s.gbps,
            "agent_cpu_s_per_gb": s.agent_cpu_s_per_gb.map(|c| c.total()),
            "meta": meta(&s.meta),
        })).collect::<Vec<_>>(),
    });
    cpu_keys(&mut s, "agent_cpu_s_per_gb", cpu, 1.0);
    // Per GiB as well: the unit of earlier runs, which `cargo xtask bench-compare` reads.
    cpu_keys(
        &mut s,
        "agent_cpu_s_per_gib",
        cpu,
        (1u64 << 30) as f64 / 1e9,
    );
    s
}

fn http(v: &[HttpSample]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let mut s = json!({
        "req_per_s": num(med(v, |s| s.req_per_s)),
        "dest_l7": v.iter().filter_map(|s| s.dest_l7).all(|l7| l7) && v.iter().any(|s| s.dest_l7.is_some()),
        "others_cpu": others(v.iter().map(|s| s.meta.others_cpu)),
        "runs": v.iter().map(|s| json!({
            "req_per_s": s.req_per_s,
            "requests": s.requests,
            "agent_cpu_us_per_req": s.agent_cpu_us.map(|c| c.total()),
            "dest_l7": s.dest_l7,
            "meta": meta(&s.meta),
        })).collect::<Vec<_>>(),
    });
    cpu_keys(
        &mut s,
        "agent_cpu_us_per_req",
        med_cpu(v, |s| s.agent_cpu_us),
        1.0,
    );
    s
}

fn lat(v: &[LatSample]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    json!({
        "p50_us": num(med(v, |s| s.p50_us)),
        "p99_us": num(med(v, |s| s.p99_us)),
        "p999_us": num(med(v, |s| s.p999_us)),
        "others_cpu": others(v.iter().map(|s| s.meta.others_cpu)),
        "runs": v.iter().map(|s| json!({
            "p50_us": s.p50_us,
            "p99_us": s.p99_us,
            "p999_us": s.p999_us,
            "meta": meta(&s.meta),
        })).collect::<Vec<_>>(),
    })
}

/// One path: the medians the tables print and every run. Agent CPU is null on the direct paths.
fn path(r: &PathResults) -> Value {
    json!({
        "path": r.letter.to_string(),
        "label": r.label,
        "skipped": null,
        "one_agent": r.one_agent,
        "conn": conn(&r.conn),
        "conn_seq": conn(&r.conn_seq),
        "tput": tput(&r.tput),
        "tput_par": tput(&r.tput_par),
        "http_one": http(&r.http_one),
        "http_many": http(&r.http_many),
        "lat": lat(&r.lat),
    })
}
