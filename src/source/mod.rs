//! Credential sources: where values come from, and who decides whether a
//! value a program wrote into a managed file is adopted.
//!
//! Sources know nothing about files or FUSE: they publish into the
//! [`Store`](crate::store::Store) and answer [`Adopt::offer`].

pub mod databricks;
pub mod file;
mod flight;
pub mod oauth;

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{Config, SourceConfig};
use crate::secret::Secret;
use crate::store::{Field, SlotRef, Store, Update};

/// Receives values that programs wrote at bound keys of managed files.
pub trait Adopt: Send + Sync {
    /// Offers `value` for `slot`. Must not block on the network (it runs on
    /// a FUSE thread): a source that validates remotely queues the value and
    /// answers `Ok` once queued. `origin` names the file, for logs.
    fn offer(&self, slot: &SlotRef, value: Secret, origin: &str) -> Result<(), String>;

    /// Whether `value` could be a token of `slot`'s credential at all (see
    /// [`plausible`]); `offer` asks this first.
    fn plausible(&self, slot: &SlotRef, value: &Secret) -> Result<(), String>;

    /// A program's write left `slot`'s bound key empty or removed it (a
    /// consumer wiping its session after its own refresh failed). Must not
    /// block. The key shows the credential again either way.
    fn blanked(&self, _slot: &SlotRef, _origin: &str) {}

    /// Whose value a program writes at `slot`: the slot itself, except
    /// where a file shows a proxy's local key (`proxy.NAME.token`) — a real
    /// token written there is the proxy's credential's.
    fn target(&self, slot: &SlotRef) -> SlotRef {
        slot.clone()
    }

    /// Whether `slot`'s source validates a value before adopting it (an
    /// OAuth source refreshes or probes with it). A consumer's file then
    /// holding a different session at mount is the normal case (its own
    /// older copy, or a fresh login), not two keys in conflict: the value
    /// is offered, and the credential's session stays unless the offered
    /// one proves newer and valid.
    fn validates(&self, _slot: &SlotRef) -> bool {
        false
    }
}

/// Every configured credential's source.
pub struct Sources {
    store: Arc<Store>,
    kinds: BTreeMap<String, SourceConfig>,
    /// Per credential: the shortest value adopted from a file.
    min_length: BTreeMap<String, usize>,
    databricks: BTreeMap<String, databricks::Handle>,
    oauth: BTreeMap<String, oauth::Handle>,
    /// `proxy.NAME` → the slot that proxy injects (see `Adopt::target`).
    proxies: BTreeMap<String, SlotRef>,
}

/// The shortest value a program may write at a bound key and have adopted
/// as a token, unless a credential sets its own `min_length`: real API
/// keys are far longer, and `none`, `x`, `test` or `123` are someone's
/// placeholder, not a key.
pub const DEFAULT_MIN_LENGTH: usize = 16;

/// Rejects values that cannot be a token: a config line pasted by mistake
/// (`api_key: x`), control characters, whitespace inside, a placeholder,
/// anything shorter than `min_length`.
pub fn plausible(value: &Secret, min_length: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("empty value".into());
    }
    let text = value.expose_str();
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "value {value} contains whitespace or control characters"
        ));
    }
    if text.contains("__tokenfs:") {
        return Err(format!("value {value} is a tokenfs placeholder"));
    }
    let chars = text.chars().count();
    if chars < min_length {
        return Err(format!(
            "value {value} has {chars} characters, fewer than a token's minimum of {min_length} (min_length)"
        ));
    }
    Ok(())
}

impl Sources {
    /// Starts every source: seeds push credentials from their `initial_env`
    /// and starts a watcher thread per `file` credential.
    pub fn start(config: &Config, store: Arc<Store>) -> Result<Arc<Sources>, String> {
        let mut sources = Sources {
            store: store.clone(),
            kinds: config.credentials.clone(),
            min_length: config.min_length.clone(),
            databricks: BTreeMap::new(),
            oauth: BTreeMap::new(),
            proxies: config
                .proxies
                .iter()
                .map(|p| (format!("proxy.{}", p.name), p.slot.clone()))
                .collect(),
        };
        for (name, kind) in &config.credentials {
            match kind {
                SourceConfig::Push {
                    initial_env: Some(var),
                } => sources.seed_from_env(name, var),
                SourceConfig::Push { initial_env: None } => {}
                SourceConfig::File { path } => file::start(name, path, store.clone())?,
                SourceConfig::Databricks(cfg) => {
                    let handle = databricks::start(name, cfg, store.clone())?;
                    sources.databricks.insert(name.clone(), handle);
                }
                SourceConfig::OAuth(cfg) => {
                    let handle = oauth::start(name, cfg, store.clone())?;
                    sources.oauth.insert(name.clone(), handle);
                }
            }
        }
        Ok(Arc::new(sources))
    }

    fn seed_from_env(&self, name: &str, var: &str) {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => {
                let secret = Secret::new(v);
                info!(credential = name, fingerprint = %secret, "initial value from ${var}");
                if let Err(why) = self.store.publish(name, Update::token(secret)) {
                    warn!(
                        credential = name,
                        "the value of ${var} cannot be served: {why}"
                    );
                }
            }
            _ => info!(
                credential = name,
                "${var} is not set; waiting for `tokenfs set {name}`"
            ),
        }
    }

    pub fn kind(&self, name: &str) -> Option<&SourceConfig> {
        self.kinds.get(name)
    }

    /// `tokenfs set NAME`: a human (or a rotator) pushes a value.
    pub fn set(&self, name: &str, field: Field, value: Secret) -> Result<u64, String> {
        let kind = self
            .kinds
            .get(name)
            .ok_or_else(|| format!("no credential named `{name}`"))?;
        match kind {
            SourceConfig::Push { .. } => {}
            SourceConfig::File { path } => {
                return Err(format!(
                    "credential `{name}` follows {}; write that file instead",
                    path.display()
                ));
            }
            SourceConfig::Databricks(_) => {
                if field != Field::Token {
                    return Err(format!("credential `{name}` has only a token"));
                }
                let source = self.databricks.get(name).ok_or("no such source")?;
                return source.bootstrap(value);
            }
            SourceConfig::OAuth(_) => {
                if field != Field::RefreshToken {
                    return Err(format!(
                        "credential `{name}` is an OAuth session: push its refresh token (`--field refresh_token`) or use `tokenfs import {name} --from …`"
                    ));
                }
                let source = self.oauth.get(name).ok_or("no such source")?;
                return source.import(
                    oauth::ImportedSession {
                        refresh_token: Some(value),
                        ..Default::default()
                    },
                    "the control socket",
                );
            }
        }
        plausible(&value, 1)?;
        let fp = value.fingerprint();
        let generation = self.store.publish(
            name,
            Update {
                fields: vec![(field, value)],
                expires_at: None,
            },
        )?;
        info!(credential = name, fingerprint = %fp, "value set through the control socket");
        Ok(generation.unwrap_or_else(|| self.store.snapshot().generation))
    }

    /// `tokenfs rotate NAME`: only sources that can mint support it.
    pub fn rotate(&self, name: &str) -> Result<u64, String> {
        if let Some(h) = self.databricks.get(name) {
            return h.rotate();
        }
        if let Some(h) = self.oauth.get(name) {
            return h.rotate();
        }
        match self.kinds.get(name) {
            None => Err(format!("no credential named `{name}`")),
            Some(k) => Err(format!(
                "credential `{name}` has source \"{}\", which cannot mint a token: push a new one with `tokenfs set {name}`",
                k.kind()
            )),
        }
    }
}

impl Sources {
    /// `tokenfs import NAME --from …`: a session read from a CLI's file,
    /// served only after a refresh with it succeeded.
    pub fn import(
        &self,
        name: &str,
        session: oauth::ImportedSession,
        origin: &str,
    ) -> Result<u64, String> {
        match self.oauth.get(name) {
            Some(h) => h.import(session, origin),
            None if self.kinds.contains_key(name) => Err(format!(
                "credential `{name}` is not an OAuth session (source = \"oauth\")"
            )),
            None => Err(format!("no credential named `{name}`")),
        }
    }

    /// A consumer asked for a refresh of `credential` (the proxy's token
    /// endpoint): an OAuth source refreshes now, rate-limited; others
    /// ignore it.
    pub fn consumer_refresh(&self, credential: &str, origin: &str) {
        if let Some(h) = self.oauth.get(credential) {
            h.nudge(origin);
        }
    }

    /// The OAuth part of `status` for `name`, if it is an OAuth credential.
    pub fn oauth_status(&self, name: &str) -> Option<oauth::OAuthStatus> {
        self.oauth.get(name).map(oauth::Handle::status)
    }
}

impl Adopt for Sources {
    fn validates(&self, slot: &SlotRef) -> bool {
        self.oauth.contains_key(&slot.credential)
    }

    fn target(&self, slot: &SlotRef) -> SlotRef {
        match self.proxies.get(&slot.credential) {
            Some(injected) if slot.field == Field::Token => injected.clone(),
            _ => slot.clone(),
        }
    }

    fn blanked(&self, slot: &SlotRef, origin: &str) {
        if let Some(h) = self.oauth.get(&slot.credential)
            && matches!(
                slot.field,
                Field::AccessToken | Field::RefreshToken | Field::Token
            )
        {
            info!(credential = %slot.credential, "{origin} was written with {} empty or removed", slot.field);
            h.nudge(origin);
        }
    }

    fn plausible(&self, slot: &SlotRef, value: &Secret) -> Result<(), String> {
        let min_length = self
            .min_length
            .get(&slot.credential)
            .copied()
            .unwrap_or(DEFAULT_MIN_LENGTH);
        plausible(value, min_length)
    }

    fn offer(&self, slot: &SlotRef, value: Secret, origin: &str) -> Result<(), String> {
        let kind = self
            .kinds
            .get(&slot.credential)
            .ok_or_else(|| format!("no credential named `{}`", slot.credential))?;
        if let Err(why) = Adopt::plausible(self, slot, &value) {
            // Not the source's failure: its state stays, the note is shown.
            self.store.update_health(&slot.credential, |h| {
                h.last_error = Some(format!("did not adopt a value written to {origin}: {why}"));
                h.last_error_at = Some(std::time::SystemTime::now());
            });
            // A consumer that blanks its OAuth session (Claude Code after a
            // failed refresh) tried to refresh on its own: refresh for it.
            if let Some(h) = self.oauth.get(&slot.credential)
                && matches!(
                    slot.field,
                    Field::AccessToken | Field::RefreshToken | Field::Token
                )
            {
                h.nudge(origin);
            }
            return Err(why);
        }
        match kind {
            SourceConfig::Push { .. } => {
                self.store.publish(
                    &slot.credential,
                    Update {
                        fields: vec![(slot.field, value)],
                        expires_at: None,
                    },
                )?;
                Ok(())
            }
            SourceConfig::Databricks(_) => {
                let h = self
                    .databricks
                    .get(&slot.credential)
                    .ok_or("no such source")?;
                info!(credential = %slot.credential, fingerprint = %value, "validating a token written to {origin} before adopting it");
                h.offer(value)
            }
            SourceConfig::OAuth(_) => {
                let h = self.oauth.get(&slot.credential).ok_or("no such source")?;
                h.offer(slot.field, value, origin)
            }
            SourceConfig::File { path } => {
                warn!(credential = %slot.credential, fingerprint = %value, "ignoring a value written to {origin}");
                Err(format!(
                    "credential `{}` follows {}; edit that file instead",
                    slot.credential,
                    path.display()
                ))
            }
        }
    }
}
