//! The read path: budgeted reads, framing in place, EOF, and discarding
//! input while a connection closes.

use super::*;

/// When a read loop may stop without seeing `WouldBlock`.
///
/// On Linux, a TCP read that returns less than asked for has emptied the
/// receive queue, and data or a FIN arriving afterwards wakes epoll again,
/// raising a new edge. Stopping at a short read saves one `read` returning
/// `EAGAIN` per message. The exception is a FIN (or error) that arrived
/// before the event being handled: that edge is spent, so when the event
/// reports it, or when no event brought us (the come-back list), the loop
/// reads on until `WouldBlock` or EOF. `tests/readiness.rs` checks that no
/// input or EOF is ever stranded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    /// Stop at the first short read.
    UntilShortRead,
    /// Read until `WouldBlock`, EOF or the budget.
    UntilWouldBlock,
}

/// Bytes read per `read` call, and the most read from one connection in one
/// loop turn before others get their turn.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// The most input discarded while lingering before closing regardless.
pub(super) const LINGER_BYTES: u32 = 64 * 1024;

impl Server {
    /// Serves connections that stopped at their read budget last turn.
    pub(super) fn serve_more_input(&mut self, mut carried: Vec<usize>) {
        for &key in &carried {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.has(MORE_INPUT) && !conn.has(DEAD) {
                conn.flags &= !MORE_INPUT;
                // No event brought us here, so no event tells us about a
                // FIN that may wait behind the data: read to the end.
                self.on_readable(key, Drain::UntilWouldBlock);
            }
        }
        carried.clear();
        self.more_input_spare = carried;
    }

    /// Input is (or may be) waiting: lines are read while the connection
    /// reads lines, dropped while it closes, and ignored after its EOF.
    pub(super) fn on_readable(&mut self, key: usize, drain: Drain) {
        match self.conns[key].phase {
            Phase::Login | Phase::Chat => self.read_lines(key, drain),
            Phase::Closing => self.discard_input(key),
            Phase::Draining => {} // input ended; only output is left
        }
    }

    /// Reads and handles lines until the socket is drained (see [`Drain`]),
    /// EOF, an error, or the per-turn budget (then the connection goes on
    /// the come-back list).
    pub(super) fn read_lines(&mut self, key: usize, drain: Drain) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let head = self.config.max_line + 2;
        let mut budget = READ_CHUNK;
        loop {
            let conn = &mut self.conns[key];
            let n = match conn.read(&mut scratch[head..]) {
                Ok(0) => {
                    self.on_eof(key);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("#{} read error: {e}", conn.id);
                    self.kill(key);
                    break;
                }
            };
            self.stats.bytes_in += n as u64;
            conn.last_input_ms = self.now_ms as u32;
            // Put the unterminated tail from earlier reads right before the
            // new bytes, so lines are parsed in place from one slice.
            let tail = conn.partial.as_ref().map_or(&[][..], |p| &p.data[..]);
            let start = head - tail.len();
            scratch[start..head].copy_from_slice(tail);
            let Some(tail) = self.handle_lines(key, &scratch[start..head + n]) else {
                self.scratch = scratch;
                // Closing now: drain what is left, or no new event would come
                // for input that already arrived, and closing a socket with
                // unread input resets it, which can destroy the error line.
                if !self.conns[key].has(DEAD) {
                    self.discard_input(key);
                }
                return;
            };
            let conn = &mut self.conns[key];
            if tail.is_empty() {
                self.pool.give(&mut conn.partial);
            } else {
                let partial = conn
                    .partial
                    .get_or_insert_with(|| self.pool.take(tail.len()));
                partial.data.clear();
                partial.data.extend_from_slice(tail);
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                conn.flags |= MORE_INPUT;
                self.more_input.push(key);
                break;
            }
            if n < READ_CHUNK && drain == Drain::UntilShortRead {
                break; // drained: anything arriving later raises a new edge
            }
        }
        self.scratch = scratch;
    }

    /// Handles every complete line in `data` in order. Returns the
    /// unterminated tail to keep, or `None` when the connection stopped
    /// reading lines (closing or dead).
    pub(super) fn handle_lines<'a>(&mut self, key: usize, data: &'a [u8]) -> Option<&'a [u8]> {
        let max = self.config.max_line;
        let split = protocol::split_lines(data, max, |line| {
            self.handle_line(key, line);
            self.is_reading(key)
        });
        match split {
            Split::Tail(tail) => Some(tail),
            Split::Stopped => None,
            Split::TooLong => {
                let detail = format_args!("max {max} bytes");
                self.close_with_error(key, ErrorKind::LineTooLong, detail);
                None
            }
        }
    }

    /// Whether the connection still reads lines (not closing, not dead).
    pub(super) fn is_reading(&self, key: usize) -> bool {
        let conn = &self.conns[key];
        matches!(conn.phase, Phase::Login | Phase::Chat) && !conn.has(DEAD)
    }

    /// The client sent EOF: its last unterminated line counts, its name is
    /// released, and it closes once what is queued for it is written.
    pub(super) fn on_eof(&mut self, key: usize) {
        let mut tail = self.conns[key].partial.take();
        if let Some(line) = &tail {
            self.handle_line(key, &line.data);
        }
        self.pool.give(&mut tail);
        if !self.is_reading(key) {
            return;
        }
        let conn = &mut self.conns[key];
        debug!("#{} sent EOF", conn.id);
        conn.flags |= INPUT_DONE;
        if conn.phase == Phase::Chat {
            self.registry.release(&conn.name);
        }
        conn.phase = Phase::Draining;
        if conn.pending_out() == 0 {
            self.kill(key);
        }
    }

    /// Reads and drops input from a closing connection; EOF after the
    /// sending side is shut down, or too much input, ends it.
    pub(super) fn discard_input(&mut self, key: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        loop {
            let conn = &mut self.conns[key];
            match conn.read(&mut scratch) {
                Ok(0) => {
                    conn.flags |= INPUT_DONE;
                    if conn.has(WRITE_SHUT) {
                        self.kill(key);
                    }
                    break;
                }
                Ok(n) => {
                    self.stats.bytes_in += n as u64;
                    conn.discarded = conn.discarded.saturating_add(n as u32);
                    if conn.discarded > LINGER_BYTES {
                        self.kill(key);
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.kill(key);
                    break;
                }
            }
        }
        self.scratch = scratch;
    }
}
