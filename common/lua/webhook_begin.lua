-- Count the attempt and take the lease before anything is sent. KEYS: the delivery, the due
-- set, its attempts. ARGV: id, now, lease end, max age, history kept, history TTL.

local f = redis.call('HMGET', KEYS[1], 'state', 'first_at', 'inflight_at', 'redeliver')
if f[1] ~= 'pending' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'skip'}
end
if f[3] then
  redis.call('RPUSH', KEYS[3], cjson.encode({at = tonumber(f[3]), duration_ms = 0,
    error = 'no outcome recorded: the dispatcher stopped during this attempt'}))
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[5]), -1)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
if not f[4] and tonumber(ARGV[2]) > tonumber(f[2]) + tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'next_at', '',
    'last_error', 'gave up: older than the retry window (' .. ARGV[4] .. ' s)')
  redis.call('HDEL', KEYS[1], 'inflight', 'inflight_at')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'expired'}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'inflight', n, 'inflight_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'redeliver')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return {'send', n}
