//! How deep one YAML document nests, measured before libyaml sees it.
//!
//! Why not just let the parser refuse it: serde_yaml 0.9 hands the whole document to libyaml's
//! scanner before its own recursion limit (128) applies, and that scanner walks its stack of
//! possible simple keys (one entry per open flow collection) for every token, so a document of
//! n nested flow mappings costs O(n²) (measured: `{a: ` × 25,000 took 1.7 s, × 50,000 took 6.8 s,
//! 97% in `yaml_parser_fetch_more_tokens`). Block nesting costs linear time there.
//!
//! This is a port of the parts of libyaml's scanner (unsafe-libyaml 0.2.11, `scanner.rs`) that
//! decide where tokens start: flow collections, block indentation, simple keys, comments,
//! quoted, plain and block scalars, tags, anchors, document markers. It keeps only the state,
//! never the text, and runs in linear time. It must never see less nesting than libyaml would:
//! everything it skips (a comment, a quoted scalar, a block scalar's lines) is skipped exactly
//! where libyaml skips it. Where libyaml stops with a syntax error, this stops too (nothing after
//! it can cost) or, for the errors not ported, reads on, which can only see more. Depth is the
//! open flow collections plus the block indentation levels, as a reader of the YAML counts.
//! Checked against libyaml's own token stream on millions of generated documents (flow depth
//! never lower than libyaml's).

/// Where a document first nests deeper than the limit (1-based, within the text scanned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// What a scan found: the deepest nesting (flow collections included) and the deepest flow
/// nesting alone, both up to where libyaml would stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub max: usize,
    pub max_flow: usize,
    pub over: Option<TooDeep>,
}

/// Scans `text` (one or more YAML documents, as one libyaml stream) and stops at the first point
/// deeper than `limit`.
pub fn measure(text: &str, limit: usize) -> Depth {
    let mut s = Scanner {
        s: text.as_bytes(),
        pos: 0,
        line: 0,
        col: 0,
        flow: 0,
        indent: -1,
        indents: Vec::new(),
        allowed: true,
        key0: None,
        limit,
        depth: Depth::default(),
    };
    // libyaml's reader drops a byte order mark at the start of the stream before the scanner
    // counts columns.
    if text.starts_with('\u{feff}') {
        s.pos = '\u{feff}'.len_utf8();
    }
    let _ = s.run();
    s.depth
}

/// libyaml stops scanning here (a syntax error, or the limit was passed).
struct Stop;

/// A possible simple key at flow level 0: where the key started, for the block mapping's indent.
#[derive(Clone, Copy)]
struct Key {
    line: usize,
    index: usize,
    col: usize,
}

struct Scanner<'a> {
    s: &'a [u8],
    pos: usize,
    line: usize,
    /// In characters, as libyaml counts (a multi-byte character is one column).
    col: usize,
    flow: usize,
    /// libyaml's `parser.indent` (-1 outside any block collection) and its stack of outer ones.
    indent: isize,
    indents: Vec<isize>,
    /// libyaml's `simple_key_allowed`.
    allowed: bool,
    /// The flow-level-0 entry of libyaml's simple key stack; entries of deeper flow levels never
    /// roll indentation (`roll_indent` does nothing inside flow), so they are not kept.
    key0: Option<Key>,
    limit: usize,
    depth: Depth,
}

impl Scanner<'_> {
    fn at(&self, k: usize) -> u8 {
        // NUL is libyaml's end of input (its reader refuses a NUL anyway).
        self.s.get(self.pos + k).copied().unwrap_or(0)
    }
    fn is_z(&self, k: usize) -> bool {
        self.at(k) == 0
    }
    fn is_blank(&self, k: usize) -> bool {
        matches!(self.at(k), b' ' | b'\t')
    }
    /// CR, LF, NEL (C2 85), LS (E2 80 A8), PS (E2 80 A9), as libyaml's `IS_BREAK`.
    fn is_break(&self, k: usize) -> bool {
        match self.at(k) {
            b'\r' | b'\n' => true,
            0xC2 => self.at(k + 1) == 0x85,
            0xE2 => self.at(k + 1) == 0x80 && matches!(self.at(k + 2), 0xA8 | 0xA9),
            _ => false,
        }
    }
    fn is_breakz(&self, k: usize) -> bool {
        self.is_break(k) || self.is_z(k)
    }
    fn is_blankz(&self, k: usize) -> bool {
        self.is_blank(k) || self.is_breakz(k)
    }
    fn is_alpha(&self, k: usize) -> bool {
        matches!(self.at(k), b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' | b'_' | b'-')
    }
    /// `---` or `...` at column 0, followed by a blank or the end of the line.
    fn at_document_marker(&self) -> bool {
        self.col == 0
            && (self.s[self.pos..].starts_with(b"---") || self.s[self.pos..].starts_with(b"..."))
            && self.is_blankz(3)
    }

    /// One character (libyaml's `SKIP`): one column, however many bytes.
    fn skip(&mut self) {
        let width = match self.at(0) {
            b if b < 0x80 => 1,
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            _ => 4,
        };
        self.pos = (self.pos + width).min(self.s.len());
        self.col += 1;
    }
    /// One line break, CR LF counting as one (libyaml's `SKIP_LINE`).
    fn skip_line(&mut self) {
        if self.at(0) == b'\r' && self.at(1) == b'\n' {
            self.pos += 2;
        } else if self.is_break(0) {
            self.skip();
        } else {
            return;
        }
        self.line += 1;
        self.col = 0;
    }

    fn check(&mut self) -> Result<(), Stop> {
        let d = self.indents.len() + self.flow;
        self.depth.max = self.depth.max.max(d);
        self.depth.max_flow = self.depth.max_flow.max(self.flow);
        if d > self.limit {
            self.depth.over = Some(TooDeep {
                line: self.line + 1,
                column: self.col + 1,
            });
            return Err(Stop);
        }
        Ok(())
    }
    fn roll(&mut self, col: usize) -> Result<(), Stop> {
        if self.flow == 0 && self.indent < col as isize {
            self.indents.push(self.indent);
            self.indent = col as isize;
            self.check()?;
        }
        Ok(())
    }
    /// Closes the block levels deeper than `col`.
    fn unroll(&mut self, col: isize) {
        if self.flow != 0 {
            return;
        }
        while self.indent > col {
            self.indent = self.indents.pop().unwrap_or(-1);
        }
    }
    fn save_key(&mut self) {
        if self.allowed && self.flow == 0 {
            self.key0 = Some(Key {
                line: self.line,
                index: self.pos,
                col: self.col,
            });
        }
    }
    fn remove_key(&mut self) {
        if self.flow == 0 {
            self.key0 = None;
        }
    }

    fn run(&mut self) -> Result<(), Stop> {
        loop {
            let before = self.pos;
            self.scan_to_next_token();
            // libyaml's `stale_simple_keys`: a key must end on its line, within 1024 bytes.
            if let Some(k) = self.key0 {
                if k.line < self.line || k.index + 1024 < self.pos {
                    self.key0 = None;
                }
            }
            self.unroll(self.col as isize);
            if self.is_z(0) {
                return Ok(());
            }
            let c = self.at(0);
            if self.col == 0 && c == b'%' {
                // A directive fills its line (or is an error).
                self.unroll(-1);
                self.key0 = None;
                self.allowed = false;
                while !self.is_breakz(0) {
                    self.skip();
                }
                self.skip_line();
            } else if self.at_document_marker() {
                self.unroll(-1);
                self.key0 = None;
                self.allowed = false;
                self.skip();
                self.skip();
                self.skip();
            } else if c == b'[' || c == b'{' {
                self.save_key();
                self.flow += 1;
                self.check()?;
                self.allowed = true;
                self.skip();
            } else if c == b']' || c == b'}' {
                self.remove_key();
                self.flow = self.flow.saturating_sub(1);
                self.allowed = false;
                self.skip();
            } else if c == b',' {
                self.remove_key();
                self.allowed = true;
                self.skip();
            } else if c == b'-' && self.is_blankz(1) {
                self.roll(self.col)?;
                self.remove_key();
                self.allowed = true;
                self.skip();
            } else if c == b'?' && (self.flow > 0 || self.is_blankz(1)) {
                self.roll(self.col)?;
                self.remove_key();
                self.allowed = self.flow == 0;
                self.skip();
            } else if c == b':' && (self.flow > 0 || self.is_blankz(1)) {
                if self.flow == 0 {
                    match self.key0.take() {
                        Some(k) => {
                            self.roll(k.col)?;
                            self.allowed = false;
                        }
                        None => {
                            self.roll(self.col)?;
                            self.allowed = true;
                        }
                    }
                } else {
                    self.allowed = false;
                }
                self.skip();
            } else if c == b'*' || c == b'&' {
                self.save_key();
                self.allowed = false;
                self.skip();
                while self.is_alpha(0) {
                    self.skip();
                }
            } else if c == b'!' {
                self.save_key();
                self.allowed = false;
                self.scan_tag()?;
            } else if (c == b'|' || c == b'>') && self.flow == 0 {
                self.remove_key();
                self.allowed = true;
                self.scan_block_scalar()?;
            } else if c == b'\'' || c == b'"' {
                self.save_key();
                self.allowed = false;
                self.scan_quoted(c == b'\'')?;
            } else if self.plain_starts_here() {
                self.save_key();
                self.allowed = false;
                if self.scan_plain()? {
                    self.allowed = true;
                }
            } else {
                // "found character that cannot start any token"
                return Err(Stop);
            }
            if self.pos == before {
                // Every branch above consumes input; never loop in place if one did not.
                self.skip();
            }
        }
    }

    fn scan_to_next_token(&mut self) {
        loop {
            if self.col == 0 && self.s[self.pos..].starts_with("\u{feff}".as_bytes()) {
                self.skip();
            }
            while self.at(0) == b' ' || ((self.flow > 0 || !self.allowed) && self.at(0) == b'\t') {
                self.skip();
            }
            if self.at(0) == b'#' {
                while !self.is_breakz(0) {
                    self.skip();
                }
            }
            if !self.is_break(0) {
                return;
            }
            self.skip_line();
            if self.flow == 0 {
                self.allowed = true;
            }
        }
    }

    fn plain_starts_here(&self) -> bool {
        let c = self.at(0);
        !(self.is_blankz(0) || b"-?:,[]{}#&*!|>'\"%@`".contains(&c))
            || (c == b'-' && !self.is_blank(1))
            || (self.flow == 0 && (c == b'?' || c == b':') && !self.is_blankz(1))
    }

    /// A tag: `!<verbatim>`, or `!`, a handle and a suffix, all of URI characters.
    fn scan_tag(&mut self) -> Result<(), Stop> {
        self.skip();
        let uri = |s: &Self, verbatim: bool| {
            s.is_alpha(0)
                || b";/?:@&=+$.%!~*'()".contains(&s.at(0))
                || (verbatim && b",[]".contains(&s.at(0)))
        };
        if self.at(0) == b'<' {
            self.skip();
            while self.at(0) != 0 && uri(self, true) {
                self.skip();
            }
            if self.at(0) != b'>' {
                return Err(Stop);
            }
            self.skip();
        } else {
            while self.at(0) != 0 && uri(self, false) {
                self.skip();
            }
        }
        if !(self.is_blankz(0) || (self.flow > 0 && self.at(0) == b',')) {
            return Err(Stop);
        }
        Ok(())
    }

    /// A single- or double-quoted scalar, which may span lines.
    fn scan_quoted(&mut self, single: bool) -> Result<(), Stop> {
        let quote = if single { b'\'' } else { b'"' };
        self.skip();
        loop {
            if self.at_document_marker() || self.is_z(0) {
                return Err(Stop);
            }
            while !self.is_blankz(0) {
                if single && self.at(0) == b'\'' && self.at(1) == b'\'' {
                    self.skip();
                    self.skip();
                } else if self.at(0) == quote {
                    break;
                } else if !single && self.at(0) == b'\\' && self.is_break(1) {
                    self.skip();
                    self.skip_line();
                    break;
                } else if !single && self.at(0) == b'\\' {
                    // A valid escape's letter is ASCII; `\x`, `\u`, `\U` digits are read as
                    // ordinary characters next (an invalid one is a libyaml error anyway).
                    self.skip();
                    self.skip();
                } else {
                    self.skip();
                }
            }
            if self.at(0) == quote {
                self.skip();
                return Ok(());
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    self.skip();
                } else {
                    self.skip_line();
                }
            }
        }
    }

    /// A plain scalar; returns whether it ended after a line break (libyaml then allows a key).
    fn scan_plain(&mut self) -> Result<bool, Stop> {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.at_document_marker() || self.at(0) == b'#' {
                break;
            }
            while !self.is_blankz(0) {
                let c = self.at(0);
                if self.flow > 0 && c == b':' && b",?[]{}".contains(&self.at(1)) {
                    // "found unexpected ':'"
                    return Err(Stop);
                }
                if (c == b':' && self.is_blankz(1)) || (self.flow > 0 && b",[]{}".contains(&c)) {
                    break;
                }
                leading_blanks = false;
                self.skip();
            }
            if !(self.is_blank(0) || self.is_break(0)) {
                break;
            }
            while self.is_blank(0) || self.is_break(0) {
                if self.is_blank(0) {
                    if leading_blanks && (self.col as isize) < indent && self.at(0) == b'\t' {
                        // "found a tab character that violates indentation"
                        return Err(Stop);
                    }
                    self.skip();
                } else {
                    self.skip_line();
                    leading_blanks = true;
                }
            }
            if self.flow == 0 && (self.col as isize) < indent {
                break;
            }
        }
        Ok(leading_blanks)
    }

    /// A literal (`|`) or folded (`>`) scalar: its header, then every line indented at least as
    /// far as its first non-empty line (or its explicit indentation indicator).
    fn scan_block_scalar(&mut self) -> Result<(), Stop> {
        self.skip();
        let mut increment = 0isize;
        let digit = |s: &Self| s.at(0).is_ascii_digit();
        if matches!(self.at(0), b'+' | b'-') {
            self.skip();
            if digit(self) {
                if self.at(0) == b'0' {
                    return Err(Stop);
                }
                increment = (self.at(0) - b'0') as isize;
                self.skip();
            }
        } else if digit(self) {
            if self.at(0) == b'0' {
                return Err(Stop);
            }
            increment = (self.at(0) - b'0') as isize;
            self.skip();
            if matches!(self.at(0), b'+' | b'-') {
                self.skip();
            }
        }
        while self.is_blank(0) {
            self.skip();
        }
        if self.at(0) == b'#' {
            while !self.is_breakz(0) {
                self.skip();
            }
        }
        if !self.is_breakz(0) {
            return Err(Stop);
        }
        self.skip_line();
        let mut indent = if increment != 0 {
            if self.indent >= 0 {
                self.indent + increment
            } else {
                increment
            }
        } else {
            0
        };
        self.block_scalar_breaks(&mut indent)?;
        while self.col as isize == indent && !self.is_z(0) {
            while !self.is_breakz(0) {
                self.skip();
            }
            self.block_scalar_breaks(&mut indent)?;
        }
        Ok(())
    }

    /// Empty lines and indentation; settles the indentation when it is not known yet.
    fn block_scalar_breaks(&mut self, indent: &mut isize) -> Result<(), Stop> {
        let mut max_indent = 0isize;
        loop {
            while (*indent == 0 || (self.col as isize) < *indent) && self.at(0) == b' ' {
                self.skip();
            }
            max_indent = max_indent.max(self.col as isize);
            if (*indent == 0 || (self.col as isize) < *indent) && self.at(0) == b'\t' {
                // "found a tab character where an indentation space is expected"
                return Err(Stop);
            }
            if !self.is_break(0) {
                break;
            }
            self.skip_line();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
        Ok(())
    }
}
