//! One client connection: its socket, its buffers and its place in the
//! connection's life. It knows nothing of the protocol.

use std::io::{self, Read, Write};

use mio::net::TcpStream;

use crate::pool::BufPool;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted; the first non-empty line will be its name.
    Login,
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

/// `Conn::flags`: the connection is on the reactor's pending-write list.
pub const PENDING_WRITE: u8 = 1 << 0;
/// `Conn::flags`: input may be left in the socket; on the come-back list.
pub const MORE_INPUT: u8 = 1 << 1;
/// `Conn::flags`: registered for writable events as well as readable.
pub const WRITABLE_ARMED: u8 = 1 << 2;
/// `Conn::flags`: its sending side was shut down (lingering close).
pub const WRITE_SHUT: u8 = 1 << 3;
/// `Conn::flags`: marked for removal by the reactor's reap step.
pub const DEAD: u8 = 1 << 4;
/// `Conn::flags`: a connection turned away with `server-full`.
pub const REJECTED: u8 = 1 << 5;
/// `Conn::flags`: the last write hit `WouldBlock`; a writable event will come.
pub const WRITE_BLOCKED: u8 = 1 << 6;
/// `Conn::flags`: EOF was read while closing.
pub const INPUT_DONE: u8 = 1 << 7;

/// A client connection. Idle ones own no buffers: both `Vec`s are
/// unallocated until needed and go back to the pool when empty.
#[derive(Debug)]
pub struct Conn {
    /// The socket, registered with the poller under the slab key.
    pub stream: TcpStream,
    /// Unique for the life of the server; slab keys are reused, ids never.
    pub id: u64,
    /// Where the connection is in its life.
    pub phase: Phase,
    /// Bit set of the `PENDING_WRITE`, `MORE_INPUT`, ... flags above.
    pub flags: u8,
    /// The login name; empty before login.
    pub name: Box<str>,
    /// The unterminated tail of the input, kept between reads.
    pub partial: Vec<u8>,
    /// Bytes queued for the client; `out[out_pos..]` is still unwritten.
    pub out: Vec<u8>,
    /// How much of `out` was written already.
    pub out_pos: usize,
    /// When input last arrived, in ms since the server started.
    pub last_input_ms: u64,
    /// The sequence number of the last message routed to this connection, so
    /// a recipient named twice in one line gets it once.
    pub route_mark: u64,
    /// Bytes discarded while lingering, bounded by the reactor.
    pub discarded: usize,
}

impl Conn {
    /// A new connection in the login phase.
    pub fn new(stream: TcpStream, id: u64, now_ms: u64) -> Conn {
        Conn {
            stream,
            id,
            phase: Phase::Login,
            flags: 0,
            name: Box::default(),
            partial: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            last_input_ms: now_ms,
            route_mark: 0,
            discarded: 0,
        }
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Bytes queued and not yet written.
    pub fn pending_out(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Appends `bytes` to the outbound buffer, taking one from the pool if
    /// there is none. The caller enforces `--max-outbound`.
    pub fn queue(&mut self, bytes: &[u8], pool: &mut BufPool) {
        if self.out.capacity() == 0 {
            self.out = pool.take(bytes.len());
        } else if self.out_pos > 0 && self.out.len() + bytes.len() > self.out.capacity() {
            // Reclaim the written front before the buffer grows.
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
    }

    /// Writes queued output until it is all written or the socket is full.
    /// Returns the bytes written and whether the buffer drained; a drained
    /// buffer goes back to the pool.
    pub fn flush(&mut self, pool: &mut BufPool) -> io::Result<(usize, bool)> {
        let mut written = 0;
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((written, false)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.release_out(pool);
        Ok((written, true))
    }

    /// Drops any queued output and returns both buffers to the pool.
    pub fn release_buffers(&mut self, pool: &mut BufPool) {
        self.release_out(pool);
        pool.give(&mut self.partial);
    }

    fn release_out(&mut self, pool: &mut BufPool) {
        pool.give(&mut self.out);
        self.out_pos = 0;
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
