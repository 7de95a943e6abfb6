use super::*;
use crate::config::istio::virtual_service::HttpRoute;

fn route(yaml: &str) -> HttpRoute {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn istio_default_retry_policy_applies_when_a_route_sets_none() {
    // Istio retry.DefaultPolicy: 2 retries, connect-failure,refused-stream,unavailable,
    // cancelled,retriable-status-codes, 503 retriable, previous hosts avoided.
    let p = retry_policy(None).unwrap();
    assert_eq!(p.retries, 2);
    assert_eq!(p.statuses, vec![503]);
    assert!(p.on.connect_failure && p.on.refused_stream && p.on.retriable_status_codes);
    assert!(p.on.grpc_unavailable && p.on.grpc_cancelled);
    assert!(!p.on.five_xx && !p.on.gateway_error && !p.on.reset);
    assert_eq!(p.per_try_timeout, None);
    assert_eq!(p.backoff, Duration::from_millis(25));
    assert!(p.avoid_previous_hosts);
}

#[test]
fn attempts_zero_disables_retries() {
    let r = route("retries: {attempts: 0}");
    assert_eq!(retry_policy(r.retries.as_ref()), None);
}

#[test]
fn retry_on_replaces_the_default_conditions_and_codes_become_retriable_statuses() {
    // Istio's HTTPRetry reference example: attempts 3, perTryTimeout 2s,
    // retryOn gateway-error,connect-failure,refused-stream.
    let r = route("retries: {attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure,refused-stream'}");
    let p = retry_policy(r.retries.as_ref()).unwrap();
    assert_eq!(p.retries, 3);
    assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
    assert!(p.on.gateway_error && p.on.connect_failure && p.on.refused_stream);
    assert!(!p.on.retriable_status_codes && !p.on.grpc_unavailable);
    assert!(p.statuses.is_empty());

    let r = route("retries: {attempts: 1, retryOn: '5xx, 409,429'}");
    let p = retry_policy(r.retries.as_ref()).unwrap();
    assert!(p.on.five_xx && p.on.retriable_status_codes);
    assert_eq!(p.statuses, vec![409, 429]);
}

#[test]
fn attempts_without_retry_on_keep_the_default_conditions() {
    let r = route("retries: {attempts: 5}");
    let p = retry_policy(r.retries.as_ref()).unwrap();
    assert_eq!(p.retries, 5);
    assert_eq!(p.on, DEFAULT_RETRY.on);
    assert_eq!(p.statuses, vec![503]);
}

#[test]
fn backoff_and_previous_hosts_follow_the_route() {
    let r = route("retries: {attempts: 2, backoff: 100ms, retryIgnorePreviousHosts: false}");
    let p = retry_policy(r.retries.as_ref()).unwrap();
    assert_eq!(p.backoff, Duration::from_millis(100));
    assert!(!p.avoid_previous_hosts);
}

#[test]
fn fault_delay_accepts_the_deprecated_percent_and_abort_takes_http_or_grpc() {
    // Istio's bookinfo virtual-service-ratings-test-delay: fixedDelay 7s, percent 100.
    let r = route("fault: {delay: {fixedDelay: 7s, percent: 100}}");
    let f = fault(r.fault.as_ref()).unwrap();
    assert_eq!(f.delay, Some((Duration::from_secs(7), 100.0)));
    assert_eq!(f.abort, None);

    let r = route("fault: {abort: {httpStatus: 500, percentage: {value: 50}}}");
    let f = fault(r.fault.as_ref()).unwrap();
    assert_eq!(
        f.abort,
        Some((AbortWith::Http(StatusCode::INTERNAL_SERVER_ERROR), 50.0))
    );

    let r = route("fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}");
    assert_eq!(
        fault(r.fault.as_ref()).unwrap().abort,
        Some((AbortWith::Grpc(14), 100.0))
    );
}

#[test]
fn a_delay_without_a_percentage_delays_nothing() {
    // Istio: "If left unspecified, no request will be delayed."
    let r = route("fault: {delay: {fixedDelay: 1s}}");
    assert_eq!(fault(r.fault.as_ref()).unwrap().delay.unwrap().1, 0.0);
}

#[test]
fn grpc_codes_by_name_and_number() {
    assert_eq!(grpc_code("OK"), Some(0));
    assert_eq!(grpc_code("unavailable"), Some(14));
    assert_eq!(grpc_code("UNAUTHENTICATED"), Some(16));
    assert_eq!(grpc_code("8"), Some(8));
    assert_eq!(grpc_code("17"), None);
    assert_eq!(grpc_code("NOPE"), None);
}

#[test]
fn mirrors_take_mirror_percentage_and_each_mirrors_entry() {
    let r = route(
        "mirror: {host: a}\nmirrorPercentage: {value: 50}\nmirrors:\n- destination: {host: b}\n- destination: {host: c}\n  percentage: {value: 10}",
    );
    let m = mirrors(&r, |_, d| ClusterKey {
        host: d.host.as_str().into(),
        subset: None,
        port: 0,
    });
    let got: Vec<(&str, f64)> = m.iter().map(|m| (&*m.cluster.host, m.percentage)).collect();
    assert_eq!(got, vec![("a", 50.0), ("b", 100.0), ("c", 10.0)]);

    // Istio: mirror with no percentage mirrors everything.
    let r = route("mirror: {host: a}");
    assert_eq!(
        mirrors(&r, |_, _| ClusterKey {
            host: "a".into(),
            subset: None,
            port: 0
        })[0]
            .percentage,
        100.0
    );
}
