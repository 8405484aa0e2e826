//! A pool of byte buffers, so that idle connections own none.
//!
//! A connection takes a buffer when it first needs one (output queued for it,
//! or an unterminated line to keep) and gives it back as soon as it is empty
//! again. The pool keeps a bounded number of modest buffers; anything beyond
//! that, or grown past `KEEP_CAPACITY`, goes back to the allocator, so a
//! burst does not pin memory for ever.

/// A pooled byte buffer: the bytes and how many at the front are consumed
/// (written, for an outbound buffer). Boxed, so a connection without one
/// pays a null pointer.
#[derive(Debug, Default)]
pub struct Buf {
    /// The bytes; `data[pos..]` are the live ones.
    pub data: Vec<u8>,
    /// Bytes at the front already consumed.
    pub pos: usize,
    /// A WebSocket connection's output: where the walkable run of the
    /// server's own frames begins. The bytes before it are opaque (the
    /// handshake's answer, or the end of a frame whose start was dropped);
    /// from it, frames follow one another to the end. Zero otherwise.
    pub mark: usize,
    /// A WebSocket connection's kept input: where it is in the client's
    /// frames (see `crate::ws::InState`); default otherwise.
    pub ws: crate::ws::InState,
}

impl Buf {
    /// Live bytes.
    pub fn len(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Whether no live bytes remain.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the live bytes up to and including the first `\n`, in a
    /// buffer of their size: what a connection needs to end the line it may
    /// be in the middle of writing, so that what follows starts a line.
    /// With `and_last`, the last line stays too (a closing connection's
    /// `error:` line).
    pub fn keep_first_line(&mut self, and_last: bool) {
        let live = &self.data[self.pos..];
        let end = memchr::memchr(b'\n', live).map_or(live.len(), |i| i + 1);
        let mut kept = live[..end].to_vec();
        if and_last && end < live.len() {
            let body = &live[end..live.len() - 1];
            let start = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
            kept.extend_from_slice(&live[end + start..]);
        }
        self.data = kept;
        self.pos = 0;
    }

    /// WebSocket output: moves `mark` over the whole frames written.
    fn settle_frames(&mut self) {
        self.mark = settled(&self.data, self.mark, self.pos);
    }

    /// Drops the written front before the buffer grows. For WebSocket
    /// output (`frames`), only whole frames go, so `mark` stays walkable.
    pub fn reclaim(&mut self, frames: bool) {
        if self.pos == 0 {
            return;
        }
        let cut = if frames {
            self.settle_frames();
            self.pos.min(self.mark)
        } else {
            self.pos
        };
        self.data.drain(..cut);
        self.pos -= cut;
        if frames {
            self.mark -= cut;
        }
    }

    /// WebSocket output: keeps only the rest of the frame being written,
    /// in a buffer of its size (as [`Buf::keep_first_line`] does for lines).
    pub fn keep_current_frame(&mut self) {
        let end = self.pos + self.opaque_front();
        self.data = self.data[self.pos..end].to_vec();
        self.pos = 0;
        self.mark = self.data.len();
    }

    /// WebSocket output: how many of the live bytes must go out before a
    /// frame of the server's can start (the rest of the frame, or of the
    /// handshake's answer, being written). A live upgrade hands it over as
    /// the new buffer's `mark`.
    pub fn opaque_front(&self) -> usize {
        let mark = settled(&self.data, self.mark, self.pos);
        let end = if self.pos <= mark {
            mark
        } else {
            let len = crate::ws::server_frame_len(&self.data, mark).unwrap_or(0);
            (mark + len).min(self.data.len())
        };
        end - self.pos
    }
}

/// `mark` moved over the whole frames that end at or before `pos`.
fn settled(data: &[u8], mut mark: usize, pos: usize) -> usize {
    while let Some(len) = crate::ws::server_frame_len(data, mark) {
        if mark + len > pos {
            break;
        }
        mark += len;
    }
    mark
}

/// The capacity a fresh buffer starts with.
const INITIAL_CAPACITY: usize = 512;
/// Buffers that grew beyond this are freed instead of pooled.
const KEEP_CAPACITY: usize = 16 * 1024;

/// How many buffers the pool may hold, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Buffers kept however long they go unused.
    pub keep: usize,
    /// The most buffers kept at once, after a busy turn.
    pub max_free: usize,
    /// The most bytes of capacity kept at once.
    pub max_bytes: usize,
}

/// Free buffers, all empty, none larger than `KEEP_CAPACITY`.
///
/// A busy turn can have a buffer out for each of a thousand recipients;
/// keeping only a few hundred would make most of them a `malloc` and a
/// `free` per delivery. So the pool keeps what a turn gives back, up to
/// `max_free` and `max_bytes`, and [`BufPool::decay`] (called about once a
/// second while it holds more than `keep`) frees the buffers that went
/// unused since the last call.
#[derive(Debug)]
pub struct BufPool {
    /// The pooled buffers, boxed as connections hold them, so taking and
    /// giving back moves a pointer and never reallocates. Used as a stack:
    /// the ones at the bottom are the ones unused longest.
    #[allow(clippy::vec_box)]
    free: Vec<Box<Buf>>,
    limits: PoolLimits,
    /// Bytes of capacity held by `free`.
    bytes: usize,
    /// The fewest free buffers since the last decay: the ones below it went
    /// unused all that time.
    low_water: usize,
}

impl BufPool {
    /// An empty pool.
    pub fn new(limits: PoolLimits) -> BufPool {
        BufPool {
            free: Vec::new(),
            limits,
            bytes: 0,
            low_water: 0,
        }
    }

    /// An empty buffer with room for at least `min_capacity` bytes.
    pub fn take(&mut self, min_capacity: usize) -> Box<Buf> {
        let mut buf = match self.free.pop() {
            Some(buf) => {
                self.bytes -= buf.data.capacity();
                self.low_water = self.low_water.min(self.free.len());
                buf
            }
            None => Box::new(Buf {
                data: Vec::with_capacity(INITIAL_CAPACITY),
                ..Buf::default()
            }),
        };
        buf.data.reserve(min_capacity);
        buf
    }

    /// Takes back the buffer in `slot`, if any (its contents are dropped),
    /// leaving `None`.
    pub fn give(&mut self, slot: &mut Option<Box<Buf>>) {
        let Some(mut buf) = slot.take() else {
            return;
        };
        let capacity = buf.data.capacity();
        if capacity <= KEEP_CAPACITY
            && self.free.len() < self.limits.max_free
            && self.bytes + capacity <= self.limits.max_bytes
        {
            buf.data.clear();
            buf.pos = 0;
            buf.mark = 0;
            buf.ws = crate::ws::InState::default();
            self.bytes += capacity;
            self.free.push(buf);
        }
    }

    /// Whether the pool holds more than it keeps for good, so that
    /// [`BufPool::decay`] should run.
    pub fn is_over_keep(&self) -> bool {
        self.free.len() > self.limits.keep
    }

    /// Frees the buffers beyond `keep` that went unused since the last call
    /// (all of them if none was taken); returns how many.
    pub fn decay(&mut self) -> usize {
        let unused = self.low_water.min(self.free.len());
        let n = unused.saturating_sub(self.limits.keep);
        for buf in self.free.drain(..n) {
            self.bytes -= buf.data.capacity();
        }
        self.low_water = self.free.len();
        n
    }

    /// Frees every pooled buffer (after a burst, so that the allocator can
    /// give their pages back).
    pub fn clear(&mut self) {
        self.free = Vec::new();
        self.bytes = 0;
        self.low_water = 0;
    }

    /// Bytes of capacity held by pooled buffers.
    pub fn pooled_bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_first_line_ends_the_line_being_written() {
        let mut buf = Buf {
            data: b"from a: hello\nfrom b: more\n".to_vec(),
            pos: 10,
            ..Buf::default()
        };
        buf.keep_first_line(false);
        assert_eq!(buf.data, b"llo\n");
        assert_eq!((buf.pos, buf.data.capacity()), (0, 4));
        let mut unended = Buf {
            data: b"abc".to_vec(),
            pos: 1,
            ..Buf::default()
        };
        unended.keep_first_line(false);
        assert_eq!(unended.data, b"bc");
        let mut closing = Buf {
            data: b"from a: x\nfrom a: y\nfrom a: z\nerror: slow-consumer\n".to_vec(),
            pos: 3,
            ..Buf::default()
        };
        closing.keep_first_line(true);
        assert_eq!(closing.data, b"m a: x\nerror: slow-consumer\n");
        let mut two = Buf {
            data: b"ab\nerror: x\n".to_vec(),
            ..Buf::default()
        };
        two.keep_first_line(true);
        assert_eq!(two.data, b"ab\nerror: x\n");
    }

    /// WebSocket output: whole frames are reclaimed, the frame being
    /// written is finished, and a handover knows where frames resume.
    #[test]
    fn websocket_output_keeps_frame_boundaries() {
        let mut data = Vec::new();
        crate::ws::write_upgrade(&mut data, &[b'a'; 28]);
        let http = data.len();
        crate::ws::write_lines(&mut data, b"from a: hello\nfrom b: more\n");
        let mut buf = Buf {
            data,
            pos: 5,
            mark: http,
            ..Buf::default()
        };
        assert_eq!(buf.opaque_front(), http - 5, "the answer first");
        buf.reclaim(true);
        assert_eq!((buf.pos, buf.mark), (0, http - 5));
        buf.pos = http - 5 + 4; // inside the first frame (2 + 13 bytes)
        assert_eq!(buf.opaque_front(), 11);
        buf.reclaim(true);
        assert_eq!((buf.pos, buf.mark), (4, 0), "the frame being written stays");
        buf.keep_current_frame();
        assert_eq!(buf.data, b"om a: hello");
        assert_eq!((buf.pos, buf.mark), (0, 11));
        crate::ws::write_lines(&mut buf.data, b"x\n");
        buf.pos = 11;
        assert_eq!(buf.opaque_front(), 0);
        buf.reclaim(true);
        assert_eq!(
            (buf.pos, buf.mark, &buf.data[..]),
            (0, 0, &b"\x81\x01x"[..])
        );
    }

    fn limits(keep: usize, max_free: usize) -> PoolLimits {
        PoolLimits {
            keep,
            max_free,
            max_bytes: usize::MAX,
        }
    }

    fn give_new(pool: &mut BufPool, capacity: usize) {
        pool.give(&mut Some(Box::new(Buf {
            data: Vec::with_capacity(capacity),
            ..Buf::default()
        })));
    }

    #[test]
    fn reuses_and_bounds() {
        let mut pool = BufPool::new(limits(1, 1));
        let mut a = Some(pool.take(10));
        a.as_mut().unwrap().data.extend_from_slice(b"hello");
        a.as_mut().unwrap().pos = 2;
        let ptr = a.as_ref().unwrap().data.as_ptr();
        pool.give(&mut a);
        assert!(a.is_none(), "the giver keeps nothing");
        let b = pool.take(10);
        assert!(b.is_empty() && b.pos == 0);
        assert_eq!(b.data.as_ptr(), ptr, "the buffer was reused");

        give_new(&mut pool, KEEP_CAPACITY + 1);
        assert_eq!(pool.pooled_bytes(), 0, "oversized buffers are freed");

        let (mut x, mut y) = (Some(pool.take(1)), Some(pool.take(1)));
        pool.give(&mut x);
        pool.give(&mut y);
        assert_eq!(pool.free.len(), 1, "at most max_free are kept");
        assert_eq!(pool.pooled_bytes(), INITIAL_CAPACITY);
        pool.clear();
        assert_eq!(pool.free.capacity(), 0, "a cleared pool holds nothing");
        assert_eq!(pool.pooled_bytes(), 0);
    }

    #[test]
    fn bytes_are_bounded() {
        let mut pool = BufPool::new(PoolLimits {
            keep: 1,
            max_free: 100,
            max_bytes: 3 * 1024,
        });
        for _ in 0..5 {
            give_new(&mut pool, 1024);
        }
        assert_eq!(pool.free.len(), 3);
        assert_eq!(pool.pooled_bytes(), 3 * 1024);
    }

    #[test]
    fn decay_frees_only_what_went_unused() {
        let mut pool = BufPool::new(limits(2, 100));
        for _ in 0..10 {
            give_new(&mut pool, 512);
        }
        pool.decay(); // starts the first period: all 10 count as used
        assert_eq!(pool.free.len(), 10);
        // A busy period: 6 out at once, then back.
        let mut out: Vec<_> = (0..6).map(|_| Some(pool.take(1))).collect();
        for slot in &mut out {
            pool.give(slot);
        }
        assert!(pool.is_over_keep());
        assert_eq!(pool.decay(), 2, "4 went unused; 2 of them are kept");
        assert_eq!(pool.free.len(), 8);
        assert_eq!(pool.decay(), 6, "an idle period frees all beyond keep");
        assert_eq!(pool.free.len(), 2);
        assert_eq!(pool.pooled_bytes(), 2 * 512);
        assert!(!pool.is_over_keep());
    }
}
