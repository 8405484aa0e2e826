//! The lines a node sends other nodes in one loop turn, as one script call.
//!
//! Every line to names not held here is staged in the turn's [`Batch`],
//! grouped by where the node last found each name (its [`Holders`] cache):
//! one payload per (node, epoch) it guesses, one more for the names it
//! knows nothing of. At the end of the turn (or before any other command,
//! so that the FIFO keeps the order of events) the batch becomes one
//! `EVALSHA send` (`scripts::SEND`). Redis checks each guess once per
//! group: the guessed node's lease lives and its epoch, bumped by every
//! name it releases, is the one the guess was made at. Then no name of the
//! group can have moved, and the payload is published as it is, without a
//! lookup per name. A group that fails the check, and the names nobody
//! guessed, are looked up name by name, in the same call; the answer says
//! where they were found, which the cache learns. So the cache only picks
//! a channel: `not-online` and `unavailable` always come from Redis.
//!
//! A payload is a sequence of records, `<names> <length>\n<line>`: the
//! recipients of one line on the node it goes to, comma-separated, and the
//! line, `length` bytes. Records keep the order the lines were routed in,
//! so per sender and recipient order holds within a batch, as it does
//! between batches (one connection, one script after the other).
//!
//! A batch also carries markers ([`Batch::add_marker`]): a line the
//! reactor holds for a sender behind its answers is released when the
//! answers before it are in, and a marker staged among the turn's lines
//! is answered in its place among theirs, with no command of its own and
//! without cutting the batch in two.

use std::collections::HashMap;
use std::rc::Rc;

use crate::conn::Slot;

/// Bytes of payload in one batch at most: past it, the batch is sent and
/// another begins (a single longer line goes alone). A few hundred lines:
/// the script's cost per call is shared by enough of them, and Redis
/// starts on a batch (and answers it, which tells the node it is alive)
/// before the turn's later ones have crossed a slow link. Well under the
/// smallest frame a node accepts from Redis (1 MiB, `max_reply`).
pub(super) const BATCH_BYTES: usize = 16 << 10;
/// Recipient names in one batch at most, for the same reason: the answer
/// lists some of them, and Redis looks up at most this many at once.
pub(super) const BATCH_NAMES: usize = 4096;
/// Names the cache remembers at most; past it, it starts over (a batch
/// then looks its names up once more). About 4 MiB at the most.
const CACHE_NAMES: usize = 65_536;

/// Where names were last found: name → (node, that node's epoch then).
#[derive(Debug, Default)]
pub(super) struct Holders {
    names: HashMap<Box<str>, (Rc<str>, u64)>,
    /// The node ids the entries share.
    nodes: Vec<Rc<str>>,
}

impl Holders {
    fn get(&self, name: &str) -> Option<&(Rc<str>, u64)> {
        self.names.get(name)
    }

    /// Remembers that Redis found `name` on `node` at `epoch`.
    pub(super) fn learn(&mut self, name: &str, node: &[u8], epoch: u64) {
        if self.names.len() >= CACHE_NAMES && !self.names.contains_key(name) {
            self.names.clear();
            self.nodes.clear();
        }
        let node = match self.nodes.iter().find(|n| n.as_bytes() == node) {
            Some(known) => Rc::clone(known),
            None => {
                let Ok(id) = std::str::from_utf8(node) else {
                    return;
                };
                let id: Rc<str> = Rc::from(id);
                self.nodes.push(Rc::clone(&id));
                id
            }
        };
        self.names.insert(name.into(), (node, epoch));
    }

    /// Forgets `name` (Redis found it held by nobody).
    pub(super) fn forget(&mut self, name: &str) {
        self.names.remove(name);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.names.len()
    }
}

/// Names in one string, each found by its number: no allocation per name.
#[derive(Debug, Default)]
pub(crate) struct Names {
    text: String,
    ends: Vec<u32>,
}

impl Names {
    fn push(&mut self, name: &str) {
        self.text.push_str(name);
        self.ends.push(self.text.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The `i`-th name.
    pub fn get(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        &self.text[start..self.ends[i] as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i))
    }

    fn extend(&mut self, other: &Names) {
        other.iter().for_each(|name| self.push(name));
    }
}

/// One destination of a batch: a node and the epoch the names were found
/// at, or (`node` `None`) the names the cache does not know.
#[derive(Debug)]
struct Group {
    node: Option<Rc<str>>,
    epoch: u64,
    /// The records.
    payload: Vec<u8>,
    /// The names in the records, in order.
    names: Names,
}

/// The lines staged this turn.
#[derive(Debug, Default)]
pub(super) struct Batch {
    groups: Vec<Group>,
    /// Per line: who sent it, and where its names are in `occurrences`.
    lines: Vec<(Slot, u32, u32)>,
    /// The lines (by index, in order) whose answer is joined with other
    /// shards' (see [`Sent::joined`]).
    joined: Vec<u32>,
    /// The lines (by index, in order) that are markers (see
    /// [`Sent::markers`]).
    markers: Vec<u32>,
    /// Per recipient of each line, in the line's order: (group, position
    /// of the name in the group).
    occurrences: Vec<(u32, u32)>,
    bytes: usize,
}

/// A sent batch, awaiting its answer: what the FIFO keeps.
#[derive(Debug)]
pub(crate) struct Sent {
    /// Per line: who sent it, and where its names are in `occurrences`.
    pub lines: Vec<(Slot, u32, u32)>,
    /// The lines (by index, in order) that are answered even when they
    /// reached everyone: with several shards their answers are joined
    /// with other shards' (`shards.rs`). Empty with one shard.
    pub joined: Vec<u32>,
    /// The lines (by index, in order) that are markers, no line at all:
    /// each is answered `Answer::Held` in its place.
    pub markers: Vec<u32>,
    /// Per recipient of each line: its index in `names`.
    pub occurrences: Vec<u32>,
    /// Every name of the batch, in the order the script numbers them
    /// (from 1).
    pub names: Names,
}

/// What one entry of a sent batch is (see [`Sent::entries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A marker: answered `Answer::Held` in its place.
    Marker,
    /// A line; `joined`: answered even when it reached everyone.
    Line { joined: bool },
}

impl Sent {
    /// Each entry in order: its index in `lines`, its sender, what it is.
    pub fn entries(&self) -> impl Iterator<Item = (usize, Slot, Entry)> + '_ {
        let mut joined = self.joined.iter().peekable();
        let mut markers = self.markers.iter().peekable();
        self.lines
            .iter()
            .enumerate()
            .map(move |(i, &(slot, _, _))| {
                let at = i as u32;
                let entry = match markers.next_if_eq(&&at) {
                    Some(_) => Entry::Marker,
                    None => Entry::Line {
                        joined: joined.next_if_eq(&&at).is_some(),
                    },
                };
                (i, slot, entry)
            })
    }

    /// The names of line `i`, in order.
    pub fn line_names(&self, i: usize) -> impl Iterator<Item = &str> {
        let (_, from, to) = self.lines[i];
        self.occurrences[from as usize..to as usize]
            .iter()
            .map(|&n| self.names.get(n as usize))
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether a line of `len` bytes to `names` recipients must wait for
    /// the next batch.
    pub fn is_full_for(&self, len: usize, names: usize) -> bool {
        !self.is_empty()
            && (self.bytes + len > BATCH_BYTES || self.occurrences.len() + names > BATCH_NAMES)
    }

    /// Stages a marker for `slot` after the lines staged so far (see the
    /// module's text): no names, no bytes.
    pub fn add_marker(&mut self, slot: Slot) {
        self.markers.push(self.lines.len() as u32);
        let at = self.occurrences.len() as u32;
        self.lines.push((slot, at, at));
    }

    /// Stages `line` from `slot` to `names` (none held here, each once);
    /// `joined`: it is answered even if it reaches everyone.
    pub fn add(
        &mut self,
        holders: &Holders,
        slot: Slot,
        names: &[&str],
        line: &[u8],
        joined: bool,
    ) {
        if joined {
            self.joined.push(self.lines.len() as u32);
        }
        let from = self.occurrences.len() as u32;
        // The groups the line reaches, in order: one, nearly always.
        let mut touched: smallvec_free::Few = Default::default();
        for &name in names {
            let group = self.group_for(holders.get(name));
            let names = &mut self.groups[group].names;
            self.occurrences.push((group as u32, names.len() as u32));
            names.push(name);
            touched.add(group as u32);
        }
        // One record per group the line reaches, its names in order.
        let occurrences = &self.occurrences[from as usize..];
        for group in touched.iter() {
            let g = &mut self.groups[group as usize];
            let start = g.payload.len();
            let mut first = true;
            for &(_, pos) in occurrences.iter().filter(|(gr, _)| *gr == group) {
                if !first {
                    g.payload.push(b',');
                }
                first = false;
                g.payload
                    .extend_from_slice(g.names.get(pos as usize).as_bytes());
            }
            g.payload.push(b' ');
            push_decimal(&mut g.payload, line.len());
            g.payload.push(b'\n');
            g.payload.extend_from_slice(line);
            self.bytes += g.payload.len() - start;
        }
        self.lines.push((slot, from, self.occurrences.len() as u32));
    }

    fn group_for(&mut self, guess: Option<&(Rc<str>, u64)>) -> usize {
        let found = self.groups.iter().position(|g| match (&g.node, guess) {
            (None, None) => true,
            (Some(node), Some((guessed, epoch))) => Rc::ptr_eq(node, guessed) && g.epoch == *epoch,
            _ => false,
        });
        found.unwrap_or_else(|| {
            self.groups.push(Group {
                node: guess.map(|(node, _)| Rc::clone(node)),
                epoch: guess.map_or(0, |&(_, epoch)| epoch),
                payload: Vec::new(),
                names: Names::default(),
            });
            self.groups.len() - 1
        })
    }

    /// The script's arguments after the prefix and the node id: the number
    /// of groups, then per group its node (empty: unknown), epoch, number
    /// of names and payload. And what the FIFO keeps of it. Leaves the
    /// batch empty.
    pub fn seal(&mut self) -> (Vec<Vec<u8>>, Sent) {
        let groups = std::mem::take(&mut self.groups);
        let mut args = Vec::with_capacity(1 + 4 * groups.len());
        args.push(groups.len().to_string().into_bytes());
        let mut offsets = Vec::with_capacity(groups.len());
        let mut names = Names::default();
        for g in groups {
            offsets.push(names.len() as u32);
            args.push(g.node.as_deref().unwrap_or("").as_bytes().to_vec());
            args.push(g.epoch.to_string().into_bytes());
            args.push(g.names.len().to_string().into_bytes());
            args.push(g.payload);
            names.extend(&g.names);
        }
        let occurrences = self
            .occurrences
            .drain(..)
            .map(|(group, pos)| offsets[group as usize] + pos)
            .collect();
        self.bytes = 0;
        let sent = Sent {
            lines: std::mem::take(&mut self.lines),
            joined: std::mem::take(&mut self.joined),
            markers: std::mem::take(&mut self.markers),
            occurrences,
            names,
        };
        (args, sent)
    }

    /// The staged lines, dropped unsent (the link broke): each line's
    /// sender and names.
    pub fn abandon(&mut self) -> Sent {
        self.seal().1
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// The groups one line reaches, without allocating for the first four.
mod smallvec_free {
    #[derive(Default)]
    pub struct Few {
        first: [u32; 4],
        len: usize,
        more: Vec<u32>,
    }

    impl Few {
        pub fn add(&mut self, group: u32) {
            if self.iter().any(|g| g == group) {
                return;
            }
            if self.len < self.first.len() {
                self.first[self.len] = group;
                self.len += 1;
            } else {
                self.more.push(group);
            }
        }

        pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
            self.first[..self.len].iter().chain(&self.more).copied()
        }
    }
}

/// The records of a payload: each line and the names it is for. Stops at
/// the first record that is not well formed (a payload not from a chatd
/// node).
pub(crate) fn records(payload: &[u8]) -> Records<'_> {
    Records { rest: payload }
}

pub(crate) struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header_end = memchr::memchr(b'\n', self.rest)?;
        let header = &self.rest[..header_end];
        let space = memchr::memrchr(b' ', header)?;
        let len: usize = std::str::from_utf8(&header[space + 1..])
            .ok()?
            .parse()
            .ok()?;
        let end = (header_end + 1).checked_add(len)?;
        let body = self.rest.get(header_end + 1..end)?;
        // One line, `\n` at its end and nowhere else: a record cannot
        // slip other lines, or a part of one, into a client's stream.
        if memchr::memchr(b'\n', body) != Some(len.checked_sub(1)?) {
            return None;
        }
        let names = &header[..space];
        self.rest = &self.rest[end..];
        Some((names, body))
    }
}

/// Writes the one record of a message in the previous nodes' format
/// (`<names>\n<line>`, from a node of an earlier version).
pub(crate) fn record_of_message(message: &[u8]) -> Option<Vec<u8>> {
    let split = memchr::memchr(b'\n', message)?;
    let (names, line) = (&message[..split], &message[split + 1..]);
    let mut record = Vec::with_capacity(message.len() + 8);
    record.extend_from_slice(names);
    record.push(b' ');
    push_decimal(&mut record, line.len());
    record.push(b'\n');
    record.extend_from_slice(line);
    Some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: u32) -> Slot {
        Slot { key, id: key }
    }

    fn names<'a>(list: &'a [&'a str]) -> &'a [&'a str] {
        list
    }

    #[test]
    fn lines_group_by_the_node_their_names_were_found_on() {
        let mut holders = Holders::default();
        holders.learn("bob", b"B", 7);
        holders.learn("carol", b"B", 7);
        holders.learn("erin", b"C", 3);
        let mut batch = Batch::default();
        batch.add(
            &holders,
            slot(1),
            names(&["bob", "dave", "carol"]),
            b"from a: 1\n",
            false,
        );
        batch.add(&holders, slot(2), names(&["erin"]), b"from z: 2\n", false);
        batch.add(&holders, slot(1), names(&["bob"]), b"from a: 3\n", false);
        let (args, sent) = batch.seal();
        let text: Vec<String> = args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(
            text,
            [
                "3",
                "B",
                "7",
                "3",
                "bob,carol 10\nfrom a: 1\nbob 10\nfrom a: 3\n",
                "",
                "0",
                "1",
                "dave 10\nfrom a: 1\n",
                "C",
                "3",
                "1",
                "erin 10\nfrom z: 2\n",
            ]
        );
        let all: Vec<&str> = sent.names.iter().collect();
        assert_eq!(all, ["bob", "carol", "bob", "dave", "erin"]);
        let line0: Vec<&str> = sent.line_names(0).collect();
        assert_eq!(line0, ["bob", "dave", "carol"], "the order given");
        assert_eq!(sent.occurrences, [0, 3, 1, 4, 2]);
        assert!(batch.is_empty());
    }

    #[test]
    fn records_read_back_what_was_written_and_stop_at_garbage() {
        let mut batch = Batch::default();
        let holders = Holders::default();
        batch.add(
            &holders,
            slot(1),
            names(&["bob", "carol"]),
            b"from a: x y\n",
            false,
        );
        batch.add(&holders, slot(1), names(&["bob"]), b"from a: \xff\n", false);
        let (args, _) = batch.seal();
        let got: Vec<_> = records(&args[4]).collect();
        assert_eq!(
            got,
            [
                (&b"bob,carol"[..], &b"from a: x y\n"[..]),
                (&b"bob"[..], &b"from a: \xff\n"[..])
            ]
        );
        for bad in [
            &b"bob 99\nshort"[..],
            b"bob x\n",
            b"no header",
            b"bob 3",
            b"bob 18446744073709551615\nfrom x: y\n",
            b"bob 0\n",
            b"bob 14\nfrom evil: 3\nbob 2\nx\n",
            b"bob 3\nabc",
        ] {
            assert_eq!(records(bad).count(), 0, "{bad:?}");
        }
        let old = record_of_message(b"bob,carol\nfrom a: hi\n").unwrap();
        assert_eq!(
            records(&old).collect::<Vec<_>>(),
            [(&b"bob,carol"[..], &b"from a: hi\n"[..])]
        );
    }

    #[test]
    fn a_batch_is_full_at_its_bounds_but_takes_one_line_of_any_size() {
        let mut batch = Batch::default();
        let holders = Holders::default();
        assert!(
            !batch.is_full_for(10 * BATCH_BYTES, 1),
            "an empty batch takes it"
        );
        batch.add(
            &holders,
            slot(1),
            names(&["bob"]),
            &vec![b'x'; BATCH_BYTES],
            false,
        );
        assert!(batch.is_full_for(1, 1));
        let mut batch = Batch::default();
        let many: Vec<String> = (0..BATCH_NAMES).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        batch.add(&holders, slot(1), &many, b"x\n", false);
        assert!(batch.is_full_for(1, 1));
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 12345, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut holders = Holders::default();
        for i in 0..CACHE_NAMES + 10 {
            holders.learn(&format!("n{i}"), b"B", 1);
        }
        assert!(holders.len() <= CACHE_NAMES);
        assert_eq!(holders.nodes.len(), 1);
    }
}
