//! The log itself: append into a staging buffer that one pwrite writes to
//! the active segment, group commit as a sans-IO begin/complete pair,
//! readers over the read-only segment maps (and the staging buffer),
//! truncation and retention.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use crate::file_storage::FileStorage;
use crate::format::{
    decode_durable_mark, decode_record, encode_durable_mark, encode_record, encode_segment_header,
    frame_len, trusted_frame_len, Decoded, Record, SegmentHeader, DURABLE_MARK_RANGE,
    SEGMENT_HEADER_LEN,
};
use crate::mmap::fdatasync_fd;
use crate::recovery::{recover, RecoveryReport};
use crate::storage::{SegmentFile, Storage};
use crate::{WalConfig, WalError};

/// One retained segment and how far it is filled.
pub(crate) struct SegmentState<G> {
    /// Unique in this process for the life of this open segment (see
    /// `SyncTicket::files`): never reused, unlike a descriptor number.
    pub instance: u64,
    pub base: u64,
    /// `base - 1` while the segment holds no record.
    pub last_position: u64,
    /// Where the next record goes (one past the last record's frame, staged
    /// or written).
    pub write_offset: usize,
    pub segment: G,
}

/// A group commit in flight. Perform an fdatasync on every descriptor in
/// `fds()` (in any order, on any thread), then hand the ticket and the result
/// to `Wal::sync_complete`. The `Wal` keeps the descriptors open until then.
#[derive(Debug)]
#[must_use = "a SyncTicket must be completed with Wal::sync_complete"]
pub struct SyncTicket {
    id: u64,
    target_position: u64,
    /// (instance, descriptor) of each file to sync; the directory's instance
    /// is the log's `dir_instance`.
    files: Vec<(u64, RawFd)>,
    bases: Vec<u64>,
    dir: bool,
}

/// A process-wide counter for `SegmentState::instance` and `Wal::dir_instance`.
pub(crate) fn next_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl SyncTicket {
    /// (instance, descriptor) of every file to sync. An instance names one
    /// open file for as long as the log has it open and is never reused, so
    /// a caller may keep its own handle per instance (a descriptor number
    /// can come back for another file).
    pub fn files(&self) -> impl Iterator<Item = (u64, RawFd)> + '_ {
        self.files.iter().copied()
    }

    /// Every position up to this one is durable once the ticket completes.
    pub fn target_position(&self) -> u64 {
        self.target_position
    }
    /// Files (and possibly the directory) whose dirty pages must be synced.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.files.iter().map(|&(_, fd)| fd)
    }
    /// Blocking fdatasync of every descriptor, for a sync thread.
    pub fn fdatasync(&self) -> io::Result<()> {
        self.fds().try_for_each(fdatasync_fd)
    }
}

#[derive(Debug)]
struct InFlight {
    id: u64,
    /// The ticket covers positions `from_position..=target_position`.
    from_position: u64,
    target_position: u64,
    dir: bool,
    done: bool,
    /// A truncation dropped positions this ticket covered: it proves nothing.
    stale: bool,
}

/// What `copy_forward` moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyForward {
    /// Positions of the oldest segment that was copied from.
    pub segment_first_position: u64,
    pub segment_last_position: u64,
    pub records_copied: u64,
    pub bytes_copied: u64,
}

/// The write-ahead log. Single owner: one core appends, syncs and reads.
pub struct Wal<S: Storage = FileStorage> {
    storage: S,
    config: WalConfig,
    segments: VecDeque<SegmentState<S::Segment>>,
    last_position: u64,
    last_epoch: u64,
    durable_position: u64,
    /// Highest target of any ticket begun.
    sync_begun_position: u64,
    in_flight: Vec<InFlight>,
    ticket_id_next: u64,
    /// A segment file was created or removed since the last ticket began.
    dir_dirty: bool,
    /// Removed segments kept open (fds valid) until in-flight syncs complete.
    parked: Vec<SegmentState<S::Segment>>,
    poisoned: bool,
    /// `retain_from` deletes nothing until copies made by `copy_forward`
    /// up to this position are durable.
    copy_barrier_position: u64,
    scratch: Vec<u8>,
    /// Frames appended to the active segment but not yet written to it:
    /// `staging[..staged_len]` belongs at `staged_offset`. Allocated once.
    staging: Vec<u8>,
    staged_len: usize,
    /// Offset in the active segment up to which everything is written;
    /// `staged_offset + staged_len == active.write_offset`.
    staged_offset: usize,
    /// A durable mark for the active segment's header, written at the next
    /// flush (it rides on the next commit either way).
    mark_pending: Option<u64>,
    /// `SegmentState::instance` of the directory (see `SyncTicket::files`).
    dir_instance: u64,
}

impl Wal<FileStorage> {
    /// Opens (or creates) the log in `config.dir`, recovering what is there.
    pub fn open(config: WalConfig) -> Result<(Wal, RecoveryReport), WalError> {
        config.validate()?;
        let storage = FileStorage::open(
            &config.dir,
            config.populate_map,
            config.preallocate_in_background,
        )?;
        Wal::open_with_storage(config, storage)
    }
}

impl<S: Storage> Wal<S> {
    /// Opens the log over any storage (the simulator in tests).
    pub fn open_with_storage(
        config: WalConfig,
        mut storage: S,
    ) -> Result<(Self, RecoveryReport), WalError> {
        config.validate()?;
        let recovered = recover(&mut storage, &config)?;
        let mut segments = recovered.segments;
        let mut report = recovered.report;
        if segments.is_empty() {
            let base = recovered.next_base;
            let segment = create_segment(&mut storage, base, config.segment_size_bytes, 0)?;
            storage
                .sync_segment(&segment)
                .map_err(WalError::io("sync first segment"))?;
            segments.push_back(SegmentState {
                instance: next_instance(),
                base,
                last_position: base - 1,
                write_offset: SEGMENT_HEADER_LEN,
                segment,
            });
            report.segments = 1;
        } else {
            // Everything recovered is about to be synced: mark it durable.
            let state = segments.back_mut().expect("non-empty");
            if state.last_position > 0 {
                write_durable_mark(&mut state.segment, state.last_position)
                    .map_err(WalError::io("write the durable mark"))?;
            }
            // What was read may only be in the page cache (a process killed
            // before its sync): make it durable before calling it durable.
            for state in &segments {
                let path = storage.segment_path(state.base);
                storage
                    .sync_segment(&state.segment)
                    .map_err(WalError::io(format!("sync {}", path.display())))?;
            }
        }
        storage
            .sync_dir()
            .map_err(WalError::io("sync WAL directory"))?;
        storage.prepare_segment(config.segment_size_bytes);
        let active = segments.back().expect("at least one segment");
        let (last_position, staged_offset) = (active.last_position, active.write_offset);
        assert_eq!(last_position, report.last_position);
        let in_flight = Vec::with_capacity(config.syncs_in_flight_max as usize + 1);
        let staging_len = config
            .staging_bytes_max
            .min(config.segment_size_bytes as usize);
        let wal = Wal {
            storage,
            segments,
            last_position,
            last_epoch: report.last_epoch,
            durable_position: last_position,
            sync_begun_position: last_position,
            in_flight,
            ticket_id_next: 1,
            dir_dirty: false,
            parked: Vec::new(),
            poisoned: false,
            copy_barrier_position: 0,
            scratch: Vec::new(),
            staging: vec![0; staging_len],
            staged_len: 0,
            staged_offset,
            mark_pending: None,
            dir_instance: next_instance(),
            config,
        };
        Ok((wal, report))
    }

    /// Appends one record and returns its position; durable only once a
    /// later sync covers it. A memcpy into the staging buffer plus a CRC: no
    /// syscall and no allocation, except a pwrite when the staging buffer is
    /// full and a new segment at a rollover. Every reader of this `Wal` sees
    /// the record at once; the page cache (other processes, a kill -9) only
    /// after the next `flush`.
    #[inline]
    pub fn append(&mut self, epoch: u64, record_type: u8, payload: &[u8]) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let max = self.config.record_payload_len_max;
        if payload.len() > max as usize {
            return Err(WalError::RecordTooLarge {
                len: payload.len(),
                max,
            });
        }
        if epoch < self.last_epoch {
            return Err(WalError::EpochRegressed {
                epoch,
                last_epoch: self.last_epoch,
            });
        }
        let frame = frame_len(payload.len());
        let active = self.segments.back().expect("at least one segment");
        if active.write_offset + frame > active.segment.bytes().len() {
            self.roll()?;
        }
        if self.staged_len + frame > self.staging.len() {
            self.write_staged()?;
        }
        let position = self.last_position + 1;
        let record = Record {
            position,
            epoch,
            record_type,
            payload,
        };
        let written = encode_record(&mut self.staging[self.staged_len..], &record);
        debug_assert_eq!(written, frame);
        self.staged_len += written;
        let active = self.segments.back_mut().expect("at least one segment");
        active.write_offset += written;
        active.last_position = position;
        self.last_position = position;
        self.last_epoch = epoch;
        Ok(position)
    }

    /// Starts a fresh segment for the next position. The old one's unused
    /// tail stays zero, which recovery reads as its end.
    #[cold]
    fn roll(&mut self) -> Result<(), WalError> {
        self.write_staged()?;
        let base = self.last_position + 1;
        let size_bytes = self.config.segment_size_bytes;
        let segment = create_segment(&mut self.storage, base, size_bytes, self.durable_position)?;
        self.staged_offset = SEGMENT_HEADER_LEN;
        self.segments.push_back(SegmentState {
            instance: next_instance(),
            base,
            last_position: base - 1,
            write_offset: SEGMENT_HEADER_LEN,
            segment,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes the staged records (and a pending durable mark) into the
    /// active segment with one pwrite each, so the page cache holds them:
    /// other processes and a process killed after this see them, and the
    /// next fdatasync covers them. Readers of this `Wal` need no flush.
    /// `sync_begin` and `sync` flush first. A failed write poisons the log
    /// (`WalError::SyncFailed`): part of the bytes may be in the page cache.
    pub fn flush(&mut self) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        self.write_staged()
    }

    fn write_staged(&mut self) -> Result<(), WalError> {
        let active = self.segments.back_mut().expect("at least one segment");
        let base = active.base;
        assert_eq!(self.staged_offset + self.staged_len, active.write_offset);
        if self.staged_len > 0 {
            let staged = &self.staging[..self.staged_len];
            if let Err(error) = active.segment.write_at(self.staged_offset, staged) {
                let context = format!("write at offset {}", self.staged_offset);
                return Err(self.poison(base, context, error));
            }
            self.staged_offset += self.staged_len;
            self.staged_len = 0;
        }
        if let Some(mark) = self.mark_pending.take() {
            if let Err(error) = write_durable_mark(&mut active.segment, mark) {
                return Err(self.poison(base, "write the durable mark".into(), error));
            }
        }
        Ok(())
    }

    /// A write or sync of segment `base` failed: nothing this log says about
    /// durability can be trusted any more.
    #[cold]
    fn poison(&mut self, base: u64, context: String, error: io::Error) -> WalError {
        self.poisoned = true;
        let path = self.storage.segment_path(base);
        WalError::SyncFailed(io::Error::new(
            error.kind(),
            format!("{}: {context}: {error}", path.display()),
        ))
    }

    pub fn last_position(&self) -> u64 {
        self.last_position
    }
    pub fn durable_position(&self) -> u64 {
        self.durable_position
    }
    /// Lowest retained position; `last_position() + 1` when none is retained.
    pub fn first_position(&self) -> u64 {
        self.segments.front().expect("at least one segment").base
    }
    /// Epoch of the last record appended (0 if none since the log was empty).
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// Disk held: the retained segments plus a preallocated spare.
    pub fn disk_bytes(&self) -> u64 {
        let segments: u64 = self
            .segments
            .iter()
            .map(|s| s.segment.bytes().len() as u64)
            .sum();
        segments + self.storage.spare_bytes()
    }
    pub fn config(&self) -> &WalConfig {
        &self.config
    }
    /// Rollovers that had to wait for the background preallocation.
    pub fn rollover_waits(&self) -> u64 {
        self.storage.rollover_waits()
    }
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
    pub fn syncs_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Begins a group commit of everything appended so far, flushing it
    /// first (one pwrite), so the ticket's fdatasyncs cover written bytes.
    /// `None` when nothing is new since the last ticket began, when
    /// `syncs_in_flight_max` tickets are in flight, or when poisoned
    /// (including by a failed flush here: `is_poisoned` tells).
    pub fn sync_begin(&mut self) -> Option<SyncTicket> {
        if self.poisoned || self.in_flight.len() >= self.config.syncs_in_flight_max as usize {
            return None;
        }
        if self.last_position == self.sync_begun_position && !self.dir_dirty {
            return None;
        }
        self.write_staged().ok()?;
        Some(self.make_ticket(self.sync_begun_position + 1, false))
    }

    fn make_ticket(&mut self, from_position: u64, include_dir_in_flight: bool) -> SyncTicket {
        assert_eq!(self.staged_len, 0, "a ticket covers written bytes only");
        let target_position = self.last_position;
        let mut files = Vec::with_capacity(2);
        let mut bases = Vec::with_capacity(2);
        for state in &self.segments {
            if state.base <= target_position && state.last_position >= from_position {
                bases.push(state.base);
                files.extend(state.segment.raw_fd().map(|fd| (state.instance, fd)));
            }
        }
        let dir = std::mem::take(&mut self.dir_dirty)
            || (include_dir_in_flight && self.in_flight.iter().any(|t| t.dir));
        if dir {
            files.extend(self.storage.dir_fd().map(|fd| (self.dir_instance, fd)));
        }
        let id = self.ticket_id_next;
        self.ticket_id_next += 1;
        self.sync_begun_position = self.sync_begun_position.max(target_position);
        self.in_flight.push(InFlight {
            id,
            from_position,
            target_position,
            dir,
            done: false,
            stale: false,
        });
        SyncTicket {
            id,
            target_position,
            files,
            bases,
            dir,
        }
    }

    /// Performs a ticket's syncs through the storage (blocking). The engine
    /// syncs `ticket.files()` itself; this is for `sync` and the simulator.
    pub fn sync_perform(&mut self, ticket: &SyncTicket) -> io::Result<()> {
        for base in &ticket.bases {
            // A segment removed since the ticket began is parked until the
            // ticket completes: sync it as the engine's fdatasync of the
            // ticket's fd would (if its unlink is lost in a crash, it comes
            // back, and it must not come back torn below the durable mark).
            let mut retained = self.segments.iter().chain(&self.parked);
            if let Some(state) = retained.find(|s| s.base == *base) {
                self.storage.sync_segment(&state.segment)?;
            }
        }
        if ticket.dir {
            self.storage.sync_dir()?;
        }
        Ok(())
    }

    /// Completes a ticket with the result of its fdatasyncs and returns the
    /// durable position. A failed sync poisons the log for good.
    #[must_use = "a failed sync is fatal and must not be ignored"]
    pub fn sync_complete(
        &mut self,
        ticket: SyncTicket,
        result: io::Result<()>,
    ) -> Result<u64, WalError> {
        let index = self.in_flight.iter().position(|t| t.id == ticket.id);
        let index = index.expect("ticket belongs to this Wal and is completed once");
        assert_eq!(
            self.in_flight[index].target_position,
            ticket.target_position
        );
        if let Err(error) = result {
            self.poisoned = true;
            return Err(WalError::SyncFailed(error));
        }
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        self.in_flight[index].done = true;
        let durable_before = self.durable_position;
        self.apply_completions();
        if self.durable_position > durable_before {
            // Written by the next flush, durable with the next commit; see
            // the durable mark in format.rs.
            self.mark_pending = Some(self.durable_position);
        }
        if self.in_flight.is_empty() {
            self.parked.clear();
        }
        Ok(self.durable_position)
    }

    /// Advances the durable position over every completed ticket that
    /// starts at or below it: a later ticket done first waits for the
    /// earlier ones, which cover other files.
    fn apply_completions(&mut self) {
        loop {
            let durable = self.durable_position;
            let ready = self
                .in_flight
                .iter()
                .position(|t| t.done && (t.stale || t.from_position <= durable + 1));
            let Some(index) = ready else { break };
            let ticket = self.in_flight.swap_remove(index);
            if !ticket.stale {
                self.durable_position = durable.max(ticket.target_position.min(self.last_position));
            }
        }
        assert!(self.durable_position <= self.last_position);
    }

    /// Blocking group commit: makes everything appended so far durable,
    /// whatever is in flight, and returns the durable position.
    pub fn sync(&mut self) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if self.last_position == self.durable_position && !self.dir_dirty {
            return Ok(self.durable_position);
        }
        self.write_staged()?;
        let ticket = self.make_ticket(self.durable_position + 1, true);
        let result = self.sync_perform(&ticket);
        self.sync_complete(ticket, result)
    }

    /// Clean stop: makes every record durable, then records that in the
    /// durable mark (written and synced), so the next open treats damage to
    /// any record, the last one included, as lost acknowledged data rather
    /// than a torn tail (`recovery.rs`). Call with no ticket in flight; the
    /// log stays usable. Blocking (two fdatasyncs).
    pub fn seal(&mut self) -> Result<u64, WalError> {
        assert!(
            self.in_flight.is_empty(),
            "seal with a group commit in flight"
        );
        let durable = self.sync()?;
        let active = self.segments.back_mut().expect("at least one segment");
        let base = active.base;
        if durable == 0 || decode_durable_mark(active.segment.bytes()) == Some(durable) {
            return Ok(durable);
        }
        self.mark_pending = None;
        if let Err(error) = write_durable_mark(&mut active.segment, durable) {
            return Err(self.poison(base, "write the durable mark".into(), error));
        }
        let active = self.segments.back().expect("at least one segment");
        if let Err(error) = self.storage.sync_segment(&active.segment) {
            return Err(self.poison(base, "sync the durable mark".into(), error));
        }
        Ok(durable)
    }

    /// The durable mark in the active segment's header (0: none).
    pub fn durable_mark(&self) -> u64 {
        let active = self.segments.back().expect("at least one segment");
        decode_durable_mark(active.segment.bytes()).unwrap_or(0)
    }

    /// Reads records from `position` (any retained position, or
    /// `last_position() + 1` for an empty iterator) to the current end:
    /// every record appended, flushed or still staged.
    pub fn iter_from(&self, position: u64) -> Result<WalIter<'_, S>, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let (first, last) = (self.first_position(), self.last_position);
        if position < first || position > last + 1 {
            return Err(WalError::NotRetained {
                position,
                first,
                last,
            });
        }
        let (segment_index, offset) = self.locate(position);
        Ok(WalIter {
            wal: self,
            segment_index,
            offset,
            next_position: position,
            end_position: last,
        })
    }

    /// Segment index and offset of `position` (or of where it would go).
    /// Walks the frames of one segment from its start: replication starts a
    /// stream rarely, and a sparse index is not worth its memory yet.
    fn locate(&self, position: u64) -> (usize, usize) {
        let index = self
            .segments
            .partition_point(|s| s.base <= position)
            .saturating_sub(1);
        let state = &self.segments[index];
        let mut offset = SEGMENT_HEADER_LEN;
        for _ in state.base..position.min(state.last_position + 1) {
            offset += trusted_frame_len(self.record_bytes(index, offset));
        }
        assert!(offset <= state.write_offset);
        (index, offset)
    }

    /// The appended bytes of segment `index` from `offset` (a frame
    /// boundary) on, up to the end of a contiguous run: the frames written
    /// to the file (read through the map), or, at and past `staged_offset`
    /// in the active segment, the staged ones. A frame never straddles the
    /// two, because the staging buffer starts and is written at frame
    /// boundaries.
    fn record_bytes(&self, index: usize, offset: usize) -> &[u8] {
        let state = &self.segments[index];
        assert!(offset <= state.write_offset);
        let active = index + 1 == self.segments.len();
        if active && offset >= self.staged_offset {
            &self.staging[offset - self.staged_offset..self.staged_len]
        } else {
            let end = if active {
                self.staged_offset
            } else {
                state.write_offset
            };
            &state.segment.bytes()[offset..end]
        }
    }

    /// Drops every record after `position` (a replica whose tail diverged).
    /// Blocking: flushes, then later segments are unlinked and the directory
    /// synced, then the tail is zeroed (pwrite) and synced, so a crash cannot
    /// resurrect the dropped records behind new ones. Tickets in flight stop
    /// counting.
    pub fn truncate_after(&mut self, position: u64) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if position >= self.last_position {
            return Ok(());
        }
        let first = self.first_position();
        if position + 1 < first {
            return Err(WalError::NotRetained {
                position,
                first,
                last: self.last_position,
            });
        }
        self.write_staged()?;
        let keep = self.segments.partition_point(|s| s.base <= position + 1) - 1;
        if keep + 1 < self.segments.len() {
            let removed: Vec<_> = self.segments.drain(keep + 1..).collect();
            for state in removed {
                self.remove_segment_file(state)?;
            }
            self.sync_dir_now()?;
            // `keep` is the active segment now, with nothing staged.
            self.staged_offset = self.segments[keep].write_offset;
        }
        self.lower_durable_marks(position, keep)?;
        let (_, offset) = self.locate(position + 1);
        let state = &mut self.segments[keep];
        let base = state.base;
        let mut result = state.segment.write_zeros(offset, state.write_offset);
        if decode_durable_mark(state.segment.bytes()).is_some_and(|mark| mark > position) {
            result = result.and_then(|()| write_durable_mark(&mut state.segment, position));
        }
        state.write_offset = offset;
        state.last_position = position;
        self.staged_offset = offset;
        let result = result.and_then(|()| self.storage.sync_segment(&self.segments[keep].segment));
        if let Err(error) = result {
            return Err(self.poison(base, "zero and sync the truncated tail".into(), error));
        }
        self.last_position = position;
        self.durable_position = self.durable_position.min(position);
        self.sync_begun_position = self.durable_position;
        self.in_flight.iter_mut().for_each(|t| t.stale = true);
        if position >= first {
            let (index, offset) = self.locate(position);
            let bytes = self.record_bytes(index, offset);
            if let Decoded::Record(record, _) =
                decode_record(bytes, self.config.record_payload_len_max)
            {
                self.last_epoch = record.epoch;
            }
        }
        Ok(())
    }

    /// A mark above a truncation point would make recovery call the new
    /// records at those positions acknowledged before they are: lower the
    /// marks of the segments before `keep` now (synced), `keep`'s with its tail.
    fn lower_durable_marks(&mut self, position: u64, keep: usize) -> Result<(), WalError> {
        for index in 0..keep {
            let state = &mut self.segments[index];
            if decode_durable_mark(state.segment.bytes()).is_some_and(|mark| mark > position) {
                let base = state.base;
                let result = write_durable_mark(&mut state.segment, position)
                    .and_then(|()| self.storage.sync_segment(&self.segments[index].segment));
                if let Err(error) = result {
                    return Err(self.poison(base, "lower the durable mark".into(), error));
                }
            }
        }
        Ok(())
    }

    fn sync_dir_now(&mut self) -> Result<(), WalError> {
        self.storage.sync_dir().map_err(|error| {
            self.poisoned = true;
            WalError::SyncFailed(error)
        })
    }

    /// Unlinks a segment; keeps its mapping and fd alive while a ticket
    /// that may name its fd is in flight.
    fn remove_segment_file(&mut self, state: SegmentState<S::Segment>) -> Result<(), WalError> {
        let path = self.storage.segment_path(state.base);
        self.storage
            .remove_segment(state.base)
            .map_err(WalError::io(format!("remove {}", path.display())))?;
        if !self.in_flight.is_empty() {
            self.parked.push(state);
        }
        Ok(())
    }

    /// Deletes the whole segments below `lowest_needed_position` (never the
    /// active one) and returns how many. The directory sync rides on the next
    /// group commit. Deletes nothing while copies made by `copy_forward` are
    /// not yet durable.
    pub fn retain_from(&mut self, lowest_needed_position: u64) -> Result<usize, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if self.durable_position < self.copy_barrier_position {
            return Ok(0);
        }
        let mut deleted = 0;
        while self.segments.len() > 1 && self.segments[1].base <= lowest_needed_position {
            let state = self.segments.pop_front().expect("len > 1");
            self.remove_segment_file(state)?;
            self.dir_dirty = true;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Helps free the oldest segment when a few of its records are still
    /// live (say, messages not yet delivered): re-appends each record of the
    /// oldest segment for which `keep` returns true, at the end of the log
    /// with the current epoch and the same type and payload, and reports
    /// each move through `moved(old_position, new_position)` so the owner
    /// can repoint its index. Then the owner syncs, and once its lowest
    /// needed position is past `segment_last_position`, `retain_from`
    /// deletes the segment. Does nothing when only the active segment exists.
    pub fn copy_forward(
        &mut self,
        mut keep: impl FnMut(&Record<'_>) -> bool,
        mut moved: impl FnMut(u64, u64),
    ) -> Result<CopyForward, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let mut result = CopyForward::default();
        if self.segments.len() < 2 {
            return Ok(result);
        }
        let (first, last) = (self.segments[0].base, self.segments[0].last_position);
        result.segment_first_position = first;
        result.segment_last_position = last;
        let mut live = Vec::new();
        for record in self.iter_from(first)?.take((last + 1 - first) as usize) {
            let record = record?;
            if keep(&record) {
                live.push(record.position);
            }
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        for old_position in live {
            let (index, offset) = self.locate(old_position);
            let bytes = self.record_bytes(index, offset);
            let Decoded::Record(record, _) =
                decode_record(bytes, self.config.record_payload_len_max)
            else {
                panic!("record {old_position} verified above no longer decodes");
            };
            let record_type = record.record_type;
            scratch.clear();
            scratch.extend_from_slice(record.payload);
            let new_position = self.append(self.last_epoch, record_type, &scratch)?;
            moved(old_position, new_position);
            result.records_copied += 1;
            result.bytes_copied += scratch.len() as u64;
        }
        self.scratch = scratch;
        self.copy_barrier_position = self.last_position;
        Ok(result)
    }
}

/// Where a replication stream is in the log: resumable across event-loop
/// turns (it holds no borrow), O(1) per call once made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailCursor {
    next_position: u64,
    segment_base: u64,
    offset: usize,
}

impl TailCursor {
    /// The position the next `read_frames` starts at.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }
}

impl<S: Storage> Wal<S> {
    /// A cursor at `position` (any retained position, or `last_position() + 1`).
    pub fn cursor_at(&self, position: u64) -> Result<TailCursor, WalError> {
        let (first, last) = (self.first_position(), self.last_position);
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        if position < first || position > last + 1 {
            return Err(WalError::NotRetained {
                position,
                first,
                last,
            });
        }
        let (index, offset) = self.locate(position);
        let state = &self.segments[index];
        Ok(TailCursor {
            next_position: position,
            segment_base: state.base,
            offset,
        })
    }

    /// Copies whole record frames, exactly as they are on disk, from the
    /// cursor onwards into `out`, up to about `bytes_max` bytes (at least one
    /// frame when one is there), and advances the cursor. Returns the number
    /// of records copied (0 when the cursor is at the end). Sees every
    /// record appended, flushed or still staged.
    pub fn read_frames(
        &self,
        cursor: &mut TailCursor,
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let mut copied = 0;
        let start_len = out.len();
        while cursor.next_position <= self.last_position {
            let index = self
                .segments
                .partition_point(|s| s.base <= cursor.segment_base);
            let first = self.first_position();
            let Some(state) = index.checked_sub(1).map(|i| &self.segments[i]) else {
                return Err(WalError::NotRetained {
                    position: cursor.next_position,
                    first,
                    last: self.last_position,
                });
            };
            if state.base != cursor.segment_base {
                return Err(WalError::NotRetained {
                    position: cursor.next_position,
                    first,
                    last: self.last_position,
                });
            }
            if cursor.next_position > state.last_position {
                // This segment is done: the next one starts at the next position.
                let next = self
                    .segments
                    .get(index)
                    .expect("a later segment holds the next position");
                assert_eq!(next.base, cursor.next_position);
                cursor.segment_base = next.base;
                cursor.offset = SEGMENT_HEADER_LEN;
                continue;
            }
            if copied > 0 && out.len() - start_len >= bytes_max {
                break;
            }
            let bytes = self.record_bytes(index - 1, cursor.offset);
            let frame = trusted_frame_len(bytes);
            assert!(cursor.offset + frame <= state.write_offset);
            out.extend_from_slice(&bytes[..frame]);
            cursor.offset += frame;
            cursor.next_position += 1;
            copied += 1;
        }
        Ok(copied)
    }

    /// Appends a record received from a primary at exactly `position`, which
    /// must be the next one: a replica keeps the primary's positions.
    pub fn append_at(
        &mut self,
        position: u64,
        epoch: u64,
        record_type: u8,
        payload: &[u8],
    ) -> Result<u64, WalError> {
        let expected = self.last_position + 1;
        if position != expected {
            return Err(WalError::NotNext { position, expected });
        }
        self.append(epoch, record_type, payload)
    }

    /// The epoch of the record at `position`, if it is retained (flushed or
    /// still staged).
    pub fn epoch_at(&self, position: u64) -> Option<u64> {
        if self.poisoned || position < self.first_position() || position > self.last_position {
            return None;
        }
        let (index, offset) = self.locate(position);
        let bytes = self.record_bytes(index, offset);
        match decode_record(bytes, self.config.record_payload_len_max) {
            Decoded::Record(record, _) if record.position == position => Some(record.epoch),
            _ => None,
        }
    }

    /// Drops the whole log and starts an empty one whose first position is
    /// `first_position` (a replica taking a full sync). Blocking: the old
    /// segments are unlinked and the new one created and synced before it
    /// returns, so a crash leaves either the old log or the new empty one.
    pub fn reset(&mut self, first_position: u64) -> Result<(), WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        assert!(first_position >= 1);
        // The staged frames belong to segments about to be removed.
        self.staged_len = 0;
        self.mark_pending = None;
        let removed: Vec<_> = self.segments.drain(..).collect();
        for state in removed {
            self.remove_segment_file(state)?;
        }
        self.sync_dir_now()?;
        let size_bytes = self.config.segment_size_bytes;
        let segment = create_segment(&mut self.storage, first_position, size_bytes, 0)?;
        if let Err(error) = self.storage.sync_segment(&segment) {
            self.poisoned = true;
            return Err(WalError::SyncFailed(error));
        }
        self.segments.push_back(SegmentState {
            instance: next_instance(),
            base: first_position,
            last_position: first_position - 1,
            write_offset: SEGMENT_HEADER_LEN,
            segment,
        });
        self.sync_dir_now()?;
        self.staged_offset = SEGMENT_HEADER_LEN;
        self.last_position = first_position - 1;
        self.durable_position = self.last_position;
        self.sync_begun_position = self.last_position;
        self.last_epoch = 0;
        self.copy_barrier_position = 0;
        self.in_flight.iter_mut().for_each(|t| t.stale = true);
        Ok(())
    }
}

/// A new segment with its header (and `durable_mark`, if not 0) written.
fn create_segment<S: Storage>(
    storage: &mut S,
    base: u64,
    size_bytes: u64,
    durable_mark: u64,
) -> Result<S::Segment, WalError> {
    let path = storage.segment_path(base);
    let mut segment = storage
        .create_segment(base, size_bytes)
        .map_err(WalError::io(format!("create {}", path.display())))?;
    assert_eq!(segment.bytes().len() as u64, size_bytes);
    assert!(segment
        .bytes()
        .iter()
        .take(SEGMENT_HEADER_LEN)
        .all(|&b| b == 0));
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    let fields = SegmentHeader {
        base_position: base,
        segment_size_bytes: size_bytes,
    };
    encode_segment_header(&fields, &mut header);
    if durable_mark > 0 {
        encode_durable_mark(durable_mark, &mut header);
    }
    segment.write_at(0, &header).map_err(WalError::io(format!(
        "write the header of {}",
        path.display()
    )))?;
    Ok(segment)
}

/// Rewrites the durable mark (and its CRC) in a segment's header in place.
fn write_durable_mark<G: SegmentFile>(segment: &mut G, position: u64) -> io::Result<()> {
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    encode_durable_mark(position, &mut header);
    segment.write_at(DURABLE_MARK_RANGE.start, &header[DURABLE_MARK_RANGE])
}

/// A log dropped without a sync leaves its staged records in the page cache,
/// as a mapped log did: a process that exits cleanly loses nothing to its
/// next run, and a simulated power cut still tears the unsynced tail.
impl<S: Storage> Drop for Wal<S> {
    fn drop(&mut self) {
        if !self.poisoned && !std::thread::panicking() {
            let _ = self.write_staged();
        }
    }
}

/// Iterator over records from a position to the end the log had when the
/// iterator was made. Verifies each record's CRC as it goes.
pub struct WalIter<'a, S: Storage = FileStorage> {
    wal: &'a Wal<S>,
    segment_index: usize,
    offset: usize,
    next_position: u64,
    end_position: u64,
}

impl<'a, S: Storage> Iterator for WalIter<'a, S> {
    type Item = Result<Record<'a>, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_position > self.end_position {
            return None;
        }
        let mut state = &self.wal.segments[self.segment_index];
        if self.next_position > state.last_position {
            self.segment_index += 1;
            self.offset = SEGMENT_HEADER_LEN;
            state = &self.wal.segments[self.segment_index];
        }
        let bytes = self.wal.record_bytes(self.segment_index, self.offset);
        match decode_record(bytes, self.wal.config.record_payload_len_max) {
            Decoded::Record(record, frame) if record.position == self.next_position => {
                self.offset += frame;
                self.next_position += 1;
                Some(Ok(record))
            }
            other => {
                let detail = format!("reading position {}: {other:?}", self.next_position);
                self.next_position = self.end_position + 1;
                let path = self.wal.storage.segment_path(state.base);
                Some(Err(WalError::Corrupt {
                    path,
                    offset: self.offset as u64,
                    detail,
                }))
            }
        }
    }
}
