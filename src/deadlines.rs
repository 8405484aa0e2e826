//! Every deadline the reactor keeps, in one min-heap, and the loop's clock.
//!
//! One API for all of them, as in Redis's `ae.c`: [`Deadlines::set`] a
//! [`Deadline`] some milliseconds from now, and the loop asks
//! [`Deadlines::pop_due`] what is due after each wait (the wait itself ends
//! at [`Deadlines::next_at`]). A new periodic job is a new variant here and
//! one arm where the reactor handles it; nothing else changes.
//!
//! Entries are never removed early. A fired entry names what it was set for
//! (for a connection: slab key *and* id, as slab keys are reused), and the
//! reactor ignores it unless that still exists and the deadline still
//! applies. Idle timeouts re-arm lazily: the entry fires, the reactor sees
//! recent input and sets a new one for the later deadline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::conn::Slot;

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// `--login-timeout` since accept, for the client connection `key`/`id`.
    Login(Slot),
    /// `--idle-timeout` since the last input.
    Idle(Slot),
    /// The bounded grace of a closing connection (flush, then linger).
    Close(Slot),
    /// The end of a metrics scraper's time.
    Scraper(Slot),
    /// Accepting resumes after the process ran out of descriptors.
    AcceptResume,
    /// Accepting scrapers resumes after the process ran out of descriptors.
    ScrapersResume,
    /// The cluster link's own timer (connect, lease renewal, fencing,
    /// reply timeout); it says itself what is due.
    Cluster,
    /// A step of a live upgrade (quiescing, waiting for the new process)
    /// has taken as long as it may; the number tells the steps apart.
    UpgradeStep(u32),
    /// The buffer pool frees what it held unused.
    PoolDecay,
    /// The `--stats-interval` log line.
    StatsLine,
    /// The status line handed to the notifier (systemd).
    Status,
    /// A graceful shutdown stops waiting for clients to drain.
    ShutdownGiveUp,
}

/// Bits of [`Entry::at`] below the time that hold the kind of deadline.
const TAG_BITS: u32 = 4;

impl Deadline {
    /// The kind's tag and the slot it names (zero for server-wide ones).
    fn encode(self) -> (u64, Slot) {
        let none = Slot { key: 0, id: 0 };
        match self {
            Deadline::Login(s) => (0, s),
            Deadline::Idle(s) => (1, s),
            Deadline::Close(s) => (2, s),
            Deadline::Scraper(s) => (3, s),
            Deadline::AcceptResume => (4, none),
            Deadline::PoolDecay => (5, none),
            Deadline::StatsLine => (6, none),
            Deadline::Status => (7, none),
            Deadline::ShutdownGiveUp => (8, none),
            Deadline::ScrapersResume => (9, none),
            Deadline::Cluster => (10, none),
            Deadline::UpgradeStep(step) => (11, Slot { key: 0, id: step }),
        }
    }

    fn decode(tag: u64, slot: Slot) -> Deadline {
        match tag {
            0 => Deadline::Login(slot),
            1 => Deadline::Idle(slot),
            2 => Deadline::Close(slot),
            3 => Deadline::Scraper(slot),
            4 => Deadline::AcceptResume,
            5 => Deadline::PoolDecay,
            6 => Deadline::StatsLine,
            7 => Deadline::Status,
            8 => Deadline::ShutdownGiveUp,
            9 => Deadline::ScrapersResume,
            10 => Deadline::Cluster,
            _ => Deadline::UpgradeStep(slot.id),
        }
    }
}

/// One heap entry, 16 bytes: one waits for every connection that has not
/// logged in yet, so it is kept as small as the per-kind heaps it replaced.
/// Ordered by time first; the kind sits in the low bits of `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    /// `at_ms << TAG_BITS | tag`.
    at: u64,
    key: u32,
    id: u32,
}

impl Entry {
    fn at_ms(&self) -> u64 {
        self.at >> TAG_BITS
    }

    fn deadline(&self) -> Deadline {
        let slot = Slot {
            key: self.key,
            id: self.id,
        };
        Deadline::decode(self.at & ((1 << TAG_BITS) - 1), slot)
    }
}

/// The pending deadlines and the time of the current loop turn, in
/// milliseconds since the loop started.
///
/// The clock is `CLOCK_BOOTTIME`: monotonic, and it goes on while the
/// machine is suspended (`CLOCK_MONOTONIC`, behind `Instant`, stops). A
/// cluster node's lease runs on in Redis while this machine sleeps, so the
/// node must see that time pass to fence in time.
#[derive(Debug)]
pub struct Deadlines {
    /// Min-heap by time.
    heap: BinaryHeap<Reverse<Entry>>,
    /// When the loop started, on the clock: time zero.
    started_ms: u64,
    /// The time of the current turn.
    now_ms: u64,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            heap: BinaryHeap::new(),
            started_ms: boot_ms(),
            now_ms: 0,
        }
    }
}

/// `CLOCK_BOOTTIME` in milliseconds.
fn boot_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        (t.tv_sec() as u64).saturating_mul(1000) + t.tv_nsec() as u64 / 1_000_000
    })
}

impl Deadlines {
    /// Reads the clock: the time of the turn that begins.
    pub fn tick(&mut self) {
        self.now_ms = boot_ms().saturating_sub(self.started_ms);
    }

    /// The time of the current turn, in ms since the loop started.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Sets `deadline` `after_ms` from now.
    pub fn set(&mut self, after_ms: u64, deadline: Deadline) {
        let at_ms = self
            .now_ms
            .saturating_add(after_ms)
            .min(u64::MAX >> TAG_BITS);
        let (tag, slot) = deadline.encode();
        self.heap.push(Reverse(Entry {
            at: at_ms << TAG_BITS | tag,
            key: slot.key,
            id: slot.id,
        }));
    }

    /// When the earliest deadline is due, if any.
    pub fn next_at(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(e)| e.at_ms())
    }

    /// Removes and returns the earliest deadline if it is due now.
    pub fn pop_due(&mut self) -> Option<Deadline> {
        let Reverse(first) = self.heap.peek()?;
        if first.at_ms() > self.now_ms {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| e.deadline())
    }

    /// Keeps only the deadlines `is_live` approves. The reactor calls it
    /// when stale entries (for connections that logged in or closed)
    /// outnumber live ones, so the heap stays proportional to the peak of
    /// connections, not to the churn.
    pub fn retain(&mut self, mut is_live: impl FnMut(Deadline) -> bool) {
        // The capacity stays: it is bounded by the peak of live entries, and
        // freeing and regrowing it would only make the allocator hand out
        // fresh pages on the next burst.
        self.heap.retain(|Reverse(e)| is_live(e.deadline()));
    }

    /// Every pending deadline and when it is due, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (Deadline, u64)> + '_ {
        self.heap.iter().map(|Reverse(e)| (e.deadline(), e.at_ms()))
    }

    /// Frees the heap's spare room (after a burst has gone).
    pub fn shrink(&mut self) {
        self.heap.shrink_to_fit();
    }

    /// How many deadlines are pending.
    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: u32) -> Slot {
        Slot { key, id: key + 100 }
    }

    fn at(now_ms: u64) -> Deadlines {
        Deadlines {
            now_ms,
            ..Deadlines::default()
        }
    }

    #[test]
    fn pops_in_time_order_across_kinds_only_when_due() {
        let mut d = at(0);
        d.set(30, Deadline::Login(slot(1)));
        d.set(10, Deadline::Close(slot(2)));
        d.set(20, Deadline::StatsLine);
        d.set(5, Deadline::Idle(slot(4)));
        d.set(40, Deadline::ShutdownGiveUp);
        assert_eq!(d.next_at(), Some(5));
        d.now_ms = 4;
        assert_eq!(d.pop_due(), None);
        d.now_ms = 30;
        let order: Vec<Deadline> = std::iter::from_fn(|| d.pop_due()).collect();
        assert_eq!(
            order,
            [
                Deadline::Idle(slot(4)),
                Deadline::Close(slot(2)),
                Deadline::StatsLine,
                Deadline::Login(slot(1)),
            ]
        );
        assert_eq!(d.len(), 1);
        assert!(std::mem::size_of::<Entry>() <= 16);
    }

    #[test]
    fn every_kind_comes_back_as_set() {
        let kinds = [
            Deadline::Login(slot(7)),
            Deadline::Idle(slot(u32::MAX - 100)),
            Deadline::Close(slot(0)),
            Deadline::Scraper(slot(3)),
            Deadline::AcceptResume,
            Deadline::PoolDecay,
            Deadline::StatsLine,
            Deadline::Status,
            Deadline::ShutdownGiveUp,
            Deadline::ScrapersResume,
            Deadline::Cluster,
            Deadline::UpgradeStep(u32::MAX - 1),
        ];
        let mut d = at(1000);
        for (i, &kind) in kinds.iter().enumerate() {
            d.set(i as u64, kind);
        }
        d.now_ms = u64::MAX;
        let back: Vec<Deadline> = std::iter::from_fn(|| d.pop_due()).collect();
        assert_eq!(back, kinds);
    }

    #[test]
    fn retain_drops_stale_entries_and_keeps_order() {
        let mut d = at(0);
        for key in 0..100 {
            d.set(1000 - u64::from(key), Deadline::Login(slot(key)));
        }
        d.retain(|deadline| matches!(deadline, Deadline::Login(s) if s.key % 10 == 0));
        assert_eq!(d.len(), 10);
        d.shrink();
        assert_eq!(d.heap.capacity(), 10);
        d.now_ms = u64::MAX;
        let keys: Vec<u32> = std::iter::from_fn(|| d.pop_due())
            .map(|deadline| match deadline {
                Deadline::Login(s) => s.key,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys, [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]);
    }

    #[test]
    fn far_deadlines_saturate_instead_of_wrapping() {
        let mut d = at(5);
        d.set(u64::MAX, Deadline::StatsLine);
        d.set(1, Deadline::PoolDecay);
        d.now_ms = 6;
        assert_eq!(d.pop_due(), Some(Deadline::PoolDecay));
        assert_eq!(d.pop_due(), None);
    }
}
