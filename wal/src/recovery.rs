//! Recovery on open: scan every segment, verify every checksum, find where
//! the log ends, and decide what to do with whatever lies past that end.
//!
//! Every tail state is decided in this one table (tests in
//! `tests/recovery_table.rs`, one per row):
//!
//! | state | how it is recognised | decision |
//! | --- | --- | --- |
//! | clean end | the last segment's records end at a zero header (or its end) and only zeros follow | keep everything; nothing truncated |
//! | torn last record | a record fails its CRC, length or padding check, and no valid record follows it anywhere | zero from that record to the last non-zero byte, sync, report `truncated_bytes` |
//! | zero-filled tail | a zero header ends the records, but non-zero bytes that form no valid record follow (a page written back while an earlier one was lost) | zero them, sync, report `truncated_bytes` |
//! | bad CRC in the middle | a damaged record or zero hole is followed by a valid record (same segment or a later one) | `WalError::Corrupt` naming the file and offset; nothing is changed on disk |
//! | bad segment header | the newest segment's header is invalid and it holds no valid record (a rollover cut short) | remove that file |
//! | bad segment header, older | an invalid header on a segment followed by others, or holding valid records | `WalError::Corrupt` naming the file, offset 0 |
//! | orphan segment | the newest segment(s) have a valid header, hold no record and do not continue the log (the tail they followed was lost) | remove them |
//! | segment missing in the middle | a segment's base is not the position after the previous segment's last record, and records follow | `WalError::Corrupt` naming the segment and the position missing |
//!
//! A valid record past the end of the log is the evidence that the damage
//! is not a tail cut off by a crash: that is acknowledged data that would be
//! lost, so recovery refuses rather than truncating. The price: an unsynced
//! page written back out of order before a power cut also refuses to open
//! (it cannot be told apart without a durable commit marker; see FORMAT.md).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::format::{
    decode_record, decode_segment_header, BadRecord, Decoded, RECORD_ALIGN, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use crate::storage::{SegmentFile, Storage};
use crate::wal::SegmentState;
use crate::{WalConfig, WalError};

/// How the log ended when it was opened (one row of the recovery table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailState {
    Clean,
    TornRecord,
    ZeroFilledTail,
    BadSegmentHeader,
    OrphanSegment,
}

/// What `Wal::open` found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    /// Lowest retained position (`last_position + 1` when no record is retained).
    pub first_position: u64,
    /// 0 for an empty log.
    pub last_position: u64,
    /// Epoch of the last record, 0 when no record is retained.
    pub last_epoch: u64,
    /// Bytes past the end of the log that were zeroed (from the end of the
    /// last valid record to the last non-zero byte).
    pub truncated_bytes: u64,
    /// Segment files removed (bad header or orphan at the tail).
    pub segments_removed: usize,
    pub tail: TailState,
    /// Where the tail decision applied, if it was not a clean end.
    pub tail_path: Option<PathBuf>,
    pub tail_offset: u64,
    pub tail_detail: String,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wal recovered: {} segments, {} records, positions {}..={}, last epoch {}, tail {:?}",
            self.segments,
            self.records,
            self.first_position,
            self.last_position,
            self.last_epoch,
            self.tail
        )?;
        if let Some(path) = &self.tail_path {
            write!(
                f,
                " at {}:{} ({}); {} bytes truncated, {} segments removed",
                path.display(),
                self.tail_offset,
                self.tail_detail,
                self.truncated_bytes,
                self.segments_removed
            )?;
        }
        Ok(())
    }
}

/// The result of walking the records of one segment.
struct SegmentScan {
    records: u64,
    next_position: u64,
    end_offset: usize,
    last_epoch: Option<u64>,
    /// Why the walk stopped: `None` at a zero header or the segment end.
    stop: Option<BadRecord>,
    /// One past the last non-zero byte at or after `end_offset`.
    garbage_end: usize,
}

fn corrupt(path: PathBuf, offset: usize, detail: String) -> WalError {
    WalError::Corrupt {
        path,
        offset: offset as u64,
        detail,
    }
}

fn scan_segment(
    bytes: &[u8],
    base: u64,
    payload_len_max: u32,
    path: &Path,
) -> Result<SegmentScan, WalError> {
    let mut offset = SEGMENT_HEADER_LEN;
    let mut position = base;
    let mut last_epoch = None;
    let stop = loop {
        match decode_record(&bytes[offset..], payload_len_max) {
            Decoded::Record(record, frame) if record.position == position => {
                last_epoch = Some(record.epoch);
                position += 1;
                offset += frame;
            }
            Decoded::Record(record, _) => {
                let detail = format!(
                    "record has position {} where {position} was expected",
                    record.position
                );
                return Err(corrupt(path.to_path_buf(), offset, detail));
            }
            Decoded::End => break None,
            Decoded::Bad(bad) => break Some(bad),
        }
    };
    let garbage_end = bytes[offset..]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(offset, |i| offset + i + 1);
    Ok(SegmentScan {
        records: position - base,
        next_position: position,
        end_offset: offset,
        last_epoch,
        stop,
        garbage_end,
    })
}

/// First 8-aligned offset at or after `from` holding a valid record with a
/// position of at least `position_min`: the evidence that data follows.
fn find_valid_record(
    bytes: &[u8],
    from: usize,
    position_min: u64,
    payload_len_max: u32,
) -> Option<(usize, u64)> {
    let mut offset = from.next_multiple_of(RECORD_ALIGN);
    while offset + RECORD_HEADER_LEN <= bytes.len() {
        let position =
            u64::from_le_bytes(bytes[offset + 8..offset + 16].try_into().expect("8 bytes"));
        if position >= position_min {
            if let Decoded::Record(record, _) = decode_record(&bytes[offset..], payload_len_max) {
                return Some((offset, record.position));
            }
        }
        offset += RECORD_ALIGN;
    }
    None
}

/// What to do to the files once the whole log has been judged.
struct Plan {
    /// Index into the opened segments of the one whose tail is zeroed.
    zero: Option<(usize, usize, usize)>,
    /// Segments from this index on are removed.
    remove_from: usize,
}

pub(crate) struct Recovered<G> {
    pub segments: VecDeque<SegmentState<G>>,
    pub report: RecoveryReport,
    /// Base for a first segment when none is left.
    pub next_base: u64,
}

pub(crate) fn recover<S: Storage>(
    storage: &mut S,
    config: &WalConfig,
) -> Result<Recovered<S::Segment>, WalError> {
    let max = config.record_payload_len_max;
    let bases = storage
        .list_segments()
        .map_err(WalError::io("list segments"))?;
    let mut opened = Vec::with_capacity(bases.len());
    for &base in &bases {
        let segment = storage.open_segment(base).map_err(WalError::io(format!(
            "open {}",
            storage.segment_path(base).display()
        )))?;
        opened.push((base, segment));
    }
    let mut report = RecoveryReport {
        segments: 0,
        records: 0,
        first_position: 1,
        last_position: 0,
        last_epoch: 0,
        truncated_bytes: 0,
        segments_removed: 0,
        tail: TailState::Clean,
        tail_path: None,
        tail_offset: 0,
        tail_detail: String::new(),
    };
    let mut kept = Vec::new();
    let mut next_base = bases.first().copied().unwrap_or(1);
    let plan = judge(
        storage,
        &opened,
        max,
        &mut report,
        &mut kept,
        &mut next_base,
    )?;
    apply(storage, &mut opened, plan, &mut report)?;
    let segments: VecDeque<_> = opened
        .into_iter()
        .zip(kept)
        .map(
            |((base, segment), (scan_end, next_position))| SegmentState {
                base,
                last_position: next_position - 1,
                write_offset: scan_end,
                segment,
            },
        )
        .collect();
    report.segments = segments.len();
    if let Some(front) = segments.front() {
        report.first_position = front.base;
        report.last_position = segments.back().expect("non-empty").last_position;
    } else {
        report.first_position = next_base;
        report.last_position = next_base - 1;
    }
    Ok(Recovered {
        segments,
        report,
        next_base,
    })
}

/// Walks the opened segments in order and decides, without touching the
/// files. `kept` gets (end offset, next position) per segment kept.
fn judge<S: Storage>(
    storage: &S,
    opened: &[(u64, S::Segment)],
    max: u32,
    report: &mut RecoveryReport,
    kept: &mut Vec<(usize, u64)>,
    next_base: &mut u64,
) -> Result<Plan, WalError> {
    let holds_record = |from: usize, position_min: u64| {
        opened[from..].iter().find_map(|(base, segment)| {
            find_valid_record(segment.bytes(), SEGMENT_HEADER_LEN, position_min, max)
                .map(|(offset, _)| (*base, offset))
        })
    };
    for (i, (base, segment)) in opened.iter().enumerate() {
        let (base, bytes, path) = (*base, segment.bytes(), storage.segment_path(*base));
        let position_min = if i == 0 { 1 } else { *next_base };
        if let Err(error) = decode_segment_header(bytes) {
            if i + 1 < opened.len() || holds_record(i, position_min).is_some() {
                return Err(corrupt(
                    path,
                    0,
                    format!("{error} in a segment that is not a cut-short rollover"),
                ));
            }
            set_tail(
                report,
                TailState::BadSegmentHeader,
                path,
                0,
                error.to_string(),
            );
            if i == 0 {
                *next_base = base;
            }
            return Ok(Plan {
                zero: None,
                remove_from: i,
            });
        }
        let header = decode_segment_header(bytes).expect("checked above");
        if header.base_position != base {
            let detail = format!(
                "header base position {} but the file is named for {base}",
                header.base_position
            );
            return Err(corrupt(path, 16, detail));
        }
        if i > 0 && base != *next_base {
            if let Some((found, offset)) = holds_record(i, 1) {
                let detail = format!(
                    "segment missing: position {} should follow {}, but the next segment starts at {base} (records at {}:{offset})",
                    *next_base,
                    storage.segment_path(opened[i - 1].0).display(),
                    storage.segment_path(found).display(),
                );
                return Err(corrupt(path, 0, detail));
            }
            set_tail(
                report,
                TailState::OrphanSegment,
                path,
                0,
                format!("starts at {base}, log ends at {}", *next_base - 1),
            );
            return Ok(Plan {
                zero: None,
                remove_from: i,
            });
        }
        let scan = scan_segment(bytes, base, max, &path)?;
        report.records += scan.records;
        if let Some(epoch) = scan.last_epoch {
            report.last_epoch = epoch;
        }
        *next_base = scan.next_position;
        kept.push((scan.end_offset, scan.next_position));
        if scan.garbage_end == scan.end_offset {
            continue;
        }
        let reason = scan
            .stop
            .as_ref()
            .map_or("zero header followed by non-zero bytes".to_string(), |b| {
                b.to_string()
            });
        if let Some((offset, position)) =
            find_valid_record(bytes, scan.end_offset + 1, scan.next_position, max)
        {
            let detail = format!(
                "{reason}; a valid record (position {position}) follows at offset {offset}"
            );
            return Err(corrupt(path, scan.end_offset, detail));
        }
        if let Some((later, offset)) = holds_record(i + 1, 1) {
            let detail = format!(
                "{reason}; records follow in {}:{offset}",
                storage.segment_path(later).display()
            );
            return Err(corrupt(path, scan.end_offset, detail));
        }
        let tail = if scan.stop.is_some() {
            TailState::TornRecord
        } else {
            TailState::ZeroFilledTail
        };
        set_tail(report, tail, path, scan.end_offset, reason);
        return Ok(Plan {
            zero: Some((i, scan.end_offset, scan.garbage_end)),
            remove_from: i + 1,
        });
    }
    Ok(Plan {
        zero: None,
        remove_from: opened.len(),
    })
}

fn set_tail(
    report: &mut RecoveryReport,
    tail: TailState,
    path: PathBuf,
    offset: usize,
    detail: String,
) {
    report.tail = tail;
    report.tail_path = Some(path);
    report.tail_offset = offset as u64;
    report.tail_detail = detail;
}

/// Carries out the plan: remove what follows the end (directory synced),
/// then zero the torn bytes and sync them, so a second crash during
/// recovery finds either the old state or the new one.
fn apply<S: Storage>(
    storage: &mut S,
    opened: &mut Vec<(u64, S::Segment)>,
    plan: Plan,
    report: &mut RecoveryReport,
) -> Result<(), WalError> {
    if plan.remove_from < opened.len() {
        for (base, _) in opened.drain(plan.remove_from..) {
            let path = storage.segment_path(base);
            storage
                .remove_segment(base)
                .map_err(WalError::io(format!("remove {}", path.display())))?;
            report.segments_removed += 1;
        }
        storage
            .sync_dir()
            .map_err(WalError::io("sync WAL directory"))?;
    }
    if let Some((index, from, to)) = plan.zero {
        let (base, segment) = &mut opened[index];
        report.truncated_bytes = (to - from) as u64;
        segment.bytes_mut()[from..to].fill(0);
        let path = storage.segment_path(*base);
        storage
            .sync_segment(segment)
            .map_err(WalError::io(format!("sync {}", path.display())))?;
    }
    Ok(())
}
