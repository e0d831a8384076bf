//! The control socket: `tokenfs status`, `set`, `rotate` and `token` talk to
//! the daemon over an owner-only unix socket, one JSON line each way.
//!
//! Secrets travel only on this socket (never in argv, where `ps` shows them).
//! The socket file is 0600 in a 0700 directory, and every connection's peer
//! uid is checked with `SO_PEERCRED`: only the daemon's own uid and root.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::fs::MountInfo;
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
    pub started: SystemTime,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Status {
    pub pid: u32,
    pub generation: u64,
    pub uptime_secs: u64,
    pub credentials: Vec<CredentialStatus>,
    pub mounts: Vec<MountStatus>,
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
            .map(|(name, h)| {
                let cred = snap.credentials.get(&name);
                let oauth = self.sources.oauth_status(&name);
                CredentialStatus {
                    oauth,
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
            })
            .collect();
        let mounts = self
            .mounts
            .iter()
            .map(|m| {
                let last_error = m.last_error.lock().clone();
                MountStatus {
                    dir: m.dir.clone(),
                    notes: m.notes.clone(),
                    kernel_passthrough: m.kernel_passthrough.load(Ordering::Relaxed),
                    last_error_at: unix(last_error.as_ref().map(|(_, at)| *at)),
                    last_error: last_error.map(|(e, _)| e),
                    files: m
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
                        .collect(),
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            generation: snap.generation,
            uptime_secs: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            credentials,
            mounts,
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
                    .map(|g| serde_json::json!({ "generation": g }))
            }
            Request::Rotate { name } => self
                .sources
                .rotate(&name)
                .map(|g| serde_json::json!({ "generation": g })),
            Request::Token { name, field: f } => field(f).and_then(|f| {
                let snap = self.store.snapshot();
                snap.credentials
                    .get(&name)
                    .and_then(|c| c.fields.get(&f))
                    .map(|s| serde_json::json!({ "secret": s.expose_str() }))
                    .ok_or_else(|| format!("credential `{name}` has no {f} yet"))
            }),
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
                self.sources
                    .import(&name, session, &from)
                    .map(|g| serde_json::json!({ "generation": g }))
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

impl State {
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
                    match crate::daemon::detach(&d) {
                        Ok(()) => info!(mount = %d.display(), "unmounted on request"),
                        Err(e) => warn!(mount = %d.display(), "unmount failed: {e}"),
                    }
                }
            });
        Ok(serde_json::json!({ "restored": restored, "unmounted": shown }))
    }
}

/// Binds the socket (refusing if another daemon answers on it) and serves it
/// on a background thread.
pub fn serve(path: &Path, state: Arc<State>) -> Result<(), String> {
    let shown = path.display();
    // A directory we create is owner-only; an existing one is the user's
    // and keeps its mode (the socket itself is 0600 and checks peers).
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
    info!(socket = %shown, "control socket ready");
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(listener, state))
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    Ok(())
}

fn accept_loop(listener: UnixListener, state: Arc<State>) {
    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE leaves the connection queued: retrying at once
                // would spin. Wait a little, then take it.
                warn!("cannot accept a control connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
        match peer {
            Ok(c) if c.uid() == me || c.uid() == 0 => {}
            Ok(c) => {
                warn!(
                    uid = c.uid(),
                    pid = c.pid(),
                    "refused a control connection from another user"
                );
                continue;
            }
            Err(e) => {
                warn!("refused a control connection: cannot read its credentials: {e}");
                continue;
            }
        }
        let state = state.clone();
        // A rotation may take a while (network); status must not wait for it.
        let _ = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve_one(stream, &state));
    }
}

fn serve_one(stream: UnixStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => state.handle(req),
        // The line may hold a secret: never echo it.
        Err(e) => {
            serde_json::json!({ "ok": false, "error": format!("bad request at column {}", e.column()) })
        }
    };
    zeroize::Zeroize::zeroize(&mut line);
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
}

/// Sends one request and returns the reply (`Err` with the daemon's message
/// when it says `ok: false`).
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!("cannot reach the tokenfs daemon at {}: {e} (is `tokenfs mount` running? pass --config or --socket)", socket.display())
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("control socket: {e}"))?;
    zeroize::Zeroize::zeroize(&mut line);
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("control socket: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&reply)
        .map_err(|_| "the daemon sent a malformed reply".to_string())?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        Ok(v)
    } else {
        Err(v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("unknown error")
            .to_string())
    }
}

/// Formats a status as a table for humans.
pub fn render_status(s: &Status) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let ago = |t: Option<f64>| t.map_or("-".to_string(), |t| human(now - t, "ago"));
    let until = |t: Option<f64>| t.map_or("-".to_string(), |t| human(t - now, "left"));
    let mut out = format!(
        "tokenfs pid {}  generation {}  up {}s\n\n",
        s.pid, s.generation, s.uptime_secs
    );
    out.push_str(&format!(
        "{:<14} {:<8} {:<17} {:<26} {:<10} {:<10}  {}\n",
        "CREDENTIAL", "SOURCE", "STATE", "FINGERPRINT", "AGE", "EXPIRES", "LAST ERROR"
    ));
    for c in &s.credentials {
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
            ago(c.updated_at),
            until(c.expires_at),
            c.last_error
                .as_deref()
                .map(|e| format!("{} ({})", e, ago(c.last_error_at)))
                .unwrap_or_else(|| "-".into())
        ));
        if let Some(o) = &c.oauth {
            out.push_str(&format!(
                "{:<14} oauth {} ({}), consumers see the {} refresh token; refreshed {} ({} times), next {}{}\n",
                "",
                o.provider,
                o.grant,
                o.consumer_refresh_token,
                ago(o.last_refresh),
                o.refresh_count,
                until(o.next_refresh),
                if o.relogin_required {
                    "; RELOGIN REQUIRED"
                } else {
                    ""
                }
            ));
        }
    }
    for m in &s.mounts {
        let mode = if m.kernel_passthrough {
            "kernel passthrough"
        } else {
            "forwarded"
        };
        out.push_str(&format!(
            "\nmount {}  (other files: {mode})\n",
            m.dir.display()
        ));
        for n in &m.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        if let Some(e) = &m.last_error {
            out.push_str(&format!("  last error: {e} ({})\n", ago(m.last_error_at)));
        }
        for f in &m.files {
            out.push_str(&format!(
                "  {:<28} {:<7} {:<8} written {:<10} {}\n",
                f.path.display(),
                f.format,
                if f.present { "present" } else { "absent" },
                ago(f.last_write),
                f.last_error
                    .as_deref()
                    .map(|e| format!("last error: {e} ({})", ago(f.last_error_at)))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

fn human(secs: f64, suffix: &str) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s {suffix}"),
        60..3600 => format!("{}m {suffix}", s / 60),
        _ => format!("{}h {suffix}", s / 3600),
    }
}
