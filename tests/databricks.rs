//! The Databricks PAT source against a fake workspace: steady rotation,
//! revoke after swap, outages, expiry and relogin, idle, single-flight.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fake_databricks::{Fake, Fault};
use common::*;

struct Rig {
    _s: Scratch,
    fake: Fake,
    d: Daemon,
    path: PathBuf,
}

fn rig(rotate: &str, lifetime: &str, extra: &str) -> Rig {
    let s = Scratch::new();
    let fake = Fake::start();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml("not-yet"));
    let bootstrap = fake.bootstrap(Duration::from_secs(3600));
    let cfg = hermes_config(&s, &dir).replace(
        "source = \"push\"",
        &format!(
            "source = \"databricks\"\nhost = \"{}\"\ninitial_env = \"DATABRICKS_TOKEN\"\nrotate_every = \"{rotate}\"\nlifetime = \"{lifetime}\"\ntimeout = \"2s\"\n{extra}",
            fake.url
        ),
    );
    let d = Daemon::start_env(
        &s,
        &cfg,
        &[&dir],
        &[("DATABRICKS_TOKEN", bootstrap.as_str())],
    );
    let path = dir.join("config.yaml");
    wait_until(Duration::from_secs(5), || {
        fake.calls("create") >= 1 && current(&path) != bootstrap
    });
    Rig {
        _s: s,
        fake,
        d,
        path,
    }
}

fn current(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("read");
    text.lines()
        .find_map(|l| l.strip_prefix("  api_key: "))
        .unwrap_or("")
        .to_string()
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the file in a loop; counts reads whose token was not working at any
/// moment of the read (revoked or expired before it began, or not minted yet).
fn reader(
    fake: Fake,
    path: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut reads, mut bad) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let tok = current(&path);
            reads += 1;
            if !fake.valid_during(&tok, started, Instant::now()) {
                bad += 1;
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        (reads, bad)
    })
}

fn state(d: &Daemon) -> String {
    d.status()["credentials"][0]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn steady_rotation_serves_only_valid_tokens_and_revokes_the_old_ones() {
    let r = rig("1s", "3s", "");
    let stop = Arc::new(AtomicBool::new(false));
    let rd = reader(r.fake.clone(), r.path.clone(), stop.clone());
    wait_until(Duration::from_secs(40), || r.fake.calls("create") >= 21);
    stop.store(true, Ordering::SeqCst);
    let (reads, bad) = rd.join().unwrap();
    eprintln!(
        "reads {reads}, bad {bad}, creates {}, deletes {}",
        r.fake.calls("create"),
        r.fake.calls("delete")
    );
    assert_eq!(bad, 0, "served a token that was not valid when read");
    assert!(reads > 1000);
    // Every replaced minted token was revoked (the bootstrap has no known id).
    assert!(r.fake.calls("delete") >= r.fake.calls("create") - 2);
    assert!(r.fake.live() <= 3, "tokens piling up: {}", r.fake.live());
    assert_eq!(state(&r.d), "ok");
    let log = r.d.log_text();
    for t in r.fake.all_values() {
        assert!(!log.contains(&t), "token in the log");
    }
}

#[test]
fn an_outage_longer_than_an_interval_recovers_before_expiry() {
    let r = rig("1s", "5s", "");
    let stop = Arc::new(AtomicBool::new(false));
    let rd = reader(r.fake.clone(), r.path.clone(), stop.clone());
    r.fake.set_fault(Fault::Down);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(state(&r.d), "degraded");
    let err = r.d.status()["credentials"][0]["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(err.contains("minting a token"), "{err}");
    r.fake.set_fault(Fault::None);
    let before = r.fake.calls("create");
    wait_until(Duration::from_secs(5), || {
        r.fake.calls("create") > before + 1
    });
    stop.store(true, Ordering::SeqCst);
    let (_, bad) = rd.join().unwrap();
    assert_eq!(bad, 0);
    assert_eq!(state(&r.d), "ok");
}

#[test]
fn an_outage_past_expiry_needs_relogin_and_set_recovers_without_restart() {
    let r = rig("1s", "2s", "");
    r.fake.set_fault(Fault::Status(503));
    wait_until(Duration::from_secs(8), || state(&r.d) == "relogin_required");
    r.fake.set_fault(Fault::None);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        state(&r.d),
        "relogin_required",
        "an expired token cannot mint"
    );
    assert!(r.d.log_text().contains("relogin required"));
    let fresh = r.fake.bootstrap(Duration::from_secs(3600));
    let out = std::process::Command::new(BIN)
        .args(["set", "databricks", "--socket"])
        .arg(&r.d.socket)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(fresh.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(out.success());
    assert_eq!(state(&r.d), "ok");
    let tok = current(&r.path);
    assert!(
        r.fake.is_valid(&tok) && tok != fresh,
        "serves a token minted from the fresh PAT"
    );
}

#[test]
fn an_idle_container_never_lets_its_token_expire() {
    let r = rig("1s", "2s", "");
    let creates = r.fake.calls("create");
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        r.fake.calls("create") >= creates + 5,
        "rotated while nobody read"
    );
    assert!(r.fake.is_valid(&current(&r.path)));
}

#[test]
fn concurrent_rotate_requests_mint_once() {
    let r = rig("1h", "2h", "");
    r.fake.set_fault(Fault::Slow(Duration::from_millis(600)));
    let before = r.fake.calls("create");
    let socket = r.d.socket.clone();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                tokenfs::control::call(
                    &socket,
                    &tokenfs::control::Request::Rotate {
                        name: "databricks".into(),
                    },
                )
                .map(|v| v["generation"].as_u64())
            })
        })
        .collect();
    let gens: Vec<_> = calls
        .into_iter()
        .map(|c| c.join().unwrap().expect("rotate"))
        .collect();
    assert_eq!(
        r.fake.calls("create"),
        before + 1,
        "one mint for concurrent requests"
    );
    assert!(gens.windows(2).all(|w| w[0] == w[1]), "{gens:?}");
}

#[test]
fn retry_after_is_honoured() {
    let r = rig("1s", "30s", "");
    r.fake.set_fault(Fault::TooMany(3));
    let start = r.fake.calls("create");
    wait_until(Duration::from_secs(5), || r.fake.calls("create") > start);
    r.fake.set_fault(Fault::None);
    wait_until(Duration::from_secs(10), || {
        r.fake.calls("create") > start + 1
    });
    let times = r.fake.call_times("create");
    let gap = times[start + 1].duration_since(times[start]);
    assert!(
        gap >= Duration::from_millis(2900),
        "retried after {gap:?}, Retry-After said 3 s"
    );
}

#[test]
fn a_rejected_bootstrap_token_is_relogin_required() {
    let s = Scratch::new();
    let fake = Fake::start();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml("x"));
    let cfg = hermes_config(&s, &dir).replace(
        "source = \"push\"",
        &format!(
            "source = \"databricks\"\nhost = \"{}\"\ninitial_env = \"DATABRICKS_TOKEN\"",
            fake.url
        ),
    );
    let d = Daemon::start_env(
        &s,
        &cfg,
        &[&dir],
        &[("DATABRICKS_TOKEN", "dapi-not-a-real-token-000000000")],
    );
    wait_until(Duration::from_secs(5), || state(&d) == "relogin_required");
    assert_eq!(fake.calls("create"), 0);
    assert!(!d.log_text().contains("dapi-not-a-real-token"));
}

#[test]
fn cleanup_orphans_revokes_what_a_crashed_run_left_behind() {
    let s = Scratch::new();
    let fake = Fake::start();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml("x"));
    let left_behind = {
        let mut st = fake.state.lock();
        let now = Instant::now();
        st.tokens.insert(
            "dapiorphan0000000000000000000000000".into(),
            common::fake_databricks::Token {
                id: "orphan1".into(),
                created: now,
                expires: now + Duration::from_secs(3600),
                revoked: None,
                comment: "tokenfs-rotated:test".into(),
            },
        );
        "dapiorphan0000000000000000000000000"
    };
    let cfg = hermes_config(&s, &dir).replace(
        "source = \"push\"",
        &format!(
            "source = \"databricks\"\nhost = \"{}\"\ninitial_env = \"DATABRICKS_TOKEN\"\ncomment = \"tokenfs-rotated:test\"\ncleanup_orphans = true",
            fake.url
        ),
    );
    let boot = fake.bootstrap(Duration::from_secs(3600));
    let _d = Daemon::start_env(&s, &cfg, &[&dir], &[("DATABRICKS_TOKEN", boot.as_str())]);
    wait_until(Duration::from_secs(5), || !fake.is_valid(left_behind));
    assert!(fake.is_valid(&current(&dir.join("config.yaml"))));
}

/// A PAT a CLI writes into the managed file is validated on the source's
/// thread: the writer's close() never waits for the network.
#[test]
fn a_written_token_is_validated_off_the_fuse_path() {
    let r = rig("1h", "2h", "");
    r.fake.set_fault(Fault::Slow(Duration::from_secs(3)));
    let fresh = r.fake.bootstrap(Duration::from_secs(3600));
    let start = Instant::now();
    fs::write(&r.path, hermes_yaml(&fresh)).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "a write waited {:?} on the network",
        start.elapsed()
    );
    r.fake.set_fault(Fault::None);
    // Once validated, tokenfs mints from it: the file shows a token minted from the fresh PAT.
    wait_until(Duration::from_secs(15), || {
        let t = current(&r.path);
        r.fake.is_valid(&t) && r.fake.bearers("create").last() == Some(&fresh)
    });
}
