use std::time::{Duration, SystemTime};

use super::*;

/// Istio's `EnvoyTextLogFormat`, as pilot/pkg/model/telemetry_logging.go concatenates it.
const ISTIO_SOURCE: &str = concat!(
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% ",
    "%PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% ",
    "%RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% ",
    "\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% ",
    "%DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" ",
    "\"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" ",
    "%UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% ",
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n",
);

fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, v.parse().expect("header value"));
    }
    h
}

#[test]
fn the_default_text_format_is_istios() {
    assert_eq!(ISTIO_TEXT_FORMAT, ISTIO_SOURCE);
}

#[test]
fn default_text_line_for_an_http_request() {
    let req = headers(&[
        ("user-agent", "curl/8.5.0"),
        ("x-request-id", "f21ebd42-6770-4aa5-88d4-e56118165a7d"),
    ]);
    let resp = headers(&[("x-envoy-upstream-service-time", "3")]);
    let f = LogFields {
        start_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_543_000_260_281),
        protocol: Some("HTTP/1.1"),
        response_code: Some(200),
        response_flags: "-",
        response_code_details: Some("via_upstream"),
        bytes_received: 0,
        bytes_sent: 58,
        duration: Duration::from_millis(4),
        request_headers: Some(&req),
        response_headers: Some(&resp),
        method: Some("GET"),
        path: Some("/productpage?u=1"),
        authority: Some("productpage:9080"),
        upstream_host: Some("10.0.0.7:9080".parse().expect("addr")),
        upstream_cluster: Some("outbound|9080||productpage.default.svc.cluster.local"),
        upstream_local_address: Some("10.0.0.5:41234".parse().expect("addr")),
        downstream_local_address: Some("10.96.0.10:9080".parse().expect("addr")),
        downstream_remote_address: Some("10.0.0.5:50000".parse().expect("addr")),
        route_name: Some("default"),
        ..Default::default()
    };
    let line = Formatter::istio_text().format(&f);
    assert_eq!(
        line,
        "[2018-11-23T19:11:00.281Z] \"GET /productpage?u=1 HTTP/1.1\" 200 - via_upstream - \"-\" 0 58 4 3 \"-\" \"curl/8.5.0\" \"f21ebd42-6770-4aa5-88d4-e56118165a7d\" \"productpage:9080\" \"10.0.0.7:9080\" outbound|9080||productpage.default.svc.cluster.local 10.0.0.5:41234 10.96.0.10:9080 10.0.0.5:50000 - default\n"
    );
}

#[test]
fn tcp_connection_prints_dashes_and_code_zero() {
    let f = LogFields {
        bytes_received: 12,
        bytes_sent: 34,
        response_flags: "UF",
        ..Default::default()
    };
    let line = Formatter::istio_text().format(&f);
    assert!(
        line.starts_with("[1970-01-01T00:00:00.000Z] \"- - -\" 0 UF - - \"-\" 12 34 0 - "),
        "{line}"
    );
}

#[test]
fn original_path_header_wins_over_path() {
    let req = headers(&[("x-envoy-original-path", "/before")]);
    let f = LogFields {
        path: Some("/after"),
        request_headers: Some(&req),
        ..Default::default()
    };
    let fmt = Formatter::text("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:PATH):3%").expect("fmt");
    assert_eq!(fmt.format(&f), "/before /af");
}

#[test]
fn json_uses_envoy_field_names_and_types() {
    let f = LogFields {
        response_code: Some(503),
        bytes_sent: 7,
        method: Some("POST"),
        ..Default::default()
    };
    let line = Formatter::istio_json().format(&f);
    assert!(line.ends_with('\n'));
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    assert_eq!(v["response_code"], 503);
    assert_eq!(v["bytes_sent"], 7);
    assert_eq!(v["method"], "POST");
    assert_eq!(v["user_agent"], serde_json::Value::Null);
    assert_eq!(
        v.as_object().map(|o| o.len()),
        Some(ISTIO_JSON_LABELS.len())
    );
}

#[test]
fn custom_json_labels_mix_literals_and_commands() {
    let labels = serde_json::json!({"code": "%RESPONSE_CODE%", "what": "m=%REQ(:METHOD)%"});
    let fmt = Formatter::json(labels.as_object().expect("map")).expect("fmt");
    let f = LogFields {
        response_code: Some(404),
        method: Some("GET"),
        ..Default::default()
    };
    let v: serde_json::Value = serde_json::from_str(&fmt.format(&f)).expect("json");
    assert_eq!(v, serde_json::json!({"code": 404, "what": "m=GET"}));
}

#[test]
fn unknown_commands_are_refused() {
    assert!(matches!(
        Formatter::text("%NOPE%"),
        Err(FormatError::UnknownCommand { .. })
    ));
    assert!(matches!(
        Formatter::text("50%"),
        Err(FormatError::Unterminated { .. })
    ));
    assert_eq!(
        Formatter::text("100%% %BYTES_SENT%")
            .expect("fmt")
            .format(&LogFields::default()),
        "100% 0"
    );
}

#[test]
fn from_config_picks_the_defaults() {
    use crate::config::telemetry::LogFormat;
    assert_eq!(
        Formatter::from_config(&LogFormat::Text(None)).expect("fmt"),
        Formatter::istio_text()
    );
    assert_eq!(
        Formatter::from_config(&LogFormat::Json(None)).expect("fmt"),
        Formatter::istio_json()
    );
}
