//! The link's input and output: connecting without blocking, reading and
//! decoding what Redis sends (replies pop the FIFO, pushes are messages
//! from other nodes), writing what is queued, and starting over when the
//! connection fails. `mod.rs` has the state and the lease.

use std::io::{self, Read, Write};

use log::{debug, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::{Answer, MAX_BACKOFF_MS, MAX_OUT, READ_BUDGET, Shard, State};

impl Shard {
    /// Starts a non-blocking connect and queues the handshake.
    pub(super) fn connect(&mut self, registry: &Registry, token: Token, now_ms: u64) {
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
        self.last_reply_ms = now_ms;
        self.handshake(now_ms);
    }

    pub(super) fn fail_connect(&mut self, now_ms: u64, why: &str) {
        self.log_down(why);
        self.state = State::Down {
            retry_at: now_ms + self.backoff_ms,
        };
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
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
    pub(super) fn read(&mut self, now_ms: u64) {
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

    /// Reads both connections: after a failed upgrade, whose handing over
    /// let readiness events pass unread.
    pub fn catch_up(&mut self, now_ms: u64) {
        self.read_more(now_ms);
        let found = self.lease_link.read_more(now_ms);
        self.renewed(found, now_ms);
    }

    /// Decodes and handles every complete frame in `input`.
    pub(super) fn decode_all(&mut self, now_ms: u64) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            match self.framer.next_reply(&self.input[at..]) {
                Ok(Some((reply, len))) => {
                    at += len;
                    if let Err(why) = self.on_reply(reply, now_ms) {
                        break Err(why);
                    }
                }
                Ok(None) => break Ok(()),
                Err(why) => break Err(why),
            }
        };
        self.input.drain(..at);
        result
    }

    /// Whether bytes from Redis wait that the read budget left unread.
    pub fn has_unread(&self) -> bool {
        self.read_pending
    }

    /// Logs once per outage why Redis cannot be reached.
    pub(super) fn log_down(&mut self, why: &str) {
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

    /// A message from a node of an earlier version: `<names>\n<line>`.
    pub(super) fn on_message(&mut self, message: &[u8]) {
        if let Some(payload) = super::batch::record_of_message(message) {
            self.answers.push(Answer::Deliver { payload });
        }
    }

    /// Writes what is queued for Redis (on both connections); past
    /// `MAX_OUT` on the data link Redis counts as unreachable.
    pub fn flush(&mut self, now_ms: u64) {
        self.seal_staged();
        self.lease_link.flush(now_ms);
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
    /// unavailable, held lines are released in order), and the link
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
        self.claims_in_flight = 0;
        let queued = self.claim_queue.take_all();
        self.fail_queued_claims(queued);
        self.releases_in_flight = 0;
        for name in self.release_queue.take_all() {
            self.uncertain_name(&name);
        }
        for (_, slot, name) in std::mem::take(&mut self.retries) {
            self.claim_unavailable(slot, name, false);
        }
        if self.stream.take().is_some() && self.was_ready {
            self.stats.reconnects += 1;
        }
        self.out.clear();
        self.out_pos = 0;
        self.staged_claims.clear();
        self.staged_releases.clear();
        self.input.clear();
        self.framer.reset();
        self.waiting.clear();
        // Its commands may still run: the next connection kills it first.
        if let Some(id) = self.link_id.take() {
            if !self.pending.is_empty() {
                if self.stale_links.len() >= super::MAX_STALE_LINKS {
                    self.stale_links.remove(0);
                }
                self.stale_links.push(id);
            }
        }
        for entry in std::mem::take(&mut self.pending) {
            self.fail(entry, true);
        }
        if !self.batch.is_empty() {
            let staged = self.batch.abandon();
            self.unroutable(&staged);
        }
        // After what was in flight: a client read again must see its
        // earlier lines' results first.
        for (_, slot) in std::mem::take(&mut self.throttled) {
            self.answers.push(Answer::Unthrottle { slot });
        }
        self.state = State::Down {
            retry_at: now_ms + self.backoff_ms,
        };
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
}
