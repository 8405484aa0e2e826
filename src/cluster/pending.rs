//! The FIFO's entries: what each command in flight to Redis was for, and
//! what the link learned from the answers, for the reactor to apply. Pure
//! data; `mod.rs` keeps the FIFO, `replies.rs` and `link.rs` turn what
//! Redis says (or that it said nothing) into answers.

use std::rc::Rc;

use super::batch::Sent;
use super::scripts::Script;
use crate::conn::Slot;

/// What one command in flight was for, and what to do with its answer.
#[derive(Debug)]
pub(super) enum Pending {
    /// `HELLO 3` (its answer has the connection's id).
    Hello,
    /// `CLIENT KILL ID <id>` of an earlier connection of this link (see
    /// `Shard::stale_links`).
    KillStale(i64),
    /// `SCRIPT LOAD` of one script.
    Load(Script),
    /// A lease renewal (`SET ... XX`) sent at `sent_ms`.
    Renew { sent_ms: u64 },
    /// A new lease (`SET ... NX`) sent at `sent_ms`.
    Acquire { sent_ms: u64 },
    /// A command whose answer only has to be an error or not.
    Plain,
    /// A release of `name` (its outcome is uncertain if the link breaks);
    /// `group` as for a claim (one answer, `1`, for the whole group). Not
    /// timed: a link too slow to carry a window of releases within the
    /// reply timeout would be reset again and again, the same releases
    /// sent each time. Claims and routes behind them are timed.
    Release { name: String, group: u32 },
    /// `CONFIG GET maxmemory-policy`.
    Policy,
    /// The check of this Redis's place among the shards.
    Layout,
    /// A claim of `name` for the connection `slot`; `again` when the node
    /// claims a name it held before its lease was lost; `retried` when it
    /// was found taken once already (see `Shard::retry_claim`).
    /// Claims go to Redis a turn's worth at a time, in one script call
    /// answered by one array: `group` is how many claims (this one and
    /// those right after it) that answer is for, set on the first of them
    /// when the call is sent (the others keep 1, never read).
    Claim {
        slot: Slot,
        name: Rc<str>,
        again: bool,
        retried: bool,
        sent_ms: u64,
        group: u32,
    },
    /// One turn's lines to other nodes (`batch.rs`), the first staged at
    /// `sent_ms`.
    Batch { sent: Sent, sent_ms: u64 },
    /// A line held for `slot` (by the reactor) that must follow the
    /// answers before it.
    Held { slot: Slot },
    /// Shutdown: the node's names and lease are dropped.
    Farewell,
}

impl Pending {
    /// The connection the entry speaks for, if one (a batch speaks for
    /// each of its lines' senders: see `Shard::unwait`).
    pub(super) fn slot(&self) -> Option<Slot> {
        match self {
            Pending::Claim { slot, .. } | Pending::Held { slot, .. } => Some(*slot),
            _ => None,
        }
    }

    /// When it was sent, for the reply timeout (`None`: not timed).
    pub(super) fn sent_ms(&self) -> Option<u64> {
        match self {
            Pending::Renew { sent_ms }
            | Pending::Acquire { sent_ms }
            | Pending::Claim { sent_ms, .. }
            | Pending::Batch { sent_ms, .. } => Some(*sent_ms),
            _ => None,
        }
    }
}

/// How a claim ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// The name is this node's.
    Held,
    /// A live node holds it.
    Taken,
    /// Redis could not be asked, or this node's lease is gone.
    Unavailable,
}

/// What the link learned, for the reactor to apply in this order.
#[derive(Debug)]
pub(crate) enum Answer {
    /// A claim ended.
    Claimed {
        slot: Slot,
        name: Rc<str>,
        again: bool,
        outcome: Claimed,
    },
    /// A routed message was handed to every node holding a recipient and
    /// listening; `offline` are the names nobody holds (for `not-online`),
    /// `unreachable` those whose node is not listening (for
    /// `unavailable`).
    /// `joined`: the line was routed with `joined` (its answer is one
    /// part of the line's answer, see `shards.rs`).
    Routed {
        slot: Slot,
        offline: Vec<String>,
        unreachable: Vec<String>,
        joined: bool,
    },
    /// A message could not be routed to `names` (for `unavailable`).
    Unroutable {
        slot: Slot,
        names: Vec<String>,
        joined: bool,
    },
    /// The oldest line the reactor holds for `slot` behind earlier answers
    /// may be sent now.
    Held { slot: Slot },
    /// Other nodes sent lines to local clients: records of names and a
    /// line (`batch::records`).
    Deliver { payload: Vec<u8> },
    /// The lease on `shard` was lost and taken anew: every name of that
    /// shard still held here must be claimed again (`Cluster::claim` with
    /// `again`).
    ClaimAgain { shard: usize },
    /// Back after an outage: these names were claimed or released while
    /// the outcome could not be known. Each held here is claimed again
    /// (`again`), each not held here is released.
    Reconcile(Vec<String>),
    /// The connection `slot` waits for no more answers: its input, held
    /// back meanwhile, can be read again.
    Unthrottle { slot: Slot },
    /// The connection `slot` waits for no more answers (a client that
    /// half-closed may be closed now). Said of a batch's senders, whose
    /// lines all reached their recipients: no [`Answer::Routed`] is
    /// needed for those.
    Settled { slot: Slot },
    /// The farewell (shutdown) was answered.
    FarewellDone,
}

impl Answer {
    /// The connection the answer is for, if one.
    pub fn slot(&self) -> Option<Slot> {
        match self {
            Answer::Claimed { slot, .. }
            | Answer::Routed { slot, .. }
            | Answer::Unroutable { slot, .. }
            | Answer::Held { slot, .. }
            | Answer::Unthrottle { slot }
            | Answer::Settled { slot } => Some(*slot),
            _ => None,
        }
    }
}
