//! How the config sources are doing, as metrics: which kinds have been listed
//! (`ambit_config_synced`), and for the Kubernetes source each kind's watch state, errors, lists,
//! re-lists, discovery failures and last successful sync (`ambit_kube_*`).

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Escaped;
use crate::config::kube::{KubeStats, WatchState};
use crate::config::Kind;

/// `ambit_config_synced{kind}`: 1 once the kind has been listed (or found not installed).
#[derive(Debug, Default)]
pub(super) struct Synced(Mutex<Vec<(Kind, bool)>>);

impl Synced {
    pub(super) fn set(&self, kinds: Vec<(Kind, bool)>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = kinds;
    }
}

impl Collector for Synced {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let kinds = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut family = encoder.encode_descriptor(
            "ambit_config_synced",
            "1 once the config source has delivered the complete set of this kind; until every kind has, the agent is not ready and enrolled pods fail closed.",
            None,
            MetricType::Gauge,
        )?;
        for (kind, synced) in kinds {
            let labels = [("kind", Escaped(kind.as_str()))];
            ConstGauge::new(i64::from(synced)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The Kubernetes source's per-kind counters, read at scrape time.
#[derive(Debug)]
pub(super) struct KubeCollector(pub(super) Arc<KubeStats>);

impl Collector for KubeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let all = self.0.all();
        type Counter = fn(&crate::config::kube::KindCounters) -> u64;
        let counters: [(&str, &str, Counter); 4] = [
            (
                "ambit_kube_watch_errors",
                "List and watch errors, per kind (each retried after a short backoff; a 410 Expired relists at once).",
                |c| c.watch_errors,
            ),
            (
                "ambit_kube_lists",
                "Complete lists, per kind (the first included).",
                |c| c.lists,
            ),
            (
                "ambit_kube_relists",
                "Complete lists after the first, per kind (expired resource version, broken watch).",
                |c| c.relists,
            ),
            (
                "ambit_kube_discovery_errors",
                "Failed attempts to discover the served version of an Istio CRD (not the same as not installed).",
                |c| c.discovery_errors,
            ),
        ];
        for (name, help, get) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (kind, c) in &all {
                let labels = [("kind", Escaped(kind.as_str()))];
                ConstCounter::new(get(c)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "ambit_kube_last_sync_timestamp_seconds",
            "Unix time of the last complete list of the kind (or of finding its CRD not installed); 0 if never.",
            None,
            MetricType::Gauge,
        )?;
        for (kind, c) in &all {
            let labels = [("kind", Escaped(kind.as_str()))];
            let at = i64::try_from(c.last_sync_unix).unwrap_or(i64::MAX);
            ConstGauge::new(at).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "ambit_kube_watch_state",
            "1 for the state each kind's watch is in (discovering, discovery_failed, not_installed, listing, watching, failing), 0 for the others.",
            None,
            MetricType::Gauge,
        )?;
        for (kind, c) in &all {
            for state in WatchState::ALL {
                let labels = [
                    ("kind", Escaped(kind.as_str())),
                    ("state", Escaped(state.as_str())),
                ];
                ConstGauge::new(i64::from(c.state == state))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
