//! The loopback auth proxy against a fake upstream that accepts only the
//! currently valid token (revoked at once on rotation). Most tests run the
//! proxy module in-process with a `Store` (no FUSE); the last one goes
//! through `tokenfs mount`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::http::{Conn, Upstream};
use tokenfs::preset::parse_config;
use tokenfs::proxy::{Proxies, Proxy};
use tokenfs::secret::Secret;
use tokenfs::store::{Store, Update};

/// A push credential `db`, a proxy `llm` to `UPSTREAM/base`, and a helper
/// that rotates like a minting source: mint, publish, revoke the old one.
struct Rig {
    up: Upstream,
    store: Arc<Store>,
    proxies: Proxies,
    token: parking_lot::Mutex<String>,
    n: AtomicU64,
}

impl Rig {
    fn start(extra: &str) -> Rig {
        Rig::start_on(Upstream::start(), extra)
    }

    fn start_on(up: Upstream, extra: &str) -> Rig {
        let toml = format!(
            "[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"llm\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\ncredential = \"db\"\n{extra}",
            up.url("/base")
        );
        let cfg = parse_config(Path::new("t.toml"), &toml).expect("config");
        let store = Arc::new(Store::new([("db", "push")]));
        let proxies = Proxies::start(&cfg.proxies, store.clone()).expect("start");
        let rig = Rig {
            up,
            store,
            proxies,
            token: parking_lot::Mutex::new(String::new()),
            n: AtomicU64::new(0),
        };
        rig.rotate();
        rig
    }

    fn proxy(&self) -> &Arc<Proxy> {
        self.proxies.get("llm").expect("proxy")
    }

    fn key(&self) -> String {
        self.proxy().local_key().expose_str().to_owned()
    }

    fn conn(&self) -> Conn {
        Conn::connect(self.proxy().local_addr())
    }

    /// Mint → publish → revoke the previous token at once.
    fn rotate(&self) -> String {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let new = common::token(&format!("r{n}x"), 36);
        self.up.mint(&new);
        self.store
            .publish("db", Update::token(Secret::new(new.clone())))
            .expect("publish");
        let old = std::mem::replace(&mut *self.token.lock(), new.clone());
        if !old.is_empty() {
            self.up.revoke(&old);
        }
        new
    }

    fn bearer(&self) -> Vec<u8> {
        format!("Bearer {}", self.key()).into_bytes()
    }
}

#[test]
fn one_keep_alive_client_with_one_key_sees_no_auth_failure_across_20_rotations() {
    let rig = Rig::start("");
    let mut conn = rig.conn();
    let auth = rig.bearer();
    let done = AtomicBool::new(false);
    let (mut sent, mut failed) = (0u64, Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(15));
                rig.rotate();
            }
            done.store(true, Ordering::Relaxed);
        });
        // Until the last rotation, and some requests after it.
        let mut after = 0;
        while after < 20 {
            if done.load(Ordering::Relaxed) {
                after += 1;
            }
            let r = conn.request(
                "POST",
                "/v1/chat/completions",
                &[
                    ("authorization", &auth),
                    ("content-type", b"application/json"),
                ],
                b"{\"messages\":[]}",
            );
            sent += 1;
            if r.status != 200 {
                failed.push((r.status, r.text()));
            }
        }
    });
    assert!(failed.is_empty(), "{failed:?}");
    assert!(sent > 40, "only {sent} requests");
    let st = rig.proxy().status();
    assert_eq!(st.connections, 1, "one keep-alive connection: {st:?}");
    assert_eq!(st.auth_failures, 0, "{st:?}");
    assert_eq!(st.requests, sent);
    // Every request the upstream accepted carried the token current then.
    let seen = rig.up.seen();
    assert_eq!(
        seen.iter().filter(|s| s.authorised).count() as u64,
        sent,
        "rejected at the upstream (then retried): {}",
        seen.iter().filter(|s| !s.authorised).count()
    );
}

#[test]
fn a_request_in_flight_across_a_rotation_is_retried_once_and_succeeds() {
    let rig = Rig::start("retry_body_limit = 1024\n");
    let auth = rig.bearer();
    let body = b"{\"prompt\":\"hello\"}";
    let first = rig.token.lock().clone();
    std::thread::scope(|s| {
        s.spawn(|| {
            // The upstream waits 400 ms before it checks the token.
            std::thread::sleep(Duration::from_millis(150));
            rig.rotate();
        });
        let r = rig
            .conn()
            .request("POST", "/slow?ms=400", &[("authorization", &auth)], body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, body);
    });
    let st = rig.proxy().status();
    assert_eq!((st.retries, st.auth_failures), (1, 0), "{st:?}");
    let seen: Vec<_> = rig
        .up
        .seen()
        .into_iter()
        .filter(|s| s.target.starts_with("/base/slow"))
        .collect();
    assert_eq!(seen.len(), 2, "sent twice");
    assert!(!seen[0].authorised && seen[1].authorised);
    let sent_with = |s: &common::http::Seen| s.header("authorization").map(<[u8]>::to_vec);
    assert_eq!(
        sent_with(&seen[0]),
        Some(format!("Bearer {first}").into_bytes())
    );
    assert_eq!(seen[1].body, body, "the replay carries the same body");

    // A body above retry_body_limit streams and is not retried: the 401
    // reaches the client and is counted.
    let big = vec![b'x'; 4096];
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(150));
            rig.rotate();
        });
        let r = rig
            .conn()
            .request("POST", "/slow?ms=400", &[("authorization", &auth)], &big);
        assert_eq!(r.status, 401);
    });
    let st = rig.proxy().status();
    assert_eq!((st.retries, st.auth_failures), (1, 1), "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or("")
            .contains("retry_body_limit"),
        "{st:?}"
    );
}

#[test]
fn the_first_sse_event_reaches_the_client_before_the_upstream_sends_its_last() {
    let rig = Rig::start("");
    let mut conn = rig.conn();
    let t0 = Instant::now();
    conn.send(
        "GET",
        "/sse?n=5&gap_ms=250",
        &[
            ("x-api-key", rig.key().as_bytes()),
            ("accept", b"text/event-stream"),
        ],
        b"",
    );
    let head = conn.read_head();
    assert_eq!(head.first[1], "200");
    assert_eq!(head.get("content-type"), Some(&b"text/event-stream"[..]));
    let mut events = Vec::new();
    while let Some(chunk) = common::http::read_chunk(&mut conn.r) {
        events.push((Instant::now(), chunk));
    }
    let text: Vec<u8> = events.iter().flat_map(|(_, c)| c.clone()).collect();
    let expected: String = (0..5)
        .map(|i| format!("event: delta\ndata: {{\"i\":{i}}}\n\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&text), expected);
    let sent = rig.up.state.lock().sse_sent.clone();
    assert_eq!(sent.len(), 5);
    let first_seen = events[0].0;
    assert!(
        first_seen < sent[4],
        "first event at {:?}, the upstream's last at {:?}",
        first_seen - t0,
        sent[4] - t0
    );
    // Each event arrives on its own, about when it was sent.
    assert_eq!(events.len(), 5, "one chunk per event");
    for (i, ((got, _), sent)) in events.iter().zip(&sent).enumerate() {
        assert!(
            got.duration_since(*sent) < Duration::from_millis(200),
            "event {i} arrived {:?} after it was sent",
            got.duration_since(*sent)
        );
    }
    // The connection stays usable.
    let r = conn.request("GET", "/echo", &[("x-api-key", rig.key().as_bytes())], b"");
    assert_eq!(r.status, 200);
}

#[test]
fn headers_and_bodies_pass_byte_exact() {
    let rig = Rig::start("");
    let key = rig.key();
    let auth = rig.bearer();
    let mut conn = rig.conn();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let custom: Vec<(&str, &[u8])> = vec![
        ("authorization", &auth),
        ("Content-Type", b"application/octet-stream"),
        ("X-Request-Id", b"abc-123"),
        ("X-Multi", b"one"),
        ("X-Multi", b"two, three"),
        ("X-Bin", b"\x80\xfe\xff obs-text"),
        ("User-Agent", b"tokenfs-test/1.0 (linux)"),
        ("Accept-Encoding", b"gzip, br"),
        ("Connection", b"keep-alive, x-hop"),
        ("X-Hop", b"dropped: listed in Connection"),
        ("Keep-Alive", b"timeout=5"),
    ];
    let target = "/v1/echo?q=a%20b&x=1&empty=&utf8=%C3%A9";
    let r = conn.request("PUT", target, &custom, &binary);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, binary, "response body");
    let seen = rig.up.seen().pop().expect("seen");
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, format!("/base{target}"));
    assert_eq!(seen.body, binary, "request body");
    let want_host = rig.up.addr.to_string().into_bytes();
    assert_eq!(seen.header("host"), Some(want_host.as_slice()));
    let token = rig.token.lock().clone();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {token}").as_bytes())
    );
    // Every end-to-end header arrived with its bytes and order.
    let forwarded: Vec<(String, Vec<u8>)> = seen
        .headers
        .iter()
        .filter(|(n, _)| {
            !["host", "authorization", "content-length"].contains(&n.to_ascii_lowercase().as_str())
        })
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    let expected: Vec<(String, Vec<u8>)> = custom
        .iter()
        .filter(|(n, _)| {
            !["authorization", "connection", "x-hop", "keep-alive"]
                .contains(&n.to_ascii_lowercase().as_str())
        })
        .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec()))
        .collect();
    assert_eq!(forwarded, expected);
    assert_eq!(
        seen.header("content-length"),
        Some(binary.len().to_string().as_bytes())
    );
    for (n, v) in &seen.headers {
        assert!(
            !v.windows(key.len()).any(|w| w == key.as_bytes()),
            "the local key reached the upstream in {n}"
        );
    }

    // Response headers: repeated ones, obs-text, cookies.
    let r = conn.request("GET", "/headers", &[("authorization", &auth)], b"");
    assert_eq!(
        r.get_all_pairs(),
        vec![
            ("x-multi".to_string(), b"one".to_vec()),
            ("x-multi".to_string(), b"two, three".to_vec()),
            ("x-bin".to_string(), b"\x80\xfe\xff obs-text".to_vec()),
            ("set-cookie".to_string(), b"a=1; Path=/; HttpOnly".to_vec()),
            ("set-cookie".to_string(), b"b=2".to_vec()),
            (
                "content-type".to_string(),
                b"text/plain; charset=utf-8".to_vec()
            ),
        ]
    );
    assert_eq!(r.body, b"headers");

    // Binary download, HEAD, 204 and an error status pass as they are.
    let r = conn.request("GET", "/bytes?len=300000", &[("authorization", &auth)], b"");
    let want: Vec<u8> = (0..300_000usize).map(|i| (i * 7 + i / 251) as u8).collect();
    assert!(r.status == 200 && r.body == want);
    let r = conn.request("HEAD", "/bytes?len=5", &[("authorization", &auth)], b"");
    assert_eq!(
        (r.status, r.head.get("content-length")),
        (200, Some(&b"5"[..]))
    );
    let r = conn.request("DELETE", "/status/204", &[("authorization", &auth)], b"");
    assert_eq!(r.status, 204);
    let r = conn.request("GET", "/status/500", &[("authorization", &auth)], b"");
    assert_eq!(r.status, 500);

    // 10 MiB uploads, with a length and chunked: streamed through, echoed back.
    let big: Vec<u8> = (0..10 << 20)
        .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = conn.request("POST", "/echo", &[("authorization", &auth)], &big);
    assert!(
        r.status == 200 && r.body == big,
        "10 MiB with content-length"
    );
    assert_eq!(rig.up.seen().pop().expect("seen").body, big);
    conn.send_chunked("POST", "/echo", &[("authorization", &auth)], &big, 100_000);
    let r = conn.read_response(false);
    assert!(r.status == 200 && r.body == big, "10 MiB chunked");
    let seen = rig.up.seen().pop().expect("seen");
    assert_eq!(seen.body, big);
    assert_eq!(rig.proxy().status().connections, 1);
}

trait Pairs {
    fn get_all_pairs(&self) -> Vec<(String, Vec<u8>)>;
}

impl Pairs for common::http::Response {
    /// The response's headers, but those the proxy's HTTP stack owns.
    fn get_all_pairs(&self) -> Vec<(String, Vec<u8>)> {
        self.head
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .filter(|(n, _)| !["content-length", "date", "transfer-encoding"].contains(&n.as_str()))
            .collect()
    }
}

#[test]
fn a_missing_or_wrong_local_key_is_refused_and_never_reaches_the_upstream() {
    let up = Upstream::start_with("x-api-key", "");
    let rig = Rig::start_on(up, "header = \"x-api-key\"\n");
    let key = rig.key();
    let token = rig.token.lock().clone();
    let mut conn = rig.conn();
    type Headers = Vec<(&'static str, Vec<u8>)>;
    let cases: Vec<(&str, Headers)> = vec![
        ("missing", vec![]),
        (
            "wrong",
            vec![("authorization", b"Bearer tkfs-0000".to_vec())],
        ),
        ("wrong", vec![("x-api-key", format!("{key}x").into_bytes())]),
        // The upstream's own (current!) token is not a local key.
        ("wrong", vec![("x-api-key", token.clone().into_bytes())]),
        (
            "wrong",
            vec![("authorization", format!("Basic {key}").into_bytes())],
        ),
    ];
    for (what, headers) in &cases {
        let h: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let r = conn.request("POST", "/v1/messages", &h, b"{}");
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(&format!("{what} local key")), "{msg}");
        assert!(!msg.contains(&key) && !msg.contains(&token), "{msg}");
    }
    assert!(
        rig.up.seen().is_empty(),
        "a refused request reached the upstream"
    );
    assert_eq!(rig.proxy().status().refused, cases.len() as u64);

    // The key is accepted from whichever header the client uses; the
    // upstream always gets its own header with the current token.
    for (n, v) in [
        ("Authorization", format!("Bearer {key}")),
        ("authorization", format!("bearer {key}")),
        ("x-api-key", key.clone()),
        ("X-Goog-Api-Key", key.clone()),
        ("api-key", key.clone()),
    ] {
        let r = conn.request("GET", "/echo", &[(n, v.as_bytes())], b"");
        assert_eq!(r.status, 200, "{n}");
        let seen = rig.up.seen().pop().expect("seen");
        assert_eq!(seen.header("x-api-key"), Some(token.as_bytes()), "{n}");
        assert!(
            seen.header(n).is_none() || n.eq_ignore_ascii_case("x-api-key"),
            "{n} kept"
        );
    }

    // Health: liveness for anyone, details with the key, the token never.
    let r = conn.request("GET", "/.tokenfs/health", &[], b"");
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v, serde_json::json!({"ok": true, "proxy": "llm"}));
    let r = conn.request(
        "GET",
        "/.tokenfs/health",
        &[("x-api-key", key.as_bytes())],
        b"",
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let fp = Secret::new(token.clone()).fingerprint();
    assert_eq!(v["fingerprint"], fp.as_str());
    assert_eq!(v["credential"], "db.token");
    assert!(v["generation"].as_u64().is_some() && v["age_secs"].as_f64().is_some());
    assert_eq!(v["source"]["state"], "ok");
    assert!(!r.text().contains(&token) && !r.text().contains(&key));
    let r = conn.request(
        "GET",
        "/.tokenfs/other",
        &[("x-api-key", key.as_bytes())],
        b"",
    );
    assert_eq!(r.status, 404);
    assert_eq!(rig.up.seen().len(), 5, "health never reaches the upstream");
}

#[test]
fn an_unreachable_upstream_gives_502_and_a_log_line_without_the_token() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/base", dead.local_addr().expect("addr"));
    drop(dead);
    let toml = format!(
        "[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{url}\"\ncredential = \"db\"\nconnect_timeout = \"2s\"\n"
    );
    let cfg = parse_config(Path::new("t.toml"), &toml).expect("config");
    let store = Arc::new(Store::new([("db", "push")]));
    let proxies = Proxies::start(&cfg.proxies, store.clone()).expect("start");
    let p = proxies.get("down").expect("proxy");
    let key = p.local_key().expose_str().to_owned();
    let mut conn = Conn::connect(p.local_addr());
    // No value yet: 503, said plainly.
    let r = conn.request("GET", "/x", &[("x-api-key", key.as_bytes())], b"");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("has no value yet"), "{}", r.text());
    let token = common::token("down", 40);
    store
        .publish("db", Update::token(Secret::new(token.clone())))
        .expect("publish");
    let r = conn.request("GET", "/x", &[("x-api-key", key.as_bytes())], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["error"]["type"], "upstream_error");
    let st = p.status();
    assert_eq!(st.upstream_errors, 1);
    let last = st.last_error.unwrap_or_default();
    assert!(
        last.contains("502") && last.contains(&Secret::new(token.clone()).fingerprint()),
        "{last}"
    );
    assert!(!last.contains(&token) && !last.contains(&key));
}

#[test]
fn a_listen_address_off_loopback_is_refused_without_allow_remote() {
    let s = common::Scratch::new();
    let cfg = s.write(
        "t.toml",
        "[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"llm\"\nlisten = \"0.0.0.0:4000\"\nupstream = \"https://example.com\"\ncredential = \"db\"\n",
    );
    let out = std::process::Command::new(common::BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("t.toml:5:10: proxy[0].listen: 0.0.0.0 is not a loopback address"),
        "{err}"
    );
}

/// Through `tokenfs mount`: the managed file holds the local key (never the
/// upstream token), a client using it follows 20 revoke-at-once rotations
/// pushed with `tokenfs set`, and neither a trace-level log nor `status`
/// holds a token or the local key.
#[test]
fn end_to_end_through_tokenfs_mount() {
    let s = common::Scratch::new();
    let up = Upstream::start();
    let dir = s.path("home/.hermes");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("config.yaml"),
        common::hermes_yaml("placeholder-key"),
    )
    .expect("write");
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[proxy]]\nname = \"llm\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\ncredential = \"databricks\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"proxy.llm.token\" }}\n",
        s.socket().display(),
        up.url("/serving-endpoints"),
        dir.display()
    );
    let d = common::Daemon::start_env(&s, &cfg, &[&dir], &[("RUST_LOG", "trace")]);
    let mut tokens: Vec<String> = Vec::new();
    rotate(&d, &up, &mut tokens);
    let status = d.status();
    let listen = status["proxies"][0]["listen"]
        .as_str()
        .expect("listen")
        .to_owned();
    let key = tokenfs::control::call(
        &d.socket,
        &tokenfs::control::Request::Token {
            name: "proxy.llm".into(),
            field: None,
        },
    )
    .expect("token")["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert!(key.starts_with("tkfs-") && key.len() >= 37, "{key}");
    // What an agent reads: the local key at its bound position.
    let text = std::fs::read_to_string(dir.join("config.yaml")).expect("read");
    assert!(text.contains(&format!("api_key: {key}")), "{text}");
    let mut conn = Conn::connect(listen.parse().expect("addr"));
    let auth = format!("Bearer {key}").into_bytes();
    let mut failures = Vec::new();
    for i in 0..20 {
        rotate(&d, &up, &mut tokens);
        for _ in 0..3 {
            let r = conn.request("POST", "/v1/chat", &[("authorization", &auth)], b"{}");
            if r.status != 200 {
                failures.push((i, r.status, r.text()));
            }
        }
        let text = std::fs::read_to_string(dir.join("config.yaml")).expect("read");
        assert!(text.contains(&key) && !tokens.iter().any(|t| text.contains(t)));
    }
    assert!(failures.is_empty(), "{failures:?}");
    let r = conn.request("GET", "/v1/chat", &[("authorization", b"Bearer nope")], b"");
    assert_eq!(r.status, 401);
    let seen = up.seen();
    assert_eq!(seen.len(), 60);
    assert!(
        seen.iter()
            .all(|s| s.target == "/serving-endpoints/v1/chat" && s.authorised)
    );

    let json = serde_json::to_string(&d.status()).expect("json");
    let human = std::process::Command::new(common::BIN)
        .args(["status", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("status");
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(
        human.contains("proxy llm") && human.contains("requests 60"),
        "{human}"
    );
    assert!(human.contains("refused 1"), "{human}");
    let p = &d.status()["proxies"][0];
    assert_eq!(
        (p["requests"].as_u64(), p["auth_failures"].as_u64()),
        (Some(60), Some(0))
    );
    let (_, log) = d.stop();
    assert!(log.contains("proxy listening"), "{log}");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was on"
    );
    for (what, text) in [("status --json", &json), ("status", &human), ("log", &log)] {
        assert!(!text.contains(&key), "{what} holds the local key");
        assert!(
            !text.contains(&key[5..]),
            "{what} holds the local key's digits"
        );
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "{what} holds a token");
        }
    }
}

/// Mint → `tokenfs set` → revoke the previous token at once.
fn rotate(d: &common::Daemon, up: &Upstream, tokens: &mut Vec<String>) {
    let t = common::token(&format!("e2e{}x", tokens.len()), 40);
    up.mint(&t);
    d.set("databricks", &t);
    if let Some(old) = tokens.last() {
        up.revoke(old);
    }
    tokens.push(t);
}

/// A CA and a `localhost`/127.0.0.1 server certificate it signed, made by
/// the openssl CLI in `dir`.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tokenfs test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

/// An HTTPS upstream that offers HTTP/2 (ALPN `h2`, then `http/1.1`) and
/// answers `VERSION URI AUTHORISED` for `Authorization: Bearer TOKEN`.
fn tls_h2_upstream(dir: &Path, token: &str) -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("srv.pem"))
        .expect("srv.pem")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(dir.join("srv.key")).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let want = format!("Bearer {token}");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (acc, want) = (acceptor.clone(), want.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acc.accept(s).await else { return };
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let ok = req.headers().get("authorization").map(|v| v.as_bytes())
                                == Some(want.as_bytes());
                            let text = format!("{:?} {} {ok}", req.version(), req.uri());
                            async move {
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    Bytes::from(text),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
    });
    addr
}

#[test]
fn an_https_upstream_is_verified_with_ca_file_and_spoken_to_over_http2() {
    let s = common::Scratch::new();
    let dir = s.path("tls");
    std::fs::create_dir_all(&dir).expect("mkdir");
    make_certs(&dir);
    let token = common::token("tls", 40);
    let addr = tls_h2_upstream(&dir, &token);
    let toml = |extra: &str| {
        format!(
            "[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nupstream = \"https://localhost:{}/base\"\ncredential = \"db\"\n{extra}",
            addr.port()
        )
    };
    let store = Arc::new(Store::new([("db", "push")]));
    store
        .publish("db", Update::token(Secret::new(token.clone())))
        .expect("publish");
    let cfg = parse_config(
        Path::new("t.toml"),
        &toml(&format!("ca_file = \"{}\"\n", dir.join("ca.pem").display())),
    )
    .expect("config");
    let proxies = Proxies::start(&cfg.proxies, store.clone()).expect("start");
    let p = proxies.get("tls").expect("proxy");
    let key = p.local_key().expose_str().to_owned();
    let mut conn = Conn::connect(p.local_addr());
    for _ in 0..3 {
        let r = conn.request(
            "GET",
            "/v1/models?x=1",
            &[("x-api-key", key.as_bytes())],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            format!(
                "HTTP/2.0 https://localhost:{}/base/v1/models?x=1 true",
                addr.port()
            )
        );
    }
    // Without the CA the upstream is not trusted: 502, said in status.
    let cfg = parse_config(Path::new("t.toml"), &toml("")).expect("config");
    let untrusted = Proxies::start(&cfg.proxies, store).expect("start");
    let p = untrusted.get("tls").expect("proxy");
    let key = p.local_key().expose_str().to_owned();
    let r = Conn::connect(p.local_addr()).request(
        "GET",
        "/v1/models",
        &[("x-api-key", key.as_bytes())],
        b"",
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let last = p.status().last_error.unwrap_or_default();
    assert!(last.to_lowercase().contains("certificate"), "{last}");
}

#[test]
fn timeouts_cut_a_silent_stream_and_answer_504_for_a_slow_upstream() {
    let rig = Rig::start("idle_timeout = \"300ms\"\ntimeout = \"1500ms\"\n");
    let key = rig.key();
    let mut conn = rig.conn();
    // No response head within `timeout`: 504.
    let t = Instant::now();
    let r = conn.request(
        "GET",
        "/slow?ms=2500",
        &[("x-api-key", key.as_bytes())],
        b"",
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_millis(2400),
        "{:?}",
        t.elapsed()
    );
    // A stream that goes silent for longer than idle_timeout is cut after
    // the events that came.
    let mut conn = rig.conn();
    conn.send(
        "GET",
        "/sse?n=3&gap_ms=1000",
        &[("x-api-key", key.as_bytes())],
        b"",
    );
    assert_eq!(conn.read_head().first[1], "200");
    let first = common::http::read_chunk(&mut conn.r).expect("first event");
    assert!(String::from_utf8_lossy(&first).contains("\"i\":0"));
    let t = Instant::now();
    assert!(
        common::http::read_chunk(&mut conn.r).is_none(),
        "the stream went on"
    );
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    let st = rig.proxy().status();
    assert_eq!(st.upstream_errors, 2, "{st:?}");
    assert!(
        st.last_error
            .unwrap_or_default()
            .contains("sent nothing for 300ms")
    );
}

#[test]
fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let rig = Rig::start("max_connections = 2\n");
    let key = rig.key();
    let h: &[(&str, &[u8])] = &[("x-api-key", key.as_bytes())];
    let mut a = rig.conn();
    let mut b = rig.conn();
    assert_eq!(a.request("GET", "/echo", h, b"").status, 200);
    assert_eq!(b.request("GET", "/echo", h, b"").status, 200);
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = rig.proxy().local_addr();
    let k = key.clone();
    std::thread::spawn(move || {
        let mut c = Conn::connect(addr);
        let r = c.request("GET", "/echo", &[("x-api-key", k.as_bytes())], b"third");
        let _ = tx.send(r.status);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(400)).is_err(),
        "a third connection was served while two were open"
    );
    drop(a);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(200));
    assert_eq!(b.request("GET", "/echo", h, b"").status, 200);
}

#[test]
fn a_port_in_use_fails_the_start_with_nothing_mounted() {
    common::require_fuse();
    let s = common::Scratch::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = s.path("home/.hermes");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("config.yaml"), common::hermes_yaml("k")).expect("write");
    let cfg = s.write(
        "t.toml",
        &format!(
            "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"llm\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"https://example.com\"\ncredential = \"db\"\n[[mount]]\ndir = \"{}\"\n[[mount.file]]\npath = \"config.yaml\"\nbind = {{ \"model.api_key\" = \"db.token\" }}\n",
            s.socket().display(),
            dir.display()
        ),
    );
    let out = std::process::Command::new(common::BIN)
        .args(["mount", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("proxy `llm`: cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!common::is_mounted(&dir));
    assert_eq!(
        std::fs::read_to_string(dir.join("config.yaml")).expect("read"),
        common::hermes_yaml("k"),
        "the file is untouched"
    );
}

/// A daemon with only a proxy (no mount) to an HTTPS upstream over HTTP/2,
/// logging at trace level (hyper, h2, rustls included): requests pass, and
/// the log holds neither the token nor the local key.
#[test]
fn a_proxy_only_daemon_over_tls_and_http2_logs_no_secret_at_trace_level() {
    let s = common::Scratch::new();
    let dir = s.path("tls");
    std::fs::create_dir_all(&dir).expect("mkdir");
    make_certs(&dir);
    let token = common::token("h2trace", 40);
    let addr = tls_h2_upstream(&dir, &token);
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.db]\nsource = \"push\"\n[[proxy]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nupstream = \"https://localhost:{}/base\"\ncredential = \"db\"\nca_file = \"{}\"\n",
        s.socket().display(),
        addr.port(),
        dir.join("ca.pem").display()
    );
    let d = common::Daemon::start_env(&s, &cfg, &[], &[("RUST_LOG", "trace")]);
    d.set("db", &token);
    let status = d.status();
    let listen: std::net::SocketAddr = status["proxies"][0]["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("listen");
    let key = tokenfs::control::call(
        &d.socket,
        &tokenfs::control::Request::Token {
            name: "proxy.tls".into(),
            field: None,
        },
    )
    .expect("token")["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let mut conn = Conn::connect(listen);
    for _ in 0..3 {
        let r = conn.request(
            "POST",
            "/v1/x",
            &[("authorization", format!("Bearer {key}").as_bytes())],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.text().starts_with("HTTP/2.0 ") && r.text().ends_with(" true"),
            "{}",
            r.text()
        );
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("h2::") && log.contains("hyper_util::"),
        "trace logs of the HTTP/2 stack were on"
    );
    assert!(!log.contains(&token), "the log holds the token");
    assert!(!log.contains(&key[5..]), "the log holds the local key");
}

/// `via_proxy`: presets render the agent's base URL as the proxy's (keeping
/// the path beyond the upstream) and its key as the local key, so the
/// agents' files never hold the upstream token, and requests to the URL
/// the file names reach the upstream with the current token.
#[test]
fn via_proxy_presets_render_the_proxy_url_and_local_key() {
    let s = common::Scratch::new();
    let up = Upstream::start();
    let home = s.path("home");
    let upstream = up.url("/serving-endpoints");
    let old = common::token("viaold", 40);
    s.write(
        "home/.hermes/config.yaml",
        &format!("model:\n  provider: custom\n  base_url: {upstream}\n  api_key: {old}\n  reasoning_effort: none\n"),
    );
    s.write(
        "home/.claude/settings.json",
        &format!("{{\"env\": {{\"ANTHROPIC_BASE_URL\": \"{upstream}/anthropic\", \"ANTHROPIC_AUTH_TOKEN\": \"{old}\"}}}}\n"),
    );
    let cfg = format!(
        "[control]\nsocket = \"{}\"\n[credentials.databricks]\nsource = \"push\"\n[[proxy]]\nname = \"gw\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\ncredential = \"databricks\"\n[[mount]]\npreset = \"hermes\"\nvia_proxy = \"gw\"\n[[mount]]\npreset = \"claude\"\nvia_proxy = \"gw\"\n",
        s.socket().display()
    );
    let home_s = home.display().to_string();
    let (hermes, claude) = (home.join(".hermes"), home.join(".claude"));
    let env = [
        ("HOME", home_s.as_str()),
        ("HERMES_HOME", ""),
        ("CLAUDE_CONFIG_DIR", ""),
    ];
    let d = common::Daemon::start_env(&s, &cfg, &[&hermes, &claude], &env);
    let mut tokens = Vec::new();
    rotate(&d, &up, &mut tokens);
    let status = d.status();
    let url = status["proxies"][0]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    let key = tokenfs::control::call(
        &d.socket,
        &tokenfs::control::Request::Token {
            name: "proxy.gw".into(),
            field: None,
        },
    )
    .expect("token")["secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    let h = std::fs::read_to_string(hermes.join("config.yaml")).expect("read");
    assert_eq!(
        h,
        format!(
            "model:\n  provider: custom\n  base_url: {url}\n  api_key: {key}\n  reasoning_effort: none\n"
        )
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(claude.join("settings.json")).expect("read"))
            .expect("json");
    assert_eq!(c["env"]["ANTHROPIC_BASE_URL"], format!("{url}/anthropic"));
    assert_eq!(c["env"]["ANTHROPIC_AUTH_TOKEN"], key.as_str());
    // What an agent does with them: its base URL + path, its key.
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().expect("addr");
    let mut conn = Conn::connect(addr);
    let auth = format!("Bearer {key}").into_bytes();
    for _ in 0..5 {
        rotate(&d, &up, &mut tokens);
        let r = conn.request(
            "POST",
            "/anthropic/v1/messages",
            &[("authorization", &auth)],
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let h = std::fs::read_to_string(hermes.join("config.yaml")).expect("read");
        assert!(!tokens.iter().any(|t| h.contains(t)), "{h}");
    }
    assert!(
        up.seen()
            .iter()
            .all(|s| s.target == "/serving-endpoints/anthropic/v1/messages" && s.authorised)
    );
}
