//! The loopback auth proxy: one HTTP listener per `[[proxy]]` table, which
//! forwards each request to its upstream with the credential's *current*
//! secret, read from the [`Store`] at send time.
//!
//! Agents talk to `http://127.0.0.1:PORT` with a **local key** instead of the
//! upstream token. The key is random per daemon start (192 bits), compared in
//! constant time, and accepted from whichever header the client puts its API
//! key in (`Authorization: Bearer`, `x-api-key`, `x-goog-api-key`,
//! `api-key`, or the configured header). A request without it gets 401 and
//! never reaches the upstream. The key header is stripped and the upstream's
//! header set from the snapshot, per request: no cache, no file read.
//!
//! Everything else is forwarded as it came (hop-by-hop headers aside; `Host`
//! is the upstream's): method, path under the upstream's base path, query,
//! headers, and bodies streamed both ways, frame by frame (an SSE event
//! reaches the client as soon as the upstream sends it). A 401/403 from the
//! upstream for a request sent with a secret that has since been replaced is
//! sent again with the current one, once per rotation in flight and at most
//! four times (bodies up to `retry_body_limit` are kept for that).
//!
//! # Reaching a proxy from the rest of the daemon
//!
//! [`Proxies::start`] binds every listener (errors name the proxy) and
//! returns the running set. For a proxy name:
//! - [`Proxies::get`]`(name)` → [`Proxy`]; [`Proxy::url`] is the base URL
//!   agents should use (`http://127.0.0.1:4000`, the actual port when the
//!   config said `:0`), and [`Proxy::local_key`] the key they must send (a
//!   [`Secret`]: fingerprint-only `Debug`/`Display`).
//! - The key is also published into the store as credential `proxy.NAME`,
//!   field `token`, so a managed file can bind it like any secret
//!   (`bind = { "model.api_key" = "proxy.NAME.token" }`), and `tokenfs token
//!   proxy.NAME` prints it.
//!
//! # Threads
//!
//! All proxies share one current-thread tokio runtime on one thread
//! (`proxy`); DNS lookups for named upstreams use at most two short-lived
//! helper threads. FUSE threads never wait on any of it: the proxy only
//! reads the store's snapshot (a lock-free pointer load).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, error, info, warn};
use zeroize::Zeroize;

use crate::config::ProxyConfig;
use crate::secret::Secret;
use crate::store::{Field, Snapshot, Store, Update};

/// Sends after a rotation in flight, per request (see `forward`). Each one
/// needs a new rotation during the attempt before it, so this bounds only
/// rotations milliseconds apart.
const MAX_RETRIES: u32 = 4;

/// Request bodies kept for a retry, all requests of one proxy together;
/// past it bodies stream (and are not retried) until memory is returned.
const KEPT_BODIES_BUDGET: usize = 64 << 20;

/// The reserved path prefix; never forwarded.
const RESERVED: &str = "/.tokenfs/";
const HEALTH: &str = "/.tokenfs/health";
/// An OAuth token endpoint for consumers (see [`token_endpoint`]).
const TOKEN: &str = "/.tokenfs/token";
/// How long the token endpoint waits for the refresh it asked for.
const TOKEN_WAIT: Duration = Duration::from_secs(5);

/// Asks a credential's source to refresh now: `(credential, origin)`.
/// Rate-limited by the source; never blocks.
pub type Nudge = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Headers a client may carry its API key in (lowercase).
const KEY_HEADERS: [&str; 4] = ["authorization", "x-api-key", "x-goog-api-key", "api-key"];

/// Connection-level headers (RFC 9110 §7.6.1), never forwarded; `expect` is
/// answered here (hyper sends `100 Continue` when the body is read).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpstreamClient = Client<HttpsConnector<HttpConnector>, ReqBody>;

/// Every running proxy. Dropping it stops them.
pub struct Proxies {
    proxies: Vec<Arc<Proxy>>,
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One running proxy: its address, key and counters.
pub struct Proxy {
    config: ProxyConfig,
    addr: SocketAddr,
    key: Secret,
    /// `scheme://authority/base` of the upstream, without a trailing `/`.
    upstream_prefix: String,
    /// The header the secret goes in, and the text before it.
    auth_header: HeaderName,
    auth_prefix: String,
    store: Arc<Store>,
    stats: Stats,
    /// Bytes of request bodies currently kept for a retry.
    kept: Arc<AtomicUsize>,
    /// Refusals are logged at most once a second (any local process can
    /// send them); the count in between goes into the next line.
    refusals_unlogged: AtomicU64,
    refusal_logged_at: Mutex<Option<Instant>>,
    nudge: Nudge,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    refused: AtomicU64,
    upstream_errors: AtomicU64,
    auth_failures: AtomicU64,
    retries: AtomicU64,
    connections: AtomicU64,
    active: AtomicU64,
    last_error: Mutex<Option<(String, SystemTime)>>,
}

/// What `tokenfs status` shows for a proxy (no token, no local key).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ProxyStatus {
    pub name: String,
    pub listen: String,
    pub url: String,
    pub upstream: String,
    pub credential: String,
    /// Requests forwarded (authorised by the local key).
    pub requests: u64,
    /// Requests refused for a missing or wrong local key.
    pub refused: u64,
    /// Connect failures, timeouts and broken response streams (502/504).
    pub upstream_errors: u64,
    /// 401/403 from the upstream that were passed on to the client.
    pub auth_failures: u64,
    /// Requests sent again after a rotation in flight.
    pub retries: u64,
    pub connections: u64,
    pub active_connections: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<f64>,
}

impl Proxies {
    /// No proxies.
    pub fn none() -> Proxies {
        Proxies {
            proxies: Vec::new(),
            stop: Arc::new(Notify::new()),
            thread: None,
        }
    }

    /// Binds every listener, makes each proxy's local key (published into
    /// `store` as `proxy.NAME`), and serves them on one runtime thread.
    /// `start_with` a nudge that does nothing (no source to ask).
    pub fn start(configs: &[ProxyConfig], store: Arc<Store>) -> Result<Proxies, String> {
        Proxies::start_with(configs, store, Arc::new(|_: &str, _: &str| {}))
    }

    /// Binds and serves every proxy; `nudge` asks a credential's source to
    /// refresh (the token endpoint).
    pub fn start_with(
        configs: &[ProxyConfig],
        store: Arc<Store>,
        nudge: Nudge,
    ) -> Result<Proxies, String> {
        if configs.is_empty() {
            return Ok(Proxies::none());
        }
        // One thread: two workers measured no faster (16 connections:
        // 20.7k against 20.1k requests/s) and cost a thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(2)
            .thread_keep_alive(Duration::from_secs(5))
            .thread_name("proxy-dns")
            .build()
            .map_err(|e| format!("cannot start the proxy runtime: {e}"))?;
        let started = configs
            .iter()
            .map(|cfg| Proxy::bind(cfg, &store, &nudge))
            .collect::<Result<Vec<_>, String>>()?;
        let proxies = started.iter().map(|(p, _, _)| p.clone()).collect();
        let stop = Arc::new(Notify::new());
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for (proxy, listener, client) in started {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => {
                                tokio::spawn(accept_loop(proxy, l, client));
                            }
                            Err(e) => error!(proxy = %proxy.config.name, "cannot serve: {e}"),
                        }
                    }
                    stopped.notified().await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| format!("cannot start the proxy thread: {e}"))?;
        Ok(Proxies {
            proxies,
            stop,
            thread: Some(thread),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Proxy>> {
        self.proxies.iter().find(|p| p.config.name == name)
    }

    pub fn all(&self) -> &[Arc<Proxy>] {
        &self.proxies
    }
}

impl Drop for Proxies {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Proxy {
    /// Listens, builds the upstream client and the local key, and
    /// publishes the key and URL (`proxy.NAME`) for the managed files.
    fn bind(
        cfg: &ProxyConfig,
        store: &Arc<Store>,
        nudge: &Nudge,
    ) -> Result<(Arc<Proxy>, std::net::TcpListener, UpstreamClient), String> {
        let name = &cfg.name;
        let fail = |e: &dyn std::fmt::Display| format!("proxy `{name}`: {e}");
        let listener = std::net::TcpListener::bind(cfg.listen)
            .map_err(|e| fail(&format!("cannot listen on {}: {e}", cfg.listen)))?;
        listener.set_nonblocking(true).map_err(|e| fail(&e))?;
        let addr = listener.local_addr().map_err(|e| fail(&e))?;
        let client = upstream_client(cfg).map_err(|e| fail(&e))?;
        let (header_name, prefix) = cfg.header.parts();
        let auth_header = HeaderName::from_bytes(header_name.as_bytes())
            .map_err(|e| fail(&format!("header `{header_name}`: {e}")))?;
        let proxy = Arc::new(Proxy {
            auth_header,
            auth_prefix: prefix.to_owned(),
            upstream_prefix: cfg.upstream.to_string(),
            config: cfg.clone(),
            addr,
            key: new_key().map_err(|e| fail(&e))?,
            store: store.clone(),
            stats: Stats::default(),
            kept: Arc::new(AtomicUsize::new(0)),
            refusals_unlogged: AtomicU64::new(0),
            refusal_logged_at: Mutex::new(None),
            nudge: nudge.clone(),
        });
        let published = Update {
            fields: vec![
                (Field::Token, proxy.key.clone()),
                (Field::Url, Secret::new(proxy.url())),
            ],
            expires_at: None,
        };
        store
            .publish(&format!("proxy.{name}"), published)
            .map_err(|e| fail(&format!("its local key cannot be published: {e}")))?;
        info!(proxy = %name, listen = %addr, upstream = %cfg.upstream, credential = %cfg.slot, "proxy listening");
        Ok((proxy, listener, client))
    }

    fn note_retry(&self, status: StatusCode, sent: &Snapshot, now: &Snapshot) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        info!(
            proxy = %self.config.name,
            status = status.as_u16(),
            sent = %self.fingerprint(sent),
            current = %self.fingerprint(now),
            "the credential rotated while the request was in flight; sending it again with the current one"
        );
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The address actually bound (the real port when the config said `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL agents use instead of the upstream's: `http://ADDR`
    /// (a request for `/x` goes to the upstream's base path + `/x`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The key clients must send (random per daemon start).
    pub fn local_key(&self) -> &Secret {
        &self.key
    }

    pub fn status(&self) -> ProxyStatus {
        let s = &self.stats;
        let last = s.last_error.lock().clone();
        ProxyStatus {
            name: self.config.name.clone(),
            listen: self.addr.to_string(),
            url: self.url(),
            upstream: self.config.upstream.to_string(),
            credential: self.config.slot.to_string(),
            requests: s.requests.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            upstream_errors: s.upstream_errors.load(Ordering::Relaxed),
            auth_failures: s.auth_failures.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            active_connections: s.active.load(Ordering::Relaxed),
            last_error_at: last
                .as_ref()
                .and_then(|(_, at)| at.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
            last_error: last.map(|(e, _)| e),
        }
    }

    /// Counts and records a failure; `message` must hold no secret.
    fn failed(&self, message: String) {
        *self.stats.last_error.lock() = Some((message, SystemTime::now()));
    }

    /// The fingerprint of the secret this snapshot holds for the proxy.
    fn fingerprint(&self, snap: &Snapshot) -> String {
        snap.get(&self.config.slot)
            .map_or_else(|| "(no value)".into(), Secret::fingerprint)
    }
}

/// `tkfs-` and 48 hex digits (192 bits from the OS's random source).
fn new_key() -> Result<Secret, String> {
    use rand::TryRngCore;
    let mut raw = [0u8; 24];
    rand::rngs::OsRng
        .try_fill_bytes(&mut raw)
        .map_err(|e| format!("no randomness for the local key: {e}"))?;
    let mut text = String::with_capacity(53);
    text.push_str("tkfs-");
    for b in raw {
        text.push_str(&format!("{b:02x}"));
    }
    raw.zeroize();
    Ok(Secret::new(text))
}

/// The upstream client: pooled keep-alive connections, HTTP/2 when the
/// server offers it in ALPN, rustls with the system's roots plus `ca_file`.
fn upstream_client(cfg: &ProxyConfig) -> Result<UpstreamClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let tls = tls_config(cfg)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_connections.min(256))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

fn tls_config(cfg: &ProxyConfig) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    if cfg.upstream.https {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            warn!(proxy = %cfg.name, "reading the system's CA certificates: {e}");
        }
        let (added, _) = roots.add_parsable_certificates(native.certs);
        let mut extra = 0;
        if let Some(path) = &cfg.ca_file {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let pem =
                std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                extra += 1;
            }
            if extra == 0 {
                return Err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        if roots.is_empty() {
            return Err(
                "no trusted CA certificates (install ca-certificates, or set ca_file)".into(),
            );
        }
        debug!(proxy = %cfg.name, system = added, ca_file = extra, "TLS roots loaded");
    }
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts connections while fewer than `max_connections` are open (the
/// rest wait in the listen backlog) and serves each with HTTP/1.1 keep-alive.
async fn accept_loop(proxy: Arc<Proxy>, listener: tokio::net::TcpListener, client: UpstreamClient) {
    let limit = Arc::new(Semaphore::new(proxy.config.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(proxy.config.idle_timeout)
        .max_buf_size(256 * 1024);
    let mut full_logged = false;
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !full_logged {
                    warn!(
                        proxy = %proxy.config.name,
                        max = proxy.config.max_connections,
                        "connection limit reached; new connections wait"
                    );
                    full_logged = true;
                }
                match limit.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let (stream, _peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like leave the connection queued: pause
                // rather than spin.
                warn!(proxy = %proxy.config.name, "cannot accept a connection: {e}");
                proxy.failed(format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        full_logged = false;
        let _ = stream.set_nodelay(true);
        proxy.stats.connections.fetch_add(1, Ordering::Relaxed);
        proxy.stats.active.fetch_add(1, Ordering::Relaxed);
        let p = proxy.clone();
        let c = client.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| handle(p.clone(), c.clone(), req)),
        );
        let p = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Clients closing mid-request are routine.
                debug!(proxy = %p.config.name, "client connection ended: {e}");
            }
            p.stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// How a request's local key checked out.
enum KeyCheck {
    /// Valid; these headers carried it (to strip).
    Valid(Vec<HeaderName>),
    Missing,
    Wrong,
}

fn check_key(proxy: &Proxy, headers: &HeaderMap) -> KeyCheck {
    let key = proxy.key.expose();
    let (custom, custom_prefix) = proxy.config.header.parts();
    let mut carriers = Vec::new();
    let mut seen = false;
    let names = KEY_HEADERS
        .iter()
        .copied()
        .chain((!KEY_HEADERS.contains(&custom)).then_some(custom));
    for name in names {
        for value in headers.get_all(name) {
            seen = true;
            let v = value.as_bytes();
            let v = if name == "authorization" {
                strip_prefix_ci(v, b"bearer ").unwrap_or(v)
            } else if name == custom && !custom_prefix.is_empty() {
                v.strip_prefix(custom_prefix.as_bytes()).unwrap_or(v)
            } else {
                v
            };
            let v = v.trim_ascii();
            if bool::from(v.ct_eq(key)) {
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    carriers.push(n);
                }
            }
        }
    }
    match (carriers.is_empty(), seen) {
        (false, _) => KeyCheck::Valid(carriers),
        (true, true) => KeyCheck::Wrong,
        (true, false) => KeyCheck::Missing,
    }
}

fn strip_prefix_ci<'a>(v: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &v[prefix.len()..])
}

async fn handle(
    proxy: Arc<Proxy>,
    client: UpstreamClient,
    req: Request<Incoming>,
) -> Result<Response<OutBody>, Infallible> {
    let started = Instant::now();
    let key = check_key(&proxy, req.headers());
    let path = req.uri().path();
    if path == TOKEN && req.method() == Method::POST {
        return Ok(token_endpoint(&proxy, req).await);
    }
    if path.starts_with(RESERVED) {
        return Ok(if path == HEALTH && req.method() == Method::GET {
            health(&proxy, matches!(key, KeyCheck::Valid(_)))
        } else {
            json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such tokenfs endpoint",
            )
        });
    }
    let carriers = match key {
        KeyCheck::Valid(c) => c,
        refused => {
            let resp = refuse(&proxy, &req, refused);
            drain(req.into_body()).await;
            return Ok(resp);
        }
    };
    proxy.stats.requests.fetch_add(1, Ordering::Relaxed);
    let deadline = started + proxy.config.timeout;
    let resp = match forward(&proxy, &client, req, &carriers, deadline).await {
        Ok(resp) => resp,
        Err((status, message)) => json_error(
            status,
            "upstream_error",
            &format!("tokenfs proxy: {message}"),
        ),
    };
    debug!(
        proxy = %proxy.config.name,
        status = resp.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    Ok(resp)
}

/// Reads and drops a refused request's body (up to 64 KiB, for at most a
/// second), so the client's keep-alive connection stays usable.
async fn drain(mut body: Incoming) {
    if body.size_hint().lower() > 64 * 1024 {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut total = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            total += frame.data_ref().map_or(0, Bytes::len);
            if total > 64 * 1024 {
                return;
            }
        }
    })
    .await;
}

fn refuse(proxy: &Proxy, req: &Request<Incoming>, why: KeyCheck) -> Response<OutBody> {
    proxy.stats.refused.fetch_add(1, Ordering::Relaxed);
    let (header, _) = proxy.config.header.parts();
    let message = match why {
        KeyCheck::Wrong => format!(
            "tokenfs proxy `{}`: wrong local key (it changes at every daemon start: use the current one from the managed file or `tokenfs token proxy.{}`)",
            proxy.config.name, proxy.config.name
        ),
        _ => format!(
            "tokenfs proxy `{}`: missing local key: send it as `Authorization: Bearer KEY`, `x-api-key`, `x-goog-api-key`, `api-key` or `{header}`",
            proxy.config.name
        ),
    };
    let what = if matches!(why, KeyCheck::Wrong) {
        "wrong"
    } else {
        "missing"
    };
    let now = Instant::now();
    let due = {
        let mut at = proxy.refusal_logged_at.lock();
        let due = at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            *at = Some(now);
        }
        due
    };
    if due {
        let more = proxy.refusals_unlogged.swap(0, Ordering::Relaxed);
        warn!(
            proxy = %proxy.config.name,
            method = %req.method(),
            path = req.uri().path(),
            unlogged_since_last = more,
            "refused a request: {what} local key"
        );
    } else {
        proxy.refusals_unlogged.fetch_add(1, Ordering::Relaxed);
    }
    proxy.failed(format!("refused a request: {what} local key"));
    let mut resp = json_error(StatusCode::UNAUTHORIZED, "authentication_error", &message);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"tokenfs\""),
    );
    resp
}

/// Forwards one request (twice, when a rotation happened in flight).
async fn forward(
    proxy: &Arc<Proxy>,
    client: &UpstreamClient,
    req: Request<Incoming>,
    carriers: &[HeaderName],
    deadline: Instant,
) -> Result<Response<OutBody>, (StatusCode, String)> {
    let (parts, body) = req.into_parts();
    let mut out = Outgoing {
        proxy,
        client,
        uri: upstream_uri(proxy, &parts.uri)?,
        headers: forwarded_headers(parts.headers, carriers),
        method: parts.method,
        deadline,
    };
    let body = read_body(proxy, body, &out.headers, deadline).await?;
    let mut replay = body.replay();
    let mut snap = proxy.store.snapshot();
    let mut resp = out.send(&snap, body, replay.is_some()).await?;
    // A 401/403 for a secret that has since been replaced is a rotation in
    // flight: send again with the current one. Once per rotation, at most
    // MAX_RETRIES times (a second rotation can land while the retry is in
    // flight when rotations are milliseconds apart).
    let mut retries = 0;
    loop {
        let status = resp.status();
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            return Ok(relay(proxy, resp, deadline, snap));
        }
        let now = proxy.store.snapshot();
        let rotated = match (snap.get(&proxy.config.slot), now.get(&proxy.config.slot)) {
            (Some(sent), Some(current)) => sent != current,
            _ => false,
        };
        match (rotated, replay.take()) {
            (true, Some(body)) if retries < MAX_RETRIES => {
                retries += 1;
                proxy.note_retry(status, &snap, &now);
                drop(resp);
                replay = body.replay();
                snap = now;
                resp = out.send(&snap, body, replay.is_some()).await?;
            }
            (rotated, kept) => {
                let context = match (rotated, kept.is_some()) {
                    (true, true) => "it rotated again while each retry was in flight",
                    (true, false) => {
                        "the credential rotated in flight, but the body was larger than retry_body_limit, so it was not retried"
                    }
                    (false, _) if retries > 0 => "after a retry",
                    (false, _) => "with the current credential",
                };
                auth_failure(proxy, &snap, status, context);
                return Ok(relay(proxy, resp, deadline, snap));
            }
        }
    }
}

/// One request on its way upstream, sent again after a rotation.
struct Outgoing<'a> {
    proxy: &'a Proxy,
    client: &'a UpstreamClient,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    deadline: Instant,
}

impl Outgoing<'_> {
    /// Sends with `snap`'s secret; `again` keeps the headers for a retry.
    async fn send(
        &mut self,
        snap: &Snapshot,
        body: ReqBody,
        again: bool,
    ) -> Result<Response<Incoming>, (StatusCode, String)> {
        let headers = if again {
            self.headers.clone()
        } else {
            std::mem::take(&mut self.headers)
        };
        let (proxy, client) = (self.proxy, self.client);
        send(
            proxy,
            client,
            snap,
            &self.method,
            self.uri.clone(),
            headers,
            body,
            self.deadline,
        )
        .await
    }
}

/// The upstream URL for an origin-form target: the upstream's base path,
/// then the request's path and query as sent.
fn upstream_uri(proxy: &Proxy, uri: &Uri) -> Result<Uri, (StatusCode, String)> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    if !pq.starts_with('/') {
        return Err((
            StatusCode::BAD_REQUEST,
            "only origin-form request targets (/path?query) are forwarded".into(),
        ));
    }
    format!("{}{pq}", proxy.upstream_prefix)
        .parse()
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad request target: {e}")))
}

/// The request body, kept in memory for a replay when it fits
/// `retry_body_limit` (and the proxy-wide budget), else streamed.
async fn read_body(
    proxy: &Arc<Proxy>,
    body: Incoming,
    headers: &HeaderMap,
    deadline: Instant,
) -> Result<ReqBody, (StatusCode, String)> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut kept = Kept {
        budget: proxy.kept.clone(),
        bytes: 0,
    };
    let limit = proxy.config.retry_body_limit;
    let prepared = prepare_body(body, declared, limit, &mut kept);
    match tokio::time::timeout_at(deadline.into(), prepared).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            warn!(proxy = %proxy.config.name, "reading the request body: {e}");
            proxy.failed(format!("reading a request body: {e}"));
            Err((
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            ))
        }
        Err(_) => Err(upstream_failure(
            proxy,
            &proxy.store.snapshot(),
            StatusCode::GATEWAY_TIMEOUT,
            "timed out reading the request body".into(),
        )),
    }
}

fn auth_failure(proxy: &Proxy, snap: &Snapshot, status: StatusCode, context: &str) {
    proxy.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
    let fp = proxy.fingerprint(snap);
    warn!(
        proxy = %proxy.config.name,
        status = status.as_u16(),
        credential = %proxy.config.slot,
        fingerprint = %fp,
        "the upstream refused the credential ({context})"
    );
    proxy.failed(format!(
        "upstream answered {} for {} {fp} ({context})",
        status.as_u16(),
        proxy.config.slot
    ));
}

fn upstream_failure(
    proxy: &Proxy,
    snap: &Snapshot,
    status: StatusCode,
    message: String,
) -> (StatusCode, String) {
    proxy.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
    let fp = proxy.fingerprint(snap);
    warn!(
        proxy = %proxy.config.name,
        status = status.as_u16(),
        upstream = %proxy.config.upstream,
        fingerprint = %fp,
        "{message}"
    );
    proxy.failed(format!("{} ({fp}): {message}", status.as_u16()));
    (status, message)
}

/// Sends one attempt with the secret `snap` holds.
#[allow(clippy::too_many_arguments)]
async fn send(
    proxy: &Proxy,
    client: &UpstreamClient,
    snap: &Snapshot,
    method: &Method,
    uri: Uri,
    mut headers: HeaderMap,
    body: ReqBody,
    deadline: Instant,
) -> Result<Response<Incoming>, (StatusCode, String)> {
    let slot = &proxy.config.slot;
    let Some(secret) = snap.get(slot) else {
        let msg = format!("credential {slot} has no value yet (`tokenfs set` or its source)");
        warn!(proxy = %proxy.config.name, "{msg}");
        proxy.failed(msg.clone());
        return Err((StatusCode::SERVICE_UNAVAILABLE, msg));
    };
    let value = auth_value(&proxy.auth_prefix, secret).ok_or_else(|| {
        let msg = format!(
            "credential {slot} ({}) cannot be sent in a header",
            secret.fingerprint()
        );
        warn!(proxy = %proxy.config.name, "{msg}");
        proxy.failed(msg.clone());
        (StatusCode::BAD_GATEWAY, msg)
    })?;
    headers.insert(proxy.auth_header.clone(), value);
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    match tokio::time::timeout_at(deadline.into(), client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => {
            let status = if is_timeout(&e) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            Err(upstream_failure(
                proxy,
                snap,
                status,
                format!("upstream request failed: {}", error_chain(&e)),
            ))
        }
        Err(_) => Err(upstream_failure(
            proxy,
            snap,
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no response from the upstream within {}",
                humantime::format_duration(proxy.config.timeout)
            ),
        )),
    }
}

/// `PREFIX SECRET` as a sensitive header value whose bytes are zeroed when
/// hyper is done with them.
fn auth_value(prefix: &str, secret: &Secret) -> Option<HeaderValue> {
    let mut buf = Vec::with_capacity(prefix.len() + secret.len());
    buf.extend_from_slice(prefix.as_bytes());
    buf.extend_from_slice(secret.expose());
    let mut value = HeaderValue::from_maybe_shared(Bytes::from_owner(Wiped(buf))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A buffer zeroed on drop (the bytes behind an injected header).
struct Wiped(Vec<u8>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        if err.to_string().contains("timed out") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `outer: inner: innermost` (hyper's errors say little at the top level).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

/// The request's headers minus hop-by-hop ones, `Host` and the ones that
/// carried the local key.
fn forwarded_headers(headers: HeaderMap, carriers: &[HeaderName]) -> HeaderMap {
    let listed = connection_listed(&headers);
    rebuild(headers, |n| {
        n == header::HOST
            || HOP_BY_HOP.contains(&n.as_str())
            || carriers.contains(n)
            || listed.contains(n)
    })
}

/// The response's headers minus hop-by-hop ones.
fn response_headers(headers: HeaderMap) -> HeaderMap {
    if !HOP_BY_HOP.iter().any(|h| headers.contains_key(*h)) {
        return headers;
    }
    let listed = connection_listed(&headers);
    rebuild(headers, |n| {
        HOP_BY_HOP.contains(&n.as_str()) || listed.contains(n)
    })
}

/// `headers` without the names `drop` picks, in their original order
/// (`HeaderMap::remove` would move the last header into the gap).
fn rebuild(headers: HeaderMap, drop: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut name: Option<HeaderName> = None;
    for (n, value) in headers {
        if let Some(n) = n {
            name = Some(n);
        }
        match &name {
            Some(n) if !drop(n) => {
                out.append(n.clone(), value);
            }
            _ => {}
        }
    }
    out
}

/// The names a `Connection` header lists (hop-by-hop for this message).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Reads the request body up to `limit` so it can be sent twice; a larger
/// (or larger-declared) body streams through as it arrives.
/// Bytes a request holds of its proxy's `KEPT_BODIES_BUDGET`, returned
/// when the request is done.
struct Kept {
    budget: Arc<AtomicUsize>,
    bytes: usize,
}

impl Kept {
    /// Takes `n` more bytes of the budget, if there are.
    fn take(&mut self, n: usize) -> bool {
        let before = self.budget.fetch_add(n, Ordering::Relaxed);
        if before + n > KEPT_BODIES_BUDGET {
            self.budget.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        self.bytes += n;
        true
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

async fn prepare_body(
    mut body: Incoming,
    declared: Option<u64>,
    limit: usize,
    kept: &mut Kept,
) -> Result<ReqBody, hyper::Error> {
    if body.is_end_stream() {
        return Ok(ReqBody::buffered(VecDeque::new(), None));
    }
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(ReqBody::Streaming {
            prefix: VecDeque::new(),
            rest: body,
        });
    }
    let mut chunks = VecDeque::new();
    let mut total = 0usize;
    loop {
        match body.frame().await {
            None => return Ok(ReqBody::buffered(chunks, None)),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    total += data.len();
                    let fits = total <= limit && kept.take(data.len());
                    chunks.push_back(data);
                    if !fits {
                        return Ok(ReqBody::Streaming {
                            prefix: chunks,
                            rest: body,
                        });
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return Ok(ReqBody::buffered(chunks, Some(trailers)));
                    }
                }
            },
        }
    }
}

/// A request body on its way upstream: kept whole (replayable), or a kept
/// prefix followed by the rest as it arrives.
pub enum ReqBody {
    Buffered {
        chunks: VecDeque<Bytes>,
        trailers: Option<HeaderMap>,
        remaining: u64,
    },
    Streaming {
        prefix: VecDeque<Bytes>,
        rest: Incoming,
    },
}

impl ReqBody {
    fn buffered(chunks: VecDeque<Bytes>, trailers: Option<HeaderMap>) -> ReqBody {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ReqBody::Buffered {
            chunks,
            trailers,
            remaining,
        }
    }

    /// A copy to send again, when the body was kept whole.
    fn replay(&self) -> Option<ReqBody> {
        match self {
            ReqBody::Buffered {
                chunks,
                trailers,
                remaining,
            } => Some(ReqBody::Buffered {
                chunks: chunks.clone(),
                trailers: trailers.clone(),
                remaining: *remaining,
            }),
            ReqBody::Streaming { .. } => None,
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Buffered {
                chunks,
                trailers,
                remaining,
            } => {
                if let Some(c) = chunks.pop_front() {
                    *remaining -= c.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(c))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ReqBody::Streaming { prefix, rest } => {
                if let Some(c) = prefix.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(c))));
                }
                Pin::new(rest).poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Buffered {
                chunks, trailers, ..
            } => chunks.is_empty() && trailers.is_none(),
            ReqBody::Streaming { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Buffered { remaining, .. } => SizeHint::with_exact(*remaining),
            ReqBody::Streaming { prefix, rest } => {
                let kept: u64 = prefix.iter().map(|c| c.len() as u64).sum();
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + kept);
                if let Some(u) = h.upper() {
                    out.set_upper(u + kept);
                }
                out
            }
        }
    }
}

/// Passes the upstream's response on, streaming its body.
fn relay(
    proxy: &Arc<Proxy>,
    resp: Response<Incoming>,
    deadline: Instant,
    snap: Arc<Snapshot>,
) -> Response<OutBody> {
    let (mut parts, body) = resp.into_parts();
    parts.headers = response_headers(std::mem::take(&mut parts.headers));
    parts.version = Version::HTTP_11;
    Response::from_parts(
        parts,
        OutBody::Upstream(Box::new(Relay {
            inner: body,
            proxy: proxy.clone(),
            snap,
            idle: proxy.config.idle_timeout,
            deadline,
            last: Instant::now(),
            timer: None,
        })),
    )
}

/// A response body for the client: ours (errors, health) or the upstream's.
pub enum OutBody {
    Full(Option<Bytes>),
    Upstream(Box<Relay>),
}

/// The upstream's body, with the idle and overall timeouts; a broken or
/// stalled stream is logged, counted and ends the client's connection.
pub struct Relay {
    inner: Incoming,
    proxy: Arc<Proxy>,
    snap: Arc<Snapshot>,
    idle: Duration,
    deadline: Instant,
    last: Instant,
    /// Armed only once the upstream makes us wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Relay {
    fn due(&self) -> Instant {
        (self.last + self.idle).min(self.deadline)
    }

    fn fail(&self, message: String) -> BoxError {
        let (_, message) =
            upstream_failure(&self.proxy, &self.snap, StatusCode::BAD_GATEWAY, message);
        message.into()
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let relay = match self.get_mut() {
            OutBody::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Upstream(r) => r,
        };
        loop {
            match Pin::new(&mut relay.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if relay.timer.is_some() {
                        relay.last = Instant::now();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!("the upstream's response broke off: {}", error_chain(&e));
                    return Poll::Ready(Some(Err(relay.fail(msg))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            if relay.timer.is_none() {
                // Frames arrived back to back until now.
                relay.last = Instant::now();
            }
            let due = relay.due();
            let timer = relay
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due.into())));
            if timer.deadline() != due.into() {
                timer.as_mut().reset(due.into());
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let now = Instant::now();
                    if now >= relay.deadline {
                        let msg = format!(
                            "the response did not finish within {}",
                            humantime::format_duration(relay.proxy.config.timeout)
                        );
                        return Poll::Ready(Some(Err(relay.fail(msg))));
                    }
                    if now >= relay.last + relay.idle {
                        let msg = format!(
                            "the upstream sent nothing for {}",
                            humantime::format_duration(relay.idle)
                        );
                        return Poll::Ready(Some(Err(relay.fail(msg))));
                    }
                    // Not due yet (data arrived meanwhile): re-arm and poll again.
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Upstream(r) => r.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            OutBody::Upstream(r) => r.inner.size_hint(),
        }
    }
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<OutBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(OutBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON error in the shape most API clients print:
/// `{"error": {"type": …, "message": …}}`.
fn json_error(status: StatusCode, kind: &str, message: &str) -> Response<OutBody> {
    json_response(
        status,
        &serde_json::json!({ "error": { "type": kind, "message": message } }),
    )
}

/// `POST /.tokenfs/token`: an OAuth token endpoint for a consumer whose own
/// refresh can be pointed at a URL (Codex: `CODEX_REFRESH_TOKEN_URL_OVERRIDE`).
/// It takes one grant: the current decoy refresh token of the proxy's
/// credential (only processes that may read the consumer's 0600 files have
/// it). tokenfs then refreshes (rate-limited by `min_refresh_interval`),
/// waits for it up to `TOKEN_WAIT`, and answers with the session its files
/// now show, so a consumer refused by the API far from expiry (case g) is
/// authorised again at once, and the real chain is spent by tokenfs alone.
async fn token_endpoint(proxy: &Proxy, req: Request<Incoming>) -> Response<OutBody> {
    let credential = proxy.config.slot.credential.clone();
    let decoy = crate::store::SlotRef {
        credential: credential.clone(),
        field: Field::RefreshToken,
    };
    let body = read_small(req.into_body(), 64 * 1024).await;
    let presented = body.as_deref().and_then(refresh_token_param);
    let before = proxy.store.snapshot();
    let current = before.get(&decoy).filter(|d| {
        d.expose_str()
            .starts_with(crate::source::oauth::DECOY_PREFIX)
    });
    let valid = match (presented.as_ref(), current) {
        (Some(p), Some(c)) => bool::from(p.expose().ct_eq(c.expose())),
        _ => false,
    };
    if !valid {
        proxy.stats.refused.fetch_add(1, Ordering::Relaxed);
        info!(proxy = %proxy.config.name, "token endpoint: refused a grant that is not the current decoy refresh token");
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "invalid_grant", "error_description": "tokenfs: not the current refresh token of this session"}),
        );
    }
    info!(proxy = %proxy.config.name, credential = %credential, "token endpoint: a consumer asked for a refresh");
    (proxy.nudge)(
        &credential,
        &format!("proxy `{}` token endpoint", proxy.config.name),
    );
    let deadline = Instant::now() + TOKEN_WAIT;
    loop {
        let now = proxy.store.snapshot();
        if now.get(&decoy) != current || Instant::now() >= deadline {
            return session_response(&now, &credential);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The session a token endpoint answers: what the consumers' files show.
fn session_response(snap: &Snapshot, credential: &str) -> Response<OutBody> {
    let Some(c) = snap.credentials.get(credential) else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_session",
            "tokenfs has no session for this credential",
        );
    };
    let field = |f: Field| c.fields.get(&f).map(|s| s.expose_str().to_owned());
    let Some(access) = field(Field::AccessToken).or_else(|| field(Field::Token)) else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_session",
            "tokenfs has no access token for this credential",
        );
    };
    let mut body = serde_json::json!({"access_token": access, "token_type": "Bearer"});
    for (k, f) in [
        ("refresh_token", Field::RefreshToken),
        ("id_token", Field::IdToken),
    ] {
        if let Some(v) = field(f) {
            body[k] = v.into();
        }
    }
    if let Some(left) = c
        .expires_at
        .and_then(|t| t.duration_since(SystemTime::now()).ok())
    {
        body["expires_in"] = left.as_secs().into();
    }
    json_response(StatusCode::OK, &body)
}

/// A request body of at most `limit` bytes (else `None`), read within a second.
async fn read_small(mut body: Incoming, limit: usize) -> Option<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(1), async {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Some(d) = frame.ok()?.data_ref() {
                out.extend_from_slice(d);
                if out.len() > limit {
                    return None;
                }
            }
        }
        Some(out)
    })
    .await
    .ok()
    .flatten()
}

/// `refresh_token` of a JSON or form-encoded token request.
fn refresh_token_param(body: &[u8]) -> Option<Secret> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        return v["refresh_token"].as_str().map(Secret::new);
    }
    let text = std::str::from_utf8(body).ok()?;
    text.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "refresh_token")
        .map(|(_, v)| Secret::new(v.replace("%2D", "-").replace("%2d", "-")))
}

/// `GET /.tokenfs/health`: liveness for anyone; with the local key, the
/// credential's generation, fingerprint, age and source health, and the
/// proxy's counters. Never the token.
fn health(proxy: &Proxy, authorised: bool) -> Response<OutBody> {
    let snap = proxy.store.snapshot();
    let slot = &proxy.config.slot;
    let cred = snap.credentials.get(&slot.credential);
    let has_value = cred.is_some_and(|c| c.fields.contains_key(&slot.field));
    let source = proxy.store.health().remove(&slot.credential);
    let source_ok = source
        .as_ref()
        .is_none_or(|h| !matches!(h.state, crate::store::HealthState::ReloginRequired));
    let ok = has_value && source_ok;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !authorised {
        return json_response(
            status,
            &serde_json::json!({ "ok": ok, "proxy": proxy.config.name }),
        );
    }
    let age = cred
        .and_then(|c| c.updated_at)
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| d.as_secs_f64());
    json_response(
        status,
        &serde_json::json!({
            "ok": ok,
            "proxy": proxy.config.name,
            "upstream": proxy.config.upstream.to_string(),
            "credential": slot.to_string(),
            "generation": snap.generation,
            "fingerprint": proxy.fingerprint(&snap),
            "age_secs": age,
            "source": source,
            "stats": proxy.status(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = new_key().unwrap();
        let b = new_key().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 48);
        assert!(a.expose_str().starts_with("tkfs-"));
        assert!(!format!("{a} {a:?}").contains(&a.expose_str()[5..]));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_lists_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("2"));
        h.append("x-kept", HeaderValue::from_static("3"));
        h.insert("x-last", HeaderValue::from_static("4"));
        let h = response_headers(h);
        let left: Vec<_> = h.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        assert_eq!(
            left,
            [("x-kept", &b"2"[..]), ("x-kept", b"3"), ("x-last", b"4")]
        );
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("proxy"));
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert("x-a", HeaderValue::from_static("1"));
        let h = forwarded_headers(h, &[HeaderName::from_static("x-api-key")]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn kept_bodies_share_one_budget_returned_on_drop() {
        let budget = Arc::new(AtomicUsize::new(0));
        let mut a = Kept {
            budget: budget.clone(),
            bytes: 0,
        };
        assert!(a.take(KEPT_BODIES_BUDGET - 10));
        let mut b = Kept {
            budget: budget.clone(),
            bytes: 0,
        };
        assert!(!b.take(11));
        assert!(b.take(10));
        drop(a);
        assert_eq!(budget.load(Ordering::Relaxed), 10);
        drop(b);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bearer_prefix_is_case_insensitive() {
        assert_eq!(
            strip_prefix_ci(b"bEaReR abc", b"bearer "),
            Some(&b"abc"[..])
        );
        assert_eq!(strip_prefix_ci(b"Basic abc", b"bearer "), None);
    }
}
