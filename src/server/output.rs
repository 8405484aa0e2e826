//! The write path: the pending-write list, one flush per connection per
//! loop turn, writable interest only for sockets that did not drain.

use super::*;

/// How long a closed connection lingers for the client's EOF after its
/// sending side was shut down.
pub(super) const LINGER_MS: u64 = 1000;

impl Server {
    /// Puts `key` on the pending-write list, unless it is there already or
    /// waiting for a writable event.
    pub(super) fn mark_pending(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        if conn.flags & (PENDING_WRITE | WRITE_BLOCKED | DEAD) == 0 {
            conn.flags |= PENDING_WRITE;
            self.pending_write.push(key);
        }
    }

    /// Writes every connection on the pending-write list, once per turn.
    pub(super) fn flush_pending(&mut self) {
        let mut list = std::mem::take(&mut self.pending_write);
        for &key in &list {
            let conn = &mut self.conns[key];
            conn.flags &= !PENDING_WRITE;
            if !conn.has(DEAD) {
                self.flush(key);
            }
        }
        list.clear();
        self.pending_write = list;
    }

    /// Writes what is queued for `key`. A socket that fills up gets writable
    /// interest (armed once, kept after) and waits for its event.
    pub(super) fn flush(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.flush(&mut self.pool) {
            Ok((n, drained)) => {
                self.stats.bytes_out += n as u64;
                if drained {
                    self.on_drained(key);
                    return;
                }
                conn.flags |= WRITE_BLOCKED;
                if !conn.has(WRITABLE_ARMED) {
                    conn.flags |= WRITABLE_ARMED;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) =
                        self.poll
                            .registry()
                            .reregister(&mut conn.stream, Token(key), interest)
                    {
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
    pub(super) fn on_drained(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        match conn.phase {
            Phase::Draining => self.kill(key),
            Phase::Closing if conn.has(INPUT_DONE) => self.kill(key),
            Phase::Closing if !conn.has(WRITE_SHUT) => {
                conn.flags |= WRITE_SHUT;
                let _ = conn.stream.shutdown(Shutdown::Write);
                self.add_timer(key, TimerKind::Close, LINGER_MS);
            }
            _ => {}
        }
    }
}
