-- Authenticate a request and spend one unit of its key's request rate, in one round trip.
-- The rate is a GCRA (generic cell rate algorithm): bursts of `rate` requests, then
-- `rate` a second. Times come from the server, so every API process shares one clock.
--
-- KEYS[1]  the digest index (sdq:apikey-by-hash:<sha256>)
-- ARGV[1]  the default rate (requests a second) for keys without their own
--
-- Returns false for an unknown key; else {fields of the key's hash (flat), allowed (1/0),
-- milliseconds to wait when refused, the rate applied}.

local digest_key, default_rate = KEYS[1], tonumber(ARGV[1])

local id = redis.call('GET', digest_key)
if not id then return false end
local key = apikey_key(id)
local fields = redis.call('HGETALL', key)
if #fields == 0 then return false end
if redis.call('HGET', key, 'revoked') == '1' then return {fields, 1, 0, '0'} end
local rate = tonumber(redis.call('HGET', key, 'rate') or '') or default_rate
local burst = math.max(1, math.floor(rate))
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = 1000 / rate
local tolerance = interval * burst
local bucket = rate_key(id)
local tat = tonumber(redis.call('GET', bucket) or '') or now_ms
local next_tat = math.max(tat, now_ms) + interval
local wait = next_tat - tolerance - now_ms
if wait > 0 then return {fields, 0, math.ceil(wait), tostring(rate)} end
redis.call('SET', bucket, tostring(math.floor(next_tat)), 'PX', math.ceil(tolerance) + 1000)
return {fields, 1, 0, tostring(rate)}
