//! Built-in descriptions of the agents' config files, so a user writes
//! `preset = "hermes"` instead of paths, formats and key paths.
//!
//! A preset looks at the files as they are (before mounting) to decide
//! which keys hold the token: Hermes fallback providers that point at the
//! same gateway, Claude's OTEL header lists, Codex's API-key or ChatGPT-login
//! `auth.json`, OpenCode providers with literal keys. Everything else in a
//! file is the user's and is never touched.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{ManagedConfig, expand_home};
use crate::render::{Binding, Format, KeyPath, Kind};

pub const NAMES: [&str; 7] = [
    "hermes",
    "claude",
    "codex",
    "gemini",
    "opencode",
    "databricks",
    "pi",
];

/// The knobs a `[[mount]] preset = …` table may set.
#[derive(Debug, Clone, Default)]
pub struct Options {
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
pub struct Mount {
    pub dir: PathBuf,
    pub files: Vec<ManagedConfig>,
    /// Things the user should know (shown in `status` and by `init`).
    pub notes: Vec<String>,
}

pub fn expand(name: &str, o: &Options) -> Result<Vec<Mount>, String> {
    let mounts = expand_direct(name, o)?;
    Ok(match &o.via_proxy {
        Some(via) => mounts
            .into_iter()
            .map(|m| through_proxy(m, o, via))
            .collect(),
        None => mounts,
    })
}

fn expand_direct(name: &str, o: &Options) -> Result<Vec<Mount>, String> {
    match name {
        "hermes" => Ok(vec![hermes(o)]),
        "claude" => Ok(vec![claude(o)]),
        "codex" => Ok(vec![codex(o)]),
        "gemini" => Ok(vec![gemini(o)]),
        "opencode" => Ok(opencode(o)),
        "databricks" => Ok(vec![databricks(o)]),
        "pi" => Ok(vec![pi(o)]),
        other => Err(format!(
            "unknown preset \"{other}\" (expected one of {})",
            NAMES.join(", ")
        )),
    }
}

/// Where each agent keeps its base URL next to its key: the key's last
/// segment → the URL's.
const URL_BESIDE_KEY: [(&str, &str); 8] = [
    ("api_key", "base_url"),                        // Hermes config.yaml
    ("ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"), // Claude settings.json env
    ("OPENAI_API_KEY", "OPENAI_BASE_URL"),          // Codex .env
    ("GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL"),   // Gemini .env
    ("apiKey", "baseURL"),                          // OpenCode provider options
    ("token", "host"),                              // ~/.databrickscfg
    ("DATABRICKS_TOKEN", "DATABRICKS_HOST"),
    ("GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"),
];

/// Rewrites a mount for `via_proxy`: each key whose file also has (or may
/// insert) the base URL beside it shows the proxy's local key, and the URL
/// the proxy's URL (with the path beyond the upstream kept). A base URL
/// that points elsewhere keeps its key and URL as they are (noted); keys
/// with no URL beside them (OTEL headers) keep the real token.
fn through_proxy(mut m: Mount, o: &Options, via: &ViaProxy) -> Mount {
    let token_slot = format!("{}.token", o.credential);
    let key_slot = format!("proxy.{}.token", via.name);
    let url_slot = format!("proxy.{}.url", via.name);
    let url_ph = crate::render::placeholder(&url_slot);
    let upstream = via.upstream.trim_end_matches('/');
    for f in &mut m.files {
        let text = read(&m.dir, &f.path.to_string_lossy()).unwrap_or_default();
        let mut urls = Vec::new();
        for b in f
            .bindings
            .iter_mut()
            .filter(|b| b.slot == token_slot && b.prefix.is_empty())
        {
            let Some((last, parents)) = b.key.segments().split_last() else {
                continue;
            };
            let Some((_, url_key)) = URL_BESIDE_KEY.iter().find(|(k, _)| k == last) else {
                continue;
            };
            let mut segs: Vec<String> = parents.to_vec();
            segs.push((*url_key).to_owned());
            let url_path = KeyPath::from_segments(segs);
            let suffix = match crate::render::lookup(f.format, &text, &url_path) {
                // The agent would send the local key to its default upstream.
                None if !b.insert => {
                    m.notes.push(format!(
                        "via_proxy: {} sets no {url_path}; that key keeps the real token (set it to the upstream's URL to route it through the proxy)",
                        f.path.display()
                    ));
                    continue;
                }
                None => default_url_path(b.key.segments(), upstream),
                Some(v) => match v.strip_prefix(&url_ph).or_else(|| v.strip_prefix(upstream)) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.to_owned(),
                    _ => {
                        m.notes.push(format!(
                            "via_proxy: {} {} points elsewhere than the proxy's upstream; that key keeps the real token",
                            f.path.display(),
                            url_path
                        ));
                        continue;
                    }
                },
            };
            // A Secret: a real token found or written there is adopted by
            // the proxy's credential (`Adopt::target`), never lost.
            b.slot = key_slot.clone();
            urls.push(Binding {
                suffix,
                kind: Kind::Value,
                insert: b.insert,
                ..Binding::new(url_path, url_slot.clone())
            });
        }
        f.bindings.extend(urls);
    }
    m
}

/// The base URL an agent uses when its file sets none, by the key's path:
/// a missing URL key then renders as the proxy's URL plus that URL's path
/// beyond the upstream (Codex's `https://api.openai.com/v1` under the
/// upstream `https://api.openai.com` → `PROXY/v1`), so requests keep
/// their paths.
fn default_base_url(key: &[String]) -> Option<&'static str> {
    const ANTHROPIC: &str = "https://api.anthropic.com";
    const GEMINI: &str = "https://generativelanguage.googleapis.com";
    let last = key.last().map(String::as_str)?;
    match (key.len(), key.first().map(String::as_str), last) {
        (_, _, "ANTHROPIC_AUTH_TOKEN" | "ANTHROPIC_API_KEY") => Some(ANTHROPIC),
        (_, _, "OPENAI_API_KEY") => Some("https://api.openai.com/v1"),
        (_, _, "GEMINI_API_KEY" | "GOOGLE_API_KEY") => Some(GEMINI),
        // OpenCode's providers (the AI SDK's defaults).
        (4, Some("provider"), "apiKey") => match key[1].as_str() {
            "anthropic" => Some("https://api.anthropic.com/v1"),
            "openai" => Some("https://api.openai.com/v1"),
            "google" => Some("https://generativelanguage.googleapis.com/v1beta"),
            _ => None,
        },
        _ => None,
    }
}

/// The path a missing base URL key renders after the proxy's URL: the
/// agent's default URL's path beyond the upstream, when it lies under it.
fn default_url_path(key: &[String], upstream: &str) -> String {
    default_base_url(key)
        .and_then(|d| d.strip_prefix(upstream))
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .unwrap_or_default()
        .to_owned()
}

/// The base URLs a mount's files set beside `credential`'s keys (for
/// `init --via-proxy` to pick a proxy's upstream), or the agents' defaults
/// where a file sets none.
pub fn base_urls(m: &Mount, credential: &str) -> Vec<String> {
    let token_slot = format!("{credential}.token");
    let mut urls = Vec::new();
    for f in &m.files {
        let text = read(&m.dir, &f.path.to_string_lossy()).unwrap_or_default();
        for b in f.bindings.iter().filter(|b| b.slot == token_slot) {
            let Some((last, parents)) = b.key.segments().split_last() else {
                continue;
            };
            let Some((_, url_key)) = URL_BESIDE_KEY.iter().find(|(k, _)| k == last) else {
                continue;
            };
            let mut segs: Vec<String> = parents.to_vec();
            segs.push((*url_key).to_owned());
            let found = crate::render::lookup(f.format, &text, &KeyPath::from_segments(segs))
                .filter(|v| v.starts_with("https://") || v.starts_with("http://"));
            urls.extend(found.or_else(|| default_base_url(b.key.segments()).map(str::to_owned)));
        }
    }
    urls
}

fn dir_of(o: &Options, env: Option<&str>, default: &str) -> PathBuf {
    if let Some(d) = &o.dir {
        return d.clone();
    }
    match env.and_then(std::env::var_os) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => expand_home(default),
    }
}

fn key(s: &str) -> KeyPath {
    // Preset key paths are literals that always parse.
    s.parse()
        .unwrap_or_else(|_| KeyPath::from_segments(vec![s.to_owned()]))
}

fn segs(parts: &[&str]) -> KeyPath {
    KeyPath::from_segments(parts.iter().map(|p| (*p).to_owned()).collect())
}

fn bind(k: KeyPath, o: &Options, field: &str, insert: bool) -> Binding {
    Binding {
        insert,
        ..Binding::new(k, format!("{}.{field}", o.credential))
    }
}

fn file(path: &str, format: Format, bindings: Vec<Binding>, o: &Options) -> ManagedConfig {
    ManagedConfig {
        path: PathBuf::from(path),
        format,
        bindings,
        create: o.create,
        replace: o.replace,
        max_size: crate::config::DEFAULT_MAX_FILE_SIZE,
    }
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok()
}

fn read_json(dir: &Path, name: &str) -> Option<Value> {
    read(dir, name).and_then(|t| serde_json::from_str(&t).ok())
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1") || host.starts_with("127.")
}

/// `~/.hermes/config.yaml`: `model.api_key`, plus `api_key` of every
/// fallback provider on the same gateway or a loopback proxy; `.env` keys
/// holding the same token.
fn hermes(o: &Options) -> Mount {
    let dir = dir_of(o, Some("HERMES_HOME"), "~/.hermes");
    let mut bindings = vec![bind(key("model.api_key"), o, "token", true)];
    let text = read(&dir, "config.yaml").unwrap_or_default();
    let doc = saphyr_first(&text);
    let gateway = doc
        .as_ref()
        .and_then(|d| yaml_str(d, &["model", "base_url"]));
    let current = doc
        .as_ref()
        .and_then(|d| yaml_str(d, &["model", "api_key"]));
    if let Some(list) = doc
        .as_ref()
        .and_then(|d| d.as_mapping_get("fallback_providers"))
        .and_then(|l| l.as_sequence())
    {
        for (i, entry) in list.iter().enumerate() {
            let url = entry
                .as_mapping_get("base_url")
                .and_then(|u| u.as_str())
                .unwrap_or("");
            if gateway.as_deref() == Some(url) || is_loopback(url) {
                bindings.push(bind(
                    segs(&["fallback_providers", &i.to_string(), "api_key"]),
                    o,
                    "token",
                    true,
                ));
            }
        }
    }
    let mut files = vec![file("config.yaml", Format::Yaml, bindings, o)];
    if let (Some(env), Some(tok)) = (read(&dir, ".env"), current.filter(|t| !t.is_empty())) {
        let keys: Vec<Binding> = dotenv_keys_with_value(&env, &tok)
            .into_iter()
            .map(|k| bind(key(&k), o, "token", false))
            .collect();
        if !keys.is_empty() {
            files.push(file(".env", Format::Dotenv, keys, o));
        }
    }
    Mount {
        dir,
        files,
        notes: Vec::new(),
    }
}

fn saphyr_first(text: &str) -> Option<saphyr::YamlOwned> {
    use saphyr::LoadableYamlNode;
    saphyr::YamlOwned::load_from_str(text)
        .ok()?
        .into_iter()
        .next()
}

fn yaml_str(doc: &saphyr::YamlOwned, path: &[&str]) -> Option<String> {
    let mut v = doc;
    for p in path {
        v = v.as_mapping_get(p)?;
    }
    v.as_str().map(str::to_owned)
}

fn dotenv_keys_with_value(text: &str, value: &str) -> Vec<String> {
    dotenvy::from_read_iter(text.as_bytes())
        .flatten()
        .filter(|(_, v)| v == value)
        .map(|(k, _)| k)
        .collect()
}

const OTEL_HEADERS: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
    "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
];

/// `~/.claude/settings.json`: `env.ANTHROPIC_AUTH_TOKEN` and the bearer
/// token inside OTEL header lists; left alone when `apiKeyHelper` is set.
fn claude(o: &Options) -> Mount {
    let dir = dir_of(o, Some("CLAUDE_CONFIG_DIR"), "~/.claude");
    let settings = read_json(&dir, "settings.json");
    let mut files = Vec::new();
    let mut notes = Vec::new();
    if settings
        .as_ref()
        .and_then(|s| s.get("apiKeyHelper"))
        .is_some()
    {
        notes.push("settings.json sets apiKeyHelper: Claude Code asks that helper for tokens, so tokenfs leaves the file alone (point the helper at `tokenfs token NAME`)".into());
    } else {
        let mut bindings = vec![bind(
            segs(&["env", "ANTHROPIC_AUTH_TOKEN"]),
            o,
            "token",
            true,
        )];
        for var in OTEL_HEADERS {
            let value = settings
                .as_ref()
                .and_then(|s| s.get("env"))
                .and_then(|e| e.get(var))
                .and_then(Value::as_str);
            if let Some((prefix, suffix)) = value.and_then(bearer_split) {
                bindings.push(Binding {
                    prefix,
                    suffix,
                    ..bind(segs(&["env", var]), o, "token", false)
                });
            }
        }
        files.push(file("settings.json", Format::Json, bindings, o));
    }
    if o.oauth {
        let b = |k: &str, f: &str| bind(segs(&["claudeAiOauth", k]), o, f, false);
        let mut bindings = vec![
            b("accessToken", "access_token"),
            b("refreshToken", "refresh_token"),
        ];
        if o.oauth_source {
            // Claude refreshes on its own 5 min before expiresAt: it must
            // see the expiry of the session tokenfs serves.
            bindings.push(Binding {
                kind: Kind::Number,
                ..b("expiresAt", "expires_at_ms")
            });
        } else {
            notes.push(".credentials.json: expiresAt is kept as the CLI wrote it (source = \"oauth\" serves it)".into());
        }
        files.push(file(".credentials.json", Format::Json, bindings, o));
    }
    Mount { dir, files, notes }
}

/// Splits an OTEL header list around the token of `Authorization=Bearer <token>`.
fn bearer_split(list: &str) -> Option<(String, String)> {
    const MARK: &str = "Authorization=Bearer ";
    let start = list.find(MARK)? + MARK.len();
    let end = list[start..].find(',').map_or(list.len(), |i| start + i);
    (end > start).then(|| (list[..start].to_owned(), list[end..].to_owned()))
}

/// `~/.codex/.env` `OPENAI_API_KEY`, and `auth.json`: the API key, or the
/// ChatGPT-login tokens. `config.toml` is never touched.
fn codex(o: &Options) -> Mount {
    let dir = dir_of(o, Some("CODEX_HOME"), "~/.codex");
    let mut files = vec![file(
        ".env",
        Format::Dotenv,
        vec![bind(key("OPENAI_API_KEY"), o, "token", true)],
        o,
    )];
    let auth = read_json(&dir, "auth.json");
    let api_key = auth
        .as_ref()
        .and_then(|a| a.get("OPENAI_API_KEY"))
        .is_some_and(Value::is_string);
    let chatgpt = auth
        .as_ref()
        .and_then(|a| a.get("tokens"))
        .is_some_and(Value::is_object);
    let bindings = if chatgpt && !api_key {
        let mut b: Vec<Binding> = ["access_token", "refresh_token", "id_token"]
            .iter()
            .map(|f| bind(segs(&["tokens", f]), o, f, false))
            .collect();
        if o.oauth_source {
            for (k, f) in [
                (segs(&["tokens", "account_id"]), "account_id"),
                (key("last_refresh"), "last_refresh"),
            ] {
                b.push(Binding {
                    kind: Kind::Value,
                    ..bind(k, o, f, false)
                });
            }
        }
        b
    } else {
        vec![bind(key("OPENAI_API_KEY"), o, "token", false)]
    };
    files.push(file("auth.json", Format::Json, bindings, o));
    Mount {
        dir,
        files,
        notes: Vec::new(),
    }
}

/// `~/.gemini/.env` `GEMINI_API_KEY` (unquoted: Node's dotenv keeps quotes).
fn gemini(o: &Options) -> Mount {
    let dir = dir_of(o, None, "~/.gemini");
    let files = vec![file(
        ".env",
        Format::Dotenv,
        vec![bind(key("GEMINI_API_KEY"), o, "token", true)],
        o,
    )];
    Mount {
        dir,
        files,
        notes: Vec::new(),
    }
}

/// `opencode.json` provider keys and bearer headers, and the `api` entries
/// of `auth.json` for the same provider ids (OAuth entries never).
fn opencode(o: &Options) -> Vec<Mount> {
    let config_dir = dir_of(o, None, "~/.config/opencode");
    let data_dir = match std::env::var_os("XDG_DATA_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("opencode"),
        _ => expand_home("~/.local/share/opencode"),
    };
    let cfg = read_json(&config_dir, "opencode.json");
    let auth = read_json(&data_dir, "auth.json");
    let providers = cfg
        .as_ref()
        .and_then(|c| c.get("provider"))
        .and_then(Value::as_object);
    let literal = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .is_some_and(|s| !s.starts_with("{env:") && !s.starts_with("{file:"))
    };
    let ids: Vec<String> = match &o.providers {
        Some(ids) => ids.clone(),
        None => providers
            .map(|p| {
                p.iter()
                    .filter(|(_, v)| literal(v.pointer("/options/apiKey")))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut bindings = Vec::new();
    for id in &ids {
        let p = providers.and_then(|p| p.get(id));
        if literal(p.and_then(|p| p.pointer("/options/apiKey"))) {
            bindings.push(bind(
                segs(&["provider", id, "options", "apiKey"]),
                o,
                "token",
                false,
            ));
        }
        if let Some(h) = p
            .and_then(|p| p.pointer("/options/headers/Authorization"))
            .and_then(Value::as_str)
        {
            if h.starts_with("Bearer ") {
                bindings.push(Binding {
                    prefix: "Bearer ".into(),
                    ..bind(
                        segs(&["provider", id, "options", "headers", "Authorization"]),
                        o,
                        "token",
                        false,
                    )
                });
            }
        }
    }
    let auth_bindings: Vec<Binding> = ids
        .iter()
        .filter(|id| {
            auth.as_ref()
                .and_then(|a| a.get(id.as_str()))
                .and_then(|e| e.get("type"))
                .and_then(Value::as_str)
                == Some("api")
        })
        .map(|id| bind(segs(&[id, "key"]), o, "token", false))
        .collect();
    // `opencode auth login` keeps the key in auth.json only: which entries
    // share the credential is the user's call, never guessed.
    let unbound: Vec<&String> = auth
        .as_ref()
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter(|(id, e)| {
                    e.get("type").and_then(Value::as_str) == Some("api") && !ids.contains(id)
                })
                .map(|(id, _)| id)
                .collect()
        })
        .unwrap_or_default();
    let mut notes = Vec::new();
    if o.providers.is_none() && !unbound.is_empty() {
        let list: Vec<String> = unbound.iter().map(|id| format!("\"{id}\"")).collect();
        notes.push(format!(
            "auth.json holds API keys of {} that no opencode.json provider names as apiKey: not managed; add providers = [{}] to the mount to serve them",
            list.join(", "),
            list.join(", ")
        ));
    }
    let mut mounts = vec![Mount {
        dir: config_dir,
        files: vec![file("opencode.json", Format::Json, bindings, o)],
        notes,
    }];
    if !auth_bindings.is_empty() {
        mounts.push(Mount {
            dir: data_dir,
            files: vec![file("auth.json", Format::Json, auth_bindings, o)],
            notes: Vec::new(),
        });
    }
    mounts
}

/// The directory that serves `~/.databrickscfg` (which lives directly in
/// `$HOME`, and `$HOME` must not be mounted over).
pub fn databricks_dir() -> PathBuf {
    expand_home("~/.local/share/tokenfs/databricks")
}

/// `~/.databrickscfg`: `token` of one profile; other sections untouched.
fn databricks(o: &Options) -> Mount {
    let dir = o.dir.clone().unwrap_or_else(databricks_dir);
    let profile = o.profile.clone().unwrap_or_else(|| "DEFAULT".into());
    let k = KeyPath::from_segments(vec![profile, "token".into()]);
    let files = vec![file(
        ".databrickscfg",
        Format::Ini,
        vec![bind(k, o, "token", true)],
        o,
    )];
    let link = expand_home("~/.databrickscfg");
    let target = dir.join(".databrickscfg");
    let mut notes = Vec::new();
    if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
        notes.push(format!(
            "{} is not a symlink to {}: run `tokenfs init --preset databricks --yes`, or set DATABRICKS_CONFIG_FILE={}",
            link.display(),
            target.display(),
            target.display()
        ));
    }
    Mount { dir, files, notes }
}

/// `~/.pi/agent/models.json` `providers.<id>.apiKey`, except `!command` values.
fn pi(o: &Options) -> Mount {
    let dir = dir_of(o, None, "~/.pi/agent");
    let models = read_json(&dir, "models.json");
    let providers = models
        .as_ref()
        .and_then(|m| m.get("providers"))
        .and_then(Value::as_object);
    let ids: Vec<String> = match &o.providers {
        Some(ids) => ids.clone(),
        None => providers
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default(),
    };
    let bindings = ids
        .iter()
        .filter(|id| {
            let v = providers
                .and_then(|p| p.get(id.as_str()))
                .and_then(|p| p.get("apiKey"))
                .and_then(Value::as_str);
            v.is_some_and(|v| !v.starts_with('!'))
        })
        .map(|id| bind(segs(&["providers", id, "apiKey"]), o, "token", false))
        .collect();
    Mount {
        dir,
        files: vec![file("models.json", Format::Json, bindings, o)],
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_found_inside_header_lists() {
        assert_eq!(
            bearer_split("Authorization=Bearer abc"),
            Some(("Authorization=Bearer ".into(), String::new()))
        );
        assert_eq!(
            bearer_split("x-a=1,Authorization=Bearer abc,x-b=2"),
            Some(("x-a=1,Authorization=Bearer ".into(), ",x-b=2".into()))
        );
        assert_eq!(bearer_split("x-a=1"), None);
    }

    /// A missing base URL renders as the proxy's URL plus the agent's
    /// default path under the upstream, so requests keep their paths.
    #[test]
    fn a_missing_base_url_keeps_the_agents_default_path() {
        let k = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let openai = "https://api.openai.com";
        assert_eq!(default_url_path(&k(&["OPENAI_API_KEY"]), openai), "/v1");
        assert_eq!(
            default_url_path(
                &k(&["provider", "anthropic", "options", "apiKey"]),
                "https://api.anthropic.com"
            ),
            "/v1"
        );
        assert_eq!(
            default_url_path(
                &k(&["env", "ANTHROPIC_AUTH_TOKEN"]),
                "https://api.anthropic.com"
            ),
            ""
        );
        // Not under the upstream (a gateway): the proxy's URL as it is.
        assert_eq!(
            default_url_path(&k(&["OPENAI_API_KEY"]), "https://adb-1.net"),
            ""
        );
        assert_eq!(
            default_url_path(&k(&["OPENAI_API_KEY"]), "https://api.openai.co"),
            ""
        );
    }

    #[test]
    fn loopback_urls() {
        assert!(is_loopback("http://127.0.0.1:8080/v1"));
        assert!(is_loopback("http://localhost/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
    }
}
