//! The failover simulator (issue 12, "Deterministic simulation"): seeded,
//! single-threaded and deterministic, it runs 1 or 2 core pairs (2 to 4
//! nodes) sharing one simulated etcd, with simulated clients, through kills,
//! restarts, power cuts, pauses, partitions, message loss, delay and reorder,
//! and clock drift, then heals every fault, lets the cluster settle and checks
//! what clients were told against what the cluster holds.
//!
//! What runs for real: every node's election decisions are the real
//! [`election::Pilot`], stepped and answered the way `engine::pilot` does it
//! (one request in flight, a request timeout that becomes `Reply::Failed`,
//! `sent_us` taken on the node's clock when the request leaves, an idle step
//! every 10 ms, Observe as two reads).
//!
//! What is a model (it mirrors the rules, it does not run the code):
//! - etcd: leases whose TTL counts on etcd's clock from the arrival of the
//!   grant or keepalive, their keys deleted at expiry, one global revision
//!   bumped by every write, the `create` txn (leader key's create_revision
//!   == 0, with the state put in the same revision) and the guarded put
//!   (leader key's create_revision == epoch), as `etcd.rs` sends them.
//! - a node: one shard whose log is a list of records (epoch, kind, msg_id,
//!   sender, seq), messages (MSG) and users' cumulative ACKs (ACK), with a
//!   written length and a durable (fsynced) length; the rules of
//!   `shard.rs` (`lease_valid`, `on_durable`, `commit_position`, msg_id
//!   dedup, `ack`, `step_down`, `promote`, `fence`) and of `repl.rs`
//!   (`tick`, `update_mode`, `publish`'s `synced`/`wants_alone`, the sync
//!   on connect of `plan`: partial, or truncate to the common prefix and
//!   re-submit the dropped messages, MSG records only as in
//!   `truncate_and_rebuild`; the replica taking the primary's epoch from
//!   WELCOME and heartbeats as `set_epoch` does; acks of the durable
//!   position; heartbeats; read timeouts of `loss_timeout`; reconnects with
//!   capped backoff; a fenced node steps down and follows).
//! - the sync on connect is `plan`'s rule: the common prefix of a diverged
//!   replica ends at the last record of the replica's last epoch that the
//!   primary holds; without one, a full sync. The rule `plan` had before
//!   (every record of epochs up to the replica's last one) left different
//!   records at one position on the two nodes: the simulator found it
//!   (seed 98), [`Plants::plan_as_repl`] runs it and its test shows the
//!   checker catching it; [`Plants::plan_by_all_epochs`] runs an ideal rule
//!   with every epoch of the replica known.
//! - the replication stream: one simulated TCP connection per session, in
//!   order; a message lost or overtaken breaks the session (as a reset would
//!   and as the replica's dense-position check does), and both sides notice
//!   by the read timeout as in `repl.rs`.
//! - clients: one message at a time per sender, retried with the same
//!   msg_id against either node of its pair until some node answers STORED.
//! - ACKs: each client is also a receiver that sends, every 100 to 300 ms,
//!   a cumulative ACK of its last STORED seq to the node that last answered
//!   it STORED, through the same faulty network: like an edge that has not
//!   heard of a failover yet, it may reach a node that stepped down, a
//!   restarted node following the new primary, or a primary past its
//!   lease. A node logs it as `Shard::ack` does since 434655c: only as an
//!   acting primary (role primary, lease valid), and only if it
//!   acknowledges more than the log holds for that user. ACK records are
//!   positions like any other (the sync on connect and the replica's log
//!   equality count them) but not messages (msg_id dedup, STORED, the
//!   final log's message checks and re-submission skip them). Before
//!   434655c `ack` logged it whatever the node's role: a node that had
//!   stepped down appended ACK records where the new primary wrote other
//!   records of the same epoch (the one the replica took from the WELCOME,
//!   or the old one when a power cut had cost it records the new primary
//!   holds), so the logs matched by epoch but not by content.
//!   [`Plants::ack_logged_by_any_node`] runs that rule and its test shows
//!   the checker catching it (a replica's log differing from the
//!   primary's).
//!
//! Not modelled: the WAL's bytes (`wal::sim` covers torn records and
//! recovery), checkpoints and full-sync snapshots as records (a full sync
//! copies the primary's log), crash repair by FETCH (`repair` runs only for
//! nodes that are not elected), several shards per node, edges and their
//! links, recipients' delivery windows (a message is "delivered" when it is
//! in the final primary's log; an ACK carries a user and a seq, and no
//! inbox checks it against deliveries), etcd itself failing (it is one linearizable
//! store here; only the network to it fails), and wall-clock jumps: every
//! deadline is on the node's monotonic clock (engine::clock, docs/DECISIONS.md
//! 20: the lease, the replica-loss timeout `update_mode` counts, the election's
//! retry backoff), which the model lets drift by up to `DRIFT_PPM_MAX` but
//! never go back, and the only wall-clock reading in replication (`now_ms` in
//! acks and heartbeats) is informational, so a jump of the wall clock cannot
//! move a deadline (tests/tests/clocks.rs steps a real node's wall clock).
//!
//! Checks: during the run, no STORED unless the lease of the node's epoch
//! is alive in etcd at that true instant, one node told to serve an epoch,
//! STORED epochs of a pair never going back in time, and a new primary
//! holding every message STORED before in its pair; after healing and
//! settling, one acting primary per pair whose log holds every STORED
//! msg_id once and each sender's STORED messages in order, a replica's log
//! (ACK records included) equal to it, and no client left with a message not STORED.
//!
//! Run: `cargo test --release -p engine --lib sim::` (`SEEDS` seeds, about
//! 15 s on 2 cores, or `IRIS_SIM_SEEDS=N`); replay one: `IRIS_SIM_SEED=N`
//! (add `IRIS_SIM_TRACE=1` for a trace of the run on stderr, with
//! `-- --nocapture`).

use crate::election::{Action, Facts, Leader, PairState, Pilot, Reply, Request, Settings};
use std::collections::{BTreeMap, VecDeque};
use wal::sim::SimRng;

/// Seeds run by the test command.
pub const SEEDS: u64 = 5_000;
/// One step of simulated (true) time.
const STEP_US: u64 = 1_000;
/// Steps with faults, then steps to settle after every fault is healed.
const FAULT_STEPS: u64 = 8_000;
const SETTLE_STEPS: u64 = 7_000;
/// Packets in flight at most (beyond: dropped, as a full buffer would).
const PACKETS_MAX: usize = 20_000;
/// Entries in one replication batch.
const BATCH_ENTRIES_MAX: usize = 64;
/// Messages a sender sends at most in one run.
const SENDER_MSGS_MAX: u32 = 1_000;
/// Clock drift of a node at most, in parts per million (2 %).
const DRIFT_PPM_MAX: u64 = 20_000;
/// Senders per pair.
const SENDERS_PER_PAIR: usize = 3;
/// Faults active at once at most.
const FAULTS_MAX: usize = 3;
/// The maintenance tick (runtime::MAINTENANCE_TICK) and pilot's idle step.
const TICK_US: u64 = 50_000;
const PILOT_IDLE_US: u64 = 10_000;
const REQUEST_TIMEOUT_US: u64 = 300_000;
const LOSS_TIMEOUT_US: u64 = 300_000;
const HEARTBEAT_US: u64 = 100_000;
const BACKOFF_MIN_US: u64 = 100_000;
const BACKOFF_MAX_US: u64 = 800_000;
const CLIENT_TIMEOUT_US: u64 = 400_000;
/// A client's cumulative ACK, every ACK_EVERY_US / 2 .. 3 * ACK_EVERY_US / 2
/// (about one per message STORED; more often costs run time and finds no
/// more: the planted ACK bug turns red on about a quarter of the seeds at
/// 50 ms as at 200 ms).
const ACK_EVERY_US: u64 = 200_000;

/// Bugs planted in the model on purpose, to show the checker turns red.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plants {
    /// STORED without waiting for the replica's ack in mode `replica`.
    pub ack_without_replica: bool,
    /// repl.rs `plan` before 5f01944: a node that is not primary fences
    /// itself on a HELLO with a higher epoch, and a fenced node neither
    /// follows nor can be promoted (see the test below). Needs the tick's
    /// step-down of a fenced node off too, as it was then.
    pub fence_replica_on_hello: bool,
    /// repl.rs `plan` as of c67843b: the common prefix of a diverged
    /// replica is every record of ours at or below its last position whose
    /// epoch is at most its last record's, which keeps a replica's record
    /// where ours has another of an older epoch (see the test below).
    pub plan_as_repl: bool,
    /// The sync on connect matches every epoch of the replica's log (an
    /// ideal HELLO carrying them all), instead of `plan`'s rule.
    pub plan_by_all_epochs: bool,
    /// Shard::ack before 434655c: an ACK is logged whatever the node's role.
    pub ack_logged_by_any_node: bool,
}

fn settings(may_serve_alone: bool) -> Settings {
    Settings {
        ttl_ms: 1000,
        margin_ms: 200,
        renew_every_ms: 200,
        observe_every_ms: 100,
        settle_ms: 3 * TICK_US / 1000,
        may_serve_alone,
    }
}

// ------------------------------------------------------------------ etcd

#[derive(Debug, Clone)]
struct Kv {
    value: String,
    create_revision: u64,
    lease: i64,
}

#[derive(Default)]
struct Etcd {
    revision: u64,
    next_lease: i64,
    /// Lease → expiry on etcd's (true) clock.
    leases: BTreeMap<i64, u64>,
    keys: BTreeMap<String, Kv>,
}

#[derive(Debug, Clone)]
enum EtcdOp {
    Grant,
    Keepalive(i64),
    GetLeader,
    GetState,
    Create {
        lease: i64,
        node: String,
        state: String,
    },
    PutGuarded {
        epoch: u64,
        state: String,
    },
}

#[derive(Debug, Clone)]
enum EtcdRes {
    Granted(i64, u64),
    Kept(u64),
    Leader(Option<Leader>),
    State(Option<PairState>),
    Created(Result<u64, Option<Leader>>),
    Put(bool),
    /// An error status (a put under a lease that is gone).
    Error,
}

fn leader_key(pair: usize) -> String {
    format!("iris/pairs/{pair}/leader")
}

fn state_key(pair: usize) -> String {
    format!("iris/pairs/{pair}/state")
}

impl Etcd {
    fn expire(&mut self, now: u64) {
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.leases.remove(&id);
            let keys: Vec<String> = self
                .keys
                .iter()
                .filter(|(_, kv)| kv.lease == id)
                .map(|(k, _)| k.clone())
                .collect();
            for k in keys {
                self.revision += 1;
                self.keys.remove(&k);
            }
        }
    }

    fn alive(&self, lease: i64, now: u64) -> bool {
        self.leases.get(&lease).is_some_and(|&at| at > now)
    }

    fn leader(&self, pair: usize) -> Option<Leader> {
        self.keys.get(&leader_key(pair)).map(|kv| Leader {
            node: kv.value.clone(),
            epoch: kv.create_revision,
        })
    }

    fn apply(&mut self, now: u64, pair: usize, op: EtcdOp, ttl_ms: u64) -> EtcdRes {
        self.expire(now);
        match op {
            EtcdOp::Grant => {
                self.next_lease += 1;
                let ttl_s = ttl_ms.div_ceil(1000);
                self.leases.insert(self.next_lease, now + ttl_s * 1_000_000);
                EtcdRes::Granted(self.next_lease, ttl_s * 1000)
            }
            EtcdOp::Keepalive(id) => match self.leases.get_mut(&id) {
                Some(at) => {
                    *at = now + ttl_ms.div_ceil(1000) * 1_000_000;
                    EtcdRes::Kept(ttl_ms.div_ceil(1000) * 1000)
                }
                None => EtcdRes::Kept(0),
            },
            EtcdOp::GetLeader => EtcdRes::Leader(self.leader(pair)),
            EtcdOp::GetState => EtcdRes::State(
                self.keys
                    .get(&state_key(pair))
                    .and_then(|kv| PairState::decode(&kv.value)),
            ),
            EtcdOp::Create { lease, node, state } => {
                if let Some(holder) = self.leader(pair) {
                    return EtcdRes::Created(Err(Some(holder)));
                }
                if !self.alive(lease, now) {
                    return EtcdRes::Error;
                }
                self.revision += 1;
                let rev = self.revision;
                self.keys.insert(
                    leader_key(pair),
                    Kv {
                        value: node,
                        create_revision: rev,
                        lease,
                    },
                );
                self.keys.insert(
                    state_key(pair),
                    Kv {
                        value: state,
                        create_revision: rev,
                        lease: 0,
                    },
                );
                EtcdRes::Created(Ok(rev))
            }
            EtcdOp::PutGuarded { epoch, state } => {
                if self.leader(pair).is_none_or(|l| l.epoch != epoch) {
                    return EtcdRes::Put(false);
                }
                self.revision += 1;
                let create_revision = self
                    .keys
                    .get(&state_key(pair))
                    .map_or(self.revision, |kv| kv.create_revision);
                self.keys.insert(
                    state_key(pair),
                    Kv {
                        value: state,
                        create_revision,
                        lease: 0,
                    },
                );
                EtcdRes::Put(true)
            }
        }
    }
}

// ------------------------------------------------------------- network

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ep {
    Node(usize),
    Etcd,
    Client(usize),
}

/// What a log record is. A MSG is a client's message; an ACK is a user's
/// cumulative ACK (`Shard::ack`'s record): its `sender` is the acking user,
/// its `seq` the seq acknowledged, its `msg_id` 0. ACKs are positions in
/// the log like any record (the sync on connect and the replica's log
/// equality count them), but no message: msg_id dedup, STORED, the final
/// log's message checks and a truncated tail's re-submission skip them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Msg,
    Ack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    epoch: u64,
    kind: Kind,
    msg_id: u64,
    sender: u32,
    seq: u32,
}

#[derive(Debug, Clone)]
enum ReplMsg {
    Hello {
        epoch: u64,
        last: u64,
        last_epoch: u64,
        /// The replica's epoch at each position: what a log-matching sync
        /// needs (a real protocol would send the epoch boundaries).
        epochs: Vec<u64>,
    },
    Welcome {
        epoch: u64,
        truncate: Option<u64>,
        /// A full sync: the primary's whole log.
        full: Option<Vec<Entry>>,
    },
    Refuse,
    Records {
        first: u64,
        entries: Vec<Entry>,
    },
    Heartbeat {
        epoch: u64,
        last: u64,
    },
    Ack {
        epoch: u64,
        durable: u64,
        resubmit: Vec<Entry>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Stored,
    NotPrimary,
    Rejected,
}

#[derive(Debug, Clone)]
enum Body {
    EtcdReq {
        req_id: u64,
        pair: usize,
        op: EtcdOp,
    },
    EtcdRep {
        req_id: u64,
        res: EtcdRes,
    },
    Repl {
        session: u64,
        seq: u64,
        msg: ReplMsg,
    },
    Send {
        client: usize,
        entry: Entry,
    },
    /// A user's cumulative ACK (no answer).
    ClientAck {
        user: u32,
        seq: u32,
    },
    Answer {
        msg_id: u64,
        answer: Answer,
    },
}

#[derive(Debug, Clone)]
struct Packet {
    from: Ep,
    to: Ep,
    /// The receiving node's life when sent (a restarted node gets nothing
    /// meant for its previous life).
    to_life: u64,
    body: Body,
}

// ----------------------------------------------------------------- nodes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Primary,
    Replica,
    Fenced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Replica,
    Degraded,
    Blocked,
}

/// Primary side of a replication session.
struct Link {
    session: u64,
    send_seq: u64,
    recv_seq: u64,
    acked: u64,
    sent_upto: u64,
    next_heartbeat: u64,
    heard_at: u64,
}

/// Replica side of a replication session.
struct Follow {
    session: u64,
    send_seq: u64,
    recv_seq: u64,
    welcomed: bool,
    started: u64,
    heard_at: u64,
    acked_sent: u64,
    next_ack: u64,
}

struct InFlight {
    req_id: u64,
    req: Request,
    sent_local: u64,
    timeout_local: u64,
    /// Observe: the leader read, before the state read.
    leader: Option<Option<Leader>>,
}

/// What survives a process's death: the log (written and durable lengths)
/// and DATA/epoch.
struct Disk {
    log: Vec<Entry>,
    durable: usize,
    epoch_file: u64,
}

struct Node {
    name: String,
    pair: usize,
    peer: usize,
    disk: Disk,
    /// Clock: local = offset + true + true * ppm / 1e6 (ppm may be negative).
    clock_offset: u64,
    drift_ppm: i64,
    up: bool,
    life: u64,
    paused_until: u64,
    down_until: u64,
    // In-memory state (lost at a kill).
    role: Role,
    epoch: u64,
    mode: Mode,
    replica_acked: u64,
    alone_until: u64,
    waiting: VecDeque<(u64, u64, Option<usize>)>,
    dedup: BTreeMap<u64, u64>,
    /// User → the highest seq of its ACKs in the log (the inboxes' `acked`).
    acks: BTreeMap<u32, u32>,
    fsync: Option<(u64, usize)>,
    link: Option<Link>,
    follow: Option<Follow>,
    next_connect: u64,
    backoff: u64,
    resubmit: Vec<Entry>,
    primary_last: u64,
    next_tick: u64,
    // NodeStats, as shared between the pilot and the cores.
    deadline: u64,
    alone_allowed: bool,
    promote_requested: bool,
    promote_epoch: u64,
    demote_requested: bool,
    stats_epoch: u64,
    synced: bool,
    wants_alone: bool,
    // The pilot and its driver (pilot.rs).
    pilot: Pilot,
    in_flight: Option<InFlight>,
    next_pilot: u64,
    may_serve_alone: bool,
}

impl Node {
    fn local(&self, true_us: u64) -> u64 {
        // In i64: a run's 15 s at 2 % is 3e11, far from overflow (the 128-bit
        // division it used to be took a sixth of the run time).
        let drift = true_us as i64 * self.drift_ppm / 1_000_000;
        (self.clock_offset as i64 + true_us as i64 + drift) as u64
    }

    fn last(&self) -> u64 {
        self.disk.log.len() as u64
    }

    fn epoch_at(&self, pos: u64) -> Option<u64> {
        (pos >= 1)
            .then(|| self.disk.log.get(pos as usize - 1).map(|e| e.epoch))
            .flatten()
    }

    fn lease_valid(&self, local: u64) -> bool {
        self.deadline == u64::MAX || local < self.deadline
    }

    fn commit_position(&self, plants: &Plants) -> u64 {
        let local = self.disk.durable as u64;
        match self.mode {
            Mode::Replica | Mode::Blocked if !plants.ack_without_replica => {
                local.min(self.replica_acked)
            }
            _ => local,
        }
    }

    /// Shard::replay: the msg_id dedup and the ACKed seqs, from the log.
    fn replay(&mut self) {
        self.dedup.clear();
        self.acks.clear();
        for i in 0..self.disk.log.len() {
            self.index(i);
        }
    }

    fn index(&mut self, i: usize) {
        let e = self.disk.log[i];
        match e.kind {
            Kind::Msg => {
                self.dedup.insert(e.msg_id, i as u64 + 1);
            }
            Kind::Ack => {
                let acked = self.acks.entry(e.sender).or_default();
                *acked = (*acked).max(e.seq);
            }
        }
    }

    fn append(&mut self, e: Entry) -> u64 {
        self.disk.log.push(e);
        self.index(self.disk.log.len() - 1);
        self.last()
    }

    /// A new process on the same disk: every in-memory field starts over.
    fn start(&mut self, life: u64, now_local: u64) {
        self.up = true;
        self.life = life;
        let log_epoch = self.disk.log.iter().map(|e| e.epoch).max().unwrap_or(0);
        self.epoch = self.disk.epoch_file.max(log_epoch);
        self.stats_epoch = self.epoch;
        self.role = Role::Replica;
        self.mode = Mode::Blocked;
        self.replica_acked = 0;
        self.alone_until = 0;
        self.waiting.clear();
        self.replay();
        self.fsync = None;
        self.link = None;
        self.follow = None;
        self.next_connect = now_local;
        self.backoff = BACKOFF_MIN_US;
        self.resubmit.clear();
        self.primary_last = 0;
        self.next_tick = now_local + TICK_US;
        self.deadline = 0;
        self.alone_allowed = false;
        self.promote_requested = false;
        self.promote_epoch = 0;
        self.demote_requested = false;
        self.synced = false;
        self.wants_alone = false;
        self.pilot = Pilot::new(&self.name, settings(self.may_serve_alone));
        self.in_flight = None;
        self.next_pilot = now_local;
    }

    fn facts(&self) -> Facts {
        Facts {
            primary: self.role == Role::Primary,
            epoch: self.stats_epoch,
            synced: self.synced,
            wants_alone: self.wants_alone,
            promote_asked: false,
            hold: false,
        }
    }
}

// --------------------------------------------------------------- clients

struct Client {
    pair: usize,
    sender: u32,
    next_seq: u32,
    /// The message being sent, until some node answers STORED.
    current: Option<Entry>,
    target: usize,
    waiting_until: Option<u64>,
    next_try: u64,
    stored: u64,
    /// As a receiver: the seq it ACKs (its last STORED), and the node it
    /// takes for its pair's primary (the last to answer it STORED).
    acked: u32,
    ack_to: Option<usize>,
    next_ack: u64,
}

// --------------------------------------------------------------- faults

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// One-way cut (both directions: two of them).
    Cut(Ep, Ep),
    Loss(u64),
    Slow(u64),
}

// --------------------------------------------------------------- history

#[derive(Debug, Clone)]
struct StoredEvent {
    at: u64,
    node: usize,
    epoch: u64,
    msg_id: u64,
}

/// One run of the simulation.
pub struct World {
    seed: u64,
    rng: SimRng,
    now: u64,
    etcd: Etcd,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    packets: BTreeMap<(u64, u64), Packet>,
    packet_seq: u64,
    faults: Vec<(u64, Fault)>,
    next_req: u64,
    next_session: u64,
    next_life: u64,
    ttl_ms: u64,
    plants: Plants,
    /// epoch → the lease its leader key was created under.
    epoch_lease: BTreeMap<u64, i64>,
    /// (pair, epoch) → the node told to Serve.
    served: BTreeMap<(usize, u64), usize>,
    stored: Vec<StoredEvent>,
    /// pair → the epoch of the last STORED released.
    last_stored_epoch: Vec<u64>,
    violations: Vec<String>,
    trace: bool,
    /// Link-level delay of the last packet, per (from, to): kept in order
    /// unless reordered on purpose.
    last_arrival: BTreeMap<(Ep, Ep), u64>,
}

impl World {
    pub fn new(seed: u64, plants: Plants) -> World {
        let mut rng = SimRng::new(seed);
        let nr_pairs = 1 + rng.below(2) as usize;
        let may_serve_alone = rng.chance(50);
        let mut nodes = Vec::new();
        for i in 0..nr_pairs * 2 {
            let drift = rng.below(2 * DRIFT_PPM_MAX + 1) as i64 - DRIFT_PPM_MAX as i64;
            let name = format!("p{}{}", i / 2, if i % 2 == 0 { 'a' } else { 'b' });
            nodes.push(Node {
                pilot: Pilot::new(&name, settings(may_serve_alone)),
                name,
                pair: i / 2,
                peer: i ^ 1,
                disk: Disk {
                    log: Vec::new(),
                    durable: 0,
                    epoch_file: 0,
                },
                clock_offset: rng.below(1 << 40),
                drift_ppm: drift,
                up: false,
                life: 0,
                paused_until: 0,
                down_until: 0,
                role: Role::Replica,
                epoch: 0,
                mode: Mode::Blocked,
                replica_acked: 0,
                alone_until: 0,
                waiting: VecDeque::new(),
                dedup: BTreeMap::new(),
                acks: BTreeMap::new(),
                fsync: None,
                link: None,
                follow: None,
                next_connect: 0,
                backoff: BACKOFF_MIN_US,
                resubmit: Vec::new(),
                primary_last: 0,
                next_tick: 0,
                deadline: 0,
                alone_allowed: false,
                promote_requested: false,
                promote_epoch: 0,
                demote_requested: false,
                stats_epoch: 0,
                synced: false,
                wants_alone: false,
                in_flight: None,
                next_pilot: 0,
                may_serve_alone,
            });
        }
        let clients = (0..nr_pairs * SENDERS_PER_PAIR)
            .map(|i| Client {
                pair: i / SENDERS_PER_PAIR,
                sender: i as u32,
                next_seq: 1,
                current: None,
                target: (i / SENDERS_PER_PAIR) * 2,
                waiting_until: None,
                next_try: 0,
                stored: 0,
                acked: 0,
                ack_to: None,
                next_ack: 0,
            })
            .collect();
        let mut w = World {
            seed,
            rng,
            now: 0,
            etcd: Etcd::default(),
            nodes,
            clients,
            packets: BTreeMap::new(),
            packet_seq: 0,
            faults: Vec::new(),
            next_req: 1,
            next_session: 1,
            next_life: 1,
            ttl_ms: 1000,
            plants,
            epoch_lease: BTreeMap::new(),
            served: BTreeMap::new(),
            stored: Vec::new(),
            last_stored_epoch: vec![0; nr_pairs],
            violations: Vec::new(),
            trace: std::env::var_os("IRIS_SIM_TRACE").is_some(),
            last_arrival: BTreeMap::new(),
        };
        for i in 0..w.nodes.len() {
            w.start_node(i);
        }
        w
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>9} {}", self.now, what());
        }
    }

    fn start_node(&mut self, i: usize) {
        let life = self.next_life;
        self.next_life += 1;
        let local = self.nodes[i].local(self.now);
        self.nodes[i].start(life, local);
        self.log(|| format!("{} starts (life {life})", self.nodes[i].name));
    }

    // ------------------------------------------------------------ network

    fn blocked(&self, from: Ep, to: Ep) -> bool {
        self.faults
            .iter()
            .any(|(_, f)| matches!(f, Fault::Cut(a, b) if *a == from && *b == to))
    }

    fn send(&mut self, from: Ep, to: Ep, body: Body) {
        if self.packets.len() >= PACKETS_MAX || self.blocked(from, to) {
            return;
        }
        let loss: u64 = self
            .faults
            .iter()
            .map(|(_, f)| if let Fault::Loss(p) = f { *p } else { 0 })
            .sum();
        if loss > 0 && self.rng.chance(loss) {
            return;
        }
        let slow = self.faults.iter().any(|(_, f)| matches!(f, Fault::Slow(_)));
        let mut delay = 200 + self.rng.below(3_000);
        if slow {
            let max = self
                .faults
                .iter()
                .map(|(_, f)| if let Fault::Slow(d) = f { *d } else { 0 })
                .max()
                .unwrap_or(0);
            delay += self.rng.below(max + 1);
        }
        let mut at = self.now + delay;
        // In order per direction, except sometimes (reorder).
        let last = self.last_arrival.entry((from, to)).or_insert(0);
        if !self.rng.chance(2) {
            at = at.max(*last);
        }
        *last = (*last).max(at);
        let to_life = match to {
            Ep::Node(n) => self.nodes[n].life,
            _ => 0,
        };
        self.packet_seq += 1;
        self.packets.insert(
            (at, self.packet_seq),
            Packet {
                from,
                to,
                to_life,
                body,
            },
        );
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.packets.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let p = entry.remove();
            if self.blocked(p.from, p.to) {
                continue;
            }
            match p.to {
                Ep::Etcd => self.on_etcd(p),
                Ep::Node(n) => {
                    let node = &self.nodes[n];
                    if !node.up || node.life != p.to_life {
                        continue;
                    }
                    if node.paused_until > self.now {
                        // A paused process reads its sockets later.
                        self.packet_seq += 1;
                        self.packets.insert((node.paused_until, self.packet_seq), p);
                        continue;
                    }
                    self.on_node_packet(n, p);
                }
                Ep::Client(c) => self.on_client_packet(c, p),
            }
        }
    }

    fn on_etcd(&mut self, p: Packet) {
        let Body::EtcdReq { req_id, pair, op } = p.body else {
            return;
        };
        let res = self.etcd.apply(self.now, pair, op.clone(), self.ttl_ms);
        if let (EtcdOp::Create { lease, .. }, EtcdRes::Created(Ok(epoch))) = (&op, &res) {
            self.epoch_lease.insert(*epoch, *lease);
        }
        self.send(Ep::Etcd, p.from, Body::EtcdRep { req_id, res });
    }

    // -------------------------------------------------------------- pilot

    fn pilot_actions(&mut self, n: usize, actions: Vec<Action>) {
        for a in actions {
            self.log(|| format!("{} pilot: {a:?}", self.nodes[n].name));
            let node = &mut self.nodes[n];
            match a {
                Action::Deadline(us) => node.deadline = us,
                Action::AllowAlone(allowed) => node.alone_allowed = allowed,
                Action::Serve { epoch } => {
                    node.demote_requested = false;
                    node.promote_epoch = epoch;
                    node.promote_requested = true;
                    let pair = node.pair;
                    if let Some(&other) = self.served.get(&(pair, epoch)) {
                        if other != n {
                            self.violations.push(format!(
                                "two nodes told to serve epoch {epoch}: {} and {}",
                                self.nodes[other].name, self.nodes[n].name
                            ));
                        }
                    }
                    self.served.insert((pair, epoch), n);
                }
                Action::StepDown { .. } => {
                    node.demote_requested = true;
                    node.promote_requested = false;
                }
                Action::Warn(_) => {}
            }
        }
    }

    fn pilot_send(&mut self, n: usize, req: Request, local: u64) {
        let op = match &req {
            Request::Grant => EtcdOp::Grant,
            Request::Renew { lease } => EtcdOp::Keepalive(*lease),
            Request::Observe => EtcdOp::GetLeader,
            Request::Campaign { lease, state } => EtcdOp::Create {
                lease: *lease,
                node: state.leader.clone(),
                state: state.encode(),
            },
            Request::WriteState { epoch, state } => EtcdOp::PutGuarded {
                epoch: *epoch,
                state: state.encode(),
            },
        };
        let req_id = self.next_req;
        self.next_req += 1;
        self.nodes[n].in_flight = Some(InFlight {
            req_id,
            req,
            sent_local: local,
            timeout_local: local + REQUEST_TIMEOUT_US,
            leader: None,
        });
        let pair = self.nodes[n].pair;
        self.send(Ep::Node(n), Ep::Etcd, Body::EtcdReq { req_id, pair, op });
    }

    /// pilot.rs's loop: step; make the request; answer; step again.
    fn pilot_step(&mut self, n: usize, local: u64) {
        if self.nodes[n].in_flight.is_some() {
            let f = self.nodes[n].in_flight.as_ref().expect("checked");
            if local >= f.timeout_local {
                self.nodes[n].in_flight = None;
                let facts = self.nodes[n].facts();
                let acts = self.nodes[n].pilot.answer(local, facts, Reply::Failed);
                self.pilot_actions(n, acts);
                self.nodes[n].next_pilot = local;
            } else {
                return;
            }
        }
        if local < self.nodes[n].next_pilot {
            return;
        }
        let facts = self.nodes[n].facts();
        let (acts, req) = self.nodes[n].pilot.step(local, facts);
        self.pilot_actions(n, acts);
        match req {
            Some(req) => self.pilot_send(n, req, local),
            None => self.nodes[n].next_pilot = local + PILOT_IDLE_US,
        }
    }

    fn on_etcd_reply(&mut self, n: usize, req_id: u64, res: EtcdRes) {
        let local = self.nodes[n].local(self.now);
        let Some(f) = self.nodes[n].in_flight.as_mut() else {
            return;
        };
        if f.req_id != req_id {
            return; // the answer to a request that timed out
        }
        let sent_us = f.sent_local;
        let reply = match (&f.req, res) {
            (_, EtcdRes::Error) => Reply::Failed,
            (Request::Grant, EtcdRes::Granted(lease, ttl_ms)) => Reply::Granted {
                lease,
                ttl_ms,
                sent_us,
            },
            (Request::Renew { .. }, EtcdRes::Kept(ttl_ms)) => Reply::Renewed { ttl_ms, sent_us },
            (Request::Observe, EtcdRes::Leader(leader)) => {
                // The second read (pilot.rs: two gets, each with its timeout).
                f.leader = Some(leader);
                let req_id = self.next_req;
                self.next_req += 1;
                f.req_id = req_id;
                f.timeout_local = local + REQUEST_TIMEOUT_US;
                let pair = self.nodes[n].pair;
                let op = EtcdOp::GetState;
                self.send(Ep::Node(n), Ep::Etcd, Body::EtcdReq { req_id, pair, op });
                return;
            }
            (Request::Observe, EtcdRes::State(state)) => Reply::Observed {
                leader: f.leader.take().flatten(),
                state,
            },
            (Request::Campaign { .. }, EtcdRes::Created(Ok(epoch))) => Reply::Won { epoch },
            (Request::Campaign { .. }, EtcdRes::Created(Err(leader))) => Reply::Lost { leader },
            (Request::WriteState { .. }, EtcdRes::Put(ok)) => Reply::StateWritten { ok },
            (req, res) => panic!("sim: etcd answer {res:?} to {req:?}"),
        };
        self.nodes[n].in_flight = None;
        let facts = self.nodes[n].facts();
        self.log(|| format!("{} answer {reply:?}", self.nodes[n].name));
        let acts = self.nodes[n].pilot.answer(local, facts, reply);
        self.pilot_actions(n, acts);
        self.nodes[n].next_pilot = local;
        self.pilot_step(n, local);
    }

    // ------------------------------------------------------------- cores

    fn on_node_packet(&mut self, n: usize, p: Packet) {
        match p.body {
            Body::EtcdRep { req_id, res } => self.on_etcd_reply(n, req_id, res),
            Body::Send { client, entry } => self.on_send(n, Some(client), entry),
            Body::ClientAck { user, seq } => self.on_client_ack(n, user, seq),
            Body::Repl { session, seq, msg } => self.on_repl(n, p.from, session, seq, msg),
            _ => {}
        }
    }

    fn answer_client(&mut self, n: usize, client: Option<usize>, msg_id: u64, answer: Answer) {
        if let Some(c) = client {
            self.send(Ep::Node(n), Ep::Client(c), Body::Answer { msg_id, answer });
        }
    }

    /// Shard::send (and a RESUBMIT, answered to nobody).
    fn on_send(&mut self, n: usize, client: Option<usize>, e: Entry) {
        let local = self.nodes[n].local(self.now);
        let node = &self.nodes[n];
        if node.role != Role::Primary || !node.lease_valid(local) {
            return self.answer_client(n, client, e.msg_id, Answer::NotPrimary);
        }
        if node.mode == Mode::Blocked {
            return self.answer_client(n, client, e.msg_id, Answer::Rejected);
        }
        let pos = match node.dedup.get(&e.msg_id) {
            Some(&pos) => pos,
            None => {
                let epoch = self.nodes[n].epoch;
                self.nodes[n].append(Entry { epoch, ..e })
            }
        };
        self.nodes[n].waiting.push_back((pos, e.msg_id, client));
        self.release(n);
    }

    /// Shard::ack: logged (not waited for, not answered) only by an acting
    /// primary, and only if it acknowledges more than the log holds for the
    /// user. A node that is not one (stepped down, a replica that took the
    /// new epoch from a WELCOME, a primary past its lease) would append it
    /// where the primary writes other records, perhaps under the same epoch.
    fn on_client_ack(&mut self, n: usize, user: u32, seq: u32) {
        let local = self.nodes[n].local(self.now);
        let node = &self.nodes[n];
        let acting = node.role == Role::Primary && node.lease_valid(local);
        if !acting && !self.plants.ack_logged_by_any_node {
            return;
        }
        if node.acks.get(&user).is_some_and(|&acked| seq <= acked) {
            return;
        }
        let epoch = node.epoch;
        let pos = self.nodes[n].append(Entry {
            epoch,
            kind: Kind::Ack,
            msg_id: 0,
            sender: user,
            seq,
        });
        self.log(|| {
            format!(
                "{} logs ACK {user}/{seq} at {pos} epoch {epoch} (acting: {acting})",
                self.nodes[n].name
            )
        });
    }

    /// Shard::on_durable: STORED for what the commit position covers.
    fn release(&mut self, n: usize) {
        let local = self.nodes[n].local(self.now);
        let node = &self.nodes[n];
        if node.role != Role::Primary || !node.lease_valid(local) {
            return;
        }
        let commit = node.commit_position(&self.plants);
        let mut released = Vec::new();
        let node = &mut self.nodes[n];
        // The waiting list is in position order except for duplicates
        // answered at once: scan all (it is short).
        node.waiting.retain(|&(pos, msg_id, client)| {
            if pos <= commit {
                released.push((msg_id, client));
                false
            } else {
                true
            }
        });
        for (msg_id, client) in released {
            self.on_stored(n, msg_id);
            self.answer_client(n, client, msg_id, Answer::Stored);
        }
    }

    fn on_stored(&mut self, n: usize, msg_id: u64) {
        let (epoch, pair) = (self.nodes[n].epoch, self.nodes[n].pair);
        let lease = self.epoch_lease.get(&epoch).copied();
        if !lease.is_some_and(|l| self.etcd.alive(l, self.now)) {
            self.violations.push(format!(
                "{} released STORED for msg {msg_id} at {} in epoch {epoch}, whose lease {lease:?} is not alive in etcd",
                self.nodes[n].name, self.now
            ));
        }
        if epoch < self.last_stored_epoch[pair] {
            self.violations.push(format!(
                "{} released STORED in epoch {epoch} after a STORED of epoch {} in pair {pair}",
                self.nodes[n].name, self.last_stored_epoch[pair]
            ));
        }
        self.last_stored_epoch[pair] = self.last_stored_epoch[pair].max(epoch);
        self.log(|| format!("{} STORED {msg_id:#x} epoch {epoch}", self.nodes[n].name));
        self.stored.push(StoredEvent {
            at: self.now,
            node: n,
            epoch,
            msg_id,
        });
    }

    fn not_primary_all(&mut self, n: usize) {
        let waiting: Vec<_> = self.nodes[n].waiting.drain(..).collect();
        for (_, msg_id, client) in waiting {
            self.answer_client(n, client, msg_id, Answer::NotPrimary);
        }
    }

    fn repl_send(&mut self, n: usize, msg: ReplMsg) {
        let peer = self.nodes[n].peer;
        let node = &mut self.nodes[n];
        let (session, seq) = if let Some(l) = node.link.as_mut() {
            l.send_seq += 1;
            (l.session, l.send_seq)
        } else if let Some(f) = node.follow.as_mut() {
            f.send_seq += 1;
            (f.session, f.send_seq)
        } else {
            return;
        };
        self.send(
            Ep::Node(n),
            Ep::Node(peer),
            Body::Repl { session, seq, msg },
        );
    }

    fn on_repl(&mut self, n: usize, from: Ep, session: u64, seq: u64, msg: ReplMsg) {
        let Ep::Node(_) = from else { return };
        let local = self.nodes[n].local(self.now);
        if let ReplMsg::Hello {
            epoch,
            last,
            last_epoch,
            ref epochs,
        } = msg
        {
            if seq == 1 {
                let hello = (epoch, last, last_epoch);
                return self.on_hello(n, session, hello, epochs, local);
            }
        }
        let node = &mut self.nodes[n];
        if let Some(l) = node.link.as_mut().filter(|l| l.session == session) {
            l.recv_seq += 1;
            if l.recv_seq != seq {
                node.link = None; // a broken stream
                return;
            }
            l.heard_at = local;
            return self.primary_on(n, msg);
        }
        if let Some(f) = node.follow.as_mut().filter(|f| f.session == session) {
            f.recv_seq += 1;
            if f.recv_seq != seq {
                node.follow = None;
                return;
            }
            f.heard_at = local;
            self.replica_on(n, msg);
        }
    }

    /// repl.rs `plan` and `serve_replica`.
    fn on_hello(
        &mut self,
        n: usize,
        session: u64,
        (epoch, l, e): (u64, u64, u64),
        epochs: &[u64],
        local: u64,
    ) {
        let node = &mut self.nodes[n];
        let fences = node.role == Role::Primary || self.plants.fence_replica_on_hello;
        let refuse = if epoch > node.epoch && fences {
            node.epoch = epoch;
            node.role = Role::Fenced;
            self.not_primary_all(n);
            true
        } else {
            node.role != Role::Primary
        };
        let node = &mut self.nodes[n];
        node.link = Some(Link {
            session,
            send_seq: 0,
            recv_seq: 1,
            acked: 0,
            sent_upto: 0,
            next_heartbeat: local,
            heard_at: local,
        });
        if refuse {
            self.log(|| format!("{} refuses its replica", self.nodes[n].name));
            self.repl_send(n, ReplMsg::Refuse);
            self.nodes[n].link = None;
            return;
        }
        let last = node.last();
        let (from, truncate, full) = if l == 0 || (l <= last && node.epoch_at(l) == Some(e)) {
            (l + 1, None, None)
        } else if self.plants.plan_as_repl {
            let mut common = 0;
            if e < node.epoch {
                // An old primary: keep what both logs share (epochs <= e).
                for (i, entry) in node.disk.log.iter().enumerate() {
                    let pos = i as u64 + 1;
                    if pos > l || entry.epoch > e {
                        break;
                    }
                    common = pos;
                }
            }
            if common >= 1 {
                (common + 1, Some(common), None)
            } else {
                (last + 1, None, Some(node.disk.log.clone()))
            }
        } else if self.plants.plan_by_all_epochs {
            // Log matching with every epoch of the replica known (the
            // model's HELLO carries them): the same epoch at a position
            // means the same record there and before.
            let common = (1..=l.min(last))
                .rev()
                .find(|&p| epochs.get(p as usize - 1).copied() == node.epoch_at(p))
                .unwrap_or(0);
            (common + 1, Some(common), None)
        } else {
            // repl.rs's `plan`: the last record of the replica's last epoch
            // that this log holds is the common prefix's end; none: a full
            // sync (the replica's log becomes this one).
            let common = (1..=l.min(last))
                .rev()
                .find(|&p| node.epoch_at(p) == Some(e))
                .unwrap_or(0);
            if common >= 1 {
                (common + 1, Some(common), None)
            } else {
                (last + 1, None, Some(node.disk.log.clone()))
            }
        };
        let epoch = node.epoch;
        node.link.as_mut().expect("set").sent_upto = from - 1;
        self.log(|| {
            format!(
                "{} welcomes its replica (hello {l}/{e}): from {from}, truncate {truncate:?}",
                self.nodes[n].name
            )
        });
        self.repl_send(
            n,
            ReplMsg::Welcome {
                epoch,
                truncate,
                full,
            },
        );
    }

    fn primary_on(&mut self, n: usize, msg: ReplMsg) {
        match msg {
            ReplMsg::Ack {
                epoch,
                durable,
                resubmit,
            } => {
                let node = &mut self.nodes[n];
                if epoch > node.epoch {
                    node.epoch = epoch;
                    node.role = Role::Fenced;
                    node.link = None;
                    return self.not_primary_all(n);
                }
                let last = node.last();
                if let Some(l) = node.link.as_mut() {
                    l.acked = l.acked.max(durable);
                }
                if durable > node.replica_acked {
                    node.replica_acked = durable.min(last);
                }
                for e in resubmit {
                    self.on_send(n, None, e);
                }
                self.release(n);
            }
            _ => self.nodes[n].link = None,
        }
    }

    fn replica_on(&mut self, n: usize, msg: ReplMsg) {
        let node = &mut self.nodes[n];
        match msg {
            ReplMsg::Welcome {
                epoch,
                truncate,
                full,
            } => {
                node.epoch = node.epoch.max(epoch);
                node.stats_epoch = node.stats_epoch.max(epoch);
                if let Some(f) = node.follow.as_mut() {
                    f.welcomed = true;
                }
                if let Some(keep) = truncate {
                    let keep = keep as usize;
                    if keep < node.disk.log.len() {
                        let tail = node.disk.log.split_off(keep);
                        if self.trace {
                            eprintln!(
                                "{:>9} {} truncates to {keep}, resubmits {tail:?}",
                                self.now, node.name
                            );
                        }
                        // truncate_and_rebuild re-submits MSG records only.
                        let msgs = tail.into_iter().filter(|e| e.kind == Kind::Msg);
                        node.resubmit.extend(msgs);
                    }
                    node.disk.durable = node.disk.durable.min(keep);
                    node.replay();
                }
                if let Some(log) = full {
                    node.disk.durable = 0;
                    node.disk.log = log;
                    node.replay();
                }
            }
            ReplMsg::Records { first, entries } => {
                if first != node.last() + 1 {
                    node.follow = None;
                    return;
                }
                for e in entries {
                    node.epoch = node.epoch.max(e.epoch);
                    node.append(e);
                }
            }
            ReplMsg::Heartbeat { epoch, last } => {
                if epoch < node.epoch {
                    node.follow = None;
                    return;
                }
                node.epoch = epoch;
                node.primary_last = last;
            }
            _ => node.follow = None,
        }
    }

    /// The replica's follow loop and ack writer, and the primary's stream.
    fn repl_io(&mut self, n: usize, local: u64) {
        let node = &mut self.nodes[n];
        if node.role == Role::Replica {
            let f_gone = node
                .follow
                .as_ref()
                .is_some_and(|f| local >= f.heard_at + LOSS_TIMEOUT_US);
            if f_gone {
                node.follow = None;
            }
            if node.follow.is_none() && local >= node.next_connect {
                self.next_session += 1;
                let node = &mut self.nodes[n];
                node.follow = Some(Follow {
                    session: self.next_session,
                    send_seq: 0,
                    recv_seq: 0,
                    welcomed: false,
                    started: local,
                    heard_at: local,
                    acked_sent: u64::MAX,
                    next_ack: local,
                });
                node.next_connect = local + node.backoff;
                node.backoff = (node.backoff * 2).min(BACKOFF_MAX_US);
                let last = node.last();
                let hello = ReplMsg::Hello {
                    epoch: node.epoch,
                    last,
                    last_epoch: node.epoch_at(last).unwrap_or(0),
                    epochs: node.disk.log.iter().map(|e| e.epoch).collect(),
                };
                self.log(|| format!("{} hello {hello:?}", self.nodes[n].name));
                return self.repl_send(n, hello);
            }
            let node = &mut self.nodes[n];
            let Some(f) = node.follow.as_mut() else {
                return;
            };
            if local >= f.started + BACKOFF_MAX_US {
                node.backoff = BACKOFF_MIN_US;
            }
            let durable = node.disk.durable as u64;
            if f.welcomed
                && (durable != f.acked_sent || !node.resubmit.is_empty() || local >= f.next_ack)
            {
                f.acked_sent = durable;
                f.next_ack = local + HEARTBEAT_US;
                let resubmit = std::mem::take(&mut node.resubmit);
                let epoch = node.epoch;
                self.repl_send(
                    n,
                    ReplMsg::Ack {
                        epoch,
                        durable,
                        resubmit,
                    },
                );
            }
            return;
        }
        let last = node.last();
        let Some(l) = node.link.as_mut() else {
            return;
        };
        if local >= l.heard_at + LOSS_TIMEOUT_US {
            node.link = None;
            return;
        }
        if l.sent_upto < last {
            let first = l.sent_upto + 1;
            let end = last.min(l.sent_upto + BATCH_ENTRIES_MAX as u64);
            let entries = node.disk.log[first as usize - 1..end as usize].to_vec();
            l.sent_upto = end;
            self.repl_send(n, ReplMsg::Records { first, entries });
        }
        let node = &mut self.nodes[n];
        let Some(l) = node.link.as_mut() else { return };
        if local >= l.next_heartbeat {
            l.next_heartbeat = local + HEARTBEAT_US;
            let (epoch, last) = (node.epoch, node.last());
            self.repl_send(n, ReplMsg::Heartbeat { epoch, last });
        }
    }

    /// repl::tick: step down, promote, update_mode, publish.
    fn tick(&mut self, n: usize, local: u64) {
        let node = &mut self.nodes[n];
        // Lost the election, or fenced by a higher epoch: follow the peer
        // (the demote flag stays set until the next promotion).
        let fenced = node.role == Role::Fenced && !self.plants.fence_replica_on_hello;
        if (node.demote_requested || fenced) && node.role != Role::Replica {
            node.role = Role::Replica;
            node.link = None;
            node.next_connect = local;
            self.log(|| format!("{} steps down", self.nodes[n].name));
            self.not_primary_all(n);
        }
        let node = &mut self.nodes[n];
        if node.promote_requested && node.role == Role::Replica {
            let epoch = node.promote_epoch;
            node.promote_requested = false;
            node.promote_epoch = 0;
            if epoch > node.epoch {
                node.disk.epoch_file = epoch;
                node.epoch = epoch;
                node.stats_epoch = epoch;
                node.alone_until = node.last();
                node.role = Role::Primary;
                node.mode = if node.may_serve_alone {
                    Mode::Degraded
                } else {
                    Mode::Blocked
                };
                node.replica_acked = 0;
                node.follow = None;
                self.log(|| format!("{} promoted, epoch {epoch}", self.nodes[n].name));
                self.check_promoted(n, epoch);
            }
        }
        let node = &mut self.nodes[n];
        if node.role == Role::Primary {
            Self::update_mode(node, local);
        }
        // publish
        let node = &mut self.nodes[n];
        if node.role == Role::Primary {
            let acked = node.link.as_ref().map_or(node.replica_acked, |l| l.acked);
            let waits = matches!(node.mode, Mode::Replica | Mode::Blocked);
            node.synced = waits && acked >= node.alone_until;
        } else {
            node.synced = false;
            node.wants_alone = false;
        }
        node.stats_epoch = node.stats_epoch.max(node.epoch);
        self.release(n);
    }

    /// A new primary holds every message STORED before in its pair (or a
    /// failover would lose it if the old primary's disk never came back).
    fn check_promoted(&mut self, n: usize, epoch: u64) {
        let node = &self.nodes[n];
        let missing = self
            .stored
            .iter()
            .find(|s| self.nodes[s.node].pair == node.pair && !node.dedup.contains_key(&s.msg_id));
        if let Some(s) = missing {
            self.violations.push(format!(
                "{} promoted with epoch {epoch} without msg {:#x}, STORED by {} in epoch {} at {}",
                node.name, s.msg_id, self.nodes[s.node].name, s.epoch, s.at
            ));
        }
    }

    fn update_mode(node: &mut Node, local: u64) {
        let healthy = node
            .link
            .as_ref()
            .is_some_and(|l| local < l.heard_at + LOSS_TIMEOUT_US);
        let lag = node
            .link
            .as_ref()
            .map(|l| node.last().saturating_sub(l.acked));
        let mut next = match node.mode {
            Mode::Replica if !healthy => {
                if node.may_serve_alone {
                    Mode::Degraded
                } else {
                    Mode::Blocked
                }
            }
            Mode::Degraded | Mode::Blocked if healthy && lag.is_some_and(|l| l <= 10_000) => {
                Mode::Replica
            }
            same => same,
        };
        let wants_alone = next == Mode::Degraded && node.mode != Mode::Degraded;
        let held = wants_alone && !node.alone_allowed;
        node.wants_alone = held;
        if held {
            next = node.mode;
        }
        if next != node.mode {
            if next == Mode::Replica && node.mode != Mode::Blocked {
                node.alone_until = node.last();
            }
            node.mode = next;
            // set_mode(Blocked) answers the waiting SENDs (timed out).
        }
    }

    fn fsync(&mut self, n: usize, local: u64) {
        let node = &mut self.nodes[n];
        match node.fsync {
            Some((done, upto)) if local >= done => {
                node.fsync = None;
                node.disk.durable = node.disk.durable.max(upto.min(node.disk.log.len()));
                self.release(n);
            }
            None if node.disk.log.len() > node.disk.durable => {
                let done = local + 500 + self.rng.below(4_000);
                node.fsync = Some((done, node.disk.log.len()));
            }
            _ => {}
        }
    }

    fn node_step(&mut self, n: usize) {
        let node = &self.nodes[n];
        if !node.up || node.paused_until > self.now {
            return;
        }
        let local = node.local(self.now);
        // Control thread and cores run independently: either may go first.
        let pilot_first = self.rng.chance(50);
        if pilot_first {
            self.pilot_step(n, local);
        }
        if local >= self.nodes[n].next_tick {
            self.nodes[n].next_tick = local + TICK_US;
            self.tick(n, local);
        }
        if !pilot_first {
            self.pilot_step(n, local);
        }
        self.fsync(n, local);
        self.repl_io(n, local);
    }

    // ------------------------------------------------------------ clients

    fn on_client_packet(&mut self, c: usize, p: Packet) {
        let Body::Answer { msg_id, answer } = p.body else {
            return;
        };
        let cl = &mut self.clients[c];
        let Some(cur) = cl.current.filter(|e| e.msg_id == msg_id) else {
            return;
        };
        match answer {
            Answer::Stored => {
                cl.current = None;
                cl.stored += 1;
                cl.waiting_until = None;
                cl.next_try = self.now + self.rng.below(20_000);
                cl.acked = cur.seq;
                if let Ep::Node(n) = p.from {
                    cl.ack_to = Some(n);
                }
            }
            Answer::NotPrimary | Answer::Rejected => {
                cl.waiting_until = None;
                cl.target ^= 1;
                cl.next_try = self.now + 20_000 + self.rng.below(30_000);
            }
        }
    }

    /// The client as a receiver: a cumulative ACK of its last STORED seq,
    /// sent now and then to the node it takes for the primary, which may be
    /// stale (an edge routes ACKs to a node until it hears of another).
    fn client_ack(&mut self, c: usize) {
        let cl = &self.clients[c];
        let Some(node) = cl.ack_to.filter(|_| self.now >= cl.next_ack) else {
            return;
        };
        let (user, seq) = (cl.sender, cl.acked);
        let jitter = self.rng.below(ACK_EVERY_US);
        self.clients[c].next_ack = self.now + ACK_EVERY_US / 2 + jitter;
        let body = Body::ClientAck { user, seq };
        self.send(Ep::Client(c), Ep::Node(node), body);
    }

    fn client_step(&mut self, c: usize, new_messages: bool) {
        self.client_ack(c);
        let now = self.now;
        let cl = &mut self.clients[c];
        if let Some(until) = cl.waiting_until {
            if now < until {
                return;
            }
            cl.waiting_until = None;
            cl.target ^= 1;
        }
        if now < cl.next_try {
            return;
        }
        if cl.current.is_none() {
            if !new_messages || cl.next_seq > SENDER_MSGS_MAX {
                return;
            }
            cl.current = Some(Entry {
                epoch: 0,
                kind: Kind::Msg,
                msg_id: ((cl.sender as u64) << 32) | cl.next_seq as u64,
                sender: cl.sender,
                seq: cl.next_seq,
            });
            cl.next_seq += 1;
        }
        let entry = cl.current.expect("set");
        let node = cl.pair * 2 + (cl.target & 1);
        cl.waiting_until = Some(now + CLIENT_TIMEOUT_US);
        self.send(
            Ep::Client(c),
            Ep::Node(node),
            Body::Send { client: c, entry },
        );
    }

    // ------------------------------------------------------------- faults

    fn inject(&mut self) {
        let now = self.now;
        self.faults.retain(|(until, _)| *until > now);
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up && self.nodes[i].down_until <= now {
                self.start_node(i);
            }
        }
        if !self.rng.chance(1) || self.faults.len() >= FAULTS_MAX {
            return;
        }
        let n = self.rng.below(self.nodes.len() as u64) as usize;
        let ms = |rng: &mut SimRng, lo: u64, hi: u64| (lo + rng.below(hi - lo)) * 1000;
        match self.rng.below(8) {
            0 | 1 if self.nodes[n].up => {
                let cut = self.rng.chance(50);
                self.nodes[n].up = false;
                self.nodes[n].down_until = now + ms(&mut self.rng, 50, 2500);
                let d = &mut self.nodes[n].disk;
                if cut {
                    let unsynced = d.log.len() - d.durable;
                    let kept = self.rng.below(unsynced as u64 + 1) as usize;
                    d.log.truncate(d.durable + kept);
                }
                self.log(|| format!("{} killed (power cut: {cut})", self.nodes[n].name));
            }
            2 if self.nodes[n].up => {
                self.nodes[n].paused_until = now + ms(&mut self.rng, 100, 2000);
                self.log(|| format!("{} paused", self.nodes[n].name));
            }
            3..=5 => {
                let peer = self.nodes[n].peer;
                let (a, b) = match self.rng.below(3) {
                    0 => (Ep::Node(n), Ep::Node(peer)),
                    1 => (Ep::Node(n), Ep::Etcd),
                    _ => (Ep::Etcd, Ep::Node(n)),
                };
                let until = now + ms(&mut self.rng, 100, 2500);
                self.faults.push((until, Fault::Cut(a, b)));
                if self.rng.chance(50) {
                    self.faults.push((until, Fault::Cut(b, a)));
                }
                self.log(|| format!("cut {a:?} -> {b:?}"));
            }
            6 => {
                let until = now + ms(&mut self.rng, 100, 1500);
                let p = 5 + self.rng.below(30);
                self.faults.push((until, Fault::Loss(p)));
            }
            _ => {
                let until = now + ms(&mut self.rng, 100, 1500);
                let d = ms(&mut self.rng, 10, 400);
                self.faults.push((until, Fault::Slow(d)));
            }
        }
    }

    fn heal(&mut self) {
        self.faults.clear();
        for i in 0..self.nodes.len() {
            self.nodes[i].paused_until = 0;
            if !self.nodes[i].up {
                self.start_node(i);
            }
        }
    }

    /// Runs the whole simulation; Err describes what the checker found.
    pub fn run(&mut self) -> Result<(), String> {
        for step in 0..FAULT_STEPS + SETTLE_STEPS {
            self.now = step * STEP_US;
            let faulty = step < FAULT_STEPS;
            if faulty {
                self.inject();
            } else if step == FAULT_STEPS {
                self.heal();
            }
            self.deliver_due();
            for n in 0..self.nodes.len() {
                self.node_step(n);
            }
            for c in 0..self.clients.len() {
                self.client_step(c, faulty);
            }
            if let Some(v) = self.violations.first() {
                return Err(v.clone());
            }
        }
        self.check_end()
    }

    fn check_end(&mut self) -> Result<(), String> {
        let nr_pairs = self.nodes.len() / 2;
        for pair in 0..nr_pairs {
            let prim: Vec<usize> = (pair * 2..pair * 2 + 2)
                .filter(|&n| {
                    let node = &self.nodes[n];
                    node.role == Role::Primary && node.lease_valid(node.local(self.now))
                })
                .collect();
            let [p] = prim[..] else {
                return Err(format!(
                    "pair {pair}: {} acting primaries after settling",
                    prim.len()
                ));
            };
            let log = &self.nodes[p].disk.log;
            let mut at: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (i, e) in log.iter().enumerate() {
                if e.kind == Kind::Msg {
                    at.entry(e.msg_id).or_default().push(i);
                }
            }
            if let Some((id, _)) = at.iter().find(|(_, v)| v.len() > 1) {
                return Err(format!("pair {pair}: msg {id:#x} twice in the final log"));
            }
            for s in &self.stored {
                if self.nodes[s.node].pair != pair {
                    continue;
                }
                if !at.contains_key(&s.msg_id) {
                    return Err(format!(
                        "pair {pair}: msg {:#x} was STORED by {} in epoch {} at {} and is not in the final primary {}'s log",
                        s.msg_id, self.nodes[s.node].name, s.epoch, s.at, self.nodes[p].name
                    ));
                }
            }
            // Per sender, STORED messages in the order they were sent.
            let mut last_seq: BTreeMap<u32, u32> = BTreeMap::new();
            for e in log.iter().filter(|e| e.kind == Kind::Msg) {
                let stored = self.stored.iter().any(|s| s.msg_id == e.msg_id);
                if !stored {
                    continue;
                }
                let prev = last_seq.insert(e.sender, e.seq).unwrap_or(0);
                if e.seq <= prev {
                    return Err(format!(
                        "pair {pair}: sender {} seq {} after seq {prev} in the final log",
                        e.sender, e.seq
                    ));
                }
            }
            let r = &self.nodes[p ^ 1];
            if r.disk.log[..] != log[..] {
                let first = r
                    .disk
                    .log
                    .iter()
                    .zip(log)
                    .position(|(a, b)| a != b)
                    .unwrap_or(r.disk.log.len().min(log.len()));
                return Err(format!(
                    "pair {pair}: the replica {}'s log ({} entries) differs from the primary's ({}) from position {}",
                    r.name,
                    r.disk.log.len(),
                    log.len(),
                    first + 1
                ));
            }
        }
        for c in &self.clients {
            if let Some(e) = c.current {
                return Err(format!(
                    "sender {}'s msg {:#x} (seq {}) never got STORED",
                    c.sender, e.msg_id, e.seq
                ));
            }
        }
        Ok(())
    }

    pub fn summary(&self) -> String {
        let stored: u64 = self.clients.iter().map(|c| c.stored).sum();
        format!(
            "seed {}: {} nodes, {} STORED, etcd revision {}",
            self.seed,
            self.nodes.len(),
            stored,
            self.etcd.revision
        )
    }
}

/// Runs seeds `from..from + count`; the first failure, if any.
pub fn run_seeds(from: u64, count: u64, plants: Plants) -> Result<u64, (u64, String)> {
    let mut stored = 0;
    for seed in from..from + count {
        let mut w = World::new(seed, plants);
        w.run().map_err(|e| (seed, e))?;
        stored += w.clients.iter().map(|c| c.stored).sum::<u64>();
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    #[test]
    fn seeds_pass_the_checker() {
        if let Some(seed) = env("IRIS_SIM_SEED") {
            let mut w = World::new(seed, Plants::default());
            let result = w.run();
            eprintln!("{}", w.summary());
            if let Err(e) = result {
                panic!("seed {seed}: {e}");
            }
            return;
        }
        let count = env("IRIS_SIM_SEEDS").unwrap_or(SEEDS);
        let started = std::time::Instant::now();
        match run_seeds(0, count, Plants::default()) {
            Ok(stored) => eprintln!(
                "{count} seeds passed, {stored} messages STORED, in {:.1} s",
                started.elapsed().as_secs_f64()
            ),
            Err((seed, e)) => panic!(
                "seed {seed} failed: {e}\nreplay: IRIS_SIM_SEED={seed} cargo test --release -p engine --lib sim::tests::seeds -- --nocapture"
            ),
        }
    }

    #[test]
    fn a_replay_is_deterministic() {
        let mut a = World::new(7, Plants::default());
        let mut b = World::new(7, Plants::default());
        let (ra, rb) = (a.run(), b.run());
        assert_eq!(ra, rb);
        assert_eq!(a.summary(), b.summary());
        assert_eq!(a.nodes[0].disk.log, b.nodes[0].disk.log);
    }

    /// The first seed on which the checker finds something, and what.
    fn caught(plants: Plants) -> (u64, String) {
        let (seed, e) = run_seeds(0, SEEDS, plants).expect_err("the planted bug went unnoticed");
        eprintln!("{plants:?}: seed {seed}: {e}");
        (seed, e)
    }

    #[test]
    fn acknowledging_without_the_replica_is_caught() {
        caught(Plants {
            ack_without_replica: true,
            ..Plants::default()
        });
    }

    /// repl.rs's rule: a replica that fences itself on a HELLO of a higher
    /// epoch stops following and is never promoted again.
    #[test]
    fn a_replica_fenced_by_a_hello_is_caught() {
        caught(Plants {
            fence_replica_on_hello: true,
            ..Plants::default()
        });
    }

    /// repl.rs's rule: the common prefix taken as "our records of epochs at
    /// most the replica's last" keeps diverged records on the replica.
    #[test]
    fn the_common_prefix_by_epoch_bound_is_caught() {
        caught(Plants {
            plan_as_repl: true,
            ..Plants::default()
        });
    }

    /// Shard::ack before 434655c: a node that is not an acting primary logs
    /// an ACK routed to it, where the primary holds another record of the
    /// same epoch, and the two logs no longer match.
    #[test]
    fn an_ack_logged_by_a_node_not_acting_is_caught() {
        caught(Plants {
            ack_logged_by_any_node: true,
            ..Plants::default()
        });
    }
}
