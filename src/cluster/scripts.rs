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
//! - `P:layout`: this Redis's place in the nodes' `--cluster` list (see
//!   `LAYOUT`), kept while nodes use it.
//! - `P:epoch:N`: a number node N bumps with every name it releases (set
//!   to a random number with each new lease): while it and the lease stay,
//!   no name found on N can have left it (see `SEND`).
//! - channel `P:lines:N`: what node N's clients are sent by other nodes.
//! - channel `P:node:N`: the same, from nodes of earlier versions (one
//!   message per line).
//!
//! Every script takes no `KEYS` and builds key names itself: the cluster
//! runs on one Redis (or one shard of names per Redis, see docs/CLUSTER.md),
//! not on a Redis Cluster with hash slots.

/// `claim(prefix, node, name...)`: claims each name for `node`, in order,
/// and answers one number per name: 1 when it is now held by `node`, 0
/// when a live node holds it, -1 when `node`'s own lease is gone (it must
/// not hold anything: fenced). A node sends the claims of one loop turn
/// in one call (a login wave costs Redis one script per turn, not one per
/// login).
pub const CLAIM: &str = r"
local prefix, me = ARGV[1], ARGV[2]
local results = {}
if redis.call('EXISTS', prefix .. ':lease:' .. me) == 0 then
  for i = 3, #ARGV do results[#results + 1] = -1 end
  return results
end
local live, held = {}, {}
for i = 3, #ARGV do
  local name = ARGV[i]
  local key = prefix .. ':name:' .. name
  local owner = redis.call('GET', key)
  local taken = false
  if owner and owner ~= me then
    if live[owner] == nil then
      live[owner] = redis.call('EXISTS', prefix .. ':lease:' .. owner) == 1
    end
    taken = live[owner]
  end
  if taken then
    results[#results + 1] = 0
  else
    redis.call('SET', key, me)
    held[#held + 1] = name
    results[#results + 1] = 1
  end
end
for from = 1, #held, 1000 do
  redis.call('SADD', prefix .. ':names:' .. me, unpack(held, from, math.min(from + 999, #held)))
end
return results
";

/// `release(prefix, node, name...)`: frees each name `node` holds, and
/// bumps `node`'s epoch once (an epoch that is not a number, which only a
/// hand could write, is deleted instead: the node then counts as one
/// without an epoch, looked up name by name, until it sets a new one). A
/// node sends the releases of one loop turn in one call.
pub const RELEASE: &str = r"
local prefix, me = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  local key = prefix .. ':name:' .. ARGV[i]
  if redis.call('GET', key) == me then redis.call('DEL', key) end
end
for from = 3, #ARGV, 1000 do
  redis.call('SREM', prefix .. ':names:' .. me, unpack(ARGV, from, math.min(from + 999, #ARGV)))
end
local epoch = prefix .. ':epoch:' .. me
if type(redis.pcall('INCR', epoch)) == 'table' then redis.call('DEL', epoch) end
return 1
";

/// `send(prefix, node, groups, [dest, epoch, count, payload]...)`: one
/// turn's lines from `node` to other nodes (`batch.rs` writes the
/// arguments; a payload is records `<names> <length>\n<line>`, a group's
/// `count` names in all). A group whose `dest` still holds a lease and
/// whose epoch is still `epoch` cannot have lost a name since its names
/// were found there: its payload is published as it is, on the node's
/// channel `P:lines:<dest>`. Every other group, and the group of names not
/// known (`dest` empty), is looked up name by name, and its records are
/// published to the nodes found holding them. Names are numbered from 1
/// over all groups in order; the answer is three lists: the numbers of the
/// names nobody holds, of those whose node did not receive the line (its
/// link is down: nobody listens on its channel), and (number, node, epoch)
/// for up to 1,000 names found by lookup, for the sender's cache. A node
/// without an epoch is of an earlier version: it is sent the previous
/// format (`<names>\n<line>` per line on `P:node:<dest>`). -1 when
/// `node`'s own lease is gone: a node without a lease routes nothing as
/// its clients.
pub const SEND: &str = r"
local prefix, me, groups = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', prefix .. ':lease:' .. me) == 0 then return -1 end
local epochs = {}
local function epoch_of(node)
  local epoch = epochs[node]
  if epoch == nil then
    local state = redis.call('MGET', prefix .. ':lease:' .. node, prefix .. ':epoch:' .. node)
    epoch = (state[1] and (state[2] or '')) or false
    epochs[node] = epoch
  end
  return epoch
end
local offline, unreachable, resolved = {}, {}, {}
local slow, keys, base = {}, {}, 0
for g = 0, groups - 1 do
  local at = 4 + 4 * g
  local dest, epoch, count, payload = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3]
  if dest ~= '' and epoch_of(dest) == epoch then
    if redis.call('PUBLISH', prefix .. ':lines:' .. dest, payload) == 0 then
      for i = base + 1, base + count do unreachable[#unreachable + 1] = i end
    end
  else
    local pos, size, i = 1, #payload, base
    while pos <= size do
      local nl = string.find(payload, '\n', pos, true)
      local header = string.sub(payload, pos, nl - 1)
      local space = string.find(header, ' [^ ]*$')
      local len = tonumber(string.sub(header, space + 1))
      local names = {}
      for name in string.gmatch(string.sub(header, 1, space - 1), '[^,]+') do
        names[#names + 1] = name
        keys[#keys + 1] = prefix .. ':name:' .. name
      end
      slow[#slow + 1] = {names, string.sub(payload, nl + 1, nl + len), i}
      i = i + #names
      pos = nl + len + 1
    end
  end
  base = base + count
end
if #slow == 0 then return {offline, unreachable, resolved} end
local owners = {}
for from = 1, #keys, 1000 do
  local part = redis.call('MGET', unpack(keys, from, math.min(from + 999, #keys)))
  for k = 1, #part do owners[from + k - 1] = part[k] end
end
local out, old, reached, order, n = {}, {}, {}, {}, 0
for _, record in ipairs(slow) do
  local names, line, i = record[1], record[2], record[3]
  local here, seen = {}, {}
  for _, name in ipairs(names) do
    n, i = n + 1, i + 1
    local owner = owners[n]
    local epoch = owner and epoch_of(owner)
    if epoch then
      if not here[owner] then here[owner] = {}; seen[#seen + 1] = owner end
      local list = here[owner]
      list[#list + 1] = name
      if not reached[owner] then
        reached[owner], out[owner], old[owner] = {}, {}, {}
        order[#order + 1] = owner
      end
      local r = reached[owner]
      r[#r + 1] = i
      if #resolved < 3000 then
        resolved[#resolved + 1] = i
        resolved[#resolved + 1] = owner
        resolved[#resolved + 1] = epoch
      end
    else
      offline[#offline + 1] = i
    end
  end
  for _, owner in ipairs(seen) do
    local list, t, o = table.concat(here[owner], ','), out[owner], old[owner]
    t[#t + 1] = list .. ' ' .. #line .. '\n'
    t[#t + 1] = line
    o[#o + 1] = list .. '\n' .. line
  end
end
for _, owner in ipairs(order) do
  local got = 0
  if epochs[owner] ~= '' then
    got = redis.call('PUBLISH', prefix .. ':lines:' .. owner, table.concat(out[owner]))
  else
    for _, message in ipairs(old[owner]) do
      got = redis.call('PUBLISH', prefix .. ':node:' .. owner, message)
      if got == 0 then break end
    end
  end
  if got == 0 then
    for _, i in ipairs(reached[owner]) do unreachable[#unreachable + 1] = i end
  end
end
return {offline, unreachable, resolved}
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
local epoch = prefix .. ':epoch:' .. node
if type(redis.pcall('INCR', epoch)) == 'table' then redis.call('DEL', epoch) end
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
      redis.call('DEL', prefix .. ':epoch:' .. node)
      swept = swept + 1
    end
  end
end
return swept
";

/// Names one sweep frees at most (see [`SWEEP`]): about 10 ms of a
/// healthy Redis's time.
pub const SWEEP_BUDGET: usize = 2000;

/// `layout(prefix, layout, ttl)`: checks that this Redis has the same
/// place in every node's `--cluster` list (`P:layout`, e.g. `0/1`, or
/// `1/3 a:6379,b:6379,c:6379` with several): answers 1 and keeps the key
/// for `ttl` ms more (every node refreshes it with its sweep), or the
/// layout another node gave it. Two lists in one cluster would put one
/// name on two Redis, held twice. With an empty layout (a node leaving),
/// the key goes if no node is left.
pub const LAYOUT: &str = r"
local key, layout = ARGV[1] .. ':layout', ARGV[2]
if layout == '' then
  if redis.call('EXISTS', ARGV[1] .. ':nodes') == 0 then redis.call('DEL', key) end
  return 1
end
local other = redis.call('GET', key)
if other and other ~= layout then return other end
redis.call('SET', key, layout, 'PX', ARGV[3])
return 1
";

/// Every script, in the order the link loads them (`Script as usize`).
pub const ALL: [&str; 6] = [CLAIM, RELEASE, SEND, DROP_NAMES, SWEEP, LAYOUT];

/// The SHA1 of each script, as `SCRIPT LOAD` answers it (lower-case hex):
/// a command queued right after the loads may run one.
pub fn shas() -> [Vec<u8>; 6] {
    use sha1::{Digest, Sha1};
    ALL.map(|script| {
        let digest = Sha1::digest(script.as_bytes());
        digest
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect()
    })
}

/// Indexes into [`ALL`] and into the link's loaded SHA1s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Claim = 0,
    Release = 1,
    Send = 2,
    DropNames = 3,
    Sweep = 4,
    Layout = 5,
}
