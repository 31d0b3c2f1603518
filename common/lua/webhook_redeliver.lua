-- Make a job's deliveries pending again, keeping first_at. KEYS: the due set, the wake list.
-- ARGV: now, then the delivery ids. A send in progress keeps its lease: _RECORD sees the flag.

local due_set, wake, now = KEYS[1], KEYS[2], ARGV[1]

local n = 0
for i = 2, #ARGV do
  local dkey = delivery_key(ARGV[i])
  if redis.call('EXISTS', dkey) == 1 then
    redis.call('HSET', dkey, 'state', 'pending', 'next_at', now, 'redeliver', '1')
    if redis.call('HEXISTS', dkey, 'inflight') == 0 then
      redis.call('ZADD', due_set, now, ARGV[i])
    end
    n = n + 1
  end
end
if n > 0 then
  redis.call('LPUSH', wake, 'redeliver')
  redis.call('LTRIM', wake, 0, 99)
end
return n
