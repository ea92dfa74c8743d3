//! Behaviour of the log a user of the API would notice, on real files.

mod common;

use common::*;
use wal::{Wal, WalConfig, WalError};

fn small_config(name: &str) -> WalConfig {
    let mut config = WalConfig::new(temp_dir(name));
    config.segment_size_bytes = 64 * 1024;
    config.record_payload_len_max = 4096;
    config
}

#[test]
fn append_sync_reopen_and_read_back() {
    let config = small_config("basic");
    let (mut wal, report) = Wal::open(config.clone()).unwrap();
    assert_eq!(
        (report.last_position, report.first_position, report.records),
        (0, 1, 0)
    );
    assert_eq!(wal.last_position(), 0);
    for expected in 1..=2000u64 {
        assert_eq!(wal.append(1, 7, &payload_for(expected)).unwrap(), expected);
    }
    assert!(
        wal.segment_count() > 1,
        "2000 records span several 64 KiB segments"
    );
    assert_eq!(wal.durable_position(), 0);
    assert_eq!(wal.sync().unwrap(), 2000);
    assert_eq!(wal.durable_position(), 2000);
    drop(wal);
    let (wal, report) = Wal::open(config.clone()).unwrap();
    assert_eq!(report.tail, wal::TailState::Clean, "{report}");
    assert_eq!(
        (report.records, report.last_position, report.last_epoch),
        (2000, 2000, 1)
    );
    let mut next = 500;
    for record in wal.iter_from(500).unwrap() {
        let record = record.unwrap();
        assert_eq!(
            (record.position, record.epoch, record.record_type),
            (next, 1, 7)
        );
        assert_eq!(record.payload, payload_for(next));
        next += 1;
    }
    assert_eq!(next, 2001);
    assert_eq!(wal.iter_from(2001).unwrap().count(), 0);
    assert!(matches!(
        wal.iter_from(2002),
        Err(WalError::NotRetained { .. })
    ));
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn group_commit_ticket_covers_everything_before_it() {
    let config = small_config("ticket");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    assert!(wal.sync_begin().is_none(), "nothing to sync");
    for _ in 0..10 {
        wal.append(1, 0, b"x").unwrap();
    }
    let ticket = wal.sync_begin().unwrap();
    assert_eq!(ticket.target_position(), 10);
    assert_eq!(ticket.fds().count(), 1);
    assert!(wal.sync_begin().is_none(), "syncs_in_flight_max is 1");
    wal.append(1, 0, b"after").unwrap();
    let result = ticket.fdatasync();
    assert_eq!(wal.sync_complete(ticket, result).unwrap(), 10);
    assert_eq!(wal.durable_position(), 10);
    let ticket = wal.sync_begin().unwrap();
    assert_eq!(ticket.target_position(), 11);
    let result = ticket.fdatasync();
    assert_eq!(wal.sync_complete(ticket, result).unwrap(), 11);
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn failed_sync_poisons_for_good() {
    let config = small_config("poison");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    wal.append(1, 0, b"x").unwrap();
    let ticket = wal.sync_begin().unwrap();
    let error = wal
        .sync_complete(ticket, Err(std::io::Error::other("EIO")))
        .unwrap_err();
    assert!(matches!(error, WalError::SyncFailed(_)));
    assert!(matches!(wal.append(1, 0, b"y"), Err(WalError::Poisoned)));
    assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
    assert!(wal.sync_begin().is_none());
    assert!(matches!(wal.iter_from(1), Err(WalError::Poisoned)));
    assert_eq!(wal.durable_position(), 0);
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn bounds_are_enforced() {
    let config = small_config("bounds");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    let big = vec![0u8; 4097];
    assert!(matches!(
        wal.append(1, 0, &big),
        Err(WalError::RecordTooLarge {
            len: 4097,
            max: 4096
        })
    ));
    wal.append(5, 0, b"x").unwrap();
    assert!(matches!(
        wal.append(4, 0, b"x"),
        Err(WalError::EpochRegressed {
            epoch: 4,
            last_epoch: 5
        })
    ));
    let mut bad = config.clone();
    bad.record_payload_len_max = 1 << 20;
    assert!(matches!(Wal::open(bad), Err(WalError::Config(_))));
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn a_second_process_cannot_open_the_same_wal() {
    let config = small_config("lock");
    let (wal, _) = Wal::open(config.clone()).unwrap();
    assert!(matches!(
        Wal::open(config.clone()),
        Err(WalError::Io { .. })
    ));
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn truncate_after_drops_the_tail_and_positions_continue() {
    let config = small_config("truncate");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    for p in 1..=1500u64 {
        wal.append(p / 100, 0, &payload_for(p)).unwrap();
    }
    wal.sync().unwrap();
    wal.truncate_after(321).unwrap();
    assert_eq!(
        (
            wal.last_position(),
            wal.durable_position(),
            wal.last_epoch()
        ),
        (321, 321, 3)
    );
    assert_eq!(wal.append(9, 1, b"new").unwrap(), 322);
    wal.sync().unwrap();
    drop(wal);
    let (wal, report) = Wal::open(config.clone()).unwrap();
    assert_eq!(
        (report.last_position, report.tail),
        (322, wal::TailState::Clean)
    );
    let last = wal.iter_from(322).unwrap().next().unwrap().unwrap();
    assert_eq!((last.epoch, last.payload), (9, &b"new"[..]));
    let record = wal.iter_from(321).unwrap().next().unwrap().unwrap();
    assert_eq!(record.payload, payload_for(321));
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn consumed_workload_keeps_disk_bounded() {
    let config = small_config("retention");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    let mut disk_bytes_max = 0;
    for p in 1..=50_000u64 {
        wal.append(1, 0, &[7u8; 100]).unwrap();
        if p % 100 == 0 {
            wal.sync().unwrap();
            // The consumer is at most 1000 records behind.
            wal.retain_from(p.saturating_sub(1000)).unwrap();
            disk_bytes_max = disk_bytes_max.max(wal.disk_bytes());
        }
    }
    assert!(wal.first_position() > 40_000);
    assert!(
        disk_bytes_max <= 5 * 64 * 1024,
        "disk use {disk_bytes_max} not bounded"
    );
    let files = std::fs::read_dir(&config.dir).unwrap().count();
    assert!(files <= 6, "{files} files left");
    drop(wal);
    let (wal, report) = Wal::open(config.clone()).unwrap();
    assert_eq!(report.last_position, 50_000);
    assert_eq!(wal.first_position(), report.first_position);
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

#[test]
fn copy_forward_frees_the_oldest_segment() {
    let config = small_config("copy");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    for p in 1..=1200u64 {
        wal.append(1, (p % 2) as u8, &payload_for(p)).unwrap();
    }
    wal.sync().unwrap();
    let old_first = wal.first_position();
    let mut moves = Vec::new();
    let copied = wal
        .copy_forward(|r| r.position % 50 == 0, |old, new| moves.push((old, new)))
        .unwrap();
    assert_eq!(copied.segment_first_position, old_first);
    assert!(copied.records_copied > 0);
    assert_eq!(moves.len() as u64, copied.records_copied);
    let segments = wal.segment_count();
    assert_eq!(
        wal.retain_from(copied.segment_last_position + 1).unwrap(),
        0,
        "copies not durable yet"
    );
    wal.sync().unwrap();
    assert_eq!(
        wal.retain_from(copied.segment_last_position + 1).unwrap(),
        1
    );
    assert_eq!(wal.segment_count(), segments - 1);
    for (old, new) in moves {
        let record = wal.iter_from(new).unwrap().next().unwrap().unwrap();
        assert_eq!(record.payload, payload_for(old));
        assert_eq!(record.record_type, (old % 2) as u8);
    }
    drop(wal);
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// Appends wait in the staging buffer: this `Wal`'s readers see them at
/// once, the file (page cache) only after `flush` or `sync_begin`.
#[test]
fn staged_records_are_readable_and_reach_the_file_on_flush() {
    let config = small_config("staging");
    let (mut wal, _) = Wal::open(config.clone()).unwrap();
    let segment = std::fs::read_dir(&config.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wal"))
        .unwrap();
    let file_records = || record_offsets(&std::fs::read(&segment).unwrap()).len();
    for position in 1..=10u64 {
        wal.append(1, 7, &payload_for(position)).unwrap();
    }
    assert_eq!(file_records(), 0, "appends are staged, not written");
    assert_eq!(wal.iter_from(1).unwrap().count(), 10);
    assert_eq!(wal.epoch_at(10), Some(1));
    let mut cursor = wal.cursor_at(3).unwrap();
    let mut frames = Vec::new();
    assert_eq!(
        wal.read_frames(&mut cursor, usize::MAX, &mut frames)
            .unwrap(),
        8
    );
    wal.flush().unwrap();
    assert_eq!(file_records(), 10, "flush writes the staged frames");
    wal.append(1, 7, &payload_for(11)).unwrap();
    let ticket = wal.sync_begin().unwrap();
    assert_eq!(file_records(), 11, "a ticket covers written bytes only");
    let result = ticket.fdatasync();
    assert_eq!(wal.sync_complete(ticket, result).unwrap(), 11);
    wal.append(1, 7, &payload_for(12)).unwrap();
    drop(wal);
    assert_eq!(file_records(), 12, "drop writes what is staged");
    std::fs::remove_dir_all(&config.dir).unwrap();
}

/// A record frame larger than the staging buffer could never be staged.
#[test]
fn staging_must_hold_the_largest_frame() {
    let mut config = small_config("staging-bound");
    config.staging_bytes_max = config.record_payload_len_max as usize;
    assert!(matches!(Wal::open(config), Err(WalError::Config(_))));
}
