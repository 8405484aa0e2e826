//! Past one Redis: the cluster as the reactor sees it, over one [`Shard`]
//! (a link, a lease, a claim window, a batch) per Redis primary of
//! `--cluster redis://a,redis://b,...`.
//!
//! A name lives on one shard, picked by Redis Cluster's hash slot of the
//! name (CRC16 mod 16384, `{hash tags}` included, so `CLUSTER KEYSLOT`
//! gives the same slot), the slots split into equal ranges in the order
//! the shards are listed. The node holds a lease on every shard and
//! listens on its channel on every shard. Claims and releases go to the
//! name's shard; a line to names on k shards goes to those k, staged in
//! each one's batch of the turn. A shard that fences or is down touches
//! only its names: the reactor closes the clients whose names live there
//! ([`Cluster::fence`]), lines to its names get `unavailable`.
//!
//! With one shard everything passes straight through. With several, the
//! answers one connection waits for may come from several FIFOs, and
//! this type puts them back in the order of the lines that caused them.
//! A line whose names live on one shard, from a connection that waits on
//! no other shard, needs nothing: that shard's FIFO keeps its order (the
//! common case, at no cost). Any other line is *joined*: each of its
//! shards answers it even if it reached everyone, each other shard the
//! connection waits on gets a marker (answered in its FIFO after what the
//! connection waits for there), and the parts become one answer
//! (`not-online` names each once, in the line's order, as on one node).
//! Held `error:` lines wait for a marker on every shard the connection
//! waits on. The joined answers of a connection come out of one queue,
//! oldest first; as each shard answers its own entries in order, a joined
//! part or marker from shard `i` belongs to the oldest entry waiting for
//! shard `i`, and an answer that is not joined is older than every entry
//! of the queue that waits for its shard.

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use mio::Registry;

use super::{Answer, ClusterConfig, ClusterStats, Shard, ShardConfig, SlabKeys, Tokens};
use crate::conn::Slot;

/// Redis Cluster's number of hash slots.
const SLOTS: u32 = 16384;

/// The hash slot of `name`, as Redis Cluster computes a key's: CRC16
/// (XMODEM) of the name, or of the part between its first `{` and the
/// next `}` if that part is not empty, mod 16384.
pub fn key_slot(name: &str) -> u16 {
    let bytes = name.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    (crc16(hashed) as u32 % SLOTS) as u16
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The shard of a hash slot among `shards`: equal ranges, in order, the
/// ranges `redis-cli --cluster create` gives that many primaries (0-5460,
/// 5461-10922 and 10923-16383 for three).
pub fn shard_of_slot(slot: u16, shards: usize) -> usize {
    let slot = usize::from(slot);
    let mut shard = slot * shards / SLOTS as usize;
    while shard > 0 && first_slot(shard, shards) > slot {
        shard -= 1;
    }
    while shard + 1 < shards && first_slot(shard + 1, shards) <= slot {
        shard += 1;
    }
    shard
}

/// The first slot of shard `i` of `shards`: `round(i * 16384 / shards - 1)
/// + 1`, as `redis-cli` computes it.
fn first_slot(i: usize, shards: usize) -> usize {
    if i == 0 {
        return 0;
    }
    (2 * i * SLOTS as usize - shards) / (2 * shards) + 1
}

/// The shard `name` lives on among `shards` (its place in `--cluster`).
pub fn shard_of(name: &str, shards: usize) -> usize {
    match shards {
        0 | 1 => 0,
        n => shard_of_slot(key_slot(name), n),
    }
}

/// One answer a connection waits for from several shards.
#[derive(Debug)]
struct Join {
    /// The shards that owe a part (bit `i`: shard `i`).
    expect: u64,
    /// The shards whose part is in.
    done: u64,
    what: Joined,
}

#[derive(Debug)]
enum Joined {
    /// A routed line: its names (in order, when it went to more than one
    /// shard) and what its shards said so far.
    Route {
        names: Vec<String>,
        offline: Vec<String>,
        unreachable: Vec<String>,
    },
    /// A line the reactor holds until the answers before it are in.
    Held,
}

/// The cluster link: one shard per Redis primary.
pub(crate) struct Cluster {
    shards: Vec<Shard>,
    /// Per connection (by slab key), the answers it waits for from
    /// several shards, oldest first (several shards only).
    /// (By the slot, id included: a connection gone leaves its entries to
    /// be answered and dropped, whoever gets its slab key next.)
    joins: HashMap<Slot, VecDeque<Join>, SlabKeys>,
    /// Connections whose input is held back, and the shards it waits on.
    throttled: HashMap<u32, (Slot, u64), SlabKeys>,
    /// Shards whose farewell is not answered yet.
    farewells: usize,
    /// Answers put back in order, for the reactor.
    answers: Vec<Answer>,
    /// The reactor's own counters (deliveries from other nodes), and the
    /// totals a live upgrade carried over; the shards' are added to them.
    pub stats: ClusterStats,
}

impl Cluster {
    /// One shard per Redis of `config`, for node id `node`.
    pub fn new(config: ClusterConfig, node: String, max_line: usize) -> Cluster {
        let several = config.shards.len() > 1;
        let addrs: Vec<String> = config.shards.iter().map(|s| s.addr.to_string()).collect();
        let addrs = addrs.join(",");
        let count = config.shards.len();
        let shards = config
            .shards
            .iter()
            .enumerate()
            .map(|(index, redis)| {
                let shard = ShardConfig {
                    redis: redis.addr,
                    auth: redis.auth.clone(),
                    prefix: config.prefix.clone(),
                    lease_ms: config.lease_ms,
                    index,
                    several,
                    layout: match several {
                        false => "0/1".to_string(),
                        true => format!("{index}/{count} {addrs}"),
                    },
                };
                Shard::new(shard, node.clone(), max_line)
            })
            .collect();
        Cluster {
            shards,
            joins: HashMap::default(),
            throttled: HashMap::default(),
            farewells: 0,
            answers: Vec::new(),
            stats: ClusterStats::default(),
        }
    }

    /// How many shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard `name` lives on.
    pub fn shard_of(&self, name: &str) -> usize {
        shard_of(name, self.shards.len())
    }

    fn shard(&mut self, name: &str) -> &mut Shard {
        let i = self.shard_of(name);
        &mut self.shards[i]
    }

    fn several(&self) -> bool {
        self.shards.len() > 1
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        self.shards[0].node()
    }

    /// The state as a word for the stats line: the one shard's; with
    /// several, `ready` when all are, `partial` when some are.
    pub fn state_name(&self) -> &'static str {
        let ready = self.shards_ready();
        match (self.shards.len(), ready) {
            (1, _) => self.shards[0].state_name(),
            (n, r) if r == n => "ready",
            (_, 0) => "down",
            _ => "partial",
        }
    }

    /// How many shards are ready.
    pub fn shards_ready(&self) -> usize {
        self.shards.iter().filter(|s| s.is_ready()).count()
    }

    /// Each shard's Redis, whether it is ready and the age of its lease
    /// (for the metrics).
    pub fn shard_gauges(&self, now_ms: u64) -> Vec<crate::metrics::ShardGauge> {
        self.shards
            .iter()
            .map(|s| crate::metrics::ShardGauge {
                redis: s.redis(),
                ready: s.is_ready(),
                lease_age_ms: s.lease_age_ms(now_ms),
            })
            .collect()
    }

    /// Why the node does not serve, for `/healthz` (`None`: it does). With
    /// several shards it serves while one is ready: the others' names get
    /// `unavailable`, on every node alike.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.shards.iter().any(Shard::is_ready) {
            return None;
        }
        let reasons: Vec<_> = self.shards.iter().map(Shard::unready_reason).collect();
        match reasons.iter().all(|r| *r == reasons[0]) {
            true => reasons[0],
            false => Some("cluster: Redis unreachable"),
        }
    }

    /// Whether every shard is ready.
    pub fn is_ready(&self) -> bool {
        self.shards.iter().all(Shard::is_ready)
    }

    /// The age of the oldest lease, in ms (`None`: no lease at all).
    pub fn lease_age_ms(&self, now_ms: u64) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| s.lease_age_ms(now_ms))
            .max()
    }

    /// Whether a shard must fence now (see [`Shard::must_fence`]).
    pub fn must_fence(&mut self, now_ms: u64) -> bool {
        let mut any = false;
        for shard in &mut self.shards {
            any |= shard.must_fence(now_ms);
        }
        any
    }

    /// Fences every shard that must (see [`Shard::must_fence`] and
    /// [`Shard::fenced`]). Returns them (bit `i`: shard `i`; 0: none): the
    /// reactor closes the clients whose names live there.
    pub fn fence(&mut self, now_ms: u64) -> u64 {
        let mut fenced = 0;
        for (i, shard) in self.shards.iter_mut().enumerate() {
            if shard.must_fence(now_ms) {
                shard.fenced(now_ms);
                fenced |= 1 << i;
            }
        }
        fenced
    }

    /// When the first shard must fence if no renewal succeeds first.
    pub fn fence_at(&self) -> Option<u64> {
        self.shards.iter().filter_map(Shard::fence_at).min()
    }

    /// The earliest time a shard wants to be woken.
    pub fn next_deadline(&self) -> u64 {
        self.shards
            .iter()
            .map(Shard::next_deadline)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Time-driven work of every shard; `tokens` gives each its poll
    /// tokens.
    pub fn on_timer(&mut self, registry: &Registry, tokens: impl Fn(usize) -> Tokens, now_ms: u64) {
        for (i, shard) in self.shards.iter_mut().enumerate() {
            shard.on_timer(registry, tokens(i), now_ms);
        }
    }

    /// A readiness event on shard `i`'s data link.
    pub fn on_event(&mut self, i: usize, event: &mio::event::Event, now_ms: u64) {
        if let Some(shard) = self.shards.get_mut(i) {
            shard.on_event(event, now_ms);
        }
    }

    /// A readiness event on shard `i`'s lease connection.
    pub fn on_lease_event(&mut self, i: usize, event: &mio::event::Event, now_ms: u64) {
        if let Some(shard) = self.shards.get_mut(i) {
            shard.on_lease_event(event, now_ms);
        }
    }

    /// Whether a shard has bytes from Redis the read budget left unread.
    pub fn has_unread(&self) -> bool {
        self.shards.iter().any(Shard::has_unread)
    }

    /// Reads on where the budget stopped.
    pub fn read_more(&mut self, now_ms: u64) {
        for shard in self.shards.iter_mut().filter(|s| s.has_unread()) {
            shard.read_more(now_ms);
        }
    }

    /// Reads every connection (after a failed upgrade).
    pub fn catch_up(&mut self, now_ms: u64) {
        self.shards.iter_mut().for_each(|s| s.catch_up(now_ms));
    }

    /// Writes what every shard has queued.
    pub fn flush(&mut self, now_ms: u64) {
        self.shards.iter_mut().for_each(|s| s.flush(now_ms));
    }

    /// Drops every shard's link (see [`Shard::reset`]).
    pub fn reset(&mut self, now_ms: u64, why: &str) {
        self.shards.iter_mut().for_each(|s| s.reset(now_ms, why));
    }

    /// Claims `name` on its shard (see [`Shard::claim`]).
    pub fn claim(&mut self, slot: Slot, name: Rc<str>, again: bool, now_ms: u64) {
        self.shard(&name).claim(slot, name, again, now_ms);
    }

    /// Frees `name` on its shard (see [`Shard::release`]).
    pub fn release(&mut self, name: &str) {
        self.shard(name).release(name);
    }

    /// Routes `line` from `slot` to `names` (none held here, each once)
    /// through the shards they live on. Returns the names that cannot be
    /// routed now (their shard is down or full), in order: the caller
    /// reports them as `unavailable`.
    pub fn route<'a>(
        &mut self,
        slot: Slot,
        names: &[&'a str],
        line: &[u8],
        now_ms: u64,
    ) -> Vec<&'a str> {
        if !self.several() {
            return match self.shards[0].route(slot, names, line, false, now_ms) {
                true => Vec::new(),
                false => names.to_vec(),
            };
        }
        // Each name's shard, hashed once.
        let of: Vec<usize> = names.iter().map(|n| self.shard_of(n)).collect();
        let Some(&first) = of.first() else {
            return Vec::new();
        };
        // The shards the connection waits on before this line.
        let waited = self.shards_where(|s| s.has_waiting(slot));
        let one_shard = of.iter().all(|&i| i == first);
        if one_shard && waited & !(1 << first) == 0 && !self.joins.contains_key(&slot) {
            // Its shard's FIFO keeps its order: nothing to join.
            return match self.shards[first].route(slot, names, line, false, now_ms) {
                true => Vec::new(),
                false => names.to_vec(),
            };
        }
        let mut by_shard: Vec<Vec<&str>> = vec![Vec::new(); self.shards.len()];
        for (&name, &i) in names.iter().zip(&of) {
            by_shard[i].push(name);
        }
        let (mut routed, mut failed) = (0u64, 0u64);
        for (i, part) in by_shard.iter().enumerate().filter(|(_, p)| !p.is_empty()) {
            match self.shards[i].route(slot, part, line, true, now_ms) {
                true => routed |= 1 << i,
                false => failed |= 1 << i,
            }
        }
        if routed != 0 {
            // Its answer also waits for what the connection waits on
            // elsewhere. (Routed nowhere, it has no answer to order: the
            // caller's `unavailable` line is held behind the rest.)
            let markers = waited & !routed;
            self.each_of(markers, |shard| shard.hold_marker(slot));
            // Parts of several shards are put back in the line's order.
            let order = match routed.count_ones() {
                1 => Vec::new(),
                _ => names
                    .iter()
                    .zip(&of)
                    .filter(|&(_, &i)| routed & 1 << i != 0)
                    .map(|(n, _)| n.to_string())
                    .collect(),
            };
            let what = Joined::Route {
                names: order,
                offline: Vec::new(),
                unreachable: Vec::new(),
            };
            self.push_join(slot, routed | markers, what);
        }
        names
            .iter()
            .zip(&of)
            .filter(|&(_, &i)| failed & 1 << i != 0)
            .map(|(&n, _)| n)
            .collect()
    }

    /// Whether the connection `slot` has answers outstanding.
    pub fn has_waiting(&self, slot: Slot) -> bool {
        self.shards.iter().any(|s| s.has_waiting(slot)) || self.joins.contains_key(&slot)
    }

    /// Whether the input of `slot` must not be read until its answers are
    /// in (see [`Shard::must_throttle`]): also when as many answers wait
    /// here, joined, behind one a slow shard owes.
    pub fn must_throttle(&self, slot: Slot) -> bool {
        self.shards.iter().any(|s| s.must_throttle(slot))
            || self
                .joins
                .get(&slot)
                .is_some_and(|queue| queue.len() >= super::MAX_WAITING_PER_CONN as usize)
    }

    /// Whether an answer for `slot` is awaited or waits to be applied.
    pub fn owes(&self, slot: Slot) -> bool {
        self.shards.iter().any(|s| s.owes(slot))
            || self.joins.contains_key(&slot)
            || self.answers.iter().any(|a| a.slot() == Some(slot))
    }

    /// Whether the input of `slot` is held back.
    pub fn is_throttled(&self, slot: Slot) -> bool {
        match self.several() {
            false => self.shards[0].is_throttled(slot),
            true => self
                .throttled
                .get(&slot.key)
                .is_some_and(|(s, _)| *s == slot),
        }
    }

    /// Holds the input of `slot` back until every shard it waits on (or
    /// that holds adopted input) has answered: one
    /// [`Answer::Unthrottle`] follows.
    pub fn throttle(&mut self, slot: Slot) {
        if !self.several() {
            self.shards[0].throttle(slot);
            return;
        }
        let on = self.shards_where(|s| s.has_waiting(slot) || s.is_holding());
        self.each_of(on, |shard| shard.throttle(slot));
        if on == 0 {
            self.answers.push(Answer::Unthrottle { slot });
        } else {
            self.throttled.insert(slot.key, (slot, on));
        }
    }

    /// Queues a marker for a line the reactor holds for `slot`: an
    /// [`Answer::Held`] comes when every answer before it is in.
    pub fn hold_marker(&mut self, slot: Slot) {
        if !self.several() {
            self.shards[0].hold_marker(slot);
            return;
        }
        let expect = self.shards_where(|s| s.has_waiting(slot));
        self.push_join(slot, expect, Joined::Held);
        self.each_of(expect, |shard| shard.hold_marker(slot));
        self.drain_joins(slot);
    }

    /// The shards for which `test` holds (bit `i`: shard `i`).
    fn shards_where(&self, test: impl Fn(&Shard) -> bool) -> u64 {
        let mut set = 0;
        for (i, shard) in self.shards.iter().enumerate() {
            if test(shard) {
                set |= 1 << i;
            }
        }
        set
    }

    /// Does `act` to each shard of `set`.
    fn each_of(&mut self, set: u64, mut act: impl FnMut(&mut Shard)) {
        for (i, shard) in self.shards.iter_mut().enumerate() {
            if set & 1 << i != 0 {
                act(shard);
            }
        }
    }

    fn push_join(&mut self, slot: Slot, expect: u64, what: Joined) {
        self.joins.entry(slot).or_default().push_back(Join {
            expect,
            done: 0,
            what,
        });
    }

    /// Shutdown: every shard drops this node's names and lease. Returns
    /// whether a farewell was sent (one [`Answer::FarewellDone`] follows,
    /// once every shard answered).
    pub fn farewell(&mut self) -> bool {
        self.farewells = 0;
        for shard in &mut self.shards {
            self.farewells += usize::from(shard.farewell());
        }
        self.farewells > 0
    }

    /// A live upgrade begins: every shard stops listening (see
    /// [`Shard::quiesce`]). Returns whether one was ready.
    pub fn quiesce(&mut self) -> bool {
        let mut any = false;
        for shard in &mut self.shards {
            any |= shard.quiesce();
        }
        any
    }

    /// Whether every shard is quiet (see [`Shard::is_quiet`]).
    pub fn is_quiet(&self) -> bool {
        self.shards.iter().all(Shard::is_quiet) && self.joins.is_empty()
    }

    /// The upgrade failed: every shard listens again.
    pub fn resubscribe(&mut self) {
        self.shards.iter_mut().for_each(Shard::resubscribe);
    }

    /// What a live upgrade hands over: each shard's time left of its lease,
    /// the names whose state in Redis is uncertain (a name says its
    /// shard), and whether a shard's list of them overflowed.
    pub fn handover_state(&self, now_ms: u64) -> (Vec<Option<u64>>, Vec<String>, bool) {
        let mut leases = Vec::with_capacity(self.shards.len());
        let mut uncertain = Vec::new();
        let mut overflow = false;
        for shard in &self.shards {
            let (left, names, over) = shard.handover_state(now_ms);
            leases.push(left);
            uncertain.extend(names);
            overflow |= over;
        }
        (leases, uncertain, overflow)
    }

    /// In the new process of a live upgrade: each shard's lease as the old
    /// process held it (if the old one listed other shards, each gets the
    /// shortest lease it handed over: fencing early is safe, late is not),
    /// the uncertain names to their shards, and an overflow to every shard.
    pub fn adopt(
        &mut self,
        leases_left_ms: &[Option<u64>],
        uncertain: Vec<String>,
        overflow: bool,
        now_ms: u64,
        hold_ms: u64,
    ) {
        let shortest = leases_left_ms.iter().flatten().min().copied();
        let same = leases_left_ms.len() == self.shards.len();
        let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); self.shards.len()];
        for name in uncertain {
            by_shard[self.shard_of(&name)].push(name);
        }
        for (i, (shard, names)) in self.shards.iter_mut().zip(by_shard).enumerate() {
            let left = if same { leases_left_ms[i] } else { shortest };
            // A shard that had no lease was not serving: nobody's input
            // waits for it.
            let hold = if left.is_some() { hold_ms } else { 0 };
            shard.adopt(left, names, overflow, now_ms, hold);
        }
    }

    /// Whether a login wave ended on a shard since the last call (its
    /// claim queue gave back what the wave grew it to): the reactor trims
    /// the heap then, as after a burst of closes.
    pub fn wave_ended(&mut self) -> bool {
        let mut ended = false;
        for shard in &mut self.shards {
            ended |= shard.claim_queue.take_shrunk();
            ended |= shard.release_queue.take_shrunk();
        }
        ended
    }

    /// Whether a shard holds the adopted clients' input for its link.
    pub fn is_holding(&self) -> bool {
        self.shards.iter().any(Shard::is_holding)
    }

    /// The windows, and the claims and the releases waiting for room in
    /// them, all shards together (for the stats line).
    pub fn claims_admitted(&self) -> (usize, usize, usize) {
        self.shards.iter().fold((0, 0, 0), |(w, c, r), s| {
            let (window, claims, releases) = s.claims_admitted();
            (w + window, c + claims, r + releases)
        })
    }

    /// The counters: the reactor's and every shard's together (the round
    /// trip: the slowest shard's).
    pub fn totals(&self) -> ClusterStats {
        let mut total = self.stats;
        for shard in &self.shards {
            total.add(&shard.stats);
        }
        total
    }

    /// Whether answers wait to be applied.
    pub fn has_answers(&self) -> bool {
        !self.answers.is_empty() || self.shards.iter().any(Shard::has_answers)
    }

    /// The answers learned since the last call, in order for each
    /// connection.
    pub fn take_answers(&mut self) -> Vec<Answer> {
        if !self.several() {
            return self.shards[0].take_answers();
        }
        for i in 0..self.shards.len() {
            for answer in self.shards[i].take_answers() {
                self.sort_answer(i, answer);
            }
        }
        std::mem::take(&mut self.answers)
    }

    /// Files an answer of shard `i` (several shards).
    fn sort_answer(&mut self, i: usize, answer: Answer) {
        match answer {
            Answer::Routed {
                slot,
                offline,
                unreachable,
                joined: true,
            } => self.part(i, slot, false, offline, unreachable),
            Answer::Unroutable {
                slot,
                names,
                joined: true,
            } => self.part(i, slot, false, Vec::new(), names),
            Answer::Held { slot } => self.part(i, slot, true, Vec::new(), Vec::new()),
            Answer::Unthrottle { slot } => {
                let Some((held, on)) = self.throttled.get_mut(&slot.key) else {
                    return; // unthrottled already
                };
                if *held != slot {
                    return;
                }
                *on &= !(1 << i);
                if *on == 0 {
                    self.throttled.remove(&slot.key);
                    self.answers.push(Answer::Unthrottle { slot });
                }
            }
            Answer::FarewellDone => {
                self.farewells = self.farewells.saturating_sub(1);
                if self.farewells == 0 {
                    self.answers.push(Answer::FarewellDone);
                }
            }
            other => self.answers.push(other),
        }
    }

    /// Shard `i`'s part of the oldest answer of `slot` it owes.
    fn part(
        &mut self,
        i: usize,
        slot: Slot,
        held: bool,
        offline: Vec<String>,
        unreachable: Vec<String>,
    ) {
        let bit = 1u64 << i;
        let join = self.joins.get_mut(&slot).and_then(|queue| {
            queue
                .iter_mut()
                .find(|j| j.expect & bit != 0 && j.done & bit == 0)
        });
        let Some(join) = join else {
            // Not one this type filed: said as it is (nothing is lost).
            debug_assert!(
                false,
                "an answer of shard {i} for {slot:?} nobody waits for"
            );
            self.answers.push(match held {
                true => Answer::Held { slot },
                false => Answer::Routed {
                    slot,
                    offline,
                    unreachable,
                    joined: false,
                },
            });
            return;
        };
        join.done |= bit;
        if let Joined::Route {
            offline: all_offline,
            unreachable: all_unreachable,
            ..
        } = &mut join.what
        {
            all_offline.extend(offline);
            all_unreachable.extend(unreachable);
        }
        self.drain_joins(slot);
    }

    /// Says the answers of `slot` that are complete, oldest first, up to
    /// the first one still waiting for a shard.
    fn drain_joins(&mut self, slot: Slot) {
        let Some(queue) = self.joins.get_mut(&slot) else {
            return;
        };
        let mut said = false;
        while queue.front().is_some_and(|j| j.done == j.expect) {
            let Some(join) = queue.pop_front() else {
                break;
            };
            match join.what {
                Joined::Held => self.answers.push(Answer::Held { slot }),
                Joined::Route {
                    names,
                    offline,
                    unreachable,
                } => {
                    if offline.is_empty() && unreachable.is_empty() {
                        continue;
                    }
                    let (offline, unreachable) = if names.is_empty() {
                        (offline, unreachable)
                    } else {
                        (in_order(&names, offline), in_order(&names, unreachable))
                    };
                    self.answers.push(Answer::Routed {
                        slot,
                        offline,
                        unreachable,
                        joined: false,
                    });
                }
            }
            said = true;
        }
        if queue.is_empty() {
            self.joins.remove(&slot);
            if !said {
                // Nothing to tell: still, it waits for nothing more.
                self.answers.push(Answer::Settled { slot });
            }
        }
    }
}

/// `some` of `names`, in the order of `names` (a line's recipients, each
/// once).
fn in_order(names: &[String], some: Vec<String>) -> Vec<String> {
    if some.len() < 2 {
        return some;
    }
    let some: HashSet<String> = some.into_iter().collect();
    names
        .iter()
        .filter(|n| some.contains(*n))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // What `CLUSTER KEYSLOT` answered on a Redis 7 in cluster mode.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("{user1000}.following"), 3443);
        assert_eq!(key_slot("user1000"), 3443);
        assert_eq!(key_slot("foo{}{bar}"), 8363);
        assert_eq!(key_slot("foo{{bar}}zap"), 4015);
        assert_eq!(key_slot("{bar"), 4015);
        assert_eq!(key_slot("alice"), 749);
        assert_eq!(key_slot("bob"), 8955);
    }

    #[test]
    fn slots_split_into_equal_ranges_in_order() {
        assert_eq!(shard_of_slot(0, 1), 0);
        assert_eq!(shard_of_slot(16383, 1), 0);
        assert_eq!(shard_of_slot(8191, 2), 0);
        assert_eq!(shard_of_slot(8192, 2), 1);
        assert_eq!(shard_of_slot(5460, 3), 0);
        assert_eq!(shard_of_slot(5461, 3), 1);
        assert_eq!(shard_of_slot(10922, 3), 1);
        assert_eq!(shard_of_slot(10923, 3), 2);
        assert_eq!(shard_of_slot(16383, 3), 2);
        // Every slot on one shard, the shards in order, none empty.
        for shards in 1..=64 {
            let mut last = 0;
            for slot in 0..16384 {
                let shard = shard_of_slot(slot, shards);
                assert!(shard == last || shard == last + 1, "{shards}: {slot}");
                last = shard;
            }
            assert_eq!(last, shards - 1);
        }
    }

    use crate::cluster::codec::Reply;
    use crate::cluster::{Redis, State};

    /// A cluster of two shards, both as if their handshake was answered.
    fn two_ready_shards() -> Cluster {
        let redis = |port| Redis {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            auth: None,
        };
        let config = ClusterConfig {
            shards: vec![redis(1), redis(2)],
            prefix: "p".into(),
            lease_ms: 10_000,
        };
        let mut cluster = Cluster::new(config, "n1".into(), 16 * 1024);
        for shard in &mut cluster.shards {
            shard.state = State::Ready;
            shard.lease_until = Some(10_000);
            shard.lease_link.retry_at = u64::MAX;
        }
        cluster
    }

    /// The first name `<stem><i>` on `shard` of two.
    fn on(stem: &str, shard: usize) -> String {
        (0..)
            .map(|i| format!("{stem}{i}"))
            .find(|n| shard_of(n, 2) == shard)
            .unwrap()
    }

    fn slot(key: u32, id: u32) -> Slot {
        Slot { key, id }
    }

    /// Shard `i` answers its oldest batch: these names (numbered from 1 in
    /// the order sent) are online nowhere.
    fn answer(cluster: &mut Cluster, i: usize, offline: &[i64]) {
        let shard = &mut cluster.shards[i];
        shard.seal_staged();
        let ints = Reply::Array(offline.iter().map(|&n| Reply::Int(n)).collect());
        let reply = Reply::Array(vec![ints, Reply::Array(vec![]), Reply::Array(vec![])]);
        shard.on_reply(reply, 1).unwrap();
    }

    /// What the reactor is told for connections, in order (`Settled` and
    /// `Unthrottle` left out).
    fn told(cluster: &mut Cluster) -> Vec<String> {
        cluster
            .take_answers()
            .into_iter()
            .filter_map(|a| match a {
                Answer::Routed { slot, offline, .. } => Some(format!(
                    "{}.{}: not-online {}",
                    slot.key,
                    slot.id,
                    offline.join(",")
                )),
                Answer::Held { slot } => Some(format!("{}.{}: held", slot.key, slot.id)),
                _ => None,
            })
            .collect()
    }

    /// A line to names on both shards is answered once, its names in the
    /// line's order, whichever shard answers first.
    #[test]
    fn one_lines_answers_from_two_shards_are_joined_in_its_order() {
        let mut cluster = two_ready_shards();
        let (a, b, c) = (on("a", 1), on("b", 0), on("c", 1));
        let unrouted = cluster.route(slot(1, 1), &[&a, &b, &c], b"x\n", 0);
        assert!(unrouted.is_empty());
        answer(&mut cluster, 1, &[1, 2]); // a and c
        assert!(told(&mut cluster).is_empty(), "shard 0 has not answered");
        assert!(cluster.owes(slot(1, 1)));
        answer(&mut cluster, 0, &[1]); // b
        assert_eq!(told(&mut cluster), [format!("1.1: not-online {a},{b},{c}")]);
        assert!(!cluster.owes(slot(1, 1)) && cluster.joins.is_empty());
    }

    /// A line to the fast shard after one to the slow shard waits for the
    /// slow one's answer (a marker there), and a held line after both.
    #[test]
    fn a_fast_shards_answer_waits_for_the_slow_shards_earlier_one() {
        let mut cluster = two_ready_shards();
        let (slow, fast) = (on("s", 1), on("f", 0));
        assert!(cluster.route(slot(1, 1), &[&slow], b"1\n", 0).is_empty());
        assert!(cluster.joins.is_empty(), "one shard: nothing to join");
        assert!(cluster.route(slot(1, 1), &[&fast], b"2\n", 0).is_empty());
        cluster.hold_marker(slot(1, 1));
        answer(&mut cluster, 0, &[1]);
        assert!(told(&mut cluster).is_empty(), "behind shard 1's answer");
        cluster.shards[1].seal_staged();
        answer(&mut cluster, 1, &[1]);
        assert_eq!(
            told(&mut cluster),
            [
                format!("1.1: not-online {slow}"),
                format!("1.1: not-online {fast}"),
                "1.1: held".to_string()
            ]
        );
    }

    /// A connection gone with a joined answer pending, its slab key taken
    /// by another: each gets its own answers.
    #[test]
    fn a_reused_key_does_not_mix_two_connections_answers() {
        let mut cluster = two_ready_shards();
        let (a, b) = (on("a", 0), on("b", 1));
        assert!(cluster.route(slot(1, 1), &[&a, &b], b"1\n", 0).is_empty());
        cluster.shards.iter_mut().for_each(Shard::seal_staged);
        assert!(cluster.route(slot(1, 2), &[&a, &b], b"2\n", 0).is_empty());
        answer(&mut cluster, 0, &[1]);
        answer(&mut cluster, 1, &[1]);
        assert_eq!(told(&mut cluster), [format!("1.1: not-online {a},{b}")]);
        answer(&mut cluster, 1, &[]);
        answer(&mut cluster, 0, &[1]);
        assert_eq!(told(&mut cluster), [format!("1.2: not-online {a}")]);
        assert!(cluster.joins.is_empty());
    }

    /// One shard down: its names come back to the caller, the others go.
    #[test]
    fn a_down_shards_names_are_returned_in_order() {
        let mut cluster = two_ready_shards();
        cluster.shards[1].state = State::Down { retry_at: 0 };
        let (a, b, c) = (on("a", 1), on("b", 0), on("c", 1));
        let unrouted = cluster.route(slot(1, 1), &[&a, &b, &c], b"x\n", 0);
        assert_eq!(unrouted, [a.as_str(), c.as_str()]);
        answer(&mut cluster, 0, &[]);
        assert!(told(&mut cluster).is_empty(), "b reached: nothing to say");
        assert!(!cluster.owes(slot(1, 1)));
    }

    /// A line whose every shard is down, from a connection waiting on
    /// another shard, leaves nothing to join: that shard's answer comes as
    /// it is.
    #[test]
    fn a_line_routed_nowhere_leaves_no_marker() {
        let mut cluster = two_ready_shards();
        let (slow, down) = (on("s", 1), on("d", 0));
        assert!(cluster.route(slot(1, 1), &[&slow], b"1\n", 0).is_empty());
        cluster.shards[0].state = State::Down { retry_at: 0 };
        let unrouted = cluster.route(slot(1, 1), &[&down], b"2\n", 0);
        assert_eq!(unrouted, [down.as_str()]);
        assert!(cluster.joins.is_empty());
        answer(&mut cluster, 1, &[1]);
        assert_eq!(told(&mut cluster), [format!("1.1: not-online {slow}")]);
        assert!(!cluster.owes(slot(1, 1)));
    }

    #[test]
    fn joined_names_keep_the_lines_order() {
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let some = vec!["d".to_string(), "b".to_string(), "a".to_string()];
        assert_eq!(in_order(&names, some), ["a", "b", "d"]);
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod model_tests;
