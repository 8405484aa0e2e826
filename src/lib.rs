//! chatd: a lean chat broker daemon that holds very many TCP connections on
//! one thread.
//!
//! Clients connect, send their name as the first line, then lines like
//! `alice, bob: hello`; each named recipient who is online receives
//! `from carol: hello`. The protocol is that of the async-std / tokio
//! tutorial chat server, with its holes fixed; `docs/PROTOCOL.md` is the
//! reference.
//!
//! # Layout
//!
//! - [`run`] / [`run_with`] (`server/`): the reactor. One `mio::Poll` loop,
//!   split by responsibility: `server/mod.rs` has the loop, one turn as
//!   named phases, dispatching by poll token; `life.rs` the server's life
//!   (one `Life` value: serving, quiescing, upgrading, retiring, shutting
//!   down) and the requests that move it;
//!   `clients.rs` is the connection table (slab, name index, pool, each
//!   connection's life), with its read path in `input.rs` and its write
//!   path in `output.rs`; `broker.rs` is what a line means (login,
//!   routing, `error:` lines); `held.rs` holds every line that waits for
//!   Redis (cluster flow control, in the one buffer account);
//!   `housekeeping.rs` keeps memory and stale deadlines bounded and reports
//!   stats and status; `scrapers.rs` serves the metrics endpoint's
//!   connections; `remote.rs` applies what the cluster link learned and
//!   fences; `upgrade.rs` is a live upgrade's side of the loop, in the old
//!   process and in the new one; `websocket.rs` the WebSocket transport's
//!   side (handshake, frames into lines, pongs, closing with a code).
//! - [`cluster`]: cluster mode: the link to Redis (one more source in the
//!   loop), the lease and fencing; `link.rs` its I/O, `replies.rs` what
//!   each reply does, `pending.rs` the FIFO's entries and the answers,
//!   `codec.rs` adapts the RESP3 crate and bounds what Redis may send,
//!   `scripts.rs` holds the Lua scripts, `tests.rs` tests the link's logic
//!   without a socket. `docs/CLUSTER.md` is the design.
//! - [`handoff`]: what one process hands the next in a live upgrade: the
//!   state format, the descriptor plumbing, the binary that comes next.
//! - [`control`]: steering a running server from outside its loop: the
//!   [`Control`] stop handle, the [`Notifier`] it reports to, [`Exit`].
//! - `conn`: one connection: its socket, buffers, phase and flags, and
//!   the transitions between phases; `Slot`, a handle on it that outlives
//!   a turn. No protocol.
//! - `deadlines`: every deadline in one min-heap, keyed by what it is for.
//! - [`ws`]: WebSocket (RFC 6455) as pure functions: the handshake, client
//!   frames decoded in place into lines, the server's frames; the
//!   reactor's side is `server/websocket.rs`.
//! - [`protocol`]: the wire protocol as pure functions over byte slices.
//! - [`names`]: which connection holds which name. No sockets.
//! - `pool`: the buffer pool, so idle connections own no buffers.
//! - [`stats`]: the counters, and the one table of them everyone reads.
//! - `metrics`: the optional HTTP endpoint (`/metrics`, `/healthz`).
//! - [`config`]: the tunables and their defaults.
//! - `main.rs` (the `chatd` binary): flags and environment to a [`Config`];
//!   it also owns everything process-wide: signal handlers, the open-file
//!   limit, the pid file, the logger and systemd notifications. The
//!   library touches none of them.
//!
//! # How a line travels
//!
//! A readable event makes the reactor read into one shared scratch buffer,
//! after the connection's unterminated tail from earlier reads (the only input
//! a connection keeps, in a pooled buffer, while a line is incomplete).
//! [`protocol::next_line`] frames lines in place; the broker splits a
//! message line with [`protocol::parse_message`], formats
//! `from <sender>: <body>\n` once and appends it to each online recipient's
//! outbound buffer, found through the name index. Routing never writes to a
//! socket: recipients go on a pending-write list, and at the end of the loop
//! turn each is written once. A socket that does not take everything gets
//! writable interest and waits for its event. A connection that breaks a
//! limit is closed alone, with an `error:` line.

pub mod cluster;
pub mod config;
pub(crate) mod conn;
pub mod control;
pub(crate) mod deadlines;
pub mod handoff;
pub(crate) mod metrics;
pub mod names;
pub(crate) mod pool;
pub mod protocol;
pub mod server;
pub mod stats;
pub mod ws;

pub use config::Config;
pub use control::{Control, Exit, Notifier};
pub use server::{Extras, run, run_with};

use std::io;
use std::net::SocketAddr;

/// Binds a listening socket on `addr` with SO_REUSEADDR and a listen backlog
/// of `backlog` (the kernel caps it at `net.core.somaxconn`).
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    bind_with(addr, backlog, false)
}

/// [`bind`], with SO_REUSEPORT when `reuse_port`: then several processes
/// can listen on one port and the kernel spreads connections over them.
pub fn bind_with(
    addr: SocketAddr,
    backlog: i32,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}
