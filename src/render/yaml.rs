//! YAML: saphyr's `MarkedYaml` for meaning and for where values are;
//! insertion works on lines, by indentation, for block mappings (and items
//! of block sequences); anything else fails the caller's verification and
//! becomes a problem rather than an edit.

use std::ops::Range;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use super::encode::Style;
use super::syntax::{
    Lookup, Syntax, chomp, double_quoted_len, error_at, guarded, index, lines, newline, splice,
};
use super::{FormatError, KeyPath};

pub(super) struct Yaml;

type Node = MarkedYaml<'static>;

impl Syntax for Yaml {
    /// The documents of the stream; keys are looked up in the first.
    type Doc = Vec<Node>;

    fn parse(text: &str) -> Result<Self::Doc, FormatError> {
        shallow(text)?;
        guarded(|| {
            Node::load_from_str(text).map_err(|e| FormatError {
                line: e.marker().line().max(1),
                column: e.marker().col() + 1,
                message: e.info().to_owned(),
            })
        })
    }

    fn get(doc: &Self::Doc, key: &KeyPath) -> Lookup {
        let Some(n) = node(doc, key) else {
            return Lookup::Missing;
        };
        if let Some(s) = n.data.as_str() {
            return Lookup::Str(s.to_owned());
        }
        if let YamlData::Value(Scalar::Integer(i)) = &n.data {
            return Lookup::Num(i.to_string());
        }
        Lookup::Other(match &n.data {
            YamlData::Value(Scalar::Null) => "null",
            YamlData::Value(Scalar::Boolean(_)) => "a boolean",
            YamlData::Value(_) => "a number",
            YamlData::Mapping(_) => "a mapping",
            YamlData::Sequence(_) => "a list",
            YamlData::Alias(_) => "an alias",
            YamlData::Tagged(..) => "a tagged value",
            _ => "an unsupported value",
        })
    }

    fn locate(doc: &Self::Doc, text: &str, key: &KeyPath) -> Option<(Range<usize>, Style)> {
        let span = node(doc, key)?.span;
        let start = byte_offset(text, span.start.index())?;
        let rest = text.get(start..)?;
        match rest.as_bytes().first()? {
            // saphyr's end of a quoted scalar can run past the quote.
            b'\'' => Some((start..start + single_quoted_end(rest)?, Style::YamlSingle)),
            b'"' => Some((start..start + double_quoted_len(rest)?, Style::YamlDouble)),
            _ if is_block_scalar(&text[..start]) => None,
            _ => Some((
                start..byte_offset(text, span.end.index())?,
                Style::YamlPlain,
            )),
        }
    }

    fn set(doc: &mut Self::Doc, key: &KeyPath, value: &str) -> bool {
        if doc.is_empty() {
            doc.push(Node::from(YamlData::Mapping(Default::default())));
        }
        let mut n = &mut doc[0];
        for s in key.segments() {
            if matches!(n.data, YamlData::Value(Scalar::Null)) {
                n.data = YamlData::Mapping(Default::default());
            }
            n = match &mut n.data {
                YamlData::Mapping(m) => {
                    // Not `entry()`: it moves an existing key to the back.
                    let k = string(s);
                    if !m.contains_key(&k) {
                        m.insert(k.clone(), Node::from(YamlData::Value(Scalar::Null)));
                    }
                    match m.get_mut(&k) {
                        Some(v) => v,
                        None => return false,
                    }
                }
                YamlData::Sequence(q) => match index(s).and_then(|i| q.get_mut(i)) {
                    Some(item) => item,
                    None => return false,
                },
                _ => return false,
            };
        }
        n.data = YamlData::Value(Scalar::String(value.to_owned().into()));
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
        let mut view = View::new(text);
        let place = view.find(segs);
        let Some(rest) = segs.get(place.depth..).filter(|r| !r.is_empty()) else {
            return Err("the key exists".into());
        };
        if rest.iter().any(|s| index(s).is_some()) {
            return Err("a missing list item cannot be created".into());
        }
        let nl = newline(text);
        let base = view.base_indent(&place);
        let unit = view.unit();
        let mut block = String::new();
        for (k, seg) in rest.iter().enumerate() {
            let pad = " ".repeat(base + unit * k);
            if k + 1 == rest.len() {
                block.push_str(&format!("{pad}{}: {}{nl}", scalar(seg), scalar(value)));
            } else {
                block.push_str(&format!("{pad}{}:{nl}", scalar(seg)));
            }
        }
        let at = view.end_of_last_content(&place);
        if at > 0 && !text[..at].ends_with('\n') {
            block.insert_str(0, nl);
        }
        Ok(splice(text, at..at, &block))
    }
}

/// The deepest nesting accepted. saphyr (and the drop, clone and compare of
/// what it builds) recurse once per level, and a thread's stack is finite;
/// config files nest a handful of levels.
const MAX_DEPTH: usize = 300;

/// Refuses documents that might nest deeper than [`MAX_DEPTH`], by a bound
/// that never underestimates: a node's ancestors in block style have
/// smaller indentation (two per indentation: a mapping and a list level
/// with its key), plus `- `/`? ` markers on its line, plus open brackets.
fn shallow(text: &str) -> Result<(), FormatError> {
    let mut flow = 0usize;
    for (start, line) in lines(text) {
        let body = line.trim_start_matches(' ');
        let indent = line.len() - body.len();
        let mut rest = body;
        let mut markers = 0;
        while let Some(r) = ["- ", "? ", "-\t"]
            .iter()
            .find_map(|m| rest.strip_prefix(m))
        {
            rest = r.trim_start_matches([' ', '\t']);
            markers += 1;
        }
        for b in line.bytes() {
            match b {
                b'[' | b'{' => flow += 1,
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
        if 2 * (indent + 1) + markers + flow > MAX_DEPTH {
            return Err(error_at(text, start, "the document nests too deeply"));
        }
    }
    Ok(())
}

/// The node at `key` in the first document.
fn node<'d>(doc: &'d [Node], key: &KeyPath) -> Option<&'d Node> {
    let mut n = doc.first()?;
    for s in key.segments() {
        n = match &n.data {
            YamlData::Mapping(_) => n.data.as_mapping_get(s)?,
            YamlData::Sequence(q) => q.get(index(s)?)?,
            _ => return None,
        };
    }
    Some(n)
}

/// The length of the single-quoted scalar at the start of `s` (`''` is an
/// escaped quote).
fn single_quoted_end(s: &str) -> Option<usize> {
    let mut i = 1;
    loop {
        i += s.get(i..)?.find('\'')?;
        if s.as_bytes().get(i + 1) == Some(&b'\'') {
            i += 2;
        } else {
            return Some(i + 1);
        }
    }
}

/// Whether the text before a scalar ends in a block scalar header (`|`,
/// `>-`, `|2+`…): its content starts on the next line.
fn is_block_scalar(before: &str) -> bool {
    before
        .trim_end()
        .rsplit([' ', '\t', '\n'])
        .next()
        .and_then(|h| h.strip_prefix(['|', '>']))
        .is_some_and(|rest| {
            rest.chars()
                .all(|c| c.is_ascii_digit() || c == '+' || c == '-')
        })
}

/// A string node, as a mapping key or value.
fn string(s: &str) -> Node {
    Node::from(YamlData::Value(Scalar::String(s.to_owned().into())))
}

/// saphyr counts characters; the text is indexed by bytes.
fn byte_offset(text: &str, chars: usize) -> Option<usize> {
    if text.is_ascii() {
        return (chars <= text.len()).then_some(chars);
    }
    text.char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .nth(chars)
}

/// A key or value as a plain scalar when that is surely a string, else
/// single-quoted.
fn scalar(s: &str) -> String {
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:/=+~-".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n"
        )
        && !s.ends_with(':');
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Where a walk down the key path stopped: the lines of the deepest
/// existing mapping on the path (after its key line), and how many
/// segments exist.
struct Place {
    lines: Range<usize>,
    /// The indentation of the key (or list dash) that owns these lines;
    /// `None` at the top level.
    parent: Option<usize>,
    depth: usize,
}

/// The document's lines, with indentation. A list item whose first entry
/// sits on the dash line (`- base_url: …`) is read as if the dash were a
/// space, which makes that entry an ordinary line of the item's mapping.
struct View<'t> {
    lines: Vec<(usize, &'t str)>,
    /// (line, indentation) of a dash line being read as its item's content.
    dash: Option<(usize, usize)>,
}

impl<'t> View<'t> {
    fn new(text: &'t str) -> View<'t> {
        View {
            lines: lines(text),
            dash: None,
        }
    }

    fn raw(&self, i: usize) -> &'t str {
        self.lines.get(i).map_or("", |l| chomp(l.1))
    }

    fn indent(&self, i: usize) -> usize {
        match self.dash {
            Some((line, indent)) if line == i => indent,
            _ => self.raw(i).len() - self.raw(i).trim_start_matches(' ').len(),
        }
    }

    /// The line after its indentation.
    fn body(&self, i: usize) -> &'t str {
        self.raw(i).get(self.indent(i)..).unwrap_or("")
    }

    /// Not blank, not a comment, not a document marker or directive.
    fn is_content(&self, i: usize) -> bool {
        let raw = self.raw(i);
        let t = raw.trim();
        let marker = ["---", "..."].iter().any(|m| {
            raw.strip_prefix(m)
                .is_some_and(|r| r.is_empty() || r.starts_with(' '))
        });
        !t.is_empty() && !t.starts_with('#') && !marker && !raw.starts_with('%')
    }

    fn is_dash(&self, i: usize) -> bool {
        let b = self.body(i);
        b == "-" || b.starts_with("- ")
    }

    fn is_key(&self, i: usize, key: &str) -> bool {
        let b = self.body(i);
        [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .any(|k| {
                b.strip_prefix(k.as_str())
                    .map(|r| r.trim_start_matches(' '))
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
            })
    }

    fn first_content(&self, lines: Range<usize>) -> Option<usize> {
        lines.into_iter().find(|&i| self.is_content(i))
    }

    /// The end of the block owned by the line `i` (indentation `ci`): the
    /// next line indented no deeper, except list items at the same
    /// indentation (a list may sit level with its key).
    fn block_end(&self, i: usize, ci: usize, hi: usize) -> usize {
        let own_list = self
            .first_content(i + 1..hi)
            .is_some_and(|f| self.indent(f) == ci && self.is_dash(f) && !self.is_dash(i));
        (i + 1..hi)
            .find(|&j| {
                self.is_content(j)
                    && (self.indent(j) < ci
                        || (self.indent(j) == ci && !(own_list && self.is_dash(j))))
            })
            .unwrap_or(hi)
    }

    /// Walks down the key path as far as it exists.
    fn find(&mut self, segs: &[String]) -> Place {
        let mut place = Place {
            lines: 0..self.lines.len(),
            parent: None,
            depth: 0,
        };
        while let Some(seg) = segs.get(place.depth) {
            let Some(first) = self.first_content(place.lines.clone()) else {
                break;
            };
            let ci = self.indent(first);
            let level_list = place.parent == Some(ci) && self.is_dash(first);
            if place.parent.is_some_and(|p| ci <= p) && !level_list {
                break;
            }
            let next = match index(seg) {
                Some(n) if self.is_dash(first) => self.item(&place, ci, n),
                _ => self.entry(&place, ci, seg),
            };
            let Some(next) = next else { break };
            place = next;
        }
        place
    }

    /// The `n`th item of the list whose dashes are at indentation `ci`.
    fn item(&mut self, place: &Place, ci: usize, n: usize) -> Option<Place> {
        let items: Vec<usize> = place
            .lines
            .clone()
            .filter(|&i| self.is_content(i) && self.indent(i) == ci && self.is_dash(i))
            .collect();
        let &i = items.get(n)?;
        let end = (i + 1..place.lines.end)
            .find(|&j| self.is_content(j) && self.indent(j) <= ci)
            .unwrap_or(place.lines.end);
        let after = &self.body(i)[1..];
        let inline = after.trim_start_matches(' ');
        let lines = if inline.is_empty() || inline.starts_with('#') {
            i + 1..end
        } else {
            self.dash = Some((i, ci + 1 + after.len() - inline.len()));
            i..end
        };
        Some(Place {
            lines,
            parent: Some(ci),
            depth: place.depth + 1,
        })
    }

    /// The lines under the key `seg` of the mapping at indentation `ci`.
    fn entry(&mut self, place: &Place, ci: usize, seg: &str) -> Option<Place> {
        let i = place
            .lines
            .clone()
            .find(|&i| self.is_content(i) && self.indent(i) == ci && self.is_key(i, seg))?;
        let end = self.block_end(i, ci, place.lines.end);
        Some(Place {
            lines: i + 1..end,
            parent: Some(ci),
            depth: place.depth + 1,
        })
    }

    /// The indentation of a new entry of the mapping at `place`.
    fn base_indent(&self, place: &Place) -> usize {
        let first = self
            .first_content(place.lines.clone())
            .map(|f| self.indent(f));
        match (first, place.parent) {
            (Some(f), Some(p)) if f > p => f,
            (_, Some(p)) => p + self.unit(),
            (Some(f), None) => f,
            (None, None) => 0,
        }
    }

    /// The byte offset just after the last content line of `place` (new
    /// entries go there; comments and blank lines after it stay after it).
    fn end_of_last_content(&self, place: &Place) -> usize {
        let last = place.lines.clone().rev().find(|&i| self.is_content(i));
        let line = match (last, place.parent) {
            (Some(i), _) => i + 1,
            // An empty document (comments, a `---`): at its end.
            (None, None) => self.lines.len(),
            (None, Some(_)) => place.lines.start,
        };
        match self.lines.get(line) {
            Some((start, _)) => *start,
            None => self.lines.last().map_or(0, |(s, l)| s + l.len()),
        }
    }

    /// The document's indentation step: the first key line followed by a
    /// deeper line; 2 if there is none.
    fn unit(&self) -> usize {
        let content: Vec<usize> = (0..self.lines.len())
            .filter(|&i| self.is_content(i))
            .collect();
        content
            .windows(2)
            .find_map(|w| {
                let (a, b) = (w[0], w[1]);
                let opens = self.raw(a).trim_end().ends_with(':') && !self.is_dash(a);
                (opens && self.indent(b) > self.indent(a) && !self.is_dash(b))
                    .then(|| self.indent(b) - self.indent(a))
            })
            .unwrap_or(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> KeyPath {
        s.parse().unwrap()
    }

    #[test]
    fn spans_cover_the_value() {
        let t = "a:\n  b: plain # c\n  q: \"quo\\\"ted\"\n  é: 'x'\nl:\n  - k: v1\n  - k: v2\n";
        let doc = Yaml::parse(t).unwrap();
        let at = |k: &str| Yaml::locate(&doc, t, &key(k)).map(|(r, s)| (&t[r], s));
        assert_eq!(at("a.b"), Some(("plain", Style::YamlPlain)));
        assert_eq!(at("a.q"), Some(("\"quo\\\"ted\"", Style::YamlDouble)));
        assert_eq!(at("a.é"), Some(("'x'", Style::YamlSingle)));
        assert_eq!(at("l.1.k"), Some(("v2", Style::YamlPlain)));
        let t = "a: 'it''s' # c\nb: |\n  blk\n";
        let doc = Yaml::parse(t).unwrap();
        let at = |k: &str| Yaml::locate(&doc, t, &key(k)).map(|(r, s)| (&t[r], s));
        assert_eq!(at("a"), Some(("'it''s'", Style::YamlSingle)));
        assert_eq!(at("b"), None);
    }

    #[test]
    fn inserts_into_block_mappings_and_list_items() {
        let ins = |t: &str, k: &str| Yaml::insert(t, &key(k), "P").unwrap();
        assert_eq!(ins("a:\n  b: 1\n", "a.c"), "a:\n  b: 1\n  c: P\n");
        assert_eq!(
            ins("a:\n    b: 1\nz: 2", "a.c.d"),
            "a:\n    b: 1\n    c:\n        d: P\nz: 2"
        );
        assert_eq!(ins("z: 2", "a"), "z: 2\na: P\n");
        assert_eq!(ins("---\n# c\n", "a.b"), "---\n# c\na:\n  b: P\n");
        assert_eq!(
            ins("l:\n  - k: 1\n    j: 2\n  - k: 3\n", "l.0.x"),
            "l:\n  - k: 1\n    j: 2\n    x: P\n  - k: 3\n"
        );
        assert_eq!(
            ins("l:\n- k: 1\n- k: 3\n", "l.1.x"),
            "l:\n- k: 1\n- k: 3\n  x: P\n"
        );
        assert_eq!(ins("a:\r\n  b: 1\r\n", "a.c"), "a:\r\n  b: 1\r\n  c: P\r\n");
        assert!(Yaml::insert("a: 1\n", &key("l.0.x"), "P").is_err());
    }

    #[test]
    fn scalars() {
        assert_eq!(scalar("__tokenfs:a.b__"), "__tokenfs:a.b__");
        assert_eq!(scalar("Bearer x"), "'Bearer x'");
        assert_eq!(scalar("true"), "'true'");
        assert_eq!(scalar("it's"), "'it''s'");
    }
}
