//! Connections that hold part of a frame cannot starve anyone: a thousand
//! peers that each sent one byte (more than the cores' read-buffer pools
//! hold: 2 x 256) leave logged-in clients and new logins served as usual,
//! and a connection that never completes its HELLO is closed after
//! hello_timeout_ms.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tests::{connect, error_code, new_msg_id, next_event, Event, Server};

const HOLDERS: usize = 1000;
/// Far above a STORED's latency on this machine (sub-millisecond to a few
/// ms), far below the idle timeout a starved client used to wait for.
const NOT_STARVED: Duration = Duration::from_secs(5);

fn one_byte_holders(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            // The first byte of a frame's length: an incomplete frame.
            s.write_all(&[9]).expect("one byte");
            s
        })
        .collect()
}

#[test]
fn one_byte_connections_starve_nobody() {
    // The HELLO deadline far away: only the read path is under test here.
    let server = Server::start(&["--cores", "2", "--hello-timeout-ms", "600000"]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let holders = one_byte_holders(server.addr(), HOLDERS);
    // Give the server time to read every one of them.
    std::thread::sleep(Duration::from_millis(500));

    for i in 0..200 {
        let msg_id = new_msg_id();
        let sent = Instant::now();
        alice
            .send(msg_id, "bob", format!("m{i}").as_bytes())
            .expect("send");
        alice.flush().expect("flush");
        match next_event(&mut alice) {
            Event::Stored { msg_id: id } if id == msg_id => {}
            other => panic!("expected STORED, got {other:?}"),
        }
        assert!(
            sent.elapsed() < NOT_STARVED,
            "STORED #{i} took {:?} while {HOLDERS} peers held one byte each",
            sent.elapsed()
        );
    }
    // A new login goes through too.
    let (_bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 200);
    drop(holders);
}

#[test]
fn a_connection_without_hello_is_closed_after_the_deadline() {
    let server = Server::start(&["--cores", "2", "--hello-timeout-ms", "1000"]);
    let mut holders = one_byte_holders(server.addr(), 20);
    // None of the holders completes a HELLO: each gets ERROR 6 and a close.
    for (i, holder) in holders.iter_mut().enumerate() {
        holder
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut answer = Vec::new();
        let _ = holder.read_to_end(&mut answer);
        assert!(answer.len() >= 7, "holder {i}: closed without an ERROR");
        assert_eq!(answer[4], 0x7F, "holder {i}: {answer:?}");
        let code = u16::from_le_bytes([answer[5], answer[6]]);
        assert_eq!(code, error_code::IDLE_TIMEOUT, "holder {i}");
        let reason = String::from_utf8_lossy(&answer[8..]);
        assert!(reason.contains("no HELLO in time"), "holder {i}: {reason}");
    }
}
