//! failover-bench: how long an edge's clients wait when a pair's primary
//! dies. Starts `iris dev-cluster --pairs 1 --edges 1`, keeps one client on
//! the edge sending (one SEND in flight at a time) to a user of the pair,
//! and per round: a fault on the primary (kill -9, SIGSTOP, or SIGTERM: a
//! clean stop, which with etcd hands the lease back), then the
//! time to the client's first STORED of a SEND written after the fault.
//! Without etcd, the replica is promoted through its admin API
//! `--promote-after` the fault (also timed from the promotion's answer);
//! with `--etcd URL` nobody promotes: the replica is elected when the
//! primary's lease expires. The failed node comes back (restarted from its
//! `cmd`, or SIGCONT) as the replica and is caught up before the next round,
//! so the roles alternate.
//!
//! `--fault isolate` and `--fault etcd-cut` run the pair's two nodes in
//! network namespaces of their own (the tests' partition lab,
//! `tests::netlab`, with an etcd it starts itself): the primary is cut
//! from everyone, or from etcd only, and healed after the takeover.
//!
//!     failover-bench --iris target/release/iris --rounds 20 [--etcd http://127.0.0.1:2379] [--fault stop] [--json]
//!     failover-bench --iris target/release/iris --rounds 20 --fault isolate --json   (as root)

use clap::Parser;
use engine::admin_http::AdminClient;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    about = "Time from a primary's death and its replica's promotion to the next STORED through an edge"
)]
struct Args {
    /// The iris binary.
    #[arg(long, default_value = "target/release/iris")]
    iris: String,
    /// Failovers to measure.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Pause between the kill and the promotion (an operator's or a vote's delay).
    #[arg(long, default_value = "200ms", value_parser = humantime_ms)]
    promote_after: Duration,
    /// Automatic failover through this etcd (no promotion by the bench).
    #[arg(long)]
    etcd: Option<String>,
    /// The fault: `kill9`, `stop` (SIGSTOP for `--stop-for`, then SIGCONT),
    /// `term` (SIGTERM, a clean stop), `isolate` or `etcd-cut` (a partition
    /// in network namespaces, as root).
    #[arg(long, default_value = "kill9")]
    fault: String,
    /// How long a stopped primary stays stopped (past its lease).
    #[arg(long, default_value = "3s", value_parser = humantime_ms)]
    stop_for: Duration,
    /// Scratch directory for the cluster.
    #[arg(long, default_value = "/tmp/iris-failover-bench")]
    dir: String,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn humantime_ms(s: &str) -> Result<Duration, String> {
    let ms = s
        .strip_suffix("ms")
        .map(|v| v.parse::<u64>())
        .or_else(|| {
            s.strip_suffix('s')
                .map(|v| v.parse::<u64>().map(|x| x * 1000))
        })
        .ok_or("a duration like 200ms or 1s")?
        .map_err(|e| e.to_string())?;
    Ok(Duration::from_millis(ms))
}

struct Node {
    name: String,
    admin: AdminClient,
    cmd: Vec<String>,
    child: Option<Child>,
    pid: u32,
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

fn stats(admin: &AdminClient) -> Value {
    admin
        .call("GET", "/replication/stats")
        .ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(Value::Null)
}

fn caught_up(admin: &AdminClient) -> bool {
    let s = stats(admin);
    s["role"] == "primary"
        && s["shards"].as_array().is_some_and(|shards| {
            shards.iter().all(|sh| {
                sh["replicas"].as_array().is_some_and(|r| {
                    r.iter()
                        .any(|r| r["connected"] == true && r["lag_ops"] == 0)
                })
            })
        })
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn main() {
    let args = Args::parse();
    if args.fault == "isolate" || args.fault == "etcd-cut" {
        return partition_rounds(&args);
    }
    assert!(
        matches!(args.fault.as_str(), "kill9" | "stop" | "term"),
        "--fault kill9, stop, term, isolate or etcd-cut"
    );
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut dev = Command::new(&args.iris);
    dev.args([
        "dev-cluster",
        "--pairs",
        "1",
        "--edges",
        "1",
        "--dir",
        &args.dir,
    ]);
    if let Some(etcd) = &args.etcd {
        dev.args(["--etcd", etcd]);
    }
    let mut cluster = dev
        .args([
            "--",
            "--heartbeat-ms",
            "200",
            "--replica-loss-timeout-ms",
            "1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iris dev-cluster");
    let mut line = String::new();
    BufReader::new(cluster.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("dev-cluster's JSON line");
    let v: Value = serde_json::from_str(&line).expect("JSON");
    let token_file = std::path::Path::new(&args.dir).join(engine::admin_auth::TOKEN_FILE_NAME);
    let token = engine::admin_auth::Token::read(&token_file).expect("dev-cluster's admin.token");
    let edge = v["edges"][0]["client"].as_str().expect("edge").to_string();
    let mut nodes: Vec<Node> = v["pairs"][0]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| Node {
            name: n["name"].as_str().expect("name").into(),
            admin: AdminClient::new(n["admin"].as_str().expect("admin"), Some(token.clone())),
            cmd: n["cmd"]
                .as_array()
                .expect("cmd")
                .iter()
                .map(|a| a.as_str().expect("arg").into())
                .collect(),
            child: None,
            pid: n["pid"].as_u64().expect("pid") as u32,
        })
        .collect();

    // The client: one SEND at a time; for every STORED, when its SEND was
    // written and when the answer came (ns since start).
    let start = Instant::now();
    let last_stored_ns = Arc::new(AtomicU64::new(0));
    let last_stored_sent_ns = Arc::new(AtomicU64::new(0));
    // The longest wait between a SEND and its STORED since the last reset
    // (ns): with `term` the old primary still answers while it drains, so
    // the pause its clients see is this wait, not the first STORED after
    // the signal.
    let longest_wait_ns = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let sender = {
        let (last, last_sent, longest, stop, errors, edge) = (
            last_stored_ns.clone(),
            last_stored_sent_ns.clone(),
            longest_wait_ns.clone(),
            stop.clone(),
            errors.clone(),
            edge.clone(),
        );
        std::thread::spawn(move || {
            let (mut c, _) = net::Client::connect(&edge, "fb-sender", b"", Duration::from_secs(10))
                .expect("connect to the edge");
            let mut stored = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = net::new_msg_id();
                let sent = start.elapsed().as_nanos() as u64;
                c.send(id, "fb-recipient", b"x").expect("send");
                c.flush().expect("flush");
                match c.recv(Duration::from_secs(60)) {
                    Ok(Some(net::Event::Stored { .. })) => {
                        stored += 1;
                        let now = start.elapsed().as_nanos() as u64;
                        longest.fetch_max(now - sent, Ordering::SeqCst);
                        last_sent.store(sent, Ordering::SeqCst);
                        last.store(now, Ordering::SeqCst);
                    }
                    other => {
                        eprintln!("failover-bench: client saw {other:?}");
                        errors.fetch_add(1, Ordering::SeqCst);
                        return stored;
                    }
                }
            }
            stored
        })
    };
    let elected = args.etcd.is_some();
    let mut from_promotion = Histogram::<u64>::new(3).expect("histogram");
    let mut from_fault = Histogram::<u64>::new(3).expect("histogram");
    let mut primary = (0..nodes.len())
        .find(|&i| stats(&nodes[i].admin)["role"] == "primary")
        .expect("a primary");
    for round in 0..args.rounds {
        let replica = 1 - primary;
        wait("the replica to catch up", || {
            let s = stats(&nodes[primary].admin);
            caught_up(&nodes[primary].admin) && (!elected || s["election"]["state"] == "sync")
        });
        let before = last_stored_ns.load(Ordering::SeqCst);
        wait("traffic", || last_stored_ns.load(Ordering::SeqCst) > before);
        longest_wait_ns.store(0, Ordering::SeqCst);
        match (args.fault.as_str(), nodes[primary].child.as_mut()) {
            ("stop", _) => signal(nodes[primary].pid, "-STOP"),
            ("term", _) => signal(nodes[primary].pid, "-TERM"),
            (_, Some(child)) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            (_, None) => kill9(nodes[primary].pid),
        }
        // Counted from when the signal was surely delivered (`kill` ran).
        let fault_at = start.elapsed().as_nanos() as u64;
        let mut promoted_at = None;
        if !elected {
            std::thread::sleep(args.promote_after);
            // Asked again while the replica has not yet seen its primary's
            // stream end (409 "primary is alive") or is closing it (503).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, body) = nodes[replica]
                    .admin
                    .call("POST", "/replication/promote")
                    .expect("promote");
                let busy = status == 503 || (status == 409 && body.contains("primary is alive"));
                if busy && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                assert_eq!(status, 200, "promote: {body}");
                break;
            }
            promoted_at = Some(start.elapsed().as_nanos() as u64);
        }
        if args.fault == "term" {
            // A clean stop: the old primary answers while it drains, then
            // hands its lease back. Counted: the client's longest wait for a
            // STORED until one whose SEND went out after the replica said
            // primary.
            wait("the replica to take over", || {
                stats(&nodes[replica].admin)["role"] == "primary"
            });
            let took_over = start.elapsed().as_nanos() as u64;
            wait("a STORED from the new primary", || {
                last_stored_sent_ns.load(Ordering::SeqCst) > took_over
            });
        } else {
            // The first STORED of a SEND written after the fault (one
            // written before may have been answered by the old primary).
            wait("the first STORED after the fault", || {
                last_stored_sent_ns.load(Ordering::SeqCst) > fault_at
            });
        }
        let first = last_stored_ns.load(Ordering::SeqCst);
        let waited = match args.fault.as_str() {
            "term" => longest_wait_ns.load(Ordering::SeqCst),
            _ => first - fault_at,
        };
        from_fault.record(waited / 1000).expect("record");
        if let Some(p) = promoted_at {
            from_promotion
                .record(first.saturating_sub(p) / 1000)
                .expect("record");
        }
        if !args.json {
            eprintln!(
                "round {round}: {} {}; {} µs (first STORED after the fault; term: the longest wait)",
                nodes[primary].name,
                args.fault,
                waited / 1000,
            );
        }
        assert_eq!(
            stats(&nodes[replica].admin)["role"],
            "primary",
            "the replica did not take over"
        );
        if args.fault == "stop" {
            // Past its lease by now (or promoted over): it steps down by itself.
            let left = args.stop_for.saturating_sub(Duration::from_nanos(
                start.elapsed().as_nanos() as u64 - fault_at,
            ));
            std::thread::sleep(left);
            signal(nodes[primary].pid, "-CONT");
            if !elected {
                // Manual failover has no lease: the old primary stays fenced.
                match nodes[primary].child.as_mut() {
                    Some(child) => {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    None => kill9(nodes[primary].pid),
                }
            }
        }
        if args.fault == "term" {
            // Its clean stop ends before it comes back.
            let pid = nodes[primary].pid;
            match nodes[primary].child.as_mut() {
                Some(child) => {
                    let _ = child.wait();
                }
                None => wait("the stopped node to exit", || {
                    tests::dev_cluster::proc_is_zombie(pid)
                }),
            }
        }
        if args.fault == "kill9" || args.fault == "term" || !elected {
            // The killed (or stopped) node rejoins as the replica.
            let log =
                std::fs::File::create(format!("{}/{}.rejoin.log", args.dir, nodes[primary].name))
                    .expect("log");
            let cmd = nodes[primary].cmd.clone();
            let child = Command::new(&cmd[0])
                .args(&cmd[1..])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("restart");
            nodes[primary].pid = child.id();
            if let Some(mut old) = nodes[primary].child.replace(child) {
                let _ = old.kill();
            }
        }
        let admin = nodes[primary].admin.clone();
        wait("the old primary to rejoin as the replica", || {
            stats(&admin)["role"] == "replica"
        });
        primary = replica;
    }
    stop.store(true, Ordering::Relaxed);
    let stored = sender.join().unwrap_or(0);
    for n in &mut nodes {
        if let Some(c) = n.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &cluster.id().to_string()])
        .status();
    let _ = cluster.wait();
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    let out = json!({
        "rounds": args.rounds,
        "fault": args.fault,
        "etcd": elected,
        "promote_after_ms": (!elected).then_some(args.promote_after.as_millis() as u64),
        "promotion_to_stored_p50_us": (!elected).then(|| q(&from_promotion, 0.5)),
        "promotion_to_stored_p99_us": (!elected).then(|| q(&from_promotion, 0.99)),
        "fault_to_stored_p50_us": q(&from_fault, 0.5),
        "fault_to_stored_p99_us": q(&from_fault, 0.99),
        "fault_to_stored_max_us": from_fault.max(),
        "client_errors": errors.load(Ordering::SeqCst),
        "stored_total": stored,
    });
    println!("{out}");
}

/// One client on `edge`, one SEND in flight: (stop, stored count handle,
/// time of the last STORED, send time of the SEND it answered, errors).
struct Client {
    /// Every STORED's time (ns since start), at most STORED_TIMES_MAX.
    stored_times: Arc<std::sync::Mutex<std::collections::VecDeque<u64>>>,
    stop: Arc<AtomicBool>,
    last_stored_ns: Arc<AtomicU64>,
    last_stored_sent_ns: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<u64>,
}

/// STORED times the partition client keeps (the last ones).
const STORED_TIMES_MAX: usize = 1 << 20;

fn client(edge: &str, start: Instant) -> Client {
    let stored_times = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let times = stored_times.clone();
    let last_stored_ns = Arc::new(AtomicU64::new(0));
    let last_stored_sent_ns = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let (last, last_sent, stop2, errors2, edge) = (
        last_stored_ns.clone(),
        last_stored_sent_ns.clone(),
        stop.clone(),
        errors.clone(),
        edge.to_string(),
    );
    let handle = std::thread::spawn(move || {
        let (mut c, _) = net::Client::connect(&edge, "fb-sender", b"", Duration::from_secs(10))
            .expect("connect to the edge");
        let mut stored = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let sent = start.elapsed().as_nanos() as u64;
            c.send(net::new_msg_id(), "fb-recipient", b"x")
                .expect("send");
            c.flush().expect("flush");
            match c.recv(Duration::from_secs(60)) {
                Ok(Some(net::Event::Stored { .. })) => {
                    stored += 1;
                    let now = start.elapsed().as_nanos() as u64;
                    {
                        let mut t = times.lock().expect("not poisoned");
                        if t.len() >= STORED_TIMES_MAX {
                            t.pop_front();
                        }
                        t.push_back(now);
                    }
                    last_sent.store(sent, Ordering::SeqCst);
                    last.store(now, Ordering::SeqCst);
                }
                other => {
                    eprintln!("failover-bench: client saw {other:?}");
                    errors2.fetch_add(1, Ordering::SeqCst);
                    return stored;
                }
            }
        }
        stored
    });
    Client {
        stored_times,
        stop,
        last_stored_ns,
        last_stored_sent_ns,
        errors,
        handle,
    }
}

/// Partitions in the tests' network-namespace lab: per round the primary
/// is cut (from everyone, or from etcd only), the time to the first STORED
/// of a SEND written after the cut is recorded, then the cut is healed and
/// the old primary rejoins as the replica by itself.
fn partition_rounds(args: &Args) {
    use tests::netlab::{Cut, NetLab};
    std::env::set_var("IRIS_E2E_BIN", &args.iris);
    let cut = if args.fault == "isolate" {
        Cut::Isolate
    } else {
        Cut::Etcd
    };
    // A client inbox that grows for the whole run: no REJECTED 5.
    let lab = NetLab::start(&[
        "--heartbeat-ms",
        "200",
        "--replica-loss-timeout-ms",
        "1000",
        "--inbox-len-max",
        "10000000",
    ]);
    let start = Instant::now();
    let c = client(&lab.edge_addr, start);
    let mut from_fault = Histogram::<u64>::new(3).expect("histogram");
    for round in 0..args.rounds {
        wait("one primary, the pair in sync", || {
            let roles = [lab.role(0), lab.role(1)];
            let p = roles.iter().position(|r| r.as_deref() == Some("primary"));
            roles[0] != roles[1]
                && roles
                    .iter()
                    .all(|r| matches!(r.as_deref(), Some("primary" | "replica")))
                && p.is_some_and(|p| lab.stats(p)["election"]["state"] == "sync")
        });
        let p = (0..2)
            .find(|&i| lab.role(i).as_deref() == Some("primary"))
            .expect("primary");
        let before = c.last_stored_ns.load(Ordering::SeqCst);
        wait("traffic", || {
            c.last_stored_ns.load(Ordering::SeqCst) > before
        });
        lab.cut(p, cut, true);
        let fault_at = start.elapsed().as_nanos() as u64;
        // Cut from etcd only, the primary may go on acknowledging until its
        // lease deadline: wait for the election, then for a STORED of a SEND
        // written after it was seen, and count from the cut to the first
        // STORED after the longest silence (the new primary's first).
        let r = 1 - p;
        wait("the replica elected", || {
            lab.role(r).as_deref() == Some("primary")
        });
        let seen = start.elapsed().as_nanos() as u64;
        wait("a STORED from the new primary", || {
            c.last_stored_sent_ns.load(Ordering::SeqCst) > seen
        });
        let times = c.stored_times.lock().expect("not poisoned").clone();
        let mut prev = fault_at;
        let (mut gap, mut first) = (0, 0);
        for &t in times.iter().filter(|&&t| t > fault_at) {
            if t - prev > gap {
                (gap, first) = (t - prev, t);
            }
            prev = t;
        }
        from_fault
            .record((first - fault_at) / 1000)
            .expect("record");
        if !args.json {
            eprintln!(
                "round {round}: {} {}; first STORED of the new primary {} µs after the cut",
                lab.nodes[p].name,
                args.fault,
                (first - fault_at) / 1000
            );
        }
        lab.cut(p, cut, false);
        wait("the old primary to rejoin as the replica", || {
            lab.role(p).as_deref() == Some("replica")
        });
    }
    c.stop.store(true, Ordering::Relaxed);
    let stored = c.handle.join().unwrap_or(0);
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    println!(
        "{}",
        json!({
            "rounds": args.rounds,
            "fault": args.fault,
            "etcd": true,
            "fault_to_stored_p50_us": q(&from_fault, 0.5),
            "fault_to_stored_p99_us": q(&from_fault, 0.99),
            "fault_to_stored_max_us": from_fault.max(),
            "client_errors": c.errors.load(Ordering::SeqCst),
            "stored_total": stored,
        })
    );
}
