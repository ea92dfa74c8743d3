//! The clients people use, through failovers: Iris's Python client
//! (`clients/python`) and a standard MQTT client (paho-mqtt) send and receive
//! through an edge of a `dev-cluster --mqtt` while the pair's primary is
//! killed with -9 and its replica promoted, then the same the other way round.
//! The driver (`tests/py/clients_through_failover.py`) checks that each
//! recipient gets every stored message once, in each sender's order, and that
//! no send was refused (a failover behind an edge is a pause).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tests::dev_cluster::DevCluster;
use tests::python::{ensure_iris_client, ensure_paho, python};

/// Faster failure detection, as in tests/tests/cluster.rs.
const FAST: [&str; 4] = ["--heartbeat-ms", "200", "--replica-loss-timeout-ms", "1000"];
/// How long the load may take to show the progress a step waits for.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// What the driver reported last: messages stored, messages received.
#[derive(Default)]
struct Progress {
    stored: AtomicU64,
    received: AtomicU64,
    /// Every line that was not a progress line (the result, tracebacks).
    other: Mutex<Vec<String>>,
}

impl Progress {
    /// Waits until both counters have grown by `n` from where they are now.
    fn wait_more(&self, n: u64, what: &str) {
        let (s, r) = (
            self.stored.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        );
        let deadline = Instant::now() + PROGRESS_TIMEOUT;
        while self.stored.load(Ordering::Relaxed) < s + n
            || self.received.load(Ordering::Relaxed) < r + n
        {
            if Instant::now() > deadline {
                let said = self.other.lock().map(|v| v.join("\n")).unwrap_or_default();
                panic!(
                    "{what}: stored {s} -> {}, received {r} -> {} in {PROGRESS_TIMEOUT:?}; the driver said:\n{said}",
                    self.stored.load(Ordering::Relaxed),
                    self.received.load(Ordering::Relaxed),
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn python_and_mqtt_clients_see_failovers_behind_an_edge_as_a_pause() {
    ensure_iris_client();
    ensure_paho();
    let mut c = DevCluster::start_with(1, 1, &["--mqtt"], &FAST);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/clients_through_failover.py");
    let mut driver = Command::new(python())
        .arg(&script)
        .args([c.edge(0), c.edge_mqtt(0)])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python driver");
    let progress = Arc::new(Progress::default());
    let stdout = driver.stdout.take().expect("piped");
    let reader = {
        let progress = progress.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let counts: Vec<u64> = line
                    .strip_prefix("progress ")
                    .map(|rest| rest.split(' ').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or_default();
                if let [stored, received] = counts[..] {
                    progress.stored.store(stored, Ordering::Relaxed);
                    progress.received.store(received, Ordering::Relaxed);
                } else {
                    progress.other.lock().expect("lock").push(line);
                }
            }
        })
    };
    let stderr = driver.stderr.take().expect("piped");
    let errors = thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });

    progress.wait_more(200, "before the first failover");
    c.kill9("p0a");
    c.promote("p0b");
    progress.wait_more(200, "after p0b's promotion");
    // The old primary rejoins as the replica, catches up, and the same fault
    // comes the other way round.
    c.restart("p0a");
    c.wait_role("p0a", "replica");
    c.wait_caught_up("p0b");
    progress.wait_more(100, "with p0a back as the replica");
    c.kill9("p0b");
    c.promote("p0a");
    progress.wait_more(200, "after p0a's promotion");

    let mut stdin = driver.stdin.take().expect("piped");
    writeln!(stdin, "stop").expect("tell the driver to stop");
    drop(stdin);
    let status = driver.wait().expect("driver exit");
    reader.join().expect("stdout reader");
    let stderr = errors.join().expect("stderr reader");
    let said = progress.other.lock().expect("lock").join("\n");
    println!("{said}");
    assert!(
        status.success(),
        "the driver failed ({status}):\n{said}\n{stderr}\ncluster logs:\n{}",
        c.logs()
    );
    let result: serde_json::Value = serde_json::from_str(
        said.lines()
            .find_map(|l| l.strip_prefix("result "))
            .expect("a result line"),
    )
    .expect("result JSON");
    assert!(result["stored"].as_u64().unwrap_or(0) >= 700, "{result}");
    assert_eq!(result["rejected"], 0, "{result}");
}
