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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// `--login-timeout` since accept.
    Login,
    /// `--idle-timeout` since the last input.
    Idle,
    /// The bounded grace of a closing connection (flush, then linger).
    Close,
}

/// One deadline: when, what for, and which connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timer {
    /// Milliseconds since the server started.
    pub at_ms: u64,
    /// What the deadline is for.
    pub kind: TimerKind,
    /// The connection's slab key.
    pub key: usize,
    /// The connection's unique id, to tell a reused key apart.
    pub id: u64,
}

/// The pending deadlines, earliest first.
#[derive(Debug, Default)]
pub struct Timers {
    /// Min-heap by deadline.
    heap: BinaryHeap<Reverse<Timer>>,
}

impl Timers {
    /// Adds a deadline.
    pub fn push(&mut self, timer: Timer) {
        self.heap.push(Reverse(timer));
    }

    /// The earliest deadline, if any.
    pub fn next_at(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(t)| t.at_ms)
    }

    /// Removes and returns one deadline that is due at `now_ms`.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<Timer> {
        if self.next_at()? <= now_ms {
            self.heap.pop().map(|Reverse(t)| t)
        } else {
            None
        }
    }

    /// How many deadlines are pending.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no deadline is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(at_ms: u64, key: usize) -> Timer {
        Timer {
            at_ms,
            kind: TimerKind::Login,
            key,
            id: key as u64,
        }
    }

    #[test]
    fn pops_in_deadline_order_only_when_due() {
        let mut timers = Timers::default();
        timers.push(t(30, 1));
        timers.push(t(10, 2));
        timers.push(t(20, 3));
        assert_eq!(timers.next_at(), Some(10));
        assert_eq!(timers.pop_due(5), None);
        assert_eq!(timers.pop_due(25).map(|t| t.key), Some(2));
        assert_eq!(timers.pop_due(25).map(|t| t.key), Some(3));
        assert_eq!(timers.pop_due(25), None);
        assert_eq!(timers.len(), 1);
    }
}
