//! The name index: which connection holds which name.
//!
//! It knows no sockets, only slab keys. The reactor keeps one invariant with
//! it: a connection is in the index exactly while it claims its name (in a
//! cluster) or is logged in, so a name is free again the moment its
//! connection starts to close.
//!
//! The names themselves live in the connections (`Conn::name`, inline for
//! names up to 24 bytes): the index holds only slab keys, 4 bytes and a
//! control byte a name, and is told how to read a key's name by the caller
//! (`name_of`). So a logged-in connection owns no heap allocation of its
//! own, and a wave of logins leaves no small long-lived chunks scattered
//! over the heap for the next one to fragment around.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

/// Maps each logged-in name to the slab key of its connection.
#[derive(Debug, Default)]
pub struct NameIndex {
    /// Slab keys, hashed by their connection's name. The default SipHash
    /// hasher is kept on purpose: names come from the network, and a keyed
    /// hash stops collision floods.
    keys: HashTable<u32>,
    hasher: RandomState,
}

impl NameIndex {
    /// Gives `name` to `key`; false if another connection holds it already.
    /// `name_of(k)` is the name of the connection at slab key `k`, for
    /// every key in the index; the caller gives `key` its name as the claim
    /// succeeds (it is not read here), and each key keeps its name while
    /// it is in the index.
    pub fn claim<'a>(
        &mut self,
        name: &str,
        key: usize,
        name_of: impl Fn(usize) -> &'a str,
    ) -> bool {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(name);
        match self.keys.entry(
            hash,
            |&k| name_of(k as usize) == name,
            |&k| hasher.hash_one(name_of(k as usize)),
        ) {
            Entry::Occupied(_) => false,
            Entry::Vacant(room) => {
                // Slab keys stay far below 2^32: each is an open descriptor.
                room.insert(key as u32);
                true
            }
        }
    }

    /// The connection holding `name`, if one does.
    pub fn lookup<'a>(&self, name: &str, name_of: impl Fn(usize) -> &'a str) -> Option<usize> {
        let hash = self.hasher.hash_one(name);
        self.keys
            .find(hash, |&k| name_of(k as usize) == name)
            .map(|&k| k as usize)
    }

    /// Frees `name`, held by `key`, or nothing if `key` is not in the
    /// index. `key` must not hold another name: its entry is found by its
    /// key among the entries whose hash tag matches `name`'s, and one of
    /// another name can match.
    pub fn release(&mut self, name: &str, key: usize) {
        let hash = self.hasher.hash_one(name);
        if let Ok(entry) = self.keys.find_entry(hash, |&k| k as usize == key) {
            entry.remove();
        }
    }

    /// Frees most of the table's room when it is mostly empty (after a
    /// burst of logins has gone), keeping room for twice what is held.
    pub fn shrink<'a>(&mut self, name_of: impl Fn(usize) -> &'a str) {
        if self.keys.capacity() > 4 * self.keys.len() {
            let hasher = &self.hasher;
            self.keys.shrink_to(2 * self.keys.len(), |&k| {
                hasher.hash_one(name_of(k as usize))
            });
        }
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names by slab key, as the connections would hold them.
    fn table(names: &[&'static str]) -> impl Fn(usize) -> &'static str {
        let names = names.to_vec();
        move |k| names[k]
    }

    #[test]
    fn claim_lookup_release() {
        let mut r = NameIndex::default();
        let name_of = table(&["", "", "", "alice", "alice"]);
        assert!(r.claim("alice", 3, &name_of));
        assert!(
            !r.claim("alice", 4, &name_of),
            "a held name cannot be claimed twice"
        );
        assert_eq!(r.lookup("alice", &name_of), Some(3));
        assert_eq!(r.lookup("bob", &name_of), None);
        r.release("alice", 3);
        assert!(r.is_empty());
        assert!(
            r.claim("alice", 4, &name_of),
            "a released name is free at once"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r.lookup("alice", &name_of), Some(4));
    }

    /// A connection whose claim of a held name was refused releases its
    /// name as it closes (it never held it): nothing happens. Each index
    /// has its own hash key, so the test tries many. (It once released
    /// with the key of another name's holder, which breaks `release`'s
    /// contract and removed that holder's entry whenever the two names'
    /// hash tags met in one probe group: about one run in a hundred.)
    #[test]
    fn release_frees_only_the_holders_entry() {
        for _ in 0..1000 {
            let mut r = NameIndex::default();
            let name_of = table(&["alice", "bob", "alice"]);
            assert!(r.claim("alice", 0, &name_of));
            assert!(r.claim("bob", 1, &name_of));
            assert!(!r.claim("alice", 2, &name_of));
            r.release("alice", 2); // not alice's holder: nothing happens
            assert_eq!(r.lookup("alice", &name_of), Some(0));
            r.release("alice", 0);
            assert_eq!(r.lookup("alice", &name_of), None);
            assert_eq!(r.lookup("bob", &name_of), Some(1));
        }
    }

    #[test]
    fn grows_and_shrinks_after_a_burst() {
        let mut r = NameIndex::default();
        let names: Vec<&'static str> = (0..1000)
            .map(|i| &*Box::leak(format!("n{i}").into_boxed_str()))
            .collect();
        let name_of = |k: usize| names[k];
        for (key, name) in names.iter().enumerate() {
            assert!(r.claim(name, key, name_of));
        }
        for (key, name) in names.iter().enumerate() {
            assert_eq!(r.lookup(name, name_of), Some(key), "found after growing");
        }
        for (key, name) in names.iter().enumerate().skip(1) {
            r.release(name, key);
        }
        let before = r.keys.capacity();
        r.shrink(name_of);
        assert!(
            r.keys.capacity() < before / 8,
            "{before} -> {}",
            r.keys.capacity()
        );
        assert_eq!(r.lookup("n0", name_of), Some(0), "what is held stays");
    }
}
