"""The Lua scripts of the Redis provider: every multi-key change is one atomic script call.

Key names are those of the package docstring (``S`` = ``stream_name``): ``S`` the stream,
``S:ev:<id>`` an event's hash, ``S:index`` the ids by ``created_at``, ``S:counts`` the
counters of the statuses other than ``pending``, which the scripts keep exact (``pending``
is the index's size minus the others, so storing a new pending event, the common write,
touches no counter). A ``pending`` field left in ``S:counts`` by an earlier version is
ignored.

The scripts take only the stream as ``KEYS`` and name the other keys from it, and pack each
event's small fields into one argument: packing arguments is most of the client's cost
(about 0.45 µs each in redis-py), so a one-event publish sends 9 arguments instead of 17.
Naming keys inside a script is why the provider supports single nodes and replicated
primaries, not Redis Cluster.

Commands per event are the point of this module (issue 12): a write of new pending events
costs ``ZADD`` + ``HSET`` + ``XADD`` per event and one ``ZCARD`` per call (the
``max_events`` check); a status write costs ``HMGET`` + ``HSET`` per update and one
``HINCRBY`` per status touched per call. The counters are updated once per call from a Lua
table of deltas, not once per event.
"""

from __future__ import annotations

__all__ = ["DELETE", "RENEW", "RETIRE", "UPDATE", "WRITE"]

# Store events and, when asked, append them to the stream: one round trip for both.
# KEYS: the stream S (S:index, S:counts and S:ev:<id> are named from it).
# ARGV: settings 'max_events,maxlen,publish' (maxlen 0 = no trimming, publish 1/0), origin
#   ('' = none), then 3 per event: 'score,status,processed_at,id' (processed_at '' = unset;
#   the id last, so it may hold any character), type, json.
# The hash holds the JSON and the status (the counters need the old status when an id is
# stored again); the other status fields live only in the JSON until update_status writes
# them, and a reader prefers a hash field over the JSON's value. ZADD answering 0 is how a
# second store of an id is noticed without reading first: only then is the old hash read
# and cleared. Every store lands before any XADD of the call, so a reader never sees an
# event unstored, and the JSON travels once for both.
WRITE = """
local stream = KEYS[1]
local idx, counts, prefix = stream .. ':index', stream .. ':counts', stream .. ':ev:'
local max, maxlen, publish = string.match(ARGV[1], '^(%d+),(%d+),([01])$')
max, maxlen = tonumber(max), tonumber(maxlen)
local origin = ARGV[2]
local delta = {}
local n = 0
for a = 3, #ARGV, 3 do
  local score, status, processed, id = string.match(ARGV[a], '^(-?%d+),(%l+),([^,]*),(.*)$')
  local key = prefix .. id
  n = n + 1
  if redis.call('ZADD', idx, score, id) == 0 then
    local old = redis.call('HGET', key, 'status')
    if old then delta[old] = (delta[old] or 0) - 1 end
    redis.call('DEL', key)
  end
  if processed ~= '' then
    redis.call('HSET', key, 'json', ARGV[a + 2], 'status', status, 'processed_at', processed)
  else
    redis.call('HSET', key, 'json', ARGV[a + 2], 'status', status)
  end
  delta[status] = (delta[status] or 0) + 1
end
if n > 0 and max > 0 then
  local excess = redis.call('ZCARD', idx) - max
  if excess > 0 then
    local ids = redis.call('ZRANGE', idx, 0, excess - 1)
    for _, id in ipairs(ids) do
      local key = prefix .. id
      local st = redis.call('HGET', key, 'status')
      if st then delta[st] = (delta[st] or 0) - 1 end
      redis.call('DEL', key)
    end
    redis.call('ZREMRANGEBYRANK', idx, 0, excess - 1)
  end
end
for st, d in pairs(delta) do
  if d ~= 0 and st ~= 'pending' then redis.call('HINCRBY', counts, st, d) end
end
if publish == '1' then
  for a = 3, #ARGV, 3 do
    local t, json = ARGV[a + 1], ARGV[a + 2]
    if maxlen > 0 then
      if origin ~= '' then
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 't', t, 'e', json, 'o', origin)
      else
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 't', t, 'e', json)
      end
    elseif origin ~= '' then
      redis.call('XADD', stream, '*', 't', t, 'e', json, 'o', origin)
    else
      redis.call('XADD', stream, '*', 't', t, 'e', json)
    end
  end
end
return n
"""

# Status changes, in order. KEYS: the stream S (S:counts and S:ev:<id> are named from it).
# ARGV: now (ISO-8601), then 2 per update: 'status,retry_count,id' (retry_count '' = keep;
# the id last, so it may hold any character), error. Unknown events are skipped.
# One HMGET per update (the old status, which the counters need, and whether processed_at
# was ever set), then one HSET of only the changed fields: the JSON is never re-encoded.
UPDATE = """
local counts, prefix, now = KEYS[1] .. ':counts', KEYS[1] .. ':ev:', ARGV[1]
local delta = {}
local done = 0
for a = 2, #ARGV, 2 do
  local status, retry, id = string.match(ARGV[a], '^(%l+),(%d*),(.*)$')
  local key = prefix .. id
  local cur = redis.call('HMGET', key, 'status', 'processed_at')
  local old = cur[1]
  if old then
    done = done + 1
    delta[old] = (delta[old] or 0) - 1
    delta[status] = (delta[status] or 0) + 1
    local f = {'status', status, 'error', ARGV[a + 1]}
    if retry ~= '' then
      f[#f + 1] = 'retry_count'
      f[#f + 1] = retry
    end
    if status == 'processing' then
      f[#f + 1] = 'processed_at'
      f[#f + 1] = now
    elseif status == 'completed' or status == 'failed' then
      f[#f + 1] = 'completed_at'
      f[#f + 1] = now
      if not cur[2] or cur[2] == '' then
        f[#f + 1] = 'processed_at'
        f[#f + 1] = now
      end
    end
    redis.call('HSET', key, unpack(f))
  end
end
for st, d in pairs(delta) do
  if d ~= 0 and st ~= 'pending' then redis.call('HINCRBY', counts, st, d) end
end
return done
"""

# KEYS: event hash, index, counts; ARGV: id
DELETE = """
local old = redis.call('HGET', KEYS[1], 'status')
if old and old ~= 'pending' then redis.call('HINCRBY', KEYS[3], old, -1) end
redis.call('DEL', KEYS[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: stream; ARGV: group, consumer, ids... -> the ids still owned by consumer, re-claimed
# (idle time reset to 0). An id another member already reclaimed is left alone.
RENEW = """
local renewed = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
"""

# KEYS: stream; ARGV: group, consumer -> delete the consumer if it holds no pending entries.
RETIRE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if p[1] then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) + 1
"""
