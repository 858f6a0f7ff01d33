"""The Lua scripts of the Redis provider: every multi-key change is one atomic script call.

Key names are those of the package docstring (``S`` = ``stream_name``): ``S`` the stream,
``S:ev:<id>`` an event's hash, ``S:index`` the ids by ``created_at``, ``S:counts`` the
per-status counters, which the scripts keep exact.
"""

from __future__ import annotations

__all__ = ["DELETE", "RENEW", "RETIRE", "UPDATE", "WRITE", "WRITE_FIELDS"]

#: Script arguments per event of :data:`WRITE`.
WRITE_FIELDS = 9

# Store events and, when asked, append them to the stream: one round trip for both.
# KEYS: index, counts, stream, then one event hash per event.
# ARGV: max_events, key prefix, maxlen (0 = no trimming), origin ('' = none), publish (1/0),
#   then 9 per event: id, score, json, status, retry_count, error, processed_at,
#   completed_at, type.
# Every store lands before any XADD of the call, so a reader never sees an event unstored,
# and the JSON travels once for both.
WRITE = """
local n = #KEYS - 3
for i = 0, n - 1 do
  local key = KEYS[4 + i]
  local a = 6 + i * 9
  local old = redis.call('HGET', key, 'status')
  if old then redis.call('HINCRBY', KEYS[2], old, -1) end
  redis.call('HSET', key, 'json', ARGV[a + 2], 'status', ARGV[a + 3], 'retry_count', ARGV[a + 4],
             'error', ARGV[a + 5], 'processed_at', ARGV[a + 6], 'completed_at', ARGV[a + 7])
  redis.call('HINCRBY', KEYS[2], ARGV[a + 3], 1)
  redis.call('ZADD', KEYS[1], ARGV[a + 1], ARGV[a])
end
local max = tonumber(ARGV[1])
if n > 0 and max > 0 then
  local excess = redis.call('ZCARD', KEYS[1]) - max
  if excess > 0 then
    local ids = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
    for _, id in ipairs(ids) do
      local key = ARGV[2] .. id
      local st = redis.call('HGET', key, 'status')
      if st then redis.call('HINCRBY', KEYS[2], st, -1) end
      redis.call('DEL', key)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  end
end
if ARGV[5] == '1' then
  local maxlen = tonumber(ARGV[3])
  local origin = ARGV[4]
  for i = 0, n - 1 do
    local a = 6 + i * 9
    local t, json = ARGV[a + 8], ARGV[a + 2]
    if maxlen > 0 then
      if origin ~= '' then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 't', t, 'e', json, 'o', origin)
      else
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', maxlen, '*', 't', t, 'e', json)
      end
    elseif origin ~= '' then
      redis.call('XADD', KEYS[3], '*', 't', t, 'e', json, 'o', origin)
    else
      redis.call('XADD', KEYS[3], '*', 't', t, 'e', json)
    end
  end
end
return n
"""

# KEYS: counts, then one event hash per update; ARGV: now (ISO-8601), then 3 per update:
# status, error, retry_count ('' = keep). Unknown events are skipped.
UPDATE = """
local now = ARGV[1]
for i = 2, #KEYS do
  local key = KEYS[i]
  local a = 2 + (i - 2) * 3
  local status = ARGV[a]
  local old = redis.call('HGET', key, 'status')
  if old then
    redis.call('HINCRBY', KEYS[1], old, -1)
    redis.call('HINCRBY', KEYS[1], status, 1)
    redis.call('HSET', key, 'status', status, 'error', ARGV[a + 1])
    if ARGV[a + 2] ~= '' then redis.call('HSET', key, 'retry_count', ARGV[a + 2]) end
    if status == 'processing' then
      redis.call('HSET', key, 'processed_at', now)
    elseif status == 'completed' or status == 'failed' then
      redis.call('HSET', key, 'completed_at', now)
      local p = redis.call('HGET', key, 'processed_at')
      if not p or p == '' then redis.call('HSET', key, 'processed_at', now) end
    end
  end
end
return #KEYS - 1
"""

# KEYS: event hash, index, counts; ARGV: id
DELETE = """
local old = redis.call('HGET', KEYS[1], 'status')
if old then redis.call('HINCRBY', KEYS[3], old, -1) end
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
