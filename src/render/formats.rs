//! Per-format meaning: parse, look up a key path, replace one value in place,
//! insert a missing key. Parsers are the formats' real ones; edits touch only
//! the bytes they must, and every edit is verified by parsing the result.

use super::{Format, FormatError, KeyPath, Lookup};

type Parsed<T> = Result<T, FormatError>;

fn err(line: usize, column: usize, message: impl Into<String>) -> FormatError {
    FormatError {
        line,
        column,
        message: message.into(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parses `text` in `format`, for the error only.
pub(super) fn parse_check(format: Format, text: &str) -> Parsed<()> {
    value_at(
        format,
        text,
        &KeyPath {
            raw: String::new(),
            segments: Vec::new(),
        },
    )
    .map(drop)
}

/// The value at `key` (the empty path means the document root).
pub(super) fn value_at(format: Format, text: &str, key: &KeyPath) -> Parsed<Lookup> {
    match format {
        Format::Json => json::value_at(text, key.segments()),
        Format::Yaml => yaml::value_at(text, key.segments()),
        Format::Toml => toml::value_at(text, key.segments()),
        Format::Dotenv => dotenv::value_at(text, key),
        Format::Ini => ini::value_at(text, key),
        Format::Raw => Ok(raw::value_at(text, key)),
    }
}

/// Replaces the occurrence of `value` that *is* the value at `key` (the same
/// string may stand elsewhere too) by `with`. Tries each occurrence and keeps
/// the one after which the parser sees `with` at `key`.
pub(super) fn replace_value(
    format: Format,
    text: &str,
    key: &KeyPath,
    value: &str,
    with: &str,
) -> Option<String> {
    let want = Lookup::Str(with.to_owned());
    let works = |candidate: &String| value_at(format, candidate, key).ok().as_ref() == Some(&want);
    if value.is_empty() {
        // Where does an empty value sit? Try the places a value can start.
        return (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .filter(|&i| {
                i == 0 || matches!(text.as_bytes()[i - 1], b'"' | b'\'' | b'=' | b':' | b' ')
            })
            .map(|i| format!("{}{with}{}", &text[..i], &text[i..]))
            .find(works);
    }
    text.match_indices(value)
        .map(|(i, _)| format!("{}{with}{}", &text[..i], &text[i + value.len()..]))
        .find(works)
}

/// Inserts `key = value` (a string), changing nothing else where the format
/// allows; the result is verified.
pub(super) fn insert(
    format: Format,
    text: &str,
    key: &KeyPath,
    value: &str,
) -> Result<String, String> {
    let out = match format {
        Format::Json => json::insert(text, key.segments(), value)?,
        Format::Yaml => yaml::insert(text, key.segments(), value)?,
        Format::Toml => toml::insert(text, key.segments(), value)?,
        Format::Dotenv => dotenv::insert(text, key, value)?,
        Format::Ini => ini::insert(text, key, value)?,
        Format::Raw => raw::insert(text, value),
    };
    match value_at(format, &out, key) {
        Ok(Lookup::Str(v)) if v == value => Ok(out),
        _ => Err("this layout is not supported for insertion".into()),
    }
}

fn all_digits(s: &str) -> Option<usize> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Appends `line` to `text`, adding the missing final newline first.
fn append_line(text: &str, line: &str) -> String {
    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

mod json {
    use super::*;
    use serde_json::Value;

    fn parse(text: &str) -> Parsed<Value> {
        serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde_json appends " at line L column C"; keep only the message.
            let msg = msg
                .split(" at line ")
                .next()
                .unwrap_or("invalid JSON")
                .to_owned();
            err(e.line(), e.column(), msg)
        })
    }

    pub(super) fn value_at(text: &str, segs: &[String]) -> Parsed<Lookup> {
        let mut v = &parse(text)?;
        for s in segs {
            let next = match v {
                Value::Object(m) => m.get(s.as_str()),
                Value::Array(a) => all_digits(s).and_then(|i| a.get(i)),
                _ => None,
            };
            match next {
                Some(n) => v = n,
                None => return Ok(Lookup::Missing),
            }
        }
        Ok(match v {
            Value::String(s) => Lookup::Str(s.clone()),
            Value::Null => Lookup::Other("null"),
            Value::Bool(_) => Lookup::Other("a boolean"),
            Value::Number(_) => Lookup::Other("a number"),
            Value::Array(_) => Lookup::Other("a list"),
            Value::Object(_) => Lookup::Other("an object"),
        })
    }

    /// JSON has no comments, and CLIs rewrite it pretty-printed with two
    /// spaces: insertion re-serialises in that style (key order is kept).
    pub(super) fn insert(text: &str, segs: &[String], value: &str) -> Result<String, String> {
        let mut root = if text.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            parse(text).map_err(|e| e.message)?
        };
        let mut v = &mut root;
        for s in segs {
            let Value::Object(m) = v else {
                return Err("a parent is not an object".into());
            };
            v = m
                .entry(s.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        *v = Value::String(value.to_owned());
        let mut out = serde_json::to_string_pretty(&root).map_err(|e| e.to_string())?;
        if text.ends_with('\n') || text.trim().is_empty() {
            out.push('\n');
        }
        Ok(out)
    }
}

mod yaml {
    use super::*;
    use saphyr::{LoadableYamlNode, Yaml};

    pub(super) fn value_at(text: &str, segs: &[String]) -> Parsed<Lookup> {
        let docs = Yaml::load_from_str(text).map_err(|e| {
            let m = e.marker();
            err(m.line(), m.col() + 1, e.info().to_owned())
        })?;
        let Some(mut v) = docs.first() else {
            return Ok(Lookup::Missing);
        };
        for s in segs {
            let next = if v.is_mapping() {
                v.as_mapping_get(s)
            } else if v.is_sequence() {
                all_digits(s).and_then(|i| v.as_sequence().and_then(|q| q.get(i)))
            } else {
                None
            };
            match next {
                Some(n) => v = n,
                None => return Ok(Lookup::Missing),
            }
        }
        Ok(match v.as_str() {
            Some(s) => Lookup::Str(s.to_owned()),
            None if v.is_null() => Lookup::Other("null"),
            None if v.is_mapping() => Lookup::Other("a mapping"),
            None if v.is_sequence() => Lookup::Other("a list"),
            None => Lookup::Other("a number or boolean"),
        })
    }

    fn indent(line: &str) -> usize {
        line.len() - line.trim_start_matches(' ').len()
    }

    fn is_content(line: &str) -> bool {
        let t = line.trim();
        !t.is_empty() && !t.starts_with('#')
    }

    fn is_key(line: &str, key: &str) -> bool {
        let t = line.trim_start_matches(' ');
        [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                t.strip_prefix(k.as_str())
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\n', '\r']))
            })
    }

    /// Block-style insertion: walks down the existing mappings by
    /// indentation and adds the missing tail after the last entry of the
    /// deepest one that exists.
    pub(super) fn insert(text: &str, segs: &[String], value: &str) -> Result<String, String> {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let (mut start, mut end, mut parent_indent): (usize, usize, Option<usize>) =
            (0, lines.len(), None);
        let mut depth = 0;
        while depth < segs.len() {
            let child_indent = lines[start..end]
                .iter()
                .find(|l| is_content(l))
                .map(|l| indent(l));
            let Some(ci) = child_indent.filter(|&ci| parent_indent.is_none_or(|p| ci > p)) else {
                break;
            };
            let found =
                (start..end).find(|&i| indent(lines[i]) == ci && is_key(lines[i], &segs[depth]));
            let Some(i) = found else { break };
            let block_end = (i + 1..end)
                .find(|&j| is_content(lines[j]) && indent(lines[j]) <= ci)
                .unwrap_or(end);
            (start, end, parent_indent) = (i + 1, block_end, Some(ci));
            depth += 1;
        }
        if depth == segs.len() {
            return Err("the key exists".into());
        }
        let base = match (
            lines[start..end].iter().find(|l| is_content(l)),
            parent_indent,
        ) {
            (Some(l), Some(p)) if indent(l) > p => indent(l),
            (_, Some(p)) => p + 2,
            (Some(l), None) => indent(l),
            (None, None) => 0,
        };
        let mut block = String::new();
        for (k, seg) in segs[depth..].iter().enumerate() {
            let pad = " ".repeat(base + 2 * k);
            if depth + k + 1 == segs.len() {
                block.push_str(&format!("{pad}{seg}: {value}\n"));
            } else {
                block.push_str(&format!("{pad}{seg}:\n"));
            }
        }
        // After the last content line of the block (comments after it stay below).
        let at = (start..end)
            .rev()
            .find(|&i| is_content(lines[i]))
            .map_or(start, |i| i + 1);
        let mut out: String = lines[..at].concat();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&block);
        out.push_str(&lines[at..].concat());
        Ok(out)
    }
}

mod toml {
    use super::*;
    use toml_edit::{DocumentMut, Item};

    fn parse(text: &str) -> Parsed<DocumentMut> {
        text.parse::<DocumentMut>().map_err(|e| {
            let (line, col) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            err(line, col, e.message().to_owned())
        })
    }

    pub(super) fn value_at(text: &str, segs: &[String]) -> Parsed<Lookup> {
        // toml_edit for syntax (and edits), the toml crate's values for meaning.
        parse(text)?;
        let root: ::toml::Table = ::toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            err(line, col, e.message().to_owned())
        })?;
        let mut v = &::toml::Value::Table(root);
        let mut owned;
        for s in segs {
            let next = match v {
                ::toml::Value::Table(t) => t.get(s.as_str()).cloned(),
                ::toml::Value::Array(a) => all_digits(s).and_then(|i| a.get(i)).cloned(),
                _ => None,
            };
            match next {
                Some(n) => {
                    owned = n;
                    v = &owned;
                }
                None => return Ok(Lookup::Missing),
            }
        }
        Ok(match v {
            ::toml::Value::String(s) => Lookup::Str(s.clone()),
            ::toml::Value::Table(_) => Lookup::Other("a table"),
            ::toml::Value::Array(_) => Lookup::Other("an array"),
            _ => Lookup::Other("a non-string value"),
        })
    }

    pub(super) fn insert(text: &str, segs: &[String], value: &str) -> Result<String, String> {
        let mut doc = parse(text).map_err(|e| e.message)?;
        let Some((last, parents)) = segs.split_last() else {
            return Err("empty key".into());
        };
        let mut table = doc.as_table_mut() as &mut dyn toml_edit::TableLike;
        for p in parents {
            let entry = table.entry(p).or_insert_with(|| {
                let mut t = toml_edit::Table::new();
                t.set_implicit(true);
                Item::Table(t)
            });
            table = entry.as_table_like_mut().ok_or("a parent is not a table")?;
        }
        table.insert(last, toml_edit::value(value));
        Ok(doc.to_string())
    }
}

mod dotenv {
    use super::*;

    pub(super) fn value_at(text: &str, key: &KeyPath) -> Parsed<Lookup> {
        let mut found = Lookup::Missing;
        for item in dotenvy::from_read_iter(text.as_bytes()) {
            match item {
                Ok((k, v)) if k == key.as_str() => found = Lookup::Str(v),
                Ok(_) => {}
                Err(dotenvy::Error::LineParse(line, at)) => {
                    let n = text
                        .lines()
                        .position(|l| l.contains(line.as_str()))
                        .map_or(0, |n| n + 1);
                    return Err(err(n, at + 1, "cannot parse this line as KEY=value"));
                }
                Err(_) => return Err(err(0, 0, "cannot parse as dotenv")),
            }
        }
        Ok(found)
    }

    /// Values are written unquoted: Node's dotenv keeps quotes of some kinds.
    pub(super) fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        Ok(append_line(text, &format!("{}={value}", key.as_str())))
    }
}

mod ini {
    use super::*;
    use ::ini::{Ini, ParseOption};

    fn parse(text: &str) -> Parsed<Ini> {
        // Python's configparser (which the Databricks SDK uses) neither
        // unquotes nor unescapes values.
        let opt = ParseOption {
            enabled_quote: false,
            enabled_escape: false,
            ..ParseOption::default()
        };
        Ini::load_from_str_opt(text, opt).map_err(|e| err(e.line, e.col, e.msg.to_string()))
    }

    pub(super) fn value_at(text: &str, key: &KeyPath) -> Parsed<Lookup> {
        let ini = parse(text)?;
        let Some((section, k)) = key.ini_parts() else {
            return Ok(Lookup::Missing);
        };
        Ok(match ini.section(Some(section)).and_then(|s| s.get(k)) {
            Some(v) => Lookup::Str(v.to_owned()),
            None => Lookup::Missing,
        })
    }

    pub(super) fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        let (section, k) = key.ini_parts().ok_or("an INI key needs section.key")?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let spaced = !lines.iter().any(|l| {
            let t = l.trim_start();
            !t.starts_with(['[', ';', '#']) && t.contains('=') && !t.contains(" = ")
        });
        let entry = if spaced {
            format!("{k} = {value}")
        } else {
            format!("{k}={value}")
        };
        let header = lines
            .iter()
            .position(|l| l.trim() == format!("[{section}]"));
        let Some(h) = header else {
            let sep = if text.trim().is_empty() { "" } else { "\n" };
            return Ok(
                append_line(&format!("{}{sep}", text), &format!("[{section}]\n{entry}"))
                    .replacen("\n\n\n", "\n\n", 1),
            );
        };
        let next = (h + 1..lines.len())
            .find(|&i| lines[i].trim_start().starts_with('['))
            .unwrap_or(lines.len());
        let at = (h + 1..next)
            .rev()
            .find(|&i| !lines[i].trim().is_empty())
            .map_or(h + 1, |i| i + 1);
        let mut out = lines[..at].concat();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&entry);
        out.push('\n');
        out.push_str(&lines[at..].concat());
        Ok(out)
    }
}

mod raw {
    use super::*;

    fn body(text: &str) -> &str {
        text.strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(text)
    }

    pub(super) fn value_at(text: &str, key: &KeyPath) -> Lookup {
        if !key.as_str().is_empty() {
            return Lookup::Missing;
        }
        let b = body(text);
        if b.trim().is_empty() {
            Lookup::Missing
        } else {
            Lookup::Str(b.to_owned())
        }
    }

    pub(super) fn insert(text: &str, value: &str) -> String {
        let ending = &text[body(text).len()..];
        format!("{value}{ending}")
    }
}
