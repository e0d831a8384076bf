//! Degraded mode without FUSE (`mode = "files"`): each rendering is written
//! to the real file, atomically. **Tokens are then stored on disk**, and a
//! reader can still race a rotation (it sees the old or the new file whole,
//! never half, thanks to rename). Use it where `/dev/fuse` is unavailable.
//!
//! The rules of a managed file are the core's ([`crate::managed`]), the
//! same as in FUSE mode: a config whose files hold a different token at a
//! bound key than their credential refuses to start before any file
//! changes; a value tokenfs replaces is backed up first; `none` or `x` at a
//! bound key is no token and is simply replaced; an OAuth session found is
//! offered for validation; what a conversion finds is reported in `status`.
//! What is left here is what files mode alone does: on every new
//! generation the file is re-read, bytes a program wrote since our last
//! write are taken in as its edits, then the rendering is written with the
//! core's atomic save, keeping mode and owner, and skipped when unchanged.
//! A program's write is also taken in when it lands (inotify), so a
//! consumer's wiped OAuth session is refreshed for at once.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use parking_lot::{Mutex, RwLock};
use tracing::{error, info, warn};

use crate::backup::Backups;
use crate::config::{Config, ManagedConfig};
use crate::fs::{MountInfo, ServedFile, sys};
use crate::managed::{self, Context, FileCore, FileHealth, StartError};
use crate::render::{self, Format, Template};
use crate::secret::SecretBytes;
use crate::source::Adopt;
use crate::store::{Credential, Store};

/// One file kept up to date on disk.
pub struct FileCopy {
    core: FileCore,
    /// The real file's directory and name (`core.shown` is both joined).
    dir: PathBuf,
    name: CString,
    /// The template, and whether it did not parse. `None` while there is
    /// nothing to write: the file is absent (and not `create`), or it is
    /// left alone because a program's write could not be taken in (over the
    /// size limit, or its backup failed). Kept apart from `last` so that a
    /// publish asking [`FileCopy::carries`] while a refresh offers a value
    /// does not wait for that refresh.
    template: RwLock<Option<(Arc<Template>, bool)>>,
    /// What we last wrote or took in, to tell a program's edits apart.
    /// Held for a whole refresh, so refreshes never interleave.
    last: Mutex<Option<SecretBytes>>,
}

impl ServedFile for FileCopy {
    fn rel(&self) -> &Path {
        &self.core.rel
    }
    fn format(&self) -> Format {
        self.core.format
    }
    fn health(&self) -> FileHealth {
        self.core.health()
    }
}

/// Checks every file against its credential (refusing a conflict before
/// anything changes), converts them, and starts the watcher and the writer
/// thread. Returns what status shows about each directory.
pub fn start(
    config: &Config,
    store: Arc<Store>,
    adopt: Arc<dyn Adopt>,
) -> Result<Vec<Arc<MountInfo>>, String> {
    let backups = Backups::new(&config.state_dir);
    let ctx = Arc::new(Context::new(store.clone(), adopt, backups));
    managed::precheck(config, &store, ctx.adopt.as_ref()).map_err(|e| e.to_string())?;
    let mut infos = Vec::new();
    let mut all = Vec::new();
    for m in &config.mounts {
        let mut files: Vec<Arc<dyn ServedFile>> = Vec::new();
        for f in &m.files {
            let copy = Arc::new(FileCopy::load(&m.dir, f, ctx.clone()).map_err(|e| e.to_string())?);
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
    let w_files = all.clone();
    std::thread::Builder::new()
        .name("files-watcher".into())
        .spawn(move || watcher.run(&w_files))
        .map_err(|e| format!("cannot start the files watcher: {e}"))?;
    std::thread::Builder::new()
        .name("files-writer".into())
        .spawn(move || writer(all, store))
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
            if dirs.iter().any(|(_, d)| *d == f.dir) {
                continue;
            }
            match inotify.add_watch(&f.dir, mask) {
                Ok(wd) => dirs.push((wd, f.dir.clone())),
                // A directory made later by `create`: seen at rotations only.
                Err(e) => {
                    warn!(dir = %f.dir.display(), "files mode: cannot watch ({e}); edits there are taken in at the next rotation")
                }
            }
        }
        Ok(Watcher { inotify, dirs })
    }

    fn run(self, files: &[Arc<FileCopy>]) {
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
                for f in files.iter().filter(|f| f.core.shown == dir.join(&name)) {
                    f.refresh();
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
            restore_file(&m.dir.join(&f.path), f, store);
        }
    }
}

fn restore_file(path: &Path, cfg: &ManagedConfig, store: &Store) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let template = render::template(cfg.format, bytes.clone(), &cfg.bindings);
    if template.bound().next().is_none() {
        return;
    }
    let snap = store.snapshot();
    let mut rendered = Vec::new();
    for r in template.render(
        &|slot| snap.get_str(slot).map(|s| s.expose()),
        &mut rendered,
    ) {
        error!(file = %path.display(), "{r}; its placeholder is kept");
    }
    let rendered = SecretBytes::new(rendered);
    if *rendered == *bytes {
        return;
    }
    let saved = split(path).and_then(|(dir, name)| {
        let dir = sys::open_dir_path(&dir)?;
        let previous = sys::stat_name(dir.as_fd(), &name).ok();
        managed::save_at(dir.as_fd(), &name, &rendered, previous.as_ref(), 0o7777)
    });
    match saved {
        Ok(_) => info!(file = %path.display(), "put the current tokens back"),
        Err(e) => error!(file = %path.display(), "could not put the current tokens back: {e}"),
    }
}

/// A file's directory and its name as a C string.
fn split(path: &Path) -> std::io::Result<(PathBuf, CString)> {
    let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
    let name = sys::cname(path.file_name().unwrap_or_default())?;
    Ok((dir, name))
}

/// Sleeps until the next generation (no polling), then rewrites every file.
fn writer(files: Vec<Arc<FileCopy>>, store: Arc<Store>) {
    let mut seen = store.snapshot().generation;
    for f in &files {
        f.refresh();
    }
    loop {
        let snap = store.wait_past(seen, Duration::from_secs(24 * 3600));
        if snap.generation == seen {
            continue;
        }
        seen = snap.generation;
        for f in &files {
            f.refresh();
        }
    }
}

impl FileCopy {
    /// Converts the file found at start (or an empty one with `create`),
    /// with the same refusals as a mount: not a regular file, over the size
    /// limit, a conflicting value at a bound key, a failed backup. Nothing
    /// is written here; the writer writes the first rendering.
    fn load(
        mount_dir: &Path,
        cfg: &ManagedConfig,
        ctx: Arc<Context>,
    ) -> Result<FileCopy, StartError> {
        let core = FileCore::new(mount_dir, cfg, ctx);
        let (dir, name) = split(&core.shown).map_err(|e| core.io_error(e))?;
        let copy = FileCopy {
            core,
            dir,
            name,
            template: RwLock::new(None),
            last: Mutex::new(None),
        };
        let Ok(dir) = copy.open_dir() else {
            info!(file = %copy.core.shown.display(), "the directory of this managed file does not exist; it is written once that directory exists");
            if copy.core.create {
                let conv = copy.core.convert_at_start(b"", false)?;
                copy.install(conv.template, conv.parse_error.is_some());
            }
            return Ok(copy);
        };
        managed::sweep_temp_files(dir.as_fd(), &copy.core.shown);
        copy.first_conversion(dir.as_fd())?;
        Ok(copy)
    }

    fn first_conversion(&self, dir: BorrowedFd<'_>) -> Result<(), StartError> {
        let core = &self.core;
        match sys::stat_name(dir, &self.name) {
            Ok(st) => {
                core.check_start(&st)?;
                let bytes = managed::read_at(dir, &self.name).map_err(|e| core.io_error(e))?;
                let conv = core.convert_at_start(&bytes, true)?;
                self.install(conv.template, conv.parse_error.is_some());
                *self.last.lock() = Some(SecretBytes::new(bytes));
                core.set_present(true);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && core.create => {
                let conv = core.convert_at_start(b"", false)?;
                self.install(conv.template, conv.parse_error.is_some());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                info!(file = %core.shown.display(), "managed file does not exist; it is written once a program creates it");
            }
            Err(e) => return Err(core.io_error(e)),
        }
        Ok(())
    }

    fn open_dir(&self) -> std::io::Result<OwnedFd> {
        sys::open_dir_path(&self.dir)
    }

    fn install(&self, template: Vec<u8>, broken: bool) {
        *self.template.write() = Some((Arc::new(self.core.template(template)), broken));
    }

    /// Whether every bound position can carry `cred`'s new values.
    fn carries(&self, name: &str, cred: &Credential) -> Result<(), String> {
        let Some((template, _)) = self.template.read().clone() else {
            return Ok(());
        };
        self.core.carries(&template, name, cred)
    }

    /// Takes in a program's edits, then writes the current rendering if it
    /// differs from the file.
    fn refresh(&self) {
        let mut last = self.last.lock();
        let Ok(dir) = self.open_dir() else {
            self.core.set_present(false);
            return;
        };
        let on_disk = match managed::read_at(dir.as_fd(), &self.name) {
            Ok(bytes) => Some(SecretBytes::new(bytes)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => {
                // A symlink or directory put in its place: not ours to replace.
                let msg = format!("cannot read it ({e}); it is left as it is");
                warn!(file = %self.core.shown.display(), "{msg}");
                return self.core.note_error(msg);
            }
        };
        self.core.set_present(on_disk.is_some());
        if let Some(now) = on_disk.as_ref().filter(|now| last.as_ref() != Some(*now)) {
            self.take_in(now);
            *last = on_disk.clone();
        }
        if let Some(written) = self.write_rendering(dir.as_fd(), on_disk.as_ref()) {
            *last = Some(written);
        }
    }

    /// A program's edit: taken in by the core, as a write through the mount
    /// would be. One the core refuses (over the size limit, or a value that
    /// could not be backed up) leaves the file alone until it changes again,
    /// since writing the rendering over it would lose the program's bytes.
    fn take_in(&self, bytes: &[u8]) {
        match self.core.take_write(bytes) {
            Ok(conv) => self.install(conv.template, conv.parse_error.is_some()),
            Err(e) => {
                warn!(file = %self.core.shown.display(), "a program's edit was not taken in ({e}); the file is left as it is until it changes");
                *self.template.write() = None;
            }
        }
    }

    /// Writes the rendering of the current snapshot unless the file already
    /// holds it; returns what the file holds now when that is the rendering.
    /// A file whose credential has no value yet is not written: a token on
    /// disk is never replaced by a placeholder.
    fn write_rendering(
        &self,
        dir: BorrowedFd<'_>,
        on_disk: Option<&SecretBytes>,
    ) -> Option<SecretBytes> {
        let (template, broken) = self.template.read().clone()?;
        let snap = self.core.ctx.store.snapshot();
        if let Some(missing) = self.core.missing(&snap) {
            let msg = format!("not written yet: {missing}");
            warn!(file = %self.core.shown.display(), "{msg}");
            self.core.note_error(msg);
            return None;
        }
        let rendered = self.core.render(&snap, &template, broken);
        if on_disk == Some(&rendered) {
            return Some(rendered);
        }
        let previous = sys::stat_name(dir, &self.name).ok();
        match managed::save_at(dir, &self.name, &rendered, previous.as_ref(), 0o7777) {
            Ok(_) => {
                self.core.note_write();
                Some(rendered)
            }
            Err(e) => {
                let msg = format!(
                    "writing {} failed: {e}; it still holds the previous token",
                    self.core.shown.display()
                );
                error!("{msg}");
                self.core.note_error(msg);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Files mode on a tempdir (no FUSE, no root): the start-up rules it
    //! shares with FUSE mode, and what it writes to the real file.

    use super::*;
    use crate::secret::Secret;
    use crate::store::{SlotRef, Update};
    use std::os::unix::fs::PermissionsExt;

    const T1: &str = "dapiaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
    const T2: &str = "dapibbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

    /// Takes every plausible value (nothing validates).
    struct TakeAll;

    impl Adopt for TakeAll {
        fn offer(&self, _slot: &SlotRef, _value: Secret, _origin: &str) -> Result<(), String> {
            Ok(())
        }
        fn plausible(&self, _slot: &SlotRef, value: &Secret) -> Result<(), String> {
            crate::source::plausible(value, crate::source::DEFAULT_MIN_LENGTH)
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        config: Config,
        store: Arc<Store>,
    }

    /// `config.yaml` and `.env` in one directory, both bound to
    /// databricks.token, which holds `T1`.
    fn fixture(yaml: &str, env: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join(".env"), env).unwrap_or_else(|e| panic!("{e}"));
        let text = format!(
            "mode = \"files\"\nstate_dir = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nformat = \"yaml\"\nbind = {{ \"model.api_key\" = \"databricks.token\" }}\n[[mount.file]]\npath = \".env\"\nformat = \"dotenv\"\nbind = {{ \"API_KEY\" = \"databricks.token\" }}\n",
            dir.path().join("state").display(),
            dir.path().display()
        );
        let config = crate::preset::parse_config(Path::new("test.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(Store::new([("databricks", "push")]));
        let r = store.publish("databricks", Update::token(Secret::new(T1)));
        assert!(r.is_ok(), "{r:?}");
        Fixture { dir, config, store }
    }

    impl Fixture {
        fn copies(&self) -> Result<Vec<FileCopy>, StartError> {
            let adopt: Arc<dyn Adopt> = Arc::new(TakeAll);
            managed::precheck(&self.config, &self.store, adopt.as_ref())?;
            let backups = Backups::new(&self.config.state_dir);
            let ctx = Arc::new(Context::new(self.store.clone(), adopt, backups));
            let m = &self.config.mounts[0];
            m.files
                .iter()
                .map(|f| FileCopy::load(&m.dir, f, ctx.clone()))
                .collect()
        }
        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
        }
        fn backup(&self, name: &str) -> Option<String> {
            let backups = Backups::new(&self.config.state_dir);
            let original = backups.original_of(&self.dir.path().join(name));
            std::fs::read_to_string(original).ok()
        }
    }

    const YAML: &str = "# keep: 'quotes' \"and\" # hashes\nmodel:\n  api_key: none\n  note: \"a \\\"b\\\" # c \\\\ d\"\n  path: 'C:\\Users\\x'  # trailing\n";
    const ENV: &str = "API_KEY=x\nQUOTED=\"a \\\"b\\\" # c\"\nRAW='x\\y'\nHASH=abc#def\n";

    #[test]
    fn no_token_is_replaced_after_a_backup_and_every_other_byte_is_kept() {
        let f = fixture(YAML, ENV);
        for copy in f.copies().unwrap_or_else(|e| panic!("{e}")) {
            copy.refresh();
        }
        assert_eq!(f.read("config.yaml"), YAML.replace("none", T1));
        assert_eq!(
            f.read(".env"),
            ENV.replace("API_KEY=x", &format!("API_KEY={T1}"))
        );
        assert_eq!(f.backup("config.yaml").as_deref(), Some(YAML));
        assert_eq!(f.backup(".env").as_deref(), Some(ENV));
    }

    #[test]
    fn an_empty_value_is_filled_after_a_backup() {
        let f = fixture("model:\n  api_key: ''\n", "API_KEY=\n# end\n");
        for copy in f.copies().unwrap_or_else(|e| panic!("{e}")) {
            copy.refresh();
        }
        assert_eq!(f.read(".env"), format!("API_KEY={T1}\n# end\n"));
        let yaml = f.read("config.yaml");
        assert!(yaml.contains(T1), "{yaml}");
        assert_eq!(f.backup(".env").as_deref(), Some("API_KEY=\n# end\n"));
    }

    #[test]
    fn two_tokens_for_one_credential_refuse_to_start_and_change_nothing() {
        let yaml = YAML.replace("none", T1);
        let env = ENV.replace("API_KEY=x", &format!("API_KEY={T2}"));
        let f = fixture(&yaml, &env);
        let err = match f.copies() {
            Ok(_) => panic!("a conflicting token was accepted"),
            Err(e @ (StartError::Conflict { .. } | StartError::Conflicts { .. })) => e.to_string(),
            Err(e) => panic!("not a conflict: {e}"),
        };
        assert!(err.contains(".env") && err.contains("API_KEY"), "{err}");
        assert!(err.contains("nothing was changed"), "{err}");
        assert!(!err.contains(T1) && !err.contains(T2), "{err}");
        assert_eq!((f.read("config.yaml"), f.read(".env")), (yaml, env));
        assert!(!f.dir.path().join("state").exists(), "nothing backed up");
    }

    #[test]
    fn a_program_edit_with_quotes_and_hashes_survives_a_rotation_keeping_its_mode() {
        let f = fixture(YAML, ENV);
        let copies = f.copies().unwrap_or_else(|e| panic!("{e}"));
        copies.iter().for_each(FileCopy::refresh);
        let path = f.dir.path().join(".env");
        let edited = format!("API_KEY={T1}\nNEW=\"q # \\\\\"\n");
        std::fs::write(&path, &edited).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::Permissions::from_mode(0o640);
        std::fs::set_permissions(&path, mode).unwrap_or_else(|e| panic!("{e}"));
        copies.iter().for_each(FileCopy::refresh);
        assert_eq!(f.read(".env"), edited, "nothing to rewrite");
        let r = f
            .store
            .publish("databricks", Update::token(Secret::new(T2)));
        assert!(r.is_ok(), "{r:?}");
        copies.iter().for_each(FileCopy::refresh);
        assert_eq!(f.read(".env"), edited.replace(T1, T2));
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode());
        assert_eq!(mode.unwrap_or(0) & 0o7777, 0o640);
    }

    #[test]
    fn a_file_to_create_in_a_missing_directory_is_written_once_it_exists() {
        let f = fixture(YAML, ENV);
        let mut cfg = f.config.mounts[0].files[1].clone();
        cfg.path = PathBuf::from("later/.env");
        cfg.create = true;
        let adopt: Arc<dyn Adopt> = Arc::new(TakeAll);
        let backups = Backups::new(&f.config.state_dir);
        let ctx = Arc::new(Context::new(f.store.clone(), adopt, backups));
        let copy = FileCopy::load(f.dir.path(), &cfg, ctx);
        let copy = copy.unwrap_or_else(|e| panic!("{e}"));
        copy.refresh();
        assert_eq!(f.read("later/.env"), "", "no directory yet");
        std::fs::create_dir(f.dir.path().join("later")).unwrap_or_else(|e| panic!("{e}"));
        copy.refresh();
        assert_eq!(f.read("later/.env"), format!("API_KEY={T1}\n"));
    }

    #[test]
    fn a_symlink_at_a_managed_path_refuses_to_start() {
        let f = fixture(YAML, ENV);
        let env = f.dir.path().join(".env");
        std::fs::remove_file(&env).unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink("config.yaml", &env).unwrap_or_else(|e| panic!("{e}"));
        let err = f.copies().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not a regular file"), "{err}");
        assert_eq!(f.read("config.yaml"), YAML);
    }
}
