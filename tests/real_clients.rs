//! Real clients reading files served by tokenfs.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fake_databricks::Fake;
use common::*;

/// The Databricks SDK for Python reads the mounted `~/.databrickscfg` and,
/// after a rotation, sends the new token from the same process.
/// The Python that has the Databricks SDK: scripts/test.sh installs it in
/// a virtualenv under target/ (never into the system Python).
fn sdk_python() -> std::path::PathBuf {
    let venv =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/py-venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

#[test]
fn databricks_sdk_for_python_sends_the_current_token_after_a_rotation() {
    let probe = Command::new(sdk_python())
        .args(["-c", "import databricks.sdk"])
        .status()
        .expect("python3");
    assert!(
        probe.success(),
        "databricks-sdk is missing: scripts/test.sh installs it in target/clients/py-venv"
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
    let (_, d) = start_preset(
        &s,
        "databricks",
        "databricks",
        &[".local/share/tokenfs/databricks"],
    );

    let script = "import sys\nfrom databricks.sdk import WorkspaceClient\nfor line in sys.stdin:\n    w = WorkspaceClient(profile='DEFAULT')\n    print(w.current_user.me().user_name, flush=True)\n";
    let mut py = Command::new(sdk_python())
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

type Seen = std::sync::Arc<parking_lot::Mutex<Vec<String>>>;

/// A loopback HTTP server that records the bearer token of every request
/// and answers each with `respond(method, path, body) -> (content type, body)`.
fn fake_api(respond: fn(&str, &str, &[u8]) -> (&'static str, String)) -> (String, Seen) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Default::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut len, mut line) = (0usize, String::new());
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or("").to_string(),
                    parts.next().unwrap_or("").to_string(),
                );
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    let lower = h.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        s.lock().push(
                            h["authorization:".len()..]
                                .trim()
                                .trim_start_matches("Bearer ")
                                .to_string(),
                        );
                    }
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                let (ctype, out) = respond(&method, &path, &body);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                    out.len()
                );
            });
        }
    });
    (url, seen)
}

/// The Anthropic Messages API: a short streamed message.
fn anthropic(_method: &str, _path: &str, _body: &[u8]) -> (&'static str, String) {
    let ev = |e: &str, d: &str| format!("event: {e}\ndata: {d}\n\n");
    let sse = [
        ev(
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}"#,
        ),
        ev(
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        ev(
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi from the fake"}}"#,
        ),
        ev(
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        ev(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":3}}"#,
        ),
        ev("message_stop", r#"{"type":"message_stop"}"#),
    ];
    ("text/event-stream", sse.concat())
}

/// An OpenAI-compatible API: a model list for GETs, a chat completion
/// (streamed when asked) for POSTs.
fn openai(method: &str, _path: &str, body: &[u8]) -> (&'static str, String) {
    if method == "GET" {
        return (
            "application/json",
            r#"{"object":"list","data":[{"id":"test-model","object":"model"}]}"#.into(),
        );
    }
    let stream = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|b| b["stream"].as_bool())
        .unwrap_or(false);
    if stream {
        let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"test-model","choices":[{"index":0,"delta":{"role":"assistant","content":"hi from the fake"},"finish_reason":null}]}"#;
        let last = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"test-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        return (
            "text/event-stream",
            format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n"),
        );
    }
    ("application/json", r#"{"id":"c1","object":"chat.completion","created":1,"model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"hi from the fake"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#.into())
}

/// The OpenAI Responses API (what Codex speaks): a short streamed reply;
/// anything else as `openai`.
fn openai_responses(method: &str, path: &str, body: &[u8]) -> (&'static str, String) {
    if method != "POST" || !path.trim_end_matches('/').ends_with("/responses") {
        return openai(method, path, body);
    }
    let ev = |e: &str, d: serde_json::Value| format!("event: {e}\ndata: {d}\n\n");
    let item = serde_json::json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": "hi from the fake", "annotations": []}]});
    let response = serde_json::json!({"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
        "model": "test-model", "output": [item],
        "usage": {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 4}});
    let mut started = response.clone();
    started["status"] = "in_progress".into();
    started["output"] = serde_json::json!([]);
    let sse = [
        ev(
            "response.created",
            serde_json::json!({"type": "response.created", "response": started}),
        ),
        ev(
            "response.output_item.added",
            serde_json::json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
        ),
        ev(
            "response.output_text.delta",
            serde_json::json!({"type": "response.output_text.delta", "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": "hi from the fake"}),
        ),
        ev(
            "response.output_item.done",
            serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        ),
        ev(
            "response.completed",
            serde_json::json!({"type": "response.completed", "response": response}),
        ),
    ];
    ("text/event-stream", sse.concat())
}

/// Codex CLI (the real program, from npm) reads `~/.codex/auth.json`
/// through the mount and sends the key current at each run; `codex login
/// --with-api-key` saves a new key the way it saves auth.json (a temp file
/// renamed over it), which tokenfs adopts without writing it to disk.
#[test]
fn codex_sends_the_key_current_at_each_run_and_its_login_is_adopted() {
    let codex = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients/node_modules/.bin/codex");
    assert!(
        codex.exists(),
        "Codex CLI is missing: scripts/test.sh installs it from npm"
    );
    let (url, seen) = fake_api(openai_responses);
    let s = Scratch::new();
    let home = s.path("home");
    let first = "sk-codex-first-00000000000000000000001";
    s.write(
        "home/.codex/config.toml",
        &format!("model = \"test-model\"\nmodel_provider = \"fake\"\ncli_auth_credentials_store = \"file\"\ncheck_for_update_on_startup = false\n\n[model_providers.fake]\nname = \"Fake\"\nbase_url = \"{url}/v1\"\nwire_api = \"responses\"\nrequires_openai_auth = true\n"),
    );
    s.write(
        "home/.codex/auth.json",
        &format!("{{\n  \"OPENAI_API_KEY\": \"{first}\"\n}}\n"),
    );
    let backing = Backing::open(&home.join(".codex"));
    let (_, d) = start_preset(&s, "codex", "openai", &[".codex"]);
    let work = s.path("work");
    fs::create_dir_all(&work).unwrap();
    let codex_cmd = |args: &[&str]| {
        let mut c = Command::new(&codex);
        c.args(args)
            .current_dir(&work)
            .env("HOME", &home)
            .env_remove("CODEX_HOME")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("RUST_LOG");
        c
    };
    let run = || {
        let out = codex_cmd(&["exec", "--skip-git-repo-check", "say hi"])
            .stdin(Stdio::null())
            .output()
            .expect("codex");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hi from the fake"),
            "codex failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.lock().last().cloned().unwrap_or_default()
    };
    assert_eq!(run(), first);
    let second = "sk-codex-second-0000000000000000000002";
    d.set("openai", second);
    assert_eq!(run(), second);
    // Codex's own save of a new key.
    let third = "sk-codex-third-00000000000000000000003";
    let mut login = codex_cmd(&["login", "--with-api-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("codex login");
    login
        .stdin
        .take()
        .unwrap()
        .write_all(third.as_bytes())
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "codex login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(run(), third);
    let on_disk = String::from_utf8(backing.read("auth.json").unwrap()).unwrap();
    assert!(
        on_disk.contains("__tokenfs:openai.token__") && !on_disk.contains(third),
        "{on_disk}"
    );
    assert!(
        seen.lock()
            .iter()
            .all(|t| [first, second, third].contains(&t.as_str()))
    );
}

/// Claude Code (the real CLI, from npm) reads `~/.claude/settings.json`
/// through the mount, sends the current token, and after a rotation the next
/// run sends the new one. Its own files in `~/.claude` pass through.
#[test]
fn claude_code_sends_the_token_current_at_each_run() {
    let claude = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients/node_modules/.bin/claude");
    assert!(
        claude.exists(),
        "Claude Code is missing: scripts/setup.sh installs it from npm"
    );
    let (url, seen) = fake_api(anthropic);
    let s = Scratch::new();
    let home = s.path("home");
    let first = "sk-ant-api03-first-0000000000000000000000000001";
    s.write(
        "home/.claude/settings.json",
        &format!("{{\n  \"env\": {{\n    \"ANTHROPIC_BASE_URL\": \"{url}\",\n    \"ANTHROPIC_AUTH_TOKEN\": \"{first}\"\n  }}\n}}\n"),
    );
    let (_, d) = start_preset(&s, "claude", "anthropic", &[".claude"]);
    let run = || {
        let out = Command::new(&claude)
            .args(["-p", "say hi"])
            .env("HOME", &home)
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_AUTH_TOKEN")
            .env_remove("ANTHROPIC_BASE_URL")
            .env_remove("CLAUDE_CONFIG_DIR")
            .output()
            .expect("claude");
        assert!(
            out.status.success(),
            "claude failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("hi from the fake"));
    };
    run();
    let second = "sk-ant-api03-second-000000000000000000000000002";
    d.set("anthropic", second);
    run();
    let seen = seen.lock().clone();
    assert_eq!(seen.first().map(String::as_str), Some(first), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some(second), "{seen:?}");
    assert!(seen.iter().all(|t| t == first || t == second));
    // Claude Code keeps its sessions in ~/.claude: they went through to disk.
    assert!(home.join(".claude/projects").is_dir());
}

/// Hermes Agent (the real program, from PyPI) reads `~/.hermes/config.yaml`
/// through the mount and sends the token current at each run.
#[test]
fn hermes_agent_sends_the_token_current_at_each_run() {
    let hermes = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients/hermes-venv/bin/hermes");
    assert!(
        hermes.exists(),
        "Hermes Agent is missing: scripts/test.sh installs it from PyPI"
    );
    let (url, seen) = fake_api(openai);
    let s = Scratch::new();
    let home = s.path("home");
    let first = "sk-hermes-first-000000000000000000001";
    s.write(
        "home/.hermes/config.yaml",
        &format!("# Hermes\nmodel:\n  provider: custom\n  base_url: {url}/v1\n  api_key: {first}\n  default: test-model\n"),
    );
    let (_, d) = start_preset(&s, "hermes", "gateway", &[".hermes"]);
    let run = || {
        let out = Command::new(&hermes)
            .args(["-z", "say hi"])
            .env("HOME", &home)
            .env_remove("HERMES_HOME")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .output()
            .expect("hermes");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hi from the fake"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run();
    let after_first = seen.lock().len();
    let second = "sk-hermes-second-00000000000000000002";
    d.set("gateway", second);
    run();
    let seen = seen.lock().clone();
    assert!(
        after_first > 0 && seen[..after_first].iter().all(|t| t == first),
        "{seen:?}"
    );
    assert!(
        seen.len() > after_first && seen[after_first..].iter().all(|t| t == second),
        "{seen:?}"
    );
}

/// Through a `via_proxy` preset, the Databricks SDK's one `WorkspaceClient`
/// keeps working after the token it started with is revoked: its
/// `~/.databrickscfg` holds only the proxy's URL and local key, and the
/// proxy sends the token current at each request.
#[test]
fn databricks_sdk_through_via_proxy_outlives_its_first_token() {
    let probe = Command::new(sdk_python())
        .args(["-c", "import databricks.sdk"])
        .status()
        .expect("python3");
    assert!(
        probe.success(),
        "databricks-sdk is missing: scripts/test.sh installs it in target/clients/py-venv"
    );
    let s = Scratch::new();
    let fake = Fake::start();
    let home = s.path("home");
    let first = fake.bootstrap(Duration::from_secs(3600));
    let dir = home.join(".local/share/tokenfs/databricks");
    s.write(
        "home/.local/share/tokenfs/databricks/.databrickscfg",
        &format!("[DEFAULT]\nhost = {}\ntoken = {first}\n", fake.url),
    );
    std::os::unix::fs::symlink(dir.join(".databrickscfg"), home.join(".databrickscfg")).unwrap();
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[proxy]]\nname = \"dbx\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\ncredential = \"databricks\"\n[[mount]]\npreset = \"databricks\"\ncredential = \"databricks\"\nvia_proxy = \"dbx\"\n",
        s.socket().display(),
        fake.url
    );
    let home_s = home.display().to_string();
    let d = Daemon::start_env(&s, &cfg, &[&dir], &[("HOME", home_s.as_str())]);
    let served = fs::read_to_string(home.join(".databrickscfg")).unwrap();
    assert!(
        served.contains("token = tkfs-") && !served.contains(&first),
        "{served}"
    );
    assert!(
        !served.contains(&fake.url),
        "the host is the proxy's: {served}"
    );
    // One client for the whole life of the process.
    let script = "import sys\nfrom databricks.sdk import WorkspaceClient\nw = WorkspaceClient(profile='DEFAULT')\nfor line in sys.stdin:\n    print(w.current_user.me().user_name, flush=True)\n";
    let mut py = Command::new(sdk_python())
        .args(["-c", script])
        .env("HOME", &home)
        .env_remove("DATABRICKS_HOST")
        .env_remove("DATABRICKS_TOKEN")
        .env_remove("DATABRICKS_CONFIG_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(s.path("py.log")).unwrap())
        .env("PYTHONUNBUFFERED", "1")
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
    let pylog = || fs::read_to_string(s.path("py.log")).unwrap_or_default();
    assert_eq!(
        ask().trim(),
        "someone@example.com",
        "{}\n{}",
        pylog(),
        d.log_text()
    );
    let second = fake.bootstrap(Duration::from_secs(3600));
    d.set("databricks", &second);
    // The first token is revoked at once (as a rotator does).
    if let Some(tok) = fake.state.lock().tokens.get_mut(&first) {
        tok.revoked = Some(std::time::Instant::now());
    }
    assert!(!fake.is_valid(&first));
    assert_eq!(ask().trim(), "someone@example.com", "{}", pylog());
    assert_eq!(fake.bearers("me"), vec![first, second]);
    drop(stdin);
    let _ = py.wait();
}
