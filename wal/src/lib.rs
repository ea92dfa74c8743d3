//! Iris write-ahead log.
//!
//! Fixed-size segments, preallocated, read through a read-only mmap and
//! written with pwrite; each record framed with length, CRC, position, epoch
//! and type (`FORMAT.md`). `append` is a memcpy into a staging buffer that
//! one pwrite writes to the segment (`flush`, or when `sync_begin` starts a
//! commit); durability is a separate, sans-IO group commit (`sync_begin`
//! hands out the descriptors to fdatasync, `sync_complete` takes the
//! result), so the caller's event loop never blocks on it.
//! Recovery verifies every checksum and decides each tail state from one
//! table (`recovery.rs`). Storage sits behind a small trait so the simulator
//! (`sim`) can crash it the way a power cut would.
//!
//! Unsafe code lives only in `mmap.rs`.

mod config;
mod error;
mod file_storage;
pub mod format;
pub mod limits;
mod mmap;
mod recovery;
pub mod sim;
mod storage;
mod wal;

pub use config::WalConfig;
pub use error::WalError;
pub use file_storage::{FileSegment, FileStorage};
pub use format::Record;
pub use mmap::fdatasync_fd;
pub use recovery::{RecoveryReport, TailState};
pub use storage::{SegmentFile, Storage};
pub use wal::{CopyForward, SyncTicket, TailCursor, Wal, WalIter};
