//! A managed file: rendered from the credential snapshot on every open, and
//! saved back (secrets turned into placeholders) on every write.
//!
//! Nothing here knows FUSE. The backing file lives in the hidden original
//! directory and holds the user's bytes with each secret replaced by a
//! placeholder; [`ManagedFile::rendering`] substitutes the current secrets.
//! One [`Rendering`] per (snapshot generation, template version) is cached and
//! shared by every handle opened while it is current, so a config read costs
//! an `Arc` clone, while a handle keeps its own rendering for its whole life.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tracing::{info, warn};

use super::inode::Node;
use super::sys;
use crate::backup::Backups;
use crate::config::ManagedConfig;
use crate::render::{self, Binding, Conversion, Format, Found, Template};
use crate::secret::{Secret, SecretBytes};
use crate::source::Adopt;
use crate::store::{Credential, SlotRef, Snapshot, Store};

/// Temporary files of our own atomic saves start with this; they are hidden
/// from directory listings and swept at mount.
pub const TMP_PREFIX: &str = ".tokenfs-tmp-";

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

/// What `tokenfs status` shows about a file.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FileHealth {
    pub present: bool,
    pub last_write: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
}

/// Shared by every managed file of a daemon: where values come from and go to.
pub struct Context {
    pub store: Arc<Store>,
    pub adopt: Arc<dyn Adopt>,
    pub backups: Backups,
    /// Values files held at mount, per slot, while the daemon starts: a
    /// second file with a different value for the same slot is a conflict
    /// even when the first value is still being validated.
    pub claims: Mutex<std::collections::HashMap<String, Secret>>,
}

impl Context {
    pub fn new(store: Arc<Store>, adopt: Arc<dyn Adopt>, backups: Backups) -> Context {
        Context {
            store,
            adopt,
            backups,
            claims: Mutex::new(std::collections::HashMap::new()),
        }
    }
}

pub struct ManagedFile {
    pub id: u64,
    /// Path relative to the mount dir, for messages.
    pub rel: PathBuf,
    /// Absolute path under the mount, for status.
    pub shown: PathBuf,
    /// The backing parent directory.
    pub dir: Arc<Node>,
    pub name: CString,
    pub format: Format,
    bindings: Vec<Binding>,
    slots: Vec<SlotRef>,
    /// May replace a differing value at mount (`replace = true`).
    replace: bool,
    /// The largest the file may become.
    pub max_size: u64,
    state: RwLock<State>,
    cache: Mutex<Option<Rendering>>,
    /// (thread id, handle, size) of open handles: `fstat` arrives without a
    /// handle, and a reader must see the size of the rendering it holds.
    opens: Mutex<Vec<(u32, u64, u64)>>,
    health: Mutex<FileHealth>,
    ctx: Arc<Context>,
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
        mount_dir: &std::path::Path,
        cfg: &ManagedConfig,
        ctx: Arc<Context>,
    ) -> Result<ManagedFile, String> {
        let name_os = cfg.path.file_name().unwrap_or_default();
        let name = sys::cname(name_os).map_err(|e| format!("{}: {e}", cfg.path.display()))?;
        let slots = cfg
            .bindings
            .iter()
            .filter_map(|b| SlotRef::parse(&b.slot).ok())
            .collect();
        let file = ManagedFile {
            id,
            rel: cfg.path.clone(),
            shown: mount_dir.join(&cfg.path),
            dir,
            name,
            format: cfg.format,
            bindings: cfg.bindings.clone(),
            slots,
            replace: cfg.replace,
            max_size: cfg.max_size,
            state: RwLock::new(State::Absent),
            cache: Mutex::new(None),
            opens: Mutex::new(Vec::new()),
            health: Mutex::new(FileHealth::default()),
            ctx,
            saves: AtomicU64::new(0),
            saving: Mutex::new(()),
        };
        file.sweep_temp_files();
        file.first_conversion(cfg.create)?;
        Ok(file)
    }

    /// Converts what is on disk at mount (or an empty file with `create`):
    /// refuses files over the size limit and anything but a regular file.
    fn first_conversion(&self, create: bool) -> Result<(), String> {
        match sys::stat_name(self.dir.fd(), &self.name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                if st.st_size as u64 > self.max_size {
                    return Err(format!(
                        "{} is {} bytes, over the limit of {} for a managed file: point the config at the right file, or raise max_file_size",
                        self.shown.display(),
                        st.st_size,
                        self.max_size
                    ));
                }
                let bytes = self.read_backing().map_err(|e| self.describe(&e))?;
                self.convert_at_mount(&bytes, st)
            }
            Ok(_) => Err(format!(
                "{} is not a regular file (a symlink or directory); tokenfs manages regular files only: point the config at the real file",
                self.shown.display()
            )),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                self.convert_at_mount(b"", empty_stat())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                info!(file = %self.shown.display(), "managed file does not exist; it appears when a program creates it");
                Ok(())
            }
            Err(e) => Err(self.describe(&e)),
        }
    }

    fn describe(&self, e: &io::Error) -> String {
        format!("{}: {e}", self.shown.display())
    }

    fn read_backing(&self) -> io::Result<Vec<u8>> {
        let fd = sys::open_at(self.dir.fd(), &self.name, libc::O_RDONLY, 0)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)?;
        Ok(bytes)
    }

    /// The first conversion: a value at a bound key that is not the
    /// credential's is adopted when the credential has none yet, replaced
    /// when the config says the credential takes over (`replace`), and
    /// otherwise refuses the mount, so that no key is lost. The original
    /// bytes are backed up before anything is written.
    fn convert_at_mount(&self, bytes: &[u8], st: libc::stat) -> Result<(), String> {
        let snap = self.ctx.store.snapshot();
        let conv = self.to_template(&snap, bytes);
        let conflicts = self.claim_found(&snap, &conv.found);
        if !conflicts.is_empty() && !self.replace {
            return Err(format!(
                "{}: {}; nothing was changed. Bind that key to its own credential, or set replace = true on this mount to let the credential take over (the file's bytes are backed up first, under {})",
                self.shown.display(),
                conflicts.join("; "),
                self.ctx.backups.original_of(&self.shown).display()
            ));
        }
        for c in &conflicts {
            warn!(file = %self.shown.display(), "replace = true: {c}; the credential takes over");
        }
        self.report_conversion(&conv, "at mount");
        let stat = if conv.template != bytes || st.st_ino == 0 {
            if st.st_ino != 0 {
                let kept = self
                    .ctx
                    .backups
                    .keep(&self.shown, bytes)
                    .map_err(|e| format!("{}: cannot back up the original before converting it: {e}; nothing was changed", self.shown.display()))?;
                info!(file = %self.shown.display(), backup = %kept.display(), "original bytes backed up before the first conversion");
            }
            self.save_backing(&conv.template)
                .map_err(|e| self.describe(&e))?
        } else {
            st
        };
        self.install(conv.template, conv.parse_error.is_some(), stat);
        Ok(())
    }

    /// Before anything is converted: the conflicts `convert_at_mount` would
    /// refuse, over every file of every mount, so that a refused mount
    /// changes no file at all. `claims` is what earlier files would adopt.
    pub fn precheck(
        path: &std::path::Path,
        cfg: &ManagedConfig,
        store: &Store,
        adopt: &dyn Adopt,
        claims: &mut std::collections::HashMap<String, Secret>,
    ) -> Vec<String> {
        let Ok(bytes) = std::fs::read(path) else {
            return Vec::new();
        };
        let snap = store.snapshot();
        let slots: Vec<SlotRef> = cfg
            .bindings
            .iter()
            .filter_map(|b| SlotRef::parse(&b.slot).ok())
            .collect();
        let known = store.known(&snap, &slots);
        let refs: Vec<(&str, &[u8])> = known
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        let conv = render::to_template(cfg.format, &bytes, &cfg.bindings, &refs, true);
        let mut conflicts = Vec::new();
        for f in conv.found.iter().filter(|f| !f.known) {
            let Ok(slot) = SlotRef::parse(&f.slot).map(|s| adopt.target(&s)) else {
                continue;
            };
            if adopt.plausible(&slot, &f.value).is_err() {
                continue;
            }
            match snap.get(&slot).or(claims.get(&slot.to_string())) {
                Some(c) if *c == f.value => {}
                Some(c) if !cfg.replace && !adopt.validates(&slot) => conflicts.push(format!(
                    "{}: key {} holds {}, a different token than credential {} ({})",
                    path.display(),
                    f.key,
                    f.value,
                    slot.credential,
                    c
                )),
                Some(_) => {}
                None => {
                    claims.insert(slot.to_string(), f.value.clone());
                }
            }
        }
        conflicts
    }

    /// Looks at the values found at bound keys at mount. Each is the
    /// credential's (current or recent, or claimed by an earlier file this
    /// start); or becomes its first value; or is no token at all (`none`,
    /// `x`: replaced, after the backup); or is a different token than the
    /// credential's — a conflict, described for the error.
    fn claim_found(&self, snap: &Snapshot, found: &[Found]) -> Vec<String> {
        let mut conflicts = Vec::new();
        let origin = self.shown.display().to_string();
        for f in found.iter().filter(|f| !f.known) {
            let Ok(slot) = SlotRef::parse(&f.slot).map(|s| self.ctx.adopt.target(&s)) else {
                continue;
            };
            let claimed = self.ctx.claims.lock().get(&slot.to_string()).cloned();
            if let Err(why) = self.ctx.adopt.plausible(&slot, &f.value) {
                warn!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value,
                    "the value at a bound key is not a token ({why}); the credential is shown there instead");
                continue;
            }
            match snap.get(&slot).cloned().or(claimed) {
                Some(c) if c == f.value => {}
                Some(_) if self.ctx.adopt.validates(&slot) => self.offer_session(&slot, f, &origin),
                Some(c) => conflicts.push(format!(
                    "key {} holds {}, a different token than credential {} ({})",
                    f.key, f.value, slot.credential, c
                )),
                None => match self.ctx.adopt.offer(&slot, f.value.clone(), &origin) {
                    Ok(()) => {
                        info!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value,
                            "the value found in the file is the credential's first value");
                        self.ctx
                            .claims
                            .lock()
                            .insert(f.slot.clone(), f.value.clone());
                    }
                    Err(why) => conflicts.push(format!(
                        "key {} holds {}, which credential {} did not take ({why})",
                        f.key, f.value, slot.credential
                    )),
                },
            }
        }
        conflicts
    }

    /// A consumer's file held a different OAuth session at mount: offered
    /// to the source, which adopts it only if it proves newer and valid;
    /// the key shows the credential's session meanwhile (the original
    /// bytes are backed up before the conversion).
    fn offer_session(&self, slot: &SlotRef, f: &Found, origin: &str) {
        info!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value,
            "the file holds a different session than the credential: offered for validation; the credential's is shown meanwhile");
        if let Err(why) = self.ctx.adopt.offer(slot, f.value.clone(), origin) {
            info!(file = %origin, key = %f.key, slot = %slot, "not offered: {why}");
        }
    }

    fn to_template(&self, snap: &Snapshot, bytes: &[u8]) -> Conversion {
        let known = self.ctx.store.known(snap, &self.slots);
        let refs: Vec<(&str, &[u8])> = known
            .iter()
            .map(|(slot, s)| (slot.as_str(), s.expose()))
            .collect();
        render::to_template(self.format, bytes, &self.bindings, &refs, true)
    }

    fn report_conversion(&self, conv: &Conversion, when: &str) {
        if let Some(e) = &conv.parse_error {
            let msg = format!(
                "{} is not valid {} ({e}); kept as written",
                self.shown.display(),
                self.format
            );
            warn!(file = %self.shown.display(), "{when}: {msg}");
            self.note_error(msg);
        }
        for p in &conv.problems {
            warn!(file = %self.shown.display(), "{when}: {p}");
        }
        for key in &conv.inserted {
            info!(file = %self.shown.display(), key = %key, "{when}: inserted the missing bound key");
        }
        for s in &conv.stray {
            let key = if s.key.is_empty() {
                String::new()
            } else {
                format!(" (key {})", s.key)
            };
            let msg = format!(
                "a token ({}) is stored on disk at {}:{}:{}{key}, outside the bound keys: bind that key or remove it",
                s.fingerprint,
                self.shown.display(),
                s.line,
                s.column
            );
            warn!(file = %self.shown.display(), "{when}: {msg}");
            self.note_error(msg);
        }
    }

    fn install(&self, template: Vec<u8>, broken: bool, stat: libc::stat) {
        let version = self.saves.fetch_add(1, Ordering::Relaxed) + 1;
        let template = render::template(self.format, template, &self.bindings);
        *self.state.write() = State::Present {
            template: Arc::new(template),
            broken,
            version,
            stat,
        };
        self.health.lock().present = true;
    }

    fn note_error(&self, msg: String) {
        let mut h = self.health.lock();
        h.last_error = Some(msg);
        h.last_error_at = Some(SystemTime::now());
    }

    pub fn health(&self) -> FileHealth {
        self.health.lock().clone()
    }

    pub fn is_present(&self) -> bool {
        matches!(*self.state.read(), State::Present { .. })
    }

    /// The rendering of the current snapshot, or `None` if the file is absent.
    pub fn rendering(&self) -> Option<Rendering> {
        let snap = self.ctx.store.snapshot();
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
        version == r.version && self.ctx.store.snapshot().generation == r.generation
    }

    /// Renders and checks once per new (generation, template): the check
    /// parses the result, which is too slow for every open but catches a
    /// secret that breaks the format before a CLI trips on it.
    fn render(&self, snap: &Snapshot, template: &Template, broken: bool) -> SecretBytes {
        let lookup = |slot: &str| snap.get_str(slot).map(|s| s.expose());
        let mut out = Vec::new();
        for r in template.render(&lookup, &mut out) {
            let msg = format!(
                "generation {}: {r}; its placeholder is shown",
                snap.generation
            );
            tracing::error!(file = %self.shown.display(), "{msg}");
            self.note_error(msg);
        }
        self.report_missing(snap);
        if broken {
            return SecretBytes::new(out);
        }
        if let Err(e) = render::check(self.format, &out, &self.bindings, &lookup) {
            let msg = format!(
                "rendering of generation {} is not right: {e}",
                snap.generation
            );
            warn!(file = %self.shown.display(), "{msg}");
            self.note_error(msg);
        }
        SecretBytes::new(out)
    }

    /// A CLI would send a placeholder as its key (and get a 401): say which
    /// credential has no value, once per generation (renders are cached).
    fn report_missing(&self, snap: &Snapshot) {
        let missing: Vec<&SlotRef> = self
            .slots
            .iter()
            .filter(|s| snap.get(s).is_none())
            .collect();
        let Some(first) = missing.first() else {
            return;
        };
        let slots: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        let msg = format!(
            "served with placeholders: {} has no value yet (tokenfs set {})",
            slots.join(", "),
            first.credential
        );
        warn!(file = %self.shown.display(), "{msg}");
        self.note_error(msg);
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
        dress(&mut st, size, self.ctx.store.snapshot().published_at);
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
    /// renamed over this one). The value at each bound key becomes the
    /// placeholder again (a new one is offered to its credential's source
    /// first; when it is not adopted, the bytes as written are backed up);
    /// every other byte is saved as written, and bytes that do not parse are
    /// saved exactly as written and reported. Errors are the writer's errno.
    pub fn commit(&self, bytes: &[u8]) -> io::Result<()> {
        self.check_size(bytes.len() as u64)?;
        let snap = self.ctx.store.snapshot();
        let conv = self.to_template(&snap, bytes);
        self.report_conversion(&conv, "write");
        let origin = self.shown.display().to_string();
        for slot in conv
            .blanked
            .iter()
            .filter_map(|(s, _)| SlotRef::parse(s).ok())
        {
            self.ctx.adopt.blanked(&slot, &origin);
        }
        if !self.offer_found(&conv.found) {
            self.ctx.backups.keep(&self.shown, bytes).map_err(|e| {
                let msg = format!(
                    "cannot back up a write whose value at a bound key was not adopted: {e}; the previous content is kept"
                );
                tracing::error!(file = %self.shown.display(), "{msg}");
                self.note_error(msg);
                e
            })?;
        }
        let _saving = self.saving.lock();
        let stat = match self.save_backing(&conv.template) {
            Ok(st) => st,
            Err(e) => {
                let msg = format!(
                    "saving {} failed: {e}; the previous content is kept",
                    self.shown.display()
                );
                tracing::error!(file = %self.shown.display(), "{msg}");
                self.note_error(msg);
                return Err(e);
            }
        };
        self.install(conv.template, conv.parse_error.is_some(), stat);
        self.health.lock().last_write = Some(SystemTime::now());
        Ok(())
    }

    /// Offers the new values a program wrote at bound keys to their
    /// sources; `false` if one was not adopted (its bytes need a backup).
    fn offer_found(&self, found: &[Found]) -> bool {
        let origin = self.shown.display().to_string();
        let mut all = true;
        for f in found.iter().filter(|f| !f.known) {
            let Ok(slot) = SlotRef::parse(&f.slot).map(|s| self.ctx.adopt.target(&s)) else {
                continue;
            };
            match self.ctx.adopt.offer(&slot, f.value.clone(), &origin) {
                Ok(()) => {
                    info!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value, "adopted a new value written by a program")
                }
                Err(why) => {
                    all = false;
                    let msg = format!(
                        "the value written at key {} ({}) was not adopted: {why}; the key keeps showing credential {} (the write is backed up)",
                        f.key, f.value, slot.credential
                    );
                    warn!(file = %origin, "{msg}");
                    self.note_error(msg);
                }
            }
        }
        all
    }

    /// `EFBIG` for a size over the file's limit, logged and in `status`.
    pub fn check_size(&self, size: u64) -> io::Result<()> {
        if size <= self.max_size {
            return Ok(());
        }
        let msg = format!(
            "a write would make {} {size} bytes, over its limit of {} (max_file_size): refused with EFBIG, the file is unchanged",
            self.shown.display(),
            self.max_size
        );
        warn!(file = %self.shown.display(), "{msg}");
        self.note_error(msg);
        Err(io::Error::from_raw_os_error(libc::EFBIG))
    }

    /// Whether every bound position of this file can carry `cred`'s new
    /// values (asked before they are published).
    pub fn carries(&self, name: &str, cred: &Credential) -> Result<(), String> {
        let State::Present { template, .. } = &*self.state.read() else {
            return Ok(());
        };
        for slot in self.slots.iter().filter(|s| s.credential == name) {
            if let Some(secret) = cred.fields.get(&slot.field) {
                template
                    .carries(&slot.to_string(), secret.expose())
                    .map_err(|r| format!("{}: {r}", self.shown.display()))?;
            }
        }
        Ok(())
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
        let snap = self.ctx.store.snapshot();
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

    /// Writes the backing file atomically: temp file, fsync, rename, fsync of
    /// the directory. Keeps the previous owner; the mode never grants group or
    /// other access. On any error the previous file is untouched.
    fn save_backing(&self, bytes: &[u8]) -> io::Result<libc::stat> {
        let previous = match &*self.state.read() {
            State::Present { stat, .. } => Some(*stat),
            State::Absent => None,
        };
        let tmp_name = format!(
            "{TMP_PREFIX}{}-{}",
            std::process::id(),
            self.saves.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = sys::cname(std::ffi::OsStr::new(&tmp_name))?;
        let mode = previous.map_or(0o600, |st| st.st_mode & 0o700);
        let fd = sys::open_at(
            self.dir.fd(),
            &tmp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            mode,
        )?;
        let written = (|| {
            let mut file = std::fs::File::from(fd);
            file.write_all(bytes)?;
            if let Some(st) = previous {
                // Keep the owner of the original (we may be root serving a user).
                if st.st_uid != sys::euid() || st.st_gid != sys::egid() {
                    sys::chown_fd(file.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
                }
            }
            file.sync_all()?;
            sys::rename_at(self.dir.fd(), &tmp, self.dir.fd(), &self.name, 0)?;
            sys::stat_fd(file.as_fd())
        })();
        match written {
            Ok(st) => {
                if let Ok(d) = sys::reopen(self.dir.fd(), libc::O_RDONLY | libc::O_DIRECTORY) {
                    let _ = d.sync_all();
                }
                Ok(st)
            }
            Err(e) => {
                let _ = sys::unlink_at(self.dir.fd(), &tmp, 0);
                Err(e)
            }
        }
    }

    /// The file was unlinked or renamed away (its backing file is gone).
    pub fn set_absent(&self) {
        *self.state.write() = State::Absent;
        *self.cache.lock() = None;
        self.health.lock().present = false;
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

    /// Removes temp files a crashed daemon may have left in the backing dir.
    fn sweep_temp_files(&self) {
        let Ok(dir) = sys::reopen(self.dir.fd(), libc::O_RDONLY | libc::O_DIRECTORY) else {
            return;
        };
        let mut stale = Vec::new();
        let _ = sys::read_dir(&dir, 0, |e| {
            if e.name.starts_with(TMP_PREFIX.as_bytes()) {
                stale.push(e.name);
            }
            true
        });
        for name in stale {
            if let Ok(c) = CString::new(name) {
                if sys::unlink_at(self.dir.fd(), &c, 0).is_ok() {
                    info!(file = %self.shown.display(), "removed a temp file left by an earlier run");
                }
            }
        }
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
