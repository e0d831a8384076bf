//! One daemon per directory and per control socket: an exclusive `flock`
//! held for the daemon's whole life (the kernel releases it if the daemon
//! dies, so a crash never leaves a stale lock).
//!
//! A mount dir's lock file is keyed by the directory's canonical path and
//! lives in one place per user (`/run/tokenfs/locks` for root where /run
//! is writable, else
//! `$XDG_RUNTIME_DIR/tokenfs/locks` or `~/.local/state/tokenfs/locks`;
//! `$TOKENFS_LOCK_DIR` overrides), so two configs naming the same directory
//! through different paths meet on the same lock. A socket's lock file sits
//! next to it (`control.sock.lock`). Each lock file holds its holder's pid.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fs::sys::flock;

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    pub path: PathBuf,
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum Refused {
    /// Another process holds it (its pid when known).
    Held(Option<u32>),
    /// The lock file could not be opened or locked.
    Error(String),
}

/// Where mount-dir locks live.
pub fn lock_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOKENFS_LOCK_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    // Root uses /run where it can write there (a container may not let it).
    if nix::unistd::geteuid().is_root()
        && nix::unistd::access("/run", nix::unistd::AccessFlags::W_OK).is_ok()
    {
        return PathBuf::from("/run/tokenfs/locks");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("tokenfs/locks"),
        _ => crate::config::expand_home("~/.local/state/tokenfs/locks"),
    }
}

/// The lock file for a (canonical) mount dir.
pub fn dir_lock_path(canonical: &Path) -> PathBuf {
    let digest = Sha256::digest(canonical.as_os_str().as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    lock_dir().join(format!("dir-{hex}.lock"))
}

/// The lock file of a control socket.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    socket.with_file_name(name)
}

/// Creates `dir` (owner-only) if it is missing.
pub fn make_private_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Takes the lock at `path` without waiting, and writes this process's pid
/// and `label` into it.
pub fn acquire(path: &Path, label: &str) -> Result<Lock, Refused> {
    if let Some(parent) = path.parent() {
        make_private_dir(parent).map_err(Refused::Error)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Refused::Error(format!("cannot open lock file {}: {e}", path.display())))?;
    if let Err(e) = flock(file.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Refused::Held(holder_of(&file)));
        }
        return Err(Refused::Error(format!(
            "cannot lock {}: {e}",
            path.display()
        )));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}\n{label}\n", std::process::id());
    let _ = file.flush();
    Ok(Lock {
        _file: file,
        path: path.to_owned(),
    })
}

/// The pid holding the lock at `path`, if anyone does. Reads `/proc/locks`
/// without locking anything, so asking never makes a starting daemon lose
/// its lock; only where `/proc/locks` cannot be read does it probe with a
/// shared lock.
pub fn holder(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    let md = file.metadata().ok()?;
    if let Ok(text) = std::fs::read_to_string("/proc/locks") {
        return locks_holder(&text, md.dev(), md.ino());
    }
    // A shared probe, released at once.
    if flock(file.as_fd(), libc::LOCK_SH | libc::LOCK_NB).is_ok() {
        let _ = flock(file.as_fd(), libc::LOCK_UN);
        return None;
    }
    holder_of(&file)
}

/// The holder's pid: from `/proc/locks` (the kernel's word), else from the
/// file's first line.
fn holder_of(file: &File) -> Option<u32> {
    if let Ok(md) = file.metadata() {
        if let Some(pid) = proc_locks_holder(md.dev(), md.ino()) {
            return Some(pid);
        }
    }
    // The holder writes its pid right after locking: give it a moment.
    for _ in 0..20 {
        let mut text = String::new();
        let mut f = file;
        let _ = f.rewind();
        let _ = f.take(64).read_to_string(&mut text);
        if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

fn proc_locks_holder(dev: u64, ino: u64) -> Option<u32> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    locks_holder(&text, dev, ino)
}

fn locks_holder(text: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (dev_major(dev), dev_minor(dev));
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1c:5678 0 EOF"; blocked
        // waiters have "->" after the index.
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = f.get(4)?.parse().ok()?;
        let mut id = f.get(5)?.split(':');
        let maj = u64::from_str_radix(id.next()?, 16).ok()?;
        let min = u64::from_str_radix(id.next()?, 16).ok()?;
        let i: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && i == ino).then_some(pid)
    })
}

fn dev_major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & !0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let held = acquire(&p, "x").unwrap();
        assert_eq!(holder(&p), Some(std::process::id()));
        match acquire(&p, "x") {
            Err(Refused::Held(pid)) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert_eq!(holder(&p), None);
        assert!(acquire(&p, "x").is_ok());
    }

    #[test]
    fn dir_locks_are_keyed_by_path() {
        assert_ne!(
            dir_lock_path(Path::new("/a/b")),
            dir_lock_path(Path::new("/a/c"))
        );
        assert_eq!(
            socket_lock_path(Path::new("/r/ctl.sock")),
            PathBuf::from("/r/ctl.sock.lock")
        );
    }
}
