//! The node's two clocks, and which one each reading must come from
//! (docs/DECISIONS.md 20).
//!
//! - [`mono_us`] / [`mono_ms`]: the monotonic clock. Every deadline, timeout,
//!   rate and window counts on it: idle, HELLO and keep-alive timeouts, rate
//!   buckets and per-address counts, MQTT sessions' last use, the dedup
//!   window, the replica-loss timeout, the etcd lease deadline. NTP stepping
//!   the wall clock (or an operator's `date -s`) moves none of them.
//! - [`wall_ms`]: the wall clock, for the timestamps people read (a message's
//!   `sent_ms`, WELCOME's `server_time_ms`, heartbeats' informational
//!   `now_ms`) and for what is defined against it (a JWT's `exp`).
//!
//! The monotonic clock starts at the wall clock's reading when the process
//! first asks (never below [`MONO_START_MS_MIN`]) and then only moves with
//! `Instant`. So its readings look like Unix times near the start, 0 stays
//! free as "never", `now - timeout` never saturates, and a stamp a process
//! persisted (a dedup entry's time in a checkpoint) is compared with the
//! wall clock after a restart: the only clock that spans one. Never show a
//! monotonic reading to people as a date: after a step it differs from the
//! wall clock by the step.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The monotonic clock's lowest starting point (one day, in ms): a host whose
/// wall clock reads 1970 at boot still gets readings far from 0.
pub const MONO_START_MS_MIN: u64 = 24 * 3600 * 1000;

/// The instant of the first reading and the clock's value then (µs).
fn start() -> &'static (Instant, u64) {
    static START: OnceLock<(Instant, u64)> = OnceLock::new();
    START.get_or_init(|| (Instant::now(), wall_ms().max(MONO_START_MS_MIN) * 1000))
}

/// Microseconds on the monotonic clock.
pub fn mono_us() -> u64 {
    let (at, base_us) = start();
    base_us + at.elapsed().as_micros() as u64
}

/// Milliseconds on the monotonic clock.
pub fn mono_ms() -> u64 {
    mono_us() / 1000
}

/// Milliseconds since the Unix epoch on the wall clock (0 if it reads before
/// 1970): only for timestamps people read, never for a deadline.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_starts_near_the_wall_clock_and_never_goes_back() {
        let (mono, wall) = (mono_ms(), wall_ms());
        assert!(mono >= MONO_START_MS_MIN);
        // Started at the wall clock's reading; nothing stepped it in a test.
        assert!(mono.abs_diff(wall) < 60_000, "mono {mono} wall {wall}");
        let mut last = mono_us();
        for _ in 0..1000 {
            let now = mono_us();
            assert!(now >= last);
            last = now;
        }
    }
}
