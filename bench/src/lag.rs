//! Replica lag under load: samples the primary's `GET /replication/stats`
//! (admin HTTP) every few milliseconds while `msgs` measures, and keeps the
//! largest per-shard `lag_ms` of each sample in a histogram. The operator
//! token comes from `IRIS_ADMIN_TOKEN_FILE`, else `./iris-data/admin.token`
//! (engine::admin_auth::client_token).

use crate::stats::{LatencyHist, LatencySummary};
use engine::admin_http::AdminClient;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Time between two samples.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Largest admin response read.
const RESPONSE_BYTES_MAX: usize = 1 << 20;
const IO_TIMEOUT_MS: u64 = 2_000;

pub struct LagSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(LatencyHist, u64)>,
}

/// Starts sampling; `stop()` returns the histogram of lag (ms as µs×1000) and failed samples.
pub fn start(admin: SocketAddr) -> LagSampler {
    assert!(admin.ip().is_loopback(), "benchmarks only talk to loopback");
    let token = engine::admin_auth::client_token(None, None)
        .unwrap_or_else(|e| panic!("the admin token for lag samples: {e}"));
    let client = AdminClient::new(admin.to_string(), token);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let (mut hist, mut failed) = (LatencyHist::new(), 0);
        while !flag.load(Ordering::Relaxed) {
            match sample(&client) {
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
fn sample(admin: &AdminClient) -> Option<u64> {
    let (status, body) = admin
        .call_bytes(
            "GET",
            "/replication/stats",
            &[],
            RESPONSE_BYTES_MAX,
            IO_TIMEOUT_MS,
        )
        .ok()?;
    let stats: serde_json::Value = serde_json::from_slice(&body)
        .ok()
        .filter(|_| status == 200)?;
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
