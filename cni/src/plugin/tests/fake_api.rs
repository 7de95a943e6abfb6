//! A fake API server over TLS for the plugin's offline lookups: it answers `list` calls on Pods and
//! Namespaces with a `metadata.name` field selector, as the real one does, and refuses any token
//! but its own.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};

use crate::kube::KubeAccess;

pub const TOKEN: &str = "the-agents-token";

pub struct FakeApi {
    pub access: KubeAccess,
    /// Every request line seen.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    /// Serves `pods` (full objects with metadata.namespace and metadata.name) and `namespaces`
    /// until the test process ends.
    pub fn start(pods: Vec<Value>, namespaces: Vec<Value>) -> FakeApi {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let cert = params.self_signed(&key).expect("cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let (line, auth) = {
                    let mut reader = BufReader::new(&mut tls);
                    let mut line = String::new();
                    if reader.read_line(&mut line).is_err() {
                        continue;
                    }
                    let mut auth = String::new();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("authorization:") {
                            auth = v.trim().to_string();
                        }
                    }
                    (line.trim().to_string(), auth)
                };
                log.lock().unwrap().push(line.clone());
                let (status, body) = if auth != format!("bearer {}", TOKEN.to_lowercase()) {
                    ("401 Unauthorized", json!({"kind": "Status", "code": 401}))
                } else {
                    ("200 OK", answer(&line, &pods, &namespaces))
                };
                let body = body.to_string();
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        FakeApi {
            access: KubeAccess {
                server: format!("https://{addr}"),
                token: TOKEN.into(),
                ca_cert: cert.pem(),
            },
            seen,
        }
    }
}

/// The list the request line asks for.
fn answer(line: &str, pods: &[Value], namespaces: &[Value]) -> Value {
    let target = line.split(' ').nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let name = query
        .strip_prefix("fieldSelector=metadata.name%3D")
        .unwrap_or_default();
    let name_is = |o: &&Value| o["metadata"]["name"].as_str() == Some(name);
    let items: Vec<Value> = match path.split('/').collect::<Vec<_>>()[..] {
        ["", "api", "v1", "namespaces"] => namespaces.iter().filter(name_is).cloned().collect(),
        ["", "api", "v1", "namespaces", ns, "pods"] => pods
            .iter()
            .filter(|p| p["metadata"]["namespace"].as_str() == Some(ns))
            .filter(name_is)
            .cloned()
            .collect(),
        _ => return json!({"kind": "Status", "code": 404}),
    };
    json!({"kind": "List", "items": items})
}
