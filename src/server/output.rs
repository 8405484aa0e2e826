//! The write path: queueing within `--max-outbound`, the pending-write
//! list, one flush per connection per loop turn, and writable interest only
//! for sockets that did not drain.

use log::{debug, warn};
use mio::{Interest, Registry};

use super::Source;
use super::clients::{Clients, peer};
use crate::conn::Phase;
use crate::deadlines::{Deadline, Deadlines};

/// How long a closed connection lingers for the client's EOF after its
/// sending side was shut down.
const LINGER_MS: u64 = 1000;

impl Clients {
    /// Queues `bytes` for `key` within `--max-outbound`; over it, the
    /// connection is closed as a slow consumer. At `--max-buffer-memory`,
    /// the largest holders other than `sender` are closed first (which may
    /// be `key`). Returns whether the bytes were queued.
    pub fn enqueue(
        &mut self,
        key: usize,
        bytes: &[u8],
        sender: Option<usize>,
        deadlines: &mut Deadlines,
    ) -> bool {
        let max = self.limits.max_outbound;
        if self.outbound(key) + bytes.len() > max {
            // Before calling it slow, let its socket take what it can: one
            // turn's 64 KiB of short lines can grow into more than the
            // bound of deliveries for a recipient that reads promptly.
            match self.with_buffers(key, |conn, pool| conn.flush(pool)) {
                Ok((n, _)) => self.stats.bytes_out += n as u64,
                Err(_) => {
                    self.kill(key);
                    return false;
                }
            }
        }
        if !self.room_for(key, bytes.len(), sender, deadlines) {
            return false;
        }
        self.with_buffers(key, |conn, pool| conn.queue(bytes, pool));
        self.mark_pending(key);
        true
    }

    /// Whether `len` more bytes for `key` (queued or held for it) fit its
    /// `--max-outbound` and `--max-buffer-memory`: over the first, `key`
    /// is closed as a slow consumer; at the second, the largest holders
    /// other than `sender` are closed first (which may be `key`). False
    /// when `key` was closed.
    pub(super) fn room_for(
        &mut self,
        key: usize,
        len: usize,
        sender: Option<usize>,
        deadlines: &mut Deadlines,
    ) -> bool {
        let max = self.limits.max_outbound;
        let queued = self.outbound(key);
        if queued + len > max {
            let conn = self.conn(key);
            warn!(
                "closing slow consumer {:?} ({}): {queued} bytes queued or held, limit {max}",
                conn.name,
                peer(conn)
            );
            self.close_slow_consumer(key, deadlines);
            return false;
        }
        if self.buffered + len > self.limits.max_buffer_memory {
            self.make_room(len, sender, deadlines);
            let conn = self.conn(key);
            if conn.is_dead() || conn.phase() == Phase::Closing {
                return false; // closed to make room
            }
        }
        true
    }

    /// Puts `key` on the pending-write list, unless it is there already or
    /// waiting for a writable event.
    pub fn mark_pending(&mut self, key: usize) {
        if self.conn(key).wants_flush() {
            self.pending_write.push(key);
        }
    }

    /// Writes every connection on the pending-write list, once per turn.
    pub fn flush_pending(&mut self, registry: &Registry, deadlines: &mut Deadlines) {
        let mut list = std::mem::take(&mut self.pending_write);
        for &key in &list {
            if self.conn(key).take_pending() {
                self.flush(key, registry, deadlines);
            }
        }
        list.clear();
        self.pending_write = list;
    }

    /// Writes what is queued for `key`. A socket that fills up gets writable
    /// interest (armed once, kept after) and waits for its event.
    fn flush(&mut self, key: usize, registry: &Registry, deadlines: &mut Deadlines) {
        let result = self.with_buffers(key, |conn, pool| conn.flush(pool));
        let conn = &mut self.conns[key];
        match result {
            Ok((n, drained)) => {
                self.stats.bytes_out += n as u64;
                if drained {
                    self.on_drained(key, deadlines);
                    return;
                }
                if conn.write_blocked() {
                    let interest = super::input::CLIENT_INTEREST | Interest::WRITABLE;
                    let token = Source::Client(key).token();
                    if let Err(e) = registry.reregister(&mut conn.stream, token, interest) {
                        warn!("cannot arm writable interest for #{}: {e}", conn.id);
                        self.kill(key);
                    }
                }
            }
            Err(e) => {
                debug!("#{} write error: {e}", conn.id);
                self.kill(key);
            }
        }
    }

    /// Everything queued for `key` is written: a draining connection closes;
    /// a closing one shuts down its sending side and lingers for EOF.
    fn on_drained(&mut self, key: usize, deadlines: &mut Deadlines) {
        let cluster = self.in_cluster();
        let conn = self.conn(key);
        match conn.phase() {
            // In a cluster, answers for its last lines may still be owed:
            // the reactor closes it once none is (`close_if_drained`).
            Phase::Draining if cluster => self.drained.push(key),
            Phase::Draining => self.kill(key),
            Phase::Closing if conn.is_input_done() => self.kill(key),
            Phase::Closing => {
                if conn.shut_write() {
                    self.set_deadline(key, deadlines, LINGER_MS, Deadline::Close);
                }
            }
            Phase::Login | Phase::Claiming | Phase::Chat => {}
        }
    }
}
