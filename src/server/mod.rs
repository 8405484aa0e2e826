//! The reactor: one `mio::Poll` loop that owns every connection.
//!
//! One loop turn: wait for events (with a timeout set by the next deadline),
//! accept, read and route (routing only appends to outbound buffers), serve
//! connections that had input left over from the last turn, fire due timers,
//! write every connection on the pending-write list once, and finally reap the
//! connections marked dead (and hand memory back to the kernel once most of
//! a burst of connections has gone). Handlers never free a connection: they
//! mark it dead, and `Server::reap` removes it after the batch, so a slab key
//! stays valid for the whole turn.
//!
//! This file holds the loop, timers, signals and reaping; the steps live in
//! `accept.rs` (clients and scrapers), `input.rs` (the read path),
//! `route.rs` (login, routing, error lines) and `output.rs` (the write
//! path). They are all `impl Server` blocks over the one state below.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Write};
use std::net::Shutdown;
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::Config;
use crate::conn::{
    Conn, DEAD, INPUT_DONE, MORE_INPUT, PENDING_WRITE, Phase, REJECTED, WRITABLE_ARMED,
    WRITE_BLOCKED, WRITE_SHUT,
};
use crate::metrics::{self, Gauges, MetricsConn, Next};
use crate::pool::{BufPool, PoolLimits};
use crate::protocol::{self, ErrorKind, Split};
use crate::registry::Registry;
use crate::stats::Stats;
use crate::timers::{Timer, TimerKind, Timers};

mod accept;
mod input;
mod output;
mod route;

use accept::{REJECT_SLOTS, fit_max_clients};
use input::{Drain, READ_CHUNK};

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const METRICS_LISTENER: Token = Token(usize::MAX - 2);
/// Metrics connections use tokens from here up (their slab key added);
/// client tokens are slab keys, far below.
const METRICS_BASE: usize = usize::MAX / 2;
/// How often the systemd status line is refreshed, when systemd listens.
const NOTIFY_STATUS_MS: u64 = 5000;

/// Events taken from the poller per turn.
const EVENTS_CAPACITY: usize = 1024;
/// The most time a connection closed with an error gets to flush and linger.
const CLOSE_GRACE_MS: u64 = 2000;
/// Stale timer entries tolerated before the heaps are compacted.
const TIMERS_SLACK: usize = 1024;
/// What the buffer pool may hold: 256 buffers for good, up to 8,192 (and
/// 4 MiB) while a busy second needs them.
const POOL_LIMITS: PoolLimits = PoolLimits {
    keep: 256,
    max_free: 8192,
    max_bytes: 4 << 20,
};
/// How often the pool frees the buffers it held unused, while it holds more
/// than it keeps.
const POOL_DECAY_MS: u64 = 1000;
/// Buffers freed by one decay that make it worth handing pages back.
const POOL_TRIM_AFTER: usize = 64;
/// Closes since the peak after which freed memory is handed back to the
/// kernel (when also at least half of the peak's connections are gone).
const GIVE_BACK_AFTER: usize = 64;

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A signal asked for shutdown, and it completed.
    Graceful,
    /// A second signal arrived during shutdown: stop at once.
    Forced,
}

/// Serves `listener` until a signal ends it (see [`Exit`]). The listener
/// should be bound already; [`crate::bind`] sets the backlog and options.
pub fn run(listener: std::net::TcpListener, config: Config) -> io::Result<Exit> {
    run_with_metrics(listener, None, config)
}

/// [`run`], also serving `GET /metrics` and `GET /healthz` on `metrics`.
pub fn run_with_metrics(
    listener: std::net::TcpListener,
    metrics: Option<std::net::TcpListener>,
    config: Config,
) -> io::Result<Exit> {
    Server::new(listener, metrics, config)?.run()
}

/// The broker: the poller, the connections and everything shared by them.
struct Server {
    /// The poller every socket is registered with.
    poll: Poll,
    /// The listening socket; `None` once shutdown has begun.
    listener: Option<TcpListener>,
    /// SIGINT, SIGTERM and SIGUSR1 as poll events, when handled.
    signals: Option<Signals>,
    /// Every connection, keyed by its poll token.
    conns: Slab<Conn>,
    /// Logged-in names.
    registry: Registry,
    /// Buffers for connections that have something to keep.
    pool: BufPool,
    /// Login, idle and close deadlines.
    timers: Timers,
    /// The counters.
    stats: Stats,
    /// The tunables.
    config: Config,
    /// `config.max_clients`, fitted to the open-file limit.
    max_clients: usize,
    /// Shared read buffer: `max_line + 2` bytes of room in front for a
    /// connection's unterminated tail, then `READ_CHUNK` for the read.
    scratch: Vec<u8>,
    /// The `from ...` line being routed, formatted once for all recipients.
    delivery: Vec<u8>,
    /// The `error: ...` line being sent.
    error_line: Vec<u8>,
    /// Connections with output queued this turn, flushed at its end.
    pending_write: Vec<usize>,
    /// Connections that stopped reading at their budget, served next turn.
    more_input: Vec<usize>,
    /// The other come-back list, swapped with `more_input` each turn so
    /// neither is reallocated.
    more_input_spare: Vec<usize>,
    /// Connections marked dead this turn, removed by `reap`.
    dead: Vec<usize>,
    /// Rejected connections still in the slab, delivering `server-full`.
    rejecting: usize,
    /// The most connections open at once since memory was last handed back.
    peak_conns: usize,
    /// Whether memory was handed back while part of a burst is still open.
    burst_closing: bool,
    /// The id the next connection gets (wrapping).
    next_id: u32,
    /// Sequence number of the message being routed (see `Conn::route_mark`).
    route_seq: u32,
    /// The server's start; all deadlines are ms since then.
    started: Instant,
    /// The time of the current turn, in ms since `started`.
    now_ms: u64,
    /// When accepting resumes after running out of descriptors.
    accept_resume_ms: Option<u64>,
    /// Whether descriptor exhaustion was logged since the last good accept.
    accept_exhaustion_logged: bool,
    /// When the pool next frees the buffers it held unused; `None` while
    /// it holds no more than it keeps.
    pool_decay_ms: Option<u64>,
    /// When the next stats line is due.
    next_stats_ms: Option<u64>,
    /// When shutdown gives up flushing; `Some` once shutdown has begun.
    shutdown_deadline_ms: Option<u64>,
    /// The metrics listener, with `--metrics-addr`.
    metrics_listener: Option<TcpListener>,
    /// Open scraper connections (at most `metrics::MAX_CONNS`).
    metrics: Slab<MetricsConn>,
    /// When the next systemd status line is due; `None` when systemd is
    /// not listening (no `NOTIFY_SOCKET`).
    next_status_ms: Option<u64>,
}

impl Server {
    fn new(
        listener: std::net::TcpListener,
        metrics: Option<std::net::TcpListener>,
        config: Config,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener (on
        // Linux), which saves a system call per accept. The server batches
        // its own writes; Nagle would only add latency.
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let signals = if config.handle_signals {
            let mut signals = Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)?;
            Some(signals)
        } else {
            None
        };
        let metrics_listener = match metrics {
            Some(metrics) => {
                metrics.set_nonblocking(true)?;
                let mut metrics = TcpListener::from_std(metrics);
                poll.registry()
                    .register(&mut metrics, METRICS_LISTENER, Interest::READABLE)?;
                info!("metrics on http://{}/metrics", metrics.local_addr()?);
                Some(metrics)
            }
            None => None,
        };
        let scrapers = if metrics_listener.is_some() {
            metrics::MAX_CONNS
        } else {
            0
        };
        let max_clients = fit_max_clients(config.max_clients, scrapers);
        let now_ms = 0;
        let next_stats_ms =
            (!config.stats_interval.is_zero()).then(|| millis(config.stats_interval));
        info!(
            "chatd listening on {} (max-clients {}, max-line {}, max-outbound {}, \
             login-timeout {}, idle-timeout {})",
            listener.local_addr()?,
            max_clients,
            config.max_line,
            config.max_outbound,
            Seconds(config.login_timeout),
            Seconds(config.idle_timeout),
        );
        Ok(Server {
            poll,
            listener: Some(listener),
            signals,
            // Reserved for max_clients up front, so a connect storm never
            // stops to copy a grown slab; untouched pages cost no memory. (The
            // registry grows instead: a hash table's pages are touched at
            // random, so a reservation would cost its full size at once.)
            conns: Slab::with_capacity(max_clients + REJECT_SLOTS),
            registry: Registry::default(),
            pool: BufPool::new(POOL_LIMITS),
            timers: Timers::default(),
            stats: Stats::default(),
            scratch: vec![0; config.max_line + 2 + READ_CHUNK],
            config,
            max_clients,
            delivery: Vec::new(),
            error_line: Vec::new(),
            pending_write: Vec::new(),
            more_input: Vec::new(),
            more_input_spare: Vec::new(),
            dead: Vec::new(),
            rejecting: 0,
            peak_conns: 0,
            burst_closing: false,
            next_id: 0,
            route_seq: 0,
            started: Instant::now(),
            now_ms,
            accept_resume_ms: None,
            accept_exhaustion_logged: false,
            pool_decay_ms: None,
            next_stats_ms,
            shutdown_deadline_ms: None,
            metrics_listener,
            metrics: Slab::new(),
            next_status_ms: notify_systemd(&[
                NotifyState::Ready,
                NotifyState::Status("listening, 0 connections"),
            ])
            .then_some(NOTIFY_STATUS_MS),
        })
    }

    /// The loop. Returns when shutdown completes or is forced.
    fn run(mut self) -> io::Result<Exit> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            match self.poll.poll(&mut events, self.poll_timeout()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.now_ms = millis(self.started.elapsed());
            let spare = std::mem::take(&mut self.more_input_spare);
            let carried = std::mem::replace(&mut self.more_input, spare);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS => {
                        if self.on_signals() == Some(Exit::Forced) {
                            return Ok(Exit::Forced);
                        }
                    }
                    METRICS_LISTENER => self.accept_metrics(),
                    Token(token) if token >= METRICS_BASE => self.on_metrics_event(token),
                    Token(key) => self.on_event(key, event),
                }
            }
            self.serve_more_input(carried);
            self.fire_timers();
            self.flush_pending();
            self.reap();
            if self.pool_decay_ms.is_none() && self.pool.is_over_keep() {
                self.pool_decay_ms = Some(self.now_ms + POOL_DECAY_MS);
            }
            if let Some(deadline) = self.shutdown_deadline_ms {
                if self.conns.is_empty() || self.now_ms >= deadline {
                    info!(
                        "shutdown complete; {} connection(s) closed before draining; {}",
                        self.conns.len(),
                        self.stats
                    );
                    return Ok(Exit::Graceful);
                }
            }
        }
    }

    /// Zero while input is left over; else until the earliest deadline.
    fn poll_timeout(&self) -> Option<Duration> {
        if !self.more_input.is_empty() {
            return Some(Duration::ZERO);
        }
        let metrics_deadline = self.metrics.iter().map(|(_, m)| m.deadline_ms).min();
        [
            self.timers.next_at(),
            self.accept_resume_ms,
            self.pool_decay_ms,
            self.next_stats_ms,
            self.shutdown_deadline_ms,
            metrics_deadline,
            self.next_status_ms,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| Duration::from_millis(at.saturating_sub(self.now_ms)))
    }

    /// Dispatches one poll event for a connection.
    fn on_event(&mut self, key: usize, event: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(key) else {
            return; // spurious: the connection is gone
        };
        if conn.has(DEAD) {
            return;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            conn.flags &= !WRITE_BLOCKED;
            if conn.pending_out() > 0 {
                self.mark_pending(key);
            }
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            // A FIN or error already reported by this event raises no new
            // edge: then read to the end instead of trusting a short read.
            let drain = if event.is_read_closed() || event.is_error() {
                Drain::UntilWouldBlock
            } else {
                Drain::UntilShortRead
            };
            self.on_readable(key, drain);
        }
    }

    /// Fires due deadlines, the stats line and the end of an accept pause.
    fn fire_timers(&mut self) {
        while let Some((kind, timer)) = self.timers.pop_due(self.now_ms) {
            let key = timer.key as usize;
            let Some(conn) = self.conns.get(key) else {
                continue;
            };
            if conn.id != timer.id || conn.has(DEAD) {
                continue; // the connection it was set for is gone
            }
            match (kind, conn.phase) {
                (TimerKind::Login, Phase::Login) => {
                    self.close_with_error(key, ErrorKind::LoginTimeout, format_args!(""));
                }
                // A client that sent EOF but never reads what is queued for
                // it stays idle too: it must not hold its slot for ever.
                (TimerKind::Idle, Phase::Chat | Phase::Draining) => {
                    let idle = millis(self.config.idle_timeout);
                    let silent = u64::from((self.now_ms as u32).wrapping_sub(conn.last_input_ms));
                    if silent >= idle {
                        self.close_with_error(key, ErrorKind::IdleTimeout, format_args!(""));
                    } else {
                        self.add_timer(key, TimerKind::Idle, idle - silent);
                    }
                }
                (TimerKind::Close, Phase::Closing) => self.kill(key),
                _ => {} // the deadline no longer applies
            }
        }
        if self.accept_resume_ms.is_some_and(|at| at <= self.now_ms) {
            self.accept_resume_ms = None;
            self.accept_all();
        }
        if self.pool_decay_ms.is_some_and(|at| at <= self.now_ms) {
            if self.pool.decay() >= POOL_TRIM_AFTER {
                trim_heap();
            }
            self.pool_decay_ms = self
                .pool
                .is_over_keep()
                .then_some(self.now_ms + POOL_DECAY_MS);
        }
        if !self.metrics.is_empty() {
            let now = self.now_ms;
            self.metrics.retain(|_, conn| conn.deadline_ms > now);
        }
        if let Some(at) = self.next_status_ms.filter(|&at| at <= self.now_ms) {
            let status = format!(
                "{} connections, {} logged in, {} deliveries",
                self.stats.connections,
                self.registry.len(),
                self.stats.deliveries
            );
            notify_systemd(&[NotifyState::Status(&status)]);
            self.next_status_ms = Some(at.max(self.now_ms) + NOTIFY_STATUS_MS);
        }
        if let Some(at) = self.next_stats_ms.filter(|&at| at <= self.now_ms) {
            info!("stats: {}", self.stats);
            let interval = millis(self.config.stats_interval);
            self.next_stats_ms = Some((at + interval).max(self.now_ms + 1));
        }
    }

    /// Sets a deadline `after_ms` from now for the connection at `key`.
    fn add_timer(&mut self, key: usize, kind: TimerKind, after_ms: u64) {
        let timer = Timer {
            at_ms: self.now_ms.saturating_add(after_ms),
            // Slab keys stay far below 2^32: each is an open descriptor.
            key: key as u32,
            id: self.conns[key].id,
        };
        self.timers.push(kind, timer);
    }

    /// Marks a connection dead: its name is released now, the connection is
    /// removed by `Server::reap` at the end of the turn.
    fn kill(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.has(DEAD) {
            return;
        }
        if conn.phase == Phase::Chat {
            self.registry.release(&conn.name);
        }
        conn.phase = Phase::Closing;
        conn.flags |= DEAD;
        self.dead.push(key);
    }

    /// Removes the connections marked dead; dropping the socket closes it,
    /// which also takes it out of the poller.
    fn reap(&mut self) {
        let mut dead = std::mem::take(&mut self.dead);
        for &key in &dead {
            let mut conn = self.conns.remove(key);
            if conn.has(REJECTED) {
                self.rejecting -= 1;
            } else {
                self.stats.connections -= 1;
            }
            conn.release_buffers(&mut self.pool);
            debug!("#{} closed", conn.id);
        }
        dead.clear();
        self.dead = dead;
        // A connection has at most two live deadlines (login or idle, and
        // close); past that, most entries are stale: drop them.
        if self.timers.len() > 2 * self.conns.len() + TIMERS_SLACK {
            self.compact_timers();
        }
        let open = self.conns.len();
        let burst_gone = self.peak_conns >= GIVE_BACK_AFTER + open && self.peak_conns >= 2 * open;
        // The last few connections of a burst handed back in part. (Not
        // any last connection: a client that connects and closes over and
        // over must not make every close a heap trim.)
        let burst_ended = open == 0 && self.burst_closing;
        if burst_gone || burst_ended {
            self.peak_conns = open;
            self.burst_closing = open > 0;
            self.give_back_memory();
        }
    }

    /// Drops the deadlines of connections that moved on or are gone.
    fn compact_timers(&mut self) {
        let conns = &self.conns;
        self.timers.retain(|kind, timer| {
            conns.get(timer.key as usize).is_some_and(|conn| {
                conn.id == timer.id
                    && !conn.has(DEAD)
                    && matches!(
                        (kind, conn.phase),
                        (TimerKind::Login, Phase::Login)
                            | (TimerKind::Idle, Phase::Chat | Phase::Draining)
                            | (TimerKind::Close, Phase::Closing)
                    )
            })
        });
    }

    /// After a burst of connections has closed: frees the room the burst
    /// left in the pool, the registry, the timer heaps and the lists, then
    /// hands the heap's free pages back to the kernel. Without this, RSS
    /// would stay at the burst's peak until the memory is reused.
    fn give_back_memory(&mut self) {
        let started = Instant::now();
        self.pool.clear();
        self.registry.shrink();
        self.compact_timers();
        self.timers.shrink();
        for list in [
            &mut self.pending_write,
            &mut self.more_input,
            &mut self.more_input_spare,
            &mut self.dead,
        ] {
            list.shrink_to_fit();
        }
        trim_heap();
        debug!("memory handed back in {:?}", started.elapsed());
    }

    /// Handles pending signals. Returns `Some(Exit::Forced)` on a second
    /// shutdown signal.
    fn on_signals(&mut self) -> Option<Exit> {
        let signals: Vec<i32> = match &mut self.signals {
            Some(signals) => signals.pending().collect(),
            None => return None,
        };
        for signal in signals {
            match signal {
                SIGUSR1 => info!("stats: {}", self.stats),
                _ if self.shutdown_deadline_ms.is_some() => {
                    warn!("second shutdown signal: exiting at once; {}", self.stats);
                    return Some(Exit::Forced);
                }
                _ => {
                    info!(
                        "shutdown signal received: closing {} connection(s)",
                        self.conns.len()
                    );
                    self.begin_shutdown();
                }
            }
        }
        None
    }

    /// Stops accepting and reading, queues `error: shutting-down` to every
    /// client and lets the loop flush until the shutdown deadline.
    fn begin_shutdown(&mut self) {
        self.shutdown_deadline_ms = Some(self.now_ms + millis(self.config.shutdown_timeout));
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.metrics_listener = None;
        self.metrics.clear();
        self.next_status_ms = None;
        notify_systemd(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close_with_error(key, ErrorKind::ShuttingDown, format_args!(""));
        }
    }
}

/// Tells systemd about the service's state when it listens (`Type=notify`
/// sets `NOTIFY_SOCKET`). Returns whether it does; failures are logged.
fn notify_systemd(states: &[NotifyState]) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify systemd: {e}");
    }
    true
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

/// Displays a timeout as `off` or in seconds.
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            f.write_str("off")
        } else {
            write!(f, "{}s", self.0.as_secs_f64())
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
