//! Plain files: attribute changes, opens (kernel passthrough or the page
//! cache), names' entries and lifetimes, directory listings and xattrs,
//! all relative to fds of the hidden directory.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use fuser::{FopenFlags, TimeOrNow};
use tracing::warn;

use super::error::{Context as _, FsError, FsResult};
use super::inode::Node;
use super::io_mode::{Io, SMALL_FILE, Want};
use super::kernel::{Caller, Kernel, OpenBacking};
use super::managed::empty_stat;
use super::{DirSink, Entry, Handle, NO_CACHE, Opened, PASSTHROUGH_TTL, TokenFs, sys};
use crate::managed::TMP_PREFIX;

/// Open flags of plain files. NOFLUSH: `close` has nothing to wait for
/// (writes reach the backing file at once, and POSIX locks are the
/// kernel's), so it costs no round trip. Cached opens add KEEP_CACHE unless
/// the pages may be stale (`io_mode`).
const PASSTHROUGH_OPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;
const CACHED_OPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// The changes one `setattr` asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

impl AttrChange {
    /// Whether it changes mode, owner or times (anything but the size).
    pub fn changes_meta(&self) -> bool {
        self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    let special = |nsec| libc::timespec {
        tv_sec: 0,
        tv_nsec: nsec,
    };
    match t {
        None => special(libc::UTIME_OMIT),
        Some(TimeOrNow::Now) => special(libc::UTIME_NOW),
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if n < 0 {
                    s -= 1;
                    n += 1_000_000_000;
                }
                libc::timespec {
                    tv_sec: s as libc::time_t,
                    tv_nsec: n as libc::c_long,
                }
            }
        },
    }
}

/// Applies mode, owner and times to the inode behind an `O_PATH` fd.
pub(super) fn apply_meta(fd: BorrowedFd<'_>, c: &AttrChange, is_symlink: bool) -> FsResult<()> {
    if let Some(mode) = c.mode {
        sys::chmod_fd(fd, mode & 0o7777).context("chmod")?;
    }
    if c.uid.is_some() || c.gid.is_some() {
        sys::chown_fd(fd, c.uid, c.gid).context("chown")?;
    }
    if c.atime.is_some() || c.mtime.is_some() {
        sys::utimens_fd(fd, &[timespec(c.atime), timespec(c.mtime)], is_symlink)
            .context("utimensat")?;
    }
    Ok(())
}

impl<K: Kernel> TokenFs<K> {
    /// `setattr` of a plain node. A truncate by an unprivileged caller
    /// clears setuid/setgid as the kernel would (`drop_setid`).
    pub(super) fn passthrough_setattr(
        &self,
        node: &Node,
        c: &AttrChange,
        fh: Option<u64>,
        caller: &Caller,
    ) -> FsResult<libc::stat> {
        if let Some(size) = c.size {
            let via_handle = fh.and_then(|fh| self.handle(fh).ok());
            match via_handle.as_deref() {
                Some(Handle::File { file, .. }) => file.set_len(size).context("ftruncate")?,
                _ => sys::truncate_fd(node.fd(), size).context("truncate")?,
            }
            if !caller.privileged() {
                self.drop_setid(node.fd());
            }
        }
        apply_meta(node.fd(), c, node.is_symlink())?;
        sys::stat_fd(node.fd()).context("fstat")
    }

    /// The entry of `parent`/`name` (one more kernel reference to it). With
    /// `negative`, a name that does not exist gets a negative entry the
    /// kernel may keep as long as a positive one: every creation goes
    /// through this mount (the original directory is hidden under it), and
    /// the kernel replaces a cached negative entry itself when one does, so
    /// this only saves the lookup before a `creat`.
    pub(super) fn entry_of(&self, parent: &Node, name: &OsStr, negative: bool) -> FsResult<Entry> {
        match self.remember(parent, name) {
            Ok((node, stat)) => Ok(Entry {
                id: node.id,
                ino: node.id,
                stat,
                attr_ttl: PASSTHROUGH_TTL,
                entry_ttl: self.entry_ttl(parent, Some(&stat)),
            }),
            Err(e) if negative && e.raw_os_error() == Some(libc::ENOENT) => Ok(Entry {
                id: 0,
                ino: 0,
                stat: empty_stat(),
                attr_ttl: NO_CACHE,
                entry_ttl: self.entry_ttl(parent, None),
            }),
            Err(e) => Err(FsError::from(e).context("lookup")),
        }
    }

    /// How long the kernel may keep a name in `parent` (`st`: what it
    /// names; `None`: nothing). Every change arrives through this mount, so
    /// names are cached, also beside managed files, where programs keep the
    /// rest of their state: a plain file renamed over a managed one hands its
    /// node to the managed file (`rename_onto_managed`), so the kernel's moved
    /// name stays right. The exception is a file with other hard links,
    /// whose node must stay plain: beside a managed file its names are asked
    /// again every time.
    pub(super) fn entry_ttl(&self, parent: &Node, st: Option<&libc::stat>) -> std::time::Duration {
        let linked =
            st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 1);
        if linked && self.managed.parents.contains(&parent.key) {
            NO_CACHE
        } else {
            PASSTHROUGH_TTL
        }
    }

    /// Files created by another uid (with `allow_other`) belong to that uid,
    /// as they would on the original filesystem. A failure is logged: the
    /// file exists, and the creation itself succeeded.
    pub(super) fn chown_to_caller(&self, caller: &Caller, parent: &Node, name: &OsStr) {
        let euid = sys::euid();
        if euid != 0 || (caller.uid == euid && caller.gid == sys::egid()) {
            return;
        }
        let res = sys::cname(name)
            .and_then(|c| sys::open_path(parent.fd(), &c))
            .and_then(|fd| sys::chown_fd(fd.as_fd(), Some(caller.uid), Some(caller.gid)));
        if let Err(e) = res {
            warn!(mount = %self.dir.display(), "cannot give a new file to uid {}: {e}", caller.uid);
        }
    }

    /// The I/O of a new open of `node` (`file`, opened with `flags`) and its
    /// open flags. Read-only opens of small files use the page cache (no
    /// GETATTR after each read, see `io_mode`); the rest kernel passthrough
    /// where the kernel allows it.
    fn io_for(
        &self,
        node: &Node,
        file: &File,
        flags: i32,
        backer: &impl OpenBacking<K::Backing>,
    ) -> (Io<K::Backing>, FopenFlags) {
        let want = || {
            if !self.kernel_passthrough.load(Ordering::Relaxed) {
                return Want::Cached;
            }
            let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY;
            let st = sys::stat_fd(file.as_fd()).ok();
            let small = st.is_some_and(|st| st.st_size as u64 <= SMALL_FILE);
            // Passthrough writes never reach us, so we could not clear the
            // bits they must clear (`drop_setid`).
            let setid = st.is_none_or(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0);
            if (read_only && small) || (self.kill_priv.load(Ordering::Relaxed) && setid) {
                Want::Cached
            } else {
                Want::Passthrough
            }
        };
        let io = self.io.choose(node.id, want, || backer.open_backing(file));
        let open_flags = match &io {
            // Without KEEP_CACHE the kernel drops the node's pages at this
            // open, and no cached open can refill them while it lasts: pages
            // never go stale behind a passthrough writer.
            Io::Passthrough(_) => PASSTHROUGH_OPEN,
            Io::Cached(_) if node.pages_stale.swap(false, Ordering::Relaxed) => CACHED_OPEN,
            Io::Cached(_) => CACHED_OPEN | FopenFlags::FOPEN_KEEP_CACHE,
        };
        (io, open_flags)
    }

    /// Registers an open plain file as a handle.
    pub(super) fn open_plain(
        &self,
        node: &Node,
        file: File,
        flags: i32,
        backer: &impl OpenBacking<K::Backing>,
    ) -> Opened<K::Backing> {
        let (io, open_flags) = self.io_for(node, &file, flags, backer);
        let backing = match &io {
            Io::Passthrough(id) => Some(id.clone()),
            Io::Cached(_) => None,
        };
        let fh = self.add_handle(Handle::File { file, _io: io });
        Opened {
            fh,
            flags: open_flags,
            backing,
        }
    }

    /// With `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves it to us to clear
    /// setuid (and setgid with group-execute, the rule of the kernel's FUSE
    /// client) when an unprivileged caller writes, truncates or opens with
    /// `O_TRUNC`: the daemon does those as root, which would keep them.
    /// A failure is logged: the write itself has happened.
    pub(super) fn drop_setid(&self, fd: BorrowedFd<'_>) {
        if !self.kill_priv.load(Ordering::Relaxed) {
            return;
        }
        let Ok(st) = sys::stat_fd(fd) else {
            return;
        };
        let mut kill = st.st_mode & libc::S_ISUID;
        if st.st_mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
            kill |= libc::S_ISGID;
        }
        if kill == 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        if let Err(e) = sys::chmod_fd(fd, st.st_mode & 0o7777 & !kill) {
            warn!(mount = %self.dir.display(), "cannot clear the setuid/setgid bits of a written file: {e}");
        }
    }

    /// Lists a directory, giving managed files their own node ids and hiding
    /// our temp files.
    pub(super) fn list_dir(
        &self,
        node: &Node,
        dir: &File,
        offset: u64,
        sink: &mut impl DirSink,
    ) -> FsResult<()> {
        let hide_tmp = self.managed.parents.contains(&node.key);
        sys::read_dir(dir, offset as i64, |e| {
            if hide_tmp && e.name.starts_with(TMP_PREFIX.as_bytes()) {
                return true;
            }
            let name = OsStr::from_bytes(&e.name);
            let ino = self.managed.find(node, name).map_or(e.ino, |m| m.id);
            !sink.add(ino, e.next_offset as u64, e.kind, name)
        })
        .context("getdents")
    }

    /// What xattr calls act on: the backing file of a managed file, or the
    /// node. (The kernel asks `security.capability` before the first write
    /// to every new file, so this is on the churn path: no dup of the fd.)
    pub(super) fn xattr_target(&self, ino: u64) -> FsResult<XattrTarget> {
        if let Some(v) = self.views.get(ino) {
            let fd = sys::open_path(v.file.dir.fd(), &v.file.name).context("open")?;
            return Ok(XattrTarget::Managed(fd));
        }
        let node = self.node(ino)?;
        if node.is_symlink() {
            return Err(FsError::new(libc::EOPNOTSUPP));
        }
        Ok(XattrTarget::Node(node))
    }
}

pub(super) enum XattrTarget {
    Managed(OwnedFd),
    Node(Arc<Node>),
}

impl AsFd for XattrTarget {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            XattrTarget::Managed(fd) => fd.as_fd(),
            XattrTarget::Node(node) => node.fd(),
        }
    }
}

/// Runs `f` with this thread's read buffer of `size` bytes. A forwarded
/// READ is up to 1 MiB; a fresh `Vec` per request would be mmap'd and
/// unmapped each time (it is above glibc's mmap threshold), and every
/// munmap of a multi-threaded process sends TLB-flush IPIs to the other
/// CPUs. Stale bytes past what `pread` fills are never sent.
#[inline]
pub(super) fn read_into_scratch<T>(size: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        if buf.len() < size {
            buf.resize(size, 0);
        }
        f(&mut buf[..size])
    })
}
