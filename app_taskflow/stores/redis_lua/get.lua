-- Reply with one task and its logs, or nil. ARGV[2] is the task id.
if redis.call('EXISTS', task_key(ARGV[2])) == 0 then return false end
return record_reply(ARGV[2], true)
