//! A fake Databricks workspace on 127.0.0.1 that really tracks tokens:
//! create, delete, list, expiry, `scim/v2/Me`; rejects unknown, revoked or
//! expired tokens; counts calls; and injects faults.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Connections are closed without an answer.
    Down,
    /// Every call answers this status.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooMany(u64),
    /// Answers after this delay.
    Slow(Duration),
}

pub struct Token {
    pub id: String,
    pub created: Instant,
    pub expires: Instant,
    pub revoked: Option<Instant>,
    pub comment: String,
}

#[derive(Default)]
pub struct State {
    pub tokens: HashMap<String, Token>,
    pub calls: HashMap<String, Vec<Instant>>,
    /// The bearer token of every call, in order (endpoint, token).
    pub bearers: Vec<(String, String)>,
    next_id: u64,
    fault: Option<Fault>,
}

impl State {
    fn issue(&mut self, lifetime: Duration, comment: &str) -> (String, String) {
        self.next_id += 1;
        let id = format!("tok{:04}", self.next_id);
        let value = format!("dapi{:032x}", rand_u128(self.next_id));
        let now = Instant::now();
        self.tokens.insert(
            value.clone(),
            Token {
                id: id.clone(),
                created: now,
                expires: now + lifetime,
                revoked: None,
                comment: comment.into(),
            },
        );
        (value, id)
    }

    fn valid(&self, value: &str) -> bool {
        self.tokens
            .get(value)
            .is_some_and(|t| t.revoked.is_none() && t.expires > Instant::now())
    }
}

fn rand_u128(seed: u64) -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    (t ^ (seed as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835))
        .wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[derive(Clone)]
pub struct Fake {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl Fake {
    pub fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Fake { url, state }
    }

    /// A valid PAT, as a human would create in the workspace UI.
    pub fn bootstrap(&self, lifetime: Duration) -> String {
        self.state.lock().issue(lifetime, "created by hand").0
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.lock().fault = Some(f);
    }

    pub fn calls(&self, what: &str) -> usize {
        self.state.lock().calls.get(what).map_or(0, Vec::len)
    }

    pub fn call_times(&self, what: &str) -> Vec<Instant> {
        self.state
            .lock()
            .calls
            .get(what)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `value` was a working token at some instant of [`from`, `to`]
    /// (a read that started before a mint may see the new token).
    pub fn valid_during(&self, value: &str, from: Instant, to: Instant) -> bool {
        self.state.lock().tokens.get(value).is_some_and(|t| {
            t.created <= to && t.expires > from && t.revoked.is_none_or(|r| r > from)
        })
    }

    /// Tokens sent to `endpoint`, in order.
    pub fn bearers(&self, endpoint: &str) -> Vec<String> {
        let st = self.state.lock();
        st.bearers
            .iter()
            .filter(|(e, _)| e == endpoint)
            .map(|(_, t)| t.clone())
            .collect()
    }

    pub fn is_valid(&self, value: &str) -> bool {
        self.state.lock().valid(value)
    }

    pub fn all_values(&self) -> Vec<String> {
        self.state.lock().tokens.keys().cloned().collect()
    }

    pub fn live(&self) -> usize {
        let st = self.state.lock();
        st.tokens.keys().filter(|k| st.valid(k)).count()
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(clone) = conn.try_clone() else { return };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let (mut auth, mut len) = (String::new(), 0usize);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            auth = h["authorization:".len()..]
                .trim()
                .trim_start_matches("Bearer ")
                .to_string();
        }
    }
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);

    let fault = {
        let mut st = state.lock();
        st.calls
            .entry(endpoint(&method, &path).to_string())
            .or_default()
            .push(Instant::now());
        st.bearers
            .push((endpoint(&method, &path).to_string(), auth.clone()));
        st.fault.unwrap_or(Fault::None)
    };
    let (status, reply, extra) = match fault {
        Fault::Down => return,
        Fault::Status(code) => (
            code,
            serde_json::json!({"error_code": "INTERNAL_ERROR"}),
            String::new(),
        ),
        Fault::TooMany(secs) => (
            429,
            serde_json::json!({"error_code": "REQUEST_LIMIT_EXCEEDED"}),
            format!("Retry-After: {secs}\r\n"),
        ),
        Fault::Slow(d) => {
            std::thread::sleep(d);
            let (s, r) = handle(&method, &path, &auth, &body, state);
            (s, r, String::new())
        }
        Fault::None => {
            let (s, r) = handle(&method, &path, &auth, &body, state);
            (s, r, String::new())
        }
    };
    let text = reply.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{text}",
        text.len()
    );
}

fn handle(
    method: &str,
    path: &str,
    auth: &str,
    body: &serde_json::Value,
    state: &Mutex<State>,
) -> (u16, serde_json::Value) {
    let mut st = state.lock();
    let what = endpoint(method, path);
    if what == "unknown" {
        return (404, serde_json::json!({"error_code": "ENDPOINT_NOT_FOUND"}));
    }
    if !st.valid(auth) {
        return (
            403,
            serde_json::json!({"error_code": "PERMISSION_DENIED", "message": "Invalid access token."}),
        );
    }
    match what {
        "me" => (200, serde_json::json!({"userName": "someone@example.com"})),
        "create" => {
            let life = Duration::from_secs(body["lifetime_seconds"].as_u64().unwrap_or(3600));
            let comment = body["comment"].as_str().unwrap_or("").to_string();
            let (value, id) = st.issue(life, &comment);
            let expiry_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| (d + life).as_millis() as i64)
                .unwrap_or(0);
            (
                200,
                serde_json::json!({"token_value": value, "token_info": {"token_id": id, "expiry_time": expiry_ms, "comment": comment}}),
            )
        }
        "delete" => {
            let id = body["token_id"].as_str().unwrap_or("");
            match st
                .tokens
                .values_mut()
                .find(|t| t.id == id && t.revoked.is_none())
            {
                Some(t) => {
                    t.revoked = Some(Instant::now());
                    (200, serde_json::json!({}))
                }
                None => (
                    404,
                    serde_json::json!({"error_code": "RESOURCE_DOES_NOT_EXIST"}),
                ),
            }
        }
        _ => {
            let infos: Vec<_> = st
                .tokens
                .iter()
                .filter(|(k, _)| st.valid(k))
                .map(|(_, t)| serde_json::json!({"token_id": t.id, "comment": t.comment}))
                .collect();
            (200, serde_json::json!({ "token_infos": infos }))
        }
    }
}

/// The name calls are counted under.
fn endpoint(method: &str, path: &str) -> &'static str {
    match (method, path) {
        ("GET", "/api/2.0/preview/scim/v2/Me") => "me",
        ("POST", "/api/2.0/token/create") => "create",
        ("POST", "/api/2.0/token/delete") => "delete",
        ("GET", "/api/2.0/token/list") => "list",
        _ => "unknown",
    }
}
