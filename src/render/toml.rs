//! TOML: the `toml` crate for meaning, toml_edit for spans and for
//! insertion (it keeps layout; the result is also checked to be the
//! original plus one inserted run, so nothing it re-serialises can slip in).

use std::ops::Range;

use toml::Value;
use toml_edit::{Document, DocumentMut, Item};

use super::encode::Style;
use super::syntax::{Lookup, Syntax, error_at, guarded, index, inserted_run, newline};
use super::{FormatError, KeyPath};

pub(super) struct Toml;

#[derive(Clone)]
pub(super) struct Doc {
    /// Keeps the spans of the source.
    spans: Document<String>,
    value: toml::Table,
}

impl Syntax for Toml {
    type Doc = Doc;

    fn parse(text: &str) -> Result<Doc, FormatError> {
        guarded(|| {
            let at = |span: Option<Range<usize>>, message: &str| {
                error_at(text, span.map_or(0, |s| s.start), message)
            };
            let spans = Document::parse(text.to_owned()).map_err(|e| at(e.span(), e.message()))?;
            let value = toml::from_str(text).map_err(|e| at(e.span(), e.message()))?;
            Ok(Doc { spans, value })
        })
    }

    fn get(doc: &Doc, key: &KeyPath) -> Lookup {
        // `None` stands for the root table.
        let mut at: Option<&Value> = None;
        for s in key.segments() {
            let next = match at {
                None => doc.value.get(s.as_str()),
                Some(Value::Table(t)) => t.get(s.as_str()),
                Some(Value::Array(a)) => index(s).and_then(|i| a.get(i)),
                Some(_) => None,
            };
            match next {
                Some(n) => at = Some(n),
                None => return Lookup::Missing,
            }
        }
        match at {
            Some(Value::String(s)) => Lookup::Str(s.clone()),
            Some(Value::Integer(i)) => Lookup::Num(i.to_string()),
            None | Some(Value::Table(_)) => Lookup::Other("a table"),
            Some(Value::Array(_)) => Lookup::Other("an array"),
            Some(Value::Boolean(_)) => Lookup::Other("a boolean"),
            Some(Value::Datetime(_)) => Lookup::Other("a date"),
            Some(_) => Lookup::Other("a number"),
        }
    }

    /// A multi-line string is rewritten as a one-line string of its kind.
    fn locate(doc: &Doc, text: &str, key: &KeyPath) -> Option<(Range<usize>, Style)> {
        let mut item = doc.spans.as_item();
        for s in key.segments() {
            item = match index(s) {
                Some(i) => item.get(i)?,
                None => item.get(s.as_str())?,
            };
        }
        let span = item.span()?;
        match text.as_bytes().get(span.start)? {
            b'"' => Some((span, Style::TomlBasic)),
            b'\'' => Some((span, Style::TomlLiteral)),
            b'-' | b'+' | b'0'..=b'9' => Some((span, Style::TomlBasic)),
            _ => None,
        }
    }

    fn set(doc: &mut Doc, key: &KeyPath, value: &str) -> bool {
        let Some((last, parents)) = key.segments().split_last() else {
            return false;
        };
        let mut table = &mut doc.value;
        for p in parents {
            let next = if table.contains_key(p.as_str()) {
                table.get_mut(p.as_str())
            } else {
                table.insert(p.clone(), Value::Table(toml::Table::new()));
                table.get_mut(p.as_str())
            };
            table = match next {
                Some(Value::Table(t)) => t,
                _ => return false,
            };
        }
        table.insert(last.clone(), Value::String(value.to_owned()));
        true
    }

    fn same(a: &Doc, b: &Doc) -> bool {
        same_table(&a.value, &b.value)
    }

    /// toml_edit writes `\n` after the entries it prints, so a CRLF file is
    /// edited as LF and the inserted run is put into the original.
    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        if newline(text) == "\n" {
            return insert_lf(text, key, value);
        }
        let lf = text.replace("\r\n", "\n");
        if lf.contains('\r') {
            return Err("mixed line endings".into());
        }
        let out = insert_lf(&lf, key, value)?;
        let run = inserted_run(&lf, &out).ok_or("the file changed unexpectedly")?;
        let at = run.start + lf[..run.start].matches('\n').count();
        let added = out[run].replace('\n', "\r\n");
        Ok(format!("{}{added}{}", &text[..at], &text[at..]))
    }
}

/// Inserts into an LF file, keeping every byte of it.
fn insert_lf(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
    let Some((last, parents)) = key.segments().split_last() else {
        return Err("the whole document cannot be a token".into());
    };
    let mut doc: DocumentMut = text.parse().map_err(|_| "the file does not parse")?;
    let mut item = doc.as_item_mut();
    for p in parents {
        item = child_or_new_table(item, p)?;
    }
    let table = item
        .as_table_like_mut()
        .ok_or("a parent of the key is not a table")?;
    if table.contains_key(last) {
        return Err("the key exists".into());
    }
    table.insert(last, toml_edit::value(value));
    let out = doc.to_string();
    inserted_run(text, &out).ok_or("the TOML library would rewrite other parts of the file")?;
    Ok(out)
}

/// The item under `seg`, creating a table when a key is missing.
fn child_or_new_table<'i>(item: &'i mut Item, seg: &str) -> Result<&'i mut Item, String> {
    if let Some(i) = index(seg) {
        return item.get_mut(i).ok_or_else(|| "no such list item".into());
    }
    let table = item
        .as_table_like_mut()
        .ok_or("a parent of the key is not a table")?;
    if !table.contains_key(seg) {
        let mut t = toml_edit::Table::new();
        t.set_implicit(true);
        table.insert(seg, Item::Table(t));
    }
    table
        .get_mut(seg)
        .ok_or_else(|| "a parent of the key is not a table".into())
}

/// Equality, except that NaN equals NaN (`x = nan` is a valid document
/// that must still compare equal to itself).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x == y || (x.is_nan() && y.is_nan()),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_value(v, w))
        }
        (Value::Table(x), Value::Table(y)) => same_table(x, y),
        _ => a == b,
    }
}

fn same_table(a: &toml::Table, b: &toml::Table) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| b.get(k).is_some_and(|w| same_value(v, w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> KeyPath {
        s.parse().unwrap()
    }

    #[test]
    fn spans_and_nan() {
        let t = "x = nan\n[a]\nk = \"v\" # c\n[[p]]\nk = 'w'\n";
        let doc = Toml::parse(t).unwrap();
        let at = |k: &str| Toml::locate(&doc, t, &key(k)).map(|(r, s)| (&t[r], s));
        assert_eq!(at("a.k"), Some(("\"v\"", Style::TomlBasic)));
        assert_eq!(at("p.0.k"), Some(("'w'", Style::TomlLiteral)));
        assert_eq!(at("x"), None);
        assert!(Toml::same(&doc, &Toml::parse(t).unwrap()));
    }

    #[test]
    fn inserts() {
        let ins = |t: &str, k: &str| Toml::insert(t, &key(k), "P").unwrap();
        assert_eq!(
            ins("a = 1\n\n[t]\nb = 2\n", "c"),
            "a = 1\nc = \"P\"\n\n[t]\nb = 2\n"
        );
        assert_eq!(
            ins("[t]\nb = 2\n\n[u]\n", "t.c"),
            "[t]\nb = 2\nc = \"P\"\n\n[u]\n"
        );
        assert_eq!(ins("a = 1\r\n", "t.k"), "a = 1\r\n\r\n[t]\r\nk = \"P\"\r\n");
    }
}
