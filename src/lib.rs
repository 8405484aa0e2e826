//! chatd: a lean chat broker daemon that holds very many TCP connections on
//! one thread.
//!
//! Clients connect, send their name as the first line, then lines like
//! `alice, bob: hello`; each named recipient who is online receives
//! `from carol: hello`. The protocol is the async-std / tokio tutorial chat
//! server's, with its holes fixed (see `SPEC.md` and the README).
//!
//! # Layout
//!
//! - [`server`]: the reactor. One `mio::Poll` loop owns a `slab` of
//!   connections: the loop, timers, signals and reaping in `server/mod.rs`,
//!   then `accept.rs`, `input.rs` (read path), `route.rs` (login, routing,
//!   error lines) and `output.rs` (write path).
//! - [`conn`]: one connection: its socket, buffers and phase. No protocol.
//! - [`protocol`]: the wire protocol as pure functions over byte slices.
//! - [`registry`]: which logged-in connection holds which name. No sockets.
//! - [`pool`]: the buffer pool, so idle connections own no buffers.
//! - [`timers`]: login, idle and close deadlines, a min-heap per kind.
//! - [`stats`]: the counters.
//! - [`metrics`]: the optional HTTP endpoint (`/metrics`, `/healthz`).
//! - [`config`]: the tunables and their defaults.
//! - `main.rs` (the `chatd` binary): flags and environment to a [`Config`].
//!
//! # How a line travels
//!
//! A readable event makes the reactor read into one shared scratch buffer,
//! after the connection's unterminated tail from earlier reads (the only input
//! a connection keeps, in a pooled buffer, while a line is incomplete).
//! [`protocol::next_line`] frames lines in place; a message line is split by
//! [`protocol::parse_message`], and `from <sender>: <body>\n` is formatted
//! once and appended to each online recipient's outbound buffer, found through
//! the [`registry`]. Routing never writes to a socket: recipients go on a
//! pending-write list, and at the end of the loop turn each is written once.
//! A socket that does not take everything gets writable interest and waits
//! for its event. A connection that breaks a limit is closed alone, with an
//! `error:` line.

#![deny(unsafe_code)]

pub mod config;
pub mod conn;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod stats;
pub mod timers;

pub use config::Config;
pub use server::{Exit, run, run_with_metrics};

use std::io;
use std::net::SocketAddr;

/// Binds a listening socket on `addr` with SO_REUSEADDR and a listen backlog
/// of `backlog` (the kernel caps it at `net.core.somaxconn`).
pub fn bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}
