//! Runs the `iris-bench` binary against a small in-process fake Iris server
//! (thread per connection, PROTOCOL.md v1 frames through the `net` codec), so
//! the drivers' bookkeeping is checked without the real engine: exactly-once
//! must hold when the server delivers once, and must fail when it delivers twice.

use net::{ClientFrame, Limits, ServerFrame, PROTOCOL_VERSION};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// What the fake does with each SEND.
#[derive(Clone, Copy)]
enum Behaviour {
    /// STORED, then one DELIVER to the recipient if online.
    Correct,
    /// Like Correct, but every 100th message is delivered twice.
    DuplicateSome,
}

#[derive(Default)]
struct Inboxes {
    /// Online recipients: the write half and the last seq given out.
    online: HashMap<String, (TcpStream, u64)>,
}

fn start_fake(behaviour: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let inboxes = Arc::new(Mutex::new(Inboxes::default()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let inboxes = inboxes.clone();
            std::thread::spawn(move || serve(stream, behaviour, &inboxes));
        }
    });
    addr
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, inboxes: &Mutex<Inboxes>) {
    stream.set_nodelay(true).unwrap();
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut user = String::new();
    let mut sent = 0u64;
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        let mut out = Vec::new();
        while let Some((frame, len)) = net::decode_client_frame(&buf[used..], &limits).unwrap() {
            used += len;
            match frame {
                ClientFrame::Hello { user: u, .. } => {
                    user = u.to_string();
                    let welcome = ServerFrame::Welcome {
                        version: PROTOCOL_VERSION,
                        server_time_ms: 0,
                        max_frame: limits.frame_len_max,
                        pending: 0,
                    };
                    net::encode_server_frame(&welcome, &mut out);
                    let writer = stream.try_clone().unwrap();
                    inboxes
                        .lock()
                        .unwrap()
                        .online
                        .insert(user.clone(), (writer, 0));
                }
                ClientFrame::Send { msg_id, to, body } => {
                    sent += 1;
                    let times = match behaviour {
                        Behaviour::DuplicateSome if sent % 100 == 99 => 2,
                        _ => 1,
                    };
                    deliver(inboxes, to, &user, msg_id, body, times);
                    net::encode_server_frame(&ServerFrame::Stored { msg_id }, &mut out);
                }
                ClientFrame::Ack { .. } | ClientFrame::Ping { .. } => {}
                ClientFrame::Bye => return,
            }
        }
        buf.drain(..used);
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

fn deliver(
    inboxes: &Mutex<Inboxes>,
    to: &str,
    from: &str,
    msg_id: net::MsgId,
    body: &[u8],
    times: usize,
) {
    let mut inboxes = inboxes.lock().unwrap();
    let Some((writer, seq)) = inboxes.online.get_mut(to) else {
        return;
    };
    let mut out = Vec::new();
    for _ in 0..times {
        *seq += 1;
        let frame = ServerFrame::Deliver {
            seq: *seq,
            msg_id,
            from,
            sent_ms: 0,
            body,
        };
        net::encode_server_frame(&frame, &mut out);
    }
    let _ = writer.write_all(&out);
}

fn iris_bench(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_iris-bench"))
        .args(args)
        .output()
        .expect("iris-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "iris-bench {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn msgs_args(addr: &str, online: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "msgs",
        "--addr",
        addr,
        "--conns",
        "4",
        "--inflight",
        "8",
        "--size",
        "100",
        "--duration",
        "700ms",
        "--warmup",
        "200ms",
        "--threads",
        "2",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !online {
        args.push("--offline".to_string());
    }
    args
}

fn run_msgs(addr: SocketAddr, online: bool) -> Value {
    let addr = addr.to_string();
    let args = msgs_args(&addr, online);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    iris_bench(&args)
}

#[test]
fn msgs_online_counts_every_message_delivered_once() {
    let report = run_msgs(start_fake(Behaviour::Correct), true);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(
        report["stored_per_sec"].as_f64().unwrap() > 100.0,
        "{report}"
    );
    assert!(report["stored_total"].as_u64().unwrap() >= report["stored"].as_u64().unwrap());
    assert_eq!(report["exactly_once"], true, "{report}");
    assert_eq!(report["delivered"], report["stored_total"], "{report}");
    assert_eq!(report["unanswered"], 0);
    assert!(report["ack_p50_us"].as_f64().unwrap() > 0.0);
    assert!(report["e2e_p50_us"].as_f64().unwrap() > 0.0);
    assert!(report["driver_cpu_us_per_msg"].as_f64().unwrap() > 0.0);
    assert!(
        report["server_cpu_us_per_msg"].is_null(),
        "no --server-pid given"
    );
}

#[test]
fn msgs_online_notices_duplicate_deliveries() {
    let report = run_msgs(start_fake(Behaviour::DuplicateSome), true);
    assert_eq!(report["exactly_once"], false, "{report}");
    assert!(
        report["duplicate_deliveries"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["seq_gaps"].as_u64().unwrap() == 0,
        "seqs stay consecutive: {report}"
    );
}

#[test]
fn msgs_offline_stores_without_delivery_checks() {
    let report = run_msgs(start_fake(Behaviour::Correct), false);
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["stored"].as_u64().unwrap() > 0);
    assert!(report["exactly_once"].is_null());
    assert!(report["e2e_p50_us"].is_null());
    assert_eq!(report["delivered"], 0);
}

#[test]
fn flood_holds_connections_and_measures_the_server() {
    let addr = start_fake(Behaviour::Correct).to_string();
    let pid = std::process::id().to_string();
    let report = iris_bench(&[
        "flood",
        "--addr",
        &addr,
        "--conns",
        "200",
        "--procs",
        "2",
        "--rate",
        "0",
        "--hold",
        "200ms",
        "--settle",
        "100ms",
        "--server-pid",
        &pid,
        "--json",
    ]);
    assert_eq!(report["conns_ok"], 200, "{report}");
    assert_eq!(report["conns_failed"], 0);
    assert_eq!(report["procs"], 2);
    // The fake's threads hold stacks: it costs something per connection.
    assert!(
        report["server_rss_bytes_per_conn"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["kernel_slab_holding_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn refuses_addresses_off_loopback() {
    let output = Command::new(env!("CARGO_BIN_EXE_iris-bench"))
        .args(["msgs", "--addr", "192.0.2.1:7070", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"));
}
