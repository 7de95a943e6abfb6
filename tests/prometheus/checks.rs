//! What a query must answer: exactly the rows (values of some labels) it must return, each
//! with a value that fits.

use std::collections::{BTreeMap, BTreeSet};

use super::server::Sample;

/// What each expected row's value must be.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// A rate, a byte count, a latency: finite and above zero.
    Positive,
    /// A success ratio: in (0, 1].
    Ratio,
    /// A success ratio over traffic with 5xx answers: in (0, 1).
    Degraded,
}

impl Value {
    fn fits(self, v: f64) -> bool {
        v.is_finite()
            && match self {
                Value::Positive => v > 0.0,
                Value::Ratio => v > 0.0 && v <= 1.0,
                Value::Degraded => v > 0.0 && v < 1.0,
            }
    }
}

/// One query of a dashboard panel or of Kiali, with what it must return.
#[derive(Debug, Clone)]
pub struct Check {
    /// `owner/repo path` the PromQL was copied from.
    pub source: &'static str,
    /// The panel title, or Kiali's step.
    pub panel: String,
    pub promql: String,
    /// The labels a row is made of (empty: the query answers one unlabelled value).
    pub by: Vec<&'static str>,
    pub rows: BTreeSet<Vec<String>>,
    /// Rows whose value is not `value`.
    pub row_values: BTreeMap<Vec<String>, Value>,
    pub value: Value,
}

pub fn check(source: &'static str, panel: impl Into<String>, promql: impl Into<String>) -> Check {
    Check {
        source,
        panel: panel.into(),
        promql: promql.into(),
        by: Vec::new(),
        rows: BTreeSet::from([Vec::new()]),
        row_values: BTreeMap::new(),
        value: Value::Positive,
    }
}

impl Check {
    /// Expects exactly these rows of these labels.
    pub fn rows<R, S>(mut self, by: &[&'static str], rows: impl IntoIterator<Item = R>) -> Self
    where
        R: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.by = by.to_vec();
        self.rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(Into::into).collect())
            .collect();
        self
    }

    pub fn value(mut self, value: Value) -> Self {
        self.value = value;
        self
    }

    /// One more row, whose value must be `value`.
    pub fn row(mut self, row: &[&str], value: Value) -> Self {
        let row: Vec<String> = row.iter().map(|v| v.to_string()).collect();
        self.rows.insert(row.clone());
        self.row_values.insert(row, value);
        self
    }

    fn value_of(&self, row: &[String]) -> Value {
        self.row_values.get(row).copied().unwrap_or(self.value)
    }

    /// Why `answer` does not satisfy the check, or Ok.
    pub fn verify(&self, answer: &[Sample]) -> Result<(), String> {
        let mut got: BTreeMap<Vec<String>, Vec<f64>> = BTreeMap::new();
        for s in answer {
            let row = self
                .by
                .iter()
                .map(|l| s.labels.get(*l).cloned().unwrap_or_default())
                .collect();
            got.entry(row).or_default().push(s.value);
        }
        let missing: Vec<_> = self.rows.iter().filter(|r| !got.contains_key(*r)).collect();
        let bad: Vec<_> = got
            .iter()
            .filter(|(r, vs)| {
                self.rows.contains(*r) && !vs.iter().all(|v| self.value_of(r).fits(*v))
            })
            .collect();
        let extra: Vec<_> = got.keys().filter(|r| !self.rows.contains(*r)).collect();
        if missing.is_empty() && bad.is_empty() && extra.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} {:?}: missing rows {missing:?}; values not {:?} (or their row's): {bad:?}; unexpected rows {extra:?}",
            self.source, self.by, self.value,
        ))
    }
}
