//! `iris admin rolling-restart`: restarts every core node of a cluster in
//! turn while clients keep sending (docs/CLUSTER.md, "Rolling restart").
//!
//! For each pair, twice (so each of its nodes restarts once): wait until the
//! primary's replica caught up, stop the primary with the operator's stop
//! command, wait until its admin address stops answering, promote the
//! replica, start the old primary with the start command, and wait until it
//! answers as the new primary's replica and has caught up. Edges follow
//! each promotion; clients see a pause, not an error.
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
    /// Longest wait for any one step (catch-up, stop, promotion, restart).
    #[arg(long, default_value_t = 120)]
    pub step_timeout_secs: u64,
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
    let token = crate::admin_cmd::token(token_file, spec.admin_token_file.as_deref())?;
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
            restart_primary(primary, replica, args, timeout)?;
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
) -> Result<(), String> {
    let say = |what: &str| println!("{}: {}: {what}", primary.pair, primary.name);
    say("waiting for the replica to catch up");
    wait_caught_up(&primary.admin, &primary.name, timeout)?;
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
    say("stopping");
    let stop = fill(&args.stop, primary, pid);
    run_bounded(&stop, timeout)?;
    wait_for(timeout, &format!("{} to stop", primary.name), || {
        state(&primary.admin) == NodeState::Down
    })?;
    say(&format!("promoting {}", replica.name));
    let start = fill(&args.start, primary, pid);
    if let Err(e) = promote(replica, timeout) {
        // Leave the pair with a primary: the stopped node starts again (its
        // peer is not primary, so it serves as before).
        let _ = spawn_start(&start);
        return Err(format!(
            "{e}; started {} again with the --start command",
            primary.name
        ));
    }
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
/// from the stopped primary is still closing).
fn promote(replica: &Node, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match replica.admin.call("POST", "/replication/promote") {
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
