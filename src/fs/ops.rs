//! `impl fuser::Filesystem`: one short method per kernel request, each
//! deciding only whether the name or node is managed and delegating.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use tracing::{debug, info};

use super::passthrough::rename_onto_managed;
use super::{Handle, NO_CACHE, PASSTHROUGH_TTL, TokenFs, VIEW_TTL, errno, sys, to_attr};
use super::{offload, request};
use crate::fs::managed::TMP_PREFIX;

/// Replies with an error, or runs the success path.
macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(e.into()),
        }
    };
}

fn answer(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    errno(&e)
}

/// Runs `f` with this thread's read buffer of `size` bytes. A forwarded
/// READ is up to 1 MiB; a fresh `Vec` per request would be mmap'd and
/// unmapped each time (it is above glibc's mmap threshold), and every
/// munmap of a multi-threaded process sends TLB-flush IPIs to the other
/// CPUs. Stale bytes past what `pread` fills are never sent.
fn read_into_scratch(size: usize, f: impl FnOnce(&mut [u8])) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|buf| {
        if buf.len() < size {
            buf.resize(size, 0);
        }
        f(&mut buf[..size]);
    });
}

impl fuser::Filesystem for TokenFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        request::mark();
        // DIRECT_IO_ALLOW_MMAP: writers and stale views use direct I/O, and
        // programs that mmap a config would otherwise get ENODEV.
        // ATOMIC_O_TRUNC: without it, open(O_TRUNC) arrives as a SETATTR
        // without a handle, indistinguishable from truncate(2) by path, and
        // readers would see the file empty until the writer closes.
        // HANDLE_KILLPRIV_V2: the kernel then stops asking for
        // security.capability before every write (once per inode instead),
        // and leaves clearing setuid/setgid bits to us (`drop_setid`).
        // TOKENFS_KILLPRIV=off leaves it to the kernel (to measure it).
        let mut wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if std::env::var_os("TOKENFS_KILLPRIV").is_some_and(|v| v == "off") {
            wanted.remove(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        }
        let granted = wanted & config.capabilities();
        let _ = config.add_capabilities(granted);
        let kill_priv = granted.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        self.kill_priv
            .store(kill_priv, std::sync::atomic::Ordering::Relaxed);
        // Kernel passthrough needs CAP_SYS_ADMIN to register backing files;
        // stack depth 2 lets the backing directory itself be on overlayfs
        // (as a container's root is).
        // TOKENFS_KERNEL_PASSTHROUGH=off forwards instead (to measure it).
        let allowed = std::env::var_os("TOKENFS_KERNEL_PASSTHROUGH").is_none_or(|v| v != "off");
        let passthrough = allowed
            && nix::unistd::geteuid().is_root()
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.kernel_passthrough
            .store(passthrough, std::sync::atomic::Ordering::Relaxed);
        self.info
            .kernel_passthrough
            .store(passthrough, std::sync::atomic::Ordering::Relaxed);
        info!(mount = %self.dir.display(), kernel_passthrough = passthrough, abi = %format!("{:?}", config.kernel_abi()), "mounted");
        Ok(())
    }

    fn destroy(&mut self) {
        request::mark();
        debug!(mount = %self.dir.display(), "session destroyed");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        request::mark();
        let p = tri!(reply, self.node(parent));
        if let Some(m) = self.managed.find(&p, name) {
            let v = tri!(
                reply,
                self.views.lookup(m, &self.inodes).ok_or(Errno::ENOENT)
            );
            let Some(st) = m.stat_of(&v.rendering) else {
                self.views.forget(v.id, 1);
                return reply.error(Errno::ENOENT);
            };
            // fuser sends the node id as st_ino here: attribute TTL 0 makes
            // the kernel ask GETATTR (the stable st_ino) before showing it.
            return reply.entry_with_ttls(&NO_CACHE, &VIEW_TTL, &to_attr(v.id, &st), Generation(0));
        }
        if self.managed.parents.contains(&p.key)
            && name.as_encoded_bytes().starts_with(TMP_PREFIX.as_bytes())
        {
            return reply.error(Errno::ENOENT);
        }
        self.reply_lookup(&p, name, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        request::mark();
        if !self.views.forget(ino.0, nlookup) {
            self.inodes.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        request::mark();
        if let Some(v) = self.views.get(ino.0) {
            let (st, ttl) = tri!(reply, self.view_stat(&v, req.pid(), fh));
            return reply.attr(&ttl, &to_attr(v.file.id, &st));
        }
        let node = tri!(reply, self.node(ino));
        let st = tri!(reply, sys::stat_fd(node.fd()).map_err(io_errno));
        reply.attr(&PASSTHROUGH_TTL, &to_attr(node.id, &st));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        request::mark();
        let change = super::passthrough::AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        if let Some(v) = self.views.get(ino.0) {
            tri!(reply, self.managed_setattr(&v.file, &change, fh));
            let (st, ttl) = tri!(reply, self.view_stat(&v, req.pid(), fh));
            return reply.attr(&ttl, &to_attr(v.file.id, &st));
        }
        let node = tri!(reply, self.node(ino));
        let st = tri!(
            reply,
            self.passthrough_setattr(&node, &change, fh, req.uid() != 0)
        );
        reply.attr(&PASSTHROUGH_TTL, &to_attr(node.id, &st));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        request::mark();
        let node = tri!(reply, self.node(ino));
        let target = tri!(reply, sys::readlink_fd(node.fd()).map_err(io_errno));
        reply.data(&target);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        request::mark();
        self.make_entry(req, parent, name, reply, |dir, c| {
            sys::mknod_at(dir, c, mode, rdev as libc::dev_t)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        request::mark();
        self.make_entry(req, parent, name, reply, |dir, c| {
            sys::mkdir_at(dir, c, mode)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        let p = tri!(reply, self.node(parent));
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        tri!(reply, sys::unlink_at(p.fd(), &c, 0).map_err(io_errno));
        if let Some(m) = self.managed.find(&p, name) {
            info!(file = %m.shown.display(), "managed file unlinked; it reappears when a program creates it");
            m.set_absent();
            self.views.retire(m);
        }
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        let p = tri!(reply, self.node(parent));
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        tri!(
            reply,
            sys::unlink_at(p.fd(), &c, libc::AT_REMOVEDIR).map_err(io_errno)
        );
        reply.ok();
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        request::mark();
        let t = tri!(reply, sys::cname(target.as_os_str()).map_err(io_errno));
        self.make_entry(req, parent, link_name, reply, |dir, c| {
            sys::symlink_at(&t, dir, c)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let p = tri!(reply, self.node(parent));
        let np = tri!(reply, self.node(newparent));
        let src = self.managed.find(&p, name).cloned();
        let dst = self.managed.find(&np, newname).cloned();
        if let (None, Some(dst)) = (&src, &dst) {
            // A program's atomic save: an fsynced save of our own.
            let (name, dst) = (name.to_owned(), dst.clone());
            let (views, inodes) = (self.views.clone(), self.inodes.clone());
            return offload::run(move || {
                let renamed = rename_onto_managed(&p, &name, &dst, flags, &views, &inodes);
                answer(reply, renamed)
            });
        }
        answer(
            reply,
            self.rename_any(&p, name, &np, newname, flags, (src, dst)),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        request::mark();
        if self.views.get(ino.0).is_some() {
            // A second name for a managed file would show its placeholders.
            return reply.error(Errno::EPERM);
        }
        let node = tri!(reply, self.node(ino));
        let np = tri!(reply, self.node(newparent));
        tri!(reply, self.not_managed_name(&np, newname));
        let c = tri!(reply, sys::cname(newname).map_err(io_errno));
        tri!(
            reply,
            sys::link_fd(node.fd(), np.fd(), &c).map_err(io_errno)
        );
        self.reply_entry(&np, newname, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        request::mark();
        if let Some(v) = self.views.get(ino.0) {
            let (fh, open_flags) = tri!(reply, self.open_view(&v, flags.0, req.pid()));
            return reply.opened(FileHandle(fh), open_flags);
        }
        let node = tri!(reply, self.node(ino));
        let file = tri!(
            reply,
            sys::reopen(node.fd(), flags.0).map_err(|e| self.fd_errno(e))
        );
        if flags.0 & libc::O_TRUNC != 0 && req.uid() != 0 {
            self.drop_setid(file.as_fd());
        }
        let (fh, open_flags, backing) =
            self.open_plain(&node, file, flags.0, |f| reply.open_backing(f));
        match backing {
            Some(id) => reply.opened_passthrough(fh, open_flags, &id),
            None => reply.opened(fh, open_flags),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        match &*h {
            Handle::Managed(mh) => mh.read(offset, size, |bytes| reply.data(bytes)),
            Handle::File { file, .. } => {
                read_into_scratch(size as usize, |buf| match sys::pread(file, buf, offset) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(e) => reply.error(errno(&e)),
                })
            }
            Handle::Dir(_) => reply.error(Errno::EISDIR),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        match &*h {
            Handle::Managed(mh) => {
                let len = tri!(reply, mh.write(offset, data));
                mh.file.track_size(fh.0, len);
                reply.written(data.len() as u32);
            }
            Handle::File { file, .. } => {
                let n = tri!(reply, sys::pwrite(file, data, offset).map_err(io_errno));
                if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                    self.drop_setid(file.as_fd());
                }
                reply.written(n as u32);
            }
            Handle::Dir(_) => reply.error(Errno::EISDIR),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        if let Handle::Managed(mh) = &*h {
            // close() waits for flush but not for release: when the opening
            // thread closes, forget the handle's size now, so its next fstat
            // is not answered with this one's. (A forked child closing its
            // inherited copy also flushes; that must not count.)
            mh.file.track_close(fh.0, req.pid());
            if mh.write.is_some() {
                let views = self.views.clone();
                return offload::run(move || {
                    if let Handle::Managed(mh) = &*h {
                        answer(reply, mh.save(&views));
                    }
                });
            }
        }
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let h = self.handles.lock().remove(&fh.0);
        let Some(h) = h else {
            return reply.ok();
        };
        let Handle::Managed(mh) = &*h else {
            return reply.ok();
        };
        // A cached reader was never tracked and has nothing to commit.
        if let Some(v) = &mh.cached {
            v.released_cached();
            return reply.ok();
        }
        mh.file.track_release(fh.0);
        if mh.write.is_none() {
            return reply.ok();
        }
        // Normally flush already saved; this catches writers that never
        // flushed (e.g. through an mmap).
        let views = self.views.clone();
        offload::run(move || {
            if let Handle::Managed(mh) = &*h {
                if let Err(e) = mh.save(&views) {
                    tracing::error!(file = %mh.file.shown.display(), "write lost at close: {:?}", e);
                }
            }
            reply.ok();
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        let views = self.views.clone();
        offload::run(move || {
            let synced = match &*h {
                Handle::Managed(mh) => mh.save(&views),
                Handle::File { file, .. } if datasync => file.sync_data().map_err(io_errno),
                Handle::File { file, .. } => file.sync_all().map_err(io_errno),
                Handle::Dir(d) => d.lock().sync_all().map_err(io_errno),
            };
            answer(reply, synced);
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        request::mark();
        let node = tri!(reply, self.node(ino));
        let dir = tri!(
            reply,
            sys::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_errno)
        );
        let fh = self.add_handle(Handle::Dir(parking_lot::Mutex::new(dir)));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        request::mark();
        let node = tri!(reply, self.node(ino));
        let h = tri!(reply, self.handle(fh));
        let Handle::Dir(dir) = &*h else {
            return reply.error(Errno::ENOTDIR);
        };
        self.list_dir(&node, &dir.lock(), offset, reply);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        request::mark();
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        offload::run(move || match &*h {
            Handle::Dir(d) => answer(reply, d.lock().sync_all().map_err(io_errno)),
            _ => reply.ok(),
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        request::mark();
        let root = tri!(reply, self.node(INodeNo(super::inode::ROOT_ID)));
        let s = tri!(reply, sys::statvfs_fd(root.fd()).map_err(io_errno));
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let fd = tri!(reply, self.xattr_target(ino));
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        tri!(
            reply,
            sys::xattr::set(std::os::fd::AsFd::as_fd(&fd), &c, value, flags).map_err(io_errno)
        );
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        request::mark();
        let fd = tri!(reply, self.xattr_target(ino));
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        let v = tri!(
            reply,
            sys::xattr::get(std::os::fd::AsFd::as_fd(&fd), &c, size as usize).map_err(io_errno)
        );
        if size == 0 {
            reply.size(v.len() as u32)
        } else {
            reply.data(&v)
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        request::mark();
        let fd = tri!(reply, self.xattr_target(ino));
        let v = tri!(
            reply,
            sys::xattr::list(std::os::fd::AsFd::as_fd(&fd), size as usize).map_err(io_errno)
        );
        if size == 0 {
            reply.size(v.len() as u32)
        } else {
            reply.data(&v)
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        let fd = tri!(reply, self.xattr_target(ino));
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        tri!(
            reply,
            sys::xattr::remove(std::os::fd::AsFd::as_fd(&fd), &c).map_err(io_errno)
        );
        reply.ok();
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        request::mark();
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        request::mark();
        let p = tri!(reply, self.node(parent));
        if let Some(m) = self.managed.find(&p, name).cloned() {
            let (v, fh, st) = tri!(reply, self.create_managed(&m, mode, flags, req.pid()));
            // The creator writes through direct I/O; the name is looked up
            // again next time (entry TTL 0), finding the view of what it saved.
            return reply.created(
                &NO_CACHE,
                &to_attr(v.id, &st),
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            );
        }
        let c = tri!(reply, sys::cname(name).map_err(io_errno));
        tri!(reply, self.fd_room().map_err(|e| self.fd_errno(e)));
        let fd = tri!(
            reply,
            sys::open_at(p.fd(), &c, flags | libc::O_CREAT, mode).map_err(|e| self.fd_errno(e))
        );
        self.chown_to_caller(req, &p, name);
        let (node, st) = tri!(reply, self.remember(&p, name).map_err(|e| self.fd_errno(e)));
        let file = std::fs::File::from(fd);
        let ttl = self.entry_ttl(&p, Some(&st));
        let (fh, open_flags, backing) =
            self.open_plain(&node, file, flags, |f| reply.open_backing(f));
        let attr = to_attr(node.id, &st);
        match backing {
            Some(id) => reply.created_passthrough(&ttl, &attr, Generation(0), fh, open_flags, &id),
            None => reply.created(&ttl, &attr, Generation(0), fh, open_flags),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        let Handle::File { file, .. } = &*h else {
            return reply.error(Errno::EOPNOTSUPP);
        };
        if req.uid() != 0 {
            self.drop_setid(file.as_fd());
        }
        offload::run(move || {
            if let Handle::File { file, .. } = &*h {
                let r = sys::fallocate(file, mode, offset, length).map_err(io_errno);
                answer(reply, r);
            }
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        request::mark();
        let h = tri!(reply, self.handle(fh));
        let file = match &*h {
            Handle::File { file, .. } => file,
            // A rendering has no holes: data up to its end, then EOF
            // (what `cp` asks through SEEK_DATA/SEEK_HOLE).
            Handle::Managed(mh) => {
                let len = mh.len() as i64;
                return match whence {
                    _ if offset < 0 => reply.error(Errno::EINVAL),
                    _ if offset >= len => reply.error(Errno::ENXIO),
                    libc::SEEK_DATA => reply.offset(offset),
                    libc::SEEK_HOLE => reply.offset(len),
                    _ => reply.error(Errno::EINVAL),
                };
            }
            Handle::Dir(_) => return reply.error(Errno::EINVAL),
        };
        let off = tri!(reply, sys::lseek(file, offset, whence).map_err(io_errno));
        reply.offset(off);
    }

    /// Every `ioctl` on a file of the mount arrives here, and programs make
    /// them in passing: Python asks `isatty` (TCGETS) at every `open()`.
    /// Regular files and directories answer none, exactly as the backing
    /// filesystem would for a terminal request; fuser's default would log a
    /// warning per call (the kernel does not remember a refusal).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        request::mark();
        reply.error(Errno::ENOTTY);
    }

    /// `poll`/`select` on a file: ENOSYS tells the kernel, once per mount,
    /// to answer "always ready" itself, which is what regular files are.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        request::mark();
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        request::mark();
        let src = tri!(reply, self.handle(fh_in));
        let dst = tri!(reply, self.handle(fh_out));
        if !matches!((&*src, &*dst), (Handle::File { .. }, Handle::File { .. })) {
            // Managed files: let the kernel fall back to read + write.
            return reply.error(Errno::EXDEV);
        }
        offload::run(move || {
            if let (Handle::File { file: s, .. }, Handle::File { file: d, .. }) = (&*src, &*dst) {
                match sys::copy_file_range(s, offset_in, d, offset_out, len) {
                    Ok(n) => reply.written(n as u32),
                    Err(e) => reply.error(errno(&e)),
                }
            }
        });
    }
}
