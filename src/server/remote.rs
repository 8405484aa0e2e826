//! Lines from the cluster link to the clients: what the reactor does
//! with what the link to Redis learned (claims answered, routes answered,
//! deliveries from other nodes, lines held back, names to settle), and the
//! fencing that closes every logged-in client when the lease cannot be
//! trusted. Only in cluster mode; `crate::cluster` is the link itself.

use std::rc::Rc;

use super::clients::Clients;
use super::{Life, Server, broker};
use crate::cluster::{Answer, Claimed};
use crate::conn::Phase;
use crate::deadlines::{Deadline, Deadlines};
use crate::protocol::ErrorKind;

impl Server {
    /// Sets the cluster link's deadline when it wants to be woken earlier
    /// than the one already set.
    /// While a live upgrade hands the clients over, only the lease's end
    /// matters (the link itself waits, see `Life::Upgrading`).
    pub(super) fn schedule_cluster(&mut self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let at = if self.touches_clients() {
            cluster.next_deadline()
        } else {
            cluster.fence_at().unwrap_or(u64::MAX)
        };
        if at == u64::MAX {
            return;
        }
        if at < self.cluster_tick_at {
            self.cluster_tick_at = at;
            let now = self.deadlines.now_ms();
            self.deadlines
                .set(at.saturating_sub(now), Deadline::Cluster);
        }
    }

    /// Closes every client that holds or claims a name with
    /// `error: unavailable` when the lease can no longer be trusted: with
    /// several shards, only those whose names live on a shard that fenced.
    pub(super) fn fence_if_needed(&mut self) {
        let now = self.deadlines.now_ms();
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let fenced = cluster.fence(now);
        if fenced == 0 {
            return;
        }
        for key in self.clients.holders() {
            let shard = cluster.shard_of(&self.clients.conn(key).name);
            if fenced & 1 << shard == 0 {
                continue;
            }
            let args = format_args!("");
            self.clients
                .error(key, ErrorKind::Unavailable, args, &mut self.deadlines);
        }
    }

    /// Applies what the cluster link learned, in order.
    pub(super) fn apply_cluster_answers(&mut self) {
        let mut touched = Vec::new();
        loop {
            let answers = match &mut self.cluster {
                Some(cluster) if cluster.has_answers() => cluster.take_answers(),
                _ => break,
            };
            for answer in answers {
                if let Some(key) = answer.slot().and_then(|slot| self.clients.find(slot)) {
                    touched.push(key);
                }
                self.apply_answer(answer);
            }
        }
        // Once the whole batch is applied: a half-closed client may have
        // waited only for these answers.
        for key in touched {
            if self.clients.get(key).is_some() {
                self.close_if_drained(key);
            }
        }
    }

    fn apply_answer(&mut self, answer: Answer) {
        let clients = &mut self.clients;
        let deadlines = &mut self.deadlines;
        match answer {
            Answer::Claimed {
                slot,
                name,
                again,
                outcome,
            } => {
                let Some(key) = clients.find(slot) else {
                    return; // gone: its leaving already queued a release
                };
                let claiming = clients.conn(key).phase() == Phase::Claiming;
                // A claim again is for a client logged in here: it loses
                // the name if another node took it, and is closed if its
                // claim cannot be confirmed (it could not be unique).
                let holder = again && clients.conn(key).phase() == Phase::Chat;
                match (again, outcome) {
                    (false, Claimed::Held) if claiming => {
                        clients.finish_login(key, deadlines);
                        self.resume_input(key);
                    }
                    (_, Claimed::Taken) if claiming || holder => {
                        let args = format_args!("{name}");
                        clients.error(key, ErrorKind::NameTaken, args, deadlines);
                    }
                    (_, Claimed::Unavailable) if claiming || holder => {
                        clients.error(key, ErrorKind::Unavailable, format_args!(""), deadlines);
                    }
                    _ => {}
                }
                // Lines held for a claimant that lost its claim go on now,
                // before the answers after this one are applied.
                if let Some(cluster) = &mut self.cluster {
                    broker::sync_cluster(&mut self.clients, cluster, &mut self.deadlines);
                }
            }
            Answer::Routed {
                slot,
                offline,
                unreachable,
                ..
            } => {
                report(clients, deadlines, slot, ErrorKind::NotOnline, &offline);
                report(
                    clients,
                    deadlines,
                    slot,
                    ErrorKind::UnavailableTo,
                    &unreachable,
                );
            }
            Answer::Unroutable { slot, names, .. } => {
                report(clients, deadlines, slot, ErrorKind::UnavailableTo, &names);
            }
            Answer::Held { slot } => clients.release_behind(slot, deadlines),
            Answer::Deliver { payload } => {
                let Some(cluster) = &mut self.cluster else {
                    return;
                };
                for (names, line) in crate::cluster::records(&payload) {
                    let names = std::str::from_utf8(names).unwrap_or_default();
                    for name in names.split(',') {
                        let to = clients
                            .lookup(name)
                            .filter(|&to| clients.conn(to).phase() == Phase::Chat);
                        match to {
                            Some(to) if clients.enqueue(to, line, None, deadlines) => {
                                clients.stats.deliveries += 1;
                                cluster.stats.deliveries_in += 1;
                            }
                            Some(_) => {}
                            None => cluster.stats.deliveries_missed += 1,
                        }
                    }
                }
            }
            Answer::ClaimAgain { shard } => {
                let Some(cluster) = &mut self.cluster else {
                    return;
                };
                let now = deadlines.now_ms();
                for (name, key) in clients.logged_in_names() {
                    if cluster.shard_of(&name) == shard {
                        cluster.claim(clients.slot(key), name, true, now);
                    }
                }
            }
            Answer::Reconcile(names) => {
                let Some(cluster) = &mut self.cluster else {
                    return;
                };
                let now = deadlines.now_ms();
                for name in names {
                    let held = clients
                        .lookup(&name)
                        .filter(|&key| clients.conn(key).phase() == Phase::Chat);
                    match held {
                        Some(key) => cluster.claim(clients.slot(key), Rc::from(name), true, now),
                        None => cluster.release(&name),
                    }
                }
            }
            Answer::Unthrottle { slot } => {
                if let Some(key) = clients.find(slot) {
                    if clients.conn(key).reads_lines() {
                        self.resume_input(key);
                    }
                }
            }
            Answer::Settled { .. } => {} // see apply_cluster_answers
            Answer::FarewellDone => {
                if let Life::ShuttingDown { farewell_done, .. } = &mut self.life {
                    *farewell_done = true;
                }
            }
        }
    }
}

/// Sends `error: <kind>: <names>` (bounded like `not-online`) to the
/// connection `slot`, if there are names and it is still there.
fn report(
    clients: &mut Clients,
    deadlines: &mut Deadlines,
    slot: crate::conn::Slot,
    kind: ErrorKind,
    names: &[String],
) {
    let Some(key) = clients.find(slot).filter(|_| !names.is_empty()) else {
        return;
    };
    let budget = crate::protocol::not_online_budget(clients.limits.max_line);
    let mut list = broker::NameList::new(budget);
    names.iter().for_each(|name| list.add(name));
    let line = clients.error_bytes(kind, format_args!("{list}"));
    clients.send_line(key, &line, deadlines);
}
