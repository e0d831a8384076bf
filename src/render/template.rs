//! A template split once into literal runs and slots, so that rendering is a
//! single pass of copies into one allocation.

use std::ops::Range;

pub(super) const OPEN: &str = "__tokenfs:";
pub(super) const CLOSE: &str = "__";

enum Segment {
    Literal(Range<usize>),
    Slot { name: String, text: Range<usize> },
}

pub struct Template {
    bytes: Vec<u8>,
    segments: Vec<Segment>,
}

impl Template {
    pub fn new(bytes: Vec<u8>) -> Template {
        let segments = split(&bytes);
        Template { bytes, segments }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends the rendering; a slot without a value keeps its placeholder.
    pub fn render<'a>(&self, secret_for: &dyn Fn(&str) -> Option<&'a [u8]>, out: &mut Vec<u8>) {
        out.reserve(self.rendered_len(secret_for));
        for s in &self.segments {
            match s {
                Segment::Literal(r) => out.extend_from_slice(&self.bytes[r.clone()]),
                Segment::Slot { name, text } => match secret_for(name) {
                    Some(v) => out.extend_from_slice(v),
                    None => out.extend_from_slice(&self.bytes[text.clone()]),
                },
            }
        }
    }

    pub fn rendered_len<'a>(&self, secret_for: &dyn Fn(&str) -> Option<&'a [u8]>) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(r) => r.len(),
                Segment::Slot { name, text } => secret_for(name).map_or(text.len(), <[u8]>::len),
            })
            .sum()
    }
}

/// Finds `__tokenfs:NAME__` occurrences; NAME is `[A-Za-z0-9_.-]+`.
fn split(bytes: &[u8]) -> Vec<Segment> {
    let mut segments = Vec::new();
    let (mut lit_start, mut i) = (0, 0);
    while let Some(off) = find(&bytes[i..], OPEN.as_bytes()) {
        let start = i + off;
        let name_start = start + OPEN.len();
        let name_len = bytes[name_start..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            .count();
        // The name may itself end in '_': the close marker is the last "__".
        let run = &bytes[name_start..name_start + name_len];
        let Some(close) = run
            .len()
            .checked_sub(CLOSE.len())
            .filter(|&c| c > 0 && run[c..] == *CLOSE.as_bytes())
        else {
            i = name_start;
            continue;
        };
        let end = name_start + close + CLOSE.len();
        if start > lit_start {
            segments.push(Segment::Literal(lit_start..start));
        }
        let name = String::from_utf8_lossy(&bytes[name_start..name_start + close]).into_owned();
        segments.push(Segment::Slot {
            name,
            text: start..end,
        });
        lit_start = end;
        i = end;
    }
    if lit_start < bytes.len() {
        segments.push(Segment::Literal(lit_start..bytes.len()));
    }
    segments
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
