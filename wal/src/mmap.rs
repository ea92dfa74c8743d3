//! The one room where the WAL uses `unsafe`: mapping segment files and
//! calling fdatasync on a raw descriptor. Everything else in the crate is
//! safe code over the slices handed out here.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::RawFd;

use memmap2::{Mmap, MmapOptions};

/// Maps a whole segment file read-only and shared: the map shows the page
/// cache, so bytes written with pwrite are readable through it at once.
/// Writes never go through the map: on ext4 a store to a mapped page dirties
/// its whole folio (up to 2 MiB here), and the next fdatasync writes all of
/// it back (DECISIONS.md, "WAL writes with pwrite, reads through the map").
pub(crate) fn map_segment(file: &File, populate: bool) -> io::Result<Mmap> {
    let mut options = MmapOptions::new();
    if populate {
        // Pre-fault the page tables now (on the preallocation thread when
        // there is one) instead of taking a fault per page on the append path.
        options.populate();
    }
    // SAFETY: memmap2 requires that the file is not truncated or modified
    // outside this mapping while it lives, or reads may SIGBUS or race. The
    // segment files are private to the WAL: `FileStorage` holds an exclusive
    // lock on the directory, segments keep their length for their whole life
    // (they are only created full-size and unlinked, never truncated), and
    // within this process the owning `FileSegment` is the only writer (pwrite
    // through its descriptor). A reader can only see bytes change under it
    // at offsets past what it has been told is written.
    unsafe { options.map(file) }
}

/// fdatasync on a descriptor from a `SyncTicket`.
pub fn fdatasync_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: fdatasync takes no pointers; on a stale or invalid descriptor
    // it fails with EBADF, which is reported like any other sync failure.
    let rc = unsafe { libc::fdatasync(fd) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes back `len` bytes of `fd` from `offset` and waits for them
/// (`sync_file_range` WAIT_BEFORE | WRITE | WAIT_AFTER): data only, no
/// metadata, no barrier. Used to pace the zero-fill of a new segment so the
/// device never holds more than one chunk of it ahead of a commit's fdatasync.
pub fn write_back_range(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: sync_file_range takes no pointers; a bad fd or range is an error return.
    let rc = unsafe { libc::sync_file_range(fd, offset as i64, len as i64, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
