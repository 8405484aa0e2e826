//! The claims and releases waiting for room in the window, oldest first,
//! claims indexed by name and by connection, so that a release (take out
//! the claims of this name) and a closing connection (is it owed an
//! answer?) cost O(1) each: in a login wave thousands wait, and thousands
//! of releases and closes each scanned them all. Claims and releases wait
//! in one line so that Redis sees them in the order the node made them: a
//! claim never overtakes the release of its name.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::conn::Slot;

/// A claim waiting for room in the window: for whom, which name, whether
/// it is a claim again, whether it was retried.
pub(super) type QueuedClaim = (Slot, Rc<str>, bool, bool);

/// What waits for room in the window.
#[derive(Debug)]
pub(super) enum Queued {
    Claim(QueuedClaim),
    Release(String),
}

/// Entries an empty queue keeps room for at most.
const SMALL: usize = 1024;

#[derive(Default)]
pub(super) struct Admissions {
    /// What waits, by its number, given in order of arrival.
    entries: HashMap<u64, Queued>,
    /// The numbers in order; a number whose claim was taken out by name is
    /// skipped when it comes up.
    order: VecDeque<u64>,
    /// The next number.
    next: u64,
    /// Whether the queue gave back a wave's memory since the last
    /// [`Admissions::take_shrunk`].
    shrunk: bool,
    /// The numbers of the claims waiting, by name.
    names: HashMap<Rc<str>, Vec<u64>>,
    /// Claims waiting, by connection.
    slots: HashMap<Slot, u32>,
    /// Releases waiting.
    releases: usize,
}

impl Admissions {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The claims and the releases waiting.
    pub fn counts(&self) -> (usize, usize) {
        (self.entries.len() - self.releases, self.releases)
    }

    pub fn push_back(&mut self, entry: Queued) {
        let n = self.next;
        self.next += 1;
        match &entry {
            Queued::Claim(claim) => {
                self.names.entry(Rc::clone(&claim.1)).or_default().push(n);
                *self.slots.entry(claim.0).or_default() += 1;
            }
            Queued::Release(_) => self.releases += 1,
        }
        self.entries.insert(n, entry);
        self.order.push_back(n);
    }

    /// The next to come out.
    pub fn front(&mut self) -> Option<&Queued> {
        while let Some(n) = self.order.front() {
            if self.entries.contains_key(n) {
                return self.entries.get(n);
            }
            self.order.pop_front(); // taken out by name
        }
        None
    }

    pub fn pop_front(&mut self) -> Option<Queued> {
        let entry = self.pop_next();
        self.shrink_if_empty();
        entry
    }

    fn pop_next(&mut self) -> Option<Queued> {
        while let Some(n) = self.order.pop_front() {
            let Some(entry) = self.entries.remove(&n) else {
                continue; // taken out by name
            };
            match &entry {
                Queued::Claim(claim) => {
                    if let Some(numbers) = self.names.get_mut(&claim.1) {
                        numbers.retain(|&m| m != n);
                        if numbers.is_empty() {
                            self.names.remove(&claim.1);
                        }
                    }
                    uncount(&mut self.slots, &claim.0);
                }
                Queued::Release(_) => self.releases -= 1,
            }
            return Some(entry);
        }
        None
    }

    /// Whether a claim for `slot` waits.
    pub fn has_slot(&self, slot: Slot) -> bool {
        self.slots.contains_key(&slot)
    }

    /// Takes out the claims of `name` (not its releases), in order, in
    /// time proportional to their number (their places in `order` are
    /// skipped later).
    pub fn take_name(&mut self, name: &str) -> VecDeque<QueuedClaim> {
        let Some(numbers) = self.names.remove(name) else {
            return VecDeque::new();
        };
        let mut gone = VecDeque::with_capacity(numbers.len());
        for n in numbers {
            if let Some(Queued::Claim(claim)) = self.entries.remove(&n) {
                uncount(&mut self.slots, &claim.0);
                gone.push_back(claim);
            }
        }
        if self.entries.is_empty() {
            self.order.clear();
        }
        self.shrink_if_empty();
        gone
    }

    /// An empty queue gives back what a login wave made it grow to (at a
    /// million clients, some 3 MB per node kept for nothing).
    fn shrink_if_empty(&mut self) {
        if self.entries.is_empty() && self.entries.capacity() > SMALL {
            *self = Admissions {
                next: self.next,
                shrunk: true,
                ..Admissions::default()
            };
        }
    }

    /// Whether a login or logout wave ended since the last call (the
    /// queue, grown by it, gave its memory back): a moment to trim the
    /// heap.
    pub fn take_shrunk(&mut self) -> bool {
        std::mem::take(&mut self.shrunk)
    }

    /// Takes out everything, in order.
    pub fn take_all(&mut self) -> VecDeque<Queued> {
        let mut all = VecDeque::with_capacity(self.entries.len());
        for n in std::mem::take(&mut self.order) {
            if let Some(entry) = self.entries.remove(&n) {
                all.push_back(entry);
            }
        }
        self.names.clear();
        self.slots.clear();
        self.releases = 0;
        self.shrink_if_empty();
        all
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

    fn claim(key: u32, name: &str) -> Queued {
        Queued::Claim((Slot { key, id: key }, Rc::from(name), false, false))
    }

    fn key(entry: Option<Queued>) -> Option<u32> {
        match entry {
            Some(Queued::Claim(c)) => Some(c.0.key),
            _ => None,
        }
    }

    #[test]
    fn counts_follow_the_queue() {
        let mut q = Admissions::default();
        q.push_back(claim(1, "a"));
        q.push_back(claim(2, "b"));
        q.push_back(claim(3, "a"));
        assert!(q.has_slot(Slot { key: 2, id: 2 }));
        assert_eq!(q.take_name("a").len(), 2);
        assert!(q.take_name("a").is_empty());
        assert!(!q.has_slot(Slot { key: 1, id: 1 }));
        assert_eq!(key(q.pop_front()), Some(2));
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
        let mut q = Admissions::default();
        for i in 0..40_000 {
            q.push_back(claim(i, &format!("u{i}")));
        }
        for i in (0..40_000).step_by(2) {
            assert_eq!(q.take_name(&format!("u{i}")).len(), 1);
        }
        // The queue holds only what it must.
        assert_eq!(
            (q.counts().0, q.entries.len(), q.names.len()),
            (20_000, 20_000, 20_000)
        );
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_front())
            .map(|c| key(Some(c)).unwrap())
            .collect();
        assert_eq!(order, (1..40_000).step_by(2).collect::<Vec<_>>());
        assert!(q.order.is_empty());
        // Empty again, it gives the wave's memory back.
        let room = q.entries.capacity() + q.names.capacity() + q.order.capacity();
        assert!(room <= 3 * SMALL, "{room} entries kept");
    }

    /// A release waits in line with the claims: a claim of the same name
    /// after it stays after it, and taking out a name's claims leaves its
    /// releases in place.
    #[test]
    fn releases_keep_their_place_among_claims() {
        let mut q = Admissions::default();
        q.push_back(claim(1, "a"));
        q.push_back(Queued::Release("a".into()));
        q.push_back(claim(2, "a"));
        q.push_back(claim(3, "b"));
        assert_eq!(q.counts(), (3, 1));
        assert_eq!(
            q.take_name("a").len(),
            2,
            "both claims of a, not the release"
        );
        assert_eq!(q.counts(), (1, 1));
        assert!(matches!(q.pop_front(), Some(Queued::Release(n)) if n == "a"));
        assert_eq!(key(q.pop_front()), Some(3));
        assert!(q.is_empty() && q.counts() == (0, 0));
        q.push_back(Queued::Release("c".into()));
        q.push_back(claim(4, "c"));
        let all = q.take_all();
        assert!(matches!(all[0], Queued::Release(_)) && matches!(all[1], Queued::Claim(_)));
        assert_eq!(q.counts(), (0, 0));
    }
}
