-- Shared by every job script: common/lua/__init__.py prepends it to each one, after the key
-- names it generates from common/redis_keys.py. A job hash's values are JSON, written by
-- Python. A lane is where jobs wait: a tier for its default model, `tier.model` for another.

-- The store's clock, in seconds: every machine's leases and waits are measured by it.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Fleet metrics (common/metrics.py): a hash per metric, a field per label set.
local function count(name, labels, amount)
  redis.call('HINCRBYFLOAT', METRICS_PREFIX .. name, labels, amount)
end

-- The UTC date (YYYY-MM-DD) of a time in seconds: days-to-civil (H. Hinnant's algorithm),
-- since Lua in Redis has no os.date.
local function utc_day(t)
  local z = math.floor(t / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02d', y, m, d)
end

-- Usage per key and UTC day, and for the whole fleet (common/usage.py): a hash per day,
-- fields `<tier>:<what>` (images, debited, refunded), each day kept about 400 days.
local function usage(key_id, tier, what, amount)
  if amount == 0 then return end
  local day = utc_day(clock())
  for _, hash in ipairs({key_usage_key(key_id, day), fleet_usage_key(day)}) do
    redis.call('HINCRBY', hash, tier .. ':' .. what, amount)
    redis.call('EXPIRE', hash, 34560000)
  end
end

-- A JSON string value of a job hash field, unquoted. The values were encoded by Python's
-- json.dumps from validated fields, so a plain strip of the quotes is exact for ids/names.
local function field(jobkey, name)
  local raw = redis.call('HGET', jobkey, name)
  if not raw then return nil end
  return string.sub(raw, 2, -2)
end

-- What an event carries: the job without its key and its request (the request is stored
-- once, on the record; webhook bodies add it back at send time).
local function snapshot(jobkey)
  local flat = redis.call('HGETALL', jobkey)
  local parts = {}
  for i = 1, #flat, 2 do
    local name = flat[i]
    if name ~= 'key_id' and name ~= 'request' and name ~= 'webhook' then
      parts[#parts + 1] = '"' .. name .. '":' .. flat[i + 1]
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Schedule a webhook delivery of `etype` when the job asked for it. `ref_name`/`ref_value`
-- say where its body comes from at send time: `seq` of a logged event, or `progress`.
local function schedule(jobkey, etype, did, ts, now, dttl, ref_name, ref_value)
  local hook = redis.call('HGET', jobkey, 'webhook')
  if not hook then return end
  hook = cjson.decode(hook)
  for _, name in ipairs(hook['events']) do
    if name == etype then
      local dkey, id = delivery_key(did), field(jobkey, 'id')
      redis.call('HSET', dkey, 'id', did, 'job_id', id,
        'key_id', field(jobkey, 'key_id'), 'event', etype, 'url', hook['url'],
        'state', 'pending', 'attempts', 0, 'first_at', now, 'next_at', now,
        'timestamp', ts, ref_name, ref_value)
      redis.call('EXPIRE', dkey, dttl)
      redis.call('RPUSH', webhooks_key(id), did)
      redis.call('ZADD', DUE_KEY, now, did)
      redis.call('LPUSH', WAKE_KEY, did)
      redis.call('LTRIM', WAKE_KEY, 0, 99)
      return
    end
  end
end

-- Log a status event (its seq is its place in the log), publish it, schedule its webhook.
local function emit(jobkey, etype, ts, did, now, dttl)
  local id = field(jobkey, 'id')
  local eventskey = events_key(id)
  local seq = redis.call('RPUSH', eventskey, '')
  local event = '{"seq":' .. seq .. ',"type":"' .. etype .. '","timestamp":"' .. ts
    .. '","data":' .. snapshot(jobkey) .. '}'
  redis.call('LSET', eventskey, seq - 1, event)
  redis.call('PUBLISH', events_channel(id), event)
  schedule(jobkey, etype, did, ts, now, dttl, 'seq', seq)
end

-- A job's lane; records written before lanes existed wait in their tier's.
local function lane_of(jobkey)
  local lane = field(jobkey, 'lane')
  if not lane or lane == '' then return field(jobkey, 'tier') end
  return lane
end
