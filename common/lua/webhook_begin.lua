-- Count the attempt and take the lease before anything is sent. KEYS: the delivery, the due
-- set, its attempts. ARGV: id, now, lease end, max age, history kept, history TTL.

local dkey, due_set, attempts = KEYS[1], KEYS[2], KEYS[3]
local id, now, lease_end = ARGV[1], ARGV[2], ARGV[3]
local max_age_text, kept, history_ttl = ARGV[4], tonumber(ARGV[5]), ARGV[6]
local max_age = tonumber(max_age_text)

local f = redis.call('HMGET', dkey, 'state', 'first_at', 'inflight_at', 'redeliver')
if f[1] ~= 'pending' then
  redis.call('ZREM', due_set, id)
  return {'skip'}
end
if f[3] then
  redis.call('RPUSH', attempts, cjson.encode({at = tonumber(f[3]), duration_ms = 0,
    error = 'no outcome recorded: the dispatcher stopped during this attempt'}))
  redis.call('LTRIM', attempts, -kept, -1)
  redis.call('EXPIRE', attempts, history_ttl)
end
if not f[4] and tonumber(now) > tonumber(f[2]) + max_age then
  redis.call('HSET', dkey, 'state', 'failed', 'next_at', '',
    'last_error', 'gave up: older than the retry window (' .. max_age_text .. ' s)')
  redis.call('HDEL', dkey, 'inflight', 'inflight_at')
  redis.call('ZREM', due_set, id)
  return {'expired'}
end
local n = redis.call('HINCRBY', dkey, 'attempts', 1)
redis.call('HSET', dkey, 'inflight', n, 'inflight_at', now)
redis.call('HDEL', dkey, 'redeliver')
redis.call('ZADD', due_set, lease_end, id)
return {'send', n}
