//! Replica lag under load: samples the primary's `GET /replication/stats`
//! (admin HTTP) every few milliseconds while `msgs` measures, and keeps the
//! largest per-shard `lag_ms` of each sample in a histogram.

use crate::stats::{LatencyHist, LatencySummary};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Time between two samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Largest admin response read.
const RESPONSE_BYTES_MAX: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

pub struct LagSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(LatencyHist, u64)>,
}

/// Starts sampling; `stop()` returns the histogram of lag (ms as µs×1000) and failed samples.
pub fn start(admin: SocketAddr) -> LagSampler {
    assert!(admin.ip().is_loopback(), "benchmarks only talk to loopback");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut hist, mut failed) = (LatencyHist::new(), 0);
        while !flag.load(Ordering::Relaxed) {
            match sample(admin) {
                Some(lag_ms) => hist.record_ns(lag_ms.max(1) * 1_000_000),
                None => failed += 1,
            }
            std::thread::sleep(SAMPLE_EVERY);
        }
        (hist, failed)
    });
    LagSampler { stop, handle }
}

impl LagSampler {
    pub fn stop(self) -> (LatencySummary, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (hist, failed) = self.handle.join().unwrap_or_default();
        (hist.summary(), failed)
    }
}

/// The largest replica `lag_ms` over the primary's shards, or None.
fn sample(admin: SocketAddr) -> Option<u64> {
    let mut stream = TcpStream::connect_timeout(&admin, IO_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let request =
        format!("GET /replication/stats HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut response)
        .ok()?;
    let body_at = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let stats: serde_json::Value = serde_json::from_slice(&response[body_at..]).ok()?;
    let shards = stats.get("shards")?.as_array()?;
    shards
        .iter()
        .flat_map(|s| {
            s.get("replicas")
                .and_then(|r| r.as_array())
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|r| r.get("lag_ms").and_then(|v| v.as_u64()))
        .max()
}
