//! The small trait between the log and the kernel. `FileStorage` is the real
//! thing (files read through a read-only mmap, written with pwrite,
//! fdatasync); `sim::SimStorage` keeps written bytes apart
//! from synced bytes so a simulated crash loses exactly what a power cut would.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::limits::ZERO_FILL_CHUNK_BYTES;

/// One segment file: read whole through `bytes`, written only with `write_at`.
pub trait SegmentFile {
    /// The whole file as the page cache holds it (a read-only map).
    fn bytes(&self) -> &[u8];
    /// Positional write (pwrite) of all of `data` at `offset`: visible
    /// through `bytes` at once, durable after the next sync. On error some
    /// of `data` may have been written.
    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()>;
    /// The descriptor an fdatasync must target, if this is a real file.
    fn raw_fd(&self) -> Option<RawFd>;

    /// Writes zeros over `from..to`, a chunk at a time (recovery and
    /// truncation: rare, so the chunk is allocated per call).
    fn write_zeros(&mut self, from: usize, to: usize) -> io::Result<()> {
        assert!(from <= to && to <= self.bytes().len());
        let zeros = vec![0u8; (to - from).min(ZERO_FILL_CHUNK_BYTES)];
        let mut offset = from;
        while offset < to {
            let n = (to - offset).min(zeros.len());
            self.write_at(offset, &zeros[..n])?;
            offset += n;
        }
        Ok(())
    }
}

pub trait Storage {
    type Segment: SegmentFile;

    /// Base positions of the segment files present, ascending.
    fn list_segments(&mut self) -> io::Result<Vec<u64>>;
    fn open_segment(&mut self, base: u64) -> io::Result<Self::Segment>;
    /// A new zero-filled segment of `size_bytes` named for `base`. Its zeros
    /// are already durable (so later fdatasyncs only carry the records); its
    /// name becomes durable with the next `sync_dir`.
    fn create_segment(&mut self, base: u64, size_bytes: u64) -> io::Result<Self::Segment>;
    /// Unlinks the file; a mapping the caller still holds stays valid.
    fn remove_segment(&mut self, base: u64) -> io::Result<()>;
    /// fdatasync: every byte written to the segment so far becomes durable.
    fn sync_segment(&mut self, segment: &Self::Segment) -> io::Result<()>;
    /// Makes creations and removals of segment files durable.
    fn sync_dir(&mut self) -> io::Result<()>;
    fn dir_fd(&self) -> Option<RawFd>;
    /// For error messages and reports.
    fn segment_path(&self, base: u64) -> PathBuf;
    /// Hint: a segment of this size will be needed; prepare it off the
    /// append path if the storage can.
    fn prepare_segment(&mut self, _size_bytes: u64) {}
    /// Disk held beyond the live segments (a preallocated spare).
    fn spare_bytes(&self) -> u64 {
        0
    }
    /// Times `create_segment` had to wait for background preallocation.
    fn rollover_waits(&self) -> u64 {
        0
    }
}
