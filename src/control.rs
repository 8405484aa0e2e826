//! How a running server is steered from outside its loop: the [`Control`]
//! handle (stop it, ask for its counters), the [`Notifier`] it reports its
//! state to, and how [`crate::run`] ended ([`Exit`]).
//!
//! The library changes no process-wide state: it installs no signal
//! handler, does not touch the open-file limit and speaks to no service
//! manager. The `chatd` binary does those things and steers the server
//! through these types, as any program embedding it (or a test) can.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A handle on one run of the server, cheap to clone and usable from any
/// thread, and from a signal handler: every method only adds to a counter
/// and writes to an eventfd (`mio::Waker`), which is async-signal-safe.
///
/// Requests are counted, not flagged, so two stop requests back to back are
/// two requests: the first starts a graceful shutdown, the second ends the
/// run at once with [`Exit::Forced`].
#[derive(Debug, Clone, Default)]
pub struct Control {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Stop requests so far.
    stops: AtomicU32,
    /// Requests to log the counters so far.
    stats: AtomicU32,
    /// Hang-ups (SIGHUP) so far: logged and otherwise ignored.
    hangups: AtomicU32,
    /// Upgrade requests (SIGUSR2) so far.
    upgrades: AtomicU32,
    /// Wakes the loop; set once the loop runs.
    waker: OnceLock<mio::Waker>,
}

/// The requests made since the loop last looked: counts, so none is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Requests {
    /// Stop requests in total.
    pub stops: u32,
    /// Stats requests in total.
    pub stats: u32,
    /// Hang-ups in total.
    pub hangups: u32,
    /// Upgrade requests in total.
    pub upgrades: u32,
}

impl Control {
    /// A handle for one run of the server.
    pub fn new() -> Control {
        Control::default()
    }

    /// Asks the server to shut down gracefully; asked a second time, to stop
    /// at once. Safe to call from a signal handler.
    pub fn stop(&self) {
        self.request(&self.shared.stops);
    }

    /// Asks the server to log its counters. Safe to call from a signal handler.
    pub fn log_stats(&self) {
        self.request(&self.shared.stats);
    }

    /// Tells the server a hang-up signal arrived: it logs that it ignores
    /// it. Safe to call from a signal handler.
    pub fn hang_up(&self) {
        self.request(&self.shared.hangups);
    }

    /// Asks the server to hand every connection to the binary now at its
    /// path (see `crate::handoff`). Safe to call from a signal handler.
    pub fn upgrade(&self) {
        self.request(&self.shared.upgrades);
    }

    fn request(&self, counter: &AtomicU32) {
        counter.fetch_add(1, Ordering::SeqCst);
        if let Some(waker) = self.shared.waker.get() {
            let _ = waker.wake();
        }
    }

    /// Connects the handle to the loop that owns `registry`. Fails if this
    /// handle already served another run: a handle steers one run.
    pub(crate) fn attach(&self, waker: mio::Waker) -> std::io::Result<()> {
        self.shared.waker.set(waker).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "this Control already steered a run; make a new one",
            )
        })
    }

    /// Every request made so far.
    pub(crate) fn requests(&self) -> Requests {
        Requests {
            stops: self.shared.stops.load(Ordering::SeqCst),
            stats: self.shared.stats.load(Ordering::SeqCst),
            hangups: self.shared.hangups.load(Ordering::SeqCst),
            upgrades: self.shared.upgrades.load(Ordering::SeqCst),
        }
    }
}

/// What the server tells the program around it about its state: the
/// `chatd` binary passes these on to systemd (`Type=notify`). Every method
/// has a default that does nothing.
pub trait Notifier {
    /// The server listens and serves; `status` is its first status line.
    fn ready(&mut self, _status: &str) {}
    /// How often [`Notifier::status`] is wanted; `None`: never.
    fn status_interval_ms(&self) -> Option<u64> {
        None
    }
    /// A one-line summary of the server's state.
    fn status(&mut self, _line: &str) {}
    /// A graceful shutdown has begun.
    fn stopping(&mut self) {}
    /// A live upgrade succeeded: the process `new_pid` serves now. The old
    /// process says so once the new one is ready and before it exits, so
    /// that whoever tracks the serving process (a pid file, systemd's
    /// `MAINPID`) switches exactly then, and never if the upgrade fails.
    fn handed_over(&mut self, _new_pid: u32) {}
}

/// A notifier that tells nobody.
#[derive(Debug, Default)]
pub struct Silent;

impl Notifier for Silent {}

/// How [`crate::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A stop request, and the graceful shutdown completed.
    Graceful,
    /// A second stop request arrived during shutdown: stopped at once.
    Forced,
    /// A new process took over every connection (a live upgrade): this one
    /// exits without closing any of them.
    Upgraded,
}
