//! Replication end to end: a primary and a replica (real `iris serve`
//! processes), kill -9 of either, manual promotion, an old primary rejoining,
//! degrade vs block, a wiped replica, and a fake primary that sends a bad
//! stream.
//!
//! The loss tests never let msg_id dedup hide a loss: every msg_id that got
//! STORED must reach its recipient on the promoted node, and no msg_id may
//! arrive twice. Every wait is a poll with a generous deadline that returns as
//! soon as its condition holds; nothing asserts a timing.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tests::{
    ack_and_sync, collect_and_ack, collect_deliveries, connect, expect_quiet, hex, new_msg_id,
    next_event, pipeline_stored_to, reject_code, send_id_stored, send_rejected, Client, Delivered,
    Event, MsgId, EVENT_TIMEOUT,
};

/// How long any one awaited condition may take before the test fails.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
const CORES: usize = 2;
/// Lines of a node's log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;

// ---------------------------------------------------------------------------
// Nodes: `iris serve` with client, replication and admin listeners.
// ---------------------------------------------------------------------------

/// One `iris serve` process (and its successors after a restart), with its
/// three bound addresses read from stdout.
struct Node {
    name: &'static str,
    /// Arguments after `--data DIR`.
    extra: Vec<String>,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Child,
    client: String,
    repl: String,
    admin: String,
}

fn unique_path(kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "iris-e2e-repl-{kind}-{}-{n}-{nanos}",
        std::process::id()
    ))
}

impl Node {
    /// A primary on fresh data, `--cores 2` unless `extra` names the cores.
    fn primary(name: &'static str, extra: &[&str]) -> Node {
        Node::start(name, extra)
    }

    /// A replica of `primary` on fresh data.
    fn replica(name: &'static str, primary: &Node, extra: &[&str]) -> Node {
        let mut args = vec!["--replica-of", primary.repl.as_str()];
        args.extend_from_slice(extra);
        Node::start(name, &args)
    }

    fn start(name: &'static str, extra: &[&str]) -> Node {
        let data_dir = unique_path(name);
        let log_path = unique_path(name).with_extension("log");
        let repl_listen: &[&str] = if extra.contains(&"--replication-listen") {
            &[]
        } else {
            &["--replication-listen", "127.0.0.1:0"]
        };
        let mut args: Vec<String> = repl_listen
            .iter()
            .chain(["--admin", "127.0.0.1:0"].iter())
            .chain(tests::FAST_FAILURE_DETECTION.iter())
            .map(|s| s.to_string())
            .collect();
        if !extra.contains(&"--cores") {
            args.extend(["--cores".to_string(), CORES.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let (child, client, repl, admin) = spawn_node(name, &data_dir, &args, &log_path);
        Node {
            name,
            extra: args,
            data_dir,
            log_path,
            child,
            client,
            repl,
            admin,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed node");
    }

    /// Same data dir and arguments, new ports. The process must have exited.
    fn restart(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_some(),
            "{}: restart of a running node",
            self.name
        );
        (self.child, self.client, self.repl, self.admin) =
            spawn_node(self.name, &self.data_dir, &self.extra, &self.log_path);
    }

    /// Restarts on the same data dir as a replica of `primary_repl`.
    fn restart_as_replica_of(&mut self, primary_repl: &str) {
        let mut extra = Vec::new();
        let mut args = self.extra.iter();
        while let Some(arg) = args.next() {
            if arg == "--replica-of" {
                args.next();
            } else {
                extra.push(arg.clone());
            }
        }
        extra.extend(["--replica-of".to_string(), primary_repl.to_string()]);
        self.extra = extra;
        self.restart();
    }

    /// The whole stderr log so far (all incarnations), ANSI colours removed.
    fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_end(&mut bytes);
        }
        strip_ansi(&String::from_utf8_lossy(&bytes))
    }

    /// The log written after `from` (a value of `log().len()`).
    fn log_since(&self, from: usize) -> String {
        self.log().get(from..).unwrap_or_default().to_string()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// The admin API with the node's operator token.
    fn admin_client(&self) -> engine::admin_http::AdminClient {
        tests::admin_of(&self.admin, &self.data_dir)
    }

    fn stats(&self) -> Value {
        let (status, body) = self
            .admin_client()
            .call("GET", "/replication/stats")
            .unwrap_or_else(|e| panic!("{}: GET /replication/stats: {e}", self.name));
        assert_eq!(status, 200, "{}: stats status, body {body}", self.name);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{}: stats are not JSON ({e}): {body}", self.name))
    }

    /// Per shard `last_position`, in shard order.
    fn positions(&self) -> Vec<u64> {
        shard_field(&self.stats(), "last_position")
    }

    /// POST /replication/promote; returns the new epoch. 503 (the cores are
    /// still finishing) is retried, as the admin API allows.
    fn promote(&self) -> u64 {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let (status, body) = self
                .admin_client()
                .call("POST", "/replication/promote")
                .unwrap_or_else(|e| panic!("{}: promote: {e}", self.name));
            // 409 "primary is alive": it has not yet seen its stopped
            // primary's stream end.
            let busy = status == 503 || (status == 409 && body.contains("primary is alive"));
            if busy && Instant::now() < deadline {
                thread::sleep(POLL_INTERVAL);
                continue;
            }
            assert_eq!(status, 200, "{}: promote answered {body}", self.name);
            let v: Value = serde_json::from_str(&body).expect("promote answer is JSON");
            assert_eq!(v["role"], "primary", "{}: promote answer {body}", self.name);
            return v["epoch"].as_u64().expect("promote answer has an epoch");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail()
            );
        } else {
            let _ = fs::remove_file(&self.log_path);
        }
        let _ = fs::remove_dir_all(&self.data_dir);
    }
}

/// Starts `iris serve` and waits for its three listening lines: returns the
/// process and its client, replication and admin addresses.
fn spawn_node(
    name: &str,
    data_dir: &Path,
    extra: &[String],
    log_path: &Path,
) -> (Child, String, String, String) {
    let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0", "--data"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(data_dir.display().to_string());
    args.extend(extra.iter().cloned());
    let (mut child, rx) = tests::spawn_iris(&args, log_path);
    let (mut client, mut repl, mut admin) = (None, None, None);
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while client.is_none() || repl.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            let log = strip_ansi(&fs::read_to_string(log_path).unwrap_or_default());
            panic!("{name}: no listening lines within {WAIT_TIMEOUT:?}; log:\n{log}");
        };
        let addr = |prefix: &str| line.strip_prefix(prefix).map(|a| a.trim().to_string());
        client = client.or(addr("iris listening on "));
        repl = repl.or(addr("iris replication listening on "));
        admin = admin.or(addr("iris admin listening on "));
    }
    let addrs = (client, repl, admin);
    (
        child,
        addrs.0.expect("set"),
        addrs.1.expect("set"),
        addrs.2.expect("set"),
    )
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte(@..~)
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn shard_field(stats: &Value, field: &str) -> Vec<u64> {
    stats["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("stats without shards: {stats}"))
        .iter()
        .map(|s| {
            s[field]
                .as_u64()
                .unwrap_or_else(|| panic!("shard without {field}: {stats}"))
        })
        .collect()
}

/// Polls `cond` until it holds; fails the test after [`WAIT_TIMEOUT`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT_TIMEOUT:?} waiting for: {what}"
        );
        thread::sleep(POLL_INTERVAL);
    }
}

fn wait_mode(node: &Node, mode: &str) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let last = node.stats();
        if last["mode"] == mode {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: mode never became {mode}; last stats {last}",
            node.name
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until both nodes report the same per-shard last_position.
fn wait_converged(a: &Node, b: &Node) {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        let last = (a.positions(), b.positions());
        if last.0 == last.1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "positions never converged: {} {:?}, {} {:?}",
            a.name,
            last.0,
            b.name,
            last.1
        );
        thread::sleep(POLL_INTERVAL);
    }
}

/// Waits until `primary` is in mode `replica` and its replica has acked every
/// position of every shard. A recipient who logs in while the mode is
/// `replica` but the ack is behind his messages is not sent them when the ack
/// arrives (a server bug, reported with its own test); tests about something
/// else wait here so they test their own subject.
fn wait_caught_up(primary: &Node) {
    wait_mode(primary, "replica");
    wait_until(
        &format!("{}: replica acked every position", primary.name),
        || {
            let stats = primary.stats();
            stats["shards"]
                .as_array()
                .expect("shards")
                .iter()
                .all(|s| s["replicas"][0]["acked_position"] == s["last_position"])
        },
    );
}

/// A fresh primary and its replica, with the primary in mode `replica`.
fn pair(primary_extra: &[&str]) -> (Node, Node) {
    let primary = Node::primary("primary", primary_extra);
    let replica = Node::replica("replica", &primary, &[]);
    wait_mode(&primary, "replica");
    (primary, replica)
}

// ---------------------------------------------------------------------------
// Users, load and checks.
// ---------------------------------------------------------------------------

fn shard_of(user: &str) -> usize {
    usize::from(net::slot_of(user)) * CORES / usize::from(net::SLOT_COUNT)
}

/// `n` user ids named `prefix0..`, alternating between the shards.
fn users(prefix: &str, n: usize) -> Vec<String> {
    let mut per_shard: Vec<Vec<String>> = vec![Vec::new(); CORES];
    for i in 0.. {
        if per_shard.iter().all(|s| s.len() * CORES >= n) {
            break;
        }
        let user = format!("{prefix}{i}");
        per_shard[shard_of(&user)].push(user);
    }
    (0..n)
        .map(|i| per_shard[i % CORES][i / CORES].clone())
        .collect()
}

/// A STORED message: (msg_id, recipient).
type Sent = (MsgId, String);

/// `count` pipelined SENDs from `from`, round robin over `to`, all STORED.
fn send_all(addr: &str, from: &str, to: &[String], count: usize) -> Vec<Sent> {
    let (mut client, _) = connect(addr, from);
    let bodies: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            let to = to[i % to.len()].clone();
            let body = format!("{from} -> {to} #{i}").into_bytes();
            (to, body)
        })
        .collect();
    let messages: Vec<(&str, &[u8])> = bodies
        .iter()
        .map(|(to, b)| (to.as_str(), b.as_slice()))
        .collect();
    let ids = pipeline_stored_to(&mut client, &messages, 64);
    ids.into_iter()
        .zip(bodies)
        .map(|(id, (to, _))| (id, to))
        .collect()
}

/// Several senders at once (one thread each); every SEND STORED.
fn send_parallel(addr: &str, senders: &[String], to: &[String], each: usize) -> Vec<Sent> {
    thread::scope(|s| {
        let handles: Vec<_> = senders
            .iter()
            .map(|from| s.spawn(move || send_all(addr, from, to, each)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sender thread"))
            .collect()
    })
}

/// Connects `user` and takes everything pending (as WELCOME announces it),
/// without ACKing (at most the server's delivery window).
fn take_inbox(addr: &str, user: &str) -> (Client, Vec<Delivered>) {
    let (mut client, welcome) = connect(addr, user);
    let delivered = collect_deliveries(&mut client, welcome.pending as usize);
    (client, delivered)
}

/// Connects `user` and takes everything pending, ACKing as a reader does.
fn drain_inbox(addr: &str, user: &str) -> (Client, Vec<Delivered>) {
    let (mut client, welcome) = connect(addr, user);
    let delivered = collect_and_ack(&mut client, welcome.pending as usize);
    (client, delivered)
}

/// Each recipient on `addr` gets every STORED id (`stored`) exactly once,
/// with dense seqs from 1, and nothing that was never sent (`sent`: ids sent,
/// answered or not). Dedup by msg_id must not be what hides a loss, so a
/// duplicate id is a failure here.
fn check_inboxes(addr: &str, recipients: &[String], stored: &[Sent], sent: &HashSet<MsgId>) {
    for user in recipients {
        let expected: HashSet<MsgId> = stored
            .iter()
            .filter(|(_, to)| to == user)
            .map(|(id, _)| *id)
            .collect();
        let (_client, delivered) = drain_inbox(addr, user);
        let mut seen = HashSet::new();
        for (i, d) in delivered.iter().enumerate() {
            assert_eq!(d.seq, i as u64 + 1, "{user}: seqs are dense from 1");
            assert!(
                seen.insert(d.msg_id),
                "{user}: msg {} delivered twice",
                hex(&d.msg_id)
            );
            assert!(
                sent.contains(&d.msg_id),
                "{user}: msg {} was never sent",
                hex(&d.msg_id)
            );
        }
        let lost: Vec<String> = expected.difference(&seen).map(|id| hex(id)).collect();
        assert!(
            lost.is_empty(),
            "{user}: {} of {} STORED messages lost on the promoted replica (got {}), e.g. {:?}",
            lost.len(),
            expected.len(),
            delivered.len(),
            &lost[..lost.len().min(5)]
        );
    }
}

fn ids_of(sent: &[Sent]) -> HashSet<MsgId> {
    sent.iter().map(|(id, _)| *id).collect()
}

/// A sender that keeps `window` SENDs in flight until `stop`, then collects
/// the answers still due. Every answer must be STORED (degrade policy).
struct Load {
    stop: std::sync::Arc<AtomicBool>,
    stored: std::sync::Arc<AtomicUsize>,
    handle: thread::JoinHandle<Vec<Sent>>,
}

impl Load {
    fn start(addr: &str, from: &str, to: &[String]) -> Load {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stored = std::sync::Arc::new(AtomicUsize::new(0));
        let (addr, from, to) = (addr.to_string(), from.to_string(), to.to_vec());
        let (stop2, stored2) = (stop.clone(), stored.clone());
        let handle = thread::spawn(move || {
            let (mut client, _) = connect(&addr, &from);
            let mut in_flight: HashMap<MsgId, String> = HashMap::new();
            let mut done = Vec::new();
            let mut i = 0usize;
            loop {
                let stopping = stop2.load(Ordering::SeqCst);
                if stopping && in_flight.is_empty() {
                    return done;
                }
                while !stopping && in_flight.len() < 16 {
                    let (id, recipient) = (new_msg_id(), &to[i % to.len()]);
                    client
                        .send(id, recipient, format!("load #{i}").as_bytes())
                        .expect("send");
                    in_flight.insert(id, recipient.clone());
                    i += 1;
                }
                client.flush().expect("flush");
                match next_event(&mut client) {
                    Event::Stored { msg_id } => {
                        let to = in_flight
                            .remove(&msg_id)
                            .unwrap_or_else(|| panic!("STORED for unknown {}", hex(&msg_id)));
                        done.push((msg_id, to));
                        stored2.fetch_add(1, Ordering::SeqCst);
                    }
                    other => panic!("load: expected STORED, got {other:?}"),
                }
            }
        });
        Load {
            stop,
            stored,
            handle,
        }
    }

    fn stored(&self) -> usize {
        self.stored.load(Ordering::SeqCst)
    }

    /// Waits until `more` further STOREDs arrive.
    fn wait_more(&self, more: usize, what: &str) {
        let target = self.stored() + more;
        wait_until(&format!("{more} more STORED {what}"), || {
            assert!(!self.handle.is_finished(), "load thread died");
            self.stored() >= target
        });
    }

    fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("load thread")
    }
}

// ---------------------------------------------------------------------------
// 1, 2: no STORED message is lost when the primary dies.
// ---------------------------------------------------------------------------

const SENDERS: usize = 4;
const RECIPIENTS: usize = 4;
const ROUNDS: usize = 5;

#[test]
fn kill9_primary_after_last_stored_loses_nothing() {
    for round in 0..ROUNDS {
        let (mut primary, replica) = pair(&[]);
        let senders = users(&format!("r{round}s"), SENDERS);
        let recipients = users(&format!("r{round}r"), RECIPIENTS);
        let stored = send_parallel(&primary.client, &senders, &recipients, 250);
        assert_eq!(stored.len(), 1000);
        primary.kill9();
        let epoch = replica.promote();
        assert_eq!(epoch, 2, "round {round}: promoted epoch");
        check_inboxes(&replica.client, &recipients, &stored, &ids_of(&stored));
    }
}

/// Counts STOREDs over all senders and signals once `threshold` arrived, so
/// the kill follows at once (a poll would let the whole pipeline finish).
struct KillAfter {
    stored: AtomicUsize,
    threshold: usize,
    signal: std::sync::Mutex<mpsc::Sender<()>>,
    /// Every sender is connected before any sends: a kill must not find one
    /// still connecting.
    connected: std::sync::Barrier,
}

impl KillAfter {
    fn count_one(&self) {
        if self.stored.fetch_add(1, Ordering::SeqCst) + 1 == self.threshold {
            let _ = self.signal.lock().expect("not poisoned").send(());
        }
    }
}

/// Sends `count` pipelined messages and reads answers until the connection
/// breaks (the primary was killed) or all are answered. Returns (every id
/// sent, the STORED ones).
fn send_until_killed(
    addr: &str,
    from: &str,
    to: &[String],
    count: usize,
    kill: &KillAfter,
) -> (Vec<MsgId>, Vec<Sent>) {
    let (mut client, _) = connect(addr, from);
    kill.connected.wait();
    let mut sent = HashMap::new();
    for i in 0..count {
        let (id, recipient) = (new_msg_id(), &to[i % to.len()]);
        client
            .send(id, recipient, format!("in flight #{i}").as_bytes())
            .expect("send");
        sent.insert(id, recipient.clone());
    }
    let all: Vec<MsgId> = sent.keys().copied().collect();
    let mut stored = Vec::new();
    if client.flush().is_err() {
        return (all, stored);
    }
    while stored.len() < count {
        match client.recv(EVENT_TIMEOUT) {
            Ok(Some(Event::Stored { msg_id })) => {
                let to = sent.get(&msg_id).expect("STORED for an id sent").clone();
                stored.push((msg_id, to));
                kill.count_one();
            }
            Ok(Some(other)) => panic!("expected STORED, got {other:?}"),
            Ok(None) => panic!("no answer within {EVENT_TIMEOUT:?} and the primary not killed"),
            Err(_) => break, // killed
        }
    }
    (all, stored)
}

#[test]
fn kill9_primary_mid_pipeline_keeps_every_stored_message() {
    const EACH: usize = 2000;
    const KILL_AFTER: usize = 500;
    for round in 0..ROUNDS {
        let (mut primary, replica) = pair(&[]);
        let senders = users(&format!("m{round}s"), SENDERS);
        let recipients = users(&format!("m{round}r"), RECIPIENTS);
        let (signal, killed) = mpsc::channel();
        let kill = KillAfter {
            stored: AtomicUsize::new(0),
            threshold: KILL_AFTER,
            signal: std::sync::Mutex::new(signal),
            connected: std::sync::Barrier::new(SENDERS),
        };
        let addr = primary.client.clone();
        let (all, stored) = thread::scope(|s| {
            let handles: Vec<_> = senders
                .iter()
                .map(|from| {
                    let (addr, to, kill) = (&addr, &recipients, &kill);
                    s.spawn(move || send_until_killed(addr, from, to, EACH, kill))
                })
                .collect();
            killed
                .recv_timeout(WAIT_TIMEOUT)
                .expect("500 STORED before the kill");
            primary.kill9();
            let mut all = HashSet::new();
            let mut stored = Vec::new();
            for h in handles {
                let (a, st) = h.join().expect("sender thread");
                all.extend(a);
                stored.extend(st);
            }
            (all, stored)
        });
        assert!(
            stored.len() < SENDERS * EACH,
            "round {round}: the kill came after every answer; nothing was in flight"
        );
        replica.promote();
        check_inboxes(&replica.client, &recipients, &stored, &all);
    }
}

// ---------------------------------------------------------------------------
// 3: the replica dies under load and comes back.
// ---------------------------------------------------------------------------

/// `start_position` of each "following the primary" line, by shard.
fn follow_starts(log: &str) -> HashMap<u64, (u64, bool)> {
    let field = |line: &str, name: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
    };
    log.lines()
        .filter(|l| l.contains("following the primary"))
        .filter_map(|l| {
            let shard = field(l, "shard")?.parse().ok()?;
            let start = field(l, "start_position")?.parse().ok()?;
            let full = field(l, "full")? == "true";
            Some((shard, (start, full)))
        })
        .collect()
}

#[test]
fn replica_kill9_and_restart_under_load() {
    let (mut primary, mut replica) = pair(&[]);
    let recipients = users("k3r", RECIPIENTS);
    let load = Load::start(&primary.client, "k3sender", &recipients);
    load.wait_more(300, "before the replica dies");

    replica.kill9();
    wait_mode(&primary, "degraded");
    load.wait_more(200, "while the replica is away (degrade policy)");

    let offset = replica.log().len();
    replica.restart();
    wait_until("the restarted replica follows every shard", || {
        follow_starts(&replica.log_since(offset)).len() == CORES
    });
    for (shard, (start, full)) in follow_starts(&replica.log_since(offset)) {
        assert!(
            !full && start > 1,
            "shard {shard}: expected a partial sync from the middle, got start {start} full {full}"
        );
    }
    wait_mode(&primary, "replica");
    load.wait_more(200, "after the replica is back");
    let stored = load.finish();

    wait_converged(&primary, &replica);
    primary.kill9();
    replica.promote();
    check_inboxes(&replica.client, &recipients, &stored, &ids_of(&stored));
}

// ---------------------------------------------------------------------------
// 4: a replica whose data was wiped gets a full sync of the live state.
// ---------------------------------------------------------------------------

#[test]
fn wiped_replica_full_sync_has_the_live_state() {
    // Small segments, so that churn makes the primary checkpoint and delete
    // its first segments: its log no longer starts at 1 and a replica with
    // nothing needs a snapshot.
    const SEGMENT: [&str; 2] = ["--wal-segment-bytes", "131072"];
    let mut primary = Node::primary("primary", &SEGMENT);
    let mut replica = Node::replica("replica", &primary, &SEGMENT);
    wait_mode(&primary, "replica");

    // Churn: ~600 KB per shard, all consumed.
    let churners = users("w4churn", CORES);
    let body = vec![b'x'; 1000];
    let (mut alice, _) = connect(&primary.client, "alice");
    for to in &churners {
        let bodies = vec![body.clone(); 600];
        tests::pipeline_stored(&mut alice, to, &bodies, 64);
        let (mut c, delivered) = drain_inbox(&primary.client, to);
        assert_eq!(delivered.len(), 600);
        ack_and_sync(&mut c, 600);
    }
    wait_until("the primary deletes old segments on every shard", || {
        let log = primary.log();
        (0..CORES).all(|s| {
            log.lines().any(|l| {
                l.contains("old WAL segments deleted") && l.contains(&format!("shard={s}"))
            })
        })
    });

    // Live state: bob and carol (one per shard) with some messages ACKed.
    let [bob, carol]: [String; 2] = users("w4live", 2).try_into().expect("two users");
    let mut sent: HashMap<&str, Vec<MsgId>> = HashMap::new();
    for (to, acked) in [(&bob, 8u64), (&carol, 5)] {
        let ids: Vec<MsgId> = (0..20)
            .map(|i| tests::send_stored(&mut alice, to, format!("live {i}").as_bytes()))
            .collect();
        let (mut c, delivered) = take_inbox(&primary.client, to);
        assert_eq!(delivered.len(), 20);
        ack_and_sync(&mut c, acked);
        sent.insert(to.as_str(), ids);
    }
    wait_converged(&primary, &replica);

    replica.kill9();
    fs::remove_dir_all(&replica.data_dir).expect("wipe the replica's data");
    let offset = replica.log().len();
    replica.restart();
    wait_until("a full sync of every shard", || {
        let log = replica.log_since(offset);
        (0..CORES).all(|s| {
            log.lines().any(|l| {
                l.contains("full sync: snapshot applied") && l.contains(&format!("shard={s}"))
            })
        })
    });
    wait_converged(&primary, &replica);
    wait_mode(&primary, "replica");

    primary.kill9();
    replica.promote();

    for (to, acked) in [(&bob, 8usize), (&carol, 5)] {
        let ids = &sent[to.as_str()];
        let (_c, delivered) = take_inbox(&replica.client, to);
        let got: Vec<(u64, MsgId)> = delivered.iter().map(|d| (d.seq, d.msg_id)).collect();
        let want: Vec<(u64, MsgId)> = (acked..20).map(|i| (i as u64 + 1, ids[i])).collect();
        assert_eq!(got, want, "{to}: exactly the unACKed messages, same seqs");
    }
    for to in &churners {
        let (c, welcome) = connect(&replica.client, to);
        assert_eq!(welcome.pending, 0, "{to}: everything was ACKed");
        drop(c);
    }

    let (mut bob_c, welcome) = connect(&replica.client, &bob);
    assert_eq!(welcome.pending, 12);
    collect_deliveries(&mut bob_c, 12);
    let (mut alice, _) = connect(&replica.client, "alice");
    // Dedup survived the snapshot: old ids (ACKed and pending) are STORED
    // again and not delivered again.
    let bob_ids = &sent[bob.as_str()];
    send_id_stored(&mut alice, bob_ids[0], &bob, b"repeat of an ACKed message");
    send_id_stored(
        &mut alice,
        bob_ids[19],
        &bob,
        b"repeat of a pending message",
    );
    // Seqs continue: the next message to bob is #21.
    let next = tests::send_stored(&mut alice, &bob, b"after the failover");
    let d = collect_deliveries(&mut bob_c, 1).remove(0);
    assert_eq!((d.seq, d.msg_id), (21, next), "next seq after the snapshot");
    expect_quiet(&mut bob_c);
}

// ---------------------------------------------------------------------------
// 5: the old primary comes back as a replica of the promoted one.
// ---------------------------------------------------------------------------

#[test]
fn old_primary_rejoins_fenced_as_replica() {
    let (mut old, new) = pair(&[]);
    let recipients = users("f5r", RECIPIENTS);
    let before = send_all(&old.client, "f5alice", &recipients, 40);
    old.kill9();
    assert_eq!(new.promote(), 2);
    let after = send_all(&new.client, "f5alice", &recipients, 30);

    old.restart_as_replica_of(&new.repl);
    wait_until("the old primary reports role replica, epoch 2", || {
        let s = old.stats();
        s["role"] == "replica" && s["epoch"] == 2
    });
    wait_converged(&old, &new);
    wait_caught_up(&new);

    let (mut client, _) = connect(&old.client, "f5alice");
    let id = new_msg_id();
    client
        .send(id, &recipients[0], b"to the old primary")
        .expect("send");
    client.flush().expect("flush");
    match next_event(&mut client) {
        Event::Rejected {
            msg_id,
            code,
            reason,
        } if msg_id == id => {
            assert_eq!(code, reject_code::UNAVAILABLE, "reason {reason}");
            assert!(
                reason.contains(&new.client),
                "the redirect names the new primary {}: {reason:?}",
                new.client
            );
        }
        other => panic!("expected REJECTED 4, got {other:?}"),
    }
    let all: Vec<Sent> = before.into_iter().chain(after).collect();
    check_inboxes(&new.client, &recipients, &all, &ids_of(&all));
}

/// The old primary wrote a tail in degraded mode that the new primary never
/// had: on rejoining it truncates that tail and re-submits its messages, so
/// nothing STORED (even degraded) is lost and nothing arrives twice.
#[test]
fn old_primary_resubmits_its_degraded_tail() {
    let (mut old, mut new) = pair(&[]);
    let recipients = users("t5r", RECIPIENTS);
    let replicated = send_all(&old.client, "t5alice", &recipients, 40);
    wait_converged(&old, &new);
    new.kill9();
    wait_mode(&old, "degraded");
    let tail = send_all(&old.client, "t5alice", &recipients, 10);
    old.kill9();

    new.restart();
    assert_eq!(new.promote(), 2);
    let after = send_all(&new.client, "t5alice", &recipients, 30);

    let offset = old.log().len();
    old.restart_as_replica_of(&new.repl);
    // Both shards had a tail (the recipients alternate between them).
    let resubmissions = || -> Vec<String> {
        old.log_since(offset)
            .lines()
            .filter(|l| l.contains("re-submitting a dropped tail to the primary"))
            .filter(|l| l.contains("left=0"))
            .map(str::to_string)
            .collect()
    };
    // Over the replication link (RESUBMIT), not as a client: no token needed.
    wait_until(
        "the old primary re-submits each shard's dropped tail",
        || resubmissions().len() >= CORES,
    );
    wait_converged(&old, &new);
    wait_caught_up(&new);
    let all: Vec<Sent> = replicated.into_iter().chain(tail).chain(after).collect();
    check_inboxes(&new.client, &recipients, &all, &ids_of(&all));
}

// ---------------------------------------------------------------------------
// 6: degrade vs block while the replica is away.
// ---------------------------------------------------------------------------

#[test]
fn degrade_keeps_storing_and_recovers() {
    let (primary, mut replica) = pair(&["--on-replica-loss", "degrade"]);
    let (mut alice, _) = connect(&primary.client, "alice");
    tests::send_stored(&mut alice, "bob", b"with the replica");
    replica.kill9();
    // A SEND during the loss timeout waits; then it is STORED on local fsync.
    tests::send_stored(&mut alice, "bob", b"replica just died");
    wait_mode(&primary, "degraded");
    tests::send_stored(&mut alice, "bob", b"degraded");
    replica.restart();
    wait_mode(&primary, "replica");
    tests::send_stored(&mut alice, "bob", b"replica is back");
    wait_converged(&primary, &replica);
}

#[test]
fn block_refuses_while_the_replica_is_away() {
    let (primary, mut replica) = pair(&["--on-replica-loss", "block"]);
    // One recipient per shard: the policy holds on every shard.
    let recipients = users("b6r", CORES);
    let (mut alice, _) = connect(&primary.client, "alice");
    for to in &recipients {
        tests::send_stored(&mut alice, to, b"with the replica");
    }
    replica.kill9();
    wait_mode(&primary, "blocked");
    for to in &recipients {
        assert_eq!(
            send_rejected(&mut alice, to, b"blocked"),
            reject_code::UNAVAILABLE,
            "SEND to {to} (shard {}) while stats say blocked",
            shard_of(to)
        );
    }
    replica.restart();
    wait_mode(&primary, "replica");
    for to in &recipients {
        tests::send_stored(&mut alice, to, b"replica is back");
    }
    wait_converged(&primary, &replica);
    for to in &recipients {
        let (_c, delivered) = take_inbox(&primary.client, to);
        assert_eq!(delivered.len(), 2, "{to}: refused SENDs were not stored");
    }
}

// ---------------------------------------------------------------------------
// 7: a bad stream from a (fake) primary is refused, not applied.
// ---------------------------------------------------------------------------

/// CRC-32 (IEEE), as wal/FORMAT.md specifies, bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (!(crc & 1)).wrapping_add(1));
        }
    }
    !crc
}

/// A WAL record frame laid out by hand from wal/FORMAT.md.
fn wal_record(position: u64, epoch: u64, record_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // CRC, below
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.push(record_type);
    out.extend_from_slice(payload);
    let crc = crc32(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// A MSG record payload (engine's record layout): alice -> bob, seq 1.
fn msg_payload(msg_id: MsgId) -> Vec<u8> {
    let mut out = Vec::new();
    engine::record::encode_msg(
        &engine::record::MsgRecord {
            recipient: "bob",
            seq: 1,
            sender: "alice",
            msg_id,
            sent_ms: 1,
            body: b"from the fake primary",
        },
        &mut out,
    );
    out
}

fn repl_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// HELLO fields the test checks: (shards, shard, epoch, last_position).
fn read_hello(stream: &mut TcpStream) -> (u32, u32, u64, u64) {
    stream
        .set_read_timeout(Some(WAIT_TIMEOUT))
        .expect("read timeout");
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("HELLO length");
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut frame).expect("HELLO");
    assert_eq!(frame[0], 0x01, "first replication frame is HELLO");
    assert_eq!(&frame[1..5], b"IRPL", "HELLO magic");
    let u32_at = |o: usize| u32::from_le_bytes(frame[o..o + 4].try_into().expect("4"));
    let u64_at = |o: usize| u64::from_le_bytes(frame[o..o + 8].try_into().expect("8"));
    (u32_at(6), u32_at(14), u64_at(18), u64_at(26))
}

fn welcome(epoch: u64) -> Vec<u8> {
    let mut p = epoch.to_le_bytes().to_vec();
    p.push(0); // partial
    p.extend_from_slice(&1u64.to_le_bytes());
    let addr = b"127.0.0.1:9";
    p.push(addr.len() as u8);
    p.extend_from_slice(addr);
    repl_frame(0x02, &p)
}

const RECORDS: u8 = 0x20;

#[test]
fn bad_stream_is_refused_and_the_replica_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake primary");
    let fake = listener.local_addr().expect("addr").to_string();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            if tx.send(stream).is_err() {
                break;
            }
        }
    });
    let replica = Node::start("replica", &["--cores", "1", "--replica-of", &fake]);
    let accept = || -> TcpStream {
        rx.recv_timeout(WAIT_TIMEOUT)
            .expect("the replica (re)connects to the fake primary")
            .expect("accept")
    };
    let msg_id = new_msg_id();
    let valid = wal_record(1, 1, engine::record::MSG, &msg_payload(msg_id));
    let mut bad_crc = valid.clone();
    bad_crc[30] ^= 0x40; // a payload byte
    let gap = wal_record(2, 1, engine::record::MSG, &msg_payload(msg_id));
    let truncated = valid[..valid.len() - 16].to_vec();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "bad CRC",
            repl_frame(RECORDS, &bad_crc),
            "bad record in the stream at position 1",
        ),
        (
            "position gap",
            repl_frame(RECORDS, &gap),
            "record at position 2 where 1 was due",
        ),
        (
            "truncated record",
            repl_frame(RECORDS, &truncated),
            "bad record in the stream at position 1",
        ),
        ("garbage frame", repl_frame(0x7E, b"garbage"), "0x7e"),
    ];
    let mut conns = Vec::new();
    for (case, frame, logged) in cases {
        let mut conn = accept();
        let (shards, shard, epoch, last) = read_hello(&mut conn);
        assert_eq!((shards, shard, last), (1, 0, 0), "{case}: HELLO");
        let offset = replica.log().len();
        conn.write_all(&welcome(epoch)).expect("WELCOME");
        conn.write_all(&frame).expect("bad frame");
        wait_until(&format!("{case}: the replica logs the refusal"), || {
            replica
                .log_since(offset)
                .lines()
                .any(|l| l.contains("replication from the primary stopped") && l.contains(logged))
        });
        assert_eq!(
            replica.positions(),
            vec![0],
            "{case}: nothing may be applied\n{}",
            replica.log_since(offset)
        );
        conns.push(conn);
    }
    // The control: a valid record on the next connection is applied, and the
    // replica, once promoted, delivers it.
    let mut conn = accept();
    let (_, _, epoch, last) = read_hello(&mut conn);
    assert_eq!(last, 0, "nothing was applied before the valid record");
    conn.write_all(&welcome(epoch)).expect("WELCOME");
    conn.write_all(&repl_frame(RECORDS, &valid))
        .expect("records");
    wait_until("the valid record is applied", || {
        replica.positions() == vec![1]
    });
    drop(conns);
    drop(conn);
    replica.promote();
    let (_bob, delivered) = drain_inbox(&replica.client, "bob");
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].msg_id, msg_id);
    assert_eq!(delivered[0].from, "alice");
}

// ---------------------------------------------------------------------------
// A recipient who logs in while a replica (re)joins still gets its messages.
// ---------------------------------------------------------------------------

fn hello_frame(shards: u32, shard: u32, epoch: u64, last: u64, last_epoch: u64) -> Vec<u8> {
    let mut p = b"IRPL".to_vec();
    p.push(1);
    for v in [shards, u32::from(net::SLOT_COUNT), shard] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    for v in [epoch, last, last_epoch] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    repl_frame(0x01, &p)
}

fn ack_frame(epoch: u64, durable_position: u64) -> Vec<u8> {
    let mut p = Vec::new();
    for v in [epoch, durable_position, 1] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    repl_frame(0x30, &p)
}

/// A primary that stored messages in degraded mode gets a replica (a fake
/// one here, so the test controls when it acks). bob logs in after the mode
/// is back to `replica` but before the replica acked his messages; once it
/// has acked everything, bob must get them: they were STORED long ago.
#[test]
fn login_while_the_replica_catches_up_gets_its_messages() {
    let primary = Node::primary("primary", &["--cores", "1"]);
    wait_mode(&primary, "degraded");
    let (mut alice, _) = connect(&primary.client, "alice");
    let ids: Vec<MsgId> = (0..3)
        .map(|i| tests::send_stored(&mut alice, "bob", format!("degraded {i}").as_bytes()))
        .collect();
    // The stats are published on a tick: wait until they show the 3 records.
    wait_until("the stats show the stored messages", || {
        let stats = primary.stats();
        let shard = &stats["shards"][0];
        shard["last_position"].as_u64() >= Some(3)
            && shard["durable_position"] == shard["last_position"]
    });
    let last = primary.positions()[0];

    let mut link = TcpStream::connect(&primary.repl).expect("connect as a replica");
    link.write_all(&hello_frame(1, 0, 1, last, 1))
        .expect("HELLO");
    let mut reader = link.try_clone().expect("clone");
    // Drains the primary's WELCOME, records and heartbeats.
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let acked = std::sync::Arc::new(AtomicU64::new(0));
    let acked2 = acked.clone();
    let mut writer = link.try_clone().expect("clone");
    // Acks (the position in `acked`) every 100 ms: a live replica.
    thread::spawn(move || loop {
        if writer
            .write_all(&ack_frame(1, acked2.load(Ordering::SeqCst)))
            .is_err()
        {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    });
    wait_mode(&primary, "replica");

    let (mut bob, welcome) = connect(&primary.client, "bob");
    assert_eq!(welcome.pending, 3);
    acked.store(last, Ordering::SeqCst);
    wait_until("the replica's ack reaches the primary", || {
        primary.stats()["shards"][0]["replicas"][0]["acked_position"] == last
    });
    let delivered = collect_deliveries(&mut bob, 3);
    let got: Vec<MsgId> = delivered.iter().map(|d| d.msg_id).collect();
    assert_eq!(got, ids);
    drop(link);
}

/// Both sides must agree on the slot map and the shard count: a replica
/// started with another `--cores` is refused at the handshake, both sides say
/// why in their logs, and nothing is applied.
#[test]
fn shard_count_mismatch_is_refused_on_both_sides() {
    let primary = Node::primary("mismatch-primary", &["--cores", "2"]);
    let replica = Node::replica("mismatch-replica", &primary, &["--cores", "1"]);
    wait_until("both sides log the refusal", || {
        primary.log().contains("slot map differs")
            && replica
                .log()
                .contains("the primary refused: slot map differs")
    });
    assert_eq!(shard_field(&replica.stats(), "last_position"), vec![0]);
    assert_ne!(
        primary.stats()["mode"],
        "replica",
        "a refused replica never counts"
    );
}

/// Every field of a replication HELLO is checked against this node: a shard
/// index it does not have, or a last record epoch above the peer's own epoch,
/// is refused (REFUSE naming why, then close) before anything is streamed, and
/// the primary keeps its role and epoch.
#[test]
fn hello_for_a_shard_that_does_not_exist_is_refused() {
    let primary = Node::primary("bad-shard", &["--cores", "2"]);
    let cases = [
        (
            "shard 999",
            hello_frame(2, 999, 1, 0, 0),
            "no shard 999 here",
        ),
        ("shard 2", hello_frame(2, 2, 1, 0, 0), "no shard 2 here"),
        (
            "record epoch above epoch",
            hello_frame(2, 0, 1, 0, 7),
            "last record epoch 7 is above",
        ),
    ];
    for (case, hello, reason) in cases {
        let mut link = TcpStream::connect(&primary.repl).expect("connect as a replica");
        link.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        link.write_all(&hello).expect("HELLO");
        let mut answer = Vec::new();
        // The primary answers REFUSE and closes: read to the end.
        let _ = link.read_to_end(&mut answer);
        assert!(answer.len() > 5, "{case}: no answer at all");
        assert_eq!(answer[4], 0x03, "{case}: expected REFUSE, got {answer:?}");
        let text = String::from_utf8_lossy(&answer[5..]);
        assert!(text.contains(reason), "{case}: REFUSE says {text:?}");
    }
    let stats = primary.stats();
    assert_eq!(stats["role"], "primary", "a refused HELLO must not fence");
    assert_eq!(stats["epoch"], 1);
}

/// A primary killed with -9 whose last acknowledged record is then damaged
/// (its recovery must cut it: it lies past the durable mark) takes that
/// record back from its replica before it serves anyone: bob gets all of
/// his messages from the restarted primary.
#[test]
fn restarted_primary_takes_back_what_its_log_lost_from_the_replica() {
    let repl_addr = tests::free_loopback_addr();
    let mut primary = Node::primary(
        "repair-primary",
        &["--cores", "1", "--replication-listen", &repl_addr],
    );
    let replica = Node::replica("repair-replica", &primary, &["--cores", "1"]);
    wait_mode(&primary, "replica");
    let (mut alice, _) = connect(&primary.client, "alice");
    let ids: Vec<MsgId> = (0..40)
        .map(|i| tests::send_stored(&mut alice, "bob", format!("m{i}").as_bytes()))
        .collect();
    drop(alice);
    primary.kill9();
    let lost = tests::damage_last_wal_record(&primary.data_dir, 0);
    let offset = primary.log().len();
    primary.restart();
    let log = primary.log_since(offset);
    assert!(
        log.contains("WAL recovery dropped records past the durable mark"),
        "{log}"
    );
    assert!(
        log.contains("took back from the replica the records this log lacked"),
        "{log}"
    );
    let shard = &primary.stats()["shards"][0];
    assert!(
        shard["recovery_refetched_records"].as_u64() >= Some(1),
        "{shard}"
    );
    let (mut bob, welcome) = connect(&primary.client, "bob");
    assert_eq!(welcome.pending, ids.len() as u64, "record {lost} came back");
    let got: Vec<MsgId> = collect_deliveries(&mut bob, ids.len())
        .iter()
        .map(|d| d.msg_id)
        .collect();
    assert_eq!(got, ids);
    drop(replica);
}

// ---------------------------------------------------------------------------
// Node links: mutual TLS, and bounds on what a peer can make the primary hold.
// ---------------------------------------------------------------------------

/// `iris certs` into a fresh directory: ca, server and node certificates.
fn make_certs(tag: &'static str, nodes: &str) -> PathBuf {
    let dir = unique_path(tag);
    let out = std::process::Command::new(tests::iris_bin())
        .args(["certs", "--out", dir.to_str().unwrap(), "--nodes", nodes])
        .output()
        .expect("iris certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn cluster_args(certs: &Path, node: &str) -> Vec<String> {
    let f = |name: String| certs.join(name).to_str().unwrap().to_string();
    vec![
        "--cluster-ca".into(),
        f("ca.pem".into()),
        "--node-cert".into(),
        f(format!("{node}.pem")),
        "--node-key".into(),
        f(format!("{node}.key")),
    ]
}

/// A TLS client with a certificate of `certs`' CA (node `node`), trusting `ca`.
fn tls_peer(
    addr: &str,
    ca: &Path,
    certs: &Path,
    node: &str,
) -> Result<net::rustls::StreamOwned<net::rustls::ClientConnection, TcpStream>, String> {
    use net::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(certs.join(format!("{node}.pem")))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join(format!("{node}.key"))).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// With mutual TLS, a pair replicates as before; a peer without a cluster
/// certificate (plain TCP, or TLS with another CA's certificate) cannot get
/// one replication frame read: its HELLO claiming epoch 1,000,000 does not
/// fence the primary. A peer with a cluster certificate is heard (and, with
/// that epoch, fences it: the certificate is the trust).
#[test]
fn mutual_tls_links_replicate_and_keep_outsiders_from_fencing() {
    let certs = make_certs("mtls-certs", "a,b,c");
    let outsider = make_certs("mtls-outsider", "a");
    let a = cluster_args(&certs, "a");
    let b = cluster_args(&certs, "b");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let b: Vec<&str> = b.iter().map(String::as_str).collect();
    let primary = Node::primary("mtls-primary", &a);
    let replica = Node::replica("mtls-replica", &primary, &b);
    wait_mode(&primary, "replica");
    let sent = send_all(&primary.client, "alice", &users("mtls-bob", 8), 50);
    wait_converged(&primary, &replica);
    assert_eq!(sent.len(), 50);

    // Plain TCP, a HELLO with a huge epoch: not a TLS ClientHello, closed.
    let mut plain = TcpStream::connect(&primary.repl).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(&hello_frame(2, 0, 1_000_000, 0, 0))
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "only a TLS alert may come back, got {answer:?}"
    );
    // TLS with a certificate from another CA: the handshake is refused.
    let ca = certs.join("ca.pem");
    let refused = tls_peer(&primary.repl, &ca, &outsider, "a").and_then(|mut s| {
        s.write_all(&hello_frame(2, 0, 1_000_000, 0, 0))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err("closed".to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    assert!(refused.is_err(), "a foreign certificate was served");
    let stats = primary.stats();
    assert_eq!(stats["role"], "primary", "an outsider fenced the primary");
    assert_eq!(stats["epoch"], 1);
    let (mut alice, _) = connect(&primary.client, "alice");
    tests::send_stored(&mut alice, "mtls-bob0", b"still serving");
    assert!(primary.log().contains("node link (TLS) refused or ended"));

    // A node of the cluster is trusted: its HELLO is read and answered.
    let mut member = tls_peer(&primary.repl, &ca, &certs, "c").expect("cluster member handshake");
    member.write_all(&hello_frame(2, 9, 1, 0, 0)).unwrap();
    let mut answer = Vec::new();
    let _ = member.read_to_end(&mut answer);
    assert!(
        answer.len() > 5 && answer[4] == 0x03,
        "expected REFUSE (no shard 9), got {answer:?}"
    );
    drop(replica);
    let _ = fs::remove_dir_all(&certs);
    let _ = fs::remove_dir_all(&outsider);
}

#[test]
fn a_non_loopback_replication_listener_needs_mutual_tls() {
    let (status, stderr) = tests::serve_must_fail(&["--replication-listen", "0.0.0.0:0"]);
    assert!(!status.success());
    assert!(
        stderr.contains("--cluster-ca") && stderr.contains("--insecure-cluster"),
        "{stderr}"
    );
    let (status, stderr) = tests::serve_must_fail(&["--cluster-ca", "/nonexistent/ca.pem"]);
    assert!(!status.success());
    assert!(stderr.contains("--node-cert"), "{stderr}");
}

/// Peers that open replication connections and declare big frames (or say
/// nothing) are not buffered past the HELLO bound, are cut at the connection
/// bound, and are closed by the handshake deadline.
#[test]
fn the_replication_listener_bounds_connections_and_handshake_bytes() {
    let primary = Node::primary("repl-bounds", &["--cores", "1"]);
    let anon_before = tests::status_kib(primary.child.id(), "RssAnon").unwrap();
    // 100 peers, each declaring a 4 MiB frame and sending 256 KiB of it.
    let mut big = Vec::new();
    for _ in 0..100 {
        let Ok(mut s) = TcpStream::connect(&primary.repl) else {
            continue;
        };
        let mut frame = (4u32 << 20).to_le_bytes().to_vec();
        frame.push(0x01);
        frame.extend(vec![0u8; 256 << 10]);
        s.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = s.write_all(&frame);
        big.push(s);
    }
    thread::sleep(Duration::from_millis(500));
    let anon_after = tests::status_kib(primary.child.id(), "RssAnon").unwrap();
    assert!(
        anon_after < anon_before + 16 * 1024,
        "RssAnon grew from {anon_before} to {anon_after} KiB"
    );
    drop(big);
    // 80 silent peers: past the bound (64) they are closed at once, the rest
    // by the handshake deadline (5 s).
    let started = Instant::now();
    let mut silent: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&primary.repl).expect("connect"))
        .collect();
    let mut closed_early = 0;
    for s in silent.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut b = [0u8; 1];
        if matches!(s.read(&mut b), Ok(0)) {
            closed_early += 1;
        }
    }
    assert!(
        closed_early >= 10,
        "only {closed_early} of 80 cut at the bound"
    );
    for s in silent.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            !matches!(s.read(&mut b), Ok(n) if n > 0),
            "a silent peer got bytes"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "silent peers held past the deadline"
    );
    let (mut alice, _) = connect(&primary.client, "alice");
    tests::send_stored(&mut alice, "bob", b"still serving");
}
