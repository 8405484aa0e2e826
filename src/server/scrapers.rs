//! The metrics endpoint's side of the reactor: its listener and the open
//! scraper connections, each with a deadline. What is answered is in
//! `crate::metrics`; this file only accepts, dispatches and expires.

use log::{debug, info};
use mio::net::TcpListener;
use mio::{Interest, Registry as PollRegistry};
use slab::Slab;

use super::Source;
use super::clients::is_transient_accept_error;
use crate::deadlines::{Deadline, Deadlines, Slot};
use crate::metrics::{self, Gauges, MetricsConn, Next};
use crate::stats::Stats;

/// The metrics listener and its connections.
pub(super) struct Scrapers {
    /// The listener, registered as `Source::MetricsListener`.
    listener: TcpListener,
    /// Open scrapers (at most `metrics::MAX_CONNS`) and their ids.
    conns: Slab<(u32, MetricsConn)>,
    /// The id the next scraper gets (wrapping), so a deadline never closes
    /// a later scraper that reused the slab key.
    next_id: u32,
}

impl Scrapers {
    /// Serves `listener`, registering it with the poller.
    pub fn new(
        listener: std::net::TcpListener,
        registry: &PollRegistry,
    ) -> std::io::Result<Scrapers> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        registry.register(
            &mut listener,
            Source::MetricsListener.token(),
            Interest::READABLE,
        )?;
        info!("metrics on http://{}/metrics", listener.local_addr()?);
        Ok(Scrapers {
            listener,
            conns: Slab::new(),
            next_id: 0,
        })
    }

    /// Accepts scrapers until `WouldBlock`; past `metrics::MAX_CONNS` they
    /// are closed at once.
    pub fn accept_all(&mut self, registry: &PollRegistry, deadlines: &mut Deadlines) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= metrics::MAX_CONNS {
                continue; // dropped: closed
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let token = Source::Scraper(key).token();
            if registry
                .register(&mut stream, token, Interest::READABLE)
                .is_ok()
            {
                let id = self.next_id;
                self.next_id = id.wrapping_add(1);
                entry.insert((id, MetricsConn::new(stream)));
                let slot = Slot {
                    key: key as u32,
                    id,
                };
                deadlines.set(metrics::DEADLINE_MS, Deadline::Scraper(slot));
            }
        }
    }

    /// Serves a scraper's event; closes it once answered or failed.
    pub fn on_event(
        &mut self,
        key: usize,
        registry: &PollRegistry,
        stats: &Stats,
        gauges: impl FnOnce() -> Gauges,
    ) {
        let Some((_, conn)) = self.conns.get_mut(key) else {
            return;
        };
        match conn.on_event(stats, gauges) {
            Next::Wait => {}
            Next::WaitWritable => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                let token = Source::Scraper(key).token();
                if registry
                    .reregister(&mut conn.stream, token, interest)
                    .is_err()
                {
                    self.conns.remove(key);
                }
            }
            Next::Close => {
                self.conns.remove(key);
            }
        }
    }

    /// A scraper's time is up: it is closed, if it is still the same one.
    pub fn expire(&mut self, slot: Slot) {
        let key = slot.key as usize;
        if self.conns.get(key).is_some_and(|(id, _)| *id == slot.id) {
            self.conns.remove(key);
        }
    }
}
