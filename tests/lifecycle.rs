//! Mount lifecycle: detach with fusermount, SIGTERM, SIGKILL (auto-unmount),
//! bad configs, and the secret hygiene of a whole scenario's logs.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn start() -> (Scratch, std::path::PathBuf, Daemon) {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("life", 32)));
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    (s, dir, d)
}

#[test]
fn fusermount_u_detaches_and_the_daemon_exits_0() {
    let (_s, dir, mut d) = start();
    // Another test's child process may hold a copy of an fd inside this
    // mount between its fork and exec (EBUSY): retry briefly, as a user would.
    let mut tries = 0;
    let st = loop {
        let st = Command::new("fusermount")
            .arg("-u")
            .arg(&dir)
            .status()
            .expect("fusermount");
        tries += 1;
        if st.success() || tries == 20 {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st.success());
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status}: {}", d.log_text());
    assert!(!is_mounted(&dir));
    // The original files are back.
    assert!(
        fs::read_to_string(dir.join("config.yaml"))
            .unwrap()
            .contains("__tokenfs:databricks.token__")
    );
}

#[test]
fn sigterm_unmounts_and_exits_0() {
    let (_s, dir, d) = start();
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status}: {log}");
    assert!(!is_mounted(&dir));
}

#[test]
fn sigkill_leaves_no_dead_mount_behind() {
    let (_s, dir, mut d) = start();
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    // Typically gone within ~20 ms (fusermount3 notices the daemon's death);
    // the bound leaves room for a loaded CI machine.
    let deadline = Instant::now() + Duration::from_secs(2);
    while is_mounted(&dir) {
        assert!(
            Instant::now() < deadline,
            "mount still there 2 s after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // No ENOTCONN: the directory is the original one again.
    assert!(fs::read_dir(&dir).is_ok());
}

#[test]
fn a_second_daemon_on_the_same_dir_gets_a_clear_error() {
    let (s, dir, _d) = start();
    let other = s.write(
        "other.toml",
        &hermes_config(&s, &dir).replace("ctl.sock", "ctl2.sock"),
    );
    let out = Command::new(BIN)
        .arg("mount")
        .arg("--config")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already mounted") && err.contains("fusermount3 -u"),
        "{err}"
    );
}

#[test]
fn malformed_config_refuses_to_mount_and_names_line_and_column() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    fs::create_dir_all(&dir).unwrap();
    let cfg = s.write(
        "bad.toml",
        &hermes_config(&s, &dir).replace("\"databricks.token\"", "\"databrick.token\""),
    );
    let out = Command::new(BIN)
        .arg("mount")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:12:28:") && err.contains("unknown credential `databrick`"),
        "{err}"
    );
    assert!(!is_mounted(&dir));
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn missing_mount_dir_gets_a_one_line_error() {
    let s = Scratch::new();
    let dir = s.path("nope");
    let cfg = s.write("t.toml", &hermes_config(&s, &dir));
    let out = Command::new(BIN)
        .arg("mount")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist: mkdir -p"), "{err}");
}

#[test]
fn rotate_on_a_push_credential_is_a_clear_error() {
    let (_s, _dir, d) = start();
    let out = Command::new(BIN)
        .args(["rotate", "databricks", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot mint"));
}

/// Runs a whole scenario at trace level and scans everything tokenfs wrote.
#[test]
fn no_token_in_logs_status_or_backing_files() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let first = token("hygiene0", 40);
    s.write("home/.hermes/config.yaml", &hermes_yaml(&first));
    let backing = Backing::open(&dir);
    let mut d = Daemon::start_env(
        &s,
        &hermes_config(&s, &dir),
        &[&dir],
        &[("RUST_LOG", "trace")],
    );
    let mut all = vec![first.clone()];
    for i in 1..6 {
        let t = token(&format!("hygiene{i}"), 40 + i);
        Command::new(BIN)
            .args(["set", "databricks", "--socket"])
            .arg(&d.socket)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(t.as_bytes())?;
                c.wait()
            })
            .unwrap();
        all.push(t);
        let _ = fs::read_to_string(dir.join("config.yaml")).unwrap();
    }
    // A written new value, a malformed write, and a failed rename.
    let written = token("hygieneW", 50);
    fs::write(dir.join("config.yaml"), hermes_yaml(&written)).unwrap();
    all.push(written.clone());
    fs::write(
        dir.join("config.yaml"),
        format!("model: [\n api_key: {written}\n"),
    )
    .unwrap();
    let _ = fs::rename(dir.join("missing"), dir.join("config.yaml"));
    let status_h = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let status_j = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(status_h.status.success());
    let backing_files = backing.all_files();
    let pid = d.pid();
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(10));
    let log = d.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was not on"
    );
    let _ = pid;
    for t in &all {
        assert!(!log.contains(t.as_str()), "token in the daemon log");
        assert!(
            !String::from_utf8_lossy(&status_h.stdout).contains(t.as_str()),
            "token in status"
        );
        assert!(
            !String::from_utf8_lossy(&status_j.stdout).contains(t.as_str()),
            "token in status --json"
        );
        for (p, bytes) in &backing_files {
            assert!(
                !String::from_utf8_lossy(bytes).contains(t.as_str()),
                "token on disk in {}",
                p.display()
            );
        }
    }
}

/// The container entrypoint waits for the mounts, runs the command with the
/// files live, passes its exit status on, and detaches everything after.
#[test]
fn entrypoint_runs_the_command_over_live_mounts_and_detaches() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let tok = token("entry", 36);
    s.write("home/.hermes/config.yaml", &hermes_yaml(&tok));
    let cfg = s.write("tokenfs.toml", &hermes_config(&s, &dir));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tokenfs-entrypoint.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(&cfg)
        .arg("--")
        .args(["sh", "-c", "grep -q \"$0\" \"$1\" && exit 7", &tok])
        .arg(dir.join("config.yaml"))
        .env("TOKENFS_BIN", BIN)
        .env("TOKENFS_LOG", s.path("daemon.log"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&dir), "still mounted after the command ended");
    // Without FUSE mounts the entrypoint refuses to run the command.
    let bad = s.write("bad.toml", &hermes_config(&s, &s.path("missing")));
    let out = Command::new("bash")
        .arg(script)
        .arg(&bad)
        .args(["--", "true"])
        .env("TOKENFS_BIN", BIN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
}

#[test]
fn a_stale_mount_is_reported_by_doctor_and_cleared_by_the_next_mount() {
    let (s, dir, mut d) = start();
    let cfg = s.path("tokenfs.toml");
    let ok = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(
        ok.status.success() && text.contains("ok   /dev/fuse") && text.contains("is valid"),
        "{text}"
    );
    // Kill the auto-unmount helper first, then the daemon: a dead mount stays.
    let helper = Command::new("pgrep")
        .args(["-f", &format!("fusermount3 .*{}", dir.display())])
        .output()
        .unwrap();
    let pids: Vec<i32> = String::from_utf8_lossy(&helper.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "no fusermount3 helper found");
    for pid in pids {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(100));
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    // (stat may still answer from the kernel's attribute cache; listing asks the dead daemon.)
    assert_eq!(
        fs::read_dir(&dir).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    let out = Command::new(BIN).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !out.status.success() && text.contains(&format!("fusermount3 -u -z {}", dir.display())),
        "{text}"
    );
    // Mounting again clears it and serves.
    let d2 = Daemon::start(&s, &fs::read_to_string(&cfg).unwrap(), &[&dir]);
    let read = fs::read_to_string(dir.join("config.yaml"));
    assert!(read.is_ok(), "{read:?}\n{}", d2.log_text());
    assert!(d2.log_text().contains("stale mount"));
}
