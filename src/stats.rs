//! The server's counters, logged by `--stats-interval`, SIGUSR1 and at exit,
//! served as metrics and carried across a live upgrade: [`COUNTERS`] is the
//! one table of them that all three read.

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
    /// Connections accepted on the WebSocket listener (in `accepted` too).
    pub ws_accepted: u64,
    /// WebSocket handshakes answered with `101`.
    pub ws_handshakes: u64,
    /// Web client pages served (`GET /` on the WebSocket listener).
    pub ws_pages: u64,
    /// WebSocket pings answered.
    pub ws_pings: u64,
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

/// A counter's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A total that only grows.
    Counter,
}

/// One counter, as everyone who shows or carries the counters reads it:
/// the stats line and the upgrade state (by `name`), the metrics endpoint
/// (by `metric`, `kind` and `help`). A new counter is a new entry here.
pub struct Counter {
    /// Its name in the stats line (`name=value`) and in an upgrade's state.
    pub name: &'static str,
    /// Its Prometheus name.
    pub metric: &'static str,
    /// Its Prometheus type.
    pub kind: Kind,
    /// Its Prometheus help text.
    pub help: &'static str,
    /// Where it lives in [`Stats`].
    pub field: fn(&mut Stats) -> &mut u64,
}

/// Every counter of [`Stats`] but the `error:` lines by kind (see
/// [`Stats::each`]), in the order they are shown.
pub const COUNTERS: &[Counter] = &[
    Counter {
        name: "connections",
        metric: "chatd_connections",
        kind: Kind::Gauge,
        help: "Open client connections.",
        field: |s| &mut s.connections,
    },
    Counter {
        name: "peak",
        metric: "chatd_connections_peak",
        kind: Kind::Gauge,
        help: "Most client connections open at once.",
        field: |s| &mut s.peak_connections,
    },
    Counter {
        name: "accepted",
        metric: "chatd_accepted_total",
        kind: Kind::Counter,
        help: "Connections accepted, rejected ones included.",
        field: |s| &mut s.accepted,
    },
    Counter {
        name: "rejected",
        metric: "chatd_rejected_total",
        kind: Kind::Counter,
        help: "Connections turned away with server-full.",
        field: |s| &mut s.rejected,
    },
    Counter {
        name: "logins",
        metric: "chatd_logins_total",
        kind: Kind::Counter,
        help: "Successful logins.",
        field: |s| &mut s.logins,
    },
    Counter {
        name: "messages_in",
        metric: "chatd_messages_received_total",
        kind: Kind::Counter,
        help: "Message lines received from logged-in clients.",
        field: |s| &mut s.messages_in,
    },
    Counter {
        name: "deliveries",
        metric: "chatd_deliveries_total",
        kind: Kind::Counter,
        help: "Lines queued to recipients.",
        field: |s| &mut s.deliveries,
    },
    Counter {
        name: "bytes_in",
        metric: "chatd_received_bytes_total",
        kind: Kind::Counter,
        help: "Bytes read from clients.",
        field: |s| &mut s.bytes_in,
    },
    Counter {
        name: "bytes_out",
        metric: "chatd_sent_bytes_total",
        kind: Kind::Counter,
        help: "Bytes written to clients.",
        field: |s| &mut s.bytes_out,
    },
    Counter {
        name: "slow_consumers",
        metric: "chatd_slow_consumers_total",
        kind: Kind::Counter,
        help: "Clients closed as slow consumers (--max-outbound or --max-buffer-memory).",
        field: |s| &mut s.slow_consumers,
    },
    Counter {
        name: "memory_evictions",
        metric: "chatd_memory_evictions_total",
        kind: Kind::Counter,
        help: "Clients closed because all buffers together reached --max-buffer-memory.",
        field: |s| &mut s.memory_evictions,
    },
    Counter {
        name: "ws_accepted",
        metric: "chatd_ws_accepted_total",
        kind: Kind::Counter,
        help: "Connections accepted on the WebSocket listener.",
        field: |s| &mut s.ws_accepted,
    },
    Counter {
        name: "ws_handshakes",
        metric: "chatd_ws_handshakes_total",
        kind: Kind::Counter,
        help: "WebSocket handshakes answered with 101 Switching Protocols.",
        field: |s| &mut s.ws_handshakes,
    },
    Counter {
        name: "ws_pages",
        metric: "chatd_ws_pages_total",
        kind: Kind::Counter,
        help: "Web client pages served on the WebSocket listener.",
        field: |s| &mut s.ws_pages,
    },
    Counter {
        name: "ws_pings",
        metric: "chatd_ws_pings_total",
        kind: Kind::Counter,
        help: "WebSocket pings answered.",
        field: |s| &mut s.ws_pings,
    },
];

impl Stats {
    /// Every counter by its name in the stats line, the `error:` lines as
    /// `errors.<kind>`, in the order they are shown.
    pub fn each(&self) -> Vec<(String, u64)> {
        let mut copy = self.clone();
        let mut all: Vec<(String, u64)> = COUNTERS
            .iter()
            .map(|c| (c.name.to_string(), *(c.field)(&mut copy)))
            .collect();
        for kind in ErrorKind::ALL {
            let name = format!("errors.{}", kind.label());
            all.push((name, self.errors[kind as usize]));
        }
        all
    }

    /// Sets the counter called `name` (as [`Stats::each`] names it);
    /// false for a name this binary does not know.
    pub fn set(&mut self, name: &str, value: u64) -> bool {
        if let Some(c) = COUNTERS.iter().find(|c| c.name == name) {
            *(c.field)(self) = value;
            return true;
        }
        let kind = name.strip_prefix("errors.");
        match ErrorKind::ALL.iter().find(|k| Some(k.label()) == kind) {
            Some(&kind) => {
                self.errors[kind as usize] = value;
                true
            }
            None => false,
        }
    }
}

impl fmt::Display for Stats {
    /// One line of `key=value` pairs, easy to grep and to parse.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.each().into_iter().enumerate() {
            let separator = if i > 0 { " " } else { "" };
            write!(f, "{separator}{name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counter comes back by its name, and the line names each once.
    #[test]
    fn every_counter_comes_back_by_name() {
        let mut stats = Stats::default();
        for (i, c) in COUNTERS.iter().enumerate() {
            *(c.field)(&mut stats) = i as u64 + 1;
        }
        stats.error_sent(ErrorKind::NotOnline);
        let mut back = Stats::default();
        for (name, value) in stats.each() {
            assert!(back.set(&name, value), "{name}");
        }
        assert_eq!(back.to_string(), stats.to_string());
        assert!(!back.set("no-such-counter", 1));
        let line = stats.to_string();
        assert!(
            line.starts_with("connections=1 peak=2 accepted=3 "),
            "{line}"
        );
        assert!(line.contains(" errors.not-online=1 "), "{line}");
        let mut names: Vec<String> = stats.each().into_iter().map(|(n, _)| n).collect();
        names.dedup();
        assert_eq!(names.len(), COUNTERS.len() + ErrorKind::ALL.len());
    }
}
