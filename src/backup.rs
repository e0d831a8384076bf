//! Backups of the bytes tokenfs replaces: before a managed file is first
//! converted, and whenever a value at a bound key is replaced without being
//! adopted, the file's bytes as they were are kept here, owner-only.
//!
//! Layout: `<state_dir>/originals/<path>` for a file's first original
//! (`<path>` is the file's absolute path, so `~/.hermes/config.yaml` of
//! root is `originals/root/.hermes/config.yaml`), kept for good, and
//! `<path>.<unix seconds>.<n>` for later ones, of which the newest
//! [`KEEP`] are kept. Directories are 0700 and files 0600: these hold
//! tokens, as the files did.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How many later backups of one file are kept besides its first original.
pub const KEEP: usize = 16;

/// Where backups go.
#[derive(Clone, Debug)]
pub struct Backups {
    root: PathBuf,
}

impl Backups {
    pub fn new(state_dir: &Path) -> Backups {
        Backups {
            root: state_dir.join("originals"),
        }
    }

    /// Where the first original of `file` (an absolute path) is kept.
    pub fn original_of(&self, file: &Path) -> PathBuf {
        let rel: PathBuf = file
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.root.join(rel)
    }

    /// Keeps `bytes` as a backup of `file`: as its first original if it
    /// has none, else (unless identical to the newest) as a later one.
    /// Returns where they are. Nothing is replaced: a failure is an error
    /// and the caller must not go on to change the file.
    pub fn keep(&self, file: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
        let first = self.original_of(file);
        let dir = first
            .parent()
            .ok_or_else(|| io::Error::other("a backup needs a parent directory"))?;
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        if !first.exists() {
            write_new(&first, bytes)?;
            return Ok(first);
        }
        let later = self.later(&first);
        let newest = later.last().cloned().unwrap_or_else(|| first.clone());
        if fs::read(&newest).is_ok_and(|b| b == bytes) {
            return Ok(newest);
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let path = (0..1000)
            .map(|n| suffixed(&first, &format!("{secs:012}.{n:03}")))
            .find(|p| !p.exists())
            .ok_or_else(|| io::Error::other("too many backups this second"))?;
        write_new(&path, bytes)?;
        for old in later.iter().rev().skip(KEEP - 1) {
            let _ = fs::remove_file(old);
        }
        Ok(path)
    }

    /// The later backups of a file, oldest first.
    fn later(&self, first: &Path) -> Vec<PathBuf> {
        let (Some(dir), Some(name)) = (first.parent(), first.file_name()) else {
            return Vec::new();
        };
        let prefix = format!("{}.", name.to_string_lossy());
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_prefix(&prefix))
                            .is_some_and(is_stamp)
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found
    }
}

/// `000001733150000.000`: seconds, a dot, a counter.
fn is_stamp(s: &str) -> bool {
    s.split_once('.').is_some_and(|(a, b)| {
        a.len() == 12 && b.len() == 3 && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
    })
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes a new 0600 file, durably.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn first_original_is_kept_and_later_ones_are_added() {
        let tmp = tempfile::tempdir().unwrap();
        let b = Backups::new(tmp.path());
        let file = Path::new("/home/u/.hermes/config.yaml");
        let first = b.keep(file, b"one").unwrap();
        assert_eq!(
            first,
            tmp.path().join("originals/home/u/.hermes/config.yaml")
        );
        assert_eq!(
            fs::metadata(&first).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let dir_mode = fs::metadata(first.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(
            b.keep(file, b"one").unwrap(),
            first,
            "same bytes: no new copy"
        );
        let second = b.keep(file, b"two").unwrap();
        assert_ne!(second, first);
        assert_eq!(fs::read(&first).unwrap(), b"one");
        assert_eq!(fs::read(&second).unwrap(), b"two");
        for i in 0..(KEEP + 5) {
            b.keep(file, format!("v{i}").as_bytes()).unwrap();
        }
        assert_eq!(b.later(&first).len(), KEEP);
        assert_eq!(
            fs::read(&first).unwrap(),
            b"one",
            "the first original stays"
        );
    }
}
