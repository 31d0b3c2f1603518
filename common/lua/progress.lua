-- Record denoising steps of a running job, each its own (unlogged) event, and tell
-- whoever listens. Progress events carry the job's id, status and step only.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  delivery TTL; then per step, four values: the progress as JSON
--          ({"step":..,"total":..}), its timestamp, its delivery id, its time.
--
-- Returns the job's status (JSON text), so the worker learns of a cancel in the same
-- round trip; false when the job is missing.

local jobkey = KEYS[1]
local cur = redis.call('HGET', jobkey, 'status')
if not cur then return false end
if cur ~= '"running"' then return cur end
local id = field(jobkey, 'id')
local dttl = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  local progress, ts, did, now = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  redis.call('HSET', jobkey, 'progress', progress)
  redis.call('PUBLISH', events_channel(id), '{"type":"job.progress","timestamp":"' .. ts
    .. '","data":{"id":"' .. id .. '","status":"running","progress":' .. progress .. '}}')
  schedule(jobkey, 'job.progress', did, ts, now, dttl, 'progress', progress)
end
return cur
