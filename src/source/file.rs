//! `source = "file"`: follows a file that something else rewrites (a mounted
//! Kubernetes secret, a sidecar's output).
//!
//! Watches the file's *directory* with inotify, so every way of replacing the
//! file is seen: in-place writes (`IN_CLOSE_WRITE`), rename over it
//! (`IN_MOVED_TO`), and Kubernetes' `..data` symlink swap. No polling: the
//! thread sleeps in `read()` until the kernel has an event.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::{error, info, warn};

use crate::secret::Secret;
use crate::store::{HealthState, Store, Update};

/// Reads the file once now and starts its watcher thread.
pub fn start(name: &str, path: &Path, store: Arc<Store>) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| {
            format!(
                "credential `{name}`: {} has no parent directory",
                path.display()
            )
        })?
        .to_owned();
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
        .map_err(|e| format!("credential `{name}`: inotify: {e}"))?;
    let mask = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY;
    inotify
        .add_watch(&dir, mask)
        .map_err(|e| format!("credential `{name}`: cannot watch {}: {e}", dir.display()))?;
    let watcher = Watcher {
        name: name.to_owned(),
        path: path.to_owned(),
        store,
    };
    watcher.reload();
    std::thread::Builder::new()
        .name(format!("source-file-{name}"))
        .spawn(move || watcher.run(inotify))
        .map_err(|e| format!("credential `{name}`: cannot start watcher: {e}"))?;
    Ok(())
}

struct Watcher {
    name: String,
    path: PathBuf,
    store: Arc<Store>,
}

impl Watcher {
    fn run(self, inotify: Inotify) {
        loop {
            match inotify.read_events() {
                // Any change in the directory may be ours (renames, symlink
                // swaps); re-reading a small file is cheaper than reasoning.
                Ok(_) => self.reload(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    let msg = format!(
                        "watching {} failed: {e}; the last value stays",
                        self.path.display()
                    );
                    error!(credential = %self.name, "{msg}");
                    self.store
                        .record_error(&self.name, HealthState::Degraded, msg);
                    return;
                }
            }
        }
    }

    fn reload(&self) {
        match std::fs::read(&self.path) {
            Ok(bytes) => match Secret::from_bytes(bytes) {
                Some(s) if !s.is_empty() => {
                    let fp = s.fingerprint();
                    match self.store.publish(&self.name, Update::token(s)) {
                        Ok(Some(_)) => {
                            info!(credential = %self.name, fingerprint = %fp, "new value from {}", self.path.display())
                        }
                        Ok(None) => {}
                        Err(why) => self.fail(format!(
                            "the value in {} cannot be served ({why}); the last value stays",
                            self.path.display()
                        )),
                    }
                }
                _ => self.fail(format!(
                    "{} is empty or not UTF-8; the last value stays",
                    self.path.display()
                )),
            },
            Err(e) => self.fail(format!(
                "cannot read {}: {e}; the last value stays",
                self.path.display()
            )),
        }
    }

    fn fail(&self, msg: String) {
        warn!(credential = %self.name, "{msg}");
        self.store
            .record_error(&self.name, HealthState::Degraded, msg);
    }
}
