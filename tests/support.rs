//! Shared pieces of the namespaced integration tests: apps that run inside pods (servers that report
//! what they saw, clients), and the agent binary's path.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[allow(unused_imports)]
pub use ambit::harness::apps::{whoami, Mode, Server};
use ambit::harness::Pod;
use ambit::identity::{CertConfig, CertLease, Identity, LocalCa, SecretManager};
use bytes::Bytes;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Ceiling for anything a test waits for (a status, a server's record, a listener closing):
/// generous, because the machine may be busy. Only a failure waits this long.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Waits until `f` holds, or panics naming `what` after `SETTLE`.
pub fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Probes until `done` holds on the value, or until `SETTLE` has passed, and returns the last
/// value either way: the caller asserts on it, so a value that never settles still fails with
/// the assertion's own message.
pub fn settled<T>(probe: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        let value = probe();
        if done(&value) || Instant::now() > deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first status of `agent` on which `pred` holds, or the last one after `SETTLE`.
///
/// For assertions on values the agent refreshes apart from the one a test waited for (map sizes
/// are recounted at most once a second, kernel counters are read apart from the live proxy
/// counters): wait here for everything asserted, then assert on the returned status.
pub fn settled_status(
    agent: &ambit::harness::LocalAgent,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    settled(|| agent.status(), |s| s.as_ref().is_some_and(&pred))
        .unwrap_or_else(|| panic!("no status from the agent\n{}", agent.log_tail()))
}

pub fn ambit_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ambit"))
}

/// Tests open thousands of sockets; the default soft limit is 1024.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Runs `f` in a pod on a fresh current-thread runtime.
pub fn in_pod<F, Fut, T>(pod: &Pod, f: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: std::future::Future<Output = T>,
    T: Send,
{
    pod.run_async(f)
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can agree without sharing a buffer.
pub fn pattern(seed: u64, buf: &mut [u8]) -> u64 {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    x
}

/// Counts listeners on the proxy's ports inside a netns (from /proc/thread-self/net/tcp{,6}: this thread is in the netns).
pub fn proxy_listeners(pod: &Pod) -> BTreeMap<u16, usize> {
    pod.run(|| {
        let mut out = BTreeMap::new();
        for file in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for line in text.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // st 0A = LISTEN; local address is "ADDR:PORT" in hex.
                if cols.len() > 3 && cols[3] == "0A" {
                    if let Some(port) = cols[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                    {
                        if [15001, 15006, 15008].contains(&port) {
                            *out.entry(port).or_insert(0) += 1;
                        }
                    }
                }
            }
        }
        out
    })
}

/// IDs of the maps pinned under an agent's bpffs dir: what identifies its programs among every
/// other test's on this machine.
pub fn our_map_ids(bpffs: &Path) -> Vec<u64> {
    let dir = bpffs.join(ambit_common::PIN_ABI).join("maps");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        let v = bpftool(&["map", "show", "pinned", path.to_str().expect("utf8")]);
        ids.push(
            v["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no map id for {}: {v}", path.display())),
        );
    }
    ids
}

/// Attached BPF links whose program uses one of `map_ids`, counted by link type ("cgroup", "netns").
pub fn attached_links(map_ids: &[u64]) -> BTreeMap<String, usize> {
    let ours = our_prog_ids(map_ids);
    let mut out = BTreeMap::new();
    for link in bpftool(&["link", "show"]).as_array().expect("link list") {
        if ours.contains(&link["prog_id"].as_u64().unwrap_or(0)) {
            *out.entry(link["type"].as_str().unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
    }
    out
}

/// The cgroup (by id) of each attached cgroup link whose program uses one of `map_ids`, sorted.
pub fn cgroup_link_targets(map_ids: &[u64]) -> Vec<u64> {
    let ours = our_prog_ids(map_ids);
    let mut out: Vec<u64> = bpftool(&["link", "show"])
        .as_array()
        .expect("link list")
        .iter()
        .filter(|l| l["type"] == "cgroup" && ours.contains(&l["prog_id"].as_u64().unwrap_or(0)))
        .map(|l| {
            l["cgroup_id"]
                .as_u64()
                .unwrap_or_else(|| panic!("cgroup link without cgroup_id: {l}"))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Loaded programs that use one of `map_ids`.
fn our_prog_ids(map_ids: &[u64]) -> Vec<u64> {
    let progs = bpftool(&["prog", "show"]);
    progs
        .as_array()
        .expect("prog list")
        .iter()
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|id| map_ids.contains(&id.as_u64().unwrap_or(0)))
            })
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

pub fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("bpftool (apt-get install bpftool): {e}"));
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?} json: {e}"))
}

/// FNV-1a over a byte stream, to compare what was sent with what arrived.
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// A test client speaking HBONE with a certificate from `ca_dir` for `src`.
pub struct TestClient {
    _manager: std::sync::Arc<SecretManager>,
    _lease: CertLease,
    sender: h2::client::SendRequest<Bytes>,
}

pub async fn hbone_client(
    ca_dir: &std::path::Path,
    src: &Identity,
    server: SocketAddr,
    expected: &Identity,
) -> Result<TestClient, String> {
    let ca = LocalCa::load_or_create(ca_dir, "cluster.local").map_err(|e| e.to_string())?;
    let manager = SecretManager::new(
        std::sync::Arc::new(ca),
        CertConfig {
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(3600),
        },
    );
    let lease = manager.acquire(src);
    manager.fetch(src).await.map_err(|e| e.to_string())?;
    let cfg = ambit::tls::client_config(manager.clone(), src.clone(), expected.clone());
    let tcp = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ambit::tls::server_name(server.ip()), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    // A refused client certificate shows up as an error on first use.
    let (sender, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(TestClient {
        _manager: manager,
        _lease: lease,
        sender,
    })
}

impl TestClient {
    /// Sends `method` with `authority`, returns the status.
    pub async fn status(&mut self, method: http::Method, authority: &str) -> Result<u16, String> {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(if method == http::Method::CONNECT {
                authority.to_string()
            } else {
                format!("https://{authority}/")
            })
            .body(())
            .map_err(|e| e.to_string())?;
        let mut sender = self
            .sender
            .clone()
            .ready()
            .await
            .map_err(|e| e.to_string())?;
        let (resp, _send) = sender
            .send_request(req, method != http::Method::CONNECT)
            .map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }
}

/// Sends `total` bytes of `fill` (or a pseudo-random pattern) to an echo server and reads them
/// back. Returns (hash sent, hash received, bytes received).
pub async fn echo_transfer(
    dst: SocketAddr,
    total: u64,
    fill: Option<&'static [u8]>,
) -> (u64, u64, u64) {
    let stream = TcpStream::connect(dst).await.expect("connect");
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 20];
        if let Some(fill) = fill {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = fill[i % fill.len()];
            }
        }
        let (mut seed, mut h, mut sent) = (7u64, Fnv::new(), 0u64);
        while sent < total {
            if fill.is_none() {
                seed = pattern(seed, &mut buf);
            }
            w.write_all(&buf).await.expect("write");
            h.update(&buf);
            sent += buf.len() as u64;
        }
        w.shutdown().await.expect("half-close");
        h.0
    });
    // The whoami line first.
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        r.read_exact(&mut byte).await.expect("whoami line");
    }
    let (mut h, mut n, mut buf) = (Fnv::new(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let k = r.read(&mut buf).await.expect("read");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    (writer.await.expect("writer"), h.0, n)
}

/// `node`'s cgroup as `--cgroup-attach` takes it: its path under the world's cgroup root.
pub fn cgroup_attach_spec(world: &ambit::harness::World, node: &ambit::harness::Node) -> String {
    let rel = node
        .cgroup()
        .strip_prefix(world.cgroup_root())
        .expect("node cgroups sit under the world's cgroup root");
    format!("/{}", rel.display())
}
