//! A local edge/core cluster for tests: `iris dev-cluster` as a real process
//! (which starts every node and edge as real processes), its JSON line
//! parsed, and the node operations a failover test needs (kill -9, restart
//! from the node's own command line, promotion through the admin API).

use crate::{iris_bin, unique_temp_path};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to print its JSON line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClusterNode {
    pub name: String,
    pub pair: String,
    pub pid: u32,
    pub client: String,
    pub admin: String,
    pub cmd: Vec<String>,
    /// A node this harness restarted (dev-cluster never does): ours to stop.
    pub restarted: Option<Child>,
}

pub struct DevCluster {
    pub dir: PathBuf,
    pub cluster_file: PathBuf,
    child: Child,
    pub edges: Vec<(String, u32, String)>,
    /// Each edge's MQTT address (`dev-cluster --mqtt`).
    pub edge_mqtt: Vec<Option<String>>,
    pub nodes: Vec<ClusterNode>,
    /// Pair name → its slot ranges as written in the cluster file.
    pub slots: HashMap<String, Vec<String>>,
    /// Nodes started by a rolling restart (not our children): ours to stop.
    started_elsewhere: Vec<u32>,
}

impl DevCluster {
    /// `iris dev-cluster --pairs P --edges E --dir TMP -- serve_args...`
    pub fn start(pairs: usize, edges: usize, serve_args: &[&str]) -> DevCluster {
        DevCluster::start_with(pairs, edges, &[], serve_args)
    }

    /// With more dev-cluster flags (e.g. `--mtls`).
    pub fn start_with(
        pairs: usize,
        edges: usize,
        flags: &[&str],
        serve_args: &[&str],
    ) -> DevCluster {
        let dir = unique_temp_path("cluster");
        let mut cmd = Command::new(iris_bin());
        // Every node records its durable position (power-cut tests).
        cmd.env(engine::shard::DURABLE_MARK_ENV, "1");
        cmd.args(["dev-cluster", "--pairs", &pairs.to_string()])
            .args(flags)
            .args(["--edges", &edges.to_string(), "--dir"])
            .arg(&dir)
            .arg("--")
            .args(serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn iris dev-cluster");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "dev-cluster printed no JSON line (logs in {})",
                dir.display()
            )
        });
        let v: Value = serde_json::from_str(&line).expect("dev-cluster prints JSON");
        let edges = v["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().expect("name").to_string(),
                    e["pid"].as_u64().expect("pid") as u32,
                    e["client"].as_str().expect("client").to_string(),
                )
            })
            .collect();
        let edge_mqtt = v["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| e["mqtt"].as_str().map(str::to_string))
            .collect();
        let mut nodes = Vec::new();
        let mut slots = HashMap::new();
        for p in v["pairs"].as_array().expect("pairs") {
            let pair = p["name"].as_str().expect("name").to_string();
            let ranges = p["slots"].as_array().expect("slots");
            slots.insert(
                pair.clone(),
                ranges
                    .iter()
                    .map(|r| r.as_str().expect("range").to_string())
                    .collect(),
            );
            for n in p["nodes"].as_array().expect("nodes") {
                nodes.push(ClusterNode {
                    name: n["name"].as_str().expect("name").to_string(),
                    pair: pair.clone(),
                    pid: n["pid"].as_u64().expect("pid") as u32,
                    client: n["client"].as_str().expect("client").to_string(),
                    admin: n["admin"].as_str().expect("admin").to_string(),
                    cmd: n["cmd"]
                        .as_array()
                        .expect("cmd")
                        .iter()
                        .map(|a| a.as_str().expect("arg").to_string())
                        .collect(),
                    restarted: None,
                });
            }
        }
        DevCluster {
            dir,
            cluster_file: PathBuf::from(v["cluster"].as_str().expect("cluster")),
            child,
            edges,
            edge_mqtt,
            nodes,
            slots,
            started_elsewhere: Vec::new(),
        }
    }

    pub fn edge(&self, i: usize) -> &str {
        &self.edges[i].2
    }

    /// Edge `i`'s MQTT listener (the cluster was started with `--mqtt`).
    pub fn edge_mqtt(&self, i: usize) -> &str {
        self.edge_mqtt[i]
            .as_deref()
            .expect("an MQTT listener: start the cluster with --mqtt")
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node name")
    }

    fn node_mut(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node name")
    }

    /// kill -9 of a node, waiting until it is gone.
    pub fn kill9(&mut self, name: &str) {
        let node = self.node_mut(name);
        match node.restarted.as_mut() {
            Some(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => {
                let _ = Command::new("kill")
                    .args(["-9", &node.pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{}", node.pid)).exists()
                    && !proc_is_zombie(node.pid)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// A power cut: kill -9, then each shard's log cut back to the durable
    /// position its node recorded after its last fsync (the test hook
    /// `engine::shard::DURABLE_MARK_FILE`): what the disk would hold at
    /// worst had the machine lost power. Returns the records cut.
    pub fn power_cut(&mut self, name: &str) -> u64 {
        self.kill9(name);
        cut_to_durable_mark(&self.dir.join(name))
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to a node.
    pub fn signal(&self, name: &str, sig: &str) {
        let pid = self.node(name).pid.to_string();
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} {name}");
    }

    /// The operator token every node of the cluster takes (dev-cluster
    /// writes it beside the cluster file).
    pub fn token(&self) -> engine::admin_auth::Token {
        engine::admin_auth::Token::read(&self.dir.join(engine::admin_auth::TOKEN_FILE_NAME))
            .expect("dev-cluster's admin.token")
    }

    /// Node `name`'s admin API, with the operator token.
    pub fn admin(&self, name: &str) -> engine::admin_http::AdminClient {
        engine::admin_http::AdminClient::new(self.node(name).admin.clone(), Some(self.token()))
    }

    /// The node's role as its admin API says (None: unreachable).
    pub fn role(&self, name: &str) -> Option<String> {
        let (status, body) = self.admin(name).call("GET", "/replication/stats").ok()?;
        let v: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
        v["role"].as_str().map(str::to_string)
    }

    /// Waits until `name` says `role` (panics with the logs after 30 s).
    pub fn wait_role(&self, name: &str, role: &str) {
        let deadline = Instant::now() + READY_TIMEOUT / 2;
        while self.role(name).as_deref() != Some(role) {
            assert!(
                Instant::now() < deadline,
                "{name} is not {role} (it says {:?}):\n{}",
                self.role(name),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// With etcd: waits until `primary`'s replica is caught up and the pair's
    /// state is `sync` (a failover may then elect the replica).
    pub fn wait_sync(&self, primary: &str) {
        self.wait_caught_up(primary);
        let deadline = Instant::now() + READY_TIMEOUT / 2;
        while self.stats(primary)["election"]["state"] != "sync" {
            assert!(
                Instant::now() < deadline,
                "{primary}: the pair is not sync:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to a node and wait for it to exit (a clean stop).
    pub fn terminate(&mut self, name: &str) {
        let node = self.node_mut(name);
        match node.restarted.as_mut() {
            Some(child) => {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let _ = child.wait();
            }
            None => {
                let pid = node.pid;
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let deadline = Instant::now() + Duration::from_secs(20);
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && !proc_is_zombie(pid)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Starts a node again from its `cmd`, waiting for its listening line.
    pub fn restart(&mut self, name: &str) {
        let log = self.dir.join(format!("{name}.restarted.log"));
        let node = self.node_mut(name);
        let (mut child, lines) = crate::spawn_iris(&node.cmd[1..], &log);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with("iris listening on") => break,
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("{name} exited on restart ({status}): see {}", log.display());
                    }
                    assert!(Instant::now() < deadline, "{name} not ready after restart");
                }
            }
        }
        node.pid = child.id();
        node.restarted = Some(child);
    }

    /// POST /replication/promote on a node; returns the new epoch. Asks
    /// again while the node answers 503 (still closing its old stream) or
    /// 409 because it has not yet seen its primary go (a stopped primary
    /// is gone once its stream ends, a paused one after the loss timeout).
    pub fn promote(&self, name: &str) -> u64 {
        let admin = self.admin(name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = admin
                .call("POST", "/replication/promote")
                .unwrap_or_else(|e| panic!("{name}: promote: {e}"));
            let busy = status == 503 || (status == 409 && body.contains("primary is alive"));
            if busy && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            assert_eq!(status, 200, "{name}: promote answered {body}");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            return v["epoch"].as_u64().expect("epoch");
        }
    }

    /// GET /replication/stats of a node.
    pub fn stats(&self, name: &str) -> Value {
        self.admin_get(name, "/replication/stats")
    }

    /// GET `path` on node `name`'s admin API: its JSON (200 expected).
    pub fn admin_get(&self, name: &str, path: &str) -> Value {
        let (status, body) = self
            .admin(name)
            .call("GET", path)
            .unwrap_or_else(|e| panic!("{name}: {path}: {e}"));
        assert_eq!(status, 200, "{name}: {path} answered {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// Waits until `primary`'s replica caught up on every shard, as
    /// `iris admin rolling-restart` waits (engine::rolling::wait_caught_up).
    pub fn wait_caught_up(&self, primary: &str) {
        if let Err(e) =
            engine::rolling::wait_caught_up(&self.admin(primary), primary, READY_TIMEOUT)
        {
            panic!("{e}: {}", self.stats(primary));
        }
    }

    /// The node of `pair` whose admin says primary.
    pub fn primary_of(&self, pair: &str) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for n in self.nodes.iter().filter(|n| n.pair == pair) {
                if let Ok((200, body)) = self.admin(&n.name).call("GET", "/replication/stats") {
                    if body.contains("\"role\":\"primary\"") {
                        return n.name.clone();
                    }
                }
            }
            assert!(Instant::now() < deadline, "{pair} has no primary");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts every core node in turn with `iris admin rolling-restart`
    /// (docs/CLUSTER.md, "Rolling restart"): stop with `kill -TERM {pid}`,
    /// start with the node's own `cmd` (through a script written here);
    /// the restarted nodes are this harness's to stop. Returns the command's
    /// output.
    pub fn rolling_restart(&mut self) -> String {
        let script = self.dir.join("start-node.sh");
        let mut text = String::from("#!/bin/sh\ncase \"$1\" in\n");
        for n in &self.nodes {
            let quoted: Vec<String> = n
                .cmd
                .iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect();
            text.push_str(&format!("  {}) exec {} ;;\n", n.name, quoted.join(" ")));
        }
        text.push_str("esac\nexit 1\n");
        std::fs::write(&script, text).expect("write start-node.sh");
        let dir = self.dir.display().to_string();
        let start = format!(
            "sh {dir}/start-node.sh {{node}} >> {dir}/{{node}}.rolled.log 2>&1 < /dev/null &"
        );
        let out = Command::new(iris_bin())
            .args(["admin", "rolling-restart", "--cluster"])
            .arg(&self.cluster_file)
            .args(["--stop", "kill -TERM {pid}", "--start", &start])
            .args(["--step-timeout-secs", "60"])
            .stdin(Stdio::null())
            .output()
            .expect("run iris admin rolling-restart");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rolling-restart failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        for n in &mut self.nodes {
            let (status, body) = engine::admin_cmd::http("GET", &n.admin, "/health")
                .unwrap_or_else(|e| panic!("{}: health after the restart: {e}", n.name));
            assert_eq!(status, 200, "{}: {body}", n.name);
            let v: Value = serde_json::from_str(&body).expect("JSON");
            let pid = v["pid"].as_u64().expect("pid") as u32;
            assert_ne!(pid, n.pid, "{} was not restarted", n.name);
            n.pid = pid;
            self.started_elsewhere.push(pid);
        }
        stdout
    }

    /// The concatenated logs (for a failing test's message).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                if p.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(25)..].join("\n");
                    out.push_str(&format!("==== {}\n{tail}\n", p.display()));
                }
            }
        }
        out
    }
}

/// Whether `pid` is gone or a zombie (exited, not yet reaped).
pub fn proc_is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for pid in &self.started_elsewhere {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for n in &mut self.nodes {
            if let Some(child) = n.restarted.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The slot of a user id (the cluster's fixed hash).
pub fn slot_of(user: &str) -> u16 {
    net::slot_of(user)
}

/// `n` user ids starting with `prefix` whose slots fall in `range` ("A-B").
pub fn users_in(prefix: &str, range: &str, n: usize) -> Vec<String> {
    let (a, b) = range.split_once('-').expect("A-B");
    let (a, b): (u16, u16) = (a.parse().expect("A"), b.parse().expect("B"));
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|u| (a..=b).contains(&slot_of(u)))
        .take(n)
        .collect()
}

/// Cuts each shard's log under `data` back to the durable position its node
/// recorded after its last fsync (engine::shard::DURABLE_MARK_FILE); the
/// node must be dead. Returns the records cut.
pub fn cut_to_durable_mark(data: &std::path::Path) -> u64 {
    let mut shards: Vec<_> = std::fs::read_dir(data)
        .expect("node data dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("shard-"))
        })
        .collect();
    shards.sort();
    let mut cut = 0;
    for dir in shards {
        let mark: u64 = std::fs::read_to_string(dir.join(engine::shard::DURABLE_MARK_FILE))
            .unwrap_or_else(|e| panic!("no durable mark in {}: {e}", dir.display()))
            .trim()
            .parse()
            .expect("a position");
        let config = engine::shard::wal_config(&dir, &engine::config::Limits::default());
        let (mut wal, _) = wal::Wal::open(config).expect("open the WAL");
        cut += wal.last_position().saturating_sub(mark);
        wal.truncate_after(mark).expect("cut the WAL back");
    }
    cut
}
