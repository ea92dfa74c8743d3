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
    /// A core node's own pair: its users are served by the local shards.
    pub own_pair: Option<u16>,
    /// This process's name in link HELLOs (the node or edge name).
    pub name: std::rc::Rc<str>,
    pub pairs: Vec<PairRoute>,
    bytes: usize,
}

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
        Links {
            cluster,
            slots,
            own_pair,
            name: name.into(),
            pairs,
            bytes: 0,
        }
    }

    /// The remote pair owning `user`, or None when it is served here.
    pub fn remote_pair(&self, user: &str) -> Option<u16> {
        let pair = self.slots.owner_of(user);
        (Some(pair) != self.own_pair).then_some(pair)
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
        let best = p
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, v)| v.up && v.primary)
            .max_by_key(|(_, v)| v.epoch)
            .map(|(i, _)| i);
        // A node that went down takes its session with it even if it comes back.
        let lost = !up && p.active == Some(node);
        if best == p.active && !lost {
            return false;
        }
        p.active = best;
        p.session += 1;
        p.written_below = 0;
        let activated = best.is_some();
        if activated {
            self.wake_active(pair);
        }
        activated
    }

    /// Places re-registration requests ahead of everything queued for `pair`.
    pub fn prepend(&mut self, pair: u16, frames: Vec<u8>) {
        let p = &mut self.pairs[pair as usize];
        self.bytes += frames.len();
        let rest = std::mem::replace(&mut p.out, frames);
        p.out.extend_from_slice(&rest);
    }

    /// What node `node`'s writer sends next: queued control requests, then
    /// the SENDs not yet written in this session. None if the node is not
    /// the pair's active one or nothing waits.
    pub fn take_batch(&mut self, pair: u16, node: usize, batch_max: usize) -> Option<Vec<u8>> {
        let p = &mut self.pairs[pair as usize];
        if p.active != Some(node) {
            return None;
        }
        let mut batch = std::mem::take(&mut p.out);
        self.bytes -= batch.len();
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
            && (!p.out.is_empty() || p.sends.range(p.written_below..).next().is_some())
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
        let slots = std::sync::Arc::new(crate::slots::SlotTable::new(&spec.slot_map));
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
}
