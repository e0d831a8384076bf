//! Every rendering of an awkward token reads back as exactly that token in
//! the parsers the agents really use: PyYAML, python-dotenv, Python's
//! configparser (raw sections, as the Databricks SDK reads them), json and
//! tomllib, and Node's `dotenv`. A token a position cannot carry must be
//! refused instead (`Template::carries`), never rendered broken.
//!
//! Needs the parsers `scripts/test.sh` installs (a Python venv under
//! `target/`, Node's dotenv under `target/clients`): fails, never skips,
//! when they are missing.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokenfs::render::{self, Binding, Format};

const SLOT: &str = "db.token";
const PH: &str = "__tokenfs:db.token__";

fn corpus() -> Vec<String> {
    let mut c: Vec<String> = [
        "dapi0123456789abcdef",
        "sk-ab\"c#d",
        "a'b",
        "it's \"q\"",
        "back\\slash",
        "trail\\",
        "\\n",
        "#x",
        "a #b",
        "a: b",
        "x=y",
        "a;b",
        ";x",
        "-lead",
        "*x",
        "!x",
        "%x",
        "%(x)s",
        "&x",
        "@x",
        "`x`",
        "{x}",
        "[x]",
        "null",
        "true",
        "no",
        "on",
        "123",
        "1e3",
        "0x10",
        "1_000",
        "12:30",
        "~",
        "=",
        "<<",
        "ünï©ødé",
        "$HOME",
        "${HOME}",
        "a\tb",
        "a\nb",
        "sk-ant-api03-AbC_dEf-123==",
        "http://127.0.0.1:4000/x",
        "a:b",
        "a:",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    c.push("k".repeat(10_000));
    c
}

/// (format, fixture with `{T}` where the placeholder goes, key, reader).
const FIXTURES: [(Format, &str, &str, &str); 13] = [
    (Format::Yaml, "a:\n  k: {T}\n  o: 1\n", "a.k", "yaml"),
    (Format::Yaml, "a:\n  k: '{T}'  # c\n", "a.k", "yaml"),
    (Format::Yaml, "a:\n  k: \"{T}\"\n", "a.k", "yaml"),
    (Format::Yaml, "a: {k: {T}, o: 1}\n", "a.k", "yaml"),
    (Format::Yaml, "l:\n  - k: {T}\n", "l.0.k", "yaml"),
    (Format::Json, "{\"a\": {\"k\": \"{T}\"}}", "a.k", "json"),
    (Format::Toml, "[a]\nk = \"{T}\"\n", "a.k", "toml"),
    (Format::Toml, "[a]\nk = '{T}' # c\n", "a.k", "toml"),
    (Format::Dotenv, "O=1\nK={T}\n", "K", "dotenv"),
    (Format::Dotenv, "export K=\"{T}\" # c\n", "K", "dotenv"),
    (Format::Dotenv, "K='{T}'\n", "K", "dotenv"),
    (
        Format::Ini,
        "[DEFAULT]\nhost = h\ntoken = {T}\n",
        "DEFAULT.token",
        "ini",
    ),
    (Format::Ini, "[p]\ntoken={T}\n", "p.token", "ini"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let p = std::env::var_os("TOKENFS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-venv/bin/python3"));
    let ok = Command::new(&p)
        .args(["-c", "import yaml, dotenv"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} with PyYAML and python-dotenv is needed (scripts/test.sh installs them)",
        p.display()
    );
    p
}

fn node_modules() -> PathBuf {
    let m = root().join("target/clients/node_modules");
    assert!(
        m.join("dotenv/package.json").exists(),
        "Node's dotenv is needed in {} (scripts/test.sh installs it)",
        m.display()
    );
    m
}

/// Renders every corpus token into every fixture it can carry; returns
/// (file, expected token) for each rendering and counts the refusals.
fn render_all(dir: &Path) -> (Vec<(PathBuf, &'static str, String, String)>, usize) {
    let mut cases = Vec::new();
    let mut refused = 0;
    for (i, (format, fixture, key, reader)) in FIXTURES.iter().enumerate() {
        let bindings = [Binding::new(key.parse().unwrap(), SLOT)];
        let t = render::template(*format, fixture.replace("{T}", PH).into_bytes(), &bindings);
        for (j, tok) in corpus().into_iter().enumerate() {
            if t.carries(SLOT, tok.as_bytes()).is_err() {
                refused += 1;
                continue;
            }
            let mut out = Vec::new();
            let lookup = |_: &str| Some(tok.as_bytes());
            assert!(t.render(&lookup, &mut out).is_empty());
            render::check(*format, &out, &bindings, &lookup)
                .unwrap_or_else(|e| panic!("{format} {fixture:?} {tok:?}: {e}"));
            let file = dir.join(format!("{i}-{j}"));
            fs::write(&file, &out).unwrap();
            cases.push((file, *reader, key.to_string(), tok));
        }
    }
    (cases, refused)
}

const PY: &str = r#"
import configparser, json, sys, tomllib, yaml
from dotenv import dotenv_values
out = {}
for line in sys.stdin:
    path, reader, key = json.loads(line)
    text = open(path, encoding="utf-8").read()
    try:
        if reader == "yaml":
            v = yaml.safe_load(text)
            for seg in key.split("."):
                v = v[int(seg)] if isinstance(v, list) else v[seg]
        elif reader == "json":
            v = json.loads(text)
            for seg in key.split("."):
                v = v[seg]
        elif reader == "toml":
            v = tomllib.loads(text)
            for seg in key.split("."):
                v = v[seg]
        elif reader == "dotenv":
            v = dotenv_values(path)[key]
        elif reader == "ini":
            c = configparser.ConfigParser()
            c.read(path)
            section, k = key.split(".", 1)
            raw = c.defaults() if section == "DEFAULT" else c._sections[section]
            v = raw[k]
    except Exception as e:
        v = {"error": repr(e)}
    out[path] = v
print(json.dumps(out))
"#;

const NODE: &str = r#"
const fs = require("fs");
const dotenv = require("dotenv");
const out = {};
for (const line of fs.readFileSync(0, "utf8").split("\n").filter(Boolean)) {
  const [path, key] = JSON.parse(line);
  out[path] = dotenv.parse(fs.readFileSync(path))[key] ?? null;
}
process.stdout.write(JSON.stringify(out));
"#;

fn run_reader(cmd: &mut Command, input: String) -> BTreeMap<String, serde_json::Value> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn renderings_read_back_exactly_in_the_agents_parsers() {
    let tmp = tempfile::tempdir().unwrap();
    let (cases, refused) = render_all(tmp.path());
    let input: String = cases
        .iter()
        .map(|(f, reader, key, _)| serde_json::json!([f, reader, key]).to_string() + "\n")
        .collect();
    let py = run_reader(Command::new(python()).args(["-c", PY]), input);
    let node_input: String = cases
        .iter()
        .filter(|(_, reader, _, _)| *reader == "dotenv")
        .map(|(f, _, key, _)| serde_json::json!([f, key]).to_string() + "\n")
        .collect();
    let node = run_reader(
        Command::new("node")
            .args(["-e", NODE])
            .env("NODE_PATH", node_modules()),
        node_input,
    );
    let mut failures = Vec::new();
    for (file, reader, _, tok) in &cases {
        let f = file.display().to_string();
        if py.get(&f).and_then(|v| v.as_str()) != Some(tok.as_str()) {
            failures.push(format!(
                "python {reader} {f}: {tok:?} read as {:?}",
                py.get(&f)
            ));
        }
        if *reader == "dotenv" && node.get(&f).and_then(|v| v.as_str()) != Some(tok.as_str()) {
            failures.push(format!(
                "node dotenv {f}: {tok:?} read as {:?}",
                node.get(&f)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(cases.len() > 400, "{} renderings checked", cases.len());
    eprintln!(
        "{} renderings read back exactly; {refused} refused",
        cases.len()
    );
}
