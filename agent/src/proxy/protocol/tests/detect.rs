//! What first bytes prove, from the bytes alone: each request line, preface and ClientHello case,
//! every prefix of each (undecided until the last byte that proves it), and properties over
//! arbitrary bytes (no panic; a decision never changes as more bytes arrive).

use proptest::prelude::*;

use super::super::detect::{
    classify, client_hello, server_name, Hello, Verdict, H2_PREFACE, HTTP1_MAX_REQUEST_LINE,
    TLS_MAX_CLIENT_HELLO,
};
use super::{client_hello as rustls_hello, fragmented};

/// Asserts that `bytes` decide `expected` exactly at their last byte: every shorter prefix is
/// still undecided (so a sniffer waits for it and decides as soon as it can).
#[track_caller]
fn decides_at_last_byte(bytes: &[u8], expected: Verdict) {
    for end in 1..bytes.len() {
        assert_eq!(
            classify(&bytes[..end]),
            Verdict::NeedMore,
            "prefix {:?} of {:?}",
            String::from_utf8_lossy(&bytes[..end]),
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(
        classify(bytes),
        expected,
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
}

#[test]
fn an_http1_request_line_is_decided_at_its_line_end() {
    // Istio: "Istio can automatically detect HTTP and HTTP/2 traffic".
    let lines: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\n",
        b"GET /index.html?q=1 HTTP/1.0\r\n",
        b"POST /api/v1/items HTTP/1.1\r\n",
        b"HEAD / HTTP/1.1\r\n",
        b"PUT /x HTTP/1.1\r\n",
        b"DELETE /x HTTP/1.1\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n",
        b"TRACE / HTTP/1.1\r\n",
        b"PATCH /x HTTP/1.1\r\n",
        b"PROPFIND /dav HTTP/1.1\r\n",
        b"M-SEARCH * HTTP/1.1\r\n",
        b"UNSUBSCRIBE /events HTTP/1.1\r\n",
        b"GET http://example.com/ HTTP/1.1\r\n",
        // RFC 9112 §2.2: a recipient may take a bare LF as the line end.
        b"GET / HTTP/1.1\n",
        // Any HTTP/1.x minor version.
        b"GET / HTTP/1.2\r\n",
    ];
    for line in lines {
        decides_at_last_byte(line, Verdict::Http1);
    }
}

#[test]
fn the_decision_does_not_wait_for_headers() {
    let request = b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: curl\r\n\r\n";
    assert_eq!(classify(&request[..16]), Verdict::Http1);
    assert_eq!(classify(request), Verdict::Http1);
}

#[test]
fn near_misses_are_not_http1() {
    let cases: &[(&str, &[u8])] = &[
        (
            "methods are case-sensitive (RFC 9110 §9.1)",
            b"get / HTTP/1.1\r\n",
        ),
        ("an unknown method", b"FETCH / HTTP/1.1\r\n"),
        (
            "a method too long to be known",
            b"GETGETGETGETGET / HTTP/1.1\r\n",
        ),
        ("an empty request-target", b"GET  HTTP/1.1\r\n"),
        ("HTTP/2.0 is not HTTP/1.x", b"GET / HTTP/2.0\r\n"),
        ("HTTP/0.9 has no version", b"GET /\r\n"),
        ("a lowercase version", b"GET / http/1.1\r\n"),
        ("a version without its minor digit", b"GET / HTTP/1.\r\n"),
        ("text after the version", b"GET / HTTP/1.1 x\r\n"),
        ("CR not followed by LF", b"GET / HTTP/1.1\rX"),
        ("a control byte in the target", b"GET /a\x00b HTTP/1.1\r\n"),
        (
            "an empty line first (Envoy's http_inspector)",
            b"\r\nGET / HTTP/1.1\r\n",
        ),
        ("a Redis command", b"*1\r\n$4\r\nPING\r\n"),
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("a Postgres SSLRequest", b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        ("a greeting", b"hello\n"),
        ("a broken h2 preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
        ("PRI as an HTTP/1.1 method", b"PRI * HTTP/1.1\r\n"),
    ];
    for &(why, bytes) in cases {
        assert_eq!(classify(bytes), Verdict::Other, "{why}: {bytes:?}");
    }
}

#[test]
fn garbage_is_decided_at_the_first_byte_that_cannot_fit() {
    assert_eq!(classify(b"\x00"), Verdict::Other);
    assert_eq!(classify(b"X"), Verdict::Other);
    assert_eq!(classify(b"GEX"), Verdict::Other);
    assert_eq!(classify(b"GET /\x7f"), Verdict::Other);
    // Still possible: a method prefix, the preface, a TLS record header.
    assert_eq!(classify(b"G"), Verdict::NeedMore);
    assert_eq!(classify(b"M-"), Verdict::NeedMore);
    assert_eq!(classify(b"PR"), Verdict::NeedMore);
    assert_eq!(classify(b"\x16\x03"), Verdict::NeedMore);
}

#[test]
fn a_request_line_over_the_limit_is_not_http() {
    let mut line = b"GET /".to_vec();
    line.resize(HTTP1_MAX_REQUEST_LINE - 1, b'a');
    assert_eq!(classify(&line), Verdict::NeedMore, "under the limit");
    line.push(b'a');
    assert_eq!(classify(&line), Verdict::Other, "at the limit, no line end");
    line.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(classify(&line), Verdict::Other, "a line end past the limit");

    // The longest line that fits, line end included.
    let mut line = b"GET /".to_vec();
    line.resize(HTTP1_MAX_REQUEST_LINE - b" HTTP/1.1\r\n".len(), b'a');
    line.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(line.len(), HTTP1_MAX_REQUEST_LINE);
    assert_eq!(classify(&line), Verdict::Http1);
}

#[test]
fn the_h2_preface_is_decided_when_whole() {
    // RFC 9113 §3.4; Envoy's http_inspector matches it whole.
    decides_at_last_byte(H2_PREFACE, Verdict::H2);
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(classify(&with_settings), Verdict::H2);
}

#[test]
fn a_client_hello_is_decided_when_whole_and_yields_its_sni() {
    let hello = rustls_hello("api.example.com");
    decides_at_last_byte(&hello, Verdict::ClientHello { len: hello.len() });
    assert_eq!(
        server_name(&hello).expect("parses"),
        Some("api.example.com".to_owned())
    );
}

#[test]
fn the_sni_is_lowercased_and_absent_for_an_ip_address() {
    let hello = rustls_hello("API.Example.COM");
    assert_eq!(
        server_name(&hello).expect("parses"),
        Some("api.example.com".to_owned())
    );
    let hello = rustls_hello("10.1.2.3");
    assert_eq!(classify(&hello), Verdict::ClientHello { len: hello.len() });
    assert_eq!(server_name(&hello).expect("parses"), None);
}

#[test]
fn a_client_hello_across_several_records_is_reassembled() {
    // RFC 8446 §5.1: a handshake message may be fragmented across records; 3-byte fragments
    // split even the handshake header (type, length) across records.
    let whole = rustls_hello("split.example.com");
    for fragment in [3, 100] {
        let hello = fragmented(&whole, fragment);
        assert!(hello.len() > whole.len(), "more record headers");
        decides_at_last_byte(&hello, Verdict::ClientHello { len: hello.len() });
        assert_eq!(
            server_name(&hello).expect("parses"),
            Some("split.example.com".to_owned()),
            "{fragment}-byte fragments"
        );
    }
}

#[test]
fn bytes_after_the_client_hello_do_not_change_it() {
    let hello = rustls_hello("api.example.com");
    let mut more = hello.clone();
    more.extend_from_slice(b"\x17\x03\x03\x00\x05early");
    assert_eq!(classify(&more), Verdict::ClientHello { len: hello.len() });
}

#[test]
fn tls_records_that_cannot_start_a_client_hello_are_not_tls() {
    let cases: &[(&str, &[u8])] = &[
        ("record version 3.5", b"\x16\x03\x05"),
        ("record major version 2", b"\x16\x02\x01"),
        ("an empty record", b"\x16\x03\x01\x00\x00"),
        ("a record over 2^14", b"\x16\x03\x01\x40\x01"),
        ("a ServerHello", b"\x16\x03\x03\x00\x30\x02"),
    ];
    for &(why, bytes) in cases {
        assert_eq!(classify(bytes), Verdict::Other, "{why}");
        assert_eq!(client_hello(bytes), Hello::NotTls, "{why}");
    }
    // Not a handshake record at all.
    assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
}

#[test]
fn a_client_hello_too_large_is_refused_from_its_header() {
    // A 16 MiB ClientHello, announced in the first 9 bytes: no need to wait for it.
    let header = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff";
    assert_eq!(
        client_hello(header),
        Hello::TooLarge {
            size: 4 + 0xff_ffff
        }
    );
    assert_eq!(classify(header), Verdict::Other);
    // Just fits: 5 bytes of record header, 4 of handshake header.
    let fits = TLS_MAX_CLIENT_HELLO - 5 - 4;
    let [_, a, b, c] = u32::try_from(fits).expect("small").to_be_bytes();
    let header = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, a, b, c];
    assert_eq!(client_hello(&header), Hello::NeedMore);
}

#[test]
fn a_non_handshake_record_inside_a_client_hello_is_malformed() {
    let hello = fragmented(&rustls_hello("api.example.com"), 100);
    let first = 5 + 100;
    let mut bad = hello[..first].to_vec();
    bad.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert!(matches!(client_hello(&bad), Hello::Malformed(_)));
    assert_eq!(classify(&bad), Verdict::Other);
}

#[test]
fn a_client_hello_rustls_refuses_is_an_error() {
    // A ClientHello whose only compression method is not null (RFC 8446 §4.1.2 requires null).
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 1]); // compression: DEFLATE only
    body.extend_from_slice(&[0, 0]); // no extensions
    let mut hello = vec![0x16, 0x03, 0x01];
    hello.extend_from_slice(&u16::try_from(body.len() + 4).expect("small").to_be_bytes());
    hello.push(0x01);
    hello.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes()[1..]);
    hello.extend_from_slice(&body);
    assert_eq!(classify(&hello), Verdict::ClientHello { len: hello.len() });
    assert!(server_name(&hello).is_err());
}

/// The first bytes of something `classify` has an opinion on, then anything.
fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
    let starts = prop_oneof![
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(H2_PREFACE.to_vec()),
        Just(b"\x16\x03\x01".to_vec()),
        Just(rustls_hello("p.example.com")),
        Just(Vec::new()),
    ];
    (
        starts,
        any::<usize>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(start, cut, tail)| {
            let mut v = start[..cut % (start.len() + 1)].to_vec();
            v.extend(tail);
            v
        })
}

proptest! {
    /// No input panics, and a decision made on a prefix is the one made on the whole: deciding
    /// as soon as possible never contradicts a later look.
    #[test]
    fn decisions_are_stable_as_bytes_arrive(bytes in first_bytes(), split in any::<usize>()) {
        prop_assume!(!bytes.is_empty());
        let end = 1 + split % bytes.len();
        let early = classify(&bytes[..end]);
        let late = classify(&bytes);
        if early != Verdict::NeedMore {
            prop_assert_eq!(early, late);
        }
        if let Verdict::ClientHello { len } = late {
            let _ = server_name(&bytes[..len]);
        }
        let _ = client_hello(&bytes);
    }
}
