//! What is wrong right now, said the same way everywhere: one [`Problem`] list per control-loop
//! tick feeds the log (each problem once when it appears and once when it clears), the status
//! file and `/metrics`, so the three always agree (issue 9).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tracing::{info, warn};

use super::Escaped;

/// What a problem is about: the labels of its metric series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "about", rename_all = "snake_case")]
pub enum ProblemKey {
    /// One field of one config object (rejected, or accepted with a warning).
    Object {
        kind: &'static str,
        namespace: String,
        name: String,
        field: String,
    },
    /// A config file (or one document of it) that cannot be read.
    File { path: String },
    /// A pod this node should enrol and cannot (yet).
    Pod { namespace: String, name: String },
}

/// One current problem: what it is about and the whole message, consequence included.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Problem {
    #[serde(flatten)]
    pub key: ProblemKey,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Logs each problem once when it appears (WARN) and once when it clears (INFO), however often
/// the control loop recomputes them.
#[derive(Debug, Default)]
pub struct ProblemLog {
    current: BTreeSet<Problem>,
}

impl ProblemLog {
    pub fn update(&mut self, now: &[Problem]) {
        let now: BTreeSet<Problem> = now.iter().cloned().collect();
        for p in now.difference(&self.current) {
            warn!(problem = %p.message, "config problem");
        }
        for p in self.current.difference(&now) {
            info!(problem = %p.message, "config problem cleared");
        }
        self.current = now;
    }
}

/// The series of every current problem: `ambit_config_rejected_objects`,
/// `ambit_config_file_problems` and `ambit_enrolment_problems`, each 1 while it lasts.
#[derive(Debug, Default)]
pub(super) struct ProblemSeries(Mutex<Vec<ProblemKey>>);

impl ProblemSeries {
    pub(super) fn set(&self, problems: &[Problem]) {
        let mut keys: Vec<ProblemKey> = problems.iter().map(|p| p.key.clone()).collect();
        keys.sort();
        keys.dedup();
        // Swapped whole: a scrape sees the old set or the new one, never a half-built one.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = keys;
    }
}

impl Collector for ProblemSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let keys = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut objects = encoder.encode_descriptor(
            "ambit_config_rejected_objects",
            "1 for every config object currently rejected (or accepted with a warning), per field at fault; the log has the message.",
            None,
            MetricType::Gauge,
        )?;
        for k in &keys {
            if let ProblemKey::Object {
                kind,
                namespace,
                name,
                field,
            } = k
            {
                let labels = [
                    ("kind", Escaped(kind)),
                    ("namespace", Escaped(namespace)),
                    ("name", Escaped(name)),
                    ("field", Escaped(field)),
                ];
                ConstGauge::new(1i64).encode(objects.encode_family(&labels)?)?;
            }
        }
        let mut files = encoder.encode_descriptor(
            "ambit_config_file_problems",
            "1 for every config file (or document) that cannot be read now; its objects keep their last good version.",
            None,
            MetricType::Gauge,
        )?;
        for k in &keys {
            if let ProblemKey::File { path } = k {
                ConstGauge::new(1i64).encode(files.encode_family(&[("file", Escaped(path))])?)?;
            }
        }
        let mut pods = encoder.encode_descriptor(
            "ambit_enrolment_problems",
            "1 for every pod this node should enrol and cannot yet (retried with a backoff).",
            None,
            MetricType::Gauge,
        )?;
        for k in &keys {
            if let ProblemKey::Pod { namespace, name } = k {
                let labels = [("namespace", Escaped(namespace)), ("pod", Escaped(name))];
                ConstGauge::new(1i64).encode(pods.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
