//! WAL configuration: every knob has a default from `limits.rs`.

use std::path::PathBuf;

use crate::format::{frame_len, SEGMENT_HEADER_LEN};
use crate::limits::*;
use crate::WalError;

#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// Size of each segment file; fixed when the segment is created.
    pub segment_size_bytes: u64,
    /// Largest payload `append` accepts; recovery rejects larger lengths
    /// before trusting them.
    pub record_payload_len_max: u32,
    /// Group commits that may be in flight at once (`sync_begin` returns
    /// `None` beyond this).
    pub syncs_in_flight_max: u32,
    /// Prepare the next segment (zero-fill, fdatasync, map) on a background
    /// thread so rollover is a rename, not a 64 MiB write on the append path.
    pub preallocate_in_background: bool,
    /// Pre-fault segment mappings (`MAP_POPULATE`) so readers do not take
    /// major faults.
    pub populate_map: bool,
    /// Appended frames wait in a buffer of this size until one pwrite
    /// writes them (see `Wal::flush`). Must hold the largest frame.
    pub staging_bytes_max: usize,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            segment_size_bytes: SEGMENT_SIZE_BYTES_DEFAULT,
            record_payload_len_max: RECORD_PAYLOAD_LEN_MAX_DEFAULT,
            syncs_in_flight_max: SYNCS_IN_FLIGHT_MAX_DEFAULT,
            preallocate_in_background: true,
            populate_map: true,
            staging_bytes_max: STAGING_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks the relations between the bounds: a largest record must fit in
    /// an empty segment, or `append` could never place it.
    pub fn validate(&self) -> Result<(), WalError> {
        let size = self.segment_size_bytes;
        if !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&size) {
            return Err(WalError::Config(format!(
                "segment_size_bytes {size} outside {SEGMENT_SIZE_BYTES_MIN}..={SEGMENT_SIZE_BYTES_MAX}"
            )));
        }
        if !size.is_multiple_of(4096) {
            return Err(WalError::Config(format!(
                "segment_size_bytes {size} is not a multiple of 4096"
            )));
        }
        let record_max =
            (SEGMENT_HEADER_LEN + frame_len(self.record_payload_len_max as usize)) as u64;
        if record_max > size {
            return Err(WalError::Config(format!(
                "record_payload_len_max {} does not fit a segment of {size} bytes",
                self.record_payload_len_max
            )));
        }
        let frame_max = frame_len(self.record_payload_len_max as usize);
        if self.staging_bytes_max < frame_max {
            return Err(WalError::Config(format!(
                "staging_bytes_max {} is below the largest record frame ({frame_max} bytes)",
                self.staging_bytes_max
            )));
        }
        if !(1..=SYNCS_IN_FLIGHT_MAX_LIMIT).contains(&self.syncs_in_flight_max) {
            return Err(WalError::Config(format!(
                "syncs_in_flight_max {} outside 1..={SYNCS_IN_FLIGHT_MAX_LIMIT}",
                self.syncs_in_flight_max
            )));
        }
        Ok(())
    }
}
