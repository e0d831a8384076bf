//! What the core needs from the kernel, and who asks.
//!
//! The core never sees a fuser request or reply: a request comes with a
//! [`Caller`], and the kernel services it uses (invalidating a name or a
//! node's attributes, registering a backing file for kernel passthrough)
//! sit behind these traits. The adapter implements them with fuser's
//! notifier and replies; tests implement them with a recorder, so the core
//! runs in `cargo test` without root or `/dev/fuse`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;

/// Who made a request (the kernel's view of the calling thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The calling thread's id: `fstat` of a managed file arrives without a
    /// handle, and the thread tells which rendering it holds.
    pub pid: u32,
}

impl Caller {
    /// Whether the kernel would let this caller keep setuid/setgid bits on
    /// a file it writes (only root may).
    pub fn privileged(&self) -> bool {
        self.uid == 0
    }
}

/// The session-wide kernel services: cache invalidations. Both may block
/// on the kernel; the core never calls them from inside a request (see
/// `request`).
pub trait Kernel: Send + Sync + 'static {
    /// A registered backing file (fuser's `BackingId`): held by every
    /// kernel-passthrough handle of an inode, released when the last goes.
    type Backing: Send + Sync + 'static;

    /// Drops the kernel's cached `parent`/`name` → node mapping.
    fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()>;

    /// Drops the kernel's cached attributes of node `ino`, never its pages
    /// (a view's old handles still read them).
    fn inval_inode(&self, ino: u64) -> io::Result<()>;
}

/// Registers a file for kernel passthrough. fuser (0.18) can do that only
/// through the reply of the OPEN or CREATE being answered, so this is
/// passed per request rather than held by the core.
pub trait OpenBacking<B> {
    fn open_backing(&self, file: &File) -> io::Result<B>;
}
