//! Limits a config file must keep before the YAML parser sees it, and the split of a file into
//! its documents, so that one bad document neither costs unbounded time nor hides the next ones.

use super::depth;

/// Largest config file read, checked from its metadata before reading. Several documents'
/// worth (a `kubectl get -o yaml` dump of a small cluster fits); parsing this much takes about
/// a second, once per change of the file.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Largest document parsed. The Kubernetes API server refuses request bodies over 3 MiB (and
/// etcd's default object limit is 1.5 MiB), so no object it would accept is refused here.
pub const MAX_DOCUMENT_BYTES: usize = 3 << 20;
/// Deepest nesting of a document (block levels plus flow collections). Kubernetes and Istio
/// objects nest about 10 levels deep; libyaml's scanner costs time quadratic in flow nesting
/// (see `depth`), and serde_yaml refuses more than 128 levels anyway, only after scanning.
pub const MAX_DEPTH: usize = 64;

/// Why a document or a file is refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("{bytes} bytes, over the limit of {} MiB for a config file; not read", MAX_FILE_BYTES >> 20)]
    FileTooLarge { bytes: u64 },
    #[error(
        "{bytes} bytes, over the limit of {} MiB for one document (the Kubernetes API server's own limit); not parsed",
        MAX_DOCUMENT_BYTES >> 20
    )]
    DocumentTooLarge { bytes: usize },
    #[error("nested deeper than {MAX_DEPTH} levels at line {line} column {column}; not parsed")]
    TooDeep { line: usize, column: usize },
}

/// One document of a file: its text, for a parser of its own, and the line it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Document<'a> {
    pub text: &'a str,
    /// Lines of the file before this document (to report the file's line numbers).
    pub first_line: usize,
}

impl Document<'_> {
    /// Refuses a document too large or too deep for the parser.
    pub fn check(&self) -> Result<(), BoundsError> {
        if self.text.len() > MAX_DOCUMENT_BYTES {
            return Err(BoundsError::DocumentTooLarge {
                bytes: self.text.len(),
            });
        }
        match depth::measure(self.text, MAX_DEPTH).over {
            Some(at) => Err(BoundsError::TooDeep {
                line: self.first_line + at.line,
                column: at.column,
            }),
            None => Ok(()),
        }
    }
}

/// Splits `text` before every `---` line, as libyaml does: `---` at the start of a line followed
/// by a blank or the line's end always starts a document (inside a quoted scalar it is an error,
/// and it always ends a block scalar, whose lines are indented). Comments, blank lines and `%`
/// directives before a document stay with it. A document may still hold more than one (after a
/// `...` end marker): the caller's parser reads them all.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    let bytes = text.as_bytes();
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0, 0);
    // Whether the current document holds only comments, blank lines and directives so far.
    let mut prelude = true;
    // After a `...` line: where the run of comment/blank/directive lines after it began, which
    // belongs to the next document (its directives do).
    let mut after_end: Option<(usize, usize)> = None;
    let (mut pos, mut line) = (0, 0);
    while pos < bytes.len() {
        let (end, next) = line_end(bytes, pos);
        let mut l = &bytes[pos..end];
        if pos == 0 {
            // libyaml's reader drops a byte order mark at the start of the stream.
            l = l.strip_prefix("\u{feff}".as_bytes()).unwrap_or(l);
        }
        let marker = |m: &[u8]| l.starts_with(m) && matches!(l.get(3), None | Some(b' ' | b'\t'));
        if marker(b"---") {
            if !prelude {
                let (at, at_line) = after_end.unwrap_or((pos, line));
                docs.push(Document {
                    text: &text[start..at],
                    first_line: start_line,
                });
                (start, start_line) = (at, at_line);
            }
            prelude = false;
            after_end = None;
        } else if marker(b"...") {
            after_end = Some((next, line + 1));
        } else if !is_prelude(l) {
            prelude = false;
            after_end = None;
        }
        pos = next;
        line += 1;
    }
    if start < bytes.len() || docs.is_empty() {
        docs.push(Document {
            text: &text[start..],
            first_line: start_line,
        });
    }
    docs
}

/// A blank line, a comment or a directive.
fn is_prelude(l: &[u8]) -> bool {
    let t = l.trim_ascii_start();
    t.is_empty() || t[0] == b'#' || l[0] == b'%'
}

/// The end of the line starting at `pos` and where the next one starts, with libyaml's line
/// breaks: CR LF, CR, LF, NEL, LS, PS.
fn line_end(b: &[u8], pos: usize) -> (usize, usize) {
    let mut i = pos;
    while i < b.len() {
        match b[i] {
            b'\r' if b.get(i + 1) == Some(&b'\n') => return (i, i + 2),
            b'\r' | b'\n' => return (i, i + 1),
            0xC2 if b.get(i + 1) == Some(&0x85) => return (i, i + 2),
            0xE2 if b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xA8 | 0xA9)) => {
                return (i, i + 3)
            }
            _ => i += 1,
        }
    }
    (i, i)
}

/// Moves the line numbers in a parser's message (`at line N column M`) from the document's to
/// the file's.
pub fn file_lines(message: &str, first_line: usize) -> String {
    static LINE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\bline (\d+) column").expect("a valid regex")
    });
    if first_line == 0 {
        return message.to_string();
    }
    LINE.replace_all(message, |c: &regex::Captures<'_>| {
        let n: usize = c[1].parse().unwrap_or(0);
        format!("line {} column", n + first_line)
    })
    .into_owned()
}
