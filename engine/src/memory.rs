//! What the shard's tables really cost, so the byte limits bound what they
//! name: heap blocks rounded up to the allocator's size classes, hash tables
//! and queues counted by capacity (their slack included), not by length.
//!
//! The figures are an upper estimate of mimalloc's use (the global allocator):
//! block sizes up to 64 bytes in steps of 8, above that four size classes per
//! power of two. `tests/tests/memory.rs` checks them against RssAnon.

use std::mem::size_of;

/// Bytes a heap block of `n` requested bytes occupies (0 for no block).
pub fn alloc_bytes(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let step = if n <= 64 {
        8
    } else {
        (n.next_power_of_two() / 8).max(8)
    };
    n.div_ceil(step) * step
}

/// Buckets of a hashbrown table that holds `capacity` items (its load factor is 7/8).
fn buckets_for(capacity: usize) -> usize {
    if capacity == 0 {
        0
    } else if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8).div_ceil(7).next_power_of_two()
    }
}

/// Heap bytes of a `HashMap` whose `capacity()` is `capacity`, entries of
/// `slot_bytes` each: one slot and one control byte per bucket, plus a group.
pub fn table_bytes(capacity: usize, slot_bytes: usize) -> usize {
    let buckets = buckets_for(capacity);
    if buckets == 0 {
        return 0;
    }
    alloc_bytes(buckets * (slot_bytes + 1) + 16)
}

/// The table's heap bytes after the insert that finds it full (`len == capacity`).
pub fn table_bytes_grown(capacity: usize, slot_bytes: usize) -> usize {
    let buckets = buckets_for(capacity + 1).max(4);
    alloc_bytes(buckets * (slot_bytes + 1) + 16)
}

/// Heap bytes of a `VecDeque<T>` with this capacity.
pub fn deque_bytes<T>(capacity: usize) -> usize {
    alloc_bytes(capacity * size_of::<T>())
}

/// The capacity a full `VecDeque` grows to on its next push.
pub fn deque_capacity_grown(capacity: usize) -> usize {
    (capacity * 2).max(4)
}

/// Heap bytes of an `Rc<str>` of `len` bytes (two counts, then the bytes).
pub fn rc_str_bytes(len: usize) -> usize {
    alloc_bytes(2 * size_of::<usize>() + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up() {
        assert_eq!(alloc_bytes(0), 0);
        assert_eq!(alloc_bytes(1), 8);
        assert_eq!(alloc_bytes(64), 64);
        assert_eq!(alloc_bytes(65), 80);
        assert_eq!(alloc_bytes(129), 160);
        assert_eq!(alloc_bytes(1000), 1024);
    }

    #[test]
    fn hash_tables_counted_by_buckets() {
        let mut map: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for i in 0..1000 {
            map.insert(i, i);
        }
        // 1000 items: 2048 buckets of 16 + 1 bytes.
        assert_eq!(buckets_for(map.capacity()), 2048);
        assert!(table_bytes(map.capacity(), 16) >= 2048 * 17);
        let cap = map.capacity();
        assert!(table_bytes_grown(cap, 16) > table_bytes(cap, 16));
    }

    #[test]
    fn deque_growth_matches_std() {
        let mut q: std::collections::VecDeque<[u8; 64]> = std::collections::VecDeque::new();
        let mut cap = q.capacity();
        for _ in 0..100 {
            if q.len() == q.capacity() {
                let predicted = deque_capacity_grown(cap);
                q.push_back([0; 64]);
                assert_eq!(q.capacity(), predicted);
                cap = q.capacity();
            } else {
                q.push_back([0; 64]);
            }
        }
    }
}
