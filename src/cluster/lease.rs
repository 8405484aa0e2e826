//! The lease's own connection to Redis, so that a renewal never waits
//! behind data.
//!
//! Redis answers one connection's commands in order: on the data link, a
//! renewal waits behind every claim, release and route queued before it,
//! and a login or logout wave of a million clients makes that wait longer
//! than the lease, so that a node whose Redis is only busy fences. On a
//! connection of its own a renewal waits only for its turn among Redis's
//! clients: Redis reads every connection in each pass of its event loop
//! and runs what it read, so a deep pipeline on the data link delays the
//! renewal by one pass, not by the whole backlog.
//!
//! This link only renews: `HELLO 3` (naming the connection
//! `chatd-<node>-lease`), then `SET <lease> 1 PX <ms> XX` every
//! third of the lease while the node holds one and its data link is ready
//! (a node that cannot release names lets its lease lapse, as it did when
//! the data link renewed). The data link still takes
//! the lease (at its handshake, and anew when it is lost), in order with
//! its claims, since names are bound to it; a renewal here that finds the
//! lease gone has the data link check it (`Shard::on_lease_event`).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;

use log::{debug, info, warn};
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::codec::{Framer, Reply, encode_command};
use super::{Auth, FIRST_BACKOFF_MS, MAX_BACKOFF_MS, MAX_REPLY_DEPTH, hello, is_auth_error};

/// The longest reply this link takes, and the most it reads at once: its
/// replies are `OK`, nil and HELLO's map (well under 1 KiB).
const MAX_LEASE_REPLY: usize = 64 << 10;

/// What a renewal found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Renewal {
    /// The lease existed and was extended by the renewal sent at `sent_ms`.
    Renewed { sent_ms: u64 },
    /// No lease to extend: Redis lost it, or it expired.
    Gone,
}

/// What is in flight on the lease link, in the order Redis answers.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Hello,
    Renew { sent_ms: u64 },
}

pub(super) struct LeaseLink {
    redis: SocketAddr,
    /// The credentials, if Redis wants them.
    auth: Option<Auth>,
    /// The connection's name in Redis's `CLIENT LIST`.
    name: String,
    /// The socket, while connecting or connected.
    stream: Option<TcpStream>,
    /// Whether the connect completed.
    connected: bool,
    /// Without a socket: when to connect again.
    pub(super) retry_at: u64,
    backoff_ms: u64,
    /// Commands not yet written.
    out: Vec<u8>,
    /// Bytes read and not yet decoded.
    input: Vec<u8>,
    framer: Framer,
    sent: VecDeque<Sent>,
    /// When Redis last answered on this link (ms).
    last_reply_ms: u64,
    /// When the next renewal is due (ms).
    renew_at: u64,
    /// Whether the failure to reach Redis was logged (once per outage).
    down_logged: bool,
}

impl LeaseLink {
    /// A link to `redis`, named `name` there (`CLIENT LIST`).
    pub fn new(redis: SocketAddr, auth: Option<Auth>, name: String) -> LeaseLink {
        LeaseLink {
            redis,
            auth,
            name,
            stream: None,
            connected: false,
            retry_at: 0,
            backoff_ms: FIRST_BACKOFF_MS,
            out: Vec::new(),
            input: Vec::new(),
            framer: Framer::new(MAX_REPLY_DEPTH, MAX_LEASE_REPLY),
            sent: VecDeque::new(),
            last_reply_ms: 0,
            renew_at: 0,
            down_logged: false,
        }
    }

    /// Whether the connection is up (else the data link renews too).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The earliest time the link wants to be woken: to connect, to renew
    /// (while the node holds a lease), or to give up on a silent Redis.
    pub fn next_deadline(&self, holds_lease: bool, reply_timeout_ms: u64) -> u64 {
        let mut next = u64::MAX;
        if self.stream.is_none() {
            next = next.min(self.retry_at);
        } else if holds_lease {
            next = next.min(self.renew_at);
        }
        if let Some(since) = self.waiting_since() {
            next = next.min(since + reply_timeout_ms);
        }
        next
    }

    /// Since when the link waits without news (see the data link's
    /// `waiting_since`).
    fn waiting_since(&self) -> Option<u64> {
        let sent = self.sent.iter().find_map(|s| match s {
            Sent::Renew { sent_ms } => Some(*sent_ms),
            Sent::Hello => None,
        })?;
        Some(sent.max(self.last_reply_ms))
    }

    /// Time-driven work: connect, renew every third of `lease_ms` while the
    /// node holds a lease (`renew`: its length and key), drop a link Redis
    /// stopped answering on. Returns what renewals found: a reply is read
    /// before the link is called silent, since a long turn of the loop may
    /// have left it unread.
    pub fn on_timer(
        &mut self,
        registry: &Registry,
        token: Token,
        now_ms: u64,
        renew: Option<(u64, &str)>,
        reply_timeout_ms: u64,
    ) -> Vec<Renewal> {
        let mut found = Vec::new();
        if self.stream.is_none() {
            if now_ms >= self.retry_at {
                self.connect(registry, token, now_ms);
            }
            return found;
        }
        let silent = |link: &LeaseLink| {
            link.waiting_since()
                .is_some_and(|since| now_ms >= since + reply_timeout_ms)
        };
        if silent(self) && self.connected {
            self.read(now_ms, &mut found);
        }
        if silent(self) {
            self.reset(now_ms, "Redis did not answer in time");
            return found;
        }
        if let Some((lease_ms, key)) = renew {
            if now_ms >= self.renew_at {
                self.renew(now_ms, lease_ms, key);
            }
        }
        found
    }

    /// Reads the replies that came (before the node decides to fence, or
    /// after an upgrade stopped the loop from looking).
    pub fn read_more(&mut self, now_ms: u64) -> Vec<Renewal> {
        let mut found = Vec::new();
        if self.connected {
            self.read(now_ms, &mut found);
        }
        found
    }

    /// Queues a renewal of `key` for `lease_ms` now.
    pub fn renew(&mut self, now_ms: u64, lease_ms: u64, key: &str) {
        let ms = lease_ms.to_string();
        encode_command(
            &mut self.out,
            &[b"SET", key.as_bytes(), b"1", b"PX", ms.as_bytes(), b"XX"],
        );
        self.sent.push_back(Sent::Renew { sent_ms: now_ms });
        self.renew_at = now_ms + lease_ms / 3;
    }

    fn connect(&mut self, registry: &Registry, token: Token, now_ms: u64) {
        let mut stream = match TcpStream::connect(self.redis) {
            Ok(stream) => stream,
            Err(e) => return self.back_off(now_ms, &e.to_string()),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(&mut stream, token, interest) {
            return self.back_off(now_ms, &e.to_string());
        }
        let _ = stream.set_nodelay(true);
        self.stream = Some(stream);
        self.connected = false;
        self.last_reply_ms = now_ms;
        hello(&mut self.out, self.auth.as_ref(), &self.name);
        self.sent.push_back(Sent::Hello);
    }

    /// A readiness event on the link's socket: what renewals found.
    pub fn on_event(&mut self, event: &mio::event::Event, now_ms: u64) -> Vec<Renewal> {
        let mut found = Vec::new();
        if self.stream.is_none() {
            return found;
        }
        if !self.connected {
            if event.is_error() || event.is_write_closed() || event.is_read_closed() {
                self.reset(now_ms, "connection refused");
                return found;
            }
            if !event.is_writable() {
                return found;
            }
            match self.stream.as_ref().map(|s| s.peer_addr()) {
                Some(Ok(_)) => {
                    self.connected = true;
                    debug!("cluster: the lease's connection to Redis is up");
                }
                _ => {
                    self.reset(now_ms, "connection refused");
                    return found;
                }
            }
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read(now_ms, &mut found);
        }
        self.flush(now_ms);
        found
    }

    /// Reads and handles what came. This link is owed a few short replies:
    /// more than [`MAX_LEASE_REPLY`] at once is not Redis, or not sane,
    /// and drops the link rather than keep the loop reading.
    fn read(&mut self, now_ms: u64, found: &mut Vec<Renewal>) {
        let mut buf = [0; 4096];
        let mut budget = MAX_LEASE_REPLY;
        loop {
            if budget == 0 {
                return self.reset(now_ms, "Redis sent more than the lease's replies");
            }
            let Some(stream) = &mut self.stream else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => return self.reset(now_ms, "Redis closed the connection"),
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    self.input.extend_from_slice(&buf[..n]);
                    if let Err(why) = self.decode_all(now_ms, found) {
                        return self.reset(now_ms, &why);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.reset(now_ms, &e.to_string()),
            }
        }
    }

    fn decode_all(&mut self, now_ms: u64, found: &mut Vec<Renewal>) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            let (reply, len) = match self.framer.next_reply(&self.input[at..]) {
                Ok(Some(next)) => next,
                Ok(None) => break Ok(()),
                Err(why) => break Err(why),
            };
            at += len;
            if matches!(reply, Reply::Message { .. } | Reply::OtherPush) {
                continue; // nothing is subscribed here; ignored all the same
            }
            let Some(sent) = self.sent.pop_front() else {
                break Err("a reply nobody asked for".into());
            };
            self.last_reply_ms = now_ms;
            match (sent, reply) {
                (Sent::Hello, Reply::Error(e)) if is_auth_error(&e) => {
                    // The data link says so, once; no use trying soon.
                    self.backoff_ms = MAX_BACKOFF_MS;
                    self.down_logged = true;
                    break Err(format!("Redis refused the credentials ({e})"));
                }
                (_, Reply::Error(e)) => break Err(format!("Redis refused a command: {e}")),
                (Sent::Hello, _) => {}
                (Sent::Renew { .. }, Reply::Nil) => found.push(Renewal::Gone),
                (Sent::Renew { sent_ms }, Reply::Status(ok)) if ok == "OK" => {
                    if self.down_logged {
                        info!("cluster: the lease's connection to Redis is back");
                        self.down_logged = false;
                    }
                    self.backoff_ms = FIRST_BACKOFF_MS;
                    found.push(Renewal::Renewed { sent_ms });
                }
                (Sent::Renew { .. }, _) => break Err("unexpected reply to a renewal".into()),
            }
        };
        self.input.drain(..at);
        result
    }

    /// Writes what is queued (a few commands a lease at most).
    pub fn flush(&mut self, now_ms: u64) {
        if !self.connected || self.out.is_empty() {
            return;
        }
        let Some(stream) = &mut self.stream else {
            return;
        };
        let mut written = 0;
        let mut failed = None;
        while written < self.out.len() {
            match stream.write(&self.out[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        self.out.drain(..written);
        if let Some(why) = failed {
            self.reset(now_ms, &why);
        }
    }

    /// The node fenced: renewals in flight are dropped (none may bring the
    /// lease back) and the connection is made anew at once, quietly.
    pub fn drop_in_flight(&mut self, now_ms: u64) {
        self.close();
        self.retry_at = now_ms;
    }

    /// Drops the connection (renewals in flight are lost: the lease stays
    /// until it must be fenced) and waits for the back-off.
    pub fn reset(&mut self, now_ms: u64, why: &str) {
        // Connect failures are the data link's to report (it logs each
        // outage once); a connection that worked and failed is news.
        if self.connected && !self.down_logged {
            warn!(
                "cluster: the lease's connection to Redis at {} failed ({why}); \
                 connecting again with back-off",
                self.redis
            );
            self.down_logged = true;
        }
        self.close();
        self.back_off(now_ms, why);
    }

    fn close(&mut self) {
        self.stream = None;
        self.connected = false;
        self.out.clear();
        self.input.clear();
        self.framer.reset();
        self.sent.clear();
    }

    fn back_off(&mut self, now_ms: u64, why: &str) {
        debug!("cluster: the lease's connection to Redis: {why}");
        self.retry_at = now_ms + self.backoff_ms;
        self.backoff_ms = (self.backoff_ms * 2).min(MAX_BACKOFF_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;
    use std::time::Duration;

    const TOKEN: Token = Token(1);
    const TIMEOUT_MS: u64 = 2500;
    const KEY: &str = "p:lease:n";

    /// A lease link connected to a fake Redis (a plain socket the test
    /// reads commands from and writes replies to), past HELLO.
    struct Fake {
        poll: mio::Poll,
        link: LeaseLink,
        redis: BufReader<std::net::TcpStream>,
    }

    impl Fake {
        fn start() -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let poll = mio::Poll::new().unwrap();
            let mut link = LeaseLink::new(listener.local_addr().unwrap(), None, "n-lease".into());
            link.on_timer(poll.registry(), TOKEN, 0, None, TIMEOUT_MS);
            let (redis, _) = listener.accept().unwrap();
            redis
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut fake = Fake {
                poll,
                link,
                redis: BufReader::new(redis),
            };
            fake.events(0);
            assert!(fake.link.is_connected());
            assert_eq!(fake.command(), ["HELLO", "3", "SETNAME", "n-lease"]);
            fake.reply(b"%1\r\n+server\r\n+redis\r\n");
            assert!(fake.events(1).is_empty());
            fake
        }

        /// Handles the link's readiness events until none come for a
        /// moment (the replies written so far are read).
        fn events(&mut self, now_ms: u64) -> Vec<Renewal> {
            let mut events = mio::Events::with_capacity(8);
            let mut found = Vec::new();
            loop {
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(200)))
                    .unwrap();
                if events.is_empty() {
                    return found;
                }
                for event in events.iter() {
                    found.extend(self.link.on_event(event, now_ms));
                }
            }
        }

        /// The next command the link wrote, as its words.
        fn command(&mut self) -> Vec<String> {
            let mut line = String::new();
            self.redis.read_line(&mut line).unwrap();
            let n: usize = line.trim_end()[1..].parse().unwrap();
            (0..n)
                .map(|_| {
                    let mut len = String::new();
                    self.redis.read_line(&mut len).unwrap();
                    let mut word = String::new();
                    self.redis.read_line(&mut word).unwrap();
                    word.trim_end().to_string()
                })
                .collect()
        }

        /// Started, with a renewal sent at `now_ms` and read by Redis.
        fn renewing_at(now_ms: u64) -> Fake {
            let mut fake = Fake::start();
            fake.renew(now_ms);
            assert_eq!(fake.command()[0], "SET");
            fake
        }

        fn reply(&mut self, bytes: &[u8]) {
            self.redis.get_mut().write_all(bytes).unwrap();
        }

        fn renew(&mut self, now_ms: u64) -> Vec<Renewal> {
            let renew = Some((3000, KEY));
            let found = self
                .link
                .on_timer(self.poll.registry(), TOKEN, now_ms, renew, TIMEOUT_MS);
            self.link.flush(now_ms);
            found
        }
    }

    #[test]
    fn renews_and_reports_what_it_found() {
        let mut fake = Fake::start();
        fake.renew(10);
        assert_eq!(fake.command(), ["SET", KEY, "1", "PX", "3000", "XX"]);
        fake.reply(b"+OK\r\n");
        assert_eq!(fake.events(20), [Renewal::Renewed { sent_ms: 10 }]);
        fake.renew(11); // not due yet: a third of the lease after the last
        fake.renew(1010);
        assert_eq!(fake.command()[0], "SET");
        fake.reply(b"_\r\n");
        assert_eq!(fake.events(1020), [Renewal::Gone]);
    }

    #[test]
    fn a_reply_a_long_turn_left_unread_is_not_a_silent_redis() {
        let mut fake = Fake::renewing_at(10);
        fake.reply(b"+OK\r\n");
        // The timer comes first, long after: the reply waits in the socket.
        std::thread::sleep(Duration::from_millis(50));
        let found = fake.renew(10 + TIMEOUT_MS + 1);
        assert_eq!(found, [Renewal::Renewed { sent_ms: 10 }]);
        assert!(fake.link.is_connected());
    }

    #[test]
    fn a_silent_redis_drops_the_link() {
        let mut fake = Fake::renewing_at(10);
        assert!(fake.renew(10 + TIMEOUT_MS).is_empty());
        assert!(!fake.link.is_connected());
        assert!(fake.link.next_deadline(true, TIMEOUT_MS) > 10 + TIMEOUT_MS);
    }

    #[test]
    fn only_ok_renews() {
        let mut fake = Fake::renewing_at(10);
        fake.reply(b":1\r\n");
        assert!(fake.events(20).is_empty(), "not a renewal");
        assert!(!fake.link.is_connected());
    }

    #[test]
    fn a_fence_drops_what_is_in_flight_and_connects_again_at_once() {
        let mut fake = Fake::renewing_at(10);
        fake.link.drop_in_flight(20);
        fake.reply(b"+OK\r\n"); // to the old connection: nobody reads it
        assert!(!fake.link.is_connected());
        assert_eq!(fake.link.next_deadline(false, TIMEOUT_MS), 20);
    }

    #[test]
    fn a_flood_drops_the_link_instead_of_keeping_the_loop_reading() {
        let mut fake = Fake::start();
        let push = b">2\r\n+message\r\n+x\r\n".repeat(8192); // pushes nobody asked for
        fake.reply(&push);
        fake.events(30);
        assert!(!fake.link.is_connected());
    }
}
