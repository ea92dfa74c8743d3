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

/// The driver script, running: its progress as it reports it.
struct Driver {
    child: std::process::Child,
    progress: Arc<Progress>,
    reader: thread::JoinHandle<()>,
    errors: thread::JoinHandle<String>,
}

impl Driver {
    /// `python3 tests/py/clients_through_failover.py ARGS...`
    fn start(args: &[&str]) -> Driver {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py/clients_through_failover.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the Python driver");
        let progress = Arc::new(Progress::default());
        let stdout = child.stdout.take().expect("piped");
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
                    } else if let Ok(mut other) = progress.other.lock() {
                        other.push(line);
                    }
                }
            })
        };
        let stderr = child.stderr.take().expect("piped");
        let errors = thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        Driver {
            child,
            progress,
            reader,
            errors,
        }
    }

    /// Says "stop", waits for the driver's checks; its result JSON
    /// (panics with everything it said, and the cluster's logs, if it failed).
    fn finish(mut self, c: &DevCluster) -> serde_json::Value {
        let mut stdin = self.child.stdin.take().expect("piped");
        writeln!(stdin, "stop").expect("tell the driver to stop");
        drop(stdin);
        let status = self.child.wait().expect("driver exit");
        self.reader.join().expect("stdout reader");
        let stderr = self.errors.join().expect("stderr reader");
        let said = self.progress.other.lock().expect("lock").join("\n");
        println!("{said}");
        assert!(
            status.success(),
            "the driver failed ({status}):\n{said}\n{stderr}\ncluster logs:\n{}",
            c.logs()
        );
        serde_json::from_str(
            said.lines()
                .find_map(|l| l.strip_prefix("result "))
                .expect("a result line"),
        )
        .expect("result JSON")
    }
}

#[test]
fn python_and_mqtt_clients_see_failovers_behind_an_edge_as_a_pause() {
    ensure_iris_client();
    ensure_paho();
    let mut c = DevCluster::start_with(1, 1, &["--mqtt"], &tests::FAST_FAILURE_DETECTION);
    let driver = Driver::start(&[c.edge(0), c.edge_mqtt(0)]);
    let progress = driver.progress.clone();
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
    let result = driver.finish(&c);
    assert!(result["stored"].as_u64().unwrap_or(0) >= 700, "{result}");
    assert_eq!(result["rejected"], 0, "{result}");
}

/// Iris's Python client given every edge's address: kill -9 of the edge it
/// is connected through moves it to the other edge. What was unanswered is
/// sent again with its msg_id (stored once), what the new edge delivers
/// again is dropped by msg_id, and nothing is lost, doubled or reordered.
#[test]
fn the_python_client_moves_to_the_next_edge_when_its_edge_dies() {
    ensure_iris_client();
    let c = DevCluster::start(1, 2, &tests::FAST_FAILURE_DETECTION);
    let edges = format!("{},{}", c.edge(0), c.edge(1));
    let driver = Driver::start(&[&edges, "-"]);
    let progress = driver.progress.clone();
    progress.wait_more(200, "through the first edge");
    let killed = Command::new("kill")
        .args(["-9", &c.edges[0].1.to_string()])
        .status()
        .expect("kill -9 the edge");
    assert!(killed.success());
    progress.wait_more(200, "through the second edge");
    let result = driver.finish(&c);
    // Both clients were connected through e0 (the first address) and are
    // now through e1.
    assert!(result["py_s_connections"].as_u64() >= Some(2), "{result}");
    assert!(result["py_r_connections"].as_u64() >= Some(2), "{result}");
    assert_eq!(result["rejected"], 0, "{result}");
}
