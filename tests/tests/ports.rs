//! Port ownership (DESIGN: "A port belongs to one process"): a restarted
//! process never shares its port with the killed one's lingering listeners,
//! and a second process on a port a live one holds refuses to start.

use std::collections::HashSet;
use tests::{
    ack_and_sync, collect_deliveries, connect, expect_quiet, hex, round_trip, send_stored,
    serve_must_fail, MsgId, Server,
};

/// kill -9 / restart rounds: enough that a shared port would show (the old
/// SO_REUSEPORT listeners lost the first connection after most restarts).
const ROUNDS: usize = 20;

/// Each round stores one message, kills the server with -9, restarts it on the
/// same port and logs the recipient in the moment the new process prints its
/// listening line. A connection that reached the dead process's listener would
/// be reset before WELCOME. The previous round's ACK is covered by this
/// round's STORED (same shard, one log), so each login gets exactly the
/// message of its round.
#[test]
fn restart_after_kill9_owns_its_port_at_once() {
    let mut server = Server::start(&[]);
    let mut stored: HashSet<MsgId> = HashSet::new();
    let mut delivered: HashSet<MsgId> = HashSet::new();
    let mut bob = None;
    for round in 0..ROUNDS {
        let (mut alice, _) = connect(server.addr(), "alice");
        let body = format!("round {round}");
        let msg_id = send_stored(&mut alice, "bob", body.as_bytes());
        assert!(stored.insert(msg_id));
        drop(alice);
        // bob stays connected through the kill, as a real client would.
        server.kill9();
        server.restart_on_same_port();
        drop(bob.take());
        // At once: connect() fails the test on a reset or a close before WELCOME.
        let (mut client, _) = connect(server.addr(), "bob");
        let d = collect_deliveries(&mut client, 1).remove(0);
        assert_eq!(
            (d.msg_id, d.body.as_slice()),
            (msg_id, body.as_bytes()),
            "round {round}: expected its own message, got {} (already delivered: {})",
            hex(&d.msg_id),
            delivered.contains(&d.msg_id)
        );
        assert!(delivered.insert(d.msg_id), "round {round}: delivered twice");
        ack_and_sync(&mut client, d.seq);
        bob = Some(client);
    }
    assert_eq!(delivered, stored);
    expect_quiet(bob.as_mut().expect("bob logged in"));
}

/// A second server on a client port a live one holds exits non-zero, naming
/// the address; the first keeps serving.
#[test]
fn second_process_on_a_busy_client_port_refuses_to_start() {
    let server = Server::start(&[]);
    let (status, stderr) = serve_must_fail(&["--listen", server.addr()]);
    assert!(!status.success(), "second process: {status}\n{stderr}");
    assert!(
        stderr.contains(&format!("{} (client listener) is in use", server.addr())),
        "the error names the address:\n{stderr}"
    );
    still_serving(&server);
}

/// The same with a busy replication port (its client port is free).
#[test]
fn second_process_on_a_busy_replication_port_refuses_to_start() {
    let server = Server::start(&[
        "--replication-listen",
        "127.0.0.1:0",
        "--durability",
        "local",
    ]);
    let replication = server.stdout_line("iris replication listening on ");
    let (status, stderr) = serve_must_fail(&[
        "--listen",
        "127.0.0.1:0",
        "--replication-listen",
        &replication,
    ]);
    assert!(!status.success(), "second process: {status}\n{stderr}");
    assert!(
        stderr.contains(&format!("{replication} (replication listener) is in use")),
        "the error names the address:\n{stderr}"
    );
    still_serving(&server);
}

fn still_serving(server: &Server) {
    let (mut alice, _) = connect(server.addr(), "alice");
    let (mut bob, _) = connect(server.addr(), "bob");
    round_trip(&mut alice, "alice", &mut bob, "bob");
}
