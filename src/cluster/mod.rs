//! Cluster mode (`--cluster redis://HOST:PORT[,redis://...]`): the names
//! shard over one or more Redis primaries, and [`Cluster`] (`shards.rs`)
//! is what the reactor sees; this file is one [`Shard`]: the node's link
//! to one Redis, one more source in the poll loop.
//!
//! One non-blocking TCP connection speaks RESP3 (`HELLO 3`), so the same
//! connection carries commands and the pushes of the node's own channel.
//! Commands are pipelined: each is appended to `out` (written at the end of
//! the loop turn) and to the FIFO `pending`, and Redis answers in order, so
//! each reply pops the FIFO's head. Pushes (`message`) are not replies and
//! never pop it. Nothing here blocks and nothing touches a client socket:
//! what the link learns becomes `Answer`s that the reactor applies.
//!
//! Life of the link: `Down` (waiting for the back-off) → `Connecting` →
//! `Handshaking` (HELLO, scripts, lease, subscription, all pipelined) →
//! `Ready`. Any failure (connect error, EOF, a reply slower than the
//! reply timeout, malformed bytes, too much output queued) resets it to
//! `Down`, fails what was pending (as `unavailable`), and backs off
//! exponentially up to [`MAX_BACKOFF_MS`].
//!
//! The lease (docs/CLUSTER.md has the timeline): renewed every third of
//! `--cluster-lease`, on a connection of its own (`lease.rs`) so that a
//! renewal never waits behind the data link's claims, releases and routes
//! (the data link renews too while that connection is down, and takes the
//! lease in the first place). A renewal sent at `t` that succeeds makes the lease
//! valid until `t + lease` at the earliest, in Redis's clock as in ours.
//! If no renewal succeeds, the node fences at that time less a margin:
//! `Shard::must_fence` says so, and the reactor closes every logged-in
//! client with `error: unavailable` before reading any more input.
//!
//! Files: this one has a shard's state, the handshake, the commands and
//! the lease; `shards.rs` the shards together; `lease.rs` the lease's own
//! connection; `link.rs` the data
//! link's I/O; `replies.rs` what each reply does;
//! `pending.rs` the FIFO's entries and the answers; `codec.rs` the RESP3
//! adapter; `scripts.rs` the Lua scripts and the keys.

mod batch;
pub(crate) mod codec;
mod lease;
mod link;
mod pending;
mod queue;
mod replies;
pub(crate) mod scripts;
mod shards;

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;

use log::warn;
use mio::net::TcpStream;
use mio::{Registry, Token};

use crate::conn::Slot;
pub(crate) use batch::records;
use codec::encode_command;
use lease::{LeaseLink, Renewal};
use pending::Pending;
pub(crate) use pending::{Answer, Claimed};
use queue::{ClaimQueue, QueuedClaim, ReleaseQueue};
use scripts::Script;
pub(crate) use shards::Cluster;
pub use shards::{key_slot, shard_of};

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
/// Claims in flight to Redis at most, at first: a login wave larger than
/// Redis answers at once waits on the node, in the claiming phase (within
/// `--login-timeout`), instead of in Redis's queue, where the lease's
/// renewal would wait behind it. A thousand claims are a few milliseconds
/// of a healthy Redis's time. The window then follows the claims' round
/// trip (see [`Shard::fit_claim_window`]).
const CLAIM_WINDOW: usize = 1024;
/// Claims (or releases) in one script call at most.
const CLAIM_GROUP: usize = 1024;
/// Releases in flight at most (on each shard's link), the rest waiting on
/// the node (see [`ReleaseQueue`]). A login wave comes as fast as clients
/// connect; a logout wave comes all at once (a load generator that stops,
/// a network that drops its clients), every node with thousands of
/// releases. At a million clients on 53 nodes, each sending its ~19,000
/// at once, Redis read a 1,024-name batch from every node in each pass of
/// its event loop and, short of CPU while the kernel closed a million
/// sockets, took 15 to 20 s a pass: every lease renewal waited that long,
/// and 8 nodes fenced. 128 a node is 6,800 names a pass at 53 nodes, and a
/// healthy Redis frees tens of thousands a second from each.
const RELEASE_WINDOW: usize = 128;
/// The window's bounds.
const CLAIM_WINDOW_MIN: usize = 16;
const CLAIM_WINDOW_MAX: usize = 4096;
/// How long a claim found taken waits before it is tried once more: a
/// client moving from one node to another often logs in on the second
/// before the first has released the name in Redis.
const CLAIM_RETRY_MS: u64 = 150;
/// Names whose state in Redis is uncertain (released or claimed while the
/// link was down) that are remembered one by one; past it, the node drops
/// all its names and claims again those it holds.
const MAX_UNCERTAIN: usize = 100_000;

/// Earlier connections a link remembers to kill at most (see
/// `Shard::stale_links`): more resets in a row than that before one
/// connection completes its handshake are an outage, not a slow link.
const MAX_STALE_LINKS: usize = 8;

/// Nesting of a reply from Redis at most (ours nest three deep: HELLO's
/// map of arrays of maps); deeper, the link is reset.
const MAX_REPLY_DEPTH: usize = 8;

/// The longest frame Redis may send before the link is reset: a route's
/// answer lists at most a line's worth of names, a message from another
/// node carries names and a delivery of at most a line each. Four lines'
/// worth and some room, at least 1 MiB. Past it, what answers is not
/// Redis, or not sane: the node drops the link rather than buffer it.
pub fn max_reply(max_line: usize) -> usize {
    (4 * max_line + (64 << 10)).max(1 << 20)
}

/// What a turn stages for one script call (see [`Shard::stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    Lines,
    Claims,
    Releases,
}

/// Hashes connection slab keys (looked up for every routed line) with one
/// multiplication instead of SipHash: the server hands out slab keys, a
/// client cannot choose them to collide.
type SlabKeys = std::hash::BuildHasherDefault<SlabKeyHasher>;

#[derive(Default)]
struct SlabKeyHasher(u64);

impl std::hash::Hasher for SlabKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, key: u32) {
        // Fibonacci hashing: the high bits, which the table uses, mix all.
        self.0 = (u64::from(key) ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The poll tokens of the cluster's two connections to Redis.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    /// The data link: claims, releases, routes and the node's channel.
    pub link: Token,
    /// The lease's own connection.
    pub lease: Token,
}

/// `--cluster-prefix` when not given.
pub const DEFAULT_PREFIX: &str = "chatd";
/// `--cluster-lease` when not given.
pub const DEFAULT_LEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// `--cluster`, `--cluster-prefix`, `--cluster-lease`.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Redis primaries names are sharded over, in the order given
    /// (every node must list the same ones in the same order).
    pub shards: Vec<Redis>,
    /// The prefix of every key and channel.
    pub prefix: String,
    /// How long a lease lasts without renewal, in ms.
    pub lease_ms: u64,
}

/// One Redis of `--cluster`: where it listens and who to log in as.
#[derive(Debug, Clone)]
pub struct Redis {
    /// From `redis://HOST:PORT`.
    pub addr: SocketAddr,
    /// Who to log in as, if Redis asks for a password.
    pub auth: Option<Auth>,
}

/// What one shard's link needs: its Redis and the cluster's settings.
#[derive(Debug, Clone)]
pub(crate) struct ShardConfig {
    /// Where Redis listens.
    pub redis: SocketAddr,
    /// Who to log in as.
    pub auth: Option<Auth>,
    /// The prefix of every key and channel.
    pub prefix: String,
    /// How long a lease lasts without renewal, in ms.
    pub lease_ms: u64,
    /// Which shard this is (its place in `--cluster`).
    pub index: usize,
    /// Whether the node has other shards (its log lines say which Redis).
    pub several: bool,
    /// This Redis's place in the list: `0/1` alone, else `i/S` and the
    /// list's addresses (see `scripts::LAYOUT`).
    pub layout: String,
}

/// The credentials of `redis://USER:PASSWORD@HOST` (an ACL user) or
/// `redis://:PASSWORD@HOST` (the `default` user), sent in `HELLO 3 AUTH`
/// before anything else. Never printed: `Debug` shows the user only.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth {{ user: {:?}, password: <hidden> }}", self.user)
    }
}

/// Shards at most (`--cluster` lists at most this many Redis).
pub const MAX_SHARDS: usize = 64;

impl ClusterConfig {
    /// Parses `--cluster`: one URL, or several separated by commas, each
    /// Redis once.
    pub fn parse_urls(list: &str) -> Result<Vec<Redis>, String> {
        let mut shards: Vec<Redis> = Vec::new();
        for url in split_urls(list).iter().map(|u| u.trim()) {
            let (addr, auth) = ClusterConfig::parse_url(url)?;
            if shards.iter().any(|s| s.addr == addr) {
                return Err(format!("{addr} is listed twice"));
            }
            shards.push(Redis { addr, auth });
        }
        if shards.len() > MAX_SHARDS {
            return Err(format!("at most {MAX_SHARDS} Redis"));
        }
        Ok(shards)
    }

    /// The shards as `redis://HOST:PORT,...` (no passwords), for logs.
    pub fn shown(&self) -> String {
        let urls: Vec<String> = self
            .shards
            .iter()
            .map(|s| format!("redis://{}", s.addr))
            .collect();
        urls.join(",")
    }

    /// Parses `redis://[[USER]:PASSWORD@]HOST[:PORT]` (the port defaults to
    /// 6379; the user and password may be percent-encoded).
    pub fn parse_url(url: &str) -> Result<(SocketAddr, Option<Auth>), String> {
        const FORM: &str = "expected redis://[[USER]:PASSWORD@]HOST[:PORT]";
        let rest = url.strip_prefix("redis://").ok_or(FORM)?;
        let rest = rest.trim_end_matches('/');
        let (auth, host) = match rest.rsplit_once('@') {
            None => (None, rest),
            Some((userinfo, host)) => {
                let (user, password) = userinfo
                    .split_once(':')
                    .ok_or("a user needs a password: redis://USER:PASSWORD@HOST")?;
                let user = percent_decode(user)?;
                let password = percent_decode(password)?;
                if password.is_empty() {
                    return Err("empty password".into());
                }
                let user = if user.is_empty() {
                    "default".to_string()
                } else {
                    user
                };
                (Some(Auth { user, password }), host)
            }
        };
        if host.contains('/') || host.is_empty() {
            return Err(format!("{FORM} (no database)"));
        }
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:6379")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address found")?;
        Ok((addr, auth))
    }

    /// `urls` (one, or several separated by commas) with each password
    /// replaced by `***`, for error lines and logs.
    pub fn redacted(urls: &str) -> String {
        let each: Vec<String> = split_urls(urls)
            .iter()
            .map(|url| redacted_one(url))
            .collect();
        each.join(",")
    }
}

/// The URLs of a comma-separated list. A piece with no `://` belongs to
/// the URL before it: a password may hold a comma (or write it `%2C`).
fn split_urls(list: &str) -> Vec<String> {
    let mut each: Vec<String> = Vec::new();
    for piece in list.split(',') {
        match each.last_mut() {
            Some(last) if !piece.contains("://") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => each.push(piece.to_string()),
        }
    }
    each
}

/// One URL with its password replaced by `***`.
fn redacted_one(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

/// Decodes `%XX` escapes (a password may hold `@`, `:` or `/`).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape in the user or password")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user or password is not UTF-8".into())
}

/// `HELLO 3 [AUTH user password] SETNAME name`: the first command on each
/// connection to Redis.
pub(crate) fn hello(out: &mut Vec<u8>, auth: Option<&Auth>, name: &str) {
    let mut args: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(auth) = auth {
        args.extend_from_slice(&[b"AUTH", auth.user.as_bytes(), auth.password.as_bytes()]);
    }
    args.extend_from_slice(&[b"SETNAME", name.as_bytes()]);
    encode_command(out, &args);
}

/// Whether Redis's error says the credentials were refused (or are
/// missing): no use retrying soon, and the operator must be told.
pub(crate) fn is_auth_error(error: &str) -> bool {
    ["WRONGPASS", "NOAUTH"]
        .iter()
        .any(|code| error.starts_with(code))
}

/// Where the link is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
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
pub(crate) struct ClusterStats {
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

/// The cluster's totals by name, in the order the stats line shows them:
/// the stats line and the upgrade state read this one table (`rtt_us` is
/// a measurement, not a total: it is neither carried nor listed here).
type ClusterCounter = (&'static str, fn(&mut ClusterStats) -> &mut u64);
const CLUSTER_COUNTERS: &[ClusterCounter] = &[
    ("routed_out", |s| &mut s.routed_out),
    ("deliveries_in", |s| &mut s.deliveries_in),
    ("deliveries_missed", |s| &mut s.deliveries_missed),
    ("reconnects", |s| &mut s.reconnects),
    ("fences", |s| &mut s.fences),
    ("leases_lost", |s| &mut s.leases_lost),
];

impl ClusterStats {
    /// Every total by its name in the stats line.
    pub fn each(&self) -> Vec<(&'static str, u64)> {
        let mut copy = *self;
        CLUSTER_COUNTERS
            .iter()
            .map(|&(name, field)| (name, *field(&mut copy)))
            .collect()
    }

    /// Adds `other`'s totals to these (the round trip: the longer one).
    pub fn add(&mut self, other: &ClusterStats) {
        let mut other = *other;
        for &(_, field) in CLUSTER_COUNTERS {
            *field(self) += *field(&mut other);
        }
        self.rtt_us = self.rtt_us.max(other.rtt_us);
    }

    /// Sets the total called `name`; false for a name it does not know.
    pub fn set(&mut self, name: &str, value: u64) -> bool {
        match CLUSTER_COUNTERS.iter().find(|(n, _)| *n == name) {
            Some((_, field)) => {
                *field(self) = value;
                true
            }
            None => false,
        }
    }
}

/// The link to Redis and the lease.
pub(crate) struct Shard {
    /// The flags.
    config: ShardConfig,
    /// This node's id (random, fixed for the process's life).
    node: String,
    /// The channel other nodes publish this node's lines on.
    lines_channel: Vec<u8>,
    /// The channel nodes of earlier versions publish them on.
    channel: Vec<u8>,
    /// The channel every node listens on for word that leases were lost
    /// (Redis restarted empty or flushed): each then checks its own at
    /// once instead of at its next renewal.
    lost_channel: Vec<u8>,
    /// Claims found taken, to try once more shortly (the name may be
    /// released in Redis a moment later by the node it is leaving): when,
    /// for whom, which name.
    retries: VecDeque<(u64, Slot, Rc<str>)>,
    /// The socket, while connecting or connected.
    stream: Option<TcpStream>,
    /// Where the link is.
    state: State,
    /// Commands not yet written (`out[out_pos..]`).
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes read and not yet decoded.
    input: Vec<u8>,
    /// Where the frames in `input` end; bounds their size and nesting.
    framer: codec::Framer,
    /// Commands in flight, in the order Redis answers them.
    pending: VecDeque<Pending>,
    /// Entries in `pending` per connection slab key, so that an `error:`
    /// line for a connection with answers outstanding waits behind them.
    waiting: HashMap<u32, u32, SlabKeys>,
    /// The loaded scripts' SHA1s, by `Script as usize`.
    shas: [Vec<u8>; 6],
    /// When the lease stops being certain (ms); `None`: no lease.
    lease_until: Option<u64>,
    /// When the next sweep of dead nodes is due on the data link (ms).
    sweep_at: u64,
    /// The lease's own connection.
    lease_link: LeaseLink,
    /// The wait before the next reconnection attempt.
    backoff_ms: u64,
    /// Whether the link was ever ready (reconnects are counted after).
    was_ready: bool,
    /// The id Redis gave the connection now (from `HELLO`).
    link_id: Option<i64>,
    /// The ids of earlier connections of this link that were dropped with
    /// commands in flight. Redis may still run them: bytes the node wrote
    /// before dropping a connection can reach Redis after the next one's
    /// commands (through a slow network or a proxy), and a claim so
    /// delayed would hold, for good, a name the next connection settled
    /// as free. The next connection kills them first, before it settles
    /// anything (found by an attack through a throttling proxy: 638 names
    /// held for clients long gone). At most [`MAX_STALE_LINKS`].
    stale_links: Vec<i64>,
    /// Whether Redis refused `CLIENT KILL` (an ACL without it): said once.
    kill_refused: bool,
    /// When Redis last sent anything on the link, an answer or a push
    /// (ms): a Redis that sends, if slowly, is busy, not gone (see
    /// [`Shard::reply_timeout_ms`]).
    last_reply_ms: u64,
    /// Claims sent and not answered yet, at most `claim_window`.
    claims_in_flight: usize,
    /// How many claims may be in flight now (see [`CLAIM_WINDOW`]).
    claim_window: usize,
    /// The window is not halved again before this time (ms): once per
    /// round trip at most.
    window_cut_at: u64,
    /// Claims waiting for room in the window, oldest first: for whom,
    /// which name, whether it is a claim again, whether it was retried.
    claim_queue: ClaimQueue,
    /// Releases sent and not answered yet, at most `release_window`.
    releases_in_flight: usize,
    /// [`RELEASE_WINDOW`] (a field so that the model check can make it
    /// tiny).
    release_window: usize,
    /// Releases waiting for room, oldest first.
    release_queue: ReleaseQueue,
    /// A live upgrade is handing the clients over: the releases waiting
    /// stay, and go to the new process as uncertain names.
    quiescing: bool,
    /// What the link learned, drained by the reactor.
    answers: Vec<Answer>,
    /// The lines to other nodes staged this turn, sent as one command.
    batch: batch::Batch,
    /// The names of the claims staged this turn (their entries are in
    /// `pending`), sent as one command.
    staged_claims: Vec<Rc<str>>,
    /// The same for releases.
    staged_releases: Vec<String>,
    /// When the first of them was staged (ms).
    batch_since: u64,
    /// Where recipient names were last found, to group the lines by node.
    holders: batch::Holders,
    /// Recipient names in routes awaiting Redis.
    inflight_names: usize,
    /// Connections whose input is held back until their answers are in.
    throttled: HashMap<u32, Slot, SlabKeys>,
    /// Names whose state in Redis is uncertain (see [`Answer::Reconcile`]).
    uncertain: std::collections::HashSet<String>,
    /// Whether `uncertain` overflowed: all names are dropped and claimed
    /// again instead.
    uncertain_overflow: bool,
    /// Whether the read budget left bytes from Redis unread.
    read_pending: bool,
    /// Whether the failure to reach Redis was logged (once per outage).
    down_logged: bool,
    /// Whether Redis refused the credentials at the last attempt (for
    /// `/healthz`, and so that it is said once, not at every attempt).
    auth_refused: bool,
    /// Whether other nodes list this Redis in another place (the same).
    layout_refused: bool,
    /// Whether the node is leaving (shutdown): no more renewals.
    leaving: bool,
    /// A live upgrade stopped the node's subscription and this came back
    /// from Redis: every message published for it before has arrived.
    unsubscribed: bool,
    /// After a live upgrade, the adopted clients' input is held back until
    /// the link is ready, or until this time at the latest.
    hold_until: Option<u64>,
    /// The counters.
    pub stats: ClusterStats,
}

impl Shard {
    /// A link that will connect at once, for node id `node`, on a server
    /// whose lines are at most `max_line` bytes (which bounds what Redis
    /// may send: see [`max_reply`]).
    pub fn new(config: ShardConfig, node: String, max_line: usize) -> Shard {
        let channel = format!("{}:node:{node}", config.prefix).into_bytes();
        let lines_channel = format!("{}:lines:{node}", config.prefix).into_bytes();
        let lost_channel = format!("{}:leases-lost", config.prefix).into_bytes();
        let lease_link = LeaseLink::new(
            config.redis,
            config.auth.clone(),
            format!("chatd-{node}-lease"),
        );
        Shard {
            config,
            node,
            lines_channel,
            channel,
            lost_channel,
            retries: VecDeque::new(),
            stream: None,
            state: State::Down { retry_at: 0 },
            out: Vec::new(),
            out_pos: 0,
            input: Vec::new(),
            framer: codec::Framer::new(MAX_REPLY_DEPTH, max_reply(max_line)),
            pending: VecDeque::new(),
            waiting: HashMap::default(),
            shas: scripts::shas(),
            lease_until: None,
            sweep_at: 0,
            lease_link,
            backoff_ms: FIRST_BACKOFF_MS,
            was_ready: false,
            link_id: None,
            stale_links: Vec::new(),
            kill_refused: false,
            last_reply_ms: 0,
            claims_in_flight: 0,
            claim_window: CLAIM_WINDOW,
            window_cut_at: 0,
            claim_queue: ClaimQueue::default(),
            releases_in_flight: 0,
            release_window: RELEASE_WINDOW,
            release_queue: ReleaseQueue::default(),
            quiescing: false,
            answers: Vec::new(),
            batch: batch::Batch::default(),
            staged_claims: Vec::new(),
            staged_releases: Vec::new(),
            batch_since: 0,
            holders: batch::Holders::default(),
            inflight_names: 0,
            throttled: Default::default(),
            uncertain: Default::default(),
            uncertain_overflow: false,
            read_pending: false,
            down_logged: false,
            auth_refused: false,
            layout_refused: false,
            leaving: false,
            unsubscribed: false,
            hold_until: None,
            stats: ClusterStats::default(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where this shard's Redis listens.
    pub fn redis(&self) -> std::net::SocketAddr {
        self.config.redis
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

    /// Why the node does not serve, for `/healthz` (`None`: it does).
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.is_ready() {
            None
        } else if self.auth_refused {
            Some("cluster: Redis refused the credentials")
        } else if self.layout_refused {
            Some("cluster: the nodes' --cluster lists differ")
        } else {
            Some("cluster: Redis unreachable")
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
    /// A renewal's answer that a long turn left unread is read first.
    pub fn must_fence(&mut self, now_ms: u64) -> bool {
        if !self.lease_ends_by(now_ms) {
            return false;
        }
        let found = self.lease_link.read_more(now_ms);
        self.renewed(found, now_ms);
        self.lease_ends_by(now_ms)
    }

    /// Whether the lease's certain end, less the margin, is past.
    fn lease_ends_by(&self, now_ms: u64) -> bool {
        self.lease_until
            .is_some_and(|until| now_ms + self.fence_margin_ms() >= until)
    }

    /// When the node must fence if no renewal succeeds first (`None`: no
    /// lease).
    pub fn fence_at(&self) -> Option<u64> {
        self.lease_until
            .map(|until| until.saturating_sub(self.fence_margin_ms()))
    }

    /// The node fenced: the lease is given up (a new one is taken once
    /// Redis answers again). The reactor closes the clients.
    pub fn fenced(&mut self, now_ms: u64) {
        if self.config.several {
            warn!(
                "cluster: lease not renewed in time on Redis at {}: closing every client \
                 whose name lives there with `error: unavailable` before another node can \
                 take their names",
                self.config.redis
            );
        } else {
            warn!(
                "cluster: lease not renewed in time: closing every logged-in client with \
                 `error: unavailable` before another node can take their names"
            );
        }
        self.stats.fences += 1;
        self.lease_until = None;
        // A renewal still in flight must not bring the lease back.
        self.lease_link.drop_in_flight(now_ms);
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
            State::Down { retry_at } if !self.leaving => next = next.min(retry_at),
            State::Down { .. } => {}
            State::Ready => next = next.min(self.sweep_at),
            State::Connecting | State::Handshaking => {}
        }
        let renews = self.renews();
        next = next.min(
            self.lease_link
                .next_deadline(renews, self.reply_timeout_ms()),
        );
        if let Some(until) = self.lease_until {
            next = next.min(until.saturating_sub(self.fence_margin_ms()));
        }
        if let Some(at) = self.hold_until {
            next = next.min(at);
        }
        if let Some(since) = self.waiting_since() {
            next = next.min(since + self.reply_timeout_ms());
        }
        if let Some(&(at, _, _)) = self.retries.front() {
            next = next.min(at);
        }
        if self.releases_may_go() {
            next = 0; // now
        }
        next
    }

    /// Whether releases wait that have room to go. None should: they go as
    /// answers come in, and when a live upgrade that kept them fails; the
    /// timer then sends them at once, whatever path was missed.
    fn releases_may_go(&self) -> bool {
        self.state == State::Ready
            && !self.quiescing
            && !self.release_queue.is_empty()
            && self.releases_in_flight < self.release_window
    }

    /// Since when the link waits for Redis without news: the oldest timed
    /// command in flight was sent, or Redis last answered, whichever is
    /// later. `None`: nothing timed is in flight.
    fn waiting_since(&self) -> Option<u64> {
        let sent = self.pending.iter().find_map(Pending::sent_ms)?;
        Some(sent.max(self.last_reply_ms))
    }

    /// How long Redis may go without answering anything while a command
    /// waits before it counts as unreachable: a
    /// quarter of the lease (so a slow Redis is noticed in time to renew
    /// elsewhere... or to fence), at least 200 ms.
    fn reply_timeout_ms(&self) -> u64 {
        (self.config.lease_ms / 4).max(200)
    }

    /// Time-driven work: connect, renew, time out a silent Redis.
    pub fn on_timer(&mut self, registry: &Registry, tokens: Tokens, now_ms: u64) {
        let renew = self.renews().then(|| self.lease_key());
        let lease = renew.as_deref().map(|key| (self.config.lease_ms, key));
        let timeout = self.reply_timeout_ms();
        let found = self
            .lease_link
            .on_timer(registry, tokens.lease, now_ms, lease, timeout);
        self.renewed(found, now_ms);
        if self.hold_until.is_some_and(|at| now_ms >= at) {
            self.release_holds();
        }
        if let State::Down { retry_at } = self.state {
            // A node leaving does not come back: its handshake would put
            // back its epoch and its place among the nodes, which only its
            // farewell (already sent or given up) takes away.
            if now_ms >= retry_at && !self.leaving {
                self.connect(registry, tokens.link, now_ms);
            }
            return;
        }
        let silent = |link: &Shard| {
            link.waiting_since()
                .is_some_and(|since| now_ms >= since + timeout)
        };
        if silent(self) && self.wants_read() {
            // A long turn may have left the answer unread.
            self.read(now_ms);
        }
        if silent(self) {
            self.reset(now_ms, "Redis did not answer in time");
            return;
        }
        if self.state == State::Ready && now_ms >= self.sweep_at && !self.leaving {
            self.sweep(now_ms);
        }
        while self.retries.front().is_some_and(|&(at, _, _)| now_ms >= at) {
            if let Some((_, slot, name)) = self.retries.pop_front() {
                self.send_claim(slot, name, false, true, now_ms);
            }
        }
        self.admit_releases();
    }

    /// Whether the lease is renewed on its own connection now: while the
    /// node holds one, is not leaving, and its data link is ready. A node
    /// whose data link is down cannot release the names of clients that
    /// leave, so it lets its lease lapse as it always did: fenced within a
    /// lease of the outage, its names free within a lease more.
    fn renews(&self) -> bool {
        self.lease_until.is_some() && !self.leaving && self.state == State::Ready
    }

    /// A readiness event on the lease's connection.
    pub fn on_lease_event(&mut self, event: &mio::event::Event, now_ms: u64) {
        let found = self.lease_link.on_event(event, now_ms);
        self.renewed(found, now_ms);
    }

    /// What renewals on the lease's connection found: a lease extended, or
    /// gone (then the data link checks it, in order with its claims, and
    /// takes a new one if it is).
    fn renewed(&mut self, found: Vec<Renewal>, now_ms: u64) {
        for renewal in found {
            match renewal {
                // Only a lease the node still holds (not one it fenced).
                Renewal::Renewed { sent_ms } if self.lease_until.is_some() => {
                    self.lease_renewed(sent_ms, now_ms);
                }
                Renewal::Renewed { .. } => {}
                Renewal::Gone => self.check_lease(now_ms),
            }
        }
    }

    /// A renewal sent at `sent_ms` succeeded, on either connection: the
    /// lease is certain until a lease after it, and never shortened (the
    /// other connection may have renewed since).
    pub(super) fn lease_renewed(&mut self, sent_ms: u64, now_ms: u64) {
        self.stats.rtt_us = now_ms.saturating_sub(sent_ms) * 1000;
        let until = sent_ms + self.config.lease_ms;
        self.lease_until = Some(self.lease_until.map_or(until, |held| held.max(until)));
    }

    /// Queues the handshake: RESP3, the scripts, the lease (renewed if it
    /// survived, else taken anew), the node's channel.
    fn handshake(&mut self, now_ms: u64) {
        let name = format!("chatd-{}", self.node);
        hello(&mut self.out, self.config.auth.as_ref(), &name);
        self.expect(Pending::Hello);
        // Before anything that settles names (see `stale_links`).
        for id in self.stale_links.clone() {
            let id_text = id.to_string();
            self.command(
                &[b"CLIENT", b"KILL", b"ID", id_text.as_bytes()],
                Pending::KillStale(id),
            );
        }
        for (i, script) in scripts::ALL.iter().enumerate() {
            let which = [
                Script::Claim,
                Script::Release,
                Script::Send,
                Script::DropNames,
                Script::Sweep,
                Script::Layout,
            ][i];
            self.command(
                &[b"SCRIPT", b"LOAD", script.as_bytes()],
                Pending::Load(which),
            );
        }
        // A policy that evicts keys with a time to live could evict leases
        // (and free names too early): warned about, not refused.
        self.command(&[b"CONFIG", b"GET", b"maxmemory-policy"], Pending::Policy);
        self.check_layout();
        // A lease that survived keeps its epoch (a node of an earlier
        // version, upgraded in place, had none).
        self.set_epoch(false);
        self.send_renew(now_ms);
        self.sweep_at = now_ms + self.config.lease_ms / 3;
        let lines = self.lines_channel.clone();
        let channel = self.channel.clone();
        let lost = self.lost_channel.clone();
        // Under RESP3 the confirmations are pushes, not replies: no entry.
        encode_command(&mut self.out, &[b"SUBSCRIBE", &lines, &channel, &lost]);
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
    }

    /// Sweeps dead nodes away, every third of a lease; renews the lease
    /// too while its own connection is down.
    fn sweep(&mut self, now_ms: u64) {
        self.sweep_at = now_ms + self.config.lease_ms / 3;
        // An epoch deleted (see `scripts::RELEASE`) comes back.
        self.set_epoch(false);
        self.check_layout();
        if !self.lease_link.is_connected() {
            self.send_renew(now_ms);
        }
        let prefix = self.config.prefix.clone();
        let budget = scripts::SWEEP_BUDGET.to_string();
        self.script(
            Script::Sweep,
            &[prefix.as_bytes(), budget.as_bytes()],
            Pending::Plain,
        );
    }

    /// Checks (and keeps for three leases) this Redis's place in the list
    /// of shards (`scripts::LAYOUT`).
    fn check_layout(&mut self) {
        let prefix = self.config.prefix.clone();
        let layout = self.config.layout.clone();
        let ttl = (3 * self.config.lease_ms).to_string();
        self.script(
            Script::Layout,
            &[prefix.as_bytes(), layout.as_bytes(), ttl.as_bytes()],
            Pending::Layout,
        );
    }

    fn lease_key(&self) -> String {
        format!("{}:lease:{}", self.config.prefix, self.node)
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch:{}", self.config.prefix, self.node)
    }

    /// Sets the node's epoch to a random number (`fresh`: with a new
    /// lease, whatever it was; else only if it has none): other nodes'
    /// guesses of where a name is, made at an epoch before it, then fail
    /// their check and are looked up again (`scripts::SEND`). A random
    /// start (below 2^62, so that it can be bumped for ever) cannot equal
    /// an epoch a guess was made at before Redis lost its data.
    fn set_epoch(&mut self, fresh: bool) {
        let key = self.epoch_key();
        let start = u64::from_str_radix(&new_node_id(), 16).unwrap_or(1) >> 2;
        let start = start.to_string();
        let mut args: Vec<&[u8]> = vec![b"SET", key.as_bytes(), start.as_bytes()];
        if !fresh {
            args.push(b"NX");
        }
        self.command(&args, Pending::Plain);
    }

    /// Appends a command and its entry, after what was staged before it.
    fn command(&mut self, args: &[&[u8]], pending: Pending) {
        self.seal_staged();
        encode_command(&mut self.out, args);
        self.expect(pending);
    }

    /// Sends the lines staged this turn as one `EVALSHA send`.
    pub(super) fn seal_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let (args, sent) = self.batch.seal();
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.encode_node_script(Script::Send, &args);
        let sent_ms = self.batch_since;
        self.expect(Pending::Batch { sent, sent_ms });
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
        self.seal_staged();
        self.encode_script(script, &[], args);
        self.expect(pending);
    }

    /// Appends an `EVALSHA` of `script` whose arguments are the prefix,
    /// this node's id and `extra`.
    fn node_script(&mut self, script: Script, extra: &[&[u8]], pending: Pending) {
        self.seal_staged();
        self.encode_node_script(script, extra);
        self.expect(pending);
    }

    /// Appends an `EVALSHA` of `script` with the prefix, this node's id and
    /// `extra`, nothing sealed first (the seals use it themselves).
    fn encode_node_script(&mut self, script: Script, extra: &[&[u8]]) {
        let prefix = self.config.prefix.clone();
        let node = self.node.clone();
        self.encode_script(script, &[prefix.as_bytes(), node.as_bytes()], extra);
    }

    /// Appends `EVALSHA <sha> 0 <first...> <rest...>` (the caller records
    /// what it is for with [`Shard::expect`]).
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
            self.claim_unavailable(slot, name, again);
            return;
        }
        self.send_claim(slot, name, again, false, now_ms);
    }

    /// Answers a claim of `name` for `slot` with `unavailable`: Redis could
    /// not be asked, or its answer will not come.
    pub(super) fn claim_unavailable(&mut self, slot: Slot, name: Rc<str>, again: bool) {
        let outcome = Claimed::Unavailable;
        self.answers.push(Answer::Claimed {
            slot,
            name,
            again,
            outcome,
        });
    }

    /// Sends a claim (`retried`: it was found taken once already), or
    /// queues it while [`CLAIM_WINDOW`] claims are in flight.
    fn send_claim(&mut self, slot: Slot, name: Rc<str>, again: bool, retried: bool, now_ms: u64) {
        // A release of the name still waiting never goes: the name is this
        // node's in Redis until it does, and the claim keeps it so. (Sent
        // later, it would free the name this claim holds.)
        self.release_queue.cancel(&name);
        if self.state == State::Ready && self.claims_in_flight >= self.claim_window {
            self.claim_queue.push_back((slot, name, again, retried));
            return;
        }
        if self.state != State::Ready {
            self.claim_unavailable(slot, name, again);
            return;
        }
        self.claims_in_flight += 1;
        // Staged: the turn's claims go as one command (`seal_claims`).
        self.stage(Staged::Claims);
        if self.staged_claims.len() >= CLAIM_GROUP {
            self.seal_claims();
        }
        self.staged_claims.push(Rc::clone(&name));
        self.expect(Pending::Claim {
            slot,
            name,
            again,
            retried,
            sent_ms: now_ms,
            group: 1,
        });
    }

    /// Sends the claims staged this turn as one `EVALSHA claim` (their
    /// entries are the last ones in the FIFO: anything else queued seals
    /// them first).
    pub(super) fn seal_claims(&mut self) {
        let names = std::mem::take(&mut self.staged_claims);
        self.seal_group(Script::Claim, &names);
    }

    /// Sends `names` as one call of `script`, whose entries are the last
    /// `names.len()` in the FIFO; the first of them learns how many the
    /// answer is for.
    fn seal_group<N: AsRef<str>>(&mut self, script: Script, names: &[N]) {
        let n = names.len();
        if n == 0 {
            return;
        }
        let names: Vec<&[u8]> = names.iter().map(|n| n.as_ref().as_bytes()).collect();
        self.encode_node_script(script, &names);
        let first = self.pending.len() - n;
        match self.pending.get_mut(first) {
            Some(Pending::Claim { group, .. } | Pending::Release { group, .. }) => {
                *group = n as u32;
            }
            other => debug_assert!(false, "staged entries not last: {other:?}"),
        }
    }

    /// Seals whatever is staged, so that what is queued next comes after
    /// it in Redis and in the FIFO.
    pub(super) fn seal_staged(&mut self) {
        self.seal_releases();
        self.seal_claims();
        self.seal_batch();
    }

    /// Makes way to stage `kind`: one kind is staged at a time, so what
    /// else is staged is sent first (the node's order is Redis's order).
    fn stage(&mut self, kind: Staged) {
        if kind != Staged::Releases {
            self.seal_releases();
        }
        if kind != Staged::Claims {
            self.seal_claims();
        }
        if kind != Staged::Lines {
            self.seal_batch();
        }
    }

    /// A claim sent at `sent_ms` was answered: the window follows its round
    /// trip. Slower than a quarter of the reply timeout, it halves (once
    /// per such round trip), so that what waits in Redis ahead of the
    /// lease's renewal stays well inside the timeout; faster than an
    /// eighth, it grows by one. Additive increase, multiplicative decrease,
    /// as TCP's congestion window.
    pub(super) fn fit_claim_window(&mut self, sent_ms: u64, now_ms: u64) {
        let rtt = now_ms.saturating_sub(sent_ms);
        let target = self.reply_timeout_ms() / 4;
        if rtt > target {
            if now_ms >= self.window_cut_at {
                self.claim_window = (self.claim_window / 2).max(CLAIM_WINDOW_MIN);
                self.window_cut_at = now_ms + rtt;
            }
        } else if rtt < target / 2 {
            self.claim_window = (self.claim_window + 1).min(CLAIM_WINDOW_MAX);
        }
    }

    /// The claim window now, and the claims and the releases waiting for
    /// room in their windows (for the stats line).
    pub fn claims_admitted(&self) -> (usize, usize, usize) {
        let releases = self.release_queue.len();
        (self.claim_window, self.claim_queue.len(), releases)
    }

    /// A claim was answered: the oldest waiting ones are sent while the
    /// window has room.
    pub(super) fn admit_claims(&mut self, now_ms: u64) {
        while self.claims_in_flight < self.claim_window {
            let Some((slot, name, again, retried)) = self.claim_queue.pop_front() else {
                return;
            };
            self.send_claim(slot, name, again, retried, now_ms);
        }
    }

    /// The oldest waiting releases are sent while their window has room
    /// (not while a live upgrade hands over).
    pub(super) fn admit_releases(&mut self) {
        while self.releases_in_flight < self.release_window
            && self.state == State::Ready
            && !self.quiescing
        {
            let Some(name) = self.release_queue.pop_front() else {
                return;
            };
            self.dispatch_release(name.to_string());
        }
    }

    /// A first claim found `name` taken: it is tried once more in
    /// [`CLAIM_RETRY_MS`] (no answer meanwhile; the connection waits).
    pub(super) fn retry_claim(&mut self, slot: Slot, name: Rc<str>, now_ms: u64) {
        self.retries
            .push_back((now_ms + CLAIM_RETRY_MS, slot, name));
    }

    /// Frees `name` in Redis, after the releases waiting for room in
    /// [`RELEASE_WINDOW`]. Without a link nothing is sent: the name is
    /// remembered as uncertain and settled when the link is back (see
    /// [`Answer::Reconcile`]). A node leaving sends none: its farewell
    /// drops all its names at once.
    pub fn release(&mut self, name: &str) {
        // A claim of it still waiting for room must not follow the release
        // to Redis: its client is gone.
        let gone = self.claim_queue.take_name(name);
        self.fail_queued_claims(gone);
        // Nor a claim of it waiting to be tried again (found taken once).
        let mut kept = VecDeque::with_capacity(self.retries.len());
        for (at, slot, claimed) in std::mem::take(&mut self.retries) {
            if &*claimed == name {
                self.claim_unavailable(slot, claimed, false);
            } else {
                kept.push_back((at, slot, claimed));
            }
        }
        self.retries = kept;
        if self.leaving {
            return;
        }
        if self.state != State::Ready {
            self.uncertain_name(name);
        } else if self.quiescing
            || self.releases_in_flight >= self.release_window
            || !self.release_queue.is_empty()
        {
            self.release_queue.push_back(name);
        } else {
            self.dispatch_release(name.to_string());
        }
    }

    /// Sends a release that has room in its window.
    fn dispatch_release(&mut self, name: String) {
        self.releases_in_flight += 1;
        // Staged: the turn's releases go as one command (`seal_releases`).
        self.stage(Staged::Releases);
        if self.staged_releases.len() >= CLAIM_GROUP {
            self.seal_releases();
        }
        self.staged_releases.push(name.clone());
        self.expect(Pending::Release { name, group: 1 });
    }

    /// Sends the releases staged this turn as one `EVALSHA release`.
    pub(super) fn seal_releases(&mut self) {
        let names = std::mem::take(&mut self.staged_releases);
        self.seal_group(Script::Release, &names);
    }

    /// Claims that were never sent fail (`unavailable`); nothing of them is
    /// uncertain in Redis.
    pub(super) fn fail_queued_claims(&mut self, claims: VecDeque<QueuedClaim>) {
        for (slot, name, again, _) in claims {
            self.claim_unavailable(slot, name, again);
        }
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
    /// them held here, each once: staged in this turn's batch (`batch.rs`),
    /// answered as an [`Answer::Routed`]. Returns false (and sends nothing)
    /// when Redis cannot be asked now: the caller reports the names as
    /// `unavailable`.
    /// `joined`: the line is answered even if it reaches everyone (its
    /// answer is joined with other shards', see `shards.rs`).
    pub fn route(
        &mut self,
        slot: Slot,
        names: &[&str],
        line: &[u8],
        joined: bool,
        now_ms: u64,
    ) -> bool {
        if !self.is_ready() || self.inflight_names + names.len() > MAX_INFLIGHT_NAMES {
            return false;
        }
        self.stage(Staged::Lines);
        if self.batch.is_full_for(line.len(), names.len()) {
            self.seal_batch();
        }
        if self.batch.is_empty() {
            self.batch_since = now_ms;
        }
        self.inflight_names += names.len();
        *self.waiting.entry(slot.key).or_default() += 1;
        self.batch.add(&self.holders, slot, names, line, joined);
        self.stats.routed_out += 1;
        true
    }

    /// Whether the connection `slot` has answers outstanding: its next
    /// `error:` line must then wait behind them ([`Shard::hold_marker`]).
    pub fn has_waiting(&self, slot: Slot) -> bool {
        self.waiting.get(&slot.key).is_some_and(|&n| n > 0)
    }

    /// Whether the connection `slot` waits for so many answers (or Redis
    /// for so many commands) that its input must not be read until they
    /// are in. Then the reactor holds its input back and calls
    /// [`Shard::throttle`]; an [`Answer::Unthrottle`] follows.
    pub fn must_throttle(&self, slot: Slot) -> bool {
        let waiting = self.waiting.get(&slot.key).copied().unwrap_or(0);
        waiting >= MAX_WAITING_PER_CONN || (waiting > 0 && self.pending.len() >= MAX_PENDING)
    }

    /// Whether an answer for `slot` is awaited from Redis or waits to be
    /// applied.
    pub fn owes(&self, slot: Slot) -> bool {
        self.has_waiting(slot)
            || self.answers.iter().any(|a| a.slot() == Some(slot))
            || self.retries.iter().any(|&(_, s, _)| s == slot)
            || self.claim_queue.has_slot(slot)
    }

    /// Whether the input of `slot` is held back (see
    /// [`Shard::must_throttle`]).
    pub fn is_throttled(&self, slot: Slot) -> bool {
        self.throttled.get(&slot.key) == Some(&slot)
    }

    /// Notes that the input of `slot` is held back (see
    /// [`Shard::must_throttle`]).
    pub fn throttle(&mut self, slot: Slot) {
        self.throttled.insert(slot.key, slot);
    }

    /// Queues a marker for a line the reactor holds for `slot`: an
    /// [`Answer::Held`] says when the answers before it are in. With lines
    /// staged this turn it goes among them (`batch.rs`): the batch is not
    /// cut at every marker, which with several shards would make one
    /// script call of every few lines.
    pub fn hold_marker(&mut self, slot: Slot) {
        *self.waiting.entry(slot.key).or_default() += 1;
        if !self.batch.is_empty() {
            self.batch.add_marker(slot);
            return;
        }
        self.seal_staged();
        self.pending.push_back(Pending::Held { slot });
        self.pop_held();
    }

    /// Shutdown: drops every name of this node and its lease. Returns
    /// whether a farewell was sent (its answer is `Answer::FarewellDone`).
    pub fn farewell(&mut self) -> bool {
        self.leaving = true;
        // What waits for room never goes: sent after the farewell, a
        // release would bring back the epoch it deletes, and a claim has
        // no lease to hold a name with.
        self.release_queue = ReleaseQueue::default();
        let queued = self.claim_queue.take_all();
        self.fail_queued_claims(queued);
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
        let epoch = self.epoch_key();
        self.command(&[b"DEL", epoch.as_bytes()], Pending::Plain);
        // The last node out takes the layout with it.
        let prefix = self.config.prefix.clone();
        self.script(
            Script::Layout,
            &[prefix.as_bytes(), b"", b"0"],
            Pending::Plain,
        );
        self.command(&[b"DEL", lease.as_bytes()], Pending::Farewell);
        true
    }

    /// A live upgrade begins: the node stops listening on its channel, so
    /// that no message is pushed into a connection nobody will read;
    /// [`Shard::is_quiet`] says when the rest has come. Returns false
    /// when the link is not ready (nothing to wait for).
    pub fn quiesce(&mut self) -> bool {
        if self.state != State::Ready {
            return false;
        }
        self.seal_staged();
        self.unsubscribed = false;
        self.quiescing = true;
        let lines = self.lines_channel.clone();
        let channel = self.channel.clone();
        // The confirmations are pushes, not replies: no entry. Both come
        // at once, after every message published on either before.
        encode_command(&mut self.out, &[b"UNSUBSCRIBE", &lines, &channel]);
        true
    }

    /// Whether everything asked of Redis is answered and no message for
    /// this node can still come (see [`Shard::quiesce`]).
    pub fn is_quiet(&self) -> bool {
        self.state != State::Ready
            || (self.unsubscribed
                && self.pending.is_empty()
                && self.batch.is_empty()
                && self.retries.is_empty()
                && self.claim_queue.is_empty())
    }

    /// The upgrade failed: the node listens on its channel again, and the
    /// releases kept waiting go.
    pub fn resubscribe(&mut self) {
        self.quiescing = false;
        if self.state == State::Ready {
            self.seal_staged();
            let lines = self.lines_channel.clone();
            let channel = self.channel.clone();
            encode_command(&mut self.out, &[b"SUBSCRIBE", &lines, &channel]);
        }
        self.admit_releases();
    }

    /// What a live upgrade hands over: the time left of the lease (ms) and
    /// the names whose state in Redis is uncertain (commands still in
    /// flight count as uncertain), and whether they overflowed.
    pub fn handover_state(&self, now_ms: u64) -> (Option<u64>, Vec<String>, bool) {
        let mut uncertain: Vec<String> = self.uncertain.iter().cloned().collect();
        uncertain.extend(self.release_queue.names().map(str::to_string));
        for entry in &self.pending {
            if let Pending::Claim { name, .. } = entry {
                uncertain.push(name.to_string());
            } else if let Pending::Release { name, .. } = entry {
                uncertain.push(name.clone());
            }
        }
        let left = self.lease_until.map(|until| until.saturating_sub(now_ms));
        (left, uncertain, self.uncertain_overflow)
    }

    /// In the new process of a live upgrade: the lease as the old process
    /// held it (so that the node fences in time even if Redis cannot be
    /// reached), the uncertain names, and the adopted clients' input held
    /// back until the link is ready (at most `hold_ms`).
    pub fn adopt(
        &mut self,
        lease_left_ms: Option<u64>,
        uncertain: Vec<String>,
        overflow: bool,
        now_ms: u64,
        hold_ms: u64,
    ) {
        self.lease_until = lease_left_ms.map(|left| now_ms + left);
        for name in uncertain {
            self.uncertain_name(&name);
        }
        self.uncertain_overflow |= overflow;
        self.hold_until = (hold_ms > 0).then_some(now_ms + hold_ms);
    }

    /// Whether the adopted clients' input is held back for the link (see
    /// [`Shard::adopt`]).
    pub fn is_holding(&self) -> bool {
        self.hold_until.is_some()
    }

    /// Lets the held-back input of every throttled connection be read.
    pub(super) fn release_holds(&mut self) {
        self.hold_until = None;
        for (_, slot) in std::mem::take(&mut self.throttled) {
            self.answers.push(Answer::Unthrottle { slot });
        }
    }

    /// The answers learned since the last call.
    pub fn take_answers(&mut self) -> Vec<Answer> {
        std::mem::take(&mut self.answers)
    }

    /// Whether answers wait to be applied.
    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty()
    }
}

/// A random node id: 16 hex digits from the standard library's keyed hasher
/// (seeded from the OS), the process id and the clock.
pub(crate) fn new_node_id() -> String {
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
mod tests;
