//! The container entrypoint (`scripts/tokenfs-entrypoint.sh`): the command
//! runs in the foreground with the caller's stdin and terminal, over live
//! mounts found by canonical path, and no daemon or mount outlives the
//! script on any exit path.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/tokenfs-entrypoint.sh");

/// A scratch dir whose mount dir has a space in its name and is reached
/// through a symlinked component (`link -> real`), as `/home -> /var/home`.
struct Setup {
    s: Scratch,
    /// The path as the config writes it (through the symlink).
    dir: PathBuf,
    cfg: PathBuf,
    tok: String,
}

fn setup() -> Setup {
    require_fuse();
    let s = Scratch::new();
    let tok = token("entry", 36);
    s.write("real/agent home/config.yaml", &hermes_yaml(&tok));
    std::os::unix::fs::symlink(s.path("real"), s.path("link")).unwrap();
    let dir = s.path("link/agent home");
    let cfg = s.write("tokenfs.toml", &hermes_config(&s, &dir));
    Setup { s, dir, cfg, tok }
}

impl Setup {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(SCRIPT)
            .arg(&self.cfg)
            .arg("--")
            .args(args)
            .env("TOKENFS_BIN", BIN)
            .env("TOKENFS_LOG", self.s.path("daemon.log"))
            .env("RUST_LOG", "info");
        // As a container runtime starts it: default signal dispositions. A
        // suite run in the background of a non-interactive shell inherits
        // SIGINT ignored, and bash cannot trap a signal ignored at entry.
        // SAFETY: signal() is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
        c
    }

    /// Waits for the entrypoint to exit. Its own limits (the daemon's 5 s
    /// grace for busy mounts, its 10 s before killing a hung daemon) fit
    /// well inside 30 s even on a loaded machine; on a timeout the daemon's
    /// log says where it stood.
    fn wait_for(&self, child: &mut Child) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let log = fs::read_to_string(self.s.path("daemon.log")).unwrap_or_default();
                panic!("the entrypoint did not exit within 30 s; daemon log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.s.path(name)
    }

    /// Nothing left: no mount at the dir, no daemon holding the socket's lock.
    /// After a SIGKILL the mount is removed by fusermount3's auto-unmount
    /// helper, another process: on a loaded 2-CPU machine (a build beside
    /// the suite) that took over 2 s once, so it gets 10.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_mounted(&self.dir), "still mounted");
        let lock = tokenfs::lock::socket_lock_path(&self.s.socket());
        assert_eq!(
            tokenfs::lock::holder(&lock),
            None,
            "a daemon is still running"
        );
        assert!(
            fs::read_to_string(self.dir.join("config.yaml"))
                .unwrap()
                .contains("__tokenfs:databricks.token__"),
            "the original (placeholder) file is not back"
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(self.s.path("daemon.log")).unwrap_or_default()
    }
}

/// A daemon started by a test, stopped even if the test fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

fn wait_file(p: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn runs_the_command_with_stdin_over_a_dir_with_a_space_behind_a_symlink() {
    let t = setup();
    let mut child = t
        .command(&[
            "sh",
            "-c",
            // The rendered file holds the token; stdin is the caller's pipe.
            "grep -q \"$0\" \"$1\" && read line && [ \"$line\" = hello ] && exit 7",
            &t.tok,
            t.dir.join("config.yaml").to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    t.assert_clean();
}

#[test]
fn a_failing_command_passes_its_status_on_and_leaves_nothing() {
    let t = setup();
    let out = t.command(&["sh", "-c", "exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    t.assert_clean();
}

#[test]
fn a_mount_that_fails_exits_70_with_a_reason_and_changes_nothing() {
    let t = setup();
    // Another daemon already serves the directory: ours exits at once.
    let other = t.s.write(
        "other.toml",
        &hermes_config(&t.s, &t.dir).replace("ctl.sock", "other.sock"),
    );
    let mut first = KillOnDrop(
        Command::new(BIN)
            .args(["mount", "--config"])
            .arg(&other)
            .stderr(fs::File::create(t.s.path("first.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !is_mounted(&t.dir) {
        assert!(
            Instant::now() < deadline,
            "the first daemon did not mount: {}",
            fs::read_to_string(t.s.path("first.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let marker = t.marker("ran");
    let out = t
        .command(&["touch", marker.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with(
            "tokenfs-entrypoint: tokenfs exited (status 1) before its mounts were live"
        )),
        "{err}"
    );
    assert!(
        t.log().contains("already served by another tokenfs"),
        "{}",
        t.log()
    );
    assert!(!marker.exists(), "the command ran without its mounts");
    // The first daemon's mount is untouched.
    assert!(is_mounted(&t.dir));
    unsafe { libc::kill(first.0.id() as i32, libc::SIGTERM) };
    first.0.wait().unwrap();
    // A missing directory: refused before anything starts.
    let bad =
        t.s.write("bad.toml", &hermes_config(&t.s, &t.s.path("missing")));
    let out = Command::new("bash")
        .arg(SCRIPT)
        .arg(&bad)
        .args(["--", "true"])
        .env("TOKENFS_BIN", BIN)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("does not exist: mkdir -p"), "{err}");
}

#[test]
fn mounts_not_live_in_time_exit_70_and_the_daemon_is_stopped() {
    let t = setup();
    // A "tokenfs" whose mount never comes up.
    let fake = t.s.write(
        "fake-tokenfs",
        &format!(
            "#!/bin/sh\nif [ \"$1\" = mount ]; then exec sleep 31.4159; fi\nexec {BIN} \"$@\"\n"
        ),
    );
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let started = Instant::now();
    let out = t
        .command(&["true"])
        .env("TOKENFS_BIN", &fake)
        .env("TOKENFS_WAIT", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(70), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("mounts not live after 1s: cannot reach the tokenfs daemon"),
        "{err}"
    );
    let left = Command::new("pgrep")
        .args(["-f", "sleep 31.4159"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "the would-be daemon was left running"
    );
}

/// Starts the entrypoint with a command that writes `started` once it runs
/// and records the signals it gets.
fn start_long(t: &Setup, with_tty_stdin: bool) -> Child {
    let started = t.marker("started");
    let got = t.marker("got");
    let script = format!(
        "trap 'echo INT >> {g}; exit 5' INT; trap 'echo TERM >> {g}; exit 6' TERM; touch {s}; while :; do sleep 0.02; done",
        g = got.display(),
        s = started.display()
    );
    let mut c = t.command(&["sh", "-c", &script]);
    if !with_tty_stdin {
        c.stdin(Stdio::null());
    }
    let child = c.stderr(Stdio::piped()).spawn().unwrap();
    wait_file(&started, Duration::from_secs(15));
    assert!(
        is_mounted(&t.dir),
        "the command runs but the dir is not mounted"
    );
    child
}

#[test]
fn sigterm_reaches_the_command_and_everything_is_detached() {
    let t = setup();
    let mut child = start_long(&t, false);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = t.wait_for(&mut child);
    assert_eq!(st.code(), Some(6));
    assert_eq!(fs::read_to_string(t.marker("got")).unwrap(), "TERM\n");
    t.assert_clean();
}

#[test]
fn sigint_without_a_terminal_reaches_the_command_once() {
    let t = setup();
    let mut child = start_long(&t, false);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = t.wait_for(&mut child);
    assert_eq!(st.code(), Some(5));
    assert_eq!(fs::read_to_string(t.marker("got")).unwrap(), "INT\n");
    t.assert_clean();
}

#[test]
fn the_daemon_dying_stops_the_command_and_exits_70() {
    let t = setup();
    let mut child = start_long(&t, false);
    let pid = tokenfs::lock::holder(&tokenfs::lock::socket_lock_path(&t.s.socket()))
        .expect("the daemon holds its socket's lock");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let st = t.wait_for(&mut child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(70), "{err}");
    assert!(
        err.contains("tokenfs exited (status 137) while the command ran"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(t.marker("got")).unwrap(), "TERM\n");
    // fusermount3's auto-unmount removes the dead daemon's mount.
    t.assert_clean();
}

/// Under a pseudo-terminal, as `docker run -it`: the command's stdin is the
/// terminal, and Ctrl-C (typed, not sent with kill) reaches it once.
#[test]
fn under_a_terminal_the_command_reads_the_tty_and_gets_ctrl_c() {
    let t = setup();
    let agent = t.s.write(
        "agent.py",
        r#"import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
print("TTY" if os.isatty(0) else "NOTTY", os.ttyname(0) if os.isatty(0) else "", "READY", flush=True)
line = sys.stdin.readline().strip()
print("READ", line, flush=True)
deadline = time.time() + 10
while not got and time.time() < deadline:
    time.sleep(0.01)
time.sleep(0.2)
print("SIGINTS", len(got), flush=True)
sys.exit(42 if got else 1)
"#,
    );
    let driver = t.s.write(
        "driver.py",
        r#"import os, pty, sys, time, select
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
out = b""
def read_until(token, secs):
    global out
    end = time.time() + secs
    while token not in out and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return token in out
ok = read_until(b"READY", 20)
os.write(fd, b"typed line\n")
ok = ok and read_until(b"READ typed line", 10)
time.sleep(0.2)
os.write(fd, b"\x03")  # Ctrl-C, as typed
read_until(b"SIGINTS", 10)
read_until(b"\xff", 1)
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
print("EXIT", os.waitstatus_to_exitcode(status))
"#,
    );
    let out = Command::new("python3")
        .arg(&driver)
        .arg("bash")
        .arg(SCRIPT)
        .arg(&t.cfg)
        .arg("--")
        .arg("python3")
        .arg(&agent)
        .env("TOKENFS_BIN", BIN)
        .env("TOKENFS_LOG", t.s.path("daemon.log"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TTY /dev/pts/"), "{text}\n{}", t.log());
    assert!(text.contains("READ typed line"), "{text}");
    assert!(
        text.contains("SIGINTS 1"),
        "Ctrl-C must arrive exactly once: {text}"
    );
    assert!(text.contains("EXIT 42"), "{text}");
    t.assert_clean();
}
