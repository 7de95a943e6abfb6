//! A fake Kubernetes API server for tests: real HTTP/1.1 on `127.0.0.1:<port>` (in a node's netns if
//! asked), which kube-rs's real client talks to through a kubeconfig, and whose behaviour the test
//! controls while the agent runs (down/up, restart, compaction, failing discovery or lists).
//!
//! ```text
//! let fake = FakeKube::start(Some(node.netns_path()));   // the agent runs in the node's netns
//! fake.kubeconfig(&dir.join("kubeconfig"))?;             // its KUBECONFIG, for `ambit run --kube`
//! fake.apply_yaml(PODS)?;                                // ADDED/MODIFIED to open watches
//! fake.set_deleting("Pod", "mesh", "web")?;              // terminating: MODIFIED, still listed
//! fake.restart();                                        // refused, then 410 Expired, then a re-list
//! assert!(fake.requests().iter().any(|r| r.contains("watch=true")));
//! ```
//!
//! Faithful to the real server, because the agent's watch logic depends on it:
//! - discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/<g>`, `/apis/<g>/<v>`, `/version`);
//!   an uninstalled CRD's group-version answers 404, a failing one 503 (not the same to a client);
//! - one global resource version; `uid` and `creationTimestamp` set on create and kept on replace;
//!   an unchanged replace is a no-op without an event; a deletion once started cannot be undone;
//! - lists carry the current resource version, built-in list items come without `apiVersion`/`kind`
//!   and CRD items with them; a CRD object is served at every version of its group; `limit` pages
//!   with `continue` tokens (410 once compacted), except from the watch cache (`resourceVersion=0`);
//! - watches stream chunked JSON lines: from `resourceVersion=N` the retained events after N, from
//!   0 or unset a synthetic ADDED per object, then live events, until `timeoutSeconds`; a version
//!   older than the retained history gets one ERROR event (410 Expired) and the end of the stream;
//!   deleting a CRD sends DELETED for its objects, then ends its watches;
//! - errors come as `Status` bodies with the real reasons (403's message names the verb and scope).
//!
//! Not faithful (extend it when a test needs it): only GET is served (the test writes through
//! [`FakeKube::apply`] and friends, which replace spec and status alike); no label or field
//! selectors (refused with 400, not ignored); pages are not one snapshot (a later page shows
//! objects as they are now); `resourceVersionMatch` ignored (lists answer the current state); a
//! watch from a version newer than the server's just waits; no aggregated discovery,
//! no `generation`, no `managedFields`, no admission or schema validation, no namespace existence
//! check and no cascading delete; bookmarks only when the test calls [`FakeKube::bookmark`].

mod cluster;
mod resources;
mod server;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::netns::run_in_netns;
use super::HarnessError;
use cluster::Cluster;

/// Why the fake API server could not start or refused what a test asked of it.
#[derive(Debug, thiserror::Error)]
pub enum FakeKubeError {
    #[error("start the fake API server's runtime")]
    Runtime {
        #[source]
        source: io::Error,
    },
    #[error("bind the fake API server in netns {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: HarnessError,
    },
    #[error("listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("write kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{at} is not valid YAML")]
    Yaml {
        at: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error("the fake API server does not serve kind {kind:?} at apiVersion {api_version:?}")]
    NotServed { api_version: String, kind: String },
    #[error("the fake API server serves no kind {kind:?}")]
    UnknownKind { kind: String },
    #[error("no matches for kind {kind:?} in version {api_version:?}: its CRD is not installed")]
    NotInstalled { api_version: String, kind: String },
    #[error("{group:?} is not a CRD group of the fake API server")]
    UnknownGroup { group: String },
    #[error("the fake API server serves no group-version {group_version:?}")]
    UnknownGroupVersion { group_version: String },
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: String,
        namespace: String,
        name: String,
    },
    #[error("status code {code} is not an error (400-599)")]
    NotAnError { code: u16 },
}

/// A running fake API server. Dropping it stops the server and its runtime.
pub struct FakeKube {
    cluster: Arc<Mutex<Cluster>>,
    runtime: tokio::runtime::Handle,
    /// Ends the runtime thread's `block_on`.
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    netns: Option<PathBuf>,
    port: u16,
    serving: Mutex<Option<Serving>>,
}

/// The accept loop of one `up`.
struct Serving {
    stop: oneshot::Sender<()>,
    /// Signalled once the listener and every connection are closed.
    stopped: std::sync::mpsc::Receiver<()>,
}

impl FakeKube {
    /// Starts serving on `127.0.0.1:<ephemeral>` inside the netns file `netns` (the current netns
    /// for None). Panics with the reason if it cannot: test infrastructure.
    pub fn start(netns: Option<&Path>) -> FakeKube {
        FakeKube::try_start(netns).unwrap_or_else(|e| panic!("fake API server: {}", chain(&e)))
    }

    /// [`FakeKube::start`], with the error returned.
    pub fn try_start(netns: Option<&Path>) -> Result<FakeKube, FakeKubeError> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-kube".into())
            .spawn(move || {
                // Its own runtime, so a test's runtime (even a current-thread one blocked in a
                // sync call of this API) never stalls the server.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = shutdown_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| FakeKubeError::Runtime { source })?;
        let runtime = match handle_rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(source)) => return Err(FakeKubeError::Runtime { source }),
            Err(_) => {
                return Err(FakeKubeError::Runtime {
                    source: io::Error::other("the runtime thread died"),
                })
            }
        };
        let mut fake = FakeKube {
            cluster: Arc::new(Mutex::new(Cluster::new())),
            runtime,
            shutdown: Some(shutdown),
            thread: Some(thread),
            netns: netns.map(Path::to_owned),
            port: 0,
            serving: Mutex::new(None),
        };
        let listener = fake.bind()?;
        fake.port = listener
            .local_addr()
            .map_err(|source| FakeKubeError::Listen {
                addr: fake.addr(),
                source,
            })?
            .port();
        fake.serve(listener)?;
        Ok(fake)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Writes a kubeconfig naming this server (plain HTTP, no credentials), for the agent's
    /// `KUBECONFIG`.
    pub fn kubeconfig(&self, path: &Path) -> Result<(), FakeKubeError> {
        let yaml = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
users:
- name: fake
  user: {{}}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
",
            self.url()
        );
        std::fs::write(path, yaml).map_err(|source| FakeKubeError::Kubeconfig {
            path: path.to_owned(),
            source,
        })
    }

    /// A kube client of this server. Call it inside a tokio runtime: the client's tasks run on it.
    /// Only for a server in the current netns (`start(None)`).
    pub fn client(&self) -> kube::Client {
        assert!(
            tokio::runtime::Handle::try_current().is_ok(),
            "FakeKube::client must be called inside a tokio runtime (the client spawns on it)"
        );
        let url = self
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("fake API server url {}: {e}", self.url()));
        crate::tls::install_process_default();
        kube::Client::try_from(kube::Config::new(url))
            .unwrap_or_else(|e| panic!("kube client of {}: {}", self.url(), chain(&e)))
    }

    /// Creates or replaces every object of a multi-document YAML (a `kind: List` is opened). All
    /// are checked first: on an error nothing is applied.
    pub fn apply_yaml(&self, yaml: &str) -> Result<(), FakeKubeError> {
        let docs = cluster::parse_yaml(yaml)?;
        self.cluster().apply(docs)
    }

    /// Creates or replaces one object (or the items of a `kind: List`).
    pub fn apply(&self, object: Value) -> Result<(), FakeKubeError> {
        self.cluster()
            .apply(vec![("the object".to_string(), object)])
    }

    /// Deletes an object at once (DELETED). `namespace` is ignored for cluster-scoped kinds.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<(), FakeKubeError> {
        self.cluster().delete(kind, namespace, name)
    }

    /// Starts a graceful delete: `metadata.deletionTimestamp` set (MODIFIED), the object stays
    /// until [`FakeKube::delete`].
    pub fn set_deleting(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(), FakeKubeError> {
        self.cluster().set_deleting(kind, namespace, name)
    }

    /// Every stored object of `kind` (e.g. "Pod"), with the server's metadata.
    pub fn objects(&self, kind: &str) -> Result<Vec<Value>, FakeKubeError> {
        self.cluster().objects(kind)
    }

    /// Serves the CRDs of `group` (e.g. "networking.istio.io"). All are installed at start.
    pub fn install_crds(&self, group: &str) -> Result<(), FakeKubeError> {
        self.cluster().install(group)
    }

    /// Stops serving `group`: its discovery, lists and watches answer 404, its objects are deleted
    /// (DELETED sent) and its open watches end.
    pub fn uninstall_crds(&self, group: &str) -> Result<(), FakeKubeError> {
        self.cluster().uninstall(group)
    }

    /// Forgets the event history: a watch resuming from an older resource version gets 410.
    pub fn compact(&self) {
        self.cluster().compact();
    }

    /// Sends a BOOKMARK at the current resource version to every watch that allows bookmarks.
    pub fn bookmark(&self) {
        self.cluster().bookmark();
    }

    /// Makes `GET /apis/<group>/<version>` (or `/api/v1` for "v1") answer 503 while `on`.
    pub fn fail_discovery(&self, group_version: &str, on: bool) -> Result<(), FakeKubeError> {
        let (group, version) = resources::split_api_version(group_version);
        if !resources::known_group_version(group, version) {
            return Err(FakeKubeError::UnknownGroupVersion {
                group_version: group_version.to_string(),
            });
        }
        let mut c = self.cluster();
        if on {
            c.failing_discovery.insert(group_version.to_string());
        } else {
            c.failing_discovery.remove(group_version);
        }
        Ok(())
    }

    /// Makes new lists, watches and gets of `kind` answer `code` (403 for missing RBAC, 500, ...);
    /// None restores them. Watches already open go on.
    pub fn fail_lists(&self, kind: &str, code: Option<u16>) -> Result<(), FakeKubeError> {
        let id = resources::by_kind(kind).ok_or_else(|| FakeKubeError::UnknownKind {
            kind: kind.to_string(),
        })?;
        let mut c = self.cluster();
        match code {
            Some(code) if !(400..=599).contains(&code) => {
                return Err(FakeKubeError::NotAnError { code })
            }
            Some(code) => c.failing.insert(id, code),
            None => c.failing.remove(&id),
        };
        Ok(())
    }

    /// `METHOD path?query` of every request so far, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.cluster().requests.clone()
    }

    /// Closes the listener and every open connection: new connections are refused until `up`.
    pub fn down(&self) {
        let serving = lock(&self.serving).take();
        if let Some(s) = serving {
            let _ = s.stop.send(());
            // Returns once all is closed, or at once if the runtime is gone.
            let _ = s.stopped.recv();
        }
    }

    /// Listens again on the same port in the same netns. Panics with the reason if it cannot.
    pub fn up(&self) {
        if lock(&self.serving).is_some() {
            return;
        }
        let result = self.bind().and_then(|l| self.serve(l));
        if let Err(e) = result {
            panic!("fake API server up again: {}", chain(&e));
        }
    }

    /// An API server restart: down, history forgotten (resumed watches get 410), up.
    pub fn restart(&self) {
        self.down();
        self.compact();
        self.up();
    }

    fn cluster(&self) -> MutexGuard<'_, Cluster> {
        lock(&self.cluster)
    }

    /// A listening socket on our port (0 the first time) inside our netns. SO_REUSEADDR, so `up`
    /// gets the port back while the connections `down` closed are in TIME_WAIT.
    fn bind(&self) -> Result<std::net::TcpListener, FakeKubeError> {
        let addr = self.addr();
        let listen = move || -> io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        };
        // After `down`, the old listener's socket is closed when its aborted task is dropped,
        // which on a busy machine can be a moment later: the port is retried while in use.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let result = match &self.netns {
                // The socket stays in the netns it was made in, whichever thread accepts on it.
                Some(path) => {
                    run_in_netns(path, listen).map_err(|source| FakeKubeError::Netns {
                        path: path.clone(),
                        source,
                    })?
                }
                None => listen(),
            };
            match result {
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other.map_err(|source| FakeKubeError::Listen { addr, source }),
            }
        }
    }

    /// Accepts on `listener` until `down`, each connection a task of the set `down` aborts.
    fn serve(&self, listener: std::net::TcpListener) -> Result<(), FakeKubeError> {
        let listener = {
            let _runtime = self.runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(|source| FakeKubeError::Listen {
                addr: self.addr(),
                source,
            })?
        };
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let cluster = self.cluster.clone();
        self.runtime.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    // Stopped, or the FakeKube is gone.
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            connections.spawn(server::serve_connection(stream, cluster.clone()));
                        }
                        // EMFILE and friends: back off instead of spinning.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
            drop(listener);
            connections.shutdown().await;
            let _ = stopped_tx.send(());
        });
        *lock(&self.serving) = Some(Serving { stop, stopped });
        Ok(())
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.down();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error and its sources on one line, for panic messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
