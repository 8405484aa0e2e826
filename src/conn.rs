//! One client connection: its socket, its buffers and where it is in its
//! life. It knows nothing of the protocol.
//!
//! The phase and the flags are private: the reactor moves a connection on
//! through the methods below, which keep the rules in one place (a
//! connection is on the pending-write list at most once, writable interest
//! is armed once, a deadline applies only in its phase).

use compact_str::CompactString;
use mio::net::TcpStream;
use std::io::{self, Read, Write};

use crate::deadlines::Deadline;
use crate::pool::{Buf, BufPool};

/// A handle on a connection that outlives a turn (a deadline, an answer
/// from Redis, a held line): its slab key and its id. Slab keys are
/// reused, so whoever holds one checks that the id still matches
/// (`Clients::find`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The slab key.
    pub key: u32,
    /// The connection's id, which tells apart connections that reuse a key.
    pub id: u32,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; the first non-empty line will be its name.
    Login,
    /// Cluster mode: its name is reserved here and being claimed in Redis.
    /// Its input waits (unread, or kept) until the claim is answered.
    Claiming,
    /// Logged in and registered under its name.
    Chat,
    /// The client sent EOF: its input is done, its name released, and what is
    /// queued for it is still being written before the close.
    Draining,
    /// An `error:` line that ends the connection is queued. Input is
    /// discarded; once the output is flushed the sending side is shut down,
    /// and the connection lingers until EOF or its grace runs out.
    Closing,
}

/// On the reactor's pending-write list.
const PENDING_WRITE: u16 = 1 << 0;
/// Input may be left in the socket; on the come-back list.
const MORE_INPUT: u16 = 1 << 1;
/// Registered for writable events as well as readable.
const WRITABLE_ARMED: u16 = 1 << 2;
/// Its sending side was shut down (lingering close).
const WRITE_SHUT: u16 = 1 << 3;
/// Marked for removal by the reactor's reap step.
const DEAD: u16 = 1 << 4;
/// Turned away with `server-full`.
const REJECTED: u16 = 1 << 5;
/// The last write hit `WouldBlock`; a writable event will come.
const WRITE_BLOCKED: u16 = 1 << 6;
/// The client's input ended: EOF was read (while draining after the
/// client half-closed, or while lingering after an error line).
const INPUT_DONE: u16 = 1 << 7;
/// Accepted on the WebSocket listener.
const WS: u16 = 1 << 8;
/// A WebSocket connection past its handshake: its output is framed.
const WS_OPEN: u16 = 1 << 9;
/// A WebSocket client sent its Close frame: answered once what is queued
/// for it (and, in a cluster, owed to it) is written.
const WS_CLOSE_RECEIVED: u16 = 1 << 10;

/// A client connection. Idle ones own no buffers: `partial` and `out` are
/// `None` until needed and go back to the pool when empty. The fields are
/// sized for many idle connections (see the size test below and
/// BENCHMARKS.md); times and counters are `u32` with wrapping arithmetic.
#[derive(Debug)]
pub struct Conn {
    /// The socket, registered with the poller under the slab key.
    pub stream: TcpStream,
    /// Tells apart connections that reuse a slab key (deadlines carry it).
    /// It wraps after 2^32 connections, far beyond any deadline's life.
    pub id: u32,
    /// When input last arrived, in ms since the server started (wrapping;
    /// compare with `wrapping_sub`).
    pub last_input_ms: u32,
    /// The number of the last message routed to this connection, so a
    /// recipient named twice in one line gets it once.
    pub route_mark: u32,
    /// Bytes discarded while lingering, bounded by the reactor. (While a
    /// WebSocket connection drains after the client's Close, the close code
    /// to answer with: it lingers only after that.)
    pub discarded: u32,
    /// Where the connection is in its life.
    phase: Phase,
    /// Bit set of the `PENDING_WRITE`, `MORE_INPUT`, ... flags above.
    flags: u16,
    /// The login name, empty before login. Inline up to 24 bytes (longer
    /// ones, up to `NAME_MAX`, on the heap); the name index holds only the
    /// slab key and reads the name here.
    pub name: CompactString,
    /// The unterminated tail of the input, kept between reads.
    pub partial: Option<Box<Buf>>,
    /// Bytes queued for the client and not yet written.
    pub out: Option<Box<Buf>>,
}

impl Conn {
    /// A new connection in the login phase.
    pub fn new(stream: TcpStream, id: u32, now_ms: u32) -> Conn {
        Conn {
            stream,
            id,
            last_input_ms: now_ms,
            route_mark: 0,
            discarded: 0,
            phase: Phase::Login,
            flags: 0,
            name: CompactString::const_new(""),
            partial: None,
            out: None,
        }
    }

    /// A connection accepted on the WebSocket listener, before its
    /// handshake (in the login phase: the handshake counts as logging in).
    pub fn new_websocket(stream: TcpStream, id: u32, now_ms: u32) -> Conn {
        let mut conn = Conn::new(stream, id, now_ms);
        conn.flags |= WS;
        conn
    }

    /// A connection handed over by a live upgrade, in `phase`, with the
    /// flags it had (see `crate::handoff`).
    pub fn restore(
        stream: TcpStream,
        id: u32,
        last_input_ms: u32,
        phase: Phase,
        flags: &crate::handoff::ConnFlags,
    ) -> Conn {
        let mut conn = Conn::new(stream, id, last_input_ms);
        conn.phase = phase;
        for (set, flag) in [
            (flags.write_shut, WRITE_SHUT),
            (flags.input_done, INPUT_DONE),
            (flags.rejected, REJECTED),
            (flags.websocket, WS),
            (flags.ws_open, WS_OPEN),
            (flags.ws_close_received, WS_CLOSE_RECEIVED),
        ] {
            if set {
                conn.flags |= flag;
            }
        }
        conn
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Moves to `phase`. Returns whether the connection held a name until
    /// now, which the caller must release: a name is registered exactly
    /// while its connection is in [`Phase::Claiming`] or [`Phase::Chat`].
    #[must_use = "a name held until now must be released"]
    pub fn enter(&mut self, phase: Phase) -> bool {
        let holds = |phase| matches!(phase, Phase::Claiming | Phase::Chat);
        let held = holds(self.phase) && !holds(phase);
        self.phase = phase;
        held
    }

    /// Whether lines are read and handled (logging in or chatting, not dead).
    pub fn reads_lines(&self) -> bool {
        matches!(self.phase, Phase::Login | Phase::Chat) && !self.is_dead()
    }

    /// Whether the reactor will remove it at the end of the turn.
    pub fn is_dead(&self) -> bool {
        self.has(DEAD)
    }

    /// Marks it for removal and moves it to [`Phase::Closing`]. Returns
    /// whether it was alive (then it must go on the reap list) and whether
    /// it held a name (then that must be released).
    pub fn mark_dead(&mut self) -> (bool, bool) {
        if self.is_dead() {
            return (false, false);
        }
        self.flags |= DEAD;
        (true, self.enter(Phase::Closing))
    }

    /// Whether `deadline` still applies to this connection: a login
    /// deadline before login, an idle one while it has not closed, a close
    /// grace while closing; nothing once dead.
    pub fn deadline_applies(&self, deadline: Deadline) -> bool {
        !self.is_dead()
            && matches!(
                (deadline, self.phase),
                (Deadline::Login(_), Phase::Login | Phase::Claiming)
                    | (Deadline::Idle(_), Phase::Chat | Phase::Draining)
                    | (Deadline::Close(_), Phase::Closing)
            )
    }

    /// Output was queued: returns whether it must go on the pending-write
    /// list now (not already there, not waiting for a writable event, alive).
    pub fn wants_flush(&mut self) -> bool {
        if self.flags & (PENDING_WRITE | WRITE_BLOCKED | DEAD) != 0 {
            return false;
        }
        self.flags |= PENDING_WRITE;
        true
    }

    /// Taken off the pending-write list: returns whether to write it.
    pub fn take_pending(&mut self) -> bool {
        self.flags &= !PENDING_WRITE;
        !self.is_dead()
    }

    /// The socket took less than was queued. Returns whether writable
    /// interest must be armed now (the first time; it stays armed after).
    pub fn write_blocked(&mut self) -> bool {
        self.flags |= WRITE_BLOCKED;
        if self.has(WRITABLE_ARMED) {
            return false;
        }
        self.flags |= WRITABLE_ARMED;
        true
    }

    /// A writable event: the socket takes bytes again. Returns whether
    /// output is waiting.
    pub fn on_writable(&mut self) -> bool {
        self.flags &= !WRITE_BLOCKED;
        self.pending_out() > 0
    }

    /// Input was left in the socket at the read budget: returns whether it
    /// must go on the come-back list (it is not there yet).
    pub fn mark_more_input(&mut self) -> bool {
        let first = !self.has(MORE_INPUT);
        self.flags |= MORE_INPUT;
        first
    }

    /// Taken off the come-back list: returns whether to read it.
    pub fn take_more_input(&mut self) -> bool {
        let more = self.has(MORE_INPUT);
        self.flags &= !MORE_INPUT;
        more && !self.is_dead()
    }

    /// Shuts down the sending side, once. Returns whether it did now.
    pub fn shut_write(&mut self) -> bool {
        if self.has(WRITE_SHUT) {
            return false;
        }
        self.flags |= WRITE_SHUT;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        true
    }

    /// Whether the sending side is shut down.
    pub fn is_write_shut(&self) -> bool {
        self.has(WRITE_SHUT)
    }

    /// EOF was read: the client's input ended.
    pub fn set_input_done(&mut self) {
        self.flags |= INPUT_DONE;
    }

    /// Whether EOF was read.
    pub fn is_input_done(&self) -> bool {
        self.has(INPUT_DONE)
    }

    /// Marks it as turned away with `server-full` (it is not counted as a
    /// client).
    pub fn reject(&mut self) {
        self.flags |= REJECTED;
    }

    /// Whether it was turned away with `server-full`.
    pub fn is_rejected(&self) -> bool {
        self.has(REJECTED)
    }

    /// Whether it was accepted on the WebSocket listener.
    pub fn is_websocket(&self) -> bool {
        self.has(WS)
    }

    /// Whether it is a WebSocket connection past its handshake (its output
    /// is framed).
    pub fn is_ws_open(&self) -> bool {
        self.has(WS_OPEN)
    }

    /// The handshake was answered with `101`: from now on it speaks frames.
    pub fn set_ws_open(&mut self) {
        self.flags |= WS_OPEN;
    }

    /// Whether the client's Close frame came and waits for its answer.
    pub fn is_ws_close_received(&self) -> bool {
        self.has(WS_CLOSE_RECEIVED)
    }

    /// The client's Close frame came, with `code` to answer with.
    pub fn set_ws_close_received(&mut self, code: u16) {
        self.flags |= WS_CLOSE_RECEIVED;
        self.discarded = u32::from(code);
    }

    /// The state a live upgrade hands over besides the phase.
    pub fn handoff_flags(&self) -> crate::handoff::ConnFlags {
        crate::handoff::ConnFlags {
            write_shut: self.is_write_shut(),
            input_done: self.is_input_done(),
            rejected: self.is_rejected(),
            websocket: self.is_websocket(),
            ws_open: self.is_ws_open(),
            ws_close_received: self.is_ws_close_received(),
        }
    }

    /// Bytes of buffer memory it holds: the capacity of its outbound buffer
    /// and of its kept input (what `--max-buffer-memory` bounds).
    pub fn footprint(&self) -> usize {
        let capacity = |buf: &Option<Box<Buf>>| buf.as_ref().map_or(0, |b| b.data.capacity());
        capacity(&self.out) + capacity(&self.partial)
    }

    /// Bytes queued and not yet written.
    pub fn pending_out(&self) -> usize {
        self.out.as_ref().map_or(0, |out| out.len())
    }

    /// Appends `lines` (each ending in `\n`) to the outbound buffer, taking
    /// one from the pool if there is none; a WebSocket connection gets each
    /// line as one text message. The caller enforces `--max-outbound`.
    pub fn queue(&mut self, lines: &[u8], pool: &mut BufPool) {
        if self.is_ws_open() {
            // One line's header takes at most 4 bytes below 64 KiB (more
            // lines, or longer, grow the buffer as they are written).
            crate::ws::write_lines(self.room(lines.len() + 4, pool), lines);
        } else {
            self.room(lines.len(), pool).extend_from_slice(lines);
        }
    }

    /// Appends bytes as they are: WebSocket control frames, or (`http`)
    /// the handshake's answer, which the frames that follow come after.
    pub fn queue_raw(&mut self, bytes: &[u8], http: bool, pool: &mut BufPool) {
        self.room(bytes.len(), pool).extend_from_slice(bytes);
        if http {
            let out = self.out.as_mut().expect("room made");
            out.mark = out.data.len();
        }
    }

    /// Appends one WebSocket frame (a pong, a Close, an echo).
    pub fn queue_frame(&mut self, opcode: u8, fin: bool, payload: &[u8], pool: &mut BufPool) {
        let out = self.room(payload.len() + 10, pool);
        crate::ws::write_frame(out, opcode, fin, payload);
    }

    /// The outbound buffer, with its written front reclaimed if `len` more
    /// bytes would make it grow.
    fn room(&mut self, len: usize, pool: &mut BufPool) -> &mut Vec<u8> {
        let frames = self.is_ws_open();
        let out = self.out.get_or_insert_with(|| pool.take(len));
        if out.pos > 0 && out.data.len() + len > out.data.capacity() {
            out.reclaim(frames);
        }
        &mut out.data
    }

    /// Writes queued output until it is all written or the socket is full.
    /// Returns the bytes written and whether the buffer drained; a drained
    /// buffer goes back to the pool.
    pub fn flush(&mut self, pool: &mut BufPool) -> io::Result<(usize, bool)> {
        let mut written = 0;
        if let Some(out) = &mut self.out {
            while !out.is_empty() {
                match self.stream.write(&out.data[out.pos..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        out.pos += n;
                        written += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok((written, false));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        pool.give(&mut self.out);
        Ok((written, true))
    }

    /// Drops any queued output and input and returns both buffers to the pool.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        pool.give(&mut self.out);
        pool.give(&mut self.partial);
    }

    /// Reads into `buf`, retrying on `Interrupted`.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Every idle connection costs this much slab memory: keep it small
    /// (BENCHMARKS.md breaks down the bytes per connection). mio adds a
    /// selector id to each socket in debug builds, hence two bounds.
    #[test]
    fn connection_stays_small() {
        // 64 in release: the name is inline (24 bytes, where a shared
        // `Rc<str>` took 16 here and a 32-48 byte chunk on the heap).
        let limit = if cfg!(debug_assertions) { 80 } else { 64 };
        assert!(
            size_of::<Conn>() <= limit,
            "Conn is {} bytes",
            size_of::<Conn>()
        );
        let entry = size_of::<Option<Conn>>();
        assert!(entry <= limit, "a slab entry is {entry} bytes");
    }
}
