//! The WAL's errors. Environment trouble (I/O) carries its context; bytes
//! that fail verification name the file and offset; our own broken
//! invariants are panics, not variants.

use std::io;
use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum WalError {
    /// An fdatasync, or a pwrite of staged records, failed. Linux may already
    /// have dropped the dirty pages (or kept part of the write), so a retry
    /// would lie: the WAL is poisoned and the process must restart and
    /// recover from what is on disk.
    #[error("WAL sync failed; the WAL is poisoned, restart to recover: {0}")]
    SyncFailed(#[source] io::Error),
    /// An earlier sync failed; every call errors until the WAL is reopened.
    #[error("WAL is poisoned by an earlier failed sync; restart to recover")]
    Poisoned,
    /// Bytes on disk that are not a valid log, before its tail: refusing to
    /// open is the only way not to drop acknowledged records silently.
    #[error("corrupt WAL in {} at offset {offset}: {detail}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error("record payload of {len} bytes exceeds record_payload_len_max {max}")]
    RecordTooLarge { len: usize, max: u32 },
    #[error("epoch {epoch} is below the log's last epoch {last_epoch}")]
    EpochRegressed { epoch: u64, last_epoch: u64 },
    #[error("position {position} is not retained (retained {first}..={last})")]
    NotRetained {
        position: u64,
        first: u64,
        last: u64,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("record position {position} is not the next one ({expected})")]
    NotNext { position: u64, expected: u64 },
    #[error("invalid WAL config: {0}")]
    Config(String),
}

impl WalError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> WalError {
        let context = context.into();
        move |source| WalError::Io { context, source }
    }
}
