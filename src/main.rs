//! The `tokenfs` command line: parses arguments and dispatches.

use std::io::{IsTerminal, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use tokenfs::config::{self, Config, ConfigFile};
use tokenfs::control::{self, Request};

#[derive(Parser)]
#[command(
    name = "tokenfs",
    version,
    about = "Serve AI-CLI config files with always-current tokens, from memory, over FUSE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Append logs to this file (created 0600) instead of standard error.
    #[arg(long, global = true, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

/// Where the control socket is: `--socket`, else the one a config names,
/// else the default.
#[derive(clap::Args)]
struct Target {
    /// The daemon's config (to find its control socket).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control socket (default: $XDG_RUNTIME_DIR/tokenfs/control.sock or ~/.local/state/tokenfs/control.sock).
    #[arg(long, env = "TOKENFS_SOCKET")]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Mount every directory in the config and serve until all are unmounted.
    Mount {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect the agents' files and write a tokenfs.toml for them.
    Init {
        /// Comma-separated: hermes, claude, codex, gemini, opencode, databricks, pi.
        #[arg(long, value_delimiter = ',', required = true)]
        preset: Vec<String>,
        /// The credential the files show.
        #[arg(long, default_value = "databricks")]
        credential: String,
        /// Where to write the config.
        #[arg(long, short, default_value = "tokenfs.toml")]
        output: PathBuf,
        /// Write the config and move ~/.databrickscfg (without it, only show the plan).
        #[arg(long)]
        yes: bool,
        /// Overwrite an existing config.
        #[arg(long)]
        force: bool,
        /// Route the agents through a loopback proxy per credential: their
        /// files then hold the proxy's URL and a local key, never the token.
        #[arg(long)]
        via_proxy: bool,
    },
    /// Check what mounting needs (FUSE, fusermount3, permissions, stale mounts) and say what to fix.
    Doctor {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config without mounting anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show credentials (fingerprints only), mounts and the last errors.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
        /// For scripts: print the daemon's pid and exit 0 only if every mount is live (else a one-line reason and exit 1).
        #[arg(long, conflicts_with = "json")]
        ready: bool,
    },
    /// Publish a new value for a credential, read from standard input.
    Set {
        name: String,
        /// token, access_token, refresh_token or id_token.
        #[arg(long, default_value = "token")]
        field: String,
        #[command(flatten)]
        target: Target,
    },
    /// Ask a credential's source to mint a new token now.
    Rotate {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Detach mounts (all, or the DIRs named). With --restore, first write the
    /// current tokens into the files on disk, so every CLI keeps working
    /// without tokenfs (while mounted, the files on disk hold placeholders).
    Unmount {
        dirs: Vec<PathBuf>,
        #[arg(long)]
        restore: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Take over an OAuth session from a CLI's file (validated by a refresh
    /// before it is served; clears relogin_required).
    Import {
        name: String,
        /// claude (~/.claude/.credentials.json), codex ($CODEX_HOME/auth.json)
        /// or hermes-codex (~/.hermes/auth.json, providers.openai-codex).
        #[arg(long)]
        from: String,
        /// The file to read (default: the CLI's own).
        file: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
    /// Print a credential's current secret (for apiKeyHelper-style hooks).
    Token {
        name: String,
        #[arg(long, default_value = "token")]
        field: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print a shell completion script (e.g. `tokenfs completions bash > /etc/bash_completion.d/tokenfs`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `tokenfs man > tokenfs.1`.
    Man,
}

/// Logs go to standard error (coloured only on a terminal) or, with
/// `--log-file`, are appended to a 0600 file without colour.
fn init_logging(log_file: Option<&Path>) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            // An existing file keeps its mode on open: tighten it.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot make {} owner-only: {e}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn socket_of(target: &Target) -> Result<PathBuf, String> {
    if let Some(s) = &target.socket {
        return Ok(s.clone());
    }
    match &target.config {
        Some(c) => ConfigFile::load(c)
            .map(|c| c.socket().to_owned())
            .map_err(|e| e.to_string()),
        None => Ok(config::default_socket()),
    }
}

/// One function per subcommand: `run` only dispatches.
fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Mount { config } => mount(&config),
        Command::Init {
            preset,
            credential,
            output,
            yes,
            force,
            via_proxy,
        } => tokenfs::init::run(&tokenfs::init::Args {
            presets: preset,
            credential,
            output,
            yes,
            force,
            via_proxy,
        }),
        Command::Doctor { config } => doctor(config.as_deref()),
        Command::Check { config } => check(&config),
        Command::Status {
            target,
            json,
            ready,
        } => status(&target, json, ready),
        Command::Set {
            name,
            field,
            target,
        } => set(&name, field, &target),
        Command::Rotate { name, target } => rotate(&name, &target),
        Command::Unmount {
            dirs,
            restore,
            target,
        } => unmount(dirs, restore, &target),
        Command::Import {
            name,
            from,
            file,
            target,
        } => import(&name, &from, file, &target),
        Command::Token {
            name,
            field,
            target,
        } => token(name, field, &target),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "tokenfs", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| format!("writing the man page: {e}")),
    }
}

/// The config the daemon runs: the file, then its presets (which read the
/// agents' files to see what they hold).
fn load_config(path: &Path) -> Result<Config, String> {
    tokenfs::preset::load_config(path).map_err(|e| e.to_string())
}

fn mount(config: &Path) -> Result<(), String> {
    let config = load_config(config)?;
    tokenfs::daemon::run(config)
}

fn doctor(config: Option<&Path>) -> Result<(), String> {
    let config = config.map(load_config).transpose()?;
    let checks = tokenfs::doctor::run(config.as_ref());
    for c in &checks {
        if c.ok {
            println!("ok   {}", c.what);
        } else {
            println!("FIX  {}\n     → {}", c.what, c.fix);
        }
    }
    match checks.iter().filter(|c| !c.ok).count() {
        0 => Ok(()),
        n => Err(format!("{n} problem(s) found")),
    }
}

/// Validates a config as `mount` would, without mounting.
fn check(config: &Path) -> Result<(), String> {
    let c = load_config(config)?;
    // What `mount` would refuse first.
    if let Some(m) = c.mounts.iter().find(|m| !m.dir.is_dir()) {
        return Err(format!(
            "mount dir {} does not exist: mkdir -p {}",
            m.dir.display(),
            m.dir.display()
        ));
    }
    let files: usize = c.mounts.iter().map(|m| m.files.len()).sum();
    println!(
        "{}: ok ({}, {}, {}{})",
        config.display(),
        plural(c.credentials.len(), "credential", "credentials"),
        plural(c.mounts.len(), "mount", "mounts"),
        plural(files, "managed file", "managed files"),
        match c.proxies.len() {
            0 => String::new(),
            n => format!(", {}", plural(n, "proxy", "proxies")),
        },
    );
    Ok(())
}

fn status(target: &Target, json: bool, ready: bool) -> Result<(), String> {
    let v = control::call(&socket_of(target)?, &Request::Status)?;
    if json && !ready {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let s: control::Status =
        serde_json::from_value(v).map_err(|e| format!("unexpected status reply: {e}"))?;
    if !ready {
        print!("{}", control::render_status(&s));
        return Ok(());
    }
    // `--ready`: the pid, and success only once every mount is live.
    println!("{}", s.pid);
    if s.mounts.is_empty() {
        return Err("the daemon serves no mounts".into());
    }
    match s
        .mounts
        .iter()
        .find(|m| m.state != "live" && m.state != "files")
    {
        Some(m) => Err(format!("mount {} is {}", m.dir.display(), m.state)),
        None => Ok(()),
    }
}

/// Reads the secret from stdin (never from argv, where `ps` shows it).
fn set(name: &str, field: String, target: &Target) -> Result<(), String> {
    let mut secret = String::new();
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("paste the secret for {name}, then press Enter and Ctrl-D:");
    }
    std::io::stdin()
        .read_to_string(&mut secret)
        .map_err(|e| format!("reading the secret from stdin: {e}"))?;
    if secret.trim().is_empty() {
        return Err(
            "no secret on standard input (usage: printf %s \"$TOKEN\" | tokenfs set NAME)".into(),
        );
    }
    let v = control::call(
        &socket_of(target)?,
        &Request::Set {
            name: name.to_owned(),
            field: Some(field),
            secret,
        },
    )?;
    eprintln!("{name}: published generation {}", v["generation"]);
    Ok(())
}

fn rotate(name: &str, target: &Target) -> Result<(), String> {
    let v = control::call(
        &socket_of(target)?,
        &Request::Rotate {
            name: name.to_owned(),
        },
    )?;
    eprintln!("{name}: rotated, generation {}", v["generation"]);
    Ok(())
}

fn token(name: String, field: String, target: &Target) -> Result<(), String> {
    let v = control::call(
        &socket_of(target)?,
        &Request::Token {
            name,
            field: Some(field),
        },
    )?;
    println!("{}", v["secret"].as_str().unwrap_or_default());
    Ok(())
}

fn import(name: &str, from: &str, file: Option<PathBuf>, target: &Target) -> Result<(), String> {
    use tokenfs::source::oauth;
    let path = match file {
        Some(f) => f,
        None => oauth::default_import_path(from)?,
    };
    let shown = path.display().to_string();
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    let parsed = oauth::parse_session(from, &bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    let session = parsed.map_err(|e| format!("{shown}: {e}"))?;
    let text = |s: Option<tokenfs::secret::Secret>| s.map(|s| s.expose_str().to_owned());
    let refresh_token = text(session.refresh_token.clone()).unwrap_or_default();
    let v = control::call(
        &socket_of(target)?,
        &Request::Import {
            name: name.to_owned(),
            from: shown.clone(),
            refresh_token,
            access_token: text(session.access_token.clone()),
            id_token: text(session.id_token.clone()),
            account_id: text(session.account_id.clone()),
        },
    )?;
    eprintln!(
        "{name}: imported the session in {shown} (validated by a refresh), generation {}",
        v["generation"]
    );
    Ok(())
}

fn unmount(dirs: Vec<PathBuf>, restore: bool, target: &Target) -> Result<(), String> {
    let dirs: Vec<PathBuf> = dirs
        .into_iter()
        .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
        .collect();
    let v = control::call(&socket_of(target)?, &Request::Unmount { dirs, restore })?;
    match v["restored"].as_u64() {
        _ if !restore => {}
        Some(0) | None => println!(
            "restored no key: no bound key has a value yet, so the files keep their placeholders (the originals are under ~/.local/state/tokenfs/originals/)"
        ),
        Some(n) => println!("restored {n} key(s): the files on disk hold the current tokens"),
    }
    let gone: Vec<PathBuf> = v["unmounted"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while gone
        .iter()
        .any(|d| tokenfs::mounts::tokenfs_at(d).is_some())
    {
        if std::time::Instant::now() > deadline {
            return Err("the daemon accepted, but a mount is still there after 5 s".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for d in &gone {
        println!("unmounted {}", d.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_file = cli.log_file.clone();
    if let Err(e) = init_logging(log_file.as_deref()) {
        eprintln!("tokenfs: {e}");
        return ExitCode::FAILURE;
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log_file.is_some() {
                tracing::error!("{e}");
            }
            eprintln!("tokenfs: {e}");
            ExitCode::FAILURE
        }
    }
}
