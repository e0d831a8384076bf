//! `tokenfs.toml`: the schema, its validation, and errors that point at the
//! file, line, column and key.
//!
//! Loading is three steps. serde reads the raw document (keeping spans);
//! [`ConfigFile::parse`] turns it into typed values that cannot express a
//! wrong state (every binding names a known credential and field, every
//! managed path is relative and inside its mount), reading nothing but the
//! config's text and the environment (`HOME`, the XDG directories, the
//! `TOKENFS_*` overrides). Then [`ConfigFile::resolve`] expands presets, which
//! read the agents' own files, and places each mount (its canonical path,
//! no overlap, no system directory). `status` and `stop` need only the first
//! two; the daemon needs all three. A config that fails any step never
//! mounts anything. Presets are handed in (`Presets`), so this module does
//! not depend on them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::render::{Binding, Format, KeyPath, Kind};
use crate::store::SlotRef;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub mode: Mode,
    pub socket: PathBuf,
    pub credentials: BTreeMap<String, SourceConfig>,
    /// Per credential that sets `min_length`: the shortest value a program
    /// may write at a bound key and have adopted (else the default).
    pub min_length: BTreeMap<String, usize>,
    pub mounts: Vec<MountConfig>,
    /// Where the originals of converted files are backed up (0700).
    pub state_dir: PathBuf,
    /// `[[proxy]]` tables: loopback auth proxies (see [`crate::proxy`]).
    pub proxies: Vec<ProxyConfig>,
}

/// The knobs a `[[mount]] preset = …` table may set.
#[derive(Debug, Clone, Default)]
pub struct PresetOptions {
    /// The credential whose fields the files show.
    pub credential: String,
    /// Overrides the preset's directory (only for presets with one mount).
    pub dir: Option<PathBuf>,
    /// Create files that do not exist yet.
    pub create: bool,
    /// `~/.databrickscfg` profile (default `DEFAULT`).
    pub profile: Option<String>,
    /// OpenCode / Pi provider ids to manage (default: those with a literal key).
    pub providers: Option<Vec<String>>,
    /// Claude: also manage `.credentials.json` (OAuth login).
    pub oauth: bool,
    /// Let the credential replace differing values at mount (see
    /// `ManagedConfig::replace`).
    pub replace: bool,
    /// The agent talks to this loopback proxy instead of its upstream.
    pub via_proxy: Option<ViaProxy>,
    /// The credential is an OAuth session tokenfs refreshes: its files also
    /// show the expiry and the time of the last refresh it publishes.
    pub oauth_source: bool,
}

/// `via_proxy = "NAME"`: the agent's base URL renders as the proxy's URL and
/// its key as the proxy's local key, so it never holds the upstream token.
#[derive(Debug, Clone, Default)]
pub struct ViaProxy {
    pub name: String,
    /// The proxy's upstream (`https://host/base`), to keep a base URL's
    /// path beyond it (`…/serving-endpoints/anthropic` → `PROXY/anthropic`).
    pub upstream: String,
}

/// One directory a preset mounts.
#[derive(Debug, Clone)]
pub struct PresetMount {
    pub dir: PathBuf,
    pub files: Vec<ManagedConfig>,
    /// Things the user should know (shown in `status` and by `init`).
    pub notes: Vec<String>,
}

/// Expands `[[mount]] preset = NAME` into the directories and files of that
/// agent; it reads the agent's own files to see what they hold, which is why
/// it is a separate step ([`ConfigFile::resolve`]) given by the caller
/// (`preset::Agents`).
pub trait Presets {
    fn expand(&self, name: &str, o: &PresetOptions) -> Result<Vec<PresetMount>, String>;
}

/// The config file as written, checked on its own: reading it opens no
/// other file. Its mounts are placed and its presets expanded by
/// [`ConfigFile::resolve`], which makes the [`Config`] the daemon runs.
pub struct ConfigFile {
    config: Config,
    mounts: Vec<MountSpec>,
    max_size: u64,
}

/// One `[[mount]]` as written: its files, and the preset that adds more.
struct MountSpec {
    key: String,
    /// Where `dir` (or the table, without one) is, for placement errors.
    dir_at: Place,
    dir: Option<PathBuf>,
    allow_other: bool,
    files: Vec<ManagedConfig>,
    preset: Option<(String, PresetOptions, Place)>,
}

/// A position in the config file, kept for errors found after parsing.
#[derive(Clone)]
struct Place {
    file: PathBuf,
    line: usize,
    column: usize,
    key: String,
}

impl Place {
    fn error(&self, message: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            key: self.key.clone(),
            message: message.to_owned(),
        }
    }
}

/// The largest managed file served unless `max_file_size` says otherwise.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 20;

/// How managed files reach readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// FUSE: rendered per open, never stored (the default).
    Fuse,
    /// Degraded: each rendering is written to the real file (tokens on disk).
    Files,
    /// FUSE where it works, else files with a warning.
    Auto,
}

/// Where a credential's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// Values arrive from `tokenfs set NAME` or from a CLI writing a managed file.
    Push { initial_env: Option<String> },
    /// Follows a file that something else rewrites (e.g. a mounted secret).
    File { path: PathBuf },
    /// Mints and revokes Databricks personal access tokens itself.
    Databricks(DatabricksConfig),
    /// Owns an OAuth session (refresh-token or client-credentials grant).
    OAuth(OAuthConfig),
}

/// `source = "oauth"`: see [`crate::source::oauth`].
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthConfig {
    /// `anthropic`, `openai`, or `custom` (no preset: `token_url` and
    /// `client_id` given).
    pub provider: String,
    pub grant: Grant,
    pub token_url: String,
    pub client_id: String,
    /// Environment variable holding the client secret (sent with HTTP Basic).
    pub client_secret_env: Option<String>,
    pub scope: Option<String>,
    pub body: Body,
    /// Refresh no later than this long before expiry (and at half the
    /// lifetime if that is earlier).
    pub refresh_before: Duration,
    /// Where the session (refresh token included) persists, 0600.
    pub state_file: PathBuf,
    /// An API endpoint that answers 2xx to a valid access token: how an
    /// access token written by a consumer is validated (without it, such a
    /// token alone is never adopted).
    pub probe_url: Option<String>,
    /// What consumers' files show as the refresh token.
    pub consumer_refresh_token: ConsumerRefreshToken,
    /// Per-request timeout (connect and total).
    pub timeout: Duration,
    /// The shortest gap between two refreshes a consumer triggers (by
    /// blanking its session); `tokenfs rotate` is not limited.
    pub min_refresh_interval: Duration,
}

/// The OAuth grant a credential uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
}

/// How the token endpoint's request body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    Json,
    Form,
}

/// What a consumer's file holds at a bound `refresh_token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerRefreshToken {
    /// The real one: a consumer can refresh on its own; its new session is
    /// adopted after validation.
    Real,
    /// A stand-in only tokenfs knows: no consumer can spend the chain; its
    /// failed attempt (it blanks its session) makes tokenfs refresh now.
    Decoy,
}

/// `source = "databricks"`: see [`crate::source::databricks`].
#[derive(Debug, Clone, PartialEq)]
pub struct DatabricksConfig {
    /// Workspace URL, e.g. `https://adb-123.4.azuredatabricks.net` (no trailing slash).
    pub host: String,
    /// Environment variable holding the bootstrap PAT (else `tokenfs set`).
    pub initial_env: Option<String>,
    pub rotate_every: Duration,
    pub lifetime: Duration,
    /// How long a replaced token stays valid for in-flight requests.
    pub revoke_grace: Duration,
    /// Comment on minted tokens; also how `cleanup_orphans` recognises ours.
    /// `None`: `tokenfs-rotated:HOSTNAME`, named by the source when it starts
    /// (the config is read without asking the system anything).
    pub comment: Option<String>,
    /// Revoke tokens with our comment that an earlier run left behind.
    pub cleanup_orphans: bool,
    /// Per-request timeout (connect and total).
    pub timeout: Duration,
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Push { .. } => "push",
            SourceConfig::File { .. } => "file",
            SourceConfig::Databricks(_) => "databricks",
            SourceConfig::OAuth(_) => "oauth",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MountConfig {
    pub dir: PathBuf,
    /// Let other users reach the mount (kernel permission checks still apply).
    pub allow_other: bool,
    pub files: Vec<ManagedConfig>,
    /// What a preset wants the user to know (shown in `status`).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ManagedConfig {
    /// Relative to the mount dir, normal components only.
    pub path: PathBuf,
    pub format: Format,
    pub bindings: Vec<Binding>,
    /// Create the file (with the bound keys) when it does not exist.
    pub create: bool,
    /// At mount, a value at a bound key that differs from the credential's
    /// may be replaced by it (the original is backed up first); without
    /// this, such a file refuses to mount.
    pub replace: bool,
    /// The largest the file may be (`EFBIG` beyond).
    pub max_size: u64,
}

/// `[[proxy]]`: a loopback HTTP proxy that injects one credential's current
/// secret into every request it forwards to `upstream`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Unique; no '.' or spaces (the local key is published as `proxy.NAME`).
    pub name: String,
    /// Loopback unless `allow_remote = true`; port 0 picks a free port.
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// The secret injected per request (`credential` [+ `field`], default `.token`).
    pub slot: SlotRef,
    pub header: AuthHeader,
    /// TCP connect to the upstream (the TLS handshake counts against `timeout`).
    pub connect_timeout: Duration,
    /// Longest silence on a response body, and how long an unused upstream
    /// or client connection is kept open.
    pub idle_timeout: Duration,
    /// The whole exchange, from the request to the response's last byte.
    pub timeout: Duration,
    /// Request bodies up to this size are kept for the one retry after a
    /// rotation in flight; larger ones stream and are not retried.
    pub retry_body_limit: usize,
    /// Concurrent client connections; more wait in the listen backlog.
    pub max_connections: usize,
    /// Extra PEM roots for the upstream's TLS, on top of the system's.
    pub ca_file: Option<PathBuf>,
}

impl ProxyConfig {
    /// The base URL agents use instead of the upstream's, known before the
    /// daemon starts when the port is fixed (`None` for port 0: the running
    /// proxy's `Proxy::url` has the real one).
    pub fn url(&self) -> Option<String> {
        (self.listen.port() != 0).then(|| format!("http://{}", self.listen))
    }
}

/// Where a proxy forwards to: `https://host[:port][/base/path]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub https: bool,
    /// `host` or `host:port` as written (IPv6 in brackets).
    pub authority: String,
    /// The upstream's base path without a trailing `/` (may be empty):
    /// a request for `/x` goes to `BASE/x`.
    pub base_path: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.base_path)
    }
}

/// How the upstream expects its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthHeader {
    /// `Authorization: Bearer TOKEN` (Databricks, OpenAI-compatible gateways).
    Bearer,
    /// `x-api-key: TOKEN` (Anthropic).
    XApiKey,
    /// `x-goog-api-key: TOKEN` (Gemini).
    XGoogApiKey,
    /// `NAME: PREFIX TOKEN`; `name` is lowercase.
    Custom { name: String, prefix: String },
}

impl AuthHeader {
    /// The header's (lowercase) name and the text before the secret.
    pub fn parts(&self) -> (&str, &str) {
        match self {
            AuthHeader::Bearer => ("authorization", "Bearer "),
            AuthHeader::XApiKey => ("x-api-key", ""),
            AuthHeader::XGoogApiKey => ("x-goog-api-key", ""),
            AuthHeader::Custom { name, prefix } => (name, prefix),
        }
    }
}

/// A configuration error, displayed as `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---- raw document -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Option<Mode>,
    /// Bytes, or a string such as "1MiB".
    max_file_size: Option<Spanned<RawSize>>,
    state_dir: Option<String>,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    credentials: BTreeMap<Spanned<String>, Spanned<RawCredential>>,
    #[serde(default)]
    mount: Vec<Spanned<RawMount>>,
    #[serde(default)]
    proxy: Vec<Spanned<RawProxy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    name: Spanned<String>,
    listen: Spanned<String>,
    #[serde(default)]
    allow_remote: bool,
    upstream: Spanned<String>,
    #[serde(default)]
    allow_http: bool,
    credential: Spanned<String>,
    field: Option<Spanned<String>>,
    header: Option<Spanned<RawHeader>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    retry_body_limit: Option<Spanned<RawSize>>,
    max_connections: Option<Spanned<i64>>,
    ca_file: Option<Spanned<String>>,
}

/// `"authorization_bearer"`, `"x-api-key"`, `"x-goog-api-key"` or `{ name, prefix }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawHeader {
    Named(String),
    Custom {
        name: String,
        #[serde(default)]
        prefix: String,
    },
}

/// A size in bytes: `1048576` or `"1MiB"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    source: Spanned<String>,
    initial_env: Option<String>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    rotate_every: Option<Spanned<String>>,
    lifetime: Option<Spanned<String>>,
    revoke_grace: Option<Spanned<String>>,
    comment: Option<String>,
    cleanup_orphans: Option<bool>,
    timeout: Option<Spanned<String>>,
    min_length: Option<Spanned<usize>>,
    provider: Option<Spanned<String>>,
    grant: Option<Spanned<String>>,
    token_url: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    client_secret_env: Option<String>,
    scope: Option<String>,
    body: Option<Spanned<String>>,
    refresh_before: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
    probe_url: Option<Spanned<String>>,
    consumer_refresh_token: Option<Spanned<String>>,
    min_refresh_interval: Option<Spanned<String>>,
}

impl RawCredential {
    /// The optional keys that are set, by name (for "does not apply" errors).
    fn given(&self) -> Vec<&'static str> {
        let keys = [
            ("initial_env", self.initial_env.is_some()),
            ("path", self.path.is_some()),
            ("host", self.host.is_some()),
            ("rotate_every", self.rotate_every.is_some()),
            ("lifetime", self.lifetime.is_some()),
            ("revoke_grace", self.revoke_grace.is_some()),
            ("comment", self.comment.is_some()),
            ("cleanup_orphans", self.cleanup_orphans.is_some()),
            ("timeout", self.timeout.is_some()),
            ("min_length", self.min_length.is_some()),
            ("provider", self.provider.is_some()),
            ("grant", self.grant.is_some()),
            ("token_url", self.token_url.is_some()),
            ("client_id", self.client_id.is_some()),
            ("client_secret_env", self.client_secret_env.is_some()),
            ("scope", self.scope.is_some()),
            ("body", self.body.is_some()),
            ("refresh_before", self.refresh_before.is_some()),
            ("state_file", self.state_file.is_some()),
            ("probe_url", self.probe_url.is_some()),
            (
                "consumer_refresh_token",
                self.consumer_refresh_token.is_some(),
            ),
            ("min_refresh_interval", self.min_refresh_interval.is_some()),
        ];
        keys.into_iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| k)
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    dir: Option<Spanned<String>>,
    #[serde(default)]
    allow_other: bool,
    #[serde(default)]
    file: Vec<Spanned<RawFile>>,
    /// A built-in description of an agent's files (see `preset.rs`).
    preset: Option<Spanned<String>>,
    /// The credential a preset binds (default `databricks`).
    credential: Option<Spanned<String>>,
    #[serde(default)]
    create: bool,
    profile: Option<String>,
    providers: Option<Vec<String>>,
    #[serde(default)]
    oauth: bool,
    #[serde(default)]
    replace: bool,
    /// A preset's agent talks to this `[[proxy]]` instead of its upstream.
    via_proxy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: Spanned<String>,
    format: Option<Spanned<String>>,
    #[serde(default)]
    bind: BTreeMap<Spanned<String>, Spanned<RawBind>>,
    #[serde(default)]
    create: bool,
    replace: Option<bool>,
}

/// `"databricks.token"`, or `{ slot = "databricks.token", prefix = "Bearer ", suffix = "", type = "secret" }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawBind {
    Slot(String),
    Full {
        slot: String,
        #[serde(default)]
        prefix: String,
        #[serde(default)]
        suffix: String,
        /// "secret" (default), "value" (a string the daemon owns) or "number".
        #[serde(rename = "type")]
        kind: Option<String>,
    },
}

// ---- loading ------------------------------------------------------------

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        ConfigFile::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is used in error messages and to
    /// resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        let at = Locator { file: path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at.error(span, "", e.message().trim())
        })?;
        ConfigFile::validate(raw, &at)
    }

    fn validate(raw: RawConfig, at: &Locator<'_>) -> Result<ConfigFile, ConfigError> {
        let state_dir = match std::env::var_os("TOKENFS_STATE_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => raw
                .state_dir
                .as_deref()
                .map(expand_home)
                .unwrap_or_else(default_state_dir),
        };
        let (credentials, min_length) = validate_credentials(&raw, &state_dir, at)?;
        let proxies = validate_proxies(&raw, &credentials, at)?;
        let mounts = validate_mounts(&raw, &credentials, &proxies, at)?;
        if raw.mount.is_empty() && proxies.is_empty() {
            return Err(at.error(
                0..0,
                "mount",
                "no [[mount]] or [[proxy]] tables: nothing to serve",
            ));
        }
        let config = Config {
            path: at.file.to_owned(),
            mode: raw.mode.unwrap_or(Mode::Fuse),
            socket: validate_socket(&raw, at)?,
            credentials,
            min_length,
            mounts: Vec::new(),
            state_dir,
            proxies,
        };
        Ok(ConfigFile {
            config,
            mounts,
            max_size: max_file_size(&raw, at)?,
        })
    }

    /// Where the daemon listens (all `status` and `stop` need).
    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// Expands each mount's preset (reading the agent's files), then places
    /// every mount so that no two overlap and none covers a system directory.
    pub fn resolve(self, presets: &dyn Presets) -> Result<Config, ConfigError> {
        let mut config = self.config;
        let mut origins: Vec<(String, String)> = Vec::new();
        for spec in self.mounts {
            for mut m in spec.expand(presets)? {
                for f in &mut m.files {
                    f.max_size = self.max_size;
                }
                let written = m.dir.display().to_string();
                let placed = placement(&m.dir, &config.mounts, &origins);
                m.dir = placed.map_err(|e| spec.dir_at.error(&e))?;
                origins.push((spec.key.clone(), written));
                config.mounts.push(m);
            }
        }
        Ok(config)
    }
}

impl MountSpec {
    /// The mount as written, or the preset's mounts with the files listed
    /// beside it joining its first one.
    fn expand(&self, presets: &dyn Presets) -> Result<Vec<MountConfig>, ConfigError> {
        let Some((name, opts, at)) = &self.preset else {
            return Ok(vec![MountConfig {
                dir: self.dir.clone().unwrap_or_default(),
                allow_other: self.allow_other,
                files: self.files.clone(),
                notes: Vec::new(),
            }]);
        };
        let expanded = presets.expand(name, opts).map_err(|e| at.error(&e))?;
        let mut mounts: Vec<MountConfig> = expanded
            .into_iter()
            .map(|m| MountConfig {
                dir: m.dir,
                allow_other: self.allow_other,
                files: m.files,
                notes: m.notes,
            })
            .collect();
        if let Some(first) = mounts.first_mut() {
            first
                .files
                .retain(|f| !self.files.iter().any(|o| o.path == f.path));
            first.files.extend(self.files.iter().cloned());
        }
        Ok(mounts)
    }
}

type Credentials = BTreeMap<String, SourceConfig>;

/// Every `[credentials.NAME]`, and the `min_length`s they set.
fn validate_credentials(
    raw: &RawConfig,
    state_dir: &Path,
    at: &Locator<'_>,
) -> Result<(Credentials, BTreeMap<String, usize>), ConfigError> {
    let mut credentials = BTreeMap::new();
    let mut min_length = BTreeMap::new();
    for (name, cred) in &raw.credentials {
        let key = format!("credentials.{}", name.get_ref());
        if name.get_ref().is_empty() || name.get_ref().contains(['.', ' ']) {
            return Err(at.error(
                name.span(),
                &key,
                "a credential name may not be empty or contain '.' or spaces",
            ));
        }
        let source = validate_source(cred.get_ref(), name.get_ref(), &key, state_dir, at)?;
        if let Some(n) = &cred.get_ref().min_length {
            if *n.get_ref() == 0 {
                return Err(at.error(n.span(), &format!("{key}.min_length"), "must be at least 1"));
            }
            min_length.insert(name.get_ref().clone(), *n.get_ref());
        }
        credentials.insert(name.get_ref().clone(), source);
    }
    Ok((credentials, min_length))
}

/// Every `[[proxy]]`: names and fixed listen addresses unique.
fn validate_proxies(
    raw: &RawConfig,
    credentials: &Credentials,
    at: &Locator<'_>,
) -> Result<Vec<ProxyConfig>, ConfigError> {
    let mut proxies: Vec<ProxyConfig> = Vec::new();
    for (i, proxy) in raw.proxy.iter().enumerate() {
        let key = format!("proxy[{i}]");
        let p = validate_proxy(proxy.get_ref(), &key, credentials, at)?;
        let raw = proxy.get_ref();
        if proxies.iter().any(|o| o.name == p.name) {
            return Err(at.error(
                raw.name.span(),
                &format!("{key}.name"),
                &format!("a proxy named `{}` is already defined", p.name),
            ));
        }
        if p.listen.port() != 0 && proxies.iter().any(|o| o.listen == p.listen) {
            return Err(at.error(
                raw.listen.span(),
                &format!("{key}.listen"),
                &format!("{} is already used by another proxy", p.listen),
            ));
        }
        proxies.push(p);
    }
    Ok(proxies)
}

/// `max_file_size`, or the default.
fn max_file_size(raw: &RawConfig, at: &Locator<'_>) -> Result<u64, ConfigError> {
    let Some(v) = &raw.max_file_size else {
        return Ok(DEFAULT_MAX_FILE_SIZE);
    };
    parse_size(v.get_ref())
        .filter(|n| *n >= 1024)
        .map(|n| n as u64)
        .ok_or_else(|| {
            at.error(
                v.span(),
                "max_file_size",
                "write a size such as 1048576, \"1MiB\" or \"512KiB\" (at least 1 KiB)",
            )
        })
}

/// Every `[[mount]]` as written (see [`ConfigFile::resolve`] for the rest).
fn validate_mounts(
    raw: &RawConfig,
    credentials: &Credentials,
    proxies: &[ProxyConfig],
    at: &Locator<'_>,
) -> Result<Vec<MountSpec>, ConfigError> {
    // A managed file may also bind a proxy's local key: `proxy.NAME.token`.
    let mut bindable = credentials.clone();
    for p in proxies {
        bindable.insert(
            format!("proxy.{}", p.name),
            SourceConfig::Push { initial_env: None },
        );
    }
    raw.mount
        .iter()
        .enumerate()
        .map(|(i, mount)| validate_mount(mount, &format!("mount[{i}]"), &bindable, proxies, at))
        .collect()
}

/// `control.socket`: absolute (a relative one would depend on where each
/// command runs), else the default.
fn validate_socket(raw: &RawConfig, at: &Locator<'_>) -> Result<PathBuf, ConfigError> {
    let Some(s) = &raw.control.socket else {
        return Ok(default_socket());
    };
    let p = expand_home(s.get_ref());
    if p.is_absolute() {
        return Ok(p);
    }
    let why = if s.get_ref().starts_with('~') {
        "HOME is not set, so `~` cannot be expanded: write an absolute path, e.g. socket = \"/run/tokenfs/control.sock\""
    } else {
        "must be an absolute path (or start with ~/), e.g. socket = \"/run/tokenfs/control.sock\": a relative one would depend on the directory each command runs in"
    };
    Err(at.error(s.span(), "control.socket", why))
}

/// `$XDG_STATE_HOME/tokenfs`, else `~/.local/state/tokenfs`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("tokenfs"),
        _ => expand_home("~/.local/state").join("tokenfs"),
    }
}

fn validate_proxy(
    raw: &RawProxy,
    key: &str,
    credentials: &BTreeMap<String, SourceConfig>,
    at: &Locator<'_>,
) -> Result<ProxyConfig, ConfigError> {
    let f = Fields { at, key };
    let name = raw.name.get_ref();
    if name.is_empty() || name.contains(['.', ' ', '/']) {
        return Err(f.error(
            raw.name.span(),
            "name",
            "a proxy name may not be empty or contain '.', '/' or spaces",
        ));
    }
    let upstream = proxy_upstream(raw, &f)?;
    let header = match &raw.header {
        None => AuthHeader::Bearer,
        Some(h) => validate_header(h.get_ref()).map_err(|e| f.error(h.span(), "header", &e))?,
    };
    let ca_file = match &raw.ca_file {
        Some(p) if !upstream.https => {
            return Err(f.error(p.span(), "ca_file", "only applies to an https:// upstream"));
        }
        Some(p) => Some(expand_home(p.get_ref())),
        None => None,
    };
    let (retry_body_limit, max_connections) = proxy_limits(raw, &f)?;
    Ok(ProxyConfig {
        name: name.clone(),
        listen: proxy_listen(raw, &f)?,
        upstream,
        slot: proxy_slot(raw, credentials, &f)?,
        header,
        connect_timeout: f.positive_duration(
            &raw.connect_timeout,
            "connect_timeout",
            Duration::from_secs(10),
        )?,
        idle_timeout: f.positive_duration(
            &raw.idle_timeout,
            "idle_timeout",
            Duration::from_secs(300),
        )?,
        timeout: f.positive_duration(&raw.timeout, "timeout", Duration::from_secs(1800))?,
        retry_body_limit,
        max_connections,
        ca_file,
    })
}

/// Loopback only, unless `allow_remote`: any local process may connect,
/// but the local key keeps the others out; other machines are not asked.
fn proxy_listen(raw: &RawProxy, f: &Fields<'_>) -> Result<SocketAddr, ConfigError> {
    let listen: SocketAddr = raw.listen.get_ref().parse().map_err(|_| {
        f.error(
            raw.listen.span(),
            "listen",
            "must be IP:PORT, e.g. \"127.0.0.1:4000\" (port 0 picks a free one)",
        )
    })?;
    if !listen.ip().is_loopback() && !raw.allow_remote {
        return Err(f.error(raw.listen.span(), "listen", &format!(
            "{} is not a loopback address: other machines could use the proxy; listen on 127.0.0.1 (or set allow_remote = true)",
            listen.ip()
        )));
    }
    Ok(listen)
}

/// https, or plain http to loopback (tests) or with `allow_http`.
fn proxy_upstream(raw: &RawProxy, f: &Fields<'_>) -> Result<Upstream, ConfigError> {
    let upstream = parse_upstream(raw.upstream.get_ref())
        .map_err(|e| f.error(raw.upstream.span(), "upstream", &e))?;
    if !upstream.https && !raw.allow_http && !loopback_host(&upstream.authority) {
        return Err(f.error(raw.upstream.span(), "upstream",
            "plain http:// sends the token unencrypted: use https:// (http:// is allowed for loopback upstreams, or with allow_http = true)"));
    }
    Ok(upstream)
}

/// The credential (and field) the proxy injects.
fn proxy_slot(
    raw: &RawProxy,
    credentials: &BTreeMap<String, SourceConfig>,
    f: &Fields<'_>,
) -> Result<SlotRef, ConfigError> {
    let span = raw.credential.span();
    let mut slot = SlotRef::parse(raw.credential.get_ref())
        .map_err(|e| f.error(span.clone(), "credential", &e))?;
    if !credentials.contains_key(&slot.credential) {
        return Err(f.error(
            span,
            "credential",
            &format!(
                "unknown credential `{}` (define it in [credentials.{}])",
                slot.credential, slot.credential
            ),
        ));
    }
    if let Some(field) = &raw.field {
        slot.field = field
            .get_ref()
            .parse()
            .map_err(|e: String| f.error(field.span(), "field", &e))?;
    }
    Ok(slot)
}

/// `retry_body_limit` (≤ 1 GiB, default 4 MiB) and `max_connections`
/// (1..=65536, default 512).
fn proxy_limits(raw: &RawProxy, f: &Fields<'_>) -> Result<(usize, usize), ConfigError> {
    let retry_body_limit = match &raw.retry_body_limit {
        None => 4 << 20,
        Some(s) => parse_size(s.get_ref())
            .filter(|n| *n <= 1 << 30)
            .ok_or_else(|| {
                f.error(
                    s.span(),
                    "retry_body_limit",
                    "must be a size up to 1GiB: bytes, or e.g. \"512KiB\", \"4MiB\"",
                )
            })?,
    };
    let max_connections = match &raw.max_connections {
        None => 512,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v @ 1..=65_536) => v,
            _ => return Err(f.error(n.span(), "max_connections", "must be between 1 and 65536")),
        },
    };
    Ok((retry_body_limit, max_connections))
}

fn validate_header(raw: &RawHeader) -> Result<AuthHeader, String> {
    match raw {
        RawHeader::Named(n) => match n.as_str() {
            "authorization_bearer" => Ok(AuthHeader::Bearer),
            "x-api-key" => Ok(AuthHeader::XApiKey),
            "x-goog-api-key" => Ok(AuthHeader::XGoogApiKey),
            other => Err(format!(
                "unknown header style \"{other}\" (expected \"authorization_bearer\", \"x-api-key\", \"x-goog-api-key\" or {{ name = \"…\", prefix = \"…\" }})"
            )),
        },
        RawHeader::Custom { name, prefix } => {
            let lower = name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                return Err(format!("`{name}` is not a valid header name"));
            }
            const RESERVED: [&str; 11] = [
                "host",
                "content-length",
                "transfer-encoding",
                "connection",
                "keep-alive",
                "te",
                "trailer",
                "upgrade",
                "proxy-authorization",
                "proxy-connection",
                "content-type",
            ];
            if RESERVED.contains(&lower.as_str()) {
                return Err(format!("`{name}` cannot carry a key"));
            }
            if http::HeaderValue::from_str(prefix).is_err() {
                return Err("the prefix must be printable ASCII".into());
            }
            Ok(AuthHeader::Custom {
                name: lower,
                prefix: prefix.clone(),
            })
        }
    }
}

/// `https://host[:port][/path]`: no user info, query or fragment.
fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|e| format!("not a URL ({e}): write e.g. \"https://host/base/path\""))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with https:// (or http://)".into()),
    };
    let authority = uri.authority().ok_or_else(|| "names no host".to_string())?;
    if authority.as_str().contains('@') {
        return Err(
            "user info (user:password@) is not supported: the proxy injects the credential".into(),
        );
    }
    if authority.host().is_empty() {
        return Err("names no host".into());
    }
    if uri.query().is_some() || text.contains('#') {
        return Err("may not have a query or fragment".into());
    }
    Ok(Upstream {
        https,
        authority: authority.as_str().to_owned(),
        base_path: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// `localhost`, `127.x.y.z`, `[::1]` (with or without a port).
fn loopback_host(authority: &str) -> bool {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') && !h.is_empty() => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Bytes from `1048576`, `"1048576"`, `"512KiB"`, `"4MiB"`, `"1GiB"` (also KB/MB/GB as powers of 1000).
fn parse_size(raw: &RawSize) -> Option<usize> {
    let (digits, unit) = match raw {
        RawSize::Bytes(n) => return usize::try_from(*n).ok(),
        RawSize::Text(t) => {
            let t = t.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            (&t[..split], t[split..].trim())
        }
    };
    let n: usize = digits.parse().ok()?;
    let mult: usize = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The keys each source takes (a key given to another source is an error:
/// it would be silently ignored otherwise).
const SOURCE_KEYS: [(&str, &[&str]); 4] = [
    ("push", &["initial_env", "min_length"]),
    ("file", &["path", "min_length"]),
    (
        "databricks",
        &[
            "initial_env",
            "host",
            "rotate_every",
            "lifetime",
            "revoke_grace",
            "comment",
            "cleanup_orphans",
            "timeout",
            "min_length",
        ],
    ),
    (
        "oauth",
        &[
            "provider",
            "grant",
            "token_url",
            "client_id",
            "client_secret_env",
            "scope",
            "body",
            "refresh_before",
            "state_file",
            "probe_url",
            "consumer_refresh_token",
            "min_refresh_interval",
            "timeout",
            "min_length",
        ],
    ),
];

fn validate_source(
    raw: &RawCredential,
    name: &str,
    key: &str,
    state_dir: &Path,
    at: &Locator<'_>,
) -> Result<SourceConfig, ConfigError> {
    let f = Fields { at, key };
    let source = raw.source.get_ref().as_str();
    let Some((_, allowed)) = SOURCE_KEYS.iter().find(|(s, _)| *s == source) else {
        return Err(f.error(
            raw.source.span(),
            "source",
            &format!("unknown source \"{source}\" (expected \"push\", \"file\", \"databricks\" or \"oauth\")"),
        ));
    };
    if let Some(k) = raw.given().into_iter().find(|k| !allowed.contains(k)) {
        return Err(f.error(
            raw.source.span(),
            k,
            &format!("`{k}` does not apply to source \"{source}\""),
        ));
    }
    match source {
        "push" => Ok(SourceConfig::Push {
            initial_env: raw.initial_env.clone(),
        }),
        "file" => {
            let path = raw.path.as_ref().ok_or_else(|| {
                f.error(raw.source.span(), "path", "source \"file\" needs `path`")
            })?;
            Ok(SourceConfig::File {
                path: expand_home(path.get_ref()),
            })
        }
        "databricks" => validate_databricks(raw, &f).map(SourceConfig::Databricks),
        _ => validate_oauth(raw, name, state_dir, &f).map(SourceConfig::OAuth),
    }
}

/// Reads one table's fields, naming `key.field` in every error.
struct Fields<'a> {
    at: &'a Locator<'a>,
    key: &'a str,
}

impl Fields<'_> {
    fn error(&self, span: Range<usize>, field: &str, message: &str) -> ConfigError {
        self.at
            .error(span, &format!("{}.{field}", self.key), message)
    }

    /// One of `options`, or `None` when the field is absent.
    fn choice<T: Copy>(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        options: &[(&str, T)],
        expected: &str,
    ) -> Result<Option<T>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        match options
            .iter()
            .find(|(name, _)| *name == v.get_ref().as_str())
        {
            Some((_, t)) => Ok(Some(*t)),
            None => Err(self.error(v.span(), field, expected)),
        }
    }

    fn url(&self, v: &Option<Spanned<String>>, field: &str) -> Result<Option<String>, ConfigError> {
        let Some(u) = v else { return Ok(None) };
        let t = u.get_ref().trim();
        if t.starts_with("https://") || t.starts_with("http://") {
            Ok(Some(t.to_owned()))
        } else {
            Err(self.error(
                u.span(),
                field,
                "must start with https:// (or http:// for a local test server)",
            ))
        }
    }

    fn positive_duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match (self.duration(v, field, default)?, v) {
            (d, Some(s)) if d.is_zero() => Err(self.error(s.span(), field, "must be above 0")),
            (d, _) => Ok(d),
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            Some(s) => humantime::parse_duration(s.get_ref()).map_err(|e| {
                self.error(
                    s.span(),
                    field,
                    &format!("{e} (write e.g. \"15m\" or \"90s\")"),
                )
            }),
            None => Ok(default),
        }
    }
}

fn validate_databricks(
    raw: &RawCredential,
    f: &Fields<'_>,
) -> Result<DatabricksConfig, ConfigError> {
    let src = raw.source.span();
    let host = f
        .url(&raw.host, "host")?
        .map(|h| h.trim_end_matches('/').to_owned());
    let host = host.ok_or_else(|| {
        f.error(
            src.clone(),
            "host",
            "source \"databricks\" needs `host` (the workspace URL)",
        )
    })?;
    // The environment can shorten the schedule (tests, demos).
    let duration = |v: &Option<Spanned<String>>, field: &str, env: Option<&str>, default| match env
        .and_then(|e| std::env::var(e).ok().map(|v| (e, v)))
    {
        Some((e, v)) => humantime::parse_duration(&v)
            .map_err(|err| f.error(src.clone(), field, &format!("${e}: {err}"))),
        None => f.duration(v, field, default),
    };
    let rotate_every = duration(
        &raw.rotate_every,
        "rotate_every",
        Some("TOKENFS_ROTATE_EVERY"),
        Duration::from_secs(600),
    )?;
    let lifetime = duration(
        &raw.lifetime,
        "lifetime",
        Some("TOKENFS_LIFETIME"),
        Duration::from_secs(900),
    )?;
    if lifetime <= rotate_every {
        let span = raw.lifetime.as_ref().map_or(src.clone(), |s| s.span());
        return Err(f.error(span, "lifetime", &format!(
            "lifetime ({}) must be longer than rotate_every ({}), or tokens expire before they are replaced",
            humantime::format_duration(lifetime), humantime::format_duration(rotate_every))));
    }
    let comment = raw.comment.clone();
    Ok(DatabricksConfig {
        host,
        initial_env: raw.initial_env.clone(),
        rotate_every,
        lifetime,
        revoke_grace: duration(&raw.revoke_grace, "revoke_grace", None, Duration::ZERO)?,
        comment,
        cleanup_orphans: raw.cleanup_orphans.unwrap_or(false),
        timeout: duration(&raw.timeout, "timeout", None, Duration::from_secs(30))?,
    })
}

/// The token endpoint, client and body of a provider preset.
pub struct ProviderPreset {
    pub token_url: &'static str,
    pub client_id: &'static str,
    pub body: Body,
    pub scope: Option<&'static str>,
}

/// `provider = "anthropic"` (Claude Code's login) or `"openai"` (Codex's
/// ChatGPT login): the values those CLIs send when they refresh.
pub fn provider_preset(name: &str) -> Option<ProviderPreset> {
    match name {
        "anthropic" => Some(ProviderPreset {
            token_url: "https://platform.claude.com/v1/oauth/token",
            client_id: "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
            body: Body::Json,
            scope: Some(
                "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload",
            ),
        }),
        "openai" => Some(ProviderPreset {
            token_url: "https://auth.openai.com/oauth/token",
            client_id: "app_EMoamEEZ73f0CkXaXp7hrann",
            body: Body::Json,
            scope: None,
        }),
        _ => None,
    }
}

fn validate_oauth(
    raw: &RawCredential,
    name: &str,
    state_dir: &Path,
    f: &Fields<'_>,
) -> Result<OAuthConfig, ConfigError> {
    let src = raw.source.span();
    let grant = oauth_grant(raw, f)?;
    let preset = oauth_provider(raw, f)?;
    let (token_url, client_id) = oauth_endpoint(raw, f, preset.as_ref())?;
    if grant == Grant::ClientCredentials && raw.client_secret_env.is_none() {
        return Err(f.error(src, "client_secret_env",
            "grant = \"client_credentials\" needs `client_secret_env` (the variable holding the client secret)"));
    }
    let timeout = f.duration(&raw.timeout, "timeout", Duration::from_secs(30))?;
    if timeout.is_zero() {
        return Err(f.error(src, "timeout", "must be more than 0"));
    }
    let scope = raw.scope.clone().or_else(|| match grant {
        Grant::RefreshToken => preset.as_ref().and_then(|p| p.scope.map(String::from)),
        Grant::ClientCredentials => None,
    });
    Ok(OAuthConfig {
        provider: raw
            .provider
            .as_ref()
            .map_or("custom", |p| p.get_ref())
            .to_owned(),
        grant,
        token_url,
        client_id,
        client_secret_env: raw.client_secret_env.clone(),
        scope: scope.filter(|s| !s.trim().is_empty()),
        body: oauth_body(raw, f, preset.as_ref(), grant)?,
        refresh_before: f.duration(
            &raw.refresh_before,
            "refresh_before",
            Duration::from_secs(900),
        )?,
        state_file: raw
            .state_file
            .as_ref()
            .map(|p| expand_home(p.get_ref()))
            .unwrap_or_else(|| state_dir.join(format!("{name}.oauth.json"))),
        probe_url: f.url(&raw.probe_url, "probe_url")?,
        consumer_refresh_token: oauth_consumer_refresh_token(raw, f)?,
        timeout,
        min_refresh_interval: f.duration(
            &raw.min_refresh_interval,
            "min_refresh_interval",
            Duration::from_secs(30),
        )?,
    })
}

fn oauth_grant(raw: &RawCredential, f: &Fields<'_>) -> Result<Grant, ConfigError> {
    Ok(f.choice(
        &raw.grant,
        "grant",
        &[
            ("refresh_token", Grant::RefreshToken),
            ("client_credentials", Grant::ClientCredentials),
        ],
        "expected \"refresh_token\" (the default) or \"client_credentials\"",
    )?
    .unwrap_or(Grant::RefreshToken))
}

/// How the token request is encoded: given, else the provider's for a
/// refresh, else a form (RFC 6749).
fn oauth_body(
    raw: &RawCredential,
    f: &Fields<'_>,
    preset: Option<&ProviderPreset>,
    grant: Grant,
) -> Result<Body, ConfigError> {
    let default = match (preset, grant) {
        (Some(p), Grant::RefreshToken) => p.body,
        _ => Body::Form,
    };
    let options = [("json", Body::Json), ("form", Body::Form)];
    Ok(
        f.choice(&raw.body, "body", &options, "expected \"json\" or \"form\"")?
            .unwrap_or(default),
    )
}

/// `token_url` and `client_id`: given, or the provider preset's.
fn oauth_endpoint(
    raw: &RawCredential,
    f: &Fields<'_>,
    preset: Option<&ProviderPreset>,
) -> Result<(String, String), ConfigError> {
    let needs = |field: &str| {
        f.error(
            raw.source.span(),
            field,
            &format!("source \"oauth\" needs `{field}` (or provider = \"anthropic\" | \"openai\")"),
        )
    };
    let token_url = match (f.url(&raw.token_url, "token_url")?, preset) {
        (Some(u), _) => u,
        (None, Some(p)) => p.token_url.to_owned(),
        (None, None) => return Err(needs("token_url")),
    };
    let client_id = match (&raw.client_id, preset) {
        (Some(c), _) if !c.get_ref().trim().is_empty() => c.get_ref().trim().to_owned(),
        (Some(c), _) => return Err(f.error(c.span(), "client_id", "may not be empty")),
        (None, Some(p)) => p.client_id.to_owned(),
        (None, None) => return Err(needs("client_id")),
    };
    Ok((token_url, client_id))
}

fn oauth_consumer_refresh_token(
    raw: &RawCredential,
    f: &Fields<'_>,
) -> Result<ConsumerRefreshToken, ConfigError> {
    Ok(f.choice(
        &raw.consumer_refresh_token,
        "consumer_refresh_token",
        &[
            ("decoy", ConsumerRefreshToken::Decoy),
            ("real", ConsumerRefreshToken::Real),
        ],
        "expected \"decoy\" (the default) or \"real\"",
    )?
    .unwrap_or(ConsumerRefreshToken::Decoy))
}

/// `provider`: a preset's endpoints, or none for `custom`.
fn oauth_provider(
    raw: &RawCredential,
    f: &Fields<'_>,
) -> Result<Option<ProviderPreset>, ConfigError> {
    match &raw.provider {
        None => Ok(None),
        Some(p) if p.get_ref() == "custom" => Ok(None),
        Some(p) => provider_preset(p.get_ref()).map(Some).ok_or_else(|| {
            f.error(p.span(), "provider", &format!(
                "unknown provider \"{}\" (expected \"anthropic\", \"openai\" or \"custom\" with token_url and client_id)",
                p.get_ref()
            ))
        }),
    }
}

fn validate_mount(
    spanned: &Spanned<RawMount>,
    key: &str,
    credentials: &BTreeMap<String, SourceConfig>,
    proxies: &[ProxyConfig],
    at: &Locator<'_>,
) -> Result<MountSpec, ConfigError> {
    let raw = spanned.get_ref();
    let f = Fields { at, key };
    let dir = mount_dir(spanned, &f)?;
    let dir_span = raw.dir.as_ref().map_or(spanned.span(), |d| d.span());
    let mut files: Vec<ManagedConfig> = Vec::new();
    for (j, file) in raw.file.iter().enumerate() {
        let fkey = format!("{key}.file[{j}]");
        let m = validate_file(file.get_ref(), &fkey, raw.replace, credentials, at)?;
        if files.iter().any(|o| o.path == m.path) {
            let span = file.get_ref().path.span();
            return Err(at.error(span, &format!("{fkey}.path"), "listed twice in this mount"));
        }
        files.push(m);
    }
    let preset = match &raw.preset {
        Some(name) => Some(preset_options(
            raw,
            name,
            dir.clone(),
            credentials,
            proxies,
            &f,
        )?),
        None => None,
    };
    Ok(MountSpec {
        key: key.to_owned(),
        dir_at: at.place(dir_span, &format!("{key}.dir")),
        dir,
        allow_other: raw.allow_other,
        files,
        preset,
    })
}

/// `dir`: absolute after `~` expansion; absent only with a preset (which
/// knows where its agent keeps its files).
fn mount_dir(spanned: &Spanned<RawMount>, f: &Fields<'_>) -> Result<Option<PathBuf>, ConfigError> {
    let raw = spanned.get_ref();
    let Some(d) = &raw.dir else {
        return match raw.preset {
            Some(_) => Ok(None),
            None => Err(f.error(spanned.span(), "dir", "missing `dir` (or a `preset`)")),
        };
    };
    let dir = expand_home(d.get_ref());
    if dir.is_absolute() {
        return Ok(Some(dir));
    }
    let why = if d.get_ref().starts_with('~') {
        format!(
            "HOME is not set, so `{}` cannot be expanded: write the absolute path (or set HOME)",
            d.get_ref()
        )
    } else {
        format!(
            "must be an absolute path (or start with ~/): write dir = \"~/{}\" or the full path",
            d.get_ref().trim_start_matches("./")
        )
    };
    Err(f.error(d.span(), "dir", &why))
}

/// `via_proxy = "NAME"`: a `[[proxy]]` of that name.
fn via_proxy(
    raw: &RawMount,
    proxies: &[ProxyConfig],
    f: &Fields<'_>,
) -> Result<Option<ViaProxy>, ConfigError> {
    let Some(name) = &raw.via_proxy else {
        return Ok(None);
    };
    let p = proxies
        .iter()
        .find(|p| &p.name == name.get_ref())
        .ok_or_else(|| {
            f.error(
                name.span(),
                "via_proxy",
                &format!("no [[proxy]] named `{}`", name.get_ref()),
            )
        })?;
    Ok(Some(ViaProxy {
        name: p.name.clone(),
        upstream: p.upstream.to_string(),
    }))
}

/// A `preset` mount: its credential and proxy checked, and what the preset
/// is asked (it is expanded by [`ConfigFile::resolve`]).
fn preset_options(
    raw: &RawMount,
    preset: &Spanned<String>,
    dir: Option<PathBuf>,
    credentials: &BTreeMap<String, SourceConfig>,
    proxies: &[ProxyConfig],
    f: &Fields<'_>,
) -> Result<(String, PresetOptions, Place), ConfigError> {
    let credential = raw
        .credential
        .as_ref()
        .map_or("databricks", |c| c.get_ref().as_str());
    if !credentials.contains_key(credential) {
        let span = raw.credential.as_ref().map_or(preset.span(), |c| c.span());
        return Err(f.error(
            span,
            "credential",
            &format!("unknown credential `{credential}` (define it in [credentials.{credential}])"),
        ));
    }
    let via_proxy = via_proxy(raw, proxies, f)?;
    let opts = PresetOptions {
        credential: credential.to_owned(),
        dir,
        create: raw.create,
        profile: raw.profile.clone(),
        providers: raw.providers.clone(),
        oauth: raw.oauth,
        replace: raw.replace,
        oauth_source: matches!(credentials.get(credential), Some(SourceConfig::OAuth(_))),
        via_proxy,
    };
    let at = f.at.place(preset.span(), &format!("{}.preset", f.key));
    Ok((preset.get_ref().clone(), opts, at))
}

fn validate_file(
    raw: &RawFile,
    key: &str,
    mount_replace: bool,
    credentials: &BTreeMap<String, SourceConfig>,
    at: &Locator<'_>,
) -> Result<ManagedConfig, ConfigError> {
    let f = Fields { at, key };
    let written = PathBuf::from(raw.path.get_ref());
    // `./a.yaml` is `a.yaml`.
    let normal = written
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    let path: PathBuf = written
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    if !normal || path.as_os_str().is_empty() {
        return Err(f.error(
            raw.path.span(),
            "path",
            "must be a relative path inside the mount dir (no '..', no leading '/')",
        ));
    }
    let format = match &raw.format {
        Some(v) => v.get_ref().parse::<Format>().map_err(|e| f.error(v.span(), "format", &e.to_string()))?,
        None => guess_format(&path).ok_or_else(|| f.error(raw.path.span(), "format",
            "cannot tell the format from the file name: set format = \"yaml\" | \"json\" | \"toml\" | \"dotenv\" | \"ini\" | \"raw\""))?,
    };
    let bindings = raw
        .bind
        .iter()
        .map(|(k, v)| validate_binding(k, v, key, credentials, at))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ManagedConfig {
        path,
        format,
        bindings,
        create: raw.create,
        replace: raw.replace.unwrap_or(mount_replace),
        max_size: DEFAULT_MAX_FILE_SIZE,
    })
}

/// One `bind` entry: `"key.path" = "credential.field"`, or a table with a
/// prefix, suffix and type.
fn validate_binding(
    k: &Spanned<String>,
    v: &Spanned<RawBind>,
    key: &str,
    credentials: &BTreeMap<String, SourceConfig>,
    at: &Locator<'_>,
) -> Result<Binding, ConfigError> {
    let bkey = format!("{key}.bind.\"{}\"", k.get_ref());
    let keypath: KeyPath = k
        .get_ref()
        .parse()
        .map_err(|e| at.error(k.span(), &bkey, &format!("bad key path: {e}")))?;
    let (slot, prefix, suffix, kind) = match v.get_ref() {
        RawBind::Slot(s) => (s.as_str(), String::new(), String::new(), None),
        RawBind::Full {
            slot,
            prefix,
            suffix,
            kind,
        } => (
            slot.as_str(),
            prefix.clone(),
            suffix.clone(),
            kind.as_deref(),
        ),
    };
    let kind = match kind {
        None | Some("secret") => Kind::Secret,
        Some("value") => Kind::Value,
        Some("number") => Kind::Number,
        Some(other) => {
            return Err(at.error(
                v.span(),
                &bkey,
                &format!("unknown type \"{other}\" (expected \"secret\", \"value\" or \"number\")"),
            ));
        }
    };
    let slot = SlotRef::parse(slot).map_err(|e| at.error(v.span(), &bkey, &e))?;
    if !credentials.contains_key(&slot.credential) {
        return Err(at.error(
            v.span(),
            &bkey,
            &format!(
                "unknown credential `{}` (define it in [credentials.{}])",
                slot.credential, slot.credential
            ),
        ));
    }
    Ok(Binding {
        prefix,
        suffix,
        kind,
        ..Binding::new(keypath, slot.to_string())
    })
}

/// Directories tokenfs never mounts over (anything under `/proc`, `/sys`
/// and `/dev` is refused too).
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/tmp",
    "/var/lib",
    "/var/log",
    "/usr/local",
];

/// Resolves a mount dir to its canonical path (symlinks and `..` resolved;
/// the part that does not exist yet is taken as written) and refuses
/// places a mount cannot go: `/`, system directories, `$HOME` itself, a
/// directory already listed (through another path), and one mount inside
/// another. Each message says what to write instead.
fn placement(
    dir: &Path,
    earlier: &[MountConfig],
    origins: &[(String, String)],
) -> Result<PathBuf, String> {
    if !dir.is_absolute() {
        return Err(format!(
            "HOME is not set, so `{}` cannot be expanded: write the absolute path (or set HOME)",
            dir.display()
        ));
    }
    let canon = canonical(dir);
    let shown = if canon == dir {
        format!("{}", dir.display())
    } else {
        format!("{} (that is {})", dir.display(), canon.display())
    };
    if canon == Path::new("/") {
        return Err(format!(
            "{shown}: tokenfs never mounts over `/`; name the directory that holds the agent's files, e.g. dir = \"~/.hermes\""
        ));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| canonical(Path::new(&h)));
    if home.as_deref() == Some(canon.as_path()) {
        return Err(format!(
            "{shown} is your home directory: every other file in it would go through tokenfs; mount the agent's own directory instead, e.g. dir = \"~/.hermes\" (for ~/.databrickscfg use preset = \"databricks\")"
        ));
    }
    let system = SYSTEM_DIRS.iter().any(|s| canon == Path::new(s))
        || ["/proc", "/sys", "/dev"]
            .iter()
            .any(|s| canon.starts_with(s));
    if system {
        return Err(format!(
            "{shown} is a system directory: mount the directory that holds the agent's config files instead (e.g. dir = \"~/.hermes\")"
        ));
    }
    match overlap(&canon, &shown, earlier, origins) {
        Some(why) => Err(why),
        None => Ok(canon),
    }
}

/// Why `canon` cannot be mounted beside the mounts before it: the same
/// directory, or one inside the other.
fn overlap(
    canon: &Path,
    shown: &str,
    earlier: &[MountConfig],
    origins: &[(String, String)],
) -> Option<String> {
    for (other, (key, written)) in earlier.iter().zip(origins) {
        if other.dir == canon {
            return Some(format!(
                "{shown} is the same directory as {key}.dir (\"{written}\"): list it once"
            ));
        }
        let (outer, inner, outer_key) = if canon.starts_with(&other.dir) {
            (other.dir.as_path(), canon, key.as_str())
        } else if other.dir.starts_with(canon) {
            (canon, other.dir.as_path(), "this mount")
        } else {
            continue;
        };
        let rel = inner.strip_prefix(outer).unwrap_or(inner);
        return Some(format!(
            "{shown} and {key}.dir (\"{written}\") are nested: {} is inside {}; mounts cannot be nested, so mount only {} ({outer_key}) and list the files below it by relative path, e.g. path = \"{}/config.yaml\"",
            inner.display(),
            outer.display(),
            outer.display(),
            rel.display()
        ));
    }
    None
}

/// The canonical form of `p`: its longest existing ancestor resolved by
/// the filesystem, the rest normalised as written (`.` dropped, `..` pops).
pub fn canonical(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let mut base = p.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    while !base.exists() {
        match (base.file_name(), base.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                base = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&base).unwrap_or(base);
    for part in rest.iter().rev() {
        match part.to_str() {
            Some("..") => {
                out.pop();
            }
            Some(".") => {}
            _ => out.push(part),
        }
    }
    out
}

/// The format implied by a file name, for configs that leave `format` out.
pub fn guess_format(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?;
    let ext = name.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    Some(match (name, ext) {
        (".env", _) | (_, "env") => Format::Dotenv,
        (_, "yaml" | "yml") => Format::Yaml,
        (_, "json") => Format::Json,
        (_, "toml") => Format::Toml,
        (".databrickscfg", _) | (_, "ini" | "cfg") => Format::Ini,
        _ => return None,
    })
}

/// `~/x` → `$HOME/x`.
pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if p == "~" => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(p)),
        _ => PathBuf::from(p),
    }
}

/// `$XDG_RUNTIME_DIR/tokenfs/control.sock`, else `~/.local/state/tokenfs/control.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOKENFS_SOCKET") {
        return PathBuf::from(dir);
    }
    let base = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => expand_home("~/.local/state"),
    };
    base.join("tokenfs").join("control.sock")
}

/// Turns byte spans into line/column positions for errors.
struct Locator<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn place(&self, span: Range<usize>, key: &str) -> Place {
        let (line, column) = line_col(self.text, span.start);
        Place {
            file: self.file.to_owned(),
            line,
            column,
            key: key.to_owned(),
        }
    }

    fn error(&self, span: Range<usize>, key: &str, message: &str) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        crate::preset::parse_config(Path::new("t.toml"), text)
    }

    /// Records what a preset is asked, and answers with one directory.
    struct Recorder(std::cell::RefCell<Vec<(String, PresetOptions)>>);

    impl Presets for Recorder {
        fn expand(&self, name: &str, o: &PresetOptions) -> Result<Vec<PresetMount>, String> {
            self.0.borrow_mut().push((name.to_owned(), o.clone()));
            if name == "broken" {
                return Err("cannot read its files".into());
            }
            Ok(vec![PresetMount {
                dir: PathBuf::from("/srv/agent-home/.agent"),
                files: Vec::new(),
                notes: vec!["a note".into()],
            }])
        }
    }

    #[test]
    fn presets_are_expanded_only_by_resolve_with_the_options_written() {
        let text = r#"
[credentials.databricks]
source = "push"

[[mount]]
preset = "hermes"
dir = "/srv/agent-home/.agent"
create = true
profile = "dev"
allow_other = true
"#;
        let presets = Recorder(Default::default());
        let file = ConfigFile::parse(Path::new("t.toml"), text).unwrap();
        assert!(presets.0.borrow().is_empty());
        let config = file.resolve(&presets).unwrap();
        let asked = presets.0.borrow();
        assert_eq!(asked.len(), 1);
        let (name, o) = &asked[0];
        assert_eq!(name, "hermes");
        assert_eq!(o.credential, "databricks");
        assert_eq!(o.dir.as_deref(), Some(Path::new("/srv/agent-home/.agent")));
        assert!(o.create && !o.oauth && o.via_proxy.is_none());
        assert_eq!(o.profile.as_deref(), Some("dev"));
        assert_eq!(config.mounts.len(), 1);
        assert!(config.mounts[0].allow_other);
        assert_eq!(config.mounts[0].notes, vec!["a note".to_owned()]);
    }

    #[test]
    fn a_preset_that_fails_is_reported_at_its_line_after_parsing() {
        let text =
            "[credentials.databricks]\nsource = \"push\"\n\n[[mount]]\npreset = \"broken\"\n";
        let file = ConfigFile::parse(Path::new("t.toml"), text).unwrap();
        let e = file.resolve(&Recorder(Default::default())).err().unwrap();
        assert_eq!((e.line, e.key.as_str()), (5, "mount[0].preset"));
        assert!(e.message.contains("cannot read its files"), "{e}");
    }

    const GOOD: &str = r#"
[credentials.databricks]
source = "push"
initial_env = "DATABRICKS_TOKEN"

[[mount]]
dir = "/tmp/x"
[[mount.file]]
path = "config.yaml"
bind = { "model.api_key" = "databricks.token", "h" = { slot = "databricks", prefix = "Bearer " } }
"#;

    #[test]
    fn a_good_config_validates() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.credentials["databricks"],
            SourceConfig::Push {
                initial_env: Some("DATABRICKS_TOKEN".into())
            }
        );
        let f = &c.mounts[0].files[0];
        assert_eq!(f.format, Format::Yaml);
        assert_eq!(f.bindings.len(), 2);
        assert!(
            f.bindings
                .iter()
                .any(|b| b.prefix == "Bearer " && b.slot == "databricks.token")
        );
    }

    #[test]
    fn unknown_credential_names_line_column_and_key() {
        let text = GOOD.replace(
            "\"model.api_key\" = \"databricks.token\"",
            "\"model.api_key\" = \"nope.token\"",
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.line, 10);
        assert!(e.key.contains("bind.\"model.api_key\""), "{e}");
        assert!(e.to_string().starts_with("t.toml:10:"), "{e}");
        assert!(e.message.contains("unknown credential `nope`"), "{e}");
    }

    #[test]
    fn syntax_and_schema_errors_have_positions() {
        let e = parse("[[mount]]\ndir = \n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        let e = parse("[credentials.a]\nsource = \"push\"\ncolour = 1\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("colour"), "{e}");
        let e = parse("[credentials.a]\nsource = \"pusj\"\n[[mount]]\ndir=\"/x\"\n").unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (2, "credentials.a.source"), "{e}");
    }

    #[test]
    fn paths_must_stay_inside_the_mount() {
        let text = GOOD.replace(
            "path = \"config.yaml\"",
            "path = \"../config.yaml\"\nformat = \"yaml\"",
        );
        let e = parse(&text).unwrap_err();
        assert!(e.key.ends_with(".path"), "{e}");
    }

    #[test]
    fn databricks_sources_validate_their_timings() {
        let base = "[credentials.db]\nsource = \"databricks\"\nhost = \"https://x.example.com/\"\n";
        let mount = "[[mount]]\ndir = \"/tmp/x\"\n";
        let c = parse(&format!(
            "{base}rotate_every = \"1m\"\nlifetime = \"3m\"\n{mount}"
        ))
        .unwrap();
        let SourceConfig::Databricks(d) = &c.credentials["db"] else {
            panic!("not databricks")
        };
        assert_eq!(
            (d.host.as_str(), d.rotate_every, d.lifetime),
            (
                "https://x.example.com",
                Duration::from_secs(60),
                Duration::from_secs(180)
            )
        );
        assert_eq!(
            d.comment, None,
            "named by the source, not by reading the config"
        );
        let e = parse(&format!(
            "{base}rotate_every = \"10m\"\nlifetime = \"5m\"\n{mount}"
        ))
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "credentials.db.lifetime"),
            "{e}"
        );
        let e = parse(&format!("{base}path = \"/x\"\n{mount}")).unwrap_err();
        assert!(e.message.contains("`path` does not apply"), "{e}");
        let e = parse(&format!("{base}rotate_every = \"often\"\n{mount}")).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
    }

    const PROXY: &str = "[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"db\"\nlisten = \"127.0.0.1:4000\"\nupstream = \"https://adb-1.example.net/serving-endpoints/\"\ncredential = \"db\"\n";

    #[test]
    fn proxy_tables_validate_with_defaults() {
        let c = parse(PROXY).unwrap();
        let p = &c.proxies[0];
        assert_eq!(p.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(
            p.upstream.to_string(),
            "https://adb-1.example.net/serving-endpoints"
        );
        assert_eq!(p.slot.to_string(), "db.token");
        assert_eq!(p.header, AuthHeader::Bearer);
        assert_eq!(p.retry_body_limit, 4 << 20);
        assert!(c.mounts.is_empty(), "a proxy alone is something to serve");
        assert_eq!(p.url().as_deref(), Some("http://127.0.0.1:4000"));
        let c = parse(&format!(
            "{PROXY}field = \"access_token\"\nheader = {{ name = \"X-Token\", prefix = \"Token \" }}\nretry_body_limit = \"512KiB\"\ntimeout = \"2m\"\n"
        ))
        .unwrap();
        let p = &c.proxies[0];
        assert_eq!(p.slot.to_string(), "db.access_token");
        assert_eq!(
            p.header,
            AuthHeader::Custom {
                name: "x-token".into(),
                prefix: "Token ".into()
            }
        );
        assert_eq!(p.retry_body_limit, 512 << 10);
        assert_eq!(p.timeout, Duration::from_secs(120));
        let c = parse(&PROXY.replace(
            "credential = \"db\"",
            "credential = \"db\"\nheader = \"x-goog-api-key\"",
        ))
        .unwrap();
        assert_eq!(c.proxies[0].header, AuthHeader::XGoogApiKey);
    }

    #[test]
    fn a_proxy_listens_on_loopback_unless_allowed() {
        let text = PROXY.replace("127.0.0.1:4000", "0.0.0.0:4000");
        let e = parse(&text).unwrap_err();
        assert_eq!(
            (e.line, e.column, e.key.as_str()),
            (5, 10, "proxy[0].listen"),
            "{e}"
        );
        assert!(e.message.contains("not a loopback address"), "{e}");
        let c = parse(&format!("{text}allow_remote = true\n")).unwrap();
        assert_eq!(c.proxies[0].listen.port(), 4000);
        let e = parse(&PROXY.replace("127.0.0.1:4000", "localhost:4000")).unwrap_err();
        assert!(e.message.contains("IP:PORT"), "{e}");
        assert!(parse(&PROXY.replace("127.0.0.1:4000", "[::1]:0")).is_ok());
    }

    #[test]
    fn plain_http_upstreams_only_on_loopback_unless_allowed() {
        let text = PROXY.replace("https://adb-1", "http://adb-1");
        let e = parse(&text).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (6, "proxy[0].upstream"), "{e}");
        assert!(parse(&format!("{text}allow_http = true\n")).is_ok());
        for up in [
            "http://127.0.0.1:9",
            "http://localhost:9/x",
            "http://[::1]:9",
        ] {
            let c = parse(&PROXY.replace("https://adb-1.example.net/serving-endpoints/", up))
                .unwrap_or_else(|e| panic!("{up}: {e}"));
            assert!(!c.proxies[0].upstream.https);
        }
        for bad in [
            "ftp://x",
            "https://u:p@x",
            "https://x/?q=1",
            "adb-1.example.net",
        ] {
            let e = parse(&PROXY.replace("https://adb-1.example.net/serving-endpoints/", bad))
                .unwrap_err();
            assert_eq!(e.key, "proxy[0].upstream", "{bad}: {e}");
        }
    }

    #[test]
    fn proxy_errors_name_the_key() {
        let e = parse(&PROXY.replace("credential = \"db\"", "credential = \"nope\"")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (7, "proxy[0].credential"), "{e}");
        let e = parse(&format!("{PROXY}header = \"cookie-ish\"\n")).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (8, "proxy[0].header"), "{e}");
        let e = parse(&format!("{PROXY}header = {{ name = \"Host\" }}\n")).unwrap_err();
        assert_eq!(e.key, "proxy[0].header", "{e}");
        let e = parse(&format!("{PROXY}retry_body_limit = \"lots\"\n")).unwrap_err();
        assert_eq!(e.key, "proxy[0].retry_body_limit", "{e}");
        let e = parse(&format!("{PROXY}idle_timeout = \"0s\"\n")).unwrap_err();
        assert_eq!(e.key, "proxy[0].idle_timeout", "{e}");
        let e = parse(&format!("{PROXY}colour = 1\n")).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        let twice = format!("{PROXY}{}", &PROXY[PROXY.find("[[proxy]]").unwrap()..]);
        let e = parse(&twice).unwrap_err();
        assert_eq!(e.key, "proxy[1].name", "{e}");
        let e = parse(&PROXY.replace("name = \"db\"", "name = \"a.b\"")).unwrap_err();
        assert_eq!(e.key, "proxy[0].name", "{e}");
    }

    #[test]
    fn a_managed_file_may_bind_a_proxys_local_key() {
        let text = format!(
            "{PROXY}[[mount]]\ndir = \"/tmp/x\"\n[[mount.file]]\npath = \"c.yaml\"\nbind = {{ \"k\" = \"proxy.db.token\" }}\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.mounts[0].files[0].bindings[0].slot, "proxy.db.token");
        assert!(!c.credentials.contains_key("proxy.db"));
        let e = parse(&text.replace("proxy.db.token", "proxy.other.token")).unwrap_err();
        assert!(e.message.contains("unknown credential"), "{e}");
    }

    #[test]
    fn oauth_sources_take_provider_presets_and_overrides() {
        let mount = "[[mount]]\ndir = \"/tmp/x\"\n";
        let c = parse(&format!(
            "state_dir = \"/s\"\n[credentials.claude]\nsource = \"oauth\"\nprovider = \"anthropic\"\n{mount}"
        ))
        .unwrap();
        let SourceConfig::OAuth(o) = &c.credentials["claude"] else {
            panic!("not oauth")
        };
        assert_eq!(o.token_url, "https://platform.claude.com/v1/oauth/token");
        assert_eq!(o.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
        assert_eq!((o.body, o.grant), (Body::Json, Grant::RefreshToken));
        assert!(
            o.scope
                .as_deref()
                .is_some_and(|s| s.contains("user:inference"))
        );
        assert_eq!(o.refresh_before, Duration::from_secs(900));
        assert_eq!(o.consumer_refresh_token, ConsumerRefreshToken::Decoy);
        if std::env::var_os("TOKENFS_STATE_DIR").is_none() {
            assert_eq!(o.state_file, PathBuf::from("/s/claude.oauth.json"));
        }
        let c = parse(&format!(
            "[credentials.o]\nsource = \"oauth\"\nprovider = \"openai\"\ntoken_url = \"http://127.0.0.1:9/t\"\nbody = \"form\"\nconsumer_refresh_token = \"real\"\nrefresh_before = \"2s\"\n{mount}"
        ))
        .unwrap();
        let SourceConfig::OAuth(o) = &c.credentials["o"] else {
            panic!("not oauth")
        };
        assert_eq!(o.token_url, "http://127.0.0.1:9/t");
        assert_eq!(o.client_id, "app_EMoamEEZ73f0CkXaXp7hrann");
        assert_eq!(o.body, Body::Form);
        assert_eq!(o.scope, None);
        assert_eq!(o.consumer_refresh_token, ConsumerRefreshToken::Real);
        let c = parse(&format!(
            "[credentials.sp]\nsource = \"oauth\"\ngrant = \"client_credentials\"\ntoken_url = \"https://w.example.com/oidc/v1/token\"\nclient_id = \"abc\"\nclient_secret_env = \"SP_SECRET\"\nscope = \"all-apis\"\n{mount}"
        ))
        .unwrap();
        let SourceConfig::OAuth(o) = &c.credentials["sp"] else {
            panic!("not oauth")
        };
        assert_eq!((o.grant, o.body), (Grant::ClientCredentials, Body::Form));
        assert_eq!(o.scope.as_deref(), Some("all-apis"));
        let e = parse(&format!("[credentials.x]\nsource = \"oauth\"\n{mount}")).unwrap_err();
        assert!(e.message.contains("token_url"), "{e}");
        let e = parse(&format!(
            "[credentials.x]\nsource = \"oauth\"\nprovider = \"github\"\n{mount}"
        ))
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (3, "credentials.x.provider"),
            "{e}"
        );
        let e = parse(&format!(
            "[credentials.x]\nsource = \"oauth\"\nprovider = \"openai\"\ngrant = \"client_credentials\"\n{mount}"
        ))
        .unwrap_err();
        assert!(e.message.contains("client_secret_env"), "{e}");
        let e = parse(&format!(
            "[credentials.x]\nsource = \"push\"\nprovider = \"openai\"\n{mount}"
        ))
        .unwrap_err();
        assert!(e.message.contains("does not apply"), "{e}");
    }

    #[test]
    fn formats_are_guessed_from_names() {
        assert_eq!(guess_format(Path::new(".env")), Some(Format::Dotenv));
        assert_eq!(guess_format(Path::new("auth.json")), Some(Format::Json));
        assert_eq!(guess_format(Path::new(".databrickscfg")), Some(Format::Ini));
        assert_eq!(guess_format(Path::new("token")), None);
    }
}
