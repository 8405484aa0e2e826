//! Housekeeping: the jobs that keep the server lean and observable but
//! serve no client directly. The buffer pool's decay, handing memory back to
//! the kernel after a burst of connections, bounding stale deadlines, the
//! `--stats-interval` line and the status reported to the [`Notifier`].

use std::time::Instant;

use log::{debug, info};

use super::clients::Clients;
use crate::control::Notifier;
use crate::deadlines::{Deadline, Deadlines};

/// How often the pool frees the buffers it held unused, while it holds more
/// than it keeps.
const POOL_DECAY_MS: u64 = 1000;
/// Buffers freed by one decay that make it worth handing pages back.
const POOL_TRIM_AFTER: usize = 64;
/// Closes since the peak after which freed memory is handed back to the
/// kernel (when also at least half of the peak's connections are gone).
const GIVE_BACK_AFTER: usize = 64;
/// Stale deadlines tolerated before the heap is compacted.
const DEADLINES_SLACK: usize = 1024;

/// The state of the periodic jobs.
pub(super) struct Housekeeping {
    /// The most connections open at once since memory was last handed back.
    peak_conns: usize,
    /// Whether memory was handed back while part of a burst is still open.
    burst_closing: bool,
    /// Whether a `Deadline::PoolDecay` is set.
    decay_armed: bool,
    /// `--stats-interval` in ms; zero = off.
    stats_interval_ms: u64,
    /// Told when the server is ready, its status, and when it stops.
    notifier: Box<dyn Notifier>,
    /// Whether shutdown has begun (no more status lines).
    stopping: bool,
}

impl Housekeeping {
    /// Sets the first periodic deadlines (the notifier is told the server
    /// is ready by [`Housekeeping::ready`]).
    pub fn start(
        stats_interval_ms: u64,
        notifier: Box<dyn Notifier>,
        deadlines: &mut Deadlines,
    ) -> Housekeeping {
        if stats_interval_ms > 0 {
            deadlines.set(stats_interval_ms, Deadline::StatsLine);
        }
        if let Some(every) = notifier.status_interval_ms() {
            deadlines.set(every, Deadline::Status);
        }
        Housekeeping {
            peak_conns: 0,
            burst_closing: false,
            decay_armed: false,
            stats_interval_ms,
            notifier,
            stopping: false,
        }
    }

    /// Tells the notifier the server serves, with `conns` connections (a
    /// new process of a live upgrade has some): only once the old process
    /// has let them go, so that systemd never follows a process that may
    /// still be stopped.
    pub fn ready(&mut self, conns: usize) {
        self.notifier
            .ready(&format!("listening, {conns} connections"));
    }

    /// Called at the end of each turn: reaps the dead connections, keeps
    /// the deadline heap bounded, hands memory back after a burst and arms
    /// the pool's decay when it holds more than it keeps.
    pub fn end_turn(&mut self, clients: &mut Clients, deadlines: &mut Deadlines) {
        // Connections only arrive during a turn and only leave here, so
        // the count before the reap is the turn's peak.
        self.peak_conns = self.peak_conns.max(clients.len());
        clients.reap();
        // A connection has at most two live deadlines (login or idle, and
        // close); past that, most entries are stale: drop them.
        if deadlines.len() > 2 * clients.len() + DEADLINES_SLACK {
            clients.compact_deadlines(deadlines);
        }
        let open = clients.len();
        let burst_gone = self.peak_conns >= GIVE_BACK_AFTER + open && self.peak_conns >= 2 * open;
        // The last few connections of a burst handed back in part. (Not
        // any last connection: a client that connects and closes over and
        // over must not make every close a heap trim.)
        let burst_ended = open == 0 && self.burst_closing;
        if burst_gone || burst_ended {
            self.peak_conns = open;
            self.burst_closing = open > 0;
            give_back_memory(clients, deadlines);
        }
        if !self.decay_armed && clients.pool.is_over_keep() {
            self.decay_armed = true;
            deadlines.set(POOL_DECAY_MS, Deadline::PoolDecay);
        }
    }

    /// A login wave was admitted (the cluster's claim queue emptied after
    /// growing): what it left is given back, as after a burst of closes
    /// (the stale login deadlines of those logged in among it).
    pub fn wave_ended(&mut self, clients: &mut Clients, deadlines: &mut Deadlines) {
        give_back_memory(clients, deadlines);
    }

    /// `Deadline::PoolDecay`: frees the pooled buffers that went unused.
    pub fn decay_pool(&mut self, clients: &mut Clients, deadlines: &mut Deadlines) {
        if clients.pool.decay() >= POOL_TRIM_AFTER {
            trim_heap();
        }
        self.decay_armed = clients.pool.is_over_keep();
        if self.decay_armed {
            deadlines.set(POOL_DECAY_MS, Deadline::PoolDecay);
        }
    }

    /// `Deadline::StatsLine`: logs the counters and sets the next line.
    pub fn stats_line(&mut self, counters: &str, deadlines: &mut Deadlines) {
        info!("stats: {counters}");
        deadlines.set(self.stats_interval_ms, Deadline::StatsLine);
    }

    /// `Deadline::Status`: tells the notifier the state, and when next.
    pub fn status(&mut self, clients: &Clients, deadlines: &mut Deadlines) {
        if self.stopping {
            return;
        }
        let Some(every) = self.notifier.status_interval_ms() else {
            return;
        };
        let status = format!(
            "{} connections, {} logged in, {} deliveries",
            clients.stats.connections,
            clients.logged_in(),
            clients.stats.deliveries
        );
        self.notifier.status(&status);
        deadlines.set(every, Deadline::Status);
    }

    /// A live upgrade succeeded: the notifier is told who serves now.
    pub fn handed_over(&mut self, new_pid: u32) {
        self.notifier.handed_over(new_pid);
    }

    /// Shutdown has begun: the notifier is told, status lines end.
    pub fn stopping(&mut self) {
        self.stopping = true;
        self.notifier.stopping();
    }
}

/// After a burst of connections has closed: frees the room the burst
/// left in the pool, the name index, the deadline heap and the lists, then
/// hands the heap's free pages back to the kernel. Without this, RSS would
/// stay at the burst's peak until the memory is reused.
fn give_back_memory(clients: &mut Clients, deadlines: &mut Deadlines) {
    let started = Instant::now();
    clients.shrink();
    clients.compact_deadlines(deadlines);
    deadlines.shrink();
    trim_heap();
    debug!("memory handed back in {:?}", started.elapsed());
}

/// Fixes glibc's mmap threshold at 64 KiB. By default it moves: each
/// large block freed raises it to that block's size (up to 32 MiB), so
/// after the first wave has grown and freed its tables (the name index, the
/// deadline heap, the lists), the next wave's tables come from the main
/// heap instead of pages of their own. There they are placed among small
/// short-lived chunks, and once freed or moved they leave holes that
/// `malloc_trim` cannot hand back: the nodes of the million held 41-45
/// bytes a connection more after a second wave than after the first
/// (BENCHMARKS.md). With the threshold fixed, every table of 64 KiB or more
/// has its own mapping, given back whole when it is freed.
#[allow(unsafe_code)]
pub(super) fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it has no
    // preconditions and is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Hands the heap's free pages back to the kernel. glibc returns only the
/// top of the heap by itself; what a connect storm frees is spread all over
/// it, and those pages would stay in RSS until reused.
#[allow(unsafe_code)]
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; 0 = keep no extra padding.
    unsafe {
        libc::malloc_trim(0);
    }
}
