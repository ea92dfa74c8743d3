//! The admin HTTP server: health, replication stats, manual promotion and
//! Prometheus metrics, served on the control thread (`--admin ADDR`).
//!
//! It only reads the atomics the cores publish in [`NodeStats`] and sets
//! `promote_requested`; it never touches shard state, so a slow or hostile
//! admin client can never delay a core.
//!
//! One thread (`iris-control`) running a current-thread tokio runtime; each
//! connection is a task, so an idle or slow client never delays another
//! (a promotion waiting for the cores included), and at most
//! `CONNECTIONS_MAX` are served at once (more are answered 503 and closed).
//! One request per connection, `Connection: close`. Every read is bounded:
//! the request head and body by size, the whole request by a deadline, the
//! connection's whole life by `CONNECTION_DEADLINE_MS`. The head is parsed
//! with `httparse`; the routes answer fixed, small JSON or text bodies, so
//! the status codes for bad requests (400, 408, 411, 413, 431) stay ours.

use crate::auth::{AuthMode, AuthStats, Refusal};
use crate::security::Security;
use crate::stats::{Mode, NodeStats, Role, FSYNC_BUCKETS_US, REJECT_CODE_MAX, STORED_BUCKETS_US};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Request line plus headers; larger heads get 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Header lines parsed per request; more get 431.
pub const REQUEST_HEADERS_MAX: usize = 32;
/// Request body; a larger declared Content-Length gets 413 before any body is read.
pub const REQUEST_BODY_BYTES_MAX: usize = 8 * 1024;
/// Whole request (head and body) must arrive within this; slower clients get 408.
pub const REQUEST_DEADLINE_MS: u64 = 5_000;
/// A response write that cannot progress for this long is abandoned.
pub const RESPONSE_WRITE_TIMEOUT_MS: u64 = 3_000;
/// After rejecting a request we did not read whole, how much of the rest we
/// swallow (and for how long) so that closing does not reset the connection
/// before the client has read our answer.
pub const DRAIN_BYTES_MAX: usize = 64 * 1024;
pub const DRAIN_TIMEOUT_MS: u64 = 500;
/// How long `POST /replication/promote` waits for the cores to finish.
pub const PROMOTE_TIMEOUT_MS: u64 = 5_000;
pub const PROMOTE_POLL_MS: u64 = 10;
/// Pause after a failed accept (e.g. out of file descriptors) so the control
/// thread does not spin.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;
/// Admin connections served at once; one more is answered 503 and closed.
/// Large enough that idle or slow clients (each dropped after
/// `REQUEST_DEADLINE_MS` without a whole request) cannot starve `/health`
/// or a promotion: a test holds 1,000 idle ones (issue 21, 7). A task and a
/// socket each, a few KB.
pub const CONNECTIONS_MAX: usize = 2048;
/// Connections over `CONNECTIONS_MAX` being answered 503 at once; more are
/// closed without an answer.
pub const REFUSALS_MAX: usize = 16;
/// A slot move's import body (`POST /slots/import`): the whole range's
/// state, so it may take longer than other requests to arrive.
pub const MOVE_BODY_DEADLINE_MS: u64 = 60_000;
/// A slot move's export answer is written within this.
pub const MOVE_RESPONSE_WRITE_TIMEOUT_MS: u64 = 60_000;
/// A connection's whole life (request, route, response): then it is dropped.
/// Each part is bounded on its own too (a slot move's the longest).
pub const CONNECTION_DEADLINE_MS: u64 = REQUEST_DEADLINE_MS
    + MOVE_BODY_DEADLINE_MS
    + crate::moves::STEP_TIMEOUT.as_millis() as u64
    + MOVE_RESPONSE_WRITE_TIMEOUT_MS
    + crate::handover::TIMEOUT_MAX_MS
    + crate::handover::STEP_DOWN_WAIT_MS
    + DRAIN_TIMEOUT_MS;

const CONTENT_TYPE_JSON: &str = "application/json";
const CONTENT_TYPE_BYTES: &str = "application/octet-stream";
/// The one path that takes a large body.
const IMPORT_PATH: &str = "/slots/import";
/// What prometheus-client's text encoder produces (it ends with `# EOF`).
const CONTENT_TYPE_OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves the admin API on a new thread named `iris-control`.
/// Returns the bound address (useful with port 0) and the thread, which runs
/// for the life of the process.
/// A task for the control thread's runtime besides the admin server (the
/// election's pilot).
pub type ControlTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

pub fn start(
    addr: SocketAddr,
    stats: Arc<NodeStats>,
    security: Arc<Security>,
    door: Door,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    start_with(addr, stats, security, door, Vec::new())
}

/// Starts the control thread: the admin server and `tasks` on one
/// current-thread tokio runtime (never on a core).
pub fn start_with(
    addr: SocketAddr,
    stats: Arc<NodeStats>,
    security: Arc<Security>,
    door: Door,
    tasks: Vec<ControlTask>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("admin listener on {addr}: {e}")))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let ctx = Arc::new(Ctx {
        metrics: metrics_registry(&stats, &security),
        security,
        stats,
        door,
    });
    let handle = thread::Builder::new()
        .name("iris-control".into())
        .spawn(move || {
            runtime.block_on(async move {
                for task in tasks {
                    tokio::spawn(task);
                }
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, ctx).await,
                    Err(e) => tracing::error!("admin: listener: {e}"),
                }
            });
        })?;
    Ok((bound, handle))
}

/// What the routes need.
struct Ctx {
    metrics: Registry,
    security: Arc<Security>,
    stats: Arc<NodeStats>,
    door: Door,
}

/// Who may use which route (crate::admin_auth).
#[derive(Debug, Clone)]
pub struct Door {
    /// The operator token; `None`: `admin_auth = "none"` (loopback only).
    pub token: Option<crate::admin_auth::Token>,
    /// Routes answered without the token (names from
    /// `admin_auth::PUBLIC_ROUTES_ALLOWED`).
    pub public: Vec<String>,
    /// Connections served at once ([`CONNECTIONS_MAX`]; smaller in tests).
    pub connections_max: usize,
}

impl Door {
    /// No token asked anywhere (unit tests of the routes; `admin_auth = "none"`).
    pub fn open() -> Door {
        Door {
            token: None,
            public: Vec::new(),
            connections_max: CONNECTIONS_MAX,
        }
    }

    /// The default door with `token`: `/health` and `/metrics` open.
    pub fn with_token(token: crate::admin_auth::Token) -> Door {
        Door {
            token: Some(token),
            public: vec!["health".into(), "metrics".into()],
            connections_max: CONNECTIONS_MAX,
        }
    }

    /// May a request for `method path` with this `bearer` be served?
    fn admits(&self, method: &str, path: &str, bearer: Option<&str>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let name = match (method, path) {
            ("GET", "/health") => "health",
            ("GET", "/metrics") => "metrics",
            ("GET", "/replication/stats") => "stats",
            ("GET", "/slots") => "slots",
            _ => "",
        };
        (!name.is_empty() && self.public.iter().any(|p| p == name))
            || bearer.is_some_and(|b| token.matches(b))
    }
}

async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(ctx.door.connections_max));
    let refusals = Arc::new(tokio::sync::Semaphore::new(REFUSALS_MAX));
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    // Over the bound: 503, then the request drained so that
                    // closing does not reset the answer away; a few of
                    // these at once, beyond that just closed.
                    if let Ok(refusal) = Arc::clone(&refusals).try_acquire_owned() {
                        tokio::spawn(async move {
                            let mut stream = stream;
                            let busy = Response::error(503, "too many admin connections");
                            if busy.write_to(&mut stream).await.is_ok() {
                                drain_and_close(&mut stream).await;
                            }
                            drop(refusal);
                        });
                    }
                    continue;
                };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let deadline = Duration::from_millis(CONNECTION_DEADLINE_MS);
                    let _ = tokio::time::timeout(deadline, handle_connection(stream, &ctx)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("admin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
            }
        }
    }
}

/// Reads one request, answers it and closes. I/O errors only end this
/// connection: the peer is gone or too slow, and there is nobody to tell.
async fn handle_connection(mut stream: TcpStream, ctx: &Ctx) {
    let deadline = Instant::now() + Duration::from_millis(REQUEST_DEADLINE_MS);
    match read_request(&mut stream, deadline, &ctx.door).await {
        Ok(request) => {
            let response = route(&request, ctx).await;
            let _ = response.write_to(&mut stream).await;
        }
        Err(Rejection::Reply(response)) => {
            if response.write_to(&mut stream).await.is_ok() {
                drain_and_close(&mut stream).await;
            }
        }
        Err(Rejection::Drop) => {}
    }
}

/// Lets the client see our answer: closing a socket with unread input sends a
/// reset, which can destroy the response still in flight.
async fn drain_and_close(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut drained_bytes = 0;
        while drained_bytes < DRAIN_BYTES_MAX {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained_bytes += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(DRAIN_TIMEOUT_MS), drain).await;
}

// ---------------------------------------------------------------------------
// Request

#[derive(Debug)]
struct Request {
    method: String,
    /// Without the query string.
    path: String,
    /// After the `?`, as sent.
    query: String,
    /// Kept for `IMPORT_PATH` only (read and dropped for the others).
    body: Vec<u8>,
}

impl Request {
    /// The value of query parameter `name`.
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// The parts of a request head we act on, owned so the buffer can be reused.
struct Head {
    method: String,
    path: String,
    query: String,
    head_len: usize,
    content_length: usize,
    expect_continue: bool,
    /// The `Authorization: Bearer` credential, if any.
    bearer: Option<String>,
}

enum Rejection {
    /// Answer with this, then close.
    Reply(Response),
    /// The peer left, timed out silently or the socket failed: just close.
    Drop,
}

async fn read_request(
    stream: &mut TcpStream,
    deadline: Instant,
    door: &Door,
) -> Result<Request, Rejection> {
    let mut buf = Vec::with_capacity(REQUEST_HEAD_BYTES_MAX);
    let head = loop {
        if let Some(head) = parse_head(&buf)? {
            break head;
        }
        if buf.len() >= REQUEST_HEAD_BYTES_MAX {
            return Err(reject(431, "request head too large"));
        }
        let mut chunk = [0u8; 1024];
        let room = chunk.len().min(REQUEST_HEAD_BYTES_MAX - buf.len());
        let n = read_before(stream, &mut chunk[..room], deadline, !buf.is_empty()).await?;
        buf.extend_from_slice(&chunk[..n]);
    };
    // Refused before any body is read: an import's megabytes included.
    if !door.admits(&head.method, &head.path, head.bearer.as_deref()) {
        tracing::warn!(method = %head.method, path = %head.path, presented = head.bearer.is_some(), "admin: request without a valid operator token refused");
        let message = if head.bearer.is_some() {
            "the operator token is wrong"
        } else {
            "an operator token is required (Authorization: Bearer; the node's data directory holds admin.token, docs/ADMIN.md)"
        };
        let mut response = Response::error(401, message);
        response.challenge = true;
        return Err(Rejection::Reply(response));
    }
    let keep_body = head.path == IMPORT_PATH;
    let body_max = if keep_body {
        crate::shard::MOVE_BYTES_MAX
    } else {
        REQUEST_BODY_BYTES_MAX
    };
    if head.content_length > body_max {
        return Err(reject(413, "request body too large"));
    }
    let deadline = if keep_body {
        deadline + Duration::from_millis(MOVE_BODY_DEADLINE_MS)
    } else {
        deadline
    };
    // Bytes past the head are the body's start; anything past the body is a
    // pipelined request we will not serve (we close after one).
    let mut body_len = buf.len() - head.head_len;
    if body_len < head.content_length && head.expect_continue {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let mut body = Vec::new();
    if keep_body {
        let start = head.head_len.min(buf.len());
        let end = (head.head_len + head.content_length).min(buf.len());
        body.extend_from_slice(&buf[start..end]);
    }
    let mut sink = vec![0u8; if keep_body { 64 << 10 } else { 1024 }];
    while body_len < head.content_length {
        let room = sink.len().min(head.content_length - body_len);
        let n = read_before(stream, &mut sink[..room], deadline, true).await?;
        if keep_body {
            body.extend_from_slice(&sink[..n]);
        }
        body_len += n;
    }
    Ok(Request {
        method: head.method,
        path: head.path,
        query: head.query,
        body,
    })
}

/// `Ok(None)`: the head is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Rejection> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(reject(431, "too many headers")),
        Err(e) => return Err(reject(400, &format!("malformed request: {e}"))),
    };
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    let mut bearer = None;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(reject(
                411,
                "send Content-Length; chunked bodies are not accepted",
            ));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| reject(400, "bad Content-Length"))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(reject(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        } else if h.name.eq_ignore_ascii_case("authorization") {
            bearer = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().strip_prefix("Bearer "))
                .map(|t| t.trim().to_owned());
        }
    }
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Head {
        method: request.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        head_len,
        content_length: content_length.unwrap_or(0),
        expect_continue,
        bearer,
    }))
}

/// One read that must finish before `deadline`. `started`: the client has sent
/// part of a request, so running out of time earns a 408 rather than a silent close.
async fn read_before(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    started: bool,
) -> Result<usize, Rejection> {
    let timed_out = || {
        if started {
            reject(408, "request not received in time")
        } else {
            Rejection::Drop
        }
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(timed_out());
    }
    match tokio::time::timeout(remaining, stream.read(buf)).await {
        Err(_elapsed) => Err(timed_out()),
        Ok(Ok(0)) | Ok(Err(_)) => Err(Rejection::Drop),
        Ok(Ok(n)) => Ok(n),
    }
}

fn reject(status: u16, message: &str) -> Rejection {
    Rejection::Reply(Response::error(status, message))
}

// ---------------------------------------------------------------------------
// Response

#[derive(Debug)]
struct Response {
    status: u16,
    content_type: &'static str,
    /// For 405: the one method the path accepts.
    allow: Option<&'static str>,
    /// For 401: ask for the bearer token (`WWW-Authenticate`).
    challenge: bool,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &impl Serialize) -> Response {
        let mut body = serde_json::to_vec(value).expect("admin JSON types serialize");
        body.push(b'\n');
        Response {
            status,
            content_type: CONTENT_TYPE_JSON,
            allow: None,
            challenge: false,
            body,
        }
    }

    fn error(status: u16, message: &str) -> Response {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    /// The whole response: head and body.
    fn bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        if self.challenge {
            head.push_str("WWW-Authenticate: Bearer realm=\"iris-admin\"\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    async fn write_to(&self, stream: &mut TcpStream) -> io::Result<()> {
        let write = async {
            stream.write_all(&self.bytes()).await?;
            stream.flush().await
        };
        let timeout_ms = if self.content_type == CONTENT_TYPE_BYTES {
            MOVE_RESPONSE_WRITE_TIMEOUT_MS
        } else {
            RESPONSE_WRITE_TIMEOUT_MS
        };
        match tokio::time::timeout(Duration::from_millis(timeout_ms), write).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        500 => "Internal Server Error",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

// ---------------------------------------------------------------------------
// Routes

async fn route(request: &Request, ctx: &Ctx) -> Response {
    let stats = &ctx.stats;
    let path = request.path.as_str();
    let method = match path {
        "/health" | "/replication/stats" | "/metrics" | "/slots" | "/slots/export" => "GET",
        "/replication/promote"
        | "/replication/handover"
        | "/reload"
        | "/slots/handoff"
        | IMPORT_PATH
        | "/slots/own"
        | "/slots/release" => "POST",
        _ => return Response::error(404, "no such path"),
    };
    if request.method != method {
        let mut response = Response::error(405, "method not allowed");
        response.allow = Some(method);
        return response;
    }
    match path {
        "/health" => health(stats, ctx),
        "/replication/stats" => replication_stats(stats),
        "/replication/promote" => promote(stats, request.param("force") == Some("1")).await,
        "/replication/handover" => handover(stats, request.param("timeout_ms")).await,
        "/metrics" => metrics_text(&ctx.metrics),
        "/reload" => reload(&ctx.security),
        _ => slots(request, stats).await,
    }
}

/// The slot move API of a core node (engine::moves; docs/CLUSTER.md).
async fn slots(request: &Request, stats: &NodeStats) -> Response {
    let Some((table, own)) = stats.moves.node.get() else {
        return Response::error(404, "slot moves are for the core nodes of a cluster");
    };
    if request.path == "/slots" {
        let decisions: Vec<_> = table.decisions().iter().map(decision_json).collect();
        return Response::json(
            200,
            &serde_json::json!({
                "pair": own,
                "role": stats.role().name(),
                "version_max": table.max_version(),
                "decisions": decisions,
            }),
        );
    }
    match slot_step(request, stats, table, *own).await {
        Ok(response) | Err(response) => response,
    }
}

/// One step of a slot move on this node (the primary of its pair).
async fn slot_step(
    request: &Request,
    stats: &NodeStats,
    table: &crate::slots::SlotTable,
    own: u16,
) -> Result<Response, Response> {
    use crate::moves::{Step, StepError};
    use crate::record::SlotsRecord;
    let number = |name: &str| -> Result<u32, Response> {
        request
            .param(name)
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| {
                Response::error(
                    400,
                    &format!("query parameter {name} (a number) is missing"),
                )
            })
    };
    let (first, last) = (number("first")?, number("last")?);
    if first > last || last >= u32::from(net::SLOT_COUNT) {
        return Err(Response::error(
            400,
            "first..=last must be slots, first <= last",
        ));
    }
    let (first, last) = (first as u16, last as u16);
    let other_pair = || -> Result<u16, Response> {
        match number("to")? {
            p if p >= u32::from(table.pairs()) || p == u32::from(own) => Err(Response::error(
                400,
                "to: the index of another pair of the cluster file",
            )),
            p => Ok(p as u16),
        }
    };
    let version = || -> Result<u32, Response> {
        match number("version")? {
            0 => Err(Response::error(400, "version 0 is the cluster file's")),
            v => Ok(v),
        }
    };
    if stats.role() != Role::Primary {
        return Err(Response::error(409, "not the pair's primary"));
    }
    let range = first..=last;
    let steps = match request.path.as_str() {
        "/slots/handoff" => {
            let (to, version) = (other_pair()?, version()?);
            if !range.clone().all(|s| table.get(s).owner == own) {
                return Err(Response::error(
                    409,
                    "this pair does not own the whole range",
                ));
            }
            let handoff_to = Some(to);
            vec![Step::Decide(SlotsRecord {
                version,
                first,
                last,
                owner: own,
                handoff_to,
            })]
        }
        "/slots/export" => vec![Step::Export { first, last }],
        IMPORT_PATH => {
            let records = std::sync::Arc::new(request.body.clone());
            vec![Step::Import {
                first,
                last,
                records,
            }]
        }
        "/slots/own" => {
            let version = version()?;
            vec![Step::Decide(SlotsRecord {
                version,
                first,
                last,
                owner: own,
                handoff_to: None,
            })]
        }
        "/slots/release" => {
            let (to, version) = (other_pair()?, version()?);
            let r = SlotsRecord {
                version,
                first,
                last,
                owner: to,
                handoff_to: None,
            };
            vec![Step::Decide(r), Step::Drop { first, last }]
        }
        _ => return Err(Response::error(404, "no such path")),
    };
    let mut answers = Vec::new();
    for step in steps {
        tracing::info!(?step, "admin: slot move step");
        answers = match stats.moves.run(step, stats.shards.len()).await {
            Ok(answers) => answers,
            Err(e @ StepError::Timeout) => return Err(Response::error(503, &e.to_string())),
            Err(e) => return Err(Response::error(409, &e.to_string())),
        };
    }
    if request.path == "/slots/export" {
        return Ok(Response {
            status: 200,
            content_type: CONTENT_TYPE_BYTES,
            allow: None,
            challenge: false,
            body: answers.concat(),
        });
    }
    Ok(Response::json(200, &serde_json::json!({ "done": true })))
}

fn decision_json(r: &crate::record::SlotsRecord) -> serde_json::Value {
    serde_json::json!({
        "version": r.version,
        "first": r.first,
        "last": r.last,
        "owner": r.owner,
        "handoff_to": r.handoff_to,
    })
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    role: &'static str,
    epoch: u64,
    mode: &'static str,
    /// How HELLO is authenticated: "none" or "jwt".
    auth: &'static str,
    /// Whether a TLS client listener is open.
    tls: bool,
    /// Settings an operator should know about (e.g. --insecure-no-auth).
    warnings: Vec<String>,
    /// This process (for `iris admin rolling-restart --stop 'kill -TERM {pid}'`).
    pid: u32,
}

fn health(stats: &NodeStats, ctx: &Ctx) -> Response {
    let security = &ctx.security;
    Response::json(
        200,
        &Health {
            status: "ok",
            role: stats.role().name(),
            epoch: stats.epoch.load(Relaxed),
            mode: stats.mode().name(),
            auth: match security.mode {
                AuthMode::None => "none",
                AuthMode::Jwt => "jwt",
            },
            tls: security.tls.is_some(),
            warnings: security.warnings(),
            pid: std::process::id(),
        },
    )
}

#[derive(Serialize)]
struct Reloaded {
    reloaded: String,
}

/// `POST /reload`: JWT keys and the TLS certificate, as SIGHUP does.
fn reload(security: &Security) -> Response {
    match security.reload() {
        Ok(what) => Response::json(200, &Reloaded { reloaded: what }),
        Err(why) => Response::error(500, &format!("reload refused, old material kept: {why}")),
    }
}

#[derive(Serialize)]
struct ReplicationStats {
    role: &'static str,
    epoch: u64,
    mode: &'static str,
    /// The primary's client address, when this node is a replica and knows it.
    primary_client_addr: Option<String>,
    shards: Vec<ShardView>,
    stored_total: u64,
    rejected_total: u64,
    /// Messages of a dropped tail this node re-submitted to a new primary
    /// since it started (0 after planned handovers; docs/ADMIN.md).
    resubmitted_total: u64,
    /// Handovers of the primary role this node completed since it started.
    handovers_total: u64,
    connections: u64,
    replication_sent_bytes: u64,
    replication_received_bytes: u64,
    /// With etcd: the lease time left while primary (null: no lease, manual failover).
    lease_ms_left: Option<u64>,
    /// With etcd: the pair's leader as this node last read it from etcd.
    election: Option<ElectionView>,
}

#[derive(Serialize)]
struct ElectionView {
    leader: Option<String>,
    epoch: Option<u64>,
    /// The pair's state key: "sync" (either node may lead next) or "alone"
    /// (only the last leader may: it acknowledged without its replica).
    state: Option<&'static str>,
}

#[derive(Serialize)]
struct ShardView {
    shard: usize,
    last_position: u64,
    durable_position: u64,
    /// Records WAL recovery cut off past the durable mark at start (see PROTOCOL/README).
    recovery_dropped_records: u64,
    /// First position of that cut (0: none).
    recovery_dropped_from: u64,
    /// Records this primary took back from its replica after a crash.
    recovery_refetched_records: u64,
    /// Memory held by inboxes (pending messages and the user table), as allocated.
    inbox_bytes: u64,
    /// Memory held by the dedup table.
    dedup_bytes: u64,
    /// Empty when the shard has no replica (never connected, never heard from).
    replicas: Vec<ReplicaView>,
}

#[derive(Serialize)]
struct ReplicaView {
    connected: bool,
    acked_position: u64,
    lag_ops: u64,
    lag_ms: u64,
    /// None while connected but before the first heartbeat.
    last_heartbeat_ms_ago: Option<u64>,
}

fn replication_stats(stats: &NodeStats) -> Response {
    let now_ms = crate::clock::mono_ms(); // the clock last_heartbeat_ms is on
    let shards = stats
        .shards
        .iter()
        .enumerate()
        .map(|(shard, s)| {
            let connected = s.replica_connected.load(Relaxed);
            let heartbeat_ms = s.last_heartbeat_ms.load(Relaxed);
            let replica = ReplicaView {
                connected,
                acked_position: s.replica_acked_position.load(Relaxed),
                lag_ops: s.replica_lag_ops.load(Relaxed),
                lag_ms: s.replica_lag_ms.load(Relaxed),
                last_heartbeat_ms_ago: (heartbeat_ms > 0)
                    .then(|| now_ms.saturating_sub(heartbeat_ms)),
            };
            ShardView {
                shard,
                last_position: s.last_position.load(Relaxed),
                durable_position: s.durable_position.load(Relaxed),
                recovery_dropped_records: s.recovery_dropped_records.load(Relaxed),
                recovery_dropped_from: s.recovery_dropped_from.load(Relaxed),
                recovery_refetched_records: s.recovery_refetched_records.load(Relaxed),
                inbox_bytes: s.inbox_bytes.load(Relaxed),
                dedup_bytes: s.dedup_bytes.load(Relaxed),
                replicas: if connected || heartbeat_ms > 0 {
                    vec![replica]
                } else {
                    vec![]
                },
            }
        })
        .collect();
    let primary_client_addr = match stats.primary_client_addr.lock() {
        Ok(addr) => addr.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Response::json(
        200,
        &ReplicationStats {
            role: stats.role().name(),
            epoch: stats.epoch.load(Relaxed),
            mode: stats.mode().name(),
            primary_client_addr,
            shards,
            stored_total: stats.stored_total.load(Relaxed),
            resubmitted_total: stats.resubmitted_total.load(Relaxed),
            handovers_total: stats.handovers_total.load(Relaxed),
            rejected_total: stats.rejected_total.load(Relaxed),
            connections: stats.connections(),
            replication_sent_bytes: stats.replication_bytes_sent.load(Relaxed),
            replication_received_bytes: stats.replication_bytes_received.load(Relaxed),
            lease_ms_left: if stats.role() == Role::Primary {
                stats.lease_ms_left()
            } else {
                None
            },
            election: stats.elected.load(Relaxed).then(|| {
                let seen = match stats.leader_seen.lock() {
                    Ok(l) => l.clone(),
                    Err(poisoned) => poisoned.into_inner().clone(),
                };
                ElectionView {
                    leader: seen.as_ref().map(|(n, _)| n.clone()),
                    epoch: seen.map(|(_, e)| e),
                    state: match stats.pair_state.lock() {
                        Ok(s) => *s,
                        Err(poisoned) => *poisoned.into_inner(),
                    },
                }
            }),
        },
    )
}

/// Asks the cores to promote this node and waits until they report it done:
/// role primary and an epoch above the one we started from. On timeout the
/// request stays set (the cores may still be finishing); asking again is safe.
/// A replica that still follows a live primary (a stream open and heard
/// within the loss timeout) is not promoted unless `force`d: that would
/// make two primaries, and the old one's clients would hear STORED for
/// messages the new one never has.
async fn promote(stats: &NodeStats, force: bool) -> Response {
    let epoch_before = stats.epoch.load(SeqCst);
    if stats.role() == Role::Primary {
        return Response::json(
            409,
            &serde_json::json!({ "error": "already primary", "epoch": epoch_before }),
        );
    }
    let following = stats
        .shards
        .iter()
        .filter(|s| s.replica_connected.load(Relaxed))
        .count();
    if following > 0 && !force {
        tracing::warn!(
            following,
            "admin: promotion refused: the primary is alive (its stream is open and heard)"
        );
        return Response::json(
            409,
            &serde_json::json!({
                "error": "the primary is alive: this replica still follows it (its stream is open and heard within the loss timeout). Stop it first, or hand over (`iris admin handover`), or add ?force=1 to make a second primary anyway",
                "shards_following": following,
                "epoch": epoch_before,
            }),
        );
    }
    if force && following > 0 {
        tracing::warn!(
            following,
            "admin: forced promotion while the primary is alive"
        );
    }
    tracing::info!("admin: promotion requested (epoch {epoch_before})");
    if stats.elected.load(SeqCst) {
        // With etcd the election decides: this node campaigns as soon as the
        // leader key is free, even if the last primary served alone.
        stats.election_promote_asked.store(true, SeqCst);
    } else {
        stats.promote_requested.store(true, SeqCst);
    }
    let deadline = Instant::now() + Duration::from_millis(PROMOTE_TIMEOUT_MS);
    loop {
        let epoch = stats.epoch.load(SeqCst);
        if stats.role() == Role::Primary && epoch > epoch_before {
            tracing::info!("admin: promoted to primary (epoch {epoch})");
            return Response::json(
                200,
                &serde_json::json!({ "role": "primary", "epoch": epoch }),
            );
        }
        if Instant::now() >= deadline {
            tracing::warn!("admin: promotion did not complete in {PROMOTE_TIMEOUT_MS} ms");
            return Response::error(503, "promotion did not complete");
        }
        tokio::time::sleep(Duration::from_millis(PROMOTE_POLL_MS)).await;
    }
}

/// Hands the primary role to the replica (engine::handover): answers once
/// every shard stepped down with its replica holding every record, or
/// when the handover was abandoned (the primary serves again).
async fn handover(stats: &NodeStats, timeout_ms: Option<&str>) -> Response {
    use crate::handover::{self, HandoverError, Progress};
    let timeout_ms = match timeout_ms.map(str::parse::<u64>) {
        None => handover::TIMEOUT_MS,
        Some(Ok(ms)) if (1..=handover::TIMEOUT_MAX_MS).contains(&ms) => ms,
        Some(_) => {
            return Response::error(
                400,
                &format!("timeout_ms: 1 to {} ms", handover::TIMEOUT_MAX_MS),
            )
        }
    };
    let epoch = stats.epoch.load(SeqCst);
    let started = Instant::now();
    if let Err(e) = handover::request(stats) {
        return Response::json(
            409,
            &serde_json::json!({ "error": e.to_string(), "epoch": epoch }),
        );
    }
    let timeout = Duration::from_millis(timeout_ms);
    loop {
        match handover::poll(stats, started, timeout) {
            Progress::Waiting => tokio::time::sleep(Duration::from_millis(handover::POLL_MS)).await,
            Progress::Done => {
                handover::finish(stats);
                let ms = started.elapsed().as_millis() as u64;
                tracing::warn!(ms, epoch, "admin: handed over to the replica");
                return Response::json(
                    200,
                    &serde_json::json!({ "handed_over": true, "epoch": epoch, "ms": ms }),
                );
            }
            Progress::Failed(e) => {
                tracing::error!(error = %e, "admin: handover failed");
                let status = match e {
                    HandoverError::StepDownSlow { .. } => 500,
                    _ => 503,
                };
                return Response::json(
                    status,
                    &serde_json::json!({ "error": e.to_string(), "epoch": epoch }),
                );
            }
        }
    }
}

fn metrics_text(metrics: &Registry) -> Response {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, metrics)
        .expect("encoding into a String cannot fail");
    Response {
        status: 200,
        content_type: CONTENT_TYPE_OPENMETRICS,
        allow: None,
        challenge: false,
        body: text.into_bytes(),
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// The registry holds one collector that reads the atomics on every scrape,
/// so values are never copied into metric objects that could go stale.
fn metrics_registry(stats: &Arc<NodeStats>, security: &Arc<Security>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatsCollector(
        Arc::clone(stats),
        Arc::clone(&security.stats),
    )));
    registry
}

struct StatsCollector(Arc<NodeStats>, Arc<AuthStats>);

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsCollector")
    }
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        encode_node(&self.0, &mut encoder)?;
        encode_shards(&self.0, &mut encoder)?;
        encode_traffic(&self.0, &mut encoder)?;
        encode_auth(&self.1, &mut encoder)?;
        encode_fsync(&self.0, &mut encoder)
    }
}

fn encode_auth(auth: &AuthStats, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    counter(
        encoder,
        "iris_auth_accepted",
        "HELLOs whose login was accepted",
        None,
        auth.accepted.load(Relaxed),
    )?;
    counter(
        encoder,
        "iris_auth_verified",
        "JWT signature verifications (HELLOs whose token was not cached)",
        None,
        auth.verified.load(Relaxed),
    )?;
    let mut family = encoder.encode_descriptor(
        "iris_auth_failures",
        "HELLOs refused with ERROR 2, by reason",
        None,
        MetricType::Counter,
    )?;
    for why in Refusal::ALL {
        let labels: Labels = vec![("reason", why.label().to_owned())];
        ConstCounter::new(auth.refused(why)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_node(stats: &NodeStats, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    let role = stats.role();
    let roles = [Role::Primary, Role::Replica, Role::Fenced, Role::Edge]
        .map(|r| (vec![("role", r.name().to_owned())], u64::from(r == role)));
    labeled_gauges(encoder, "iris_role", "1 for this node's role", &roles)?;
    gauge(
        encoder,
        "iris_epoch",
        "Replication epoch",
        stats.epoch.load(Relaxed),
    )?;
    let mode = stats.mode();
    let modes = [Mode::Local, Mode::Replica, Mode::Degraded, Mode::Blocked]
        .map(|m| (vec![("mode", m.name().to_owned())], u64::from(m == mode)));
    labeled_gauges(
        encoder,
        "iris_mode",
        "1 for the durability mode in force",
        &modes,
    )?;
    gauge(
        encoder,
        "iris_connections",
        "Open client connections",
        stats.connections(),
    )
}

fn encode_shards(stats: &NodeStats, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    type Field = fn(&crate::stats::ShardStats) -> u64;
    let fields: [(&str, &str, Field); 11] = [
        (
            "iris_wal_recovery_refetched_records",
            "Records this primary took back from its replica after a crash",
            |s| s.recovery_refetched_records.load(Relaxed),
        ),
        (
            "iris_wal_recovery_dropped_records",
            "Records WAL recovery cut off past the durable mark at start (may include acknowledged ones)",
            |s| s.recovery_dropped_records.load(Relaxed),
        ),
        (
            "iris_wal_recovery_dropped_from",
            "First log position WAL recovery cut off at start (0: none)",
            |s| s.recovery_dropped_from.load(Relaxed),
        ),
        (
            "iris_shard_inbox_bytes",
            "Memory held by the shard's inboxes, as allocated",
            |s| s.inbox_bytes.load(Relaxed),
        ),
        (
            "iris_shard_dedup_bytes",
            "Memory held by the shard's dedup table",
            |s| s.dedup_bytes.load(Relaxed),
        ),
        (
            "iris_shard_last_position",
            "Last appended log position",
            |s| s.last_position.load(Relaxed),
        ),
        (
            "iris_shard_durable_position",
            "Last fsync'ed log position",
            |s| s.durable_position.load(Relaxed),
        ),
        (
            "iris_replica_connected",
            "1 while the replica link is up",
            |s| u64::from(s.replica_connected.load(Relaxed)),
        ),
        (
            "iris_replica_acked_position",
            "Highest position the replica acknowledged",
            |s| s.replica_acked_position.load(Relaxed),
        ),
        (
            "iris_replica_lag_ops",
            "Positions appended but not acknowledged by the replica",
            |s| s.replica_lag_ops.load(Relaxed),
        ),
        (
            "iris_replica_lag_ms",
            "Age of the oldest record the replica has not acknowledged",
            |s| s.replica_lag_ms.load(Relaxed),
        ),
    ];
    for (name, help, field) in fields {
        let values: Vec<_> = stats
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![("shard", i.to_string())], field(s)))
            .collect();
        labeled_gauges(encoder, name, help, &values)?;
    }
    Ok(())
}

fn encode_traffic(stats: &NodeStats, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    // Counter names get `_total` (and the unit) appended by the encoder.
    counter(
        encoder,
        "iris_stored",
        "SENDs this process answered STORED to its clients (an edge's are counted on the edge, not again on the core)",
        None,
        load(&stats.stored_total),
    )?;
    counter(
        encoder,
        "iris_rejected",
        "SENDs this process answered REJECTED to its clients",
        None,
        load(&stats.rejected_total),
    )?;
    let mut family = encoder.encode_descriptor(
        "iris_rejected_by_code",
        "SENDs answered REJECTED, by code (docs/PROTOCOL.md section 5; \"other\" for codes it does not name)",
        None,
        MetricType::Counter,
    )?;
    for (i, n) in stats.rejected_by_code.iter().enumerate().skip(1) {
        let code = if i <= REJECT_CODE_MAX {
            i.to_string()
        } else {
            "other".to_string()
        };
        let labels: Labels = vec![("code", code)];
        ConstCounter::new(load(n)).encode(family.encode_family(&labels)?)?;
    }
    counter(
        encoder,
        "iris_replication_sent",
        "Bytes sent on replication links",
        Some(&Unit::Bytes),
        load(&stats.replication_bytes_sent),
    )?;
    counter(
        encoder,
        "iris_replication_received",
        "Bytes received on replication links",
        Some(&Unit::Bytes),
        load(&stats.replication_bytes_received),
    )
}

fn encode_fsync(stats: &NodeStats, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
    let histogram =
        BucketHistogram::read(&FSYNC_BUCKETS_US, &stats.fsync_buckets, &stats.fsync_sum_us);
    let metric = encoder.encode_descriptor(
        "iris_fsync_latency",
        "WAL fsync latency",
        Some(&Unit::Seconds),
        histogram.metric_type(),
    )?;
    histogram.encode(metric)?;
    let histogram = BucketHistogram::read(
        &STORED_BUCKETS_US,
        &stats.stored_latency_buckets,
        &stats.stored_latency_sum_us,
    );
    let metric = encoder.encode_descriptor(
        "iris_stored_latency",
        "From a SEND reaching its shard to its STORED (durable, and replicated when that is the policy)",
        Some(&Unit::Seconds),
        histogram.metric_type(),
    )?;
    histogram.encode(metric)
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

type Labels = Vec<(&'static str, String)>;

fn labeled_gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

/// A histogram the cores count (fsync, STORED latency), read at scrape time.
/// prometheus-client's own `Histogram` only counts what it observes itself,
/// so the precomputed bucket counts are handed to its encoder through this
/// custom metric.
#[derive(Debug)]
struct BucketHistogram {
    sum_seconds: f64,
    count: u64,
    /// (upper bound in seconds, count in this bucket alone); the last bound is +Inf.
    buckets: Vec<(f64, u64)>,
}

impl BucketHistogram {
    fn read(
        bounds_us: &[u64],
        counts: &[std::sync::atomic::AtomicU64],
        sum_us: &std::sync::atomic::AtomicU64,
    ) -> BucketHistogram {
        let bounds = bounds_us
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(counts.iter().map(|b| b.load(Relaxed))).collect();
        assert_eq!(buckets.len(), bounds_us.len() + 1);
        BucketHistogram {
            sum_seconds: sum_us.load(Relaxed) as f64 / 1e6,
            // Counted from the buckets we read, not from `fsync_count`, so that
            // the +Inf bucket equals the count even while a core is recording.
            count: buckets.iter().map(|&(_, n)| n).sum(),
            buckets,
        }
    }
}

impl EncodeMetric for BucketHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> std::fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin_cmd::http;
    use crate::admin_http::AdminClient;

    fn http_with_body(
        method: &str,
        addr: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, String), String> {
        AdminClient::new(addr, None).call_with_body(method, path, body)
    }
    use serde_json::Value;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Connections a unit test's node serves at once (the test process's
    /// file limit is lower than a node's).
    const TEST_CONNECTIONS_MAX: usize = 64;

    fn start_node(shards: usize, role: Role) -> (Arc<NodeStats>, String) {
        let stats = Arc::new(NodeStats::new(shards, role, Mode::Replica, 7));
        let security = Arc::new(Security::open(&crate::config::Config::default()).unwrap());
        let door = Door {
            connections_max: TEST_CONNECTIONS_MAX,
            ..Door::open()
        };
        let (addr, _thread) = start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&stats),
            security,
            door,
        )
        .unwrap();
        (stats, addr.to_string())
    }

    /// A node whose door asks for `token` (the default public routes).
    fn start_guarded(role: Role, token: &crate::admin_auth::Token) -> (Arc<NodeStats>, String) {
        let stats = Arc::new(NodeStats::new(1, role, Mode::Replica, 7));
        let security = Arc::new(Security::open(&crate::config::Config::default()).unwrap());
        let door = Door::with_token(token.clone());
        let (addr, _thread) = start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&stats),
            security,
            door,
        )
        .unwrap();
        (stats, addr.to_string())
    }

    /// Issue 21, 1: every route that changes state or returns message data
    /// needs the operator token; /health and /metrics stay open. Red before
    /// the door existed (every request below was served).
    #[test]
    fn without_the_operator_token_only_health_and_metrics_answer() {
        let token = crate::admin_auth::Token::generate().unwrap();
        let (stats, addr) = start_guarded(Role::Replica, &token);
        let anonymous = AdminClient::new(addr.as_str(), None);
        let wrong = AdminClient::new(
            addr.as_str(),
            Some(crate::admin_auth::Token::generate().unwrap()),
        );
        let operator = AdminClient::new(addr.as_str(), Some(token));
        for (method, path) in [
            ("POST", "/replication/promote"),
            ("POST", "/replication/promote?force=1"),
            ("POST", "/replication/handover"),
            ("POST", "/reload"),
            ("GET", "/replication/stats"),
            ("GET", "/slots"),
            ("GET", "/slots/export?first=0&last=1"),
            ("POST", "/slots/handoff?first=0&last=1&to=1&version=2"),
            ("POST", "/slots/import?first=0&last=1"),
            ("POST", "/slots/own?first=0&last=1&version=2"),
            ("POST", "/slots/release?first=0&last=1&to=1&version=2"),
        ] {
            for client in [&anonymous, &wrong] {
                let (status, body) = client.call(method, path).unwrap();
                assert_eq!(status, 401, "{method} {path}: {body}");
            }
        }
        assert!(
            !stats.promote_requested.load(SeqCst),
            "nothing reached a route"
        );
        assert!(!stats.election_promote_asked.load(SeqCst));
        assert_eq!(anonymous.call("GET", "/health").unwrap().0, 200);
        assert_eq!(anonymous.call("GET", "/metrics").unwrap().0, 200);
        assert_eq!(operator.call("GET", "/replication/stats").unwrap().0, 200);
        // An import's body is refused before it is read: 401 at once, not
        // after megabytes.
        let big = vec![0u8; 4 << 20];
        let (status, _) = anonymous
            .call_with_body("POST", "/slots/import?first=0&last=1", &big)
            .unwrap_or((401, String::new()));
        assert_eq!(status, 401);
    }

    /// Issue 21, 1: a replica that still follows a live primary is not
    /// promoted unless forced (two primaries otherwise). Red before: 200.
    #[test]
    fn promote_is_refused_while_the_primary_is_alive_unless_forced() {
        let token = crate::admin_auth::Token::generate().unwrap();
        let (stats, addr) = start_guarded(Role::Replica, &token);
        let operator = AdminClient::new(addr.as_str(), Some(token));
        stats.shards[0].replica_connected.store(true, Relaxed);
        let (status, body) = operator.call("POST", "/replication/promote").unwrap();
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("primary is alive"), "{body}");
        assert!(!stats.promote_requested.load(SeqCst));
        // Forced: asked of the cores (nobody finishes it here: 503).
        let (status, body) = operator
            .call("POST", "/replication/promote?force=1")
            .unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(stats.promote_requested.load(SeqCst));
    }

    fn get_json(addr: &str, path: &str) -> Value {
        let (status, body) = http("GET", addr, path).unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    #[test]
    fn health_reports_role_epoch_and_mode() {
        let (stats, addr) = start_node(1, Role::Replica);
        let v = get_json(&addr, "/health");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["role"], "replica");
        assert_eq!(v["epoch"], 7);
        assert_eq!(v["mode"], "replica");
        stats.set_mode(Mode::Degraded);
        assert_eq!(get_json(&addr, "/health?verbose=1")["mode"], "degraded");
    }

    #[test]
    fn replication_stats_lists_shards_and_only_known_replicas() {
        let (stats, addr) = start_node(2, Role::Primary);
        let s0 = &stats.shards[0];
        s0.last_position.store(120, Relaxed);
        s0.durable_position.store(118, Relaxed);
        s0.replica_connected.store(true, Relaxed);
        s0.replica_acked_position.store(100, Relaxed);
        s0.replica_lag_ops.store(20, Relaxed);
        s0.replica_lag_ms.store(3, Relaxed);
        s0.last_heartbeat_ms
            .store(crate::clock::mono_ms() - 250, Relaxed);
        stats.stored_total.store(42, Relaxed);
        stats.rejected_total.store(2, Relaxed);
        s0.connections.store(5, Relaxed);

        let v = get_json(&addr, "/replication/stats");
        assert_eq!(
            (v["role"].clone(), v["epoch"].clone()),
            ("primary".into(), 7.into())
        );
        assert_eq!(v["mode"], "replica");
        assert_eq!(
            (v["stored_total"].clone(), v["rejected_total"].clone()),
            (42.into(), 2.into())
        );
        assert_eq!(v["connections"], 5);
        let shards = v["shards"].as_array().unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[0]["shard"], 0);
        assert_eq!(shards[0]["last_position"], 120);
        assert_eq!(shards[0]["durable_position"], 118);
        let replica = &shards[0]["replicas"][0];
        assert_eq!(replica["connected"], true);
        assert_eq!(replica["acked_position"], 100);
        assert_eq!(replica["lag_ops"], 20);
        assert_eq!(replica["lag_ms"], 3);
        let ago_ms = replica["last_heartbeat_ms_ago"].as_u64().unwrap();
        assert!((250..10_000).contains(&ago_ms), "{ago_ms}");
        assert_eq!(shards[1]["replicas"], serde_json::json!([]));
    }

    #[test]
    fn unknown_path_is_404_and_wrong_method_is_405() {
        let (stats, addr) = start_node(1, Role::Replica);
        assert_eq!(http("GET", &addr, "/nope").unwrap().0, 404);
        assert_eq!(http("POST", &addr, "/health").unwrap().0, 405);
        assert_eq!(http("GET", &addr, "/replication/promote").unwrap().0, 405);
        assert_eq!(http("DELETE", &addr, "/metrics").unwrap().0, 405);
        assert!(!stats.promote_requested.load(SeqCst));
    }

    #[test]
    fn oversized_body_is_413_and_never_reaches_the_route() {
        let (stats, addr) = start_node(1, Role::Replica);
        let body = vec![b'x'; REQUEST_BODY_BYTES_MAX + 1];
        let (status, _) = http_with_body("POST", &addr, "/replication/promote", &body).unwrap();
        assert_eq!(status, 413);
        assert!(!stats.promote_requested.load(SeqCst));
        // A body within the bound is read and the request served.
        let body = vec![b'x'; REQUEST_BODY_BYTES_MAX];
        assert_eq!(
            http_with_body("GET", &addr, "/health", &body).unwrap().0,
            200
        );
    }

    #[test]
    fn oversized_head_is_431_and_garbage_is_400() {
        let (_stats, addr) = start_node(1, Role::Replica);
        let long_path = format!("/{}", "a".repeat(REQUEST_HEAD_BYTES_MAX));
        assert_eq!(http("GET", &addr, &long_path).unwrap().0, 431);
        let mut raw = TcpStream::connect(&addr).unwrap();
        raw.write_all(b"\x01\x02 nonsense\r\n\r\n").unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }

    #[test]
    fn a_stalled_client_gets_408_and_then_the_server_serves_others() {
        let (_stats, addr) = start_node(1, Role::Replica);
        let mut slow = TcpStream::connect(&addr).unwrap();
        slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        let mut answer = String::new();
        slow.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(started.elapsed() < Duration::from_millis(REQUEST_DEADLINE_MS + 2_000));
        assert_eq!(http("GET", &addr, "/health").unwrap().0, 200);
    }

    #[test]
    fn metrics_expose_every_family_and_the_fsync_histogram() {
        let (stats, addr) = start_node(2, Role::Replica);
        stats.record_fsync(20); // first bucket (25 µs)
        stats.record_fsync(600); // 1000 µs bucket
        stats.record_fsync(90_000); // +Inf
        stats.stored_total.store(11, Relaxed);
        stats.replication_bytes_sent.store(4096, Relaxed);
        stats.shards[1].replica_lag_ops.store(9, Relaxed);
        let (status, text) = http("GET", &addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        for line in [
            "iris_role{role=\"replica\"} 1",
            "iris_role{role=\"primary\"} 0",
            "iris_epoch 7",
            "iris_mode{mode=\"replica\"} 1",
            "iris_mode{mode=\"degraded\"} 0",
            "iris_connections 0",
            "iris_shard_last_position{shard=\"1\"} 0",
            "iris_shard_durable_position{shard=\"0\"} 0",
            "iris_replica_connected{shard=\"0\"} 0",
            "iris_replica_acked_position{shard=\"0\"} 0",
            "iris_replica_lag_ops{shard=\"1\"} 9",
            "iris_replica_lag_ms{shard=\"1\"} 0",
            "iris_stored_total 11",
            "iris_rejected_total 0",
            "iris_replication_sent_bytes_total 4096",
            "iris_replication_received_bytes_total 0",
            "# TYPE iris_fsync_latency_seconds histogram",
            "iris_fsync_latency_seconds_count 3",
            "iris_fsync_latency_seconds_bucket{le=\"+Inf\"} 3",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("iris_fsync_latency_seconds_bucket"))
            .collect();
        assert_eq!(buckets.len(), FSYNC_BUCKETS_US.len() + 1, "{text}");
        // Cumulative: 1 at 25 µs, 2 from 1 ms on, 3 only at +Inf.
        assert!(buckets[0].ends_with(" 1"), "{}", buckets[0]);
        assert!(buckets[7].ends_with(" 2"), "{}", buckets[7]);
        assert!(buckets[FSYNC_BUCKETS_US.len() - 1].ends_with(" 2"));
        let sum_line = text
            .lines()
            .find(|l| l.starts_with("iris_fsync_latency_seconds_sum "))
            .unwrap();
        let sum_seconds: f64 = sum_line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((sum_seconds - 0.09062).abs() < 1e-9, "{sum_line}");
    }

    #[test]
    fn promote_waits_for_the_cores_and_returns_the_new_epoch() {
        let (stats, addr) = start_node(1, Role::Replica);
        let core = {
            let stats = Arc::clone(&stats);
            thread::spawn(move || {
                while !stats.promote_requested.load(SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                // A real core takes a moment; the role flips before the epoch.
                thread::sleep(Duration::from_millis(50));
                stats.set_role(Role::Primary);
                thread::sleep(Duration::from_millis(20));
                stats.epoch.fetch_add(1, SeqCst);
            })
        };
        let (status, body) = http("POST", &addr, "/replication/promote").unwrap();
        core.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["role"].clone(), v["epoch"].clone()),
            ("primary".into(), 8.into())
        );

        let (status, body) = http("POST", &addr, "/replication/promote").unwrap();
        assert_eq!(status, 409, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["error"].clone(), v["epoch"].clone()),
            ("already primary".into(), 8.into())
        );
    }

    /// Connections are served concurrently: idle sockets up to the bound
    /// delay nobody (today's single-request server made one idle socket
    /// delay /health by its whole deadline), and a promotion waiting for the
    /// cores does not hold up /health either.
    #[test]
    fn idle_connections_and_a_pending_promotion_delay_nobody() {
        let (_stats, addr) = start_node(1, Role::Replica);
        let idle: Vec<TcpStream> = (0..TEST_CONNECTIONS_MAX - 2)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        let promoter = {
            let addr = addr.clone();
            thread::spawn(move || http("POST", &addr, "/replication/promote").unwrap())
        };
        thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert_eq!(http("GET", &addr, "/health").unwrap().0, 200);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1_000),
            "/health took {took:?} behind {} idle sockets and a promotion",
            idle.len()
        );
        // Nothing promotes this node: the promotion ends 503 on its own.
        assert_eq!(promoter.join().unwrap().0, 503);
        drop(idle);
    }

    /// Over the bound at once, a connection is answered 503 at once
    /// and closed; once connections end, requests are served again.
    #[test]
    fn connections_over_the_bound_get_503_and_close() {
        let (_stats, addr) = start_node(1, Role::Replica);
        let idle: Vec<TcpStream> = (0..TEST_CONNECTIONS_MAX)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect();
        // Let the server accept them all.
        thread::sleep(Duration::from_millis(200));
        let (status, body) = http("GET", &addr, "/health").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("too many admin connections"), "{body}");
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _) = http("GET", &addr, "/health").unwrap();
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not served again after the idle sockets left"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn promote_that_the_cores_never_finish_is_503() {
        let (stats, addr) = start_node(1, Role::Fenced);
        let started = Instant::now();
        let (status, body) = http("POST", &addr, "/replication/promote").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(started.elapsed() >= Duration::from_millis(PROMOTE_TIMEOUT_MS));
        assert!(stats.promote_requested.load(SeqCst));
        assert_eq!(stats.epoch.load(SeqCst), 7);
    }

    /// The STORED latency histogram and REJECTED by code, as the cores
    /// publish them (deltas from their own counts).
    #[test]
    fn stored_latency_and_rejections_by_code_are_exposed() {
        let (stats, addr) = start_node(1, Role::Primary);
        let mut local = crate::stats::LocalHistogram::default();
        let mut published = crate::stats::LocalHistogram::default();
        local.record(80); // 100 µs bucket
        local.record(3_000); // 5 ms bucket
        stats.publish_stored_latency(&local, &mut published);
        local.record(40_000_000); // +Inf
        stats.publish_stored_latency(&local, &mut published);
        stats.publish_stored_latency(&local, &mut published); // nothing new
        let mut codes = [0u64; REJECT_CODE_MAX + 2];
        let mut codes_published = codes;
        codes[crate::stats::reject_code_index(5)] += 2;
        codes[crate::stats::reject_code_index(99)] += 1;
        stats.publish_rejected(&codes, &mut codes_published);
        let (status, text) = http("GET", &addr, "/metrics").unwrap();
        assert_eq!(status, 200);
        for line in [
            "iris_stored_latency_seconds_count 3",
            "iris_stored_latency_seconds_bucket{le=\"0.0001\"} 1",
            "iris_stored_latency_seconds_bucket{le=\"0.005\"} 2",
            "iris_stored_latency_seconds_bucket{le=\"+Inf\"} 3",
            "iris_rejected_by_code_total{code=\"5\"} 2",
            "iris_rejected_by_code_total{code=\"other\"} 1",
            "iris_rejected_by_code_total{code=\"1\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn histogram_count_is_taken_from_the_buckets() {
        let stats = NodeStats::new(1, Role::Primary, Mode::Local, 1);
        stats.record_fsync(100);
        // A core mid-record: count bumped, bucket not yet (or the reverse).
        stats.fsync_count.fetch_add(1, Relaxed);
        let h = BucketHistogram::read(&FSYNC_BUCKETS_US, &stats.fsync_buckets, &stats.fsync_sum_us);
        assert_eq!(h.count, 1);
        assert_eq!(h.buckets.last().unwrap().0, f64::INFINITY);
    }
}
