//! Durability: graceful restart, kill -9, dedup across restarts.

use std::collections::HashSet;

use tests::{
    ack_and_sync, collect_and_ack, collect_deliveries, connect, error_code,
    expect_error_then_close, expect_quiet, hex, new_msg_id, next_event, pipeline_stored_to,
    send_id_stored, send_stored, Event, MsgId, Server,
};

#[test]
fn graceful_restart_keeps_messages_and_acks() {
    let mut server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let ids: Vec<MsgId> = (0..6)
        .map(|i| send_stored(&mut alice, "bob", format!("before restart {i}").as_bytes()))
        .collect();

    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 6);
    collect_deliveries(&mut bob, 6);
    ack_and_sync(&mut bob, 2);
    bob.bye().expect("bye");
    drop(bob);
    // Reconnect to see the ACK took effect before the shutdown.
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 4);
    collect_deliveries(&mut bob, 4);

    let status = server.terminate();
    assert!(status.success(), "SIGTERM exit status: {status}");
    expect_error_then_close(&mut alice, error_code::SHUTTING_DOWN);
    expect_error_then_close(&mut bob, error_code::SHUTTING_DOWN);

    server.restart();
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 4, "ACKed messages must stay consumed");
    let delivered = collect_deliveries(&mut bob, 4);
    for (d, i) in delivered.iter().zip(2..) {
        assert_eq!(d.seq, i as u64 + 1);
        assert_eq!(d.msg_id, ids[i]);
        assert_eq!(d.from, "alice");
        assert_eq!(d.body, format!("before restart {i}").as_bytes());
    }
    expect_quiet(&mut bob);

    // Sequence numbers continue across the restart.
    let (mut alice, _) = connect(server.addr(), "alice");
    let next = send_stored(&mut alice, "bob", b"after restart");
    let d = collect_deliveries(&mut bob, 1).remove(0);
    assert_eq!((d.seq, d.msg_id), (7, next));
}

/// Pipelines `count` SENDs alternating between two offline recipients (two
/// inboxes, possibly on two shards), kill -9 right after the
/// last STORED, restarts, and checks each recipient gets its own messages
/// exactly once, in order.
fn kill9_round(round: usize, count: usize) {
    let mut server = Server::start(&[]);
    let recipients = ["bob", "carol"];
    let (mut alice, _) = connect(server.addr(), "alice");
    let messages: Vec<(&str, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                recipients[i % 2],
                format!("round {round} message {i}").into_bytes(),
            )
        })
        .collect();
    let borrowed: Vec<(&str, &[u8])> = messages.iter().map(|(to, b)| (*to, b.as_slice())).collect();
    // Window = count: every SEND goes out before the first answer is read.
    let ids = pipeline_stored_to(&mut alice, &borrowed, count);
    let mut sent: [Vec<(MsgId, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
    for (i, (id, (_, body))) in ids.into_iter().zip(messages).enumerate() {
        sent[i % 2].push((id, body));
    }
    server.kill9();
    drop(alice);
    server.restart();

    for (to, expected) in recipients.iter().zip(&sent) {
        let (mut client, welcome) = connect(server.addr(), to);
        assert_eq!(
            welcome.pending,
            expected.len() as u64,
            "round {round}: {to} pending after kill -9"
        );
        let delivered = collect_and_ack(&mut client, expected.len());
        for (i, (d, (id, body))) in delivered.iter().zip(expected).enumerate() {
            assert_eq!(d.seq, i as u64 + 1, "round {round}: {to} seq");
            assert_eq!(
                d.msg_id, *id,
                "round {round}: {to} message #{i} lost or reordered"
            );
            assert_eq!(&d.body, body);
        }
    }
}

#[test]
fn kill9_after_last_stored_loses_nothing() {
    for round in 0..5 {
        kill9_round(round, 1000);
    }
}

/// kill -9 while SENDs are still in flight: every STORED message survives,
/// exactly once; unanswered ones may or may not, but never out of order.
#[test]
fn kill9_mid_pipeline_keeps_every_stored_message() {
    const COUNT: usize = 2000;
    const KILL_AFTER_STORED: usize = 1000;
    let mut server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let ids: Vec<MsgId> = (0..COUNT).map(|_| new_msg_id()).collect();
    for (i, id) in ids.iter().enumerate() {
        alice
            .send(*id, "bob", format!("in flight {i}").as_bytes())
            .expect("send");
    }
    alice.flush().expect("flush");
    let mut stored = HashSet::new();
    while stored.len() < KILL_AFTER_STORED {
        match next_event(&mut alice) {
            Event::Stored { msg_id } => assert!(stored.insert(msg_id), "STORED twice"),
            other => panic!("expected STORED, got {other:?}"),
        }
    }
    server.kill9();
    drop(alice);
    server.restart();

    let (mut bob, welcome) = connect(server.addr(), "bob");
    let pending = usize::try_from(welcome.pending).expect("pending fits usize");
    assert!(
        (KILL_AFTER_STORED..=COUNT).contains(&pending),
        "pending {pending}: STORED messages were lost"
    );
    let delivered = collect_and_ack(&mut bob, pending);
    let mut next_in_send_order = 0;
    for (i, d) in delivered.iter().enumerate() {
        assert_eq!(d.seq, i as u64 + 1);
        let pos = ids[next_in_send_order..]
            .iter()
            .position(|id| *id == d.msg_id)
            .unwrap_or_else(|| panic!("#{i} {} duplicated or out of order", hex(&d.msg_id)));
        next_in_send_order += pos + 1;
        stored.remove(&d.msg_id);
    }
    assert!(stored.is_empty(), "{} STORED messages lost", stored.len());
}

#[test]
fn dedup_survives_restarts() {
    let mut server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let x = send_stored(&mut alice, "bob", b"x");
    let y = send_stored(&mut alice, "bob", b"y");
    server.kill9();
    drop(alice);
    server.restart();

    // Retries after a crash (the sender cannot know) are STORED, not doubled.
    let (mut alice, _) = connect(server.addr(), "alice");
    send_id_stored(&mut alice, x, "bob", b"x");
    let z = send_stored(&mut alice, "bob", b"z");
    send_id_stored(&mut alice, y, "bob", b"y");
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 3);
    let delivered = collect_deliveries(&mut bob, 3);
    let got: Vec<(u64, MsgId)> = delivered.iter().map(|d| (d.seq, d.msg_id)).collect();
    assert_eq!(got, [(1, x), (2, y), (3, z)]);
    expect_quiet(&mut bob);

    // Consumed messages stay deduplicated after a graceful restart too.
    ack_and_sync(&mut bob, 3);
    bob.bye().expect("bye");
    drop(bob);
    assert!(server.terminate().success());
    drop(alice);
    server.restart();
    let (mut alice, _) = connect(server.addr(), "alice");
    for id in [x, y, z] {
        send_id_stored(&mut alice, id, "bob", b"retry");
    }
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(
        welcome.pending, 0,
        "a retried, already consumed message came back"
    );
    expect_quiet(&mut bob);
}
