//! The read path: budgeted reads into the shared scratch buffer, framing
//! in place, lines handed to the broker, EOF, and discarding input while a
//! connection closes.

use log::debug;

use super::Server;
use super::clients::Clients;
use crate::conn::{Conn, Phase};
use crate::pool::BufPool;
use crate::protocol::{self, ErrorKind, Split};

/// When a read loop may stop without seeing `WouldBlock`.
///
/// On Linux, a TCP read that returns less than asked for has emptied the
/// receive queue, and data or a FIN arriving afterwards wakes epoll again,
/// raising a new edge. Stopping at a short read saves one `read` returning
/// `EAGAIN` per message. The exceptions: a FIN (or error) that arrived
/// before the event being handled, whose edge is spent; and urgent data
/// (`MSG_OOB`), at whose mark a read stops short with more queued. So when
/// the event reports either (urgent data as priority: see
/// [`CLIENT_INTEREST`]), or when no event brought us (the come-back list),
/// the loop reads on until `WouldBlock` or EOF. `tests/readiness.rs` checks
/// that no input or EOF is ever stranded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    /// Stop at the first short read.
    UntilShortRead,
    /// Read until `WouldBlock`, EOF or the budget.
    UntilWouldBlock,
}

/// What a client's socket is registered for: input, and on Linux urgent
/// data too (`EPOLLPRI`), so that an event tells when a short read may have
/// stopped at an urgent mark (see [`Drain`]).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) const CLIENT_INTEREST: mio::Interest =
    mio::Interest::READABLE.add(mio::Interest::PRIORITY);
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) const CLIENT_INTEREST: mio::Interest = mio::Interest::READABLE;

/// Bytes read per `read` call, and the most read from one connection in one
/// loop turn before others get their turn.
pub(super) const READ_CHUNK: usize = 64 * 1024;

/// The most input discarded while lingering before closing regardless.
const LINGER_BYTES: u32 = 64 * 1024;

impl Server {
    /// Serves connections that stopped at their read budget last turn.
    pub(super) fn serve_more_input(&mut self, mut carried: Vec<usize>) {
        for &key in &carried {
            let Some(conn) = self.clients.get(key) else {
                continue;
            };
            if conn.take_more_input() {
                // No event brought us here, so no event tells us about a
                // FIN that may wait behind the data: read to the end.
                self.on_readable(key, Drain::UntilWouldBlock);
            }
        }
        carried.clear();
        self.clients.more_input_spare = carried;
    }

    /// Input is (or may be) waiting: lines are read while the connection
    /// reads lines, dropped while it closes, and ignored after its EOF.
    pub(super) fn on_readable(&mut self, key: usize, drain: Drain) {
        if let Some(cluster) = &self.cluster {
            if cluster.is_throttled(self.clients.slot(key)) {
                return; // read again when its answers are in
            }
        }
        let conn = self.clients.conn(key);
        match conn.phase() {
            Phase::Login | Phase::Chat if conn.is_websocket() => self.read_ws(key, drain),
            Phase::Login | Phase::Chat => self.read_lines(key, drain),
            Phase::Claiming => {} // its input waits for the claim's answer
            Phase::Closing => self.clients.discard_input(key, &mut self.scratch),
            Phase::Draining => {} // input ended; only output is left
        }
    }

    /// Reads and handles lines until the socket is drained (see [`Drain`]),
    /// EOF, an error, or the per-turn budget (then the connection goes on
    /// the come-back list).
    fn read_lines(&mut self, key: usize, drain: Drain) {
        let head = self.clients.limits.max_line + 2;
        let kept = self
            .clients
            .conn(key)
            .partial
            .as_ref()
            .map_or(0, |p| p.len());
        if kept > head {
            return; // input held back while waiting: handled on resume
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut budget = READ_CHUNK;
        loop {
            let conn = self.clients.conn(key);
            let n = match conn.read(&mut scratch[head..]) {
                Ok(0) => {
                    self.on_eof(key);
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("#{} read error: {e}", conn.id);
                    self.clients.kill(key);
                    break;
                }
            };
            conn.last_input_ms = self.deadlines.now_ms() as u32;
            // Put the unterminated tail from earlier reads right before the
            // new bytes, so lines are parsed in place from one slice.
            let tail = conn.partial.as_ref().map_or(&[][..], |p| &p.data[..]);
            let start = head - tail.len();
            scratch[start..head].copy_from_slice(tail);
            self.clients.stats.bytes_in += n as u64;
            // What is left to keep: an unterminated tail, or (`kept`)
            // everything after the name while its claim is answered, read
            // no further.
            let (rest, kept) = match self.handle_lines(key, &scratch[start..head + n]) {
                Lines::Tail(tail) => (tail, false),
                Lines::Kept(rest) => (rest, true),
                Lines::Closed => {
                    // Closing now: drain what is left, or no new event would
                    // come for input that already arrived, and closing a
                    // socket with unread input resets it, which can destroy
                    // the error line.
                    if !self.clients.conn(key).is_dead() {
                        self.clients.discard_input(key, &mut scratch);
                    }
                    break;
                }
            };
            self.clients.with_buffers(key, |conn, pool| {
                keep_input(conn, pool, rest, &[], Default::default())
            });
            // What is kept counts against the memory bound, either way.
            if self.clients.is_over_memory() {
                self.clients.make_room(0, None, &mut self.deadlines);
                let conn = self.clients.conn(key);
                if conn.is_dead() || conn.phase() == Phase::Closing {
                    // Closed to make room: drain as on any closing error.
                    if !conn.is_dead() {
                        self.clients.discard_input(key, &mut scratch);
                    }
                    break;
                }
            }
            if kept || !self.clients.read_on(key, n, &mut budget, drain) {
                break;
            }
        }
        self.scratch = scratch;
    }

    /// Handles every complete line in `data` in order, and says what is
    /// left: a tail to keep, the input to keep while a claim is answered,
    /// or nothing when the connection stopped reading lines.
    pub(super) fn handle_lines<'a>(&mut self, key: usize, data: &'a [u8]) -> Lines<'a> {
        let max = self.clients.limits.max_line;
        let Server {
            clients,
            broker,
            deadlines,
            cluster,
            ..
        } = self;
        let mut backlogged = false;
        let split = protocol::split_lines(data, max, |line| {
            broker.handle_line(clients, deadlines, cluster.as_mut(), key, line);
            let conn = clients.conn(key);
            if !conn.reads_lines() {
                return false;
            }
            // In a cluster, a client that waits for too many answers from
            // Redis is not read further until they are in.
            if let Some(link) = cluster.as_mut() {
                let slot = clients.slot(key);
                if link.must_throttle(slot) {
                    link.throttle(slot);
                    backlogged = true;
                    return false;
                }
            }
            true
        });
        match split {
            Split::Tail(tail) => Lines::Tail(tail),
            Split::Stopped(rest) if clients.conn(key).phase() == Phase::Claiming || backlogged => {
                Lines::Kept(rest)
            }
            Split::Stopped(_) => Lines::Closed,
            Split::TooLong => {
                let detail = format_args!("max {max} bytes");
                clients.error(key, ErrorKind::LineTooLong, detail, deadlines);
                Lines::Closed
            }
        }
    }

    /// A claim was answered and `key` is logged in: the input it kept while
    /// waiting is handled, and its socket is read again next turn.
    pub(super) fn resume_input(&mut self, key: usize) {
        let kept = self
            .clients
            .with_buffers(key, |conn, _| conn.partial.take());
        let mut paused = false;
        if let Some(mut kept) = kept {
            let data = std::mem::take(&mut kept.data);
            // A WebSocket connection's kept input ends in frame bytes, kept
            // as they are.
            let state = kept.ws;
            let (text, raw) = data[kept.pos..].split_at(data.len() - kept.pos - state.raw as usize);
            match self.handle_lines(key, text) {
                Lines::Tail(tail) => {
                    self.clients
                        .with_buffers(key, |conn, pool| keep_input(conn, pool, tail, raw, state));
                }
                Lines::Kept(rest) => {
                    // Held back again: the rest waits for the next resume.
                    paused = true;
                    self.clients
                        .with_buffers(key, |conn, pool| keep_input(conn, pool, rest, raw, state));
                }
                Lines::Closed => {
                    if !self.clients.conn(key).is_dead() {
                        let mut scratch = std::mem::take(&mut self.scratch);
                        self.clients.discard_input(key, &mut scratch);
                        self.scratch = scratch;
                    }
                }
            }
            kept.data = data;
            self.clients.pool.give(&mut Some(kept));
        }
        let conn = self.clients.conn(key);
        if !paused && conn.reads_lines() && conn.mark_more_input() {
            self.clients.more_input.push(key);
        }
    }

    /// The client sent EOF: its last unterminated line counts, its name is
    /// released, and it closes once what is queued for it is written.
    fn on_eof(&mut self, key: usize) {
        let mut tail = self
            .clients
            .with_buffers(key, |conn, _| conn.partial.take());
        if let Some(line) = &tail {
            // The last line, unterminated: handled like any other.
            let _ = self.handle_lines(key, &[&line.data[..], b"\n"].concat());
        }
        self.clients.pool.give(&mut tail);
        if !self.clients.conn(key).reads_lines() {
            return;
        }
        let conn = self.clients.conn(key);
        debug!("#{} sent EOF", conn.id);
        conn.set_input_done();
        self.clients.enter(key, Phase::Draining);
        self.close_if_drained(key);
    }

    /// A half-closed connection closes once nothing is queued for it and,
    /// in a cluster, no answer for its lines is still awaited (an answer
    /// for a line read before the EOF is still sent).
    ///
    /// A WebSocket client's Close is answered as soon as no answer is owed:
    /// the answer goes after what is queued.
    pub(super) fn close_if_drained(&mut self, key: usize) {
        let conn = self.clients.conn(key);
        let answer_close = conn.is_ws_close_received();
        if conn.phase() != Phase::Draining || conn.is_dead() {
            return;
        }
        if conn.pending_out() > 0 && !answer_close {
            return;
        }
        let slot = self.clients.slot(key);
        if self.cluster.as_ref().is_some_and(|c| c.owes(slot)) {
            return; // its answers come first
        }
        if answer_close {
            self.clients.answer_ws_close(key, &mut self.deadlines);
        } else {
            self.clients.kill(key);
        }
    }
}

/// What is left of a read once its lines are handled.
pub(super) enum Lines<'a> {
    /// An unterminated tail, kept for the next read.
    Tail(&'a [u8]),
    /// The connection waits for its claim: everything after the login line
    /// is kept, unread, until the answer.
    Kept(&'a [u8]),
    /// The connection stopped reading lines (closing or dead).
    Closed,
}

/// Keeps `text`, then `raw` (a WebSocket connection's incomplete frame),
/// as the connection's unread input, with its frame state `ws` (nothing to
/// keep: its buffer goes back to the pool).
pub(super) fn keep_input(
    conn: &mut Conn,
    pool: &mut BufPool,
    text: &[u8],
    raw: &[u8],
    ws: crate::ws::InState,
) {
    if text.is_empty() && raw.is_empty() && ws == crate::ws::InState::default() {
        pool.give(&mut conn.partial);
    } else {
        let partial = conn
            .partial
            .get_or_insert_with(|| pool.take(text.len() + raw.len()));
        partial.data.clear();
        partial.pos = 0;
        partial.data.extend_from_slice(text);
        partial.data.extend_from_slice(raw);
        partial.ws = crate::ws::InState {
            raw: raw.len() as u32,
            ..ws
        };
    }
}

impl Clients {
    /// After a read of `n` bytes (out of a turn's `budget`): whether to read
    /// on. At the budget, the connection goes on the come-back list; see
    /// [`Drain`] for when a short read ends it.
    pub(super) fn read_on(
        &mut self,
        key: usize,
        n: usize,
        budget: &mut usize,
        drain: Drain,
    ) -> bool {
        *budget = budget.saturating_sub(n);
        if *budget == 0 {
            if self.conn(key).mark_more_input() {
                self.more_input.push(key);
            }
            return false;
        }
        // Drained: anything arriving later raises a new edge.
        !(n < READ_CHUNK && drain == Drain::UntilShortRead)
    }

    /// Reads and drops input from a closing connection; EOF after the
    /// sending side is shut down, or too much input, ends it.
    pub(super) fn discard_input(&mut self, key: usize, scratch: &mut [u8]) {
        loop {
            let conn = self.conn(key);
            match conn.read(scratch) {
                Ok(0) => {
                    conn.set_input_done();
                    if conn.is_write_shut() {
                        self.kill(key);
                    }
                    break;
                }
                Ok(n) => {
                    conn.discarded = conn.discarded.saturating_add(n as u32);
                    let over = conn.discarded > LINGER_BYTES;
                    self.stats.bytes_in += n as u64;
                    if over {
                        self.kill(key);
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.kill(key);
                    break;
                }
            }
        }
    }
}
