-- Take or keep the reconciler's leadership (producer/reconciler.py): SET NX, or extend the
-- lease when this process holds it already.
--
-- KEYS[1]  the leader key
-- ARGV[1]  this process's token; ARGV[2] the lease (milliseconds)
--
-- Returns 1 when this process leads, 0 when another does.

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
