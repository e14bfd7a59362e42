-- Delete finished tasks with their attempts and logs, at most a batch per call.
-- ARGV: prefix, cutoff (tasks finished before it are deleted; '' for no age rule), max_count
-- ('' for no count rule), batch. Reply: the number of tasks deleted.

local cutoff, max_count, batch = ARGV[2], ARGV[3], tonumber(ARGV[4])
local doomed, seen = {}, {}
local function add(ids)
  for _, id in ipairs(ids) do
    if not seen[id] and #doomed < batch then
      seen[id] = true
      doomed[#doomed + 1] = id
    end
  end
end

if max_count ~= '' then
  -- FINISHED sorts by finished_at, then id; the newest max_count stay.
  local keep = tonumber(max_count)
  add(redis.call('ZRANGE', FINISHED, keep, keep + batch - 1, 'REV'))
end
if cutoff ~= '' then
  add(redis.call('ZRANGEBYSCORE', FINISHED, '-inf', '(' .. cutoff, 'LIMIT', 0, batch))
end

for _, id in ipairs(doomed) do
  local old = read_state(id)
  if old ~= nil then update_indexes(old, nil) end
  redis.call('DEL', task_key(id), attempts_key(id), logs_key(id))
  redis.call('ZREM', FINISHED, id)
end
return #doomed
