//! `source = "file"`: a file rewritten by someone else is followed within 1 s.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_rewritten_secret_file_is_picked_up_within_a_second() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    s.write("home/.hermes/config.yaml", &hermes_yaml("placeholder-free"));
    let secret = s.write("secrets/token", &format!("{}\n", token("file1", 40)));
    // The file holds an old key: the secret file's value takes over
    // (replace = true; without it the mount refuses, see presets/managed).
    let cfg = hermes_config(&s, &dir)
        .replace(
            "source = \"push\"",
            &format!("source = \"file\"\npath = \"{}\"", secret.display()),
        )
        .replace("[[mount]]\n", "[[mount]]\nreplace = true\n");
    let _d = Daemon::start(&s, &cfg, &[&dir]);
    let path = dir.join("config.yaml");
    let first = fs::read_to_string(&secret).unwrap().trim().to_string();
    assert_eq!(fs::read_to_string(&path).unwrap(), hermes_yaml(&first));
    for (i, how) in ["in-place", "rename"].iter().enumerate() {
        let next = token(&format!("file{}", i + 2), 44);
        if *how == "rename" {
            let tmp = s.write("secrets/.token.new", &next);
            fs::rename(tmp, &secret).unwrap();
        } else {
            fs::write(&secret, &next).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while fs::read_to_string(&path).unwrap() != hermes_yaml(&next) {
            assert!(
                Instant::now() < deadline,
                "{how} update not seen within 1 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
