//! Clocks (issue 21, items 5 and 6; docs/DECISIONS.md 20): real `iris serve`
//! processes whose wall clock the test steps while they run (libfaketime,
//! tests::faketime; the monotonic clock stays real, as when NTP steps the
//! wall clock). Every deadline is on the monotonic clock, so:
//! - a +6 min step closes no live connection ("idle timeout") and no
//!   connection still before its HELLO;
//! - a -1 h step keeps no connection open past its HELLO deadline;
//! - a +6 min step on a primary does not flip its pair to degraded.
//!
//! And a core node whose etcd refuses connections backs off between attempts
//! instead of spinning on them.
//!
//! Each test checks that its step reached the server (WELCOME's
//! `server_time_ms` is the server's wall clock) or that the node really
//! tries etcd, so none can pass by not testing anything.

use std::io::Read;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tests::faketime::FakeClock;
use tests::*;

/// The forward step: past the 5 min default idle timeout.
const FORWARD_STEP_SECS: i64 = 6 * 60;
/// The backward step.
const BACKWARD_STEP_SECS: i64 = -3600;
/// How long the test watches after a step: the sweeps that close idle
/// connections run every second (engine::runtime SWEEP_EVERY).
const AFTER_STEP: Duration = Duration::from_secs(3);
/// Logged-in connections that must survive a forward step.
const LIVE: usize = 10;
/// Connections before their HELLO that must survive a forward step.
const WAITING: usize = 5;
/// A HELLO deadline far longer than the test's watch (`--hello-timeout-ms`):
/// only a step can make it pass.
const HELLO_TIMEOUT_LONG_MS: &str = "30000";
/// A short HELLO deadline, that a backward step must not push away.
const HELLO_TIMEOUT_SHORT_MS: u64 = 2000;
/// Slack over a deadline on this small, shared machine (a sweep every
/// second, scheduling): generous, and still far below a 1 h step.
const DEADLINE_SLACK: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

fn real_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .expect("the test machine's clock reads after 1970")
}

/// Asserts that the server's wall clock (WELCOME's server_time_ms) is off
/// the real one by about `step_secs`: the step reached the process.
fn assert_stepped(server_time_ms: u64, step_secs: i64) {
    let off_ms = server_time_ms as i64 - real_now_ms() as i64;
    let want_ms = step_secs * 1000;
    assert!(
        (off_ms - want_ms).abs() < 60_000,
        "the server's wall clock is off by {off_ms} ms, not the {want_ms} ms step: \
         libfaketime did not reach it"
    );
}

/// A client whose connection must still be open and served: PING, PONG.
fn assert_served(client: &mut Client, who: &str, nonce: u64) {
    client.ping(nonce).expect("ping");
    client.flush().expect("flush");
    match client.recv(EVENT_TIMEOUT) {
        Ok(Some(Event::Pong { nonce: got })) if got == nonce => {}
        other => panic!("{who}: expected PONG after the step, got {other:?}"),
    }
}

/// Red before DECISIONS 20 (checked: all 10 live connections got ERROR 6
/// "idle timeout" and the 5 waiting ones "no HELLO in time" within the
/// watch, on the wall-clock code).
#[test]
fn a_forward_step_of_the_wall_clock_cuts_no_connection() {
    let clock = FakeClock::new();
    let server = Server::start_with_env(
        &unique_temp_path("data"),
        &clock.env(),
        &["--hello-timeout-ms", HELLO_TIMEOUT_LONG_MS],
    );
    let mut live: Vec<Client> = (0..LIVE)
        .map(|i| connect(server.addr(), &format!("live{i}")).0)
        .collect();
    let mut waiting: Vec<Client> = (0..WAITING).map(|_| connect_raw(server.addr())).collect();

    clock.set_offset_secs(FORWARD_STEP_SECS);
    thread::sleep(AFTER_STEP);

    for (i, client) in live.iter_mut().enumerate() {
        assert_served(client, &format!("live{i}"), i as u64);
    }
    let (first, rest) = live.split_at_mut(1);
    round_trip(&mut first[0], "live0", &mut rest[0], "live1");
    for (i, client) in waiting.iter_mut().enumerate() {
        let user = format!("late{i}");
        let welcome = client
            .hello(&user, b"token")
            .unwrap_or_else(|e| panic!("{user}: HELLO after the step failed: {e:?}"));
        assert_stepped(welcome.server_time_ms, FORWARD_STEP_SECS);
    }
}

/// Red before DECISIONS 20 (checked: on the wall-clock code no connection
/// got its ERROR within the deadline and the slack; the first read timed
/// out with nothing).
#[test]
fn a_backward_step_keeps_no_connection_past_its_hello_deadline() {
    let clock = FakeClock::new();
    let server = Server::start_with_env(
        &unique_temp_path("data"),
        &clock.env(),
        &["--hello-timeout-ms", &HELLO_TIMEOUT_SHORT_MS.to_string()],
    );
    let connected = Instant::now();
    let mut waiting: Vec<TcpStream> = (0..WAITING)
        .map(|_| TcpStream::connect(server.addr()).expect("connect"))
        .collect();
    clock.set_offset_secs(BACKWARD_STEP_SECS);

    let limit = Duration::from_millis(HELLO_TIMEOUT_SHORT_MS) + DEADLINE_SLACK;
    for (i, stream) in waiting.iter_mut().enumerate() {
        let left = limit.saturating_sub(connected.elapsed());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("read timeout");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            answer.len() >= 8,
            "connection {i}: still open {:?} after connecting, its HELLO deadline \
             {HELLO_TIMEOUT_SHORT_MS} ms (got {answer:?})",
            connected.elapsed()
        );
        assert_eq!(
            answer[4], 0x7F,
            "connection {i}: an ERROR frame, got {answer:?}"
        );
        let code = u16::from_le_bytes([answer[5], answer[6]]);
        assert_eq!(code, error_code::IDLE_TIMEOUT, "connection {i}");
        let reason = String::from_utf8_lossy(&answer[8..]);
        assert!(
            reason.contains("no HELLO in time"),
            "connection {i}: {reason}"
        );
    }
    let (_, welcome) = connect(server.addr(), "after");
    assert_stepped(welcome.server_time_ms, BACKWARD_STEP_SECS);
}

fn replication_stats(admin: &engine::admin_http::AdminClient) -> Value {
    let (status, body) = admin
        .call("GET", "/replication/stats")
        .unwrap_or_else(|e| panic!("GET /replication/stats: {e}"));
    assert_eq!(status, 200, "stats: {body}");
    serde_json::from_str(&body).expect("stats are JSON")
}

/// Red before DECISIONS 20 (checked: the wall-clock primary logged "replica
/// lost: DEGRADED" right after the step and its mode read `degraded`, then
/// `replica` again once the next heartbeat was heard).
#[test]
fn a_forward_step_on_the_primary_does_not_degrade_the_pair() {
    let clock = FakeClock::new();
    let mut args = vec![
        "--replication-listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend(FAST_FAILURE_DETECTION);
    let primary = Server::start_with_env(&unique_temp_path("primary"), &clock.env(), &args);
    let repl = primary.stdout_line("iris replication listening on ");
    let admin = tests::admin_of(
        &primary.stdout_line("iris admin listening on "),
        primary.data_dir(),
    );
    let mut replica_args = vec!["--replica-of", repl.as_str()];
    replica_args.extend(FAST_FAILURE_DETECTION);
    let _replica = Server::start(&replica_args);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while replication_stats(&admin)["mode"] != "replica" {
        assert!(Instant::now() < deadline, "the pair never formed");
        thread::sleep(POLL);
    }
    let (mut sender, _) = connect(primary.addr(), "pair-sender");
    send_stored(&mut sender, "pair-recipient", b"before the step");

    clock.set_offset_secs(FORWARD_STEP_SECS);
    let watch = Instant::now();
    while watch.elapsed() < AFTER_STEP {
        let stats = replication_stats(&admin);
        assert_eq!(stats["mode"], "replica", "after the step: {stats}");
        thread::sleep(POLL);
    }
    let log = primary.log_tail_full();
    assert!(!log.contains("DEGRADED"), "the primary degraded:\n{log}");
    send_stored(&mut sender, "pair-recipient", b"after the step");
    let (_, welcome) = connect(primary.addr(), "pair-probe");
    assert_stepped(welcome.server_time_ms, FORWARD_STEP_SECS);
}

/// Kernel clock ticks a second (`getconf CLK_TCK`), the unit of /proc/PID/stat times.
fn clock_ticks_per_sec() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("CLK_TCK is a number")
}

/// CPU time (user + system, in clock ticks) of process `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("(comm)") + 2..]
        .split_whitespace()
        .collect();
    let field = |n: usize| -> u64 { fields[n - 3].parse().expect("a number") };
    field(14) + field(15) // utime, stime
}

/// How long the CPU use of an idle node is measured.
const CPU_MEASURE: Duration = Duration::from_secs(4);
/// Startup (WAL, cores, listeners) is not what this test measures.
const CPU_WARM_UP: Duration = Duration::from_secs(1);
/// The most CPU a node whose etcd is unreachable may use (of one core).
const CPU_SHARE_MAX: f64 = 0.05;

/// A core node whose etcd refuses every connection retries with a backoff
/// (engine::election RETRY_BACKOFF_*), nearly idle. Red before it (checked:
/// the control thread asked etcd again at once after each failure and the
/// node used well above the bound).
#[test]
fn a_core_node_whose_etcd_refuses_connections_stays_nearly_idle() {
    let dir = unique_temp_path("etcd-refused");
    std::fs::create_dir_all(&dir).expect("dir");
    // Nothing listens there: every connect is refused at once.
    let etcd = free_loopback_addr();
    let [client, link, replication, admin] = std::array::from_fn(|_| free_loopback_addr());
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        format!(
            "etcd = \"http://{etcd}\"\n\n[[pairs]]\nname = \"p0\"\nslots = [\"0-16383\"]\n\n\
             [[pairs.nodes]]\nname = \"c0\"\nclient = \"{client}\"\nlink = \"{link}\"\n\
             replication = \"{replication}\"\nadmin = \"{admin}\"\n"
        ),
    )
    .expect("cluster file");
    let server = Server::start(&[
        "--role",
        "core",
        "--cluster",
        file.to_str().expect("utf-8 path"),
        "--node",
        "c0",
    ]);
    thread::sleep(CPU_WARM_UP);
    let (ticks_before, started) = (cpu_ticks(server.pid()), Instant::now());
    thread::sleep(CPU_MEASURE);
    let ticks = cpu_ticks(server.pid()) - ticks_before;
    let cpu_secs = ticks as f64 / clock_ticks_per_sec() as f64;
    let share = cpu_secs / started.elapsed().as_secs_f64();
    eprintln!(
        "etcd refusing connections: the node used {:.2} % of a CPU over {CPU_MEASURE:?}",
        share * 100.0
    );
    let log = server.log_tail_full();
    assert!(
        log.contains("etcd request failed"),
        "the node never tried etcd:\n{log}"
    );
    assert!(
        share < CPU_SHARE_MAX,
        "a node whose etcd refuses connections used {:.1} % of a CPU",
        share * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
