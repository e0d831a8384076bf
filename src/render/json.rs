//! JSON: serde_json for meaning, a small scanner for where things are.
//!
//! The scanner only ever runs on text serde_json accepted, so it can be
//! simple; it is iterative (no recursion on nesting) and returns `None`
//! rather than indexing past the end on anything unexpected.

use std::ops::Range;

use serde_json::{Map, Value};

use super::encode::Style as Quoting;
use super::syntax::{Lookup, Syntax, index, newline, splice};
use super::{FormatError, KeyPath};

pub(super) struct Json;

impl Syntax for Json {
    /// `None` for a file with nothing but whitespace: an empty file a key
    /// can be inserted into.
    type Doc = Option<Value>;

    fn parse(text: &str) -> Result<Self::Doc, FormatError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(text).map(Some).map_err(|e| {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; keep the message.
            let msg = msg.rfind(" at line ").map_or(&*msg, |i| &msg[..i]);
            FormatError {
                line: e.line().max(1),
                column: e.column().max(1),
                message: msg.to_owned(),
            }
        })
    }

    fn get(doc: &Self::Doc, key: &KeyPath) -> Lookup {
        let Some(mut v) = doc.as_ref() else {
            return Lookup::Missing;
        };
        for s in key.segments() {
            let next = match v {
                Value::Object(m) => m.get(s.as_str()),
                Value::Array(a) => index(s).and_then(|i| a.get(i)),
                _ => None,
            };
            match next {
                Some(n) => v = n,
                None => return Lookup::Missing,
            }
        }
        match v {
            Value::String(s) => Lookup::Str(s.clone()),
            Value::Null => Lookup::Other("null"),
            Value::Bool(_) => Lookup::Other("a boolean"),
            Value::Number(n) if n.is_i64() || n.is_u64() => Lookup::Num(n.to_string()),
            Value::Number(_) => Lookup::Other("a number"),
            Value::Array(_) => Lookup::Other("a list"),
            Value::Object(_) => Lookup::Other("an object"),
        }
    }

    fn locate(_: &Self::Doc, text: &str, key: &KeyPath) -> Option<(Range<usize>, Quoting)> {
        let mut at = root(text)?;
        for s in key.segments() {
            at = child(text, at.start, s)?;
        }
        let first = text.as_bytes().get(at.start)?;
        (*first == b'"' || *first == b'-' || first.is_ascii_digit()).then_some((at, Quoting::Json))
    }

    fn set(doc: &mut Self::Doc, key: &KeyPath, value: &str) -> bool {
        let mut v = doc.get_or_insert_with(|| Value::Object(Map::new()));
        for s in key.segments() {
            v = match v {
                Value::Object(m) => m
                    .entry(s.clone())
                    .or_insert_with(|| Value::Object(Map::new())),
                Value::Array(a) => match index(s).and_then(|i| a.get_mut(i)) {
                    Some(n) => n,
                    None => return false,
                },
                _ => return false,
            };
        }
        *v = Value::String(value.to_owned());
        true
    }

    fn same(a: &Self::Doc, b: &Self::Doc) -> bool {
        a == b
    }

    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        let segs = key.segments();
        if segs.is_empty() {
            return Err("the whole document cannot be a token".into());
        }
        let style = Style::of(text);
        let Some(root) = root(text) else {
            let body = style.member(segs, value, &style.unit, true);
            return Ok(format!(
                "{{{nl}{}{body}{nl}}}{nl}",
                style.unit,
                nl = style.nl
            ));
        };
        // The deepest object on the path that exists.
        let (mut at, mut depth) = (root.clone(), 0);
        while let Some(next) = segs.get(depth).and_then(|s| child(text, at.start, s)) {
            (at, depth) = (next, depth + 1);
        }
        if depth == segs.len() {
            return Err("the key exists".into());
        }
        let Some((members, close)) = members(text, at.start) else {
            return Err("a parent of the key is not an object".into());
        };
        let (range, add) = match members.last() {
            Some(last) => (
                last.value.end..last.value.end,
                style.after_last(text, at.start, &members, &segs[depth..], value),
            ),
            None => (
                at.start + 1..close,
                style.fill_empty(
                    text,
                    at.start,
                    at.start == root.start,
                    &segs[depth..],
                    value,
                ),
            ),
        };
        Ok(splice(text, range, &add))
    }
}

/// How a document writes objects, so inserted members look like their
/// neighbours.
struct Style {
    /// From the end of a key to the start of its value (`": "`).
    colon: String,
    /// One level of indentation in a multi-line document.
    unit: String,
    /// The document's multi-line-ness at the root (a pretty-printed file).
    pretty: bool,
    nl: &'static str,
}

impl Style {
    fn of(text: &str) -> Style {
        let nl = newline(text);
        let first = root(text).and_then(|r| Some((r.start, members(text, r.start)?.0)));
        let Some((open, Some(m))) = first.map(|(o, ms)| (o, ms.into_iter().next())) else {
            return Style {
                colon: ": ".into(),
                unit: "  ".into(),
                pretty: true,
                nl,
            };
        };
        let pretty = text[open..m.key.start].contains('\n');
        let unit = indent_before(text, m.key.start)
            .strip_prefix(line_indent(text, open))
            .filter(|u| !u.is_empty() && pretty)
            .unwrap_or("  ")
            .to_owned();
        Style {
            colon: text[m.key.end..m.value.start].to_owned(),
            unit,
            pretty,
            nl,
        }
    }

    /// The text to insert after the last member of the object at `open`,
    /// styled like that object's first member.
    fn after_last(
        &self,
        text: &str,
        open: usize,
        members: &[Member],
        segs: &[String],
        value: &str,
    ) -> String {
        let Some(first) = members.first() else {
            return String::new();
        };
        let indent = indent_before(text, first.key.start);
        let local = Style {
            colon: text[first.key.end..first.value.start].to_owned(),
            unit: indent
                .strip_prefix(line_indent(text, open))
                .filter(|u| !u.is_empty())
                .unwrap_or(&self.unit)
                .to_owned(),
            pretty: self.pretty,
            nl: self.nl,
        };
        if text[open..first.key.start].contains('\n') {
            let member = local.member(segs, value, indent, true);
            format!(",{}{indent}{member}", self.nl)
        } else {
            let comma = match members.get(1) {
                Some(second) => &text[first.value.end..second.key.start],
                None if local.colon.ends_with(' ') => ", ",
                None => ",",
            };
            format!("{comma}{}", local.member(segs, value, "", false))
        }
    }

    /// The new inside of the empty object at `open` (its braces stay).
    fn fill_empty(
        &self,
        text: &str,
        open: usize,
        is_root: bool,
        segs: &[String],
        value: &str,
    ) -> String {
        let inside_has_newline = text[open..]
            .find('}')
            .is_some_and(|c| text[open..open + c].contains('\n'));
        if is_root || self.pretty || inside_has_newline {
            let outer = line_indent(text, open);
            let indent = format!("{outer}{}", self.unit);
            let member = self.member(segs, value, &indent, true);
            format!("{nl}{indent}{member}{nl}{outer}", nl = self.nl)
        } else {
            self.member(segs, value, "", false)
        }
    }

    /// `"k": "value"`, or `"k": {…}` nesting the rest of the path; `indent`
    /// is the indentation of the line the member starts on.
    fn member(&self, segs: &[String], value: &str, indent: &str, multiline: bool) -> String {
        let Some((first, rest)) = segs.split_first() else {
            return quote(value);
        };
        let key = quote(first);
        if rest.is_empty() {
            return format!("{key}{}{}", self.colon, quote(value));
        }
        if multiline {
            let inner = format!("{indent}{}", self.unit);
            let nested = self.member(rest, value, &inner, true);
            format!(
                "{key}{colon}{{{nl}{inner}{nested}{nl}{indent}}}",
                colon = self.colon,
                nl = self.nl
            )
        } else {
            format!(
                "{key}{}{{{}}}",
                self.colon,
                self.member(rest, value, "", false)
            )
        }
    }
}

/// A JSON string literal.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// The whitespace at the start of the line holding byte `at`.
fn line_indent(text: &str, at: usize) -> &str {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = &text[start..];
    &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
}

/// The text between the start of the line and byte `at`, if it is all
/// whitespace (the indentation of a member that starts its line).
fn indent_before(text: &str, at: usize) -> &str {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let before = &text[start..at];
    if before.bytes().all(|b| b == b' ' || b == b'\t') {
        before
    } else {
        ""
    }
}

/// One `"key": value` of an object: byte ranges of the key literal (with
/// its quotes) and of the value.
struct Member {
    name: String,
    key: Range<usize>,
    value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The range of the document's top-level value.
fn root(text: &str) -> Option<Range<usize>> {
    let start = skip_ws(text.as_bytes(), 0);
    Some(start..value_end(text.as_bytes(), start)?)
}

/// The end of the string literal starting at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
}

/// The end of the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let len = b[i..]
                .iter()
                .take_while(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .count();
            Some(i + len)
        }
    }
}

/// The members of the object at `open` and the offset of its `}`.
fn members(text: &str, open: usize) -> Option<(Vec<Member>, usize)> {
    let b = text.as_bytes();
    if b.get(open) != Some(&b'{') {
        return None;
    }
    let mut out = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some((out, i));
    }
    loop {
        let key_end = string_end(b, i).filter(|_| b.get(i) == Some(&b'"'))?;
        let name: String = serde_json::from_str(text.get(i..key_end)?).ok()?;
        let colon = skip_ws(b, key_end);
        (b.get(colon) == Some(&b':')).then_some(())?;
        let start = skip_ws(b, colon + 1);
        let end = value_end(b, start)?;
        out.push(Member {
            name,
            key: i..key_end,
            value: start..end,
        });
        i = skip_ws(b, end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some((out, i)),
            _ => return None,
        }
    }
}

/// The elements of the array at `open`.
fn elements(b: &[u8], open: usize) -> Option<Vec<Range<usize>>> {
    let mut out = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b']') {
        return Some(out);
    }
    loop {
        let end = value_end(b, i)?;
        out.push(i..end);
        i = skip_ws(b, end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b']' => return Some(out),
            _ => return None,
        }
    }
}

/// The range of the value under `segment` in the container at `at`. For a
/// key that appears twice, the last one (which serde_json keeps).
fn child(text: &str, at: usize, segment: &str) -> Option<Range<usize>> {
    match text.as_bytes().get(at)? {
        b'{' => members(text, at)?
            .0
            .into_iter()
            .rev()
            .find(|m| m.name == segment)
            .map(|m| m.value),
        b'[' => elements(text.as_bytes(), at)?
            .into_iter()
            .nth(index(segment)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> KeyPath {
        s.parse().unwrap()
    }

    fn span(t: &str, k: &KeyPath) -> Option<Range<usize>> {
        Json::locate(&None, t, k).map(|(r, _)| r)
    }

    #[test]
    fn spans() {
        let t = r#"{"a": {"b": [1, "x", {"c": "yy"}]}, "k\"q": "v", "a": {"b": "last"}}"#;
        assert_eq!(&t[span(t, &key("a.b")).unwrap()], "\"last\"");
        let t = r#" {"a": {"b": [1, "x", {"c": "yy"}]}} "#;
        assert_eq!(&t[span(t, &key("a.b.2.c")).unwrap()], "\"yy\"");
        assert_eq!(&t[span(t, &key("a.b.1")).unwrap()], "\"x\"");
        assert_eq!(span(t, &key("a.b.9")), None);
        assert_eq!(span(t, &key("a.z")), None);
        let t = r#"{"k\"q": "v"}"#;
        assert_eq!(&t[span(t, &key("k\"q")).unwrap()], "\"v\"");
    }

    #[test]
    fn inserts() {
        let ins = |t: &str, k: &str| Json::insert(t, &key(k), "P").unwrap();
        assert_eq!(ins("{\"a\": 1}\n", "b"), "{\"a\": 1, \"b\": \"P\"}\n");
        assert_eq!(
            ins("{\"a\":1,\"c\":2}", "b.c"),
            "{\"a\":1,\"c\":2,\"b\":{\"c\":\"P\"}}"
        );
        assert_eq!(ins("{}", "b"), "{\n  \"b\": \"P\"\n}");
        assert_eq!(ins("", "a.b"), "{\n  \"a\": {\n    \"b\": \"P\"\n  }\n}\n");
        assert_eq!(
            ins("{\r\n\t\"a\": {\r\n\t\t\"x\": 1\r\n\t}\r\n}\r\n", "a.y.z"),
            "{\r\n\t\"a\": {\r\n\t\t\"x\": 1,\r\n\t\t\"y\": {\r\n\t\t\t\"z\": \"P\"\r\n\t\t}\r\n\t}\r\n}\r\n"
        );
        assert_eq!(
            ins("{\n  \"a\": {},\n  \"b\": 2\n}", "a.k"),
            "{\n  \"a\": {\n    \"k\": \"P\"\n  },\n  \"b\": 2\n}"
        );
        assert!(Json::insert("[1]", &key("a"), "P").is_err());
        assert!(Json::insert("{\"a\": 1}", &key("a.b"), "P").is_err());
    }
}
