//! Istio's validation of VirtualService (istio/istio pkg/config/validation virtualservice.go and
//! validation.go): every rule reported as a [`FieldError`] at the path of the offending field.

use std::collections::BTreeMap;

use super::common::{
    check_duration, check_export_to, check_fqdn, check_ip_or_cidr, check_labels, check_percent,
    check_percentage, check_port, check_regex, check_wildcard_domain, host_subset_of,
    hosts_overlap, is_dns1123_label, is_header_name, Percent, Report,
};
use super::virtual_service::{
    CorsPolicy, Destination, Headers, HttpFaultInjection, HttpMatchRequest, HttpRedirect,
    HttpRetry, HttpRewrite, HttpRoute, RouteDestination, TlsMatchAttributes, VirtualService,
};
use super::FieldError;

/// Envoy's `x-envoy-retry-on` and `x-envoy-retry-grpc-on` policies Istio accepts in `retryOn`.
const RETRY_ON_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

const CORS_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE",
];

/// gRPC status names Istio accepts for an abort (grpc/doc/statuscodes.md).
const GRPC_STATUSES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl VirtualService {
    /// Istio ValidateVirtualService. `namespace` is the object's, for `exportTo: ["."]`.
    pub fn validate(&self, namespace: Option<&str>) -> Vec<FieldError> {
        let mut r = Report::default();
        if self.hosts.is_empty() {
            // Istio: no hosts makes this a delegate VirtualService, which only carries HTTP routes.
            if !self.gateways.is_empty() {
                r.err(
                    "spec.gateways",
                    "delegate virtual service must have no gateways specified",
                );
            }
            if !self.tls.is_empty() {
                r.err(
                    "spec.tls",
                    "delegate virtual service must have no tls route specified",
                );
            }
            if !self.tcp.is_empty() {
                r.err(
                    "spec.tcp",
                    "delegate virtual service must have no tcp route specified",
                );
            }
        }
        for (i, g) in self.gateways.iter().enumerate() {
            r.check(format!("spec.gateways[{i}]"), check_gateway_name(g));
        }
        let mut all_hosts_valid = true;
        for (i, host) in self.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if let Err(e) = check_wildcard_domain(host) {
                if host.parse::<std::net::IpAddr>().is_err() {
                    r.err(field, e);
                    all_hosts_valid = false;
                }
            } else if host == "*" && self.applies_to_mesh() {
                r.err(
                    field,
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                );
                all_hosts_valid = false;
            }
        }
        if all_hosts_valid {
            for (i, a) in self.hosts.iter().enumerate() {
                for b in &self.hosts[i + 1..] {
                    if hosts_overlap(a, b) {
                        r.err(
                            "spec.hosts",
                            format!("duplicate hosts in virtual service: {a} & {b}"),
                        );
                    }
                }
            }
        }
        if self.http.is_empty() && self.tcp.is_empty() && self.tls.is_empty() {
            r.err(
                "spec",
                "http, tcp or tls must be provided in virtual service",
            );
        }
        let delegate = self.hosts.is_empty();
        for (i, http) in self.http.iter().enumerate() {
            http.check(&mut r, &format!("spec.http[{i}]"), delegate);
        }
        for (i, tls) in self.tls.iter().enumerate() {
            let field = format!("spec.tls[{i}]");
            if tls.matches.is_empty() {
                r.err(
                    format!("{field}.match"),
                    "TLS route must have at least one match condition",
                );
            }
            for (j, m) in tls.matches.iter().enumerate() {
                self.check_tls_match(&mut r, &format!("{field}.match[{j}]"), m);
            }
            if tls.route.is_empty() {
                r.err(format!("{field}.route"), "TLS route is required");
            }
            check_route_destinations(&mut r, &field, &tls.route);
        }
        for (i, tcp) in self.tcp.iter().enumerate() {
            let field = format!("spec.tcp[{i}]");
            for (j, m) in tcp.matches.iter().enumerate() {
                let f = format!("{field}.match[{j}]");
                check_subnets(&mut r, &f, &m.destination_subnets);
                check_l4_source(
                    &mut r,
                    &f,
                    m.port,
                    &m.source_labels,
                    &m.gateways,
                    &m.source_namespace,
                );
            }
            if tcp.route.is_empty() {
                r.err(format!("{field}.route"), "TCP route is required");
            }
            check_route_destinations(&mut r, &field, &tcp.route);
        }
        check_export_to(&mut r, namespace, &self.export_to, false);
        r.0
    }

    fn check_tls_match(&self, r: &mut Report, field: &str, m: &TlsMatchAttributes) {
        if m.sni_hosts.is_empty() {
            r.err(
                format!("{field}.sniHosts"),
                "TLS match must have at least one SNI host",
            );
        }
        for (k, sni) in m.sni_hosts.iter().enumerate() {
            let f = format!("{field}.sniHosts[{k}]");
            if let Err(e) = check_wildcard_domain(sni) {
                // Istio only warns about an IP as SNI.
                if sni.parse::<std::net::IpAddr>().is_err() {
                    r.err(f, e);
                }
            } else if !self.hosts.iter().any(|h| host_subset_of(sni, h)) {
                let msg = format!(
                    "SNI host {sni:?} is not a compatible subset of any of the virtual service hosts: [{}]",
                    self.hosts.join(", ")
                );
                r.err(f, msg);
            }
        }
        check_subnets(r, field, &m.destination_subnets);
        check_l4_source(
            r,
            field,
            m.port,
            &m.source_labels,
            &m.gateways,
            &m.source_namespace,
        );
    }
}

impl HttpRoute {
    fn check(&self, r: &mut Report, field: &str, in_delegate: bool) {
        let root = self.delegate.is_some() && !in_delegate;
        if root {
            // Istio: a root route only delegates.
            if self.redirect.is_some() {
                r.err(
                    format!("{field}.redirect"),
                    "root HTTP route must not specify redirect",
                );
            }
            if !self.route.is_empty() {
                r.err(
                    format!("{field}.route"),
                    "root HTTP route must not specify route",
                );
            }
        } else {
            if in_delegate && self.delegate.is_some() {
                r.err(
                    format!("{field}.delegate"),
                    "delegate HTTP route cannot contain delegate",
                );
            }
            let actions = [
                !self.route.is_empty(),
                self.redirect.is_some(),
                self.direct_response.is_some(),
            ];
            match actions.iter().filter(|a| **a).count() {
                0 => r.err(
                    field.to_string(),
                    "HTTP route, redirect or direct response is required",
                ),
                1 => {}
                _ => r.err(
                    field.to_string(),
                    "HTTP route may contain only one of route, redirect or directResponse",
                ),
            }
            if self.redirect.is_some() && self.fault.is_some() {
                r.err(
                    format!("{field}.fault"),
                    "HTTP route cannot contain both fault and redirect",
                );
            }
            if self.redirect.is_some() && self.rewrite.is_some() {
                r.err(
                    format!("{field}.rewrite"),
                    "HTTP route rule cannot contain both rewrite and redirect",
                );
            }
        }
        for (j, m) in self.matches.iter().enumerate() {
            check_http_match(r, &format!("{field}.match[{j}]"), m);
        }
        check_headers(r, &format!("{field}.headers"), self.headers.as_ref());
        if let Some(cors) = &self.cors_policy {
            check_cors(r, &format!("{field}.corsPolicy"), cors);
        }
        if let Some(fault) = &self.fault {
            check_fault(r, &format!("{field}.fault"), fault);
        }
        if let Some(p) = self.mirror_percent {
            check_percent(r, format!("{field}.mirrorPercent"), i64::from(p));
        }
        if let Some(Percent { value }) = self.mirror_percentage {
            if !(0.0..=100.0).contains(&value) {
                let msg = format!("mirror_percentage must be in range [0, 100] (it has {value})");
                r.err(format!("{field}.mirrorPercentage"), msg);
            }
        }
        if let Some(m) = &self.mirror {
            check_destination(r, &format!("{field}.mirror"), m);
        }
        for (j, m) in self.mirrors.iter().enumerate() {
            let f = format!("{field}.mirrors[{j}]");
            check_destination(r, &format!("{f}.destination"), &m.destination);
            if let Some(Percent { value }) = m.percentage {
                if !(0.0..=100.0).contains(&value) {
                    r.err(
                        format!("{f}.percentage"),
                        format!("mirror percentage must be in range [0, 100] (it has {value})"),
                    );
                }
            }
        }
        if let Some(redirect) = &self.redirect {
            check_redirect(r, &format!("{field}.redirect"), redirect);
        }
        if let Some(d) = &self.direct_response {
            let f = format!("{field}.directResponse");
            if !(200..=599).contains(&d.status) {
                r.err(
                    format!("{f}.status"),
                    format!("HTTP status {} is not in range 200-599", d.status),
                );
            }
            if d.body
                .as_ref()
                .is_some_and(|b| b.string.is_some() && b.bytes.is_some())
            {
                r.err(
                    format!("{f}.body"),
                    "only one of string or bytes may be set",
                );
            }
        }
        if let Some(retries) = &self.retries {
            check_retry(r, &format!("{field}.retries"), retries);
        }
        if let Some(rw) = &self.rewrite {
            check_rewrite(r, &format!("{field}.rewrite"), rw);
        }
        let mut total: i64 = 0;
        for (j, rd) in self.route.iter().enumerate() {
            let f = format!("{field}.route[{j}]");
            check_headers(r, &format!("{f}.headers"), rd.headers.as_ref());
            check_destination(r, &format!("{f}.destination"), &rd.destination);
            check_weight(r, &format!("{f}.weight"), rd.weight);
            total += i64::from(rd.weight);
        }
        // Istio: weights are relative; only an all-zero split of several destinations is invalid.
        if self.route.len() > 1 && total == 0 {
            r.err(format!("{field}.route"), "total destination weight = 0");
        }
        check_duration(r, format!("{field}.timeout"), self.timeout);
    }
}

fn check_http_match(r: &mut Report, field: &str, m: &HttpMatchRequest) {
    for (name, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            sm.check(r, &format!("{field}.{name}"), false);
        }
    }
    for (map_name, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let f = format!("{field}.{map_name}.{name}");
            // Istio also accepts `@request.auth.claims.<claim>` keys for JWT claim routing.
            let pseudo =
                [":method", ":scheme", ":authority", ":path", ":status"].contains(&name.as_str());
            if !name.starts_with("@request.auth.claims") && !is_header_name(name) && !pseudo {
                r.err(
                    f.clone(),
                    format!("header name {name} is not a valid header name"),
                );
            }
            sm.check(r, &f, true);
        }
    }
    for (name, sm) in &m.query_params {
        sm.check(r, &format!("{field}.queryParams.{name}"), true);
    }
    check_l4_source(
        r,
        field,
        m.port,
        &m.source_labels,
        &m.gateways,
        &m.source_namespace,
    );
}

/// Port, source labels, gateways and source namespace: shared by HTTP, TLS and TCP matches.
fn check_l4_source(
    r: &mut Report,
    field: &str,
    port: u32,
    source_labels: &BTreeMap<String, String>,
    gateways: &[String],
    source_namespace: &str,
) {
    if port != 0 {
        check_port(r, format!("{field}.port"), port);
    }
    check_labels(r, &format!("{field}.sourceLabels"), source_labels);
    for (k, g) in gateways.iter().enumerate() {
        r.check(format!("{field}.gateways[{k}]"), check_gateway_name(g));
    }
    if !source_namespace.is_empty() && !is_dns1123_label(source_namespace) {
        let msg = format!("sourceNamespace match {source_namespace} is invalid");
        r.err(format!("{field}.sourceNamespace"), msg);
    }
}

fn check_subnets(r: &mut Report, field: &str, subnets: &[String]) {
    for (k, s) in subnets.iter().enumerate() {
        r.check(
            format!("{field}.destinationSubnets[{k}]"),
            check_ip_or_cidr(s),
        );
    }
}

/// Istio validateGatewayNames: `<namespace>/<name>`, or a legacy FQDN-style name (or `mesh`).
fn check_gateway_name(name: &str) -> Result<(), String> {
    match name.split_once('/') {
        None => check_fqdn(name),
        Some((ns, gw)) if ns.is_empty() || gw.is_empty() => {
            Err("config namespace and gateway name cannot be empty".into())
        }
        Some((ns, _)) if !is_dns1123_label(ns) => {
            Err(format!("invalid value for namespace: {ns:?}"))
        }
        Some((_, gw)) if !is_dns1123_label(gw) => {
            Err(format!("invalid value for gateway name: {gw:?}"))
        }
        Some(_) => Ok(()),
    }
}

/// Istio validateDestination.
fn check_destination(r: &mut Report, field: &str, d: &Destination) {
    if d.host.is_empty() {
        r.err(format!("{field}.host"), "destination host is required");
    } else if d.host == "*" {
        r.err(
            format!("{field}.host"),
            format!("invalid destination host {}", d.host),
        );
    } else {
        r.check(format!("{field}.host"), check_wildcard_domain(&d.host));
    }
    if !d.subset.is_empty() && !is_dns1123_label(&d.subset) {
        r.err(
            format!("{field}.subset"),
            format!("subset name is invalid: {}", d.subset),
        );
    }
    if let Some(p) = d.port {
        check_port(r, format!("{field}.port.number"), p.number);
    }
}

fn check_weight(r: &mut Report, field: &str, weight: i32) {
    if weight < 0 {
        r.err(field.to_string(), format!("weight {weight} < 0"));
    }
}

fn check_route_destinations(r: &mut Report, field: &str, route: &[RouteDestination]) {
    let mut total: i64 = 0;
    for (j, rd) in route.iter().enumerate() {
        let f = format!("{field}.route[{j}]");
        check_destination(r, &format!("{f}.destination"), &rd.destination);
        check_weight(r, &format!("{f}.weight"), rd.weight);
        total += i64::from(rd.weight);
    }
    if route.len() > 1 && total == 0 {
        r.err(format!("{field}.route"), "total destination weight = 0");
    }
}

/// Istio header operations: no empty names, no pseudo-headers except `:authority` in request
/// set/add, no Host in removals or responses, no control characters in values.
fn check_headers(r: &mut Report, field: &str, headers: Option<&Headers>) {
    let Some(headers) = headers else { return };
    for (side, ops) in [
        ("request", &headers.request),
        ("response", &headers.response),
    ] {
        let Some(ops) = ops else { continue };
        let f = format!("{field}.{side}");
        for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
            for (name, value) in map {
                let path = format!("{f}.{op}.{name}");
                let authority =
                    name.eq_ignore_ascii_case(":authority") || name.eq_ignore_ascii_case("host");
                if name.is_empty() {
                    r.err(path, "header name cannot be empty");
                } else if side == "response" && name.eq_ignore_ascii_case("host") {
                    r.err(
                        path,
                        format!("invalid header {name:?}: cannot set Host header"),
                    );
                } else if name.starts_with(':') && !(side == "request" && authority) {
                    r.err(
                        path,
                        format!("invalid header {name:?}: header cannot have \":\" prefix"),
                    );
                } else if value.chars().any(|c| c.is_control() && c != '\t') {
                    r.err(
                        path,
                        format!("header value configuration {value} is invalid"),
                    );
                }
            }
        }
        for (k, name) in ops.remove.iter().enumerate() {
            let path = format!("{f}.remove[{k}]");
            if name.is_empty() {
                r.err(path, "header name cannot be empty");
            } else if name.eq_ignore_ascii_case("host") {
                r.err(
                    path,
                    format!("invalid header {name:?}: cannot set Host header"),
                );
            } else if name.starts_with(':') {
                r.err(
                    path,
                    format!("invalid header {name:?}: header cannot have \":\" prefix"),
                );
            }
        }
    }
}

fn check_cors(r: &mut Report, field: &str, cors: &CorsPolicy) {
    for (k, origin) in cors.allow_origins.iter().enumerate() {
        origin.check(r, &format!("{field}.allowOrigins[{k}]"), false);
    }
    for (k, method) in cors.allow_methods.iter().enumerate() {
        if !CORS_METHODS.contains(&method.as_str()) {
            r.err(
                format!("{field}.allowMethods[{k}]"),
                format!("{method:?} is not a supported HTTP method"),
            );
        }
    }
    for (list, names) in [
        ("allowHeaders", &cors.allow_headers),
        ("exposeHeaders", &cors.expose_headers),
    ] {
        for (k, name) in names.iter().enumerate() {
            if name != "*" && !is_header_name(name) {
                r.err(
                    format!("{field}.{list}[{k}]"),
                    format!("header name {name} is not a valid header name"),
                );
            }
        }
    }
    check_duration(r, format!("{field}.maxAge"), cors.max_age);
    if cors.max_age.is_some_and(|d| d.subsec_nanos() != 0) {
        r.err(
            format!("{field}.maxAge"),
            "max_age duration is accurate only to seconds precision",
        );
    }
}

fn check_fault(r: &mut Report, field: &str, fault: &HttpFaultInjection) {
    if fault.abort.is_none() && fault.delay.is_none() {
        r.err(
            field.to_string(),
            "HTTP fault injection must have an abort and/or a delay",
        );
    }
    if let Some(abort) = &fault.abort {
        let f = format!("{field}.abort");
        check_percentage(r, format!("{f}.percentage"), abort.percentage);
        let kinds = [
            abort.http_status.is_some(),
            abort.grpc_status.is_some(),
            abort.http2_error.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            r.err(
                f.clone(),
                "only one of httpStatus, grpcStatus or http2Error may be set",
            );
        }
        if let Some(status) = abort.http_status {
            if !(200..=599).contains(&status) {
                r.err(
                    format!("{f}.httpStatus"),
                    format!("HTTP status {status} is not in range 200-599"),
                );
            }
        }
        if let Some(status) = &abort.grpc_status {
            if !GRPC_STATUSES.contains(&status.as_str()) {
                let msg = format!("gRPC status {status:?} is not supported. See https://github.com/grpc/grpc/blob/master/doc/statuscodes.md for a list of supported codes, for example 'NOT_FOUND'");
                r.err(format!("{f}.grpcStatus"), msg);
            }
        }
        if abort.http2_error.is_some() {
            r.err(
                format!("{f}.http2Error"),
                "HTTP/2 abort fault injection not supported yet",
            );
        }
    }
    if let Some(delay) = &fault.delay {
        let f = format!("{field}.delay");
        check_percentage(r, format!("{f}.percentage"), delay.percentage);
        if let Some(p) = delay.percent {
            check_percent(r, format!("{f}.percent"), i64::from(p));
        }
        if delay.fixed_delay.is_some() && delay.exponential_delay.is_some() {
            r.err(
                f.clone(),
                "only one of fixedDelay or exponentialDelay may be set",
            );
        }
        check_duration(r, format!("{f}.fixedDelay"), delay.fixed_delay);
        if delay.exponential_delay.is_some() {
            r.err(
                format!("{f}.exponentialDelay"),
                "exponentialDelay not supported yet",
            );
        }
    }
}

fn check_redirect(r: &mut Report, field: &str, rd: &HttpRedirect) {
    let port_set = rd.port.is_some() || rd.derive_port.is_some();
    if rd.uri.is_empty() && rd.authority.is_empty() && !port_set && rd.scheme.is_empty() {
        r.err(
            field.to_string(),
            "redirect must specify URI, authority, scheme, or port",
        );
    }
    if rd.redirect_code != 0 && !(300..=399).contains(&rd.redirect_code) {
        let msg = format!(
            "{} is not a valid redirect code, must be 3xx",
            rd.redirect_code
        );
        r.err(format!("{field}.redirectCode"), msg);
    }
    if !rd.scheme.is_empty() && rd.scheme != "http" && rd.scheme != "https" {
        r.err(
            format!("{field}.scheme"),
            "invalid redirect scheme, must be \"http\" or \"https\"",
        );
    }
    if rd.port.is_some() && rd.derive_port.is_some() {
        r.err(
            field.to_string(),
            "only one of port or derivePort may be set",
        );
    }
    if let Some(p) = rd.port {
        check_port(r, format!("{field}.port"), p);
    }
}

fn check_retry(r: &mut Report, field: &str, retry: &HttpRetry) {
    if retry.attempts < 0 {
        r.err(format!("{field}.attempts"), "attempts cannot be negative");
    }
    let configured = retry.per_try_timeout.is_some()
        || !retry.retry_on.is_empty()
        || retry.retry_remote_localities.is_some();
    if retry.attempts == 0 && configured {
        let msg = "http retry policy configured when attempts are set to 0 (disabled)";
        r.err(format!("{field}.attempts"), msg);
    }
    check_duration(r, format!("{field}.perTryTimeout"), retry.per_try_timeout);
    if !retry.retry_on.is_empty() {
        for policy in retry.retry_on.split(',') {
            // Istio accepts an HTTP status code (it is added to retriable status codes).
            let status = policy
                .parse::<u16>()
                .is_ok_and(|s| (100..=599).contains(&s));
            if !status && !RETRY_ON_POLICIES.contains(&policy) {
                r.err(
                    format!("{field}.retryOn"),
                    format!("{policy:?} is not a valid retryOn policy"),
                );
            }
        }
    }
    check_duration(r, format!("{field}.backoff"), retry.backoff);
}

fn check_rewrite(r: &mut Report, field: &str, rw: &HttpRewrite) {
    if !rw.uri.is_empty() && rw.uri_regex_rewrite.is_some() {
        r.err(
            field.to_string(),
            "rewrite may only contain one of URI or UriRegexRewrite",
        );
    }
    if rw.uri.is_empty() && rw.uri_regex_rewrite.is_none() && rw.authority.is_empty() {
        let msg = "rewrite must specify at least one of URI, UriRegexRewrite, or authority. Only one of URI or UriRegexRewrite may be specified";
        r.err(field.to_string(), msg);
    }
    if let Some(re) = &rw.uri_regex_rewrite {
        let f = format!("{field}.uriRegexRewrite");
        if re.pattern.is_empty() || re.rewrite.is_empty() {
            r.err(
                f,
                "UriRegexRewrite requires both Rewrite and Match fields to be specified",
            );
        } else {
            r.check(format!("{f}.match"), check_regex(&re.pattern));
        }
    }
}
