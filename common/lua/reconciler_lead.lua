-- Take or keep the reconciler's leadership (producer/reconciler.py): SET NX, or extend the
-- lease when this process holds it already.
--
-- KEYS[1]  the leader key
-- ARGV[1]  this process's token; ARGV[2] the lease (milliseconds)
--
-- Returns 1 when this process leads, 0 when another does.

local leader, token, lease_ms = KEYS[1], ARGV[1], ARGV[2]

if redis.call('SET', leader, token, 'NX', 'PX', lease_ms) then return 1 end
if redis.call('GET', leader) == token then
  redis.call('PEXPIRE', leader, lease_ms)
  return 1
end
return 0
