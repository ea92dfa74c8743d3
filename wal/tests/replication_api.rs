//! The APIs replication uses: a primary tails its log with a cursor and
//! ships raw frames; a replica appends them at the same positions, can be
//! reset for a full sync, and answers the epoch at a position.

mod common;

use common::*;
use wal::format::{decode_record, Decoded};
use wal::{Wal, WalConfig, WalError};

fn small_config(name: &str) -> WalConfig {
    let mut config = WalConfig::new(temp_dir(name));
    config.segment_size_bytes = 64 * 1024;
    config.record_payload_len_max = 4096;
    config
}

/// Decodes every frame of `bytes`, checking CRCs, as a replica does.
fn decode_all(mut bytes: &[u8]) -> Vec<(u64, u64, u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        match decode_record(bytes, 4096) {
            Decoded::Record(r, len) => {
                out.push((r.position, r.epoch, r.record_type, r.payload.to_vec()));
                bytes = &bytes[len..];
            }
            other => panic!("bad frame in stream: {other:?}"),
        }
    }
    out
}

#[test]
fn cursor_ships_frames_across_segments_and_a_replica_mirrors_positions() {
    let (mut primary, _) = Wal::open(small_config("repl-primary")).unwrap();
    let (mut replica, _) = Wal::open(small_config("repl-replica")).unwrap();
    let mut cursor = primary.cursor_at(1).unwrap();
    let mut shipped = Vec::new();
    for n in 1..=3000u64 {
        primary.append(1 + n / 1000, 3, &payload_for(n)).unwrap();
        if n % 97 == 0 {
            let mut buf = Vec::new();
            while primary.read_frames(&mut cursor, 2048, &mut buf).unwrap() > 0 {}
            shipped.extend(decode_all(&buf));
        }
    }
    let mut buf = Vec::new();
    primary
        .read_frames(&mut cursor, usize::MAX, &mut buf)
        .unwrap();
    shipped.extend(decode_all(&buf));
    assert!(primary.segment_count() > 2, "the stream crossed segments");
    assert_eq!(cursor.next_position(), 3001);
    let positions: Vec<u64> = shipped.iter().map(|r| r.0).collect();
    assert_eq!(
        positions,
        (1..=3000).collect::<Vec<_>>(),
        "dense, in order, once"
    );
    for (position, epoch, ty, payload) in &shipped {
        assert_eq!(payload, &payload_for(*position));
        replica.append_at(*position, *epoch, *ty, payload).unwrap();
    }
    assert!(matches!(
        replica.append_at(5, 9, 3, b"x"),
        Err(WalError::NotNext {
            position: 5,
            expected: 3001
        })
    ));
    assert_eq!(replica.epoch_at(999), Some(1));
    assert_eq!(replica.epoch_at(1000), Some(2));
    assert_eq!(replica.epoch_at(3001), None);
    replica.sync().unwrap();
}

#[test]
fn reset_starts_an_empty_log_at_a_position_and_survives_reopen() {
    let config = small_config("repl-reset");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    for n in 1..=500u64 {
        wal.append(1, 1, &payload_for(n)).unwrap();
    }
    wal.sync().unwrap();
    wal.reset(1000).unwrap();
    assert_eq!((wal.first_position(), wal.last_position()), (1000, 999));
    assert!(wal.iter_from(1000).unwrap().next().is_none());
    wal.append_at(1000, 4, 2, b"snapshot").unwrap();
    wal.sync().unwrap();
    drop(wal);
    let (wal, report) = Wal::open(config).unwrap();
    assert_eq!((report.first_position, report.last_position), (1000, 1000));
    let records: Vec<_> = wal
        .iter_from(1000)
        .unwrap()
        .map(|r| r.unwrap().payload.to_vec())
        .collect();
    assert_eq!(records, vec![b"snapshot".to_vec()]);
}

#[test]
fn a_cursor_behind_retention_is_refused() {
    let (mut wal, _) = Wal::open(small_config("repl-retained")).unwrap();
    let cursor = wal.cursor_at(1).unwrap();
    for n in 1..=3000u64 {
        wal.append(1, 1, &payload_for(n)).unwrap();
    }
    wal.sync().unwrap();
    assert!(wal.retain_from(2500).unwrap() > 0);
    let mut cursor = cursor;
    let mut buf = Vec::new();
    assert!(matches!(
        wal.read_frames(&mut cursor, 1024, &mut buf),
        Err(WalError::NotRetained { .. })
    ));
    assert!(matches!(
        wal.cursor_at(1),
        Err(WalError::NotRetained { .. })
    ));
}
