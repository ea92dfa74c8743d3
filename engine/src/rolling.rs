//! `iris admin rolling-restart`: restarts every core node of a cluster in
//! turn while clients keep sending (docs/CLUSTER.md, "Rolling restart").
//!
//! For each pair, twice (so each of its nodes restarts once): hand the
//! primary role over to the replica (engine::handover: the primary takes no
//! SENDs until its replica holds every record, then steps down; the
//! replica is promoted, or with etcd elected), stop the old primary with the
//! operator's stop command, wait until its admin address stops answering,
//! start it with the start command, and wait until it answers as the new
//! primary's replica and has caught up. Edges hold the SENDs of the pause
//! and write them to the new primary; clients see a pause, not an error.
//! A primary that is degraded or behind is never stopped: if its replica
//! does not hold every record within the step timeout, the handover is
//! abandoned, the primary serves on, and the command fails saying why.
//!
//! `iris admin handover --cluster FILE --node N` is the first step alone.
//!
//! How a node is stopped and started is the operator's (systemd, a
//! container runtime, a shell): `--stop` and `--start` are shell commands
//! with `{node}`, `{pair}`, `{admin}` and `{pid}` replaced. The start command
//! may keep running (a node in the foreground): it is not waited for.

use crate::admin_http::AdminClient;
use crate::cluster::ClusterSpec;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How often node state is polled while waiting.
const POLL: Duration = Duration::from_millis(50);

#[derive(clap::Args, Debug)]
pub struct RollingRestartArgs {
    /// The cluster file (its pairs' nodes and admin addresses).
    #[arg(long)]
    pub cluster: PathBuf,
    /// Shell command that stops a node cleanly (SIGTERM semantics), e.g.
    /// `systemctl stop iris-core@{node}` or `kill -TERM {pid}`. Must exit 0.
    #[arg(long)]
    pub stop: String,
    /// Shell command that starts a stopped node with its usual arguments,
    /// e.g. `systemctl start iris-core@{node}`. It may keep running.
    #[arg(long)]
    pub start: String,
    /// Only the pairs named (repeatable); default: every pair in the file.
    #[arg(long = "pair")]
    pub pairs: Vec<String>,
    /// Longest wait for any one step (handover, stop, promotion, restart);
    /// a handover waits at most 120 s.
    #[arg(long, default_value_t = 120)]
    pub step_timeout_secs: u64,
}

/// `iris admin handover --cluster FILE --node N`.
#[derive(clap::Args, Debug)]
pub struct HandoverArgs {
    /// The cluster file (the pair's nodes and admin addresses).
    #[arg(long)]
    pub cluster: PathBuf,
    /// The pair's primary, which hands its role to the other node.
    #[arg(long)]
    pub node: String,
    /// Longest wait for the replica to hold every record (then the primary
    /// serves on and the command fails), and for the promotion.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

pub fn run_handover(args: &HandoverArgs, token_file: Option<&Path>) -> ExitCode {
    match handover_cmd(args, token_file) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iris admin handover: {e}");
            ExitCode::FAILURE
        }
    }
}

fn handover_cmd(args: &HandoverArgs, token_file: Option<&Path>) -> Result<String, String> {
    let spec = ClusterSpec::load(&args.cluster)?;
    let token = crate::admin_http::operator_token(token_file, spec.admin_token_file.as_deref())?;
    let (p, n) = spec
        .node(&args.node)
        .ok_or_else(|| format!("no node {:?} in {}", args.node, args.cluster.display()))?;
    let pair = &spec.pairs[p];
    if pair.nodes.len() != 2 {
        return Err(format!("pair {} has no replica to hand over to", pair.name));
    }
    let node = |i: usize| Node {
        name: pair.nodes[i].name.clone(),
        pair: pair.name.clone(),
        admin: AdminClient::new(pair.nodes[i].admin.to_string(), token.clone()),
    };
    let (from, to) = (node(n), node(1 - n));
    let timeout = Duration::from_secs(args.timeout_secs);
    let handed = hand_over(&from, &to, timeout, spec.etcd.is_some())?;
    Ok(serde_json::json!({
        "pair": pair.name,
        "from": from.name,
        "to": to.name,
        "epoch": handed.epoch,
        "handover_ms": handed.handover_ms,
        "pause_ms": handed.pause_ms,
    })
    .to_string())
}

/// What a handover took.
pub struct Handed {
    /// The new primary's epoch.
    pub epoch: u64,
    /// From the request to the old primary's step-down.
    pub handover_ms: u64,
    /// From the request to the new primary serving: the longest a SEND waited.
    pub pause_ms: u64,
}

/// Hands `from`'s primary role to `to`: `POST /replication/handover` on
/// `from` (which fails, leaving `from` serving, unless its replica holds
/// every record within `timeout`), then `to` is promoted, or with etcd
/// elected once `from` handed back its lease.
fn hand_over(from: &Node, to: &Node, timeout: Duration, elected: bool) -> Result<Handed, String> {
    let started = Instant::now();
    let timeout_ms = (timeout.as_millis() as u64).clamp(1, crate::handover::TIMEOUT_MAX_MS);
    let read_timeout_ms = timeout_ms + crate::handover::STEP_DOWN_WAIT_MS + 10_000;
    let (status, body) = from
        .admin
        .call_bytes(
            "POST",
            &format!("/replication/handover?timeout_ms={timeout_ms}"),
            &[],
            crate::admin_http::RESPONSE_BYTES_MAX,
            read_timeout_ms,
        )
        .map_err(|e| format!("handover on {}: {e}", from.name))?;
    let body = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(format!(
            "{} did not hand over (HTTP {status}: {}); it serves as primary as before",
            from.name,
            body.trim()
        ));
    }
    let handover_ms = started.elapsed().as_millis() as u64;
    if !elected {
        promote(to, timeout)?;
    }
    wait_for(timeout, &format!("{} to serve as primary", to.name), || {
        matches!(state(&to.admin), NodeState::Up { primary: true, .. })
    })?;
    let epoch = match to.admin.call("GET", "/health") {
        Ok((200, b)) => serde_json::from_str::<Value>(&b)
            .ok()
            .and_then(|v| v["epoch"].as_u64())
            .unwrap_or(0),
        _ => 0,
    };
    Ok(Handed {
        epoch,
        handover_ms,
        pause_ms: started.elapsed().as_millis() as u64,
    })
}

/// What one node's admin says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NodeState {
    /// Nothing accepts connections on its admin address.
    Down,
    Up {
        primary: bool,
        pid: u64,
    },
    /// Something answered, but not a usable /health (busy: 503, a timeout).
    Unknown,
}

struct Node {
    name: String,
    pair: String,
    admin: AdminClient,
}

pub fn run(args: &RollingRestartArgs, token_file: Option<&Path>) -> ExitCode {
    match restart_all(args, token_file) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("iris admin rolling-restart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn restart_all(args: &RollingRestartArgs, token_file: Option<&Path>) -> Result<String, String> {
    let spec = ClusterSpec::load(&args.cluster)?;
    let token = crate::admin_http::operator_token(token_file, spec.admin_token_file.as_deref())?;
    for wanted in &args.pairs {
        if !spec.pairs.iter().any(|p| &p.name == wanted) {
            return Err(format!("no pair {wanted:?} in {}", args.cluster.display()));
        }
    }
    let timeout = Duration::from_secs(args.step_timeout_secs);
    let started = Instant::now();
    let mut restarted = 0;
    for pair in &spec.pairs {
        if !args.pairs.is_empty() && !args.pairs.contains(&pair.name) {
            continue;
        }
        let nodes: Vec<Node> = pair
            .nodes
            .iter()
            .map(|n| Node {
                name: n.name.clone(),
                pair: pair.name.clone(),
                admin: AdminClient::new(n.admin.to_string(), token.clone()),
            })
            .collect();
        if nodes.len() != 2 {
            return Err(format!(
                "pair {} has {} nodes: a rolling restart needs a replica to promote",
                pair.name,
                nodes.len()
            ));
        }
        for _ in 0..2 {
            let (primary, replica) = roles(&nodes, timeout)?;
            restart_primary(primary, replica, args, timeout, spec.etcd.is_some())?;
            restarted += 1;
        }
    }
    Ok(format!(
        "rolling restart done: {restarted} nodes restarted in {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

/// The pair's primary and replica, as their admins say (both must be up).
fn roles(nodes: &[Node], timeout: Duration) -> Result<(&Node, &Node), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let states: Vec<NodeState> = nodes.iter().map(|n| state(&n.admin)).collect();
        let primaries: Vec<usize> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, NodeState::Up { primary: true, .. }))
            .map(|(i, _)| i)
            .collect();
        let all_up = states.iter().all(|s| *s != NodeState::Down);
        if all_up && primaries.len() == 1 {
            let p = primaries[0];
            return Ok((&nodes[p], &nodes[1 - p]));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "pair {}: want both nodes up and one primary, have {:?}",
                nodes[0].pair, states
            ));
        }
        std::thread::sleep(POLL);
    }
}

fn restart_primary(
    primary: &Node,
    replica: &Node,
    args: &RollingRestartArgs,
    timeout: Duration,
    elected: bool,
) -> Result<(), String> {
    let say = |what: &str| println!("{}: {}: {what}", primary.pair, primary.name);
    let pid = match state(&primary.admin) {
        NodeState::Up { pid, .. } => pid,
        NodeState::Down => return Err(format!("{} went down by itself", primary.name)),
        NodeState::Unknown => return Err(format!("{} does not answer /health", primary.name)),
    };
    if args.stop.contains("{pid}") && pid == 0 {
        return Err(format!(
            "{}'s /health reports no pid, so `{{pid}}` cannot be filled in: \
             use a --stop command without it for this node's version",
            primary.name
        ));
    }
    say(&format!("handing over to {}", replica.name));
    let handed = hand_over(primary, replica, timeout, elected)?;
    say(&format!(
        "handed over: {} serves with epoch {} (handover {} ms, pause {} ms)",
        replica.name, handed.epoch, handed.handover_ms, handed.pause_ms
    ));
    say("stopping");
    let stop = fill(&args.stop, primary, pid);
    run_bounded(&stop, timeout)?;
    wait_for(timeout, &format!("{} to stop", primary.name), || {
        state(&primary.admin) == NodeState::Down
    })?;
    let start = fill(&args.start, primary, pid);
    say("starting");
    spawn_start(&start)?;
    wait_for(
        timeout,
        &format!("{} to rejoin as replica", primary.name),
        || matches!(state(&primary.admin), NodeState::Up { primary: false, .. }),
    )?;
    wait_caught_up(&replica.admin, &replica.name, timeout)?;
    say(&format!(
        "rejoined as {}'s replica, caught up",
        replica.name
    ));
    Ok(())
}

/// Runs a shell command to completion within `timeout` (killed after it).
fn run_bounded(cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("command {cmd:?} failed: {status}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("command {cmd:?} did not finish in {timeout:?}"));
            }
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    }
}

/// Starts a node with the start command, not waiting for it (a node started
/// in the foreground keeps running).
fn spawn_start(cmd: &str) -> Result<(), String> {
    Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("running {cmd:?}: {e}"))
}

fn fill(template: &str, node: &Node, pid: u64) -> String {
    template
        .replace("{node}", &node.name)
        .replace("{pair}", &node.pair)
        .replace("{admin}", &node.admin.addr)
        .replace("{pid}", &pid.to_string())
}

fn state(admin: &AdminClient) -> NodeState {
    let body = match admin.call("GET", "/health") {
        Ok((200, body)) => body,
        Ok(_) => return NodeState::Unknown,
        // admin_http: a connection that could not be made.
        Err(e) if e.contains("connecting to") => return NodeState::Down,
        Err(_) => return NodeState::Unknown,
    };
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => NodeState::Up {
            primary: v["role"] == "primary",
            pid: v["pid"].as_u64().unwrap_or(0),
        },
        Err(_) => NodeState::Unknown,
    }
}

/// Every shard of `primary` has a connected replica that acknowledged
/// everything the shard had when this was called (a busy primary's lag is
/// rarely 0 at any one moment). `admin` is the primary's admin address,
/// `name` its name in messages.
pub fn wait_caught_up(admin: &AdminClient, name: &str, timeout: Duration) -> Result<(), String> {
    let stats = || -> Option<Vec<Value>> {
        let (200, body) = admin.call("GET", "/replication/stats").ok()? else {
            return None;
        };
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["role"] == "primary").then(|| v["shards"].as_array().cloned())?
    };
    let mut targets: Option<Vec<u64>> = None;
    wait_for(timeout, &format!("{name}'s replica to catch up"), || {
        let Some(shards) = stats() else {
            return false;
        };
        let want = targets.get_or_insert_with(|| {
            shards
                .iter()
                .map(|s| s["last_position"].as_u64().unwrap_or(u64::MAX))
                .collect()
        });
        shards.len() == want.len()
            && shards.iter().zip(want.iter()).all(|(s, &want)| {
                s["replicas"].as_array().is_some_and(|r| {
                    r.iter().any(|r| {
                        r["connected"] == true
                            && r["acked_position"].as_u64().is_some_and(|a| a >= want)
                    })
                })
            })
    })
}

/// POST /replication/promote, again while the node answers 503 (its stream
/// from the old primary is still closing) or 409 "primary is alive" (it
/// has not yet seen the stream of the primary that stepped down end).
fn promote(replica: &Node, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match replica.admin.call("POST", "/replication/promote") {
            Ok((409, body)) if body.contains("primary is alive") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            // 409: already primary (an earlier attempt finished after its 503).
            Ok((200 | 409, _)) => return Ok(()),
            Ok((503, _)) | Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok((status, body)) => {
                return Err(format!(
                    "promoting {}: HTTP {status}: {}",
                    replica.name,
                    body.trim()
                ))
            }
            Err(e) => return Err(format!("promoting {}: {e}", replica.name)),
        }
    }
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}
