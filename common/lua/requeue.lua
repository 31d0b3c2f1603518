-- Put a running job whose lease ran out back in the queue (its worker died), with a new
-- task message, so another worker takes it over now rather than after the broker's
-- visibility timeout. The job goes to the front of its key's turn.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  the broker list to push the message to ('' when the caller publishes it, to a
--          broker other than this Redis); ARGV[2] the task message.
--
-- Returns 1 when requeued, 0 when the job is not running or its lease is live.

local jobkey = KEYS[1]
if redis.call('HGET', jobkey, 'status') ~= '"running"' then return 0 end
if tonumber(redis.call('HGET', jobkey, 'lease_until') or '0') > clock() then return 0 end
local id, key_id = field(jobkey, 'id'), field(jobkey, 'key_id')
local priority, lane = redis.call('HGET', jobkey, 'priority'), lane_of(jobkey)
redis.call('HSET', jobkey, 'status', '"queued"')
redis.call('ZREM', RUNNING_KEY, id)
local created = redis.call('ZSCORE', status_key(key_id, 'running'), id)
redis.call('ZREM', status_key(key_id, 'running'), id)
redis.call('ZADD', status_key(key_id, 'queued'), created or clock(), id)
redis.call('ZADD', queued_key(lane), created or clock(), id)
local mine = fair_list_key(lane, priority, key_id)
redis.call('LPUSH', mine, id)
if redis.call('LLEN', mine) == 1 then redis.call('RPUSH', fair_ring_key(lane, priority), key_id) end
if ARGV[1] ~= '' then redis.call('LPUSH', ARGV[1], ARGV[2]) end
return 1
