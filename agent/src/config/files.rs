//! The file source: a YAML file or a directory of them (read recursively), multi-document, with
//! Kubernetes `List`s unpacked; local mode's control plane and the test bed. Reloaded when any file
//! changes; each reload is one `SourceEvent::Replace`, so the store applies it atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use tracing::debug;

use super::{parse, Kind, Object, ObjectError, ObjectRef, Parsed, SourceEvent};

/// A problem that belongs to a file rather than to one object (unreadable, bad YAML syntax).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{path}: {message}")]
pub struct FileError {
    pub path: String,
    pub message: String,
}

/// What one load of the files produced.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub rejected: Vec<(ObjectRef, Vec<ObjectError>)>,
    pub origins: BTreeMap<ObjectRef, String>,
    pub file_errors: Vec<FileError>,
    /// Objects of each file, for keeping the last good version when a file breaks.
    pub by_file: BTreeMap<PathBuf, BTreeSet<ObjectRef>>,
    /// Files that could not be read completely.
    pub broken: BTreeSet<PathBuf>,
}

impl Loaded {
    /// Everything loaded, as one atomic replacement of every kind.
    pub fn into_event(self) -> SourceEvent {
        SourceEvent::Replace {
            kinds: Kind::ALL.to_vec(),
            objects: self.objects,
            rejected: self.rejected,
            origins: self.origins,
        }
    }
}

/// YAML files under `path` (a file, or a directory read recursively), sorted for a stable order.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, FileError> {
    let err = |e: std::io::Error| FileError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(err)? {
        let p = entry.map_err(err)?.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            out.extend(yaml_files(&p)?);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and parses everything under `path`. Never fails as a whole: every problem is reported
/// with its file (and document), and the rest is read.
pub fn load(path: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let files = match yaml_files(path) {
        Ok(f) => f,
        Err(e) => {
            loaded.file_errors.push(e);
            loaded.broken.insert(path.to_path_buf());
            return loaded;
        }
    };
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_text(&mut loaded, &file, &text),
            Err(e) => {
                loaded.file_errors.push(FileError {
                    path: file.display().to_string(),
                    message: e.to_string(),
                });
                loaded.broken.insert(file);
            }
        }
    }
    loaded
}

/// Parses one file's text into `loaded`.
pub fn load_text(loaded: &mut Loaded, file: &Path, text: &str) {
    let refs = loaded.by_file.entry(file.to_path_buf()).or_default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let location = format!("{}: document {}", file.display(), i + 1);
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                // A syntax error ends the stream: serde_yaml cannot resynchronise after it.
                loaded.file_errors.push(FileError {
                    path: location,
                    message: e.to_string(),
                });
                loaded.broken.insert(file.to_path_buf());
                break;
            }
        };
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => value
                .get("items")
                .and_then(|i| i.as_array())
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for v in items {
            match parse(v) {
                Parsed::Object(o) => {
                    refs.insert(o.object_ref());
                    loaded.origins.insert(o.object_ref(), location.clone());
                    loaded.objects.push(o);
                }
                Parsed::Ignored { api_version, kind } => {
                    debug!(%location, %api_version, %kind, "ignoring a kind ambit does not read");
                }
                Parsed::Rejected(r, mut errors) => {
                    for e in &mut errors {
                        e.location = Some(location.clone());
                    }
                    refs.insert(r.clone());
                    loaded.rejected.push((r, errors));
                }
            }
        }
    }
}

/// A directory watched by polling (metadata only, so cheap): robust on every filesystem,
/// including ConfigMap volumes whose files are swapped through symlinks.
pub struct FileSource {
    path: PathBuf,
    seen: Option<Vec<(PathBuf, SystemTime, u64)>>,
    /// Objects each file held at its last good read.
    last_good: BTreeMap<PathBuf, BTreeSet<ObjectRef>>,
    pub file_errors: Vec<FileError>,
    /// Why the root could not be read at the last poll (None once it could).
    unavailable: Option<String>,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        FileSource {
            path: path.to_path_buf(),
            seen: None,
            last_good: BTreeMap::new(),
            file_errors: Vec::new(),
            unavailable: Some("not read yet".into()),
        }
    }

    /// Why the config path could not be read at the last poll; None once it was read.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// A `Replace` of every kind if anything changed since the last call.
    pub fn poll(&mut self) -> Option<SourceEvent> {
        // An unreadable root is not an empty cluster: a Replace with nothing would delete every
        // object and unenrol every pod (fail open). Nothing is emitted until it can be read.
        if let Err(e) = yaml_files(&self.path) {
            self.unavailable = Some(e.to_string());
            self.file_errors = vec![e];
            self.seen = None;
            return None;
        }
        self.unavailable = None;
        let now = fingerprint(&self.path);
        if self.seen.as_ref() == Some(&now) {
            return None;
        }
        self.seen = Some(now);
        let mut loaded = load(&self.path);
        // Objects of a file that could not be read completely keep their last good version:
        // report them as rejected rather than letting the Replace delete them.
        for file in &loaded.broken {
            let now_in_file = loaded.by_file.get(file).cloned().unwrap_or_default();
            let msg = loaded
                .file_errors
                .iter()
                .find(|e| e.path.starts_with(&file.display().to_string()))
                .map(|e| e.to_string())
                .unwrap_or_default();
            let kept: Vec<ObjectRef> = self
                .last_good
                .iter()
                .filter(|(f, _)| f.starts_with(file))
                .flat_map(|(_, refs)| refs.iter())
                .filter(|r| !now_in_file.contains(r))
                .cloned()
                .collect();
            for r in kept {
                let e = ObjectError::new(
                    &r,
                    "",
                    format!("not readable now ({msg}); last good version kept"),
                );
                loaded.rejected.push((r, vec![e]));
            }
        }
        for (file, refs) in &loaded.by_file {
            if !loaded.broken.contains(file) {
                self.last_good.insert(file.clone(), refs.clone());
            }
        }
        self.last_good.retain(|f, _| {
            loaded.by_file.contains_key(f) || loaded.broken.iter().any(|b| f.starts_with(b))
        });
        self.file_errors = std::mem::take(&mut loaded.file_errors);
        Some(loaded.into_event())
    }
}

fn fingerprint(path: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    yaml_files(path)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| {
            let m = std::fs::metadata(&f).ok()?;
            Some((f, m.modified().ok()?, m.len()))
        })
        .collect()
}

/// `ambit check`: every problem in the files at `path`, as the agent would report them (file
/// errors, then object errors with their file and document), without touching the node.
pub fn check(path: &Path) -> Vec<String> {
    let mut loaded = load(path);
    let mut problems: Vec<String> = std::mem::take(&mut loaded.file_errors)
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut store = crate::state::store::Store::new(super::DEFAULT_DOMAIN);
    store.apply(loaded.into_event());
    problems.extend(store.errors().iter().map(ToString::to_string));
    problems
}
