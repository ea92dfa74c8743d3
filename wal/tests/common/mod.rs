//! Helpers shared by the WAL integration tests.
#![allow(dead_code)]

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use wal::sim::{SimDisk, SimStorage};
use wal::{RecoveryReport, Wal, WalConfig, WalError};

pub type SimWal = Wal<SimStorage>;

/// A fresh directory under the system temp dir, unique per call.
pub fn temp_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "iris-wal-{name}-{}-{nanos}-{n}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn sim_config(segment_size_bytes: u64) -> WalConfig {
    let mut config = WalConfig::new("sim");
    config.segment_size_bytes = segment_size_bytes;
    config.record_payload_len_max = 512;
    config
}

pub fn open_sim(
    disk: &Rc<RefCell<SimDisk>>,
    config: &WalConfig,
) -> Result<(SimWal, RecoveryReport), WalError> {
    Wal::open_with_storage(config.clone(), SimStorage::new(disk.clone()))
}

/// The payload the tests write at a position, so any reader can check it.
pub fn payload_for(position: u64) -> Vec<u8> {
    let len = (position.wrapping_mul(7919) % 200) as usize;
    (0..len)
        .map(|i| (position as u8).wrapping_add(i as u8).wrapping_mul(31))
        .collect()
}

/// Offsets of the records in one segment's bytes.
pub fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut offset = wal::format::SEGMENT_HEADER_LEN;
    while let wal::format::Decoded::Record(_, frame) =
        wal::format::decode_record(&bytes[offset..], u32::MAX)
    {
        offsets.push(offset);
        offset += frame;
    }
    offsets
}
