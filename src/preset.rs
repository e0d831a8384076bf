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

use crate::config::{Config, ConfigError, ConfigFile, ManagedConfig, expand_home};
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

/// What `expand` is given and returns (defined with the config they come
/// from, so the config never needs this module).
pub use crate::config::{PresetMount as Mount, PresetOptions as Options, ViaProxy};

/// The presets as the config's resolution step sees them.
pub struct Agents;

impl crate::config::Presets for Agents {
    fn expand(&self, name: &str, o: &Options) -> Result<Vec<Mount>, String> {
        expand(name, o)
    }
}

/// The config the daemon runs from `path`: parsed, then resolved with
/// these presets (which read the agents' files).
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    ConfigFile::load(path)?.resolve(&Agents)
}

/// [`load_config`] of a config's text (`path` names it in errors).
pub fn parse_config(path: &Path, text: &str) -> Result<Config, ConfigError> {
    ConfigFile::parse(path, text)?.resolve(&Agents)
}

pub fn expand(name: &str, o: &Options) -> Result<Vec<Mount>, String> {
    let mounts = expand_direct(name, o)?;
    Ok(match &o.via_proxy {
        Some(via) if name == "codex" => mounts
            .into_iter()
            .map(|m| codex_through_proxy(m, o, via))
            .collect(),
        Some(via) if name == "opencode" => opencode_through_proxy(mounts, o, via),
        Some(via) => mounts
            .into_iter()
            .map(|m| through_proxy(m, o, via))
            .collect(),
        None => mounts,
    })
}

/// The suffix of `url` beyond the proxy's upstream (or beyond the proxy's
/// URL placeholder, once the file shows it), or `None` for a URL elsewhere.
fn beyond_upstream(url: &str, url_ph: &str, upstream: &str) -> Option<String> {
    match url
        .strip_prefix(url_ph)
        .or_else(|| url.strip_prefix(upstream))
    {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => Some(rest.to_owned()),
        _ => None,
    }
}

/// Codex's built-in provider's default base URL (`openai_base_url` unset).
const CODEX_OPENAI_URL: &str = "https://api.openai.com/v1";

/// What a Codex provider routed through the proxy needs: where its base URL
/// is, the suffix to keep, and where its key comes from.
struct CodexRoute {
    url_key: KeyPath,
    suffix: String,
    /// The URL key is absent (the built-in default): insert it.
    insert: bool,
    /// The key is auth.json's `OPENAI_API_KEY` (`requires_openai_auth`).
    openai_auth: bool,
    /// `env_key = "NAME"`: the key is that variable (Codex loads `.env`).
    env_key: Option<String>,
    /// `experimental_bearer_token` of the provider, a literal key.
    bearer: Option<KeyPath>,
}

/// Codex (0.171) takes its base URL from `config.toml` only: a
/// `[model_providers.ID]` table's `base_url`, or `openai_base_url` for the
/// built-in `openai` provider (`OPENAI_BASE_URL` is ignored). Each provider
/// whose URL is on the proxy's upstream is routed: its URL shows the
/// proxy's, and its key (auth.json's `OPENAI_API_KEY`, its `env_key` in
/// `.env`, or `experimental_bearer_token`) the local key.
fn codex_routes(doc: &toml::Table, url_ph: &str, upstream: &str) -> (Vec<CodexRoute>, Vec<String>) {
    let (mut routes, mut elsewhere) = (Vec::new(), Vec::new());
    let builtin = doc.get("openai_base_url").and_then(toml::Value::as_str);
    if let Some(suffix) = beyond_upstream(builtin.unwrap_or(CODEX_OPENAI_URL), url_ph, upstream) {
        routes.push(CodexRoute {
            url_key: key("openai_base_url"),
            suffix,
            insert: builtin.is_none(),
            openai_auth: true,
            env_key: None,
            bearer: None,
        });
    }
    let providers = doc.get("model_providers").and_then(toml::Value::as_table);
    for (id, p) in providers.into_iter().flatten() {
        let Some(url) = p.get("base_url").and_then(toml::Value::as_str) else {
            continue;
        };
        let Some(suffix) = beyond_upstream(url, url_ph, upstream) else {
            elsewhere.push(id.clone());
            continue;
        };
        let flag = |k: &str| p.get(k).and_then(toml::Value::as_bool).unwrap_or(false);
        routes.push(CodexRoute {
            url_key: segs(&["model_providers", id, "base_url"]),
            suffix,
            insert: false,
            openai_auth: flag("requires_openai_auth"),
            env_key: p
                .get("env_key")
                .and_then(toml::Value::as_str)
                .map(str::to_owned),
            bearer: p
                .get("experimental_bearer_token")
                .is_some_and(toml::Value::is_str)
                .then(|| segs(&["model_providers", id, "experimental_bearer_token"])),
        });
    }
    (routes, elsewhere)
}

/// `via_proxy` for Codex: see [`codex_routes`]. Keys no routed provider
/// uses keep the real token; ChatGPT-login tokens are never proxied.
fn codex_through_proxy(mut m: Mount, o: &Options, via: &ViaProxy) -> Mount {
    let key_slot = format!("proxy.{}.token", via.name);
    let url_slot = format!("proxy.{}.url", via.name);
    let url_ph = crate::render::placeholder(&url_slot);
    let upstream = via.upstream.trim_end_matches('/');
    let text = read(&m.dir, "config.toml").unwrap_or_default();
    let doc: toml::Table = toml::from_str(&text).unwrap_or_default();
    let (routes, elsewhere) = codex_routes(&doc, &url_ph, upstream);
    for id in elsewhere {
        m.notes.push(format!(
            "via_proxy: config.toml model_providers.{id}.base_url points elsewhere than the proxy's upstream; its key keeps the real token"
        ));
    }
    let env_keys: Vec<&str> = routes.iter().filter_map(|r| r.env_key.as_deref()).collect();
    let openai_auth = routes.iter().any(|r| r.openai_auth);
    let token_slot = format!("{}.token", o.credential);
    for f in &mut m.files {
        codex_route_keys(f, &env_keys, openai_auth, &token_slot, &key_slot);
    }
    let mut bindings = Vec::new();
    for r in routes {
        bindings.push(Binding {
            suffix: r.suffix,
            kind: Kind::Value,
            insert: r.insert,
            ..Binding::new(r.url_key, url_slot.clone())
        });
        if let Some(k) = r.bearer {
            bindings.push(Binding::new(k, key_slot.clone()));
        }
    }
    if !bindings.is_empty() {
        m.files.push(file("config.toml", Format::Toml, bindings, o));
    }
    m
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
    ("OPENAI_API_KEY", "OPENAI_BASE_URL"),          // Hermes .env (Codex: see codex_routes)
    ("GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL"),   // Gemini .env
    ("apiKey", "baseURL"),                          // OpenCode provider options
    ("token", "host"),                              // ~/.databrickscfg
    ("DATABRICKS_TOKEN", "DATABRICKS_HOST"),
    ("GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"),
];

/// `via_proxy` for OpenCode: `opencode.json` as every preset (each
/// provider's `options.apiKey` beside its `options.baseURL`), and the
/// `auth.json` key of every provider whose `baseURL` is on the upstream
/// shows the local key too (OpenCode sends the config's key when both
/// exist, measured with 1.18.33, and auth.json's when the config has none:
/// then the config's `baseURL` shows the proxy's URL as well), so neither
/// file holds the upstream token.
fn opencode_through_proxy(mounts: Vec<Mount>, o: &Options, via: &ViaProxy) -> Vec<Mount> {
    let token_slot = format!("{}.token", o.credential);
    let key_slot = format!("proxy.{}.token", via.name);
    let url_slot = format!("proxy.{}.url", via.name);
    let url_ph = crate::render::placeholder(&url_slot);
    let upstream = via.upstream.trim_end_matches('/');
    let mut mounts: Vec<Mount> = mounts
        .into_iter()
        .map(|m| through_proxy(m, o, via))
        .collect();
    let Some((config, data)) = mounts.split_first_mut() else {
        return mounts;
    };
    let cfg = read_json(&config.dir, "opencode.json");
    let on_upstream = |id: &str| {
        cfg.as_ref()
            .and_then(|c| c.pointer(&format!("/provider/{id}/options/baseURL")))
            .and_then(Value::as_str)
            .and_then(|u| beyond_upstream(u, &url_ph, upstream))
    };
    let mut urls = Vec::new();
    for b in data
        .iter_mut()
        .flat_map(|m| m.files.iter_mut())
        .flat_map(|f| f.bindings.iter_mut())
    {
        let Some(id) = b.key.segments().first().cloned() else {
            continue;
        };
        if let (true, Some(suffix)) = (b.slot == token_slot, on_upstream(&id)) {
            b.slot = key_slot.clone();
            urls.push((id, suffix));
        }
    }
    if let Some(f) = config.files.first_mut() {
        for (id, suffix) in urls {
            let k = segs(&["provider", &id, "options", "baseURL"]);
            if !f.bindings.iter().any(|b| b.key.segments() == k.segments()) {
                f.bindings.push(Binding {
                    suffix,
                    kind: Kind::Value,
                    ..Binding::new(k, url_slot.clone())
                });
            }
        }
    }
    mounts
}

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

/// Points the keys of `f` that a routed Codex provider uses at the local
/// key (`.env` variables a provider's `env_key` names, inserted if absent;
/// auth.json's `OPENAI_API_KEY`); the others keep the real token, and are
/// never inserted.
fn codex_route_keys(
    f: &mut ManagedConfig,
    env_keys: &[&str],
    openai_auth: bool,
    token_slot: &str,
    key_slot: &str,
) {
    let name = f.path.to_string_lossy().into_owned();
    for b in f.bindings.iter_mut().filter(|b| b.slot == token_slot) {
        let last = b.key.segments().last().map(String::as_str).unwrap_or("");
        let routed = match name.as_str() {
            ".env" => env_keys.contains(&last),
            "auth.json" => openai_auth && last == "OPENAI_API_KEY",
            _ => false,
        };
        if routed {
            b.slot = key_slot.to_owned();
        } else {
            // Never add a real token the agent does not even use.
            b.insert = false;
        }
    }
    if name == ".env" {
        let missing: Vec<&&str> = env_keys
            .iter()
            .filter(|k| {
                !f.bindings
                    .iter()
                    .any(|b| b.key.segments() == [k.to_string()])
            })
            .collect();
        for k in missing {
            f.bindings.push(Binding {
                insert: true,
                ..Binding::new(key(k), key_slot.to_owned())
            });
        }
    }
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
    if o.oauth_source {
        return hermes_oauth(o, dir);
    }
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

/// Hermes fed by an OAuth session (`source = "oauth"`): its own copy of a
/// ChatGPT login in `auth.json` — `providers.openai-codex.{tokens.*,
/// last_refresh}` and the `credential_pool.openai-codex[]` entries Hermes
/// seeds from it (`source = "device_code"`; other entries are independent
/// accounts, never touched; with no pool yet, the entry Hermes will add
/// first) — when Hermes has such a login or `model.provider` says
/// `openai-codex`. `config.yaml` is left alone: no API key to serve. (For an
/// Anthropic login Hermes reads Claude Code's `.credentials.json` itself:
/// the `claude` preset with `oauth = true` serves it.)
fn hermes_oauth(o: &Options, dir: PathBuf) -> Mount {
    const P: &str = "openai-codex";
    let value = |k: KeyPath, f: &str| Binding {
        kind: Kind::Value,
        ..bind(k, o, f, false)
    };
    let mut bindings: Vec<Binding> = ["access_token", "refresh_token", "id_token"]
        .iter()
        .map(|f| bind(segs(&["providers", P, "tokens", f]), o, f, false))
        .collect();
    bindings.push(value(
        segs(&["providers", P, "tokens", "account_id"]),
        "account_id",
    ));
    bindings.push(value(
        segs(&["providers", P, "last_refresh"]),
        "last_refresh",
    ));
    let auth = read_json(&dir, "auth.json");
    let provider = saphyr_first(&read(&dir, "config.yaml").unwrap_or_default())
        .and_then(|d| yaml_str(&d, &["model", "provider"]));
    let has = |p: &str| auth.as_ref().and_then(|a| a.pointer(p)).is_some();
    if !(has("/providers/openai-codex") || provider.as_deref() == Some(P)) {
        // Not a ChatGPT login (an Anthropic one, say): nothing of Hermes'
        // own to serve.
        return Mount {
            dir,
            files: Vec::new(),
            notes: vec!["hermes over an OAuth credential serves auth.json's openai-codex login; this Hermes has none (model.provider is not openai-codex). For an Anthropic login Hermes reads Claude Code's .credentials.json: use the claude preset with oauth = true".into()],
        };
    }
    let pool = auth
        .as_ref()
        .and_then(|a| a.pointer("/credential_pool/openai-codex"))
        .and_then(Value::as_array);
    let entries: Vec<usize> = match pool {
        Some(list) => (0..list.len())
            .filter(|i| list[*i].get("source").and_then(Value::as_str) == Some("device_code"))
            .collect(),
        None => vec![0],
    };
    for i in entries.iter().map(usize::to_string) {
        let at = |k: &str| segs(&["credential_pool", P, &i, k]);
        bindings.push(bind(at("access_token"), o, "access_token", false));
        bindings.push(bind(at("refresh_token"), o, "refresh_token", false));
        bindings.push(value(at("last_refresh"), "last_refresh"));
    }
    Mount {
        dir,
        files: vec![file("auth.json", Format::Json, bindings, o)],
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
    let ids: Vec<String> = match &o.providers {
        Some(ids) => ids.clone(),
        None => providers
            .map(|p| {
                p.iter()
                    .filter(|(_, v)| opencode_literal(v.pointer("/options/apiKey")))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let bindings = ids
        .iter()
        .flat_map(|id| opencode_provider_bindings(id, providers.and_then(|p| p.get(id)), o))
        .collect();
    let api_key_in_auth = |id: &str| {
        auth.as_ref()
            .and_then(|a| a.get(id))
            .and_then(|e| e.get("type"))
            .and_then(Value::as_str)
            == Some("api")
    };
    let auth_bindings: Vec<Binding> = ids
        .iter()
        .filter(|id| api_key_in_auth(id))
        .map(|id| bind(segs(&[id, "key"]), o, "token", false))
        .collect();
    let mut mounts = vec![Mount {
        dir: config_dir,
        files: vec![file("opencode.json", Format::Json, bindings, o)],
        notes: opencode_unbound_note(auth.as_ref(), &ids, o),
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

/// A literal key (not `{env:…}` or `{file:…}`, which OpenCode resolves
/// itself).
fn opencode_literal(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| !s.starts_with("{env:") && !s.starts_with("{file:"))
}

/// A provider's literal `options.apiKey`, and a `Bearer` Authorization
/// header in its `options.headers`.
fn opencode_provider_bindings(id: &str, p: Option<&Value>, o: &Options) -> Vec<Binding> {
    let mut bindings = Vec::new();
    if opencode_literal(p.and_then(|p| p.pointer("/options/apiKey"))) {
        bindings.push(bind(
            segs(&["provider", id, "options", "apiKey"]),
            o,
            "token",
            false,
        ));
    }
    let header = p
        .and_then(|p| p.pointer("/options/headers/Authorization"))
        .and_then(Value::as_str);
    if header.is_some_and(|h| h.starts_with("Bearer ")) {
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
    bindings
}

/// `opencode auth login` keeps the key in auth.json only: which entries
/// share the credential is the user's call, never guessed.
fn opencode_unbound_note(auth: Option<&Value>, ids: &[String], o: &Options) -> Vec<String> {
    let unbound: Vec<String> = auth
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .filter(|(id, e)| {
                    e.get("type").and_then(Value::as_str) == Some("api") && !ids.contains(id)
                })
                .map(|(id, _)| format!("\"{id}\""))
                .collect()
        })
        .unwrap_or_default();
    if o.providers.is_some() || unbound.is_empty() {
        return Vec::new();
    }
    let list = unbound.join(", ");
    vec![format!(
        "auth.json holds API keys of {list} that no opencode.json provider names as apiKey: not managed; add providers = [{list}] to the mount to serve them"
    )]
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
    fn codex_providers_on_the_upstream_are_routed() {
        let doc: toml::Table = toml::from_str(
            "openai_base_url = \"https://gw.example.com/v1\"\n[model_providers.a]\nbase_url = \"https://gw.example.com/serving-endpoints/x\"\nenv_key = \"A_KEY\"\n[model_providers.b]\nbase_url = \"https://else.example.com/v1\"\nrequires_openai_auth = true\n[model_providers.c]\nbase_url = \"https://gw.example.com.evil/v1\"\n",
        )
        .unwrap_or_default();
        let (routes, elsewhere) = codex_routes(&doc, "__ph__", "https://gw.example.com");
        let got: Vec<(String, String, bool, Option<String>)> = routes
            .iter()
            .map(|r| {
                (
                    r.url_key.to_string(),
                    r.suffix.clone(),
                    r.openai_auth,
                    r.env_key.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("openai_base_url".into(), "/v1".into(), true, None),
                (
                    "model_providers.a.base_url".into(),
                    "/serving-endpoints/x".into(),
                    false,
                    Some("A_KEY".into())
                ),
            ]
        );
        assert_eq!(elsewhere, vec!["b".to_string(), "c".to_string()]);
        // Unset, the built-in provider goes to api.openai.com: routed (and
        // the URL inserted) only for a proxy in front of it.
        let (routes, _) = codex_routes(&toml::Table::new(), "__ph__", CODEX_OPENAI_URL);
        assert!(routes.len() == 1 && routes[0].insert);
        assert!(
            codex_routes(&toml::Table::new(), "__ph__", "https://gw.example.com")
                .0
                .is_empty()
        );
    }

    #[test]
    fn hermes_over_oauth_serves_only_an_openai_codex_login() {
        let tmp = match tempfile::tempdir() {
            Ok(t) => t,
            Err(e) => panic!("tempdir: {e}"),
        };
        let o = Options {
            credential: "chatgpt".into(),
            dir: Some(tmp.path().to_owned()),
            oauth_source: true,
            ..Options::default()
        };
        let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text).is_ok();
        assert!(write("config.yaml", "model:\n  provider: anthropic\n"));
        assert!(hermes(&o).files.is_empty());
        assert!(write("config.yaml", "model:\n  provider: openai-codex\n"));
        let m = hermes(&o);
        let keys: Vec<String> = m.files[0]
            .bindings
            .iter()
            .map(|b| b.key.to_string())
            .collect();
        assert_eq!(m.files[0].path, PathBuf::from("auth.json"));
        assert!(keys.contains(&"providers.openai-codex.tokens.refresh_token".to_string()));
        // No pool yet: the entry Hermes adds first.
        assert!(keys.contains(&"credential_pool.openai-codex.0.access_token".to_string()));
        // A pool: its device_code entries only.
        assert!(write(
            "auth.json",
            r#"{"providers":{"openai-codex":{}},"credential_pool":{"openai-codex":[{"source":"manual:api_key"},{"source":"device_code"}]}}"#
        ));
        let keys: Vec<String> = hermes(&o).files[0]
            .bindings
            .iter()
            .map(|b| b.key.to_string())
            .collect();
        assert!(keys.contains(&"credential_pool.openai-codex.1.refresh_token".to_string()));
        assert!(
            !keys
                .iter()
                .any(|k| k.starts_with("credential_pool.openai-codex.0."))
        );
    }

    #[test]
    fn loopback_urls() {
        assert!(is_loopback("http://127.0.0.1:8080/v1"));
        assert!(is_loopback("http://localhost/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
    }
}
