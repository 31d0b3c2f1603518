-- Claim due deliveries by pushing their score past a lease: a dispatcher that dies
-- mid-send leaves them to be claimed again when the lease ends.
-- KEYS[1] the due set. ARGV: now, how many at most, the lease's end. Returns the claimed ids.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return due
