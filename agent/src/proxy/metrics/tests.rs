//! The metric families with the Telemetry API's tag overrides applied, read back from the text a
//! Prometheus scrapes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::requests::{RequestLabels, RequestResult};
use super::*;
use crate::config::telemetry::{
    EffectiveTelemetry, MetricOverride, MetricSettings, SideTelemetry, TagAction, TagPlan,
};

fn workload(name: &str) -> Arc<IstioLabels> {
    let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    Arc::new(IstioLabels::new(name, "bookinfo", name, &labels))
}

/// Client-side settings with these tag changes on `metric`.
fn client_tags(metric: &str, tags: &[(&str, Option<&str>)]) -> Arc<EffectiveTelemetry> {
    let tags = tags
        .iter()
        .map(|(k, v)| {
            let action = v.map_or(TagAction::Remove, |e| TagAction::Upsert(e.to_string()));
            (k.to_string(), action)
        })
        .collect();
    let overrides = BTreeMap::from([(
        metric.to_string(),
        MetricOverride {
            disabled: false,
            tags,
        },
    )]);
    Arc::new(EffectiveTelemetry {
        client: SideTelemetry {
            metrics: MetricSettings {
                tags: TagPlan::build(&overrides),
                overrides,
                ..MetricSettings::default()
            },
            ..SideTelemetry::default()
        },
        server: SideTelemetry::default(),
    })
}

fn conn(reporter: Reporter) -> TcpLabels {
    TcpLabels {
        reporter,
        source: Peer::Workload(workload("sleep")),
        destination: Peer::Workload(workload("reviews")),
        service: None,
        flags: "-",
        mtls: true,
        tags: None,
    }
}

fn downstream() -> (SocketAddr, SocketAddr) {
    (
        "10.0.0.1:40000".parse().expect("addr"),
        "10.96.0.10:9080".parse().expect("addr"),
    )
}

/// One finished request of `protocol` to `host`, with `settings`.
fn request(
    t: &Arc<Telemetry>,
    reporter: Reporter,
    protocol: &'static str,
    host: &str,
    settings: &Arc<EffectiveTelemetry>,
) {
    let labels = RequestLabels {
        conn: conn(reporter),
        protocol,
        response_code: 0,
        grpc_status: None,
    };
    let mut result = RequestResult::start(t, labels, downstream(), 0, None);
    let req = http::Request::builder()
        .uri("/ratings/1")
        .header("host", host)
        .header("x-user", "jason")
        .body(())
        .expect("request");
    result.set_settings(settings.clone(), &req);
    result.set_response(200, &http::HeaderMap::new());
    result.finish(None);
}

/// Every sample of `name` in the text encoding: its labels, in order, and its value.
fn scrape(t: &Telemetry, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut registry = prometheus_client::registry::Registry::default();
    t.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (n, rest) = head.split_once('{')?;
            (n == name).then_some(())?;
            let labels = rest
                .trim_end_matches('}')
                .split("\",")
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Some((labels, value.parse().expect("a number")))
        })
        .collect()
}

fn get<'a>(labels: &'a [(String, String)], k: &str) -> Option<&'a str> {
    labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

#[test]
fn remove_merges_series_that_differed_only_in_it() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let s = client_tags("REQUEST_COUNT", &[("request_protocol", None)]);
    request(&t, Reporter::Source, "http", "reviews:9080", &s);
    request(&t, Reporter::Source, "grpc", "reviews:9080", &s);
    request(&t, Reporter::Source, "http", "reviews:9080", &s);
    let total = scrape(&t, "istio_requests_total");
    assert_eq!(total.len(), 1, "{total:?}");
    assert_eq!(total[0].1, 3.0);
    assert_eq!(get(&total[0].0, "request_protocol"), None);
    assert_eq!(get(&total[0].0, "response_code"), Some("200"));
    // The other families keep the label, one series per protocol.
    let counts = scrape(&t, "istio_request_duration_milliseconds_count");
    let mut by_protocol: Vec<(&str, f64)> = counts
        .iter()
        .map(|(l, v)| (get(l, "request_protocol").expect("kept"), *v))
        .collect();
    by_protocol.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(by_protocol, [("grpc", 1.0), ("http", 2.0)]);
}

#[test]
fn upsert_adds_a_label_with_the_requests_value() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let s = client_tags(
        "REQUEST_COUNT",
        &[
            ("request_host", Some("request.host")),
            ("user", Some("request.headers['x-user']")),
            ("missing", Some("request.headers['x-missing']")),
        ],
    );
    request(&t, Reporter::Source, "http", "reviews:9080", &s);
    request(&t, Reporter::Source, "http", "ratings:9080", &s);
    request(&t, Reporter::Source, "http", "ratings:9080", &s);
    // The destination side has no overrides: standard labels only.
    request(&t, Reporter::Destination, "http", "ratings:9080", &s);
    let total = scrape(&t, "istio_requests_total");
    let mut source: Vec<(&str, f64)> = total
        .iter()
        .filter(|(l, _)| get(l, "reporter") == Some("source"))
        .inspect(|(l, _)| {
            assert_eq!(get(l, "user"), Some("jason"));
            assert_eq!(get(l, "missing"), Some("unknown"));
            // New labels come after Istio's standard ones.
            assert_eq!(l[l.len() - 3].0, "missing");
        })
        .map(|(l, v)| (get(l, "request_host").expect("upserted"), *v))
        .collect();
    source.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(source, [("ratings:9080", 2.0), ("reviews:9080", 1.0)]);
    let dest: Vec<_> = total
        .iter()
        .filter(|(l, _)| get(l, "reporter") == Some("destination"))
        .collect();
    assert_eq!(dest.len(), 1);
    assert_eq!(get(&dest[0].0, "request_host"), None);
    assert_eq!(get(&dest[0].0, "request_protocol"), Some("http"));
    // The overrides were on REQUEST_COUNT only.
    for (l, _) in scrape(&t, "istio_request_bytes_count") {
        assert_eq!(get(&l, "request_host"), None);
    }
}

#[test]
fn tcp_metrics_take_the_connections_tags() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let s = client_tags(
        "TCP_OPENED_CONNECTIONS",
        &[
            ("destination_port", Some("string(destination.port)")),
            ("source_principal", Some("'hidden'")),
            ("connection_security_policy", None),
        ],
    );
    for _ in 0..2 {
        let labels =
            conn(Reporter::Source).tagged(&s.client.metrics, downstream(), "cluster.local");
        let result = ConnectionResult::open(&t, labels, downstream(), None);
        result.finish(Ok(Outcome {
            a_to_b: 10,
            b_to_a: 20,
            failed: None,
        }));
    }
    let opened = scrape(&t, "istio_tcp_connections_opened_total");
    assert_eq!(opened.len(), 1, "{opened:?}");
    let (l, v) = &opened[0];
    assert_eq!(*v, 2.0);
    assert_eq!(get(l, "destination_port"), Some("9080"));
    assert_eq!(get(l, "source_principal"), Some("hidden"));
    assert_eq!(get(l, "connection_security_policy"), None);
    let sent = scrape(&t, "istio_tcp_sent_bytes_total");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1, 40.0, "both connections, 20 bytes each");
    assert_eq!(get(&sent[0].0, "destination_port"), None);
    assert_eq!(
        get(&sent[0].0, "source_principal"),
        Some("spiffe://cluster.local/ns/bookinfo/sa/sleep")
    );
}

#[test]
fn no_overrides_no_tags() {
    let settings = MetricSettings::default();
    let labels = conn(Reporter::Source).tagged(&settings, downstream(), "cluster.local");
    assert!(labels.tags.is_none());
}
