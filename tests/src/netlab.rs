//! A network lab for partition tests: one core pair whose two nodes run in
//! network namespaces of their own, etcd and an edge in the test's
//! namespace, all real processes, and links the test can cut.
//!
//! ```text
//!   root namespace: etcd (10.N.250.1, a loopback alias), the edge, clients
//!      |  vRA: 10.N.1.1 <-> 10.N.1.2 (node A)     |  vRB: 10.N.2.1 <-> 10.N.2.2 (node B)
//!   [ns A] ------------- vAB: 10.N.3.1 <-> 10.N.3.2 ------------- [ns B]
//! ```
//!
//! Each node reaches etcd and the edge through its link to the root
//! namespace, and its peer through the direct link (a host route), so no
//! forwarding is needed. Faults: [`Cut::Isolate`] (both links down),
//! [`Cut::Etcd`] (a blackhole route to etcd's address in the node's
//! namespace: etcd only), [`Cut::Peer`] (the direct link down),
//! [`Cut::Edge`] (the edge only, both ways: a blackhole route to the root
//! side's address in the node's namespace, and a blackhole rule for the
//! root side's packets to the node; etcd's packets have etcd's address,
//! so they pass) and [`Cut::EdgeReplies`] (the route alone: one way). Made and
//! removed by the test (needs root, as on the test machines); `tc`'s drop
//! actions are not available here, so routes and links do the cutting.

use crate::{free_loopback_addr, unique_temp_path};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a partition cuts, for one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// From everyone: etcd, the edge, the peer.
    Isolate,
    /// From etcd only.
    Etcd,
    /// From its peer only (replication and link).
    Peer,
    /// From the edge (and the test's admin requests) both ways, etcd and
    /// the peer still reachable.
    Edge,
    /// One way: what the node sends the edge (and the test) is dropped,
    /// what the edge sends still arrives (SENDs stored, STORED lost).
    EdgeReplies,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend(args);
    run(&all);
}

pub struct LabNode {
    pub name: String,
    pub ns: String,
    /// The node's address (10.N.k.2).
    pub ip: String,
    /// The root side of its link (10.N.k.1).
    root_if: String,
    peer_if: String,
    pub cmd: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub admin: String,
}

pub struct NetLab {
    pub dir: PathBuf,
    pub cluster_file: PathBuf,
    pub nodes: Vec<LabNode>,
    /// etcd's client URL (on the loopback alias).
    pub etcd_url: String,
    etcd_ip: String,
    etcd: Option<Child>,
    pub edge: Option<Child>,
    /// The edge's client address (127.0.0.1:PORT).
    pub edge_addr: String,
    net: u8,
}

impl NetLab {
    /// Namespaces, links, etcd, the pair's two nodes and one edge, running;
    /// `serve_args` go to every iris process.
    pub fn start(serve_args: &[&str]) -> NetLab {
        crate::etcd::ensure_installed();
        let dir = unique_temp_path("netlab");
        std::fs::create_dir_all(&dir).expect("lab dir");
        // 10.N.0.0/16, N from the pid, the first whose etcd address is not
        // taken yet: labs of concurrent runs differ.
        let taken = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "addr", "show", "dev", "lo"])
                .output()
                .expect("ip addr")
                .stdout,
        )
        .into_owned();
        let net = (0..150u32)
            .map(|i| 100 + ((std::process::id() + i) % 150) as u8)
            .find(|n| !taken.contains(&format!("10.{n}.250.1/")))
            .expect("a free 10.N.0.0/16 for the lab");
        let tag = format!("{}", std::process::id() % 100_000);
        let etcd_ip = format!("10.{net}.250.1");
        let mut lab = NetLab {
            cluster_file: dir.join("cluster.toml"),
            dir,
            nodes: Vec::new(),
            etcd_url: format!("http://{etcd_ip}:2379"),
            etcd_ip: etcd_ip.clone(),
            etcd: None,
            edge: None,
            edge_addr: free_loopback_addr(),
            net,
        };
        run(&["ip", "addr", "add", &format!("{etcd_ip}/32"), "dev", "lo"]);
        for (k, name) in [(1u8, "la"), (2u8, "lb")] {
            let ns = format!("iris{tag}{name}");
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(&["ip", "netns", "add", &ns]);
            let root_if = format!("ir{tag}r{k}");
            let node_if = format!("ir{tag}n{k}");
            let _ = Command::new("ip").args(["link", "del", &root_if]).output();
            run(&[
                "ip", "link", "add", &root_if, "type", "veth", "peer", "name", &node_if,
            ]);
            run(&["ip", "link", "set", &node_if, "netns", &ns]);
            run(&[
                "ip",
                "addr",
                "add",
                &format!("10.{net}.{k}.1/30"),
                "dev",
                &root_if,
            ]);
            run(&["ip", "link", "set", &root_if, "up"]);
            in_ns(
                &ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{net}.{k}.2/30"),
                    "dev",
                    &node_if,
                ],
            );
            in_ns(&ns, &["ip", "link", "set", &node_if, "up"]);
            in_ns(&ns, &["ip", "link", "set", "lo", "up"]);
            in_ns(
                &ns,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.{net}.{k}.1"),
                ],
            );
            lab.nodes.push(LabNode {
                name: format!("p0{}", &name[1..]),
                ns,
                ip: format!("10.{net}.{k}.2"),
                root_if,
                peer_if: format!("ir{tag}p{k}"),
                cmd: Vec::new(),
                child: None,
                log: PathBuf::new(),
                admin: String::new(),
            });
        }
        // The direct link between the two namespaces.
        let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
        let _ = Command::new("ip")
            .args(["link", "del", &a.peer_if])
            .output();
        run(&[
            "ip", "link", "add", &a.peer_if, "type", "veth", "peer", "name", &b.peer_if,
        ]);
        run(&["ip", "link", "set", &a.peer_if, "netns", &a.ns]);
        run(&["ip", "link", "set", &b.peer_if, "netns", &b.ns]);
        for (n, me, other_ip) in [(a, 1, &b.ip), (b, 2, &a.ip)] {
            let via = format!("10.{net}.3.{}", 3 - me);
            in_ns(
                &n.ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{net}.3.{me}/30"),
                    "dev",
                    &n.peer_if,
                ],
            );
            in_ns(&n.ns, &["ip", "link", "set", &n.peer_if, "up"]);
            in_ns(
                &n.ns,
                &[
                    "ip",
                    "route",
                    "add",
                    &format!("{other_ip}/32"),
                    "via",
                    &via,
                    "dev",
                    &n.peer_if,
                ],
            );
        }
        lab.start_etcd();
        // The cluster file: both nodes on their namespace addresses.
        engine::admin_auth::create_token_file(&lab.dir.join(engine::admin_auth::TOKEN_FILE_NAME))
            .expect("the lab's operator token");
        let mut text = format!(
            "admin_token_file = \"admin.token\"\netcd = {:?}\netcd_prefix = \"lab\"\n\n[[pairs]]\nname = \"p0\"\nslots = [\"0-16383\"]\n",
            lab.etcd_url
        );
        for n in &lab.nodes {
            text.push_str(&format!(
                "\n[[pairs.nodes]]\nname = {:?}\nclient = \"{ip}:7070\"\nlink = \"{ip}:7300\"\nreplication = \"{ip}:7100\"\nadmin = \"{ip}:7200\"\n",
                n.name,
                ip = n.ip
            ));
        }
        std::fs::write(&lab.cluster_file, text).expect("cluster file");
        let file = lab.cluster_file.display().to_string();
        for i in 0..2 {
            let n = &mut lab.nodes[i];
            n.admin = format!("{}:7200", n.ip);
            n.log = lab.dir.join(format!("{}.log", n.name));
            let mut cmd = vec![
                "serve".to_string(),
                "--role".into(),
                "core".into(),
                "--cluster".into(),
                file.clone(),
                "--node".into(),
                n.name.clone(),
                "--data".into(),
                lab.dir.join(&n.name).display().to_string(),
                "--cores".into(),
                "1".into(),
                "--insecure-cluster".into(),
                "--insecure-no-auth".into(),
            ];
            cmd.extend(serve_args.iter().map(|s| s.to_string()));
            n.cmd = cmd;
            lab.start_node(i);
        }
        let mut cmd: Vec<String> = [
            "serve",
            "--role",
            "edge",
            "--cluster",
            &file,
            "--name",
            "e0",
            "--listen",
            &lab.edge_addr,
            "--cores",
            "1",
            "--insecure-cluster",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cmd.extend(serve_args.iter().map(|s| s.to_string()));
        let (child, lines) = crate::spawn_iris(&cmd, &lab.dir.join("e0.log"));
        wait_ready(&lines, "e0");
        lab.edge = Some(child);
        lab
    }

    fn start_etcd(&mut self) {
        let client = format!("{}:2379", self.etcd_ip);
        self.etcd = Some(crate::etcd::spawn(&client, &self.dir));
    }

    /// Starts (or restarts) node `i` inside its namespace.
    pub fn start_node(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let (child, rx) = crate::spawn_iris_in(Some(&n.ns), &n.cmd, &n.log);
        wait_ready(&rx, &n.name);
        n.child = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, waiting for the node to exit.
    pub fn terminate(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i].child.as_ref().expect("running").id();
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill {sig}");
    }

    /// kill -9 and every shard's log cut back to its last fsync (as
    /// DevCluster::power_cut); returns the records cut.
    pub fn power_cut(&mut self, i: usize) -> u64 {
        self.kill9(i);
        crate::dev_cluster::cut_to_durable_mark(&self.dir.join(&self.nodes[i].name))
    }

    /// Cuts (or, `on` false, heals) node `i` as `cut` says.
    pub fn cut(&self, i: usize, cut: Cut, on: bool) {
        let n = &self.nodes[i];
        let state = if on { "down" } else { "up" };
        match cut {
            Cut::Isolate => {
                run(&["ip", "link", "set", &n.root_if, state]);
                in_ns(&n.ns, &["ip", "link", "set", &n.peer_if, state]);
                if !on {
                    self.restore_routes(i);
                }
            }
            Cut::Peer => {
                in_ns(&n.ns, &["ip", "link", "set", &n.peer_if, state]);
                if !on {
                    self.restore_routes(i);
                }
            }
            Cut::Edge | Cut::EdgeReplies => {
                // The edge and the test reach a node from the root side of
                // its link (10.N.k.1); etcd answers from its own address.
                let verb = if on { "add" } else { "del" };
                let root_side = format!("10.{}.{}.1", self.net, i + 1);
                in_ns(
                    &n.ns,
                    &["ip", "route", verb, "blackhole", &format!("{root_side}/32")],
                );
                if cut == Cut::Edge {
                    run(&[
                        "ip",
                        "rule",
                        verb,
                        "from",
                        &root_side,
                        "to",
                        &n.ip,
                        "blackhole",
                    ]);
                }
            }
            Cut::Etcd => {
                let verb = if on { "add" } else { "del" };
                in_ns(
                    &n.ns,
                    &[
                        "ip",
                        "route",
                        verb,
                        "blackhole",
                        &format!("{}/32", self.etcd_ip),
                    ],
                );
            }
        }
    }

    /// Routes over a link that went down are dropped by the kernel: put
    /// them back after it comes up (both namespaces: the peer's too).
    fn restore_routes(&self, i: usize) {
        let net = self.net;
        for (j, n) in self.nodes.iter().enumerate() {
            let k = j + 1;
            let _ = Command::new("ip")
                .args([
                    "netns", "exec", &n.ns, "ip", "route", "replace", "default", "via",
                ])
                .arg(format!("10.{net}.{k}.1"))
                .output();
            let other = &self.nodes[1 - j];
            let _ = Command::new("ip")
                .args(["netns", "exec", &n.ns, "ip", "route", "replace"])
                .arg(format!("{}/32", other.ip))
                .args(["via", &format!("10.{net}.3.{}", 3 - k), "dev", &n.peer_if])
                .output();
        }
        let _ = i;
    }

    /// Node `i`'s admin API with the lab's operator token.
    pub fn admin(&self, i: usize) -> engine::admin_http::AdminClient {
        let path = self.dir.join(engine::admin_auth::TOKEN_FILE_NAME);
        let token = engine::admin_auth::Token::read(&path).expect("the lab's operator token");
        engine::admin_http::AdminClient::new(self.nodes[i].admin.as_str(), Some(token))
    }

    /// The role node `i` reports (None: unreachable from the test).
    pub fn role(&self, i: usize) -> Option<String> {
        let (s, body) = self.admin(i).call("GET", "/replication/stats").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| s == 200)?;
        v["role"].as_str().map(str::to_string)
    }

    pub fn stats(&self, i: usize) -> serde_json::Value {
        self.admin(i)
            .call("GET", "/replication/stats")
            .ok()
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["la", "lb"]
            .iter()
            .map(|s| format!("p0{}", &s[1..]))
            .chain(["e0".to_string()])
        {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "==== {name}\n{}\n",
                lines[lines.len().saturating_sub(25)..].join("\n")
            ));
        }
        out
    }
}

fn wait_ready(lines: &mpsc::Receiver<String>, name: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("iris listening on") => return,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name} exited during startup"),
            Err(_) => assert!(Instant::now() < deadline, "{name} not ready"),
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for c in [self.edge.take(), self.etcd.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        for (i, n) in self.nodes.iter().enumerate() {
            // A rule left by a test that failed mid-cut (rules are global).
            let root_side = format!("10.{}.{}.1", self.net, i + 1);
            let _ = Command::new("ip")
                .args(["rule", "del", "from", &root_side, "to", &n.ip, "blackhole"])
                .output();
            let _ = Command::new("ip").args(["netns", "del", &n.ns]).output();
            let _ = Command::new("ip")
                .args(["link", "del", &n.root_if])
                .output();
        }
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/32", self.etcd_ip), "dev", "lo"])
            .output();
        if std::thread::panicking() {
            // The nodes' logs, for the failure's diagnosis.
            eprintln!("netlab: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
