//! The figures derived from the samples, which the tables and the JSON both print: ratios
//! between paths, added latency, the targets, noise and problems.

use crate::common::stats::median;
use crate::samples::{med, LatSample, PathResults, Route};

/// A per-run figure of a path that ratios are taken of (higher is better for all).
pub struct RatioFigure {
    /// JSON key.
    pub key: &'static str,
    /// Table heading.
    pub label: &'static str,
    pub runs: fn(&PathResults) -> Vec<f64>,
}

pub const RATIO_FIGURES: [RatioFigure; 6] = [
    RatioFigure {
        key: "conn_per_s",
        label: "conn/s",
        runs: |r| r.conn.iter().map(|s| s.rate).collect(),
    },
    RatioFigure {
        key: "conn_seq_per_s",
        label: "conn/s 1-by-1",
        runs: |r| r.conn_seq.iter().map(|s| s.rate).collect(),
    },
    RatioFigure {
        key: "gbps",
        label: "GB/s 1 stream",
        runs: |r| r.tput.iter().map(|s| s.gbps).collect(),
    },
    RatioFigure {
        key: "gbps_par",
        label: "GB/s N streams",
        runs: |r| r.tput_par.iter().map(|s| s.gbps).collect(),
    },
    RatioFigure {
        key: "req_per_s_one",
        label: "req/s 1 conn",
        runs: |r| r.http_one.iter().map(|s| s.req_per_s).collect(),
    },
    RatioFigure {
        key: "req_per_s_many",
        label: "req/s N conns",
        runs: |r| r.http_many.iter().map(|s| s.req_per_s).collect(),
    },
];

/// The pairs of paths whose ratios are printed: numerator, denominator.
pub const RATIO_PAIRS: [(char, char); 5] =
    [('b', 'a'), ('c', 'a'), ('c', 'b'), ('d', 'e'), ('d', 'a')];

/// One ratio of one figure: of the medians, and the median of the per-run ratios.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ratio {
    pub of_medians: Option<f64>,
    pub per_run: Option<f64>,
}

fn path(results: &[PathResults], letter: char) -> Option<&PathResults> {
    results.iter().find(|r| r.letter == letter)
}

pub fn ratio_name(n: char, d: char) -> String {
    format!("({n})/({d})")
}

/// `figure` of path `n` over path `d`; nothing when either was not measured.
pub fn ratio(results: &[PathResults], n: char, d: char, figure: &RatioFigure) -> Ratio {
    let (Some(n), Some(d)) = (path(results, n), path(results, d)) else {
        return Ratio::default();
    };
    let (n, d) = ((figure.runs)(n), (figure.runs)(d));
    let m = |v: &[f64]| median(v.iter().copied());
    Ratio {
        of_medians: m(&n).zip(m(&d)).map(|(n, d)| n / d),
        per_run: median(n.iter().zip(&d).map(|(n, d)| n / d)),
    }
}

/// The latency path `n` adds to path `d`: difference of the medians, and median of the per-run
/// differences.
#[derive(Debug, Clone, Copy, Default)]
pub struct Added {
    pub p50: Option<f64>,
    pub p50_per_run: Option<f64>,
    pub p99: Option<f64>,
    pub p99_per_run: Option<f64>,
}

/// The pairs whose added latency is printed: cross-node HBONE over direct, same-node over
/// same-node direct.
pub const ADDED_PAIRS: [(char, char); 2] = [('b', 'a'), ('d', 'e')];

pub fn added_latency(results: &[PathResults], n: char, d: char) -> Added {
    let (Some(n), Some(d)) = (path(results, n), path(results, d)) else {
        return Added::default();
    };
    let (lat_n, lat_d) = (&n.lat, &d.lat);
    let added = |f: fn(&LatSample) -> f64| {
        (
            med(lat_n, f).zip(med(lat_d, f)).map(|(n, d)| n - d),
            median(lat_n.iter().zip(lat_d).map(|(n, d)| f(n) - f(d))),
        )
    };
    let (p50, p50_per_run) = added(|s| s.p50_us);
    let (p99, p99_per_run) = added(|s| s.p99_us);
    Added {
        p50,
        p50_per_run,
        p99,
        p99_per_run,
    }
}

/// Both agents' CPU seconds per GB on the warm path (b), one stream.
pub fn warm_agent_cpu_per_gb(results: &[PathResults]) -> Option<f64> {
    path(results, 'b').and_then(|r| {
        med(&r.tput, |s| {
            s.agent_cpu_s_per_gb.map_or(f64::NAN, |c| c.total())
        })
    })
}

/// A target: `value` at least `limit` (`at_least`), or at most it.
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub at_least: bool,
    pub unit: &'static str,
}

impl Target {
    /// Met or not; `None` when not measured.
    pub fn pass(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v <= self.limit
            }
        })
    }
}

/// Issue 14's targets, against direct in the same run (on the medians).
pub fn targets(results: &[PathResults], concurrency: usize, http_conns: usize) -> Vec<Target> {
    let r = |n, d, key: &str| {
        let figure = RATIO_FIGURES.iter().find(|f| f.key == key);
        figure.and_then(|f| ratio(results, n, d, f).of_medians)
    };
    let target = |name: String, value, limit, at_least, unit| Target {
        name,
        value,
        limit,
        at_least,
        unit,
    };
    vec![
        target(
            "(b)/(a) single-stream throughput >= 0.55".into(),
            r('b', 'a', "gbps"),
            0.55,
            true,
            "x",
        ),
        target(
            format!("(b)/(a) new connections/s ({concurrency} in flight) >= 0.5"),
            r('b', 'a', "conn_per_s"),
            0.5,
            true,
            "x",
        ),
        target(
            format!("(b)/(a) requests/s over {http_conns} connections >= 0.65"),
            r('b', 'a', "req_per_s_many"),
            0.65,
            true,
            "x",
        ),
        target(
            "(b) - (a) added echo p99 <= 25 µs".into(),
            added_latency(results, 'b', 'a').p99,
            25.0,
            false,
            " µs",
        ),
        target(
            "(b) agent CPU per GB, 1 stream, both agents <= 1.0 s".into(),
            warm_agent_cpu_per_gb(results),
            1.0,
            false,
            " s",
        ),
        target(
            "(d)/(e) same-node single-stream throughput >= 0.8".into(),
            r('d', 'e', "gbps"),
            0.8,
            true,
            "x",
        ),
    ]
}

/// CPUs other processes kept busy: the median over every measurement, and the maximum.
pub fn noise(results: &[PathResults]) -> (Option<f64>, f64) {
    let others: Vec<f64> = results
        .iter()
        .flat_map(|r| r.metas().into_iter().map(|m| m.others_cpu))
        .collect();
    (
        median(others.iter().copied()),
        others.iter().copied().fold(0.0, f64::max),
    )
}

/// Every path's problems, as the `INVALID` lines name them.
pub fn all_problems(results: &[PathResults]) -> Vec<(&'static str, &str)> {
    results
        .iter()
        .flat_map(|r| r.problems().into_iter().map(|p| (r.label, p)))
        .collect()
}

/// How the same-node path (d) went, in words: the agent's shortcut or HBONE on one node.
pub fn same_node_route(results: &[PathResults]) -> Option<String> {
    let d = path(results, 'd')?;
    let routes = d.routes();
    let total: usize = routes.iter().map(|(_, n)| n).sum();
    Some(match routes.as_slice() {
        [(Route::Local, _)] => format!(
            "in-process (the agent's same-node shortcut): no HBONE stream or TLS connection in \
             any of {total} measurements"
        ),
        [(Route::Hbone, _)] => format!(
            "through HBONE on one node (the agent opened pool streams to itself) in all {total} \
             measurements: no same-node shortcut"
        ),
        _ => format!(
            "MIXED: {}",
            routes
                .iter()
                .map(|(r, n)| format!("{} in {n}", r.name()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}
