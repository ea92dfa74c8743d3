//! Runs the `mqtt-bench` binary against a small in-process fake MQTT broker
//! (thread per connection, frames through the `mqtt` codec), so the driver's
//! bookkeeping is checked without a real broker: every PUBLISH answered is
//! counted, and a broker that refuses the CONNECT, or answers a PUBACK for a
//! packet id nobody sent, fails the run.

use mqtt::{ConnAck, ConnectReturnCode, Packet};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy)]
enum Broker {
    /// CONNACK 0, then a PUBACK for every QoS 1 PUBLISH.
    Correct,
    /// CONNACK 5 (not authorized).
    Refuses,
    /// Like Correct, but the 50th PUBACK of a connection names a packet id
    /// that is not in flight.
    WrongPubAck,
}

/// Starts the fake; returns its address and the PUBLISHes it answered.
fn start_fake(broker: Broker) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let counter = counter.clone();
            std::thread::spawn(move || serve(stream, broker, &counter));
        }
    });
    (addr, answered)
}

fn serve(mut stream: TcpStream, broker: Broker, answered: &AtomicU64) {
    stream.set_nodelay(true).unwrap();
    let limits = mqtt::Limits::default();
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let mut pubacks = 0u64;
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let (mut used, mut out) = (0, Vec::new());
        while let Some((packet, len)) = mqtt::decode(&buf[used..], &limits).unwrap() {
            used += len;
            match packet {
                Packet::Connect(_) => {
                    let code = match broker {
                        Broker::Refuses => ConnectReturnCode::NotAuthorized,
                        _ => ConnectReturnCode::Accepted,
                    };
                    let ack = ConnAck {
                        session_present: false,
                        code,
                    };
                    mqtt::encode(&Packet::ConnAck(ack), &mut out);
                }
                Packet::Publish(p) => {
                    pubacks += 1;
                    let wrong = matches!(broker, Broker::WrongPubAck) && pubacks == 50;
                    // 1,000 ids on: never among the 4 in flight.
                    let packet_id = if wrong {
                        p.packet_id.wrapping_add(1000).max(1)
                    } else {
                        p.packet_id
                    };
                    mqtt::encode(&Packet::PubAck { packet_id }, &mut out);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Packet::Disconnect => return,
                other => panic!("the driver sent {:?}", other.packet_type()),
            }
        }
        buf.drain(..used);
        if stream.write_all(&out).is_err() {
            return;
        }
    }
}

/// Runs mqtt-bench; returns its exit success and its JSON.
fn mqtt_bench(addr: SocketAddr) -> (bool, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_mqtt-bench"))
        .args(["--addr", &addr.to_string()])
        .args(["--conns", "6", "--threads", "2", "--inflight", "4"])
        .args(["--duration", "700ms", "--warmup", "200ms"])
        .output()
        .expect("mqtt-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report)
}

#[test]
fn counts_the_pubacks_of_every_connection() {
    let (addr, answered) = start_fake(Broker::Correct);
    let (ok, report) = mqtt_bench(addr);
    assert!(ok, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    let pubacks = report["pubacks"].as_u64().unwrap();
    let total = report["pubacks_total"].as_u64().unwrap();
    assert!(pubacks > 100 && pubacks <= total, "{report}");
    // Every PUBACK the driver counted was one the fake sent; at most the
    // last window of each connection (6 × 4) was answered after it stopped.
    let sent = answered.load(Ordering::Relaxed);
    assert!(
        total <= sent && sent <= total + 24,
        "{sent} answered: {report}"
    );
    assert!(report["puback_p50_us"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn a_refused_connect_fails_the_run() {
    let (addr, _) = start_fake(Broker::Refuses);
    let (ok, report) = mqtt_bench(addr);
    assert!(!ok, "{report}");
    let sample = report["error_samples"][0].as_str().unwrap_or_default();
    assert!(sample.contains("CONNACK 5"), "{report}");
}

#[test]
fn a_puback_for_an_id_not_in_flight_fails_the_run() {
    let (addr, _) = start_fake(Broker::WrongPubAck);
    let (ok, report) = mqtt_bench(addr);
    assert!(!ok, "{report}");
    let sample = report["error_samples"][0].as_str().unwrap_or_default();
    assert!(sample.contains("not in flight"), "{report}");
}
