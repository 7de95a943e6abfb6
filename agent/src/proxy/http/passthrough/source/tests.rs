use super::tries::upstream_head;
use super::*;

#[test]
fn a_head_the_relay_follows_becomes_the_request_routing_reads() {
    let raw = b"GET /a/b?x=1 HTTP/1.1\r\nHost: web.mesh:8080\r\nEnd-User: jason\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n";
    let req = request_of(raw).expect("parsed");
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.uri().path(), "/a/b");
    assert_eq!(req.uri().query(), Some("x=1"));
    assert_eq!(authority(&req), Some("web.mesh:8080"));
    assert_eq!(req.headers()["end-user"], "jason");
    let multi: Vec<_> = req.headers().get_all("x-multi").iter().collect();
    assert_eq!(multi, ["1", "2"]);
}

#[test]
fn a_header_http_refuses_leaves_the_request_to_the_full_server() {
    // A value with a control character: hyper's server answers it (400).
    assert!(request_of(b"GET / HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n").is_none());
}

#[test]
fn the_upstream_head_is_the_request_as_forward_would_send_it() {
    let raw = b"GET /p HTTP/1.1\r\nHost: web\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n";
    let mut req = request_of(raw).expect("parsed");
    let fwd = Forward {
        cluster: None,
        route: None,
        matched: None,
        dest: None,
    };
    let (out, path) = upstream_head(&fwd, &mut req);
    assert_eq!(path, "/p");
    let text = std::str::from_utf8(&out).expect("ascii");
    assert!(text.starts_with("GET /p HTTP/1.1\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "{text}");
    let lines: Vec<&str> = text.trim_end().lines().skip(1).collect();
    // Hop-by-hop dropped; the app's headers kept; the scheme added; Host the authority.
    assert!(
        !lines.iter().any(|l| l.starts_with("connection:")),
        "{text}"
    );
    assert!(lines.contains(&"accept: */*"), "{text}");
    assert!(lines.contains(&"x-forwarded-proto: http"), "{text}");
    assert!(lines.contains(&"host: web"), "{text}");
    // What hyper would parse back: the same request.
    let back = request_of(&out).expect("parses again");
    assert_eq!(back.uri().path(), "/p");
}

#[test]
fn a_response_that_closes_the_upstream_keeps_the_apps_connection_open() {
    let raw = b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok";
    let mut buf = BytesMut::from(&raw[..]);
    let mut head = ResponseHead::parse(&buf, false)
        .expect("valid")
        .expect("whole");
    assert!(head.close);
    keep_app_open(&mut buf, &mut head);
    assert_eq!(
        &buf[..],
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..]
    );
    assert_eq!(head.len, buf.len() - 2);
    assert!(!head.close);
    // Counted as hyper counts what it keeps: `Content-Length: 2\r\n` only (14 + 1 + 4).
    assert_eq!(head.counted_bytes, 19);
    let again = ResponseHead::parse(&buf, false)
        .expect("valid")
        .expect("whole");
    assert!(!again.close);
}
