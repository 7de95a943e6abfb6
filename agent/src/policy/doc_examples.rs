//! Istio's documented AuthorizationPolicy and PeerAuthentication examples and rules, as a table:
//! each case names the rule it checks and where it is written (istio.io page, or istiod/ztunnel
//! source for ambient's L4 reading). Policies go through the real YAML → state path.

use super::tests::{world, Peer, Peer::*};
use super::{Decision, Verdict};

#[derive(Debug)]
enum Expect {
    /// Allowed, by this ALLOW policy (`None`: no ALLOW policy applies).
    Allow(Option<&'static str>),
    /// Denied, naming this policy.
    Deny(&'static str),
}

struct Case {
    rule: &'static str,
    yaml: &'static str,
    /// `namespace/name` of the destination pod (fixture `CLUSTER` in tests.rs).
    pod: &'static str,
    peer: Peer,
    port: u16,
    expect: Expect,
}

const FOO_SLEEP: Peer = Mtls("10.0.1.2", "foo", "sleep");
const BAR_HTTPBIN: Peer = Mtls("10.0.2.1", "bar", "httpbin");
const PLAIN: Peer = Plain("10.0.1.2");

// ---- AuthorizationPolicy (istio.io/latest/docs/reference/config/security/authorization-policy/) --

const ALLOW_NOTHING: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
";

const DENY_ALL: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec:
  action: DENY
  rules:
  - {}
";

const ALLOW_ALL_WITH_NOTHING: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
";

const HTTPBIN_ALLOW: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#;

const HTTPBIN_DENY: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  selector:
    matchLabels: {app: httpbin, version: v1}
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
"#;

const ANY_AUTHENTICATED: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: authenticated, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source:
        principals: ["*"]
"#;

const PRINCIPAL_PREFIX: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-foo, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/*"]
"#;

const PRINCIPAL_SUFFIX: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: any-sleep, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principals: ["*/sa/sleep"]
"#;

const NOT_PRINCIPALS_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-sleep, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["cluster.local/ns/foo/sa/sleep"]
"#;

const INGRESS_IP_BLOCKS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["1.2.3.4", "5.6.7.0/24"]
"#;

const NOT_IP_BLOCKS_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-pod-cidr, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source:
        notIpBlocks: ["10.0.0.0/16"]
"#;

const PORTS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: port-8000, namespace: foo}
spec:
  rules:
  - to:
    - operation:
        ports: ["8000"]
"#;

const NOT_PORTS_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-not-8000, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation:
        notPorts: ["8000"]
"#;

const WHEN_SOURCE_IP: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-foo-cidr, namespace: foo}
spec:
  rules:
  - when:
    - key: source.ip
      values: ["10.0.1.0/24"]
"#;

const WHEN_NAMESPACE_AND_PORT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-port, namespace: foo}
spec:
  rules:
  - when:
    - key: source.namespace
      values: ["foo"]
    - key: destination.port
      notValues: ["9000"]
"#;

const REQUEST_PRINCIPALS_ALLOW: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: foo}
spec:
  rules:
  - from:
    - source:
        requestPrincipals: ["*"]
"#;

/// istio.io/latest/docs/tasks/security/authentication/authn-policy/ (frontend-ingress).
const FRONTEND_INGRESS: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: frontend-ingress, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source:
        notRequestPrincipals: ["*"]
"#;

const DENY_POST_FROM_BAR: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post-from-bar, namespace: foo}
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: ["bar"]
    to:
    - operation:
        methods: ["POST"]
"#;

const WHEN_HEADER_ALLOW: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: header-allow, namespace: foo}
spec:
  rules:
  - when:
    - key: request.headers[version]
      values: ["v1"]
"#;

const SNI_DENY: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sni-deny, namespace: foo}
spec:
  action: DENY
  rules:
  - when:
    - key: connection.sni
      values: ["evil.example.com"]
"#;

const AUDIT: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: foo}
spec:
  action: AUDIT
  rules:
  - {}
"#;

const CUSTOM: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules:
  - to:
    - operation:
        paths: ["/admin"]
"#;

const UNKNOWN_ACTION: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENYY
  rules:
  - {}
"#;

const DENY_NO_RULES: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: foo}
spec:
  action: DENY
"#;

const TARGET_REFS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: foo}
spec:
  targetRefs:
  - {kind: Service, group: "", name: httpbin}
"#;

const ROOT_ALLOW_NOTHING: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
";

const ROOT_SELECTOR_DENY: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-httpbin, namespace: istio-system}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - {}
";

const SERVICE_ACCOUNTS: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sa, namespace: foo}
spec:
  rules:
  - from:
    - source:
        serviceAccounts: ["sleep", "bar/httpbin"]
"#;

// ---- PeerAuthentication (istio.io/latest/docs/tasks/security/authentication/authn-policy/ and
// istio.io/latest/docs/reference/config/security/peer_authentication/) --------------------------

const PA_MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

const PA_MESH_STRICT_FOO_PERMISSIVE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: PERMISSIVE}}
";

const PA_MESH_STRICT_FOO_UNSET: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: UNSET}}
";

const PA_FOO_DISABLE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: DISABLE}}
";

/// authn-policy task: workload STRICT with port 80 DISABLE (here in foo).
const PA_WORKLOAD_PORT: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls:
    80: {mode: DISABLE}
";

/// peer_authentication reference: UNSET workload mode inherits; port 8080 DISABLE.
const PA_UNSET_PORT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: finance, namespace: foo}
spec:
  selector: {matchLabels: {app: finance}}
  mtls: {mode: UNSET}
  portLevelMtls:
    8080: {mode: DISABLE}
";

const PA_TWO_SELECTORS: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-permissive, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-strict, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}
";

const PA_TWO_SELECTORS_AGED: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-permissive, namespace: foo, creationTimestamp: '2024-01-01T00:00:00Z'}
spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-strict, namespace: foo, creationTimestamp: '2025-01-01T00:00:00Z'}
spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}
";

const PA_ROOT_SELECTOR: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-httpbin, namespace: istio-system}
spec: {selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}
";

const PA_STRICT_WITH_ALLOW_ALL: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec: {rules: [{}]}
";

fn cases() -> Vec<Case> {
    use Expect::*;
    let c = |rule, yaml, pod, peer, port, expect| Case {
        rule,
        yaml,
        pod,
        peer,
        port,
        expect,
    };
    vec![
        c("AP reference allow-nothing: `spec: {}` (ALLOW, no rules) denies mTLS requests", ALLOW_NOTHING, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/allow-nothing")),
        c("AP reference allow-nothing: `spec: {}` denies plaintext too", ALLOW_NOTHING, "foo/sleep", PLAIN, 8000, Deny("foo/allow-nothing")),
        c("AP reference allow-nothing: a namespace policy does not reach another namespace", ALLOW_NOTHING, "bar/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("AP reference deny-all: DENY with rule `{}` denies every request", DENY_ALL, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/deny-all")),
        c("AP reference allow-all: ALLOW with rule `{}` allows every request, whatever allow-nothing says", ALLOW_ALL_WITH_NOTHING, "foo/httpbin", PLAIN, 8000, Allow(Some("foo/allow-all"))),
        c("istiod handleRule: an ALLOW rule with HTTP attributes (methods, paths, request.auth) never matches at L4", HTTPBIN_ALLOW, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/httpbin")),
        c("concepts/security httpbin-deny: DENY notNamespaces [foo] denies another namespace", HTTPBIN_DENY, "foo/httpbin", BAR_HTTPBIN, 8000, Deny("foo/httpbin-deny")),
        c("concepts/security httpbin-deny: DENY notNamespaces [foo] lets foo through", HTTPBIN_DENY, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("ztunnel rbac not_namespaces: plaintext has no namespace, so notNamespaces matches it", HTTPBIN_DENY, "foo/httpbin", PLAIN, 8000, Deny("foo/httpbin-deny")),
        c("httpbin-deny selector {app: httpbin, version: v1}: a pod without version: v1 is not selected", HTTPBIN_DENY, "bar/httpbin", BAR_HTTPBIN, 8000, Allow(None)),
        c("concepts/security authenticated identity: principals [\"*\"] matches any mTLS peer", ANY_AUTHENTICATED, "foo/httpbin", BAR_HTTPBIN, 8000, Allow(Some("foo/authenticated"))),
        c("concepts/security authenticated identity: principals [\"*\"] does not match plaintext", ANY_AUTHENTICATED, "foo/httpbin", PLAIN, 8000, Deny("foo/authenticated")),
        c("AP reference: principal prefix match `cluster.local/ns/foo/*`", PRINCIPAL_PREFIX, "foo/httpbin", FOO_SLEEP, 8000, Allow(Some("foo/from-foo"))),
        c("AP reference: principal prefix match rejects another namespace", PRINCIPAL_PREFIX, "foo/httpbin", BAR_HTTPBIN, 8000, Deny("foo/from-foo")),
        c("AP reference: principal suffix match `*/sa/sleep`", PRINCIPAL_SUFFIX, "foo/httpbin", FOO_SLEEP, 8000, Allow(Some("foo/any-sleep"))),
        c("AP reference: notPrincipals in DENY denies every other identity", NOT_PRINCIPALS_DENY, "foo/httpbin", BAR_HTTPBIN, 8000, Deny("foo/only-sleep")),
        c("ztunnel rbac not_principals: plaintext matches notPrincipals", NOT_PRINCIPALS_DENY, "foo/httpbin", PLAIN, 8000, Deny("foo/only-sleep")),
        c("AP reference: notPrincipals in DENY lets the named identity through", NOT_PRINCIPALS_DENY, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("authz-ingress ipBlocks: a source inside a listed CIDR is allowed", INGRESS_IP_BLOCKS, "foo/httpbin", Plain("5.6.7.9"), 8000, Allow(Some("foo/ingress-policy"))),
        c("authz-ingress ipBlocks: a single IP is a full-length prefix", INGRESS_IP_BLOCKS, "foo/httpbin", Plain("1.2.3.4"), 8000, Allow(Some("foo/ingress-policy"))),
        c("authz-ingress ipBlocks: a source outside every block is denied", INGRESS_IP_BLOCKS, "foo/httpbin", Plain("5.6.8.1"), 8000, Deny("foo/ingress-policy")),
        c("AP reference notIpBlocks: DENY everything outside 10.0.0.0/16", NOT_IP_BLOCKS_DENY, "foo/httpbin", Mtls("192.168.1.1", "foo", "sleep"), 8000, Deny("foo/only-pod-cidr")),
        c("AP reference notIpBlocks: a source inside the block is not denied", NOT_IP_BLOCKS_DENY, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("AP reference ports: the destination (workload) port is listed", PORTS, "foo/httpbin", PLAIN, 8000, Allow(Some("foo/port-8000"))),
        c("AP reference ports: another port is not", PORTS, "foo/httpbin", PLAIN, 9000, Deny("foo/port-8000")),
        c("AP reference notPorts: DENY on every port but 8000", NOT_PORTS_DENY, "foo/httpbin", FOO_SLEEP, 9000, Deny("foo/deny-not-8000")),
        c("AP reference notPorts: port 8000 is not denied", NOT_PORTS_DENY, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("conditions reference source.ip: CIDR value matches", WHEN_SOURCE_IP, "foo/httpbin", PLAIN, 8000, Allow(Some("foo/from-foo-cidr"))),
        c("conditions reference source.ip: outside the CIDR does not", WHEN_SOURCE_IP, "foo/httpbin", Plain("10.0.2.1"), 8000, Deny("foo/from-foo-cidr")),
        c("AP reference when: conditions are ANDed (source.namespace and destination.port notValues)", WHEN_NAMESPACE_AND_PORT, "foo/httpbin", FOO_SLEEP, 8000, Allow(Some("foo/ns-port"))),
        c("AP reference when: one failing condition fails the rule", WHEN_NAMESPACE_AND_PORT, "foo/httpbin", FOO_SLEEP, 9000, Deny("foo/ns-port")),
        c("ztunnel rbac namespaces: plaintext never matches a positive source.namespace", WHEN_NAMESPACE_AND_PORT, "foo/httpbin", PLAIN, 8000, Deny("foo/ns-port")),
        c("istiod httpSources: requestPrincipals in an ALLOW rule never match at L4 (fail closed)", REQUEST_PRINCIPALS_ALLOW, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/require-jwt")),
        c("authn-policy frontend-ingress: notRequestPrincipals in DENY is enforced without it, denying all (ambit fails closed where ztunnel skips the empty match, istio/istio#61126)", FRONTEND_INGRESS, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/frontend-ingress")),
        c("istiod DENY boilerplate: a DENY rule is enforced without its HTTP methods (more restrictive)", DENY_POST_FROM_BAR, "foo/httpbin", BAR_HTTPBIN, 8000, Deny("foo/deny-post-from-bar")),
        c("istiod DENY boilerplate: the L4 part still has to match", DENY_POST_FROM_BAR, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("istiod l4WhenAttributes: request.headers in an ALLOW rule never matches", WHEN_HEADER_ALLOW, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/header-allow")),
        c("istiod l4WhenAttributes: connection.sni is not L4 for ztunnel; in DENY it is ignored (fail closed)", SNI_DENY, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/sni-deny")),
        c("AP reference AUDIT: an AUDIT policy does not change the decision", AUDIT, "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("issue 5: CUSTOM is rejected and the workloads it selects deny", CUSTOM, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/ext-authz")),
        c("issue 5: CUSTOM's selector is kept; unselected workloads are unaffected", CUSTOM, "foo/sleep", FOO_SLEEP, 8000, Allow(None)),
        c("issue 5: an unknown action value rejects the policy and its workloads deny", UNKNOWN_ACTION, "foo/httpbin", FOO_SLEEP, 8000, Deny("foo/typo")),
        c("Istio validation: DENY without rules is rejected, so (issue 5) its namespace denies", DENY_NO_RULES, "foo/sleep", FOO_SLEEP, 8000, Deny("foo/deny-nothing")),
        c("ambient policy docs: targetRefs policies are enforced by a waypoint, not the node proxy", TARGET_REFS, "foo/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("AP reference: a root-namespace policy without selector applies mesh-wide", ROOT_ALLOW_NOTHING, "bar/httpbin", FOO_SLEEP, 8000, Deny("istio-system/allow-nothing")),
        c("AP reference: a root-namespace selector matches workloads in all namespaces", ROOT_SELECTOR_DENY, "bar/httpbin", FOO_SLEEP, 8000, Deny("istio-system/no-httpbin")),
        c("AP reference: a root-namespace selector still needs the labels", ROOT_SELECTOR_DENY, "foo/sleep", FOO_SLEEP, 8000, Allow(None)),
        c("AP reference serviceAccounts: a bare name is in the policy's namespace", SERVICE_ACCOUNTS, "foo/httpbin", FOO_SLEEP, 8000, Allow(Some("foo/sa"))),
        c("AP reference serviceAccounts: `namespace/name` form", SERVICE_ACCOUNTS, "foo/httpbin", BAR_HTTPBIN, 8000, Allow(Some("foo/sa"))),
        c("AP reference serviceAccounts: another account is not listed", SERVICE_ACCOUNTS, "foo/httpbin", Mtls("10.0.2.1", "bar", "sleep"), 8000, Deny("foo/sa")),
        c("PA: mesh-wide STRICT refuses plaintext", PA_MESH_STRICT, "bar/httpbin", PLAIN, 8000, Deny("istio-system/default")),
        c("PA: mesh-wide STRICT accepts mTLS", PA_MESH_STRICT, "bar/httpbin", FOO_SLEEP, 8000, Allow(None)),
        c("PA: namespace PERMISSIVE overrides mesh STRICT", PA_MESH_STRICT_FOO_PERMISSIVE, "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("PA: namespace override does not reach another namespace", PA_MESH_STRICT_FOO_PERMISSIVE, "bar/httpbin", PLAIN, 8000, Deny("istio-system/default")),
        c("PA reference: UNSET inherits from the parent (mesh STRICT)", PA_MESH_STRICT_FOO_UNSET, "foo/httpbin", PLAIN, 8000, Deny("istio-system/default")),
        c("PA: DISABLE is PERMISSIVE for inbound at the node proxy (ztunnel: not STRICT)", PA_FOO_DISABLE, "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("authn-policy portLevelMtls: workload STRICT refuses plaintext on other ports", PA_WORKLOAD_PORT, "foo/httpbin", PLAIN, 8000, Deny("foo/httpbin")),
        c("authn-policy portLevelMtls: port 80 DISABLE accepts plaintext", PA_WORKLOAD_PORT, "foo/httpbin", PLAIN, 80, Allow(None)),
        c("PA reference: UNSET workload mode inherits mesh STRICT on ports not listed", PA_UNSET_PORT, "foo/finance", PLAIN, 9000, Deny("istio-system/default")),
        c("PA reference: portLevelMtls 8080 DISABLE under an UNSET workload mode", PA_UNSET_PORT, "foo/finance", PLAIN, 8080, Allow(None)),
        c("PA: nothing set is PERMISSIVE", "", "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("PA: two workload selectors match; without timestamps the first name wins (ambit's rule)", PA_TWO_SELECTORS, "foo/httpbin", PLAIN, 8000, Deny("foo/a-strict")),
        c("istiod getOldestPeerAuthn: the oldest creationTimestamp wins over the name", PA_TWO_SELECTORS_AGED, "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("istiod convertedSelectorPeerAuthentications: a root-namespace selector PA is ignored", PA_ROOT_SELECTOR, "foo/httpbin", PLAIN, 8000, Allow(None)),
        c("ztunnel order: PeerAuthentication STRICT is checked before any ALLOW policy", PA_STRICT_WITH_ALLOW_ALL, "foo/httpbin", PLAIN, 8000, Deny("foo/default")),
    ]
}

fn describe(d: &Decision) -> String {
    format!("{:?} audit={:?}", d.verdict, d.audit)
}

#[test]
fn istio_documented_examples() {
    let mut failures = Vec::new();
    for case in cases() {
        let w = world(case.yaml);
        let compiled = w.compile();
        let d = w.check(&compiled, case.pod, &case.peer, case.port);
        let ok = match (&case.expect, &d.verdict) {
            (Expect::Allow(want), Verdict::Allow { policy }) => policy.as_deref() == *want,
            (Expect::Deny(want), Verdict::Deny { policy, .. }) => &**policy == *want,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}\n    {:?} -> {} port {}: expected {:?}, got {}\n    rejected: {:?}",
                case.rule,
                case.peer,
                case.pod,
                case.port,
                case.expect,
                describe(&d),
                w.errors
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} documented rule(s) not met:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn audit_policies_are_reported_not_enforced() {
    let w = world(AUDIT);
    let c = w.compile();
    let d = w.check(&c, "foo/httpbin", &PLAIN, 8000);
    assert!(
        d.is_allowed(),
        "AP reference: AUDIT does not affect the decision: {d:?}"
    );
    assert_eq!(
        d.audit.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        ["foo/audit-all"],
        "the matching AUDIT policy is returned for the audit log"
    );
}

#[test]
fn denials_say_why() {
    let w = world(CUSTOM);
    let c = w.compile();
    let d = w.check(&c, "foo/httpbin", &FOO_SLEEP, 8000);
    let (policy, reason) = d.verdict.deny_parts().expect("CUSTOM denies");
    assert_eq!(policy, "foo/ext-authz", "the CUSTOM policy is named");
    assert!(
        reason.contains("CUSTOM"),
        "the reason says CUSTOM is unsupported: {reason}"
    );
    assert!(
        w.errors
            .iter()
            .any(|e| e.object.name == "ext-authz" && e.message.contains("CUSTOM")),
        "the config layer reports CUSTOM as an error: {:?}",
        w.errors
    );
    let w = world(PA_MESH_STRICT);
    let c = w.compile();
    let d = w.check(&c, "foo/httpbin", &PLAIN, 8000);
    let (policy, reason) = d.verdict.deny_parts().expect("STRICT denies plaintext");
    assert_eq!(
        policy, "istio-system/default",
        "the PeerAuthentication is named"
    );
    assert!(
        reason.contains("STRICT") && reason.contains("8000"),
        "{reason}"
    );
}
