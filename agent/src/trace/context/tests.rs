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

#[test]
fn a_repeated_header_counts_by_its_first_value_as_get_finds_it() {
    let mut h = HeaderMap::new();
    h.append(X_B3_SAMPLED, HeaderValue::from_static("0"));
    h.append(X_B3_SAMPLED, HeaderValue::from_static("1"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    assert_eq!(extract(&h).sampled, Some(false));
    // A first value that is not text hides a good second one, as with `HeaderMap::get`.
    let mut h = HeaderMap::new();
    h.append(
        TRACEPARENT,
        HeaderValue::from_bytes(b"\xff").expect("opaque"),
    );
    h.append(
        TRACEPARENT,
        HeaderValue::from_str(&format!("00-{T128}-{S}-01")).expect("value"),
    );
    assert_eq!(extract(&h), Extracted::default());
}
