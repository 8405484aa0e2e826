//! The Lua scripts the cluster runs in Redis, each one atomic there.
//!
//! Keys, for a prefix `P` (`--cluster-prefix`) and a node id `N`:
//!
//! - `P:lease:N`: the node's lease, a string with a time to live of
//!   `--cluster-lease`. A node is alive exactly while it exists.
//! - `P:name:<name>`: the id of the node holding `<name>`. A name is held
//!   only while its node's lease exists: a name pointing at a node whose
//!   lease is gone is free, so a dead node's names free themselves when
//!   its lease expires, with no traffic per name.
//! - `P:names:N`: the set of names node N claimed, for releasing them all
//!   at once (shutdown, sweep of a dead node).
//! - `P:nodes`: the set of node ids, for the sweep.
//! - channel `P:node:N`: what node N's clients are sent by other nodes.
//!
//! Every script takes no `KEYS` and builds key names itself: the cluster
//! runs on one Redis (or one shard of names per Redis, see docs/CLUSTER.md),
//! not on a Redis Cluster with hash slots.

/// `claim(prefix, node, name)`: 1 when `name` is now held by `node`, 0 when
/// a live node holds it, -1 when `node`'s own lease is gone (it must not
/// hold anything: fenced).
pub const CLAIM: &str = r"
local prefix, me, name = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', prefix .. ':lease:' .. me) == 0 then return -1 end
local key = prefix .. ':name:' .. name
local owner = redis.call('GET', key)
if owner and owner ~= me and redis.call('EXISTS', prefix .. ':lease:' .. owner) == 1 then
  return 0
end
redis.call('SET', key, me)
redis.call('SADD', prefix .. ':names:' .. me, name)
return 1
";

/// `release(prefix, node, name)`: frees `name` if `node` holds it.
pub const RELEASE: &str = r"
local prefix, me, name = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. ':name:' .. name
if redis.call('GET', key) == me then redis.call('DEL', key) end
redis.call('SREM', prefix .. ':names:' .. me, name)
return 1
";

/// `route(prefix, node, payload, name...)`: publishes
/// `<names>\n<payload>` once to each live node holding some of the names
/// (`<names>` being those it holds, comma-separated), and returns two lists
/// in the order given: the names nobody holds, and the names whose node
/// is not subscribed to its channel right now (its link to Redis is down:
/// the message could not be handed to it). -1 when `node`'s own lease is
/// gone: a node without a lease routes nothing as its clients.
pub const ROUTE: &str = r"
local prefix, payload = ARGV[1], ARGV[3]
if redis.call('EXISTS', prefix .. ':lease:' .. ARGV[2]) == 0 then return -1 end
local holder, by_node, order = {}, {}, {}
for i = 4, #ARGV do
  local name = ARGV[i]
  local owner = redis.call('GET', prefix .. ':name:' .. name)
  if owner and redis.call('EXISTS', prefix .. ':lease:' .. owner) == 1 then
    if not by_node[owner] then
      by_node[owner] = {}
      order[#order + 1] = owner
    end
    local names = by_node[owner]
    names[#names + 1] = name
    holder[i] = owner
  end
end
local unreached = {}
for _, node in ipairs(order) do
  local channel = prefix .. ':node:' .. node
  local message = table.concat(by_node[node], ',') .. '\n' .. payload
  if redis.call('PUBLISH', channel, message) == 0 then unreached[node] = true end
end
local offline, unreachable = {}, {}
for i = 4, #ARGV do
  local node = holder[i]
  if not node then
    offline[#offline + 1] = ARGV[i]
  elseif unreached[node] then
    unreachable[#unreachable + 1] = ARGV[i]
  end
end
return {offline, unreachable}
";

/// `drop_names(prefix, node)`: frees every name `node` holds and forgets
/// its set of names (a name another node took since is left alone), at
/// shutdown or when a node takes a new lease after losing its old one
/// (what it still holds is claimed again, one by one, after). One call:
/// the claims again must come after all of it. O(names of the node).
pub const DROP_NAMES: &str = r"
local prefix, node = ARGV[1], ARGV[2]
local set = prefix .. ':names:' .. node
for _, name in ipairs(redis.call('SMEMBERS', set)) do
  local key = prefix .. ':name:' .. name
  if redis.call('GET', key) == node then redis.call('DEL', key) end
end
redis.call('DEL', set)
return 1
";

/// `sweep(prefix, budget)`: forgets the nodes whose lease is gone, and
/// their names (which are free already, but still take memory), at most
/// `budget` names a call, so that no call keeps Redis from its other
/// clients for long: a million names of dead nodes in one call kept a
/// Redis on a busy machine past its `busy-reply-threshold` (5 s; every
/// command then fails with `BUSY`). What is left waits for the next
/// sweep, which every node runs with each lease renewal. O(nodes) when
/// nobody died. Returns how many nodes were forgotten.
pub const SWEEP: &str = r"
local prefix, left = ARGV[1], tonumber(ARGV[2])
local swept = 0
for _, node in ipairs(redis.call('SMEMBERS', prefix .. ':nodes')) do
  if left <= 0 then break end
  if redis.call('EXISTS', prefix .. ':lease:' .. node) == 0 then
    local set = prefix .. ':names:' .. node
    for _, name in ipairs(redis.call('SPOP', set, left)) do
      local key = prefix .. ':name:' .. name
      if redis.call('GET', key) == node then redis.call('DEL', key) end
      left = left - 1
    end
    if redis.call('EXISTS', set) == 0 then
      redis.call('SREM', prefix .. ':nodes', node)
      swept = swept + 1
    end
  end
end
return swept
";

/// Names one sweep frees at most (see [`SWEEP`]): about 10 ms of a
/// healthy Redis's time.
pub const SWEEP_BUDGET: usize = 2000;

/// Every script, in the order the link loads them (`Script as usize`).
pub const ALL: [&str; 5] = [CLAIM, RELEASE, ROUTE, DROP_NAMES, SWEEP];

/// Indexes into [`ALL`] and into the link's loaded SHA1s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Claim = 0,
    Release = 1,
    Route = 2,
    DropNames = 3,
    Sweep = 4,
}
