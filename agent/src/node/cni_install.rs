//! Installs `ambit-cni` on the node, as istio-cni's installer does for a chained plugin: the
//! binary into the CNI bin dir, and an `ambit-cni` entry at the end of the primary network
//! config's plugin list. The primary config is the one the runtime uses: the lexicographically
//! first `*.conf`, `*.conflist` or `*.json` in the conf dir that loads (kubelet's and libcni's
//! rule); a single-plugin `.conf` becomes a `.conflist` holding it. The entry is kept there while
//! the primary CNI rewrites its file ([`watch`]) and removed on [`uninstall`].
//!
//! Every write is a temp file renamed over the target, so the runtime never reads half a file.
//! Converting `x.conf` writes `x.conflist` first and then removes `x.conf`: for that moment the
//! runtime still picks the old, valid `x.conf` (istio-cni instead writes the list into `x.conf`
//! and renames it, a moment in which `x.conf` is a list the runtime cannot load).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;
use tracing::{info, warn};

mod events;
use events::{next_event, DirEvents};

/// The plugin's `type` (its binary's name in the bin dir).
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// How often [`watch`] looks at the conf dir while it has no inotify watch on it (the dir does not
/// exist yet, or inotify is unavailable).
pub const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How often [`watch`] passes without an event while its watches are armed: a safety net only
/// (lost events come as an overflow, which calls for a pass itself). Not twice a second: a pass
/// reads the plugin binary and every config.
pub const ARMED_POLL: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("CNI conf dir {path}: {source}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI network config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CNI network config {path}: not valid JSON: {source}")]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("CNI network config {path}: field {field}: {why}")]
    BadField {
        path: PathBuf,
        field: String,
        why: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("installing the plugin binary {from} as {to}: {source}")]
    Binary {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: the primary CNI kept rewriting its config during {attempts} attempts to add ambit-cni; trying again on its next write")]
    Busy { path: PathBuf, attempts: usize },
    #[error(
        "no CNI network config in {dir} yet{skipped} (waiting for the primary CNI to write one)"
    )]
    NoPrimary { dir: PathBuf, skipped: String },
    #[error("the install pass did not finish: {0}")]
    Pass(String),
    #[error("inotify: {0}")]
    InotifyInit(#[source] io::Error),
    #[error("reading inotify events for the CNI conf dir {dir}: {source}")]
    InotifyRead {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where to install.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The node's CNI network config dir (`/etc/cni/net.d`, mounted).
    pub conf_dir: PathBuf,
    /// The node's CNI plugin dir (`/opt/cni/bin`, mounted).
    pub bin_dir: PathBuf,
    /// The `ambit-cni` binary to copy there.
    pub plugin: PathBuf,
    /// The agent's CNI run dir, written into the entry (`runDir`).
    pub run_dir: PathBuf,
    /// Namespaces whose pods start while the agent is down (`excludeNamespaces`; empty: none).
    pub exclude_namespaces: Vec<String>,
    /// Set by [`uninstall`], shared by every clone of this config: a pass of [`watch`] (of a clone)
    /// still queued or running then installs nothing, so the entry never comes back after its
    /// removal.
    pub uninstalled: Uninstalled,
}

/// See [`InstallConfig::uninstalled`].
#[derive(Debug, Clone, Default)]
pub struct Uninstalled(Arc<AtomicBool>);

impl Uninstalled {
    fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl InstallConfig {
    /// Our entry in the plugin list.
    pub fn entry(&self) -> Value {
        let mut entry = serde_json::json!({"type": PLUGIN_TYPE, "runDir": self.run_dir});
        if !self.exclude_namespaces.is_empty() {
            entry["excludeNamespaces"] = serde_json::json!(self.exclude_namespaces);
        }
        entry
    }
}

/// The network config file the runtime uses: the first (by name) that loads as a config with at
/// least one plugin. None when there is none yet.
pub fn primary_file(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| InstallError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_config_name(p) && p.is_file())
        .collect();
    files.sort();
    let mut skipped = Vec::new();
    for file in files {
        // The runtime skips a file it cannot load; so do we (the next one is the primary). Debug
        // only: a file being written in place is skipped on its create event, moments before it
        // loads; with no primary at all the reasons are in the error.
        match read_config(&file).and_then(|v| plugins_of(&file, &v).map(|p| p.len())) {
            Ok(n) if n > 0 => return Ok(Some(file)),
            Ok(_) => skipped.push(format!("{}: no plugins", file.display())),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    for why in &skipped {
        tracing::debug!("CNI network config skipped, as the runtime skips it: {why}");
    }
    if skipped.is_empty() {
        Ok(None)
    } else {
        Err(InstallError::NoPrimary {
            dir: dir.to_path_buf(),
            skipped: format!(
                " (skipped, as the runtime skips them: {})",
                skipped.join("; ")
            ),
        })
    }
}

/// A name the runtime loads as a network config (libcni's extensions).
fn is_config_name(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
}

fn read_config(path: &Path) -> Result<Value, InstallError> {
    read_config_as_of(path).map(|(config, _)| config)
}

/// Which version of a file was read: another writer's rename changes its inode, and an in-place
/// write its bytes (timestamps alone may not move: the kernel's file clock is coarse).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    bytes: Vec<u8>,
}

impl Version {
    /// The version at `path` now; None when there is no file (or it cannot be read).
    fn now(path: &Path) -> Option<Self> {
        Self::read(path).ok()
    }

    /// From one open file: the inode it is, and its bytes.
    fn read(path: &Path) -> io::Result<Self> {
        use std::io::Read as _;
        use std::os::unix::fs::MetadataExt as _;
        let mut file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(Version {
            dev: meta.dev(),
            ino: meta.ino(),
            bytes,
        })
    }
}

/// The config and the version it was read from.
fn read_config_as_of(path: &Path) -> Result<(Value, Version), InstallError> {
    let version = Version::read(path).map_err(|source| InstallError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config =
        serde_json::from_slice(&version.bytes).map_err(|source| InstallError::BadJson {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((config, version))
}

/// The plugin list of a config: `plugins` of a list, or the single network of a `.conf`.
fn plugins_of(path: &Path, config: &Value) -> Result<Vec<Value>, InstallError> {
    let bad = |field: &str, why: &str| InstallError::BadField {
        path: path.to_path_buf(),
        field: field.to_string(),
        why: why.to_string(),
    };
    let Some(obj) = config.as_object() else {
        return Err(bad("(top level)", "not an object"));
    };
    match obj.get("plugins") {
        Some(Value::Array(plugins)) => {
            for (i, p) in plugins.iter().enumerate() {
                if !p.get("type").is_some_and(Value::is_string) {
                    return Err(bad(
                        &format!("plugins[{i}].type"),
                        "missing or not a string",
                    ));
                }
            }
            Ok(plugins.clone())
        }
        Some(_) => Err(bad("plugins", "not a list")),
        None => match obj.get("type") {
            Some(Value::String(_)) => Ok(vec![config.clone()]),
            _ => Err(bad("type", "a single network config needs a type")),
        },
    }
}

/// The config with our entry as the last plugin (replacing any earlier one), as a conflist.
/// `config` is the file's parsed content; `path` names it in errors.
pub fn insert(path: &Path, config: &Value, entry: &Value) -> Result<Value, InstallError> {
    let mut plugins: Vec<Value> = plugins_of(path, config)?
        .into_iter()
        .filter(|p| !is_ours(p))
        .collect();
    let mut out = match config.get("plugins") {
        Some(_) => config.clone(),
        // A single network: the list takes its name and version, the network moves into it.
        None => {
            let mut single = config.as_object().cloned().unwrap_or_default();
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(v) = single.remove(key) {
                    list.insert(key.to_string(), v);
                }
            }
            plugins = vec![Value::Object(single)];
            Value::Object(list)
        }
    };
    plugins.push(entry.clone());
    out["plugins"] = Value::Array(plugins);
    Ok(out)
}

/// The config without our entry; None when it has none.
pub fn remove(path: &Path, config: &Value) -> Result<Option<Value>, InstallError> {
    let plugins = plugins_of(path, config)?;
    if !plugins.iter().any(is_ours) || config.get("plugins").is_none() {
        return Ok(None);
    }
    let mut out = config.clone();
    out["plugins"] = Value::Array(plugins.into_iter().filter(|p| !is_ours(p)).collect());
    Ok(Some(out))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Writes `value` to `path` through a temp file in the same dir and a rename.
fn write_atomic(path: &Path, value: &Value) -> Result<(), InstallError> {
    write_atomic_if(path, value, || true).map(|_| ())
}

/// [`write_atomic`] if `still` holds once the temp file is written (just before the rename);
/// false when it did not (the temp file is removed).
fn write_atomic_if(
    path: &Path,
    value: &Value,
    still: impl Fn() -> bool,
) -> Result<bool, InstallError> {
    let err = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot name the runtime ignores (no .conf/.conflist/.json suffix).
    let tmp = temp_name(path, &name);
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| err(io::Error::other(e)))?;
    text.push(b'\n');
    write_new(&tmp, &text, 0o644).map_err(err)?;
    if !still() {
        let _ = std::fs::remove_file(&tmp);
        return Ok(false);
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(true)
}

/// A temp file next to `path` named after this process: two agents of a node (an upgrade's old
/// and new one) never write the same temp file, so neither renames the other's half-written one.
pub(crate) fn temp_name(path: &Path, name: &str) -> PathBuf {
    path.with_file_name(format!(".{name}.ambit-tmp.{}", std::process::id()))
}

/// Writes `bytes` to a new file at `tmp` with `mode`: whatever is at `tmp` (a leftover of a
/// crash, or a symlink planted there) is removed first, and the file is created exclusively, so
/// the write never follows a symlink out of the dir.
pub(crate) fn write_new(tmp: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)?;
    // The umask may have taken bits off `mode`.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Copies the plugin binary into the bin dir (temp file + rename: a runtime executing the old
/// one keeps it) unless the same bytes are there.
pub fn install_binary(cfg: &InstallConfig) -> Result<bool, InstallError> {
    install_binary_as(cfg, Takeover::Yes)
}

/// Whether a pass replaces another agent's binary and entry with its own. During an upgrade two
/// agents of a node watch the same dirs for a while (the old one drains): the one that started
/// last takes over once, at its first pass; later passes only put back what is missing, or the
/// two would rewrite each other's version on each other's events without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takeover {
    Yes,
    OnlyMissing,
}

fn install_binary_as(cfg: &InstallConfig, takeover: Takeover) -> Result<bool, InstallError> {
    let to = cfg.bin_dir.join(PLUGIN_TYPE);
    if takeover == Takeover::OnlyMissing && to.is_file() {
        return Ok(false);
    }
    let err = |source| InstallError::Binary {
        from: cfg.plugin.clone(),
        to: to.clone(),
        source,
    };
    let new = std::fs::read(&cfg.plugin).map_err(err)?;
    if std::fs::read(&to).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    let tmp = temp_name(&to, PLUGIN_TYPE);
    write_new(&tmp, &new, 0o755).map_err(err)?;
    std::fs::rename(&tmp, &to).map_err(err)?;
    Ok(true)
}

/// One pass: the binary in place, our entry in the primary config. Returns the primary config
/// file when something was written.
///
/// The primary CNI may write its file while we do: our write replaces the file only if it is
/// still the version we read (checked just before the rename), else the pass starts over, so a
/// newer primary config is never overwritten with our copy of the older one (istio-cni's
/// installer renames without that check).
pub fn install_once(cfg: &InstallConfig) -> Result<Option<PathBuf>, InstallError> {
    install_as(cfg, Takeover::Yes)
}

/// [`install_once`] for a later pass of [`watch`]: puts back a missing binary or entry, and
/// leaves another agent's in place ([`Takeover`]).
fn install_again(cfg: &InstallConfig) -> Result<Option<PathBuf>, InstallError> {
    install_as(cfg, Takeover::OnlyMissing)
}

fn install_as(cfg: &InstallConfig, takeover: Takeover) -> Result<Option<PathBuf>, InstallError> {
    let _one_at_a_time = PASSES.lock().unwrap_or_else(PoisonError::into_inner);
    if cfg.uninstalled.is_set() {
        return Ok(None);
    }
    install_binary_as(cfg, takeover)?;
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let Some(file) = primary_file(&cfg.conf_dir)? else {
            return Err(InstallError::NoPrimary {
                dir: cfg.conf_dir.clone(),
                skipped: String::new(),
            });
        };
        let file = rewritten_single(&file).unwrap_or(file);
        let Some(plan) = Plan::make(cfg, &file, takeover)? else {
            return Ok(None);
        };
        if let Some(target) = plan.commit()? {
            return Ok(Some(target));
        }
    }
    Err(InstallError::Busy {
        path: cfg.conf_dir.clone(),
        attempts: ATTEMPTS,
    })
}

/// `x.json` when `file` is our `x.conflist` and the primary CNI has written its single network
/// `x.json` again since we converted it: the runtime (and [`primary_file`]) goes on using our
/// list, which sorts first, and would never see the primary's new config. (A new `x.conf` sorts
/// before `x.conflist`, so it is the primary file by itself.)
fn rewritten_single(file: &Path) -> Option<PathBuf> {
    if file.extension()? != "conflist" {
        return None;
    }
    let single = file.with_extension("json");
    let config = read_config(&single).ok()?;
    let is_single =
        config.get("plugins").is_none() && !plugins_of(&single, &config).ok()?.is_empty();
    let ours = plugins_of(file, &read_config(file).ok()?)
        .ok()?
        .iter()
        .any(is_ours);
    (is_single && ours).then_some(single)
}

/// One pass's write: the config with our entry, for the version of the primary file it was made
/// from.
struct Plan {
    file: PathBuf,
    read: Version,
    target: PathBuf,
    wanted: Value,
}

impl Plan {
    /// None when the file already holds our entry; also, with [`Takeover::OnlyMissing`], when it
    /// holds any entry of ours (another agent's).
    fn make(
        cfg: &InstallConfig,
        file: &Path,
        takeover: Takeover,
    ) -> Result<Option<Plan>, InstallError> {
        let (config, read) = read_config_as_of(file)?;
        if takeover == Takeover::OnlyMissing && plugins_of(file, &config)?.iter().any(is_ours) {
            return Ok(None);
        }
        let wanted = insert(file, &config, &cfg.entry())?;
        let is_list = file.extension().is_some_and(|e| e == "conflist");
        if is_list && wanted == config {
            return Ok(None);
        }
        let target = if is_list {
            file.to_path_buf()
        } else {
            file.with_extension("conflist")
        };
        Ok(Some(Plan {
            file: file.to_path_buf(),
            read,
            target,
            wanted,
        }))
    }

    /// Writes the target; None (nothing changed) when the primary file is no longer the version
    /// read.
    fn commit(self) -> Result<Option<PathBuf>, InstallError> {
        let unchanged = || Version::now(&self.file).as_ref() == Some(&self.read);
        if !write_atomic_if(&self.target, &self.wanted, unchanged)? {
            return Ok(None);
        }
        if self.target != self.file {
            // `x.conf` became `x.conflist`: `x.conf` goes only if it is still what we converted;
            // else our list goes again, and the runtime keeps the primary's new `x.conf`.
            if !unchanged() {
                let _ = std::fs::remove_file(&self.target);
                return Ok(None);
            }
            std::fs::remove_file(&self.file).map_err(|source| InstallError::Write {
                path: self.file.clone(),
                source,
            })?;
        }
        Ok(Some(self.target))
    }
}

/// Held by each pass and by [`uninstall`]: a pass of [`watch`] runs on the blocking pool, and one
/// still running when the agent uninstalls must not put the entry back after its removal (passes
/// start only while the control runtime runs; uninstalling is after it stopped).
static PASSES: Mutex<()> = Mutex::new(());

/// Removes our entry from every config in the conf dir, and the binary.
pub fn uninstall(cfg: &InstallConfig) -> Result<(), InstallError> {
    // Before the lock: a pass that takes it after this sees the flag and installs nothing; one
    // holding it now finishes first, and its writes are then undone here.
    cfg.uninstalled.set();
    let _one_at_a_time = PASSES.lock().unwrap_or_else(PoisonError::into_inner);
    let entries = std::fs::read_dir(&cfg.conf_dir).map_err(|source| InstallError::ReadDir {
        path: cfg.conf_dir.clone(),
        source,
    })?;
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        // A file we cannot read is not ours to fix; the others are still cleaned.
        let Ok(config) = read_config(&path) else {
            continue;
        };
        if let Some(cleaned) = remove(&path, &config)? {
            write_atomic(&path, &cleaned)?;
            info!(file = %path.display(), "removed ambit-cni from the CNI config");
        }
    }
    match std::fs::remove_file(cfg.bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(InstallError::Write {
            path: cfg.bin_dir.join(PLUGIN_TYPE),
            source,
        }),
    }
}

/// Keeps the plugin installed: once `ready` holds (the agent has written its node state, so the
/// plugin can decide for non-ambient pods), then again as soon as the primary CNI writes its
/// config or a new one appears: on the conf dir's inotify events (as istio-cni re-inserts on
/// fsnotify events), and every `poll` while the dir is not watched (it may not exist yet, inotify
/// may be unavailable); with the watch armed, every [`ARMED_POLL`] (`poll` if longer) only. Each
/// pass runs on the blocking pool (it reads, writes and syncs files). Problems are logged once
/// each until they clear.
pub async fn watch(cfg: InstallConfig, poll: Duration, ready: impl Fn() -> bool) {
    watch_reporting(cfg, poll, ready, |_| {}).await
}

/// [`watch`], handing each pass's outcome to `report` (tests observe the passes with it).
async fn watch_reporting(
    cfg: InstallConfig,
    poll: Duration,
    ready: impl Fn() -> bool,
    mut report: impl FnMut(&Result<Option<PathBuf>, InstallError>),
) {
    // `interval` refuses a zero period.
    let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = match DirEvents::new(&cfg.conf_dir, &cfg.bin_dir) {
        Ok(events) => Some(events),
        Err(e) => {
            warn!(error = %e, poll = ?poll, "no inotify; polling the CNI conf dir");
            None
        }
    };
    let mut last_error: Option<String> = None;
    let mut last_pass: Option<tokio::time::Instant> = None;
    // The first pass that works takes over from another agent; later ones only put back.
    let mut installed = false;
    loop {
        // The first tick is at once: the first pass runs after the watch is armed, so no write
        // falls between the two.
        let (woken, by_event) = tokio::select! {
            _ = ticker.tick() => (Ok(()), false),
            woken = next_event(&mut events) => (woken, true),
        };
        if let Err(e) = woken {
            warn!(error = %e, poll = ?poll, "inotify on the CNI conf dir failed; polling it");
            events = None;
        }
        let was_armed = events.as_ref().is_some_and(DirEvents::armed);
        if let Some(events) = &mut events {
            events.arm();
        }
        // A tick while the watch was armed all along: its events call for the passes. The tick
        // that arms it passes (what was written before the watch has no event).
        let recent = last_pass.is_some_and(|at| at.elapsed() < ARMED_POLL.max(poll));
        if !by_event && was_armed && recent {
            continue;
        }
        if !ready() {
            continue;
        }
        last_pass = Some(tokio::time::Instant::now());
        let pass_cfg = cfg.clone();
        let pass = if installed {
            install_again
        } else {
            install_once
        };
        let outcome = tokio::task::spawn_blocking(move || pass(&pass_cfg))
            .await
            .unwrap_or_else(|e| Err(InstallError::Pass(e.to_string())));
        installed |= outcome.is_ok();
        match &outcome {
            Ok(Some(file)) => {
                info!(file = %file.display(), bin_dir = %cfg.bin_dir.display(), "ambit-cni installed in the node's CNI config");
                last_error = None;
            }
            Ok(None) => last_error = None,
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    warn!(error = %msg, "cannot install ambit-cni yet; new pods are not held until enrolled");
                    last_error = Some(msg);
                }
            }
        }
        report(&outcome);
    }
}

#[cfg(test)]
mod tests;
