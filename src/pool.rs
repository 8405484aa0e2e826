//! A pool of byte buffers, so that idle connections own none.
//!
//! A connection takes a buffer when it first needs one (output queued for it,
//! or an unterminated line to keep) and gives it back as soon as it is empty
//! again. The pool keeps a bounded number of modest buffers; anything beyond
//! that, or grown past [`KEEP_CAPACITY`], goes back to the allocator, so a
//! burst does not pin memory for ever.

/// The capacity a fresh buffer starts with.
const INITIAL_CAPACITY: usize = 4096;
/// Buffers that grew beyond this are freed instead of pooled.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Free buffers, all empty, none larger than [`KEEP_CAPACITY`].
#[derive(Debug)]
pub struct BufPool {
    /// The pooled buffers.
    free: Vec<Vec<u8>>,
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
    pub fn take(&mut self, min_capacity: usize) -> Vec<u8> {
        let mut buf = self
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(INITIAL_CAPACITY));
        buf.reserve(min_capacity);
        buf
    }

    /// Takes back `buf` (its contents are dropped) and leaves an unallocated
    /// `Vec` in its place.
    pub fn give(&mut self, buf: &mut Vec<u8>) {
        let mut buf = std::mem::take(buf);
        if buf.capacity() == 0 {
            return;
        }
        if buf.capacity() <= KEEP_CAPACITY && self.free.len() < self.max_free {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Bytes of capacity held by pooled buffers.
    pub fn pooled_bytes(&self) -> usize {
        self.free.iter().map(Vec::capacity).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_bounds() {
        let mut pool = BufPool::new(1);
        let mut a = pool.take(10);
        a.extend_from_slice(b"hello");
        let ptr = a.as_ptr();
        pool.give(&mut a);
        assert_eq!(a.capacity(), 0, "the giver keeps nothing");
        let b = pool.take(10);
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "the buffer was reused");

        let mut big = Vec::with_capacity(KEEP_CAPACITY + 1);
        big.push(1);
        pool.give(&mut big);
        assert_eq!(pool.pooled_bytes(), 0, "oversized buffers are freed");

        let (mut x, mut y) = (pool.take(1), pool.take(1));
        pool.give(&mut x);
        pool.give(&mut y);
        assert_eq!(pool.free.len(), 1, "at most max_free are kept");
    }
}
