//! The inode table: FUSE node ids ↔ inodes of the hidden original directory.
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

struct Entry {
    node: Arc<Node>,
    /// The kernel's lookup count: the node is dropped when `forget` brings it to 0.
    lookups: u64,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
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
        table.by_id.insert(ROOT_ID, Entry { node, lookups: 1 });
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

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.table.lock().by_id.get(&id).map(|e| e.node.clone())
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
            if let Some(entry) = table.by_id.get_mut(&id) {
                entry.lookups += 1;
                return entry.node.clone();
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
        table.by_id.insert(
            id,
            Entry {
                node: node.clone(),
                lookups: 1,
            },
        );
        node
    }

    /// The kernel dropped `n` references to `id`.
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
        if gone {
            if let Some(entry) = table.by_id.remove(&id) {
                table.unmap_key(&entry.node.key, id);
            }
        }
    }

    /// Hands node `id` of the inode `key` to `to` with the kernel's lookup
    /// count, and forgets it here. A rename gives a node id another meaning
    /// (a plain file renamed over a managed one); `to` runs under this
    /// table's lock, so no request sees the id in neither place. Returns
    /// whether `to` took it.
    ///
    /// `to` gets the node itself too, and must keep it while the kernel
    /// knows the id: its fd keeps the inode allocated, so a new file cannot
    /// get the same inode number (which is the node id) meanwhile.
    pub fn hand_over(&self, key: (u64, u64), to: impl FnOnce(&Arc<Node>, u64) -> bool) -> bool {
        let mut table = self.table.lock();
        let Some(&id) = table.by_key.get(&key) else {
            return false;
        };
        let Some((node, lookups)) = table.by_id.get(&id).map(|e| (e.node.clone(), e.lookups))
        else {
            return false;
        };
        if id == ROOT_ID || !to(&node, lookups) {
            return false;
        }
        table.by_id.remove(&id);
        table.unmap_key(&key, id);
        true
    }

    /// Takes over node id `id` for the inode behind `fd` (`st`) from `from`,
    /// which gives up the kernel's lookup count of it (a managed file renamed
    /// away: its view's node id now names the plain file). `from` runs under
    /// this table's lock. The id keeps its meaning for the kernel, so `stat`
    /// shows it as the inode number.
    pub fn take_over(
        &self,
        id: u64,
        fd: OwnedFd,
        st: &libc::stat,
        from: impl FnOnce() -> Option<u64>,
    ) -> bool {
        let mut table = self.table.lock();
        let Some(lookups) = from() else {
            return false;
        };
        let key = (st.st_dev, st.st_ino);
        let node = Arc::new(Node::new(id, fd, key, st.st_mode & libc::S_IFMT, true));
        table.by_key.entry(key).or_insert(id);
        table.by_id.insert(id, Entry { node, lookups });
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
}
