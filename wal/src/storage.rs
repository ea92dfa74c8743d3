//! The small trait between the log and the kernel. `FileStorage` is the real
//! thing (files, mmap, fdatasync); `sim::SimStorage` keeps written bytes apart
//! from synced bytes so a simulated crash loses exactly what a power cut would.

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// One segment file, mapped whole.
pub trait SegmentFile {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The descriptor an fdatasync must target, if this is a real file.
    fn raw_fd(&self) -> Option<RawFd>;
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
