//! The OAuth source against a fake provider, through real mounts: one
//! session shared by a Claude-style and a Hermes-style file, single-use
//! rotating refresh tokens, early refresh, adoption only after validation,
//! transient failures versus relogin, single-flight, and restarts.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fake_oauth::{Fake, Fault, Reuse};
use common::*;
use tokenfs::control::{self, Request};

const CLAUDE: &str = r#"{
  "claudeAiOauth": {
    "accessToken": "none",
    "refreshToken": "none",
    "expiresAt": 0,
    "scopes": ["user:inference", "user:profile"],
    "subscriptionType": "max"
  }
}
"#;

const HERMES: &str = r#"{
  "version": 1,
  "active_provider": "openai-codex",
  "providers": {
    "openai-codex": {
      "tokens": {"access_token": "none", "refresh_token": "none"},
      "auth_mode": "chatgpt"
    }
  }
}
"#;

struct Rig {
    s: Scratch,
    fake: Fake,
    d: Option<Daemon>,
    claude: PathBuf,
    hermes: PathBuf,
    cfg: String,
    dirs: Vec<PathBuf>,
}

/// Two mounts (`home/.claude`, `home/.hermes`) whose files are bound to
/// credential `sess`; `extra` adds config keys to the credential.
fn rig(lifetime: Duration, extra: &str) -> Rig {
    rig_with(Fake::start(lifetime), extra, CLAUDE)
}

/// `rig` with this fake and this `.credentials.json`.
fn rig_with(fake: Fake, extra: &str, claude: &str) -> Rig {
    let s = Scratch::new();
    s.write("home/.claude/.credentials.json", claude);
    s.write("home/.hermes/auth.json", HERMES);
    let (a, b) = (s.path("home/.claude"), s.path("home/.hermes"));
    let cfg = format!(
        r#"[control]
socket = "{sock}"

[credentials.sess]
source = "oauth"
provider = "anthropic"
token_url = "{url}"
probe_url = "{url_base}/api"
timeout = "2s"
min_refresh_interval = "1s"
{extra}

[[mount]]
dir = "{a}"
[[mount.file]]
path = ".credentials.json"
format = "json"
bind = {{ "claudeAiOauth.accessToken" = "sess.access_token", "claudeAiOauth.refreshToken" = "sess.refresh_token" }}

[[mount]]
dir = "{b}"
[[mount.file]]
path = "auth.json"
format = "json"
bind = {{ "providers.openai-codex.tokens.access_token" = "sess.access_token", "providers.openai-codex.tokens.refresh_token" = "sess.refresh_token" }}
"#,
        sock = s.socket().display(),
        url = fake.token_url(),
        url_base = fake.url,
        a = a.display(),
        b = b.display(),
    );
    let d = Daemon::start(&s, &cfg, &[&a, &b]);
    Rig {
        claude: a.join(".credentials.json"),
        hermes: b.join("auth.json"),
        fake,
        d: Some(d),
        cfg,
        dirs: vec![a, b],
        s,
    }
}

impl Rig {
    fn d(&self) -> &Daemon {
        self.d.as_ref().expect("daemon")
    }

    /// A login's session written as Claude's file outside the mounts, then
    /// `tokenfs import sess --from claude FILE`.
    fn import_login(&self) -> (String, String) {
        let (at, rt) = self.fake.login();
        let file = self.s.write(
            "login/.credentials.json",
            &serde_json::json!({"claudeAiOauth": {"accessToken": at, "refreshToken": rt, "expiresAt": 0}})
                .to_string(),
        );
        let out = Command::new(BIN)
            .args(["import", "sess", "--from", "claude"])
            .arg(&file)
            .arg("--socket")
            .arg(self.s.socket())
            .output()
            .expect("run tokenfs import");
        assert!(
            out.status.success(),
            "import failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.d().log_text()
        );
        (at, rt)
    }

    fn oauth(&self) -> serde_json::Value {
        self.d().status()["credentials"][0]["oauth"].clone()
    }

    fn state(&self) -> String {
        self.d().status()["credentials"][0]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn refreshes(&self) -> u64 {
        self.oauth()["refresh_count"].as_u64().unwrap_or(0)
    }

    fn restart(&mut self) {
        if let Some(d) = self.d.take() {
            let (status, _) = d.stop();
            assert!(status.success());
        }
        let refs: Vec<&Path> = self.dirs.iter().map(PathBuf::as_path).collect();
        self.d = Some(Daemon::start(&self.s, &self.cfg, &refs));
    }
}

/// The tests that run real CLIs (node, Python) take turns: run together
/// they load two shared cores enough to stretch the CLIs' own timing (Claude
/// Code's two refresh attempts spread past `min_refresh_interval`).
fn real_clients_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).expect("read");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

fn claude_tokens(path: &Path) -> (String, String) {
    let v = json(path);
    let o = &v["claudeAiOauth"];
    (
        o["accessToken"].as_str().unwrap_or("").to_string(),
        o["refreshToken"].as_str().unwrap_or("").to_string(),
    )
}

fn hermes_tokens(path: &Path) -> (String, String) {
    let v = json(path);
    let o = &v["providers"]["openai-codex"]["tokens"];
    (
        o["access_token"].as_str().unwrap_or("").to_string(),
        o["refresh_token"].as_str().unwrap_or("").to_string(),
    )
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "not reached within {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `text` over `path` the way the CLIs save: temp file + rename.
fn save_like_a_cli(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp.cli");
    fs::write(&tmp, text).expect("write temp");
    fs::rename(&tmp, path).expect("rename over");
}

/// Reads in a loop. Returns (reads, reads whose access token was not valid
/// at any moment of the read, reads whose refresh token was not usable: with
/// `real`, already spent; with a decoy, anything but a decoy).
fn reader(
    fake: Fake,
    path: PathBuf,
    read: fn(&Path) -> (String, String),
    real: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, usize)> {
    std::thread::spawn(move || {
        let (mut reads, mut bad, mut stale) = (0, 0, 0);
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let (at, rt) = read(&path);
            let end = Instant::now();
            reads += 1;
            if !fake.access_valid_during(&at, started, end) {
                bad += 1;
                eprintln!("{}: an access token that was not valid", path.display());
            }
            let ok_refresh = if real {
                fake.refresh_live_during(&rt, started, end)
            } else {
                rt.starts_with("tokenfs-decoy-") && !fake.is_issued_refresh(&rt)
            };
            if !ok_refresh {
                stale += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (reads, bad, stale)
    })
}

fn two_consumers_across_refreshes(consumer_refresh_token: &str) {
    // Refreshes every 2 s with 2 s to spare: a loaded CI machine (the
    // real-CLI tests run beside this one) must not make a slow fsync look
    // like a stale read.
    let r = rig(
        Duration::from_secs(4),
        &format!("refresh_before = \"2s\"\nconsumer_refresh_token = \"{consumer_refresh_token}\""),
    );
    r.import_login();
    let real = consumer_refresh_token == "real";
    let stop = Arc::new(AtomicBool::new(false));
    let readers = [
        reader(
            r.fake.clone(),
            r.claude.clone(),
            claude_tokens,
            real,
            stop.clone(),
        ),
        reader(
            r.fake.clone(),
            r.hermes.clone(),
            hermes_tokens,
            real,
            stop.clone(),
        ),
    ];
    let start = r.fake.calls();
    wait_until(Duration::from_secs(120), "20 refreshes", || {
        r.fake.calls() >= start + 20
    });
    stop.store(true, Ordering::SeqCst);
    let (mut total, mut stale_total) = (0, 0);
    for rd in readers {
        let (reads, bad, stale) = rd.join().expect("reader");
        assert_eq!(bad, 0, "a read served an access token that was not valid");
        assert!(reads > 100, "only {reads} reads");
        if !real {
            assert_eq!(stale, 0, "a read showed something else than a decoy");
        }
        total += reads;
        stale_total += stale;
    }
    let refreshes = r.refreshes();
    // With real refresh tokens, a read between the server's rotation and
    // tokenfs's publish shows a refresh token already spent: measured here.
    eprintln!(
        "{consumer_refresh_token}: {total} reads, {stale_total} with a spent refresh token, {refreshes} refreshes, {} token calls, reuses {}",
        r.fake.calls(),
        r.fake.reuses()
    );
    assert!(refreshes >= 21, "{refreshes} refreshes");
    assert_eq!(r.fake.reuses(), 0, "the server saw a reused refresh token");
    assert_eq!(
        r.fake.unknown(),
        0,
        "a decoy or unknown token reached the server"
    );
    assert_eq!(r.state(), "ok");
    // The other keys of the consumers' files are kept.
    assert_eq!(json(&r.claude)["claudeAiOauth"]["subscriptionType"], "max");
    assert_eq!(json(&r.hermes)["active_provider"], "openai-codex");
    // The state file is private and holds the newest refresh token.
    let state = r.s.path("state/sess.oauth.json");
    assert_eq!(
        fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&state).unwrap()).unwrap();
    let saved_rt = saved["refresh_token"].as_str().unwrap_or("");
    assert!(
        r.fake
            .refresh_live_during(saved_rt, Instant::now(), Instant::now())
    );
    // Nothing secret in the log.
    let log = r.d().log_text();
    assert!(!log.contains(saved_rt), "a refresh token is in the log");
}

#[test]
fn two_consumers_read_only_valid_sessions_across_20_refreshes_real() {
    two_consumers_across_refreshes("real");
}

#[test]
fn two_consumers_read_only_valid_sessions_across_20_refreshes_decoy() {
    two_consumers_across_refreshes("decoy");
}

#[test]
fn a_consumers_own_refresh_is_adopted_and_a_blanked_or_garbage_one_is_not() {
    let r = rig(
        Duration::from_secs(600),
        "consumer_refresh_token = \"real\"",
    );
    r.import_login();
    wait_until(Duration::from_secs(5), "the session is served", || {
        r.fake.access_valid(&claude_tokens(&r.claude).0)
    });
    // Claude refreshes on its own (say after an API 401) and saves.
    let (_, rt) = claude_tokens(&r.claude);
    let (at2, rt2) = r.fake.consumer_refresh(&rt).expect("consumer refresh");
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["accessToken"] = at2.clone().into();
    v["claudeAiOauth"]["refreshToken"] = rt2.clone().into();
    let before = r.refreshes();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    // tokenfs validates it by refreshing with it and serves the newer session.
    wait_until(Duration::from_secs(5), "adoption", || {
        r.refreshes() > before
    });
    let (at3, rt3) = claude_tokens(&r.claude);
    assert!(r.fake.access_valid(&at3));
    assert!(
        r.fake
            .refresh_live_during(&rt3, Instant::now(), Instant::now())
    );
    assert_ne!(rt3, rt2, "tokenfs now holds the newest session");
    assert_eq!(
        hermes_tokens(&r.hermes),
        (at3.clone(), rt3.clone()),
        "every view at once"
    );
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.state(), "ok");
    assert_eq!(json(&r.claude)["claudeAiOauth"]["subscriptionType"], "max");

    // Claude's wipe after a failed refresh: blanked, not adopted.
    let calls = r.fake.calls();
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["accessToken"] = "".into();
    v["claudeAiOauth"]["refreshToken"] = "".into();
    v["claudeAiOauth"]["expiresAt"] = 0.into();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let (at4, _) = claude_tokens(&r.claude);
    assert!(
        r.fake.access_valid(&at4),
        "the good session is still served"
    );
    assert_eq!(r.state(), "ok");
    assert!(
        r.d().log_text().contains("empty or removed"),
        "the wipe is noticed"
    );
    // The blanked write is taken as the consumer's failed refresh: at most
    // one refresh for it (min_refresh_interval), never a reuse.
    assert!(r.fake.calls() <= calls + 1);

    // Garbage that looks like a token: refused by the server, not adopted,
    // and no relogin.
    std::thread::sleep(Duration::from_millis(1100));
    let (good_at, good_rt) = claude_tokens(&r.claude);
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["refreshToken"] = "garbage-garbage-garbage-garbage".into();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    wait_until(Duration::from_secs(5), "the garbage is refused", || {
        r.d().status()["credentials"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid_grant"))
    });
    assert_eq!(claude_tokens(&r.claude), (good_at, good_rt));
    assert_eq!(r.state(), "ok");
    assert_eq!(r.oauth()["relogin_required"], false);
    assert_eq!(r.fake.reuses(), 0);
}

#[test]
fn transient_failures_keep_the_session_and_never_mark_relogin() {
    let r = rig(Duration::from_secs(4), "refresh_before = \"2s\"");
    r.import_login();
    let (at, _) = claude_tokens(&r.claude);
    for fault in [
        Fault::Status(503),
        Fault::TooMany(1),
        Fault::Garbage,
        Fault::Down,
    ] {
        r.fake.set_fault(fault);
        let calls = r.fake.calls();
        let out = control::call(
            &r.d().socket,
            &Request::Rotate {
                name: "sess".into(),
            },
        );
        assert!(out.is_err(), "{fault:?}: rotate should fail");
        wait_until(Duration::from_secs(5), "an attempt", || {
            r.fake.calls() > calls
        });
        assert_eq!(r.state(), "degraded", "{fault:?}");
        assert_eq!(r.oauth()["relogin_required"], false, "{fault:?}");
        assert_eq!(
            claude_tokens(&r.claude).0,
            at,
            "{fault:?}: the current token stays"
        );
    }
    // 429's Retry-After is honoured: no call within it.
    r.fake.set_fault(Fault::TooMany(2));
    let _ = control::call(
        &r.d().socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    );
    let after = r.fake.calls();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(r.fake.calls(), after, "retried before Retry-After");
    r.fake.set_fault(Fault::None);
    // The backoff may by now be long; a requested refresh goes at once.
    control::call(
        &r.d().socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    )
    .expect("recovered");
    assert_eq!(r.state(), "ok");
    assert_ne!(claude_tokens(&r.claude).0, at);
    assert_eq!(r.fake.reuses(), 0);
    let log = r.d().log_text();
    assert!(
        log.contains("HTTP 503") && log.contains("HTTP 429"),
        "{log}"
    );
}

#[test]
fn invalid_grant_marks_relogin_and_an_import_clears_it() {
    let r = rig(Duration::from_secs(600), "");
    r.import_login();
    r.fake.revoke_all();
    let out = control::call(
        &r.d().socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    );
    let e = out.expect_err("refresh after revocation");
    assert!(e.contains("invalid_grant"), "{e}");
    assert_eq!(r.state(), "relogin_required");
    assert_eq!(r.oauth()["relogin_required"], true);
    assert!(r.d().log_text().contains("ERROR"), "an error! log");
    // No more attempts on a dead grant.
    let calls = r.fake.calls();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(r.fake.calls(), calls);
    r.import_login();
    assert_eq!(r.state(), "ok");
    assert_eq!(r.oauth()["relogin_required"], false);
    assert!(r.fake.access_valid(&claude_tokens(&r.claude).0));
}

#[test]
fn openai_style_refresh_token_reuse_marks_relogin() {
    let r = rig(Duration::from_secs(600), "");
    r.fake.state.lock().reuse = Reuse::Reused401;
    r.import_login();
    let (_, current) = claude_tokens(&r.claude);
    assert!(current.starts_with("tokenfs-decoy-"), "decoy by default");
    let secret = control::call(
        &r.d().socket,
        &Request::Token {
            name: "sess".into(),
            field: Some("refresh_token".into()),
        },
    )
    .unwrap();
    assert!(
        secret["secret"]
            .as_str()
            .unwrap_or("")
            .starts_with("tokenfs-decoy-")
    );
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(r.s.path("state/sess.oauth.json")).unwrap())
            .unwrap();
    let real = saved["refresh_token"].as_str().unwrap_or("").to_string();
    // Someone else spends tokenfs's current refresh token.
    r.fake.consumer_refresh(&real).expect("spent elsewhere");
    let e = control::call(
        &r.d().socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    )
    .expect_err("reuse");
    assert!(e.contains("refresh_token_reused"), "{e}");
    assert_eq!(r.state(), "relogin_required");
}

#[test]
fn concurrent_rotates_make_one_call_to_the_server() {
    let r = rig(Duration::from_secs(600), "");
    r.import_login();
    r.fake.set_fault(Fault::Slow(Duration::from_millis(400)));
    let calls = r.fake.calls();
    let socket = r.d().socket.clone();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                control::call(
                    &socket,
                    &Request::Rotate {
                        name: "sess".into(),
                    },
                )
                .map(|v| v["generation"].as_u64())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let gens: std::collections::BTreeSet<_> = results.iter().map(|r| r.clone().ok()).collect();
    assert_eq!(gens.len(), 1, "every caller got the same refresh: {gens:?}");
    assert_eq!(r.fake.calls(), calls + 1, "one call to the token endpoint");
    assert_eq!(r.fake.reuses(), 0);
}

#[test]
fn a_restart_resumes_without_a_refresh_and_never_reuses() {
    let mut r = rig(Duration::from_secs(600), "");
    r.import_login();
    let rotate = |r: &Rig| {
        control::call(
            &r.d().socket,
            &Request::Rotate {
                name: "sess".into(),
            },
        )
        .expect("rotate")
    };
    for _ in 0..3 {
        rotate(&r);
        let calls = r.fake.calls();
        r.restart();
        // Served at once from the state file, without a refresh.
        let (at, _) = claude_tokens(&r.claude);
        assert!(r.fake.access_valid(&at), "resumed session served");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(r.fake.calls(), calls, "a refresh at restart");
        assert_eq!(r.state(), "ok");
    }
    // SIGKILL between refreshes, then restart.
    rotate(&r);
    if let Some(mut d) = r.d.take() {
        d.signal(libc::SIGKILL);
        let _ = d.wait_exit(Duration::from_secs(5));
        for dir in &r.dirs {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(dir)
                .status();
        }
    }
    r.restart();
    rotate(&r);
    assert!(r.fake.access_valid(&claude_tokens(&r.claude).0));
    assert!(r.refreshes() >= 5);
    assert_eq!(r.fake.reuses(), 0, "a spent refresh token was sent again");
}

#[test]
fn decoy_consumers_cannot_spend_the_chain_and_their_wipe_triggers_a_refresh() {
    let r = rig(Duration::from_secs(600), "");
    r.import_login();
    let (at, decoy) = claude_tokens(&r.claude);
    assert!(decoy.starts_with("tokenfs-decoy-"));
    // The consumer's own refresh attempt fails harmlessly at the server.
    assert_eq!(r.fake.consumer_refresh(&decoy), Err(400));
    std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
    // ...and it blanks its file, as Claude Code does on invalid_grant.
    let before = r.refreshes();
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["accessToken"] = "".into();
    v["claudeAiOauth"]["refreshToken"] = "".into();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    wait_until(Duration::from_secs(5), "a refresh for the consumer", || {
        r.refreshes() > before
    });
    let (at2, decoy2) = claude_tokens(&r.claude);
    assert_ne!(at, at2);
    assert!(r.fake.access_valid(&at2));
    assert!(decoy2.starts_with("tokenfs-decoy-") && decoy2 != decoy);
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.state(), "ok");
}

#[test]
fn openai_expiry_comes_from_the_jwt_and_the_account_from_the_id_token() {
    let s = Scratch::new();
    let fake = Fake::start(Duration::from_secs(4));
    {
        let mut st = fake.state.lock();
        st.jwt = true;
        st.omit_expires_in = true;
    }
    s.write("home/.codex/auth.json", r#"{"auth_mode":"chatgpt","OPENAI_API_KEY":null,"tokens":{"id_token":"none","access_token":"none","refresh_token":"none","account_id":"none"},"last_refresh":"2026-01-01T00:00:00Z"}"#);
    let dir = s.path("home/.codex");
    let cfg = format!(
        r#"[control]
socket = "{sock}"
[credentials.codex]
source = "oauth"
provider = "openai"
token_url = "{url}"
refresh_before = "1s"
body = "form"
[[mount]]
dir = "{dir}"
[[mount.file]]
path = "auth.json"
bind = {{ "tokens.access_token" = "codex.access_token", "tokens.refresh_token" = "codex.refresh_token", "tokens.id_token" = "codex.id_token", "tokens.account_id" = "codex.account_id" }}
"#,
        sock = s.socket().display(),
        url = fake.token_url(),
        dir = dir.display()
    );
    let d = Daemon::start(&s, &cfg, &[&dir]);
    let (at, rt) = fake.login();
    let login = s.write(
        "login/auth.json",
        &serde_json::json!({"tokens": {"access_token": at, "refresh_token": rt, "id_token": "x.y.z", "account_id": "acct-old"}}).to_string(),
    );
    let out = Command::new(BIN)
        .args(["import", "codex", "--from", "codex"])
        .arg(&login)
        .arg("--socket")
        .arg(s.socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&dir.join("auth.json"));
    assert_eq!(v["tokens"]["account_id"], "acct-fake-0001");
    assert!(fake.access_valid(v["tokens"]["access_token"].as_str().unwrap()));
    // Expiry from the JWT: refreshed at half of 4 s.
    let st = d.status();
    let exp = st["credentials"][0]["expires_at"].as_f64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        exp > now + 1.0 && exp < now + 6.0,
        "expiry {exp} vs now {now}"
    );
    let calls = fake.calls();
    wait_until(
        Duration::from_secs(10),
        "refreshes by the JWT's exp",
        || fake.calls() >= calls + 3,
    );
    let st = fake.state.lock();
    assert_eq!(st.reuses, 0);
    assert!(
        st.content_types
            .iter()
            .all(|c| c.starts_with("application/x-www-form-urlencoded"))
    );
    assert!(
        st.client_ids
            .iter()
            .all(|c| c == "app_EMoamEEZ73f0CkXaXp7hrann")
    );
}

#[test]
fn client_credentials_fetch_and_renew_a_token() {
    let s = Scratch::new();
    let fake = Fake::start(Duration::from_secs(2));
    fake.state.lock().client = Some(("sp-client".into(), "sp-secret-value".into()));
    s.write(
        "home/.databrickscfg",
        "[DEFAULT]\nhost = https://w.example.com\ntoken = none\n",
    );
    let dir = s.path("home");
    let cfg = format!(
        r#"[control]
socket = "{sock}"
[credentials.sp]
source = "oauth"
grant = "client_credentials"
token_url = "{url}"
client_id = "sp-client"
client_secret_env = "SP_SECRET"
scope = "all-apis"
refresh_before = "1s"
[[mount]]
dir = "{dir}"
[[mount.file]]
path = ".databrickscfg"
format = "ini"
bind = {{ "DEFAULT.token" = "sp.access_token" }}
"#,
        sock = s.socket().display(),
        url = fake.token_url(),
        dir = dir.display()
    );
    let d = Daemon::start_env(&s, &cfg, &[&dir], &[("SP_SECRET", "sp-secret-value")]);
    let token = |p: &Path| {
        fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("token = ").map(String::from))
            .unwrap_or_default()
    };
    let path = dir.join(".databrickscfg");
    wait_until(Duration::from_secs(5), "a token", || {
        fake.access_valid(&token(&path))
    });
    let first = token(&path);
    wait_until(Duration::from_secs(5), "renewed", || {
        let t = token(&path);
        t != first && fake.access_valid(&t)
    });
    assert!(!d.log_text().contains("sp-secret-value"));
    assert_eq!(
        d.status()["credentials"][0]["oauth"]["grant"],
        "client_credentials"
    );
}

/// Case g: the API answers 401 to an access token far from expiry (revoked
/// server-side). Both consumers try to refresh on their own — with decoys,
/// harmlessly — and wipe their sessions (Claude blanks its file, Hermes
/// deletes its tokens). tokenfs refreshes once, and both are authorised
/// again without a human; the server sees no reuse.
#[test]
fn case_g_an_api_401_far_from_expiry_ends_with_every_consumer_authorised() {
    let r = rig(Duration::from_secs(600), "");
    r.import_login();
    std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
    let (at, claude_decoy) = claude_tokens(&r.claude);
    let (_, hermes_decoy) = hermes_tokens(&r.hermes);
    r.fake.revoke_access(&at);
    assert!(!r.fake.access_valid(&at), "the API refuses it now");
    let before = r.refreshes();
    let calls = r.fake.calls();
    // Each consumer's own refresh fails at the server (an unknown token).
    assert_eq!(r.fake.consumer_refresh(&claude_decoy), Err(400));
    assert_eq!(r.fake.consumer_refresh(&hermes_decoy), Err(400));
    // ...and each wipes its copy, at the same moment, several times over.
    let claude = r.claude.clone();
    let hermes = r.hermes.clone();
    let wipers = [
        std::thread::spawn(move || {
            for _ in 0..3 {
                let mut v = json(&claude);
                v["claudeAiOauth"]["accessToken"] = "".into();
                v["claudeAiOauth"]["refreshToken"] = "".into();
                v["claudeAiOauth"]["expiresAt"] = 0.into();
                save_like_a_cli(&claude, &serde_json::to_string_pretty(&v).unwrap());
            }
        }),
        std::thread::spawn(move || {
            for _ in 0..3 {
                let mut v = json(&hermes);
                v["providers"]["openai-codex"]["tokens"] = serde_json::json!({});
                save_like_a_cli(&hermes, &serde_json::to_string_pretty(&v).unwrap());
            }
        }),
    ];
    for w in wipers {
        w.join().unwrap();
    }
    let wiped = Instant::now();
    wait_until(Duration::from_secs(5), "everyone authorised again", || {
        r.fake.access_valid(&claude_tokens(&r.claude).0)
            && r.fake.access_valid(&hermes_tokens(&r.hermes).0)
    });
    let recovered = wiped.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let refreshes = r.refreshes() - before;
    eprintln!(
        "case g: authorised again {recovered:?} after the wipes; {refreshes} refresh(es) by tokenfs for 6 wipes, {} token calls from tokenfs, reuses {}",
        r.fake.calls() - calls,
        r.fake.reuses()
    );
    assert_eq!(
        refreshes, 1,
        "one refresh for every wipe (min_refresh_interval)"
    );
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.state(), "ok");
    assert_eq!(claude_tokens(&r.claude), hermes_tokens(&r.hermes));
}

/// The real Codex CLI (npm; `scripts/test.sh` installs it) in ChatGPT mode
/// reading `auth.json` through the mount, run repeatedly across tokenfs's
/// refreshes: authorised every time, never refreshing on its own. Then
/// case g, the API refusing its access token: Codex's own refresh with the
/// decoy fails harmlessly, but Codex does not write its file, so only
/// tokenfs's next refresh brings it back (measured and asserted as such).
/// Codex 0.171.0 refreshes at start when its access token expires within
/// about 5 minutes (`TOKENFS_TEST_CODEX_LIFETIME=280`: 4 attempts a run;
/// 330: none), so the lifetime here is 15 min and refreshes are rotations.
#[test]
fn codex_cli_across_refreshes_and_after_an_api_401() {
    let _one_at_a_time = real_clients_lock();
    let codex =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/node_modules/.bin/codex");
    assert!(
        codex.exists(),
        "Codex CLI is missing: scripts/test.sh installs it from npm"
    );
    // TOKENFS_TEST_CODEX_MODE=real measures the other design.
    let mode = std::env::var("TOKENFS_TEST_CODEX_MODE").unwrap_or_else(|_| "decoy".into());
    let s = Scratch::new();
    let life: u64 = std::env::var("TOKENFS_TEST_CODEX_LIFETIME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900);
    let fake = Fake::start(Duration::from_secs(life));
    fake.state.lock().jwt = true;
    let home = s.path("home");
    let dir = s.path("home/.codex");
    s.write(
        "home/.codex/config.toml",
        &format!(
            "model = \"test-model\"\nmodel_provider = \"fake\"\nchatgpt_base_url = \"{url}/backend-api/\"\n\n[model_providers.fake]\nname = \"fake\"\nbase_url = \"{url}/v1\"\nwire_api = \"responses\"\nrequires_openai_auth = true\n",
            url = fake.url
        ),
    );
    s.write(
        "home/.codex/auth.json",
        &format!(
            r#"{{"auth_mode":"chatgpt","OPENAI_API_KEY":null,"tokens":{{"id_token":"none","access_token":"none","refresh_token":"none","account_id":"none"}},"last_refresh":"{}"}}"#,
            std::env::var("TOKENFS_TEST_CODEX_LAST_REFRESH").unwrap_or_else(|_| "2026-12-01T00:00:00Z".into())
        ),
    );
    let cfg = format!(
        r#"[control]
socket = "{sock}"
[credentials.codex]
source = "oauth"
provider = "openai"
token_url = "{url}"
refresh_before = "{before}s"
consumer_refresh_token = "{mode}"
min_refresh_interval = "1s"
[[mount]]
dir = "{dir}"
[[mount.file]]
path = "auth.json"
bind = {{ "tokens.access_token" = "codex.access_token", "tokens.refresh_token" = "codex.refresh_token", "tokens.id_token" = "codex.id_token", "tokens.account_id" = "codex.account_id" }}
"#,
        sock = s.socket().display(),
        url = fake.token_url(),
        dir = dir.display(),
        before = life / 3,
        mode = mode,
    );
    let d = Daemon::start(&s, &cfg, &[&dir]);
    let (at, rt) = fake.login();
    let login = s.write(
        "login/auth.json",
        &serde_json::json!({"tokens": {"access_token": at, "refresh_token": rt}}).to_string(),
    );
    let out = Command::new(BIN)
        .args(["import", "codex", "--from", "codex"])
        .arg(&login)
        .arg("--socket")
        .arg(s.socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = || {
        let started = Instant::now();
        let out = Command::new(&codex)
            .args(["exec", "--skip-git-repo-check", "say hi"])
            .env("HOME", &home)
            .env("CODEX_HOME", &dir)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fake.token_url())
            .env_remove("OPENAI_API_KEY")
            .current_dir(&home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("codex");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && text.contains("hi from the fake"),
            text,
            started.elapsed(),
        )
    };
    let (mut ok_runs, runs) = (0, 8);
    for i in 0..runs {
        let (ok, text, took) = run();
        if !ok {
            eprintln!("codex run {i} failed after {took:?}:\n{text}");
        }
        ok_runs += ok as usize;
        control::call(
            &d.socket,
            &Request::Rotate {
                name: "codex".into(),
            },
        )
        .expect("rotate");
    }
    let tokenfs_refreshes = d.status()["credentials"][0]["oauth"]["refresh_count"]
        .as_u64()
        .unwrap_or(0);
    let (unauthorised, api) = {
        let st = fake.state.lock();
        (
            st.api_calls.iter().filter(|c| !c.1).count(),
            st.api_calls.len(),
        )
    };
    eprintln!(
        "codex: {ok_runs} of {runs} runs authorised across {tokenfs_refreshes} tokenfs refreshes; API calls {api}, refused {unauthorised}; decoys sent to the server {}; reuses {}",
        fake.unknown(),
        fake.reuses()
    );
    assert_eq!(ok_runs, runs);
    assert_eq!(unauthorised, 0);
    assert_eq!(fake.unknown(), 0, "Codex refreshed on its own");
    assert_eq!(fake.reuses(), 0);

    // Case g: the API refuses the current access token far from expiry.
    let current = json(&dir.join("auth.json"))["tokens"]["access_token"]
        .as_str()
        .unwrap_or("")
        .to_string();
    fake.revoke_access(&current);
    let before = fake.unknown();
    let (ok, text, took) = run();
    let tried = fake.unknown() - before;
    eprintln!(
        "codex after a revoked access token: ok {ok} in {took:?}; decoy refreshes tried {tried}\n{}",
        text.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    if mode == "real" {
        // Codex refreshed with the real token and saved by rename: adopted.
        std::thread::sleep(Duration::from_millis(500));
        let (ok2, _, _) = run();
        eprintln!(
            "real: first run ok {ok}, next ok {ok2}, tokenfs refreshes {}, reuses {}",
            d.status()["credentials"][0]["oauth"]["refresh_count"],
            fake.reuses()
        );
        assert_eq!(fake.reuses(), 0);
        return;
    }
    assert!(!ok && tried >= 1);
    let (ok2, _, _) = run();
    assert!(
        !ok2,
        "Codex does not write its file, so nothing tells tokenfs"
    );
    // tokenfs's next refresh (here: now) authorises it again.
    control::call(
        &d.socket,
        &Request::Rotate {
            name: "codex".into(),
        },
    )
    .expect("rotate");
    let (ok3, text3, _) = run();
    assert!(ok3, "{text3}");
    assert_eq!(fake.reuses(), 0);
}

/// The real Claude Code (npm) logged in with OAuth: `.credentials.json`
/// through the mount, the API on the loopback fake (`ANTHROPIC_BASE_URL`),
/// run repeatedly across tokenfs's refreshes. Its token endpoint has no
/// override, and it never needs one here: with `expiresAt` far ahead it
/// does not refresh on its own.
#[test]
fn claude_code_across_refreshes() {
    let _one_at_a_time = real_clients_lock();
    let claude =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/node_modules/.bin/claude");
    assert!(
        claude.exists(),
        "Claude Code is missing: scripts/test.sh installs it from npm"
    );
    let r = rig(Duration::from_secs(900), "");
    let expires_ms = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    r.s.write(
        "home/.claude/settings.json",
        &format!(
            "{{\"env\": {{\"ANTHROPIC_BASE_URL\": \"{}\"}}}}\n",
            r.fake.url
        ),
    );
    // expiresAt is the user's bytes here (rendering it is the presets' job).
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["expiresAt"] = (expires_ms as u64).into();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    r.import_login();
    let home = r.s.path("home");
    let run = || {
        let out = Command::new(&claude)
            .args(["-p", "say hi"])
            .env("HOME", &home)
            .env("DISABLE_TELEMETRY", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_AUTH_TOKEN")
            .env_remove("ANTHROPIC_BASE_URL")
            .env_remove("CLAUDE_CONFIG_DIR")
            .current_dir(&home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("claude");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && text.contains("hi from the fake"),
            text,
        )
    };
    let (mut ok_runs, runs) = (0, 6);
    for i in 0..runs {
        let (ok, text) = run();
        if !ok {
            eprintln!("claude run {i} failed:\n{text}");
        }
        ok_runs += ok as usize;
        control::call(
            &r.d().socket,
            &Request::Rotate {
                name: "sess".into(),
            },
        )
        .expect("rotate");
    }
    let (unauthorised, api) = {
        let st = r.fake.state.lock();
        (
            st.api_calls.iter().filter(|c| !c.1).count(),
            st.api_calls.len(),
        )
    };
    eprintln!(
        "claude: {ok_runs} of {runs} runs authorised across {} tokenfs refreshes; API calls {api}, refused {unauthorised}; reuses {}",
        r.refreshes(),
        r.fake.reuses()
    );
    assert_eq!(ok_runs, runs);
    assert_eq!(unauthorised, 0);
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.fake.unknown(), 0);
    // Claude's other keys survive its runs and tokenfs's refreshes.
    assert_eq!(json(&r.claude)["claudeAiOauth"]["subscriptionType"], "max");
}

/// TLS in front of the fake for a client whose token endpoint cannot be
/// overridden: a throw-away CA and a certificate for `host` (openssl), and
/// a forwarder on `ip:443` (Python's ssl module). Killed on drop.
struct TlsFront {
    child: std::process::Child,
    ca: PathBuf,
    hosts: PathBuf,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_front(s: &Scratch, host: &str, ip: &str, to: &str) -> TlsFront {
    tls_front_for(s, &[host], ip, to)
}

/// `tls_front` for several host names (one certificate, one address).
/// A TLS forwarder (Python's ssl module) on `ip:443` with `leaf.pem`, to
/// `host:port`; prints `ready` once listening.
const TLS_FORWARDER: &str = r#"
import socket, ssl, sys, threading
ip, target = sys.argv[1], sys.argv[2].split(':')
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain('leaf.pem', 'leaf.key')
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, 443)); srv.listen(16)
print('ready', flush=True)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except Exception: pass
    finally:
        for x in (a, b):
            try: x.shutdown(socket.SHUT_RDWR)
            except Exception: pass
def handle(c):
    try: t = ctx.wrap_socket(c, server_side=True)
    except Exception: return
    u = socket.create_connection((target[0], int(target[1])))
    threading.Thread(target=pipe, args=(t, u), daemon=True).start()
    pipe(u, t)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// A throw-away CA (`ca.pem`) and a leaf certificate for `hosts` in `dir`.
fn make_certs(dir: &Path, hosts: &[&str]) {
    let host = hosts[0];
    let san: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
    let san = san.join(",");
    let sh = |script: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            ok.status.success(),
            "{}",
            String::from_utf8_lossy(&ok.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=tokenfs-test-ca",
    );
    sh(&format!(
        "openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr -subj /CN={host} && \
         printf 'subjectAltName={san}' > ext && \
         openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile ext"
    ));
}

fn tls_front_for(s: &Scratch, hosts: &[&str], ip: &str, to: &str) -> TlsFront {
    let dir = s.path("tls");
    fs::create_dir_all(&dir).unwrap();
    make_certs(&dir, hosts);
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(TLS_FORWARDER)
        .arg(ip)
        .arg(to.trim_start_matches("http://"))
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let file = dir.join("hosts");
    fs::write(
        &file,
        format!("127.0.0.1 localhost\n{ip} {}\n", hosts.join(" ")),
    )
    .unwrap();
    TlsFront {
        child,
        ca: dir.join("ca.pem"),
        hosts: file,
    }
}

/// Case g with the real Claude Code and a decoy: the API refuses its access
/// token far from expiry; Claude refreshes on its own (at
/// platform.claude.com, mapped to the fake inside `unshare -m`) with the
/// decoy, is refused, wipes its session, and tokenfs takes the wipe as the
/// signal to refresh: the next run is authorised, the server saw no reuse.
#[test]
fn claude_code_case_g_with_a_decoy() {
    let _one_at_a_time = real_clients_lock();
    let claude =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients/node_modules/.bin/claude");
    assert!(
        claude.exists(),
        "Claude Code is missing: scripts/test.sh installs it from npm"
    );
    let r = rig(Duration::from_secs(900), "");
    let front = tls_front(&r.s, "platform.claude.com", "127.0.0.2", &r.fake.url);
    let expires_ms = (std::time::SystemTime::now() + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    r.s.write(
        "home/.claude/settings.json",
        &format!(
            "{{\"env\": {{\"ANTHROPIC_BASE_URL\": \"{}\"}}}}\n",
            r.fake.url
        ),
    );
    let mut v = json(&r.claude);
    v["claudeAiOauth"]["expiresAt"] = (expires_ms as u64).into();
    save_like_a_cli(&r.claude, &serde_json::to_string_pretty(&v).unwrap());
    r.import_login();
    std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
    let home = r.s.path("home");
    let run = || {
        let out = Command::new("unshare")
            .arg("-m")
            .arg("sh")
            .arg("-c")
            .arg("mount --bind \"$1\" /etc/hosts && shift && exec \"$@\"")
            .arg("sh")
            .arg(&front.hosts)
            .arg(&claude)
            .args(["-p", "say hi"])
            .env("HOME", &home)
            .env("NODE_EXTRA_CA_CERTS", &front.ca)
            .env("DISABLE_TELEMETRY", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_AUTH_TOKEN")
            .env_remove("ANTHROPIC_BASE_URL")
            .env_remove("CLAUDE_CONFIG_DIR")
            .current_dir(&home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("claude");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && text.contains("hi from the fake"),
            text,
        )
    };
    let (ok, text) = run();
    assert!(ok, "{text}");
    let (at, _) = claude_tokens(&r.claude);
    r.fake.revoke_access(&at);
    let before = r.refreshes();
    let unknown = r.fake.unknown();
    let (ok1, text1) = run();
    let wiped = r.d().log_text().contains("empty or removed");
    eprintln!(
        "claude after a revoked access token: ok {ok1}; its refreshes with the decoy {}; wipe seen {wiped}; tokenfs refreshes {}\n{}",
        r.fake.unknown() - unknown,
        r.refreshes() - before,
        text1.lines().rev().take(4).collect::<Vec<_>>().join("\n")
    );
    assert!(
        wiped,
        "Claude Code wiped its session after its refresh failed"
    );
    wait_until(Duration::from_secs(5), "tokenfs refreshed", || {
        r.refreshes() > before
    });
    let (ok2, text2) = run();
    assert!(r.refreshes() - before <= 2, "bounded refreshes");
    assert!(ok2, "the next run: {text2}");
    assert_eq!(r.fake.reuses(), 0);
    assert!(r.fake.access_valid(&claude_tokens(&r.claude).0));
    assert_eq!(json(&r.claude)["claudeAiOauth"]["subscriptionType"], "max");
}

/// A daemon that died while a refresh token was being sent (the state
/// file still marks it in flight) does not send it again after a restart:
/// the server may have spent it. It serves the access token and asks for a
/// new login, which an import gives.
#[test]
fn a_refresh_token_in_flight_at_a_crash_is_never_resent() {
    use sha2::Digest;
    let mut r = rig(Duration::from_secs(600), "");
    r.import_login();
    let (at, _) = claude_tokens(&r.claude);
    if let Some(d) = r.d.take() {
        let (status, _) = d.stop();
        assert!(status.success());
    }
    let path = r.s.path("state/sess.oauth.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let rt = state["refresh_token"].as_str().unwrap().to_string();
    let hash: String = sha2::Sha256::digest(rt.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    state["in_flight"] = hash.into();
    fs::write(&path, state.to_string()).unwrap();
    let calls = r.fake.calls();
    let refs: Vec<&Path> = r.dirs.iter().map(PathBuf::as_path).collect();
    r.d = Some(Daemon::start(&r.s, &r.cfg, &refs));
    assert_eq!(r.state(), "relogin_required");
    assert_eq!(
        claude_tokens(&r.claude).0,
        at,
        "the access token is still served"
    );
    let e = control::call(
        &r.d().socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    )
    .expect_err("no refresh with a token that may be spent");
    assert!(e.contains("login"), "{e}");
    assert_eq!(r.fake.calls(), calls, "the in-flight token was sent again");
    r.import_login();
    assert_eq!(r.state(), "ok");
    assert_eq!(r.fake.reuses(), 0);
}

/// Seeding: at the first mount, a session found in a managed file becomes
/// the empty credential's only after a refresh with its refresh token
/// succeeded; from then on tokenfs holds the newest session.
#[test]
fn a_session_found_in_a_file_at_mount_seeds_the_credential_after_validation() {
    let fake = Fake::start(Duration::from_secs(600));
    let (at, rt) = fake.login();
    let text = CLAUDE
        .replacen(
            "\"accessToken\": \"none\"",
            &format!("\"accessToken\": \"{at}\""),
            1,
        )
        .replacen(
            "\"refreshToken\": \"none\"",
            &format!("\"refreshToken\": \"{rt}\""),
            1,
        );
    let r = rig_with(fake, "", &text);
    wait_until(Duration::from_secs(5), "seeded", || r.refreshes() >= 1);
    let (at2, shown) = claude_tokens(&r.claude);
    assert_ne!(at2, at, "the validating refresh's session is served");
    assert!(r.fake.access_valid(&at2));
    assert!(shown.starts_with("tokenfs-decoy-"));
    assert_eq!(hermes_tokens(&r.hermes).0, at2);
    assert_eq!(r.state(), "ok");
    assert_eq!(r.fake.reuses(), 0);
}

/// The `claude` preset with `oauth = true` over an OAuth source serves
/// Claude's whole session: tokens, and `expiresAt` as the number (ms) of the
/// session tokenfs refreshes, so Claude's own 5-minute rule never fires
/// early; every other key (`scopes`, `subscriptionType`) stays as written.
#[test]
fn the_claude_preset_renders_expires_at_of_the_served_session() {
    let fake = Fake::start(Duration::from_secs(3600));
    let s = Scratch::new();
    let home = s.path("home");
    s.write("home/.claude/.credentials.json", CLAUDE);
    s.write("home/.claude/settings.json", "{}\n");
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.sess]\nsource = \"oauth\"\nprovider = \"anthropic\"\ntoken_url = \"{}\"\ntimeout = \"2s\"\nmin_refresh_interval = \"1s\"\n[[mount]]\npreset = \"claude\"\ncredential = \"sess\"\noauth = true\n",
        s.socket().display(),
        fake.token_url()
    );
    let home_s = home.display().to_string();
    let dir = home.join(".claude");
    let d = Daemon::start_env(
        &s,
        &cfg,
        &[&dir],
        &[("HOME", home_s.as_str()), ("CLAUDE_CONFIG_DIR", "")],
    );
    let (at, rt) = fake.login();
    let login = s.write(
        "login/.credentials.json",
        &serde_json::json!({"claudeAiOauth": {"accessToken": at, "refreshToken": rt, "expiresAt": 0}}).to_string(),
    );
    let out = Command::new(BIN)
        .args(["import", "sess", "--from", "claude"])
        .arg(&login)
        .arg("--socket")
        .arg(s.socket())
        .output()
        .expect("import");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let path = dir.join(".credentials.json");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let v = json(&path);
    let expires = v["claudeAiOauth"]["expiresAt"].as_u64().expect("a number");
    assert!(
        expires > now_ms + 3_000_000 && expires < now_ms + 3_700_000,
        "{v}"
    );
    assert_eq!(v["claudeAiOauth"]["subscriptionType"], "max");
    assert_eq!(v["claudeAiOauth"]["scopes"][1], "user:profile");
    assert!(
        v["claudeAiOauth"]["accessToken"]
            .as_str()
            .is_some_and(|t| !t.is_empty() && t != "none")
    );
    // A refresh moves the expiry forward in the file.
    std::thread::sleep(Duration::from_millis(20));
    control::call(
        &d.socket,
        &Request::Rotate {
            name: "sess".into(),
        },
    )
    .expect("rotate");
    let later = json(&path)["claudeAiOauth"]["expiresAt"]
        .as_u64()
        .expect("a number");
    assert!(later > expires, "{later} after {expires}");
}

/// An OAuth credential's consumers' files holding another session at mount
/// is no conflict (for an API key it would refuse the mount): a stale copy
/// of tokenfs's own chain (what `unmount --restore` leaves, or Claude's
/// older file) is offered and refused without the server ever seeing a
/// spent refresh token; a fresh login found in a file is adopted once a
/// refresh with it succeeds. Both files' other bytes stay as written.
#[test]
fn another_session_in_a_file_at_mount_is_offered_not_a_conflict() {
    let mut r = rig(Duration::from_secs(600), "");
    let (old_at, old_rt) = r.import_login();
    assert!(r.refreshes() >= 1, "the import validated by a refresh");
    let served = claude_tokens(&r.claude).0;
    if let Some(d) = r.d.take() {
        assert!(d.stop().0.success());
    }
    let stale = CLAUDE
        .replacen("\"none\"", &format!("\"{old_at}\""), 1)
        .replacen("\"none\"", &format!("\"{old_rt}\""), 1);
    fs::write(&r.claude, &stale).expect("write the stale session");
    r.restart();
    let (at, shown) = claude_tokens(&r.claude);
    assert_eq!(
        at, served,
        "the state's session is served, not the stale copy"
    );
    assert!(shown.starts_with("tokenfs-decoy-"));
    assert_eq!(json(&r.claude)["claudeAiOauth"]["subscriptionType"], "max");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        r.fake.reuses(),
        0,
        "a spent refresh token reached the server"
    );
    assert_eq!(r.state(), "ok");

    // A new login written into Hermes' file while tokenfs was stopped.
    if let Some(d) = r.d.take() {
        assert!(d.stop().0.success());
    }
    let (new_at, new_rt) = r.fake.login();
    let login = HERMES
        .replacen("\"none\"", &format!("\"{new_at}\""), 1)
        .replacen("\"none\"", &format!("\"{new_rt}\""), 1);
    fs::write(&r.hermes, &login).expect("write the login");
    let before = r.fake.calls();
    r.restart();
    wait_until(Duration::from_secs(5), "the login adopted", || {
        r.fake.calls() > before && hermes_tokens(&r.hermes).0 != served
    });
    let (at, _) = hermes_tokens(&r.hermes);
    assert!(r.fake.access_valid(&at), "the adopted session is valid");
    assert_eq!(claude_tokens(&r.claude).0, at, "every view shows it");
    assert_eq!(json(&r.hermes)["active_provider"], "openai-codex");
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.state(), "ok");
}

/// Files mode (no FUSE) sees a consumer's wipe when it lands, not at the
/// next rotation: the wiped file asks for a refresh at once and is
/// rewritten with the new session.
#[test]
fn files_mode_refreshes_for_a_consumer_that_wiped_its_session() {
    let fake = Fake::start(Duration::from_secs(600));
    let (at, rt) = fake.login();
    let s = Scratch::new();
    let text = CLAUDE
        .replacen("\"none\"", &format!("\"{at}\""), 1)
        .replacen("\"none\"", &format!("\"{rt}\""), 1);
    let claude = s.write("home/.claude/.credentials.json", &text);
    let cfg = format!(
        r#"mode = "files"
[control]
socket = "{sock}"

[credentials.sess]
source = "oauth"
provider = "anthropic"
token_url = "{url}"
timeout = "2s"
min_refresh_interval = "1s"

[[mount]]
dir = "{dir}"
[[mount.file]]
path = ".credentials.json"
format = "json"
bind = {{ "claudeAiOauth.accessToken" = "sess.access_token", "claudeAiOauth.refreshToken" = "sess.refresh_token" }}
"#,
        sock = s.socket().display(),
        url = fake.token_url(),
        dir = s.path("home/.claude").display(),
    );
    let d = Daemon::start(&s, &cfg, &[]);
    let refreshes = || {
        d.status()["credentials"][0]["oauth"]["refresh_count"]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(5), "seeded from the file", || {
        refreshes() >= 1 && claude_tokens(&claude).1.starts_with("tokenfs-decoy-")
    });
    std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
    let (before_at, _) = claude_tokens(&claude);
    let mut v = json(&claude);
    v["claudeAiOauth"]["accessToken"] = "".into();
    v["claudeAiOauth"]["refreshToken"] = "".into();
    save_like_a_cli(&claude, &serde_json::to_string_pretty(&v).unwrap());
    wait_until(
        Duration::from_secs(5),
        "a refresh for the consumer, rewritten",
        || {
            let (now, _) = claude_tokens(&claude);
            !now.is_empty() && now != before_at && fake.access_valid(&now)
        },
    );
    assert_eq!(json(&claude)["claudeAiOauth"]["subscriptionType"], "max");
    assert_eq!(fake.reuses(), 0);
}

/// Runs `program` inside `unshare -m` with `hosts` bind-mounted over
/// /etc/hosts (the real file is never touched).
fn with_hosts(hosts: &Path, program: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.arg("-m")
        .arg("sh")
        .arg("-c")
        .arg("mount --bind \"$1\" /etc/hosts && shift && exec \"$@\"")
        .arg("sh")
        .arg(hosts)
        .arg(program);
    c
}

/// Hermes' `auth.json` after a ChatGPT login (`hermes auth`): its own copy
/// of the session and the pool entry it seeds from it.
fn hermes_codex_login_file() -> String {
    let tokens = serde_json::json!({"id_token": "none", "access_token": "none", "refresh_token": "none", "account_id": "none"});
    serde_json::to_string_pretty(&serde_json::json!({
        "version": 1,
        "active_provider": "openai-codex",
        "providers": {"openai-codex": {"tokens": tokens, "last_refresh": "2026-12-01T00:00:00Z", "auth_mode": "chatgpt"}},
        "credential_pool": {"openai-codex": [{
            "id": "a1b2c3", "label": "someone@example.com", "auth_type": "oauth", "priority": 0,
            "source": "device_code", "access_token": "none", "refresh_token": "none",
            "base_url": "https://chatgpt.com/backend-api/codex", "last_refresh": "2026-12-01T00:00:00Z",
            "request_count": 0}]}
    }))
    .unwrap_or_default()
}

/// Codex's `auth.json` after a ChatGPT login.
const CODEX_CHATGPT_AUTH: &str = r#"{"auth_mode":"chatgpt","OPENAI_API_KEY":null,"tokens":{"id_token":"none","access_token":"none","refresh_token":"none","account_id":"none"},"last_refresh":"2026-12-01T00:00:00Z"}"#;

/// A real client under target/clients; missing fails the test.
fn client_bin(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/clients")
        .join(rel);
    assert!(
        p.exists(),
        "{} is missing: scripts/test.sh installs it",
        p.display()
    );
    p
}

/// One ChatGPT session (`source = "oauth"`, decoy refresh tokens) that
/// tokenfs owns, feeding the real Codex CLI (`codex` preset) and the real
/// Hermes Agent (`hermes` preset); a proxy on the credential offers its
/// token endpoint.
struct ChatGpt {
    s: Scratch,
    fake: Fake,
    home: PathBuf,
    codex_dir: PathBuf,
    hermes_dir: PathBuf,
    backings: Vec<(&'static str, Backing)>,
    d: Daemon,
    /// auth.openai.com and chatgpt.com mapped to the fake (Hermes' token
    /// URL and its pool entry's base_url are fixed).
    front: Option<TlsFront>,
}

fn chatgpt_files(s: &Scratch, api: &str) {
    s.write(
        "home/.hermes/config.yaml",
        "model:\n  provider: openai-codex\n  default: gpt-5.5\n",
    );
    s.write("home/.hermes/auth.json", &hermes_codex_login_file());
    s.write(
        "home/.codex/config.toml",
        &format!(
            "model = \"test-model\"\nmodel_provider = \"fake\"\nchatgpt_base_url = \"{api}/backend-api/\"\ncheck_for_update_on_startup = false\n\n[model_providers.fake]\nname = \"fake\"\nbase_url = \"{api}/v1\"\nwire_api = \"responses\"\nrequires_openai_auth = true\n"
        ),
    );
    s.write("home/.codex/auth.json", CODEX_CHATGPT_AUTH);
}

fn chatgpt_rig(front: bool) -> ChatGpt {
    let fake = Fake::start(Duration::from_secs(900));
    fake.state.lock().jwt = true;
    let s = Scratch::new();
    let front = front.then(|| {
        tls_front_for(
            &s,
            &["auth.openai.com", "chatgpt.com"],
            "127.0.0.3",
            &fake.url,
        )
    });
    chatgpt_files(&s, &fake.url);
    let home = s.path("home");
    let (codex_dir, hermes_dir) = (home.join(".codex"), home.join(".hermes"));
    let backings = vec![
        ("codex", Backing::open(&codex_dir)),
        ("hermes", Backing::open(&hermes_dir)),
    ];
    let cfg = format!(
        "[control]\nsocket = \"{sock}\"\n[credentials.chatgpt]\nsource = \"oauth\"\nprovider = \"openai\"\ntoken_url = \"{url}\"\nrefresh_before = \"300s\"\nmin_refresh_interval = \"1s\"\n[[proxy]]\nname = \"chatgpt\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{api}\"\ncredential = \"chatgpt\"\n[[mount]]\npreset = \"codex\"\ncredential = \"chatgpt\"\n[[mount]]\npreset = \"hermes\"\ncredential = \"chatgpt\"\n",
        sock = s.socket().display(),
        url = fake.token_url(),
        api = fake.url,
    );
    let home_s = home.display().to_string();
    let env = [
        ("HOME", home_s.as_str()),
        ("HERMES_HOME", ""),
        ("CODEX_HOME", ""),
    ];
    let d = Daemon::start_env(&s, &cfg, &[&codex_dir, &hermes_dir], &env);
    let rig = ChatGpt {
        s,
        fake,
        home,
        codex_dir,
        hermes_dir,
        backings,
        d,
        front,
    };
    rig.import_login();
    rig
}

impl ChatGpt {
    /// A login at the fake, given to tokenfs as Codex's file.
    fn import_login(&self) {
        let (at, rt) = self.fake.login();
        let login = self.s.write(
            "login/auth.json",
            &serde_json::json!({"tokens": {"access_token": at, "refresh_token": rt}}).to_string(),
        );
        let out = Command::new(BIN)
            .args(["import", "chatgpt", "--from", "codex", "--socket"])
            .arg(self.s.socket())
            .arg(&login)
            .output()
            .expect("tokenfs import");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn refreshes(&self) -> u64 {
        self.d.status()["credentials"][0]["oauth"]["refresh_count"]
            .as_u64()
            .unwrap_or(0)
    }

    fn rotate(&self) {
        control::call(
            &self.d.socket,
            &Request::Rotate {
                name: "chatgpt".into(),
            },
        )
        .expect("rotate");
    }

    /// The access token a consumer's view shows (Hermes' or Codex's file).
    fn access(&self, dir: &Path) -> String {
        let v = json(&dir.join("auth.json"));
        v["providers"]["openai-codex"]["tokens"]["access_token"]
            .as_str()
            .or(v["tokens"]["access_token"].as_str())
            .unwrap_or("")
            .to_string()
    }

    /// The proxy's token endpoint.
    fn endpoint(&self) -> String {
        let url = self.d.status()["proxies"][0]["url"].clone();
        format!("{}/.tokenfs/token", url.as_str().unwrap_or(""))
    }

    /// (API calls, refused ones) at the fake.
    fn api_calls(&self) -> (usize, usize) {
        let st = self.fake.state.lock();
        (
            st.api_calls.len(),
            st.api_calls.iter().filter(|c| !c.1).count(),
        )
    }
}

impl ChatGpt {
    /// `hermes -z "say hi"` with the hosts mapped; (authorised, output).
    fn run_hermes(&self) -> (bool, String) {
        let front = self.front.as_ref().expect("the hosts are mapped");
        let out = with_hosts(&front.hosts, &client_bin("hermes-venv/bin/hermes"))
            .args(["-z", "say hi"])
            .env("HOME", &self.home)
            .env_remove("HERMES_HOME")
            .env_remove("CODEX_HOME")
            .env_remove("OPENAI_API_KEY")
            .env("SSL_CERT_FILE", &front.ca)
            .env("REQUESTS_CA_BUNDLE", &front.ca)
            .current_dir(&self.home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("hermes");
        let stdout = String::from_utf8_lossy(&out.stdout);
        (
            stdout.contains("hi from the fake"),
            format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// `codex exec` with its token endpoint at `token_url`.
    fn run_codex(&self, token_url: &str) -> (bool, String) {
        let out = Command::new(client_bin("node_modules/.bin/codex"))
            .args(["exec", "--skip-git-repo-check", "say hi"])
            .env("HOME", &self.home)
            .env_remove("CODEX_HOME")
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", token_url)
            .env_remove("OPENAI_API_KEY")
            .current_dir(&self.home)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("codex");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success() && text.contains("hi from the fake"),
            text,
        )
    }

    /// No file on disk under either mount holds a token (JWTs start `eyJ`,
    /// the fake's refresh tokens `rt-`).
    fn assert_no_token_on_disk(&self) {
        for (name, b) in &self.backings {
            for (path, bytes) in b.all_files() {
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains("eyJ") && !text.contains("rt-0"),
                    "{name} {} holds a token:\n{text}",
                    path.display()
                );
            }
        }
    }
}

/// 1 when a run was authorised; prints the output of one that was not.
fn counted(what: &str, i: usize, (ok, text): (bool, String)) -> usize {
    if !ok {
        eprintln!("{what} run {i} failed:\n{text}");
    }
    ok as usize
}

/// The real Hermes Agent 0.19 (`model.provider: openai-codex`) and the real
/// Codex CLI as consumers of one ChatGPT session that tokenfs owns, each
/// through its preset: Hermes' `auth.json` (`providers.openai-codex` and
/// its `credential_pool` entry) and Codex's. Hermes' token endpoint is
/// fixed (`https://auth.openai.com/oauth/token`): inside `unshare -m` it
/// is mapped to the fake behind a throw-away CA, so any refresh Hermes
/// tried would be counted. Across tokenfs's refreshes every run is
/// authorised and no consumer sends a refresh token.
#[test]
fn hermes_openai_codex_and_codex_share_one_session_across_refreshes() {
    let _one_at_a_time = real_clients_lock();
    let r = chatgpt_rig(true);
    let before_runs = r.fake.calls();
    let runs = 4;
    let (mut hermes_ok, mut codex_ok) = (0, 0);
    for i in 0..runs {
        hermes_ok += counted("hermes", i, r.run_hermes());
        codex_ok += counted("codex", i, r.run_codex(&r.fake.token_url()));
        r.rotate();
    }
    let (api, refused) = r.api_calls();
    eprintln!(
        "hermes {hermes_ok}/{runs} and codex {codex_ok}/{runs} runs authorised across {} tokenfs refreshes; API calls {api}, refused {refused}; token-endpoint calls during the runs {}, decoys sent {}, reuses {}",
        r.refreshes(),
        r.fake.calls() - before_runs,
        r.fake.unknown(),
        r.fake.reuses()
    );
    assert_eq!((hermes_ok, codex_ok), (runs, runs));
    assert_eq!(refused, 0);
    assert_eq!(
        r.fake.unknown(),
        0,
        "a consumer sent a (decoy) refresh token"
    );
    assert_eq!(r.fake.reuses(), 0);
    assert_eq!(r.fake.calls() - before_runs, runs, "only tokenfs refreshed");
    // Hermes' view is the session tokenfs serves; no disk copy holds one.
    let current = r.access(&r.hermes_dir);
    assert!(r.fake.access_valid(&current));
    let pool = json(&r.hermes_dir.join("auth.json"))["credential_pool"]["openai-codex"][0].clone();
    assert_eq!(pool["access_token"].as_str(), Some(current.as_str()));
    r.assert_no_token_on_disk();
    hermes_case_g(&r, &current);
}

/// Case g with Hermes: the API refuses the access token far from expiry.
/// Its token URL is fixed (no endpoint of tokenfs to point it at).
/// Measured: it sends its decoy 4 times, fails the run and writes nothing,
/// so tokenfs hears nothing; tokenfs's next refresh heals it.
fn hermes_case_g(r: &ChatGpt, current: &str) {
    std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
    r.fake.revoke_access(current);
    let (unknown, before) = (r.fake.unknown(), r.refreshes());
    let (ok1, text1) = r.run_hermes();
    std::thread::sleep(Duration::from_millis(500));
    let after = r.refreshes();
    let (ok2, _) = r.run_hermes();
    let pool = json(&r.hermes_dir.join("auth.json"))["credential_pool"]["openai-codex"][0].clone();
    eprintln!(
        "hermes case g: first run ok {ok1}, its refreshes with the decoy {}, tokenfs refreshes on it {}, next run ok {ok2}; pool entry status {:?} {:?}\n{}",
        r.fake.unknown() - unknown,
        after - before,
        pool["last_status"],
        pool["last_error_code"],
        text1.lines().rev().take(3).collect::<Vec<_>>().join("\n")
    );
    r.rotate();
    let (ok3, text3) = r.run_hermes();
    assert!(ok3, "after tokenfs's next refresh: {text3}");
    assert_eq!(r.fake.reuses(), 0);
}

/// Case g with the real Codex CLI and a decoy, its token endpoint pointed
/// at tokenfs (`CODEX_REFRESH_TOKEN_URL_OVERRIDE` = the proxy's
/// `/.tokenfs/token`): the API refuses the access token far from expiry,
/// Codex reloads its file (unchanged), refreshes with the decoy, tokenfs
/// takes that as the signal, refreshes once at the provider and answers
/// with the new session; Codex saves it and the same run is authorised.
/// Hermes' view of the same session (the hermes preset) is valid again too.
/// The provider never sees a decoy or a reused refresh token.
#[test]
fn codex_case_g_through_the_token_endpoint_heals_in_the_same_run() {
    let _one_at_a_time = real_clients_lock();
    let r = chatgpt_rig(false);
    let endpoint = r.endpoint();
    let (ok, text) = r.run_codex(&endpoint);
    assert!(ok, "{text}\n{}", r.d.log_text());
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(1100)); // min_refresh_interval
        r.fake.revoke_access(&r.access(&r.codex_dir));
        let before = r.refreshes();
        let asked = || {
            r.d.log_text()
                .matches("a consumer asked for a refresh")
                .count()
        };
        let asked_before = asked();
        let (ok, text) = r.run_codex(&endpoint);
        eprintln!(
            "case g round {round}: codex ok {ok}; its refresh requests at tokenfs {}; tokenfs refreshes {}; decoys at the provider {}, reuses {}",
            asked() - asked_before,
            r.refreshes() - before,
            r.fake.unknown(),
            r.fake.reuses()
        );
        assert!(
            ok,
            "the same run is authorised again: {text}\n{}",
            r.d.log_text()
        );
        assert!(
            (1..=2).contains(&(r.refreshes() - before)),
            "bounded refreshes"
        );
        assert!(r.fake.access_valid(&r.access(&r.codex_dir)));
        assert!(r.fake.access_valid(&r.access(&r.hermes_dir)));
    }
    assert_eq!(r.fake.unknown(), 0, "no decoy reached the provider");
    assert_eq!(r.fake.reuses(), 0);
    // A wrong grant is refused and changes nothing.
    let n = r.refreshes();
    let addr: std::net::SocketAddr = r.d.status()["proxies"][0]["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("proxy address");
    let wrong = common::http::Conn::connect(addr).request(
        "POST",
        "/.tokenfs/token",
        &[("content-type", b"application/json")],
        br#"{"grant_type":"refresh_token","refresh_token":"tokenfs-decoy-0000"}"#,
    );
    assert_eq!(wrong.status, 400, "{}", wrong.text());
    assert_eq!(r.refreshes(), n);
    r.assert_no_token_on_disk();
}
