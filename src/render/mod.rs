//! Templates: a managed file's bytes with every secret replaced by a
//! placeholder, and the way back.
//!
//! Rendering is plain substitution into precomputed segments (it runs on
//! every open). Converting bytes *into* a template, and checking a rendering,
//! use each format's real parser for meaning and never rewrite what they do
//! not have to: comments, key order, quoting and layout survive byte for byte.
//! Nothing here knows about FUSE, files or the store.

mod formats;
mod template;

use std::fmt;
use std::str::FromStr;

pub use template::Template;

use crate::secret::Secret;

/// The syntax of a managed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Yaml,
    Json,
    Toml,
    Dotenv,
    Ini,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Toml => "toml",
            Format::Dotenv => "dotenv",
            Format::Ini => "ini",
            Format::Raw => "raw",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        [
            Format::Yaml,
            Format::Json,
            Format::Toml,
            Format::Dotenv,
            Format::Ini,
            Format::Raw,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
        .ok_or_else(|| {
            format!("unknown format \"{s}\" (expected yaml, json, toml, dotenv, ini or raw)")
        })
    }
}

/// A key path into a document: dot-separated segments, where an all-digit
/// segment indexes a sequence. For INI the first segment is the section and
/// the rest (dots included) the key; for `raw` the empty path is the file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyPath {
    raw: String,
    segments: Vec<String>,
}

impl KeyPath {
    /// A path from segments that may themselves contain dots (an OpenCode
    /// provider id such as `my.proxy`).
    pub fn from_segments(segments: Vec<String>) -> KeyPath {
        KeyPath {
            raw: segments.join("."),
            segments,
        }
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The segments as INI sees them: section, then the key (may hold dots).
    fn ini_parts(&self) -> Option<(&str, &str)> {
        self.raw.split_once('.')
    }
}

impl FromStr for KeyPath {
    type Err = String;
    fn from_str(s: &str) -> Result<KeyPath, String> {
        if s.is_empty() {
            return Ok(KeyPath {
                raw: String::new(),
                segments: Vec::new(),
            });
        }
        let segments: Vec<String> = s.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`{s}` has an empty segment"));
        }
        Ok(KeyPath {
            raw: s.to_owned(),
            segments,
        })
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.raw.is_empty() {
            "(whole file)"
        } else {
            &self.raw
        })
    }
}

/// Where a secret goes: the value at `key` is exactly `prefix + secret +
/// suffix` (usually both empty; `Bearer ` for a header; a header list for
/// OTEL's `Authorization=Bearer …,x-other=1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub key: KeyPath,
    /// An opaque slot name such as `databricks.token`.
    pub slot: String,
    pub prefix: String,
    pub suffix: String,
    /// Insert the key when it is missing (a preset knows where a token
    /// belongs and where it only may be).
    pub insert: bool,
}

impl Binding {
    /// A binding of the whole value, inserted when missing.
    pub fn new(key: KeyPath, slot: impl Into<String>) -> Binding {
        Binding {
            key,
            slot: slot.into(),
            prefix: String::new(),
            suffix: String::new(),
            insert: true,
        }
    }
}

/// The placeholder text for a slot. Valid as a YAML plain scalar, inside
/// JSON/TOML strings, and in dotenv and INI values.
pub fn placeholder(slot: &str) -> String {
    format!("{}{slot}{}", template::OPEN, template::CLOSE)
}

/// A value found at a bound key that is not ours: a candidate for adoption.
pub struct Found {
    pub slot: String,
    pub key: KeyPath,
    /// Without the binding's prefix.
    pub value: Secret,
}

/// The result of turning bytes into a template.
#[derive(Default)]
pub struct Conversion {
    pub template: Vec<u8>,
    pub found: Vec<Found>,
    pub inserted: Vec<KeyPath>,
    /// The input did not parse: the template is the input with known
    /// secrets replaced, nothing else changed.
    pub parse_error: Option<FormatError>,
    /// Notes for the log. Never contain document text.
    pub problems: Vec<String>,
}

/// A parse error's position and the parser's message (never document text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct FormatError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("does not parse: {0}")]
    Parse(FormatError),
    #[error("key {key} is missing")]
    Missing { key: KeyPath },
    #[error("key {key} does not hold the secret of {slot}")]
    Mismatch { key: KeyPath, slot: String },
}

/// What a key path leads to in a parsed document.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Missing,
    Str(String),
    /// A number, mapping, list…: not ours to touch.
    Other(&'static str),
}

/// Turns bytes (found at mount time, or just written by a program) into a
/// template. See the module doc; in short: known secrets become
/// placeholders, other values at bound keys are reported in `found` (and
/// also become placeholders), missing keys are inserted if asked.
pub fn to_template(
    format: Format,
    input: &[u8],
    bindings: &[Binding],
    known: &[(&str, &[u8])],
    insert_missing: bool,
) -> Conversion {
    let substituted = replace_known(input, known);
    let mut conv = Conversion {
        template: substituted.clone(),
        ..Conversion::default()
    };
    let scrub = |m: String| scrub(m, known);
    let Ok(mut text) = String::from_utf8(substituted) else {
        conv.parse_error = Some(FormatError {
            line: 0,
            column: 0,
            message: "not UTF-8".into(),
        });
        return conv;
    };
    if let Err(e) = formats::parse_check(format, &text) {
        conv.parse_error = Some(FormatError {
            message: scrub(e.message),
            ..e
        });
        return conv;
    }
    for b in bindings {
        let ph = format!("{}{}{}", b.prefix, placeholder(&b.slot), b.suffix);
        match formats::value_at(format, &text, &b.key) {
            Ok(Lookup::Str(v)) if v == ph => {}
            Ok(Lookup::Str(v)) => match adopt_value(format, &mut text, b, &v, &ph) {
                Ok(Some(found)) => conv.found.push(found),
                Ok(None) => {}
                Err(p) => conv.problems.push(scrub(p)),
            },
            Ok(Lookup::Missing) if insert_missing && b.insert => {
                match formats::insert(format, &text, &b.key, &ph) {
                    Ok(t) => {
                        text = t;
                        conv.inserted.push(b.key.clone());
                    }
                    Err(p) => conv
                        .problems
                        .push(scrub(format!("cannot insert key {}: {p}", b.key))),
                }
            }
            Ok(Lookup::Missing) => {}
            Ok(Lookup::Other(kind)) => {
                conv.problems.push(format!(
                    "key {} holds {kind}, not a string; left alone",
                    b.key
                ));
            }
            Err(e) => conv
                .problems
                .push(scrub(format!("key {}: {}", b.key, e.message))),
        }
    }
    conv.template = text.into_bytes();
    conv
}

/// Replaces the value at a binding's key with its placeholder; returns the
/// old value (minus prefix) unless it was empty.
fn adopt_value(
    format: Format,
    text: &mut String,
    b: &Binding,
    value: &str,
    ph: &str,
) -> Result<Option<Found>, String> {
    let secret = value
        .strip_prefix(b.prefix.as_str())
        .and_then(|v| v.strip_suffix(b.suffix.as_str()));
    let Some(secret) = secret else {
        return Err(format!(
            "key {} does not have the expected text around the token; left alone",
            b.key
        ));
    };
    *text = formats::replace_value(format, text, &b.key, value, ph).ok_or_else(|| {
        format!(
            "cannot locate the value of key {} in the text (escaped?); left alone",
            b.key
        )
    })?;
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Found {
        slot: b.slot.clone(),
        key: b.key.clone(),
        value: Secret::new(secret),
    }))
}

/// Every occurrence of every known secret becomes its placeholder, longest
/// first (so a token that contains another is not split).
fn replace_known(input: &[u8], known: &[(&str, &[u8])]) -> Vec<u8> {
    let mut order: Vec<&(&str, &[u8])> = known.iter().filter(|(_, v)| !v.is_empty()).collect();
    order.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
    let mut out = input.to_vec();
    for (slot, value) in order {
        out = replace_bytes(&out, value, placeholder(slot).as_bytes());
    }
    out
}

fn replace_bytes(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// Replaces any known secret in a message by its fingerprint.
fn scrub(mut message: String, known: &[(&str, &[u8])]) -> String {
    for (_, v) in known {
        if let Ok(s) = std::str::from_utf8(v) {
            if !s.is_empty() && message.contains(s) {
                message = message.replace(s, &Secret::new(s).fingerprint());
            }
        }
    }
    message
}

/// The string at `key` in `text`, if there is one (for presets and `init`).
pub fn lookup(format: Format, text: &str, key: &KeyPath) -> Option<String> {
    match formats::value_at(format, text, key) {
        Ok(Lookup::Str(s)) => Some(s),
        _ => None,
    }
}

/// Checks a rendering: it parses, and each bound key holds prefix + secret.
pub fn check<'a>(
    format: Format,
    rendered: &[u8],
    bindings: &[Binding],
    secret_for: &dyn Fn(&str) -> Option<&'a [u8]>,
) -> Result<(), RenderError> {
    let text = std::str::from_utf8(rendered).map_err(|_| {
        RenderError::Parse(FormatError {
            line: 0,
            column: 0,
            message: "not UTF-8".into(),
        })
    })?;
    formats::parse_check(format, text).map_err(RenderError::Parse)?;
    for b in bindings {
        let Some(secret) = secret_for(&b.slot) else {
            continue;
        };
        let want = [b.prefix.as_bytes(), secret, b.suffix.as_bytes()].concat();
        match formats::value_at(format, text, &b.key).map_err(RenderError::Parse)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn b(key: &str, slot: &str) -> Binding {
        Binding::new(key.parse().unwrap(), slot)
    }

    const PH: &str = "__tokenfs:db.token__";

    fn secret<'a>(v: &'a [u8]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |slot: &str| (slot == "db.token").then_some(v)
    }

    /// Converts `input` holding `tok`, checks the template is `input` with the
    /// token replaced, renders `fresh` and checks it is `input` with the token
    /// swapped, and converts the rendering back to the same template.
    fn round_trip(format: Format, input: &str, key: &str, tok: &str) {
        let binding = [b(key, "db.token")];
        let conv = to_template(format, input.as_bytes(), &binding, &[], true);
        assert!(conv.parse_error.is_none(), "{:?}", conv.parse_error);
        assert_eq!(
            String::from_utf8(conv.template.clone()).unwrap(),
            input.replace(tok, PH)
        );
        assert_eq!(conv.found.len(), 1);
        assert_eq!(conv.found[0].value.expose_str(), tok);
        let fresh = "tok-NEW.abc_123456789";
        let t = Template::new(conv.template.clone());
        let mut out = Vec::new();
        t.render(&secret(fresh.as_bytes()), &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            input.replace(tok, fresh)
        );
        assert_eq!(t.rendered_len(&secret(fresh.as_bytes())), out.len());
        check(format, &out, &binding, &secret(fresh.as_bytes())).unwrap();
        let again = to_template(
            format,
            &out,
            &binding,
            &[("db.token", fresh.as_bytes())],
            true,
        );
        assert_eq!(again.template, conv.template);
        assert!(again.found.is_empty());
    }

    const HERMES: &str = "# Hermes\nmodel:\n  provider: custom\n  base_url: https://gw.example.com\n  api_key: dapiSECRET123\n  # comment\nfallback_providers:\n  - base_url: https://other.example.com\n    api_key: other-key\n  - base_url: https://gw.example.com\n    api_key: dapiSECRET123\n";

    #[test]
    fn yaml_round_trip_and_only_the_bound_occurrence_is_found() {
        round_trip(
            Format::Yaml,
            "# c\nmodel:\n  api_key: dapiSECRET123 # trailing\n  x: 1\n",
            "model.api_key",
            "dapiSECRET123",
        );
        let conv = to_template(
            Format::Yaml,
            HERMES.as_bytes(),
            &[b("model.api_key", "db.token")],
            &[],
            true,
        );
        let text = String::from_utf8(conv.template).unwrap();
        // The same value under fallback_providers (unbound here) is untouched.
        assert_eq!(text.matches(PH).count(), 1);
        assert!(text.contains("    api_key: dapiSECRET123\n"));
        let conv = to_template(
            Format::Yaml,
            HERMES.as_bytes(),
            &[b("fallback_providers.1.api_key", "db.token")],
            &[],
            true,
        );
        assert!(
            String::from_utf8(conv.template)
                .unwrap()
                .ends_with(&format!("    api_key: {PH}\n"))
        );
    }

    #[test]
    fn json_toml_dotenv_ini_raw_round_trip() {
        round_trip(
            Format::Json,
            "{\n  \"env\": {\n    \"ANTHROPIC_AUTH_TOKEN\": \"sk-1\",\n    \"X\": \"other\"\n  },\n  \"permissions\": {}\n}\n",
            "env.ANTHROPIC_AUTH_TOKEN",
            "sk-1",
        );
        round_trip(
            Format::Toml,
            "# codex\nmodel = \"o3\"\n\n[auth]\nkey = \"tok-1\" # keep\n",
            "auth.key",
            "tok-1",
        );
        round_trip(
            Format::Dotenv,
            "# env\nexport OPENAI_API_KEY=sk-abc\nOTHER=1\n",
            "OPENAI_API_KEY",
            "sk-abc",
        );
        round_trip(
            Format::Dotenv,
            "GEMINI_API_KEY=\"g-key\"\n",
            "GEMINI_API_KEY",
            "g-key",
        );
        round_trip(
            Format::Ini,
            "[DEFAULT]\nhost = https://x\ntoken = dapi42\n\n[other]\ntoken = keep\n",
            "DEFAULT.token",
            "dapi42",
        );
        round_trip(Format::Raw, "rawtoken\n", "", "rawtoken");
    }

    #[test]
    fn missing_keys_are_inserted_without_touching_the_rest() {
        let ins = |f: Format, input: &str, key: &str| {
            let conv = to_template(f, input.as_bytes(), &[b(key, "db.token")], &[], true);
            assert_eq!(
                conv.inserted.len(),
                1,
                "{f}: {:?} {:?}",
                conv.problems,
                conv.parse_error
            );
            String::from_utf8(conv.template).unwrap()
        };
        assert_eq!(
            ins(
                Format::Yaml,
                "# top\nmodel:\n  provider: x\n\n# tail\n",
                "model.api_key"
            ),
            format!("# top\nmodel:\n  provider: x\n  api_key: {PH}\n\n# tail\n")
        );
        assert_eq!(
            ins(Format::Yaml, "", "model.api_key"),
            format!("model:\n  api_key: {PH}\n")
        );
        assert_eq!(
            ins(Format::Yaml, "agent:\n  x: 1\n", "model.api_key"),
            format!("agent:\n  x: 1\nmodel:\n  api_key: {PH}\n")
        );
        assert_eq!(
            ins(Format::Dotenv, "A=1", "KEY"),
            format!("A=1\nKEY={PH}\n")
        );
        assert_eq!(
            ins(
                Format::Ini,
                "[DEFAULT]\nhost = h\n\n[p]\nx = 1\n",
                "DEFAULT.token"
            ),
            format!("[DEFAULT]\nhost = h\ntoken = {PH}\n\n[p]\nx = 1\n")
        );
        assert_eq!(
            ins(Format::Toml, "# c\na = 1\n", "auth.key"),
            format!("# c\na = 1\n\n[auth]\nkey = \"{PH}\"\n")
        );
        assert_eq!(
            ins(Format::Json, "{\"a\": 1}\n", "env.K"),
            format!("{{\n  \"a\": 1,\n  \"env\": {{\n    \"K\": \"{PH}\"\n  }}\n}}\n")
        );
        assert_eq!(ins(Format::Raw, "", ""), PH);
    }

    #[test]
    fn broken_documents_report_position_and_never_the_secret() {
        let input = "model:\n  api_key: [sk-VERYSECRET\n";
        let conv = to_template(
            Format::Yaml,
            input.as_bytes(),
            &[b("model.api_key", "db.token")],
            &[("db.token", b"sk-VERYSECRET")],
            true,
        );
        let e = conv.parse_error.expect("parse error");
        assert!(e.line >= 2, "{e}");
        assert!(!e.to_string().contains("VERYSECRET"));
        assert_eq!(
            String::from_utf8(conv.template).unwrap(),
            input.replace("sk-VERYSECRET", PH)
        );
        for f in [Format::Json, Format::Toml, Format::Ini, Format::Dotenv] {
            let bad = "{ key = = \"sk-VERYSECRET\n[[\n";
            let conv = to_template(
                f,
                bad.as_bytes(),
                &[b("a.b", "db.token")],
                &[("db.token", b"sk-VERYSECRET")],
                true,
            );
            if let Some(e) = conv.parse_error {
                assert!(!e.to_string().contains("VERYSECRET"), "{f}: {e}");
            }
        }
        let conv = to_template(Format::Json, &[0xff, 0xfe, b'{'], &[], &[], true);
        assert!(conv.parse_error.is_some());
    }

    #[test]
    fn prefixes_and_empty_values() {
        let bind = [Binding {
            prefix: "Authorization=Bearer ".into(),
            suffix: ",x-team=a".into(),
            ..b("h", "db.token")
        }];
        let input = b"{\"h\": \"Authorization=Bearer abc,x-team=a\"}";
        let conv = to_template(Format::Json, input, &bind, &[], true);
        assert_eq!(
            String::from_utf8(conv.template).unwrap(),
            format!("{{\"h\": \"Authorization=Bearer {PH},x-team=a\"}}")
        );
        assert_eq!(conv.found[0].value.expose_str(), "abc");
        // A binding that may not insert leaves a missing key missing.
        let optional = [Binding {
            insert: false,
            ..b("k", "db.token")
        }];
        let conv = to_template(Format::Json, b"{}", &optional, &[], true);
        assert!(conv.inserted.is_empty() && conv.template == b"{}");
        let conv = to_template(
            Format::Json,
            b"{\"k\": \"\"}",
            &[b("k", "db.token")],
            &[],
            true,
        );
        assert_eq!(
            String::from_utf8(conv.template).unwrap(),
            format!("{{\"k\": \"{PH}\"}}")
        );
        assert!(conv.found.is_empty());
    }

    #[test]
    fn randomized_round_trips() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
        for _ in 0..200 {
            let len = 8 + (next() % 120) as usize;
            let tok: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
                .collect();
            let tok = format!("t{tok}");
            round_trip(
                Format::Yaml,
                &format!("model:\n  api_key: {tok}\n"),
                "model.api_key",
                &tok,
            );
            round_trip(
                Format::Json,
                &format!("{{\"a\": {{\"k\": \"{tok}\"}}}}"),
                "a.k",
                &tok,
            );
            round_trip(Format::Toml, &format!("[a]\nk = \"{tok}\"\n"), "a.k", &tok);
            round_trip(Format::Dotenv, &format!("K={tok}\n"), "K", &tok);
            round_trip(Format::Ini, &format!("[s]\nk = {tok}\n"), "s.k", &tok);
        }
    }
}
