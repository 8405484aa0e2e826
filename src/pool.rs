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
}

/// The capacity a fresh buffer starts with.
const INITIAL_CAPACITY: usize = 512;
/// Buffers that grew beyond this are freed instead of pooled.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Free buffers, all empty, none larger than `KEEP_CAPACITY`.
#[derive(Debug)]
pub struct BufPool {
    /// The pooled buffers, boxed as connections hold them, so taking and
    /// giving back moves a pointer and never reallocates.
    #[allow(clippy::vec_box)]
    free: Vec<Box<Buf>>,
    /// The most buffers kept at once.
    max_free: usize,
}

impl BufPool {
    /// A pool that keeps at most `max_free` buffers.
    pub fn new(max_free: usize) -> BufPool {
        BufPool {
            free: Vec::new(),
            max_free,
        }
    }

    /// An empty buffer with room for at least `min_capacity` bytes.
    pub fn take(&mut self, min_capacity: usize) -> Box<Buf> {
        let mut buf = self.free.pop().unwrap_or_else(|| {
            Box::new(Buf {
                data: Vec::with_capacity(INITIAL_CAPACITY),
                pos: 0,
            })
        });
        buf.data.reserve(min_capacity);
        buf
    }

    /// Takes back the buffer in `slot`, if any (its contents are dropped),
    /// leaving `None`.
    pub fn give(&mut self, slot: &mut Option<Box<Buf>>) {
        let Some(mut buf) = slot.take() else {
            return;
        };
        if buf.data.capacity() <= KEEP_CAPACITY && self.free.len() < self.max_free {
            buf.data.clear();
            buf.pos = 0;
            self.free.push(buf);
        }
    }

    /// Frees every pooled buffer (after a burst, so that the allocator can
    /// give their pages back).
    pub fn clear(&mut self) {
        self.free = Vec::new();
    }

    /// Bytes of capacity held by pooled buffers.
    pub fn pooled_bytes(&self) -> usize {
        self.free.iter().map(|b| b.data.capacity()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let mut pool = BufPool::new(1);
        let mut a = Some(pool.take(10));
        a.as_mut().unwrap().data.extend_from_slice(b"hello");
        a.as_mut().unwrap().pos = 2;
        let ptr = a.as_ref().unwrap().data.as_ptr();
        pool.give(&mut a);
        assert!(a.is_none(), "the giver keeps nothing");
        let b = pool.take(10);
        assert!(b.is_empty() && b.pos == 0);
        assert_eq!(b.data.as_ptr(), ptr, "the buffer was reused");

        let mut big = Some(Box::new(Buf {
            data: Vec::with_capacity(KEEP_CAPACITY + 1),
            pos: 0,
        }));
        pool.give(&mut big);
        assert_eq!(pool.pooled_bytes(), 0, "oversized buffers are freed");

        let (mut x, mut y) = (Some(pool.take(1)), Some(pool.take(1)));
        pool.give(&mut x);
        pool.give(&mut y);
        assert_eq!(pool.free.len(), 1, "at most max_free are kept");
        pool.clear();
        assert_eq!(pool.free.capacity(), 0, "a cleared pool holds nothing");
    }
}
