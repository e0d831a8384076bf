//! Views: one kernel inode per rendering of a managed file.
//!
//! Why: the kernel's page cache belongs to an inode, not to an open file. If a
//! managed file had one inode, caching its bytes would either show a reader
//! that opened before a rotation the new file (breaking "a handle keeps the
//! file it opened") or need direct I/O, which costs a round trip per `read`.
//!
//! So every rendering gets its own FUSE node id, a *view*. A rendering never
//! changes, so a view's page cache and size can be kept by the kernel for as
//! long as the view lives: handles opened on it read it from the page cache,
//! whole, even after a rotation. Opening by name finds the current view;
//! after a rotation the name is invalidated (from the publishing thread,
//! before the publish returns), so the next open looks up the new view.
//!
//! Every view reports the managed file's one stable inode number (`st_ino`),
//! so programs see one file for the life of the mount. Every reply that
//! carries attributes shows it, LOOKUP and CREATE included (our patch to
//! fuser, `vendor/fuser/TOKENFS.md`): the kernel shows a `stat` the last
//! `st_ino` any reply gave it, so a single reply with the node id leaks.
//!
//! A view that is no longer current (a rotation, or a writer opened it) still
//! serves its old handles from the cache; new opens through it (a bind mount,
//! or a lookup that raced the rotation) get direct I/O with the current
//! rendering, exactly as if views did not exist. Correctness never depends on
//! an invalidation arriving: only speed does.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use tracing::debug;

use super::inode::{Inodes, Node};
use super::kernel::Kernel;
use super::managed::{ManagedFile, Rendering};

pub struct View {
    pub id: u64,
    pub file: Arc<ManagedFile>,
    pub rendering: Rendering,
    /// Set once a writer opened it or a newer rendering replaced it; a view
    /// never becomes current again.
    retired: AtomicBool,
    /// Open handles reading through the page cache: while any is open, the
    /// view's size must stay the size of its own bytes.
    cached_opens: AtomicUsize,
    /// For a plain file's node turned into a view by a rename: that node,
    /// held so its inode number (the node id) is not reused meanwhile.
    _pinned: Option<Arc<Node>>,
}

impl View {
    /// Whether an open of this view may read it through the page cache.
    pub fn is_current(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && self.file.is_current(&self.rendering)
    }

    pub fn has_cached_opens(&self) -> bool {
        self.cached_opens.load(Ordering::Acquire) > 0
    }

    pub fn opened_cached(&self) {
        self.cached_opens.fetch_add(1, Ordering::AcqRel);
    }

    pub fn released_cached(&self) {
        self.cached_opens.fetch_sub(1, Ordering::AcqRel);
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }
}

/// The views of one mount: their invalidations. The views themselves are
/// entries of the one node table (`inode::Inodes`).
pub struct Views<K: Kernel> {
    nodes: Arc<Inodes>,
    /// Where invalidations go (the FUSE session, or a test's recorder).
    pub(super) kernel: Arc<K>,
}

/// Whether this thread serves FUSE requests (see `fs::request`): an
/// invalidation caused from one (a write that publishes a value) is sent
/// from another thread and never waited for, since a notification sent
/// from inside a request can deadlock on a lock that request holds.
fn in_request() -> bool {
    super::request::inside()
}

impl View {
    /// A new current view of `file`'s `rendering` as node `id`.
    fn new(id: u64, file: &Arc<ManagedFile>, rendering: Rendering) -> View {
        View {
            id,
            file: file.clone(),
            rendering,
            retired: AtomicBool::new(false),
            cached_opens: AtomicUsize::new(0),
            _pinned: None,
        }
    }
}

impl<K: Kernel> Views<K> {
    pub fn new(nodes: Arc<Inodes>, kernel: Arc<K>) -> Views<K> {
        Views { nodes, kernel }
    }

    pub fn get(&self, id: u64) -> Option<Arc<View>> {
        self.nodes.view(id)
    }

    /// The current view of `file` for a LOOKUP or CREATE reply (counted as
    /// one kernel reference), made if the current one is stale. `None`: the
    /// file is absent.
    pub fn lookup(&self, file: &Arc<ManagedFile>) -> Option<Arc<View>> {
        // Rendered before the table's lock is taken: a first render after a
        // rotation must not hold up every other request.
        let rendering = file.rendering();
        let (view, replaced) = self
            .nodes
            .lookup_view(file.id, |id| rendering.map(|r| View::new(id, file, r)));
        if let Some(old) = replaced {
            // Replaced before a publish hook got to it: its cached attributes
            // must go (its name is being replaced by this very lookup).
            old.retire();
            self.invalidate(vec![old], Scope::Attributes);
        }
        view
    }

    /// The plain file of inode `key` was just renamed over `file`. After
    /// the rename the kernel's cached name of `file` points at that node
    /// until the invalidation of the name arrives, so the node becomes a
    /// view of `file` that is not current: an open through it gets the
    /// current rendering, as through any stale name. It keeps the node, so
    /// its inode number (the node id) is not reused meanwhile.
    pub fn alias(&self, key: (u64, u64), file: &Arc<ManagedFile>) -> bool {
        self.nodes.become_view(key, |node| {
            let rendering = file.rendering()?;
            Some(View {
                retired: AtomicBool::new(true),
                _pinned: Some(node.clone()),
                ..View::new(node.id, file, rendering)
            })
        })
    }

    /// The node id of `file`'s current view, if the kernel has one.
    pub fn current_id(&self, file: &ManagedFile) -> Option<u64> {
        self.nodes.current_id(file.id)
    }

    /// Retires `file`'s current view (a writer opened it, or it was saved,
    /// unlinked or renamed) and has the kernel drop its name and attributes.
    pub fn retire(&self, file: &ManagedFile) {
        let view = self.nodes.take_current(file.id);
        if let Some(v) = view {
            v.retire();
            self.invalidate(vec![v], Scope::NameAndAttributes);
        }
    }

    /// Someone opened a view that is no longer current through a name the
    /// kernel still maps to it: drop that name so the next open looks up.
    pub fn forget_name(&self, v: &Arc<View>) {
        self.invalidate(vec![v.clone()], Scope::NameAndAttributes);
    }

    /// After a publish: retires every current view whose rendering is no
    /// longer what an open would render, and invalidates them.
    pub fn retire_stale(&self) {
        let stale = self.nodes.retain_current(|v| v.is_current());
        for v in &stale {
            v.retire();
        }
        if !stale.is_empty() {
            self.invalidate(stale, Scope::NameAndAttributes);
        }
    }

    /// Drops the kernel's cached name and attributes of each view: inline on
    /// a publishing thread (so a rotation is done only when every next open
    /// will look up the new view), on a helper thread from inside a request.
    fn invalidate(&self, views: Vec<Arc<View>>, scope: Scope) {
        let job = Job {
            kernel: self.kernel.clone(),
            views,
            scope,
        };
        if in_request() {
            let _ = deferred().send(Box::new(move || job.run()));
        } else {
            job.run();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scope {
    Attributes,
    NameAndAttributes,
}

struct Job<K: Kernel> {
    kernel: Arc<K>,
    views: Vec<Arc<View>>,
    scope: Scope,
}

type Deferred = Box<dyn FnOnce() + Send>;

/// One thread for invalidations caused by requests; started on first use.
fn deferred() -> &'static mpsc::Sender<Deferred> {
    static TX: OnceLock<mpsc::Sender<Deferred>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Deferred>();
        let spawned = std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            // Without it, names expire on their own (`VIEW_TTL`).
            tracing::warn!("cannot start the invalidation thread: {e}");
        }
        tx
    })
}

impl<K: Kernel> Job<K> {
    /// The name, so the next open looks up again, and the attributes only
    /// (offset -1: the page cache stays, the view's old handles still read
    /// it). ENOENT means the kernel had already forgotten it.
    fn run(&self) {
        for v in &self.views {
            if self.scope == Scope::NameAndAttributes {
                let name = OsStr::from_bytes(v.file.name.as_bytes());
                if let Err(e) = self.kernel.inval_entry(v.file.dir.id, name) {
                    debug!(file = %v.file.core.shown.display(), "name invalidation: {e}");
                }
            }
            if let Err(e) = self.kernel.inval_inode(v.id) {
                debug!(file = %v.file.core.shown.display(), "attribute invalidation: {e}");
            }
        }
    }
}
