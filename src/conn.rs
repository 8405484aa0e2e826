//! One client connection: its socket, its buffers and its place in the
//! connection's life. It knows nothing of the protocol.

use std::io::{self, Read, Write};
use std::rc::Rc;

use mio::net::TcpStream;

use crate::pool::{Buf, BufPool};

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

/// A client connection. Idle ones own no buffers: `partial` and `out` are
/// `None` until needed and go back to the pool when empty. The fields are
/// sized for many idle connections (see the size test below and
/// BENCHMARKS.md); times and counters are `u32` with wrapping arithmetic.
#[derive(Debug)]
pub struct Conn {
    /// The socket, registered with the poller under the slab key.
    pub stream: TcpStream,
    /// Tells apart connections that reuse a slab key (timers carry it). It
    /// wraps after 2^32 connections, far beyond any timer's life.
    pub id: u32,
    /// When input last arrived, in ms since the server started (wrapping;
    /// compare with `wrapping_sub`).
    pub last_input_ms: u32,
    /// The number of the last message routed to this connection, so a
    /// recipient named twice in one line gets it once.
    pub route_mark: u32,
    /// Bytes discarded while lingering, bounded by the reactor.
    pub discarded: u32,
    /// Where the connection is in its life.
    pub phase: Phase,
    /// Bit set of the `PENDING_WRITE`, `MORE_INPUT`, ... flags above.
    pub flags: u8,
    /// The login name, shared with the registry; empty before login.
    pub name: Rc<str>,
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
            name: Rc::from(""),
            partial: None,
            out: None,
        }
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Bytes queued and not yet written.
    pub fn pending_out(&self) -> usize {
        self.out.as_ref().map_or(0, |out| out.len())
    }

    /// Appends `bytes` to the outbound buffer, taking one from the pool if
    /// there is none. The caller enforces `--max-outbound`.
    pub fn queue(&mut self, bytes: &[u8], pool: &mut BufPool) {
        let out = self.out.get_or_insert_with(|| pool.take(bytes.len()));
        if out.pos > 0 && out.data.len() + bytes.len() > out.data.capacity() {
            // Reclaim the written front before the buffer grows.
            out.data.drain(..out.pos);
            out.pos = 0;
        }
        out.data.extend_from_slice(bytes);
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
        let limit = if cfg!(debug_assertions) { 72 } else { 56 };
        assert!(
            size_of::<Conn>() <= limit,
            "Conn is {} bytes",
            size_of::<Conn>()
        );
        let entry = size_of::<Option<Conn>>();
        assert!(entry <= limit, "a slab entry is {entry} bytes");
    }
}
