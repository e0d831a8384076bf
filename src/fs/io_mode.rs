//! How the opens of a plain (passthrough) file do their I/O.
//!
//! Two ways, chosen per open but kept the same for all opens of one inode at
//! a time (the kernel fails an open with EIO otherwise):
//! - **kernel passthrough**: reads and writes go from the kernel straight to
//!   the backing file and never reach the daemon. Best for anything written
//!   or large. But every passthrough read marks the node's atime stale, so
//!   the `fstat` that readers make after reading (Node, Python, Rust's
//!   `read_to_end`) costs a GETATTR round trip.
//! - **cached**: reads and writes go through the daemon and the kernel's page
//!   cache of the node, which stays right across opens because every change
//!   arrives through this mount. A small file read again and again (a CLI's
//!   own config) is then served from the page cache: one OPEN, no READ, no
//!   GETATTR. Also the only way when the kernel refuses passthrough.
//!
//! A passthrough open drops the node's pages (it never asks to keep them),
//! and none can be cached while it is open, so the page cache never goes
//! stale behind a passthrough writer.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tracing::warn;

/// Read-only opens of files up to this size go through the page cache.
pub const SMALL_FILE: u64 = 1 << 20;

/// Held by every cached open of an inode: while one lives, the inode's opens
/// must stay cached.
pub struct CachedUse;

/// The I/O of one open; held by its handle, it keeps the inode's mode.
/// `B`: the kernel's registered backing file (see `kernel::Kernel`).
pub enum Io<B> {
    Passthrough(Arc<B>),
    Cached(#[allow(dead_code)] Arc<CachedUse>),
}

/// What this open would do best if the inode had no other open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Passthrough,
    Cached,
}

struct Modes<B> {
    /// One backing file per inode, shared by its passthrough opens (the
    /// kernel refuses a second one while the first is in use).
    backing: HashMap<u64, Weak<B>>,
    cached: HashMap<u64, Weak<CachedUse>>,
}

/// The I/O mode of every open plain file of one mount, by node id.
pub struct IoModes<B> {
    modes: Mutex<Modes<B>>,
}

impl<B> Default for IoModes<B> {
    fn default() -> Self {
        IoModes {
            modes: Mutex::new(Modes {
                backing: HashMap::new(),
                cached: HashMap::new(),
            }),
        }
    }
}

impl<B> IoModes<B> {
    /// The I/O of a new open of node `id`: whatever the inode's open handles
    /// already use, else what `want` says (asked only then: it may `fstat`).
    /// `register` makes the backing file for a first passthrough open; if
    /// the kernel refuses it, the open is cached.
    pub fn choose(
        &self,
        id: u64,
        want: impl FnOnce() -> Want,
        register: impl FnOnce() -> io::Result<B>,
    ) -> Io<B> {
        let mut m = self.modes.lock();
        if let Some(b) = m.backing.get(&id).and_then(Weak::upgrade) {
            return Io::Passthrough(b);
        }
        if let Some(c) = m.cached.get(&id).and_then(Weak::upgrade) {
            return Io::Cached(c);
        }
        if want() == Want::Passthrough {
            match register() {
                Ok(b) => {
                    let b = Arc::new(b);
                    m.backing.retain(|_, w| w.strong_count() > 0);
                    m.backing.insert(id, Arc::downgrade(&b));
                    return Io::Passthrough(b);
                }
                Err(e) => {
                    warn!("kernel passthrough refused ({e}); this file goes through the daemon")
                }
            }
        }
        let c = Arc::new(CachedUse);
        m.cached.retain(|_, w| w.strong_count() > 0);
        m.cached.insert(id, Arc::downgrade(&c));
        Io::Cached(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    #[test]
    fn an_inode_keeps_one_mode_while_it_has_opens() {
        let modes = IoModes::<()>::default();
        let first = modes.choose(7, || Want::Cached, refused);
        assert!(matches!(first, Io::Cached(_)));
        // A writer arriving while a cached reader is open stays cached
        // (registering would be refused by the kernel anyway).
        let second = modes.choose(7, || Want::Passthrough, || panic!("must not register"));
        assert!(matches!(second, Io::Cached(_)));
        drop((first, second));
        // With no open left, the next open chooses afresh; a refusal of the
        // backing file falls back to cached.
        let mut asked = false;
        let third = modes.choose(
            7,
            || Want::Passthrough,
            || {
                asked = true;
                refused()
            },
        );
        assert!(asked && matches!(third, Io::Cached(_)));
    }
}
