//! What each format provides to the format-independent conversion in
//! `convert.rs`, and small text helpers the formats share.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::encode::Style;
use super::{FormatError, KeyPath};

/// What a key path leads to in a parsed document.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Lookup {
    Missing,
    Str(String),
    /// An integer, as decimal text.
    Num(String),
    /// A number, mapping, list, null…: not ours to touch. The text names
    /// the kind ("a number"), never the value.
    Other(&'static str),
}

/// One file format: its parser for meaning, where a value sits in the text,
/// and how to insert a missing key without disturbing anything else.
pub(super) trait Syntax {
    /// The parsed document, as far as meaning goes: what lookups read, and
    /// what an edit is compared against.
    type Doc: Clone;

    fn parse(text: &str) -> Result<Self::Doc, FormatError>;

    fn get(doc: &Self::Doc, key: &KeyPath) -> Lookup;

    /// The exact text of the string value at `key` (quotes included) and
    /// its quoting, or `None` where the format cannot say (a layout this
    /// module does not rewrite, such as a YAML block scalar).
    fn locate(doc: &Self::Doc, text: &str, key: &KeyPath) -> Option<(Range<usize>, Style)>;

    /// Sets the string at `key`, creating missing parents the way
    /// [`Syntax::insert`] does: the document an edit is meant to produce.
    /// `false` if the path cannot hold a string.
    fn set(doc: &mut Self::Doc, key: &KeyPath, value: &str) -> bool;

    /// Whether two documents mean the same.
    fn same(a: &Self::Doc, b: &Self::Doc) -> bool;

    /// `text` with `key` (missing there) added holding the string `value`,
    /// every other byte kept. The caller verifies the result.
    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String>;
}

/// Runs a third-party parser, turning a panic into an error: inputs are
/// arbitrary bytes written by programs, and a bug in a parser must not take
/// the filesystem down.
pub(super) fn guarded<T>(parse: impl FnOnce() -> Result<T, FormatError>) -> Result<T, FormatError> {
    catch_unwind(AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err(FormatError {
            line: 1,
            column: 1,
            message: "the parser failed on this input".into(),
        })
    })
}

/// A [`FormatError`] at a byte offset of `text`.
pub(super) fn error_at(text: &str, offset: usize, message: impl Into<String>) -> FormatError {
    let (line, column) = line_col(text, offset);
    FormatError {
        line,
        column,
        message: message.into(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut at = offset.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The line ending a file uses (that of its first line), for inserted lines.
pub(super) fn newline(text: &str) -> &'static str {
    match text.find('\n') {
        Some(i) if text[..i].ends_with('\r') => "\r\n",
        _ => "\n",
    }
}

/// The lines of `text` with their byte offsets, line endings included.
pub(super) fn lines(text: &str) -> Vec<(usize, &str)> {
    let mut at = 0;
    text.split_inclusive('\n')
        .map(|l| {
            let start = at;
            at += l.len();
            (start, l)
        })
        .collect()
}

/// A line without its line ending.
pub(super) fn chomp(line: &str) -> &str {
    line.strip_suffix('\n')
        .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l))
}

/// `text` with `add` inserted at byte `at`.
pub(super) fn splice(text: &str, at: Range<usize>, add: &str) -> String {
    let mut out = String::with_capacity(text.len() + add.len());
    out.push_str(&text[..at.start]);
    out.push_str(add);
    out.push_str(&text[at.end..]);
    out
}

/// The length of the double-quoted string at the start of `s` (a backslash
/// escapes the next character), or `None` if it is not closed.
pub(super) fn double_quoted_len(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// An all-digit segment as a sequence index.
pub(super) fn index(segment: &str) -> Option<usize> {
    if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
        segment.parse().ok()
    } else {
        None
    }
}

/// If `new` is `old` with one run of bytes inserted, that run's range in
/// `new`. Used to prove that a library's re-serialisation (toml_edit) kept
/// every original byte.
pub(super) fn inserted_run(old: &str, new: &str) -> Option<Range<usize>> {
    let added = new.len().checked_sub(old.len())?;
    let prefix = old
        .bytes()
        .zip(new.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    (new.as_bytes()[prefix + added..] == old.as_bytes()[prefix..]).then_some(prefix..prefix + added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_lines() {
        assert_eq!(line_col("ab\ncdé\nx", 7), (2, 4));
        assert_eq!(line_col("é", 1), (1, 1));
        assert_eq!(line_col("", 10), (1, 1));
        assert_eq!(newline("a\r\nb\n"), "\r\n");
        assert_eq!(newline("a\nb"), "\n");
        assert_eq!(lines("a\nb"), vec![(0, "a\n"), (2, "b")]);
        assert_eq!(chomp("x\r\n"), "x");
        assert_eq!(index("01"), Some(1));
        assert_eq!(index("1a"), None);
        assert_eq!(index(""), None);
    }

    #[test]
    fn inserted_runs() {
        assert_eq!(inserted_run("ab", "aXYb"), Some(1..3));
        assert_eq!(inserted_run("ab", "abXY"), Some(2..4));
        assert_eq!(inserted_run("ab", "ab"), Some(2..2));
        assert_eq!(inserted_run("ab", "aXbY"), None);
        assert_eq!(inserted_run("ab", "b"), None);
    }
}
