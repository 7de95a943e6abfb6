//! Trace-context propagation over HTTP headers: extract B3 first (single `b3` header, then the
//! `x-b3-*` headers), fall back to W3C `traceparent`; inject in the provider's format
//! ([`Propagation`]): Envoy's Zipkin tracer writes the B3 multi-header form (Istio's default
//! `traceContextOption: USE_B3`), both B3 and `traceparent` with `USE_B3_WITH_W3C_PROPAGATION`,
//! and its OpenTelemetry tracer writes `traceparent`. A malformed header counts as absent; nothing
//! here panics on input.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Every header [`extract`] reads a caller's context from; [`inject_as`] writes or rewrites each
/// of them but `x-b3-flags`.
pub static CONTEXT_HEADERS: [HeaderName; 7] = [
    B3,
    X_B3_TRACEID,
    X_B3_SPANID,
    X_B3_PARENTSPANID,
    X_B3_SAMPLED,
    X_B3_FLAGS,
    TRACEPARENT,
];

/// A 64- or 128-bit trace id (B3 allows both; W3C and OTLP always carry 128 bits, a 64-bit id is
/// the low half with zero high bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId {
    pub high: u64,
    pub low: u64,
    /// Written as 32 hex digits; a 64-bit id keeps its 16-digit form in B3 and Zipkin.
    pub wide: bool,
}

impl TraceId {
    /// A fresh 128-bit id. Istio: Zipkin `trace_id_128bit` is on by default.
    pub fn random() -> TraceId {
        TraceId {
            high: nonzero_u64(),
            low: nonzero_u64(),
            wide: true,
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        ((u128::from(self.high) << 64) | u128::from(self.low)).to_be_bytes()
    }

    /// 32 lower-hex digits, as W3C wants whatever the width.
    pub fn to_hex32(self) -> String {
        format!("{:016x}{:016x}", self.high, self.low)
    }

    fn parse(s: &str) -> Option<TraceId> {
        let id = match s.len() {
            16 => TraceId {
                high: 0,
                low: parse_hex64(s)?,
                wide: false,
            },
            32 => TraceId {
                high: parse_hex64(&s[..16])?,
                low: parse_hex64(&s[16..])?,
                wide: true,
            },
            _ => return None,
        };
        (id.high != 0 || id.low != 0).then_some(id)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wide {
            write!(f, "{:016x}{:016x}", self.high, self.low)
        } else {
            write!(f, "{:016x}", self.low)
        }
    }
}

/// A 64-bit span id, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub u64);

impl SpanId {
    pub fn random() -> SpanId {
        SpanId(nonzero_u64())
    }

    fn parse(s: &str) -> Option<SpanId> {
        if s.len() != 16 {
            return None;
        }
        parse_hex64(s).filter(|v| *v != 0).map(SpanId)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The ids of one span as they travel in headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// B3 carries the parent explicitly; W3C does not.
    pub parent_span_id: Option<SpanId>,
    /// The sender's decision; `None` when B3 came without one (the receiver decides).
    pub sampled: Option<bool>,
    /// B3 `x-b3-flags: 1` / single-header `d`: sampled, and sampled everywhere.
    pub debug: bool,
}

/// What a request carried: a parent context, or only a decision (`b3: 0`), or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    pub parent: Option<TraceContext>,
    /// The incoming sampling decision, if any (also set when `parent` is `None`).
    pub sampled: Option<bool>,
}

/// Reads the incoming trace context. Envoy's order: B3 single header, B3 multi-header, then W3C
/// `traceparent`. A present but malformed format is skipped as if absent.
pub fn extract(headers: &HeaderMap) -> Extracted {
    if let Some(found) = header_str(headers, &B3).and_then(parse_b3_single) {
        return found;
    }
    let b3 = extract_b3_multi(headers);
    if let Some(
        found @ Extracted {
            parent: Some(_), ..
        },
    ) = b3
    {
        return found;
    }
    // B3 without ids may still carry a decision (`x-b3-sampled` alone): it wins over W3C's flags,
    // and W3C supplies the ids when it has them.
    let b3_decision = b3.and_then(|e| e.sampled);
    match header_str(headers, &TRACEPARENT).and_then(parse_traceparent) {
        Some(mut ctx) => {
            ctx.sampled = b3_decision.or(ctx.sampled);
            Extracted {
                sampled: ctx.sampled,
                parent: Some(ctx),
            }
        }
        None => Extracted {
            parent: None,
            sampled: b3_decision,
        },
    }
}

/// Writes `ctx` (the new span's context) for the next hop: `x-b3-traceid`, `x-b3-spanid`,
/// `x-b3-parentspanid` (when there is a parent), `x-b3-sampled`, and `traceparent`, as Envoy's
/// Zipkin tracer does with W3C propagation on. `tracestate` and `x-request-id` pass untouched.
/// A `b3` single header, when the request had one, is rewritten too: left stale, the next hop
/// would read it first and parent its span on the wrong one.
pub fn inject(ctx: &TraceContext, headers: &mut HeaderMap) {
    inject_as(ctx, headers, Propagation::B3AndW3c)
}

/// The headers a hop writes for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Propagation {
    /// `x-b3-*` (Envoy's Zipkin tracer, Istio's default `USE_B3`).
    #[default]
    B3,
    /// `x-b3-*` and `traceparent` (`USE_B3_WITH_W3C_PROPAGATION`).
    B3AndW3c,
    /// `traceparent` (Envoy's OpenTelemetry tracer).
    W3c,
}

/// [`inject`] in `format`. A format the request already carried is rewritten too whatever
/// `format` says: left stale, the next hop (which reads B3 first) would parent its span on the
/// wrong one. Only the headers a hop must write are added, so an untraced app's requests grow
/// by as little as the format allows (every byte is carried over the node link and parsed twice).
pub fn inject_as(ctx: &TraceContext, headers: &mut HeaderMap, format: Propagation) {
    let b3 = format != Propagation::W3c || headers.contains_key(X_B3_TRACEID);
    let w3c = format != Propagation::B3 || headers.contains_key(TRACEPARENT);
    let sampled = ctx.sampled.unwrap_or(false) || ctx.debug;
    // Written into stack buffers: each header value is one copy, no formatting machinery (this
    // runs for every request, sampled or not).
    let mut trace = Hex::new();
    if ctx.trace_id.wide {
        trace.u64(ctx.trace_id.high);
    }
    trace.u64(ctx.trace_id.low);
    let mut span = Hex::new();
    span.u64(ctx.span_id.0);
    if b3 {
        headers.insert(X_B3_TRACEID, trace.value());
        headers.insert(X_B3_SPANID, span.value());
        match ctx.parent_span_id {
            Some(parent) => {
                let mut p = Hex::new();
                p.u64(parent.0);
                headers.insert(X_B3_PARENTSPANID, p.value());
            }
            None => {
                headers.remove(X_B3_PARENTSPANID);
            }
        }
        headers.insert(
            X_B3_SAMPLED,
            HeaderValue::from_static(if sampled { "1" } else { "0" }),
        );
    }
    if w3c {
        let mut tp = Hex::new();
        tp.raw(b"00-");
        tp.u64(ctx.trace_id.high);
        tp.u64(ctx.trace_id.low);
        tp.raw(b"-");
        tp.u64(ctx.span_id.0);
        tp.raw(if sampled { b"-01" } else { b"-00" });
        headers.insert(TRACEPARENT, tp.value());
    }
    if headers.contains_key(&B3) {
        let mut single = Hex::new();
        single.raw(trace.as_bytes());
        single.raw(b"-");
        single.u64(ctx.span_id.0);
        single.raw(if sampled { b"-1" } else { b"-0" });
        if let Some(parent) = ctx.parent_span_id {
            single.raw(b"-");
            single.u64(parent.0);
        }
        headers.insert(B3, single.value());
    }
}

/// Lower-hex ids and dashes, on the stack (the longest value, single-header `b3`, is 85 bytes).
struct Hex {
    buf: [u8; 96],
    len: usize,
}

impl Hex {
    fn new() -> Hex {
        Hex {
            buf: [0; 96],
            len: 0,
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&bytes[..n]);
        self.len = end;
    }

    /// 16 lower-hex digits.
    fn u64(&mut self, v: u64) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
        }
        self.raw(&out);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `x-b3-sampled`: "1"/"0", and the legacy "true"/"false" that some tracers still send.
fn parse_b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn extract_b3_multi(headers: &HeaderMap) -> Option<Extracted> {
    let debug = header_str(headers, &X_B3_FLAGS) == Some("1");
    let sampled = header_str(headers, &X_B3_SAMPLED).and_then(parse_b3_sampled);
    let sampled = if debug { Some(true) } else { sampled };
    let (Some(trace_id), Some(span_id)) = (
        header_str(headers, &X_B3_TRACEID),
        header_str(headers, &X_B3_SPANID),
    ) else {
        // A decision alone (`x-b3-sampled: 0` without ids) still counts: honour it.
        return sampled.map(|s| Extracted {
            parent: None,
            sampled: Some(s),
        });
    };
    let trace_id = TraceId::parse(trace_id)?;
    let span_id = SpanId::parse(span_id)?;
    let parent_span_id = match header_str(headers, &X_B3_PARENTSPANID) {
        Some(p) => Some(SpanId::parse(p)?),
        None => None,
    };
    Some(Extracted {
        parent: Some(TraceContext {
            trace_id,
            span_id,
            parent_span_id,
            sampled,
            debug,
        }),
        sampled,
    })
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`, or a bare `{SamplingState}`.
fn parse_b3_single(s: &str) -> Option<Extracted> {
    let state = |v: &str| -> Option<(Option<bool>, bool)> {
        match v {
            "1" => Some((Some(true), false)),
            "0" => Some((Some(false), false)),
            "d" => Some((Some(true), true)),
            _ => None,
        }
    };
    let mut parts = s.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        let (sampled, _) = state(first)?;
        return Some(Extracted {
            parent: None,
            sampled,
        });
    };
    let trace_id = TraceId::parse(first)?;
    let span_id = SpanId::parse(second)?;
    let (sampled, debug) = match parts.next() {
        Some(v) => state(v)?,
        None => (None, false),
    };
    let parent_span_id = match parts.next() {
        Some(p) => Some(SpanId::parse(p)?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Extracted {
        parent: Some(TraceContext {
            trace_id,
            span_id,
            parent_span_id,
            sampled,
            debug,
        }),
        sampled,
    })
}

/// W3C Trace Context level 1: `{version}-{trace-id}-{parent-id}-{flags}`, lower-case hex. A
/// higher version may append fields (the spec says to read the first four); `ff` is invalid.
fn parse_traceparent(s: &str) -> Option<TraceContext> {
    let b = s.as_bytes();
    if b.len() < 55 || !is_lower_hex(&s[..2]) || &s[..2] == "ff" {
        return None;
    }
    if (&s[..2] == "00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&s[3..35], &s[36..52], &s[53..55]);
    if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
        return None;
    }
    let trace_id = TraceId::parse(trace)?;
    let span_id = SpanId::parse(span)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext {
        trace_id,
        span_id,
        parent_span_id: None,
        sampled: Some(flags & 0x01 == 0x01),
        debug: false,
    })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// B3 ids are "lower-hex"; Envoy's parser also takes upper case, so this does too.
fn parse_hex64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn nonzero_u64() -> u64 {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    const T128: &str = "463ac35c9f6413ad48485a3953bb6124";
    const T64: &str = "48485a3953bb6124";
    const S: &str = "a2fb4a1d1a96d312";
    const P: &str = "0020000000000001";

    #[test]
    fn b3_multi_128_and_64_bit() {
        for (trace, wide) in [(T128, true), (T64, false)] {
            let got = extract(&headers(&[
                ("x-b3-traceid", trace),
                ("x-b3-spanid", S),
                ("x-b3-parentspanid", P),
                ("x-b3-sampled", "1"),
            ]));
            let ctx = got.parent.expect("context");
            assert_eq!(ctx.trace_id.to_string(), trace);
            assert_eq!(ctx.trace_id.wide, wide);
            assert_eq!(ctx.span_id.to_string(), S);
            assert_eq!(
                ctx.parent_span_id.map(|p| p.to_string()).as_deref(),
                Some(P)
            );
            assert_eq!(got.sampled, Some(true));
        }
    }

    #[test]
    fn b3_flags_debug_means_sampled() {
        let got = extract(&headers(&[
            ("x-b3-traceid", T64),
            ("x-b3-spanid", S),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(got.sampled, Some(true));
        assert!(got.parent.expect("context").debug);
    }

    #[test]
    fn b3_single_forms() {
        let full = extract(&headers(&[("b3", &format!("{T128}-{S}-1-{P}"))]));
        let ctx = full.parent.expect("context");
        assert_eq!(ctx.trace_id.to_string(), T128);
        assert_eq!(ctx.parent_span_id, Some(SpanId(0x0020000000000001)));
        assert_eq!(full.sampled, Some(true));

        let no_state = extract(&headers(&[("b3", &format!("{T64}-{S}"))]));
        assert!(no_state.parent.is_some());
        assert_eq!(no_state.sampled, None);

        let deny = extract(&headers(&[("b3", "0")]));
        assert_eq!(deny.parent, None);
        assert_eq!(deny.sampled, Some(false));

        let debug = extract(&headers(&[("b3", &format!("{T64}-{S}-d"))]));
        assert!(debug.parent.expect("context").debug);
    }

    #[test]
    fn b3_wins_over_w3c_and_single_over_multi() {
        let w3c = format!("00-{T128}-b7ad6b7169203331-01");
        let got = extract(&headers(&[
            ("traceparent", &w3c),
            ("x-b3-traceid", T64),
            ("x-b3-spanid", S),
            ("b3", &format!("{T128}-{P}-0")),
        ]));
        let ctx = got.parent.expect("context");
        assert_eq!(ctx.span_id.to_string(), P, "single b3 header wins");
        assert_eq!(got.sampled, Some(false));

        let got = extract(&headers(&[
            ("traceparent", &w3c),
            ("x-b3-traceid", T64),
            ("x-b3-spanid", S),
        ]));
        assert_eq!(got.parent.expect("context").span_id.to_string(), S);
    }

    #[test]
    fn a_bare_b3_decision_wins_over_w3c_flags_and_w3c_gives_the_ids() {
        let w3c = format!("00-{T128}-b7ad6b7169203331-01");
        let got = extract(&headers(&[("traceparent", &w3c), ("x-b3-sampled", "0")]));
        assert_eq!(got.sampled, Some(false));
        let ctx = got.parent.expect("ids from traceparent");
        assert_eq!(ctx.span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(ctx.sampled, Some(false));

        let alone = extract(&headers(&[("x-b3-sampled", "1")]));
        assert_eq!((alone.parent, alone.sampled), (None, Some(true)));
    }

    #[test]
    fn w3c_fallback() {
        let got = extract(&headers(&[(
            "traceparent",
            &format!("00-{T128}-b7ad6b7169203331-00"),
        )]));
        let ctx = got.parent.expect("context");
        assert_eq!(ctx.trace_id.to_string(), T128);
        assert_eq!(ctx.span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(got.sampled, Some(false));
        // A future version with an extra field still reads its first four.
        let got = extract(&headers(&[(
            "traceparent",
            &format!("cc-{T128}-b7ad6b7169203331-01-extra"),
        )]));
        assert_eq!(got.sampled, Some(true));
    }

    #[test]
    fn malformed_is_absent_never_a_panic() {
        let bad = [
            vec![("x-b3-traceid", "xyz"), ("x-b3-spanid", S)],
            vec![("x-b3-traceid", T128), ("x-b3-spanid", "123")],
            vec![("x-b3-traceid", &T128[..20]), ("x-b3-spanid", S)],
            vec![
                ("x-b3-traceid", "00000000000000000000000000000000"),
                ("x-b3-spanid", S),
            ],
            vec![("x-b3-traceid", T64), ("x-b3-spanid", "0000000000000000")],
            vec![("b3", "-")],
            vec![("b3", "")],
            vec![("b3", "1-2-3-4-5")],
            vec![("traceparent", "00-abc")],
            vec![(
                "traceparent",
                "ff-463ac35c9f6413ad48485a3953bb6124-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-463AC35C9F6413AD48485A3953BB6124-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-463ac35c9f6413ad48485a3953bb6124-b7ad6b7169203331-01-x",
            )],
            vec![(
                "traceparent",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-463ac35c9f6413ad48485a3953bb6124=b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "é€-463ac35c9f6413ad48485a3953bb6124-b7ad6b7169203331",
            )],
        ];
        for pairs in bad {
            let mut h = HeaderMap::new();
            for (k, v) in &pairs {
                if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                    h.insert(HeaderName::from_bytes(k.as_bytes()).expect("name"), v);
                }
            }
            assert_eq!(extract(&h), Extracted::default(), "{pairs:?}");
        }
        // Non-UTF-8 bytes in a header value.
        let mut h = HeaderMap::new();
        h.insert(B3, HeaderValue::from_bytes(&[0xff, 0xfe]).expect("opaque"));
        assert_eq!(extract(&h), Extracted::default());
    }

    #[test]
    fn inject_writes_b3_and_w3c_and_round_trips() {
        let ctx = TraceContext {
            trace_id: TraceId::parse(T64).expect("id"),
            span_id: SpanId(0xa2fb4a1d1a96d312),
            parent_span_id: Some(SpanId(1)),
            sampled: Some(true),
            debug: false,
        };
        let mut h = headers(&[("x-request-id", "abc"), ("tracestate", "congo=t61rcWkgMzE")]);
        inject(&ctx, &mut h);
        assert_eq!(h["x-b3-traceid"], T64);
        assert_eq!(h["x-b3-spanid"], S);
        assert_eq!(h["x-b3-parentspanid"], "0000000000000001");
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(
            h["traceparent"],
            format!("00-0000000000000000{T64}-{S}-01").as_str()
        );
        assert_eq!(h["x-request-id"], "abc");
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert!(!h.contains_key("b3"));
        assert_eq!(extract(&h).parent, Some(ctx.clone()));

        // W3C alone (B3 stripped) names the same trace and span.
        h.remove(X_B3_TRACEID);
        h.remove(X_B3_SPANID);
        let w3c = extract(&h).parent.expect("w3c");
        assert_eq!(
            (w3c.trace_id.low, w3c.span_id),
            (ctx.trace_id.low, ctx.span_id)
        );
    }

    #[test]
    fn inject_rewrites_a_stale_single_header() {
        let stale = format!("{T128}-{P}-1");
        let mut h = headers(&[("b3", &stale)]);
        let ctx = TraceContext {
            trace_id: TraceId::parse(T128).expect("id"),
            span_id: SpanId(0xa2fb4a1d1a96d312),
            parent_span_id: Some(SpanId(0x0020000000000001)),
            sampled: Some(false),
            debug: false,
        };
        inject(&ctx, &mut h);
        assert_eq!(h["b3"], format!("{T128}-{S}-0-{P}").as_str());
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(h["traceparent"].to_str().expect("ascii").ends_with("-00"));
    }

    #[test]
    fn each_format_writes_its_headers_and_rewrites_what_the_request_carried() {
        let ctx = TraceContext {
            trace_id: TraceId::parse(T64).expect("id"),
            span_id: SpanId(0xa2fb4a1d1a96d312),
            parent_span_id: None,
            sampled: Some(false),
            debug: false,
        };
        let names = |h: &HeaderMap| {
            let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            n.sort_unstable();
            n.join(",")
        };
        // A bare request gets only its format's headers.
        let mut h = HeaderMap::new();
        inject_as(&ctx, &mut h, Propagation::B3);
        assert_eq!(names(&h), "x-b3-sampled,x-b3-spanid,x-b3-traceid");
        let mut h = HeaderMap::new();
        inject_as(&ctx, &mut h, Propagation::W3c);
        assert_eq!(names(&h), "traceparent");
        let mut h = HeaderMap::new();
        inject_as(&ctx, &mut h, Propagation::B3AndW3c);
        assert_eq!(
            names(&h),
            "traceparent,x-b3-sampled,x-b3-spanid,x-b3-traceid"
        );
        // The other format, when it came in, is rewritten rather than left stale.
        let stale = "00-11111111111111111111111111111111-2222222222222222-01";
        let mut h = headers(&[("traceparent", stale)]);
        inject_as(&ctx, &mut h, Propagation::B3);
        assert_eq!(h["x-b3-spanid"], S);
        assert!(h["traceparent"].to_str().expect("ascii").contains(S));
        let mut h = headers(&[
            ("x-b3-traceid", "1111111111111111"),
            ("x-b3-spanid", "2222222222222222"),
        ]);
        inject_as(&ctx, &mut h, Propagation::W3c);
        assert_eq!(h["x-b3-spanid"], S);
        assert!(h["traceparent"].to_str().expect("ascii").contains(S));
    }
}
