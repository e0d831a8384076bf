//! A template split once into literal runs and bound slots, so that
//! rendering is one pass of copies and one encoding per slot.
//!
//! Slots are found by *position*: the value at each binding's key, located
//! by parsing, when it holds exactly that binding's placeholder. Placeholder
//! text anywhere else is the user's and stays literal, and a template that
//! does not parse has no slots at all.

use std::ops::Range;

use super::encode::{Style, Unfit};
use super::{Binding, KeyPath};

pub(super) const OPEN: &str = "__tokenfs:";
pub(super) const CLOSE: &str = "__";

/// A bound value in the template.
pub(super) struct Slot {
    /// The raw value text (quotes included) in the template.
    pub text: Range<usize>,
    pub style: Style,
    pub binding: Binding,
}

enum Segment {
    Literal(Range<usize>),
    Slot(Slot),
}

/// Why a secret could not be rendered at a bound key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key}: {why}")]
pub struct Refusal {
    pub key: KeyPath,
    pub slot: String,
    pub why: Unfit,
}

/// Template bytes, pre-split into literal runs and bound slots.
pub struct Template {
    bytes: Vec<u8>,
    segments: Vec<Segment>,
}

impl Template {
    /// Splits `bytes` at the given slots (from `convert::slots`), which
    /// must be in order and not overlap.
    pub(super) fn from_slots(bytes: Vec<u8>, slots: Vec<Slot>) -> Template {
        let mut segments = Vec::with_capacity(2 * slots.len() + 1);
        let mut at = 0;
        for slot in slots {
            if slot.text.start < at || slot.text.end > bytes.len() {
                continue;
            }
            if slot.text.start > at {
                segments.push(Segment::Literal(at..slot.text.start));
            }
            at = slot.text.end;
            segments.push(Segment::Slot(slot));
        }
        if at < bytes.len() {
            segments.push(Segment::Literal(at..bytes.len()));
        }
        Template { bytes, segments }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bindings that have a slot here.
    pub fn bound(&self) -> impl Iterator<Item = &Binding> {
        self.slots().map(|s| &s.binding)
    }

    fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Slot(slot) => Some(slot),
            Segment::Literal(_) => None,
        })
    }

    /// Appends the rendering to `out`. A slot without a secret keeps its
    /// placeholder; so does one whose secret this position cannot carry
    /// (publishing refuses such secrets first, see [`Template::carries`]),
    /// which is returned.
    pub fn render<'a>(
        &self,
        secret_for: &dyn Fn(&str) -> Option<&'a [u8]>,
        out: &mut Vec<u8>,
    ) -> Vec<Refusal> {
        let mut refused = Vec::new();
        out.reserve(self.bytes.len() + 64 * self.segments.len());
        for s in &self.segments {
            match s {
                Segment::Literal(r) => out.extend_from_slice(&self.bytes[r.clone()]),
                Segment::Slot(slot) => match secret_for(&slot.binding.slot) {
                    None => out.extend_from_slice(&self.bytes[slot.text.clone()]),
                    Some(secret) => match encode(slot, secret) {
                        Ok(text) => out.extend_from_slice(text.as_bytes()),
                        Err(r) => {
                            out.extend_from_slice(&self.bytes[slot.text.clone()]);
                            refused.push(r);
                        }
                    },
                },
            }
        }
        refused
    }

    /// Whether every position bound to `slot` can carry `secret`.
    pub fn carries(&self, slot: &str, secret: &[u8]) -> Result<(), Refusal> {
        self.slots()
            .filter(|s| s.binding.slot == slot)
            .try_for_each(|s| encode(s, secret).map(drop))
    }
}

/// The secret, with the binding's prefix and suffix, in the slot's style.
fn encode(slot: &Slot, secret: &[u8]) -> Result<String, Refusal> {
    let b = &slot.binding;
    let refuse = |why| Refusal {
        key: b.key.clone(),
        slot: b.slot.clone(),
        why,
    };
    let s =
        std::str::from_utf8(secret).map_err(|_| refuse(Unfit("the value is not UTF-8 text")))?;
    let value = format!("{}{s}{}", b.prefix, b.suffix);
    if b.kind == super::Kind::Number {
        let digits = value.strip_prefix('-').unwrap_or(&value);
        if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
            return Err(refuse(Unfit("the value is not a whole number")));
        }
        return Ok(value);
    }
    slot.style.encode(&value).map_err(refuse)
}

/// Whether a slot name makes a placeholder that reads back as one:
/// non-empty, `[A-Za-z0-9._-]`, no `__` inside.
pub(super) fn is_valid_slot(slot: &str) -> bool {
    !slot.is_empty()
        && slot
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !slot.contains("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert!(is_valid_slot("databricks.token"));
        assert!(is_valid_slot("claude.access_token"));
        assert!(!is_valid_slot("a__b"));
        assert!(!is_valid_slot("a b"));
        assert!(!is_valid_slot(""));
    }
}
