//! The kernel's view of mounts (`/proc/self/mountinfo`), and the processes
//! that would keep seeing a directory's hidden originals once it is mounted
//! over.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The mount's unique id (field 1).
    pub id: u64,
    /// The mount point, escapes undone (`\040` is a space).
    pub mount_point: PathBuf,
    /// e.g. `fuse.tokenfs`.
    pub fstype: String,
}

/// Every mount of this process's mount namespace, in mount order (a later
/// entry at the same point covers an earlier one).
pub fn entries() -> Vec<Entry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(Entry {
                id: fields.first()?.parse().ok()?,
                mount_point: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(fields.get(4)?))),
                fstype: (*fields.get(dash + 1)?).to_owned(),
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for `\`).
pub fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The topmost tokenfs mount at `dir` (compared canonically).
pub fn tokenfs_at(dir: &Path) -> Option<Entry> {
    let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    tokenfs_at_exact(&want).or_else(|| tokenfs_at_exact(dir))
}

/// The topmost tokenfs mount at exactly `dir` (already canonical): touches
/// nothing under `dir`, so it never waits on the mount's daemon.
pub fn tokenfs_at_exact(dir: &Path) -> Option<Entry> {
    entries()
        .into_iter()
        .rev()
        .find(|e| e.fstype == "fuse.tokenfs" && e.mount_point == dir)
}

/// What became of a mount this daemon made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Mounted and served.
    Live,
    /// No longer in the mount table (`fusermount3 -u`, `umount -l`).
    Detached,
    /// Still in the mount table but its session has ended: readers get
    /// `ENOTCONN` until it is detached.
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Live => "live",
            State::Detached => "detached",
            State::Dead => "dead",
        }
    }
}

/// The state of the mount with id `id` at `dir`, given whether its session
/// still runs. Mount ids are reused once a mount is gone, so the id must
/// be found at the same place with the same type (the dir's lock keeps
/// other tokenfs daemons from mounting there meanwhile).
pub fn state_of(id: u64, dir: &Path, session_running: bool) -> State {
    state_in(&entries(), id, dir, session_running)
}

pub fn state_in(entries: &[Entry], id: u64, dir: &Path, session_running: bool) -> State {
    let present = entries
        .iter()
        .any(|e| e.id == id && e.mount_point == dir && e.fstype == "fuse.tokenfs");
    match (present, session_running) {
        (false, _) => State::Detached,
        (true, true) => State::Live,
        (true, false) => State::Dead,
    }
}

/// A process that uses something inside a directory.
#[derive(Debug, Clone)]
pub struct User {
    pub pid: u32,
    pub comm: String,
    /// `cwd`, `root` or `open file`.
    pub how: &'static str,
}

/// Processes (other than this one) whose working directory, root or open
/// files are inside `dir`: once `dir` is mounted over, they keep reaching
/// the hidden originals through them.
pub fn users_inside(dir: &Path) -> Vec<User> {
    users_inside_each(&[dir.to_owned()])
        .pop()
        .unwrap_or_default()
}

/// [`users_inside`] for several directories in one pass over `/proc`.
/// Looks at no more than 4,096 processes and 256 fds each; processes it
/// may not inspect are skipped.
pub fn users_inside_each(dirs: &[PathBuf]) -> Vec<Vec<User>> {
    let dirs: Vec<Option<PathBuf>> = dirs.iter().map(|d| std::fs::canonicalize(d).ok()).collect();
    let mut out: Vec<Vec<User>> = vec![Vec::new(); dirs.len()];
    let which = |p: &Path| {
        dirs.iter()
            .position(|d| d.as_ref().is_some_and(|d| p.starts_with(d)))
    };
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten().take(4_096) {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        let mut found: Option<(usize, &'static str)> = None;
        if let Some(i) = std::fs::read_link(base.join("cwd"))
            .ok()
            .and_then(|p| which(&p))
        {
            found = Some((i, "cwd"));
        } else if let Some(i) = std::fs::read_link(base.join("root"))
            .ok()
            .filter(|p| p != Path::new("/"))
            .and_then(|p| which(&p))
        {
            found = Some((i, "root"));
        } else if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            found = fds
                .flatten()
                .take(256)
                .find_map(|fd| std::fs::read_link(fd.path()).ok().and_then(|p| which(&p)))
                .map(|i| (i, "open file"));
        }
        if let Some((i, how)) = found {
            let comm = std::fs::read_to_string(base.join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            if let Some(list) = out.get_mut(i) {
                list.push(User { pid, comm, how });
            }
        }
    }
    out
}

/// `pid 12 (bash, cwd), pid 40 (vim, open file)`, at most five named.
pub fn describe(users: &[User]) -> String {
    let mut s: Vec<String> = users
        .iter()
        .take(5)
        .map(|u| format!("pid {} ({}, {})", u.pid, u.comm, u.how))
        .collect();
    if users.len() > 5 {
        s.push(format!("and {} more", users.len() - 5));
    }
    s.join(", ")
}

/// A process's state letter from `/proc/PID/stat` (`R`, `S`, `T` stopped,
/// `Z` zombie, …), `None` if it is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `dir` is a FUSE mount whose daemon is gone. Listing asks the
/// daemon; `stat` could answer from the kernel's attribute cache.
pub fn is_dead(dir: &Path) -> bool {
    std::fs::read_dir(dir).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)
}

/// Detaches a mount lazily: it disappears from the namespace at once, and
/// its session ends when no process uses it any more. As root directly,
/// else through fusermount3 (setuid).
pub fn detach(dir: &Path) -> Result<(), String> {
    if nix::unistd::geteuid().is_root()
        && nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).is_ok()
    {
        return Ok(());
    }
    detach_with_fusermount(dir)
}

/// `fusermount3 -u -z DIR`: also detaches a dead mount, which `umount2`
/// can refuse.
pub fn detach_with_fusermount(dir: &Path) -> Result<(), String> {
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("fusermount3: {e}")),
    }
}

/// The command a user runs to detach `dir`, quoted for a shell (a mount
/// point may hold spaces).
pub fn detach_command(dir: &Path) -> String {
    format!("fusermount3 -u -z {}", shell_quote(&dir.to_string_lossy()))
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%=,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The first `cmd` on `$PATH`.
pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        let text = "36 35 0:52 / /tmp/a\\040b\\134c rw,nosuid - fuse.tokenfs tokenfs rw\n\
                    37 35 0:53 / /x rw shared:1 master:2 - ext4 /dev/vda1 rw\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, 36);
        assert_eq!(e[0].mount_point, PathBuf::from("/tmp/a b\\c"));
        assert_eq!(e[0].fstype, "fuse.tokenfs");
        assert_eq!(e[1].fstype, "ext4");
        let here = Path::new("/tmp/a b\\c");
        assert_eq!(state_in(&e, 36, here, true), State::Live);
        assert_eq!(state_in(&e, 36, here, false), State::Dead);
        assert_eq!(state_in(&e, 99, here, true), State::Detached);
        // The id, reused by another mount elsewhere, is not ours.
        assert_eq!(state_in(&e, 37, here, true), State::Detached);
        assert_eq!(state_in(&e, 36, Path::new("/x"), true), State::Detached);
    }

    #[test]
    fn detach_commands_are_quoted_for_a_shell() {
        assert_eq!(detach_command(Path::new("/a/b")), "fusermount3 -u -z /a/b");
        assert_eq!(
            detach_command(Path::new("/a/my agent")),
            "fusermount3 -u -z '/a/my agent'"
        );
        assert_eq!(
            detach_command(Path::new("/a/it's")),
            "fusermount3 -u -z '/a/it'\\''s'"
        );
    }

    #[test]
    fn a_trailing_backslash_is_kept() {
        assert_eq!(unescape("a\\04"), b"a\\04".to_vec());
        assert_eq!(unescape("a\\0401"), b"a 1".to_vec());
    }

    #[test]
    fn this_process_has_a_state() {
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }
}
