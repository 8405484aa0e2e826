//! Cluster mode: this node's link to Redis, one more source in the poll
//! loop (`--cluster redis://HOST:PORT`).
//!
//! One non-blocking TCP connection speaks RESP3 (`HELLO 3`), so the same
//! connection carries commands and the pushes of the node's own channel.
//! Commands are pipelined: each is appended to `out` (written at the end of
//! the loop turn) and to the FIFO `pending`, and Redis answers in order, so
//! each reply pops the FIFO's head. Pushes (`message`) are not replies and
//! never pop it. Nothing here blocks and nothing touches a client socket:
//! what the link learns becomes [`Answer`]s that the reactor applies.
//!
//! Life of the link: `Down` (waiting for the back-off) → `Connecting` →
//! `Handshaking` (HELLO, scripts, lease, subscription, all pipelined) →
//! `Ready`. Any failure (connect error, EOF, a reply slower than the
//! reply timeout, malformed bytes, too much output queued) resets it to
//! `Down`, fails what was pending (as `unavailable`), and backs off
//! exponentially up to [`MAX_BACKOFF_MS`].
//!
//! The lease (docs/CLUSTER.md has the timeline): renewed every third of
//! `--cluster-lease`. A renewal sent at `t` that succeeds makes the lease
//! valid until `t + lease` at the earliest, in Redis's clock as in ours.
//! If no renewal succeeds, the node fences at that time less a margin:
//! [`Cluster::must_fence`] says so, and the reactor closes every logged-in
//! client with `error: unavailable` before reading any more input.

pub mod codec;
mod pending;
pub mod scripts;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry as PollRegistry, Token};

use crate::deadlines::Slot;
use codec::{Reply, decode_reply, encode_command};
use pending::Pending;
pub use pending::{Answer, Claimed};
use scripts::Script;

/// The longest wait between reconnection attempts.
pub const MAX_BACKOFF_MS: u64 = 5000;
/// The first wait after a failure; doubled after each further failure.
const FIRST_BACKOFF_MS: u64 = 100;
/// Commands in flight at most; past it, new work is refused (`unavailable`).
const MAX_PENDING: usize = 100_000;
/// Bytes of commands queued for Redis at most; past it, Redis is treated as
/// unreachable (it does not read fast enough).
const MAX_OUT: usize = 32 << 20;
/// Bytes read from Redis per turn at most, so a flood of pushes cannot
/// starve the clients (the rest is read next turn).
const READ_BUDGET: usize = 1 << 20;
/// Recipient names in routed messages awaiting Redis at most: past it, new
/// messages to other nodes get `unavailable` at once instead of making the
/// lease's renewal wait behind them.
const MAX_INFLIGHT_NAMES: usize = 100_000;
/// Answers one connection may wait for at once: past it, its input is not
/// read until they are in (a client cannot queue without bound behind a
/// slow Redis).
const MAX_WAITING_PER_CONN: u32 = 256;
/// Names whose state in Redis is uncertain (released or claimed while the
/// link was down) that are remembered one by one; past it, the node drops
/// all its names and claims again those it holds.
const MAX_UNCERTAIN: usize = 100_000;

/// `--cluster`, `--cluster-prefix`, `--cluster-lease`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where Redis listens (from `redis://HOST:PORT`).
    pub redis: SocketAddr,
    /// The prefix of every key and channel.
    pub prefix: String,
    /// How long a lease lasts without renewal, in ms.
    pub lease_ms: u64,
}

impl ClusterConfig {
    /// Parses `redis://HOST:PORT` (the port defaults to 6379).
    pub fn parse_url(url: &str) -> Result<SocketAddr, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or("expected redis://HOST:PORT")?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') || rest.contains('/') || rest.is_empty() {
            return Err("expected redis://HOST:PORT (no user, password or database)".into());
        }
        let with_port = if rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            rest.to_string()
        } else {
            format!("{rest}:6379")
        };
        with_port
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| "no address found".into())
    }
}

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No connection; the next attempt is at `retry_at` (ms).
    Down { retry_at: u64 },
    /// A non-blocking connect is under way.
    Connecting,
    /// Connected; the handshake's answers are awaited.
    Handshaking,
    /// Serving: logins are claimed and messages routed through Redis.
    Ready,
}

/// The cluster's counters, for the stats line and the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClusterStats {
    /// Messages published to other nodes (one per routed line).
    pub routed_out: u64,
    /// Deliveries to local clients of lines from other nodes.
    pub deliveries_in: u64,
    /// Lines from other nodes for names no longer here (lost in a race
    /// with a disconnect).
    pub deliveries_missed: u64,
    /// Connections to Redis made after the first.
    pub reconnects: u64,
    /// Times the node fenced (closed its clients for want of a lease).
    pub fences: u64,
    /// Times the lease was found lost and taken anew.
    pub leases_lost: u64,
    /// The last lease renewal's round trip, in microseconds.
    pub rtt_us: u64,
}

/// The link to Redis and the lease.
pub struct Cluster {
    /// The flags.
    config: ClusterConfig,
    /// This node's id (random, fixed for the process's life).
    node: String,
    /// The channel other nodes publish this node's messages on.
    channel: Vec<u8>,
    /// The socket, while connecting or connected.
    stream: Option<TcpStream>,
    /// Where the link is.
    state: State,
    /// Commands not yet written (`out[out_pos..]`).
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes read and not yet decoded.
    input: Vec<u8>,
    /// Commands in flight, in the order Redis answers them.
    pending: VecDeque<Pending>,
    /// Entries in `pending` per connection slab key, so that an `error:`
    /// line for a connection with answers outstanding waits behind them.
    waiting: HashMap<u32, u32>,
    /// The loaded scripts' SHA1s, by `Script as usize`.
    shas: [Vec<u8>; 5],
    /// When the lease stops being certain (ms); `None`: no lease.
    lease_until: Option<u64>,
    /// When the next renewal is due (ms).
    renew_at: u64,
    /// The wait before the next reconnection attempt.
    backoff_ms: u64,
    /// Whether the link was ever ready (reconnects are counted after).
    was_ready: bool,
    /// What the link learned, drained by the reactor.
    answers: Vec<Answer>,
    /// Recipient names in routes awaiting Redis.
    inflight_names: usize,
    /// Connections whose input is held back until their answers are in.
    throttled: HashMap<u32, Slot>,
    /// Names whose state in Redis is uncertain (see [`Answer::Reconcile`]).
    uncertain: std::collections::HashSet<String>,
    /// Whether `uncertain` overflowed: all names are dropped and claimed
    /// again instead.
    uncertain_overflow: bool,
    /// Whether the read budget left bytes from Redis unread.
    read_pending: bool,
    /// Whether the failure to reach Redis was logged (once per outage).
    down_logged: bool,
    /// Whether the node is leaving (shutdown): no more renewals.
    leaving: bool,
    /// The counters.
    pub stats: ClusterStats,
}

impl Cluster {
    /// A link that will connect at once, for node id `node`.
    pub fn new(config: ClusterConfig, node: String) -> Cluster {
        let channel = format!("{}:node:{node}", config.prefix).into_bytes();
        Cluster {
            config,
            node,
            channel,
            stream: None,
            state: State::Down { retry_at: 0 },
            out: Vec::new(),
            out_pos: 0,
            input: Vec::new(),
            pending: VecDeque::new(),
            waiting: HashMap::new(),
            shas: Default::default(),
            lease_until: None,
            renew_at: 0,
            backoff_ms: FIRST_BACKOFF_MS,
            was_ready: false,
            answers: Vec::new(),
            inflight_names: 0,
            throttled: Default::default(),
            uncertain: Default::default(),
            uncertain_overflow: false,
            read_pending: false,
            down_logged: false,
            leaving: false,
            stats: ClusterStats::default(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where the link is.
    pub fn state(&self) -> State {
        self.state
    }

    /// The state as a word for the stats line.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Down { .. } => "down",
            State::Connecting => "connecting",
            State::Handshaking => "handshaking",
            State::Ready => "ready",
        }
    }

    /// Whether logins can be claimed and messages routed now.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready && self.pending.len() < MAX_PENDING
    }

    /// How old the lease is, in ms (time since the last renewal that
    /// succeeded was sent); `None` without a lease.
    pub fn lease_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.lease_until
            .map(|until| (now_ms + self.config.lease_ms).saturating_sub(until))
    }

    /// The safety margin before the lease's certain end at which the node
    /// fences: a tenth of the lease, at least 100 ms.
    fn fence_margin_ms(&self) -> u64 {
        (self.config.lease_ms / 10).max(100)
    }

    /// Whether the node must fence now: it has a lease it could not renew
    /// in time. The reactor checks this before it reads any input, so a
    /// node woken from a pause longer than its lease routes nothing first.
    pub fn must_fence(&self, now_ms: u64) -> bool {
        self.lease_until
            .is_some_and(|until| now_ms + self.fence_margin_ms() >= until)
    }

    /// The node fenced: the lease is given up (a new one is taken once
    /// Redis answers again). The reactor closes the clients.
    pub fn fenced(&mut self, now_ms: u64) {
        warn!(
            "cluster: lease not renewed in time: closing every logged-in client with \
             `error: unavailable` before another node can take their names"
        );
        self.stats.fences += 1;
        self.lease_until = None;
        if self.state == State::Ready {
            // Redis answers but too slowly, or the lease is gone: start over.
            self.reset(now_ms, "lease expired");
        }
    }

    /// The earliest time the link wants to be woken (connect, renewal,
    /// fencing, a reply timeout).
    pub fn next_deadline(&self) -> u64 {
        let mut next = u64::MAX;
        match self.state {
            State::Down { retry_at } => next = next.min(retry_at),
            State::Ready => next = next.min(self.renew_at),
            State::Connecting | State::Handshaking => {}
        }
        if let Some(until) = self.lease_until {
            next = next.min(until.saturating_sub(self.fence_margin_ms()));
        }
        if let Some(sent) = self.pending.iter().find_map(Pending::sent_ms) {
            next = next.min(sent + self.reply_timeout_ms());
        }
        next
    }

    /// How long a reply may take before Redis counts as unreachable: a
    /// quarter of the lease (so a slow Redis is noticed in time to renew
    /// elsewhere... or to fence), at least 200 ms.
    fn reply_timeout_ms(&self) -> u64 {
        (self.config.lease_ms / 4).max(200)
    }

    /// Time-driven work: connect, renew, time out a silent Redis.
    pub fn on_timer(&mut self, registry: &PollRegistry, token: Token, now_ms: u64) {
        if let State::Down { retry_at } = self.state {
            if now_ms >= retry_at {
                self.connect(registry, token, now_ms);
            }
            return;
        }
        if let Some(sent) = self.pending.iter().find_map(Pending::sent_ms) {
            if now_ms >= sent + self.reply_timeout_ms() {
                self.reset(now_ms, "Redis did not answer in time");
                return;
            }
        }
        if self.state == State::Ready && now_ms >= self.renew_at && !self.leaving {
            self.renew(now_ms);
        }
    }

    /// Starts a non-blocking connect and queues the handshake.
    fn connect(&mut self, registry: &PollRegistry, token: Token, now_ms: u64) {
        let mut stream = match TcpStream::connect(self.config.redis) {
            Ok(stream) => stream,
            Err(e) => {
                self.fail_connect(now_ms, &e.to_string());
                return;
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(&mut stream, token, interest) {
            self.fail_connect(now_ms, &e.to_string());
            return;
        }
        let _ = stream.set_nodelay(true);
        self.stream = Some(stream);
        self.state = State::Connecting;
        self.handshake(now_ms);
    }

    fn fail_connect(&mut self, now_ms: u64, why: &str) {
        self.log_down(why);
        self.state = State::Down {
            retry_at: now_ms + self.backoff_ms,
        };
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }

    /// Queues the handshake: RESP3, the scripts, the lease (renewed if it
    /// survived, else taken anew), the node's channel.
    fn handshake(&mut self, now_ms: u64) {
        self.command(&[b"HELLO", b"3"], Pending::Hello);
        for (i, script) in scripts::ALL.iter().enumerate() {
            let which = [
                Script::Claim,
                Script::Release,
                Script::Route,
                Script::DropNames,
                Script::Sweep,
            ][i];
            self.command(
                &[b"SCRIPT", b"LOAD", script.as_bytes()],
                Pending::Load(which),
            );
        }
        // A policy that evicts keys with a time to live could evict leases
        // (and free names too early): warned about, not refused.
        self.command(&[b"CONFIG", b"GET", b"maxmemory-policy"], Pending::Policy);
        let client_name = format!("chatd-{}", self.node);
        self.command(
            &[b"CLIENT", b"SETNAME", client_name.as_bytes()],
            Pending::Plain,
        );
        self.send_renew(now_ms);
        let channel = self.channel.clone();
        // Under RESP3 the confirmation is a push, not a reply: no entry.
        encode_command(&mut self.out, &[b"SUBSCRIBE", &channel]);
        let nodes = format!("{}:nodes", self.config.prefix);
        let node = self.node.clone();
        self.command(
            &[b"SADD", nodes.as_bytes(), node.as_bytes()],
            Pending::Plain,
        );
    }

    /// Queues a lease renewal (which only extends a lease that exists).
    fn send_renew(&mut self, now_ms: u64) {
        let key = self.lease_key();
        let ms = self.config.lease_ms.to_string();
        self.command(
            &[b"SET", key.as_bytes(), b"1", b"PX", ms.as_bytes(), b"XX"],
            Pending::Renew { sent_ms: now_ms },
        );
        self.renew_at = now_ms + self.config.lease_ms / 3;
    }

    /// Renews the lease and sweeps dead nodes away.
    fn renew(&mut self, now_ms: u64) {
        self.send_renew(now_ms);
        let prefix = self.config.prefix.clone();
        self.script(Script::Sweep, &[prefix.as_bytes()], Pending::Plain);
    }

    fn lease_key(&self) -> String {
        format!("{}:lease:{}", self.config.prefix, self.node)
    }

    /// Appends a command and its entry.
    fn command(&mut self, args: &[&[u8]], pending: Pending) {
        encode_command(&mut self.out, args);
        self.expect(pending);
    }

    /// Records what the command just appended is for.
    fn expect(&mut self, pending: Pending) {
        if let Some(slot) = pending.slot() {
            *self.waiting.entry(slot.key).or_default() += 1;
        }
        self.pending.push_back(pending);
    }

    /// Appends an `EVALSHA` of a loaded script with `args` after the
    /// prefix-free arguments the script takes.
    fn script(&mut self, script: Script, args: &[&[u8]], pending: Pending) {
        self.encode_script(script, &[], args);
        self.expect(pending);
    }

    /// Appends an `EVALSHA` of `script` whose arguments are the prefix,
    /// this node's id and `extra`.
    fn node_script(&mut self, script: Script, extra: &[&[u8]], pending: Pending) {
        let prefix = self.config.prefix.clone();
        let node = self.node.clone();
        self.encode_script(script, &[prefix.as_bytes(), node.as_bytes()], extra);
        self.expect(pending);
    }

    /// Appends `EVALSHA <sha> 0 <first...> <rest...>` (the caller records
    /// what it is for with [`Cluster::expect`]).
    fn encode_script(&mut self, script: Script, first: &[&[u8]], rest: &[&[u8]]) {
        let sha = std::mem::take(&mut self.shas[script as usize]);
        let mut all: Vec<&[u8]> = Vec::with_capacity(3 + first.len() + rest.len());
        all.extend_from_slice(&[b"EVALSHA", &sha, b"0"]);
        all.extend_from_slice(first);
        all.extend_from_slice(rest);
        encode_command(&mut self.out, &all);
        self.shas[script as usize] = sha;
    }

    /// Claims `name` for the connection `slot`. Without a ready link the
    /// claim fails at once (as an answer, in order).
    pub fn claim(&mut self, slot: Slot, name: Rc<str>, again: bool, now_ms: u64) {
        // Claims again (after a lost lease or an outage) are bounded by the
        // names held here, and must not fail for want of room.
        let ready = if again {
            self.state == State::Ready
        } else {
            self.is_ready()
        };
        if !ready {
            self.answers.push(Answer::Claimed {
                slot,
                name,
                again,
                outcome: Claimed::Unavailable,
            });
            return;
        }
        self.node_script(
            Script::Claim,
            &[name.as_bytes()],
            Pending::Claim {
                slot,
                name: Rc::clone(&name),
                again,
                sent_ms: now_ms,
            },
        );
    }

    /// Frees `name` in Redis. Without a link nothing is sent: the name is
    /// remembered as uncertain and settled when the link is back (see
    /// [`Answer::Reconcile`]).
    pub fn release(&mut self, name: &str) {
        if self.state != State::Ready {
            self.uncertain_name(name);
            return;
        }
        self.node_script(
            Script::Release,
            &[name.as_bytes()],
            Pending::Release {
                name: name.to_string(),
            },
        );
    }

    /// Remembers that `name`'s state in Redis is uncertain.
    fn uncertain_name(&mut self, name: &str) {
        if self.uncertain.len() < MAX_UNCERTAIN {
            self.uncertain.insert(name.to_string());
        } else {
            self.uncertain_overflow = true;
        }
    }

    /// Routes `line` (a formatted delivery) from `slot` to `names`, none of
    /// them held here. Returns false (and sends nothing) when Redis cannot
    /// be asked now: the caller reports the names as `unavailable`.
    pub fn route(&mut self, slot: Slot, names: Vec<String>, line: &[u8], now_ms: u64) -> bool {
        if !self.is_ready() || self.inflight_names + names.len() > MAX_INFLIGHT_NAMES {
            return false;
        }
        self.inflight_names += names.len();
        // Encoded in place (the names move into the entry after).
        let sha = &self.shas[Script::Route as usize];
        let mut all: Vec<&[u8]> = Vec::with_capacity(6 + names.len());
        all.extend_from_slice(&[b"EVALSHA", sha, b"0"]);
        all.extend_from_slice(&[self.config.prefix.as_bytes(), self.node.as_bytes(), line]);
        all.extend(names.iter().map(|n| n.as_bytes()));
        encode_command(&mut self.out, &all);
        self.expect(Pending::Route {
            slot,
            names,
            sent_ms: now_ms,
        });
        self.stats.routed_out += 1;
        true
    }

    /// Whether the connection `slot` has answers outstanding: its next
    /// `error:` line must then wait behind them ([`Cluster::defer`]).
    pub fn has_waiting(&self, slot: Slot) -> bool {
        self.waiting.get(&slot.key).is_some_and(|&n| n > 0)
    }

    /// Whether the connection `slot` waits for so many answers (or Redis
    /// for so many commands) that its input must not be read until they
    /// are in. Then the reactor holds its input back and calls
    /// [`Cluster::throttle`]; an [`Answer::Resume`] follows.
    pub fn is_backlogged(&self, slot: Slot) -> bool {
        let waiting = self.waiting.get(&slot.key).copied().unwrap_or(0);
        waiting >= MAX_WAITING_PER_CONN || (waiting > 0 && self.pending.len() >= MAX_PENDING)
    }

    /// Whether an answer for `slot` is awaited from Redis or waits to be
    /// applied.
    pub fn owes(&self, slot: Slot) -> bool {
        self.has_waiting(slot) || self.answers.iter().any(|a| a.slot() == Some(slot))
    }

    /// Whether the input of `slot` is held back (see
    /// [`Cluster::is_backlogged`]).
    pub fn is_throttled(&self, slot: Slot) -> bool {
        self.throttled.get(&slot.key) == Some(&slot)
    }

    /// Notes that the input of `slot` is held back (see
    /// [`Cluster::is_backlogged`]).
    pub fn throttle(&mut self, slot: Slot) {
        self.throttled.insert(slot.key, slot);
    }

    /// Holds `line` (an `error:` line for `slot`) until the answers before
    /// it are in.
    pub fn defer(&mut self, slot: Slot, line: Vec<u8>) {
        *self.waiting.entry(slot.key).or_default() += 1;
        self.pending.push_back(Pending::Deferred { slot, line });
        self.pop_deferred();
    }

    /// Shutdown: drops every name of this node and its lease. Returns
    /// whether a farewell was sent (its answer is `Answer::FarewellDone`).
    pub fn farewell(&mut self) -> bool {
        self.leaving = true;
        if self.state != State::Ready {
            return false;
        }
        self.node_script(Script::DropNames, &[], Pending::Plain);
        let lease = self.lease_key();
        let nodes = format!("{}:nodes", self.config.prefix);
        let node = self.node.clone();
        self.command(
            &[b"SREM", nodes.as_bytes(), node.as_bytes()],
            Pending::Plain,
        );
        self.command(&[b"DEL", lease.as_bytes()], Pending::Farewell);
        true
    }

    /// The answers learned since the last call.
    pub fn take_answers(&mut self) -> Vec<Answer> {
        std::mem::take(&mut self.answers)
    }

    /// Whether answers wait to be applied.
    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }

    /// A readiness event on the link's socket.
    pub fn on_event(&mut self, event: &mio::event::Event, now_ms: u64) {
        if self.stream.is_none() {
            return;
        }
        if self.state == State::Connecting {
            if event.is_error() || event.is_write_closed() || event.is_read_closed() {
                self.reset(now_ms, "connection refused");
                return;
            }
            if !event.is_writable() {
                return;
            }
            // Connected once writable without error.
            match self.stream.as_ref().map(|s| s.peer_addr()) {
                Some(Ok(_)) => {
                    self.state = State::Handshaking;
                    debug!("cluster: connected to Redis at {}", self.config.redis);
                }
                _ => {
                    self.reset(now_ms, "connection refused");
                    return;
                }
            }
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read(now_ms);
        }
        if self.stream.is_some() && event.is_writable() {
            self.flush(now_ms);
        }
    }

    /// Reads and handles what Redis sent, up to the read budget.
    fn read(&mut self, now_ms: u64) {
        self.read_pending = false;
        let mut buf = [0; 64 * 1024];
        let mut budget = READ_BUDGET;
        loop {
            let Some(stream) = &mut self.stream else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.reset(now_ms, "Redis closed the connection");
                    return;
                }
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if let Err(why) = self.decode_all(now_ms) {
                        self.reset(now_ms, &why);
                        return;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        // The rest next turn: no new edge will say so.
                        self.read_pending = true;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.reset(now_ms, &e.to_string());
                    return;
                }
            }
        }
    }

    /// Whether input waits that the read budget left for the next turn.
    pub fn wants_read(&self) -> bool {
        self.stream.is_some() && self.state != State::Connecting
    }

    /// Reads again (the come-back path, when the budget stopped a read).
    pub fn read_more(&mut self, now_ms: u64) {
        if self.wants_read() {
            self.read(now_ms);
        }
    }

    /// Decodes and handles every complete frame in `input`.
    fn decode_all(&mut self, now_ms: u64) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            match decode_reply(&self.input[at..]) {
                Ok(Some((reply, used))) => {
                    at += used;
                    if let Err(why) = self.on_reply(reply, now_ms) {
                        break Err(why);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("malformed reply from Redis: {}", e.0)),
            }
        };
        self.input.drain(..at);
        result
    }

    /// Handles one frame: a push, or the answer to the oldest command.
    fn on_reply(&mut self, reply: Reply, now_ms: u64) -> Result<(), String> {
        match reply {
            Reply::Message { channel, payload } => {
                if channel == self.channel {
                    self.on_message(payload);
                }
                return Ok(());
            }
            Reply::OtherPush => return Ok(()),
            _ => {}
        }
        let Some(entry) = self.pending.pop_front() else {
            return Err("a reply nobody asked for".into());
        };
        self.unwait(&entry);
        let result = self.on_answer(entry, reply, now_ms);
        self.pop_deferred();
        result
    }

    /// Counts an entry out of `waiting`.
    fn unwait(&mut self, entry: &Pending) {
        if let Pending::Route { names, .. } = entry {
            self.inflight_names -= names.len();
        }
        if let Some(slot) = entry.slot() {
            if let Some(n) = self.waiting.get_mut(&slot.key) {
                *n -= 1;
                if *n == 0 {
                    self.waiting.remove(&slot.key);
                    if let Some(slot) = self.throttled.remove(&slot.key) {
                        self.answers.push(Answer::Resume { slot });
                    }
                }
            }
        }
    }

    /// Releases the deferred lines that have reached the head.
    fn pop_deferred(&mut self) {
        while matches!(self.pending.front(), Some(Pending::Deferred { .. })) {
            if let Some(entry) = self.pending.pop_front() {
                self.unwait(&entry);
                if let Pending::Deferred { slot, line } = entry {
                    self.answers.push(Answer::Deferred { slot, line });
                }
            }
        }
    }

    fn on_answer(&mut self, entry: Pending, reply: Reply, now_ms: u64) -> Result<(), String> {
        if let Reply::Error(e) = &reply {
            // A script cache flushed under us (NOSCRIPT), a read-only or
            // busy Redis: the entry fails like any other in flight, and
            // the link starts over rather than guess what Redis did.
            match entry {
                Pending::Claim {
                    slot, name, again, ..
                } => self.answers.push(Answer::Claimed {
                    slot,
                    name,
                    again,
                    outcome: Claimed::Unavailable,
                }),
                Pending::Route { slot, names, .. } => {
                    self.answers.push(Answer::Unroutable { slot, names });
                }
                Pending::Release { name } => self.uncertain_name(&name),
                Pending::Policy => return Ok(()), // CONFIG may be disabled
                Pending::Farewell => self.answers.push(Answer::FarewellDone),
                _ => {}
            }
            return Err(format!("Redis refused a command: {e}"));
        }
        match entry {
            Pending::Hello | Pending::Plain | Pending::Release { .. } => {}
            Pending::Policy => {
                if let Reply::Array(pair) = &reply {
                    if let Some(Reply::Bulk(policy)) = pair.get(1) {
                        let policy = String::from_utf8_lossy(policy);
                        if policy != "noeviction" {
                            warn!(
                                "cluster: Redis evicts keys (maxmemory-policy {policy}): it could \
                                 evict a lease and free names early; set maxmemory-policy \
                                 noeviction"
                            );
                        }
                    }
                }
            }
            Pending::Load(script) => match reply {
                Reply::Bulk(sha) => self.shas[script as usize] = sha,
                Reply::Status(sha) => self.shas[script as usize] = sha.into_bytes(),
                _ => return Err("unexpected SCRIPT LOAD reply".into()),
            },
            Pending::Renew { sent_ms } => {
                self.stats.rtt_us = now_ms.saturating_sub(sent_ms) * 1000;
                if self.leaving {
                    // Shutting down: the farewell drops the lease.
                } else if reply == Reply::Nil {
                    // The lease is gone: Redis lost its data, or it expired.
                    self.take_new_lease(now_ms);
                } else {
                    self.lease_until = Some(sent_ms + self.config.lease_ms);
                    if self.state != State::Ready {
                        self.become_ready();
                        self.reconcile();
                    }
                }
            }
            Pending::Acquire { sent_ms } => {
                if reply == Reply::Nil {
                    return Err("another process holds this node's lease".into());
                }
                self.lease_until = Some(sent_ms + self.config.lease_ms);
                self.become_ready();
                // DropNames went before: every name held here is claimed
                // again, and nothing else is uncertain any more.
                self.uncertain.clear();
                self.uncertain_overflow = false;
                self.answers.push(Answer::ClaimAgain);
            }
            Pending::Claim {
                slot, name, again, ..
            } => {
                let outcome = match reply {
                    Reply::Int(1) => Claimed::Held,
                    Reply::Int(0) => Claimed::Taken,
                    _ => Claimed::Unavailable,
                };
                self.answers.push(Answer::Claimed {
                    slot,
                    name,
                    again,
                    outcome,
                });
            }
            Pending::Route { slot, names, .. } if reply == Reply::Int(-1) => {
                // This node's lease is gone from Redis (it lost its data):
                // nothing routed as its clients until the lease is back.
                self.answers.push(Answer::Unroutable { slot, names });
                self.take_new_lease(now_ms);
            }
            Pending::Route { slot, .. } => {
                let names = |reply: Option<Reply>| -> Vec<String> {
                    match reply {
                        Some(Reply::Array(names)) => names
                            .into_iter()
                            .filter_map(|n| match n {
                                Reply::Bulk(b) => String::from_utf8(b).ok(),
                                _ => None,
                            })
                            .collect(),
                        _ => Vec::new(),
                    }
                };
                let Reply::Array(lists) = reply else {
                    return Err("unexpected route reply".into());
                };
                let mut lists = lists.into_iter();
                let offline = names(lists.next());
                let unreachable = names(lists.next());
                self.answers.push(Answer::Routed {
                    slot,
                    offline,
                    unreachable,
                });
            }
            Pending::Deferred { .. } => {} // handled by pop_deferred
            Pending::Farewell => self.answers.push(Answer::FarewellDone),
        }
        Ok(())
    }

    /// The lease was not found: take a new one, drop whatever names Redis
    /// still lists for this node, and have the reactor claim again the
    /// names its clients still hold.
    fn take_new_lease(&mut self, now_ms: u64) {
        if self.lease_until.is_some() {
            warn!("cluster: the lease is gone from Redis (restarted or flushed): taking a new one");
            self.stats.leases_lost += 1;
        }
        self.node_script(Script::DropNames, &[], Pending::Plain);
        let key = self.lease_key();
        let ms = self.config.lease_ms.to_string();
        self.command(
            &[b"SET", key.as_bytes(), b"1", b"PX", ms.as_bytes(), b"NX"],
            Pending::Acquire { sent_ms: now_ms },
        );
        let nodes = format!("{}:nodes", self.config.prefix);
        let node = self.node.clone();
        self.command(
            &[b"SADD", nodes.as_bytes(), node.as_bytes()],
            Pending::Plain,
        );
    }

    /// Back after an outage with the lease intact: the names whose state
    /// is uncertain are settled (claimed again if held here, released if
    /// not); had too many piled up, every name is dropped and claimed again.
    fn reconcile(&mut self) {
        if self.uncertain_overflow {
            self.uncertain_overflow = false;
            self.uncertain.clear();
            self.node_script(Script::DropNames, &[], Pending::Plain);
            self.answers.push(Answer::ClaimAgain);
        } else if !self.uncertain.is_empty() {
            let names = self.uncertain.drain().collect();
            self.answers.push(Answer::Reconcile(names));
        }
    }

    /// Whether bytes from Redis wait that the read budget left unread.
    pub fn has_unread(&self) -> bool {
        self.read_pending
    }

    /// Logs once per outage why Redis cannot be reached.
    fn log_down(&mut self, why: &str) {
        if !self.down_logged {
            self.down_logged = true;
            warn!(
                "cluster: cannot reach Redis at {}: {why}; retrying with back-off",
                self.config.redis
            );
        } else {
            debug!("cluster: Redis at {}: {why}", self.config.redis);
        }
    }

    fn become_ready(&mut self) {
        if self.state != State::Ready {
            if self.was_ready {
                info!("cluster: Redis at {} reachable again", self.config.redis);
            } else {
                info!(
                    "cluster: node {} ready (Redis at {})",
                    self.node, self.config.redis
                );
            }
            self.state = State::Ready;
            self.was_ready = true;
            self.down_logged = false;
            self.backoff_ms = FIRST_BACKOFF_MS;
        }
    }

    /// A message from another node: `<names>\n<line>`.
    fn on_message(&mut self, payload: Vec<u8>) {
        let Some(split) = payload.iter().position(|&b| b == b'\n') else {
            return;
        };
        let names = String::from_utf8_lossy(&payload[..split])
            .split(',')
            .map(str::to_string)
            .collect();
        let line = payload[split + 1..].to_vec();
        self.answers.push(Answer::Deliver { names, line });
    }

    /// Writes what is queued for Redis; past `MAX_OUT` Redis counts as
    /// unreachable.
    pub fn flush(&mut self, now_ms: u64) {
        if self.out.len() - self.out_pos > MAX_OUT {
            self.reset(now_ms, "Redis does not read fast enough");
            return;
        }
        if !matches!(self.state, State::Handshaking | State::Ready) {
            return;
        }
        let Some(stream) = &mut self.stream else {
            return;
        };
        while self.out_pos < self.out.len() {
            match stream.write(&self.out[self.out_pos..]) {
                Ok(0) => break,
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = e.to_string();
                    self.reset(now_ms, &why);
                    return;
                }
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
    }

    /// Drops the connection: what was pending fails (claims and routes as
    /// unavailable, deferred lines are released in order), and the link
    /// waits for its back-off. The lease stays until it must be fenced.
    pub fn reset(&mut self, now_ms: u64, why: &str) {
        if self.state == State::Ready {
            warn!(
                "cluster: lost Redis at {} ({why}); logins get `error: unavailable` until it is back",
                self.config.redis
            );
            self.down_logged = true;
        } else {
            self.log_down(why);
        }
        self.read_pending = false;
        self.inflight_names = 0;
        for (_, slot) in std::mem::take(&mut self.throttled) {
            self.answers.push(Answer::Resume { slot });
        }
        if self.stream.take().is_some() && self.was_ready {
            self.stats.reconnects += 1;
        }
        self.out.clear();
        self.out_pos = 0;
        self.input.clear();
        self.waiting.clear();
        for entry in std::mem::take(&mut self.pending) {
            match entry {
                Pending::Claim {
                    slot, name, again, ..
                } => {
                    // It may have run in Redis before the link broke.
                    self.uncertain_name(&name);
                    self.answers.push(Answer::Claimed {
                        slot,
                        name,
                        again,
                        outcome: Claimed::Unavailable,
                    });
                }
                Pending::Release { name } => self.uncertain_name(&name),
                Pending::Route { slot, names, .. } => {
                    self.answers.push(Answer::Unroutable { slot, names });
                }
                Pending::Deferred { slot, line } => {
                    self.answers.push(Answer::Deferred { slot, line });
                }
                Pending::Farewell => self.answers.push(Answer::FarewellDone),
                _ => {}
            }
        }
        self.state = State::Down {
            retry_at: now_ms + self.backoff_ms,
        };
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
}

/// A random node id: 16 hex digits from the standard library's keyed hasher
/// (seeded from the OS), the process id and the clock.
pub fn new_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        let ok = |url: &str| ClusterConfig::parse_url(url).unwrap().to_string();
        assert_eq!(ok("redis://127.0.0.1:7000"), "127.0.0.1:7000");
        assert_eq!(ok("redis://127.0.0.1"), "127.0.0.1:6379");
        assert_eq!(ok("redis://127.0.0.1:7000/"), "127.0.0.1:7000");
        for bad in [
            "127.0.0.1:7000",
            "redis://",
            "redis://u:p@h:1",
            "redis://h:1/2",
            "http://x",
        ] {
            assert!(ClusterConfig::parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_ids_differ() {
        assert_ne!(new_node_id(), new_node_id());
        assert_eq!(new_node_id().len(), 16);
    }
}
