//! Delivery: online and offline recipients, per-pair order, ACK, dedup.

use std::time::{SystemTime, UNIX_EPOCH};

use tests::{
    ack_and_sync, collect_deliveries, connect, expect_quiet, hex, new_msg_id, next_event,
    pipeline_stored, send_id_stored, send_stored, Event, Server,
};

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    u64::try_from(since_epoch.as_millis()).expect("ms fit u64")
}

#[test]
fn online_recipient_gets_deliver_with_all_fields() {
    let server = Server::start(&[]);
    let (mut bob, bob_welcome) = connect(server.addr(), "bob");
    assert_eq!(bob_welcome.version, 1);
    assert_eq!(bob_welcome.max_frame, 65536);
    assert_eq!(bob_welcome.pending, 0);
    let (mut alice, _) = connect(server.addr(), "alice");

    let before_ms = now_ms();
    let msg_id = send_stored(&mut alice, "bob", b"hello bob");
    let delivered = collect_deliveries(&mut bob, 1).remove(0);
    let after_ms = now_ms();

    assert_eq!(delivered.seq, 1);
    assert_eq!(delivered.msg_id, msg_id);
    assert_eq!(delivered.from, "alice");
    assert_eq!(delivered.body, b"hello bob");
    // Same host, same clock: a generous slack, only to catch a wrong unit or
    // an unset field, not to measure anything.
    let slack_ms = 60_000;
    assert!(
        delivered.sent_ms + slack_ms >= before_ms && delivered.sent_ms <= after_ms + slack_ms,
        "sent_ms {} not near now ({before_ms}..{after_ms})",
        delivered.sent_ms
    );
    expect_quiet(&mut bob);
}

#[test]
fn offline_recipient_gets_everything_in_order_on_login() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let ids: Vec<_> = (0..5)
        .map(|i| send_stored(&mut alice, "bob", format!("offline {i}").as_bytes()))
        .collect();

    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 5);
    let delivered = collect_deliveries(&mut bob, 5);
    for (i, d) in delivered.iter().enumerate() {
        assert_eq!(d.seq, i as u64 + 1);
        assert_eq!(d.msg_id, ids[i], "message #{i} out of order");
        assert_eq!(d.from, "alice");
        assert_eq!(d.body, format!("offline {i}").as_bytes());
    }
    expect_quiet(&mut bob);
}

#[test]
fn pipelined_sends_keep_per_pair_order() {
    const COUNT: usize = 300;
    let server = Server::start(&[]);
    let (mut bob, _) = connect(server.addr(), "bob");
    let (mut alice, _) = connect(server.addr(), "alice");

    let bodies: Vec<Vec<u8>> = (0..COUNT)
        .map(|i| format!("pipelined {i}").into_bytes())
        .collect();
    // Window = COUNT: every SEND goes out before the first answer is read.
    let ids = pipeline_stored(&mut alice, "bob", &bodies, COUNT);

    let delivered = collect_deliveries(&mut bob, COUNT);
    for (i, d) in delivered.iter().enumerate() {
        assert_eq!(d.seq, i as u64 + 1, "seq must start at 1 and grow by one");
        assert_eq!(d.msg_id, ids[i], "message #{i} out of send order");
        assert_eq!(d.body, bodies[i]);
    }
    expect_quiet(&mut bob);
}

#[test]
fn ack_consumes_and_reconnect_resends_the_rest() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    let ids: Vec<_> = (0..5)
        .map(|i| send_stored(&mut alice, "bob", format!("ack {i}").as_bytes()))
        .collect();

    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 5);
    let delivered = collect_deliveries(&mut bob, 5);
    assert_eq!(
        delivered.iter().map(|d| d.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    ack_and_sync(&mut bob, 3);
    bob.bye().expect("bye");
    drop(bob);

    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 2, "ACK 3 of 5 must leave 2 pending");
    let delivered = collect_deliveries(&mut bob, 2);
    assert_eq!((delivered[0].seq, delivered[0].msg_id), (4, ids[3]));
    assert_eq!((delivered[1].seq, delivered[1].msg_id), (5, ids[4]));
    expect_quiet(&mut bob);
    ack_and_sync(&mut bob, 5);
    bob.bye().expect("bye");
    drop(bob);

    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, 0);
    expect_quiet(&mut bob);

    // The sequence goes on after the consumed messages; it does not restart.
    let next = send_stored(&mut alice, "bob", b"after acks");
    let delivered = collect_deliveries(&mut bob, 1).remove(0);
    assert_eq!((delivered.seq, delivered.msg_id), (6, next));
}

/// PONG after an ACK means the ACK took effect on the user's shard, which
/// may be another core than the connection's: the next login, on whichever
/// core it lands, is not sent the acknowledged message again. Many rounds,
/// several recipients (so owners and connections fall on both cores); red
/// when PONG is answered before the ACK reached the shard.
#[test]
fn ack_then_pong_holds_for_the_next_login_on_any_core() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    for round in 0..150 {
        let user = format!("syncer{}", round % 6);
        let id = send_stored(&mut alice, &user, format!("round {round}").as_bytes());
        let (mut bob, welcome) = connect(server.addr(), &user);
        assert_eq!(
            welcome.pending, 1,
            "round {round}: only the new message pending"
        );
        let d = collect_deliveries(&mut bob, 1).remove(0);
        assert_eq!(d.msg_id, id);
        ack_and_sync(&mut bob, d.seq);
        bob.bye().expect("bye");
        drop(bob);
        let (mut again, welcome) = connect(server.addr(), &user);
        assert_eq!(
            welcome.pending, 0,
            "round {round}: a message ACKed before the PONG was pending again"
        );
        again.bye().expect("bye");
    }
}

/// PONGs come in PING order even when the first PING waits for an ACK on
/// another core's shard and the second has no ACK of its own before it.
#[test]
fn pongs_keep_ping_order_behind_an_ack() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(server.addr(), "alice");
    for round in 0..60u64 {
        let user = format!("orderer{}", round % 6);
        send_stored(&mut alice, &user, b"x");
        let (mut bob, _) = connect(server.addr(), &user);
        let d = collect_deliveries(&mut bob, 1).remove(0);
        bob.ack(d.seq).expect("ack");
        bob.ping(2 * round).expect("ping");
        bob.ping(2 * round + 1).expect("ping");
        bob.flush().expect("flush");
        for want in [2 * round, 2 * round + 1] {
            match next_event(&mut bob) {
                Event::Pong { nonce } => {
                    assert_eq!(nonce, want, "round {round}: PONGs out of order")
                }
                other => panic!("expected PONG, got {other:?}"),
            }
        }
        bob.bye().expect("bye");
    }
}

#[test]
fn duplicate_msg_id_is_stored_every_time_but_delivered_once() {
    let server = Server::start(&[]);
    let (mut bob, _) = connect(server.addr(), "bob");
    let (mut alice, _) = connect(server.addr(), "alice");

    let msg_id = new_msg_id();
    for _ in 0..10 {
        alice.send(msg_id, "bob", b"only once").expect("send");
    }
    alice.flush().expect("flush");
    for i in 0..10 {
        match next_event(&mut alice) {
            Event::Stored { msg_id: stored } => assert_eq!(stored, msg_id),
            other => panic!("expected STORED #{i} for {}, got {other:?}", hex(&msg_id)),
        }
    }
    let delivered = collect_deliveries(&mut bob, 1).remove(0);
    assert_eq!((delivered.seq, delivered.msg_id), (1, msg_id));
    expect_quiet(&mut bob);

    // A duplicate does not consume a sequence number either.
    let next = send_stored(&mut alice, "bob", b"next");
    let delivered = collect_deliveries(&mut bob, 1).remove(0);
    assert_eq!((delivered.seq, delivered.msg_id), (2, next));

    // Dedup is per (sender, msg_id): carol reusing alice's id is a new message.
    let (mut carol, _) = connect(server.addr(), "carol");
    send_id_stored(&mut carol, msg_id, "bob", b"from carol");
    let delivered = collect_deliveries(&mut bob, 1).remove(0);
    assert_eq!(delivered.seq, 3);
    assert_eq!(delivered.from, "carol");
    assert_eq!(delivered.body, b"from carol");
    expect_quiet(&mut bob);
}
