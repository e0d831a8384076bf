//! raw: the whole file is the value (a token file). One trailing newline
//! is not part of it, and is kept after the placeholder.

use std::ops::Range;

use super::encode::Style;
use super::syntax::{Lookup, Syntax};
use super::{FormatError, KeyPath};

pub(super) struct Raw;

impl Syntax for Raw {
    /// The value; `None` for a file with nothing but whitespace.
    type Doc = Option<String>;

    fn parse(text: &str) -> Result<Self::Doc, FormatError> {
        let b = body(text);
        Ok((!b.trim().is_empty()).then(|| b.to_owned()))
    }

    fn get(doc: &Self::Doc, key: &KeyPath) -> Lookup {
        match doc {
            Some(v) if key.segments().is_empty() => Lookup::Str(v.clone()),
            _ => Lookup::Missing,
        }
    }

    fn locate(_: &Self::Doc, text: &str, _: &KeyPath) -> Option<(Range<usize>, Style)> {
        Some((0..body(text).len(), Style::Raw))
    }

    fn set(doc: &mut Self::Doc, key: &KeyPath, value: &str) -> bool {
        *doc = Some(value.to_owned());
        key.segments().is_empty()
    }

    fn same(a: &Self::Doc, b: &Self::Doc) -> bool {
        a == b
    }

    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        if !key.segments().is_empty() {
            return Err("a raw file has only the whole-file key \"\"".into());
        }
        Ok(format!("{value}{}", &text[body(text).len()..]))
    }
}

/// The file without one trailing line ending.
fn body(text: &str) -> &str {
    text.strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text)
}
