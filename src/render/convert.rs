//! The format-independent part of converting bytes into a template and of
//! checking a rendering. Formats plug in through [`Syntax`].

use std::ops::Range;

use super::syntax::{Lookup, Syntax, line_col, splice};
use super::template::{self, OPEN};
use super::{Binding, Conversion, FormatError, Found, KeyPath, RenderError, placeholder};
use crate::secret::Secret;

/// How many places a value is tried at before giving up: each try parses
/// the whole document, and a value found at its key's span needs one.
const MAX_TRIES: usize = 64;

pub(super) fn to_template<S: Syntax>(
    input: &[u8],
    bindings: &[Binding],
    known: &[(&str, &[u8])],
    insert_missing: bool,
) -> Conversion {
    let substituted = replace_known(input, known);
    let parsed = decode(&substituted).and_then(|text| Ok((text, S::parse(text)?)));
    let (text, doc) = match parsed {
        Ok((text, doc)) => (text.to_owned(), doc),
        Err(e) => {
            return Conversion {
                parse_error: Some(FormatError {
                    message: scrub(e.message, known),
                    ..e
                }),
                template: substituted,
                ..Conversion::default()
            };
        }
    };
    let mut conv = Conversion::default();
    let mut state = (text, doc);
    for b in bindings {
        match apply::<S>(&state.0, &state.1, b, insert_missing) {
            Ok(Outcome::Unchanged) => {}
            Ok(Outcome::Replaced { text, doc, found }) => {
                state = (text, doc);
                conv.found.extend(found);
            }
            Ok(Outcome::Inserted { text, doc }) => {
                state = (text, doc);
                conv.inserted.push(b.key.clone());
            }
            Err(problem) => conv.problems.push(scrub(problem, known)),
        }
    }
    conv.template = state.0.into_bytes();
    conv
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
    insert_missing: bool,
) -> Result<Outcome<S::Doc>, String> {
    let want = b.placeholder_value();
    match S::get(doc, &b.key) {
        Lookup::Str(v) if v == want => Ok(Outcome::Unchanged),
        Lookup::Str(v) => replace::<S>(text, doc, b, &v, &want),
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

/// Replaces the secret part of the string `value` at a bound key by the
/// placeholder; the old secret, if not empty, is reported as found.
fn replace<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    b: &Binding,
    value: &str,
    want: &str,
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
    let (text, doc) = replace_at::<S>(text, doc, &b.key, secret, &placeholder(&b.slot), want)
        .ok_or_else(|| {
            format!(
                "cannot find where the value of key {} is written (escaped?); left alone",
                b.key
            )
        })?;
    let found = (!secret.is_empty()).then(|| Found {
        slot: b.slot.clone(),
        key: b.key.clone(),
        value: Secret::new(secret),
    });
    Ok(Outcome::Replaced { text, doc, found })
}

/// Finds the occurrence of `secret` that is (part of) the value at `key` —
/// the same string may stand elsewhere too — and replaces it by `with`.
/// Candidates inside the value's span come first, then the rest of the
/// text; a candidate is kept only if the edited document is the original
/// with exactly `want` at `key`.
fn replace_at<S: Syntax>(
    text: &str,
    doc: &S::Doc,
    key: &KeyPath,
    secret: &str,
    with: &str,
    want: &str,
) -> Option<(String, S::Doc)> {
    let mut expected = doc.clone();
    if !S::set(&mut expected, key, want) {
        return None;
    }
    let span = S::span(doc, text, key).filter(|r| text.get(r.clone()).is_some());
    let whole = 0..text.len();
    let inside = candidates(text, span.clone().unwrap_or(whole.clone()), secret);
    let outside = candidates(text, whole, secret).filter(|at| {
        span.as_ref()
            .is_some_and(|s| !s.contains(at) && *at != s.end)
    });
    inside.chain(outside).take(MAX_TRIES).find_map(|at| {
        let edited = splice(text, at..at + secret.len(), with);
        let parsed = S::parse(&edited).ok()?;
        let right = S::get(&parsed, key) == Lookup::Str(want.to_owned());
        (right && S::same(&parsed, &expected)).then_some((edited, parsed))
    })
}

/// Byte offsets in `range` where `needle` starts; for an empty needle, every
/// character boundary (an empty value is filled where it stands).
fn candidates<'t>(
    text: &'t str,
    range: Range<usize>,
    needle: &'t str,
) -> Box<dyn Iterator<Item = usize> + 't> {
    let start = range.start;
    if needle.is_empty() {
        return Box::new(
            range
                .clone()
                .chain([range.end])
                .filter(|&i| text.is_char_boundary(i)),
        );
    }
    let hay = &text[range];
    Box::new(hay.match_indices(needle).map(move |(i, _)| start + i))
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
            Lookup::Str(v) if v.as_bytes() == want.as_slice() => {}
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

/// Every occurrence of every known secret becomes its slot's placeholder,
/// in one pass, trying longer values first (so a token that contains
/// another is not split). Placeholders already in the input are copied as
/// they are, so a short secret never matches inside one.
fn replace_known(input: &[u8], known: &[(&str, &[u8])]) -> Vec<u8> {
    let mut order: Vec<(&[u8], String)> = known
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(slot, v)| (*v, placeholder(slot)))
        .collect();
    order.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    let mut kept = template::placeholder_ranges(input).into_iter().peekable();
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        while kept.next_if(|r| r.end <= i).is_some() {}
        if let Some(r) = kept.next_if(|r| r.start == i) {
            out.extend_from_slice(&input[r.clone()]);
            i = r.end;
        } else if let Some((v, ph)) = order.iter().find(|(v, _)| input[i..].starts_with(v)) {
            out.extend_from_slice(ph.as_bytes());
            i += v.len();
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    out
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
    fn known_secrets_are_replaced_longest_first_and_never_inside_placeholders() {
        let known: [(&str, &[u8]); 3] = [("a", b"tok"), ("b", b"tok-long"), ("c", b"db")];
        let out = replace_known(b"x tok-long tok __tokenfs:db.token__ db", &known);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "x __tokenfs:b__ __tokenfs:a__ __tokenfs:db.token__ __tokenfs:c__"
        );
        assert_eq!(replace_known(b"abc", &[("a", b"")]), b"abc");
        assert_eq!(replace_known(b"", &known), b"");
    }

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
