//! What each answer from Redis does: the FIFO's head is popped for every
//! reply, and the entry says what the reply means (a claim held or taken,
//! a route's offline and unreachable names, a lease renewed or lost); the
//! results become `Answer`s for the reactor. Lost leases and outages end
//! here too: a new lease, and the names to claim again or settle.

use log::{info, warn};

use super::batch::{Entry, Sent};
use super::codec::Reply;
use super::scripts::Script;
use super::{Answer, Claimed, FIRST_BACKOFF_MS, Pending, Shard, State};
use crate::conn::Slot;

/// A connection that waits for no more answers: its input was held back
/// (the connection held back: the one now on that slab key, which may
/// not be the one the entry was for), or not.
enum Waited {
    Unthrottled(Slot),
    Done,
}

impl Shard {
    /// Handles one frame: a push, or the answer to the oldest command.
    pub(super) fn on_reply(&mut self, reply: Reply, now_ms: u64) -> Result<(), String> {
        // Anything from Redis, a push too, says it is alive and the link
        // works: under a flood of lines to this node the answers wait
        // behind the pushes, read as fast as the node can.
        self.last_reply_ms = now_ms;
        match reply {
            Reply::Message { channel, payload } => {
                if channel == self.lines_channel {
                    self.answers.push(Answer::Deliver { payload });
                } else if channel == self.channel {
                    self.on_message(&payload);
                } else if channel == self.lost_channel {
                    self.check_lease(now_ms);
                }
                return Ok(());
            }
            Reply::OtherPush => return Ok(()),
            Reply::Unsubscribed => {
                self.unsubscribed = true;
                return Ok(());
            }
            _ => {}
        }
        let Some(entry) = self.pending.pop_front() else {
            return Err("a reply nobody asked for".into());
        };
        if self.pending.is_empty() && self.pending.capacity() > 4096 {
            self.pending.shrink_to_fit(); // a wave's room, given back
        }
        match entry {
            Pending::Claim { group, .. } => self.on_group(entry, group as usize, reply, now_ms),
            Pending::Release { group, .. } => self.on_group(entry, group as usize, reply, now_ms),
            _ => self.on_entry(entry, reply, now_ms),
        }
    }

    /// The answer to a turn's claims (one number per claim) or releases
    /// (one for all), applied to each entry in order: `first` and the
    /// `group - 1` after it.
    fn on_group(
        &mut self,
        first: Pending,
        group: usize,
        reply: Reply,
        now_ms: u64,
    ) -> Result<(), String> {
        let claims = matches!(first, Pending::Claim { .. });
        let replies = match reply {
            Reply::Array(replies) if claims && replies.len() == group && group > 0 => replies,
            Reply::Error(e) if group > 0 => vec![Reply::Error(e); group],
            Reply::Int(1) if !claims && group > 0 => vec![Reply::Int(1); group],
            _ => {
                self.fail(first, true);
                return Err("unexpected reply to claims or releases".into());
            }
        };
        let mut result = Ok(());
        let mut next = Some(first);
        for reply in replies {
            let Some(entry) = next.take().or_else(|| self.pending.pop_front()) else {
                return Err("a claim's answer with no claim".into());
            };
            let answered = self.on_entry(entry, reply, now_ms);
            result = result.and(answered);
        }
        result
    }

    /// Applies the answer to one entry.
    fn on_entry(&mut self, entry: Pending, reply: Reply, now_ms: u64) -> Result<(), String> {
        let claim = match &entry {
            Pending::Claim { sent_ms, .. } => Some(*sent_ms),
            _ => None,
        };
        let release = matches!(entry, Pending::Release { .. });
        // The entry's own answer goes first: a client whose input it lets
        // be read again must see its earlier lines' results before those of
        // the lines read then.
        let unthrottled = self.unwait(&entry);
        let result = self.on_answer(entry, reply, now_ms);
        self.unthrottle(unthrottled);
        self.pop_held();
        if let Some(sent_ms) = claim {
            self.claims_in_flight -= 1;
            if result.is_ok() {
                self.fit_claim_window(sent_ms, now_ms);
                self.admit_claims(now_ms);
            }
        }
        if release {
            self.releases_in_flight -= 1;
            if result.is_ok() {
                self.admit_releases();
            }
        }
        result
    }

    /// Counts an entry out of `waiting`. Returns what to say once the
    /// entry's own answer is out ([`Shard::unthrottle`]): the connections
    /// whose input may be read again now that they wait for nothing, and
    /// (for a batch, which answers only the lines that need it) the
    /// senders that wait for nothing more.
    pub(super) fn unwait(&mut self, entry: &Pending) -> Vec<Answer> {
        let mut after = Vec::new();
        if let Pending::Batch { sent, .. } = entry {
            self.inflight_names -= sent.occurrences.len();
            for &(slot, _, _) in &sent.lines {
                match self.unwait_one(slot) {
                    Some(Waited::Unthrottled(held)) => {
                        after.push(Answer::Unthrottle { slot: held })
                    }
                    Some(Waited::Done) => after.push(Answer::Settled { slot }),
                    None => {}
                }
            }
        } else if let Some(slot) = entry.slot() {
            if let Some(Waited::Unthrottled(held)) = self.unwait_one(slot) {
                after.push(Answer::Unthrottle { slot: held });
            }
        }
        after
    }

    fn unwait_one(&mut self, slot: Slot) -> Option<Waited> {
        let n = self.waiting.get_mut(&slot.key)?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        self.waiting.remove(&slot.key);
        if self.waiting.is_empty() && self.waiting.capacity() > 4096 {
            // What a wave made it grow to, given back.
            self.waiting = Default::default();
        }
        Some(match self.throttled.remove(&slot.key) {
            Some(held) => Waited::Unthrottled(held),
            None => Waited::Done,
        })
    }

    /// Says what [`Shard::unwait`] found.
    pub(super) fn unthrottle(&mut self, after: Vec<Answer>) {
        self.answers.extend(after);
    }

    /// Releases the held lines whose markers have reached the head.
    pub(super) fn pop_held(&mut self) {
        while matches!(self.pending.front(), Some(Pending::Held { .. })) {
            if let Some(entry) = self.pending.pop_front() {
                let unthrottled = self.unwait(&entry);
                if let Pending::Held { slot } = entry {
                    self.answers.push(Answer::Held { slot });
                }
                self.unthrottle(unthrottled);
            }
        }
    }

    pub(super) fn on_answer(
        &mut self,
        entry: Pending,
        reply: Reply,
        now_ms: u64,
    ) -> Result<(), String> {
        if let Reply::Error(e) = &reply {
            // A script cache flushed under us (NOSCRIPT), a read-only or
            // busy Redis: the entry fails like any other in flight, and
            // the link starts over rather than guess what Redis did.
            if matches!(entry, Pending::Policy) {
                return Ok(()); // CONFIG may be disabled
            }
            if let Pending::KillStale(id) = entry {
                // An ACL without CLIENT KILL: nothing to do but say so.
                self.stale_links.retain(|&s| s != id);
                if !std::mem::replace(&mut self.kill_refused, true) {
                    warn!(
                        "cluster: Redis at {} refused CLIENT KILL ({e}): commands of a dropped connection may still run after its reconnection",
                        self.config.redis
                    );
                }
                return Ok(());
            }
            if matches!(entry, Pending::Hello) && super::is_auth_error(e) {
                return Err(self.refused_credentials(e));
            }
            self.fail(entry, false);
            return Err(format!("Redis refused a command: {e}"));
        }
        match entry {
            Pending::Hello => self.link_id = hello_id(&reply),
            Pending::KillStale(id) => self.stale_links.retain(|&s| s != id),
            Pending::Plain | Pending::Release { .. } => {}
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
            Pending::Layout => match reply {
                Reply::Int(1) => self.layout_refused = false,
                Reply::Bulk(other) => {
                    return Err(self.refused_layout(&String::from_utf8_lossy(&other)));
                }
                _ => return Err("unexpected layout reply".into()),
            },
            Pending::Load(script) => match reply {
                Reply::Bulk(sha) => self.shas[script as usize] = sha,
                Reply::Status(sha) => self.shas[script as usize] = sha.into_bytes(),
                _ => return Err("unexpected SCRIPT LOAD reply".into()),
            },
            Pending::Renew { sent_ms } => {
                if self.leaving {
                    // Shutting down: the farewell drops the lease.
                } else if reply == Reply::Nil {
                    // The lease is gone: Redis lost its data, or it expired.
                    self.take_new_lease(now_ms);
                } else {
                    self.lease_renewed(sent_ms, now_ms);
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
                self.answers.push(Answer::ClaimAgain {
                    shard: self.config.index,
                });
            }
            Pending::Claim {
                slot,
                name,
                again: false,
                retried: false,
                ..
            } if reply == Reply::Int(0) => {
                // Maybe a client moving here from another node: its old
                // node may release the name a moment later.
                self.retry_claim(slot, name, now_ms);
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
            Pending::Batch { sent, .. } if reply == Reply::Int(-1) => {
                // This node's lease is gone from Redis (it lost its data):
                // nothing routed as its clients until the lease is back.
                self.unroutable(&sent);
                self.take_new_lease(now_ms);
            }
            Pending::Batch { sent, .. } => self.on_sent(&sent, reply)?,
            Pending::Held { .. } => {} // handled by pop_held
            Pending::Farewell => self.answers.push(Answer::FarewellDone),
        }
        Ok(())
    }

    /// Another node found its lease gone (Redis restarted empty, or was
    /// flushed): this one's may be gone too, and its names with it, which
    /// would make its clients look offline. It renews now instead of at its
    /// next renewal; a renewal that finds no lease takes a new one.
    pub(super) fn check_lease(&mut self, now_ms: u64) {
        let renewing = self
            .pending
            .iter()
            .any(|p| matches!(p, Pending::Renew { .. }));
        if self.state == State::Ready && !self.leaving && !renewing {
            self.send_renew(now_ms);
        }
    }

    /// `entry` will get no answer (the link broke, or Redis refused it):
    /// what waits on it learns so, in the same form whatever the cause.
    /// A claim or release that `may_have_run` (it was sent, the link broke)
    /// leaves its name uncertain, settled once the link is back.
    pub(super) fn fail(&mut self, entry: Pending, may_have_run: bool) {
        match entry {
            Pending::Claim {
                slot, name, again, ..
            } => {
                if may_have_run {
                    self.uncertain_name(&name);
                }
                self.claim_unavailable(slot, name, again);
            }
            Pending::Release { name, .. } => self.uncertain_name(&name),
            Pending::Batch { sent, .. } => self.unroutable(&sent),
            Pending::Held { slot } => self.answers.push(Answer::Held { slot }),
            Pending::Farewell => self.answers.push(Answer::FarewellDone),
            Pending::Hello
            | Pending::KillStale(_)
            | Pending::Load(_)
            | Pending::Renew { .. }
            | Pending::Acquire { .. }
            | Pending::Plain
            | Pending::Policy
            | Pending::Layout => {}
        }
    }

    /// A batch was answered (`scripts::SEND`): each line's offline and
    /// unreachable names, in the line's order, for its sender; where the
    /// names looked up were found, for the cache.
    fn on_sent(&mut self, sent: &Sent, reply: Reply) -> Result<(), String> {
        const OFFLINE: u8 = 1;
        const UNREACHABLE: u8 = 2;
        let Reply::Array(lists) = reply else {
            // Its lines are not left without an answer.
            self.unroutable(sent);
            return Err("unexpected send reply".into());
        };
        let mut lists = lists.into_iter();
        let mut status = vec![0u8; sent.names.len()];
        let index = |n: &Reply| match n {
            Reply::Int(i) if *i >= 1 && (*i as usize) <= sent.names.len() => Some(*i as usize - 1),
            _ => None,
        };
        let mut marked = false;
        for mark in [OFFLINE, UNREACHABLE] {
            if let Some(Reply::Array(numbers)) = lists.next() {
                for i in numbers.iter().filter_map(index) {
                    status[i] = mark;
                    marked = true;
                }
            }
        }
        let found = match lists.next() {
            Some(Reply::Array(found)) => found,
            _ => Vec::new(),
        };
        if !found.is_empty() || status.contains(&OFFLINE) {
            // The lines staged so far were grouped by what the cache says
            // now: they go as they are, so that no name is in two groups of
            // one batch (the script publishes a group that passes its
            // check before one that is looked up: one sender's later line
            // to a name would overtake the earlier).
            self.seal_batch();
        }
        for entry in found.chunks_exact(3) {
            let (Some(i), Reply::Bulk(node), Reply::Bulk(epoch)) =
                (index(&entry[0]), &entry[1], &entry[2])
            else {
                continue;
            };
            // A node of an earlier version has no epoch: not cached.
            if let Some(epoch) = std::str::from_utf8(epoch).ok().and_then(|e| e.parse().ok()) {
                self.holders.learn(sent.names.get(i), node, epoch);
            }
        }
        if !marked && sent.joined.is_empty() && sent.markers.is_empty() {
            return Ok(()); // every line reached everyone: nobody is told
        }
        for (i, name) in sent.names.iter().enumerate() {
            if status[i] == OFFLINE {
                self.holders.forget(name);
            }
        }
        for (i, slot, entry) in sent.entries() {
            let Entry::Line { joined } = entry else {
                self.answers.push(Answer::Held { slot });
                continue;
            };
            let (_, from, to) = sent.lines[i];
            let marked = |mark: u8| -> Vec<String> {
                sent.occurrences[from as usize..to as usize]
                    .iter()
                    .filter(|&&n| status[n as usize] == mark)
                    .map(|&n| sent.names.get(n as usize).to_string())
                    .collect()
            };
            let (offline, unreachable) = (marked(OFFLINE), marked(UNREACHABLE));
            if offline.is_empty() && unreachable.is_empty() && !joined {
                continue; // this sender hears nothing (see Answer::Settled)
            }
            self.answers.push(Answer::Routed {
                slot,
                offline,
                unreachable,
                joined,
            });
        }
        Ok(())
    }

    /// Every line of a batch could not be routed: its names `unavailable`
    /// (and its markers are released, in their places).
    pub(super) fn unroutable(&mut self, sent: &Sent) {
        for (i, slot, entry) in sent.entries() {
            let Entry::Line { joined } = entry else {
                self.answers.push(Answer::Held { slot });
                continue;
            };
            let names = sent.line_names(i).map(str::to_string).collect();
            self.answers.push(Answer::Unroutable {
                slot,
                names,
                joined,
            });
        }
    }

    /// The lease was not found: take a new one, drop whatever names Redis
    /// still lists for this node, have the reactor claim again the names
    /// its clients still hold, and tell the other nodes to check theirs.
    /// Once: with several commands in flight when the lease went (two
    /// batches, a batch and a renewal), each finds it gone, and a second
    /// `SET NX` would find the first one's lease and reset the link.
    pub(super) fn take_new_lease(&mut self, now_ms: u64) {
        if self
            .pending
            .iter()
            .any(|p| matches!(p, Pending::Acquire { .. }))
        {
            return; // being taken already
        }
        if self.lease_until.is_some() {
            warn!("cluster: the lease is gone from Redis (restarted or flushed): taking a new one");
            self.stats.leases_lost += 1;
        }
        let lost = self.lost_channel.clone();
        let node = self.node.clone();
        self.command(&[b"PUBLISH", &lost, node.as_bytes()], Pending::Plain);
        self.node_script(Script::DropNames, &[], Pending::Plain);
        self.set_epoch(true);
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
    pub(super) fn reconcile(&mut self) {
        if self.uncertain_overflow {
            self.uncertain_overflow = false;
            self.uncertain.clear();
            self.node_script(Script::DropNames, &[], Pending::Plain);
            self.answers.push(Answer::ClaimAgain {
                shard: self.config.index,
            });
        } else if !self.uncertain.is_empty() {
            let names = self.uncertain.drain().collect();
            self.answers.push(Answer::Reconcile(names));
        }
    }

    /// Redis refused the credentials (a wrong password, a user disabled
    /// or changed): said once until the node gets in, and tried again only
    /// at the longest back-off, as nothing here will fix it soon.
    fn refused_credentials(&mut self, error: &str) -> String {
        if !self.auth_refused {
            let user = self
                .config
                .auth
                .as_ref()
                .map_or("default", |a| a.user.as_str());
            warn!(
                "cluster: Redis at {} refused the credentials for user {user:?} ({error}); \
                 logins get `error: unavailable` until it accepts them (retrying every {} s)",
                self.config.redis,
                super::MAX_BACKOFF_MS / 1000
            );
        }
        self.auth_refused = true;
        self.wait_for_the_operator();
        format!("Redis refused the credentials ({error})")
    }

    /// What only the operator can mend (credentials, the list of Redis):
    /// said once already, tried again at the longest back-off only.
    fn wait_for_the_operator(&mut self) {
        self.down_logged = true;
        self.backoff_ms = super::MAX_BACKOFF_MS;
    }

    /// Other nodes list this Redis in another place of `--cluster`: the
    /// node does not serve its names (two lists would hold one name twice),
    /// says so once, and tries again at the longest back-off.
    fn refused_layout(&mut self, other: &str) -> String {
        if !self.layout_refused {
            warn!(
                "cluster: other nodes list Redis at {} as shard {other:?}, this node as {:?}: \
                 every node must list the same Redis in the same order (--cluster); its \
                 names get `error: unavailable` here until the lists agree (retrying every {} s)",
                self.config.redis,
                self.config.layout,
                super::MAX_BACKOFF_MS / 1000
            );
        }
        self.layout_refused = true;
        self.wait_for_the_operator();
        format!("the nodes' --cluster lists differ ({other:?} here before)")
    }

    pub(super) fn become_ready(&mut self) {
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
            if self.hold_until.is_some() {
                self.release_holds();
            }
            self.down_logged = false;
            self.auth_refused = false;
            self.backoff_ms = FIRST_BACKOFF_MS;
        }
    }
}

/// The connection's id in the answer to `HELLO 3` (a map, flattened).
fn hello_id(reply: &Reply) -> Option<i64> {
    let Reply::Array(fields) = reply else {
        return None;
    };
    fields.chunks(2).find_map(|pair| match pair {
        [Reply::Bulk(key), Reply::Int(id)] if key == b"id" => Some(*id),
        _ => None,
    })
}
