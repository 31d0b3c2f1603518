-- Give a key a new webhook signing secret; the one it replaces keeps signing, beside the new
-- one, until the overlap ends (Standard Webhooks: several signatures in one header). The
-- audit entry is written in the same step. A second rotation within the overlap drops the
-- oldest secret.
--
-- KEYS[1]  the key's hash            KEYS[2]  the audit stream
-- ARGV[1]  the new secret   ARGV[2]  the overlap in seconds (0: the old secret stops now)
-- ARGV[3]  the audit entry (JSON text)   ARGV[4]  entries the audit stream keeps
--
-- Returns {1, fields of the key (flat)}, {-1} for an unknown key, {-2} for a revoked one.

local key, audit = KEYS[1], KEYS[2]
local secret, overlap_s, entry, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]

if redis.call('EXISTS', key) == 0 then return {-1} end
if redis.call('HGET', key, 'revoked') == '1' then return {-2} end
local t = clock()
local old = redis.call('HGET', key, 'webhook_secret')
if overlap_s > 0 and old then
  redis.call('HSET', key, 'previous_webhook_secret', old,
    'previous_secret_expires_at', string.format('%.6f', t + overlap_s))
else
  redis.call('HDEL', key, 'previous_webhook_secret', 'previous_secret_expires_at')
end
redis.call('HSET', key, 'webhook_secret', secret,
  'webhook_secret_rotated_at', string.format('%.6f', t))
redis.call('XADD', audit, 'MAXLEN', maxlen, '*', 'entry', entry)
return {1, redis.call('HGETALL', key)}
