//! [`ConnectionResult`] under the Telemetry API: which TCP families count a connection on each
//! side, and the line it writes to the configured access logs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::{ConnectionResult, Peer, Reporter, TcpLabels, TcpRecorded, Telemetry};
use crate::config::telemetry::format::Formatter;
use crate::config::telemetry::{
    AccessLogSink, EffectiveTelemetry, Filter, LogFormat, MetricOverride, MetricSettings,
};
use crate::proxy::copy::{Outcome, Side};
use crate::proxy::error::Error;
use crate::state::IstioLabels;

fn workload(name: &str) -> Arc<IstioLabels> {
    Arc::new(IstioLabels::new(name, "mesh", name, &BTreeMap::new()))
}

fn labels(reporter: Reporter) -> TcpLabels {
    TcpLabels {
        reporter,
        source: Peer::Workload(workload("sleep")),
        destination: Peer::Workload(workload("db")),
        service: None,
        flags: "-",
        mtls: true,
        tags: None,
    }
}

fn addrs() -> (SocketAddr, SocketAddr) {
    (
        "10.0.0.1:40000".parse().expect("addr"),
        "10.0.0.2:5432".parse().expect("addr"),
    )
}

fn outcome(received: u64, sent: u64) -> Result<Outcome, Error> {
    Ok(Outcome {
        a_to_b: received,
        b_to_a: sent,
        failed: None,
    })
}

fn scrape(t: &Telemetry) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    t.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text
}

/// The value of the one series of `family` reported by `reporter`, None when it is not shown.
fn value(text: &str, family: &str, reporter: &str) -> Option<u64> {
    let want = format!("reporter=\"{reporter}\"");
    let found: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(&want))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert!(found.len() <= 1, "one series expected: {found:?}\n{text}");
    found.first().copied()
}

fn disabling(side_client: bool, metric: &str) -> Arc<EffectiveTelemetry> {
    let mut s = EffectiveTelemetry::default();
    let off = MetricOverride {
        disabled: true,
        ..Default::default()
    };
    let side = if side_client {
        &mut s.client
    } else {
        &mut s.server
    };
    side.metrics.overrides.insert(metric.into(), off);
    Arc::new(s)
}

#[test]
fn recorded_follows_each_tcp_metric_override() {
    let mut m = MetricSettings::default();
    assert_eq!(TcpRecorded::of(&m), TcpRecorded::ALL);
    m.overrides.insert(
        "TCP_SENT_BYTES".into(),
        MetricOverride {
            disabled: true,
            ..Default::default()
        },
    );
    // A request metric's override leaves the TCP families alone.
    m.overrides.insert(
        "REQUEST_COUNT".into(),
        MetricOverride {
            disabled: true,
            ..Default::default()
        },
    );
    let r = TcpRecorded::of(&m);
    assert!(r.has(TcpRecorded::OPENED) && r.has(TcpRecorded::CLOSED));
    assert!(r.has(TcpRecorded::RECEIVED));
    assert!(!r.has(TcpRecorded::SENT));
    m.enabled = false;
    assert_eq!(TcpRecorded::of(&m), TcpRecorded::NONE);
}

#[test]
fn a_metric_disabled_for_the_client_side_is_left_out_at_the_source_only() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = disabling(true, "TCP_SENT_BYTES");
    for reporter in [Reporter::Source, Reporter::Destination] {
        ConnectionResult::open(&t, labels(reporter), addrs(), Some(&settings))
            .finish(outcome(100, 2000));
    }
    let text = scrape(&t);
    assert_eq!(
        value(&text, "istio_tcp_sent_bytes_total", "source"),
        None,
        "{text}"
    );
    assert_eq!(
        value(&text, "istio_tcp_sent_bytes_total", "destination"),
        Some(2000)
    );
    for family in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
    ] {
        assert_eq!(value(&text, family, "source"), Some(1), "{family}");
    }
    assert_eq!(
        value(&text, "istio_tcp_received_bytes_total", "source"),
        Some(100)
    );
}

#[test]
fn a_series_shows_a_family_once_any_of_its_connections_records_it() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = disabling(true, "TCP_OPENED_CONNECTIONS");
    ConnectionResult::open(&t, labels(Reporter::Source), addrs(), Some(&settings))
        .finish(outcome(1, 1));
    let text = scrape(&t);
    assert_eq!(
        value(&text, "istio_tcp_connections_opened_total", "source"),
        None
    );
    // Another workload of the same series without the override (or before it was applied).
    ConnectionResult::open(&t, labels(Reporter::Source), addrs(), None).finish(outcome(1, 1));
    let text = scrape(&t);
    assert_eq!(
        value(&text, "istio_tcp_connections_opened_total", "source"),
        Some(1)
    );
    assert_eq!(
        value(&text, "istio_tcp_connections_closed_total", "source"),
        Some(2)
    );
}

#[test]
fn all_metrics_off_makes_no_series_and_no_settings_records_everything() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let mut off = EffectiveTelemetry::default();
    off.server.metrics.enabled = false;
    let off = Arc::new(off);
    ConnectionResult::open(&t, labels(Reporter::Destination), addrs(), Some(&off))
        .finish(outcome(5, 5));
    assert!(!scrape(&t).contains("reporter=\"destination\""));
    // No settings (the snapshot says none shape TCP): all four, a zero included.
    ConnectionResult::open(&t, labels(Reporter::Source), addrs(), None).finish(outcome(7, 0));
    let text = scrape(&t);
    assert_eq!(
        value(&text, "istio_tcp_sent_bytes_total", "source"),
        Some(0)
    );
    assert_eq!(
        value(&text, "istio_tcp_received_bytes_total", "source"),
        Some(7)
    );
}

/// A file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempFile(std::env::temp_dir().join(format!("ambit-{name}-{}-{n}.log", std::process::id())))
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }

    /// Waits until the file has `n` lines (the writer thread appends them), then returns them.
    fn lines(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(&self.0)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} has {} lines, not {n}: {lines:#?}",
                self.0.display(),
                lines.len()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn logging(path: &str, format: LogFormat, filter: Option<&str>) -> Arc<EffectiveTelemetry> {
    let sink = AccessLogSink {
        provider: "envoy".into(),
        path: path.into(),
        formatter: Arc::new(Formatter::from_config(&format).expect("format")),
        format,
        filter: filter.map(|f| Arc::new(Filter::compile(f).expect("filter"))),
    };
    let mut s = EffectiveTelemetry::default();
    s.client.access_log.sinks.push(sink.clone());
    s.server.access_log.sinks.push(sink);
    Arc::new(s)
}

#[test]
fn a_connection_writes_envoys_tcp_line_in_json() {
    let file = TempFile::new("tcp-json");
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = logging(file.path(), LogFormat::Json(None), None);
    let mut r = ConnectionResult::open(&t, labels(Reporter::Source), addrs(), Some(&settings));
    assert!(r.logs());
    r.set_upstream("10.0.0.3:5432".parse().expect("addr"));
    r.set_cluster("outbound|5432||db.mesh.svc.cluster.local".into());
    r.finish(Ok(Outcome {
        a_to_b: 12,
        b_to_a: 3456,
        failed: Some(Side::B),
    }));
    let lines = file.lines(1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
    // Envoy's TCP proxy: no request, so no method, path or protocol, and response code 0.
    for absent in ["method", "path", "protocol", "authority", "request_id"] {
        assert_eq!(v[absent], serde_json::Value::Null, "{absent}: {v}");
    }
    assert_eq!(v["response_code"], 0);
    assert_eq!(v["response_flags"], "UR");
    assert_eq!(v["bytes_received"], 12);
    assert_eq!(v["bytes_sent"], 3456);
    assert_eq!(v["upstream_host"], "10.0.0.3:5432");
    assert_eq!(
        v["upstream_cluster"],
        "outbound|5432||db.mesh.svc.cluster.local"
    );
    assert_eq!(v["downstream_remote_address"], "10.0.0.1:40000");
    assert_eq!(v["downstream_local_address"], "10.0.0.2:5432");
    assert!(v["start_time"].as_str().is_some_and(|s| s.ends_with('Z')));
}

#[test]
fn a_connection_writes_envoys_tcp_line_in_the_default_text_format() {
    let file = TempFile::new("tcp-text");
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = logging(file.path(), LogFormat::Text(None), None);
    let mut r = ConnectionResult::open(&t, labels(Reporter::Destination), addrs(), Some(&settings));
    r.set_upstream("10.0.0.2:5432".parse().expect("addr"));
    r.set_cluster("inbound|5432||".into());
    r.finish(outcome(10, 20));
    let line = &file.lines(1)[0];
    // `[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "FAILURE" RECEIVED SENT`
    let (_, rest) = line.split_once("] ").expect("start time");
    assert!(rest.starts_with("\"- - -\" 0 - - - \"-\" 10 20 "), "{line}");
    assert!(
        rest.contains(
            "\"-\" \"-\" \"-\" \"-\" \"10.0.0.2:5432\" inbound|5432|| - 10.0.0.2:5432 10.0.0.1:40000 - -"
        ),
        "{line}"
    );
}

/// Writes a marker connection (999 bytes received) to `file` through an unfiltered sink and
/// waits for it: the same writer thread writes lines in order, so whatever an earlier
/// connection queued for `file` is there too. Returns the lines before the marker.
fn before_marker(t: &Arc<Telemetry>, file: &TempFile) -> Vec<String> {
    let plain = logging(file.path(), LogFormat::Json(None), None);
    ConnectionResult::open(t, labels(Reporter::Source), addrs(), Some(&plain))
        .finish(outcome(999, 0));
    let mut n = 1;
    loop {
        let lines = file.lines(n);
        if let Some(i) = lines
            .iter()
            .position(|l| l.contains("\"bytes_received\":999"))
        {
            return lines[..i].to_vec();
        }
        n = lines.len() + 1;
    }
}

#[test]
fn filters_see_a_connection_without_a_response_code() {
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let cases = [
        // `response.code` is absent for a TCP connection: an error, so not logged (Envoy).
        ("response.code >= 400", Reporter::Destination, false),
        ("connection.mtls", Reporter::Destination, true),
        // CEL's `||`: true when either side is, an error on the other notwithstanding.
        (
            "response.code >= 400 || connection.mtls",
            Reporter::Destination,
            true,
        ),
        // At the source the downstream (the app's connection) is plaintext.
        ("connection.mtls", Reporter::Source, false),
        (
            "response.size > 1000 && destination.port == 5432",
            Reporter::Source,
            true,
        ),
        ("response.size > 5000", Reporter::Source, false),
        ("source.address == '10.0.0.1:40000'", Reporter::Source, true),
    ];
    for (expression, reporter, logged) in cases {
        let file = TempFile::new("tcp-filter");
        let settings = logging(file.path(), LogFormat::Json(None), Some(expression));
        ConnectionResult::open(&t, labels(reporter), addrs(), Some(&settings))
            .finish(outcome(1, 2000));
        let before = before_marker(&t, &file);
        assert_eq!(
            before.len(),
            usize::from(logged),
            "{expression} at {reporter:?}: {before:#?}"
        );
    }
}

#[test]
fn a_stream_served_as_http_writes_its_requests_not_a_connection_line() {
    let file = TempFile::new("tcp-l7");
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = logging(file.path(), LogFormat::Json(None), None);
    let mut r = ConnectionResult::open(&t, labels(Reporter::Destination), addrs(), Some(&settings));
    r.served_as_http();
    r.finish(outcome(1, 1));
    assert_eq!(before_marker(&t, &file), Vec::<String>::new());
}

/// `Snapshot::tcp_telemetry` reads this: only an access log or a TCP metric turned off makes a
/// side worth looking up for a connection.
#[test]
fn only_access_logs_and_tcp_metric_overrides_shape_tcp() {
    let mut s = EffectiveTelemetry::default();
    assert!(!s.client.shapes_tcp() && !s.server.shapes_tcp());
    let off = MetricOverride {
        disabled: true,
        ..Default::default()
    };
    s.client
        .metrics
        .overrides
        .insert("REQUEST_COUNT".into(), off.clone());
    assert!(!s.client.shapes_tcp(), "a request metric's override");
    s.client
        .metrics
        .overrides
        .insert("TCP_RECEIVED_BYTES".into(), off);
    assert!(s.client.shapes_tcp() && !s.server.shapes_tcp());
    s.server.metrics.enabled = false;
    assert!(s.server.shapes_tcp(), "ALL_METRICS off");
    let logged = logging("/dev/null", LogFormat::Text(None), None);
    assert!(logged.client.shapes_tcp() && logged.server.shapes_tcp());
}

#[test]
fn a_denied_connection_logs_the_policy_as_envoys_rbac_filter_does() {
    let file = TempFile::new("tcp-deny");
    let t = Arc::new(Telemetry::new("cluster.local", None));
    let settings = logging(file.path(), LogFormat::Json(None), None);
    let mut r = ConnectionResult::open(&t, labels(Reporter::Destination), addrs(), Some(&settings));
    r.set_cluster("inbound|5432||".into());
    r.finish(Err(Error::Denied {
        policy: "mesh/deny-db".into(),
        reason: "no ALLOW policy matched".into(),
    }));
    let v: serde_json::Value = serde_json::from_str(&file.lines(1)[0]).expect("JSON");
    assert_eq!(v["response_flags"], "DENY", "{v}");
    assert_eq!(
        v["connection_termination_details"],
        "rbac_access_denied_matched_policy[mesh/deny-db]"
    );
    assert_eq!(v["bytes_received"], 0);
    assert_eq!(v["upstream_host"], serde_json::Value::Null);
    let text = scrape(&t);
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("response_flags=\"DENY\"")),
        "{text}"
    );
}
