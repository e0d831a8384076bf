//! A fake HTTP/1.1 upstream and a raw keep-alive client, both on std
//! sockets (no shared code with the proxy's stack, so what they see is what
//! went over the wire).
//!
//! The upstream accepts only the tokens currently valid (`mint`, `revoke`:
//! revoked tokens fail at once), records what it received, and serves:
//! `…/echo` (the body back), `…/sse?n=N&gap_ms=M` (N events, chunked, one
//! every M ms), `…/slow?ms=M` (waits, *then* checks the token), `…/bytes?len=N`
//! (binary), `…/headers` (odd response headers), `…/status/NNN`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub target: String,
    /// Names as sent (case kept), raw value bytes, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub authorised: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Default)]
pub struct State {
    pub valid: HashSet<String>,
    /// Every request (bodies only when `record_bodies`).
    pub seen: Vec<Seen>,
    /// Keep `seen` at all (benchmarks turn it off).
    pub record: bool,
    pub record_bodies: bool,
    pub accepted: u64,
    pub rejected: u64,
    pub connections: u64,
    /// When each event of the latest `/sse` response was written.
    pub sse_sent: Vec<Instant>,
}

/// The fake upstream. Stops accepting when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    /// The header carrying the token (lowercase) and its prefix.
    header: (String, String),
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Expects `Authorization: Bearer TOKEN`.
    pub fn start() -> Upstream {
        Upstream::start_with("authorization", "Bearer ")
    }

    pub fn start_with(header: &str, prefix: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            record: true,
            record_bodies: true,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let header = (header.to_ascii_lowercase(), prefix.to_owned());
        let (st, hd, sp) = (state.clone(), header.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                st.lock().connections += 1;
                let (st, hd) = (st.clone(), hd.clone());
                std::thread::spawn(move || serve_conn(conn, &st, &hd));
            }
        });
        Upstream {
            addr,
            state,
            header,
            stop,
        }
    }

    pub fn url(&self, base: &str) -> String {
        format!("http://{}{base}", self.addr)
    }

    pub fn mint(&self, token: &str) {
        self.state.lock().valid.insert(token.to_owned());
    }

    pub fn revoke(&self, token: &str) {
        self.state.lock().valid.remove(token);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().seen.clone()
    }

    pub fn header_name(&self) -> &str {
        &self.header.0
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A parsed message head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Request: method; response: status code.
    pub first: Vec<String>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn get_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"))
    }

    fn length(&self) -> Option<usize> {
        self.get("content-length")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Reads a head; `None` at a clean end of stream.
pub fn read_head(r: &mut impl BufRead) -> Option<Head> {
    let mut first = String::new();
    loop {
        first.clear();
        if r.read_line(&mut first).ok()? == 0 {
            return None;
        }
        if !first.trim().is_empty() {
            break;
        }
    }
    let first = first.split_whitespace().map(str::to_owned).collect();
    let mut headers = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).ok()?;
        size += line.len();
        assert!(size < 256 * 1024, "head too large");
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let colon = line.iter().position(|&b| b == b':')?;
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        let value = line[colon + 1..].trim_ascii().to_vec();
        headers.push((name, value));
    }
    Some(Head { first, headers })
}

/// Reads one chunk of a chunked body; `None` after the last (trailers skipped).
pub fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let size = usize::from_str_radix(line.trim().split(';').next()?.trim(), 16).ok()?;
    if size == 0 {
        loop {
            let mut t = String::new();
            if r.read_line(&mut t).ok()? == 0 || t.trim().is_empty() {
                return None;
            }
        }
    }
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(size);
    Some(buf)
}

/// Reads a whole body framed by `head` (`head_request`: none).
pub fn read_body(r: &mut impl BufRead, head: &Head, no_body: bool) -> Vec<u8> {
    if no_body {
        return Vec::new();
    }
    if head.chunked() {
        let mut out = Vec::new();
        while let Some(c) = read_chunk(r) {
            out.extend_from_slice(&c);
        }
        return out;
    }
    let mut out = vec![0; head.length().unwrap_or(0)];
    r.read_exact(&mut out).expect("body");
    out
}

fn query(target: &str, key: &str) -> Option<u64> {
    let q = target.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn serve_conn(conn: TcpStream, state: &Mutex<State>, header: &(String, String)) {
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::with_capacity(64 * 1024, conn);
    while let Some(head) = read_head(&mut r) {
        let method = head.first.first().cloned().unwrap_or_default();
        let target = head.first.get(1).cloned().unwrap_or_default();
        let body = read_body(&mut r, &head, false);
        let path = target.split('?').next().unwrap_or("").to_owned();
        if path.ends_with("/slow") {
            std::thread::sleep(Duration::from_millis(query(&target, "ms").unwrap_or(100)));
        }
        let authorised = {
            let mut st = state.lock();
            let ok = head
                .get(&header.0)
                .and_then(|v| v.strip_prefix(header.1.as_bytes()))
                .and_then(|t| std::str::from_utf8(t).ok())
                .is_some_and(|t| st.valid.contains(t));
            if ok {
                st.accepted += 1;
            } else {
                st.rejected += 1;
            }
            if st.record && st.seen.len() < 100_000 {
                let seen = Seen {
                    method: method.clone(),
                    target: target.clone(),
                    headers: head.headers.clone(),
                    body: if st.record_bodies {
                        body.clone()
                    } else {
                        Vec::new()
                    },
                    authorised: ok,
                };
                st.seen.push(seen);
            }
            ok
        };
        let no_body = method == "HEAD";
        let close = head
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        let ok = if !authorised {
            respond(
                &mut w,
                401,
                &[("content-type", b"application/json".as_slice())],
                b"{\"error\":\"invalid or revoked token\"}",
            )
        } else if path.ends_with("/sse") {
            sse(&mut w, &target, state)
        } else if path.ends_with("/bytes") {
            let len = query(&target, "len").unwrap_or(1024) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            respond_to(
                &mut w,
                200,
                &[("content-type", b"application/octet-stream".as_slice())],
                &bytes,
                no_body,
            )
        } else if path.ends_with("/headers") {
            respond(
                &mut w,
                200,
                &[
                    ("X-Multi", b"one".as_slice()),
                    ("X-Multi", b"two, three".as_slice()),
                    ("X-Bin", b"\x80\xfe\xff obs-text".as_slice()),
                    ("Set-Cookie", b"a=1; Path=/; HttpOnly".as_slice()),
                    ("Set-Cookie", b"b=2".as_slice()),
                    ("Content-Type", b"text/plain; charset=utf-8".as_slice()),
                ],
                b"headers",
            )
        } else if let Some(code) = path
            .rsplit_once("/status/")
            .and_then(|(_, c)| c.parse().ok())
        {
            respond(&mut w, code, &[], b"")
        } else {
            let echo_type = head
                .get("content-type")
                .map(<[u8]>::to_vec)
                .unwrap_or_else(|| b"application/octet-stream".to_vec());
            respond(
                &mut w,
                200,
                &[("content-type", echo_type.as_slice())],
                &body,
            )
        };
        if !ok || close {
            return;
        }
    }
}

fn respond(w: &mut TcpStream, code: u16, headers: &[(&str, &[u8])], body: &[u8]) -> bool {
    respond_to(w, code, headers, body, false)
}

fn respond_to(
    w: &mut TcpStream,
    code: u16,
    headers: &[(&str, &[u8])],
    body: &[u8],
    head_only: bool,
) -> bool {
    let mut out = format!("HTTP/1.1 {code} {}\r\n", reason(code)).into_bytes();
    for (n, v) in headers {
        out.extend_from_slice(n.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if code != 204 && code != 304 {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    w.write_all(&out).is_ok()
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        204 => "No Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Other",
    }
}

fn sse(w: &mut TcpStream, target: &str, state: &Mutex<State>) -> bool {
    let n = query(target, "n").unwrap_or(5);
    let gap = Duration::from_millis(query(target, "gap_ms").unwrap_or(100));
    state.lock().sse_sent.clear();
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";
    if w.write_all(head).is_err() {
        return false;
    }
    for i in 0..n {
        if i > 0 {
            std::thread::sleep(gap);
        }
        let event = format!("event: delta\ndata: {{\"i\":{i}}}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        if w.write_all(chunk.as_bytes()).is_err() {
            return false;
        }
        state.lock().sse_sent.push(Instant::now());
    }
    w.write_all(b"0\r\n\r\n").is_ok()
}

/// A response as the client read it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive client connection.
pub struct Conn {
    w: TcpStream,
    pub r: BufReader<TcpStream>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Conn {
            w: s.try_clone().expect("clone"),
            r: BufReader::with_capacity(64 * 1024, s),
        }
    }

    /// Writes a request with a `content-length` body.
    pub fn send(&mut self, method: &str, target: &str, headers: &[(&str, &[u8])], body: &[u8]) {
        let mut out = format!("{method} {target} HTTP/1.1\r\nhost: tokenfs-proxy\r\n").into_bytes();
        for (n, v) in headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        self.w.write_all(&out).expect("write head");
        self.w.write_all(body).expect("write body");
    }

    /// Writes a request whose body is sent chunked, in `chunk`-byte pieces.
    pub fn send_chunked(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
        chunk: usize,
    ) {
        let mut out = format!(
            "{method} {target} HTTP/1.1\r\nhost: tokenfs-proxy\r\ntransfer-encoding: chunked\r\n"
        )
        .into_bytes();
        for (n, v) in headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        self.w.write_all(&out).expect("write head");
        for piece in body.chunks(chunk.max(1)) {
            self.w
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .expect("chunk");
            self.w.write_all(piece).expect("chunk");
            self.w.write_all(b"\r\n").expect("chunk");
        }
        self.w.write_all(b"0\r\n\r\n").expect("last chunk");
    }

    pub fn read_head(&mut self) -> Head {
        read_head(&mut self.r).expect("response head")
    }

    pub fn read_response(&mut self, head_request: bool) -> Response {
        let head = self.read_head();
        let status = head.first.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = read_body(&mut self.r, &head, head_request);
        Response { status, head, body }
    }

    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Response {
        self.send(method, target, headers, body);
        self.read_response(method == "HEAD")
    }
}
