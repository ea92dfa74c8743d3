//! `iris dev-cluster`: a whole edge/core cluster on one machine, as real
//! processes on loopback (README: one command). It writes the cluster file,
//! starts every core node (the pairs' first nodes, then their replicas) and
//! every edge, prints one JSON line once all are ready, and stays until
//! SIGTERM or SIGINT, when it stops them all. A node someone else kills
//! stays dead (a test restarts it from its `cmd`).

use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Pairs and edges one dev cluster starts at most.
pub const PAIRS_MAX: usize = 16;
pub const EDGES_MAX: usize = 16;
/// How long a node may take to print its listening line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the stop waits for the nodes before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug)]
pub struct DevClusterArgs {
    /// Core pairs (a primary and a replica each).
    #[arg(long, default_value_t = 2)]
    pub pairs: usize,
    /// Edges (client listeners in front of every pair).
    #[arg(long, default_value_t = 2)]
    pub edges: usize,
    /// Directory for the cluster file, the nodes' data and their logs.
    #[arg(long, default_value = "./iris-cluster")]
    pub dir: PathBuf,
    /// Executors per process.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Mutual TLS on every node link and replication stream: a development CA
    /// and one certificate per node and edge are made in DIR/certs (`iris certs`).
    #[arg(long)]
    pub mtls: bool,
    /// Automatic failover through this etcd (comma-separated http://HOST:PORT):
    /// written to the cluster file with a key prefix of this cluster's own;
    /// each pair's primary is elected there, and a dead one is replaced.
    #[arg(long)]
    pub etcd: Option<String>,
    /// An MQTT 3.1.1 listener on every edge too (docs/MQTT.md), on a port of
    /// its own: the JSON line gives each edge's `mqtt` address.
    #[arg(long)]
    pub mqtt: bool,
    /// More `iris serve` flags for every node and edge (after `--`).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

struct Started {
    name: String,
    child: Child,
    cmd: Vec<String>,
}

pub fn run(args: &DevClusterArgs) -> ExitCode {
    match dev_cluster(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iris dev-cluster: {e}");
            ExitCode::from(1)
        }
    }
}

/// Where dev clusters take their ports: below the kernel's ephemeral range
/// (32768 and up by default), so a port freed by a killed node is not taken
/// by some connection's source port before the node restarts on it.
const PORTS_FROM: u16 = 12000;
const PORTS_TO: u16 = 32000;
/// Serializes port picking between dev clusters starting at once on one
/// machine: the lock is held until every node of this cluster has bound its
/// ports, so the next cluster's bind check sees them taken.
const PORT_LOCK: &str = "/tmp/iris-dev-cluster.lock";

/// `n` distinct free loopback ports in [PORTS_FROM, PORTS_TO), from a
/// random start: all held at once while picked, then released for the
/// nodes to bind (the caller holds PORT_LOCK until they have).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let span = u32::from(PORTS_TO - PORTS_FROM);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut held = Vec::new();
    for i in 0..span {
        if held.len() == n {
            break;
        }
        let port = PORTS_FROM + ((seed.wrapping_add(i * 7919)) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        return Err(format!(
            "fewer than {n} free ports in {PORTS_FROM}..{PORTS_TO}"
        ));
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read a port: {e}"))
}

fn dev_cluster(args: &DevClusterArgs) -> Result<(), String> {
    if args.pairs == 0 || args.pairs > PAIRS_MAX || args.edges > EDGES_MAX {
        return Err(format!("1 to {PAIRS_MAX} pairs and 0 to {EDGES_MAX} edges"));
    }
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.dir.display()))?;
    crate::sys::install_signal_handlers().map_err(|e| format!("signal handlers: {e}"))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PORT_LOCK)
        .map_err(|e| format!("cannot open {PORT_LOCK}: {e}"))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {PORT_LOCK}: {e}"))?;
    let per_edge = if args.mqtt { 3 } else { 2 };
    let ports = free_ports(args.pairs * 8 + args.edges * per_edge)?;
    let mut next = ports.into_iter();
    let mut text = crate::cluster::render_local(args.pairs, &mut || next.next().expect("counted"));
    // One operator token for every node, beside the cluster file: `iris
    // admin … --cluster DIR/cluster.toml` finds it there.
    let token_path = dir.join(crate::admin_auth::TOKEN_FILE_NAME);
    crate::admin_auth::Token::read_or_create(&token_path).map_err(|e| e.to_string())?;
    text = format!(
        "admin_token_file = {:?}\n{text}",
        crate::admin_auth::TOKEN_FILE_NAME
    );
    if let Some(etcd) = &args.etcd {
        // A prefix of this cluster's own: clusters sharing one etcd never meet.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let prefix = format!("iris-dev/{}-{nanos}", std::process::id());
        text = format!("etcd = {etcd:?}\netcd_prefix = {prefix:?}\n{text}");
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let spec = crate::cluster::ClusterSpec::parse(&text)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the iris binary: {e}"))?;
    let mut started: Vec<Started> = Vec::new();
    let result = start_all(args, &dir, &path, &spec, &exe, &mut next, &mut started);
    // Every node bound its ports (or failed): the next cluster may pick.
    drop(lock);
    match result {
        Ok(line) => {
            println!("{line}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            watch(&mut started);
        }
        Err(e) => {
            stop(&mut started);
            return Err(e);
        }
    }
    stop(&mut started);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_all(
    args: &DevClusterArgs,
    dir: &Path,
    path: &Path,
    spec: &crate::cluster::ClusterSpec,
    exe: &Path,
    ports: &mut impl Iterator<Item = u16>,
    started: &mut Vec<Started>,
) -> Result<String, String> {
    let certs = dir.join("certs");
    if args.mtls {
        let mut names: Vec<String> = spec
            .pairs
            .iter()
            .flat_map(|p| p.nodes.iter().map(|n| n.name.clone()))
            .collect();
        names.extend((0..args.edges).map(|e| format!("e{e}")));
        let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
        crate::dev_cmd::certs(&certs, &hosts, &names)?;
    }
    let common = |cmd: &mut Vec<String>, name: &str| {
        cmd.extend(["--cores".into(), args.cores.to_string()]);
        if args.mtls {
            let file = |f: String| certs.join(f).display().to_string();
            cmd.extend([
                "--cluster-ca".into(),
                file("ca.pem".into()),
                "--node-cert".into(),
                file(format!("{name}.pem")),
                "--node-key".into(),
                file(format!("{name}.key")),
            ]);
        }
        cmd.extend(args.serve_args.iter().cloned());
    };
    // First nodes first: each pair's second node then finds its peer running
    // as primary and follows it.
    let mut pids = std::collections::HashMap::new();
    for index in 0..2 {
        for pair in &spec.pairs {
            let node = &pair.nodes[index];
            let mut cmd = vec![
                exe.display().to_string(),
                "serve".into(),
                "--role".into(),
                "core".into(),
                "--cluster".into(),
                path.display().to_string(),
                "--node".into(),
                node.name.clone(),
                "--data".into(),
                dir.join(&node.name).display().to_string(),
            ];
            common(&mut cmd, &node.name);
            let child = start(dir, &node.name, &cmd)?;
            pids.insert(node.name.clone(), child.id());
            started.push(Started {
                name: node.name.clone(),
                child,
                cmd,
            });
        }
    }
    let mut edges = Vec::new();
    for e in 0..args.edges {
        let name = format!("e{e}");
        let client = format!("127.0.0.1:{}", ports.next().expect("counted"));
        let admin = format!("127.0.0.1:{}", ports.next().expect("counted"));
        let mut cmd = vec![
            exe.display().to_string(),
            "serve".into(),
            "--role".into(),
            "edge".into(),
            "--cluster".into(),
            path.display().to_string(),
            "--name".into(),
            name.clone(),
            "--listen".into(),
            client.clone(),
            "--admin".into(),
            admin,
        ];
        let mut edge = json!({"name": name, "client": client});
        if args.mqtt {
            let mqtt = format!("127.0.0.1:{}", ports.next().expect("counted"));
            cmd.extend(["--mqtt-listen".into(), mqtt.clone()]);
            edge["mqtt"] = mqtt.into();
        }
        common(&mut cmd, &name);
        let child = start(dir, &name, &cmd)?;
        edge["pid"] = child.id().into();
        edges.push(edge);
        started.push(Started { name, child, cmd });
    }
    let elected = spec.etcd.is_some();
    let roles = if elected {
        wait_for_primaries(spec)?
    } else {
        std::collections::HashMap::new()
    };
    let pairs: Vec<_> = spec
        .pairs
        .iter()
        .map(|p| {
            let nodes: Vec<_> = p
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let cmd = &started
                        .iter()
                        .find(|s| s.name == n.name)
                        .expect("started")
                        .cmd;
                    json!({
                        "name": n.name,
                        "pid": pids[&n.name],
                        "role": match roles.get(&n.name) {
                            Some(role) => role.as_str(),
                            None if i == 0 => "primary",
                            None => "replica",
                        },
                        "client": n.client.to_string(),
                        "admin": n.admin.to_string(),
                        "cmd": cmd,
                    })
                })
                .collect();
            json!({"name": p.name, "slots": p.slots, "nodes": nodes})
        })
        .collect();
    Ok(json!({"cluster": path.display().to_string(), "edges": edges, "pairs": pairs}).to_string())
}

/// With etcd: waits until every pair has elected a primary (its node says
/// so on /health); each node's role.
fn wait_for_primaries(
    spec: &crate::cluster::ClusterSpec,
) -> Result<std::collections::HashMap<String, String>, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let mut roles = std::collections::HashMap::new();
        let mut all = true;
        for pair in &spec.pairs {
            let mut primaries = 0;
            for n in &pair.nodes {
                let role = match crate::admin_http::http("GET", &n.admin.to_string(), "/health") {
                    Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["role"].as_str().map(str::to_string)),
                    _ => None,
                };
                let role = role.unwrap_or_else(|| "unreachable".into());
                primaries += usize::from(role == "primary");
                roles.insert(n.name.clone(), role);
            }
            all &= primaries == 1;
        }
        if all {
            return Ok(roles);
        }
        if Instant::now() > deadline || crate::sys::SHUTDOWN.load(Ordering::SeqCst) {
            return Err(format!(
                "the pairs did not elect a primary within {READY_TIMEOUT:?} (roles {roles:?}); is etcd up?"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts one process (stderr to DIR/NAME.log) and waits for its ready line.
fn start(dir: &Path, name: &str, cmd: &[String]) -> Result<Child, String> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))
        .map_err(|e| format!("cannot create the log of {name}: {e}"))?;
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !ready && line.starts_with("iris listening on") {
                ready = true;
                let _ = tx.send(());
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{name} exited during startup ({status}); see {}",
                dir.join(format!("{name}.log")).display()
            ));
        }
        if Instant::now() > deadline || crate::sys::SHUTDOWN.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} was not ready within {READY_TIMEOUT:?}"));
        }
    }
}

/// Until SIGTERM/SIGINT: reports processes that exit (never restarts them).
fn watch(started: &mut [Started]) {
    let mut gone = vec![false; started.len()];
    while !crate::sys::SHUTDOWN.load(Ordering::SeqCst) {
        for (i, s) in started.iter_mut().enumerate() {
            if !gone[i] {
                if let Ok(Some(status)) = s.child.try_wait() {
                    eprintln!(
                        "iris dev-cluster: {} exited ({status}); not restarted",
                        s.name
                    );
                    gone[i] = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every process still running, SIGKILL after STOP_TIMEOUT.
fn stop(started: &mut [Started]) {
    for s in started.iter_mut() {
        if let Ok(None) = s.child.try_wait() {
            crate::sys::terminate(s.child.id());
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for s in started.iter_mut() {
        loop {
            match s.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
