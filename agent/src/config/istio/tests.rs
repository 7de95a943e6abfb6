//! Tests of the Istio model against Istio's own documented examples, verbatim (each names the
//! istio.io page or istio/istio sample it comes from), and one bad input per validation rule,
//! asserting the exact field path of the error.

use std::time::Duration;

use serde_json::{json, Value};

use super::common::parse_duration;
use super::destination_rule::{effective_simple_lb, SimpleLb, TlsMode};
use super::doc_examples;
use super::*;

fn yaml(doc: &str) -> Value {
    serde_yaml::from_str(doc).expect("test YAML parses")
}

fn parse_ok(doc: &str) -> IstioConfig {
    match IstioConfig::parse(yaml(doc)) {
        Ok((config, ignored)) => {
            assert!(ignored.is_empty(), "unexpected ignored fields {ignored:?}");
            config
        }
        Err(errors) => panic!("expected a valid object, got {errors:?}"),
    }
}

fn vs(c: &IstioConfig) -> &VirtualService {
    match c {
        IstioConfig::VirtualService(o) => &o.spec,
        other => panic!("expected a VirtualService, got {:?}", other.kind()),
    }
}

fn dr(c: &IstioConfig) -> &DestinationRule {
    match c {
        IstioConfig::DestinationRule(o) => &o.spec,
        other => panic!("expected a DestinationRule, got {:?}", other.kind()),
    }
}

fn se(c: &IstioConfig) -> &ServiceEntry {
    match c {
        IstioConfig::ServiceEntry(o) => &o.spec,
        other => panic!("expected a ServiceEntry, got {:?}", other.kind()),
    }
}

fn ap(c: &IstioConfig) -> &AuthorizationPolicy {
    match c {
        IstioConfig::AuthorizationPolicy(o) => &o.spec,
        other => panic!("expected an AuthorizationPolicy, got {:?}", other.kind()),
    }
}

fn pa(c: &IstioConfig) -> &PeerAuthentication {
    match c {
        IstioConfig::PeerAuthentication(o) => &o.spec,
        other => panic!("expected a PeerAuthentication, got {:?}", other.kind()),
    }
}

type Check = fn(&IstioConfig);

/// (page, YAML as documented, assertions on the parsed value and documented defaults)
fn documented_examples() -> Vec<(&'static str, &'static str, Check)> {
    vec![
        ("istio.io/latest/docs/concepts/traffic-management/ (samples/bookinfo/networking/virtual-service-reviews-jason-v2-v3.yaml)",
         doc_examples::REVIEWS_JASON, |c| {
            let v = vs(c);
            assert_eq!(v.hosts, ["reviews"]);
            assert_eq!(v.effective_gateways(), ["mesh"], "Istio: no gateways means mesh");
            let jason = &v.http[0].matches[0].headers["end-user"];
            assert_eq!(jason.matcher(), Some(common::Match::Exact("jason")));
            assert_eq!(v.http[0].route[0].destination.subset, "v2");
            assert_eq!(v.http[1].matches.len(), 0);
            assert_eq!(v.http[1].route[0].destination.subset, "v3");
        }),
        ("istio.io/latest/docs/reference/config/networking/virtual-service/#Headers",
         doc_examples::REVIEWS_WEIGHTS_HEADERS, |c| {
            let http = &vs(c).http[0];
            let set = &http.headers.as_ref().unwrap().request.as_ref().unwrap().set;
            assert_eq!(set["test"], "true");
            assert_eq!((http.route[0].weight, http.route[1].weight), (25, 75));
            let response = http.route[1].headers.as_ref().unwrap().response.as_ref().unwrap();
            assert_eq!(response.remove, ["foo"]);
        }),
        ("istio.io/latest/docs/tasks/traffic-management/fault-injection/ (virtual-service-ratings-test-delay.yaml)",
         doc_examples::RATINGS_DELAY, |c| {
            let delay = vs(c).http[0].fault.as_ref().unwrap().delay.as_ref().unwrap();
            assert_eq!(delay.fixed_delay, Some(Duration::from_secs(7)));
            assert_eq!(delay.effective_percentage(), 100.0);
        }),
        ("istio.io/latest/docs/tasks/traffic-management/fault-injection/ (virtual-service-ratings-test-abort.yaml)",
         doc_examples::RATINGS_ABORT, |c| {
            let abort = vs(c).http[0].fault.as_ref().unwrap().abort.as_ref().unwrap();
            assert_eq!((abort.http_status, abort.effective_percentage()), (Some(500), 100.0));
        }),
        ("istio.io/latest/docs/reference/config/networking/virtual-service/#HTTPRetry",
         doc_examples::RATINGS_RETRIES, |c| {
            let retries = vs(c).http[0].retries.as_ref().unwrap();
            assert_eq!(retries.attempts, 3);
            assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
            assert_eq!(retries.retry_on, "gateway-error,connect-failure,refused-stream");
            assert_eq!(vs(c).http[0].timeout, None, "Istio: timeout disabled by default");
        }),
        ("istio.io/latest/docs/reference/config/networking/virtual-service/#CorsPolicy",
         doc_examples::RATINGS_CORS, |c| {
            let cors = vs(c).http[0].cors_policy.as_ref().unwrap();
            assert_eq!(cors.allow_origins[0].exact.as_deref(), Some("https://example.com"));
            assert_eq!(cors.allow_methods, ["POST", "GET"]);
            assert_eq!(cors.allow_credentials, Some(false));
            assert_eq!(cors.max_age, Some(Duration::from_secs(24 * 3600)));
        }),
        ("istio.io/latest/docs/reference/config/networking/virtual-service/#TLSRoute",
         doc_examples::BOOKINFO_SNI, |c| {
            let v = vs(c);
            assert_eq!(v.effective_gateways(), ["mygateway"]);
            assert_eq!(v.tls[1].matches[0].sni_hosts, ["reviews.bookinfo.com"]);
            assert_eq!(v.tls[1].matches[0].port, 443);
        }),
        ("istio.io/latest/docs/reference/config/networking/virtual-service/#TCPRoute",
         doc_examples::BOOKINFO_MONGO, |c| {
            let tcp = &vs(c).tcp[0];
            assert_eq!(tcp.matches[0].port, 27017);
            assert_eq!(tcp.route[0].destination.port, Some(PortSelector { number: 5555 }));
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/",
         doc_examples::RATINGS_TESTVERSION, |c| {
            let d = dr(c);
            let lb = d.traffic_policy.as_ref().unwrap().load_balancer.as_ref();
            assert_eq!(effective_simple_lb(lb), SimpleLb::LeastRequest);
            let sub = d.subset("testversion").expect("subset testversion");
            assert_eq!(sub.labels["version"], "v3");
            let lb = sub.traffic_policy.as_ref().unwrap().load_balancer.as_ref();
            assert_eq!(effective_simple_lb(lb), SimpleLb::RoundRobin);
        }),
        ("istio.io/latest/docs/concepts/traffic-management/#destination-rule-example",
         doc_examples::MY_DESTINATION_RULE, |c| {
            let d = dr(c);
            let names: Vec<&str> = d.subsets.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["v1", "v2", "v3"]);
            let lb = d.traffic_policy.as_ref().unwrap().load_balancer.as_ref();
            assert_eq!(effective_simple_lb(lb), SimpleLb::Random);
            assert!(d.subset("v3").unwrap().traffic_policy.is_none());
        }),
        ("samples/bookinfo/networking/destination-rule-all.yaml (docs/examples/bookinfo)",
         doc_examples::BOOKINFO_REVIEWS_DR, |c| {
            let d = dr(c);
            assert_eq!(d.subsets.len(), 3);
            // Istio concepts/traffic-management: "By default, Istio uses a least requests" policy.
            assert_eq!(effective_simple_lb(None), SimpleLb::LeastRequest);
            assert!(d.traffic_policy.is_none());
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/#OutlierDetection",
         doc_examples::REVIEWS_CB_POLICY, |c| {
            let tp = dr(c).traffic_policy.as_ref().unwrap();
            let pool = tp.connection_pool.as_ref().unwrap();
            let tcp = pool.tcp.as_ref().unwrap();
            assert_eq!(tcp.max_connections, 100);
            assert_eq!(tcp.connect_timeout(), Duration::from_secs(10), "Istio default 10s");
            assert_eq!(pool.http.as_ref().unwrap().max_requests_per_connection, 10);
            let o = tp.outlier_detection.as_ref().unwrap();
            assert_eq!(o.consecutive_5xx_errors(), 7);
            assert_eq!((o.interval(), o.base_ejection_time()), (Duration::from_secs(300), Duration::from_secs(900)));
            assert_eq!(o.max_ejection_percent(), 10, "Istio default 10%");
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/#ConnectionPoolSettings",
         doc_examples::BOOKINFO_REDIS, |c| {
            let tcp = dr(c).traffic_policy.as_ref().unwrap().connection_pool.as_ref().unwrap().tcp.clone().unwrap();
            assert_eq!(tcp.connect_timeout(), Duration::from_millis(30));
            assert_eq!(tcp.tcp_keepalive.unwrap().interval, Some(Duration::from_secs(75)));
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/#ClientTLSSettings",
         doc_examples::DB_MTLS, |c| {
            let tls = dr(c).traffic_policy.as_ref().unwrap().tls.as_ref().unwrap();
            assert_eq!(tls.mode, TlsMode::Mutual);
            assert_eq!(tls.private_key, "/etc/certs/client_private_key.pem");
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/#LoadBalancerSettings",
         doc_examples::RATINGS_COOKIE, |c| {
            let lb = dr(c).traffic_policy.as_ref().unwrap().load_balancer.as_ref().unwrap();
            let cookie = lb.consistent_hash.as_ref().unwrap().http_cookie.as_ref().unwrap();
            assert_eq!((cookie.name.as_str(), cookie.ttl), ("user", Some(Duration::ZERO)));
        }),
        ("istio.io/latest/docs/reference/config/networking/destination-rule/ (port-level settings)",
         doc_examples::RATINGS_PORT_LEVEL, |c| {
            let pls = &dr(c).traffic_policy.as_ref().unwrap().port_level_settings;
            assert_eq!(pls[1].port, Some(PortSelector { number: 9080 }));
            assert_eq!(effective_simple_lb(pls[1].load_balancer.as_ref()), SimpleLb::RoundRobin);
        }),
        ("istio.io/latest/docs/reference/config/networking/service-entry/ (external-svc-https)",
         doc_examples::EXTERNAL_SVC_HTTPS, |c| {
            let s = se(c);
            assert_eq!(s.hosts.len(), 3);
            assert_eq!((s.location, s.resolution), (Location::MeshExternal, Resolution::Dns));
            assert_eq!((s.ports[0].protocol.as_str(), s.ports[0].target_port()), ("TLS", 443));
        }),
        ("istio.io/latest/docs/reference/config/networking/service-entry/ (external-svc-mongocluster)",
         doc_examples::EXTERNAL_SVC_MONGOCLUSTER, |c| {
            let s = se(c);
            assert_eq!((s.location, s.resolution), (Location::MeshInternal, Resolution::Static));
            assert_eq!(s.addresses, ["192.192.192.192/24"]);
            let addrs: Vec<&str> = s.endpoints.iter().map(|e| e.address.as_str()).collect();
            assert_eq!(addrs, ["2.2.2.2", "3.3.3.3"]);
            assert_eq!(s.endpoints[0].port_for(&s.ports[0]), 27018, "no map, no targetPort");
        }),
        ("istio.io/latest/docs/reference/config/networking/service-entry/ (external-svc-dns)",
         doc_examples::EXTERNAL_SVC_DNS, |c| {
            let s = se(c);
            assert_eq!(s.endpoints[1].port_for(&s.ports[0]), 9080, "endpoint port map wins");
        }),
        ("istio.io/latest/docs/reference/config/security/authorization-policy/ (allow-nothing)",
         doc_examples::ALLOW_NOTHING, |c| {
            let p = ap(c);
            assert_eq!(p.action, Action::Allow, "Istio: default action is ALLOW");
            assert!(p.rules.is_empty() && p.selector.is_none());
        }),
        ("istio.io/latest/docs/reference/config/security/authorization-policy/ (allow-all)",
         doc_examples::ALLOW_ALL, |c| {
            let p = ap(c);
            assert_eq!(p.rules.len(), 1);
            assert!(p.rules[0].from.is_empty() && p.rules[0].to.is_empty() && p.rules[0].when.is_empty());
        }),
        ("istio.io/latest/docs/reference/config/security/authorization-policy/ (httpbin ALLOW)",
         doc_examples::HTTPBIN_ALLOW, |c| {
            let rule = &ap(c).rules[0];
            assert_eq!(rule.from[1].source.as_ref().unwrap().namespaces, ["test"]);
            assert_eq!(rule.to[0].operation.as_ref().unwrap().paths, ["/info*"]);
            assert_eq!(rule.when[0].key, "request.auth.claims[iss]");
        }),
        ("istio.io/latest/docs/concepts/security/#authorization-policies (httpbin-deny)",
         doc_examples::HTTPBIN_DENY, |c| {
            let p = ap(c);
            assert_eq!(p.action, Action::Deny);
            assert_eq!(p.selector.as_ref().unwrap().match_labels["version"], "v1");
            assert_eq!(p.rules[0].from[0].source.as_ref().unwrap().not_namespaces, ["foo"]);
        }),
        ("istio.io/latest/docs/concepts/security/#authenticated-and-unauthenticated-identity",
         doc_examples::PRINCIPALS_WILDCARD, |c| {
            assert_eq!(ap(c).rules[0].from[0].source.as_ref().unwrap().principals, ["*"]);
        }),
        ("istio.io/latest/docs/tasks/security/authorization/authz-ingress/ (ingress-policy)",
         doc_examples::INGRESS_IP_BLOCKS, |c| {
            let src = ap(c).rules[0].from[0].source.clone().unwrap();
            assert_eq!(src.ip_blocks, ["1.2.3.4", "5.6.7.0/24"]);
        }),
        ("istio.io/latest/docs/tasks/security/authentication/authn-policy/ (frontend-ingress)",
         doc_examples::FRONTEND_INGRESS, |c| {
            let src = ap(c).rules[0].from[0].source.clone().unwrap();
            assert_eq!(src.not_request_principals, ["*"]);
        }),
        ("istio.io/latest/docs/tasks/security/authentication/authn-policy/ (mesh-wide STRICT)",
         doc_examples::PA_MESH_STRICT, |c| {
            assert_eq!(c.metadata().namespace.as_deref(), Some("istio-system"));
            assert_eq!(pa(c).mode(), MtlsMode::Strict);
        }),
        ("istio.io/latest/docs/tasks/security/authentication/authn-policy/ (namespace-wide)",
         doc_examples::PA_NAMESPACE_STRICT, |c| {
            assert!(pa(c).selector.is_none());
            assert_eq!(pa(c).mode_for_port(8080), MtlsMode::Strict);
        }),
        ("istio.io/latest/docs/tasks/security/authentication/authn-policy/ (workload portLevelMtls)",
         doc_examples::PA_WORKLOAD_PORT, |c| {
            let p = pa(c);
            assert_eq!((p.mode_for_port(80), p.mode_for_port(8000)), (MtlsMode::Disable, MtlsMode::Strict));
        }),
        ("istio.io/latest/docs/reference/config/security/peer_authentication/ (UNSET inherits)",
         doc_examples::PA_UNSET_PORT, |c| {
            let p = pa(c);
            assert_eq!(p.mode(), MtlsMode::Unset);
            assert_eq!(p.mode().resolve(Some(MtlsMode::Strict)), MtlsMode::Strict);
            assert_eq!(p.mode().resolve(None), MtlsMode::Permissive, "Istio: no parent means PERMISSIVE");
            assert_eq!(p.mode_for_port(8080), MtlsMode::Disable);
        }),
    ]
}

#[test]
fn istio_documented_examples_parse_with_documented_defaults() {
    for (page, doc, check) in documented_examples() {
        println!("{page}");
        check(&parse_ok(doc));
    }
}

fn object(kind: &str, spec: &str) -> Value {
    let (api_version, kind) = match kind {
        "vs" => ("networking.istio.io/v1", "VirtualService"),
        "dr" => ("networking.istio.io/v1beta1", "DestinationRule"),
        "se" => ("networking.istio.io/v1alpha3", "ServiceEntry"),
        "ap" => ("security.istio.io/v1", "AuthorizationPolicy"),
        "pa" => ("security.istio.io/v1beta1", "PeerAuthentication"),
        other => panic!("unknown test kind {other}"),
    };
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "t", "namespace": "ns"}, "spec": yaml(spec)})
}

const ROUTE: &str = "route: [{destination: {host: a}}]";

/// One bad input per validation class: (kind, spec, expected field, expected message fragment).
fn bad_inputs() -> Vec<(&'static str, String, &'static str, &'static str)> {
    let http = |rule: &str| format!("{{hosts: [a.ns.svc], http: [{{{rule}}}]}}");
    vec![
        // VirtualService
        ("vs", format!("{{hosts: ['*'], http: [{{{ROUTE}}}]}}"), "spec.hosts[0]", "wildcard host * is not allowed"),
        ("vs", format!("{{tcp: [{{{ROUTE}}}]}}"), "spec.tcp", "delegate virtual service must have no tcp route"),
        ("vs", "{hosts: [a]}".into(), "spec", "http, tcp or tls must be provided"),
        ("vs", http("route: [{destination: {host: a}, weight: 10}, {destination: {host: b}, weight: x}]"), "spec.http[0].route[1].weight", "invalid type"),
        ("vs", http("route: [{destination: {host: a}, weight: 0}, {destination: {host: b}}]"), "spec.http[0].route", "total destination weight = 0"),
        ("vs", http("route: [{destination: {host: a}, weight: 10}, {destination: {host: b}, weight: -1}]"), "spec.http[0].route[1].weight", "weight -1 < 0"),
        ("vs", http(&format!("match: [{{uri: {{regex: '(unclosed'}}}}], {ROUTE}")), "spec.http[0].match[0].uri.regex", "RE2"),
        ("vs", http(&format!("match: [{{uri: {{exact: /a, prefix: /b}}}}], {ROUTE}")), "spec.http[0].match[0].uri", "only one of exact, prefix or regex"),
        ("vs", http(&format!("match: [{{method: {{}}}}], {ROUTE}")), "spec.http[0].match[0].method", "exactly one of exact, prefix or regex"),
        ("vs", http(&format!("timeout: '10', {ROUTE}")), "spec.http[0].timeout", "missing unit"),
        ("vs", http(&format!("timeout: 0s, {ROUTE}")), "spec.http[0].timeout", "duration must be greater than 1ms"),
        ("vs", http(&format!("retries: {{attempts: -1}}, {ROUTE}")), "spec.http[0].retries.attempts", "attempts cannot be negative"),
        ("vs", http(&format!("retries: {{attempts: 2, retryOn: 'sometimes'}}, {ROUTE}")), "spec.http[0].retries.retryOn", "not a valid retryOn policy"),
        ("vs", http(&format!("fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 150}}}}}}, {ROUTE}")), "spec.http[0].fault.delay.percentage", "neither 0.0, nor in range"),
        ("vs", http(&format!("fault: {{delay: {{fixedDelay: 1s, percent: 101}}}}, {ROUTE}")), "spec.http[0].fault.delay.percent", "not in range 0..100"),
        ("vs", http(&format!("fault: {{abort: {{httpStatus: 700}}}}, {ROUTE}")), "spec.http[0].fault.abort.httpStatus", "not in range 200-599"),
        ("vs", http(&format!("match: [{{port: 70000}}], {ROUTE}")), "spec.http[0].match[0].port", "must be in the range 1..65535"),
        ("vs", http("route: [{destination: {host: a, port: {number: 0}}}]"), "spec.http[0].route[0].destination.port.number", "1..65535"),
        ("vs", http("route: [{destination: {subset: v1}}]"), "spec.http[0].route[0].destination.host", "destination host is required"),
        ("vs", http(&format!("mirrorPercentage: {{value: 101}}, {ROUTE}")), "spec.http[0].mirrorPercentage", "[0, 100]"),
        ("vs", http("redirect: {uri: /x, redirectCode: 200}"), "spec.http[0].redirect.redirectCode", "must be 3xx"),
        ("vs", http(&format!("rewrite: {{}}, {ROUTE}")), "spec.http[0].rewrite", "rewrite must specify at least one of"),
        ("vs", "{hosts: [a], tcp: [{match: [{destinationSubnets: [10.0.0.0/40]}], route: [{destination: {host: b}}]}]}".into(), "spec.tcp[0].match[0].destinationSubnets[0]", "not a valid CIDR block"),
        ("vs", "{hosts: ['*.x.com'], tls: [{match: [{sniHosts: [y.com]}], route: [{destination: {host: b}}]}]}".into(), "spec.tls[0].match[0].sniHosts[0]", "not a compatible subset"),
        ("vs", http("redirect: {uri: /x, derivePort: FROM_NOWHERE}"), "spec.http[0].redirect.derivePort", "unknown variant \"FROM_NOWHERE\", expected one of FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT"),
        ("vs", format!("{{hosts: [a], exportTo: ['*', ns2], http: [{{{ROUTE}}}]}}"), "spec.exportTo", "both public (*) and non-public"),
        // DestinationRule
        ("dr", "{subsets: [{name: v1}]}".into(), "spec.host", "host is required"),
        ("dr", "{host: r, subsets: [{name: v1, labels: {version: v1}}, {name: v1, labels: {version: v2}}]}".into(), "spec.subsets[1].name", "duplicate subset names: v1"),
        ("dr", "{host: r, subsets: [{labels: {version: v1}}]}".into(), "spec.subsets[0].name", "subset name cannot be empty"),
        ("dr", "{host: r, subsets: [{name: v1, labels: {'-bad': v1}}]}".into(), "spec.subsets[0].labels.-bad", "invalid label key"),
        ("dr", "{host: r, trafficPolicy: {tls: {mode: MUTUAL_TLS}}}".into(), "spec.trafficPolicy.tls.mode", "unknown variant \"MUTUAL_TLS\", expected one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
        ("dr", "{host: r, trafficPolicy: {tls: {mode: MUTUAL}}}".into(), "spec.trafficPolicy.tls.clientCertificate", "client certificate required"),
        ("dr", "{host: r, trafficPolicy: {outlierDetection: {interval: 1.5ms}}}".into(), "spec.trafficPolicy.outlierDetection.interval", "only durations to ms precision"),
        ("dr", "{host: r, trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}}".into(), "spec.trafficPolicy.loadBalancer", "only one of simple or consistentHash"),
        ("dr", "{host: r, trafficPolicy: {loadBalancer: {consistentHash: {maglev: {tableSize: 1000}}}}}".into(), "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize", "prime"),
        ("dr", "{host: r, trafficPolicy: {portLevelSettings: [{port: {number: 0}, loadBalancer: {simple: RANDOM}}]}}".into(), "spec.trafficPolicy.portLevelSettings[0].port.number", "1..65535"),
        ("dr", "{host: r, trafficPolicy: {}}".into(), "spec.trafficPolicy", "traffic policy must have at least one field"),
        // ServiceEntry
        ("se", "{ports: [{number: 80, name: http}]}".into(), "spec.hosts", "at least one host"),
        ("se", "{hosts: [a.com], addresses: [300.1.1.1]}".into(), "spec.addresses[0]", "not a valid IP"),
        ("se", "{hosts: [a.com], addresses: [10.0.0.0/8], resolution: DNS}".into(), "spec.resolution", "CIDR addresses are allowed only for NONE/STATIC"),
        ("se", "{hosts: [a.com], ports: [{number: 80, name: http}, {number: 80, name: http2}]}".into(), "spec.ports[1].number", "service entry port 80 already defined"),
        ("se", "{hosts: [a.com], ports: [{number: 0, name: http}]}".into(), "spec.ports[0].number", "1..65535"),
        ("se", "{hosts: [a.com], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: b.com}]}".into(), "spec.endpoints[0].address", "is not a valid IP address"),
        ("se", "{hosts: [a.com], endpoints: [{address: 1.1.1.1}]}".into(), "spec.endpoints", "no endpoints should be provided for resolution type none"),
        ("se", "{hosts: [a.com], ports: [{number: 80, name: http}], resolution: STATIC, endpoints: [{address: 1.1.1.1, ports: {grpc: 9090}}]}".into(), "spec.endpoints[0].ports.grpc", "not defined by the service entry"),
        ("se", "{hosts: [a.com], resolution: DNS_RR}".into(), "spec.resolution", "unknown variant \"DNS_RR\", expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
        // AuthorizationPolicy
        ("ap", "{action: ALOW}".into(), "spec.action", "unknown variant \"ALOW\", expected one of ALLOW, DENY, AUDIT, CUSTOM"),
        ("ap", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}".into(), "spec.action", "CUSTOM is not supported by ambit; the selected workloads deny"),
        ("ap", "{action: CUSTOM, rules: [{}]}".into(), "spec.provider.name", "`provider.name` must not be empty"),
        ("ap", "{action: DENY}".into(), "spec.rules", "DENY action without `rules` is meaningless"),
        ("ap", "{rules: [{from: [{source: {ipBlocks: [1.2.3.4, 1.2.3.0/33]}}]}]}".into(), "spec.rules[0].from[0].source.ipBlocks[1]", "not a valid CIDR block"),
        ("ap", "{rules: [{from: [{source: {notIpBlocks: [bogus]}}]}]}".into(), "spec.rules[0].from[0].source.notIpBlocks[0]", "not a valid IP"),
        ("ap", "{rules: [{from: [{source: {remoteIpBlocks: ['::1/129']}}]}]}".into(), "spec.rules[0].from[0].source.remoteIpBlocks[0]", "not a valid CIDR block"),
        ("ap", "{rules: [{to: [{operation: {ports: ['8080', http]}}]}]}".into(), "spec.rules[0].to[0].operation.ports[1]", "bad port (http)"),
        ("ap", "{rules: [{to: [{operation: {notPorts: ['70000']}}]}]}".into(), "spec.rules[0].to[0].operation.notPorts[0]", "bad port (70000)"),
        ("ap", "{rules: [{from: [{source: {}}]}]}".into(), "spec.rules[0].from[0].source", "`from.source` must not be empty"),
        ("ap", "{selector: {matchLabels: {app: a}}, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}], rules: [{}]}".into(), "spec.targetRefs", "only one of targetRefs or workloadSelector"),
        ("ap", "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w, namespace: other}], rules: [{}]}".into(), "spec.targetRefs[0].namespace", "cross namespace referencing is not supported"),
        ("ap", "{rules: [{when: [{key: source.remote_ip, values: [1.2.3.4]}]}]}".into(), "spec.rules[0].when[0].key", "unknown attribute: source.remote_ip"),
        ("ap", "{rules: [{when: [{key: 'request.headers[]', values: [x]}]}]}".into(), "spec.rules[0].when[0].key", "should have format a[b]"),
        ("ap", "{rules: [{when: [{key: source.ip}]}]}".into(), "spec.rules[0].when[0]", "at least one of `values` or `notValues`"),
        ("ap", "{rules: [{when: [{key: destination.port, values: ['99999']}]}]}".into(), "spec.rules[0].when[0].values[0]", "bad port"),
        // PeerAuthentication
        ("pa", "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}".into(), "spec.portLevelMtls", "cannot have port level mTLS"),
        ("pa", "{mtls: {mode: STRICTER}}".into(), "spec.mtls.mode", "unknown variant \"STRICTER\", expected one of UNSET, DISABLE, PERMISSIVE, STRICT"),
        ("pa", "{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}".into(), "spec.portLevelMtls.0", "port must be in range 1..65535"),
        ("pa", "{selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: DISABLE}}}".into(), "spec.portLevelMtls.http", "is not a number"),
        ("pa", "{selector: {matchLabels: {app: '*'}}}".into(), "spec.selector.matchLabels.app", "wildcard is not supported"),
    ]
}

#[test]
fn each_validation_rule_names_the_exact_field() {
    for (kind, spec, field, message) in bad_inputs() {
        let errors = match IstioConfig::parse(object(kind, &spec)) {
            Ok(_) => panic!("{kind} {spec}: expected an error at {field}"),
            Err(errors) => errors,
        };
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.message.contains(message)),
            "{kind} {spec}: expected {field}: ..{message}.., got {errors:?}"
        );
    }
}

#[test]
fn apiversion_and_kind_dispatch() {
    let cases = [
        (
            "networking.istio.io/v1alpha3",
            "VirtualService",
            Ok(IstioKind::VirtualService),
        ),
        (
            "networking.istio.io/v1beta1",
            "ServiceEntry",
            Ok(IstioKind::ServiceEntry),
        ),
        (
            "security.istio.io/v1beta1",
            "PeerAuthentication",
            Ok(IstioKind::PeerAuthentication),
        ),
        (
            "security.istio.io/v1alpha3",
            "AuthorizationPolicy",
            Err("apiVersion"),
        ),
        (
            "networking.istio.io/v2",
            "VirtualService",
            Err("apiVersion"),
        ),
        ("v1", "Pod", Err("apiVersion")),
        ("networking.istio.io/v1", "Gateway", Err("kind")),
        ("security.istio.io/v1", "VirtualService", Err("kind")),
    ];
    for (api_version, kind, want) in cases {
        let got = IstioKind::from_type_meta(api_version, kind).map_err(|e| e.field);
        assert_eq!(got, want.map_err(String::from), "{api_version} {kind}");
    }
    let errors = IstioConfig::parse(json!(["not", "an", "object"])).unwrap_err();
    assert_eq!(errors[0].field, "apiVersion");
    let errors = IstioConfig::parse(json!({"kind": "VirtualService"})).unwrap_err();
    assert_eq!(errors[0].field, "apiVersion");
}

#[test]
fn unknown_fields_are_ignored_and_reported_by_path() {
    let doc = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, futureField: 1}\n\
               spec: {hosts: [r], bogus: 1, http: [{route: [{destination: {host: r, shard: 2}}]}]}\n\
               status: {validationMessages: []}\n";
    let (_, mut ignored) = IstioConfig::parse(yaml(doc)).expect("valid");
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "metadata.futureField",
            "spec.bogus",
            "spec.http[0].route[0].destination.shard"
        ]
    );
}

#[test]
fn null_fields_read_as_absent_like_the_api_server_prunes_them() {
    let doc = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec:\n  selector:\n  rules:\n";
    let p = ap(&parse_ok(doc)).clone();
    assert!(p.selector.is_none() && p.rules.is_empty());
}

#[test]
fn header_presence_match_is_an_empty_string_match() {
    // Istio virtual-service reference: "To provide an empty value, use `{}`".
    let v = object("vs", "{hosts: [a], http: [{match: [{headers: {myheader: {}}}], route: [{destination: {host: a}}]}]}");
    let (config, _) = IstioConfig::parse(v).expect("presence match is valid");
    assert_eq!(
        vs(&config).http[0].matches[0].headers["myheader"].matcher(),
        None
    );
}

#[test]
fn go_durations() {
    let ok = [
        ("1.5s", Duration::from_millis(1500)),
        ("100ms", Duration::from_millis(100)),
        ("1h30m", Duration::from_secs(5400)),
        ("2h45m30.5s", Duration::from_millis(9_930_500)),
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("+5m", Duration::from_secs(300)),
        ("1us", Duration::from_micros(1)),
        ("1µs", Duration::from_micros(1)),
        (".5s", Duration::from_millis(500)),
        ("1.s", Duration::from_secs(1)),
    ];
    for (text, want) in ok {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
    let bad = [
        ("", "empty"),
        ("10", "missing unit"),
        ("1d", "unknown unit"),
        ("-1s", "negative"),
        (".s", "expected a number"),
        ("9999999999h", "overflow"),
    ];
    for (text, why) in bad {
        let err = parse_duration(text).expect_err(text);
        assert!(err.contains(why), "{text}: {err}");
    }
}

#[test]
fn documented_defaults_of_unset_enums_and_fields() {
    let s: ServiceEntry = serde_json::from_value(json!({"hosts": ["a.com"]})).expect("decodes");
    assert_eq!(
        (s.location, s.resolution),
        (Location::MeshExternal, Resolution::None)
    );
    let p: AuthorizationPolicy = serde_json::from_value(json!({})).expect("decodes");
    assert_eq!(p.action, Action::Allow);
    assert_eq!(
        MtlsMode::Unset.resolve(Some(MtlsMode::Unset)),
        MtlsMode::Permissive
    );
    let r: virtual_service::HttpRoute =
        serde_json::from_value(json!({"redirect": {"uri": "/x"}, "mirror": {"host": "m"}}))
            .expect("decodes");
    assert_eq!(
        r.redirect.as_ref().unwrap().code(),
        301,
        "Istio: default redirect code 301"
    );
    assert_eq!(
        r.mirror_percentage(),
        100.0,
        "Istio: absent mirror percentage mirrors all traffic"
    );
    // Proto JSON writes uint64 as a string; YAML users write a number. Both read the same.
    let lb = json!({"consistentHash": {"maglev": {"tableSize": "65537"}, "useSourceIp": true}});
    let lb: destination_rule::LoadBalancerSettings = serde_json::from_value(lb).expect("decodes");
    assert_eq!(
        lb.consistent_hash.unwrap().maglev.unwrap().table_size,
        Some(65537)
    );
}

#[test]
fn route_destinations_name_subsets_that_destination_rules_define() {
    let rule = parse_ok(doc_examples::BOOKINFO_REVIEWS_DR);
    let defined =
        |host: &str, subset: &str| host == "reviews" && dr(&rule).subset(subset).is_some();
    assert!(undefined_subsets(vs(&parse_ok(doc_examples::REVIEWS_JASON)), defined).is_empty());
    let mut only_v1_v2 = dr(&rule).clone();
    only_v1_v2.subsets.retain(|s| s.name != "v3");
    let errors = undefined_subsets(vs(&parse_ok(doc_examples::REVIEWS_JASON)), |h, s| {
        h == "reviews" && only_v1_v2.subset(s).is_some()
    });
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, "spec.http[1].route[0].destination.subset");
}
