//! Managed files are read through the page cache, one kernel inode per
//! rendering ("views"): these pin down what that must never change — a
//! handle keeps the generation it opened, whole; the next open after a
//! rotation sees the new one, with its size and mtime; one st_ino.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::*;

fn setup(initial: &str) -> (Scratch, std::path::PathBuf, Daemon) {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml(initial));
    let d = Daemon::start(&s, &hermes_config(&s, &dir), &[&dir]);
    (s, dir, d)
}

#[test]
fn a_handle_that_read_part_of_the_file_reads_the_rest_of_its_own_generation() {
    let first = token("first", 40);
    let (_s, dir, d) = setup(&first);
    let path = dir.join("config.yaml");
    let whole = hermes_yaml(&first);
    // Warm the page cache of the current rendering through another reader.
    assert_eq!(fs::read_to_string(&path).unwrap(), whole);
    let mut held = fs::File::open(&path).unwrap();
    let mut head = [0u8; 10];
    held.read_exact(&mut head).unwrap();
    // Rotations that change the size, each read by path in between (so the
    // new generations are in the kernel's caches too).
    for (i, len) in [120, 20, 77].into_iter().enumerate() {
        let next = token(&format!("n{i}"), len);
        d.set("databricks", &next);
        assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&next));
    }
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();
    let mut got = head.to_vec();
    got.extend(rest);
    assert_eq!(String::from_utf8(got).unwrap(), whole);
    assert_eq!(held.metadata().unwrap().len(), whole.len() as u64);
    held.seek(SeekFrom::Start(0)).unwrap();
    let mut again = String::new();
    held.read_to_string(&mut again).unwrap();
    assert_eq!(again, whole);
}

#[test]
fn after_set_returns_stat_and_read_by_path_see_the_new_rendering() {
    let (_s, dir, d) = setup(&token("start", 30));
    let path = dir.join("config.yaml");
    let ino = fs::metadata(&path).unwrap().ino();
    let mut last_mtime = fs::metadata(&path).unwrap().mtime_nsec() as i128
        + fs::metadata(&path).unwrap().mtime() as i128 * 1_000_000_000;
    for i in 0..300 {
        let next = token(&format!("t{i}"), 20 + (i * 37) % 160);
        d.set("databricks", &next);
        // No sleep: the rotation is done when `set` returns.
        let md = fs::metadata(&path).unwrap();
        let want = hermes_yaml(&next);
        assert_eq!(md.len(), want.len() as u64, "size after rotation {i}");
        assert_eq!(md.ino(), ino, "st_ino after rotation {i}");
        let mtime = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
        assert!(mtime > last_mtime, "mtime did not advance at rotation {i}");
        last_mtime = mtime;
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            want,
            "content at rotation {i}"
        );
    }
}

#[test]
fn a_bind_mount_of_a_managed_file_follows_rotations() {
    let first = token("bind", 30);
    let (s, dir, d) = setup(&first);
    let path = dir.join("config.yaml");
    let target = s.write("elsewhere/config.yaml", "placeholder\n");
    let ok = Command::new("mount")
        .arg("--bind")
        .arg(&path)
        .arg(&target)
        .status()
        .unwrap();
    assert!(ok.success(), "mount --bind");
    let ino = fs::metadata(&path).unwrap().ino();
    let result = std::panic::catch_unwind(|| {
        assert_eq!(fs::read_to_string(&target).unwrap(), hermes_yaml(&first));
        for (i, len) in [90, 25, 140].into_iter().enumerate() {
            let next = token(&format!("b{i}"), len);
            d.set("databricks", &next);
            let want = hermes_yaml(&next);
            assert_eq!(fs::read_to_string(&target).unwrap(), want);
            let md = fs::metadata(&target).unwrap();
            assert_eq!(md.len(), want.len() as u64);
            assert_eq!(md.ino(), ino);
            assert_eq!(fs::read_to_string(&path).unwrap(), want);
        }
    });
    let _ = Command::new("umount").arg(&target).status();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn a_reader_holding_the_file_keeps_it_across_a_program_saving_it() {
    let tok = token("keep", 32);
    let (_s, dir, d) = setup(&tok);
    let path = dir.join("config.yaml");
    let before = fs::read_to_string(&path).unwrap();
    let mut held = fs::File::open(&path).unwrap();
    // A CLI saves an edit the atomic way (temp file + rename), then another
    // rewrites it in place.
    let edited = before.replace("max_turns: 60", "max_turns: 61");
    let tmp = dir.join(".config.yaml.tmp");
    fs::write(&tmp, &edited).unwrap();
    fs::rename(&tmp, &path).unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), edited);
    let edited2 = edited.replace("max_turns: 61", "max_turns: 62");
    fs::File::create(&path)
        .and_then(|mut f| f.write_all(edited2.as_bytes()))
        .unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), edited2);
    let mut old = String::new();
    held.read_to_string(&mut old).unwrap();
    assert_eq!(old, before);
    // And a rotation after the saves renders into the saved layout.
    let next = token("after", 50);
    d.set("databricks", &next);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        hermes_yaml(&next).replace("max_turns: 60", "max_turns: 62")
    );
}

/// Invalidations caused from inside a request must not be sent from that
/// thread (the kernel can deadlock on a lock the request holds): a write
/// that publishes a new token, in place and by rename, returns, and the
/// next open already sees it. (The adapter marks its request threads
/// explicitly, so this holds whatever fuser names its threads.)
#[test]
fn a_write_that_publishes_from_a_request_thread_does_not_hang() {
    let (_s, dir, _d) = setup(&token("inreq0", 30));
    let path = dir.join("config.yaml");
    for i in 1..=5 {
        let next = token(&format!("inreq{i}"), 30 + i);
        if i % 2 == 0 {
            fs::write(&path, hermes_yaml(&next)).unwrap();
        } else {
            let tmp = dir.join(".config.yaml.tmp");
            fs::write(&tmp, hermes_yaml(&next)).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&next));
    }
}
