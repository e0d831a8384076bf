//! The control socket: `tokenfs status`, `set`, `rotate` and `token` talk to
//! the daemon over an owner-only unix socket, one JSON line each way.
//!
//! Secrets travel only on this socket (never in argv, where `ps` shows them).
//! The socket file is 0600 in a 0700 directory, and every connection's peer
//! uid is checked with `SO_PEERCRED`: only the daemon's own uid and root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::fs::MountInfo;
use crate::proxy::{Proxy, ProxyStatus};
use crate::secret::Secret;
use crate::source::Sources;
use crate::store::{Field, Store};

/// A request, as sent on the socket.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Set {
        name: String,
        field: Option<String>,
        secret: String,
    },
    Rotate {
        name: String,
    },
    Token {
        name: String,
        field: Option<String>,
    },
    /// `tokenfs import NAME --from claude|codex|hermes-codex`: a session
    /// read from a CLI's file, validated by a refresh before it is served.
    Import {
        name: String,
        /// Where it was read (for messages).
        from: String,
        refresh_token: String,
        #[serde(default)]
        access_token: Option<String>,
        #[serde(default)]
        id_token: Option<String>,
        #[serde(default)]
        account_id: Option<String>,
    },
    /// Detaches the mounts at `dirs` (all when empty); with `restore`, first
    /// writes the current secrets into their files on disk.
    Unmount {
        #[serde(default)]
        dirs: Vec<PathBuf>,
        #[serde(default)]
        restore: bool,
    },
}

/// What the daemon shares with the control server.
pub struct State {
    pub store: Arc<Store>,
    pub sources: Arc<Sources>,
    pub mounts: Vec<Arc<MountInfo>>,
    pub proxies: Vec<Arc<Proxy>>,
    /// Per mount (same order; empty in files mode): what the kernel shows.
    pub lives: Vec<Arc<MountLife>>,
    pub started: SystemTime,
}

/// What the daemon knows of one of its mounts: the kernel's mount id (from
/// mountinfo, right after mounting) and whether its session still runs.
#[derive(Debug, Default)]
pub struct MountLife {
    pub id: AtomicU64,
    pub running: AtomicBool,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Status {
    pub pid: u32,
    pub generation: u64,
    pub uptime_secs: u64,
    pub credentials: Vec<CredentialStatus>,
    pub mounts: Vec<MountStatus>,
    #[serde(default)]
    pub proxies: Vec<ProxyStatus>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct CredentialStatus {
    pub name: String,
    pub source: String,
    pub state: String,
    /// field → fingerprint (never the value).
    pub fields: BTreeMap<String, String>,
    pub updated_at: Option<f64>,
    pub expires_at: Option<f64>,
    pub last_success: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<f64>,
    pub next_attempt: Option<f64>,
    /// Only for `source = "oauth"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<crate::source::oauth::OAuthStatus>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct MountStatus {
    pub dir: PathBuf,
    /// `live`, `detached` (gone from the mount table), `dead` (in it, but
    /// its session ended) or `files` (files mode: no mount).
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub notes: Vec<String>,
    pub kernel_passthrough: bool,
    pub files: Vec<FileStatus>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub last_error_at: Option<f64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct FileStatus {
    pub path: PathBuf,
    pub format: String,
    pub present: bool,
    pub last_write: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<f64>,
}

fn unix(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

impl State {
    pub fn status(&self) -> Status {
        let snap = self.store.snapshot();
        let credentials = self
            .store
            .health()
            .into_iter()
            .map(|(name, h)| self.credential_status(&snap, name, h))
            .collect();
        let table = crate::mounts::entries();
        let mounts = self
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| self.mount_status(&table, i, m))
            .collect();
        Status {
            pid: std::process::id(),
            generation: snap.generation,
            uptime_secs: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            credentials,
            mounts,
            proxies: self.proxies.iter().map(|p| p.status()).collect(),
        }
    }

    /// Fingerprints only: status never carries a secret.
    fn credential_status(
        &self,
        snap: &crate::store::Snapshot,
        name: String,
        h: crate::store::Health,
    ) -> CredentialStatus {
        let cred = snap.credentials.get(&name);
        CredentialStatus {
            oauth: self.sources.oauth_status(&name),
            fields: cred
                .map(|c| {
                    c.fields
                        .iter()
                        .map(|(f, s)| (f.to_string(), s.fingerprint()))
                        .collect()
                })
                .unwrap_or_default(),
            updated_at: unix(cred.and_then(|c| c.updated_at)),
            expires_at: unix(cred.and_then(|c| c.expires_at)),
            name,
            source: h.source,
            state: serde_json::to_value(h.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            last_success: unix(h.last_success),
            last_error: h.last_error,
            last_error_at: unix(h.last_error_at),
            next_attempt: unix(h.next_attempt),
        }
    }

    /// A mount's state comes from the kernel's mount table, not from what
    /// the daemon believes (`fusermount -u` tells it nothing).
    fn mount_status(&self, table: &[crate::mounts::Entry], i: usize, m: &MountInfo) -> MountStatus {
        let last_error = m.last_error.lock().clone();
        let state = match self.lives.get(i) {
            Some(l) => crate::mounts::state_in(
                table,
                l.id.load(Ordering::Acquire),
                &m.dir,
                l.running.load(Ordering::Acquire),
            )
            .as_str(),
            None => "files",
        };
        let files = m
            .files
            .iter()
            .map(|f| {
                let h = f.health();
                FileStatus {
                    path: f.rel().to_owned(),
                    format: f.format().to_string(),
                    present: h.present,
                    last_write: unix(h.last_write),
                    last_error: h.last_error,
                    last_error_at: unix(h.last_error_at),
                }
            })
            .collect();
        MountStatus {
            state: state.to_owned(),
            dir: m.dir.clone(),
            notes: m.notes.clone(),
            kernel_passthrough: m.kernel_passthrough.load(Ordering::Relaxed),
            last_error_at: unix(last_error.as_ref().map(|(_, at)| *at)),
            last_error: last_error.map(|(e, _)| e),
            files,
        }
    }

    fn handle(&self, req: Request) -> serde_json::Value {
        let field = |f: Option<String>| -> Result<Field, String> {
            f.as_deref().unwrap_or("token").parse()
        };
        let result: Result<serde_json::Value, String> = match req {
            Request::Status => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            Request::Set {
                name,
                field: f,
                secret,
            } => {
                let secret = Secret::new(secret);
                field(f)
                    .and_then(|f| self.sources.set(&name, f, secret))
                    .map(generation)
            }
            Request::Rotate { name } => self.sources.rotate(&name).map(generation),
            Request::Token { name, field: f } => field(f).and_then(|f| self.token(&name, f)),
            Request::Import {
                name,
                from,
                refresh_token,
                access_token,
                id_token,
                account_id,
            } => {
                let session = crate::source::oauth::ImportedSession {
                    refresh_token: Some(Secret::new(refresh_token)),
                    access_token: access_token.map(Secret::new),
                    id_token: id_token.map(Secret::new),
                    account_id: account_id.map(Secret::new),
                };
                self.sources.import(&name, session, &from).map(generation)
            }
            Request::Unmount { dirs, restore } => self.unmount(&dirs, restore),
        };
        match result {
            Ok(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert("ok".into(), true.into());
                }
                v
            }
            Err(e) => serde_json::json!({ "ok": false, "error": e }),
        }
    }
}

fn generation(g: u64) -> serde_json::Value {
    serde_json::json!({ "generation": g })
}

impl State {
    /// `tokenfs token`: one field's current value (proxies publish their
    /// local keys as `proxy.NAME`).
    fn token(&self, name: &str, f: Field) -> Result<serde_json::Value, String> {
        let known = self.store.health();
        let snap = self.store.snapshot();
        if !known.contains_key(name) && !snap.credentials.contains_key(name) {
            let names: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(format!(
                "no such credential `{name}` (this daemon serves: {})",
                names.join(", ")
            ));
        }
        snap.credentials
            .get(name)
            .and_then(|c| c.fields.get(&f))
            .map(|s| serde_json::json!({ "secret": s.expose_str() }))
            .ok_or_else(|| format!("credential `{name}` has no {f} yet"))
    }

    /// `tokenfs unmount`: restores the files when asked, then detaches. The
    /// detach runs a moment later on its own thread, so this reply is sent
    /// before the daemon, left without mounts, exits.
    fn unmount(&self, dirs: &[PathBuf], restore: bool) -> Result<serde_json::Value, String> {
        let chosen: Vec<&Arc<MountInfo>> = if dirs.is_empty() {
            self.mounts.iter().collect()
        } else {
            let mut chosen = Vec::new();
            for d in dirs {
                let m = self.mounts.iter().find(|m| m.dir == *d).ok_or_else(|| {
                    let all: Vec<String> = self
                        .mounts
                        .iter()
                        .map(|m| m.dir.display().to_string())
                        .collect();
                    format!(
                        "{} is not mounted by this daemon (it serves {})",
                        d.display(),
                        all.join(", ")
                    )
                })?;
                chosen.push(m);
            }
            chosen
        };
        let mut restored = 0;
        if restore {
            for m in &chosen {
                for f in &m.files {
                    restored += f.restore().map_err(|e| {
                        let msg = format!(
                            "cannot restore {}: {e}; nothing was unmounted",
                            m.dir.join(f.rel()).display()
                        );
                        warn!("{msg}");
                        msg
                    })?;
                }
            }
            info!(
                keys = restored,
                "restored the current tokens into the files on disk"
            );
        }
        let detach: Vec<PathBuf> = chosen.iter().map(|m| m.dir.clone()).collect();
        let shown: Vec<String> = detach.iter().map(|d| d.display().to_string()).collect();
        let _ = std::thread::Builder::new()
            .name("unmount".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                for d in detach {
                    match crate::mounts::detach(&d) {
                        Ok(()) => info!(mount = %d.display(), "unmounted on request"),
                        Err(e) => warn!(mount = %d.display(), "unmount failed: {e}"),
                    }
                }
            });
        Ok(serde_json::json!({ "restored": restored, "unmounted": shown }))
    }
}

/// The longest request line taken; a longer one is refused.
pub const MAX_LINE: usize = 64 * 1024;
/// Connections waiting for their request line; when more arrive, the one
/// that has waited longest is closed (a flood never takes a thread each).
const MAX_PENDING: usize = 64;
/// A client must send its whole request line within this time.
const LINE_DEADLINE: Duration = Duration::from_secs(5);
/// Threads that handle complete requests (a rotation may wait on the
/// network; `status` must not wait behind it), and requests queued for them.
const WORKERS: usize = 8;
const QUEUE: usize = 16;
/// A reply must be taken within this time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the socket and serves it on background threads. The caller holds
/// the socket's lock (see [`crate::lock`]), so a socket file found here is
/// a dead daemon's and is replaced.
pub fn serve(path: &Path, state: Arc<State>) -> Result<(), String> {
    let shown = path.display();
    // A directory we create is owner-only; an existing one is the user's
    // and keeps its mode (the socket itself is 0600 and checks peers).
    if let Some(dir) = path.parent() {
        crate::lock::make_private_dir(dir)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another tokenfs is already running (it answers on {shown}); stop it first"
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {shown}: {e}"))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {shown}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{shown}: {e}"))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(UnixStream, Vec<u8>)>(QUEUE);
    let rx = Arc::new(parking_lot::Mutex::new(rx));
    for i in 0..WORKERS {
        let rx = rx.clone();
        let state = state.clone();
        std::thread::Builder::new()
            .name(format!("control-{i}"))
            .spawn(move || {
                loop {
                    let job = rx.lock().recv();
                    let Ok((stream, line)) = job else { return };
                    answer(stream, line, &state);
                }
            })
            .map_err(|e| format!("cannot start a control thread: {e}"))?;
    }
    info!(socket = %shown, "control socket ready");
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || Acceptor::new(listener, tx).run())
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    Ok(())
}

/// A connection whose request line is still arriving.
struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
    since: Instant,
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A partial line may hold a secret.
        zeroize::Zeroize::zeroize(&mut self.buf);
    }
}

/// Logs refusals without flooding the log: the first, then a count at most
/// every 10 s.
struct Refusals {
    count: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, why: &str) {
        self.count += 1;
        let due = self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            warn!(refused = self.count, "control connection refused: {why}");
            self.logged = Some(Instant::now());
            self.count = 0;
        }
    }
}

/// Tells a client why it is being turned away (best effort, never blocks),
/// then closes it.
fn refuse(stream: &UnixStream, why: &str, log: &mut Refusals) {
    tell(stream, why);
    log.note(why);
}

fn tell(stream: &UnixStream, why: &str) {
    let _ = stream.set_nonblocking(true);
    let mut out = serde_json::json!({ "ok": false, "error": why }).to_string();
    out.push('\n');
    let _ = (&*stream).write_all(out.as_bytes());
}

/// One thread reads every connection's request line with `poll`: idle and
/// slow clients cost a slot, never a thread. Complete lines go to the
/// workers.
type Jobs = std::sync::mpsc::SyncSender<(UnixStream, Vec<u8>)>;

/// The control socket's one reader thread: accepts connections, checks the
/// peer's uid, and collects each request line without blocking on any one
/// client (a client that never finishes its line is dropped after
/// `LINE_DEADLINE`); complete lines go to the bounded worker pool.
struct Acceptor {
    listener: UnixListener,
    me: u32,
    pending: Vec<Pending>,
    refusals: Refusals,
    chunk: Vec<u8>,
    jobs: Jobs,
}

impl Acceptor {
    fn new(listener: UnixListener, jobs: Jobs) -> Acceptor {
        Acceptor {
            listener,
            me: nix::unistd::geteuid().as_raw(),
            pending: Vec::new(),
            refusals: Refusals {
                count: 0,
                logged: None,
            },
            chunk: vec![0u8; 16 * 1024],
            jobs,
        }
    }

    fn run(mut self) {
        loop {
            let Some((listener_ready, ready)) = self.wait() else {
                continue;
            };
            // Newest index first, so removals keep the others valid.
            for i in ready.into_iter().rev() {
                self.on_readable(i);
            }
            self.expire();
            if listener_ready {
                self.accept_some();
            }
        }
    }

    /// Polls the listener and every pending client until one is readable
    /// or the oldest line's deadline comes: whether the listener is ready,
    /// and the indices of the ready clients.
    fn wait(&self) -> Option<(bool, Vec<usize>)> {
        let now = Instant::now();
        let timeout = self
            .pending
            .iter()
            .map(|p| (p.since + LINE_DEADLINE).saturating_duration_since(now))
            .min()
            .map_or(PollTimeout::NONE, |d| {
                PollTimeout::try_from(d.min(Duration::from_secs(60)) + Duration::from_millis(1))
                    .unwrap_or(PollTimeout::MAX)
            });
        let mut fds: Vec<PollFd<'_>> = std::iter::once(self.listener.as_fd())
            .chain(self.pending.iter().map(|p| p.stream.as_fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                warn!("control socket: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            return None;
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let clients = fds
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, f)| ready(f))
            .map(|(i, _)| i - 1)
            .collect();
        Some((fds.first().is_some_and(ready), clients))
    }

    /// Reads what client `i` sent (or sees it leave).
    fn on_readable(&mut self, i: usize) {
        let Some(p) = self.pending.get_mut(i) else {
            return;
        };
        match read_some(p, &mut self.chunk) {
            Progress::More => {}
            Progress::Closed => {
                self.pending.swap_remove(i);
            }
            Progress::TooLong => {
                let p = self.pending.swap_remove(i);
                let why = format!("request line over {} KiB", MAX_LINE / 1024);
                refuse(&p.stream, &why, &mut self.refusals);
            }
            Progress::Line(line) => {
                let p = self.pending.swap_remove(i);
                self.dispatch(p, line);
            }
        }
    }

    /// Hands a complete line to a worker, or says the daemon is busy.
    fn dispatch(&mut self, p: Pending, line: Vec<u8>) {
        let stream = match p.stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                warn!("control socket: {e}");
                return;
            }
        };
        drop(p);
        if let Err(e) = self.jobs.try_send((stream, line)) {
            let (stream, mut line) = match e {
                std::sync::mpsc::TrySendError::Full(j)
                | std::sync::mpsc::TrySendError::Disconnected(j) => j,
            };
            zeroize::Zeroize::zeroize(&mut line);
            let why = "the daemon is busy with other control requests; try again";
            refuse(&stream, why, &mut self.refusals);
        }
    }

    /// Drops clients that did not finish their line in time.
    fn expire(&mut self) {
        let now = Instant::now();
        let refusals = &mut self.refusals;
        self.pending.retain(|p| {
            let late = now.duration_since(p.since) >= LINE_DEADLINE;
            if late {
                refuse(&p.stream, "no complete request line within 5 s", refusals);
            }
            !late
        });
    }

    fn accept_some(&mut self) {
        for _ in 0..MAX_PENDING {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE leaves the connection queued: retrying at once
                    // would spin. Wait a little, then take it.
                    warn!("cannot accept a control connection: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    return;
                }
            };
            if !self.allowed(&stream) {
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("control socket: {e}");
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                self.drop_oldest();
            }
            self.pending.push(Pending {
                stream,
                buf: Vec::new(),
                since: Instant::now(),
            });
        }
    }

    /// Only this uid and root may talk to the daemon.
    fn allowed(&mut self, stream: &UnixStream) -> bool {
        let peer = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials);
        let me = self.me;
        match peer {
            Ok(c) if c.uid() == me || c.uid() == 0 => true,
            Ok(c) => {
                warn!(
                    uid = c.uid(),
                    pid = c.pid(),
                    "refused a control connection from another user"
                );
                tell(
                    stream,
                    &format!(
                        "not allowed: this tokenfs serves uid {me} (and root) only; you are uid {}",
                        c.uid()
                    ),
                );
                false
            }
            Err(e) => {
                let why = format!("refused: cannot read your credentials: {e}");
                refuse(stream, &why, &mut self.refusals);
                false
            }
        }
    }

    /// At the limit, the oldest waiter is the likeliest to be idle.
    fn drop_oldest(&mut self) {
        let oldest = self.pending.iter().enumerate().min_by_key(|(_, p)| p.since);
        if let Some((i, _)) = oldest {
            let p = self.pending.swap_remove(i);
            let why = "too many control connections waiting; closed the oldest";
            refuse(&p.stream, why, &mut self.refusals);
        }
    }
}

enum Progress {
    More,
    Closed,
    TooLong,
    Line(Vec<u8>),
}

fn read_some(p: &mut Pending, chunk: &mut [u8]) -> Progress {
    loop {
        match (&p.stream).read(chunk) {
            Ok(0) => return Progress::Closed,
            Ok(n) => {
                let got = chunk.get(..n).unwrap_or_default();
                let end = got.iter().position(|b| *b == b'\n');
                p.buf.extend_from_slice(&got[..end.unwrap_or(n)]);
                zeroize::Zeroize::zeroize(&mut chunk[..n]);
                if p.buf.len() > MAX_LINE {
                    return Progress::TooLong;
                }
                if end.is_some() {
                    return Progress::Line(std::mem::take(&mut p.buf));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Progress::More,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Progress::Closed,
        }
    }
}

/// Handles one complete request on a worker thread.
fn answer(stream: UnixStream, mut line: Vec<u8>, state: &State) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let reply = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => state.handle(req),
        // The line may hold a secret: never echo it.
        Err(e) => {
            serde_json::json!({ "ok": false, "error": format!("bad request at column {}", e.column()) })
        }
    };
    zeroize::Zeroize::zeroize(&mut line);
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    if let Err(e) = (&stream).write_all(&out) {
        warn!("control socket: the client did not take its reply: {e}");
    }
    zeroize::Zeroize::zeroize(&mut out);
}

/// How long a client waits for the daemon: `rotate` may wait on the
/// network; everything else is answered from memory.
fn patience(req: &Request) -> Duration {
    match req {
        Request::Rotate { .. } => Duration::from_secs(60),
        _ => Duration::from_secs(4),
    }
}

/// Sends one request and returns the reply (`Err` with the daemon's message
/// when it says `ok: false`). Gives up after a few seconds (sooner when
/// the daemon is stopped) and says which process is not answering.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + patience(req);
    let stream = connect(socket, deadline).map_err(|e| match e {
        Connect::Refused(e) => format!(
            "cannot reach the tokenfs daemon at {}: {e} (is `tokenfs mount` running? pass --config or --socket)",
            socket.display()
        ),
        Connect::Timeout => not_answering(socket),
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let sent = send(&stream, &line, socket, deadline);
    zeroize::Zeroize::zeroize(&mut line);
    sent?;
    let reply = read_reply(&stream, socket, deadline).map_err(|e| match e {
        None => not_answering(socket),
        Some(e) => e,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&reply)
        .map_err(|_| "the daemon sent a malformed reply".to_string())?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v)
    } else {
        Err(error_of(&v).unwrap_or("unknown error").to_string())
    }
}

fn error_of(v: &serde_json::Value) -> Option<&str> {
    v.get("error").and_then(|e| e.as_str())
}

/// Writes the request line before the deadline.
fn send(stream: &UnixStream, line: &[u8], socket: &Path, deadline: Instant) -> Result<(), String> {
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(left.max(Duration::from_millis(1))));
    let Err(e) = (&*stream).write_all(line) else {
        return Ok(());
    };
    Err(match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => not_answering(socket),
        // A daemon that turns a client away says why, then closes: the
        // reason may be waiting even though the write failed.
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            let soon = Instant::now() + Duration::from_millis(500);
            read_reply(stream, socket, soon)
                .ok()
                .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r).ok())
                .and_then(|v| error_of(&v).map(String::from))
                .unwrap_or_else(|| format!("control socket {}: {e}", socket.display()))
        }
        _ => format!("control socket {}: {e}", socket.display()),
    })
}

/// Says who holds the socket and what state that process is in.
fn not_answering(socket: &Path) -> String {
    let pid = crate::lock::holder(&crate::lock::socket_lock_path(socket));
    let who = match pid {
        Some(pid) => match crate::mounts::process_state(pid) {
            Some(st) => format!("pid {pid}, state {st}{}", state_words(st)),
            None => format!("pid {pid}, gone"),
        },
        None => "no daemon holds its lock".to_string(),
    };
    format!(
        "the daemon at {} is not answering ({who})",
        socket.display()
    )
}

fn state_words(st: char) -> &'static str {
    match st {
        'T' | 't' => " (stopped)",
        'Z' => " (zombie)",
        'D' => " (waiting on the disk)",
        _ => "",
    }
}

enum Connect {
    Refused(std::io::Error),
    Timeout,
}

/// Connects without blocking on a full backlog (a stopped daemon never
/// accepts), retrying until `deadline`.
fn connect(socket: &Path, deadline: Instant) -> Result<UnixStream, Connect> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(socket).map_err(|e| Connect::Refused(e.into()))?;
    loop {
        let fd = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| Connect::Refused(e.into()))?;
        match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false).map_err(Connect::Refused)?;
                return Ok(stream);
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(nix::errno::Errno::EAGAIN) => return Err(Connect::Timeout),
            Err(e) => return Err(Connect::Refused(e.into())),
        }
    }
}

/// Reads the reply line; `Err(None)` when the deadline passes or the daemon
/// is found stopped (checked every 250 ms after the first second).
fn read_reply(
    stream: &UnixStream,
    socket: &Path,
    deadline: Instant,
) -> Result<Vec<u8>, Option<String>> {
    let started = Instant::now();
    let lock = crate::lock::socket_lock_path(socket);
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(None);
        }
        let _ = stream.set_read_timeout(Some(left.min(Duration::from_millis(250))));
        match (&*stream).read(&mut chunk) {
            Ok(0) if reply.is_empty() => {
                return Err(Some(format!(
                    "the daemon at {} closed the connection without a reply",
                    socket.display()
                )));
            }
            Ok(0) => return Ok(reply),
            Ok(n) => {
                let got = chunk.get(..n).unwrap_or_default();
                if let Some(end) = got.iter().position(|b| *b == b'\n') {
                    reply.extend_from_slice(&got[..end]);
                    return Ok(reply);
                }
                reply.extend_from_slice(got);
                if reply.len() > 16 * MAX_LINE {
                    return Err(Some("the daemon's reply is too long".into()));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if started.elapsed() >= Duration::from_secs(1) {
                    let stopped = crate::lock::holder(&lock)
                        .and_then(crate::mounts::process_state)
                        .is_some_and(|s| matches!(s, 'T' | 't' | 'Z'));
                    if stopped {
                        return Err(None);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Some(format!("control socket {}: {e}", socket.display()))),
        }
    }
}

/// Formats a status as a table for humans.
pub fn render_status(s: &Status) -> String {
    let clock = Clock::now();
    let mut out = format!(
        "tokenfs pid {}  generation {}  up {}s\n\n",
        s.pid, s.generation, s.uptime_secs
    );
    out.push_str(&format!(
        "{:<14} {:<8} {:<17} {:<26} {:<10} {:<10}  {}\n",
        "CREDENTIAL", "SOURCE", "STATE", "FINGERPRINT", "AGE", "EXPIRES", "LAST ERROR"
    ));
    for c in &s.credentials {
        render_credential(&mut out, c, &clock);
    }
    for m in &s.mounts {
        render_mount(&mut out, m, &clock);
    }
    for p in &s.proxies {
        render_proxy(&mut out, p, &clock);
    }
    out
}

/// Times in `status` are shown relative to now.
struct Clock {
    now: f64,
}

impl Clock {
    fn now() -> Clock {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Clock { now }
    }

    fn ago(&self, t: Option<f64>) -> String {
        t.map_or("-".to_string(), |t| human(self.now - t, "ago"))
    }

    fn until(&self, t: Option<f64>) -> String {
        t.map_or("-".to_string(), |t| human(t - self.now, "left"))
    }

    fn error(&self, e: Option<&str>, at: Option<f64>) -> Option<String> {
        e.map(|e| format!("{e} ({})", self.ago(at)))
    }
}

fn render_credential(out: &mut String, c: &CredentialStatus, clock: &Clock) {
    let fps: Vec<String> = c
        .fields
        .iter()
        .map(|(f, fp)| {
            if f == "token" {
                fp.clone()
            } else {
                format!("{f}={fp}")
            }
        })
        .collect();
    let fp = if fps.is_empty() {
        "(no value)".to_string()
    } else {
        fps.join(" ")
    };
    out.push_str(&format!(
        "{:<14} {:<8} {:<17} {:<26} {:<10} {:<10}  {}\n",
        c.name,
        c.source,
        c.state,
        fp,
        clock.ago(c.updated_at),
        clock.until(c.expires_at),
        clock
            .error(c.last_error.as_deref(), c.last_error_at)
            .unwrap_or_else(|| "-".into())
    ));
    if let Some(o) = &c.oauth {
        out.push_str(&format!(
            "{:<14} oauth {} ({}), consumers see the {} refresh token; refreshed {} ({} times), next {}{}\n",
            "",
            o.provider,
            o.grant,
            o.consumer_refresh_token,
            clock.ago(o.last_refresh),
            o.refresh_count,
            clock.until(o.next_refresh),
            if o.relogin_required { "; RELOGIN REQUIRED" } else { "" }
        ));
    }
}

fn render_mount(out: &mut String, m: &MountStatus, clock: &Clock) {
    let mode = if m.kernel_passthrough {
        "kernel passthrough"
    } else {
        "forwarded"
    };
    let state = if m.state.is_empty() {
        "?"
    } else {
        m.state.as_str()
    };
    out.push_str(&format!(
        "\nmount {}  {state}  (other files: {mode})\n",
        m.dir.display()
    ));
    for n in &m.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    if let Some(e) = clock.error(m.last_error.as_deref(), m.last_error_at) {
        out.push_str(&format!("  last error: {e}\n"));
    }
    for f in &m.files {
        out.push_str(&format!(
            "  {:<28} {:<7} {:<8} written {:<10} {}\n",
            f.path.display(),
            f.format,
            if f.present { "present" } else { "absent" },
            clock.ago(f.last_write),
            clock
                .error(f.last_error.as_deref(), f.last_error_at)
                .map(|e| format!("last error: {e}"))
                .unwrap_or_default()
        ));
    }
}

fn render_proxy(out: &mut String, p: &ProxyStatus, clock: &Clock) {
    out.push_str(&format!(
        "\nproxy {}  {} → {}  ({})\n  requests {}  refused {}  upstream errors {}  auth failures {}  retries {}  connections {} open / {} total\n",
        p.name,
        p.url,
        p.upstream,
        p.credential,
        p.requests,
        p.refused,
        p.upstream_errors,
        p.auth_failures,
        p.retries,
        p.active_connections,
        p.connections
    ));
    if let Some(e) = clock.error(p.last_error.as_deref(), p.last_error_at) {
        out.push_str(&format!("  last error: {e}\n"));
    }
}

fn human(secs: f64, suffix: &str) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s {suffix}"),
        60..3600 => format!("{}m {suffix}", s / 60),
        _ => format!("{}h {suffix}", s / 3600),
    }
}
