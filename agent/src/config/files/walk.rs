//! The filesystem side of the file source: which YAML files a path holds (each real directory
//! walked once and each real file listed once, however many symlinks lead to them), what each
//! one looks like now (a fingerprint from its metadata), and reading one within the size limit.

use std::collections::HashSet;
use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use tracing::debug;

use super::bounds::{BoundsError, MAX_FILE_BYTES};
use super::FileError;

/// What a file looks like without reading it: which file it is (a ConfigMap update swaps the
/// file behind the same name), when and how it was last written, and when its metadata last
/// changed (a `chmod` that makes it readable changes no mtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub size: u64,
}

impl Fingerprint {
    fn of(m: &std::fs::Metadata) -> Self {
        Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            size: m.len(),
        }
    }
}

/// The YAML files under a path, sorted, and what could not be looked at.
#[derive(Debug, Default)]
pub struct Walk {
    pub files: Vec<(PathBuf, Fingerprint)>,
    /// A directory or file that could not be read, with why. Files under it may be missing
    /// from `files` for that reason alone.
    pub errors: Vec<(PathBuf, FileError)>,
}

/// Why a path could not be walked or read.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot read the config path: {source}")]
    Root {
        #[source]
        source: std::io::Error,
    },
    #[error("the config path is neither a directory nor a regular file")]
    RootKind,
    #[error("cannot read: {source}")]
    Io {
        #[source]
        source: std::io::Error,
    },
    #[error("not a regular file; not read")]
    NotRegular,
    #[error("not UTF-8 text: {source}")]
    NotUtf8 {
        #[source]
        source: std::string::FromUtf8Error,
    },
    #[error(transparent)]
    Bounds(#[from] BoundsError),
}

impl WalkError {
    fn at(self, path: &Path) -> FileError {
        FileError {
            path: path.display().to_string(),
            message: self.to_string(),
        }
    }
}

/// The YAML files (`.yaml`, `.yml`, `.json`) under `path`: the path itself if it is a file, else
/// every file of the directory and its subdirectories, hidden entries skipped (a ConfigMap
/// volume's `..data` and timestamped directories among them: its visible names are symlinks
/// into them). Symlinks are followed, but a directory already walked is not walked again and a
/// file already listed is not listed again, so no link can loop or read a file twice; the first
/// path in sorted order names it. Fails only if `path` itself cannot be read.
pub fn yaml_files(path: &Path) -> Result<Walk, FileError> {
    let meta = std::fs::metadata(path).map_err(|source| WalkError::Root { source }.at(path))?;
    if meta.is_file() {
        return Ok(Walk {
            files: vec![(path.to_path_buf(), Fingerprint::of(&meta))],
            errors: Vec::new(),
        });
    }
    if !meta.is_dir() {
        return Err(WalkError::RootKind.at(path));
    }
    let root = list(path).map_err(|source| WalkError::Root { source }.at(path))?;
    let mut walk = Walk::default();
    let mut dirs = HashSet::from([(meta.dev(), meta.ino())]);
    let mut files = HashSet::new();
    // Depth first, entries in name order: a stack of each directory's remaining entries.
    let mut stack = vec![root.into_iter()];
    while let Some(entries) = stack.last_mut() {
        let Some(p) = entries.next() else {
            stack.pop();
            continue;
        };
        let yaml = is_yaml(&p);
        match std::fs::metadata(&p) {
            Err(source) if yaml => {
                let e = WalkError::Io { source }.at(&p);
                walk.errors.push((p, e));
            }
            // A dangling link or unreadable entry that is not named as a config file.
            Err(e) => debug!(path = %p.display(), error = %e, "skipped"),
            Ok(m) if m.is_dir() => {
                if !dirs.insert((m.dev(), m.ino())) {
                    debug!(path = %p.display(), "directory already walked");
                    continue;
                }
                match list(&p) {
                    Ok(children) => stack.push(children.into_iter()),
                    Err(source) => {
                        let e = WalkError::Io { source }.at(&p);
                        walk.errors.push((p, e));
                    }
                }
            }
            Ok(m) if yaml && !m.is_file() => {
                let e = WalkError::NotRegular.at(&p);
                walk.errors.push((p, e));
            }
            Ok(m) if yaml => {
                if files.insert((m.dev(), m.ino())) {
                    walk.files.push((p, Fingerprint::of(&m)));
                } else {
                    debug!(path = %p.display(), "file already listed under another name");
                }
            }
            Ok(_) => {}
        }
    }
    walk.files.sort_by(|a, b| a.0.cmp(&b.0));
    walk.errors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(walk)
}

/// The visible entries of a directory, sorted by name.
fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().as_bytes().first() != Some(&b'.') {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn is_yaml(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads a file's text, refusing one over `MAX_FILE_BYTES` from its metadata before reading it.
/// Returns the fingerprint of what was read (the file may have changed since it was listed).
pub fn read(path: &Path) -> Result<(String, Fingerprint), FileError> {
    read_inner(path).map_err(|e| e.at(path))
}

fn read_inner(path: &Path) -> Result<(String, Fingerprint), WalkError> {
    let io = |source| WalkError::Io { source };
    // Non-blocking, so that a FIFO swapped in after the walk cannot block the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(WalkError::NotRegular);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(BoundsError::FileTooLarge { bytes: meta.len() }.into());
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(BoundsError::FileTooLarge {
            bytes: buf.len() as u64,
        }
        .into());
    }
    let text = String::from_utf8(buf).map_err(|source| WalkError::NotUtf8 { source })?;
    Ok((text, Fingerprint::of(&meta)))
}
