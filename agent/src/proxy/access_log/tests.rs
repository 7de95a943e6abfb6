//! A TCP connection's line in the configured formats, its filter attributes, and the sinks.

use std::time::{Duration, SystemTime};

use super::{ConnectionLine, Sinks};
use crate::config::telemetry::format::Formatter;
use crate::config::telemetry::Filter;

fn line() -> ConnectionLine<'static> {
    ConnectionLine {
        // 2026-01-02T03:04:05.678Z
        start_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678),
        duration: Duration::from_millis(36),
        flags: "-",
        mtls: true,
        downstream: (
            "10.44.1.24:51542".parse().expect("addr"),
            "10.0.6.129:3306".parse().expect("addr"),
        ),
        upstream: Some("10.44.1.27:3306".parse().expect("addr")),
        upstream_cluster: Some("outbound|3306||mysqldb.default.svc.cluster.local"),
        requested_server_name: None,
        bytes_received: 1563,
        bytes_sent: 2144,
        termination_details: None,
        transport_failure: None,
    }
}

/// Istio's default TEXT format, as Envoy's TCP proxy fills it: every request field `-`, the
/// response code 0.
#[test]
fn the_default_text_line_of_a_connection() {
    let text = Formatter::istio_text().format(&line().fields());
    assert_eq!(
        text,
        "[2026-01-02T03:04:05.678Z] \"- - -\" 0 - - - \"-\" 1563 2144 36 - \"-\" \"-\" \"-\" \"-\" \
         \"10.44.1.27:3306\" outbound|3306||mysqldb.default.svc.cluster.local - 10.0.6.129:3306 \
         10.44.1.24:51542 - -\n"
    );
}

#[test]
fn a_denial_says_why_in_the_termination_details() {
    let denied = ConnectionLine {
        flags: "DENY",
        upstream: None,
        termination_details: Some("rbac_access_denied_matched_policy[mesh/deny-all]"),
        ..line()
    };
    let json: serde_json::Value =
        serde_json::from_str(&Formatter::istio_json().format(&denied.fields())).expect("JSON");
    assert_eq!(
        json["connection_termination_details"],
        "rbac_access_denied_matched_policy[mesh/deny-all]"
    );
    assert_eq!(json["response_flags"], "DENY");
    assert_eq!(json["upstream_host"], serde_json::Value::Null);
    assert_eq!(json["response_code"], 0);
}

#[test]
fn connection_attributes_as_envoy_names_them() {
    let l = line();
    let attrs = l.attrs();
    let eval = |e: &str| Filter::compile(e).expect(e).evaluate(&attrs);
    for e in [
        "connection.mtls",
        "source.address == '10.44.1.24:51542' && source.port == 51542",
        "destination.address == '10.0.6.129:3306' && destination.port == 3306",
        "upstream.address == '10.44.1.27:3306' && upstream.port == 3306",
        "request.size == 1563 && response.size == 2144",
        "request.duration < duration('1s')",
        "!has(response.code)",
    ] {
        assert_eq!(eval(e), Ok(true), "{e}");
    }
    // Absent for a connection: evaluation errors, which Envoy's filter reads as "do not log".
    for e in ["response.code >= 400", "request.method == 'GET'"] {
        assert!(eval(e).is_err(), "{e}: {:?}", eval(e));
    }
}

#[test]
fn a_sink_that_cannot_open_its_file_counts_its_lines_dropped() {
    let sinks = Sinks::default();
    let path = "/nonexistent-ambit-dir/access.log";
    sinks.write(path, "one".into());
    sinks.write(path, "two".into());
    assert_eq!(sinks.dropped().get(), 2);
}

#[test]
fn a_tls_routed_connection_shows_its_sni() {
    let tls = ConnectionLine {
        requested_server_name: Some("a.example.com"),
        ..line()
    };
    let text = Formatter::istio_text().format(&tls.fields());
    assert!(text.ends_with(" a.example.com -\n"), "{text}");
    let attrs = tls.attrs();
    let f = Filter::compile("connection.requested_server_name == 'a.example.com'").expect("f");
    assert_eq!(f.evaluate(&attrs), Ok(true));
    // Without one, Envoy's attribute is the empty string.
    let f = Filter::compile("connection.requested_server_name == ''").expect("f");
    assert_eq!(f.evaluate(&line().attrs()), Ok(true));
}
