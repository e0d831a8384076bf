//! INI (`~/.databrickscfg`): rust-ini for meaning, read the way Python's
//! configparser (the Databricks SDK's reader) does — no unquoting, no
//! escapes; a line scanner for where a key is written. A key path is
//! `section.key`.

use std::ops::Range;

use ::ini::ParseOption;

use super::encode::Style;
use super::syntax::{Lookup, Syntax, chomp, guarded, lines, newline};
use super::{FormatError, KeyPath};

pub(super) struct Ini;

/// Sections in file order (`None`: keys before any header), each with its
/// keys in file order.
type Sections = Vec<(Option<String>, Vec<(String, String)>)>;

impl Syntax for Ini {
    type Doc = Sections;

    fn parse(text: &str) -> Result<Sections, FormatError> {
        guarded(|| {
            let opt = ParseOption {
                enabled_quote: false,
                enabled_escape: false,
                ..ParseOption::default()
            };
            let ini = ::ini::Ini::load_from_str_opt(text, opt).map_err(|e| FormatError {
                line: e.line.max(1),
                column: e.col.max(1),
                message: e.msg.to_string(),
            })?;
            Ok(ini
                .iter()
                .map(|(s, props)| {
                    let props = props.iter().map(|(k, v)| (k.to_owned(), v.to_owned()));
                    (s.map(str::to_owned), props.collect())
                })
                .collect())
        })
    }

    fn get(doc: &Sections, key: &KeyPath) -> Lookup {
        let Some((section, k)) = key.ini_parts() else {
            return Lookup::Missing;
        };
        let mut values = doc
            .iter()
            .filter(|(s, _)| s.as_deref() == Some(section))
            .flat_map(|(_, props)| props)
            .filter(|(name, _)| *name == k);
        match values.next() {
            Some((_, v)) => Lookup::Str(v.clone()),
            None => Lookup::Missing,
        }
    }

    /// configparser strips the value: the text between the separator and
    /// the line's end, without surrounding whitespace.
    fn locate(doc: &Sections, text: &str, key: &KeyPath) -> Option<(Range<usize>, Style)> {
        let r = span(doc, text, key)?;
        let v = &text[r.clone()];
        let lead = v.len() - v.trim_start().len();
        let start = r.start + lead;
        Some((start..start + v.trim().len(), Style::Ini))
    }

    fn set(doc: &mut Sections, key: &KeyPath, value: &str) -> bool {
        let Some((section, k)) = key.ini_parts() else {
            return false;
        };
        let existing = doc
            .iter_mut()
            .filter(|(s, _)| s.as_deref() == Some(section))
            .flat_map(|(_, props)| props.iter_mut())
            .find(|(name, _)| *name == k);
        if let Some((_, v)) = existing {
            *v = value.to_owned();
            return true;
        }
        match doc.iter_mut().find(|(s, _)| s.as_deref() == Some(section)) {
            Some((_, props)) => props.push((k, value.to_owned())),
            None => doc.push((Some(section.to_owned()), vec![(k, value.to_owned())])),
        }
        true
    }

    fn same(a: &Sections, b: &Sections) -> bool {
        a == b
    }

    /// After the last key of the first `[section]`, or a new section at the
    /// end; `key = value` or `key=value` as the file writes them.
    fn insert(text: &str, key: &KeyPath, value: &str) -> Result<String, String> {
        let (section, k) = key.ini_parts().ok_or("an INI key path is section.key")?;
        let nl = newline(text);
        let ls = lines(text);
        let entry = format!("{k}{}{value}", separator(&ls));
        let Some(h) = ls
            .iter()
            .position(|(_, l)| header(chomp(l)) == Some(section))
        else {
            let mut out = text.to_owned();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push_str(nl);
            }
            if !out.trim().is_empty() && !out.ends_with(&format!("{nl}{nl}")) {
                out.push_str(nl);
            }
            out.push_str(&format!("[{section}]{nl}{entry}{nl}"));
            return Ok(out);
        };
        let next = (h + 1..ls.len())
            .find(|&i| header(chomp(ls[i].1)).is_some())
            .unwrap_or(ls.len());
        let after = (h + 1..next)
            .rev()
            .find(|&i| key_of(chomp(ls[i].1)).is_some())
            .unwrap_or(h)
            + 1;
        let at = ls.get(after).map_or(text.len(), |(s, _)| *s);
        let mut add = String::new();
        if !text[..at].ends_with('\n') {
            add.push_str(nl);
        }
        add.push_str(&format!("{entry}{nl}"));
        Ok(format!("{}{add}{}", &text[..at], &text[at..]))
    }
}

/// The text after the separator of `key`'s line.
fn span(_: &Sections, text: &str, key: &KeyPath) -> Option<Range<usize>> {
    let (section, k) = key.ini_parts()?;
    let mut current = None;
    for (start, line) in lines(text) {
        let body = chomp(line);
        if let Some(name) = header(body) {
            current = Some(name);
        } else if current == Some(section) && key_of(body) == Some(k.as_str()) {
            let sep = body.find(['=', ':'])?;
            return Some(start + sep + 1..start + body.len());
        }
    }
    None
}

/// The section name of a `[section]` line.
fn header(line: &str) -> Option<&str> {
    let t = line.trim();
    let inner = t.strip_prefix('[')?;
    Some(inner[..inner.find(']')?].trim())
}

/// The key of a `key = value` line.
fn key_of(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.is_empty() || t.starts_with([';', '#', '[']) {
        return None;
    }
    Some(line[..line.find(['=', ':'])?].trim())
}

/// `" = "` or `"="`, as the last key line written with `=` has it.
fn separator(ls: &[(usize, &str)]) -> &'static str {
    let last = ls.iter().rev().map(|(_, l)| chomp(l)).find(|l| {
        key_of(l).is_some() && l.find(['=', ':']).is_some_and(|i| l.as_bytes()[i] == b'=')
    });
    match last {
        Some(l) if !l.contains(" =") && !l.contains("= ") => "=",
        _ => " = ",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> KeyPath {
        s.parse().unwrap()
    }

    #[test]
    fn spans_and_dotted_keys() {
        let t = "[DEFAULT]\nhost = h\ntoken = a\n\n[ p ]\ntoken=b\nx.y: c\n";
        let doc = Ini::parse(t).unwrap();
        assert_eq!(&t[span(&doc, t, &key("p.token")).unwrap()], "b");
        assert_eq!(&t[span(&doc, t, &key("DEFAULT.token")).unwrap()], " a");
        assert_eq!(Ini::get(&doc, &key("p.x.y")), Lookup::Str("c".into()));
        assert_eq!(&t[span(&doc, t, &key("p.x.y")).unwrap()], " c");
    }

    #[test]
    fn inserts() {
        let ins = |t: &str, k: &str| Ini::insert(t, &key(k), "P").unwrap();
        assert_eq!(
            ins("[a]\nx=1\n; c\n\n[b]\n", "a.t"),
            "[a]\nx=1\nt=P\n; c\n\n[b]\n"
        );
        assert_eq!(ins("[a]\nx = 1", "b.t"), "[a]\nx = 1\n\n[b]\nt = P\n");
        assert_eq!(ins("[a]\n", "a.t"), "[a]\nt = P\n");
        assert_eq!(ins("", "a.t"), "[a]\nt = P\n");
        assert_eq!(
            ins("[a]\r\nx = 1\r\n\r\n", "b.t"),
            "[a]\r\nx = 1\r\n\r\n[b]\r\nt = P\r\n"
        );
    }
}
