//! The per-connection decision: a pure function of one workload's compiled policy and the
//! connection. No allocation unless a policy is named in the result or an AUDIT policy matches.

use std::net::IpAddr;

use ipnet::IpNet;

use super::compile::{Authz, CRule, CompiledAction, Match, StrMatch, WorkloadPolicy};
use super::{ConnAttrs, Decision, DenyReason, Verdict};
use crate::config::istio::MtlsMode;
use crate::identity::Identity;

/// Decides one inbound connection. Istio's order: PeerAuthentication (STRICT refuses
/// plaintext), then CUSTOM, then DENY, then ALLOW; AUDIT never changes the outcome.
pub fn evaluate(policy: &WorkloadPolicy, conn: &ConnAttrs<'_>) -> Decision {
    let conn = Conn::new(conn);
    let audit = policy
        .audit
        .iter()
        .filter(|a| a.matches(&conn))
        .map(|a| a.key.clone())
        .collect();
    Decision {
        verdict: verdict(policy, &conn),
        audit,
    }
}

fn verdict(policy: &WorkloadPolicy, conn: &Conn<'_>) -> Verdict {
    let mtls = policy.mtls.for_port(conn.dst_port);
    // ztunnel enforces STRICT as a DENY of connections without a peer principal.
    if mtls.mode == MtlsMode::Strict && conn.identity.is_none() {
        if let Some(source) = &mtls.source {
            return Verdict::Deny {
                policy: source.clone(),
                reason: DenyReason::MtlsRequired {
                    port: conn.dst_port,
                },
            };
        }
    }
    // Istio: CUSTOM is evaluated first. ambit cannot evaluate it, so its presence denies.
    if let Some(a) = policy.fail_closed.first() {
        let detail = match &a.action {
            CompiledAction::FailClosed(d) => d.clone(),
            _ => a.key.clone(),
        };
        return Verdict::Deny {
            policy: a.key.clone(),
            reason: DenyReason::Unsupported { detail },
        };
    }
    // Istio: "If there are any DENY policies that match the request, deny the request."
    if let Some(a) = policy.deny.iter().find(|a| a.matches(conn)) {
        return Verdict::Deny {
            policy: a.key.clone(),
            reason: DenyReason::DenyMatched,
        };
    }
    // Istio: "If there are no ALLOW policies for the workload, allow the request."
    let Some(first) = policy.allow.first() else {
        return Verdict::Allow { policy: None };
    };
    // Istio: "If any of the ALLOW policies match the request, allow the request."
    if let Some(a) = policy.allow.iter().find(|a| a.matches(conn)) {
        return Verdict::Allow {
            policy: Some(a.key.clone()),
        };
    }
    // Istio: "Deny the request."
    Verdict::Deny {
        policy: first.key.clone(),
        reason: DenyReason::NotAllowed {
            count: policy.allow.len(),
        },
    }
}

/// The connection with addresses in canonical form (an IPv4-mapped IPv6 source is the IPv4
/// address policies name).
struct Conn<'a> {
    src_ip: IpAddr,
    dst_ip: IpAddr,
    dst_port: u16,
    identity: Option<&'a Identity>,
}

impl<'a> Conn<'a> {
    fn new(c: &ConnAttrs<'a>) -> Self {
        Conn {
            src_ip: c.src_ip.to_canonical(),
            dst_ip: c.dst_ip.to_canonical(),
            dst_port: c.dst_port,
            identity: c.identity,
        }
    }

    /// The source namespace; empty without an identity, as in ztunnel.
    fn namespace(&self) -> &str {
        self.identity.map_or("", |i| i.namespace.as_str())
    }
}

impl Authz {
    /// ztunnel Authorization::matches: any rule; no rules never matches.
    fn matches(&self, conn: &Conn<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(conn))
    }
}

impl CRule {
    fn matches(&self, conn: &Conn<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.iter().any(|m| m.matches(conn)))
    }
}

impl Match {
    fn matches(&self, c: &Conn<'_>) -> bool {
        let in_nets = |nets: &IpNet, ip: IpAddr| nets.contains(&ip);
        field(&self.src_ips, &self.not_src_ips, |n| in_nets(n, c.src_ip))
            && field(&self.dst_ips, &self.not_dst_ips, |n| in_nets(n, c.dst_ip))
            && field(&self.ports, &self.not_ports, |p| *p == c.dst_port)
            && field(&self.namespaces, &self.not_namespaces, |m| {
                m.matches(c.namespace())
            })
            && field(&self.principals, &self.not_principals, |m| {
                c.identity.is_some_and(|id| m.matches_principal(id))
            })
            && field(
                &self.service_accounts,
                &self.not_service_accounts,
                |(ns, sa)| {
                    c.identity
                        .is_some_and(|id| id.namespace == *ns && id.service_account == *sa)
                },
            )
    }
}

/// ztunnel matches_internal: the positive list (if any) must have a match, the negative list
/// (if any) must have none.
fn field<T>(positive: &[T], negative: &[T], pred: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&pred))
        && (negative.is_empty() || !negative.iter().any(&pred))
}

impl StrMatch {
    fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => e == s,
            StrMatch::Prefix(p) => s.starts_with(p.as_str()),
            StrMatch::Suffix(x) => s.ends_with(x.as_str()),
            StrMatch::Presence => !s.is_empty(),
        }
    }

    /// Matches the Istio principal `<td>/ns/<ns>/sa/<sa>` of `id` without building the string.
    pub(super) fn matches_principal(&self, id: &Identity) -> bool {
        let parts = [
            id.trust_domain.as_str(),
            "/ns/",
            id.namespace.as_str(),
            "/sa/",
            id.service_account.as_str(),
        ];
        match self {
            StrMatch::Exact(e) => parts_eq(&parts, e),
            StrMatch::Prefix(p) => parts_start_with(&parts, p),
            StrMatch::Suffix(x) => parts_end_with(&parts, x),
            // The principal always contains "/ns/": never empty.
            StrMatch::Presence => true,
        }
    }
}

fn parts_eq(parts: &[&str], s: &str) -> bool {
    let mut rest = s;
    for p in parts {
        match rest.strip_prefix(p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn parts_start_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix;
    for p in parts {
        if rest.len() <= p.len() {
            return p.starts_with(rest);
        }
        match rest.strip_prefix(p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}

fn parts_end_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix;
    for p in parts.iter().rev() {
        if rest.len() <= p.len() {
            return p.ends_with(rest);
        }
        match rest.strip_suffix(p) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    rest.is_empty()
}
