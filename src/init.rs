//! `tokenfs init`: inspects the agents' existing files, shows what tokenfs
//! would manage (fingerprints only), and with `--yes` writes `tokenfs.toml`
//! and moves `~/.databrickscfg` behind a symlink.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::expand_home;
use crate::preset::{self, Options};
use crate::render::{self, placeholder};
use crate::secret::Secret;

pub struct Args {
    pub presets: Vec<String>,
    pub credential: String,
    pub output: PathBuf,
    pub yes: bool,
    pub force: bool,
}

pub fn run(args: &Args) -> Result<(), String> {
    let mut report = String::new();
    let mut databricks = false;
    for name in &args.presets {
        let opts = Options {
            credential: args.credential.clone(),
            ..Options::default()
        };
        let mounts = preset::expand(name, &opts)?;
        let _ = writeln!(report, "{name}:");
        for m in &mounts {
            for f in &m.files {
                describe_file(&mut report, &m.dir, f);
            }
            for n in &m.notes {
                let _ = writeln!(report, "  note: {n}");
            }
        }
        databricks |= name == "databricks";
    }
    print!("{report}");
    let config = config_text(args);
    println!("\nPlan:\n  write {}", args.output.display());
    let link = expand_home("~/.databrickscfg");
    let target = preset::databricks_dir().join(".databrickscfg");
    let move_cfg =
        databricks && std::fs::read_link(&link).ok().as_deref() != Some(target.as_path());
    if move_cfg {
        println!(
            "  move {} to {} and leave a symlink in its place",
            link.display(),
            target.display()
        );
    }
    if !args.yes {
        println!("\nNothing changed. Run again with --yes to do this.");
        return Ok(());
    }
    if args.output.exists() && !args.force {
        return Err(format!(
            "{} exists: pass --force to overwrite it",
            args.output.display()
        ));
    }
    std::fs::write(&args.output, config)
        .map_err(|e| format!("writing {}: {e}", args.output.display()))?;
    if move_cfg {
        move_databrickscfg(&link, &target)?;
    }
    println!(
        "\nDone. Start it with: tokenfs mount --config {}",
        args.output.display()
    );
    Ok(())
}

fn describe_file(out: &mut String, dir: &Path, f: &crate::config::ManagedConfig) {
    let path = dir.join(&f.path);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(_) => {
            let what = if f.create {
                "will be created"
            } else {
                "absent: managed once a program creates it"
            };
            let _ = writeln!(out, "  {} ({what})", path.display());
            return;
        }
    };
    let _ = writeln!(out, "  {} ({})", path.display(), f.format);
    for b in &f.bindings {
        let shown = match render::lookup(f.format, &text, &b.key) {
            Some(v) if v.contains(&placeholder(&b.slot)) => "already a placeholder".to_string(),
            Some(v) => {
                let tok = v
                    .strip_prefix(b.prefix.as_str())
                    .and_then(|v| v.strip_suffix(b.suffix.as_str()))
                    .unwrap_or(&v);
                format!(
                    "token {} → placeholder for {}",
                    Secret::new(tok).fingerprint(),
                    b.slot
                )
            }
            None if b.insert => format!("missing → inserted for {}", b.slot),
            None => "missing → left alone".to_string(),
        };
        let _ = writeln!(out, "    {}: {shown}", b.key);
    }
}

fn config_text(args: &Args) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `tokenfs init`. Start with: tokenfs mount --config {}",
        args.output.display()
    );
    let _ = writeln!(s, "\n[credentials.{}]", args.credential);
    let _ = writeln!(
        s,
        "source = \"push\"                  # or \"databricks\" with host = \"https://…\" to rotate PATs here"
    );
    let _ = writeln!(
        s,
        "initial_env = \"DATABRICKS_TOKEN\"  # a token found in the files also becomes the first value"
    );
    for p in &args.presets {
        let _ = writeln!(
            s,
            "\n[[mount]]\npreset = \"{p}\"\ncredential = \"{}\"",
            args.credential
        );
    }
    s
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
