//! An edge core's view of the other core pairs: which pair owns a user, which
//! node of each pair is its primary now, and the requests on their way
//! there. Sans-IO: engine::link's tasks carry the bytes; this holds what
//! must survive a failover (every SEND not yet answered, in order, is sent
//! again to the new primary; msg_id dedup makes that safe).

use crate::cluster::Cluster;
use crate::link_proto::{self as proto, Conn, Msg};
use net::MsgId;
use std::collections::{BTreeMap, HashMap};
use std::task::Waker;

/// Bytes of requests one core holds for remote pairs (control requests not
/// yet written plus every SEND not yet answered). At the bound, client
/// connections pause reading (as when the core mesh is full).
pub const REQUEST_BYTES_PER_CORE_MAX: usize = 32 << 20;

/// Client PINGs one core holds per pair while their SYNC is on its way (a
/// PING after an ACK; engine::core::Core::route_sync). Beyond it a PING is
/// answered at once, without waiting for the ACK.
pub const SYNCS_PER_PAIR_MAX: usize = 4096;

#[derive(Debug, Default)]
pub struct NodeView {
    /// A link to the node is open and welcomed.
    pub up: bool,
    pub primary: bool,
    pub epoch: u64,
    /// The node's link writer, waiting for requests or a role change.
    pub waker: Option<Waker>,
}

#[derive(Debug, Default)]
pub struct PairRoute {
    /// Encoded control requests (LOGIN, ACK, LOGOUT, REWIND, RESUME) not yet written.
    pub out: Vec<u8>,
    /// Unanswered SENDs, encoded, by arrival order.
    sends: BTreeMap<u64, Box<[u8]>>,
    /// Its order, and how many SENDs of the connection carry that msg_id
    /// (each gets an answer, as from a single node's dedup).
    send_index: HashMap<(Conn, MsgId), (u64, u32), ahash::RandomState>,
    next_send: u64,
    /// SENDs ordered below this were written to the active node.
    written_below: u64,
    sends_bytes: usize,
    pub nodes: Vec<NodeView>,
    /// The node requests go to: up, primary, highest epoch.
    pub active: Option<usize>,
    /// Changes whenever `active` does.
    pub session: u64,
    /// PINGs waiting for SYNCED, as (connection, nonce).
    syncs: Vec<(Conn, u64)>,
    /// SENDs (by order) the active node answered RETRY in this session:
    /// written again when it tells a slot decision for their recipients
    /// (a pair taking a range over answers RETRY until its log has the
    /// decision committed, then tells it), or with everything at the next
    /// session.
    retried: std::collections::BTreeSet<u64>,
    /// Retried SENDs (by order, below `written_below`; keys of `sends`, so
    /// bounded with them) whose slot decision the pair told: written again
    /// in this session, in order, ahead of the SENDs not yet written. They
    /// keep their order: a later SEND of the same connection to the same
    /// user may have been written after them and still be unanswered, and
    /// must stay behind them when the range's SENDs are taken
    /// (`take_sends_in`) or written again.
    again: std::collections::BTreeSet<u64>,
    /// With etcd: the epoch of the pair's leader key as last watched; a
    /// node announcing a lower epoch is stale and gets no request.
    pub elected: u64,
}

impl PairRoute {
    fn bytes(&self) -> usize {
        self.out.len() + self.sends_bytes
    }

    pub fn unanswered(&self) -> usize {
        self.sends.len()
    }
}

pub struct Links {
    pub cluster: Cluster,
    /// Who serves each slot now (the cluster file's map changed by moves).
    pub slots: std::sync::Arc<crate::slots::SlotTable>,
    /// A core node's own log's decisions (engine::slots::Ownership): its
    /// own shards serve a slot only when these say so.
    own_slots: Option<std::sync::Arc<crate::slots::SlotTable>>,
    /// A core node's own pair: its users are served by the local shards.
    pub own_pair: Option<u16>,
    /// This process's name in link HELLOs (the node or edge name).
    pub name: std::rc::Rc<str>,
    pub pairs: Vec<PairRoute>,
    bytes: usize,
    /// Per slot, where its SENDs and its other requests went when this core
    /// last re-homed (`route_of`): a slot decision that changes it re-homes
    /// the slot's requests (engine::link::rehome).
    routed: Box<[u32]>,
    /// `slots.changes()` when `routed` was last brought up to date.
    seen_changes: u64,
    /// With etcd (edges): each pair's leader epoch, as the watch thread
    /// (engine::pilot::spawn_edge_watch) last read it.
    elected: Option<std::sync::Arc<[std::sync::atomic::AtomicU64]>>,
}

/// `Links::route_of` for a slot served by this node's own pair.
const LOCAL: u32 = 0xFFFF;

impl Links {
    pub fn new(
        cluster: Cluster,
        slots: std::sync::Arc<crate::slots::SlotTable>,
        own_pair: Option<u16>,
        name: &str,
    ) -> Links {
        let pairs = cluster
            .pairs
            .iter()
            .map(|p| PairRoute {
                nodes: p.nodes.iter().map(|_| NodeView::default()).collect(),
                ..PairRoute::default()
            })
            .collect();
        let mut links = Links {
            cluster,
            slots,
            own_slots: None,
            own_pair,
            name: name.into(),
            pairs,
            bytes: 0,
            routed: Box::default(),
            seen_changes: 0,
            elected: None,
        };
        links.seen_changes = links.changes();
        links.routed = (0..net::SLOT_COUNT).map(|s| links.route_of(s)).collect();
        links
    }

    /// An edge with etcd: follows the pairs' leader epochs (`follow_elected`).
    pub fn with_elected(
        mut self,
        elected: std::sync::Arc<[std::sync::atomic::AtomicU64]>,
    ) -> Links {
        self.elected = Some(elected);
        self
    }

    /// Takes the leader epochs the etcd watch saw: pairs whose requests now
    /// go to another node, and whether that node is up (re-register there).
    pub fn follow_elected(&mut self) -> Vec<(u16, bool)> {
        let Some(table) = self.elected.clone() else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        for (pair, epoch) in table.iter().enumerate() {
            let epoch = epoch.load(std::sync::atomic::Ordering::Relaxed);
            if let Some(p) = self.pairs.get_mut(pair) {
                if epoch > p.elected {
                    p.elected = epoch;
                    let before = p.active;
                    let activated = self.choose(pair as u16, false);
                    if self.pairs[pair].active != before {
                        changed.push((pair as u16, activated));
                    }
                }
            }
        }
        changed
    }

    /// A core node's: its own log's decisions decide what its shards serve.
    pub fn with_own_slots(mut self, own: std::sync::Arc<crate::slots::SlotTable>) -> Links {
        self.own_slots = Some(own);
        self.seen_changes = self.changes();
        self.routed = (0..net::SLOT_COUNT).map(|s| self.route_of(s)).collect();
        self
    }

    fn changes(&self) -> u64 {
        self.slots.changes() + self.own_slots.as_ref().map_or(0, |o| o.changes())
    }

    /// Who serves `slot` as far as this core routes: the routing table, but
    /// on a core node its own log decides whether its own pair serves it (a
    /// decision heard from others that gives this pair a range waits for
    /// its own log; meanwhile the range's old owner keeps its requests).
    fn state(&self, slot: u16) -> crate::slots::SlotState {
        let heard = self.slots.get(slot);
        let (Some(own), Some(me)) = (&self.own_slots, self.own_pair) else {
            return heard;
        };
        let logged = own.get(slot);
        if logged.owner == me || heard.owner == me {
            logged
        } else {
            heard
        }
    }

    /// Where slot `slot`'s SENDs go (high half) and its other requests (low
    /// half): a pair, or LOCAL.
    fn route_of(&self, slot: u16) -> u32 {
        let state = self.state(slot);
        let owner = if Some(state.owner) == self.own_pair {
            LOCAL
        } else {
            u32::from(state.owner)
        };
        let send = match state.handoff_to {
            Some(to) if owner == LOCAL => u32::from(to),
            _ => owner,
        };
        (send << 16) | owner
    }

    /// The slot ranges whose routing changed since the last call (a slot
    /// decision was applied), coalesced; the view is brought up to date.
    pub fn changed_ranges(&mut self) -> Vec<(u16, u16)> {
        let changes = self.changes();
        if changes == self.seen_changes {
            return Vec::new();
        }
        self.seen_changes = changes;
        let mut ranges: Vec<(u16, u16)> = Vec::new();
        for slot in 0..net::SLOT_COUNT {
            let now = self.route_of(slot);
            if self.routed[usize::from(slot)] == now {
                continue;
            }
            self.routed[usize::from(slot)] = now;
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == slot => *last = slot,
                _ => ranges.push((slot, slot)),
            }
        }
        ranges
    }

    /// The remote pair owning `user`, or None when it is served here.
    pub fn remote_pair(&self, user: &str) -> Option<u16> {
        let pair = self.state(net::slot_of(user)).owner;
        (Some(pair) != self.own_pair).then_some(pair)
    }

    /// Where a SEND to `user` goes: as `remote_pair`, except that a core
    /// node handing the user's slot off sends it to the pair taking it over
    /// (which keeps it, answering RETRY, until it owns the slot).
    pub fn send_pair(&self, user: &str) -> Option<u16> {
        let state = self.state(net::slot_of(user));
        match state.handoff_to {
            Some(to) if Some(state.owner) == self.own_pair => Some(to),
            _ => (Some(state.owner) != self.own_pair).then_some(state.owner),
        }
    }

    /// Takes every unanswered SEND to a user of slots first..=last out of
    /// every pair's queue, in each queue's order, with how many answers each
    /// is owed: a slot decision sends them to the pair serving them now.
    pub fn take_sends_in(&mut self, first: u16, last: u16) -> Vec<(Box<[u8]>, u32)> {
        let mut taken = Vec::new();
        for p in &mut self.pairs {
            let found: Vec<(u64, Conn, MsgId)> = p
                .sends
                .iter()
                .filter_map(|(&order, frame)| match proto::decode(frame) {
                    Ok(Some((
                        Msg::Send {
                            conn, msg_id, to, ..
                        },
                        _,
                    ))) if (first..=last).contains(&net::slot_of(to)) => {
                        Some((order, conn, msg_id))
                    }
                    _ => None,
                })
                .collect();
            for (order, conn, msg_id) in found {
                p.retried.remove(&order);
                p.again.remove(&order);
                let frame = p.sends.remove(&order).expect("listed");
                let copies = p
                    .send_index
                    .remove(&(conn, msg_id))
                    .map_or(1, |(_, copies)| copies);
                p.sends_bytes -= frame.len();
                self.bytes -= frame.len();
                taken.push((frame, copies));
            }
        }
        taken
    }

    /// The active node of `pair` answered a SEND RETRY: kept, to be written
    /// again (`rewrite_retried_in`, or at the next session).
    pub fn retried(&mut self, pair: u16, conn: Conn, msg_id: MsgId) {
        let p = &mut self.pairs[pair as usize];
        if let Some(&(order, _)) = p.send_index.get(&(conn, msg_id)) {
            p.retried.insert(order);
        }
    }

    /// `pair` told a slot decision for first..=last: its SENDs to those
    /// slots' users that it answered RETRY are written to it again, in
    /// their order (`again`).
    pub fn rewrite_retried_in(&mut self, pair: u16, first: u16, last: u16) -> usize {
        let p = &mut self.pairs[pair as usize];
        let orders: Vec<u64> = p
            .retried
            .iter()
            .copied()
            .filter(|order| match p.sends.get(order).map(|f| proto::decode(f)) {
                Some(Ok(Some((Msg::Send { to, .. }, _)))) => {
                    (first..=last).contains(&net::slot_of(to))
                }
                _ => false,
            })
            .collect();
        for &order in &orders {
            p.retried.remove(&order);
            p.again.insert(order);
        }
        if !orders.is_empty() {
            self.wake_active(pair);
        }
        orders.len()
    }

    /// Queues a SEND frame taken by `take_sends_in` for `pair`, owed
    /// `copies` answers.
    pub fn push_send_frame(&mut self, pair: u16, frame: Box<[u8]>, copies: u32) {
        let Ok(Some((Msg::Send { conn, msg_id, .. }, _))) = proto::decode(&frame) else {
            unreachable!("a SEND frame")
        };
        let p = &mut self.pairs[pair as usize];
        if let Some((_, owed)) = p.send_index.get_mut(&(conn, msg_id)) {
            *owed += copies;
            return;
        }
        let order = p.next_send;
        p.next_send += 1;
        p.send_index.insert((conn, msg_id), (order, copies));
        p.sends_bytes += frame.len();
        self.bytes += frame.len();
        p.sends.insert(order, frame);
        self.wake_active(pair);
    }

    pub fn full(&self) -> bool {
        self.bytes >= REQUEST_BYTES_PER_CORE_MAX
    }

    fn wake_active(&mut self, pair: u16) {
        let p = &mut self.pairs[pair as usize];
        if let Some(n) = p.active {
            if let Some(w) = p.nodes[n].waker.take() {
                w.wake();
            }
        }
    }

    /// Queues a control request for `pair`.
    pub fn push(&mut self, pair: u16, msg: &Msg<'_>) {
        let p = &mut self.pairs[pair as usize];
        let before = p.out.len();
        proto::encode(msg, &mut p.out);
        self.bytes += p.out.len() - before;
        self.wake_active(pair);
    }

    /// Queues a SEND; it stays until STORED or REJECTED comes back.
    pub fn push_send(&mut self, pair: u16, msg: &Msg<'_>) {
        let Msg::Send { conn, msg_id, .. } = msg else {
            unreachable!("push_send takes SENDs")
        };
        let p = &mut self.pairs[pair as usize];
        if let Some((_, copies)) = p.send_index.get_mut(&(*conn, *msg_id)) {
            // The client reused a msg_id still unanswered: the first copy
            // stands (a node's dedup would store only it too), and its
            // answer is given once per copy.
            *copies += 1;
            return;
        }
        let mut frame = Vec::new();
        proto::encode(msg, &mut frame);
        let order = p.next_send;
        p.next_send += 1;
        p.send_index.insert((*conn, *msg_id), (order, 1));
        p.sends_bytes += frame.len();
        self.bytes += frame.len();
        p.sends.insert(order, frame.into_boxed_slice());
        self.wake_active(pair);
    }

    /// Queues a SYNC (a PING after an ACK) behind the connection's ACK.
    /// False at `SYNCS_PER_PAIR_MAX`: the caller answers the PING itself.
    pub fn push_sync(&mut self, pair: u16, conn: Conn, nonce: u64, user: &str) -> bool {
        if self.pairs[pair as usize].syncs.len() >= SYNCS_PER_PAIR_MAX {
            return false;
        }
        self.pairs[pair as usize].syncs.push((conn, nonce));
        self.push(pair, &Msg::Sync { conn, nonce, user });
        true
    }

    /// SYNCED came back: true when that PING was waiting (its PONG is due).
    pub fn synced(&mut self, pair: u16, conn: Conn, nonce: u64) -> bool {
        let syncs = &mut self.pairs[pair as usize].syncs;
        match syncs.iter().position(|&s| s == (conn, nonce)) {
            Some(at) => {
                syncs.remove(at);
                true
            }
            None => false,
        }
    }

    /// Every PING waiting for SYNCED from `pair` (the primary changed).
    pub fn take_syncs(&mut self, pair: u16) -> Vec<(Conn, u64)> {
        std::mem::take(&mut self.pairs[pair as usize].syncs)
    }

    /// A SEND was answered (STORED or REJECTED): how many of the
    /// connection's SENDs the answer is for (0: none waited, an answer from
    /// a superseded session, already given).
    pub fn answered(&mut self, pair: u16, conn: Conn, msg_id: MsgId) -> u32 {
        let p = &mut self.pairs[pair as usize];
        let Some((order, copies)) = p.send_index.remove(&(conn, msg_id)) else {
            return 0;
        };
        p.retried.remove(&order);
        p.again.remove(&order);
        if let Some(bytes) = p.sends.remove(&order) {
            p.sends_bytes -= bytes.len();
            self.bytes -= bytes.len();
        }
        copies
    }

    /// A node's link state changed. True when the pair's active node changed
    /// to a node (the caller re-registers the logins of that pair's users
    /// there, ahead of every queued request); every unanswered SEND will be
    /// written again.
    pub fn set_node(
        &mut self,
        pair: u16,
        node: usize,
        up: bool,
        primary: bool,
        epoch: u64,
    ) -> bool {
        let p = &mut self.pairs[pair as usize];
        let v = &mut p.nodes[node];
        v.up = up;
        v.primary = primary;
        v.epoch = if up { epoch.max(v.epoch) } else { v.epoch };
        // A node that went down takes its session with it even if it comes back.
        let lost = !up && p.active == Some(node);
        self.choose(pair, lost)
    }

    /// Picks the pair's active node: up, primary, highest epoch, and not
    /// below the epoch etcd elected. True when a node was (re)activated.
    fn choose(&mut self, pair: u16, lost: bool) -> bool {
        let p = &mut self.pairs[pair as usize];
        let elected = p.elected;
        let best = p
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, v)| v.up && v.primary && v.epoch >= elected)
            .max_by_key(|(_, v)| v.epoch)
            .map(|(i, _)| i);
        if best == p.active && !lost {
            return false;
        }
        p.active = best;
        p.session += 1;
        p.written_below = 0;
        p.retried.clear();
        p.again.clear();
        let activated = best.is_some();
        if activated {
            self.wake_active(pair);
        }
        activated
    }

    /// Queues encoded control requests for `pair`, after those queued.
    pub fn push_frames(&mut self, pair: u16, frames: Vec<u8>) {
        self.bytes += frames.len();
        self.pairs[pair as usize].out.extend_from_slice(&frames);
        self.wake_active(pair);
    }

    /// Places re-registration requests ahead of everything queued for `pair`.
    pub fn prepend(&mut self, pair: u16, frames: Vec<u8>) {
        let p = &mut self.pairs[pair as usize];
        self.bytes += frames.len();
        let rest = std::mem::replace(&mut p.out, frames);
        p.out.extend_from_slice(&rest);
    }

    /// What node `node`'s writer sends next: queued control requests, the
    /// SENDs to write again (`again`), then the SENDs not yet written in
    /// this session. None if the node is not the pair's active one or
    /// nothing waits.
    pub fn take_batch(&mut self, pair: u16, node: usize, batch_max: usize) -> Option<Vec<u8>> {
        let p = &mut self.pairs[pair as usize];
        if p.active != Some(node) {
            return None;
        }
        let mut batch = std::mem::take(&mut p.out);
        self.bytes -= batch.len();
        while batch.len() < batch_max {
            let Some(order) = p.again.pop_first() else {
                break;
            };
            let frame = p.sends.get(&order).expect("`again` holds unanswered SENDs");
            batch.extend_from_slice(frame);
        }
        for (&order, frame) in p.sends.range(p.written_below..) {
            if batch.len() >= batch_max {
                break;
            }
            batch.extend_from_slice(frame);
            p.written_below = order + 1;
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Whether node `node`'s writer has work (see `take_batch`).
    pub fn has_batch(&self, pair: u16, node: usize) -> bool {
        let p = &self.pairs[pair as usize];
        p.active == Some(node)
            && (!p.out.is_empty()
                || !p.again.is_empty()
                || p.sends.range(p.written_below..).next().is_some())
    }

    pub fn bytes(&self) -> usize {
        debug_assert_eq!(
            self.bytes,
            self.pairs.iter().map(PairRoute::bytes).sum::<usize>()
        );
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{render_local, ClusterSpec};

    fn links() -> Links {
        let mut port = 30000;
        let text = render_local(2, &mut || {
            port += 1;
            port
        });
        let spec = ClusterSpec::parse(&text).unwrap();
        let slots = std::sync::Arc::new(crate::slots::SlotTable::new(
            &spec.slot_map,
            spec.pairs.len(),
        ));
        Links::new(spec.instance(), slots, Some(0), "e")
    }

    fn send(n: u8) -> (Conn, MsgId, Vec<u8>) {
        let conn = Conn {
            slot: 1,
            generation: 1,
        };
        let msg = Msg::Send {
            conn,
            msg_id: [n; 16],
            sent_ms: 1,
            sender: "a",
            to: "b",
            body: b"x",
        };
        let mut frame = Vec::new();
        proto::encode(&msg, &mut frame);
        (conn, [n; 16], frame)
    }

    fn push(l: &mut Links, n: u8) {
        let conn = Conn {
            slot: 1,
            generation: 1,
        };
        l.push_send(
            1,
            &Msg::Send {
                conn,
                msg_id: [n; 16],
                sent_ms: 1,
                sender: "a",
                to: "b",
                body: b"x",
            },
        );
    }

    #[test]
    fn unanswered_sends_are_written_again_in_order_after_a_failover() {
        let mut l = links();
        push(&mut l, 1);
        push(&mut l, 2);
        // No primary yet: nothing goes out, everything is kept.
        assert_eq!(l.take_batch(1, 0, 1 << 20), None);
        assert!(l.set_node(1, 0, true, true, 1));
        let (_, _, f1) = send(1);
        let (c2, id2, f2) = send(2);
        assert_eq!(
            l.take_batch(1, 0, 1 << 20),
            Some([f1.clone(), f2.clone()].concat())
        );
        assert_eq!(
            l.take_batch(1, 0, 1 << 20),
            None,
            "written once per session"
        );
        assert_eq!(l.answered(1, c2, id2), 1);
        assert_eq!(
            l.answered(1, c2, id2),
            0,
            "a second answer is not forwarded"
        );
        // The primary dies; the replica is promoted with a higher epoch.
        assert!(!l.set_node(1, 0, false, false, 0));
        assert!(l.set_node(1, 1, true, true, 2));
        assert_eq!(
            l.take_batch(1, 0, 1 << 20),
            None,
            "only the active node writes"
        );
        assert_eq!(
            l.take_batch(1, 1, 1 << 20),
            Some(f1),
            "SEND 1 is resent, 2 was answered"
        );
    }

    #[test]
    fn a_node_below_the_epoch_etcd_elected_gets_no_request() {
        let table: std::sync::Arc<[std::sync::atomic::AtomicU64]> = (0..2)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        let mut l = links().with_elected(table.clone());
        assert!(l.set_node(1, 0, true, true, 5));
        // etcd elected epoch 9 (node 1); node 0 still says primary at 5.
        table[1].store(9, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(l.follow_elected(), vec![(1, false)]);
        assert_eq!(l.pairs[1].active, None, "the stale primary is dropped");
        assert!(!l.set_node(1, 0, true, true, 5), "and stays dropped");
        assert!(
            l.set_node(1, 1, true, true, 9),
            "the elected one takes over"
        );
        assert_eq!(l.pairs[1].active, Some(1));
        assert!(l.follow_elected().is_empty(), "nothing new");
    }

    #[test]
    fn the_highest_epoch_primary_wins_and_bytes_are_counted() {
        let mut l = links();
        assert!(l.set_node(1, 0, true, true, 5));
        assert!(
            !l.set_node(1, 1, true, false, 5),
            "a replica never becomes active"
        );
        assert!(
            l.set_node(1, 1, true, true, 6),
            "a promotion moves the traffic"
        );
        assert_eq!(l.pairs[1].active, Some(1));
        push(&mut l, 1);
        assert!(l.bytes() > 0);
        let (c, id, _) = send(1);
        l.take_batch(1, 1, 1 << 20);
        assert_eq!(l.answered(1, c, id), 1);
        assert_eq!(l.bytes(), 0);
        // A msg_id reused while unanswered: one frame, two answers.
        push(&mut l, 2);
        push(&mut l, 2);
        let (_, _, f2) = send(2);
        assert_eq!(l.take_batch(1, 1, 1 << 20), Some(f2));
        let (c2, id2, _) = send(2);
        assert_eq!(l.answered(1, c2, id2), 2);
        assert_eq!(l.bytes(), 0);
        assert_eq!(
            l.remote_pair("anyone-on-pair-0").is_none(),
            l.cluster.pair_of("anyone-on-pair-0") == 0
        );
    }

    #[test]
    fn a_slot_decision_takes_the_ranges_unanswered_sends_with_their_answers_owed() {
        let mut l = links();
        let slot_b = net::slot_of("b");
        push(&mut l, 1);
        push(&mut l, 2);
        push(&mut l, 2); // a reused msg_id: two answers owed
        assert!(l.set_node(1, 0, true, true, 1));
        assert!(l.take_batch(1, 0, 1 << 20).is_some());
        if slot_b < 16383 {
            assert!(
                l.take_sends_in(slot_b + 1, 16383).is_empty(),
                "another range"
            );
        }
        let taken = l.take_sends_in(slot_b, slot_b);
        assert_eq!(
            taken.iter().map(|(_, copies)| *copies).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(l.bytes(), 0);
        assert_eq!(l.pairs[1].unanswered(), 0);
        // Pair 0 takes them over (here: back to pair 1, written again).
        for (frame, copies) in taken {
            l.push_send_frame(1, frame, copies);
        }
        let (_, _, f1) = send(1);
        let (c2, id2, f2) = send(2);
        assert_eq!(l.take_batch(1, 0, 1 << 20), Some([f1, f2].concat()));
        assert_eq!(l.answered(1, c2, id2), 2);
        // A handoff: a core node of the owner sends the slot's SENDs to the taker.
        l.slots.apply(&crate::record::SlotsRecord {
            version: 1,
            first: slot_b,
            last: slot_b,
            owner: 0,
            handoff_to: Some(1),
        });
        assert_eq!(l.send_pair("b"), Some(1));
        assert_eq!(
            l.remote_pair("b"),
            None,
            "logins and ACKs stay with the owner"
        );
        assert_eq!(l.changed_ranges(), vec![(slot_b, slot_b)]);
        assert_eq!(l.changed_ranges(), vec![], "once");
        l.slots.apply(&crate::record::SlotsRecord {
            version: 1,
            first: slot_b,
            last: slot_b,
            owner: 0,
            handoff_to: Some(1),
        });
        assert_eq!(
            l.changed_ranges(),
            vec![],
            "the same decision again changes no route"
        );
    }

    #[test]
    fn sends_answered_retry_are_written_again_when_the_pair_tells_a_decision() {
        let mut l = links();
        assert!(l.set_node(1, 0, true, true, 1));
        push(&mut l, 1);
        push(&mut l, 2);
        let (c1, id1, f1) = send(1);
        let (_, id2, f2) = send(2);
        assert!(l.take_batch(1, 0, 1 << 20).is_some());
        l.retried(1, c1, id1);
        l.retried(1, c1, id2);
        let slot_b = net::slot_of("b");
        let other = if slot_b == 0 { 1 } else { 0 };
        assert_eq!(l.rewrite_retried_in(1, other, other), 0, "another range");
        assert_eq!(l.take_batch(1, 0, 1 << 20), None);
        assert_eq!(l.answered(1, c1, id2), 1, "2 was stored meanwhile");
        assert_eq!(l.rewrite_retried_in(1, slot_b, slot_b), 1);
        assert_eq!(l.take_batch(1, 0, 1 << 20), Some(f1), "only 1, once");
        assert_eq!(l.rewrite_retried_in(1, slot_b, slot_b), 0);
        assert_eq!(l.answered(1, c1, id1), 1);
        assert_eq!(l.bytes(), 0);
        let _ = f2;
    }

    /// The pair starts handing b's slot off between two SENDs to b of one
    /// connection: it answers 1 RETRY and tells the handoff (MOVED) before
    /// it reads 2. 1 is written again, behind 2, and both are answered
    /// RETRY; when the slot's new owner takes them, 1 must still come first
    /// (per-sender order, docs/PROTOCOL.md).
    #[test]
    fn a_send_written_again_keeps_its_place_before_later_ones() {
        let mut l = links();
        assert!(l.set_node(1, 0, true, true, 1));
        push(&mut l, 1);
        push(&mut l, 2);
        let (c, id1, f1) = send(1);
        let (_, id2, f2) = send(2);
        assert_eq!(
            l.take_batch(1, 0, 1 << 20),
            Some([f1.clone(), f2.clone()].concat())
        );
        let slot_b = net::slot_of("b");
        l.retried(1, c, id1);
        assert_eq!(
            l.rewrite_retried_in(1, slot_b, slot_b),
            1,
            "the handoff told"
        );
        assert_eq!(l.take_batch(1, 0, 1 << 20), Some(f1.clone()), "1 again");
        l.retried(1, c, id2);
        l.retried(1, c, id1);
        // The pair tells the decision again: both, in the order they came.
        assert_eq!(l.rewrite_retried_in(1, slot_b, slot_b), 2);
        assert_eq!(
            l.take_batch(1, 0, 1 << 20),
            Some([f1.clone(), f2.clone()].concat())
        );
        // The new owner takes the range over: 1 first.
        l.retried(1, c, id1);
        l.retried(1, c, id2);
        let taken: Vec<Box<[u8]>> = l
            .take_sends_in(slot_b, slot_b)
            .into_iter()
            .map(|(frame, _)| frame)
            .collect();
        assert_eq!(taken, vec![f1.into(), f2.into()]);
        assert_eq!(l.bytes(), 0);
    }
}
