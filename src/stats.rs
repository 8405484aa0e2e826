//! The server's counters, logged by `--stats-interval`, SIGUSR1 and at exit.

use std::fmt;

use crate::protocol::ErrorKind;

/// Every counter the server keeps. Plain integers: one thread owns them.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Open client connections, logged in or not (rejected ones excluded).
    pub connections: u64,
    /// The most `connections` seen at once.
    pub peak_connections: u64,
    /// Connections accepted, rejected ones included.
    pub accepted: u64,
    /// Connections turned away with `error: server-full`.
    pub rejected: u64,
    /// Successful logins.
    pub logins: u64,
    /// Message lines received from logged-in clients.
    pub messages_in: u64,
    /// `from ...` lines queued to recipients.
    pub deliveries: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Clients closed as slow consumers: their outbound buffer passed
    /// `--max-outbound`, or they held the most when all buffers together
    /// reached `--max-buffer-memory`.
    pub slow_consumers: u64,
    /// Connections whose queue was dropped to keep all buffers under
    /// `--max-buffer-memory`: closed as slow consumers (counted in
    /// `slow_consumers` too), or closing already.
    pub memory_evictions: u64,
    /// `error:` lines sent, indexed by `ErrorKind as usize`.
    pub errors: [u64; ErrorKind::ALL.len()],
}

impl Stats {
    /// Counts one more open client connection.
    pub fn opened(&mut self) {
        self.connections += 1;
        self.peak_connections = self.peak_connections.max(self.connections);
    }

    /// Counts one `error:` line of `kind`.
    pub fn error_sent(&mut self, kind: ErrorKind) {
        self.errors[kind as usize] += 1;
    }
}

impl fmt::Display for Stats {
    /// One line of `key=value` pairs, easy to grep and to parse.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections={} peak={} accepted={} rejected={} logins={} messages_in={} \
             deliveries={} bytes_in={} bytes_out={} slow_consumers={} memory_evictions={}",
            self.connections,
            self.peak_connections,
            self.accepted,
            self.rejected,
            self.logins,
            self.messages_in,
            self.deliveries,
            self.bytes_in,
            self.bytes_out,
            self.slow_consumers,
            self.memory_evictions,
        )?;
        for kind in ErrorKind::ALL {
            write!(f, " errors.{}={}", kind.label(), self.errors[kind as usize])?;
        }
        Ok(())
    }
}
