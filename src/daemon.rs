//! `tokenfs mount`: checks, mounts every directory, serves until every mount
//! is gone, and unmounts cleanly on SIGTERM/SIGINT.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use fuser::{MountOption, Session, SessionACL};
use tracing::{error, info, warn};

use crate::backup::Backups;
use crate::config::{Config, Mode, MountConfig};
use crate::control::{self, MountLife};
use crate::files;
use crate::fs::MountInfo;
use crate::fs::TokenFs;
use crate::lock::{self, Refused};
use crate::managed::{self, Context};
use crate::mounts;
use crate::proxy::Proxies;
use crate::source::Sources;
use crate::store::Store;

/// How long to wait for sessions to end after an unmount request before
/// exiting anyway (a process holding a file open keeps a lazily detached
/// mount alive; its name is already gone).
const EXIT_GRACE: Duration = Duration::from_secs(5);

enum Event {
    Signal(i32),
    /// A session ended: its index in the config's mounts, and how.
    Ended(usize, PathBuf, std::io::Result<()>),
}

pub fn run(config: Config) -> Result<(), String> {
    // Before anything changes: a second daemon on a socket or directory
    // must leave everything as it found it.
    let _locks = take_locks(&config)?;
    let fuse = match config.mode {
        Mode::Files => Err("mode = \"files\"".to_string()),
        Mode::Fuse | Mode::Auto => preflight(&config),
    };
    if let (Mode::Fuse, Err(e)) = (config.mode, &fuse) {
        return Err(e.clone());
    }
    fix_mmap_threshold();
    harden();
    raise_open_file_limit();
    let store = Arc::new(Store::new(
        config
            .credentials
            .iter()
            .map(|(n, k)| (n.as_str(), k.kind())),
    ));
    let sources = Sources::start(&config, store.clone())?;
    let proxies = start_proxies(&config, &store, &sources)?;
    let (tx, rx) = mpsc::channel();
    watch_signals(tx.clone())?;
    let (mounts, mounted, lives) =
        match fuse.and_then(|()| serve_fuse(&config, &store, &sources, &tx)) {
            Ok(served) => served,
            Err(e) if config.mode == Mode::Fuse => {
                // The files were converted to placeholders before mounting:
                // put working tokens back before giving up.
                files::restore(&config, &store);
                return Err(e);
            }
            Err(e) => {
                warn!("FUSE unavailable ({e}): falling back to files mode");
                (
                    files::start(&config, store.clone(), sources.clone())?,
                    Vec::new(),
                    Vec::new(),
                )
            }
        };
    let state = Arc::new(control::State {
        store,
        sources,
        mounts,
        proxies: proxies.all().to_vec(),
        lives: lives.clone(),
        started: SystemTime::now(),
    });
    control::serve(&config.socket, state)?;
    info!(mounts = mounted.len(), "tokenfs is serving");
    wait(rx, &mounted, &lives);
    let _ = std::fs::remove_file(&config.socket);
    drop(proxies);
    Ok(())
}

/// Before mounting: a port in use fails the start with nothing mounted,
/// and each proxy's local key is in the store before a file renders it.
/// A proxy's token endpoint asks the credential's source to refresh.
fn start_proxies(
    config: &Config,
    store: &Arc<Store>,
    sources: &Arc<Sources>,
) -> Result<Proxies, String> {
    let nudger = sources.clone();
    let nudge: crate::proxy::Nudge = Arc::new(move |credential: &str, origin: &str| {
        nudger.consumer_refresh(credential, origin);
    });
    Proxies::start_with(&config.proxies, store.clone(), nudge)
}

/// Takes the control socket's lock and every mount dir's: a daemon that
/// loses either changes nothing and names the one that holds it.
fn take_locks(config: &Config) -> Result<Vec<lock::Lock>, String> {
    let mut locks = Vec::new();
    let socket = &config.socket;
    match lock::acquire(
        &lock::socket_lock_path(socket),
        &socket.display().to_string(),
    ) {
        Ok(l) => locks.push(l),
        Err(Refused::Held(pid)) => {
            return Err(format!(
                "another tokenfs ({}) serves the control socket {}: stop it first, or give this config its own [control] socket",
                pid_text(pid),
                socket.display()
            ));
        }
        Err(Refused::Error(e)) => return Err(e),
    }
    for m in &config.mounts {
        let dir = std::fs::canonicalize(&m.dir).unwrap_or_else(|_| m.dir.clone());
        match lock::acquire(&lock::dir_lock_path(&dir), &dir.display().to_string()) {
            Ok(l) => locks.push(l),
            Err(Refused::Held(pid)) => {
                return Err(format!(
                    "{} is already served by another tokenfs ({}): stop it first (kill -TERM it, or fusermount3 -u {})",
                    dir.display(),
                    pid_text(pid),
                    dir.display()
                ));
            }
            Err(Refused::Error(e)) => {
                return Err(format!(
                    "{e} (set TOKENFS_LOCK_DIR to a writable directory)"
                ));
            }
        }
    }
    Ok(locks)
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or("pid unknown".into(), |p| format!("pid {p}"))
}

/// What serving FUSE gives back: each mount's shared info, the mounted
/// dirs, and each mount's life (for `status`).
type Served = (Vec<Arc<MountInfo>>, Vec<PathBuf>, Vec<Arc<MountLife>>);

/// Builds and mounts every directory; on any failure detaches the ones
/// already mounted.
fn serve_fuse(
    config: &Config,
    store: &Arc<Store>,
    sources: &Arc<Sources>,
    tx: &mpsc::Sender<Event>,
) -> Result<Served, String> {
    let ctx = Arc::new(Context::new(
        store.clone(),
        sources.clone(),
        Backups::new(&config.state_dir),
    ));
    managed::precheck(config, store, sources.as_ref()).map_err(|e| e.to_string())?;
    let mut filesystems = Vec::new();
    for m in &config.mounts {
        let root = open_dir(&m.dir)?;
        let fs = TokenFs::new(m, root, ctx.clone()).map_err(|e| e.to_string())?;
        let views = fs.views.clone();
        store.on_publish(move || views.retire_stale());
        filesystems.push(fs);
    }
    let infos = filesystems.iter().map(|f| f.info.clone()).collect();
    let mut mounted: Vec<PathBuf> = Vec::new();
    let mut lives = Vec::new();
    let dirs: Vec<PathBuf> = config.mounts.iter().map(|m| m.dir.clone()).collect();
    for (m, users) in config.mounts.iter().zip(mounts::users_inside_each(&dirs)) {
        if !users.is_empty() {
            warn!(
                mount = %m.dir.display(),
                "{} process(es) use files inside this directory and will keep seeing the hidden originals (placeholders) until they reopen them or cd into it again: {}",
                users.len(),
                mounts::describe(&users)
            );
        }
    }
    for (i, (fs, m)) in filesystems.into_iter().zip(&config.mounts).enumerate() {
        let life = Arc::new(MountLife::default());
        if let Err(e) = mount(fs, m, i, tx.clone(), life.clone()) {
            detach_all(&mounted);
            return Err(e);
        }
        mounted.push(m.dir.clone());
        lives.push(life);
    }
    Ok((infos, mounted, lives))
}

/// Serves until every mount is gone (files mode: until a signal).
fn wait(rx: mpsc::Receiver<Event>, mounted: &[PathBuf], lives: &[Arc<MountLife>]) {
    if mounted.is_empty() {
        while let Ok(e) = rx.recv() {
            if let Event::Signal(sig) = e {
                info!(signal = sig, "stopping");
                return;
            }
        }
        return;
    }
    let mut live = mounted.len();
    let mut deadline: Option<Instant> = None;
    while live > 0 {
        let event = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(e) => e,
                Err(_) => {
                    warn!(
                        "{live} mount(s) still busy after {EXIT_GRACE:?} (a process holds a file open); exiting anyway"
                    );
                    return;
                }
            },
            None => match rx.recv() {
                Ok(e) => e,
                Err(_) => return,
            },
        };
        match event {
            Event::Signal(sig) => {
                info!(signal = sig, "unmounting everything");
                detach_all(mounted);
                deadline.get_or_insert(Instant::now() + EXIT_GRACE);
            }
            Event::Ended(i, dir, res) => {
                live -= 1;
                if let Some(l) = lives.get(i) {
                    l.running.store(false, Ordering::Release);
                }
                match res {
                    Ok(()) => info!(mount = %dir.display(), "unmounted"),
                    Err(e) => error!(mount = %dir.display(), "session ended with an error: {e}"),
                }
            }
        }
    }
}

/// Detaches every mount lazily: the names disappear at once, and each
/// session ends (the kernel aborts its connection) as soon as no process
/// uses it. fusermount3's auto-unmount only acts once the daemon is gone,
/// so a live daemon must do this itself.
fn detach_all(dirs: &[PathBuf]) {
    for dir in dirs {
        if let Err(e) = mounts::detach(dir) {
            warn!(mount = %dir.display(), "unmount failed: {e}");
        }
    }
}

fn watch_signals(tx: mpsc::Sender<Event>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Mounts one directory and runs its session on its own threads.
fn mount(
    fs: TokenFs,
    m: &MountConfig,
    index: usize,
    tx: mpsc::Sender<Event>,
    life: Arc<MountLife>,
) -> Result<(), String> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::FSName("tokenfs".into()),
        MountOption::Subtype("tokenfs".into()),
        MountOption::DefaultPermissions,
        // fusermount3 stays behind and unmounts if the daemon dies, so a
        // SIGKILL never leaves "Transport endpoint is not connected".
        MountOption::AutoUnmount,
    ];
    // The kernel needs allow_other for auto_unmount; without `allow_other`
    // in the config, requests from other uids (but root) get EACCES.
    cfg.acl = if m.allow_other {
        SessionACL::All
    } else {
        SessionACL::RootAndOwner
    };
    // Two request threads: with one, a reader on another CPU pays a
    // cross-CPU wake-up per request (unpinned config read 62 us against 7 us
    // with two; pinned to one CPU, one thread is faster: 4.9 against 5.6).
    // Neither blocks on the disk: fsyncs and saves reply from `fs::offload`.
    cfg.n_threads = Some(2);
    cfg.clone_fd = true;
    let views = fs.views.clone();
    let session = Session::new(fs, &m.dir, &cfg).map_err(|e| mount_error(&m.dir, &e))?;
    views.set_notifier(session.notifier());
    // The mount just made is the topmost tokenfs at `dir` (the directory's
    // lock keeps other daemons away): its id tells `status` whether it is
    // still there. (`m.dir` is canonical, and nothing under it may be
    // touched before the session runs.)
    match mounts::tokenfs_at_exact(&m.dir) {
        Some(e) => life.id.store(e.id, Ordering::Release),
        None => warn!(mount = %m.dir.display(), "mounted, but not found in /proc/self/mountinfo"),
    }
    life.running.store(true, Ordering::Release);
    let dir = m.dir.clone();
    std::thread::Builder::new()
        .name("session".into())
        .spawn(move || {
            let res = session.run();
            life.running.store(false, Ordering::Release);
            let _ = tx.send(Event::Ended(index, dir, res));
        })
        .map_err(|e| format!("cannot start the session thread: {e}"))?;
    Ok(())
}

fn mount_error(dir: &Path, e: &std::io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (mounting needs root or CAP_SYS_ADMIN, or a setuid fusermount3 and `user_allow_other` in /etc/fuse.conf)"
        }
        _ => "",
    };
    format!("cannot mount {}: {e}{hint}", dir.display())
}

/// fuser gives every FUSE thread a 16 MiB request buffer. Freeing the
/// handshake's buffer would raise glibc's dynamic mmap threshold, so later
/// buffers would come from the heap and calloc would touch all 16 MiB: with
/// six mounts the daemon's RSS was 24 MiB. A fixed threshold keeps large
/// buffers in mmap pages that stay untouched until used (6 MiB).
fn fix_mmap_threshold() {
    crate::fs::sys::set_mmap_threshold(128 * 1024);
}

/// The passthrough holds one `O_PATH` fd per inode the kernel knows (as
/// virtiofsd does), so listing a directory of more files than the soft limit
/// of open files (often 1,024) would fail with EMFILE. Raised to the hard
/// limit, as virtiofsd and libfuse's passthrough_hp do; a low hard limit is
/// reported.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return warn!("cannot read the open file limit: {e}"),
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!("cannot raise the open file limit from {soft} to {hard}: {e}");
                soft
            }
        }
    } else {
        soft
    };
    crate::fs::sys::set_fd_limit(limit);
    if limit < 4_096 {
        warn!(
            "open file limit is {limit}: tokenfs keeps an fd per file the kernel has looked up, so a mount with more files than that gives EMFILE; raise it (ulimit -Hn, LimitNOFILE=)"
        );
    } else {
        info!(limit, "open file limit");
    }
}

/// Keeps secrets out of core dumps, swap and other processes' reach: the
/// daemon is non-dumpable (no core file, no ptrace by the same uid) and its
/// memory is locked as it is touched (`MCL_ONFAULT`, so locking does not
/// fault in every reserved buffer). Each step that is not permitted is
/// logged, never fatal.
fn harden() {
    if let Err(e) = crate::fs::sys::set_undumpable() {
        warn!("cannot mark the daemon non-dumpable: {e}");
    }
    match crate::fs::sys::lock_memory() {
        Ok(()) => info!("core dumps disabled; memory locked (secrets never reach swap)"),
        Err(e) => warn!(
            "core dumps disabled; memory not locked ({e}): secrets may reach swap; raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK"
        ),
    }
}

/// Everything that would make a mount fail, checked before anything is
/// mounted, each with the one thing to do about it.
fn preflight(config: &Config) -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing: run the container with --device /dev/fuse and CAP_SYS_ADMIN (or load the fuse module)".into());
    }
    if mounts::which("fusermount3").is_none() {
        return Err("fusermount3 is not installed: apt-get install -y fuse3".into());
    }
    for m in &config.mounts {
        let dir = &m.dir;
        if mounts::is_dead(dir) {
            clear_stale_mount(dir)?;
        }
        match std::fs::metadata(dir) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", dir.display())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => clear_stale_mount(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "mount dir {} does not exist: mkdir -p {}",
                    dir.display(),
                    dir.display()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
        if mounts::tokenfs_at(dir).is_some() {
            return Err(format!(
                "{} is already mounted by tokenfs: run `fusermount3 -u {}` (or stop the other daemon) first",
                dir.display(),
                dir.display()
            ));
        }
    }
    Ok(())
}

/// A daemon that died without auto-unmount leaves a dead mount; detach it.
fn clear_stale_mount(dir: &Path) -> Result<(), String> {
    warn!(mount = %dir.display(), "found a stale mount (its daemon is gone); detaching it");
    mounts::detach_with_fusermount(dir).map_err(|e| {
        format!(
            "{} is a dead mount and could not be detached ({e}): run `{}`",
            dir.display(),
            mounts::detach_command(dir)
        )
    })
}

/// Opens the mount dir before mounting: the only way to reach the original
/// files once the mount hides them.
fn open_dir(dir: &Path) -> Result<OwnedFd, String> {
    crate::fs::sys::open_dir_path(dir).map_err(|e| format!("{}: {e}", dir.display()))
}
