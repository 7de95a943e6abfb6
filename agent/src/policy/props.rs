//! Property tests of the decision algebra over generated policies and connections. Each
//! invariant is one of Istio's evaluation rules ("DENY before ALLOW", deny-by-default only once
//! an ALLOW policy applies) stated so it must hold for every policy set.

use std::net::IpAddr;

use proptest::prelude::*;

use super::compile::WorkloadPolicy;
use super::{evaluate, ConnAttrs, Decision};
use crate::config::istio::security::{Condition, Operation, Rule, RuleFrom, RuleTo, Source};
use crate::config::istio::{Action, AuthorizationPolicy};
use crate::identity::Identity;

fn pick(values: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(values), 0..=2)
        .prop_map(|v| v.into_iter().map(String::from).collect())
}

fn source() -> impl Strategy<Value = Source> {
    let principals = &[
        "cluster.local/ns/a/sa/x",
        "*",
        "cluster.local/ns/b/*",
        "*/sa/y",
    ][..];
    let namespaces = &["a", "b", "*"][..];
    let ips = &["10.0.0.0/24", "10.0.1.5", "192.168.0.0/16"][..];
    (
        pick(principals),
        pick(principals),
        pick(namespaces),
        pick(namespaces),
        pick(ips),
        pick(ips),
        pick(&["*"][..]),
    )
        .prop_map(|(p, np, n, nn, ip, nip, rp)| Source {
            principals: p,
            not_principals: np,
            namespaces: n,
            not_namespaces: nn,
            ip_blocks: ip,
            not_ip_blocks: nip,
            request_principals: rp,
            ..Source::default()
        })
}

fn operation() -> impl Strategy<Value = Operation> {
    let ports = &["80", "8080"][..];
    (pick(ports), pick(ports), pick(&["GET"][..])).prop_map(|(ports, not_ports, methods)| {
        Operation {
            ports,
            not_ports,
            methods,
            ..Operation::default()
        }
    })
}

fn condition() -> impl Strategy<Value = Condition> {
    let keyed = |key: &'static str, values: &'static [&'static str]| {
        (pick(values), pick(values)).prop_map(move |(values, not_values)| Condition {
            key: key.to_string(),
            values,
            not_values,
        })
    };
    prop_oneof![
        keyed("source.ip", &["10.0.0.0/24", "10.0.1.5"]),
        keyed("destination.port", &["80", "9090"]),
        keyed("source.namespace", &["a", "b"]),
        keyed("request.headers[x]", &["1"]),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        prop::collection::vec(source(), 0..=2),
        prop::collection::vec(operation(), 0..=2),
        prop::collection::vec(condition(), 0..=1),
    )
        .prop_map(|(from, to, when)| Rule {
            from: from
                .into_iter()
                .map(|s| RuleFrom { source: Some(s) })
                .collect(),
            to: to
                .into_iter()
                .map(|o| RuleTo { operation: Some(o) })
                .collect(),
            when,
        })
}

fn policy(action: Action) -> impl Strategy<Value = AuthorizationPolicy> {
    prop::collection::vec(rule(), 0..=2).prop_map(move |rules| AuthorizationPolicy {
        rules,
        action,
        ..AuthorizationPolicy::default()
    })
}

fn any_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    prop_oneof![policy(Action::Allow), policy(Action::Deny)]
}

/// Mostly generated policies, sometimes one whose rule `{}` matches everything, so the
/// premises of the invariants below hold often enough to test them.
fn often_matching(action: Action) -> impl Strategy<Value = AuthorizationPolicy> {
    prop_oneof![
        3 => policy(action),
        1 => Just(AuthorizationPolicy {
            rules: vec![Rule::default()],
            action,
            ..AuthorizationPolicy::default()
        }),
    ]
}

#[derive(Debug, Clone)]
struct Conn {
    src: IpAddr,
    identity: Option<Identity>,
    port: u16,
}

fn conn() -> impl Strategy<Value = Conn> {
    let ips = &["10.0.0.3", "10.0.1.5", "192.168.0.1"][..];
    let id = prop_oneof![
        Just(None),
        (
            prop::sample::select(&["a", "b"][..]),
            prop::sample::select(&["x", "y"][..])
        )
            .prop_map(|(ns, sa)| Some(Identity::new("cluster.local", ns, sa))),
    ];
    (
        prop::sample::select(ips),
        id,
        prop::sample::select(&[80u16, 8080, 9090][..]),
    )
        .prop_map(|(ip, identity, port)| Conn {
            src: ip.parse().expect("literal IP"),
            identity,
            port,
        })
}

fn decide(policies: &[AuthorizationPolicy], c: &Conn) -> Decision {
    let named: Vec<(String, AuthorizationPolicy)> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("p{i}"), p.clone()))
        .collect();
    let wp = WorkloadPolicy::from_specs("dst", &named);
    evaluate(
        &wp,
        &ConnAttrs {
            src_ip: c.src,
            dst_ip: "10.9.0.1".parse().expect("literal IP"),
            dst_port: c.port,
            identity: c.identity.as_ref(),
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) A connection matching any applicable DENY policy is denied whatever the ALLOW
    /// policies say.
    #[test]
    fn deny_match_wins_over_any_allow(
        policies in prop::collection::vec(any_policy(), 0..6),
        deny in often_matching(Action::Deny),
        c in conn(),
    ) {
        // The DENY policy alone denies exactly when it matches.
        let matched_alone = !decide(std::slice::from_ref(&deny), &c).is_allowed();
        let mut all = policies.clone();
        all.push(deny);
        let d = decide(&all, &c);
        prop_assert!(!matched_alone || !d.is_allowed(), "a matching DENY policy was overridden: {:?}", d);
    }

    /// (b) Adding a DENY policy never turns a denied connection into an allowed one.
    #[test]
    fn adding_deny_never_allows(
        policies in prop::collection::vec(any_policy(), 0..6),
        deny in often_matching(Action::Deny),
        c in conn(),
    ) {
        let before = decide(&policies, &c);
        let mut all = policies.clone();
        all.push(deny);
        let after = decide(&all, &c);
        prop_assert!(before.is_allowed() || !after.is_allowed(), "denied became allowed: {:?} -> {:?}", before, after);
    }

    /// (c) Adding an ALLOW policy to a workload that already has ALLOW policies never turns an
    /// allowed connection into a denied one.
    #[test]
    fn adding_allow_never_denies_when_allow_policies_exist(
        first_allow in often_matching(Action::Allow),
        rest in prop::collection::vec(any_policy(), 0..6),
        allow in policy(Action::Allow),
        c in conn(),
    ) {
        let mut policies = vec![first_allow];
        policies.extend(rest);
        let before = decide(&policies, &c);
        let mut all = policies.clone();
        all.push(allow);
        let after = decide(&all, &c);
        prop_assert!(!before.is_allowed() || after.is_allowed(), "allowed became denied: {:?} -> {:?}", before, after);
    }
}
