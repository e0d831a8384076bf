//! The core's requests: one method per kernel request, each taking a
//! [`Caller`] (when who asks matters) and returning a typed answer or an
//! [`FsError`]. This is where every decision is made; the adapter only
//! translates. Managed names are handed to `managed_io`, plain ones to
//! `passthrough` and `sys`.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use fuser::{InitFlags, RenameFlags};
use parking_lot::Mutex;

use super::error::{Context as _, FsError, FsResult};
use super::kernel::{Caller, Kernel, OpenBacking};
use super::managed_io::rename_onto_managed;
use super::passthrough::{AttrChange, read_into_scratch};
use super::{Attr, Created, DirSink, Entry, Handle, Opened, PASSTHROUGH_TTL, Step, TokenFs, sys};

/// What the core asks of the kernel at INIT.
pub struct Negotiation {
    /// Capabilities to enable (already limited to what the kernel offers).
    pub capabilities: InitFlags,
    /// Whether to ask for kernel passthrough (it needs CAP_SYS_ADMIN).
    pub try_passthrough: bool,
}

fn err<T>(errno: i32) -> FsResult<T> {
    Err(FsError::new(errno))
}

impl<K: Kernel> TokenFs<K> {
    /// INIT: what to enable of what the kernel offers.
    /// - DIRECT_IO_ALLOW_MMAP: writers and stale views use direct I/O, and
    ///   programs that mmap a config would otherwise get ENODEV.
    /// - ATOMIC_O_TRUNC: without it, open(O_TRUNC) arrives as a SETATTR
    ///   without a handle, indistinguishable from truncate(2) by path, and
    ///   readers would see the file empty until the writer closes.
    /// - HANDLE_KILLPRIV_V2: the kernel then stops asking for
    ///   security.capability before every write (once per inode instead),
    ///   and leaves clearing setuid/setgid bits to us (`drop_setid`).
    ///   `TOKENFS_KILLPRIV=off` leaves it to the kernel (to measure it).
    /// - Kernel passthrough needs root (CAP_SYS_ADMIN registers backing
    ///   files); `TOKENFS_KERNEL_PASSTHROUGH=off` forwards instead.
    pub fn negotiate(&self, offered: InitFlags) -> Negotiation {
        let mut wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if !self.switches.killpriv {
            wanted.remove(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        }
        let capabilities = wanted & offered;
        let kill_priv = capabilities.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        self.kill_priv.store(kill_priv, Ordering::Relaxed);
        let try_passthrough = self.switches.kernel_passthrough
            && sys::euid() == 0
            && offered.contains(InitFlags::FUSE_PASSTHROUGH);
        Negotiation {
            capabilities,
            try_passthrough,
        }
    }

    /// INIT is done: whether the kernel accepted passthrough.
    pub fn started(&self, kernel_passthrough: bool) {
        self.kernel_passthrough
            .store(kernel_passthrough, Ordering::Relaxed);
        self.info
            .kernel_passthrough
            .store(kernel_passthrough, Ordering::Relaxed);
    }

    /// LOOKUP: a managed name finds its current view; our temp files are
    /// not there; anything else is the backing file.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let p = self.node(parent)?;
        if let Some(m) = self.managed.find(&p, name) {
            return self.lookup_managed(m);
        }
        if self.hides(&p, name) {
            return err(libc::ENOENT);
        }
        self.entry_of(&p, name, true)
    }

    /// FORGET: the kernel dropped `n` references to node `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    pub fn getattr(&self, caller: &Caller, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        if let Some(v) = self.views.get(ino) {
            return self.view_attr(&v, caller.pid, fh);
        }
        let node = self.node(ino)?;
        let stat = sys::stat_fd(node.fd()).context("fstat")?;
        Ok(Attr {
            id: node.id,
            stat,
            ttl: PASSTHROUGH_TTL,
        })
    }

    pub fn setattr(
        &self,
        caller: &Caller,
        ino: u64,
        change: &AttrChange,
        fh: Option<u64>,
    ) -> FsResult<Attr> {
        if let Some(v) = self.views.get(ino) {
            self.managed_setattr(&v.file, change, fh)?;
            return self.view_attr(&v, caller.pid, fh);
        }
        let node = self.node(ino)?;
        let stat = self.passthrough_setattr(&node, change, fh, caller)?;
        Ok(Attr {
            id: node.id,
            stat,
            ttl: PASSTHROUGH_TTL,
        })
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let node = self.node(ino)?;
        sys::readlink_fd(node.fd()).context("readlink")
    }

    pub fn mknod(
        &self,
        c: &Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        self.make_entry(c, parent, name, |dir, n| {
            sys::mknod_at(dir, n, mode, rdev as libc::dev_t).context("mknod")
        })
    }

    pub fn mkdir(&self, c: &Caller, parent: u64, name: &OsStr, mode: u32) -> FsResult<Entry> {
        self.make_entry(c, parent, name, |dir, n| {
            sys::mkdir_at(dir, n, mode).context("mkdir")
        })
    }

    pub fn symlink(&self, c: &Caller, parent: u64, name: &OsStr, target: &Path) -> FsResult<Entry> {
        let t = sys::cname(target.as_os_str())?;
        self.make_entry(c, parent, name, |dir, n| {
            sys::symlink_at(&t, dir, n).context("symlink")
        })
    }

    /// mknod/mkdir/symlink: refuse managed names, create, give the new inode
    /// to the caller, and answer with its entry.
    fn make_entry(
        &self,
        caller: &Caller,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> FsResult<()>,
    ) -> FsResult<Entry> {
        let p = self.node(parent)?;
        self.not_managed_name(&p, name)?;
        make(p.fd(), &sys::cname(name)?)?;
        self.chown_to_caller(caller, &p, name);
        self.entry_of(&p, name, false)
    }

    /// UNLINK: unlinking a managed file removes its backing file; the name
    /// is absent until a program creates it again.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let p = self.node(parent)?;
        sys::unlink_at(p.fd(), &sys::cname(name)?, 0).context("unlink")?;
        if let Some(m) = self.managed.find(&p, name) {
            self.unlinked_managed(m);
        }
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let p = self.node(parent)?;
        sys::unlink_at(p.fd(), &sys::cname(name)?, libc::AT_REMOVEDIR).context("rmdir")
    }

    /// RENAME. A plain file renamed over a managed one is a program's
    /// atomic save: an fsynced save of our own, on a thread that may wait
    /// on the disk. The rest is `rename_now`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> FsResult<Step<()>> {
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        let src = self.managed.find(&p, name).cloned();
        let dst = self.managed.find(&np, newname).cloned();
        if let (None, Some(dst)) = (&src, &dst) {
            let (name, dst) = (name.to_owned(), dst.clone());
            let views = self.views.clone();
            return Ok(Step::Later(Box::new(move || {
                rename_onto_managed(&p, &name, &dst, flags, &views)
            })));
        }
        self.rename_now((&p, name), (&np, newname), flags, (src, dst))
            .map(Step::Done)
    }

    /// LINK. A second name for a managed file would show its placeholders
    /// (EPERM), and a managed name cannot become a link to something else.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Entry> {
        if self.views.get(ino).is_some() {
            return err(libc::EPERM);
        }
        let node = self.node(ino)?;
        let np = self.node(newparent)?;
        self.not_managed_name(&np, newname)?;
        sys::link_fd(node.fd(), np.fd(), &sys::cname(newname)?).context("link")?;
        self.entry_of(&np, newname, false)
    }

    /// OPEN. An unprivileged `O_TRUNC` clears setuid/setgid as the kernel
    /// would (`drop_setid`).
    pub fn open(
        &self,
        caller: &Caller,
        ino: u64,
        flags: i32,
        backer: &impl OpenBacking<K::Backing>,
    ) -> FsResult<Opened<K::Backing>> {
        if let Some(v) = self.views.get(ino) {
            return self.open_view(&v, flags, caller.pid);
        }
        let node = self.node(ino)?;
        let file = sys::reopen(node.fd(), flags).context("open")?;
        if flags & libc::O_TRUNC != 0 && !caller.privileged() {
            self.drop_setid(file.as_fd());
        }
        Ok(self.open_plain(&node, file, flags, backer))
    }

    /// CREATE: a managed name is created (or opened) as that file; any
    /// other name as a plain file owned by the caller.
    pub fn create(
        &self,
        caller: &Caller,
        parent: u64,
        name: &OsStr,
        (mode, flags): (u32, i32),
        backer: &impl OpenBacking<K::Backing>,
    ) -> FsResult<Created<K::Backing>> {
        let p = self.node(parent)?;
        if let Some(m) = self.managed.find(&p, name).cloned() {
            return self.create_managed(&m, mode, flags, caller.pid);
        }
        let c = sys::cname(name)?;
        self.fd_room()?;
        let fd = sys::open_at(p.fd(), &c, flags | libc::O_CREAT, mode).context("create")?;
        self.chown_to_caller(caller, &p, name);
        let (node, stat) = self.remember(&p, name).context("lookup")?;
        let ttl = self.entry_ttl(&p, Some(&stat));
        let open = self.open_plain(&node, File::from(fd), flags, backer);
        let entry = Entry {
            id: node.id,
            ino: node.id,
            stat,
            attr_ttl: ttl,
            entry_ttl: ttl,
        };
        Ok(Created { entry, open })
    }

    /// READ: hands the bytes to `reply` (no copy for managed files; plain
    /// files through a per-thread buffer).
    #[inline]
    pub fn read(&self, fh: u64, offset: u64, size: u32, reply: impl FnOnce(&[u8])) -> FsResult<()> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::Managed(mh) => {
                mh.read(offset, size, reply);
                Ok(())
            }
            Handle::File { file, .. } => read_into_scratch(size as usize, |buf| {
                let n = sys::pread(file, buf, offset).context("pread")?;
                reply(&buf[..n]);
                Ok(())
            }),
            Handle::Dir(_) => err(libc::EISDIR),
        }
    }

    /// WRITE: a managed file's writer changes its private copy; a plain
    /// file is written, and setuid/setgid cleared when the kernel says so.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> FsResult<u32> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::Managed(mh) => {
                mh.write(offset, data)?;
                Ok(data.len() as u32)
            }
            Handle::File { file, .. } => {
                let n = sys::pwrite(file, data, offset).context("pwrite")?;
                if kill_suidgid {
                    self.drop_setid(file.as_fd());
                }
                Ok(n as u32)
            }
            Handle::Dir(_) => err(libc::EISDIR),
        }
    }

    /// FLUSH (each close): a managed writer's bytes are saved here, so the
    /// writer's close returns once they are on disk.
    pub fn flush(&self, caller: &Caller, fh: u64) -> FsResult<Step<()>> {
        let h = self.handle(fh)?;
        let Handle::Managed(mh) = &*h else {
            return Ok(Step::Done(()));
        };
        mh.closed_by(caller.pid);
        if !mh.is_writer() {
            return Ok(Step::Done(()));
        }
        let views = self.views.clone();
        Ok(Step::Later(Box::new(move || match &*h {
            Handle::Managed(mh) => mh.save(&views),
            _ => Ok(()),
        })))
    }

    /// RELEASE (the last close): normally flush already saved; this catches
    /// writers that never flushed (e.g. through an mmap).
    pub fn release(&self, fh: u64) -> Step<()> {
        let h = self.handles.lock().remove(&fh);
        let writer = h
            .as_deref()
            .is_some_and(|h| matches!(h, Handle::Managed(mh) if mh.is_writer()));
        let (true, Some(h)) = (writer, h) else {
            return Step::Done(());
        };
        let views = self.views.clone();
        Step::Later(Box::new(move || match &*h {
            Handle::Managed(mh) => mh
                .save(&views)
                .map_err(|e| e.context("write lost at close")),
            _ => Ok(()),
        }))
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<Step<()>> {
        let h = self.handle(fh)?;
        let views = self.views.clone();
        Ok(Step::Later(Box::new(move || match &*h {
            Handle::Managed(mh) => mh.save(&views),
            Handle::File { file, .. } if datasync => file.sync_data().context("fdatasync"),
            Handle::File { file, .. } => file.sync_all().context("fsync"),
            Handle::Dir(d) => d.lock().sync_all().context("fsync"),
        })))
    }

    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let node = self.node(ino)?;
        let dir = sys::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY).context("opendir")?;
        Ok(self.add_handle(Handle::Dir(Mutex::new(dir))))
    }

    pub fn readdir(&self, ino: u64, fh: u64, offset: u64, sink: &mut impl DirSink) -> FsResult<()> {
        let node = self.node(ino)?;
        let h = self.handle(fh)?;
        let Handle::Dir(dir) = &*h else {
            return err(libc::ENOTDIR);
        };
        self.list_dir(&node, &dir.lock(), offset, sink)
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    pub fn fsyncdir(&self, fh: u64) -> FsResult<Step<()>> {
        let h = self.handle(fh)?;
        Ok(Step::Later(Box::new(move || match &*h {
            Handle::Dir(d) => d.lock().sync_all().context("fsync"),
            _ => Ok(()),
        })))
    }

    pub fn statfs(&self) -> FsResult<libc::statvfs> {
        let root = self.node(super::inode::ROOT_ID)?;
        sys::statvfs_fd(root.fd()).context("statvfs")
    }
}

/// Requests on open handles that are not reads or writes, and xattrs.
impl<K: Kernel> TokenFs<K> {
    /// FALLOCATE on a plain file (managed files have no blocks to
    /// allocate: EOPNOTSUPP). Unprivileged callers lose setuid/setgid.
    pub fn fallocate(
        &self,
        caller: &Caller,
        fh: u64,
        (offset, length): (u64, u64),
        mode: i32,
    ) -> FsResult<Step<()>> {
        let h = self.handle(fh)?;
        let Handle::File { file, .. } = &*h else {
            return err(libc::EOPNOTSUPP);
        };
        if !caller.privileged() {
            self.drop_setid(file.as_fd());
        }
        Ok(Step::Later(Box::new(move || match &*h {
            Handle::File { file, .. } => {
                sys::fallocate(file, mode, offset, length).context("fallocate")
            }
            _ => Ok(()),
        })))
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File { file, .. } => sys::lseek(file, offset, whence).context("lseek"),
            Handle::Managed(mh) => mh.seek(offset, whence),
            Handle::Dir(_) => err(libc::EINVAL),
        }
    }

    /// COPY_FILE_RANGE between plain files; with a managed file on either
    /// side EXDEV, so the kernel falls back to read + write (which go
    /// through the managed file's handles).
    pub fn copy_file_range(
        &self,
        (fh_in, offset_in): (u64, u64),
        (fh_out, offset_out): (u64, u64),
        len: u64,
    ) -> FsResult<Step<u32>> {
        let src = self.handle(fh_in)?;
        let dst = self.handle(fh_out)?;
        if !matches!((&*src, &*dst), (Handle::File { .. }, Handle::File { .. })) {
            return err(libc::EXDEV);
        }
        Ok(Step::Later(Box::new(move || match (&*src, &*dst) {
            (Handle::File { file: s, .. }, Handle::File { file: d, .. }) => {
                let n = sys::copy_file_range(s, offset_in, d, offset_out, len)
                    .context("copy_file_range")?;
                Ok(n as u32)
            }
            _ => err(libc::EXDEV),
        })))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let fd = self.xattr_target(ino)?;
        let c = sys::cname(name)?;
        sys::xattr::set(fd.as_fd(), &c, value, flags).context("setxattr")
    }

    /// GETXATTR; `size` 0 asks for the length only.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Vec<u8>> {
        let fd = self.xattr_target(ino)?;
        let c = sys::cname(name)?;
        sys::xattr::get(fd.as_fd(), &c, size as usize).context("getxattr")
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> FsResult<Vec<u8>> {
        let fd = self.xattr_target(ino)?;
        sys::xattr::list(fd.as_fd(), size as usize).context("listxattr")
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        let fd = self.xattr_target(ino)?;
        let c = sys::cname(name)?;
        sys::xattr::remove(fd.as_fd(), &c).context("removexattr")
    }

    /// ACCESS: mounted with default_permissions, the kernel checks modes
    /// itself.
    pub fn access(&self) -> FsResult<()> {
        Ok(())
    }

    /// IOCTL: every `ioctl` on a file of the mount arrives here, and
    /// programs make them in passing: Python asks `isatty` (TCGETS) at
    /// every `open()`. Regular files and directories answer none, exactly
    /// as the backing filesystem would for a terminal request.
    pub fn ioctl(&self) -> FsResult<()> {
        err(libc::ENOTTY)
    }

    /// POLL: ENOSYS tells the kernel, once per mount, to answer "always
    /// ready" itself, which is what regular files are.
    pub fn poll(&self) -> FsResult<()> {
        err(libc::ENOSYS)
    }
}
