-- Make a job's deliveries pending again, keeping first_at. KEYS: the due set, the wake list.
-- ARGV: now, then the delivery ids. A send in progress keeps its lease: _RECORD sees the flag.

local n = 0
for i = 2, #ARGV do
  local dkey = 'sdq:webhook:' .. ARGV[i]
  if redis.call('EXISTS', dkey) == 1 then
    redis.call('HSET', dkey, 'state', 'pending', 'next_at', ARGV[1], 'redeliver', '1')
    if redis.call('HEXISTS', dkey, 'inflight') == 0 then
      redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    end
    n = n + 1
  end
end
if n > 0 then
  redis.call('LPUSH', KEYS[2], 'redeliver')
  redis.call('LTRIM', KEYS[2], 0, 99)
end
return n
