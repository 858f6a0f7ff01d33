"""The Lua scripts of the Redis provider: every multi-key change is one atomic script call.

Key names are those of the package docstring (``S`` = ``stream_name``): ``S`` the stream,
``S:ev:<id>`` an event's hash, ``S:index`` the ids by ``created_at``, ``S:counts`` the
counters of the statuses other than ``pending``, which the scripts keep exact (``pending``
is the index's size minus the others, so storing a new pending event, the common write,
touches no counter). A ``pending`` field left in ``S:counts`` by an earlier version is
ignored.

The scripts build the event-hash keys from a prefix argument instead of taking them as
``KEYS``: the client then sends each id once instead of id and key, and packing arguments
is most of the client's cost. This is why the provider supports single nodes and
replicated primaries, not Redis Cluster.

Commands per event are the point of this module (issue 12): a write of new pending events
costs ``ZADD`` + ``HSET`` + ``XADD`` per event and one ``ZCARD`` per call (the
``max_events`` check); a status write costs ``HMGET`` + ``HSET`` per update and one
``HINCRBY`` per status touched per call. The counters are updated once per call from a Lua
table of deltas, not once per event.
"""

from __future__ import annotations

__all__ = ["DELETE", "RENEW", "RETIRE", "UPDATE", "WRITE"]

# Store events and, when asked, append them to the stream: one round trip for both.
# KEYS: index, counts, stream.
# ARGV: max_events, event-key prefix, maxlen (0 = no trimming), origin ('' = none),
#   publish (1/0), then 6 per event: id, score, type, status, processed_at ('' = unset), json.
# The hash holds the JSON and the status (the counters need the old status when an id is
# stored again); the other status fields live only in the JSON until update_status writes
# them, and a reader prefers a hash field over the JSON's value. ZADD answering 0 is how a
# second store of an id is noticed without reading first: only then is the old hash read
# and cleared. Every store lands before any XADD of the call, so a reader never sees an
# event unstored, and the JSON travels once for both.
WRITE = """
local idx, counts, stream, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[2]
local delta = {}
local n = 0
for a = 6, #ARGV, 6 do
  local id, status, processed = ARGV[a], ARGV[a + 3], ARGV[a + 4]
  local key = prefix .. id
  n = n + 1
  if redis.call('ZADD', idx, ARGV[a + 1], id) == 0 then
    local old = redis.call('HGET', key, 'status')
    if old then delta[old] = (delta[old] or 0) - 1 end
    redis.call('DEL', key)
  end
  if processed ~= '' then
    redis.call('HSET', key, 'json', ARGV[a + 5], 'status', status, 'processed_at', processed)
  else
    redis.call('HSET', key, 'json', ARGV[a + 5], 'status', status)
  end
  delta[status] = (delta[status] or 0) + 1
end
local max = tonumber(ARGV[1])
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
if ARGV[5] == '1' then
  local maxlen = tonumber(ARGV[3])
  local origin = ARGV[4]
  for a = 6, #ARGV, 6 do
    local t, json = ARGV[a + 2], ARGV[a + 5]
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

# Status changes, in order. KEYS: counts. ARGV: now (ISO-8601), event-key prefix, then 4 per
# update: id, status, error, retry_count ('' = keep). Unknown events are skipped.
# One HMGET per update (the old status, which the counters need, and whether processed_at
# was ever set), then one HSET of only the changed fields: the JSON is never re-encoded.
UPDATE = """
local counts, now, prefix = KEYS[1], ARGV[1], ARGV[2]
local delta = {}
local done = 0
for a = 3, #ARGV, 4 do
  local key = prefix .. ARGV[a]
  local status = ARGV[a + 1]
  local cur = redis.call('HMGET', key, 'status', 'processed_at')
  local old = cur[1]
  if old then
    done = done + 1
    delta[old] = (delta[old] or 0) - 1
    delta[status] = (delta[status] or 0) + 1
    local f = {'status', status, 'error', ARGV[a + 2]}
    if ARGV[a + 3] ~= '' then
      f[#f + 1] = 'retry_count'
      f[#f + 1] = ARGV[a + 3]
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
