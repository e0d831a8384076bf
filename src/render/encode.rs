//! How a string is written at a bound position, per format and quoting.
//!
//! A managed file's bound value has a *style*: the quoting the file uses at
//! that position (a JSON string, a plain or quoted YAML scalar, a TOML basic
//! or literal string, a bare or quoted dotenv value, an INI value, a raw
//! file). Rendering writes the secret in that style when the style can
//! carry it, else in the nearest style of the same format that can — a
//! plain YAML scalar that would read back as a number or a boolean becomes
//! double-quoted — and refuses a secret no style of the format carries (a
//! newline in INI), so that every rendering decodes back to exactly the
//! secret. The rules follow the readers the agents use: PyYAML (YAML 1.1)
//! and YAML 1.2 parsers; python-dotenv, Node's `dotenv` and Rust's `dotenvy`
//! for dotenv; Python's `configparser` (the Databricks SDK) for INI.

use std::fmt::Write as _;

/// The quoting of a value at its position in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A JSON string, quotes included.
    Json,
    YamlPlain,
    YamlSingle,
    YamlDouble,
    TomlBasic,
    TomlLiteral,
    DotenvBare,
    DotenvSingle,
    DotenvDouble,
    /// Everything after `=` up to the end of the line, as configparser reads it.
    Ini,
    /// The whole file but one trailing newline.
    Raw,
    /// Exactly the bytes, where a known token stood in a file that does not
    /// parse (so its position has no syntax to encode for).
    Verbatim,
}

/// Why a format cannot carry a value. Never contains the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unfit(pub &'static str);

impl Style {
    /// The value in exactly this style, for text whose safety in it is known
    /// (placeholders): quoted styles escape, unquoted ones copy.
    pub fn write(self, value: &str) -> String {
        match self {
            Style::Json => json(value),
            Style::YamlSingle => yaml_single(value),
            Style::YamlDouble => yaml_double(value),
            Style::TomlBasic => toml_basic(value),
            Style::TomlLiteral => format!("'{value}'"),
            Style::DotenvSingle => format!("'{value}'"),
            Style::DotenvDouble => format!("\"{value}\""),
            Style::YamlPlain | Style::DotenvBare | Style::Ini | Style::Raw | Style::Verbatim => {
                value.to_owned()
            }
        }
    }

    /// The value written so that this position's readers decode exactly
    /// `value`: in this style if it can carry it, else in the first style of
    /// the same format that can.
    pub fn encode(self, value: &str) -> Result<String, Unfit> {
        match self {
            Style::Json => Ok(json(value)),
            Style::YamlPlain if yaml_plain_safe(value) => Ok(value.to_owned()),
            Style::YamlSingle if yaml_single_safe(value) => Ok(yaml_single(value)),
            Style::YamlPlain | Style::YamlSingle | Style::YamlDouble => Ok(yaml_double(value)),
            Style::TomlLiteral if toml_literal_safe(value) => Ok(format!("'{value}'")),
            Style::TomlLiteral | Style::TomlBasic => Ok(toml_basic(value)),
            Style::DotenvBare | Style::DotenvSingle | Style::DotenvDouble => dotenv(self, value),
            Style::Ini => ini(value),
            Style::Raw => raw(value),
            Style::Verbatim => Ok(value.to_owned()),
        }
    }
}

fn json(value: &str) -> String {
    // Serialising a str cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// A plain YAML scalar that both YAML 1.1 (PyYAML) and 1.2 read as this
/// very string, in block and flow context: a letter first (no number, no
/// indicator), a conservative character set, single inner spaces, a `:`
/// only before a non-space (URLs), and none of the words YAML 1.1 resolves
/// to booleans or null.
fn yaml_plain_safe(v: &str) -> bool {
    const WORDS: [&str; 9] = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    v.starts_with(|c: char| c.is_ascii_alphabetic())
        && !v.ends_with(' ')
        && !v.contains("  ")
        && !v.contains(": ")
        && !v.ends_with(':')
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./+=~-@ :".contains(c))
        && !WORDS.contains(&v.to_ascii_lowercase().as_str())
}

/// Single quotes fold line breaks and cannot escape: printable text only.
fn yaml_single_safe(v: &str) -> bool {
    !v.chars().any(needs_yaml_escape)
}

fn yaml_single(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// Characters a YAML stream may not hold literally (or that a double-quoted
/// scalar would fold): controls, DEL, C1, BOM, and the Unicode line breaks.
fn needs_yaml_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{feff}' | '\u{2028}' | '\u{2029}' | '\u{fffe}' | '\u{ffff}'
        )
}

fn yaml_double(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if needs_yaml_escape(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_literal_safe(v: &str) -> bool {
    !v.contains('\'') && !v.chars().any(|c| c.is_control() && c != '\t')
}

fn toml_basic(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// dotenv readers disagree on everything but the simplest values, so a
/// style is used only where python-dotenv, Node's dotenv and dotenvy all
/// read the value back unchanged; the file's own style first.
fn dotenv(style: Style, v: &str) -> Result<String, Unfit> {
    if v.chars().any(char::is_control) {
        return Err(Unfit(
            "a dotenv value cannot hold control characters or line breaks the same way for every reader",
        ));
    }
    if v.contains("${") {
        return Err(Unfit(
            "python-dotenv expands `${…}` in every dotenv value, quoted or not",
        ));
    }
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && !"#'\"`\\$".contains(c));
    let single = !v.contains('\'') && !v.contains("\\\\") && !v.ends_with('\\');
    let double = !v.contains(['"', '\\', '$']);
    let order = match style {
        Style::DotenvSingle => [Style::DotenvSingle, Style::DotenvBare, Style::DotenvDouble],
        Style::DotenvDouble => [Style::DotenvDouble, Style::DotenvBare, Style::DotenvSingle],
        _ => [Style::DotenvBare, Style::DotenvSingle, Style::DotenvDouble],
    };
    order
        .into_iter()
        .find(|s| match s {
            Style::DotenvBare => bare,
            Style::DotenvSingle => single,
            _ => double,
        })
        .map(|s| s.write(v))
        .ok_or(Unfit(
            "dotenv readers (python-dotenv, Node's dotenv, dotenvy) decode a value holding ' together with \", \\ or $ differently",
        ))
}

/// configparser (the Databricks SDK reads its raw sections, so `%` is
/// literal) strips the value and ends it at the line; Go's ini reader (the
/// Databricks CLI) also takes a leading `#` or `;` as a comment and strips
/// surrounding quotes.
fn ini(v: &str) -> Result<String, Unfit> {
    if v.chars().any(char::is_control) {
        return Err(Unfit(
            "an INI value ends at the line: no line breaks or control characters",
        ));
    }
    if v.trim() != v || v.is_empty() {
        return Err(Unfit(
            "an INI value cannot start or end with whitespace, or be empty",
        ));
    }
    if v.starts_with(['#', ';']) {
        return Err(Unfit(
            "an INI value starting with '#' or ';' reads as a comment in Go's ini reader (the Databricks CLI)",
        ));
    }
    if v.ends_with('\\') {
        return Err(Unfit(
            "an INI value ending in a backslash continues on the next line for some readers",
        ));
    }
    let quoted = |q: char| v.len() >= 2 && v.starts_with(q) && v.ends_with(q);
    if quoted('"') || quoted('`') || quoted('\'') {
        return Err(Unfit(
            "an INI value in quotes loses them in Go's ini reader (the Databricks CLI)",
        ));
    }
    Ok(v.to_owned())
}

/// A token file is read whole and usually trimmed.
fn raw(v: &str) -> Result<String, Unfit> {
    if v.chars().any(char::is_control) || v.trim() != v {
        return Err(Unfit(
            "a raw token file cannot hold line breaks, control characters or surrounding whitespace",
        ));
    }
    Ok(v.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_plain_only_when_it_reads_back_as_the_string() {
        for ok in ["dapi123abc", "sk-ant-api03-x_y", "eyJ.a+b/c=", "Bearer abc"] {
            assert_eq!(Style::YamlPlain.encode(ok).unwrap(), ok);
        }
        for quoted in [
            "null", "True", "no", "123", "1e3", "0x10", "~", "#x", "{x}", "[x]", "*x", "!x", "%x",
            "-x", "a: b", "a #b", "é",
        ] {
            let out = Style::YamlPlain.encode(quoted).unwrap();
            assert!(out.starts_with('"'), "{quoted} → {out}");
        }
        assert_eq!(Style::YamlSingle.encode("it's").unwrap(), "'it''s'");
        assert_eq!(Style::YamlSingle.encode("a\nb").unwrap(), "\"a\\nb\"");
        assert_eq!(
            Style::YamlDouble.encode("a\"\\\u{7}").unwrap(),
            "\"a\\\"\\\\\\u0007\""
        );
    }

    #[test]
    fn toml_and_json_escape() {
        assert_eq!(Style::TomlLiteral.encode("a\\b").unwrap(), "'a\\b'");
        assert_eq!(Style::TomlLiteral.encode("it's").unwrap(), "\"it's\"");
        assert_eq!(
            Style::TomlBasic.encode("a\"\\\n\u{1}").unwrap(),
            "\"a\\\"\\\\\\n\\u0001\""
        );
        assert_eq!(Style::Json.encode("a\"\\\n").unwrap(), "\"a\\\"\\\\\\n\"");
    }

    #[test]
    fn dotenv_keeps_the_files_style_when_it_can() {
        assert_eq!(Style::DotenvBare.encode("AIza-x_y").unwrap(), "AIza-x_y");
        assert_eq!(Style::DotenvDouble.encode("AIza").unwrap(), "\"AIza\"");
        assert_eq!(Style::DotenvBare.encode("a#b").unwrap(), "'a#b'");
        assert_eq!(
            Style::DotenvBare.encode("sk-ab\"c#d").unwrap(),
            "'sk-ab\"c#d'"
        );
        assert_eq!(Style::DotenvBare.encode("it's").unwrap(), "\"it's\"");
        assert!(Style::DotenvBare.encode("it's\\").is_err());
        assert!(Style::DotenvBare.encode("a${B}").is_err());
        assert!(Style::DotenvBare.encode("a\nb").is_err());
    }

    #[test]
    fn ini_and_raw_refuse_what_their_readers_cannot_hold() {
        assert_eq!(Style::Ini.encode("dapi#;=:x").unwrap(), "dapi#;=:x");
        assert!(Style::Ini.encode("a\nb").is_err());
        assert!(Style::Ini.encode(" a").is_err());
        assert_eq!(Style::Ini.encode("a%b").unwrap(), "a%b");
        assert!(Style::Ini.encode("#ab").is_err());
        assert!(Style::Ini.encode("\"ab\"").is_err());
        assert!(Style::Raw.encode("a\nb").is_err());
        assert_eq!(Style::Raw.encode("a'\"b").unwrap(), "a'\"b");
    }
}
