//! A template split once into literal runs and slots, so that rendering —
//! on every open — is one allocation and a pass of copies.

use std::ops::Range;

pub(super) const OPEN: &str = "__tokenfs:";
pub(super) const CLOSE: &str = "__";

enum Segment {
    Literal(Range<usize>),
    /// `text` is the placeholder's own bytes, kept when there is no secret.
    Slot {
        name: String,
        text: Range<usize>,
    },
}

/// Template bytes, pre-split into literal runs and placeholder slots.
pub struct Template {
    bytes: Vec<u8>,
    segments: Vec<Segment>,
}

impl Template {
    pub fn new(bytes: Vec<u8>) -> Template {
        let mut segments = Vec::new();
        let mut at = 0;
        for (name, text) in placeholders(&bytes) {
            if text.start > at {
                segments.push(Segment::Literal(at..text.start));
            }
            at = text.end;
            segments.push(Segment::Slot { name, text });
        }
        if at < bytes.len() {
            segments.push(Segment::Literal(at..bytes.len()));
        }
        Template { bytes, segments }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The slots that occur, deduplicated, in order of first appearance.
    pub fn slots(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for s in &self.segments {
            if let Segment::Slot { name, .. } = s {
                if !out.contains(&name.as_str()) {
                    out.push(name);
                }
            }
        }
        out
    }

    /// Appends the rendering to `out` (reserved once, to the exact length).
    /// A slot without a secret keeps its placeholder. Bytes are substituted
    /// verbatim: [`super::check`] catches a secret the format cannot hold.
    pub fn render<'a>(&self, secret_for: &dyn Fn(&str) -> Option<&'a [u8]>, out: &mut Vec<u8>) {
        out.reserve(self.rendered_len(secret_for));
        for s in &self.segments {
            out.extend_from_slice(self.piece(s, secret_for));
        }
    }

    /// The exact length of the rendering, without rendering.
    pub fn rendered_len<'a>(&self, secret_for: &dyn Fn(&str) -> Option<&'a [u8]>) -> usize {
        self.segments
            .iter()
            .map(|s| self.piece(s, secret_for).len())
            .sum()
    }

    fn piece<'s, 'a: 's>(
        &'s self,
        segment: &Segment,
        secret_for: &dyn Fn(&str) -> Option<&'a [u8]>,
    ) -> &'s [u8] {
        match segment {
            Segment::Literal(r) => &self.bytes[r.clone()],
            Segment::Slot { name, text } => {
                secret_for(name).unwrap_or_else(|| &self.bytes[text.clone()])
            }
        }
    }
}

/// Whether a slot name's placeholder is recognised by [`placeholders`].
pub(super) fn is_valid_slot(slot: &str) -> bool {
    let p = super::placeholder(slot);
    placeholders(p.as_bytes())
        .first()
        .map(|(n, r)| (n.as_str(), r.len()))
        == Some((slot, p.len()))
}

/// The byte ranges of the placeholders in `bytes`.
pub(super) fn placeholder_ranges(bytes: &[u8]) -> Vec<Range<usize>> {
    placeholders(bytes).into_iter().map(|(_, r)| r).collect()
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Finds `__tokenfs:NAME__`, NAME being `[A-Za-z0-9._-]+`. The name ends at
/// the first `__` followed by something other than `_` (or by the next
/// placeholder), so a name may end in `_` (`x_` → `__tokenfs:x___`) and
/// text right after a placeholder may start with a letter (a suffix such as
/// `x-team`), but a name cannot contain `__`.
fn placeholders(bytes: &[u8]) -> Vec<(String, Range<usize>)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(off) = find(&bytes[from..], OPEN.as_bytes()) {
        let start = from + off;
        let name_start = start + OPEN.len();
        match name_end(&bytes[name_start..]) {
            Some(len) => {
                let end = name_start + len + CLOSE.len();
                let name = String::from_utf8_lossy(&bytes[name_start..name_start + len]);
                found.push((name.into_owned(), start..end));
                from = end;
            }
            None => from = start + 1,
        }
    }
    found
}

/// The length of the name at the start of `rest` (which follows OPEN).
fn name_end(rest: &[u8]) -> Option<usize> {
    let run = rest.iter().take_while(|&&b| is_name_byte(b)).count();
    (1..run).find(|&i| {
        let after = rest.get(i..).and_then(|r| r.strip_prefix(CLOSE.as_bytes()));
        after.is_some_and(|a| a.first() != Some(&b'_') || a.starts_with(OPEN.as_bytes()))
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &Template, tok: &[u8]) -> Vec<u8> {
        let lookup = |slot: &str| (slot == "db.token").then_some(tok);
        let mut out = b"pre:".to_vec();
        t.render(&lookup, &mut out);
        assert_eq!(t.rendered_len(&lookup) + 4, out.len());
        out.split_off(4)
    }

    #[test]
    fn renders_slots_and_keeps_unknown_ones() {
        let t = Template::new(b"a __tokenfs:db.token__ b __tokenfs:other__ c".to_vec());
        assert_eq!(render(&t, b"T0K"), b"a T0K b __tokenfs:other__ c");
        assert_eq!(t.slots(), vec!["db.token", "other"]);
        let t = Template::new(b"__tokenfs:db.token____tokenfs:db.token__".to_vec());
        assert_eq!(render(&t, b"x"), b"xx");
        assert_eq!(t.slots(), vec!["db.token"]);
        let t = Template::new(Vec::new());
        assert_eq!(render(&t, b"x"), b"");
        assert!(t.slots().is_empty());
    }

    #[test]
    fn placeholder_boundaries() {
        let t = Template::new(
            b"__tokenfs:db.token__x-team __tokenfs:x___ __tokenfs:__ __tokenfs:".to_vec(),
        );
        assert_eq!(t.slots(), vec!["db.token", "x_"]);
        assert_eq!(
            render(&t, b"T"),
            b"Tx-team __tokenfs:x___ __tokenfs:__ __tokenfs:"
        );
        assert!(is_valid_slot("databricks.token"));
        assert!(is_valid_slot("claude.access_token"));
        assert!(is_valid_slot("x_"));
        assert!(!is_valid_slot("a__b"));
        assert!(!is_valid_slot("a b"));
        assert!(!is_valid_slot(""));
    }

    #[test]
    fn arbitrary_bytes_do_not_panic() {
        for input in [
            &b"__tokenfs:\xff__"[..],
            b"__tokenfs:a",
            b"__tokenfs:a_",
            b"__tokenfs",
            b"\xff\xfe__tokenfs:a__\xff",
        ] {
            let t = Template::new(input.to_vec());
            let _ = render(&t, b"x");
        }
    }
}
