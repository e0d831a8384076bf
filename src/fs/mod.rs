//! The filesystem: a FUSE-free core and a thin adapter.
//!
//! - The core ([`TokenFs`], its requests in `ops`, managed files in
//!   `managed_io`, plain files in `passthrough`) takes a [`Caller`] and
//!   returns typed results or one error type ([`FsError`]). Every decision
//!   lives there: which names are managed, what unlinking or renaming one
//!   means, when setuid bits are cleared, when a writer's bytes are saved,
//!   cache lifetimes. It talks to the kernel only through [`Kernel`], so it
//!   is tested on a tempdir in plain `cargo test` (`tests`).
//! - The adapter (`adapter`) implements `fuser::Filesystem`: each callback
//!   calls the core once and replies, and it is the one place where errors
//!   are logged (op, node, errno) and recorded in `status`.
//!
//! Nothing here panics on input: every failure becomes an errno.

mod adapter;
pub mod error;
pub mod inode;
mod io_mode;
pub mod kernel;
pub mod managed;
mod managed_io;
mod offload;
mod ops;
mod passthrough;
mod request;
pub mod sys;
#[cfg(test)]
mod tests;
pub mod view;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fuser::FopenFlags;
use parking_lot::Mutex;
use tracing::warn;

pub use self::adapter::FuseKernel;
pub use self::error::{FsError, FsResult, Level};
pub use self::kernel::{Caller, Kernel, OpenBacking};
pub use self::passthrough::AttrChange;

use self::inode::{Inodes, Node};
use self::io_mode::{Io, IoModes};
use self::managed::ManagedFile;
use self::managed_io::ManagedHandle;
use self::view::Views;
use crate::config::MountConfig;
use crate::managed::{Context, FileHealth, StartError};

/// Attribute and entry lifetime for passthrough inodes. Every change to them
/// arrives through this mount, and the kernel drops its cached attributes of
/// an inode it changes, so a short TTL only saves round trips.
const PASSTHROUGH_TTL: Duration = Duration::from_secs(1);
/// For what must be asked again every time.
const NO_CACHE: Duration = Duration::ZERO;
/// How long the kernel keeps a managed name → its current view, and the
/// attributes of a current view. Every change (a publish, a write) drops
/// both at once through the kernel; this only bounds the cost if an
/// invalidation is lost, and never correctness (see `view`).
const VIEW_TTL: Duration = Duration::from_secs(10);

/// One mounted directory: the core. `K`: the kernel it invalidates through
/// (the FUSE session, or a test's recorder).
pub struct TokenFs<K: Kernel = FuseKernel> {
    pub dir: PathBuf,
    /// Every node id the kernel knows: plain nodes and views.
    inodes: Arc<Inodes>,
    managed: Managed,
    /// Kernel inodes of managed files, one per rendering.
    pub views: Arc<Views<K>>,
    handles: Mutex<HashMap<u64, Arc<Handle<K::Backing>>>>,
    next_fh: AtomicU64,
    /// Whether the kernel accepted FUSE passthrough for this session.
    kernel_passthrough: AtomicBool,
    /// Whether the kernel leaves clearing setuid/setgid bits to us
    /// (`FUSE_HANDLE_KILLPRIV_V2`, see `passthrough::drop_setid`).
    kill_priv: AtomicBool,
    /// The environment switches, read once at construction (`Switches`).
    switches: Switches,
    io: IoModes<K::Backing>,
    pub info: Arc<MountInfo>,
}

/// Switches read from the environment, to measure what a feature costs.
#[derive(Clone, Copy, Debug)]
struct Switches {
    /// `TOKENFS_KILLPRIV=off`: leave clearing setuid bits to the kernel.
    killpriv: bool,
    /// `TOKENFS_KERNEL_PASSTHROUGH=off`: forward every read and write.
    kernel_passthrough: bool,
}

impl Switches {
    fn from_env() -> Switches {
        let on = |name: &str| std::env::var_os(name).is_none_or(|v| v != "off");
        Switches {
            killpriv: on("TOKENFS_KILLPRIV"),
            kernel_passthrough: on("TOKENFS_KERNEL_PASSTHROUGH"),
        }
    }
}

/// What status shows about a mount (shared with the control server).
pub struct MountInfo {
    pub dir: PathBuf,
    pub notes: Vec<String>,
    pub files: Vec<Arc<dyn ServedFile>>,
    pub kernel_passthrough: AtomicBool,
    /// The last failure of the mount itself (not of one managed file).
    pub last_error: Mutex<Option<(String, SystemTime)>>,
    /// The errno and message of `last_error`, to tell a repeat.
    last_key: Mutex<Option<(i32, String)>>,
}

impl MountInfo {
    pub fn new(dir: PathBuf, notes: Vec<String>, files: Vec<Arc<dyn ServedFile>>) -> MountInfo {
        MountInfo {
            dir,
            notes,
            files,
            kernel_passthrough: AtomicBool::new(false),
            last_error: Mutex::new(None),
            last_key: Mutex::new(None),
        }
    }

    /// Records a failure for `status`. `true` if it should be logged: it is
    /// new, or the same failure (errno and message) has not been logged for
    /// a minute (a full fd table fails every lookup, each of another name).
    pub fn note_error(&self, errno: i32, message: &str, shown: String) -> bool {
        let now = SystemTime::now();
        let mut last = self.last_error.lock();
        let mut key = self.last_key.lock();
        let same = key
            .as_ref()
            .is_some_and(|(e, m)| *e == errno && m == message);
        let recent = last.as_ref().is_some_and(|(_, at)| {
            now.duration_since(*at)
                .is_ok_and(|d| d < Duration::from_secs(60))
        });
        let quiet = same && recent;
        if !quiet {
            *key = Some((errno, message.to_owned()));
            *last = Some((shown, now));
        }
        !quiet
    }
}

/// A file tokenfs serves, as status sees it (FUSE-managed or, in files
/// mode, rewritten on disk).
pub trait ServedFile: Send + Sync {
    /// Path relative to the mount dir.
    fn rel(&self) -> &Path;
    fn format(&self) -> crate::render::Format;
    fn health(&self) -> FileHealth;
    /// Writes the current secrets into the file on disk (before an unmount
    /// that must leave working files); how many bound keys it restored.
    fn restore(&self) -> std::io::Result<usize> {
        Ok(0)
    }
}

impl ServedFile for ManagedFile {
    fn restore(&self) -> std::io::Result<usize> {
        ManagedFile::restore(self)
    }

    fn rel(&self) -> &Path {
        &self.core.rel
    }
    fn format(&self) -> crate::render::Format {
        self.core.format
    }
    fn health(&self) -> FileHealth {
        ManagedFile::health(self)
    }
}

/// A name in a directory: (the directory's (st_dev, st_ino), the name).
type NameKey = ((u64, u64), Vec<u8>);

#[derive(Default)]
struct Managed {
    by_name: HashMap<NameKey, Arc<ManagedFile>>,
    /// Directories that hold managed files: our temp files there are hidden,
    /// and names of files with other hard links are not cached.
    parents: HashSet<(u64, u64)>,
}

impl Managed {
    fn find(&self, parent: &Node, name: &OsStr) -> Option<&Arc<ManagedFile>> {
        if !self.parents.contains(&parent.key) {
            return None;
        }
        self.by_name.get(&(parent.key, name.as_bytes().to_vec()))
    }
}

/// An open file or directory.
enum Handle<B> {
    File {
        file: File,
        /// Keeps the inode's I/O mode (and backing file) while open.
        _io: Io<B>,
    },
    Dir(Mutex<File>),
    Managed(ManagedHandle),
}

/// A name's entry: its node id, the `st_ino` it shows, its `stat`, and how
/// long the kernel may keep each. Node id 0 is a negative entry ("no such
/// name", cached as a name).
#[derive(Clone, Copy)]
pub struct Entry {
    pub id: u64,
    /// The node id, except for a managed file's views: each is its own node
    /// (its own page cache) and all show the file's one `st_ino`.
    pub ino: u64,
    pub stat: libc::stat,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
}

/// A node's attributes (`stat` with the node's `st_ino`) and their lifetime.
#[derive(Clone, Copy)]
pub struct Attr {
    pub id: u64,
    pub stat: libc::stat,
    pub ttl: Duration,
}

/// An open: its handle, its open flags, and the backing file when the
/// kernel does its I/O (kernel passthrough).
pub struct Opened<B> {
    pub fh: u64,
    pub flags: FopenFlags,
    pub backing: Option<Arc<B>>,
}

/// A CREATE: the new name's entry and its open.
pub struct Created<B> {
    pub entry: Entry,
    pub open: Opened<B>,
}

/// What a request that may wait on the disk gives back: its answer now, or
/// the work to do on a thread that may block (`offload`), which answers.
pub enum Step<T> {
    Done(T),
    Later(Box<dyn FnOnce() -> FsResult<T> + Send>),
}

/// Where a directory listing goes (the kernel's reply buffer, or a test's
/// list). `add` returns `true` when the buffer is full.
pub trait DirSink {
    fn add(&mut self, ino: u64, next_offset: u64, dirent_type: u8, name: &OsStr) -> bool;
}

impl TokenFs<FuseKernel> {
    /// Builds the filesystem for one mount from the directory fd opened before
    /// mounting, loading (and converting) its managed files.
    pub fn new(cfg: &MountConfig, root: OwnedFd, ctx: Arc<Context>) -> Result<Self, StartError> {
        TokenFs::with_kernel(cfg, root, ctx, Arc::new(FuseKernel::default()))
    }
}

impl<K: Kernel> TokenFs<K> {
    /// [`TokenFs::new`] with another kernel (a test's recorder).
    pub fn with_kernel(
        cfg: &MountConfig,
        root: OwnedFd,
        ctx: Arc<Context>,
        kernel: Arc<K>,
    ) -> Result<Self, StartError> {
        let root_stat =
            sys::stat_fd(std::os::fd::AsFd::as_fd(&root)).map_err(|source| StartError::Io {
                file: cfg.dir.clone(),
                source,
            })?;
        let inodes = Inodes::new(root, &root_stat);
        let (managed, files) = load_managed(cfg, &inodes, &ctx)?;
        for note in &cfg.notes {
            warn!(mount = %cfg.dir.display(), "{note}");
        }
        let info = Arc::new(MountInfo::new(cfg.dir.clone(), cfg.notes.clone(), files));
        let inodes = Arc::new(inodes);
        Ok(TokenFs {
            dir: cfg.dir.clone(),
            inodes: inodes.clone(),
            managed,
            views: Arc::new(Views::new(inodes, kernel)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            kernel_passthrough: AtomicBool::new(false),
            kill_priv: AtomicBool::new(false),
            switches: Switches::from_env(),
            io: IoModes::default(),
            info,
        })
    }

    fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        self.inodes.get(ino).ok_or(FsError::new(libc::ENOENT))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn insert_handle(&self, fh: u64, h: Handle<K::Backing>) {
        self.handles.lock().insert(fh, Arc::new(h));
    }

    fn add_handle(&self, h: Handle<K::Backing>) -> u64 {
        let fh = self.new_fh();
        self.insert_handle(fh, h);
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle<K::Backing>>> {
        self.handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::new(libc::EBADF))
    }

    /// EMFILE once nodes fill the fd budget (`sys::fd_budget`): lookups
    /// fail, while saves and the control socket keep the fds they need.
    fn fd_room(&self) -> io::Result<()> {
        if inode::live_nodes() >= sys::fd_budget() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        Ok(())
    }

    /// Registers one more kernel reference to the inode `parent`/`name`.
    fn remember(&self, parent: &Node, name: &OsStr) -> io::Result<(Arc<Node>, libc::stat)> {
        self.fd_room()?;
        let cname = sys::cname(name)?;
        let fd = sys::open_path(parent.fd(), &cname)?;
        let st = sys::stat_fd(std::os::fd::AsFd::as_fd(&fd))?;
        Ok((self.inodes.remember(fd, &st), st))
    }
}

/// Loads every managed file of a mount, registering each as a validator of
/// the values it must carry.
fn load_managed(
    cfg: &MountConfig,
    inodes: &Inodes,
    ctx: &Arc<Context>,
) -> Result<(Managed, Vec<Arc<dyn ServedFile>>), StartError> {
    let mut managed = Managed::default();
    let mut files = Vec::new();
    for fcfg in &cfg.files {
        let parent =
            resolve_parent(inodes, &fcfg.path).map_err(|source| StartError::NoDirectory {
                file: cfg.dir.join(&fcfg.path),
                source,
            })?;
        let id = inodes.synthetic_id();
        let file = Arc::new(ManagedFile::load(
            id,
            parent.clone(),
            &cfg.dir,
            fcfg,
            ctx.clone(),
        )?);
        let weak = Arc::downgrade(&file);
        ctx.store.on_validate(move |name, cred| {
            weak.upgrade().map_or(Ok(()), |f| f.carries(name, cred))
        });
        managed.parents.insert(parent.key);
        managed
            .by_name
            .insert((parent.key, file.name.as_bytes().to_vec()), file.clone());
        files.push(file as Arc<dyn ServedFile>);
    }
    Ok((managed, files))
}

/// Walks from the root to the directory that holds `path`.
fn resolve_parent(inodes: &Inodes, path: &Path) -> io::Result<Arc<Node>> {
    let mut node = inodes
        .root()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    let Some(parent) = path.parent() else {
        return Ok(node);
    };
    for comp in parent.components() {
        let c = sys::cname(comp.as_os_str())?;
        let fd = sys::open_path(node.fd(), &c)?;
        let st = sys::stat_fd(std::os::fd::AsFd::as_fd(&fd))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        node = inodes.remember(fd, &st);
    }
    Ok(node)
}
