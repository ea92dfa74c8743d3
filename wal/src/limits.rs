//! Every bound of the WAL, named, with its default. `WalConfig::new` starts
//! from these; `WalConfig::validate` checks the relations between them.

/// Default size of one segment file. Large enough that rollover (a rename and
/// a directory sync) is rare, small enough that retention frees disk promptly.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 64 << 20;

/// Smallest segment accepted: one page. The simulator runs with 4-64 KiB.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 4096;

/// Largest segment accepted. Offsets inside a segment are kept as `usize`
/// and segments are mapped whole, so keep them well within one mapping.
pub const SEGMENT_SIZE_BYTES_MAX: u64 = 1 << 32;

/// Default largest record payload (1 MiB). A message body is far smaller;
/// snapshot chunks and batched records must stay below this.
pub const RECORD_PAYLOAD_LEN_MAX_DEFAULT: u32 = 1 << 20;

/// Default number of group commits that may be in flight at once. One is
/// enough for group commit (every append made while a sync runs joins the
/// next one); more only helps when a device completes syncs in parallel.
pub const SYNCS_IN_FLIGHT_MAX_DEFAULT: u32 = 1;

/// Hard upper bound on `syncs_in_flight_max`: the in-flight table is
/// allocated up front with this many slots at most.
pub const SYNCS_IN_FLIGHT_MAX_LIMIT: u32 = 64;

/// Bytes written (and written back, `sync_file_range`) per step when
/// zero-filling a new segment file: what a commit's fdatasync may find
/// queued ahead of it on the device at most.
pub const ZERO_FILL_CHUNK_BYTES: usize = 256 << 10;

/// Default bound of the append staging buffer: records are copied there and
/// written to the active segment with one pwrite when it fills, at a
/// rollover, or at `flush`/`sync_begin`. 4 MiB is 32,768 frames of 100-byte
/// records, far more than a group commit holds at the engine's batch sizes,
/// and small next to a 64 MiB segment. Allocated once, when the log opens
/// (at most one segment's size).
pub const STAGING_BYTES_MAX_DEFAULT: usize = 4 << 20;

/// After a segment file could not be created (a full disk, say), further
/// attempts fail at once, with the same error, for this long. A full disk
/// then costs one zero-fill attempt per interval instead of one per append,
/// and the log recovers by itself once space returns.
pub const SEGMENT_CREATE_RETRY_MS: u64 = 100;
