//! The broker: what a line means. Login, routing a message to its
//! recipients' outbound buffers, and the `error:` lines a line earns. It
//! owns no connection; it works on the connection table it is handed.

use std::collections::HashSet;
use std::fmt;
use std::rc::Rc;

use super::clients::Clients;
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
    /// Handles one line from a connection that is reading lines.
    pub fn handle_line(
        &mut self,
        clients: &mut Clients,
        deadlines: &mut Deadlines,
        key: usize,
        raw: &[u8],
    ) {
        let text = match protocol::decode(raw) {
            Ok(Some(text)) => text,
            Ok(None) => return, // blank lines are ignored
            Err(protocol::InvalidUtf8) => {
                clients.error(key, ErrorKind::InvalidUtf8, format_args!(""), deadlines);
                return;
            }
        };
        match clients.conn(key).phase() {
            Phase::Login => login(clients, deadlines, key, text),
            Phase::Chat => self.route(clients, deadlines, key, text),
            Phase::Draining | Phase::Closing => {}
        }
    }

    /// Routes one message line: formats `from <sender>: <body>` once and
    /// appends it to every online recipient named, once each.
    fn route(&mut self, clients: &mut Clients, deadlines: &mut Deadlines, key: usize, text: &str) {
        clients.stats.messages_in += 1;
        let Ok(msg) = protocol::parse_message(text) else {
            let detail = protocol::NO_RECIPIENTS_DETAIL;
            clients.error(
                key,
                ErrorKind::NoRecipients,
                format_args!("{detail}"),
                deadlines,
            );
            return;
        };
        let seq = self.next_route_seq(clients);
        let mut line = std::mem::take(&mut self.delivery);
        line.clear();
        protocol::write_delivery(&mut line, &clients.conn(key).name, msg.body);
        let mut offline = Offline::new(protocol::not_online_budget(clients.limits.max_line));
        for name in protocol::recipients(msg.names) {
            let Some(to) = clients.lookup(name) else {
                offline.add(name);
                continue;
            };
            let recipient = clients.conn(to);
            if recipient.route_mark == seq {
                continue; // named twice
            }
            recipient.route_mark = seq;
            if clients.enqueue(to, &line, Some(key), deadlines) {
                clients.stats.deliveries += 1;
            }
        }
        self.delivery = line;
        if !offline.names.is_empty() {
            clients.error(
                key,
                ErrorKind::NotOnline,
                format_args!("{offline}"),
                deadlines,
            );
        }
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

/// Handles the first non-blank line: a valid, free name logs the
/// connection in (no reply, as in the tutorial server); anything else
/// closes it with `invalid-name` or `name-taken`.
fn login(clients: &mut Clients, deadlines: &mut Deadlines, key: usize, text: &str) {
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
    let name: Rc<str> = Rc::from(name);
    if !clients.log_in(key, Rc::clone(&name), deadlines) {
        clients.error(key, ErrorKind::NameTaken, format_args!("{name}"), deadlines);
    }
}

/// Offline recipients of one message, each once, in the order given.
struct Offline<'a> {
    /// The names, in order.
    names: Vec<&'a str>,
    /// Bytes of names the error line lists at the most; the others are
    /// counted (see `protocol::not_online_budget`).
    budget: usize,
    /// The same names for O(1) lookups once the list is long, so a line
    /// naming thousands of strangers costs linear time, not quadratic.
    seen: HashSet<&'a str>,
}

impl<'a> Offline<'a> {
    const LINEAR_MAX: usize = 8;

    fn new(budget: usize) -> Offline<'a> {
        Offline {
            names: Vec::new(),
            budget,
            seen: HashSet::new(),
        }
    }

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
    /// `a, b, c`, or `a, b (and 7 more)` past the budget.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut used = 0;
        for (i, name) in self.names.iter().enumerate() {
            let separator = if i > 0 { ", " } else { "" };
            used += separator.len() + name.len();
            if used > self.budget && i > 0 {
                return write!(f, " (and {} more)", self.names.len() - i);
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
        let mut offline = Offline::new(budget);
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
        assert_eq!(listed(13, &many), "n00, n01, n02 (and 17 more)");
        assert_eq!(listed(12, &many), "n00, n01 (and 18 more)");
        assert_eq!(listed(1, &many), "n00 (and 19 more)", "the first always");
        assert_eq!(listed(1000, &many).matches(", ").count(), 19);
    }
}
