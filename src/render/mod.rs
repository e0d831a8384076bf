//! Templates: a managed file's bytes with the value at each bound key
//! replaced by a placeholder, and the way back.
//!
//! Everything here works by *position*: a bound value is the value at its
//! key, located by each format's real parser, never a search for a value.
//! Converting bytes into a template ([`to_template`]) rewrites exactly the
//! bound values, in the quoting they were written in; every other byte is
//! the user's and is kept, whatever it equals. Every edit is verified by
//! parsing the result and comparing it with the document the edit was meant
//! to produce: an edit that would change anything else is refused and
//! reported instead. Rendering ([`Template::render`]) writes each secret
//! encoded for its position ([`encode`]); a secret a position cannot carry
//! is refused ([`Template::carries`]) before it is published.
//!
//! Nothing here knows about FUSE, files, credentials or the store: a secret
//! goes into a *slot*, an opaque name such as `databricks.token`.

mod convert;
mod dotenv;
mod encode;
mod ini;
mod json;
mod raw;
mod syntax;
mod template;
mod toml;
mod yaml;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

pub use convert::STRAY_MIN_LEN;
pub use encode::{Style, Unfit};
// `Kind` is defined below, next to `Binding`.
pub use template::{Refusal, Template};

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
    const ALL: [Format; 6] = [
        Format::Yaml,
        Format::Json,
        Format::Toml,
        Format::Dotenv,
        Format::Ini,
        Format::Raw,
    ];

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
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!("unknown format \"{s}\" (expected yaml, json, toml, dotenv, ini or raw)")
            })
    }
}

/// A key path into a document: dot-separated segments, where an all-digit
/// segment indexes a sequence. For dotenv it is the variable name; for INI
/// the first segment is the section and the rest (dots included) the key;
/// for `raw` the empty path is the whole file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyPath {
    raw: String,
    segments: Vec<String>,
}

impl KeyPath {
    /// A path from segments that may themselves contain dots (an OpenCode
    /// provider id such as `my.proxy`, a profile name).
    pub fn from_segments(segments: Vec<String>) -> KeyPath {
        KeyPath {
            raw: segments.join("."),
            segments,
        }
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The dotted text of the path (`""` for the whole file).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The path as INI sees it: the section, then the key (which may hold
    /// dots). `None` for a path of fewer than two segments.
    fn ini_parts(&self) -> Option<(&str, String)> {
        match self.segments.split_first() {
            Some((section, rest)) if !rest.is_empty() => Some((section, rest.join("."))),
            _ => None,
        }
    }
}

impl FromStr for KeyPath {
    type Err = String;
    /// `""` is the whole-file path; otherwise no segment may be empty.
    fn from_str(s: &str) -> Result<KeyPath, String> {
        if s.is_empty() {
            return Ok(KeyPath::from_segments(Vec::new()));
        }
        let segments: Vec<String> = s.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("key path `{s}` has an empty segment"));
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
    /// belongs, and where it only may be).
    pub insert: bool,
    pub kind: Kind,
}

/// What a bound value is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    /// A token: a new value a program writes there is offered for adoption.
    #[default]
    Secret,
    /// A string the daemon owns (a URL, a timestamp): rendered like a
    /// secret, but what a program writes there is never adopted.
    Value,
    /// A number the daemon owns (`expiresAt` in ms): rendered as a bare
    /// number, never adopted.
    Number,
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
            kind: Kind::Secret,
        }
    }

    /// The text the bound value must have in a template.
    fn placeholder_value(&self) -> String {
        format!("{}{}{}", self.prefix, placeholder(&self.slot), self.suffix)
    }
}

/// The placeholder text for a slot: `__tokenfs:databricks.token__`. Valid
/// as a YAML plain scalar, inside JSON/TOML strings, and in dotenv and INI
/// values. See [`is_valid_slot`] for the names it works with.
pub fn placeholder(slot: &str) -> String {
    format!("{}{slot}{}", template::OPEN, template::CLOSE)
}

/// Whether [`Template`] recognises the placeholder of this slot name:
/// non-empty, `[A-Za-z0-9._-]`, and no `__` inside.
pub fn is_valid_slot(slot: &str) -> bool {
    template::is_valid_slot(slot)
}

/// A value found at a bound key (and replaced there by the placeholder).
pub struct Found {
    pub slot: String,
    pub key: KeyPath,
    /// Without the binding's prefix and suffix.
    pub value: Secret,
    /// One of the slot's known (current or recent) values: ours, not new.
    pub known: bool,
}

/// A known secret standing outside every bound position: the bytes are
/// the user's and are kept, and this says where, for a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray {
    pub line: usize,
    pub column: usize,
    /// The key the line assigns, when it looks like one (else empty).
    pub key: String,
    pub fingerprint: String,
}

/// The result of turning bytes into a template.
#[derive(Default)]
pub struct Conversion {
    /// The input with the value at every bound key replaced by its
    /// placeholder, plus inserted keys; everything else byte-identical.
    pub template: Vec<u8>,
    /// Non-empty values found at bound keys (already placeholders in
    /// `template`).
    pub found: Vec<Found>,
    /// Keys that were missing and were inserted with the placeholder.
    pub inserted: Vec<KeyPath>,
    /// Bound keys the input left empty or without the key (slot, key): a
    /// consumer that wiped its session (Claude Code after a failed
    /// refresh). They show the credential again, as every bound key does.
    pub blanked: Vec<(String, KeyPath)>,
    /// Known secrets (and found values) left outside bound keys.
    pub stray: Vec<Stray>,
    /// The input did not parse: `template` is the input exactly as it came;
    /// `found` and `inserted` are empty.
    pub parse_error: Option<FormatError>,
    /// Notes for the log. Never contain document text.
    pub problems: Vec<String>,
}

/// A parse error's position (1-based; column in characters) and the
/// parser's message, which never contains document text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct FormatError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Why a rendering is not right.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("does not parse: {0}")]
    Parse(FormatError),
    #[error("key {key} is missing")]
    Missing { key: KeyPath },
    #[error("key {key} does not hold the secret of {slot}")]
    Mismatch { key: KeyPath, slot: String },
}

/// Runs `$call` with the [`syntax::Syntax`] implementation of `$format`.
macro_rules! with_syntax {
    ($format:expr, $f:ident ( $($arg:expr),* )) => {
        match $format {
            Format::Yaml => convert::$f::<yaml::Yaml>($($arg),*),
            Format::Json => convert::$f::<json::Json>($($arg),*),
            Format::Toml => convert::$f::<toml::Toml>($($arg),*),
            Format::Dotenv => convert::$f::<dotenv::Dotenv>($($arg),*),
            Format::Ini => convert::$f::<ini::Ini>($($arg),*),
            Format::Raw => convert::$f::<raw::Raw>($($arg),*),
        }
    };
}

/// Turns bytes (a file found at mount time, or bytes a program just wrote)
/// into a template. The input is parsed, and for each binding the value
/// at its key is looked at: our placeholder is fine; another string is
/// replaced, where it stands and in its quoting, by the placeholder and
/// reported in `found` (marked `known` when it is one of the slot's
/// `known` values, slot → current or recent secret); a missing key is
/// inserted (if `insert_missing` and the binding allows it); anything else
/// is a problem and left alone. No other byte changes: a known secret
/// elsewhere is reported in `stray`, and input that does not parse is kept
/// exactly as it came.
pub fn to_template(
    format: Format,
    input: &[u8],
    bindings: &[Binding],
    known: &[(&str, &[u8])],
    insert_missing: bool,
) -> Conversion {
    with_syntax!(format, to_template(input, bindings, known, insert_missing))
}

/// Checks a rendering: it parses in `format`, and each bound key holds
/// `prefix + secret + suffix`. A binding whose slot has no secret
/// (`secret_for` gives `None`) is not checked: its placeholder stays.
///
/// The explicit lifetime lets the secrets outlive the slot name passed in
/// (they live in a snapshot, not in the argument).
pub fn check<'a>(
    format: Format,
    rendered: &[u8],
    bindings: &[Binding],
    secret_for: &dyn Fn(&str) -> Option<&'a [u8]>,
) -> Result<(), RenderError> {
    with_syntax!(format, check(rendered, bindings, secret_for))
}

/// Splits template bytes into literal runs and the slots of `bindings`
/// (see [`Template`]).
pub fn template(format: Format, bytes: Vec<u8>, bindings: &[Binding]) -> Template {
    let slots = with_syntax!(format, slots(&bytes, bindings));
    Template::from_slots(bytes, slots)
}

/// Where the value at `key` is written in `text` (quotes included), if the
/// format can say.
pub fn locate(format: Format, text: &str, key: &KeyPath) -> Option<std::ops::Range<usize>> {
    with_syntax!(format, locate(text, key))
}

/// The string at `key` in `text`, if there is one (for presets and `init`).
pub fn lookup(format: Format, text: &str, key: &KeyPath) -> Option<String> {
    with_syntax!(format, lookup(text, key))
}
