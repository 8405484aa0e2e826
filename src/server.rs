//! The reactor: one `mio::Poll` loop that owns every connection.
//!
//! One loop turn: wait for events (with a timeout set by the next deadline),
//! accept, read and route (routing only appends to outbound buffers), serve
//! connections that had input left over from the last turn, fire due timers,
//! write every connection on the pending-write list once, and finally reap the
//! connections marked dead. Handlers never free a connection: they mark it
//! dead, and [`Server::reap`] removes it after the batch, so a slab key stays
//! valid for the whole turn.

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
use crate::pool::BufPool;
use crate::protocol::{self, ErrorKind, Split};
use crate::registry::Registry;
use crate::stats::Stats;
use crate::timers::{Timer, TimerKind, Timers};

const LISTENER: Token = Token(usize::MAX);
const SIGNALS: Token = Token(usize::MAX - 1);
const METRICS_LISTENER: Token = Token(usize::MAX - 2);
/// Metrics connections use tokens from here up (their slab key added);
/// client tokens are slab keys, far below.
const METRICS_BASE: usize = usize::MAX / 2;
/// How often the systemd status line is refreshed, when systemd listens.
const NOTIFY_STATUS_MS: u64 = 5000;

/// Bytes read per `read` call, and the most read from one connection in one
/// loop turn before others get their turn.
const READ_CHUNK: usize = 64 * 1024;
/// Events taken from the poller per turn.
const EVENTS_CAPACITY: usize = 1024;
/// Connections over `--max-clients` that may linger at once to deliver
/// `error: server-full`; beyond that they get a best-effort write and a close.
const REJECT_SLOTS: usize = 8;
/// Descriptors kept free besides those open at start and the reject slots.
const SPARE_FDS: usize = 8;
/// How long accepting pauses after the process runs out of descriptors.
const ACCEPT_BACKOFF_MS: u64 = 100;
/// The most time a connection closed with an error gets to flush and linger.
const CLOSE_GRACE_MS: u64 = 2000;
/// How long a closed connection lingers for the client's EOF after its
/// sending side was shut down.
const LINGER_MS: u64 = 1000;
/// The most input discarded while lingering before closing regardless.
const LINGER_BYTES: u32 = 64 * 1024;
/// Stale timer entries tolerated before the heaps are compacted.
const TIMERS_SLACK: usize = 1024;
/// The most free buffers the pool keeps.
const POOL_MAX_FREE: usize = 256;

/// When a read loop may stop without seeing `WouldBlock`.
///
/// On Linux, a TCP read that returns less than asked for has emptied the
/// receive queue, and data or a FIN arriving afterwards wakes epoll again,
/// raising a new edge. Stopping at a short read saves one `read` returning
/// `EAGAIN` per message. The exception is a FIN (or error) that arrived
/// before the event being handled: that edge is spent, so when the event
/// reports it, or when no event brought us (the come-back list), the loop
/// reads on until `WouldBlock` or EOF. `tests/readiness.rs` checks that no
/// input or EOF is ever stranded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Stop at the first short read.
    UntilShortRead,
    /// Read until `WouldBlock`, EOF or the budget.
    UntilWouldBlock,
}

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
        let max_clients = fit_max_clients(config.max_clients);
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
            pool: BufPool::new(POOL_MAX_FREE),
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
            next_id: 0,
            route_seq: 0,
            started: Instant::now(),
            now_ms,
            accept_resume_ms: None,
            accept_exhaustion_logged: false,
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

    /// Accepts until `WouldBlock`. Errors never end the server: running out
    /// of descriptors (or kernel memory) pauses accepting for a moment, so
    /// the backlog waits instead of the loop spinning on a ready listener.
    fn accept_all(&mut self) {
        if self.accept_resume_ms.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    self.accept_exhaustion_logged = false;
                    self.on_accept(stream, addr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => {
                    debug!("accept: {e}");
                }
                Err(e) => {
                    if !is_resource_exhaustion(&e) {
                        warn!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms");
                    } else if !self.accept_exhaustion_logged {
                        self.accept_exhaustion_logged = true;
                        warn!(
                            "accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms at a \
                             time until descriptors free up (raise the open-file limit, or \
                             lower --max-clients)"
                        );
                    }
                    self.accept_resume_ms = Some(self.now_ms + ACCEPT_BACKOFF_MS);
                    return;
                }
            }
        }
    }

    /// Accepts scrapers until `WouldBlock`; past `metrics::MAX_CONNS` they
    /// are closed at once.
    fn accept_metrics(&mut self) {
        loop {
            let Some(listener) = &self.metrics_listener else {
                return;
            };
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            };
            if self.metrics.len() >= metrics::MAX_CONNS {
                continue; // dropped: closed
            }
            let entry = self.metrics.vacant_entry();
            let token = Token(METRICS_BASE + entry.key());
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
                .is_ok()
            {
                entry.insert(MetricsConn::new(stream, self.now_ms + metrics::DEADLINE_MS));
            }
        }
    }

    /// Serves a scraper's event; closes it once answered or failed.
    fn on_metrics_event(&mut self, token: usize) {
        let key = token - METRICS_BASE;
        let Server {
            metrics,
            stats,
            registry,
            pool,
            max_clients,
            poll,
            ..
        } = self;
        let Some(conn) = metrics.get_mut(key) else {
            return;
        };
        let gauges = Gauges {
            logged_in: registry.len(),
            max_clients: *max_clients,
            pooled_bytes: pool.pooled_bytes(),
        };
        match conn.on_event(|| metrics::render(stats, &gauges)) {
            Next::Wait => {}
            Next::WaitWritable => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if poll
                    .registry()
                    .reregister(&mut conn.stream, Token(token), interest)
                    .is_err()
                {
                    metrics.remove(key);
                }
            }
            Next::Close => {
                metrics.remove(key);
            }
        }
    }

    /// Registers a new connection, or turns it away when the server is full.
    fn on_accept(&mut self, mut stream: TcpStream, addr: std::net::SocketAddr) {
        self.stats.accepted += 1;
        let full = self.conns.len() - self.rejecting >= self.max_clients;
        if full && self.rejecting >= REJECT_SLOTS {
            self.stats.rejected += 1;
            self.stats.error_sent(ErrorKind::ServerFull);
            let _ = (&stream).write(b"error: server-full\n");
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(key), Interest::READABLE)
        {
            warn!("cannot register connection from {addr}: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        entry.insert(Conn::new(stream, id, self.now_ms as u32));
        if full {
            self.stats.rejected += 1;
            self.rejecting += 1;
            self.conns[key].flags |= REJECTED;
            debug!("rejected {addr}: server full");
            self.close_with_error(key, ErrorKind::ServerFull, format_args!(""));
            return;
        }
        self.stats.opened();
        debug!("accepted {addr} as #{id}");
        if !self.config.login_timeout.is_zero() {
            self.add_timer(key, TimerKind::Login, millis(self.config.login_timeout));
        }
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

    /// Serves connections that stopped at their read budget last turn.
    fn serve_more_input(&mut self, mut carried: Vec<usize>) {
        for &key in &carried {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.has(MORE_INPUT) && !conn.has(DEAD) {
                conn.flags &= !MORE_INPUT;
                // No event brought us here, so no event tells us about a
                // FIN that may wait behind the data: read to the end.
                self.on_readable(key, Drain::UntilWouldBlock);
            }
        }
        carried.clear();
        self.more_input_spare = carried;
    }

    fn on_readable(&mut self, key: usize, drain: Drain) {
        match self.conns[key].phase {
            Phase::Login | Phase::Chat => self.read_lines(key, drain),
            Phase::Closing => self.discard_input(key),
            Phase::Draining => {} // input ended; only output is left
        }
    }

    /// Reads and handles lines until the socket is drained (see [`Drain`]),
    /// EOF, an error, or the per-turn budget (then the connection goes on
    /// the come-back list).
    fn read_lines(&mut self, key: usize, drain: Drain) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let head = self.config.max_line + 2;
        let mut budget = READ_CHUNK;
        loop {
            let conn = &mut self.conns[key];
            let n = match conn.read(&mut scratch[head..]) {
                Ok(0) => {
                    self.on_eof(key);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("#{} read error: {e}", conn.id);
                    self.kill(key);
                    break;
                }
            };
            self.stats.bytes_in += n as u64;
            conn.last_input_ms = self.now_ms as u32;
            // Put the unterminated tail from earlier reads right before the
            // new bytes, so lines are parsed in place from one slice.
            let tail = conn.partial.as_ref().map_or(&[][..], |p| &p.data[..]);
            let start = head - tail.len();
            scratch[start..head].copy_from_slice(tail);
            let Some(tail) = self.handle_lines(key, &scratch[start..head + n]) else {
                self.scratch = scratch;
                // Closing now: drain what is left, or no new event would come
                // for input that already arrived, and closing a socket with
                // unread input resets it, which can destroy the error line.
                if !self.conns[key].has(DEAD) {
                    self.discard_input(key);
                }
                return;
            };
            let conn = &mut self.conns[key];
            if tail.is_empty() {
                self.pool.give(&mut conn.partial);
            } else {
                let partial = conn
                    .partial
                    .get_or_insert_with(|| self.pool.take(tail.len()));
                partial.data.clear();
                partial.data.extend_from_slice(tail);
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                conn.flags |= MORE_INPUT;
                self.more_input.push(key);
                break;
            }
            if n < READ_CHUNK && drain == Drain::UntilShortRead {
                break; // drained: anything arriving later raises a new edge
            }
        }
        self.scratch = scratch;
    }

    /// Handles every complete line in `data` in order. Returns the
    /// unterminated tail to keep, or `None` when the connection stopped
    /// reading lines (closing or dead).
    fn handle_lines<'a>(&mut self, key: usize, data: &'a [u8]) -> Option<&'a [u8]> {
        let max = self.config.max_line;
        let split = protocol::split_lines(data, max, |line| {
            self.handle_line(key, line);
            self.is_reading(key)
        });
        match split {
            Split::Tail(tail) => Some(tail),
            Split::Stopped => None,
            Split::TooLong => {
                let detail = format_args!("max {max} bytes");
                self.close_with_error(key, ErrorKind::LineTooLong, detail);
                None
            }
        }
    }

    /// Whether the connection still reads lines (not closing, not dead).
    fn is_reading(&self, key: usize) -> bool {
        let conn = &self.conns[key];
        matches!(conn.phase, Phase::Login | Phase::Chat) && !conn.has(DEAD)
    }

    /// The client sent EOF: its last unterminated line counts, its name is
    /// released, and it closes once what is queued for it is written.
    fn on_eof(&mut self, key: usize) {
        let mut tail = self.conns[key].partial.take();
        if let Some(line) = &tail {
            self.handle_line(key, &line.data);
        }
        self.pool.give(&mut tail);
        if !self.is_reading(key) {
            return;
        }
        let conn = &mut self.conns[key];
        debug!("#{} sent EOF", conn.id);
        conn.flags |= INPUT_DONE;
        if conn.phase == Phase::Chat {
            self.registry.release(&conn.name);
        }
        conn.phase = Phase::Draining;
        if conn.pending_out() == 0 {
            self.kill(key);
        }
    }

    /// Handles one line from a connection that is reading lines.
    fn handle_line(&mut self, key: usize, raw: &[u8]) {
        let text = match protocol::decode(raw) {
            Ok(Some(text)) => text,
            Ok(None) => return, // blank lines are ignored
            Err(protocol::InvalidUtf8) => {
                self.send_error(key, ErrorKind::InvalidUtf8, format_args!(""));
                return;
            }
        };
        match self.conns[key].phase {
            Phase::Login => self.login(key, text),
            Phase::Chat => self.route(key, text),
            Phase::Draining | Phase::Closing => {}
        }
    }

    fn login(&mut self, key: usize, text: &str) {
        let name = match protocol::parse_name(text) {
            Ok(name) => name,
            Err(why) => {
                self.close_with_error(key, ErrorKind::InvalidName, format_args!("{why}"));
                return;
            }
        };
        let name: Rc<str> = Rc::from(name);
        if !self.registry.claim(&name, key) {
            self.close_with_error(key, ErrorKind::NameTaken, format_args!("{name}"));
            return;
        }
        let conn = &mut self.conns[key];
        debug!("#{} logged in as {name}", conn.id);
        conn.name = name;
        conn.phase = Phase::Chat;
        self.stats.logins += 1;
        if !self.config.idle_timeout.is_zero() {
            self.add_timer(key, TimerKind::Idle, millis(self.config.idle_timeout));
        }
    }

    /// Routes one message line: formats `from <sender>: <body>` once and
    /// appends it to every online recipient named, once each.
    fn route(&mut self, key: usize, text: &str) {
        self.stats.messages_in += 1;
        let Ok(msg) = protocol::parse_message(text) else {
            let detail = protocol::NO_RECIPIENTS_DETAIL;
            self.send_error(key, ErrorKind::NoRecipients, format_args!("{detail}"));
            return;
        };
        let seq = self.next_route_seq();
        let mut line = std::mem::take(&mut self.delivery);
        line.clear();
        protocol::write_delivery(&mut line, &self.conns[key].name, msg.body);
        let mut offline = Offline::default();
        for name in protocol::recipients(msg.names) {
            let Some(to) = self.registry.lookup(name) else {
                offline.add(name);
                continue;
            };
            let recipient = &mut self.conns[to];
            if recipient.route_mark == seq {
                continue; // named twice
            }
            recipient.route_mark = seq;
            if self.enqueue(to, &line) {
                self.stats.deliveries += 1;
            }
        }
        self.delivery = line;
        if !offline.names.is_empty() {
            self.send_error(key, ErrorKind::NotOnline, format_args!("{offline}"));
        }
    }

    /// The next message's sequence number. When the `u32` wraps, every mark
    /// is reset, so an old mark can never equal a new number and skip a
    /// recipient (a scan once per four billion messages).
    fn next_route_seq(&mut self) -> u32 {
        if self.route_seq == u32::MAX {
            for (_, conn) in self.conns.iter_mut() {
                conn.route_mark = 0;
            }
            self.route_seq = 0;
        }
        self.route_seq += 1;
        self.route_seq
    }

    /// Queues `bytes` for `key` within `--max-outbound`; over it, the
    /// connection is closed as a slow consumer. Returns whether it was queued.
    fn enqueue(&mut self, key: usize, bytes: &[u8]) -> bool {
        let conn = &mut self.conns[key];
        let queued = conn.pending_out();
        if queued + bytes.len() > self.config.max_outbound {
            let addr = conn
                .stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            warn!(
                "closing slow consumer {:?} ({addr}): {queued} bytes queued, limit {}",
                conn.name, self.config.max_outbound
            );
            self.stats.slow_consumers += 1;
            self.kill(key);
            return false;
        }
        conn.queue(bytes, &mut self.pool);
        self.mark_pending(key);
        true
    }

    /// Sends an `error:` line that keeps the connection open.
    fn send_error(&mut self, key: usize, kind: ErrorKind, detail: fmt::Arguments<'_>) {
        if !self.is_reading(key) {
            return;
        }
        let mut line = std::mem::take(&mut self.error_line);
        line.clear();
        protocol::write_error(&mut line, kind, detail);
        self.stats.error_sent(kind);
        self.enqueue(key, &line);
        self.error_line = line;
    }

    /// Queues an `error:` line that ends the connection, releases its name
    /// and starts the closing sequence: flush, shut down the sending side,
    /// linger for the client's EOF, close (see [`Server::on_drained`]).
    fn close_with_error(&mut self, key: usize, kind: ErrorKind, detail: fmt::Arguments<'_>) {
        let conn = &mut self.conns[key];
        if conn.has(DEAD) || conn.phase == Phase::Closing {
            return;
        }
        if conn.phase == Phase::Chat {
            self.registry.release(&conn.name);
        }
        conn.phase = Phase::Closing;
        self.pool.give(&mut conn.partial);
        let mut line = std::mem::take(&mut self.error_line);
        line.clear();
        protocol::write_error(&mut line, kind, detail);
        // The final line may go past --max-outbound: it is small and last.
        conn.queue(&line, &mut self.pool);
        self.error_line = line;
        self.stats.error_sent(kind);
        self.mark_pending(key);
        if self.shutdown_deadline_ms.is_none() {
            self.add_timer(key, TimerKind::Close, CLOSE_GRACE_MS);
        }
    }

    /// Reads and drops input from a closing connection; EOF after the
    /// sending side is shut down, or too much input, ends it.
    fn discard_input(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let conn = &mut self.conns[key];
            match conn.read(&mut scratch) {
                Ok(0) => {
                    conn.flags |= INPUT_DONE;
                    if conn.has(WRITE_SHUT) {
                        self.kill(key);
                    }
                    break;
                }
                Ok(n) => {
                    self.stats.bytes_in += n as u64;
                    conn.discarded = conn.discarded.saturating_add(n as u32);
                    if conn.discarded > LINGER_BYTES {
                        self.kill(key);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.kill(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }

    /// Puts `key` on the pending-write list, unless it is there already or
    /// waiting for a writable event.
    fn mark_pending(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.flags & (PENDING_WRITE | WRITE_BLOCKED | DEAD) == 0 {
            conn.flags |= PENDING_WRITE;
            self.pending_write.push(key);
        }
    }

    /// Writes every connection on the pending-write list, once per turn.
    fn flush_pending(&mut self) {
        let mut list = std::mem::take(&mut self.pending_write);
        for &key in &list {
            let conn = &mut self.conns[key];
            conn.flags &= !PENDING_WRITE;
            if !conn.has(DEAD) {
                self.flush(key);
            }
        }
        list.clear();
        self.pending_write = list;
    }

    /// Writes what is queued for `key`. A socket that fills up gets writable
    /// interest (armed once, kept after) and waits for its event.
    fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.flush(&mut self.pool) {
            Ok((n, drained)) => {
                self.stats.bytes_out += n as u64;
                if drained {
                    self.on_drained(key);
                    return;
                }
                conn.flags |= WRITE_BLOCKED;
                if !conn.has(WRITABLE_ARMED) {
                    conn.flags |= WRITABLE_ARMED;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) =
                        self.poll
                            .registry()
                            .reregister(&mut conn.stream, Token(key), interest)
                    {
                        warn!("cannot arm writable interest for #{}: {e}", conn.id);
                        self.kill(key);
                    }
                }
            }
            Err(e) => {
                debug!("#{} write error: {e}", conn.id);
                self.kill(key);
            }
        }
    }

    /// Everything queued for `key` is written: a draining connection closes;
    /// a closing one shuts down its sending side and lingers for EOF.
    fn on_drained(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.phase {
            Phase::Draining => self.kill(key),
            Phase::Closing if conn.has(INPUT_DONE) => self.kill(key),
            Phase::Closing if !conn.has(WRITE_SHUT) => {
                conn.flags |= WRITE_SHUT;
                let _ = conn.stream.shutdown(Shutdown::Write);
                self.add_timer(key, TimerKind::Close, LINGER_MS);
            }
            _ => {}
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
                (TimerKind::Idle, Phase::Chat) => {
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
    /// removed by [`Server::reap`] at the end of the turn.
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
            let conns = &self.conns;
            self.timers.retain(|kind, timer| {
                conns.get(timer.key as usize).is_some_and(|conn| {
                    conn.id == timer.id
                        && !conn.has(DEAD)
                        && matches!(
                            (kind, conn.phase),
                            (TimerKind::Login, Phase::Login)
                                | (TimerKind::Idle, Phase::Chat)
                                | (TimerKind::Close, Phase::Closing)
                        )
                })
            });
        }
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

/// Offline recipients of one message, each once, in the order given.
#[derive(Default)]
struct Offline<'a> {
    /// The names, in order.
    names: Vec<&'a str>,
    /// The same names for O(1) lookups once the list is long, so a line
    /// naming thousands of strangers costs linear time, not quadratic.
    seen: HashSet<&'a str>,
}

impl<'a> Offline<'a> {
    const LINEAR_MAX: usize = 8;

    fn add(&mut self, name: &'a str) {
        if self.names.len() < Self::LINEAR_MAX {
            if !self.names.contains(&name) {
                self.names.push(name);
            }
            return;
        }
        if self.seen.is_empty() {
            self.seen.extend(self.names.iter().copied());
        }
        if self.seen.insert(name) {
            self.names.push(name);
        }
    }
}

impl fmt::Display for Offline<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
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

/// Raises the soft open-file limit to the hard limit and fits `wanted` into
/// what it allows, after the descriptors open now and a small reserve.
fn fit_max_clients(wanted: Option<usize>) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let open = std::fs::read_dir("/proc/self/fd").map_or(16, |dir| dir.count());
    let fit = limit.saturating_sub(open + REJECT_SLOTS + SPARE_FDS);
    match wanted {
        Some(wanted) if wanted > fit => {
            warn!(
                "--max-clients {wanted} does not fit the open-file limit of {limit}: lowered to \
                 {fit}; raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd) to allow more"
            );
            fit
        }
        Some(wanted) => wanted,
        None => fit,
    }
}

/// Accept errors that concern one connection only (it was reset or refused
/// before we took it): skip it and accept the next.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// Accept errors that mean the process or system is out of descriptors or
/// memory: retrying at once would spin.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
