//! Pieces several Istio kinds share: the enum decoder, Go-style durations, percentages, string
//! matches, selectors and target references, and the host/IP/label checks of Istio's validation.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::FieldError;

/// Declares an Istio proto enum decoded from its string name. Decoding is case-sensitive (the CRD
/// schema lists the names) and an unknown name says which names exist. Marks the proto3 zero value
/// `#[default]`: that is Istio's documented default for every enum field.
macro_rules! istio_enum {
    ($(#[$meta:meta])* pub enum $name:ident {
        $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!(
                        "unknown variant {s:?}, expected one of {}",
                        Self::NAMES.join(", ")
                    )),
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use istio_enum;

/// Collects validation errors with their paths.
#[derive(Debug, Default)]
pub(crate) struct Report(pub(crate) Vec<FieldError>);

impl Report {
    pub(crate) fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    pub(crate) fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(message) = result {
            self.err(field, message);
        }
    }
}

// ---- durations ---------------------------------------------------------------------------------

/// Parses a duration as Istio reads one: Go's `time.ParseDuration` syntax ("1.5s", "100ms",
/// "1h30m", "0"), since Istio's JSON decoding of `google.protobuf.Duration` accepts it. Negative
/// durations parse in Go but no Istio field allows one, so they are refused here.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |why: &str| {
        format!("invalid duration {text:?}: {why} (expected e.g. \"1.5s\", \"100ms\", \"1h30m\")")
    };
    let mut s = text;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        return Err(invalid("must not be negative"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int, rest) = s.split_at(int_len);
        let (frac, rest) = match rest.strip_prefix('.') {
            Some(r) => r.split_at(r.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", rest),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(invalid("expected a number"));
        }
        let unit_len = rest
            .bytes()
            .take_while(|b| *b != b'.' && !b.is_ascii_digit())
            .count();
        let (unit, rest) = rest.split_at(unit_len);
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(invalid("missing unit")),
            _ => return Err(invalid(&format!("unknown unit {unit:?}"))),
        };
        // Go caps durations at i64 nanoseconds (about 292 years); digits beyond that overflow.
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid("overflow"))?
        };
        let frac = &frac[..frac.len().min(18)];
        let frac_value: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse().unwrap_or(0)
        };
        let scale = 10u128.pow(frac.len() as u32);
        total = int
            .checked_mul(nanos_per_unit)
            .and_then(|n| n.checked_add(frac_value * nanos_per_unit / scale))
            .and_then(|n| n.checked_add(total))
            .filter(|n| *n <= i64::MAX as u128)
            .ok_or_else(|| invalid("overflow"))?;
        s = rest;
    }
    Ok(Duration::from_nanos(total as u64))
}

/// `deserialize_with` for `Option<Duration>` fields written as Istio duration strings.
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Istio ValidateDuration: at least 1ms and a whole number of milliseconds.
pub(crate) fn check_duration(r: &mut Report, field: impl Into<String>, d: Option<Duration>) {
    let Some(d) = d else { return };
    if d < Duration::from_millis(1) {
        r.err(field, "duration must be greater than 1ms");
    } else if d.subsec_nanos() % 1_000_000 != 0 {
        r.err(field, "only durations to ms precision are supported");
    }
}

// ---- numbers -----------------------------------------------------------------------------------

/// `deserialize_with` for proto uint64 fields: proto JSON writes them as strings, YAML as numbers.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct U64;
    impl serde::de::Visitor<'_> for U64 {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an unsigned integer, or one in a string")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u64, E> {
            s.parse()
                .map_err(|_| E::custom(format!("{s:?} is not an unsigned integer")))
        }
    }
    struct OptU64;
    impl<'de> serde::de::Visitor<'de> for OptU64 {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an unsigned integer, or one in a string")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
            d.deserialize_any(U64).map(Some)
        }
    }
    d.deserialize_option(OptU64)
}

/// Percent specifies a percentage in the range of [0.0, 100.0].
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(default)]
pub struct Percent {
    pub value: f64,
}

/// Istio validatePercentage: 0, or within [0.0001, 100] (Envoy's finest fractional percent).
pub(crate) fn check_percentage(r: &mut Report, field: impl Into<String>, p: Option<Percent>) {
    let Some(Percent { value }) = p else { return };
    if !(0.0..=100.0).contains(&value) || (value > 0.0 && value < 0.0001) {
        r.err(
            field,
            format!("percentage {value} is neither 0.0, nor in range [0.0001, 100.0]"),
        );
    }
}

/// Istio ValidatePercent, for the legacy integer percentages.
pub(crate) fn check_percent(r: &mut Report, field: impl Into<String>, value: i64) {
    if !(0..=100).contains(&value) {
        r.err(field, format!("percentage {value} is not in range 0..100"));
    }
}

/// Istio ValidatePort.
pub(crate) fn check_port(r: &mut Report, field: impl Into<String>, port: u32) {
    if !(1..=65535).contains(&port) {
        r.err(
            field,
            format!("port number {port} must be in the range 1..65535"),
        );
    }
}

/// PortSelector specifies the number of a port to be used for matching or selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct PortSelector {
    pub number: u32,
}

// ---- string matches ----------------------------------------------------------------------------

/// How to match a string: exactly one of `exact`, `prefix` or `regex` (RE2 syntax), case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// The one match a valid [`StringMatch`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Regex(&'a str),
}

impl StringMatch {
    /// The match, or `None` for `{}`, which Istio documents for headers as "present".
    pub fn matcher(&self) -> Option<Match<'_>> {
        let StringMatch {
            exact,
            prefix,
            regex,
        } = self;
        exact
            .as_deref()
            .map(Match::Exact)
            .or_else(|| prefix.as_deref().map(Match::Prefix))
            .or_else(|| regex.as_deref().map(Match::Regex))
    }

    /// Checks the oneof and compiles a regex. `allow_empty` where Istio gives `{}` a meaning
    /// (header and query parameter presence).
    pub(crate) fn check(&self, r: &mut Report, field: &str, allow_empty: bool) {
        let set = [&self.exact, &self.prefix, &self.regex]
            .iter()
            .filter(|o| o.is_some())
            .count();
        if set > 1 {
            r.err(field, "only one of exact, prefix or regex may be set");
        } else if set == 0 && !allow_empty {
            r.err(field, "exactly one of exact, prefix or regex must be set");
        }
        if let Some(re) = &self.regex {
            r.check(format!("{field}.regex"), check_regex(re));
        }
    }
}

/// Istio validateStringRegexp: non-empty, at most 1024 bytes (Envoy's RE2 program-size guard) and
/// compilable. Istio uses RE2; the `regex` crate implements the same syntax minus a few rarities.
pub(crate) fn check_regex(re: &str) -> Result<(), String> {
    if re.is_empty() {
        return Err("regex string match should not be empty".into());
    }
    if re.len() > 1024 {
        return Err("regex is too large, max length allowed is 1024".into());
    }
    regex::Regex::new(re).map(drop).map_err(|e| {
        let e = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        format!("{e}; Istio uses RE2 style regex-based match (https://github.com/google/re2/wiki/Syntax)")
    })
}

// ---- selectors and target references ----------------------------------------------------------

/// Selects workloads in the policy's namespace (all namespaces from the root namespace) by label.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Istio validateWorkloadSelector: no empty keys and no wildcards.
    pub(crate) fn check(&self, r: &mut Report, field: &str) {
        for (k, v) in &self.match_labels {
            let path = format!("{field}.matchLabels.{k}");
            if k.is_empty() {
                r.err(
                    path,
                    format!("empty key is not supported in selector: \"{k}={v}\""),
                );
            } else if k.contains('*') || v.contains('*') {
                r.err(
                    path,
                    format!("wildcard is not supported in selector: \"{k}={v}\""),
                );
            }
        }
    }
}

/// Istio's PolicyTargetReference (Gateway API GEP-713): the resource a policy attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub struct PolicyTargetReference {
    pub group: String,
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

impl PolicyTargetReference {
    /// Istio validatePolicyTargetReference: a named Service, ServiceEntry, Gateway or GatewayClass
    /// in the policy's own namespace.
    pub(crate) fn check(&self, r: &mut Report, field: &str) {
        if self.name.is_empty() {
            r.err(format!("{field}.name"), "targetRef name must be set");
        }
        if !self.namespace.is_empty() {
            let msg =
                "targetRef namespace must not be set; cross namespace referencing is not supported";
            r.err(format!("{field}.namespace"), msg);
        }
        let allowed = matches!(
            (self.group.as_str(), self.kind.as_str()),
            ("" | "core", "Service")
                | ("networking.istio.io", "ServiceEntry")
                | ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
        );
        if !allowed {
            let msg = format!(
                "targetRef must be to one of core/Service, networking.istio.io/ServiceEntry, \
                 gateway.networking.k8s.io/Gateway or gateway.networking.k8s.io/GatewayClass but was {}/{}",
                self.group, self.kind
            );
            r.err(format!("{field}.kind"), msg);
        }
    }
}

// ---- names, hosts and addresses ----------------------------------------------------------------

/// RFC 1123 label, as Kubernetes and Istio define it.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

fn check_dns1123_labels(domain: &str) -> Result<(), String> {
    let parts: Vec<&str> = domain.split('.').collect();
    let tld = parts[parts.len() - 1];
    if !tld.is_empty() && tld.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "domain name {domain:?} invalid (top level domain {tld:?} cannot be all-numeric)"
        ));
    }
    for (i, label) in parts.iter().enumerate() {
        // Istio allows an empty last label, for unambiguous names like `istio.io.`.
        if i == parts.len() - 1 && label.is_empty() {
            break;
        }
        if !is_dns1123_label(label) {
            return Err(format!(
                "domain name {domain:?} invalid (label {label:?} invalid)"
            ));
        }
    }
    Ok(())
}

fn check_dns1123_preconditions(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err(format!("domain name {name:?} too long (max 255)"));
    }
    if name.is_empty() {
        return Err("empty domain name not allowed".into());
    }
    Ok(())
}

/// Istio ValidateFQDN.
pub(crate) fn check_fqdn(name: &str) -> Result<(), String> {
    check_dns1123_preconditions(name)?;
    check_dns1123_labels(name)
}

/// Istio ValidateWildcardDomain: an FQDN whose first label may be `*`, `*foo` or `*-foo`.
pub(crate) fn check_wildcard_domain(domain: &str) -> Result<(), String> {
    check_dns1123_preconditions(domain)?;
    let (first, rest) = match domain.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (domain, None),
    };
    let body = first
        .strip_prefix("*-")
        .or_else(|| first.strip_prefix('*'))
        .unwrap_or(first);
    let wildcard_ok = first.len() <= 63 && (first == "*" || is_dns1123_label(body));
    if !wildcard_ok {
        return Err(format!(
            "domain name {domain:?} invalid (label {first:?} invalid)"
        ));
    }
    rest.map_or(Ok(()), check_dns1123_labels)
}

/// Istio host.Name.Matches: the two hostnames (either may be a wildcard) overlap.
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    match (a.strip_prefix('*'), b.strip_prefix('*')) {
        (Some(a), Some(b)) => a.ends_with(b) || b.ends_with(a),
        (Some(a), None) => b.ends_with(a),
        (None, Some(b)) => a.ends_with(b),
        (None, None) => a == b,
    }
}

/// Istio host.Name.SubsetOf: every name `host` matches is matched by `of`.
pub fn host_subset_of(host: &str, of: &str) -> bool {
    match (host.strip_prefix('*'), of.strip_prefix('*')) {
        (Some(h), Some(o)) => h.ends_with(o),
        (None, Some(o)) => host.ends_with(o),
        (Some(_), None) => false,
        (None, None) => host == of,
    }
}

/// Istio ValidateIPSubnet / security.ValidateIPs: a single IP, or a CIDR block.
pub(crate) fn check_ip_or_cidr(s: &str) -> Result<(), String> {
    match s.split_once('/') {
        None => s
            .parse::<IpAddr>()
            .map(drop)
            .map_err(|_| format!("{s} is not a valid IP")),
        Some((ip, bits)) => {
            let max = match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => 32,
                Ok(IpAddr::V6(_)) => 128,
                Err(_) => return Err(format!("{s} is not a valid CIDR block")),
            };
            match bits.parse::<u8>() {
                Ok(n) if n <= max && !bits.starts_with('+') => Ok(()),
                _ => Err(format!("{s} is not a valid CIDR block")),
            }
        }
    }
}

/// Kubernetes label syntax: optional DNS-subdomain prefix and `/`, then a qualified name (keys);
/// values are empty or a qualified name. Istio labels.Instance.Validate.
pub(crate) fn check_labels(r: &mut Report, field: &str, labels: &BTreeMap<String, String>) {
    fn qualified(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }
    for (k, v) in labels {
        let key_ok = match k.split_once('/') {
            Some((prefix, name)) => {
                prefix.len() <= 253 && prefix.split('.').all(is_dns1123_label) && qualified(name)
            }
            None => qualified(k),
        };
        if !key_ok {
            r.err(format!("{field}.{k}"), format!("invalid label key: {k:?}"));
        } else if !v.is_empty() && !qualified(v) {
            r.err(
                format!("{field}.{k}"),
                format!("invalid label value: {v:?}"),
            );
        }
    }
}

/// RFC 7230 token: a valid HTTP header name.
pub(crate) fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Istio validateExportTo. `.` is the object's own namespace, `*` all namespaces and `~` (only
/// for ServiceEntry) none; anything else is a namespace name. Absent means `*`.
pub(crate) fn check_export_to(
    r: &mut Report,
    namespace: Option<&str>,
    export_to: &[String],
    is_service_entry: bool,
) {
    let mut seen: Vec<&str> = Vec::new();
    for (i, e) in export_to.iter().enumerate() {
        let field = format!("spec.exportTo[{i}]");
        let key = if e == "." {
            namespace.unwrap_or(".")
        } else {
            e.as_str()
        };
        if seen.contains(&key) {
            r.err(
                field,
                format!("duplicate entries in exportTo for entry {e}"),
            );
            continue;
        }
        let valid =
            matches!(key, "*" | ".") || (key == "~" && is_service_entry) || is_dns1123_label(key);
        if valid {
            seen.push(key);
        } else {
            r.err(field, format!("invalid exportTo value {e:?}"));
        }
    }
    if export_to.len() > 1 && seen.contains(&"*") {
        let msg = "cannot have both public (*) and non-public exportTo values for a resource";
        r.err("spec.exportTo", msg);
    }
    if export_to.len() > 1 && seen.contains(&"~") {
        r.err(
            "spec.exportTo",
            "cannot export service entry to no one (~) and someone",
        );
    }
}
