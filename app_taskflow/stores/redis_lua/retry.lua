-- Queue a FAILED or INTERRUPTED task again, as requeue() in records.py does.
-- ARGV: prefix, task id, extra attempts. Reply: {'missing'}, {'status', task} when its
-- status does not allow a retry, {'key_held', task, holder id}, or {'retried', task}.

local id, extra_attempts = ARGV[2], tonumber(ARGV[3])
local old = read_state(id)
if old == nil then return {'missing'} end
if not RETRYABLE[old.status] then return {'status', record_reply(id, true)} end

if old.key then
  local holder = redis.call('HGET', KEY_HOLDERS, old.key)
  if holder and holder ~= id then
    local holder_status = redis.call('HGET', task_key(holder), 'status')
    if HOLDING[holder_status] then return {'key_held', record_reply(id, true), holder} end
  end
  redis.call('HSET', KEY_HOLDERS, old.key, id)
end

change_task(old, {
  status = 'PENDING',
  owner = false,
  scheduled_at = false,
  finished_at = false,
  error_type = false,
  error_message = false,
  cancel_requested = '0',
  max_attempts = tostring(old.attempts + extra_attempts),
})
return {'retried', record_reply(id, true)}
