//! Cluster flow control, the server's side: every line the node holds for
//! a client because of Redis, in one place and in the one buffer account.
//!
//! Two kinds of line wait here, by the connection they are for:
//!
//! - **Behind its answers.** A client with answers from Redis outstanding
//!   (a claim, a route) must see its later lines' results after them: its
//!   own copy of a message it sent, and its non-closing `error:` lines.
//!   Such a line is held here and the cluster FIFO gets a marker for it
//!   (`Cluster::hold_marker`); when the marker reaches the FIFO's head, the
//!   reactor sends the oldest held line of that connection.
//! - **For a claimant.** A connection whose name is being claimed is not
//!   online yet. A message to that name is held here with its sender until
//!   the claim is answered: delivered if the claim holds, or else routed
//!   through Redis to whoever holds the name (another node, or nobody:
//!   then its sender hears `not-online`). Never dropped, and counted as a
//!   delivery only once delivered.
//!
//! Everything held counts against the connection's `--max-outbound` (with
//! its queued output) and against `--max-buffer-memory`; a connection over
//! either is closed as a slow consumer, as for queued output. What a
//! claimant held for others is then routed, not dropped.
//!
//! `broker.rs` decides what to hold and `remote.rs` releases it as answers
//! come; the connection table calls in here as a connection's life moves
//! on (a claim ends, it is evicted or reaped), and a live upgrade hands
//! over what is held behind answers (`held_for_handover`).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use super::clients::Clients;
use crate::conn::Slot;
use crate::deadlines::Deadlines;

/// What is held for one connection.
#[derive(Debug, Default)]
struct HeldFor {
    /// The connection's id (slab keys are reused).
    id: u32,
    /// Lines behind its answers, oldest first, with whether each is a
    /// delivery (counted once sent) or an `error:` line.
    behind: VecDeque<(bool, Vec<u8>)>,
    /// Deliveries to it while it claims its name: sender and line.
    for_claim: Vec<(Slot, Vec<u8>)>,
    /// Bytes of lines held, both kinds.
    bytes: usize,
}

/// Every line held for a connection, by slab key.
#[derive(Debug, Default)]
pub(super) struct Held {
    by_key: HashMap<u32, HeldFor>,
    /// Deliveries held for a claimant that lost its claim (or closed),
    /// to route through Redis to the name: sender, name, line. Drained by
    /// `broker::sync_cluster` before any other route is sent, so that they
    /// keep their place before later lines to the same name.
    pub(super) to_route: Vec<(Slot, Rc<str>, Vec<u8>)>,
}

impl Held {
    /// Bytes held for the connection `key`.
    pub fn bytes(&self, key: usize) -> usize {
        if self.by_key.is_empty() {
            return 0; // the common case, and the hot path's: no lookup
        }
        self.by_key.get(&(key as u32)).map_or(0, |held| held.bytes)
    }

    /// Whether nothing is held for anyone.
    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

impl Clients {
    /// Bytes held for `key` here, queued output and held lines together:
    /// what `--max-outbound` bounds.
    pub fn outbound(&mut self, key: usize) -> usize {
        self.conn(key).pending_out() + self.held.bytes(key)
    }

    /// The entry for `key`, made (or made anew, for a connection that
    /// reuses a key) on first use.
    fn held_for(&mut self, key: usize) -> &mut HeldFor {
        let id = self.conns[key].id;
        let held = self.held.by_key.entry(key as u32).or_default();
        if held.id != id {
            *held = HeldFor {
                id,
                ..HeldFor::default()
            };
        }
        held
    }

    /// Holds `line` for `key` behind the answers it is owed (the caller
    /// puts a marker in the cluster FIFO when this returns true). False:
    /// `key` was closed as a slow consumer instead.
    pub fn hold_behind(
        &mut self,
        key: usize,
        line: &[u8],
        delivery: bool,
        deadlines: &mut Deadlines,
    ) -> bool {
        if !self.room_for(key, line.len(), Some(key), deadlines) {
            return false;
        }
        let held = self.held_for(key);
        held.behind.push_back((delivery, line.to_vec()));
        held.bytes += line.len();
        self.buffered += line.len();
        true
    }

    /// A marker for `slot` reached the FIFO's head: its oldest held line
    /// is sent, if it is still there to take it.
    pub fn release_behind(&mut self, slot: Slot, deadlines: &mut Deadlines) {
        let Some(held) = self.held.by_key.get_mut(&slot.key) else {
            return;
        };
        if held.id != slot.id {
            return;
        }
        let Some((delivery, line)) = held.behind.pop_front() else {
            return;
        };
        self.released(slot.key, line.len());
        if let Some(key) = self.find(slot) {
            if self.send_line(key, &line, deadlines) && delivery {
                self.stats.deliveries += 1;
            }
        }
    }

    /// Holds a message to the claimant `to` from `sender` until its claim
    /// is answered. False: `to` was closed as a slow consumer instead (it
    /// no longer holds the name: route the line as to anyone not here).
    pub fn hold_for_claim(
        &mut self,
        to: usize,
        sender: usize,
        line: &[u8],
        deadlines: &mut Deadlines,
    ) -> bool {
        if !self.room_for(to, line.len(), Some(sender), deadlines) {
            return false;
        }
        let from = self.slot(sender);
        let held = self.held_for(to);
        held.for_claim.push((from, line.to_vec()));
        held.bytes += line.len();
        self.buffered += line.len();
        true
    }

    /// The deliveries held for the claimant `key`, taken out of the
    /// account.
    fn take_for_claim(&mut self, key: usize) -> Vec<(Slot, Vec<u8>)> {
        if self.held.is_empty() {
            return Vec::new();
        }
        let id = self.conns[key].id;
        let Some(held) = self.held.by_key.get_mut(&(key as u32)) else {
            return Vec::new();
        };
        if held.id != id {
            return Vec::new();
        }
        let lines = std::mem::take(&mut held.for_claim);
        self.released(key as u32, lines.iter().map(|(_, line)| line.len()).sum());
        lines
    }

    /// The claimant `key` is logged in: what was held for it is queued for
    /// it, in order, before anything sent to it after.
    pub(super) fn deliver_held(&mut self, key: usize, deadlines: &mut Deadlines) {
        for (from, line) in self.take_for_claim(key) {
            let sender = self.find(from);
            if self.enqueue(key, &line, sender, deadlines) {
                self.stats.deliveries += 1;
            }
        }
    }

    /// The claimant `key` will not hold its name (refused, unavailable,
    /// closed): what was held for it goes to `held.to_route`, for whoever
    /// holds the name.
    pub(super) fn route_held_on(&mut self, key: usize) {
        let lines = self.take_for_claim(key);
        if lines.is_empty() {
            return;
        }
        let name: Rc<str> = Rc::from(self.conns[key].name.as_str());
        let routes = lines
            .into_iter()
            .map(|(from, line)| (from, Rc::clone(&name), line));
        self.held.to_route.extend(routes);
    }

    /// Drops the lines held behind answers for `key` (its queue is dropped
    /// to make room).
    pub(super) fn drop_behind(&mut self, key: usize) {
        let id = self.conns[key].id;
        if let Some(held) = self.held.by_key.get_mut(&(key as u32)) {
            if held.id == id {
                let bytes = held.behind.drain(..).map(|(_, line)| line.len()).sum();
                self.released(key as u32, bytes);
            }
        }
    }

    /// Drops what is held for `key`, which is being removed (what it held
    /// for a claim was routed on when it stopped claiming).
    pub(super) fn drop_held(&mut self, key: usize) {
        if self.held.is_empty() {
            return;
        }
        if let Some(held) = self.held.by_key.remove(&(key as u32)) {
            self.buffered -= held.bytes;
        }
    }

    /// What a live upgrade hands over for `key`: the lines held behind
    /// its answers, in order (the new process queues them after its
    /// output), and how many deliveries it held for a claim (lost: the
    /// claim is made again by the new process).
    pub(super) fn held_for_handover(&self, key: usize) -> (Vec<u8>, usize) {
        let Some(held) = self.held.by_key.get(&(key as u32)) else {
            return (Vec::new(), 0);
        };
        if held.id != self.conns[key].id {
            return (Vec::new(), 0);
        }
        let behind = held
            .behind
            .iter()
            .flat_map(|(_, line)| line.iter().copied());
        (behind.collect(), held.for_claim.len())
    }

    /// `bytes` held for the connection at `key` left: out of the account,
    /// and the entry gone once it holds nothing.
    fn released(&mut self, key: u32, bytes: usize) {
        self.buffered -= bytes;
        if let Some(held) = self.held.by_key.get_mut(&key) {
            held.bytes -= bytes;
            if held.bytes == 0 {
                self.held.by_key.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Conn, Phase};
    use crate::server::clients::Limits;

    /// A table of `n` connections over real loopback sockets (the peers
    /// are returned so the sockets stay open), `alice` logged in at key 0,
    /// `bob` claiming at key 1 (when `n` allows).
    fn table(n: usize, max_outbound: usize) -> (Clients, Deadlines, Vec<std::net::TcpStream>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_line: 1024,
            max_outbound,
            login_timeout_ms: 0,
            idle_timeout_ms: 0,
            max_buffer_memory: 1 << 20,
        };
        listener.set_nonblocking(true).unwrap();
        let mio_listener = mio::net::TcpListener::from_std(listener.try_clone().unwrap());
        let mut clients = Clients::new(mio_listener, None, limits, 16);
        clients.released = Some(Vec::new());
        let mut deadlines = Deadlines::default();
        let mut peers = Vec::new();
        for id in 0..n {
            peers.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, _) = loop {
                match listener.accept() {
                    Ok(pair) => break pair,
                    Err(_) => std::thread::yield_now(),
                }
            };
            stream.set_nonblocking(true).unwrap();
            let stream = mio::net::TcpStream::from_std(stream);
            clients.conns.insert(Conn::new(stream, id as u32, 0));
            clients.stats.opened();
        }
        assert!(clients.log_in(0, "alice", &mut deadlines));
        if n > 1 {
            assert!(clients.reserve(1, "bob"));
        }
        (clients, deadlines, peers)
    }

    /// Lines held behind answers are in the buffer account while held and
    /// go to the output, in order, when their markers come.
    #[test]
    fn lines_behind_answers_are_counted_then_queued_in_order() {
        let (mut clients, mut deadlines, _peers) = table(1, 4096);
        assert!(clients.hold_behind(0, b"one\n", true, &mut deadlines));
        assert!(clients.hold_behind(0, b"two\n", false, &mut deadlines));
        assert_eq!(clients.buffered, 8);
        assert_eq!(clients.outbound(0), 8);
        let slot = clients.slot(0);
        clients.release_behind(slot, &mut deadlines);
        clients.release_behind(slot, &mut deadlines);
        let out = clients.conns[0].out.as_ref().unwrap();
        assert_eq!(&out.data[out.pos..], b"one\ntwo\n");
        assert_eq!(clients.stats.deliveries, 1, "the error line is no delivery");
        assert_eq!(clients.held.bytes(0), 0);
        assert_eq!(clients.buffered, clients.conns[0].footprint());
        // A marker for a connection that is gone (its key reused) sends
        // nothing to the newcomer.
        clients.release_behind(Slot { key: 0, id: 99 }, &mut deadlines);
    }

    /// Messages held for a claimant are delivered in order once it holds
    /// its name, and counted then.
    #[test]
    fn a_claimant_gets_what_was_held_once_logged_in() {
        let (mut clients, mut deadlines, _peers) = table(2, 4096);
        assert!(clients.hold_for_claim(1, 0, b"from alice: 1\n", &mut deadlines));
        assert!(clients.hold_for_claim(1, 0, b"from alice: 2\n", &mut deadlines));
        assert_eq!(clients.stats.deliveries, 0, "not delivered yet");
        clients.finish_login(1, &mut deadlines);
        let out = clients.conns[1].out.as_ref().unwrap();
        assert_eq!(&out.data[out.pos..], b"from alice: 1\nfrom alice: 2\n");
        assert_eq!(clients.stats.deliveries, 2);
        assert_eq!(clients.held.bytes(1), 0);
    }

    /// A claimant that will not hold its name passes what was held for it
    /// on, with each line's sender and the name, to be routed.
    #[test]
    fn a_refused_claimant_passes_its_lines_on_to_be_routed() {
        let (mut clients, mut deadlines, _peers) = table(2, 4096);
        assert!(clients.hold_for_claim(1, 0, b"from alice: hi\n", &mut deadlines));
        let detail = format_args!("bob");
        clients.error(
            1,
            crate::protocol::ErrorKind::NameTaken,
            detail,
            &mut deadlines,
        );
        let routes = std::mem::take(&mut clients.held.to_route);
        assert_eq!(routes.len(), 1);
        let (from, name, line) = &routes[0];
        assert_eq!(
            (*from, &**name, &line[..]),
            (clients.slot(0), "bob", &b"from alice: hi\n"[..])
        );
        assert_eq!(clients.held.bytes(1), 0);
        assert_eq!(
            clients.buffered,
            clients.conns[1].footprint(),
            "out of the account"
        );
    }

    /// Held lines count against `--max-outbound`: past it the claimant is
    /// closed as a slow consumer, and what it held goes on to be routed.
    #[test]
    fn held_lines_count_against_max_outbound() {
        let (mut clients, mut deadlines, _peers) = table(2, 100);
        let line = [b'x'; 60];
        assert!(clients.hold_for_claim(1, 0, &line, &mut deadlines));
        assert!(!clients.hold_for_claim(1, 0, &line, &mut deadlines));
        assert_eq!(clients.conns[1].phase(), Phase::Closing);
        assert_eq!(clients.stats.slow_consumers, 1);
        assert_eq!(clients.held.to_route.len(), 1);
        assert_eq!(
            clients.conns[0].phase(),
            Phase::Chat,
            "the sender is not punished"
        );
    }

    /// What is held for a connection leaves the account when it is reaped.
    #[test]
    fn a_reaped_connection_leaves_nothing_held() {
        let (mut clients, mut deadlines, _peers) = table(1, 4096);
        assert!(clients.hold_behind(0, b"one\n", true, &mut deadlines));
        clients.kill(0);
        clients.reap();
        assert_eq!(clients.buffered, 0);
        assert!(clients.held.is_empty());
    }
}
