//! Harness for the end-to-end tests: real `iris serve` processes on loopback,
//! driven through the `net` client library and through raw bytes.
//!
//! Every server gets a fresh data directory and `--listen 127.0.0.1:0`, and the
//! harness reads the bound port from the server's one stdout line, so tests
//! never collide on ports or data. Waits are generous (the machine is small and
//! noisy) but return as soon as their condition holds; no test asserts a timing.

#![forbid(unsafe_code)]

pub mod apt;
pub mod dev_cluster;
pub mod etcd;
pub mod faketime;
pub mod netlab;
pub mod python;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use net::{error_code, reject_code, MsgId};
pub use net::{new_msg_id, Client, ClientError, Delivered, Event, Welcome};

/// How long a server may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a test waits for any one expected event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful shutdown may take before the test fails.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout handed to the client library.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test watches for something that must NOT happen (an extra
/// DELIVER, a disconnect). Long enough that a server which would do it
/// usually does it within the window; not a timing assertion.
pub const QUIET_WINDOW: Duration = Duration::from_millis(1500);
/// Replication timing flags that keep failover tests short: heartbeats
/// every 200 ms, a replica's loss noticed within about 1 s.
pub const FAST_FAILURE_DETECTION: [&str; 4] =
    ["--heartbeat-ms", "200", "--replica-loss-timeout-ms", "1000"];
/// What the server prints on stdout, followed by the bound address.
pub const LISTENING_PREFIX: &str = "iris listening on ";
/// Lines of the server log shown when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// `127.0.0.1:PORT` with a port the kernel just handed out and nothing
/// listens on now (taken and closed again).
pub fn free_loopback_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .to_string()
}

/// Path of the `iris` binary built for these tests (`src/bin/iris-e2e.rs`).
///
/// Integration tests are built next to it (`target/<profile>/deps/<test>`),
/// and Cargo builds a package's binaries before running its integration tests.
/// `IRIS_E2E_BIN` overrides the lookup, e.g. to test an installed `iris`.
pub fn iris_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("IRIS_E2E_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join(format!("iris-e2e{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "iris-e2e binary not found at {}",
        bin.display()
    );
    bin
}

/// A unique path under the system temp dir: pid, counter and clock, so
/// parallel tests and repeated runs never share a directory.
pub fn unique_temp_path(kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "iris-e2e-{kind}-{}-{n}-{nanos}",
        std::process::id()
    ))
}

/// A node's admin API with the operator token the node wrote in its data
/// directory (`DATA/admin.token`, engine::admin_auth), read when the node
/// has started.
pub fn admin_of(addr: &str, data_dir: &Path) -> engine::admin_http::AdminClient {
    let path = data_dir.join(engine::admin_auth::TOKEN_FILE_NAME);
    let token = engine::admin_auth::Token::read(&path)
        .unwrap_or_else(|e| panic!("the node's operator token: {e}"));
    engine::admin_http::AdminClient::new(addr, Some(token))
}

/// One `iris serve` process (and its successors after [`Server::restart`]),
/// owning its data directory and its stderr log.
pub struct Server {
    args: Vec<String>,
    /// Environment variables added for the process (e.g. libfaketime's).
    env: Vec<(String, String)>,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Child,
    addr: String,
    /// The process's stdout lines after its listening line.
    stdout: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `iris serve` on a free port with a fresh data dir, adding
    /// `--cores 2` unless `extra_args` names the cores, and waits until it
    /// listens.
    pub fn start(extra_args: &[&str]) -> Server {
        Server::start_in(&unique_temp_path("data"), extra_args)
    }

    /// [`Server::start`] with the data directory at `data_dir` (removed on drop).
    pub fn start_in(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_env(data_dir, &[], extra_args)
    }

    /// [`Server::start_in`] with these environment variables added for the
    /// process (and its successors after a restart).
    pub fn start_with_env(
        data_dir: &Path,
        env: &[(String, String)],
        extra_args: &[&str],
    ) -> Server {
        let data_dir = data_dir.to_path_buf();
        let log_path = unique_temp_path("log").with_extension("log");
        let mut args: Vec<String> = vec!["serve".into()];
        if !extra_args.contains(&"--listen") {
            args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        }
        args.push("--data".into());
        args.push(data_dir.to_str().expect("utf-8 temp path").into());
        if !extra_args.contains(&"--cores") {
            args.push("--cores".into());
            args.push("2".into());
        }
        args.extend(extra_args.iter().map(|arg| arg.to_string()));
        let env = env.to_vec();
        let (child, addr, stdout) = spawn_server(&args, &env, &log_path);
        Server {
            args,
            env,
            data_dir,
            log_path,
            child,
            addr,
            stdout,
        }
    }

    /// `127.0.0.1:PORT` of the running process.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A `/proc/PID/status` memory field of the server, in KiB: `VmRSS`
    /// (all resident pages) or `RssAnon` (heap and stacks, no file mappings).
    pub fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), field)
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid()))
    }

    /// SIGKILL, as a power cut would: nothing gets to flush.
    pub fn kill9(&mut self) {
        // kill() fails only if the child already exited, which is fine here.
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed server");
    }

    /// SIGTERM, then waits (up to [`SHUTDOWN_TIMEOUT`]) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "server did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new process on the same data dir and arguments (new port). The old
    /// one must have exited ([`Server::kill9`] or [`Server::terminate`]).
    pub fn restart(&mut self) {
        let exited = self.child.try_wait().expect("try_wait");
        assert!(
            exited.is_some(),
            "restart() of a server that is still running"
        );
        let (child, addr, stdout) = spawn_server(&self.args, &self.env, &self.log_path);
        self.child = child;
        self.addr = addr;
        self.stdout = stdout;
    }

    /// Like [`Server::restart`], but the new process listens on the same
    /// client address as the old one (and so do later restarts).
    pub fn restart_on_same_port(&mut self) {
        let at = self
            .args
            .iter()
            .position(|arg| arg == "--listen")
            .expect("the harness always passes --listen");
        self.args[at + 1] = self.addr.clone();
        self.restart();
    }

    /// The rest of the next stdout line starting with `prefix` (e.g. `iris
    /// replication listening on `), waiting up to [`STARTUP_TIMEOUT`].
    pub fn stdout_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no stdout line `{prefix}...`\n{}", self.log_tail());
    }

    /// Runs the server's command again (the old process must have exited)
    /// expecting it to refuse to start: returns its exit status and what it
    /// wrote to stderr. Fails the test if it starts listening or runs past
    /// [`STARTUP_TIMEOUT`].
    pub fn start_expecting_refusal(&self) -> (ExitStatus, String) {
        let log_path = unique_temp_path("log").with_extension("log");
        let status = run_expecting_failure(&self.args, &log_path);
        let stderr = fs::read_to_string(&log_path).unwrap_or_default();
        let _ = fs::remove_file(&log_path);
        (status, stderr)
    }

    /// The server's whole stderr log so far (every process of this Server).
    pub fn log_tail_full(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the server's stderr, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- iris server log ({}) ---\n{}",
                self.log_path.display(),
                self.log_tail()
            );
        } else {
            let _ = fs::remove_file(&self.log_path);
        }
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

/// A `/proc/PID/status` field in KiB, if the process and the field exist.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|line| line.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// Spawns `iris-e2e <args>` with stderr appended to `log_path`; returns the
/// child and its stdout lines, read to the end on a thread so the server never
/// blocks on a full pipe. Shared by every harness that starts servers.
pub fn spawn_iris(args: &[String], log_path: &Path) -> (Child, mpsc::Receiver<String>) {
    spawn_iris_in(None, args, log_path)
}

/// [`spawn_iris`] inside the network namespace `netns` (`ip netns exec`,
/// which execs: the child is the server itself).
pub fn spawn_iris_in(
    netns: Option<&str>,
    args: &[String],
    log_path: &Path,
) -> (Child, mpsc::Receiver<String>) {
    spawn_iris_env(netns, &[], args, log_path)
}

/// [`spawn_iris_in`] with these environment variables added.
pub fn spawn_iris_env(
    netns: Option<&str>,
    env: &[(String, String)],
    args: &[String],
    log_path: &Path,
) -> (Child, mpsc::Receiver<String>) {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .expect("open server log");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(iris_bin());
            c
        }
        None => Command::new(iris_bin()),
    };
    let mut child = cmd
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env(engine::shard::DURABLE_MARK_ENV, "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn iris serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line);
        }
    });
    (child, lines_rx)
}

/// Runs `iris serve` with a fresh data dir, `--cores 2` and `extra_args`, for a
/// start that must fail: waits (up to [`STARTUP_TIMEOUT`]) for the process to
/// exit and returns its status and stderr. Printing a listening line fails
/// the test.
pub fn serve_must_fail(extra_args: &[&str]) -> (ExitStatus, String) {
    let data_dir = unique_temp_path("data");
    let log_path = unique_temp_path("log").with_extension("log");
    let mut args: Vec<String> = vec!["serve".into(), "--data".into()];
    args.push(data_dir.to_str().expect("utf-8 temp path").into());
    args.extend(["--cores".into(), "2".into()]);
    args.extend(extra_args.iter().map(|arg| arg.to_string()));
    let status = run_expecting_failure(&args, &log_path);
    let stderr = fs::read_to_string(&log_path).unwrap_or_default();
    let _ = fs::remove_file(&log_path);
    let _ = fs::remove_dir_all(&data_dir);
    (status, stderr)
}

/// Spawns `iris-e2e <args>` (stderr to `log_path`) for a start that must
/// fail: waits up to [`STARTUP_TIMEOUT`] for it to exit and returns its status.
/// A listening line, or no exit in time, fails the test.
fn run_expecting_failure(args: &[String], log_path: &Path) -> ExitStatus {
    let (mut child, lines_rx) = spawn_iris(args, log_path);
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(line) = lines_rx.try_recv() {
            if line.starts_with(LISTENING_PREFIX) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`iris {}` started: {line}\n{}",
                    args.join(" "),
                    log_tail(log_path)
                );
            }
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`iris {}` neither failed nor listened within {STARTUP_TIMEOUT:?}\n{}",
                args.join(" "),
                log_tail(log_path)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns `iris-e2e <args>` and waits for its listening line on stdout;
/// returns the child, the address, and the stdout lines still to come.
fn spawn_server(
    args: &[String],
    env: &[(String, String)],
    log_path: &Path,
) -> (Child, String, mpsc::Receiver<String>) {
    let (mut child, lines_rx) = spawn_iris_env(None, env, args, log_path);
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match lines_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
                    return (child, addr.trim().to_string(), lines_rx);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait");
                panic!(
                    "server closed stdout without a listening line ({status})\n{}",
                    log_tail(log_path)
                );
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "server did not print `{LISTENING_PREFIX}ADDR` within {STARTUP_TIMEOUT:?}\n{}",
                log_tail(log_path)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Client helpers. They panic with context on anything unexpected: a test is a
// script of what must happen, so any deviation is the failure to report.
// ---------------------------------------------------------------------------

/// Connects and authenticates `user` (servers started by `Server::start`
/// run `--auth none`: any token is accepted).
pub fn connect(addr: &str, user: &str) -> (Client, Welcome) {
    match Client::connect(addr, user, b"token", CONNECT_TIMEOUT) {
        Ok(pair) => pair,
        Err(err) => panic!("connect {user}@{addr}: {err:?}"),
    }
}

/// A TCP connection with no HELLO sent yet.
pub fn connect_raw(addr: &str) -> Client {
    Client::connect_raw(addr, CONNECT_TIMEOUT)
        .unwrap_or_else(|err| panic!("connect_raw {addr}: {err:?}"))
}

/// The next event, failing the test on timeout, EOF or a client error.
pub fn next_event(client: &mut Client) -> Event {
    match client.recv(EVENT_TIMEOUT) {
        Ok(Some(event)) => event,
        Ok(None) => panic!("no event within {EVENT_TIMEOUT:?}"),
        Err(err) => panic!("connection failed while waiting for an event: {err:?}"),
    }
}

/// Asserts that nothing arrives for [`QUIET_WINDOW`].
pub fn expect_quiet(client: &mut Client) {
    match client.recv(QUIET_WINDOW) {
        Ok(None) => {}
        Ok(Some(event)) => panic!("expected silence, got {event:?}"),
        Err(err) => panic!("expected silence, connection failed: {err:?}"),
    }
}

/// Sends one message and waits for its STORED; any other event fails the test.
pub fn send_stored(client: &mut Client, to: &str, body: &[u8]) -> MsgId {
    let msg_id = new_msg_id();
    send_id_stored(client, msg_id, to, body);
    msg_id
}

/// Sends `msg_id` and waits for its STORED.
pub fn send_id_stored(client: &mut Client, msg_id: MsgId, to: &str, body: &[u8]) {
    client.send(msg_id, to, body).expect("send");
    client.flush().expect("flush");
    match next_event(client) {
        Event::Stored { msg_id: stored } if stored == msg_id => {}
        other => panic!("expected STORED {}, got {other:?}", hex(&msg_id)),
    }
}

/// Sends one message and returns its REJECTED code; STORED fails the test.
pub fn send_rejected(client: &mut Client, to: &str, body: &[u8]) -> u16 {
    let msg_id = new_msg_id();
    client.send(msg_id, to, body).expect("send");
    client.flush().expect("flush");
    match next_event(client) {
        Event::Rejected {
            msg_id: rejected,
            code,
            ..
        } if rejected == msg_id => code,
        other => panic!("expected REJECTED {}, got {other:?}", hex(&msg_id)),
    }
}

/// Pipelines one SEND per body to `to`; see [`pipeline_stored_to`].
pub fn pipeline_stored(
    client: &mut Client,
    to: &str,
    bodies: &[Vec<u8>],
    window: usize,
) -> Vec<MsgId> {
    let messages: Vec<(&str, &[u8])> = bodies.iter().map(|b| (to, b.as_slice())).collect();
    pipeline_stored_to(client, &messages, window)
}

/// Pipelines one SEND per `(to, body)`, at most `window` unanswered at a
/// time, and waits for all answers. Asserts each msg_id is STORED exactly
/// once and nothing else arrives; returns the ids in send order.
///
/// The window keeps the test's own connection from becoming a slow reader
/// (STORED frames pile up in the server's outbox if nobody reads them).
pub fn pipeline_stored_to(
    client: &mut Client,
    messages: &[(&str, &[u8])],
    window: usize,
) -> Vec<MsgId> {
    assert!(window > 0);
    let ids: Vec<MsgId> = messages.iter().map(|_| new_msg_id()).collect();
    let index: HashMap<MsgId, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    assert_eq!(index.len(), ids.len(), "new_msg_id repeated itself");
    let mut stored = vec![false; ids.len()];
    let (mut sent, mut answered) = (0, 0);
    while answered < ids.len() {
        while sent < ids.len() && sent - answered < window {
            let (to, body) = messages[sent];
            client.send(ids[sent], to, body).expect("send");
            sent += 1;
        }
        client.flush().expect("flush");
        match next_event(client) {
            Event::Stored { msg_id } => {
                let i = *index
                    .get(&msg_id)
                    .unwrap_or_else(|| panic!("STORED for an unknown id {}", hex(&msg_id)));
                assert!(!stored[i], "STORED twice for message #{i}");
                stored[i] = true;
                answered += 1;
            }
            other => panic!(
                "expected STORED ({answered}/{} so far), got {other:?}",
                ids.len()
            ),
        }
    }
    ids
}

/// Collects exactly `n` DELIVERs; anything else fails the test.
pub fn collect_deliveries(client: &mut Client, n: usize) -> Vec<Delivered> {
    let mut out: Vec<Delivered> = Vec::with_capacity(n);
    while out.len() < n {
        let last_seq = out.last().map(|d| d.seq);
        match client.recv(EVENT_TIMEOUT) {
            Ok(Some(Event::Deliver(delivered))) => out.push(delivered),
            Ok(Some(other)) => panic!(
                "expected DELIVER ({}/{n} so far, last seq {last_seq:?}), got {other:?}",
                out.len()
            ),
            Ok(None) => panic!(
                "no DELIVER within {EVENT_TIMEOUT:?} ({}/{n} so far, last seq {last_seq:?})",
                out.len()
            ),
            Err(err) => panic!(
                "connection failed after {}/{n} DELIVERs (last seq {last_seq:?}): {err:?}",
                out.len()
            ),
        }
    }
    out
}

/// DELIVERs a reader may leave unACKed before [`collect_and_ack`] ACKs:
/// well below the server's delivery window (docs/PROTOCOL.md 6a: it sends
/// at most `deliver_window`, 512, beyond the last ACK, then waits).
pub const ACK_EVERY: usize = 128;

/// Collects exactly `n` DELIVERs like [`collect_deliveries`], ACKing as it
/// goes (every [`ACK_EVERY`] and the last one), as a real reader does. For
/// backlogs beyond the delivery window.
pub fn collect_and_ack(client: &mut Client, n: usize) -> Vec<Delivered> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = collect_deliveries(client, ACK_EVERY.min(n - out.len()));
        let last_seq = batch.last().expect("non-empty batch").seq;
        client.ack(last_seq).expect("ack");
        client.flush().expect("flush");
        out.extend(batch);
    }
    out
}

/// Asserts the next event is ERROR `code`, then that the server closes.
pub fn expect_error_then_close(client: &mut Client, code: u16) {
    match next_event(client) {
        Event::Error { code: got, reason } => {
            assert_eq!(got, code, "ERROR code (reason: {reason:?})")
        }
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
    expect_closed(client);
}

/// Asserts the server closes the connection (EOF or reset) with no further event.
pub fn expect_closed(client: &mut Client) {
    match client.recv(EVENT_TIMEOUT) {
        Err(ClientError::Closed) | Err(ClientError::Io(_)) => {}
        Ok(None) => panic!("connection still open {EVENT_TIMEOUT:?} after ERROR"),
        Ok(Some(event)) => panic!("expected close, got {event:?}"),
        Err(err) => panic!("expected close, got {err:?}"),
    }
}

/// Sends a message `from` -> `to` over two live connections and checks the
/// DELIVER field by field, then ACKs it. Proves both connections still work.
pub fn round_trip(sender: &mut Client, from: &str, receiver: &mut Client, to: &str) {
    let body = format!("round trip {from} -> {to}");
    let msg_id = send_stored(sender, to, body.as_bytes());
    let delivered = collect_deliveries(receiver, 1).remove(0);
    assert_eq!(delivered.msg_id, msg_id);
    assert_eq!(delivered.from, from);
    assert_eq!(delivered.body, body.as_bytes());
    receiver.ack(delivered.seq).expect("ack");
    receiver.flush().expect("flush");
}

/// ACKs `seq`, then does a PING round trip so the server has read the ACK
/// before the test goes on (frames of one connection are handled in order).
pub fn ack_and_sync(client: &mut Client, seq: u64) {
    client.ack(seq).expect("ack");
    client.ping(seq).expect("ping");
    client.flush().expect("flush");
    match next_event(client) {
        Event::Pong { nonce } => assert_eq!(nonce, seq, "PONG nonce"),
        other => panic!("expected PONG {seq}, got {other:?}"),
    }
}

/// Lower-case hex, as the CLI prints message ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Raw frames, built from docs/PROTOCOL.md by hand rather than by the codec
// under test, so the tests can also build frames the codec refuses to.
// ---------------------------------------------------------------------------

pub mod raw {
    pub const HELLO: u8 = 0x01;
    pub const SEND: u8 = 0x10;
    pub const ACK: u8 = 0x21;
    pub const PING: u8 = 0x30;

    /// `u32 len` (type + payload), `u8 type`, payload.
    pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(1 + payload.len()).expect("frame fits u32");
        let mut out = len.to_le_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    /// A `str` field from raw bytes (need not be valid UTF-8 or a valid id).
    pub fn str_field(bytes: &[u8]) -> Vec<u8> {
        let len = u8::try_from(bytes.len()).expect("str field is at most 255 bytes");
        let mut out = vec![len];
        out.extend_from_slice(bytes);
        out
    }

    pub fn hello(version: u8, user: &[u8], token: &[u8]) -> Vec<u8> {
        let mut payload = vec![version];
        payload.extend(str_field(user));
        let token_len = u16::try_from(token.len()).expect("token fits u16");
        payload.extend_from_slice(&token_len.to_le_bytes());
        payload.extend_from_slice(token);
        frame(HELLO, &payload)
    }

    pub fn send(msg_id: &[u8; 16], to: &[u8], body: &[u8]) -> Vec<u8> {
        let mut payload = msg_id.to_vec();
        payload.extend(str_field(to));
        payload.extend_from_slice(body);
        frame(SEND, &payload)
    }

    pub fn ack(seq: u64) -> Vec<u8> {
        frame(ACK, &seq.to_le_bytes())
    }

    pub fn ping(nonce: u64) -> Vec<u8> {
        frame(PING, &nonce.to_le_bytes())
    }
}

// ---------------------------------------------------------------------------
// WAL files on disk, for tests that damage them on purpose.
// ---------------------------------------------------------------------------

/// The segment files of shard `shard` under a data directory, oldest first.
pub fn wal_segments(data: &Path, shard: usize) -> Vec<PathBuf> {
    let dir = data.join(format!("shard-{shard:03}"));
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    files
}

/// (offset, position) of every record of a segment file's bytes.
pub fn wal_records(bytes: &[u8]) -> Vec<(usize, u64)> {
    let mut found = Vec::new();
    let mut offset = wal::format::SEGMENT_HEADER_LEN;
    while let wal::format::Decoded::Record(record, frame) =
        wal::format::decode_record(&bytes[offset..], u32::MAX)
    {
        found.push((offset, record.position));
        offset += frame;
    }
    found
}

/// Flips one payload byte of the last record in shard `shard`'s newest
/// segment (the process must be stopped); returns the record's position.
pub fn damage_last_wal_record(data: &Path, shard: usize) -> u64 {
    let path = wal_segments(data, shard).pop().expect("a segment");
    let mut bytes = fs::read(&path).expect("read segment");
    let (offset, position) = *wal_records(&bytes).last().expect("a record");
    bytes[offset + wal::format::RECORD_HEADER_LEN + 2] ^= 0x20;
    fs::write(&path, &bytes).expect("write segment");
    position
}
