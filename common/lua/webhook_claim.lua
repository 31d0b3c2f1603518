-- Claim due deliveries by pushing their score past a lease: a dispatcher that dies
-- mid-send leaves them to be claimed again when the lease ends.
-- KEYS[1] the due set. ARGV: now, how many at most, the lease's end. Returns the claimed ids.

local due_set, now, limit, lease_end = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local due = redis.call('ZRANGEBYSCORE', due_set, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do redis.call('ZADD', due_set, 'XX', lease_end, id) end
return due
