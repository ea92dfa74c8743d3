//! A shard: for the users hashed to it, their inboxes (ordered, with per-recipient
//! seq numbers), the dedup table, where their receiving connection lives, and the
//! WAL that makes all of it durable. Owned by exactly one core; no locks.
//!
//! The shard is sans-IO towards the network: it reports what connections must
//! hear through a [`Sink`], and it never waits for the disk: it appends, and
//! the core's committer tells it when positions become durable.

use crate::chunked::ChunkedQueue;
use crate::clock::mono_us;
use crate::config::Limits;
use crate::dedup::{sender_hash, Dedup};
use crate::lograte::{LogEvery, REPEATED_ERROR_LOG_INTERVAL};
use crate::memory;
use crate::record::{self, Decoded, MsgRecord};
use crate::slots::Ownership;
use crate::stats::{Mode, Role};
use net::{reject_code, MsgId};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use wal::{Wal, WalConfig};

/// Where a connection lives: its core, its slot in that core's arena, and the
/// slot's generation (a reused slot never receives a stale connection's traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub core: u16,
    /// 0: a client connection in `core`'s arena. Otherwise the node link
    /// (from an edge) accepted on `core`, and `slot` and `generation` name
    /// the connection in that edge core's arena (engine::link).
    pub link: u16,
    pub slot: u32,
    pub generation: u32,
}

/// What the shard has to tell connections. Implemented by the core, which
/// writes to a local connection directly or forwards to the connection's core.
pub trait Sink {
    fn stored(&mut self, conn: ConnRef, msg_id: MsgId);
    fn rejected(&mut self, conn: ConnRef, msg_id: MsgId, code: u16, reason: &str);
    /// Refused because this shard does not take writes now (a replica, or
    /// fenced). A client connected here hears REJECTED 4 with `reason`; an
    /// edge hears RETRY and sends it again to the pair's primary.
    fn not_primary(&mut self, conn: ConnRef, msg_id: MsgId, reason: &str);
    fn welcome(&mut self, conn: ConnRef, pending: u64);
    fn deliver(&mut self, conn: ConnRef, msg: &PendingMsg);
}

/// A stored, not yet acknowledged message. The sender and the body share one
/// heap block (a pending message costs one allocation besides its queue slot).
#[derive(Debug)]
pub struct PendingMsg {
    pub seq: u64,
    pub msg_id: MsgId,
    pub sent_ms: u64,
    /// WAL position of the record; deliverable once durable.
    pub position: u64,
    /// The sender's id, then the body.
    data: Box<[u8]>,
    from_len: u8,
}

// A queue slot is what every pending message costs besides its block: keep it small.
const _: () = assert!(std::mem::size_of::<PendingMsg>() <= 64);
// A sender id travels in a `str` field, so its length fits `from_len`.
const _: () = assert!(net::limits::STR_LEN_MAX <= u8::MAX as usize);

impl PendingMsg {
    pub fn new(
        seq: u64,
        msg_id: MsgId,
        from: &str,
        sent_ms: u64,
        body: &[u8],
        position: u64,
    ) -> Self {
        assert!(
            from.len() <= net::limits::STR_LEN_MAX,
            "sender id over the wire limit"
        );
        let mut data = Vec::with_capacity(from.len() + body.len());
        data.extend_from_slice(from.as_bytes());
        data.extend_from_slice(body);
        PendingMsg {
            seq,
            msg_id,
            sent_ms,
            position,
            data: data.into_boxed_slice(),
            from_len: from.len() as u8,
        }
    }

    pub fn from(&self) -> &str {
        std::str::from_utf8(&self.data[..self.from_len as usize]).expect("built from a &str")
    }

    pub fn body(&self) -> &[u8] {
        &self.data[self.from_len as usize..]
    }

    /// Heap bytes of the message's block (its queue slot is counted with the queue).
    fn heap_bytes(&self) -> usize {
        memory::alloc_bytes(self.data.len())
    }
}

/// Heap bytes of one entry of the inbox table (key, inbox).
const INBOX_SLOT_BYTES: usize = std::mem::size_of::<(Rc<str>, Inbox)>();

struct Presence {
    conn: ConnRef,
    /// Highest seq sent to this connection.
    sent_up_to: u64,
    /// The connection's outbox is full: wait for its Resume.
    paused: bool,
    /// Listed in `Shard::stalled`: its next message waits for the commit position.
    stalled: bool,
}

#[derive(Default)]
struct Inbox {
    /// Highest seq assigned; the next message gets last_seq + 1.
    last_seq: u64,
    /// Every seq <= acked is consumed.
    acked: u64,
    /// Exactly the messages with seq in (acked, last_seq], in order.
    pending: ChunkedQueue<PendingMsg>,
    presence: Option<Presence>,
}

/// A STORED answer waiting for its position to become durable.
struct Waiting {
    position: u64,
    reply: ConnRef,
    msg_id: MsgId,
    /// When the SEND reached the shard (`mono_us`), for the STORED latency.
    since_us: u64,
}

/// The WAL settings of a shard's log in `dir` under `limits`.
pub fn wal_config(dir: &Path, limits: &Limits) -> WalConfig {
    let mut config = WalConfig::new(dir);
    config.segment_size_bytes = limits.wal_segment_bytes;
    // The largest record: a MSG (a body within a frame, plus two ids and fixed
    // fields) or a full DEDUP batch.
    let dedup_record_len = 4 + 34 * record::DEDUP_ENTRIES_PER_RECORD;
    config.record_payload_len_max =
        (limits.frame_len_max as usize).max(dedup_record_len) as u32 + 512;
    config
}

/// Test hook (`IRIS_TEST_DURABLE_MARK=1` in the environment): after every
/// completed fsync the shard writes its durable position, as text, to this
/// file in its WAL directory (no fsync: it is read after a kill -9, when the
/// page cache survives). A power-cut test cuts the log back to it
/// (tests/tests/cluster.rs): what a power cut would leave of the log at
/// worst.
pub const DURABLE_MARK_FILE: &str = "durable-mark";
pub const DURABLE_MARK_ENV: &str = "IRIS_TEST_DURABLE_MARK";

/// A message of a dropped tail, to send again to the new primary.
#[derive(Debug, Clone)]
pub struct Resubmit {
    pub sender: Box<str>,
    pub recipient: Box<str>,
    pub msg_id: MsgId,
    pub body: Box<[u8]>,
}

/// A request to store one message (from a local or a remote connection).
pub struct SendRequest<'a> {
    pub reply: ConnRef,
    pub sender: &'a str,
    pub msg_id: MsgId,
    pub to: &'a str,
    pub sent_ms: u64,
    pub body: Box<[u8]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard}: {source}")]
    Wal {
        shard: usize,
        #[source]
        source: wal::WalError,
    },
    #[error("shard {shard}: WAL record at position {position}: {why}")]
    Replay {
        shard: usize,
        position: u64,
        why: String,
    },
    /// A record from the primary that this replica's state cannot take:
    /// the two logs differ before it, which the sync on connect exists to
    /// prevent (our own broken invariant). Refused, not logged: the
    /// replica stays as it was, and says so at every attempt.
    #[error("shard {shard}: the primary's record at position {position} does not fit this replica's state ({why}): the logs diverged before it; a full resync is needed (restart this node with an empty data directory)")]
    Diverged {
        shard: usize,
        position: u64,
        why: String,
    },
}

/// Bytes of one shard's part of a slot move (`export_slots`): the range's
/// inboxes and dedup entries travel through the admin API in one body. A
/// larger range is refused; move it in smaller ranges.
pub const MOVE_BYTES_MAX: usize = 256 << 20;

/// Why a slot move step failed on a shard.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The request does not fit this node's state (an operator's mistake).
    #[error("{0}")]
    Refused(&'static str),
    /// The exported records are not a range's state (bad bytes from a peer).
    #[error("malformed slot move records: {0}")]
    Malformed(String),
    #[error("the range's state is over {MOVE_BYTES_MAX} bytes; move a smaller range")]
    TooLarge,
    /// The log failed (the environment).
    #[error(transparent)]
    Shard(#[from] ShardError),
}

struct CheckpointState {
    /// Bytes in the log since its last CKPT record: counted by replay and by
    /// the replica's stream as well as by appends, so a restarted or promoted
    /// node does not start from 0 and a short tenure still reaches a checkpoint.
    appended_bytes: u64,
    /// A checkpoint written but not yet durable: (start, end) positions.
    in_progress: Option<(u64, u64)>,
}

impl CheckpointState {
    /// One record in the log, in position order (a CKPT starts the count again).
    fn count(&mut self, record_type: u8, payload_len: usize) {
        if record_type == record::CKPT {
            self.appended_bytes = 0;
        } else {
            self.appended_bytes += payload_len as u64 + 32;
        }
    }
}

pub struct Shard {
    pub id: usize,
    wal: Wal,
    epoch: u64,
    /// Primary: takes SENDs. Replica: applies the primary's stream. Fenced:
    /// saw a higher epoch, refuses SENDs.
    pub role: Role,
    /// What STORED waits for (see stats::Mode).
    pub mode: Mode,
    /// Highest position the replica reported durable (primary side).
    replica_acked: u64,
    /// REJECTED 4's reason when this shard does not take writes.
    not_primary_reason: String,
    /// Primary, during a handover (engine::handover): SENDs are answered
    /// not-primary (an edge holds them and sends them to the new primary)
    /// and ACKs are not logged, so that the replica catches up with a log
    /// that no longer grows.
    pub handing_over: bool,
    /// With etcd: the node's lease deadline (on [`mono_us`]'s clock, u64::MAX
    /// none); from it on this shard neither answers STORED nor takes SENDs.
    lease_deadline: Option<Arc<AtomicU64>>,
    /// Online recipients whose next message waits for the commit position
    /// (bounded by the online users); pumped again when it advances.
    stalled: Vec<Rc<str>>,
    live: Live,
    waiting: VecDeque<Waiting>,
    /// SEND-to-STORED latency of the answers given here (published by the core).
    pub stored_latency: crate::stats::LocalHistogram,
    limits: Limits,
    scratch: Vec<u8>,
    checkpoint: CheckpointState,
    /// Rate limit of the "WAL append failed" line (a full disk fails every SEND).
    append_errors: LogEvery,
    /// Rate limit of the "checkpoint failed" line (retried every maintenance tick).
    pub checkpoint_errors: LogEvery,
    /// A cluster node's slot ownership (None: a single node serves every slot).
    /// Shard 0's log holds the node's SLOTS decisions.
    ownership: Option<Ownership>,
}

impl Shard {
    /// Opens (or creates) the shard's WAL under `dir` and replays it.
    pub fn open(
        id: usize,
        dir: &Path,
        limits: &Limits,
        ownership: Option<Ownership>,
    ) -> Result<(Shard, wal::RecoveryReport), ShardError> {
        let config = wal_config(dir, limits);
        let (wal, report) =
            Wal::open(config).map_err(|source| ShardError::Wal { shard: id, source })?;
        let epoch = wal.last_epoch().max(1);
        let mut shard = Shard {
            id,
            wal,
            epoch,
            role: Role::Primary,
            mode: Mode::Local,
            replica_acked: 0,
            not_primary_reason: String::new(),
            handing_over: false,
            lease_deadline: None,
            stalled: Vec::new(),
            live: Live::new(limits),
            waiting: VecDeque::new(),
            stored_latency: Default::default(),
            limits: limits.clone(),
            scratch: Vec::with_capacity(limits.frame_len_max as usize + 256),
            checkpoint: CheckpointState {
                appended_bytes: 0,
                in_progress: None,
            },
            append_errors: LogEvery::default(),
            checkpoint_errors: LogEvery::default(),
            ownership,
        };
        shard.replay()?;
        Ok((shard, report))
    }

    /// Rebuilds the live state. A log that no longer begins at position 1 was
    /// cut by retention: it begins with the tail of old history, then the
    /// checkpoint that restates all of it, so replay starts at that checkpoint.
    fn replay(&mut self) -> Result<(), ShardError> {
        if self.wal.last_position() == 0 {
            return Ok(());
        }
        let start = self.replay_start()?;
        let shard = self.id;
        let iter = self
            .wal
            .iter_from(start)
            .map_err(|source| ShardError::Wal { shard, source })?;
        self.checkpoint.appended_bytes = 0;
        for item in iter {
            let rec = item.map_err(|source| ShardError::Wal { shard, source })?;
            self.checkpoint.count(rec.record_type, rec.payload.len());
            let position = rec.position;
            let decoded =
                record::decode(rec.record_type, rec.payload).map_err(|e| ShardError::Replay {
                    shard,
                    position,
                    why: e.to_string(),
                })?;
            apply_record(
                shard,
                &mut self.live,
                self.ownership.as_ref(),
                position,
                decoded,
            )
            .map_err(|why| ShardError::Replay {
                shard,
                position,
                why,
            })?;
        }
        Ok(())
    }

    /// One record of the log (replayed, replicated or just appended) applied
    /// to the live state, or to the node's slot table.
    fn apply(&mut self, position: u64, decoded: Decoded<'_>) -> Result<(), String> {
        apply_record(
            self.id,
            &mut self.live,
            self.ownership.as_ref(),
            position,
            decoded,
        )
    }

    fn replay_start(&self) -> Result<u64, ShardError> {
        let (shard, first) = (self.id, self.wal.first_position());
        if first <= 1 {
            return Ok(1);
        }
        let iter = self
            .wal
            .iter_from(first)
            .map_err(|source| ShardError::Wal { shard, source })?;
        for item in iter {
            let rec = item.map_err(|source| ShardError::Wal { shard, source })?;
            if rec.record_type != record::CKPT {
                continue;
            }
            if let Ok(Decoded::Checkpoint { start }) = record::decode(rec.record_type, rec.payload)
            {
                if start >= first {
                    return Ok(start);
                }
            }
        }
        Err(ShardError::Replay {
            shard,
            position: first,
            why: "the log was cut by retention but holds no complete checkpoint".into(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn wal_mut(&mut self) -> &mut Wal {
        &mut self.wal
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// True when appended records wait for a sync.
    pub fn needs_sync(&self) -> bool {
        self.wal.last_position() > self.wal.durable_position()
    }

    /// SENDs whose STORED waits for durability.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Heap held by the inboxes (bounded by shard_pending_bytes_max) and by the dedup table.
    pub fn memory_bytes(&self) -> (usize, usize) {
        (self.live.memory_bytes(), self.live.dedup.heap_bytes())
    }

    pub fn users(&self) -> usize {
        self.live.inboxes.len()
    }

    /// With etcd: STORED and SENDs stop at the node's lease deadline.
    pub fn set_lease_deadline(&mut self, deadline: Arc<AtomicU64>) {
        self.lease_deadline = Some(deadline);
    }

    /// Whether the lease (if any) still covers this instant.
    fn lease_valid(&self) -> bool {
        match &self.lease_deadline {
            None => true,
            Some(d) => match d.load(Relaxed) {
                u64::MAX => true,
                d => mono_us() < d,
            },
        }
    }

    /// Primary, and within its lease: may acknowledge and take SENDs.
    pub fn acting(&self) -> bool {
        self.role == Role::Primary && self.lease_valid()
    }

    /// Stores one message, or answers at once (duplicate already durable, or a limit).
    pub fn send(&mut self, req: SendRequest<'_>, sink: &mut impl Sink) -> Result<(), ShardError> {
        if self.role != Role::Primary {
            sink.not_primary(req.reply, req.msg_id, &self.not_primary_reason);
            return Ok(());
        }
        if !self.lease_valid() {
            let reason = "not the primary for sure: its lease in etcd is not renewed";
            sink.not_primary(req.reply, req.msg_id, reason);
            return Ok(());
        }
        if self.handing_over {
            let reason = "handing the primary role over to the replica: send again shortly";
            sink.not_primary(req.reply, req.msg_id, reason);
            return Ok(());
        }
        if self.mode == Mode::Blocked {
            let reason = "no durable quorum: the replica is unavailable";
            sink.rejected(req.reply, req.msg_id, reject_code::UNAVAILABLE, reason);
            return Ok(());
        }
        let slot = net::slot_of(req.to);
        if self
            .ownership
            .as_ref()
            .is_some_and(|o| !o.takes_sends(slot))
        {
            // Moving (or moved) to another pair: an edge keeps the SEND and
            // sends it to the new owner once it hears MOVED.
            sink.not_primary(req.reply, req.msg_id, "the recipient's slot is moving");
            return Ok(());
        }
        let key = (sender_hash(req.sender), req.msg_id);
        if let Some(position) = self.live.dedup.get(&key) {
            self.answer_when_durable(position, req.reply, req.msg_id, sink);
            return Ok(());
        }
        // One lookup finds the recipient's key, its next seq, and its limit.
        let (recipient, seq, queue) = match self.live.inboxes.get_key_value(req.to) {
            Some((k, inbox)) => (
                Some(k.clone()),
                inbox.last_seq + 1,
                Some((inbox.pending.len(), inbox.pending.push_cost_bytes())),
            ),
            None => (None, 1, None),
        };
        let cost = self
            .live
            .send_cost_bytes(queue, req.to, req.sender.len() + req.body.len());
        if let Some((code, reason)) = self.refuse(queue.map(|(len, _)| len), cost) {
            sink.rejected(req.reply, req.msg_id, code, reason);
            return Ok(());
        }
        let m = MsgRecord {
            recipient: req.to,
            seq,
            sender: req.sender,
            msg_id: req.msg_id,
            sent_ms: req.sent_ms,
            body: &req.body,
        };
        record::encode_msg(&m, &mut self.scratch);
        let position = match self.append(record::MSG) {
            Ok(p) => p,
            Err(e) => {
                if let Some(suppressed) = self.append_errors.check(REPEATED_ERROR_LOG_INTERVAL) {
                    tracing::error!(shard = self.id, error = %e, suppressed, "WAL append failed; SEND rejected (repeats logged every 5 s)");
                }
                sink.rejected(
                    req.reply,
                    req.msg_id,
                    reject_code::UNAVAILABLE,
                    "storage unavailable",
                );
                return Err(e);
            }
        };
        // The dedup window counts on the monotonic clock from now, not from
        // sent_ms: that is the wall clock of the edge that took the SEND
        // (another machine's, perhaps), stepped by NTP (DECISIONS 20).
        let now_us = mono_us();
        self.live.dedup.insert(key, position, now_us / 1000, slot);
        let msg = PendingMsg::new(
            seq,
            req.msg_id,
            req.sender,
            req.sent_ms,
            &req.body,
            position,
        );
        let recipient = recipient.unwrap_or_else(|| self.live.add_user(req.to));
        let inbox = self.live.inboxes.get_mut(&*recipient).expect("present");
        inbox.last_seq = seq;
        self.live.inbox_bytes += inbox.push(msg);
        // An online recipient waits for this message's commit like any other.
        if let Some(p) = inbox.presence.as_mut().filter(|p| !p.stalled) {
            p.stalled = true;
            self.stalled.push(recipient);
        }
        self.waiting.push_back(Waiting {
            position,
            reply: req.reply,
            msg_id: req.msg_id,
            since_us: now_us,
        });
        Ok(())
    }

    /// A limit that refuses this SEND, if any.
    /// `pending_len`: the recipient's pending messages, None for a new recipient;
    /// `cost_bytes`: the memory storing it adds (`Live::send_cost_bytes`).
    fn refuse(&self, pending_len: Option<usize>, cost_bytes: usize) -> Option<(u16, &'static str)> {
        if pending_len.is_some_and(|n| n >= self.limits.inbox_len_max) {
            Some((reject_code::INBOX_FULL, "recipient inbox full"))
        } else if pending_len.is_none() && self.live.inboxes.len() >= self.limits.inbox_users_max {
            Some((reject_code::UNAVAILABLE, "shard user table full"))
        } else if self.live.memory_bytes() + cost_bytes > self.limits.shard_pending_bytes_max {
            Some((reject_code::UNAVAILABLE, "shard pending memory full"))
        } else {
            None
        }
    }

    fn append(&mut self, record_type: u8) -> Result<u64, ShardError> {
        let shard = self.id;
        let position = self
            .wal
            .append(self.epoch, record_type, &self.scratch)
            .map_err(|source| ShardError::Wal { shard, source })?;
        self.checkpoint.appended_bytes += self.scratch.len() as u64 + 32;
        Ok(position)
    }

    fn answer_when_durable(
        &mut self,
        position: u64,
        reply: ConnRef,
        msg_id: MsgId,
        sink: &mut impl Sink,
    ) {
        if position <= self.commit_position() {
            sink.stored(reply, msg_id);
        } else {
            // A duplicate of a record still in flight: answered with it, in position order.
            let at = self.waiting.partition_point(|w| w.position <= position);
            self.waiting.insert(
                at,
                Waiting {
                    position,
                    reply,
                    msg_id,
                    since_us: mono_us(),
                },
            );
        }
    }

    /// Called by the committer when a sync completed: answers STORED and delivers.
    pub fn on_durable(&mut self, sink: &mut impl Sink) {
        if self.role == Role::Primary && !self.lease_valid() {
            // Past the lease deadline: no STORED, no delivery; the waiting
            // SENDs are answered when the node steps down (or renews).
            return;
        }
        let durable = self.commit_position();
        let now_us = mono_us();
        while self.waiting.front().is_some_and(|w| w.position <= durable) {
            let w = self.waiting.pop_front().expect("front checked");
            self.stored_latency
                .record(now_us.saturating_sub(w.since_us));
            sink.stored(w.reply, w.msg_id);
        }
        // Online recipients whose next message waited for the commit position
        // (marked by SEND, by a pump that stopped at it, by a login).
        for user in std::mem::take(&mut self.stalled) {
            if let Some(p) = self
                .live
                .inboxes
                .get_mut(&*user)
                .and_then(|i| i.presence.as_mut())
            {
                p.stalled = false;
            }
            self.pump(&user, sink);
        }
        self.finish_checkpoint();
    }

    /// Sends a recipient's durable, undelivered messages, within its window.
    fn pump(&mut self, user: &str, sink: &mut impl Sink) {
        if !self.acting() {
            return; // a replica delivers nothing until promoted
        }
        let durable = self.commit_position();
        let window = self.limits.deliver_window;
        let Some(inbox) = self.live.inboxes.get_mut(user) else {
            return;
        };
        let Some(p) = inbox.presence.as_mut() else {
            return;
        };
        if p.paused {
            return;
        }
        p.sent_up_to = p.sent_up_to.max(inbox.acked);
        while p.sent_up_to < inbox.last_seq && p.sent_up_to - inbox.acked < window {
            let msg = &inbox.pending[(p.sent_up_to - inbox.acked) as usize];
            debug_assert_eq!(msg.seq, p.sent_up_to + 1);
            if msg.position > durable {
                if !p.stalled {
                    p.stalled = true;
                    let key = self
                        .live
                        .inboxes
                        .get_key_value(user)
                        .map(|(k, _)| k.clone());
                    self.stalled.extend(key);
                }
                return;
            }
            sink.deliver(p.conn, msg);
            p.sent_up_to += 1;
        }
    }

    /// A connection of `user` logged in: it becomes the one that receives.
    pub fn login(&mut self, conn: ConnRef, user: &str, sink: &mut impl Sink) {
        if !self.holds(user) {
            // Moved away (or not yet here): the login is registered again
            // with the owner when the connection's process hears of the move.
            return;
        }
        if !self.live.inboxes.contains_key(user)
            && self.live.inboxes.len() >= self.limits.inbox_users_max
        {
            // No inbox state to keep: the user receives nothing until one exists.
            sink.welcome(conn, 0);
            return;
        }
        let inbox = self.live.inbox_entry(user);
        inbox.presence = Some(Presence {
            conn,
            sent_up_to: inbox.acked,
            paused: false,
            stalled: false,
        });
        sink.welcome(conn, inbox.last_seq - inbox.acked);
        self.pump(user, sink);
    }

    /// The edge could not fit DELIVER `seq` (and later ones): resend from it
    /// once the connection's outbox drains.
    pub fn rewind(&mut self, conn: ConnRef, user: &str, seq: u64) {
        let Some(p) = self
            .live
            .inboxes
            .get_mut(user)
            .and_then(|i| i.presence.as_mut())
        else {
            return;
        };
        tracing::debug!(
            seq,
            same = p.conn == conn,
            sent_up_to = p.sent_up_to,
            "deliveries rewound"
        );
        if p.conn == conn {
            p.sent_up_to = p.sent_up_to.min(seq.saturating_sub(1));
            p.paused = true;
        }
    }

    /// The connection's outbox drained: deliveries continue.
    pub fn resume(&mut self, conn: ConnRef, user: &str, sink: &mut impl Sink) {
        let Some(p) = self
            .live
            .inboxes
            .get_mut(user)
            .and_then(|i| i.presence.as_mut())
        else {
            return;
        };
        tracing::debug!(
            same = p.conn == conn,
            sent_up_to = p.sent_up_to,
            "deliveries resumed"
        );
        if p.conn == conn {
            p.paused = false;
            self.pump(user, sink);
        }
    }

    /// The connection closed; only the receiving one clears presence.
    pub fn logout(&mut self, conn: ConnRef, user: &str) {
        let Some(inbox) = self.live.inboxes.get_mut(user) else {
            return;
        };
        if inbox.presence.as_ref().is_some_and(|p| p.conn == conn) {
            inbox.presence = None;
        }
        if inbox.presence.is_none() && inbox.last_seq == 0 {
            self.live.remove_user(user);
        }
    }

    /// An edge's link on core `core` closed: its connections stop receiving
    /// here (they log in again through the edge's next link). Returns how
    /// many presences were cleared. One pass over the users: links close
    /// rarely.
    pub fn forget_link(&mut self, core: u16, link: u16) -> usize {
        let gone: Vec<Rc<str>> = self
            .live
            .inboxes
            .iter()
            .filter(|(_, i)| {
                i.presence
                    .as_ref()
                    .is_some_and(|p| p.conn.core == core && p.conn.link == link)
            })
            .map(|(user, _)| user.clone())
            .collect();
        for user in &gone {
            let conn = self.live.inboxes[user]
                .presence
                .as_ref()
                .expect("filtered on presence")
                .conn;
            self.logout(conn, user);
        }
        gone.len()
    }

    /// Cumulative ACK (already checked by the edge against what it delivered).
    pub fn ack(&mut self, user: &str, seq: u64, sink: &mut impl Sink) -> Result<(), ShardError> {
        if !self.acting() || self.handing_over {
            // A replica's log holds only the primary's records, at the
            // primary's positions: an ACK logged here (one an edge routed
            // before it heard of a step-down) would sit where the new
            // primary writes other records, under the same epoch, and the
            // logs could no longer be matched. Dropped: the client's next
            // ACK to the primary covers it, or it gets a redelivery.
            return Ok(());
        }
        if !self.holds(user) {
            return Ok(()); // moved away: the owner delivers from its last ACK (a redelivery)
        }
        let Some(inbox) = self.live.inboxes.get_mut(user) else {
            return Ok(());
        };
        let seq = seq.min(inbox.last_seq);
        if seq <= inbox.acked {
            return Ok(());
        }
        let freed = inbox.consume_to(seq, false);
        self.live.inbox_bytes -= freed;
        record::encode_ack(user, seq, &mut self.scratch);
        // Logged, not waited for: a lost ACK only means a redelivery after a crash.
        self.append(record::ACK)?;
        self.pump(user, sink);
        Ok(())
    }

    /// The position STORED and delivery wait for: the local fsync, and the
    /// replica's ack while replication is synchronous (or blocked).
    /// Whether this node holds `user`'s inbox (always, outside a cluster).
    fn holds(&self, user: &str) -> bool {
        self.ownership
            .as_ref()
            .is_none_or(|o| o.holds(net::slot_of(user)))
    }

    pub fn commit_position(&self) -> u64 {
        let local = self.wal.durable_position();
        match self.mode {
            Mode::Replica | Mode::Blocked => local.min(self.replica_acked),
            Mode::Local | Mode::Degraded => local,
        }
    }

    pub fn replica_acked(&self) -> u64 {
        self.replica_acked
    }

    /// The replica reported `position` durable (primary side).
    pub fn on_replica_ack(&mut self, position: u64, sink: &mut impl Sink) {
        if position > self.replica_acked {
            self.replica_acked = position.min(self.wal.last_position());
            self.on_durable(sink);
        }
    }

    /// Changes what STORED waits for. Degrading releases every STORED the
    /// local fsync covers; blocking answers the waiting SENDs REJECTED 6
    /// (they stay stored, and a retry with the same msg_id gets STORED once
    /// the replica is back).
    pub fn set_mode(&mut self, mode: Mode, sink: &mut impl Sink) {
        if mode == self.mode {
            return;
        }
        tracing::warn!(
            shard = self.id,
            from = self.mode.name(),
            to = mode.name(),
            "durability mode changed"
        );
        self.mode = mode;
        if mode == Mode::Blocked {
            // Stored locally but never acknowledged by the replica: the server
            // gives up waiting (6, not 4: the message may still be delivered).
            // A retry with the same msg_id gets STORED once the replica is back.
            for w in self.waiting.drain(..) {
                let reason = "timed out waiting for the replica";
                sink.rejected(w.reply, w.msg_id, reject_code::TIMED_OUT, reason);
            }
        }
        self.on_durable(sink);
    }

    /// Takes the replica role: SENDs are refused with `reason`.
    pub fn become_replica(&mut self, reason: String) {
        self.role = Role::Replica;
        self.not_primary_reason = reason;
    }

    /// Saw a higher epoch: stops acting as primary at once.
    pub fn fence(&mut self, epoch: u64, sink: &mut impl Sink) {
        tracing::error!(
            shard = self.id,
            my_epoch = self.epoch,
            seen = epoch,
            "higher epoch seen: fenced, no longer primary"
        );
        self.role = Role::Fenced;
        self.not_primary_reason = format!("not the primary: a node with epoch {epoch} took over");
        for w in self.waiting.drain(..) {
            sink.not_primary(w.reply, w.msg_id, "not the primary any more");
        }
    }

    /// Stops acting as primary (lost the election): a replica again, which
    /// follows the new primary. The SENDs waiting for STORED are answered
    /// not-primary (RETRY for an edge, REJECTED 4 for a client): a retry
    /// with the same msg_id gets STORED from the new primary if it was
    /// stored, or stores it.
    pub fn step_down(&mut self, reason: String, sink: &mut impl Sink) {
        self.role = Role::Replica;
        self.handing_over = false;
        self.not_primary_reason = reason;
        for w in self.waiting.drain(..) {
            sink.not_primary(w.reply, w.msg_id, "not the primary any more");
        }
    }

    /// Promotion: primary with a new epoch; delivers to whoever is logged in.
    /// The caller checks that the epoch is above this shard's.
    pub fn promote(&mut self, epoch: u64, mode: Mode, sink: &mut impl Sink) {
        debug_assert!(epoch > self.epoch, "promotion raises the epoch");
        self.epoch = epoch;
        self.role = Role::Primary;
        self.handing_over = false;
        self.mode = mode;
        self.replica_acked = 0;
        let online: Vec<Rc<str>> = self
            .live
            .inboxes
            .iter()
            .filter(|(_, i)| i.presence.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for user in online {
            self.pump(&user, sink);
        }
    }

    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Replica side: appends one record from the primary at its position and
    /// applies it to the live state.
    pub fn apply_replicated(&mut self, rec: &wal::Record<'_>) -> Result<(), ShardError> {
        let shard = self.id;
        let decoded =
            record::decode(rec.record_type, rec.payload).map_err(|e| ShardError::Replay {
                shard,
                position: rec.position,
                why: e.to_string(),
            })?;
        let valid = match &decoded {
            Decoded::Slots(r) => match &self.ownership {
                Some(o) if !o.table.valid(r) => Err(format!(
                    "slot decision {r:?} names a pair not in the cluster file"
                )),
                _ => Ok(()),
            },
            other => self.live.check(other),
        };
        valid.map_err(|why| ShardError::Diverged {
            shard,
            position: rec.position,
            why,
        })?;
        self.wal
            .append_at(rec.position, rec.epoch, rec.record_type, rec.payload)
            .map_err(|source| ShardError::Wal { shard, source })?;
        self.checkpoint.count(rec.record_type, rec.payload.len());
        if let Decoded::Checkpoint { start } = decoded {
            // The primary's checkpoint frees our old segments too, once durable here.
            self.checkpoint.in_progress = Some((start, rec.position));
        }
        self.apply(rec.position, decoded)
            .map_err(|why| ShardError::Replay {
                shard,
                position: rec.position,
                why,
            })?;
        self.epoch = self.epoch.max(rec.epoch);
        Ok(())
    }

    /// Replica side, full sync: drops the log and state, to be rebuilt from a
    /// snapshot whose first position is `first_position`.
    pub fn reset_for_snapshot(&mut self, first_position: u64) -> Result<(), ShardError> {
        let shard = self.id;
        self.wal
            .reset(first_position)
            .map_err(|source| ShardError::Wal { shard, source })?;
        self.live = Live::new(&self.limits);
        self.waiting.clear();
        self.checkpoint.in_progress = None;
        self.checkpoint.appended_bytes = 0;
        Ok(())
    }

    /// Replica side, an old primary rejoining: drops the log after
    /// `keep_through`, rebuilds the state, and returns the messages of the
    /// dropped tail (sender, recipient, msg_id, sent_ms, body) for re-submission.
    pub fn truncate_and_rebuild(&mut self, keep_through: u64) -> Result<Vec<Resubmit>, ShardError> {
        let shard = self.id;
        let mut tail = Vec::new();
        if keep_through < self.wal.last_position() {
            let iter = self
                .wal
                .iter_from(keep_through + 1)
                .map_err(|source| ShardError::Wal { shard, source })?;
            for item in iter {
                let rec = item.map_err(|source| ShardError::Wal { shard, source })?;
                if let Ok(Decoded::Msg(m)) = record::decode(rec.record_type, rec.payload) {
                    tail.push(Resubmit {
                        sender: m.sender.into(),
                        recipient: m.recipient.into(),
                        msg_id: m.msg_id,
                        body: m.body.into(),
                    });
                }
            }
        }
        self.wal
            .truncate_after(keep_through)
            .map_err(|source| ShardError::Wal { shard, source })?;
        self.live = Live::new(&self.limits);
        self.waiting.clear();
        self.checkpoint.in_progress = None;
        self.replay()?;
        Ok(tail)
    }

    /// Primary side, full sync: the live state as WAL record frames at
    /// positions `first..=last` (last = the log's last position), ending with a
    /// CKPT naming `first`. None when the log is too short to hold the
    /// snapshot's positions (then the whole log is streamed instead).
    pub fn snapshot_frames(&self) -> Option<(u64, u64, u64, Vec<u8>)> {
        let mut records: Vec<(u8, Vec<u8>)> = Vec::new();
        let restated = self.restate(&mut Vec::new(), |record_type, payload| {
            records.push((record_type, payload.to_vec()));
            Ok::<(), std::convert::Infallible>(())
        });
        let Ok(()) = restated;
        let last = self.wal.last_position();
        let count = records.len() as u64 + 1;
        if count > last {
            return None;
        }
        let first = last - count + 1;
        let mut ckpt = Vec::new();
        record::encode_checkpoint(first, &mut ckpt);
        records.push((record::CKPT, ckpt));
        let mut frames = Vec::new();
        for (i, (record_type, payload)) in records.iter().enumerate() {
            let rec = wal::Record {
                position: first + i as u64,
                epoch: self.epoch,
                record_type: *record_type,
                payload,
            };
            let start = frames.len();
            frames.resize(start + wal::format::frame_len(payload.len()), 0);
            wal::format::encode_record(&mut frames[start..], &rec);
        }
        Some((first, last, count, frames))
    }

    /// Slot move, source side: the users of slots first..=last (per user its
    /// ACK, then its pending MSGs, seqs kept) and the dedup entries of the
    /// range, as `[u8 type][u32 len][payload]` records for `import_slots`.
    /// Only between the handoff (no SENDs for the range) and the release.
    pub fn export_slots(&self, first: u16, last: u16) -> Result<Vec<u8>, MoveError> {
        let Some(o) = &self.ownership else {
            return Err(MoveError::Refused("slot moves are for cluster nodes"));
        };
        if !(first..=last).all(|slot| o.holds(slot) && !o.takes_sends(slot)) {
            return Err(MoveError::Refused(
                "the range is not being handed off by this pair",
            ));
        }
        let mut out = Vec::new();
        self.live.restate(
            &mut Vec::new(),
            Some((first, last)),
            |record_type, payload| {
                if out.len() + 5 + payload.len() > MOVE_BYTES_MAX {
                    return Err(MoveError::TooLarge);
                }
                record::push_framed(&mut out, record_type, payload);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Slot move, target side: forgets what an earlier, unfinished import of
    /// the range left (a DROP record), then logs and applies the exported
    /// records. Everything is checked before the first append: records that
    /// would not replay never reach the log. Returns the last position (the
    /// import is done when the commit position reaches it).
    pub fn import_slots(
        &mut self,
        first: u16,
        last: u16,
        records: &[u8],
    ) -> Result<u64, MoveError> {
        self.check_writable()?;
        let Some(o) = &self.ownership else {
            return Err(MoveError::Refused("slot moves are for cluster nodes"));
        };
        if (first..=last).any(|slot| o.holds(slot)) {
            return Err(MoveError::Refused(
                "this pair already holds slots of the range",
            ));
        }
        // A dry run on a scratch state: every record decodes, belongs to the
        // range and replays (seqs follow each other).
        let mut scratch = Live::new(&self.limits);
        let mut checked = record::framed(records);
        for (record_type, payload) in checked.by_ref() {
            let decoded = record::decode(record_type, payload)
                .map_err(|e| MoveError::Malformed(e.to_string()))?;
            let in_range = |user: &str| (first..=last).contains(&net::slot_of(user));
            let fits = match &decoded {
                Decoded::Msg(m) => in_range(m.recipient),
                Decoded::Ack { recipient, .. } => in_range(recipient),
                Decoded::Dedup(entries) => {
                    record_type == record::DEDUP2
                        && entries.iter().all(|e| Dedup::slot_in(e.slot, first, last))
                }
                _ => false,
            };
            if !fits {
                return Err(MoveError::Malformed(format!(
                    "a record of type {record_type} that is not the range's"
                )));
            }
            scratch.apply(0, decoded).map_err(MoveError::Malformed)?;
        }
        if !checked.rest.is_empty() {
            return Err(MoveError::Malformed("a record cut short".into()));
        }
        if self.live.memory_bytes() + scratch.memory_bytes() > self.limits.shard_pending_bytes_max {
            return Err(MoveError::Refused("the shard's pending memory is full"));
        }
        drop(scratch);
        let mut position = self.drop_slots(first, last)?;
        for (record_type, payload) in record::framed(records) {
            self.scratch.clear();
            self.scratch.extend_from_slice(payload);
            position = self.append(record_type)?;
            let decoded = record::decode(record_type, payload).expect("checked above");
            self.apply(position, decoded)
                .map_err(MoveError::Malformed)?;
        }
        Ok(position)
    }

    /// Logs and applies a DROP of slots first..=last: their users and dedup
    /// entries are forgotten (a finished move's source; an import's start).
    pub fn drop_slots(&mut self, first: u16, last: u16) -> Result<u64, MoveError> {
        self.check_writable()?;
        if let Some(o) = &self.ownership {
            if (first..=last).any(|slot| o.holds(slot)) {
                return Err(MoveError::Refused(
                    "this pair still holds slots of the range",
                ));
            }
        }
        record::encode_drop(first, last, &mut self.scratch);
        let position = self.append(record::DROP)?;
        self.live.drop_slots(first, last);
        Ok(position)
    }

    /// Logs a slot decision (shard 0 of a cluster node only). One that
    /// takes the range away from this pair (or freezes it) applies at once;
    /// one that gives it this pair is returned, to `settle_slots` once the
    /// record is committed.
    pub fn write_slots(
        &mut self,
        r: &record::SlotsRecord,
    ) -> Result<(u64, Option<record::SlotsRecord>), MoveError> {
        self.check_writable()?;
        let Some(o) = self.ownership.as_ref().filter(|_| self.id == 0) else {
            return Err(MoveError::Refused(
                "slot decisions live in shard 0 of a cluster node",
            ));
        };
        if !o.table.valid(r) {
            return Err(MoveError::Refused(
                "the decision names a pair not in the cluster file",
            ));
        }
        let grants = r.owner == o.own_pair && r.handoff_to.is_none();
        record::encode_slots(r, &mut self.scratch);
        let position = self.append(record::SLOTS)?;
        if grants {
            return Ok((position, Some(*r)));
        }
        self.settle_slots(r);
        Ok((position, None))
    }

    /// Applies a logged slot decision to the node's table.
    pub fn settle_slots(&self, r: &record::SlotsRecord) {
        if let Some(o) = &self.ownership {
            let changed = o.apply(r);
            tracing::info!(shard = self.id, ?r, changed, "slot decision in force");
        }
    }

    fn check_writable(&self) -> Result<(), MoveError> {
        if !self.acting() {
            return Err(MoveError::Refused("not the pair's primary"));
        }
        Ok(())
    }

    /// Forgets expired dedup entries; bounded work per call.
    /// `now_ms`: the monotonic clock (engine::clock::mono_ms).
    pub fn expire_dedup(&mut self, now_ms: u64) {
        self.live.dedup.expire(now_ms, 10_000);
    }

    fn live_bytes(&self) -> u64 {
        // About what a checkpoint restates: the inboxes, and 40 bytes a dedup entry.
        (self.live.memory_bytes() + self.live.dedup.len() * 40) as u64
    }

    /// Writes a checkpoint when the log has grown well past the live state, so
    /// old segments can be deleted: the log's disk use stays bounded.
    pub fn maybe_checkpoint(&mut self) -> Result<bool, ShardError> {
        // A replica's log mirrors the primary's positions: only the primary
        // writes checkpoints, and the replica follows them.
        if self.role != Role::Primary
            || self.checkpoint.in_progress.is_some()
            || self.wal.segment_count() < 3
        {
            return Ok(false);
        }
        let threshold = self.limits.wal_segment_bytes.max(2 * self.live_bytes());
        if self.checkpoint.appended_bytes < threshold {
            return Ok(false);
        }
        let start = self.wal.last_position() + 1;
        self.write_checkpoint()?;
        record::encode_checkpoint(start, &mut self.scratch);
        let end = self.append(record::CKPT)?;
        self.checkpoint.appended_bytes = 0;
        self.checkpoint.in_progress = Some((start, end));
        tracing::info!(shard = self.id, start, end, "checkpoint written");
        Ok(true)
    }

    /// Restates the live state at the tail: per recipient its ACK, then its
    /// pending MSGs; then the dedup table. Not counted as new traffic.
    fn write_checkpoint(&mut self) -> Result<(), ShardError> {
        let Shard {
            id,
            epoch,
            wal,
            live,
            ownership,
            scratch,
            ..
        } = self;
        let (shard, epoch) = (*id, *epoch);
        restate(
            shard,
            ownership.as_ref(),
            live,
            scratch,
            |record_type, payload| {
                wal.append(epoch, record_type, payload)
                    .map(|_| ())
                    .map_err(|source| ShardError::Wal { shard, source })
            },
        )
    }

    fn restate<E>(
        &self,
        buf: &mut Vec<u8>,
        emit: impl FnMut(u8, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        restate(self.id, self.ownership.as_ref(), &self.live, buf, emit)
    }

    fn finish_checkpoint(&mut self) {
        let Some((start, end)) = self.checkpoint.in_progress else {
            return;
        };
        if self.wal.durable_position() < end {
            return;
        }
        self.checkpoint.in_progress = None;
        match self.wal.retain_from(start) {
            Ok(deleted) => {
                tracing::info!(shard = self.id, start, deleted, "old WAL segments deleted")
            }
            Err(e) => tracing::error!(shard = self.id, error = %e, "WAL retention failed"),
        }
    }
}

/// One record applied to the live state, or (SLOTS) to the node's slot table.
fn apply_record(
    shard: usize,
    live: &mut Live,
    ownership: Option<&Ownership>,
    position: u64,
    decoded: Decoded<'_>,
) -> Result<(), String> {
    match decoded {
        Decoded::Slots(r) => {
            if let Some(o) = ownership {
                if !o.table.valid(&r) {
                    return Err(format!(
                        "slot decision {r:?} names a pair not in the cluster file"
                    ));
                }
                let changed = o.apply(&r);
                tracing::info!(shard, ?r, changed, "slot ownership");
            }
            Ok(())
        }
        decoded => live.apply(position, decoded),
    }
}

/// A shard's whole state as records: shard 0's slot decisions, then the
/// live state (Live::restate).
fn restate<E>(
    shard: usize,
    ownership: Option<&Ownership>,
    live: &Live,
    buf: &mut Vec<u8>,
    mut emit: impl FnMut(u8, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    if let Some(o) = ownership.filter(|_| shard == 0) {
        for r in o.table.decisions() {
            record::encode_slots(&r, buf);
            emit(record::SLOTS, buf)?;
        }
    }
    live.restate(buf, None, emit)
}

impl Inbox {
    /// Drops pending messages up to `seq`; returns the bytes freed. In replay an
    /// ACK can come before the MSGs it covers would (a checkpoint), so it also
    /// raises `last_seq`.
    fn consume_to(&mut self, seq: u64, replay: bool) -> usize {
        let (mut freed, queue_before) = (0, self.pending.heap_bytes());
        while self.pending.front().is_some_and(|m| m.seq <= seq) {
            freed += self
                .pending
                .pop_front()
                .expect("front checked")
                .heap_bytes();
        }
        freed += queue_before - self.pending.heap_bytes();
        self.acked = self.acked.max(seq);
        if replay {
            self.last_seq = self.last_seq.max(seq);
        }
        freed
    }

    /// Queues a message; returns the heap bytes that added (its block, and
    /// the queue's growth when it was full).
    fn push(&mut self, msg: PendingMsg) -> usize {
        let (heap, queue) = (msg.heap_bytes(), self.pending.push_cost_bytes());
        self.pending.push_back(msg);
        heap + queue
    }
}

/// The shard's in-memory state, rebuilt from the WAL on open.
struct Live {
    inboxes: HashMap<Rc<str>, Inbox, ahash::RandomState>,
    dedup: Dedup,
    /// Heap held by the users' keys and queues and the pending messages'
    /// blocks, as allocated; with the table itself, bounded by shard_pending_bytes_max.
    inbox_bytes: usize,
}

impl Live {
    /// Memory the inboxes hold: the table (by capacity), keys, queues, messages.
    fn memory_bytes(&self) -> usize {
        self.inbox_bytes + memory::table_bytes(self.inboxes.capacity(), INBOX_SLOT_BYTES)
    }

    /// What storing a message of `data_len` bytes (sender + body) for `to`
    /// would add: its block, the queue's growth (`queue`: the recipient's
    /// length and next push cost), and for a new user (`queue` None) its key,
    /// first queue slot and the table's growth if full.
    fn send_cost_bytes(&self, queue: Option<(usize, usize)>, to: &str, data_len: usize) -> usize {
        let push = queue.map_or_else(
            || ChunkedQueue::<PendingMsg>::default().push_cost_bytes(),
            |(_, push)| push,
        );
        let mut cost = memory::alloc_bytes(data_len) + push;
        if queue.is_none() {
            cost += memory::rc_str_bytes(to.len());
            let table = self.inboxes.capacity();
            if self.inboxes.len() == table {
                cost += memory::table_bytes_grown(table, INBOX_SLOT_BYTES)
                    - memory::table_bytes(table, INBOX_SLOT_BYTES);
            }
        }
        cost
    }

    fn add_user(&mut self, user: &str) -> Rc<str> {
        let key: Rc<str> = Rc::from(user);
        self.inboxes.insert(key.clone(), Inbox::default());
        self.inbox_bytes += memory::rc_str_bytes(user.len());
        key
    }

    fn remove_user(&mut self, user: &str) {
        if let Some((key, inbox)) = self.inboxes.remove_entry(user) {
            let blocks: usize = inbox.pending.iter().map(PendingMsg::heap_bytes).sum();
            self.inbox_bytes -=
                memory::rc_str_bytes(key.len()) + blocks + inbox.pending.heap_bytes();
        }
    }

    /// The live state as records, in replay order: per recipient its ACK, then
    /// its pending MSGs; then the dedup table in DEDUP batches. A checkpoint
    /// appends them to the WAL; a full sync ships them to a replica.
    /// `range`: only the users and dedup entries of slots first..=last (a
    /// slot move's export).
    fn restate<E>(
        &self,
        buf: &mut Vec<u8>,
        range: Option<(u16, u16)>,
        mut emit: impl FnMut(u8, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        for (user, inbox) in &self.inboxes {
            if inbox.last_seq == 0 {
                continue;
            }
            if range.is_some_and(|(a, b)| !(a..=b).contains(&net::slot_of(user))) {
                continue;
            }
            record::encode_ack(user, inbox.acked, buf);
            emit(record::ACK, buf)?;
            for msg in inbox.pending.iter() {
                let m = MsgRecord {
                    recipient: user,
                    seq: msg.seq,
                    sender: msg.from(),
                    msg_id: msg.msg_id,
                    sent_ms: msg.sent_ms,
                    body: msg.body(),
                };
                record::encode_msg(&m, buf);
                emit(record::MSG, buf)?;
            }
        }
        let mut chunk = Vec::with_capacity(record::DEDUP_ENTRIES_PER_RECORD);
        let entries = self
            .dedup
            .entries()
            .filter(|e| range.is_none_or(|(a, b)| Dedup::slot_in(e.slot, a, b)));
        for entry in entries {
            chunk.push(entry);
            if chunk.len() == record::DEDUP_ENTRIES_PER_RECORD {
                record::encode_dedup(&chunk, buf);
                emit(record::DEDUP2, buf)?;
                chunk.clear();
            }
        }
        if !chunk.is_empty() {
            record::encode_dedup(&chunk, buf);
            emit(record::DEDUP2, buf)?;
        }
        Ok(())
    }

    fn new(limits: &Limits) -> Live {
        Live {
            inboxes: HashMap::default(),
            dedup: Dedup::new(limits.dedup_entries_max, limits.dedup_window_secs * 1000),
            inbox_bytes: 0,
        }
    }

    /// Applies one replayed record. Idempotent: a checkpoint restates state the
    /// log may already have given.
    fn apply(&mut self, position: u64, rec: Decoded<'_>) -> Result<(), String> {
        match rec {
            Decoded::Msg(m) => {
                let slot = net::slot_of(m.recipient);
                self.dedup
                    .insert((sender_hash(m.sender), m.msg_id), position, m.sent_ms, slot);
                let inbox = self.inbox_entry(m.recipient);
                if m.seq <= inbox.last_seq {
                    return Ok(()); // consumed or already known
                }
                if m.seq != inbox.last_seq + 1 {
                    return Err(format!(
                        "seq {} for {} after {}",
                        m.seq, m.recipient, inbox.last_seq
                    ));
                }
                let msg = PendingMsg::new(m.seq, m.msg_id, m.sender, m.sent_ms, m.body, position);
                inbox.last_seq = m.seq;
                let added = inbox.push(msg);
                self.inbox_bytes += added;
            }
            Decoded::Ack {
                recipient,
                acked_seq,
            } => {
                let freed = self.inbox_entry(recipient).consume_to(acked_seq, true);
                self.inbox_bytes -= freed;
            }
            Decoded::Dedup(entries) => {
                for e in entries {
                    self.dedup
                        .insert((e.sender_hash, e.msg_id), position, e.stored_ms, e.slot);
                }
            }
            Decoded::Drop { first, last } => self.drop_slots(first, last),
            Decoded::Checkpoint { .. } | Decoded::Slots(_) => {}
        }
        Ok(())
    }

    /// Forgets the users of slots first..=last and their dedup entries.
    fn drop_slots(&mut self, first: u16, last: u16) {
        let gone: Vec<Rc<str>> = self
            .inboxes
            .keys()
            .filter(|u| (first..=last).contains(&net::slot_of(u)))
            .cloned()
            .collect();
        for user in &gone {
            self.remove_user(user);
        }
        self.dedup.remove_slots(first, last);
    }

    /// Whether `apply` would take this record, without changing anything:
    /// a replica checks a record from its primary before logging it, so a
    /// record its state cannot take (the two logs differ: a broken
    /// invariant) is refused, not logged.
    fn check(&self, rec: &Decoded<'_>) -> Result<(), String> {
        if let Decoded::Msg(m) = rec {
            let last_seq = self.inboxes.get(m.recipient).map_or(0, |i| i.last_seq);
            if m.seq > last_seq + 1 {
                return Err(format!(
                    "seq {} for {} after {last_seq}",
                    m.seq, m.recipient
                ));
            }
        }
        Ok(())
    }

    fn inbox_entry(&mut self, user: &str) -> &mut Inbox {
        if !self.inboxes.contains_key(user) {
            self.add_user(user);
        }
        self.inboxes.get_mut(user).expect("just inserted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the shard told connections.
    #[derive(Default)]
    struct Recorder {
        stored: Vec<MsgId>,
        rejected: Vec<(MsgId, u16)>,
        welcomes: Vec<u64>,
        delivered: Vec<(u64, MsgId)>,
    }

    impl Sink for Recorder {
        fn stored(&mut self, _: ConnRef, msg_id: MsgId) {
            self.stored.push(msg_id);
        }
        fn rejected(&mut self, _: ConnRef, msg_id: MsgId, code: u16, _: &str) {
            self.rejected.push((msg_id, code));
        }
        fn not_primary(&mut self, _: ConnRef, msg_id: MsgId, _: &str) {
            self.rejected.push((msg_id, reject_code::UNAVAILABLE));
        }
        fn welcome(&mut self, _: ConnRef, pending: u64) {
            self.welcomes.push(pending);
        }
        fn deliver(&mut self, _: ConnRef, msg: &PendingMsg) {
            self.delivered.push((msg.seq, msg.msg_id));
        }
    }

    const CONN: ConnRef = ConnRef {
        core: 0,
        link: 0,
        slot: 0,
        generation: 1,
    };

    /// A test's directory, removed when dropped: declared before the
    /// shards that use it, it outlives them (a live shard's WAL thread may
    /// still be making its spare segment there).
    struct TempDir(std::path::PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("iris-shard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    fn limits() -> Limits {
        Limits {
            wal_segment_bytes: 256 << 10,
            inbox_len_max: 1000,
            ..Limits::default()
        }
    }

    fn id(n: u64) -> MsgId {
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&n.to_le_bytes());
        m
    }

    fn send(shard: &mut Shard, sink: &mut Recorder, from: &str, to: &str, n: u64, body: &[u8]) {
        let req = SendRequest {
            reply: CONN,
            sender: from,
            msg_id: id(n),
            to,
            sent_ms: 1,
            body: body.into(),
        };
        shard.send(req, sink).expect("send");
    }

    fn commit(shard: &mut Shard, sink: &mut Recorder) {
        shard.wal_mut().sync().expect("sync");
        shard.on_durable(sink);
    }

    #[test]
    fn a_closed_links_presence_is_forgotten() {
        let dir = temp_dir("forget-link");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        let remote = ConnRef {
            core: 1,
            link: 3,
            slot: 9,
            generation: 1,
        };
        shard.login(remote, "bob", &mut sink);
        shard.login(CONN, "carol", &mut sink);
        assert_eq!(shard.forget_link(1, 4), 0, "another link");
        assert_eq!(shard.forget_link(0, 3), 0, "the same id on another core");
        assert_eq!(shard.forget_link(1, 3), 1);
        send(&mut shard, &mut sink, "alice", "bob", 1, b"hi");
        send(&mut shard, &mut sink, "alice", "carol", 2, b"hi");
        commit(&mut shard, &mut sink);
        assert_eq!(sink.stored, vec![id(1), id(2)]);
        assert_eq!(
            sink.delivered,
            vec![(1, id(2))],
            "only carol's connection receives"
        );
    }

    #[test]
    fn stored_only_after_sync_then_delivered_in_order() {
        let dir = temp_dir("order");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        for n in 1..=3 {
            send(&mut shard, &mut sink, "alice", "bob", n, b"hi");
        }
        assert!(sink.stored.is_empty(), "nothing is STORED before the sync");
        assert!(
            sink.delivered.is_empty(),
            "nothing is delivered before it is durable"
        );
        commit(&mut shard, &mut sink);
        assert_eq!(sink.stored, vec![id(1), id(2), id(3)]);
        assert_eq!(sink.delivered, vec![(1, id(1)), (2, id(2)), (3, id(3))]);
    }

    #[test]
    fn duplicate_is_stored_again_but_not_delivered_again() {
        let dir = temp_dir("dedup");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x");
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x"); // duplicate while in flight
        commit(&mut shard, &mut sink);
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x"); // duplicate once durable
        assert_eq!(sink.stored, vec![id(7), id(7), id(7)]);
        assert_eq!(sink.delivered, vec![(1, id(7))]);
        // The same id from another sender is another message.
        send(&mut shard, &mut sink, "carol", "bob", 7, b"x");
        commit(&mut shard, &mut sink);
        assert_eq!(sink.delivered, vec![(1, id(7)), (2, id(7))]);
    }

    /// The dedup window counts on this node's monotonic clock from the
    /// store, whatever wall time the SEND carries (`send` gives sent_ms 1,
    /// 1970: an edge whose wall clock is far behind). Red when the store
    /// stamped the entry with sent_ms (as before DECISIONS 20): the sweep
    /// forgot it at once and the retry was stored and delivered twice.
    #[test]
    fn the_dedup_window_counts_from_the_store_on_the_monotonic_clock() {
        let dir = temp_dir("dedup-mono");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x");
        commit(&mut shard, &mut sink);
        shard.expire_dedup(crate::clock::mono_ms());
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x"); // the retry
        commit(&mut shard, &mut sink);
        assert_eq!(sink.stored, vec![id(7), id(7)]);
        assert_eq!(sink.delivered, vec![(1, id(7))], "stored once");
        let window_ms = limits().dedup_window_secs * 1000;
        shard.expire_dedup(crate::clock::mono_ms() + window_ms);
        send(&mut shard, &mut sink, "alice", "bob", 7, b"x");
        commit(&mut shard, &mut sink);
        assert_eq!(
            sink.delivered,
            vec![(1, id(7)), (2, id(7))],
            "forgotten past the window"
        );
    }

    #[test]
    fn reopen_recovers_inboxes_seq_acks_and_dedup() {
        let dir = temp_dir("reopen");
        {
            let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
            let mut sink = Recorder::default();
            for n in 1..=5 {
                send(&mut shard, &mut sink, "alice", "bob", n, b"body");
            }
            commit(&mut shard, &mut sink);
            shard.ack("bob", 2, &mut sink).unwrap();
            commit(&mut shard, &mut sink);
        }
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        assert_eq!(sink.welcomes, vec![3]);
        assert_eq!(sink.delivered, vec![(3, id(3)), (4, id(4)), (5, id(5))]);
        send(&mut shard, &mut sink, "alice", "bob", 1, b"body"); // remembered across the restart
        send(&mut shard, &mut sink, "alice", "bob", 6, b"body"); // new: seq continues
        commit(&mut shard, &mut sink);
        assert_eq!(sink.delivered.last(), Some(&(6, id(6))));
        assert_eq!(sink.delivered.len(), 4);
    }

    #[test]
    fn window_waits_for_acks() {
        let dir = temp_dir("window");
        let l = Limits {
            deliver_window: 2,
            ..limits()
        };
        let (mut shard, _) = Shard::open(0, &dir, &l, None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        for n in 1..=5 {
            send(&mut shard, &mut sink, "alice", "bob", n, b"b");
        }
        commit(&mut shard, &mut sink);
        assert_eq!(sink.delivered.len(), 2);
        shard.ack("bob", 2, &mut sink).unwrap();
        assert_eq!(sink.delivered.len(), 4);
    }

    #[test]
    fn inbox_full_is_rejected_5() {
        let dir = temp_dir("full");
        let l = Limits {
            inbox_len_max: 2,
            ..limits()
        };
        let (mut shard, _) = Shard::open(0, &dir, &l, None).unwrap();
        let mut sink = Recorder::default();
        for n in 1..=3 {
            send(&mut shard, &mut sink, "alice", "bob", n, b"b");
        }
        assert_eq!(sink.rejected, vec![(id(3), reject_code::INBOX_FULL)]);
    }

    /// A consumed workload keeps the WAL's disk use bounded: checkpoints let
    /// old segments go, and what they restate survives a reopen.
    #[test]
    fn checkpoints_bound_disk_use_and_keep_state() {
        let dir = temp_dir("ckpt");
        let body = vec![7u8; 1000];
        let mut max_segments = 0;
        {
            let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
            let mut sink = Recorder::default();
            shard.login(CONN, "bob", &mut sink);
            for n in 1..=3000u64 {
                send(&mut shard, &mut sink, "alice", "bob", n, &body);
                if n % 50 == 0 {
                    commit(&mut shard, &mut sink);
                    shard.ack("bob", n - 10, &mut sink).unwrap(); // ten stay pending
                    if shard.maybe_checkpoint().unwrap() {
                        commit(&mut shard, &mut sink);
                    }
                    max_segments = max_segments.max(shard.wal().segment_count());
                }
            }
            commit(&mut shard, &mut sink);
        }
        // 3 MB written through 256 KiB segments; a checkpoint at 3 segments keeps it near that.
        assert!(max_segments <= 5, "segments grew to {max_segments}");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        shard.login(CONN, "bob", &mut sink);
        assert_eq!(sink.welcomes, vec![10]);
        let seqs: Vec<u64> = sink.delivered.iter().map(|d| d.0).collect();
        assert_eq!(seqs, (2991..=3000).collect::<Vec<_>>());
        send(&mut shard, &mut sink, "alice", "bob", 5, &body); // dedup survived the checkpoint
        commit(&mut shard, &mut sink);
        assert_eq!(sink.delivered.len(), 10);
    }

    /// Tenures too short to reach a checkpoint on their own still add up: a
    /// reopened shard counts the log written since the last CKPT, so retention
    /// can trim a log that many restarts (or failovers) wrote.
    #[test]
    fn short_tenures_add_up_to_a_checkpoint() {
        let dir = temp_dir("tenures");
        let body = vec![7u8; 1000];
        let (mut checkpoints, mut n) = (0, 0u64);
        for _tenure in 0..8 {
            let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
            let mut sink = Recorder::default();
            shard.login(CONN, "bob", &mut sink);
            // About 150 KB a tenure: under the 256 KiB threshold.
            for _ in 0..150 {
                n += 1;
                send(&mut shard, &mut sink, "alice", "bob", n, &body);
            }
            commit(&mut shard, &mut sink);
            shard.ack("bob", n, &mut sink).unwrap();
            commit(&mut shard, &mut sink);
            if shard.maybe_checkpoint().unwrap() {
                checkpoints += 1;
                commit(&mut shard, &mut sink);
            }
        }
        let (shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        assert!(
            checkpoints >= 2,
            "{checkpoints} checkpoints in 1.2 MB of log"
        );
        assert!(
            shard.wal().first_position() > 1,
            "retention never trimmed the log"
        );
    }

    fn ownership(own_pair: u16) -> Ownership {
        // Pair 0 serves every slot in the file; the tests move some to pair 1.
        let map = vec![0u16; usize::from(net::SLOT_COUNT)];
        Ownership {
            table: std::sync::Arc::new(crate::slots::SlotTable::new(&map, 2)),
            routing: std::sync::Arc::new(crate::slots::SlotTable::new(&map, 2)),
            own_pair,
        }
    }

    fn users_of_slot_range(first: u16, last: u16, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("user-{i}"))
            .filter(|u| (first..=last).contains(&net::slot_of(u)))
            .take(n)
            .collect()
    }

    /// A slot range moves from one node's shard to another's: inboxes with
    /// their seqs, ACKs and dedup entries arrive; ownership is logged and
    /// survives a reopen on both sides; the source forgets the users.
    #[test]
    fn a_slot_range_moves_with_its_inboxes_seqs_and_dedup() {
        let (src_dir, dst_dir) = (temp_dir("move-src"), temp_dir("move-dst"));
        let (first, last) = (0u16, 8191u16);
        let users = users_of_slot_range(first, last, 3);
        let stay = users_of_slot_range(8192, 16383, 1).remove(0);
        let (src_own, dst_own) = (ownership(0), ownership(1));
        let (mut src, _) = Shard::open(0, &src_dir, &limits(), Some(src_own.clone())).unwrap();
        let (mut dst, _) = Shard::open(0, &dst_dir, &limits(), Some(dst_own.clone())).unwrap();
        let mut sink = Recorder::default();
        let mut n = 0;
        for user in users.iter().chain([&stay]) {
            for _ in 0..4 {
                n += 1;
                send(&mut src, &mut sink, "alice", user, n, b"hi");
            }
        }
        commit(&mut src, &mut sink);
        src.ack(&users[0], 3, &mut sink).unwrap();
        // Handoff: the source keeps the data and takes no SENDs for the range.
        let handoff = record::SlotsRecord {
            version: 1,
            first,
            last,
            owner: 0,
            handoff_to: Some(1),
        };
        assert_eq!(
            src.write_slots(&handoff).unwrap().1,
            None,
            "in force at once"
        );
        dst_own.table.apply(&handoff); // as the target's node would hear it
        assert!(
            src.drop_slots(first, last).is_err(),
            "never drops a range it holds"
        );
        assert!(
            src.export_slots(first, last + 1).is_err(),
            "exports only what it hands off"
        );
        send(&mut src, &mut sink, "alice", &users[1], 100, b"late");
        assert_eq!(sink.rejected, vec![(id(100), reject_code::UNAVAILABLE)]);
        send(&mut src, &mut sink, "alice", &stay, 101, b"other slot");
        commit(&mut src, &mut sink);
        assert!(
            sink.stored.contains(&id(101)),
            "slots outside the range are served"
        );

        let exported = src.export_slots(first, last).unwrap();
        assert!(
            dst.import_slots(first, last, &exported[..exported.len() - 1])
                .is_err(),
            "a cut record is refused"
        );
        dst.import_slots(first, last, &exported).unwrap();
        dst.import_slots(first, last, &exported).unwrap(); // again: the DROP makes it idempotent
        let moved = record::SlotsRecord {
            owner: 1,
            handoff_to: None,
            ..handoff
        };
        let (_, settle) = dst.write_slots(&moved).unwrap();
        assert!(
            dst_own.table.get(first).owner == 0,
            "not before it is committed"
        );
        commit(&mut dst, &mut sink);
        dst.settle_slots(&settle.expect("a grant"));
        assert!(
            dst.import_slots(first, last, &exported).is_err(),
            "never over a range the pair holds"
        );
        src.write_slots(&moved).unwrap();
        src.drop_slots(first, last).unwrap();
        commit(&mut src, &mut sink);
        assert_eq!(
            src.users(),
            1,
            "the source keeps only the other slot's user"
        );

        // The target: seqs go on, ACKs kept, a resent msg_id is a duplicate.
        let mut sink = Recorder::default();
        dst.login(CONN, &users[0], &mut sink);
        assert_eq!(sink.welcomes, vec![1], "3 of 4 were ACKed at the source");
        assert_eq!(sink.delivered, vec![(4, id(4))]);
        send(&mut dst, &mut sink, "alice", &users[0], 2, b"resent");
        send(&mut dst, &mut sink, "alice", &users[0], 200, b"new");
        commit(&mut dst, &mut sink);
        assert_eq!(sink.stored, vec![id(2), id(200)]);
        dst.ack(&users[0], 4, &mut sink).unwrap();
        assert_eq!(
            sink.delivered,
            vec![(4, id(4)), (5, id(200))],
            "no seq gap, no duplicate"
        );
        let frames = dst.snapshot_frames().expect("long enough").3;
        let (mut at, mut restated) = (0, Vec::new());
        while let wal::format::Decoded::Record(r, len) =
            wal::format::decode_record(&frames[at..], u32::MAX)
        {
            restated.push(r.record_type);
            at += len;
        }
        assert_eq!(at, frames.len());
        assert_eq!(
            restated[0],
            record::SLOTS,
            "a snapshot or checkpoint restates the decision"
        );
        drop((src, dst));

        // Both reopen with fresh tables: the logs hold the decisions.
        let (src_own, dst_own) = (ownership(0), ownership(1));
        let (src, _) = Shard::open(0, &src_dir, &limits(), Some(src_own.clone())).unwrap();
        let (dst, _) = Shard::open(0, &dst_dir, &limits(), Some(dst_own.clone())).unwrap();
        assert_eq!(src_own.table.get(first).owner, 1);
        assert!(dst_own.takes_sends(last) && !dst_own.takes_sends(last + 1));
        assert_eq!((src.users(), dst.users()), (1, 3));
    }

    #[test]
    fn an_import_that_would_not_replay_is_refused_before_any_append() {
        let dir = temp_dir("import-bad");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), Some(ownership(1))).unwrap();
        let user = users_of_slot_range(0, 8191, 1).remove(0);
        let other = users_of_slot_range(8192, 16383, 1).remove(0);
        let record = |to: &str, seq: u64| {
            let mut payload = Vec::new();
            let m = MsgRecord {
                recipient: to,
                seq,
                sender: "alice",
                msg_id: id(seq),
                sent_ms: 1,
                body: b"x",
            };
            record::encode_msg(&m, &mut payload);
            let mut out = vec![record::MSG];
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&payload);
            out
        };
        let before = shard.wal().last_position();
        let gap = [record(&user, 1), record(&user, 3)].concat();
        assert!(matches!(
            shard.import_slots(0, 8191, &gap),
            Err(MoveError::Malformed(_))
        ));
        let outside = record(&other, 1);
        assert!(matches!(
            shard.import_slots(0, 8191, &outside),
            Err(MoveError::Malformed(_))
        ));
        assert!(matches!(
            shard.import_slots(0, 8191, &[record::CKPT, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(MoveError::Malformed(_))
        ));
        assert_eq!(shard.wal().last_position(), before, "nothing was logged");
        shard.import_slots(0, 8191, &record(&user, 1)).unwrap();
    }

    /// A log written before slot moves holds DEDUP records without slots:
    /// their entries are restated (checkpoint, snapshot) as DEDUP2 with the
    /// slot unknown, and those records replay.
    #[test]
    fn a_node_that_stepped_down_logs_no_ack() {
        let dir = temp_dir("ack-after-step-down");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let mut sink = Recorder::default();
        for n in 1..=4 {
            send(&mut shard, &mut sink, "alice", "bob", n, b"x");
        }
        commit(&mut shard, &mut sink);
        shard.ack("bob", 2, &mut sink).unwrap();
        let last = shard.wal().last_position();
        shard.step_down("lost the lease".into(), &mut sink);
        shard.ack("bob", 4, &mut sink).unwrap();
        assert_eq!(shard.wal().last_position(), last, "a replica appended");
        // Past its lease deadline a primary logs none either.
        shard.promote(shard.epoch() + 1, Mode::Replica, &mut sink);
        shard.set_lease_deadline(Arc::new(AtomicU64::new(1)));
        shard.ack("bob", 4, &mut sink).unwrap();
        assert_eq!(shard.wal().last_position(), last, "appended past the lease");
    }

    #[test]
    fn a_replica_refuses_a_record_its_state_cannot_take_without_logging_it() {
        let dir = temp_dir("diverged");
        let (mut replica, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        replica.become_replica("test".into());
        let mut payload = Vec::new();
        let msg = |seq: u64, payload: &mut Vec<u8>| {
            let m = MsgRecord {
                recipient: "bob",
                seq,
                sender: "alice",
                msg_id: id(seq),
                sent_ms: 1,
                body: b"x",
            };
            record::encode_msg(&m, payload);
        };
        fn rec(position: u64, payload: &[u8]) -> wal::Record<'_> {
            wal::Record {
                position,
                epoch: 1,
                record_type: record::MSG,
                payload,
            }
        }
        msg(1, &mut payload);
        replica.apply_replicated(&rec(1, &payload)).unwrap();
        msg(3, &mut payload);
        let err = replica.apply_replicated(&rec(2, &payload)).unwrap_err();
        assert!(
            matches!(err, ShardError::Diverged { position: 2, .. }),
            "{err}"
        );
        assert_eq!(
            replica.wal().last_position(),
            1,
            "the refused record was logged"
        );
    }

    #[test]
    fn old_dedup_records_are_restated_with_the_slot_unknown_and_replay() {
        let dir = temp_dir("old-dedup");
        let (mut shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let old = record::DedupEntry {
            sender_hash: 7,
            msg_id: id(9),
            stored_ms: 1,
            slot: record::SLOT_UNKNOWN,
        };
        let mut payload = Vec::new();
        record::encode_dedup_unslotted(&[old], &mut payload);
        let epoch = shard.epoch();
        shard
            .wal_mut()
            .append(epoch, record::DEDUP, &payload)
            .unwrap();
        let mut sink = Recorder::default();
        for n in 1..=8 {
            send(&mut shard, &mut sink, "alice", "bob", n, b"x");
        }
        commit(&mut shard, &mut sink);
        shard.ack("bob", 8, &mut sink).unwrap();
        commit(&mut shard, &mut sink);
        drop(shard);
        let (shard, _) = Shard::open(0, &dir, &limits(), None).unwrap();
        let frames = shard.snapshot_frames().expect("long enough").3;
        let mut at = 0;
        let mut dedup2 = 0;
        while let wal::format::Decoded::Record(r, len) =
            wal::format::decode_record(&frames[at..], u32::MAX)
        {
            let decoded = record::decode(r.record_type, r.payload).expect("replays");
            if let Decoded::Dedup(entries) = decoded {
                assert!(entries.contains(&old), "{entries:?}");
                dedup2 += usize::from(r.record_type == record::DEDUP2);
            }
            at += len;
        }
        assert_eq!(dedup2, 1);
    }
}
