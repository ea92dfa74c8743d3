//! A planned change of primary (docs/ADMIN.md, "Handover"): the primary
//! hands its role to its replica instead of stopping while ahead of it.
//!
//! 1. **Requested** (`POST /replication/handover`, or SIGTERM of a primary
//!    with a connected replica): every primary shard answers SENDs
//!    not-primary (an edge holds them and writes them to the next primary,
//!    in order; a direct client hears REJECTED 4 and sends again) and logs
//!    no ACK, so its log stops growing.
//! 2. Each shard reports **ready** once its replica holds every record:
//!    mode `replica`, the replica's durable position and ours at the last
//!    position, no SEND waiting for STORED. With etcd, the pair's state
//!    must also say `sync` (what a primary acknowledged alone was caught up
//!    and written), or the replica would not campaign.
//! 3. When every shard is ready, the first core to see it **commits**, and
//!    each shard steps down: its replica stream ends, so its peer sees the
//!    primary go and may be promoted (`iris admin handover`,
//!    `rolling-restart`) or elected (with etcd the pilot hands back the
//!    lease and holds its own campaign for [`CAMPAIGN_HOLD_MS`]).
//!
//! Nothing acknowledged exists only on the node that steps down, so no tail
//! is re-submitted later and no message moves behind later ones. A
//! handover that is not ready within its timeout is abandoned before the
//! commit: the primary takes SENDs again and the caller is told why.

use crate::stats::{HandoverPhase, Mode, NodeStats, Role};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::{Duration, Instant};

/// How long a handover may wait for the replica to hold everything before
/// it is abandoned (`POST /replication/handover?timeout_ms=` overrides, up
/// to [`TIMEOUT_MAX_MS`]; SIGTERM uses `[limits] shutdown_handover_ms`).
pub const TIMEOUT_MS: u64 = 10_000;
pub const TIMEOUT_MAX_MS: u64 = 120_000;
/// After the commit, how long the steps down may take (a maintenance tick
/// each) before the caller is told they did not finish.
pub const STEP_DOWN_WAIT_MS: u64 = 2_000;
/// With etcd: after handing over, this node does not campaign for so long
/// (unless it sees another leader first), so that the replica wins.
pub const CAMPAIGN_HOLD_MS: u64 = 5_000;
/// How often a waiting caller looks at the shards.
pub const POLL_MS: u64 = 2;

/// Why a handover did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    #[error("not the primary")]
    NotPrimary,
    #[error("a handover is already under way")]
    Busy,
    #[error("the replica did not hold every record within {waited_ms} ms ({why}); the primary serves again")]
    NotReady { waited_ms: u64, why: String },
    #[error("committed, but {left} shard(s) had not stepped down within {STEP_DOWN_WAIT_MS} ms")]
    StepDownSlow { left: usize },
}

/// What a primary shard's core knows when it ticks (engine::repl::tick
/// fills it in): enough to say whether its replica holds every record.
pub struct ShardView {
    pub id: usize,
    pub role: Role,
    pub mode: Mode,
    pub last_position: u64,
    pub durable_position: u64,
    /// The connected replica's acknowledged position; None: no replica.
    pub replica_acked: Option<u64>,
    /// SENDs waiting for STORED.
    pub waiting: usize,
}

/// What a shard does on this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No handover: take SENDs.
    Serve,
    /// A handover is under way: take no SENDs, log no ACKs.
    Refuse,
    /// Committed and ready: step down now.
    StepDown,
}

/// A core's part, on its maintenance tick: report readiness, commit when
/// every shard is ready, and say what the shard does.
pub fn decide(v: &ShardView, stats: &NodeStats) -> Decision {
    let Some(s) = stats.shards.get(v.id) else {
        return Decision::Serve;
    };
    if v.role != Role::Primary || stats.handover_phase() == HandoverPhase::Idle {
        s.handover_ready.store(false, Relaxed);
        return Decision::Serve;
    }
    let ready = ready(v, stats);
    s.handover_ready.store(ready, Relaxed);
    if stats.handover_phase() == HandoverPhase::Requested
        && stats.shards.iter().all(|s| s.handover_ready.load(Relaxed))
    {
        stats.handover_move(HandoverPhase::Requested, HandoverPhase::Committed);
    }
    if stats.handover_phase() == HandoverPhase::Committed && ready {
        s.handed_over.store(true, Relaxed);
        return Decision::StepDown;
    }
    Decision::Refuse
}

/// Whether this primary shard's replica holds every record: mode
/// `replica`, acked and durable to the last position, nothing waiting,
/// and with etcd the pair's state `sync`.
fn ready(v: &ShardView, stats: &NodeStats) -> bool {
    let level = v.mode == Mode::Replica
        && v.replica_acked.is_some_and(|a| a >= v.last_position)
        && v.durable_position >= v.last_position
        && v.waiting == 0;
    level
        && (!stats.elected.load(SeqCst)
            || *stats.pair_state.lock().unwrap_or_else(|p| p.into_inner()) == Some("sync"))
}

/// Asks for a handover (idempotent while one is under way).
pub fn request(stats: &NodeStats) -> Result<(), HandoverError> {
    if stats.role() != Role::Primary {
        return Err(HandoverError::NotPrimary);
    }
    // The shards' flags are false here: cleared when the last handover
    // finished or was abandoned (clearing them now could erase a step-down
    // of the handover another caller started).
    if stats.handover_move(HandoverPhase::Idle, HandoverPhase::Requested) {
        tracing::warn!(
            "handover requested: the primary takes no SENDs until its replica holds every record"
        );
        Ok(())
    } else {
        Err(HandoverError::Busy)
    }
}

/// Where the caller's wait stands.
pub enum Progress {
    Waiting,
    Done,
    Failed(HandoverError),
}

/// One look at a handover started at `started` with `timeout`: abandoned
/// (back to Idle) if not committed in time.
pub fn poll(stats: &NodeStats, started: Instant, timeout: Duration) -> Progress {
    let elapsed = started.elapsed();
    match stats.handover_phase() {
        HandoverPhase::Committed => {
            let left = stats
                .shards
                .iter()
                .filter(|s| !s.handed_over.load(Relaxed))
                .count();
            if left == 0 {
                Progress::Done
            } else if elapsed > timeout + Duration::from_millis(STEP_DOWN_WAIT_MS) {
                Progress::Failed(HandoverError::StepDownSlow { left })
            } else {
                Progress::Waiting
            }
        }
        HandoverPhase::Requested if elapsed > timeout => {
            if stats.handover_move(HandoverPhase::Requested, HandoverPhase::Idle) {
                let not_ready = stats
                    .shards
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.handover_ready.load(Relaxed))
                    .map(|(i, _)| i.to_string())
                    .collect::<Vec<_>>();
                clear(stats);
                Progress::Failed(HandoverError::NotReady {
                    waited_ms: elapsed.as_millis() as u64,
                    why: format!("shards not ready: {}", not_ready.join(", ")),
                })
            } else {
                Progress::Waiting // committed meanwhile
            }
        }
        HandoverPhase::Requested => Progress::Waiting,
        HandoverPhase::Idle => Progress::Failed(HandoverError::NotReady {
            waited_ms: elapsed.as_millis() as u64,
            why: "abandoned".into(),
        }),
    }
}

/// Clears the shards' flags of a handover that ended.
fn clear(stats: &NodeStats) {
    for s in &stats.shards {
        s.handover_ready.store(false, Relaxed);
        s.handed_over.store(false, Relaxed);
    }
}

/// Ends a finished handover: back to Idle, so that this node may be
/// promoted (or hand over) again later.
pub fn finish(stats: &NodeStats) {
    clear(stats);
    stats.handover_move(HandoverPhase::Committed, HandoverPhase::Idle);
    stats.handovers_total.fetch_add(1, SeqCst);
    if stats.elected.load(SeqCst) {
        let until = crate::clock::mono_us() + CAMPAIGN_HOLD_MS * 1000;
        stats.campaign_hold_until_us.store(until, SeqCst);
        stats.resign_asked.store(true, SeqCst);
    }
}
