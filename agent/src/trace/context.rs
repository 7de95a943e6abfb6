//! Trace-context propagation over HTTP headers: extract B3 first (single `b3` header, then the
//! `x-b3-*` headers), fall back to W3C `traceparent`; inject in the provider's format
//! ([`Propagation`]): Envoy's Zipkin tracer writes the B3 multi-header form (Istio's default
//! `traceContextOption: USE_B3`), both B3 and `traceparent` with `USE_B3_WITH_W3C_PROPAGATION`,
//! and its OpenTelemetry tracer writes `traceparent`. A malformed header counts as absent; nothing
//! here panics on input.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
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
    Firsts::of(headers).extract()
}

/// The place of the context header named `name` (in any case) in [`CONTEXT_HEADERS`].
pub fn context_index(name: &[u8]) -> Option<usize> {
    // Every context header's name starts with `b`, `t` or `x`: most names go no further.
    if !matches!(name.first()?.to_ascii_lowercase(), b'b' | b't' | b'x') {
        return None;
    }
    CONTEXT_HEADERS
        .iter()
        .position(|h| h.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Each context header's first value (the one `HeaderMap::get` gives), by its place in
/// [`CONTEXT_HEADERS`]: what the incoming context is read from ([`Firsts::extract`]) and which
/// formats came with it ([`Firsts::carried`]). Filled in one pass over a `HeaderMap`
/// ([`Firsts::of`]) or over a raw head's lines ([`Firsts::note`]), with no hashed lookup per name:
/// this runs for every request of a traced workload.
#[derive(Debug, Default)]
pub struct Firsts<'h>([Option<&'h [u8]>; CONTEXT_HEADERS.len()]);

impl<'h> Firsts<'h> {
    pub fn of(headers: &'h HeaderMap) -> Firsts<'h> {
        let mut firsts = Firsts::default();
        for (name, value) in headers {
            if let Some(i) = context_index(name.as_str().as_bytes()) {
                firsts.note(i, value.as_bytes());
            }
        }
        firsts
    }

    /// `value` for the header at `i` in [`CONTEXT_HEADERS`], unless it has one already.
    pub fn note(&mut self, i: usize, value: &'h [u8]) {
        self.0[i].get_or_insert(value);
    }

    /// The caller's context and decision ([`extract`]'s rules): a header's first value, trimmed,
    /// when it is visible ASCII (as `HeaderValue::to_str`).
    pub fn extract(&self) -> Extracted {
        extract_by(|name| {
            let value = self.0[CONTEXT_HEADERS.iter().position(|h| h == name)?]?;
            let visible = value.iter().all(|&b| b == b'\t' || (32..127).contains(&b));
            std::str::from_utf8(value.trim_ascii())
                .ok()
                .filter(|_| visible)
        })
    }

    /// The formats the request came with (each is rewritten for the next hop).
    pub fn carried(&self) -> Carried {
        Carried {
            b3_multi: self.0[I_TRACEID].is_some(),
            traceparent: self.0[I_TRACEPARENT].is_some(),
            b3_single: self.0[I_B3].is_some(),
        }
    }
}

/// [`extract`] through `get`, which gives a context header's first value, trimmed, when it is
/// visible ASCII.
fn extract_by<'h>(get: impl Fn(&HeaderName) -> Option<&'h str>) -> Extracted {
    if let Some(found) = get(&B3).and_then(parse_b3_single) {
        return found;
    }
    let b3 = extract_b3_multi(&get);
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
    match get(&TRACEPARENT).and_then(parse_traceparent) {
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
    let hop = next_hop(ctx, format, Firsts::of(headers).carried());
    if hop.clears_parent {
        headers.remove(X_B3_PARENTSPANID);
    }
    for (name, value) in hop.written() {
        headers.insert(name.clone(), value.header_value());
    }
}

/// The formats a request came with: each is rewritten for the next hop whatever the provider's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// `x-b3-traceid` (the B3 multi-header form).
    pub b3_multi: bool,
    pub traceparent: bool,
    /// The single `b3` header.
    pub b3_single: bool,
}

/// The context headers a hop writes for the next one ([`next_hop`]): each one's value, in the
/// order written, and whether a caller's `x-b3-parentspanid` goes (a new root has no parent).
pub struct NextHop {
    written: [Option<(usize, Value)>; 6],
    clears_parent: bool,
}

/// A header value of the next hop: an id written on the stack, or a constant.
enum Value {
    Hex(Hex),
    Static(&'static str),
}

impl Value {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Hex(h) => h.as_bytes(),
            Value::Static(s) => s.as_bytes(),
        }
    }

    fn header_value(&self) -> HeaderValue {
        match self {
            Value::Hex(h) => h.value(),
            Value::Static(s) => HeaderValue::from_static(s),
        }
    }
}

impl NextHop {
    /// Each header written, in order, with its value.
    fn written(&self) -> impl Iterator<Item = (&'static HeaderName, &Value)> {
        self.written
            .iter()
            .flatten()
            .map(|(i, value)| (&CONTEXT_HEADERS[*i], value))
    }

    /// Each header written, in order, with its value's bytes.
    pub fn headers(&self) -> impl Iterator<Item = (&'static HeaderName, &[u8])> {
        self.written().map(|(name, value)| (name, value.as_bytes()))
    }

    /// Whether the hop writes or removes `name`: a caller's line of it gives way.
    pub fn replaces(&self, name: &HeaderName) -> bool {
        (self.clears_parent && name == X_B3_PARENTSPANID) || self.written().any(|(n, _)| n == name)
    }
}

/// Where each header sits in [`CONTEXT_HEADERS`].
const I_B3: usize = 0;
const I_TRACEID: usize = 1;
const I_SPANID: usize = 2;
const I_PARENTSPANID: usize = 3;
const I_SAMPLED: usize = 4;
const I_TRACEPARENT: usize = 6;

/// What [`inject_as`] writes, for a request that `carried` those formats: B3 multi-header for
/// [`Propagation::B3`] (Envoy's Zipkin tracer), `traceparent` for W3C, both for both, plus any
/// format the request carried, and the single `b3` header when the request had one.
pub fn next_hop(ctx: &TraceContext, format: Propagation, carried: Carried) -> NextHop {
    let b3 = format != Propagation::W3c || carried.b3_multi;
    let w3c = format != Propagation::B3 || carried.traceparent;
    let sampled = ctx.sampled.unwrap_or(false) || ctx.debug;
    let mut hop = NextHop {
        written: [None, None, None, None, None, None],
        clears_parent: false,
    };
    let mut n = 0;
    let mut put = |i: usize, value: Value| {
        hop.written[n] = Some((i, value));
        n += 1;
    };
    // Written into stack buffers: each header value is one copy, no formatting machinery (this
    // runs for every request, sampled or not).
    let mut trace = Hex::new();
    if ctx.trace_id.wide {
        trace.u64(ctx.trace_id.high);
    }
    trace.u64(ctx.trace_id.low);
    let mut span = Hex::new();
    span.u64(ctx.span_id.0);
    let mut clears_parent = false;
    if b3 {
        put(I_TRACEID, Value::Hex(trace.clone()));
        put(I_SPANID, Value::Hex(span));
        match ctx.parent_span_id {
            Some(parent) => {
                let mut p = Hex::new();
                p.u64(parent.0);
                put(I_PARENTSPANID, Value::Hex(p));
            }
            None => clears_parent = true,
        }
        put(I_SAMPLED, Value::Static(if sampled { "1" } else { "0" }));
    }
    if w3c {
        let mut tp = Hex::new();
        tp.raw(b"00-");
        tp.u64(ctx.trace_id.high);
        tp.u64(ctx.trace_id.low);
        tp.raw(b"-");
        tp.u64(ctx.span_id.0);
        tp.raw(if sampled { b"-01" } else { b"-00" });
        put(I_TRACEPARENT, Value::Hex(tp));
    }
    if carried.b3_single {
        let mut single = Hex::new();
        single.raw(trace.as_bytes());
        single.raw(b"-");
        single.u64(ctx.span_id.0);
        single.raw(if sampled { b"-1" } else { b"-0" });
        if let Some(parent) = ctx.parent_span_id {
            single.raw(b"-");
            single.u64(parent.0);
        }
        put(I_B3, Value::Hex(single));
    }
    hop.clears_parent = clears_parent;
    hop
}

/// Lower-hex ids and dashes, on the stack (the longest value, single-header `b3`, is 85 bytes).
#[derive(Clone)]
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
        self.raw(&hex16(v));
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// `v` as 16 lower-case hex digits, the width of a span id (and of each half of a 128-bit trace
/// id) in B3, W3C and Zipkin's JSON.
pub(super) fn hex16(v: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// `x-b3-sampled`: "1"/"0", and the legacy "true"/"false" that some tracers still send.
fn parse_b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn extract_b3_multi<'h>(get: &impl Fn(&HeaderName) -> Option<&'h str>) -> Option<Extracted> {
    let debug = get(&X_B3_FLAGS) == Some("1");
    let sampled = get(&X_B3_SAMPLED).and_then(parse_b3_sampled);
    let sampled = if debug { Some(true) } else { sampled };
    let (Some(trace_id), Some(span_id)) = (get(&X_B3_TRACEID), get(&X_B3_SPANID)) else {
        // A decision alone (`x-b3-sampled: 0` without ids) still counts: honour it.
        return sampled.map(|s| Extracted {
            parent: None,
            sampled: Some(s),
        });
    };
    let trace_id = TraceId::parse(trace_id)?;
    let span_id = SpanId::parse(span_id)?;
    let parent_span_id = match get(&X_B3_PARENTSPANID) {
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
mod tests;
