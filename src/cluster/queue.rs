//! The claims waiting for room in the claim window, oldest first, with
//! their names and connections counted, so that a release (is a claim of
//! this name waiting?) and a closing connection (is it owed an answer?)
//! ask in O(1): in a login wave thousands wait, and thousands of releases
//! and closes each asked by scanning them all.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::conn::Slot;

/// A claim waiting for room in the window: for whom, which name, whether
/// it is a claim again, whether it was retried.
pub(super) type QueuedClaim = (Slot, Rc<str>, bool, bool);

#[derive(Default)]
pub(super) struct ClaimQueue {
    queue: VecDeque<QueuedClaim>,
    /// Claims waiting, by name.
    names: HashMap<Rc<str>, u32>,
    /// Claims waiting, by connection.
    slots: HashMap<Slot, u32>,
}

impl ClaimQueue {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn push_back(&mut self, claim: QueuedClaim) {
        *self.names.entry(Rc::clone(&claim.1)).or_default() += 1;
        *self.slots.entry(claim.0).or_default() += 1;
        self.queue.push_back(claim);
    }

    pub fn pop_front(&mut self) -> Option<QueuedClaim> {
        let claim = self.queue.pop_front()?;
        self.uncount(&claim);
        Some(claim)
    }

    /// Whether a claim for `slot` waits.
    pub fn has_slot(&self, slot: Slot) -> bool {
        self.slots.contains_key(&slot)
    }

    /// Takes out the claims of `name`, in order (none: O(1)).
    pub fn take_name(&mut self, name: &str) -> VecDeque<QueuedClaim> {
        if !self.names.contains_key(name) {
            return VecDeque::new();
        }
        let (gone, keep): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|(_, queued, ..)| &**queued == name);
        self.queue = keep;
        for claim in &gone {
            self.uncount(claim);
        }
        gone
    }

    /// Takes out every claim, in order.
    pub fn take_all(&mut self) -> VecDeque<QueuedClaim> {
        self.names.clear();
        self.slots.clear();
        std::mem::take(&mut self.queue)
    }

    fn uncount(&mut self, (slot, name, ..): &QueuedClaim) {
        for_count(&mut self.names, &**name);
        for_count(&mut self.slots, slot);
    }
}

/// One fewer under `key`; the entry goes at zero.
fn for_count<K, Q>(counts: &mut HashMap<K, u32>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(key: u32, name: &str) -> QueuedClaim {
        (Slot { key, id: key }, Rc::from(name), false, false)
    }

    #[test]
    fn counts_follow_the_queue() {
        let mut q = ClaimQueue::default();
        q.push_back(claim(1, "a"));
        q.push_back(claim(2, "b"));
        q.push_back(claim(3, "a"));
        assert!(q.has_slot(Slot { key: 2, id: 2 }));
        assert_eq!(q.take_name("a").len(), 2);
        assert!(q.take_name("a").is_empty());
        assert!(!q.has_slot(Slot { key: 1, id: 1 }));
        assert_eq!(q.pop_front().map(|c| c.0.key), Some(2));
        assert!(q.is_empty() && q.names.is_empty() && q.slots.is_empty());
        q.push_back(claim(4, "c"));
        assert_eq!(q.take_all().len(), 1);
        assert!(q.names.is_empty() && q.slots.is_empty());
    }
}
