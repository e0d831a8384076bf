//! The credential store: one immutable [`Snapshot`] behind an atomic pointer.
//!
//! Every reader (each `open()` of a managed file) loads the current
//! `Arc<Snapshot>` without taking a lock, so a rotation can never be seen half
//! done: a publish builds the next snapshot aside and swaps one pointer.
//! Publishers are serialised by a mutex so generations are strictly ordered.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::secret::Secret;

/// How many earlier values of each slot are remembered, so that a CLI writing
/// back a file it read a few rotations ago is recognised as writing *our*
/// token rather than a new one.
const RECENT_PER_SLOT: usize = 8;

/// A named secret field of a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Token,
    AccessToken,
    RefreshToken,
    IdToken,
    /// The account an OAuth session belongs to (Codex's `tokens.account_id`).
    AccountId,
    /// A daemon-owned value, not a secret: a proxy's base URL.
    Url,
    /// When an OAuth session's access token expires, in ms since the epoch
    /// (Claude's `expiresAt`).
    ExpiresAtMs,
    /// When tokenfs last refreshed an OAuth session, RFC 3339 (Codex's
    /// `last_refresh`).
    LastRefresh,
}

impl Field {
    pub const ALL: [Field; 8] = [
        Field::Token,
        Field::AccessToken,
        Field::RefreshToken,
        Field::IdToken,
        Field::AccountId,
        Field::Url,
        Field::ExpiresAtMs,
        Field::LastRefresh,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Field::Token => "token",
            Field::AccessToken => "access_token",
            Field::RefreshToken => "refresh_token",
            Field::IdToken => "id_token",
            Field::AccountId => "account_id",
            Field::Url => "url",
            Field::ExpiresAtMs => "expires_at_ms",
            Field::LastRefresh => "last_refresh",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Field {
    type Err = String;
    fn from_str(s: &str) -> Result<Field, String> {
        Field::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown field `{s}` (expected token, access_token, refresh_token, id_token, account_id, url, expires_at_ms or last_refresh)"
                )
            })
    }
}

/// A reference to one secret: `credential.field`, the name render uses for a
/// placeholder slot.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotRef {
    pub credential: String,
    pub field: Field,
}

impl SlotRef {
    /// Parses `name.field`, or a bare `name` meaning `name.token`.
    pub fn parse(s: &str) -> Result<SlotRef, String> {
        let (credential, field) = match s.rsplit_once('.') {
            Some((name, field)) => (name, field.parse()?),
            None => (s, Field::Token),
        };
        if credential.is_empty() {
            return Err(format!("`{s}` names no credential"));
        }
        Ok(SlotRef {
            credential: credential.to_owned(),
            field,
        })
    }
}

impl fmt::Display for SlotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.credential, self.field)
    }
}

/// One credential's secret fields at one generation.
#[derive(Clone, Debug, Default)]
pub struct Credential {
    pub fields: BTreeMap<Field, Secret>,
    /// When any field last changed.
    pub updated_at: Option<SystemTime>,
    /// When the token stops working, if the source knows.
    pub expires_at: Option<SystemTime>,
}

impl Credential {
    /// Applies an update: the fields it replaced (with their previous
    /// values), or `None` when nothing changed.
    fn apply(&mut self, update: Update) -> Option<Vec<(Field, Secret)>> {
        let mut changed = false;
        let mut replaced = Vec::new();
        for (field, secret) in update.fields {
            if self.fields.get(&field) == Some(&secret) {
                continue;
            }
            if let Some(previous) = self.fields.insert(field, secret) {
                replaced.push((field, previous));
            }
            changed = true;
        }
        if update.expires_at.is_some() && update.expires_at != self.expires_at {
            self.expires_at = update.expires_at;
            changed = true;
        }
        changed.then_some(replaced)
    }
}

/// An immutable view of every credential. Cheap to clone (`Arc`).
#[derive(Debug)]
pub struct Snapshot {
    /// Strictly increasing; 0 is the empty snapshot before anything was published.
    pub generation: u64,
    /// Strictly increasing with `generation` (at least 1 ns apart), so file
    /// `mtime`s derived from it always advance.
    pub published_at: SystemTime,
    pub credentials: BTreeMap<String, Arc<Credential>>,
}

impl Snapshot {
    pub fn get(&self, slot: &SlotRef) -> Option<&Secret> {
        self.credentials
            .get(&slot.credential)?
            .fields
            .get(&slot.field)
    }

    /// Looks up a slot by its textual name (`databricks.token`).
    pub fn get_str(&self, slot: &str) -> Option<&Secret> {
        let (name, field) = slot.rsplit_once('.')?;
        let field: Field = field.parse().ok()?;
        self.credentials.get(name)?.fields.get(&field)
    }
}

/// A change to one credential: the given fields replace the current ones.
#[derive(Debug, Default)]
pub struct Update {
    pub fields: Vec<(Field, Secret)>,
    pub expires_at: Option<SystemTime>,
}

impl Update {
    pub fn token(secret: Secret) -> Update {
        Update {
            fields: vec![(Field::Token, secret)],
            expires_at: None,
        }
    }
}

/// What a source reports about itself, for `tokenfs status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Health {
    pub source: String,
    pub state: HealthState,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub next_attempt: Option<SystemTime>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No value yet.
    #[default]
    Waiting,
    Ok,
    /// The last attempt failed; the last good value is still served.
    Degraded,
    /// Only a human can fix this (e.g. the token expired): `tokenfs set NAME`.
    ReloginRequired,
}

/// The store shared by sources (writers), the filesystem and control (readers).
pub struct Store {
    current: ArcSwap<Snapshot>,
    publish: Mutex<Recent>,
    published: Condvar,
    health: Mutex<BTreeMap<String, Health>>,
    /// Run after every publish, on the publishing thread, before `publish`
    /// returns: a rotation is done only once every consumer has seen it.
    hooks: RwLock<Vec<Box<dyn Fn() + Send + Sync>>>,
    /// Asked before every publish: a consumer that cannot carry a new value
    /// (a managed file whose format cannot hold it) refuses it, and nothing
    /// changes.
    validators: RwLock<Vec<Validator>>,
}

/// Checks a credential's next value; `Err` says why it cannot be served
/// (no secret in it).
pub type Validator = Box<dyn Fn(&str, &Credential) -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct Recent {
    by_slot: HashMap<SlotRef, VecDeque<Secret>>,
}

impl Recent {
    /// Keeps replaced values, newest first, so a program writing back a
    /// copy it read a moment ago is seen to carry *our* token.
    fn remember(&mut self, name: &str, replaced: Vec<(Field, Secret)>) {
        for (field, previous) in replaced {
            let slot = SlotRef {
                credential: name.to_owned(),
                field,
            };
            let ring = self.by_slot.entry(slot).or_default();
            ring.retain(|s| s != &previous);
            ring.push_front(previous);
            ring.truncate(RECENT_PER_SLOT);
        }
    }
}

impl Store {
    /// A store knowing these credential names (with their source kinds), all
    /// without values yet.
    pub fn new<'a>(credentials: impl IntoIterator<Item = (&'a str, &'a str)>) -> Store {
        let mut health = BTreeMap::new();
        for (name, source) in credentials {
            health.insert(
                name.to_owned(),
                Health {
                    source: source.to_owned(),
                    ..Health::default()
                },
            );
        }
        Store {
            current: ArcSwap::from_pointee(Snapshot {
                generation: 0,
                published_at: SystemTime::now(),
                credentials: BTreeMap::new(),
            }),
            publish: Mutex::new(Recent::default()),
            published: Condvar::new(),
            health: Mutex::new(health),
            hooks: RwLock::new(Vec::new()),
            validators: RwLock::new(Vec::new()),
        }
    }

    /// Registers `hook` to run after each publish (see `hooks`).
    pub fn on_publish(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks.write().push(Box::new(hook));
    }

    /// Registers a check every new value must pass before it is published.
    pub fn on_validate(
        &self,
        check: impl Fn(&str, &Credential) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.validators.write().push(Box::new(check));
    }

    /// The current snapshot. Lock-free; never blocks a publisher.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn knows(&self, name: &str) -> bool {
        self.health.lock().contains_key(name)
    }

    /// Publishes new field values for `name` as one new generation. Returns
    /// the generation, or `None` when nothing changed (same values again);
    /// `Err` when a consumer cannot carry the value (see `on_validate`),
    /// which is also recorded in the credential's health.
    pub fn publish(&self, name: &str, update: Update) -> Result<Option<u64>, String> {
        let mut recent = self.publish.lock();
        let old = self.current.load_full();
        let mut cred = old
            .credentials
            .get(name)
            .map(|c| Credential::clone(c))
            .unwrap_or_default();
        let Some(replaced) = cred.apply(update) else {
            return Ok(None);
        };
        if let Err(why) = self
            .validators
            .read()
            .iter()
            .try_for_each(|v| v(name, &cred))
        {
            drop(recent);
            tracing::error!(credential = name, "new value refused: {why}");
            self.record_error(
                name,
                HealthState::Degraded,
                format!("new value refused, the previous one is still served: {why}"),
            );
            return Err(why);
        }
        recent.remember(name, replaced);
        let now = SystemTime::now();
        cred.updated_at = Some(now);
        let mut credentials = old.credentials.clone();
        credentials.insert(name.to_owned(), Arc::new(cred));
        let next = Snapshot {
            generation: old.generation + 1,
            published_at: now.max(old.published_at + Duration::from_nanos(1)),
            credentials,
        };
        let generation = next.generation;
        self.current.store(Arc::new(next));
        drop(recent);
        for hook in self.hooks.read().iter() {
            hook();
        }
        self.published.notify_all();
        self.record_success(name);
        Ok(Some(generation))
    }

    /// Every value (current, then recent) `slots` have had, keyed by slot:
    /// a file carrying one of them carries *our* token, not a new one.
    pub fn known<'a>(
        &self,
        snap: &Snapshot,
        slots: impl IntoIterator<Item = &'a SlotRef>,
    ) -> Vec<(String, Secret)> {
        let mut known = Vec::new();
        for slot in slots {
            let key = slot.to_string();
            known.extend(snap.get(slot).cloned().map(|s| (key.clone(), s)));
            known.extend(self.recent(slot).into_iter().map(|s| (key.clone(), s)));
        }
        known
    }

    /// Earlier values of a slot, newest first (not including the current one).
    pub fn recent(&self, slot: &SlotRef) -> Vec<Secret> {
        self.publish
            .lock()
            .by_slot
            .get(slot)
            .map(|ring| ring.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Blocks until the generation is above `generation` or `timeout` passes.
    pub fn wait_past(&self, generation: u64, timeout: Duration) -> Arc<Snapshot> {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self.publish.lock();
        loop {
            let snap = self.current.load_full();
            if snap.generation > generation {
                return snap;
            }
            if self.published.wait_until(&mut guard, deadline).timed_out() {
                return self.current.load_full();
            }
        }
    }

    pub fn health(&self) -> BTreeMap<String, Health> {
        self.health.lock().clone()
    }

    /// Updates a credential's health record in place.
    pub fn update_health(&self, name: &str, f: impl FnOnce(&mut Health)) {
        if let Some(h) = self.health.lock().get_mut(name) {
            f(h);
        }
    }

    pub fn record_success(&self, name: &str) {
        self.update_health(name, |h| {
            h.state = HealthState::Ok;
            h.last_success = Some(SystemTime::now());
        });
    }

    /// Records a failure. `message` must not contain secrets (use fingerprints).
    pub fn record_error(&self, name: &str, state: HealthState, message: String) {
        self.update_health(name, |h| {
            h.state = state;
            h.last_error = Some(message);
            h.last_error_at = Some(SystemTime::now());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new([("db", "push")])
    }

    #[test]
    fn publish_swaps_one_generation_and_remembers_the_previous_value() {
        let s = store();
        assert_eq!(s.snapshot().generation, 0);
        assert_eq!(
            s.publish("db", Update::token(Secret::new("one"))),
            Ok(Some(1))
        );
        let first = s.snapshot();
        assert_eq!(
            s.publish("db", Update::token(Secret::new("two"))),
            Ok(Some(2))
        );
        let slot = SlotRef::parse("db.token").unwrap();
        assert_eq!(first.get(&slot).map(|s| s.expose_str()), Some("one"));
        assert_eq!(
            s.snapshot().get_str("db.token").map(|s| s.expose_str()),
            Some("two")
        );
        assert_eq!(s.recent(&slot), vec![Secret::new("one")]);
        assert!(s.snapshot().published_at > first.published_at);
    }

    #[test]
    fn publishing_the_same_value_is_not_a_new_generation() {
        let s = store();
        s.publish("db", Update::token(Secret::new("one"))).unwrap();
        assert_eq!(s.publish("db", Update::token(Secret::new("one"))), Ok(None));
        assert_eq!(s.snapshot().generation, 1);
    }

    #[test]
    fn slot_refs_parse() {
        assert_eq!(SlotRef::parse("db").unwrap().to_string(), "db.token");
        assert_eq!(
            SlotRef::parse("a.b.refresh_token").unwrap().credential,
            "a.b"
        );
        assert!(SlotRef::parse("db.password").is_err());
        for f in Field::ALL {
            assert_eq!(f.as_str().parse::<Field>(), Ok(f));
        }
        assert_eq!(
            SlotRef::parse("o.account_id").unwrap().field,
            Field::AccountId
        );
        assert!(SlotRef::parse(".token").is_err());
    }

    #[test]
    fn wait_past_wakes_on_publish() {
        let s = Arc::new(store());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_past(0, Duration::from_secs(10)).generation);
        std::thread::sleep(Duration::from_millis(20));
        s.publish("db", Update::token(Secret::new("x"))).unwrap();
        assert_eq!(t.join().unwrap(), 1);
    }

    #[test]
    fn a_refused_value_changes_nothing() {
        let s = store();
        s.on_validate(|_, c| match c.fields.get(&Field::Token) {
            Some(v) if v.expose_str().contains('\n') => Err("no line breaks".into()),
            _ => Ok(()),
        });
        s.publish("db", Update::token(Secret::new("one"))).unwrap();
        let refused = s.publish("db", Update::token(Secret::new("a\nb")));
        assert_eq!(refused, Err("no line breaks".to_string()));
        assert_eq!(s.snapshot().generation, 1);
        assert_eq!(
            s.snapshot().get_str("db.token").map(|v| v.expose_str()),
            Some("one")
        );
        assert!(s.recent(&SlotRef::parse("db.token").unwrap()).is_empty());
        let h = s.health();
        assert!(
            h["db"]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("no line breaks"))
        );
    }
}
