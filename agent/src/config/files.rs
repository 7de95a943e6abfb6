//! The file source: a YAML file or a directory of them (read recursively), multi-document, with
//! Kubernetes `List`s unpacked; local mode's control plane and the test bed. Polled: a file is
//! re-read only when its metadata changes, and each change of the set is one
//! `SourceEvent::Replace`, so the store applies it atomically. Every input is bounded before the
//! YAML parser sees it (`bounds`): no file can stall the others.

mod bounds;
mod depth;
mod source;
mod walk;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::debug;

use super::{parse, Kind, Object, ObjectRef, Parsed, Rejected, SourceEvent};

pub use bounds::{BoundsError, MAX_DEPTH, MAX_DOCUMENT_BYTES, MAX_FILE_BYTES};
pub use source::FileSource;
pub use walk::{yaml_files, Fingerprint, Walk, WalkError};

/// A problem that belongs to a file rather than to one object (unreadable, too large, bad YAML
/// syntax). `path` names the file, and the document when the problem is in one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{path}: {message}")]
pub struct FileError {
    pub path: String,
    pub message: String,
}

/// What one load of the files produced.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub rejected: Vec<Rejected>,
    pub origins: BTreeMap<ObjectRef, String>,
    pub file_errors: Vec<FileError>,
    /// Objects of each file, for keeping the last good version when a file breaks.
    pub by_file: BTreeMap<PathBuf, BTreeSet<ObjectRef>>,
    /// Files (or directories) that could not be read completely.
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

/// Reads and parses everything under `path`. Never fails as a whole: every problem is reported
/// with its file (and document), and the rest is read.
pub fn load(path: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let walk = match yaml_files(path) {
        Ok(w) => w,
        Err(e) => {
            loaded.file_errors.push(e);
            loaded.broken.insert(path.to_path_buf());
            return loaded;
        }
    };
    for (p, e) in walk.errors {
        loaded.file_errors.push(e);
        loaded.broken.insert(p);
    }
    for (file, _) in walk.files {
        load_file(&mut loaded, &file);
    }
    loaded
}

/// Reads one file (within the size limit) and parses it into `loaded`.
fn load_file(loaded: &mut Loaded, file: &Path) -> Option<Fingerprint> {
    match walk::read(file) {
        Ok((text, fingerprint)) => {
            load_text(loaded, file, &text);
            Some(fingerprint)
        }
        Err(e) => {
            loaded.file_errors.push(e);
            loaded.by_file.entry(file.to_path_buf()).or_default();
            loaded.broken.insert(file.to_path_buf());
            None
        }
    }
}

/// Parses one file's text into `loaded`, each document with a parser of its own after checking
/// its bounds: a document too large, too deep or with a syntax error is reported (naming the
/// file and the document) and the file counts as broken, but the documents after it are read.
pub fn load_text(loaded: &mut Loaded, file: &Path, text: &str) {
    let mut refs = loaded.by_file.remove(file).unwrap_or_default();
    let mut n = 0;
    let fail = |loaded: &mut Loaded, n: usize, message: String| {
        loaded.file_errors.push(FileError {
            path: format!("{}: document {n}", file.display()),
            message,
        });
        loaded.broken.insert(file.to_path_buf());
    };
    for doc in bounds::documents(text) {
        if let Err(e) = doc.check() {
            n += 1;
            fail(loaded, n, e.to_string());
            continue;
        }
        for de in serde_yaml::Deserializer::from_str(doc.text) {
            n += 1;
            match serde_json::Value::deserialize(de) {
                Ok(serde_json::Value::Null) => {}
                Ok(value) => {
                    let location = format!("{}: document {n}", file.display());
                    add_value(loaded, &mut refs, &location, value);
                }
                Err(e) => {
                    // A syntax error ends libyaml's stream: the rest of this document is lost,
                    // the next document has a parser of its own.
                    fail(
                        loaded,
                        n,
                        bounds::file_lines(&e.to_string(), doc.first_line),
                    );
                    break;
                }
            }
        }
    }
    loaded.by_file.insert(file.to_path_buf(), refs);
}

/// One document's value: an object, or a `List` of them.
fn add_value(
    loaded: &mut Loaded,
    refs: &mut BTreeSet<ObjectRef>,
    location: &str,
    value: serde_json::Value,
) {
    let items = match value.get("kind").and_then(|k| k.as_str()) {
        Some("List") => match value {
            serde_json::Value::Object(mut m) => match m.remove("items") {
                Some(serde_json::Value::Array(items)) => items,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        },
        _ => vec![value],
    };
    for v in items {
        match parse(v) {
            Parsed::Object(o) => {
                refs.insert(o.object_ref());
                loaded.origins.insert(o.object_ref(), location.to_string());
                loaded.objects.push(o);
            }
            Parsed::Ignored { api_version, kind } => {
                debug!(%location, %api_version, %kind, "ignoring a kind ambit does not read");
            }
            Parsed::Rejected(mut r) => {
                for e in &mut r.errors {
                    e.location = Some(location.to_string());
                }
                refs.insert(r.object.clone());
                loaded.rejected.push(r);
            }
        }
    }
}
