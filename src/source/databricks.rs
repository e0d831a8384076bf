//! `source = "databricks"`: tokenfs owns the workspace PAT and rotates it.
//!
//! One thread per credential mints a new token (`POST /api/2.0/token/create`,
//! authenticated with the current one), publishes it (one swap), and only
//! then revokes the previous one (`/api/2.0/token/delete`, after
//! `revoke_grace`). Rotation is driven by the clock, never by activity: an
//! idle container rotates as reliably as a busy one, so the token cannot
//! expire unnoticed. A failure keeps the last good token, retries with capped
//! exponential backoff and jitter (honouring `Retry-After`), and is logged
//! with status code and fingerprint. A token the workspace rejects, or one
//! that expired, puts the credential in `relogin_required` until a fresh PAT
//! arrives through `tokenfs set`.
//!
//! No FUSE request ever waits for this thread: adoption of a written value
//! is queued, and only the control socket waits for results.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde::Deserialize;
use tracing::{error, info, warn};

use super::flight::{Flight, next_command};
use crate::config::DatabricksConfig;
use crate::secret::Secret;
use crate::store::{HealthState, Store, Update};

/// The first retry waits this long; each failure doubles it.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// No retry waits longer than this (nor longer than a quarter of rotate_every).
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// How long `tokenfs rotate` / `tokenfs set` wait for the thread.
const CONTROL_WAIT: Duration = Duration::from_secs(120);

enum Command {
    Rotate(u64),
    /// A fresh PAT from `tokenfs set` (with a reply) or written by a CLI.
    Bootstrap(Secret, Option<Sender<Result<u64, String>>>),
}

/// The control side of a running source.
pub struct Handle {
    name: String,
    tx: Mutex<Sender<Command>>,
    flight: Arc<Flight>,
}

impl Handle {
    /// Mints now. Concurrent callers share one mint.
    pub fn rotate(&self) -> Result<u64, String> {
        let send = |id| {
            self.tx
                .lock()
                .send(Command::Rotate(id))
                .map_err(|_| self.gone())
        };
        self.flight
            .join(send, CONTROL_WAIT, "rotation")
            .map_err(|e| format!("credential `{}`: {e}", self.name))
    }

    /// `tokenfs set`: validates the PAT, then mints from it. Waits.
    pub fn bootstrap(&self, secret: Secret) -> Result<u64, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .lock()
            .send(Command::Bootstrap(secret, Some(tx)))
            .map_err(|_| self.gone())?;
        rx.recv_timeout(CONTROL_WAIT)
            .map_err(|_| format!("credential `{}`: no answer from its source", self.name))?
    }

    /// A value a CLI wrote into a managed file: validated on the source
    /// thread before it replaces anything. Never blocks.
    pub fn offer(&self, secret: Secret) -> Result<(), String> {
        self.tx
            .lock()
            .send(Command::Bootstrap(secret, None))
            .map_err(|_| self.gone())
    }

    fn gone(&self) -> String {
        format!("credential `{}`: its source thread has stopped", self.name)
    }
}

/// Starts the source thread; it bootstraps from `initial_env` if set.
pub fn start(name: &str, cfg: &DatabricksConfig, store: Arc<Store>) -> Result<Handle, String> {
    crate::tls::install_provider();
    let client = Client::builder()
        .connect_timeout(cfg.timeout)
        .timeout(cfg.timeout)
        .user_agent(concat!("tokenfs/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("credential `{name}`: HTTP client: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let flight = Arc::new(Flight::default());
    let source = Source {
        name: name.to_owned(),
        comment: cfg.comment.clone().unwrap_or_else(default_comment),
        cfg: cfg.clone(),
        store,
        client,
        flight: flight.clone(),
        current: None,
        revokes: Vec::new(),
        failures: 0,
        next_attempt: None,
        pending: None,
    };
    let initial = cfg
        .initial_env
        .as_ref()
        .and_then(|v| std::env::var(v).ok())
        .filter(|v| !v.trim().is_empty());
    if let Some(v) = initial {
        let _ = tx.send(Command::Bootstrap(Secret::new(v), None));
    } else {
        info!(
            credential = name,
            "no bootstrap token yet: waiting for `tokenfs set {name}`"
        );
    }
    std::thread::Builder::new()
        .name(format!("source-databricks-{name}"))
        .spawn(move || source.run(rx))
        .map_err(|e| format!("credential `{name}`: cannot start its thread: {e}"))?;
    Ok(Handle {
        name: name.to_owned(),
        tx: Mutex::new(tx),
        flight,
    })
}

struct Current {
    token: Secret,
    /// Unknown for a bootstrap token (the API cannot look it up by value).
    token_id: Option<String>,
    expires_at: Option<SystemTime>,
    minted_at: SystemTime,
}

struct Source {
    name: String,
    /// On every token we mint: how `cleanup_orphans` knows ours.
    comment: String,
    cfg: DatabricksConfig,
    store: Arc<Store>,
    client: Client,
    flight: Arc<Flight>,
    current: Option<Current>,
    /// Previous tokens to revoke, each at its time.
    revokes: Vec<(String, SystemTime, u32)>,
    failures: u32,
    next_attempt: Option<SystemTime>,
    /// A token written by a CLI whose validation failed for a transient
    /// reason: tried again with backoff, never adopted unvalidated.
    pending: Option<Pending>,
}

/// `tokenfs-rotated:HOSTNAME`: one container's tokens told from another's.
fn default_comment() -> String {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    format!("tokenfs-rotated:{hostname}")
}

struct Pending {
    token: Secret,
    tries: u32,
    at: SystemTime,
}

/// How many times a written token's validation is retried.
const PENDING_TRIES: u32 = 5;

/// Why an API call failed, and what that means for retrying.
enum Failure {
    /// 401/403: this token is no good; only a new PAT helps.
    Rejected(String),
    /// Network, timeout, 5xx, 429: try again later (after at least `Some`).
    Transient(String, Option<Duration>),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Rejected(m) | Failure::Transient(m, _) => m,
        }
    }
}

#[derive(Deserialize)]
struct Created {
    token_value: String,
    token_info: TokenInfo,
}

#[derive(Deserialize)]
struct TokenInfo {
    token_id: String,
    #[serde(default)]
    expiry_time: Option<i64>,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize)]
struct Listed {
    #[serde(default)]
    token_infos: Vec<TokenInfo>,
}

fn ms_to_time(ms: i64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms as u64))
}

impl Source {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            let Ok(cmd) = next_command(&rx, self.next_deadline()) else {
                return;
            };
            match cmd {
                Some(Command::Rotate(id)) => {
                    let result = self.rotate("requested");
                    self.finish_flight(id, result);
                }
                Some(Command::Bootstrap(secret, reply)) => {
                    // A human (`tokenfs set`) sees a failure and retries;
                    // a value a CLI wrote is retried here.
                    let tries = if reply.is_some() { PENDING_TRIES } else { 0 };
                    self.pending = None; // the newest value wins
                    let result = self.bootstrap(secret, tries);
                    if let Some(reply) = reply {
                        let _ = reply.send(result);
                    }
                }
                None => self.on_timer(),
            }
        }
    }

    fn finish_flight(&self, id: u64, result: Result<u64, String>) {
        self.flight.finish(id, result);
    }

    /// The earliest of the next rotation and the next revocation.
    fn next_deadline(&self) -> Option<SystemTime> {
        let revoke = self
            .revokes
            .iter()
            .map(|r| r.1)
            .chain(self.pending.as_ref().map(|p| p.at))
            .min();
        match (self.next_attempt, revoke) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_timer(&mut self) {
        let now = SystemTime::now();
        if let Some(p) = self.pending.take_if(|p| p.at <= now) {
            let _ = self.bootstrap(p.token, p.tries);
        }
        if self.next_attempt.is_some_and(|t| t <= now) {
            let _ = self.rotate("scheduled");
        }
        self.revoke_due();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.host)
    }

    fn check(&self, resp: reqwest::Result<Response>, what: &str) -> Result<Response, Failure> {
        let resp = resp.map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                "failed"
            };
            Failure::Transient(format!("{what}: {kind} ({})", e.without_url()), None)
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The error body names the error code; it never echoes a token.
        let code = resp
            .json::<serde_json::Value>()
            .ok()
            .and_then(|v| {
                v.get("error_code")
                    .and_then(|c| c.as_str())
                    .map(String::from)
            })
            .map(|c| format!(" {c}"))
            .unwrap_or_default();
        let msg = format!("{what}: HTTP {}{code}", status.as_u16());
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Failure::Rejected(msg),
            _ => Failure::Transient(msg, retry_after),
        })
    }

    fn validate(&self, token: &Secret) -> Result<(), Failure> {
        let resp = self
            .client
            .get(self.url("/api/2.0/preview/scim/v2/Me"))
            .bearer_auth(token.expose_str())
            .send();
        self.check(resp, "validating the token").map(drop)
    }

    fn mint(&self, with: &Secret) -> Result<Current, Failure> {
        let body = serde_json::json!({
            "lifetime_seconds": self.cfg.lifetime.as_secs(),
            "comment": self.comment,
        });
        let resp = self
            .client
            .post(self.url("/api/2.0/token/create"))
            .bearer_auth(with.expose_str())
            .json(&body)
            .send();
        let resp = self.check(resp, "minting a token")?;
        let created: Created = resp
            .json()
            .map_err(|_| Failure::Transient("minting a token: malformed response".into(), None))?;
        let now = SystemTime::now();
        let expires_at = created
            .token_info
            .expiry_time
            .and_then(ms_to_time)
            .or(Some(now + self.cfg.lifetime));
        Ok(Current {
            token: Secret::new(created.token_value),
            token_id: Some(created.token_info.token_id),
            expires_at,
            minted_at: now,
        })
    }

    fn revoke(&self, token_id: &str, with: &Secret) -> Result<(), Failure> {
        let resp = self
            .client
            .post(self.url("/api/2.0/token/delete"))
            .bearer_auth(with.expose_str())
            .json(&serde_json::json!({ "token_id": token_id }))
            .send();
        match self.check(resp, "revoking the previous token") {
            Ok(_) => Ok(()),
            // Already gone (expired or deleted elsewhere): nothing to do.
            Err(Failure::Transient(m, _))
                if m.contains("HTTP 404") || m.contains("RESOURCE_DOES_NOT_EXIST") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A fresh PAT: validate it, adopt it, and mint our own token from it.
    /// `tries`: how often this token's validation already failed for a
    /// transient reason (`PENDING_TRIES` means: do not retry).
    fn bootstrap(&mut self, token: Secret, tries: u32) -> Result<u64, String> {
        let fp = token.fingerprint();
        if let Err(f) = crate::source::plausible(&token, 1) {
            return Err(self.fail_loud(format!("bootstrap token {fp} rejected: {f}")));
        }
        match self.validate(&token) {
            Ok(()) => info!(credential = %self.name, fingerprint = %fp, "bootstrap token is valid"),
            Err(Failure::Rejected(m)) => {
                let msg = format!(
                    "bootstrap token {fp} rejected by the workspace ({m}); the current token is kept"
                );
                warn!(credential = %self.name, "{msg}");
                self.store
                    .record_error(&self.name, self.state_after_reject(), msg.clone());
                return Err(msg);
            }
            Err(Failure::Transient(m, _)) if self.current.is_some() => {
                let retry = tries + 1 < PENDING_TRIES;
                let msg = format!(
                    "cannot validate bootstrap token {fp} ({m}); the current token is kept{}",
                    if retry { ", will try again" } else { "" }
                );
                warn!(credential = %self.name, "{msg}");
                self.store
                    .record_error(&self.name, HealthState::Degraded, msg.clone());
                if retry {
                    let at = SystemTime::now() + self.backoff(tries + 1, None);
                    self.pending = Some(Pending {
                        token,
                        tries: tries + 1,
                        at,
                    });
                }
                return Err(msg);
            }
            Err(Failure::Transient(m, _)) => {
                warn!(credential = %self.name, fingerprint = %fp, "cannot validate the bootstrap token ({m}); serving it until a mint succeeds");
            }
        }
        let previous = self.current.replace(Current {
            token,
            token_id: None,
            expires_at: None,
            minted_at: SystemTime::now(),
        });
        self.retire(previous);
        self.publish();
        self.failures = 0;
        self.rotate("bootstrap")
    }

    fn state_after_reject(&self) -> HealthState {
        if self.current.is_some() {
            HealthState::Degraded
        } else {
            HealthState::ReloginRequired
        }
    }

    /// Mints, publishes, and schedules the revocation of the previous token.
    fn rotate(&mut self, why: &str) -> Result<u64, String> {
        let Some(cur) = &self.current else {
            return Err(format!(
                "credential `{}` has no token yet: `tokenfs set {}` with a PAT",
                self.name, self.name
            ));
        };
        match self.mint(&cur.token) {
            Ok(next) => {
                info!(credential = %self.name, fingerprint = %next.token, why, lifetime = %humantime::format_duration(self.cfg.lifetime), "minted a new token");
                let previous = self.current.replace(next);
                let generation = self.publish();
                self.retire(previous);
                self.revoke_due();
                if why == "bootstrap" && self.cfg.cleanup_orphans {
                    self.cleanup_orphans();
                }
                self.failures = 0;
                self.schedule_next();
                Ok(generation)
            }
            Err(f) => Err(self.mint_failed(f)),
        }
    }

    fn publish(&mut self) -> u64 {
        let Some(cur) = &self.current else {
            return self.store.snapshot().generation;
        };
        let update = Update {
            fields: vec![(crate::store::Field::Token, cur.token.clone())],
            expires_at: cur.expires_at,
        };
        // A refusal (a managed file cannot carry the token) is logged and
        // recorded by the store; the previous token keeps being served.
        let generation = match self.store.publish(&self.name, update) {
            Ok(Some(g)) => g,
            Ok(None) | Err(_) => self.store.snapshot().generation,
        };
        self.store.update_health(&self.name, |h| {
            h.state = HealthState::Ok;
            h.last_success = Some(SystemTime::now());
        });
        generation
    }

    /// Queues the revocation of a replaced token, after the grace period.
    fn retire(&mut self, previous: Option<Current>) {
        // A bootstrap token has no known id: the API cannot look it up.
        if let Some(id) = previous.and_then(|p| p.token_id) {
            self.revokes
                .push((id, SystemTime::now() + self.cfg.revoke_grace, 0));
        }
    }

    fn revoke_due(&mut self) {
        let now = SystemTime::now();
        let Some(with) = self.current.as_ref().map(|c| c.token.clone()) else {
            return;
        };
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.revokes)
            .into_iter()
            .partition(|r| r.1 <= now);
        self.revokes = later;
        for (id, _, tries) in due {
            match self.revoke(&id, &with) {
                Ok(()) => {
                    info!(credential = %self.name, token_id = %id, "revoked the previous token")
                }
                Err(f) if tries < 5 => {
                    warn!(credential = %self.name, token_id = %id, "{}; will retry", f.message());
                    self.revokes
                        .push((id, now + self.backoff(tries + 1, None), tries + 1));
                }
                Err(f) => {
                    let msg = format!(
                        "{} (token id {id}); gave up, it expires by itself",
                        f.message()
                    );
                    error!(credential = %self.name, "{msg}");
                    self.store
                        .record_error(&self.name, HealthState::Degraded, msg);
                }
            }
        }
    }

    fn cleanup_orphans(&mut self) {
        let Some(cur) = &self.current else { return };
        let resp = self
            .client
            .get(self.url("/api/2.0/token/list"))
            .bearer_auth(cur.token.expose_str())
            .send();
        let listed = match self.check(resp, "listing tokens").and_then(|r| {
            r.json::<Listed>()
                .map_err(|_| Failure::Transient("listing tokens: malformed response".into(), None))
        }) {
            Ok(l) => l,
            Err(f) => {
                return warn!(credential = %self.name, "cleanup of orphaned tokens skipped: {}", f.message());
            }
        };
        let ours = cur.token_id.clone();
        for t in listed.token_infos {
            if t.comment.as_deref() == Some(self.comment.as_str())
                && Some(&t.token_id) != ours.as_ref()
            {
                info!(credential = %self.name, token_id = %t.token_id, "revoking a token an earlier run left behind");
                self.revokes.push((t.token_id, SystemTime::now(), 0));
            }
        }
        self.revoke_due();
    }

    /// Next rotation: `rotate_every` after this mint, and in any case one
    /// retry window before expiry.
    fn schedule_next(&mut self) {
        let Some(cur) = &self.current else { return };
        let mut at = cur.minted_at + self.cfg.rotate_every;
        if let Some(exp) = cur.expires_at {
            at = at.min(exp.checked_sub(self.retry_window()).unwrap_or(exp));
        }
        self.set_next(Some(at));
    }

    fn retry_window(&self) -> Duration {
        (self.cfg.lifetime - self.cfg.rotate_every) / 2
    }

    fn set_next(&mut self, at: Option<SystemTime>) {
        self.next_attempt = at;
        self.store
            .update_health(&self.name, |h| h.next_attempt = at);
    }

    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let cap = BACKOFF_CAP
            .min(self.cfg.rotate_every / 4)
            .max(Duration::from_millis(100));
        let exp = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(16))
            .min(cap);
        // ±20% jitter, so many containers do not retry in lockstep.
        let jittered = exp.mul_f64(rand::rng().random_range(0.8..1.2));
        retry_after.map_or(jittered, |r| r.max(jittered))
    }

    fn mint_failed(&mut self, f: Failure) -> String {
        self.failures += 1;
        let fp = self
            .current
            .as_ref()
            .map(|c| c.token.fingerprint())
            .unwrap_or_default();
        let expired = self
            .current
            .as_ref()
            .and_then(|c| c.expires_at)
            .is_some_and(|e| e <= SystemTime::now());
        match f {
            Failure::Rejected(m) => {
                let msg = format!(
                    "{m} with token {fp}: relogin required (`tokenfs set {}` with a fresh PAT)",
                    self.name
                );
                self.set_next(None);
                self.fail_loud(msg)
            }
            Failure::Transient(m, _) if expired => {
                let msg = format!(
                    "{m}; token {fp} has expired: relogin required (`tokenfs set {}` with a fresh PAT)",
                    self.name
                );
                self.set_next(None);
                self.fail_loud(msg)
            }
            Failure::Transient(m, retry_after) => {
                let wait = self.backoff(self.failures, retry_after);
                let msg = format!(
                    "{m} (attempt {}, token {fp} still served; retrying in {})",
                    self.failures,
                    humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
                );
                warn!(credential = %self.name, "{msg}");
                self.store
                    .record_error(&self.name, HealthState::Degraded, msg.clone());
                self.set_next(Some(SystemTime::now() + wait));
                msg
            }
        }
    }

    /// Records a failure only a human can fix.
    fn fail_loud(&self, msg: String) -> String {
        error!(credential = %self.name, "{msg}");
        self.store
            .record_error(&self.name, HealthState::ReloginRequired, msg.clone());
        msg
    }
}
