//! The filesystem's one error type.
//!
//! Every request of the core returns `Result<_, FsError>`; the adapter turns
//! an error into the errno the caller gets, and is the one place that logs
//! it (op, node, errno) at its level and, at `Warn`, records it in
//! `status`. So a failure of the backing filesystem (an `EIO` from `pread`,
//! an `ENOSPC` from a save) is never silent, while the errnos that are a
//! caller's everyday answer (`ENOENT`, `EEXIST`, ...) stay out of the log.

use std::borrow::Cow;
use std::fmt;
use std::io;

/// How loudly an error is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// A normal answer to the caller (no such name, not empty, ...), or a
    /// failure already reported where it happened (a managed file's own
    /// status): logged at debug only.
    Debug,
    /// The daemon or the backing filesystem failed: logged at warn and shown
    /// as the mount's last error in `status`.
    Warn,
}

/// An errno for the caller, with what the daemon knows about it. Messages
/// never hold a secret (they are built from names and errnos only).
#[derive(Debug, thiserror::Error)]
pub struct FsError {
    pub errno: i32,
    pub level: Level,
    /// What failed, in words; empty when the errno says it all.
    pub message: Cow<'static, str>,
    #[source]
    pub source: Option<io::Error>,
}

pub type FsResult<T> = Result<T, FsError>;

/// Said of an exhausted fd table: it is the daemon's failure, not the
/// caller's, and the fix is the operator's.
const OUT_OF_FDS: &str = "out of file descriptors: lookups and opens fail until the kernel forgets inodes; raise the open file limit";

/// The level an errno gets unless its origin says otherwise: the errnos
/// that mean the disk, the fd table or a limit failed are worth a warning.
pub fn level_of(errno: i32) -> Level {
    match errno {
        libc::EIO | libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::EFBIG => {
            Level::Warn
        }
        _ => Level::Debug,
    }
}

impl FsError {
    /// A bare errno (a decision of the core: `EPERM` on linking a view,
    /// `EXDEV` for a rename it does not do, ...).
    pub fn new(errno: i32) -> FsError {
        FsError {
            errno,
            level: level_of(errno),
            message: Cow::Borrowed(""),
            source: None,
        }
    }

    /// Names what failed (a syscall, a step), for the log and `status`.
    pub fn context(mut self, what: impl Into<Cow<'static, str>>) -> FsError {
        if self.message.is_empty() {
            self.message = what.into();
        }
        self
    }

    /// The failure was already logged and recorded where it happened (a
    /// managed file's size limit or save, in that file's status): the
    /// adapter only answers with it.
    pub fn reported(mut self) -> FsError {
        self.level = Level::Debug;
        self
    }
}

impl From<io::Error> for FsError {
    fn from(e: io::Error) -> FsError {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let message = match errno {
            libc::EMFILE | libc::ENFILE => Cow::Borrowed(OUT_OF_FDS),
            _ => Cow::Borrowed(""),
        };
        FsError {
            errno,
            level: level_of(errno),
            message,
            source: Some(e),
        }
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.message.is_empty()) {
            (Some(s), true) => write!(f, "{s}"),
            (Some(s), false) => write!(f, "{}: {s}", self.message),
            (None, false) => write!(f, "{}", self.message),
            (None, true) => write!(f, "{}", io::Error::from_raw_os_error(self.errno)),
        }
    }
}

/// `.context("pread")` on an `io::Result`.
pub trait Context<T> {
    fn context(self, what: &'static str) -> FsResult<T>;
}

impl<T> Context<T> for io::Result<T> {
    #[inline]
    fn context(self, what: &'static str) -> FsResult<T> {
        self.map_err(|e| FsError::from(e).context(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everyday_errnos_are_quiet_and_failures_of_the_disk_are_not() {
        for errno in [libc::ENOENT, libc::EEXIST, libc::ENOTEMPTY, libc::EXDEV] {
            assert_eq!(FsError::new(errno).level, Level::Debug);
        }
        for errno in [libc::EIO, libc::ENOSPC, libc::EMFILE, libc::EFBIG] {
            assert_eq!(FsError::new(errno).level, Level::Warn);
        }
        let e: FsError = io::Error::other("no errno").into();
        assert_eq!((e.errno, e.level), (libc::EIO, Level::Warn));
        let e = Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE)).context("open");
        let e = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("out of file descriptors"), "{e}");
    }
}
