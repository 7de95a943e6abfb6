//! Telemetry API `metrics.overrides[].tagOverrides` for Istio's eight standard request and TCP
//! metrics, compiled once per workload side ([`TagPlan`]) and evaluated once per request or
//! connection ([`SeriesTags`]). Applied as Istio's stats filter does (istio/proxy
//! `istio_stats.cc`, `MetricOverrides::overrideTags`): a removed standard tag is dropped, an
//! upserted standard tag keeps its place with the expression's value, a new tag is appended (in
//! tag-name order), and an expression that cannot be evaluated gives `unknown`.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::filter::{Activation, Filter, Principals, RequestAttrs};
use super::{MetricOverride, TagAction};
use crate::config::istio::telemetry::IstioMetric;

/// The metrics ambit exports whose tags can be changed, in the order of [`TagPlan`]'s tables.
pub const TAGGED: [IstioMetric; 8] = [
    IstioMetric::RequestCount,
    IstioMetric::RequestDuration,
    IstioMetric::RequestSize,
    IstioMetric::ResponseSize,
    IstioMetric::TcpOpenedConnections,
    IstioMetric::TcpClosedConnections,
    IstioMetric::TcpSentBytes,
    IstioMetric::TcpReceivedBytes,
];

/// Istio's standard metric labels (`all_tags_` of its stats filter). An UPSERT of one of them replaces its value where the metric
/// has it (and adds nothing where it has not: `response_code` on a TCP metric); any other name
/// is a new label.
pub const STANDARD_TAGS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];

/// Whether `name` is a valid Prometheus label name (`[a-zA-Z_][a-zA-Z0-9_]*`, and not one of the
/// names reserved for Prometheus itself, which start with `__`).
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

fn index(metric: IstioMetric) -> Option<usize> {
    TAGGED.iter().position(|m| *m == metric)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Edit {
    Remove,
    /// Set to the value of the plan's expression at this index.
    Set(usize),
}

/// One workload side's tag changes for the eight metrics, with their expressions compiled.
#[derive(Debug)]
pub struct TagPlan {
    /// Distinct expressions, each evaluated once per request or connection.
    exprs: Vec<Filter>,
    /// Per metric of [`TAGGED`]: the changes to standard tags, by tag name.
    overrides: [BTreeMap<String, Edit>; 8],
    /// Per metric of [`TAGGED`]: new tags (name order), with their expression's index.
    additions: [Vec<(String, usize)>; 8],
    /// A digest of the above, so that series keys hash cheaply.
    digest: u64,
}

impl PartialEq for TagPlan {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
            && self.overrides == other.overrides
            && self.additions == other.additions
            && self
                .exprs
                .iter()
                .map(Filter::expression)
                .eq(other.exprs.iter().map(Filter::expression))
    }
}

impl TagPlan {
    /// The plan for a side's resolved overrides; None when none of the eight metrics has a tag
    /// change (the data path then pays only for that `Option` check).
    pub fn build(overrides: &BTreeMap<String, MetricOverride>) -> Option<Arc<TagPlan>> {
        let mut plan = TagPlan {
            exprs: Vec::new(),
            overrides: Default::default(),
            additions: Default::default(),
            digest: 0,
        };
        let mut ids: BTreeMap<&str, Option<usize>> = BTreeMap::new();
        let mut any = false;
        for (i, metric) in TAGGED.iter().enumerate() {
            let Some(o) = overrides.get(metric.as_str()) else {
                continue;
            };
            for (tag, action) in &o.tags {
                any = true;
                let standard = STANDARD_TAGS.contains(&tag.as_str());
                let id = match action {
                    TagAction::Remove => None,
                    TagAction::Upsert(expr) => *ids.entry(expr.as_str()).or_insert_with(|| {
                        // Validation rejects an expression that does not parse; were one to
                        // get here, Istio's filter drops a standard tag and skips a new one.
                        let f = Filter::compile(expr).ok()?;
                        plan.exprs.push(f);
                        Some(plan.exprs.len() - 1)
                    }),
                };
                match (standard, action, id) {
                    (true, TagAction::Remove, _) | (true, _, None) => {
                        plan.overrides[i].insert(tag.clone(), Edit::Remove);
                    }
                    (true, _, Some(id)) => {
                        plan.overrides[i].insert(tag.clone(), Edit::Set(id));
                    }
                    (false, TagAction::Upsert(_), Some(id)) => {
                        plan.additions[i].push((tag.clone(), id));
                    }
                    // Removing a tag the metric does not have changes nothing.
                    (false, _, _) => {}
                }
            }
        }
        if !any {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        plan.overrides.hash(&mut h);
        plan.additions.hash(&mut h);
        for e in &plan.exprs {
            e.expression().hash(&mut h);
        }
        plan.digest = h.finish();
        Some(Arc::new(plan))
    }

    /// Evaluates every expression of the plan over one request's (or connection's) attributes.
    pub fn evaluate(
        self: &Arc<Self>,
        attrs: &RequestAttrs<'_>,
        principals: Principals<'_>,
    ) -> SeriesTags {
        let values: Arc<[String]> = if self.exprs.is_empty() {
            Arc::from([])
        } else {
            let activation = Activation::new(attrs, principals);
            self.exprs
                .iter()
                .map(|e| e.tag_value(&activation))
                .collect()
        };
        SeriesTags {
            plan: self.clone(),
            values,
        }
    }

    /// Whether `metric`'s labels are changed at all.
    pub fn changes(&self, metric: IstioMetric) -> bool {
        index(metric)
            .is_some_and(|i| !self.overrides[i].is_empty() || !self.additions[i].is_empty())
    }
}

/// The tag changes of one series: the plan, with its expressions' values for the request or
/// connection. Part of a series' key: equal plans with equal values are the same series.
#[derive(Debug, Clone)]
pub struct SeriesTags {
    plan: Arc<TagPlan>,
    values: Arc<[String]>,
}

impl PartialEq for SeriesTags {
    fn eq(&self, other: &Self) -> bool {
        (Arc::ptr_eq(&self.plan, &other.plan) || self.plan == other.plan)
            && self.values == other.values
    }
}
impl Eq for SeriesTags {}

impl Hash for SeriesTags {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.plan.digest.hash(h);
        self.values.hash(h);
    }
}

impl SeriesTags {
    /// `labels` (a metric's standard labels, in Istio's order) with this series' changes for
    /// `metric` applied.
    pub fn apply<'a>(
        &'a self,
        metric: IstioMetric,
        labels: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        let Some(i) = index(metric) else {
            return labels.to_vec();
        };
        let overrides = &self.plan.overrides[i];
        let mut out: Vec<(&str, &str)> = labels
            .iter()
            .filter_map(|&(k, v)| match overrides.get(k) {
                None => Some((k, v)),
                Some(Edit::Remove) => None,
                Some(Edit::Set(id)) => Some((k, self.value(*id))),
            })
            .collect();
        out.extend(
            self.plan.additions[i]
                .iter()
                .map(|(k, id)| (k.as_str(), self.value(*id))),
        );
        out
    }

    fn value(&self, id: usize) -> &str {
        self.values
            .get(id)
            .map_or(super::filter::UNKNOWN_TAG, String::as_str)
    }
}

#[cfg(test)]
mod tests;
