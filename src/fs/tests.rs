//! The core on a tempdir, without root or `/dev/fuse`: a recording kernel
//! stands in for the FUSE session, and each test drives the requests a
//! program's system calls would send. The mounted suites (`tests/`) stay
//! the end-to-end oracle; these pin each decision of the core.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{FopenFlags, InitFlags, RenameFlags};
use parking_lot::Mutex;

use super::error::{FsError, FsResult, Level};
use super::inode::ROOT_ID;
use super::kernel::{Caller, Kernel, OpenBacking};
use super::{AttrChange, Step, TokenFs};
use crate::backup::Backups;
use crate::managed::Context;
use crate::secret::Secret;
use crate::store::{SlotRef, Store, Update};

#[derive(Debug, Clone, PartialEq)]
enum Inval {
    Entry(u64, OsString),
    Inode(u64),
}

/// Records every invalidation, in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<Inval>>);

impl Kernel for Recorder {
    type Backing = ();
    fn inval_entry(&self, parent: u64, name: &OsStr) -> io::Result<()> {
        self.0.lock().push(Inval::Entry(parent, name.to_owned()));
        Ok(())
    }
    fn inval_inode(&self, ino: u64) -> io::Result<()> {
        self.0.lock().push(Inval::Inode(ino));
        Ok(())
    }
}

impl Recorder {
    fn take(&self) -> Vec<Inval> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// No kernel passthrough here: every open is cached.
struct NoBacking;

impl OpenBacking<()> for NoBacking {
    fn open_backing(&self, _file: &fs::File) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

/// Takes every value a program writes (nothing validates here).
struct TakeAll;

impl crate::source::Adopt for TakeAll {
    fn offer(&self, _slot: &SlotRef, _value: Secret, _origin: &str) -> Result<(), String> {
        Ok(())
    }
    fn plausible(&self, _slot: &SlotRef, _value: &Secret) -> Result<(), String> {
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    fs: Arc<TokenFs<Recorder>>,
    kernel: Arc<Recorder>,
    store: Arc<Store>,
}

const MAX: u64 = 4096;
const PLACEHOLDER: &str = "__tokenfs:databricks.token__";

fn root() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    }
}

fn user() -> Caller {
    Caller {
        uid: 1000,
        gid: 1000,
        pid: 2,
    }
}

fn ok<T>(r: FsResult<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("errno {}: {e}", e.errno),
    }
}

fn errno<T>(r: FsResult<T>) -> i32 {
    r.err().map_or(0, |e| e.errno)
}

/// Runs a request's work now, as the offload worker would.
fn run<T>(step: FsResult<Step<T>>) -> FsResult<T> {
    match step? {
        Step::Done(v) => Ok(v),
        Step::Later(job) => job(),
    }
}

fn fixture() -> Fixture {
    let dir = ok(tempfile::tempdir().map_err(FsError::from));
    let mount = dir.path().join("mnt");
    ok(fs::create_dir(&mount).map_err(FsError::from));
    ok(fs::write(
        mount.join("config.yaml"),
        "model:\n  api_key: none\n  name: a\n",
    )
    .map_err(FsError::from));
    let text = format!(
        "state_dir = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nformat = \"yaml\"\nbind = {{ \"model.api_key\" = \"databricks.token\" }}\n",
        dir.path().join("state").display(),
        mount.display()
    );
    let config = crate::preset::parse_config(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut m = config.mounts[0].clone();
    m.files[0].max_size = MAX;
    let store = Arc::new(Store::new([("databricks", "push")]));
    let ctx = Arc::new(Context::new(
        store.clone(),
        Arc::new(TakeAll),
        Backups::new(&config.state_dir),
    ));
    let root_fd: OwnedFd = ok(fs::File::open(&mount).map_err(FsError::from)).into();
    let kernel = Arc::new(Recorder::default());
    let fs =
        TokenFs::with_kernel(&m, root_fd, ctx, kernel.clone()).unwrap_or_else(|e| panic!("{e}"));
    let fs = Arc::new(fs);
    let views = fs.views.clone();
    store.on_publish(move || views.retire_stale());
    Fixture {
        dir,
        fs,
        kernel,
        store,
    }
}

impl Fixture {
    fn mount(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    fn on_disk(&self, name: &str) -> String {
        fs::read_to_string(self.mount().join(name)).unwrap_or_default()
    }

    fn publish(&self, token: &str) {
        let r = self
            .store
            .publish("databricks", Update::token(Secret::new(token)));
        assert!(r.is_ok(), "{r:?}");
    }

    fn read_all(&self, fh: u64) -> String {
        let mut out = String::new();
        ok(self.fs.read(fh, 0, 1 << 20, |b| {
            out = String::from_utf8_lossy(b).into_owned()
        }));
        out
    }

    /// lookup + open + read of `name`, as `cat` does: (node id, fh, bytes).
    fn cat(&self, name: &str, flags: i32) -> (u64, super::Opened<()>, String) {
        let e = ok(self.fs.lookup(ROOT_ID, OsStr::new(name)));
        let o = ok(self.fs.open(&root(), e.id, flags, &NoBacking));
        let text = self.read_all(o.fh);
        (e.id, o, text)
    }
}

const T1: &str = "dapiaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
const T2: &str = "dapibbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

#[test]
fn a_publish_invalidates_before_it_returns_and_a_held_handle_keeps_its_bytes() {
    let f = fixture();
    f.publish(T1);
    let (v1, o1, text) = f.cat("config.yaml", libc::O_RDONLY);
    assert!(text.contains(T1) && text.contains("name: a"), "{text}");
    assert!(
        o1.flags.contains(FopenFlags::FOPEN_KEEP_CACHE),
        "a current view is cached"
    );
    let a1 = ok(f.fs.getattr(&root(), v1, None));
    f.kernel.take();

    f.publish(T2);
    // The name and the old view's attributes were dropped by the time the
    // publish returned (no request thread here: inline).
    assert_eq!(
        f.kernel.take(),
        vec![
            Inval::Entry(ROOT_ID, "config.yaml".into()),
            Inval::Inode(v1)
        ]
    );
    assert!(
        f.read_all(o1.fh).contains(T1),
        "a held handle keeps its rendering"
    );
    let (v2, _, text) = f.cat("config.yaml", libc::O_RDONLY);
    assert!(text.contains(T2), "{text}");
    assert_ne!(v1, v2, "a new rendering is a new view");
    let a2 = ok(f.fs.getattr(&root(), v2, None));
    assert_eq!(a1.id, a2.id, "every view shows the file's one inode number");
    assert!(a2.stat.st_mtime >= a1.stat.st_mtime);
    assert_eq!(a2.stat.st_mode & 0o077, 0, "no group or other bits");
    assert!(!f.on_disk("config.yaml").contains(T2), "no token on disk");
}

#[test]
fn an_open_through_a_stale_view_reads_the_current_rendering_directly() {
    let f = fixture();
    f.publish(T1);
    let v1 = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    f.publish(T2);
    f.kernel.take();
    // A lookup that raced the rotation (or a bind mount) still has v1.
    let o = ok(f.fs.open(&root(), v1, libc::O_RDONLY, &NoBacking));
    assert!(o.flags.contains(FopenFlags::FOPEN_DIRECT_IO));
    assert!(f.read_all(o.fh).contains(T2));
    assert!(
        f.kernel
            .take()
            .contains(&Inval::Entry(ROOT_ID, "config.yaml".into())),
        "the stale name is dropped"
    );
    // Its fstat is the size of what this thread holds.
    let a = ok(f.fs.getattr(&root(), v1, None));
    assert_eq!(a.stat.st_size as usize, f.read_all(o.fh).len());
}

#[test]
fn a_temp_file_renamed_over_a_managed_file_is_committed_and_its_node_becomes_a_view() {
    let f = fixture();
    f.publish(T1);
    let written = format!("model:\n  api_key: {T1}\n  name: b\n");
    fs::write(f.mount().join("tmp.yaml"), &written).unwrap_or_default();
    let tmp = ok(f.fs.lookup(ROOT_ID, OsStr::new("tmp.yaml"))).id;
    assert!(f.fs.views.get(tmp).is_none());
    let step = f.fs.rename(
        ROOT_ID,
        OsStr::new("tmp.yaml"),
        ROOT_ID,
        OsStr::new("config.yaml"),
        RenameFlags::empty(),
    );
    assert!(
        matches!(step, Ok(Step::Later(_))),
        "an atomic save waits on the disk"
    );
    ok(run(step));
    let disk = f.on_disk("config.yaml");
    assert!(
        disk.contains(PLACEHOLDER) && disk.contains("name: b"),
        "{disk}"
    );
    assert!(!disk.contains(T1));
    assert!(
        !f.mount().join("tmp.yaml").exists(),
        "the temp file is gone"
    );
    // The kernel's moved name still points at the temp file's node: it is
    // now a (stale) view of the managed file.
    assert!(f.fs.views.get(tmp).is_some(), "node kind changed in place");
    let o = ok(f.fs.open(&root(), tmp, libc::O_RDONLY, &NoBacking));
    assert!(f.read_all(o.fh).contains(T1));
    let (_, _, text) = f.cat("config.yaml", libc::O_RDONLY);
    assert_eq!(text, written);
}

#[test]
fn a_managed_file_renamed_away_leaves_its_node_as_the_plain_copy() {
    let f = fixture();
    f.publish(T1);
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    let step = f.fs.rename(
        ROOT_ID,
        OsStr::new("config.yaml"),
        ROOT_ID,
        OsStr::new("config.bak"),
        RenameFlags::empty(),
    );
    assert!(matches!(step, Ok(Step::Done(()))));
    assert!(f.fs.views.get(v).is_none(), "no longer a view");
    let a = ok(f.fs.getattr(&root(), v, None));
    assert_eq!(a.id, v, "the node id names the plain copy");
    assert!(
        f.on_disk("config.bak").contains(PLACEHOLDER),
        "the copy keeps placeholders"
    );
    assert_eq!(
        errno(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))),
        libc::ENOENT
    );
    // A link to something else, or a directory, may not take the name.
    assert_eq!(
        errno(f.fs.mkdir(&root(), ROOT_ID, OsStr::new("config.yaml"), 0o755)),
        libc::EPERM
    );
}

#[test]
fn unlink_then_create_makes_the_managed_file_again() {
    let f = fixture();
    f.publish(T1);
    ok(f.fs.unlink(ROOT_ID, OsStr::new("config.yaml")));
    assert_eq!(
        errno(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))),
        libc::ENOENT
    );
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
    let c = ok(f.fs.create(
        &root(),
        ROOT_ID,
        OsStr::new("config.yaml"),
        (0o644, flags),
        &NoBacking,
    ));
    assert!(c.open.flags.contains(FopenFlags::FOPEN_DIRECT_IO));
    let text = format!("model:\n  api_key: {T1}\n");
    assert_eq!(
        ok(f.fs.write(c.open.fh, 0, text.as_bytes(), false)),
        text.len() as u32
    );
    ok(run(f.fs.flush(&root(), c.open.fh)));
    ok(run(Ok(f.fs.release(c.open.fh))));
    assert!(f.on_disk("config.yaml").contains(PLACEHOLDER));
    let (_, _, read) = f.cat("config.yaml", libc::O_RDONLY);
    assert_eq!(read, text);
    let mode = fs::metadata(f.mount().join("config.yaml")).map(|m| m.permissions().mode());
    assert_eq!(mode.unwrap_or(0) & 0o077, 0, "never group or other bits");
}

#[test]
fn truncate_by_path_applies_to_what_readers_see_and_the_size_limit_holds() {
    let f = fixture();
    f.publish(T1);
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    let cut = AttrChange {
        size: Some(0),
        ..AttrChange::default()
    };
    let a = ok(f.fs.setattr(&root(), v, &cut, None));
    // Saved as an empty write: the bound key is inserted again (as in any
    // write that lacks it), the rest is gone.
    let (_, _, text) = f.cat("config.yaml", libc::O_RDONLY);
    assert_eq!(a.stat.st_size as usize, text.len());
    assert!(!text.contains("name: a") && text.contains(T1), "{text}");
    assert!(!f.on_disk("config.yaml").contains("name: a"));
    // Past max_file_size: EFBIG, nothing allocated, reported by the file.
    let huge = AttrChange {
        size: Some(MAX + 1),
        ..AttrChange::default()
    };
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    let e = f.fs.setattr(&root(), v, &huge, None).err();
    assert_eq!(
        e.as_ref().map(|e| (e.errno, e.level)),
        Some((libc::EFBIG, Level::Debug))
    );
    let o = ok(f.fs.open(&root(), v, libc::O_RDWR, &NoBacking));
    assert_eq!(errno(f.fs.write(o.fh, MAX, b"x", false)), libc::EFBIG);
    assert_eq!(ok(f.fs.write(o.fh, MAX - 1, b"x", false)), 1);
    let health = f.fs.info.files[0].health();
    assert!(
        health
            .last_error
            .is_some_and(|e| e.contains("max_file_size"))
    );
}

#[test]
fn writes_and_truncates_by_unprivileged_callers_clear_setuid_and_setgid() {
    let f = fixture();
    f.fs.negotiate(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
    let path = f.mount().join("tool");
    let mode = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    };
    let set =
        |m: u32| fs::set_permissions(&path, fs::Permissions::from_mode(m)).unwrap_or_default();
    fs::write(&path, "x").unwrap_or_default();
    let ino = ok(f.fs.lookup(ROOT_ID, OsStr::new("tool"))).id;
    let size = AttrChange {
        size: Some(0),
        ..AttrChange::default()
    };
    // Root keeps them (the kernel's rule). Checked only when the tests run
    // as root: otherwise the backing filesystem clears them itself, as it
    // does for any unprivileged truncate.
    set(0o6755);
    ok(f.fs.setattr(&root(), ino, &size, None));
    if super::sys::euid() == 0 {
        assert_eq!(mode(&path), 0o6755);
    }
    // setuid always goes; setgid only with group-execute.
    ok(f.fs.setattr(&user(), ino, &size, None));
    assert_eq!(mode(&path), 0o755);
    set(0o6745);
    let o = ok(f.fs.open(&user(), ino, libc::O_WRONLY, &NoBacking));
    ok(f.fs.write(o.fh, 0, b"y", true));
    assert_eq!(mode(&path), 0o2745, "setgid without group-execute stays");
    set(0o4755);
    ok(f.fs.open(&user(), ino, libc::O_WRONLY | libc::O_TRUNC, &NoBacking));
    assert_eq!(mode(&path), 0o755, "O_TRUNC by a user clears setuid");
}

#[test]
fn temp_files_are_hidden_and_views_cannot_be_linked() {
    let f = fixture();
    f.publish(T1);
    fs::write(f.mount().join(".tokenfs-tmp-1-1"), "x").unwrap_or_default();
    assert_eq!(
        errno(f.fs.lookup(ROOT_ID, OsStr::new(".tokenfs-tmp-1-1"))),
        libc::ENOENT
    );
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    assert_eq!(
        errno(f.fs.link(v, ROOT_ID, OsStr::new("second"))),
        libc::EPERM
    );
    // A name that does not exist is a negative entry (node 0), cached.
    let e = ok(f.fs.lookup(ROOT_ID, OsStr::new("nothing")));
    assert_eq!(e.id, 0);
    assert!(!e.entry_ttl.is_zero());
}

/// A log sink for one test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A plain-file handle whose reads fail with EIO, as a failing disk's
/// would: `/proc/self/mem` at an unmapped address.
fn failing_handle(f: &Fixture) -> u64 {
    let file = ok(fs::File::open("/proc/self/mem").map_err(FsError::from));
    let io = super::io_mode::Io::Cached(Arc::new(super::io_mode::CachedUse));
    f.fs.add_handle(super::Handle::File { file, _io: io })
}

#[test]
fn a_failure_of_the_disk_is_logged_once_at_warn_and_shown_in_status() {
    let f = fixture();
    let fh = failing_handle(&f);
    let log = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..2 {
            let e = f.fs.read(fh, 0, 16, |_| panic!("no bytes")).err();
            let e = e.unwrap_or_else(|| FsError::new(0));
            assert_eq!((e.errno, e.level), (libc::EIO, Level::Warn));
            // The adapter's one place: the second, same failure within a
            // minute is recorded but not logged again.
            super::adapter::report(&f.fs.info, "read", 42, &e);
        }
        // A caller's everyday answer: neither logged nor recorded.
        let enoent =
            f.fs.lookup(ROOT_ID, OsStr::new("nothing-here"))
                .and_then(|e| {
                    if e.id == 0 {
                        Err(FsError::new(libc::ENOENT))
                    } else {
                        Ok(e)
                    }
                });
        if let Err(e) = enoent {
            super::adapter::report(&f.fs.info, "lookup", 1, &e);
        }
    });
    let text = String::from_utf8_lossy(&log.0.lock()).into_owned();
    assert_eq!(text.matches("Input/output error").count(), 1, "{text}");
    assert!(text.contains("WARN") && text.contains("read"), "{text}");
    assert!(
        text.contains("ino=42") && text.contains("errno=5"),
        "{text}"
    );
    assert!(!text.contains("lookup"), "{text}");
    let last = f.fs.info.last_error.lock().clone().map(|(m, _)| m);
    assert_eq!(
        last.as_deref(),
        Some("read: pread: Input/output error (os error 5)")
    );
}

#[test]
fn managed_handles_seek_without_holes_and_refuse_what_they_cannot_do() {
    let f = fixture();
    f.publish(T1);
    let (v, o, text) = f.cat("config.yaml", libc::O_RDONLY);
    let len = text.len() as i64;
    assert_eq!(ok(f.fs.lseek(o.fh, 3, libc::SEEK_DATA)), 3);
    assert_eq!(ok(f.fs.lseek(o.fh, 3, libc::SEEK_HOLE)), len);
    assert_eq!(errno(f.fs.lseek(o.fh, len, libc::SEEK_DATA)), libc::ENXIO);
    // A reader cannot write; copy_file_range falls back to read + write.
    assert_eq!(errno(f.fs.write(o.fh, 0, b"x", false)), libc::EBADF);
    let plain = f.mount().join("plain");
    fs::write(&plain, "p").unwrap_or_default();
    let p = ok(f.fs.lookup(ROOT_ID, OsStr::new("plain"))).id;
    let po = ok(f.fs.open(&root(), p, libc::O_RDWR, &NoBacking));
    let copied = f.fs.copy_file_range((o.fh, 0), (po.fh, 0), 4).err();
    assert_eq!(copied.map(|e| e.errno), Some(libc::EXDEV));
    assert_eq!(
        errno(f.fs.fallocate(&root(), o.fh, (0, 1), 0)),
        libc::EOPNOTSUPP
    );
    // O_EXCL on a present managed file; RENAME_EXCHANGE with one.
    let excl = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
    let name = OsStr::new("config.yaml");
    assert_eq!(
        errno(f.fs.create(&root(), ROOT_ID, name, (0o600, excl), &NoBacking)),
        libc::EEXIST
    );
    let swap = f.fs.rename(
        ROOT_ID,
        OsStr::new("plain"),
        ROOT_ID,
        name,
        RenameFlags::RENAME_EXCHANGE,
    );
    assert_eq!(errno(run(swap)), libc::EXDEV);
    assert_eq!(ok(f.fs.getattr(&root(), v, None)).stat.st_size, len);
}

#[test]
fn a_writer_sees_its_own_bytes_and_appends_at_its_end() {
    let f = fixture();
    f.publish(T1);
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    let o =
        ok(f.fs.open(&root(), v, libc::O_WRONLY | libc::O_APPEND, &NoBacking));
    assert!(o.flags.contains(FopenFlags::FOPEN_DIRECT_IO));
    ok(f.fs.write(o.fh, 0, b"extra: 1\n", false));
    // Its fstat (by this thread) is the size of its private copy.
    let before = f.on_disk("config.yaml");
    let size = ok(f.fs.getattr(&root(), v, Some(o.fh))).stat.st_size as usize;
    assert!(f.read_all(o.fh).ends_with("extra: 1\n"));
    assert_eq!(size, f.read_all(o.fh).len());
    assert_eq!(
        f.on_disk("config.yaml"),
        before,
        "nothing saved before close"
    );
    ok(run(f.fs.flush(&root(), o.fh)));
    assert!(f.on_disk("config.yaml").ends_with("extra: 1\n"));
    assert!(f.on_disk("config.yaml").contains(PLACEHOLDER));
}

#[test]
fn a_node_keeps_one_lookup_count_when_its_kind_changes() {
    let f = fixture();
    f.publish(T1);
    fs::write(
        f.mount().join("tmp.yaml"),
        format!("model:\n  api_key: {T1}\n"),
    )
    .unwrap_or_default();
    let tmp = ok(f.fs.lookup(ROOT_ID, OsStr::new("tmp.yaml"))).id;
    assert_eq!(ok(f.fs.lookup(ROOT_ID, OsStr::new("tmp.yaml"))).id, tmp);
    let renamed = f.fs.rename(
        ROOT_ID,
        OsStr::new("tmp.yaml"),
        ROOT_ID,
        OsStr::new("config.yaml"),
        RenameFlags::empty(),
    );
    ok(run(renamed));
    assert!(f.fs.views.get(tmp).is_some() && f.fs.inodes.get(tmp).is_none());
    // The kernel's two references to the temp file's node are the view's.
    f.fs.forget(tmp, 1);
    assert!(f.fs.views.get(tmp).is_some());
    f.fs.forget(tmp, 1);
    assert!(f.fs.views.get(tmp).is_none() && f.fs.inodes.get(tmp).is_none());
    // A current view forgotten by the kernel is no longer current: the next
    // lookup makes a new one.
    let v = ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id;
    f.fs.forget(v, 1);
    assert_ne!(ok(f.fs.lookup(ROOT_ID, OsStr::new("config.yaml"))).id, v);
}
