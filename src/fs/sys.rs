//! Thin, safe wrappers over the fd-relative syscalls the passthrough needs.
//!
//! Every operation on the hidden original directory goes through an fd the
//! daemon opened *before* mounting (or one derived from it). Touching the mount
//! path itself would re-enter our own filesystem and deadlock. `O_PATH` fds are
//! turned back into real files through `/proc/self/fd/N`, as libfuse's
//! `passthrough_hp` and virtiofsd do.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Converts a libc return value into `io::Result`, reading `errno` on -1.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A file name as a C string. Names from the kernel never contain NUL, but a
/// config could; that is an `EINVAL`, not a panic.
pub fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: the magic link that reopens an `O_PATH` fd.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    stat_at(fd, EMPTY, libc::AT_EMPTY_PATH)
}

pub fn stat_name(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    stat_at(dir, name, 0)
}

fn stat_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid fd and NUL-terminated name; `st` is written on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    let fd = cvt(fd)?;
    // SAFETY: the syscall just returned this new fd; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `name` in `dir` without following a final symlink.
pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and C string.
    owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        )
    })
}

/// An `O_PATH` handle on a directory by absolute path: the mount dir,
/// opened before the mount hides what is under it.
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cname(path.as_os_str())?;
    // SAFETY: valid C string.
    owned(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// An `O_PATH` handle: names an inode without opening it for I/O.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH, 0)
}

/// Opens a real file from an `O_PATH` fd.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<File> {
    let path = proc_path(fd);
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW))
        | libc::O_CLOEXEC;
    // SAFETY: valid C string.
    owned(unsafe { libc::open(path.as_ptr(), flags) }).map(File::from)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is writable for its length.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: valid fds and C strings.
    cvt(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Hard-links the inode behind an `O_PATH` fd as `dir/name`.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid fds and C strings.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            path.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn chmod_fd(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: valid fd; -1 (u32::MAX) leaves an id unchanged.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn truncate_fd(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: valid C string.
    cvt(unsafe { libc::truncate(path.as_ptr(), size as libc::off_t) }).map(drop)
}

/// Sets times on the inode behind an `O_PATH` fd (symlinks included).
pub fn utimens_fd(
    fd: BorrowedFd<'_>,
    times: &[libc::timespec; 2],
    is_symlink: bool,
) -> io::Result<()> {
    // SAFETY: valid fd/C strings; times points at two timespecs.
    let ret = if is_symlink {
        unsafe {
            libc::utimensat(
                fd.as_raw_fd(),
                EMPTY.as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        }
    } else {
        let path = proc_path(fd);
        unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }
    };
    cvt(ret).map(drop)
}

pub fn statvfs_fd(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd; st written on success.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded.
    Ok(unsafe { st.assume_init() })
}

pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    // pwrite on an O_APPEND fd appends whatever the offset, which is the
    // semantics the writer asked for.
    std::os::unix::fs::FileExt::write_at(file, buf, offset)
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<usize> {
    let mut so = src_off as libc::loff_t;
    let mut d = dst_off as libc::loff_t;
    // SAFETY: valid fds and offsets owned by this frame.
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut so,
            dst.as_raw_fd(),
            &mut d,
            len as usize,
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Extended attributes, through the `/proc/self/fd` path of an `O_PATH` fd.
pub mod xattr {
    use super::*;

    /// Calls a size-probing xattr syscall: with `size` 0 it returns a buffer
    /// of the needed length (zeroed), as the FUSE reply for a size query.
    fn sized(
        size: usize,
        call: impl FnOnce(*mut libc::c_void, usize) -> isize,
    ) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; size];
        let n = call(buf.as_mut_ptr().cast(), size);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.resize(n as usize, 0);
        Ok(buf)
    }

    pub fn get(fd: BorrowedFd<'_>, name: &CStr, size: usize) -> io::Result<Vec<u8>> {
        let path = proc_path(fd);
        // SAFETY: the buffer is writable for `size` bytes.
        sized(size, |buf, len| unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), buf, len)
        })
    }

    pub fn list(fd: BorrowedFd<'_>, size: usize) -> io::Result<Vec<u8>> {
        let path = proc_path(fd);
        // SAFETY: the buffer is writable for `size` bytes.
        sized(size, |buf, len| unsafe {
            libc::listxattr(path.as_ptr(), buf.cast(), len)
        })
    }

    pub fn set(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
        let path = proc_path(fd);
        // SAFETY: value readable for its length.
        cvt(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })
        .map(drop)
    }

    pub fn remove(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        let path = proc_path(fd);
        // SAFETY: valid C strings.
        cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
    }
}

/// One directory entry from `getdents64`.
pub struct DirEntry {
    pub ino: u64,
    /// Opaque position of the *next* entry, for `lseek` on the directory.
    pub next_offset: i64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// Reads directory entries starting at `offset` (0 = the beginning).
///
/// Seeks first, so each FUSE `readdir` call is independent of the last; the
/// caller serialises calls on one directory handle.
pub fn read_dir(dir: &File, offset: i64, mut each: impl FnMut(DirEntry) -> bool) -> io::Result<()> {
    lseek(dir, offset, libc::SEEK_SET)?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf writable for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(());
        }
        let mut pos = 0usize;
        let n = n as usize;
        while pos + 19 <= n {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let field = |at: usize, len: usize| buf.get(pos + at..pos + at + len);
            let (Some(ino), Some(off), Some(reclen), Some(kind)) =
                (field(0, 8), field(8, 8), field(16, 2), field(18, 1))
            else {
                return Ok(());
            };
            let ino = u64::from_ne_bytes(ino.try_into().unwrap_or([0; 8]));
            let off = i64::from_ne_bytes(off.try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes(reclen.try_into().unwrap_or([0; 2])) as usize;
            let kind = kind[0];
            let name_bytes = buf.get(pos + 19..pos + reclen.max(19)).unwrap_or(&[]);
            let name_len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let entry = DirEntry {
                ino,
                next_offset: off,
                kind,
                name: name_bytes[..name_len].to_vec(),
            };
            if reclen == 0 {
                return Ok(());
            }
            pos += reclen;
            if !each(entry) {
                return Ok(());
            }
        }
    }
}

/// The daemon's effective uid and gid, which never change while it runs
/// (asked on every create, to decide whether to give the file away).
pub fn euid() -> u32 {
    static EUID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *EUID.get_or_init(|| nix::unistd::geteuid().as_raw())
}

pub fn egid() -> u32 {
    static EGID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *EGID.get_or_init(|| nix::unistd::getegid().as_raw())
}

/// How many fds the inode table and open handles may hold: the open file
/// limit less a reserve for everything else (saves of managed files, the
/// control socket, logs), so running out fails lookups, never a save.
static FD_BUDGET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(usize::MAX);

pub fn set_fd_limit(limit: u64) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let reserve = (limit / 4).min(256);
    FD_BUDGET.store(
        limit.saturating_sub(reserve),
        std::sync::atomic::Ordering::Relaxed,
    );
}

pub fn fd_budget() -> usize {
    FD_BUDGET.load(std::sync::atomic::Ordering::Relaxed)
}

/// An all-zero `stat` (a file that does not exist yet).
pub fn zeroed_stat() -> libc::stat {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// `flock(fd, op)`; `EWOULDBLOCK` comes back as an error with `LOCK_NB`.
pub fn flock(fd: BorrowedFd<'_>, op: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd, integer flags.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

/// Keeps glibc's mmap threshold fixed (see `daemon::fix_mmap_threshold`).
pub fn set_mmap_threshold(bytes: libc::c_int) {
    // SAFETY: mallopt takes two integers.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
}

/// No core dumps and no ptrace by the same uid.
pub fn set_undumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map(drop)
}

/// Locks memory as it is touched (`MCL_ONFAULT`: reserved buffers are not
/// faulted in), so secrets never reach swap.
pub fn lock_memory() -> io::Result<()> {
    // SAFETY: flags only.
    cvt(unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) })
        .map(drop)
}
