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

if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return {-2} end
local t = clock()
local overlap = tonumber(ARGV[2])
local old = redis.call('HGET', KEYS[1], 'webhook_secret')
if overlap > 0 and old then
  redis.call('HSET', KEYS[1], 'previous_webhook_secret', old,
    'previous_secret_expires_at', string.format('%.6f', t + overlap))
else
  redis.call('HDEL', KEYS[1], 'previous_webhook_secret', 'previous_secret_expires_at')
end
redis.call('HSET', KEYS[1], 'webhook_secret', ARGV[1],
  'webhook_secret_rotated_at', string.format('%.6f', t))
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', 'entry', ARGV[3])
return {1, redis.call('HGETALL', KEYS[1])}
