//! dotenv: dotenvy for meaning (`KEY=value`, `export KEY=value`, quotes,
//! comments); a line scanner for where a variable is written. A variable
//! written twice has the value of its last line.

use std::ops::Range;

use super::encode::Style;
use super::syntax::{Lookup, Syntax, chomp, double_quoted_len, error_at, guarded, lines, newline};
use super::{FormatError, KeyPath};

pub(super) struct Dotenv;

impl Syntax for Dotenv {
    /// The variables in file order.
    type Doc = Vec<(String, String)>;

    fn parse(text: &str) -> Result<Self::Doc, FormatError> {
        guarded(|| {
            let mut vars = Vec::new();
            for item in dotenvy::from_read_iter(text.as_bytes()) {
                match item {
                    Ok(kv) => vars.push(kv),
                    Err(dotenvy::Error::LineParse(line, at)) => {
                        // dotenvy reports the line's text: find it, never show it.
                        let start = text.find(line.as_str()).unwrap_or(0);
                        return Err(error_at(
                            text,
                            start + at.min(line.trim_end().len()),
                            "cannot parse this line as KEY=value",
                        ));
                    }
                    Err(_) => return Err(error_at(text, 0, "cannot read this as dotenv")),
                }
            }
            Ok(vars)
        })
    }

    fn get(doc: &Self::Doc, key: &KeyPath) -> Lookup {
        match doc.iter().rev().find(|(k, _)| k == key.as_str()) {
            Some((_, v)) => Lookup::Str(v.clone()),
            None => Lookup::Missing,
        }
    }

    /// The value of the variable's last assignment: a quoted value up to
    /// its closing quote, or a bare one up to a comment or the line's end.
    fn locate(_: &Self::Doc, text: &str, key: &KeyPath) -> Option<(Range<usize>, Style)> {
        let (start, value) = lines(text).into_iter().rev().find_map(|(start, line)| {
            let body = chomp(line);
            let value = value_of(body, key.as_str())?;
            Some((start + body.len() - value.len(), value))
        })?;
        let lead = value.len() - value.trim_start_matches([' ', '\t']).len();
        let (start, value) = (start + lead, &value[lead..]);
        let (len, style) = match value.as_bytes().first() {
            Some(b'\'') => (value[1..].find('\'')? + 2, Style::DotenvSingle),
            Some(b'"') => (double_quoted_len(value)?, Style::DotenvDouble),
            Some(b'`') => return None,
            _ => (bare_len(value), Style::DotenvBare),
        };
        Some((start..start + len, style))
    }

    fn set(doc: &mut Self::Doc, key: &KeyPath, value: &str) -> bool {
        match doc.iter_mut().rev().find(|(k, _)| k == key.as_str()) {
            Some((_, v)) => *v = value.to_owned(),
            None => doc.push((key.as_str().to_owned(), value.to_owned())),
        }
        true
    }

    fn same(a: &Self::Doc, b: &Self::Doc) -> bool {
        a == b
    }

    /// Appends `KEY=value`, unquoted when the value allows (some readers
    /// keep quotes of some kinds).
    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        let name = key.as_str();
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid {
            return Err("not a variable name".into());
        }
        let nl = newline(text);
        let mut out = text.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push_str(nl);
        }
        out.push_str(&format!("{name}={}{nl}", quote(value)));
        Ok(out)
    }
}

/// The value text of `line` if it assigns `name`.
fn value_of<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let t = line.trim_start();
    let t = t
        .strip_prefix("export")
        .filter(|r| r.starts_with([' ', '\t']))
        .map_or(t, str::trim_start);
    t.strip_prefix(name)?
        .trim_start_matches([' ', '\t'])
        .strip_prefix('=')
}

/// A bare value ends where a comment starts (whitespace then `#`), without
/// trailing whitespace.
fn bare_len(v: &str) -> usize {
    let end = v
        .char_indices()
        .find(|&(i, c)| c == '#' && v[..i].ends_with([' ', '\t']))
        .map_or(v.len(), |(i, _)| i);
    v[..end].trim_end().len()
}

fn quote(value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.:/=+~@%,-".contains(c));
    if plain {
        value.to_owned()
    } else if !value.contains('\'') {
        format!("'{value}'")
    } else {
        let escaped = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('$', "\\$");
        format!("\"{escaped}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_take_the_last_assignment() {
        let t = "A=1\nexport  B = \"x\"\nB=y # c\nBB=z\n";
        let key = |s: &str| s.parse::<KeyPath>().unwrap();
        let doc = Dotenv::parse(t).unwrap();
        let span = |k: &str| Dotenv::locate(&doc, t, &key(k));
        assert_eq!(
            span("B").map(|(r, s)| (&t[r], s)),
            Some(("y", Style::DotenvBare))
        );
        assert_eq!(
            span("A").map(|(r, s)| (&t[r], s)),
            Some(("1", Style::DotenvBare))
        );
        let t2 = "X = 'a#b' # c\nY=\"q\\\"r\"\n";
        let doc2 = Dotenv::parse(t2).unwrap();
        let span2 = |k: &str| Dotenv::locate(&doc2, t2, &key(k)).map(|(r, s)| (&t2[r], s));
        assert_eq!(span2("X"), Some(("'a#b'", Style::DotenvSingle)));
        assert_eq!(span2("Y"), Some(("\"q\\\"r\"", Style::DotenvDouble)));
        assert_eq!(Dotenv::get(&doc, &key("B")), Lookup::Str("y".into()));
        assert_eq!(span("C"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("__tokenfs:a.b__"), "__tokenfs:a.b__");
        assert_eq!(quote("Bearer x"), "'Bearer x'");
        assert_eq!(quote("it's $x"), "\"it's \\$x\"");
    }
}
