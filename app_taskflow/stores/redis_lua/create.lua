-- Insert new tasks unless their idempotency key is held by a task in a holding status.
-- ARGV[2] is the number of records. Each record then takes:
-- id, idempotency key ('' for none), name, args, kwargs, the number of hash fields followed
-- by field-value pairs, the number of attempts followed by them, the number of log entries
-- followed by them.
-- Reply: {ids, holder}. holder is nil, or the task (as record_reply makes it) that holds the
-- key of the next record with another name, args or kwargs; nothing after that record was
-- written.

local ids = {}
local index = 3
for _ = 1, tonumber(ARGV[2]) do
  local id, key, name, args, kwargs = unpack(ARGV, index, index + 4)
  local field_count = tonumber(ARGV[index + 5])
  local fields_start = index + 6
  local attempts_start = fields_start + 2 * field_count + 1
  local attempt_count = tonumber(ARGV[attempts_start - 1])
  local logs_start = attempts_start + attempt_count + 1
  local log_count = tonumber(ARGV[logs_start - 1])
  index = logs_start + log_count

  local holder_id = nil
  if key ~= '' then
    local candidate = redis.call('HGET', KEY_HOLDERS, key)
    if candidate then
      local holder = redis.call('HMGET', task_key(candidate), 'status', 'name', 'args', 'kwargs')
      if HOLDING[holder[1]] then
        if holder[2] ~= name or holder[3] ~= args or holder[4] ~= kwargs then
          -- Equal arguments can have unequal JSON (1 and 1.0, key order), so Python decides.
          return {ids, record_reply(candidate, false)}
        end
        holder_id = candidate
      end
    end
  end

  if holder_id then
    ids[#ids + 1] = holder_id
  elseif redis.call('EXISTS', task_key(id)) == 1 then
    -- The same call ran before and its reply was lost, so the client sent it again.
    ids[#ids + 1] = id
  else
    redis.call('HSET', task_key(id), unpack(ARGV, fields_start, attempts_start - 2))
    for first = attempts_start, logs_start - 2, 1000 do
      local last = math.min(first + 999, logs_start - 2)
      redis.call('RPUSH', attempts_key(id), unpack(ARGV, first, last))
    end
    for first = logs_start, index - 1, 1000 do
      local last = math.min(first + 999, index - 1)
      redis.call('RPUSH', logs_key(id), unpack(ARGV, first, last))
    end
    if key ~= '' then redis.call('HSET', KEY_HOLDERS, key, id) end
    update_indexes(nil, read_state(id))
    publish_summary(id)
    ids[#ids + 1] = id
  end
end
return {ids, false}
