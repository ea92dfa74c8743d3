//! One core: a pinned executor that owns one shard and the client connections
//! it accepted (edge and core roles in one process). Connections live in a
//! fixed-size slot arena; cross-core traffic goes over glommio's channel mesh
//! in batches, one batch per destination per event-loop turn.

use crate::clock::{mono_ms, wall_ms};
use crate::config::Limits;
use crate::shard::{ConnRef, PendingMsg, SendRequest, Shard, Sink};
use net::{encode_server_frame, error_code, reject_code, MsgId, ServerFrame};
use std::task::Waker;

/// Messages between cores. Edge-to-shard requests and shard-to-edge answers.
#[derive(Debug)]
pub enum Mail {
    Send {
        reply: ConnRef,
        sender: Box<str>,
        msg_id: MsgId,
        to: Box<str>,
        sent_ms: u64,
        body: Box<[u8]>,
    },
    Login {
        conn: ConnRef,
        user: Box<str>,
    },
    Ack {
        user: Box<str>,
        seq: u64,
    },
    Logout {
        conn: ConnRef,
        user: Box<str>,
    },
    Stored {
        conn: ConnRef,
        msg_id: MsgId,
    },
    Rejected {
        conn: ConnRef,
        msg_id: MsgId,
        code: u16,
        reason: Box<str>,
    },
    /// Refused by a shard that does not take writes (Sink::not_primary).
    NotPrimary {
        conn: ConnRef,
        msg_id: MsgId,
        reason: Box<str>,
    },
    /// The edge dropped DELIVERs from `seq` on (outbox full): resend from there later.
    Rewind {
        conn: ConnRef,
        user: Box<str>,
        seq: u64,
    },
    /// The connection's outbox drained: deliveries may resume.
    Resume {
        conn: ConnRef,
        user: Box<str>,
    },
    /// An edge's link accepted on core `core` closed: shards forget the
    /// presence of its connections.
    LinkClosed {
        core: u16,
        link: u16,
    },
    /// A replica's stream for this core's shard, accepted on another core:
    /// a descriptor this core now owns, and the replica's HELLO.
    AdoptReplica {
        fd: std::os::fd::RawFd,
        hello: crate::repl_proto::Hello,
    },
    Welcome {
        conn: ConnRef,
        pending: u64,
    },
    /// A PING after an ACK, sent after it to the user's shard: answered
    /// (`Pong`) once the ACK took effect.
    Sync {
        conn: ConnRef,
        nonce: u64,
    },
    Pong {
        conn: ConnRef,
        nonce: u64,
    },
    Deliver {
        conn: ConnRef,
        seq: u64,
        msg_id: MsgId,
        from: Box<str>,
        sent_ms: u64,
        body: Box<[u8]>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    /// Accepted; the first frame must be HELLO.
    AwaitHello,
    /// HELLO forwarded to the user's shard; reading paused until WELCOME.
    AwaitWelcome,
    Ready,
    /// An ERROR (or BYE) was queued: flush, then close. Nothing more is read.
    Closing,
    /// Flushed and FIN sent after an ERROR: what the peer still sends is read
    /// and dropped for a moment (so the kernel does not answer it with a RST
    /// that could destroy the unread ERROR), then the socket closes.
    Lingering,
}

impl SlotState {
    /// A connection that still reads frames or waits to (not free, not closing).
    pub fn is_open(self) -> bool {
        matches!(
            self,
            SlotState::AwaitHello | SlotState::AwaitWelcome | SlotState::Ready
        )
    }
}

/// A connection: its whole state in the per-core arena. No task and no
/// buffer while idle: the core's socket ring (engine::sockets) watches the
/// descriptor, `out` is empty (no allocation) unless bytes wait for the
/// socket, and `rbuf` holds nothing unless a frame is incomplete.
pub struct Slot {
    pub generation: u32,
    /// The socket (owned; -1 while free).
    pub fd: i32,
    pub state: SlotState,
    /// Drop the connection at once: no flush.
    pub kill: bool,
    /// In the edge's run list (the driver services it next pass).
    pub queued: bool,
    /// The socket had unread bytes when last looked at (set by a readiness
    /// completion, cleared by a read that drained it).
    pub readable: bool,
    /// A write-readiness poll is armed (the socket's send buffer was full).
    pub write_armed: bool,
    /// In the mesh or read-buffer waiter list.
    pub waiting: bool,
    /// `rbuf` is the connection's own exactly sized copy of an incomplete
    /// frame, not a pool buffer.
    pub parked: bool,
    /// PING ordering behind ACKs, in one byte (the slot has no room for
    /// two): bit 7 set when an ACK went to the user's shard since the last
    /// PING (the next PONG waits until it took effect there,
    /// `Core::route_sync`); bits 0-6 count PINGs routed to the shard whose
    /// PONG has not come back (a PING behind them goes the same way, so
    /// PONGs keep the PINGs' order; at most `SYNCS_PER_CONN_MAX`).
    pub sync: u8,
    pub sends_in_flight: u32,
    pub rstart: u32,
    pub rend: u32,
    /// Shared handle (cloned per routed frame without allocating).
    pub user: Option<std::rc::Rc<str>>,
    pub out: Vec<u8>,
    pub out_sent: u32,
    /// Read bytes: a pool buffer lent while bytes are decoded, or parked bytes.
    pub rbuf: Option<Box<[u8]>>,
    /// The TLS state of a connection accepted on the TLS listener.
    pub tls: Option<Box<crate::tls::TlsConn>>,
    /// The peer address's key in the node's address table (engine::abuse;
    /// 0: not tracked).
    pub ip_key: u64,
    /// Highest DELIVER seq written to this connection (an ACK above it is a violation).
    pub delivered_seq_max: u64,
    pub last_activity_ms: u64,
    /// DELIVERs did not fit the outbox since this time (the core's clock in
    /// ms, its low 32 bits: compared by wrapping difference, and a block
    /// ends within `SLOW_READER_TIMEOUT_MS`): later ones are dropped until it
    /// drains; the shard resends them after `Resume`. (0: not blocked; a
    /// clock reading of 0 is taken as 1.)
    pub deliver_blocked_since_ms: u32,
    /// The client's last ACK as a distance below `delivered_seq_max`
    /// (`ACK_UNKNOWN`: none yet). Sent again when the connection's login is
    /// registered at a new primary: an ACK lost with the old one would
    /// otherwise leave the new one's delivery window full of messages the
    /// client already has, and the client with nothing left to ACK.
    pub ack_lag: u32,
    /// After a rewind: the only DELIVER seq accepted next (older mail in
    /// flight from the shard is dropped, so order holds).
    /// (0: any; seqs start at 1.)
    pub deliver_expected_seq: u64,
}

/// PINGs of one connection waiting for their PONG from the shard; a PING
/// beyond is answered at once (docs/PROTOCOL.md, rule 5).
pub const SYNCS_PER_CONN_MAX: u8 = 64;
const _: () = assert!(SYNCS_PER_CONN_MAX < 0x80);

/// What an idle connection costs in its core's arena: all of its user-space
/// state (issue 9: an idle connection is its slot). Keep it small.
pub const SLOT_BYTES_MAX: usize = 136;
const _: () = assert!(std::mem::size_of::<Slot>() <= SLOT_BYTES_MAX);

/// `Slot::ack_lag` when the connection has not ACKed (or too long ago).
pub const ACK_UNKNOWN: u32 = u32::MAX;

/// The low 32 bits of a clock in ms, never 0 (see `Slot::deliver_blocked_since_ms`).
fn clock32(clock_ms: u64) -> u32 {
    (clock_ms as u32).max(1)
}

impl Slot {
    const SYNC_ACKED: u8 = 0x80;

    /// The client ACKed `seq` (at most `delivered_seq_max`, checked by the
    /// caller), and the ACK went to its user's shard.
    pub fn note_ack(&mut self, seq: u64) {
        self.sync |= Self::SYNC_ACKED;
        let lag = self.delivered_seq_max.saturating_sub(seq);
        // Too far below to hold: unknown (an ACK sent again must never be
        // above what the client acknowledged).
        self.ack_lag = u32::try_from(lag).unwrap_or(ACK_UNKNOWN);
    }

    /// The client's last ACK, if known.
    pub fn acked_seq(&self) -> Option<u64> {
        (self.ack_lag != ACK_UNKNOWN)
            .then(|| self.delivered_seq_max - u64::from(self.ack_lag))
            .filter(|&seq| seq > 0)
    }

    /// Whether this PING must go to the shard (behind an ACK or behind a
    /// PING still there); if so, it is counted as in flight.
    pub fn route_ping(&mut self) -> bool {
        let in_flight = self.sync & !Self::SYNC_ACKED;
        let routed =
            (self.sync & Self::SYNC_ACKED != 0 || in_flight > 0) && in_flight < SYNCS_PER_CONN_MAX;
        if routed {
            self.sync = in_flight + 1;
        }
        routed
    }

    /// The PONG of a routed PING is being written.
    fn sync_answered(&mut self) {
        let in_flight = self.sync & !Self::SYNC_ACKED;
        self.sync = (self.sync & Self::SYNC_ACKED) | in_flight.saturating_sub(1);
    }

    fn free() -> Slot {
        Slot {
            generation: 0,
            fd: -1,
            state: SlotState::Free,
            kill: false,
            queued: false,
            readable: false,
            write_armed: false,
            waiting: false,
            parked: false,
            sync: 0,
            sends_in_flight: 0,
            rstart: 0,
            rend: 0,
            user: None,
            out: Vec::new(),
            out_sent: 0,
            rbuf: None,
            tls: None,
            ip_key: 0,
            delivered_seq_max: 0,
            last_activity_ms: 0,
            deliver_blocked_since_ms: 0,
            ack_lag: ACK_UNKNOWN,
            deliver_expected_seq: 0,
        }
    }
}

/// The edge half of a core: connections, their outboxes, and mail to other cores.
pub struct Edge {
    pub id: u16,
    pub nr_cores: usize,
    pub limits: Limits,
    pub net_limits: net::Limits,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Buffers for outboxes and reads, reused; bounded by `buffers_pooled_max`.
    pool: Vec<Vec<u8>>,
    pub outgoing: Vec<Vec<Mail>>,
    pub outgoing_len: usize,
    /// Mail raised inside the edge (Rewind, Resume), routed in FIFO order: a
    /// Resume must never overtake the Rewind it answers.
    pub pending_local: std::collections::VecDeque<Mail>,
    pub flusher_waker: Option<Waker>,
    /// Connections that paused reading because `outgoing` was full.
    pub mesh_waiters: Vec<u32>,
    /// Connections the driver services next pass (each once: `Slot::queued`).
    pub run: Vec<u32>,
    /// Accepted connections whose socket the driver has not watched yet.
    pub accepted: Vec<u32>,
    /// After an ERROR: lingering connections and when each closes (ms), in
    /// that order (the linger is one constant).
    pub lingering: std::collections::VecDeque<(u32, u32, u64)>,
    /// The connection driver, waiting for work.
    pub driver_waker: Option<Waker>,
    /// Where TLS connections' ciphertext is read and decrypted (one per
    /// core: a connection is served start to end before the next); empty
    /// until the first TLS read.
    tls_scratch: Box<[u8]>,
    /// Read buffers (frame_len_max + slack), lent to connections while bytes wait to be decoded.
    read_pool: Vec<Box<[u8]>>,
    read_buffers_lent: usize,
    /// Connections waiting for a read buffer (read_buffers_per_core all lent).
    pub read_waiters: Vec<u32>,
    /// Bytes of incomplete frames parked in connections (bounded by
    /// partial_frame_bytes_per_core_max).
    pub partial_frame_bytes: usize,
    pub sends_in_flight_total: u64,
    pub connections: usize,
    /// STORED / REJECTED answers written (published to the stats each tick).
    pub stored_count: u64,
    pub rejected_count: u64,
    /// REJECTED answers by code (crate::stats::reject_code_index).
    pub rejected_codes: [u64; crate::stats::REJECT_CODE_MAX + 2],
    pub shutting_down: bool,
    /// The core's clock, read once a maintenance tick: the monotonic clock
    /// (engine::clock::mono_ms), for every deadline of its connections
    /// (idle, HELLO, keep-alive, lingering, slow readers), rate buckets and
    /// MQTT sessions. Never a timestamp people read.
    pub clock_ms: u64,
    /// Node links from edges accepted on this core (engine::link), by id.
    pub links_in: std::collections::HashMap<u16, LinkIn, ahash::RandomState>,
    next_link_id: u16,
    /// Routes to other core pairs (a cluster member: engine::route).
    pub remote: Option<crate::route::Links>,
    /// The core's MQTT connections (engine::mqtt_conn).
    pub mqtt: crate::mqtt_conn::MqttEdge,
}

/// A node link from an edge, on the core that accepted it: the answers
/// and deliveries on their way to the edge.
#[derive(Default)]
pub struct LinkIn {
    pub out: Vec<u8>,
    pub waker: Option<Waker>,
    /// Over its bound or closed: nothing more is written; the edge
    /// reconnects and registers its connections again.
    pub broken: bool,
}

/// Bytes queued to one edge link before the link is dropped (the edge
/// reconnects, registers its logins again and resends what is unanswered).
pub const LINK_OUT_BYTES_MAX: usize = 64 << 20;
/// Node links from edges one core holds.
pub const LINKS_PER_CORE_MAX: usize = 4096;

/// Buffers kept in a core's pool; more are freed on return.
const BUFFERS_POOLED_MAX: usize = 64;
/// A connection whose outbox stays full of DELIVERs this long is disconnected.
const SLOW_READER_TIMEOUT_MS: u64 = 30_000;
/// Read-ahead room in a read buffer beyond one whole frame: more than a TLS
/// record, so a connection with a partial frame can always take one more.
const READ_AHEAD_BYTES: usize = 20 << 10;
// An MQTT packet may be this much longer than a frame: it must fit too.
const _: () = assert!(crate::mqtt_conn::PACKET_OVERHEAD_MAX as usize <= READ_AHEAD_BYTES);
/// A pooled outbox buffer larger than this is freed instead of kept.
const POOLED_BUFFER_CAPACITY_MAX: usize = 256 << 10;

impl Edge {
    pub fn new(id: u16, nr_cores: usize, limits: Limits, net_limits: net::Limits) -> Edge {
        let frame_len_max = limits.frame_len_max;
        Edge {
            id,
            nr_cores,
            limits,
            net_limits,
            slots: Vec::new(),
            free_slots: Vec::new(),
            pool: Vec::new(),
            outgoing: (0..nr_cores).map(|_| Vec::new()).collect(),
            outgoing_len: 0,
            pending_local: std::collections::VecDeque::new(),
            flusher_waker: None,
            mesh_waiters: Vec::new(),
            run: Vec::new(),
            accepted: Vec::new(),
            lingering: std::collections::VecDeque::new(),
            driver_waker: None,
            tls_scratch: Box::default(),
            read_pool: Vec::new(),
            read_buffers_lent: 0,
            read_waiters: Vec::new(),
            partial_frame_bytes: 0,
            sends_in_flight_total: 0,
            connections: 0,
            stored_count: 0,
            rejected_count: 0,
            rejected_codes: Default::default(),
            shutting_down: false,
            clock_ms: mono_ms(),
            links_in: Default::default(),
            next_link_id: 0,
            remote: None,
            mqtt: crate::mqtt_conn::MqttEdge::new(frame_len_max),
        }
    }

    /// Registers a link from an edge; None at LINKS_PER_CORE_MAX. Ids are
    /// not reused until 65535 others were handed out, and a closed link's
    /// presences are forgotten (`Core::link_closed`), so no delivery for a
    /// closed link reaches a newer one; a stray STORED or REJECTED is
    /// dropped by the edge (it answers only SENDs it is waiting for).
    pub fn add_link(&mut self) -> Option<u16> {
        if self.links_in.len() >= LINKS_PER_CORE_MAX {
            return None;
        }
        loop {
            self.next_link_id = self.next_link_id.wrapping_add(1).max(1);
            if !self.links_in.contains_key(&self.next_link_id) {
                self.links_in.insert(self.next_link_id, LinkIn::default());
                return Some(self.next_link_id);
            }
        }
    }

    /// Writes an answer to the edge link a connection came through.
    fn link_write(&mut self, conn: ConnRef, msg: &crate::link_proto::Msg<'_>) {
        let Some(link) = self.links_in.get_mut(&conn.link) else {
            return; // the link closed: the edge sends again elsewhere
        };
        if link.broken {
            return;
        }
        crate::link_proto::encode(msg, &mut link.out);
        if link.out.len() > LINK_OUT_BYTES_MAX {
            tracing::warn!(
                link = conn.link,
                max = LINK_OUT_BYTES_MAX,
                "an edge does not read its link: dropped"
            );
            link.broken = true;
        }
        if let Some(w) = link.waker.take() {
            w.wake();
        }
    }

    /// The shard owning a user: a fixed hash into 16384 slots, slots spread evenly over shards.
    pub fn shard_of(&self, user: &str) -> u16 {
        shard_of_slot(net::slot_of(user), self.nr_cores)
    }

    /// Takes a free slot for a new connection, or None at connections_per_core_max.
    pub fn alloc_slot(&mut self, fd: i32) -> Option<(u32, u32)> {
        if self.connections >= self.limits.connections_per_core_max {
            return None;
        }
        let index = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::free());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        assert_eq!(slot.state, SlotState::Free);
        slot.generation = slot.generation.wrapping_add(1);
        slot.state = SlotState::AwaitHello;
        slot.fd = fd;
        slot.last_activity_ms = self.clock_ms;
        self.connections += 1;
        self.accepted.push(index);
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
        Some((index, slot.generation))
    }

    pub fn release_slot(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        assert_ne!(slot.state, SlotState::Free);
        self.sends_in_flight_total -= u64::from(slot.sends_in_flight);
        let out = std::mem::take(&mut slot.out);
        let rbuf = slot.rbuf.take();
        let parked = slot.parked;
        if let Some(tls) = slot.tls.take() {
            self.partial_frame_bytes -= tls.pending_in.len();
        }
        let generation = slot.generation;
        *slot = Slot::free();
        slot.generation = generation;
        self.mqtt.forget(index);
        self.give_buffer(out);
        match rbuf {
            Some(bytes) if parked => self.partial_frame_bytes -= bytes.len(),
            Some(buf) => self.give_read_buffer(buf),
            None => {}
        }
        self.free_slots.push(index);
        self.connections -= 1;
    }

    pub fn slot(&mut self, index: u32) -> &mut Slot {
        &mut self.slots[index as usize]
    }

    /// A slot and the core's TLS scratch buffer (sized for a whole read
    /// buffer plus one record), borrowed together.
    pub fn slot_and_tls_scratch(&mut self, index: u32) -> (&mut Slot, &mut [u8]) {
        if self.tls_scratch.is_empty() {
            let len = self.read_buffer_len() + crate::tls::TLS_RECORD_BYTES_MAX;
            self.tls_scratch = vec![0u8; len].into_boxed_slice();
        }
        (&mut self.slots[index as usize], &mut self.tls_scratch)
    }

    /// Has the driver look at a connection on its next pass.
    pub fn wake_slot(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        if slot.queued || slot.state == SlotState::Free {
            return;
        }
        slot.queued = true;
        self.run.push(index);
        if let Some(w) = self.driver_waker.take() {
            w.wake();
        }
    }

    /// Wakes the connections that waited for room in the core mesh.
    pub fn wake_mesh_waiters(&mut self) {
        for index in std::mem::take(&mut self.mesh_waiters) {
            self.slots[index as usize].waiting = false;
            self.wake_slot(index);
        }
    }

    /// Closes lingering connections whose moment is over.
    pub fn expire_lingering(&mut self) {
        while let Some(&(index, generation, until_ms)) = self.lingering.front() {
            if until_ms > self.clock_ms {
                break;
            }
            self.lingering.pop_front();
            let slot = &mut self.slots[index as usize];
            if slot.generation == generation && slot.state == SlotState::Lingering {
                slot.kill = true;
                self.wake_slot(index);
            }
        }
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The slot for `conn`, if that connection still lives there.
    fn live_slot(&mut self, conn: ConnRef) -> Option<&mut Slot> {
        debug_assert_eq!(conn.core, self.id);
        let slot = self.slots.get_mut(conn.slot as usize)?;
        (slot.generation == conn.generation && slot.state != SlotState::Free).then_some(slot)
    }

    pub fn take_buffer(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    pub fn give_buffer(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == 0
            || buf.capacity() > POOLED_BUFFER_CAPACITY_MAX
            || self.pool.len() >= BUFFERS_POOLED_MAX
        {
            return;
        }
        buf.clear();
        self.pool.push(buf);
    }

    /// Length of a read buffer: one whole frame plus room to read ahead.
    fn read_buffer_len(&self) -> usize {
        self.limits.frame_len_max as usize + 4 + READ_AHEAD_BYTES
    }

    pub fn read_buffer_available(&self) -> bool {
        self.read_buffers_lent < self.limits.read_buffers_per_core
    }

    pub fn take_read_buffer(&mut self) -> Box<[u8]> {
        assert!(
            self.read_buffer_available(),
            "checked by the caller before reading"
        );
        self.read_buffers_lent += 1;
        let len = self.read_buffer_len();
        self.read_pool
            .pop()
            .unwrap_or_else(|| vec![0u8; len].into_boxed_slice())
    }

    pub fn give_read_buffer(&mut self, buf: Box<[u8]>) {
        self.read_buffers_lent -= 1;
        if self.read_pool.len() < BUFFERS_POOLED_MAX {
            self.read_pool.push(buf);
        }
        // One buffer, one waiter; entries of closed connections are skipped.
        while let Some(index) = self.read_waiters.pop() {
            let slot = &mut self.slots[index as usize];
            if slot.waiting {
                slot.waiting = false;
                self.wake_slot(index);
                break;
            }
        }
    }

    /// Appends a frame to a connection's outbox; false when it does not fit
    /// (the caller decides: a DELIVER is resent later, anything else closes).
    pub fn write_frame(&mut self, index: u32, frame: &ServerFrame<'_>) -> bool {
        if self.mqtt.is_mqtt(index) {
            return crate::mqtt_conn::write(self, index, frame);
        }
        let len = net::encoded_len_server(frame);
        let delivery = matches!(frame, ServerFrame::Deliver { .. });
        self.write_encoded(index, len, delivery, |out| encode_server_frame(frame, out))
    }

    /// Appends `len` bytes written by `encode` to a connection's outbox,
    /// within `outbox_bytes_max`. What does not fit: a delivery returns
    /// false (resent later); anything else closes the connection.
    pub fn write_encoded(
        &mut self,
        index: u32,
        len: usize,
        delivery: bool,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let outbox_max = self.limits.outbox_bytes_max;
        let needs_buffer = self.slots[index as usize].out.capacity() == 0;
        let fresh = if needs_buffer {
            Some(self.take_buffer())
        } else {
            None
        };
        let slot = &mut self.slots[index as usize];
        if let Some(buf) = fresh {
            slot.out = buf;
        }
        if slot.kill {
            return false;
        }
        if slot.out.len() - slot.out_sent as usize + len > outbox_max {
            if !delivery {
                // Answers are bounded by sends_in_flight_max; overflowing means a
                // client that does not read its answers at all.
                tracing::debug!(slot = index, "outbox full: disconnecting");
                slot.kill = true;
                self.wake_slot(index);
            }
            return false;
        }
        encode(&mut slot.out);
        self.wake_slot(index);
        true
    }

    /// Called when a connection's outbox drained: blocked deliveries resume.
    pub fn drained(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        if std::mem::take(&mut slot.deliver_blocked_since_ms) == 0 {
            return;
        }
        let Some(user) = slot.user.as_deref().map(Box::<str>::from) else {
            return;
        };
        let conn = ConnRef {
            core: self.id,
            link: 0,
            slot: index,
            generation: slot.generation,
        };
        tracing::debug!(slot = index, "outbox drained: deliveries resume");
        self.pending_local.push_back(Mail::Resume { conn, user });
    }

    /// Disconnects readers whose outbox stayed full past the idle timeout:
    /// a recipient that does not read (its messages stay in the inbox).
    pub fn expire_stuck_readers(&mut self) {
        let timeout = self.limits.idle_timeout_ms.min(SLOW_READER_TIMEOUT_MS) as u32;
        let now = clock32(self.clock_ms);
        for index in 0..self.slots.len() as u32 {
            let slot = &mut self.slots[index as usize];
            let blocked = slot.deliver_blocked_since_ms;
            if blocked != 0 && now.wrapping_sub(blocked) > timeout && !slot.kill {
                tracing::debug!("a recipient that does not read: disconnected");
                slot.kill = true;
                self.wake_slot(index);
            }
        }
    }

    /// Queues ERROR and closes after the flush.
    pub fn fail(&mut self, index: u32, code: u16, reason: &str) {
        self.write_frame(index, &ServerFrame::Error { code, reason });
        self.slots[index as usize].state = SlotState::Closing;
    }

    pub fn post(&mut self, dest: u16, mail: Mail) {
        assert_ne!(dest, self.id, "local mail is handled in place");
        self.outgoing[dest as usize].push(mail);
        self.outgoing_len += 1;
        if let Some(w) = self.flusher_waker.take() {
            w.wake();
        }
    }

    /// Requests cannot leave this core now (the core mesh or the links to
    /// other pairs are at their bound): connections pause reading.
    pub fn mesh_full(&self) -> bool {
        self.outgoing_len >= self.limits.mesh_outgoing_max
            || self.remote.as_ref().is_some_and(|r| r.full())
    }

    /// Counts a REJECTED answer with its code.
    pub fn count_rejected(&mut self, code: u16) {
        self.rejected_count += 1;
        self.rejected_codes[crate::stats::reject_code_index(code)] += 1;
    }

    fn answered(&mut self, conn: ConnRef, frame: &ServerFrame<'_>) {
        match frame {
            ServerFrame::Rejected { code, .. } => self.count_rejected(*code),
            _ => self.stored_count += 1,
        }
        let Some(slot) = self.live_slot(conn) else {
            return;
        };
        slot.sends_in_flight -= 1;
        self.sends_in_flight_total -= 1;
        self.write_frame(conn.slot, frame);
    }

    /// Answers a PING that waited for the connection's ACKs to take effect
    /// on the user's shard (this core): to the connection, wherever it is.
    pub fn pong(&mut self, conn: ConnRef, nonce: u64) {
        if conn.core != self.id {
            self.post(conn.core, Mail::Pong { conn, nonce });
            return;
        }
        if conn.link != 0 {
            let msg = crate::link_proto::Msg::Synced {
                conn: link_conn(conn),
                nonce,
            };
            self.link_write(conn, &msg);
            return;
        }
        if let Some(slot) = self.live_slot(conn) {
            slot.sync_answered();
            self.write_frame(conn.slot, &ServerFrame::Pong { nonce });
        }
    }

    /// Handles an answer that came from another core's shard.
    pub fn receive(&mut self, mail: Mail) {
        match mail {
            Mail::Stored { conn, msg_id } => self.stored(conn, msg_id),
            Mail::Rejected {
                conn,
                msg_id,
                code,
                reason,
            } => self.rejected(conn, msg_id, code, &reason),
            Mail::NotPrimary {
                conn,
                msg_id,
                reason,
            } => self.not_primary(conn, msg_id, &reason),
            Mail::Welcome { conn, pending } => self.welcome(conn, pending),
            Mail::Pong { conn, nonce } => self.pong(conn, nonce),
            Mail::Deliver {
                conn,
                seq,
                msg_id,
                from,
                sent_ms,
                body,
            } if conn.link != 0 => {
                // For an edge's connection, through the link it came on.
                let msg = crate::link_proto::Msg::Deliver {
                    conn: link_conn(conn),
                    seq,
                    msg_id,
                    sent_ms,
                    from: &from,
                    body: &body,
                };
                self.link_write(conn, &msg);
            }
            Mail::Deliver {
                conn,
                seq,
                msg_id,
                from,
                sent_ms,
                body,
            } => self.deliver_local(conn, seq, msg_id, &from, sent_ms, &body),
            other => unreachable!("shard request routed to the edge: {other:?}"),
        }
    }

    /// A DELIVER from a remote pair's primary for a connection of this core.
    pub fn deliver_remote(
        &mut self,
        conn: ConnRef,
        seq: u64,
        msg_id: MsgId,
        from: &str,
        sent_ms: u64,
        body: &[u8],
    ) {
        self.deliver_local(conn, seq, msg_id, from, sent_ms, body);
    }

    fn deliver_local(
        &mut self,
        conn: ConnRef,
        seq: u64,
        msg_id: MsgId,
        from: &str,
        sent_ms: u64,
        body: &[u8],
    ) {
        let Some(slot) = self.live_slot(conn) else {
            return;
        };
        if slot.state != SlotState::Ready {
            return;
        }
        if slot.deliver_blocked_since_ms != 0
            || (slot.deliver_expected_seq != 0 && slot.deliver_expected_seq != seq)
        {
            return; // rewound: the shard resends from the expected seq after Resume
        }
        if seq <= slot.delivered_seq_max {
            // Already written to this connection: a new primary (after a
            // failover, engine::route) sends again from the last ACK it has.
            return;
        }
        let frame = ServerFrame::Deliver {
            seq,
            msg_id,
            from,
            sent_ms,
            body,
        };
        if self.write_frame(conn.slot, &frame) {
            let slot = &mut self.slots[conn.slot as usize];
            if seq > slot.delivered_seq_max {
                let step = u32::try_from(seq - slot.delivered_seq_max).unwrap_or(ACK_UNKNOWN);
                // Saturates at ACK_UNKNOWN, which stays unknown.
                slot.ack_lag = slot.ack_lag.saturating_add(step);
                slot.delivered_seq_max = seq;
            }
            slot.deliver_expected_seq = 0;
            return;
        }
        let clock_ms = self.clock_ms;
        let slot = &mut self.slots[conn.slot as usize];
        slot.deliver_blocked_since_ms = clock32(clock_ms);
        slot.deliver_expected_seq = seq;
        tracing::debug!(
            slot = conn.slot,
            seq,
            "outbox full: deliveries rewound to seq"
        );
        if let Some(user) = slot.user.as_deref().map(Box::<str>::from) {
            self.pending_local
                .push_back(Mail::Rewind { conn, user, seq });
        }
    }

    /// Every live connection gets ERROR 5 and is closed after its flush.
    pub fn shut_all(&mut self) {
        for index in 0..self.slots.len() as u32 {
            if self.slots[index as usize].state.is_open() {
                self.fail(index, error_code::SHUTTING_DOWN, "server shutting down");
            }
        }
    }

    /// Closes connections silent for longer than the idle timeout (ERROR 6).
    pub fn expire_idle(&mut self) {
        let deadline = self.clock_ms.saturating_sub(self.limits.idle_timeout_ms);
        let hello_deadline = self.clock_ms.saturating_sub(self.limits.hello_timeout_ms);
        for index in 0..self.slots.len() as u32 {
            let deadline = match self.mqtt.keep_alive_timeout_ms(index) {
                Some(ms) => self.clock_ms.saturating_sub(ms),
                None => deadline,
            };
            let slot = &self.slots[index as usize];
            if slot.state == SlotState::AwaitHello && slot.last_activity_ms < hello_deadline {
                self.fail(index, error_code::IDLE_TIMEOUT, "no HELLO in time");
            } else if slot.state.is_open() && slot.last_activity_ms < deadline {
                self.fail(index, error_code::IDLE_TIMEOUT, "idle timeout");
            }
        }
    }
}

/// An edge connection's name on its link.
fn link_conn(conn: ConnRef) -> crate::link_proto::Conn {
    crate::link_proto::Conn {
        slot: conn.slot,
        generation: conn.generation,
    }
}

impl Sink for Edge {
    fn stored(&mut self, conn: ConnRef, msg_id: MsgId) {
        if conn.core == self.id && conn.link != 0 {
            // Counted by the edge that answers its client (one count per
            // client-visible answer across a cluster).
            let c = link_conn(conn);
            self.link_write(conn, &crate::link_proto::Msg::Stored { conn: c, msg_id });
        } else if conn.core == self.id {
            self.answered(conn, &ServerFrame::Stored { msg_id });
        } else {
            self.post(conn.core, Mail::Stored { conn, msg_id });
        }
    }

    fn rejected(&mut self, conn: ConnRef, msg_id: MsgId, code: u16, reason: &str) {
        if conn.core == self.id && conn.link != 0 {
            let msg = crate::link_proto::Msg::Rejected {
                conn: link_conn(conn),
                msg_id,
                code,
                reason,
            };
            self.link_write(conn, &msg);
        } else if conn.core == self.id {
            self.answered(
                conn,
                &ServerFrame::Rejected {
                    msg_id,
                    code,
                    reason,
                },
            );
        } else {
            self.post(
                conn.core,
                Mail::Rejected {
                    conn,
                    msg_id,
                    code,
                    reason: reason.into(),
                },
            );
        }
    }

    fn not_primary(&mut self, conn: ConnRef, msg_id: MsgId, reason: &str) {
        if conn.core != self.id {
            let reason = reason.into();
            self.post(
                conn.core,
                Mail::NotPrimary {
                    conn,
                    msg_id,
                    reason,
                },
            );
        } else if conn.link != 0 {
            let msg = crate::link_proto::Msg::Retry {
                conn: link_conn(conn),
                msg_id,
            };
            self.link_write(conn, &msg);
        } else {
            self.rejected(conn, msg_id, net::reject_code::UNAVAILABLE, reason);
        }
    }

    fn welcome(&mut self, conn: ConnRef, pending: u64) {
        if conn.core != self.id {
            self.post(conn.core, Mail::Welcome { conn, pending });
            return;
        }
        if conn.link != 0 {
            let msg = crate::link_proto::Msg::WelcomeUser {
                conn: link_conn(conn),
                pending,
            };
            self.link_write(conn, &msg);
            return;
        }
        let frame_len_max = self.limits.frame_len_max;
        let Some(slot) = self.live_slot(conn) else {
            return;
        };
        if slot.state != SlotState::AwaitWelcome {
            return;
        }
        slot.state = SlotState::Ready;
        let frame = ServerFrame::Welcome {
            version: net::PROTOCOL_VERSION,
            server_time_ms: wall_ms(),
            max_frame: frame_len_max,
            pending,
        };
        self.write_frame(conn.slot, &frame);
    }

    fn deliver(&mut self, conn: ConnRef, msg: &PendingMsg) {
        if conn.core == self.id && conn.link != 0 {
            let frame = crate::link_proto::Msg::Deliver {
                conn: link_conn(conn),
                seq: msg.seq,
                msg_id: msg.msg_id,
                sent_ms: msg.sent_ms,
                from: msg.from(),
                body: msg.body(),
            };
            self.link_write(conn, &frame);
        } else if conn.core == self.id {
            self.deliver_local(
                conn,
                msg.seq,
                msg.msg_id,
                msg.from(),
                msg.sent_ms,
                msg.body(),
            );
        } else {
            let mail = Mail::Deliver {
                conn,
                seq: msg.seq,
                msg_id: msg.msg_id,
                from: msg.from().into(),
                sent_ms: msg.sent_ms,
                body: msg.body().into(),
            };
            self.post(conn.core, mail);
        }
    }
}

/// A core's shard: every core of a data node (role all or core) has one;
/// the cores of an edge have none, and no code path of an edge reaches for
/// it (engine::runtime starts no shard task there). Reaching for it anyway
/// is a broken invariant, and panics with that message.
pub struct DataShard(Option<Box<Shard>>);

impl DataShard {
    pub fn new(shard: Shard) -> DataShard {
        DataShard(Some(Box::new(shard)))
    }

    /// An edge core's: no shard.
    pub fn none() -> DataShard {
        DataShard(None)
    }

    pub fn exists(&self) -> bool {
        self.0.is_some()
    }
}

impl std::ops::Deref for DataShard {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        self.0.as_deref().expect("an edge core has no shard")
    }
}

impl std::ops::DerefMut for DataShard {
    fn deref_mut(&mut self) -> &mut Shard {
        self.0.as_deref_mut().expect("an edge core has no shard")
    }
}

/// A core's whole state, behind one RefCell owned by its executor thread.
pub struct Core {
    pub shard: DataShard,
    pub edge: Edge,
    pub repl: crate::repl::ReplState,
    pub commit_waker: Option<Waker>,
    /// The acceptor, waiting to notice shutdown.
    pub shutdown_waker: Option<Waker>,
    /// Checks HELLO tokens (engine::auth), with this core's token cache.
    pub auth: crate::auth::Authenticator,
    /// The node's per-address limits (engine::abuse).
    pub addresses: std::sync::Arc<crate::abuse::Addresses>,
    /// SEND token buckets of the users who sent on this core lately (swept
    /// once refilled: engine::abuse).
    pub send_buckets:
        std::collections::HashMap<std::rc::Rc<str>, crate::abuse::Bucket, ahash::RandomState>,
    /// Refused logins are logged at most once per interval and reason (with
    /// a count of the rest; /metrics counts every one).
    pub auth_log: [crate::lograte::LogEvery; crate::auth::Refusal::ALL.len()],
}

impl Core {
    /// Handles a batch of mail from another core.
    pub fn handle_mail(&mut self, batch: Vec<Mail>) {
        for mail in batch {
            self.handle_one(mail);
        }
        self.kick_committer();
    }

    pub fn handle_one(&mut self, mail: Mail) {
        let Core { shard, edge, .. } = self;
        let result = match mail {
            Mail::Send {
                reply,
                sender,
                msg_id,
                to,
                sent_ms,
                body,
            } => shard.send(
                SendRequest {
                    reply,
                    sender: &sender,
                    msg_id,
                    to: &to,
                    sent_ms,
                    body,
                },
                edge,
            ),
            Mail::Login { conn, user } => {
                shard.login(conn, &user, edge);
                Ok(())
            }
            Mail::Ack { user, seq } => shard.ack(&user, seq, edge),
            Mail::Rewind { conn, user, seq } => {
                shard.rewind(conn, &user, seq);
                Ok(())
            }
            Mail::Resume { conn, user } => {
                shard.resume(conn, &user, edge);
                Ok(())
            }
            Mail::Logout { conn, user } => {
                shard.logout(conn, &user);
                Ok(())
            }
            Mail::Sync { conn, nonce } => {
                // Mail from one core arrives in order: the ACKs before it are applied.
                edge.pong(conn, nonce);
                Ok(())
            }
            Mail::LinkClosed { core, link } => {
                let cleared = shard.forget_link(core, link);
                tracing::debug!(core, link, cleared, "edge link closed: presence forgotten");
                Ok(())
            }
            Mail::AdoptReplica { .. } => {
                unreachable!("replica streams are adopted by the mesh receiver")
            }
            answer => {
                edge.receive(answer);
                Ok(())
            }
        };
        if let Err(e) = result {
            crate::runtime::fatal_if_poisoned(&e);
        }
    }

    /// New records: wake the committer (group commit) and the replica
    /// stream writer (records go out in parallel with the local fsync).
    pub fn kick_committer(&mut self) {
        self.route_edge_mail();
        if self.shard.exists() && self.shard.needs_sync() {
            if let Some(w) = self.commit_waker.take() {
                w.wake();
            }
            if let Some(w) = self.repl.writer_waker.take() {
                w.wake();
            }
        }
    }

    /// Routes a validated SEND from a local connection to the recipient's shard.
    pub fn route_send(
        &mut self,
        reply: ConnRef,
        sender: &str,
        msg_id: MsgId,
        to: &str,
        body: &[u8],
    ) {
        let sent_ms = wall_ms(); // for people: never a deadline
        let remote = self.edge.remote.as_mut().and_then(|links| {
            let pair = links.send_pair(to)?;
            Some((links, pair))
        });
        if let Some((links, pair)) = remote {
            let msg = crate::link_proto::Msg::Send {
                conn: link_conn(reply),
                msg_id,
                sent_ms,
                sender,
                to,
                body,
            };
            links.push_send(pair, &msg);
            return;
        }
        let dest = self.edge.shard_of(to);
        if dest == self.edge.id {
            let req = SendRequest {
                reply,
                sender,
                msg_id,
                to,
                sent_ms,
                body: body.into(),
            };
            if let Err(e) = self.shard.send(req, &mut self.edge) {
                crate::runtime::fatal_if_poisoned(&e);
            }
        } else {
            let mail = Mail::Send {
                reply,
                sender: sender.into(),
                msg_id,
                to: to.into(),
                sent_ms,
                body: body.into(),
            };
            self.edge.post(dest, mail);
        }
    }

    /// The links and the pair, when `user` belongs to another core pair.
    fn remote_for(&mut self, user: &str) -> Option<(&mut crate::route::Links, u16)> {
        let links = self.edge.remote.as_mut()?;
        let pair = links.remote_pair(user)?;
        Some((links, pair))
    }

    pub fn route_login(&mut self, conn: ConnRef, user: &str) {
        if let Some((links, pair)) = self.remote_for(user) {
            let conn = link_conn(conn);
            links.push(pair, &crate::link_proto::Msg::Login { conn, user });
            return;
        }
        let dest = self.edge.shard_of(user);
        if dest == self.edge.id {
            self.shard.login(conn, user, &mut self.edge);
        } else {
            self.edge.post(
                dest,
                Mail::Login {
                    conn,
                    user: user.into(),
                },
            );
        }
    }

    pub fn route_ack(&mut self, user: &str, seq: u64) {
        if let Some((links, pair)) = self.remote_for(user) {
            links.push(pair, &crate::link_proto::Msg::Ack { seq, user });
            return;
        }
        let dest = self.edge.shard_of(user);
        if dest == self.edge.id {
            if let Err(e) = self.shard.ack(user, seq, &mut self.edge) {
                crate::runtime::fatal_if_poisoned(&e);
            }
        } else {
            self.edge.post(
                dest,
                Mail::Ack {
                    user: user.into(),
                    seq,
                },
            );
        }
    }

    /// A PING after an ACK: PONG once the ACK took effect on the user's
    /// shard, so a client that ACKs, PINGs and reconnects is never sent the
    /// acknowledged messages again (docs/PROTOCOL.md, PING). Mail between two
    /// cores, and requests on one link, keep their order.
    pub fn route_sync(&mut self, conn: ConnRef, user: &str, nonce: u64) {
        if let Some((links, pair)) = self.remote_for(user) {
            let lconn = link_conn(conn);
            if !links.push_sync(pair, lconn, nonce, user) {
                // At the bound of PINGs waiting: answered now, unordered.
                self.edge
                    .write_frame(conn.slot, &ServerFrame::Pong { nonce });
            }
            return;
        }
        let dest = self.edge.shard_of(user);
        if dest == self.edge.id {
            // ACKs to this core's shard are applied as they are read.
            self.edge.pong(conn, nonce);
        } else {
            self.edge.post(dest, Mail::Sync { conn, nonce });
        }
    }

    pub fn route_logout(&mut self, conn: ConnRef, user: &str) {
        if let Some((links, pair)) = self.remote_for(user) {
            let conn = link_conn(conn);
            links.push(pair, &crate::link_proto::Msg::Logout { conn, user });
            return;
        }
        let dest = self.edge.shard_of(user);
        if dest == self.edge.id {
            self.shard.logout(conn, user);
        } else {
            self.edge.post(
                dest,
                Mail::Logout {
                    conn,
                    user: user.into(),
                },
            );
        }
    }

    /// Sends the edge's Rewind/Resume mail to the users' shards.
    pub fn route_edge_mail(&mut self) {
        while let Some(mail) = self.edge.pending_local.pop_front() {
            let user = match &mail {
                Mail::Rewind { user, .. } | Mail::Resume { user, .. } => user.clone(),
                _ => unreachable!("only Rewind and Resume are raised by the edge"),
            };
            if let Some((links, pair)) = self.remote_for(&user) {
                let msg = match &mail {
                    Mail::Rewind { conn, seq, .. } => crate::link_proto::Msg::Rewind {
                        conn: link_conn(*conn),
                        seq: *seq,
                        user: &user,
                    },
                    Mail::Resume { conn, .. } => crate::link_proto::Msg::Resume {
                        conn: link_conn(*conn),
                        user: &user,
                    },
                    _ => unreachable!("matched above"),
                };
                links.push(pair, &msg);
                continue;
            }
            let dest = self.edge.shard_of(&user);
            if dest == self.edge.id {
                self.handle_one(mail);
            } else {
                self.edge.post(dest, mail);
            }
        }
    }

    /// An edge's link on this core closed: every shard of the node forgets
    /// its connections' presence (no delivery can reach a later link that
    /// reuses the id).
    pub fn link_closed(&mut self, link: u16) {
        self.edge.links_in.remove(&link);
        let core = self.edge.id;
        if self.shard.exists() {
            self.handle_one(Mail::LinkClosed { core, link });
        }
        for dest in 0..self.edge.nr_cores as u16 {
            if dest != core {
                self.edge.post(dest, Mail::LinkClosed { core, link });
            }
        }
    }

    /// A REJECTED the edge gives itself (bad recipient, too large) without a shard.
    pub fn reject_here(&mut self, index: u32, msg_id: MsgId, code: u16, reason: &str) {
        self.edge.count_rejected(code);
        self.edge.write_frame(
            index,
            &ServerFrame::Rejected {
                msg_id,
                code,
                reason,
            },
        );
    }
}

/// DELIVER's bytes besides `from` and the body: type, seq, msg_id, from's length, sent_ms.
const DELIVER_OVERHEAD: usize = 1 + 8 + 16 + 1 + 8;

/// The shard (core) of a node with `nr_cores` that holds `slot`: slots
/// spread evenly over shards.
pub fn shard_of_slot(slot: u16, nr_cores: usize) -> u16 {
    (usize::from(slot) * nr_cores / usize::from(net::SLOT_COUNT)) as u16
}

/// REJECTED codes the edge decides on its own. A body is too large above
/// body_len_max, or when its DELIVER (which adds the sender id) would exceed
/// max_frame: a message is stored only if it can be delivered.
pub fn precheck_send(
    sender: &str,
    to: &str,
    body_len: usize,
    edge: &Edge,
) -> Option<(u16, &'static str)> {
    if !net::valid_user_id(to, &edge.net_limits) {
        Some((reject_code::BAD_RECIPIENT, "bad recipient id"))
    } else if body_len > edge.limits.body_len_max as usize
        || DELIVER_OVERHEAD + sender.len() + body_len > edge.limits.frame_len_max as usize
    {
        Some((reject_code::TOO_LARGE, "body too large"))
    } else {
        None
    }
}
