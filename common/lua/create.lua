-- Charge a key once for a set of jobs and record them all as queued, or write nothing.
--
-- KEYS[1]  the key's hash            KEYS[2]  the key's jobs index (sorted by creation)
-- KEYS[3]  the idempotency record    KEYS[4]  the batch record
-- ARGV[1]  the plan, JSON built by JobStore._create_call from validated fields:
--   cost, digest ('' without an Idempotency-Key), idempotency_ttl, timestamp, now,
--   delivery_ttl, stuck_ttl, batch ('' for none), max_jobs (the default cap), and jobs: a list of
--   {id, created_at, tier, lane, priority, cost, fields (name -> JSON text), queued_delivery,
--   list, message ('' and '' when the caller publishes to the broker itself)}.
--
-- `created_at` is the store's clock, so waits are measured on one clock; the last-resort
-- TTL (stuck_ttl) bounds a record that never ends.
--
-- Returns {1, credits_left, created_at}, {0, credits} when the key cannot pay, {2, record} when the
-- Idempotency-Key was seen, {3, active, cap} over the key's cap of jobs at once,
-- {-1} for an unknown key, {-2} for a revoked one, {-4} for a disabled one.
--
-- Every check comes before the first write: an error or a refusal leaves nothing behind.

local plan = cjson.decode(ARGV[1])
if plan.digest ~= '' then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {2, seen} end
end
local key = redis.call('HMGET', KEYS[1], 'credits', 'revoked', 'max_jobs', 'active', 'disabled')
if not key[1] then return {-1, 0} end
if key[2] == '1' then return {-2, 0} end
if key[5] == '1' then return {-4, 0} end
local credits = tonumber(key[1])
if credits < plan.cost then return {0, credits} end
local cap = tonumber(key[3]) or plan.max_jobs
local active = tonumber(key[4]) or 0
if active + #plan.jobs > cap then return {3, active, cap} end

local created = clock()
local key_id = string.sub(KEYS[1], string.len(apikey_key('')) + 1)
local left = redis.call('HINCRBY', KEYS[1], 'credits', -plan.cost)
redis.call('HINCRBY', KEYS[1], 'active', #plan.jobs)
local ids = {}
for i, job in ipairs(plan.jobs) do
  -- A microsecond apart, so a batch keeps its order in every index.
  local created_text = string.format('%.6f', created + (i - 1) / 1000000)
  if job.list ~= '' then redis.call('LPUSH', job.list, job.message) end
  local jobkey = job_key(job.id)
  local flat = {}
  for name, value in pairs(job.fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  redis.call('HSET', jobkey, unpack(flat))
  redis.call('HSET', jobkey, 'created_at', created_text)
  redis.call('EXPIRE', jobkey, plan.stuck_ttl)
  redis.call('ZADD', KEYS[2], created_text, job.id)
  redis.call('ZADD', status_key(key_id, 'queued'), created_text, job.id)
  redis.call('ZADD', queued_key(job.lane), created_text, job.id)
  -- Fair share: a ring of the keys with jobs waiting in this lane at this priority.
  local mine = fair_list_key(job.lane, job.priority, key_id)
  if redis.call('RPUSH', mine, job.id) == 1 then
    redis.call('RPUSH', fair_ring_key(job.lane, job.priority), key_id)
  end
  count('sdq_jobs_total', '{"status":"queued","tier":"' .. job.tier .. '"}', 1)
  count('sdq_credits_debited_total', '{"tier":"' .. job.tier .. '"}', job.cost)
  usage(key_id, job.tier, 'debited', job.cost)
  emit(jobkey, 'job.queued', plan.timestamp, job.queued_delivery, plan.now, plan.delivery_ttl)
  ids[#ids + 1] = job.id
end
if plan.batch ~= '' then
  redis.call('SET', KEYS[4], plan.batch, 'EX', plan.delivery_ttl)
end
if plan.digest ~= '' then
  redis.call('SET', KEYS[3], plan.digest .. ' ' .. table.concat(ids, ','),
    'EX', plan.idempotency_ttl)
end
return {1, left, string.format('%.6f', created)}
