-- Compare-and-set a job's status, with what the change owes: the refund, the key's count
-- of jobs at once, the status index, the event and its webhook.
--
-- KEYS[1]  the job's hash
-- ARGV[1]  JSON: to (a status), allowed (statuses it may move from), terminal (bool),
--          ttl (0: keep), refund (bool), delivery (bool: a worker received the job's
--          message; count an attempt, take the lease and return the job), lease (seconds),
--          holder (who takes the lease: host and pid), takeover_from (a holder known dead:
--          its lease is not waited out), expired_only (bool: refuse a running job whose
--          lease is live), event, timestamp,
--          delivery_id, now, delivery_ttl, fields (name -> JSON text).
--
-- A running job holds a lease (`lease_until`, and its place in sdq:running): a delivery
-- of a job whose lease is live is refused (its run goes on elsewhere), one whose lease ran
-- out takes the job over. Times come from the store's clock. `started_at` is stamped on a
-- delivery, `finished_at` on a terminal status.
--
-- Returns {1, attempts, refunded credits or false, job fields (delivery only), the
-- store's time}, {0, current, lease holder} when refused, {-1} when the job is missing.

local jobkey = KEYS[1]
local args = cjson.decode(ARGV[1])
local cur = redis.call('HGET', jobkey, 'status')
if not cur then return {-1} end
cur = string.sub(cur, 2, -2)
local allowed = false
for _, status in ipairs(args.allowed) do
  if status == cur then allowed = true end
end
if not allowed then return {0, cur} end
local t = clock()
if cur == 'running' and (args.delivery or args.expired_only) then
  local lease = tonumber(redis.call('HGET', jobkey, 'lease_until') or '0')
  local holder = field(jobkey, 'lease_holder') or ''
  if lease > t and (holder == '' or holder ~= args.takeover_from) then
    return {0, cur, holder}
  end
end

local id, key_id, tier = field(jobkey, 'id'), field(jobkey, 'key_id'), field(jobkey, 'tier')
local terminal_before = cur == 'succeeded' or cur == 'failed' or cur == 'canceled'
redis.call('HSET', jobkey, 'status', '"' .. args.to .. '"')
redis.call('ZREM', queued_key(lane_of(jobkey)), id)
if cur ~= args.to then
  local created = redis.call('ZSCORE', status_key(key_id, cur), id)
  redis.call('ZREM', status_key(key_id, cur), id)
  redis.call('ZADD', status_key(key_id, args.to), created or args.now, id)
end
count('sdq_jobs_total', '{"status":"' .. args.to .. '","tier":"' .. tier .. '"}', 1)
local flat = {}
for name, value in pairs(args.fields) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
if #flat > 0 then redis.call('HSET', jobkey, unpack(flat)) end
local attempts = tonumber(redis.call('HGET', jobkey, 'attempts') or '0')
local stamp = string.format('%.6f', t)
if args.delivery then
  attempts = redis.call('HINCRBY', jobkey, 'attempts', 1)
  local lease = string.format('%.6f', t + args.lease)
  redis.call('HSET', jobkey, 'lease_until', lease, 'lease_holder', cjson.encode(args.holder),
    'started_at', stamp)
  redis.call('ZADD', RUNNING_KEY, lease, id)
end
if args.to == 'succeeded' and cur ~= 'succeeded' and args.fields.images then
  usage(key_id, tier, 'images', #cjson.decode(args.fields.images))
end
if args.terminal then
  redis.call('HSET', jobkey, 'finished_at', stamp)
  redis.call('ZREM', RUNNING_KEY, id)
  -- Retention (common/retention.py): a success's objects go a TTL after now, a failed or
  -- canceled job's at once; one that never ran and has no input has none.
  local input = redis.call('HGET', jobkey, 'init_image_key')
  if args.to == 'succeeded' then
    redis.call('ZADD', EXPIRY_KEY, stamp, id)
  elseif cur == 'running' or (input and input ~= 'null') then
    redis.call('ZADD', EXPIRY_KEY, 0, id)
  end
end
local owner = apikey_key(key_id)
if args.terminal and not terminal_before and redis.call('EXISTS', owner) == 1 then
  redis.call('HINCRBY', owner, 'active', -1)
end
local credits = false
if args.refund and redis.call('HGET', jobkey, 'refunded') ~= 'true' then
  local cost = tonumber(redis.call('HGET', jobkey, 'cost') or '0')
  if cost > 0 and redis.call('EXISTS', owner) == 1 then
    credits = redis.call('HINCRBY', owner, 'credits', cost)
    count('sdq_credits_refunded_total', '{"tier":"' .. tier .. '"}', cost)
    usage(key_id, tier, 'refunded', cost)
  end
  redis.call('HSET', jobkey, 'refunded', 'true')
end
emit(jobkey, args.event, args.timestamp, args.delivery_id, args.now, args.delivery_ttl)
if args.ttl > 0 then
  redis.call('EXPIRE', jobkey, args.ttl)
  redis.call('EXPIRE', events_key(id), args.ttl)
  redis.call('EXPIRE', webhooks_key(id), args.ttl)
end
if args.delivery then return {1, attempts, credits, redis.call('HGETALL', jobkey), stamp} end
return {1, attempts, credits, false, stamp}
