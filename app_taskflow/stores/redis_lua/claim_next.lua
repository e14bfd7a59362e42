-- Claim up to limit ownerless due tasks of the given names, oldest first.
-- ARGV: prefix, instance, now, limit, names... Reply: the claimed tasks without logs.

local instance, now, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])

-- Move the tasks that became due into the ready set of their name, a batch per call so
-- that a large backlog never makes one call long.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', now, 'LIMIT', 0, 1000)) do
  local fields = redis.call('HMGET', task_key(id), 'name', 'position')
  if fields[1] then redis.call('ZADD', ready_key(fields[1]), 0, fields[2]) end
  redis.call('ZREM', DELAYED, id)
end

local candidates = {}
for i = 5, #ARGV do
  for _, position in ipairs(redis.call('ZRANGE', ready_key(ARGV[i]), 0, limit - 1)) do
    candidates[#candidates + 1] = position
  end
end
table.sort(candidates, precedes)

local claimed = {}
for _, position in ipairs(candidates) do
  if #claimed >= limit then break end
  local old = read_state(id_of(position))
  if old == nil or not is_waiting(old) then
    -- Not expected, because the indexes follow every change: drop the stale entry.
    for i = 5, #ARGV do redis.call('ZREM', ready_key(ARGV[i]), position) end
  elseif old.scheduled and tonumber(old.scheduled) > tonumber(now) then
    -- The caller's clock is behind the one that found this task due.
    redis.call('ZREM', ready_key(old.name), position)
    redis.call('ZADD', DELAYED, old.scheduled, old.id)
  else
    start_attempt(old, instance, now)
    claimed[#claimed + 1] = record_reply(old.id, false)
  end
end
return claimed
