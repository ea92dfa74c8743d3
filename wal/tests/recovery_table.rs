//! One test per row of the recovery table in `src/recovery.rs`, on the
//! simulated disk so each test can damage exactly the bytes it means to.

mod common;

use std::cell::RefCell;
use std::rc::Rc;

use common::*;
use wal::format::RECORD_HEADER_LEN;
use wal::sim::SimDisk;
use wal::{TailState, WalConfig, WalError};

const SEGMENT_SIZE_BYTES: u64 = 4096;

/// A log of `records` records of which the first `synced` were made durable
/// (acknowledged), the rest only written, then closed.
fn written_log(synced: u64, records: u64) -> (Rc<RefCell<SimDisk>>, WalConfig) {
    let disk = SimDisk::new();
    let config = sim_config(SEGMENT_SIZE_BYTES);
    let (mut wal, _) = open_sim(&disk, &config).unwrap();
    for p in 1..=records {
        assert_eq!(wal.append(1, 0, &payload_for(p)).unwrap(), p);
        if p == synced {
            assert_eq!(wal.sync().unwrap(), synced);
        }
    }
    drop(wal);
    (disk, config)
}

fn segment_bytes(disk: &Rc<RefCell<SimDisk>>, index: usize) -> (u64, Vec<u8>) {
    let base = disk.borrow().segment_bases()[index];
    (base, disk.borrow_mut().file_mut(base).unwrap().clone())
}

fn write_segment(disk: &Rc<RefCell<SimDisk>>, base: u64, bytes: &[u8]) {
    disk.borrow_mut()
        .file_mut(base)
        .unwrap()
        .copy_from_slice(bytes);
}

/// Checks that the recovered log holds exactly positions 1..=last, intact,
/// and that the next append continues at last + 1.
fn assert_log_is(disk: &Rc<RefCell<SimDisk>>, config: &WalConfig, last: u64) {
    let (mut wal, report) = open_sim(disk, config).unwrap();
    assert_eq!(report.last_position, last, "{report}");
    let records: Vec<_> = wal
        .iter_from(1)
        .unwrap()
        .map(|r| r.unwrap().payload.to_vec())
        .collect();
    assert_eq!(records.len() as u64, last);
    for (i, payload) in records.iter().enumerate() {
        assert_eq!(payload, &payload_for(i as u64 + 1));
    }
    assert_eq!(wal.append(1, 0, b"next").unwrap(), last + 1);
}

#[test]
fn row_clean_end() {
    let (disk, config) = written_log(40, 40);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(report.tail, TailState::Clean);
    assert_eq!(
        (
            report.records,
            report.truncated_bytes,
            report.segments_removed
        ),
        (40, 0, 0)
    );
    assert!(report.segments > 1);
    assert_log_is(&disk, &config, 40);
}

#[test]
fn row_torn_last_record() {
    let (disk, config) = written_log(10, 40);
    let last_segment = disk.borrow().segment_bases().len() - 1;
    let (base, mut bytes) = segment_bytes(&disk, last_segment);
    let offsets = record_offsets(&bytes);
    let torn = *offsets.last().unwrap();
    // The record's header made it, its payload only partly: cut mid-record.
    let end = torn + RECORD_HEADER_LEN + 3;
    bytes[end..].fill(0);
    bytes[torn + 4] ^= 0xff;
    write_segment(&disk, base, &bytes);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(report.tail, TailState::TornRecord, "{report}");
    assert_eq!(report.tail_offset, torn as u64);
    assert!(report.truncated_bytes > 0);
    assert_eq!(
        (
            report.dropped_from,
            report.dropped_through,
            report.dropped_records()
        ),
        (40, 40, 1),
        "{report}"
    );
    assert_log_is(&disk, &config, 39);
}

/// A clean stop seals the log: the durable mark covers the last record, so
/// damage to that record is acknowledged data lost, never a torn tail.
#[test]
fn row_damage_after_a_clean_stop_is_an_error_even_in_the_last_record() {
    let disk = SimDisk::new();
    let config = sim_config(SEGMENT_SIZE_BYTES);
    let (mut wal, _) = open_sim(&disk, &config).unwrap();
    for p in 1..=40 {
        wal.append(1, 0, &payload_for(p)).unwrap();
        if p % 10 == 0 {
            wal.sync().unwrap();
        }
    }
    assert_eq!(wal.seal().unwrap(), 40);
    assert_eq!(wal.durable_mark(), 40);
    drop(wal);
    let last_segment = disk.borrow().segment_bases().len() - 1;
    let (base, mut bytes) = segment_bytes(&disk, last_segment);
    let last = *record_offsets(&bytes).last().unwrap();
    bytes[last + RECORD_HEADER_LEN] ^= 0x01;
    write_segment(&disk, base, &bytes);
    match open_sim(&disk, &config) {
        Err(WalError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, last as u64);
            assert!(detail.contains("position 40 was durable"), "{detail}");
            assert!(detail.contains("Fix:"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
    assert_eq!(
        segment_bytes(&disk, last_segment).1,
        bytes,
        "nothing changed"
    );
}

/// After a crash the on-disk mark trails the truly durable position by the
/// last completed group commit: its records were acknowledged but sit above
/// the mark. Damage there cuts them; recovery counts them for the operator
/// (`dropped_*`: the engine logs them at WARN, in stats and a metric).
/// Damage one commit further back is below the mark: an error.
#[test]
fn row_crash_damage_in_the_last_commit_is_cut_and_counted() {
    for (damaged, expect_cut) in [(25u64, true), (19, false)] {
        let disk = SimDisk::new();
        let config = sim_config(1 << 16);
        let (mut wal, _) = open_sim(&disk, &config).unwrap();
        for p in 1..=30 {
            wal.append(1, 0, &payload_for(p)).unwrap();
            if p % 10 == 0 {
                wal.sync().unwrap();
            }
        }
        // Commits ended at 10, 20 and 30 (all acknowledged). The mark for 30
        // would ride on the next commit; at the crash the disk holds 20.
        drop(wal);
        let (base, mut bytes) = segment_bytes(&disk, 0);
        assert_eq!(wal::format::decode_durable_mark(&bytes), Some(30));
        wal::format::encode_durable_mark(20, &mut bytes[..64]);
        let offsets = record_offsets(&bytes);
        bytes[offsets[damaged as usize - 1] + RECORD_HEADER_LEN] ^= 0x04;
        write_segment(&disk, base, &bytes);
        let opened = open_sim(&disk, &config);
        if !expect_cut {
            assert!(
                matches!(opened, Err(WalError::Corrupt { .. })),
                "damage below the mark must be refused"
            );
            continue;
        }
        let (_, report) = opened.unwrap();
        assert_eq!(report.durable_mark, 20);
        assert_eq!(report.tail, TailState::TornRecord, "{report}");
        assert_eq!(
            (
                report.dropped_from,
                report.dropped_through,
                report.dropped_records()
            ),
            (25, 30, 6),
            "{report}"
        );
        assert_log_is(&disk, &config, 24);
    }
}

#[test]
fn row_bad_crc_in_the_middle_is_an_error_naming_file_and_offset() {
    let (disk, config) = written_log(40, 40);
    let (base, mut bytes) = segment_bytes(&disk, 0);
    let offsets = record_offsets(&bytes);
    let damaged = offsets[3];
    bytes[damaged + RECORD_HEADER_LEN] ^= 0x01; // one bit of record 4's payload
    write_segment(&disk, base, &bytes);
    match open_sim(&disk, &config) {
        Err(WalError::Corrupt {
            path,
            offset,
            detail,
        }) => {
            assert!(path.to_string_lossy().ends_with(&format!("{base:020}.wal")));
            assert_eq!(offset, damaged as u64);
            assert!(detail.contains("CRC"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
    // Nothing was changed on disk: the damage is still there to inspect.
    assert_eq!(segment_bytes(&disk, 0).1, bytes);
}

#[test]
fn row_bad_segment_header_on_the_newest_segment_cut_short() {
    let (disk, config) = written_log(10, 40);
    let bases = disk.borrow().segment_bases();
    let (base, mut bytes) = segment_bytes(&disk, bases.len() - 1);
    // A rollover whose header and records never reached the disk, save a
    // few torn header bytes.
    bytes.fill(0);
    bytes[..5].copy_from_slice(b"IRISW");
    write_segment(&disk, base, &bytes);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(report.tail, TailState::BadSegmentHeader, "{report}");
    assert_eq!(report.segments_removed, 1);
    assert_log_is(&disk, &config, base - 1);
}

#[test]
fn row_bad_segment_header_on_an_older_segment_is_an_error() {
    let (disk, config) = written_log(40, 40);
    let (base, mut bytes) = segment_bytes(&disk, 0);
    bytes[20] ^= 0x10;
    write_segment(&disk, base, &bytes);
    match open_sim(&disk, &config) {
        Err(WalError::Corrupt {
            path,
            offset: 0,
            detail,
        }) => {
            assert!(path.to_string_lossy().ends_with(&format!("{base:020}.wal")));
            assert!(detail.contains("CRC"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
}

#[test]
fn row_zero_filled_tail() {
    let (disk, config) = written_log(10, 40);
    let last_segment = disk.borrow().segment_bases().len() - 1;
    let (base, mut bytes) = segment_bytes(&disk, last_segment);
    let offsets = record_offsets(&bytes);
    assert!(offsets.len() >= 3);
    // The page holding the second-to-last record was lost (zeros), the one
    // after it was written back but holds only the tail of the last record.
    let hole = offsets[offsets.len() - 2];
    let last = offsets[offsets.len() - 1];
    bytes[hole..last + RECORD_HEADER_LEN].fill(0);
    bytes[last + RECORD_HEADER_LEN] = 0xaa;
    write_segment(&disk, base, &bytes);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(report.tail, TailState::ZeroFilledTail, "{report}");
    assert_eq!(report.tail_offset, hole as u64);
    assert_log_is(&disk, &config, 38);
}

#[test]
fn row_zero_hole_followed_by_a_valid_record_is_an_error() {
    let (disk, config) = written_log(40, 40);
    let (base, mut bytes) = segment_bytes(&disk, 0);
    let offsets = record_offsets(&bytes);
    bytes[offsets[2]..offsets[3]].fill(0);
    write_segment(&disk, base, &bytes);
    assert!(
        matches!(open_sim(&disk, &config), Err(WalError::Corrupt { offset, .. }) if offset == offsets[2] as u64)
    );
}

#[test]
fn row_orphan_segment_after_a_lost_tail() {
    let (disk, config) = written_log(10, 120);
    let bases = disk.borrow().segment_bases();
    assert!(bases.len() >= 3);
    // The second-to-last segment lost its last records (zeros, as never
    // written back), and the newest segment lost all of its records.
    let (base, mut bytes) = segment_bytes(&disk, bases.len() - 2);
    let offsets = record_offsets(&bytes);
    bytes[offsets[offsets.len() - 2]..].fill(0);
    write_segment(&disk, base, &bytes);
    let (newest, mut bytes) = segment_bytes(&disk, bases.len() - 1);
    bytes[wal::format::SEGMENT_HEADER_LEN..].fill(0);
    write_segment(&disk, newest, &bytes);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(report.tail, TailState::OrphanSegment, "{report}");
    assert_eq!(report.segments_removed, 1);
    assert_log_is(&disk, &config, newest - 3);
}

#[test]
fn row_segment_missing_in_the_middle_is_an_error() {
    let (disk, config) = written_log(120, 120);
    let bases = disk.borrow().segment_bases();
    assert!(bases.len() >= 3);
    let mut storage = wal::sim::SimStorage::new(disk.clone());
    wal::Storage::remove_segment(&mut storage, bases[1]).unwrap();
    match open_sim(&disk, &config) {
        Err(WalError::Corrupt { path, detail, .. }) => {
            assert!(
                path.to_string_lossy()
                    .ends_with(&format!("{:020}.wal", bases[2])),
                "{path:?}"
            );
            assert!(
                detail.contains("segment missing")
                    && detail.contains(&format!("position {}", bases[1])),
                "{detail}"
            );
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
}

#[test]
fn row_log_ending_below_the_durable_mark_is_an_error() {
    let (disk, config) = written_log(40, 40);
    let last_segment = disk.borrow().segment_bases().len() - 1;
    let (base, mut bytes) = segment_bytes(&disk, last_segment);
    let offsets = record_offsets(&bytes);
    bytes[*offsets.last().unwrap()..].fill(0); // acknowledged record 40 read back as zeros
    write_segment(&disk, base, &bytes);
    match open_sim(&disk, &config) {
        Err(WalError::Corrupt { detail, .. }) => {
            assert!(detail.contains("up to 40 were durable"), "{detail}")
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
}

#[test]
fn damage_above_the_durable_mark_with_records_after_it_is_a_crashed_tail() {
    // Pages written back out of order before a power cut: record 20 lost,
    // records after it present. None was acknowledged, so it is a tail.
    let (disk, config) = written_log(10, 30);
    let (base, mut bytes) = segment_bytes(&disk, 0);
    let offsets = record_offsets(&bytes);
    bytes[offsets[19] + RECORD_HEADER_LEN] ^= 0x40;
    write_segment(&disk, base, &bytes);
    let (_, report) = open_sim(&disk, &config).unwrap();
    assert_eq!(
        (report.tail, report.durable_mark),
        (TailState::TornRecord, 10),
        "{report}"
    );
    // Records 21..=30 were valid but follow the hole: cut and counted.
    assert_eq!((report.dropped_from, report.dropped_through), (20, 30));
    assert_log_is(&disk, &config, 19);
}
