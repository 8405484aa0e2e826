//! The metrics endpoint's side of the reactor: its listener and the open
//! scraper connections, each with a deadline. What is answered is in
//! `crate::metrics`; this file only accepts, dispatches and expires.

use log::{debug, info};
use mio::net::TcpListener;
use mio::{Interest, Registry};
use slab::Slab;

use super::Source;
use super::clients::{ACCEPT_BACKOFF_MS, is_transient_accept_error};
use crate::conn::Slot;
use crate::deadlines::{Deadline, Deadlines};
use crate::metrics::{self, Gauges, MetricsConn, Next};
use crate::stats::Stats;

/// Full renders of `/metrics` per second at the most; a scrape past that
/// gets the last render, so scrapers cannot take the loop's time from chat.
const RENDERS_PER_SEC: u32 = 10;

/// The last `/metrics` body and what it cost, so renders stay bounded.
#[derive(Default)]
struct Cache {
    /// The second (since the loop started) the counts below are for.
    second: u64,
    /// Full renders in that second.
    renders: u32,
    /// The last body rendered.
    body: String,
    /// Resident memory and the second it was read (from `/proc`, at most
    /// once a second).
    resident: Option<(u64, Option<u64>)>,
}

impl Cache {
    /// The `/metrics` body: a new render while this second's budget lasts,
    /// else the last one.
    fn body(&mut self, now_ms: u64, stats: &Stats, gauges: impl FnOnce() -> Gauges) -> String {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.renders = 0;
        }
        if self.renders < RENDERS_PER_SEC || self.body.is_empty() {
            self.renders += 1;
            let resident = match self.resident {
                Some((read, bytes)) if read == second => bytes,
                _ => {
                    let bytes = metrics::resident_bytes();
                    self.resident = Some((second, bytes));
                    bytes
                }
            };
            let gauges = Gauges {
                resident_bytes: resident,
                ..gauges()
            };
            self.body = metrics::render(stats, &gauges);
        }
        self.body.clone()
    }
}

/// The metrics listener and its connections.
pub(super) struct Scrapers {
    /// The listener, registered as `Source::MetricsListener`.
    listener: TcpListener,
    /// Open scrapers (at most `metrics::MAX_CONNS`) and their ids.
    conns: Slab<(u32, MetricsConn)>,
    /// The id the next scraper gets (wrapping), so a deadline never closes
    /// a later scraper that reused the slab key.
    next_id: u32,
    /// Whether accepting waits for a `Deadline::ScrapersResume` (the
    /// process ran out of descriptors; the listener is edge-triggered, so
    /// without a retry the scrapers in its backlog would wait for the next
    /// one to connect).
    paused: bool,
    /// The last render, and how many were made this second.
    cache: Cache,
}

impl Scrapers {
    /// Serves `listener`, registering it with the poller.
    pub fn new(listener: std::net::TcpListener, registry: &Registry) -> std::io::Result<Scrapers> {
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
            paused: false,
            cache: Cache::default(),
        })
    }

    /// Accepts scrapers until `WouldBlock`; past `metrics::MAX_CONNS` they
    /// are closed at once.
    pub fn accept_all(&mut self, registry: &Registry, deadlines: &mut Deadlines) {
        if self.paused {
            return;
        }
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => continue,
                Err(e) => {
                    debug!("metrics accept: {e}; retrying in {ACCEPT_BACKOFF_MS} ms");
                    self.paused = true;
                    deadlines.set(ACCEPT_BACKOFF_MS, Deadline::ScrapersResume);
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

    /// The metrics listener.
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Open scraper connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Serves a scraper's event; closes it once answered or failed.
    /// `health` is what `/healthz` reports; `gauges` is asked only for a
    /// full render of `/metrics`, at most [`RENDERS_PER_SEC`] times a second.
    pub fn on_event(
        &mut self,
        key: usize,
        registry: &Registry,
        now_ms: u64,
        health: Result<(), &'static str>,
        stats: &Stats,
        gauges: impl FnOnce() -> Gauges,
    ) {
        let Some((_, conn)) = self.conns.get_mut(key) else {
            return;
        };
        let cache = &mut self.cache;
        match conn.on_event(health, || cache.body(now_ms, stats, gauges)) {
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

    /// Stops accepting (the new process of a live upgrade serves the
    /// listener); the scrapers already accepted are still served.
    pub fn stop_accepting(&mut self, registry: &Registry) {
        self.paused = true;
        let _ = registry.deregister(&mut self.listener);
    }

    /// The accept pause is over: accept what waited.
    pub fn resume_accepting(&mut self, registry: &Registry, deadlines: &mut Deadlines) {
        self.paused = false;
        self.accept_all(registry, deadlines);
    }

    /// A scraper's time is up: it is closed, if it is still the same one.
    pub fn expire(&mut self, slot: Slot) {
        let key = slot.key as usize;
        if self.conns.get(key).is_some_and(|(id, _)| *id == slot.id) {
            self.conns.remove(key);
        }
    }
}
