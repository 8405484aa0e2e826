//! The reactor: one `mio::Poll` loop that owns every connection.
//!
//! One loop turn (`Server::run`): wait for events (at most until the next
//! deadline), fence if the lease cannot be trusted, dispatch each event by
//! its `Source` (accept, read and route, where routing only appends to
//! outbound buffers; scrapers; the Redis link; requests from the
//! [`Control`]) as the server's phase of life allows, serve connections
//! that had input left over from the last turn, fire due deadlines, apply
//! what the cluster link learned, write every connection on the
//! pending-write list once, and end the turn with housekeeping (reap the
//! connections marked dead, hand memory back after a burst) and the next
//! step of an upgrade.
//!
//! The state is split by responsibility; this file only ties it together:
//!
//! - `life.rs`: the server's life (`Life`: serving, quiescing, upgrading,
//!   retiring, shutting down), the requests that move it, shutdown.
//! - `clients.rs`: the connection table (slab, name index, pool) and each
//!   connection's life from accept to reap; `input.rs` and `output.rs`
//!   are its read and write paths.
//! - `broker.rs`: what a line means: login, routing, `error:` lines.
//! - `housekeeping.rs`: pool decay, memory give-back, stats and status.
//! - `scrapers.rs`: the metrics endpoint's listener and connections.
//! - `remote.rs`: cluster mode: what the link to Redis learned, applied to
//!   the clients; fencing.
//! - `held.rs`: cluster mode: every line held for a client because of
//!   Redis, in the one buffer account.
//! - `upgrade.rs`: a live upgrade, in both processes: quiesce, snapshot,
//!   hand over, wait, retire or resume; adopting connections in the new
//!   process.
//! - `crate::deadlines`: every deadline, in one heap, and the loop's clock.

use std::fmt;
use std::io;
use std::time::Duration;

use log::info;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::cluster::Cluster;
use crate::config::Config;
use crate::control::{Control, Exit, Notifier, Requests, Silent};
use crate::deadlines::{Deadline, Deadlines};
use crate::handoff::{Inherited, Successor};
use crate::metrics::{self, Gauges};

mod broker;
mod clients;
mod held;
mod housekeeping;
mod input;
mod life;
mod output;
mod remote;
mod scrapers;
mod upgrade;
mod websocket;

use broker::Broker;
use clients::{Clients, Limits, default_buffer_memory, fit_max_clients};
use housekeeping::Housekeeping;
use input::{Drain, READ_CHUNK};
use life::Life;
use scrapers::Scrapers;
use upgrade::adopt;

/// Events taken from the poller per turn.
const EVENTS_CAPACITY: usize = 1024;

/// What a poll token stands for. The token's low bits say which kind of
/// source it is, the rest is a slab key where there is one; this type is
/// the only place that knows the encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A client connection, by slab key.
    Client(usize),
    /// A metrics scraper, by its slab key in `Scrapers`.
    Scraper(usize),
    /// The chat listener.
    Listener,
    /// The metrics listener.
    MetricsListener,
    /// The [`Control`]'s waker.
    Waker,
    /// Cluster mode: the link to a Redis, by its shard.
    Redis(usize),
    /// A live upgrade's readiness pipe.
    Upgrade,
    /// Cluster mode: the lease's own connection to a Redis, by its shard.
    Lease(usize),
    /// The WebSocket listener.
    WsListener,
}

impl Source {
    const TAG_BITS: u32 = 4;
    const TAG_MASK: usize = (1 << Self::TAG_BITS) - 1;

    /// The poll token for this source.
    pub fn token(self) -> Token {
        Token(match self {
            Source::Client(key) => key << Self::TAG_BITS,
            Source::Scraper(key) => key << Self::TAG_BITS | 1,
            Source::Listener => 2,
            Source::MetricsListener => 3,
            Source::Waker => 4,
            Source::Redis(shard) => shard << Self::TAG_BITS | 5,
            Source::Upgrade => 6,
            Source::Lease(shard) => shard << Self::TAG_BITS | 7,
            Source::WsListener => 8,
        })
    }

    /// The source a poll token stands for; `None` for a token this type
    /// never made.
    pub fn of(token: Token) -> Option<Source> {
        let index = token.0 >> Self::TAG_BITS;
        Some(match token.0 & Self::TAG_MASK {
            0 => Source::Client(index),
            1 => Source::Scraper(index),
            5 => Source::Redis(index),
            7 => Source::Lease(index),
            _ if index != 0 => return None, // the others are one of a kind
            2 => Source::Listener,
            3 => Source::MetricsListener,
            4 => Source::Waker,
            6 => Source::Upgrade,
            8 => Source::WsListener,
            _ => return None,
        })
    }
}

/// What [`run_with`] serves besides the chat listener.
#[derive(Default)]
pub struct Extras {
    /// A listener for `GET /metrics` and `GET /healthz`, if any.
    pub metrics: Option<std::net::TcpListener>,
    /// A listener for WebSocket clients (`--ws-addr`), if any.
    pub websocket: Option<std::net::TcpListener>,
    /// Told when the server is ready, its status, and when it stops; by
    /// default nobody is.
    pub notifier: Option<Box<dyn Notifier>>,
    /// The binary and arguments a live upgrade starts (the `chatd` binary
    /// passes its own); `None`: upgrade requests are refused.
    pub successor: Option<Successor>,
    /// What a live upgrade handed to this process: its connections are
    /// adopted instead of starting empty, and the old process is told once
    /// they are.
    pub inherited: Option<Inherited>,
}

/// Serves `listener` until `control` stops it (see [`Exit`]). The listener
/// should be bound already; [`crate::bind`] sets the backlog and options.
/// Changes no process-wide state: signals and the open-file limit are the
/// caller's (the `chatd` binary handles both).
pub fn run(listener: std::net::TcpListener, config: Config, control: Control) -> io::Result<Exit> {
    run_with(listener, config, control, Extras::default())
}

/// [`run`], with a metrics endpoint and a notifier.
pub fn run_with(
    listener: std::net::TcpListener,
    config: Config,
    control: Control,
    extras: Extras,
) -> io::Result<Exit> {
    let (server, inherited) = Server::new(listener, config, control, extras)?;
    server.run(inherited)
}

/// What a live upgrade handed the new process: the old process to tell
/// once this one serves, and the adopted connections whose kept input holds
/// whole lines (see `upgrade.rs`).
type TakeOver = (Inherited, Vec<usize>);

/// The reactor's state, by responsibility.
struct Server {
    /// The poller every socket is registered with.
    poll: Poll,
    /// Every client connection.
    clients: Clients,
    /// Login and routing.
    broker: Broker,
    /// Every deadline, and the time of this turn.
    deadlines: Deadlines,
    /// Pool decay, memory give-back, stats and status.
    housekeeping: Housekeeping,
    /// The metrics endpoint, when served; `None` after shutdown begins.
    scrapers: Option<Scrapers>,
    /// Shared read buffer: `max_line + 2` bytes of room in front for a
    /// connection's unterminated tail, then `READ_CHUNK` for the read
    /// (with a WebSocket listener, room for a kept frame between them: see
    /// `websocket.rs`).
    scratch: Vec<u8>,
    /// The tunables.
    config: Config,
    /// Requests from outside the loop.
    control: Control,
    /// The requests already acted on.
    seen: Requests,
    /// Where the server is in its life.
    life: Life,
    /// Cluster mode: the link to Redis and the lease.
    cluster: Option<Cluster>,
    /// When the `Deadline::Cluster` set last is due (`u64::MAX`: none).
    cluster_tick_at: u64,
    /// What a live upgrade starts.
    successor: Option<Successor>,
    /// Deadlines that came due while connections were handed over: acted
    /// on if serving resumes.
    postponed: Vec<Deadline>,
    /// Numbers the steps of live upgrades, so that a step's timeout never
    /// ends a later step.
    upgrade_steps: u32,
    /// Descriptors open once the loop was set up (standard streams, the
    /// poller, the waker, the listeners), to which the metrics add the
    /// connections it holds instead of listing `/proc/self/fd`.
    base_fds: usize,
}

impl Server {
    /// The server, and what a live upgrade handed it: the old process to
    /// tell once this one serves, and the adopted connections whose kept
    /// input holds whole lines (see `upgrade.rs`).
    fn new(
        listener: std::net::TcpListener,
        config: Config,
        control: Control,
        extras: Extras,
    ) -> io::Result<(Server, Option<TakeOver>)> {
        housekeeping::fix_mmap_threshold();
        listener.set_nonblocking(true)?;
        // Accepted sockets inherit TCP_NODELAY from the listener (on
        // Linux), which saves a system call per accept. The server batches
        // its own writes; Nagle would only add latency.
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(&mut listener, Source::Listener.token(), Interest::READABLE)?;
        let ws_listener = match extras.websocket {
            Some(ws) => {
                ws.set_nonblocking(true)?;
                socket2::SockRef::from(&ws).set_tcp_nodelay(true)?;
                let mut ws = TcpListener::from_std(ws);
                registry.register(&mut ws, Source::WsListener.token(), Interest::READABLE)?;
                Some(ws)
            }
            None => None,
        };
        control.attach(Waker::new(registry, Source::Waker.token())?)?;
        let scrapers = match extras.metrics {
            Some(metrics) => Some(Scrapers::new(metrics, registry)?),
            None => None,
        };
        let reserve = if scrapers.is_some() {
            metrics::MAX_CONNS
        } else {
            0
        };
        // Descriptors that are not clients (standard streams, the poller,
        // the waker, the listeners), listed once: at ten thousand inherited
        // connections the listing costs milliseconds.
        let base_fds = match &extras.inherited {
            Some(inherited) => inherited.state.base_fds as usize,
            None => std::fs::read_dir("/proc/self/fd").map_or(16, |dir| dir.count()),
        };
        let max_clients = fit_max_clients(config.max_clients, reserve, base_fds);
        let limits = Limits {
            max_line: config.max_line,
            max_outbound: config.max_outbound,
            login_timeout_ms: millis(config.login_timeout),
            idle_timeout_ms: millis(config.idle_timeout),
            max_buffer_memory: config
                .max_buffer_memory
                .unwrap_or_else(default_buffer_memory),
        };
        log_start(&listener, &config, &limits, max_clients)?;
        if let Some(ws) = &ws_listener {
            let addr = ws.local_addr()?;
            info!(
                "chatd websocket on ws://{addr}/ (web client at http://{addr}/){}",
                if config.ws_echo {
                    "; --ws-echo: messages are echoed, not routed"
                } else {
                    ""
                }
            );
        }
        let mut deadlines = Deadlines::default();
        let scratch_len = match &ws_listener {
            Some(_) => config.max_line + 2 + websocket::raw_room(config.max_line) + READ_CHUNK,
            None => config.max_line + 2 + READ_CHUNK,
        };
        let mut clients = Clients::new(listener, ws_listener, limits, max_clients);
        let inherited_node = extras.inherited.as_ref().and_then(|i| i.state.node.clone());
        let mut cluster = config.cluster.clone().map(|cluster| {
            clients.released = Some(Vec::new());
            // After a live upgrade, the same node: its lease and names stay.
            let node = inherited_node.unwrap_or_else(crate::cluster::new_node_id);
            info!(
                "cluster: node {node}, Redis at {}, prefix {:?}, lease {} ms",
                cluster.shown(),
                cluster.prefix,
                cluster.lease_ms
            );
            Cluster::new(cluster, node, config.max_line)
        });
        // The new process of a live upgrade: everything handed over is
        // adopted before the loop starts (see `upgrade.rs`).
        let mut inherited = extras.inherited;
        let adopted_input = inherited.as_mut().map_or_else(Vec::new, |inherited| {
            let (state, registry) = (&mut inherited.state, poll.registry());
            let head_room = config.max_line + 1;
            let link = cluster.as_mut();
            adopt(
                state,
                &mut clients,
                link,
                registry,
                &mut deadlines,
                head_room,
            )
        });
        let notifier = extras.notifier.unwrap_or_else(|| Box::new(Silent));
        let housekeeping =
            Housekeeping::start(millis(config.stats_interval), notifier, &mut deadlines);
        let server = Server {
            poll,
            clients,
            broker: Broker::default(),
            deadlines,
            housekeeping,
            scrapers,
            scratch: vec![0; scratch_len],
            config,
            control,
            seen: Requests::default(),
            life: Life::Serving {
                upgrade_asked: false,
            },
            successor: extras.successor,
            postponed: Vec::new(),
            upgrade_steps: 0,
            cluster,
            cluster_tick_at: u64::MAX,
            base_fds,
        };
        Ok((server, inherited.map(|i| (i, adopted_input))))
    }

    /// The loop: one turn after another, each a list of named phases, until
    /// the server's life ends. Returns how it ended.
    fn run(mut self, inherited: Option<TakeOver>) -> io::Result<Exit> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        if let Some((inherited, adopted_input)) = inherited {
            self.take_over(inherited, adopted_input);
        }
        self.housekeeping.ready(self.clients.len());
        // A request made before the loop attached its waker woke nobody.
        if let Some(exit) = self.on_requests() {
            return Ok(exit);
        }
        loop {
            if let Some(exit) = self.has_ended() {
                if exit == Exit::Upgraded {
                    // A stop that came since the last look is passed on to
                    // the new process before this one goes.
                    let _ = self.on_requests();
                }
                return Ok(exit);
            }
            self.schedule_cluster();
            match self.poll.poll(&mut events, self.poll_timeout()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.deadlines.tick();
            // Before any input: a node that could not renew its lease in
            // time (or slept through it) closes its clients first.
            if self.touches_clients() {
                self.fence_if_needed();
            }
            let spare = std::mem::take(&mut self.clients.more_input_spare);
            let carried = std::mem::replace(&mut self.clients.more_input, spare);
            for event in events.iter() {
                if let Some(exit) = self.dispatch(event) {
                    return Ok(exit);
                }
            }
            if self.reads_clients() {
                self.serve_more_input(carried);
            } else {
                // Read again when serving resumes, or by the new process.
                self.clients.forget_more_input(carried);
            }
            if !self.touches_clients() {
                self.fire_deadlines();
                continue; // the rest is the new process's, or after
            }
            if let Some(cluster) = &mut self.cluster {
                if cluster.has_unread() {
                    cluster.read_more(self.deadlines.now_ms());
                }
            }
            self.fire_deadlines();
            self.apply_cluster_answers();
            self.flush_all();
            self.housekeeping
                .end_turn(&mut self.clients, &mut self.deadlines);
            if self.cluster.as_mut().is_some_and(Cluster::wave_ended) {
                self.housekeeping
                    .wave_ended(&mut self.clients, &mut self.deadlines);
            }
            self.advance_upgrade();
        }
    }

    /// Dispatches one poll event by its source, as the phase of life
    /// allows. Returns an exit when the life ends with it.
    fn dispatch(&mut self, event: &mio::event::Event) -> Option<Exit> {
        let source = Source::of(event.token())?;
        match source {
            Source::Waker => return self.on_requests(),
            Source::Upgrade => return self.on_upgrade_pipe(),
            // (A retiring process stopped accepting scrapers: no event.)
            Source::MetricsListener => {
                if let Some(scrapers) = &mut self.scrapers {
                    scrapers.accept_all(self.poll.registry(), &mut self.deadlines);
                }
            }
            Source::Scraper(key) => self.on_scraper_event(key),
            // Handing over: what comes is the new process's (or acted on
            // when serving resumes, see `resume_serving`).
            _ if !self.touches_clients() => {}
            Source::Redis(shard) => {
                if let Some(cluster) = &mut self.cluster {
                    cluster.on_event(shard, event, self.deadlines.now_ms());
                }
                // At once: a client's later events this turn must see the
                // answers for its earlier lines.
                self.apply_cluster_answers();
            }
            Source::Lease(shard) => {
                if let Some(cluster) = &mut self.cluster {
                    cluster.on_lease_event(shard, event, self.deadlines.now_ms());
                }
            }
            // Quiescing: clients wait (the new process, or the resumed
            // old one, reads them).
            Source::Client(_) | Source::Listener | Source::WsListener if !self.reads_clients() => {}
            Source::Client(key) => self.on_client_event(key, event),
            Source::Listener | Source::WsListener => {
                let registry = self.poll.registry();
                let websocket = source == Source::WsListener;
                self.clients
                    .accept_all(registry, &mut self.deadlines, websocket);
            }
        }
        None
    }

    /// The end of a turn's work: every connection on the pending-write
    /// list is written once, half-closed ones that drained close, and the
    /// cluster link gets what the clients left for it and is written.
    fn flush_all(&mut self) {
        let registry = self.poll.registry();
        self.clients.flush_pending(registry, &mut self.deadlines);
        for key in std::mem::take(&mut self.clients.drained) {
            if self.clients.get(key).is_some() {
                self.close_if_drained(key);
            }
        }
        if let Some(cluster) = &mut self.cluster {
            broker::sync_cluster(&mut self.clients, cluster, &mut self.deadlines);
            cluster.flush(self.deadlines.now_ms());
        }
    }

    /// Zero while input is left over; else until the earliest deadline.
    fn poll_timeout(&self) -> Option<Duration> {
        let redis_unread = self.cluster.as_ref().is_some_and(Cluster::has_unread);
        // (A connection put on the pending-write list while the list was
        // being written, such as a WebSocket Close answered then, is
        // written next turn, at once.)
        let pending = !self.clients.pending_write.is_empty();
        if !self.clients.more_input.is_empty() || redis_unread || pending {
            return Some(Duration::ZERO);
        }
        let now = self.deadlines.now_ms();
        self.deadlines
            .next_at()
            .map(|at| Duration::from_millis(at.saturating_sub(now)))
    }

    /// Dispatches one poll event for a client connection.
    fn on_client_event(&mut self, key: usize, event: &mio::event::Event) {
        let Some(conn) = self.clients.get(key) else {
            return; // spurious: the connection is gone
        };
        if conn.is_dead() {
            return;
        }
        if (event.is_writable() || event.is_write_closed() || event.is_error())
            && conn.on_writable()
        {
            self.clients.mark_pending(key);
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            // A FIN or error already reported by this event raises no new
            // edge, and urgent data cuts a read short: then read to the
            // end instead of trusting a short read.
            let drain = if event.is_read_closed() || event.is_error() || event.is_priority() {
                Drain::UntilWouldBlock
            } else {
                Drain::UntilShortRead
            };
            self.on_readable(key, drain);
        }
    }

    /// The counters as one `key=value` line (see [`counters`]).
    fn counters(&self) -> String {
        counters(
            &self.clients,
            self.cluster.as_ref(),
            self.deadlines.now_ms(),
        )
    }

    /// Whether new clients are served, and if not, why (for `/healthz`).
    fn health(&self) -> Result<(), &'static str> {
        self.clients.health()?;
        match self.cluster.as_ref().and_then(Cluster::unready_reason) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Dispatches one poll event for a metrics scraper.
    fn on_scraper_event(&mut self, key: usize) {
        let health = self.health();
        let Some(scrapers) = &mut self.scrapers else {
            return;
        };
        let clients = &self.clients;
        let cluster = self.cluster.as_ref();
        let now = self.deadlines.now_ms();
        let open_fds = self.base_fds + clients.len() + scrapers.len();
        let gauges = || Gauges {
            logged_in: clients.logged_in(),
            max_clients: clients.max_clients,
            pooled_bytes: clients.pool.pooled_bytes(),
            buffered_bytes: clients.buffered,
            max_buffer_memory: clients.limits.max_buffer_memory,
            open_fds,
            resident_bytes: None,
            health,
            cluster: cluster.map(|c| metrics::ClusterGauges {
                ready: c.is_ready(),
                shards: match c.shard_count() {
                    1 => Vec::new(),
                    _ => c.shard_gauges(now),
                },
                lease_age_ms: c.lease_age_ms(now),
                stats: c.totals(),
            }),
        };
        let registry = self.poll.registry();
        scrapers.on_event(key, registry, now, health, &clients.stats, gauges);
    }

    /// Handles every deadline that is due. While connections are handed
    /// over, only the upgrade's own and the lease's are acted on; the
    /// others wait in `postponed` until serving resumes.
    fn fire_deadlines(&mut self) {
        while let Some(deadline) = self.deadlines.pop_due() {
            match deadline {
                Deadline::UpgradeStep(step) => self.upgrade_step_due(step),
                Deadline::Cluster if !self.touches_clients() => {
                    self.cluster_tick_at = u64::MAX;
                    let now = self.deadlines.now_ms();
                    if self.cluster.as_mut().is_some_and(|c| c.must_fence(now)) {
                        // The lease cannot wait for a slow new process.
                        self.abort_upgrade(
                            "the lease would expire before the new process was ready",
                        );
                    }
                }
                Deadline::Scraper(slot) => {
                    if let Some(scrapers) = &mut self.scrapers {
                        scrapers.expire(slot);
                    }
                }
                _ if !self.touches_clients() => self.postponed.push(deadline),
                _ => self.fire(deadline),
            }
        }
    }

    /// Acts on one due deadline (see `fire_deadlines`).
    fn fire(&mut self, deadline: Deadline) {
        let registry = self.poll.registry();
        let deadlines = &mut self.deadlines;
        match deadline {
            Deadline::Idle(slot) if self.cluster.as_ref().is_some_and(|c| c.is_throttled(slot)) => {
                // Its input is held back, not missing: not idle.
                if let Some(key) = self.clients.applies(deadline, slot) {
                    let idle = self.clients.limits.idle_timeout_ms;
                    self.clients
                        .set_deadline(key, deadlines, idle, Deadline::Idle);
                }
            }
            Deadline::Login(slot) | Deadline::Idle(slot) | Deadline::Close(slot) => {
                self.clients.on_deadline(deadline, slot, deadlines);
            }
            Deadline::AcceptResume => self.clients.resume_accepting(registry, deadlines),
            Deadline::ScrapersResume => {
                if let Some(scrapers) = &mut self.scrapers {
                    scrapers.resume_accepting(registry, deadlines);
                }
            }
            Deadline::PoolDecay => self.housekeeping.decay_pool(&mut self.clients, deadlines),
            Deadline::StatsLine => {
                let line = counters(&self.clients, self.cluster.as_ref(), deadlines.now_ms());
                self.housekeeping.stats_line(&line, deadlines);
            }
            Deadline::Status => self.housekeeping.status(&self.clients, deadlines),
            Deadline::ShutdownGiveUp => {
                if let Life::ShuttingDown { gave_up, .. } = &mut self.life {
                    *gave_up = true;
                }
            }
            Deadline::Scraper(_) | Deadline::UpgradeStep(_) => {} // see fire_deadlines
            Deadline::Cluster => {
                self.cluster_tick_at = u64::MAX;
                if let Some(cluster) = &mut self.cluster {
                    let now = deadlines.now_ms();
                    let tokens = |shard| crate::cluster::Tokens {
                        link: Source::Redis(shard).token(),
                        lease: Source::Lease(shard).token(),
                    };
                    cluster.on_timer(registry, tokens, now);
                }
            }
        }
    }
}

/// The start line: where chatd listens and the limits in force (tests and
/// scripts read the address from it).
fn log_start(
    listener: &TcpListener,
    config: &Config,
    limits: &Limits,
    max_clients: usize,
) -> io::Result<()> {
    info!(
        "chatd listening on {} (max-clients {}, max-line {}, max-outbound {}, \
         max-buffer-memory {}, login-timeout {}, idle-timeout {}{}{})",
        listener.local_addr()?,
        max_clients,
        limits.max_line,
        limits.max_outbound,
        limits.max_buffer_memory,
        Seconds(config.login_timeout),
        Seconds(config.idle_timeout),
        match &config.cluster {
            Some(c) => format!(", cluster {} prefix {}", c.shown(), c.prefix),
            None => String::new(),
        },
        match socket2::SockRef::from(listener).reuse_port() {
            Ok(true) => ", reuse-port",
            _ => "",
        },
    );
    Ok(())
}

/// The stats line: every counter, and in cluster mode the link's state,
/// the lease's age and the cluster's counters.
fn counters(clients: &Clients, cluster: Option<&Cluster>, now_ms: u64) -> String {
    let mut line = clients.stats.to_string();
    if let Some(cluster) = cluster {
        let stats = &cluster.totals();
        let lease = cluster
            .lease_age_ms(now_ms)
            .map_or_else(|| "none".to_string(), |ms| ms.to_string());
        line += &format!(" cluster={} lease_age_ms={lease}", cluster.state_name());
        if cluster.shard_count() > 1 {
            line += &format!(
                " shards_ready={}/{}",
                cluster.shards_ready(),
                cluster.shard_count()
            );
        }
        for (name, value) in stats.each() {
            line += &format!(" {name}={value}");
        }
        let (window, claims, releases) = cluster.claims_admitted();
        line += &format!(
            " redis_rtt_us={} claim_window={window} claims_queued={claims} releases_queued={releases}",
            stats.rtt_us
        );
    }
    line
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every source comes back from its token, and none share one.
    #[test]
    fn tokens_name_their_source() {
        let sources = [
            Source::Client(0),
            Source::Client(1),
            Source::Client(1 << 40),
            Source::Scraper(0),
            Source::Scraper(15),
            Source::Listener,
            Source::MetricsListener,
            Source::Waker,
            Source::Redis(0),
            Source::Redis(63),
            Source::Upgrade,
            Source::Lease(0),
            Source::Lease(2),
            Source::WsListener,
        ];
        let mut tokens = std::collections::HashSet::new();
        for source in sources {
            assert_eq!(Source::of(source.token()), Some(source));
            assert!(tokens.insert(source.token()), "{source:?} shares a token");
        }
        assert_eq!(Source::of(Token(6 + 16)), None);
        assert_eq!(Source::of(Token(9)), None);
    }
}
