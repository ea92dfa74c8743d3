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

/// A client whose frames arrive in pieces (one byte per write, then seven:
/// whole frames and parts of the next in one read) is served exactly as one
/// that writes whole frames: its bytes wait parked between reads and are
/// decoded once complete.
#[test]
fn frames_in_pieces_are_parked_and_decoded_when_whole() {
    let server = Server::start(&["--cores", "2"]);
    for piece in [1usize, 7] {
        let mut stream = TcpStream::connect(server.addr()).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let user = format!("pieces{piece}");
        let mut bytes = tests::raw::hello(1, user.as_bytes(), b"token");
        let ids: Vec<[u8; 16]> = (0..3).map(|_| new_msg_id()).collect();
        for id in &ids {
            bytes.extend(tests::raw::send(id, b"bob", b"in pieces"));
        }
        for chunk in bytes.chunks(piece) {
            stream.write_all(chunk).expect("write");
            std::thread::sleep(Duration::from_millis(2));
        }
        // WELCOME, then one STORED per SEND, in order.
        let limits = net::Limits::default();
        let (mut buf, mut frames) = (Vec::new(), Vec::new());
        while frames.len() < 4 {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).expect("read");
            assert!(n > 0, "piece {piece}: closed after {} frames", frames.len());
            buf.extend_from_slice(&chunk[..n]);
            while let Some((frame, used)) =
                net::decode_server_frame(&buf, &limits).expect("valid frame")
            {
                frames.push(format!("{frame:?}"));
                buf.drain(..used);
            }
        }
        assert!(
            frames[0].starts_with("Welcome"),
            "piece {piece}: {frames:?}"
        );
        for (id, frame) in ids.iter().zip(&frames[1..]) {
            assert_eq!(
                frame,
                &format!("{:?}", net::ServerFrame::Stored { msg_id: *id })
            );
        }
    }
    let (_bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 6);
}

/// Past its SEND rate a user gets REJECTED 3 and keeps its connection; the
/// bucket refills at the configured rate.
#[test]
fn a_user_over_its_send_rate_gets_rejected_3_and_stays_connected() {
    let server = Server::start(&[
        "--sends-per-user-per-sec",
        "20",
        "--send-burst-per-user",
        "10",
    ]);
    let (mut alice, _) = connect(server.addr(), "alice");
    for _ in 0..40 {
        alice.send(new_msg_id(), "bob", b"spam").expect("queue");
    }
    alice.flush().expect("flush");
    let (mut stored, mut limited) = (0, 0);
    while stored + limited < 40 {
        match next_event(&mut alice) {
            Event::Stored { .. } => stored += 1,
            Event::Rejected { code, reason, .. } => {
                assert_eq!(code, tests::reject_code::RATE_LIMITED, "{reason}");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A slow machine refills a few tokens while it reads the 40 SENDs.
    assert!(
        (10..=25).contains(&stored),
        "{stored} STORED of a burst of 10"
    );
    assert!(limited >= 15, "only {limited} REJECTED 3");
    assert_eq!(stored + limited, 40);
    // Still connected; half a second refills 10 tokens.
    std::thread::sleep(Duration::from_millis(600));
    tests::send_stored(&mut alice, "bob", b"after the pause");
    // Another user has a bucket of its own.
    let (mut carol, _) = connect(server.addr(), "carol");
    tests::send_stored(&mut carol, "bob", b"carol is not limited by alice");
}

fn expect_turned_away(addr: &str, reason: &str) {
    let mut c = tests::connect_raw(addr);
    match next_event(&mut c) {
        Event::Error { code, reason: got } => {
            assert_eq!(code, error_code::TOO_MANY_CONNECTIONS, "{got}");
            assert!(got.contains(reason), "{got:?} should say {reason:?}");
        }
        other => panic!("expected ERROR 7, got {other:?}"),
    }
}

#[test]
fn an_address_is_bounded_in_open_connections() {
    let server = Server::start(&["--connections-per-address-max", "3"]);
    let mut held: Vec<_> = (0..3)
        .map(|i| connect(server.addr(), &format!("u{i}")).0)
        .collect();
    expect_turned_away(server.addr(), "too many connections from this address");
    held.pop();
    // The close is seen by the server shortly after.
    let deadline = Instant::now() + NOT_STARVED;
    loop {
        match tests::Client::connect(server.addr(), "again", b"", Duration::from_secs(5)) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "slot not given back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_address_is_bounded_in_new_connections_per_second() {
    let server = Server::start(&["--new-connections-per-address-per-sec", "5"]);
    // 20 connections at once (well under a second, or two at worst): about
    // 5 per second are admitted, the rest turned away at accept.
    let mut conns: Vec<_> = (0..20).map(|_| tests::connect_raw(server.addr())).collect();
    let (mut turned, mut admitted) = (0, 0);
    for c in conns.iter_mut() {
        match c.recv(Duration::from_millis(500)) {
            Ok(Some(Event::Error { code, reason })) => {
                assert_eq!(code, error_code::TOO_MANY_CONNECTIONS);
                assert!(reason.contains("connecting too fast"), "{reason}");
                turned += 1;
            }
            Ok(None) => admitted += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(turned >= 5, "only {turned} of 20 turned away");
    assert!(admitted >= 5, "only {admitted} admitted");
}
