//! `FileSource`: the file source as the agent polls it. Each poll walks the path (metadata only),
//! re-reads just the files that are new or changed, and emits one `Replace` of the whole set
//! when anything changed. A path that cannot be read emits nothing at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::walk::{yaml_files, Fingerprint};
use super::{load_file, FileError, Loaded};
use crate::config::{ObjectError, ObjectRef, Rejected, SourceEvent};

/// What one file gave at its last read.
struct FileState {
    fingerprint: Fingerprint,
    loaded: Loaded,
    /// Objects the file held at its last complete read: kept while it is broken.
    last_good: BTreeSet<ObjectRef>,
    /// Why the file is out of sight now (a directory on its way could not be read).
    hidden: Option<String>,
}

/// A file or directory watched by polling (metadata only when nothing changed, so cheap):
/// robust on every filesystem, including ConfigMap volumes whose files are swapped through
/// symlinks.
pub struct FileSource {
    path: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    walk_errors: Vec<(PathBuf, FileError)>,
    /// Problems of the last poll: the path itself, unreadable entries, files and documents.
    pub file_errors: Vec<FileError>,
    unavailable: Option<String>,
    /// Whether the last `Replace` reflects the current files (not before the first one, nor
    /// after the path was unavailable).
    in_sync: bool,
    reads: u64,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        FileSource {
            path: path.to_path_buf(),
            files: BTreeMap::new(),
            walk_errors: Vec::new(),
            file_errors: Vec::new(),
            unavailable: None,
            in_sync: false,
            reads: 0,
        }
    }

    /// Why the config path itself could not be read at the last poll (it does not exist, is
    /// neither a file nor a directory, or an I/O error); `None` once it was read.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// How many times a file was read since start.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// A `Replace` of every kind if anything changed since the last call. Nothing while the path
    /// cannot be read: a `Replace` of nothing would delete every object (and unenrol every pod)
    /// because of an unmounted volume; the last state stays until the path is back.
    pub fn poll(&mut self) -> Option<SourceEvent> {
        let walk = match yaml_files(&self.path) {
            Ok(w) => w,
            Err(e) => {
                if self.unavailable.as_deref() != Some(e.message.as_str()) {
                    warn!(problem = %e, "config path unavailable; keeping the last config");
                }
                self.unavailable = Some(e.message.clone());
                self.file_errors = vec![e];
                self.in_sync = false;
                return None;
            }
        };
        if self.unavailable.take().is_some() {
            info!(path = %self.path.display(), "config path available again");
        }
        let mut changed = !self.in_sync || walk.errors != self.walk_errors;
        let mut previous = std::mem::take(&mut self.files);
        for (path, fingerprint) in walk.files {
            let state = match previous.remove(&path) {
                Some(mut same) if same.fingerprint == fingerprint => {
                    same.hidden = None;
                    same
                }
                prev => {
                    changed = true;
                    let last_good = prev.map(|s| s.last_good).unwrap_or_default();
                    self.read(&path, fingerprint, last_good)
                }
            };
            self.files.insert(path, state);
        }
        // Not listed any more: gone, unless a directory on the way could not be read.
        for (path, mut state) in previous {
            match walk.errors.iter().find(|(p, _)| path.starts_with(p)) {
                Some((_, e)) => {
                    state.hidden = Some(e.to_string());
                    self.files.insert(path, state);
                }
                None => changed = true,
            }
        }
        self.walk_errors = walk.errors;
        if !changed {
            return None;
        }
        self.in_sync = true;
        let (event, errors) = self.assemble();
        self.file_errors = errors;
        Some(event)
    }

    /// Reads and parses one file. `listed` is its fingerprint from the walk, kept when the file
    /// cannot be read, so that it is read again only once it changes.
    fn read(
        &mut self,
        path: &Path,
        listed: Fingerprint,
        last_good: BTreeSet<ObjectRef>,
    ) -> FileState {
        self.reads += 1;
        debug!(path = %path.display(), "reading a new or changed config file");
        let mut loaded = Loaded::default();
        let fingerprint = load_file(&mut loaded, path).unwrap_or(listed);
        let last_good = if loaded.broken.is_empty() {
            loaded.by_file.get(path).cloned().unwrap_or_default()
        } else {
            last_good
        };
        FileState {
            fingerprint,
            loaded,
            last_good,
            hidden: None,
        }
    }

    /// Every file's objects as one `Replace`, and every problem. Objects a broken or hidden file
    /// held at its last good read are reported as rejected, so that the store keeps their last
    /// good version instead of deleting them.
    fn assemble(&self) -> (SourceEvent, Vec<FileError>) {
        let mut out = Loaded::default();
        let mut errors: Vec<FileError> = self.walk_errors.iter().map(|(_, e)| e.clone()).collect();
        for (path, state) in &self.files {
            let (now, why) = match &state.hidden {
                Some(why) => (BTreeSet::new(), Some(why.clone())),
                None => {
                    let l = &state.loaded;
                    out.objects.extend(l.objects.iter().cloned());
                    out.rejected.extend(l.rejected.iter().cloned());
                    out.origins
                        .extend(l.origins.iter().map(|(r, o)| (r.clone(), o.clone())));
                    errors.extend(l.file_errors.iter().cloned());
                    let why = (!l.broken.is_empty()).then(|| {
                        l.file_errors
                            .first()
                            .map(ToString::to_string)
                            .unwrap_or_else(|| path.display().to_string())
                    });
                    (l.by_file.get(path).cloned().unwrap_or_default(), why)
                }
            };
            let Some(why) = why else { continue };
            for r in state.last_good.difference(&now) {
                let e = ObjectError::new(
                    r,
                    "",
                    format!("not readable now ({why}); last good version kept"),
                );
                out.rejected.push(Rejected::new(r.clone(), vec![e]));
            }
        }
        (out.into_event(), errors)
    }
}
