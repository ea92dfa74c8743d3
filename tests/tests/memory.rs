//! The memory limits bound what they name: a shard filled to
//! `shard_pending_bytes_max` with the cheapest messages there are (1-byte
//! bodies, the worst case for per-message overhead; and one message per new
//! user, the worst case for per-user overhead) holds RssAnon within 10 % of
//! the configured bounds.

use std::time::Duration;

use engine::dedup::Dedup;
use tests::{connect, new_msg_id, reject_code, Client, Event, Server, EVENT_TIMEOUT};

const PENDING_BYTES_MAX: usize = 64 << 20;
const DEDUP_ENTRIES_MAX: usize = 20_000;
/// Unanswered SENDs kept in flight while filling.
const WINDOW: usize = 512;
/// The server's RssAnon may exceed the configured bounds by this much.
const SLACK: f64 = 0.10;

/// Sends 1-byte messages, recipients chosen by `to(i)`, until the shard
/// refuses with "shard pending memory full"; returns how many were STORED.
fn fill(client: &mut Client, to: impl Fn(usize) -> String) -> usize {
    let (mut sent, mut answered, mut stored) = (0usize, 0usize, 0usize);
    let mut full = false;
    while !full || answered < sent {
        while !full && sent - answered < WINDOW {
            client.send(new_msg_id(), &to(sent), b"x").expect("send");
            sent += 1;
        }
        client.flush().expect("flush");
        match client.recv(EVENT_TIMEOUT).expect("recv") {
            Some(Event::Stored { .. }) => stored += 1,
            Some(Event::Rejected { code, reason, .. }) => {
                assert_eq!(code, reject_code::UNAVAILABLE, "{reason}");
                assert_eq!(reason, "shard pending memory full");
                full = true;
            }
            other => panic!("expected STORED or REJECTED, got {other:?}"),
        }
        answered += 1;
        assert!(sent < 50_000_000, "the limit never refused anything");
    }
    stored
}

fn check_bound(case: &str, to: impl Fn(usize) -> String) {
    let limit = PENDING_BYTES_MAX.to_string();
    let dedup = DEDUP_ENTRIES_MAX.to_string();
    let server = Server::start(&[
        "--cores",
        "1",
        "--shard-pending-bytes-max",
        &limit,
        "--dedup-entries-max",
        &dedup,
        "--inbox-users-max",
        "10000000",
        // One sender fills the shard as fast as it can: no rate limit here.
        "--sends-per-user-per-sec",
        "4000000000",
        "--send-burst-per-user",
        "4000000000",
    ]);
    let (mut alice, _) = connect(server.addr(), "alice");
    std::thread::sleep(Duration::from_millis(200));
    let start_kib = server.status_kib("RssAnon");
    let stored = fill(&mut alice, to);
    std::thread::sleep(Duration::from_millis(1000));
    let end_kib = server.status_kib("RssAnon");
    let grown = (end_kib.saturating_sub(start_kib) * 1024) as f64;
    let bound = (PENDING_BYTES_MAX + Dedup::heap_bytes_max(DEDUP_ENTRIES_MAX)) as f64;
    eprintln!(
        "{case}: {stored} messages stored; RssAnon {start_kib} -> {end_kib} KiB, grew {:.1} MiB, \
         bound {:.1} MiB ({:.0} bytes a message)",
        grown / 1048576.0,
        bound / 1048576.0,
        grown / stored as f64
    );
    assert!(
        grown <= bound * (1.0 + SLACK),
        "{case}: RssAnon grew {grown} bytes for {stored} messages, over the bounds {bound} + 10 %"
    );
    // The fill really reached the limit: memory tracks it (a limit that
    // refused early, or counted far more than it holds, would be caught here).
    assert!(
        grown >= bound * 0.75,
        "{case}: RssAnon grew only {grown} bytes against a bound of {bound}: the limit overcounts"
    );
}

#[test]
fn one_byte_messages_fill_the_pending_limit_within_ten_percent() {
    check_bound("1-byte messages to 64 users", |i| format!("user{}", i % 64));
}

#[test]
fn one_message_per_new_user_fills_the_pending_limit_within_ten_percent() {
    check_bound("one 1-byte message to each new user", |i| format!("u{i}"));
}
