-- Shared by every script: key names, the indexes that follow a task's state, and publishing.
-- redis_scripts.py puts the generated constants above this file and a script below it.
-- ARGV[1] is the key prefix. Every value the scripts store is a string, and datetimes are
-- integer microseconds since the Unix epoch, so no number passes through cjson.

local PREFIX = ARGV[1]
local CHANNEL = PREFIX .. ':changes'
local ALL = PREFIX .. ':all'
local DELAYED = PREFIX .. ':delayed'
local FINISHED = PREFIX .. ':finished'
local LEASES = PREFIX .. ':leases'
local OWNERS = PREFIX .. ':owners'
local COUNTS = PREFIX .. ':counts'
local KEY_HOLDERS = PREFIX .. ':keys'

local function task_key(id) return PREFIX .. ':task:' .. id end
local function attempts_key(id) return PREFIX .. ':attempts:' .. id end
local function logs_key(id) return PREFIX .. ':logs:' .. id end
local function status_key(status) return PREFIX .. ':status:' .. status end
local function name_key(name) return PREFIX .. ':name:' .. name end
local function status_name_key(status, name)
  return PREFIX .. ':status-name:' .. status .. ':' .. name
end
local function ready_key(name) return PREFIX .. ':ready:' .. name end
local function owned_key(owner) return PREFIX .. ':owned:' .. owner end
local function cancelling_key(owner) return PREFIX .. ':cancelling:' .. owner end
local function durations_key(name) return PREFIX .. ':durations:' .. name end
-- A tag key has no colon, so the key and the value never run into each other.
local function tag_key(key, value) return PREFIX .. ':tag:' .. key .. ':' .. value end

-- A position is "<created_at, zero-padded>:<id>". Sets of positions all have score 0, so
-- Redis keeps them in byte order, which is the order of (created_at, id).
local function id_of(position) return string.sub(position, POSITION_ID_START) end

-- Whether a sorts before b in byte order. Lua's own "<" calls strcoll, which follows the
-- server's locale.
local function precedes(a, b)
  local length = math.min(#a, #b)
  for i = 1, length do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function follows(a, b) return precedes(b, a) end

-- Optional values arrive as '' for None, or as '=' followed by the value.
local function optional(value)
  if value == '' then return false end
  return string.sub(value, 2)
end

-- Write a table of field -> value into a hash; a false value deletes the field.
local function set_fields(key, values)
  local assigned, deleted = {}, {}
  for field, value in pairs(values) do
    if value then
      assigned[#assigned + 1] = field
      assigned[#assigned + 1] = value
    else
      deleted[#deleted + 1] = field
    end
  end
  if #assigned > 0 then redis.call('HSET', key, unpack(assigned)) end
  if #deleted > 0 then redis.call('HDEL', key, unpack(deleted)) end
end

local STATE_FIELDS = {
  'id', 'name', 'position', 'idempotency_key', 'status', 'owner', 'cancel_requested',
  'scheduled_at', 'finished_at', 'duration', 'attempts',
}

-- The fields of a task that its index entries depend on, or nil when the task is unknown.
local function read_state(id)
  local v = redis.call('HMGET', task_key(id), unpack(STATE_FIELDS))
  if not v[1] then return nil end
  return {
    id = v[1], name = v[2], position = v[3], key = v[4], status = v[5], owner = v[6],
    cancel = v[7] == '1', scheduled = v[8], finished = v[9], duration = v[10],
    attempts = tonumber(v[11]),
  }
end

local function field(state, name)
  if state == nil then return nil end
  return state[name] or nil
end

local function is_waiting(state)
  return state ~= nil and state.status == 'PENDING' and not state.owner and not state.cancel
end

local function active_owner(state)
  if state ~= nil and ACTIVE[state.status] then return state.owner or nil end
  return nil
end

local function cancelling_owner(state)
  if state ~= nil and state.status == 'RUNNING' and state.cancel then
    return state.owner or nil
  end
  return nil
end

local function is_terminal(state) return state ~= nil and TERMINAL[state.status] == true end
local function holds_key(state) return state ~= nil and HOLDING[state.status] == true end

local function change_count(status, name, delta)
  local counter = status .. ':' .. name
  if redis.call('HINCRBY', COUNTS, counter, delta) <= 0 then
    redis.call('HDEL', COUNTS, counter)
  end
end

local function move_member(old_key, new_key, member, score)
  if old_key then redis.call('ZREM', old_key, member) end
  if new_key then redis.call('ZADD', new_key, score or 0, member) end
end

-- Bring every index, counter and the key holder in line with a task going from state old to
-- state new. old is nil for a new task, new is nil for a deleted one.
local function update_indexes(old, new)
  local state = new or old
  local id, name, position = state.id, state.name, state.position

  if old == nil then
    redis.call('ZADD', ALL, 0, position)
    redis.call('ZADD', name_key(name), 0, position)
  elseif new == nil then
    redis.call('ZREM', ALL, position)
    redis.call('ZREM', name_key(name), position)
  end
  -- Tags never change, so their sets change only when a task is created or deleted.
  if old == nil or new == nil then
    local tags = redis.call('HGET', task_key(id), 'tags')
    if tags then
      for key, value in pairs(cjson.decode(tags)) do
        if old == nil then
          redis.call('ZADD', tag_key(key, value), 0, position)
        else
          redis.call('ZREM', tag_key(key, value), position)
        end
      end
    end
  end

  local old_status, new_status = field(old, 'status'), field(new, 'status')
  if old_status ~= new_status then
    if old_status then
      redis.call('ZREM', status_key(old_status), position)
      redis.call('ZREM', status_name_key(old_status, name), position)
      change_count(old_status, name, -1)
    end
    if new_status then
      redis.call('ZADD', status_key(new_status), 0, position)
      redis.call('ZADD', status_name_key(new_status, name), 0, position)
      change_count(new_status, name, 1)
    end
  end

  -- Ownerless claimable tasks wait in DELAYED (by due time) until claim_next finds them due
  -- and moves them to the ready set of their name.
  local was_waiting, now_waiting = is_waiting(old), is_waiting(new)
  local schedule_changed = field(old, 'scheduled') ~= field(new, 'scheduled')
  if was_waiting and (not now_waiting or schedule_changed) then
    redis.call('ZREM', ready_key(name), position)
    redis.call('ZREM', DELAYED, id)
  end
  if now_waiting and (not was_waiting or schedule_changed) then
    if new.scheduled then
      redis.call('ZADD', DELAYED, new.scheduled, id)
    else
      redis.call('ZADD', ready_key(name), 0, position)
    end
  end

  local old_owner, new_owner = active_owner(old), active_owner(new)
  if old_owner ~= new_owner then
    if old_owner then
      redis.call('ZREM', owned_key(old_owner), position)
      if redis.call('EXISTS', owned_key(old_owner)) == 0 then
        redis.call('SREM', OWNERS, old_owner)
      end
    end
    if new_owner then
      redis.call('ZADD', owned_key(new_owner), 0, position)
      redis.call('SADD', OWNERS, new_owner)
    end
  end

  local old_cancelling, new_cancelling = cancelling_owner(old), cancelling_owner(new)
  if old_cancelling ~= new_cancelling then
    move_member(
      old_cancelling and cancelling_key(old_cancelling),
      new_cancelling and cancelling_key(new_cancelling),
      position
    )
  end

  -- Members of a durations set are "<duration> <id>", so that metrics read no task hashes.
  local was_terminal, now_terminal = is_terminal(old), is_terminal(new)
  local ending_changed = field(old, 'finished') ~= field(new, 'finished')
    or field(old, 'duration') ~= field(new, 'duration')
  if was_terminal and (not now_terminal or ending_changed) then
    redis.call('ZREM', FINISHED, id)
    if old.duration then
      redis.call('ZREM', durations_key(name), old.duration .. ' ' .. id)
    end
  end
  if now_terminal and (not was_terminal or ending_changed) then
    local finished = new.finished or '0'
    redis.call('ZADD', FINISHED, finished, id)
    if new.duration then
      -- Metrics keep the durations of the most recently finished tasks of each name only.
      local durations = durations_key(name)
      redis.call('ZADD', durations, finished, new.duration .. ' ' .. id)
      local excess = redis.call('ZCARD', durations) - DURATION_SAMPLES
      if excess > 0 then redis.call('ZREMRANGEBYRANK', durations, 0, excess - 1) end
    end
  end

  if state.key and holds_key(old) and not holds_key(new) then
    if redis.call('HGET', KEY_HOLDERS, state.key) == id then
      redis.call('HDEL', KEY_HOLDERS, state.key)
    end
  end
end

local watched = nil

-- Whether any client of the server subscribes to the change channel; asked once per call.
local function is_watched()
  if watched == nil then
    watched = redis.call('PUBSUB', 'NUMSUB', CHANNEL)[2] > 0
  end
  return watched
end

local function publish(message)
  if is_watched() then redis.call('PUBLISH', CHANNEL, message) end
end

-- A task's summary fields as a table of field -> value, without the fields it lacks.
local function summary_of(id)
  local values = redis.call('HMGET', task_key(id), unpack(SUMMARY_FIELDS))
  local summary = {}
  for i, name in ipairs(SUMMARY_FIELDS) do
    if values[i] then summary[name] = values[i] end
  end
  return summary
end

local function publish_summary(id)
  if is_watched() then publish('S' .. cjson.encode(summary_of(id))) end
end

-- A JSON array of JSON texts. cjson would encode an empty table as {}.
local function json_array(texts) return '[' .. table.concat(texts, ',') .. ']' end

-- Apply a change to a task's hash, then update its indexes and publish its summary.
local function change_task(old, values)
  set_fields(task_key(old.id), values)
  update_indexes(old, read_state(old.id))
  publish_summary(old.id)
end

-- Reply with a task as one JSON text, because redis-py parses one string much faster than
-- nested replies of a few dozen strings:
-- {"task": hash fields, "attempts": [...], "logs": [...] or []}.
local function record_reply(id, with_logs)
  local flat = redis.call('HGETALL', task_key(id))
  local task = {}
  for i = 1, #flat, 2 do task[flat[i]] = flat[i + 1] end
  local logs = {}
  if with_logs then logs = redis.call('LRANGE', logs_key(id), 0, -1) end
  return '{"task":' .. cjson.encode(task)
    .. ',"attempts":' .. json_array(redis.call('LRANGE', attempts_key(id), 0, -1))
    .. ',"logs":' .. json_array(logs) .. '}'
end

-- Change the last attempt of a task when accept(attempt) is true; false values delete fields.
local function update_last_attempt(id, accept, values)
  local key = attempts_key(id)
  local encoded = redis.call('LINDEX', key, -1)
  if not encoded then return end
  local attempt = cjson.decode(encoded)
  if not accept(attempt) then return end
  for name, value in pairs(values) do
    if value then attempt[name] = value else attempt[name] = nil end
  end
  redis.call('LSET', key, -1, cjson.encode(attempt))
end

local function start_attempt(old, instance, now)
  local key = task_key(old.id)
  local number = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'status', 'RUNNING', 'owner', instance, 'started_at', now)
  redis.call('HDEL', key, 'scheduled_at')
  local attempt = {
    number = tostring(number), instance_id = instance, started_at = now, status = 'RUNNING',
  }
  redis.call('RPUSH', attempts_key(old.id), cjson.encode(attempt))
  update_indexes(old, read_state(old.id))
  publish_summary(old.id)
end

-- Release a PENDING task or interrupt a RUNNING one whose owner is gone, as take_back() in
-- records.py does. Adds the id to report.released, report.requeued or report.interrupted.
local function take_back(id, now, report)
  local old = read_state(id)
  if old == nil then return end
  if old.status == 'PENDING' then
    change_task(old, {owner = false})
    report.released[#report.released + 1] = id
    return
  end
  if old.status ~= 'RUNNING' then return end

  update_last_attempt(id, function(attempt) return attempt.finished_at == nil end, {
    finished_at = now,
    status = 'INTERRUPTED',
    error_type = 'Interrupted',
    error_message = 'Instance ' .. tostring(old.owner) .. ' stopped during this attempt.',
  })
  local values = {owner = false, cancel_requested = '0'}
  if redis.call('HGET', task_key(id), 'requeue_on_interrupt') == '1' then
    values.status = 'PENDING'
    values.scheduled_at = false
    -- The requeued run is one more attempt, so the budget grows to show "n of n".
    local task = task_key(id)
    local attempts = tonumber(redis.call('HGET', task, 'attempts')) or 0
    local max_attempts = tonumber(redis.call('HGET', task, 'max_attempts')) or 1
    if attempts + 1 > max_attempts then
      values.max_attempts = tostring(attempts + 1)
    end
    report.requeued[#report.requeued + 1] = id
  else
    values.status = 'INTERRUPTED'
    values.finished_at = now
    local started_at = redis.call('HGET', task_key(id), 'started_at')
    if started_at then
      -- Both times are whole microseconds below 2^53, so the difference is exact and the
      -- division rounds as Python's timedelta.total_seconds() does; %.17g keeps every bit.
      values.duration = string.format('%.17g', (tonumber(now) - tonumber(started_at)) / 1e6)
    end
    values.error_type = 'Interrupted'
    values.error_message = 'The instance running this task stopped before it finished.'
    report.interrupted[#report.interrupted + 1] = id
  end
  change_task(old, values)
end

-- Take back the tasks of the given owners, oldest first. When limit is a number, take back
-- at most that many. Reply with the three id lists.
local function take_back_owners(owners, now, limit)
  local last = limit and limit - 1 or -1
  local positions = {}
  for _, owner in ipairs(owners) do
    -- Each owned set is in creation order, so its first limit members are all it can give.
    for _, position in ipairs(redis.call('ZRANGE', owned_key(owner), 0, last)) do
      positions[#positions + 1] = position
    end
  end
  table.sort(positions, precedes)
  local report = {released = {}, requeued = {}, interrupted = {}}
  for i, position in ipairs(positions) do
    if limit and i > limit then break end
    take_back(id_of(position), now, report)
  end
  return {report.released, report.requeued, report.interrupted}
end
