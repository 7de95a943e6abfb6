use super::*;

/// Everything `next_data` yields from `wire`, fed in pieces of `step` bytes, and the trailer
/// section it kept.
fn follow(mut framing: Body, wire: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, Body) {
    let mut buf = BytesMut::new();
    let mut trailer = Vec::new();
    let mut data = Vec::new();
    for piece in wire.chunks(step) {
        buf.extend_from_slice(piece);
        while let Some(d) = next_data(&mut framing, &mut buf, &mut trailer).expect("valid") {
            data.extend_from_slice(&d);
        }
    }
    (data, trailer, framing)
}

#[test]
fn a_chunked_body_yields_its_data_without_the_framing_at_any_read_size() {
    let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
    for step in [1, 2, 3, 7, wire.len()] {
        let start = Body::Chunked(Chunked::Size { size: 0, digits: 0 });
        let (data, trailer, end) = follow(start, wire, step);
        assert_eq!(data, b"hello, world", "read {step} bytes at a time");
        assert!(end.done(), "read {step} bytes at a time");
        assert_eq!(trailers_of(&trailer), None);
    }
}

#[test]
fn a_chunked_bodys_trailer_fields_become_the_streams_trailers() {
    let wire = b"2\r\nok\r\n0\r\ngrpc-status: 0\r\nx-checksum: abc\r\n\r\n";
    let start = Body::Chunked(Chunked::Size { size: 0, digits: 0 });
    let (data, trailer, end) = follow(start, wire, 4);
    assert_eq!(data, b"ok");
    assert!(end.done());
    let trailers = trailers_of(&trailer).expect("two fields");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc");
}

#[test]
fn a_length_body_ends_at_its_length_and_leaves_what_follows() {
    let mut framing = Body::Length(5);
    let mut buf = BytesMut::from(&b"helloHTTP/1.1"[..]);
    let mut trailer = Vec::new();
    let data = next_data(&mut framing, &mut buf, &mut trailer).expect("valid");
    assert_eq!(data.as_deref(), Some(&b"hello"[..]));
    assert!(framing.done());
    assert_eq!(
        next_data(&mut framing, &mut buf, &mut trailer).expect("valid"),
        None
    );
    // Stray bytes: the connection is not checked back in (`RawBody::end`).
    assert_eq!(&buf[..], b"HTTP/1.1");
}

#[test]
fn a_bad_chunk_size_is_an_error_not_data() {
    let mut framing = Body::Chunked(Chunked::Size { size: 0, digits: 0 });
    let mut buf = BytesMut::from(&b"zz\r\nhello\r\n"[..]);
    let mut trailer = Vec::new();
    assert!(matches!(
        next_data(&mut framing, &mut buf, &mut trailer),
        Err(BodyError::Malformed)
    ));
}

#[test]
fn a_response_head_becomes_the_streams_response_with_its_repeated_fields() {
    let raw =
        b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n";
    let parts = response_parts(raw, 201).expect("valid");
    assert_eq!(parts.status, StatusCode::CREATED);
    let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(parts.headers["content-length"], "0");
}
