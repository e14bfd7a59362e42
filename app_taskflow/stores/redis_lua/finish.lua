-- Record how an attempt ended, as apply_outcome() in records.py does.
-- ARGV: prefix, task id, instance, attempt number, then the outcome: status, finished_at,
-- duration, and the optional scheduled_at, error_type, error_message, traceback.
-- Reply: 1 when written, 0 when the task is no longer RUNNING under that attempt.

local id, instance, attempt = ARGV[2], ARGV[3], tonumber(ARGV[4])
local status, finished_at, duration = ARGV[5], ARGV[6], ARGV[7]
local scheduled_at, error_type = optional(ARGV[8]), optional(ARGV[9])
local error_message, traceback = optional(ARGV[10]), optional(ARGV[11])

local old = read_state(id)
if old == nil or old.status ~= 'RUNNING' or old.owner ~= instance then return 0 end
if old.attempts ~= attempt then return 0 end

-- The cancel may have reached the store after the runner decided to retry.
if status == 'PENDING' and old.cancel then
  status = 'CANCELLED'
  scheduled_at = false
end

local values = {
  status = status, duration = duration, error_type = error_type, error_message = error_message,
}
if traceback or status == 'SUCCESS' then values.traceback = traceback end
if status == 'PENDING' then
  values.scheduled_at = scheduled_at
else
  values.finished_at = finished_at
  values.cancel_requested = '0'
end

local attempt_status = status
if status == 'PENDING' then attempt_status = 'FAILED' end
update_last_attempt(id, function(last) return tonumber(last.number) == attempt end, {
  finished_at = finished_at,
  status = attempt_status,
  error_type = error_type,
  error_message = error_message,
})
change_task(old, values)
return 1
