//! The broker: what a line means. Login, routing a message to its
//! recipients' outbound buffers, and the `error:` lines a line earns. It
//! owns no connection; it works on the connection table it is handed.

use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use super::clients::Clients;
use crate::cluster::Cluster;
use crate::conn::Phase;
use crate::deadlines::Deadlines;
use crate::protocol::{self, ErrorKind};

/// Routing state that lives across lines.
#[derive(Debug, Default)]
pub(super) struct Broker {
    /// The `from ...` line being routed, formatted once for all recipients.
    delivery: Vec<u8>,
    /// Sequence number of the message being routed (see `Conn::route_mark`).
    route_seq: u32,
}

impl Broker {
    /// Handles one line from a connection that is reading lines. In
    /// cluster mode, `cluster` claims names and routes to other nodes.
    pub fn handle_line(
        &mut self,
        clients: &mut Clients,
        deadlines: &mut Deadlines,
        mut cluster: Option<&mut Cluster>,
        key: usize,
        raw: &[u8],
    ) {
        let text = match protocol::decode(raw) {
            Ok(Some(text)) => text,
            Ok(None) => return, // blank lines are ignored
            Err(protocol::InvalidUtf8) => {
                let args = format_args!("");
                say(
                    clients,
                    deadlines,
                    &mut cluster,
                    key,
                    ErrorKind::InvalidUtf8,
                    args,
                );
                return;
            }
        };
        match clients.conn(key).phase() {
            Phase::Login => login(clients, deadlines, cluster, key, text),
            Phase::Chat => self.route(clients, deadlines, cluster, key, text),
            Phase::Claiming | Phase::Draining | Phase::Closing => {}
        }
    }

    /// Routes one message line: formats `from <sender>: <body>` once and
    /// appends it to every recipient named who is logged in here, once
    /// each. The others are `not-online`, or in cluster mode are routed
    /// through Redis, which answers which of them are online nowhere.
    fn route(
        &mut self,
        clients: &mut Clients,
        deadlines: &mut Deadlines,
        mut cluster: Option<&mut Cluster>,
        key: usize,
        text: &str,
    ) {
        clients.stats.messages_in += 1;
        let Ok(msg) = protocol::parse_message(text) else {
            let detail = protocol::NO_RECIPIENTS_DETAIL;
            let args = format_args!("{detail}");
            say(
                clients,
                deadlines,
                &mut cluster,
                key,
                ErrorKind::NoRecipients,
                args,
            );
            return;
        };
        let seq = self.next_route_seq(clients);
        let mut line = std::mem::take(&mut self.delivery);
        line.clear();
        protocol::write_delivery(&mut line, &clients.conn(key).name, msg.body);
        let mut elsewhere = NameList::new(protocol::not_online_budget(clients.limits.max_line));
        for name in protocol::recipients(msg.names) {
            let Some(to) = clients.lookup(name) else {
                elsewhere.add(name);
                continue;
            };
            let recipient = clients.conn(to);
            if recipient.route_mark == seq {
                continue; // named twice
            }
            recipient.route_mark = seq;
            match (recipient.phase(), cluster.as_deref_mut()) {
                (Phase::Chat, Some(link)) if to == key && link.has_waiting(clients.slot(key)) => {
                    // Its own copy keeps its place behind the answers its
                    // earlier lines wait for.
                    hold_behind(clients, link, deadlines, key, &line, true);
                }
                (Phase::Chat, _) => {
                    if clients.enqueue(to, &line, Some(key), deadlines) {
                        clients.stats.deliveries += 1;
                    }
                }
                // Claiming its name here: not online yet. Held until the
                // claim is answered, then delivered or routed on to whoever
                // holds the name; routed on now if it cannot be held.
                (Phase::Claiming, Some(_)) if clients.hold_for_claim(to, key, &line, deadlines) => {
                }
                _ => elsewhere.add(name),
            }
        }
        if !elsewhere.names.is_empty() {
            let unrouted = match cluster.as_deref_mut() {
                None => {
                    let args = format_args!("{elsewhere}");
                    clients.error(key, ErrorKind::NotOnline, args, deadlines);
                    Vec::new()
                }
                Some(link) => {
                    // Lines held for a claimant that lost its claim go
                    // first: they were sent before this one.
                    sync_cluster(clients, link, deadlines);
                    link.route(
                        clients.slot(key),
                        &elsewhere.names,
                        &line,
                        deadlines.now_ms(),
                    )
                }
            };
            if !unrouted.is_empty() {
                let mut names = NameList::new(elsewhere.budget);
                unrouted.iter().for_each(|name| names.add(name));
                let args = format_args!("{names}");
                say(
                    clients,
                    deadlines,
                    &mut cluster,
                    key,
                    ErrorKind::UnavailableTo,
                    args,
                );
            }
        }
        self.delivery = line;
    }

    /// The next message's sequence number. When the `u32` wraps, every mark
    /// is reset, so an old mark can never equal a new number and skip a
    /// recipient (a scan once per four billion messages).
    fn next_route_seq(&mut self, clients: &mut Clients) -> u32 {
        if self.route_seq == u32::MAX {
            clients.reset_route_marks();
            self.route_seq = 0;
        }
        self.route_seq += 1;
        self.route_seq
    }
}

/// Sends a non-closing `error:` line to `key`. In cluster mode, a line for
/// a connection with answers from Redis outstanding waits behind them, so
/// that its `error:` lines keep the order of the lines that caused them.
fn say(
    clients: &mut Clients,
    deadlines: &mut Deadlines,
    cluster: &mut Option<&mut Cluster>,
    key: usize,
    kind: ErrorKind,
    detail: fmt::Arguments<'_>,
) {
    if let Some(link) = cluster {
        if link.has_waiting(clients.slot(key)) {
            let line = clients.error_bytes(kind, detail);
            hold_behind(clients, link, deadlines, key, &line, false);
            return;
        }
    }
    clients.error(key, kind, detail, deadlines);
}

/// Holds `line` for `key` until the answers it waits for are in: the line
/// is kept with the connection's buffers (`held.rs`), the cluster FIFO
/// gets a marker that releases it in order.
fn hold_behind(
    clients: &mut Clients,
    link: &mut Cluster,
    deadlines: &mut Deadlines,
    key: usize,
    line: &[u8],
    delivery: bool,
) {
    if clients.hold_behind(key, line, delivery, deadlines) {
        link.hold_marker(clients.slot(key));
    }
}

/// Handles the first non-blank line: a valid, free name logs the
/// connection in (no reply, as in the tutorial server); anything else
/// closes it with `invalid-name` or `name-taken`. In cluster mode the name
/// is reserved here and claimed in Redis; the connection waits in
/// `Phase::Claiming`, its further input kept, until the answer.
fn login(
    clients: &mut Clients,
    deadlines: &mut Deadlines,
    cluster: Option<&mut Cluster>,
    key: usize,
    text: &str,
) {
    let name = match protocol::parse_name(text) {
        Ok(name) => name,
        Err(why) => {
            clients.error(
                key,
                ErrorKind::InvalidName,
                format_args!("{why}"),
                deadlines,
            );
            return;
        }
    };
    let taken_here = match cluster {
        None => !clients.log_in(key, name, deadlines),
        Some(link) => {
            let reserved = clients.reserve(key, name);
            if reserved {
                // Releases first: a name freed here a moment ago must be
                // freed in Redis before it is claimed again.
                sync_cluster(clients, link, deadlines);
                link.claim(clients.slot(key), Rc::from(name), false, deadlines.now_ms());
            }
            !reserved
        }
    };
    if taken_here {
        clients.error(key, ErrorKind::NameTaken, format_args!("{name}"), deadlines);
    }
}

/// Hands the cluster what the clients left for it, in the order Redis
/// must see it before anything new: the names released here since the
/// last call, then the lines held for claimants that will not hold their
/// name, routed on to whoever does (their senders hear `unavailable` if
/// Redis cannot be asked). Called before every claim and route, and at the
/// end of each turn.
pub(super) fn sync_cluster(
    clients: &mut Clients,
    cluster: &mut Cluster,
    deadlines: &mut Deadlines,
) {
    if let Some(released) = &mut clients.released {
        for name in released.drain(..) {
            cluster.release(&name);
        }
    }
    if clients.held.to_route.is_empty() {
        return;
    }
    let now = deadlines.now_ms();
    for (from, name, line) in std::mem::take(&mut clients.held.to_route) {
        if cluster.route(from, &[&name], &line, now).is_empty() {
            continue;
        }
        if let Some(sender) = clients.find(from) {
            let args = format_args!("{name}");
            let mut link = Some(&mut *cluster);
            say(
                clients,
                deadlines,
                &mut link,
                sender,
                ErrorKind::UnavailableTo,
                args,
            );
        }
    }
}

/// Recipients of one message not logged in here, each once, in the order
/// given: `not-online` on one node, routed through Redis in a cluster.
pub(super) struct NameList<'a> {
    /// The names, in order.
    names: Vec<&'a str>,
    /// Bytes of names the error line lists at the most; the others are
    /// counted (see `protocol::not_online_budget`).
    budget: usize,
    /// The same names for O(1) lookups once the list is long, so a line
    /// naming thousands of strangers costs linear time, not quadratic.
    seen: HashSet<&'a str>,
}

impl<'a> NameList<'a> {
    const LINEAR_MAX: usize = 8;

    pub fn new(budget: usize) -> NameList<'a> {
        NameList {
            names: Vec::new(),
            budget,
            seen: HashSet::new(),
        }
    }

    pub fn add(&mut self, name: &'a str) {
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

impl fmt::Display for NameList<'_> {
    /// `a, b, c`, or `a, b: and 7 more` past the budget. A recipient name
    /// never holds a `:` (a message line splits at its first one), so the
    /// count cannot be read as a name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut used = 0;
        for (i, name) in self.names.iter().enumerate() {
            let separator = if i > 0 { ", " } else { "" };
            used += separator.len() + name.len();
            if used > self.budget && i > 0 {
                return write!(f, ": and {} more", self.names.len() - i);
            }
            f.write_str(separator)?;
            f.write_str(name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(budget: usize, names: &[&'static str]) -> String {
        let mut offline = NameList::new(budget);
        for name in names {
            offline.add(name);
        }
        offline.to_string()
    }

    #[test]
    fn offline_names_each_once_in_order_within_the_budget() {
        assert_eq!(listed(100, &["a", "b", "a", "c"]), "a, b, c");
        let many: Vec<&'static str> = (0..20)
            .map(|i| &*format!("n{i:02}").leak())
            .chain(["n00", "n01"])
            .collect();
        // Each name costs 3 bytes, 5 with its separator: 3 + 5 + 5 = 13.
        assert_eq!(listed(13, &many), "n00, n01, n02: and 17 more");
        assert_eq!(listed(12, &many), "n00, n01: and 18 more");
        assert_eq!(listed(1, &many), "n00: and 19 more", "the first always");
        assert_eq!(listed(1000, &many).matches(", ").count(), 19);
    }
}
