//! Per-connection deadlines in one min-heap.
//!
//! Pushing and popping are O(log n); nothing scans every connection. Entries
//! are never removed early: a fired entry names the connection by slab key
//! *and* id, and the reactor ignores it unless the same connection is still
//! there and the deadline still applies (slab keys are reused; ids are not).
//! Idle timeouts re-arm lazily: the entry fires, the reactor sees recent input
//! and pushes a new entry for the later deadline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// `--login-timeout` since accept.
    Login = 0,
    /// `--idle-timeout` since the last input.
    Idle = 1,
    /// The bounded grace of a closing connection (flush, then linger).
    Close = 2,
}

const KINDS: [TimerKind; 3] = [TimerKind::Login, TimerKind::Idle, TimerKind::Close];

/// One deadline: when, and for which connection. 16 bytes: one of these
/// waits for every connection that has not logged in yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    /// Milliseconds since the server started.
    pub at_ms: u64,
    /// The connection's slab key.
    pub key: u32,
    /// The connection's id, to tell a reused key apart.
    pub id: u32,
}

/// The pending deadlines, one min-heap per kind (the kind is implied by
/// the heap, which keeps entries small).
#[derive(Debug, Default)]
pub struct Timers {
    /// Min-heaps by deadline, indexed by `TimerKind as usize`.
    heaps: [BinaryHeap<Reverse<Timer>>; 3],
}

impl Timers {
    /// Adds a deadline of `kind`.
    pub fn push(&mut self, kind: TimerKind, timer: Timer) {
        self.heaps[kind as usize].push(Reverse(timer));
    }

    /// The earliest deadline, if any.
    pub fn next_at(&self) -> Option<u64> {
        self.heaps
            .iter()
            .filter_map(|heap| heap.peek().map(|Reverse(t)| t.at_ms))
            .min()
    }

    /// Removes and returns one deadline that is due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(TimerKind, Timer)> {
        let kind = KINDS
            .into_iter()
            .filter(|&k| {
                self.heaps[k as usize]
                    .peek()
                    .is_some_and(|Reverse(t)| t.at_ms <= now_ms)
            })
            .min_by_key(|&k| self.heaps[k as usize].peek().map(|Reverse(t)| t.at_ms))?;
        let Reverse(timer) = self.heaps[kind as usize].pop()?;
        Some((kind, timer))
    }

    /// Keeps only the deadlines `is_live` approves. The reactor calls it
    /// when stale entries (for connections that logged in or closed)
    /// outnumber live ones, so the heaps stay proportional to the peak of
    /// connections, not to the churn.
    pub fn retain(&mut self, mut is_live: impl FnMut(TimerKind, &Timer) -> bool) {
        for kind in KINDS {
            let heap = std::mem::take(&mut self.heaps[kind as usize]);
            let mut entries = heap.into_vec();
            // The capacity stays: it is bounded by the peak of live
            // entries, and freeing and regrowing it would only make the
            // allocator hand out fresh pages on the next burst.
            entries.retain(|Reverse(t)| is_live(kind, t));
            self.heaps[kind as usize] = BinaryHeap::from(entries);
        }
    }

    /// Frees the heaps' spare room (after a burst has gone).
    pub fn shrink(&mut self) {
        for heap in &mut self.heaps {
            heap.shrink_to_fit();
        }
    }

    /// How many deadlines are pending.
    pub fn len(&self) -> usize {
        self.heaps.iter().map(BinaryHeap::len).sum()
    }

    /// Whether no deadline is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(at_ms: u64, key: u32) -> Timer {
        Timer {
            at_ms,
            key,
            id: key,
        }
    }

    #[test]
    fn pops_in_deadline_order_across_kinds_only_when_due() {
        let mut timers = Timers::default();
        timers.push(TimerKind::Login, t(30, 1));
        timers.push(TimerKind::Close, t(10, 2));
        timers.push(TimerKind::Idle, t(20, 3));
        timers.push(TimerKind::Login, t(5, 4));
        assert_eq!(timers.next_at(), Some(5));
        assert_eq!(timers.pop_due(4), None);
        let order: Vec<(TimerKind, u32)> = std::iter::from_fn(|| timers.pop_due(25))
            .map(|(k, t)| (k, t.key))
            .collect();
        assert_eq!(
            order,
            [
                (TimerKind::Login, 4),
                (TimerKind::Close, 2),
                (TimerKind::Idle, 3)
            ]
        );
        assert_eq!(timers.len(), 1);
        assert!(std::mem::size_of::<Timer>() <= 16);
    }

    #[test]
    fn retain_drops_stale_entries_and_keeps_order() {
        let mut timers = Timers::default();
        for key in 0..100 {
            timers.push(TimerKind::Login, t(1000 - u64::from(key), key));
        }
        timers.retain(|_, t| t.key % 10 == 0);
        assert_eq!(timers.len(), 10);
        timers.shrink();
        assert_eq!(timers.heaps[TimerKind::Login as usize].capacity(), 10);
        let keys: Vec<u32> = std::iter::from_fn(|| timers.pop_due(u64::MAX))
            .map(|(_, t)| t.key)
            .collect();
        assert_eq!(keys, [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]);
    }
}
