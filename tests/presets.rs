//! Every preset against fixtures in the agents' real file shapes: the token
//! lands exactly at the bound keys, everything else stays byte for byte,
//! rotations change only the token, and CLI-style saves keep user edits.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

const TOK: &str = "dapi1111aaaa2222bbbb3333cccc4444dd";

/// (path under HOME, fixture, occurrences of TOK that are bound)
fn fixtures() -> Vec<(&'static str, String, usize)> {
    vec![
        (
            ".hermes/config.yaml",
            format!(
                "# Hermes\nmodel:\n  provider: custom\n  base_url: https://gw.example.com/serving-endpoints\n  api_key: {TOK}\n\nfallback_providers:\n  # same gateway: managed\n  - provider: custom\n    base_url: https://gw.example.com/serving-endpoints\n    api_key: {TOK}\n  # a third party with its own key: never touched\n  - provider: openrouter\n    base_url: https://openrouter.ai/api/v1\n    api_key: sk-or-v1-thirdparty\n  - provider: local\n    base_url: http://127.0.0.1:8080/v1\n    api_key: {TOK}\n"
            ),
            3,
        ),
        (
            ".hermes/.env",
            format!("# hermes env\nOPENAI_API_KEY={TOK}\nOTHER=keep\n"),
            1,
        ),
        (
            ".claude/settings.json",
            format!(
                "{{\n  \"env\": {{\n    \"ANTHROPIC_BASE_URL\": \"https://gw.example.com/anthropic\",\n    \"ANTHROPIC_AUTH_TOKEN\": \"{TOK}\",\n    \"OTEL_EXPORTER_OTLP_HEADERS\": \"x-team=a,Authorization=Bearer {TOK},x-b=2\"\n  }},\n  \"permissions\": {{\n    \"allow\": [\"Bash(ls:*)\"]\n  }},\n  \"model\": \"sonnet\"\n}}\n"
            ),
            2,
        ),
        (".codex/.env", format!("OPENAI_API_KEY={TOK}\n"), 1),
        (
            ".codex/auth.json",
            format!(
                "{{\n  \"OPENAI_API_KEY\": \"{TOK}\",\n  \"tokens\": null,\n  \"last_refresh\": null\n}}\n"
            ),
            1,
        ),
        (
            ".codex/config.toml",
            "# untouched\nmodel = \"o3\"\nmodel_provider = \"databricks\"\n".to_string(),
            0,
        ),
        (
            ".gemini/.env",
            format!("GEMINI_API_KEY={TOK}\nGOOGLE_CLOUD_PROJECT=p\n"),
            1,
        ),
        (
            ".config/opencode/opencode.json",
            format!(
                "{{\n  \"$schema\": \"https://opencode.ai/config.json\",\n  \"provider\": {{\n    \"databricks\": {{\n      \"npm\": \"@ai-sdk/openai-compatible\",\n      \"options\": {{\n        \"baseURL\": \"https://gw.example.com/v1\",\n        \"apiKey\": \"{TOK}\",\n        \"headers\": {{ \"Authorization\": \"Bearer {TOK}\" }}\n      }}\n    }},\n    \"other\": {{ \"options\": {{ \"apiKey\": \"{{env:OTHER_KEY}}\" }} }}\n  }}\n}}\n"
            ),
            2,
        ),
        (
            ".local/share/opencode/auth.json",
            format!(
                "{{\n  \"databricks\": {{ \"type\": \"api\", \"key\": \"{TOK}\" }},\n  \"anthropic\": {{ \"type\": \"oauth\", \"refresh\": \"r-keep\", \"access\": \"a-keep\", \"expires\": 1 }}\n}}\n"
            ),
            1,
        ),
        (
            ".local/share/tokenfs/databricks/.databrickscfg",
            format!(
                "[DEFAULT]\nhost = https://gw.example.com\ntoken = {TOK}\n\n[other]\nhost = https://else.example.com\ntoken = dapiOTHERPROFILE000\n"
            ),
            1,
        ),
        (
            ".pi/agent/models.json",
            format!(
                "{{\n  \"providers\": {{\n    \"db\": {{ \"baseUrl\": \"https://gw.example.com/v1\", \"apiKey\": \"{TOK}\" }},\n    \"x\": {{ \"apiKey\": \"!security find-generic-password -s x\" }}\n  }}\n}}\n"
            ),
            1,
        ),
    ]
}

fn parses(path: &str, text: &str) {
    if path.ends_with(".json") {
        serde_json::from_str::<serde_json::Value>(text).unwrap_or_else(|e| panic!("{path}: {e}"));
    } else if path.ends_with(".yaml") {
        use saphyr::LoadableYamlNode;
        saphyr::YamlOwned::load_from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"));
    } else if path.ends_with(".env") {
        for item in dotenvy::from_read_iter(text.as_bytes()) {
            item.unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    } else if path.ends_with("databrickscfg") {
        ini::Ini::load_from_str(text).unwrap_or_else(|e| panic!("{path}: {e}"));
    } else if path.ends_with(".toml") {
        text.parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

#[test]
fn every_preset_renders_the_token_at_exactly_its_keys() {
    let s = Scratch::new();
    let home = s.path("home");
    for (rel, text, _) in fixtures() {
        s.write(&format!("home/{rel}"), &text);
    }
    let presets = [
        "hermes",
        "claude",
        "codex",
        "gemini",
        "opencode",
        "databricks",
        "pi",
    ];
    let mut cfg = format!(
        "[control]\nsocket = \"{}\"\n\n[credentials.databricks]\nsource = \"push\"\n",
        s.socket().display()
    );
    for p in presets {
        cfg.push_str(&format!("\n[[mount]]\npreset = \"{p}\"\n"));
    }
    let dirs: Vec<PathBuf> = [
        ".hermes",
        ".claude",
        ".codex",
        ".gemini",
        ".config/opencode",
        ".local/share/opencode",
        ".local/share/tokenfs/databricks",
        ".pi/agent",
    ]
    .iter()
    .map(|d| home.join(d))
    .collect();
    let dir_refs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
    let home_s = home.display().to_string();
    let env = [
        ("HOME", home_s.as_str()),
        ("XDG_DATA_HOME", ""),
        ("CODEX_HOME", ""),
        ("CLAUDE_CONFIG_DIR", ""),
        ("HERMES_HOME", ""),
    ];
    let d = Daemon::start_env(&s, &cfg, &dir_refs, &env);

    // The token found in the files became the credential's first value.
    for (rel, text, _) in fixtures() {
        assert_eq!(
            fs::read_to_string(home.join(rel)).unwrap(),
            text,
            "{rel} as mounted"
        );
    }
    for (round, new) in [
        "dapiNEW0000000000000000000000000001",
        "dapiNEWER000000000000000000000000000002x",
    ]
    .iter()
    .enumerate()
    {
        d.set("databricks", new);
        for (rel, text, bound) in fixtures() {
            let got = fs::read_to_string(home.join(rel)).unwrap();
            parses(rel, &got);
            assert_eq!(
                got,
                text.replace(TOK, new),
                "round {round}: {rel}: only the token bytes change"
            );
            assert_eq!(
                got.matches(*new).count(),
                bound,
                "{rel}: token at exactly its keys"
            );
        }
    }
    // A CLI-style save (temp file + rename, as Claude Code and Hermes do)
    // keeps the user's edit in every file, and the token stays current.
    for (rel, _, bound) in fixtures() {
        let path = home.join(rel);
        let text = fs::read_to_string(&path).unwrap();
        let edited = if rel.ends_with(".json") {
            text.replacen("{\n", "{\n  \"edited\": true,\n", 1)
        } else {
            format!("{text}# edited by the user\n")
        };
        let tmp = path.with_file_name(".save.tmp");
        fs::write(&tmp, &edited).unwrap();
        fs::rename(&tmp, &path).unwrap();
        let got = fs::read_to_string(&path).unwrap();
        assert_eq!(got, edited, "{rel}: the edit survives");
        parses(rel, &got);
        assert_eq!(got.matches("dapiNEWER").count(), bound, "{rel}");
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Nothing on disk holds a token.
    for (rel, _, bound) in fixtures() {
        let on_disk = fs::read_to_string(home.join(rel)).unwrap();
        assert!(
            !on_disk.contains("dapiNEW") && (bound == 0 || !on_disk.contains(TOK)),
            "{rel}: {on_disk}"
        );
    }
}

#[test]
fn claude_with_an_api_key_helper_is_left_alone_and_says_so() {
    let s = Scratch::new();
    let home = s.path("home");
    let text = "{\n  \"apiKeyHelper\": \"tokenfs token databricks\",\n  \"env\": {}\n}\n";
    s.write("home/.claude/settings.json", text);
    let (_, d) = start_preset(&s, "claude", "databricks", &[".claude"]);
    d.set("databricks", "dapiHELPER000000000000000000000001");
    assert_eq!(
        fs::read_to_string(home.join(".claude/settings.json")).unwrap(),
        text
    );
    let st = d.status();
    assert!(
        st["mounts"][0]["notes"][0]
            .as_str()
            .unwrap_or("")
            .contains("apiKeyHelper"),
        "{st}"
    );
    // The helper-mode escape hatch prints the current secret.
    let out = std::process::Command::new(BIN)
        .args(["token", "databricks", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "dapiHELPER000000000000000000000001"
    );
}

#[test]
fn init_shows_fingerprints_and_changes_nothing_without_yes() {
    let s = Scratch::new();
    let home = s.path("home");
    s.write(
        "home/.hermes/config.yaml",
        &format!("model:\n  api_key: {TOK}\n"),
    );
    s.write(
        "home/.databrickscfg",
        &format!("[DEFAULT]\nhost = https://x\ntoken = {TOK}\n"),
    );
    let out_cfg = s.path("out.toml");
    let run = |yes: bool| {
        let mut c = std::process::Command::new(BIN);
        c.args(["init", "--preset", "hermes,databricks", "--output"])
            .arg(&out_cfg)
            .env("HOME", &home);
        if yes {
            c.arg("--yes");
        }
        c.output().unwrap()
    };
    let out = run(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("model.api_key: token dapi…") && !text.contains(TOK),
        "{text}"
    );
    assert!(!out_cfg.exists() && home.join(".databrickscfg").is_file());
    let out = run(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = fs::read_to_string(&out_cfg).unwrap();
    assert!(written.contains("preset = \"hermes\"") && written.contains("preset = \"databricks\""));
    assert!(
        fs::symlink_metadata(home.join(".databrickscfg"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        fs::read_to_string(home.join(".local/share/tokenfs/databricks/.databrickscfg"))
            .unwrap()
            .contains(TOK)
    );
    let check = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&out_cfg)
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// `opencode auth login` keeps the key in auth.json only. Which of its
/// entries share the credential is never guessed: without `providers` they
/// stay untouched and status says how to serve them; with it they are served.
#[test]
fn opencode_keys_only_in_auth_json_need_providers_and_say_so() {
    let s = Scratch::new();
    s.write(
        "home/.config/opencode/opencode.json",
        "{\n  \"provider\": { \"gw\": { \"options\": { \"baseURL\": \"http://127.0.0.1:9/v1\" } } }\n}\n",
    );
    let auth = format!("{{\n  \"gw\": {{ \"type\": \"api\", \"key\": \"{TOK}\" }}\n}}\n");
    s.write("home/.local/share/opencode/auth.json", &auth);
    let (home, d) = start_preset(&s, "opencode", "databricks", &[".config/opencode"]);
    let status = d.status();
    let notes = status["mounts"][0]["notes"].to_string();
    assert!(notes.contains("providers = [\\\"gw\\\"]"), "{status}");
    assert_eq!(
        status["mounts"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(
        fs::read_to_string(home.join(".local/share/opencode/auth.json")).unwrap(),
        auth
    );
    drop(d);

    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[mount]]\npreset = \"opencode\"\nproviders = [\"gw\"]\n",
        s.socket().display()
    );
    let home_s = home.display().to_string();
    let dirs = [
        home.join(".config/opencode"),
        home.join(".local/share/opencode"),
    ];
    let refs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
    let d = Daemon::start_env(
        &s,
        &cfg,
        &refs,
        &[("HOME", home_s.as_str()), ("XDG_DATA_HOME", "")],
    );
    d.set("databricks", "dapiROTATED000000000000000000000001");
    let served = fs::read_to_string(home.join(".local/share/opencode/auth.json")).unwrap();
    assert_eq!(
        served,
        auth.replace(TOK, "dapiROTATED000000000000000000000001")
    );
}

fn init_in(home: &Path, out: &Path, presets: &str, yes: bool) -> std::process::Output {
    let mut c = std::process::Command::new(BIN);
    c.args(["init", "--preset", presets, "--output"])
        .arg(out)
        .env("HOME", home)
        .env("CLAUDE_CONFIG_DIR", "")
        .env("HERMES_HOME", "")
        .env("CODEX_HOME", "");
    if yes {
        c.arg("--yes");
    }
    c.output().unwrap()
}

/// Two agents holding two different keys: `init` plans two credentials,
/// and after mounting each agent is served its own key; neither is lost.
#[test]
fn init_keeps_different_keys_in_different_credentials() {
    let s = Scratch::new();
    let home = s.path("home");
    let dapi = "dapi0123456789abcdef0123456789abcdef";
    let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
    s.write(
        "home/.hermes/config.yaml",
        &format!("model:\n  api_key: {dapi}\n"),
    );
    s.write(
        "home/.claude/settings.json",
        &format!("{{\"env\": {{\"ANTHROPIC_AUTH_TOKEN\": \"{ant}\"}}}}\n"),
    );
    let out_cfg = s.path("out.toml");
    let out = init_in(&home, &out_cfg, "hermes,claude", true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("credential databricks = dapi…")
            && text.contains("credential anthropic = sk-a…"),
        "{text}"
    );
    assert!(!text.contains(dapi) && !text.contains(ant));
    assert!(text.contains("unmount --restore"), "{text}");
    // Idempotent: the same run again changes nothing and succeeds.
    let again = init_in(&home, &out_cfg, "hermes,claude", true);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n{}",
        s.socket().display(),
        fs::read_to_string(&out_cfg).unwrap()
    );
    let home_s = home.display().to_string();
    let (hermes, claude) = (home.join(".hermes"), home.join(".claude"));
    let env = [
        ("HOME", home_s.as_str()),
        ("CLAUDE_CONFIG_DIR", ""),
        ("HERMES_HOME", ""),
    ];
    let d = Daemon::start_env(&s, &cfg, &[&hermes, &claude], &env);
    assert!(
        fs::read_to_string(hermes.join("config.yaml"))
            .unwrap()
            .contains(dapi)
    );
    assert!(
        fs::read_to_string(claude.join("settings.json"))
            .unwrap()
            .contains(ant)
    );
    let status = d.status().to_string();
    assert!(
        status.contains("anthropic") && status.contains("databricks"),
        "{status}"
    );
}

/// A preset whose own files hold two different keys is not merged.
#[test]
fn init_refuses_to_merge_a_presets_different_keys() {
    let s = Scratch::new();
    let home = s.path("home");
    s.write(
        "home/.codex/.env",
        "OPENAI_API_KEY=sk-one-0123456789abcdefghij\n",
    );
    s.write(
        "home/.codex/auth.json",
        "{\"OPENAI_API_KEY\": \"sk-two-0123456789abcdefghij\"}\n",
    );
    let out = init_in(&home, &s.path("out.toml"), "codex", true);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 different keys") && !err.contains("sk-one"),
        "{err}"
    );
    assert!(!s.path("out.toml").exists());
}

/// A dotfiles-managed `~/.databrickscfg` (a symlink) is served where it
/// points, and the link keeps working; a move cut short is finished.
#[test]
fn init_follows_a_symlinked_databrickscfg_and_finishes_an_interrupted_move() {
    let s = Scratch::new();
    let home = s.path("home");
    s.write(
        "home/dotfiles/databrickscfg",
        &format!("[DEFAULT]\nhost = https://x\ntoken = {TOK}\n"),
    );
    std::os::unix::fs::symlink(
        home.join("dotfiles/databrickscfg"),
        home.join(".databrickscfg"),
    )
    .unwrap();
    let out_cfg = s.path("out.toml");
    let out = init_in(&home, &out_cfg, "databricks", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = fs::read_to_string(&out_cfg).unwrap();
    assert!(
        written.contains(&format!("dir = \"{}\"", home.join("dotfiles").display())),
        "{written}"
    );
    assert!(written.contains("path = \"databrickscfg\""), "{written}");
    assert_eq!(
        fs::read_link(home.join(".databrickscfg")).unwrap(),
        home.join("dotfiles/databrickscfg")
    );
    let check = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&out_cfg)
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Killed between moving the file and linking it: the rerun links it.
    let s2 = Scratch::new();
    let home2 = s2.path("home");
    s2.write(
        "home/.local/share/tokenfs/databricks/.databrickscfg",
        &format!("[DEFAULT]\ntoken = {TOK}\n"),
    );
    let out = init_in(&home2, &s2.path("out.toml"), "databricks", true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read_link(home2.join(".databrickscfg")).unwrap(),
        home2.join(".local/share/tokenfs/databricks/.databrickscfg")
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted"));
}

/// `init --via-proxy`: one loopback proxy per credential, its upstream the
/// origin of the base URL the agents use (set in their files, or their
/// default). After mounting, the agents' files hold the proxy's URL and a
/// local key, never the token, and a request made with what a file shows
/// reaches the upstream with the real token.
#[test]
fn init_via_proxy_routes_each_credential_through_its_own_proxy() {
    let up = common::http::Upstream::start();
    let dapi = "dapi0123456789abcdef0123456789abcdef";
    let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
    up.mint(dapi);
    let s = Scratch::new();
    let home = s.path("home");
    s.write(
        "home/.hermes/config.yaml",
        &format!(
            "model:\n  provider: custom\n  base_url: {}\n  api_key: {dapi}\n",
            up.url("/serving-endpoints")
        ),
    );
    s.write(
        "home/.claude/settings.json",
        &format!("{{\"env\": {{\"ANTHROPIC_AUTH_TOKEN\": \"{ant}\"}}}}\n"),
    );
    let out_cfg = s.path("out.toml");
    let out = std::process::Command::new(BIN)
        .args([
            "init",
            "--preset",
            "hermes,claude",
            "--yes",
            "--via-proxy",
            "--output",
        ])
        .arg(&out_cfg)
        .env("HOME", &home)
        .env("CLAUDE_CONFIG_DIR", "")
        .env("HERMES_HOME", "")
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!plan.contains(dapi) && !plan.contains(ant), "{plan}");
    let text = fs::read_to_string(&out_cfg).unwrap();
    let upstream = format!("upstream = \"{}\"", up.url(""));
    assert!(text.contains(&upstream), "{text}");
    assert!(
        text.contains("upstream = \"https://api.anthropic.com\""),
        "{text}"
    );
    assert!(text.contains("header = \"x-api-key\""), "{text}");
    assert!(
        text.contains("via_proxy = \"databricks\"") && text.contains("via_proxy = \"anthropic\""),
        "{text}"
    );

    let cfg = format!("[control]\nsocket = \"{}\"\n{text}", s.socket().display());
    let home_s = home.display().to_string();
    let (hermes, claude) = (home.join(".hermes"), home.join(".claude"));
    let env = [
        ("HOME", home_s.as_str()),
        ("CLAUDE_CONFIG_DIR", ""),
        ("HERMES_HOME", ""),
    ];
    let d = Daemon::start_env(&s, &cfg, &[&hermes, &claude], &env);
    let yaml = fs::read_to_string(hermes.join("config.yaml")).unwrap();
    let settings = fs::read_to_string(claude.join("settings.json")).unwrap();
    assert!(
        !yaml.contains(dapi) && !settings.contains(ant),
        "{yaml}\n{settings}"
    );
    let value = |key: &str| {
        yaml.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let (base, key) = (value("base_url:"), value("api_key:"));
    let rest = base.strip_prefix("http://").unwrap_or_default();
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    assert_eq!(path, "serving-endpoints", "{yaml}");
    assert_ne!(addr, up.addr.to_string(), "the base URL is the proxy's");
    let claude_env: serde_json::Value = serde_json::from_str(&settings).unwrap();
    let claude_url = claude_env["env"]["ANTHROPIC_BASE_URL"]
        .as_str()
        .unwrap_or("");
    assert!(claude_url.starts_with("http://127.0.0.1:"), "{settings}");
    assert_ne!(
        claude_url,
        format!("http://{addr}"),
        "one proxy per credential"
    );

    let mut conn = common::http::Conn::connect(addr.parse().unwrap());
    let auth = format!("Bearer {key}");
    let r = conn.request(
        "POST",
        "/serving-endpoints/m/invocations",
        &[("authorization", auth.as_bytes())],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.seen();
    let last = seen.last().expect("the upstream saw the request");
    assert_eq!(last.target, "/serving-endpoints/m/invocations");
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {dapi}").as_bytes())
    );
    let status = d.status().to_string();
    assert!(!status.contains(dapi) && !status.contains(&key), "{status}");
}
