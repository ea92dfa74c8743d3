//! Recovery on open: scan every segment, verify every checksum, find where
//! the log ends, and decide what to do with whatever lies past that end.
//!
//! Every state is decided in this one table (tests in
//! `tests/recovery_table.rs`, one per row). `mark` is the highest durable
//! mark found in any segment header: every position up to it was durable
//! (acknowledged) when the mark was written. Damage at or below the mark is
//! lost acknowledged data; damage above it is a tail a crash cut off.
//!
//! | state | how it is recognised | decision |
//! | --- | --- | --- |
//! | clean end | the newest segment's records end at a zero header (or its end), only zeros follow, and the last position is at least the mark | keep everything; nothing truncated |
//! | torn last record | a record fails its length, CRC or padding check at position p > mark | zero from that record to the last non-zero byte of its segment, remove later segments, sync; report `truncated_bytes` |
//! | zero-filled tail | a zero header ends the records at position p > mark, but non-zero bytes follow (pages written back out of order) | same as a torn record |
//! | bad CRC in the middle | a record fails its checks at position p <= mark | `WalError::Corrupt` naming the file and offset; nothing is changed on disk |
//! | bad segment header | a segment's header is invalid (zero, torn, bad CRC, bad magic); p = the position it should start at. p > mark: a rollover cut short | p > mark: remove it and every later segment. p <= mark: `WalError::Corrupt`, offset 0 |
//! | segment missing in the middle | the next segment starts past the position after the previous one's last record | positions missing <= mark: `WalError::Corrupt` naming the segment; above the mark: an orphan of a lost tail, removed with the later ones (`OrphanSegment`) |
//! | log ends below the mark | the records stop (clean-looking zeros) before the mark | `WalError::Corrupt` |
//! | misplaced record | a CRC-valid record whose position is not the next one, or a header base that disagrees with the file name | `WalError::Corrupt`: not something a crash produces |
//! | damage after a clean stop | `Wal::seal` (the engine's graceful stop) left a mark equal to the last position, so any damage is at or below it | `WalError::Corrupt` (the "bad CRC in the middle" row), with [`DAMAGE_FIX`] |
//! | crash, damage in the last completed commit | p > mark, but p <= the true durable position at the crash | indistinguishable from a torn tail: cut as one, and counted in `dropped_from..=dropped_through` so the engine reports it (WARN, stats, metric) |
//!
//! Every cut reports the positions it discards (`dropped_*`): the damaged
//! record's own and the highest checksum-valid record found past it.
//!
//! How many acknowledged records can sit above the mark after a crash,
//! exactly: the mark is rewritten after each group commit completes and
//! reaches the disk with the next one, so at a crash it may trail the truly
//! durable position by the records of the last completed group commit (with
//! `syncs_in_flight_max` = k, of the last k). Everything older is protected;
//! after a clean stop nothing is above the mark. See FORMAT.md.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::format::{
    decode_durable_mark, decode_record, decode_segment_header, BadRecord, Decoded, RECORD_ALIGN,
    SEGMENT_HEADER_LEN,
};
use crate::storage::{SegmentFile, Storage};
use crate::wal::SegmentState;
use crate::{WalConfig, WalError};

/// What an operator can do when acknowledged records are damaged; part of
/// the `WalError::Corrupt` detail.
pub const DAMAGE_FIX: &str = "Fix: if a replica holds these records, promote it, move this \
     node's data directory aside and restart this node as its replica (it copies everything \
     back); otherwise restore the directory from a backup. Starting past the damage would \
     silently lose acknowledged messages, so this node will not.";

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
    /// Highest durable mark found: positions up to it were acknowledged.
    pub durable_mark: u64,
    /// Records the tail decision cut off: positions `dropped_from..=dropped_through`
    /// (0 when nothing was). All lie above the durable mark; after a crash the
    /// records of the last completed group commit may be among them and may
    /// have been acknowledged (FORMAT.md, "What a crash can cut").
    pub dropped_from: u64,
    /// Highest position cut off: the damaged record's own, or the highest
    /// checksum-valid record found after it in the cut bytes or removed segments.
    pub dropped_through: u64,
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
        if self.dropped_records() > 0 {
            write!(
                f,
                "; dropped {} records at positions {}..={} (durable mark {})",
                self.dropped_records(),
                self.dropped_from,
                self.dropped_through,
                self.durable_mark
            )?;
        }
        Ok(())
    }
}

impl RecoveryReport {
    /// How many positions the tail decision cut off (0 for a clean end).
    pub fn dropped_records(&self) -> u64 {
        if self.dropped_through == 0 {
            0
        } else {
            self.dropped_through - self.dropped_from + 1
        }
    }
}

/// The highest position of a checksum-valid record above `after` anywhere in
/// `bytes[from..to]` (tried at every frame alignment), or 0. Tells how many
/// records a cut discards: the bytes past a bad record may hold later ones.
fn highest_valid_position(bytes: &[u8], from: usize, to: usize, after: u64, max: u32) -> u64 {
    let mut highest = 0;
    let mut offset = from;
    while offset < to.min(bytes.len()) {
        if let Decoded::Record(record, _) = decode_record(&bytes[offset..], max) {
            if record.position > after {
                highest = highest.max(record.position);
            }
        }
        offset += RECORD_ALIGN;
    }
    highest
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
        durable_mark: 0,
        dropped_from: 0,
        dropped_through: 0,
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
    count_dropped(&opened, &plan, max, &mut report);
    apply(storage, &mut opened, plan, &mut report)?;
    let segments: VecDeque<_> = opened
        .into_iter()
        .zip(kept)
        .map(
            |((base, segment), (scan_end, next_position))| SegmentState {
                instance: crate::wal::next_instance(),
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

/// Fills `dropped_through`: the highest position the plan discards (the
/// damaged record itself when its bytes are cut, or any valid record found
/// past it in the cut bytes and the removed segments).
fn count_dropped<G: SegmentFile>(
    opened: &[(u64, G)],
    plan: &Plan,
    max: u32,
    report: &mut RecoveryReport,
) {
    if report.tail == TailState::Clean {
        return;
    }
    let after = report.dropped_from - 1;
    let mut through = 0;
    if let Some((index, from, to)) = plan.zero {
        let bytes = opened[index].1.bytes();
        through = highest_valid_position(bytes, from, to, after, max).max(report.dropped_from);
    }
    for (_, segment) in &opened[plan.remove_from..] {
        let bytes = segment.bytes();
        let found = highest_valid_position(bytes, SEGMENT_HEADER_LEN, bytes.len(), after, max);
        through = through.max(found);
    }
    report.dropped_through = through;
}

/// The first thing wrong, found while walking the log in order.
struct Anomaly {
    tail: TailState,
    path: PathBuf,
    offset: usize,
    /// The first position this anomaly makes unreadable.
    position: u64,
    detail: String,
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
    let mark = opened
        .iter()
        .filter_map(|(_, s)| decode_durable_mark(s.bytes()))
        .max()
        .unwrap_or(0);
    report.durable_mark = mark;
    for (i, (base, segment)) in opened.iter().enumerate() {
        let (base, bytes, path) = (*base, segment.bytes(), storage.segment_path(*base));
        let expected = if i == 0 { base } else { *next_base };
        let header = match decode_segment_header(bytes) {
            Ok(header) => header,
            Err(error) => {
                let detail = error.to_string();
                let anomaly = Anomaly {
                    tail: TailState::BadSegmentHeader,
                    path,
                    offset: 0,
                    position: expected,
                    detail,
                };
                *next_base = expected;
                return cut(
                    report,
                    mark,
                    anomaly,
                    Plan {
                        zero: None,
                        remove_from: i,
                    },
                );
            }
        };
        if header.base_position != base {
            let detail = format!(
                "header base position {} but the file is named for {base}",
                header.base_position
            );
            return Err(corrupt(path, 16, detail));
        }
        if base < expected {
            return Err(corrupt(
                path,
                0,
                format!(
                    "segment starts at {base}, overlapping records up to {}",
                    expected - 1
                ),
            ));
        }
        if base > expected {
            let previous = storage.segment_path(opened[i - 1].0);
            let detail = format!(
                "segment missing: position {expected} should follow {}, but the next segment starts at {base}",
                previous.display()
            );
            let anomaly = Anomaly {
                tail: TailState::OrphanSegment,
                path,
                offset: 0,
                position: expected,
                detail,
            };
            return cut(
                report,
                mark,
                anomaly,
                Plan {
                    zero: None,
                    remove_from: i,
                },
            );
        }
        let scan = scan_segment(bytes, base, max, &path)?;
        report.records += scan.records;
        if let Some(epoch) = scan.last_epoch {
            report.last_epoch = epoch;
        }
        *next_base = scan.next_position;
        kept.push((scan.end_offset, scan.next_position));
        if scan.garbage_end > scan.end_offset {
            let (tail, detail) = match &scan.stop {
                Some(bad) => (TailState::TornRecord, bad.to_string()),
                None => (
                    TailState::ZeroFilledTail,
                    "zero header followed by non-zero bytes".to_string(),
                ),
            };
            let anomaly = Anomaly {
                tail,
                path,
                offset: scan.end_offset,
                position: scan.next_position,
                detail,
            };
            let plan = Plan {
                zero: Some((i, scan.end_offset, scan.garbage_end)),
                remove_from: i + 1,
            };
            return cut(report, mark, anomaly, plan);
        }
    }
    if *next_base <= mark {
        let path = storage.segment_path(opened.last().map_or(*next_base, |(base, _)| *base));
        let detail = format!(
            "the log ends at {} but positions up to {mark} were durable: acknowledged records \
             are missing, nothing was changed on disk. {DAMAGE_FIX}",
            *next_base - 1
        );
        return Err(corrupt(path, 0, detail));
    }
    Ok(Plan {
        zero: None,
        remove_from: opened.len(),
    })
}

/// The log ends at the anomaly: allowed only above the durable mark.
fn cut(
    report: &mut RecoveryReport,
    mark: u64,
    anomaly: Anomaly,
    plan: Plan,
) -> Result<Plan, WalError> {
    if anomaly.position <= mark {
        let detail = format!(
            "{}; position {} was durable (durable mark {mark}): acknowledged records are damaged, \
             nothing was changed on disk. {DAMAGE_FIX}",
            anomaly.detail, anomaly.position
        );
        return Err(corrupt(anomaly.path, anomaly.offset, detail));
    }
    report.dropped_from = anomaly.position;
    set_tail(
        report,
        anomaly.tail,
        anomaly.path,
        anomaly.offset,
        anomaly.detail,
    );
    Ok(plan)
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
        let path = storage.segment_path(*base);
        segment
            .write_zeros(from, to)
            .map_err(WalError::io(format!("zero the tail of {}", path.display())))?;
        storage
            .sync_segment(segment)
            .map_err(WalError::io(format!("sync {}", path.display())))?;
    }
    Ok(())
}
