//! The race the project exists to remove: readers parse the managed file
//! while tokens of varying length are published as fast as possible.
//! Zero torn, stale or unparsable reads.

mod common;

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use parking_lot::RwLock;

#[test]
fn readers_never_see_a_torn_stale_or_unparsable_file() {
    let s = Scratch::new();
    let dir = s.path("home/.hermes");
    let first = token("gen0", 40);
    s.write("home/.hermes/config.yaml", &hermes_yaml(&first));
    let d = Daemon::start_env(
        &s,
        &hermes_config(&s, &dir),
        &[&dir],
        &[("RUST_LOG", "warn,tokenfs::daemon=info")],
    );
    let path = dir.join("config.yaml");

    // tokens[i] is generation i's token; `done` counts publishes that returned.
    let tokens = Arc::new(RwLock::new(vec![first]));
    let done = Arc::new(AtomicUsize::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    const READS_PER_READER: usize = 50_000;

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (tokens, done, path) = (tokens.clone(), done.clone(), path.clone());
            std::thread::spawn(move || {
                let (mut torn, mut stale) = (0usize, 0usize);
                for _ in 0..READS_PER_READER {
                    let published_before_open = done.load(Ordering::SeqCst);
                    let text = fs::read_to_string(&path).expect("read");
                    let key = text
                        .lines()
                        .find_map(|l| l.strip_prefix("  api_key: "))
                        .unwrap_or("");
                    let tokens = tokens.read();
                    match tokens.iter().position(|t| t == key) {
                        Some(i) if text == hermes_yaml(key) => {
                            if i + 1 < published_before_open {
                                stale += 1;
                            }
                        }
                        _ => torn += 1,
                    }
                }
                (torn, stale)
            })
        })
        .collect();

    let publisher = {
        let (tokens, done, stop) = (tokens.clone(), done.clone(), stop.clone());
        let socket = d.socket.clone();
        std::thread::spawn(move || {
            let mut i = 1usize;
            while !stop.load(Ordering::SeqCst) {
                // Lengths vary from 20 to 180 so the rendered size changes.
                let t = token(&format!("g{i}x"), 20 + (i * 37) % 160);
                tokens.write().push(t.clone());
                tokenfs::control::call(
                    &socket,
                    &tokenfs::control::Request::Set {
                        name: "databricks".into(),
                        field: None,
                        secret: t,
                    },
                )
                .expect("set");
                done.store(i + 1, Ordering::SeqCst);
                i += 1;
            }
            i
        })
    };

    let mut total = (0, 0);
    for r in readers {
        let (t, st) = r.join().expect("reader");
        total.0 += t;
        total.1 += st;
    }
    stop.store(true, Ordering::SeqCst);
    let rotations = publisher.join().expect("publisher");
    eprintln!(
        "reads: {}, rotations: {rotations}, torn: {}, stale: {}",
        2 * READS_PER_READER,
        total.0,
        total.1
    );
    assert!(
        rotations > 100,
        "too few rotations to mean anything: {rotations}"
    );
    assert_eq!(total, (0, 0), "torn and stale reads");
}
