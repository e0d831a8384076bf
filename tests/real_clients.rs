//! Real clients reading files served by tokenfs.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokenfs::control::{self, Request};

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
    let _one_at_a_time = real_clients_lock();
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
    let _one_at_a_time = real_clients_lock();
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
    let _one_at_a_time = real_clients_lock();
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

/// The tests that run agent CLIs (node, Python) take turns: together they
/// load two shared cores enough to stretch the timing a test relies on (a
/// Hermes turn finishing before the next line is typed).
fn real_clients_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A real client's program under target/clients; missing fails the test.
fn client(rel: &str, what: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients")
        .join(rel);
    assert!(
        p.exists(),
        "{what} is missing ({}): scripts/test.sh installs it",
        p.display()
    );
    p
}

/// One request the guarded fake received: the token it carried and
/// whether that token was valid when it arrived.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    path: String,
    token: String,
    authorised: bool,
    body: Vec<u8>,
}

type Hook = Arc<dyn Fn(&Call) + Send + Sync>;

#[derive(Default)]
struct GuardedState {
    valid: std::collections::HashSet<String>,
    issued: Vec<String>,
    calls: Vec<Call>,
    /// Runs before an authorised request is answered (e.g. a rotation).
    hook: Option<Hook>,
}

/// A loopback API that accepts only the tokens currently valid (a
/// rotation revokes the old one at once): others get 401. Answers with
/// `respond(method, path, body)`.
#[derive(Clone)]
struct Guarded {
    url: String,
    state: Arc<Mutex<GuardedState>>,
}

impl Guarded {
    fn start(respond: fn(&str, &str, &[u8]) -> (&'static str, String)) -> Guarded {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state: Arc<Mutex<GuardedState>> = Default::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || guarded_serve(conn, &st, respond));
            }
        });
        Guarded { url, state }
    }

    /// A new valid token.
    fn mint(&self) -> String {
        let mut st = self.state.lock();
        let t = format!("upstream-{}-{}", st.issued.len(), token("x", 24));
        st.valid.insert(t.clone());
        st.issued.push(t.clone());
        t
    }

    /// Mints a token, gives it to tokenfs, and revokes every older one.
    fn rotate(&self, socket: &std::path::Path, credential: &str) -> String {
        let t = self.mint();
        control::call(
            socket,
            &Request::Set {
                name: credential.into(),
                field: None,
                secret: t.clone(),
            },
        )
        .expect("set");
        self.state.lock().valid.retain(|v| *v == t);
        t
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().calls.clone()
    }

    fn issued(&self) -> Vec<String> {
        self.state.lock().issued.clone()
    }

    fn set_hook(&self, hook: Hook) {
        self.state.lock().hook = Some(hook);
    }
}

fn guarded_serve(
    conn: std::net::TcpStream,
    st: &Mutex<GuardedState>,
    respond: fn(&str, &str, &[u8]) -> (&'static str, String),
) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let Some(head) = common::http::read_head(&mut r) else {
            return;
        };
        let body = common::http::read_body(&mut r, &head, false);
        let token = head
            .get("authorization")
            .map(|v| {
                String::from_utf8_lossy(v)
                    .trim_start_matches("Bearer ")
                    .to_string()
            })
            .or_else(|| {
                head.get("x-api-key")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default();
        let mut call = Call {
            method: head.first[0].clone(),
            path: head.first.get(1).cloned().unwrap_or_default(),
            authorised: false,
            token,
            body,
        };
        let hook = {
            let mut s = st.lock();
            call.authorised = s.valid.contains(&call.token);
            s.calls.push(call.clone());
            s.hook.clone()
        };
        let (code, ctype, out) = if call.authorised {
            if let Some(h) = hook {
                h(&call);
            }
            let (ctype, out) = respond(&call.method, &call.path, &call.body);
            ("200 OK", ctype, out)
        } else {
            let out = r#"{"error":{"message":"invalid or revoked token","type":"authentication_error","code":"invalid_api_key"}}"#;
            ("401 Unauthorized", "application/json", out.to_string())
        };
        let ok = write!(
            w,
            "HTTP/1.1 {code}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n{out}",
            out.len()
        )
        .and_then(|_| w.flush());
        if ok.is_err() {
            return;
        }
    }
}

/// Every file under `dir` (through the mount) and in its backing store.
fn files_text(dir: &std::path::Path, backing: &Backing) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = backing
        .all_files()
        .into_iter()
        .map(|(p, b)| {
            (
                format!("(disk) {}", p.display()),
                String::from_utf8_lossy(&b).into_owned(),
            )
        })
        .collect();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push((
                    p.display().to_string(),
                    String::from_utf8_lossy(&fs::read(&p).unwrap_or_default()).into_owned(),
                )),
                _ => {}
            }
        }
    }
    out
}

/// No file of the agent, served or on disk, holds any upstream token.
fn assert_no_upstream_token(dirs: &[(&std::path::Path, &Backing)], api: &Guarded) {
    let issued = api.issued();
    for (dir, backing) in dirs {
        for (path, text) in files_text(dir, backing) {
            for t in &issued {
                assert!(!text.contains(t.as_str()), "{path} holds an upstream token");
            }
        }
    }
}

/// A tokenfs config: a push credential `up`, a proxy `up` on it in front
/// of `upstream`, and `preset` through that proxy.
fn via_proxy_config(s: &Scratch, preset: &str, upstream: &str) -> String {
    format!(
        "[control]\nsocket = \"{}\"\n[credentials.up]\nsource = \"push\"\n[[proxy]]\nname = \"up\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\ncredential = \"up\"\n[[mount]]\npreset = \"{preset}\"\ncredential = \"up\"\nvia_proxy = \"up\"\n",
        s.socket().display()
    )
}

fn preset_env(home: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", home.display().to_string()),
        ("CLAUDE_CONFIG_DIR", String::new()),
        ("HERMES_HOME", String::new()),
        ("CODEX_HOME", String::new()),
        ("XDG_DATA_HOME", String::new()),
        ("XDG_CONFIG_HOME", String::new()),
    ]
}

fn start_via_proxy(s: &Scratch, preset: &str, upstream: &str, dirs: &[&std::path::Path]) -> Daemon {
    let env = preset_env(&s.path("home"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Daemon::start_env(s, &via_proxy_config(s, preset, upstream), dirs, &env)
}

/// The proxy's counters from `status`.
fn proxy_status(d: &Daemon) -> serde_json::Value {
    d.status()["proxies"][0].clone()
}

/// Model calls a Codex run makes: this many tool calls, then an answer.
const CODEX_TOOL_CALLS: usize = 3;

/// The Responses API of a model that calls a tool (`update_plan`) until
/// the input holds `CODEX_TOOL_CALLS` results, then answers.
fn responses_with_tool_calls(method: &str, path: &str, body: &[u8]) -> (&'static str, String) {
    if method != "POST" || !path.trim_end_matches('/').ends_with("/responses") {
        return openai(method, path, body);
    }
    let done = String::from_utf8_lossy(body)
        .matches("\"function_call_output\"")
        .count();
    if done >= CODEX_TOOL_CALLS {
        return openai_responses(method, path, body);
    }
    let args =
        serde_json::json!({"plan": [{"step": format!("step {done}"), "status": "completed"}]});
    let item = serde_json::json!({"type": "function_call", "id": format!("fc_{done}"),
        "call_id": format!("call_{done}"), "name": "update_plan",
        "arguments": args.to_string(), "status": "completed"});
    let response = serde_json::json!({"id": format!("resp_t{done}"), "object": "response",
        "created_at": 1, "status": "completed", "model": "test-model", "output": [item],
        "usage": {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 4}});
    let mut started = response.clone();
    started["status"] = "in_progress".into();
    started["output"] = serde_json::json!([]);
    let ev = |e: &str, d: serde_json::Value| format!("event: {e}\ndata: {d}\n\n");
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

/// A home whose Codex uses a provider on `api` with an API key
/// (`requires_openai_auth`: auth.json's `OPENAI_API_KEY`, a fresh token).
fn codex_api_key_home(s: &Scratch, api: &Guarded) -> std::path::PathBuf {
    let first = api.mint();
    s.write(
        "home/.codex/config.toml",
        &format!("model = \"test-model\"\nmodel_provider = \"fake\"\ncheck_for_update_on_startup = false\n\n[model_providers.fake]\nname = \"Fake\"\nbase_url = \"{}/v1\"\nwire_api = \"responses\"\nrequires_openai_auth = true\n", api.url),
    );
    s.write(
        "home/.codex/auth.json",
        &format!("{{\n  \"OPENAI_API_KEY\": \"{first}\"\n}}\n"),
    );
    s.path("home/.codex")
}

/// One `codex exec "say hi"` with `HOME` in the scratch area.
fn codex_exec(codex: &std::path::Path, s: &Scratch) -> std::process::Output {
    let work = s.path("work");
    fs::create_dir_all(&work).unwrap();
    Command::new(codex)
        .args(["exec", "--skip-git-repo-check", "say hi"])
        .current_dir(&work)
        .env("HOME", s.path("home"))
        .env_remove("CODEX_HOME")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("codex")
}

/// Codex CLI reads its key once per process (measured: 0.171 keeps the
/// key of its start; after a revoke-at-once rotation in the middle of an
/// `exec` its next model call is refused, 6 tries, exit 1). Through a
/// `via_proxy` preset one `codex exec` whose model calls a tool three
/// times, with a rotation before each answer, is authorised throughout,
/// and no file of Codex holds the upstream token.
#[test]
fn codex_exec_through_via_proxy_survives_rotations_between_its_model_calls() {
    let _one_at_a_time = real_clients_lock();
    let codex = client("node_modules/.bin/codex", "Codex CLI");
    let api = Guarded::start(responses_with_tool_calls);
    let s = Scratch::new();
    let dir = codex_api_key_home(&s, &api);
    let backing = Backing::open(&dir);
    let d = start_via_proxy(&s, "codex", &api.url, &[&dir]);
    let served = fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        served.contains("base_url = \"http://127.0.0.1:") && !served.contains(&api.url),
        "{served}"
    );
    let auth = fs::read_to_string(dir.join("auth.json")).unwrap();
    assert!(auth.contains("\"tkfs-"), "{auth}");
    let (socket, a) = (d.socket.clone(), api.clone());
    api.set_hook(Arc::new(move |c: &Call| {
        let body = String::from_utf8_lossy(&c.body);
        if c.path.ends_with("/responses")
            && body.matches("\"function_call_output\"").count() < CODEX_TOOL_CALLS
        {
            a.rotate(&socket, "up");
        }
    }));
    let out = codex_exec(&codex, &s);
    let calls = api.calls();
    let model_calls = calls
        .iter()
        .filter(|c| c.path.ends_with("/responses"))
        .count();
    let refused = calls.iter().filter(|c| !c.authorised).count();
    let tokens: std::collections::HashSet<&str> = calls.iter().map(|c| c.token.as_str()).collect();
    eprintln!(
        "codex via_proxy: exit {:?}; upstream requests {}, model calls {model_calls}, refused {refused}, rotations {}, distinct tokens {}; proxy {}",
        out.status.code(),
        calls.len(),
        api.issued().len() - 1,
        tokens.len(),
        proxy_status(&d)
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hi from the fake"),
        "codex failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert_eq!(refused, 0, "{calls:?}");
    assert_eq!(model_calls, CODEX_TOOL_CALLS + 1);
    assert_eq!(api.issued().len(), CODEX_TOOL_CALLS + 1);
    assert_eq!(
        tokens.len(),
        CODEX_TOOL_CALLS + 1,
        "each call sent the token current then"
    );
    assert_no_upstream_token(&[(&dir, &backing)], &api);
}

/// A chat-completions model that calls OpenCode's `todowrite` tool first
/// (when tools are offered and no tool result is in the messages yet),
/// then answers; streamed when asked.
fn chat_tool_first(method: &str, path: &str, body: &[u8]) -> (&'static str, String) {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let offered = req["tools"].as_array().is_some_and(|t| !t.is_empty());
    let answered = req["messages"]
        .as_array()
        .is_some_and(|m| m.iter().any(|m| m["role"] == "tool"));
    if method != "POST" || !offered || answered || req["stream"] != true {
        return openai(method, path, body);
    }
    let args = serde_json::json!({"todos": [{"content": "say hi", "status": "completed", "priority": "low", "id": "1"}]});
    let delta = serde_json::json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1",
        "type": "function", "function": {"name": "todowrite", "arguments": args.to_string()}}]});
    let chunk = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": null}]});
    let last = serde_json::json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "test-model",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    (
        "text/event-stream",
        format!("data: {chunk}\n\ndata: {last}\n\ndata: [DONE]\n\n"),
    )
}

/// OpenCode reads its key once per process (measured: 1.18.33, one `run`
/// whose model calls a tool; a revoke-at-once rotation before the second
/// model call fails it with the 401's message, exit 1, no retry). Through a
/// `via_proxy` preset: three `opencode run`s, each with a rotation between
/// its tool call and its answer, and another between runs — every
/// request authorised, no upstream token in OpenCode's files (its
/// `opencode.json` and the `auth.json` that `opencode auth login` fills,
/// both mounted; OpenCode keeps its database beside auth.json, through
/// the mount).
#[test]
fn opencode_runs_through_via_proxy_survive_rotations() {
    let _one_at_a_time = real_clients_lock();
    let opencode = client("node_modules/.bin/opencode", "OpenCode");
    let api = Guarded::start(chat_tool_first);
    let s = Scratch::new();
    let (dir, data) = opencode_home(&s, &api);
    let backing = Backing::open(&dir);
    let data_backing = Backing::open(&data);
    let d = start_via_proxy(&s, "opencode", &api.url, &[&dir, &data]);
    let served = fs::read_to_string(dir.join("opencode.json")).unwrap();
    assert!(
        served.contains("\"tkfs-") && !served.contains(&api.url),
        "{served}"
    );
    let auth = fs::read_to_string(data.join("auth.json")).unwrap();
    assert!(auth.contains("\"tkfs-"), "{auth}");
    let (socket, a) = (d.socket.clone(), api.clone());
    api.set_hook(Arc::new(move |c: &Call| {
        if is_tool_call(c) {
            a.rotate(&socket, "up");
        }
    }));
    let runs = 3;
    for i in 0..runs {
        let out = opencode_run(&opencode, &s);
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("hi from the fake"),
            "opencode run {i} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
        api.rotate(&d.socket, "up");
    }
    let calls = api.calls();
    let refused = calls.iter().filter(|c| !c.authorised).count();
    let tools = calls.iter().filter(|c| is_tool_call(c)).count();
    eprintln!(
        "opencode via_proxy: {runs} runs; upstream requests {}, tool calls {tools}, refused {refused}, rotations {}; proxy {}",
        calls.len(),
        api.issued().len() - 1,
        proxy_status(&d)
    );
    assert_eq!(refused, 0, "{calls:?}");
    assert_eq!(tools, runs);
    assert_eq!(api.issued().len(), 2 * runs + 1);
    assert_no_upstream_token(&[(&dir, &backing), (&data, &data_backing)], &api);
}

/// Whether the fake answered this call with a tool call.
fn is_tool_call(c: &Call) -> bool {
    chat_tool_first("POST", &c.path, &c.body)
        .1
        .contains("\"tool_calls\"")
}

/// OpenCode's config with a provider on `api` and a literal key (a fresh
/// token), and the same key in auth.json as `opencode auth login` keeps it.
fn opencode_home(s: &Scratch, api: &Guarded) -> (std::path::PathBuf, std::path::PathBuf) {
    let first = api.mint();
    let config = serde_json::json!({"$schema": "https://opencode.ai/config.json", "model": "fake/test-model",
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
            "options": {"baseURL": format!("{}/v1", api.url), "apiKey": first},
            "models": {"test-model": {"name": "Test"}}}}});
    s.write(
        "home/.config/opencode/opencode.json",
        &serde_json::to_string_pretty(&config).unwrap(),
    );
    s.write(
        "home/.local/share/opencode/auth.json",
        &serde_json::json!({"fake": {"type": "api", "key": first}}).to_string(),
    );
    (
        s.path("home/.config/opencode"),
        s.path("home/.local/share/opencode"),
    )
}

/// One `opencode run "say hi"` with `HOME` in the scratch area.
fn opencode_run(opencode: &std::path::Path, s: &Scratch) -> std::process::Output {
    let work = s.path("work");
    fs::create_dir_all(&work).unwrap();
    Command::new(opencode)
        .args(["run", "say hi"])
        .current_dir(&work)
        .env("HOME", s.path("home"))
        // No plugin install from npm, no models.dev, no update check.
        .env("OPENCODE_PURE", "1")
        .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .env("OPENCODE_DISABLE_SHARE", "1")
        .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .env_remove("OPENCODE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("opencode")
}

/// Waits until `f` holds, for at most `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `hermes chat` process, `turns` lines typed on its stdin: each waits
/// until `seen()` counts the turn's model call, lets the turn finish, then
/// calls `between()` (not after the last); then `/exit`.
fn hermes_chat_turns(
    hermes: &std::path::Path,
    s: &Scratch,
    turns: usize,
    seen: &dyn Fn() -> usize,
    between: &dyn Fn(),
) {
    let work = s.path("work");
    fs::create_dir_all(&work).unwrap();
    let mut chat = Command::new(hermes)
        .args(["chat", "-Q"])
        .current_dir(&work)
        .env("HOME", s.path("home"))
        .env_remove("HERMES_HOME")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .stdin(Stdio::piped())
        .stdout(fs::File::create(s.path("hermes.out")).unwrap())
        .stderr(fs::File::create(s.path("hermes.err")).unwrap())
        .spawn()
        .expect("hermes");
    let mut stdin = chat.stdin.take().unwrap();
    for i in 0..turns {
        writeln!(stdin, "say hi, turn {i}").unwrap();
        stdin.flush().unwrap();
        wait_for(Duration::from_secs(90), "a Hermes turn", || seen() > i);
        // Let the turn finish before the next line (one typed while it is
        // busy interrupts it).
        std::thread::sleep(Duration::from_secs(2));
        if i + 1 < turns {
            between();
        }
    }
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(30);
    while chat.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = chat.kill();
    let _ = chat.wait();
}

/// A chat-completions call asking for a stream: one per Hermes turn.
fn streamed_chat(c: &Call) -> bool {
    let body: serde_json::Value = serde_json::from_slice(&c.body).unwrap_or_default();
    c.path.ends_with("/chat/completions") && body["stream"] == true
}

/// A long-running `hermes chat` (one process, several turns typed on its
/// stdin, a revoke-at-once rotation between turns) through a `via_proxy`
/// preset: every turn's model call is authorised, and no file of Hermes
/// holds the upstream token. (Hermes probes a loopback base URL for local
/// servers without a key: the proxy refuses those, the upstream never
/// sees them.) Measured without tokenfs: Hermes 0.19 does notice a
/// changed config.yaml between turns (the next turn sent the new key, but
/// without the earlier messages), so the issue's "keeps the key of its
/// first turn" holds only until the file changes.
#[test]
fn hermes_chat_through_via_proxy_survives_a_rotation_between_turns() {
    let _one_at_a_time = real_clients_lock();
    let hermes = client("hermes-venv/bin/hermes", "Hermes Agent");
    let api = Guarded::start(openai);
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let first = api.mint();
    s.write(
        "home/.hermes/config.yaml",
        &format!("# Hermes\nmodel:\n  provider: custom\n  base_url: {}/v1\n  api_key: {first}\n  default: test-model\n", api.url),
    );
    let backing = Backing::open(&dir);
    let d = start_via_proxy(&s, "hermes", &api.url, &[&dir]);
    let served = fs::read_to_string(dir.join("config.yaml")).unwrap();
    assert!(
        served.contains("api_key: tkfs-") && !served.contains(&api.url),
        "{served}"
    );
    let turns = 4;
    let turns_seen = || api.calls().iter().filter(|c| streamed_chat(c)).count();
    hermes_chat_turns(&hermes, &s, turns, &turns_seen, &|| {
        api.rotate(&d.socket, "up");
    });
    let calls = api.calls();
    let refused: Vec<&Call> = calls.iter().filter(|c| !c.authorised).collect();
    let model_calls = calls
        .iter()
        .filter(|c| c.path.ends_with("/chat/completions"))
        .count();
    let issued = api.issued();
    eprintln!(
        "hermes via_proxy: {turns} turns in one process; upstream requests {}, model calls {}, refused {}, rotations {}; proxy {}",
        calls.len(),
        model_calls,
        refused.len(),
        issued.len() - 1,
        proxy_status(&d)
    );
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(turns_seen(), turns);
    // Each turn's call carried the token current at that turn.
    let per_turn: Vec<&str> = calls
        .iter()
        .filter(|c| streamed_chat(c))
        .map(|c| c.token.as_str())
        .collect();
    assert_eq!(
        per_turn,
        issued.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let out = fs::read_to_string(s.path("hermes.out")).unwrap_or_default();
    assert!(out.contains("hi from the fake"), "{out}");
    assert_no_upstream_token(&[(&dir, &backing)], &api);
}
