//! The relay's parsing and framing (`framing`), case by case (RFC 9112 §6 and §7.1); the relay
//! itself runs in `proxy::tests::http_passthrough`.

use super::framing::*;

const CHUNKED: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n";

/// Follows `body` over `pieces` as reads would deliver them: (bytes taken, data bytes, done).
fn follow(mut body: Body, pieces: &[&[u8]]) -> Result<(usize, u64, bool), ()> {
    let (mut taken, mut data) = (0, 0);
    for piece in pieces {
        let (used, d) = body.advance(piece)?;
        taken += used;
        data += d;
        if body.done() {
            break;
        }
    }
    Ok((taken, data, body.done()))
}

fn chunked() -> Body {
    Body::Chunked(Chunked::Size { size: 0, digits: 0 })
}

#[test]
fn a_chunked_body_ends_after_its_trailers_wherever_the_reads_split_it() {
    let mut whole = CHUNKED.to_vec();
    whole.extend_from_slice(b"GET /next HTTP/1.1\r\n");
    for split in 0..=CHUNKED.len() {
        let (a, b) = whole.split_at(split);
        assert_eq!(
            follow(chunked(), &[a, b]),
            Ok((CHUNKED.len(), 11, true)),
            "split at {split}"
        );
    }
    let bytes: Vec<&[u8]> = whole.chunks(1).collect();
    assert_eq!(follow(chunked(), &bytes), Ok((CHUNKED.len(), 11, true)));
    // Leading zeros are no overflow.
    assert_eq!(
        follow(chunked(), &[b"00000000000000000003\r\nabc\r\n0\r\n\r\n"]),
        Ok((32, 3, true))
    );
    // Without trailers.
    assert_eq!(
        follow(chunked(), &[b"3\r\nabc\r\n0\r\n\r\n"]),
        Ok((13, 3, true))
    );
    assert_eq!(
        follow(chunked(), &[b"3\r\nabc\r\n0\r\n"]),
        Ok((11, 3, false)),
        "not done until the empty line"
    );
}

#[test]
fn a_malformed_chunked_body_is_an_error() {
    for bad in [
        &b"zz\r\n"[..],
        b"\r\n",
        b"3\r\nabcX\r\n",
        b"1234567890abcdef0\r\n",
        b"3;ext\nabc\r\n",
        b"0\r\n\rX",
    ] {
        assert_eq!(follow(chunked(), &[bad]), Err(()), "{bad:?}");
    }
}

#[test]
fn a_content_length_body_takes_exactly_its_length() {
    assert_eq!(
        follow(Body::Length(5), &[b"he", b"lloGET"]),
        Ok((5, 5, true))
    );
    assert_eq!(follow(Body::UntilClose, &[b"abc"]), Ok((3, 3, false)));
}

fn request(head: &str) -> RequestHead {
    RequestHead::parse(head.as_bytes())
        .expect("well formed")
        .expect("complete")
}

const ID: &str = "x-request-id: 1\r\n";

#[test]
fn a_plain_request_is_followed_and_counted_as_the_full_server_counts_it() {
    let text = format!("GET /a?b=1 HTTP/1.1\r\nhost: web\r\n{ID}\r\nrest");
    let head = request(&text);
    assert!(head.simple);
    assert_eq!(head.len, text.len() - "rest".len());
    assert_eq!(head.body, Body::Empty);
    // "GET" + "/a?b=1" + "host: web\r\n" + "x-request-id: 1\r\n"
    assert_eq!(head.counted_bytes, 3 + 6 + (4 + 3 + 4) + (12 + 1 + 4));
    assert!(!head.is_head && !head.close);

    let head = request(&format!(
        "POST /u HTTP/1.1\r\nContent-Length: 10\r\nConnection: keep-alive, close\r\n{ID}\r\n"
    ));
    assert!(head.simple && head.close);
    assert_eq!(head.body, Body::Length(10));
    assert!(request(&format!("HEAD / HTTP/1.1\r\n{ID}\r\n")).is_head);
    assert!(head.request_id);
    // Without an id it is still followed: the relay adds one.
    let head = request("GET / HTTP/1.1\r\n\r\n");
    assert!(head.simple && !head.request_id);
}

#[test]
fn requests_the_relay_cannot_follow_go_to_the_full_server() {
    for (case, text) in [
        ("HTTP/1.0", format!("GET / HTTP/1.0\r\n{ID}\r\n")),
        ("CONNECT", format!("CONNECT a:1 HTTP/1.1\r\n{ID}\r\n")),
        (
            "absolute form",
            format!("GET http://a/ HTTP/1.1\r\n{ID}\r\n"),
        ),
        (
            "chunked",
            format!("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n{ID}\r\n"),
        ),
        (
            "two lengths",
            format!("POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n{ID}\r\n"),
        ),
        (
            "bad length",
            format!("POST / HTTP/1.1\r\ncontent-length: x\r\n{ID}\r\n"),
        ),
        (
            "upgrade",
            format!("GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n{ID}\r\n"),
        ),
        (
            "expect",
            format!("POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n{ID}\r\n"),
        ),
        (
            "keep-alive",
            format!("GET / HTTP/1.1\r\nkeep-alive: timeout=5\r\n{ID}\r\n"),
        ),
        ("te", format!("GET / HTTP/1.1\r\nte: trailers\r\n{ID}\r\n")),
        ("fragment", format!("GET /a?x#frag HTTP/1.1\r\n{ID}\r\n")),
        (
            "signed length",
            format!("POST / HTTP/1.1\r\ncontent-length: +5\r\n{ID}\r\n"),
        ),
        ("bare LF", format!("GET / HTTP/1.1\nhost: a\n{ID}\r\n")),
        (
            "grpc-web",
            format!("POST / HTTP/1.1\r\ncontent-type: application/grpc-web\r\n{ID}\r\n"),
        ),
    ] {
        assert!(!request(&text).simple, "{case}");
    }
    assert!(matches!(
        RequestHead::parse(b"GET / HTTP/1.1\r\nhost"),
        Ok(None)
    ));
    assert!(RequestHead::parse(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").is_err());
}

fn response(head: &str, to_head: bool) -> ResponseHead {
    ResponseHead::parse(head.as_bytes(), to_head)
        .expect("well formed")
        .expect("complete")
}

#[test]
fn a_response_body_is_framed_as_rfc_9112_says() {
    let r = response(
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: b\r\n\r\nabc",
        false,
    );
    assert_eq!(
        (r.status, r.body.clone(), r.close, r.until_close),
        (200, Body::Length(3), false, false)
    );
    assert_eq!(r.counted_bytes, (14 + 1 + 4) + (3 + 1 + 4));
    // HEAD, 204 and 304 have no body whatever they say; 1xx neither.
    assert_eq!(
        response("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true).body,
        Body::Empty
    );
    assert_eq!(
        response("HTTP/1.1 204 No Content\r\n\r\n", false).body,
        Body::Empty
    );
    assert_eq!(
        response(
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            false
        )
        .body,
        Body::Empty
    );
    assert_eq!(
        response("HTTP/1.1 100 Continue\r\n\r\n", false).body,
        Body::Empty
    );
    // Transfer-Encoding wins over Content-Length; a last coding other than chunked runs to the close.
    assert_eq!(
        response(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false
        )
        .body,
        chunked()
    );
    let r = response("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false);
    assert!(r.body == Body::UntilClose && r.until_close);
    let r = response("HTTP/1.1 200 OK\r\n\r\n", false);
    assert!(r.body == Body::UntilClose && r.until_close);
    assert!(
        response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 0\r\n\r\n",
            false
        )
        .close
    );
    assert!(response("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false).close);
    assert!(
        !response(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            false
        )
        .close
    );
    assert!(ResponseHead::parse(
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
        false
    )
    .is_err());
    assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", false).is_err());
    assert!(ResponseHead::parse(b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n", false).is_err());
    // A length that frames nothing is not checked (as hyper's client does not).
    assert_eq!(
        response(
            "HTTP/1.1 204 No Content\r\ncontent-length: x\r\n\r\n",
            false
        )
        .body,
        Body::Empty
    );
    assert_eq!(
        response(
            "HTTP/1.1 200 OK\r\ncontent-length: x\r\ntransfer-encoding: chunked\r\n\r\n",
            false
        )
        .body,
        chunked()
    );
    assert!(ResponseHead::parse(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
}

/// An unreported span's head: every line but the caller's context that the next hop rewrites, as
/// it came (case, order, repeats), `x-b3-flags` kept, the next hop's context and an added request
/// id at the end; the context is read from the trace headers whatever their case.
#[test]
fn an_unreported_spans_head_keeps_every_line_but_the_context() {
    use crate::trace::{self, Carried, Propagation, SpanId, TraceContext};
    let raw = "GET /a?b=1 HTTP/1.1\r\nHost: web\r\nX-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124\r\n\
               x-dup: 1\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nx-b3-sampled: 0\r\nX-B3-Flags: 0\r\n\
               x-dup: 2\r\nTraceparent: 00-463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-00\r\n\r\n";
    let ctx = super::observe::context(raw.as_bytes()).expect("valid");
    let caller = ctx.extract().parent.expect("the caller's context");
    assert_eq!(caller.span_id, SpanId(0xa2fb4a1d1a96d312));
    assert_eq!(caller.sampled, Some(false));
    let carried = Carried {
        b3_multi: true,
        traceparent: true,
        b3_single: false,
    };
    assert_eq!(ctx.carried(), carried);
    let next = TraceContext {
        trace_id: caller.trace_id,
        span_id: SpanId(0x0102030405060708),
        parent_span_id: Some(caller.span_id),
        sampled: Some(false),
        debug: false,
    };
    let hop = trace::next_hop(&next, Propagation::B3, carried);
    let id = http::HeaderValue::from_static("req-1");
    let out = super::observe::carried(raw.as_bytes(), &hop, Some(&id));
    let out = String::from_utf8(out).expect("ascii");
    let want = "GET /a?b=1 HTTP/1.1\r\nHost: web\r\nx-dup: 1\r\nX-B3-Flags: 0\r\nx-dup: 2\r\n\
                x-b3-traceid: 463ac35c9f6413ad48485a3953bb6124\r\nx-b3-spanid: 0102030405060708\r\n\
                x-b3-parentspanid: a2fb4a1d1a96d312\r\nx-b3-sampled: 0\r\n\
                traceparent: 00-463ac35c9f6413ad48485a3953bb6124-0102030405060708-00\r\n\
                x-request-id: req-1\r\n\r\n";
    assert_eq!(out, want);
    // Parsed again, it is the same request with the next hop's context.
    let again = super::observe::context(out.as_bytes()).expect("valid");
    assert_eq!(again.extract().parent, Some(next.clone()));

    // A value `http` refuses: the full server answers.
    assert!(super::observe::context(b"GET / HTTP/1.1\r\nb3: a\x01b\r\n\r\n").is_none());
    // No context at all: nothing to read, every line kept.
    let bare = "GET / HTTP/1.1\r\nhost: web\r\n\r\n";
    let ctx = super::observe::context(bare.as_bytes()).expect("valid");
    assert_eq!(ctx.extract(), trace::Extracted::default());
    assert_eq!(ctx.carried(), Carried::default());
    let hop = trace::next_hop(&next, Propagation::W3c, ctx.carried());
    let out = super::observe::carried(bare.as_bytes(), &hop, None);
    let want = "GET / HTTP/1.1\r\nhost: web\r\n\
                traceparent: 00-463ac35c9f6413ad48485a3953bb6124-0102030405060708-00\r\n\r\n";
    assert_eq!(String::from_utf8(out).expect("ascii"), want);
}

/// The relay reads and rewrites a raw head's context as the full server does through a
/// `HeaderMap` (`trace::extract`, then `trace::inject_as`): the same decision and parent, and
/// the same context headers for the next hop, for every format each provider writes.
#[test]
fn the_raw_heads_context_is_the_header_maps() {
    use crate::trace::{self, Propagation, SpanId, TraceContext, CONTEXT_HEADERS};
    const T: &str = "463ac35c9f6413ad48485a3953bb6124";
    let heads = [
        String::new(),
        format!("b3: {T}-a2fb4a1d1a96d312-1-0020000000000001\r\n"),
        "b3: 0\r\ntraceparent: 00-463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-01\r\n".into(),
        format!("X-B3-TraceId: {T}\r\nx-b3-spanid:  a2fb4a1d1a96d312 \r\nx-b3-flags: 1\r\n"),
        format!("x-b3-traceid: {T}\r\nx-b3-spanid: a2fb4a1d1a96d312\r\nx-b3-parentspanid: 0000000000000009\r\n"),
        "x-b3-sampled: 1\r\nx-b3-parentspanid: 0000000000000009\r\n".into(),
        // The first of two values counts; a malformed format is as if absent.
        format!("x-b3-sampled: 0\r\nx-b3-sampled: 1\r\nx-b3-traceid: zz\r\ntraceparent: 00-{T}-a2fb4a1d1a96d312-01\r\n"),
        "traceparent: 00-463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-00\r\n".into(),
        "b3: é\r\nx-b3-sampled: 1\r\n".into(),
    ];
    let context_of = |h: &http::HeaderMap| {
        let mut v: Vec<(String, Vec<u8>)> = CONTEXT_HEADERS
            .iter()
            .flat_map(|n| {
                h.get_all(n)
                    .iter()
                    .map(move |v| (n.to_string(), v.as_bytes().to_vec()))
            })
            .collect();
        v.sort();
        v
    };
    for lines in heads {
        let raw = format!("GET / HTTP/1.1\r\nhost: web\r\n{lines}\r\n");
        let parsed = super::observe::Head::parse(raw.as_bytes()).expect("head");
        let ctx = super::observe::context(raw.as_bytes()).expect("valid");
        let map = parsed.headers().clone();
        let extracted = trace::extract(&map);
        assert_eq!(ctx.extract(), extracted, "{lines:?}");
        let next = TraceContext {
            trace_id: extracted.parent.as_ref().map_or(
                trace::TraceId {
                    high: 1,
                    low: 2,
                    wide: true,
                },
                |p| p.trace_id,
            ),
            span_id: SpanId(0x0102030405060708),
            parent_span_id: extracted.parent.as_ref().map(|p| p.span_id),
            sampled: Some(true),
            debug: false,
        };
        for format in [Propagation::B3, Propagation::W3c, Propagation::B3AndW3c] {
            let mut want = map.clone();
            trace::inject_as(&next, &mut want, format);
            let hop = trace::next_hop(&next, format, ctx.carried());
            let out = super::observe::carried(raw.as_bytes(), &hop, None);
            let got = super::observe::Head::parse(&out).expect("written head");
            assert_eq!(
                context_of(got.headers()),
                context_of(&want),
                "{lines:?} {format:?}"
            );
            assert_eq!(
                got.headers().get("host").map(|h| h.as_bytes()),
                Some(&b"web"[..])
            );
        }
    }
}
