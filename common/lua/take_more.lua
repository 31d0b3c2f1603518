-- More jobs for one pipeline call (workers/batching.py): waiting jobs a worker chose to run
-- beside the one its message took, each taken out of its key's turn so that no message takes
-- it too. A job that another message took first (gone from its key's list) or that is no
-- longer queued is left alone. Their own messages later find them running: nothing to do.
--
-- ARGV  the ids of the jobs to take.
--
-- Returns the ids taken, in ARGV's order.

local taken = {}
for _, id in ipairs(ARGV) do
  local jobkey = job_key(id)
  local lane, key_id = lane_of(jobkey), field(jobkey, 'key_id')
  local priority = redis.call('HGET', jobkey, 'priority')
  if lane and key_id and priority
      and redis.call('LREM', fair_list_key(lane, priority, key_id), 1, id) == 1
      and redis.call('HGET', jobkey, 'status') == '"queued"' then
    taken[#taken + 1] = id
  end
end
return taken
