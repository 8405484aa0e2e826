//! The broker: login, routing a message to its recipients' outbound
//! buffers, and the `error:` lines.

use super::*;

/// Offline recipients of one message, each once, in the order given.
#[derive(Default)]
pub(super) struct Offline<'a> {
    /// The names, in order.
    names: Vec<&'a str>,
    /// The same names for O(1) lookups once the list is long, so a line
    /// naming thousands of strangers costs linear time, not quadratic.
    seen: HashSet<&'a str>,
}

impl<'a> Offline<'a> {
    const LINEAR_MAX: usize = 8;

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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl Server {
    /// Handles one line from a connection that is reading lines.
    pub(super) fn handle_line(&mut self, key: usize, raw: &[u8]) {
        let text = match protocol::decode(raw) {
            Ok(Some(text)) => text,
            Ok(None) => return, // blank lines are ignored
            Err(protocol::InvalidUtf8) => {
                self.send_error(key, ErrorKind::InvalidUtf8, format_args!(""));
                return;
            }
        };
        match self.conns[key].phase {
            Phase::Login => self.login(key, text),
            Phase::Chat => self.route(key, text),
            Phase::Draining | Phase::Closing => {}
        }
    }

    /// Handles the first non-blank line: a valid, free name logs the
    /// connection in (no reply, as in the seed); anything else closes it
    /// with `invalid-name` or `name-taken`.
    pub(super) fn login(&mut self, key: usize, text: &str) {
        let name = match protocol::parse_name(text) {
            Ok(name) => name,
            Err(why) => {
                self.close_with_error(key, ErrorKind::InvalidName, format_args!("{why}"));
                return;
            }
        };
        let name: Rc<str> = Rc::from(name);
        if !self.registry.claim(&name, key) {
            self.close_with_error(key, ErrorKind::NameTaken, format_args!("{name}"));
            return;
        }
        let conn = &mut self.conns[key];
        debug!("#{} logged in as {name}", conn.id);
        conn.name = name;
        conn.phase = Phase::Chat;
        self.stats.logins += 1;
        if !self.config.idle_timeout.is_zero() {
            self.add_timer(key, TimerKind::Idle, millis(self.config.idle_timeout));
        }
    }

    /// Routes one message line: formats `from <sender>: <body>` once and
    /// appends it to every online recipient named, once each.
    pub(super) fn route(&mut self, key: usize, text: &str) {
        self.stats.messages_in += 1;
        let Ok(msg) = protocol::parse_message(text) else {
            let detail = protocol::NO_RECIPIENTS_DETAIL;
            self.send_error(key, ErrorKind::NoRecipients, format_args!("{detail}"));
            return;
        };
        let seq = self.next_route_seq();
        let mut line = std::mem::take(&mut self.delivery);
        line.clear();
        protocol::write_delivery(&mut line, &self.conns[key].name, msg.body);
        let mut offline = Offline::default();
        for name in protocol::recipients(msg.names) {
            let Some(to) = self.registry.lookup(name) else {
                offline.add(name);
                continue;
            };
            let recipient = &mut self.conns[to];
            if recipient.route_mark == seq {
                continue; // named twice
            }
            recipient.route_mark = seq;
            if self.enqueue(to, &line) {
                self.stats.deliveries += 1;
            }
        }
        self.delivery = line;
        if !offline.names.is_empty() {
            self.send_error(key, ErrorKind::NotOnline, format_args!("{offline}"));
        }
    }

    /// The next message's sequence number. When the `u32` wraps, every mark
    /// is reset, so an old mark can never equal a new number and skip a
    /// recipient (a scan once per four billion messages).
    pub(super) fn next_route_seq(&mut self) -> u32 {
        if self.route_seq == u32::MAX {
            for (_, conn) in self.conns.iter_mut() {
                conn.route_mark = 0;
            }
            self.route_seq = 0;
        }
        self.route_seq += 1;
        self.route_seq
    }

    /// Queues `bytes` for `key` within `--max-outbound`; over it, the
    /// connection is closed as a slow consumer. Returns whether it was queued.
    pub(super) fn enqueue(&mut self, key: usize, bytes: &[u8]) -> bool {
        let conn = &mut self.conns[key];
        let queued = conn.pending_out();
        if queued + bytes.len() > self.config.max_outbound {
            let addr = conn
                .stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            warn!(
                "closing slow consumer {:?} ({addr}): {queued} bytes queued, limit {}",
                conn.name, self.config.max_outbound
            );
            self.stats.slow_consumers += 1;
            self.kill(key);
            return false;
        }
        conn.queue(bytes, &mut self.pool);
        self.mark_pending(key);
        true
    }

    /// Sends an `error:` line that keeps the connection open.
    pub(super) fn send_error(&mut self, key: usize, kind: ErrorKind, detail: fmt::Arguments<'_>) {
        if !self.is_reading(key) {
            return;
        }
        let mut line = std::mem::take(&mut self.error_line);
        line.clear();
        protocol::write_error(&mut line, kind, detail);
        self.stats.error_sent(kind);
        self.enqueue(key, &line);
        self.error_line = line;
    }

    /// Queues an `error:` line that ends the connection, releases its name
    /// and starts the closing sequence: flush, shut down the sending side,
    /// linger for the client's EOF, close (see `Server::on_drained`).
    pub(super) fn close_with_error(
        &mut self,
        key: usize,
        kind: ErrorKind,
        detail: fmt::Arguments<'_>,
    ) {
        let conn = &mut self.conns[key];
        if conn.has(DEAD) || conn.phase == Phase::Closing {
            return;
        }
        if conn.phase == Phase::Chat {
            self.registry.release(&conn.name);
        }
        conn.phase = Phase::Closing;
        self.pool.give(&mut conn.partial);
        let mut line = std::mem::take(&mut self.error_line);
        line.clear();
        protocol::write_error(&mut line, kind, detail);
        // The final line may go past --max-outbound: it is small and last.
        conn.queue(&line, &mut self.pool);
        self.error_line = line;
        self.stats.error_sent(kind);
        self.mark_pending(key);
        if self.shutdown_deadline_ms.is_none() {
            self.add_timer(key, TimerKind::Close, CLOSE_GRACE_MS);
        }
    }
}
