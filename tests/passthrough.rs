//! Every other file behaves like the original directory: each operation of
//! the passthrough, big files, locks, mmap and SQLite in WAL mode.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn mounted() -> (Scratch, std::path::PathBuf, Backing, Daemon) {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("pt", 32)));
    s.write("home/.hermes/existing.txt", "hello\n");
    let backing = Backing::open(&dir);
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    (s, dir, backing, d)
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn files_directories_and_links() {
    let (_s, dir, backing, _d) = mounted();
    // create, write, read, append, O_EXCL
    let f = dir.join("a.txt");
    fs::write(&f, "one\n").unwrap();
    let mut app = fs::OpenOptions::new().append(true).open(&f).unwrap();
    app.write_all(b"two\n").unwrap();
    drop(app);
    assert_eq!(fs::read_to_string(&f).unwrap(), "one\ntwo\n");
    assert_eq!(backing.read("a.txt").unwrap(), b"one\ntwo\n");
    let excl = fs::OpenOptions::new().write(true).create_new(true).open(&f);
    assert_eq!(excl.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
    // O_TRUNC
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&f)
        .unwrap()
        .write_all(b"3")
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"3");
    // mkdir, nested files, rename across directories, rmdir
    fs::create_dir_all(dir.join("sessions/2026")).unwrap();
    fs::write(dir.join("sessions/2026/s1.json"), "{}").unwrap();
    fs::rename(dir.join("sessions/2026/s1.json"), dir.join("s1.json")).unwrap();
    assert_eq!(fs::read_to_string(dir.join("s1.json")).unwrap(), "{}");
    fs::remove_dir(dir.join("sessions/2026")).unwrap();
    assert!(!dir.join("sessions/2026").exists());
    assert!(fs::remove_dir(dir.join("sessions")).is_ok());
    // symlink, readlink, hard link
    std::os::unix::fs::symlink("existing.txt", dir.join("link")).unwrap();
    assert_eq!(
        fs::read_link(dir.join("link")).unwrap(),
        Path::new("existing.txt")
    );
    assert_eq!(fs::read_to_string(dir.join("link")).unwrap(), "hello\n");
    fs::hard_link(dir.join("existing.txt"), dir.join("hard")).unwrap();
    let (a, b) = (
        fs::metadata(dir.join("existing.txt")).unwrap(),
        fs::metadata(dir.join("hard")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);
    // unlink
    fs::remove_file(dir.join("hard")).unwrap();
    assert!(backing.read("hard").is_none());
    assert_eq!(fs::metadata(dir.join("existing.txt")).unwrap().nlink(), 1);
}

#[test]
fn rename_flags() {
    let (_s, dir, _b, _d) = mounted();
    let (x, y) = (dir.join("x"), dir.join("y"));
    fs::write(&x, "x").unwrap();
    fs::write(&y, "y").unwrap();
    let noreplace = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(&x).as_ptr(),
            libc::AT_FDCWD,
            c(&y).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(noreplace, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    let exchange = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(&x).as_ptr(),
            libc::AT_FDCWD,
            c(&y).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(exchange, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(fs::read_to_string(&x).unwrap(), "y");
    assert_eq!(fs::read_to_string(&y).unwrap(), "x");
    fs::rename(&x, &y).unwrap();
    assert_eq!(fs::read_to_string(&y).unwrap(), "y");
    assert!(!x.exists());
}

#[test]
fn attributes_and_statfs() {
    let (s, dir, _b, _d) = mounted();
    let f = dir.join("attrs");
    fs::write(&f, "0123456789").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&f, Some(1), Some(1)).unwrap();
    assert_eq!(
        (
            fs::metadata(&f).unwrap().uid(),
            fs::metadata(&f).unwrap().gid()
        ),
        (1, 1)
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"0123");
    let cf = c(&f);
    assert_eq!(unsafe { libc::truncate(cf.as_ptr(), 2) }, 0);
    assert_eq!(fs::metadata(&f).unwrap().len(), 2);
    let times = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 7,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cf.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let m = fs::metadata(&f).unwrap();
    assert_eq!(
        (m.atime(), m.mtime(), m.mtime_nsec()),
        (1_000_000, 2_000_000, 7)
    );
    // statfs reports the backing filesystem's real figures.
    let mut ours: libc::statvfs = unsafe { std::mem::zeroed() };
    let mut theirs: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&dir).as_ptr(), &mut ours) }, 0);
    assert_eq!(
        unsafe { libc::statvfs(c(s.root.path()).as_ptr(), &mut theirs) },
        0
    );
    assert!(ours.f_blocks > 0);
    assert_eq!(ours.f_blocks, theirs.f_blocks);
    assert_eq!(ours.f_bsize, theirs.f_bsize);
}

#[test]
fn big_file_round_trips_with_the_same_checksum() {
    let (_s, dir, backing, _d) = mounted();
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let f = dir.join("big.bin");
    let mut out = fs::File::create(&f).unwrap();
    for chunk in data.chunks(100_003) {
        out.write_all(chunk).unwrap();
    }
    out.sync_all().unwrap();
    drop(out);
    assert_eq!(fs::read(&f).unwrap(), data);
    assert_eq!(backing.read("big.bin").unwrap(), data);
    // random access
    let mut r = fs::File::open(&f).unwrap();
    r.seek(SeekFrom::Start(5_000_000)).unwrap();
    let mut buf = [0u8; 4096];
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &data[5_000_000..5_004_096]);
}

#[test]
fn flock_and_fcntl_locks_exclude_each_other() {
    let (_s, dir, _b, _d) = mounted();
    let f = dir.join("auth.lock");
    fs::write(&f, "").unwrap();
    let a = fs::File::open(&f).unwrap();
    let b = fs::File::open(&f).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(
        unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        -1
    );
    assert_eq!(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_UN) }, 0);
    assert_eq!(
        unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    // POSIX record locks, checked from another process (locks are per process).
    let w = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    let mut lk: libc::flock = unsafe { std::mem::zeroed() };
    lk.l_type = libc::F_WRLCK as i16;
    lk.l_whence = libc::SEEK_SET as i16;
    assert_eq!(unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    let probe = "import fcntl,sys\nf=open(sys.argv[1],'r+')\ntry:\n  fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)\n  print('got')\nexcept OSError:\n  print('blocked')\n".to_string();
    let out = Command::new("python3")
        .arg("-c")
        .arg(&probe)
        .arg(&f)
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "blocked");
}

#[test]
fn shared_writable_mmap() {
    let (_s, dir, backing, _d) = mounted();
    let f = dir.join("mapped");
    fs::write(&f, vec![0u8; 8192]).unwrap();
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f)
        .unwrap();
    use std::os::fd::AsRawFd;
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(b"mmap!".as_ptr(), (p as *mut u8).add(4096), 5);
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    drop(file);
    assert_eq!(&fs::read(&f).unwrap()[4096..4101], b"mmap!");
    assert_eq!(&backing.read("mapped").unwrap()[4096..4101], b"mmap!");
}

#[test]
fn sqlite_wal_written_by_two_processes_stays_intact() {
    let (_s, dir, _b, _d) = mounted();
    let db = dir.join("state.db");
    // Switching a fresh database to WAL from two processes at once fails
    // with "database is locked" on any filesystem: create it first, as an
    // agent's state.db already exists.
    let init = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nc.execute('pragma journal_mode=wal')\nc.execute('create table t(k text, v blob)')\nc.commit()\n";
    assert!(
        Command::new("python3")
            .arg("-c")
            .arg(init)
            .arg(&db)
            .status()
            .unwrap()
            .success()
    );
    let writer = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1],timeout=30)\nfor i in range(300):\n  c.execute('insert into t values(?,?)',(sys.argv[2]+str(i),b'x'*500))\n  c.commit()\n";
    let kids: Vec<_> = ["a", "b"]
        .iter()
        .map(|tag| {
            Command::new("python3")
                .arg("-c")
                .arg(writer)
                .arg(&db)
                .arg(tag)
                .spawn()
                .expect("python3")
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    let check = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nprint(c.execute('pragma integrity_check').fetchone()[0], c.execute('select count(*) from t').fetchone()[0], c.execute('pragma journal_mode').fetchone()[0])\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok 600 wal",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn special_files() {
    let (_s, dir, _b, _d) = mounted();
    let fifo = dir.join("fifo");
    assert_eq!(
        unsafe { libc::mkfifo(c(&fifo).as_ptr(), 0o600) },
        0,
        "{}",
        std::io::Error::last_os_error()
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(&fifo).unwrap().file_type()
    ));
    fs::remove_file(&fifo).unwrap();
}

#[test]
fn xattrs() {
    let (_s, dir, _b, _d) = mounted();
    let f = dir.join("x");
    fs::write(&f, "").unwrap();
    let (cf, name) = (c(&f), CString::new("user.tokenfs").unwrap());
    let r = unsafe { libc::setxattr(cf.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    if r != 0 {
        // Some backing filesystems (e.g. tmpfs without user xattrs) refuse; then the error must be theirs.
        let e = std::io::Error::last_os_error().raw_os_error();
        assert!(
            matches!(e, Some(libc::EOPNOTSUPP) | Some(libc::EPERM)),
            "{e:?}"
        );
        return;
    }
    let mut buf = [0u8; 16];
    let n = unsafe {
        libc::getxattr(
            cf.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n as usize], b"v1");
}

#[test]
fn managed_file_names_cannot_become_something_else() {
    let (_s, dir, _b, _d) = mounted();
    let p = dir.join("config.yaml");
    assert_eq!(
        fs::hard_link(&p, dir.join("copy"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(
        fs::create_dir(&p).unwrap_err().kind(),
        std::io::ErrorKind::AlreadyExists
    );
    let _ = fs::OpenOptions::new().mode(0o600);
}

/// `O_TMPFILE` + `linkat` (an atomic-save pattern): FUSE has no tmpfile
/// operation in this protocol version, so the kernel answers EOPNOTSUPP and
/// programs fall back to a named temp file, which works.
#[test]
fn o_tmpfile_fails_cleanly_and_the_fallback_works() {
    let (_s, dir, backing, _d) = mounted();
    let cdir = c(&dir);
    let fd = unsafe { libc::open(cdir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    if fd >= 0 {
        // Supported after all: it must then link into place like anywhere else.
        let data = b"tmpfile";
        assert_eq!(
            unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) },
            data.len() as isize
        );
        let from = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
        let to = c(&dir.join("linked"));
        assert_eq!(
            unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            },
            0
        );
        unsafe { libc::close(fd) };
        assert_eq!(fs::read(dir.join("linked")).unwrap(), data);
        return;
    }
    let err = std::io::Error::last_os_error().raw_os_error();
    assert!(
        matches!(err, Some(libc::EOPNOTSUPP) | Some(libc::EISDIR)),
        "{err:?}"
    );
    fs::write(dir.join(".save.tmp"), "fallback").unwrap();
    fs::rename(dir.join(".save.tmp"), dir.join("saved")).unwrap();
    assert_eq!(backing.read("saved").unwrap(), b"fallback");
}

/// A symlink to a config elsewhere (dotfiles setups) passes through: the
/// link and its target behave as on the original directory.
#[test]
fn symlinked_files_pass_through() {
    let (s, dir, _b, _d) = mounted();
    let target = s.write("dotfiles/agent.json", "{\"k\": 1}\n");
    std::os::unix::fs::symlink(&target, dir.join("agent.json")).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join("agent.json")).unwrap(),
        "{\"k\": 1}\n"
    );
    fs::write(dir.join("agent.json"), "{\"k\": 2}\n").unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "{\"k\": 2}\n");
}

/// Python asks `isatty` (an ioctl) at every `open()`, and programs poll
/// files: both answer as a regular file does, and the daemon logs nothing.
#[test]
fn ioctl_and_poll_answer_like_a_regular_file() {
    let (_s, dir, _backing, d) = mounted();
    for name in ["existing.txt", "config.yaml"] {
        let f = fs::File::open(dir.join(name)).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let mut tio = std::mem::MaybeUninit::<libc::termios>::uninit();
        let rc = unsafe { libc::ioctl(fd, libc::TCGETS, tio.as_mut_ptr()) };
        let err = std::io::Error::last_os_error().raw_os_error();
        assert_eq!((rc, err), (-1, Some(libc::ENOTTY)), "{name}: isatty");
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        assert_eq!(unsafe { libc::poll(&mut p, 1, 1000) }, 1, "{name}: poll");
        assert_ne!(p.revents & libc::POLLIN, 0, "{name}: readable");
    }
    // The way Hermes opens its config: Python's open() and read().
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sys; print(len(open(sys.argv[1]).read()) > 0)")
        .arg(dir.join("config.yaml"))
        .output()
        .expect("python3");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True");
    let log = d.log_text();
    assert!(!log.contains("Not Implemented"), "{log}");
}

/// Small files read through the page cache stay right: after a write by
/// another open (kernel passthrough, behind the page cache) and while a
/// reader holds the file open (the writer then shares the page cache).
#[test]
fn small_files_read_through_the_page_cache_see_every_write() {
    let (_s, dir, backing, _d) = mounted();
    let f = dir.join("settings.local.json");
    fs::write(&f, "{\"v\": 1}\n").unwrap();
    for round in 2..6 {
        // Read twice: the second read comes from the page cache.
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            format!("{{\"v\": {}}}\n", round - 1)
        );
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            format!("{{\"v\": {}}}\n", round - 1)
        );
        // Same size, new bytes, written in place by a writer alone.
        let mut w = fs::OpenOptions::new().write(true).open(&f).unwrap();
        w.write_all(format!("{{\"v\": {round}}}\n").as_bytes())
            .unwrap();
        drop(w);
        assert_eq!(
            fs::read_to_string(&f).unwrap(),
            format!("{{\"v\": {round}}}\n")
        );
    }
    // A reader holds it open while a writer changes it.
    let mut r = fs::File::open(&f).unwrap();
    let mut w = fs::OpenOptions::new().write(true).open(&f).unwrap();
    w.write_all(b"{\"v\": 9}\n").unwrap();
    let mut seen = String::new();
    r.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "{\"v\": 9}\n");
    drop((r, w));
    assert_eq!(fs::read_to_string(&f).unwrap(), "{\"v\": 9}\n");
    assert_eq!(
        backing.read("settings.local.json").unwrap(),
        b"{\"v\": 9}\n"
    );
    // Truncated and rewritten shorter, then read through a fresh open.
    fs::write(&f, "{}\n").unwrap();
    assert_eq!(fs::read_to_string(&f).unwrap(), "{}\n");
}
