//! failover-bench: how long an edge's clients wait when a pair's primary
//! dies. Starts `iris dev-cluster --pairs 1 --edges 1`, keeps one client on
//! the edge sending (one SEND in flight at a time) to a user of the pair,
//! and per round: kill -9 of the primary, promotion of the replica through
//! its admin API, then the time to the client's next STORED, counted from the
//! promotion's answer and from the kill. The killed node is restarted from
//! its `cmd` (it rejoins as the replica) and caught up before the next
//! round, so the roles alternate.
//!
//!     failover-bench --iris target/release/iris --rounds 20 [--json]

use clap::Parser;
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
    admin: String,
    cmd: Vec<String>,
    child: Option<Child>,
    pid: u32,
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

fn stats(admin: &str) -> Value {
    engine::admin_cmd::http("GET", admin, "/replication/stats")
        .ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(Value::Null)
}

fn caught_up(admin: &str) -> bool {
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

fn main() {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut cluster = Command::new(&args.iris)
        .args([
            "dev-cluster",
            "--pairs",
            "1",
            "--edges",
            "1",
            "--dir",
            &args.dir,
        ])
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
    let edge = v["edges"][0]["client"].as_str().expect("edge").to_string();
    let mut nodes: Vec<Node> = v["pairs"][0]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| Node {
            name: n["name"].as_str().expect("name").into(),
            admin: n["admin"].as_str().expect("admin").into(),
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

    // The client: one SEND at a time, the time of every STORED recorded.
    let start = Instant::now();
    let last_stored_ns = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let sender = {
        let (last, stop, errors, edge) = (
            last_stored_ns.clone(),
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
                c.send(id, "fb-recipient", b"x").expect("send");
                c.flush().expect("flush");
                match c.recv(Duration::from_secs(60)) {
                    Ok(Some(net::Event::Stored { .. })) => {
                        stored += 1;
                        last.store(start.elapsed().as_nanos() as u64, Ordering::SeqCst);
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
    let mut from_promotion = Histogram::<u64>::new(3).expect("histogram");
    let mut from_kill = Histogram::<u64>::new(3).expect("histogram");
    let mut primary = 0usize;
    for round in 0..args.rounds {
        let replica = 1 - primary;
        wait("the replica to catch up", || {
            caught_up(&nodes[primary].admin)
        });
        let before = last_stored_ns.load(Ordering::SeqCst);
        wait("traffic", || last_stored_ns.load(Ordering::SeqCst) > before);
        let killed_at = start.elapsed().as_nanos() as u64;
        match nodes[primary].child.as_mut() {
            Some(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            None => kill9(nodes[primary].pid),
        }
        std::thread::sleep(args.promote_after);
        let (status, body) =
            engine::admin_cmd::http("POST", &nodes[replica].admin, "/replication/promote")
                .expect("promote");
        assert_eq!(status, 200, "promote: {body}");
        let promoted_at = start.elapsed().as_nanos() as u64;
        wait("the first STORED after the promotion", || {
            last_stored_ns.load(Ordering::SeqCst) > promoted_at
        });
        let first = last_stored_ns.load(Ordering::SeqCst);
        // The first STORED after the promotion: at most one SEND is in flight,
        // so the recorded time is at most one round trip past it.
        from_promotion
            .record((first - promoted_at) / 1000)
            .expect("record");
        from_kill
            .record((first - killed_at) / 1000)
            .expect("record");
        if !args.json {
            eprintln!(
                "round {round}: {} killed, {} promoted; first STORED {} µs after the promotion, {} µs after the kill",
                nodes[primary].name,
                nodes[replica].name,
                (first - promoted_at) / 1000,
                (first - killed_at) / 1000
            );
        }
        // The killed node rejoins as the replica.
        let log = std::fs::File::create(format!("{}/{}.rejoin.log", args.dir, nodes[primary].name))
            .expect("log");
        let cmd = nodes[primary].cmd.clone();
        let child = Command::new(&cmd[0])
            .args(&cmd[1..])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("restart");
        nodes[primary].pid = child.id();
        let admin = nodes[primary].admin.clone();
        wait("the restarted node's admin", || {
            stats(&admin)["role"] == "replica"
        });
        if let Some(mut old) = nodes[primary].child.replace(child) {
            let _ = old.kill();
        }
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
        "promote_after_ms": args.promote_after.as_millis() as u64,
        "promotion_to_stored_p50_us": q(&from_promotion, 0.5),
        "promotion_to_stored_p99_us": q(&from_promotion, 0.99),
        "promotion_to_stored_max_us": from_promotion.max(),
        "kill_to_stored_p50_us": q(&from_kill, 0.5),
        "kill_to_stored_p99_us": q(&from_kill, 0.99),
        "kill_to_stored_max_us": from_kill.max(),
        "client_errors": errors.load(Ordering::SeqCst),
        "stored_total": stored,
    });
    println!("{out}");
}
