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
    // The directory's lock names the daemon that holds it.
    assert!(
        err.contains(&format!(
            "already served by another tokenfs (pid {})",
            _d.pid()
        )) && err.contains("fusermount3 -u"),
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

/// The mount point holds a space: mountinfo shows it as `\040`, and
/// doctor must name the real path (quoted for a shell).
#[test]
fn a_stale_mount_is_reported_by_doctor_and_cleared_by_the_next_mount() {
    let s = Scratch::new();
    let dir = s.path("home/my agent/.hermes");
    s.write(
        "home/my agent/.hermes/config.yaml",
        &hermes_yaml(&token("life", 32)),
    );
    let mut d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    let cfg = s.path("tokenfs.toml");
    let ok = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout).to_string();
    // Only this test's own lines: another tokenfs on the machine may have
    // left a stale mount of its own, which doctor rightly reports.
    let root = s.path("").display().to_string();
    let ours_to_fix = text
        .lines()
        .any(|l| l.starts_with("FIX") && l.contains(&root));
    assert!(
        !ours_to_fix && text.contains("ok   /dev/fuse") && text.contains("is valid"),
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
        !out.status.success()
            && text.contains(&format!("stale tokenfs mount at {}", dir.display()))
            && text.contains(&format!("fusermount3 -u -z '{}'", dir.display())),
        "{text}"
    );
    // Mounting again clears it and serves.
    let d2 = Daemon::start(&s, &fs::read_to_string(&cfg).unwrap(), &[&dir]);
    let read = fs::read_to_string(dir.join("config.yaml"));
    assert!(read.is_ok(), "{read:?}\n{}", d2.log_text());
    assert!(d2.log_text().contains("stale mount"));
}

/// Two daemons started at the same moment on one directory (different
/// sockets): the directory's lock lets exactly one mount; the other exits
/// non-zero naming the directory and the pid that holds it.
#[test]
fn two_daemons_started_at_once_on_one_dir_exactly_one_mounts() {
    require_fuse();
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write(
        "home/.hermes/config.yaml",
        &hermes_yaml(&token("twice", 32)),
    );
    let base = hermes_config(&s, &dir);
    let cfgs: Vec<_> = (0..2)
        .map(|i| {
            s.write(
                &format!("t{i}.toml"),
                &base.replace("ctl.sock", &format!("ctl{i}.sock")),
            )
        })
        .collect();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let children: Vec<_> = cfgs
        .iter()
        .map(|cfg| {
            let cfg = cfg.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                Command::new(BIN)
                    .args(["mount", "--config"])
                    .arg(&cfg)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    // The loser exits at once; the winner serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut children: Vec<Option<std::process::Child>> = children.into_iter().map(Some).collect();
    let mut loser = None;
    while loser.is_none() {
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(ch) = c {
                if let Ok(Some(st)) = ch.try_wait() {
                    let mut err = String::new();
                    std::io::Read::read_to_string(&mut ch.stderr.take().unwrap(), &mut err)
                        .unwrap();
                    loser = Some((i, st, err));
                    *c = None;
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "neither daemon gave up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (i, st, err) = loser.unwrap();
    let winner = children[1 - i].as_mut().expect("the other one runs");
    assert!(!st.success());
    let canon = fs::canonicalize(&dir).unwrap();
    assert!(
        err.contains(&format!(
            "{} is already served by another tokenfs (pid {})",
            canon.display(),
            winner.id()
        )),
        "{err}"
    );
    assert_eq!(
        err.trim()
            .lines()
            .filter(|l| l.starts_with("tokenfs:"))
            .count(),
        1,
        "{err}"
    );
    while !is_mounted(&dir) {
        assert!(Instant::now() < deadline, "the winner did not mount");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let stacked = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.contains("fuse.tokenfs") && l.split(' ').nth(4) == Some(canon.to_str().unwrap())
        })
        .count();
    assert_eq!(stacked, 1, "exactly one mount at the directory");
    // The loser left the winner's socket alone and made none of its own.
    assert!(s.path(&format!("ctl{}.sock", 1 - i)).exists());
    assert!(!s.path(&format!("ctl{i}.sock")).exists());
    unsafe { libc::kill(winner.id() as i32, libc::SIGTERM) };
    winner.wait().unwrap();
    assert!(!is_mounted(&dir));
}

/// `status` asks the kernel: after `fusermount3 -u` of one of two mounts,
/// that one is `detached` and the other still `live`.
#[test]
fn status_shows_a_mount_detached_by_fusermount_u() {
    let s = Scratch::new();
    let a = s.path("home/.hermes");
    let b = s.path("home/other dir");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("st", 32)));
    fs::create_dir_all(&b).unwrap();
    let cfg = format!(
        "{}\n[[mount]]\ndir = \"{}\"\n",
        hermes_config(&s, &a),
        b.display()
    );
    let d = Daemon::start(&s, &cfg, &[&a, &b]);
    let states = |v: &serde_json::Value| -> Vec<String> {
        v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(states(&d.status()), ["live", "live"]);
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&b)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(states(&d.status()), ["live", "detached"]);
    let text = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("mount {}  detached", b.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("mount {}  live", a.display())),
        "{text}"
    );
    let ready = Command::new(BIN)
        .args(["status", "--ready", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!ready.status.success());
    assert!(String::from_utf8_lossy(&ready.stderr).contains("is detached"));
}

fn check_err(s: &Scratch, name: &str, toml: &str) -> String {
    let cfg = s.write(name, toml);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env("HOME", s.path("home"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{name} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

/// `check` resolves every dir and refuses what cannot work, each with what
/// to write instead.
#[test]
fn check_refuses_duplicates_nesting_home_root_system_dirs_and_relative_sockets() {
    let s = Scratch::new();
    fs::create_dir_all(s.path("home/d1/sub")).unwrap();
    fs::create_dir_all(s.path("home/d2")).unwrap();
    std::os::unix::fs::symlink(s.path("home/d1"), s.path("home/link")).unwrap();
    let head = "[credentials.db]\nsource = \"push\"\n";
    let mounts = |dirs: &[&str]| -> String {
        let mut t = head.to_string();
        for d in dirs {
            t.push_str(&format!("[[mount]]\ndir = \"{d}\"\n"));
        }
        t
    };
    let d1 = s.path("home/d1").display().to_string();
    let err = check_err(
        &s,
        "a.toml",
        &mounts(&[&d1, &s.path("home/link").display().to_string()]),
    );
    assert!(
        err.contains("is the same directory as mount[0].dir") && err.contains("list it once"),
        "{err}"
    );
    let err = check_err(
        &s,
        "b.toml",
        &mounts(&[&d1, &format!("{}/../d1", s.path("home/d2").display())]),
    );
    assert!(
        err.contains("is the same directory as mount[0].dir"),
        "{err}"
    );
    let err = check_err(&s, "c.toml", &mounts(&[&d1, &format!("{d1}/sub")]));
    assert!(
        err.contains("are nested") && err.contains("path = \"sub/config.yaml\""),
        "{err}"
    );
    let err = check_err(&s, "d.toml", &mounts(&["~"]));
    assert!(
        err.contains("is your home directory") && err.contains("dir = \"~/.hermes\""),
        "{err}"
    );
    let err = check_err(&s, "e.toml", &mounts(&["/"]));
    assert!(err.contains("never mounts over `/`"), "{err}");
    let err = check_err(&s, "f.toml", &mounts(&["/etc"]));
    assert!(err.contains("is a system directory"), "{err}");
    let err = check_err(
        &s,
        "g.toml",
        &format!("[control]\nsocket = \"ctl.sock\"\n{}", mounts(&[&d1])),
    );
    assert!(
        err.contains("control.socket") && err.contains("must be an absolute path"),
        "{err}"
    );
    // HOME unset: the message says so.
    let cfg = s.write("h.toml", &mounts(&["~/.hermes"]));
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .env_remove("HOME")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("HOME is not set"),
        "{err}"
    );
    // `./a.yaml` is a path inside the mount, and one of each is singular.
    let ok = s.write(
        "ok.toml",
        &format!(
            "{}[[mount.file]]\npath = \"./a.yaml\"\nbind = {{ \"k\" = \"db.token\" }}\n",
            mounts(&[&d1])
        ),
    );
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("(1 credential, 1 mount, 1 managed file)"),
        "{text}"
    );
}

fn rss_kib_and_threads(pid: i32) -> (u64, u64) {
    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        st.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("Threads:"))
}

/// A 10 MB request line and 2,000 idle connections: the daemon stays small,
/// never starts a thread per connection, and `status` still answers.
#[test]
fn a_flood_on_the_control_socket_leaves_the_daemon_small_and_answering() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    // 2,000 connections need more than a common soft limit of 1,024 fds.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(8192).max(lim.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let (_s, _dir, d) = start();
    let pid = d.pid();
    // A 10 MB line without a newline: refused after 64 KiB, told why.
    let mut big = UnixStream::connect(&d.socket).unwrap();
    big.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    for _ in 0..10 {
        match big.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(_) => break,
        }
    }
    assert!(sent < 10 << 20, "the daemon took all of a 10 MB line");
    let mut reply = String::new();
    big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = big.read_to_string(&mut reply);
    assert!(reply.contains("request line over 64 KiB"), "{reply:?}");
    // 2,000 idle connections.
    let idle: Vec<UnixStream> = (0..2000)
        .filter_map(|_| UnixStream::connect(&d.socket).ok())
        .collect();
    assert!(idle.len() >= 1900, "only {} connections", idle.len());
    std::thread::sleep(Duration::from_millis(500));
    let (rss, threads) = rss_kib_and_threads(pid);
    let t0 = Instant::now();
    let v = d.status();
    let took = t0.elapsed();
    assert_eq!(v["pid"].as_i64(), Some(pid as i64));
    eprintln!("flood: RSS {rss} KiB, {threads} threads, status answered in {took:?}");
    assert!(rss < 32 * 1024, "RSS {rss} KiB");
    assert!(threads < 64, "{threads} threads");
    assert!(took < Duration::from_secs(2), "status took {took:?}");
    // The oldest idle connections were closed, and told why.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut why = String::new();
    let _ = first.read_to_string(&mut why);
    assert!(why.contains("too many control connections"), "{why:?}");
}

/// A stopped daemon: `status` gives up within 5 s and says which process
/// does not answer, and in what state.
#[test]
fn status_against_a_stopped_daemon_returns_within_5_s() {
    let (_s, _dir, d) = start();
    d.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    let took = t0.elapsed();
    d.signal(libc::SIGCONT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        err.contains(&format!(
            "is not answering (pid {}, state T (stopped))",
            d.pid()
        )),
        "{err}"
    );
    eprintln!("stopped daemon: status gave up after {took:?}");
    // doctor says the same.
    let out = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(_s.path("tokenfs.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "tokenfs daemon pid {} is running and answers",
            d.pid()
        )),
        "{text}"
    );
}

#[test]
fn token_of_an_unknown_credential_says_no_such_credential() {
    let (_s, _dir, d) = start();
    let out = Command::new(BIN)
        .args(["token", "nosuch", "--socket"])
        .arg(&d.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no such credential `nosuch` (this daemon serves: databricks)"),
        "{err}"
    );
}

/// Exit within 200 ms of the last mount going away, by fusermount3 -u and by
/// SIGTERM.
#[test]
fn the_daemon_exits_within_200_ms_of_its_last_mount_going_away() {
    let mut took = Vec::new();
    for how in ["fusermount", "sigterm"] {
        let (_s, dir, mut d) = start();
        let _ = fs::read_to_string(dir.join("config.yaml")).unwrap();
        let t0 = Instant::now();
        if how == "fusermount" {
            assert!(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg(&dir)
                    .status()
                    .unwrap()
                    .success()
            );
        } else {
            d.signal(libc::SIGTERM);
        }
        let st = d.wait_exit(Duration::from_secs(5));
        let t = t0.elapsed();
        assert!(st.success());
        assert!(!is_mounted(&dir));
        took.push((how, t));
    }
    eprintln!("exit after the last mount went away: {took:?}");
    for (how, t) in took {
        assert!(t < Duration::from_millis(200), "{how}: {t:?}");
    }
}

/// Logs: plain text when stderr is not a terminal; `--log-file` is 0600.
/// Mounting over a directory that a process works in names that process.
#[test]
fn logs_have_no_colour_off_a_terminal_and_a_log_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("log", 32)));
    // A process whose working directory is inside the dir.
    let mut inside = Command::new("sleep")
        .arg("30")
        .current_dir(&dir)
        .spawn()
        .unwrap();
    // doctor names it before anything is mounted.
    let cfg = s.write("tokenfs.toml", &hermes_config(&s, &dir));
    let out = Command::new(BIN)
        .args(["doctor", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && text.contains(&format!("FIX  no process works inside {}", dir.display()))
            && text.contains(&format!("pid {} (sleep, cwd)", inside.id())),
        "{text}"
    );
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    let log = d.log_text();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal"
    );
    assert!(
        log.contains(&format!("pid {} (sleep, cwd)", inside.id()))
            && log.contains("hidden originals"),
        "{log}"
    );
    drop(d);
    let _ = inside.kill();
    let _ = inside.wait();
    let file = s.path("logs/tokenfs.log");
    fs::create_dir_all(file.parent().unwrap()).unwrap();
    let cfg = s.path("tokenfs.toml");
    let child = Command::new(BIN)
        .args(["mount", "--config"])
        .arg(&cfg)
        .arg("--log-file")
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&dir) {
        assert!(Instant::now() < deadline, "did not mount");
        std::thread::sleep(Duration::from_millis(10));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("tokenfs is serving") && !text.contains('\u{1b}'),
        "{text}"
    );
    assert_eq!(
        fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("_tokenfs()") && text.contains("--log-file"),
        "{text}"
    );
    let out = Command::new(BIN).arg("man").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(".TH tokenfs") && text.contains("mount"),
        "{text}"
    );
}

/// `scripts/demo.sh` waits for its own mount and socket: another tokenfs
/// mounted on the machine neither confuses it nor is touched by it.
#[test]
fn the_demo_succeeds_while_an_unrelated_tokenfs_is_mounted() {
    let (_s, dir, d) = start();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("TOKENFS_BIN", BIN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        err.contains("demo: this demo builds tokenfs, mounts it"),
        "{err}"
    );
    assert!(
        text.contains(&format!("api_key: dapi{:032}", 4444)),
        "the third rotation was not seen: {text}"
    );
    assert!(text.contains("__tokenfs:databricks.token__"), "{text}");
    // The unrelated daemon still serves.
    assert!(is_mounted(&dir));
    assert_eq!(d.status()["pid"].as_i64(), Some(d.pid() as i64));
}

/// A peer of another uid is turned away with the reason, not a bare
/// `Broken pipe` (the socket is opened up here only to let it connect).
#[test]
fn a_peer_of_another_uid_is_told_why_it_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (s, _dir, d) = start();
    let open = |p: &std::path::Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap()
    };
    open(s.root.path(), 0o755);
    open(&d.socket, 0o666);
    // A copy of the binary that uid 65534 can run wherever the repo is.
    let bin = s.path("tokenfs-copy");
    fs::copy(BIN, &bin).unwrap();
    open(&bin, 0o755);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not allowed: this tokenfs serves uid 0 (and root) only; you are uid 65534"),
        "{err}"
    );
    assert!(
        d.log_text()
            .contains("refused a control connection from another user")
    );
}

/// A mount whose FUSE connection was aborted stays in the mount table with
/// its session gone: `status` says `dead` (readers get ENOTCONN), the other
/// mount stays `live`, and SIGTERM still detaches both.
#[test]
fn status_shows_a_mount_whose_connection_was_aborted_as_dead() {
    use std::os::unix::fs::MetadataExt;
    let conns = std::path::Path::new("/sys/fs/fuse/connections");
    let fusectl = || {
        tokenfs::mounts::entries()
            .iter()
            .any(|e| e.fstype == "fusectl")
    };
    if !fusectl() {
        // Not mounted here: mount it (tests run as root).
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(conns)
            .status();
        assert!(fusectl(), "cannot mount fusectl at {}", conns.display());
    }
    let s = Scratch::new();
    let a = s.path("home/.hermes");
    let b = s.path("home/b");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("dead", 32)));
    fs::create_dir_all(&b).unwrap();
    let cfg = format!(
        "{}\n[[mount]]\ndir = \"{}\"\n",
        hermes_config(&s, &a),
        b.display()
    );
    let mut d = Daemon::start(&s, &cfg, &[&a, &b]);
    let dev = fs::metadata(&b).unwrap().dev();
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    fs::write(conns.join(minor.to_string()).join("abort"), "1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let states = loop {
        let v = d.status();
        let st: Vec<String> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap().to_string())
            .collect();
        if st[1] == "dead" || Instant::now() > deadline {
            break st;
        }
        // The daemon sees its session end and detaches the dead mount
        // itself; under load that can come before status looks.
        if st[1] == "detached" {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(states[0], "live");
    assert!(states[1] == "dead" || states[1] == "detached", "{states:?}");
    if states[1] == "dead" {
        assert_eq!(
            fs::read_dir(&b).unwrap_err().raw_os_error(),
            Some(libc::ENOTCONN)
        );
    }
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success());
    assert!(!is_mounted(&a) && !is_mounted(&b));
}
