//! Acknowledged records are never lost silently at the WAL tail: after a
//! clean stop the durable mark covers every record, so a damaged last record
//! makes the next start refuse, naming the position and the fix; after a
//! crash, a cut at the tail is reported (WARN, stats, metric).

use tests::{
    collect_and_ack, connect, damage_last_wal_record, send_stored, wal_records, wal_segments,
    Server,
};

#[test]
fn damage_to_the_last_record_after_a_clean_stop_refuses_to_start() {
    let mut server = Server::start(&["--cores", "1"]);
    let (mut alice, _) = connect(server.addr(), "alice");
    for i in 0..300 {
        send_stored(&mut alice, "bob", format!("message {i}").as_bytes());
    }
    drop(alice);
    assert!(server.terminate().success(), "{}", server.log_tail());
    // The clean stop sealed the log: its mark covers the last record.
    let mark = {
        let path = wal_segments(server.data_dir(), 0).pop().expect("a segment");
        let bytes = std::fs::read(&path).expect("read segment");
        let last = wal_records(&bytes).last().expect("a record").1;
        assert_eq!(wal::format::decode_durable_mark(&bytes), Some(last));
        last
    };
    let position = damage_last_wal_record(server.data_dir(), 0);
    assert_eq!(position, mark);
    let (status, stderr) = server.start_expecting_refusal();
    assert!(!status.success(), "started on a damaged log:\n{stderr}");
    assert!(
        stderr.contains(&format!("position {position} was durable")),
        "the refusal must name the position:\n{stderr}"
    );
    assert!(
        stderr.contains("Fix:"),
        "the refusal must say what to do:\n{stderr}"
    );
}

/// GET on the admin port, retried while the control thread starts.
fn admin_get(addr: &str, data: &std::path::Path, path: &str) -> String {
    for _ in 0..100 {
        if let Ok((200, body)) = tests::admin_of(addr, data).call("GET", path) {
            return body;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("GET {path} on {addr} never answered 200");
}

#[test]
fn a_crash_cut_at_the_tail_is_reported_not_silent() {
    let admin = tests::free_loopback_addr();
    let mut server = Server::start(&["--cores", "1", "--admin", &admin]);
    let (mut alice, _) = connect(server.addr(), "alice");
    for i in 0..50 {
        send_stored(&mut alice, "bob", format!("message {i}").as_bytes());
    }
    drop(alice);
    server.kill9();
    // A crash: the mark trails. Damage the newest record, as a torn write or
    // a bad sector in the last commit would.
    let position = damage_last_wal_record(server.data_dir(), 0);
    server.restart();
    let log = server.log_tail();
    assert!(
        log.contains("WAL recovery dropped records past the durable mark"),
        "the cut must be logged at WARN:\n{log}"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&admin_get(&admin, server.data_dir(), "/replication/stats"))
            .expect("stats JSON");
    let shard = &stats["shards"][0];
    assert_eq!(shard["recovery_dropped_records"], 1, "{stats}");
    assert_eq!(shard["recovery_dropped_from"], position, "{stats}");
    let metrics = admin_get(&admin, server.data_dir(), "/metrics");
    assert!(
        metrics.contains("iris_wal_recovery_dropped_records{shard=\"0\"} 1"),
        "{metrics}"
    );
    // Everything before the cut is still there.
    let (mut bob, welcome) = connect(server.addr(), "bob");
    assert_eq!(welcome.pending, position - 1);
    collect_and_ack(&mut bob, welcome.pending as usize);
}
