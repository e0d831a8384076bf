//! The managed-file core, shared by both modes: what a managed file's bytes
//! mean, whichever way they reach readers.
//!
//! A managed file is a template (the user's bytes with a placeholder at each
//! bound key) plus the credentials its bindings name. This module holds every
//! rule about it that does not depend on how it is served: the conversion of
//! bytes into a template with the known secrets, the start-up rules for a
//! value found at a bound key (adopted, offered, replaced, or a conflict that
//! refuses the start), taking in a program's write (offers, wiped sessions,
//! backups), the checked rendering, and the atomic save.
//!
//! Two callers dress it: `fs::managed` serves it over FUSE (renderings
//! cached per generation, `stat`, open handles, views) and keeps the
//! template on disk; `files` writes each rendering, tokens included, to the
//! real file. Keeping the rules here is what makes both modes refuse the
//! same conflicts and back up the same values. Nothing here knows FUSE, and
//! sources know nothing of files: they only see [`Adopt`].

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use tracing::{info, warn};

use crate::backup::Backups;
use crate::config::{Config, ManagedConfig};
use crate::fs::sys;
use crate::render::{self, Binding, Conversion, Format, Found, Template};
use crate::secret::{Secret, SecretBytes};
use crate::source::Adopt;
use crate::store::{Credential, SlotRef, Snapshot, Store};

/// Temporary files of our own atomic saves start with this; they are hidden
/// from directory listings and swept at start.
pub const TMP_PREFIX: &str = ".tokenfs-tmp-";

/// Numbers temp files, so two saves in one process never share a name.
static TEMPS: AtomicU64 = AtomicU64::new(0);

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
    /// Values files held at start, per slot, while the daemon starts: a
    /// second file with a different value for the same slot is a conflict
    /// even when the first value is still being validated.
    pub claims: Mutex<HashMap<String, Secret>>,
}

impl Context {
    pub fn new(store: Arc<Store>, adopt: Arc<dyn Adopt>, backups: Backups) -> Context {
        Context {
            store,
            adopt,
            backups,
            claims: Mutex::new(HashMap::new()),
        }
    }
}

/// What a value found at a bound key at start is, against its credential.
enum Claim {
    /// Not a token at all (`none`, `x`, empty): the credential is shown
    /// there instead (after the backup).
    NotAToken(String),
    /// The credential's value, or the one an earlier file claimed this start.
    Same,
    /// A different value for a source that validates: offered, not a conflict.
    Offer,
    /// A different token than the credential's (this one, by fingerprint).
    Differs(Secret),
    /// The credential has no value and no file claimed one yet.
    Unclaimed,
}

/// The one classification of a found value, shared by the precheck (which
/// must refuse exactly what the conversion would) and the conversion.
fn classify(
    snap: &Snapshot,
    claimed: Option<Secret>,
    adopt: &dyn Adopt,
    slot: &SlotRef,
    value: &Secret,
) -> Claim {
    if let Err(why) = adopt.plausible(slot, value) {
        return Claim::NotAToken(why);
    }
    match snap.get(slot).cloned().or(claimed) {
        Some(c) if c == *value => Claim::Same,
        Some(_) if adopt.validates(slot) => Claim::Offer,
        Some(c) => Claim::Differs(c),
        None => Claim::Unclaimed,
    }
}

/// Why a start is refused (either mode), before any file changes. Shown
/// to the user as it is: it names the file (and key), never a token, since
/// conflicts describe values by fingerprint.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{} is not a regular file (a symlink or directory); tokenfs manages regular files only: point the config at the real file", file.display())]
    NotRegular { file: PathBuf },
    #[error("{} is {size} bytes, over the limit of {limit} for a managed file: point the config at the right file, or raise max_file_size", file.display())]
    TooBig {
        file: PathBuf,
        size: u64,
        limit: u64,
    },
    /// One file's bound keys hold other tokens than their credentials.
    #[error("{}: {}; nothing was changed. Bind that key to its own credential, or set replace = true on this mount to let the credential take over (the file's bytes are backed up first, under {})", file.display(), conflicts.join("; "), backup.display())]
    Conflict {
        file: PathBuf,
        conflicts: Vec<String>,
        backup: PathBuf,
    },
    /// The precheck over every file: each conflict names its file.
    #[error("{}; nothing was changed. Bind such a key to its own credential, or set replace = true on its mount to let the credential take over (the file is backed up first, under {})", conflicts.join("; "), backups.display())]
    Conflicts {
        conflicts: Vec<String>,
        backups: PathBuf,
    },
    #[error("{}: cannot back up the original before converting it: {source}; nothing was changed", file.display())]
    Backup { file: PathBuf, source: io::Error },
    #[error("{}: the directory of a managed file must exist: {source}", file.display())]
    NoDirectory { file: PathBuf, source: io::Error },
    #[error("{}: {source}", file.display())]
    Io { file: PathBuf, source: io::Error },
}

/// Refuses, before any file is converted or written, a config whose files
/// hold a different token at a bound key than their credential (unless
/// `replace`), so that a refused start leaves every file exactly as it was.
/// Both modes call it first.
pub fn precheck(config: &Config, store: &Store, adopt: &dyn Adopt) -> Result<(), StartError> {
    let mut claims = HashMap::new();
    let mut conflicts = Vec::new();
    for m in &config.mounts {
        for f in &m.files {
            let path = m.dir.join(&f.path);
            conflicts.extend(precheck_file(&path, f, store, adopt, &mut claims));
        }
    }
    if conflicts.is_empty() {
        return Ok(());
    }
    Err(StartError::Conflicts {
        conflicts,
        backups: Backups::new(&config.state_dir).original_of(Path::new("/")),
    })
}

/// The conflicts one file would raise at start. `claims`: what earlier
/// files would adopt.
fn precheck_file(
    path: &Path,
    cfg: &ManagedConfig,
    store: &Store,
    adopt: &dyn Adopt,
    claims: &mut HashMap<String, Secret>,
) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let snap = store.snapshot();
    let slots = slots_of(cfg);
    let known = store.known(&snap, &slots);
    let conv = render::to_template(cfg.format, &bytes, &cfg.bindings, &refs(&known), true);
    let mut conflicts = Vec::new();
    for f in conv.found.iter().filter(|f| !f.known) {
        let Ok(slot) = SlotRef::parse(&f.slot).map(|s| adopt.target(&s)) else {
            continue;
        };
        let claimed = claims.get(&slot.to_string()).cloned();
        match classify(&snap, claimed, adopt, &slot, &f.value) {
            Claim::Differs(c) if !cfg.replace => conflicts.push(format!(
                "{}: key {} holds {}, a different token than credential {} ({})",
                path.display(),
                f.key,
                f.value,
                slot.credential,
                c
            )),
            Claim::Unclaimed => {
                claims.insert(slot.to_string(), f.value.clone());
            }
            _ => {}
        }
    }
    conflicts
}

fn slots_of(cfg: &ManagedConfig) -> Vec<SlotRef> {
    cfg.bindings
        .iter()
        .filter_map(|b| SlotRef::parse(&b.slot).ok())
        .collect()
}

fn refs(known: &[(String, Secret)]) -> Vec<(&str, &[u8])> {
    known
        .iter()
        .map(|(slot, s)| (slot.as_str(), s.expose()))
        .collect()
}

/// One managed file's rules, independent of how it is served.
pub struct FileCore {
    /// Path relative to the mount dir, for status.
    pub rel: PathBuf,
    /// Absolute path as programs see it: for messages and backups.
    pub shown: PathBuf,
    pub format: Format,
    bindings: Vec<Binding>,
    slots: Vec<SlotRef>,
    /// May replace a differing value at start (`replace = true`).
    replace: bool,
    /// Created (empty, with its bound keys) at start when absent.
    pub create: bool,
    /// The largest the file may become.
    pub max_size: u64,
    pub ctx: Arc<Context>,
    health: Mutex<FileHealth>,
}

impl FileCore {
    pub fn new(mount_dir: &Path, cfg: &ManagedConfig, ctx: Arc<Context>) -> FileCore {
        FileCore {
            rel: cfg.path.clone(),
            shown: mount_dir.join(&cfg.path),
            format: cfg.format,
            bindings: cfg.bindings.clone(),
            slots: slots_of(cfg),
            replace: cfg.replace,
            create: cfg.create,
            max_size: cfg.max_size,
            ctx,
            health: Mutex::new(FileHealth::default()),
        }
    }

    pub fn health(&self) -> FileHealth {
        self.health.lock().clone()
    }

    pub fn set_present(&self, present: bool) {
        self.health.lock().present = present;
    }

    /// A program's write (or, in files mode, our rendering) reached the disk.
    pub fn note_write(&self) {
        let mut h = self.health.lock();
        h.present = true;
        h.last_write = Some(SystemTime::now());
    }

    /// Records the latest failure for `status` (the caller logs it).
    pub fn note_error(&self, msg: String) {
        let mut h = self.health.lock();
        h.last_error = Some(msg);
        h.last_error_at = Some(SystemTime::now());
    }

    /// An I/O error at start, naming the file.
    pub fn io_error(&self, source: io::Error) -> StartError {
        StartError::Io {
            file: self.shown.clone(),
            source,
        }
    }

    /// Bytes as the template this file's format and bindings read them.
    pub fn template(&self, bytes: Vec<u8>) -> Template {
        render::template(self.format, bytes, &self.bindings)
    }

    /// Refuses at start what tokenfs must not manage: anything but a
    /// regular file (a symlink would be replaced by a file), and a file over
    /// the size limit (likely the wrong file).
    pub fn check_start(&self, st: &libc::stat) -> Result<(), StartError> {
        let file = self.shown.clone();
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(StartError::NotRegular { file });
        }
        let size = st.st_size.max(0) as u64;
        if size > self.max_size {
            let limit = self.max_size;
            return Err(StartError::TooBig { file, size, limit });
        }
        Ok(())
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

    /// `bytes` as a template, with every current or recent secret of the
    /// file's slots recognised (so our own earlier renderings convert back).
    pub fn to_template(&self, snap: &Snapshot, bytes: &[u8]) -> Conversion {
        let known = self.ctx.store.known(snap, &self.slots);
        render::to_template(self.format, bytes, &self.bindings, &refs(&known), true)
    }

    /// The first conversion: a value at a bound key that is not the
    /// credential's is adopted when the credential has none yet, replaced
    /// when the config says the credential takes over (`replace`), and
    /// otherwise refuses the start, so that no key is lost. When the
    /// conversion changes any byte, the original bytes are backed up before
    /// anything is written (in FUSE mode the file will hold placeholders; in
    /// files mode a replaced value is gone from it), and a failed backup
    /// refuses the start too. `existed`: there were bytes to back up.
    pub fn convert_at_start(&self, bytes: &[u8], existed: bool) -> Result<Conversion, StartError> {
        let snap = self.ctx.store.snapshot();
        let conv = self.to_template(&snap, bytes);
        let conflicts = self.claim_found(&snap, &conv.found);
        if !conflicts.is_empty() && !self.replace {
            return Err(StartError::Conflict {
                file: self.shown.clone(),
                conflicts,
                backup: self.ctx.backups.original_of(&self.shown),
            });
        }
        for c in &conflicts {
            warn!(file = %self.shown.display(), "replace = true: {c}; the credential takes over");
        }
        self.report_conversion(&conv, "at start");
        if existed && conv.template != bytes {
            let kept = self
                .ctx
                .backups
                .keep(&self.shown, bytes)
                .map_err(|source| StartError::Backup {
                    file: self.shown.clone(),
                    source,
                })?;
            info!(file = %self.shown.display(), backup = %kept.display(), "original bytes backed up before the first conversion");
        }
        Ok(conv)
    }

    /// Looks at the values found at bound keys at start. Each is the
    /// credential's (current or recent, or claimed by an earlier file this
    /// start); or becomes its first value; or is no token at all (`none`,
    /// `x`: replaced, after the backup); or is offered to a source that
    /// validates; or is a different token than the credential's — a
    /// conflict, described for the error.
    fn claim_found(&self, snap: &Snapshot, found: &[Found]) -> Vec<String> {
        let mut conflicts = Vec::new();
        let origin = self.shown.display().to_string();
        let adopt = self.ctx.adopt.as_ref();
        for f in found.iter().filter(|f| !f.known) {
            let Ok(slot) = SlotRef::parse(&f.slot).map(|s| adopt.target(&s)) else {
                continue;
            };
            let claimed = self.ctx.claims.lock().get(&slot.to_string()).cloned();
            match classify(snap, claimed, adopt, &slot, &f.value) {
                Claim::Same => {}
                Claim::NotAToken(why) => {
                    warn!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value,
                        "the value at a bound key is not a token ({why}); the credential is shown there instead");
                }
                Claim::Offer => self.offer_session(&slot, f, &origin),
                Claim::Differs(c) => conflicts.push(format!(
                    "key {} holds {}, a different token than credential {} ({})",
                    f.key, f.value, slot.credential, c
                )),
                Claim::Unclaimed => match adopt.offer(&slot, f.value.clone(), &origin) {
                    Ok(()) => {
                        info!(file = %origin, key = %f.key, slot = %slot, fingerprint = %f.value,
                            "the value found in the file is the credential's first value");
                        let mut claims = self.ctx.claims.lock();
                        claims.insert(slot.to_string(), f.value.clone());
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

    /// A consumer's file held a different OAuth session at start: offered
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

    /// Takes in bytes a program wrote. The value at each bound key becomes
    /// the placeholder again (a new one is offered to its credential's
    /// source first; when it is not adopted, the bytes as written are
    /// backed up, since the key will show the credential instead); a key
    /// the write left empty tells its source the session was wiped. Returns
    /// the conversion to save; errors are the writer's errno (`EFBIG`, or a
    /// failed backup), and then nothing may be saved.
    pub fn take_write(&self, bytes: &[u8]) -> io::Result<Conversion> {
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
                tracing::error!(file = %origin, "{msg}");
                self.note_error(msg);
                e
            })?;
        }
        Ok(conv)
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

    /// Logs what a conversion found, and puts what a user must act on
    /// (bytes that do not parse, a token outside the bound keys) in `status`.
    fn report_conversion(&self, conv: &Conversion, when: &str) {
        let file = self.shown.display();
        if let Some(e) = &conv.parse_error {
            let msg = format!("{file} is not valid {} ({e}); kept as written", self.format);
            warn!(file = %file, "{when}: {msg}");
            self.note_error(msg);
        }
        for p in &conv.problems {
            warn!(file = %file, "{when}: {p}");
        }
        for key in &conv.inserted {
            info!(file = %file, key = %key, "{when}: inserted the missing bound key");
        }
        for s in &conv.stray {
            let key = if s.key.is_empty() {
                String::new()
            } else {
                format!(" (key {})", s.key)
            };
            let msg = format!(
                "a token ({}) is stored on disk at {file}:{}:{}{key}, outside the bound keys: bind that key or remove it",
                s.fingerprint, s.line, s.column
            );
            warn!(file = %file, "{when}: {msg}");
            self.note_error(msg);
        }
    }

    /// The slots of this file with no value in `snap`, described with the
    /// command that gives one (a CLI would send a placeholder as its key).
    pub fn missing(&self, snap: &Snapshot) -> Option<String> {
        let missing: Vec<&SlotRef> = self
            .slots
            .iter()
            .filter(|s| snap.get(s).is_none())
            .collect();
        let first = missing.first()?;
        let slots: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        Some(format!(
            "{} has no value yet (tokenfs set {})",
            slots.join(", "),
            first.credential
        ))
    }

    /// Renders `template` with `snap`'s secrets and checks the result: it
    /// must parse and decode back to each secret, which catches a secret
    /// that breaks the format before a CLI trips on it. `broken`: the
    /// template did not parse when taken in (already reported), so the
    /// rendering is not checked either.
    pub fn render(&self, snap: &Snapshot, template: &Template, broken: bool) -> SecretBytes {
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

    /// Whether every bound position of `template` can carry `cred`'s new
    /// values (asked before they are published, so a secret the format
    /// cannot hold is refused instead of served broken).
    pub fn carries(
        &self,
        template: &Template,
        name: &str,
        cred: &Credential,
    ) -> Result<(), String> {
        for slot in self.slots.iter().filter(|s| s.credential == name) {
            if let Some(secret) = cred.fields.get(&slot.field) {
                template
                    .carries(&slot.to_string(), secret.expose())
                    .map_err(|r| format!("{}: {r}", self.shown.display()))?;
            }
        }
        Ok(())
    }
}

/// Reads `name` in `dir` without following a symlink.
pub fn read_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    let fd = sys::open_at(dir, name, libc::O_RDONLY, 0)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes)?;
    Ok(bytes)
}

/// Writes `name` in `dir` atomically: temp file, fsync, rename, fsync of
/// the directory, so a reader sees the old or the new file whole and a
/// crash leaves one of them. `previous`: the file being replaced, whose
/// owner is kept (we may be root serving a user) and whose mode bits in
/// `keep_mode` are kept (a new file is 0600). On any error the previous
/// file is untouched. Returns the new file's stat.
pub fn save_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    bytes: &[u8],
    previous: Option<&libc::stat>,
    keep_mode: u32,
) -> io::Result<libc::stat> {
    let tmp_name = format!(
        "{TMP_PREFIX}{}-{}",
        std::process::id(),
        TEMPS.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = sys::cname(std::ffi::OsStr::new(&tmp_name))?;
    let mode = previous.map_or(0o600, |st| st.st_mode & keep_mode);
    let fd = sys::open_at(
        dir,
        &tmp,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        mode,
    )?;
    let written = (|| {
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        if let Some(st) = previous {
            if st.st_uid != sys::euid() || st.st_gid != sys::egid() {
                sys::chown_fd(file.as_fd(), Some(st.st_uid), Some(st.st_gid))?;
            }
            // The umask and a chown may have dropped bits the file had.
            sys::chmod_fd(file.as_fd(), mode)?;
        }
        file.sync_all()?;
        sys::rename_at(dir, &tmp, dir, name, 0)?;
        sys::stat_fd(file.as_fd())
    })();
    match written {
        Ok(st) => {
            if let Ok(d) = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY) {
                let _ = d.sync_all();
            }
            Ok(st)
        }
        Err(e) => {
            let _ = sys::unlink_at(dir, &tmp, 0);
            Err(e)
        }
    }
}

/// Removes temp files a crashed daemon may have left in `dir` (they may
/// hold tokens). `shown` names the file, for the log.
pub fn sweep_temp_files(dir: BorrowedFd<'_>, shown: &Path) {
    let Ok(handle) = sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY) else {
        return;
    };
    let mut stale = Vec::new();
    let _ = sys::read_dir(&handle, 0, |e| {
        if e.name.starts_with(TMP_PREFIX.as_bytes()) {
            stale.push(e.name);
        }
        true
    });
    for name in stale {
        if let Ok(c) = CString::new(name) {
            if sys::unlink_at(dir, &c, 0).is_ok() {
                info!(file = %shown.display(), "removed a temp file left by an earlier run");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core's rules on a tempdir, without FUSE or root: what both modes
    //! do at start and when a program writes.

    use super::*;
    use crate::store::Update;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::PermissionsExt;

    const T1: &str = "dapiaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
    const T2: &str = "dapibbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

    /// A source that records what it is offered, and takes it or not.
    struct Fake {
        take: bool,
        validates: bool,
        offered: Mutex<Vec<String>>,
    }

    impl Adopt for Fake {
        fn offer(&self, slot: &SlotRef, _value: Secret, _origin: &str) -> Result<(), String> {
            self.offered.lock().push(slot.to_string());
            if self.take {
                Ok(())
            } else {
                Err("refused by the test".into())
            }
        }
        fn plausible(&self, _slot: &SlotRef, value: &Secret) -> Result<(), String> {
            crate::source::plausible(value, crate::source::DEFAULT_MIN_LENGTH)
        }
        fn validates(&self, _slot: &SlotRef) -> bool {
            self.validates
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        config: Config,
        store: Arc<Store>,
        adopt: Arc<Fake>,
        ctx: Arc<Context>,
    }

    /// Two YAML files, `a.yaml` and `b.yaml`, both bound to databricks.token;
    /// the credential holds `current` when given.
    fn fixture(current: Option<&str>, take: bool, validates: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut text = format!(
            "state_dir = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().display()
        );
        for name in ["a.yaml", "b.yaml"] {
            text.push_str(&format!(
                "[[mount.file]]\npath = \"{name}\"\nformat = \"yaml\"\nbind = {{ \"model.api_key\" = \"databricks.token\" }}\n"
            ));
        }
        let config = crate::preset::parse_config(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(Store::new([("databricks", "push")]));
        if let Some(t) = current {
            let r = store.publish("databricks", Update::token(Secret::new(t)));
            assert!(r.is_ok(), "{r:?}");
        }
        let adopt = Arc::new(Fake {
            take,
            validates,
            offered: Mutex::new(Vec::new()),
        });
        let backups = Backups::new(&config.state_dir);
        let ctx = Arc::new(Context::new(store.clone(), adopt.clone(), backups));
        Fixture {
            dir,
            config,
            store,
            adopt,
            ctx,
        }
    }

    impl Fixture {
        fn core(&self, i: usize) -> FileCore {
            let m = &self.config.mounts[0];
            FileCore::new(&m.dir, &m.files[i], self.ctx.clone())
        }
        fn write(&self, name: &str, text: &str) -> Vec<u8> {
            std::fs::write(self.dir.path().join(name), text).unwrap_or_else(|e| panic!("{e}"));
            text.as_bytes().to_vec()
        }
        fn backup(&self, core: &FileCore) -> Option<String> {
            std::fs::read_to_string(self.ctx.backups.original_of(&core.shown)).ok()
        }
    }

    fn yaml(value: &str) -> String {
        format!("# keep me\nmodel:\n  api_key: {value}\n  note: \"a \\\"b\\\" # c \\\\ d\"\n")
    }

    #[test]
    fn no_token_at_a_bound_key_is_replaced_after_a_backup_and_not_offered() {
        for value in ["none", "x", "\"\""] {
            let f = fixture(Some(T1), true, false);
            let core = f.core(0);
            let bytes = f.write("a.yaml", &yaml(value));
            let conv = core
                .convert_at_start(&bytes, true)
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            let text = String::from_utf8_lossy(&conv.template).into_owned();
            assert!(text.contains("__tokenfs:databricks.token__"), "{text}");
            assert!(text.contains("note: \"a \\\"b\\\" # c \\\\ d\""), "{text}");
            assert_eq!(f.backup(&core), Some(yaml(value)), "{value}");
            assert!(f.adopt.offered.lock().is_empty(), "{value}");
        }
    }

    #[test]
    fn the_credentials_own_token_converts_and_a_first_value_is_adopted() {
        let f = fixture(None, true, false);
        let (a, b) = (f.core(0), f.core(1));
        let bytes = f.write("a.yaml", &yaml(T1));
        assert!(a.convert_at_start(&bytes, true).is_ok());
        assert_eq!(*f.adopt.offered.lock(), vec!["databricks.token"]);
        // A second file holding the value the first one claimed agrees.
        let bytes = f.write("b.yaml", &yaml(T1));
        assert!(b.convert_at_start(&bytes, true).is_ok());
        assert_eq!(
            f.adopt.offered.lock().len(),
            1,
            "claimed, not offered twice"
        );
    }

    #[test]
    fn a_different_token_refuses_the_start_naming_file_and_key_without_the_token() {
        let f = fixture(Some(T1), true, false);
        let core = f.core(0);
        let bytes = f.write("a.yaml", &yaml(T2));
        let err = match core.convert_at_start(&bytes, true) {
            Ok(_) => panic!("a conflicting token was converted"),
            Err(e @ StartError::Conflict { .. }) => e.to_string(),
            Err(e) => panic!("not a conflict: {e}"),
        };
        assert!(
            err.contains("a.yaml") && err.contains("model.api_key"),
            "{err}"
        );
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(!err.contains(T1) && !err.contains(T2), "{err}");
        assert_eq!(f.backup(&core), None, "nothing was backed up");
    }

    #[test]
    fn a_validating_source_is_offered_a_different_session_instead_of_refusing() {
        let f = fixture(Some(T1), true, true);
        let core = f.core(0);
        let bytes = f.write("a.yaml", &yaml(T2));
        assert!(core.convert_at_start(&bytes, true).is_ok());
        assert_eq!(*f.adopt.offered.lock(), vec!["databricks.token"]);
        assert_eq!(
            f.backup(&core),
            Some(yaml(T2)),
            "backed up before replacing"
        );
    }

    #[test]
    fn precheck_refuses_two_files_with_two_tokens_for_one_credential() {
        let f = fixture(None, true, false);
        f.write("a.yaml", &yaml(T1));
        f.write("b.yaml", &yaml(T2));
        let err = match precheck(&f.config, &f.store, f.adopt.as_ref()) {
            Ok(()) => panic!("two tokens for one credential were accepted"),
            Err(e @ StartError::Conflicts { .. }) => e.to_string(),
            Err(e) => panic!("not the precheck's conflicts: {e}"),
        };
        assert!(
            err.contains("b.yaml") && err.contains("model.api_key"),
            "{err}"
        );
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(!err.contains(T1) && !err.contains(T2), "{err}");
        assert!(
            f.adopt.offered.lock().is_empty(),
            "the precheck offers nothing"
        );
        // The same token in both files is one credential's value.
        f.write("b.yaml", &yaml(T1));
        assert!(precheck(&f.config, &f.store, f.adopt.as_ref()).is_ok());
    }

    #[test]
    fn a_written_value_that_is_not_adopted_is_backed_up_and_reported() {
        let f = fixture(Some(T1), false, false);
        let core = f.core(0);
        let conv = core.take_write(yaml(T2).as_bytes());
        let conv = conv.unwrap_or_else(|e| panic!("{e}"));
        assert!(String::from_utf8_lossy(&conv.template).contains("__tokenfs:"));
        assert_eq!(f.backup(&core), Some(yaml(T2)));
        let health = core.health();
        let error = health.last_error.unwrap_or_default();
        assert!(
            error.contains("not adopted") && !error.contains(T2),
            "{error}"
        );
        // Our own token written back is ours: no offer, no new backup.
        assert!(core.take_write(yaml(T1).as_bytes()).is_ok());
        assert_eq!(f.adopt.offered.lock().len(), 1);
    }

    #[test]
    fn a_write_over_the_size_limit_is_efbig() {
        let f = fixture(Some(T1), true, false);
        let core = f.core(0);
        let big = vec![b'#'; core.max_size as usize + 1];
        let errno = core.take_write(&big).err().and_then(|e| e.raw_os_error());
        assert_eq!(errno, Some(libc::EFBIG));
    }

    #[test]
    fn a_rendering_carries_the_current_token_and_reports_a_missing_one() {
        let f = fixture(None, true, false);
        let core = f.core(0);
        let conv = core.to_template(&f.store.snapshot(), yaml("none").as_bytes());
        let template = core.template(conv.template);
        let missing = core.missing(&f.store.snapshot()).unwrap_or_default();
        assert!(missing.contains("tokenfs set databricks"), "{missing}");
        let r = f
            .store
            .publish("databricks", Update::token(Secret::new(T1)));
        assert!(r.is_ok(), "{r:?}");
        let snap = f.store.snapshot();
        assert_eq!(core.missing(&snap), None);
        let out = core.render(&snap, &template, false);
        assert_eq!(String::from_utf8_lossy(&out), yaml(T1));
        assert_eq!(core.health().last_error, None, "the rendering checks out");
    }

    #[test]
    fn save_at_keeps_the_mode_and_leaves_no_temp_file_and_stale_ones_are_swept() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f.env");
        std::fs::write(&path, "A=1\n").unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::Permissions::from_mode(0o640);
        std::fs::set_permissions(&path, mode).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join(format!("{TMP_PREFIX}stale")), "T")
            .unwrap_or_else(|e| panic!("{e}"));
        let fd: OwnedFd = sys::open_dir_path(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let name = CString::new("f.env").unwrap_or_default();
        let previous = sys::stat_name(fd.as_fd(), &name).ok();
        let st = save_at(fd.as_fd(), &name, b"A=2\n", previous.as_ref(), 0o7777);
        let st = st.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(st.st_mode & 0o7777, 0o640);
        assert_eq!(std::fs::read(&path).unwrap_or_default(), b"A=2\n");
        sweep_temp_files(fd.as_fd(), &path);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.env")]);
    }
}
