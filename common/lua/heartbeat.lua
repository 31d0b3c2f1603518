-- Renew the lease of a running job, while its worker runs it.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  the lease (seconds); ARGV[2] the attempt that holds it: a worker whose run was
--          taken over (its lease ran out, another worker started the job) renews nothing.
--
-- Returns the job's status (JSON text) when the lease was renewed, or false when this run
-- no longer holds the job (canceled, ended, taken over, or gone).

local jobkey = KEYS[1]
local cur = redis.call('HGET', jobkey, 'status')
if cur ~= '"running"' or redis.call('HGET', jobkey, 'attempts') ~= ARGV[2] then return false end
local lease = string.format('%.6f', clock() + tonumber(ARGV[1]))
redis.call('HSET', jobkey, 'lease_until', lease)
redis.call('ZADD', RUNNING_KEY, 'XX', lease, field(jobkey, 'id'))
return cur
