//! Per-shard replication, on the shard's own core: a primary streams every
//! WAL record to its replica as soon as it is appended (in parallel with its
//! own fsync); the replica verifies, appends at the same position, applies,
//! fsyncs in batches and acknowledges its durable position. STORED waits for
//! that ack while the mode is `replica` (see `Shard::commit_position`).
//!
//! Sync on connect: the replica says (epoch, last position, epoch of its last
//! record). Same record at that position here: partial sync from the next one.
//! An old primary's diverged tail: TRUNCATE to the last common position, then
//! partial sync (it re-submits the messages of the dropped tail as a client;
//! msg_id dedup makes that safe). Otherwise: a full sync from a snapshot of the
//! live state, then streaming from the snapshot's position.

use crate::clock::{mono_ms, wall_ms};
use crate::config::{LossPolicy, ReplicationConfig};
use crate::core::Core;
use crate::repl_proto::{self as proto, Hello, Msg};
use crate::shard::Resubmit;
use crate::stats::{Mode, NodeStats, Role};
use crate::sys;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Send-time samples kept for the lag-in-ms figure (oldest dropped beyond it).
const LAG_SAMPLES_MAX: usize = 4096;
/// A replica within this many positions of the primary counts as caught up
/// (the mode returns to `replica`; STORED then waits for its ack).
const CAUGHT_UP_LAG_OPS_MAX: u64 = 10_000;
/// Bytes of a replication peer's frames buffered at most (one frame).
const READ_BUFFER_MAX: usize = proto::FRAME_LEN_MAX as usize + 4;
/// How long a replica's first frame may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame read before a peer's HELLO (a HELLO is under 64 bytes).
const HELLO_BYTES_MAX: usize = 512;
/// The largest frame a primary reads from a replica it streams to: an ack is
/// a few dozen bytes, a RESUBMIT carries one message (a body of up to the
/// largest client frame).
const ACK_BYTES_MAX: usize = (96 << 10) + 4;
/// RESUBMIT bytes a replica writes per turn of its ack writer.
const RESUBMIT_BYTES_PER_WRITE: usize = 256 << 10;
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// A core's replication state, beside its shard.
pub struct ReplState {
    pub config: ReplicationConfig,
    pub stats: Arc<NodeStats>,
    pub nr_shards: u32,
    /// This node's client address (told to replicas, for redirects and re-submission).
    pub client_addr: String,
    /// Primary side: the connected replica stream, if any.
    pub link: Option<Link>,
    link_generation: u64,
    /// Primary side: the stream writer, waiting for new records.
    pub writer_waker: Option<Waker>,
    /// Replica side: the ack writer, waiting for a sync to complete.
    pub acker_waker: Option<Waker>,
    /// Replica side: the primary's last position from its heartbeats.
    pub primary_last_position: u64,
    /// When this shard last heard its peer (engine::clock::mono_ms): the
    /// replica-loss timeout counts from it.
    pub last_heard_ms: u64,
    /// Replica side: a replication session with the primary is open (its
    /// stream has not ended); with `last_heard_ms`, whether the primary is
    /// alive, which a promotion without `force` must not overrule.
    pub following: bool,
    /// Counter values already added to the node stats.
    pub published: Published,
    /// Primary side: this shard's log may lack acknowledged records from this
    /// position on (it was not sealed by a clean stop: a crash, maybe a cut at
    /// recovery). Until a replica has handed back its records from here (FETCH),
    /// or said it has none, or `repair_wait_ms` passed, clients are not served.
    pub repair_from: Option<u64>,
    /// Mutual TLS for the links to other nodes (None: plain TCP).
    pub node_tls: Option<Arc<crate::node_tls::NodeTls>>,
    /// Replication connections held by this node (all cores), for the bound.
    pub links: Arc<std::sync::atomic::AtomicUsize>,
    /// Replica side: messages of a dropped tail, to send to the primary on
    /// the replication link (RESUBMIT).
    pub resubmit: VecDeque<Resubmit>,
    /// Primary side: the last position that may have been acknowledged
    /// without the replica (degraded); synced once the replica acked it.
    pub alone_until: u64,
}

pub struct Link {
    generation: u64,
    pub acked: u64,
    /// (last position sent in a batch, when): for lag in ms.
    sent: VecDeque<(u64, Instant)>,
}

impl ReplState {
    pub fn new(
        config: ReplicationConfig,
        stats: Arc<NodeStats>,
        nr_shards: u32,
        client_addr: String,
    ) -> ReplState {
        ReplState {
            config,
            stats,
            nr_shards,
            client_addr,
            link: None,
            link_generation: 0,
            writer_waker: None,
            acker_waker: None,
            primary_last_position: 0,
            last_heard_ms: 0,
            following: false,
            published: Published::default(),
            repair_from: None,
            node_tls: None,
            links: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            resubmit: VecDeque::new(),
            alone_until: 0,
        }
    }

    pub fn wake_writers(&mut self) {
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
        if let Some(w) = self.acker_waker.take() {
            w.wake();
        }
    }

    fn lag_ms(&self) -> u64 {
        let Some(link) = &self.link else { return 0 };
        link.sent
            .front()
            .map_or(0, |(_, at)| at.elapsed().as_millis() as u64)
    }
}

fn hello_of(c: &Core) -> Hello {
    let wal = c.shard.wal();
    let last = wal.last_position();
    Hello {
        shards: c.repl.nr_shards,
        slots: u32::from(net::SLOT_COUNT),
        shard: c.shard.id as u32,
        epoch: c.shard.epoch(),
        last_position: last,
        last_record_epoch: wal.epoch_at(last).unwrap_or(0),
    }
}

/// Reads one replication frame into `buf` (bounded); returns its length.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pending: &mut usize,
) -> Result<usize, String> {
    read_frame_within(stream, buf, pending, READ_BUFFER_MAX).await
}

/// `read_frame` with a smaller bound: a peer is not buffered more than the
/// state it is in needs (a HELLO, an ack).
async fn read_frame_within(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    pending: &mut usize,
    max: usize,
) -> Result<usize, String> {
    loop {
        if let Some(used) = proto::frame_len(&buf[..*pending]).map_err(|e| e.to_string())? {
            return Ok(used);
        }
        if *pending == buf.len() {
            if buf.len() >= max {
                return Err(format!("replication frame over {max} bytes in this state"));
            }
            buf.resize((buf.len() * 2).min(max), 0);
        }
        let n = stream
            .read(&mut buf[*pending..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("peer closed the connection".into());
        }
        *pending += n;
    }
}

/// Decodes a whole frame that `read_frame` delimited.
fn decode_frame(frame: &[u8]) -> Result<Msg<'_>, String> {
    match proto::decode(frame) {
        Ok(Some((msg, _))) => Ok(msg),
        Ok(None) => unreachable!("read_frame returns whole frames"),
        Err(e) => Err(e.to_string()),
    }
}

fn consume(buf: &mut [u8], pending: &mut usize, used: usize) {
    buf.copy_within(used..*pending, 0);
    *pending -= used;
}

// ---------------------------------------------------------------- primary side

enum Plan {
    Refuse(String),
    /// Take the replica's records from this position back first (repair).
    Fetch(u64),
    Partial {
        from: u64,
        truncate: Option<u64>,
    },
    Full {
        first: u64,
        last: u64,
        records: u64,
        frames: Vec<u8>,
    },
}

fn plan(c: &mut Core, hello: &Hello) -> Plan {
    let nr = c.repl.nr_shards;
    if hello.shards != nr || hello.slots != u32::from(net::SLOT_COUNT) {
        return Plan::Refuse(format!(
            "slot map differs: this primary has {nr} shards and {} slots, the replica {} shards and {} slots",
            net::SLOT_COUNT,
            hello.shards,
            hello.slots
        ));
    }
    if hello.shard != c.shard.id as u32 {
        return Plan::Refuse(format!(
            "no shard {} here: this node's shards are 0..{nr} and this stream reached shard {}",
            hello.shard, c.shard.id
        ));
    }
    if hello.last_record_epoch > hello.epoch {
        return Plan::Refuse(format!(
            "inconsistent HELLO: last record epoch {} is above the peer's epoch {}",
            hello.last_record_epoch, hello.epoch
        ));
    }
    if hello.epoch > c.shard.epoch() {
        // Only a primary is fenced by it; a replica (say, a node that just
        // stepped down) just refuses the stale stream.
        if c.shard.role == Role::Primary {
            c.shard.fence(hello.epoch, &mut c.edge);
            c.repl.stats.set_role(Role::Fenced);
        }
        return Plan::Refuse(format!(
            "this node's epoch {} is older than the peer's {}",
            c.shard.epoch(),
            hello.epoch
        ));
    }
    if c.shard.role != Role::Primary {
        return Plan::Refuse(format!("not a primary (role {})", c.shard.role.name()));
    }
    if let Some(from) = c.repl.repair_from {
        if hello.last_position >= from {
            return Plan::Fetch(from);
        }
        // Every record this primary acknowledged, the replica acknowledged
        // first (durability = replica): none lies past its log, so none is lost.
        tracing::info!(
            shard = c.shard.id,
            replica_last = hello.last_position,
            "the replica holds nothing past this log: no acknowledged record was lost"
        );
        c.repl.repair_from = None;
    }
    let wal = c.shard.wal();
    let (first, last, l, e) = (
        wal.first_position(),
        wal.last_position(),
        hello.last_position,
        hello.last_record_epoch,
    );
    if l == 0 && first == 1 {
        return Plan::Partial {
            from: 1,
            truncate: None,
        };
    }
    if l >= first && l <= last && wal.epoch_at(l) == Some(e) {
        return Plan::Partial {
            from: l + 1,
            truncate: None,
        };
    }
    if l >= first && e > 0 {
        // A diverged log (an old primary's): the two logs are the same up to
        // the last record of the replica's last epoch that this log holds
        // (log matching: one primary wrote each epoch, positions are dense,
        // and the stream copies records at their positions). Epochs only
        // grow along a log, so that record is found by bisection. Without
        // one, the replica's records of that epoch may sit at positions
        // where this log holds records of older epochs (it was promoted
        // while lagging): no common prefix can be proven, so a full sync.
        let (mut lo, mut hi) = (first, l.min(last));
        if hi >= lo && wal.epoch_at(lo).is_some_and(|x| x <= e) {
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                match wal.epoch_at(mid) {
                    Some(x) if x <= e => lo = mid,
                    _ => hi = mid - 1,
                }
            }
            if wal.epoch_at(lo) == Some(e) {
                return Plan::Partial {
                    from: lo + 1,
                    truncate: Some(lo),
                };
            }
        }
    }
    match c.shard.snapshot_frames() {
        Some((first, last, records, frames)) => Plan::Full {
            first,
            last,
            records,
            frames,
        },
        None => Plan::Partial {
            from: 1,
            truncate: Some(0),
        },
    }
}

/// Serves one replica's stream for this core's shard until it breaks.
pub async fn serve_replica(core: Rc<RefCell<Core>>, stream: TcpStream, hello: Hello) {
    let shard = core.borrow().shard.id;
    match serve_replica_inner(&core, stream, &hello).await {
        Ok(()) => {}
        Err(e) => tracing::warn!(shard, error = %e, "replica stream ended"),
    }
}

async fn serve_replica_inner(
    core: &Rc<RefCell<Core>>,
    stream: TcpStream,
    hello: &Hello,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = sys::split(stream).map_err(|e| e.to_string())?;
    let (plan, epoch, client_addr) = {
        let mut c = core.borrow_mut();
        let plan = plan(&mut c, hello);
        (plan, c.shard.epoch(), c.repl.client_addr.clone())
    };
    let mut out = Vec::new();
    let from = match plan {
        Plan::Fetch(from) => return fetch_from_replica(core, &mut reader, &mut writer, from).await,
        Plan::Refuse(reason) => {
            tracing::error!(shard = hello.shard, %reason, "replica refused");
            proto::encode(&Msg::Refuse { reason: &reason }, &mut out);
            let _ = writer.write_all(&out).await;
            return Err(reason);
        }
        Plan::Partial { from, truncate } => {
            proto::encode(
                &Msg::Welcome {
                    epoch,
                    full: false,
                    start_position: from,
                    client_addr: &client_addr,
                },
                &mut out,
            );
            if let Some(keep_through) = truncate {
                proto::encode(&Msg::Truncate { keep_through }, &mut out);
            }
            tracing::info!(shard = hello.shard, from, truncate = ?truncate, "replica: partial sync");
            from
        }
        Plan::Full {
            first,
            last,
            records,
            frames,
        } => {
            proto::encode(
                &Msg::Welcome {
                    epoch,
                    full: true,
                    start_position: last + 1,
                    client_addr: &client_addr,
                },
                &mut out,
            );
            write_snapshot(&mut writer, &mut out, first, last, records, &frames).await?;
            tracing::info!(
                shard = hello.shard,
                first,
                last,
                records,
                bytes = frames.len(),
                "replica: full sync sent"
            );
            last + 1
        }
    };
    writer.write_all(&out).await.map_err(|e| e.to_string())?;
    let generation = {
        let mut c = core.borrow_mut();
        c.repl.link_generation += 1;
        let generation = c.repl.link_generation;
        c.repl.link = Some(Link {
            generation,
            acked: 0, // nothing counts as acknowledged before the replica's first ACK
            sent: VecDeque::new(),
        });
        c.repl.last_heard_ms = mono_ms();
        generation
    };
    let result = futures_lite::future::or(
        stream_records(core, &mut writer, from, generation),
        read_acks(core, &mut reader, generation),
    )
    .await;
    let mut c = core.borrow_mut();
    if c.repl
        .link
        .as_ref()
        .is_some_and(|l| l.generation == generation)
    {
        c.repl.link = None;
    }
    result
}

/// Repair: asks the replica for its records from `from` (FETCH), verifies
/// and appends them as a replica would apply them, makes them durable, and
/// ends the session (the replica reconnects and streams as usual).
async fn fetch_from_replica(
    core: &Rc<RefCell<Core>>,
    reader: &mut TcpStream,
    writer: &mut TcpStream,
    from: u64,
) -> Result<(), String> {
    let shard = core.borrow().shard.id;
    let timeout = Duration::from_millis(core.borrow().repl.config.loss_timeout_ms);
    let _ = reader.set_read_timeout(Some(timeout));
    let mut out = Vec::new();
    proto::encode(
        &Msg::Fetch {
            from_position: from,
        },
        &mut out,
    );
    writer.write_all(&out).await.map_err(|e| e.to_string())?;
    let (mut buf, mut pending) = (vec![0u8; 64 << 10], 0);
    let last = loop {
        let used = read_frame(reader, &mut buf, &mut pending).await?;
        let mut c = core.borrow_mut();
        match decode_frame(&buf[..used])? {
            Msg::Records { frames } => {
                // Handed back to this primary: from its own epochs only.
                let epoch = c.shard.epoch();
                apply_frames(&mut c, frames, Some(epoch))?;
                c.kick_committer();
            }
            Msg::FetchEnd { last_position } => break last_position,
            other => return Err(format!("unexpected frame while fetching: {other:?}")),
        }
        drop(c);
        consume(&mut buf, &mut pending, used);
    };
    let got = core.borrow().shard.wal().last_position();
    if got != last {
        return Err(format!(
            "the replica said its log ends at {last} but sent records up to {got}"
        ));
    }
    let deadline = Instant::now() + timeout;
    while core.borrow().shard.needs_sync() {
        if Instant::now() >= deadline {
            return Err("the fetched records did not become durable in time".into());
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let mut c = core.borrow_mut();
    c.repl.repair_from = None;
    let fetched = (last + 1).saturating_sub(from);
    c.repl.stats.shards[shard]
        .recovery_refetched_records
        .store(fetched, Relaxed);
    tracing::warn!(
        shard,
        fetched,
        from,
        through = last,
        "took back from the replica the records this log lacked after a crash"
    );
    Ok(())
}

async fn write_snapshot(
    writer: &mut TcpStream,
    out: &mut Vec<u8>,
    first: u64,
    last: u64,
    records: u64,
    frames: &[u8],
) -> Result<(), String> {
    proto::encode(
        &Msg::SnapBegin {
            first_position: first,
            last_position: last,
            records,
            bytes: frames.len() as u64,
        },
        out,
    );
    let mut total = crc32fast::Hasher::new();
    let mut rest = frames;
    while !rest.is_empty() {
        // Cut on frame boundaries so every chunk holds whole records.
        let mut cut = 0;
        while cut < rest.len() && cut < proto::BATCH_BYTES_MAX {
            let len = u32::from_le_bytes(rest[cut..cut + 4].try_into().expect("4")) as usize;
            cut += wal::format::frame_len(len);
        }
        let (chunk, tail) = rest.split_at(cut);
        total.update(chunk);
        proto::encode(
            &Msg::SnapChunk {
                crc: crc32fast::hash(chunk),
                data: chunk,
            },
            out,
        );
        writer.write_all(out).await.map_err(|e| e.to_string())?;
        out.clear();
        rest = tail;
    }
    proto::encode(
        &Msg::SnapEnd {
            crc: total.finalize(),
        },
        out,
    );
    Ok(())
}

/// Sends records as they are appended, and a heartbeat every heartbeat_ms.
async fn stream_records(
    core: &Rc<RefCell<Core>>,
    writer: &mut TcpStream,
    from: u64,
    generation: u64,
) -> Result<(), String> {
    let mut cursor = core
        .borrow()
        .shard
        .wal()
        .cursor_at(from)
        .map_err(|e| e.to_string())?;
    let heartbeat = Duration::from_millis(core.borrow().repl.config.heartbeat_ms);
    let mut next_heartbeat = Instant::now();
    let (mut frames, mut out) = (Vec::new(), Vec::new());
    loop {
        let wait = std::future::poll_fn(|cx| {
            let mut c = core.borrow_mut();
            if c.repl
                .link
                .as_ref()
                .is_none_or(|l| l.generation != generation)
            {
                return Poll::Ready(false);
            }
            if cursor.next_position() <= c.shard.wal().last_position() {
                return Poll::Ready(true);
            }
            c.repl.writer_waker = Some(cx.waker().clone());
            Poll::Pending
        });
        let timer = async {
            glommio::timer::sleep(next_heartbeat.saturating_duration_since(Instant::now())).await;
            true
        };
        if !futures_lite::future::or(wait, timer).await {
            return Err("superseded by a newer stream".into());
        }
        {
            let mut c = core.borrow_mut();
            let c = &mut *c;
            frames.clear();
            c.shard
                .wal()
                .read_frames(&mut cursor, proto::BATCH_BYTES_MAX, &mut frames)
                .map_err(|e| e.to_string())?;
            if !frames.is_empty() {
                proto::encode(&Msg::Records { frames: &frames }, &mut out);
                let last = cursor.next_position() - 1;
                if let Some(link) = c.repl.link.as_mut() {
                    if link.sent.len() >= LAG_SAMPLES_MAX {
                        link.sent.pop_front();
                    }
                    link.sent.push_back((last, Instant::now()));
                }
            }
            if Instant::now() >= next_heartbeat {
                let msg = Msg::Heartbeat {
                    epoch: c.shard.epoch(),
                    last_position: c.shard.wal().last_position(),
                    now_ms: wall_ms(), // informational
                };
                proto::encode(&msg, &mut out);
                next_heartbeat = Instant::now() + heartbeat;
            }
            c.repl
                .stats
                .replication_bytes_sent
                .fetch_add(out.len() as u64, Relaxed);
        }
        if !out.is_empty() {
            writer.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
    }
}

/// Reads the replica's acks: each may release STORED answers.
async fn read_acks(
    core: &Rc<RefCell<Core>>,
    reader: &mut TcpStream,
    generation: u64,
) -> Result<(), String> {
    let timeout = Duration::from_millis(core.borrow().repl.config.loss_timeout_ms);
    let _ = reader.set_read_timeout(Some(timeout));
    let (mut buf, mut pending) = (vec![0u8; ACK_BYTES_MAX], 0);
    loop {
        let used = read_frame_within(reader, &mut buf, &mut pending, ACK_BYTES_MAX).await?;
        let msg = decode_frame(&buf[..used])?;
        on_replica_msg(&mut core.borrow_mut(), msg, generation)?;
        consume(&mut buf, &mut pending, used);
    }
}

fn on_replica_msg(c: &mut Core, msg: Msg<'_>, generation: u64) -> Result<(), String> {
    if c.repl
        .link
        .as_ref()
        .is_none_or(|l| l.generation != generation)
    {
        return Err("superseded by a newer stream".into());
    }
    match msg {
        Msg::Ack {
            epoch,
            durable_position,
            ..
        } => {
            if epoch > c.shard.epoch() {
                c.shard.fence(epoch, &mut c.edge);
                c.repl.stats.set_role(Role::Fenced);
                return Err("the replica has a higher epoch: fenced".into());
            }
            c.repl.last_heard_ms = mono_ms();
            if let Some(link) = c.repl.link.as_mut() {
                link.acked = link.acked.max(durable_position);
                while link
                    .sent
                    .front()
                    .is_some_and(|(p, _)| *p <= durable_position)
                {
                    link.sent.pop_front();
                }
            }
            c.shard.on_replica_ack(durable_position, &mut c.edge);
            Ok(())
        }
        Msg::Refuse { reason } => Err(format!("replica refused: {reason}")),
        Msg::Resubmit {
            msg_id,
            sender,
            recipient,
            body,
        } => {
            // A message the replica dropped from its own tail when it rejoined:
            // stored like a SEND of `sender`, answered to nobody.
            let nobody = crate::shard::ConnRef {
                core: c.edge.id,
                link: 0,
                slot: u32::MAX,
                generation: 0,
            };
            if net::valid_user_id(sender, &c.edge.net_limits)
                && net::valid_user_id(recipient, &c.edge.net_limits)
            {
                c.route_send(nobody, sender, msg_id, recipient, body);
                c.kick_committer();
            }
            Ok(())
        }
        other => Err(format!("unexpected frame from a replica: {other:?}")),
    }
}

/// Accepts a replication connection on any core, reads its HELLO, and serves
/// it here or hands the socket to the core that owns the shard.
/// `_count` holds the connection against `REPLICATION_CONNECTIONS_MAX` while
/// it is handled here (None: counted elsewhere, by its TLS pump).
pub async fn accept_replica(
    core: Rc<RefCell<Core>>,
    mut stream: TcpStream,
    _count: Option<crate::node_tls::LinkCount>,
) {
    let (mut buf, mut pending) = (vec![0u8; HELLO_BYTES_MAX], 0);
    let read = futures_lite::future::or(
        async {
            Some(read_frame_within(&mut stream, &mut buf, &mut pending, HELLO_BYTES_MAX).await)
        },
        async {
            glommio::timer::sleep(HANDSHAKE_TIMEOUT).await;
            None
        },
    )
    .await;
    let hello = match read {
        Some(Ok(used)) => match decode_frame(&buf[..used]) {
            Ok(Msg::Hello(h)) => h,
            other => {
                tracing::warn!(
                    ?other,
                    "replication connection without a valid HELLO: closed"
                );
                return;
            }
        },
        Some(Err(e)) => {
            tracing::warn!(error = %e, "bad replication handshake: closed");
            return;
        }
        None => return,
    };
    let (my_shard, nr) = {
        let c = core.borrow();
        (c.shard.id as u32, c.repl.nr_shards)
    };
    if hello.shard == my_shard || hello.shards != nr || hello.shard >= nr {
        serve_replica(core, stream, hello).await;
        return;
    }
    match sys::dup(stream.as_raw_fd()) {
        Ok(fd) => core.borrow_mut().edge.post(
            hello.shard as u16,
            crate::core::Mail::AdoptReplica { fd, hello },
        ),
        Err(e) => tracing::warn!(error = %e, "cannot hand a replica stream to its core"),
    }
}

/// Adopts a replica stream accepted by another core.
pub fn adopt(core: &Rc<RefCell<Core>>, fd: std::os::fd::RawFd, hello: Hello) {
    // The accepting core dup()ed `fd` for us and no longer touches it.
    let stream = sys::tcp_stream(fd);
    glommio::spawn_local(serve_replica(core.clone(), stream, hello)).detach();
}

// ---------------------------------------------------------------- replica side

/// Follows the primary at `primary` for this core's shard, reconnecting with
/// capped exponential backoff, until this node is promoted.
pub async fn follow(core: Rc<RefCell<Core>>, primary: String) {
    let backoff_max = Duration::from_millis(core.borrow().repl.config.reconnect_backoff_max_ms);
    let mut backoff = BACKOFF_MIN;
    let shard = core.borrow().shard.id;
    loop {
        if core.borrow().shard.role != Role::Replica {
            return;
        }
        let node_tls = core.borrow().repl.node_tls.clone();
        let connected = match &node_tls {
            // The handshake runs on a pump thread; a failure reads as EOF.
            Some(tls) => crate::node_tls::dial(&primary, tls).map(sys::tcp_stream),
            None => TcpStream::connect_timeout(primary.as_str(), HANDSHAKE_TIMEOUT)
                .await
                .map_err(std::io::Error::from),
        };
        if core.borrow().shard.role != Role::Replica {
            return; // promoted while connecting: a stale stream would fence the peer
        }
        match connected {
            Ok(stream) => {
                let started = Instant::now();
                core.borrow_mut().repl.following = true;
                let session = follow_session(&core, stream).await;
                {
                    // Published at once: a promotion waits on it (admin).
                    let mut c = core.borrow_mut();
                    c.repl.following = false;
                    if let Some(s) = c.repl.stats.shards.get(shard) {
                        s.replica_connected.store(false, Relaxed);
                    }
                }
                match session {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "replication from the primary stopped; reconnecting")
                    }
                }
                if started.elapsed() > backoff_max {
                    backoff = BACKOFF_MIN;
                }
            }
            Err(e) => tracing::debug!(shard, error = %e, "cannot reach the primary"),
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// Full-sync progress on the replica.
struct Snapshot {
    records_expected: u64,
    records: u64,
    crc: crc32fast::Hasher,
}

async fn follow_session(core: &Rc<RefCell<Core>>, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (loss, heartbeat) = {
        let c = core.borrow();
        (
            Duration::from_millis(c.repl.config.loss_timeout_ms),
            Duration::from_millis(c.repl.config.heartbeat_ms),
        )
    };
    let _ = stream.set_read_timeout(Some(loss));
    let (mut reader, mut writer) = sys::split(stream).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    proto::encode(&Msg::Hello(hello_of(&core.borrow())), &mut out);
    writer.write_all(&out).await.map_err(|e| e.to_string())?;
    let (mut buf, mut pending) = (vec![0u8; 64 << 10], 0);
    let used = read_frame(&mut reader, &mut buf, &mut pending).await?;
    if let Msg::Fetch { from_position } = decode_frame(&buf[..used])? {
        return send_fetched(core, &mut writer, from_position).await;
    }
    futures_lite::future::or(
        apply_stream(core, &mut reader, buf, pending),
        send_acks(core, &mut writer, heartbeat),
    )
    .await
}

/// Replica side of a repair: sends the primary this log's records from
/// `from` on, exactly as on disk, then FETCH_END. The session then ends.
async fn send_fetched(
    core: &Rc<RefCell<Core>>,
    writer: &mut TcpStream,
    from: u64,
) -> Result<(), String> {
    let mut cursor = core
        .borrow()
        .shard
        .wal()
        .cursor_at(from)
        .map_err(|e| format!("the primary asked for records from {from}: {e}"))?;
    let (mut frames, mut out) = (Vec::new(), Vec::new());
    loop {
        frames.clear();
        out.clear();
        let copied = core
            .borrow()
            .shard
            .wal()
            .read_frames(&mut cursor, proto::BATCH_BYTES_MAX, &mut frames)
            .map_err(|e| e.to_string())?;
        if copied == 0 {
            break;
        }
        proto::encode(&Msg::Records { frames: &frames }, &mut out);
        writer.write_all(&out).await.map_err(|e| e.to_string())?;
    }
    let last_position = cursor.next_position() - 1;
    proto::encode(&Msg::FetchEnd { last_position }, &mut out);
    writer.write_all(&out).await.map_err(|e| e.to_string())?;
    tracing::warn!(
        shard = core.borrow().shard.id,
        from,
        through = last_position,
        "handed the primary back the records its log lacked after a crash"
    );
    Ok(())
}

async fn apply_stream(
    core: &Rc<RefCell<Core>>,
    reader: &mut TcpStream,
    mut buf: Vec<u8>,
    mut pending: usize,
) -> Result<(), String> {
    let mut snapshot: Option<Snapshot> = None;
    loop {
        let used = read_frame(reader, &mut buf, &mut pending).await?;
        let msg = decode_frame(&buf[..used])?;
        let mut c = core.borrow_mut();
        if c.shard.role != Role::Replica {
            return Ok(()); // promoted: stop following
        }
        c.repl.last_heard_ms = mono_ms();
        c.repl
            .stats
            .replication_bytes_received
            .fetch_add(used as u64, Relaxed);
        apply_msg(&mut c, msg, &mut snapshot)?;
        c.kick_committer();
        drop(c);
        consume(&mut buf, &mut pending, used);
    }
}

fn apply_msg(c: &mut Core, msg: Msg<'_>, snapshot: &mut Option<Snapshot>) -> Result<(), String> {
    let shard = c.shard.id;
    match msg {
        Msg::Welcome {
            epoch,
            full,
            start_position,
            client_addr,
        } => {
            tracing::info!(
                shard,
                epoch,
                full,
                start_position,
                primary = client_addr,
                "following the primary"
            );
            c.shard.set_epoch(epoch);
            c.shard
                .become_replica(format!("read-only replica; the primary is {client_addr}"));
            *c.repl
                .stats
                .primary_client_addr
                .lock()
                .expect("not poisoned") = Some(client_addr.to_string());
            c.repl.stats.epoch.fetch_max(epoch, SeqCst);
        }
        Msg::Refuse { reason } => return Err(format!("the primary refused: {reason}")),
        Msg::Truncate { keep_through } => {
            let tail = c
                .shard
                .truncate_and_rebuild(keep_through)
                .map_err(|e| e.to_string())?;
            tracing::warn!(
                shard,
                keep_through,
                resubmit = tail.len(),
                "dropped a diverged tail; re-submitting its messages"
            );
            c.repl
                .stats
                .resubmitted_total
                .fetch_add(tail.len() as u64, Relaxed);
            // Sent on this (authenticated) link by send_acks, not as a client.
            c.repl.resubmit.extend(tail);
            if let Some(w) = c.repl.acker_waker.take() {
                w.wake();
            }
        }
        Msg::SnapBegin {
            first_position,
            last_position,
            records,
            bytes,
        } => {
            tracing::info!(
                shard,
                first_position,
                last_position,
                records,
                bytes,
                "full sync: receiving a snapshot"
            );
            c.shard
                .reset_for_snapshot(first_position)
                .map_err(|e| e.to_string())?;
            *snapshot = Some(Snapshot {
                records_expected: records,
                records: 0,
                crc: crc32fast::Hasher::new(),
            });
        }
        Msg::SnapChunk { crc, data } => {
            let snap = snapshot
                .as_mut()
                .ok_or("snapshot chunk outside a snapshot")?;
            if crc32fast::hash(data) != crc {
                return Err("snapshot chunk checksum mismatch".into());
            }
            snap.crc.update(data);
            snap.records += apply_frames(c, data, None)?;
        }
        Msg::SnapEnd { crc } => {
            let snap = snapshot.take().ok_or("snapshot end outside a snapshot")?;
            if snap.crc.finalize() != crc || snap.records != snap.records_expected {
                return Err("snapshot incomplete or corrupt".into());
            }
            tracing::info!(shard, records = snap.records, "full sync: snapshot applied");
        }
        Msg::Records { frames } => {
            apply_frames(c, frames, None)?;
        }
        Msg::Heartbeat {
            epoch,
            last_position,
            ..
        } => {
            if epoch < c.shard.epoch() {
                return Err(format!("the primary's epoch {epoch} is older than ours"));
            }
            c.shard.set_epoch(epoch);
            c.repl.primary_last_position = last_position;
        }
        other => return Err(format!("unexpected frame from the primary: {other:?}")),
    }
    Ok(())
}

/// Verifies every frame (checksum, dense positions, and with `epoch_max` no
/// epoch above it) before applying any: a bad or truncated batch is refused
/// whole.
fn apply_frames(c: &mut Core, frames: &[u8], epoch_max: Option<u64>) -> Result<u64, String> {
    let limit = c.shard.wal().config().record_payload_len_max;
    let mut expected = c.shard.wal().last_position() + 1;
    let mut records = Vec::new();
    let mut rest = frames;
    while !rest.is_empty() {
        match wal::format::decode_record(rest, limit) {
            wal::format::Decoded::Record(rec, len) if rec.position == expected => {
                if let Some(max) = epoch_max.filter(|&max| rec.epoch > max) {
                    return Err(format!(
                        "record {expected} has epoch {} above this node's {max}: refused",
                        rec.epoch
                    ));
                }
                records.push(rec);
                expected += 1;
                rest = &rest[len..];
            }
            wal::format::Decoded::Record(rec, _) => {
                return Err(format!(
                    "record at position {} where {expected} was due: refused",
                    rec.position
                ))
            }
            other => {
                return Err(format!(
                    "bad record in the stream at position {expected}: {other:?}: refused"
                ))
            }
        }
    }
    for rec in &records {
        c.shard.apply_replicated(rec).map_err(|e| e.to_string())?;
    }
    Ok(records.len() as u64)
}

/// Acknowledges the durable position after each sync, and at least every heartbeat.
async fn send_acks(
    core: &Rc<RefCell<Core>>,
    writer: &mut TcpStream,
    heartbeat: Duration,
) -> Result<(), String> {
    let mut acked = 0;
    let mut out = Vec::new();
    loop {
        let changed = std::future::poll_fn(|cx| {
            let mut c = core.borrow_mut();
            if c.shard.wal().durable_position() != acked || !c.repl.resubmit.is_empty() {
                return Poll::Ready(());
            }
            c.repl.acker_waker = Some(cx.waker().clone());
            Poll::Pending
        });
        futures_lite::future::or(changed, glommio::timer::sleep(heartbeat)).await;
        {
            let mut c = core.borrow_mut();
            if c.shard.role != Role::Replica {
                return Ok(());
            }
            acked = c.shard.wal().durable_position();
            out.clear();
            let mut resubmitted = 0;
            while out.len() < RESUBMIT_BYTES_PER_WRITE {
                let Some(m) = c.repl.resubmit.pop_front() else {
                    break;
                };
                proto::encode(
                    &Msg::Resubmit {
                        msg_id: m.msg_id,
                        sender: &m.sender,
                        recipient: &m.recipient,
                        body: &m.body,
                    },
                    &mut out,
                );
                resubmitted += 1;
            }
            if resubmitted > 0 {
                let left = c.repl.resubmit.len();
                tracing::info!(
                    shard = c.shard.id,
                    resubmitted,
                    left,
                    "re-submitting a dropped tail to the primary"
                );
            }
            proto::encode(
                &Msg::Ack {
                    epoch: c.shard.epoch(),
                    durable_position: acked,
                    now_ms: wall_ms(), // informational
                },
                &mut out,
            );
        }
        writer.write_all(&out).await.map_err(|e| e.to_string())?;
    }
}

// ------------------------------------------------------- modes and promotion

/// Run every maintenance tick: promotion, stepping down, the durability
/// mode, and stats. Returns the peer to follow after stepping down (the
/// caller spawns `follow`).
pub fn tick(c: &mut Core, data: &std::path::Path) -> Option<String> {
    let stats = c.repl.stats.clone();
    let mut follow = None;
    // Lost the election, or (with etcd) fenced by a higher epoch: follow
    // the peer rather than stay fenced.
    let fenced = stats.elected.load(SeqCst) && c.shard.role == Role::Fenced;
    if (stats.demote_requested.load(SeqCst) || fenced) && c.shard.role != Role::Replica {
        follow = step_down(c, &stats);
    }
    if stats.promote_requested.load(SeqCst) && c.shard.role == Role::Replica {
        promote(c, &stats, data);
    }
    if let Some(peer) = hand_over(c, &stats) {
        follow = Some(peer);
    }
    if c.shard.role == Role::Primary {
        update_mode(c);
    }
    publish(c, &stats);
    follow
}

/// This core's part of a handover (engine::handover): refuse SENDs while
/// it is under way, step down once committed with the replica level.
fn hand_over(c: &mut Core, stats: &Arc<NodeStats>) -> Option<String> {
    use crate::handover::{decide, Decision, ShardView};
    let wal = c.shard.wal();
    let view = ShardView {
        id: c.shard.id,
        role: c.shard.role,
        mode: c.shard.mode,
        last_position: wal.last_position(),
        durable_position: wal.durable_position(),
        replica_acked: c.repl.link.as_ref().map(|l| l.acked),
        waiting: c.shard.waiting_len(),
    };
    let decision = decide(&view, stats);
    let refusing = decision != Decision::Serve;
    if refusing != c.shard.handing_over && c.shard.role == Role::Primary {
        if refusing {
            tracing::info!(
                shard = view.id,
                "handover: taking no SENDs until the replica holds every record"
            );
        } else {
            tracing::warn!(shard = view.id, "handover abandoned: taking SENDs again");
        }
        c.shard.handing_over = refusing;
    }
    (decision == Decision::StepDown).then(|| {
        tracing::info!(
            shard = view.id,
            position = view.last_position,
            "handover: the replica holds every record; stepping down"
        );
        step_down_for(
            c,
            stats,
            "not the primary: it handed over to its replica".into(),
        )
    })?
}

/// Lost the election: stop acting as primary, drop the replica's stream,
/// and follow the peer (whoever leads now; the sync on connect truncates
/// what this log holds beyond the new primary's and re-submits it).
fn step_down(c: &mut Core, stats: &Arc<NodeStats>) -> Option<String> {
    step_down_for(
        c,
        stats,
        "not the primary: it lost its lease in etcd".to_string(),
    )
}

/// Stops acting as primary for `reason` (lost lease, handover): the SENDs
/// waiting are answered not-primary, the replica's stream ends, and the
/// peer (if the configuration names one) is followed.
pub fn step_down_for(c: &mut Core, stats: &Arc<NodeStats>, reason: String) -> Option<String> {
    c.shard.step_down(reason, &mut c.edge);
    c.repl.link = None;
    c.repl.wake_writers();
    stats.set_shard_mode(c.shard.id, c.shard.mode);
    tracing::warn!(
        shard = c.shard.id,
        epoch = c.shard.epoch(),
        "stepped down: following the peer"
    );
    // The node stops being primary with its first shard (the flag stays
    // set until the next promotion, so every core steps down).
    stats.set_role(Role::Replica);
    c.repl.config.peer.clone()
}

fn promote(c: &mut Core, stats: &NodeStats, data: &std::path::Path) {
    // The election's epoch (etcd's revision), or: the first core to promote
    // picks the new epoch and persists it; the others adopt it.
    let elected = stats.promote_epoch.load(SeqCst);
    let proposed = match elected {
        0 => stats.epoch.load(SeqCst).max(c.shard.epoch()) + 1,
        e => e,
    };
    if proposed <= c.shard.epoch() {
        tracing::error!(
            shard = c.shard.id,
            proposed,
            epoch = c.shard.epoch(),
            "promotion refused: the new epoch is not above this shard's"
        );
        stats.promote_requested.store(false, SeqCst);
        return;
    }
    let epoch = match stats
        .promotion_epoch
        .compare_exchange(0, proposed, SeqCst, SeqCst)
    {
        Ok(_) => {
            if let Err(e) = crate::runtime::persist_epoch(data, proposed) {
                tracing::error!(error = %e, "cannot persist the new epoch; promotion aborted");
                stats.promotion_epoch.store(0, SeqCst);
                stats.promote_requested.store(false, SeqCst);
                return;
            }
            proposed
        }
        Err(current) => current,
    };
    let mode = initial_mode(&c.repl.config);
    c.repl.alone_until = c.shard.wal().last_position();
    c.shard.promote(epoch, mode, &mut c.edge);
    stats.set_shard_mode(c.shard.id, mode);
    tracing::warn!(
        shard = c.shard.id,
        epoch,
        mode = mode.name(),
        "promoted to primary"
    );
    if stats.promoted_cores.fetch_add(1, SeqCst) + 1 == c.repl.nr_shards as usize {
        stats.epoch.store(epoch, SeqCst);
        stats.set_role(Role::Primary);
        stats.promote_requested.store(false, SeqCst);
        stats.promotion_epoch.store(0, SeqCst);
        stats.promoted_cores.store(0, SeqCst);
        stats.promote_epoch.store(0, SeqCst);
    }
}

/// The mode a primary starts in (or is promoted to) before any replica acks.
pub fn initial_mode(config: &ReplicationConfig) -> Mode {
    if !config.synchronous() {
        Mode::Local
    } else if config.on_replica_loss == LossPolicy::Block {
        Mode::Blocked
    } else {
        Mode::Degraded
    }
}

fn update_mode(c: &mut Core) {
    if !c.repl.config.synchronous() {
        return;
    }
    let loss_timeout_ms = c.repl.config.loss_timeout_ms;
    let heard = mono_ms().saturating_sub(c.repl.last_heard_ms) < loss_timeout_ms;
    let lag = c
        .repl
        .link
        .as_ref()
        .map(|l| c.shard.wal().last_position().saturating_sub(l.acked));
    let healthy = heard && lag.is_some();
    let mut next = match c.shard.mode {
        Mode::Replica if !healthy => match c.repl.config.on_replica_loss {
            LossPolicy::Degrade => Mode::Degraded,
            LossPolicy::Block => Mode::Blocked,
        },
        Mode::Degraded | Mode::Blocked | Mode::Local
            if healthy && lag.is_some_and(|l| l <= CAUGHT_UP_LAG_OPS_MAX) =>
        {
            Mode::Replica
        }
        Mode::Local => initial_mode(&c.repl.config),
        same => same,
    };
    let stats = &c.repl.stats;
    let wants_alone = next == Mode::Degraded && c.shard.mode != Mode::Degraded;
    // With etcd, acknowledging alone waits until the pair's state says so
    // (engine::election): a replica never takes over missing such messages.
    let held = wants_alone && !stats.alone_allowed.load(SeqCst);
    if let Some(s) = stats.shards.get(c.shard.id) {
        s.wants_alone.store(held, Relaxed);
    }
    if held {
        next = c.shard.mode;
    }
    if next != c.shard.mode {
        if next == Mode::Degraded {
            tracing::error!(
                shard = c.shard.id,
                "replica lost: DEGRADED, STORED now means the local fsync only"
            );
        }
        if next == Mode::Replica && c.shard.mode != Mode::Blocked {
            // Everything up to here may have been acknowledged alone.
            c.repl.alone_until = c.shard.wal().last_position();
        }
        c.shard.set_mode(next, &mut c.edge);
    }
}

/// What a core already added to the node's counters (they only grow).
#[derive(Debug, Default)]
pub struct Published {
    stored: u64,
    rejected: u64,
    rejected_codes: [u64; crate::stats::REJECT_CODE_MAX + 2],
    stored_latency: crate::stats::LocalHistogram,
}

/// Adds this core's STORED / REJECTED counts and STORED latencies since the
/// last call to the node's stats (edge cores too: they answer for remote pairs).
pub fn publish_counts(c: &mut Core, stats: &NodeStats) {
    let p = &mut c.repl.published;
    stats
        .stored_total
        .fetch_add(c.edge.stored_count - p.stored, Relaxed);
    stats
        .rejected_total
        .fetch_add(c.edge.rejected_count - p.rejected, Relaxed);
    (p.stored, p.rejected) = (c.edge.stored_count, c.edge.rejected_count);
    stats.publish_rejected(&c.edge.rejected_codes, &mut p.rejected_codes);
    if c.shard.exists() {
        stats.publish_stored_latency(&c.shard.stored_latency, &mut p.stored_latency);
    }
}

fn publish(c: &mut Core, stats: &NodeStats) {
    stats.set_shard_mode(c.shard.id, c.shard.mode);
    publish_counts(c, stats);
    let Some(s) = stats.shards.get(c.shard.id) else {
        return;
    };
    let wal = c.shard.wal();
    s.last_position.store(wal.last_position(), Relaxed);
    s.durable_position.store(wal.durable_position(), Relaxed);
    let (inbox_bytes, dedup_bytes) = c.shard.memory_bytes();
    s.inbox_bytes.store(inbox_bytes as u64, Relaxed);
    s.dedup_bytes.store(dedup_bytes as u64, Relaxed);
    let connected = match c.shard.role {
        Role::Primary => c.repl.link.is_some(),
        _ => {
            c.repl.following
                && mono_ms().saturating_sub(c.repl.last_heard_ms) < c.repl.config.loss_timeout_ms
        }
    };
    s.replica_connected.store(connected, Relaxed);
    if connected && c.shard.role == Role::Primary {
        stats.replica_ever_seen.store(true, Relaxed);
    }
    s.last_heartbeat_ms.store(c.repl.last_heard_ms, Relaxed);
    if c.shard.role == Role::Primary {
        let acked = c
            .repl
            .link
            .as_ref()
            .map_or(c.shard.replica_acked(), |l| l.acked);
        let waits_for_replica = matches!(c.shard.mode, Mode::Replica | Mode::Blocked);
        s.synced
            .store(waits_for_replica && acked >= c.repl.alone_until, Relaxed);
        s.replica_acked_position.store(acked, Relaxed);
        s.replica_lag_ops
            .store(wal.last_position().saturating_sub(acked), Relaxed);
        s.replica_lag_ms.store(c.repl.lag_ms(), Relaxed);
    } else {
        s.synced.store(false, Relaxed);
        s.wants_alone.store(false, Relaxed);
        s.replica_acked_position
            .store(wal.durable_position(), Relaxed);
        s.replica_lag_ops.store(
            c.repl
                .primary_last_position
                .saturating_sub(wal.durable_position()),
            Relaxed,
        );
    }
    stats.epoch.fetch_max(c.shard.epoch(), Relaxed);
}
