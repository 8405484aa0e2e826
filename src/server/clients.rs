//! The connection table: every client connection in a slab, the index of
//! logged-in names over it, the buffer pool, and each connection's life
//! from accept to reap (`error:` lines that close included). The write path
//! is in `output.rs`, the read path in `input.rs`.
//!
//! Handlers never free: [`Clients::kill`] marks a connection dead and puts
//! it on the reap list, and [`Clients::reap`] removes it after the batch, so
//! a slab key stays valid for the whole turn.

use std::fmt;
use std::io::{self, Write};
use std::net::Shutdown;
use std::rc::Rc;

use compact_str::CompactString;
use log::{debug, warn};
use mio::Registry;
use mio::net::{TcpListener, TcpStream};
use slab::Slab;

use super::Source;
use super::held::Held;
use crate::conn::Slot;
use crate::conn::{Conn, Phase};
use crate::deadlines::{Deadline, Deadlines};
use crate::pool::{BufPool, PoolLimits};

use crate::names::NameIndex;
use crate::protocol::{self, ErrorKind};
use crate::stats::Stats;

/// Connections over `--max-clients` that may linger at once to deliver
/// `error: server-full`; beyond that they get a best-effort write and a close.
pub(super) const REJECT_SLOTS: usize = 8;
/// Descriptors kept free besides those open at start and the reject slots.
const SPARE_FDS: usize = 8;
/// How long accepting pauses after the process runs out of descriptors.
pub(super) const ACCEPT_BACKOFF_MS: u64 = 100;
/// The most time a connection closed with an error gets to flush and linger.
pub(super) const CLOSE_GRACE_MS: u64 = 2000;
/// What the buffer pool may hold: 256 buffers for good, up to 8,192 (and
/// 4 MiB) while a busy second needs them.
const POOL_LIMITS: PoolLimits = PoolLimits {
    keep: 256,
    max_free: 8192,
    max_bytes: 4 << 20,
};

/// The per-connection limits the table enforces, from the config.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// `--max-line`.
    pub max_line: usize,
    /// `--max-outbound`.
    pub max_outbound: usize,
    /// `--login-timeout` in ms; zero = off.
    pub login_timeout_ms: u64,
    /// `--idle-timeout` in ms; zero = off.
    pub idle_timeout_ms: u64,
    /// `--max-buffer-memory`.
    pub max_buffer_memory: usize,
}

/// Every client connection and what is shared by them.
pub(super) struct Clients {
    /// The listening socket; `None` once shutdown has begun.
    listener: Option<TcpListener>,
    /// The WebSocket listener (`--ws-addr`), if any; `None` once shutdown
    /// has begun.
    ws_listener: Option<TcpListener>,
    /// Every connection, keyed by slab key (its poll token is
    /// `Source::Client(key)`).
    pub(super) conns: Slab<Conn>,
    /// Logged-in names to slab keys.
    names: NameIndex,
    /// Buffers for connections that have something to keep.
    pub pool: BufPool,
    /// The limits in force.
    pub limits: Limits,
    /// `--max-clients`, fitted to the open-file limit.
    pub max_clients: usize,
    /// Connections with output queued this turn, flushed at its end.
    pub(super) pending_write: Vec<usize>,
    /// Connections that stopped reading at their budget, served next turn.
    pub(super) more_input: Vec<usize>,
    /// The other come-back list, swapped with `more_input` each turn so
    /// neither is reallocated.
    pub(super) more_input_spare: Vec<usize>,
    /// Connections marked dead this turn, removed by `reap`.
    dead: Vec<usize>,
    /// The `error: ...` line being sent.
    error_line: Vec<u8>,
    /// Rejected connections still in the slab, delivering `server-full`.
    rejecting: usize,
    /// The id the next connection gets (wrapping).
    next_id: u32,
    /// Whether accepting waits for a `Deadline::AcceptResume`.
    accept_paused: bool,
    /// Whether descriptor exhaustion was logged since the last good accept.
    exhaustion_logged: bool,
    /// Whether shutdown has begun (closing connections then share the
    /// shutdown deadline instead of each having a grace).
    shutting_down: bool,
    /// Cluster mode: names released here since the cluster last took them
    /// (to release in Redis, in order with the claims that follow).
    pub(super) released: Option<Vec<CompactString>>,
    /// Cluster mode: half-closed connections whose output was all written
    /// this turn, closed at its end unless an answer is still owed.
    pub(super) drained: Vec<usize>,
    /// Bytes of buffer memory all connections hold together (the sum of
    /// their `Conn::footprint`, and the lines `held` for them), bounded by
    /// `--max-buffer-memory`.
    pub(super) buffered: usize,
    /// Cluster mode: lines held for connections behind Redis's answers.
    pub(super) held: Held,
    /// The counters.
    pub stats: Stats,
}

/// How the name index reads the name of a slab key: the connection's own
/// (a key whose connection is gone reads as no name, which no login has).
fn name_of<'a>(conns: &'a Slab<Conn>) -> impl Fn(usize) -> &'a str {
    |key| conns.get(key).map_or("", |conn| &conn.name)
}

impl Clients {
    /// An empty table serving `listener` (registered already).
    pub fn new(
        listener: TcpListener,
        ws_listener: Option<TcpListener>,
        limits: Limits,
        max_clients: usize,
    ) -> Clients {
        Clients {
            listener: Some(listener),
            ws_listener,
            // Reserved for max_clients up front, so a connect storm never
            // stops to copy a grown slab; untouched pages cost no memory. (The
            // name index grows instead: a hash table's pages are touched at
            // random, so a reservation would cost its full size at once.)
            conns: Slab::with_capacity(max_clients + REJECT_SLOTS),
            names: NameIndex::default(),
            pool: BufPool::new(POOL_LIMITS),
            limits,
            max_clients,
            pending_write: Vec::new(),
            more_input: Vec::new(),
            more_input_spare: Vec::new(),
            dead: Vec::new(),
            error_line: Vec::new(),
            rejecting: 0,
            next_id: 0,
            accept_paused: false,
            exhaustion_logged: false,
            shutting_down: false,
            released: None,
            drained: Vec::new(),
            buffered: 0,
            held: Held::default(),
            stats: Stats::default(),
        }
    }

    /// Whether the server is a cluster node (names go to Redis, answers
    /// may be owed to a connection).
    pub fn in_cluster(&self) -> bool {
        self.released.is_some()
    }

    /// The listening socket, until shutdown begins.
    pub fn listener(&self) -> Option<&TcpListener> {
        self.listener.as_ref()
    }

    /// The WebSocket listener, if any, until shutdown begins.
    pub fn ws_listener(&self) -> Option<&TcpListener> {
        self.ws_listener.as_ref()
    }

    /// The id the next connection gets.
    pub fn next_id(&self) -> u32 {
        self.next_id
    }

    /// Sets the id the next connection gets (a live upgrade carries it on).
    pub fn set_next_id(&mut self, id: u32) {
        self.next_id = id;
    }

    /// Counts an adopted connection that was turned away with `server-full`.
    pub(super) fn adopt_rejected(&mut self) {
        self.rejecting += 1;
    }

    /// Registers the name of an adopted logged-in connection.
    pub(super) fn adopt_name(&mut self, key: usize) -> bool {
        let conns = &self.conns;
        self.names.claim(&conns[key].name, key, name_of(conns))
    }

    /// The connection at `key`. Panics if there is none: callers hold a key
    /// they got this turn.
    pub fn conn(&mut self, key: usize) -> &mut Conn {
        &mut self.conns[key]
    }

    /// The connection at `key` if it is still there (spurious events name
    /// connections already gone).
    pub fn get(&mut self, key: usize) -> Option<&mut Conn> {
        self.conns.get_mut(key)
    }

    /// Open connections, rejected ones included.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Logged-in clients.
    pub fn logged_in(&self) -> usize {
        self.names.len()
    }

    /// Whether new connections are taken (not paused for descriptors,
    /// not full, not shutting down).
    pub fn health(&self) -> Result<(), &'static str> {
        if self.shutting_down {
            Err("shutting down")
        } else if self.accept_paused {
            Err("out of file descriptors: accepting paused")
        } else if self.conns.len() - self.rejecting >= self.max_clients {
            Err("full: --max-clients reached")
        } else {
            Ok(())
        }
    }

    /// The connection holding `name`, if one does.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        self.names.lookup(name, name_of(&self.conns))
    }

    /// Logs `key` in as `name`: false (and nothing changes) if another
    /// connection holds it.
    pub fn log_in(&mut self, key: usize, name: &str, deadlines: &mut Deadlines) -> bool {
        if !self.reserve(key, name) {
            return false;
        }
        self.finish_login(key, deadlines);
        true
    }

    /// Reserves `name` for `key`, which waits in [`Phase::Claiming`]: false
    /// (and nothing changes) if another connection here holds it.
    pub fn reserve(&mut self, key: usize, name: &str) -> bool {
        if !self.names.claim(name, key, name_of(&self.conns)) {
            return false;
        }
        let conn = &mut self.conns[key];
        conn.name = CompactString::from(name);
        let _ = conn.enter(Phase::Claiming); // held nothing before
        true
    }

    /// The name reserved for `key` is its own: it is logged in.
    pub fn finish_login(&mut self, key: usize, deadlines: &mut Deadlines) {
        let conn = &mut self.conns[key];
        debug!("#{} logged in as {}", conn.id, conn.name);
        let _ = conn.enter(Phase::Chat); // keeps the name
        self.stats.logins += 1;
        if self.limits.idle_timeout_ms > 0 {
            self.set_deadline(key, deadlines, self.limits.idle_timeout_ms, Deadline::Idle);
        }
        self.deliver_held(key, deadlines);
    }

    /// Moves `key` to `phase`, releasing its name if it held one.
    pub fn enter(&mut self, key: usize, phase: Phase) {
        if self.conns[key].phase() == Phase::Claiming && phase != Phase::Chat {
            self.route_held_on(key);
        }
        if self.conns[key].enter(phase) {
            self.forget_name(key);
        }
    }

    /// Frees the name of `key`, which stopped holding it.
    fn forget_name(&mut self, key: usize) {
        let name = &self.conns[key].name;
        self.names.release(name, key);
        if let Some(released) = &mut self.released {
            released.push(name.clone());
        }
    }

    /// The connection as deadlines and the cluster remember it.
    pub fn slot(&self, key: usize) -> Slot {
        Slot {
            // Slab keys stay far below 2^32: each is an open descriptor.
            key: key as u32,
            id: self.conns[key].id,
        }
    }

    /// The connection `slot` names, if it is still there.
    pub fn find(&self, slot: Slot) -> Option<usize> {
        let key = slot.key as usize;
        self.conns
            .get(key)
            .is_some_and(|conn| conn.id == slot.id)
            .then_some(key)
    }

    /// Every logged-in name and its connection.
    pub fn logged_in_names(&self) -> Vec<(Rc<str>, usize)> {
        self.conns
            .iter()
            .filter(|(_, conn)| conn.phase() == Phase::Chat && !conn.is_dead())
            .map(|(key, conn)| (Rc::from(conn.name.as_str()), key))
            .collect()
    }

    /// Every connection that holds or claims a name.
    pub fn holders(&self) -> Vec<usize> {
        self.conns
            .iter()
            .filter(|(_, conn)| matches!(conn.phase(), Phase::Claiming | Phase::Chat))
            .map(|(key, _)| key)
            .collect()
    }

    /// An `error:` line as bytes of its own (to hold back behind answers
    /// from the cluster), counted as sent.
    pub fn error_bytes(&mut self, kind: ErrorKind, detail: fmt::Arguments<'_>) -> Vec<u8> {
        let line = self.format_error(kind, detail);
        let owned = line.clone();
        self.error_line = line;
        owned
    }

    /// Queues a line made earlier (an answer from the cluster for a line
    /// the client sent), if `key` still takes output: reading lines, or
    /// half-closed and draining what is queued for it. Returns whether it
    /// was queued.
    pub fn send_line(&mut self, key: usize, line: &[u8], deadlines: &mut Deadlines) -> bool {
        let conn = &self.conns[key];
        if conn.reads_lines() || (conn.phase() == Phase::Draining && !conn.is_dead()) {
            return self.enqueue(key, line, Some(key), deadlines);
        }
        false
    }

    /// Drops the come-back list `carried` while clients are not read
    /// (quiescing or handing over): the server reads every connection again
    /// when serving resumes, and the new process of an upgrade reads them.
    pub fn forget_more_input(&mut self, mut carried: Vec<usize>) {
        for &key in &carried {
            if let Some(conn) = self.conns.get_mut(key) {
                let _ = conn.take_more_input();
            }
        }
        carried.clear();
        self.more_input_spare = carried;
    }

    /// Resets every connection's route mark (see `Broker::next_route_seq`).
    pub fn reset_route_marks(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            conn.route_mark = 0;
        }
    }

    /// Sets a deadline `after_ms` from now for the connection at `key`.
    pub fn set_deadline(
        &self,
        key: usize,
        deadlines: &mut Deadlines,
        after_ms: u64,
        kind: fn(Slot) -> Deadline,
    ) {
        deadlines.set(after_ms, kind(self.slot(key)));
    }

    /// The connection a deadline was set for, if it is still there and the
    /// deadline still applies to it.
    pub fn applies(&self, deadline: Deadline, slot: Slot) -> Option<usize> {
        let key = slot.key as usize;
        let conn = self.conns.get(key)?;
        (conn.id == slot.id && conn.deadline_applies(deadline)).then_some(key)
    }

    /// A connection's deadline is due.
    pub fn on_deadline(&mut self, deadline: Deadline, slot: Slot, deadlines: &mut Deadlines) {
        let Some(key) = self.applies(deadline, slot) else {
            return; // the connection it was set for is gone or moved on
        };
        match deadline {
            // (A WebSocket connection over --max-clients has this long
            // to finish its handshake and hear why it is turned away.)
            Deadline::Login(_) if self.conns[key].is_rejected() => {
                self.error(key, ErrorKind::ServerFull, format_args!(""), deadlines)
            }
            Deadline::Login(_) => {
                self.error(key, ErrorKind::LoginTimeout, format_args!(""), deadlines)
            }
            // A client that sent EOF but never reads what is queued for
            // it stays idle too: it must not hold its slot for ever.
            Deadline::Idle(_) => {
                let idle = self.limits.idle_timeout_ms;
                let now = deadlines.now_ms();
                let last = self.conns[key].last_input_ms;
                let silent = u64::from((now as u32).wrapping_sub(last));
                if silent >= idle {
                    self.error(key, ErrorKind::IdleTimeout, format_args!(""), deadlines);
                } else {
                    self.set_deadline(key, deadlines, idle - silent, Deadline::Idle);
                }
            }
            Deadline::Close(_) => self.kill(key),
            _ => {}
        }
    }

    /// Marks a connection dead: its name is released now, the connection is
    /// removed by [`Clients::reap`] at the end of the turn.
    pub fn kill(&mut self, key: usize) {
        if self.conns[key].phase() == Phase::Claiming {
            self.route_held_on(key);
        }
        let (was_alive, held_name) = self.conns[key].mark_dead();
        if held_name {
            self.forget_name(key);
        }
        if was_alive {
            self.dead.push(key);
        }
    }

    /// Sends an `error:` line. [`ErrorKind::closes`] decides what follows:
    /// a closing error releases the name and starts the closing sequence
    /// (flush, shut down the sending side, linger for the client's EOF,
    /// close; see `Clients::on_drained`); any other is queued like a
    /// message, to a connection that still reads lines.
    pub fn error(
        &mut self,
        key: usize,
        kind: ErrorKind,
        detail: fmt::Arguments<'_>,
        deadlines: &mut Deadlines,
    ) {
        let conn = &self.conns[key];
        let reading = conn.reads_lines();
        if !kind.closes() {
            if reading {
                let line = self.format_error(kind, detail);
                self.enqueue(key, &line, Some(key), deadlines);
                self.error_line = line;
            }
            return;
        }
        if conn.is_dead() || conn.phase() == Phase::Closing {
            return;
        }
        let (websocket, open) = (conn.is_websocket(), conn.is_ws_open());
        let line = self.format_error(kind, detail);
        if websocket && !open {
            // Still in its handshake: an HTTP answer.
            let status = super::websocket::http_status(kind);
            self.close_http(key, status, "", &line, deadlines);
        } else {
            // The final line may go past --max-outbound: it is small and
            // last. A WebSocket client gets it as a text message, then a
            // Close with a code that says why.
            let code = super::websocket::close_code(kind);
            let (close, len) = crate::ws::close_payload(code, kind.as_str());
            self.close_with(key, deadlines, |conn, pool| {
                conn.queue(&line, pool);
                if open {
                    conn.queue_frame(crate::ws::CLOSE, true, &close[..len], pool);
                }
            });
        }
        self.error_line = line;
    }

    /// Whether shutdown has begun.
    pub(super) fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Changes the buffers of `key` with `change`, keeping the total of
    /// buffer memory (`buffered`) true. Every change to a connection's
    /// buffers goes through here.
    pub fn with_buffers<R>(
        &mut self,
        key: usize,
        change: impl FnOnce(&mut Conn, &mut BufPool) -> R,
    ) -> R {
        let conn = &mut self.conns[key];
        let before = conn.footprint();
        let result = change(conn, &mut self.pool);
        self.buffered = self.buffered + conn.footprint() - before;
        result
    }

    /// Whether all connections' buffers together are over
    /// `--max-buffer-memory`.
    pub fn is_over_memory(&self) -> bool {
        self.buffered > self.limits.max_buffer_memory
    }

    /// Closes the connections holding the most buffer memory, as slow
    /// consumers, until `incoming` more bytes fit well under
    /// `--max-buffer-memory` (an eighth of it is kept free, so that an
    /// attack costs a scan per eighth of the bound, not per line).
    /// `exempt`, the sender of the line being handled, is never closed for
    /// another connection's queue. O(connections); runs only at the bound.
    pub fn make_room(&mut self, incoming: usize, exempt: Option<usize>, deadlines: &mut Deadlines) {
        let limit = self.limits.max_buffer_memory;
        let target = limit - limit / 8;
        let mut holders: Vec<(usize, usize)> = self
            .conns
            .iter()
            .filter(|&(key, conn)| Some(key) != exempt && !conn.is_dead())
            .map(|(key, conn)| (conn.footprint() + self.held.bytes(key), key))
            .filter(|&(footprint, _)| footprint > 0)
            .collect();
        holders.sort_unstable_by(|a, b| b.cmp(a));
        for (footprint, key) in holders {
            if self.buffered + incoming <= target {
                break;
            }
            let conn = &self.conns[key];
            let closing = conn.phase() == Phase::Closing;
            warn!(
                "{} {:?} ({}) as a slow consumer: it holds {footprint} bytes and all \
                 clients' buffers reached --max-buffer-memory {limit}",
                if closing {
                    "dropping the queue of closing"
                } else {
                    "closing"
                },
                conn.name,
                peer(conn)
            );
            self.stats.memory_evictions += 1;
            // Its kept input and queue go now, so the memory is free now;
            // only the end of a line it may be writing stays, so that its
            // error line starts a line, and the error line of a connection
            // closing already.
            let websocket = conn.is_ws_open();
            self.with_buffers(key, |conn, _| {
                // Freed, not pooled: the error line below would take the
                // same buffer back from the pool, and free nothing.
                conn.partial = None;
                match &mut conn.out {
                    Some(out) if websocket => out.keep_current_frame(),
                    Some(out) => out.keep_first_line(closing),
                    None => {}
                }
            });
            self.drop_behind(key);
            if closing && websocket {
                // Its error message and Close went with the queue.
                self.kill(key);
            } else if !closing {
                self.close_slow_consumer(key, deadlines);
                // What is left is small: hold it in a buffer of its size,
                // whichever buffer the error line was queued in.
                self.with_buffers(key, |conn, _| {
                    if let Some(out) = &mut conn.out {
                        out.data.shrink_to_fit();
                    }
                });
            }
        }
    }

    /// Closes `key` as a slow consumer: `error: slow-consumer` is queued
    /// after what it has not read yet, and it closes the usual way.
    pub fn close_slow_consumer(&mut self, key: usize, deadlines: &mut Deadlines) {
        self.stats.slow_consumers += 1;
        self.error(key, ErrorKind::SlowConsumer, format_args!(""), deadlines);
    }

    /// Formats an `error:` line into the shared buffer (taken; give it back
    /// to `error_line`) and counts it.
    fn format_error(&mut self, kind: ErrorKind, detail: fmt::Arguments<'_>) -> Vec<u8> {
        let mut line = std::mem::take(&mut self.error_line);
        line.clear();
        protocol::write_error(&mut line, kind, detail);
        self.stats.error_sent(kind);
        line
    }

    /// Stops accepting and queues `error: shutting-down` to every client.
    pub fn begin_shutdown(&mut self, registry: &Registry, deadlines: &mut Deadlines) {
        self.shutting_down = true;
        for listener in [&mut self.listener, &mut self.ws_listener] {
            if let Some(mut listener) = listener.take() {
                let _ = registry.deregister(&mut listener);
            }
        }
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.error(key, ErrorKind::ShuttingDown, format_args!(""), deadlines);
        }
    }

    /// Removes the connections marked dead; dropping the socket closes it,
    /// which also takes it out of the poller. Returns how many it removed.
    pub fn reap(&mut self) -> usize {
        let mut dead = std::mem::take(&mut self.dead);
        let reaped = dead.len();
        for &key in &dead {
            self.with_buffers(key, Conn::release_buffers);
            self.drop_held(key);
            let conn = self.conns.remove(key);
            if conn.is_rejected() {
                self.rejecting -= 1;
            } else {
                self.stats.connections -= 1;
            }
            debug!("#{} closed", conn.id);
        }
        dead.clear();
        self.dead = dead;
        reaped
    }

    /// Drops the deadlines of connections that moved on or are gone.
    pub fn compact_deadlines(&self, deadlines: &mut Deadlines) {
        deadlines.retain(|deadline| match deadline {
            Deadline::Login(slot) | Deadline::Idle(slot) | Deadline::Close(slot) => {
                self.applies(deadline, slot).is_some()
            }
            _ => true,
        });
    }

    /// Frees the room a burst of connections left in the name index, the
    /// pool and the lists (after the burst has gone).
    pub fn shrink(&mut self) {
        self.pool.clear();
        self.names.shrink(name_of(&self.conns));
        for list in [
            &mut self.pending_write,
            &mut self.more_input,
            &mut self.more_input_spare,
            &mut self.dead,
        ] {
            list.shrink_to_fit();
        }
    }

    /// Accepts until `WouldBlock`, on the WebSocket listener if
    /// `websocket`. Errors never end the server: running out of descriptors
    /// (or kernel memory) pauses accepting for a moment, so the backlog
    /// waits instead of the loop spinning on a ready listener.
    pub fn accept_all(&mut self, registry: &Registry, deadlines: &mut Deadlines, websocket: bool) {
        if self.accept_paused {
            return;
        }
        loop {
            let listener = if websocket {
                &self.ws_listener
            } else {
                &self.listener
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, addr)) => {
                    self.exhaustion_logged = false;
                    self.on_accept(stream, addr, websocket, registry, deadlines);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => debug!("accept: {e}"),
                Err(e) => {
                    if !is_resource_exhaustion(&e) {
                        warn!("accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms");
                    } else if !self.exhaustion_logged {
                        self.exhaustion_logged = true;
                        warn!(
                            "accept failed: {e}; pausing accepts for {ACCEPT_BACKOFF_MS} ms at a \
                             time until descriptors free up (raise the open-file limit, or \
                             lower --max-clients)"
                        );
                    }
                    self.accept_paused = true;
                    deadlines.set(ACCEPT_BACKOFF_MS, Deadline::AcceptResume);
                    return;
                }
            }
        }
    }

    /// The accept pause is over: accept what waited.
    pub fn resume_accepting(&mut self, registry: &Registry, deadlines: &mut Deadlines) {
        self.accept_paused = false;
        self.accept_all(registry, deadlines, false);
        self.accept_all(registry, deadlines, true);
    }

    /// Registers a new connection, or turns it away when the server is full.
    fn on_accept(
        &mut self,
        mut stream: TcpStream,
        addr: std::net::SocketAddr,
        websocket: bool,
        registry: &Registry,
        deadlines: &mut Deadlines,
    ) {
        self.stats.accepted += 1;
        self.stats.ws_accepted += u64::from(websocket);
        let full = self.conns.len() - self.rejecting >= self.max_clients;
        if full && self.rejecting >= REJECT_SLOTS {
            self.stats.rejected += 1;
            self.stats.error_sent(ErrorKind::ServerFull);
            let _ = if websocket {
                (&stream).write(SERVER_FULL_HTTP)
            } else {
                (&stream).write(b"error: server-full\n")
            };
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let token = Source::Client(key).token();
        if let Err(e) = registry.register(&mut stream, token, super::input::CLIENT_INTEREST) {
            warn!("cannot register connection from {addr}: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let now = deadlines.now_ms() as u32;
        entry.insert(if websocket {
            Conn::new_websocket(stream, id, now)
        } else {
            Conn::new(stream, id, now)
        });
        if full {
            self.stats.rejected += 1;
            self.rejecting += 1;
            self.conns[key].reject();
            debug!("rejected {addr}: server full");
            if websocket {
                // Told after its handshake, with a close code; it has the
                // close grace to send it.
                self.set_deadline(key, deadlines, CLOSE_GRACE_MS, Deadline::Login);
            } else {
                self.error(key, ErrorKind::ServerFull, format_args!(""), deadlines);
            }
            return;
        }
        self.stats.opened();
        debug!("accepted {addr} as #{id}");
        if self.limits.login_timeout_ms > 0 {
            self.set_deadline(
                key,
                deadlines,
                self.limits.login_timeout_ms,
                Deadline::Login,
            );
        }
    }
}

/// What a WebSocket client beyond the reject slots is told, best effort.
const SERVER_FULL_HTTP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
    Content-Length: 19\r\nConnection: close\r\n\r\nerror: server-full\n";

/// The peer address of a connection, for log lines.
pub(super) fn peer(conn: &Conn) -> String {
    conn.stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string())
}

/// The default `--max-buffer-memory`: a quarter of the machine's memory
/// (`MemTotal` in `/proc/meminfo`), or 1 GiB where that cannot be read.
pub(super) fn default_buffer_memory() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<usize>().ok()
        });
    total_kib.map_or(1 << 30, |kib| kib.saturating_mul(1024) / 4)
}

/// Fits `wanted` clients into the current soft open-file limit, after the
/// `open` descriptors that are not clients, a small reserve, and `extra`
/// more (the metrics connections, when the endpoint is on). Raising the limit is the calling
/// program's business (the `chatd` binary raises it to the hard limit).
pub(super) fn fit_max_clients(wanted: Option<usize>, extra: usize, open: usize) -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let fit = limit.saturating_sub(open + REJECT_SLOTS + SPARE_FDS + extra);
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
pub(super) fn is_transient_accept_error(e: &io::Error) -> bool {
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
