//! The idempotency table of a shard: which (sender, msg_id) pairs are stored,
//! at which log position, since when. Bounded by count (oldest evicted first)
//! and by age (the dedup window).
//!
//! "Since when" is on the monotonic clock (engine::clock::mono_ms) for what
//! the shard stores itself, so no wall-clock step while it runs moves the
//! window. An entry learned from a record (replayed at start, streamed to a
//! replica, restated by a checkpoint, imported with a slot) keeps the stamp
//! the record carries: a MSG's `sent_ms` (the wall clock of the edge that took
//! it) or a DEDUP entry's `stored_ms` (the monotonic clock of the process that
//! wrote it, which starts at the wall clock's reading). Across a restart or
//! between two machines only the wall clock spans both, so such an entry's age
//! is off by any wall-clock step between its writing and its reading; with the
//! 24 h default window a step of minutes shortens or lengthens its life by
//! minutes. docs/DECISIONS.md 20.

use crate::record::DedupEntry;
use std::collections::{HashMap, VecDeque};

/// A fast hasher with a per-process random key: msg ids are chosen by clients,
/// so the table must not be open to crafted collisions (SipHash was 3 % of a core).
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Entries allocated up front (the table grows beyond it up to entries_max).
const PREALLOCATED_ENTRIES_MAX: usize = 1 << 16;

/// Key: FNV-1a 64 of the sender id (collisions need the same 16-byte msg id too) and the msg id.
pub type DedupKey = (u64, [u8; 16]);

#[derive(Debug, Clone, Copy)]
struct Entry {
    position: u64,
    /// stored_ms << 16 | the recipient's slot: 16 bytes an entry, as before
    /// slots were kept (48 bits of milliseconds last 8,900 years).
    /// stored_ms: see the module's header for its clock.
    stored_ms_slot: u64,
}

impl Entry {
    fn stored_ms(self) -> u64 {
        self.stored_ms_slot >> 16
    }
    fn slot(self) -> u16 {
        self.stored_ms_slot as u16
    }
}

pub struct Dedup {
    map: FastMap<DedupKey, Entry>,
    /// Insertion order, for eviction by count and by age.
    order: VecDeque<DedupKey>,
    entries_max: usize,
    window_ms: u64,
}

pub fn sender_hash(sender: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sender.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Dedup {
    pub fn new(entries_max: usize, window_ms: u64) -> Dedup {
        assert!(entries_max > 0);
        let preallocated = entries_max.min(PREALLOCATED_ENTRIES_MAX);
        Dedup {
            map: FastMap::with_capacity_and_hasher(preallocated, ahash::RandomState::new()),
            order: VecDeque::with_capacity(preallocated),
            entries_max,
            window_ms,
        }
    }

    /// Heap bytes of the table and its order queue, as allocated (by capacity).
    pub fn heap_bytes(&self) -> usize {
        crate::memory::table_bytes(
            self.map.capacity(),
            std::mem::size_of::<(DedupKey, Entry)>(),
        ) + crate::memory::deque_bytes::<DedupKey>(self.order.capacity())
    }

    /// The most `heap_bytes` can reach with `entries_max` entries.
    pub fn heap_bytes_max(entries_max: usize) -> usize {
        crate::memory::table_bytes_grown(entries_max - 1, std::mem::size_of::<(DedupKey, Entry)>())
            + crate::memory::deque_bytes::<DedupKey>(entries_max.next_power_of_two())
    }

    /// The log position of an earlier store of this key, if it is remembered.
    pub fn get(&self, key: &DedupKey) -> Option<u64> {
        self.map.get(key).map(|e| e.position)
    }

    /// Remembers a key; evicts the oldest entry when full (even if the key
    /// turns out to be known). A known key is left as it is.
    /// (One probe of the table for a new key, the common case: a caller asks
    /// `get` first.)
    /// `slot`: the recipient's (what a slot move takes along).
    pub fn insert(&mut self, key: DedupKey, position: u64, stored_ms: u64, slot: u16) {
        if self.map.len() >= self.entries_max {
            self.evict_oldest();
        }
        let entry = Entry {
            position,
            stored_ms_slot: (stored_ms.min((1 << 48) - 1) << 16) | u64::from(slot),
        };
        if let Some(earlier) = self.map.insert(key, entry) {
            self.map.insert(key, earlier); // known: left as it is (and not queued twice)
            return;
        }
        self.order.push_back(key);
        debug_assert_eq!(self.map.len(), self.order.len());
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            self.map.remove(&old);
        }
    }

    /// Forgets entries older than the window; bounded by `budget` per call so a
    /// large expiry never stalls the event loop.
    pub fn expire(&mut self, now_ms: u64, budget: usize) -> usize {
        let mut expired = 0;
        while expired < budget {
            let Some(key) = self.order.front() else { break };
            let entry = self.map[key];
            if entry.stored_ms() + self.window_ms > now_ms {
                break;
            }
            self.evict_oldest();
            expired += 1;
        }
        expired
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// All entries, oldest first, for a checkpoint.
    pub fn entries(&self) -> impl Iterator<Item = DedupEntry> + '_ {
        self.order.iter().map(|k| {
            let e = self.map[k];
            DedupEntry {
                sender_hash: k.0,
                msg_id: k.1,
                stored_ms: e.stored_ms(),
                slot: e.slot(),
            }
        })
    }

    /// Whether an entry of `slot` belongs to the range first..=last: an entry
    /// whose slot is unknown (an old log) belongs to every range.
    pub fn slot_in(slot: u16, first: u16, last: u16) -> bool {
        slot == crate::record::SLOT_UNKNOWN || (first..=last).contains(&slot)
    }

    /// Forgets the entries of slots first..=last (they moved to another pair;
    /// unknown-slot entries stay too, harmlessly). One pass over the table:
    /// slot moves are rare operator actions.
    pub fn remove_slots(&mut self, first: u16, last: u16) -> usize {
        let before = self.map.len();
        let map = &mut self.map;
        self.order.retain(|k| {
            let slot = map[k].slot();
            let gone = slot != crate::record::SLOT_UNKNOWN && (first..=last).contains(&slot);
            if gone {
                map.remove(k);
            }
            !gone
        });
        before - self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README and config.rs quote "up to about 125 bytes an entry" at the default bound.
    #[test]
    fn the_documented_bytes_per_entry_hold_at_the_default_bound() {
        let entries_max = crate::config::Limits::default().dedup_entries_max;
        let per_entry = Dedup::heap_bytes_max(entries_max) / entries_max;
        assert!(
            (100..=128).contains(&per_entry),
            "{per_entry} bytes an entry"
        );
    }

    #[test]
    fn remembers_evicts_oldest_and_expires() {
        let mut d = Dedup::new(2, 1000);
        d.insert((1, [1; 16]), 10, 0, 7);
        d.insert((1, [2; 16]), 11, 500, 7);
        assert_eq!(d.get(&(1, [1; 16])), Some(10));
        d.insert((1, [3; 16]), 12, 600, 8);
        assert_eq!(d.get(&(1, [1; 16])), None, "oldest evicted at capacity");
        assert_eq!(d.len(), 2);
        assert_eq!(d.expire(1550, 10), 1);
        assert_eq!(d.get(&(1, [2; 16])), None);
        assert_eq!(d.get(&(1, [3; 16])), Some(12));
        d.insert((1, [3; 16]), 99, 700, 9);
        assert_eq!(
            d.get(&(1, [3; 16])),
            Some(12),
            "a known key is left as it is"
        );
        assert_eq!(d.entries().count(), 1, "and not queued twice");
        assert_eq!(d.entries().next().unwrap().slot, 8);
        assert_eq!(d.entries().next().unwrap().stored_ms, 600);
    }

    #[test]
    fn a_slot_range_is_forgotten_and_unknown_slots_stay() {
        let mut d = Dedup::new(10, 1000);
        d.insert((1, [1; 16]), 1, 5, 3);
        d.insert((1, [2; 16]), 2, 5, 4);
        d.insert((1, [3; 16]), 3, 5, crate::record::SLOT_UNKNOWN);
        d.insert((1, [4; 16]), 4, 5, 5);
        assert_eq!(d.remove_slots(4, 5), 2);
        let slots: Vec<u16> = d.entries().map(|e| e.slot).collect();
        assert_eq!(slots, vec![3, crate::record::SLOT_UNKNOWN]);
        assert!(Dedup::slot_in(crate::record::SLOT_UNKNOWN, 4, 5));
        assert!(!Dedup::slot_in(3, 4, 5));
        assert_eq!(d.expire(2000, 10), 2);
    }

    #[test]
    fn sender_hash_is_fnv1a() {
        assert_eq!(sender_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(sender_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
