//! The reactor's side of a live upgrade (`crate::upgrade` has the format
//! and the descriptor plumbing): the old process snapshots its connections,
//! hands them over and waits, touching no client socket, for the new one to
//! say it serves; the new process adopts them. If the new one fails, the
//! old one resumes: every connection is read and written again, since
//! readiness events that came meanwhile were not acted on.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::time::Instant;

use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;

use super::clients::Clients;
use super::{Server, Source};
use crate::conn::{Conn, Phase};
use crate::control::Exit;
use crate::deadlines::{Deadline, Deadlines};
use crate::upgrade::{self, ConnState, Handoff, State};

/// A kind of connection deadline, as `Clients::set_deadline` takes it.
type DeadlineKind = fn(crate::deadlines::Slot) -> Deadline;

/// The longest a cluster node waits for Redis's answers before it hands
/// over anyway (what is still in flight then is settled by the new
/// process, or reported lost).
const QUIESCE_MS: u64 = 1000;

/// How long the new process has to say it serves.
const READY_TIMEOUT_MS: u64 = 5000;

/// A live upgrade under way, in the old process.
pub(super) struct Upgrading {
    /// The new process and its readiness pipe.
    handoff: Handoff,
    /// When the old process stopped serving.
    started: Instant,
    /// Connections handed over.
    conns: usize,
}

impl Server {
    /// Starts a live upgrade at the end of a turn (nothing pending, nobody
    /// dead): snapshots the state and starts the new binary. On failure to
    /// start it, serving goes on.
    pub(super) fn begin_upgrade(&mut self) {
        let Some(successor) = &self.successor else {
            return;
        };
        let started = Instant::now();
        let state = self.snapshot();
        let bytes = state.encode();
        let snapshot_time = started.elapsed();
        let handoff = match upgrade::hand_over(successor, &bytes, &self.handed_fds()) {
            Ok(handoff) => handoff,
            Err(e) => {
                warn!(
                    "upgrade failed: cannot start {}: {e}; this process serves on",
                    successor.exe.display()
                );
                return;
            }
        };
        let mut ready = mio::unix::SourceFd(&handoff_fd(&handoff));
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut ready, Source::Upgrade.token(), Interest::READABLE)
        {
            warn!("upgrade failed: {e}; this process serves on");
            abandon(handoff);
            return;
        }
        info!(
            "upgrade: handing {} connection(s) ({} bytes of state) to pid {}",
            state.conns.len(),
            bytes.len(),
            handoff.child.id()
        );
        debug!(
            "upgrade: state written in {snapshot_time:?}, new process started after {:?}",
            started.elapsed()
        );
        self.deadlines
            .set(READY_TIMEOUT_MS, Deadline::UpgradeGiveUp);
        self.upgrade = Some(Upgrading {
            handoff,
            started,
            conns: state.conns.len(),
        });
    }

    /// One turn while an upgrade is under way: only the readiness pipe, the
    /// give-up deadline and the control's non-stop requests are acted on.
    /// Returns `Some(Exit::Upgraded)` once the new process serves.
    pub(super) fn upgrade_turn(&mut self, events: &mio::Events) -> Option<Exit> {
        let mut pipe_ready = false;
        for event in events.iter() {
            match Source::of(event.token()) {
                Some(Source::Upgrade) => pipe_ready = true,
                Some(Source::Waker) => {
                    self.on_requests();
                }
                _ => {} // acted on after the upgrade, if it fails
            }
        }
        if pipe_ready {
            match self.read_ready() {
                Some(true) => {
                    let upgrading = self.upgrade.take()?;
                    info!(
                        "upgrade complete: pid {} serves the {} connection(s) (handed over in {:?}); \
                         this process exits",
                        upgrading.handoff.child.id(),
                        upgrading.conns,
                        upgrading.started.elapsed()
                    );
                    return Some(Exit::Upgraded);
                }
                Some(false) => {
                    self.abort_upgrade("the new process exited before it was ready");
                    return None;
                }
                None => {}
            }
        }
        let due = self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.started.elapsed().as_millis() as u64 >= READY_TIMEOUT_MS);
        let now = self.deadlines.now_ms();
        if due {
            self.abort_upgrade("the new process was not ready in time");
        } else if self.cluster.as_ref().is_some_and(|c| c.must_fence(now)) {
            // The lease cannot wait for a slow new process.
            self.abort_upgrade("the lease would expire before the new process was ready");
        }
        None
    }

    /// Reads the readiness pipe: `Some(true)` on `ready`, `Some(false)` at
    /// EOF without it, `None` while neither.
    fn read_ready(&mut self) -> Option<bool> {
        let upgrading = self.upgrade.as_mut()?;
        let mut buf = [0; 16];
        match upgrading.handoff.ready.read(&mut buf) {
            Ok(0) => Some(false),
            Ok(n) => Some(buf[..n].starts_with(b"ready")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(_) => Some(false),
        }
    }

    /// The new process failed: it is stopped, and this one serves on. Every
    /// connection is read and flushed again: the readiness events that came
    /// during the upgrade were not acted on.
    pub(super) fn abort_upgrade(&mut self, why: &str) {
        let Some(mut upgrading) = self.upgrade.take() else {
            return;
        };
        let fd = handoff_fd(&upgrading.handoff);
        let _ = self
            .poll
            .registry()
            .deregister(&mut mio::unix::SourceFd(&fd));
        let status = match upgrading.handoff.child.try_wait() {
            Ok(Some(status)) => format!(" ({status})"),
            _ => {
                let _ = upgrading.handoff.child.kill();
                let _ = upgrading.handoff.child.wait();
                " (stopped)".to_string()
            }
        };
        warn!(
            "upgrade failed: {why}{status}; this process serves on after a pause of {:?}",
            upgrading.started.elapsed()
        );
        if let Err(e) = upgrade::keep_private(&self.handed_fds()) {
            warn!("upgrade: cannot set close-on-exec again: {e}");
        }
        self.resume_serving();
    }

    /// Serving again after an upgrade that did not happen: every
    /// connection is read and flushed (their readiness events were not
    /// acted on meanwhile), the listeners accept, and in a cluster the node
    /// listens on its channel again.
    pub(super) fn resume_serving(&mut self) {
        self.quiescing = None;
        let keys: Vec<usize> = self.clients.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            let conn = self.clients.conn(key);
            if conn.on_writable() {
                self.clients.mark_pending(key);
            }
            let conn = self.clients.conn(key);
            let _ = conn.take_deferred_input(); // it may be on no list now
            if matches!(conn.phase(), Phase::Login | Phase::Chat | Phase::Closing)
                && conn.defer_input()
            {
                self.clients.more_input.push(key);
            }
        }
        let registry = self.poll.registry();
        self.clients.accept_all(registry, &mut self.deadlines);
        if let Some(scrapers) = &mut self.scrapers {
            scrapers.accept_all(registry, &mut self.deadlines);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.resubscribe();
            cluster.read_more(self.deadlines.now_ms());
        }
    }

    /// In a cluster, an upgrade first quiesces: the node stops reading its
    /// clients and listening on its channel, and waits (at most
    /// [`QUIESCE_MS`]) for every answer it is owed, so that nothing is in
    /// flight when the state is written. Called at the end of each turn
    /// while quiescing; starts the handover when the link is quiet.
    pub(super) fn quiesce_turn(&mut self) {
        let Some(started) = self.quiescing else {
            return;
        };
        let quiet = self.cluster.as_ref().is_none_or(|c| c.is_quiet());
        let now = self.deadlines.now_ms();
        if quiet || now >= started + QUIESCE_MS {
            self.begin_upgrade();
            if self.upgrade.is_none() {
                self.resume_serving(); // it could not start
            }
        }
    }

    /// An upgrade was asked for: in a cluster whose link is ready, quiesce
    /// first; else hand over at once.
    pub(super) fn start_upgrade(&mut self) {
        let quiescing = self.cluster.as_mut().is_some_and(|c| c.quiesce());
        if quiescing {
            info!("upgrade: waiting for Redis's answers before handing over");
            self.quiescing = Some(self.deadlines.now_ms());
        } else {
            self.begin_upgrade();
        }
    }

    /// The descriptors a new process inherits: the listeners and every
    /// connection.
    fn handed_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(self.clients.len() + 2);
        if let Some(listener) = self.clients.listener() {
            fds.push(listener.as_fd());
        }
        if let Some(scrapers) = &self.scrapers {
            fds.push(scrapers.listener().as_fd());
        }
        let conns = self.clients.conns.iter();
        fds.extend(conns.map(|(_, conn)| conn.stream.as_fd()));
        fds
    }

    /// Everything a new process needs to serve on.
    fn snapshot(&self) -> State {
        let now = self.deadlines.now_ms();
        let (lease_left_ms, uncertain, uncertain_overflow) = match &self.cluster {
            Some(cluster) => cluster.handover_state(now),
            None => (None, Vec::new(), false),
        };
        // Login and close deadlines, by slab key (idle ones follow from
        // the time of the last input).
        let mut left: HashMap<u32, u64> = HashMap::new();
        for (deadline, at) in self.deadlines.iter() {
            if let Deadline::Login(slot) | Deadline::Close(slot) = deadline {
                if self.clients.applies(deadline, slot).is_some() {
                    left.insert(slot.key, at.saturating_sub(now));
                }
            }
        }
        let mut lost = 0;
        let conns = self
            .clients
            .conns
            .iter()
            .map(|(key, conn)| {
                let mut state = conn_state(conn, left.get(&(key as u32)).copied(), now);
                // Lines held behind answers that never came (the quiesce
                // timed out) follow the connection's output.
                let (behind, for_claim) = self.clients.held_for_handover(key);
                state.output.extend_from_slice(&behind);
                lost += for_claim;
                state
            })
            .collect();
        if lost > 0 {
            warn!(
                "upgrade: {lost} line(s) held for clients still claiming their name are lost \
                 (Redis did not answer the claims within the quiesce)"
            );
        }
        State {
            listener: raw(self.clients.listener().map(|l| l.as_fd())),
            metrics: self
                .scrapers
                .as_ref()
                .map(|s| raw(Some(s.listener().as_fd()))),
            counters: upgrade::counters_of(&self.clients.stats),
            next_id: self.clients.next_id(),
            base_fds: self.base_fds as u64,
            node: self.cluster.as_ref().map(|c| c.node().to_string()),
            lease_left_ms,
            uncertain,
            uncertain_overflow,
            conns,
        }
    }
}

/// One connection's part of the state. A connection claiming its name in
/// a cluster goes back to logging in, its name line in front of what it
/// sent after: the new process claims it again.
fn conn_state(conn: &Conn, deadline_ms: Option<u64>, now: u64) -> ConnState {
    let kept = conn.partial.as_ref().map_or(&[][..], |p| &p.data[p.pos..]);
    let (phase, input) = match conn.phase() {
        Phase::Login => (0, kept.to_vec()),
        Phase::Claiming => {
            let mut input = format!("{}\n", conn.name).into_bytes();
            input.extend_from_slice(kept);
            (0, input)
        }
        Phase::Chat => (1, kept.to_vec()),
        Phase::Draining => (2, kept.to_vec()),
        Phase::Closing => (3, kept.to_vec()),
    };
    let name = if phase == 1 || phase == 2 {
        conn.name.to_string()
    } else {
        String::new()
    };
    ConnState {
        fd: std::os::fd::AsRawFd::as_raw_fd(&conn.stream),
        id: conn.id,
        phase,
        name,
        silent_ms: (now as u32).wrapping_sub(conn.last_input_ms),
        deadline_ms,
        write_shut: conn.is_write_shut(),
        input_done: conn.is_input_done(),
        rejected: conn.is_rejected(),
        discarded: conn.discarded,
        input,
        output: conn
            .out
            .as_ref()
            .map_or(Vec::new(), |o| o.data[o.pos..].to_vec()),
    }
}

fn raw(fd: Option<BorrowedFd<'_>>) -> i32 {
    fd.map_or(-1, |fd| std::os::fd::AsRawFd::as_raw_fd(&fd))
}

fn handoff_fd(handoff: &Handoff) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(&handoff.ready)
}

/// Stops a new process that will not be waited for.
fn abandon(mut handoff: Handoff) {
    let _ = handoff.child.kill();
    let _ = handoff.child.wait();
}

impl Clients {
    /// Adopts a connection handed over by a live upgrade: registers its
    /// socket, restores its phase, name, buffers and deadlines. Returns its
    /// key, or `None` if it could not be registered (it is closed).
    pub(super) fn adopt(
        &mut self,
        state: ConnState,
        registry: &mio::Registry,
        deadlines: &mut Deadlines,
    ) -> Option<usize> {
        let std_stream = std::net::TcpStream::from(upgrade::take_fd(state.fd));
        let mut stream = TcpStream::from_std(std_stream);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        registry
            .register(&mut stream, Source::Client(key).token(), Interest::READABLE)
            .ok()?;
        let phase = [Phase::Login, Phase::Chat, Phase::Draining, Phase::Closing]
            [usize::from(state.phase.min(3))];
        let now = deadlines.now_ms() as u32;
        let mut conn = Conn::restore(
            stream,
            state.id,
            now.wrapping_sub(state.silent_ms),
            phase,
            state.write_shut,
            state.input_done,
            state.rejected,
        );
        conn.discarded = state.discarded;
        conn.name = Rc::from(state.name.as_str());
        entry.insert(conn);
        if state.rejected {
            self.adopt_rejected();
        } else {
            self.stats.connections += 1;
        }
        if phase == Phase::Chat && !self.adopt_name(key) {
            // Cannot happen with a consistent state; closing is safe.
            self.kill(key);
            return None;
        }
        self.with_buffers(key, |conn, pool| {
            for (bytes, slot) in [
                (&state.input, &mut conn.partial),
                (&state.output, &mut conn.out),
            ] {
                if !bytes.is_empty() {
                    let mut buf = pool.take(bytes.len());
                    buf.data.extend_from_slice(bytes);
                    *slot = Some(buf);
                }
            }
        });
        if !state.output.is_empty() {
            self.mark_pending(key);
        }
        let idle = self.limits.idle_timeout_ms;
        let deadline: Option<(u64, DeadlineKind)> = match phase {
            Phase::Login => state
                .deadline_ms
                .map(|ms| (ms, Deadline::Login as DeadlineKind)),
            Phase::Closing => state
                .deadline_ms
                .map(|ms| (ms, Deadline::Close as DeadlineKind)),
            Phase::Chat | Phase::Draining if idle > 0 => Some((
                idle.saturating_sub(u64::from(state.silent_ms)),
                Deadline::Idle,
            )),
            _ => None,
        };
        if let Some((after_ms, kind)) = deadline {
            self.set_deadline(key, deadlines, after_ms, kind);
        }
        Some(key)
    }
}
