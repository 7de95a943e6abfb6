//! The peer reference (d): Debian's HAProxy in the agents' two positions, one process per node in
//! the node's netns. The client node's instance routes HTTP as the VirtualService of (c) does (the
//! header match first, else the weighted split) and sends each request over mutual TLS to the
//! server node's instance, which picks the pod by the SNI the client side set (as HBONE's CONNECT
//! names its target) and forwards in plaintext. Certificates: an ECDSA P-256 CA and two leaves
//! made with rcgen, as ambit's identities are.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ambit::harness::{Node, Process};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::cluster::Split;

/// The server node's TLS port (ambit's HBONE is 15008).
pub const TLS_PORT: u16 = 15443;

/// What the two instances are given.
pub struct Setup<'a> {
    pub bin: &'a Path,
    pub dir: PathBuf,
    pub client_node: &'a Node,
    pub server_node: &'a Node,
    /// The client side listens on the client node's address at this port.
    pub listen_port: u16,
    /// The app of subset v1 and of v2.
    pub backends: [SocketAddr; 2],
    pub split: &'a Split,
    /// Threads per instance (`nbthread`), as the agents' `--workers`.
    pub threads: usize,
    /// ALPN between the instances: `http/1.1` (HAProxy's usual backend) or `h2` (multiplexed, as
    /// HBONE is).
    pub alpn: &'a str,
}

/// The two running instances.
pub struct Haproxy {
    pub client: Process,
    pub server: Process,
    pub client_log: PathBuf,
    pub server_log: PathBuf,
    /// Where the client pods send their requests.
    pub addr: SocketAddr,
}

impl Haproxy {
    pub fn pids(&self) -> (u32, u32) {
        (self.client.id(), self.server.id())
    }

    pub fn log_tail(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        format!(
            "--- HAProxy client side ({}) ---\n{}\n--- HAProxy server side ({}) ---\n{}",
            self.client_log.display(),
            tail(&self.client_log),
            self.server_log.display(),
            tail(&self.server_log)
        )
    }
}

/// Files of the CA and the two leaves (certificate and key in one PEM, as `crt` wants).
struct Certs {
    ca: PathBuf,
    client: PathBuf,
    server: PathBuf,
}

fn certs(dir: &Path, server_names: &[&str]) -> Certs {
    let key = || KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let ca_key = key();
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "ambit l7 bench HAProxy CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = key();
        let mut p = CertificateParams::new(names).expect("leaf params");
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &issuer).expect("leaf certificate");
        cert.pem() + &key.serialize_pem()
    };
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    };
    Certs {
        ca: write("ca.pem", ca_pem),
        client: write(
            "client.pem",
            leaf(
                vec!["bench-client".into()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ),
        server: write(
            "server.pem",
            leaf(
                server_names.iter().map(|s| s.to_string()).collect(),
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
        ),
    }
}

/// Settings both instances share.
fn global(threads: usize) -> String {
    format!(
        "global
    nbthread {threads}
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
    # AES-128-GCM first, as ambit prefers it
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always
"
    )
}

/// The SNI naming each subset's pod on the TLS hop.
const SUBSET_SNI: [&str; 2] = ["web-v1", "web-v2"];

fn client_config(s: &Setup, certs: &Certs, listen: SocketAddr, tls: Ipv4Addr) -> String {
    let alpn = if s.alpn == "h2" { " alpn h2" } else { "" };
    let server = |name: &str, subset: usize, weight: Option<u32>| {
        let sni = SUBSET_SNI[subset];
        let weight = weight.map(|w| format!(" weight {w}")).unwrap_or_default();
        format!(
            "    server {name} {tls}:{TLS_PORT} ssl verify required ca-file {ca} crt {crt} \
             sni str({sni}) verifyhost {sni}{alpn}{weight}\n",
            ca = certs.ca.display(),
            crt = certs.client.display(),
        )
    };
    let mut out = global(s.threads);
    let (header, value) = (&s.split.header.0, &s.split.header.1);
    let _ = write!(
        out,
        "
frontend routes
    bind {listen}
    use_backend header-v2 if {{ req.hdr({header}) -m str {value} }}
    default_backend weighted

backend weighted
    balance random
{}{}
backend header-v2
{}",
        server("v1", 0, Some(s.split.weights[0])),
        server("v2", 1, Some(s.split.weights[1])),
        server("v2", 1, None),
    );
    out
}

fn server_config(s: &Setup, certs: &Certs, tls: Ipv4Addr) -> String {
    let alpn = if s.alpn == "h2" {
        "h2,http/1.1"
    } else {
        "http/1.1"
    };
    let mut out = global(s.threads);
    let _ = write!(
        out,
        "
frontend tls
    bind {tls}:{TLS_PORT} ssl crt {crt} ca-file {ca} verify required alpn {alpn}
    use_backend v1 if {{ ssl_fc_sni -i {sni1} }}
    use_backend v2 if {{ ssl_fc_sni -i {sni2} }}

backend v1
    server app {b1}

backend v2
    server app {b2}
",
        crt = certs.server.display(),
        ca = certs.ca.display(),
        sni1 = SUBSET_SNI[0],
        sni2 = SUBSET_SNI[1],
        b1 = s.backends[0],
        b2 = s.backends[1],
    );
    out
}

/// Writes the certificates and configurations, starts both instances and waits until each
/// accepts connections.
pub fn start(s: &Setup) -> Haproxy {
    std::fs::create_dir_all(&s.dir).unwrap_or_else(|e| panic!("{}: {e}", s.dir.display()));
    let certs = certs(&s.dir, &SUBSET_SNI);
    let listen = SocketAddr::from((s.client_node.ip4(), s.listen_port));
    let tls = s.server_node.ip4();
    let spawn = |node: &Node, name: &str, config: String| {
        let cfg = s.dir.join(format!("{name}.cfg"));
        let log = s.dir.join(format!("{name}.log"));
        std::fs::write(&cfg, config).unwrap_or_else(|e| panic!("write {}: {e}", cfg.display()));
        // `-c` first: a bad configuration is an error here, not a process that exits later.
        let check = node
            .command(s.bin)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .unwrap_or_else(|e| panic!("haproxy -c: {e}"));
        if !check.status.success() {
            panic!(
                "haproxy rejects {}:\n{}{}",
                cfg.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap_or_else(|e| panic!("dup: {e}"));
        let mut cmd = node.command(s.bin);
        // Foreground, one process (its threads), no master.
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        (node.spawn(&mut cmd), log)
    };
    let (server, server_log) = spawn(
        s.server_node,
        "haproxy-server",
        server_config(s, &certs, tls),
    );
    let (client, client_log) = spawn(
        s.client_node,
        "haproxy-client",
        client_config(s, &certs, listen, tls),
    );
    let h = Haproxy {
        client,
        server,
        client_log,
        server_log,
        addr: listen,
    };
    wait_listening(&h, s.server_node, SocketAddr::from((tls, TLS_PORT)));
    wait_listening(&h, s.client_node, listen);
    h
}

fn wait_listening(h: &Haproxy, node: &Node, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = node.run(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if up {
            return;
        }
        let exited = [&h.client, &h.server]
            .iter()
            .any(|p| matches!(p.try_wait(), Ok(Some(_))));
        if exited || Instant::now() > deadline {
            panic!(
                "HAProxy is not listening on {addr} (exited: {exited})\n{}",
                h.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
