//! tokenfs benchmark: every row side by side in one run, reported as ratios.
//! Driven by `scripts/bench.sh` (which installs bindfs and builds release).
//!
//!   bench [--json] [--idle SECS] [--storm SECS] [--only read,fsync,stat,...,proxy]
//!   bench --soak SECS    (rotation every 100 ms, 2 readers; RSS and fds at start and end)
//!   bench reader read|stat PATH ITERS   (child mode: prints latencies in ns)

#[path = "../tests/common/fake_databricks.rs"]
#[allow(dead_code)]
mod fake_databricks;
#[path = "../tests/common/http.rs"]
#[allow(dead_code)]
mod http;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokenfs::control::{self, Request};

const TOKENFS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/tokenfs");

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("churn") {
        println!("{}", small_files(Path::new(&args[2])));
        return;
    }
    if args.get(1).map(String::as_str) == Some("reader") {
        return reader(
            &args[2],
            Path::new(&args[3]),
            args[4].parse().expect("iters"),
        );
    }
    let flag = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let json_out = args.iter().any(|a| a == "--json");
    if args.iter().any(|a| a == "--soak") {
        return soak(flag("--soak", 3600));
    }
    // --only read,stat,bulk,rotation,storm,footprint,databricks,proxy: a subset.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_owned).collect());
    let run = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    // The file rows share one mount and bindfs; the others start their own.
    let file_rows = ["read", "fsync", "stat", "bulk", "rotation", "storm"];
    let bench = file_rows.iter().any(|r| run(r)).then(Bench::setup);
    let bench = bench.as_ref();
    let mut report = Report::default();
    if let Some(bench) = bench.filter(|_| run("read")) {
        bench.config_read(&mut report);
    }
    if let Some(bench) = bench.filter(|_| run("fsync")) {
        bench.under_fsync(&mut report);
    }
    if let Some(bench) = bench.filter(|_| run("stat")) {
        bench.stat(&mut report);
    }
    if let Some(bench) = bench.filter(|_| run("bulk")) {
        bench.bulk(&mut report);
    }
    if let Some(bench) = bench.filter(|_| run("rotation")) {
        bench.rotation(&mut report);
    }
    if let Some(bench) = bench.filter(|_| run("storm")) {
        bench.storm(&mut report, flag("--storm", 10));
    }
    if run("footprint") {
        footprint(&mut report, flag("--idle", 60));
    }
    if run("databricks") {
        databricks(&mut report);
    }
    if run("proxy") {
        proxy(&mut report, flag("--proxy-secs", 3));
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.json).unwrap_or_default()
        );
    } else {
        print!("{}", report.text);
    }
}

/// Child mode: times `iters` cycles of open+read+close (or stat) of `path`.
fn reader(mode: &str, path: &Path, iters: usize) {
    let mut lat = Vec::with_capacity(iters);
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..iters {
        let t = Instant::now();
        if mode == "stat" {
            std::hint::black_box(fs::metadata(path).expect("stat"));
        } else {
            buf.clear();
            fs::File::open(path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .expect("read");
        }
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let out: Vec<String> = lat.iter().map(u64::to_string).collect();
    println!("{}", out.join(" "));
}

#[derive(Default)]
struct Report {
    text: String,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn section(&mut self, title: &str) {
        self.text.push_str(&format!("\n== {title}\n"));
    }
    fn line(&mut self, s: String) {
        self.text.push_str(&s);
        self.text.push('\n');
    }
    fn put(&mut self, key: &str, v: Value) {
        self.json.insert(key.into(), v);
    }
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

struct Daemon {
    child: Child,
    dirs: Vec<PathBuf>,
    socket: PathBuf,
}

impl Daemon {
    fn start(root: &Path, name: &str, config: &str, dirs: Vec<PathBuf>) -> (Daemon, Duration) {
        Daemon::start_env(root, name, config, dirs, &[])
    }

    fn start_env(
        root: &Path,
        name: &str,
        config: &str,
        dirs: Vec<PathBuf>,
        env: &[(&str, &str)],
    ) -> (Daemon, Duration) {
        let cfg = root.join(format!("{name}.toml"));
        fs::write(&cfg, config).expect("config");
        let log = root.join(format!("{name}.log"));
        let t = Instant::now();
        let child = Command::new(TOKENFS)
            .args(["mount", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn,tokenfs::daemon=info")
            .envs(env.iter().copied())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("tokenfs (build it with cargo build --release)");
        while !fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("tokenfs is serving")
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "tokenfs did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let live = t.elapsed();
        (
            Daemon {
                child,
                dirs,
                socket: root.join(format!("{name}.sock")),
            },
            live,
        )
    }

    fn set(&self, name: &str, secret: &str) {
        control::call(
            &self.socket,
            &Request::Set {
                name: name.into(),
                field: None,
                secret: secret.into(),
            },
        )
        .expect("set");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        for d in &self.dirs {
            let quiet = Stdio::null;
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(d)
                .stderr(quiet())
                .status();
        }
    }
}

fn yaml(token: &str) -> String {
    let mut s = format!(
        "# Hermes agent config\nmodel:\n  provider: custom\n  base_url: https://gw.example.com/serving-endpoints\n  api_key: {token}\n  default: databricks-claude-sonnet\n"
    );
    // A fixed number of lines, so the size varies only with the token.
    for _ in 0..14 {
        s.push_str("# padding comment to make this a 1 KiB config like a real one\n");
    }
    s
}

fn token(seq: u64) -> String {
    let len = 20 + (seq as usize * 37) % 160;
    let mut t = format!("dapiG{seq}x");
    while t.len() < len {
        t.push('x');
    }
    t
}

/// Whether a read is one whole generation of `yaml(token(seq))`.
fn whole(text: &str) -> bool {
    let Some(key) = text.lines().find_map(|l| l.strip_prefix("  api_key: ")) else {
        return false;
    };
    let seq = key
        .strip_prefix("dapiG")
        .and_then(|r| r.split('x').next())
        .and_then(|n| n.parse().ok());
    seq.is_some_and(|s| key == token(s) && text == yaml(key))
}

struct Bench {
    root: PathBuf,
    floor: PathBuf,
    tfs: PathBuf,
    bind: PathBuf,
    daemon: Daemon,
    bindfs: Child,
}

impl Bench {
    fn setup() -> Bench {
        let root = PathBuf::from(format!("/tmp/tokenfs-bench-{}", std::process::id()));
        let (floor, tfs, bsrc, bind) = (
            root.join("floor"),
            root.join("tfs"),
            root.join("bindsrc"),
            root.join("bind"),
        );
        for d in [&floor, &tfs, &bsrc, &bind] {
            fs::create_dir_all(d).expect("mkdir");
        }
        for d in [&floor, &tfs, &bsrc] {
            fs::write(d.join("config.yaml"), yaml(&token(0))).expect("write");
            fs::write(d.join("plain.yaml"), yaml(&token(0))).expect("write");
        }
        let config = format!(
            "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"db.token\" }}\n",
            root.join("main.sock").display(),
            tfs.display()
        );
        let (daemon, _) = Daemon::start(&root, "main", &config, vec![tfs.clone()]);
        let bindfs = Command::new("bindfs")
            .args(["-f"])
            .arg(&bsrc)
            .arg(&bind)
            .spawn()
            .expect("bindfs (apt-get install bindfs)");
        while !fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&format!(" {} ", bind.display()))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Bench {
            root,
            floor,
            tfs,
            bind,
            daemon,
            bindfs,
        }
    }

    fn pin(&self, on: bool) {
        let cpus = if on {
            "0".to_string()
        } else {
            format!("0-{}", num_cpus() - 1)
        };
        for pid in [self.daemon.child.id(), self.bindfs.id()] {
            taskset(pid, &cpus);
        }
    }

    /// Runs `n` reader processes on `path`; returns all latencies.
    fn readers(&self, mode: &str, path: &Path, n: usize, pinned: bool, iters: usize) -> Vec<u64> {
        let me = std::env::current_exe().expect("exe");
        let kids: Vec<Child> = (0..n)
            .map(|_| {
                let mut c = if pinned {
                    Command::new("taskset")
                } else {
                    Command::new(&me)
                };
                if pinned {
                    c.args(["-c", "0"]).arg(&me);
                }
                c.args(["reader", mode])
                    .arg(path)
                    .arg(iters.to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("reader")
            })
            .collect();
        let mut all = Vec::new();
        for k in kids {
            let out = k.wait_with_output().expect("reader");
            all.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|v| v.parse::<u64>().ok()),
            );
        }
        all
    }

    fn columns(&self, file: &str) -> [(&'static str, PathBuf); 4] {
        [
            ("tokenfs managed", self.tfs.join("config.yaml")),
            ("tokenfs passthrough", self.tfs.join("plain.yaml")),
            ("floor (no FUSE)", self.floor.join(file)),
            ("bindfs", self.bind.join(file)),
        ]
    }

    fn config_read(&self, r: &mut Report) {
        r.section("1. config read: open + read 1 KiB + close, per cycle (µs)");
        r.line(format!(
            "{:<28} {:>10} {:>10} {:>10} {:>10}   {:>12} {:>12}",
            "", "median", "p99", "p99/med", "", "÷ bindfs", "÷ floor"
        ));
        let mut rows = serde_json::Map::new();
        for pinned in [true, false] {
            self.pin(pinned);
            for n in [1, 2] {
                let mut meds = Vec::new();
                for (name, path) in self.columns("plain.yaml") {
                    let mut lat = self.readers("read", &path, n, pinned, 20_000 / n);
                    let (m, p) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
                    meds.push((name, m, p));
                }
                let bind = meds[3].1.max(1);
                let floor = meds[2].1.max(1);
                r.line(format!(
                    "-- {} reader(s), {}",
                    n,
                    if pinned {
                        "pinned to CPU 0"
                    } else {
                        "unpinned"
                    }
                ));
                for (name, m, p) in &meds {
                    r.line(format!(
                        "{:<28} {:>10.1} {:>10.1} {:>9.1}×            {:>11.2}× {:>11.2}×",
                        name,
                        us(*m),
                        us(*p),
                        *p as f64 / (*m).max(1) as f64,
                        *m as f64 / bind as f64,
                        *m as f64 / floor as f64
                    ));
                    rows.insert(
                        format!("{name}/{n}/{}", if pinned { "pinned" } else { "unpinned" }),
                        json!({"median_us": us(*m), "p99_us": us(*p)}),
                    );
                }
            }
        }
        self.pin(false);
        r.put("config_read", Value::Object(rows));
    }

    /// Config reads while three threads rewrite and fsync 64 KiB files in
    /// the same mount (an agent's SQLite or session log): a read must not
    /// queue behind the disk.
    fn under_fsync(&self, r: &mut Report) {
        r.section("1b. config read while 3 writers fsync in the same mount (µs, unpinned)");
        let mut rows = serde_json::Map::new();
        for (name, path) in self.columns("plain.yaml") {
            if name.starts_with("floor") {
                continue;
            }
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writers: Vec<_> = (0..3)
                .map(|i| {
                    let (stop, file) = (stop.clone(), dir.join(format!("db{i}.bin")));
                    std::thread::spawn(move || {
                        let f = fs::File::create(&file).expect("create");
                        let block = vec![7u8; 64 * 1024];
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            std::os::unix::fs::FileExt::write_all_at(&f, &block, 0).expect("write");
                            f.sync_all().expect("fsync");
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            let mut lat = self.readers("read", &path, 1, false, 5_000);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for w in writers {
                let _ = w.join();
            }
            let (m, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
            r.line(format!(
                "{name:<28} median {:>8.1}  p99 {:>8.1}",
                us(m),
                us(p99)
            ));
            rows.insert(name.into(), json!({"median_us": us(m), "p99_us": us(p99)}));
        }
        r.put("read_under_fsync", Value::Object(rows));
    }

    fn stat(&self, r: &mut Report) {
        r.section("2. stat (µs, median, unpinned)");
        let mut rows = serde_json::Map::new();
        for (name, path) in self.columns("plain.yaml") {
            let mut lat = self.readers("stat", &path, 1, false, 20_000);
            let m = pct(&mut lat, 0.5);
            r.line(format!("{name:<28} {:>10.1}", us(m)));
            rows.insert(name.into(), json!(us(m)));
        }
        r.put("stat_us", Value::Object(rows));
    }

    fn bulk(&self, r: &mut Report) {
        r.section(
            "3. bulk passthrough: 64 MiB sequential write / read, 16 MiB in 4 KiB writes (MB/s), 1,000 small files (ops/s); medians of 5 rounds",
        );
        let mut rows = serde_json::Map::new();
        // A second mount that forwards reads and writes through the daemon,
        // as tokenfs does where kernel passthrough is unavailable.
        let fwd = self.root.join("fwd");
        fs::create_dir_all(&fwd).expect("mkdir");
        let config = format!(
            "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n",
            self.root.join("fwd.sock").display(),
            fwd.display()
        );
        let (_fwd_daemon, _) = Daemon::start_env(
            &self.root,
            "fwd",
            &config,
            vec![fwd.clone()],
            &[("TOKENFS_KERNEL_PASSTHROUGH", "off")],
        );
        let targets = [
            ("tokenfs passthrough", &self.tfs),
            ("floor (no FUSE)", &self.floor),
            ("bindfs", &self.bind),
            ("tokenfs forwarded", &fwd),
        ];
        // Five rounds, each measuring every column back to back, so one
        // column does not pay for the writeback of another; each ratio is
        // the median of the rounds' ratios (the disk and the VM vary a lot
        // between rounds, much less within one).
        const ROUNDS: usize = 5;
        // samples[metric][column][round]: write MB/s, read MB/s, churn
        // ops/s, pinned churn, 4 KiB writes MB/s.
        let mut samples = vec![vec![Vec::new(); targets.len()]; 5];
        for _ in 0..ROUNDS {
            for (i, (_, dir)) in targets.iter().enumerate() {
                let (w, rd) = seq_io(&dir.join("big.bin"));
                samples[0][i].push(w);
                samples[1][i].push(rd);
                samples[2][i].push(small_files(&dir.join("churn")));
                samples[4][i].push(small_writes(&dir.join("pages.bin")));
            }
        }
        // Churn again with every process on CPU 0: unpinned, each request
        // may or may not pay a cross-CPU wake-up, and runs vary 2x.
        self.pin(true);
        taskset(_fwd_daemon.child.id(), "0");
        for _ in 0..ROUNDS {
            for (i, (_, dir)) in targets.iter().enumerate() {
                samples[3][i].push(churn_pinned(&dir.join("churn")));
            }
        }
        self.pin(false);
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        // The median over rounds of column `i` ÷ column `of`, for `metric`.
        let ratio = |metric: usize, i: usize, of: usize| {
            let per_round: Vec<f64> = samples[metric][i]
                .iter()
                .zip(&samples[metric][of])
                .map(|(a, b)| a / b.max(f64::MIN_POSITIVE))
                .collect();
            median(&per_round)
        };
        let (floor, bind) = (1, 2);
        for (i, (name, _)) in targets.iter().enumerate() {
            let m: Vec<f64> = (0..5).map(|k| median(&samples[k][i])).collect();
            r.line(format!(
                "{name:<20} write {:>6.0} ({:.2}× floor, {:>5.2}× bindfs)  read {:>6.0} ({:.2}× floor, {:.2}× bindfs)  4 KiB writes {:>6.0} ({:.2}× floor, {:.2}× bindfs)  churn {:>6.0} ops/s ({:.2}× bindfs), pinned {:>6.0} ({:.2}× bindfs)",
                m[0], ratio(0, i, floor), ratio(0, i, bind),
                m[1], ratio(1, i, floor), ratio(1, i, bind),
                m[4], ratio(4, i, floor), ratio(4, i, bind),
                m[2], ratio(2, i, bind), m[3], ratio(3, i, bind)
            ));
            rows.insert(
                (*name).into(),
                json!({"write_mbs": m[0], "read_mbs": m[1], "churn_ops": m[2], "churn_ops_pinned": m[3],
                       "write_4k_mbs": m[4], "write_4k_vs_floor": ratio(4, i, floor),
                       "write_vs_floor": ratio(0, i, floor), "read_vs_floor": ratio(1, i, floor),
                       "write_vs_bindfs": ratio(0, i, bind), "read_vs_bindfs": ratio(1, i, bind),
                       "churn_vs_bindfs": ratio(2, i, bind), "churn_pinned_vs_bindfs": ratio(3, i, bind)}),
            );
        }
        r.put("bulk", Value::Object(rows));
    }

    fn rotation(&self, r: &mut Report) {
        r.section("4. rotation: from the rotation returning to the first open that sees it (µs)");
        let path = self.tfs.join("config.yaml");
        let (mut lat, mut stale) = (Vec::new(), 0);
        for i in 1..=300u64 {
            let t = token(1_000_000 + i);
            self.daemon.set("db", &t);
            let start = Instant::now();
            let text = fs::read_to_string(&path).expect("read");
            lat.push(start.elapsed().as_nanos() as u64);
            if !text.contains(&t) {
                stale += 1;
            }
        }
        let (m, p) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        r.line(format!(
            "{:<28} median {:>8.1}  p99 {:>8.1}  stale opens {stale}",
            "tokenfs (set → open)",
            us(m),
            us(p)
        ));
        let five = [
            "config.yaml",
            "settings.json",
            "auth.json",
            ".env",
            ".databrickscfg",
        ]
        .map(|f| self.floor.join(f));
        let (mut rl, mut nl) = (Vec::new(), Vec::new());
        for i in 1..=300u64 {
            let t = token(2_000_000 + i);
            let start = Instant::now();
            for f in &five {
                write_renamed(f, yaml(&t).as_bytes());
            }
            let ok = fs::read_to_string(&five[0]).expect("read").contains(&t);
            assert!(ok);
            rl.push(start.elapsed().as_nanos() as u64);
            let start = Instant::now();
            fs::write(&five[0], yaml(&t)).expect("write");
            let _ = fs::read_to_string(&five[0]);
            nl.push(start.elapsed().as_nanos() as u64);
        }
        let (rm, rp) = (pct(&mut rl, 0.5), pct(&mut rl, 0.99));
        let (nm, np) = (pct(&mut nl, 0.5), pct(&mut nl, 0.99));
        r.line(format!(
            "{:<28} median {:>8.1}  p99 {:>8.1}  (5 files, temp + fsync + rename)",
            "rename rotator",
            us(rm),
            us(rp)
        ));
        r.line(format!(
            "{:<28} median {:>8.1}  p99 {:>8.1}  (1 file, O_TRUNC + write)",
            "naive in-place rewrite",
            us(nm),
            us(np)
        ));
        r.put("rotation_us", json!({"tokenfs": {"median": us(m), "p99": us(p), "stale": stale}, "rename": {"median": us(rm), "p99": us(rp)}, "naive": {"median": us(nm), "p99": us(np)}}));
    }

    fn storm(&self, r: &mut Report, secs: u64) {
        r.section(&format!(
            "5. rotation storm: {secs} s, 2 readers parsing, tokens of 20–180 chars"
        ));
        let mut rows = serde_json::Map::new();
        for how in ["tokenfs", "rename rotator", "naive rewrite"] {
            let path = if how == "tokenfs" {
                self.tfs.join("config.yaml")
            } else {
                self.floor.join("storm.yaml")
            };
            fs::write(self.floor.join("storm.yaml"), yaml(&token(0))).expect("write");
            let stop = Arc::new(AtomicBool::new(false));
            let (reads, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (stop, reads, torn, path) =
                        (stop.clone(), reads.clone(), torn.clone(), path.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let text = fs::read_to_string(&path).unwrap_or_default();
                            reads.fetch_add(1, Ordering::Relaxed);
                            if !whole(&text) {
                                torn.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            let start = Instant::now();
            let mut rotations = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                rotations += 1;
                let t = token(3_000_000 + rotations);
                match how {
                    "tokenfs" => self.daemon.set("db", &t),
                    "rename rotator" => write_renamed(&path, yaml(&t).as_bytes()),
                    _ => fs::write(&path, yaml(&t)).expect("write"),
                }
            }
            stop.store(true, Ordering::Relaxed);
            for h in readers {
                let _ = h.join();
            }
            let (n, t) = (reads.load(Ordering::Relaxed), torn.load(Ordering::Relaxed));
            r.line(format!("{how:<28} reads {n:>9}  rotations {rotations:>8} ({:.0}/s)  torn or unparsable {t}", rotations as f64 / secs as f64));
            rows.insert(
                how.into(),
                json!({"reads": n, "rotations": rotations, "torn": t}),
            );
        }
        r.put("storm", Value::Object(rows));
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn write_renamed(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-rotate");
    let mut f = fs::File::create(&tmp).expect("tmp");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("fsync");
    fs::rename(&tmp, path).expect("rename");
}

fn drop_caches() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

/// 64 MiB written in 1 MiB blocks (+ fsync), then read back cold. MB/s.
fn seq_io(path: &Path) -> (f64, f64) {
    let block = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::create(path).expect("create");
    for _ in 0..64 {
        f.write_all(&block).expect("write");
    }
    f.sync_all().expect("fsync");
    let w = 64.0 / t.elapsed().as_secs_f64() * 1.048_576;
    drop(f);
    drop_caches();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut f = fs::File::open(path).expect("open");
    while f.read(&mut buf).expect("read") > 0 {}
    let rd = 64.0 / t.elapsed().as_secs_f64() * 1.048_576;
    let _ = fs::remove_file(path);
    (w, rd)
}

/// 16 MiB in 4 KiB writes (what SQLite and log appends do), no fsync; MB/s.
fn small_writes(path: &Path) -> f64 {
    let page = vec![0x5au8; 4096];
    let t = Instant::now();
    let mut f = fs::File::create(path).expect("create");
    for _ in 0..4096 {
        f.write_all(&page).expect("write");
    }
    let mbs = 16.0 / t.elapsed().as_secs_f64() * 1.048_576;
    drop(f);
    let _ = fs::remove_file(path);
    mbs
}

/// Moves every thread of `pid` to `cpus`.
fn taskset(pid: u32, cpus: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-cp", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// `small_files` in a child process on CPU 0.
fn churn_pinned(dir: &Path) -> f64 {
    let me = std::env::current_exe().expect("exe");
    let out = Command::new("taskset")
        .args(["-c", "0"])
        .arg(me)
        .arg("churn")
        .arg(dir)
        .output()
        .expect("churn");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0.0)
}

/// create + write + rename + unlink of 1,000 small files; ops (files) per second.
fn small_files(dir: &Path) -> f64 {
    fs::create_dir_all(dir).expect("mkdir");
    let t = Instant::now();
    for i in 0..1000 {
        let a = dir.join(format!("s{i}.json"));
        fs::write(&a, b"{\"session\": 1}\n").expect("write");
        let b = dir.join(format!("s{i}.done"));
        fs::rename(&a, &b).expect("rename");
        fs::remove_file(&b).expect("unlink");
    }
    1000.0 / t.elapsed().as_secs_f64()
}

fn proc_stat(pid: u32) -> (u64, u64, u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let cpu = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    (
        field("VmRSS:"),
        field("Threads:"),
        cpu,
        field("voluntary_ctxt_switches:"),
    )
}

fn footprint(r: &mut Report, idle: u64) {
    r.section(&format!(
        "6. footprint: six mounts (yaml, json, toml, dotenv, ini, raw), idle {idle} s"
    ));
    let root = PathBuf::from(format!("/tmp/tokenfs-bench-fp-{}", std::process::id()));
    let files = [
        ("config.yaml", "model:\n  api_key: x\n", "model.api_key"),
        ("settings.json", "{\"env\": {\"K\": \"x\"}}\n", "env.K"),
        ("config.toml", "[a]\nk = \"x\"\n", "a.k"),
        (".env", "K=x\n", "K"),
        (".databrickscfg", "[DEFAULT]\ntoken = x\n", "DEFAULT.token"),
        ("token", "x\n", ""),
    ];
    let mut cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n",
        root.join("fp.sock").display()
    );
    let mut dirs = Vec::new();
    for (i, (name, body, key)) in files.iter().enumerate() {
        let d = root.join(format!("m{i}"));
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join(name), body).expect("write");
        let format = if *name == "token" {
            "format = \"raw\"\n"
        } else {
            ""
        };
        cfg.push_str(&format!("[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"{name}\"\n{format}bind = {{ \"{key}\" = \"db.token\" }}\n", d.display()));
        dirs.push(d);
    }
    let (d, live) = Daemon::start(&root, "fp", &cfg, dirs.clone());
    d.set("db", &token(42));
    for dir in &dirs {
        for e in fs::read_dir(dir).expect("ls").flatten() {
            let _ = fs::read(e.path());
        }
    }
    let pid = d.child.id();
    let (rss, threads, cpu0, sw0) = proc_stat(pid);
    std::thread::sleep(Duration::from_secs(idle));
    let (_, _, cpu1, sw1) = proc_stat(pid);
    r.line(format!(
        "start → all mounts live   {:>8.1} ms",
        live.as_secs_f64() * 1000.0
    ));
    r.line(format!(
        "RSS                       {:>8.1} MiB   threads {threads}",
        rss as f64 / 1024.0
    ));
    r.line(format!(
        "idle CPU over {idle} s        {:>8} ticks   voluntary context switches {}",
        cpu1 - cpu0,
        sw1 - sw0
    ));
    r.put("footprint", json!({"start_ms": live.as_secs_f64() * 1000.0, "rss_kib": rss, "threads": threads, "idle_cpu_ticks": cpu1 - cpu0, "idle_switches": sw1 - sw0}));
    drop(d);
    let _ = fs::remove_dir_all(&root);
}

fn databricks(r: &mut Report) {
    r.section("7. Databricks: `tokenfs rotate` → first open that sees the new token (fake workspace on loopback)");
    let fake = fake_databricks::Fake::start();
    let root = PathBuf::from(format!("/tmp/tokenfs-bench-db-{}", std::process::id()));
    let dir = root.join("h");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("config.yaml"), yaml("boot")).expect("write");
    let boot = fake.bootstrap(Duration::from_secs(3600));
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"databricks\"\nhost = \"{}\"\nrotate_every = \"1h\"\nlifetime = \"2h\"\n[credentials.push]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"db.token\" }}\n",
        root.join("db.sock").display(),
        fake.url,
        dir.display()
    );
    let (d, _) = Daemon::start(&root, "db", &cfg, vec![dir.clone()]);
    control::call(
        &d.socket,
        &Request::Set {
            name: "db".into(),
            field: None,
            secret: boot,
        },
    )
    .expect("bootstrap");
    let path = dir.join("config.yaml");
    let mut lat = Vec::new();
    for _ in 0..50 {
        let before = fs::read_to_string(&path).expect("read");
        let t = Instant::now();
        control::call(&d.socket, &Request::Rotate { name: "db".into() }).expect("rotate");
        while fs::read_to_string(&path).expect("read") == before {}
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let (m, p) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    r.line(format!(
        "mint → swap → seen          median {:>8.1} µs  p99 {:>8.1} µs",
        us(m),
        us(p)
    ));
    // Store throughput with readers running.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = fs::read(&path);
                }
            })
        })
        .collect();
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < Duration::from_secs(5) {
        n += 1;
        d.set("push", &token(n));
    }
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        let _ = h.join();
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    r.line(format!(
        "store rotations/s with 2 readers  {rate:>8.0}  (each through the control socket)"
    ));
    r.put("databricks", json!({"rotate_seen_median_us": us(m), "rotate_seen_p99_us": us(p), "store_rotations_per_s": rate}));
    drop(d);
    let _ = fs::remove_dir_all(&root);
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.bind)
            .status();
        let _ = self.bindfs.kill();
        let _ = self.bindfs.wait();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Long run: a rotation every 100 ms with two reader loops; RSS and open fds
/// of the daemon must stay flat.
fn soak(secs: u64) {
    let root = PathBuf::from(format!("/tmp/tokenfs-soak-{}", std::process::id()));
    let dir = root.join("h");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("config.yaml"), yaml(&token(0))).expect("write");
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"db.token\" }}\n",
        root.join("soak.sock").display(),
        dir.display()
    );
    let (d, _) = Daemon::start(&root, "soak", &cfg, vec![dir.clone()]);
    let pid = d.child.id();
    let fds = || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let torn = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, torn, path) = (stop.clone(), torn.clone(), dir.join("config.yaml"));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !whole(&fs::read_to_string(&path).unwrap_or_default()) {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let (rss0, fd0) = (proc_stat(pid).0, fds());
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        n += 1;
        d.set("db", &token(n));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rss1, fd1) = (proc_stat(pid).0, fds());
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        let _ = h.join();
    }
    println!(
        "soak {secs} s: {n} rotations, torn {}, RSS {rss0} → {rss1} KiB, fds {fd0} → {fd1}",
        torn.load(Ordering::Relaxed)
    );
    drop(d);
    let _ = fs::remove_dir_all(&root);
}

/// Requests on one keep-alive connection for about `secs` (at most
/// 1,000,000); returns each one's latency (ns) and the non-200 count.
fn request_loop(
    addr: std::net::SocketAddr,
    auth: &[u8],
    secs: f64,
    stop: &AtomicBool,
) -> (Vec<u64>, u64) {
    let mut conn = http::Conn::connect(addr);
    let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut lat = Vec::new();
    let mut failed = 0;
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs && !stop.load(Ordering::Relaxed) && lat.len() < 1_000_000
    {
        let s = Instant::now();
        let r = conn.request(
            "POST",
            "/v1/chat/completions",
            &[
                ("authorization", auth),
                ("content-type", b"application/json"),
            ],
            body,
        );
        lat.push(s.elapsed().as_nanos() as u64);
        if r.status != 200 {
            failed += 1;
        }
    }
    (lat, failed)
}

/// `conns` keep-alive connections for `secs`: requests/s and failures.
fn throughput(addr: std::net::SocketAddr, auth: &[u8], conns: usize, secs: f64) -> (f64, u64) {
    let stop = AtomicBool::new(false);
    let t = Instant::now();
    let results: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..conns)
            .map(|_| s.spawn(|| request_loop(addr, auth, secs, &stop)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let n: usize = results.iter().map(|(l, _)| l.len()).sum();
    let failed = results.iter().map(|(_, f)| f).sum();
    (n as f64 / t.elapsed().as_secs_f64(), failed)
}

/// Time from sending a request to the first SSE event.
fn first_event(addr: std::net::SocketAddr, auth: &[u8], iters: usize) -> Vec<u64> {
    let mut conn = http::Conn::connect(addr);
    (0..iters)
        .map(|_| {
            let t = Instant::now();
            conn.send(
                "GET",
                "/v1/stream/sse?n=2&gap_ms=5",
                &[("authorization", auth)],
                b"",
            );
            let head = conn.read_head();
            assert_eq!(head.first[1], "200");
            http::read_chunk(&mut conn.r).expect("first event");
            let first = t.elapsed().as_nanos() as u64;
            while http::read_chunk(&mut conn.r).is_some() {}
            first
        })
        .collect()
}

fn proxy(r: &mut Report, secs: u64) {
    let secs = secs.max(1) as f64;
    r.section(
        "8. proxy: tokenfs mount's loopback proxy vs the fake upstream directly (keep-alive, µs)",
    );
    let up = http::Upstream::start();
    up.state.lock().record = false;
    let root = PathBuf::from(format!("/tmp/tokenfs-bench-px-{}", std::process::id()));
    let dir = root.join("h");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("config.yaml"), yaml("boot")).expect("write");
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"llm\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\ncredential = \"db\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"proxy.llm.token\" }}\n",
        root.join("px.sock").display(),
        up.url("/serving-endpoints"),
        dir.display()
    );
    let (d, _) = Daemon::start(&root, "px", &cfg, vec![dir.clone()]);
    let mut seq = 0u64;
    let mut current = String::new();
    let mut rotate = |d: &Daemon| {
        seq += 1;
        let t = format!("dapiPX{seq:06}{}", "y".repeat(30));
        up.mint(&t);
        d.set("db", &t);
        let old = std::mem::replace(&mut current, t.clone());
        if !old.is_empty() {
            up.revoke(&old);
        }
        t
    };
    let mut token = rotate(&d);
    let status = control::call(&d.socket, &Request::Status).expect("status");
    let via: std::net::SocketAddr = status["proxies"][0]["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("proxy address");
    let key = control::call(
        &d.socket,
        &Request::Token {
            name: "proxy.llm".into(),
            field: None,
        },
    )
    .expect("key")["secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let proxy_auth = format!("Bearer {key}").into_bytes();
    let pid = d.child.id();
    let (rss_idle, threads_idle, _, _) = proc_stat(pid);

    // Latency: one connection each, interleaved rounds so drift hits both.
    let never = AtomicBool::new(false);
    let (mut direct, mut via_proxy) = (Vec::new(), Vec::new());
    let direct_auth = format!("Bearer {token}").into_bytes();
    for round in 0..6 {
        let (d_lat, _) = request_loop(up.addr, &direct_auth, secs / 6.0, &never);
        let (p_lat, _) = request_loop(via, &proxy_auth, secs / 6.0, &never);
        if round > 0 {
            direct.extend(d_lat);
            via_proxy.extend(p_lat);
        }
    }
    let (dm, dp) = (pct(&mut direct, 0.5), pct(&mut direct, 0.99));
    let (pm, pp) = (pct(&mut via_proxy, 0.5), pct(&mut via_proxy, 0.99));
    r.line(format!(
        "POST 60 B, 1 connection        direct median {:>7.1} p99 {:>7.1}   proxy median {:>7.1} p99 {:>7.1}   added median {:>6.1} p99 {:>6.1}",
        us(dm), us(dp), us(pm), us(pp), us(pm.saturating_sub(dm)), us(pp.saturating_sub(dp))
    ));

    // Throughput at 1 and 16 connections.
    let mut rps = Vec::new();
    let mut load_sample = (0, 0);
    for conns in [1usize, 16] {
        let (direct_rps, df) = throughput(up.addr, &direct_auth, conns, secs);
        let sampler = {
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            let h = std::thread::spawn(move || {
                let mut peak = (0, 0);
                std::thread::sleep(Duration::from_millis(300));
                while !s2.load(Ordering::Relaxed) {
                    let (rss, th, _, _) = proc_stat(pid);
                    peak = (peak.0.max(rss), peak.1.max(th));
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            });
            (stop, h)
        };
        let (proxy_rps, pf) = throughput(via, &proxy_auth, conns, secs);
        sampler.0.store(true, Ordering::Relaxed);
        let peak = sampler.1.join().unwrap_or((0, 0));
        load_sample = (load_sample.0.max(peak.0), load_sample.1.max(peak.1));
        r.line(format!(
            "requests/s, {conns:>2} connection(s)    direct {direct_rps:>8.0}   proxy {proxy_rps:>8.0}   ({:.2}× direct; failed {})",
            proxy_rps / direct_rps,
            df + pf
        ));
        rps.push(json!({"connections": conns, "direct": direct_rps, "proxy": proxy_rps, "ratio": proxy_rps / direct_rps, "failed": df + pf}));
    }
    // The rows above share every CPU between the load generator, the fake
    // upstream and the proxy, so the proxy's syscalls come out of the
    // others' budget. Here the CPUs are split as when the upstream is
    // another machine: client and fake on CPU 0 both ways, the daemon
    // alone on CPU 1. What is left is what the proxy itself limits.
    if num_cpus() >= 2 {
        let all = format!("0-{}", num_cpus() - 1);
        taskset(std::process::id(), "0");
        taskset(pid, "1");
        let (direct_rps, df) = throughput(up.addr, &direct_auth, 16, secs);
        let (proxy_rps, pf) = throughput(via, &proxy_auth, 16, secs);
        taskset(std::process::id(), &all);
        taskset(pid, &all);
        r.line(format!(
            "requests/s, 16, proxy own CPU  direct {direct_rps:>8.0}   proxy {proxy_rps:>8.0}   ({:.2}× direct; failed {}; client and fake on CPU 0, daemon on CPU 1)",
            proxy_rps / direct_rps,
            df + pf
        ));
        rps.push(json!({"connections": 16, "split_cpus": true, "direct": direct_rps, "proxy": proxy_rps, "ratio": proxy_rps / direct_rps, "failed": df + pf}));
    }

    // Time to the first SSE event.
    let mut d_sse = first_event(up.addr, &direct_auth, 200);
    let mut p_sse = first_event(via, &proxy_auth, 200);
    let (dsm, psm) = (pct(&mut d_sse, 0.5), pct(&mut p_sse, 0.5));
    let (dsp, psp) = (pct(&mut d_sse, 0.99), pct(&mut p_sse, 0.99));
    r.line(format!(
        "first SSE event                direct median {:>7.1} p99 {:>7.1}   proxy median {:>7.1} p99 {:>7.1}",
        us(dsm), us(dsp), us(psm), us(psp)
    ));

    // Rotations under load: 16 clients with one stale local key, a
    // revoke-at-once rotation every 10 ms.
    let stop = AtomicBool::new(false);
    let rotations = AtomicU64::new(0);
    let t = Instant::now();
    let results: Vec<(Vec<u64>, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|_| s.spawn(|| request_loop(via, &proxy_auth, secs, &stop)))
            .collect();
        while t.elapsed().as_secs_f64() < secs {
            token = rotate(&d);
            rotations.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    let _ = &token;
    let n: usize = results.iter().map(|(l, _)| l.len()).sum();
    let failed: u64 = results.iter().map(|(_, f)| f).sum();
    let st = control::call(&d.socket, &Request::Status).expect("status");
    let p = &st["proxies"][0];
    if failed > 0 {
        r.line(format!("  failures: {}", p));
    }
    let rot = rotations.load(Ordering::Relaxed);
    r.line(format!(
        "connections the fake accepted  {} (direct clients and the proxy's pool)",
        up.state.lock().connections
    ));
    r.line(format!(
        "rotations under load           {rot} rotations, {n} requests over 16 connections: {failed} failed, {} retried after a rotation in flight",
        p["retries"]
    ));
    std::thread::sleep(Duration::from_millis(500));
    let (rss_after, threads_after, _, _) = proc_stat(pid);
    r.line(format!(
        "daemon (one mount + the proxy)  RSS idle {:.1} MiB, {threads_idle} threads; under 16-connection load peak {:.1} MiB, {} threads; after {:.1} MiB, {threads_after} threads",
        rss_idle as f64 / 1024.0,
        load_sample.0 as f64 / 1024.0,
        load_sample.1,
        rss_after as f64 / 1024.0
    ));
    r.put(
        "proxy",
        json!({
            "latency_us": {"direct_median": us(dm), "direct_p99": us(dp), "proxy_median": us(pm), "proxy_p99": us(pp), "added_median": us(pm.saturating_sub(dm)), "added_p99": us(pp.saturating_sub(dp))},
            "rps": rps,
            "first_sse_event_us": {"direct_median": us(dsm), "direct_p99": us(dsp), "proxy_median": us(psm), "proxy_p99": us(psp)},
            "rotations": {"rotations": rot, "requests": n, "failed": failed, "retries": p["retries"]},
            "rss_kib": {"idle": rss_idle, "load_peak": load_sample.0, "after": rss_after},
            "threads": {"idle": threads_idle, "load_peak": load_sample.1, "after": threads_after},
        }),
    );
    drop(d);
    let _ = fs::remove_dir_all(&root);
}
