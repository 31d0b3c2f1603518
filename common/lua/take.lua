-- Which job a task message runs. Every job sends one message, but a message runs the next
-- job of its lane (tier and model) and priority in turn by key (round robin), so one key's thousands of
-- waiting jobs delay another key's new job by at most a few. A redelivered message (same
-- task id) runs the job it took the first time.
--
-- KEYS[1]  the message's record (sdq:taken:<task id>)
-- ARGV[1]  the id of the job the message was sent for; ARGV[2] the record's TTL;
-- ARGV[3]  how many stale entries (jobs no longer queued) one call may skip.
--
-- Returns the job id to start, or false when there is nothing to run.

local record = KEYS[1]
local sent_for, ttl, max_skips = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local taken = redis.call('GET', record)
if taken then return taken end
local hint = job_key(sent_for)
local lane, priority = lane_of(hint), redis.call('HGET', hint, 'priority')
local chosen = false
if lane and priority then
  local ring = fair_ring_key(lane, priority)
  for _ = 1, max_skips do
    local key_id = redis.call('LPOP', ring)
    if not key_id then break end
    local mine = fair_list_key(lane, priority, key_id)
    local id = redis.call('LPOP', mine)
    if redis.call('LLEN', mine) > 0 then redis.call('RPUSH', ring, key_id) end
    if id and redis.call('HGET', job_key(id), 'status') == '"queued"' then
      chosen = id
      break
    end
  end
end
if not chosen and redis.call('HGET', hint, 'status') == '"queued"' then chosen = sent_for end
if not chosen then return false end
redis.call('SET', record, chosen, 'EX', ttl)
return chosen
