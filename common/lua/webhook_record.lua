-- Record an attempt's outcome. KEYS: the delivery, its attempts, the due set. ARGV: id,
-- attempt number, attempt JSON, state, next_at, last_status, last_error, history kept,
-- history TTL, now. A redelivery asked for during the send gets one more attempt, now.

if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[8]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[9])
if redis.call('HGET', KEYS[1], 'inflight') ~= ARGV[2] then return 'stale' end
local state, next_at = ARGV[4], ARGV[5]
if redis.call('HEXISTS', KEYS[1], 'redeliver') == 1 then state, next_at = 'pending', ARGV[10] end
redis.call('HSET', KEYS[1], 'state', state, 'next_at', next_at, 'last_status', ARGV[6],
  'last_error', ARGV[7])
redis.call('HDEL', KEYS[1], 'inflight', 'inflight_at')
if state == 'pending' then
  redis.call('ZADD', KEYS[3], next_at, ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return state
