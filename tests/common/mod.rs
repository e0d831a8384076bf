//! Test harness: starts a real `tokenfs mount` on temporary directories and
//! tears it down. Tests that need FUSE fail (never skip) when it is missing.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokenfs::control::{self, Request};

pub mod fake_databricks;
pub mod fake_oauth;
pub mod http;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenfs");

/// Fails loudly when this machine cannot mount FUSE: CI must not go green
/// by skipping the tests that matter.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: these tests mount FUSE for real"
    );
    assert!(
        Command::new("fusermount3").arg("-V").output().is_ok(),
        "fusermount3 is missing: apt-get install -y fuse3"
    );
}

/// A scratch area: `home/` holds the mounted dirs, plus a config and socket.
pub struct Scratch {
    pub root: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            root: tempfile::Builder::new()
                .prefix("tokenfs-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("ctl.sock")
    }

    pub fn write(&self, rel: &str, bytes: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, bytes).expect("write");
        p
    }
}

/// An `O_PATH` handle on a directory, opened before mounting over it: the
/// test's view of the hidden original files.
pub struct Backing(OwnedFd);

impl Backing {
    pub fn open(dir: &Path) -> Backing {
        let c = CString::new(dir.as_os_str().as_bytes()).expect("path");
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "open {}", dir.display());
        Backing(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Reads a file of the hidden directory (bypassing the mount).
    pub fn read(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(format!("/proc/self/fd/{}/{}", self.0.as_raw_fd(), name)).ok()
    }

    /// Every file's bytes in the hidden directory tree.
    pub fn all_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let base = PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()));
        let mut out = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                let ft = e.file_type().expect("type");
                if ft.is_dir() {
                    stack.push(p);
                } else if ft.is_file() {
                    out.push((
                        p.strip_prefix(&base).unwrap_or(&p).to_owned(),
                        fs::read(&p).unwrap_or_default(),
                    ));
                }
            }
        }
        out
    }
}

/// A running daemon. Dropping it stops the daemon and makes sure nothing is
/// left mounted.
pub struct Daemon {
    pub child: Option<Child>,
    pub dirs: Vec<PathBuf>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

/// Whether a tokenfs mount is at `dir` (compared canonically, mountinfo's
/// escapes such as `\040` for a space undone).
pub fn is_mounted(dir: &Path) -> bool {
    tokenfs::mounts::tokenfs_at(dir).is_some()
}

impl Daemon {
    /// Writes `config` to the scratch dir and mounts it, waiting until every
    /// dir in `dirs` is live.
    pub fn start(s: &Scratch, config: &str, dirs: &[&Path]) -> Daemon {
        Daemon::start_env(s, config, dirs, &[])
    }

    pub fn start_env(s: &Scratch, config: &str, dirs: &[&Path], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_under(s, config, dirs, env, &[])
    }

    /// Starts the daemon as the last argument of `wrapper` (e.g. `prlimit …`).
    pub fn start_under(
        s: &Scratch,
        config: &str,
        dirs: &[&Path],
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Daemon {
        require_fuse();
        let cfg = s.write("tokenfs.toml", config);
        // A socket left by a killed daemon must not look like readiness.
        let _ = fs::remove_file(s.socket());
        let log = s.path("daemon.log");
        let logf = fs::File::create(&log).expect("log");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("mount")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        cmd.env(
            "RUST_LOG",
            std::env::var("TOKENFS_TEST_LOG").unwrap_or_else(|_| "debug".into()),
        );
        // Backups of converted files stay in the scratch dir.
        cmd.env("TOKENFS_STATE_DIR", s.path("state"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tokenfs");
        let mut d = Daemon {
            child: Some(child),
            dirs: dirs.iter().map(|p| p.to_path_buf()).collect(),
            socket: s.socket(),
            log,
        };
        d.wait_live();
        d
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let serving = self.log_text().contains("tokenfs is serving");
            if serving && self.dirs.iter().all(|d| is_mounted(d)) && self.socket.exists() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("tokenfs exited early ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "tokenfs did not mount within 10 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn set(&self, name: &str, secret: &str) -> u64 {
        let v = control::call(
            &self.socket,
            &Request::Set {
                name: name.into(),
                field: None,
                secret: secret.into(),
            },
        )
        .expect("set");
        v["generation"].as_u64().expect("generation")
    }

    pub fn status(&self) -> serde_json::Value {
        control::call(&self.socket, &Request::Status).expect("status")
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the daemon to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("child");
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "tokenfs did not exit within {within:?}:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait: the clean way out.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(10));
        (status, self.log_text())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            if is_mounted(d) {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(d)
                    .status();
            }
        }
    }
}

/// A Hermes-style `config.yaml` holding `token`.
pub fn hermes_yaml(token: &str) -> String {
    format!(
        "# Hermes agent config\nmodel:\n  provider: custom\n  base_url: https://gateway.example.com/serving-endpoints\n  api_key: {token}\n  default: databricks-claude-sonnet\n\n# keep this comment\nagent:\n  max_turns: 60\n"
    )
}

/// A config mounting `dir` with `config.yaml` bound to `databricks.token`.
pub fn hermes_config(s: &Scratch, dir: &Path) -> String {
    format!(
        "[control]\nsocket = \"{}\"\n\n[credentials.databricks]\nsource = \"push\"\n\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nformat = \"yaml\"\nbind = {{ \"model.api_key\" = \"databricks.token\" }}\n",
        s.socket().display(),
        dir.display()
    )
}

/// A token-shaped random string of `len` characters.
pub fn token(tag: &str, len: usize) -> String {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(7) as u64
        ^ (tag.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = format!("dapi{tag}");
    while s.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        s.push(alphabet[(seed % alphabet.len() as u64) as usize] as char);
    }
    s
}

/// A small tmpfs mounted at `at` (tests run as root), unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tokenfs-test"])
            .arg(at)
            .status();
        assert!(
            ok.map(|s| s.success()).unwrap_or(false),
            "mount tmpfs at {} (tests run as root)",
            at.display()
        );
        Tmpfs(at.to_owned())
    }

    pub fn remount_ro(&self) {
        let ok = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status();
        assert!(
            ok.map(|s| s.success()).unwrap_or(false),
            "remount read-only"
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts one preset for a push credential, with `HOME` (and every preset's
/// directory override variable) pointing into the scratch area. `dirs` are
/// the mounted directories relative to that home.
pub fn start_preset(
    s: &Scratch,
    preset: &str,
    credential: &str,
    dirs: &[&str],
) -> (PathBuf, Daemon) {
    let home = s.path("home");
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.{credential}]\nsource = \"push\"\n[[mount]]\npreset = \"{preset}\"\ncredential = \"{credential}\"\n",
        s.socket().display()
    );
    let home_s = home.display().to_string();
    let dirs: Vec<PathBuf> = dirs.iter().map(|d| home.join(d)).collect();
    let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    let env = [
        ("HOME", home_s.as_str()),
        ("CLAUDE_CONFIG_DIR", ""),
        ("HERMES_HOME", ""),
        ("CODEX_HOME", ""),
        ("XDG_DATA_HOME", ""),
    ];
    let d = Daemon::start_env(s, &cfg, &refs, &env);
    (home, d)
}
