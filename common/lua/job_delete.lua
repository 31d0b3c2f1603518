-- Delete an ended job and all the store keeps of it (DELETE /v1/jobs/{id}): its
-- record, its events, its webhook deliveries and their attempts, its place in its key's
-- indexes; its objects go to the sweeper's set, due at once (common/retention.py).
--
-- KEYS[1]  the job's hash
--
-- Returns {1} deleted, {0, status} when the job has not ended, {-1} when it is missing.

local jobkey = KEYS[1]
local cur = redis.call('HGET', jobkey, 'status')
if not cur then return {-1} end
cur = string.sub(cur, 2, -2)
if cur ~= 'succeeded' and cur ~= 'failed' and cur ~= 'canceled' then return {0, cur} end
local id, key_id = field(jobkey, 'id'), field(jobkey, 'key_id')
for _, did in ipairs(redis.call('LRANGE', webhooks_key(id), 0, -1)) do
  redis.call('DEL', delivery_key(did), attempts_key(did))
  redis.call('ZREM', DUE_KEY, did)
end
redis.call('DEL', jobkey, events_key(id), webhooks_key(id))
redis.call('ZREM', key_jobs_key(key_id), id)
redis.call('ZREM', status_key(key_id, cur), id)
redis.call('ZADD', EXPIRY_KEY, 0, id)
return {1}
