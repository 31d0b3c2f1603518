-- Jobs a worker started to run in one call with the one its message took (workers/batching.py)
-- leave their keys' turns, so that no message stops at them; a key whose list this empties
-- leaves the ring, as take.lua leaves it (create.lua and requeue.lua put it back). A job
-- that another message took first is no longer in its list: nothing to do for it.
--
-- ARGV  the ids of the jobs, already started.
--
-- Returns how many entries were removed.

local removed = 0
for _, id in ipairs(ARGV) do
  local jobkey = job_key(id)
  local lane, key_id = lane_of(jobkey), field(jobkey, 'key_id')
  local priority = redis.call('HGET', jobkey, 'priority')
  if lane and key_id and priority then
    local mine = fair_list_key(lane, priority, key_id)
    if redis.call('LREM', mine, 1, id) == 1 then
      removed = removed + 1
      if redis.call('LLEN', mine) == 0 then
        redis.call('LREM', fair_ring_key(lane, priority), 0, key_id)
      end
    end
  end
end
return removed
