//! `impl fuser::Filesystem`: the adapter. Each callback marks its thread as
//! a request thread, calls the core once and replies, or reports the error:
//! the one place where a failed request is logged (op, node, errno, at the
//! error's level) and, when it is the daemon's failure, recorded in
//! `status`. No policy lives here.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyPoll,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, info, warn};

use super::error::{FsError, Level};
use super::kernel::{Caller, Kernel, OpenBacking};
use super::view::Views;
use super::{AttrChange, DirSink, Entry, MountInfo, Step, TokenFs, managed, offload, request};

/// The FUSE session as the core's kernel: invalidations go through its
/// notifier, set once the session exists (before that the kernel has
/// nothing cached).
#[derive(Default)]
pub struct FuseKernel {
    notifier: OnceLock<Notifier>,
}

impl Kernel for FuseKernel {
    type Backing = BackingId;

    fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        match self.notifier.get() {
            Some(n) => n.inval_entry(INodeNo(parent), name),
            None => Ok(()),
        }
    }

    fn inval_inode(&self, ino: u64) -> io::Result<()> {
        match self.notifier.get() {
            // Offset -1: the attributes only, never the pages.
            Some(n) => n.inval_inode(INodeNo(ino), -1, 0),
            None => Ok(()),
        }
    }
}

impl Views<FuseKernel> {
    /// Hands the session's notifier to the kernel the views invalidate
    /// through (once the session exists).
    pub fn set_notifier(&self, notifier: Notifier) {
        let _ = self.kernel.notifier.set(notifier);
    }
}

/// An OPEN or CREATE reply registers backing files (fuser offers it there).
struct Backer<'a, R>(&'a R);

impl OpenBacking<BackingId> for Backer<'_, ReplyOpen> {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        self.0.open_backing(file)
    }
}

impl OpenBacking<BackingId> for Backer<'_, ReplyCreate> {
    fn open_backing(&self, file: &File) -> io::Result<BackingId> {
        self.0.open_backing(file)
    }
}

/// Every reply can carry an errno.
trait Fail {
    fn fail_with(self, e: Errno);
}

macro_rules! fail_impl {
    ($($t:ty),*) => {
        $(impl Fail for $t {
            fn fail_with(self, e: Errno) {
                self.error(e)
            }
        })*
    };
}

fail_impl!(
    ReplyEmpty,
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyOpen,
    ReplyWrite,
    ReplyCreate,
    ReplyDirectory,
    ReplyStatfs,
    ReplyXattr,
    ReplyLseek,
    ReplyIoctl,
    ReplyPoll
);

/// Logs a failed request once, at its level; one at `Warn` is also the
/// mount's last error in `status` (a repeat of the same failure within a
/// minute is recorded but not logged again: a full fd table fails every
/// lookup).
pub(super) fn report(info: &MountInfo, op: &'static str, ino: u64, e: &FsError) {
    match e.level {
        Level::Debug => {
            debug!(mount = %info.dir.display(), op, ino, errno = e.errno, "{e}")
        }
        Level::Warn => {
            if info.note_error(e.errno, &e.message, format!("{op}: {e}")) {
                warn!(mount = %info.dir.display(), op, ino, errno = e.errno, "{e}");
            }
        }
    }
}

fn fail(info: &MountInfo, op: &'static str, ino: u64, e: FsError, reply: impl Fail) {
    report(info, op, ino, &e);
    reply.fail_with(Errno::from_i32(e.errno));
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn fh(fh: Option<FileHandle>) -> Option<u64> {
    fh.map(|f| f.0)
}

fn file_type(mode: libc::mode_t) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dirent_type(t: u8) -> FileType {
    match t {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn to_attr(id: u64, st: &libc::stat) -> FileAttr {
    let t = managed::to_time;
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: t(st.st_atime, st.st_atime_nsec),
        mtime: t(st.st_mtime, st.st_mtime_nsec),
        ctime: t(st.st_ctime, st.st_ctime_nsec),
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The kernel's directory reply buffer as the core's listing sink.
struct DirReply(ReplyDirectory);

impl DirSink for DirReply {
    fn add(&mut self, ino: u64, next_offset: u64, t: u8, name: &OsStr) -> bool {
        self.0.add(INodeNo(ino), next_offset, dirent_type(t), name)
    }
}

impl TokenFs<FuseKernel> {
    fn reply_entry(
        &self,
        op: &'static str,
        ino: u64,
        r: Result<Entry, FsError>,
        reply: ReplyEntry,
    ) {
        match r {
            Ok(e) => reply.node_entry(
                INodeNo(e.id),
                &e.attr_ttl,
                &e.entry_ttl,
                &to_attr(e.ino, &e.stat),
                Generation(0),
            ),
            Err(e) => fail(&self.info, op, ino, e, reply),
        }
    }

    fn reply_empty(&self, op: &'static str, ino: u64, r: Result<(), FsError>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => fail(&self.info, op, ino, e, reply),
        }
    }

    fn reply_xattr(
        &self,
        op: &'static str,
        ino: u64,
        size: u32,
        r: Result<Vec<u8>, FsError>,
        reply: ReplyXattr,
    ) {
        match r {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => fail(&self.info, op, ino, e, reply),
        }
    }

    /// Answers a request that may wait on the disk: now, or from an
    /// offload worker once the work is done (the kernel matches replies by
    /// request id, so any thread may send it).
    fn finish<T: Send + 'static, R: Fail + Send + 'static>(
        &self,
        (op, ino): (&'static str, u64),
        step: Result<Step<T>, FsError>,
        reply: R,
        ok: impl FnOnce(R, T) + Send + 'static,
    ) {
        match step {
            Ok(Step::Done(v)) => ok(reply, v),
            Ok(Step::Later(job)) => {
                let info = self.info.clone();
                offload::run(move || match job() {
                    Ok(v) => ok(reply, v),
                    Err(e) => fail(&info, op, ino, e, reply),
                });
            }
            Err(e) => fail(&self.info, op, ino, e, reply),
        }
    }
}

impl fuser::Filesystem for TokenFs<FuseKernel> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        request::mark();
        let n = self.negotiate(config.capabilities());
        let _ = config.add_capabilities(n.capabilities);
        // Stack depth 2 lets the backing directory itself be on overlayfs
        // (as a container's root is).
        let passthrough = n.try_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.started(passthrough);
        info!(mount = %self.dir.display(), kernel_passthrough = passthrough, abi = %format!("{:?}", config.kernel_abi()), "mounted");
        Ok(())
    }

    fn destroy(&mut self) {
        request::mark();
        debug!(mount = %self.dir.display(), "session destroyed");
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        request::mark();
        self.reply_entry("lookup", parent.0, self.lookup(parent.0, name), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        request::mark();
        TokenFs::forget(self, ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, f: Option<FileHandle>, reply: ReplyAttr) {
        request::mark();
        match TokenFs::getattr(self, &caller(req), ino.0, fh(f)) {
            Ok(a) => reply.attr(&a.ttl, &to_attr(a.id, &a.stat)),
            Err(e) => fail(&self.info, "getattr", ino.0, e, reply),
        }
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
        f: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        request::mark();
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match TokenFs::setattr(self, &caller(req), ino.0, &change, fh(f)) {
            Ok(a) => reply.attr(&a.ttl, &to_attr(a.id, &a.stat)),
            Err(e) => fail(&self.info, "setattr", ino.0, e, reply),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        request::mark();
        match TokenFs::readlink(self, ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => fail(&self.info, "readlink", ino.0, e, reply),
        }
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
        let r = TokenFs::mknod(self, &caller(req), parent.0, name, mode, rdev);
        self.reply_entry("mknod", parent.0, r, reply);
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
        let r = TokenFs::mkdir(self, &caller(req), parent.0, name, mode);
        self.reply_entry("mkdir", parent.0, r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        self.reply_empty(
            "unlink",
            parent.0,
            TokenFs::unlink(self, parent.0, name),
            reply,
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        self.reply_empty(
            "rmdir",
            parent.0,
            TokenFs::rmdir(self, parent.0, name),
            reply,
        );
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
        let r = TokenFs::symlink(self, &caller(req), parent.0, link_name, target);
        self.reply_entry("symlink", parent.0, r, reply);
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
        let step = TokenFs::rename(self, parent.0, name, newparent.0, newname, flags);
        self.finish(("rename", parent.0), step, reply, |r, ()| r.ok());
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
        let r = TokenFs::link(self, ino.0, newparent.0, newname);
        self.reply_entry("link", ino.0, r, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        request::mark();
        match TokenFs::open(self, &caller(req), ino.0, flags.0, &Backer(&reply)) {
            Ok(o) => match &o.backing {
                Some(id) => reply.opened_passthrough(FileHandle(o.fh), o.flags, id),
                None => reply.opened(FileHandle(o.fh), o.flags),
            },
            Err(e) => fail(&self.info, "open", ino.0, e, reply),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        request::mark();
        // The reply goes into the core's callback on success, and is still
        // here if it failed before calling it.
        let mut slot = Some(reply);
        let r = TokenFs::read(self, f.0, offset, size, |bytes| {
            if let Some(reply) = slot.take() {
                reply.data(bytes)
            }
        });
        if let (Err(e), Some(reply)) = (r, slot.take()) {
            fail(&self.info, "read", ino.0, e, reply);
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        request::mark();
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match TokenFs::write(self, f.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => fail(&self.info, "write", ino.0, e, reply),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        f: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let step = TokenFs::flush(self, &caller(req), f.0);
        self.finish(("flush", ino.0), step, reply, |r, ()| r.ok());
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let step = TokenFs::release(self, f.0);
        self.finish(("release", ino.0), Ok(step), reply, |r, ()| r.ok());
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let step = TokenFs::fsync(self, f.0, datasync);
        self.finish(("fsync", ino.0), step, reply, |r, ()| r.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        request::mark();
        match TokenFs::opendir(self, ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => fail(&self.info, "opendir", ino.0, e, reply),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        request::mark();
        let mut sink = DirReply(reply);
        match TokenFs::readdir(self, ino.0, f.0, offset, &mut sink) {
            Ok(()) => sink.0.ok(),
            Err(e) => fail(&self.info, "readdir", ino.0, e, sink.0),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        f: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        request::mark();
        TokenFs::releasedir(self, f.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let step = TokenFs::fsyncdir(self, f.0);
        self.finish(("fsyncdir", ino.0), step, reply, |r, ()| r.ok());
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        request::mark();
        match TokenFs::statfs(self) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => fail(&self.info, "statfs", ino.0, e, reply),
        }
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
        let r = TokenFs::setxattr(self, ino.0, name, value, flags);
        self.reply_empty("setxattr", ino.0, r, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        request::mark();
        let r = TokenFs::getxattr(self, ino.0, name, size);
        self.reply_xattr("getxattr", ino.0, size, r, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        request::mark();
        let r = TokenFs::listxattr(self, ino.0, size);
        self.reply_xattr("listxattr", ino.0, size, r, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        request::mark();
        let r = TokenFs::removexattr(self, ino.0, name);
        self.reply_empty("removexattr", ino.0, r, reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        request::mark();
        self.reply_empty("access", ino.0, TokenFs::access(self), reply);
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
        let r = TokenFs::create(
            self,
            &caller(req),
            parent.0,
            name,
            (mode, flags),
            &Backer(&reply),
        );
        match r {
            Ok(c) => {
                let (e, o) = (&c.entry, &c.open);
                let (attr, fh) = (to_attr(e.ino, &e.stat), FileHandle(o.fh));
                match &o.backing {
                    Some(id) => reply.created_passthrough(
                        &e.entry_ttl,
                        &attr,
                        Generation(0),
                        fh,
                        o.flags,
                        id,
                    ),
                    None => reply.created_node(
                        INodeNo(e.id),
                        &e.entry_ttl,
                        &attr,
                        Generation(0),
                        fh,
                        o.flags,
                    ),
                }
            }
            Err(e) => fail(&self.info, "create", parent.0, e, reply),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        f: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        request::mark();
        let step = TokenFs::fallocate(self, &caller(req), f.0, (offset, length), mode);
        self.finish(("fallocate", ino.0), step, reply, |r, ()| r.ok());
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        f: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        request::mark();
        match TokenFs::lseek(self, f.0, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => fail(&self.info, "lseek", ino.0, e, reply),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        request::mark();
        if let Err(e) = TokenFs::ioctl(self) {
            fail(&self.info, "ioctl", ino.0, e, reply);
        }
    }

    fn poll(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        request::mark();
        if let Err(e) = TokenFs::poll(self) {
            fail(&self.info, "poll", ino.0, e, reply);
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
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
        let step =
            TokenFs::copy_file_range(self, (fh_in.0, offset_in), (fh_out.0, offset_out), len);
        self.finish(("copy_file_range", ino_in.0), step, reply, |r, n| {
            r.written(n)
        });
    }
}
