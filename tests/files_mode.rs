//! `mode = "files"`: the degraded mode without FUSE, over the same
//! scenarios: rotations rewrite the real file atomically, keeping mode and
//! owner, skipping unchanged bytes, keeping program edits, logging failures.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn files_config(s: &Scratch, dir: &Path) -> String {
    format!(
        "mode = \"files\"\n[credentials.other]\nsource = \"push\"\n{}",
        hermes_config(s, dir)
    )
}

fn wait_for(path: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while fs::read_to_string(path).unwrap_or_default() != want {
        assert!(
            Instant::now() < deadline,
            "{} never became the expected content",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rotations_rewrite_the_file_atomically_and_keep_mode_owner_and_edits() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let first = token("fm0", 36);
    let path = s.write("home/.hermes/config.yaml", &hermes_yaml(&first));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&path, Some(1), Some(1)).unwrap();
    let d = Daemon::start(&s, &files_config(&s, &dir), &[]);
    assert!(!is_mounted(&dir));
    let next = token("fm1", 50);
    d.set("databricks", &next);
    wait_for(&path, &hermes_yaml(&next));
    let m = fs::metadata(&path).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 1, 1));
    // Unchanged bytes are not rewritten.
    let ino = m.ino();
    d.set("other", "unrelated-token-000000000");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    // A program's edit survives the next rotation.
    let edited = hermes_yaml(&next).replace("max_turns: 60", "max_turns: 61 # edited");
    fs::write(&path, &edited).unwrap();
    let third = token("fm2", 40);
    d.set("databricks", &third);
    wait_for(&path, &edited.replace(&next, &third));
    // No temp file is left behind.
    let names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["config.yaml"]);
    assert!(
        d.status()["mounts"][0]["notes"]
            .to_string()
            .contains("tokens are written to disk")
    );
}

#[test]
fn a_failed_rewrite_is_logged_and_keeps_the_previous_file() {
    let s = Scratch::new();
    let fsdir = s.path("fs");
    let tmpfs = Tmpfs::mount(&fsdir, "1m");
    let dir = fsdir.join(".hermes");
    fs::create_dir_all(&dir).unwrap();
    let first = token("ro0", 36);
    let path = dir.join("config.yaml");
    fs::write(&path, hermes_yaml(&first)).unwrap();
    let d = Daemon::start(&s, &files_config(&s, &dir), &[]);
    tmpfs.remount_ro();
    d.set("databricks", &token("ro1", 36));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&first));
    let st = d.status();
    assert!(
        st["mounts"][0]["files"][0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("Read-only"),
        "{st}"
    );
    assert!(d.log_text().contains("ERROR"));
    drop(d);
}

#[test]
fn auto_mode_mounts_when_fuse_works() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(&token("auto", 36)));
    let cfg = format!("mode = \"auto\"\n{}", hermes_config(&s, &dir));
    let _d = Daemon::start(&s, &cfg, &[&dir]);
    assert!(is_mounted(&dir));
}

/// A config with `config.yaml` and `.env` in `dir`, both bound to
/// databricks.token, in files mode.
fn two_files_config(s: &Scratch, dir: &Path) -> String {
    format!(
        "{}[[mount.file]]\npath = \".env\"\nformat = \"dotenv\"\nbind = {{ \"API_KEY\" = \"databricks.token\" }}\n",
        files_config(s, dir)
    )
}

/// Files mode follows FUSE mode's rule: two different tokens for one
/// credential refuse the start, naming the file and key (never the
/// token), and no file is changed or backed up.
#[test]
fn two_different_keys_refuse_to_start_and_change_nothing() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let (first, second) = (token("fa", 36), token("fb", 36));
    let yaml = hermes_yaml(&first);
    let env = format!("API_KEY={second}\n# keep\n");
    s.write("home/.hermes/config.yaml", &yaml);
    s.write("home/.hermes/.env", &env);
    let cfg = s.write("tokenfs.toml", &two_files_config(&s, &dir));
    let out = std::process::Command::new(BIN)
        .args(["mount", "--config"])
        .arg(&cfg)
        .env("TOKENFS_STATE_DIR", s.path("state"))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".env") && err.contains("API_KEY"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!err.contains(&first) && !err.contains(&second), "{err}");
    assert_eq!(fs::read_to_string(dir.join("config.yaml")).unwrap(), yaml);
    assert_eq!(fs::read_to_string(dir.join(".env")).unwrap(), env);
    assert!(!s.path("state/originals").exists(), "nothing was backed up");
}

/// `none`, `x` or an empty value at a bound key is no token: replaced by
/// the credential's, after the file's original bytes are backed up; quotes,
/// `#` and backslashes everywhere else are kept byte for byte, also across
/// a program's edit and the next rotation.
#[test]
fn no_token_values_are_replaced_after_a_backup_and_other_bytes_survive() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let yaml = "# 'quoted' \"comment\" # more\nmodel:\n  api_key: none\n  note: \"a \\\"b\\\" # c \\\\ d\"\n  path: 'C:\\Users\\x'  # trailing\nagent:\n  max_turns: 60\n";
    let env = "API_KEY=x\nQUOTED=\"a \\\"b\\\" # c\"\nRAW='x\\y'\nHASH=abc#def\n";
    s.write("home/.hermes/config.yaml", yaml);
    s.write("home/.hermes/.env", env);
    let d = Daemon::start(&s, &two_files_config(&s, &dir), &[]);
    let first = token("fn0", 40);
    d.set("databricks", &first);
    wait_for(&dir.join("config.yaml"), &yaml.replace("none", &first));
    let env_now = env.replace("API_KEY=x", &format!("API_KEY={first}"));
    wait_for(&dir.join(".env"), &env_now);
    let originals = s
        .path("state/originals")
        .join(dir.strip_prefix("/").unwrap());
    assert_eq!(
        fs::read_to_string(originals.join("config.yaml")).unwrap(),
        yaml
    );
    assert_eq!(fs::read_to_string(originals.join(".env")).unwrap(), env);
    // A program's edit with more of the same survives the next rotation.
    let edited = format!("{env_now}NEW=\"q # \\\\ '\"\n");
    fs::write(dir.join(".env"), &edited).unwrap();
    let second = token("fn1", 40);
    d.set("databricks", &second);
    wait_for(&dir.join(".env"), &edited.replace(&first, &second));
    wait_for(&dir.join("config.yaml"), &yaml.replace("none", &second));
    assert!(!d.log_text().contains(&second), "a token in the log");
}
