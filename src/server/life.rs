//! The server's life: its phases (one [`Life`] value), what each lets the
//! loop act on, the requests from outside that move it on (stop, upgrade,
//! stats, hang-up), and the start of a graceful shutdown. The steps of a
//! live upgrade are in `upgrade.rs`.

use log::{info, warn};

use super::upgrade::{self, Upgrading};
use super::{Server, broker, millis};
use crate::control::Exit;
use crate::deadlines::Deadline;

/// Where the server is in its life. Each phase holds what only it needs;
/// the loop asks the phase what to do with each kind of event.
pub(super) enum Life {
    /// Serving clients. `upgrade_asked`: a live upgrade starts at the end
    /// of this turn.
    Serving { upgrade_asked: bool },
    /// Cluster mode, before an upgrade hands over: the node waits for
    /// Redis's answers (at most `upgrade::QUIESCE_MS`; then what is still
    /// in flight fails as when the link resets, and it hands over at the
    /// end of the turn: `timed_out`). Clients are not read and nobody is
    /// accepted.
    Quiescing { step: u32, timed_out: bool },
    /// This is the old process of a live upgrade: the new one is starting.
    /// No client socket is touched; scrapers are still served. A stop asked
    /// for meanwhile is passed on to the new process (`stop_asked`), and
    /// this one shuts down instead if the new one fails.
    Upgrading {
        upgrade: Upgrading,
        step: u32,
        stop_asked: bool,
    },
    /// The new process (`pid`) serves what this one handed over: this one
    /// only finishes the scrapes it accepted (until `until_ms`, at most
    /// `upgrade::RETIRE_MS`), then exits. A stop asked for meanwhile is
    /// passed on to the new process (`stop_asked`: it was, once).
    Retiring {
        until_ms: u64,
        pid: u32,
        stop_asked: bool,
    },
    /// A graceful shutdown: clients get `error: shutting-down` and drain.
    /// It ends once none is left and, in a cluster, the farewell (names
    /// and lease dropped) is answered or cannot be sent; or at the
    /// shutdown deadline (`gave_up`).
    ShuttingDown { farewell_done: bool, gave_up: bool },
}

impl Server {
    /// Whether the server's life is over: a shutdown done or given up, or
    /// a retiring old process done with its scrapers.
    pub(super) fn has_ended(&mut self) -> Option<Exit> {
        match self.life {
            Life::ShuttingDown {
                farewell_done,
                gave_up,
            } if (self.clients.len() == 0 && farewell_done) || gave_up => {
                info!(
                    "shutdown complete; {} connection(s) closed before draining; {}",
                    self.clients.len(),
                    self.counters()
                );
                Some(Exit::Graceful)
            }
            Life::Retiring { until_ms, .. }
                if self.scrapers.as_ref().is_none_or(|s| s.len() == 0)
                    || self.deadlines.now_ms() >= until_ms =>
            {
                Some(Exit::Upgraded)
            }
            _ => None,
        }
    }

    /// Whether this process acts on its clients now (not while a live
    /// upgrade hands them over, nor once it did).
    pub(super) fn touches_clients(&self) -> bool {
        !matches!(self.life, Life::Upgrading { .. } | Life::Retiring { .. })
    }

    /// Whether client input is read and connections accepted now.
    pub(super) fn reads_clients(&self) -> bool {
        matches!(self.life, Life::Serving { .. } | Life::ShuttingDown { .. })
    }

    /// Acts on the [`Control`]'s new requests. Returns `Some(Exit::Forced)`
    /// on a second stop request.
    pub(super) fn on_requests(&mut self) -> Option<Exit> {
        let now = self.control.requests();
        let seen = std::mem::replace(&mut self.seen, now);
        for _ in seen.stats..now.stats {
            info!("stats: {}", self.counters());
        }
        if now.hangups > seen.hangups {
            info!("hang-up signal ignored (chatd keeps running; stop it with SIGTERM)");
        }
        if now.upgrades > seen.upgrades {
            match &mut self.life {
                Life::Serving { .. } if self.successor.is_none() => {
                    info!("upgrade refused: no binary to start (an embedded server)");
                }
                Life::Serving { upgrade_asked } => *upgrade_asked = true,
                Life::Quiescing { .. } | Life::Upgrading { .. } | Life::Retiring { .. } => {
                    info!("upgrade refused: one is under way");
                }
                Life::ShuttingDown { .. } => info!("upgrade refused: shutting down"),
            }
        }
        if now.stops > seen.stops {
            if now.stops >= 2 {
                if let Life::Upgrading { .. } = self.life {
                    self.abort_upgrade("a second shutdown request came");
                }
                warn!(
                    "second shutdown request: exiting at once; {}",
                    self.counters()
                );
                return Some(Exit::Forced);
            }
            match &mut self.life {
                Life::Upgrading {
                    stop_asked,
                    upgrade,
                    ..
                } => {
                    if !std::mem::replace(stop_asked, true) {
                        upgrade::pass_stop_on(upgrade.pid());
                    }
                }
                Life::Retiring {
                    stop_asked, pid, ..
                } => {
                    if !std::mem::replace(stop_asked, true) {
                        upgrade::pass_stop_on(*pid);
                    }
                }
                _ => {
                    info!(
                        "shutdown requested: closing {} connection(s)",
                        self.clients.len()
                    );
                    self.begin_shutdown();
                }
            }
        }
        None
    }

    /// Stops accepting and reading, queues `error: shutting-down` to every
    /// client and lets the loop flush until the shutdown deadline. A live
    /// upgrade asked for, or quiescing, does not start.
    pub(super) fn begin_shutdown(&mut self) {
        let timeout = millis(self.config.shutdown_timeout);
        self.deadlines.set(timeout, Deadline::ShutdownGiveUp);
        // The metrics endpoint stays while the clients drain: /healthz
        // then answers 503 `shutting down`, which load balancers want.
        self.housekeeping.stopping();
        self.clients
            .begin_shutdown(self.poll.registry(), &mut self.deadlines);
        let farewell_done = match &mut self.cluster {
            Some(cluster) => {
                // The names were released as their clients closed; now the
                // rest, and the lease, so that no key stays behind.
                broker::sync_cluster(&mut self.clients, cluster, &mut self.deadlines);
                !cluster.farewell()
            }
            None => true,
        };
        self.life = Life::ShuttingDown {
            farewell_done,
            gave_up: false,
        };
    }
}
