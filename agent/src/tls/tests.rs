use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ProtocolVersion, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::identity::tests::{eventually, id, local_ca, manager, serial, TempDir};
use crate::identity::{CertLease, CertificateAuthority, LocalCa, DEFAULT_CERT_TTL};

/// What one side saw of a handshake that worked, after a ping/pong through it.
#[derive(Debug)]
struct Seen {
    peer: Option<Identity>,
    peer_serial: Option<Vec<u8>>,
    alpn: Option<Vec<u8>>,
    sni: Option<String>,
    version: Option<ProtocolVersion>,
    kind: Option<rustls::HandshakeKind>,
}

fn seen(conn: &rustls::CommonState, sni: Option<&str>) -> Seen {
    Seen {
        peer: peer_identity(conn),
        peer_serial: conn.peer_certificates().and_then(|c| c.first()).map(serial),
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        sni: sni.map(str::to_owned),
        version: conn.protocol_version(),
        kind: conn.handshake_kind(),
    }
}

/// A handshake over an in-memory pipe, then "ping" from the client and "pong" back, so a
/// refusal of the client certificate (which TLS 1.3 reports after the client's handshake is
/// done) shows on both sides. Returns (server, client) outcomes.
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<Seen, String>, Result<Seen, String>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| format!("accept: {e}"))?;
        let (_, conn) = tls.get_ref();
        let seen = seen(conn, conn.server_name());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("server read: {e}"))?;
        tls.write_all(b"pong")
            .await
            .map_err(|e| format!("server write: {e}"))?;
        tls.flush()
            .await
            .map_err(|e| format!("server flush: {e}"))?;
        Ok::<_, String>(seen)
    };
    let client_side = async move {
        let mut tls = TlsConnector::from(client)
            .connect(server_name(IpAddr::V4(Ipv4Addr::LOCALHOST)), c)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let seen = seen(tls.get_ref().1, None);
        tls.write_all(b"ping")
            .await
            .map_err(|e| format!("client write: {e}"))?;
        tls.flush()
            .await
            .map_err(|e| format!("client flush: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| format!("client read: {e}"))?;
        assert_eq!(&buf, b"pong", "bytes through the tunnel");
        Ok::<_, String>(seen)
    };
    // Not a timing assertion: only keeps a broken handshake from hanging the test run.
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("handshake hung")
}

/// A CA, a manager and leased certs for a server and a client workload.
struct World {
    _dir: TempDir,
    ca: Arc<LocalCa>,
    mgr: Arc<SecretManager>,
    _leases: Vec<CertLease>,
}

const SERVER: (&str, &str) = ("default", "server");
const CLIENT: (&str, &str) = ("default", "client");

async fn world(tag: &str, ttl: Duration) -> World {
    let dir = TempDir::new(tag);
    let ca = local_ca(&dir);
    let mgr = manager(ca.clone(), ttl);
    let mut leases = Vec::new();
    for (ns, sa) in [SERVER, CLIENT, ("default", "other")] {
        let ident = id(ns, sa);
        leases.push(mgr.acquire(&ident));
        mgr.fetch(&ident)
            .await
            .unwrap_or_else(|e| panic!("fetch {ident}: {e}"));
    }
    World {
        _dir: dir,
        ca,
        mgr,
        _leases: leases,
    }
}

impl World {
    fn server(&self) -> Arc<ServerConfig> {
        server_config(self.mgr.clone(), id(SERVER.0, SERVER.1))
    }

    fn client(&self) -> Arc<ClientConfig> {
        client_config(
            self.mgr.clone(),
            id(CLIENT.0, CLIENT.1),
            id(SERVER.0, SERVER.1),
        )
    }

    /// A client of this mesh's trust bundle that presents `key` instead of a managed cert.
    fn client_presenting(&self, key: Arc<CertifiedKey>) -> Arc<ClientConfig> {
        build_client(
            self.mgr.trust_bundle(),
            vec![id(SERVER.0, SERVER.1)],
            Arc::new(Fixed(key)),
        )
    }

    /// A server of this mesh's trust bundle that presents `key` instead of a managed cert.
    fn server_presenting(&self, key: Arc<CertifiedKey>) -> Arc<ServerConfig> {
        build_server(
            self.mgr.trust_bundle(),
            self.mgr.trust_domain().to_owned(),
            Arc::new(Fixed(key)),
        )
    }
}

/// Always the same certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Workload-like cert params (as the local CA issues them) with the given SANs and validity.
fn params(sans: Vec<SanType>, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.not_before = OffsetDateTime::from(not_before);
    p.not_after = OffsetDateTime::from(not_after);
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p
}

fn uri(ident: &Identity) -> SanType {
    SanType::URI(ident.to_string().try_into().expect("IA5 URI"))
}

fn valid_now() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

/// A fresh P-256 key and a cert for it from `ca` with `params`, ready for rustls.
fn crafted(ca: &LocalCa, params: &CertificateParams) -> Arc<CertifiedKey> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let der: CertificateDer<'static> = ca
        .sign_unchecked(params, &key)
        .unwrap_or_else(|e| panic!("sign: {e}"));
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .expect("load key");
    Arc::new(CertifiedKey::new(vec![der], signing))
}

/// Asserts the server refused the client, and that the client got nothing through.
fn assert_client_refused(
    what: &str,
    outcome: (Result<Seen, String>, Result<Seen, String>),
    server_says: &str,
) {
    let (server, client) = outcome;
    match server {
        Ok(seen) => panic!("{what}: server accepted the client as {:?}", seen.peer),
        Err(e) => assert!(
            e.contains(server_says),
            "{what}: server error should mention {server_says:?}: {e}"
        ),
    }
    assert!(
        client.is_err(),
        "{what}: client got data through: {client:?}"
    );
}

#[tokio::test]
async fn mtls_handshake_with_matching_identities() {
    let w = world("tls-ok", DEFAULT_CERT_TTL).await;
    let (server, client) = handshake(w.server(), w.client()).await;
    let server = server.unwrap_or_else(|e| panic!("server side: {e}"));
    let client = client.unwrap_or_else(|e| panic!("client side: {e}"));
    assert_eq!(
        server.peer,
        Some(id(CLIENT.0, CLIENT.1)),
        "server sees the client id"
    );
    assert_eq!(
        client.peer,
        Some(id(SERVER.0, SERVER.1)),
        "client sees the server id"
    );
    assert_eq!(server.alpn.as_deref(), Some(ALPN_H2), "server ALPN");
    assert_eq!(client.alpn.as_deref(), Some(ALPN_H2), "client ALPN");
    assert_eq!(server.sni, None, "the client sends no SNI");
    assert_eq!(server.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(client.version, Some(ProtocolVersion::TLSv1_3));
}

/// As ztunnel's client: no connection resumes a TLS session, so each verifies the server's
/// certificate against the identities expected now, even against a server that sends tickets
/// (ztunnel's sends rustls's default two).
#[tokio::test]
async fn the_client_never_resumes_even_when_the_server_sends_tickets() {
    let w = world("tls-resume", DEFAULT_CERT_TTL).await;
    let mut ticketing = (*w.server()).clone();
    ticketing.send_tls13_tickets = 2;
    ticketing.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
    let ticketing = Arc::new(ticketing);
    let kinds = |client: Arc<ClientConfig>| {
        let server = ticketing.clone();
        async move {
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let (_, c) = handshake(server.clone(), client.clone()).await;
                kinds.push(c.unwrap_or_else(|e| panic!("client side: {e}")).kind);
            }
            kinds
        }
    };
    // The control: a client with rustls's default resumption resumes the second time.
    let mut resuming = (*w.client()).clone();
    resuming.resumption = rustls::client::Resumption::default();
    let full = Some(rustls::HandshakeKind::Full);
    assert_eq!(
        kinds(Arc::new(resuming)).await,
        [full, Some(rustls::HandshakeKind::Resumed)],
        "the server lets a client resume"
    );
    assert_eq!(kinds(w.client()).await, [full, full], "ours never resumes");
}

#[tokio::test]
async fn client_accepts_any_of_several_expected_identities() {
    let w = world("tls-any", DEFAULT_CERT_TTL).await;
    let client = client_config_any(
        w.mgr.clone(),
        id(CLIENT.0, CLIENT.1),
        vec![id("default", "other"), id(SERVER.0, SERVER.1)],
    );
    let (server, client) = handshake(w.server(), client).await;
    server.unwrap_or_else(|e| panic!("server side: {e}"));
    let client = client.unwrap_or_else(|e| panic!("client side: {e}"));
    assert_eq!(client.peer, Some(id(SERVER.0, SERVER.1)));
}

#[tokio::test]
async fn client_refuses_server_with_wrong_identity() {
    let w = world("tls-wrong-id", DEFAULT_CERT_TTL).await;
    // The server presents default/other; the client wants default/server.
    let server = server_config(w.mgr.clone(), id("default", "other"));
    let (server, client) = handshake(server, w.client()).await;
    let err = match client {
        Ok(seen) => panic!("client accepted server {:?}", seen.peer),
        Err(e) => e,
    };
    assert!(
        err.contains("spiffe://cluster.local/ns/default/sa/server")
            && err.contains("spiffe://cluster.local/ns/default/sa/other"),
        "error names expected and presented identity: {err}"
    );
    assert!(server.is_err(), "server side must fail too: {server:?}");
}

#[tokio::test]
async fn client_refuses_server_from_another_ca() {
    let w = world("tls-srv-other-ca", DEFAULT_CERT_TTL).await;
    let other_dir = TempDir::new("tls-srv-other-ca-b");
    let other = local_ca(&other_dir);
    let (nb, na) = valid_now();
    let key = crafted(&other, &params(vec![uri(&id(SERVER.0, SERVER.1))], nb, na));
    let (server, client) = handshake(w.server_presenting(key), w.client()).await;
    let err = client.expect_err("client must refuse a server cert from another CA");
    assert!(err.contains("UnknownIssuer"), "unknown issuer: {err}");
    assert!(server.is_err(), "server side must fail too");
}

#[tokio::test]
async fn server_refuses_client_cert_from_another_ca() {
    let w = world("tls-other-ca", DEFAULT_CERT_TTL).await;
    let other_dir = TempDir::new("tls-other-ca-b");
    let other = local_ca(&other_dir);
    let (nb, na) = valid_now();
    let key = crafted(&other, &params(vec![uri(&id(CLIENT.0, CLIENT.1))], nb, na));
    let outcome = handshake(w.server(), w.client_presenting(key)).await;
    assert_client_refused("client cert from another CA", outcome, "UnknownIssuer");
}

#[tokio::test]
async fn server_refuses_client_cert_without_spiffe_san() {
    let w = world("tls-no-spiffe", DEFAULT_CERT_TTL).await;
    let (nb, na) = valid_now();
    let dns = SanType::DnsName("client.default.svc".try_into().expect("DNS name"));
    let key = crafted(&w.ca, &params(vec![dns], nb, na));
    let outcome = handshake(w.server(), w.client_presenting(key)).await;
    assert_client_refused("DNS SAN only", outcome, "no SPIFFE identity");
}

#[tokio::test]
async fn server_refuses_client_of_another_trust_domain() {
    let w = world("tls-other-td", DEFAULT_CERT_TTL).await;
    let (nb, na) = valid_now();
    let foreign = Identity::new("evil.local", CLIENT.0, CLIENT.1);
    let key = crafted(&w.ca, &params(vec![uri(&foreign)], nb, na));
    let outcome = handshake(w.server(), w.client_presenting(key)).await;
    assert_client_refused("foreign trust domain", outcome, "outside trust domain");
}

#[tokio::test]
async fn server_refuses_expired_client_cert() {
    let w = world("tls-expired", DEFAULT_CERT_TTL).await;
    let now = SystemTime::now();
    let key = crafted(
        &w.ca,
        &params(
            vec![uri(&id(CLIENT.0, CLIENT.1))],
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        ),
    );
    let outcome = handshake(w.server(), w.client_presenting(key)).await;
    assert_client_refused("expired client cert", outcome, "expired");
}

#[tokio::test]
async fn server_without_a_cert_refuses_handshakes() {
    let w = world("tls-no-cert", DEFAULT_CERT_TTL).await;
    // No lease for this identity: the resolver has nothing to present.
    let server = server_config(w.mgr.clone(), id("default", "unleased"));
    let (server, client) = handshake(server, w.client()).await;
    assert!(
        server.is_err() && client.is_err(),
        "{server:?} / {client:?}"
    );
}

#[tokio::test]
async fn cached_configs_present_rotated_certs() {
    let w = world("tls-rotate", Duration::from_secs(4)).await;
    let (server_cfg, client_cfg) = (w.server(), w.client());
    let server_id = id(SERVER.0, SERVER.1);
    let first = w.mgr.current(&server_id).expect("server cert");
    let (_, client) = handshake(server_cfg.clone(), client_cfg.clone()).await;
    let client = client.unwrap_or_else(|e| panic!("first handshake: {e}"));
    assert_eq!(client.peer_serial, Some(serial(&first.chain[0])));

    eventually("the server cert to rotate", || {
        w.mgr
            .current(&server_id)
            .is_some_and(|c| !Arc::ptr_eq(&c, &first))
    })
    .await;
    let rotated = w.mgr.current(&server_id).expect("rotated cert");
    let (_, client) = handshake(server_cfg, client_cfg).await;
    let client = client.unwrap_or_else(|e| panic!("handshake after rotation: {e}"));
    let got = client.peer_serial.expect("peer cert");
    // Another rotation may have happened in between; either way not the first cert.
    assert_ne!(got, serial(&first.chain[0]), "same config, new cert");
    assert!(
        got == serial(&rotated.chain[0]) || w.mgr.stats().rotations_total >= 2,
        "the presented cert is a rotated one"
    );
}

#[tokio::test]
async fn cached_configs_follow_root_changes() {
    let w = world("tls-roots", DEFAULT_CERT_TTL).await;
    let (server_cfg, client_cfg) = (w.server(), w.client());
    let (server, client) = handshake(server_cfg.clone(), client_cfg.clone()).await;
    assert!(server.is_ok() && client.is_ok(), "{server:?} / {client:?}");

    // Replace the root file with another CA's root: certs from the old root are no longer
    // trusted by new handshakes.
    let other_dir = TempDir::new("tls-roots-b");
    let other = local_ca(&other_dir);
    let tmp = w.ca.root_cert_path().with_extension("new");
    std::fs::copy(other.root_cert_path(), &tmp).expect("copy root");
    std::fs::rename(&tmp, w.ca.root_cert_path()).expect("replace root");
    let bundle = w.mgr.trust_bundle();
    let new_roots = other.roots().expect("roots");
    eventually("the bundle to load the new root", || {
        bundle.roots();
        bundle.root_certs() == new_roots
    })
    .await;

    let (server, client) = handshake(server_cfg, client_cfg).await;
    let err = client.expect_err("client must refuse a server whose root was removed");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(server.is_err(), "server side must fail too");
}
