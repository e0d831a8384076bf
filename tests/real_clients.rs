//! Real clients reading files served by tokenfs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fake_databricks::Fake;
use common::*;

/// The Databricks SDK for Python reads the mounted `~/.databrickscfg` and,
/// after a rotation, sends the new token from the same process.
#[test]
fn databricks_sdk_for_python_sends_the_current_token_after_a_rotation() {
    let probe = Command::new("python3")
        .args(["-c", "import databricks.sdk"])
        .status()
        .expect("python3");
    assert!(
        probe.success(),
        "databricks-sdk is missing: pip install databricks-sdk (scripts/setup.sh does)"
    );
    let s = Scratch::new();
    let fake = Fake::start();
    let home = s.path("home");
    let first = fake.bootstrap(Duration::from_secs(3600));
    s.write(
        "home/.local/share/tokenfs/databricks/.databrickscfg",
        &format!("[DEFAULT]\nhost = {}\ntoken = {first}\n\n[other]\nhost = https://else.example.com\ntoken = keep\n", fake.url),
    );
    std::os::unix::fs::symlink(
        home.join(".local/share/tokenfs/databricks/.databrickscfg"),
        home.join(".databrickscfg"),
    )
    .unwrap();
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[mount]]\npreset = \"databricks\"\n",
        s.socket().display()
    );
    let home_s = home.display().to_string();
    let d = Daemon::start_env(
        &s,
        &cfg,
        &[&home.join(".local/share/tokenfs/databricks")],
        &[("HOME", home_s.as_str())],
    );

    let script = "import sys\nfrom databricks.sdk import WorkspaceClient\nfor line in sys.stdin:\n    w = WorkspaceClient(profile='DEFAULT')\n    print(w.current_user.me().user_name, flush=True)\n";
    let mut py = Command::new("python3")
        .args(["-c", script])
        .env("HOME", &home)
        .env_remove("DATABRICKS_HOST")
        .env_remove("DATABRICKS_TOKEN")
        .env_remove("DATABRICKS_CONFIG_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = py.stdin.take().unwrap();
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut ask = || {
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line
    };
    assert_eq!(ask().trim(), "someone@example.com");
    let second = fake.bootstrap(Duration::from_secs(3600));
    d.set("databricks", &second);
    assert_eq!(ask().trim(), "someone@example.com");
    let all = fake.state.lock().bearers.clone();
    assert_eq!(
        fake.bearers("me"),
        vec![first, second],
        "the SDK sent the token current at each call: {all:?}"
    );
    drop(stdin);
    let _ = py.wait();
}
