//! The claims waiting for room in the claim window, oldest first, indexed
//! by name and by connection, so that a release (take out the claims of
//! this name) and a closing connection (is it owed an answer?) cost O(1)
//! each: in a login wave thousands wait, and thousands of releases and
//! closes each scanned them all. And the releases waiting for room in
//! theirs, indexed by name, so that a claim takes out its name's releases
//! in O(1).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::conn::Slot;

/// A claim waiting for room in the window: for whom, which name, whether
/// it is a claim again, whether it was retried.
pub(super) type QueuedClaim = (Slot, Rc<str>, bool, bool);

/// Entries an empty queue keeps room for at most.
const SMALL: usize = 1024;

#[derive(Default)]
pub(super) struct ClaimQueue {
    /// The waiting claims by their number, given in order of arrival.
    claims: HashMap<u64, QueuedClaim>,
    /// The numbers in order; a number whose claim was taken out by name is
    /// skipped when it comes up.
    order: VecDeque<u64>,
    /// The next number.
    next: u64,
    /// Whether the queue gave back a wave's memory since the last
    /// [`ClaimQueue::take_shrunk`].
    shrunk: bool,
    /// The numbers of the claims waiting, by name.
    names: HashMap<Rc<str>, Vec<u64>>,
    /// Claims waiting, by connection.
    slots: HashMap<Slot, u32>,
}

impl ClaimQueue {
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    pub fn push_back(&mut self, claim: QueuedClaim) {
        let n = self.next;
        self.next += 1;
        self.names.entry(Rc::clone(&claim.1)).or_default().push(n);
        *self.slots.entry(claim.0).or_default() += 1;
        self.claims.insert(n, claim);
        self.order.push_back(n);
    }

    pub fn pop_front(&mut self) -> Option<QueuedClaim> {
        let claim = self.pop_next();
        self.shrink_if_empty();
        claim
    }

    fn pop_next(&mut self) -> Option<QueuedClaim> {
        while let Some(n) = self.order.pop_front() {
            let Some(claim) = self.claims.remove(&n) else {
                continue; // taken out by name
            };
            if let Some(numbers) = self.names.get_mut(&claim.1) {
                numbers.retain(|&m| m != n);
                if numbers.is_empty() {
                    self.names.remove(&claim.1);
                }
            }
            uncount(&mut self.slots, &claim.0);
            return Some(claim);
        }
        None
    }

    /// Whether a claim for `slot` waits.
    pub fn has_slot(&self, slot: Slot) -> bool {
        self.slots.contains_key(&slot)
    }

    /// Takes out the claims of `name`, in order, in time proportional to
    /// their number (their places in `order` are skipped later).
    pub fn take_name(&mut self, name: &str) -> VecDeque<QueuedClaim> {
        let Some(numbers) = self.names.remove(name) else {
            return VecDeque::new();
        };
        let mut gone = VecDeque::with_capacity(numbers.len());
        for n in numbers {
            if let Some(claim) = self.claims.remove(&n) {
                uncount(&mut self.slots, &claim.0);
                gone.push_back(claim);
            }
        }
        if self.claims.is_empty() {
            self.order.clear();
        }
        self.shrink_if_empty();
        gone
    }

    /// An empty queue gives back what a login wave made it grow to (at a
    /// million clients, some 3 MB per node kept for nothing).
    fn shrink_if_empty(&mut self) {
        if self.claims.is_empty() && self.claims.capacity() > SMALL {
            *self = ClaimQueue {
                next: self.next,
                shrunk: true,
                ..ClaimQueue::default()
            };
        }
    }

    /// Whether a login wave ended since the last call (the queue, grown
    /// by it, gave its memory back): a moment to trim the heap.
    pub fn take_shrunk(&mut self) -> bool {
        std::mem::take(&mut self.shrunk)
    }

    /// Takes out every claim, in order.
    pub fn take_all(&mut self) -> VecDeque<QueuedClaim> {
        let mut all = VecDeque::with_capacity(self.claims.len());
        for n in std::mem::take(&mut self.order) {
            if let Some(claim) = self.claims.remove(&n) {
                all.push_back(claim);
            }
        }
        self.names.clear();
        self.slots.clear();
        self.shrink_if_empty();
        all
    }
}

/// The releases waiting for room in the release window, oldest first. A
/// claim of a name takes its releases out (see [`ReleaseQueue::cancel`]):
/// then no claim can wait behind a release, nor a release of its name
/// behind it, and the two queues keep each name's order on their own.
#[derive(Default)]
pub(super) struct ReleaseQueue {
    /// The names in order, each with the number it was queued under.
    order: VecDeque<(u64, Rc<str>)>,
    /// The number of each name's release waiting (a name waits once): its
    /// entry in `order` is the one with this number, the others were taken
    /// out. Its length is the queue's.
    names: HashMap<Rc<str>, u64>,
    /// The next number.
    next: u64,
    /// Whether the queue gave back a wave's memory since the last
    /// [`ReleaseQueue::take_shrunk`].
    shrunk: bool,
}

impl ReleaseQueue {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn push_back(&mut self, name: &str) {
        if self.names.contains_key(name) {
            return; // waiting already: once is enough (no claim came between)
        }
        let n = self.next;
        self.next += 1;
        let name: Rc<str> = Rc::from(name);
        self.names.insert(Rc::clone(&name), n);
        self.order.push_back((n, name));
    }

    /// Takes out the release of `name` waiting, if one: a claim of the
    /// name now goes to Redis in its place. The name is still this node's
    /// in Redis (its release never went), and the claim keeps it so.
    pub fn cancel(&mut self, name: &str) {
        // Every claim asks: an empty queue (nearly always) hashes nothing.
        if !self.is_empty() && self.names.remove(name).is_some() {
            self.shrink_if_empty();
        }
    }

    pub fn pop_front(&mut self) -> Option<Rc<str>> {
        while let Some((n, name)) = self.order.pop_front() {
            if self.names.get(&name) == Some(&n) {
                self.names.remove(&name);
                self.shrink_if_empty();
                return Some(name);
            }
            // Taken out by a claim.
        }
        None
    }

    /// Takes out every release, in order.
    pub fn take_all(&mut self) -> Vec<Rc<str>> {
        let mut all = Vec::with_capacity(self.len());
        while let Some(name) = self.pop_front() {
            all.push(name);
        }
        all
    }

    /// The names waiting, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order
            .iter()
            .filter(|(n, name)| self.names.get(name) == Some(n))
            .map(|(_, name)| &**name)
    }

    /// As [`ClaimQueue::shrink_if_empty`].
    fn shrink_if_empty(&mut self) {
        if self.is_empty() {
            self.order.clear();
            if self.names.capacity() > SMALL || self.order.capacity() > SMALL {
                *self = ReleaseQueue {
                    next: self.next,
                    shrunk: true,
                    ..ReleaseQueue::default()
                };
            }
        }
    }

    /// As [`ClaimQueue::take_shrunk`].
    pub fn take_shrunk(&mut self) -> bool {
        std::mem::take(&mut self.shrunk)
    }
}

/// One fewer for `slot`; the entry goes at zero.
fn uncount(slots: &mut HashMap<Slot, u32>, slot: &Slot) {
    if let Some(n) = slots.get_mut(slot) {
        *n -= 1;
        if *n == 0 {
            slots.remove(slot);
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
        assert!(q.pop_front().is_none() && q.order.is_empty());
        q.push_back(claim(4, "c"));
        q.push_back(claim(5, "d"));
        q.take_name("c");
        assert_eq!(q.take_all().len(), 1);
        assert!(q.names.is_empty() && q.slots.is_empty() && q.order.is_empty());
    }

    /// Claimants whose claims wait, closing one after another (a login
    /// wave's timeouts), each take out their own claim without a pass over
    /// the queue (a full pass each made 40,000 of them take 6.4 s of one
    /// loop turn): their places are skipped later, and the rest come out
    /// in order.
    #[test]
    fn claims_taken_out_by_name_are_skipped_in_order() {
        let mut q = ClaimQueue::default();
        for i in 0..40_000 {
            q.push_back(claim(i, &format!("u{i}")));
        }
        for i in (0..40_000).step_by(2) {
            assert_eq!(q.take_name(&format!("u{i}")).len(), 1);
        }
        // The queue holds only what it must.
        assert_eq!(
            (q.len(), q.claims.len(), q.names.len()),
            (20_000, 20_000, 20_000)
        );
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_front())
            .map(|c| c.0.key)
            .collect();
        assert_eq!(order, (1..40_000).step_by(2).collect::<Vec<_>>());
        assert!(q.order.is_empty());
        // Empty again, it gives the wave's memory back.
        let room = q.claims.capacity() + q.names.capacity() + q.order.capacity();
        assert!(room <= 3 * SMALL, "{room} entries kept");
    }

    /// A claim takes out its name's waiting release, and the rest come out
    /// in order; a name waits once however often it is released.
    #[test]
    fn releases_taken_out_by_a_claim_are_skipped() {
        let mut q = ReleaseQueue::default();
        for name in ["a", "b", "a", "c"] {
            q.push_back(name);
        }
        assert_eq!(q.len(), 3, "a waits once");
        q.cancel("b");
        q.cancel("x");
        assert_eq!(q.names().collect::<Vec<_>>(), ["a", "c"]);
        q.push_back("b");
        let order: Vec<String> = std::iter::from_fn(|| q.pop_front())
            .map(|n| n.to_string())
            .collect();
        assert_eq!(order, ["a", "c", "b"]);
        assert!(q.is_empty() && q.order.is_empty() && q.names.is_empty());
        for i in 0..5000 {
            q.push_back(&format!("u{i}"));
        }
        assert_eq!(q.take_all().len(), 5000);
        assert!(q.take_shrunk(), "the wave's memory given back");
        assert!(q.names.capacity() <= SMALL);
    }
}
