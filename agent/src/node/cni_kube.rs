//! The credentials the plugin uses while the agent is down ([`ambit_cni::kube`]): the API
//! server's address, the agent's ServiceAccount token and the cluster CA, copied from the agent's
//! in-cluster files into its run dir (mode 0600, for root only, as istio-cni's installer writes
//! its plugin's kubeconfig on the node). The kubelet rotates the projected token, so the copy is
//! refreshed ([`keep`]); an agent outside a cluster (local mode, or a kubeconfig) writes none and
//! the plugin decides from the node state alone.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_cni::kube::{kube_access_path, KubeAccess, KUBE_ACCESS_NAME};
use thiserror::Error;
use tracing::{debug, info, warn};

/// Where a pod's ServiceAccount files are (Kubernetes' in-cluster convention).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How often [`keep`] looks at the token.
pub const REFRESH: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum CniKubeError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `https://host:port`.
    pub server: String,
    pub token: PathBuf,
    pub ca_cert: PathBuf,
}

impl Source {
    /// The in-cluster source: `KUBERNETES_SERVICE_HOST`/`_PORT` and the ServiceAccount files, as
    /// client-go's and kube-rs's in-cluster config; None outside a pod.
    pub fn in_cluster() -> Option<Source> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok()?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let source = Source {
            server: server_url(&host, &port),
            token: dir.join("token"),
            ca_cert: dir.join("ca.crt"),
        };
        source.token.is_file().then_some(source)
    }

    /// The credentials as they are now.
    pub fn read(&self) -> Result<KubeAccess, CniKubeError> {
        let read = |path: &Path| {
            let text = std::fs::read_to_string(path).map_err(|source| CniKubeError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let text = text.trim().to_string();
            if text.is_empty() {
                return Err(CniKubeError::Empty {
                    path: path.to_path_buf(),
                });
            }
            Ok(text)
        };
        Ok(KubeAccess {
            server: self.server.clone(),
            token: read(&self.token)?,
            ca_cert: read(&self.ca_cert)?,
        })
    }
}

/// `https://host:port`, with an IPv6 host in brackets.
fn server_url(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// Writes `access` into `run_dir` (temp file + rename, 0600) unless the same is there; true when
/// it wrote.
pub fn write(run_dir: &Path, access: &KubeAccess) -> Result<bool, CniKubeError> {
    let path = kube_access_path(run_dir);
    let err = |source| CniKubeError::Write {
        path: path.clone(),
        source,
    };
    let json = serde_json::to_vec(access).map_err(|e| err(io::Error::other(e)))?;
    if std::fs::read(&path).is_ok_and(|old| old == json) {
        return Ok(false);
    }
    let tmp = super::cni_install::temp_name(&path, KUBE_ACCESS_NAME);
    super::cni_install::write_new(&tmp, &json, 0o600).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(true)
}

/// Removes the credentials (uninstall).
pub fn remove(run_dir: &Path) {
    let _ = std::fs::remove_file(kube_access_path(run_dir));
}

/// Keeps the credentials in `run_dir` current: now, then every [`REFRESH`]. A failure is logged
/// once until it clears; the plugin then holds the pods it cannot decide for.
pub async fn keep(source: Source, run_dir: PathBuf) {
    let mut ticker = tokio::time::interval(REFRESH);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match source.read().and_then(|access| write(&run_dir, &access)) {
            Ok(wrote) => {
                if wrote {
                    debug!(file = %kube_access_path(&run_dir).display(), "CNI plugin's API credentials written");
                }
                if failing {
                    info!("CNI plugin's API credentials written again");
                }
                failing = false;
            }
            Err(e) if !failing => {
                warn!(error = %e, "cannot give the CNI plugin API credentials; while the agent is down it holds the pods its node state does not decide");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A temp dir, removed on drop (also when an assertion fails).
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn credentials_are_copied_for_root_only_and_follow_the_token() {
        let guard =
            TempDir(std::env::temp_dir().join(format!("ambit-cni-kube-{}", std::process::id())));
        let dir = guard.0.clone();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = Source {
            server: server_url("fd00::1", "443"),
            token: dir.join("token"),
            ca_cert: dir.join("ca.crt"),
        };
        assert_eq!(source.server, "https://[fd00::1]:443");
        assert!(matches!(source.read(), Err(CniKubeError::Read { .. })));
        std::fs::write(&source.token, "t1\n").unwrap();
        std::fs::write(&source.ca_cert, "PEM").unwrap();
        assert!(write(&dir, &source.read().unwrap()).unwrap());
        let got = ambit_cni::kube::read_access(&dir).unwrap().unwrap();
        assert_eq!((got.token.as_str(), got.ca_cert.as_str()), ("t1", "PEM"));
        assert!(!format!("{got:?}").contains("t1"), "Debug shows no token");
        let mode = std::fs::metadata(kube_access_path(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!write(&dir, &source.read().unwrap()).unwrap(), "unchanged");
        std::fs::write(&source.token, "t2").unwrap();
        assert!(write(&dir, &source.read().unwrap()).unwrap());
        let got = ambit_cni::kube::read_access(&dir).unwrap().unwrap();
        assert_eq!(got.token, "t2");
        std::fs::write(&source.token, "").unwrap();
        assert!(matches!(source.read(), Err(CniKubeError::Empty { .. })));
        remove(&dir);
        assert!(ambit_cni::kube::read_access(&dir).unwrap().is_none());
    }
}
