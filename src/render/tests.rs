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
