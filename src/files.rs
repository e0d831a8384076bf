//! Degraded mode without FUSE (`mode = "files"`): each rendering is written
//! to the real file, atomically. **Tokens are then stored on disk**, and a
//! reader can still race a rotation (it sees the old or the new file whole,
//! never half, thanks to rename). Use it where `/dev/fuse` is unavailable.
//!
//! At start, each file is converted to a template in memory (a token found
//! in it becomes the credential's first value). On every new generation the
//! file is re-read: bytes a program wrote since our last write are taken as
//! its edits (secrets turned back into placeholders, new values offered to
//! the source), then the rendering is written with temp file + fsync +
//! rename + fsync(dir), keeping mode and owner, and skipped when unchanged.
//! A program's write is also taken in when it lands (inotify), so a
//! consumer's wiped OAuth session is refreshed for at once.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use parking_lot::Mutex;
use tracing::{error, info, warn};

use crate::config::{Config, ManagedConfig};
use crate::fs::{MountInfo, ServedFile};
use crate::managed::{FileHealth, TMP_PREFIX};
use crate::render::{self, Binding, Format, Template};
use crate::secret::SecretBytes;
use crate::source::Adopt;
use crate::store::{SlotRef, Snapshot, Store};

/// One file kept up to date on disk.
pub struct FileCopy {
    path: PathBuf,
    rel: PathBuf,
    format: Format,
    bindings: Vec<Binding>,
    slots: Vec<SlotRef>,
    create: bool,
    replace: bool,
    state: Mutex<CopyState>,
    health: Mutex<FileHealth>,
}

#[derive(Default)]
struct CopyState {
    template: Option<Template>,
    /// What we last wrote (or found), to tell a program's edits apart.
    last: Option<SecretBytes>,
}

impl ServedFile for FileCopy {
    fn rel(&self) -> &Path {
        &self.rel
    }
    fn format(&self) -> Format {
        self.format
    }
    fn health(&self) -> FileHealth {
        self.health.lock().clone()
    }
}

/// Converts every file and starts the writer thread. Returns what status
/// shows about each directory.
pub fn start(
    config: &Config,
    store: Arc<Store>,
    adopt: Arc<dyn Adopt>,
) -> Result<Vec<Arc<MountInfo>>, String> {
    let mut infos = Vec::new();
    let mut all = Vec::new();
    for m in &config.mounts {
        let mut files: Vec<Arc<dyn ServedFile>> = Vec::new();
        for f in &m.files {
            let copy = Arc::new(FileCopy::new(&m.dir, f));
            copy.refresh(&store, adopt.as_ref(), true);
            let weak = Arc::downgrade(&copy);
            store.on_validate(move |name, cred| {
                weak.upgrade().map_or(Ok(()), |c| c.carries(name, cred))
            });
            all.push(copy.clone());
            files.push(copy);
        }
        let mut notes = m.notes.clone();
        notes.push("files mode: tokens are written to disk (no FUSE)".into());
        infos.push(Arc::new(MountInfo::new(m.dir.clone(), notes, files)));
    }
    warn!("files mode: managed files are rewritten on disk at each rotation and hold tokens");
    let watcher = Watcher::new(&all)?;
    let (w_files, w_store, w_adopt) = (all.clone(), store.clone(), adopt.clone());
    std::thread::Builder::new()
        .name("files-watcher".into())
        .spawn(move || watcher.run(&w_files, &w_store, w_adopt.as_ref()))
        .map_err(|e| format!("cannot start the files watcher: {e}"))?;
    std::thread::Builder::new()
        .name("files-writer".into())
        .spawn(move || writer(all, store, adopt))
        .map_err(|e| format!("cannot start the files writer: {e}"))?;
    Ok(infos)
}

/// Watches the managed files' directories with inotify, so that a program's
/// write is taken in when it lands (a consumer wiping its OAuth session
/// asks for a refresh at once; a login is offered), not at the next
/// rotation. Our own renames wake it too: the bytes then equal what we
/// wrote, and nothing happens.
struct Watcher {
    inotify: Inotify,
    /// Watch descriptor → directory, for matching events to files.
    dirs: Vec<(WatchDescriptor, PathBuf)>,
}

impl Watcher {
    fn new(files: &[Arc<FileCopy>]) -> Result<Watcher, String> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
            .map_err(|e| format!("files mode: inotify: {e}"))?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO;
        let mut dirs: Vec<(WatchDescriptor, PathBuf)> = Vec::new();
        for f in files {
            let dir = f.path.parent().unwrap_or(Path::new(".")).to_owned();
            if dirs.iter().any(|(_, d)| *d == dir) {
                continue;
            }
            match inotify.add_watch(&dir, mask) {
                Ok(wd) => dirs.push((wd, dir)),
                // A directory made later by `create`: seen at rotations only.
                Err(e) => {
                    warn!(dir = %dir.display(), "files mode: cannot watch ({e}); edits there are taken in at the next rotation")
                }
            }
        }
        Ok(Watcher { inotify, dirs })
    }

    fn run(self, files: &[Arc<FileCopy>], store: &Store, adopt: &dyn Adopt) {
        loop {
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!(
                        "files mode: watching the managed files failed: {e}; edits are taken in at the next rotation"
                    );
                    return;
                }
            };
            for ev in events {
                let Some(dir) = self
                    .dirs
                    .iter()
                    .find(|(wd, _)| *wd == ev.wd)
                    .map(|(_, d)| d)
                else {
                    continue;
                };
                let Some(name) = ev.name else { continue };
                for f in files.iter().filter(|f| f.path == dir.join(&name)) {
                    f.refresh(store, adopt, false);
                }
            }
        }
    }
}

/// Puts the current secrets back where a file holds placeholders at its
/// bound keys (after a failed mount, so the files hold working tokens again).
/// Nothing else is converted or adopted: a file that was never converted is
/// left exactly as it is.
pub fn restore(config: &Config, store: &Store) {
    for m in &config.mounts {
        for f in &m.files {
            let copy = FileCopy::new(&m.dir, f);
            let Ok(bytes) = std::fs::read(&copy.path) else {
                continue;
            };
            let template = render::template(copy.format, bytes.clone(), &copy.bindings);
            if template.bound().next().is_none() {
                continue;
            }
            let rendered = render_with(&template, &store.snapshot(), &copy.path);
            if *rendered != *bytes {
                match copy.write_atomically(&rendered) {
                    Ok(()) => info!(file = %copy.path.display(), "put the current tokens back"),
                    Err(e) => {
                        error!(file = %copy.path.display(), "could not put the current tokens back: {e}")
                    }
                }
            }
        }
    }
}

/// Sleeps until the next generation (no polling), then rewrites every file.
fn writer(files: Vec<Arc<FileCopy>>, store: Arc<Store>, adopt: Arc<dyn Adopt>) {
    let mut seen = store.snapshot().generation;
    for f in &files {
        f.refresh(&store, adopt.as_ref(), false);
    }
    loop {
        let snap = store.wait_past(seen, Duration::from_secs(24 * 3600));
        if snap.generation == seen {
            continue;
        }
        seen = snap.generation;
        for f in &files {
            f.refresh(&store, adopt.as_ref(), false);
        }
    }
}

impl FileCopy {
    /// Whether every bound position can carry `cred`'s new values. While
    /// this file is being refreshed (its own conversion may publish the
    /// value it found, which it carries by definition) it is not asked.
    fn carries(&self, name: &str, cred: &crate::store::Credential) -> Result<(), String> {
        let Some(st) = self.state.try_lock() else {
            return Ok(());
        };
        let Some(template) = &st.template else {
            return Ok(());
        };
        for slot in self.slots.iter().filter(|s| s.credential == name) {
            if let Some(secret) = cred.fields.get(&slot.field) {
                template
                    .carries(&slot.to_string(), secret.expose())
                    .map_err(|r| format!("{}: {r}", self.path.display()))?;
            }
        }
        Ok(())
    }

    fn new(dir: &Path, f: &ManagedConfig) -> FileCopy {
        FileCopy {
            path: dir.join(&f.path),
            rel: f.path.clone(),
            format: f.format,
            bindings: f.bindings.clone(),
            slots: f
                .bindings
                .iter()
                .filter_map(|b| SlotRef::parse(&b.slot).ok())
                .collect(),
            create: f.create,
            replace: f.replace,
            state: Mutex::new(CopyState::default()),
            health: Mutex::new(FileHealth::default()),
        }
    }

    /// Takes in a program's edits, then writes the current rendering if it
    /// differs from the file. `convert_only` is the start-up pass.
    fn refresh(&self, store: &Store, adopt: &dyn Adopt, convert_only: bool) {
        let mut st = self.state.lock();
        let on_disk = std::fs::read(&self.path).ok().map(SecretBytes::new);
        self.health.lock().present = on_disk.is_some();
        let edited = match (&on_disk, &st.last) {
            (Some(now), Some(last)) => now != last,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if edited || (on_disk.is_none() && st.template.is_none() && self.create) {
            let bytes: &[u8] = on_disk.as_deref().unwrap_or(b"");
            st.template = Some(self.convert(store, adopt, bytes, convert_only));
            st.last = on_disk.clone();
        }
        if convert_only {
            return;
        }
        let Some(template) = &st.template else { return };
        let snap = store.snapshot();
        if self.slots.iter().any(|s| snap.get(s).is_none()) {
            return; // Never replace a token on disk with a placeholder.
        }
        let rendered = render_with(template, &snap, &self.path);
        if on_disk.as_ref() == Some(&rendered) {
            st.last = Some(rendered);
            return;
        }
        match self.write_atomically(&rendered) {
            Ok(()) => {
                st.last = Some(rendered);
                let mut h = self.health.lock();
                h.present = true;
                h.last_write = Some(SystemTime::now());
            }
            Err(e) => {
                let msg = format!(
                    "writing {} failed: {e}; it still holds the previous token",
                    self.path.display()
                );
                error!("{msg}");
                let mut h = self.health.lock();
                h.last_error = Some(msg);
                h.last_error_at = Some(SystemTime::now());
            }
        }
    }

    /// `startup`: a value found becomes the credential's first value only if
    /// it has none; later, a value a program wrote is offered to its source.
    fn convert(&self, store: &Store, adopt: &dyn Adopt, bytes: &[u8], startup: bool) -> Template {
        let snap = store.snapshot();
        let known = store.known(&snap, &self.slots);
        let refs: Vec<(&str, &[u8])> = known
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        let conv = render::to_template(self.format, bytes, &self.bindings, &refs, true);
        if let Some(e) = &conv.parse_error {
            warn!(file = %self.path.display(), "not valid {} ({e}); kept as written", self.format);
        }
        for s in &conv.stray {
            warn!(file = %self.path.display(), line = s.line, key = %s.key, fingerprint = %s.fingerprint,
                "a token is stored outside the bound keys: bind that key or remove it");
        }
        if startup && !self.replace && self.conflict(&snap, adopt, &conv.found) {
            return render::template(self.format, bytes.to_vec(), &[]);
        }
        let origin = self.path.display().to_string();
        if !startup {
            for (slot, _) in &conv.blanked {
                if let Ok(slot) = SlotRef::parse(slot) {
                    adopt.blanked(&slot, &origin);
                }
            }
        }
        for found in conv.found.into_iter().filter(|f| !f.known) {
            let Ok(slot) = SlotRef::parse(&found.slot) else {
                continue;
            };
            if !startup || snap.get(&slot).is_none() || adopt.validates(&slot) {
                match adopt.offer(&slot, found.value, &origin) {
                    Ok(()) => {
                        info!(file = %origin, slot = %slot, "adopted a value found in the file")
                    }
                    Err(why) => warn!(file = %origin, slot = %slot, "not adopted: {why}"),
                }
            }
        }
        render::template(self.format, conv.template, &self.bindings)
    }

    /// At start, a bound key holding a different token than its credential
    /// leaves the whole file alone (nothing lost), reported: whether so.
    fn conflict(&self, snap: &Snapshot, adopt: &dyn Adopt, found: &[render::Found]) -> bool {
        let conflict = found.iter().filter(|f| !f.known).find(|f| {
            let Ok(slot) = SlotRef::parse(&f.slot) else {
                return false;
            };
            let differs = snap.get(&slot).is_some_and(|c| *c != f.value);
            differs && !adopt.validates(&slot) && adopt.plausible(&slot, &f.value).is_ok()
        });
        let Some(f) = conflict else { return false };
        let msg = format!(
            "{}: key {} holds {}, a different token than credential {}: left as it is (set replace = true to let the credential take over)",
            self.path.display(),
            f.key,
            f.value,
            f.slot
        );
        error!("{msg}");
        let mut h = self.health.lock();
        h.last_error = Some(msg);
        h.last_error_at = Some(SystemTime::now());
        true
    }

    /// temp file + fsync + rename + fsync(dir), keeping mode and owner.
    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        let meta = std::fs::metadata(&self.path).ok();
        let mode = meta
            .as_ref()
            .map_or(0o600, |m| m.permissions().mode() & 0o7777);
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(bytes)?;
            if let Some(m) = &meta {
                std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

fn render_with(template: &Template, snap: &Snapshot, path: &Path) -> SecretBytes {
    let mut out = Vec::new();
    for r in template.render(&|slot| snap.get_str(slot).map(|s| s.expose()), &mut out) {
        error!(file = %path.display(), "{r}; its placeholder is kept");
    }
    SecretBytes::new(out)
}
