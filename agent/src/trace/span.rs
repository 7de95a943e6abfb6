//! Spans as Envoy makes them for Istio's sidecars: a CLIENT span on the source side (outbound),
//! a SERVER span on the destination side (inbound), each with its own span id whose parent is
//! the span id that came in the headers (Istio sets Zipkin `shared_span_context: false`). Names
//! and tags follow Envoy's `HttpTracerUtility::finalizeDownstreamSpan` / `setCommonTags` and
//! Istio's `buildServiceTags`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::context::{Extracted, SpanId, TraceContext, TraceId};
use super::sampling::Decision;
use super::DEFAULT_MAX_PATH_TAG_LENGTH;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    /// The source node's span for an outbound request (a sidecar's outbound listener).
    Client,
    /// The destination node's span for an inbound request (a sidecar's inbound listener).
    Server,
}

/// Istio's route decorator, which Envoy uses as the operation (span) name:
/// `reviews.default.svc.cluster.local:9080/*`.
pub fn operation_name(host: &str, port: u16) -> String {
    let mut port_buf = itoa::Buffer::new();
    let port = port_buf.format(port);
    let mut name = String::with_capacity(host.len() + port.len() + 3);
    name.push_str(host);
    name.push(':');
    name.push_str(port);
    name.push_str("/*");
    name
}

/// The workload a span is recorded for (the source pod for CLIENT spans, the destination pod for
/// SERVER spans): what a sidecar would know about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `service.istio.io/canonical-name` (Istio's default when unknown: "unknown").
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision` (Istio's default: "latest").
    pub canonical_revision: String,
    pub namespace: String,
    pub mesh_id: String,
    pub cluster_id: String,
    /// Envoy's `node_id` tag; Istio's form is `sidecar~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub node_id: String,
    /// Zipkin `localEndpoint.ipv4`/`ipv6`.
    pub ip: Option<IpAddr>,
}

impl Workload {
    /// Istio's service cluster, `<canonical service>.<namespace>`: Zipkin's
    /// `localEndpoint.serviceName` and OTLP's `service.name` resource attribute.
    pub fn service_name(&self) -> String {
        self.service_parts().concat()
    }

    /// [`Workload::service_name`] in its pieces, for writers that need not build it.
    pub fn service_parts(&self) -> [&str; 3] {
        [&self.canonical_service, ".", &self.namespace]
    }
}

/// A `customTags` entry (Telemetry API / `defaultConfig.tracing.custom_tags`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomTag {
    pub tag: String,
    pub value: CustomTagValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomTagValue {
    Literal(String),
    /// A request header's value, or `default` when the request has none; no tag if neither.
    Header {
        name: HeaderName,
        default: Option<String>,
    },
    /// An environment variable of the agent, read once when the tag is built (Envoy reads it at
    /// config load); no tag if unset and without default.
    Environment {
        value: Option<String>,
    },
}

impl CustomTag {
    pub fn literal(tag: impl Into<String>, value: impl Into<String>) -> CustomTag {
        CustomTag {
            tag: tag.into(),
            value: CustomTagValue::Literal(value.into()),
        }
    }

    pub fn header(tag: impl Into<String>, name: HeaderName, default: Option<String>) -> CustomTag {
        CustomTag {
            tag: tag.into(),
            value: CustomTagValue::Header { name, default },
        }
    }

    pub fn environment(tag: impl Into<String>, var: &str, default: Option<String>) -> CustomTag {
        CustomTag {
            tag: tag.into(),
            value: CustomTagValue::Environment {
                value: std::env::var(var).ok().or(default),
            },
        }
    }
}

/// Which tags a span gets beyond Envoy's standard ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagSettings {
    pub custom_tags: Vec<CustomTag>,
    /// Istio: `max_path_tag_length`, the longest path kept in `http.url` (default 256).
    pub max_path_tag_length: usize,
    /// Istio: `enableIstioTags` (default true): the `istio.*` tags.
    pub istio_tags: bool,
}

impl Default for TagSettings {
    fn default() -> Self {
        TagSettings {
            custom_tags: Vec::new(),
            max_path_tag_length: DEFAULT_MAX_PATH_TAG_LENGTH,
            istio_tags: true,
        }
    }
}

/// The request as the proxy saw it, borrowed for the time of `record_request`.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub headers: &'a HeaderMap,
    pub method: &'a str,
    /// "http" or "https" (Envoy: `x-forwarded-proto`, else the scheme).
    pub scheme: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub version: Version,
    /// Envoy's `peer.address`: the downstream's IP (the app for CLIENT spans, the calling peer
    /// for SERVER spans).
    pub peer: Option<IpAddr>,
}

/// The outcome, for `end`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseInfo<'a> {
    /// `None`: no response was sent (Envoy tags `http.status_code: 0` and `error: true`).
    pub status: Option<u16>,
    /// Envoy's short response flags ("UF", "URX,UF"); empty for none ("-").
    pub response_flags: &'a str,
    pub request_size: u64,
    pub response_size: u64,
    /// Envoy's `upstream_cluster` (cluster name) and `upstream_cluster.name` (observability
    /// name), e.g. `outbound|9080||reviews.default.svc.cluster.local`.
    pub upstream_cluster: Option<&'a str>,
    pub upstream_cluster_name: Option<&'a str>,
    /// Zipkin `remoteEndpoint`: the upstream host's IP, when known.
    pub remote_ip: Option<IpAddr>,
}

/// A span's own tags. Their text is written into one buffer, so that recording a span costs
/// two allocations rather than one per tag (at 100 % sampling every request records about ten),
/// and the exporter thread frees two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags {
    text: String,
    list: Vec<(Piece, Piece)>,
    /// A custom tag was set: it may name a standard tag again (the later one wins).
    custom: bool,
}

/// A tag's name or value: a constant, or a range of [`Tags::text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    Static(&'static str),
    Text(u32, u32),
}

impl Tags {
    /// Room for `tags` tags and `text` bytes of their text.
    pub fn with_capacity(tags: usize, text: usize) -> Tags {
        Tags {
            text: String::with_capacity(text),
            list: Vec::with_capacity(tags),
            custom: false,
        }
    }

    /// A standard tag whose value is a constant.
    pub fn put_static(&mut self, name: &'static str, value: &'static str) {
        self.list.push((Piece::Static(name), Piece::Static(value)));
    }

    /// A standard tag whose value is copied.
    pub fn put(&mut self, name: &'static str, value: &str) {
        self.put_with(name, |text| text.push_str(value));
    }

    /// A standard tag whose value `write` appends to the text.
    pub fn put_with(&mut self, name: &'static str, write: impl FnOnce(&mut String)) {
        let value = self.write(write);
        self.list.push((Piece::Static(name), value));
    }

    /// A custom tag (Telemetry `customTags`): name and value copied.
    pub fn put_custom(&mut self, name: &str, value: &str) {
        let name = self.write(|t| t.push_str(name));
        let value = self.write(|t| t.push_str(value));
        self.list.push((name, value));
        self.custom = true;
    }

    /// Sets `name` to the value of the tag set last, without copying it again.
    fn put_same(&mut self, name: &'static str) {
        if let Some(&(_, value)) = self.list.last() {
            self.list.push((Piece::Static(name), value));
        }
    }

    /// Whether a custom tag was set, so that a name may repeat.
    pub fn has_custom(&self) -> bool {
        self.custom
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every tag in the order set.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.list
            .iter()
            .map(|&(name, value)| (self.piece(name), self.piece(value)))
    }

    fn write(&mut self, write: impl FnOnce(&mut String)) -> Piece {
        let start = self.text.len();
        write(&mut self.text);
        // A span's text stays far below 4 GiB (paths are cut at `max_path_tag_length`, header
        // values at hyper's and h2's limits); past it a value would read as empty.
        match (u32::try_from(start), u32::try_from(self.text.len())) {
            (Ok(s), Ok(e)) => Piece::Text(s, e),
            _ => Piece::Static(""),
        }
    }

    fn piece(&self, p: Piece) -> &str {
        match p {
            Piece::Static(s) => s,
            Piece::Text(s, e) => self.text.get(s as usize..e as usize).unwrap_or_default(),
        }
    }
}

/// A finished span, ready for export.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// This span's ids; `parent_span_id` is the span it hangs under.
    pub context: TraceContext,
    pub kind: SpanKind,
    pub name: String,
    /// Microseconds since the Unix epoch (Zipkin's unit; OTLP gets nanoseconds).
    pub timestamp_us: u64,
    pub duration_us: u64,
    /// The request's own tags, in the order set (a later one wins); [`Span::tags`] adds the
    /// workload's.
    pub tags: Tags,
    /// Who recorded it (shared by all spans of the pod; None for an unsampled span): Zipkin's
    /// `localEndpoint`, OTLP's `service.name`, and the `node_id` and `istio.*` tags.
    pub workload: Option<Arc<Workload>>,
    /// Istio's `enableIstioTags` when the span was recorded.
    pub istio_tags: bool,
    pub remote_ip: Option<IpAddr>,
    /// The request's `tracestate`, kept for OTLP's `Span.trace_state`.
    pub trace_state: String,
}

impl Span {
    pub fn sampled(&self) -> bool {
        self.context.sampled == Some(true) || self.context.debug
    }

    /// The tag's value (the last one set, as the exporters send it).
    pub fn tag(&self, name: &str) -> Option<&str> {
        let mut found = None;
        for (k, v) in self.tags() {
            if k == name {
                found = Some(v);
            }
        }
        found
    }

    /// Every tag in order: the workload's (`node_id`, `istio.*`) then the request's, so a
    /// custom tag set later overrides a standard one.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.workload_tags().chain(self.tags.iter())
    }

    /// The workload's tags (`node_id`, and the `istio.*` tags when they were on).
    pub fn workload_tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.workload.as_deref().into_iter().flat_map(|w| {
            let istio: [(&'static str, &str); 5] = [
                ("istio.canonical_revision", &w.canonical_revision),
                ("istio.canonical_service", &w.canonical_service),
                ("istio.mesh_id", &w.mesh_id),
                ("istio.namespace", &w.namespace),
                ("istio.cluster_id", &w.cluster_id),
            ];
            let n = if self.istio_tags { istio.len() } else { 0 };
            std::iter::once(("node_id", w.node_id.as_str())).chain(istio.into_iter().take(n))
        })
    }

    /// Zipkin's `localEndpoint.serviceName` and OTLP's `service.name`.
    pub fn service_name(&self) -> String {
        self.workload
            .as_deref()
            .map(Workload::service_name)
            .unwrap_or_default()
    }

    pub fn local_ip(&self) -> Option<IpAddr> {
        self.workload.as_deref().and_then(|w| w.ip)
    }
}

/// A span in flight: started when the request arrives, ended when the response is done.
/// Unsampled spans carry ids (to propagate the decision) but record no tags and read no clock.
#[derive(Debug)]
pub struct SpanBuilder {
    span: Span,
    /// When a sampled span started (an unsampled one reads no clock: it is never reported).
    started: Option<Instant>,
}

impl SpanBuilder {
    /// A child of the incoming context (same trace, new span id, parent = the caller's span), or
    /// the root of a new 128-bit trace when nothing usable came in.
    pub fn start(
        kind: SpanKind,
        name: impl Into<String>,
        incoming: &Extracted,
        decision: Decision,
    ) -> SpanBuilder {
        let (trace_id, parent_span_id, debug) = match &incoming.parent {
            Some(p) => (p.trace_id, Some(p.span_id), p.debug),
            None => (TraceId::random(), None, false),
        };
        let sampled = decision.sampled || debug;
        let timestamp_us = match sampled {
            true => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
            false => 0,
        };
        SpanBuilder {
            span: Span {
                context: TraceContext {
                    trace_id,
                    span_id: SpanId::random(),
                    parent_span_id,
                    sampled: Some(sampled),
                    debug,
                },
                kind,
                name: name.into(),
                timestamp_us,
                duration_us: 0,
                tags: Tags::default(),
                workload: None,
                istio_tags: false,
                remote_ip: None,
                trace_state: String::new(),
            },
            started: sampled.then(Instant::now),
        }
    }

    /// Names the span (a span that is not reported needs no name: start it with an empty one).
    pub fn set_name(&mut self, name: String) {
        self.span.name = name;
    }

    /// The context to `inject` into the request sent on.
    pub fn context(&self) -> &TraceContext {
        &self.span.context
    }

    pub fn sampled(&self) -> bool {
        self.span.sampled()
    }

    /// Request-time tags (Envoy sets them from the request headers): `node_id`, `component`,
    /// `guid:x-request-id`, `http.url`, `http.method`, `downstream_cluster`, `user_agent`,
    /// `http.protocol`, `peer.address`, the `istio.*` tags and the custom tags.
    pub fn record_request(
        &mut self,
        req: &RequestInfo<'_>,
        who: &Arc<Workload>,
        tags: &TagSettings,
    ) {
        if !self.sampled() {
            return;
        }
        let span = &mut self.span;
        span.workload = Some(who.clone());
        span.istio_tags = tags.istio_tags;
        let read = ReadHeaders::of(req.headers);
        span.trace_state = text(read.tracestate).unwrap_or_default().to_string();
        let request_id = text(read.request_id);
        let path = text(read.original_path).unwrap_or(req.path);
        let path = truncate(path, tags.max_path_tag_length);
        let scheme = text(read.forwarded_proto).unwrap_or(req.scheme);
        let downstream = text(read.downstream_cluster);
        let user_agent = text(read.user_agent);
        let len = |v: Option<&str>| v.map_or(0, str::len);
        // Room for this and the response's tags at once: the url, the copied headers, an
        // address, and the response's numbers, flags and cluster name.
        let text = scheme.len() + 3 + req.authority.len() + path.len() + req.method.len();
        let text = text + len(request_id) + len(downstream) + len(user_agent) + 40 + 192;
        span.tags = Tags::with_capacity(16 + tags.custom_tags.len(), text);
        let t = &mut span.tags;
        t.put_static("component", "proxy");
        if let Some(id) = request_id {
            t.put("guid:x-request-id", id);
        }
        t.put_with("http.url", |url| {
            url.push_str(scheme);
            url.push_str("://");
            url.push_str(req.authority);
            url.push_str(path);
        });
        t.put("http.method", req.method);
        match downstream {
            Some(v) => t.put("downstream_cluster", v),
            None => t.put_static("downstream_cluster", "-"),
        }
        match user_agent {
            Some(v) => t.put("user_agent", v),
            None => t.put_static("user_agent", "-"),
        }
        t.put_static("http.protocol", protocol(req.version));
        if let Some(peer) = req.peer {
            t.put_with("peer.address", |s| address(peer, |p| s.push_str(p)));
        }
        for custom in &tags.custom_tags {
            let value = match &custom.value {
                CustomTagValue::Literal(v) => Some(v.as_str()),
                CustomTagValue::Header { name, default } => req
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .or(default.as_deref()),
                CustomTagValue::Environment { value } => value.as_deref(),
            };
            if let Some(value) = value {
                t.put_custom(&custom.tag, value);
            }
        }
    }

    /// Response-time tags and the duration: `request_size`, `response_size`, `upstream_cluster`,
    /// `upstream_cluster.name`, `http.status_code`, `response_flags`, and `error: true` on 5xx or
    /// when no response was sent (Envoy's rule).
    pub fn end(mut self, resp: &ResponseInfo<'_>) -> Span {
        let Some(started) = self.started.filter(|_| self.sampled()) else {
            return self.span;
        };
        // Zipkin rejects a zero duration as "unknown"; a finished span took at least 1 µs.
        self.span.duration_us = (started.elapsed().as_micros() as u64).max(1);
        let span = &mut self.span;
        span.remote_ip = resp.remote_ip;
        let t = &mut span.tags;
        let number = |n: u64| move |s: &mut String| s.push_str(itoa::Buffer::new().format(n));
        t.put_with("request_size", number(resp.request_size));
        t.put_with("response_size", number(resp.response_size));
        if let Some(cluster) = resp.upstream_cluster {
            t.put("upstream_cluster", cluster);
            match resp.upstream_cluster_name {
                Some(name) if name != cluster => t.put("upstream_cluster.name", name),
                _ => t.put_same("upstream_cluster.name"),
            }
        }
        t.put_with(
            "http.status_code",
            number(u64::from(resp.status.unwrap_or(0))),
        );
        match resp.response_flags {
            "" => t.put_static("response_flags", "-"),
            flags => t.put("response_flags", flags),
        }
        if resp.status.is_none_or(|s| (500..600).contains(&s)) {
            t.put_static("error", "true");
        }
        self.span
    }
}

/// The request headers a span's tags read, each one's first value (the one `HeaderMap::get`
/// finds), found in one pass over the map rather than by six hashed lookups.
#[derive(Default)]
struct ReadHeaders<'a> {
    tracestate: Option<&'a HeaderValue>,
    request_id: Option<&'a HeaderValue>,
    original_path: Option<&'a HeaderValue>,
    forwarded_proto: Option<&'a HeaderValue>,
    downstream_cluster: Option<&'a HeaderValue>,
    user_agent: Option<&'a HeaderValue>,
}

impl<'a> ReadHeaders<'a> {
    fn of(headers: &'a HeaderMap) -> ReadHeaders<'a> {
        let mut read = ReadHeaders::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "tracestate" => &mut read.tracestate,
                "x-request-id" => &mut read.request_id,
                "x-envoy-original-path" => &mut read.original_path,
                "x-forwarded-proto" => &mut read.forwarded_proto,
                "x-envoy-downstream-service-cluster" => &mut read.downstream_cluster,
                "user-agent" => &mut read.user_agent,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        read
    }
}

/// A header's value as text, as `HeaderValue::to_str` reads it (absent unless visible ASCII).
fn text(value: Option<&HeaderValue>) -> Option<&str> {
    value.and_then(|v| v.to_str().ok())
}

/// `ip` as `IpAddr`'s `Display` writes it, in pieces given to `push`; IPv4 (nearly every pod)
/// without the formatter.
pub(super) fn address(ip: IpAddr, mut push: impl FnMut(&str)) {
    match ip {
        IpAddr::V4(v4) => {
            let mut buf = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(".");
                }
                push(buf.format(octet));
            }
        }
        IpAddr::V6(_) => push(&ip.to_string()),
    }
}

/// Envoy's protocol strings (`SubstitutionFormatUtils::protocolToString`).
fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// At most `max` bytes, cut on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests;
