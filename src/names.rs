//! The name index: which connection holds which name.
//!
//! It knows no sockets, only slab keys. The reactor keeps one invariant with
//! it: a connection is in the index exactly while it claims its name (in a
//! cluster) or is logged in, so a name is free again the moment its
//! connection starts to close.

use std::collections::HashMap;
use std::rc::Rc;

/// Maps each logged-in name to the slab key of its connection.
#[derive(Debug, Default)]
pub struct NameIndex {
    /// Name to slab key. The name is shared with the connection (one
    /// allocation for both). The default SipHash hasher is kept on purpose:
    /// names come from the network, and a keyed hash stops collision floods.
    names: HashMap<Rc<str>, usize>,
}

impl NameIndex {
    /// Gives `name` to `key`; false if another connection holds it already.
    pub fn claim(&mut self, name: &Rc<str>, key: usize) -> bool {
        if self.names.contains_key(&**name) {
            return false;
        }
        self.names.insert(Rc::clone(name), key);
        true
    }

    /// The connection holding `name`, if one does.
    pub fn lookup(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    /// Frees `name`. Only the holder may call this.
    pub fn release(&mut self, name: &str) {
        self.names.remove(name);
    }

    /// Frees most of the table's room when it is mostly empty (after a
    /// burst of logins has gone), keeping room for twice what is held.
    pub fn shrink(&mut self) {
        if self.names.capacity() > 4 * self.names.len() {
            self.names.shrink_to(2 * self.names.len());
        }
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_lookup_release() {
        let mut r = NameIndex::default();
        let alice: Rc<str> = Rc::from("alice");
        assert!(r.claim(&alice, 3));
        assert!(
            !r.claim(&Rc::from("alice"), 4),
            "a held name cannot be claimed twice"
        );
        assert_eq!(r.lookup("alice"), Some(3));
        assert_eq!(r.lookup("bob"), None);
        r.release("alice");
        assert!(r.is_empty());
        assert!(r.claim(&alice, 4), "a released name is free at once");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn shrinks_after_a_burst() {
        let mut r = NameIndex::default();
        let names: Vec<Rc<str>> = (0..1000).map(|i| Rc::from(format!("n{i}"))).collect();
        for (key, name) in names.iter().enumerate() {
            assert!(r.claim(name, key));
        }
        for name in &names[1..] {
            r.release(name);
        }
        let before = r.names.capacity();
        r.shrink();
        assert!(
            r.names.capacity() < before / 8,
            "{before} -> {}",
            r.names.capacity()
        );
        assert_eq!(r.lookup("n0"), Some(0), "what is held stays");
    }
}
