//! Managed files through a real mount: rendering per open, rotation,
//! writes (in place and temp + rename), inode and mtime behaviour.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use common::*;

fn setup(initial: &str) -> (Scratch, std::path::PathBuf, Backing, Daemon) {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(initial));
    s.write("home/.hermes/notes.txt", "not managed\n");
    let backing = Backing::open(&dir);
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    (s, dir, backing, d)
}

#[test]
fn existing_token_is_adopted_and_replaced_by_a_placeholder_on_disk() {
    let first = token("first", 36);
    let (_s, dir, backing, d) = setup(&first);
    assert_eq!(
        fs::read_to_string(dir.join("config.yaml")).unwrap(),
        hermes_yaml(&first)
    );
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert!(!on_disk.contains(&first), "token on disk: {on_disk}");
    assert_eq!(on_disk, hermes_yaml("__tokenfs:databricks.token__"));
    let st = d.status();
    assert!(
        st["credentials"][0]["fields"]["token"]
            .as_str()
            .unwrap()
            .starts_with("dapi…")
    );
}

#[test]
fn each_open_sees_the_current_token_and_a_held_handle_keeps_its_snapshot() {
    let (_s, dir, _b, d) = setup(&token("a", 30));
    let path = dir.join("config.yaml");
    let mut held = fs::File::open(&path).unwrap();
    let before = fs::read_to_string(&path).unwrap();
    let next = token("b", 77);
    let shorter = token("c", 22);
    d.set("databricks", &next);
    // The next open sees the new token, with the right size.
    let after = fs::read_to_string(&path).unwrap();
    assert_eq!(after, hermes_yaml(&next));
    assert_eq!(fs::metadata(&path).unwrap().len(), after.len() as u64);
    // The handle opened before the rotation reads the old file, whole.
    let mut old = String::new();
    held.read_to_string(&mut old).unwrap();
    assert_eq!(old, before);
    // A shorter token next: fstat on the old (longer) handle must never
    // report less than it holds, or size-trusting readers truncate. (The
    // kernel answers a stat within the clock tick of the last lookup from its
    // cache, TTL 0 being counted in jiffies: wait one tick.)
    let mut long_held = fs::File::open(&path).unwrap();
    d.set("databricks", &shorter);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        long_held.metadata().unwrap().len(),
        after.len() as u64,
        "{}",
        d.log_text()
    );
    let mut long = String::new();
    long_held.read_to_string(&mut long).unwrap();
    assert_eq!(long, after);
    drop(long_held);
    held.seek(SeekFrom::Start(0)).unwrap();
    let mut again = String::new();
    held.read_to_string(&mut again).unwrap();
    assert_eq!(again, before);
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        hermes_yaml(&shorter).len() as u64
    );
}

#[test]
fn inode_is_stable_and_mtime_advances_with_every_generation() {
    let (_s, dir, _b, d) = setup(&token("a", 30));
    let path = dir.join("config.yaml");
    let m0 = fs::metadata(&path).unwrap();
    let mut last = m0.mtime() as i128 * 1_000_000_000 + m0.mtime_nsec() as i128;
    for i in 0..5 {
        d.set("databricks", &token(&format!("r{i}"), 40 + i));
        let m = fs::metadata(&path).unwrap();
        let ns = m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128;
        assert_eq!(m.ino(), m0.ino(), "inode changed on rotation");
        assert!(ns > last, "mtime did not advance: {ns} <= {last}");
        assert!(m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128 >= ns);
        last = ns;
    }
    // Writes keep the inode too.
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replace("max_turns: 60", "max_turns: 61")).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().ino(), m0.ino());
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn in_place_edit_persists_with_placeholders() {
    let tok = token("edit", 32);
    let (_s, dir, backing, _d) = setup(&tok);
    let path = dir.join("config.yaml");
    let edited = fs::read_to_string(&path)
        .unwrap()
        .replace("max_turns: 60", "max_turns: 90\n  # added by a human");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.write_all(edited.as_bytes()).unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert_eq!(
        on_disk,
        edited.replace(&tok, "__tokenfs:databricks.token__")
    );
}

#[test]
fn temp_file_and_rename_persists_and_keeps_the_managed_inode() {
    let tok = token("ren", 32);
    let (_s, dir, backing, _d) = setup(&tok);
    let path = dir.join("config.yaml");
    let ino = fs::metadata(&path).unwrap().ino();
    let edited = fs::read_to_string(&path)
        .unwrap()
        .replace("max_turns: 60", "max_turns: 75");
    let tmp = dir.join(".config.yaml.tmp.1234");
    fs::write(&tmp, &edited).unwrap();
    fs::rename(&tmp, &path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    assert!(!tmp.exists());
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert!(
        on_disk.contains("max_turns: 75") && !on_disk.contains(&tok),
        "{on_disk}"
    );
    assert!(backing.read(".config.yaml.tmp.1234").is_none());
}

#[test]
fn a_new_value_written_at_the_bound_key_is_adopted() {
    let (_s, dir, backing, d) = setup(&token("old", 32));
    let path = dir.join("config.yaml");
    let fresh = token("fresh", 48);
    fs::write(&path, hermes_yaml(&fresh)).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&fresh));
    let st = d.status();
    assert!(st["generation"].as_u64().unwrap() >= 2);
    assert!(
        !String::from_utf8(backing.read("config.yaml").unwrap())
            .unwrap()
            .contains(&fresh)
    );
}

#[test]
fn a_malformed_write_is_kept_as_written_and_logged() {
    let tok = token("bad", 32);
    let (_s, dir, backing, d) = setup(&tok);
    let path = dir.join("config.yaml");
    let broken = format!("model: [unclosed\n  api_key: {tok}\n");
    fs::write(&path, &broken).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), broken);
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert_eq!(
        on_disk,
        broken.replace(&tok, "__tokenfs:databricks.token__")
    );
    let st = d.status();
    let err = st["mounts"][0]["files"][0]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("not valid yaml"), "{st}");
    assert!(d.log_text().contains("kept as written"));
}

#[test]
fn unlink_and_recreate_a_managed_file() {
    let (_s, dir, _b, d) = setup(&token("u", 32));
    let path = dir.join("config.yaml");
    fs::remove_file(&path).unwrap();
    assert!(!path.exists());
    let tok = token("cur", 32);
    d.set("databricks", &tok);
    fs::write(&path, "model:\n  api_key: x\n").unwrap();
    // "x" is not plausible? It is a new value: adopted. Then rendering shows it.
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("model:\n  api_key: "), "{text}");
}

#[test]
fn passthrough_files_are_untouched() {
    let (_s, dir, backing, _d) = setup(&token("p", 32));
    assert_eq!(
        fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "not managed\n"
    );
    fs::write(dir.join("notes.txt"), "changed\n").unwrap();
    assert_eq!(backing.read("notes.txt").unwrap(), b"changed\n");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["config.yaml", "notes.txt"]);
}

#[test]
fn rename_flags_onto_a_managed_file() {
    let (s, dir, _b, _d) = setup(&token("flags", 32));
    let tmp = dir.join("new.yaml");
    fs::write(&tmp, "model:\n  api_key: x\n").unwrap();
    let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (from, to) = (c(&tmp), c(&dir.join("config.yaml")));
    let rename = |flags| unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    assert_eq!(rename(libc::RENAME_NOREPLACE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // Exchanging would put placeholders under another name: programs fall back to copying.
    assert_eq!(rename(libc::RENAME_EXCHANGE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EXDEV)
    );
    assert!(tmp.exists());
    drop(s);
}

#[test]
fn a_managed_file_can_be_mapped_and_a_new_map_sees_the_new_token() {
    use std::os::fd::AsRawFd;
    let (_s, dir, _b, d) = setup(&token("map", 36));
    let path = dir.join("config.yaml");
    let map = |path: &std::path::Path| {
        let f = fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            let text = String::from_utf8_lossy(std::slice::from_raw_parts(p as *const u8, len))
                .into_owned();
            libc::munmap(p, len);
            text
        }
    };
    assert_eq!(map(&path), fs::read_to_string(&path).unwrap());
    let next = token("map2", 36);
    d.set("databricks", &next);
    assert_eq!(map(&path), hermes_yaml(&next));
}

#[test]
fn seek_data_and_hole_on_a_managed_file() {
    use std::os::fd::AsRawFd;
    let (_s, dir, _b, _d) = setup(&token("seek", 36));
    let f = fs::File::open(dir.join("config.yaml")).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    unsafe {
        assert_eq!(libc::lseek(f.as_raw_fd(), 3, libc::SEEK_DATA), 3);
        assert_eq!(libc::lseek(f.as_raw_fd(), 3, libc::SEEK_HOLE), len);
        assert_eq!(libc::lseek(f.as_raw_fd(), len, libc::SEEK_DATA), -1);
    }
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENXIO)
    );
}

/// Saves now finish on worker threads: two programs saving the same file at
/// once must leave what readers see and what is on disk the same file.
#[test]
fn concurrent_saves_leave_memory_and_disk_agreeing() {
    let tok = token("race", 32);
    let (_s, dir, backing, _d) = setup(&tok);
    let path = dir.join("config.yaml");
    let base = hermes_yaml(&tok);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (path, dir, base) = (path.clone(), dir.clone(), base.clone());
            std::thread::spawn(move || {
                for i in 0..150 {
                    let text = base.replace("max_turns: 60", &format!("max_turns: {w}{i:03}"));
                    if i % 2 == 0 {
                        fs::write(&path, &text).unwrap();
                    } else {
                        let tmp = dir.join(format!(".config.yaml.{w}.tmp"));
                        fs::write(&tmp, &text).unwrap();
                        fs::rename(&tmp, &path).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let seen = fs::read_to_string(&path).unwrap();
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert_eq!(on_disk, seen.replace(&tok, "__tokenfs:databricks.token__"));
    assert!(
        seen.contains("max_turns: 0149") || seen.contains("max_turns: 1149"),
        "{seen}"
    );
}

/// `mv config.yaml config.bak`: the kernel moves its cached name (the
/// managed file's node) to the new name, which must show the placeholder
/// copy at once, not ENOENT until the name expires.
#[test]
fn a_managed_file_renamed_away_is_readable_at_its_new_name_at_once() {
    // As long as the placeholder: the kernel cannot tell the rendering's
    // cached pages from the copy's by their size.
    let tok = token("away", "__tokenfs:databricks.token__".len());
    let (_s, dir, backing, d) = setup(&tok);
    let path = dir.join("config.yaml");
    let ino = fs::metadata(&path).unwrap().ino();
    assert!(fs::read_to_string(&path).unwrap().contains(&tok));
    let bak = dir.join("config.bak");
    fs::rename(&path, &bak).unwrap();
    let moved = fs::read_to_string(&bak).expect("the new name opens at once");
    assert_eq!(
        moved.as_bytes(),
        backing.read("config.bak").unwrap().as_slice()
    );
    assert!(moved.contains("__tokenfs:databricks.token__") && !moved.contains(&tok));
    assert_eq!(fs::metadata(&bak).unwrap().len(), moved.len() as u64);
    assert!(!path.exists());
    // The program writes a new config the usual way: managed again, same inode.
    let tmp = dir.join("config.yaml.tmp");
    fs::write(&tmp, hermes_yaml(&tok)).unwrap();
    fs::rename(&tmp, &path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&tok));
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    let next = token("next", 40);
    d.set("databricks", &next);
    assert!(fs::read_to_string(&path).unwrap().contains(&next));
    assert_eq!(
        fs::read_to_string(&bak).unwrap(),
        moved,
        "the copy is a plain file"
    );
}

/// Names beside a managed file are cached, so after `rename(tmp, config)`
/// the kernel's moved name points at the temp file's node: every stat and
/// read right after the rename, here and from another process, must still
/// be the managed file (its inode, its rendering). 1,000 rounds: a LOOKUP
/// reply showing a view's node id as `st_ino` leaked to about 1 `stat` in
/// 20,000 here.
#[test]
fn the_instant_after_a_temp_file_rename_shows_the_managed_file() {
    let tok = token("inst", 32);
    let (_s, dir, backing, _d) = setup(&tok);
    let path = dir.join("config.yaml");
    let ino = fs::metadata(&path).unwrap().ino();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(m) = fs::metadata(&path) {
                    if m.ino() != ino {
                        bad.push(format!("inode {}", m.ino()));
                    }
                }
                if let Ok(t) = fs::read_to_string(&path) {
                    if t.contains("__tokenfs:") {
                        bad.push("a placeholder".into());
                    }
                }
            }
            bad
        })
    };
    for i in 0..1000 {
        let text = hermes_yaml(&tok).replace("max_turns: 60", &format!("max_turns: {i}"));
        let tmp = dir.join(format!(".config.yaml.{i}.tmp"));
        fs::write(&tmp, &text).unwrap();
        assert_eq!(fs::metadata(&tmp).unwrap().len(), text.len() as u64);
        fs::rename(&tmp, &path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino, "round {i}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "round {i}");
        assert!(!tmp.exists());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bad = watcher.join().unwrap();
    assert!(
        bad.is_empty(),
        "the other reader saw {} wrong results: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    let on_disk = String::from_utf8(backing.read("config.yaml").unwrap()).unwrap();
    assert!(on_disk.contains("max_turns: 999") && !on_disk.contains(&tok));
}

/// A temp file with a second hard link keeps its node (the other name is a
/// plain file). Renamed over the managed file, the managed name shows the
/// bytes written at once and the managed inode as soon as the name's
/// invalidation lands (README, known limits); the other name keeps its own.
#[test]
fn a_hard_linked_file_renamed_over_a_managed_file() {
    let tok = token("hl", 32);
    let (_s, dir, _b, _d) = setup(&tok);
    let path = dir.join("config.yaml");
    let ino = fs::metadata(&path).unwrap().ino();
    let text = hermes_yaml(&tok).replace("max_turns: 60", "max_turns: 7");
    let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
    fs::write(&a, &text).unwrap();
    fs::hard_link(&a, &b).unwrap();
    assert_eq!(fs::metadata(&a).unwrap().nlink(), 2);
    fs::rename(&a, &path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while fs::metadata(&path).unwrap().ino() != ino {
        assert!(
            std::time::Instant::now() < deadline,
            "the managed inode never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(fs::read_to_string(&path).unwrap(), text);
    assert_eq!(fs::read_to_string(&b).unwrap(), text);
    assert_ne!(fs::metadata(&b).unwrap().ino(), ino);
}

/// A push credential without a value (a restart before the first `set`):
/// the file shows its placeholder, and the log and status say why, so a
/// CLI's 401 is explained. A file created by a program is not reported as
/// broken for being empty at its `creat`.
#[test]
fn a_credential_without_a_value_is_reported_and_a_created_file_is_not() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write(
        "home/.hermes/config.yaml",
        "model:\n  api_key: __tokenfs:databricks.token__\n",
    );
    let cfg = hermes_config(&s, &dir).replace(
        "bind = { \"model.api_key\" = \"databricks.token\" }\n",
        "bind = { \"model.api_key\" = \"databricks.token\" }\n[[mount.file]]\npath = \".env\"\nformat = \"dotenv\"\nbind = { \"OPENAI_API_KEY\" = \"databricks.token\" }\n",
    );
    let d = Daemon::start(&s, &cfg, &[&dir]);
    let text = fs::read_to_string(dir.join("config.yaml")).unwrap();
    assert!(text.contains("__tokenfs:databricks.token__"), "{text}");
    let status = d.status();
    let last = status["mounts"][0]["files"][0]["last_error"]
        .as_str()
        .unwrap_or("");
    assert!(
        last.contains("databricks.token has no value yet"),
        "{status}"
    );
    assert!(
        d.log_text()
            .contains("has no value yet (tokenfs set databricks)")
    );
    // A value arrives; a program then creates the second file with `>`.
    let tok = token("late", 32);
    d.set("databricks", &tok);
    assert!(
        fs::read_to_string(dir.join("config.yaml"))
            .unwrap()
            .contains(&tok)
    );
    fs::write(dir.join(".env"), format!("OPENAI_API_KEY={tok}\n")).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join(".env")).unwrap(),
        format!("OPENAI_API_KEY={tok}\n")
    );
    let status = d.status();
    let env = &status["mounts"][0]["files"][1];
    assert!(env["present"].as_bool().unwrap_or(false), "{status}");
    assert!(env["last_error"].is_null(), "{status}");
}
