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
