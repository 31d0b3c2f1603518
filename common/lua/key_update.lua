-- Change a key as an operator asks, and record it in the audit log, in one step: add
-- credits (an increment, never read-modify-write), set or clear fields, revoke.
--
-- KEYS[1]  the key's hash            KEYS[2]  the audit stream
-- ARGV[1]  JSON: add_credits (0: none), set (field -> text; '' clears a limit), audit (the
--          entry, JSON text), maxlen (entries the audit stream keeps).
--
-- Returns {1, fields of the key (flat)}, {-1} for an unknown key, {-2} for a revoked one,
-- {-3, credits} when the credits would go below zero. Every check comes before a write.

local args = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'revoked') == '1' then return {-2} end
local credits = tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
if credits + args.add_credits < 0 then return {-3, credits} end
if args.add_credits ~= 0 then redis.call('HINCRBY', KEYS[1], 'credits', args.add_credits) end
local flat = {}
for name, value in pairs(args.set) do
  flat[#flat + 1] = name
  flat[#flat + 1] = value
end
if #flat > 0 then redis.call('HSET', KEYS[1], unpack(flat)) end
redis.call('XADD', KEYS[2], 'MAXLEN', args.maxlen, '*', 'entry', args.audit)
return {1, redis.call('HGETALL', KEYS[1])}
