//! The capture bench's results as one JSON object (`AMBIT_BENCH_JSON`): every figure the tables,
//! the diagnostics and the counters print, unrounded, plus each run's samples.

use serde_json::{json, Value};

use crate::common::json::{header, med, merge, num};
use crate::common::stats::median;
use crate::report::{self, ConnSample, PathResults, TputSample};
use crate::{Config, LETTERS};

/// The whole result. `diagnostics` and `ebpf` are what `diag::run` and the closing counter lines
/// printed.
pub fn results(cfg: &Config, paths: &[PathResults], diagnostics: Value, ebpf: Value) -> Value {
    let mut out = header("capture");
    let problems: Vec<String> = report::problems(paths)
        .into_iter()
        .map(|(label, p)| format!("{label}: {p}"))
        .collect();
    let noise = report::noise(paths);
    merge(
        &mut out,
        json!({
            "config": {
                "conns": cfg.conns,
                "concurrency": cfg.concurrency,
                "mib": cfg.mib,
                "runs": cfg.runs,
                "slices": cfg.slices,
                "warmup_conns": cfg.warmup_conns,
                "warmup_mib": cfg.warmup_mib,
                "paths": cfg.paths,
            },
            "paths": paths.iter().enumerate().map(|(i, p)| path(LETTERS[i], p)).collect::<Vec<_>>(),
            "ratios": report::ratios(paths).iter().map(|r| json!({
                "ratio": r.name,
                "conn_per_s": num(r.conn),
                "conn_per_s_per_run": num(r.conn_per_run),
                "gbps": num(r.gbps),
                "gbps_per_run": num(r.gbps_per_run),
            })).collect::<Vec<_>>(),
            "targets": report::targets(paths).iter().map(|t| json!({
                "target": t.name,
                "ratio": num(t.ratio),
                "min": t.min,
                "pass": t.ratio.map(|r| r >= t.min),
            })).collect::<Vec<_>>(),
            "noise": {
                "others_cpu_median": num(noise.map(|n| n.0)),
                "others_cpu_max": num(noise.map(|n| n.1)),
            },
            "problems": problems,
            "diagnostics": diagnostics,
            "ebpf": ebpf,
        }),
    );
    out
}

/// One path: the medians the tables print (CPU, p50, p99 unrounded) and every run.
fn path(letter: char, p: &PathResults) -> Value {
    if let Some(why) = &p.skipped {
        return json!({ "path": letter.to_string(), "label": p.label, "skipped": why });
    }
    json!({
        "path": letter.to_string(),
        "label": p.label,
        "skipped": null,
        "conn": {
            "conn_per_s": num(p.conn_median()),
            "p50_us": med(&p.conn, |s| f64::from(s.p50_us)),
            "p99_us": med(&p.conn, |s| f64::from(s.p99_us)),
            "cpu_us_per_conn": med(&p.conn, |s| s.cpu_us_per_conn),
            "syn_retrans": p.conn.iter().map(|s| s.syn_retrans).sum::<u64>(),
            "tw_reused": p.conn.iter().map(|s| s.tw_recycled).sum::<u64>(),
            "others_cpu": num(median(p.conn.iter().map(|s| s.others_cpu))),
            "runs": p.conn.iter().map(conn_run).collect::<Vec<_>>(),
        },
        "tput": {
            "gbps": num(p.tput_median()),
            "cpu_s_per_gib": med(&p.tput, |s| s.cpu_s_per_gib),
            "others_cpu": num(median(p.tput.iter().map(|s| s.others_cpu))),
            "runs": p.tput.iter().map(tput_run).collect::<Vec<_>>(),
        },
    })
}

fn conn_run(s: &ConnSample) -> Value {
    json!({
        "conn_per_s": s.rate,
        "p50_us": s.p50_us,
        "p99_us": s.p99_us,
        "cpu_us_per_conn": s.cpu_us_per_conn,
        "syn_retrans": s.syn_retrans,
        "tw_reused": s.tw_recycled,
        "others_cpu": s.others_cpu,
        "problem": s.problem,
    })
}

fn tput_run(s: &TputSample) -> Value {
    json!({
        "gbps": s.gbps,
        "cpu_s_per_gib": s.cpu_s_per_gib,
        "others_cpu": s.others_cpu,
        "problem": s.problem,
    })
}
