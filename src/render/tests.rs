// Unit tests of the render module: compiled only under #[cfg(test)] (see `mod tests;` in mod.rs).
//! Whole-module tests on realistic files of the agents tokenfs serves.
//!
//! Fixtures mark the bound token as `{TOK}` and the same string at an
//! unbound key as `{SAME}`, so every expectation is exact bytes: the
//! template is the fixture with `{TOK}` → placeholder, a rendering is the
//! fixture with `{TOK}` → the new secret, and `{SAME}` never changes.

use super::*;

const SLOT: &str = "db.token";
const PH: &str = "__tokenfs:db.token__";
const OLD: &str = "dapiOLD0123456789abcdef";
const NEW: &str = "dapiNEW9876543210fedcba-x.y_z";

fn b(key: &str) -> Binding {
    Binding::new(key.parse().unwrap(), SLOT)
}

fn secret<'a>(v: &'a [u8]) -> impl Fn(&str) -> Option<&'a [u8]> {
    move |slot: &str| (slot == SLOT).then_some(v)
}

fn fill(fixture: &str, tok: &str, same: &str) -> String {
    fixture.replace("{TOK}", tok).replace("{SAME}", same)
}

/// The fixture with the bound and the unbound occurrence exchanged.
fn swap(fixture: &str) -> String {
    fixture
        .replace("{TOK}", "{X}")
        .replace("{SAME}", "{TOK}")
        .replace("{X}", "{SAME}")
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

fn render(format: Format, bindings: &[Binding], template: &[u8], tok: &str) -> Vec<u8> {
    let t = super::template(format, template.to_vec(), bindings);
    let mut out = Vec::new();
    let refused = t.render(&secret(tok.as_bytes()), &mut out);
    assert!(refused.is_empty(), "{format}: {refused:?}");
    out
}

/// The whole life of a managed file: conversion, rendering, check, and the
/// conversion of a rendering written back.
fn life(format: Format, fixture: &str, binding: Binding, old: &str, new: &str) {
    let bindings = [binding];
    let input = fill(fixture, old, old);
    let conv = to_template(format, input.as_bytes(), &bindings, &[], true);
    assert!(
        conv.parse_error.is_none(),
        "{format}: {:?}",
        conv.parse_error
    );
    assert_eq!(conv.problems, Vec::<String>::new(), "{format}");
    assert!(conv.inserted.is_empty());
    assert_eq!(
        text(conv.template.clone()),
        fill(fixture, PH, old),
        "{format}"
    );
    assert_eq!(conv.found.len(), 1, "{format}");
    assert_eq!(conv.found[0].value.expose_str(), old);
    assert_eq!(conv.found[0].slot, SLOT);
    assert_eq!(conv.found[0].key, bindings[0].key);

    let rendered = render(format, &bindings, &conv.template, new);
    assert_eq!(text(rendered.clone()), fill(fixture, new, old), "{format}");
    check(format, &rendered, &bindings, &secret(new.as_bytes())).unwrap();
    assert!(check(format, &rendered, &bindings, &secret(old.as_bytes())).is_err());

    let known: [(&str, &[u8]); 1] = [(SLOT, new.as_bytes())];
    let again = to_template(format, &rendered, &bindings, &known, true);
    assert_eq!(text(again.template), fill(fixture, PH, old), "{format}");
    assert!(again.found.iter().all(|f| f.known), "{format}");
    assert!(again.inserted.is_empty() && again.problems.is_empty());

    // A known secret is replaced at the bound key only; a copy elsewhere
    // is the user's bytes, kept and reported when long enough to be a token.
    let known: [(&str, &[u8]); 1] = [(SLOT, old.as_bytes())];
    let conv = to_template(format, input.as_bytes(), &bindings, &known, true);
    assert_eq!(text(conv.template), fill(fixture, PH, old), "{format}");
    assert!(conv.found.iter().all(|f| f.known), "{format}");
    if old.len() >= STRAY_MIN_LEN && fixture.contains("{SAME}") {
        assert!(!conv.stray.is_empty(), "{format}");
    }
}

const HERMES: &str = "\
# Hermes Agent configuration
model:
  provider: custom
  base_url: https://dbc-1234.cloud.databricks.com/serving-endpoints
  api_key: {TOK}  # rotated by tokenfs
  default: databricks-claude-sonnet-4

# Tried in order when the main model fails
fallback_providers:
  - provider: custom
    base_url: https://other.example.com/v1
    api_key: sk-other-0000
  - provider: custom
    base_url: https://dbc-1234.cloud.databricks.com/serving-endpoints
    api_key: '{SAME}'

terminal:
  backend: local
";

const CLAUDE: &str = r#"{
  "env": {
    "ANTHROPIC_BASE_URL": "https://dbc-1234.cloud.databricks.com/serving-endpoints/anthropic",
    "ANTHROPIC_AUTH_TOKEN": "{TOK}",
    "ANTHROPIC_MODEL": "databricks-claude-sonnet-4"
  },
  "permissions": {
    "allow": [
      "Bash(npm run test:*)"
    ],
    "deny": []
  },
  "note": "{SAME}"
}
"#;

const CODEX_AUTH: &str =
    "{\n  \"OPENAI_API_KEY\": \"{TOK}\",\n  \"tokens\": null,\n  \"last_refresh\": null\n}";

const CODEX_TOML: &str = r#"# Codex CLI configuration
model = "databricks-gpt-5"
model_provider = "databricks"

[model_providers.databricks]
name = "Databricks"
base_url = "https://dbc-1234.cloud.databricks.com/serving-endpoints"
wire_api = "responses"
# sent as a bearer token
experimental_bearer_token = "{TOK}"  # rotated

[model_providers.databricks.http_headers]
X-Note = '{SAME}'
"#;

const DOTENV: &str = "\
# Gemini CLI
export GEMINI_API_KEY={TOK}
GOOGLE_GEMINI_BASE_URL=\"https://dbc-1234.cloud.databricks.com/serving-endpoints/gemini\"
OTHER='{SAME}'

";

const DATABRICKSCFG: &str = "\
[DEFAULT]
host  = https://dbc-1234.cloud.databricks.com
token = {TOK}

; staging workspace
[staging]
host  = https://dbc-5678.cloud.databricks.com
token = {SAME}
";

#[test]
fn hermes_config_yaml() {
    life(Format::Yaml, HERMES, b("model.api_key"), OLD, NEW);
    let list = swap(HERMES);
    life(
        Format::Yaml,
        &list,
        b("fallback_providers.1.api_key"),
        OLD,
        NEW,
    );
}

#[test]
fn claude_settings_json() {
    life(
        Format::Json,
        CLAUDE,
        b("env.ANTHROPIC_AUTH_TOKEN"),
        OLD,
        NEW,
    );
}

#[test]
fn codex_auth_json() {
    life(
        Format::Json,
        CODEX_AUTH,
        b("OPENAI_API_KEY"),
        "sk-proj-OLD_1",
        NEW,
    );
}

#[test]
fn codex_config_toml() {
    life(
        Format::Toml,
        CODEX_TOML,
        b("model_providers.databricks.experimental_bearer_token"),
        OLD,
        NEW,
    );
}

#[test]
fn dotenv_file() {
    life(Format::Dotenv, DOTENV, b("GEMINI_API_KEY"), OLD, NEW);
    life(
        Format::Dotenv,
        "A=1\nK=\"{TOK}\" # c\nB='{SAME}'",
        b("K"),
        OLD,
        NEW,
    );
    life(
        Format::Dotenv,
        "K='{TOK}'\r\nB={SAME}\r\n",
        b("K"),
        OLD,
        NEW,
    );
}

#[test]
fn databrickscfg_ini() {
    life(Format::Ini, DATABRICKSCFG, b("DEFAULT.token"), OLD, NEW);
    life(
        Format::Ini,
        &swap(DATABRICKSCFG),
        b("staging.token"),
        OLD,
        NEW,
    );
}

#[test]
fn raw_token_file() {
    life(Format::Raw, "{TOK}\n", b(""), OLD, NEW);
    life(Format::Raw, "{TOK}", b(""), OLD, NEW);
    life(Format::Raw, "{TOK}\r\n", b(""), OLD, NEW);
}

#[test]
fn crlf_files_keep_their_line_endings() {
    let crlf = |s: &str| s.replace('\n', "\r\n");
    life(Format::Yaml, &crlf(HERMES), b("model.api_key"), OLD, NEW);
    life(
        Format::Json,
        &crlf(CLAUDE),
        b("env.ANTHROPIC_AUTH_TOKEN"),
        OLD,
        NEW,
    );
    life(
        Format::Toml,
        &crlf(CODEX_TOML),
        b("model_providers.databricks.experimental_bearer_token"),
        OLD,
        NEW,
    );
    life(
        Format::Ini,
        &crlf(DATABRICKSCFG),
        b("DEFAULT.token"),
        OLD,
        NEW,
    );
}

/// Converts `input` with one binding that must be inserted; returns the template.
fn inserted(format: Format, input: &str, key: &str) -> String {
    let conv = to_template(format, input.as_bytes(), &[b(key)], &[], true);
    assert!(
        conv.parse_error.is_none(),
        "{format}: {:?}",
        conv.parse_error
    );
    assert_eq!(conv.problems, Vec::<String>::new(), "{format}");
    assert_eq!(
        conv.inserted,
        vec![key.parse::<KeyPath>().unwrap()],
        "{format}"
    );
    assert!(conv.found.is_empty());
    let out = text(conv.template);
    let rendered = render(format, &[b(key)], out.as_bytes(), NEW);
    check(format, &rendered, &[b(key)], &secret(NEW.as_bytes())).unwrap();
    out
}

#[test]
fn missing_yaml_keys_are_inserted() {
    let no_key = HERMES.replace("  api_key: {TOK}  # rotated by tokenfs\n", "");
    assert_eq!(
        inserted(Format::Yaml, &no_key, "model.api_key"),
        no_key.replace(
            "  default: databricks-claude-sonnet-4\n",
            &format!("  default: databricks-claude-sonnet-4\n  api_key: {PH}\n")
        )
    );
    assert_eq!(
        inserted(Format::Yaml, "", "model.api_key"),
        format!("model:\n  api_key: {PH}\n")
    );
    assert_eq!(
        inserted(Format::Yaml, "# only a comment", "model.api_key"),
        format!("# only a comment\nmodel:\n  api_key: {PH}\n")
    );
    assert_eq!(
        inserted(Format::Yaml, "agent:\n  x: 1\n\n# tail\n", "model.api_key"),
        format!("agent:\n  x: 1\nmodel:\n  api_key: {PH}\n\n# tail\n")
    );
    assert_eq!(
        inserted(Format::Yaml, "model:\n  provider: x\n", "model.api_key"),
        format!("model:\n  provider: x\n  api_key: {PH}\n")
    );
    assert_eq!(
        inserted(Format::Yaml, "model:\nother: 1\n", "model.api_key"),
        format!("model:\n  api_key: {PH}\nother: 1\n")
    );
    let list =
        "fallback_providers:\n  - provider: custom\n    base_url: https://x\n  - provider: y\n";
    assert_eq!(
        inserted(Format::Yaml, list, "fallback_providers.0.api_key"),
        list.replace("x\n", &format!("x\n    api_key: {PH}\n"))
    );
}

#[test]
fn yaml_flow_mappings_are_a_problem_not_an_edit() {
    for input in ["model: {provider: x}\n", "[1, 2]\n", "model: 3\n"] {
        let conv = to_template(
            Format::Yaml,
            input.as_bytes(),
            &[b("model.api_key")],
            &[],
            true,
        );
        assert_eq!(text(conv.template), input);
        assert!(conv.inserted.is_empty());
        assert_eq!(conv.problems.len(), 1, "{input}: {:?}", conv.problems);
    }
}

#[test]
fn missing_json_keys_are_inserted() {
    let no_token = CLAUDE.replace("    \"ANTHROPIC_AUTH_TOKEN\": \"{TOK}\",\n", "");
    assert_eq!(
        inserted(Format::Json, &no_token, "env.ANTHROPIC_AUTH_TOKEN"),
        no_token.replace(
            "\"databricks-claude-sonnet-4\"",
            &format!("\"databricks-claude-sonnet-4\",\n    \"ANTHROPIC_AUTH_TOKEN\": \"{PH}\"")
        )
    );
    let no_env = "{\n  \"permissions\": {\n    \"deny\": []\n  }\n}\n";
    assert_eq!(
        inserted(Format::Json, no_env, "env.ANTHROPIC_AUTH_TOKEN"),
        format!(
            "{{\n  \"permissions\": {{\n    \"deny\": []\n  }},\n  \"env\": {{\n    \"ANTHROPIC_AUTH_TOKEN\": \"{PH}\"\n  }}\n}}\n"
        )
    );
    assert_eq!(
        inserted(Format::Json, "{}", "OPENAI_API_KEY"),
        format!("{{\n  \"OPENAI_API_KEY\": \"{PH}\"\n}}")
    );
    assert_eq!(
        inserted(Format::Json, "", "OPENAI_API_KEY"),
        format!("{{\n  \"OPENAI_API_KEY\": \"{PH}\"\n}}\n")
    );
    assert_eq!(
        inserted(Format::Json, "{\"a\": 1}\n", "env.K"),
        format!("{{\"a\": 1, \"env\": {{\"K\": \"{PH}\"}}}}\n")
    );
}

#[test]
fn missing_toml_keys_are_inserted() {
    let no_token = CODEX_TOML.replace("experimental_bearer_token = \"{TOK}\"  # rotated\n", "");
    assert_eq!(
        inserted(
            Format::Toml,
            &no_token,
            "model_providers.databricks.experimental_bearer_token"
        ),
        no_token.replace(
            "wire_api = \"responses\"\n",
            &format!("wire_api = \"responses\"\nexperimental_bearer_token = \"{PH}\"\n")
        )
    );
    assert_eq!(
        inserted(Format::Toml, "# c\na = 1\n", "auth.key"),
        format!("# c\na = 1\n\n[auth]\nkey = \"{PH}\"\n")
    );
    assert_eq!(
        inserted(Format::Toml, "", "key"),
        format!("key = \"{PH}\"\n")
    );
}

#[test]
fn missing_dotenv_ini_raw_keys_are_inserted() {
    assert_eq!(
        inserted(Format::Dotenv, "A=1", "KEY"),
        format!("A=1\nKEY={PH}\n")
    );
    assert_eq!(
        inserted(Format::Dotenv, "# c\r\nA=1\r\n", "KEY"),
        format!("# c\r\nA=1\r\nKEY={PH}\r\n")
    );
    assert_eq!(inserted(Format::Dotenv, "", "KEY"), format!("KEY={PH}\n"));
    let no_token = DATABRICKSCFG.replace("token = {TOK}\n", "");
    assert_eq!(
        inserted(Format::Ini, &no_token, "DEFAULT.token"),
        no_token.replace(
            "databricks.com\n\n",
            &format!("databricks.com\ntoken = {PH}\n\n")
        )
    );
    assert_eq!(
        inserted(Format::Ini, "[DEFAULT]\nhost=h\n", "dev.token"),
        format!("[DEFAULT]\nhost=h\n\n[dev]\ntoken={PH}\n")
    );
    assert_eq!(inserted(Format::Raw, "", ""), PH);
    assert_eq!(inserted(Format::Raw, "\n", ""), format!("{PH}\n"));
}

#[test]
fn bindings_that_may_not_insert_leave_missing_keys_missing() {
    let optional = [Binding {
        insert: false,
        ..b("k")
    }];
    let conv = to_template(Format::Json, b"{}", &optional, &[], true);
    assert!(conv.inserted.is_empty() && conv.template == b"{}");
    let conv = to_template(Format::Json, b"{}", &[b("k")], &[], false);
    assert!(conv.inserted.is_empty() && conv.template == b"{}");
}

#[test]
fn prefixes_suffixes_and_empty_values() {
    let bind = [Binding {
        prefix: "Authorization=Bearer ".into(),
        suffix: ",x-team=a".into(),
        ..b("env.H")
    }];
    let input = b"{\"env\": {\"H\": \"Authorization=Bearer abc,x-team=a\"}}";
    let conv = to_template(Format::Json, input, &bind, &[], true);
    assert_eq!(
        text(conv.template.clone()),
        format!("{{\"env\": {{\"H\": \"Authorization=Bearer {PH},x-team=a\"}}}}")
    );
    assert_eq!(conv.found[0].value.expose_str(), "abc");
    let rendered = render(Format::Json, &bind, &conv.template, NEW);
    check(Format::Json, &rendered, &bind, &secret(NEW.as_bytes())).unwrap();
    // Text around the token that is not the binding's: left alone.
    let conv = to_template(
        Format::Json,
        b"{\"env\": {\"H\": \"Basic abc\"}}",
        &bind,
        &[],
        true,
    );
    assert_eq!(conv.template, b"{\"env\": {\"H\": \"Basic abc\"}}");
    assert_eq!(conv.problems.len(), 1);
    // Empty values are filled, and are not a found secret.
    for (format, input, key, want) in [
        (
            Format::Json,
            "{\"k\": \"\"}",
            "k",
            format!("{{\"k\": \"{PH}\"}}"),
        ),
        (
            Format::Yaml,
            "k: ''\nj: ''\n",
            "j",
            format!("k: ''\nj: '{PH}'\n"),
        ),
        (Format::Toml, "k = \"\"\n", "k", format!("k = \"{PH}\"\n")),
        (Format::Dotenv, "K=\nJ=\n", "J", format!("K=\nJ={PH}\n")),
        (Format::Ini, "[s]\nk =\n", "s.k", format!("[s]\nk ={PH}\n")),
    ] {
        let conv = to_template(format, input.as_bytes(), &[b(key)], &[], true);
        assert_eq!(text(conv.template), want, "{format}");
        assert!(
            conv.found.is_empty() && conv.problems.is_empty(),
            "{format}"
        );
    }
    let bearer = [Binding {
        prefix: "Bearer ".into(),
        ..b("h")
    }];
    let conv = to_template(Format::Yaml, b"h: 'Bearer '\n", &bearer, &[], true);
    assert_eq!(text(conv.template), format!("h: 'Bearer {PH}'\n"));
}

#[test]
fn non_strings_and_foreign_placeholders_are_problems() {
    for (format, input) in [
        (Format::Yaml, "model:\n  api_key: 12345\n"),
        (Format::Yaml, "model:\n  api_key:\n"),
        (Format::Json, "{\"model\": {\"api_key\": 12345}}"),
        (Format::Toml, "[model]\napi_key = 12345\n"),
        (
            Format::Json,
            "{\"model\": {\"api_key\": \"__tokenfs:other__\"}}",
        ),
    ] {
        let conv = to_template(format, input.as_bytes(), &[b("model.api_key")], &[], true);
        assert_eq!(text(conv.template), input, "{format}");
        assert_eq!(conv.problems.len(), 1, "{format}");
        assert!(conv.found.is_empty());
        assert!(
            conv.problems[0].contains("model.api_key"),
            "{:?}",
            conv.problems
        );
        assert!(!conv.problems[0].contains("12345"), "{:?}", conv.problems);
    }
}

#[test]
fn values_written_with_escapes_are_replaced_where_they_stand() {
    // JSON escapes: the decoded value does not appear in the text; the
    // value at the key is replaced all the same, and nothing else.
    let input = br#"{"k": "ab\u0063d", "x": "abcd"}"#;
    let conv = to_template(Format::Json, input, &[b("k")], &[], true);
    assert_eq!(
        text(conv.template),
        format!(r#"{{"k": "{PH}", "x": "abcd"}}"#)
    );
    assert!(conv.problems.is_empty());
    assert_eq!(conv.found[0].value.expose_str(), "abcd");
}

#[test]
fn the_bound_occurrence_is_the_one_replaced_even_when_it_comes_last() {
    let input = "a: tok\nb:\n  c: tok\n  k: tok\n";
    let conv = to_template(Format::Yaml, input.as_bytes(), &[b("b.k")], &[], true);
    assert_eq!(
        text(conv.template),
        format!("a: tok\nb:\n  c: tok\n  k: {PH}\n")
    );
    // A value that is part of a key name, and part of a longer value.
    let input = "{\"tok\": \"tok-long\", \"k\": \"tok\"}";
    let conv = to_template(Format::Json, input.as_bytes(), &[b("k")], &[], true);
    assert_eq!(
        text(conv.template),
        format!("{{\"tok\": \"tok-long\", \"k\": \"{PH}\"}}")
    );
    let input = "[tok]\ntok = \"tok\"\n";
    let conv = to_template(Format::Toml, input.as_bytes(), &[b("tok.tok")], &[], true);
    assert_eq!(text(conv.template), format!("[tok]\ntok = \"{PH}\"\n"));
}

/// A broken document holding a secret: the error has a position and no
/// secret, and the template is the input with only known tokens replaced,
/// which render back where they stood.
fn broken(format: Format, input: &str, line: usize) {
    let secret = "sk-VERYSECRET-0123456789";
    let input = input.replace("{S}", secret);
    let known: [(&str, &[u8]); 1] = [(SLOT, secret.as_bytes())];
    let conv = to_template(format, input.as_bytes(), &[b("a.b")], &known, true);
    let e = conv.parse_error.expect("a parse error");
    assert_eq!(e.line, line, "{format}: {e}");
    assert!(e.column >= 1);
    assert!(!e.to_string().contains("VERYSECRET"), "{format}: {e}");
    assert_eq!(text(conv.template.clone()), input.replace(secret, PH));
    assert!(conv.found.is_empty() && conv.inserted.is_empty());
    let t = super::template(format, conv.template, &[b("a.b")]);
    let mut out = Vec::new();
    assert!(t.render(&secret_fn(secret), &mut out).is_empty());
    assert_eq!(text(out), input, "{format}: renders back byte for byte");
    // Unknown to the conversion, the secret still must not show.
    let conv = to_template(format, input.as_bytes(), &[b("a.b")], &[], true);
    let e = conv.parse_error.expect("a parse error");
    assert!(!e.to_string().contains("VERYSECRET"), "{format}: {e}");
    // And check() says the same about a rendering.
    let err = check(format, input.as_bytes(), &[b("a.b")], &secret_fn(secret)).unwrap_err();
    assert!(matches!(err, RenderError::Parse(_)), "{format}");
    assert!(!err.to_string().contains("VERYSECRET"), "{format}: {err}");
}

fn secret_fn<'a>(s: &'a str) -> impl Fn(&str) -> Option<&'a [u8]> {
    move |_: &str| Some(s.as_bytes())
}

#[test]
fn broken_documents_report_positions_never_secrets() {
    broken(Format::Yaml, "a:\n  b: [{S}\n  c: 1\n", 3);
    broken(Format::Yaml, "a:\n  b: {S}\n c: x: y\n", 3);
    broken(
        Format::Json,
        "{\n  \"a\": {\"b\": \"{S}\"\n  \"c\": 1}\n",
        3,
    );
    broken(Format::Toml, "[a]\nb = \"{S}\n", 2);
    broken(Format::Toml, "[a]\nb = {S}\n", 2);
    broken(Format::Dotenv, "A=1\nB=\"{S}\n", 2);
    broken(Format::Dotenv, "A=1\nB={S} x\n", 2);
    broken(Format::Ini, "[a]\nb = {S}\n[c\n", 4);
}

#[test]
fn non_utf8_is_a_parse_error_not_a_panic() {
    for format in Format::ALL {
        let input = b"a:\n  b: \xff\xfe tok\n";
        let known: [(&str, &[u8]); 1] = [(SLOT, b"tok")];
        let conv = to_template(format, input, &[b("a.b")], &known, true);
        let e = conv.parse_error.expect("a parse error");
        assert_eq!((e.line, e.column), (2, 6), "{format}");
        assert_eq!(conv.template, input, "kept exactly as written");
        assert!(check(format, input, &[b("a.b")], &secret(b"tok")).is_err());
    }
}

#[test]
fn odd_inputs_do_not_panic() {
    let deep = |open: &str, n: usize| open.repeat(n);
    let inputs = [
        deep("[", 20_000),
        deep("{\"a\":", 20_000),
        deep("- ", 2_000),
        deep("- ", 140),
        format!("{}{}", deep("[", 20_000), deep("]", 20_000)),
        format!("{}{}", deep("{\"a\":", 20_000), deep("}", 20_000)),
        format!("a = {}{}", deep("[", 20_000), deep("]", 20_000)),
        format!("a = {}1{}", deep("{b = ", 20_000), deep("}", 20_000)),
        (0..140).map(|i| format!("{}k:\n", " ".repeat(i))).collect(),
        format!("a = {}", deep("[", 20_000)),
        deep("a:\n ", 300),
        "\u{feff}a: b\n".to_string(),
        "\0\0\0".to_string(),
        "=\n[\n\"\n'\n".to_string(),
        "__tokenfs:".to_string(),
    ];
    for format in Format::ALL {
        for input in &inputs {
            for key in ["a.b", "a", "", "0.1"] {
                let conv = to_template(format, input.as_bytes(), &[b(key)], &[], true);
                let _ = check(format, &conv.template, &[b(key)], &secret(b"x"));
            }
        }
    }
}

#[test]
fn placeholders_are_valid_everywhere() {
    for (format, input, key) in [
        (Format::Yaml, format!("a:\n  b: {PH}\n"), "a.b"),
        (
            Format::Json,
            format!("{{\"a\": {{\"b\": \"{PH}\"}}}}"),
            "a.b",
        ),
        (Format::Toml, format!("[a]\nb = \"{PH}\"\n"), "a.b"),
        (Format::Dotenv, format!("B={PH}\n"), "B"),
        (Format::Ini, format!("[a]\nb = {PH}\n"), "a.b"),
        (Format::Raw, PH.to_string(), ""),
    ] {
        assert_eq!(
            lookup(format, &input, &key.parse().unwrap()).as_deref(),
            Some(PH)
        );
        let conv = to_template(format, input.as_bytes(), &[b(key)], &[], true);
        assert_eq!(text(conv.template), input);
        assert!(conv.found.is_empty() && conv.problems.is_empty());
        let t = super::template(format, input.into_bytes(), &[b(key)]);
        assert_eq!(
            t.bound().map(|b| b.slot.as_str()).collect::<Vec<_>>(),
            vec![SLOT]
        );
    }
}

#[test]
fn check_reports_missing_and_mismatched_keys() {
    let bindings = [b("a.b")];
    let s = secret(b"tok");
    assert!(matches!(
        check(Format::Json, b"{\"a\": {}}", &bindings, &s),
        Err(RenderError::Missing { .. })
    ));
    assert!(matches!(
        check(Format::Json, b"{\"a\": {\"b\": \"other\"}}", &bindings, &s),
        Err(RenderError::Mismatch { .. })
    ));
    // A secret that breaks the format is caught (YAML reads `true` as a boolean).
    assert!(
        check(
            Format::Yaml,
            b"a:\n  b: true\n",
            &bindings,
            &secret(b"true")
        )
        .is_err()
    );
    // No secret for the slot: nothing to check.
    assert!(check(Format::Json, b"{}", &bindings, &|_: &str| None).is_ok());
}

#[test]
fn format_and_key_path_parsing() {
    for f in Format::ALL {
        assert_eq!(f.to_string().parse::<Format>(), Ok(f));
    }
    assert!("xml".parse::<Format>().is_err());
    let k: KeyPath = "fallback_providers.0.api_key".parse().unwrap();
    assert_eq!(k.segments(), ["fallback_providers", "0", "api_key"]);
    assert_eq!(k.to_string(), "fallback_providers.0.api_key");
    assert!("a..b".parse::<KeyPath>().is_err());
    assert!(".a".parse::<KeyPath>().is_err());
    assert!("".parse::<KeyPath>().unwrap().segments().is_empty());
    let ini = KeyPath::from_segments(vec!["my.profile".into(), "token".into()]);
    assert_eq!(ini.ini_parts(), Some(("my.profile", "token".to_string())));
    let ini: KeyPath = "DEFAULT.a.b".parse().unwrap();
    assert_eq!(ini.ini_parts(), Some(("DEFAULT", "a.b".to_string())));
    assert_eq!(
        placeholder("databricks.token"),
        "__tokenfs:databricks.token__"
    );
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn token(&mut self) -> String {
        const ALPHABET: &[u8] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
        // At least 8 characters, so a token does not occur in the fixture
        // by chance.
        let len = 8 + (self.next() % 92) as usize;
        let body: String = (0..len)
            .map(|_| ALPHABET[(self.next() % ALPHABET.len() as u64) as usize] as char)
            .collect();
        // A leading letter keeps YAML from reading `1.5` or `.inf` as a number.
        format!("t{body}")
    }
}

#[test]
fn randomized_round_trips() {
    let fixtures: [(Format, &str, &str); 7] = [
        (Format::Yaml, HERMES, "model.api_key"),
        (Format::Json, CLAUDE, "env.ANTHROPIC_AUTH_TOKEN"),
        (
            Format::Toml,
            CODEX_TOML,
            "model_providers.databricks.experimental_bearer_token",
        ),
        (Format::Dotenv, DOTENV, "GEMINI_API_KEY"),
        (Format::Ini, DATABRICKSCFG, "DEFAULT.token"),
        (Format::Raw, "{TOK}\n", ""),
        (Format::Json, CODEX_AUTH, "OPENAI_API_KEY"),
    ];
    let mut rng = Rng(0x1234_5678_9abc_def0);
    for _ in 0..40 {
        for (format, fixture, key) in fixtures {
            let (old, new) = (rng.token(), rng.token());
            if old.contains(&new) || new.contains(&old) {
                continue;
            }
            life(format, fixture, b(key), &old, &new);
            // Render → convert → render, several rotations in a row.
            let input = fill(fixture, &old, "same-value-elsewhere");
            let mut template = to_template(format, input.as_bytes(), &[b(key)], &[], true).template;
            let mut prev = old.clone();
            for _ in 0..3 {
                let next = rng.token();
                let rendered = render(format, &[b(key)], &template, &next);
                check(format, &rendered, &[b(key)], &secret(next.as_bytes())).unwrap();
                let known: [(&str, &[u8]); 2] = [(SLOT, next.as_bytes()), (SLOT, prev.as_bytes())];
                let conv = to_template(format, &rendered, &[b(key)], &known, true);
                assert_eq!(conv.template, template);
                template = conv.template;
                prev = next;
            }
        }
    }
}

/// 100 KiB files convert and check in reasonable time (each edit parses the
/// document a few times; nothing is quadratic).
#[test]
fn large_files() {
    let n = 2_500;
    let yaml: String = (0..n)
        .map(|i| format!("k{i}:\n  v: value-{i}-{OLD}\n"))
        .collect::<String>()
        + &fill(HERMES, OLD, OLD);
    let json = format!(
        "{{\n{}  \"env\": {{\"ANTHROPIC_AUTH_TOKEN\": \"{OLD}\"}}\n}}\n",
        (0..n)
            .map(|i| format!("  \"k{i}\": \"value-{i}-{OLD}\",\n"))
            .collect::<String>()
    );
    let toml = (0..n)
        .map(|i| format!("[t{i}]\nv = \"value-{i}-{OLD}\"\n"))
        .collect::<String>()
        + &format!("[auth]\nkey = \"{OLD}\"\n");
    let dotenv = (0..n)
        .map(|i| format!("K{i}=value-{i}-{OLD}\n"))
        .collect::<String>()
        + &format!("KEY={OLD}\n");
    let ini = (0..n)
        .map(|i| format!("[p{i}]\ntoken = {OLD}\n"))
        .collect::<String>()
        + &format!("[DEFAULT]\ntoken = {OLD}\n");
    for (format, input, key) in [
        (Format::Yaml, yaml, "model.api_key"),
        (Format::Json, json, "env.ANTHROPIC_AUTH_TOKEN"),
        (Format::Toml, toml, "auth.key"),
        (Format::Dotenv, dotenv, "KEY"),
        (Format::Ini, ini, "DEFAULT.token"),
    ] {
        assert!(input.len() > 60_000, "{format}: {}", input.len());
        let started = std::time::Instant::now();
        let bindings = [b(key), b("missing.key")];
        let conv = to_template(format, input.as_bytes(), &bindings, &[], true);
        assert_eq!(conv.found.len(), 1, "{format}: {:?}", conv.problems);
        let rendered = render(format, &bindings, &conv.template, NEW);
        check(format, &rendered, &bindings, &secret(NEW.as_bytes())).unwrap();
        eprintln!("{format}: {} bytes in {:?}", input.len(), started.elapsed());
    }
}

/// The values real users have next to a bound key, and as short tokens.
const SHORT: [&str; 6] = ["none", "x", "test", "123", "", "dummy"];

/// Hermes' config for a keyless local endpoint: `none` everywhere, one of
/// them bound. Whatever the credential's current and recent values are,
/// only the bound value changes.
#[test]
fn short_values_never_touch_unbound_bytes() {
    let input = "model:\n  provider: custom\n  api_key: none\n  reasoning_effort: none\ncomment: none of these matter\nmax_tokens: 123\ntests: [unit-test, x]\nlatest: test\n";
    let bindings = [b("model.api_key")];
    for known_value in SHORT {
        let known: [(&str, &[u8]); 2] = [(SLOT, known_value.as_bytes()), (SLOT, b"t")];
        let conv = to_template(Format::Yaml, input.as_bytes(), &bindings, &known, true);
        let want = input.replacen("api_key: none", &format!("api_key: {PH}"), 1);
        assert_eq!(text(conv.template.clone()), want, "known {known_value:?}");
        assert!(conv.stray.is_empty());
        // A save of the rendering with a short token: the same template.
        for tok in ["none", "x", "123", "max"] {
            let rendered = render(Format::Yaml, &bindings, &conv.template, tok);
            let known: [(&str, &[u8]); 1] = [(SLOT, tok.as_bytes())];
            let again = to_template(Format::Yaml, &rendered, &bindings, &known, true);
            // A token that needed quotes leaves the placeholder quoted (the
            // quoting of a bound value is ours); every other byte is the same.
            let quoted = want.replace(PH, &format!("\"{PH}\""));
            let got = text(again.template);
            assert!(got == want || got == quoted, "token {tok:?}: {got}");
            assert!(again.found.iter().all(|f| f.known));
        }
    }
    // The same in JSON, where a token `1` once turned key names into placeholders.
    let input = r#"{"model": "latest", "tests": ["unit-test"], "max_tokens": 1, "k": "1", "DISABLE_TELEMETRY": "none", "allow": ["Bash(none:*)"]}"#;
    let known: [(&str, &[u8]); 3] = [(SLOT, b"1"), (SLOT, b"test"), (SLOT, b"none")];
    let conv = to_template(Format::Json, input.as_bytes(), &[b("k")], &known, true);
    assert_eq!(
        text(conv.template),
        input.replace(r#""k": "1""#, &format!(r#""k": "{PH}""#))
    );
}

/// A token copied by a program to an unbound key stays there (the user's
/// bytes) and is reported with its line and key; short values are not.
#[test]
fn a_token_outside_bound_keys_is_kept_and_reported() {
    let input = format!("model:\n  api_key: {NEW}\nbackup_key: {NEW}\nnote: none\n");
    let conv = to_template(
        Format::Yaml,
        input.as_bytes(),
        &[b("model.api_key")],
        &[],
        true,
    );
    assert_eq!(
        text(conv.template),
        format!("model:\n  api_key: {PH}\nbackup_key: {NEW}\nnote: none\n")
    );
    assert_eq!(conv.found.len(), 1);
    assert!(!conv.found[0].known);
    assert_eq!(conv.stray.len(), 1);
    assert_eq!(
        (conv.stray[0].line, conv.stray[0].key.as_str()),
        (3, "backup_key")
    );
    assert!(!format!("{:?}", conv.stray).contains(NEW));
}

/// Tokens that are hard to write: each format either renders one that its
/// parser reads back as exactly the token at the bound key, or refuses it
/// before publishing, naming the key.
#[test]
fn awkward_tokens_render_exactly_or_are_refused() {
    let corpus = awkward_corpus();
    let fixtures: [(Format, &str, &str); 12] = [
        (Format::Yaml, "a:\n  k: {T}\n  o: 1\n", "a.k"),
        (Format::Yaml, "a:\n  k: '{T}'\n", "a.k"),
        (Format::Yaml, "a: {k: \"{T}\", o: 1}\n", "a.k"),
        (Format::Json, "{\"a\": {\"k\": \"{T}\"}}", "a.k"),
        (Format::Toml, "[a]\nk = \"{T}\"\n", "a.k"),
        (Format::Toml, "[a]\nk = '{T}'\n", "a.k"),
        (Format::Dotenv, "K={T}\nO=1\n", "K"),
        (Format::Dotenv, "export K=\"{T}\" # c\n", "K"),
        (Format::Dotenv, "K='{T}'\n", "K"),
        (
            Format::Ini,
            "[DEFAULT]\nhost = h\ntoken = {T}\n",
            "DEFAULT.token",
        ),
        (Format::Raw, "{T}\n", ""),
        (Format::Yaml, "k: Bearer {T}\n", "k"),
    ];
    for (format, fixture, key) in fixtures {
        let binding = if fixture.contains("Bearer") {
            Binding {
                prefix: "Bearer ".into(),
                ..b(key)
            }
        } else {
            b(key)
        };
        let bindings = [binding];
        let template = fixture.replace("{T}", PH);
        let t = super::template(format, template.clone().into_bytes(), &bindings);
        assert_eq!(t.bound().count(), 1, "{format} {fixture}");
        for tok in &corpus {
            render_or_refuse(format, fixture, &t, &template, &bindings, tok);
        }
    }
}

/// Quotes, comment and escape characters, YAML indicators and scalars that
/// resolve to other types, non-ASCII, variables, whitespace, 10,000 bytes.
fn awkward_corpus() -> Vec<String> {
    [
        "sk-ab\"c#d",
        "a'b",
        "it's \"q\"",
        "back\\slash",
        "\\n",
        "#x",
        "a #b",
        "a: b",
        "x=y",
        "a;b",
        "-lead",
        "*x",
        "!x",
        "%x",
        "&x",
        "@x",
        "`x`",
        "{x}",
        "[x]",
        "null",
        "true",
        "no",
        "123",
        "1e3",
        "0x10",
        "~",
        "ünï©ødé",
        "$HOME",
        "${HOME}",
        "a\tb",
        "a\nb",
        " pad ",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain(["k".repeat(10_000)])
    .collect()
}

/// One token at one position: rendered exactly (and saved back to the
/// same template), or refused with the placeholder left in place.
fn render_or_refuse(
    format: Format,
    fixture: &str,
    t: &super::Template,
    template: &str,
    bindings: &[Binding],
    tok: &str,
) {
    let mut out = Vec::new();
    let refused = t.render(&secret(tok.as_bytes()), &mut out);
    match t.carries(SLOT, tok.as_bytes()) {
        Ok(()) => {
            assert!(refused.is_empty());
            check(format, &out, bindings, &secret(tok.as_bytes()))
                .unwrap_or_else(|e| panic!("{format} {fixture:?} {tok:?}: {e}"));
            // Saving the rendering back gives the template again.
            let known: [(&str, &[u8]); 1] = [(SLOT, tok.as_bytes())];
            let again = to_template(format, &out, bindings, &known, true);
            assert!(
                again.problems.is_empty(),
                "{format} {tok:?}: {:?}",
                again.problems
            );
            let again = text(again.template);
            let t2 = super::template(format, again.into_bytes(), bindings);
            assert_eq!(t2.bound().count(), 1, "{format} {tok:?}");
        }
        Err(r) => {
            assert_eq!(refused.len(), 1, "{format} {tok:?}");
            assert_eq!(r.key, bindings[0].key);
            assert!(!r.to_string().contains(tok) || tok.len() < 3, "{r}");
            assert_eq!(
                text(out),
                template,
                "a refused token leaves the placeholder"
            );
        }
    }
}

/// What each format must carry: ordinary tokens, and the hard ones where
/// the format can say them at all.
#[test]
fn formats_carry_what_their_readers_can_read() {
    let carries = |format: Format, fixture: &str, key: &str, tok: &str| {
        let t = super::template(format, fixture.replace("{T}", PH).into_bytes(), &[b(key)]);
        t.carries(SLOT, tok.as_bytes()).is_ok()
    };
    for tok in ["sk-ab\"c#d", "back\\slash", "a\nb", "null", "{x}", "${X}"] {
        assert!(carries(Format::Json, "{\"k\": \"{T}\"}", "k", tok), "{tok}");
        assert!(carries(Format::Yaml, "k: {T}\n", "k", tok), "{tok}");
        assert!(carries(Format::Toml, "k = '{T}'\n", "k", tok), "{tok}");
    }
    assert!(carries(Format::Dotenv, "K={T}\n", "K", "sk-ab\"c#d"));
    assert!(!carries(Format::Dotenv, "K={T}\n", "K", "a\nb"));
    assert!(!carries(Format::Dotenv, "K={T}\n", "K", "${X}"));
    assert!(carries(Format::Ini, "[s]\nk = {T}\n", "s.k", "dapi#;x"));
    assert!(!carries(Format::Ini, "[s]\nk = {T}\n", "s.k", "a\nb"));
}

mod properties {
    //! For random documents of each format, random bound keys and random
    //! secrets: rendering changes only the bound value, and saving the
    //! rendering back through the conversion and rendering it again is the
    //! identity (every unbound byte kept).
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("none".to_string()),
            Just("x".to_string()),
            Just(String::new()),
            Just("123".to_string()),
            Just("true".to_string()),
            "[a-zA-Z0-9_.-]{1,24}",
            "[ -~]{0,24}",
        ]
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_.-]{16,48}",
            "[!-~]{16,40}",
            Just("none".to_string()),
            Just("x".to_string()),
        ]
    }

    /// A document holding `entries`, every value a string.
    fn document(format: Format, entries: &[(String, String)]) -> String {
        let mut out = String::new();
        match format {
            Format::Json => {
                let body: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| format!("  \"{k}\": {}", serde_json::to_string(v).unwrap()))
                    .collect();
                out = format!("{{\n{}\n}}\n", body.join(",\n"));
            }
            Format::Yaml => {
                for (k, v) in entries {
                    out += &format!("{k}: '{}'  # {k}\n", v.replace('\'', "''"));
                }
            }
            Format::Toml => {
                for (k, v) in entries {
                    out += &format!("{k} = {}\n", serde_json::to_string(v).unwrap());
                }
            }
            Format::Dotenv => {
                for (k, v) in entries {
                    let v = v.replace(['\'', '\\'], "");
                    out += &format!("{}='{v}'\n", k.to_uppercase());
                }
            }
            Format::Ini | Format::Raw => {
                out += "[s]\n";
                for (k, v) in entries {
                    let v = v.replace('\\', "");
                    out += &format!("{k} = {}\n", v.trim().trim_start_matches(['#', ';']));
                }
            }
        }
        out
    }

    fn key_of(format: Format, k: &str) -> KeyPath {
        match format {
            Format::Dotenv => k.to_uppercase().parse().unwrap(),
            Format::Ini | Format::Raw => format!("s.{k}").parse().unwrap(),
            _ => k.parse().unwrap(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn save_then_render_keeps_every_unbound_byte(
            format in prop_oneof![Just(Format::Yaml), Just(Format::Json), Just(Format::Toml), Just(Format::Dotenv), Just(Format::Ini)],
            entries in proptest::collection::btree_map("[a-z][a-z0-9_]{0,8}", value(), 1..8),
            pick in any::<prop::sample::Index>(),
            tok in token(),
            recent in token(),
        ) {
            let entries: Vec<(String, String)> = entries.into_iter().collect();
            let doc = document(format, &entries);
            let (bound, _) = &entries[pick.index(entries.len())];
            let bindings = [b(key_of(format, bound).as_str())];
            let known: [(&str, &[u8]); 2] = [(SLOT, tok.as_bytes()), (SLOT, recent.as_bytes())];
            let conv = to_template(format, doc.as_bytes(), &bindings, &known, true);
            prop_assert!(conv.parse_error.is_none(), "{doc}");
            let t = super::super::template(format, conv.template.clone(), &bindings);
            prop_assume!(t.carries(SLOT, tok.as_bytes()).is_ok());
            let mut rendered = Vec::new();
            prop_assert!(t.render(&super::secret(tok.as_bytes()), &mut rendered).is_empty());
            let rendered = text(rendered);
            // Outside the bound value, the rendering is the document.
            let span = locate(format, &doc, &bindings[0].key).unwrap();
            let rspan = locate(format, &rendered, &bindings[0].key).unwrap();
            prop_assert_eq!(&doc[..span.start], &rendered[..rspan.start]);
            prop_assert_eq!(&doc[span.end..], &rendered[rspan.end..]);
            prop_assert_eq!(lookup(format, &rendered, &bindings[0].key), Some(tok.clone()));
            // A program saves the rendering as it read it: same rendering again.
            let saved = to_template(format, rendered.as_bytes(), &bindings, &known, true);
            let t2 = super::super::template(format, saved.template, &bindings);
            let mut again = Vec::new();
            t2.render(&super::secret(tok.as_bytes()), &mut again);
            prop_assert_eq!(text(again), rendered);
        }
    }
}

/// A number the daemon owns (Claude's `expiresAt`, in ms): the template
/// holds a string placeholder, renderings hold a bare number, and what a
/// program writes there is replaced, never adopted.
#[test]
fn number_bindings_render_bare_numbers_and_are_never_adopted() {
    let bindings = [
        Binding {
            kind: Kind::Number,
            ..Binding::new("o.expiresAt".parse().unwrap(), "c.expires_at_ms")
        },
        Binding::new("o.accessToken".parse().unwrap(), "c.access_token"),
    ];
    let input = "{\"o\": {\"accessToken\": \"sk-ant-oat01-aaaaaaaaaaaaaaaa\", \"expiresAt\": 1733150000000, \"scopes\": [\"user:inference\"]}}\n";
    let format = Format::Json;
    let conv = to_template(format, input.as_bytes(), &bindings, &[], true);
    assert!(conv.problems.is_empty(), "{:?}", conv.problems);
    assert_eq!(conv.found.len(), 1, "only the token is found");
    let t = text(conv.template.clone());
    assert!(
        t.contains("\"expiresAt\": \"__tokenfs:c.expires_at_ms__\""),
        "{t}"
    );
    let tpl = super::template(format, conv.template, &bindings);
    let values = |slot: &str| match slot {
        "c.expires_at_ms" => Some(&b"1800000000000"[..]),
        "c.access_token" => Some(&b"sk-ant-oat01-bbbbbbbbbbbbbbbb"[..]),
        _ => None,
    };
    let mut out = Vec::new();
    assert!(tpl.render(&values, &mut out).is_empty());
    let rendered = text(out);
    assert!(
        rendered.contains("\"expiresAt\": 1800000000000,"),
        "{rendered}"
    );
    check(format, rendered.as_bytes(), &bindings, &values).unwrap();
    assert!(tpl.carries("c.expires_at_ms", b"soon").is_err());
    // Written back with another number: replaced, nothing adopted.
    let written = rendered.replace("1800000000000", "1900000000000");
    let again = to_template(
        format,
        written.as_bytes(),
        &bindings,
        &[("c.access_token", b"sk-ant-oat01-bbbbbbbbbbbbbbbb")],
        true,
    );
    assert!(again.found.iter().all(|f| f.known) && again.problems.is_empty());
    assert_eq!(text(again.template), t);
}

#[test]
fn number_bindings_in_yaml_and_toml_render_bare_integers() {
    let b = [Binding {
        kind: Kind::Number,
        ..Binding::new("n".parse().unwrap(), "c.expires_at_ms")
    }];
    for (format, input) in [
        (Format::Yaml, "n: 12\nm: 12\n"),
        (Format::Toml, "n = 12\nm = 12\n"),
    ] {
        let conv = to_template(format, input.as_bytes(), &b, &[], true);
        assert!(
            conv.problems.is_empty() && conv.found.is_empty(),
            "{format}"
        );
        let tpl = super::template(format, conv.template, &b);
        let mut out = Vec::new();
        assert!(tpl.render(&|_| Some(&b"34"[..]), &mut out).is_empty());
        assert_eq!(text(out), input.replacen("12", "34", 1), "{format}");
    }
}
