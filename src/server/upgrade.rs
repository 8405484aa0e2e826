//! The reactor's side of a live upgrade, in both processes
//! (`crate::handoff` has the format and the descriptor plumbing).
//!
//! The old process: an upgrade asked for starts at the end of a turn (in a
//! cluster, after quiescing: `Life::Quiescing`); it snapshots its
//! connections, starts the new binary and waits (`Life::Upgrading`),
//! touching no client socket, for the new one to say it serves; then it
//! finishes its scrapes and exits (`Life::Retiring`). If the new one fails,
//! the old one resumes: every connection is read and written again, since
//! readiness events that came meanwhile were not acted on.
//!
//! The new process: `adopt` (from `Server::new`) takes every connection
//! over, `Server::take_over` (before the loop) tells the old process it
//! may go and handles what the adopted clients had sent.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use compact_str::CompactString;
use log::{debug, info, warn};
use mio::Interest;
use mio::net::TcpStream;

use super::clients::Clients;
use super::{Life, Server, Source};
use crate::conn::{Conn, Phase};
use crate::control::Exit;
use crate::deadlines::{Deadline, Deadlines};
use crate::handoff::{self, ConnState, Handoff, Inherited, State};

/// A kind of connection deadline, as `Clients::set_deadline` takes it.
type DeadlineKind = fn(crate::conn::Slot) -> Deadline;

/// The longest a cluster node waits for Redis's answers before it hands
/// over anyway (what is still in flight then is settled by the new
/// process, or reported lost).
pub(super) const QUIESCE_MS: u64 = 1000;

/// How long the new process has to say it serves.
const READY_TIMEOUT_MS: u64 = 5000;

/// How long the old process finishes the scrapes it accepted, once the new
/// one serves.
pub(super) const RETIRE_MS: u64 = 1000;

/// How long the new process holds the adopted clients' input for its link
/// to Redis to be ready, when the old one handed over with a quiet link.
const HOLD_FOR_LINK_MS: u64 = 1000;

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
    /// At the end of a turn: starts an upgrade that was asked for (in a
    /// cluster whose link is ready, by quiescing first), or hands over once
    /// quiescing is done.
    pub(super) fn advance_upgrade(&mut self) {
        match self.life {
            Life::Serving {
                upgrade_asked: true,
            } => {
                self.life = Life::Serving {
                    upgrade_asked: false,
                };
                let now = self.deadlines.now_ms();
                let quiescing = self.cluster.as_mut().is_some_and(|c| {
                    // Written now: the turn's writes are done, and nothing
                    // else may wake the loop before the cap.
                    c.quiesce() && {
                        c.flush(now);
                        true
                    }
                });
                if quiescing {
                    info!("upgrade: waiting for Redis's answers before handing over");
                    let step = self.next_upgrade_step(QUIESCE_MS);
                    self.life = Life::Quiescing {
                        step,
                        timed_out: false,
                    };
                } else {
                    self.begin_upgrade(true);
                }
            }
            Life::Quiescing {
                timed_out: true, ..
            } => self.begin_upgrade(false),
            Life::Quiescing { .. } if self.cluster.as_ref().is_none_or(|c| c.is_quiet()) => {
                self.begin_upgrade(true);
            }
            _ => {}
        }
    }

    /// A deadline of a live upgrade's step came: quiescing gives up on
    /// what Redis has not answered and hands over at the end of the turn;
    /// a new process not ready yet has failed.
    pub(super) fn upgrade_step_due(&mut self, due: u32) {
        match self.life {
            Life::Quiescing { step, .. } if step == due => {
                info!(
                    "upgrade: Redis did not answer everything within {QUIESCE_MS} ms; handing over"
                );
                // What is in flight fails as at a reset, now: its senders
                // hear `unavailable` (a claimant is closed with it, and the
                // lines held for it are reported), and the new process gets
                // those lines in the clients' output. The hand-over follows
                // at the end of this turn, once they are in the buffers and
                // the closed connections are reaped.
                let now = self.deadlines.now_ms();
                if let Some(cluster) = &mut self.cluster {
                    cluster.reset(now, "Redis did not answer before an upgrade");
                }
                self.apply_cluster_answers();
                self.life = Life::Quiescing {
                    step,
                    timed_out: true,
                };
            }
            Life::Upgrading { step, .. } if step == due => {
                self.abort_upgrade("the new process was not ready in time");
            }
            _ => {} // a step that ended already
        }
    }

    /// A new step's number, with its deadline `after_ms` from now.
    fn next_upgrade_step(&mut self, after_ms: u64) -> u32 {
        self.upgrade_steps = self.upgrade_steps.wrapping_add(1);
        let step = self.upgrade_steps;
        self.deadlines.set(after_ms, Deadline::UpgradeStep(step));
        step
    }

    /// Starts a live upgrade at the end of a turn (nothing pending, nobody
    /// dead): snapshots the state and starts the new binary. `quiet`: in a
    /// cluster, everything asked of Redis was answered (the new process
    /// then waits a moment for its own link before reading clients). On
    /// failure to start it, serving goes on.
    pub(super) fn begin_upgrade(&mut self, quiet: bool) {
        let Some(successor) = &self.successor else {
            self.resume_serving();
            return;
        };
        let started = Instant::now();
        let state = self.snapshot(quiet);
        let bytes = state.encode();
        let snapshot_time = started.elapsed();
        let handoff = match handoff::hand_over(successor, &bytes, &self.handed_fds()) {
            Ok(handoff) => handoff,
            Err(e) => {
                warn!(
                    "upgrade failed: cannot start {}: {e}; this process serves on",
                    successor.exe.display()
                );
                self.resume_serving();
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
            self.resume_serving();
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
        let step = self.next_upgrade_step(READY_TIMEOUT_MS);
        self.life = Life::Upgrading {
            upgrade: Upgrading {
                handoff,
                started,
                conns: state.conns.len(),
            },
            step,
            stop_asked: false,
        };
    }

    /// The readiness pipe has news: the new process serves (this one
    /// retires), or it failed (this one serves on).
    pub(super) fn on_upgrade_pipe(&mut self) -> Option<Exit> {
        match self.read_ready()? {
            true => self.retire(),
            false => self.abort_upgrade("the new process exited before it was ready"),
        }
        None
    }

    /// The new process serves: this one stops accepting scrapers and
    /// finishes those it has (at most [`RETIRE_MS`]), then exits.
    fn retire(&mut self) {
        let Life::Upgrading {
            upgrade,
            stop_asked,
            ..
        } = &self.life
        else {
            return;
        };
        let (pid, stop_asked) = (upgrade.pid(), *stop_asked);
        let until_ms = self.deadlines.now_ms() + RETIRE_MS;
        let retiring = Life::Retiring {
            until_ms,
            pid,
            stop_asked,
        };
        let Life::Upgrading { upgrade, .. } = std::mem::replace(&mut self.life, retiring) else {
            return;
        };
        info!(
            "upgrade complete: pid {} serves the {} connection(s) (handed over in {:?}){}; \
             this process exits",
            upgrade.handoff.child.id(),
            upgrade.conns,
            upgrade.started.elapsed(),
            if stop_asked {
                " and shuts down, as asked"
            } else {
                ""
            }
        );
        self.housekeeping.handed_over(upgrade.pid());
        if let Some(scrapers) = &mut self.scrapers {
            scrapers.stop_accepting(self.poll.registry());
        }
        self.deadlines.set(RETIRE_MS, Deadline::ShutdownGiveUp);
    }

    /// Reads the readiness pipe: `Some(true)` on `ready`, `Some(false)` at
    /// EOF without it, `None` while neither.
    fn read_ready(&mut self) -> Option<bool> {
        let Life::Upgrading { upgrade, .. } = &mut self.life else {
            return None;
        };
        let mut buf = [0; 16];
        match upgrade.handoff.ready.read(&mut buf) {
            Ok(0) => Some(false),
            Ok(n) => Some(buf[..n].starts_with(b"ready")),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(_) => Some(false),
        }
    }

    /// The new process failed: it is stopped, and this one serves on, or
    /// shuts down if that was asked for meanwhile. Every connection is read
    /// and flushed again: the readiness events that came during the
    /// upgrade were not acted on.
    pub(super) fn abort_upgrade(&mut self, why: &str) {
        let life = std::mem::replace(
            &mut self.life,
            Life::Serving {
                upgrade_asked: false,
            },
        );
        let Life::Upgrading {
            mut upgrade,
            stop_asked,
            ..
        } = life
        else {
            self.life = life;
            return;
        };
        let fd = handoff_fd(&upgrade.handoff);
        let _ = self
            .poll
            .registry()
            .deregister(&mut mio::unix::SourceFd(&fd));
        let status = match exit_status(&mut upgrade.handoff.child) {
            Some(status) => format!(" ({status})"),
            None => {
                let _ = upgrade.handoff.child.kill();
                match upgrade.handoff.child.wait() {
                    Ok(status) => format!(" (stopped: {status})"),
                    Err(_) => " (stopped)".to_string(),
                }
            }
        };
        let then = if stop_asked {
            "this process shuts down, as asked"
        } else {
            "this process serves on"
        };
        warn!(
            "upgrade failed: {why}{status}; {then} after a pause of {:?}",
            upgrade.started.elapsed()
        );
        if let Err(e) = handoff::keep_private(&self.handed_fds()) {
            warn!("upgrade: cannot set close-on-exec again: {e}");
        }
        self.resume_serving();
        if stop_asked {
            self.begin_shutdown();
        }
    }

    /// Serving again after an upgrade that did not happen: every
    /// connection is read and flushed (their readiness events were not
    /// acted on meanwhile), the listeners accept, the deadlines that came
    /// due are acted on, and in a cluster the node listens on its channel
    /// again.
    fn resume_serving(&mut self) {
        self.life = Life::Serving {
            upgrade_asked: false,
        };
        for deadline in std::mem::take(&mut self.postponed) {
            self.deadlines.set(0, deadline);
        }
        let keys: Vec<usize> = self.clients.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            let conn = self.clients.conn(key);
            if conn.on_writable() {
                self.clients.mark_pending(key);
            }
            let conn = self.clients.conn(key);
            let _ = conn.take_more_input(); // it may be on no list now
            if matches!(conn.phase(), Phase::Login | Phase::Chat | Phase::Closing)
                && conn.mark_more_input()
            {
                self.clients.more_input.push(key);
            }
        }
        let registry = self.poll.registry();
        self.clients
            .accept_all(registry, &mut self.deadlines, false);
        self.clients.accept_all(registry, &mut self.deadlines, true);
        if let Some(scrapers) = &mut self.scrapers {
            scrapers.accept_all(registry, &mut self.deadlines);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.resubscribe();
            cluster.catch_up(self.deadlines.now_ms());
        }
    }

    /// In the new process, before the loop: every socket is registered, so
    /// the old process is told it may go; input is read only from now on
    /// (nothing is lost if this process fails before this point). In a
    /// cluster the adopted clients' input waits for the link (see `adopt`).
    pub(super) fn take_over(&mut self, inherited: Inherited, adopted_input: Vec<usize>) {
        let adopted = self.clients.len();
        match inherited.signal_ready() {
            Ok(()) => info!("upgrade: took over {adopted} connection(s)"),
            Err(e) => warn!("upgrade: cannot tell the old process it may go: {e}"),
        }
        let held = self.cluster.as_ref().is_some_and(|c| c.is_holding());
        for key in adopted_input {
            if self.clients.get(key).is_some() && !held {
                self.resume_input(key); // in a cluster, once the link is ready
            }
        }
        // A half-closed client with nothing left to write closes.
        let keys: Vec<usize> = self.clients.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close_if_drained(key);
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
        if let Some(ws) = self.clients.ws_listener() {
            fds.push(ws.as_fd());
        }
        let conns = self.clients.conns.iter();
        fds.extend(conns.map(|(_, conn)| conn.stream.as_fd()));
        fds
    }

    /// Everything a new process needs to serve on; `quiet`: see
    /// [`Server::begin_upgrade`].
    fn snapshot(&self, quiet: bool) -> State {
        let now = self.deadlines.now_ms();
        let (leases_left_ms, uncertain, uncertain_overflow) = match &self.cluster {
            Some(cluster) => cluster.handover_state(now),
            None => (Vec::new(), Vec::new(), false),
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
            websocket: self.clients.ws_listener().map(|l| raw(Some(l.as_fd()))),
            counters: handoff::counters_of(
                &self.clients.stats,
                self.cluster.as_ref().map(|c| c.totals()).as_ref(),
            ),
            next_id: self.clients.next_id(),
            base_fds: self.base_fds as u64,
            node: self.cluster.as_ref().map(|c| c.node().to_string()),
            leases_left_ms,
            uncertain,
            uncertain_overflow,
            link_quiet: quiet && self.cluster.as_ref().is_some_and(|c| c.shards_ready() > 0),
            conns,
        }
    }
}

/// In the new process of a live upgrade: adopts every connection `state`
/// hands over, and in a cluster the lease as the old process held it
/// (fencing goes on), the names to settle, and the clients' input held back
/// until the link is ready (at most [`HOLD_FOR_LINK_MS`], and only if the
/// old process's link was quiet: else what they send is routed, or refused
/// as unavailable, at once). Returns the adopted connections whose kept
/// input holds whole lines (longer than `head_room`, or with a newline),
/// to handle once the old process has gone.
pub(super) fn adopt(
    state: &mut State,
    clients: &mut Clients,
    cluster: Option<&mut crate::cluster::Cluster>,
    registry: &mio::Registry,
    deadlines: &mut Deadlines,
    head_room: usize,
) -> Vec<usize> {
    let adopting = Instant::now();
    clients.stats = handoff::stats_of(&state.counters);
    clients.stats.connections = 0;
    clients.set_next_id(state.next_id);
    let mut whole_lines = Vec::new();
    for conn in std::mem::take(&mut state.conns) {
        let lines = conn.input.len() > head_room || conn.input.contains(&b'\n');
        if let Some(key) = clients.adopt(conn, registry, deadlines) {
            if lines {
                whole_lines.push(key);
            }
        }
    }
    debug!(
        "upgrade: {} connection(s) adopted in {:?}",
        clients.len(),
        adopting.elapsed()
    );
    if let Some(cluster) = cluster {
        handoff::cluster_stats_of(&state.counters, &mut cluster.stats);
        let uncertain = std::mem::take(&mut state.uncertain);
        let hold_ms = if state.link_quiet {
            HOLD_FOR_LINK_MS
        } else {
            0
        };
        let now = deadlines.now_ms();
        cluster.adopt(
            &state.leases_left_ms,
            uncertain,
            state.uncertain_overflow,
            now,
            hold_ms,
        );
        if hold_ms > 0 {
            for (key, _) in clients.conns.iter() {
                cluster.throttle(clients.slot(key));
            }
        }
    }
    whole_lines
}

/// One connection's part of the state. A connection claiming its name in
/// a cluster goes back to logging in, its name line in front of what it
/// sent after: the new process claims it again.
fn conn_state(conn: &Conn, deadline_ms: Option<u64>, now: u64) -> ConnState {
    let kept = conn.partial.as_ref().map_or(&[][..], |p| &p.data[p.pos..]);
    let ws = conn
        .partial
        .as_ref()
        .map_or_else(Default::default, |p| p.ws);
    let (phase, input) = match conn.phase() {
        Phase::Claiming => {
            let mut input = format!("{}\n", conn.name).into_bytes();
            input.extend_from_slice(kept);
            (Phase::Login, input)
        }
        phase => (phase, kept.to_vec()),
    };
    let name = match phase {
        Phase::Chat | Phase::Draining => conn.name.to_string(),
        _ => String::new(),
    };
    ConnState {
        fd: std::os::fd::AsRawFd::as_raw_fd(&conn.stream),
        id: conn.id,
        phase,
        name,
        silent_ms: (now as u32).wrapping_sub(conn.last_input_ms),
        deadline_ms,
        flags: conn.handoff_flags(),
        discarded: conn.discarded,
        input,
        ws,
        output: conn
            .out
            .as_ref()
            .map_or(Vec::new(), |o| o.data[o.pos..].to_vec()),
        output_opaque: match &conn.out {
            Some(out) if conn.is_ws_open() => out.opaque_front() as u32,
            _ => 0,
        },
    }
}

fn raw(fd: Option<BorrowedFd<'_>>) -> i32 {
    fd.map_or(-1, |fd| std::os::fd::AsRawFd::as_raw_fd(&fd))
}

fn handoff_fd(handoff: &Handoff) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(&handoff.ready)
}

impl Upgrading {
    /// The new process's id.
    pub(super) fn pid(&self) -> u32 {
        self.handoff.child.id()
    }
}

/// A stop was asked for while the new process starts, or once it serves:
/// it is passed on. The new process shuts down as soon as it serves (or
/// dies of the signal before it can; then `abort_upgrade` shuts this one
/// down, as asked).
pub(super) fn pass_stop_on(pid: u32) {
    info!("shutdown requested during an upgrade: asking the new process (pid {pid}) to shut down");
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        warn!("cannot signal the new process: {e}");
    }
}

/// How a new process that closed its readiness pipe ended: it may take a
/// moment to exit after it closed the pipe, so this waits up to 100 ms for
/// its status (on a failing upgrade only). `None`: it still runs.
fn exit_status(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    for _ in 0..20 {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(_) => return None,
        }
    }
    None
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
        let std_stream = std::net::TcpStream::from(handoff::take_fd(state.fd));
        let mut stream = TcpStream::from_std(std_stream);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        registry
            .register(
                &mut stream,
                Source::Client(key).token(),
                super::input::CLIENT_INTEREST,
            )
            .ok()?;
        let phase = state.phase;
        let now = deadlines.now_ms() as u32;
        let mut conn = Conn::restore(
            stream,
            state.id,
            now.wrapping_sub(state.silent_ms),
            phase,
            &state.flags,
        );
        conn.discarded = state.discarded;
        conn.name = CompactString::from(state.name.as_str());
        entry.insert(conn);
        if state.flags.rejected {
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
            if !state.input.is_empty() || state.ws != crate::ws::InState::default() {
                let mut buf = pool.take(state.input.len());
                buf.data.extend_from_slice(&state.input);
                buf.ws = state.ws;
                conn.partial = Some(buf);
            }
            if !state.output.is_empty() {
                let mut buf = pool.take(state.output.len());
                buf.data.extend_from_slice(&state.output);
                buf.mark = state.output_opaque as usize;
                conn.out = Some(buf);
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
