//! The machine-readable copy of a bench's results: with `AMBIT_BENCH_JSON=<path>` a bench writes
//! one JSON object with every figure it printed (`cargo xtask bench-compare` reads it). Only the
//! output changes: nothing is measured differently when it is set.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::machine::first_line;
use super::stats::median;

/// The variable that names the output file.
pub const ENV: &str = "AMBIT_BENCH_JSON";
/// Bumped when a field changes meaning or moves; adding fields keeps it.
pub const SCHEMA: u32 = 1;

/// Writes `results` to the file `AMBIT_BENCH_JSON` names, if it is set. Panics if it cannot be
/// written: a caller that asked for the file must not be left with a stale one.
pub fn write_if_asked(results: &Value) {
    let Some(path) = std::env::var_os(ENV).map(PathBuf::from) else {
        return;
    };
    let text = serde_json::to_string_pretty(results).expect("a Value always serialises");
    std::fs::write(&path, text + "\n")
        .unwrap_or_else(|e| panic!("{ENV}={}: cannot write: {e}", path.display()));
    println!("results as JSON: {}", path.display());
}

/// What every bench's JSON starts with: which bench, the schema, and the machine.
pub fn header(bench: &str) -> Value {
    json!({
        "bench": bench,
        "schema": SCHEMA,
        "kernel": first_line("/proc/sys/kernel/osrelease"),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_end": first_line("/proc/loadavg"),
    })
}

/// The median of `f` over `samples` (null without samples, or when `f` gives NaN for "not
/// measured").
pub fn med<T>(samples: &[T], f: impl Fn(&T) -> f64) -> Value {
    num(median(samples.iter().map(f)))
}

/// A number, or null for "not measured" (`None` or NaN: JSON has no NaN).
pub fn num(v: Option<f64>) -> Value {
    match v {
        Some(v) if v.is_finite() => json!(v),
        _ => Value::Null,
    }
}

/// Adds `fields` (an object) to `target` (an object).
pub fn merge(target: &mut Value, fields: Value) {
    if let (Value::Object(t), Value::Object(f)) = (target, fields) {
        t.extend(f);
    }
}
