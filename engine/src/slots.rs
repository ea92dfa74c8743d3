//! Who serves each of the 16384 slots now: the cluster file's slot map
//! (version 0) changed by slot moves (`iris admin move-slots`,
//! docs/CLUSTER.md). One table per process, shared by its cores: a core
//! node learns moves from SLOTS records in shard 0's log (its own, replayed
//! or replicated); an edge from MOVED on its node links.
//!
//! A move of a range from pair S to pair T at version V goes through:
//! `(V, owner S, handoff to T)`: S keeps the data but takes no SENDs for
//! the range; then `(V, owner T)`. A higher version always wins; at the same
//! version the settled state wins over the handoff, never the reverse, so
//! records and MOVED messages may arrive in any order and from any node.

use crate::record::SlotsRecord;
use std::sync::atomic::{AtomicU64, Ordering};

/// The owner of a slot, as this process knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotState {
    pub version: u32,
    pub owner: u16,
    /// The owner is handing the slot to this pair (its SENDs wait).
    pub handoff_to: Option<u16>,
}

impl SlotState {
    fn pack(self) -> u64 {
        let to = self.handoff_to.map_or(0, |t| u64::from(t) + 1);
        (u64::from(self.version) << 32) | (to << 16) | u64::from(self.owner)
    }

    fn unpack(v: u64) -> SlotState {
        let to = (v >> 16) as u16;
        SlotState {
            version: (v >> 32) as u32,
            owner: v as u16,
            handoff_to: to.checked_sub(1),
        }
    }

    /// Whether `self` supersedes `other` (see the module comment).
    fn supersedes(self, other: SlotState) -> bool {
        self.version > other.version
            || (self.version == other.version
                && other.handoff_to.is_some()
                && self.handoff_to.is_none())
    }
}

pub struct SlotTable {
    slots: Box<[AtomicU64]>,
    /// Pairs in the cluster file: a decision naming another is refused.
    pairs: u16,
    /// Counts the decisions that changed something: a node link's writer
    /// sends the decisions again when it moved.
    changes: AtomicU64,
}

impl SlotTable {
    /// The cluster file's map (of `pairs` pairs): every slot at version 0.
    pub fn new(slot_map: &[u16], pairs: usize) -> SlotTable {
        assert_eq!(slot_map.len(), usize::from(net::SLOT_COUNT));
        let pairs = u16::try_from(pairs).expect("PAIRS_MAX fits a u16");
        assert!(slot_map.iter().all(|&p| p < pairs));
        let slots = slot_map
            .iter()
            .map(|&owner| {
                AtomicU64::new(
                    SlotState {
                        version: 0,
                        owner,
                        handoff_to: None,
                    }
                    .pack(),
                )
            })
            .collect();
        SlotTable {
            slots,
            pairs,
            changes: AtomicU64::new(0),
        }
    }

    pub fn pairs(&self) -> u16 {
        self.pairs
    }

    /// Whether a decision names only pairs of the cluster file (one from a
    /// log or a link that does not is bad bytes, refused by the caller).
    pub fn valid(&self, r: &SlotsRecord) -> bool {
        r.owner < self.pairs && r.handoff_to.is_none_or(|t| t < self.pairs)
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    pub fn get(&self, slot: u16) -> SlotState {
        SlotState::unpack(self.slots[usize::from(slot)].load(Ordering::Acquire))
    }

    /// Applies a decision to its slots where it supersedes what is known;
    /// returns how many slots changed. (Several cores may apply at once.)
    pub fn apply(&self, r: &SlotsRecord) -> usize {
        if !self.valid(r) {
            return 0; // the callers refuse it first; a table never routes to a pair that is not there
        }
        let new = SlotState {
            version: r.version,
            owner: r.owner,
            handoff_to: r.handoff_to,
        };
        let mut changed = 0;
        for slot in r.first..=r.last.min(net::SLOT_COUNT - 1) {
            let cell = &self.slots[usize::from(slot)];
            let updated = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                new.supersedes(SlotState::unpack(old)).then_some(new.pack())
            });
            changed += usize::from(updated.is_ok());
        }
        if changed > 0 {
            self.changes.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    /// Every slot not at version 0, as ranges of equal state: what a
    /// checkpoint restates and what a node tells an edge at WELCOME.
    pub fn decisions(&self) -> Vec<SlotsRecord> {
        let mut out: Vec<SlotsRecord> = Vec::new();
        for slot in 0..net::SLOT_COUNT {
            let s = self.get(slot);
            if s.version == 0 {
                continue;
            }
            if let Some(last) = out.last_mut() {
                if last.last + 1 == slot
                    && (last.version, last.owner, last.handoff_to)
                        == (s.version, s.owner, s.handoff_to)
                {
                    last.last = slot;
                    continue;
                }
            }
            out.push(SlotsRecord {
                version: s.version,
                first: slot,
                last: slot,
                owner: s.owner,
                handoff_to: s.handoff_to,
            });
        }
        out
    }

    /// The highest version of any slot (a new move takes one above it).
    pub fn max_version(&self) -> u32 {
        (0..net::SLOT_COUNT)
            .map(|s| self.get(s).version)
            .max()
            .unwrap_or(0)
    }
}

/// A core node's shard's view: the decisions of its own log (what its
/// shards serve), the process's routing table, and the pair it belongs to.
///
/// Two tables, because a node also hears decisions from other nodes
/// (MOVED on its links, for routing its own clients' requests): a decision
/// giving this pair a range may reach it that way before its own log has
/// it committed, and serving on hearsay could lose messages if that record
/// were then lost with a crash. Shards take only their own log's word.
#[derive(Clone)]
pub struct Ownership {
    pub table: std::sync::Arc<SlotTable>,
    pub routing: std::sync::Arc<SlotTable>,
    pub own_pair: u16,
}

impl Ownership {
    /// A decision of this node's log: in force for the shards and for routing.
    pub fn apply(&self, r: &SlotsRecord) -> usize {
        self.routing.apply(r);
        self.table.apply(r)
    }

    /// Whether this pair takes SENDs for `slot` now (owns it, not handing it off).
    pub fn takes_sends(&self, slot: u16) -> bool {
        let s = self.table.get(slot);
        s.owner == self.own_pair && s.handoff_to.is_none()
    }

    /// Whether this pair holds the data of `slot` (owns it, handing off or not).
    pub fn holds(&self, slot: u16) -> bool {
        self.table.get(slot).owner == self.own_pair
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> SlotTable {
        let mut map = vec![0u16; usize::from(net::SLOT_COUNT)];
        map[8192..].iter_mut().for_each(|p| *p = 1);
        SlotTable::new(&map, 3)
    }

    fn rec(version: u32, first: u16, last: u16, owner: u16, to: Option<u16>) -> SlotsRecord {
        SlotsRecord {
            version,
            first,
            last,
            owner,
            handoff_to: to,
        }
    }

    #[test]
    fn a_move_goes_through_handoff_and_arrives_in_any_order() {
        let t = table();
        assert_eq!(t.get(10).owner, 0);
        assert_eq!(t.apply(&rec(1, 10, 19, 0, Some(1))), 10);
        assert_eq!(t.get(10).handoff_to, Some(1));
        assert_eq!(t.apply(&rec(1, 10, 19, 1, None)), 10);
        assert_eq!(
            t.get(19),
            SlotState {
                version: 1,
                owner: 1,
                handoff_to: None
            }
        );
        // A late handoff of the same version, or an older version, changes nothing.
        assert_eq!(t.apply(&rec(1, 10, 19, 0, Some(1))), 0);
        assert_eq!(t.apply(&rec(0, 10, 19, 0, None)), 0);
        assert_eq!(t.get(20).owner, 0, "outside the range");
        assert!(!t.valid(&rec(9, 20, 20, 3, None)) && !t.valid(&rec(9, 20, 20, 0, Some(3))));
        assert_eq!(
            t.apply(&rec(9, 20, 20, 3, None)),
            0,
            "no pair 3 in a 3-pair file"
        );
        assert_eq!(t.decisions(), vec![rec(1, 10, 19, 1, None)]);
        assert_eq!(t.max_version(), 1);
        // The settled state may come first (an edge hears the target first).
        let t = table();
        t.apply(&rec(2, 10, 10, 1, None));
        t.apply(&rec(2, 10, 10, 0, Some(1)));
        assert_eq!(t.get(10).owner, 1);
    }

    #[test]
    fn decisions_coalesce_equal_neighbours() {
        let t = table();
        t.apply(&rec(1, 0, 3, 1, None));
        t.apply(&rec(2, 4, 5, 1, None));
        t.apply(&rec(3, 16383, 16383, 0, Some(2)));
        assert_eq!(
            t.decisions(),
            vec![
                rec(1, 0, 3, 1, None),
                rec(2, 4, 5, 1, None),
                rec(3, 16383, 16383, 0, Some(2))
            ]
        );
        let o = Ownership {
            table: std::sync::Arc::new(t),
            routing: std::sync::Arc::new(table()),
            own_pair: 0,
        };
        assert!(!o.takes_sends(0) && !o.holds(0));
        assert!(!o.takes_sends(16383) && o.holds(16383));
        assert!(o.takes_sends(6) && o.holds(6));
    }
}
