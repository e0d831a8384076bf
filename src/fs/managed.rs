//! A managed file: rendered from the credential snapshot on every open, and
//! saved back (secrets turned into placeholders) on every write.
//!
//! What is specific to serving it over FUSE; the rules of a managed file
//! (conversion, adoption, backups, checked rendering, atomic save) are the
//! core's, [`crate::managed::FileCore`], shared with files mode. The backing
//! file lives in the hidden original directory and holds the user's bytes
//! with each secret replaced by a placeholder; [`ManagedFile::rendering`]
//! substitutes the current secrets. One [`Rendering`] per (snapshot
//! generation, template version) is cached and shared by every handle opened
//! while it is current, so a config read costs an `Arc` clone, while a handle
//! keeps its own rendering for its whole life. Around that: `stat` as readers
//! see it, and which handles are open.

use std::ffi::CString;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tracing::{info, warn};

use super::inode::Node;
use super::sys;
use crate::config::ManagedConfig;
use crate::managed::{self, Context, FileCore, FileHealth, StartError};
use crate::render::Template;
use crate::secret::SecretBytes;
use crate::store::{Credential, Snapshot};

/// What the file is right now.
enum State {
    /// No file of that name (never created, unlinked or renamed away).
    Absent,
    Present {
        template: Arc<Template>,
        /// The bytes did not parse when saved: renderings will not either,
        /// and that was already reported.
        broken: bool,
        /// Bumped on every save, so cached renderings of the old template die.
        version: u64,
        stat: libc::stat,
    },
}

/// One rendering: the bytes of one (snapshot generation, template version).
/// Immutable, so the kernel may cache it for as long as it stays current.
#[derive(Clone)]
pub struct Rendering {
    pub generation: u64,
    pub version: u64,
    pub bytes: Arc<SecretBytes>,
    /// When its snapshot was published: its mtime (clients cache by mtime).
    pub published_at: SystemTime,
}

pub struct ManagedFile {
    pub id: u64,
    /// The rules (conversion, adoption, rendering), and the paths and
    /// limits messages and requests need (`core.shown`, `core.max_size`).
    pub core: FileCore,
    /// The backing parent directory.
    pub dir: Arc<Node>,
    pub name: CString,
    state: RwLock<State>,
    cache: Mutex<Option<Rendering>>,
    /// (thread id, handle, size) of open handles: `fstat` arrives without a
    /// handle, and a reader must see the size of the rendering it holds.
    opens: Mutex<Vec<(u32, u64, u64)>>,
    saves: AtomicU64,
    /// Held from writing the backing file to installing its template, so two
    /// saves finishing together cannot leave memory and disk disagreeing.
    saving: Mutex<()>,
}

fn stat_mtime(st: &libc::stat) -> SystemTime {
    to_time(st.st_mtime, st.st_mtime_nsec)
}

fn stat_ctime(st: &libc::stat) -> SystemTime {
    to_time(st.st_ctime, st.st_ctime_nsec)
}

pub fn to_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn set_time(t: SystemTime, secs: &mut i64, nsecs: &mut i64) {
    if let Ok(d) = t.duration_since(UNIX_EPOCH) {
        *secs = d.as_secs() as i64;
        *nsecs = d.subsec_nanos() as i64;
    }
}

impl ManagedFile {
    /// Prepares a managed file at mount time: converts real secrets in the
    /// backing file to placeholders (a value found there becomes the
    /// credential's first value if it has none), inserts missing keys, and
    /// creates the file when the config says `create = true`.
    pub fn load(
        id: u64,
        dir: Arc<Node>,
        mount_dir: &Path,
        cfg: &ManagedConfig,
        ctx: Arc<Context>,
    ) -> Result<ManagedFile, StartError> {
        let name_os = cfg.path.file_name().unwrap_or_default();
        let name = sys::cname(name_os).map_err(|source| StartError::Io {
            file: mount_dir.join(&cfg.path),
            source,
        })?;
        let file = ManagedFile {
            id,
            core: FileCore::new(mount_dir, cfg, ctx),
            dir,
            name,
            state: RwLock::new(State::Absent),
            cache: Mutex::new(None),
            opens: Mutex::new(Vec::new()),
            saves: AtomicU64::new(0),
            saving: Mutex::new(()),
        };
        managed::sweep_temp_files(file.dir.fd(), &file.core.shown);
        file.first_conversion()?;
        Ok(file)
    }

    /// Converts what is on disk at mount (or an empty file with `create`):
    /// refuses files over the size limit and anything but a regular file.
    fn first_conversion(&self) -> Result<(), StartError> {
        match sys::stat_name(self.dir.fd(), &self.name) {
            Ok(st) => {
                self.core.check_start(&st)?;
                let bytes = managed::read_at(self.dir.fd(), &self.name)
                    .map_err(|e| self.core.io_error(e))?;
                self.convert_at_mount(&bytes, st)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && self.core.create => {
                self.convert_at_mount(b"", empty_stat())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                info!(file = %self.core.shown.display(), "managed file does not exist; it appears when a program creates it");
                Ok(())
            }
            Err(e) => Err(self.core.io_error(e)),
        }
    }

    /// The first conversion (see [`FileCore::convert_at_start`]), saved as
    /// the backing file when it changed anything; `st.st_ino == 0`: the file
    /// is being created.
    fn convert_at_mount(&self, bytes: &[u8], st: libc::stat) -> Result<(), StartError> {
        let created = st.st_ino == 0;
        let conv = self.core.convert_at_start(bytes, !created)?;
        let stat = if conv.template != bytes || created {
            self.save_backing(&conv.template)
                .map_err(|e| self.core.io_error(e))?
        } else {
            st
        };
        self.install(conv.template, conv.parse_error.is_some(), stat);
        Ok(())
    }

    fn install(&self, template: Vec<u8>, broken: bool, stat: libc::stat) {
        let version = self.saves.fetch_add(1, Ordering::Relaxed) + 1;
        *self.state.write() = State::Present {
            template: Arc::new(self.core.template(template)),
            broken,
            version,
            stat,
        };
        self.core.set_present(true);
    }

    pub fn health(&self) -> FileHealth {
        self.core.health()
    }

    pub fn is_present(&self) -> bool {
        matches!(*self.state.read(), State::Present { .. })
    }

    /// The rendering of the current snapshot, or `None` if the file is absent.
    pub fn rendering(&self) -> Option<Rendering> {
        let snap = self.core.ctx.store.snapshot();
        let (template, version, broken) = match &*self.state.read() {
            State::Present {
                template,
                version,
                broken,
                ..
            } => (template.clone(), *version, *broken),
            State::Absent => return None,
        };
        if let Some(c) = &*self.cache.lock() {
            if c.generation == snap.generation && c.version == version {
                return Some(c.clone());
            }
        }
        let rendering = Rendering {
            generation: snap.generation,
            version,
            bytes: Arc::new(self.render(&snap, &template, broken)),
            published_at: snap.published_at,
        };
        let mut cache = self.cache.lock();
        let newer = cache
            .as_ref()
            .is_some_and(|c| c.generation > snap.generation || c.version > version);
        if !newer {
            *cache = Some(rendering.clone());
        }
        Some(rendering)
    }

    /// Whether `r` is what an open would render now.
    pub fn is_current(&self, r: &Rendering) -> bool {
        let version = match &*self.state.read() {
            State::Present { version, .. } => *version,
            State::Absent => return false,
        };
        version == r.version && self.core.ctx.store.snapshot().generation == r.generation
    }

    /// Renders and checks once per new (generation, template): the check
    /// parses the result, which is too slow for every open. A slot with no
    /// value shows its placeholder, which a CLI would send as its key (and
    /// get a 401): said once per generation (renders are cached).
    fn render(&self, snap: &Snapshot, template: &Template, broken: bool) -> SecretBytes {
        if let Some(missing) = self.core.missing(snap) {
            let msg = format!("served with placeholders: {missing}");
            warn!(file = %self.core.shown.display(), "{msg}");
            self.core.note_error(msg);
        }
        self.core.render(snap, template, broken)
    }
    /// `stat` of the file as readers see it: mode without group and other
    /// bits, times that advance with every generation, and a size no reader
    /// can be truncated by.
    ///
    /// The kernel does not say which handle an `fstat` is about (`fh` comes
    /// only from a few internal paths), and a reader such as Node's
    /// `readFileSync` sizes its buffer by `fstat` and stops there. So the size
    /// is that of the current rendering or of any rendering the calling
    /// thread still holds open, whichever is larger: readers read to EOF or
    /// to that size, and both give them the whole file.
    pub fn stat(&self, tid: u32, fh: Option<u64>) -> Option<libc::stat> {
        let mut st = match &*self.state.read() {
            State::Present { stat, .. } => *stat,
            State::Absent => return None,
        };
        let (exact, held) = {
            let opens = self.opens.lock();
            let exact = fh.and_then(|fh| opens.iter().find(|o| o.1 == fh).map(|o| o.2));
            let held = opens.iter().filter(|o| o.0 == tid).map(|o| o.2).max();
            (exact, held)
        };
        let size = match exact {
            Some(size) => size,
            None => {
                let current = self.rendering().map_or(0, |r| r.bytes.len() as u64);
                held.map_or(current, |h| h.max(current))
            }
        };
        dress(&mut st, size, self.core.ctx.store.snapshot().published_at);
        Some(st)
    }

    /// `stat` of one rendering: its own size and the mtime of its snapshot.
    /// Constant for the rendering's life, which is what lets the kernel cache
    /// it (see `fs::view`).
    pub fn stat_of(&self, r: &Rendering) -> Option<libc::stat> {
        let mut st = match &*self.state.read() {
            State::Present { stat, .. } => *stat,
            State::Absent => return None,
        };
        dress(&mut st, r.bytes.len() as u64, r.published_at);
        Some(st)
    }

    pub fn track_open(&self, tid: u32, fh: u64, size: u64) {
        self.opens.lock().push((tid, fh, size));
    }

    pub fn track_size(&self, fh: u64, size: u64) {
        if let Some(o) = self.opens.lock().iter_mut().find(|o| o.1 == fh) {
            o.2 = size;
        }
    }

    pub fn track_close(&self, fh: u64, tid: u32) {
        self.opens.lock().retain(|o| o.1 != fh || o.0 != tid);
    }

    pub fn track_release(&self, fh: u64) {
        self.opens.lock().retain(|o| o.1 != fh);
    }

    /// Saves bytes a program wrote (through an open handle, or as a file it
    /// renamed over this one), taken in by the core (see
    /// [`FileCore::take_write`]): every byte but the values at bound keys is
    /// saved as written. Errors are the writer's errno.
    pub fn commit(&self, bytes: &[u8]) -> io::Result<()> {
        let conv = self.core.take_write(bytes)?;
        let _saving = self.saving.lock();
        let stat = match self.save_backing(&conv.template) {
            Ok(st) => st,
            Err(e) => {
                let msg = format!(
                    "saving {} failed: {e}; the previous content is kept",
                    self.core.shown.display()
                );
                tracing::error!(file = %self.core.shown.display(), "{msg}");
                self.core.note_error(msg);
                return Err(e);
            }
        };
        self.install(conv.template, conv.parse_error.is_some(), stat);
        self.core.note_write();
        Ok(())
    }

    /// `EFBIG` for a size over the file's limit, logged and in `status`.
    pub fn check_size(&self, size: u64) -> io::Result<()> {
        self.core.check_size(size)
    }

    /// Whether every bound position of this file can carry `cred`'s new
    /// values (asked before they are published).
    pub fn carries(&self, name: &str, cred: &Credential) -> Result<(), String> {
        let State::Present { template, .. } = &*self.state.read() else {
            return Ok(());
        };
        self.core.carries(template, name, cred)
    }

    /// Writes the current rendering into the backing file (before an
    /// unmount that leaves working files behind). Returns how many bound
    /// keys now hold their secret.
    pub fn restore(&self) -> io::Result<usize> {
        let (template, broken) = match &*self.state.read() {
            State::Present {
                template, broken, ..
            } => (template.clone(), *broken),
            State::Absent => return Ok(0),
        };
        let snap = self.core.ctx.store.snapshot();
        let restored = template
            .bound()
            .filter(|b| snap.get_str(&b.slot).is_some())
            .count();
        if broken || restored == 0 {
            return Ok(0);
        }
        let bytes = self.render(&snap, &template, broken);
        let _saving = self.saving.lock();
        let stat = self.save_backing(&bytes)?;
        if let State::Present { stat: st, .. } = &mut *self.state.write() {
            *st = stat;
        }
        Ok(restored)
    }

    /// Writes the backing file atomically, keeping its owner; the mode
    /// never grants group or other access (readers see the rendering's
    /// mode, not this file's).
    fn save_backing(&self, bytes: &[u8]) -> io::Result<libc::stat> {
        let previous = match &*self.state.read() {
            State::Present { stat, .. } => Some(*stat),
            State::Absent => None,
        };
        managed::save_at(self.dir.fd(), &self.name, bytes, previous.as_ref(), 0o700)
    }

    /// The file was unlinked or renamed away (its backing file is gone).
    pub fn set_absent(&self) {
        *self.state.write() = State::Absent;
        *self.cache.lock() = None;
        self.core.set_present(false);
    }

    /// Creates the file empty (a program called `creat` on the name).
    pub fn create_empty(&self, mode: u32) -> io::Result<()> {
        let fd = sys::open_at(
            self.dir.fd(),
            &self.name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            mode & 0o700,
        )?;
        let st = sys::stat_fd(fd.as_fd())?;
        // Empty until its creator's write is saved: not checked as a
        // rendering (it lacks every bound key), so no false alarm in status.
        self.install(Vec::new(), true, st);
        Ok(())
    }

    /// Re-reads the backing file's metadata after chmod/chown/utimens.
    pub fn refresh_stat(&self) -> io::Result<()> {
        let st = sys::stat_name(self.dir.fd(), &self.name)?;
        if let State::Present { stat, .. } = &mut *self.state.write() {
            *stat = st;
        }
        Ok(())
    }
}

/// The backing file's stat as readers see it: the rendering's size, times
/// that advance with every generation, no group or other access.
fn dress(st: &mut libc::stat, size: u64, published: SystemTime) {
    let mtime = stat_mtime(st).max(published);
    let ctime = stat_ctime(st).max(published);
    st.st_size = size as i64;
    st.st_blocks = size.div_ceil(512) as i64;
    st.st_mode &= !0o077;
    set_time(mtime, &mut st.st_mtime, &mut st.st_mtime_nsec);
    set_time(ctime, &mut st.st_ctime, &mut st.st_ctime_nsec);
}

pub(crate) fn empty_stat() -> libc::stat {
    sys::zeroed_stat()
}
