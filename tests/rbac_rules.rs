//! Kubernetes' RBAC authoriser as the deploy/ tests need it: the attributes of a request and the
//! rule match (`RuleAllows`), shared by the agent's (tests/rbac.rs) and the CA's (tests/ca.rs)
//! checks of their roles against the requests they really make.

use serde_json::Value;

/// One resource request as the authoriser sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub verb: &'static str,
    /// The object's name: in the path, or pinned by a `metadata.name` field selector.
    pub name: Option<String>,
}

/// A rule of a ClusterRole or Role.
#[derive(Debug)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
}

impl Rule {
    /// `rule` of the role named by `role` (for messages); a wildcard group, resource or verb fails
    /// the test: the roles are least privilege.
    pub fn of(rule: &Value, role: &str) -> Rule {
        let strings = |field: &str| -> Vec<String> {
            rule[field]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    v.as_str()
                        .unwrap_or_else(|| panic!("{role}: {field} holds {v}"))
                        .to_owned()
                })
                .collect()
        };
        let r = Rule {
            api_groups: strings("apiGroups"),
            resources: strings("resources"),
            verbs: strings("verbs"),
            resource_names: strings("resourceNames"),
        };
        for wide in [&r.api_groups, &r.resources, &r.verbs] {
            assert!(
                !wide.iter().any(|s| s == "*"),
                "{role}: a wildcard in {rule}"
            );
        }
        r
    }

    /// Kubernetes' `RuleAllows`: with resourceNames, only requests naming one of them.
    pub fn allows(&self, a: &Attributes) -> bool {
        self.api_groups.contains(&a.group)
            && self.resources.contains(&a.resource)
            && self.verbs.iter().any(|v| v == a.verb)
            && (self.resource_names.is_empty()
                || a.name
                    .as_ref()
                    .is_some_and(|n| self.resource_names.contains(n)))
    }
}
