//! `iris-bench floor`: the physical floors a store-ack cannot beat here.
//!
//! - Loopback round trip: a 100-byte ping-pong over TCP with an echo thread
//!   (client on the first allowed CPU, echo on the last, like driver and server).
//! - Durable write: a 4 KiB `pwrite` + `fdatasync` into a preallocated,
//!   zero-filled file (written and synced before timing, so no extent
//!   conversion or file growth is measured: the WAL's own layout).

use crate::stats::{LatencyHist, LatencySummary};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of one durable write.
pub const SYNC_WRITE_LEN: usize = 4096;
/// Round trips not timed before the timed ones (connection and caches warm up).
const RTT_WARMUP: usize = 1000;
/// Longest the echo side waits on a read before giving up.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct FloorConfig {
    pub dir: PathBuf,
    pub rtt_count: usize,
    pub rtt_size: usize,
    pub sync_count: usize,
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub mode: &'static str,
    pub rtt_size: usize,
    pub rtt_count: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_max_us: f64,
    pub sync_dir: String,
    pub sync_write_bytes: usize,
    pub sync_count: usize,
    pub fdatasync_p50_us: f64,
    pub fdatasync_p99_us: f64,
    pub fdatasync_max_us: f64,
}

pub fn run(cfg: &FloorConfig) -> Result<FloorReport, String> {
    assert!(cfg.rtt_size > 0 && cfg.rtt_count > 0 && cfg.sync_count > 0);
    let rtt = loopback_rtt(cfg.rtt_size, cfg.rtt_count)?;
    let sync = write_fdatasync(&cfg.dir, cfg.sync_count)?;
    Ok(FloorReport {
        mode: "floor",
        rtt_size: cfg.rtt_size,
        rtt_count: cfg.rtt_count,
        rtt_p50_us: rtt.p50_us,
        rtt_p99_us: rtt.p99_us,
        rtt_max_us: rtt.max_us,
        sync_dir: cfg.dir.display().to_string(),
        sync_write_bytes: SYNC_WRITE_LEN,
        sync_count: cfg.sync_count,
        fdatasync_p50_us: sync.p50_us,
        fdatasync_p99_us: sync.p99_us,
        fdatasync_max_us: sync.max_us,
    })
}

/// Ping-pong of `size` bytes, `count` timed round trips.
pub fn loopback_rtt(size: usize, count: usize) -> Result<LatencySummary, String> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let rounds = RTT_WARMUP + count;
    let echo_core = cores.last().copied();
    let echo = std::thread::spawn(move || -> Result<(), String> {
        if let Some(core) = echo_core {
            core_affinity::set_for_current(core);
        }
        let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(ECHO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; size];
        for _ in 0..rounds {
            stream
                .read_exact(&mut buf)
                .map_err(|e| format!("echo read: {e}"))?;
            stream
                .write_all(&buf)
                .map_err(|e| format!("echo write: {e}"))?;
        }
        Ok(())
    });
    if let Some(core) = cores.first() {
        core_affinity::set_for_current(*core);
    }
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(ECHO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let ping = vec![0x5au8; size];
    let mut pong = vec![0u8; size];
    let mut hist = LatencyHist::new();
    for round in 0..rounds {
        let start = Instant::now();
        stream.write_all(&ping).map_err(|e| format!("write: {e}"))?;
        stream
            .read_exact(&mut pong)
            .map_err(|e| format!("read: {e}"))?;
        if round >= RTT_WARMUP {
            hist.record_ns(start.elapsed().as_nanos() as u64);
        }
    }
    assert_eq!(ping, pong, "the echo returned other bytes");
    echo.join()
        .map_err(|_| "echo thread panicked".to_string())??;
    Ok(hist.summary())
}

/// `count` timed 4 KiB writes, each followed by fdatasync, at consecutive
/// offsets of a file filled with zeros and synced beforehand.
pub fn write_fdatasync(dir: &Path, count: usize) -> Result<LatencySummary, String> {
    let path = dir.join(format!("iris-floor-{}.tmp", std::process::id()));
    let result = timed_syncs(&path, count);
    // The file is scratch either way.
    let _ = std::fs::remove_file(&path);
    result
}

fn timed_syncs(path: &Path, count: usize) -> Result<LatencySummary, String> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    let total = count * SYNC_WRITE_LEN;
    let mut written = 0;
    while written < total {
        let n = zeros.len().min(total - written);
        file.write_all_at(&zeros[..n], written as u64)
            .map_err(|e| format!("prefill: {e}"))?;
        written += n;
    }
    file.sync_all().map_err(|e| format!("prefill sync: {e}"))?;
    let block = vec![0xa5u8; SYNC_WRITE_LEN];
    let mut hist = LatencyHist::new();
    for i in 0..count {
        let start = Instant::now();
        file.write_all_at(&block, (i * SYNC_WRITE_LEN) as u64)
            .map_err(|e| format!("write: {e}"))?;
        // A failed fdatasync is reported, never retried (it would lie).
        file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
        hist.record_ns(start.elapsed().as_nanos() as u64);
    }
    Ok(hist.summary())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_both_floors() {
        let rtt = loopback_rtt(100, 200).unwrap();
        assert_eq!(rtt.count, 200);
        assert!(rtt.p50_us > 0.0 && rtt.p50_us <= rtt.p99_us);
        let dir = std::env::temp_dir();
        let sync = write_fdatasync(&dir, 20).unwrap();
        assert_eq!(sync.count, 20);
        assert!(sync.p50_us > 0.0);
        let leftovers = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name().to_string_lossy() == format!("iris-floor-{}.tmp", std::process::id())
            });
        assert!(!leftovers, "the scratch file is removed");
    }
}
