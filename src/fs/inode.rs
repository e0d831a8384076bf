//! The node table: every FUSE node id the kernel knows, each either a plain
//! node (an inode of the hidden original directory) or a view (one
//! rendering of a managed file, see `view`), under one lock with one lookup
//! count. A rename onto or away from a managed file changes an entry's kind
//! in place, so no request ever sees an id in neither state.
//!
//! Each known inode is held by one `O_PATH` fd, keyed by `(st_dev, st_ino)`,
//! as virtiofsd and libfuse's `passthrough_hp` do, instead of by path: a
//! directory renamed while in use stays correct, and holding the fd keeps the
//! inode allocated, so its number cannot be reused while the kernel knows it.
//!
//! Node ids are the backing inode numbers where that is unambiguous (same
//! device as the mount root), so `stat` and `readdir` agree on `st_ino`.
//! Managed files and inodes on other devices get synthetic ids from a range
//! real filesystems do not use.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::view::View;

pub const ROOT_ID: u64 = 1;
/// Start of the synthetic id range.
const SYNTHETIC_BASE: u64 = 1 << 62;

/// One inode of the backing directory tree that the kernel knows about.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    fd: OwnedFd,
    pub key: (u64, u64),
    /// `S_IFMT` bits of the inode (a node never changes type).
    pub kind: libc::mode_t,
    /// The kernel's page cache of this node may hold another file's bytes:
    /// the node id was a managed file's view (its rendering) until a rename.
    /// The next cached open drops the pages.
    pub pages_stale: AtomicBool,
}

/// Nodes alive in the whole daemon (each holds an fd), for the fd budget.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// How many nodes, over every mount, hold an fd now.
pub fn live_nodes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

impl Drop for Node {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    fn new(id: u64, fd: OwnedFd, key: (u64, u64), kind: libc::mode_t, pages_stale: bool) -> Node {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Node {
            id,
            fd,
            key,
            kind,
            pages_stale: AtomicBool::new(pages_stale),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == libc::S_IFLNK
    }
}

/// What a node id names.
#[derive(Clone)]
pub enum Kind {
    Plain(Arc<Node>),
    View(Arc<View>),
}

struct Entry {
    kind: Kind,
    /// The kernel's lookup count: the entry is dropped when `forget` brings it to 0.
    lookups: u64,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u64, Entry>,
    /// Inode → node id, for plain nodes.
    by_key: HashMap<(u64, u64), u64>,
    /// Managed file id → its current view.
    current: HashMap<u64, Arc<View>>,
}

pub struct Inodes {
    table: Mutex<Table>,
    root_dev: u64,
    next_synthetic: AtomicU64,
}

impl Inodes {
    /// A table holding the root directory (node id 1).
    pub fn new(root: OwnedFd, root_stat: &libc::stat) -> Inodes {
        let key = (root_stat.st_dev, root_stat.st_ino);
        let node = Arc::new(Node::new(ROOT_ID, root, key, libc::S_IFDIR, false));
        let mut table = Table::default();
        table.by_key.insert(key, ROOT_ID);
        // The root is never forgotten: one lookup the kernel never returns.
        let kind = Kind::Plain(node);
        table.by_id.insert(ROOT_ID, Entry { kind, lookups: 1 });
        Inodes {
            table: Mutex::new(table),
            root_dev: root_stat.st_dev,
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
        }
    }

    /// A fresh id that no backing inode will ever get (for managed files).
    pub fn synthetic_id(&self) -> u64 {
        self.next_synthetic.fetch_add(1, Ordering::Relaxed)
    }

    /// The plain node `id`, if it is one.
    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        match &self.table.lock().by_id.get(&id)?.kind {
            Kind::Plain(node) => Some(node.clone()),
            Kind::View(_) => None,
        }
    }

    /// The view `id`, if it is one.
    pub fn view(&self, id: u64) -> Option<Arc<View>> {
        match &self.table.lock().by_id.get(&id)?.kind {
            Kind::View(v) => Some(v.clone()),
            Kind::Plain(_) => None,
        }
    }

    pub fn root(&self) -> Option<Arc<Node>> {
        self.get(ROOT_ID)
    }

    /// Registers one more kernel reference to the inode behind `fd` (a new
    /// `O_PATH` fd whose `stat` is `st`), reusing the existing node if the
    /// inode is already known (then `fd` is simply closed).
    pub fn remember(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Node> {
        let key = (st.st_dev, st.st_ino);
        let mut table = self.table.lock();
        if let Some(&id) = table.by_key.get(&key) {
            if let Some(Entry {
                kind: Kind::Plain(node),
                lookups,
            }) = table.by_id.get_mut(&id)
            {
                *lookups += 1;
                return node.clone();
            }
        }
        let id = if st.st_dev == self.root_dev && st.st_ino > ROOT_ID && st.st_ino < SYNTHETIC_BASE
        {
            st.st_ino
        } else {
            self.synthetic_id()
        };
        let node = Arc::new(Node::new(id, fd, key, st.st_mode & libc::S_IFMT, false));
        table.by_key.insert(key, id);
        let kind = Kind::Plain(node.clone());
        table.by_id.insert(id, Entry { kind, lookups: 1 });
        node
    }

    /// The kernel dropped `n` references to `id` (a plain node or a view).
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut table = self.table.lock();
        let gone = match table.by_id.get_mut(&id) {
            Some(entry) => {
                entry.lookups = entry.lookups.saturating_sub(n);
                entry.lookups == 0
            }
            None => false,
        };
        if !gone {
            return;
        }
        match table.by_id.remove(&id).map(|e| e.kind) {
            Some(Kind::Plain(node)) => table.unmap_key(&node.key, id),
            Some(Kind::View(v)) => table.uncurrent(&v, id),
            None => {}
        }
    }
}

/// The views' side of the table (see `view::Views`, which adds the
/// invalidations).
impl Inodes {
    /// `file`'s current view, counted as one more kernel reference, if it
    /// is still current; else a new one from `make` (given a fresh id),
    /// which becomes current. Also returns the view it replaced, if any.
    pub fn lookup_view(
        &self,
        file_id: u64,
        make: impl FnOnce(u64) -> Option<View>,
    ) -> (Option<Arc<View>>, Option<Arc<View>>) {
        let mut t = self.table.lock();
        let previous = t.current.get(&file_id).cloned();
        if let Some(v) = previous.as_ref().filter(|v| v.is_current()) {
            if let Some(entry) = t.by_id.get_mut(&v.id) {
                entry.lookups += 1;
                return (Some(v.clone()), None);
            }
        }
        let Some(view) = make(self.synthetic_id()) else {
            return (None, previous);
        };
        let view = Arc::new(view);
        let kind = Kind::View(view.clone());
        t.by_id.insert(view.id, Entry { kind, lookups: 1 });
        t.current.insert(file_id, view.clone());
        (Some(view), previous)
    }

    /// The node id of `file`'s current view, if the kernel has one.
    pub fn current_id(&self, file_id: u64) -> Option<u64> {
        self.table.lock().current.get(&file_id).map(|v| v.id)
    }

    /// Makes `file`'s current view no longer current; returns it.
    pub fn take_current(&self, file_id: u64) -> Option<Arc<View>> {
        self.table.lock().current.remove(&file_id)
    }

    /// Drops every current view `keep` says no to; returns them.
    pub fn retain_current(&self, mut keep: impl FnMut(&Arc<View>) -> bool) -> Vec<Arc<View>> {
        let mut dropped = Vec::new();
        self.table.lock().current.retain(|_, v| {
            let k = keep(v);
            if !k {
                dropped.push(v.clone());
            }
            k
        });
        dropped
    }

    /// A plain file (inode `key`) was renamed over a managed file: its node
    /// becomes the view `make` builds from it, keeping its id and the
    /// kernel's lookup count (the kernel's moved name still points at it).
    /// `false` if the kernel does not know the inode, or `make` declines.
    pub fn become_view(
        &self,
        key: (u64, u64),
        make: impl FnOnce(&Arc<Node>) -> Option<View>,
    ) -> bool {
        let mut t = self.table.lock();
        let Some(&id) = t.by_key.get(&key).filter(|&&id| id != ROOT_ID) else {
            return false;
        };
        let Some(Kind::Plain(node)) = t.by_id.get(&id).map(|e| &e.kind) else {
            return false;
        };
        let Some(view) = make(node).map(Arc::new) else {
            return false;
        };
        t.unmap_key(&key, id);
        if let Some(entry) = t.by_id.get_mut(&id) {
            entry.kind = Kind::View(view);
        }
        true
    }

    /// A managed file was renamed away: its view `id` becomes the plain
    /// node of the inode behind `fd` (`st`), the placeholder copy, keeping
    /// the id and the kernel's lookup count. Its page cache held the
    /// rendering, so the node's next cached open drops it.
    pub fn become_plain(&self, id: u64, fd: OwnedFd, st: &libc::stat) -> bool {
        let mut guard = self.table.lock();
        let t = &mut *guard;
        let Some(entry) = t.by_id.get_mut(&id) else {
            return false;
        };
        let Kind::View(view) = &entry.kind else {
            return false;
        };
        let view = view.clone();
        let key = (st.st_dev, st.st_ino);
        let node = Arc::new(Node::new(id, fd, key, st.st_mode & libc::S_IFMT, true));
        entry.kind = Kind::Plain(node);
        t.uncurrent(&view, id);
        t.by_key.entry(key).or_insert(id);
        true
    }
}

impl Table {
    /// Drops `key → id`, unless the key names another node id by now.
    fn unmap_key(&mut self, key: &(u64, u64), id: u64) {
        if self.by_key.get(key) == Some(&id) {
            self.by_key.remove(key);
        }
    }

    /// `v` (node id `id`) is no longer its file's current view.
    fn uncurrent(&mut self, v: &View, id: u64) {
        if self.current.get(&v.file.id).is_some_and(|c| c.id == id) {
            self.current.remove(&v.file.id);
        }
    }
}
