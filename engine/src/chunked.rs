//! An inbox's pending queue: a FIFO stored in fixed-size chunks, so a long
//! queue costs its length rounded up to one chunk, never the doubling slack
//! and the copies of a `VecDeque` that grows (which left the old buffers for
//! the allocator to hold: measured 199 bytes a 1-byte message, against 72).
//! A short queue (one chunk) grows by doubling up to the chunk size, so a
//! user with one pending message pays for one slot, not a chunk.

use std::collections::VecDeque;

use crate::memory;

/// Entries per chunk: 64 x a 64-byte `PendingMsg` is 4 KiB, one page.
pub const CHUNK_LEN: usize = 64;

#[derive(Debug)]
pub struct ChunkedQueue<T> {
    /// Every chunk but the first and the last is full; none is empty.
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        ChunkedQueue {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> ChunkedQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated: what the next push fills before allocating.
    pub fn capacity(&self) -> usize {
        match self.chunks.back() {
            None => 0,
            Some(last) => self.len - last.len() + last.capacity(),
        }
    }

    /// Heap bytes the queue holds besides its entries' own blocks.
    pub fn heap_bytes(&self) -> usize {
        memory::deque_bytes::<VecDeque<T>>(self.chunks.capacity())
            + self
                .chunks
                .iter()
                .map(|c| memory::deque_bytes::<T>(c.capacity()))
                .sum::<usize>()
    }

    /// Heap bytes the next push adds (0 when a slot is free).
    pub fn push_cost_bytes(&self) -> usize {
        match self.chunks.back() {
            Some(last) if last.len() < last.capacity() => 0,
            Some(last) if last.capacity() < CHUNK_LEN => {
                let grown = memory::deque_capacity_grown(last.capacity()).min(CHUNK_LEN);
                memory::deque_bytes::<T>(grown) - memory::deque_bytes::<T>(last.capacity())
            }
            _ => {
                let first = if self.chunks.is_empty() { 1 } else { CHUNK_LEN };
                let outer = self.chunks.capacity();
                let outer_growth = if self.chunks.len() == outer {
                    memory::deque_bytes::<VecDeque<T>>(outer_grown(outer))
                        - memory::deque_bytes::<VecDeque<T>>(outer)
                } else {
                    0
                };
                memory::deque_bytes::<T>(first) + outer_growth
            }
        }
    }

    pub fn push_back(&mut self, value: T) {
        let room = self.chunks.back().is_some_and(|c| c.len() < CHUNK_LEN);
        if !room {
            // The first chunk starts at one slot and doubles; later ones are whole.
            let capacity = if self.chunks.is_empty() { 1 } else { CHUNK_LEN };
            if self.chunks.len() == self.chunks.capacity() {
                let grown = outer_grown(self.chunks.capacity());
                self.chunks.reserve_exact(grown - self.chunks.len());
            }
            self.chunks.push_back(VecDeque::with_capacity(capacity));
        }
        let last = self.chunks.back_mut().expect("a chunk with room");
        if last.len() == last.capacity() {
            let grown = memory::deque_capacity_grown(last.capacity()).min(CHUNK_LEN);
            last.reserve_exact(grown - last.len());
        }
        last.push_back(value);
        self.len += 1;
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|c| c.front())
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let value = first.pop_front().expect("no chunk is empty");
        if first.is_empty() {
            self.chunks.pop_front();
            if self.chunks.is_empty() {
                self.chunks = VecDeque::new();
            } else if self.chunks.capacity() > 4 * self.chunks.len().max(4) {
                self.chunks.shrink_to(2 * self.chunks.len());
            }
        }
        self.len -= 1;
        Some(value)
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        let first = self.chunks.front()?;
        if index < first.len() {
            return first.get(index);
        }
        // Chunks after the first are full until the last.
        let rest = index - first.len();
        self.chunks.get(1 + rest / CHUNK_LEN)?.get(rest % CHUNK_LEN)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.iter())
    }
}

/// The chunk list starts with room for one chunk (most inboxes are short).
fn outer_grown(capacity: usize) -> usize {
    if capacity == 0 {
        1
    } else {
        memory::deque_capacity_grown(capacity)
    }
}

impl<T> std::ops::Index<usize> for ChunkedQueue<T> {
    type Output = T;
    fn index(&self, index: usize) -> &T {
        self.get(index).expect("index within the queue")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Same answers as a VecDeque for any sequence of pushes and pops,
        /// and the cost figures agree with the allocations made.
        #[test]
        fn behaves_as_a_fifo(ops in proptest::collection::vec(0u8..3, 0..2000)) {
            let mut model = VecDeque::new();
            let mut queue = ChunkedQueue::default();
            let mut next = 0u32;
            for op in ops {
                if op < 2 {
                    let before = queue.heap_bytes();
                    let predicted = queue.push_cost_bytes();
                    queue.push_back(next);
                    model.push_back(next);
                    next += 1;
                    prop_assert_eq!(queue.heap_bytes() - before, predicted);
                } else {
                    prop_assert_eq!(queue.pop_front(), model.pop_front());
                }
                prop_assert_eq!(queue.len(), model.len());
                prop_assert_eq!(queue.front(), model.front());
                prop_assert!(queue.capacity() >= queue.len());
                prop_assert!(queue.capacity() - queue.len() < CHUNK_LEN);
                for i in [0, model.len() / 2, model.len().saturating_sub(1)] {
                    prop_assert_eq!(queue.get(i), model.get(i));
                }
            }
            prop_assert!(queue.iter().eq(model.iter()));
        }
    }

    #[test]
    fn one_entry_costs_one_slot() {
        let mut queue = ChunkedQueue::default();
        queue.push_back([0u8; 64]);
        assert_eq!(queue.capacity(), 1);
        assert_eq!(queue.heap_bytes(), 64 + 32);
    }
}
