//! The halves of requests that need more than one syscall: attribute changes,
//! renames that involve a managed name, opens (with kernel passthrough), and
//! directory listings. Everything is relative to fds of the hidden directory.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use fuser::{
    BackingId, Errno, FileHandle, FopenFlags, INodeNo, RenameFlags, ReplyDirectory, TimeOrNow,
};
use parking_lot::Mutex;
use tracing::{info, warn};

use super::inode::{Inodes, Node};
use super::io_mode::{Io, SMALL_FILE, Want};
use super::managed::{ManagedFile, TMP_PREFIX};
use super::view::{View, Views};
use super::{Handle, ManagedHandle, TokenFs, WriteBuf, dirent_type, errno, sys};
use crate::secret::SecretBytes;

/// Open flags of plain files. NOFLUSH: `close` has nothing to wait for
/// (writes reach the backing file at once, and POSIX locks are the
/// kernel's), so it costs no round trip. Cached opens add KEEP_CACHE unless
/// the pages may be stale (`io_mode`).
const PASSTHROUGH_OPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;
const CACHED_OPEN: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

fn io_errno(e: io::Error) -> Errno {
    errno(&e)
}

/// The changes one `setattr` asks for.
pub struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
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
fn apply_meta(fd: std::os::fd::BorrowedFd<'_>, c: &AttrChange, is_symlink: bool) -> io::Result<()> {
    if let Some(mode) = c.mode {
        sys::chmod_fd(fd, mode & 0o7777)?;
    }
    if c.uid.is_some() || c.gid.is_some() {
        sys::chown_fd(fd, c.uid, c.gid)?;
    }
    if c.atime.is_some() || c.mtime.is_some() {
        sys::utimens_fd(fd, &[timespec(c.atime), timespec(c.mtime)], is_symlink)?;
    }
    Ok(())
}

impl TokenFs {
    pub(super) fn passthrough_setattr(
        &self,
        node: &Node,
        c: &AttrChange,
        fh: Option<FileHandle>,
        unprivileged: bool,
    ) -> Result<libc::stat, Errno> {
        if let Some(size) = c.size {
            let via_handle = fh.and_then(|fh| self.handle(fh).ok());
            match via_handle.as_deref() {
                Some(Handle::File { file, .. }) => file.set_len(size).map_err(io_errno)?,
                _ => sys::truncate_fd(node.fd(), size).map_err(io_errno)?,
            }
            if unprivileged {
                self.drop_setid(node.fd());
            }
        }
        apply_meta(node.fd(), c, node.is_symlink()).map_err(io_errno)?;
        sys::stat_fd(node.fd()).map_err(io_errno)
    }

    pub(super) fn managed_setattr(
        &self,
        m: &ManagedFile,
        c: &AttrChange,
        fh: Option<FileHandle>,
    ) -> Result<(), Errno> {
        if !m.is_present() {
            return Err(Errno::ENOENT);
        }
        if let Some(size) = c.size {
            let handle = fh.and_then(|fh| self.handle(fh).ok());
            match handle.as_deref() {
                Some(Handle::Managed(mh)) if mh.write.is_some() => {
                    mh.truncate(size)?;
                    if let Some(fh) = fh {
                        mh.file.track_size(fh.0, size);
                    }
                }
                _ => {
                    // truncate(2) by path: applies to what readers see now.
                    m.check_size(size).map_err(io_errno)?;
                    let mut bytes = m.rendering().map(|r| r.bytes.to_vec()).unwrap_or_default();
                    bytes.resize(size as usize, 0);
                    let bytes = SecretBytes::new(bytes);
                    m.commit(&bytes).map_err(io_errno)?;
                    self.views.retire(m);
                }
            }
        }
        if c.mode.is_some()
            || c.uid.is_some()
            || c.gid.is_some()
            || c.atime.is_some()
            || c.mtime.is_some()
        {
            let fd = sys::open_path(m.dir.fd(), &m.name).map_err(io_errno)?;
            apply_meta(fd.as_fd(), c, false).map_err(io_errno)?;
            m.refresh_stat().map_err(io_errno)?;
            // The current view's cached mode and times are now old.
            self.views.retire(m);
        }
        Ok(())
    }

    /// Refuses to make a managed name into something else (a directory, a
    /// symlink, a device, a hard link).
    pub(super) fn not_managed_name(&self, parent: &Node, name: &OsStr) -> Result<(), Errno> {
        match self.managed.find(parent, name) {
            Some(m) if m.is_present() => Err(Errno::EEXIST),
            Some(_) => Err(Errno::EPERM),
            None => Ok(()),
        }
    }

    /// `managed`: the managed files `name` and `newname` are, if any.
    pub(super) fn rename_any(
        &self,
        p: &Node,
        name: &OsStr,
        np: &Node,
        newname: &OsStr,
        flags: RenameFlags,
        managed: (Option<Arc<ManagedFile>>, Option<Arc<ManagedFile>>),
    ) -> Result<(), Errno> {
        let (src, dst) = managed;
        let (c_old, c_new) = (
            sys::cname(name).map_err(io_errno)?,
            sys::cname(newname).map_err(io_errno)?,
        );
        match (src, dst) {
            (None, None) => {
                sys::rename_at(p.fd(), &c_old, np.fd(), &c_new, flags.bits()).map_err(io_errno)
            }
            (None, Some(dst)) => {
                rename_onto_managed(p, name, &dst, flags, &self.views, &self.inodes)
            }
            (Some(src), None) => {
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    return Err(Errno::EXDEV);
                }
                let view = self.views.current_id(&src);
                sys::rename_at(p.fd(), &c_old, np.fd(), &c_new, flags.bits()).map_err(io_errno)?;
                info!(file = %src.shown.display(), "managed file renamed away (its copy keeps the placeholders); it reappears when a program creates it");
                src.set_absent();
                self.views.retire(&src);
                if let Some(id) = view {
                    self.view_becomes_plain(id, np, &c_new);
                }
                Ok(())
            }
            (Some(a), Some(b)) if Arc::ptr_eq(&a, &b) => Ok(()),
            // Two managed files: let the program fall back to copy + unlink,
            // which goes through the normal write path.
            (Some(_), Some(_)) => Err(Errno::EXDEV),
        }
    }

    /// After a managed file was renamed to `dir`/`name`, the kernel's dentry
    /// of that name still points at the file's view `id`: the node id now
    /// names the plain file (its placeholder copy). If that fails the name
    /// shows ENOENT until the kernel looks it up again.
    fn view_becomes_plain(&self, id: u64, dir: &Node, name: &std::ffi::CStr) {
        let opened = sys::open_path(dir.fd(), name)
            .and_then(|fd| sys::stat_fd(fd.as_fd()).map(|st| (fd, st)));
        match opened {
            Ok((fd, st)) => {
                self.inodes.take_over(id, fd, &st, || self.views.take(id));
            }
            Err(e) => {
                warn!(mount = %self.dir.display(), "a managed file renamed away: cannot follow its new name: {e}")
            }
        }
    }

    /// Opens a view. A reader of the current view reads its bytes through
    /// the page cache (kept across opens: the view never changes). Anyone
    /// else — a writer, or a reader of a view a rotation replaced — gets
    /// direct I/O with a private copy of the current rendering.
    pub(super) fn open_view(
        &self,
        v: &Arc<View>,
        flags: i32,
        tid: u32,
    ) -> Result<(u64, FopenFlags), Errno> {
        let read_only = flags & libc::O_ACCMODE == libc::O_RDONLY;
        if read_only && v.is_current() {
            v.opened_cached();
            let fh = self.add_handle(Handle::Managed(ManagedHandle {
                file: v.file.clone(),
                snapshot: v.rendering.bytes.clone(),
                write: None,
                cached: Some(v.clone()),
            }));
            // A reader has nothing to commit at close: no FLUSH round trip.
            return Ok((fh, FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH));
        }
        if !read_only {
            // Its bytes will change: new readers must not share its cache.
            self.views.retire(&v.file);
        } else {
            self.views.forget_name(v);
        }
        let fh = self.open_managed(&v.file, flags, tid)?;
        let noflush = if read_only {
            FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::empty()
        };
        Ok((fh, FopenFlags::FOPEN_DIRECT_IO | noflush))
    }

    fn open_managed(&self, m: &Arc<ManagedFile>, flags: i32, tid: u32) -> Result<u64, Errno> {
        let snapshot = m.rendering().ok_or(Errno::ENOENT)?.bytes;
        let write = if flags & libc::O_ACCMODE != libc::O_RDONLY {
            let truncate = flags & libc::O_TRUNC != 0;
            let data = if truncate {
                Vec::new()
            } else {
                snapshot.to_vec()
            };
            Some(Mutex::new(WriteBuf {
                data,
                dirty: truncate,
                append: flags & libc::O_APPEND != 0,
            }))
        } else {
            None
        };
        let size = match &write {
            Some(w) => w.lock().data.len(),
            None => snapshot.len(),
        };
        let fh = self.add_handle(Handle::Managed(ManagedHandle {
            file: m.clone(),
            snapshot,
            write,
            cached: None,
        }));
        m.track_open(tid, fh, size as u64);
        Ok(fh)
    }

    /// `creat` on a managed name: the view to answer with (counted as a
    /// lookup), the handle, and the view's `stat`.
    pub(super) fn create_managed(
        &self,
        m: &Arc<ManagedFile>,
        mode: u32,
        flags: i32,
        tid: u32,
    ) -> Result<(Arc<View>, u64, libc::stat), Errno> {
        if m.is_present() {
            if flags & libc::O_EXCL != 0 {
                return Err(Errno::EEXIST);
            }
        } else {
            m.create_empty(mode).map_err(io_errno)?;
            info!(file = %m.shown.display(), "managed file created by a program");
        }
        let fh = self.open_managed(m, flags, tid)?;
        let view = self.views.lookup(m, &self.inodes);
        let st = view.as_ref().and_then(|v| m.stat_of(&v.rendering));
        let (Some(v), Some(st)) = (view, st) else {
            self.handles.lock().remove(&fh);
            return Err(Errno::ENOENT);
        };
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.views.retire(m);
        }
        Ok((v, fh, st))
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
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> (Io, FopenFlags) {
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
        let io = self.io.choose(node.id, want, || open_backing(file));
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

    /// Registers an open plain file as a handle: the handle, its open flags,
    /// and the backing file when it uses kernel passthrough.
    pub(super) fn open_plain(
        &self,
        node: &Node,
        file: File,
        flags: i32,
        open_backing: impl FnOnce(&File) -> io::Result<BackingId>,
    ) -> (FileHandle, FopenFlags, Option<Arc<BackingId>>) {
        let (io, open_flags) = self.io_for(node, &file, flags, open_backing);
        let backing = match &io {
            Io::Passthrough(id) => Some(id.clone()),
            Io::Cached(_) => None,
        };
        let fh = FileHandle(self.add_handle(Handle::File { file, _io: io }));
        (fh, open_flags, backing)
    }

    /// With `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves it to us to clear
    /// setuid (and setgid with group-execute, the rule of the kernel's FUSE
    /// client) when an unprivileged caller writes, truncates or opens with
    /// `O_TRUNC`: the daemon does those as root, which would keep them.
    /// A failure is logged: the write itself has happened.
    pub(super) fn drop_setid(&self, fd: std::os::fd::BorrowedFd<'_>) {
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
    pub(super) fn list_dir(&self, node: &Node, dir: &File, offset: u64, mut reply: ReplyDirectory) {
        let hide_tmp = self.managed.parents.contains(&node.key);
        let listed = sys::read_dir(dir, offset as i64, |e| {
            if hide_tmp && e.name.starts_with(TMP_PREFIX.as_bytes()) {
                return true;
            }
            let name = OsStr::from_bytes(&e.name);
            let ino = self.managed.find(node, name).map_or(e.ino, |m| m.id);
            // `add` returns true when the reply buffer is full.
            !reply.add(
                INodeNo(ino),
                e.next_offset as u64,
                dirent_type(e.kind),
                name,
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// What xattr calls act on: the backing file of a managed file, or the
    /// node. (The kernel asks `security.capability` before the first write
    /// to every new file, so this is on the churn path: no dup of the fd.)
    pub(super) fn xattr_target(&self, ino: INodeNo) -> Result<XattrTarget, Errno> {
        if let Some(v) = self.views.get(ino.0) {
            let fd = sys::open_path(v.file.dir.fd(), &v.file.name).map_err(io_errno)?;
            return Ok(XattrTarget::Managed(fd));
        }
        let node = self.node(ino)?;
        if node.is_symlink() {
            return Err(Errno::EOPNOTSUPP);
        }
        Ok(XattrTarget::Node(node))
    }
}

pub(super) enum XattrTarget {
    Managed(OwnedFd),
    Node(Arc<Node>),
}

impl AsFd for XattrTarget {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            XattrTarget::Managed(fd) => fd.as_fd(),
            XattrTarget::Node(node) => node.fd(),
        }
    }
}

impl ManagedHandle {
    /// Length of what this handle reads (its private copy for writers).
    pub(super) fn len(&self) -> usize {
        match &self.write {
            Some(w) => w.lock().data.len(),
            None => self.snapshot.len(),
        }
    }

    pub(super) fn read(&self, offset: u64, size: u32, reply: impl FnOnce(&[u8])) {
        let slice = |bytes: &[u8]| {
            let start = (offset as usize).min(bytes.len());
            let end = start.saturating_add(size as usize).min(bytes.len());
            reply(&bytes[start..end]);
        };
        match &self.write {
            Some(w) => slice(&w.lock().data),
            None => slice(&self.snapshot),
        }
    }

    /// Writes into the handle's private copy; returns its new length.
    pub(super) fn write(&self, offset: u64, data: &[u8]) -> Result<u64, Errno> {
        let w = self.write.as_ref().ok_or(Errno::EBADF)?;
        let mut w = w.lock();
        let start = if w.append {
            w.data.len()
        } else {
            offset as usize
        };
        let end = start.checked_add(data.len()).ok_or(Errno::EFBIG)?;
        self.file.check_size(end as u64).map_err(io_errno)?;
        if w.data.len() < end {
            w.data.resize(end, 0);
        }
        w.data[start..end].copy_from_slice(data);
        w.dirty = true;
        Ok(w.data.len() as u64)
    }

    pub(super) fn truncate(&self, size: u64) -> Result<(), Errno> {
        let w = self.write.as_ref().ok_or(Errno::EBADF)?;
        self.file.check_size(size).map_err(io_errno)?;
        let mut w = w.lock();
        w.data.resize(size as usize, 0);
        w.dirty = true;
        Ok(())
    }

    /// Saves the private copy if it changed since the last save; a save
    /// makes the file's current view old.
    pub(super) fn save(&self, views: &Views) -> Result<(), Errno> {
        if self.commit()? {
            views.retire(&self.file);
        }
        Ok(())
    }

    /// Saves the private copy if it changed since the last commit; `true`
    /// if it saved.
    fn commit(&self) -> Result<bool, Errno> {
        let Some(w) = &self.write else {
            return Ok(false);
        };
        let mut w = w.lock();
        if !w.dirty {
            return Ok(false);
        }
        self.file.commit(&w.data).map_err(io_errno)?;
        w.dirty = false;
        Ok(true)
    }
}

/// The atomic-save pattern: a program wrote a temp file and renames it
/// over a managed file. The temp file's bytes are committed as a write
/// (secrets become placeholders) and the temp file is removed, so the
/// managed file keeps its inode and no token lands on disk.
///
/// The kernel then moves its cached name of the temp file onto the managed
/// name, still pointing at the temp file's node until the invalidation of
/// the name arrives: that node becomes a stale view of the managed file, so
/// even an open in that instant gets the rendering. (A temp file with other
/// hard links keeps its node; such names are never cached, see `entry_ttl`.)
pub(super) fn rename_onto_managed(
    p: &Node,
    name: &OsStr,
    dst: &Arc<ManagedFile>,
    flags: RenameFlags,
    views: &Views,
    inodes: &Inodes,
) -> Result<(), Errno> {
    if flags.contains(RenameFlags::RENAME_EXCHANGE) {
        return Err(Errno::EXDEV);
    }
    if flags.contains(RenameFlags::RENAME_NOREPLACE) && dst.is_present() {
        return Err(Errno::EEXIST);
    }
    let c = sys::cname(name).map_err(io_errno)?;
    let st = sys::stat_name(p.fd(), &c).map_err(io_errno)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(Errno::EISDIR),
        _ => return Err(Errno::EXDEV),
    }
    dst.check_size(st.st_size.max(0) as u64).map_err(io_errno)?;
    let fd = sys::open_at(p.fd(), &c, libc::O_RDONLY, 0).map_err(io_errno)?;
    let mut bytes = Vec::with_capacity(st.st_size.max(0) as usize);
    io::Read::read_to_end(&mut File::from(fd), &mut bytes).map_err(io_errno)?;
    let bytes = SecretBytes::new(bytes);
    dst.commit(&bytes).map_err(io_errno)?;
    views.retire(dst);
    if let Err(e) = sys::unlink_at(p.fd(), &c, 0) {
        warn!(file = %dst.shown.display(), "saved, but could not remove the renamed temp file: {e}");
    }
    if st.st_nlink == 1 {
        inodes.hand_over((st.st_dev, st.st_ino), |node, n| views.alias(node, dst, n));
    }
    Ok(())
}
