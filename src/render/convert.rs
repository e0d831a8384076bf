//! The format-independent part of converting bytes into a template and of
//! checking a rendering. Formats plug in through [`Syntax`].

use super::encode::Style;
use super::syntax::{Lookup, Syntax, line_col, splice};
use super::template::{OPEN, Slot};
use super::{Binding, Conversion, FormatError, Found, KeyPath, Kind, RenderError, Stray};
use crate::secret::Secret;

pub(super) fn to_template<S: Syntax>(
    input: &[u8],
    bindings: &[Binding],
    known: &[(&str, &[u8])],
    insert_missing: bool,
) -> Conversion {
    let parsed = decode(input).and_then(|text| Ok((text, S::parse(text)?)));
    let (text, doc) = match parsed {
        Ok((text, doc)) => (text.to_owned(), doc),
        Err(e) => {
            return Conversion {
                parse_error: Some(FormatError {
                    message: scrub(e.message, known),
                    ..e
                }),
                template: replace_known(input, known),
                ..Conversion::default()
            };
        }
    };
    let mut conv = Conversion::default();
    let mut state = (text, doc);
    for b in bindings {
        match apply::<S>(&state.0, &state.1, b, known, insert_missing) {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Replaced { text, doc, found }) => {
                state = (text, doc);
                if found.is_none() {
                    conv.blanked.push((b.slot.clone(), b.key.clone()));
                }
                conv.found.extend(found);
            }
            Ok(Outcome::Inserted { text, doc }) => {
                state = (text, doc);
                conv.inserted.push(b.key.clone());
                conv.blanked.push((b.slot.clone(), b.key.clone()));
            }
            Err(problem) => conv.problems.push(scrub(problem, known)),
        }
    }
    let new: Vec<&[u8]> = conv.found.iter().map(|f| f.value.expose()).collect();
    conv.stray = stray(state.0.as_bytes(), known, &new);
    conv.template = state.0.into_bytes();
    conv
}

/// A write that does not parse is kept as written, except that a known
/// token in it (long enough that it cannot be anything else) becomes its
/// placeholder, so no token is stored by tokenfs: the placeholder renders
/// back to the current token, byte for byte where it stood (see
/// [`verbatim_slots`]). Shorter values are never searched for.
fn replace_known(input: &[u8], known: &[(&str, &[u8])]) -> Vec<u8> {
    let mut values: Vec<(&[u8], String)> = known
        .iter()
        .filter(|(_, v)| v.len() >= STRAY_MIN_LEN)
        .map(|(slot, v)| (*v, super::placeholder(slot)))
        .collect();
    values.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match values.iter().find(|(v, _)| input[i..].starts_with(v)) {
            Some((v, ph)) => {
                out.extend_from_slice(ph.as_bytes());
                i += v.len();
            }
            None => {
                out.push(input[i]);
                i += 1;
            }
        }
    }
    out
}

/// The slots of a template that does not parse: the placeholders of the
/// bound slots that [`replace_known`] left, rendered verbatim.
fn verbatim_slots(bytes: &[u8], bindings: &[Binding]) -> Vec<Slot> {
    let mut slots = Vec::new();
    for b in bindings {
        let ph = super::placeholder(&b.slot);
        let mut from = 0;
        while let Some(at) = find(&bytes[from..], ph.as_bytes()).map(|i| from + i) {
            slots.push(Slot {
                text: at..at + ph.len(),
                style: Style::Verbatim,
                binding: Binding::new(b.key.clone(), b.slot.clone()),
            });
            from = at + ph.len();
        }
    }
    slots.sort_by_key(|s| s.text.start);
    slots.dedup_by_key(|s| s.text.start);
    slots
}

/// The bound values of a template: where each binding's placeholder
/// stands, found by parsing (or, in a template that does not parse, the
/// placeholders left by [`replace_known`]).
pub(super) fn slots<S: Syntax>(bytes: &[u8], bindings: &[Binding]) -> Vec<Slot> {
    let Ok((text, doc)) = decode(bytes).and_then(|t| Ok((t, S::parse(t)?))) else {
        return verbatim_slots(bytes, bindings);
    };
    let mut slots: Vec<Slot> = bindings
        .iter()
        .filter(|b| S::get(&doc, &b.key) == Lookup::Str(b.placeholder_value()))
        .filter_map(|b| {
            let (range, style) = S::locate(&doc, text, &b.key)?;
            Some(Slot {
                text: range,
                style,
                binding: b.clone(),
            })
        })
        .collect();
    slots.sort_by_key(|s| s.text.start);
    slots
}

/// What one binding did to the text.
enum Outcome<D> {
    Unchanged,
    Replaced {
        text: String,
        doc: D,
        found: Option<Found>,
    },
    Inserted {
        text: String,
        doc: D,
    },
}

/// Brings the value at one binding's key to its placeholder. `Err` is a
/// problem for the log (no document text in it).
fn apply<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    b: &Binding,
    known: &[(&str, &[u8])],
    insert_missing: bool,
) -> Result<Outcome<S::Doc>, String> {
    let want = b.placeholder_value();
    match S::get(doc, &b.key) {
        Lookup::Str(v) if v == want => Ok(Outcome::Unchanged),
        Lookup::Str(v) => replace::<S>(text, doc, b, &v, &want, known),
        Lookup::Num(v) if b.kind == Kind::Number => replace::<S>(text, doc, b, &v, &want, known),
        Lookup::Num(_) => Err(format!(
            "key {} holds a number, not a string; left alone",
            b.key
        )),
        Lookup::Missing if insert_missing && b.insert => {
            let (text, doc) = insert::<S>(text, doc, &b.key, &want)
                .map_err(|p| format!("cannot insert key {}: {p}", b.key))?;
            Ok(Outcome::Inserted { text, doc })
        }
        Lookup::Missing => Ok(Outcome::Unchanged),
        Lookup::Other(kind) => Err(format!(
            "key {} holds {kind}, not a string; left alone",
            b.key
        )),
    }
}

/// Replaces the string `value` at a bound key, where it stands, by the
/// placeholder written in the same quoting. Its secret part is reported
/// as found, with whether it is one of the slot's known values.
fn replace<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    b: &Binding,
    value: &str,
    want: &str,
    known: &[(&str, &[u8])],
) -> Result<Outcome<S::Doc>, String> {
    let secret = value
        .strip_prefix(b.prefix.as_str())
        .and_then(|v| v.strip_suffix(b.suffix.as_str()))
        .ok_or_else(|| {
            format!(
                "key {} does not have the expected text around the token; left alone",
                b.key
            )
        })?;
    if secret.contains(OPEN) {
        return Err(format!(
            "key {} holds another slot's placeholder; left alone",
            b.key
        ));
    }
    let (text, doc) = replace_at::<S>(text, doc, &b.key, want).ok_or_else(|| {
        format!(
            "cannot rewrite the value of key {} in place (an unsupported layout, such as a block scalar); left alone",
            b.key
        )
    })?;
    let found = (!secret.is_empty() && b.kind == Kind::Secret).then(|| Found {
        slot: b.slot.clone(),
        key: b.key.clone(),
        known: known
            .iter()
            .any(|(slot, v)| *slot == b.slot && *v == secret.as_bytes()),
        value: Secret::new(secret),
    });
    Ok(Outcome::Replaced { text, doc, found })
}

/// Writes `want` over the value at `key`, in the quoting the value has
/// there, and keeps the edit only if the result is the original document
/// with exactly `want` at `key`.
fn replace_at<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    key: &KeyPath,
    want: &str,
) -> Option<(String, S::Doc)> {
    let mut expected = doc.clone();
    if !S::set(&mut expected, key, want) {
        return None;
    }
    let (range, style) = S::locate(doc, text, key)?;
    let edited = splice(text, range, &style.write(want));
    let parsed = S::parse(&edited).ok()?;
    let right = S::get(&parsed, key) == Lookup::Str(want.to_owned());
    (right && S::same(&parsed, &expected)).then_some((edited, parsed))
}

/// Inserts `key` with `want` and verifies that the result is the original
/// document plus exactly that key.
fn insert<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    key: &KeyPath,
    want: &str,
) -> Result<(String, S::Doc), String> {
    let mut expected = doc.clone();
    if !S::set(&mut expected, key, want) {
        return Err("a parent of the key is not a mapping".into());
    }
    let edited = S::insert(text, key, want)?;
    let unsupported = || "this layout is not supported for insertion".to_string();
    let parsed = S::parse(&edited).map_err(|_| unsupported())?;
    let right = S::get(&parsed, key) == Lookup::Str(want.to_owned());
    if !(right && S::same(&parsed, &expected)) {
        return Err(unsupported());
    }
    Ok((edited, parsed))
}

/// Secrets shorter than this are not looked for outside bound keys: a
/// short value (`none`, `test`, `123`) is far more likely the user's own
/// text than a copy of a token.
pub const STRAY_MIN_LEN: usize = 16;

/// Where a known secret (or a value just found at a bound key) stands in
/// `bytes` outside the bound positions, which by now hold placeholders.
/// Such bytes are the user's and are kept; they are reported.
fn stray(bytes: &[u8], known: &[(&str, &[u8])], new: &[&[u8]]) -> Vec<Stray> {
    let text = String::from_utf8_lossy(bytes);
    let mut values: Vec<&[u8]> = known
        .iter()
        .map(|(_, v)| *v)
        .chain(new.iter().copied())
        .collect();
    values.retain(|v| v.len() >= STRAY_MIN_LEN);
    values.sort();
    values.dedup();
    let mut out: Vec<Stray> = Vec::new();
    for v in values {
        let mut from = 0;
        while let Some(at) = find(&bytes[from..], v).map(|i| from + i) {
            let (line, column) = line_col(&text, at);
            out.push(Stray {
                line,
                column,
                key: key_on_line(&text, at),
                fingerprint: Secret::from_bytes(v.to_vec())
                    .map(|s| s.fingerprint())
                    .unwrap_or_default(),
            });
            from = at + v.len();
        }
    }
    out.sort_by_key(|s| (s.line, s.column));
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The key a line assigns (`key:`, `"key":`, `key =`), as a hint for
/// messages; empty when the line does not look like an assignment.
fn key_on_line(text: &str, offset: usize) -> String {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let line = line
        .trim_start()
        .trim_start_matches("- ")
        .trim_start_matches("export ");
    let Some(end) = line.find([':', '=']) else {
        return String::new();
    };
    let key = line[..end].trim().trim_matches(['"', '\'']);
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if plain { key.to_owned() } else { String::new() }
}

pub(super) fn check<'a, S: Syntax>(
    rendered: &[u8],
    bindings: &[Binding],
    secret_for: &dyn Fn(&str) -> Option<&'a [u8]>,
) -> Result<(), RenderError> {
    let secrets: Vec<(&str, &[u8])> = bindings
        .iter()
        .filter_map(|b| Some((b.slot.as_str(), secret_for(&b.slot)?)))
        .collect();
    let scrubbed = |e: FormatError| {
        RenderError::Parse(FormatError {
            message: scrub(e.message, &secrets),
            ..e
        })
    };
    let text = decode(rendered).map_err(scrubbed)?;
    let doc = S::parse(text).map_err(scrubbed)?;
    for b in bindings {
        let Some(secret) = secret_for(&b.slot) else {
            continue;
        };
        let want = [b.prefix.as_bytes(), secret, b.suffix.as_bytes()].concat();
        match S::get(&doc, &b.key) {
            Lookup::Str(v) if v.as_bytes() == want.as_slice() && b.kind != Kind::Number => {}
            Lookup::Num(v) if v.as_bytes() == want.as_slice() && b.kind == Kind::Number => {}
            Lookup::Missing => return Err(RenderError::Missing { key: b.key.clone() }),
            _ => {
                return Err(RenderError::Mismatch {
                    key: b.key.clone(),
                    slot: b.slot.clone(),
                });
            }
        }
    }
    Ok(())
}

pub(super) fn locate<S: Syntax>(text: &str, key: &KeyPath) -> Option<std::ops::Range<usize>> {
    S::locate(&S::parse(text).ok()?, text, key).map(|(r, _)| r)
}

pub(super) fn lookup<S: Syntax>(text: &str, key: &KeyPath) -> Option<String> {
    match S::get(&S::parse(text).ok()?, key) {
        Lookup::Str(s) => Some(s),
        _ => None,
    }
}

/// The text of a document, or where it stops being UTF-8.
fn decode(bytes: &[u8]) -> Result<&str, FormatError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
        let (line, column) = line_col(valid, valid.len());
        FormatError {
            line,
            column,
            message: "not valid UTF-8".into(),
        }
    })
}

/// Replaces any known secret in a message by its fingerprint: messages go
/// to logs. Parser messages are not supposed to quote the document; this is
/// the second line of defence.
pub(super) fn scrub(mut message: String, known: &[(&str, &[u8])]) -> String {
    let mut values: Vec<&str> = known
        .iter()
        .filter_map(|(_, v)| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty())
        .collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in values {
        if message.contains(v) {
            message = message.replace(v, &Secret::new(v).fingerprint());
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_hides_secrets() {
        let m = scrub(
            "bad sk-SECRET-123 and sk-SECRET".into(),
            &[("a", b"sk-SECRET"), ("b", b"sk-SECRET-123")],
        );
        assert!(!m.contains("SECRET"), "{m}");
    }

    #[test]
    fn utf8_errors_have_positions() {
        let e = decode(b"ab\ncd\xff").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
    }
}
