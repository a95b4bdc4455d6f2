//! The ready workers, longest-waiting first: ordered by when each worker asked (the READY's
//! CLOCK_MONOTONIC stamp), so that READYs read together still queue in the order they were
//! sent. A new READY is almost always the newest, so it goes at or near the back: O(1) in
//! practice; only a ready worker that goes away costs a scan.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct ReadyQueue {
    /// (asked at, worker slot), oldest first.
    entries: VecDeque<(u64, usize)>,
}

impl ReadyQueue {
    pub fn push(&mut self, asked_ns: u64, slot: usize) {
        let at = self.entries.partition_point(|&(t, _)| t <= asked_ns);
        self.entries.insert(at, (asked_ns, slot));
    }

    /// The longest-waiting worker's slot.
    pub fn pop(&mut self) -> Option<usize> {
        self.entries.pop_front().map(|(_, slot)| slot)
    }

    /// Forgets a worker that has gone.
    pub fn remove(&mut self, slot: usize) {
        self.entries.retain(|&(_, s)| s != slot);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_leave_in_the_order_they_asked_whatever_the_order_they_were_read() {
        let mut queue = ReadyQueue::default();
        for (asked, slot) in [(30, 3), (10, 1), (20, 2), (20, 4), (40, 0)] {
            queue.push(asked, slot);
        }
        queue.remove(2);
        assert_eq!(queue.len(), 4);
        let order: Vec<usize> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(order, [1, 4, 3, 0], "equal stamps keep their arrival order");
        assert!(queue.is_empty());
    }
}
