//! Abuse limits, each named with a default (docs/PROTOCOL.md "Abuse limits"):
//!
//! - per peer address: concurrent connections, new connections per second,
//!   failed logins per minute (past any: ERROR 7 at accept, then close; a
//!   TLS listener just closes);
//! - per user: SENDs per second, a token bucket per user and core (past it:
//!   REJECTED 3, the connection stays up).
//!
//! Addresses are tracked node-wide in one table, keyed by a keyed hash of
//! the address (the slot keeps the 8-byte key), bounded by
//! `ADDRESS_TABLE_ENTRIES_MAX`: when it is full of live entries, new
//! addresses are not tracked (served, and counted in a log line), so a flood
//! from many addresses cannot lock out the rest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Addresses tracked at once.
pub const ADDRESS_TABLE_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AbuseLimits {
    /// Open connections from one address (ERROR 7 past it).
    pub connections_per_address_max: u32,
    /// New connections from one address within a second (ERROR 7 past it).
    pub new_connections_per_address_per_sec: u32,
    /// Refused logins (ERROR 2) from one address within a minute; past it the
    /// address's new connections get ERROR 7 until the minute is over.
    pub failed_logins_per_address_per_min: u32,
    /// SENDs one user may make per second on one core, sustained (REJECTED 3 past it).
    pub sends_per_user_per_sec: u32,
    /// SENDs a user may make in a burst above the sustained rate.
    pub send_burst_per_user: u32,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        // Generous: carrier-grade NAT puts thousands of phones behind one
        // address, and the benchmarks open 15,000 connections from loopback.
        AbuseLimits {
            connections_per_address_max: 20_000,
            new_connections_per_address_per_sec: 10_000,
            failed_logins_per_address_per_min: 600,
            sends_per_user_per_sec: 10_000,
            send_burst_per_user: 20_000,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct AddressState {
    connections: u32,
    second: u64,
    new_in_second: u32,
    minute: u64,
    failed_in_minute: u32,
}

/// Why a connection was turned away at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turned {
    TooManyConnections,
    TooFast,
    TooManyFailedLogins,
}

impl Turned {
    pub fn reason(self) -> &'static str {
        match self {
            Turned::TooManyConnections => "too many connections from this address",
            Turned::TooFast => "connecting too fast from this address",
            Turned::TooManyFailedLogins => "too many failed logins from this address",
        }
    }
}

/// The node's per-address table.
pub struct Addresses {
    limits: AbuseLimits,
    hasher: ahash::RandomState,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<u64, AddressState>,
    /// The second a full table was last swept: at most one O(n) sweep a
    /// second, however many new addresses knock while it stays full.
    swept_second: u64,
}

impl Addresses {
    pub fn new(limits: AbuseLimits) -> Addresses {
        Addresses {
            limits,
            hasher: ahash::RandomState::new(),
            table: Mutex::new(Table::default()),
        }
    }

    /// The key an address is tracked under (0 is never used: "untracked").
    pub fn key(&self, ip: IpAddr) -> u64 {
        self.hasher.hash_one(ip).max(1)
    }

    /// A new connection from `key` at `now_ms`: Ok(tracked) or why not.
    /// `tracked` false: the table was full, nothing to release later.
    pub fn admit(&self, key: u64, now_ms: u64) -> Result<bool, Turned> {
        let (second, minute) = (now_ms / 1000, now_ms / 60_000);
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = &mut *guard;
        let by_key = &mut table.by_key;
        if !by_key.contains_key(&key) && by_key.len() >= ADDRESS_TABLE_ENTRIES_MAX {
            if table.swept_second != second {
                table.swept_second = second;
                by_key.retain(|_, s| s.connections > 0 || s.minute == minute);
            }
            if by_key.len() >= ADDRESS_TABLE_ENTRIES_MAX {
                return Ok(false);
            }
        }
        let s = by_key.entry(key).or_default();
        if s.minute != minute {
            (s.minute, s.failed_in_minute) = (minute, 0);
        }
        if s.second != second {
            (s.second, s.new_in_second) = (second, 0);
        }
        let l = &self.limits;
        if s.failed_in_minute >= l.failed_logins_per_address_per_min {
            return Err(Turned::TooManyFailedLogins);
        }
        if s.new_in_second >= l.new_connections_per_address_per_sec {
            return Err(Turned::TooFast);
        }
        if s.connections >= l.connections_per_address_max {
            return Err(Turned::TooManyConnections);
        }
        s.new_in_second += 1;
        s.connections += 1;
        Ok(true)
    }

    /// A connection admitted (and tracked) under `key` closed.
    pub fn release(&self, key: u64, now_ms: u64) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = table.by_key.get_mut(&key) {
            s.connections = s.connections.saturating_sub(1);
            if s.connections == 0 && s.minute != now_ms / 60_000 {
                table.by_key.remove(&key);
            }
        }
    }

    /// A login from `key` was refused.
    pub fn login_failed(&self, key: u64, now_ms: u64) {
        let minute = now_ms / 60_000;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = table.by_key.get_mut(&key) {
            if s.minute != minute {
                (s.minute, s.failed_in_minute) = (minute, 0);
            }
            s.failed_in_minute = s.failed_in_minute.saturating_add(1);
        }
    }

    pub fn limits(&self) -> &AbuseLimits {
        &self.limits
    }
}

/// A user's SEND token bucket on one core. Made at the user's first SEND;
/// a full bucket is the same as none, so idle ones are swept
/// (`sweep_buckets`): only users who sent lately cost memory.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// Forgets the buckets that have refilled (they equal a fresh one).
pub fn sweep_buckets<K: std::hash::Hash + Eq>(
    buckets: &mut HashMap<K, Bucket, ahash::RandomState>,
    limits: &AbuseLimits,
    now_ms: u64,
) {
    buckets.retain(|_, b| !b.is_full(limits, now_ms));
    if buckets.capacity() > 4 * buckets.len().max(64) {
        buckets.shrink_to_fit();
    }
}

impl Bucket {
    pub fn new(limits: &AbuseLimits, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(limits.send_burst_per_user),
            last_ms: now_ms,
        }
    }

    fn is_full(&self, limits: &AbuseLimits, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens + elapsed * f64::from(limits.sends_per_user_per_sec)
            >= f64::from(limits.send_burst_per_user)
    }

    /// Takes one SEND's token; false when the user is over its rate.
    pub fn take(&mut self, limits: &AbuseLimits, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        let cap = f64::from(limits.send_burst_per_user.max(1));
        self.tokens = (self.tokens + elapsed * f64::from(limits.sends_per_user_per_sec)).min(cap);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AbuseLimits {
        AbuseLimits {
            connections_per_address_max: 3,
            new_connections_per_address_per_sec: 4,
            failed_logins_per_address_per_min: 2,
            sends_per_user_per_sec: 10,
            send_burst_per_user: 5,
        }
    }

    #[test]
    fn an_address_is_bounded_in_connections_rate_and_failed_logins() {
        let a = Addresses::new(limits());
        let k = a.key("10.0.0.1".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(a.admit(k, 1_000), Ok(true));
        }
        assert_eq!(a.admit(k, 1_000), Err(Turned::TooManyConnections));
        a.release(k, 1_000);
        assert_eq!(a.admit(k, 1_000), Ok(true)); // 4th new in this second
        a.release(k, 1_000);
        assert_eq!(a.admit(k, 1_500), Err(Turned::TooFast));
        assert_eq!(a.admit(k, 2_000), Ok(true), "a new second");
        let other = a.key("10.0.0.2".parse().unwrap());
        assert_eq!(
            a.admit(other, 2_000),
            Ok(true),
            "other addresses unaffected"
        );
        a.login_failed(k, 2_000);
        a.login_failed(k, 2_000);
        a.release(k, 2_000);
        assert_eq!(a.admit(k, 3_000), Err(Turned::TooManyFailedLogins));
        assert_eq!(a.admit(k, 61_000), Ok(true), "a new minute");
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = limits();
        let mut b = Bucket::new(&l, 0);
        assert_eq!((0..10).filter(|_| b.take(&l, 0)).count(), 5, "the burst");
        assert!(!b.take(&l, 50));
        assert!(b.take(&l, 100), "one token per 100 ms at 10/s");
        assert!(!b.take(&l, 100));
        assert_eq!(
            (0..20).filter(|_| b.take(&l, 10_000)).count(),
            5,
            "refill capped at the burst"
        );
    }
}
