//! What the cores publish for the control thread (admin HTTP, metrics):
//! atomics written once per group commit or replication event, never per
//! message, and read without locks by the control thread.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Primary = 0,
    Replica = 1,
    /// Saw a higher epoch: no longer primary, not (yet) a replica.
    Fenced = 2,
    /// An edge: client connections only, no shard (docs/CLUSTER.md).
    Edge = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// STORED after the local fsync (no replica configured, or durability = "local").
    Local = 0,
    /// STORED after the local fsync and the replica's ack.
    Replica = 1,
    /// The replica is gone past the timeout; serving on local durability (degrade).
    Degraded = 2,
    /// The replica is gone past the timeout; refusing writes (block).
    Blocked = 3,
}

impl Role {
    pub fn name(self) -> &'static str {
        ["primary", "replica", "fenced", "edge"][self as usize]
    }
    fn from_u8(v: u8) -> Role {
        [Role::Primary, Role::Replica, Role::Fenced, Role::Edge][v as usize % 4]
    }
}

impl Mode {
    pub fn name(self) -> &'static str {
        ["local", "replica", "degraded", "blocked"][self as usize]
    }
    fn from_u8(v: u8) -> Mode {
        [Mode::Local, Mode::Replica, Mode::Degraded, Mode::Blocked][v as usize % 4]
    }
}

/// Upper bounds (µs) of the fsync latency histogram buckets; the last is +Inf.
pub const FSYNC_BUCKETS_US: [u64; 12] = [
    25, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000, 50000,
];

/// Upper bounds (µs) of the STORED latency histogram buckets (a SEND reaching
/// its shard to its STORED: durable, and replicated when that is the
/// policy); the last is +Inf.
pub const STORED_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000, 30_000_000,
];

/// REJECTED codes counted one by one (docs/PROTOCOL.md section 5); a code
/// above the last is counted as the last + 1 ("other").
pub const REJECT_CODE_MAX: usize = 6;

/// A histogram one core fills without atomics (plain counts), published to
/// [`NodeStats`] as deltas on the core's maintenance tick.
#[derive(Debug, Clone, Default)]
pub struct LocalHistogram {
    pub buckets: [u64; STORED_BUCKETS_US.len() + 1],
    pub sum_us: u64,
}

impl LocalHistogram {
    pub fn record(&mut self, latency_us: u64) {
        let bucket = STORED_BUCKETS_US
            .iter()
            .position(|&b| latency_us <= b)
            .unwrap_or(STORED_BUCKETS_US.len());
        self.buckets[bucket] += 1;
        self.sum_us += latency_us;
    }
}

#[derive(Default)]
pub struct ShardStats {
    /// This shard's Mode (as u8); the node's mode is the worst of its shards'.
    pub mode: AtomicU8,
    /// Client connections open on this core: published by its acceptor after
    /// each accept and by its maintenance tick; read by the other cores'
    /// acceptors to share the listening socket evenly (runtime::accept_lead).
    pub connections: AtomicU64,
    pub last_position: AtomicU64,
    pub durable_position: AtomicU64,
    pub replica_connected: AtomicBool,
    pub replica_acked_position: AtomicU64,
    /// Positions appended but not yet acknowledged by the replica.
    pub replica_lag_ops: AtomicU64,
    /// Age of the oldest record the replica has not acknowledged, in ms.
    pub replica_lag_ms: AtomicU64,
    /// When the last heartbeat or ack was heard from the peer (engine::clock::mono_ms).
    pub last_heartbeat_ms: AtomicU64,
    /// Records the WAL recovery at start cut off past the durable mark (a
    /// crash's torn tail, or damage there): some may have been acknowledged.
    pub recovery_dropped_records: AtomicU64,
    /// First position of that cut (0: none).
    pub recovery_dropped_from: AtomicU64,
    /// Records a primary took back from its replica after a crash (repair).
    pub recovery_refetched_records: AtomicU64,
    /// Memory the shard's inboxes hold, as allocated (bounded by shard_pending_bytes_max).
    pub inbox_bytes: AtomicU64,
    /// Memory the shard's dedup table holds (bounded by dedup_entries_max).
    pub dedup_bytes: AtomicU64,
    /// Primary: the replica holds every message this shard acknowledged
    /// (engine::election, the pair's `sync` state).
    pub synced: AtomicBool,
    /// Primary: the replica is lost and the shard would degrade, which waits
    /// for the pair's state to say `alone` (with etcd).
    pub wants_alone: AtomicBool,
    /// Primary, during a handover: takes no SENDs, and its replica holds
    /// every record (mode `replica`, acked and durable to the last
    /// position, no SEND waiting): it may step down now.
    pub handover_ready: AtomicBool,
    /// This shard stepped down in the current handover.
    pub handed_over: AtomicBool,
}

/// Where a handover stands (engine::handover), one value for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandoverPhase {
    Idle = 0,
    /// The primary's shards take no SENDs and wait for their replica.
    Requested = 1,
    /// Every shard was ready: each steps down (no way back).
    Committed = 2,
}

pub struct NodeStats {
    role: AtomicU8,
    mode: AtomicU8,
    pub epoch: AtomicU64,
    pub shards: Vec<ShardStats>,
    pub stored_total: AtomicU64,
    pub rejected_total: AtomicU64,
    pub replication_bytes_sent: AtomicU64,
    pub replication_bytes_received: AtomicU64,
    /// Counts per FSYNC_BUCKETS_US bucket, plus one for +Inf.
    pub fsync_buckets: [AtomicU64; FSYNC_BUCKETS_US.len() + 1],
    pub fsync_sum_us: AtomicU64,
    pub fsync_count: AtomicU64,
    /// STORED latency: counts per STORED_BUCKETS_US bucket, plus +Inf.
    pub stored_latency_buckets: [AtomicU64; STORED_BUCKETS_US.len() + 1],
    pub stored_latency_sum_us: AtomicU64,
    /// REJECTED answers by code: index c for code c (1..=REJECT_CODE_MAX),
    /// REJECT_CODE_MAX + 1 for any other.
    pub rejected_by_code: [AtomicU64; REJECT_CODE_MAX + 2],
    /// Set by the control thread (admin promote); each core acts on it once.
    pub promote_requested: AtomicBool,
    /// During a promotion: the new epoch the first core chose (0 otherwise).
    pub promotion_epoch: AtomicU64,
    /// During a promotion: cores that have promoted their shard.
    pub promoted_cores: AtomicUsize,
    /// Slot move steps from the admin API to the cores (engine::moves).
    pub moves: crate::moves::MoveDesk,
    /// The primary's client address, when this node is a replica and knows it.
    pub primary_client_addr: Mutex<Option<String>>,
    /// With etcd: the monotonic time (engine::clock::mono_us) from which the
    /// cores stop acknowledging and taking SENDs; u64::MAX without a lease
    /// (manual failover), 0 when the lease is lost. Set by engine::pilot.
    pub lease_deadline_us: Arc<AtomicU64>,
    /// With etcd, on a clean stop: the lease was handed back (or the attempt
    /// ended), so the process may exit.
    pub lease_released: AtomicBool,
    /// Whether the shards may degrade (acknowledge without the replica):
    /// always without etcd; with etcd once the pair's state says `alone`.
    pub alone_allowed: AtomicBool,
    /// Set by the pilot (lost lease, another leader): each core stops acting
    /// as primary and follows its peer.
    pub demote_requested: AtomicBool,
    /// With etcd: the epoch a promotion must take (the leader key's revision); 0: choose.
    pub promote_epoch: AtomicU64,
    /// The election runs (etcd configured): `promote` asks the pilot.
    pub elected: AtomicBool,
    /// With etcd: an operator asked for a promotion (the pilot campaigns).
    pub election_promote_asked: AtomicBool,
    /// With etcd: who leads the pair as last seen, and its epoch.
    pub leader_seen: Mutex<Option<(String, u64)>>,
    /// With etcd: the pair's state as this node last knew it ("sync", "alone").
    pub pair_state: Mutex<Option<&'static str>>,
    /// The handover of the primary role to the replica (a HandoverPhase).
    pub handover: AtomicU8,
    /// With etcd, after a handover: the election does not campaign before
    /// this instant (engine::clock::mono_us), so that the replica wins.
    pub campaign_hold_until_us: AtomicU64,
    /// With etcd, after a handover: the pilot hands the lease back (once).
    pub resign_asked: AtomicBool,
    /// Messages of dropped tails re-submitted to a new primary.
    pub resubmitted_total: AtomicU64,
    /// Completed handovers (engine::handover).
    pub handovers_total: AtomicU64,
    /// A replica streamed from this node while it was primary, at some
    /// point since it started: a clean stop then hands over (waiting for
    /// the replica to come back if it is gone), never leaving a tail.
    pub replica_ever_seen: AtomicBool,
}

impl NodeStats {
    pub fn handover_phase(&self) -> HandoverPhase {
        match self.handover.load(std::sync::atomic::Ordering::SeqCst) {
            1 => HandoverPhase::Requested,
            2 => HandoverPhase::Committed,
            _ => HandoverPhase::Idle,
        }
    }

    /// Moves the handover from `from` to `to`; false if it was elsewhere.
    pub fn handover_move(&self, from: HandoverPhase, to: HandoverPhase) -> bool {
        self.handover
            .compare_exchange(
                from as u8,
                to as u8,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Open client connections, all cores together.
    pub fn connections(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.connections.load(Relaxed))
            .sum()
    }

    pub fn new(shards: usize, role: Role, mode: Mode, epoch: u64) -> NodeStats {
        NodeStats {
            role: AtomicU8::new(role as u8),
            mode: AtomicU8::new(mode as u8),
            epoch: AtomicU64::new(epoch),
            shards: (0..shards)
                .map(|_| ShardStats {
                    mode: AtomicU8::new(mode as u8),
                    ..ShardStats::default()
                })
                .collect(),
            stored_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            replication_bytes_sent: AtomicU64::new(0),
            replication_bytes_received: AtomicU64::new(0),
            fsync_buckets: Default::default(),
            fsync_sum_us: AtomicU64::new(0),
            fsync_count: AtomicU64::new(0),
            stored_latency_buckets: Default::default(),
            stored_latency_sum_us: AtomicU64::new(0),
            rejected_by_code: Default::default(),
            promote_requested: AtomicBool::new(false),
            promotion_epoch: AtomicU64::new(0),
            promoted_cores: AtomicUsize::new(0),
            moves: Default::default(),
            primary_client_addr: Mutex::new(None),
            lease_deadline_us: Arc::new(AtomicU64::new(u64::MAX)),
            lease_released: AtomicBool::new(false),
            alone_allowed: AtomicBool::new(true),
            demote_requested: AtomicBool::new(false),
            promote_epoch: AtomicU64::new(0),
            elected: AtomicBool::new(false),
            election_promote_asked: AtomicBool::new(false),
            leader_seen: Mutex::new(None),
            pair_state: Mutex::new(None),
            handover: AtomicU8::new(HandoverPhase::Idle as u8),
            campaign_hold_until_us: AtomicU64::new(0),
            resign_asked: AtomicBool::new(false),
            resubmitted_total: AtomicU64::new(0),
            handovers_total: AtomicU64::new(0),
            replica_ever_seen: AtomicBool::new(false),
        }
    }

    /// Lease time left in ms (None without a lease: manual failover).
    pub fn lease_ms_left(&self) -> Option<u64> {
        match self.lease_deadline_us.load(Relaxed) {
            u64::MAX => None,
            d => Some(d.saturating_sub(crate::clock::mono_us()) / 1000),
        }
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.role.load(Relaxed))
    }
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Relaxed);
    }
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Relaxed))
    }

    /// Publishes one shard's mode. The node's mode changes only once every
    /// shard is in the new mode, so "blocked" means every shard refuses and
    /// "replica" means every shard waits for the replica (shards move a few
    /// milliseconds apart).
    pub fn set_shard_mode(&self, shard: usize, mode: Mode) {
        if let Some(s) = self.shards.get(shard) {
            s.mode.store(mode as u8, Relaxed);
        }
        if self
            .shards
            .iter()
            .all(|s| s.mode.load(Relaxed) == mode as u8)
        {
            self.mode.store(mode as u8, Relaxed);
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Relaxed);
    }

    pub fn record_fsync(&self, latency_us: u64) {
        let bucket = FSYNC_BUCKETS_US
            .iter()
            .position(|&b| latency_us <= b)
            .unwrap_or(FSYNC_BUCKETS_US.len());
        self.fsync_buckets[bucket].fetch_add(1, Relaxed);
        self.fsync_sum_us.fetch_add(latency_us, Relaxed);
        self.fsync_count.fetch_add(1, Relaxed);
    }

    /// Adds what a core's histogram counted since `published`, and
    /// remembers it as published.
    pub fn publish_stored_latency(&self, now: &LocalHistogram, published: &mut LocalHistogram) {
        for (i, (n, p)) in now.buckets.iter().zip(published.buckets.iter()).enumerate() {
            if n > p {
                self.stored_latency_buckets[i].fetch_add(n - p, Relaxed);
            }
        }
        self.stored_latency_sum_us
            .fetch_add(now.sum_us.saturating_sub(published.sum_us), Relaxed);
        *published = now.clone();
    }

    /// Adds a core's REJECTED counts by code since `published`.
    pub fn publish_rejected(
        &self,
        now: &[u64; REJECT_CODE_MAX + 2],
        published: &mut [u64; REJECT_CODE_MAX + 2],
    ) {
        for (i, (n, p)) in now.iter().zip(published.iter()).enumerate() {
            self.rejected_by_code[i].fetch_add(n.saturating_sub(*p), Relaxed);
        }
        *published = *now;
    }
}

/// The `rejected_by_code` index of REJECTED `code`.
pub fn reject_code_index(code: u16) -> usize {
    match code as usize {
        c @ 1..=REJECT_CODE_MAX => c,
        _ => REJECT_CODE_MAX + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_histogram_buckets() {
        let s = NodeStats::new(1, Role::Primary, Mode::Local, 1);
        s.record_fsync(10);
        s.record_fsync(75);
        s.record_fsync(1_000_000);
        assert_eq!(s.fsync_buckets[0].load(Relaxed), 1);
        assert_eq!(s.fsync_buckets[2].load(Relaxed), 1);
        assert_eq!(s.fsync_buckets[FSYNC_BUCKETS_US.len()].load(Relaxed), 1);
        assert_eq!(s.fsync_count.load(Relaxed), 3);
        s.set_mode(Mode::Degraded);
        assert_eq!(s.mode().name(), "degraded");
        s.set_role(Role::Fenced);
        assert_eq!(s.role().name(), "fenced");
    }
}
