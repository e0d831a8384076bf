//! Nothing the user wrote is lost or changed outside the bound positions:
//! the reproductions of the data-loss reports, through a real mount.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use tokenfs::control::{self, Request};

const PH: &str = "__tokenfs:db.token__";

/// A config binding `model.api_key` of `config.yaml` in `dir` to `db`.
fn config(s: &Scratch, dirs: &[(&Path, &str, &str, &str)]) -> String {
    let mut c = format!(
        "[control]\nsocket = \"{}\"\n\n[credentials.db]\nsource = \"push\"\n",
        s.socket().display()
    );
    for (dir, path, format, key) in dirs {
        c += &format!(
            "\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"{path}\"\nformat = \"{format}\"\nbind = {{ \"{key}\" = \"db.token\" }}\n",
            dir.display()
        );
    }
    c
}

/// What a CLI does to save: read, change, write a temp file, rename it over.
fn cli_save(path: &Path, edit: impl FnOnce(String) -> String) {
    let text = fs::read_to_string(path).unwrap();
    let tmp = path.with_file_name(".config.yaml.tmp.1234");
    fs::write(&tmp, edit(text)).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn set_result(d: &Daemon, secret: &str) -> Result<serde_json::Value, String> {
    control::call(
        &d.socket,
        &Request::Set {
            name: "db".into(),
            field: None,
            secret: secret.into(),
        },
    )
}

fn file_errors(d: &Daemon) -> String {
    d.status()["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["files"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f["last_error"].as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join("\n")
}

const HERMES_NONE: &str = "\
model:
  provider: custom
  base_url: http://127.0.0.1:8080/v1
  api_key: none
  reasoning_effort: none
comment: none of these matter
tests: [unit-test, x, test]
max_tokens: 12345
note: \"\"
";

/// Hermes for a keyless local endpoint: `none` everywhere, one bound. Short
/// tokens as current and recent values never touch another byte, across
/// mount, set and CLI-style saves.
#[test]
fn short_values_never_touch_unbound_bytes() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", HERMES_NONE);
    let backing = Backing::open(&dir);
    let d = Daemon::start(
        &s,
        &config(&s, &[(&dir, "config.yaml", "yaml", "model.api_key")]),
        &[&dir],
    );
    let template = HERMES_NONE.replacen("api_key: none", &format!("api_key: {PH}"), 1);
    let on_disk = || String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert_eq!(on_disk(), template);
    // The `none` that was replaced is in the originals backup, owner-only.
    let original = s
        .path("state/originals")
        .join(dir.join("config.yaml").strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(&original).unwrap(), HERMES_NONE);
    assert_eq!(
        fs::metadata(&original).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let path = dir.join("config.yaml");
    let mut added = String::new();
    for tok in [
        "none",
        "test",
        "x",
        "123",
        "1",
        "e",
        "dapiREAL0123456789abcdef0123456789",
    ] {
        d.set("db", tok);
        let served = fs::read_to_string(&path).unwrap();
        assert!(
            served.contains("reasoning_effort: none\ncomment: none of these matter\n"),
            "{tok}: {served}"
        );
        let line = format!("max_turns_{}: 60\n", added.len());
        added += &line;
        cli_save(&path, |t| t + &line);
        let disk = on_disk();
        let want_quoted = template.replace(PH, &format!("\"{PH}\"")) + &added;
        assert!(
            disk == template.clone() + &added || disk == want_quoted,
            "token {tok:?}:\n{disk}"
        );
    }
    let served = fs::read_to_string(&path).unwrap();
    assert_eq!(served.matches("dapiREAL").count(), 1, "{served}");
    drop(d);
}

/// The same in JSON (a token `1` once became part of key names) and with
/// values a Claude settings file holds.
#[test]
fn short_tokens_in_json_change_no_key_names() {
    let s = Scratch::new();
    let dir = s.path("home/.claude");
    let input = r#"{"env": {"ANTHROPIC_AUTH_TOKEN": "x", "DISABLE_TELEMETRY": "none"}, "permissions": {"allow": ["Bash(none:*)", "Bash(x)"]}, "model": "latest", "tests": ["unit-test"], "max_tokens": 1}"#;
    s.write("home/.claude/settings.json", input);
    let backing = Backing::open(&dir);
    let d = Daemon::start(
        &s,
        &config(
            &s,
            &[(&dir, "settings.json", "json", "env.ANTHROPIC_AUTH_TOKEN")],
        ),
        &[&dir],
    );
    let template = input.replacen(
        r#""ANTHROPIC_AUTH_TOKEN": "x""#,
        &format!(r#""ANTHROPIC_AUTH_TOKEN": "{PH}""#),
        1,
    );
    for tok in ["test", "1", "none", "sk-ant-api03-long-enough-key-0000"] {
        d.set("db", tok);
        let path = dir.join("settings.json");
        let served = fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&served).unwrap();
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], tok);
        assert_eq!(v["permissions"]["allow"][0], "Bash(none:*)");
        fs::write(&path, &served).unwrap();
        assert_eq!(
            String::from_utf8(backing.read("settings.json").unwrap()).unwrap(),
            template
        );
    }
}

/// Tokens with quotes, `#` or backslashes are written encoded; one a
/// format cannot carry is refused by `set`, naming file and key, and the
/// previous rendering keeps being served.
#[test]
fn tokens_are_encoded_per_format_or_refused_before_publishing() {
    let s = Scratch::new();
    let home = s.path("home");
    let dirs = ["claude", "codex", "gemini", "databricks", "hermes"].map(|d| home.join(d));
    s.write("home/claude/settings.json", "{\"env\": {\"K\": \"\"}}\n");
    s.write("home/codex/config.toml", "[p]\nkey = \"\"\n");
    s.write("home/gemini/.env", "GEMINI_API_KEY=\n");
    s.write(
        "home/databricks/.databrickscfg",
        "[DEFAULT]\nhost = https://h\ntoken =\n",
    );
    s.write("home/hermes/config.yaml", "model:\n  api_key: ''\n");
    let cfg = config(
        &s,
        &[
            (&dirs[0], "settings.json", "json", "env.K"),
            (&dirs[1], "config.toml", "toml", "p.key"),
            (&dirs[2], ".env", "dotenv", "GEMINI_API_KEY"),
            (&dirs[3], ".databrickscfg", "ini", "DEFAULT.token"),
            (&dirs[4], "config.yaml", "yaml", "model.api_key"),
        ],
    );
    let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let d = Daemon::start(&s, &cfg, &refs);
    let good = "sk-ab\"c#d\\e";
    d.set("db", good);
    let read = |i: usize, f: &str| fs::read_to_string(dirs[i].join(f)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&read(0, "settings.json")).unwrap();
    assert_eq!(json["env"]["K"], good);
    let toml: toml::Table = toml::from_str(&read(1, "config.toml")).unwrap();
    assert_eq!(toml["p"]["key"].as_str(), Some(good));
    let env: Vec<(String, String)> = dotenvy::from_read_iter(read(2, ".env").as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(env, vec![("GEMINI_API_KEY".to_string(), good.to_string())]);
    assert!(read(3, ".databrickscfg").contains(&format!("token ={good}")));
    for yaml_tok in ["null", "123", "{x}", "*x", "!x", "%x", "@x", "true"] {
        d.set("db", yaml_tok);
        let y = read(4, "config.yaml");
        assert!(y.contains(&format!("'{yaml_tok}'")), "{yaml_tok}: {y}");
    }
    // Go's ini reader (the Databricks CLI) reads a leading `#` as a
    // comment: refused with the file and key, and nothing changes anywhere.
    let before = read(3, ".databrickscfg");
    let json_before = read(0, "settings.json");
    let generation = d.status()["generation"].as_u64().unwrap();
    let err = set_result(&d, "#dapi-hash-0123456789").unwrap_err();
    assert!(
        err.contains(".databrickscfg") && err.contains("DEFAULT.token"),
        "{err}"
    );
    assert!(!err.contains("dapi-hash"), "{err}");
    assert_eq!(read(0, "settings.json"), json_before);
    assert_eq!(read(3, ".databrickscfg"), before);
    assert_eq!(d.status()["generation"].as_u64().unwrap(), generation);
    // dotenv cannot hold `${…}` for every reader: refused too.
    let err = set_result(&d, "a${HOME}b").unwrap_err();
    assert!(
        err.contains(".env") && err.contains("GEMINI_API_KEY"),
        "{err}"
    );
}

/// Two agents' files with two different keys, bound to one credential:
/// the mount refuses and changes nothing; `replace = true` lets the
/// credential take over, after backing the file up.
#[test]
fn two_different_keys_refuse_the_mount_unless_replace() {
    let s = Scratch::new();
    let hermes = s.path("home/.hermes");
    let claude = s.path("home/.claude");
    let dapi = "dapi0123456789abcdef0123456789abcdef";
    let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
    let hermes_yaml = format!("model:\n  api_key: {dapi}\n");
    let claude_json = format!("{{\"env\": {{\"ANTHROPIC_AUTH_TOKEN\": \"{ant}\"}}}}\n");
    s.write("home/.hermes/config.yaml", &hermes_yaml);
    s.write("home/.claude/settings.json", &claude_json);
    // A file mounted first whose bound value is no token: not touched either.
    let gemini = s.path("home/.gemini");
    s.write("home/.gemini/.env", "GEMINI_API_KEY=none\n");
    let cfg = config(
        &s,
        &[
            (&gemini, ".env", "dotenv", "GEMINI_API_KEY"),
            (&hermes, "config.yaml", "yaml", "model.api_key"),
            (&claude, "settings.json", "json", "env.ANTHROPIC_AUTH_TOKEN"),
        ],
    );
    let cfg_path = s.write("tokenfs.toml", &cfg);
    let out = Command::new(BIN)
        .args(["mount", "--config"])
        .arg(&cfg_path)
        .env("TOKENFS_STATE_DIR", s.path("state"))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("settings.json") && err.contains("env.ANTHROPIC_AUTH_TOKEN"),
        "{err}"
    );
    assert!(err.contains("replace = true"), "{err}");
    assert!(!err.contains(ant) && !err.contains(dapi), "{err}");
    assert!(!is_mounted(&hermes) && !is_mounted(&claude));
    assert_eq!(
        fs::read_to_string(hermes.join("config.yaml")).unwrap(),
        hermes_yaml
    );
    assert_eq!(
        fs::read_to_string(claude.join("settings.json")).unwrap(),
        claude_json
    );
    assert_eq!(
        fs::read_to_string(gemini.join(".env")).unwrap(),
        "GEMINI_API_KEY=none\n"
    );
    assert!(!s.path("state/originals").exists(), "nothing was converted");

    // The rotation case: the credential takes over, the old key is backed up.
    let cfg = cfg.replace("[[mount]]\n", "[[mount]]\nreplace = true\n");
    let d = Daemon::start(&s, &cfg, &[&gemini, &hermes, &claude]);
    let served = fs::read_to_string(claude.join("settings.json")).unwrap();
    assert!(served.contains(dapi), "{served}");
    let backup = s
        .path("state/originals")
        .join(claude.join("settings.json").strip_prefix("/").unwrap());
    assert_eq!(fs::read_to_string(backup).unwrap(), claude_json);
    drop(d);
}

/// A token written at the bound key and at another key: the other copy is
/// the user's and stays (reported in status); the bound one is adopted.
#[test]
fn a_token_written_outside_the_bound_key_is_kept_and_reported() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", "model:\n  api_key: ''\n");
    let backing = Backing::open(&dir);
    let d = Daemon::start(
        &s,
        &config(&s, &[(&dir, "config.yaml", "yaml", "model.api_key")]),
        &[&dir],
    );
    let tok = token("written", 40);
    let path = dir.join("config.yaml");
    fs::write(
        &path,
        format!("model:\n  api_key: {tok}\nspare_key: {tok}\n"),
    )
    .unwrap();
    let disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert_eq!(disk, format!("model:\n  api_key: {PH}\nspare_key: {tok}\n"));
    let errors = file_errors(&d);
    assert!(
        errors.contains("stored on disk") && errors.contains(":3:") && errors.contains("spare_key"),
        "{errors}"
    );
    assert!(!errors.contains(&tok), "{errors}");
    assert!(
        d.status()["credentials"][0]["fields"]["token"]
            .as_str()
            .unwrap()
            .starts_with("dapi")
    );
}

/// A value written at a bound key that cannot be a token (`none`) is not
/// adopted: the key keeps showing the credential, the write is backed up.
#[test]
fn an_implausible_value_at_a_bound_key_is_not_adopted() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let tok = token("good", 40);
    s.write(
        "home/.hermes/config.yaml",
        &format!("model:\n  api_key: {tok}\n"),
    );
    let d = Daemon::start(
        &s,
        &config(&s, &[(&dir, "config.yaml", "yaml", "model.api_key")]),
        &[&dir],
    );
    let path = dir.join("config.yaml");
    fs::write(&path, "model:\n  api_key: none\nother: 1\n").unwrap();
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("model:\n  api_key: {tok}\nother: 1\n")
    );
    let errors = file_errors(&d);
    assert!(
        errors.contains("not adopted") && errors.contains("model.api_key"),
        "{errors}"
    );
    let backups: Vec<String> = fs::read_dir(
        s.path("state/originals")
            .join(dir.strip_prefix("/").unwrap()),
    )
    .unwrap()
    .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
    .collect();
    assert!(
        backups
            .iter()
            .any(|b| b == "model:\n  api_key: none\nother: 1\n"),
        "{backups:?}"
    );
}

/// Sizes are bounded: a huge truncate or a write far out gets EFBIG, the
/// daemon stays small, and a managed file over the limit refuses to mount.
#[test]
fn huge_writes_get_efbig_and_the_daemon_stays_small() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("size", 40)));
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    let path = dir.join("config.yaml");
    let before = fs::read_to_string(&path).unwrap();
    let truncate = Command::new("truncate")
        .args(["-s", "64G"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!truncate.status.success());
    assert!(
        String::from_utf8_lossy(&truncate.stderr).contains("too large"),
        "{truncate:?}"
    );
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let e = std::os::unix::fs::FileExt::write_at(&f, b"x", 1 << 40).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFBIG));
    drop(f);
    assert_eq!(fs::read_to_string(&path).unwrap(), before);
    let rss_kib: u64 = fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    assert!(rss_kib < 32 * 1024, "daemon RSS {rss_kib} KiB");
    assert!(file_errors(&d).contains("EFBIG"));
    drop(d);

    let big = s.path("big");
    fs::create_dir_all(&big).unwrap();
    fs::write(big.join("config.yaml"), "a: b\n".repeat(300_000)).unwrap();
    let cfg_path = s.write("big.toml", &hermes_config(&s, &big));
    let out = Command::new(BIN)
        .args(["mount", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml") && err.contains("max_file_size"),
        "{err}"
    );
}

/// `unmount --restore` leaves files that hold the current tokens at the
/// bound keys and every other byte as it was.
#[test]
fn unmount_restore_leaves_working_files() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let input = "# keep me\nmodel:\n  api_key: none  # bound\n  reasoning_effort: none\n";
    s.write("home/.hermes/config.yaml", input);
    let mut d = Daemon::start(
        &s,
        &config(&s, &[(&dir, "config.yaml", "yaml", "model.api_key")]),
        &[&dir],
    );
    let tok = "dapi0123456789abcdef0123456789abcdef";
    d.set("db", tok);
    let out = Command::new(BIN)
        .args(["unmount", "--restore", "--socket"])
        .arg(&d.socket)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("restored 1 key"),
        "{out:?}"
    );
    d.wait_exit(std::time::Duration::from_secs(5));
    assert!(!is_mounted(&dir));
    let restored = fs::read_to_string(dir.join("config.yaml")).unwrap();
    assert_eq!(
        restored,
        input.replace("api_key: none", &format!("api_key: {tok}"))
    );
}
