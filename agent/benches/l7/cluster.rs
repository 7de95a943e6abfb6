//! The mesh side of the cluster as the agents read it (beside the harness's `cluster.yaml` of
//! namespaces and pods): Service `web` with an `http` port (served at L7) and a `tcp-web` port
//! (L4), its EndpointSlice, and the VirtualService and DestinationRule that route its HTTP: a
//! header match to subset v2 first, else a weighted split of v1 and v2.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ambit::harness::Pod;

/// The Service's cluster IP (captured, so never routed).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service port named `http`: L7 at the client's node.
pub const HTTP_PORT: u16 = 80;
/// The Service port named `tcp-web`: L4 over HBONE.
pub const TCP_PORT: u16 = 81;
/// The Service port named `http-resilient`: L7 as [`HTTP_PORT`], its route with a timeout,
/// retries and its DestinationRule port with outlier detection (bench path (e)).
pub const RESILIENT_PORT: u16 = 82;
/// Where every server pod's app listens.
pub const APP_PORT: u16 = 8080;
/// The same app on a second port, the target of `tcp-web` only: when Service ports of different
/// protocols target one pod port, the destination's agent takes the first one's protocol, and it
/// would serve `tcp-web`'s streams at L7 as the `http` port's.
pub const APP_TCP_PORT: u16 = 8081;

/// The route both (c) and (d) implement.
pub struct Split {
    /// Requests with this header (exact value) go to v2 only.
    pub header: (String, String),
    /// Weights of v1 and v2 for every other request.
    pub weights: [u32; 2],
}

impl Split {
    /// The share of v2 among the weighted requests.
    pub fn v2_share(&self) -> f64 {
        f64::from(self.weights[1]) / f64::from(self.weights[0] + self.weights[1])
    }
}

/// The YAML documents for Service `web` in the namespace of `backends` (v1, v2).
pub fn mesh_yaml(backends: [&Pod; 2], split: &Split) -> String {
    let ns = backends[0].namespace();
    let mut endpoints = String::new();
    for p in backends {
        let _ = writeln!(
            endpoints,
            "- {{addresses: [\"{}\"], conditions: {{ready: true}}, nodeName: {}, targetRef: \
             {{kind: Pod, name: {}, namespace: {ns}}}}}",
            p.ip4(),
            p.node_name(),
            p.name()
        );
    }
    let (header, value) = (&split.header.0, &split.header.1);
    let [w1, w2] = split.weights;
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  clusterIP: \"{VIP}\"
  selector: {{app: web}}
  ports:
  - {{name: http, port: {HTTP_PORT}, targetPort: {APP_PORT}}}
  - {{name: tcp-web, port: {TCP_PORT}, targetPort: {APP_TCP_PORT}}}
  - {{name: http-resilient, port: {RESILIENT_PORT}, targetPort: {APP_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: {ns}, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {APP_PORT}}}, {{name: tcp-web, port: {APP_TCP_PORT}}}, {{name: http-resilient, port: {APP_PORT}}}]
endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: {ns}}}
spec:
  hosts: [web]
  http:
  # (e): the same two routes on port {RESILIENT_PORT}, with a timeout and retries.
  - name: header-v2-resilient
    match: [{{port: {RESILIENT_PORT}, headers: {{{header}: {{exact: {value}}}}}}}]
    route: [{{destination: {{host: web, subset: v2}}}}]
    timeout: 10s
    retries: {{attempts: 3, perTryTimeout: 5s, retryOn: \"5xx,reset,connect-failure\"}}
  - name: weighted-resilient
    match: [{{port: {RESILIENT_PORT}}}]
    route:
    - {{destination: {{host: web, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: web, subset: v2}}, weight: {w2}}}
    timeout: 10s
    retries: {{attempts: 3, perTryTimeout: 5s, retryOn: \"5xx,reset,connect-failure\"}}
  - name: header-v2
    match: [{{headers: {{{header}: {{exact: {value}}}}}}}]
    route: [{{destination: {{host: web, subset: v2}}}}]
  - name: weighted
    route:
    - {{destination: {{host: web, subset: v1}}, weight: {w1}}}
    - {{destination: {{host: web, subset: v2}}, weight: {w2}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: {ns}}}
spec:
  host: web
  trafficPolicy:
    portLevelSettings:
    - port: {{number: {RESILIENT_PORT}}}
      outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"
    )
}
