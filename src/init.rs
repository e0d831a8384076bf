//! `tokenfs init`: inspects the agents' existing files, shows what tokenfs
//! would manage (fingerprints only), and with `--yes` writes `tokenfs.toml`
//! and moves `~/.databrickscfg` behind a symlink.
//!
//! Keys are grouped by value: files holding the same token share one
//! credential, and each different token gets its own, named after what it
//! is (`databricks` for `dapi…`, `anthropic` for `sk-ant-…`, `openai`,
//! `gemini`, else the preset). Nothing is merged that differs.
//!
//! Safe to run again and to interrupt: a move of `~/.databrickscfg` cut
//! short is finished on the next run, and a config identical to the one it
//! would write is not an error.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{ManagedConfig, expand_home};
use crate::preset::{self, Options};
use crate::render::{self, placeholder};
use crate::secret::Secret;

pub struct Args {
    pub presets: Vec<String>,
    /// The credential for presets whose files hold no key yet.
    pub credential: String,
    pub output: PathBuf,
    pub yes: bool,
    pub force: bool,
    /// Route every agent through a loopback proxy per credential, so their
    /// files hold a local key and the proxy's URL instead of the token.
    pub via_proxy: bool,
}

/// One preset's plan: which credential it shows, and the keys found.
struct Planned {
    preset: String,
    credential: String,
    /// A dotfiles-managed `~/.databrickscfg`: the file the link names.
    databricks_file: Option<PathBuf>,
    /// The base URLs its agents use beside the key (set, or their default).
    urls: Vec<String>,
}

/// `--via-proxy`: the proxy one credential's agents go through.
struct ProxyPlan {
    credential: String,
    /// The origin of the first base URL its agents use.
    upstream: String,
    header: &'static str,
}

/// One distinct token found, and where.
struct Group {
    credential: String,
    value: Secret,
    places: Vec<String>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let link = expand_home("~/.databrickscfg");
    let target = preset::databricks_dir().join(".databrickscfg");
    finish_interrupted_move(&link, &target)?;
    let mut report = String::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut plans = Vec::new();
    for name in &args.presets {
        plans.push(plan_preset(name, args, &link, &mut groups, &mut report)?);
    }
    print!("{report}");
    let proxies = if args.via_proxy {
        plan_proxies(&plans)
    } else {
        Vec::new()
    };
    let config = config_text(args, &plans, &groups, &proxies);
    let move_cfg = plans
        .iter()
        .any(|p| p.preset == "databricks" && p.databricks_file.is_none())
        && std::fs::read_link(&link).ok().as_deref() != Some(target.as_path());
    print_plan(
        args,
        &groups,
        &proxies,
        move_cfg.then_some((&link, &target)),
    );
    println!(
        "\nWhile tokenfs is mounted, the files on disk hold placeholders (__tokenfs:NAME.token__)\n\
         and the tokens live in its memory; the originals are backed up (0600) under\n\
         ~/.local/state/tokenfs/originals/. To go back: tokenfs unmount --restore."
    );
    if !args.yes {
        println!("\nNothing changed. Run again with --yes to do this.");
        return Ok(());
    }
    write_config(&args.output, &config, args.force)?;
    if move_cfg {
        move_databrickscfg(&link, &target)?;
    }
    println!(
        "\nDone. Start it with: tokenfs mount --config {}",
        args.output.display()
    );
    Ok(())
}

/// What `--yes` would do: credentials (fingerprints only), proxies, the
/// config written, the move of `~/.databrickscfg`.
fn print_plan(
    args: &Args,
    groups: &[Group],
    proxies: &[ProxyPlan],
    moved: Option<(&PathBuf, &PathBuf)>,
) {
    println!("\nPlan:");
    for g in groups {
        println!(
            "  credential {} = {} (from {})",
            g.credential,
            g.value.fingerprint(),
            g.places.join(", ")
        );
    }
    for p in proxies {
        println!(
            "  proxy {0}: 127.0.0.1 (a free port) → {1}; the agents' files show its URL and a local key, never the token",
            p.credential, p.upstream
        );
    }
    println!("  write {}", args.output.display());
    if let Some((link, target)) = moved {
        println!(
            "  move {} to {} and leave a symlink in its place",
            link.display(),
            target.display()
        );
    }
}

/// Expands one preset, reports its files, and assigns its credential by
/// the value its files hold.
fn plan_preset(
    name: &str,
    args: &Args,
    link: &Path,
    groups: &mut Vec<Group>,
    report: &mut String,
) -> Result<Planned, String> {
    let databricks_file = (name == "databricks")
        .then(|| dotfiles_target(link))
        .flatten();
    let opts = Options {
        credential: "CRED".into(),
        dir: databricks_file
            .as_ref()
            .and_then(|f| f.parent().map(Path::to_owned)),
        ..Options::default()
    };
    let mut mounts = preset::expand(name, &opts)?;
    let urls = mounts
        .iter()
        .flat_map(|m| preset::base_urls(m, "CRED"))
        .collect();
    if let (Some(file), Some(m)) = (&databricks_file, mounts.first_mut()) {
        for f in &mut m.files {
            f.path = file.file_name().map(PathBuf::from).unwrap_or_default();
        }
        m.notes.clear();
    }
    let mut values = describe_mounts(name, &mounts, report);
    if values.len() > 1 {
        let fps: Vec<String> = values.iter().map(Secret::fingerprint).collect();
        return Err(format!(
            "the {name} preset's files hold {} different keys ({}): tokenfs will not merge them into one credential; bind those files by hand with [[mount.file]] tables, one credential per key",
            values.len(),
            fps.join(", ")
        ));
    }
    let credential = match values.pop() {
        Some(v) => group_of(groups, v, name),
        None => args.credential.clone(),
    };
    if let Some(g) = groups.iter_mut().find(|g| g.credential == credential) {
        g.places.push(name.to_owned());
    }
    Ok(Planned {
        preset: name.to_owned(),
        credential,
        databricks_file,
        urls,
    })
}

/// Reports a preset's files and returns the distinct tokens they hold.
fn describe_mounts(name: &str, mounts: &[preset::Mount], report: &mut String) -> Vec<Secret> {
    let _ = writeln!(report, "{name}:");
    let mut values: Vec<Secret> = Vec::new();
    for m in mounts {
        for f in &m.files {
            for v in describe_file(report, &m.dir, f) {
                if !values.contains(&v) {
                    values.push(v);
                }
            }
        }
        // The databricks preset's one note (not yet a symlink) is what
        // this plan's move takes care of.
        if name != "databricks" {
            for n in &m.notes {
                let _ = writeln!(report, "  note: {n}");
            }
        }
    }
    values
}

/// One proxy per credential whose agents name a base URL (in their files,
/// or by default): its upstream is that URL's origin, so each agent keeps
/// its own path beyond it. A credential with none is noted and its agents
/// keep the token.
fn plan_proxies(plans: &[Planned]) -> Vec<ProxyPlan> {
    let mut out: Vec<ProxyPlan> = Vec::new();
    for p in plans {
        if out.iter().any(|x| x.credential == p.credential) {
            continue;
        }
        let origin = plans
            .iter()
            .filter(|q| q.credential == p.credential)
            .flat_map(|q| &q.urls)
            .find_map(|u| reqwest::Url::parse(u).ok())
            .map(|u| u.origin().ascii_serialization())
            .filter(|o| o != "null");
        match origin {
            Some(upstream) => out.push(ProxyPlan {
                credential: p.credential.clone(),
                upstream,
                header: header_of(&p.credential),
            }),
            None => println!(
                "note: no base URL is known for credential {} (its files name none): no proxy; add a [[proxy]] by hand",
                p.credential
            ),
        }
    }
    out
}

/// How the upstream takes the key, by what the credential is.
fn header_of(credential: &str) -> &'static str {
    match credential.split('-').next() {
        Some("anthropic") => "x-api-key",
        Some("gemini") => "x-goog-api-key",
        _ => "authorization_bearer",
    }
}

/// The credential of `value`: an existing group's, or a new one named
/// after the token's kind (unique among the groups).
fn group_of(groups: &mut Vec<Group>, value: Secret, preset: &str) -> String {
    if let Some(g) = groups.iter().find(|g| g.value == value) {
        return g.credential.clone();
    }
    let base = kind_of(value.expose_str()).unwrap_or(preset);
    let credential = (1..)
        .map(|n| {
            if n == 1 {
                base.to_owned()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|c| !groups.iter().any(|g| &g.credential == c))
        .unwrap_or_else(|| base.to_owned());
    groups.push(Group {
        credential: credential.clone(),
        value,
        places: Vec::new(),
    });
    credential
}

/// What a token is, from its well-known prefix.
fn kind_of(token: &str) -> Option<&'static str> {
    [
        ("dapi", "databricks"),
        ("sk-ant-", "anthropic"),
        ("sk-", "openai"),
        ("AIza", "gemini"),
    ]
    .into_iter()
    .find(|(p, _)| token.starts_with(p))
    .map(|(_, k)| k)
}

/// A `~/.databrickscfg` that is the user's own symlink (dotfiles) to a file
/// elsewhere: that file is served where it is, so the link keeps working.
fn dotfiles_target(link: &Path) -> Option<PathBuf> {
    let to = std::fs::read_link(link).ok()?;
    let to = if to.is_absolute() {
        to
    } else {
        link.parent()?.join(to)
    };
    let to = std::fs::canonicalize(to).ok()?;
    let ours = std::fs::canonicalize(preset::databricks_dir()).ok();
    (to.parent() != ours.as_deref() && to.is_file()).then_some(to)
}

/// Prints each bound key of a file and returns the tokens found there.
fn describe_file(out: &mut String, dir: &Path, f: &ManagedConfig) -> Vec<Secret> {
    let path = dir.join(&f.path);
    let Ok(text) = std::fs::read_to_string(&path) else {
        let what = if f.create {
            "will be created"
        } else {
            "absent: managed once a program creates it"
        };
        let _ = writeln!(out, "  {} ({what})", path.display());
        return Vec::new();
    };
    let _ = writeln!(out, "  {} ({})", path.display(), f.format);
    let mut found = Vec::new();
    for b in &f.bindings {
        let shown = match render::lookup(f.format, &text, &b.key) {
            Some(v) if v.contains(&placeholder(&b.slot)) => "already a placeholder".to_string(),
            Some(v) => {
                let tok = v
                    .strip_prefix(b.prefix.as_str())
                    .and_then(|v| v.strip_suffix(b.suffix.as_str()))
                    .unwrap_or(&v);
                let secret = Secret::new(tok);
                match crate::source::plausible(&secret, crate::source::DEFAULT_MIN_LENGTH) {
                    Ok(()) => {
                        let s = format!("token {} → placeholder", secret.fingerprint());
                        found.push(secret);
                        s
                    }
                    Err(_) => format!(
                        "{} is not a token → the credential is shown there (original backed up)",
                        secret.fingerprint()
                    ),
                }
            }
            None if b.insert => "missing → inserted".to_string(),
            None => "missing → left alone".to_string(),
        };
        let _ = writeln!(out, "    {}: {shown}", b.key);
    }
    found
}

fn config_text(args: &Args, plans: &[Planned], groups: &[Group], proxies: &[ProxyPlan]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `tokenfs init`. Start with: tokenfs mount --config {}\n\
         # While mounted, the files on disk hold placeholders and the tokens live in\n\
         # memory; `tokenfs unmount --restore` writes them back.",
        args.output.display()
    );
    let credentials: std::collections::BTreeSet<&str> =
        plans.iter().map(|p| p.credential.as_str()).collect();
    for c in credentials {
        let _ = writeln!(s, "\n[credentials.{c}]");
        let _ = writeln!(
            s,
            "source = \"push\"   # a token found in the files is its first value"
        );
        if c == "databricks" {
            let _ = writeln!(
                s,
                "initial_env = \"DATABRICKS_TOKEN\"  # or source = \"databricks\" with host = \"https://…\" to rotate PATs here"
            );
        }
    }
    for p in proxies {
        let _ = writeln!(
            s,
            "\n[[proxy]]\nname = \"{0}\"\nlisten = \"127.0.0.1:0\"   # a free port: the agents' files show the actual URL\nupstream = \"{1}\"\ncredential = \"{0}\"\nheader = \"{2}\"",
            p.credential, p.upstream, p.header
        );
    }
    for p in plans {
        mount_text(&mut s, p, groups, proxies);
    }
    s
}

/// One plan's `[[mount]]`: its preset, or a dotfiles `~/.databrickscfg`
/// served where it lives.
fn mount_text(s: &mut String, p: &Planned, groups: &[Group], proxies: &[ProxyPlan]) {
    let shared = groups
        .iter()
        .find(|g| g.credential == p.credential)
        .is_some_and(|g| g.places.len() > 1);
    let _ = writeln!(s, "\n[[mount]]");
    match &p.databricks_file {
        Some(file) => {
            let dir = file.parent().unwrap_or(Path::new("/"));
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "# ~/.databrickscfg links here (dotfiles): served where it is\ndir = \"{}\"\n[[mount.file]]\npath = \"{name}\"\nformat = \"ini\"\nbind = {{ \"DEFAULT.token\" = \"{}.token\" }}",
                dir.display(),
                p.credential
            );
        }
        None => {
            let _ = writeln!(
                s,
                "preset = \"{}\"\ncredential = \"{}\"",
                p.preset, p.credential
            );
        }
    }
    if p.databricks_file.is_none() && proxies.iter().any(|x| x.credential == p.credential) {
        let _ = writeln!(s, "via_proxy = \"{}\"", p.credential);
    }
    if shared || p.credential == "databricks" {
        let _ = writeln!(
            s,
            "replace = true   # this key is the credential's: a newer value takes over (the file is backed up first)"
        );
    }
}

/// Writes the config; an identical existing one is fine, a different one
/// needs `--force`.
fn write_config(path: &Path, text: &str, force: bool) -> Result<(), String> {
    match std::fs::read_to_string(path) {
        Ok(existing) if existing == text => return Ok(()),
        Ok(_) if !force => {
            return Err(format!(
                "{} exists and differs from this plan: pass --force to overwrite it",
                path.display()
            ));
        }
        _ => {}
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A run killed between moving `~/.databrickscfg` and linking it leaves
/// the file moved and no link: put the link in place.
fn finish_interrupted_move(link: &Path, target: &Path) -> Result<(), String> {
    if link.symlink_metadata().is_err() && target.is_file() {
        std::os::unix::fs::symlink(target, link)
            .map_err(|e| format!("symlinking {}: {e}", link.display()))?;
        println!(
            "note: an earlier run was interrupted; {} is linked to {} again",
            link.display(),
            target.display()
        );
    }
    Ok(())
}

/// `~/.databrickscfg` lives in `$HOME`, which must not be mounted over: the
/// file moves into tokenfs's directory and a symlink takes its place.
fn move_databrickscfg(link: &Path, target: &Path) -> Result<(), String> {
    let dir = target.parent().ok_or("bad target")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if link.symlink_metadata().is_ok() {
        if target.exists() {
            return Err(format!(
                "{} already exists; move {} yourself",
                target.display(),
                link.display()
            ));
        }
        if std::fs::rename(link, target).is_err() {
            std::fs::copy(link, target).map_err(|e| format!("copying {}: {e}", link.display()))?;
            std::fs::remove_file(link).map_err(|e| format!("removing {}: {e}", link.display()))?;
        }
    }
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| format!("symlinking {}: {e}", link.display()))?;
    Ok(())
}
