//! A fake OAuth provider on 127.0.0.1: a token endpoint issuing single-use,
//! rotating refresh tokens (a reused one is answered `invalid_grant` or
//! `refresh_token_reused` and counted), short-lived access tokens (opaque
//! or JWTs with `exp` and a ChatGPT account claim), the client-credentials
//! grant, fault injection, and an API (`GET /api`) that accepts only
//! currently valid access tokens.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Token-endpoint connections are closed without an answer.
    Down,
    /// The token endpoint answers this status.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooMany(u64),
    /// The token endpoint answers after this delay.
    Slow(Duration),
    /// 200 with a body that is not a token response.
    Garbage,
}

/// How a reused refresh token is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reuse {
    /// Anthropic-style: 400 `{"error": "invalid_grant"}`.
    InvalidGrant,
    /// OpenAI-style: 401 `{"error": {"code": "refresh_token_reused"}}`.
    Reused401,
}

pub struct Access {
    pub created: Instant,
    pub expires: Instant,
    pub revoked: Option<Instant>,
}

pub struct Refresh {
    pub issued: Instant,
    pub spent: Option<Instant>,
    pub revoked: bool,
}

pub struct State {
    pub access: HashMap<String, Access>,
    pub refresh: HashMap<String, Refresh>,
    /// (when, grant_type) of every token-endpoint call that reached the handler.
    pub calls: Vec<(Instant, String)>,
    /// Refresh tokens presented a second time.
    pub reuses: usize,
    /// Refresh tokens presented that were never issued (decoys, garbage).
    pub unknown: usize,
    pub lifetime: Duration,
    pub omit_expires_in: bool,
    pub jwt: bool,
    pub reuse: Reuse,
    pub fault: Fault,
    /// (client_id, secret) accepted for the client-credentials grant.
    pub client: Option<(String, String)>,
    /// Content types seen at the token endpoint.
    pub content_types: Vec<String>,
    /// client_id values seen in bodies.
    pub client_ids: Vec<String>,
    /// (when, authorised) of every call to a client API.
    pub api_calls: Vec<(Instant, bool)>,
    n: u64,
}

#[derive(Clone)]
pub struct Fake {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

pub fn b64url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |a, b| (a << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            _ => 63,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn nonce(n: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    format!(
        "{:024x}",
        (t ^ (n as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0x2545_F491_4F6C_DD1D)
            & ((1u128 << 96) - 1)
    )
}

impl State {
    /// A new access token (and refresh token when `with_refresh`).
    fn issue(&mut self, with_refresh: bool) -> serde_json::Value {
        self.n += 1;
        let now = Instant::now();
        let exp = SystemTime::now() + self.lifetime;
        let exp_secs = exp
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64().ceil() as u64)
            .unwrap_or(0);
        let access = if self.jwt {
            let claims = serde_json::json!({"exp": exp_secs, "n": self.n, "x": nonce(self.n),
                "https://api.openai.com/auth": {"chatgpt_account_id": "acct-fake-0001", "chatgpt_plan_type": "plus", "chatgpt_user_id": "user-fake"}});
            format!(
                "{}.{}.sig",
                b64url(br#"{"alg":"none","typ":"JWT"}"#),
                b64url(claims.to_string().as_bytes())
            )
        } else {
            format!("at-{:06}-{}", self.n, nonce(self.n))
        };
        self.access.insert(
            access.clone(),
            Access {
                created: now,
                expires: now + self.lifetime,
                revoked: None,
            },
        );
        let mut body = serde_json::json!({"access_token": access, "token_type": "Bearer"});
        if !self.omit_expires_in {
            body["expires_in"] = self.lifetime.as_secs_f64().into();
        }
        if with_refresh {
            let refresh = format!("rt-{:06}-{}", self.n, nonce(self.n + 7));
            self.refresh.insert(
                refresh.clone(),
                Refresh {
                    issued: now,
                    spent: None,
                    revoked: false,
                },
            );
            body["refresh_token"] = refresh.into();
            let claims = serde_json::json!({"exp": exp_secs, "email": "someone@example.com",
                "https://api.openai.com/auth": {"chatgpt_account_id": "acct-fake-0001", "chatgpt_plan_type": "plus", "chatgpt_user_id": "user-fake"}});
            body["id_token"] = format!(
                "{}.{}.sig",
                b64url(br#"{"alg":"none"}"#),
                b64url(claims.to_string().as_bytes())
            )
            .into();
        }
        body
    }

    /// A refresh as the server sees it.
    fn refresh(&mut self, token: &str) -> (u16, serde_json::Value) {
        let reuse = self.reuse;
        match self.refresh.get_mut(token) {
            None => {
                self.unknown += 1;
                (
                    400,
                    serde_json::json!({"error": "invalid_grant", "error_description": "unknown refresh token"}),
                )
            }
            Some(r) if r.revoked => (400, serde_json::json!({"error": "invalid_grant"})),
            Some(r) if r.spent.is_some() => {
                self.reuses += 1;
                match reuse {
                    Reuse::InvalidGrant => (400, serde_json::json!({"error": "invalid_grant"})),
                    Reuse::Reused401 => (
                        401,
                        serde_json::json!({"error": {"code": "refresh_token_reused", "message": "already used"}}),
                    ),
                }
            }
            Some(r) => {
                r.spent = Some(Instant::now());
                (200, self.issue(true))
            }
        }
    }

    fn access_valid(&self, token: &str) -> bool {
        self.access
            .get(token)
            .is_some_and(|a| a.revoked.is_none() && a.expires > Instant::now())
    }
}

impl Fake {
    pub fn start(lifetime: Duration) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            access: HashMap::new(),
            refresh: HashMap::new(),
            calls: Vec::new(),
            reuses: 0,
            unknown: 0,
            lifetime,
            omit_expires_in: false,
            jwt: false,
            reuse: Reuse::InvalidGrant,
            fault: Fault::None,
            client: None,
            content_types: Vec::new(),
            client_ids: Vec::new(),
            api_calls: Vec::new(),
            n: 0,
        }));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Fake { url, state }
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url)
    }

    /// A human login: a fresh (access, refresh) pair.
    pub fn login(&self) -> (String, String) {
        let body = self.state.lock().issue(true);
        (
            body["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// A consumer refreshing on its own with `refresh` (as Claude Code
    /// would): the new (access, refresh), or the error status.
    pub fn consumer_refresh(&self, refresh: &str) -> Result<(String, String), u16> {
        let (status, body) = self.state.lock().refresh(refresh);
        if status != 200 {
            return Err(status);
        }
        Ok((
            body["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            body["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ))
    }

    pub fn set_fault(&self, f: Fault) {
        self.state.lock().fault = f;
    }

    /// Token-endpoint calls that reached the handler (faults included).
    pub fn calls(&self) -> usize {
        self.state.lock().calls.len()
    }

    pub fn reuses(&self) -> usize {
        self.state.lock().reuses
    }

    pub fn unknown(&self) -> usize {
        self.state.lock().unknown
    }

    /// Every issued refresh token is revoked (e.g. the user logged out
    /// everywhere): the next refresh is `invalid_grant`.
    pub fn revoke_all(&self) {
        let mut st = self.state.lock();
        for r in st.refresh.values_mut() {
            r.revoked = true;
        }
    }

    pub fn revoke_access(&self, token: &str) {
        if let Some(a) = self.state.lock().access.get_mut(token) {
            a.revoked = Some(Instant::now());
        }
    }

    pub fn access_valid(&self, token: &str) -> bool {
        self.state.lock().access_valid(token)
    }

    /// Whether `token` was a working access token at some instant of
    /// [`from`, `to`].
    pub fn access_valid_during(&self, token: &str, from: Instant, to: Instant) -> bool {
        self.state.lock().access.get(token).is_some_and(|a| {
            a.created <= to && a.expires > from && a.revoked.is_none_or(|r| r > from)
        })
    }

    /// Whether `token` was an unspent refresh token at some instant of
    /// [`from`, `to`].
    pub fn refresh_live_during(&self, token: &str, from: Instant, to: Instant) -> bool {
        self.state
            .lock()
            .refresh
            .get(token)
            .is_some_and(|r| r.issued <= to && !r.revoked && r.spent.is_none_or(|s| s > from))
    }

    pub fn is_issued_refresh(&self, token: &str) -> bool {
        self.state.lock().refresh.contains_key(token)
    }
}

fn form_decode(s: &str) -> HashMap<String, String> {
    fn dec(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                    out.push(u8::from_str_radix(h, 16).unwrap_or(0));
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    s.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (dec(k), dec(v)))
        .collect()
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
    let (mut auth, mut ctype, mut len) = (String::new(), String::new(), 0usize);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("content-type:") {
            ctype = v.trim().to_string();
        }
        if lower.starts_with("authorization:") {
            auth = h["authorization:".len()..].trim().to_string();
        }
    }
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    let text = String::from_utf8_lossy(&body).into_owned();
    let params: HashMap<String, String> = if ctype.starts_with("application/json") {
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .map(|m| {
                m.into_iter()
                    .map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        form_decode(&text)
    };

    let bearer = auth.strip_prefix("Bearer ").unwrap_or("").to_string();
    if path.contains("/v1/messages") && method == "POST" {
        // The Anthropic Messages API (what Claude Code speaks).
        let ok = {
            let mut st = state.lock();
            let ok = st.access_valid(&bearer);
            st.api_calls.push((Instant::now(), ok));
            ok
        };
        let (status, ctype, text) = if ok {
            (200, "text/event-stream", messages_sse())
        } else {
            (401, "application/json", r#"{"type":"error","error":{"type":"authentication_error","message":"OAuth token has expired."}}"#.to_string())
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        return;
    }
    if path.ends_with("/responses") || path.contains("/wham/") {
        // The APIs a real client calls (Codex: the Responses API, its
        // account check): only a currently valid access token is served.
        let ok = state.lock().access_valid(&bearer);
        state.lock().api_calls.push((Instant::now(), ok));
        let (status, ctype, text) = match (ok, path.ends_with("/responses")) {
            (false, _) => (
                401,
                "application/json",
                r#"{"error":{"code":"invalid_token","message":"expired"}}"#.to_string(),
            ),
            (true, false) => (200, "application/json", "{}".to_string()),
            (true, true) => (200, "text/event-stream", responses_sse()),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
        return;
    }
    let (status, reply, extra) = match (method.as_str(), path.as_str()) {
        ("GET", "/api") => {
            let bearer = auth.strip_prefix("Bearer ").unwrap_or("");
            if state.lock().access_valid(bearer) {
                (200, serde_json::json!({"ok": true}), String::new())
            } else {
                (
                    401,
                    serde_json::json!({"error": "invalid_token"}),
                    String::new(),
                )
            }
        }
        ("POST", "/token") | ("POST", "/v1/oauth/token") | ("POST", "/oauth/token") => {
            let fault = {
                let mut st = state.lock();
                st.calls.push((
                    Instant::now(),
                    params.get("grant_type").cloned().unwrap_or_default(),
                ));
                st.content_types.push(ctype.clone());
                if let Some(c) = params.get("client_id") {
                    st.client_ids.push(c.clone());
                }
                st.fault
            };
            match fault {
                Fault::Down => return,
                Fault::Status(code) => (
                    code,
                    serde_json::json!({"error": "server_error"}),
                    String::new(),
                ),
                Fault::TooMany(secs) => (
                    429,
                    serde_json::json!({"error": "rate_limited"}),
                    format!("Retry-After: {secs}\r\n"),
                ),
                Fault::Garbage => (200, serde_json::json!({"hello": "world"}), String::new()),
                Fault::Slow(d) => {
                    std::thread::sleep(d);
                    let (s, r) = token(&params, &auth, state);
                    (s, r, String::new())
                }
                Fault::None => {
                    let (s, r) = token(&params, &auth, state);
                    (s, r, String::new())
                }
            }
        }
        _ => (
            404,
            serde_json::json!({"error": "not_found"}),
            String::new(),
        ),
    };
    let text = reply.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{text}",
        text.len()
    );
}

fn token(
    params: &HashMap<String, String>,
    auth: &str,
    state: &Mutex<State>,
) -> (u16, serde_json::Value) {
    let mut st = state.lock();
    match params.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {
            let t = params.get("refresh_token").cloned().unwrap_or_default();
            st.refresh(&t)
        }
        Some("client_credentials") => {
            let basic = auth
                .strip_prefix("Basic ")
                .map(|b| String::from_utf8_lossy(&b64_decode(b)).into_owned())
                .unwrap_or_default();
            match &st.client {
                Some((id, secret)) if basic == format!("{id}:{secret}") => (200, st.issue(false)),
                _ => (401, serde_json::json!({"error": "invalid_client"})),
            }
        }
        _ => (400, serde_json::json!({"error": "unsupported_grant_type"})),
    }
}

/// A short streamed Responses API reply (what Codex speaks).
fn responses_sse() -> String {
    let ev = |e: &str, d: serde_json::Value| format!("event: {e}\ndata: {d}\n\n");
    let item = serde_json::json!({"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": "hi from the fake", "annotations": []}]});
    let response = serde_json::json!({"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
        "model": "test-model", "output": [item],
        "usage": {"input_tokens": 1, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 4}});
    let mut started = response.clone();
    started["status"] = "in_progress".into();
    started["output"] = serde_json::json!([]);
    [
        ev("response.created", serde_json::json!({"type": "response.created", "response": started})),
        ev("response.output_item.added", serde_json::json!({"type": "response.output_item.added", "output_index": 0, "item": item})),
        ev("response.output_text.delta", serde_json::json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "hi from the fake"})),
        ev("response.output_item.done", serde_json::json!({"type": "response.output_item.done", "output_index": 0, "item": item})),
        ev("response.completed", serde_json::json!({"type": "response.completed", "response": response})),
    ]
    .concat()
}

/// A short streamed Messages API reply.
fn messages_sse() -> String {
    let ev = |e: &str, d: &str| format!("event: {e}\ndata: {d}\n\n");
    [
        ev("message_start", r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}"#),
        ev("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#),
        ev("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi from the fake"}}"#),
        ev("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        ev("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":3}}"#),
        ev("message_stop", r#"{"type":"message_stop"}"#),
    ]
    .concat()
}
