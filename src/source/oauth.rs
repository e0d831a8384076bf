//! `source = "oauth"`: tokenfs owns an OAuth session and is the only one
//! that spends its refresh token.
//!
//! One thread per credential refreshes early — at half the access token's
//! lifetime and never later than `refresh_before` ahead of expiry — so no
//! consumer's own refresh rule fires (Claude Code at 5 min, Hermes at 2 min,
//! Codex at expiry). Refresh tokens are single-use and rotating: every new
//! one is written to the 0600 `state_file` (temp + fsync + rename + fsync of
//! the directory) *before* it is published or used, and a token that was
//! spent is never sent again (their hashes are kept, in the state file too).
//! Before a refresh token is sent, the state file records that it is in
//! flight: a daemon that dies before the answer is saved does not resend it
//! after a restart (the server may already have spent it) and asks for a
//! new login instead.
//!
//! Only `invalid_grant`, `invalid_token`, `refresh_token_reused` and a 401
//! from the token endpoint put the credential in `relogin_required`; network
//! errors, timeouts, 5xx, 429 and malformed answers are transient: the
//! current access token stays served, retries back off (capped, jittered,
//! honouring `Retry-After`), and nothing is imported or overwritten.
//!
//! A value a consumer writes is adopted only after validation, on this
//! thread (FUSE threads only queue it): a refresh token by refreshing with
//! it, an access token by a probe against `probe_url`. With
//! `consumer_refresh_token = "decoy"` (the default) consumers' files show a
//! stand-in refresh token that only tokenfs recognises, so a consumer's own
//! refresh attempt cannot spend the chain; its failure (a consumer blanking
//! its session) makes tokenfs refresh at once, at most once per
//! `min_refresh_interval`.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};
use zeroize::Zeroize;

use super::flight::{Flight, next_command};
use crate::config::{Body, ConsumerRefreshToken, Grant, OAuthConfig};
use crate::secret::Secret;
use crate::store::{Field, HealthState, Store, Update};

/// The first retry waits this long; each failure doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// No retry waits longer than this.
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is cut to it.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);
/// How long `tokenfs rotate` / `import` wait for the thread.
const CONTROL_WAIT: Duration = Duration::from_secs(120);
/// The largest token-endpoint or state-file body read.
const MAX_BODY: u64 = 64 * 1024;
/// How many spent refresh tokens (hashes) are remembered.
const SPENT_KEPT: usize = 64;
/// How often a written refresh token's validation is retried after a
/// transient failure.
const PENDING_TRIES: u32 = 5;
/// The lifetime assumed when neither `expires_in` nor a JWT `exp` says.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(3600);
/// Scheduled refreshes are never closer together than this.
const MIN_GAP: Duration = Duration::from_millis(500);
/// What every decoy refresh token starts with.
pub const DECOY_PREFIX: &str = "tokenfs-decoy-";

/// An OAuth session as tokenfs holds it.
#[derive(Clone)]
struct Session {
    access_token: Secret,
    refresh_token: Option<Secret>,
    id_token: Option<Secret>,
    account_id: Option<Secret>,
    expires_at: Option<SystemTime>,
    obtained_at: SystemTime,
}

/// A session read from a CLI's file (`tokenfs import`) or pushed with
/// `tokenfs set NAME --field refresh_token`: validated by refreshing with
/// its refresh token before anything changes.
#[derive(Clone, Default)]
pub struct ImportedSession {
    pub refresh_token: Option<Secret>,
    pub access_token: Option<Secret>,
    pub id_token: Option<Secret>,
    pub account_id: Option<Secret>,
}

/// `status` per OAuth credential (no secrets).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OAuthStatus {
    pub provider: String,
    pub grant: String,
    /// `decoy` or `real`: what consumers' files show as the refresh token.
    pub consumer_refresh_token: String,
    pub expires_at: Option<f64>,
    pub last_refresh: Option<f64>,
    pub next_refresh: Option<f64>,
    pub refresh_count: u64,
    pub last_error: Option<String>,
    pub relogin_required: bool,
}

enum Command {
    Rotate(u64),
    /// A value a consumer wrote at a bound key.
    Offer(Field, Secret, String),
    /// A consumer wrote a blanked or garbage session: refresh now.
    Nudge(String),
    Import(ImportedSession, String, Sender<Result<u64, String>>),
}

/// The control side of a running OAuth source.
pub struct Handle {
    name: String,
    cfg: Arc<OAuthConfig>,
    tx: Mutex<Sender<Command>>,
    flight: Arc<Flight>,
    status: Arc<Mutex<OAuthStatus>>,
    has_session: Arc<AtomicBool>,
}

impl Handle {
    /// Refreshes now; concurrent callers (and a scheduled refresh already
    /// running) share one request to the token endpoint.
    pub fn rotate(&self) -> Result<u64, String> {
        let send = |id| {
            self.tx
                .lock()
                .send(Command::Rotate(id))
                .map_err(|_| self.gone())
        };
        self.flight
            .join(send, CONTROL_WAIT, "refresh")
            .map_err(|e| format!("credential `{}`: {e}", self.name))
    }

    /// `tokenfs import` / `tokenfs set --field refresh_token`: validates the
    /// session by refreshing with it, then serves it. Waits.
    pub fn import(&self, session: ImportedSession, origin: &str) -> Result<u64, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .lock()
            .send(Command::Import(session, origin.to_owned(), tx))
            .map_err(|_| self.gone())?;
        rx.recv_timeout(CONTROL_WAIT)
            .map_err(|_| format!("credential `{}`: no answer from its source", self.name))?
    }

    /// A value a consumer wrote at a bound key: what can be refused at once
    /// is; the rest is queued for validation on the source thread. Never
    /// blocks (FUSE thread).
    pub fn offer(&self, field: Field, value: Secret, origin: &str) -> Result<(), String> {
        let has_session = self.has_session.load(Ordering::Acquire);
        match field {
            Field::RefreshToken => {
                if self.cfg.grant == Grant::ClientCredentials {
                    return Err(
                        "this credential uses client credentials: it has no refresh token to adopt"
                            .into(),
                    );
                }
                if value.expose_str().starts_with(DECOY_PREFIX) {
                    return Err(format!(
                        "{value} is an earlier tokenfs decoy refresh token, not a session"
                    ));
                }
            }
            Field::AccessToken | Field::Token => {
                // Seeding an empty credential: the refresh token written
                // with it is what gets validated (by a refresh).
                if self.cfg.probe_url.is_none() && has_session {
                    return Err("an access token alone is adopted only after a probe (set probe_url); a refresh token written with it is validated by a refresh".into());
                }
            }
            Field::Url | Field::ExpiresAtMs | Field::LastRefresh => {
                return Err(format!("{field} is the daemon's, never adopted"));
            }
            Field::IdToken | Field::AccountId => {
                if has_session {
                    return Err(format!(
                        "a {field} is taken only with the session it came with (validated by a refresh with its refresh token)"
                    ));
                }
            }
        }
        self.tx
            .lock()
            .send(Command::Offer(field, value, origin.to_owned()))
            .map_err(|_| self.gone())
    }

    /// A consumer wrote a blanked or implausible session at a bound key:
    /// its own refresh failed (with a decoy, always), so tokenfs refreshes
    /// now (rate-limited). Never blocks.
    pub fn nudge(&self, origin: &str) {
        let _ = self.tx.lock().send(Command::Nudge(origin.to_owned()));
    }

    pub fn status(&self) -> OAuthStatus {
        self.status.lock().clone()
    }

    fn gone(&self) -> String {
        format!("credential `{}`: its source thread has stopped", self.name)
    }
}

/// Loads the state file (publishing a saved session at once, so files
/// render before the mounts go live) and starts the source thread.
pub fn start(name: &str, cfg: &OAuthConfig, store: Arc<Store>) -> Result<Handle, String> {
    // reqwest is built without a crypto provider of its own (see tls.rs).
    crate::tls::install_provider();
    let client = Client::builder()
        .connect_timeout(cfg.timeout)
        .timeout(cfg.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokenfs/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("credential `{name}`: HTTP client: {e}"))?;
    let cfg = Arc::new(cfg.clone());
    let (tx, rx) = mpsc::channel();
    let flight = Arc::new(Flight::default());
    let status = Arc::new(Mutex::new(initial_status(&cfg)));
    let has_session = Arc::new(AtomicBool::new(false));
    // Read once: a secret changed later needs a restart, like every config.
    let client_secret = cfg
        .client_secret_env
        .as_ref()
        .and_then(|var| std::env::var(var).ok())
        .filter(|v| !v.trim().is_empty())
        .map(Secret::new);
    let mut source = Source {
        name: name.to_owned(),
        cfg: cfg.clone(),
        store,
        client,
        flight: flight.clone(),
        status: status.clone(),
        has_session: has_session.clone(),
        client_secret,
        session: None,
        decoy: None,
        spent: VecDeque::new(),
        relogin: false,
        failures: 0,
        next_attempt: None,
        last_refresh: None,
        refresh_count: 0,
        pending: None,
        state_dirty: false,
        last_error: None,
    };
    source.resume();
    source.sync_status();
    std::thread::Builder::new()
        .name(format!("source-oauth-{name}"))
        .spawn(move || source.run(rx))
        .map_err(|e| format!("credential `{name}`: cannot start its thread: {e}"))?;
    Ok(Handle {
        name: name.to_owned(),
        cfg,
        tx: Mutex::new(tx),
        flight,
        status,
        has_session,
    })
}

/// What `status` shows before the first refresh.
fn initial_status(cfg: &OAuthConfig) -> OAuthStatus {
    OAuthStatus {
        provider: cfg.provider.clone(),
        grant: match cfg.grant {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
        .into(),
        consumer_refresh_token: match cfg.consumer_refresh_token {
            ConsumerRefreshToken::Real => "real",
            ConsumerRefreshToken::Decoy => "decoy",
        }
        .into(),
        ..OAuthStatus::default()
    }
}

struct Source {
    name: String,
    cfg: Arc<OAuthConfig>,
    store: Arc<Store>,
    client: Client,
    flight: Arc<Flight>,
    status: Arc<Mutex<OAuthStatus>>,
    has_session: Arc<AtomicBool>,
    client_secret: Option<Secret>,
    session: Option<Session>,
    /// What consumers see as the refresh token (decoy mode), per real one.
    decoy: Option<Secret>,
    /// Hashes of refresh tokens that were spent, newest last.
    spent: VecDeque<String>,
    relogin: bool,
    failures: u32,
    next_attempt: Option<SystemTime>,
    last_refresh: Option<SystemTime>,
    refresh_count: u64,
    pending: Option<Pending>,
    /// The last state-file write failed: retried on the timer.
    state_dirty: bool,
    last_error: Option<String>,
}

/// A refresh token a consumer wrote whose validation failed transiently.
struct Pending {
    token: Secret,
    origin: String,
    tries: u32,
    at: SystemTime,
}

/// Why a call to the token endpoint failed.
enum Failure {
    /// The grant is dead (`invalid_grant`, `invalid_token`,
    /// `refresh_token_reused`, or a 401): only a new login helps.
    Rejected(String),
    /// Try again later (after at least `Some`). `maybe_spent`: the request
    /// may have reached the server (a timeout, a 2xx we could not read).
    Transient(String, Option<Duration>, bool),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Rejected(m) | Failure::Transient(m, _, _) => m,
        }
    }
}

/// What the token endpoint answered, parsed.
struct Granted {
    access_token: Secret,
    refresh_token: Option<Secret>,
    id_token: Option<Secret>,
    expires_in: Option<Duration>,
}

/// The state file: the only place a refresh token touches disk.
#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    version: u32,
    provider: String,
    token_url: String,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    account_id: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    expires_at: Option<f64>,
    #[serde(default)]
    obtained_at: Option<f64>,
    /// Hash of a refresh token sent whose answer was not saved yet.
    #[serde(default)]
    in_flight: Option<String>,
    /// Hashes of spent refresh tokens, newest last.
    #[serde(default)]
    spent: Vec<String>,
    #[serde(default)]
    refresh_count: u64,
    #[serde(default)]
    last_refresh: Option<f64>,
}

impl Drop for StateFile {
    fn drop(&mut self) {
        for s in [
            &mut self.access_token,
            &mut self.refresh_token,
            &mut self.id_token,
            &mut self.account_id,
        ] {
            if let Some(v) = s.as_mut() {
                v.zeroize();
            }
        }
    }
}

/// A stable non-reversible name of a token, for the spent list.
fn hash(token: &Secret) -> String {
    Sha256::digest(token.expose())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

fn from_unix(secs: Option<f64>) -> Option<SystemTime> {
    secs.filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .map(|d| UNIX_EPOCH + d)
}

/// When to refresh a token obtained at `obtained` that expires at `expires`:
/// at half its lifetime, and never later than `before` ahead of expiry
/// (when the lifetime allows; else at half).
pub fn refresh_at(
    obtained: SystemTime,
    expires: Option<SystemTime>,
    before: Duration,
) -> SystemTime {
    let life = expires
        .and_then(|e| e.duration_since(obtained).ok())
        .unwrap_or(ASSUMED_LIFETIME);
    let half = life / 2;
    let delay = match life.checked_sub(before) {
        Some(d) if !d.is_zero() => d.min(half),
        _ => half,
    };
    obtained + delay.max(MIN_GAP)
}

impl Source {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            let Ok(cmd) = next_command(&rx, self.next_deadline()) else {
                return;
            };
            match cmd {
                Some(Command::Rotate(id)) => {
                    // A scheduled refresh may already have served this id.
                    if !self.flight.finished(id) {
                        let _ = self.flown("requested");
                    }
                }
                Some(Command::Offer(field, value, origin)) => self.offered(field, value, origin, 0),
                Some(Command::Nudge(origin)) => self.nudged(&origin),
                Some(Command::Import(session, origin, reply)) => {
                    let result = self.import(session, &origin);
                    self.sync_status();
                    let _ = reply.send(result);
                }
                None => self.on_timer(),
            }
            self.sync_status();
        }
    }

    /// A refresh of the current session under the single-flight id.
    fn flown(&mut self, why: &str) -> Result<u64, String> {
        let id = self.flight.begin();
        let result = self.refresh_current(why);
        self.finish_flight(id, result.clone());
        result
    }

    /// Status first, so a waiting caller reads the outcome in `status`.
    fn finish_flight(&self, id: u64, result: Result<u64, String>) {
        self.sync_status();
        self.flight.finish(id, result);
    }

    fn next_deadline(&self) -> Option<SystemTime> {
        let mut at = self.next_attempt;
        for t in [
            self.pending.as_ref().map(|p| p.at),
            self.state_dirty
                .then(|| SystemTime::now() + Duration::from_secs(5)),
        ]
        .into_iter()
        .flatten()
        {
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    fn on_timer(&mut self) {
        let now = SystemTime::now();
        if let Some(p) = self.pending.take_if(|p| p.at <= now) {
            self.offered(Field::RefreshToken, p.token, p.origin, p.tries);
        }
        if self.next_attempt.is_some_and(|t| t <= now) {
            let _ = self.flown("scheduled");
        }
        if self.state_dirty {
            self.save_state(None);
        }
    }

    // ---- state file ----------------------------------------------------

    /// At start: the saved session, published before the mounts go live.
    fn resume(&mut self) {
        if self.cfg.grant == Grant::ClientCredentials {
            // Nothing to resume: a client-credentials token is fetched now.
            self.set_next(Some(SystemTime::now()));
            return;
        }
        let Some(state) = self.load_state() else {
            return;
        };
        if state.provider != self.cfg.provider || state.token_url != self.cfg.token_url {
            warn!(credential = %self.name, "the state file was written for provider {} at {}; using it with {} at {}",
                state.provider, state.token_url, self.cfg.provider, self.cfg.token_url);
        }
        self.spent = state.spent.iter().cloned().collect();
        self.refresh_count = state.refresh_count;
        self.last_refresh = from_unix(state.last_refresh);
        let Some(access) = state.access_token.clone().map(Secret::new) else {
            return;
        };
        let session = Session {
            access_token: access,
            refresh_token: state.refresh_token.clone().map(Secret::new),
            id_token: state.id_token.clone().map(Secret::new),
            account_id: state.account_id.clone().map(Secret::new),
            expires_at: from_unix(state.expires_at),
            obtained_at: from_unix(state.obtained_at).unwrap_or_else(SystemTime::now),
        };
        self.serve_resumed(session, &state);
    }

    /// Serves a resumed session, unless its refresh token may have been
    /// spent already (sent when tokenfs stopped, or refused before): then
    /// relogin, never a second send.
    fn serve_resumed(&mut self, session: Session, state: &StateFile) {
        let stranded = match (&state.in_flight, &session.refresh_token) {
            (Some(h), Some(r)) => *h == hash(r),
            _ => false,
        };
        let refused = session
            .refresh_token
            .as_ref()
            .is_some_and(|r| self.is_spent(r));
        let valid = session.expires_at.is_none_or(|e| e > SystemTime::now());
        info!(credential = %self.name, fingerprint = %session.access_token,
            expires = ?session.expires_at.map(humantime::format_rfc3339_seconds),
            "resumed the session from {}", self.cfg.state_file.display());
        self.set_session(session);
        self.publish();
        if stranded {
            let msg = format!(
                "tokenfs stopped while refresh token {} was being sent: the server may have spent it, so it is not sent again; relogin required (`tokenfs import {}`); the access token is served until it expires",
                self.session
                    .as_ref()
                    .and_then(|s| s.refresh_token.as_ref())
                    .map(Secret::fingerprint)
                    .unwrap_or_default(),
                self.name
            );
            self.fail_loud(msg);
            return;
        }
        if refused {
            let msg = format!(
                "the saved refresh token was refused by the server before: relogin required (`tokenfs import {}`)",
                self.name
            );
            self.fail_loud(msg);
            return;
        }
        if !valid {
            info!(credential = %self.name, "the saved access token has expired: refreshing now");
            self.set_next(Some(SystemTime::now()));
        } else {
            self.schedule_next();
        }
    }

    /// The state file, or why there is no session to resume (noted).
    fn load_state(&mut self) -> Option<StateFile> {
        let path = self.cfg.state_file.clone();
        match read_state(&path) {
            Ok(Some(s)) => Some(s),
            Ok(None) => {
                let msg = format!(
                    "no OAuth session yet: `tokenfs import {} --from claude|codex|hermes-codex`, or a consumer's login written to a managed file",
                    self.name
                );
                info!(credential = %self.name, state_file = %path.display(), "{msg}");
                self.store.update_health(&self.name, |h| {
                    h.last_error = Some(msg.clone());
                    h.last_error_at = Some(SystemTime::now());
                });
                None
            }
            Err(e) => {
                let msg = format!(
                    "cannot read the state file {}: {e}; it is left as it is (`tokenfs import {}` starts a new session)",
                    path.display(),
                    self.name
                );
                error!(credential = %self.name, "{msg}");
                self.note(HealthState::ReloginRequired, msg);
                self.relogin = true;
                None
            }
        }
    }

    /// Writes the current session; `in_flight` marks a refresh token that is
    /// about to be sent. Returns whether it is on disk.
    fn save_state(&mut self, in_flight: Option<&Secret>) -> bool {
        if self.cfg.grant == Grant::ClientCredentials {
            return true;
        }
        let s = self.session.as_ref();
        let state = StateFile {
            version: 1,
            provider: self.cfg.provider.clone(),
            token_url: self.cfg.token_url.clone(),
            access_token: s.map(|s| s.access_token.expose_str().to_owned()),
            refresh_token: s
                .and_then(|s| s.refresh_token.as_ref())
                .map(|t| t.expose_str().to_owned()),
            id_token: s
                .and_then(|s| s.id_token.as_ref())
                .map(|t| t.expose_str().to_owned()),
            account_id: s
                .and_then(|s| s.account_id.as_ref())
                .map(|t| t.expose_str().to_owned()),
            expires_at: unix(s.and_then(|s| s.expires_at)),
            obtained_at: unix(s.map(|s| s.obtained_at)),
            in_flight: in_flight.map(hash),
            spent: self.spent.iter().cloned().collect(),
            refresh_count: self.refresh_count,
            last_refresh: unix(self.last_refresh),
        };
        match write_state(&self.cfg.state_file, &state) {
            Ok(()) => {
                if self.state_dirty {
                    info!(credential = %self.name, "the state file is written again");
                }
                self.state_dirty = false;
                true
            }
            Err(e) => {
                let msg = format!(
                    "cannot write the state file {}: {e}; the session is kept in memory, retrying",
                    self.cfg.state_file.display()
                );
                error!(credential = %self.name, "{msg}");
                self.note(HealthState::Degraded, msg);
                self.state_dirty = in_flight.is_none();
                false
            }
        }
    }

    // ---- the token endpoint ---------------------------------------------

    fn token_request(&self, params: Vec<(&'static str, String)>) -> Result<Granted, Failure> {
        let req = self.token_post(params);
        let resp = req.send().map_err(|e| {
            let (kind, maybe_spent) = if e.is_connect() {
                ("cannot connect", false)
            } else if e.is_timeout() {
                ("timed out", true)
            } else {
                ("failed", true)
            };
            Failure::Transient(
                format!("token endpoint: {kind} ({})", e.without_url()),
                None,
                maybe_spent,
            )
        })?;
        token_response(resp)
    }

    /// The token request: client authentication, scope, and the body in
    /// the provider's encoding. The parameters are zeroed once encoded.
    fn token_post(
        &self,
        mut params: Vec<(&'static str, String)>,
    ) -> reqwest::blocking::RequestBuilder {
        let mut req = self
            .client
            .post(&self.cfg.token_url)
            .header(reqwest::header::ACCEPT, "application/json");
        match &self.client_secret {
            Some(secret) => {
                req = req.basic_auth(&self.cfg.client_id, Some(secret.expose_str()));
            }
            None => params.push(("client_id", self.cfg.client_id.clone())),
        }
        if let Some(scope) = &self.cfg.scope {
            params.push(("scope", scope.clone()));
        }
        let (content_type, body) = match self.cfg.body {
            Body::Json => {
                let map: serde_json::Map<String, serde_json::Value> = params
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone())))
                    .collect();
                (
                    "application/json",
                    serde_json::to_vec(&map).unwrap_or_default(),
                )
            }
            Body::Form => (
                "application/x-www-form-urlencoded",
                form_encode(&params).into_bytes(),
            ),
        };
        for (_, v) in params.iter_mut() {
            v.zeroize();
        }
        req.header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
    }

    /// Refreshes with `token` (ours, or one being validated). The token is
    /// marked in flight in the state file first when it is ours.
    fn refresh_with(&mut self, token: &Secret) -> Result<Granted, Failure> {
        if self.is_spent(token) {
            return Err(Failure::Rejected(format!(
                "refresh token {token} was spent already; it is never sent again"
            )));
        }
        let ours = self.session.as_ref().and_then(|s| s.refresh_token.as_ref()) == Some(token);
        if ours && !self.save_state(Some(token)) {
            return Err(Failure::Transient(
                "cannot record the refresh in the state file; not refreshing".into(),
                None,
                false,
            ));
        }
        let result = self.token_request(vec![
            ("grant_type", "refresh_token".into()),
            ("refresh_token", token.expose_str().to_owned()),
        ]);
        if let Err(Failure::Rejected(_)) = &result {
            // Refused (spent, revoked, unknown): never sent again, also
            // after a restart.
            self.mark_spent(token);
        }
        match &result {
            // The server answered: the in-flight mark is cleared below by
            // the write of the new session, or here when nothing changed.
            Err(Failure::Rejected(_)) | Err(Failure::Transient(_, _, false)) if ours => {
                self.save_state(None);
            }
            _ => {}
        }
        result
    }

    fn client_credentials(&mut self) -> Result<Granted, Failure> {
        if self.client_secret.is_none() {
            return Err(Failure::Rejected(format!(
                "${} is not set: no client secret",
                self.cfg.client_secret_env.as_deref().unwrap_or("?")
            )));
        }
        self.token_request(vec![("grant_type", "client_credentials".into())])
    }

    /// Refreshes the current session (or fetches a client-credentials token).
    fn refresh_current(&mut self, why: &str) -> Result<u64, String> {
        if self.relogin {
            let msg = format!(
                "credential `{}` needs a new login (`tokenfs import {}`): {}",
                self.name,
                self.name,
                self.last_error.clone().unwrap_or_default()
            );
            return Err(msg);
        }
        let result = match self.cfg.grant {
            Grant::ClientCredentials => self.client_credentials(),
            Grant::RefreshToken => {
                let Some(token) = self.session.as_ref().and_then(|s| s.refresh_token.clone())
                else {
                    return Err(format!(
                        "credential `{}` has no session yet: `tokenfs import {} --from claude|codex|hermes-codex`",
                        self.name, self.name
                    ));
                };
                self.refresh_with(&token)
            }
        };
        match result {
            Ok(granted) => {
                let used = self.session.as_ref().and_then(|s| s.refresh_token.clone());
                Ok(self.accept(granted, used, None, why))
            }
            Err(f) => Err(self.refresh_failed(f)),
        }
    }

    /// A new session from the token endpoint: saved, then published.
    fn accept(
        &mut self,
        granted: Granted,
        used: Option<Secret>,
        fallback: Option<&ImportedSession>,
        why: &str,
    ) -> u64 {
        let now = SystemTime::now();
        let previous = self.session.take();
        let refresh_token = granted.refresh_token.clone().or_else(|| used.clone());
        if let (Some(u), Some(_)) = (&used, &granted.refresh_token)
            && granted.refresh_token.as_ref() != Some(u)
        {
            self.mark_spent(u);
        }
        let expires_at = granted
            .expires_in
            .map(|d| now + d)
            .or_else(|| jwt_exp(granted.access_token.expose_str()))
            .or_else(|| {
                warn!(credential = %self.name, "the token endpoint gave no expires_in and the access token is no JWT: assuming {}",
                    humantime::format_duration(ASSUMED_LIFETIME));
                Some(now + ASSUMED_LIFETIME)
            });
        let id_token = granted
            .id_token
            .clone()
            .or_else(|| fallback.and_then(|f| f.id_token.clone()))
            .or_else(|| previous.as_ref().and_then(|p| p.id_token.clone()));
        let account_id = id_token
            .as_ref()
            .and_then(|t| account_id_from_id_token(t.expose_str()))
            .map(Secret::new)
            .or_else(|| fallback.and_then(|f| f.account_id.clone()))
            .or_else(|| previous.as_ref().and_then(|p| p.account_id.clone()));
        let session = Session {
            access_token: granted.access_token,
            refresh_token,
            id_token,
            account_id,
            expires_at,
            obtained_at: now,
        };
        info!(credential = %self.name, why, fingerprint = %session.access_token,
            refresh = ?session.refresh_token.as_ref().map(Secret::fingerprint),
            lifetime = %humantime::format_duration(Duration::from_secs(
                expires_at.and_then(|e| e.duration_since(now).ok()).unwrap_or_default().as_secs())),
            "refreshed the session");
        self.set_session(session);
        self.refresh_count += 1;
        self.last_refresh = Some(now);
        self.failures = 0;
        self.relogin = false;
        self.last_error = None;
        // The new refresh token is on disk before anyone can use it.
        self.save_state(None);
        let generation = self.publish();
        self.schedule_next();
        generation
    }

    fn set_session(&mut self, session: Session) {
        let changed = self.session.as_ref().map(|s| s.refresh_token.as_ref())
            != Some(session.refresh_token.as_ref());
        if changed || self.decoy.is_none() {
            self.decoy = session.refresh_token.as_ref().map(|_| new_decoy());
        }
        self.session = Some(session);
        self.has_session.store(true, Ordering::Release);
    }

    fn publish(&mut self) -> u64 {
        let Some(s) = &self.session else {
            return self.store.snapshot().generation;
        };
        let mut fields = vec![
            (Field::AccessToken, s.access_token.clone()),
            (Field::Token, s.access_token.clone()),
        ];
        let shown_refresh = match self.cfg.consumer_refresh_token {
            ConsumerRefreshToken::Real => s.refresh_token.clone(),
            ConsumerRefreshToken::Decoy => self.decoy.clone(),
        };
        if let Some(r) = shown_refresh {
            fields.push((Field::RefreshToken, r));
        }
        if let Some(t) = &s.id_token {
            fields.push((Field::IdToken, t.clone()));
        }
        if let Some(t) = &s.account_id {
            fields.push((Field::AccountId, t.clone()));
        }
        // What consumers read besides the tokens: the expiry as a number
        // (Claude's expiresAt, ms) and the time of the refresh (Codex).
        if let Some(ms) = s
            .expires_at
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        {
            fields.push((Field::ExpiresAtMs, Secret::new(ms.as_millis().to_string())));
        }
        fields.push((
            Field::LastRefresh,
            Secret::new(humantime::format_rfc3339_micros(s.obtained_at).to_string()),
        ));
        let update = Update {
            fields,
            expires_at: s.expires_at,
        };
        // A refusal (a file cannot carry a value) is logged and recorded by
        // the store; the previous session stays served until the next one.
        match self.store.publish(&self.name, update) {
            Ok(Some(g)) => g,
            Ok(None) => {
                self.store.record_success(&self.name);
                self.store.snapshot().generation
            }
            Err(_) => self.store.snapshot().generation,
        }
    }

    fn refresh_failed(&mut self, f: Failure) -> String {
        self.failures += 1;
        match f {
            Failure::Rejected(m) => {
                let msg = format!(
                    "{m}: relogin required (log in with the CLI, then `tokenfs import {} --from …`); the current access token is served until it expires",
                    self.name
                );
                self.fail_loud(msg)
            }
            Failure::Transient(m, retry_after, _) => {
                let wait = self.backoff(self.failures, retry_after);
                let expired = self
                    .session
                    .as_ref()
                    .and_then(|s| s.expires_at)
                    .is_some_and(|e| e <= SystemTime::now());
                let msg = format!(
                    "{m} (attempt {}; {}; retrying in {})",
                    self.failures,
                    match (&self.session, expired) {
                        (Some(s), false) => format!("access token {} still served", s.access_token),
                        (Some(s), true) => format!("access token {} has EXPIRED", s.access_token),
                        (None, _) => "no session yet".into(),
                    },
                    humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                );
                if expired {
                    error!(credential = %self.name, "{msg}");
                } else {
                    warn!(credential = %self.name, "{msg}");
                }
                self.note(HealthState::Degraded, msg.clone());
                self.set_next(Some(SystemTime::now() + wait));
                msg
            }
        }
    }

    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exp = BACKOFF_BASE
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(BACKOFF_CAP);
        // ±20% jitter, so many daemons do not retry in lockstep.
        let jittered = exp.mul_f64(rand::rng().random_range(0.8..1.2));
        retry_after.map_or(jittered, |r| r.max(jittered))
    }

    fn schedule_next(&mut self) {
        let at = self
            .session
            .as_ref()
            .map(|s| refresh_at(s.obtained_at, s.expires_at, self.cfg.refresh_before));
        self.set_next(at);
    }

    fn set_next(&mut self, at: Option<SystemTime>) {
        self.next_attempt = at;
        self.store
            .update_health(&self.name, |h| h.next_attempt = at);
    }

    fn is_spent(&self, token: &Secret) -> bool {
        let h = hash(token);
        self.spent.iter().any(|s| *s == h)
    }

    fn mark_spent(&mut self, token: &Secret) {
        let h = hash(token);
        if !self.spent.contains(&h) {
            self.spent.push_back(h);
        }
        while self.spent.len() > SPENT_KEPT {
            self.spent.pop_front();
        }
    }

    /// Records a failure in the health record and the OAuth status.
    fn note(&mut self, state: HealthState, msg: String) {
        self.last_error = Some(msg.clone());
        self.store.record_error(&self.name, state, msg);
    }

    /// A failure only a human can fix.
    fn fail_loud(&mut self, msg: String) -> String {
        error!(credential = %self.name, "{msg}");
        self.relogin = true;
        self.set_next(None);
        self.note(HealthState::ReloginRequired, msg.clone());
        msg
    }

    /// Records a value that was not adopted, without changing the state.
    fn not_adopted(&mut self, msg: String) {
        warn!(credential = %self.name, "{msg}");
        self.last_error = Some(msg.clone());
        self.store.update_health(&self.name, |h| {
            h.last_error = Some(msg);
            h.last_error_at = Some(SystemTime::now());
        });
    }

    fn sync_status(&self) {
        let s = self.session.as_ref();
        let mut st = self.status.lock();
        st.expires_at = unix(s.and_then(|s| s.expires_at));
        st.last_refresh = unix(self.last_refresh);
        st.next_refresh = unix(self.next_attempt);
        st.refresh_count = self.refresh_count;
        st.last_error = self.last_error.clone();
        st.relogin_required = self.relogin;
    }

    // ---- adoption ---------------------------------------------------------

    fn offered(&mut self, field: Field, value: Secret, origin: String, tries: u32) {
        match field {
            Field::RefreshToken => self.offered_refresh(value, origin, tries),
            Field::AccessToken | Field::Token => self.offered_access(value, &origin),
            Field::IdToken
            | Field::AccountId
            | Field::Url
            | Field::ExpiresAtMs
            | Field::LastRefresh => {
                debug!(credential = %self.name, %field, "taken only with its session's refresh token");
            }
        }
    }

    fn offered_refresh(&mut self, token: Secret, origin: String, tries: u32) {
        let ours = self.session.as_ref().and_then(|s| s.refresh_token.as_ref());
        if ours == Some(&token) || self.decoy.as_ref() == Some(&token) {
            return;
        }
        if self.is_spent(&token) {
            return self.not_adopted(format!(
                "did not adopt refresh token {token} written to {origin}: it was spent already (an old copy written back); the current session is kept"
            ));
        }
        if self.cfg.grant == Grant::ClientCredentials {
            return;
        }
        info!(credential = %self.name, fingerprint = %token, "validating a refresh token written to {origin} by refreshing with it");
        let id = self.flight.begin();
        let result = match self.refresh_with(&token) {
            Ok(granted) => {
                let g = self.accept(
                    granted,
                    Some(token.clone()),
                    None,
                    "adopted a consumer's session",
                );
                info!(credential = %self.name, "adopted the session written to {origin}");
                Ok(g)
            }
            Err(Failure::Rejected(m)) => {
                self.mark_spent(&token);
                let msg = format!(
                    "did not adopt refresh token {token} written to {origin}: {m}; the current session is kept"
                );
                self.not_adopted(msg.clone());
                Err(msg)
            }
            Err(Failure::Transient(m, retry_after, _)) => {
                let retry = tries + 1 < PENDING_TRIES;
                let msg = format!(
                    "cannot validate refresh token {token} written to {origin} ({m}); the current session is kept{}",
                    if retry { ", will try again" } else { "" }
                );
                self.not_adopted(msg.clone());
                if retry {
                    self.pending = Some(Pending {
                        at: SystemTime::now() + self.backoff(tries + 1, retry_after),
                        token,
                        origin,
                        tries: tries + 1,
                    });
                }
                Err(msg)
            }
        };
        self.finish_flight(id, result);
    }

    /// An access token that passed the probe becomes the session's (its
    /// refresh token stays ours).
    fn adopt_access(&mut self, token: Secret, origin: &str) {
        info!(credential = %self.name, fingerprint = %token, "an access token written to {origin} passed the probe: adopted");
        let now = SystemTime::now();
        let expires_at = jwt_exp(token.expose_str())
            .or_else(|| self.session.as_ref().and_then(|s| s.expires_at));
        let session = match self.session.take() {
            Some(s) => Session {
                access_token: token,
                expires_at,
                ..s
            },
            None => Session {
                access_token: token,
                refresh_token: None,
                id_token: None,
                account_id: None,
                expires_at,
                obtained_at: now,
            },
        };
        self.set_session(session);
        self.save_state(None);
        self.publish();
        if self.next_attempt.is_none() && !self.relogin {
            self.schedule_next();
        }
    }

    fn offered_access(&mut self, token: Secret, origin: &str) {
        let current = self.session.as_ref().map(|s| &s.access_token);
        if current == Some(&token) {
            return;
        }
        let Some(probe) = self.cfg.probe_url.clone() else {
            debug!(credential = %self.name, fingerprint = %token, "an access token written to {origin} is not adopted without probe_url");
            return;
        };
        // Newer only by its own expiry: a token without one (Anthropic's
        // are opaque) may be an older copy that still passes the probe, and
        // serving it with the current session's expiry would outlive it.
        let newer = match (
            jwt_exp(token.expose_str()),
            self.session.as_ref().map(|s| s.expires_at),
        ) {
            (Some(offered), Some(Some(ours))) => offered > ours,
            (None, Some(_)) => false,
            _ => true,
        };
        if !newer {
            return self.not_adopted(format!(
                "did not adopt access token {token} written to {origin}: it is not shown to expire after the current one (an opaque token is adopted only with its refresh token)"
            ));
        }
        let resp = self
            .client
            .get(&probe)
            .bearer_auth(token.expose_str())
            .send();
        match resp.map(|r| r.status()) {
            Ok(s) if s.is_success() => self.adopt_access(token, origin),
            Ok(s) => self.not_adopted(format!(
                "did not adopt access token {token} written to {origin}: the probe answered HTTP {}",
                s.as_u16()
            )),
            Err(e) => self.not_adopted(format!(
                "did not adopt access token {token} written to {origin}: the probe failed ({})",
                e.without_url()
            )),
        }
    }

    fn nudged(&mut self, origin: &str) {
        if self.relogin || self.session.is_none() {
            return;
        }
        let recent = self
            .last_refresh
            .is_some_and(|t| t.elapsed().unwrap_or_default() < self.cfg.min_refresh_interval);
        if recent {
            info!(credential = %self.name, "a consumer blanked its session in {origin}; the last refresh is recent, so none now (min_refresh_interval)");
            return;
        }
        info!(credential = %self.name, "a consumer blanked its session in {origin} (its own refresh failed): refreshing now");
        let _ = self.flown("a consumer's refresh failed");
    }

    fn import(&mut self, session: ImportedSession, origin: &str) -> Result<u64, String> {
        if self.cfg.grant == Grant::ClientCredentials {
            return Err(format!(
                "credential `{}` uses client credentials: there is no session to import",
                self.name
            ));
        }
        let Some(token) = session.refresh_token.clone() else {
            return Err(format!("{origin} holds no refresh token"));
        };
        crate::source::plausible(&token, 16)
            .map_err(|e| format!("{origin}: refresh token: {e}"))?;
        if token.expose_str().starts_with(DECOY_PREFIX) {
            return Err(format!(
                "{origin} holds a tokenfs decoy refresh token (a file tokenfs serves), not a session"
            ));
        }
        if self.session.as_ref().and_then(|s| s.refresh_token.as_ref()) == Some(&token) {
            if self.relogin {
                return Err(format!(
                    "{origin} holds the session tokenfs already has, which the server refused: log in with the CLI first"
                ));
            }
            return Ok(self.store.snapshot().generation);
        }
        info!(credential = %self.name, fingerprint = %token, "importing the session in {origin}: validating it by a refresh");
        let id = self.flight.begin();
        let result = match self.refresh_with(&token) {
            Ok(granted) => Ok(self.accept(granted, Some(token), Some(&session), "imported")),
            Err(Failure::Rejected(m)) => {
                self.mark_spent(&token);
                let msg = format!(
                    "the session in {origin} was refused ({m}): log in with the CLI again, then import; nothing changed"
                );
                self.not_adopted(msg.clone());
                Err(msg)
            }
            Err(f) => {
                let msg = format!(
                    "cannot validate the session in {origin} ({}); nothing changed, try again",
                    f.message()
                );
                self.not_adopted(msg.clone());
                Err(msg)
            }
        };
        self.finish_flight(id, result.clone());
        result
    }
}

fn new_decoy() -> Secret {
    let mut rng = rand::rng();
    let hex: String = (0..24)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect();
    Secret::new(format!("{DECOY_PREFIX}{hex}"))
}

fn parse_granted(json: Option<serde_json::Value>) -> Option<Granted> {
    let v = json?;
    let text = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .filter(|s| !s.trim().is_empty())
            .map(Secret::new)
    };
    let access_token = text("access_token")?;
    crate::source::plausible(&access_token, 8).ok()?;
    let expires_in = match v.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s > 0.0)
    .and_then(|s| Duration::try_from_secs_f64(s).ok());
    Some(Granted {
        access_token,
        refresh_token: text("refresh_token").filter(|t| crate::source::plausible(t, 8).is_ok()),
        id_token: text("id_token"),
        expires_in,
    })
}

/// The OAuth error code of an error body: `{"error": "invalid_grant"}`,
/// `{"error": {"code": "refresh_token_reused"}}` or `{"code": …}`.
fn error_code(v: &serde_json::Value) -> Option<String> {
    let code = match v.get("error") {
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        Some(serde_json::Value::Object(o)) => o
            .get("code")
            .or_else(|| o.get("type"))
            .and_then(|c| c.as_str()),
        _ => None,
    }
    .or_else(|| v.get("code").and_then(|c| c.as_str()))?;
    // An error code is a short identifier; anything else is not shown.
    (code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
    .then(|| code.to_owned())
}

/// Reads a token endpoint's answer (bounded). Only `invalid_grant`,
/// `invalid_token`, `refresh_token_reused` and a 401 mean the session is
/// dead; anything else is transient, honouring `Retry-After`.
fn token_response(resp: reqwest::blocking::Response) -> Result<Granted, Failure> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(RETRY_AFTER_CAP));
    let mut buf = Vec::new();
    let read = resp.take(MAX_BODY + 1).read_to_end(&mut buf);
    let json: Option<serde_json::Value> = serde_json::from_slice(&buf).ok();
    let too_big = buf.len() as u64 > MAX_BODY;
    buf.zeroize();
    let code = status.as_u16();
    if status.is_success() {
        let why = if read.is_err() || too_big {
            "with an unreadable or oversized body"
        } else {
            "without a usable access_token (malformed response)"
        };
        let granted = (read.is_ok() && !too_big)
            .then(|| parse_granted(json))
            .flatten();
        return granted.ok_or_else(|| {
            Failure::Transient(
                format!("token endpoint: HTTP {code} {why}"),
                retry_after,
                true,
            )
        });
    }
    let error = json.as_ref().and_then(error_code);
    let msg = format!(
        "token endpoint: HTTP {code}{}",
        error
            .as_deref()
            .map(|c| format!(" {c}"))
            .unwrap_or_default()
    );
    let dead = matches!(
        error.as_deref(),
        Some("invalid_grant" | "invalid_token" | "refresh_token_reused")
    ) || status == StatusCode::UNAUTHORIZED;
    Err(if dead {
        Failure::Rejected(msg)
    } else {
        Failure::Transient(msg, retry_after, false)
    })
}

fn form_encode(params: &[(&str, String)]) -> String {
    fn enc(s: &str, out: &mut String) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    out.push(b as char)
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        enc(k, &mut out);
        out.push('=');
        enc(v, &mut out);
    }
    out
}

/// Decodes base64url (with or without padding).
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The claims of a JWT (no signature check: only for expiry and account id).
pub fn jwt_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > MAX_BODY as usize {
        return None;
    }
    let mut bytes = base64url_decode(payload)?;
    let claims = serde_json::from_slice(&bytes).ok();
    bytes.zeroize();
    match claims? {
        serde_json::Value::Object(o) => Some(o),
        _ => None,
    }
}

/// A JWT's `exp`.
pub fn jwt_exp(token: &str) -> Option<SystemTime> {
    let exp = jwt_claims(token)?.get("exp")?.as_f64()?;
    from_unix(Some(exp))
}

/// The ChatGPT account of an OpenAI id_token:
/// `https://api.openai.com/auth` → `chatgpt_account_id` (or that flattened).
pub fn account_id_from_id_token(token: &str) -> Option<String> {
    let claims = jwt_claims(token)?;
    claims
        .get("https://api.openai.com/auth")
        .and_then(|a| a.get("chatgpt_account_id"))
        .or_else(|| claims.get("https://api.openai.com/auth.chatgpt_account_id"))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(String::from)
}

// ---- the state file on disk ----------------------------------------------

fn read_state(path: &Path) -> Result<Option<StateFile>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if let Ok(meta) = file.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(state_file = %path.display(), "the state file is readable by others; making it 0600");
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    let mut buf = Vec::new();
    file.take(MAX_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_BODY {
        buf.zeroize();
        return Err(format!("larger than {MAX_BODY} bytes"));
    }
    let parsed = serde_json::from_slice::<StateFile>(&buf);
    buf.zeroize();
    // The parser's message never quotes the input.
    parsed
        .map(Some)
        .map_err(|e| format!("malformed at line {} column {}", e.line(), e.column()))
}

/// temp file (0600, O_EXCL) + fsync + rename + fsync of the directory.
fn write_state(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{:08x}",
        std::process::id(),
        rand::rng().random::<u32>()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    bytes.zeroize();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

// ---- reading other CLIs' files (`tokenfs import`) -------------------------

/// The file `tokenfs import --from FROM` reads when none is named.
pub fn default_import_path(from: &str) -> Result<PathBuf, String> {
    let env_dir = |var: &str, fallback: &str| match std::env::var_os(var) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => crate::config::expand_home(fallback),
    };
    match from {
        "claude" => Ok(env_dir("CLAUDE_CONFIG_DIR", "~/.claude").join(".credentials.json")),
        "codex" => Ok(env_dir("CODEX_HOME", "~/.codex").join("auth.json")),
        "hermes-codex" => Ok(env_dir("HERMES_HOME", "~/.hermes").join("auth.json")),
        other => Err(format!(
            "unknown --from `{other}` (expected claude, codex or hermes-codex)"
        )),
    }
}

/// Reads a session from a CLI's file: Claude's `.credentials.json`
/// (`claudeAiOauth.{accessToken,refreshToken}`), Codex's `auth.json`
/// (`tokens.*`) or Hermes' `auth.json` (`providers.openai-codex.tokens.*`).
/// Errors never quote values.
pub fn parse_session(from: &str, bytes: &[u8]) -> Result<ImportedSession, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("not JSON (line {} column {})", e.line(), e.column()))?;
    let (obj, path, keys): (Option<&serde_json::Value>, &str, [&str; 4]) = match from {
        "claude" => (
            v.get("claudeAiOauth"),
            "claudeAiOauth",
            ["refreshToken", "accessToken", "", ""],
        ),
        "codex" => (
            v.get("tokens"),
            "tokens",
            ["refresh_token", "access_token", "id_token", "account_id"],
        ),
        "hermes-codex" => (
            v.get("providers")
                .and_then(|p| p.get("openai-codex"))
                .and_then(|p| p.get("tokens")),
            "providers.openai-codex.tokens",
            ["refresh_token", "access_token", "id_token", "account_id"],
        ),
        other => {
            return Err(format!(
                "unknown --from `{other}` (expected claude, codex or hermes-codex)"
            ));
        }
    };
    let obj = obj.ok_or_else(|| format!("no `{path}` object"))?;
    let get = |k: &str| {
        (!k.is_empty())
            .then(|| obj.get(k).and_then(|x| x.as_str()))
            .flatten()
            .filter(|s| !s.trim().is_empty())
            .map(Secret::new)
    };
    let session = ImportedSession {
        refresh_token: get(keys[0]),
        access_token: get(keys[1]),
        id_token: get(keys[2]),
        account_id: get(keys[3]),
    };
    if session.refresh_token.is_none() {
        return Err(format!(
            "`{path}.{}` is missing or empty (a blanked session: log in with the CLI first)",
            keys[0]
        ));
    }
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |a, b| (a << 8) | *b as u32) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "{}.{}.sig",
            b64(br#"{"alg":"none"}"#),
            b64(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn base64url_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "hello world!?~"] {
            assert_eq!(base64url_decode(&b64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64url_decode("aGk=").unwrap(), b"hi");
        assert!(base64url_decode("a*b").is_none());
    }

    #[test]
    fn jwt_expiry_and_chatgpt_account_are_read_from_claims() {
        let t = jwt(serde_json::json!({"exp": 2_000_000_000u64,
            "https://api.openai.com/auth": {"chatgpt_account_id": "acct-123"}}));
        assert_eq!(
            jwt_exp(&t),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(account_id_from_id_token(&t).as_deref(), Some("acct-123"));
        let flat = jwt(serde_json::json!({"https://api.openai.com/auth.chatgpt_account_id": "a2"}));
        assert_eq!(account_id_from_id_token(&flat).as_deref(), Some("a2"));
        assert_eq!(jwt_exp("not-a-jwt"), None);
        assert_eq!(jwt_exp("a.!!.c"), None);
        assert_eq!(
            account_id_from_id_token(&jwt(serde_json::json!({"exp": 1}))),
            None
        );
    }

    #[test]
    fn refresh_is_at_half_life_and_never_later_than_refresh_before() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |life: u64, before: u64| {
            refresh_at(
                t0,
                Some(t0 + Duration::from_secs(life)),
                Duration::from_secs(before),
            )
            .duration_since(t0)
            .unwrap()
            .as_secs()
        };
        assert_eq!(at(8 * 3600, 900), 4 * 3600); // Anthropic: 8 h → at 4 h
        assert_eq!(at(1200, 900), 300); // 20 min → 15 min before expiry
        assert_eq!(at(600, 900), 300); // shorter than refresh_before → half
        assert_eq!(at(4, 1), 2);
        assert_eq!(
            refresh_at(t0, None, Duration::from_secs(900)),
            t0 + ASSUMED_LIFETIME / 2
        );
        // Never a busy loop on a zero lifetime.
        assert!(refresh_at(t0, Some(t0), Duration::ZERO) >= t0 + MIN_GAP);
    }

    #[test]
    fn error_codes_are_read_from_both_shapes() {
        let c = |v: serde_json::Value| error_code(&v);
        assert_eq!(
            c(serde_json::json!({"error": "invalid_grant"})).as_deref(),
            Some("invalid_grant")
        );
        assert_eq!(
            c(serde_json::json!({"error": {"code": "refresh_token_reused", "message": "x"}}))
                .as_deref(),
            Some("refresh_token_reused")
        );
        assert_eq!(c(serde_json::json!({"error": "has spaces in it"})), None);
        assert_eq!(c(serde_json::json!({})), None);
    }

    #[test]
    fn token_responses_parse_and_reject_garbage() {
        let g = parse_granted(Some(serde_json::json!({"access_token": "at-0123456789", "refresh_token": "rt-0123456789", "expires_in": 3600}))).unwrap();
        assert_eq!(g.expires_in, Some(Duration::from_secs(3600)));
        assert!(g.refresh_token.is_some());
        let g = parse_granted(Some(
            serde_json::json!({"access_token": "at-0123456789", "expires_in": "60"}),
        ))
        .unwrap();
        assert_eq!(g.expires_in, Some(Duration::from_secs(60)));
        assert!(g.refresh_token.is_none());
        assert!(parse_granted(Some(serde_json::json!({"access_token": ""}))).is_none());
        assert!(parse_granted(Some(serde_json::json!({"token": "x"}))).is_none());
        assert!(parse_granted(None).is_none());
    }

    #[test]
    fn form_bodies_are_percent_encoded() {
        assert_eq!(
            form_encode(&[
                ("grant_type", "refresh_token".into()),
                ("scope", "a b:c".into())
            ]),
            "grant_type=refresh_token&scope=a+b%3Ac"
        );
    }

    #[test]
    fn sessions_are_read_from_each_clis_file() {
        let claude = br#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-aaaaaaaaaaaa","refreshToken":"sk-ant-ort01-bbbbbbbbbbbb","expiresAt":1767225600000,"scopes":["user:inference"]}}"#;
        let s = parse_session("claude", claude).unwrap();
        assert_eq!(
            s.refresh_token.unwrap().expose_str(),
            "sk-ant-ort01-bbbbbbbbbbbb"
        );
        let codex = br#"{"auth_mode":"chatgpt","tokens":{"id_token":"i.d.t","access_token":"a.c.c","refresh_token":"rt_cccccccccccccccc","account_id":"acct"}}"#;
        let s = parse_session("codex", codex).unwrap();
        assert_eq!(s.account_id.unwrap().expose_str(), "acct");
        let hermes = br#"{"providers":{"openai-codex":{"tokens":{"access_token":"a","refresh_token":"rt_dddddddddddddddd"}}}}"#;
        assert!(parse_session("hermes-codex", hermes).is_ok());
        let blank = br#"{"claudeAiOauth":{"accessToken":"","refreshToken":"","expiresAt":0}}"#;
        let e = parse_session("claude", blank).err().unwrap();
        assert!(e.contains("blanked"), "{e}");
        assert!(parse_session("codex", claude).is_err());
        assert!(parse_session("gemini", claude).is_err());
        let e = parse_session("claude", b"{\"claudeAiOauth\": sk-ant-secret")
            .err()
            .unwrap();
        assert!(!e.contains("sk-ant"), "{e}");
    }

    #[test]
    fn the_state_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.oauth.json");
        let mut state = StateFile::default();
        state.version = 1;
        state.refresh_token = Some("rt-secret-value".into());
        state.spent = vec!["ab".into()];
        write_state(&path, &state).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let back = read_state(&path).unwrap().unwrap();
        assert_eq!(back.refresh_token.as_deref(), Some("rt-secret-value"));
        assert_eq!(back.spent, vec!["ab".to_string()]);
        // No temp files left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        std::fs::write(&path, "{ \"refresh_token\": rt-secret").unwrap();
        let e = read_state(&path).err().unwrap();
        assert!(!e.contains("rt-secret"), "{e}");
        assert!(read_state(&dir.path().join("none")).unwrap().is_none());
    }
}
