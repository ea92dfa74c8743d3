//! Rate-limited log lines for errors that can repeat once per request (a full
//! disk rejects every SEND): the first is logged at once, later ones at most
//! once per interval, with how many were suppressed in between.

use std::time::{Duration, Instant};

/// How often one kind of repeating error is logged at most.
pub const REPEATED_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct LogEvery {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    /// `Some(n)` when this occurrence should be logged (`n` earlier ones were
    /// not); `None` when it falls within the interval and is only counted.
    pub fn check(&mut self, interval: Duration) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_logged_then_counted_until_the_interval_passes() {
        let mut log = LogEvery::default();
        assert_eq!(log.check(Duration::from_secs(60)), Some(0));
        assert_eq!(log.check(Duration::from_secs(60)), None);
        assert_eq!(log.check(Duration::from_secs(60)), None);
        assert_eq!(log.check(Duration::ZERO), Some(2));
    }
}
