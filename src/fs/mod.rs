//! The FUSE filesystem: translates kernel requests into operations on managed
//! files ([`managed`]) or on the hidden original directory ([`passthrough`]).
//!
//! No policy lives here: which files are managed, how they render and what a
//! write means are decided by [`managed::ManagedFile`]; this layer only maps
//! node ids and handles, picks cache lifetimes, and turns `io::Error`s into
//! errnos. Nothing here panics on input: every failure becomes an errno.

pub mod inode;
mod io_mode;
pub mod managed;
mod offload;
mod ops;
mod passthrough;
mod request;
pub mod sys;
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

use fuser::{Errno, FileAttr, FileHandle, FileType, Generation, INodeNo, ReplyEntry, Request};
use parking_lot::Mutex;
use tracing::warn;

use self::inode::{Inodes, Node};
use self::io_mode::{Io, IoModes};
use self::managed::{Context, ManagedFile};
use self::view::{View, Views};
use crate::config::MountConfig;
use crate::secret::SecretBytes;

/// Attribute and entry lifetime for passthrough inodes. Every change to them
/// arrives through this mount, and the kernel drops its cached attributes of
/// an inode it changes, so a short TTL only saves round trips.
const PASSTHROUGH_TTL: Duration = Duration::from_secs(1);
/// For what must be asked again every time.
const NO_CACHE: Duration = Duration::ZERO;
/// How long the kernel keeps a managed name → its current view, and the
/// attributes of a current view. Every change (a publish, a write) drops
/// both at once through the notifier; this only bounds the cost if a
/// notification is lost, and never correctness (see `view`).
const VIEW_TTL: Duration = Duration::from_secs(10);

/// One mounted directory.
pub struct TokenFs {
    pub dir: PathBuf,
    inodes: Arc<Inodes>,
    managed: Managed,
    /// Kernel inodes of managed files, one per rendering.
    pub views: Arc<Views>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Whether the kernel accepted FUSE passthrough for this session.
    kernel_passthrough: AtomicBool,
    /// Whether the kernel leaves clearing setuid/setgid bits to us
    /// (`FUSE_HANDLE_KILLPRIV_V2`, see `passthrough::drop_setid`).
    kill_priv: AtomicBool,
    io: IoModes,
    pub info: Arc<MountInfo>,
}

/// What status shows about a mount (shared with the control server).
pub struct MountInfo {
    pub dir: PathBuf,
    pub notes: Vec<String>,
    pub files: Vec<Arc<dyn ServedFile>>,
    pub kernel_passthrough: AtomicBool,
    /// The last failure of the mount itself (not of one managed file).
    pub last_error: Mutex<Option<(String, SystemTime)>>,
}

impl MountInfo {
    pub fn new(dir: PathBuf, notes: Vec<String>, files: Vec<Arc<dyn ServedFile>>) -> MountInfo {
        MountInfo {
            dir,
            notes,
            files,
            kernel_passthrough: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// Records a failure for `status`, logging it when it is new or has not
    /// been logged for a minute (a full fd table fails every lookup).
    fn note_error(&self, msg: String) {
        let now = SystemTime::now();
        let mut last = self.last_error.lock();
        let quiet = last.as_ref().is_some_and(|(m, at)| {
            *m == msg
                && now
                    .duration_since(*at)
                    .is_ok_and(|d| d < Duration::from_secs(60))
        });
        if !quiet {
            tracing::error!(mount = %self.dir.display(), "{msg}");
            *last = Some((msg, now));
        }
    }
}

/// A file tokenfs serves, as status sees it (FUSE-managed or, in files
/// mode, rewritten on disk).
pub trait ServedFile: Send + Sync {
    /// Path relative to the mount dir.
    fn rel(&self) -> &Path;
    fn format(&self) -> crate::render::Format;
    fn health(&self) -> managed::FileHealth;
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
        &self.rel
    }
    fn format(&self) -> crate::render::Format {
        self.format
    }
    fn health(&self) -> managed::FileHealth {
        ManagedFile::health(self)
    }
}

/// A name in a directory: (the directory's (st_dev, st_ino), the name).
type NameKey = ((u64, u64), Vec<u8>);

#[derive(Default)]
struct Managed {
    by_name: HashMap<NameKey, Arc<ManagedFile>>,
    /// Directories that hold managed files. Names there get entry TTL 0: after
    /// a program renames its temp file over a managed file, the kernel's
    /// cached name must not keep pointing at the temp file's inode.
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

enum Handle {
    File {
        file: File,
        /// Keeps the inode's I/O mode (and backing file) while open.
        _io: Io,
    },
    Dir(Mutex<File>),
    Managed(ManagedHandle),
}

/// An open managed file: the rendering it saw at `open()`, and for writers a
/// private copy that is committed on `flush`/`fsync`/`release`.
struct ManagedHandle {
    file: Arc<ManagedFile>,
    snapshot: Arc<SecretBytes>,
    write: Option<Mutex<WriteBuf>>,
    /// The view whose bytes this handle reads through the page cache, if it
    /// was opened while that view was current.
    cached: Option<Arc<View>>,
}

struct WriteBuf {
    /// May hold secrets (the rendering it started from): zeroed on drop.
    data: Vec<u8>,
    dirty: bool,
    append: bool,
}

impl Drop for WriteBuf {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.data);
    }
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
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

impl TokenFs {
    /// Builds the filesystem for one mount from the directory fd opened before
    /// mounting, loading (and converting) its managed files.
    pub fn new(cfg: &MountConfig, root: OwnedFd, ctx: Arc<Context>) -> Result<TokenFs, String> {
        let shown = cfg.dir.display().to_string();
        let root_stat =
            sys::stat_fd(std::os::fd::AsFd::as_fd(&root)).map_err(|e| format!("{shown}: {e}"))?;
        let inodes = Inodes::new(root, &root_stat);
        let mut managed = Managed::default();
        let mut files = Vec::new();
        for fcfg in &cfg.files {
            let parent = resolve_parent(&inodes, &fcfg.path).map_err(|e| {
                format!(
                    "{}: the directory of a managed file must exist: {e}",
                    cfg.dir.join(&fcfg.path).display()
                )
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
        for note in &cfg.notes {
            warn!(mount = %cfg.dir.display(), "{note}");
        }
        let info = Arc::new(MountInfo::new(cfg.dir.clone(), cfg.notes.clone(), files));
        Ok(TokenFs {
            dir: cfg.dir.clone(),
            inodes: Arc::new(inodes),
            managed,
            views: Arc::new(Views::default()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            kernel_passthrough: AtomicBool::new(false),
            kill_priv: AtomicBool::new(false),
            io: IoModes::default(),
            info,
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.inodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    /// `stat` of a view, and how long the kernel may keep it. A current view
    /// is immutable; a stale one answers for its cached readers while any is
    /// open, then for whoever opens it now (a bind mount, a raced lookup).
    fn view_stat(
        &self,
        v: &View,
        tid: u32,
        fh: Option<FileHandle>,
    ) -> Result<(libc::stat, Duration), Errno> {
        let own = || v.file.stat_of(&v.rendering).ok_or(Errno::ENOENT);
        if v.is_current() {
            return Ok((own()?, VIEW_TTL));
        }
        if v.has_cached_opens() {
            return Ok((own()?, NO_CACHE));
        }
        let st = v.file.stat(tid, fh.map(|f| f.0)).ok_or(Errno::ENOENT)?;
        Ok((st, NO_CACHE))
    }

    /// How long the kernel may keep a name in `parent` (`st`: what it
    /// names; `None`: nothing). Every change arrives through this mount, so
    /// names are cached, also beside managed files, where programs keep the
    /// rest of their state: a plain file renamed over a managed one hands its
    /// node to the managed file (`rename_onto_managed`), so the kernel's moved
    /// name stays right. The exception is a file with other hard links,
    /// whose node must stay plain: beside a managed file its names are asked
    /// again every time.
    fn entry_ttl(&self, parent: &Node, st: Option<&libc::stat>) -> Duration {
        let linked =
            st.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink > 1);
        if linked && self.managed.parents.contains(&parent.key) {
            NO_CACHE
        } else {
            PASSTHROUGH_TTL
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    /// Registers a newly created or found inode with the kernel's lookup.
    /// EMFILE once nodes fill the fd budget (`sys::fd_budget`): lookups
    /// fail, while saves and the control socket keep the fds they need.
    fn fd_room(&self) -> io::Result<()> {
        if inode::live_nodes() >= sys::fd_budget() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        Ok(())
    }

    fn remember(&self, parent: &Node, name: &OsStr) -> io::Result<(Arc<Node>, libc::stat)> {
        self.fd_room()?;
        let cname = sys::cname(name)?;
        let fd = sys::open_path(parent.fd(), &cname)?;
        let st = sys::stat_fd(std::os::fd::AsFd::as_fd(&fd))?;
        Ok((self.inodes.remember(fd, &st), st))
    }

    /// Files created by another uid (with `allow_other`) belong to that uid,
    /// as they would on the original filesystem.
    fn chown_to_caller(&self, req: &Request, parent: &Node, name: &OsStr) {
        let euid = sys::euid();
        if euid != 0 || (req.uid() == euid && req.gid() == sys::egid()) {
            return;
        }
        let res = sys::cname(name)
            .and_then(|c| sys::open_path(parent.fd(), &c))
            .and_then(|fd| {
                sys::chown_fd(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(req.uid()),
                    Some(req.gid()),
                )
            });
        if let Err(e) = res {
            warn!(mount = %self.dir.display(), "cannot give a new file to uid {}: {e}", req.uid());
        }
    }

    /// mknod/mkdir/symlink: refuse managed names, create, give the new inode
    /// to the caller, and answer with its entry.
    fn make_entry(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        make: impl FnOnce(std::os::fd::BorrowedFd<'_>, &std::ffi::CStr) -> io::Result<()>,
    ) {
        let made = self.node(parent).and_then(|p| {
            self.not_managed_name(&p, name)?;
            let c = sys::cname(name).map_err(|e| errno(&e))?;
            make(p.fd(), &c).map_err(|e| errno(&e))?;
            Ok(p)
        });
        match made {
            Ok(p) => {
                self.chown_to_caller(req, &p, name);
                self.reply_entry(&p, name, reply);
            }
            Err(e) => reply.error(e),
        }
    }

    /// A LOOKUP: like [`Self::reply_entry`], but a name that does not exist
    /// gets a negative entry the kernel may keep as long as a positive one.
    /// Every creation goes through this mount (the original directory is
    /// hidden under it), and the kernel replaces a cached negative entry
    /// itself when one does, so this only saves the lookup before a `creat`.
    fn reply_lookup(&self, parent: &Node, name: &OsStr, reply: ReplyEntry) {
        self.answer_entry(parent, name, reply, true);
    }

    /// The entry of a name just made or linked.
    fn reply_entry(&self, parent: &Node, name: &OsStr, reply: ReplyEntry) {
        self.answer_entry(parent, name, reply, false);
    }

    /// The errno of a failure to open or look up. Out of file descriptors
    /// is the daemon's failure, not the caller's: it goes to the log and to
    /// `status` as well as to the caller.
    fn fd_errno(&self, e: io::Error) -> Errno {
        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            self.info.note_error(format!(
                "out of file descriptors ({e}): lookups and opens fail until the kernel forgets inodes; raise the open file limit"
            ));
        }
        errno(&e)
    }

    fn answer_entry(&self, parent: &Node, name: &OsStr, reply: ReplyEntry, negative: bool) {
        match self.remember(parent, name) {
            Ok((node, st)) => reply.entry_with_ttls(
                &PASSTHROUGH_TTL,
                &self.entry_ttl(parent, Some(&st)),
                &to_attr(node.id, &st),
                Generation(0),
            ),
            Err(e) if negative && e.raw_os_error() == Some(libc::ENOENT) => {
                // Node id 0: "no such name", cached like a name.
                let none = to_attr(0, &managed::empty_stat());
                let ttl = self.entry_ttl(parent, None);
                reply.entry_with_ttls(&NO_CACHE, &ttl, &none, Generation(0))
            }
            Err(e) => reply.error(self.fd_errno(e)),
        }
    }
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
