-- Record an attempt's outcome. KEYS: the delivery, its attempts, the due set. ARGV: id,
-- attempt number, attempt JSON, state, next_at, last_status, last_error, history kept,
-- history TTL, now. A redelivery asked for during the send gets one more attempt, now.

local dkey, attempts, due_set = KEYS[1], KEYS[2], KEYS[3]
local id, number, attempt, new_state, new_next_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local last_status, last_error, kept, history_ttl = ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local now = ARGV[10]

if redis.call('EXISTS', dkey) == 0 then return 'missing' end
redis.call('RPUSH', attempts, attempt)
redis.call('LTRIM', attempts, -kept, -1)
redis.call('EXPIRE', attempts, history_ttl)
if redis.call('HGET', dkey, 'inflight') ~= number then return 'stale' end
local state, next_at = new_state, new_next_at
if redis.call('HEXISTS', dkey, 'redeliver') == 1 then state, next_at = 'pending', now end
redis.call('HSET', dkey, 'state', state, 'next_at', next_at, 'last_status', last_status,
  'last_error', last_error)
redis.call('HDEL', dkey, 'inflight', 'inflight_at')
if state == 'pending' then
  redis.call('ZADD', due_set, next_at, id)
else
  redis.call('ZREM', due_set, id)
end
return state
