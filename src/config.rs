//! The server's tunables, with the defaults documented in the README.

use std::time::Duration;

use crate::cluster::ClusterConfig;

/// Everything [`crate::run`] needs besides the listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Longest accepted line in bytes, terminator excluded.
    pub max_line: usize,
    /// Most bytes queued for one connection before it is closed as a slow
    /// consumer.
    pub max_outbound: usize,
    /// Most bytes all connections' queued output and kept input may hold
    /// together; `None` = a quarter of the machine's memory. Past it, the
    /// largest holders are closed as slow consumers.
    pub max_buffer_memory: Option<usize>,
    /// Most client connections at once; `None` = what the open-file limit
    /// allows. Lowered with a warning when the limit cannot fit it.
    pub max_clients: Option<usize>,
    /// Time allowed from accept to login; zero = never times out.
    pub login_timeout: Duration,
    /// Time a logged-in client may stay silent; zero = off.
    pub idle_timeout: Duration,
    /// How long a graceful shutdown may flush before closing everything.
    pub shutdown_timeout: Duration,
    /// Interval of the stats log line; zero = off.
    pub stats_interval: Duration,
    /// Cluster mode (`--cluster`): the Redis to share names through.
    pub cluster: Option<ClusterConfig>,
    /// `--ws-echo`: WebSocket messages are echoed back instead of routed
    /// (a testing aid for conformance suites such as Autobahn|Testsuite).
    pub ws_echo: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_line: 16 * 1024,
            max_outbound: 1024 * 1024,
            max_buffer_memory: None,
            max_clients: None,
            login_timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(5),
            stats_interval: Duration::ZERO,
            cluster: None,
            ws_echo: false,
        }
    }
}
