//! Protocol selection's tests: `declared` (Istio's naming rules, as tables), `detect` (what first
//! bytes prove, from bytes alone), `sniff` (over loopback: waiting for bytes without consuming
//! them, timeouts, closed connections). Here: ClientHellos from a real rustls client.

mod declared;
mod detect;
mod sniff;

use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::ServerName;

/// The bytes a real rustls client sends first for `server_name`: a ClientHello in one record,
/// with the SNI extension for a DNS name, without it for an IP address (RFC 6066 §3).
fn client_hello(server_name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).expect("a server name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write the ClientHello");
    }
    assert_eq!(out[0], 0x16, "a handshake record: {out:02x?}");
    out
}

/// The same ClientHello (one record) re-framed into records of at most `fragment` bytes of
/// handshake each, as RFC 8446 §5.1 allows a client to send it.
fn fragmented(hello: &[u8], fragment: usize) -> Vec<u8> {
    let (header, body) = hello.split_at(5);
    assert_eq!(
        usize::from(u16::from_be_bytes([header[3], header[4]])),
        body.len(),
        "one record"
    );
    let mut out = Vec::new();
    for chunk in body.chunks(fragment) {
        out.extend_from_slice(&header[..3]);
        out.extend_from_slice(&u16::try_from(chunk.len()).expect("short").to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
