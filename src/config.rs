//! `tokenfs.toml`: the schema, its validation, and errors that point at the
//! file, line, column and key.
//!
//! Parsing is two steps: serde reads the raw document (keeping spans), then
//! [`Config::validate`] turns it into typed values that cannot express a
//! wrong state (every binding names a known credential and field, every
//! managed path is relative and inside its mount). A config that fails either
//! step never mounts anything.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::render::{Binding, Format, KeyPath};
use crate::store::SlotRef;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub mode: Mode,
    pub socket: PathBuf,
    pub credentials: BTreeMap<String, SourceConfig>,
    pub mounts: Vec<MountConfig>,
}

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
    pub comment: String,
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
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    credentials: BTreeMap<Spanned<String>, Spanned<RawCredential>>,
    #[serde(default)]
    mount: Vec<Spanned<RawMount>>,
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
}

/// `"databricks.token"`, or `{ slot = "databricks.token", prefix = "Bearer ", suffix = "" }`.
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
    },
}

// ---- loading ------------------------------------------------------------

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is used in error messages and to
    /// resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = Locator { file: path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at.error(span, "", e.message().trim())
        })?;
        Config::validate(raw, &at)
    }

    fn validate(raw: RawConfig, at: &Locator<'_>) -> Result<Config, ConfigError> {
        let mut credentials = BTreeMap::new();
        for (name, cred) in &raw.credentials {
            let key = format!("credentials.{}", name.get_ref());
            if name.get_ref().is_empty() || name.get_ref().contains(['.', ' ']) {
                return Err(at.error(
                    name.span(),
                    &key,
                    "a credential name may not be empty or contain '.' or spaces",
                ));
            }
            let source = validate_source(cred.get_ref(), &key, at)?;
            credentials.insert(name.get_ref().clone(), source);
        }
        let mut mounts: Vec<MountConfig> = Vec::new();
        let mut origins: Vec<(Range<usize>, String, String)> = Vec::new();
        for (i, mount) in raw.mount.iter().enumerate() {
            let key = format!("mount[{i}]");
            for mut m in validate_mount(mount, &key, &credentials, at)? {
                let span = mount
                    .get_ref()
                    .dir
                    .as_ref()
                    .map_or(mount.span(), |d| d.span());
                let written = m.dir.display().to_string();
                m.dir = placement(&m.dir, &mounts, &origins)
                    .map_err(|e| at.error(span.clone(), &format!("{key}.dir"), &e))?;
                origins.push((span, key.clone(), written));
                mounts.push(m);
            }
        }
        if mounts.is_empty() {
            return Err(at.error(0..0, "mount", "no [[mount]] tables: nothing to serve"));
        }
        let socket = match &raw.control.socket {
            Some(s) => {
                let p = expand_home(s.get_ref());
                if !p.is_absolute() {
                    let why = if s.get_ref().starts_with('~') {
                        "HOME is not set, so `~` cannot be expanded: write an absolute path, e.g. socket = \"/run/tokenfs/control.sock\""
                    } else {
                        "must be an absolute path (or start with ~/), e.g. socket = \"/run/tokenfs/control.sock\": a relative one would depend on the directory each command runs in"
                    };
                    return Err(at.error(s.span(), "control.socket", why));
                }
                p
            }
            None => default_socket(),
        };
        Ok(Config {
            path: at.file.to_owned(),
            mode: raw.mode.unwrap_or(Mode::Fuse),
            socket,
            credentials,
            mounts,
        })
    }
}

fn validate_source(
    raw: &RawCredential,
    key: &str,
    at: &Locator<'_>,
) -> Result<SourceConfig, ConfigError> {
    let source = raw.source.get_ref().as_str();
    let only = |allowed: &[&str]| -> Result<(), ConfigError> {
        match raw.given().into_iter().find(|k| !allowed.contains(k)) {
            Some(k) => Err(at.error(
                raw.source.span(),
                &format!("{key}.{k}"),
                &format!("`{k}` does not apply to source \"{source}\""),
            )),
            None => Ok(()),
        }
    };
    match source {
        "push" => {
            only(&["initial_env"])?;
            Ok(SourceConfig::Push {
                initial_env: raw.initial_env.clone(),
            })
        }
        "file" => {
            only(&["path"])?;
            let path = raw.path.as_ref().ok_or_else(|| {
                at.error(
                    raw.source.span(),
                    &format!("{key}.path"),
                    "source \"file\" needs `path`",
                )
            })?;
            Ok(SourceConfig::File {
                path: expand_home(path.get_ref()),
            })
        }
        "databricks" => {
            only(&[
                "initial_env",
                "host",
                "rotate_every",
                "lifetime",
                "revoke_grace",
                "comment",
                "cleanup_orphans",
                "timeout",
            ])?;
            validate_databricks(raw, key, at).map(SourceConfig::Databricks)
        }
        other => Err(at.error(
            raw.source.span(),
            &format!("{key}.source"),
            &format!("unknown source \"{other}\" (expected \"push\", \"file\" or \"databricks\")"),
        )),
    }
}

fn validate_databricks(
    raw: &RawCredential,
    key: &str,
    at: &Locator<'_>,
) -> Result<DatabricksConfig, ConfigError> {
    let host = raw.host.as_ref().ok_or_else(|| {
        at.error(
            raw.source.span(),
            &format!("{key}.host"),
            "source \"databricks\" needs `host` (the workspace URL)",
        )
    })?;
    let h = host.get_ref().trim_end_matches('/');
    if !(h.starts_with("https://") || h.starts_with("http://")) {
        return Err(at.error(
            host.span(),
            &format!("{key}.host"),
            "must start with https:// (or http:// for a local test server)",
        ));
    }
    let duration =
        |field: &Option<Spanned<String>>, name: &str, env: Option<&str>, default: Duration| {
            if let Some(v) = env.and_then(|e| std::env::var(e).ok()) {
                return humantime::parse_duration(&v).map_err(|e| {
                    at.error(
                        raw.source.span(),
                        &format!("{key}.{name}"),
                        &format!("${}: {e}", env.unwrap_or_default()),
                    )
                });
            }
            match field {
                Some(s) => humantime::parse_duration(s.get_ref()).map_err(|e| {
                    at.error(
                        s.span(),
                        &format!("{key}.{name}"),
                        &format!("{e} (write e.g. \"10m\" or \"90s\")"),
                    )
                }),
                None => Ok(default),
            }
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
        let span = raw
            .lifetime
            .as_ref()
            .map_or(raw.source.span(), |s| s.span());
        return Err(at.error(span, &format!("{key}.lifetime"), &format!(
            "lifetime ({}) must be longer than rotate_every ({}), or tokens expire before they are replaced",
            humantime::format_duration(lifetime), humantime::format_duration(rotate_every))));
    }
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    Ok(DatabricksConfig {
        host: h.to_owned(),
        initial_env: raw.initial_env.clone(),
        rotate_every,
        lifetime,
        revoke_grace: duration(&raw.revoke_grace, "revoke_grace", None, Duration::ZERO)?,
        comment: raw
            .comment
            .clone()
            .unwrap_or_else(|| format!("tokenfs-rotated:{hostname}")),
        cleanup_orphans: raw.cleanup_orphans.unwrap_or(false),
        timeout: duration(&raw.timeout, "timeout", None, Duration::from_secs(30))?,
    })
}

fn validate_mount(
    spanned: &Spanned<RawMount>,
    key: &str,
    credentials: &BTreeMap<String, SourceConfig>,
    at: &Locator<'_>,
) -> Result<Vec<MountConfig>, ConfigError> {
    let raw = spanned.get_ref();
    let dir = match &raw.dir {
        Some(d) => {
            let dir = expand_home(d.get_ref());
            if !dir.is_absolute() {
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
                return Err(at.error(d.span(), &format!("{key}.dir"), &why));
            }
            Some(dir)
        }
        None if raw.preset.is_some() => None,
        None => {
            return Err(at.error(
                spanned.span(),
                &format!("{key}.dir"),
                "missing `dir` (or a `preset`)",
            ));
        }
    };
    let mut files: Vec<ManagedConfig> = Vec::new();
    for (j, file) in raw.file.iter().enumerate() {
        let fkey = format!("{key}.file[{j}]");
        let f = validate_file(file.get_ref(), &fkey, credentials, at)?;
        if files.iter().any(|o| o.path == f.path) {
            return Err(at.error(
                file.get_ref().path.span(),
                &format!("{fkey}.path"),
                "listed twice in this mount",
            ));
        }
        files.push(f);
    }
    let Some(preset) = &raw.preset else {
        let dir = dir.unwrap_or_default();
        return Ok(vec![MountConfig {
            dir,
            allow_other: raw.allow_other,
            files,
            notes: Vec::new(),
        }]);
    };
    let credential = raw
        .credential
        .as_ref()
        .map_or("databricks", |c| c.get_ref().as_str());
    if !credentials.contains_key(credential) {
        let span = raw.credential.as_ref().map_or(preset.span(), |c| c.span());
        return Err(at.error(
            span,
            &format!("{key}.credential"),
            &format!("unknown credential `{credential}` (define it in [credentials.{credential}])"),
        ));
    }
    let opts = crate::preset::Options {
        credential: credential.to_owned(),
        dir,
        create: raw.create,
        profile: raw.profile.clone(),
        providers: raw.providers.clone(),
        oauth: raw.oauth,
    };
    let expanded = crate::preset::expand(preset.get_ref(), &opts)
        .map_err(|e| at.error(preset.span(), &format!("{key}.preset"), &e))?;
    let mut mounts: Vec<MountConfig> = expanded
        .into_iter()
        .map(|m| MountConfig {
            dir: m.dir,
            allow_other: raw.allow_other,
            files: m.files,
            notes: m.notes,
        })
        .collect();
    // Files listed next to a preset join its first mount.
    if let Some(first) = mounts.first_mut() {
        first
            .files
            .retain(|f| !files.iter().any(|o| o.path == f.path));
        first.files.extend(files);
    }
    Ok(mounts)
}

fn validate_file(
    raw: &RawFile,
    key: &str,
    credentials: &BTreeMap<String, SourceConfig>,
    at: &Locator<'_>,
) -> Result<ManagedConfig, ConfigError> {
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
        return Err(at.error(
            raw.path.span(),
            &format!("{key}.path"),
            "must be a relative path inside the mount dir (no '..', no leading '/')",
        ));
    }
    let format = match &raw.format {
        Some(f) => f.get_ref().parse::<Format>().map_err(|e| at.error(f.span(), &format!("{key}.format"), &e.to_string()))?,
        None => guess_format(&path).ok_or_else(|| at.error(raw.path.span(), &format!("{key}.format"),
            "cannot tell the format from the file name: set format = \"yaml\" | \"json\" | \"toml\" | \"dotenv\" | \"ini\" | \"raw\""))?,
    };
    let mut bindings = Vec::new();
    for (k, v) in &raw.bind {
        let bkey = format!("{key}.bind.\"{}\"", k.get_ref());
        let keypath: KeyPath = k
            .get_ref()
            .parse()
            .map_err(|e| at.error(k.span(), &bkey, &format!("bad key path: {e}")))?;
        let (slot, prefix, suffix) = match v.get_ref() {
            RawBind::Slot(s) => (s.as_str(), String::new(), String::new()),
            RawBind::Full {
                slot,
                prefix,
                suffix,
            } => (slot.as_str(), prefix.clone(), suffix.clone()),
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
        bindings.push(Binding {
            prefix,
            suffix,
            ..Binding::new(keypath, slot.to_string())
        });
    }
    Ok(ManagedConfig {
        path,
        format,
        bindings,
        create: raw.create,
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
    origins: &[(Range<usize>, String, String)],
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
    for (other, (_, key, written)) in earlier.iter().zip(origins) {
        if other.dir == canon {
            return Err(format!(
                "{shown} is the same directory as {key}.dir (\"{written}\"): list it once"
            ));
        }
        let (outer, inner, outer_key) = if canon.starts_with(&other.dir) {
            (&other.dir, &canon, key.as_str())
        } else if other.dir.starts_with(&canon) {
            (&canon, &other.dir, "this mount")
        } else {
            continue;
        };
        let rel = inner.strip_prefix(outer).unwrap_or(inner);
        return Err(format!(
            "{shown} and {key}.dir (\"{written}\") are nested: {} is inside {}; mounts cannot be nested, so mount only {} ({outer_key}) and list the files below it by relative path, e.g. path = \"{}/config.yaml\"",
            inner.display(),
            outer.display(),
            outer.display(),
            rel.display()
        ));
    }
    Ok(canon)
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
        Config::parse(Path::new("t.toml"), text)
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
        assert!(d.comment.starts_with("tokenfs-rotated:"));
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

    #[test]
    fn formats_are_guessed_from_names() {
        assert_eq!(guess_format(Path::new(".env")), Some(Format::Dotenv));
        assert_eq!(guess_format(Path::new("auth.json")), Some(Format::Json));
        assert_eq!(guess_format(Path::new(".databrickscfg")), Some(Format::Ini));
        assert_eq!(guess_format(Path::new("token")), None);
    }
}
